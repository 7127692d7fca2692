//! The fault suite (issue #6): real daemons, real clients, and faults
//! injected from outside — `kill -9` of a backend, of powersmtp, of MariaDB,
//! and a backend whose disk fills. Every case checks the reliability
//! contract of DESIGN.md: a `250` means K durable copies, retrievable exactly
//! once with identical bytes; nothing half-written is ever listed; a deleted
//! message never comes back.
//!
//! Each case prints one line `fault <case>: sent=.. acknowledged=..
//! retrieved=.. lost=..` on stderr (not captured by the test harness).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use powermail_proto::MailboxName;
use powermail_testkit::{mariadbd_installed, Mariadb};

/// One SMTP transaction of the suite.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    mailbox: usize,
    hash: [u8; 32],
    /// Final reply code; 0 when the connection failed.
    code: u16,
    /// When it finished.
    at: Instant,
}

/// Writes a line to the real stderr (libtest captures only the print macros).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Ok(path) = std::env::var("PM_FAULT_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Senders: `conns` SMTP sessions sending messages `blast-<i>` (of
/// `size(i)` bytes, to mailbox `i % users`) until `total` are sent or `stop`
/// is set. Results are pushed to `out`; `acked` counts 250s.
struct Blast<'a> {
    smtp: SocketAddr,
    prefix: &'a str,
    users: usize,
    total: usize,
    size: fn(usize) -> usize,
    next: AtomicUsize,
    acked: AtomicUsize,
    stop: AtomicBool,
    out: Mutex<Vec<Sent>>,
}

impl<'a> Blast<'a> {
    fn new(
        smtp: SocketAddr,
        prefix: &'a str,
        users: usize,
        total: usize,
        size: fn(usize) -> usize,
    ) -> Self {
        Blast {
            smtp,
            prefix,
            users,
            total,
            size,
            next: AtomicUsize::new(0),
            acked: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            out: Mutex::new(Vec::new()),
        }
    }

    /// One sender; reconnects after a failed connection.
    fn worker(&self) {
        let mut conn: Option<Smtp> = None;
        let mut mine = Vec::new();
        while !self.stop.load(Relaxed) {
            let i = self.next.fetch_add(1, Relaxed);
            if i >= self.total {
                break;
            }
            let id = format!("{}-{i:06}", self.prefix);
            let mailbox = i % self.users;
            let msg = message(&id, (self.size)(i));
            if conn.is_none() {
                conn = Smtp::connect(self.smtp).ok();
            }
            let code = match conn.as_mut() {
                Some(c) => c
                    .send("blast@sender.test", &[&user(mailbox)], &msg)
                    .unwrap_or(0),
                None => {
                    std::thread::sleep(Duration::from_millis(20));
                    0
                }
            };
            if code == 0 || code == 421 {
                conn = None;
            }
            if code != 250 {
                // A refused sender retries a little later, as a real MTA would.
                std::thread::sleep(Duration::from_millis(5));
            }
            if code == 250 {
                self.acked.fetch_add(1, Relaxed);
            }
            mine.push(Sent {
                id,
                mailbox,
                hash: sha(&msg),
                code,
                at: Instant::now(),
            });
        }
        if let Some(c) = conn {
            c.quit();
        }
        self.out.lock().expect("lock").extend(mine);
    }

