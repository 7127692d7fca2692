//! Issue #15 part 2: the `[IN-USE]` mailbox lock across hosts. Two powerpop
//! processes with separate state directories (so the same-host `flock` cannot
//! see across them: two hosts) share one MariaDB userbase; the lease row in
//! the database is all that keeps them apart.
//!
//! Needs `mariadbd` (as the fault suite's MariaDB cases: `PM_SKIP_MARIADB=1`
//! skips when it is not installed, except under `CI`; otherwise its absence
//! fails the test).

mod common;

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use powermail_testkit::{mariadbd_installed, Mariadb};

/// The lease the two powerpops run with: short, so the kill -9 case waits
/// seconds, not the default 30 s.
const LEASE_MS: u64 = 2_000;

/// Writes a line to the real stderr (libtest captures only the print macros).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// False (after saying so) when the test must be skipped.
fn mariadb_or_skip(case: &str) -> bool {
    if mariadbd_installed() {
        return true;
    }
    // CI must not skip: there a missing MariaDB is a failure.
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    if !ci && std::env::var("PM_SKIP_MARIADB").as_deref() == Ok("1") {
        report(&format!("lease {case}: SKIPPED (PM_SKIP_MARIADB=1)"));
        return false;
    }
    panic!("mariadbd is not installed: install mariadb-server (as .ci/run does) or set PM_SKIP_MARIADB=1");
}

/// The error text of a login of mailbox `i` ("+OK" when it succeeded; the
/// session is then closed without QUIT, so take care).
fn login_text(pop: &Frontend, i: usize) -> String {
    match pop_login(pop.addr, i) {
        Ok(_) => "+OK (logged in)".into(),
        Err(e) => e.to_string(),
    }
}

/// One backend, one powersmtp, two powerpop "hosts", MariaDB; two messages in
/// mailbox 0.
struct Cluster {
    db: Mariadb,
    backend: Backend,
    pop_a: Frontend,
    pop_b: Frontend,
    // Last: the processes go before their directories.
    _dirs: [tempfile::TempDir; 3],
}

impl Cluster {
    fn start() -> Cluster {
        let db = Mariadb::start("powermail_lease");
        let url = db.url();
        add_users(&url, 2);
        let dirs = [(); 3].map(|_| tempfile::tempdir().expect("tempdir"));
        let backend = Backend::start(dirs[0].path(), 0, dirs[0].path().join("disk0"), "");
        let top = format!("lock_lease_ms = {LEASE_MS}\n");
        let pop_a = Frontend::pop(dirs[1].path(), &[&backend], &url, "", &top);
        let pop_b = Frontend::pop(dirs[2].path(), &[&backend], &url, "", &top);
        let smtp = Frontend::smtp(dirs[0].path(), &[&backend], &url, 1, "", "", &[]);
        let mut c = Smtp::connect(smtp.addr).expect("smtp");
        for id in ["lease-1", "lease-2"] {
            let code = c
                .send("a@sender.test", &[&user(0)], &message(id, 700))
                .expect("send");
            assert_eq!(code, 250, "{id}");
        }
        c.quit();
        Cluster {
            db,
            backend,
            pop_a,
            pop_b,
            _dirs: dirs,
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- pop a\n{}\n--- pop b\n{}",
            self.pop_a.log_text(),
            self.pop_b.log_text()
        )
    }
}

/// The reproduction: a mailbox open on one POP host is `[IN-USE]`
/// on the other (before: both answered `+OK maildrop has 2 messages`), and
/// free for the other once the first QUITs.
#[test]
fn a_mailbox_open_on_one_pop_host_is_in_use_on_the_other() {
    if !mariadb_or_skip("in use across hosts") {
        return;
    }
    let _g = serial();
    let c = Cluster::start();
    let mut on_a = pop_login(c.pop_a.addr, 0).expect("login on a");
    assert_eq!(on_a.uidl().expect("uidl").len(), 2);
    let second = login_text(&c.pop_b, 0);
    assert!(
        second.contains("[IN-USE]"),
        "login on b: {second}\n{}",
        c.logs()
    );
    // Another mailbox is not affected.
    pop_login(c.pop_b.addr, 1)
        .expect("another mailbox on b")
        .quit()
        .expect("quit");
    assert!(on_a.quit().expect("quit").starts_with("+OK"));
    // Released at QUIT (before its reply): b gets it at once.
    let mut on_b = pop_login(c.pop_b.addr, 0).expect("released at QUIT");
    assert_eq!(on_b.uidl().expect("uidl").len(), 2);
    let back = login_text(&c.pop_a, 0);
    assert!(
        back.contains("[IN-USE]"),
        "login on a while b holds it: {back}"
    );
    on_b.quit().expect("quit");
    report("lease in use across hosts: second host [IN-USE], released at QUIT");
}

