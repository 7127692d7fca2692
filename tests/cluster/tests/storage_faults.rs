//! Issue #15, storage-host faults in the topology suite: messages at K=2
//! through two SMTP hosts while one of three storage hosts fails and comes
//! back — blackholed (its bridge port disabled: silence, no RST), or its
//! pplistener killed -9 and restarted. Every acknowledged message must be
//! listed once over POP3, byte for byte; no SMTP transaction may take longer
//! than a few seconds (the frontends cut the connections to a backend the
//! health check marks down); afterwards `ppadmin repair` brings every
//! message back to K copies.
//!
//! Hosts: `storage1..3` (one pplistener each), `smtp1`, `smtp2`, `pop1`;
//! the clients and ppadmin run on this machine (the bridge's address).
//! Scaled for CI: `PM_CLUSTER_MESSAGES` (default 1,200) messages and a
//! `PM_CLUSTER_FAULT_MS` (default 6,000) fault; the figure is
//! 10,000 messages and a 20 s cut.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use powermail_cluster::{id_header, password, Tally, Topology, SECRET};
use powermail_testkit::skip_unless_root;
use powermail_testkit::{eventually, Smtp};

const USERS: usize = 6;
const SENDERS: usize = 6;
/// Longer than this is a stalled transaction.
const SLOW: Duration = Duration::from_secs(5);
const WAIT: Duration = Duration::from_secs(60);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(i: usize) -> String {
    format!("c{i}@cluster.test")
}

/// Message `n` as sent on the wire (dot-stuffed, CRLF-terminated).
fn wire(n: usize) -> Vec<u8> {
    let mut m = format!(
        "{}Subject: cluster {n}\r\n\r\n..dot\r\n",
        id_header("cl", n)
    );
    for line in 0..(n % 40 + 10) {
        m.push_str(&format!("line {line} of message {n}\r\n"));
    }
    m.into_bytes()
}

/// One sent message: (number, user, final code, how long its transaction took).
type Sent = (usize, usize, u16, Duration);

fn send_one(smtp: SocketAddr, n: usize) -> Sent {
    let u = n % USERS;
    let t = Instant::now();
    let code = Smtp::connect(smtp)
        .and_then(|mut c| {
            let code = c.send("sender@outside.test", &[&user(u)], &wire(n))?;
            c.quit();
            Ok(code)
        })
        .unwrap_or(0);
    (n, u, code, t.elapsed())
}

/// What happens to `storage1` in the middle of the blast.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Its switch port goes silent, then forwards again.
    Blackhole,
    /// Its pplistener is killed -9, then started again on the same disk.
    Kill9,
}

#[test]
fn k2_blast_with_one_storage_host_blackholed() {
    k2_blast_with_a_storage_fault(Fault::Blackhole);
}

#[test]
fn k2_blast_with_one_storage_host_killed_and_restarted() {
    k2_blast_with_a_storage_fault(Fault::Kill9);
}

