//! A delaying TCP proxy: this kernel has no `netem`, so added latency on a
//! path is a small user-space relay in it.
//!
//! [`DelayProxy`] accepts on a listener the caller bound (inside a network
//! namespace or not: bind it where the clients should reach it), connects
//! each client to `upstream`, and forwards both ways, holding every chunk it
//! reads for the configured one-way delay of its direction before writing it
//! on. Memory is bounded: each direction of each connection holds at most
//! [`CHUNKS_MAX`] chunks of at most [`CHUNK_BYTES`] in flight (a full queue
//! stops reading, so TCP flow control slows the sender), and at most
//! [`CONNECTIONS_MAX`] connections are relayed at once (more are closed).
//! Connections to `upstream` are made from the threads of the proxy, in the
//! network namespace of the thread that called [`DelayProxy::start`].
//! Dropping the proxy stops accepting and ends every relay within
//! [`POLL`] plus the delay.
//!
//! [`DelayProxy::blackhole`] makes the path silent, as a partition does: from
//! then on every byte read is discarded in both directions and nothing is
//! closed towards either side (no RST, no FIN); a connection accepted during
//! the silence never reaches `upstream` (as a lost SYN would not) but is kept
//! open. [`DelayProxy::heal`] forwards again (what was discarded stays lost).

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Most bytes read at once (one chunk).
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Most chunks held per direction of a connection.
pub const CHUNKS_MAX: usize = 64;
/// Most connections relayed at once.
pub const CONNECTIONS_MAX: usize = 512;
/// How often idle threads look at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);
/// Time-out of connecting to `upstream`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The one-way delays of a [`DelayProxy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delays {
    /// Added to what the client sends, before `upstream` sees it.
    pub to_upstream: Duration,
    /// Added to what `upstream` answers, before the client sees it.
    pub to_client: Duration,
}

impl Delays {
    /// The same delay both ways (the round trip grows by twice `one_way`).
    pub fn both(one_way: Duration) -> Delays {
        Delays {
            to_upstream: one_way,
            to_client: one_way,
        }
    }
}

/// What the proxy has done so far.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    open: AtomicUsize,
    bytes: AtomicU64,
}

