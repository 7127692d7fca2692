//! The threaded server: accept loop, one thread per connection (bounded),
//! and the loop that drives one [`Session`] over its socket. The session's
//! store is in [`crate::store`]; the relay to a legacy server in
//! [`crate::fallback`].

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use powermail_admin::signals::{on_sighup, on_sigterm};
use powermail_admin::{kv, Samples};
use powermail_frontend::accept::{self, Event, ListenerSpec, Refusals};
use powermail_frontend::proxy::{self, Endpoints, ProxyPolicy};
use powermail_frontend::reload::Reloadable;
use powermail_frontend::{Cluster, DeadlineWrite};
use powermail_proto::SpliceSink;
use powermail_userbase::{CacheConfig, CachedUserbase, Userbase};

use crate::ahead::Ahead;
use crate::config::{Config, Limits};
use crate::fallback::relay;
use crate::journal::Journal;
use crate::line::LineReader;
use crate::listing::ListPool;
use crate::listing_cache::ListingCache;
use crate::lock::{LeaseConfig, Locks};
use crate::session::{Session, SessionLimits, Store};
use crate::stats::{Admin, Stats};
use crate::store::LiveStore;
use crate::throttle::Throttle;

/// What every connection thread shares.
pub struct Shared {
    /// The configuration as started (`limits` excepted: see [`Shared::limits`]).
    pub cfg: Config,
    /// The limits new sessions get; replaced by a reload (SIGHUP, `POST /control/reload`).
    pub limits: Arc<Reloadable<Limits>>,
    /// The backends.
    pub cluster: Arc<Cluster>,
    /// The userbase (cached).
    pub userbase: Arc<dyn Userbase>,
    /// Deletions owed to backends.
    pub journal: Arc<Journal>,
    /// The long-lived listing workers.
    pub lister: ListPool,
    /// Mailbox locks.
    pub locks: Arc<Locks>,
    /// Login throttling.
    pub throttle: Throttle,
    /// Which peers must (and which must not) send a PROXY header.
    pub proxy: ProxyPolicy,
    /// Counters.
    pub stats: Arc<Stats>,
}

