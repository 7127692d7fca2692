//! powerpop's serving path end to end (real pplistener and powerpop
//! processes): RETR fetches ahead with `GETM` and answers later RETRs from
//! what it fetched, byte for byte; a backend dying before or in the middle
//! of a fetch leaves the session consistent.

mod common;

use common::*;

const BOB: &str = "bob@example.org";

/// A stored message: `lines` lines of binary bytes (no CR or LF), some
/// starting with a dot, dot-stuffed and CRLF-ended as pplistener stores them.
fn stored(seed: usize, size_bytes: usize) -> Vec<u8> {
    let mut out = b"Subject: m\r\n\r\n".to_vec();
    let mut x = seed as u64 * 2_654_435_761 + 1;
    while out.len() < size_bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 200) as usize;
        if x.is_multiple_of(5) {
            out.extend_from_slice(b"..");
        }
        for k in 0..len {
            let b = ((x >> (k % 50)) as u8).wrapping_add(k as u8);
            out.push(if b == b'\r' || b == b'\n' { b'.' } else { b });
        }
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn msgid(i: usize) -> String {
    format!("{:04}.t.1", i + 1)
}

#[test]
fn retr_fetches_ahead_exactly_and_a_dead_holder_errs_cleanly() {
    let users = Users::new(&[(BOB, "pw")]);
    let mut b0 = Backend::start();
    // 10 small messages, one over the window, then 3 more.
    let sizes = [
        100, 4096, 9000, 20, 65536, 3000, 1000, 70000, 5, 300, 1_500_000, 10, 2000, 30,
    ];
    let bodies: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| stored(i, n))
        .collect();
    for (i, b) in bodies.iter().enumerate() {
        b0.put(BOB, &msgid(i), b);
    }
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0],
        state.path(),
        "[serving]\nprefetch_messages_max = 8\nprefetch_bytes_max = 1048576\n",
    );
    // Every message in order, twice (second session: fetched ahead afresh).
    for _ in 0..2 {
        let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
        for (i, want) in bodies.iter().enumerate() {
            let got = p.retr(i + 1).unwrap();
            assert!(got == *want, "message {} differs", i + 1);
        }
        assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
    }
    // Out of order, and the same message twice: still exact.
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    for n in [3, 1, 2, 2, 14, 11, 12] {
        assert!(p.retr(n).unwrap() == bodies[n - 1], "message {n} differs");
    }
    assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));

    // RETR 1 fetches 1..8 (the window's 8 messages) ahead; then the only
    // holder dies. What was fetched is served exactly; the rest errs
    // cleanly and the session goes on.
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    assert!(p.retr(1).unwrap() == bodies[0]);
    b0.kill9();
    for n in 2..=8 {
        assert!(p.retr(n).unwrap() == bodies[n - 1], "message {n} differs");
    }
    let err = p.retr(9).unwrap_err().to_string();
    assert!(err.contains(": -ERR"), "{err}");
    let err = p.retr(11).unwrap_err().to_string();
    assert!(err.contains(": -ERR"), "{err}");
    assert!(p.cmd("NOOP").expect("NOOP").starts_with("+OK"));
    assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
}

#[test]
fn a_backend_dying_mid_fetch_leaves_the_session_consistent() {
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, b1) = (Backend::start(), Backend::start());
    // K=2: every message on both; b0 (first holder) is reached through a
    // proxy that breaks each connection after some bytes of its answers.
    let bodies: Vec<Vec<u8>> = (0..40).map(|i| stored(i, 60_000 + i * 100)).collect();
    for (i, b) in bodies.iter().enumerate() {
        b0.put(BOB, &msgid(i), b);
        b1.put(BOB, &msgid(i), b);
    }
    // Cut inside the first message of a fetch, then between later ones.
    for cut_after_bytes in [30_000u64, 200_000] {
        let proxy = CuttingProxy::start(b0.addr, cut_after_bytes);
        let state = tempfile::tempdir().unwrap();
        let pop = Pop::start_addrs(&users, &[proxy.addr, b1.addr], state.path(), "");
        let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
        assert!(
            p.cmd("STAT").expect("STAT").starts_with("+OK 40 "),
            "both backends listed"
        );
        for (i, want) in bodies.iter().enumerate() {
            let got = p
                .retr(i + 1)
                .unwrap_or_else(|e| panic!("message {} with cut at {cut_after_bytes}: {e}", i + 1));
            assert!(
                got == *want,
                "message {} differs with cut at {cut_after_bytes}",
                i + 1
            );
        }
        // Deleting works on as ever (b0 may be marked down: then journaled).
        assert!(p.cmd("DELE 1").expect("DELE 1").starts_with("+OK"));
        assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
        let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
        assert!(p.cmd("STAT").expect("STAT").starts_with("+OK 39 "));
        assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
        // Restore message 1 for the next round.
        b0.put(BOB, &msgid(0), &bodies[0]);
        b1.put(BOB, &msgid(0), &bodies[0]);
    }
}

