//! `ppblast`: the bundled SMTP blaster, and a POP3 load mode.
//!
//! `ppblast smtp` sends uniquely identified messages (an `X-PPBlast-Id:`
//! header and a matching Message-ID) over N connections, closed loop or at a
//! target rate (open loop: latency is measured from each message's scheduled
//! start, so a stalled server cannot hide its queueing), with or without
//! PIPELINING. `ppblast pop` runs sessions that log in, UIDL, RETR every
//! message, optionally DELE, and QUIT. Both print throughput, reply codes and
//! latency percentiles, can write an `.hgrm` file and an SVG plot of the
//! latency percentile curve, and can write the ids that were acknowledged so a
//! later check can prove what arrived.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use powermail_bench::{histogram, report};

#[derive(Parser, Debug)]
#[command(
    name = "ppblast",
    version,
    about = "SMTP blaster and POP3 load generator"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Send mail over SMTP.
    Smtp(SmtpArgs),
    /// Drain mailboxes over POP3.
    Pop(PopArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// Concurrent connections.
    #[arg(long, default_value_t = 20)]
    connections: usize,
    /// Stop after this many seconds (0: no limit; the count limit still applies).
    #[arg(long, default_value_t = 0)]
    duration_s: u64,
    /// Write the latency histogram here (HdrHistogram .hgrm percentile text).
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Write an SVG plot of the latency percentile curve here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar (for scripts and CI logs).
    #[arg(long)]
    quiet: bool,
    /// Socket time-out in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

#[derive(clap::Args, Debug, Clone)]
struct SmtpArgs {
    #[command(flatten)]
    common: Common,
    /// SMTP server.
    #[arg(long, default_value = "127.0.0.1:2525")]
    server: String,
    /// Messages to send in total.
    #[arg(long, default_value_t = 1000)]
    count: u64,
    /// Message size in bytes, or a distribution "SIZE:WEIGHT,..." (e.g. "1024:50,4096:30,65536:20").
    #[arg(long, default_value = "4096")]
    size: String,
    /// Recipients per message.
    #[arg(long, default_value_t = 1)]
    rcpts: usize,
    /// A recipient (repeatable); recipients are drawn round-robin from these and --to-file.
    #[arg(long)]
    to: Vec<String>,
    /// A file with one recipient per line.
    #[arg(long)]
    to_file: Option<PathBuf>,
    /// Envelope sender.
    #[arg(long, default_value = "blast@ppblast.test")]
    from: String,
    /// Send MAIL, RCPT and DATA in one write (RFC 2920).
    #[arg(long)]
    pipelining: bool,
    /// Target messages per second over all connections (open loop); 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Append "<id> <reply code>" of every message to this file.
    #[arg(long)]
    ids_out: Option<PathBuf>,
    /// Prefix of the X-PPBlast-Id values (default: a time stamp).
    #[arg(long)]
    run_id: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
struct PopArgs {
    #[command(flatten)]
    common: Common,
    /// POP3 server.
    #[arg(long, default_value = "127.0.0.1:1110")]
    server: String,
    /// Sessions in total.
    #[arg(long, default_value_t = 1000)]
    sessions: u64,
    /// "user:password" (repeatable). With no more sessions than logins each session
    /// takes the next unused login; with more, connection `i` cycles through logins
    /// `i, i + connections, ...`, so no two connections share a mailbox (POP3 locks it)
    /// as long as the number of logins is a multiple of --connections.
    #[arg(long)]
    login: Vec<String>,
    /// A file of "user:password" lines.
    #[arg(long)]
    login_file: Option<PathBuf>,
    /// RETR every message (otherwise only STAT).
    #[arg(long)]
    retr: bool,
    /// UIDL after STAT (a mail client's login; implied by --retr).
    #[arg(long)]
    uidl: bool,
    /// DELE every message retrieved.
    #[arg(long)]
    dele: bool,
}

/// What every worker adds up.
#[derive(Default)]
struct Totals {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    codes: Mutex<BTreeMap<String, u64>>,
}

impl Totals {
    fn code(&self, code: &str) {
        if let Ok(mut m) = self.codes.lock() {
            *m.entry(code.to_string()).or_default() += 1;
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Smtp(a) => smtp(a),
        Mode::Pop(a) => pop(a),
    }
}

fn parse_sizes(spec: &str) -> anyhow::Result<Vec<(usize, u32)>> {
    spec.split(',')
        .map(|part| {
            let (size, weight) = part.split_once(':').unwrap_or((part, "1"));
            Ok((parse_bytes(size)?, weight.trim().parse()?))
        })
        .collect()
}

fn parse_bytes(s: &str) -> anyhow::Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => match s.strip_suffix('m') {
            Some(n) => (n, 1 << 20),
            None => (s.as_str(), 1),
        },
    };
    Ok(num.parse::<usize>()? * mult)
}

fn pick_size(sizes: &[(usize, u32)], n: u64) -> usize {
    let total: u64 = sizes.iter().map(|s| s.1 as u64).sum::<u64>().max(1);
    let mut x = (n.wrapping_mul(2654435761)) % total;
    for &(size, w) in sizes {
        if x < w as u64 {
            return size;
        }
        x -= w as u64;
    }
    sizes[0].0
}

/// A message of about `size` bytes in SMTP wire form, dot-stuffing not needed
/// (no line starts with '.'), ending with CRLF.
fn message(id: &str, from: &str, to: &[String], size: usize) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{}>\r\nSubject: ppblast {id}\r\nMessage-ID: <{id}@ppblast>\r\nX-PPBlast-Id: {id}\r\n\r\n",
        to.first().map(String::as_str).unwrap_or("")
    );
    const LINE: &str =
        "The quick brown fox jumps over the lazy dog; PowerMail ppblast filler text.\r\n";
    while m.len() + LINE.len() <= size {
        m.push_str(LINE);
    }
    let rest = size.saturating_sub(m.len() + 2);
    m.push_str(&"x".repeat(rest));
    m.push_str("\r\n");
    m
}

struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Conn {
    fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    /// Reads one (possibly multi-line) SMTP reply; returns its code and last line.
    fn smtp_reply(&mut self) -> anyhow::Result<(u16, String)> {
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                anyhow::bail!("server closed the connection");
            }
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("bad reply {line:?}"))?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok((code, line.trim_end().to_string()));
            }
        }
    }

    fn pop_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            anyhow::bail!("server closed the connection");
        }
        Ok(line.trim_end().to_string())
    }

    fn pop_ok(&mut self, cmd: &str) -> anyhow::Result<String> {
        self.w.write_all(cmd.as_bytes())?;
        let l = self.pop_line()?;
        anyhow::ensure!(l.starts_with("+OK"), "{} -> {l}", cmd.trim_end());
        Ok(l)
    }

    /// Reads a multi-line POP3 response up to its terminating ".", returns
    /// the bytes before that line (dot-stuffing included, as sent). The
    /// buffer is scanned in bulk for CRLF "." CRLF, never split into lines,
    /// so the load tool costs little next to the server it measures.
    fn pop_body(&mut self) -> anyhow::Result<u64> {
        let mut end = BodyEnd::default();
        loop {
            let buf = self.r.fill_buf()?;
            if buf.is_empty() {
                anyhow::bail!("server closed the connection");
            }
            let (used, done) = end.feed(buf);
            self.r.consume(used);
            if done {
                return Ok(end.body_bytes());
            }
        }
    }
}

/// Finds the end of a POP3 multi-line response in a byte stream fed in
/// pieces of any size: the first CRLF "." CRLF, where the status line's CRLF
/// counts as the one before the body (so an empty body is ".\r\n").
#[derive(Debug)]
struct BodyEnd {
    /// The last bytes fed (at most 4), to find a terminator split across feeds.
    tail: Vec<u8>,
    /// Bytes consumed so far, terminator included once found.
    consumed: u64,
}

impl Default for BodyEnd {
    fn default() -> Self {
        BodyEnd {
            tail: b"\r\n".to_vec(),
            consumed: 0,
        }
    }
}

impl BodyEnd {
    const END: &'static [u8] = b"\r\n.\r\n";

