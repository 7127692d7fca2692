//! Issue #15, the PROXY protocol in the topology: a real HAProxy (Debian
//! package `haproxy`) on its own host `lb` balances SMTP over `smtp1` and
//! `smtp2` and POP3 over `pop1` and `pop2`, with `send-proxy-v2`; the
//! frontends trust only the balancer's address (`proxy_from`). So the
//! original client's address — this machine's bridge address, or a second
//! client host's — is what every Received header and every frontend's
//! session log shows, never the balancer's; and a client that connects to a
//! frontend directly (not trusted) and sends a PROXY header is refused.
//!
//! Hosts: `db` (MariaDB), `storage1`, `storage2`, `smtp1`, `smtp2` (K=2),
//! `pop1`, `pop2`, `lb` (haproxy), `client2`; the first client on this
//! machine (the bridge).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

mod common;

use common::{id_header, id_of, password, place, start_frontend, start_storage};
use powermail_cluster::{Host, Net};
use powermail_testkit::{
    connect, eventually, skip_unless_root, Frontend, Kind, Mariadb, Pop, Smtp,
};

const USERS: usize = 2;
/// Messages sent through the balancer from each client.
const PER_CLIENT: usize = 8;
/// POP3 sessions through the balancer per mailbox (round robin: both hosts).
const POP_SESSIONS: usize = 4;
const WAIT: Duration = Duration::from_secs(60);
/// The balancer's ports on its host.
const LB_SMTP_PORT: u16 = 2525;
const LB_POP_PORT: u16 = 1110;

fn user(i: usize) -> String {
    format!("h{i}@cluster.test")
}

fn wire(n: usize) -> Vec<u8> {
    format!(
        "{}Subject: lb {n}\r\n\r\nbody of {n}\r\n",
        id_header("lb", n)
    )
    .into_bytes()
}

/// A running `haproxy -db` inside the balancer's host, killed on drop.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether haproxy is installed; under CI it must be (`.ci/run` installs it).
fn have_haproxy() -> bool {
    let found = std::process::Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "haproxy is required in CI"
        );
        eprintln!("SKIPPED cluster haproxy: haproxy is not installed");
    }
    found
}

/// haproxy on `lb`: `listen` port → round robin over `servers`, each with
/// `send-proxy-v2`.
fn haproxy(root: &Path, lb: &Host, routes: &[(u16, Vec<SocketAddr>)]) -> Haproxy {
    let mut cfg = String::from(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
         timeout client 30s\n  timeout server 30s\n",
    );
    for (i, (port, servers)) in routes.iter().enumerate() {
        cfg.push_str(&format!(
            "listen l{i}\n  bind {}:{port}\n  balance roundrobin\n",
            lb.addr
        ));
        for (j, s) in servers.iter().enumerate() {
            cfg.push_str(&format!("  server s{i}x{j} {s} send-proxy-v2\n"));
        }
    }
    let path = root.join("haproxy.cfg");
    std::fs::write(&path, cfg).expect("write haproxy.cfg");
    let log = std::fs::File::create(root.join("haproxy.log")).expect("haproxy log");
    let child = lb
        .command("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn haproxy");
    let h = Haproxy(child);
    for (port, _) in routes {
        let at = SocketAddr::from((lb.addr, *port));
        eventually(WAIT, "haproxy listens", || connect(at).is_ok());
    }
    h
}

/// Sends message `n` to mailbox `n % USERS` through `smtp`; its code.
fn send(smtp: SocketAddr, n: usize) -> u16 {
    let mut c = Smtp::connect(smtp).expect("SMTP through haproxy");
    let code = c
        .send("sender@outside.test", &[&user(n % USERS)], &wire(n))
        .expect("send");
    c.quit();
    code
}

