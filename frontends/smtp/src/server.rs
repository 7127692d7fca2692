//! The thin threaded I/O loop around [`Session`], and the admin port.
//!
//! An optional second listener (`lmtp_listen`) speaks LMTP with the same
//! sessions, limits and delivery path.
//!
//! One std thread per connection, at most `limits.connections_max` at once;
//! the accept loop answers `421 4.3.2` and closes beyond that. Each thread
//! reads whatever arrived, feeds it to its session and writes the replies
//! back (so pipelined commands are answered in one write), with the RFC 5321
//! time-outs on every read.
//!
//! The configuration is [`Reloadable`]: `SIGHUP` or `POST /control/reload` re-reads the
//! file; the new `[limits]` apply to sessions accepted from then on (open ones keep theirs
//! and are never dropped), every other change is logged as needing a restart.

use std::io::{self, Read};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use powermail_admin::signals::{on_sighup, on_sigterm};
use powermail_admin::{AdminHandler, BackendReport, Metric, Report};
use powermail_frontend::accept::{self, Event, ListenerSpec, Refusals};
use powermail_frontend::proxy::{self, Endpoints, ProxyPolicy};
use powermail_frontend::reload::{changes, reload_file, split_live, Reloadable};
use powermail_frontend::{Cluster, DeadlineWrite};
use powermail_userbase::{CacheConfig, CachedUserbase};

use crate::config::Config;
use crate::delivery::{BackendDelivery, Shared};
use crate::session::{Flow, Session};
use crate::stats::{Stats, REPLY_CLASSES};
use crate::undo::Undo;
use powermail_frontend::journal::Journal;

/// Bytes read from a client at once; DATA chunks to backends are at most twice this.
const READ_BUFFER_BYTES: usize = 64 << 10;