    /// Waits (bounded) until `n` messages were acknowledged or all sent.
    fn wait_acked(&self, n: usize) {
        let start = Instant::now();
        while self.acked.load(Relaxed) < n
            && self.next.load(Relaxed) < self.total
            && start.elapsed() < DEADLINE
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn results(self) -> Vec<Sent> {
        self.out.into_inner().expect("lock")
    }
}

/// The counts of one case.
#[derive(Default, Debug)]
struct Counts {
    sent: usize,
    acknowledged: usize,
    retrieved: usize,
    lost: usize,
    duplicated: usize,
    corrupt: usize,
    under_replicated: usize,
    /// Listed though never acknowledged: a copy of a message answered 4xx
    /// (a backend killed after its copy was durable but before its `+OK` reached
    /// powersmtp). Must be 0 once the backends are back and powersmtp's undo
    /// journal has been replayed (issue #16): the sender retries, so such a copy
    /// would be read twice.
    unacknowledged_listed: usize,
}

/// Compares what was sent with what POP shows and the backends hold.
fn account(sent: &[Sent], got: &Retrieved, backends: &[&Backend], k: usize) -> Counts {
    let mut holders: HashMap<(String, String), usize> = HashMap::new();
    for b in backends {
        for link in b.links() {
            *holders.entry(link).or_default() += 1;
        }
    }
    let mut c = Counts {
        sent: sent.len(),
        ..Counts::default()
    };
    let acked: HashSet<&str> = sent
        .iter()
        .filter(|s| s.code == 250)
        .map(|s| s.id.as_str())
        .collect();
    for s in sent.iter().filter(|s| s.code == 250) {
        c.acknowledged += 1;
        let copies = got.get(&s.id).map(Vec::as_slice).unwrap_or_default();
        match copies {
            [] => c.lost += 1,
            [(mailbox, uid, hash)] => {
                if *mailbox != s.mailbox || *hash != s.hash {
                    c.corrupt += 1;
                } else {
                    c.retrieved += 1;
                }
                if holders
                    .get(&(user(s.mailbox), uid.clone()))
                    .copied()
                    .unwrap_or(0)
                    < k
                {
                    c.under_replicated += 1;
                }
            }
            _ => c.duplicated += 1,
        }
    }
    c.unacknowledged_listed = got
        .iter()
        .filter(|(id, _)| !acked.contains(id.as_str()))
        .map(|(_, v)| v.len())
        .sum();
    c
}

fn check(case: &str, c: &Counts, sys_logs: impl Fn() -> String) {
    report(&format!(
        "fault {case}: sent={} acknowledged={} retrieved={} lost={} duplicated={} corrupt={} under_replicated={} unacknowledged_listed={}",
        c.sent, c.acknowledged, c.retrieved, c.lost, c.duplicated, c.corrupt, c.under_replicated, c.unacknowledged_listed
    ));
    let ok = c.lost == 0
        && c.duplicated == 0
        && c.corrupt == 0
        && c.under_replicated == 0
        && c.unacknowledged_listed == 0;
    assert!(ok, "{case}: {c:?}\n{}", sys_logs());
    assert_eq!(c.retrieved, c.acknowledged);
}

/// Waits (bounded, polled) until powersmtp's undo journal owes nothing: every
/// deletion of a refused message's copies was acknowledged by its backend.
fn wait_undo_replayed(smtp: &Frontend) {
    eventually(
        DEADLINE,
        "powersmtp's undo journal is replayed (undo_owed = 0)",
        || smtp.stat("undo_owed") == Some(0),
    );
}

/// The refusals a sender may see while a part of the system is failing:
/// temporary ones (4xx) or a lost connection (0), never a permanent 5xx.
fn assert_only_temporary(case: &str, sent: &[Sent]) {
    let permanent: Vec<_> = sent.iter().filter(|s| s.code >= 500).take(5).collect();
    assert!(
        permanent.is_empty(),
        "{case}: permanent refusals {permanent:?}"
    );
}

/// Waits until a backend answers again and the frontends' health checks
/// (every 100 ms) have seen it.
fn wait_backend_up(b: &Backend) {
    eventually(DEADLINE, "backend answers PING", || {
        powermail_proto::BackendConn::connect(b.addr, SECRET.as_bytes(), IO_TIMEOUT)
            .and_then(|mut c| c.ping())
            .is_ok()
    });
    std::thread::sleep(Duration::from_millis(500));
}

fn small(i: usize) -> usize {
    300 + (i * 37) % 700
}

/// Issue #6, case 1: three backends, K=2, 20,000 messages; a backend is
/// killed with -9 in the middle and restarted later.
#[test]
fn blast_20000_with_one_backend_killed_and_restarted() {
    let _g = serial();
    const USERS: usize = 20;
    const TOTAL: usize = 20_000;
    let mut sys = System::start(3, 2, USERS);
    let blast = Blast::new(sys.smtp.addr, "blast", USERS, TOTAL, small);
    let (mut acked_at_kill, mut acked_at_restart) = (0, 0);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| blast.worker());
        }
        blast.wait_acked(TOTAL * 3 / 10);
        acked_at_kill = blast.acked.load(Relaxed);
        sys.backends[1].kill9();
        blast.wait_acked(acked_at_kill + TOTAL * 3 / 10);
        acked_at_restart = blast.acked.load(Relaxed);
        sys.backends[1].restart();
    });
    let sent = blast.results();
    assert!(
        acked_at_restart > acked_at_kill,
        "delivery went on with a backend dead ({acked_at_kill} → {acked_at_restart})"
    );
    assert_only_temporary("blast", &sent);
    wait_backend_up(&sys.backends[1]);
    wait_undo_replayed(&sys.smtp);
    let got = retrieve_all(sys.pop.addr, USERS, 4);
    let refs: Vec<&Backend> = sys.backends.iter().collect();
    let c = account(&sent, &got, &refs, 2);
    assert_eq!(c.sent, TOTAL);
    check(
        "blast (3 backends, K=2, b1 killed and restarted)",
        &c,
        || sys.logs(),
    );
}

