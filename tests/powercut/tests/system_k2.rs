//! The whole system under a power cut: powersmtp with K = 2 over two
//! backends, each on its own crash disk (journaled ext4 on a loop device).
//! The power of one disk is cut in the middle of an SMTP blast. Then every
//! message that got a `250` must be on the other backend, intact, and
//! listed exactly once over POP3; after the cut backend is recovered (fsck,
//! mount, restart), `ppadmin repair` must restore two copies of each.
//!
//! Needs root; skips with a message otherwise.

#[path = "../../system/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{message, retrieve_all, sha, sqlite_userbase, user, Backend, Frontend, Smtp, SECRET};
use powermail_powercut::rig::{self, unmount, CrashDisk, FsKind, LoopDev};

/// Mailboxes of the blast.
const USERS: usize = 16;
/// SMTP sessions sending at once.
const SENDERS: usize = 6;
/// 250s to see before the cut.
const ACKED_BEFORE_CUT: usize = 150;
/// How long the blast goes on after the cut.
const BLAST_AFTER_CUT: Duration = Duration::from_millis(1500);

/// One disk of the system: crash disk, loop device, mounted ext4.
struct Stack {
    image: std::path::PathBuf,
    fuse: std::path::PathBuf,
    mnt: std::path::PathBuf,
    log: std::path::PathBuf,
    disk: Option<CrashDisk>,
    lo: Option<LoopDev>,
}

impl Stack {
    fn create(root: &std::path::Path, i: usize) -> Stack {
        let image = root.join(format!("disk{i}.img"));
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(FsKind::Ext4Journal.image_size_bytes())
            .expect("size image");
        let mut s = Stack {
            image,
            fuse: root.join(format!("fuse{i}")),
            mnt: root.join(format!("fs{i}")),
            log: root.join(format!("crashdisk{i}.log")),
            disk: None,
            lo: None,
        };
        s.up(true);
        s
    }

    /// Starts the crash disk and mounts the file system (formatting it
    /// first, or recovering it as after an outage).
    fn up(&mut self, format: bool) {
        let disk = CrashDisk::start(&self.image, &self.fuse, "drop-all", 1, &self.log);
        let lo = LoopDev::attach(&disk.image());
        if format {
            FsKind::Ext4Journal.mkfs(&lo.dev);
        } else {
            FsKind::Ext4Journal.recover(&lo.dev, &self.mnt);
        }
        FsKind::Ext4Journal.mount(&lo.dev, &self.mnt);
        self.disk = Some(disk);
        self.lo = Some(lo);
    }

    fn data(&self) -> std::path::PathBuf {
        self.mnt.join("data")
    }

    fn cut(&self) {
        self.disk.as_ref().expect("disk up").cut();
    }

    fn down(&mut self) {
        unmount(&self.mnt);
        if let Some(lo) = self.lo.take() {
            lo.detach();
        }
        if let Some(d) = self.disk.take() {
            d.stop();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.down();
    }
}

/// One message sent: (id, mailbox index, SHA-256, final SMTP code; 0 = no answer).
type Sent = (String, usize, [u8; 32], u16);

/// Sends messages `pc-<n>` until stopped, pushing each one's [`Sent`] to `out`.
fn blast(
    smtp: std::net::SocketAddr,
    stop: &AtomicBool,
    acked: &AtomicUsize,
    next: &AtomicUsize,
    out: &Mutex<Vec<Sent>>,
) {
    let mut conn: Option<Smtp> = None;
    while !stop.load(Relaxed) {
        let i = next.fetch_add(1, Relaxed);
        let id = format!("pc-{i:06}");
        let mailbox = i % USERS;
        let size = if i % 40 == 7 {
            1 << 20
        } else {
            2000 + (i * 997) % 30_000
        };
        let msg = message(&id, size);
        if conn.is_none() {
            conn = Smtp::connect(smtp).ok();
        }
        let code = match conn.as_mut() {
            Some(c) => c
                .send("blast@sender.test", &[&user(mailbox)], &msg)
                .unwrap_or(0),
            None => 0,
        };
        if code == 0 || code == 421 {
            conn = None;
        }
        if code == 250 {
            acked.fetch_add(1, Relaxed);
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
        out.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, mailbox, sha(&msg), code));
    }
}

/// How many copies of each acknowledged id `b` holds intact (by its links
/// and the bytes of each stored body from the id header on).
fn copies_on(b: &Backend, acked: &HashMap<String, (usize, [u8; 32])>) -> HashMap<String, usize> {
    let mut conn = b.conn();
    let mut out = HashMap::new();
    for u in 0..USERS {
        let mb = powermail_proto::MailboxName::parse(&user(u)).expect("mailbox");
        for entry in conn.list(&mb, 100_000).expect("LIST") {
            let body = conn.get(&mb, &entry.msgid).expect("GET");
            if let Some((id, hash)) = common::identify(&body) {
                if acked.get(&id).is_some_and(|(m, h)| *m == u && *h == hash) {
                    *out.entry(id).or_default() += 1;
                }
            }
        }
    }
    out
}

