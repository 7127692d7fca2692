//! `ppadmin vserver ...`: which domain unqualified logins on a listening address belong to.

use std::net::SocketAddr;

use clap::Subcommand;

use crate::UserbaseTarget;

/// The `vserver` verbs.
#[derive(Debug, Subcommand)]
pub enum VserverCommand {
    /// Map a listening address (`ip:port`; `0.0.0.0:port` matches any address on the port)
    /// to a default domain.
    Add { listen: SocketAddr, domain: String },
    /// Remove a mapping.
    Del { listen: SocketAddr },
    /// List mappings: listen, domain.
    List,
}

/// Runs one `vserver` verb against the userbase chosen by `target`.
pub fn run(target: &UserbaseTarget, command: VserverCommand) -> anyhow::Result<()> {
    let userbase = target.open()?;
    match command {
        VserverCommand::Add { listen, domain } => {
            userbase.add_virtual_server(&listen, &domain)?;
            println!("added {listen} -> {}", domain.trim().to_lowercase());
        }
        VserverCommand::Del { listen } => {
            userbase.delete_virtual_server(&listen)?;
            println!("deleted {listen}");
        }
        VserverCommand::List => {
            for server in userbase.list_virtual_servers()? {
                println!("{}\t{}", server.listen, server.domain);
            }
        }
    }
    Ok(())
}
