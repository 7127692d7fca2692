//! [`LiveStore`], the [`Store`] a live POP3 session calls: login against
//! the userbase and the mailbox lock, the merged listing, RETR from one
//! holder (fetched ahead when it fits, streamed when not), and QUIT's
//! deletions (journaled when a backend cannot take them).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use powermail_admin::kv;
use powermail_frontend::{BackendId, Cluster, PooledConn};
use powermail_proto::{BackendError, ErrorCode, MailboxName, MessageId, SpliceSink};
use powermail_userbase::UserbaseError;

use crate::ahead::{fetch_plan, window, Ahead};
use crate::journal::Owed;
use crate::listing::{CacheUse, Merged};
use crate::lock::{LockError, MailboxLock};
use crate::server::Shared;
use crate::session::{is_enough, qualify, AuthResult, RetrieveError, Store};
use crate::stats::Stats;

/// The [`Store`] of one live session.
pub struct LiveStore {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: SocketAddr,
    pub(crate) local: SocketAddr,
    /// Set at login.
    pub(crate) mailbox: Option<MailboxName>,
    /// Held from login to the end of the session.
    pub(crate) lock: Option<MailboxLock>,
    pub(crate) messages: Arc<Vec<Merged>>,
    /// Backends whose listing made up `messages`.
    pub(crate) listed: Vec<BackendId>,
    /// The fallback server's connection after a proxied login.
    pub(crate) upstream: Option<TcpStream>,
    /// Messages fetched ahead by the last RETR.
    pub(crate) ahead: Ahead,
}

/// `holders` with the ones the health checker calls down moved last, the
/// others fastest and least loaded first ([`Cluster::read_order`]): a RETR
/// tries a backend known to be unreachable only when no other holder could
/// serve it, and a slow one only after the fast ones.
fn by_health(cluster: &Cluster, holders: &[BackendId]) -> Vec<BackendId> {
    cluster.read_order(holders)
}

/// Writes a whole fetched message through the session's body writer.
fn write_fetched(body: &[u8], out: &mut dyn SpliceSink) -> Result<(), RetrieveError> {
    match out.write_all(body) {
        Ok(()) => Ok(()),
        // TOP has its lines.
        Err(e) if is_enough(&e) => Ok(()),
        Err(e) => Err(RetrieveError::Broken(e)),
    }
}

impl LiveStore {
    /// The full address for what the user typed; `Err` when the userbase
    /// cannot say which domain a bare name belongs to.
    fn address(&self, user: &str) -> Result<Option<String>, UserbaseError> {
        if user.contains('@') || user.contains('%') {
            return Ok(qualify(user, None));
        }
        let domain = match self.shared.userbase.virtual_domain(&self.local)? {
            Some(d) => Some(d),
            None => self.shared.cfg.default_domain.clone(),
        };
        Ok(qualify(user, domain.as_deref()))
    }

    fn check(&mut self, user: &str, password: &str) -> Result<MailboxName, AuthResult> {
        let sh = self.shared.clone();
        let counters = &sh.stats.counters;
        let address = match self.address(user) {
            Ok(Some(a)) => a.to_lowercase(),
            Ok(None) => user.to_lowercase(),
            Err(_) => {
                Stats::inc(&counters.logins_unavailable);
                return Err(AuthResult::Unavailable);
            }
        };
        let ip = self.client.ip();
        if sh.throttle.locked(ip, &address, Instant::now()) {
            Stats::inc(&counters.logins_locked_out);
            std::thread::sleep(sh.throttle.failure_delay());
            return Err(AuthResult::Locked);
        }
        if let Some(fallback) = &sh.cfg.fallback {
            match sh.userbase.get_mailbox(&address) {
                Ok(Some(_)) => {}
                Ok(None) | Err(UserbaseError::InvalidName(_)) => {
                    let result = self.proxy_login(fallback, user, password);
                    if result == AuthResult::Bad {
                        Stats::inc(&counters.logins_failed);
                        sh.throttle.failed(ip, &address, Instant::now());
                        std::thread::sleep(sh.throttle.failure_delay());
                    }
                    return Err(result);
                }
                Err(e) => {
                    log::warn!("userbase unavailable: error={}", kv(&e.to_string()));
                    Stats::inc(&counters.logins_unavailable);
                    return Err(AuthResult::Unavailable);
                }
            }
        }
        let found = match sh.userbase.authenticate(&address, password) {
            Err(UserbaseError::Unavailable(why)) => {
                log::warn!("userbase unavailable: error={}", kv(&why));
                Stats::inc(&counters.logins_unavailable);
                return Err(AuthResult::Unavailable);
            }
            Err(_) => None,
            Ok(found) => found,
        };
        let name = found.and_then(|m| MailboxName::parse(&m.name).ok());
        let Some(name) = name else {
            Stats::inc(&counters.logins_failed);
            sh.throttle.failed(ip, &address, Instant::now());
            log::info!("login failed user={} client={}", kv(&address), self.client);
            std::thread::sleep(sh.throttle.failure_delay());
            return Err(AuthResult::Bad);
        };
        sh.throttle.succeeded(&address);
        Ok(name)
    }
}

