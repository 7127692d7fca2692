//! What the clients were told, and the check of a recovered store against
//! it.
//!
//! Every (mailbox, message id) link is in one of four states. A PUT or DEL
//! that was sent but not acknowledged leaves its links "maybe": after a cut
//! either outcome is allowed, and the check settles them to what it finds,
//! so every later check is exact again.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use powermail_proto::{BackendConn, MailboxName, MessageId};
use sha2::{Digest, Sha256};

/// Mailboxes of the workload.
pub const MAILBOX_COUNT: usize = 12;
/// Most entries one LIST may return to the checker.
pub const LIST_MAX_ENTRIES: usize = 100_000;

/// Mailbox `i` of the workload.
pub fn mailbox(i: usize) -> MailboxName {
    MailboxName::parse(&format!("pc{i}@crash.test")).expect("valid mailbox name")
}

/// A message as it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msg {
    /// SHA-256 of the body.
    pub sha256: [u8; 32],
    /// Body size.
    pub size_bytes: u64,
}

impl Msg {
    /// The record of `body`.
    pub fn of(body: &[u8]) -> Msg {
        Msg {
            sha256: Sha256::digest(body).into(),
            size_bytes: body.len() as u64,
        }
    }
}

/// What the clients know about one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A PUT was acknowledged (or a check found it): must be there.
    Present,
    /// A PUT was sent, not acknowledged: may be there, whole, or not at all.
    MaybePresent,
    /// A DEL was acknowledged (or a check found it gone): must stay gone.
    Absent,
    /// A DEL was sent, not acknowledged.
    MaybeAbsent,
}

/// One check's findings; all but `checked` must be 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    /// Links that had to be present and were compared byte for byte.
    pub checked: u64,
    /// Acknowledged links missing.
    pub lost: u64,
    /// Listed messages whose size or bytes differ from what was sent
    /// (partial, zero-length, or someone else's body).
    pub partial: u64,
    /// Links acknowledged deleted (or seen gone) that are back.
    pub resurrected: u64,
    /// Listed messages no client ever sent.
    pub unknown: u64,
}

impl Findings {
    /// Whether nothing is wrong.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.partial == 0 && self.resurrected == 0 && self.unknown == 0
    }
}

/// Everything the clients were told, for one backend.
#[derive(Debug, Default)]
pub struct Model {
    msgs: HashMap<String, Msg>,
    links: BTreeMap<(MailboxName, String), Link>,
    /// PUTs acknowledged.
    pub acked_puts: u64,
    /// Links made by acknowledged PUTs.
    pub acked_links: u64,
    /// Links removed by acknowledged DELs and DELMs.
    pub acked_dels: u64,
    /// The cycle the clients are in, for [`Model::history`].
    pub cycle: usize,
    /// Whether this cycle's power cut has been made (events after it are
    /// marked in the history).
    pub cut: bool,
    /// Every event of every link, `(cycle, event)`, printed with a finding so
    /// that a failure tells its own story.
    history: HashMap<(MailboxName, String), Vec<(usize, &'static str)>>,
}

impl Model {
    fn note(&mut self, mailbox: &MailboxName, msgid: &str, event: &'static str) {
        let cycle = self.cycle;
        let event = match (self.cut, event) {
            (true, "put-acked") => "put-acked-after-cut",
            (true, "del-acked") => "del-acked-after-cut",
            _ => event,
        };
        self.history
            .entry((mailbox.clone(), msgid.to_string()))
            .or_default()
            .push((cycle, event));
    }

