//! `powerpop`: PowerMail's POP3 frontend. See the library docs and
//! `examples/powerpop.toml`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
#[command(name = "powerpop", version, about = "PowerMail POP3 frontend")]
struct Args {
    /// TOML configuration file (see examples/powerpop.toml).
    #[arg(long)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    powermail_admin::init_logging();
    if let Err(e) = run(Args::parse()) {
        log::error!("powerpop: {e:#}");
        eprintln!("powerpop: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let cfg = powerpop::config::Config::parse(&text)
        .with_context(|| format!("parsing {}", args.config.display()))?;
    if args.check {
        println!("configuration OK: {} backends", cfg.backends.len());
        return Ok(());
    }
    powerpop::server::run(cfg, Some(args.config))
}
