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
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use powermail_cluster::{message, password, place, Tally, Topology, SENDER};
use powermail_testkit::{eventually, haproxy, skip_unless_root, Haproxy, HaproxyRoute, Pop, Smtp};

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

/// Message `n` of this case, as sent on the wire.
fn wire(n: usize) -> Vec<u8> {
    message("lb", n)
}

/// Sends message `n` to mailbox `n % USERS` through `smtp`; its code.
fn send(smtp: SocketAddr, n: usize) -> u16 {
    let mut c = Smtp::connect(smtp).expect("SMTP through haproxy");
    let code = c.send(SENDER, &[&user(n % USERS)], &wire(n)).expect("send");
    c.quit();
    code
}

#[test]
fn haproxy_in_front_of_the_smtp_and_pop_hosts() {
    if skip_unless_root("cluster haproxy", "ip netns, ip link")
        || !Haproxy::installed("cluster haproxy")
    {
        return;
    }
    let _serial = powermail_testkit::serial();
    let topology = Topology::new("lb")
        .mailboxes((0..USERS).map(|u| (user(u), password(u))))
        .database()
        .storage(2)
        .smtp(2)
        .pop(2)
        .host("lb")
        .host("client2")
        .smtp_config("replicas = 2\n")
        .pop_config("allow_plaintext_auth = true\n");
    let mut cluster = topology.start_storage();
    let (lb, client2) = (cluster.host("lb").clone(), cluster.host("client2").clone());
    let trust = format!(
        "proxy_from = [\"{}/32\"]\nproxy_timeout_ms = 1000\n",
        lb.addr
    );
    cluster.smtp_config.push_str(&trust);
    cluster.pop_config.push_str(&trust);
    cluster.start_frontends();
    let (smtps, pops) = (&cluster.smtp, &cluster.pop);
    let lb_smtp = SocketAddr::from((lb.addr, LB_SMTP_PORT));
    let lb_pop = SocketAddr::from((lb.addr, LB_POP_PORT));
    let _haproxy = Haproxy::start(
        &place(&lb),
        cluster.root(),
        &[
            HaproxyRoute::new(lb_smtp, &cluster.smtp_addrs(), "send-proxy-v2"),
            HaproxyRoute::new(
                lb_pop,
                &pops.iter().map(|f| f.addr).collect::<Vec<_>>(),
                "send-proxy-v2",
            ),
        ],
    );

    // Through the balancer from two clients: this machine and client2.
    let me: IpAddr = cluster.net.client_addr().into();
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
            let mut tally = Tally::new();
            tally
                .drain(&mut p, "lb", |n, raw| {
                    let first = String::from_utf8_lossy(raw)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let want = format!("([{}])", from[&n]);
                    if !first.starts_with("Received: from ") || !first.contains(&want) {
                        wrong.push(format!("message {n}: {first}"));
                    }
                    true
                })
                .expect("UIDL and RETR");
            assert!(p.quit().expect("QUIT").starts_with("+OK"));
            assert_eq!(tally.corrupt, 0, "a message that is not a test message");
            retrieved += tally.retrieved();
            duplicated += tally.retrieved() - tally.listed.len();
            lost += tally.lost((0..2 * PER_CLIENT).filter(|n| n % USERS == u));
        }
    }
    assert_eq!((lost, duplicated), (0, 0), "every message listed once");
    assert!(wrong.is_empty(), "Received headers: {wrong:?}");
    assert_eq!(retrieved, 2 * PER_CLIENT * POP_SESSIONS);

    // Every frontend saw sessions (round robin) and logged the clients'
    // addresses, never the balancer's.
    let lb_client = format!("client={}", lb.addr);
    for f in smtps.iter().chain(pops) {
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
    for f in smtps {
        let log = f.log_text();
        assert!(
            log.contains(&format!("client={me}")) && log.contains(&format!("client={other}")),
            "both clients through both SMTP hosts:\n{log}"
        );
    }

    // A client that is not the balancer, connecting directly with a PROXY
    // header (here claiming to be the balancer): refused.
    let forged = format!(
        "PROXY TCP4 {} {} 40000 25\r\n",
        lb.addr, cluster.smtp_hosts[0].addr
    );
    let mut refusals = 0;
    for (f, refusal) in smtps
        .iter()
        .map(|f| (f, "421 "))
        .chain(pops.iter().map(|f| (f, "-ERR ")))
    {
        haproxy::assert_proxy_header_refused(f.addr, &forged, refusal);
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