/// Starts everything from `cfg` and serves until the process ends. `path` is the file
/// `cfg` came from, re-read on reload (none: reload is refused).
pub fn run(cfg: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let secret = cfg.secret()?;
    // A MySQL server that is down does not stop the start: logins get
    // `-ERR [SYS/TEMP]` until it is back.
    let inner = powermail_userbase::open_lazy(&cfg.userbase, cfg.userbase_migrate)
        .context("opening the userbase")?;
    let cache = CacheConfig {
        positive_ttl: Duration::from_millis(cfg.userbase_cache.positive_ttl_ms),
        negative_ttl: Duration::from_millis(cfg.userbase_cache.negative_ttl_ms),
        max_entries: cfg.userbase_cache.max_entries,
    };
    let userbase: Arc<dyn Userbase> = Arc::new(CachedUserbase::new(inner, cache));
    let journal =
        Arc::new(Journal::open(&cfg.state_dir).with_context(|| {
            format!("opening the delete journal in {}", cfg.state_dir.display())
        })?);
    let lock_dir = Some(cfg.state_dir.join("locks"));
    // A shared database makes the lock span hosts (a lease row); SQLite is one host.
    let locks = if userbase.leases_span_hosts() {
        let lease = LeaseConfig {
            userbase: userbase.clone(),
            lease_ms: cfg.lock_lease_ms,
        };
        Locks::with_lease(lock_dir, lease).context("starting the lease renewal")?
    } else {
        Locks::new(lock_dir)
    };
    let cluster = Cluster::start(
        secret.clone(),
        cfg.backends.clone(),
        cfg.backend_pool.clone(),
    );
    let stats = Arc::new(Stats::new());
    let tls = match &cfg.tls {
        Some(t) => Some(t.load().context("loading the TLS certificate")?),
        None => None,
    };
    let listener =
        TcpListener::bind(&cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let tls_listener = match &cfg.tls_listen {
        Some(addr) => Some(TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    let limits = Arc::new(Reloadable::new(cfg.limits.clone()));
    let admin = Arc::new(Admin {
        stats: stats.clone(),
        cluster: cluster.clone(),
        journal: journal.clone(),
        locks: locks.clone(),
        config: cfg.clone(),
        limits: limits.clone(),
        path,
    });
    let mut ready: Vec<(&str, std::net::SocketAddr)> = Vec::new();
    if let Some(server) = cfg.admin.start(&secret, admin.clone())? {
        println!("powerpop admin port on {}", server.local_addr());
        ready.push(("admin", server.local_addr()));
    }
    on_sighup(move || {
        let _ = admin.reload();
    })?;
    let proxy = ProxyPolicy::new(&cfg.proxy_from, cfg.proxy_timeout_ms)?;
    let lister = ListPool::start(
        &cluster,
        &journal,
        cfg.serving.listing_workers_per_backend,
        cfg.serving.listing_queue_max,
        ListingCache::new(
            cfg.serving.listing_cache_entries_max,
            cfg.serving.listing_cache_min_messages,
        ),
    )
    .context("starting the listing workers")?;
    let (on_term, grace) = (stats.clone(), Duration::from_millis(cfg.shutdown_grace_ms));
    on_sigterm(move || drain(&on_term, grace))?;
    let shared = Arc::new(Shared {
        lister,
        limits,
        throttle: Throttle::new(cfg.throttle.clone()),
        proxy,
        cfg,
        cluster,
        userbase,
        journal,
        locks,
        stats,
    });
    if let (Some(l), Some(tls)) = (tls_listener, tls.clone()) {
        let local = l.local_addr()?;
        let service = Listener::new(&shared, Some(tls), true);
        std::thread::Builder::new()
            .name("accept-tls".into())
            .spawn(move || accept::accept_loop(&l, &service, &LISTENER))?;
        log::info!("powerpop implicit TLS on {local}");
        println!("powerpop implicit TLS on {local}");
        ready.insert(0, ("pop3s", local));
    }
    let local = listener.local_addr()?;
    log::info!("powerpop listening on {local}");
    println!("powerpop listening on {local}");
    ready.insert(0, ("pop3", local));
    powermail_admin::announce_ready("powerpop", &ready);
    accept::accept_loop(&listener, &Listener::new(&shared, tls, false), &LISTENER);
    Ok(())
}

/// Set by SIGTERM: new connections are refused, open sessions finish.
static DRAINING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// SIGTERM: refuse new sessions, wait up to `grace` for the open ones to
/// end, then end the process.
fn drain(stats: &Stats, grace: Duration) {
    accept::begin_drain(&DRAINING, &stats.connections, grace);
    accept::wait_drained(&stats.connections, grace, "their DELEs not applied");
    println!("powerpop stopped");
    let _ = io::stdout().flush();
    std::process::exit(0);
}

/// How the POP3 listeners make their session threads and refuse.
const LISTENER: ListenerSpec = ListenerSpec {
    thread_name: "pop",
    stack_size_bytes: None,
    accept_error_pause_ms: 50,
    refusals: Refusals {
        full: b"-ERR [SYS/TEMP] too many connections\r\n",
        draining: b"-ERR [SYS/TEMP] shutting down\r\n",
    },
    idle_threads_max: 64,
};

/// One listener (plain POP3 with STLS, or implicit TLS) in the shared accept loop.
struct Listener {
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS from the first byte.
    implicit: bool,
}

impl Listener {
    fn new(
        shared: &Arc<Shared>,
        tls: Option<Arc<rustls::ServerConfig>>,
        implicit: bool,
    ) -> Arc<Listener> {
        Arc::new(Listener {
            shared: shared.clone(),
            tls,
            implicit,
        })
    }
}

impl accept::Service for Listener {
    fn connections(&self) -> &dyn accept::SlotCounter {
        &self.shared.stats.connections
    }

    fn connections_max(&self) -> u64 {
        self.shared.limits.get().connections_max as u64
    }

    fn draining(&self) -> bool {
        DRAINING.load(Ordering::SeqCst)
    }

    fn proxy(&self) -> &ProxyPolicy {
        &self.shared.proxy
    }

    fn count(&self, event: Event) {
        let counters = &self.shared.stats.counters;
        match event {
            Event::Accepted => Stats::inc(&counters.connections_accepted),
            Event::RefusedFull => Stats::inc(&counters.connections_refused),
            Event::ProxyRefused => Stats::inc(&counters.proxy_refused),
            Event::RefusedDraining | Event::Admitted => {}
        }
    }

    fn serve(self: &Arc<Self>, stream: TcpStream, ends: Endpoints, started: Instant) {
        serve(
            &self.shared,
            stream,
            ends,
            started,
            self.tls.clone(),
            self.implicit,
        );
    }
}

/// Numbers the sessions of this process for their log lines.
static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves one connection to its end (past the PROXY stage: `ends`; its thread began at
/// `started`) and logs its one summary line.
fn serve(
    shared: &Arc<Shared>,
    stream: TcpStream,
    ends: Endpoints,
    started: Instant,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit: bool,
) {
    let (client, local) = (ends.client, ends.local);
    let limits = shared.limits.get();
    let _ = stream.set_read_timeout(Some(limits.idle_timeout()));
    let _ = stream.set_write_timeout(Some(limits.send_timeout()));
    let _ = stream.set_nodelay(true);
    let store = LiveStore {
        shared: shared.clone(),
        client,
        local,
        mailbox: None,
        lock: None,
        messages: Arc::default(),
        listed: Vec::new(),
        upstream: None,
        ahead: Ahead::default(),
    };
    let mut session = Session::new(
        store,
        SessionLimits {
            errors_max: limits.errors_max,
        },
    );
    if tls.is_some() && !implicit {
        session.offer_stls();
    }
    if !implicit && !shared.cfg.allow_plaintext_auth && !client.ip().is_loopback() {
        session.refuse_plaintext_auth();
    }
    let mut latencies = Samples::new(&shared.stats.latencies);
    let result = converse(shared, &mut session, stream, tls, implicit, &mut latencies);
    drop(latencies);
    let result = match result {
        Ok(r) => r,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            "timeout"
        }
        Err(_) => "io-error",
    };
    let c = session.counters().clone();
    Stats::inc(&shared.stats.counters.sessions);
    let st = &shared.stats.counters;
    st.messages_retrieved
        .fetch_add(c.retrieved, Ordering::Relaxed);
    st.bytes_retrieved
        .fetch_add(c.bytes_sent, Ordering::Relaxed);
    st.messages_deleted
        .fetch_add(c.deleted as u64, Ordering::Relaxed);
    let mailbox = session.store_mut().mailbox.as_ref().map(|m| m.to_string());
    let user = mailbox
        .or_else(|| session.user().map(|u| format!("{u}(proxied)")))
        .unwrap_or_else(|| "-".into());
    // The one key=value line per session operators grep (Dovecot style);
    // the user name is the client's: escaped by `kv`.
    log::info!(
        "session={} user={} client={client} msgs={} retr={} top={} dele={} size={} auth_failures={} status={result} delay_ms={}",
        SESSIONS.fetch_add(1, Ordering::Relaxed),
        kv(&user),
        c.messages,
        c.retrieved - c.top,
        c.top,
        c.deleted,
        c.bytes_sent,
        c.auth_failures,
        started.elapsed().as_millis()
    );
}

/// Plain POP3, then TLS after STLS; or TLS from the start (`implicit`).
fn converse(
    shared: &Shared,
    session: &mut Session<LiveStore>,
    mut plain: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    implicit: bool,
    latencies: &mut Samples<'_>,
) -> io::Result<&'static str> {
    let client_fd = plain.as_raw_fd();
    let limits = shared.limits.get();
    let idle = limits.idle_timeout();
    // `drive` leaves the socket's send time-out at what was left of the last
    // reply's deadline: the TLS handshake and a relay get the full one again.
    let send_timeout = limits.send_timeout();
    if !implicit {
        let ended = drive(shared, session, &mut plain, latencies, true)?;
        plain.set_write_timeout(Some(send_timeout))?;
        match ended {
            Ended::Done(result) => return Ok(result),
            Ended::Proxy => return relay(&mut plain, client_fd, session, idle),
            Ended::StartTls => {}
        }
    }
    let Some(tls) = tls else {
        return Ok("closed");
    };
    let mut secure = powermail_frontend::tls::upgrade(tls, plain)?;
    session.tls_started();
    let ended = drive(shared, session, &mut secure, latencies, implicit)?;
    secure.sock.set_write_timeout(Some(send_timeout))?;
    match ended {
        Ended::Done(result) => Ok(result),
        Ended::Proxy => relay(&mut secure, client_fd, session, idle),
        Ended::StartTls => Ok("closed"),
    }
}

/// How a [`drive`] ended.
enum Ended {
    /// The session is over; why, for the log line.
    Done(&'static str),
    /// STLS accepted: the caller starts TLS and drives again.
    StartTls,
    /// The login went to the fallback server: relay bytes.
    Proxy,
}

/// Output buffered up to this many bytes before it goes to the socket.
const OUT_BUFFER_BYTES: usize = 64 << 10;

/// A bounded output buffer in front of a stream that is also read from
/// (so a `BufWriter` owning it would not do): RETR streams through it.
/// Every byte of one command's answer must reach the socket within
/// `send_timeout` of the answer's first write to it, however slowly the
/// client reads (the time the command took before that does not count).
struct Out<'a, S: DeadlineWrite> {
    buf: &'a mut Vec<u8>,
    stream: &'a mut S,
    send_timeout: Duration,
    /// Set by the current answer's first write to the socket.
    deadline: Option<Instant>,
}

impl<S: DeadlineWrite> Out<'_, S> {
    /// The next command's answer gets a deadline of its own.
    fn next_answer(&mut self) {
        self.deadline = None;
    }

    /// The current answer's deadline, which its first write to the socket sets.
    fn deadline(&mut self) -> Instant {
        let send_timeout = self.send_timeout;
        *self
            .deadline
            .get_or_insert_with(|| Instant::now() + send_timeout)
    }

    /// Writes what is buffered by the answer's deadline and empties the buffer.
    fn send_buffered(&mut self) -> io::Result<()> {
        let deadline = self.deadline();
        self.stream.write_all_by(self.buf, deadline)?;
        self.buf.clear();
        Ok(())
    }
}

/// Body bytes go straight from a pipe to a plain socket, after what is
/// buffered, within the same answer's deadline.
impl<S: DeadlineWrite> SpliceSink for Out<'_, S> {
    fn can_splice(&mut self) -> io::Result<bool> {
        if !self.stream.can_splice() {
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    fn splice_from(&mut self, pipe: RawFd, len: usize) -> io::Result<usize> {
        let deadline = self.deadline();
        self.stream.splice_from_by(pipe, len, deadline)
    }
}

/// Of a write too large to buffer, the last bytes kept in the buffer for
/// what follows (a RETR's terminating line, the next answer).
const TAIL_KEPT_BYTES: usize = 512;

impl<S: DeadlineWrite> Write for Out<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > OUT_BUFFER_BYTES {
            if data.len() >= OUT_BUFFER_BYTES {
                // One send for what is buffered (a RETR's `+OK` line) and
                // all of `data` but its tail, which waits for what follows:
                // two sends per large message, not three.
                let (head, tail) = data.split_at(data.len() - TAIL_KEPT_BYTES);
                let deadline = self.deadline();
                self.stream.write_two_by(self.buf, head, deadline)?;
                self.buf.clear();
                self.buf.extend_from_slice(tail);
                return Ok(data.len());
            }
            self.send_buffered()?;
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// Drives a session with [`drive_commands`] and frees its mailbox when it ends.
fn drive<S: Read + Write + DeadlineWrite>(
    shared: &Shared,
    session: &mut Session<LiveStore>,
    stream: &mut S,
    latencies: &mut Samples<'_>,
    greet: bool,
) -> io::Result<Ended> {
    let ended = drive_commands(shared, session, stream, latencies, greet);
    // However the session ended (QUIT released it already; a time-out, an
    // I/O error or a backend cut mid-body did not), the mailbox is free
    // before the caller drops the socket: a client that sees the connection
    // close and logs in again at once never finds its own mailbox in use.
    if !matches!(ended, Ok(Ended::StartTls)) {
        session.store_mut().release();
    }
    ended
}

/// The read-parse-answer loop. Replies are flushed when no complete command
/// is left in the input (PIPELINING: one write for a batch of commands).
/// Each command's answer must be written within `send_timeout_ms` of its first
/// write to the socket (a pipelined batch's buffered answers go with the
/// answer that sends them).
fn drive_commands<S: Read + Write + DeadlineWrite>(
    shared: &Shared,
    session: &mut Session<LiveStore>,
    stream: &mut S,
    latencies: &mut Samples<'_>,
    greet: bool,
) -> io::Result<Ended> {
    if greet {
        stream.write_all(session.greeting().as_bytes())?;
        stream.flush()?;
    }
    let limits = shared.limits.get();
    let mut lines = LineReader::new(limits.line_max_bytes);
    let send_timeout = limits.send_timeout();
    let mut buf = vec![0u8; 4096];
    let mut pending = Vec::with_capacity(4096);
    let mut first = greet;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(Ended::Done("disconnected")),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Stats::inc(&shared.stats.counters.idle_timeouts);
                let _ = stream.write_all(b"-ERR idle time-out, closing\r\n");
                let _ = stream.flush();
                return Ok(Ended::Done("timeout"));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if std::mem::take(&mut first) && proxy::looks_like_header(&buf[..n]) {
            // A trusted balancer's header was read before the greeting: this
            // one comes from a source that may not choose its address.
            Stats::inc(&shared.stats.counters.proxy_refused);
            log::warn!("connection refused: PROXY header from an untrusted source");
            let _ = stream
                .write_all(b"-ERR [SYS/PERM] PROXY header not accepted from this address\r\n");
            let _ = stream.flush();
            return Ok(Ended::Done("proxy-refused"));
        }
        lines.feed(&buf[..n]);
        let mut out = Out {
            buf: &mut pending,
            stream: &mut *stream,
            send_timeout,
            deadline: None,
        };
        while let Some(line) = lines.next_line() {
            let t = Instant::now();
            out.next_answer();
            let step = session.handle(line, &mut out)?;
            latencies.record(step.op, t.elapsed().as_micros() as u64);
            if step.proxy {
                out.flush()?;
                return Ok(Ended::Proxy);
            }
            if step.starttls {
                // Whatever the client sent after STLS is dropped with
                // `lines` (RFC 2595 §4: no plaintext injection).
                out.flush()?;
                return Ok(Ended::StartTls);
            }
            if step.close {
                out.flush()?;
                return Ok(Ended::Done(if step.op == "QUIT" {
                    "quit"
                } else {
                    "closed"
                }));
            }
        }
        out.flush()?;
    }
}
