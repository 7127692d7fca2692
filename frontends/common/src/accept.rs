//! The threaded accept loop powersmtp and powerpop share.
//!
//! One std thread per connection, at most [`Service::connections_max`] at once. Session
//! threads accept their own connections (leader/follower): each waits in `accept(2)` on
//! the listening socket, serves the connection it got on itself, then waits in `accept`
//! again (at most [`ListenerSpec::idle_threads_max`] wait; the others end, as does a
//! thread that waited [`IDLE_THREAD_MS`] in vain while another waits too). So a
//! connection wakes one thread, and costs a thread start only when no other thread waits
//! to accept the next one: sessions stay synchronous, one per thread. Each admitted
//! connection holds a [`Slot`]: an RAII guard that gives its place back when it is
//! dropped — when the session ends, and when it panics (the guard is dropped while the
//! session unwinds; the thread then goes on). Beyond the limit, and while the daemon
//! drains after `SIGTERM`, a connection gets the daemon's own refusal bytes
//! ([`Refusals`]) and is closed. A connection first passes the PROXY protocol stage
//! ([`ProxyPolicy::accept`]), then the daemon's [`Service::serve`] runs.
//!
//! [`drain`] is the shared half of a graceful stop: no new sessions, then wait up to the
//! grace period for the open ones.

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::proxy::{Endpoints, ProxyPolicy};

/// How long a refusal may take to write before the connection is dropped anyway.
const REFUSAL_WRITE_TIMEOUT_MS: u64 = 1_000;

/// How long a session thread whose session ended waits for the next connection.
pub const IDLE_THREAD_MS: u64 = 30_000;

/// How often [`drain`] looks at the count of open connections.
const DRAIN_POLL_MS: u64 = 20;

/// A counter of open connections (each daemon keeps its own in its stats).
pub trait SlotCounter: Send + Sync {
    /// Adds one; returns the count before.
    fn take(&self) -> u64;
    /// Takes one away.
    fn give_back(&self);
    /// The count now.
    fn open(&self) -> u64;
}

impl SlotCounter for AtomicU64 {
    fn take(&self) -> u64 {
        self.fetch_add(1, Ordering::SeqCst)
    }
    fn give_back(&self) {
        self.fetch_sub(1, Ordering::SeqCst);
    }
    fn open(&self) -> u64 {
        self.load(Ordering::SeqCst)
    }
}

impl SlotCounter for AtomicUsize {
    fn take(&self) -> u64 {
        self.fetch_add(1, Ordering::SeqCst) as u64
    }
    fn give_back(&self) {
        self.fetch_sub(1, Ordering::SeqCst);
    }
    fn open(&self) -> u64 {
        self.load(Ordering::SeqCst) as u64
    }
}

/// What happened to an accepted connection, for the daemon's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Accepted while not draining (before the limit is checked).
    Accepted,
    /// Refused: the daemon is draining.
    RefusedDraining,
    /// Refused: `connections_max` connections are open.
    RefusedFull,
    /// Within the limit: it gets a session thread.
    Admitted,
    /// Refused at the PROXY stage (missing, malformed or slow header from a balancer).
    ProxyRefused,
}

/// The bytes a daemon writes to a connection it refuses before its session starts.
#[derive(Debug, Clone, Copy)]
pub struct Refusals {
    /// Over `connections_max`.
    pub full: &'static [u8],
    /// While draining after `SIGTERM`.
    pub draining: &'static [u8],
}

/// One listener's daemon-specific part.
pub trait Service: Send + Sync + Sized + 'static {
    /// The process's count of open connections (shared by all its listeners).
    fn connections(&self) -> &dyn SlotCounter;
    /// The limit new connections are held to now (it may change on reload).
    fn connections_max(&self) -> u64;
    /// Whether the daemon is draining (see [`drain`]).
    fn draining(&self) -> bool;
    /// Who may send a PROXY header.
    fn proxy(&self) -> &ProxyPolicy;
    /// Counts `event` (the daemon decides which counters it has).
    fn count(&self, event: Event);
    /// Serves one admitted connection to its end, on its own thread; `ends` are its
    /// real endpoints (from a PROXY header or the socket), `started` when its thread
    /// began (before the PROXY stage).
    fn serve(self: &Arc<Self>, stream: TcpStream, ends: Endpoints, started: Instant);
}