    /// Scans `buf`; returns how many of its bytes belong to the response
    /// and whether the terminator was among them.
    fn feed(&mut self, buf: &[u8]) -> (usize, bool) {
        // A terminator that starts in the tail ends within buf's first 4 bytes;
        // it comes before any terminator wholly inside buf.
        let mut joined = self.tail.clone();
        joined.extend_from_slice(&buf[..buf.len().min(Self::END.len() - 1)]);
        let found = memchr::memmem::find(&joined, Self::END)
            .map(|p| p + Self::END.len() - self.tail.len())
            .or_else(|| memchr::memmem::find(buf, Self::END).map(|p| p + Self::END.len()));
        let used = found.unwrap_or(buf.len());
        self.consumed += used as u64;
        joined.truncate(self.tail.len());
        joined.extend_from_slice(&buf[..used]);
        let keep = joined.len().saturating_sub(Self::END.len() - 1);
        self.tail = joined.split_off(keep);
        (used, found.is_some())
    }

    /// Bytes of the response before its "." line.
    fn body_bytes(&self) -> u64 {
        self.consumed.saturating_sub(3)
    }
}

fn progress(total: u64, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

fn smtp(a: SmtpArgs) -> anyhow::Result<()> {
    let sizes = parse_sizes(&a.size)?;
    let mut rcpts: Vec<String> = a.to.clone();
    if let Some(f) = &a.to_file {
        rcpts.extend(
            std::fs::read_to_string(f)?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    anyhow::ensure!(!rcpts.is_empty(), "give recipients with --to or --to-file");
    let run_id = a.run_id.clone().unwrap_or_else(|| {
        format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        )
    });
    let ids_out = match &a.ids_out {
        Some(p) => Some(Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ))),
        None => None,
    };
    let totals = Arc::new(Totals::default());
    let next = Arc::new(AtomicU64::new(0));
    let pb = progress(a.count, a.common.quiet);
    let started = Instant::now();
    let deadline =
        (a.common.duration_s > 0).then(|| started + Duration::from_secs(a.common.duration_s));
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate));
    let rcpts = Arc::new(rcpts);
    let workers: Vec<_> = (0..a.common.connections)
        .map(|_| {
            let (a, sizes, rcpts, totals, next, pb, run_id, ids_out) = (
                a.clone(),
                sizes.clone(),
                rcpts.clone(),
                totals.clone(),
                next.clone(),
                pb.clone(),
                run_id.clone(),
                ids_out.clone(),
            );
            std::thread::spawn(move || -> Histogram<u64> {
                let mut h = histogram();
                let timeout = Duration::from_millis(a.common.timeout_ms);
                let mut conn: Option<Conn> = None;
                loop {
                    let n = next.fetch_add(1, Relaxed);
                    if n >= a.count || deadline.is_some_and(|d| Instant::now() >= d) {
                        if let Some(mut c) = conn.take() {
                            let _ = c.w.write_all(b"QUIT\r\n");
                            let _ = c.smtp_reply();
                        }
                        return h;
                    }
                    // Open loop: message n is due at n * interval; wait for it, then
                    // measure from when it was due.
                    let due = match interval {
                        Some(iv) => {
                            let due = started + iv.mul_f64(n as f64);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                            due
                        }
                        None => Instant::now(),
                    };
                    let id = format!("{run_id}-{n}");
                    let to: Vec<String> = (0..a.rcpts)
                        .map(|i| rcpts[(n as usize * a.rcpts + i) % rcpts.len()].clone())
                        .collect();
                    let body = message(&id, &a.from, &to, pick_size(&sizes, n));
                    let result = (|| -> anyhow::Result<u16> {
                        if conn.is_none() {
                            let mut c = Conn::connect(&a.server, timeout)?;
                            let (code, l) = c.smtp_reply()?;
                            anyhow::ensure!(code == 220, "greeting {l}");
                            c.w.write_all(b"EHLO ppblast.test\r\n")?;
                            c.smtp_reply()?;
                            conn = Some(c);
                        }
                        let c = conn.as_mut().expect("connected above");
                        send_one(c, &a.from, &to, &body, a.pipelining)
                    })();
                    let code = match result {
                        Ok(code) => {
                            totals.code(&code.to_string());
                            if code == 250 {
                                totals.ops.fetch_add(1, Relaxed);
                                totals.bytes.fetch_add(body.len() as u64, Relaxed);
                                let _ = h.record(due.elapsed().as_micros() as u64);
                            }
                            code.to_string()
                        }
                        Err(e) => {
                            totals.errors.fetch_add(1, Relaxed);
                            totals.code("error");
                            conn = None;
                            if totals.errors.load(Relaxed) <= 5 {
                                eprintln!("ppblast: message {id}: {e:#}");
                            }
                            "error".to_string()
                        }
                    };
                    if let Some(f) = &ids_out {
                        if let Ok(mut f) = f.lock() {
                            let _ = writeln!(f, "{id} {code}");
                        }
                    }
                    pb.inc(1);
                }
            })
        })
        .collect();
    let mut total = histogram();
    for w in workers {
        let h = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?;
        total.add(&h)?;
    }
    pb.finish_and_clear();
    let elapsed = started.elapsed();
    let label = format!(
        "smtp {} conns, size {}, {} rcpts{}",
        a.common.connections,
        a.size,
        a.rcpts,
        if a.pipelining { ", pipelining" } else { "" }
    );
    finish(&label, &totals, elapsed, &total, &a.common, a.rcpts as u64)
}

