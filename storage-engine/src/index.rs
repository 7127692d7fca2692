//! The per-mailbox index of one backend: for each mailbox its messages
//! (`msgid → size_bytes`, sorted by id) and its usage (messages, bytes), in
//! memory, so that LIST and USAGE never walk a directory once a mailbox is warm.
//!
//! * **Built on first touch** by one directory walk (on the blocking pool),
//!   then kept exact by the mutations this backend makes: PUT adds, DEL and
//!   DELM remove, NUKE forgets. The map is keyed by id, so a retried PUT, a
//!   message linked into several mailboxes, or the second copy made past the
//!   link limit (`EMLINK`) counts once per mailbox.
//! * **Races with the walk**: mutations reported while a mailbox is being
//!   built are logged and replayed on top of the walk's result. Every
//!   mutation is idempotent on a map keyed by id, and is reported only after
//!   its effect is on disk, so "walk + replayed log" equals the directory
//!   whatever order the walk and the mutations interleave in. A mutation
//!   reported while a mailbox is not indexed is dropped: the next walk sees it.
//! * **Errors**: a mutation whose outcome is unknown (an I/O error half-way)
//!   invalidates the mailbox; the next touch walks again.
//! * **Bounded memory**: at most `entries_max` entries (one per mailbox plus one
//!   per message) stay resident; the least recently used mailboxes are evicted
//!   and rebuilt on their next touch. A mailbox larger than the bound on its
//!   own is answered from a fresh walk each time and never kept.
//! * **Generations**: each resident mailbox carries a generation number,
//!   new from a per-index counter (random start, so a restart gives new
//!   ones) when it is built and at every mutation that changes it; LIST and
//!   USAGE send it, so a frontend can keep a listing while the number holds
//!   (`powermail_proto::Usage::generation`). A mailbox evicted and rebuilt,
//!   or too big to keep, gets a new number.
//! * **Shared-nothing**: each executor owns its index (`RefCell`, no locks).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::ops::Bound;

use glommio::channels::local_channel::{self, LocalSender};
use powermail_proto::{MailboxName, MessageId};

/// The generation of a mailbox with no directory on a backend (so empty);
/// an index never hands it out.
pub const GENERATION_EMPTY: u64 = 0;

/// One mailbox's messages, sorted by id, with its usage.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailboxIndex {
    messages: BTreeMap<MessageId, u64>,
    bytes: u64,
    /// Position in the eviction order (higher = used more recently).
    tick: u64,
    /// Changes whenever the messages may have (see the module docs).
    generation: u64,
}

impl MailboxIndex {
    /// An index of the `(id, size)` pairs of one walk.
    ///
    /// Built in bulk (`BTreeMap::from_iter`: a sort that is linear on the
    /// walk's already sorted output, then one bottom-up build), not by one
    /// insertion per message: on the executor, a 1,000,000-message mailbox
    /// must not hold the thread for the ~20 million id comparisons of
    /// inserting one by one. A repeated id keeps its last size, as `add` does.
    pub fn from_walk(walked: Vec<(MessageId, u64)>) -> MailboxIndex {
        let messages: BTreeMap<MessageId, u64> = walked.into_iter().collect();
        let bytes = messages.values().sum();
        MailboxIndex {
            messages,
            bytes,
            ..MailboxIndex::default()
        }
    }

    /// `(messages, bytes)`.
    pub fn usage(&self) -> (u64, u64) {
        (self.messages.len() as u64, self.bytes)
    }

    /// The generation: the same number means the same messages.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Calls `each` for at most `max` messages in id order, after `after`
    /// (from the first when `None`), without copying them; returns how many
    /// and whether more follow.
    pub fn page_each(
        &self,
        after: Option<&MessageId>,
        max: usize,
        mut each: impl FnMut(&MessageId, u64),
    ) -> (usize, bool) {
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut range = self
            .messages
            .range::<MessageId, _>((lower, Bound::Unbounded));
        let mut n = 0;
        for (id, size) in range.by_ref().take(max) {
            each(id, *size);
            n += 1;
        }
        (n, range.next().is_some())
    }

    /// At most `max` messages sorted by id, after `after` (from the first when
    /// `None`), and whether more follow (the tests' view of [`Self::page_each`]).
    #[cfg(test)]
    pub fn page(&self, after: Option<&MessageId>, max: usize) -> (Vec<(MessageId, u64)>, bool) {
        let mut page = Vec::new();
        let (_, more) = self.page_each(after, max, |id, size| page.push((id.clone(), size)));
        (page, more)
    }