#[test]
fn k2_power_cut_on_one_backend_mid_blast() {
    if powermail_testkit::skip_unless_root("powercut system K=2", "FUSE, losetup, mount") {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("powercut-sys-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path();
    let mut stacks = [Stack::create(root, 0), Stack::create(root, 1)];
    let mut b0 = Backend::start(root, 0, stacks[0].data(), "free_bytes_min = 0");
    let mut b1 = Backend::start(root, 1, stacks[1].data(), "free_bytes_min = 0");
    let userbase = sqlite_userbase(root, USERS);
    let smtp = Frontend::smtp(root, &[&b0, &b1], &userbase, 2, "", "", &[]);
    let pop = Frontend::pop(root, &[&b0, &b1], &userbase, "", "");

    let stop = AtomicBool::new(false);
    let acked = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..SENDERS {
            s.spawn(|| blast(smtp.addr, &stop, &acked, &next, &out));
        }
        let t = Instant::now();
        while acked.load(Relaxed) < ACKED_BEFORE_CUT && t.elapsed() < rig::DEADLINE {
            std::thread::sleep(Duration::from_millis(10));
        }
        stacks[1].cut();
        std::thread::sleep(BLAST_AFTER_CUT);
        stop.store(true, Relaxed);
    });
    b1.kill9();
    stacks[1].down();

    let sent = out.into_inner().unwrap_or_else(|e| e.into_inner());
    let acked: HashMap<String, (usize, [u8; 32])> = sent
        .iter()
        .filter(|(_, _, _, code)| *code == 250)
        .map(|(id, m, h, _)| (id.clone(), (*m, *h)))
        .collect();
    assert!(
        acked.len() >= ACKED_BEFORE_CUT,
        "only {} acknowledged",
        acked.len()
    );

    // With b1's disk dead: every 250 intact on b0, and listed once over POP3.
    let got = retrieve_all(pop.addr, USERS, 4);
    let mut lost = 0;
    let mut duplicated = 0;
    let mut corrupt = 0;
    for (id, (m, h)) in &acked {
        match got.get(id).map(Vec::as_slice) {
            None | Some([]) => lost += 1,
            Some([(mb, _, hash)]) => corrupt += usize::from(mb != m || hash != h),
            Some(_) => duplicated += 1,
        }
    }
    let on_b0 = copies_on(&b0, &acked);
    let missing_b0 = acked.keys().filter(|id| !on_b0.contains_key(*id)).count();

    // Recover b1 as after an outage, then repair to K = 2.
    stacks[1].up(false);
    b1.restart();
    let cluster = root.join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "replicas = 2\nsecret = \"{SECRET}\"\n[[backend]]\nname = \"b0\"\naddr = \"{}\"\n\
             [[backend]]\nname = \"b1\"\naddr = \"{}\"\n",
            b0.addr, b1.addr
        ),
    )
    .expect("cluster file");
    let repair = rig::output(
        std::process::Command::new(rig::bin("ppadmin"))
            .arg("--cluster")
            .arg(&cluster)
            .arg("repair"),
    );
    let on_b1 = copies_on(&b1, &acked);
    let short_after_repair = acked
        .keys()
        .filter(|id| !(on_b0.contains_key(*id) && on_b1.contains_key(*id)))
        .count();
    let got_after = retrieve_all(pop.addr, USERS, 4);
    let listed_twice_after = acked
        .keys()
        .filter(|id| got_after.get(*id).map_or(0, Vec::len) != 1)
        .count();

    // Straight to stderr: libtest captures eprintln!, and this line is the result.
    let _ = writeln!(
        std::io::stderr(),
        "powercut system K=2: sent {}, acknowledged {}, lost {lost}, duplicated {duplicated}, \
         corrupt {corrupt}, missing on the surviving backend {missing_b0}, short of K after \
         repair {short_after_repair}, not listed exactly once after repair {listed_twice_after}, \
         {:.1} s\nppadmin repair: {}{}",
        sent.len(),
        acked.len(),
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    assert_eq!(
        (lost, duplicated, corrupt, missing_b0),
        (0, 0, 0, 0),
        "after the cut"
    );
    assert!(repair.status.success(), "ppadmin repair failed");
    assert_eq!(short_after_repair, 0, "repair restores K copies");
    assert_eq!(listed_twice_after, 0, "listed once after the repair");
    drop(pop);
    drop(smtp);
    b0.kill9();
    b1.kill9();
    for s in &mut stacks {
        s.down();
    }
}
