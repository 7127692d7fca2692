//! PPL/1 decoder: never panics, and gives the same events whether the input
//! arrives whole or split at any point (bodies compared as concatenations).
#![no_main]
use libfuzzer_sys::fuzz_target;
use powermail_proto::{Decoder, Event, Limits};

#[derive(Debug, PartialEq)]
enum Seen {
    Body(Vec<u8>),
    Other(String),
}

fn events(pieces: &[&[u8]]) -> Vec<Seen> {
    let limits = Limits {
        line_max_bytes: 64,
        mailboxes_per_put_max: 4,
        chunk_max_bytes: 64,
        message_max_bytes: 256,
    };
    let mut d = Decoder::new(limits);
    let mut out: Vec<Seen> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match d.decode(&buf) {
                Err(f) => {
                    out.push(Seen::Other(format!("fatal {f:?}")));
                    return out;
                }
                Ok((None, 0)) => break,
                Ok((ev, n)) => {
                    assert!(n <= buf.len(), "consumed more than given");
                    match ev {
                        Some(Event::Body(b)) => match out.last_mut() {
                            Some(Seen::Body(v)) => v.extend_from_slice(b),
                            _ => out.push(Seen::Body(b.to_vec())),
                        },
                        Some(other) => out.push(Seen::Other(format!("{other:?}"))),
                        None => {}
                    }
                    buf.drain(..n);
                }
            }
        }
        // Nothing undecoded may grow past one line.
        assert!(
            buf.len() <= 64 + 2 || d.in_put(),
            "decoder left {} bytes",
            buf.len()
        );
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let split = data[0] as usize % data.len();
    let (a, b) = data[1..].split_at(split.min(data.len() - 1));
    assert_eq!(events(&[&data[1..]]), events(&[a, b]));
});
