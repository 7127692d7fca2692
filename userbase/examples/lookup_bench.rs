//! Look-ups per second of the userbase, SQLite and MySQL/MariaDB, with 10,000 mailboxes:
//! uncached (every look-up a query), cache cold (first pass through `CachedUserbase`, all
//! misses) and cache warm (second pass, all hits).
//!
//! Not a test: run it with `--release` and copy the table into `bench/RESULTS.md`.
//!
//! ```sh
//! cargo run --release -p powermail-userbase --example lookup_bench            # SQLite only
//! PM_TEST_MYSQL_URL=mysql://root@127.0.0.1:3306/powermail_test \
//!     cargo run --release -p powermail-userbase --example lookup_bench        # + MariaDB
//! ```
//! With MySQL it uses (and recreates) the database `<db>_bench`.

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use powermail_userbase::{open, CacheConfig, CachedUserbase, Userbase};
use rand::seq::SliceRandom;

/// Mailboxes in the userbase.
const MAILBOXES: usize = 10_000;
/// Rows per multi-row INSERT when filling MySQL.
const INSERT_BATCH: usize = 500;

fn name(i: usize) -> String {
    format!("user{i:05}@bench.example")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let sqlite_path = dir.path().join("bench.db");
    let sqlite_url = format!("sqlite://{}", sqlite_path.display());
    drop(open(&sqlite_url)?); // creates the schema
    fill_sqlite(&sqlite_path)?;
    println!("| database | mode | look-ups | seconds | look-ups/s |");
    println!("|---|---|---:|---:|---:|");
    run("SQLite", &sqlite_url)?;

    match std::env::var("PM_TEST_MYSQL_URL") {
        Ok(url) if !url.is_empty() => {
            let url = fresh_mysql(&url)?;
            drop(open(&url)?);
            fill_mysql(&url)?;
            run("MariaDB", &url)?;
        }
        _ => eprintln!("skipping MySQL: PM_TEST_MYSQL_URL unset"),
    }
    Ok(())
}

/// Runs every mode against one database and prints a table row each.
fn run(label: &str, url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut names: Vec<String> = (0..MAILBOXES).map(name).collect();
    names.shuffle(&mut rand::thread_rng());
    let missing: Vec<String> = (0..MAILBOXES)
        .map(|i| format!("nobody{i}@bench.example"))
        .collect();

    let direct = open(url)?;
    // The first pass also warms the database's own caches (and MySQL's prepared statements).
    let (n, t) = timed(direct.as_ref(), &names, true)?;
    report(label, "uncached, hit, 1st pass", n, t);
    let (n, t) = timed(direct.as_ref(), &names, true)?;
    report(label, "uncached, hit, 2nd pass", n, t);
    let (n, t) = timed(direct.as_ref(), &missing, false)?;
    report(label, "uncached, miss", n, t);

    let cached = CachedUserbase::new(
        open(url)?,
        CacheConfig {
            max_entries: 2 * MAILBOXES,
            ..CacheConfig::default()
        },
    );
    let (n, t) = timed(&cached, &names, true)?;
    report(label, "cache cold", n, t);
    let (n, t) = timed(&cached, &names, true)?;
    report(label, "cache warm", n, t);
    Ok(())
}

/// Looks every name up once; checks each answer.
fn timed(
    ub: &dyn Userbase,
    names: &[String],
    expect_found: bool,
) -> Result<(usize, Duration), Box<dyn std::error::Error>> {
    let start = Instant::now();
    for name in names {
        let found = ub.lookup(name)?.is_some();
        assert_eq!(found, expect_found, "{name}");
    }
    Ok((names.len(), start.elapsed()))
}

fn report(label: &str, mode: &str, n: usize, t: Duration) {
    println!(
        "| {label} | {mode} | {n} | {:.3} | {:.0} |",
        t.as_secs_f64(),
        n as f64 / t.as_secs_f64()
    );
}

/// A realistic stored hash (not verified by look-ups, so one value for all rows).
fn some_hash() -> String {
    powermail_userbase::password::hash("bench")
}

fn fill_sqlite(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut conn = rusqlite::Connection::open(path)?;
    let hash = some_hash();
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare("INSERT INTO mailboxes (name, password) VALUES (?1, ?2)")?;
        for i in 0..MAILBOXES {
            insert.execute((name(i), &hash))?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Recreates `<db>_bench` on the server of `url`; returns its URL.
fn fresh_mysql(url: &str) -> Result<String, Box<dyn std::error::Error>> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let after_scheme = base.strip_prefix("mysql://").ok_or("not a mysql:// URL")?;
    let (authority, db) = after_scheme.split_once('/').unwrap_or((after_scheme, ""));
    let server = format!("mysql://{authority}/");
    let db = format!(
        "{}_bench",
        if db.is_empty() { "powermail_test" } else { db }
    );
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&server)?)?;
    conn.query_drop(format!("DROP DATABASE IF EXISTS `{db}`"))?;
    conn.query_drop(format!("CREATE DATABASE `{db}`"))?;
    Ok(if query.is_empty() {
        format!("{server}{db}")
    } else {
        format!("{server}{db}?{query}")
    })
}

fn fill_mysql(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let base = url.split('?').next().unwrap_or(url);
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(base)?)?;
    let hash = some_hash();
    for start in (0..MAILBOXES).step_by(INSERT_BATCH) {
        let end = (start + INSERT_BATCH).min(MAILBOXES);
        let placeholders = vec!["(?, ?)"; end - start].join(", ");
        let mut params: Vec<mysql::Value> = Vec::with_capacity(2 * (end - start));
        for i in start..end {
            params.push(name(i).into());
            params.push(hash.clone().into());
        }
        conn.exec_drop(
            format!("INSERT INTO mailboxes (name, password) VALUES {placeholders}"),
            params,
        )?;
    }
    Ok(())
}
