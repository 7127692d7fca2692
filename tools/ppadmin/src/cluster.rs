//! Where the cluster is: backends, their secret, K, and the daemons' admin ports.
//!
//! The store and admin verbs need the same facts the frontends have. On a `powermail up`
//! tree they are all in `DIR/etc/*.toml` already (the supervisor writes them), so by
//! default ppadmin reads those: `powersmtp.toml` for the `[[backend]]` list, the secret
//! and `replicas`; every daemon's file for its `admin_listen` and `admin_token`. Other
//! deployments describe the same in one small file given with `--cluster FILE`
//! (`examples/ppadmin.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use powermail_proto::BackendConn;
use serde::Deserialize;

/// Time-out of connecting to a backend and of every read and write on it.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);

/// One backend as the frontends know it.
#[derive(Debug, Clone, Deserialize)]
pub struct Backend {
    /// Configured name (`b0`, ...), as the frontends log it.
    pub name: String,
    /// `host:port` of its PPL/1 port.
    pub addr: String,
}

/// One daemon's admin port.
#[derive(Debug, Clone, Deserialize)]
pub struct Daemon {
    /// `pplistener`, `powersmtp`, `powerpop`, or any name the operator chose.
    pub name: String,
    /// `host:port` of its admin port.
    pub addr: String,
    /// Its bearer token (default: the cluster's `admin_token`).
    #[serde(default)]
    pub token: Option<String>,
}

impl Daemon {
    /// True for a frontend (a daemon that has a backend list to disable backends in).
    pub fn is_frontend(&self) -> bool {
        !self.name.starts_with("pplistener")
    }
}

/// Everything ppadmin needs to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClusterInfo {
    /// The backends, in configuration order.
    pub backends: Vec<Backend>,
    /// The shared PPL/1 secret.
    pub secret: Vec<u8>,
    /// Copies every message should have (K).
    pub replicas: usize,
    /// Admin ports.
    pub daemons: Vec<Daemon>,
    /// Default bearer token for the admin ports.
    pub admin_token: Option<String>,
    /// powerpop's mailbox lock directory (`state_dir/locks`) on this host, if known:
    /// `repair` and `drain` take the same lock as a POP3 session before they touch a
    /// mailbox.
    pub pop_lock_dir: Option<PathBuf>,
    /// powerpop's userbase URL, if known: with MySQL/MariaDB, `repair` and `drain` also
    /// take the mailbox's lease row there, which POP hosts everywhere respect.
    pub pop_userbase: Option<String>,
    /// powerpop's `lock_lease_ms` (default 30,000).
    pub lock_lease_ms: u64,
}

/// powerpop's default `lock_lease_ms`.
const LOCK_LEASE_MS_DEFAULT: u64 = 30_000;

/// `--cluster FILE`: the explicit form (also what a `powermail up` tree boils down to).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    #[serde(default = "one")]
    replicas: usize,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    admin_token: Option<String>,
    #[serde(default)]
    pop_state_dir: Option<PathBuf>,
    #[serde(default)]
    pop_userbase: Option<String>,
    #[serde(default)]
    lock_lease_ms: Option<u64>,
    #[serde(default, rename = "daemon")]
    daemons: Vec<Daemon>,
    #[serde(rename = "backend")]
    backends: Vec<Backend>,
}

fn one() -> usize {
    1
}

/// The parts of a daemon's own TOML file ppadmin reads (everything else is ignored).
#[derive(Debug, Default, Deserialize)]
struct DaemonFile {
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    admin_token: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_file: Option<PathBuf>,
    #[serde(default)]
    replicas: Option<usize>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    userbase: Option<String>,
    #[serde(default)]
    lock_lease_ms: Option<u64>,
    #[serde(default, rename = "backend")]
    backends: Vec<Backend>,
}

/// The backend secret by the rule every PowerMail process shares.
fn load_secret(inline: Option<&str>, file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    Ok(powermail_proto::auth::load_secret(inline, file)?)
}