/// Issue #6, case 2: kill -9 a backend while large messages stream into
/// it; after a restart nothing partial is listed and no temporary is left.
#[test]
fn kill_9_backend_during_large_puts() {
    let _g = serial();
    const USERS: usize = 3;
    let mut sys = System::start(2, 1, USERS);
    let blast = Blast::new(sys.smtp.addr, "large", USERS, 60, |i| (3 << 20) + i * 4099);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| blast.worker());
        }
        blast.wait_acked(4);
        // Large bodies are being written right now: 3 senders, 3 MiB each.
        std::thread::sleep(Duration::from_millis(150));
        sys.backends[0].kill9();
        std::thread::sleep(Duration::from_millis(300));
        sys.backends[1].kill9();
        blast.stop.store(true, Relaxed);
    });
    let sent = blast.results();
    for b in &mut sys.backends {
        b.restart();
    }
    // The undo journal deletes refused messages' copies once the backends are back;
    // let it finish before reading the backends directly.
    wait_undo_replayed(&sys.smtp);
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    // Straight from each backend: every listed message is whole.
    for b in &sys.backends {
        assert_eq!(b.temp_files(), 0, "{}: temporaries left", b.name);
        let mut conn = b.conn();
        for u in 0..USERS {
            let mb = MailboxName::parse(&user(u)).expect("name");
            for e in conn.list(&mb, 10_000).expect("LIST") {
                let raw = conn.get(&mb, &e.msgid).expect("GET");
                assert_eq!(raw.len() as u64, e.size_bytes);
                let (id, hash) = identify(&raw).expect("a suite message");
                assert_eq!(
                    by_id[id.as_str()].hash,
                    hash,
                    "{id} partial or corrupt on {}",
                    b.name
                );
            }
        }
    }
    for b in &sys.backends {
        wait_backend_up(b);
    }
    let got = retrieve_all(sys.pop.addr, USERS, 2);
    let refs: Vec<&Backend> = sys.backends.iter().collect();
    let c = account(&sent, &got, &refs, 1);
    check(
        "large PUTs (2 backends, K=1, both killed mid-write)",
        &c,
        || sys.logs(),
    );
}