thread_local! {
    /// The read buffer of the session this thread serves, kept for its next
    /// session: a new zeroed 64 KiB per connection cost 3% of powersmtp's
    /// CPU under `smtp-source` (perf, session 11).
    static READ_BUFFER: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's read buffer ([`READ_BUFFER`]), or a new one.
fn take_read_buffer() -> Vec<u8> {
    let buf = READ_BUFFER.take();
    match buf.len() == READ_BUFFER_BYTES {
        true => buf,
        false => vec![0u8; READ_BUFFER_BYTES],
    }
}

/// Set by SIGTERM: no new sessions, idle ones get `421`, open transactions finish.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// How often a session waiting for input looks at [`DRAINING`].
const DRAIN_POLL: Duration = Duration::from_millis(200);

/// SIGTERM: stop taking sessions, wait up to `grace` for the open ones (each
/// closes with `421` as soon as it has no transaction), then end the process.
fn drain(shared: &Shared, grace: Duration) {
    let open = accept::begin_drain(&DRAINING, &shared.stats.connections, grace);
    println!("powersmtp: stopping ({open} sessions open)");
    accept::wait_drained(&shared.stats.connections, grace, "no 250 was sent for them");
    println!("powersmtp: stopped");
    std::process::exit(0);
}

/// Starts everything and serves until the process ends. `path` is the file `cfg` came
/// from, re-read on reload (none: reload is refused).
pub fn run(cfg: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // A MySQL server that is down does not stop the start: RCPT answers 451 until it is back.
    let ub = powermail_userbase::open_lazy(&cfg.userbase, cfg.userbase_migrate)
        .with_context(|| format!("opening userbase {}", cfg.userbase_redacted()))?;
    let cache = CacheConfig {
        positive_ttl: Duration::from_millis(cfg.userbase_cache.positive_ttl_ms),
        negative_ttl: Duration::from_millis(cfg.userbase_cache.negative_ttl_ms),
        max_entries: cfg.userbase_cache.max_entries,
    };
    let secret = cfg.secret()?;
    let cluster = Cluster::start(
        secret.clone(),
        cfg.backends.clone(),
        cfg.backend_pool.clone(),
    );
    let journal = match &cfg.state_dir {
        Some(dir) => Journal::open_named(dir, "undo.journal", "undo.journal.lock")
            .with_context(|| format!("opening the undo journal in {}", dir.display()))?,
        None => {
            log::warn!("no state_dir: the undo journal is kept in memory only");
            Journal::in_memory()
        }
    };
    let undo = Arc::new(Undo::new(journal));
    crate::undo::spawn_replayer(
        &undo,
        &cluster,
        Duration::from_millis(cfg.undo_replay_interval_ms),
    )
    .context("starting the undo replayer")?;
    let shared = Arc::new(Shared {
        undo,
        cluster,
        userbase: CachedUserbase::new(ub, cache),
        stats: Default::default(),
        replicas: cfg.replicas,
        hostname: cfg.hostname.clone(),
        frontend_id: cfg.frontend_id().to_string(),
        counter: AtomicU64::new(0),
        relay: cfg.forward.relay.clone(),
        relay_timeout: Duration::from_millis(cfg.forward.timeout_ms),
        usage: crate::usage_cache::UsageCache::new(
            cfg.quota.usage_cache_ms,
            cfg.quota.usage_cache_entries_max,
        ),
    });
    let tls = cfg.tls.as_ref().map(|t| t.load()).transpose()?;
    let current = Arc::new(Reloadable::new(cfg));
    let cfg = current.get();
    let admin = Arc::new(Admin {
        shared: shared.clone(),
        current: current.clone(),
        path,
    });
    let mut ready: Vec<(&str, std::net::SocketAddr)> = Vec::new();
    if let Some(server) = cfg.admin.start(&secret, admin.clone())? {
        println!("powersmtp: admin port on {}", server.local_addr());
        ready.push(("admin", server.local_addr()));
    }
    let on_hup = admin.clone();
    on_sighup(move || {
        let _ = on_hup.reload();
    })?;
    let proxy = Arc::new(ProxyPolicy::new(&cfg.proxy_from, cfg.proxy_timeout_ms)?);
    let (on_term, grace) = (shared.clone(), Duration::from_millis(cfg.shutdown_grace_ms));
    on_sigterm(move || drain(&on_term, grace))?;
    // Both listeners are bound before the "listening on" line (readiness).
    let lmtp = match &cfg.lmtp_listen {
        Some(addr) => Some(TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?),
        None => None,
    };
    let listener =
        TcpListener::bind(&cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
    let local = listener.local_addr()?;
    log::info!("listening on {local}");
    println!("powersmtp: listening on {local}");
    ready.insert(0, ("smtp", local));
    if let Some(lmtp) = lmtp {
        let local = lmtp.local_addr()?;
        ready.insert(1, ("lmtp", local));
        log::info!("LMTP listening on {local}");
        println!("powersmtp: LMTP listening on {local}");
        let service = Listener::new(&shared, &current, &tls, &proxy, Protocol::Lmtp);
        thread::Builder::new()
            .name("lmtp-accept".into())
            .spawn(move || accept::accept_loop(&lmtp, &service, &LISTENER))?;
    }
    powermail_admin::announce_ready("powersmtp", &ready);
    let service = Listener::new(&shared, &current, &tls, &proxy, Protocol::Smtp);
    accept::accept_loop(&listener, &service, &LISTENER);
    Ok(())
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// SMTP (RFC 5321).
    Smtp,
    /// LMTP (RFC 2033): LHLO, one reply per recipient after DATA.
    Lmtp,
}

/// How the SMTP and LMTP listeners make their session threads and refuse.
const LISTENER: ListenerSpec = ListenerSpec {
    thread_name: "smtp",
    stack_size_bytes: Some(256 << 10),
    accept_error_pause_ms: 10,
    refusals: Refusals {
        full: b"421 4.3.2 Too many connections, try again later\r\n",
        draining: b"421 4.3.2 Service shutting down\r\n",
    },
    idle_threads_max: 64,
};

/// One listener (SMTP or LMTP) in the shared accept loop.
struct Listener {
    shared: Arc<Shared>,
    /// The configuration new sessions get.
    current: Arc<Reloadable<Config>>,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy: Arc<ProxyPolicy>,
    protocol: Protocol,
}

impl Listener {
    fn new(
        shared: &Arc<Shared>,
        current: &Arc<Reloadable<Config>>,
        tls: &Option<Arc<rustls::ServerConfig>>,
        proxy: &Arc<ProxyPolicy>,
        protocol: Protocol,
    ) -> Arc<Listener> {
        Arc::new(Listener {
            shared: shared.clone(),
            current: current.clone(),
            tls: tls.clone(),
            proxy: proxy.clone(),
            protocol,
        })
    }
}

impl accept::Service for Listener {
    fn connections(&self) -> &dyn accept::SlotCounter {
        &self.shared.stats.connections
    }

    fn connections_max(&self) -> u64 {
        self.current.get().limits.connections_max as u64
    }

    fn draining(&self) -> bool {
        DRAINING.load(Ordering::SeqCst)
    }

    fn proxy(&self) -> &ProxyPolicy {
        &self.proxy
    }

    fn count(&self, event: Event) {
        let stats = &self.shared.stats;
        match event {
            Event::RefusedDraining | Event::RefusedFull => {
                stats
                    .counters
                    .sessions_refused
                    .fetch_add(1, Ordering::Relaxed);
            }
            Event::Admitted => {
                stats.counters.sessions.fetch_add(1, Ordering::Relaxed);
            }
            Event::ProxyRefused => {
                stats.counters.proxy_refused.fetch_add(1, Ordering::Relaxed);
            }
            Event::Accepted => {}
        }
    }

    fn serve(self: &Arc<Self>, stream: TcpStream, ends: Endpoints, _started: Instant) {
        let cfg = self.current.get();
        let ip = ends.client.ip().to_string();
        if let Err(e) = serve(stream, &self.shared, &cfg, &self.tls, self.protocol, &ip) {
            log::debug!("session ended: {e}");
        }
    }
}

fn serve(
    stream: TcpStream,
    shared: &Arc<Shared>,
    cfg: &Config,
    tls: &Option<Arc<rustls::ServerConfig>>,
    protocol: Protocol,
    ip: &str,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut delivery = BackendDelivery::new(shared.clone(), ip);
    let mut session = match protocol {
        Protocol::Smtp => Session::new(&cfg.hostname, ip, cfg.limits.session()),
        Protocol::Lmtp => Session::new_lmtp(&cfg.hostname, ip, cfg.limits.session()),
    };
    if tls.is_some() {
        session.offer_starttls();
    }
    let mut out = Vec::with_capacity(4096);
    session.greeting(&mut delivery, &mut out);
    // Plain TCP is served through a borrow (no descriptor duplicated per
    // connection); STARTTLS takes its own below.
    let mut plain = &stream;
    plain.write_all_by(&out, Instant::now() + cfg.limits.command_timeout())?;
    let mut c = Conversation {
        session,
        delivery,
        buf: take_read_buffer(),
        out,
        cfg,
        tcp: &stream,
        shared: shared.clone(),
    };
    if c.run(&mut plain)? != Flow::StartTls {
        return Ok(());
    }
    // `run` left the send time-out at what remained of the last reply's
    // deadline: the handshake gets the full one again.
    stream.set_write_timeout(Some(cfg.limits.command_timeout()))?;
    let Some(tls) = tls.clone() else {
        // STARTTLS is only offered with a certificate.
        return Ok(());
    };
    let mut secure = match powermail_frontend::tls::upgrade(tls, stream.try_clone()?) {
        Ok(secure) => secure,
        Err(e) => {
            c.session.lost(&mut c.delivery);
            return Err(e);
        }
    };
    c.session.tls_started();
    c.run(&mut secure).map(drop)
}

/// The read-feed-write loop of one session, over plain TCP or TLS.
struct Conversation<'a> {
    session: Session,
    delivery: BackendDelivery,
    buf: Vec<u8>,
    out: Vec<u8>,
    cfg: &'a Config,
    /// The socket underneath, for time-outs and shutdown.
    tcp: &'a TcpStream,
    /// What every session shares (counters).
    shared: Arc<Shared>,
}

impl Drop for Conversation<'_> {
    /// Gives the read buffer back to the thread for its next session.
    fn drop(&mut self) {
        READ_BUFFER.set(std::mem::take(&mut self.buf));
    }
}