/// A running delaying proxy; see the module documentation.
#[derive(Debug)]
pub struct DelayProxy {
    /// Where clients connect (the listener's address).
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub upstream: SocketAddr,
    stop: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    counters: Arc<Counters>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayProxy {
    /// Starts relaying connections accepted on `listener` to `upstream` with
    /// `delays` added.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        delays: Delays,
    ) -> io::Result<DelayProxy> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let acceptor = {
            let flags = Flags {
                stop: stop.clone(),
                silent: silent.clone(),
            };
            let counters = counters.clone();
            thread::Builder::new()
                .name(format!("delay-proxy-{}", addr.port()))
                .spawn(move || accept_loop(&listener, upstream, delays, &flags, &counters))?
        };
        Ok(DelayProxy {
            addr,
            upstream,
            stop,
            silent,
            counters,
            acceptor: Some(acceptor),
        })
    }

    /// The path goes silent: everything is discarded, nothing closed (see
    /// the module documentation).
    pub fn blackhole(&self) {
        self.silent.store(true, Relaxed);
    }

    /// Ends a [`DelayProxy::blackhole`]: bytes read from now on are forwarded.
    pub fn heal(&self) {
        self.silent.store(false, Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Relaxed)
    }

    /// Connections refused (over [`CONNECTIONS_MAX`], or `upstream` did not answer).
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Relaxed)
    }

    /// Connections being relayed now.
    pub fn open(&self) -> usize {
        self.counters.open.load(Relaxed)
    }

    /// Bytes forwarded, both ways together.
    pub fn bytes(&self) -> u64 {
        self.counters.bytes.load(Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// The switches every thread of one proxy watches.
#[derive(Debug, Clone)]
struct Flags {
    /// The proxy is dropped: every thread ends.
    stop: Arc<AtomicBool>,
    /// [`DelayProxy::blackhole`]: discard, close nothing.
    silent: Arc<AtomicBool>,
}

fn accept_loop(
    listener: &TcpListener,
    upstream: SocketAddr,
    delays: Delays,
    flags: &Flags,
    counters: &Arc<Counters>,
) {
    while !flags.stop.load(Relaxed) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        counters.accepted.fetch_add(1, Relaxed);
        if counters.open.load(Relaxed) >= CONNECTIONS_MAX {
            counters.refused.fetch_add(1, Relaxed);
            continue;
        }
        counters.open.fetch_add(1, Relaxed);
        let (flags_c, counters_c) = (flags.clone(), counters.clone());
        let spawned = thread::Builder::new()
            .name("delay-proxy-conn".into())
            .spawn(move || {
                relay(client, upstream, delays, &flags_c, &counters_c);
                counters_c.open.fetch_sub(1, Relaxed);
            });
        if spawned.is_err() {
            // The client socket went with the closure: it is closed.
            counters.open.fetch_sub(1, Relaxed);
            counters.refused.fetch_add(1, Relaxed);
        }
    }
}

/// One connection: connects upstream, then pumps both directions until both
/// are closed. During a silence it never connects: it holds the client open,
/// reading and discarding, until the client closes or the proxy stops.
fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    delays: Delays,
    flags: &Flags,
    counters: &Arc<Counters>,
) {
    if flags.silent.load(Relaxed) {
        discard(client, &flags.stop);
        return;
    }
    let stop = &flags.stop;
    let server = match TcpStream::connect_timeout(&upstream, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(_) => {
            counters.refused.fetch_add(1, Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let pumps = [
        (client.try_clone(), server.try_clone(), delays.to_upstream),
        (server.try_clone(), client.try_clone(), delays.to_client),
    ];
    let mut threads = Vec::with_capacity(4);
    for (from, to, delay) in pumps {
        let (Ok(from), Ok(to)) = (from, to) else {
            break;
        };
        let (tx, rx) = sync_channel::<Chunk>(CHUNKS_MAX);
        let (stop_r, flags_w, c) = (stop.clone(), flags.clone(), counters.clone());
        threads.push(thread::spawn(move || read_side(from, delay, &tx, &stop_r)));
        threads.push(thread::spawn(move || write_side(to, &rx, &flags_w, &c)));
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
}

/// Reads and drops what `from` sends until it closes or `stop` is set.
fn discard(mut from: TcpStream, stop: &AtomicBool) {
    if from.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Relaxed) {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A chunk and when it may be written; empty data is the end of the stream.
type Chunk = (Instant, Vec<u8>);

fn read_side(mut from: TcpStream, delay: Duration, tx: &SyncSender<Chunk>, stop: &AtomicBool) {
    if from.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Relaxed) {
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        let due = Instant::now() + delay;
        // A full queue blocks here: TCP flow control slows the sender.
        if tx.send((due, buf[..n].to_vec())).is_err() || n == 0 {
            return;
        }
    }
}

fn write_side(mut to: TcpStream, rx: &Receiver<Chunk>, flags: &Flags, counters: &Counters) {
    loop {
        let (due, data) = match rx.recv_timeout(POLL) {
            Ok(chunk) => chunk,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if flags.stop.load(Relaxed) {
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if flags.silent.load(Relaxed) {
            // Silence: nothing passes, not even the end of the stream (a
            // partition sends no FIN).
            continue;
        }
        if data.is_empty() {
            // The sender closed its side: pass the half-close on.
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if to.write_all(&data).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        counters.bytes.fetch_add(data.len() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
        let addr = l.local_addr().expect("addr");
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut s = s;
                    let mut r = s.try_clone().expect("clone");
                    let _ = io::copy(&mut r, &mut s);
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn proxy(delays: Delays) -> DelayProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        DelayProxy::start(l, echo(), delays).expect("start")
    }

    #[test]
    fn adds_at_least_the_delay_each_way() {
        let p = proxy(Delays {
            to_upstream: Duration::from_millis(60),
            to_client: Duration::from_millis(40),
        });
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        for round in 0..3u8 {
            let t = Instant::now();
            s.write_all(&[round; 10]).expect("write");
            let mut got = [0u8; 10];
            s.read_exact(&mut got).expect("echo");
            assert_eq!(got, [round; 10]);
            let rtt = t.elapsed();
            assert!(rtt >= Duration::from_millis(100), "round {round}: {rtt:?}");
        }
        assert_eq!(p.accepted(), 1);
    }

    #[test]
    fn forwards_every_byte_in_order_and_the_close() {
        let p = proxy(Delays::both(Duration::from_millis(5)));
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        // More than the queues hold (2 x 64 x 16 KiB), in odd-sized writes.
        let sent: Vec<u8> = (0..5_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut w = s.try_clone().expect("clone");
        let data = sent.clone();
        let writer = thread::spawn(move || {
            for part in data.chunks(7_001) {
                w.write_all(part).expect("write");
            }
            w.shutdown(Shutdown::Write).expect("half close");
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read to the echo's close");
        writer.join().expect("writer");
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
        assert_eq!(p.bytes(), 2 * sent.len() as u64);
    }

    #[test]
    fn a_blackhole_discards_both_ways_and_closes_nothing_until_healed() {
        let p = proxy(Delays::both(Duration::ZERO));
        let quiet = Duration::from_millis(300);
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut got = [0u8; 4];
        s.write_all(b"ping").expect("write");
        s.read_exact(&mut got).expect("echo before the cut");
        assert_eq!(&got, b"ping");
        p.blackhole();
        s.set_read_timeout(Some(quiet)).expect("timeout");
        s.write_all(b"lost").expect("write into the silence");
        let e = s
            .read(&mut got)
            .expect_err("nothing comes back, not even a close");
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e:?}"
        );
        // A connection made during the silence is accepted and held, silent.
        let mut late = TcpStream::connect(p.addr).expect("connect during the cut");
        late.set_read_timeout(Some(quiet)).expect("timeout");
        late.write_all(b"late").expect("write");
        let e = late
            .read(&mut got)
            .expect_err("no answer on a new connection");
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e:?}"
        );
        p.heal();
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"back").expect("write after the heal");
        s.read_exact(&mut got).expect("echo after the heal");
        assert_eq!(&got, b"back", "what was sent in the silence stays lost");
    }

    #[test]
    fn an_unreachable_upstream_closes_the_client() {
        // A port nobody listens on.
        let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = dead.local_addr().expect("addr");
        drop(dead);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let p = DelayProxy::start(l, upstream, Delays::both(Duration::ZERO)).expect("start");
        let mut s = TcpStream::connect(p.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed, nothing forwarded");
        assert_eq!(p.refused(), 1);
    }
}
