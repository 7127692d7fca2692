//! The store as one thing: a connection to every configured backend, and the questions
//! that need all of them at once (which backends hold this message? this mailbox?).
//!
//! `dir`, `list`, `usage`, `repair`, `drain`, `orphans` and `purge` all start from the
//! same two merges: the union of every backend's `DIR`, and a mailbox's `LIST` on every
//! backend keyed by message id. A message's *copies* are the distinct backends that list
//! it; it is under-replicated when it has fewer than K. A backend that cannot be reached
//! is reported once and left out (its copies are then not counted, which is the right
//! answer after a backend is lost for good, and a harmless extra copy otherwise).

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use powermail_proto::{BackendConn, BackendError, MailboxName, MessageId};

use crate::cluster::ClusterInfo;

/// Most mailboxes accepted in one `DIR` page (pplistener's `list_max_entries` default;
/// the backend decides the page size, up to this).
pub const DIR_PAGE_MAX: usize = 100_000;

/// Most `DIR` pages asked of one backend in one run (10 million mailboxes at the
/// default page size): a bound on the loop, not expected to be reached.
pub const DIR_PAGES_MAX: usize = 100;

/// Most messages taken from one backend's listing of one mailbox, over all its
/// `LIST` pages (1,000,000 messages must work; ~100 bytes each in memory).
pub const LIST_MAX: usize = 10_000_000;

/// Index of a backend in [`ClusterInfo::backends`].
pub type Bid = usize;

/// Where one message is: `(backend, size_bytes)` per holder, in backend order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders(pub Vec<(Bid, u64)>);

impl Holders {
    /// Distinct backends holding the message.
    pub fn copies(&self) -> usize {
        self.0.len()
    }

    /// True when `b` holds it.
    pub fn on(&self, b: Bid) -> bool {
        self.0.iter().any(|(h, _)| *h == b)
    }

    /// The size (the first holder's; see [`consistent`](Self::consistent)).
    pub fn size_bytes(&self) -> u64 {
        self.0.first().map_or(0, |(_, s)| *s)
    }

    /// True when every holder reports the same size.
    pub fn consistent(&self) -> bool {
        self.0.windows(2).all(|w| w[0].1 == w[1].1)
    }
}

/// Connections to every backend of the cluster.
pub struct Store<'a> {
    info: &'a ClusterInfo,
    conns: Vec<Option<BackendConn>>,
    modes: Vec<Option<String>>,
}

impl<'a> Store<'a> {
    /// Connects to every backend and asks its STATUS; unreachable ones are reported on
    /// stderr and treated as down from then on.
    pub fn open(info: &'a ClusterInfo) -> Store<'a> {
        let mut conns = Vec::new();
        let mut modes = Vec::new();
        for b in &info.backends {
            match info
                .connect(b)
                .and_then(|mut c| Ok((c.status().context("STATUS")?, c)))
            {
                Ok((kv, c)) => {
                    let mode = kv.iter().find(|(k, _)| k == "mode").map(|(_, v)| v.clone());
                    modes.push(Some(mode.unwrap_or_else(|| "?".into())));
                    conns.push(Some(c));
                }
                Err(e) => {
                    eprintln!("ppadmin: backend {} is down: {e:#}", b.name);
                    modes.push(None);
                    conns.push(None);
                }
            }
        }
        Store { info, conns, modes }
    }

    /// Name of backend `b`.
    pub fn name(&self, b: Bid) -> &str {
        &self.info.backends[b].name
    }

    /// Backends that answered.
    pub fn up(&self) -> Vec<Bid> {
        (0..self.conns.len())
            .filter(|&b| self.conns[b].is_some())
            .collect()
    }

    /// Backends that answered and take new messages (`mode=rw`).
    pub fn writable(&self) -> Vec<Bid> {
        self.up()
            .into_iter()
            .filter(|&b| self.modes[b].as_deref() == Some("rw"))
            .collect()
    }

    /// Mode of backend `b` (`rw`, `ro`, `ro-auto`), `None` when down.
    pub fn mode(&self, b: Bid) -> Option<&str> {
        self.modes[b].as_deref()
    }

    /// Switches backend `b` read-only (`true`) or read-write, persisted by the backend.
    pub fn set_readonly(&mut self, b: Bid, on: bool) -> anyhow::Result<()> {
        self.call(b, |c| c.set_readonly(on))?;
        self.modes[b] = Some(if on { "ro" } else { "rw" }.to_string());
        Ok(())
    }

    /// Runs `f` on backend `b`'s connection. An I/O or protocol error marks the backend
    /// down (its connection is no longer in step); a refusal leaves it usable.
    pub fn call<T>(
        &mut self,
        b: Bid,
        f: impl FnOnce(&mut BackendConn) -> Result<T, BackendError>,
    ) -> anyhow::Result<T> {
        let name = self.info.backends[b].name.clone();
        let Some(conn) = self.conns[b].as_mut() else {
            bail!("backend {name} is down");
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(e, BackendError::Refused { .. }) {
                    eprintln!("ppadmin: backend {name} failed, now treated as down: {e}");
                    self.conns[b] = None;
                    self.modes[b] = None;
                }
                Err(e).with_context(|| format!("backend {name}"))
            }
        }
    }