impl Conversation<'_> {
    /// Runs until the session closes (`Close`) or asks for TLS (`StartTls`).
    /// The replies to each read of input must all be written within
    /// `command_timeout_ms` of their start, however slowly the client reads.
    fn run<S: Read + DeadlineWrite>(&mut self, stream: &mut S) -> io::Result<Flow> {
        let limits = &self.cfg.limits;
        let mut first = true;
        // The socket's read time-out, set only when it changes (not a
        // setsockopt per read: a sender of small segments makes many reads).
        let mut read_timeout = None;
        loop {
            self.out.clear();
            let timeout = if self.session.in_data() {
                limits.data_timeout()
            } else {
                limits.command_timeout()
            };
            // Short waits, so a SIGTERM reaches an idle session quickly.
            let wanted = Some(timeout.min(DRAIN_POLL));
            if read_timeout != wanted {
                self.tcp.set_read_timeout(wanted)?;
                read_timeout = wanted;
            }
            let waiting = Instant::now();
            let read = loop {
                if DRAINING.load(Ordering::SeqCst) && !self.session.in_transaction() {
                    return self.stop(stream);
                }
                match stream.read(&mut self.buf) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) && waiting.elapsed() < timeout => {}
                    other => break other,
                }
            };
            let n = match read {
                Ok(0) => {
                    self.session.lost(&mut self.delivery);
                    return Ok(Flow::Close);
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.session.timed_out(&mut self.delivery, &mut self.out);
                    let deadline = Instant::now() + limits.command_timeout();
                    let _ = stream.write_all_by(&self.out, deadline);
                    return Ok(Flow::Close);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.session.lost(&mut self.delivery);
                    return Err(e);
                }
            };
            if std::mem::take(&mut first) && proxy::looks_like_header(&self.buf[..n]) {
                // A trusted balancer's header was read before the greeting:
                // this one comes from a source that may not choose its address.
                let stats = &self.shared.stats;
                stats.counters.proxy_refused.fetch_add(1, Ordering::Relaxed);
                log::warn!("connection refused: PROXY header from an untrusted source");
                let refusal = b"421 4.7.0 PROXY header not accepted from this address\r\n";
                let _ = stream.write_all_by(refusal, Instant::now() + limits.command_timeout());
                self.session.lost(&mut self.delivery);
                let _ = self.tcp.shutdown(Shutdown::Both);
                return Ok(Flow::Close);
            }
            let flow = self
                .session
                .feed(&self.buf[..n], &mut self.delivery, &mut self.out);
            let deadline = Instant::now() + limits.command_timeout();
            if let Err(e) = stream.write_all_by(&self.out, deadline) {
                self.session.lost(&mut self.delivery);
                return Err(e);
            }
            match flow {
                Flow::Continue if DRAINING.load(Ordering::SeqCst) => {
                    if !self.session.in_transaction() {
                        return self.stop(stream);
                    }
                }
                Flow::Continue => {}
                Flow::Close => {
                    let _ = self.tcp.shutdown(Shutdown::Both);
                    return Ok(Flow::Close);
                }
                Flow::StartTls => return Ok(Flow::StartTls),
            }
        }
    }
}

