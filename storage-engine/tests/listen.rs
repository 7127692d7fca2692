//! How the real pplistener binary binds its backend ports: like every other
//! PowerMail listener (`SO_REUSEADDR`, no `SO_REUSEPORT`). A port some other
//! program used a moment ago (its connections still in TIME_WAIT) binds at
//! once; a second pplistener on the same port fails loudly instead of
//! quietly taking half of the connections; a restart waits a moment for the
//! port its killed predecessor still holds.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Listener, SECRET, TIMEOUT};
use powermail_proto::BackendConn;
use powermail_testkit::{free_addr, BackendSpec, Pplistener, PplistenerSpec};

/// Leaves a connection in TIME_WAIT on the server side of `addr` (the side
/// that closes first keeps it), from a plain socket without `SO_REUSEPORT`.
fn time_wait_on(addr: SocketAddr) {
    let l = TcpListener::bind(addr).expect("bind");
    let mut client = TcpStream::connect(addr).expect("connect");
    let (server, _) = l.accept().expect("accept");
    drop(server);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).expect("EOF from the server");
    drop(client);
    drop(l);
    let tw = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{:04X}", addr.port());
    assert!(
        tw.lines()
            .any(|l| l.split_whitespace().nth(1) == Some(&local)
                && l.split_whitespace().nth(3) == Some("06")),
        "no TIME_WAIT socket on {addr}:\n{tw}"
    );
}

#[test]
fn a_port_in_time_wait_binds_at_once() {
    let addr = free_addr();
    time_wait_on(addr);
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = PplistenerSpec {
        secret: SECRET.into(),
        admin_token: "tok".into(),
        extra: String::new(),
        backends: vec![BackendSpec {
            listen: Some(addr),
            ..BackendSpec::new(dir.path().join("disk0"))
        }],
    };
    let p = Pplistener::start(dir.path(), "pplistener", &spec);
    assert_eq!(p.backends, vec![addr]);
    let mut c = BackendConn::connect(addr, SECRET.as_bytes(), TIMEOUT).expect("connect");
    c.ping().expect("PING");
}

#[test]
fn a_second_pplistener_on_the_same_port_fails_to_start() {
    let l = Listener::start(1, "");
    let config = std::fs::read_to_string(l.process.daemon.config_path()).expect("config");
    // Same backends, its own admin port: only the backend port can clash.
    let config: String = config
        .lines()
        .map(|line| {
            if line.starts_with("admin_listen") {
                format!("admin_listen = \"{}\"\n", free_addr())
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let second = l.dir.path().join("second.toml");
    std::fs::write(&second, config).expect("write config");
    let mut child = Command::new(powermail_testkit::bin("pplistener"))
        .arg("--config")
        .arg(&second)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pplistener");
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a second pplistener on {} started and kept running",
                l.backends[0]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "second instance started: {stderr}");
    assert!(
        stderr.contains(&format!("bind {}", l.backends[0])) && stderr.contains("in use"),
        "{stderr}"
    );
    // The first one still serves.
    l.conn(0).ping().expect("PING on the first instance");
}

/// A restart finds its port still held for a moment (a pplistener killed a
/// moment ago keeps its listening socket until the kernel has torn its
/// io_uring down, after the process was reaped): it waits for the port
/// instead of failing. The hold is played here by a plain socket, released
/// 300 ms into the restart.
#[test]
fn a_restart_waits_for_a_port_still_held() {
    let mut l = Listener::start(1, "");
    let addr = l.backends[0];
    l.kill9();
    // Take the port over as soon as the killed process lets it go.
    let deadline = Instant::now() + TIMEOUT;
    let holder = loop {
        match TcpListener::bind(addr) {
            Ok(h) => break h,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("{addr} never freed after kill -9: {e}"),
        }
    };
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(holder);
    });
    l.restart();
    release.join().expect("release");
    l.conn(0).ping().expect("PING after the restart");
    assert!(
        l.log_text().contains("still in use"),
        "the wait is logged:\n{}",
        l.log_text()
    );
}
