//! The real [`Delivery`]: recipients from the userbase, messages streamed to
//! K backends at once.
//!
//! At DATA, K backends are chosen ([`Cluster::select_writable`], ordered by
//! preference; the others serve as fall-backs if a chosen one cannot be
//! reached) and ONE PUT carrying all local recipients is started on each,
//! beginning with the `Received:` header. Every chunk of the message goes to
//! all of them as it arrives. At the end, all K are told to finish first and
//! their replies are read afterwards, so the K `fdatasync`s overlap. Only when
//! all K said OK is the reply `250`; otherwise every copy that may be stored
//! is recorded in the undo journal and deleted again (no orphan duplicates
//! when the sender retries; see [`crate::undo`]) and the reply is `451 4.3.0`.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use powermail_admin::kv;
use powermail_frontend::{BackendId, Cluster, PooledConn};
use powermail_proto::{BackendError, ErrorCode, MailboxName, MessageId};
use powermail_userbase::{CachedUserbase, Userbase, UserbaseError};

use crate::relay::Relay;
use crate::session::{Delivery, Envelope, RcptVerdict, Reply};
use crate::stats::Stats;

/// A mailbox's bytes over the whole cluster from the `USAGE` of each backend
/// that answered, with K = `replicas` copies of every message:
/// `max(max_b bytes_b, ceil(sum_b bytes_b / K))`.
///
/// Exact when every message has exactly K copies and every holder answered
/// (the sum counts each message K times). With a holder down, the sum part
/// undercounts, and the largest single backend is a floor (no backend holds
/// more than the mailbox). Messages with fewer than K copies (a failed
/// delivery's leftovers, a repair pending) are undercounted by at most
/// `(K - copies) / K` of their size. A quota is a soft limit: close enough,
/// at the cost of one small round trip whatever the mailbox holds.
pub fn combined_usage_bytes(per_backend: &[u64], replicas: usize) -> u64 {
    let k = replicas.max(1) as u64;
    let sum: u64 = per_backend.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let max = per_backend.iter().copied().max().unwrap_or(0);
    max.max(sum.div_ceil(k))
}

/// A reply read that took at least this long waited for the backend (a
/// reply already buffered takes microseconds): its time is a latency sample.
const REPLY_WAITED: Duration = Duration::from_micros(500);

/// Numbers the SMTP connections of this process for the log lines.
static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// What every session shares.
pub struct Shared {
    /// Backends.
    pub cluster: Arc<Cluster>,
    /// Recipient look-ups.
    pub userbase: CachedUserbase,
    /// Counters.
    pub stats: Stats,
    /// Replication factor K.
    pub replicas: usize,
    /// Our name in Received headers.
    pub hostname: String,
    /// Message-id component of this process.
    pub frontend_id: String,
    /// Message-id counter.
    pub counter: AtomicU64,
    /// Outgoing relay for forwards (`host:port`); none: forwards are
    /// ignored and mail is stored locally.
    pub relay: Option<String>,
    /// Time-out of every step with the relay.
    pub relay_timeout: Duration,
    /// Deletions owed for copies of refused messages.
    pub undo: Arc<crate::undo::Undo>,
    /// Quota usage kept between transactions.
    pub usage: crate::usage_cache::UsageCache,
}

/// One backend receiving a copy.
struct Copy {
    id: BackendId,
    conn: Option<PooledConn>,
    started: Instant,
}

/// The message being stored.
struct Txn {
    msgid: MessageId,
    rcpts: Vec<MailboxName>,
    /// The envelope sender and EHLO name as the client sent them (hostile:
    /// logged only through `kv`).
    from: String,
    helo: String,
    copies: Vec<Copy>,
    size_bytes: u64,
    /// Body bytes received but not yet sent: the client's reads (as small
    /// as its TCP segments) are gathered into chunks of
    /// [`BACKEND_CHUNK_BYTES`], so a backend sees one chunk frame per 64 KiB
    /// whatever the sender's segment size.
    pending: Vec<u8>,
}

/// Body bytes sent to the backends (and the relay) in one chunk.
pub const BACKEND_CHUNK_BYTES: usize = 64 << 10;

