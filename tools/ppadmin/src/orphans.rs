//! `ppadmin orphans` and `ppadmin purge`: mailboxes the store has and the userbase does not.
//!
//! Deleting a mailbox from the userbase (`user del`) leaves its mail on the backends, on
//! purpose: the userbase is the source of truth, a mistaken `del` is undone by adding the
//! mailbox again. `orphans` lists what is left behind; `purge` removes it (`NUKE` on every
//! backend holding it). `purge` asks the userbase once more right before each `NUKE`, so a
//! mailbox re-created meanwhile is kept, and it only acts with `--yes`.

use std::io::Write;

use powermail_proto::MailboxName;
use powermail_userbase::Userbase;

use crate::cluster::ClusterInfo;
use crate::store::{Bid, Store};

/// Mailboxes on any backend that the userbase does not have, with their holders.
fn find(
    store: &mut Store<'_>,
    userbase: &dyn Userbase,
) -> anyhow::Result<Vec<(MailboxName, Vec<Bid>)>> {
    let mut out = Vec::new();
    for (name, on) in store.dir_all() {
        if userbase.get_mailbox(name.as_str())?.is_none() {
            out.push((name, on));
        }
    }
    Ok(out)
}

/// `orphans`: one line per orphan mailbox: name, backends, messages (per backend summed).
pub fn orphans(info: &ClusterInfo, userbase: &dyn Userbase) -> anyhow::Result<()> {
    let mut store = Store::open(info);
    let found = find(&mut store, userbase)?;
    let mut out = std::io::stdout().lock();
    for (name, on) in &found {
        let mut messages = 0;
        let mut bytes = 0;
        for &b in on {
            if let Ok((m, n)) = store.call(b, |c| c.usage(name)) {
                messages += m;
                bytes += n;
            }
        }
        let names: Vec<&str> = on.iter().map(|&b| store.name(b)).collect();
        writeln!(out, "{name}\t{}\t{messages}\t{bytes}", names.join(","))?;
    }
    writeln!(out, "# {} orphan mailboxes", found.len())?;
    Ok(())
}

/// `purge [--yes]`: removes every orphan mailbox from every backend (dry run without `yes`).
pub fn purge(info: &ClusterInfo, userbase: &dyn Userbase, yes: bool) -> anyhow::Result<()> {
    let mut store = Store::open(info);
    let found = find(&mut store, userbase)?;
    let mut out = std::io::stdout().lock();
    let mut removed = 0u64;
    for (name, on) in &found {
        if !yes {
            writeln!(out, "would purge {name}")?;
            continue;
        }
        if userbase.get_mailbox(name.as_str())?.is_some() {
            writeln!(out, "kept {name} (back in the userbase)")?;
            continue;
        }
        for &b in on {
            match store.call(b, |c| c.nuke(name)) {
                Ok(n) => {
                    removed += n;
                    writeln!(out, "purged {name} on {}: {n} messages", store.name(b))?;
                }
                Err(e) => eprintln!("ppadmin: NUKE {name}: {e:#}"),
            }
        }
    }
    if yes {
        writeln!(
            out,
            "# {} orphan mailboxes purged, {removed} messages removed",
            found.len()
        )?;
    } else {
        writeln!(
            out,
            "# {} orphan mailboxes; run again with --yes to remove them",
            found.len()
        )?;
    }
    Ok(())
}