/// Issue #6, case 3: kill -9 powersmtp in the middle of DATA; nothing of
/// that transaction is listed anywhere.
#[test]
fn kill_9_powersmtp_mid_data_lists_nothing() {
    let _g = serial();
    let mut sys = System::start(2, 2, 1);
    let mut c = Smtp::connect(sys.smtp.addr).expect("connect");
    assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").expect("MAIL").0, 250);
    assert_eq!(
        c.cmd(&format!("RCPT TO:<{}>", user(0))).expect("RCPT").0,
        250
    );
    assert_eq!(c.cmd("DATA").expect("DATA").0, 354);
    let msg = message("half", 4 << 20);
    c.raw(&msg[..3 << 20]).expect("first part of the body");
    // Let powersmtp stream what it has to both backends.
    std::thread::sleep(Duration::from_millis(500));
    sys.smtp.kill9();
    drop(c);
    sys.smtp.restart();
    let mut c = Smtp::connect(sys.smtp.addr).expect("connect after restart");
    let after = message("after", 1000);
    assert_eq!(
        c.send("a@sender.test", &[&user(0)], &after).expect("send"),
        250
    );
    c.quit();
    for b in &sys.backends {
        assert_eq!(b.temp_files(), 0);
        let listed: Vec<String> = b.links().into_iter().map(|(_, id)| id).collect();
        assert_eq!(
            listed.len(),
            1,
            "{}: only the later message: {listed:?}",
            b.name
        );
    }
    let got = retrieve_all(sys.pop.addr, 1, 1);
    let ids: Vec<&String> = got.keys().collect();
    assert_eq!(ids, vec!["after"], "POP lists only the complete message");
    report(
        "fault powersmtp killed mid-DATA: sent=2 acknowledged=1 retrieved=1 lost=0 half_listed=0",
    );
}

/// Issue #6, case 4: a backend goes down between DELE and QUIT, or while
/// QUIT runs; once it is back no deleted message reappears.
#[test]
fn backend_down_at_quit_deleted_messages_stay_deleted() {
    let _g = serial();
    let mut sys = System::start(3, 2, 1);
    let mut c = Smtp::connect(sys.smtp.addr).expect("connect");
    for i in 0..9 {
        let code = c
            .send(
                "a@sender.test",
                &[&user(0)],
                &message(&format!("del-{i}"), 500),
            )
            .expect("send");
        assert_eq!(code, 250);
    }
    c.quit();
    let ids_now = |sys: &System| -> HashSet<String> {
        retrieve_all(sys.pop.addr, 1, 1).into_keys().collect()
    };
    let mut deleted = HashSet::new();

    // Down between DELE and QUIT.
    let mut p = pop_login(sys.pop.addr, 0).expect("login");
    for n in 1..=3 {
        let (id, _) = identify(&p.retr(n).expect("RETR")).expect("id");
        assert!(p
            .cmd(&format!("DELE {n}"))
            .expect("DELE")
            .starts_with("+OK"));
        deleted.insert(id);
    }
    sys.backends[0].kill9();
    let q = p.quit().expect("QUIT");
    assert!(q.starts_with("+OK"), "QUIT with a backend down: {q}");
    let left = ids_now(&sys);
    assert!(left.is_disjoint(&deleted), "while b0 is down: {left:?}");
    sys.backends[0].restart();
    wait_backend_up(&sys.backends[0]);
    let left = ids_now(&sys);
    assert_eq!(left.len(), 6, "after b0 came back: {left:?}");
    assert!(left.is_disjoint(&deleted));

    // Down while QUIT runs: the kill races the deletions.
    let mut quit_ok = 0;
    for round in 0..3 {
        let victim = (round + 1) % 3;
        let mut p = pop_login(sys.pop.addr, 0).expect("login");
        let (id, _) = identify(&p.retr(1).expect("RETR")).expect("id");
        assert!(p.cmd("DELE 1").expect("DELE").starts_with("+OK"));
        p.raw(b"QUIT\r\n").expect("QUIT");
        sys.backends[victim].kill9();
        let q = p.line().unwrap_or_default();
        if q.starts_with("+OK") {
            quit_ok += 1;
            deleted.insert(id);
        }
        sys.backends[victim].restart();
        wait_backend_up(&sys.backends[victim]);
        let left = ids_now(&sys);
        assert!(
            left.is_disjoint(&deleted),
            "round {round}: {left:?} {}",
            sys.logs()
        );
    }
    // Once every backend has been listed again, the journal has been
    // replayed: the files are gone from the disks too.
    for b in &sys.backends {
        for (_, msgid) in b.links() {
            let raw = b
                .conn()
                .get(
                    &MailboxName::parse(&user(0)).expect("name"),
                    &powermail_proto::MessageId::parse(&msgid).expect("id"),
                )
                .expect("GET");
            let (id, _) = identify(&raw).expect("id");
            assert!(!deleted.contains(&id), "{id} still on {}", b.name);
        }
    }
    report(&format!(
        "fault backend down at DELE/QUIT: sent=9 acknowledged=9 deleted={} reappeared=0 quit_ok_during_kill={quit_ok}/3",
        deleted.len()
    ));
}