/// How a listener's threads are made and what its refusals say.
#[derive(Debug, Clone)]
pub struct ListenerSpec {
    /// The name of each session thread.
    pub thread_name: &'static str,
    /// Each session thread's stack (none: the std default).
    pub stack_size_bytes: Option<usize>,
    /// Pause after a failed `accept` (out of file descriptors and the like), so the
    /// loop does not spin.
    pub accept_error_pause_ms: u64,
    /// What refused connections are told.
    pub refusals: Refusals,
    /// Session threads at most kept waiting for the next connection (0: each
    /// session's thread exits with it; one thread always waits in `accept`).
    pub idle_threads_max: usize,
}

/// The session threads of one listener.
///
/// Each thread accepts its own connections (leader/follower): it waits in `accept(2)`
/// on the listening socket, serves what it accepted on itself, and goes back to
/// `accept`. So a connection is not handed from an accept thread to a session thread
/// (no wake-up of a second thread, no channel) — the kernel wakes one waiting thread.
///
/// Invariant: while the listener lives, at least one thread waits in `accept` (or is
/// about to). A thread that accepts an admitted connection when no other waits starts
/// one first; a thread whose session ended goes back only while fewer than
/// `idle_threads_max` (at least one) wait, else it ends; a thread that waited
/// [`IDLE_THREAD_MS`] in vain ends only if it is not the last one waiting.
struct Threads {
    /// Threads waiting in `accept`, or started to.
    idle: AtomicUsize,
    /// Threads started so far (the tests count them).
    started: AtomicUsize,
}

impl Threads {
    fn new() -> Arc<Threads> {
        Arc::new(Threads {
            idle: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
        })
    }

    /// Starts one more thread waiting in `accept`. Err when none could be started.
    fn start<S: Service>(
        self: &Arc<Self>,
        listener: &Arc<TcpListener>,
        service: &Arc<S>,
        spec: &ListenerSpec,
    ) -> Result<(), std::io::Error> {
        let mut builder = thread::Builder::new().name(spec.thread_name.into());
        if let Some(size) = spec.stack_size_bytes {
            builder = builder.stack_size(size);
        }
        self.idle.fetch_add(1, Ordering::SeqCst);
        let (threads, listener, service, spec2) = (
            self.clone(),
            listener.clone(),
            service.clone(),
            spec.clone(),
        );
        match builder.spawn(move || threads.accept_and_serve(&listener, &service, &spec2)) {
            Ok(_) => {
                self.started.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                self.idle.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// A session thread's life: accept, serve, and again, until it is not needed.
    /// Counted in `idle` when it starts.
    fn accept_and_serve<S: Service>(
        self: &Arc<Self>,
        listener: &Arc<TcpListener>,
        service: &Arc<S>,
        spec: &ListenerSpec,
    ) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let others = self.idle.fetch_sub(1, Ordering::SeqCst) - 1;
                    if let Some((stream, slot)) = admit(service, stream, &spec.refusals) {
                        if others == 0 {
                            if let Err(e) = self.start(listener, service, spec) {
                                // This thread accepts again after its session.
                                log::error!("cannot start a session thread: {e}");
                            }
                        }
                        // A panic in the session drops the slot while it unwinds; the
                        // thread then goes on, so the listener never lacks one.
                        let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            serve_one(service, stream, slot)
                        }));
                        if served.is_err() {
                            log::error!("a session panicked; its connection is closed");
                        }
                    }
                    let back = self
                        .idle
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n < spec.idle_threads_max.max(1)).then_some(n + 1)
                        });
                    if back.is_err() {
                        return;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // Waited IDLE_THREAD_MS: leave, unless this is the last thread waiting.
                    let left = self
                        .idle
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n > 1).then(|| n - 1)
                        });
                    if left.is_ok() {
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("accept: {e}");
                    thread::sleep(Duration::from_millis(spec.accept_error_pause_ms));
                }
            }
        }
    }
}

/// A place among the open connections; given back when dropped (panics included).
#[must_use = "the slot is given back as soon as it is dropped"]
pub struct Slot<S: Service> {
    service: Arc<S>,
}

impl<S: Service> Drop for Slot<S> {
    fn drop(&mut self) {
        self.service.connections().give_back();
    }
}

impl<S: Service> std::fmt::Debug for Slot<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

/// Takes a slot for a new connection, or says why not. Counts the events; a refused
/// connection is told why ([`Refusals`]) and closed.
pub fn admit<S: Service>(
    service: &Arc<S>,
    stream: TcpStream,
    refusals: &Refusals,
) -> Option<(TcpStream, Slot<S>)> {
    if service.draining() {
        service.count(Event::RefusedDraining);
        refuse(stream, refusals.draining);
        return None;
    }
    service.count(Event::Accepted);
    let open = service.connections().take();
    let slot = Slot {
        service: service.clone(),
    };
    if open >= service.connections_max() {
        drop(slot);
        service.count(Event::RefusedFull);
        refuse(stream, refusals.full);
        return None;
    }
    service.count(Event::Admitted);
    Some((stream, slot))
}

