//! The one way the cluster cases build their hosts (issue #17): a
//! [`Topology`] says how many storage, SMTP and POP hosts, whether the
//! userbase is MariaDB on its own `db` host, the mailboxes and any other
//! hosts; [`Topology::start`] makes the network, starts every daemon at its
//! host through the test kit, as docs/DEPLOY.md lays a cluster out (one
//! pplistener per storage host, its backend in the host's own `group`;
//! each frontend with its own state directory), and returns a [`Cluster`]
//! of typed handles.
//!
//! Hosts are added in one order — `db`, `storage1..`, `smtp1..`, `pop1..`,
//! then the others by name — so a case's addresses do not depend on how it
//! asked for them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use powermail_proto::{BackendConn, ErrorCode, MailboxName};

use powermail_testkit::{
    BackendSpec, Frontend, FrontendSpec, Kind, Mariadb, Place, Pplistener, PplistenerSpec,
};

use crate::{Host, Net, HOSTS_MAX};

/// The backends' shared secret.
pub const SECRET: &str = "cluster-secret-0123456789";
/// Every admin port's token.
pub const TOKEN: &str = "cluster-admin-token";
/// Most messages [`Cluster::copies`] lists in one mailbox of one backend.
pub const LIST_MAX: usize = 1_000_000;
/// Most mailboxes a topology creates.
pub const MAILBOXES_MAX: usize = 10_000;

/// One backend as the frontends' `[[backend]]` list names it: (name,
/// address, more lines of the table — the host's `group`).
pub type BackendEntry = (String, SocketAddr, String);

/// Where `h`'s daemons run: its namespace, bound to its address.
pub fn place(h: &Host) -> Place {
    Place {
        netns: Some(h.netns.clone()),
        ip: h.addr.into(),
    }
}

/// The `group` line of a backend on storage host `h` (docs/DEPLOY.md: a
/// host's disks share its group, so K copies land on K hosts).
pub fn group(h: &Host) -> String {
    format!("group = \"{}\"\n", h.name)
}

/// What a case's cluster is made of; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    name: String,
    storage: usize,
    smtp: usize,
    pop: usize,
    database: bool,
    others: Vec<String>,
    mailboxes: Vec<(String, String)>,
    smtp_config: String,
    pop_config: String,
}

impl Topology {
    /// An empty topology for the case `name` (its directory is
    /// `cluster-NAME-*` under the system's temporary directory).
    pub fn new(name: &str) -> Topology {
        Topology {
            name: name.to_string(),
            ..Topology::default()
        }
    }

    /// The storage cases' layout: `storage1..3`, `smtp1` and `smtp2` at
    /// `replicas = 2` (every message on two of the three hosts), `pop1` with
    /// plaintext logins (the clients are on the cluster network, not
    /// loopback: no TLS here); SQLite userbase.
    pub fn k2(name: &str) -> Topology {
        Topology::new(name)
            .storage(3)
            .smtp(2)
            .pop(1)
            .smtp_config("replicas = 2\n")
            .pop_config("allow_plaintext_auth = true\n")
    }

    /// `count` storage hosts, `storage1..`, one pplistener each.
    pub fn storage(mut self, count: usize) -> Topology {
        self.storage = count;
        self
    }

    /// `count` SMTP hosts, `smtp1..`, one powersmtp each.
    pub fn smtp(mut self, count: usize) -> Topology {
        self.smtp = count;
        self
    }

    /// `count` POP hosts, `pop1..`, one powerpop each.
    pub fn pop(mut self, count: usize) -> Topology {
        self.pop = count;
        self
    }

    /// The userbase is MariaDB on host `db`; without it, SQLite in the
    /// case's directory.
    pub fn database(mut self) -> Topology {
        self.database = true;
        self
    }

    /// One more host, `name`, with no daemon (a balancer, a second client).
    pub fn host(mut self, name: &str) -> Topology {
        self.others.push(name.to_string());
        self
    }

    /// A mailbox the userbase has before any daemon starts.
    pub fn mailbox(mut self, user: &str, password: &str) -> Topology {
        self.mailboxes
            .push((user.to_string(), password.to_string()));
        self
    }

    /// Mailboxes `(user, password)` the userbase has before any daemon starts.
    pub fn mailboxes(mut self, list: impl IntoIterator<Item = (String, String)>) -> Topology {
        self.mailboxes.extend(list);
        self
    }