/// One topology at a time: the cases share the machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn k2_blast_with_a_storage_fault(fault: Fault) {
    if skip_unless_root(&format!("cluster k2 {fault:?}"), "ip netns, ip link") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let messages = env_or("PM_CLUSTER_MESSAGES", 1200) as usize;
    let cut = Duration::from_millis(env_or("PM_CLUSTER_FAULT_MS", 6000));
    let mut cluster = Topology::k2("k2")
        .mailboxes((0..USERS).map(|i| (user(i), password(i))))
        .start();
    let root = cluster.root().to_path_buf();
    let pop = cluster.pop[0].addr;
    let backends = cluster.backends.clone();

    // The blast, from this machine, alternating the SMTP hosts.
    let next = AtomicUsize::new(0);
    let acked = AtomicUsize::new(0);
    let sent: Mutex<Vec<Sent>> = Mutex::new(Vec::new());
    let smtp_addrs = cluster.smtp_addrs();
    let mut cut_window = None;
    std::thread::scope(|s| {
        for _ in 0..SENDERS {
            s.spawn(|| loop {
                let n = next.fetch_add(1, Relaxed);
                if n >= messages {
                    return;
                }
                let one = send_one(smtp_addrs[n % smtp_addrs.len()], n);
                if one.2 == 250 {
                    acked.fetch_add(1, Relaxed);
                }
                sent.lock().unwrap_or_else(|e| e.into_inner()).push(one);
            });
        }
        eventually(WAIT, "a quarter acknowledged before the cut", || {
            acked.load(Relaxed) >= messages / 4
        });
        let from = Instant::now();
        match fault {
            Fault::Blackhole => {
                let storage1 = &cluster.storage_hosts[0];
                cluster.net.blackhole(storage1).expect("blackhole storage1");
                std::thread::sleep(cut);
                cluster.net.heal(storage1).expect("heal storage1");
            }
            Fault::Kill9 => {
                cluster.storage[0].kill9();
                std::thread::sleep(cut);
                cluster.storage[0].restart();
            }
        }
        cut_window = Some((from, from.elapsed()));
    });
    let sent = sent.into_inner().unwrap_or_else(|e| e.into_inner());
    let ok: HashMap<usize, usize> = sent
        .iter()
        .filter(|s| s.2 == 250)
        .map(|s| (s.0, s.1))
        .collect();
    let slowest = sent.iter().map(|s| s.3).max().unwrap_or_default();
    let slow = sent.iter().filter(|s| s.3 > SLOW).count();

    // Every acknowledged message listed once over POP3, byte for byte.
    let mut tally = Tally::new();
    for u in 0..USERS {
        tally.retrieve(pop, &user(u), &password(u), WAIT, "cl", |n, raw| {
            raw.ends_with(&wire(n)) && n % USERS == u
        });
    }
    let corrupt = tally.corrupt;
    let lost = tally.lost(ok.keys().copied());
    let duplicated = tally.duplicated();

    // Copies per acknowledged message, before and after ppadmin repair.
    let mailboxes: Vec<String> = (0..USERS).map(user).collect();
    let copies = || cluster.copies("cl", &mailboxes, WAIT);
    let before = copies();
    let short_before = ok
        .keys()
        .filter(|n| before.get(n).map(Vec::len) < Some(2))
        .count();
    let cluster_file = root.join("cluster.toml");
    let mut text = format!("replicas = 2\nsecret = \"{SECRET}\"\n");
    for (name, addr, _) in &backends {
        text.push_str(&format!(
            "[[backend]]\nname = \"{name}\"\naddr = \"{addr}\"\n"
        ));
    }
    std::fs::write(&cluster_file, text).expect("cluster file");
    let repair = std::process::Command::new(powermail_testkit::bin("ppadmin"))
        .arg("--cluster")
        .arg(&cluster_file)
        .arg("repair")
        .output()
        .expect("ppadmin repair");
    let after = copies();
    let short_after = ok
        .keys()
        .filter(|n| after.get(n).map(Vec::len) < Some(2))
        .count();

    let (_, cut_len) = cut_window.expect("the cut was made");
    let line = format!(
        "cluster k2 {fault:?}: sent {}, acknowledged {}, retrieved {}, lost {lost}, duplicated \
         {duplicated}, corrupt {corrupt}, slowest transaction {} ms, over {} s {slow}, under K before repair \
         {short_before}, after repair {short_after}, storage1 out for {} ms",
        sent.len(),
        ok.len(),
        tally.retrieved(),
        slowest.as_millis(),
        SLOW.as_secs(),
        cut_len.as_millis()
    );
    let _ = writeln!(std::io::stderr(), "{line}");
    assert!(ok.len() >= messages / 2, "{line}");
    assert_eq!((lost, duplicated, corrupt), (0, 0, 0), "{line}");
    assert_eq!(slow, 0, "{line}");
    assert!(
        repair.status.success(),
        "ppadmin repair: {}{}",
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    assert_eq!(short_after, 0, "{line}");
}
