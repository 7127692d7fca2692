//! A small SMTP load generator for measuring powersmtp alone (the project's
//! full blaster is `bench/`'s ppblast). Each thread keeps one connection and
//! sends its messages one after the other, MAIL/RCPT/DATA pipelined; the
//! latency of a message is from MAIL to the final 250.
//!
//! ```text
//! cargo run --release -p powersmtp --example smtpblast -- \
//!     127.0.0.1:2525 RCPT THREADS MESSAGES_PER_THREAD SIZE_BYTES
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn reply(r: &mut BufReader<TcpStream>) -> u16 {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).expect("read") == 0 {
            panic!("server closed");
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line[..3].parse().expect("reply code");
        }
    }
}

fn blast(addr: &str, rcpt: &str, messages: usize, body: &[u8]) -> (Vec<u64>, usize) {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    assert_eq!(reply(&mut r), 220);
    w.write_all(b"EHLO blast\r\n").unwrap();
    assert_eq!(reply(&mut r), 250);
    let mut lat = Vec::with_capacity(messages);
    let mut failed = 0;
    let envelope = format!("MAIL FROM:<blast@sender.example>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
    for _ in 0..messages {
        let t = Instant::now();
        w.write_all(envelope.as_bytes()).unwrap();
        let codes = [reply(&mut r), reply(&mut r), reply(&mut r)];
        if codes != [250, 250, 354] {
            failed += 1;
            w.write_all(b"RSET\r\n").unwrap();
            reply(&mut r);
            continue;
        }
        w.write_all(body).unwrap();
        w.write_all(b".\r\n").unwrap();
        if reply(&mut r) == 250 {
            lat.push(t.elapsed().as_micros() as u64);
        } else {
            failed += 1;
        }
    }
    let _ = w.write_all(b"QUIT\r\n");
    (lat, failed)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: smtpblast ADDR RCPT THREADS MESSAGES_PER_THREAD SIZE_BYTES");
        std::process::exit(2);
    }
    let (addr, rcpt) = (a[1].clone(), a[2].clone());
    let threads: usize = a[3].parse().expect("threads");
    let messages: usize = a[4].parse().expect("messages");
    let size: usize = a[5].parse().expect("size");
    let mut body = b"Subject: blast\r\n\r\n".to_vec();
    while body.len() + 78 <= size {
        body.extend_from_slice(&[b'x'; 76]);
        body.extend_from_slice(b"\r\n");
    }
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (addr, rcpt, body) = (addr.clone(), rcpt.clone(), body.clone());
            std::thread::spawn(move || blast(&addr, &rcpt, messages, &body))
        })
        .collect();
    let mut lat = Vec::new();
    let mut failed = 0;
    for h in handles {
        let (l, f) = h.join().expect("thread");
        lat.extend(l);
        failed += f;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "threads={threads} messages={} failed={failed} size={}B seconds={secs:.2} msgs/s={:.0} p50={:.2}ms p99={:.2}ms max={:.2}ms",
        lat.len(),
        body.len(),
        lat.len() as f64 / secs,
        q(0.5),
        q(0.99),
        q(1.0)
    );
}
