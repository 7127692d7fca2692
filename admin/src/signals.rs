//! The two signal rules every PowerMail daemon follows, written once.
//!
//! `SIGHUP` re-reads the configuration ([`on_sighup`]); the first `SIGTERM` or
//! `SIGINT` starts a graceful stop and a second one ends the process at once
//! ([`on_sigterm`]). Each runs on a thread of its own, never in a signal
//! handler (signal-hook's iterator).

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// Calls `reload` (on a thread of its own) every time the process gets `SIGHUP`.
pub fn on_sighup(reload: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP])?;
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                reload();
            }
        })?;
    Ok(())
}

/// Graceful stop: on the first `SIGTERM` (or `SIGINT`), calls `stop` once on a thread of
/// its own; `stop` stops accepting, waits for open work within the grace period and
/// ends the process. A second signal while it drains ends the process at once, with
/// status 1.
pub fn on_sigterm(stop: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("sigterm".into())
        .spawn(move || {
            if signals.forever().next().is_none() {
                return;
            }
            if let Err(e) = std::thread::Builder::new().name("drain".into()).spawn(stop) {
                log::error!("cannot start draining ({e}): exiting now");
                std::process::exit(1);
            }
            if signals.forever().next().is_some() {
                log::warn!("second stop signal: exiting now");
                std::process::exit(1);
            }
        })?;
    Ok(())
}
