//! Graceful stop of the real pplistener binary (SIGTERM / SIGINT): a PUT in
//! flight completes and is durable, new connections are refused on every
//! backend, idle connections do not hold the exit, and the grace period ends
//! a stuck request without leaving anything half-visible.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{body, Listener, TIMEOUT};
use powermail_proto::{MailboxName, MessageId};

fn mb(s: &str) -> MailboxName {
    MailboxName::parse(s).unwrap()
}

fn id(s: &str) -> MessageId {
    MessageId::parse(s).unwrap()
}

/// Waits (bounded) until connecting to `addr` is refused by the kernel.
/// Connections that still get in (accepted just before the drain) are dropped.
fn wait_until_refused(addr: SocketAddr) {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // A handshake caught by the listener's close: not yet refused.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => panic!("connect {addr}: unexpected error {e}"),
            Ok(s) => drop(s),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{addr} still accepts connections after SIGTERM");
}

/// Waits (bounded) until the server has the body of a PUT open on `backend`.
fn wait_for_body(l: &Listener, backend: usize) {
    for _ in 0..3000 {
        if l.bodies_being_written(backend) == 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("backend {backend} never started writing the body");
}

#[test]
fn sigterm_lets_a_put_in_flight_finish_and_refuses_new_connections() {
    let mut l = Listener::start(2, "shutdown_grace_ms = 600000");
    let boxes = [mb("a@x.org"), mb("b@x.org")];
    let payload = body(7, 3 << 20);
    let mut c = l.conn(1);
    c.put_begin(&id("inflight"), &boxes).unwrap();
    // Chunks of at most 1 MiB (`limits.chunk_max_bytes`).
    for chunk in payload[..2 << 20].chunks(1 << 20) {
        c.put_chunk(chunk).unwrap();
    }
    wait_for_body(&l, 1);
    let mut idle = l.raw(0);
    l.signal(libc::SIGTERM);
    // Every backend stops accepting, while the PUT keeps the process alive.
    for addr in l.backends.clone() {
        wait_until_refused(addr);
    }
    assert!(idle.closed(), "an idle connection is closed by the drain");
    assert!(
        l.wait_exit(Duration::ZERO).is_none(),
        "the PUT in flight holds the exit"
    );
    for chunk in payload[2 << 20..].chunks(1 << 20) {
        c.put_chunk(chunk).unwrap();
    }
    c.put_end().unwrap();
    let r = c.put_reply().expect("the PUT in flight completes");
    assert_eq!((r.size_bytes, r.links_created), (3 << 20, 2));
    let status = l.wait_exit(TIMEOUT).expect("exits once the PUT is done");
    assert_eq!(status.code(), Some(0), "{status:?}");
    l.restart();
    for m in &boxes {
        let mut c = l.conn(1);
        let list = c.list(m, 10).unwrap();
        assert_eq!(list.len(), 1, "{m:?}");
        assert_eq!(list[0].msgid.as_str(), "inflight");
        assert!(
            c.get(m, &id("inflight")).unwrap() == payload,
            "byte for byte"
        );
    }
    assert_eq!(l.temp_files(1), 0);
}

#[test]
fn idle_connections_do_not_hold_the_exit() {
    // A grace of 10 minutes: exiting within the 30 s bound proves that the idle
    // connections were closed, not waited for.
    let mut l = Listener::start(2, "shutdown_grace_ms = 600000");
    let (status, config) = l.admin("GET", "/config", Some("tok"));
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["shutdown_grace_ms"], 600_000, "{config}");
    let mut idle = [l.raw(0), l.raw(1)];
    let mut unauthenticated = common::Raw::connect(l.backends[0]);
    assert!(unauthenticated.line().starts_with("+OK PPL/1"));
    let mut client = l.conn(1);
    client.ping().unwrap();
    l.wait_for_connections(0, 2);
    l.signal(libc::SIGTERM);
    let status = l
        .wait_exit(TIMEOUT)
        .expect("idle connections do not hold the exit");
    assert_eq!(status.code(), Some(0), "{status:?}");
    for r in &mut idle {
        assert!(r.closed());
    }
    assert!(unauthenticated.closed());
    assert!(client.ping().is_err(), "the pooled connection is gone");
}

#[test]
fn the_grace_period_ends_a_stuck_put_and_nothing_of_it_is_visible() {
    let mut l = Listener::start(1, "shutdown_grace_ms = 500");
    let mut c = l.conn(0);
    c.put(&id("before"), &[mb("a@x.org")], b"kept\r\n").unwrap();
    c.put_begin(&id("stuck"), &[mb("a@x.org")]).unwrap();
    c.put_chunk(&body(3, 1 << 20)).unwrap();
    wait_for_body(&l, 0);
    // SIGINT (Ctrl-C) drains like SIGTERM.
    l.signal(libc::SIGINT);
    let status = l
        .wait_exit(TIMEOUT)
        .expect("the grace period ends the process");
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The client never gets an OK for the PUT it did not finish.
    let ended = c.put_end().and_then(|_| c.put_reply());
    assert!(ended.is_err(), "{ended:?}");
    l.restart();
    let list = l.conn(0).list(&mb("a@x.org"), 10).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].msgid.as_str(), "before");
    assert_eq!(l.temp_files(0), 0);
}

#[test]
fn a_second_signal_ends_the_drain_at_once() {
    let mut l = Listener::start(1, "shutdown_grace_ms = 600000");
    let mut c = l.conn(0);
    c.put_begin(&id("stuck"), &[mb("a@x.org")]).unwrap();
    c.put_chunk(&body(4, 1 << 20)).unwrap();
    wait_for_body(&l, 0);
    l.signal(libc::SIGTERM);
    wait_until_refused(l.backends[0]);
    assert!(l.wait_exit(Duration::ZERO).is_none(), "draining");
    l.signal(libc::SIGTERM);
    let status = l.wait_exit(TIMEOUT).expect("the second signal ends it");
    assert_eq!(status.code(), Some(1), "{status:?}");
}