/// Issue #6, case 6: one backend's disk fills; it turns read-only by
/// itself, delivery goes on to the others, nothing is lost.
#[test]
fn a_full_disk_turns_its_backend_read_only_and_nothing_is_lost() {
    if std::env::var("PM_SKIP_DISKFULL").as_deref() == Ok("1") {
        report("fault disk full: SKIPPED (PM_SKIP_DISKFULL=1)");
        return;
    }
    let _g = serial();
    const USERS: usize = 4;
    let root = tempfile::tempdir().expect("tempdir");
    // Declared before the daemons so it is unmounted after they are gone.
    let disk = SmallDisk::mount(root.path(), 64);
    let floor = "free_bytes_min = 16777216\n";
    let backends = [
        Backend::start(root.path(), 0, root.path().join("disk0"), floor),
        Backend::start(root.path(), 1, root.path().join("disk1"), floor),
        Backend::start(root.path(), 2, disk.dir.join("data"), floor),
    ];
    let userbase = sqlite_userbase(root.path(), USERS);
    let refs: Vec<&Backend> = backends.iter().collect();
    // The small disk is preferred, so it fills first.
    let smtp = Frontend::smtp(root.path(), &refs, &userbase, 2, "", "", &[0, 0, 1]);
    let pop = Frontend::pop(root.path(), &refs, &userbase, "", "");
    let logs = || {
        format!(
            "{}\n{}\n{}",
            backends[2].log_text(),
            smtp.log_text(),
            pop.log_text()
        )
    };
    let blast = Blast::new(smtp.addr, "full", USERS, 400, |i| (256 << 10) + i);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| blast.worker());
        }
    });
    let sent = blast.results();
    assert_eq!(
        backends[2].mode(),
        "ro-auto",
        "the small disk's backend is read-only"
    );
    assert!(
        backends[2].links().len() > 20,
        "the small disk took messages before it filled"
    );
    assert_only_temporary("disk full", &sent);
    // Once the small disk was full, delivery went on: the last 100 were accepted.
    let mut by_time = sent.clone();
    by_time.sort_by_key(|s| s.at);
    let tail_refused = by_time
        .iter()
        .rev()
        .take(100)
        .filter(|s| s.code != 250)
        .count();
    assert_eq!(tail_refused, 0, "delivery continues on the other backends");
    wait_undo_replayed(&smtp);
    let got = retrieve_all(pop.addr, USERS, 2);
    let c = account(&sent, &got, &refs, 2);
    check("disk full (b2 on a 64 MiB ext4, floor 16 MiB)", &c, logs);
    report(&format!(
        "fault disk full: b2 mode={} holds={} refused={}",
        backends[2].mode(),
        backends[2].links().len(),
        sent.iter().filter(|s| s.code != 250).count()
    ));
}