impl Store for LiveStore {
    fn refuse_login(&mut self, user: &str) {
        let sh = self.shared.clone();
        let address = match self.address(user) {
            Ok(Some(a)) => a.to_lowercase(),
            _ => user.to_lowercase(),
        };
        let ip = self.client.ip();
        Stats::inc(&sh.stats.counters.logins_failed);
        sh.throttle.failed(ip, &address, Instant::now());
        log::info!(
            "login refused user={} client={}: CR, LF or NUL in a field",
            kv(&address),
            self.client
        );
        std::thread::sleep(sh.throttle.failure_delay());
    }

    fn authenticate(&mut self, user: &str, password: &str) -> AuthResult {
        let name = match self.check(user, password) {
            Ok(name) => name,
            Err(result) => return result,
        };
        let sh = self.shared.clone();
        let counters = &sh.stats.counters;
        match sh.locks.try_lock(&name) {
            Ok(Some(lock)) => self.lock = Some(lock),
            Ok(None) => {
                Stats::inc(&counters.logins_in_use);
                return AuthResult::InUse;
            }
            Err(e) => {
                log::error!("mailbox lock for {name}: {e}");
                if matches!(e, LockError::Unavailable(_)) {
                    Stats::inc(&counters.logins_unavailable);
                }
                return AuthResult::Unavailable;
            }
        }
        let limits = sh.limits.get();
        let listing = sh.lister.list_all(
            &name,
            limits.listing_max_messages,
            Duration::from_millis(limits.listing_timeout_ms),
        );
        if listing.listed.is_empty() {
            // Not one backend answered: an empty maildrop would be a lie.
            log::warn!(
                "login {name}: no backend listed the mailbox within {} ms",
                limits.listing_timeout_ms
            );
            Stats::inc(&counters.logins_storage_unavailable);
            self.lock = None;
            return AuthResult::StorageUnavailable;
        }
        Stats::inc(&counters.logins_ok);
        counters
            .deletes_replayed
            .fetch_add(listing.replayed as u64, Ordering::Relaxed);
        if listing.messages.is_empty() {
            Stats::inc(&counters.empty_mailbox_logins);
        }
        match listing.cache {
            CacheUse::Hit => Stats::inc(&counters.listing_cache_hits),
            CacheUse::Stale => Stats::inc(&counters.listing_cache_stale),
            CacheUse::None => {}
        }
        self.mailbox = Some(name);
        self.listed = listing.listed;
        self.messages = listing.messages;
        AuthResult::Ok(self.messages.clone())
    }

    fn retrieve(&mut self, index: usize, out: &mut dyn SpliceSink) -> Result<(), RetrieveError> {
        if let Some(body) = self.ahead.take(index) {
            return write_fetched(&body, out);
        }
        let serving = &self.shared.cfg.serving;
        let (messages_max, bytes_max) = (serving.prefetch_messages_max, serving.prefetch_bytes_max);
        let fits = self
            .messages
            .get(index)
            .is_some_and(|m| m.size_bytes <= bytes_max);
        if messages_max > 1 && fits {
            return self.fetch_ahead(index, out, messages_max, bytes_max);
        }
        self.stream(index, out)
    }