impl Conversation<'_> {
    /// The server is stopping and this session has no open transaction:
    /// `421 4.3.2`, then close.
    fn stop<S: Read + DeadlineWrite>(&mut self, stream: &mut S) -> io::Result<Flow> {
        self.out.clear();
        self.session
            .shutting_down(&mut self.delivery, &mut self.out);
        let deadline = Instant::now() + self.cfg.limits.command_timeout();
        let _ = stream.write_all_by(&self.out, deadline);
        let _ = self.tcp.shutdown(Shutdown::Both);
        Ok(Flow::Close)
    }
}

/// The admin port's view of this process.
struct Admin {
    shared: Arc<Shared>,
    /// The configuration new sessions get.
    current: Arc<Reloadable<Config>>,
    /// The file it is re-read from.
    path: Option<PathBuf>,
}

/// Top-level keys whose changes a reload applies (to new sessions).
const RELOADABLE: &[&str] = &["limits"];

impl Admin {
    /// Re-reads the configuration file and applies its `[limits]` to new sessions.
    /// A file that does not parse changes nothing.
    fn reload(&self) -> Result<String, String> {
        reload_file(self.path.as_deref(), Config::parse, |new: Config| {
            let old = self.current.get();
            let split = split_live(changes(&old.public_json(), &new.public_json()), RELOADABLE);
            let mut next = (*old).clone();
            next.limits = new.limits;
            self.current.set(next);
            split
        })
    }
}

impl Admin {
    /// Everything `/stats` and `/metrics` show, read once.
    fn report(&self) -> Report {
        let cache = self.shared.userbase.stats();
        report(
            &self.shared.stats,
            &self.shared.undo,
            cache,
            self.shared
                .cluster
                .reports("1 when the backend is up and writable", |h| {
                    matches!(h, powermail_frontend::Health::Up)
                }),
        )
    }
}

