//! End-to-end tests of the real pplistener binary: storage, links, exact
//! bytes, durability across restarts and `kill -9`, read-only mode,
//! authentication, hostile names and every limit.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::{body, Listener, Raw, SECRET, TIMEOUT};
use powermail_proto::{BackendConn, BackendError, ErrorCode, MailboxName, MessageId};

fn mb(s: &str) -> MailboxName {
    MailboxName::parse(s).unwrap()
}

fn id(s: &str) -> MessageId {
    MessageId::parse(s).unwrap()
}

#[test]
fn put_to_three_mailboxes_is_one_inode_with_three_links() {
    let l = Listener::start(2, "");
    let mut c = l.conn(0);
    let boxes = [mb("a@x.org"), mb("b@x.org"), mb("c@x.org")];
    let r = c
        .put(&id("m1"), &boxes, b"Subject: x\r\n\r\nhi\r\n")
        .unwrap();
    assert_eq!((r.size_bytes, r.links_created), (18, 3));
    let inodes: Vec<(u64, u64)> = boxes
        .iter()
        .map(|m| {
            let md = std::fs::metadata(l.message_path(0, m.as_str(), "m1")).unwrap();
            (md.ino(), md.nlink())
        })
        .collect();
    assert!(
        inodes.iter().all(|&(ino, n)| ino == inodes[0].0 && n == 3),
        "{inodes:?}"
    );
    assert_eq!(l.temp_files(0), 0);
    // The other backend has nothing.
    assert!(l.conn(1).list(&boxes[0], 10).unwrap().is_empty());
}

#[test]
fn list_and_get_return_exact_bytes_including_20_mib() {
    let l = Listener::start(2, "");
    let mut c = l.conn(1);
    let sizes = [
        0usize,
        1,
        511,
        512,
        4095,
        4096,
        4097,
        131_072,
        131_073,
        20 << 20,
    ];
    for (i, &size) in sizes.iter().enumerate() {
        let b = body(i as u64, size);
        c.put(&id(&format!("m{i:02}")), &[mb("u@x.org")], &b)
            .unwrap();
    }
    let list = c.list(&mb("u@x.org"), 100).unwrap();
    assert_eq!(list.len(), sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        assert_eq!(list[i].msgid.as_str(), format!("m{i:02}"));
        assert_eq!(list[i].size_bytes, size as u64);
        let got = c.get(&mb("u@x.org"), &list[i].msgid).unwrap();
        assert!(
            got == body(i as u64, size),
            "message {i} ({size} bytes) differs"
        );
        let on_disk =
            std::fs::metadata(l.message_path(1, "u@x.org", list[i].msgid.as_str())).unwrap();
        assert_eq!(on_disk.len(), size as u64, "the file has its true size");
    }
    assert_eq!(
        c.usage(&mb("u@x.org")).unwrap(),
        (sizes.len() as u64, sizes.iter().sum::<usize>() as u64)
    );
}