    /// What happened to one link, oldest first: `c<cycle>:<event>` words.
    pub fn history(&self, mailbox: &MailboxName, msgid: &str) -> String {
        self.history
            .get(&(mailbox.clone(), msgid.to_string()))
            .map(|h| {
                h.iter()
                    .map(|(c, e)| format!("c{c}:{e}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    }

    /// Records a PUT about to be sent.
    pub fn put_sent(&mut self, msgid: &MessageId, mailboxes: &[MailboxName], msg: Msg) {
        self.msgs.insert(msgid.as_str().to_string(), msg);
        for m in mailboxes {
            self.links
                .insert((m.clone(), msgid.as_str().to_string()), Link::MaybePresent);
            self.note(m, msgid.as_str(), "put-sent");
        }
    }

    /// Records the acknowledgement of a PUT.
    pub fn put_acked(&mut self, msgid: &MessageId, mailboxes: &[MailboxName]) {
        self.acked_puts += 1;
        for m in mailboxes {
            self.links
                .insert((m.clone(), msgid.as_str().to_string()), Link::Present);
            self.acked_links += 1;
            self.note(m, msgid.as_str(), "put-acked");
        }
    }

    /// Records a DEL (or one id of a DELM) about to be sent.
    pub fn del_sent(&mut self, mailbox: &MailboxName, msgid: &MessageId) {
        self.links.insert(
            (mailbox.clone(), msgid.as_str().to_string()),
            Link::MaybeAbsent,
        );
        self.note(mailbox, msgid.as_str(), "del-sent");
    }

    /// Records the acknowledgement of a DEL.
    pub fn del_acked(&mut self, mailbox: &MailboxName, msgid: &MessageId) {
        self.links
            .insert((mailbox.clone(), msgid.as_str().to_string()), Link::Absent);
        self.acked_dels += 1;
        self.note(mailbox, msgid.as_str(), "del-acked");
    }

    /// The links in state `Present` whose id starts with `prefix`, with sizes.
    pub fn present_with_prefix(&self, prefix: &str) -> Vec<(MailboxName, MessageId, u64)> {
        self.links
            .iter()
            .filter(|((_, id), l)| **l == Link::Present && id.starts_with(prefix))
            .filter_map(|((m, id), _)| {
                let size = self.msgs.get(id)?.size_bytes;
                Some((m.clone(), MessageId::parse(id).ok()?, size))
            })
            .collect()
    }

    /// Compares the backend behind `conn` with the model: LISTs every
    /// mailbox, GETs every listed message and compares its SHA-256, then
    /// settles every "maybe" to what it found.
    pub fn check(&mut self, conn: &mut BackendConn) -> Result<Findings, String> {
        let mut f = Findings::default();
        let mut seen = BTreeSet::new();
        for i in 0..MAILBOX_COUNT {
            let mb = mailbox(i);
            let listed = conn
                .list(&mb, LIST_MAX_ENTRIES)
                .map_err(|e| format!("LIST {mb:?}: {e}"))?;
            for entry in listed {
                let id = entry.msgid.as_str().to_string();
                let key = (mb.clone(), id.clone());
                match (self.links.get(&key), self.msgs.get(&id)) {
                    (None, _) | (_, None) => {
                        eprintln!("UNKNOWN {} in {}", id, mb.as_str());
                        f.unknown += 1;
                    }
                    (Some(Link::Absent), _) => {
                        eprintln!(
                            "RESURRECTED {} in {}: {}",
                            id,
                            mb.as_str(),
                            self.history(&mb, &id)
                        );
                        f.resurrected += 1;
                    }
                    (Some(state), Some(msg)) => {
                        let body = conn
                            .get(&mb, &entry.msgid)
                            .map_err(|e| format!("GET {id} in {}: {e}", mb.as_str()))?;
                        let got = Msg::of(&body);
                        if entry.size_bytes != msg.size_bytes || got != *msg {
                            eprintln!(
                                "PARTIAL {id} in {} ({state:?}): listed {} bytes, got {} bytes, sent {} bytes{}",
                                mb.as_str(),
                                entry.size_bytes,
                                got.size_bytes,
                                msg.size_bytes,
                                if got.size_bytes == msg.size_bytes { ", different bytes" } else { "" }
                            );
                            f.partial += 1;
                        } else if *state == Link::Present {
                            f.checked += 1;
                        }
                    }
                }
                seen.insert(key);
            }
        }
        for (key, state) in self.links.iter_mut() {
            let there = seen.contains(key);
            if *state == Link::Present && !there {
                eprintln!(
                    "LOST {} in {}: {}",
                    key.1,
                    key.0.as_str(),
                    self.history
                        .get(key)
                        .map(|h| format!("{h:?}"))
                        .unwrap_or_default()
                );
                f.lost += 1;
            }
            let settled = if there { Link::Present } else { Link::Absent };
            if *state != settled {
                let cycle = self.cycle;
                self.history.entry(key.clone()).or_default().push((
                    cycle,
                    if there {
                        "check-found"
                    } else {
                        "check-missing"
                    },
                ));
            }
            *state = settled;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_with_prefix_only_names_present_links() {
        let mut m = Model::default();
        let id = MessageId::parse("w1n1").expect("id");
        let other = MessageId::parse("w2n1").expect("id");
        m.put_sent(&id, &[mailbox(0), mailbox(1)], Msg::of(b"abc"));
        m.put_sent(&other, &[mailbox(0)], Msg::of(b"abcd"));
        assert!(m.present_with_prefix("w1n").is_empty());
        m.put_acked(&id, &[mailbox(0), mailbox(1)]);
        m.put_acked(&other, &[mailbox(0)]);
        m.del_sent(&mailbox(1), &id);
        let got = m.present_with_prefix("w1n");
        assert_eq!(got, vec![(mailbox(0), id.clone(), 3)]);
        assert_eq!((m.acked_puts, m.acked_links), (2, 3));
    }

    #[test]
    fn findings_are_clean_only_without_any_fault() {
        assert!(Findings {
            checked: 5,
            ..Findings::default()
        }
        .clean());
        assert!(!Findings {
            lost: 1,
            ..Findings::default()
        }
        .clean());
        assert!(!Findings {
            partial: 1,
            ..Findings::default()
        }
        .clean());
        assert!(!Findings {
            resurrected: 1,
            ..Findings::default()
        }
        .clean());
        assert!(!Findings {
            unknown: 1,
            ..Findings::default()
        }
        .clean());
    }
}