/// One transaction; returns the final reply code (250 = accepted).
fn send_one(
    c: &mut Conn,
    from: &str,
    to: &[String],
    body: &str,
    pipelining: bool,
) -> anyhow::Result<u16> {
    let mut cmds = format!("MAIL FROM:<{from}> SIZE={}\r\n", body.len());
    for t in to {
        cmds.push_str(&format!("RCPT TO:<{t}>\r\n"));
    }
    if pipelining {
        cmds.push_str("DATA\r\n");
        c.w.write_all(cmds.as_bytes())?;
        let (mail, l) = c.smtp_reply()?;
        // With no accepted recipient the server answers DATA with 554 (RFC 2920).
        for _ in to {
            c.smtp_reply()?;
        }
        let (data, _) = c.smtp_reply()?;
        if mail / 100 != 2 || data != 354 {
            if data == 354 {
                c.w.write_all(b".\r\n")?;
                c.smtp_reply()?;
            }
            anyhow::ensure!(mail / 100 == 2, "MAIL: {l}");
            return Ok(data);
        }
    } else {
        let mut accepted = 0;
        c.w.write_all(format!("MAIL FROM:<{from}> SIZE={}\r\n", body.len()).as_bytes())?;
        let (mail, l) = c.smtp_reply()?;
        if mail / 100 != 2 {
            anyhow::bail!("MAIL: {l}");
        }
        for t in to {
            c.w.write_all(format!("RCPT TO:<{t}>\r\n").as_bytes())?;
            let (code, _) = c.smtp_reply()?;
            if code / 100 == 2 {
                accepted += 1;
            }
        }
        if accepted == 0 {
            c.w.write_all(b"RSET\r\n")?;
            c.smtp_reply()?;
            return Ok(550);
        }
        c.w.write_all(b"DATA\r\n")?;
        let (data, _) = c.smtp_reply()?;
        if data != 354 {
            return Ok(data);
        }
    }
    // One write: a separate small ".\r\n" could wait on a delayed ACK.
    let mut data = Vec::with_capacity(body.len() + 3);
    data.extend_from_slice(body.as_bytes());
    data.extend_from_slice(b".\r\n");
    c.w.write_all(&data)?;
    let (code, _) = c.smtp_reply()?;
    Ok(code)
}

