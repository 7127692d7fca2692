//! `powermail up`: the whole system on one machine, from a fresh clone.
//!
//! One supervising process that writes a configuration for each daemon under
//! `DIR/etc/` (kept between runs, so an operator can read and edit them),
//! creates the embedded SQLite userbase with a demo mailbox, starts
//! pplistener (N backends under `DIR/disks/N`), powersmtp (SMTP 127.0.0.1:2525,
//! LMTP 127.0.0.1:2424) and powerpop (POP3 127.0.0.1:1110, POP3S 127.0.0.1:1995)
//! as child processes, restarts a child that
//! dies, and on Ctrl-C / SIGTERM stops them all. The daemons are the same
//! binaries an operator runs separately with `--config` on real hosts.
//!
//! TLS works out of the box: on first start a self-signed certificate for
//! `localhost` is made under `DIR/etc/tls/` (rcgen, no openssl binary) and
//! used for STARTTLS, STLS and POP3S; `--tls-cert/--tls-key` take real ones.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "powermail",
    version,
    about = "Run the whole PowerMail system on this machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start pplistener, powersmtp and powerpop with the embedded userbase.
    Up(UpArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct UpArgs {
    /// Data directory: disks/, etc/, userbase.db, state/.
    #[arg(long, default_value = "./var")]
    data: PathBuf,
    /// A TOML file of overrides: ports, backends, replicas (examples/powermail.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backends (pplistener executors); default one per online CPU.
    #[arg(long)]
    backends: Option<usize>,
    /// Copies of each message (K).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// PEM certificate chain for STARTTLS, STLS and POP3S (default: a
    /// self-signed one for localhost, made under DIR/etc/tls/ on first start).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// Ports and addresses, overridable from `--config`.
#[derive(Debug, Clone)]
struct Layout {
    smtp_listen: String,
    lmtp_listen: String,
    pop_listen: String,
    pop3s_listen: String,
    backend_base_port: u16,
    pplistener_admin: String,
    smtp_admin: String,
    pop_admin: String,
}

impl Default for Layout {
    fn default() -> Layout {
        Layout {
            smtp_listen: "127.0.0.1:2525".into(),
            lmtp_listen: "127.0.0.1:2424".into(),
            pop_listen: "127.0.0.1:1110".into(),
            pop3s_listen: "127.0.0.1:1995".into(),
            backend_base_port: 7000,
            pplistener_admin: "127.0.0.1:8010".into(),
            smtp_admin: "127.0.0.1:8025".into(),
            pop_admin: "127.0.0.1:8110".into(),
        }
    }
}

/// Demo mailbox created on first start.
const DEMO_MAILBOX: &str = "demo@powermail.test";

/// Children that die faster than this after a start are not restarted again
/// in a tight loop.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Up(args) => up(args),
    };
    if let Err(e) = result {
        eprintln!("powermail: {e:#}");
        std::process::exit(1);
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn read_or_create_secret(path: &Path) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().to_string());
    }
    let s = hex::encode(rand::random::<[u8; 24]>());
    write_private(path, &s)?;
    Ok(s)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The keys of `--config` (examples/powermail.toml): every one optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Overrides {
    smtp_listen: Option<String>,
    lmtp_listen: Option<String>,
    pop_listen: Option<String>,
    pop3s_listen: Option<String>,
    backend_base_port: Option<u16>,
    pplistener_admin: Option<String>,
    smtp_admin: Option<String>,
    pop_admin: Option<String>,
    backends: Option<usize>,
    replicas: Option<usize>,
}

impl Overrides {
    /// Parses the TOML text of an overrides file.
    fn parse(text: &str) -> anyhow::Result<Overrides> {
        Ok(toml::from_str(text)?)
    }