    /// More lines of every powersmtp's configuration (`replicas = 2`).
    pub fn smtp_config(mut self, lines: &str) -> Topology {
        self.smtp_config.push_str(lines);
        self
    }

    /// More lines of every powerpop's configuration.
    pub fn pop_config(mut self, lines: &str) -> Topology {
        self.pop_config.push_str(lines);
        self
    }

    /// The whole cluster: [`Topology::start_storage`], then
    /// [`Cluster::start_frontends`].
    pub fn start(self) -> Cluster {
        let mut cluster = self.start_storage();
        cluster.start_frontends();
        cluster
    }

    /// The hosts, the userbase (with its mailboxes) and the pplisteners, but
    /// no frontend yet: for a case that changes the backend list, the
    /// frontends' configuration or the network before they start. Panics
    /// when something cannot be made (the case has failed).
    pub fn start_storage(self) -> Cluster {
        let hosts = usize::from(self.database) + self.storage + self.smtp + self.pop;
        assert!(
            hosts + self.others.len() <= HOSTS_MAX,
            "more than {HOSTS_MAX} hosts"
        );
        assert!(
            self.mailboxes.len() <= MAILBOXES_MAX,
            "more than {MAILBOXES_MAX} mailboxes"
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("cluster-{}-", self.name))
            .tempdir()
            .expect("tempdir");
        let mut net = Net::new().expect("bridge");
        let mut add = |name: String| net.add_host(&name).expect("host");
        let db_host = self.database.then(|| add("db".to_string()));
        let storage_hosts: Vec<Host> = (1..=self.storage)
            .map(|i| add(format!("storage{i}")))
            .collect();
        let smtp_hosts: Vec<Host> = (1..=self.smtp).map(|i| add(format!("smtp{i}"))).collect();
        let pop_hosts: Vec<Host> = (1..=self.pop).map(|i| add(format!("pop{i}"))).collect();
        let other_hosts: Vec<Host> = self.others.iter().map(|n| add(n.clone())).collect();

        let db = db_host
            .as_ref()
            .map(|h| Mariadb::start_at(&place(h), "powermail"));
        let url = match &db {
            Some(db) => db.url(),
            None => format!("sqlite://{}", dir.path().join("userbase.db").display()),
        };
        let ub = powermail_userbase::open(&url).expect("userbase (migrates)");
        for (user, password) in &self.mailboxes {
            ub.add_mailbox(user, password, 0).expect("mailbox");
        }
        drop(ub);

        let storage: Vec<Pplistener> = storage_hosts
            .iter()
            .map(|h| start_pplistener(dir.path(), h))
            .collect();
        let backends = storage_hosts
            .iter()
            .zip(&storage)
            .map(|(h, l)| (h.name.clone(), l.backends[0], group(h)))
            .collect();
        Cluster {
            smtp: Vec::new(),
            pop: Vec::new(),
            storage,
            db,
            backends,
            url,
            smtp_config: self.smtp_config,
            pop_config: self.pop_config,
            db_host,
            storage_hosts,
            smtp_hosts,
            pop_hosts,
            other_hosts,
            net,
            dir,
        }
    }
}

/// One pplistener with one backend, named after the host, on storage host `h`.
fn start_pplistener(root: &Path, h: &Host) -> Pplistener {
    let spec = PplistenerSpec {
        secret: SECRET.into(),
        admin_token: TOKEN.into(),
        extra: "blocking_threads = 4\n[limits]\nfree_bytes_min = 0\n".into(),
        backends: vec![BackendSpec::named(&h.name, root.join(&h.name))],
    };
    Pplistener::start_at(&place(h), root, &format!("pplistener-{}", h.name), &spec)
}

