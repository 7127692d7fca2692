//! The threaded server: accept loop, one thread per connection (bounded),
//! and [`LiveStore`], the session's [`Store`] over the userbase and the
//! backends.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use powermail_admin::{kv, Samples};
use powermail_frontend::accept::{self, Event, ListenerSpec, Refusals};
use powermail_frontend::proxy::{self, Endpoints, ProxyPolicy};
use powermail_frontend::reload::{on_sighup, on_sigterm, Reloadable};
use powermail_frontend::{BackendId, Cluster, DeadlineWrite, PooledConn};
use powermail_proto::{BackendError, ErrorCode, MailboxName, MessageId, SpliceSink};
use powermail_userbase::{CacheConfig, CachedUserbase, Userbase, UserbaseError};

use crate::ahead::{fetch_plan, window, Ahead};
use crate::config::{Config, Limits};
use crate::journal::{Journal, Owed};
use crate::line::LineReader;
use crate::listing::{CacheUse, ListPool, Merged};
use crate::listing_cache::ListingCache;
use crate::lock::{LeaseConfig, LockError, Locks, MailboxLock};
use crate::session::{
    is_enough, qualify, AuthResult, Listed, RetrieveError, Session, SessionLimits, Store,
};
use crate::stats::{Admin, Stats};
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
    if let Some(admin_listen) = &cfg.admin_listen {
        let token = match &cfg.admin_token {
            Some(t) => t.clone(),
            None => String::from_utf8_lossy(&secret).into_owned(),
        };
        let server =
            powermail_admin::spawn(admin_listen, &token, admin.clone(), cfg.admin_limits())?;
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

/// Relays bytes between the client and the fallback server until either
/// closes or both are idle for `idle`.
fn relay<S: Read + Write>(
    client: &mut S,
    client_fd: RawFd,
    session: &mut Session<LiveStore>,
    idle: Duration,
) -> io::Result<&'static str> {
    let Some(upstream) = session.store_mut().upstream.take() else {
        return Ok("closed");
    };
    // Big enough for a whole TLS record's plaintext in one read, so none
    // stays buffered inside rustls where poll cannot see it.
    let mut buf = vec![0u8; 64 << 10];
    let idle_ms = libc::c_int::try_from(idle.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: client_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: upstream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, idle_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok("proxy-timeout");
        }
        if fds[0].revents != 0 {
            let n = client.read(&mut buf)?;
            if n == 0 {
                return Ok("proxied");
            }
            (&upstream).write_all(&buf[..n])?;
        }
        if fds[1].revents != 0 {
            let n = (&upstream).read(&mut buf)?;
            if n == 0 {
                return Ok("proxied");
            }
            client.write_all(&buf[..n])?;
            client.flush()?;
        }
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

    /// Writes `data` by the deadline, which the answer's first write sets.
    fn send(
        stream: &mut S,
        deadline: &mut Option<Instant>,
        send_timeout: Duration,
        data: &[u8],
    ) -> io::Result<()> {
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + send_timeout);
        stream.write_all_by(data, deadline)
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
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + self.send_timeout);
        self.stream.splice_from_by(pipe, len, deadline)
    }
}

impl<S: DeadlineWrite> Write for Out<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > OUT_BUFFER_BYTES {
            Self::send(self.stream, &mut self.deadline, self.send_timeout, self.buf)?;
            self.buf.clear();
            if data.len() >= OUT_BUFFER_BYTES {
                Self::send(self.stream, &mut self.deadline, self.send_timeout, data)?;
                return Ok(data.len());
            }
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Self::send(self.stream, &mut self.deadline, self.send_timeout, self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

/// The read-parse-answer loop. Replies are flushed when no complete command
/// is left in the input (PIPELINING: one write for a batch of commands).
/// Each command's answer must be written within `send_timeout_ms` of its first
/// write to the socket (a pipelined batch's buffered answers go with the
/// answer that sends them).
fn drive<S: Read + Write + DeadlineWrite>(
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

/// The [`Store`] of one live session.
pub struct LiveStore {
    shared: Arc<Shared>,
    client: SocketAddr,
    local: SocketAddr,
    /// Set at login.
    mailbox: Option<MailboxName>,
    /// Held from login to the end of the session.
    lock: Option<MailboxLock>,
    messages: Arc<Vec<Merged>>,
    /// Backends whose listing made up `messages`.
    listed: Vec<BackendId>,
    /// The fallback server's connection after a proxied login.
    upstream: Option<TcpStream>,
    /// Messages fetched ahead by the last RETR.
    ahead: Ahead,
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

/// Longest reply line read from the fallback server during the login.
const FALLBACK_LINE_MAX_BYTES: usize = 1024;

/// Reads one CRLF line byte by byte (so nothing after it is consumed).
fn read_reply(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < FALLBACK_LINE_MAX_BYTES {
        if s.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    Err(io::Error::other("fallback reply line too long"))
}

/// `VERB arg\r\n` for the fallback server; `None` when `arg` holds CR, LF
/// or NUL, which would let the client put a command of its own on that wire.
fn fallback_line(verb: &str, arg: &str) -> Option<Vec<u8>> {
    crate::sasl::is_line_safe(arg).then(|| format!("{verb} {arg}\r\n").into_bytes())
}

impl LiveStore {
    /// Logs in to the fallback server with what the client typed.
    fn proxy_login(
        &mut self,
        fallback: &crate::config::FallbackSettings,
        user: &str,
        password: &str,
    ) -> AuthResult {
        // The one guard at the relay: only lines the client sent as one line
        // go to the legacy server, whatever the checks before this missed.
        let (Some(user_line), Some(pass_line)) =
            (fallback_line("USER", user), fallback_line("PASS", password))
        else {
            log::warn!("fallback login refused: CR, LF or NUL in a field");
            return AuthResult::Bad;
        };
        let timeout = Duration::from_millis(fallback.timeout_ms);
        let attempt = || -> io::Result<Option<(TcpStream, String)>> {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(&fallback.addr)?
                .next()
                .ok_or_else(|| io::Error::other("fallback address does not resolve"))?;
            let mut s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            if !read_reply(&mut s)?.starts_with("+OK") {
                return Err(io::Error::other("fallback greeting is not +OK"));
            }
            s.write_all(&user_line)?;
            if !read_reply(&mut s)?.starts_with("+OK") {
                return Ok(None);
            }
            s.write_all(&pass_line)?;
            let reply = read_reply(&mut s)?;
            Ok(reply.starts_with("+OK").then_some((s, reply)))
        };
        match attempt() {
            Ok(Some((s, reply))) => {
                let idle = self.shared.limits.get().idle_timeout();
                let _ = s.set_read_timeout(Some(idle));
                self.upstream = Some(s);
                log::info!(
                    "login proxied user={} client={} fallback={}",
                    kv(user),
                    self.client,
                    kv(&fallback.addr)
                );
                AuthResult::Proxied(reply)
            }
            Ok(None) => AuthResult::Bad,
            Err(e) => {
                log::warn!(
                    "fallback={} unavailable: error={}",
                    kv(&fallback.addr),
                    kv(&e.to_string())
                );
                AuthResult::Unavailable
            }
        }
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
        AuthResult::Ok(
            self.messages
                .iter()
                .map(|m| Listed {
                    uid: m.msgid.to_string(),
                    size_bytes: m.size_bytes,
                })
                .collect(),
        )
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
