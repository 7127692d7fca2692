//! A bounded, time-limited cache in front of any [`Userbase`].
//!
//! Every SMTP `RCPT TO` and every POP3 login asks the userbase; most ask about the same
//! few addresses within seconds. [`CachedUserbase`] answers those from memory: found
//! mailboxes for `positive_ttl`, absent ones for `negative_ttl` (shorter, so a freshly
//! added mailbox starts receiving soon), at most `max_entries` entries (least recently used
//! evicted first). Failures ([`UserbaseError::Unavailable`]) are never cached: the next
//! caller asks the database again.
//!
//! Changes made through the cache clear it; changes made elsewhere (SQL, another host's
//! `ppadmin`) become visible after at most the TTL.
//!
//! That includes passwords: `authenticate` verifies against the cached row, so after a
//! password change or a disable made elsewhere the *old* password keeps working for up to
//! `positive_ttl`. Keep that TTL short (the default is 30 s).
//!
//! Successful logins are cached too, as Dovecot's auth cache does: a modern hash (argon2id
//! costs tens of milliseconds and MiBs by design) would otherwise be paid by every POP3
//! poll. What is kept is a keyed SHA-256 of (name, password) under a random per-process
//! key, valid for `positive_ttl` and only while the row's stored hash is unchanged; a
//! failed login is never cached, so guessing still pays the full hash.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{
    is_catch_all, normalise_address, password, Mailbox, Userbase, UserbaseError, VirtualServer,
};

/// Where the cache gets the time from; tests inject a manual clock.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Cache limits. A zero TTL disables caching of that kind of answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a found mailbox or domain is served from memory (default 30 s).
    pub positive_ttl: Duration,
    /// How long "no such mailbox/domain" is served from memory (default 5 s).
    pub negative_ttl: Duration,
    /// Most entries held; the least recently used is evicted beyond it (default 10,000).
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            positive_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_entries: 10_000,
        }
    }
}

/// Hit and miss counters since creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Answers served from memory.
    pub hits: u64,
    /// Answers that went to the database (including failures).
    pub misses: u64,
    /// Logins accepted from the login cache, without the full password hash.
    pub login_hits: u64,
}

/// What was asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Lookup(String),
    Exact(String),
    Listen(SocketAddr),
}

/// What the database answered.
#[derive(Debug, Clone)]
enum Value {
    Mailbox(Option<Mailbox>),
    Domain(Option<String>),
}

struct Entry {
    value: Value,
    expires: Instant,
    /// Position in [`State::recency`]; larger is more recent.
    tick: u64,
}

/// The map plus an index by recency for O(log n) LRU eviction.
#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    recency: BTreeMap<u64, Key>,
    next_tick: u64,
}

impl State {
    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.recency.remove(&entry.tick);
        }
    }

    fn touch(&mut self, key: &Key) -> Option<&Entry> {
        let tick = self.next_tick;
        let entry = self.entries.get_mut(key)?;
        self.next_tick += 1;
        let old = std::mem::replace(&mut entry.tick, tick);
        self.recency.remove(&old);
        self.recency.insert(tick, key.clone());
        self.entries.get(key)
    }

    fn insert(&mut self, key: Key, value: Value, expires: Instant, max_entries: usize) {
        self.remove(&key);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.recency.insert(tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                value,
                expires,
                tick,
            },
        );
        while self.entries.len() > max_entries {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        debug_assert_eq!(self.entries.len(), self.recency.len());
    }
}

/// A [`Userbase`] that remembers answers for a while; see the module documentation.
pub struct CachedUserbase {
    inner: Box<dyn Userbase>,
    config: CacheConfig,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    hits: AtomicU64,
    misses: AtomicU64,
    login_hits: AtomicU64,
    logins: Mutex<HashMap<String, Login>>,
    login_key: [u8; 32],
}

/// A login that was verified against the full hash.
struct Login {
    /// The stored hash it was verified against (a changed row invalidates it).
    stored_hash: String,
    /// Keyed SHA-256 of the name and the password that worked.
    digest: [u8; 32],
    expires: Instant,
}

