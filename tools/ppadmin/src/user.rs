//! `ppadmin user ...`: mailbox administration on the userbase.
//!
//! Every verb is one call on [`powermail_userbase::Userbase`]; output is one line per item,
//! tab-separated, so scripts can `cut` it.

use std::io::BufRead;

use anyhow::Context;
use clap::Subcommand;
use powermail_userbase::{Mailbox, Userbase};

use crate::UserbaseTarget;

/// The `user` verbs.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a mailbox.
    Add {
        /// Full address, e.g. info@company.biz (`*@domain` for a catch-all).
        name: String,
        /// Password (hashed before storing); `-` reads one line from stdin.
        #[arg(long)]
        password: String,
        /// Quota in bytes; 0 = unlimited.
        #[arg(long, default_value_t = 0)]
        quota_bytes: u64,
        /// Forward mail to this address (repeatable).
        #[arg(long = "forward", value_name = "ADDR")]
        forwards: Vec<String>,
        /// With --forward: also keep a copy in this mailbox.
        #[arg(long)]
        keep_copy: bool,
    },
    /// Delete a mailbox (its stored mail is not touched).
    Del { name: String },
    /// Change a password.
    Passwd {
        name: String,
        /// New password; `-` reads one line from stdin.
        #[arg(long)]
        password: String,
    },
    /// Set the quota.
    Quota {
        name: String,
        /// Quota in bytes; 0 = unlimited.
        #[arg(long)]
        bytes: u64,
    },
    /// Replace the forwards (none given: stop forwarding).
    Forward {
        name: String,
        /// Also keep a copy in this mailbox.
        #[arg(long)]
        keep_copy: bool,
        /// Targets.
        #[arg(value_name = "ADDR")]
        forwards: Vec<String>,
    },
    /// Let a mailbox receive and log in again.
    Enable { name: String },
    /// Stop a mailbox from receiving and logging in, keeping its data.
    Disable { name: String },
    /// List mailboxes: name, quota_bytes, enabled|disabled, forwards (`-` if none).
    List,
    /// Show one mailbox, one `key: value` per line.
    Show { name: String },
}

/// Runs one `user` verb against the userbase chosen by `target`.
pub fn run(target: &UserbaseTarget, command: UserCommand) -> anyhow::Result<()> {
    let userbase = target.open()?;
    let ub = userbase.as_ref();
    match command {
        UserCommand::Add {
            name,
            password,
            quota_bytes,
            forwards,
            keep_copy,
        } => {
            let password = read_password(password)?;
            let mailbox = ub.add_mailbox(&name, &password, quota_bytes)?;
            if !forwards.is_empty() || keep_copy {
                if let Err(err) = ub.set_forwards(&mailbox.name, forwards, keep_copy) {
                    // Do not leave a half-configured mailbox that would swallow mail.
                    ub.delete_mailbox(&mailbox.name).ok();
                    return Err(err).context("setting forwards (mailbox not created)");
                }
            }
            println!("added {}", mailbox.name);
        }
        UserCommand::Del { name } => {
            ub.delete_mailbox(&name)?;
            println!("deleted {}", name.trim().to_lowercase());
        }
        UserCommand::Passwd { name, password } => {
            ub.set_password(&name, &read_password(password)?)?;
            println!("password changed for {}", name.trim().to_lowercase());
        }
        UserCommand::Quota { name, bytes } => {
            ub.set_quota(&name, bytes)?;
            println!(
                "quota of {} set to {bytes} bytes",
                name.trim().to_lowercase()
            );
        }
        UserCommand::Forward {
            name,
            keep_copy,
            forwards,
        } => {
            ub.set_forwards(&name, forwards, keep_copy)?;
            print_mailbox(&found(ub, &name)?);
        }
        UserCommand::Enable { name } => {
            ub.set_enabled(&name, true)?;
            println!("enabled {}", name.trim().to_lowercase());
        }
        UserCommand::Disable { name } => {
            ub.set_enabled(&name, false)?;
            println!("disabled {}", name.trim().to_lowercase());
        }
        UserCommand::List => {
            for mailbox in ub.list_mailboxes()? {
                println!("{}", list_line(&mailbox));
            }
        }
        UserCommand::Show { name } => print_mailbox(&found(ub, &name)?),
    }
    Ok(())
}

/// The exact mailbox, or an error naming it.
fn found(ub: &dyn Userbase, name: &str) -> anyhow::Result<Mailbox> {
    ub.get_mailbox(name)?
        .ok_or_else(|| anyhow::anyhow!("no such mailbox: {name}"))
}

/// `-` means: read the password from the first line of stdin (keeps it out of `ps`).
fn read_password(arg: String) -> anyhow::Result<String> {
    if arg != "-" {
        return Ok(arg);
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading password from stdin")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// One tab-separated `user list` line.
fn list_line(mailbox: &Mailbox) -> String {
    let forwards = if mailbox.forwards.is_empty() {
        "-".to_string()
    } else if mailbox.keep_local_copy {
        format!("{}(+copy)", mailbox.forwards.join(","))
    } else {
        mailbox.forwards.join(",")
    };
    let state = if mailbox.enabled {
        "enabled"
    } else {
        "disabled"
    };
    format!(
        "{}\t{}\t{state}\t{forwards}",
        mailbox.name, mailbox.quota_bytes
    )
}

/// The `user show` block; shows the hash scheme, never the hash.
fn print_mailbox(mailbox: &Mailbox) {
    let scheme = mailbox
        .password_hash
        .strip_prefix('{')
        .and_then(|rest| rest.split_once('}'))
        .map_or("CRYPT", |(scheme, _)| scheme);
    println!("name: {}", mailbox.name);
    println!("enabled: {}", mailbox.enabled);
    println!("quota_bytes: {}", mailbox.quota_bytes);
    println!("forwards: {}", mailbox.forwards.join(","));
    println!("keep_local_copy: {}", mailbox.keep_local_copy);
    println!("password_scheme: {scheme}");
}