#[test]
fn getm_returns_exact_bytes_in_order_and_refuses_missing_ones() {
    let l = Listener::start(1, "");
    let mut c = l.conn(0);
    // Long ids: 100 of them need several GETM lines (and more than GET_MANY_MAX).
    let ids: Vec<_> = (0..100).map(|i| id(&format!("{i:050}"))).collect();
    let sizes: Vec<usize> = (0..100)
        .map(|i| match i {
            7 => 0,
            50 => 2 << 20,
            _ => 1 + i * 37,
        })
        .collect();
    for (i, m) in ids.iter().enumerate() {
        c.put(m, &[mb("a@x.org")], &body(i as u64, sizes[i]))
            .unwrap();
    }
    let never = id("never-stored");
    let mut asked: Vec<&MessageId> = ids.iter().collect();
    asked.insert(3, &never);
    let mut got: Vec<(usize, Result<Vec<u8>, BackendError>)> = Vec::new();
    c.get_many(&mb("a@x.org"), &asked, 64 << 20, |i, r| got.push((i, r)))
        .unwrap();
    assert_eq!(got.len(), asked.len());
    for (k, (i, r)) in got.iter().enumerate() {
        assert_eq!(*i, k, "answers come in the order asked");
        if k == 3 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.code(), Some(ErrorCode::NotFound));
            continue;
        }
        let n = if k < 3 { k } else { k - 1 };
        assert!(
            r.as_ref().unwrap() == &body(n as u64, sizes[n]),
            "message {n} differs"
        );
    }
    // The connection is in step afterwards.
    assert_eq!(c.get(&mb("a@x.org"), &ids[1]).unwrap(), body(1, sizes[1]));
    // A mailbox this backend never saw: one refusal per id, from memory.
    let mut refused = 0;
    c.get_many(&mb("nobody@x.org"), &asked[..5], 1 << 20, |_, r| {
        refused += usize::from(r.is_err_and(|e| e.code() == Some(ErrorCode::NotFound)));
    })
    .unwrap();
    assert_eq!(refused, 5);
    // Asking for fewer bytes than announced is refused, not buffered.
    let err = c
        .get_many(&mb("a@x.org"), &[&ids[50]], 1 << 20, |_, _| {})
        .unwrap_err();
    assert!(matches!(err, BackendError::Protocol(_)), "{err}");
    // On the wire: one line per id, +OK <size> then the bytes.
    let mut raw = l.raw(0);
    raw.send(&format!("GETM a@x.org {} nope {}\r\n", ids[1], ids[2]));
    assert_eq!(raw.line(), format!("+OK {}", sizes[1]));
    let _ = raw.bytes(sizes[1]);
    assert!(raw.line().starts_with("-ERR [NOTFOUND] nope"));
    assert_eq!(raw.line(), format!("+OK {}", sizes[2]));
    assert_eq!(raw.bytes(sizes[2]), body(2, sizes[2]));
    raw.send("GETM a@x.org\r\n");
    assert!(raw.line().starts_with("-ERR [PROTO]"));
    raw.send("GETM a@x.org ../x\r\n");
    assert!(raw.line().starts_with("-ERR [BADNAME]"));
}

#[test]
fn delete_one_link_leaves_the_others_and_restart_keeps_everything() {
    let mut l = Listener::start(1, "");
    let mut c = l.conn(0);
    c.put(&id("m1"), &[mb("a@x.org"), mb("b@x.org")], b"one")
        .unwrap();
    c.put(&id("m2"), &[mb("a@x.org")], b"two").unwrap();
    c.del(&mb("a@x.org"), &id("m1")).unwrap();
    let err = c.del(&mb("a@x.org"), &id("m1")).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert_eq!(c.get(&mb("b@x.org"), &id("m1")).unwrap(), b"one");
    drop(c);
    l.kill9();
    l.restart();
    let mut c = l.conn(0);
    let a: Vec<String> = c
        .list(&mb("a@x.org"), 10)
        .unwrap()
        .into_iter()
        .map(|e| e.msgid.to_string())
        .collect();
    assert_eq!(a, vec!["m2"]);
    assert_eq!(c.get(&mb("b@x.org"), &id("m1")).unwrap(), b"one");
    let dir: Vec<String> = c
        .dir(100)
        .unwrap()
        .into_iter()
        .map(|m| m.to_string())
        .collect();
    assert_eq!(dir, vec!["a@x.org", "b@x.org"]);
    assert_eq!(c.nuke(&mb("b@x.org")).unwrap(), 1);
    assert!(c.list(&mb("b@x.org"), 10).unwrap().is_empty());
}

#[test]
fn delm_removes_many_skips_missing_and_survives_kill_9() {
    let mut l = Listener::start(1, "");
    let mut c = l.conn(0);
    // Long ids: 150 of them need several DELM lines (and more than DEL_MANY_MAX ids).
    let ids: Vec<_> = (0..150).map(|i| id(&format!("{i:060}"))).collect();
    for m in &ids {
        c.put(m, &[mb("a@x.org"), mb("b@x.org")], m.as_str().as_bytes())
            .unwrap();
    }
    let gone: Vec<_> = ids.iter().step_by(2).collect(); // 75 of them
    let mut asked = gone.clone();
    let never = id("never-stored");
    asked.push(&never);
    assert_eq!(c.del_many(&mb("a@x.org"), &asked).unwrap(), 75);
    // Again: nothing left to remove, and no error.
    assert_eq!(c.del_many(&mb("a@x.org"), &asked).unwrap(), 0);
    // A mailbox this backend never saw.
    assert_eq!(c.del_many(&mb("nobody@x.org"), &asked).unwrap(), 0);
    drop(c);
    l.kill9();
    l.restart();
    let mut c = l.conn(0);
    let left: Vec<String> = c
        .list(&mb("a@x.org"), 1000)
        .unwrap()
        .into_iter()
        .map(|e| e.msgid.to_string())
        .collect();
    let want: Vec<String> = ids
        .iter()
        .skip(1)
        .step_by(2)
        .map(|m| m.to_string())
        .collect();
    assert_eq!(left, want);
    assert_eq!(c.list(&mb("b@x.org"), 1000).unwrap().len(), 150);
}

