//! SMTP DATA receiver: the stored form never contains a line that ends a
//! message (so POP3 can send it as is, followed by ".\r\n"), has only CRLF
//! line ends, and does not depend on how the input was split.
#![no_main]
use libfuzzer_sys::fuzz_target;
use powersmtp::data::DataReceiver;

fn receive(pieces: &[&[u8]]) -> (Vec<u8>, Option<usize>) {
    let mut r = DataReceiver::new();
    let mut out = Vec::new();
    let mut offset = 0;
    for piece in pieces {
        let (used, ended) = r.ingest(piece, &mut out);
        if ended {
            return (out, Some(offset + used));
        }
        offset += piece.len();
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let split = (data[0] as usize).min(input.len());
    let whole = receive(&[input]);
    assert_eq!(whole, receive(&[&input[..split], &input[split..]]));
    if let (stored, Some(_)) = whole {
        let mut framed = b"\r\n".to_vec();
        framed.extend_from_slice(&stored);
        assert!(
            !framed.windows(5).any(|w| w == b"\r\n.\r\n"),
            "a terminator inside the stored message"
        );
        for (i, &b) in stored.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && stored[i - 1] == b'\r', "bare LF stored");
            }
            if b == b'\r' {
                assert_eq!(stored.get(i + 1), Some(&b'\n'), "bare CR stored");
            }
        }
    }
});