/// A local recipient with a quota.
#[derive(Debug, Clone)]
struct QuotaUse {
    mailbox: MailboxName,
    quota_bytes: u64,
    used_bytes: u64,
    /// `used_bytes` came from the usage kept between transactions (it may
    /// accept, never refuse: it is read again first).
    kept: bool,
}

impl QuotaUse {
    fn over(&self, size_bytes: u64) -> bool {
        self.used_bytes.saturating_add(size_bytes) > self.quota_bytes
    }
}

/// The delivery of one SMTP connection.
pub struct BackendDelivery {
    shared: Arc<Shared>,
    /// This connection's number in the process, for the log lines.
    session: u64,
    client: String,
    txn: Option<Txn>,
    txn_started: Option<Instant>,
    /// The reverse path of the current transaction.
    from: String,
    /// Local recipients with a quota, checked again at the end of DATA.
    quotas: Vec<QuotaUse>,
    /// The relay session when some recipient forwards.
    relay: Option<Relay>,
    /// Recipients accepted for forwarding in this transaction.
    forwarded: usize,
    /// The backends holding the last message accepted with 250.
    stored_on: Vec<BackendId>,
}

impl BackendDelivery {
    /// A delivery for the session with `client` (its IP address).
    pub fn new(shared: Arc<Shared>, client: &str) -> BackendDelivery {
        BackendDelivery {
            session: SESSIONS.fetch_add(1, Ordering::Relaxed),
            shared,
            client: client.to_string(),
            txn: None,
            txn_started: None,
            from: String::new(),
            quotas: Vec::new(),
            relay: None,
            forwarded: 0,
            stored_on: Vec::new(),
        }
    }

    /// LMTP: removes `msgid` from the mailboxes in `full` on every backend
    /// that stored it (they were refused with 552 while the message stays
    /// for the others). A removal that fails is logged: that copy stays.
    fn unlink(&self, msgid: &MessageId, full: &[MailboxName]) {
        let cluster = &self.shared.cluster;
        for &id in &self.stored_on {
            let mut conn = match cluster.checkout(id) {
                Ok(c) => c,
                Err(e) => {
                    log::error!("msgid={msgid} backend={} cannot remove the copies of over-quota recipients: {e}", cluster.spec(id).name);
                    continue;
                }
            };
            let mut clean = true;
            for m in full {
                if let Err(e) = conn.del(m, msgid) {
                    log::error!(
                        "msgid={msgid} backend={} cannot remove the copy for over-quota {m}: {e}",
                        cluster.spec(id).name
                    );
                    cluster.report_error(id, &e);
                    clean = false;
                    break;
                }
            }
            if clean {
                conn.release();
            }
        }
    }

    /// Bytes used by `mailbox`: one `USAGE` to every readable backend, all
    /// sent before any reply is read (one round trip in all, answered from
    /// the backends' in-memory index), combined by [`combined_usage_bytes`].
    /// Backends that do not answer are skipped: a quota is a soft limit,
    /// availability first.
    fn usage_bytes(&self, mailbox: &MailboxName) -> u64 {
        let now = Instant::now();
        let cluster = &self.shared.cluster;
        let mut asked = Vec::new();
        for id in cluster.readable() {
            let Ok(mut conn) = cluster.checkout(id) else {
                continue;
            };
            match conn.usage_send(mailbox) {
                Ok(()) => asked.push((id, conn)),
                Err(e) => cluster.report_error(id, &e),
            }
        }
        let mut per_backend = Vec::with_capacity(asked.len());
        for (id, mut conn) in asked {
            match conn.usage_reply() {
                Ok((_, bytes)) => {
                    conn.release();
                    per_backend.push(bytes);
                }
                Err(e) => cluster.report_error(id, &e),
            }
        }
        let used = combined_usage_bytes(&per_backend, self.shared.replicas);
        self.shared.usage.put(mailbox, used, now);
        self.shared
            .stats
            .counters
            .quota_usage_reads
            .fetch_add(1, Ordering::Relaxed);
        used
    }