    /// Every mailbox on every backend that answered, with the backends holding it.
    pub fn dir_all(&mut self) -> BTreeMap<MailboxName, Vec<Bid>> {
        let mut out: BTreeMap<MailboxName, Vec<Bid>> = BTreeMap::new();
        for b in self.up() {
            match self.dir_of(b) {
                Ok(names) => {
                    for n in names {
                        out.entry(n).or_default().push(b);
                    }
                }
                Err(e) => eprintln!("ppadmin: {e:#}"),
            }
        }
        out
    }

    /// All of one backend's mailboxes, in name order, asked page by page (`DIR <after>`).
    pub fn dir_of(&mut self, b: Bid) -> anyhow::Result<Vec<MailboxName>> {
        let mut all: Vec<MailboxName> = Vec::new();
        for _ in 0..DIR_PAGES_MAX {
            let after = all.last().cloned();
            let page = self.call(b, |c| c.dir_after(after.as_ref(), DIR_PAGE_MAX))?;
            match (page.last(), &after) {
                (None, _) => return Ok(all),
                // A backend that ignores the start name would repeat itself for ever.
                (Some(last), Some(prev)) if last <= prev => {
                    bail!("backend {} answered DIR {prev} out of order", self.name(b))
                }
                _ => all.extend(page),
            }
        }
        eprintln!(
            "ppadmin: backend {} has more than {} pages of mailboxes; only those are seen",
            self.name(b),
            DIR_PAGES_MAX
        );
        Ok(all)
    }

    /// `mailbox` on every backend that answers, merged by message id.
    pub fn holders(&mut self, mailbox: &MailboxName) -> BTreeMap<MessageId, Holders> {
        let mut out: BTreeMap<MessageId, Holders> = BTreeMap::new();
        for b in self.up() {
            match self.call(b, |c| c.list(mailbox, LIST_MAX)) {
                Ok(entries) => {
                    for e in entries {
                        out.entry(e.msgid).or_default().0.push((b, e.size_bytes));
                    }
                }
                Err(e) => eprintln!("ppadmin: LIST {mailbox}: {e:#}"),
            }
        }
        out
    }

    /// Copies `msgid` of `mailbox` from backend `from` to backend `to`, bytes verbatim and
    /// with the same id; returns once `to` acknowledged it durable (PPL/1 `+OK`). PUT is
    /// idempotent, so copying to a backend that already holds it is harmless.
    pub fn copy(
        &mut self,
        mailbox: &MailboxName,
        msgid: &MessageId,
        from: Bid,
        to: Bid,
    ) -> anyhow::Result<u64> {
        debug_assert_ne!(from, to);
        let body = self.call(from, |c| c.get(mailbox, msgid))?;
        let receipt = self.call(to, |c| c.put(msgid, std::slice::from_ref(mailbox), &body))?;
        if receipt.size_bytes != body.len() as u64 {
            bail!(
                "backend {} stored {msgid} with {} bytes, sent {}",
                self.name(to),
                receipt.size_bytes,
                body.len()
            );
        }
        Ok(receipt.size_bytes)
    }
}

/// `n` bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_count_and_sizes() {
        let h = Holders(vec![(0, 10), (2, 10)]);
        assert_eq!(h.copies(), 2);
        assert!(h.on(2) && !h.on(1));
        assert!(h.consistent());
        assert!(!Holders(vec![(0, 10), (1, 11)]).consistent());
    }

    #[test]
    fn bytes_for_people() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
