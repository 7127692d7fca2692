//! `powersmtp`: PowerMail's SMTP frontend. See the library docs and
//! `examples/powersmtp.toml`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "powersmtp", version, about = "PowerMail SMTP frontend")]
struct Args {
    /// TOML configuration file (see examples/powersmtp.toml).
    #[arg(long)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    powermail_admin::init_logging();
    if let Err(e) = run(Args::parse()) {
        log::error!("powersmtp: {e:#}");
        eprintln!("powersmtp: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = powersmtp::config::Config::parse(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    if args.check {
        println!(
            "configuration OK: {} backends, K = {}",
            cfg.backends.len(),
            cfg.replicas
        );
        return Ok(());
    }
    powersmtp::server::run(cfg, Some(args.config))
}