    /// Reads again, from the backends, every kept usage figure that would
    /// refuse `size_bytes` more: a refusal is decided on fresh numbers only.
    fn refresh_kept_over(&mut self, size_bytes: u64) {
        let stale: Vec<usize> = (0..self.quotas.len())
            .filter(|&i| self.quotas[i].kept && self.quotas[i].over(size_bytes))
            .collect();
        for i in stale {
            let used = self.usage_bytes(&self.quotas[i].mailbox);
            let q = &mut self.quotas[i];
            q.used_bytes = used;
            q.kept = false;
        }
    }

    /// Quota, then forwards, for an existing, enabled mailbox.
    fn accept(&mut self, mb: powermail_userbase::Mailbox, name: MailboxName) -> RcptVerdict {
        let forwards = !mb.forwards.is_empty();
        // A catch-all row that reaches here has no `deliver_to` (lookup follows it):
        // mail stored under `*@domain` could never be read, so it is only relayed.
        let catch_all = powermail_userbase::is_catch_all(&mb.name);
        if catch_all && !(forwards && self.shared.relay.is_some()) {
            log::warn!(
                "rcpt={name} catch-all has no deliver_to (nor a forward through a relay): refused"
            );
            return RcptVerdict::Unknown;
        }
        let local = !catch_all && (!forwards || mb.keep_local_copy || self.shared.relay.is_none());
        if forwards && self.shared.relay.is_none() {
            log::warn!(
                "rcpt={} forwards but no [forward] relay is configured: stored locally",
                kv(name.as_str())
            );
        }
        let mut quota = None;
        if local && mb.quota_bytes > 0 {
            // Asked once per transaction (a repeated RCPT reuses it), and
            // between transactions for quota.usage_cache_ms (usage_cache.rs).
            let known = self.quotas.iter().find(|q| q.mailbox == name);
            let (mut used, mut kept) = match known {
                Some(q) => (q.used_bytes, q.kept),
                None => match self.shared.usage.get(&name, Instant::now()) {
                    Some(used) => {
                        let kept = &self.shared.stats.counters.quota_usage_kept;
                        kept.fetch_add(1, Ordering::Relaxed);
                        (used, true)
                    }
                    None => (self.usage_bytes(&name), false),
                },
            };
            if used >= mb.quota_bytes && kept {
                (used, kept) = (self.usage_bytes(&name), false);
            }
            if used >= mb.quota_bytes {
                return RcptVerdict::OverQuota;
            }
            quota = Some(QuotaUse {
                mailbox: name.clone(),
                quota_bytes: mb.quota_bytes,
                used_bytes: used,
                kept,
            });
        }
        if let (true, Some(addr)) = (forwards, self.shared.relay.as_deref()) {
            if self.relay.is_none() {
                let opened = Relay::open(
                    addr,
                    &self.shared.hostname,
                    &self.from,
                    self.shared.relay_timeout,
                );
                match opened {
                    Ok(r) => self.relay = Some(r),
                    Err(reply) => return RcptVerdict::Refuse(reply),
                }
            }
            let relay = self.relay.as_mut().expect("opened above");
            for target in &mb.forwards {
                if let Err(reply) = relay.rcpt(target) {
                    return RcptVerdict::Refuse(reply);
                }
            }
            self.forwarded += 1;
        }
        // Only an accepted recipient's quota is checked again at the end.
        self.quotas.extend(quota);
        RcptVerdict::Accept(local.then_some(name))
    }

    /// True when a local recipient would go over its quota with `size_bytes` more.
    fn over_quota(&self, size_bytes: u64) -> bool {
        self.quotas.iter().any(|q| q.over(size_bytes))
    }

