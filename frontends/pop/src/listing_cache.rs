//! Merged listings of big mailboxes kept between logins, while every
//! backend's mailbox generation holds.
//!
//! A backend sends a mailbox's generation with LIST and USAGE
//! (`powermail_proto::Usage::generation`): a number that changes with every
//! mutation of that mailbox there and never comes back. A login that finds
//! its mailbox here asks each backend only for `USAGE` (one short line),
//! and when every generation is the one kept — and the same backends are
//! readable — it takes the kept listing instead of listing and merging
//! again: a 50,000-message mailbox costs one small round trip per backend
//! instead of 100,000 lines parsed and sorted. Anything else lists as before.
//!
//! Only mailboxes of at least `min_messages` are kept (a small listing costs
//! no more than the check), and at most `entries_max` entries in all (one per
//! mailbox plus one per message), the least recently used dropped first.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use powermail_frontend::BackendId;
use powermail_proto::MailboxName;

use crate::listing::Merged;

/// A kept listing: the backends it was merged from with the generation each
/// listed, and the merged messages.
#[derive(Debug, Clone)]
pub struct Kept {
    /// `(backend, generation)`, sorted by backend.
    pub generations: Vec<(BackendId, u64)>,
    /// The merged listing.
    pub messages: Arc<Vec<Merged>>,
}

impl Kept {
    /// The backends it was merged from, sorted.
    pub fn backends(&self) -> Vec<BackendId> {
        self.generations.iter().map(|(b, _)| *b).collect()
    }
}

struct Slot {
    kept: Kept,
    tick: u64,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<MailboxName, Slot>,
    /// Mailboxes by last use, oldest first.
    lru: BTreeMap<u64, MailboxName>,
    tick: u64,
    entries: usize,
}

/// The bounded cache of merged listings (shared by every session).
pub struct ListingCache {
    entries_max: usize,
    min_messages: usize,
    inner: Mutex<Inner>,
}

impl ListingCache {
    /// A cache of at most `entries_max` entries keeping listings of at least
    /// `min_messages` messages; `None` when `entries_max` is 0 (off).
    pub fn new(entries_max: usize, min_messages: usize) -> Option<ListingCache> {
        (entries_max > 0).then(|| ListingCache {
            entries_max,
            min_messages,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the maps half-updated in a way that
        // matters more than losing the cache: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The listing kept for `mailbox` (marked as just used).
    pub fn get(&self, mailbox: &MailboxName) -> Option<Kept> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let slot = inner.slots.get_mut(mailbox)?;
        inner.lru.remove(&slot.tick);
        inner.tick += 1;
        slot.tick = inner.tick;
        inner.lru.insert(slot.tick, mailbox.clone());
        Some(slot.kept.clone())
    }

    /// Keeps `kept` for `mailbox` if it is big enough to be worth it and fits
    /// the bound (evicting the least recently used others).
    pub fn put(&self, mailbox: &MailboxName, kept: Kept) {
        let cost = 1 + kept.messages.len();
        if kept.messages.len() < self.min_messages || cost > self.entries_max {
            self.forget(mailbox);
            return;
        }
        let mut inner = self.lock();
        remove(&mut inner, mailbox);
        while inner.entries + cost > self.entries_max {
            let Some((_, victim)) = inner.lru.pop_first() else {
                break;
            };
            if let Some(old) = inner.slots.remove(&victim) {
                inner.entries -= 1 + old.kept.messages.len();
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.lru.insert(tick, mailbox.clone());
        inner.entries += cost;
        inner.slots.insert(mailbox.clone(), Slot { kept, tick });
    }

    /// Drops what is kept for `mailbox`.
    pub fn forget(&self, mailbox: &MailboxName) {
        remove(&mut self.lock(), mailbox);
    }

    /// `(mailboxes, entries)` kept now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.slots.len(), inner.entries)
    }
}

fn remove(inner: &mut Inner, mailbox: &MailboxName) {
    if let Some(old) = inner.slots.remove(mailbox) {
        inner.lru.remove(&old.tick);
        inner.entries -= 1 + old.kept.messages.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use powermail_proto::MessageId;

    fn mb(s: &str) -> MailboxName {
        MailboxName::parse(s).unwrap()
    }

    fn kept(n: usize, generation: u64) -> Kept {
        Kept {
            generations: vec![(0, generation), (1, generation + 1)],
            messages: Arc::new(
                (0..n)
                    .map(|i| Merged {
                        msgid: MessageId::parse(&format!("m{i}")).unwrap(),
                        size_bytes: 1,
                        holders: vec![0, 1],
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn keeps_big_listings_within_the_bound_least_recently_used_out_first() {
        let c = ListingCache::new(30, 5).unwrap();
        c.put(&mb("small@x"), kept(4, 1));
        assert!(c.get(&mb("small@x")).is_none(), "under min_messages");
        c.put(&mb("a@x"), kept(9, 1));
        c.put(&mb("b@x"), kept(9, 2));
        assert_eq!(c.size(), (2, 20));
        assert!(c.get(&mb("a@x")).is_some(), "a used after b");
        c.put(&mb("c@x"), kept(9, 3));
        assert!(c.get(&mb("b@x")).is_none(), "b evicted");
        assert_eq!(c.get(&mb("a@x")).unwrap().generations, vec![(0, 1), (1, 2)]);
        assert_eq!(c.size(), (2, 20));
        // Replacing an entry does not count it twice.
        c.put(&mb("a@x"), kept(9, 7));
        assert_eq!(c.size(), (2, 20));
        assert_eq!(c.get(&mb("a@x")).unwrap().generations[0], (0, 7));
        // Too big for the whole bound: not kept, and the old one is dropped.
        c.put(&mb("a@x"), kept(30, 8));
        assert!(c.get(&mb("a@x")).is_none());
        assert_eq!(c.size(), (1, 10));
        c.forget(&mb("c@x"));
        assert_eq!(c.size(), (0, 0));
        assert!(ListingCache::new(0, 5).is_none(), "0 turns it off");
    }
}
