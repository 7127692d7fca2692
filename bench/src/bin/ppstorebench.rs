//! `ppstorebench`: load on one pplistener backend over PPL/1.
//!
//! `put`: N connections, each with one PUT in flight (so N in flight), fixed
//! body size, one mailbox per message spread over M mailboxes. `get`: stores
//! M messages first, then N connections GET them round-robin.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use powermail_bench::{histogram, report};
use powermail_proto::{BackendConn, MailboxName, MessageId};

#[derive(Parser, Debug)]
#[command(about = "PUT/GET load on one pplistener backend")]
struct Args {
    /// put or get.
    mode: String,
    /// Backend address.
    #[arg(long, default_value = "127.0.0.1:7000")]
    backend: String,
    /// Backend secret.
    #[arg(long)]
    secret: String,
    /// Body size in bytes.
    #[arg(long, default_value_t = 4096)]
    size_bytes: usize,
    /// Connections = requests in flight.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Operations in total.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Distinct mailboxes.
    #[arg(long, default_value_t = 1000)]
    mailboxes: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let timeout = Duration::from_secs(60);
    let body: Arc<Vec<u8>> = Arc::new((0..args.size_bytes).map(|i| (i % 251) as u8).collect());
    let mailbox = |i: u64| {
        MailboxName::parse(&format!("bench{}@bench.test", i % args.mailboxes as u64))
            .expect("valid")
    };
    let run_tag = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_micros()
    );
    let stored: Vec<(MailboxName, MessageId)> = if args.mode == "get" {
        let mut c = BackendConn::connect(&args.backend, args.secret.as_bytes(), timeout)?;
        let n = args.mailboxes as u64;
        (0..n)
            .map(|i| {
                let id = MessageId::parse(&format!("{run_tag}.g{i}")).expect("valid");
                c.put(&id, &[mailbox(i)], &body).map(|_| (mailbox(i), id))
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let stored = Arc::new(stored);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.inflight)
        .map(|_| {
            let (next, body, stored, args_backend, secret, tag) = (
                next.clone(),
                body.clone(),
                stored.clone(),
                args.backend.clone(),
                args.secret.clone(),
                run_tag.clone(),
            );
            let (count, mode, nmb) = (args.count, args.mode.clone(), args.mailboxes as u64);
            std::thread::spawn(
                move || -> anyhow::Result<(hdrhistogram::Histogram<u64>, u64)> {
                    let mut h = histogram();
                    let mut bytes = 0;
                    let mut c = BackendConn::connect(&args_backend, secret.as_bytes(), timeout)?;
                    loop {
                        let i = next.fetch_add(1, Relaxed);
                        if i >= count {
                            return Ok((h, bytes));
                        }
                        let t = Instant::now();
                        if mode == "put" {
                            let id = MessageId::parse(&format!("{tag}.p{i}")).expect("valid");
                            let m = MailboxName::parse(&format!("bench{}@bench.test", i % nmb))
                                .expect("valid");
                            c.put(&id, &[m], &body)?;
                            bytes += body.len() as u64;
                        } else {
                            let (m, id) = &stored[(i % stored.len() as u64) as usize];
                            let size = c.get_begin(m, id)?;
                            c.read_body(size, &mut std::io::sink())?;
                            bytes += size;
                        }
                        h.record(t.elapsed().as_micros() as u64)?;
                    }
                },
            )
        })
        .collect();
    let mut total = histogram();
    let mut bytes = 0;
    for w in workers {
        let (h, b) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        total.add(&h)?;
        bytes += b;
    }
    let label = format!(
        "{} {}B x{} in flight",
        args.mode, args.size_bytes, args.inflight
    );
    report(&label, total.len(), bytes, started.elapsed(), &total);
    Ok(())
}
