//! The PROXY protocol behind a real HAProxy (Debian package `haproxy`).
//!
//! HAProxy listens on loopback and connects to powersmtp and powerpop from
//! 127.0.0.2, the only trusted source (`proxy_from`); clients connect from
//! 127.0.0.1. So the original client's address (127.0.0.1) is what the
//! Received header and the session log must show, never HAProxy's. A header
//! from an untrusted source, and a trusted source without one, are refused.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;

use common::*;
use powermail_testkit::{haproxy, Haproxy, HaproxyRoute, Place};

/// The balancer's source address, the only one trusted.
const BALANCER: &str = "127.0.0.2";

/// The trusted-source lines every frontend of this suite gets.
fn trust() -> String {
    format!("proxy_from = [\"{BALANCER}/32\"]\nproxy_timeout_ms = 1000\n")
}

fn counter(admin: SocketAddr, name: &str) -> u64 {
    let mut s = connect(admin).expect("admin port");
    write!(
        s,
        "GET /stats HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .expect("admin request");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let key = format!("\"{name}\":");
    let at = body
        .find(&key)
        .unwrap_or_else(|| panic!("{name} not in /stats: {body}"));
    body[at + key.len()..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not a number in {body}"))
}

#[test]
fn proxy_protocol_behind_haproxy() {
    let _serial = serial();
    if !Haproxy::installed("proxy_protocol_behind_haproxy") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let backend = Backend::start(root, 0, root.join("disk0"), "");
    let userbase = sqlite_userbase(root, 1);
    let smtp = Frontend::smtp(root, &[&backend], &userbase, 1, "", &trust(), &[]);
    let pop = Frontend::pop(root, &[&backend], &userbase, "", &trust());
    let (smtp_v2, pop_v1, smtp_bare) = (free_addr(), free_addr(), free_addr());
    let source = format!("source {BALANCER}");
    let _haproxy = Haproxy::start(
        &Place::default(),
        root,
        &[
            HaproxyRoute::new(smtp_v2, &[smtp.addr], &format!("{source} send-proxy-v2")),
            HaproxyRoute::new(pop_v1, &[pop.addr], &format!("{source} send-proxy")),
            HaproxyRoute::new(smtp_bare, &[smtp.addr], &source),
        ],
    );

    // SMTP through HAProxy (v2): the Received header names the real client.
    let mut c = Smtp::connect(smtp_v2).expect("SMTP through haproxy");
    let code = c
        .send("a@b.test", &[&user(0)], &message("proxied", 200))
        .expect("send");
    assert_eq!(code, 250);
    c.quit();

    // POP3 through HAProxy (v1): the message, and the session log names the
    // real client, not the balancer.
    let mut p = Pop::connect(pop_v1).expect("POP through haproxy");
    p.auth(&user(0), &password(0))
        .expect("login through haproxy");
    let raw = p.retr(1).expect("RETR");
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("Received: from client.sys.test ([127.0.0.1])"),
        "Received header should name the client, not {BALANCER}: {text:.200}"
    );
    assert!(p.quit().expect("QUIT").starts_with("+OK"));
    eventually(
        DEADLINE,
        "powerpop logs the session with the client's address",
        || {
            pop.log_text().lines().any(|l| {
                l.contains(&format!("user={}", user(0))) && l.contains("client=127.0.0.1:")
            })
        },
    );
    assert!(
        !pop.log_text().contains(&format!("client={BALANCER}")),
        "the balancer's address leaked into the session log"
    );

    // A trusted source that sends no header: refused, no greeting.
    let mut s = connect(smtp_bare).expect("connect");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"220"),
        "a trusted source without a header was greeted: {:?}",
        String::from_utf8_lossy(&got)
    );
    eventually(
        DEADLINE,
        "powersmtp counts the header-less trusted connection",
        || counter(smtp.admin, "proxy_refused") >= 1,
    );

    // An untrusted client (127.0.0.1, directly) that sends a header: refused.
    for (addr, refusal) in [(smtp.addr, "421 "), (pop.addr, "-ERR ")] {
        haproxy::assert_proxy_header_refused(
            addr,
            "PROXY TCP4 192.0.2.1 192.0.2.2 1234 25\r\n",
            refusal,
        );
    }
    assert!(counter(pop.admin, "proxy_refused") >= 1);
    assert!(counter(smtp.admin, "proxy_refused") >= 2);
}