#[test]
fn haproxy_in_front_of_the_smtp_and_pop_hosts() {
    if skip_unless_root("cluster haproxy", "ip netns, ip link") || !have_haproxy() {
        return;
    }
    let _serial = powermail_testkit::serial();
    let dir = tempfile::Builder::new()
        .prefix("cluster-lb-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path();
    let mut net = Net::new().expect("bridge");
    let db_host = net.add_host("db").expect("host");
    let storage: Vec<Host> = (1..=2)
        .map(|i| net.add_host(&format!("storage{i}")).expect("host"))
        .collect();
    let smtp_hosts: Vec<Host> = (1..=2)
        .map(|i| net.add_host(&format!("smtp{i}")).expect("host"))
        .collect();
    let pop_hosts: Vec<Host> = (1..=2)
        .map(|i| net.add_host(&format!("pop{i}")).expect("host"))
        .collect();
    let lb = net.add_host("lb").expect("host");
    let client2 = net.add_host("client2").expect("host");

    let db = Mariadb::start_at(&place(&db_host), "powermail");
    let url = db.url();
    let ub = powermail_userbase::open(&url).expect("userbase (migrates)");
    for u in 0..USERS {
        ub.add_mailbox(&user(u), &password(u), 0).expect("mailbox");
    }
    drop(ub);
    let (_listeners, backends) = start_storage(root, &storage);
    let trust = format!(
        "proxy_from = [\"{}/32\"]\nproxy_timeout_ms = 1000\n",
        lb.addr
    );
    let smtps: Vec<Frontend> = smtp_hosts
        .iter()
        .map(|h| {
            let extra = format!("replicas = 2\n{trust}");
            start_frontend(root, Kind::Smtp, h, &url, &backends, &extra)
        })
        .collect();
    let pops: Vec<Frontend> = pop_hosts
        .iter()
        .map(|h| {
            let extra = format!("allow_plaintext_auth = true\n{trust}");
            start_frontend(root, Kind::Pop, h, &url, &backends, &extra)
        })
        .collect();
    let _haproxy = haproxy(
        root,
        &lb,
        &[
            (LB_SMTP_PORT, smtps.iter().map(|f| f.addr).collect()),
            (LB_POP_PORT, pops.iter().map(|f| f.addr).collect()),
        ],
    );
    let lb_smtp = SocketAddr::from((lb.addr, LB_SMTP_PORT));
    let lb_pop = SocketAddr::from((lb.addr, LB_POP_PORT));

    // Through the balancer from two clients: this machine and client2.
    let me: IpAddr = net.client_addr().into();
    let other: IpAddr = client2.addr.into();
    let mut from: HashMap<usize, IpAddr> = HashMap::new();
    let mut acked = 0;
    for n in 0..PER_CLIENT {
        acked += usize::from(send(lb_smtp, n) == 250);
        from.insert(n, me);
    }
    let theirs: Vec<usize> = (PER_CLIENT..2 * PER_CLIENT).collect();
    let codes = client2
        .run(move || {
            theirs
                .into_iter()
                .map(|n| send(lb_smtp, n))
                .collect::<Vec<_>>()
        })
        .expect("enter client2");
    for (i, code) in codes.into_iter().enumerate() {
        acked += usize::from(code == 250);
        from.insert(PER_CLIENT + i, other);
    }
    assert_eq!(acked, 2 * PER_CLIENT, "every message acknowledged");

    // Every Received header names its real client, never the balancer.
    let mut retrieved = 0;
    let (mut lost, mut duplicated) = (0, 0);
    let mut wrong = Vec::new();
    for u in 0..USERS {
        for _ in 0..POP_SESSIONS {
            let mut p = Pop::login(lb_pop, &user(u), &password(u)).expect("POP through haproxy");
            let count = p.uidl().expect("UIDL").len();
            let mut ids = Vec::new();
            for i in 1..=count {
                let raw = p.retr(i).expect("RETR");
                let first = String::from_utf8_lossy(&raw)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let n = id_of("lb", &raw).expect("a test message");
                retrieved += 1;
                ids.push(n);
                let want = format!("([{}])", from[&n]);
                if !first.starts_with("Received: from ") || !first.contains(&want) {
                    wrong.push(format!("message {n}: {first}"));
                }
            }
            assert!(p.quit().expect("QUIT").starts_with("+OK"));
            ids.sort_unstable();
            let listed = ids.len();
            ids.dedup();
            duplicated += listed - ids.len();
            lost += (0..2 * PER_CLIENT)
                .filter(|n| n % USERS == u && ids.binary_search(n).is_err())
                .count();
        }
    }
    assert_eq!((lost, duplicated), (0, 0), "every message listed once");
    assert!(wrong.is_empty(), "Received headers: {wrong:?}");
    assert_eq!(retrieved, 2 * PER_CLIENT * POP_SESSIONS);

    // Every frontend saw sessions (round robin) and logged the clients'
    // addresses, never the balancer's.
    let lb_client = format!("client={}", lb.addr);
    for f in smtps.iter().chain(&pops) {
        eventually(WAIT, "the frontend logs a session of a real client", || {
            let log = f.log_text();
            log.contains(&format!("client={me}")) || log.contains(&format!("client={other}"))
        });
        assert!(
            !f.log_text().contains(&lb_client),
            "the balancer's address leaked into a session log:\n{}",
            f.log_text()
        );
    }
    for f in &smtps {
        let log = f.log_text();
        assert!(
            log.contains(&format!("client={me}")) && log.contains(&format!("client={other}")),
            "both clients through both SMTP hosts:\n{log}"
        );
    }

    // A client that is not the balancer, connecting directly with a PROXY
    // header (here claiming to be the balancer): refused.
    let forged = format!("PROXY TCP4 {} {} 40000 25\r\n", lb.addr, smtp_hosts[0].addr);
    let mut refusals = 0;
    for (f, refusal) in smtps
        .iter()
        .map(|f| (f, "421 "))
        .chain(pops.iter().map(|f| (f, "-ERR ")))
    {
        let mut s = connect(f.addr).expect("direct connection");
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).expect("greeting");
        s.write_all(forged.as_bytes()).expect("send header");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.lines()
                .any(|l| l.starts_with(refusal) && l.contains("PROXY")),
            "{}: an untrusted PROXY header was not refused: {rest:?}",
            f.addr
        );
        refusals += 1;
    }
    let _ = writeln!(
        std::io::stderr(),
        "cluster haproxy: sent {}, acknowledged {acked}, retrieved {retrieved} ({POP_SESSIONS} \
         sessions per mailbox), lost {lost}, duplicated {duplicated}; Received headers and all 4 frontends' logs \
         name {me} and {other}, never the balancer {}; direct PROXY headers refused {refusals}/4",
        2 * PER_CLIENT,
        lb.addr
    );
}
