//! `ppadmin` — the operator's command-line tool.
//!
//! This file only parses the command line and dispatches: each group of verbs lives in its
//! own module — `user`, `vserver` (the userbase); `status` (admin ports); `inspect` (`dir`,
//! `list`, `usage`), `repair` (`repair`, `drain`), `orphans` (`orphans`, `purge`) over the
//! store; `control` (run-time switches). `cluster` finds the backends and admin ports,
//! `store` talks to all backends at once, `http` to the admin ports.
//!
//! Exit status: 0 on success, 1 on a usage or data error (unknown mailbox, duplicate, bad
//! name, a daemon that refused), 2 when the store is not as it should be (`list` found
//! messages with fewer than K copies, `repair` or `drain` could not finish), 75
//! (`EX_TEMPFAIL`) when the userbase is unavailable — retrying may help.

mod cluster;
mod control;
mod inspect;
mod orphans;
mod repair;
mod status;
mod store;
mod user;
mod vserver;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use powermail_frontend::settings::redact_url;
use powermail_userbase::{Userbase, UserbaseError};

/// Exit status when the userbase cannot be reached (sysexits.h `EX_TEMPFAIL`).
const EXIT_TEMPFAIL: u8 = 75;

/// Exit status when the store is short of copies or a repair/drain did not finish.
const EXIT_INCOMPLETE: u8 = 2;

/// PowerMail administration.
#[derive(Debug, Parser)]
#[command(name = "ppadmin", version, about)]
struct Cli {
    #[command(flatten)]
    target: UserbaseTarget,
    #[command(subcommand)]
    command: Command,
}

/// Which userbase the `user` and `vserver` verbs change.
#[derive(Debug, Args)]
pub struct UserbaseTarget {
    /// Data directory of a `powermail up` tree; the userbase is `DIR/userbase.db`.
    /// Defaults to `./var` when `--userbase` is not given.
    #[arg(long, value_name = "DIR", global = true, conflicts_with = "userbase")]
    data: Option<PathBuf>,
    /// Userbase URL: `sqlite:///path.db`, `sqlite://relative.db` or
    /// `mysql://user:pass@host:port/db`.
    #[arg(long, value_name = "URL", global = true)]
    userbase: Option<String>,
    /// Cluster file (backends, secret, K, admin ports; see examples/ppadmin.toml) for
    /// deployments that are not a `powermail up` tree. Default: read `DIR/etc/*.toml`.
    #[arg(long, value_name = "FILE", global = true)]
    cluster: Option<PathBuf>,
}

impl UserbaseTarget {
    /// The backends and admin ports: `--cluster FILE`, else the `--data` tree's configs.
    pub fn cluster(&self) -> anyhow::Result<cluster::ClusterInfo> {
        match &self.cluster {
            Some(file) => cluster::ClusterInfo::from_file(file),
            None => {
                let dir = self.data.clone().unwrap_or_else(|| PathBuf::from("./var"));
                cluster::ClusterInfo::from_up_tree(&dir)
            }
        }
    }
}