#[test]
fn kill_9_during_a_big_put_leaves_nothing_partial() {
    let mut l = Listener::start(1, "");
    let mut c = l.conn(0);
    c.put(&id("done"), &[mb("a@x.org")], &body(1, 100_000))
        .unwrap();
    c.put_begin(&id("partial"), &[mb("a@x.org")]).unwrap();
    for chunk in body(2, 8 << 20).chunks(1 << 20) {
        c.put_chunk(chunk).unwrap();
    }
    // Wait until the server is writing the body (a nameless O_TMPFILE), then kill it mid-PUT.
    for _ in 0..500 {
        if l.bodies_being_written(0) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(l.bodies_being_written(0), 1, "the body is being written");
    assert_eq!(l.temp_files(0), 0, "and it has no name");
    l.kill9();
    l.restart();
    assert_eq!(l.temp_files(0), 0, "temporaries removed at start-up");
    let list = l.conn(0).list(&mb("a@x.org"), 10).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].msgid.as_str(), "done");
}

#[test]
fn kill_9_under_concurrent_puts_every_ok_is_complete() {
    let mut l = Listener::start(2, "");
    let addrs = l.backends.clone();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let addr = addrs[t % 2];
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let Ok(mut c) = BackendConn::connect(addr, SECRET.as_bytes(), TIMEOUT) else {
                    return acked;
                };
                for i in 0.. {
                    let seed = (t * 1_000_000 + i) as u64;
                    let msgid = id(&format!("t{t}-{i:06}"));
                    let size = (seed as usize * 7919) % 300_000;
                    match c.put(&msgid, &[mb("k@x.org")], &body(seed, size)) {
                        Ok(_) => acked.push((t % 2, msgid, seed, size)),
                        Err(_) => break,
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    l.kill9();
    let acked: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(!acked.is_empty(), "some PUTs completed before the kill");
    l.restart();
    for b in 0..2 {
        assert_eq!(l.temp_files(b), 0);
        let mut c = l.conn(b);
        let listed = c.list(&mb("k@x.org"), 100_000).unwrap();
        // Every listed message is complete and byte-exact...
        for e in &listed {
            let (t, i) = e.msgid.as_str()[1..].split_once('-').unwrap();
            let seed =
                (t.parse::<usize>().unwrap() * 1_000_000 + i.parse::<usize>().unwrap()) as u64;
            let size = (seed as usize * 7919) % 300_000;
            assert_eq!(
                e.size_bytes, size as u64,
                "{} listed with a wrong size",
                e.msgid
            );
            assert!(
                c.get(&mb("k@x.org"), &e.msgid).unwrap() == body(seed, size),
                "{} corrupt",
                e.msgid
            );
        }
        // ...and every acknowledged one is listed.
        for (backend, msgid, _, _) in acked.iter().filter(|a| a.0 == b) {
            assert!(
                listed.iter().any(|e| &e.msgid == msgid),
                "acknowledged {msgid} lost (backend {backend})"
            );
        }
    }
}

#[test]
fn read_only_refuses_put_serves_the_rest_and_survives_restart() {
    let mut l = Listener::start(1, "");
    let mut c = l.conn(0);
    c.put(&id("m1"), &[mb("a@x.org")], b"kept").unwrap();
    c.set_readonly(true).unwrap();
    let err = c.put(&id("m2"), &[mb("a@x.org")], b"refused").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ReadOnly), "{err}");
    assert_eq!(c.get(&mb("a@x.org"), &id("m1")).unwrap(), b"kept");
    assert_eq!(c.list(&mb("a@x.org"), 10).unwrap().len(), 1);
    let status: std::collections::HashMap<_, _> = c.status().unwrap().into_iter().collect();
    assert_eq!(status["mode"], "ro");
    drop(c);
    l.kill9();
    l.restart();
    let mut c = l.conn(0);
    assert_eq!(
        c.put(&id("m3"), &[mb("a@x.org")], b"x").unwrap_err().code(),
        Some(ErrorCode::ReadOnly)
    );
    // The admin port switches it back.
    let (status, _) = l.admin("POST", "/control/readwrite", Some("tok"));
    assert_eq!(status, 200);
    c.put(&id("m3"), &[mb("a@x.org")], b"x").unwrap();
    c.del(&mb("a@x.org"), &id("m1")).unwrap();
}