    fn now_us() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0)
    }

    /// Opens a PUT (header included) on backend `id`.
    fn open_copy(
        &self,
        id: BackendId,
        msgid: &MessageId,
        rcpts: &[MailboxName],
        header: &[u8],
    ) -> Option<Copy> {
        let cluster = &self.shared.cluster;
        let started = Instant::now();
        let mut conn = match cluster.checkout(id) {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "msgid={msgid} backend={} unavailable: {e}",
                    cluster.spec(id).name
                );
                return None;
            }
        };
        match conn
            .put_begin(msgid, rcpts)
            .and_then(|_| conn.put_chunk(header))
        {
            Ok(()) => Some(Copy {
                id,
                conn: Some(conn),
                started,
            }),
            Err(e) => {
                cluster.report_error(id, &e);
                log::warn!(
                    "msgid={msgid} backend={} PUT failed: {e}",
                    cluster.spec(id).name
                );
                None
            }
        }
    }

    fn fail_copy(&self, txn_msgid: &MessageId, copy: &mut Copy, e: &BackendError) {
        let cluster = &self.shared.cluster;
        cluster.report_error(copy.id, e);
        log::warn!(
            "msgid={txn_msgid} backend={} PUT failed: {e}",
            cluster.spec(copy.id).name
        );
        copy.conn = None;
    }

    /// The one `key=value` line per transaction operators grep (Postfix style):
    /// `session=... msgid=... client=... from=<...> rcpts=N to=a,b size=...
    /// copies=K backends=b0,b1 status=sent(250) delay_ms=...`. `copies` counts the
    /// durable copies kept (0 when the transaction failed and they were undone).
    fn log_txn(&self, txn: &Txn, backends: &[BackendId], result: &Reply, started: Instant) {
        let names: Vec<&str> = backends
            .iter()
            .map(|&id| self.shared.cluster.spec(id).name.as_str())
            .collect();
        let rcpts: Vec<&str> = txn.rcpts.iter().map(|m| m.as_str()).collect();
        let (status, copies) = match result.code {
            200..=299 => ("sent", backends.len()),
            400..=499 => ("deferred", 0),
            _ => ("rejected", 0),
        };
        // Every value through `kv`: one record per line, whatever the client sent.
        log::info!(
            "session={} msgid={} client={} helo={} from={} rcpts={} to={} size={} copies={copies} backends={} status={status}({}) delay_ms={}",
            self.session,
            kv(txn.msgid.as_str()),
            kv(&self.client),
            kv(&txn.helo),
            kv(&format!("<{}>", txn.from)),
            rcpts.len() + self.forwarded,
            kv(&if rcpts.is_empty() { "-".to_string() } else { rcpts.join(",") }),
            txn.size_bytes,
            kv(&if names.is_empty() {
                "-".to_string()
            } else {
                names.join(",")
            }),
            result.code,
            started.elapsed().as_millis()
        );
    }

    /// Deletes every copy that may be stored when the message is refused: first
    /// records one deletion per copy begun (a backend whose `+OK` was lost may
    /// hold one) in the undo journal, durably, then deletes the copies known to
    /// be durable at once. Whatever is not acknowledged now is replayed later
    /// (see [`crate::undo`]), so a refused message is not left listed.
    fn undo(&self, txn: &Txn, ok: Vec<(BackendId, PooledConn)>) {
        let cluster = &self.shared.cluster;
        let begun: Vec<BackendId> = txn.copies.iter().map(|c| c.id).collect();
        let undo = &self.shared.undo;
        undo.record(cluster, &begun, &txn.rcpts, &txn.msgid);
        for (id, conn) in ok {
            if let Some(conn) = undo.delete_now(cluster, id, conn, &txn.rcpts, &txn.msgid) {
                conn.release();
            }
        }
    }

    /// Ends every PUT, then reads every reply (so the K fsyncs overlap).
    /// Returns the copies that are durable, and their latencies.
    /// Sends the gathered body bytes to every live copy and to the relay.
    fn send_pending(&mut self, txn: &mut Txn) {
        if txn.pending.is_empty() {
            return;
        }
        for i in 0..txn.copies.len() {
            let result = match txn.copies[i].conn.as_mut() {
                Some(conn) => conn.put_chunk(&txn.pending),
                None => continue,
            };
            if let Err(e) = result {
                let msgid = txn.msgid.clone();
                self.fail_copy(&msgid, &mut txn.copies[i], &e);
            }
        }
        if let Some(Err(e)) = self.relay.as_mut().map(|r| r.chunk(&txn.pending)) {
            log::warn!(
                "msgid={} relay failed during DATA: error={}",
                txn.msgid,
                kv(&e.to_string())
            );
            self.relay = None;
        }
        txn.pending.clear();
    }

    fn end_copies(&self, txn: &mut Txn) -> (Vec<(BackendId, PooledConn)>, Vec<u64>) {
        let msgid = txn.msgid.clone();
        for copy in txn.copies.iter_mut() {
            if let Some(Err(e)) = copy.conn.as_mut().map(|c| c.put_end()) {
                self.fail_copy(&msgid, copy, &e);
            }
        }
        let mut ok = Vec::new();
        let mut put_us = Vec::with_capacity(txn.copies.len());
        // The replies are read in turn: the first one read, and any later one
        // its read had to wait for, arrived just now, so the time since the
        // ends were sent is that backend's latency. A later reply already
        // waiting in the socket arrived at some unknown earlier time: no sample.
        let ended = Instant::now();
        let mut first = true;
        for copy in txn.copies.iter_mut() {
            let Some(mut conn) = copy.conn.take() else {
                continue;
            };
            let asked = Instant::now();
            match conn.put_reply() {
                Ok(receipt) => {
                    debug_assert_eq!(receipt.size_bytes, txn.size_bytes);
                    if first || asked.elapsed() >= REPLY_WAITED {
                        self.shared
                            .cluster
                            .observe_latency(copy.id, ended.elapsed());
                    }
                    first = false;
                    put_us.push(copy.started.elapsed().as_micros() as u64);
                    ok.push((copy.id, conn));
                }
                Err(e) => {
                    copy.conn = Some(conn);
                    self.fail_copy(&msgid, copy, &e);
                }
            }
        }
        (ok, put_us)
    }

    /// The relay's final answer (250 when nothing is forwarded). A refusal
    /// (5xx) is passed on as 554 5.7.1, anything else becomes 451 4.4.0.
    fn end_relay(&mut self, txn: &Txn) -> Reply {
        if self.forwarded == 0 {
            return Reply::new(250, "2.0.0 Ok");
        }
        let answer = match self.relay.take() {
            Some(mut r) => {
                let a = r.end();
                if a.is_ok() {
                    self.relay = Some(r);
                }
                a
            }
            None => Err(io::Error::other("relay connection lost")),
        };
        match answer {
            Ok(r) if r.code / 100 == 2 => Reply::new(250, "2.0.0 Ok"),
            Ok(r) if r.code / 100 == 5 => {
                log::warn!(
                    "msgid={} relay refused: code={} text={}",
                    txn.msgid,
                    r.code,
                    kv(&r.text)
                );
                Reply::new(
                    554,
                    format!("5.7.1 Forwarding refused: {} {}", r.code, r.text),
                )
            }
            Ok(r) => {
                log::warn!(
                    "msgid={} relay deferred: code={} text={}",
                    txn.msgid,
                    r.code,
                    kv(&r.text)
                );
                Reply::new(451, "4.4.0 Forwarding deferred, try again later")
            }
            Err(e) => {
                log::warn!(
                    "msgid={} relay failed: error={}",
                    txn.msgid,
                    kv(&e.to_string())
                );
                Reply::new(451, "4.4.0 Forwarding relay failed, try again later")
            }
        }
    }

    /// Refuses the current transaction with `reply`: logs it and abandons
    /// every copy.
    fn fail_txn(&mut self, reply: &Reply) {
        self.shared
            .stats
            .counters
            .messages_failed
            .fetch_add(1, Ordering::Relaxed);
        let started = self.txn_started.take().unwrap_or_else(Instant::now);
        if let Some(txn) = &self.txn {
            self.log_txn(txn, &[], reply, started);
        }
        self.abort();
    }
}