/// Issue #16: a backend whose file system runs out of inodes (bytes to spare, both
/// floors 0) turns read-only on the failed write and stays so, tick after tick,
/// refusing PUTs with `[READONLY]`, until inodes are freed; then it takes PUTs again.
#[test]
fn out_of_inodes_keeps_its_backend_read_only_until_inodes_are_freed() {
    if std::env::var("PM_SKIP_DISKFULL").as_deref() == Ok("1") {
        report("fault out of inodes: SKIPPED (PM_SKIP_DISKFULL=1)");
        return;
    }
    let _g = serial();
    let root = tempfile::tempdir().expect("tempdir");
    // 32 MiB but only ~128 inodes. Declared before the backend: unmounted after it.
    let disk = SmallDisk::mount_with(root.path(), 32, Some(128));
    let b = Backend::start(
        root.path(),
        0,
        disk.dir.join("data"),
        "free_inodes_min = 0\n",
    );
    let mailbox = MailboxName::parse(&user(0)).expect("mailbox");
    let body = message("inodes", 2000);
    let put = |i: u64| {
        let id = powermail_proto::MessageId::generate(1_700_000_000_000_000 + i, "inodes", i);
        b.conn().put(&id, std::slice::from_ref(&mailbox), &body)
    };
    put(0).expect("PUT while inodes are free");
    // Take every free inode with empty files.
    let filler = disk.dir.join("filler");
    std::fs::create_dir(&filler).expect("filler dir");
    let mut files = 0u32;
    loop {
        match std::fs::File::create(filler.join(files.to_string())) {
            Ok(_) => files += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling inodes: {e}"),
        }
        assert!(files < 100_000, "the file system should run out of inodes");
    }
    let err = put(1).expect_err("PUT with no inode left");
    assert_eq!(b.mode(), "ro-auto", "ENOSPC turned it read-only: {err}");
    // Several housekeeping ticks (1 s each): it must not flap back to rw while no
    // inode is free, and every PUT is refused up front.
    let watch_from = Instant::now();
    let mut refused = 0;
    while watch_from.elapsed() < Duration::from_millis(3500) {
        assert_eq!(b.mode(), "ro-auto", "still out of inodes\n{}", b.log_text());
        let err = put(2 + refused).expect_err("PUT while out of inodes");
        assert_eq!(
            err.code(),
            Some(powermail_proto::ErrorCode::ReadOnly),
            "refused as read-only, not tried: {err}"
        );
        refused += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    std::fs::remove_dir_all(&filler).expect("free the inodes");
    eventually(
        DEADLINE,
        "the backend is writable once inodes are free",
        || b.mode() == "rw",
    );
    put(1000).expect("PUT once inodes are free");
    assert_eq!(b.links().len(), 2, "the first and the last PUT are stored");
    report(&format!(
        "fault out of inodes: filler_files={files} refused_readonly={refused} flapped=0"
    ));
}

/// Issue #6, case 5: MariaDB killed and restarted under load: only
/// temporary refusals while it is down, service resumes by itself, nothing
/// acknowledged is lost.
#[test]
fn mariadb_killed_and_restarted_under_load() {
    if !mariadbd_installed() {
        if std::env::var("PM_SKIP_MARIADB").as_deref() == Ok("1") {
            report("fault MariaDB restart: SKIPPED (mariadbd not installed, PM_SKIP_MARIADB=1)");
            return;
        }
        panic!("mariadbd is not installed: install mariadb-server (as .ci/run does) or set PM_SKIP_MARIADB=1");
    }
    let _g = serial();
    const USERS: usize = 4;
    let db = Mariadb::start("powermail_sys");
    let url = db.url();
    add_users(&url, USERS);
    let root = tempfile::tempdir().expect("tempdir");
    let backends: Vec<Backend> = (0..2)
        .map(|i| Backend::start(root.path(), i, root.path().join(format!("disk{i}")), ""))
        .collect();
    let refs: Vec<&Backend> = backends.iter().collect();
    // No caching: every RCPT and every login asks the database.
    let cache = "[userbase_cache]\npositive_ttl_ms = 0\nnegative_ttl_ms = 0\n";
    let smtp = Frontend::smtp(root.path(), &refs, &url, 2, "", cache, &[]);
    let pop = Frontend::pop(root.path(), &refs, &url, "", cache);
    let blast = Blast::new(smtp.addr, "db", USERS, 1_000_000, small);
    let (mut down_from, mut down_until) = (Instant::now(), Instant::now());
    let mut pop_while_down = String::new();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| blast.worker());
        }
        blast.wait_acked(300);
        db.kill9();
        down_from = Instant::now();
        // A reader meanwhile gets a temporary error, not "wrong password".
        let login = pop_login(pop.addr, 0).err().map(|e| e.to_string());
        pop_while_down = login.unwrap_or_else(|| "+OK (logged in)".into());
        std::thread::sleep(Duration::from_secs(3));
        db.up();
        down_until = Instant::now();
        // Counted from here: the server may have answered a few before up() returned.
        let acked_at_up = blast.acked.load(Relaxed);
        blast.wait_acked(acked_at_up + 300);
        blast.stop.store(true, Relaxed);
    });
    let sent = blast.results();
    assert_only_temporary("MariaDB", &sent);
    let refused_while_down = sent
        .iter()
        .filter(|s| s.code != 250 && s.at > down_from && s.at < down_until)
        .count();
    let resumed = sent
        .iter()
        .filter(|s| s.code == 250 && s.at > down_until)
        .count();
    assert!(refused_while_down > 0, "the outage was noticed");
    assert!(
        pop_while_down.contains("[SYS/TEMP]"),
        "POP login with the database down: {pop_while_down}"
    );
    assert!(
        resumed >= 300,
        "service resumed by itself, without a restart of the frontends ({resumed} accepted after the restart)"
    );
    wait_undo_replayed(&smtp);
    let got = retrieve_all(pop.addr, USERS, 2);
    let c = account(&sent, &got, &refs, 2);
    check("MariaDB killed and restarted (K=2)", &c, || {
        format!("{}\n{}", smtp.log_text(), pop.log_text())
    });
    report(&format!(
        "fault MariaDB restart: refused_while_down={refused_while_down} (all 4xx) pop_login_while_down=[SYS/TEMP] accepted_after_restart={resumed}"
    ));
}