#[test]
fn wrong_secret_and_unauthenticated_commands_are_refused() {
    let l = Listener::start(1, "");
    match BackendConn::connect(l.backends[0], b"not-the-secret-at-all", TIMEOUT) {
        Err(BackendError::Refused {
            code: Some(ErrorCode::Auth),
            ..
        }) => {}
        other => panic!("expected AUTH refusal, got {other:?}"),
    }
    let mut r = Raw::connect(l.backends[0]);
    assert!(r.line().starts_with("+OK PPL/1 "));
    r.send("LIST a@x.org\r\n");
    assert!(r.line().starts_with("-ERR [AUTH]"));
    assert!(r.closed());
    let mut r = Raw::connect(l.backends[0]);
    r.line();
    r.send("AUTH 00\r\n");
    assert!(r.line().starts_with("-ERR [AUTH]"));
    assert!(r.closed());
}

#[test]
fn hostile_names_are_refused_and_nothing_escapes_the_store() {
    let l = Listener::start(1, "");
    let mut r = l.raw(0);
    let long = format!("{}@x.org", "a".repeat(300));
    for name in [
        "../../etc/passwd",
        "a/b@x.org",
        "..",
        ".hidden@x",
        "a\0b@x",
        "x'; DROP TABLE--@x",
        long.as_str(),
    ] {
        r.send(&format!("LIST {name}\r\n"));
        let reply = r.line();
        assert!(
            reply.starts_with("-ERR [BADNAME]") || reply.starts_with("-ERR [PROTO]"),
            "{name:?}: {reply}"
        );
    }
    r.send("GET a@x.org ../../../../etc/passwd\r\n");
    assert!(r.line().starts_with("-ERR [BADNAME]"));
    // A PUT with one bad mailbox is refused whole; the stream stays in sync.
    r.send("PUT m1 2\r\nok@x.org\r\n../evil@x\r\n3\r\nabc0\r\nPING\r\n");
    assert!(r.line().starts_with("-ERR [BADNAME]"));
    assert_eq!(r.line(), "+OK PONG");
    assert!(l.conn(0).list(&mb("ok@x.org"), 10).unwrap().is_empty());
    let entries: Vec<_> = std::fs::read_dir(l.data_dir(0))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 3, "only .probe, tmp, mbox: {entries:?}");
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let l = Listener::start(
        1,
        "[limits]\nconnections_per_backend_max = 3\nmessage_max_bytes = 100000\nline_max_bytes = 200\nidle_timeout_ms = 1000\nmailboxes_per_put_max = 5\n",
    );
    // Message size.
    let mut c = l.conn(0);
    let err = c
        .put(&id("big"), &[mb("a@x.org")], &body(1, 100_001))
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooBig), "{err}");
    // Over the limit in small chunks, after the first chunks were accepted.
    c = l.conn(0);
    c.put_begin(&id("big2"), &[mb("a@x.org")]).unwrap();
    for chunk in body(2, 150_000).chunks(10_000) {
        if c.put_chunk(chunk).is_err() {
            break;
        }
    }
    let _ = c.put_end();
    assert_eq!(c.put_reply().unwrap_err().code(), Some(ErrorCode::TooBig));
    c = l.conn(0);
    c.put(&id("fits"), &[mb("a@x.org")], &body(1, 100_000))
        .unwrap();
    drop(c);
    // Line length.
    let mut r = l.raw(0);
    r.send(&format!("LIST {}\r\n", "x".repeat(500)));
    assert!(r.line().starts_with("-ERR [PROTO] line too long"));
    assert!(r.closed());
    // Mailboxes per PUT.
    let mut r = l.raw(0);
    r.send("PUT m 6\r\n");
    assert!(r.line().starts_with("-ERR [LIMIT]"));
    drop(r);
    l.wait_for_connections(0, 0);
    // Connections: three held open, the fourth is refused.
    let held: Vec<BackendConn> = (0..3).map(|_| l.conn(0)).collect();
    let mut extra = Raw::connect(l.backends[0]);
    assert!(extra
        .line()
        .starts_with("-ERR [LIMIT] too many connections"));
    drop(held);
    drop(extra);
    l.wait_for_connections(0, 0);
    // Idle time-out: a silent connection is closed.
    let mut idle = Raw::connect(l.backends[0]);
    assert!(idle.line().starts_with("+OK PPL/1"));
    let started = std::time::Instant::now();
    assert!(idle.closed());
    assert!(
        started.elapsed() < TIMEOUT,
        "closed by the idle time-out, not the test's"
    );
    // The daemon still serves everyone else.
    assert_eq!(l.conn(0).list(&mb("a@x.org"), 10).unwrap().len(), 1);
}

