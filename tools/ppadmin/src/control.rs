//! Runtime switches: `readonly|readwrite BACKEND`, `loglevel LEVEL`, `disable|enable
//! BACKEND` and `reload`.
//!
//! The read-only switch is the backend's own (PPL/1 `READONLY`/`READWRITE`, persisted on
//! its disk), so it works with or without admin ports. The others are admin-port calls
//! (`POST /control/<action>`): `loglevel` to every daemon (or `--daemon NAME`), `disable`,
//! `enable` and `reload` to every frontend, since those are the ones with a backend list
//! and a configuration file to re-read. One line per daemon says what it answered; any
//! daemon that failed makes the whole command fail.

use anyhow::bail;

use crate::cluster::{ClusterInfo, Daemon};
use powermail_admin::client as http;

/// `readonly BACKEND` / `readwrite BACKEND`.
pub fn set_readonly(info: &ClusterInfo, name: &str, on: bool) -> anyhow::Result<()> {
    let backend = info.backend(name)?;
    let mut conn = info.connect(backend)?;
    conn.set_readonly(on)?;
    let mode = conn
        .status()?
        .into_iter()
        .find(|(k, _)| k == "mode")
        .map(|(_, v)| v)
        .unwrap_or_default();
    println!("{}\t{mode}", backend.name);
    Ok(())
}

/// The daemons an action goes to: `only` by name, else those `default` selects.
fn targets<'a>(
    info: &'a ClusterInfo,
    only: Option<&str>,
    default: impl Fn(&Daemon) -> bool,
) -> anyhow::Result<Vec<&'a Daemon>> {
    let chosen: Vec<&Daemon> = match only {
        Some(name) => info.daemons.iter().filter(|d| d.name == name).collect(),
        None => info.daemons.iter().filter(|d| default(d)).collect(),
    };
    if chosen.is_empty() {
        let names: Vec<&str> = info.daemons.iter().map(|d| d.name.as_str()).collect();
        bail!(
            "no matching daemon with an admin port (known: {})",
            names.join(", ")
        );
    }
    Ok(chosen)
}

/// Sends one control action to each daemon in `to`, printing each answer.
fn send(
    info: &ClusterInfo,
    to: &[&Daemon],
    action: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<()> {
    let mut failed = 0;
    for d in to {
        match http::control(&d.addr, info.token_for(d).as_deref(), action, query) {
            Ok(text) => println!("{}\t{}", d.name, text.replace('\n', "; ")),
            Err(e) => {
                failed += 1;
                eprintln!("ppadmin: {}: {e:#}", d.name);
            }
        }
    }
    if failed > 0 {
        bail!("{action}: {failed} of {} daemons failed", to.len());
    }
    Ok(())
}

/// `loglevel LEVEL [--daemon NAME]`.
pub fn loglevel(info: &ClusterInfo, level: &str, only: Option<&str>) -> anyhow::Result<()> {
    let to = targets(info, only, |_| true)?;
    send(info, &to, "loglevel", &[("level", level)])
}

/// `disable BACKEND` / `enable BACKEND` on the frontends: no new messages go to a
/// disabled backend; reads still use it while it answers.
pub fn set_enabled(
    info: &ClusterInfo,
    backend: &str,
    on: bool,
    only: Option<&str>,
) -> anyhow::Result<()> {
    let name = info.backend(backend)?.name.clone();
    let to = targets(info, only, Daemon::is_frontend)?;
    let action = if on { "enable" } else { "disable" };
    send(info, &to, action, &[("backend", &name)])
}

/// `reload [--daemon NAME]`: the frontends re-read their configuration file.
pub fn reload(info: &ClusterInfo, only: Option<&str>) -> anyhow::Result<()> {
    let to = targets(info, only, Daemon::is_frontend)?;
    send(info, &to, "reload", &[])
}