    /// Adds a message; returns whether it is new.
    fn add(&mut self, id: MessageId, size_bytes: u64) -> bool {
        match self.messages.insert(id, size_bytes) {
            None => {
                self.bytes += size_bytes;
                true
            }
            Some(old) => {
                // Bodies are immutable, so `old == size_bytes`; stay exact anyway.
                self.bytes = self.bytes - old + size_bytes;
                false
            }
        }
    }

    /// Removes a message; returns whether it was there.
    fn remove(&mut self, id: &MessageId) -> bool {
        match self.messages.remove(id) {
            Some(size) => {
                self.bytes -= size;
                true
            }
            None => false,
        }
    }

    /// Entries it costs against the bound: itself plus one per message.
    fn entries(&self) -> usize {
        1 + self.messages.len()
    }
}

/// A mutation of one mailbox, reported once its effect is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A message was linked (or already was: a retried PUT).
    Add(MessageId, u64),
    /// A message was removed (or was already absent).
    Remove(MessageId),
}

enum Slot {
    Resident(MailboxIndex),
    /// A walk is in flight; `log` holds the mutations reported meanwhile.
    /// `stale`: invalidated meanwhile, the walk's result must not be kept.
    Building {
        log: Vec<Op>,
        stale: bool,
    },
}

/// Where a mailbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Indexed: answer from memory.
    Resident,
    /// Someone is walking it: wait for them.
    Building,
    /// Not indexed: walk it.
    Absent,
}

/// What became of a finished walk.
#[derive(Debug, PartialEq, Eq)]
pub enum Built {
    /// Kept: read it with [`Index::read`].
    Installed,
    /// Larger than the bound on its own: here it is, to answer from once.
    Oversized(MailboxIndex),
    /// Invalidated while walking: walk again; the walk's own index (when it
    /// succeeded) can answer if the walks keep going stale.
    Stale(Option<MailboxIndex>),
}

/// Counters of the index, for the admin port.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    /// Mailboxes resident now.
    pub mailboxes: usize,
    /// Entries resident now (mailboxes + messages).
    pub entries: usize,
    /// Directory walks completed.
    pub builds: u64,
    /// Mailboxes evicted to stay under the bound.
    pub evictions: u64,
}

/// The index of one backend (one executor).
pub struct Index {
    slots: HashMap<MailboxName, Slot>,
    /// Resident mailboxes by last use, oldest first.
    lru: BTreeMap<u64, MailboxName>,
    tick: u64,
    entries: usize,
    entries_max: usize,
    builds: u64,
    evictions: u64,
    /// The last generation handed out.
    generation: u64,
}

impl Index {
    /// An empty index keeping at most `entries_max` entries resident.
    pub fn new(entries_max: usize) -> Index {
        Index {
            slots: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            entries: 0,
            entries_max,
            builds: 0,
            evictions: 0,
            // Random, so that numbers from before a restart do not come back
            // (2^63 apart on average; one counts up by one per mutation).
            generation: rand::random::<u64>() >> 1,
        }
    }

