//! End-to-end: the real `ppadmin` binary against a temporary SQLite userbase, and against
//! MySQL/MariaDB when `PM_TEST_MYSQL_URL` is set (required when `CI` is set).

use std::path::Path;
use std::process::{Command, Output};

use mysql::prelude::Queryable;

fn ppadmin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ppadmin"))
        .args(args)
        .output()
        .expect("run ppadmin")
}

/// Runs ppadmin, asserts success, returns stdout.
fn ok(args: &[&str]) -> String {
    let out = ppadmin(args);
    assert!(
        out.status.success(),
        "ppadmin {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// The scenario, with `target` = the global options selecting the userbase.
fn scenario(target: &[&str], url: &str) {
    let with = |rest: &[&str]| -> Vec<String> {
        target.iter().chain(rest).map(|s| s.to_string()).collect()
    };
    let run = |rest: &[&str]| ok(&with(rest).iter().map(String::as_str).collect::<Vec<_>>());
    let fail = |rest: &[&str]| ppadmin(&with(rest).iter().map(String::as_str).collect::<Vec<_>>());

    assert_eq!(
        run(&[
            "user",
            "add",
            "Info@Company.biz",
            "--password",
            "first",
            "--quota-bytes",
            "1000"
        ]),
        "added info@company.biz\n"
    );
    run(&[
        "user",
        "add",
        "fwd@company.biz",
        "--password",
        "pw",
        "--forward",
        "a@elsewhere.org",
        "--forward",
        "b@elsewhere.org",
        "--keep-copy",
    ]);
    assert_eq!(
        run(&["user", "list"]),
        "fwd@company.biz\t0\tenabled\ta@elsewhere.org,b@elsewhere.org(+copy)\ninfo@company.biz\t1000\tenabled\t-\n"
    );
    let dup = fail(&["user", "add", "info@company.biz", "--password", "x"]);
    assert_eq!(dup.status.code(), Some(1), "duplicate is a plain error");

    // The binary and the library agree: the stored hash verifies.
    let ub = powermail_userbase::open(url).expect("open");
    assert!(ub
        .authenticate("info@company.biz", "first")
        .expect("auth")
        .is_some());
    run(&["user", "passwd", "info@company.biz", "--password", "second"]);
    assert!(ub
        .authenticate("info@company.biz", "first")
        .expect("auth")
        .is_none());
    assert!(ub
        .authenticate("info@company.biz", "second")
        .expect("auth")
        .is_some());

    run(&["user", "quota", "info@company.biz", "--bytes", "5"]);
    run(&[
        "user",
        "forward",
        "info@company.biz",
        "--keep-copy",
        "x@y.example",
    ]);
    let show = run(&["user", "show", "INFO@company.biz"]);
    assert!(
        show.contains("quota_bytes: 5\n") && show.contains("forwards: x@y.example\n"),
        "{show}"
    );
    assert!(
        show.contains("keep_local_copy: true\n") && show.contains("password_scheme: ARGON2ID\n"),
        "{show}"
    );
    assert!(!show.contains("$argon2"), "never print the hash");

    run(&["vserver", "add", "127.0.0.1:1110", "Server1.Example"]);
    assert_eq!(
        run(&["vserver", "list"]),
        "127.0.0.1:1110\tserver1.example\n"
    );

    assert_eq!(
        run(&["user", "del", "info@company.biz"]),
        "deleted info@company.biz\n"
    );
    assert_eq!(
        run(&["user", "list"]),
        "fwd@company.biz\t0\tenabled\ta@elsewhere.org,b@elsewhere.org(+copy)\n"
    );
    let gone = fail(&["user", "del", "info@company.biz"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not found"));
    let bad = fail(&["user", "add", "no-at-sign", "--password", "x"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn sqlite_via_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("var");
    let data_str = data.to_str().expect("utf-8 path");
    let url = format!("sqlite://{}", data.join("userbase.db").display());
    scenario(&["--data", data_str], &url);
    assert!(Path::new(&data.join("userbase.db")).exists());
}

#[test]
fn sqlite_via_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("ub.db").display());
    scenario(&["--userbase", &url], &url);
}

#[test]
fn unavailable_userbase_exits_tempfail() {
    let out = ppadmin(&[
        "--userbase",
        "mysql://root@127.0.0.1:1/x?connect_timeout_ms=500",
        "user",
        "list",
    ]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = format!("sqlite://{}/no/such/dir/ub.db", dir.path().display());
    assert_eq!(
        ppadmin(&["--userbase", &missing, "user", "list"])
            .status
            .code(),
        Some(75)
    );
}

#[test]
fn mysql_via_url() {
    let Some(base) = std::env::var("PM_TEST_MYSQL_URL")
        .ok()
        .filter(|url| !url.is_empty())
    else {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but PM_TEST_MYSQL_URL is unset: run `.ci/mariadb.sh start` and export the URL it prints");
        }
        eprintln!("skipping MySQL: PM_TEST_MYSQL_URL unset");
        return;
    };
    let (base, query) = base.split_once('?').unwrap_or((&base, ""));
    let after_scheme = base.strip_prefix("mysql://").expect("mysql:// URL");
    let (authority, db) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    let server = format!("mysql://{authority}/");
    let name = format!(
        "{}_ppadmin_cli",
        if db.is_empty() { "powermail_test" } else { db }
    );
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&server).expect("url")).expect("connect");
    conn.query_drop(format!("DROP DATABASE IF EXISTS `{name}`"))
        .expect("drop");
    conn.query_drop(format!("CREATE DATABASE `{name}`"))
        .expect("create");
    let url = if query.is_empty() {
        format!("{server}{name}")
    } else {
        format!("{server}{name}?{query}")
    };
    scenario(&["--userbase", &url], &url);
}
