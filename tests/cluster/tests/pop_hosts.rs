//! Issue #15, the `[IN-USE]` lock across POP hosts and a POP host lost
//! mid-session, in the topology: `pop1` and `pop2` on their own hosts, the
//! MariaDB userbase on the `db` host (the lease row lives there, so the lock
//! spans hosts). A mailbox open on pop1 is `-ERR [IN-USE]` on pop2 and free
//! for pop2 after QUIT. Then a session on pop1 deletes every message without
//! QUIT and pop1's host is cut off and all its processes killed -9: pop2
//! serves the mailbox within the lease (`lock_lease_ms`), and the deletions
//! the dead session never committed did not happen — every message is still
//! listed, byte for byte.
//!
//! Hosts: `db`, `storage1`, `storage2`, `smtp1` (K=2), `pop1`, `pop2`; the
//! clients on this machine (the bridge).

use std::io::Write;
use std::time::{Duration, Instant};

use powermail_cluster::{message, password, Tally, Topology, SENDER};
use powermail_testkit::{eventually, skip_unless_root, Frontend, Pop, Smtp};

/// The mailbox the case is about, and one other.
const USERS: usize = 2;
/// Messages in the first mailbox.
const MESSAGES: usize = 12;
/// The POP hosts' lease: short, so the lost host's lock goes in seconds.
const LEASE_MS: u64 = 3_000;
/// Slack over the lease for a loaded, shared machine: a lock that never
/// expired (or one renewed by nobody for minutes) still fails.
const SLACK: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(60);

fn user(i: usize) -> String {
    format!("p{i}@cluster.test")
}

/// Message `n` of this case, as sent on the wire.
fn wire(n: usize) -> Vec<u8> {
    message("pop", n)
}

/// The error of a login of mailbox `u` at `pop`, or "+OK" (then QUIT).
fn login_text(pop: &Frontend, u: usize) -> String {
    match Pop::login(pop.addr, &user(u), &password(u)) {
        Ok(p) => {
            let _ = p.quit();
            "+OK".into()
        }
        Err(e) => e.to_string(),
    }
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

#[test]
fn pop_host_lock_spans_hosts_and_a_killed_host_frees_it_within_the_lease() {
    if skip_unless_root("cluster pop hosts", "ip netns, ip link") {
        return;
    }
    let _serial = powermail_testkit::serial();
    let topology = Topology::new("pop")
        .mailboxes((0..USERS).map(|u| (user(u), password(u))))
        .database()
        .storage(2)
        .smtp(1)
        .pop(2)
        .smtp_config("replicas = 2\n")
        .pop_config(&format!(
            "allow_plaintext_auth = true\nlock_lease_ms = {LEASE_MS}\n"
        ));
    let cluster = topology.start();
    let (net, pop_hosts) = (&cluster.net, &cluster.pop_hosts);
    let smtp = &cluster.smtp[0];
    let (pop1, pop2) = (&cluster.pop[0], &cluster.pop[1]);

    let mut acked = Vec::new();
    let mut c = Smtp::connect(smtp.addr).expect("smtp1");
    for n in 0..MESSAGES {
        if c.send(SENDER, &[&user(0)], &wire(n)).expect("send") == 250 {
            acked.push(n);
        }
    }
    c.quit();
    assert_eq!(acked.len(), MESSAGES, "every message acknowledged");

    // 1. Open on pop1: [IN-USE] on pop2; another mailbox is not affected.
    let mut on_1 = Pop::login(pop1.addr, &user(0), &password(0)).expect("login on pop1");
    assert_eq!(on_1.uidl().expect("UIDL").len(), MESSAGES);
    let second = login_text(pop2, 0);
    assert!(second.contains("[IN-USE]"), "login on pop2: {second}");
    assert_eq!(login_text(pop2, 1), "+OK", "another mailbox on pop2");
    // 2. QUIT on pop1 releases it for pop2 at once.
    assert!(on_1.quit().expect("QUIT").starts_with("+OK"));
    assert_eq!(login_text(pop2, 0), "+OK", "pop2 after QUIT on pop1");

    // 3. pop1 deletes everything without QUIT, then its host is lost: cut
    // off (its peers see silence) and every process on it killed -9.
    let mut on_1 = Pop::login(pop1.addr, &user(0), &password(0)).expect("login on pop1");
    for i in 1..=MESSAGES {
        let r = on_1.cmd(&format!("DELE {i}")).expect("DELE");
        assert!(r.starts_with("+OK"), "DELE {i}: {r}");
    }
    net.blackhole(&pop_hosts[0]).expect("blackhole pop1");
    let killed = pop_hosts[0].kill_all().expect("kill pop1's processes");
    let lost_at = Instant::now();
    assert!(killed >= 1, "pop1 ran no process");
    drop(on_1);
    // The lease outlives its holder: right after the loss it still holds.
    let at_once = login_text(pop2, 0);
    assert!(
        at_once.contains("[IN-USE]"),
        "right after pop1 was lost: {at_once}"
    );
    let mut on_2 = None;
    while on_2.is_none() && lost_at.elapsed() < WAIT {
        match Pop::login(pop2.addr, &user(0), &password(0)) {
            Ok(p) => on_2 = Some(p),
            Err(e) => {
                assert!(e.to_string().contains("[IN-USE]"), "pop2: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let freed_after = lost_at.elapsed();
    let mut on_2 = on_2.unwrap_or_else(|| panic!("pop2 never got the mailbox"));

    // Every message still there, once, byte for byte.
    let mut tally = Tally::new();
    tally
        .drain(&mut on_2, "pop", |n, raw| raw.ends_with(&wire(n)))
        .expect("UIDL and RETR");
    assert!(on_2.quit().expect("QUIT").starts_with("+OK"));
    let lost = tally.lost(acked.iter().copied());
    let (duplicated, corrupt) = (tally.duplicated(), tally.corrupt);
    let line = format!(
        "cluster pop host killed: sent {MESSAGES}, acknowledged {}, retrieved {}, lost {lost}, \
         duplicated {duplicated}, corrupt {corrupt}; {killed} processes killed on pop1, mailbox \
         free on pop2 after {} ms (lease {LEASE_MS} ms)",
        acked.len(),
        tally.retrieved(),
        freed_after.as_millis()
    );
    report(&line);
    assert_eq!(
        (lost, duplicated, corrupt),
        (0, 0, 0),
        "uncommitted DELEs happened? {line}"
    );
    assert!(
        freed_after < Duration::from_millis(LEASE_MS) + SLACK,
        "{line}"
    );
    // Still a working mailbox on pop2: deletions there do commit at QUIT.
    let mut p = Pop::login(pop2.addr, &user(0), &password(0)).expect("login on pop2");
    assert!(p.cmd("DELE 1").expect("DELE").starts_with("+OK"));
    assert!(p.quit().expect("QUIT").starts_with("+OK"));
    eventually(WAIT, "the committed DELE on pop2", || {
        Pop::login(pop2.addr, &user(0), &password(0))
            .and_then(|mut p| {
                let n = p.uidl()?.len();
                let _ = p.quit();
                Ok(n)
            })
            .is_ok_and(|n| n == MESSAGES - 1)
    });
}