    /// A generation never handed out before (and never [`GENERATION_EMPTY`]).
    fn next_generation(&mut self) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == GENERATION_EMPTY {
            self.generation = 1;
        }
        self.generation
    }

    /// Where `mailbox` stands.
    pub fn state(&self, mailbox: &MailboxName) -> State {
        match self.slots.get(mailbox) {
            Some(Slot::Resident(_)) => State::Resident,
            Some(Slot::Building { .. }) => State::Building,
            None => State::Absent,
        }
    }

    /// Marks `mailbox` as being walked (it must be [`State::Absent`]).
    pub fn begin_build(&mut self, mailbox: &MailboxName) {
        debug_assert_eq!(self.state(mailbox), State::Absent);
        self.slots.insert(
            mailbox.clone(),
            Slot::Building {
                log: Vec::new(),
                stale: false,
            },
        );
    }

    /// Ends the walk of `mailbox` begun with [`begin_build`](Self::begin_build):
    /// replays the mutations logged meanwhile on top of `walked` and keeps the
    /// result if it fits. A failed walk leaves the mailbox absent.
    pub fn finish_build(
        &mut self,
        mailbox: &MailboxName,
        walked: io::Result<MailboxIndex>,
    ) -> io::Result<Built> {
        let (log, stale) = match self.slots.remove(mailbox) {
            Some(Slot::Building { log, stale }) => (log, stale),
            Some(other) => {
                // Not ours (cannot happen: only one walk per mailbox); keep it.
                self.slots.insert(mailbox.clone(), other);
                return Ok(Built::Stale(walked.ok()));
            }
            None => return Ok(Built::Stale(walked.ok())),
        };
        let mut m = walked?;
        self.builds += 1;
        if stale {
            return Ok(Built::Stale(Some(m)));
        }
        for op in log {
            match op {
                Op::Add(id, size) => m.add(id, size),
                Op::Remove(id) => m.remove(&id),
            };
        }
        m.generation = self.next_generation();
        if m.entries() > self.entries_max {
            return Ok(Built::Oversized(m));
        }
        self.entries += m.entries();
        self.tick += 1;
        m.tick = self.tick;
        self.lru.insert(m.tick, mailbox.clone());
        self.slots.insert(mailbox.clone(), Slot::Resident(m));
        self.evict(Some(mailbox));
        Ok(Built::Installed)
    }

    /// Reads a resident mailbox (marking it recently used); `None` if not resident.
    pub fn read<T>(
        &mut self,
        mailbox: &MailboxName,
        f: impl FnOnce(&MailboxIndex) -> T,
    ) -> Option<T> {
        let Some(Slot::Resident(m)) = self.slots.get_mut(mailbox) else {
            return None;
        };
        self.lru.remove(&m.tick);
        self.tick += 1;
        m.tick = self.tick;
        self.lru.insert(m.tick, mailbox.clone());
        Some(f(m))
    }

    /// Records a mutation of `mailbox` whose effect is on disk.
    pub fn apply(&mut self, mailbox: &MailboxName, op: Op) {
        let generation = self.next_generation();
        match self.slots.get_mut(mailbox) {
            Some(Slot::Resident(m)) => {
                // A new number even when nothing changed (a retried PUT, a
                // second DEL): cheaper than proving it.
                m.generation = generation;
                let grew = match op {
                    Op::Add(id, size) => m.add(id, size),
                    Op::Remove(id) => {
                        if m.remove(&id) {
                            self.entries -= 1;
                        }
                        false
                    }
                };
                if grew {
                    self.entries += 1;
                    self.evict(Some(mailbox));
                }
            }
            Some(Slot::Building { log, .. }) => log.push(op),
            None => {}
        }
    }

    /// Forgets what is known of `mailbox` (a mutation with an unknown outcome,
    /// or NUKE): the next touch walks it again.
    pub fn invalidate(&mut self, mailbox: &MailboxName) {
        match self.slots.get_mut(mailbox) {
            Some(Slot::Resident(_)) => self.drop_resident(mailbox),
            Some(Slot::Building { stale, .. }) => *stale = true,
            None => {}
        }
    }

    /// The counters.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            mailboxes: self.lru.len(),
            entries: self.entries,
            builds: self.builds,
            evictions: self.evictions,
        }
    }

    fn drop_resident(&mut self, mailbox: &MailboxName) {
        if let Some(Slot::Resident(m)) = self.slots.remove(mailbox) {
            self.lru.remove(&m.tick);
            self.entries -= m.entries();
        }
    }

    /// Evicts least recently used mailboxes until the bound holds; `keep` goes
    /// last (only when it alone is over the bound).
    fn evict(&mut self, keep: Option<&MailboxName>) {
        while self.entries > self.entries_max {
            let victim = self
                .lru
                .values()
                .find(|m| Some(*m) != keep)
                .or(keep)
                .cloned();
            let Some(victim) = victim else { break };
            self.drop_resident(&victim);
            self.evictions += 1;
        }
    }
}

/// The index together with the walkers' waiting rooms: what an executor's
/// connections share.
pub struct SharedIndex {
    index: RefCell<Index>,
    waiters: RefCell<HashMap<MailboxName, Vec<LocalSender<()>>>>,
}

/// How many times a request walks a mailbox that keeps being invalidated
/// under it before it answers from its own last walk.
const BUILD_ATTEMPTS_MAX: usize = 3;

/// How many walks by others a request waits for (each ends with one request
/// answered, so this bounds the queue ahead of it; above the connection limit).
const WAITS_MAX: usize = 4096;

/// Ends a walk that was abandoned (its future dropped), so that nobody waits for it.
struct BuildGuard<'a> {
    shared: &'a SharedIndex,
    mailbox: &'a MailboxName,
    armed: bool,
}

impl Drop for BuildGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let abandoned = Err(io::Error::other("walk abandoned"));
            let _ = self
                .shared
                .index
                .borrow_mut()
                .finish_build(self.mailbox, abandoned);
            self.shared.wake(self.mailbox);
        }
    }
}

