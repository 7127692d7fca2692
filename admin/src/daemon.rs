//! The `main` every PowerMail daemon (pplistener, powersmtp, powerpop) runs.
//!
//! One command line (`--config FILE`, `--check`), the logger, the configuration file read
//! and parsed, and one way to fail: the error, with its causes, logged and printed to
//! stderr as `NAME: error`, and exit code 1. Exit code 2 and clap's message for a bad
//! command line; 0 when the daemon's `start` returns.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};

/// What names a daemon on its command line.
#[derive(Debug, Clone, Copy)]
pub struct Daemon {
    /// Its binary name (`powerpop`): the `--help` and `--version` name and every error
    /// line's prefix.
    pub name: &'static str,
    /// The one-line description `--help` prints.
    pub about: &'static str,
}

/// The parsed command line.
#[derive(Parser, Debug, Clone)]
#[command(version)]
pub struct Invocation {
    /// TOML configuration file (see examples/NAME.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

impl Invocation {
    /// Parses `args` (the program name first) as `daemon`'s command line.
    pub fn try_parse_for<I, T>(daemon: &Daemon, args: I) -> Result<Invocation, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let help = format!(
            "TOML configuration file (see examples/{}.toml)",
            daemon.name
        );
        let mut command = Invocation::command()
            .name(daemon.name)
            .about(daemon.about)
            .mut_arg("config", |a| a.help(help));
        let matches = command.try_get_matches_from_mut(args)?;
        Invocation::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
    }
}

/// Runs a daemon: logger, command line, configuration file read and parsed with
/// `parse`, then `start` (which handles `--check` its own way and serves until the
/// process ends). Returns when `start` does; exits with 1 (after logging the error)
/// when any step fails.
pub fn run<C>(
    daemon: &Daemon,
    parse: impl FnOnce(&str) -> anyhow::Result<C>,
    start: impl FnOnce(C, Invocation) -> anyhow::Result<()>,
) {
    crate::init_logging();
    let invocation = match Invocation::try_parse_for(daemon, std::env::args_os()) {
        Ok(i) => i,
        Err(e) => e.exit(),
    };
    if let Err(e) = load_and_start(invocation, parse, start) {
        log::error!("{}: {e:#}", daemon.name);
        eprintln!("{}: {e:#}", daemon.name);
        std::process::exit(1);
    }
}

/// Reads and parses the configuration file, then starts.
fn load_and_start<C>(
    invocation: Invocation,
    parse: impl FnOnce(&str) -> anyhow::Result<C>,
    start: impl FnOnce(C, Invocation) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let path = &invocation.config;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    start(cfg, invocation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POP: Daemon = Daemon {
        name: "powerpop",
        about: "PowerMail POP3 frontend",
    };

    #[test]
    fn parses_config_and_check() {
        let i = Invocation::try_parse_for(&POP, ["powerpop", "--config", "x.toml", "--check"])
            .expect("valid command line");
        assert_eq!(i.config, PathBuf::from("x.toml"));
        assert!(i.check);
        let i = Invocation::try_parse_for(&POP, ["powerpop", "--config", "x.toml"])
            .expect("valid command line");
        assert!(!i.check);
    }

    #[test]
    fn help_names_the_daemon_and_its_example() {
        let e = Invocation::try_parse_for(&POP, ["powerpop", "--help"]).expect_err("help");
        let help = e.render().to_string();
        assert!(help.starts_with("PowerMail POP3 frontend\n"), "{help}");
        assert!(
            help.contains("Usage: powerpop [OPTIONS] --config <CONFIG>"),
            "{help}"
        );
        assert!(help.contains("(see examples/powerpop.toml)"), "{help}");
    }

    #[test]
    fn refuses_a_missing_config_and_unknown_flags() {
        let e = Invocation::try_parse_for(&POP, ["powerpop"]).expect_err("no --config");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let e = Invocation::try_parse_for(&POP, ["powerpop", "--config", "x", "--bogus"])
            .expect_err("unknown flag");
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn unreadable_and_unparsable_files_name_the_file() {
        let inv = |p: &str| Invocation {
            config: PathBuf::from(p),
            check: false,
        };
        let e = load_and_start(inv("/nonexistent/x.toml"), |_| Ok(()), |_, _| Ok(()))
            .expect_err("missing file");
        assert!(format!("{e:#}").starts_with("reading /nonexistent/x.toml: "));
        let file = std::env::temp_dir().join(format!("daemon-test-{}.toml", std::process::id()));
        std::fs::write(&file, "x").expect("write temp file");
        let parse = |_: &str| -> anyhow::Result<()> { anyhow::bail!("bad") };
        let e = load_and_start(inv(&file.display().to_string()), parse, |_, _| Ok(()))
            .expect_err("unparsable");
        let _ = std::fs::remove_file(&file);
        assert_eq!(format!("{e:#}"), format!("parsing {}: bad", file.display()));
    }
}