impl ClusterInfo {
    /// Reads an explicit cluster file.
    pub fn from_file(path: &Path) -> anyhow::Result<ClusterInfo> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let f: ClusterFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let secret = load_secret(f.secret.as_deref(), f.secret_file.as_deref())?;
        ClusterInfo {
            backends: f.backends,
            secret,
            replicas: f.replicas,
            daemons: f.daemons,
            admin_token: f.admin_token,
            pop_lock_dir: f.pop_state_dir.map(|d| d.join("locks")),
            pop_userbase: f.pop_userbase,
            lock_lease_ms: f.lock_lease_ms.unwrap_or(LOCK_LEASE_MS_DEFAULT),
        }
        .checked()
    }

    /// Reads the configuration files `powermail up` wrote under `DIR/etc`.
    pub fn from_up_tree(dir: &Path) -> anyhow::Result<ClusterInfo> {
        let etc = dir.join("etc");
        let read = |name: &str| -> anyhow::Result<Option<DaemonFile>> {
            let path = etc.join(format!("{name}.toml"));
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(Some(
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
            }
        };
        let smtp = read("powersmtp")?.with_context(|| {
            format!(
                "{} not found: is {} a `powermail up` tree? (or use --cluster FILE)",
                etc.join("powersmtp.toml").display(),
                dir.display()
            )
        })?;
        let secret = load_secret(smtp.secret.as_deref(), smtp.secret_file.as_deref())?;
        let mut daemons = Vec::new();
        let mut admin_token = None;
        let (ppl, pop) = (read("pplistener")?, read("powerpop")?);
        let files = [
            ("pplistener", ppl.as_ref()),
            ("powersmtp", Some(&smtp)),
            ("powerpop", pop.as_ref()),
        ];
        for (name, file) in files {
            let Some(f) = file else { continue };
            if let Some(addr) = &f.admin_listen {
                admin_token = admin_token.or_else(|| f.admin_token.clone());
                daemons.push(Daemon {
                    name: name.to_string(),
                    addr: addr.clone(),
                    token: f.admin_token.clone(),
                });
            }
        }
        let pop_lock_dir = pop
            .as_ref()
            .and_then(|p| p.state_dir.as_ref())
            .map(|d| d.join("locks"));
        ClusterInfo {
            backends: smtp.backends.clone(),
            secret,
            replicas: smtp.replicas.unwrap_or(1),
            daemons,
            admin_token,
            pop_lock_dir,
            pop_userbase: pop.as_ref().and_then(|p| p.userbase.clone()),
            lock_lease_ms: pop
                .as_ref()
                .and_then(|p| p.lock_lease_ms)
                .unwrap_or(LOCK_LEASE_MS_DEFAULT),
        }
        .checked()
    }

    fn checked(self) -> anyhow::Result<ClusterInfo> {
        if self.backends.is_empty() {
            bail!("no [[backend]] configured");
        }
        if self.replicas == 0 {
            bail!("replicas must be at least 1");
        }
        Ok(self)
    }

    /// The backend called `name` (or with that address).
    pub fn backend(&self, name: &str) -> anyhow::Result<&Backend> {
        self.backends
            .iter()
            .find(|b| b.name == name || b.addr == name)
            .with_context(|| {
                let names: Vec<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
                format!("no backend {name:?} (known: {})", names.join(", "))
            })
    }

    /// An authenticated connection to `backend`.
    pub fn connect(&self, backend: &Backend) -> anyhow::Result<BackendConn> {
        BackendConn::connect(&backend.addr, &self.secret, BACKEND_TIMEOUT)
            .with_context(|| format!("backend {} ({})", backend.name, backend.addr))
    }

    /// The bearer token for `daemon`.
    pub fn token_for(&self, daemon: &Daemon) -> Option<String> {
        daemon.token.clone().or_else(|| self.admin_token.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_powermail_up_tree() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("powersmtp.toml"),
            "listen = \"x\"\nadmin_listen = \"127.0.0.1:8025\"\nadmin_token = \"t\"\nreplicas = 2\n\
             secret = \" 0123456789abcdef\t\"\nuserbase = \"sqlite://x\"\n[limits]\nconnections_max = 3\n\
             [[backend]]\nname = \"b0\"\naddr = \"127.0.0.1:7000\"\n\
             [[backend]]\nname = \"b1\"\naddr = \"127.0.0.1:7001\"\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("pplistener.toml"),
            "admin_listen = \"127.0.0.1:8010\"\nadmin_token = \"t\"\nbackend_count = 2\n",
        )
        .unwrap();
        let c = ClusterInfo::from_up_tree(dir.path()).unwrap();
        assert_eq!(c.replicas, 2);
        assert_eq!(
            c.secret, b"0123456789abcdef",
            "trimmed as pplistener trims it"
        );
        assert_eq!(c.backends.len(), 2);
        let names: Vec<&str> = c.daemons.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["pplistener", "powersmtp"]);
        assert_eq!(c.backend("b1").unwrap().addr, "127.0.0.1:7001");
        assert!(c.backend("b9").is_err());
    }

    #[test]
    fn example_cluster_file_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/ppadmin.toml");
        let c = ClusterInfo::from_file(&path).unwrap();
        assert_eq!(c.replicas, 2);
        assert!(c.daemons.iter().any(|d| d.is_frontend()));
    }
}