#[test]
fn concurrent_logins_share_the_listing_workers() {
    let names: Vec<String> = (0..16).map(|c| format!("u{c}@example.org")).collect();
    let accounts: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "pw")).collect();
    let users = Users::new(&accounts);
    let (b0, b1) = (Backend::start(), Backend::start());
    for (c, name) in names.iter().enumerate() {
        b0.put(name, &msgid(2 * c), &stored(c, 100));
        b1.put(name, &msgid(2 * c + 1), &stored(c, 200));
    }
    let state = tempfile::tempdir().unwrap();
    // One worker per backend: 16 clients' listings queue behind it.
    let pop = Pop::start(
        &users,
        &[&b0, &b1],
        state.path(),
        "[serving]\nlisting_workers_per_backend = 1\nlisting_queue_max = 64\n",
    );
    let addr = pop.addr;
    let clients: Vec<_> = (0..16)
        .map(|c| {
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let mut p = PopClient::login(addr, &format!("u{c}"), "pw").expect("login");
                    let stat = p.cmd("STAT").expect("STAT");
                    assert!(stat.starts_with("+OK 2 "), "u{c}: {stat}");
                    assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(pop.stats()["counters"]["logins_ok"], 80);
}

/// The raw bytes of RETR `n` (between the `+OK` line and the final `.`)
/// read by Python over STLS: `(length, sha256 hex)` of each.
fn retr_over_tls(pop: &Pop, ns: &[usize]) -> Vec<(u64, String)> {
    let out = pop.py(&format!(
        r#"
import ssl, hashlib
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
p.stls(context=ctx)
p.user('bob'); p.pass_('pw')
f = p.file
for n in {ns:?}:
    p._putcmd('RETR %d' % n)
    status = f.readline()
    assert status.startswith(b'+OK'), status
    h, size = hashlib.sha256(), 0
    while True:
        line = f.readline()
        if line == b'.\r\n':
            break
        h.update(line); size += len(line)
    out([size, h.hexdigest()])
p.quit()
"#
    ));
    out.lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn retr_is_byte_identical_spliced_copied_and_over_tls() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    // Streamed (over the 1 MiB fetch-ahead window): 20 MiB, 3 MiB, just
    // over 1 MiB, and one ending without CRLF (powerpop completes the
    // line); and a small one, fetched ahead.
    let mut unterminated = stored(3, 2 << 20);
    unterminated.extend_from_slice(b"..no CRLF at the end");
    let bodies = [
        stored(0, 20 << 20),
        stored(1, 3 << 20),
        stored(2, 1_100_000),
        unterminated,
        stored(4, 5000),
    ];
    for (i, b) in bodies.iter().enumerate() {
        b0.put(BOB, &msgid(i), b);
    }
    let sent = |b: &Vec<u8>| {
        let mut b = b.clone();
        if !b.ends_with(b"\r\n") {
            b.extend_from_slice(b"\r\n");
        }
        b
    };
    let certs = tempfile::tempdir().unwrap();
    let tls = test_certificate(certs.path());
    let mut spliced = Vec::new();
    for splice_min in [65_536u64, 0] {
        let state = tempfile::tempdir().unwrap();
        let tables = format!(
            "{}\n[serving]\nsplice_min_bytes = {splice_min}\n",
            tls.clone().unwrap_or_default()
        );
        let pop = Pop::start(&users, &[&b0], state.path(), &tables);
        let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
        for (i, want) in bodies.iter().enumerate() {
            let got = p.retr(i + 1).unwrap();
            assert!(
                got == sent(want),
                "message {} differs (splice_min {splice_min})",
                i + 1
            );
        }
        // TOP never splices (it counts lines).
        let (status, top) = p.multi("TOP 1 2").unwrap();
        assert!(status.starts_with("+OK"), "{status}");
        let lines: Vec<&[u8]> = top.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(
            lines.len(),
            4,
            "2 header lines (Subject, blank) and 2 body lines"
        );
        assert!(bodies[0].starts_with(&top));
        assert!(p.cmd("QUIT").unwrap().starts_with("+OK"));
        let plain = pop.stats()["counters"]["bytes_spliced"].as_u64().unwrap();
        if tls.is_some() {
            let got = retr_over_tls(&pop, &[1, 2, 4]);
            for (k, i) in [0, 1, 3].into_iter().enumerate() {
                let want = sent(&bodies[i]);
                assert_eq!(
                    got[k],
                    (want.len() as u64, sha256_hex(&want)),
                    "TLS RETR {}",
                    i + 1
                );
            }
            let after = pop.stats()["counters"]["bytes_spliced"].as_u64().unwrap();
            assert_eq!(after, plain, "nothing is spliced into a TLS session");
        }
        spliced.push(plain);
    }
    // With splicing on, the three streamed messages went through the pipe
    // (all but what was buffered with the GET reply line and the last two
    // bytes); with it off, none.
    let streamed: u64 = [0, 1, 2, 3].iter().map(|&i| bodies[i].len() as u64).sum();
    assert!(
        spliced[0] > streamed - 4 * (64 << 10) && spliced[0] <= streamed,
        "spliced {} of {streamed}",
        spliced[0]
    );
    assert_eq!(spliced[1], 0, "splice_min_bytes = 0 turns splicing off");
}

#[test]
fn a_backend_cut_mid_splice_ends_the_session_without_update() {
    let users = Users::new(&[(BOB, "pw")]);
    let b0 = Backend::start();
    let big = stored(7, 3 << 20);
    let small = stored(8, 300);
    b0.put(BOB, &msgid(0), &big);
    b0.put(BOB, &msgid(1), &small);
    // Each backend connection breaks 1.5 MB into its answers: inside the
    // spliced body of message 1.
    let proxy = CuttingProxy::start(b0.addr, 1_500_000);
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start_addrs(&users, &[proxy.addr], state.path(), "");
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    assert!(p.cmd("DELE 2").unwrap().starts_with("+OK"));
    let err = p
        .retr(1)
        .expect_err("a body cut short is never ended with '.'");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    // The session ended without UPDATE: message 2 was not deleted, and a
    // new session (a new backend connection) is served.
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login again");
    assert!(p.cmd("STAT").unwrap().starts_with("+OK 2 "));
    assert!(p.retr(2).unwrap() == small);
    assert!(p.cmd("QUIT").unwrap().starts_with("+OK"));
    assert_eq!(pop.stats()["counters"]["bytes_spliced"], 0);
}

/// Body bytes a backend has sent by GET/GETM (pplistener's `bytes_out`).
fn bytes_out(b: &Backend) -> u64 {
    b.stats()["counters"]["bytes_out"]
        .as_u64()
        .expect("bytes_out")
}

#[test]
fn a_drain_over_two_backends_fetches_each_message_once() {
    // K=1 over two backends: the messages alternate between them. What one
    // backend's GETM fetched ahead must survive the other backend's GETM
    // (it used to be dropped, so every RETR fetched a whole window again).
    let users = Users::new(&[(BOB, "pw")]);
    let (b0, b1) = (Backend::start(), Backend::start());
    let bodies: Vec<Vec<u8>> = (0..40).map(|i| stored(i, 3000 + 97 * i)).collect();
    for (i, b) in bodies.iter().enumerate() {
        [&b0, &b1][i % 2].put(BOB, &msgid(i), b);
    }
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0, &b1],
        state.path(),
        "[serving]\nprefetch_messages_max = 16\nprefetch_bytes_max = 65536\n",
    );
    let before = bytes_out(&b0) + bytes_out(&b1);
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    for (i, want) in bodies.iter().enumerate() {
        assert!(p.retr(i + 1).unwrap() == *want, "message {} differs", i + 1);
    }
    assert!(p.cmd("QUIT").expect("QUIT").starts_with("+OK"));
    let stored_bytes: u64 = bodies.iter().map(|b| b.len() as u64).sum();
    // A backend counts a GETM's bytes once the whole batch is on the socket,
    // so the client can have read the last body before the counter moves.
    let sent = || bytes_out(&b0) + bytes_out(&b1) - before;
    eventually(TIMEOUT, "the backends counted what they sent", || {
        sent() >= stored_bytes
    });
    assert_eq!(sent(), stored_bytes, "every message sent by a backend once");
}