impl UserbaseTarget {
    /// Opens the chosen userbase (creating the data directory for `--data`).
    pub fn open(&self) -> anyhow::Result<Box<dyn Userbase>> {
        let url = match (&self.userbase, &self.data) {
            (Some(url), _) => url.clone(),
            (None, data) => {
                let dir = data.clone().unwrap_or_else(|| PathBuf::from("./var"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating data directory {}", dir.display()))?;
                format!("sqlite://{}", dir.join("userbase.db").display())
            }
        };
        powermail_userbase::open(&url)
            .with_context(|| format!("opening userbase {}", redact_url(&url)))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mailboxes: add, del, passwd, quota, forward, enable, disable, list, show.
    User {
        #[command(subcommand)]
        command: user::UserCommand,
    },
    /// Virtual servers: default domain per listening address.
    Vserver {
        #[command(subcommand)]
        command: vserver::VserverCommand,
    },
    /// The userbase itself: `migrate` brings its schema up to date (the frontends
    /// only do so with `userbase_migrate = true`).
    Userbase {
        #[command(subcommand)]
        command: UserbaseCommand,
    },
    /// Every backend and daemon: up/down, mode, free space, connections, rates, latency
    /// percentiles, and latency histograms.
    Status {
        /// Time between the two stats samples the rates come from (0: no rates).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Every daemon's raw statistics (`GET /stats`) as JSON.
    Stats {
        /// Only this daemon (pplistener, powersmtp, powerpop).
        #[arg(long)]
        daemon: Option<String>,
    },
    /// Every mailbox on any backend, and which backends hold it.
    Dir,
    /// A mailbox's messages: size, copies/K, holders; `UNDER` when fewer than K copies.
    List { mailbox: String },
    /// A mailbox's messages and bytes, per backend and in total (each message once).
    Usage { mailbox: String },
    /// Copy every message with fewer than K copies until it has K (resumable).
    Repair {
        /// Only this mailbox.
        #[arg(long)]
        mailbox: Option<String>,
        /// How long to wait for a mailbox a POP3 session holds before skipping it.
        #[arg(long, default_value_t = 10_000)]
        lock_wait_ms: u64,
    },
    /// Make a backend read-only and move all its messages to others, keeping K copies.
    Drain {
        backend: String,
        /// How long to wait for a mailbox a POP3 session holds before skipping it.
        #[arg(long, default_value_t = 10_000)]
        lock_wait_ms: u64,
    },
    /// Mailboxes on the backends that the userbase no longer has.
    Orphans,
    /// Remove orphan mailboxes from every backend (a dry run without --yes).
    Purge {
        /// Really remove them.
        #[arg(long)]
        yes: bool,
    },
    /// Make a backend refuse new messages (persisted by the backend).
    Readonly { backend: String },
    /// Let a backend take new messages again.
    Readwrite { backend: String },
    /// Set the log level (error, warn, info, debug, trace) of every daemon, or of one.
    Loglevel {
        level: String,
        /// Only this daemon (pplistener, powersmtp, powerpop).
        #[arg(long)]
        daemon: Option<String>,
    },
    /// Tell the frontends to send no new messages to a backend (reads still use it).
    Disable {
        backend: String,
        /// Only this frontend.
        #[arg(long)]
        daemon: Option<String>,
    },
    /// Undo `disable`.
    Enable {
        backend: String,
        /// Only this frontend.
        #[arg(long)]
        daemon: Option<String>,
    },
    /// Make the frontends re-read their configuration file (existing connections stay).
    Reload {
        /// Only this frontend.
        #[arg(long)]
        daemon: Option<String>,
    },
}

/// Verbs on the userbase database itself.
#[derive(Debug, Subcommand)]
enum UserbaseCommand {
    /// Apply pending schema migrations (safe to run again; serialised between processes).
    Migrate,
}

/// Runs one store or admin verb; `Ok(false)` means "done, but incomplete" (exit 2).
fn run_ops(target: &UserbaseTarget, command: Command) -> anyhow::Result<bool> {
    let info = target.cluster()?;
    let info = &info;
    match command {
        Command::User { .. } | Command::Vserver { .. } | Command::Userbase { .. } => {
            unreachable!("userbase verbs")
        }
        Command::Status { interval_ms } => {
            status::status(info, Duration::from_millis(interval_ms))?
        }
        Command::Stats { daemon } => status::stats(info, daemon.as_deref())?,
        Command::Dir => inspect::dir(info)?,
        Command::List { mailbox } => return Ok(inspect::list(info, &mailbox)? == 0),
        Command::Usage { mailbox } => inspect::usage(info, &mailbox)?,
        Command::Repair {
            mailbox,
            lock_wait_ms,
        } => {
            let locks = repair::PopLocks::new(info, Duration::from_millis(lock_wait_ms))?;
            let t = repair::repair(info, mailbox.as_deref(), &locks)?;
            println!(
                "repair: {} mailboxes, {} messages, {} copies made ({} bytes), {} short of K, {} failed, {} busy, {} vanished",
                t.mailboxes, t.messages, t.copied, t.bytes, t.short, t.failed, t.busy, t.vanished
            );
            return Ok(t.complete());
        }
        Command::Drain {
            backend,
            lock_wait_ms,
        } => {
            let locks = repair::PopLocks::new(info, Duration::from_millis(lock_wait_ms))?;
            let t = repair::drain(info, &backend, &locks)?;
            println!(
                "drain {backend}: {} messages moved, {} copies made ({} bytes), {} short of K, {} failed, {} busy, {} vanished",
                t.moved, t.copied, t.bytes, t.short, t.failed, t.busy, t.vanished
            );
            return Ok(t.complete());
        }
        Command::Orphans => orphans::orphans(info, target.open()?.as_ref())?,
        Command::Purge { yes } => orphans::purge(info, target.open()?.as_ref(), yes)?,
        Command::Readonly { backend } => control::set_readonly(info, &backend, true)?,
        Command::Readwrite { backend } => control::set_readonly(info, &backend, false)?,
        Command::Loglevel { level, daemon } => control::loglevel(info, &level, daemon.as_deref())?,
        Command::Disable { backend, daemon } => {
            control::set_enabled(info, &backend, false, daemon.as_deref())?
        }
        Command::Enable { backend, daemon } => {
            control::set_enabled(info, &backend, true, daemon.as_deref())?
        }
        Command::Reload { daemon } => control::reload(info, daemon.as_deref())?,
    }
    Ok(true)
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as for any Unix tool, instead of a panic.
    // SAFETY: signal(2) with SIG_DFL, before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::User { command } => user::run(&cli.target, command).map(|()| true),
        Command::Vserver { command } => vserver::run(&cli.target, command).map(|()| true),
        Command::Userbase {
            command: UserbaseCommand::Migrate,
        } => cli.target.open().map(|_| {
            // Opening migrates; say what the schema is now.
            println!(
                "userbase schema at version {}",
                powermail_userbase::SCHEMA_VERSION
            );
            true
        }),
        other => run_ops(&cli.target, other),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_INCOMPLETE),
        Err(err) => {
            eprintln!("ppadmin: {err:#}");
            let temporary = err.chain().any(|cause| {
                cause
                    .downcast_ref::<UserbaseError>()
                    .is_some_and(UserbaseError::is_temporary)
            });
            ExitCode::from(if temporary { EXIT_TEMPFAIL } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn passwords_are_redacted() {
        // The frontends' rule (powermail_frontend::settings::redact_url).
        assert_eq!(redact_url("mysql://u:secret@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_url("mysql://u:p@ss@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact_url("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact_url("sqlite:///x.db"), "sqlite:///x.db");
    }

    #[test]
    fn data_and_userbase_conflict() {
        let parsed = Cli::try_parse_from([
            "ppadmin",
            "--data",
            "d",
            "--userbase",
            "sqlite://x",
            "user",
            "list",
        ]);
        assert!(parsed.is_err());
    }
}