    fn apply(self, layout: &mut Layout, args: &mut UpArgs) {
        let set = |field: &mut String, v: Option<String>| {
            if let Some(v) = v {
                *field = v;
            }
        };
        set(&mut layout.smtp_listen, self.smtp_listen);
        set(&mut layout.lmtp_listen, self.lmtp_listen);
        set(&mut layout.pop_listen, self.pop_listen);
        set(&mut layout.pop3s_listen, self.pop3s_listen);
        set(&mut layout.pplistener_admin, self.pplistener_admin);
        set(&mut layout.smtp_admin, self.smtp_admin);
        set(&mut layout.pop_admin, self.pop_admin);
        if let Some(port) = self.backend_base_port {
            layout.backend_base_port = port;
        }
        if self.backends.is_some() {
            args.backends = self.backends;
        }
        if let Some(k) = self.replicas {
            args.replicas = k;
        }
    }
}

fn apply_overrides(layout: &mut Layout, args: &mut UpArgs, path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Overrides::parse(&text)
        .with_context(|| format!("parsing {}", path.display()))?
        .apply(layout, args);
    Ok(())
}

fn backend_tables(n: usize, base_port: u16) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[backend]]\nname = \"b{i}\"\naddr = \"127.0.0.1:{}\"\n",
                base_port + i as u16
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The certificate and key the frontends use.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    /// The `[tls]` table of a frontend's configuration.
    fn table(&self) -> String {
        format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            self.cert.display().to_string(),
            self.key.display().to_string()
        )
    }
}

/// The given certificate, or the self-signed one under `etc/tls/` (made on
/// first start). Returns the files and whether they were just made.
fn ensure_tls(etc: &Path, args: &UpArgs) -> anyhow::Result<(TlsFiles, bool)> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let files = TlsFiles {
            cert: std::fs::canonicalize(cert)
                .with_context(|| format!("--tls-cert {}", cert.display()))?,
            key: std::fs::canonicalize(key)
                .with_context(|| format!("--tls-key {}", key.display()))?,
        };
        return Ok((files, false));
    }
    let dir = std::fs::canonicalize(etc)?.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok((files, false));
    }
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let made = rcgen::generate_simple_self_signed(names).context("making a certificate")?;
    write_private(&files.key, &made.key_pair.serialize_pem())?;
    std::fs::write(&files.cert, made.cert.pem())
        .with_context(|| format!("writing {}", files.cert.display()))?;
    Ok((files, true))
}

/// Writes the three daemons' configurations; returns their paths.
fn write_configs(
    dir: &Path,
    etc: &Path,
    l: &Layout,
    n: usize,
    k: usize,
    tls: &TlsFiles,
) -> anyhow::Result<[PathBuf; 3]> {
    let secret = read_or_create_secret(&etc.join("backend.secret"))?;
    let token = read_or_create_secret(&etc.join("admin.token"))?;
    let abs = std::fs::canonicalize(dir)?;
    let userbase = format!("sqlite://{}", abs.join("userbase.db").display());
    let backends = backend_tables(n, l.backend_base_port);
    let ppl = format!(
        "# Written by `powermail up`; regenerated at every start.\nsecret_file = \"{}\"\nadmin_listen = \"{}\"\nadmin_token = \"{token}\"\ndata_root = \"{}\"\nlisten_base = \"127.0.0.1:{}\"\nbackend_count = {n}\n",
        etc.join("backend.secret").display(),
        l.pplistener_admin,
        abs.display(),
        l.backend_base_port
    );
    let tls = tls.table();
    let smtp = format!(
        "# Written by `powermail up`; regenerated at every start.
listen = \"{}\"
lmtp_listen = \"{}\"
hostname = \"localhost\"
frontend_id = \"up\"
admin_listen = \"{}\"
admin_token = \"{token}\"
userbase = \"{userbase}\"
replicas = {k}
secret = \"{secret}\"
state_dir = \"{}\"

{tls}
{backends}",
        l.smtp_listen,
        l.lmtp_listen,
        l.smtp_admin,
        abs.join("smtpstate").display()
    );
    let pop = format!(
        "# Written by `powermail up`; regenerated at every start.\nlisten = \"{}\"\ntls_listen = \"{}\"\nadmin_listen = \"{}\"\nadmin_token = \"{token}\"\nuserbase = \"{userbase}\"\nsecret = \"{secret}\"\nstate_dir = \"{}\"\n\n{tls}\n{backends}",
        l.pop_listen,
        l.pop3s_listen,
        l.pop_admin,
        abs.join("state").display()
    );
    let paths = [
        etc.join("pplistener.toml"),
        etc.join("powersmtp.toml"),
        etc.join("powerpop.toml"),
    ];
    for (p, text) in paths.iter().zip([ppl, smtp, pop]) {
        write_private(p, &text)?;
    }
    Ok(paths)
}

