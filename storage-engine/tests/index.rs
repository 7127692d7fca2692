//! The mailbox index against the real `pplistener`: LIST and USAGE answered
//! from memory must equal a fresh walk of the directory, through PUT,
//! multi-recipient PUT, retried PUT, DEL, DELM, NUKE, eviction and `kill -9`;
//! and a mailbox larger than `list_max_entries` is listed completely in pages.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Listener;
use powermail_proto::{ListEntry, MailboxName, MessageId};
use sha2::{Digest, Sha256};

fn mb(s: &str) -> MailboxName {
    MailboxName::parse(s).unwrap()
}

fn id(s: &str) -> MessageId {
    MessageId::parse(s).unwrap()
}

/// Where pplistener keeps a mailbox (see store.rs).
fn mailbox_dir(data_dir: &Path, mailbox: &str) -> PathBuf {
    let h = Sha256::digest(mailbox.as_bytes());
    data_dir
        .join("mbox")
        .join(format!("{:02x}", h[0]))
        .join(format!("{:02x}", h[1]))
        .join(mailbox)
}

/// A fresh walk of the mailbox directory: `(id, size)` sorted by id.
fn walk(data_dir: &Path, mailbox: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = match std::fs::read_dir(mailbox_dir(data_dir, mailbox)) {
        Ok(entries) => entries
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_str().unwrap().to_string(),
                    e.metadata().unwrap().len(),
                )
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("walking {mailbox}: {e}"),
    };
    out.sort();
    out
}

fn pairs(list: &[ListEntry]) -> Vec<(String, u64)> {
    list.iter()
        .map(|e| (e.msgid.as_str().to_string(), e.size_bytes))
        .collect()
}

