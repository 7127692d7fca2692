//! `powersmtp`: PowerMail's SMTP frontend. See the library docs and
//! `examples/powersmtp.toml`.

use powermail_admin::daemon::{self, Daemon, Invocation};
use powersmtp::config::Config;

fn main() {
    let daemon = Daemon {
        name: "powersmtp",
        about: "PowerMail SMTP frontend",
    };
    daemon::run(&daemon, Config::parse, start);
}

fn start(cfg: Config, args: Invocation) -> anyhow::Result<()> {
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