/// Issue #16: with a MySQL userbase, powersmtp and powerpop start while the
/// database is down, answer with temporary errors (SMTP 4xx, POP3
/// `-ERR [SYS/TEMP]`), and serve once it is back, without a restart.
#[test]
fn frontends_start_while_the_database_is_down() {
    if !mariadbd_installed() {
        if std::env::var("PM_SKIP_MARIADB").as_deref() == Ok("1") {
            report("fault MariaDB down at start: SKIPPED (PM_SKIP_MARIADB=1)");
            return;
        }
        panic!("mariadbd is not installed: install mariadb-server (as .ci/run does) or set PM_SKIP_MARIADB=1");
    }
    let _g = serial();
    let db = Mariadb::start("powermail_sys");
    let url = db.url();
    // Schema and users made by the tools' path (which migrates), then the database dies.
    add_users(&url, 1);
    db.kill9();
    let root = tempfile::tempdir().expect("tempdir");
    let b = Backend::start(root.path(), 0, root.path().join("disk0"), "");
    let cache = "[userbase_cache]\npositive_ttl_ms = 0\nnegative_ttl_ms = 0\n";
    // Both must come up (before the fix they exited: "daemon exited during start-up").
    let smtp = Frontend::smtp(root.path(), &[&b], &url, 1, "", cache, &[]);
    let pop = Frontend::pop(root.path(), &[&b], &url, "", cache);
    let mut c = Smtp::connect(smtp.addr).expect("connect");
    let msg = message("db-was-down", 600);
    let code = c.send("a@sender.test", &[&user(0)], &msg).expect("send");
    assert!(
        (400..500).contains(&code),
        "database down: a temporary refusal, got {code}"
    );
    c.quit();
    let login = pop_login(pop.addr, 0).err().map(|e| e.to_string());
    let login = login.unwrap_or_else(|| "+OK (logged in)".into());
    assert!(login.contains("[SYS/TEMP]"), "POP login: {login}");
    db.up();
    eventually(
        DEADLINE,
        "powersmtp accepts once the database is back",
        || {
            Smtp::connect(smtp.addr)
                .and_then(|mut c| c.send("a@sender.test", &[&user(0)], &msg))
                .map(|code| code == 250)
                .unwrap_or(false)
        },
    );
    let mut listed = 0;
    eventually(
        DEADLINE,
        "powerpop logs in once the database is back",
        || match pop_login(pop.addr, 0).and_then(|mut p| p.uidl()) {
            Ok(uidl) => {
                listed = uidl.len();
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(listed, 1, "the message accepted after the outage is listed");
    report("fault MariaDB down at start: smtp=4xx pop=[SYS/TEMP] then both served, no restart");
}