fn stat(l: &Listener, key: &str) -> u64 {
    let (_, body) = l.admin("GET", "/stats", Some("tok"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b = &v["backends"][0];
    b["counters"][key]
        .as_u64()
        .or_else(|| b["gauges"][key].as_u64())
        .unwrap_or_else(|| panic!("no counter or gauge {key} in {body}"))
}

/// LIST (every page) and USAGE of each mailbox equal a fresh walk.
fn assert_index_equals_walk(l: &Listener, boxes: &[MailboxName], when: &str) {
    let mut c = l.conn(0);
    for m in boxes {
        let walked = walk(&l.data_dir(0), m.as_str());
        let listed = pairs(&c.list(m, 1_000_000).unwrap());
        assert_eq!(listed, walked, "{when}: LIST {m} vs a walk");
        let bytes: u64 = walked.iter().map(|(_, s)| s).sum();
        assert_eq!(
            c.usage(m).unwrap(),
            (walked.len() as u64, bytes),
            "{when}: USAGE {m} vs a walk"
        );
    }
}

#[test]
fn index_equals_a_fresh_walk_through_every_mutation_and_kill_9() {
    // Pages of 4 so every listing below takes several; an index bound of 12
    // entries so mailboxes are evicted and walked again along the way.
    let mut l = Listener::start(
        1,
        "[limits]\nlist_max_entries = 4\nindex_entries_max = 12\n",
    );
    let boxes: Vec<MailboxName> = (0..4).map(|i| mb(&format!("u{i}@ix.test"))).collect();
    let mut c = l.conn(0);
    // Warm the index first, so the mutations below must keep it exact.
    assert_index_equals_walk(&l, &boxes, "empty");
    for i in 0..9u64 {
        let body = common::body(i, 10 + i as usize * 7);
        c.put(&id(&format!("m{i:02}")), &boxes[..2], &body).unwrap();
    }
    assert_index_equals_walk(&l, &boxes, "after multi-recipient PUTs");
    // A retried PUT is not counted twice.
    let receipt = c
        .put(&id("m03"), &boxes[..2], &common::body(3, 31))
        .unwrap();
    assert_eq!(receipt.links_created, 0);
    // One message to all four, with the same mailbox twice in one PUT.
    c.put(
        &id("m50"),
        &[
            boxes[0].clone(),
            boxes[2].clone(),
            boxes[2].clone(),
            boxes[3].clone(),
        ],
        b"four",
    )
    .unwrap();
    assert_index_equals_walk(&l, &boxes, "after a retried PUT");
    assert_eq!(c.usage(&boxes[2]).unwrap(), (1, 4));
    c.del(&boxes[0], &id("m00")).unwrap();
    assert!(c.del(&boxes[0], &id("m00")).is_err(), "already gone");
    let gone = [id("m01"), id("m02"), id("nope"), id("m08")];
    let removed = c
        .del_many(&boxes[1], &gone.iter().collect::<Vec<_>>())
        .unwrap();
    assert_eq!(removed, 3);
    assert_index_equals_walk(&l, &boxes, "after DEL and DELM");
    assert_eq!(c.usage(&boxes[1]).unwrap().0, 6);
    assert_eq!(c.nuke(&boxes[3]).unwrap(), 1);
    assert_index_equals_walk(&l, &boxes, "after NUKE");
    // Published once a second.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        stat(&l, "index_builds") >= 4,
        "mailboxes were walked to build the index"
    );
    assert!(
        stat(&l, "index_evictions") > 0,
        "a bound of 12 entries cannot hold two 9-message mailboxes"
    );
    assert!(stat(&l, "index_entries") <= 12);
    // Changes made behind the index's back are not seen until it is rebuilt:
    // here, by a restart after kill -9, which starts with an empty index.
    drop(c);
    l.kill9();
    l.restart();
    assert_index_equals_walk(&l, &boxes, "after kill -9 and restart");
    let mut c = l.conn(0);
    c.put(&id("m60"), &[boxes[3].clone()], b"back").unwrap();
    assert_index_equals_walk(&l, &boxes, "after a PUT to a nuked mailbox");
}

#[test]
fn concurrent_puts_and_deletes_while_the_index_is_built_stay_exact() {
    // Two mailboxes of ~200 and 150 messages and a bound of 300 entries: each
    // LIST of one evicts the other, so every LIST walks while a writer keeps
    // adding and deleting, and the walks race the writer's mutations.
    let l = Listener::start(1, "[limits]\nindex_entries_max = 300\n");
    let (a, b) = (mb("busy@ix.test"), mb("other@ix.test"));
    let mut c = l.conn(0);
    for i in 0..200 {
        c.put(&id(&format!("a{i:04}")), std::slice::from_ref(&a), b"x")
            .unwrap();
    }
    for i in 0..150 {
        c.put(&id(&format!("o{i:04}")), std::slice::from_ref(&b), b"o")
            .unwrap();
    }
    drop(c);
    std::thread::scope(|s| {
        let (l, a, b) = (&l, &a, &b);
        s.spawn(move || {
            let mut c = l.conn(0);
            for i in 0..200 {
                c.put(&id(&format!("b{i:04}")), std::slice::from_ref(a), b"yy")
                    .unwrap();
                c.del(a, &id(&format!("a{i:04}"))).unwrap();
            }
        });
        s.spawn(move || {
            let mut c = l.conn(0);
            for _ in 0..60 {
                assert_eq!(c.list(b, 10_000).unwrap().len(), 150);
                // One answer from a walk racing the writer is as exact as a
                // walk can be (a message linked or unlinked mid-walk may be
                // seen or not); what the index keeps afterwards is exact.
                let n = c.list(a, 10_000).unwrap().len();
                assert!((199..=202).contains(&n), "{n} messages mid-flight");
            }
        });
    });
    // The last walk of `a` stayed resident and was kept up to date since.
    assert_index_equals_walk(&l, &[a], "after racing walks");
    let mut c = l.conn(0);
    let listed = c.list(&mb("busy@ix.test"), 1000).unwrap();
    assert_eq!(listed.len(), 200);
    assert!(listed.iter().all(|e| e.msgid.as_str().starts_with('b')));
}

#[test]
fn a_150000_message_mailbox_is_listed_completely_through_pages() {
    const MESSAGES: usize = 150_000;
    // Links made directly in the store while the backend is down (ext4 allows
    // 65,000 links per inode, so three bodies of 1, 2 and 3 bytes).
    let mut l = Listener::start(1, "[limits]\nlist_max_entries = 40000\n");
    l.kill9();
    let mailbox = "big@ix.test";
    let dir = mailbox_dir(&l.data_dir(0), mailbox);
    std::fs::create_dir_all(&dir).unwrap();
    let sources: Vec<PathBuf> = (1..=3)
        .map(|n| {
            let p = l.data_dir(0).join(format!("src{n}"));
            std::fs::write(&p, vec![b'x'; n]).unwrap();
            p
        })
        .collect();
    let mut bytes = 0u64;
    for i in 0..MESSAGES {
        std::fs::hard_link(&sources[i % 3], dir.join(format!("{i:08x}.t.1"))).unwrap();
        bytes += (i % 3 + 1) as u64;
    }
    for s in &sources {
        std::fs::remove_file(s).unwrap();
    }
    l.restart();
    let m = mb(mailbox);
    let mut c = l.conn(0);
    c.set_timeout(Duration::from_secs(120)).unwrap();
    // Page by page by hand: 40,000 at most each, "more" on all but the last.
    let mut pages = Vec::new();
    let mut after: Option<MessageId> = None;
    loop {
        let page = c.list_page(&m, after.as_ref(), usize::MAX).unwrap();
        assert!(page.entries.len() <= 40_000);
        after = page.entries.last().map(|e| e.msgid.clone());
        let more = page.more;
        pages.push(page.entries);
        if !more {
            break;
        }
    }
    assert_eq!(pages.len(), 4, "150,000 in pages of 40,000");
    let all: Vec<ListEntry> = pages.into_iter().flatten().collect();
    assert_eq!(all.len(), MESSAGES);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e.msgid.as_str(),
            format!("{i:08x}.t.1"),
            "sorted, each once"
        );
        assert_eq!(e.size_bytes, (i % 3 + 1) as u64);
    }
    assert_eq!(c.usage(&m).unwrap(), (MESSAGES as u64, bytes));
    // The client pages by itself, and a cap returns the oldest, not an error.
    assert_eq!(pairs(&c.list(&m, 1_000_000).unwrap()), pairs(&all));
    let capped = c.list(&m, 50_000).unwrap();
    assert_eq!(capped.len(), 50_000);
    assert_eq!(capped[..], all[..50_000]);
    // Kept exact by a PUT and a DEL on the indexed mailbox.
    c.put(&id("ffffffff.t.1"), std::slice::from_ref(&m), b"last")
        .unwrap();
    c.del(&m, &id("00000000.t.1")).unwrap();
    let listed = c.list(&m, 1_000_000).unwrap();
    assert_eq!(listed.len(), MESSAGES);
    assert_eq!(listed.last().unwrap().msgid.as_str(), "ffffffff.t.1");
    assert_eq!(pairs(&listed), walk(&l.data_dir(0), mailbox));
}