fn pop(a: PopArgs) -> anyhow::Result<()> {
    let mut logins: Vec<(String, String)> = Vec::new();
    let mut add = |l: &str| {
        if let Some((u, p)) = l.trim().split_once(':') {
            logins.push((u.to_string(), p.to_string()));
        }
    };
    a.login.iter().for_each(|l| add(l));
    if let Some(f) = &a.login_file {
        std::fs::read_to_string(f)?.lines().for_each(&mut add);
    }
    anyhow::ensure!(
        !logins.is_empty(),
        "give --login user:password or --login-file"
    );
    let logins = Arc::new(logins);
    let totals = Arc::new(Totals::default());
    let next = Arc::new(AtomicU64::new(0));
    let pb = progress(a.sessions, a.common.quiet);
    let started = Instant::now();
    let deadline =
        (a.common.duration_s > 0).then(|| started + Duration::from_secs(a.common.duration_s));
    let retrieved = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..a.common.connections)
        .map(|worker| {
            let (a, logins, totals, next, pb, retrieved) = (
                a.clone(),
                logins.clone(),
                totals.clone(),
                next.clone(),
                pb.clone(),
                retrieved.clone(),
            );
            std::thread::spawn(move || -> Histogram<u64> {
                let mut h = histogram();
                let connections = a.common.connections;
                let mut mine = 0usize;
                loop {
                    let n = next.fetch_add(1, Relaxed);
                    if n >= a.sessions || deadline.is_some_and(|d| Instant::now() >= d) {
                        return h;
                    }
                    let index = if a.sessions as usize <= logins.len() {
                        n as usize
                    } else {
                        worker + mine * connections
                    };
                    mine += 1;
                    let (user, pass) = &logins[index % logins.len()];
                    let t = Instant::now();
                    match pop_session(&a, user, pass) {
                        Ok((msgs, bytes)) => {
                            totals.ops.fetch_add(1, Relaxed);
                            totals.bytes.fetch_add(bytes, Relaxed);
                            retrieved.fetch_add(msgs, Relaxed);
                            totals.code("+OK");
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        Err(e) => {
                            totals.errors.fetch_add(1, Relaxed);
                            totals.code("error");
                            if totals.errors.load(Relaxed) <= 5 {
                                eprintln!("ppblast: session {n} ({user}): {e:#}");
                            }
                        }
                    }
                    pb.inc(1);
                }
            })
        })
        .collect();
    let mut total = histogram();
    for w in workers {
        total.add(&w.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)?;
    }
    pb.finish_and_clear();
    println!("messages retrieved: {}", retrieved.load(Relaxed));
    let label = format!(
        "pop {} conns{}{}",
        a.common.connections,
        if a.retr {
            ", RETR"
        } else if a.uidl {
            ", STAT + UIDL"
        } else {
            ", STAT only"
        },
        if a.dele { "+DELE" } else { "" }
    );
    finish(&label, &totals, started.elapsed(), &total, &a.common, 1)
}

/// One POP3 session; returns (messages retrieved, bytes retrieved).
fn pop_session(a: &PopArgs, user: &str, pass: &str) -> anyhow::Result<(u64, u64)> {
    let mut c = Conn::connect(&a.server, Duration::from_millis(a.common.timeout_ms))?;
    let greeting = c.pop_line()?;
    anyhow::ensure!(greeting.starts_with("+OK"), "greeting {greeting}");
    c.pop_ok(&format!("USER {user}\r\n"))?;
    c.pop_ok(&format!("PASS {pass}\r\n"))?;
    let stat = c.pop_ok("STAT\r\n")?;
    let count: u64 = stat
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut msgs, mut bytes) = (0, 0);
    if (a.retr || a.uidl) && count > 0 {
        c.pop_ok("UIDL\r\n")?;
        c.pop_body()?;
    }
    if a.retr && count > 0 {
        for i in 1..=count {
            c.pop_ok(&format!("RETR {i}\r\n"))?;
            bytes += c.pop_body()?;
            msgs += 1;
            if a.dele {
                c.pop_ok(&format!("DELE {i}\r\n"))?;
            }
        }
    }
    c.pop_ok("QUIT\r\n")?;
    Ok((msgs, bytes))
}

