//! The one readiness line every daemon prints.
//!
//! When all of a daemon's ports are bound it prints exactly one line on
//! stdout, `<daemon> ready pid=<pid> listen=<role>/<addr>,...`, and tells
//! systemd `READY=1` with the same line as its status. Test launchers,
//! `powermail up` and operators all wait for this one line, so no one
//! depends on the wording of the daemons' other messages. [`ReadyLine`]
//! writes and parses it, so the format lives in one place.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;

/// Most addresses one readiness line names (a pplistener with this many
/// backends is far beyond one machine's disks).
pub const READY_LISTEN_MAX: usize = 256;

/// Longest role name accepted in a readiness line.
pub const READY_ROLE_MAX_BYTES: usize = 64;

/// What a daemon announces when it is ready: its name, process id and
/// every address it listens on, each under a role (`smtp`, `lmtp`, `pop3`,
/// `pop3s`, `admin`, or a backend's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// The daemon (`pplistener`, `powersmtp`, `powerpop`).
    pub daemon: String,
    /// Its process id.
    pub pid: u32,
    /// (role, bound address), in the order the daemon lists them.
    pub listen: Vec<(String, SocketAddr)>,
}

impl ReadyLine {
    /// The line for this process.
    pub fn new(daemon: &str, listen: Vec<(String, SocketAddr)>) -> ReadyLine {
        ReadyLine {
            daemon: daemon.to_string(),
            pid: std::process::id(),
            listen,
        }
    }

    /// Parses one line (with or without its line end); `None` unless it is
    /// a well-formed readiness line within the limits above.
    pub fn parse(line: &str) -> Option<ReadyLine> {
        let mut words = line.trim_end_matches(['\r', '\n']).split(' ');
        let daemon = words.next().filter(|d| valid_name(d))?;
        if words.next()? != "ready" {
            return None;
        }
        let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
        let list = words.next()?.strip_prefix("listen=")?;
        if words.next().is_some() {
            return None;
        }
        let mut listen = Vec::new();
        for item in list.split(',').filter(|i| !i.is_empty()) {
            if listen.len() == READY_LISTEN_MAX {
                return None;
            }
            let (role, addr) = item.split_once('/')?;
            if !valid_name(role) {
                return None;
            }
            listen.push((role.to_string(), addr.parse().ok()?));
        }
        Some(ReadyLine {
            daemon: daemon.to_string(),
            pid,
            listen,
        })
    }

    /// The address listed under `role`, if any.
    pub fn addr(&self, role: &str) -> Option<SocketAddr> {
        self.listen.iter().find(|(r, _)| r == role).map(|(_, a)| *a)
    }
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ready pid={} listen=", self.daemon, self.pid)?;
        for (i, (role, addr)) in self.listen.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{role}/{addr}")?;
        }
        Ok(())
    }
}

/// A daemon or role name: 1 to [`READY_ROLE_MAX_BYTES`] of `[A-Za-z0-9_.-]`.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= READY_ROLE_MAX_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Announces that `daemon` is ready: prints its [`ReadyLine`] on stdout
/// (flushed), logs it, and sends systemd `READY=1` with it as the status.
/// Roles that are not valid names (see [`ReadyLine::parse`]) are replaced by
/// `_`. Call once, after every listener in `listen` is bound.
pub fn announce_ready(daemon: &str, listen: &[(&str, SocketAddr)]) {
    let listen = listen
        .iter()
        .take(READY_LISTEN_MAX)
        .map(|(role, addr)| {
            let role = if valid_name(role) { role } else { "_" };
            (role.to_string(), *addr)
        })
        .collect();
    let line = ReadyLine::new(daemon, listen).to_string();
    log::info!("{line}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    crate::systemd::notify_ready(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_line_round_trips() {
        let line = ReadyLine {
            daemon: "powersmtp".into(),
            pid: 4242,
            listen: vec![
                ("smtp".into(), "127.0.0.1:2525".parse().expect("addr")),
                ("admin".into(), "[::1]:8081".parse().expect("addr")),
            ],
        };
        let text = line.to_string();
        assert_eq!(
            text,
            "powersmtp ready pid=4242 listen=smtp/127.0.0.1:2525,admin/[::1]:8081"
        );
        assert_eq!(ReadyLine::parse(&format!("{text}\n")), Some(line.clone()));
        assert_eq!(line.addr("admin"), line.listen.get(1).map(|(_, a)| *a));
        assert_eq!(line.addr("pop3"), None);
    }

    #[test]
    fn other_lines_are_not_ready_lines() {
        for bad in [
            "",
            "powersmtp: listening on 127.0.0.1:25",
            "powersmtp ready pid=x listen=",
            "powersmtp ready pid=1",
            "powersmtp ready pid=1 listen=smtp:127.0.0.1:25",
            "powersmtp ready pid=1 listen=smtp/127.0.0.1:25 extra",
            "power smtp ready pid=1 listen=",
            "powersmtp ready pid=1 listen=sm tp/127.0.0.1:25",
            "powersmtp ready pid=1 listen=/127.0.0.1:25",
        ] {
            assert_eq!(ReadyLine::parse(bad), None, "{bad:?}");
        }
        let many = vec!["a/127.0.0.1:1"; READY_LISTEN_MAX + 1].join(",");
        assert_eq!(
            ReadyLine::parse(&format!("d ready pid=1 listen={many}")),
            None
        );
        let ok = ReadyLine::parse("pplistener ready pid=7 listen=").expect("no ports is fine");
        assert!(ok.listen.is_empty());
    }
}
