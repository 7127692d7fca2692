//! `powerpop`: PowerMail's POP3 frontend. See the library docs and
//! `examples/powerpop.toml`.

use powermail_admin::daemon::{self, Daemon, Invocation};
use powerpop::config::Config;

fn main() {
    let daemon = Daemon {
        name: "powerpop",
        about: "PowerMail POP3 frontend",
    };
    daemon::run(&daemon, Config::parse, start);
}

fn start(cfg: Config, args: Invocation) -> anyhow::Result<()> {
    if args.check {
        println!("configuration OK: {} backends", cfg.backends.len());
        return Ok(());
    }
    powerpop::server::run(cfg, Some(args.config))
}