    fn commit(&mut self, deleted: &[usize]) -> Result<(), String> {
        let Some(mailbox) = self.mailbox.clone() else {
            return Ok(());
        };
        let sh = self.shared.clone();
        // Another host may have taken the mailbox over if our lease ran out
        // (the database was unreachable for lock_lease_ms): then nothing is
        // deleted, as RFC 1939 says for a session that ends abnormally.
        if let Some(lock) = &self.lock {
            if let Err(e) = lock.confirm() {
                log::warn!("QUIT of {mailbox} without deleting: {e}");
                return Err(format!("mailbox lock not confirmed ({e}); nothing deleted"));
            }
        }
        // Every backend's DELM lines go out first, then the replies are
        // read: the backends unlink and sync at the same time, so a QUIT
        // waits for the slowest backend, not for the sum of them.
        let mut owed: Vec<(BackendId, &Merged)> = Vec::new();
        let mut pending = Vec::new();
        for b in 0..sh.cluster.len() {
            let msgs: Vec<&Merged> = deleted
                .iter()
                .filter_map(|&i| self.messages.get(i))
                .filter(|m| m.holders.contains(&b) || !self.listed.contains(&b))
                .collect();
            if msgs.is_empty() {
                continue;
            }
            match delete_send(&sh.cluster, b, &mailbox, &msgs, self.listed.contains(&b)) {
                Some(sent) => pending.push((b, msgs, sent)),
                None => owed.extend(msgs.iter().map(|m| (b, *m))),
            }
        }
        for (b, msgs, sent) in pending {
            if !delete_reply(&sh.cluster, b, &mailbox, &msgs, sent) {
                owed.extend(msgs.iter().map(|m| (b, *m)));
            }
        }
        let owed: Vec<Owed> = owed
            .into_iter()
            .map(|(b, m)| Owed {
                backend: sh.cluster.spec(b).name.clone(),
                mailbox: mailbox.to_string(),
                msgid: m.msgid.to_string(),
            })
            .collect();
        if owed.is_empty() {
            return Ok(());
        }
        sh.stats
            .counters
            .deletes_journaled
            .fetch_add(owed.len() as u64, Ordering::Relaxed);
        sh.journal.record(&owed).map_err(|e| {
            log::error!(
                "delete journal: cannot record {} deletions: {e}",
                owed.len()
            );
            "some deletions could not be recorded; they may reappear".to_string()
        })
    }

    fn release(&mut self) {
        self.lock = None;
    }
}

