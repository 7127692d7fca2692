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
use std::time::{Duration, Instant};

use powermail_cluster::{blast, id_header, password, Tally, Topology, SECRET};
use powermail_testkit::eventually;
use powermail_testkit::skip_unless_root;

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

fn k2_blast_with_a_storage_fault(fault: Fault) {
    if skip_unless_root(&format!("cluster k2 {fault:?}"), "ip netns, ip link") {
        return;
    }
    // One topology at a time: the cases share the machine.
    let _serial = powermail_testkit::serial();
    let messages = env_or("PM_CLUSTER_MESSAGES", 1200) as usize;
    let cut = Duration::from_millis(env_or("PM_CLUSTER_FAULT_MS", 6000));
    let mut cluster = Topology::k2("k2")
        .mailboxes((0..USERS).map(|i| (user(i), password(i))))
        .start();
    let root = cluster.root().to_path_buf();
    let pop = cluster.pop[0].addr;
    let backends = cluster.backends.clone();

    // The blast, from this machine, alternating the SMTP hosts.
    let smtp_addrs = cluster.smtp_addrs();
    let mail = |n: usize| (user(n % USERS), wire(n));
    let (sent, cut_len) = blast(&smtp_addrs, SENDERS, messages, mail, |progress| {
        eventually(WAIT, "a quarter acknowledged before the cut", || {
            progress.acked() >= messages / 4
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
        from.elapsed()
    });
    let ok: HashMap<usize, usize> = sent
        .iter()
        .filter(|s| s.code == 250)
        .map(|s| (s.n, s.n % USERS))
        .collect();
    let slowest = sent.iter().map(|s| s.took).max().unwrap_or_default();
    let slow = sent.iter().filter(|s| s.took > SLOW).count();

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