impl CachedUserbase {
    /// Wraps `inner` with the real clock.
    pub fn new(inner: Box<dyn Userbase>, config: CacheConfig) -> Self {
        Self::with_clock(inner, config, Arc::new(SystemClock))
    }

    /// Wraps `inner` with an injected clock (for tests).
    pub fn with_clock(
        inner: Box<dyn Userbase>,
        config: CacheConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        CachedUserbase {
            inner,
            config,
            clock,
            state: Mutex::new(State::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            login_hits: AtomicU64::new(0),
            logins: Mutex::new(HashMap::new()),
            login_key: rand::random(),
        }
    }

    fn login_digest(&self, name: &str, password: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.login_key);
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether `password` was verified for `mailbox` (with its current stored hash)
    /// within the positive TTL.
    fn login_cached(&self, mailbox: &Mailbox, password: &str) -> bool {
        use subtle::ConstantTimeEq;
        let digest = self.login_digest(&mailbox.name, password);
        let now = self.clock.now();
        let logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        logins.get(&mailbox.name).is_some_and(|l| {
            l.expires > now
                && l.stored_hash == mailbox.password_hash
                && bool::from(l.digest.ct_eq(&digest))
        })
    }

    fn remember_login(&self, mailbox: &Mailbox, password: &str) {
        let now = self.clock.now();
        let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
        if logins.len() >= self.config.max_entries {
            logins.retain(|_, l| l.expires > now);
            if logins.len() >= self.config.max_entries {
                return; // bounded: this login simply is not cached
            }
        }
        logins.insert(
            mailbox.name.clone(),
            Login {
                stored_hash: mailbox.password_hash.clone(),
                digest: self.login_digest(&mailbox.name, password),
                expires: now + self.config.positive_ttl,
            },
        );
    }

    /// Forgets every cached answer.
    pub fn invalidate_all(&self) {
        let mut state = self.lock();
        state.entries.clear();
        state.recency.clear();
        self.logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Number of entries held (expired ones included until next touched).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True if nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Hit and miss counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            login_hits: self.login_hits.load(Ordering::Relaxed),
        }
    }

    /// The wrapped userbase, for callers that must bypass the cache.
    pub fn inner(&self) -> &dyn Userbase {
        self.inner.as_ref()
    }

