//! `ppadmin dir`, `list MAILBOX`, `usage MAILBOX`: read-only looks at the store.
//!
//! Output is tab-separated, one item per line, so scripts can `cut` and `awk` it; a
//! closing `#` line sums it up for people. `list` marks every message with fewer than K
//! copies `UNDER` (and sizes that differ between copies `MISMATCH`), which is what an
//! operator checks before and after `repair`.

use std::io::Write;

use anyhow::Context;
use powermail_proto::MailboxName;

use crate::cluster::ClusterInfo;
use crate::store::{human_bytes, Store};

/// Parses a mailbox argument the way the backends validate it.
pub fn mailbox(name: &str) -> anyhow::Result<MailboxName> {
    MailboxName::parse(&name.trim().to_lowercase()).with_context(|| format!("mailbox {name:?}"))
}

/// `dir`: every mailbox on any backend, with the backends that hold it.
pub fn dir(info: &ClusterInfo) -> anyhow::Result<()> {
    let mut store = Store::open(info);
    let all = store.dir_all();
    let mut out = std::io::stdout().lock();
    for (name, on) in &all {
        let names: Vec<&str> = on.iter().map(|&b| store.name(b)).collect();
        writeln!(out, "{name}\t{}", names.join(","))?;
    }
    writeln!(
        out,
        "# {} mailboxes on {} of {} backends",
        all.len(),
        store.up().len(),
        info.backends.len()
    )?;
    Ok(())
}

/// `list MAILBOX`: each message, its size, its copies and where they are. Returns the
/// number of under-replicated messages (the exit status says whether there were any).
pub fn list(info: &ClusterInfo, name: &str) -> anyhow::Result<usize> {
    let mailbox = mailbox(name)?;
    let mut store = Store::open(info);
    let k = info.replicas;
    let held = store.holders(&mailbox);
    let mut out = std::io::stdout().lock();
    let mut under = 0;
    for (msgid, h) in &held {
        let names: Vec<&str> = h.0.iter().map(|&(b, _)| store.name(b)).collect();
        let mut flags = Vec::new();
        if h.copies() < k {
            under += 1;
            flags.push("UNDER");
        }
        if !h.consistent() {
            flags.push("MISMATCH");
        }
        writeln!(
            out,
            "{msgid}\t{}\t{}/{k}\t{}\t{}",
            h.size_bytes(),
            h.copies(),
            names.join(","),
            if flags.is_empty() {
                "ok".to_string()
            } else {
                flags.join(",")
            }
        )?;
    }
    writeln!(
        out,
        "# {mailbox}: {} messages, {under} with fewer than {k} copies, {} of {} backends answered",
        held.len(),
        store.up().len(),
        info.backends.len()
    )?;
    Ok(under)
}

/// `usage MAILBOX`: per backend (`USAGE`), then the mailbox as its owner sees it (each
/// message once, whatever its copies).
pub fn usage(info: &ClusterInfo, name: &str) -> anyhow::Result<()> {
    let mailbox = mailbox(name)?;
    let mut store = Store::open(info);
    let mut out = std::io::stdout().lock();
    for b in store.up() {
        if let Ok((messages, bytes)) = store.call(b, |c| c.usage(&mailbox)) {
            writeln!(out, "{}\t{messages}\t{bytes}", store.name(b))?;
        }
    }
    let held = store.holders(&mailbox);
    let bytes: u64 = held.values().map(|h| h.size_bytes()).sum();
    let stored: u64 = held
        .values()
        .map(|h| h.size_bytes() * h.copies() as u64)
        .sum();
    writeln!(out, "total\t{}\t{bytes}", held.len())?;
    writeln!(
        out,
        "# {mailbox}: {} messages, {} ({} stored with every copy)",
        held.len(),
        human_bytes(bytes),
        human_bytes(stored)
    )?;
    Ok(())
}