/// A started [`Topology`]: its hosts and daemons. Dropping it stops every
/// daemon (frontends first), then removes the network and the directory.
pub struct Cluster {
    /// The powersmtp of each SMTP host (empty before
    /// [`Cluster::start_frontends`]).
    pub smtp: Vec<Frontend>,
    /// The powerpop of each POP host (empty before
    /// [`Cluster::start_frontends`]).
    pub pop: Vec<Frontend>,
    /// The pplistener of each storage host.
    pub storage: Vec<Pplistener>,
    /// The MariaDB on host `db`, if the topology has one.
    pub db: Option<Mariadb>,
    /// The frontends' `[[backend]]` list (one per storage host, in order):
    /// a case may route one through a proxy before the frontends start.
    pub backends: Vec<BackendEntry>,
    /// The userbase every frontend uses.
    pub url: String,
    /// More lines of every powersmtp's configuration.
    pub smtp_config: String,
    /// More lines of every powerpop's configuration.
    pub pop_config: String,
    /// Host `db`, if the topology has one.
    pub db_host: Option<Host>,
    /// `storage1..`.
    pub storage_hosts: Vec<Host>,
    /// `smtp1..`.
    pub smtp_hosts: Vec<Host>,
    /// `pop1..`.
    pub pop_hosts: Vec<Host>,
    /// The hosts of [`Topology::host`], in order.
    pub other_hosts: Vec<Host>,
    /// The network, for faults.
    pub net: Net,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// The case's directory (configurations, logs, data directories).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The host `name` of [`Topology::host`]; panics if there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.other_hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in this topology"))
    }

    /// Host `db`; panics if the topology has none.
    pub fn db_host(&self) -> &Host {
        self.db_host.as_ref().expect("a topology with a database")
    }

    /// Starts a powersmtp on each SMTP host and a powerpop on each POP host,
    /// over [`Cluster::backends`] and [`Cluster::url`], with
    /// [`Cluster::smtp_config`] / [`Cluster::pop_config`].
    pub fn start_frontends(&mut self) {
        let smtp: Vec<Frontend> = self
            .smtp_hosts
            .iter()
            .map(|h| self.start_frontend(Kind::Smtp, h, &self.smtp_config))
            .collect();
        let pop: Vec<Frontend> = self
            .pop_hosts
            .iter()
            .map(|h| self.start_frontend(Kind::Pop, h, &self.pop_config))
            .collect();
        self.smtp.extend(smtp);
        self.pop.extend(pop);
    }

    /// A powersmtp or powerpop on host `h`, with its own state directory (as
    /// on real hosts), over [`Cluster::backends`] and the userbase.
    fn start_frontend(&self, kind: Kind, h: &Host, extra: &str) -> Frontend {
        let state = self.root().join(format!("{}-state", h.name));
        let spec = FrontendSpec {
            kind,
            secret: SECRET.into(),
            admin_token: TOKEN.into(),
            userbase: self.url.clone(),
            extra: format!("state_dir = \"{}\"\n{extra}", state.display()),
            backends: self.backends.clone(),
        };
        Frontend::start_at(&place(h), self.root(), &h.name, &spec)
    }

    /// Where the case's messages (numbered with `tag`, see
    /// [`crate::id_of`]) are stored, straight from every pplistener (LIST and
    /// GET of each of `mailboxes`, `wait` to connect): message number → the
    /// index of the storage host of each copy, one entry per copy. A message
    /// listed but gone by its GET (`NOTFOUND`) is not counted; any other
    /// failed request panics.
    pub fn copies(
        &self,
        tag: &str,
        mailboxes: &[String],
        wait: Duration,
    ) -> HashMap<usize, Vec<usize>> {
        let mut copies: HashMap<usize, Vec<usize>> = HashMap::new();
        for (b, l) in self.storage.iter().enumerate() {
            let mut conn =
                BackendConn::connect(l.backends[0], SECRET.as_bytes(), wait).expect("backend");
            for mailbox in mailboxes {
                let mb = MailboxName::parse(mailbox).expect("mailbox");
                for e in conn.list(&mb, LIST_MAX).expect("LIST") {
                    // Listed, then deleted before the GET: a powersmtp's undo
                    // journal deletes the copies of refused messages, again
                    // and again until it hears back, so after a fault it may
                    // still be at work. Gone is not a copy.
                    let body = match conn.get(&mb, &e.msgid) {
                        Ok(body) => body,
                        Err(err) if err.code() == Some(ErrorCode::NotFound) => continue,
                        Err(err) => panic!("GET: {err:?}"),
                    };
                    if let Some(n) = crate::id_of(tag, &body) {
                        copies.entry(n).or_default().push(b);
                    }
                }
            }
        }
        copies
    }

    /// The addresses of the SMTP hosts' powersmtp, in order.
    pub fn smtp_addrs(&self) -> Vec<SocketAddr> {
        self.smtp.iter().map(|f| f.addr).collect()
    }
}