#[test]
fn admin_port_requires_the_token_and_reports() {
    let l = Listener::start(2, "");
    l.conn(0).put(&id("m1"), &[mb("a@x.org")], b"x").unwrap();
    assert_eq!(l.admin("GET", "/stats", None).0, 401);
    assert_eq!(l.admin("GET", "/stats", Some("wrong")).0, 401);
    let (status, body) = l.admin("GET", "/stats", Some("tok"));
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["daemon"], "pplistener", "{body}");
    assert_eq!(v["backends"][0]["counters"]["puts"], 1, "{body}");
    assert_eq!(v["backends"][1]["counters"]["puts"], 0, "{body}");
    assert_eq!(v["backends"][0]["gauges"]["readonly"], 0, "{body}");
    let (status, metrics) = l.admin("GET", "/metrics", Some("tok"));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("pplistener_puts_total{backend=\"b0\"} 1"),
        "{metrics}"
    );
    // Every counter and gauge of /stats is in /metrics and vice versa.
    assert_eq!(
        powermail_admin::families_in_stats(&v, "pplistener", "pplistener"),
        powermail_admin::families_in_text(&metrics),
        "{body}\n{metrics}"
    );
    let (status, text) = l.admin("POST", "/control/readonly?backend=b1", Some("tok"));
    assert_eq!((status, text.trim()), (200, "b1 ro"));
    assert_eq!(
        l.conn(1)
            .put(&id("m2"), &[mb("a@x.org")], b"x")
            .unwrap_err()
            .code(),
        Some(ErrorCode::ReadOnly)
    );
    l.conn(0).put(&id("m2"), &[mb("a@x.org")], b"x").unwrap();
    assert_eq!(
        l.admin("POST", "/control/loglevel?level=debug", Some("tok"))
            .0,
        200
    );
    assert_eq!(
        l.admin("POST", "/control/loglevel?level=nonsense", Some("tok"))
            .0,
        400
    );
    assert_eq!(
        l.admin("POST", "/control/readonly?backend=nope", Some("tok"))
            .0,
        400
    );
}

#[test]
fn more_recipients_than_the_link_limit_get_a_second_copy() {
    // ext4 allows 65,000 links per inode (EMLINK); the store must copy the body once more.
    const MAILBOXES: usize = 65_010;
    let l = Listener::start(1, "[limits]\nmailboxes_per_put_max = 70000\n");
    let boxes: Vec<MailboxName> = (0..MAILBOXES)
        .map(|i| mb(&format!("r{i}@many.test")))
        .collect();
    let mut c = l.conn(0);
    c.set_timeout(Duration::from_secs(600)).unwrap();
    let r = c.put(&id("wide"), &boxes, b"to very many").unwrap();
    assert_eq!(r.links_created, MAILBOXES as u64);
    let first = std::fs::metadata(l.message_path(0, boxes[0].as_str(), "wide")).unwrap();
    let last = std::fs::metadata(l.message_path(0, boxes[MAILBOXES - 1].as_str(), "wide")).unwrap();
    assert_ne!(
        first.ino(),
        last.ino(),
        "a second inode past the link limit"
    );
    assert_eq!(
        first.nlink() + last.nlink(),
        MAILBOXES as u64,
        "every link on one of the two copies"
    );
    assert_eq!(
        c.get(&boxes[MAILBOXES - 1], &id("wide")).unwrap(),
        b"to very many"
    );
    assert_eq!(l.temp_files(0), 0);
}

