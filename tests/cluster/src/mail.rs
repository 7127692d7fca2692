//! The mail every cluster case sends and reads back: numbered test messages
//! ([`id_header`], [`id_of`]) and the one POP3 retrieval loop ([`Tally`]):
//! log in, UIDL, RETR everything, count what was retrieved, duplicated,
//! lost or corrupt.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use powermail_testkit::{eventually, Pop};

/// Most messages one [`Tally::drain`] reads from one session.
pub const SESSION_MESSAGES_MAX: usize = 1_000_000;

/// The password of test user `i`, in every case's userbase.
pub fn password(i: usize) -> String {
    format!("pw-{i}")
}

/// The header that numbers message `n` of a case tagged `tag` (first line of
/// every message a case sends; [`id_of`] reads it back).
pub fn id_header(tag: &str, n: usize) -> String {
    format!("X-Cluster-Id: {tag}-{n}\r\n")
}

/// Short test message `n` of the case tagged `tag`, as sent on the wire: its
/// [`id_header`], `Subject: TAG N` and one body line.
pub fn message(tag: &str, n: usize) -> Vec<u8> {
    format!(
        "{}Subject: {tag} {n}\r\n\r\nbody of {n}\r\n",
        id_header(tag, n)
    )
    .into_bytes()
}

/// The number of a retrieved message of the case tagged `tag`.
pub fn id_of(tag: &str, raw: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(raw);
    let prefix = format!("X-Cluster-Id: {tag}-");
    let at = text.find(&prefix)? + prefix.len();
    text[at..].split("\r\n").next()?.parse().ok()
}

/// Logs `user` in at `pop`, retrying until `wait` has passed (printing each
/// new error once); panics if it never succeeds.
pub fn login_eventually(pop: SocketAddr, user: &str, password: &str, wait: Duration) -> Pop {
    let mut session = None;
    let mut last = String::new();
    eventually(wait, "POP3 login", || {
        match Pop::login(pop, user, password) {
            Ok(p) => session = Some(p),
            Err(e) => {
                if e.to_string() != last {
                    eprintln!("POP3 login of {user}: {e}");
                    last = e.to_string();
                }
            }
        }
        session.is_some()
    });
    session.expect("logged in")
}

/// What POP3 sessions retrieved of a case's numbered messages.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// How often each message number was retrieved.
    pub listed: HashMap<usize, usize>,
    /// Retrieved messages that were not right: no number, or `right` said no.
    pub corrupt: usize,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// UIDL, then RETR of every listed message of session `p`, counting each
    /// by its number ([`id_of`] with `tag`); `right(n, raw)` says whether
    /// message `n` came back right (bytes, mailbox). Returns how many were
    /// listed; leaves the session open.
    pub fn drain(
        &mut self,
        p: &mut Pop,
        tag: &str,
        mut right: impl FnMut(usize, &[u8]) -> bool,
    ) -> io::Result<usize> {
        let count = p.uidl()?.len();
        if count > SESSION_MESSAGES_MAX {
            return Err(io::Error::other(format!(
                "{count} messages listed, more than {SESSION_MESSAGES_MAX}"
            )));
        }
        for i in 1..=count {
            let raw = p.retr(i)?;
            match id_of(tag, &raw) {
                Some(n) => {
                    *self.listed.entry(n).or_default() += 1;
                    self.corrupt += usize::from(!right(n, &raw));
                }
                None => self.corrupt += 1,
            }
        }
        Ok(count)
    }

    /// Logs in as `user` at `pop` (retrying up to `wait`), drains the
    /// mailbox ([`Tally::drain`]) and QUITs. Panics on a failed command.
    pub fn retrieve(
        &mut self,
        pop: SocketAddr,
        user: &str,
        password: &str,
        wait: Duration,
        tag: &str,
        right: impl FnMut(usize, &[u8]) -> bool,
    ) {
        let mut p = login_eventually(pop, user, password, wait);
        self.drain(&mut p, tag, right).expect("UIDL and RETR");
        p.quit().expect("QUIT");
    }

    /// Messages retrieved, duplicates included.
    pub fn retrieved(&self) -> usize {
        self.listed.values().sum()
    }

    /// Messages retrieved more than once.
    pub fn duplicated(&self) -> usize {
        self.listed.values().filter(|&&c| c > 1).count()
    }

    /// Of `acked`, the messages never retrieved.
    pub fn lost(&self, acked: impl IntoIterator<Item = usize>) -> usize {
        acked
            .into_iter()
            .filter(|n| !self.listed.contains_key(n))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_and_counts_add_up() {
        let raw = format!("Received: x\r\n{}Subject: s\r\n\r\n", id_header("cl", 42));
        assert_eq!(id_of("cl", raw.as_bytes()), Some(42));
        assert_eq!(id_of("db", raw.as_bytes()), None);
        assert_eq!(id_of("cl", b"X-Cluster-Id: cl-x\r\n"), None);
        assert_eq!(
            message("db", 7),
            b"X-Cluster-Id: db-7\r\nSubject: db 7\r\n\r\nbody of 7\r\n"
        );
        assert_eq!(id_of("db", &message("db", 7)), Some(7));
        let mut t = Tally::new();
        t.listed.insert(1, 1);
        t.listed.insert(2, 3);
        assert_eq!(t.retrieved(), 4);
        assert_eq!(t.duplicated(), 1);
        assert_eq!(t.lost([1, 2, 3, 4]), 2);
    }
}