    /// The cache state; every update is completed before the lock is released, so a
    /// poisoned lock still guards consistent data.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Serves `key` from memory if fresh, else asks `fetch` and remembers a successful
    /// answer. The database is queried without holding the lock.
    fn cached(
        &self,
        key: Key,
        fetch: impl FnOnce() -> Result<Value, UserbaseError>,
    ) -> Result<Value, UserbaseError> {
        let now = self.clock.now();
        {
            let mut state = self.lock();
            let fresh = state.entries.get(&key).map(|entry| entry.expires > now);
            match fresh {
                Some(true) => {
                    if let Some(entry) = state.touch(&key) {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(entry.value.clone());
                    }
                }
                Some(false) => state.remove(&key),
                None => {}
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let value = fetch()?;
        let found = match &value {
            Value::Mailbox(mailbox) => mailbox.is_some(),
            Value::Domain(domain) => domain.is_some(),
        };
        let ttl = if found {
            self.config.positive_ttl
        } else {
            self.config.negative_ttl
        };
        if !ttl.is_zero() && self.config.max_entries > 0 {
            self.lock()
                .insert(key, value.clone(), now + ttl, self.config.max_entries);
        }
        Ok(value)
    }

    fn cached_mailbox(
        &self,
        key: Key,
        fetch: impl FnOnce() -> Result<Option<Mailbox>, UserbaseError>,
    ) -> Result<Option<Mailbox>, UserbaseError> {
        match self.cached(key, || fetch().map(Value::Mailbox))? {
            Value::Mailbox(mailbox) => Ok(mailbox),
            Value::Domain(_) => Err(UserbaseError::Data("cache key/value kind mismatch".into())),
        }
    }

    /// Runs a change on the inner userbase, then forgets everything cached.
    fn changed<T>(&self, result: Result<T, UserbaseError>) -> Result<T, UserbaseError> {
        self.invalidate_all();
        result
    }
}

impl Userbase for CachedUserbase {
    fn lookup(&self, address: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(address)?;
        self.cached_mailbox(Key::Lookup(name.clone()), || self.inner.lookup(&name))
    }

    fn get_mailbox(&self, name: &str) -> Result<Option<Mailbox>, UserbaseError> {
        let name = normalise_address(name)?;
        self.cached_mailbox(Key::Exact(name.clone()), || self.inner.get_mailbox(&name))
    }

    fn authenticate(
        &self,
        address: &str,
        password: &str,
    ) -> Result<Option<Mailbox>, UserbaseError> {
        let name = match normalise_address(address) {
            Ok(name) if !is_catch_all(&name) => name,
            _ => return Ok(None),
        };
        let Some(mailbox) = self.get_mailbox(&name)? else {
            return Ok(None);
        };
        if !mailbox.enabled {
            return Ok(None);
        }
        if self.login_cached(&mailbox, password) {
            self.login_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(mailbox));
        }
        if !password::verify(&mailbox.password_hash, password) {
            return Ok(None);
        }
        self.remember_login(&mailbox, password);
        Ok(Some(mailbox))
    }

    fn virtual_domain(&self, listen: &SocketAddr) -> Result<Option<String>, UserbaseError> {
        match self.cached(Key::Listen(*listen), || {
            self.inner.virtual_domain(listen).map(Value::Domain)
        })? {
            Value::Domain(domain) => Ok(domain),
            Value::Mailbox(_) => Err(UserbaseError::Data("cache key/value kind mismatch".into())),
        }
    }

    fn add_mailbox(
        &self,
        name: &str,
        password: &str,
        quota_bytes: u64,
    ) -> Result<Mailbox, UserbaseError> {
        self.changed(self.inner.add_mailbox(name, password, quota_bytes))
    }

    fn delete_mailbox(&self, name: &str) -> Result<(), UserbaseError> {
        self.changed(self.inner.delete_mailbox(name))
    }

    fn set_password(&self, name: &str, password: &str) -> Result<(), UserbaseError> {
        self.changed(self.inner.set_password(name, password))
    }

    fn set_quota(&self, name: &str, quota_bytes: u64) -> Result<(), UserbaseError> {
        self.changed(self.inner.set_quota(name, quota_bytes))
    }

    fn set_forwards(
        &self,
        name: &str,
        forwards: Vec<String>,
        keep_local_copy: bool,
    ) -> Result<(), UserbaseError> {
        self.changed(self.inner.set_forwards(name, forwards, keep_local_copy))
    }

    fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), UserbaseError> {
        self.changed(self.inner.set_enabled(name, enabled))
    }

    fn set_deliver_to(&self, name: &str, target: Option<&str>) -> Result<(), UserbaseError> {
        self.changed(self.inner.set_deliver_to(name, target))
    }

    fn list_mailboxes(&self) -> Result<Vec<Mailbox>, UserbaseError> {
        self.inner.list_mailboxes()
    }

    fn add_virtual_server(&self, listen: &SocketAddr, domain: &str) -> Result<(), UserbaseError> {
        self.changed(self.inner.add_virtual_server(listen, domain))
    }

    fn delete_virtual_server(&self, listen: &SocketAddr) -> Result<(), UserbaseError> {
        self.changed(self.inner.delete_virtual_server(listen))
    }

    fn list_virtual_servers(&self) -> Result<Vec<VirtualServer>, UserbaseError> {
        self.inner.list_virtual_servers()
    }

    // Leases are never cached: every call goes to the database.
    fn lease_take(
        &self,
        mailbox: &str,
        holder: &str,
        lease_ms: u64,
    ) -> Result<bool, UserbaseError> {
        self.inner.lease_take(mailbox, holder, lease_ms)
    }

    fn lease_renew(
        &self,
        mailbox: &str,
        holder: &str,
        lease_ms: u64,
    ) -> Result<bool, UserbaseError> {
        self.inner.lease_renew(mailbox, holder, lease_ms)
    }

    fn lease_release(&self, mailbox: &str, holder: &str) -> Result<(), UserbaseError> {
        self.inner.lease_release(mailbox, holder)
    }

    fn leases_span_hosts(&self) -> bool {
        self.inner.leases_span_hosts()
    }
}