/// A POP host killed -9 mid-session: its mailbox stays locked for at most
/// the lease, then the other host serves it, and the DELE the dead session
/// never committed did not happen.
#[test]
fn a_pop_host_killed_mid_session_frees_the_mailbox_after_the_lease() {
    if !mariadb_or_skip("pop host killed") {
        return;
    }
    let _g = serial();
    let mut c = Cluster::start();
    let mut on_b = pop_login(c.pop_b.addr, 0).expect("login on b");
    assert!(on_b.cmd("DELE 1").expect("dele").starts_with("+OK"));
    c.pop_b.kill9();
    let killed_at = Instant::now();
    drop(on_b);
    // The lease outlives its holder: right after the kill it still holds.
    let at_once = login_text(&c.pop_a, 0);
    assert!(
        at_once.contains("[IN-USE]"),
        "right after the kill: {at_once}"
    );
    let mut on_a = None;
    while killed_at.elapsed() < DEADLINE {
        match pop_login(c.pop_a.addr, 0) {
            Ok(p) => {
                on_a = Some(p);
                break;
            }
            Err(e) => assert!(e.to_string().contains("[IN-USE]"), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited_ms = killed_at.elapsed().as_millis();
    let mut on_a = on_a.unwrap_or_else(|| panic!("never freed\n{}", c.logs()));
    // An upper bound only the bug can break: the lease plus one renewal
    // interval plus generous slack for a loaded machine.
    assert!(
        waited_ms < u128::from(LEASE_MS) + 10_000,
        "free after {waited_ms} ms"
    );
    assert_eq!(
        on_a.uidl().expect("uidl").len(),
        2,
        "the DELE of the dead session was not committed"
    );
    on_a.quit().expect("quit");
    report(&format!(
        "lease pop host killed: mailbox free after {waited_ms} ms (lease {LEASE_MS} ms), uncommitted DELE kept"
    ));
}

/// The database down when a lock is to be taken: `-ERR [SYS/TEMP]`, never a
/// login, even though the password is in powerpop's login cache.
#[test]
fn no_lock_is_granted_while_the_database_is_down() {
    if !mariadb_or_skip("database down") {
        return;
    }
    let _g = serial();
    let c = Cluster::start();
    // Warm the login cache, then lose the database.
    pop_login(c.pop_a.addr, 0)
        .expect("login")
        .quit()
        .expect("quit");
    c.db.kill9();
    let login = login_text(&c.pop_a, 0);
    assert!(
        login.contains("[SYS/TEMP]"),
        "login with the database down: {login}"
    );
    c.db.up();
    let mut p = None;
    let start = Instant::now();
    while p.is_none() && start.elapsed() < DEADLINE {
        p = pop_login(c.pop_a.addr, 0).ok();
        std::thread::sleep(Duration::from_millis(100));
    }
    p.expect("served again once the database is back")
        .quit()
        .expect("quit");
    report("lease database down: [SYS/TEMP], served again after restart");
}

/// A session whose lease was taken over (here: its row deleted by hand, as
/// when it expired while the database was unreachable and another host took
/// the mailbox) deletes nothing at QUIT and says so.
#[test]
fn a_session_that_lost_its_lease_deletes_nothing() {
    if !mariadb_or_skip("lease lost") {
        return;
    }
    let _g = serial();
    let c = Cluster::start();
    let mut on_a = pop_login(c.pop_a.addr, 0).expect("login on a");
    assert!(on_a.cmd("DELE 1").expect("dele").starts_with("+OK"));
    c.db.sql("DELETE FROM mailbox_leases");
    let on_b = pop_login(c.pop_b.addr, 0).expect("b takes the free mailbox");
    let quit = on_a.quit().expect("quit");
    assert!(
        quit.starts_with("-ERR [SYS/TEMP]"),
        "QUIT after losing the lease: {quit}"
    );
    on_b.quit().expect("quit");
    let mut check = pop_login(c.pop_a.addr, 0).expect("login");
    assert_eq!(check.uidl().expect("uidl").len(), 2, "nothing was deleted");
    check.quit().expect("quit");
    report("lease lost: QUIT -ERR [SYS/TEMP], nothing deleted");
}

/// `ppadmin repair` takes the same lease: with a reader on another host
/// holding the mailbox, repair skips it as busy.
#[test]
fn ppadmin_repair_respects_a_lease_held_on_another_host() {
    if !mariadb_or_skip("ppadmin repair") {
        return;
    }
    let _g = serial();
    let c = Cluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = dir.path().join("cluster.toml");
    std::fs::write(
        &cluster,
        format!(
            "replicas = 1\nsecret = \"{SECRET}\"\npop_userbase = \"{}\"\nlock_lease_ms = {LEASE_MS}\n\
             [[backend]]\nname = \"{}\"\naddr = \"{}\"\n",
            c.db.url(),
            c.backend.name,
            c.backend.addr
        ),
    )
    .expect("cluster file");
    let repair = || {
        Command::new(powermail_testkit::bin("ppadmin"))
            .arg("--cluster")
            .arg(&cluster)
            .args(["repair", "--mailbox", &user(0), "--lock-wait-ms", "300"])
            .output()
            .expect("ppadmin")
    };
    let on_a = pop_login(c.pop_a.addr, 0).expect("login on a");
    let busy = repair();
    let text = String::from_utf8_lossy(&busy.stdout).into_owned();
    assert!(
        text.contains("1 busy"),
        "repair while a reader holds it: {text}"
    );
    assert!(!busy.status.success(), "busy is incomplete");
    on_a.quit().expect("quit");
    let free = repair();
    let text = String::from_utf8_lossy(&free.stdout).into_owned();
    assert!(
        text.contains("0 busy"),
        "repair after QUIT: {text} {}",
        String::from_utf8_lossy(&free.stderr)
    );
    // ppadmin released its lease: the reader gets the mailbox.
    pop_login(c.pop_b.addr, 0)
        .expect("free after repair")
        .quit()
        .expect("quit");
    report("lease ppadmin repair: busy while a reader on another host holds the mailbox");
}