#[test]
fn empty_mailboxes_are_answered_from_memory() {
    let mut l = Listener::start(1, "");
    let fast = |l: &Listener| {
        let (_, body) = l.admin("GET", "/stats", Some("tok"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["backends"][0]["counters"]["empty_fast_path"]
            .as_u64()
            .unwrap()
    };
    let mut c = l.conn(0);
    assert!(c.list(&mb("nobody@x.org"), 10).unwrap().is_empty());
    assert_eq!(c.usage(&mb("nobody@x.org")).unwrap(), (0, 0));
    assert_eq!(
        c.get(&mb("nobody@x.org"), &id("m1")).unwrap_err().code(),
        Some(ErrorCode::NotFound)
    );
    assert_eq!(fast(&l), 3, "three answers without touching the disk");
    c.put(&id("m1"), &[mb("somebody@x.org")], b"x").unwrap();
    assert_eq!(c.list(&mb("somebody@x.org"), 10).unwrap().len(), 1);
    assert_eq!(fast(&l), 3, "a mailbox with mail goes to the disk");
    drop(c);
    l.kill9();
    l.restart();
    let mut c = l.conn(0);
    assert_eq!(
        c.list(&mb("somebody@x.org"), 10).unwrap().len(),
        1,
        "the set is rebuilt from disk at start"
    );
    assert_eq!(c.nuke(&mb("somebody@x.org")).unwrap(), 1);
    assert!(c.list(&mb("somebody@x.org"), 10).unwrap().is_empty());
    assert_eq!(fast(&l), 1, "after NUKE the mailbox is unknown again");
}

#[test]
fn dir_is_paged_in_name_order() {
    let l = Listener::start(1, "[limits]\nlist_max_entries = 3\n");
    let mut c = l.conn(0);
    let names: Vec<MailboxName> = (0..8).map(|i| mb(&format!("u{i}@x.org"))).collect();
    c.put(&id("m1"), &names, b"hi\r\n").unwrap();
    let mut seen: Vec<MailboxName> = Vec::new();
    loop {
        let page = c.dir_after(seen.last(), 100).unwrap();
        assert!(page.len() <= 3, "{page:?}");
        if page.is_empty() {
            break;
        }
        seen.extend(page);
    }
    assert_eq!(seen, names, "every mailbox once, in order");
    // The first page without a start name is the first three.
    assert_eq!(c.dir(100).unwrap(), names[..3]);
}

/// Whether pplistener switched backend 0 to syncfs with bodies flushed
/// before linking, as it does on an ext4 without a journal (this machine's
/// root file system).
fn orders_by_itself(l: &Listener) -> bool {
    let (status, body) = l.admin("GET", "/stats", Some("tok"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let escalated = v["backends"][0]["flush_before_link"] == true;
    if escalated {
        assert_eq!(v["backends"][0]["durability"], "syncfs", "{body}");
    }
    escalated
}

/// Sends `n` PUTs of 4 KiB to one existing mailbox on `n` connections at
/// once (bodies first, then every end marker, then the replies) and returns
/// the deltas of (puts, batches, batch_puts, flushes, fdatasync, dir fsync,
/// syncfs, trailing flushes).
fn concurrent_puts(l: &Listener, n: usize, tag: &str) -> [u64; 8] {
    let names = [
        "puts",
        "batches",
        "batch_puts",
        "flushes",
        "flushes_fdatasync",
        "flushes_dir_fsync",
        "flushes_syncfs",
        "flushes_trailing",
    ];
    let mut c = l.conn(0);
    // The mailbox exists before counting: no parent directory is created.
    c.put(
        &id(&format!("{tag}-warm")),
        &[mb("f@x.org")],
        &body(1, 4096),
    )
    .unwrap();
    let before = names.map(|s| l.stat(0, s));
    let mut conns: Vec<BackendConn> = (0..n).map(|_| l.conn(0)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.put_begin(&id(&format!("{tag}-{i}")), &[mb("f@x.org")])
            .unwrap();
        c.put_chunk(&body(i as u64, 4096)).unwrap();
    }
    for c in conns.iter_mut() {
        c.put_end().unwrap();
    }
    for c in conns.iter_mut() {
        assert_eq!(c.put_reply().unwrap().links_created, 1);
    }
    let after = names.map(|s| l.stat(0, s));
    let mut d = [0; 8];
    for k in 0..8 {
        d[k] = after[k] - before[k];
    }
    assert_eq!(d[0], n as u64, "every PUT counted");
    assert_eq!(d[2], n as u64, "every PUT went through a batch");
    assert!(d[1] >= 1 && d[1] <= n as u64, "batches {}", d[1]);
    assert_eq!(
        c.list(&mb("f@x.org"), 1000).unwrap().len(),
        n + 1,
        "all listed"
    );
    d
}

/// Ordered syncfs (an ext4 without a journal): every batch is behind two
/// steps (bodies, then links), each a `syncfs` and a trailing device flush,
/// shared between batches when they follow each other: at most two steps
/// per batch, and at least one per batch plus the first batch's body step.
fn assert_ordered_flushes(syncfs: u64, trailing: u64, batches: u64) {
    assert_eq!(trailing, syncfs, "a trailing flush after every syncfs");
    assert!(
        syncfs <= 2 * batches,
        "{syncfs} syncfs steps for {batches} batches: more than 2 per batch"
    );
    assert!(
        syncfs > batches,
        "{syncfs} syncfs steps for {batches} batches: fewer than the order needs"
    );
}

#[test]
fn syncfs_mode_costs_one_flush_per_batch_of_concurrent_puts() {
    const N: usize = 32;
    let l = Listener::start_in(1, "", "durability = \"syncfs\"\n");
    let [_, batches, _, flushes, fdatasync, dir_fsync, syncfs, trailing] =
        concurrent_puts(&l, N, "s");
    assert_eq!((fdatasync, dir_fsync), (0, 0), "no per-file flush");
    assert_eq!(
        flushes,
        syncfs + trailing,
        "syncfs and its trailing flush only"
    );
    if orders_by_itself(&l) {
        assert_ordered_flushes(syncfs, trailing, batches);
    } else {
        assert_eq!(syncfs, batches, "one syncfs per batch, not per PUT");
        assert_eq!(trailing, 0, "a journaled file system orders its own writes");
    }
    // 32 end markers arrive while the first batch's syncfs runs: they share.
    assert!(batches < N as u64, "{N} PUTs made {batches} batches");
    // Durable across kill -9 (the page cache survives it, so this checks the
    // links and names, not the flush; the flush is what the counters show).
    let mut l = l;
    l.kill9();
    l.restart();
    assert_eq!(l.conn(0).list(&mb("f@x.org"), 1000).unwrap().len(), N + 1);
    assert_eq!(l.temp_files(0), 0);
}

#[test]
fn file_mode_costs_one_fdatasync_per_put_and_one_dir_fsync_per_batch() {
    const N: usize = 32;
    let l = Listener::start_in(1, "", "durability = \"file\"\n");
    let [_, batches, _, flushes, fdatasync, dir_fsync, syncfs, trailing] =
        concurrent_puts(&l, N, "f");
    if orders_by_itself(&l) {
        // An ext4 without a journal (this machine's root): file mode cannot
        // be durable there, so the backend runs ordered syncfs instead.
        assert_eq!((fdatasync, dir_fsync), (0, 0));
        assert_eq!(
            flushes,
            syncfs + trailing,
            "syncfs and its trailing flush only"
        );
        assert_ordered_flushes(syncfs, trailing, batches);
        return;
    }
    assert_eq!((syncfs, trailing), (0, 0));
    assert_eq!(fdatasync, N as u64, "one body fdatasync per PUT");
    assert_eq!(
        dir_fsync, batches,
        "the one mailbox directory, once per batch"
    );
    assert_eq!(flushes, N as u64 + batches);
}

/// Two `syncfs` backends on one file system share one commit thread: the
/// admin port names the group on both, and PUTs to either are linked,
/// flushed (the flush counted on the backend it served) and listed.
#[test]
fn syncfs_backends_on_one_file_system_share_a_commit_thread() {
    let l = Listener::start_in(2, "", "durability = \"syncfs\"\n");
    let (status, body) = l.admin("GET", "/stats", Some("tok"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let group = v["backends"][0]["commit_group"].as_str().unwrap_or("");
    let names: Vec<&str> = (0..2)
        .map(|i| v["backends"][i]["name"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(group, names.join("+"), "{body}");
    assert_eq!(v["backends"][1]["commit_group"], group, "{body}");
    for b in 0..2 {
        let before = l.stat(b, "flushes_syncfs");
        let mut c = l.conn(b);
        c.put(&id(&format!("g{b}")), &[mb("g@x.org")], b"shared\r\n")
            .unwrap();
        assert_eq!(c.list(&mb("g@x.org"), 10).unwrap().len(), 1);
        assert!(l.stat(b, "flushes_syncfs") > before, "backend {b} flushed");
    }
}