/// Writes `reply` (waiting at most a second) and closes.
pub fn refuse(mut stream: TcpStream, reply: &[u8]) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(REFUSAL_WRITE_TIMEOUT_MS)));
    let _ = stream.write_all(reply);
    let _ = stream.shutdown(Shutdown::Both);
}

/// Serves `listener` until the process ends: session threads accept and serve its
/// connections (see [`Threads`]), each admitted one holding its [`Slot`]. The calling
/// thread only starts the first of them, then waits.
pub fn accept_loop<S: Service>(listener: &TcpListener, service: &Arc<S>, spec: &ListenerSpec) {
    accept_with(listener, service, spec, &Threads::new());
}

/// [`accept_loop`] with its session threads given (the tests watch them).
fn accept_with<S: Service>(
    listener: &TcpListener,
    service: &Arc<S>,
    spec: &ListenerSpec,
    threads: &Arc<Threads>,
) {
    let retry = Duration::from_millis(spec.accept_error_pause_ms.max(100));
    let listener = loop {
        match share(listener) {
            Ok(l) => break Arc::new(l),
            Err(e) => {
                log::error!("cannot share the listening socket: {e}");
                thread::sleep(retry);
            }
        }
    };
    while let Err(e) = threads.start(&listener, service, spec) {
        log::error!("cannot start a session thread: {e}");
        thread::sleep(retry);
    }
    loop {
        thread::park();
    }
}

/// A handle on `listener` for the session threads, its `accept` timing out after
/// [`IDLE_THREAD_MS`] (`SO_RCVTIMEO`), so that waiting threads beyond the first end.
fn share(listener: &TcpListener) -> std::io::Result<TcpListener> {
    let shared = listener.try_clone()?;
    socket2::SockRef::from(&shared)
        .set_read_timeout(Some(Duration::from_millis(IDLE_THREAD_MS)))?;
    Ok(shared)
}

/// Runs an admitted connection's session on this thread: the PROXY stage, then
/// [`Service::serve`]; the slot is given back when the session ends, however it ends.
fn serve_one<S: Service>(service: &Arc<S>, stream: TcpStream, slot: Slot<S>) {
    let started = Instant::now();
    match service.proxy().accept(&stream) {
        Ok(ends) => service.serve(stream, ends, started),
        Err(e) => {
            service.count(Event::ProxyRefused);
            log::warn!("connection refused: {e}");
        }
    }
    drop(slot);
}

/// The first half of a graceful stop: sets `draining` (new connections are refused),
/// tells systemd `STOPPING=1` and logs how many sessions are open; returns that count.
pub fn begin_drain(draining: &AtomicBool, open: &dyn SlotCounter, grace: Duration) -> u64 {
    draining.store(true, Ordering::SeqCst);
    let _ = powermail_admin::systemd::notify("STOPPING=1");
    let now = open.open();
    log::warn!(
        "SIGTERM: no new sessions; {now} open get up to {} ms to finish",
        grace.as_millis()
    );
    now
}

