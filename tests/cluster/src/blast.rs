//! The one SMTP blast of the cluster cases: many senders, one message per
//! connection, the SMTP hosts taken in turn, while the case does something
//! else (a fault) on the calling thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use powermail_testkit::Smtp;

/// The envelope sender of every message a case sends.
pub const SENDER: &str = "sender@outside.test";
/// Most sender threads of one [`blast`].
pub const SENDERS_MAX: usize = 64;

/// Delivers `wire` to `rcpt` through the powersmtp at `smtp` on a new
/// connection: the final code, or 0 when there was no answer.
pub fn deliver(smtp: SocketAddr, rcpt: &str, wire: &[u8]) -> u16 {
    Smtp::connect(smtp)
        .and_then(|mut c| {
            let code = c.send(SENDER, &[rcpt], wire)?;
            c.quit();
            Ok(code)
        })
        .unwrap_or(0)
}

/// One message of a [`blast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Its number.
    pub n: usize,
    /// The final SMTP code; 0 when there was no answer.
    pub code: u16,
    /// How long its transaction took.
    pub took: Duration,
}

/// What a running [`blast`] has done so far.
#[derive(Debug, Default)]
pub struct Progress {
    next: AtomicUsize,
    acked: AtomicUsize,
    sent: Mutex<Vec<Sent>>,
}

impl Progress {
    /// Messages answered 250 so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Relaxed)
    }
}

/// Sends messages `0..messages` from `senders` threads, message `n` through
/// `smtp[n % smtp.len()]` on its own connection, `mail(n)` giving its
/// recipient and wire bytes; `during` runs on the calling thread meanwhile.
/// Returns every message (in the order they finished) and what `during`
/// returned.
pub fn blast<R>(
    smtp: &[SocketAddr],
    senders: usize,
    messages: usize,
    mail: impl Fn(usize) -> (String, Vec<u8>) + Sync,
    during: impl FnOnce(&Progress) -> R,
) -> (Vec<Sent>, R) {
    assert!(!smtp.is_empty(), "a blast needs an SMTP host");
    assert!(
        senders <= SENDERS_MAX,
        "more than {SENDERS_MAX} senders in one blast"
    );
    let progress = Progress::default();
    let result = std::thread::scope(|s| {
        for _ in 0..senders {
            s.spawn(|| loop {
                let n = progress.next.fetch_add(1, Relaxed);
                if n >= messages {
                    return;
                }
                let (rcpt, wire) = mail(n);
                let t = Instant::now();
                let code = deliver(smtp[n % smtp.len()], &rcpt, &wire);
                let one = Sent {
                    n,
                    code,
                    took: t.elapsed(),
                };
                if code == 250 {
                    progress.acked.fetch_add(1, Relaxed);
                }
                progress
                    .sent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(one);
            });
        }
        during(&progress)
    });
    let sent = progress
        .sent
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    (sent, result)
}
