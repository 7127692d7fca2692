//! systemd notifications of the real pplistener binary: `READY=1` once every
//! backend listens, `STOPPING=1` when SIGTERM starts the drain. The only test
//! in this binary, because it sets `NOTIFY_SOCKET` for the whole process.

mod common;

use std::os::unix::net::UnixDatagram;

use common::{Listener, TIMEOUT};

#[test]
fn ready_then_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    // No other test runs in this process, so nothing reads the environment meanwhile.
    std::env::set_var("NOTIFY_SOCKET", &path);
    let mut l = Listener::start(2, "");
    std::env::remove_var("NOTIFY_SOCKET");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("READY=1 arrives");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        ready.starts_with("READY=1\nSTATUS=pplistener ready pid="),
        "{ready:?}"
    );
    l.signal(libc::SIGTERM);
    let n = sock.recv(&mut buf).expect("STOPPING=1 arrives");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let status = l.wait_exit(TIMEOUT).expect("exits");
    assert_eq!(status.code(), Some(0), "{status:?}");
}
