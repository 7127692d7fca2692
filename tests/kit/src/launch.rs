//! Typed launchers: each writes its daemon's configuration file, starts it
//! with [`Daemon`] (which waits for the readiness line) and kills it on drop.
//! Suites add their own TOML (limits, pools, throttles) through the `extra`
//! fields; the keys every test needs are written here once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::daemon::Daemon;

/// The `durability` line for each `[[backend]]` table: `PM_TEST_DURABILITY`
/// (`file` or `syncfs`) runs a suite in that mode; unset or empty, the
/// default (`file`, no line).
pub fn durability_line() -> String {
    match std::env::var("PM_TEST_DURABILITY") {
        Ok(m) if m == "file" || m == "syncfs" => format!("durability = \"{m}\"\n"),
        Ok(m) if m.is_empty() => String::new(),
        Ok(m) => panic!("PM_TEST_DURABILITY={m:?}: use file or syncfs"),
        Err(_) => String::new(),
    }
}

/// Where a daemon runs: this machine's loopback (the default), or a
/// simulated host of tests/cluster (its network namespace and address).
#[derive(Debug, Clone)]
pub struct Place {
    /// The network namespace, `None` for this one.
    pub netns: Option<String>,
    /// The address its ports bind to.
    pub ip: std::net::IpAddr,
}

impl Default for Place {
    fn default() -> Place {
        Place {
            netns: None,
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
        }
    }
}

impl Place {
    /// A free port (see [`crate::free_port`]) on this place's address.
    pub fn free_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, crate::free_port())
    }
}

/// One `[[backend]]` of a pplistener.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    /// Its name (`name = ...`); pplistener names it by position when `None`.
    pub name: Option<String>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its PPL/1 address; a free port when `None`.
    pub listen: Option<SocketAddr>,
    /// More lines of the table (`cpu = 0`, `durability = ...`).
    pub extra: String,
}

impl BackendSpec {
    /// A backend on `data_dir`, with the durability of `PM_TEST_DURABILITY`.
    pub fn new(data_dir: PathBuf) -> BackendSpec {
        BackendSpec {
            name: None,
            data_dir,
            listen: None,
            extra: durability_line(),
        }
    }

    /// The same, named.
    pub fn named(name: &str, data_dir: PathBuf) -> BackendSpec {
        BackendSpec {
            name: Some(name.to_string()),
            ..BackendSpec::new(data_dir)
        }
    }
}

/// A pplistener configuration.
#[derive(Debug, Clone)]
pub struct PplistenerSpec {
    /// The PPL/1 shared secret.
    pub secret: String,
    /// The admin port's token; the admin port listens on a free port.
    pub admin_token: String,
    /// More TOML after the top-level keys and before the backends: top-level
    /// keys first, then tables such as `[limits]`.
    pub extra: String,
    /// The backends, in order.
    pub backends: Vec<BackendSpec>,
}

/// A running pplistener.
pub struct Pplistener {
    /// The process.
    pub daemon: Daemon,
    /// Each backend's PPL/1 address, in configuration order.
    pub backends: Vec<SocketAddr>,
    /// The admin port.
    pub admin: SocketAddr,
    /// Each backend's data directory.
    pub data_dirs: Vec<PathBuf>,
}

impl Pplistener {
    /// Writes `<dir>/<stem>.toml` from `spec` and starts pplistener on it,
    /// logging to `<dir>/<stem>.log`.
    pub fn start(dir: &Path, stem: &str, spec: &PplistenerSpec) -> Pplistener {
        Pplistener::start_at(&Place::default(), dir, stem, spec)
    }

