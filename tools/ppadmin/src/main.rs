//! `ppadmin` — the operator's command-line tool.
//!
//! This file only parses the command line and dispatches: each group of verbs lives in its
//! own module (`user`, `vserver` for the userbase; admin-port verbs such as `status`,
//! `stats`, `readonly` are to be added as further modules and `Command` variants).
//!
//! Exit status: 0 on success, 1 on a usage or data error (unknown mailbox, duplicate, bad
//! name), 75 (`EX_TEMPFAIL`) when the userbase is unavailable — retrying may help.

mod user;
mod vserver;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use powermail_userbase::{Userbase, UserbaseError};

/// Exit status when the userbase cannot be reached (sysexits.h `EX_TEMPFAIL`).
const EXIT_TEMPFAIL: u8 = 75;

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
        powermail_userbase::open(&url).with_context(|| format!("opening userbase {}", redact(&url)))
    }
}

/// The URL with any password hidden, for error messages.
fn redact(url: &str) -> String {
    match url
        .split_once("://")
        .and_then(|(scheme, rest)| Some((scheme, rest.split_once('@')?)))
    {
        Some((scheme, (credentials, host))) => match credentials.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
            None => format!("{scheme}://{credentials}@{host}"),
        },
        None => url.to_string(),
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::User { command } => user::run(&cli.target, command),
        Command::Vserver { command } => vserver::run(&cli.target, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
        assert_eq!(redact("mysql://u:secret@h/db"), "mysql://u:***@h/db");
        assert_eq!(redact("mysql://root@h/db"), "mysql://root@h/db");
        assert_eq!(redact("sqlite:///x.db"), "sqlite:///x.db");
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
