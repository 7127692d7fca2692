//! The kit's launcher against the real pplistener: ready means every
//! announced port accepts, a restart keeps the addresses, and a daemon that
//! cannot start fails the test with its log instead of hanging it.

use std::net::TcpStream;

use powermail_testkit::{admin_request, BackendSpec, Daemon, Pplistener, PplistenerSpec};

#[test]
fn pplistener_is_ready_when_its_ports_accept_and_restarts_on_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = PplistenerSpec {
        secret: "kit-secret-0123456789".into(),
        admin_token: "kit-token".into(),
        extra: "[limits]\nfree_bytes_min = 0\n".into(),
        backends: vec![
            BackendSpec::named("first", dir.path().join("d0")),
            BackendSpec::named("second", dir.path().join("d1")),
        ],
    };
    let mut p = Pplistener::start(dir.path(), "pplistener", &spec);
    let ready = p.ready().clone();
    assert_eq!(ready.daemon, "pplistener");
    assert_eq!(Some(ready.pid), p.pid());
    assert_eq!(ready.addr("first"), Some(p.backends[0]));
    assert_eq!(ready.addr("second"), Some(p.backends[1]));
    for addr in [p.backends[0], p.backends[1], p.admin] {
        assert!(TcpStream::connect(addr).is_ok(), "{addr} accepts at ready");
    }
    let (status, _) = admin_request(p.admin, "GET", "/stats", Some("kit-token"));
    assert_eq!(status, 200);

    p.kill9();
    assert!(!p.alive());
    // (Not asserted: here a backend port still accepted a connection right
    // after kill -9 and reaping, 3 runs of 3; probably the kernel releasing
    // the dead process's io_uring, and the sockets it holds, asynchronously.)
    p.restart();
    assert_ne!(Some(ready.pid), p.pid(), "a new process");
    assert_eq!(p.ready().listen, ready.listen, "the same addresses");
    assert!(TcpStream::connect(p.backends[1]).is_ok());
    assert!(
        p.log_text().contains("pplistener ready pid="),
        "stdout is in the log"
    );
}

#[test]
fn a_daemon_that_cannot_start_fails_with_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broken.toml");
    std::fs::write(&config, "this is = = not toml\n").expect("write");
    let log = dir.path().join("broken.log");
    let failed = std::panic::catch_unwind(|| Daemon::start("pplistener", &config, &log));
    let message = match failed {
        Ok(_) => panic!("a broken config got ready"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(
        message.contains("pplistener did not get ready"),
        "{message}"
    );
    assert!(
        message.contains("pplistener: "),
        "the daemon's error is shown: {message}"
    );
}