impl LiveStore {
    /// RETR of one message streamed from its first working holder.
    fn stream(&mut self, index: usize, out: &mut dyn SpliceSink) -> Result<(), RetrieveError> {
        let (Some(mailbox), Some(msg)) = (&self.mailbox, self.messages.get(index)) else {
            return Err(RetrieveError::NotFound);
        };
        let cluster = &self.shared.cluster;
        let mut not_found = 0;
        for b in by_health(cluster, &msg.holders) {
            let mut conn = match cluster.checkout(b) {
                Ok(c) => c,
                Err(e) => {
                    log::info!("RETR {}: {e}", msg.msgid);
                    continue;
                }
            };
            let size = match conn.get_begin(mailbox, &msg.msgid) {
                Ok(size) => size,
                Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                    not_found += 1;
                    conn.release();
                    continue;
                }
                Err(e) => {
                    cluster.report_error(b, &e);
                    continue;
                }
            };
            let splice_min = match self.shared.cfg.serving.splice_min_bytes {
                0 => u64::MAX,
                n => n,
            };
            return match conn.read_body_into(size, splice_min, out) {
                Ok(spliced) => {
                    conn.release();
                    self.shared
                        .stats
                        .counters
                        .bytes_spliced
                        .fetch_add(spliced, Ordering::Relaxed);
                    Ok(())
                }
                // TOP has its lines: the rest of the message is not read,
                // and the connection, left mid-body, is closed on drop.
                Err(BackendError::Io(e)) if is_enough(&e) => Ok(()),
                Err(e) => Err(RetrieveError::Broken(io::Error::other(e.to_string()))),
            };
        }
        if not_found == msg.holders.len() {
            Err(RetrieveError::NotFound)
        } else {
            Err(RetrieveError::Unavailable)
        }
    }

    /// RETR of a message that fits the fetch-ahead window: one `GETM` to its
    /// first working holder fetches it and the messages of its window that
    /// holder has (see [`crate::ahead`]); the rest wait in [`Ahead`] for
    /// their RETR, with what other backends' `GETM`s brought.
    /// A holder failing part-way keeps what arrived complete; the message
    /// asked for, if it did not, goes to the next holder.
    fn fetch_ahead(
        &mut self,
        index: usize,
        out: &mut dyn SpliceSink,
        messages_max: usize,
        bytes_max: u64,
    ) -> Result<(), RetrieveError> {
        let (Some(mailbox), Some(msg)) = (self.mailbox.clone(), self.messages.get(index)) else {
            return Err(RetrieveError::NotFound);
        };
        let holders = by_health(&self.shared.cluster, &msg.holders);
        let cluster = self.shared.cluster.clone();
        let mut not_found = 0;
        for &b in &holders {
            self.ahead
                .keep_only(window(&self.messages, index, messages_max, bytes_max));
            let plan = fetch_plan(
                &self.messages,
                index,
                b,
                &self.ahead,
                messages_max,
                bytes_max,
            );
            let ids: Vec<&MessageId> = plan.iter().map(|&i| &self.messages[i].msgid).collect();
            let mut conn = match cluster.checkout(b) {
                Ok(c) => c,
                Err(e) => {
                    log::info!("RETR {}: {e}", self.messages[index].msgid);
                    continue;
                }
            };
            let ahead = &mut self.ahead;
            let mut first = None;
            let fetched = conn.get_many(&mailbox, &ids, bytes_max, |k, r| match (k, r) {
                (0, r) => first = Some(r),
                (k, Ok(body)) => ahead.hold(plan[k], body),
                (_, Err(_)) => {}
            });
            match fetched {
                Ok(()) => conn.release(),
                Err(e) => cluster.report_error(b, &e),
            }
            match first {
                Some(Ok(body)) => return write_fetched(&body, out),
                Some(Err(e)) if e.code() == Some(ErrorCode::NotFound) => not_found += 1,
                Some(Err(_)) | None => {}
            }
        }
        if not_found == holders.len() {
            Err(RetrieveError::NotFound)
        } else {
            Err(RetrieveError::Unavailable)
        }
    }
}

/// Sends the `DELM` lines deleting `msgs` from `mailbox` to backend `b`;
/// the connection and the number of lines, for [`delete_reply`], or `None`
/// when all of `msgs` stay owed. A backend that was not listed in this
/// session is not even tried: it was down or slow a moment ago, and the
/// journal replays the deletions before its next listing anyway.
fn delete_send(
    cluster: &Arc<Cluster>,
    b: BackendId,
    mailbox: &MailboxName,
    msgs: &[&Merged],
    was_listed: bool,
) -> Option<(PooledConn, usize)> {
    if !was_listed {
        return None;
    }
    let mut conn = match cluster.checkout(b) {
        Ok(c) => c,
        Err(e) => {
            log::info!("DEL on backend {b}: {e}");
            return None;
        }
    };
    // One DELM per command line's worth of ids: one directory sync each,
    // not one per message.
    let ids: Vec<&MessageId> = msgs.iter().map(|m| &m.msgid).collect();
    match conn.del_many_send(mailbox, &ids) {
        Ok(lines) => Some((conn, lines)),
        Err(e) => {
            cluster.report_error(b, &e);
            None
        }
    }
}

/// Reads backend `b`'s replies to what [`delete_send`] sent; whether all of
/// `msgs` are deleted. On an error the whole set stays owed (replaying a
/// deletion that did happen is harmless).
fn delete_reply(
    cluster: &Arc<Cluster>,
    b: BackendId,
    mailbox: &MailboxName,
    msgs: &[&Merged],
    (mut conn, lines): (PooledConn, usize),
) -> bool {
    let ids: Vec<&MessageId> = msgs.iter().map(|m| &m.msgid).collect();
    match conn.del_many_reply(mailbox, &ids, lines) {
        Ok(_) => {
            conn.release();
            true
        }
        Err(e) => {
            cluster.report_error(b, &e);
            false
        }
    }
}