/// Creates the userbase and the demo mailbox on first start; returns the
/// demo password when it was just created.
fn ensure_userbase(dir: &Path, etc: &Path) -> anyhow::Result<String> {
    let abs = std::fs::canonicalize(dir)?;
    let ub = powermail_userbase::open(&format!("sqlite://{}", abs.join("userbase.db").display()))?;
    let pw_file = etc.join("demo.password");
    if ub.get_mailbox(DEMO_MAILBOX)?.is_none() {
        let pw = hex::encode(rand::random::<[u8; 8]>());
        ub.add_mailbox(DEMO_MAILBOX, &pw, 0)?;
        write_private(&pw_file, &pw)?;
    }
    Ok(std::fs::read_to_string(&pw_file).unwrap_or_else(|_| "(see ppadmin user passwd)".into()))
}

struct Daemon {
    name: &'static str,
    exe: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    started: Instant,
}

impl Daemon {
    fn start(&mut self, log_dir: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{}.log", self.name)))?;
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// Waits until the daemon has printed its readiness line
    /// (`<name> ready pid=<pid> ...`) into its log, at most `timeout`; an
    /// error if it exits first or takes longer.
    fn wait_ready(&mut self, log_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
        let log = log_dir.join(format!("{}.log", self.name));
        let child = self.child.as_mut().context("not started")?;
        let needle = format!("{} ready pid={} ", self.name, child.id());
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(&needle) {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{} exited during start-up ({status}); see {}",
                    self.name,
                    log.display()
                );
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "{} not ready after {timeout:?}; see {}",
                self.name,
                log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Longest a daemon may take to print its readiness line at `powermail up`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn up(mut args: UpArgs) -> anyhow::Result<()> {
    let mut layout = Layout::default();
    if let Some(cfg) = args.config.clone() {
        apply_overrides(&mut layout, &mut args, &cfg)?;
    }
    let n = args.backends.unwrap_or_else(online_cpus).max(1);
    anyhow::ensure!(
        args.replicas >= 1 && args.replicas <= n,
        "--replicas must be between 1 and the backend count ({n})"
    );
    let dir = args.data.clone();
    let etc = dir.join("etc");
    let logs = dir.join("log");
    for d in [&dir, &etc, &logs, &dir.join("state")] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let (tls, tls_made) = ensure_tls(&etc, &args)?;
    let configs = write_configs(&dir, &etc, &layout, n, args.replicas, &tls)?;
    let demo_pw = ensure_userbase(&dir, &etc)?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut daemons: Vec<Daemon> = ["pplistener", "powersmtp", "powerpop"]
        .iter()
        .zip(configs)
        .map(|(name, config)| Daemon {
            name,
            exe: bin_dir.join(name),
            config,
            child: None,
            started: Instant::now(),
        })
        .collect();
    for d in &daemons {
        anyhow::ensure!(
            d.exe.exists(),
            "{} not found next to powermail (build with: cargo build --release --bins)",
            d.exe.display()
        );
    }
    for d in &mut daemons {
        // One after the other, each ready before the next starts: the
        // backends first, so the frontends' first health check finds them.
        d.start(&logs)?;
        d.wait_ready(&logs, READY_TIMEOUT)?;
    }
    let token = std::fs::read_to_string(etc.join("admin.token"))?;
    println!(
        "PowerMail is up ({} backends, {} copies per message), data in {}",
        n,
        args.replicas,
        dir.display()
    );
    println!(
        "  SMTP   {}    (swaks --server {} --to {DEMO_MAILBOX})",
        layout.smtp_listen, layout.smtp_listen
    );
    println!(
        "  LMTP   {}    (Postfix: lmtp:inet:{})",
        layout.lmtp_listen, layout.lmtp_listen
    );
    println!("  POP3   {}    (STLS)", layout.pop_listen);
    println!("  POP3S  {}", layout.pop3s_listen);
    println!(
        "  TLS    certificate {}{}  (STARTTLS: swaks --tls --server {}; openssl s_client -starttls pop3 -connect {} -CAfile {})",
        tls.cert.display(),
        if tls_made { " (self-signed for localhost, just made)" } else { "" },
        layout.smtp_listen,
        layout.pop_listen,
        tls.cert.display()
    );
    println!("  demo mailbox {DEMO_MAILBOX}  password {}", demo_pw.trim());
    println!(
        "  admin  pplistener http://{}/stats  powersmtp http://{}/stats  powerpop http://{}/stats",
        layout.pplistener_admin, layout.smtp_admin, layout.pop_admin
    );
    println!("         (header: Authorization: Bearer {})", token.trim());
    println!(
        "  backends 127.0.0.1:{}..{} under {}/disks/",
        layout.backend_base_port,
        layout.backend_base_port as usize + n - 1,
        dir.display()
    );
    println!(
        "  logs in {}/log/, configs in {}/etc/. Ctrl-C stops everything.",
        dir.display(),
        dir.display()
    );
    supervise(&mut daemons, &logs)
}

fn supervise(daemons: &mut [Daemon], logs: &Path) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    while !stop.load(Ordering::Relaxed) {
        for d in daemons.iter_mut() {
            let exited = match d.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                eprintln!(
                    "powermail: {} exited ({status}); see {}/{}.log",
                    d.name,
                    logs.display(),
                    d.name
                );
                d.child = None;
            }
            if d.child.is_none() && d.started.elapsed() >= RESTART_BACKOFF {
                eprintln!("powermail: restarting {}", d.name);
                if let Err(e) = d.start(logs) {
                    eprintln!("powermail: {e:#}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("powermail: stopping");
    // Frontends first, so no transaction is cut off by a vanished backend.
    for d in daemons.iter_mut().rev() {
        if let Some(c) = &d.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
        if let Some(mut c) = d.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    println!("powermail: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> UpArgs {
        UpArgs {
            data: PathBuf::from("./var"),
            config: None,
            backends: None,
            replicas: 1,
            tls_cert: None,
            tls_key: None,
        }
    }

    #[test]
    fn the_example_file_states_the_defaults() {
        let text = include_str!("../../../examples/powermail.toml");
        let (mut layout, mut a) = (Layout::default(), args());
        Overrides::parse(text)
            .expect("example parses")
            .apply(&mut layout, &mut a);
        let d = Layout::default();
        assert_eq!(
            (&layout.smtp_listen, &layout.lmtp_listen, &layout.pop_listen),
            (&d.smtp_listen, &d.lmtp_listen, &d.pop_listen)
        );
        assert_eq!(layout.pop3s_listen, d.pop3s_listen);
        assert_eq!(layout.backend_base_port, d.backend_base_port);
        assert_eq!(
            (
                &layout.pplistener_admin,
                &layout.smtp_admin,
                &layout.pop_admin
            ),
            (&d.pplistener_admin, &d.smtp_admin, &d.pop_admin)
        );
        assert_eq!((a.backends, a.replicas), (None, 1));
    }

    #[test]
    fn overrides_apply_and_unknown_keys_are_refused() {
        let (mut layout, mut a) = (Layout::default(), args());
        Overrides::parse("smtp_listen = \"0.0.0.0:25\"\nbackends = 3\nreplicas = 2\n")
            .expect("parses")
            .apply(&mut layout, &mut a);
        assert_eq!(layout.smtp_listen, "0.0.0.0:25");
        assert_eq!((a.backends, a.replicas), (Some(3), 2));
        assert!(Overrides::parse("smtp_port = 25\n").is_err());
        assert!(Overrides::parse("backend_base_port = 70000\n").is_err());
    }
}