fn finish(
    label: &str,
    totals: &Totals,
    elapsed: Duration,
    h: &Histogram<u64>,
    common: &Common,
    per_op: u64,
) -> anyhow::Result<()> {
    let ops = totals.ops.load(Relaxed);
    report(label, ops, totals.bytes.load(Relaxed), elapsed, h);
    if per_op > 1 {
        println!(
            "recipient deliveries: {:.0}/s",
            (ops * per_op) as f64 / elapsed.as_secs_f64().max(1e-9)
        );
    }
    if let Ok(codes) = totals.codes.lock() {
        let list: Vec<String> = codes.iter().map(|(c, n)| format!("{c}={n}")).collect();
        println!("replies: {}", list.join(" "));
    }
    if let Some(p) = &common.hgrm {
        write_hgrm(p, h)?;
        println!("histogram written to {}", p.display());
    }
    if let Some(p) = &common.svg {
        plot(p, label, h)?;
        println!("plot written to {}", p.display());
    }
    if totals.errors.load(Relaxed) > 0 {
        println!("errors: {}", totals.errors.load(Relaxed));
    }
    Ok(())
}

/// The percentile distribution in HdrHistogram's text format (values in ms),
/// readable by HdrHistogram's plotter.
fn write_hgrm(path: &PathBuf, h: &Histogram<u64>) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    writeln!(
        f,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        writeln!(
            f,
            "{:>12.3} {:>14.12} {:>10} {:>14.2}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        )?;
    }
    writeln!(
        f,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    )?;
    writeln!(
        f,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    )?;
    Ok(())
}

/// Latency (ms) against percentile on a log "nines" axis.
fn plot(path: &PathBuf, title: &str, h: &Histogram<u64>) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points: Vec<(f64, f64)> = h
        .iter_quantiles(1)
        .filter(|v| v.quantile_iterated_to() < 1.0)
        .map(|v| {
            (
                -(1.0 - v.quantile_iterated_to()).log10(),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .collect();
    let x_max = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let y_max = (h.max() as f64 / 1000.0).max(0.001) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| format!("{:.4}%", 100.0 * (1.0 - 10f64.powf(-x))))
        .draw()?;
    chart.draw_series(LineSeries::new(points, &BLUE))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_messages() {
        assert_eq!(parse_sizes("4k").unwrap(), vec![(4096, 1)]);
        assert_eq!(
            parse_sizes("1024:50,64k:50").unwrap(),
            vec![(1024, 50), (65536, 50)]
        );
        let sizes = parse_sizes("1:1,2:1").unwrap();
        let picked: std::collections::BTreeSet<usize> =
            (0..100).map(|n| pick_size(&sizes, n)).collect();
        assert_eq!(picked.len(), 2, "both sizes drawn");
        for size in [300, 4096, 65536] {
            let m = message("run-7", "a@b", &["c@d".into()], size);
            assert_eq!(m.len(), size);
            assert!(m.contains("X-PPBlast-Id: run-7\r\n"));
            assert!(m.ends_with("\r\n"));
            assert!(!m.contains("\r\n."), "no line starts with a dot");
        }
    }

    /// The terminator is found however the stream is cut, and dot-stuffed
    /// lines and a body of only CRLF do not end it early.
    #[test]
    fn body_end_in_any_pieces() {
        let cases: [(&[u8], u64); 4] = [
            (b".\r\n", 0),
            (b"\r\n.\r\n", 2),
            (b"a\r\n..b\r\n.x\r\nc\r\n.\r\n", 15),
            (b"line one\r\n\r\n..\r\n.\r\n", 16),
        ];
        for (body, want) in cases {
            let mut stream = body.to_vec();
            stream.extend_from_slice(b"+OK next");
            for piece in 1..=stream.len() {
                let mut end = BodyEnd::default();
                let mut used_total = 0;
                let mut done = false;
                for chunk in stream.chunks(piece) {
                    let (used, d) = end.feed(chunk);
                    used_total += used;
                    if d {
                        done = true;
                        break;
                    }
                    assert_eq!(used, chunk.len());
                }
                assert!(done, "{body:?} in pieces of {piece}");
                assert_eq!(used_total, body.len(), "{body:?} in pieces of {piece}");
                assert_eq!(end.body_bytes(), want, "{body:?} in pieces of {piece}");
            }
        }
    }
}