impl Delivery for BackendDelivery {
    fn lookup(&mut self, address: &str) -> RcptVerdict {
        match self.shared.userbase.lookup(address) {
            Ok(Some(mb)) if !mb.enabled => RcptVerdict::Disabled,
            Ok(Some(mb)) => match MailboxName::parse(&mb.name) {
                Ok(name) => self.accept(mb, name),
                Err(e) => {
                    log::warn!(
                        "rcpt={} mailbox={} unusable: error={}",
                        kv(address),
                        kv(&mb.name),
                        kv(&e.to_string())
                    );
                    RcptVerdict::Unknown
                }
            },
            Ok(None) | Err(UserbaseError::InvalidName(_)) => RcptVerdict::Unknown,
            Err(e) => {
                log::warn!(
                    "rcpt={} userbase: error={}",
                    kv(address),
                    kv(&e.to_string())
                );
                RcptVerdict::TempFail
            }
        }
    }

    fn transaction_started(&mut self, from: &str) {
        self.txn_started = Some(Instant::now());
        self.from = from.to_string();
        self.quotas.clear();
        self.forwarded = 0;
        if let Some(r) = self.relay.take() {
            r.quit();
        }
    }

    fn begin(&mut self, env: &Envelope) -> Result<(), Reply> {
        // Forward-only messages need no local copy at all.
        let k = if env.rcpts.is_empty() {
            0
        } else {
            self.shared.replicas
        };
        let counter = self.shared.counter.fetch_add(1, Ordering::Relaxed);
        let now_us = Self::now_us();
        let msgid = MessageId::generate(now_us, &self.shared.frontend_id, counter);
        let header = received_header(env, &self.shared.hostname, &msgid, now_us / 1_000_000);
        let mut copies = Vec::with_capacity(k);
        if k > 0 {
            for id in self
                .shared
                .cluster
                .select_writable(self.shared.cluster.len())
            {
                if copies.len() == k {
                    break;
                }
                if let Some(c) = self.open_copy(id, &msgid, &env.rcpts, header.as_bytes()) {
                    copies.push(c);
                }
            }
        }
        let txn = Txn {
            msgid,
            rcpts: env.rcpts.clone(),
            from: env.from.clone(),
            helo: env.helo.clone(),
            copies,
            size_bytes: header.len() as u64,
            pending: Vec::new(),
        };
        let refusal = if txn.copies.len() < k {
            Some(Reply::new(
                451,
                "4.3.0 Not enough storage backends available, try again later",
            ))
        } else if self.forwarded > 0 {
            let started = self
                .relay
                .as_mut()
                .ok_or_else(|| io::Error::other("relay gone"))
                .and_then(|r| r.data().and_then(|_| r.chunk(header.as_bytes())));
            started.err().map(|e| {
                log::warn!(
                    "msgid={} relay DATA failed: error={}",
                    txn.msgid,
                    kv(&e.to_string())
                );
                Reply::new(451, "4.4.0 Forwarding relay failed, try again later")
            })
        } else {
            None
        };
        self.txn = Some(txn);
        if let Some(reply) = refusal {
            self.fail_txn(&reply);
            return Err(reply);
        }
        Ok(())
    }