/// The second half: waits up to `grace` for the open sessions to end. Returns how many
/// are left (logged as cut off, with `consequence` saying what that means for them).
pub fn wait_drained(open: &dyn SlotCounter, grace: Duration, consequence: &str) -> u64 {
    let deadline = Instant::now() + grace;
    while open.open() > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(DRAIN_POLL_MS));
    }
    let left = open.open();
    if left > 0 {
        log::warn!("grace period over: {left} sessions cut off ({consequence})");
    }
    log::info!("stopped");
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::SocketAddr;

    /// A service whose sessions panic (or wait for the client to close).
    struct Panicky {
        open: AtomicU64,
        max: u64,
        draining: AtomicBool,
        proxy: ProxyPolicy,
        refused_full: AtomicU64,
        refused_draining: AtomicU64,
        served: AtomicU64,
        /// Whether a session panics once its client sends a byte (else it just ends).
        panics: bool,
        /// The thread each session ran on, in order.
        threads: std::sync::Mutex<Vec<thread::ThreadId>>,
    }

    impl Panicky {
        fn new(max: u64) -> Arc<Panicky> {
            Arc::new(Panicky {
                open: AtomicU64::new(0),
                max,
                draining: AtomicBool::new(false),
                proxy: ProxyPolicy::default(),
                refused_full: AtomicU64::new(0),
                refused_draining: AtomicU64::new(0),
                served: AtomicU64::new(0),
                panics: true,
                threads: std::sync::Mutex::new(Vec::new()),
            })
        }

        fn calm(max: u64) -> Arc<Panicky> {
            let mut service = Arc::into_inner(Panicky::new(max)).expect("one owner");
            service.panics = false;
            Arc::new(service)
        }
    }

    impl Service for Panicky {
        fn connections(&self) -> &dyn SlotCounter {
            &self.open
        }
        fn connections_max(&self) -> u64 {
            self.max
        }
        fn draining(&self) -> bool {
            self.draining.load(Ordering::SeqCst)
        }
        fn proxy(&self) -> &ProxyPolicy {
            &self.proxy
        }
        fn count(&self, event: Event) {
            match event {
                Event::RefusedFull => self.refused_full.fetch_add(1, Ordering::SeqCst),
                Event::RefusedDraining => self.refused_draining.fetch_add(1, Ordering::SeqCst),
                _ => 0,
            };
        }
        fn serve(self: &Arc<Self>, mut stream: TcpStream, _ends: Endpoints, _started: Instant) {
            if let Ok(mut threads) = self.threads.lock() {
                threads.push(thread::current().id());
            }
            self.served.fetch_add(1, Ordering::SeqCst);
            let mut byte = [0u8; 1];
            // The client sends one byte (or closes): then this session ends or panics.
            let _ = stream.read(&mut byte);
            assert!(!self.panics, "session handler panics on purpose");
        }
    }

    const SPEC: ListenerSpec = ListenerSpec {
        thread_name: "test-session",
        stack_size_bytes: Some(256 << 10),
        accept_error_pause_ms: 10,
        refusals: Refusals {
            full: b"FULL\r\n",
            draining: b"DRAINING\r\n",
        },
        idle_threads_max: 2,
    };

    fn start(service: &Arc<Panicky>) -> SocketAddr {
        start_with(service, SPEC).0
    }

    fn start_with(service: &Arc<Panicky>, spec: ListenerSpec) -> (SocketAddr, Arc<Threads>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let service = service.clone();
        let threads = Threads::new();
        let watched = threads.clone();
        thread::spawn(move || accept_with(&listener, &service, &spec, &threads));
        (addr, watched)
    }

    fn idle(threads: &Threads) -> usize {
        threads.idle.load(Ordering::SeqCst)
    }

    /// Runs `n` sessions one after another (each ends, and its thread waits, before
    /// the next connects); returns the threads they ran on.
    fn sequential_sessions(
        service: &Arc<Panicky>,
        (addr, threads): (SocketAddr, Arc<Threads>),
        idle_after: usize,
        n: u64,
    ) -> Vec<thread::ThreadId> {
        for i in 1..=n {
            let mut client = TcpStream::connect(addr).expect("connect");
            wait_for("the session", || service.served.load(Ordering::SeqCst) == i);
            client.write_all(b"x").expect("write");
            drop(client);
            wait_for("the session's end", || {
                service.open.load(Ordering::SeqCst) == 0 && idle(&threads) == idle_after
            });
        }
        service.threads.lock().expect("threads").clone()
    }

    fn started(threads: &Threads) -> usize {
        threads.started.load(Ordering::SeqCst)
    }

    #[test]
    fn ended_sessions_threads_serve_the_next_connections() {
        let service = Panicky::calm(4);
        let (addr, threads) = start_with(&service, SPEC);
        // The first session's thread started one to accept meanwhile; both wait after it.
        let ran_on = sequential_sessions(&service, (addr, threads.clone()), 2, 5);
        assert_eq!(ran_on.len(), 5);
        let distinct: std::collections::HashSet<_> = ran_on.iter().collect();
        assert!(
            distinct.len() <= 2,
            "two threads served all five sessions: {ran_on:?}"
        );
        assert_eq!(
            started(&threads),
            2,
            "no thread started after the first session"
        );
    }

    #[test]
    fn with_no_idle_threads_each_session_has_a_new_thread() {
        let service = Panicky::calm(4);
        let spec = ListenerSpec {
            idle_threads_max: 0,
            ..SPEC
        };
        // One thread always waits in accept: the one started by the last session.
        let threads = sequential_sessions(&service, start_with(&service, spec), 1, 3);
        let distinct: std::collections::HashSet<_> = threads.iter().collect();
        assert_eq!(distinct.len(), 3, "{threads:?}");
    }

    /// Sessions at once get a thread each; when they end, at most `idle_threads_max`
    /// threads stay, and they serve the next sessions.
    #[test]
    fn concurrent_sessions_and_the_idle_limit() {
        let service = Panicky::calm(8);
        let (addr, threads) = start_with(&service, SPEC);
        let clients: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        wait_for("four sessions", || {
            service.served.load(Ordering::SeqCst) == 4
        });
        let first: std::collections::HashSet<_> = service
            .threads
            .lock()
            .expect("threads")
            .iter()
            .copied()
            .collect();
        assert_eq!(first.len(), 4, "four sessions at once, four threads");
        // Each accepting thread that left none waiting started one: five in all.
        wait_for("a thread waiting to accept", || idle(&threads) == 1);
        assert_eq!(started(&threads), 5);
        drop(clients);
        wait_for("the sessions' end", || {
            service.open.load(Ordering::SeqCst) == 0 && idle(&threads) == 2
        });
        let later: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        wait_for("four more", || service.served.load(Ordering::SeqCst) == 8);
        let ran_on = service.threads.lock().expect("threads").clone();
        let distinct: std::collections::HashSet<_> = ran_on[4..].iter().collect();
        assert_eq!(
            distinct.len(),
            4,
            "four sessions at once, four threads: {ran_on:?}"
        );
        wait_for("a thread waiting to accept", || idle(&threads) == 1);
        assert_eq!(
            started(&threads),
            8,
            "idle_threads_max = 2 threads were waiting: two took sessions, three were started"
        );
        drop(later);
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_all(stream: &mut TcpStream) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let mut got = Vec::new();
        let _ = stream.read_to_end(&mut got);
        got
    }

    #[test]
    fn slot_is_given_back_after_a_panic_and_after_a_refusal() {
        let service = Panicky::new(1);
        let (addr, threads) = start_with(&service, SPEC);
        let mut first = TcpStream::connect(addr).expect("connect");
        wait_for("the first session", || {
            service.served.load(Ordering::SeqCst) == 1
        });
        assert_eq!(service.open.load(Ordering::SeqCst), 1);
        // Over the limit: refused with the daemon's bytes, and its slot given back.
        let mut second = TcpStream::connect(addr).expect("connect");
        assert_eq!(read_all(&mut second), b"FULL\r\n");
        assert_eq!(service.refused_full.load(Ordering::SeqCst), 1);
        assert_eq!(service.open.load(Ordering::SeqCst), 1);
        // The first session panics: its slot comes back all the same.
        first.write_all(b"x").expect("write");
        wait_for("the panicked session's slot", || {
            service.open.load(Ordering::SeqCst) == 0
        });
        // Its thread went on: it and the one it started wait in accept again.
        wait_for("both threads waiting", || idle(&threads) == 2);
        assert_eq!(started(&threads), 2);
        // And the place is usable again.
        let _third = TcpStream::connect(addr).expect("connect");
        wait_for("the third session", || {
            service.served.load(Ordering::SeqCst) == 2
        });
        assert_eq!(service.open.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn draining_refuses_new_connections_and_waits_for_open_ones() {
        let service = Panicky::new(4);
        let addr = start(&service);
        let mut open = TcpStream::connect(addr).expect("connect");
        wait_for("the session", || service.served.load(Ordering::SeqCst) == 1);
        let grace = Duration::from_secs(10);
        assert_eq!(begin_drain(&service.draining, &service.open, grace), 1);
        let mut late = TcpStream::connect(addr).expect("connect");
        assert_eq!(read_all(&mut late), b"DRAINING\r\n");
        assert_eq!(service.refused_draining.load(Ordering::SeqCst), 1);
        assert_eq!(service.open.load(Ordering::SeqCst), 1);
        open.write_all(b"x").expect("write");
        assert_eq!(wait_drained(&service.open, grace, "test"), 0);
    }

    #[test]
    fn the_shared_listener_times_out_accept_after_the_idle_time() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let shared = share(&listener).expect("share");
        let timeout = socket2::SockRef::from(&shared)
            .read_timeout()
            .expect("SO_RCVTIMEO");
        assert_eq!(timeout, Some(Duration::from_millis(IDLE_THREAD_MS)));
    }

    #[test]
    fn drain_reports_sessions_left_after_the_grace_period() {
        let counter = AtomicUsize::new(2);
        assert_eq!(wait_drained(&counter, Duration::ZERO, "test"), 2);
    }
}