    /// The same on `place`: its addresses (admin, and each backend without
    /// a `listen`) on the place's IP, the process in its namespace.
    pub fn start_at(place: &Place, dir: &Path, stem: &str, spec: &PplistenerSpec) -> Pplistener {
        let admin = place.free_addr();
        let mut toml = format!(
            "secret = \"{}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{}\"\n{}\n",
            spec.secret, spec.admin_token, spec.extra
        );
        let mut backends = Vec::new();
        for b in &spec.backends {
            let listen = b.listen.unwrap_or_else(|| place.free_addr());
            backends.push(listen);
            toml.push_str("\n[[backend]]\n");
            if let Some(name) = &b.name {
                toml.push_str(&format!("name = \"{name}\"\n"));
            }
            toml.push_str(&format!(
                "data_dir = \"{}\"\nlisten = \"{listen}\"\n{}\n",
                b.data_dir.display(),
                b.extra
            ));
        }
        let config = dir.join(format!("{stem}.toml"));
        std::fs::write(&config, toml).expect("write pplistener config");
        let log = dir.join(format!("{stem}.log"));
        let daemon = Daemon::start_in(place.netns.as_deref(), "pplistener", &config, &log);
        Pplistener {
            admin: daemon.addr("admin"),
            daemon,
            backends,
            data_dirs: spec.backends.iter().map(|b| b.data_dir.clone()).collect(),
        }
    }
}

crate::deref_daemon!(Pplistener, daemon);

/// Which frontend a [`Frontend`] runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// powersmtp
    Smtp,
    /// powerpop
    Pop,
}

impl Kind {
    /// The binary.
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Smtp => "powersmtp",
            Kind::Pop => "powerpop",
        }
    }

    /// The role of its client port in the readiness line.
    pub fn role(self) -> &'static str {
        match self {
            Kind::Smtp => "smtp",
            Kind::Pop => "pop3",
        }
    }
}

/// A powersmtp or powerpop configuration.
#[derive(Debug, Clone)]
pub struct FrontendSpec {
    /// Which daemon.
    pub kind: Kind,
    /// The backends' shared secret.
    pub secret: String,
    /// The admin port's token; the admin port listens on a free port.
    pub admin_token: String,
    /// The userbase URL.
    pub userbase: String,
    /// More TOML: top-level keys first, then tables (`[limits]`, ...).
    pub extra: String,
    /// The backends: (name, address, more lines of the `[[backend]]` table).
    pub backends: Vec<(String, SocketAddr, String)>,
}

/// A running powersmtp or powerpop.
pub struct Frontend {
    /// The process.
    pub daemon: Daemon,
    /// Which daemon.
    pub kind: Kind,
    /// The client port (SMTP or POP3).
    pub addr: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
}

impl Frontend {
    /// Writes `<dir>/<stem>.toml` from `spec` (the client port on a free
    /// port) and starts the daemon, logging to `<dir>/<stem>.log`.
    pub fn start(dir: &Path, stem: &str, spec: &FrontendSpec) -> Frontend {
        Frontend::start_at(&Place::default(), dir, stem, spec)
    }

    /// The same on `place`: its client and admin ports on the place's IP,
    /// the process in its namespace.
    pub fn start_at(place: &Place, dir: &Path, stem: &str, spec: &FrontendSpec) -> Frontend {
        let (addr, admin) = (place.free_addr(), place.free_addr());
        let mut toml = format!(
            "listen = \"{addr}\"\nadmin_listen = \"{admin}\"\nadmin_token = \"{}\"\n\
             userbase = \"{}\"\nsecret = \"{}\"\n{}\n",
            spec.admin_token, spec.userbase, spec.secret, spec.extra
        );
        for (name, backend, extra) in &spec.backends {
            toml.push_str(&format!(
                "\n[[backend]]\nname = \"{name}\"\naddr = \"{backend}\"\n{extra}\n"
            ));
        }
        let config = dir.join(format!("{stem}.toml"));
        std::fs::write(&config, toml).expect("write frontend config");
        let log = dir.join(format!("{stem}.log"));
        let daemon = Daemon::start_in(place.netns.as_deref(), spec.kind.binary(), &config, &log);
        assert_eq!(daemon.addr(spec.kind.role()), addr);
        Frontend {
            kind: spec.kind,
            addr,
            admin: daemon.addr("admin"),
            daemon,
        }
    }
}

crate::deref_daemon!(Frontend, daemon);