/// LIST requests a backend has answered (pplistener's `lists`).
fn lists(b: &Backend) -> u64 {
    b.stats()["counters"]["lists"].as_u64().expect("lists")
}

/// The UIDs of a fresh session (logged in, UIDL, QUIT).
fn uids(pop: &Pop) -> Vec<String> {
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    let uids = p
        .uidl()
        .expect("UIDL")
        .into_iter()
        .map(|(_, u)| u)
        .collect();
    assert!(p.quit().expect("QUIT").starts_with("+OK"));
    uids
}

#[test]
fn a_kept_listing_is_used_only_while_every_backend_generation_holds() {
    let users = Users::new(&[(BOB, "pw")]);
    let (mut b0, b1) = (Backend::start(), Backend::start());
    let mut want: Vec<String> = Vec::new();
    for i in 0..30 {
        // Alternating: every backend's part matters.
        [&b0, &b1][i % 2].put(BOB, &msgid(i), &stored(i, 200));
        want.push(msgid(i));
    }
    let state = tempfile::tempdir().unwrap();
    let pop = Pop::start(
        &users,
        &[&b0, &b1],
        state.path(),
        "[serving]\nlisting_cache_min_messages = 10\n",
    );
    let counter = |name: &str| pop.stats()["counters"][name].as_u64().expect(name);
    let listed = |b0: &Backend| lists(b0) + lists(&b1);

    // First login lists and keeps; the second only checks.
    assert_eq!(uids(&pop), want);
    let before = listed(&b0);
    assert_eq!(uids(&pop), want);
    assert_eq!(listed(&b0), before, "no LIST on an unchanged mailbox");
    assert_eq!(
        (
            counter("listing_cache_hits"),
            counter("listing_cache_stale")
        ),
        (1, 0)
    );

    // New mail on one backend: listed again, and kept again.
    b1.put(BOB, &msgid(30), &stored(30, 200));
    want.push(msgid(30));
    assert_eq!(uids(&pop), want);
    assert_eq!(counter("listing_cache_stale"), 1);
    assert_eq!(uids(&pop), want);
    assert_eq!(counter("listing_cache_hits"), 2);

    // A deletion through POP3 is seen at the next login.
    let mut p = PopClient::login(pop.addr, "bob", "pw").expect("login");
    assert!(p.cmd("DELE 1").expect("DELE").starts_with("+OK"));
    assert!(p.quit().expect("QUIT").starts_with("+OK"));
    want.remove(0);
    assert_eq!(uids(&pop), want, "listed again after the DELE");
    assert_eq!(counter("listing_cache_stale"), 2);

    // A restarted backend hands out new generations: listed again.
    b0.kill9();
    b0.restart();
    // (Until the pool has dropped its connections to the old process, a
    // login may still leave b0 out: soft failure, and nothing kept.)
    eventually(TIMEOUT, "b0 back and its listing kept again", || {
        let hits = counter("listing_cache_hits");
        uids(&pop) == want && counter("listing_cache_hits") == hits + 1
    });
    assert!(counter("listing_cache_stale") >= 3);

    // A backend gone: its messages are not served from the kept listing.
    drop(b1);
    // b0 holds the even indexes below 30; index 0 was deleted.
    let only_b0: Vec<String> = (2..30).step_by(2).map(msgid).collect();
    eventually(TIMEOUT, "b1 left out", || uids(&pop) == only_b0);
    assert_eq!(uids(&pop), only_b0);
}