impl SharedIndex {
    /// An empty index keeping at most `entries_max` entries resident.
    pub fn new(entries_max: usize) -> SharedIndex {
        SharedIndex {
            index: RefCell::new(Index::new(entries_max)),
            waiters: RefCell::new(HashMap::new()),
        }
    }

    /// Records a mutation of `mailbox` whose effect is on disk.
    pub fn apply(&self, mailbox: &MailboxName, op: Op) {
        self.index.borrow_mut().apply(mailbox, op);
    }

    /// Wakes whoever waits for the walk of `mailbox`.
    fn wake(&self, mailbox: &MailboxName) {
        let waiting = self.waiters.borrow_mut().remove(mailbox);
        for w in waiting.unwrap_or_default() {
            let _ = w.try_send(());
        }
    }

    /// Forgets `mailbox` (see [`Index::invalidate`]).
    pub fn invalidate(&self, mailbox: &MailboxName) {
        self.index.borrow_mut().invalidate(mailbox);
    }

    /// The counters.
    pub fn stats(&self) -> IndexStats {
        self.index.borrow().stats()
    }

    /// Answers `f` from the index of `mailbox`, walking it first if it is not
    /// resident (`walk` lists the directory and builds its index, off the
    /// executor: a walk of 1,000,000 entries must not hold the thread that
    /// answers every other request; it runs at most once per attempt, and one
    /// walk serves every request waiting for the same mailbox).
    pub async fn view<T, W, Fut>(
        &self,
        mailbox: &MailboxName,
        walk: W,
        f: impl Fn(&MailboxIndex) -> T,
    ) -> io::Result<T>
    where
        W: Fn() -> Fut,
        Fut: std::future::Future<Output = io::Result<MailboxIndex>>,
    {
        let mut last_walk = None;
        let (mut builds, mut waits) = (0, 0);
        while builds < BUILD_ATTEMPTS_MAX && waits < WAITS_MAX {
            let state = self.index.borrow().state(mailbox);
            match state {
                State::Resident => {
                    if let Some(t) = self.index.borrow_mut().read(mailbox, &f) {
                        return Ok(t);
                    }
                    waits += 1;
                    continue;
                }
                State::Building => {
                    waits += 1;
                    let (tx, rx) = local_channel::new_bounded(1);
                    self.waiters
                        .borrow_mut()
                        .entry(mailbox.clone())
                        .or_default()
                        .push(tx);
                    // Woken (or the sender dropped) when the walk ends.
                    let _ = rx.recv().await;
                    continue;
                }
                State::Absent => {}
            }
            builds += 1;
            self.index.borrow_mut().begin_build(mailbox);
            let mut guard = BuildGuard {
                shared: self,
                mailbox,
                armed: true,
            };
            let walked = walk().await;
            guard.armed = false;
            let built = self.index.borrow_mut().finish_build(mailbox, walked);
            self.wake(mailbox);
            match built? {
                Built::Installed => {
                    if let Some(t) = self.index.borrow_mut().read(mailbox, &f) {
                        return Ok(t);
                    }
                }
                Built::Oversized(m) => return Ok(f(&m)),
                Built::Stale(walked) => last_walk = walked,
            }
        }
        match last_walk {
            // As exact as a walk without an index ever was.
            Some(m) => Ok(f(&m)),
            None => Err(io::Error::other("mailbox index kept changing; retry")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(s: &str) -> MailboxName {
        MailboxName::parse(s).unwrap()
    }
    fn id(s: &str) -> MessageId {
        MessageId::parse(s).unwrap()
    }
    fn walk(ids: &[(&str, u64)]) -> io::Result<MailboxIndex> {
        Ok(MailboxIndex::from_walk(
            ids.iter().map(|(i, s)| (id(i), *s)).collect(),
        ))
    }
    fn usage(ix: &mut Index, m: &MailboxName) -> Option<(u64, u64)> {
        ix.read(m, |m| m.usage())
    }
    fn generation(ix: &mut Index, m: &MailboxName) -> Option<u64> {
        ix.read(m, |m| m.generation())
    }
    fn build(ix: &mut Index, m: &MailboxName, ids: &[(&str, u64)]) -> Built {
        ix.begin_build(m);
        ix.finish_build(m, walk(ids)).unwrap()
    }

    #[test]
    fn the_generation_changes_with_every_mutation_and_never_comes_back() {
        let (a, b) = (mb("a@x.org"), mb("b@x.org"));
        let mut ix = Index::new(6);
        assert_eq!(
            build(&mut ix, &a, &[("1", 10), ("2", 20)]),
            Built::Installed
        );
        assert_eq!(build(&mut ix, &b, &[]), Built::Installed);
        let mut seen = std::collections::HashSet::new();
        let g = generation(&mut ix, &a).unwrap();
        assert_ne!(g, GENERATION_EMPTY);
        assert!(seen.insert(g));
        assert_eq!(generation(&mut ix, &a), Some(g), "reading changes nothing");
        // Another mailbox's mutation leaves it alone.
        ix.apply(&b, Op::Add(id("9"), 1));
        assert_eq!(generation(&mut ix, &a), Some(g));
        assert!(seen.insert(generation(&mut ix, &b).unwrap()));
        for op in [
            Op::Add(id("3"), 30),
            Op::Remove(id("1")),
            Op::Remove(id("1")),
        ] {
            ix.apply(&a, op);
            let now = generation(&mut ix, &a).unwrap();
            assert!(seen.insert(now), "{now} handed out twice");
        }
        // Invalidated and walked again: new.
        ix.invalidate(&a);
        assert_eq!(
            build(&mut ix, &a, &[("2", 20), ("3", 30)]),
            Built::Installed
        );
        assert!(seen.insert(generation(&mut ix, &a).unwrap()));
        // Evicted (the bound is 6 entries; b used last) and rebuilt: new.
        assert!(generation(&mut ix, &b).is_some());
        let c = mb("c@x.org");
        assert_eq!(build(&mut ix, &c, &[("4", 1), ("5", 1)]), Built::Installed);
        assert_eq!(generation(&mut ix, &a), None, "a was evicted");
        assert_eq!(
            build(&mut ix, &a, &[("2", 20), ("3", 30)]),
            Built::Installed
        );
        assert!(seen.insert(generation(&mut ix, &a).unwrap()));
        // Too big to keep: a new number at every walk.
        let big: Vec<(String, u64)> = (0..10).map(|i| (format!("m{i}"), 1)).collect();
        let big: Vec<(&str, u64)> = big.iter().map(|(i, s)| (i.as_str(), *s)).collect();
        for _ in 0..2 {
            match build(&mut ix, &mb("big@x.org"), &big) {
                Built::Oversized(m) => assert!(seen.insert(m.generation())),
                other => panic!("{other:?}"),
            }
        }
        // A restarted backend starts somewhere else.
        let mut again = Index::new(6);
        assert_eq!(
            build(&mut again, &a, &[("2", 20), ("3", 30)]),
            Built::Installed
        );
        assert!(seen.insert(generation(&mut again, &a).unwrap()));
    }

    #[test]
    fn exact_through_adds_retries_and_removes() {
        let mut ix = Index::new(1000);
        let a = mb("a@x");
        assert_eq!(ix.state(&a), State::Absent);
        ix.apply(&a, Op::Add(id("m0"), 7)); // not indexed: dropped, the walk sees it
        ix.begin_build(&a);
        assert_eq!(
            ix.finish_build(&a, walk(&[("m0", 7)])).unwrap(),
            Built::Installed
        );
        assert_eq!(usage(&mut ix, &a), Some((1, 7)));
        ix.apply(&a, Op::Add(id("m1"), 10));
        ix.apply(&a, Op::Add(id("m1"), 10)); // retried PUT
        assert_eq!(usage(&mut ix, &a), Some((2, 17)));
        ix.apply(&a, Op::Remove(id("m0")));
        ix.apply(&a, Op::Remove(id("m0"))); // replayed DELM
        ix.apply(&a, Op::Remove(id("nope")));
        assert_eq!(usage(&mut ix, &a), Some((1, 10)));
        assert_eq!(ix.stats().entries, 2);
    }

    #[test]
    fn mutations_during_a_walk_are_replayed_on_its_result() {
        let mut ix = Index::new(1000);
        let a = mb("a@x");
        ix.begin_build(&a);
        assert_eq!(ix.state(&a), State::Building);
        // The walk saw m1 and m2; meanwhile m2 was deleted (seen by the walk
        // before the unlink), m3 added (not seen), m1 re-added (retry).
        ix.apply(&a, Op::Remove(id("m2")));
        ix.apply(&a, Op::Add(id("m3"), 3));
        ix.apply(&a, Op::Add(id("m1"), 1));
        ix.finish_build(&a, walk(&[("m1", 1), ("m2", 2)])).unwrap();
        let page = ix.read(&a, |m| m.page(None, 10)).unwrap();
        assert_eq!(page, (vec![(id("m1"), 1), (id("m3"), 3)], false));
        assert_eq!(usage(&mut ix, &a), Some((2, 4)));
    }

    #[test]
    fn invalidated_walks_are_not_kept_and_failed_walks_leave_nothing() {
        let mut ix = Index::new(1000);
        let a = mb("a@x");
        ix.begin_build(&a);
        ix.invalidate(&a);
        assert_eq!(
            ix.finish_build(&a, walk(&[("m1", 1)])).unwrap(),
            Built::Stale(Some(walk(&[("m1", 1)]).unwrap()))
        );
        assert_eq!(ix.state(&a), State::Absent);
        ix.begin_build(&a);
        assert!(ix
            .finish_build(&a, Err(io::Error::other("disk on fire")))
            .is_err());
        assert_eq!(ix.state(&a), State::Absent);
        ix.begin_build(&a);
        ix.finish_build(&a, walk(&[("m1", 1)])).unwrap();
        ix.invalidate(&a);
        assert_eq!(ix.state(&a), State::Absent);
        assert_eq!(ix.stats().entries, 0);
    }

    #[test]
    fn a_walk_in_any_order_builds_the_same_index_as_adding_one_by_one() {
        let walk = [("m3", 30), ("m1", 10), ("m2", 20), ("m1", 11)];
        let built = MailboxIndex::from_walk(walk.iter().map(|(i, s)| (id(i), *s)).collect());
        let mut added = MailboxIndex::default();
        for (i, s) in walk {
            added.add(id(i), s);
        }
        assert_eq!(built, added);
        assert_eq!(
            built.usage(),
            (3, 61),
            "a repeated id counts once, with its last size"
        );
        let (page, more) = built.page(None, 10);
        assert_eq!(page, vec![(id("m1"), 11), (id("m2"), 20), (id("m3"), 30)]);
        assert!(!more);
    }

    #[test]
    fn pages_are_sorted_bounded_and_say_when_more_follow() {
        let ids: Vec<(String, u64)> = (0..25).map(|i| (format!("m{i:03}"), i)).collect();
        let m = MailboxIndex::from_walk(ids.iter().map(|(i, s)| (id(i), *s)).collect());
        let mut all = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let (page, more) = m.page(after.as_ref(), 10);
            pages += 1;
            after = page.last().map(|(i, _)| i.clone());
            all.extend(page);
            if !more {
                break;
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(all.len(), 25);
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(m.page(Some(&id("m024")), 10), (vec![], false));
        assert!(!m.page(None, 25).1);
        assert!(m.page(None, 24).1);
    }

    #[test]
    fn cold_mailboxes_are_evicted_to_stay_under_the_bound() {
        // Bound 10 entries: each mailbox below costs 1 + 3.
        let mut ix = Index::new(10);
        let boxes: Vec<MailboxName> = (0..3).map(|i| mb(&format!("u{i}@x"))).collect();
        for b in &boxes {
            ix.begin_build(b);
            ix.finish_build(b, walk(&[("m1", 1), ("m2", 1), ("m3", 1)]))
                .unwrap();
        }
        // The third pushed the first (least recently used) out.
        assert_eq!(ix.state(&boxes[0]), State::Absent);
        assert_eq!(ix.stats().entries, 8);
        // Touch u1, then grow u2 past the bound: u1 is now warmer, but it is
        // the only other one, so it goes.
        usage(&mut ix, &boxes[1]);
        for i in 4..7 {
            ix.apply(&boxes[2], Op::Add(id(&format!("m{i}")), 1));
        }
        assert_eq!(ix.state(&boxes[1]), State::Absent);
        assert_eq!(usage(&mut ix, &boxes[2]), Some((6, 6)));
        assert!(ix.stats().entries <= 10);
        assert_eq!(ix.stats().evictions, 2);
        // Past the bound on its own: answered once, never kept.
        let big = mb("big@x");
        ix.begin_build(&big);
        let many: Vec<(MessageId, u64)> = (0..20).map(|i| (id(&format!("b{i}")), 1)).collect();
        match ix
            .finish_build(&big, Ok(MailboxIndex::from_walk(many)))
            .unwrap()
        {
            Built::Oversized(m) => assert_eq!(m.usage(), (20, 20)),
            other => panic!("kept an oversized mailbox: {other:?}"),
        }
        assert_eq!(ix.state(&big), State::Absent);
        assert!(ix.stats().entries <= 10);
    }
}