/// The report of a powersmtp with these `stats`, undo journal, userbase cache
/// figures and backends.
fn report(
    stats: &Stats,
    undo: &Undo,
    cache: powermail_userbase::CacheStats,
    backends: Vec<BackendReport>,
) -> Report {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut metrics = stats.counters.metrics();
    for (i, class) in REPLY_CLASSES.iter().enumerate() {
        metrics.push(
            Metric::counter("replies", "replies by class", l(&stats.replies[i]))
                .labelled("class", class),
        );
    }
    metrics.extend([
        Metric::counter(
            "undo_journaled",
            "deletions of refused messages' copies recorded in the undo journal",
            l(&undo.journaled),
        ),
        Metric::counter(
            "undo_acknowledged",
            "recorded deletions acknowledged by a backend (at once or replayed)",
            l(&undo.acknowledged),
        ),
        Metric::counter(
            "userbase_cache_hits",
            "userbase answers served from memory",
            cache.hits,
        ),
        Metric::counter(
            "userbase_cache_misses",
            "userbase answers that went to the database (failures included)",
            cache.misses,
        ),
        Metric::gauge(
            "connections",
            "SMTP connections open",
            stats.connections.load(Ordering::Relaxed) as u64,
        ),
        Metric::gauge(
            "undo_owed",
            "deletions of refused messages' copies not yet acknowledged by a backend",
            undo.owed_count() as u64,
        ),
    ]);
    Report {
        daemon: "powersmtp",
        version: env!("CARGO_PKG_VERSION"),
        metrics,
        latency: stats
            .latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        latency_family: "powersmtp_latency_seconds",
        backend_prefix: "powersmtp_backend",
        backends,
    }
}

impl AdminHandler for Admin {
    fn stats(&self) -> serde_json::Value {
        self.report().stats()
    }

    fn metrics(&self) -> String {
        powermail_frontend::cluster::frontend_metrics(&self.report())
    }

    fn config(&self) -> serde_json::Value {
        self.current.get().public_json()
    }

    fn control(&self, action: &str, params: &[(String, String)]) -> Result<String, String> {
        if let Some(result) = self.shared.cluster.control(action, params) {
            return result;
        }
        match action {
            "reload" => self.reload(),
            _ => Err(format!(
                "unknown action {action:?} (loglevel, disable, enable, reload)"
            )),
        }
    }
}

#[cfg(test)]
mod report_tests {
    use super::*;
    use powermail_admin::{families_in_stats, families_in_text};

    /// Every counter and gauge in `/stats` is in `/metrics` and vice versa (the
    /// backend health gauges, written from the backends' state fields, aside),
    /// under the names dashboards already use.
    #[test]
    fn stats_and_metrics_name_the_same_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal =
            Journal::open_named(dir.path(), "undo.journal", "undo.lock").expect("journal");
        let undo = Undo::new(journal);
        let stats = Stats::default();
        stats.counters.messages.fetch_add(2, Ordering::Relaxed);
        stats.replies[3].fetch_add(1, Ordering::Relaxed);
        let cache = powermail_userbase::CacheStats {
            hits: 4,
            misses: 5,
            login_hits: 0,
        };
        let r = report(&stats, &undo, cache, Vec::new());
        let json = r.stats();
        assert_eq!(json["daemon"], "powersmtp");
        assert_eq!(json["counters"]["messages"], 2);
        assert_eq!(json["counters"]["replies"]["5xx"], 1);
        assert_eq!(json["counters"]["userbase_cache_hits"], 4);
        assert_eq!(json["gauges"]["undo_owed"], 0);
        assert!(json["latency"].is_object(), "{json}");
        let text = r.prometheus();
        let from_text = families_in_text(&text);
        assert_eq!(
            families_in_stats(&json, "powersmtp", "powersmtp_backend"),
            from_text
        );
        for kept in [
            "powersmtp_sessions_total",
            "powersmtp_sessions_refused_total",
            "powersmtp_proxy_refused_total",
            "powersmtp_messages_total",
            "powersmtp_messages_failed_total",
            "powersmtp_recipients_total",
            "powersmtp_bytes_total",
            "powersmtp_replies_total",
            "powersmtp_undo_owed",
            "powersmtp_connections",
        ] {
            assert!(from_text.contains(kept), "{kept} missing: {text}");
        }
        assert!(
            text.contains("powersmtp_replies_total{class=\"5xx\"} 1\n"),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_read_buffer_for_its_next_session() {
        let first = take_read_buffer();
        assert_eq!(first.len(), READ_BUFFER_BYTES);
        let at = first.as_ptr();
        READ_BUFFER.set(first);
        let again = take_read_buffer();
        assert_eq!(again.as_ptr(), at, "the same allocation, not a new one");
        // Taken, not shared: a second session on this thread gets its own.
        let other = take_read_buffer();
        assert_ne!(other.as_ptr(), at);
        assert_eq!(other.len(), READ_BUFFER_BYTES);
    }
}