    fn chunk(&mut self, bytes: &[u8]) {
        let Some(mut txn) = self.txn.take() else {
            return;
        };
        txn.size_bytes += bytes.len() as u64;
        if txn.pending.capacity() == 0 {
            txn.pending.reserve_exact(BACKEND_CHUNK_BYTES);
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = BACKEND_CHUNK_BYTES - txn.pending.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            txn.pending.extend_from_slice(now);
            rest = later;
            if txn.pending.len() == BACKEND_CHUNK_BYTES {
                self.send_pending(&mut txn);
            }
        }
        self.txn = Some(txn);
    }

    fn finish(&mut self) -> Reply {
        let eod = Instant::now();
        let Some(size_bytes) = self.txn.as_ref().map(|t| t.size_bytes) else {
            return Reply::new(451, "4.3.0 Internal error: no transaction");
        };
        self.refresh_kept_over(size_bytes);
        if self.over_quota(size_bytes) {
            let reply = Reply::new(552, "5.2.2 Mailbox full: message would exceed the quota");
            self.fail_txn(&reply);
            return reply;
        }
        let mut txn = self.txn.take().expect("checked above");
        self.send_pending(&mut txn);
        let want = if txn.rcpts.is_empty() {
            0
        } else {
            self.shared.replicas
        };
        let (ok, put_us) = self.end_copies(&mut txn);
        let backends: Vec<BackendId> = ok.iter().map(|(id, _)| *id).collect();
        let mut reply = if ok.len() == want {
            self.end_relay(&txn)
        } else {
            Reply::new(451, "4.3.0 Could not store enough copies, try again later")
        };
        let stats = &self.shared.stats;
        if reply.code == 250 {
            self.stored_on.clone_from(&backends);
            for (_, conn) in ok {
                conn.release();
            }
            stats.counters.messages.fetch_add(1, Ordering::Relaxed);
            stats
                .counters
                .recipients
                .fetch_add((txn.rcpts.len() + self.forwarded) as u64, Ordering::Relaxed);
            stats
                .counters
                .bytes
                .fetch_add(txn.size_bytes, Ordering::Relaxed);
            for q in &self.quotas {
                self.shared.usage.add(&q.mailbox, txn.size_bytes);
            }
            reply = Reply::new(250, format!("2.0.0 Ok: queued as {}", txn.msgid));
        } else {
            self.undo(&txn, ok);
            stats
                .counters
                .messages_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        let started = self.txn_started.take().unwrap_or(eod);
        if let Ok(mut l) = stats.latencies.lock() {
            for us in put_us {
                l.record("backend_put", us);
            }
            l.record("eod_to_reply", eod.elapsed().as_micros() as u64);
            l.record("transaction", started.elapsed().as_micros() as u64);
        }
        self.log_txn(&txn, &backends, &reply, started);
        reply
    }

    /// LMTP: a recipient whose mailbox this message would take over its
    /// quota gets `552 5.2.2` alone; the others get the reply of
    /// [`Delivery::finish`] (250 only with K durable copies), and the full
    /// mailboxes' links are then removed from those copies.
    fn finish_each(&mut self, rcpts: &[Option<MailboxName>]) -> Vec<Reply> {
        let Some((msgid, size_bytes)) = self.txn.as_ref().map(|t| (t.msgid.clone(), t.size_bytes))
        else {
            let r = Reply::new(451, "4.3.0 Internal error: no transaction");
            return vec![r; rcpts.len()];
        };
        self.refresh_kept_over(size_bytes);
        let full: Vec<MailboxName> = self
            .quotas
            .iter()
            .filter(|q| q.over(size_bytes))
            .map(|q| q.mailbox.clone())
            .collect();
        let everyone_full = self.forwarded == 0
            && self
                .txn
                .as_ref()
                .is_some_and(|t| t.rcpts.iter().all(|m| full.contains(m)));
        if !everyone_full {
            // Only the others are checked by finish(); the full ones are unlinked.
            self.quotas.retain(|q| !full.contains(&q.mailbox));
        }
        self.stored_on.clear();
        let reply = self.finish();
        if reply.code == 250 && !full.is_empty() {
            log::info!(
                "msgid={msgid} refused for over-quota {}",
                full.iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            self.unlink(&msgid, &full);
        }
        let over = Reply::new(552, "5.2.2 Mailbox full: message would exceed the quota");
        rcpts
            .iter()
            .map(|m| match m {
                Some(m) if full.contains(m) => over.clone(),
                _ => reply.clone(),
            })
            .collect()
    }

    fn abort(&mut self) {
        let Some(mut txn) = self.txn.take() else {
            return;
        };
        for copy in txn.copies.iter_mut() {
            let Some(mut conn) = copy.conn.take() else {
                continue;
            };
            // A clean abort keeps the connection reusable; anything else closes it.
            let aborted = conn.put_abort().and_then(|_| conn.put_reply());
            if let Err(e) = &aborted {
                if e.code() == Some(ErrorCode::Aborted) {
                    conn.release();
                }
            }
        }
        // Closing the relay connection before the final "." abandons its copy.
        self.relay = None;
        log::info!(
            "session={} msgid={} client={} status=aborted size={}",
            self.session,
            txn.msgid,
            self.client,
            txn.size_bytes
        );
    }

    fn replied(&mut self, code: u16) {
        let class = (code / 100).clamp(2, 5) as usize - 2;
        self.shared.stats.replies[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// The `with` word of the trace header: the RFC 3848 / RFC 6531 protocol
/// name of the session (LMTP and its TLS and SMTPUTF8 forms for mail handed
/// over LMTP). There is no SMTP AUTH here, so never an `…A` form.
pub fn with_protocol(env: &Envelope) -> &'static str {
    match (env.lmtp, env.esmtp, env.smtputf8, env.tls) {
        (true, _, true, true) => "UTF8LMTPS",
        (true, _, true, false) => "UTF8LMTP",
        (true, _, false, true) => "LMTPS",
        (true, _, false, false) => "LMTP",
        (false, _, true, true) => "UTF8SMTPS",
        (false, _, true, false) => "UTF8SMTP",
        (false, true, false, true) => "ESMTPS",
        (false, true, false, false) => "ESMTP",
        (false, false, false, _) => "SMTP",
    }
}

/// The `Received:` header prepended to every message (RFC 5321 §4.4), with
/// the message id, so any copy can be traced back to this frontend.
pub fn received_header(env: &Envelope, hostname: &str, msgid: &MessageId, unix_s: u64) -> String {
    let with = with_protocol(env);
    let helo: String = env
        .helo
        .chars()
        .filter(|c| !c.is_whitespace() && !c.is_control() && *c != '(' && *c != ')')
        .take(64)
        .collect();
    let mut h = format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} (powersmtp) with {with} id {msgid}",
        env.client
    );
    if env.rcpts.len() == 1 {
        h.push_str(&format!("\r\n\tfor <{}>", env.rcpts[0]));
    }
    h.push_str(&format!("; {}\r\n", rfc5322_date(unix_s)));
    h
}

/// `Tue, 24 Nov 2026 08:50:12 +0000`.
pub fn rfc5322_date(unix_s: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_over_k_copies_counts_each_message_once() {
        // K = 2, three backends, messages of 100 and 40 bytes, each on two.
        assert_eq!(combined_usage_bytes(&[140, 100, 40], 2), 140);
        // One holder down: never below what one backend alone holds.
        assert_eq!(combined_usage_bytes(&[140, 40], 2), 140);
        assert_eq!(combined_usage_bytes(&[100, 40], 2), 100);
        // K = 1: the sum; nothing answered: zero; odd sums round up.
        assert_eq!(combined_usage_bytes(&[5, 7], 1), 12);
        assert_eq!(combined_usage_bytes(&[], 2), 0);
        assert_eq!(combined_usage_bytes(&[3, 3, 1], 2), 4);
        assert_eq!(combined_usage_bytes(&[u64::MAX, 1], 0), u64::MAX);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_795_510_212),
            "Tue, 24 Nov 2026 08:50:12 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn received_header_form() {
        let env = Envelope {
            client: "192.0.2.1".into(),
            helo: "client (evil)\r\nX: y".into(),
            esmtp: true,
            lmtp: false,
            from: "a@b.c".into(),
            smtputf8: false,
            rcpts: vec![MailboxName::parse("x@y.z").unwrap()],
            accepted: 1,
            tls: false,
        };
        let id = MessageId::parse("0001.f.1").unwrap();
        let h = received_header(&env, "mx.test", &id, 0);
        assert_eq!(
            h,
            "Received: from clientevilX:y ([192.0.2.1])\r\n\tby mx.test (powersmtp) with ESMTP id 0001.f.1\r\n\tfor <x@y.z>; Thu, 1 Jan 1970 00:00:00 +0000\r\n"
        );
    }

    #[test]
    fn with_names_the_protocol_lmtp_included() {
        let env = |lmtp, esmtp, smtputf8, tls| Envelope {
            client: "192.0.2.1".into(),
            helo: "h".into(),
            esmtp,
            lmtp,
            from: String::new(),
            smtputf8,
            rcpts: Vec::new(),
            accepted: 0,
            tls,
        };
        let cases = [
            ((true, true, false, false), "LMTP"),
            ((true, true, false, true), "LMTPS"),
            ((true, true, true, false), "UTF8LMTP"),
            ((true, true, true, true), "UTF8LMTPS"),
            ((false, false, false, false), "SMTP"),
            ((false, true, false, false), "ESMTP"),
            ((false, true, false, true), "ESMTPS"),
            ((false, true, true, false), "UTF8SMTP"),
            ((false, true, true, true), "UTF8SMTPS"),
        ];
        for ((lmtp, esmtp, utf8, tls), want) in cases {
            assert_eq!(with_protocol(&env(lmtp, esmtp, utf8, tls)), want);
        }
        let id = MessageId::parse("0001.f.1").unwrap();
        let h = received_header(&env(true, true, false, false), "mx.test", &id, 0);
        assert!(h.contains(" with LMTP id 0001.f.1"), "{h}");
    }
}
