//! The DATA phase: end-of-message detection and normalisation to wire form.
//!
//! Input is the raw byte stream after `354`, in chunks of any size. Output is
//! the message as PowerMail stores it: SMTP wire form (every line ends in
//! CRLF, dot-stuffed lines kept as received), without the final `.CRLF`, so
//! that POP3 RETR can send the stored bytes followed by `.CRLF` unchanged.
//!
//! Rules (RFC 5321 §4.1.1.4, §2.3.8, and the 2023 SMTP-smuggling findings):
//!
//! * Only `CRLF . CRLF` ends the message (or `. CRLF` right after `354`).
//!   `LF . CRLF`, `CR . CRLF`, `LF . LF` and the like never do.
//! * A bare LF or a bare CR is not a line end for SMTP, but would be one for
//!   a lenient POP3 client reading the stored form. Each is therefore
//!   normalised to CRLF, and a `.` starting the line that follows such a
//!   normalised line end is dot-stuffed (doubled), because the sender did not
//!   see a line start there and did not stuff it. A stored message thus never
//!   contains a line that reads as an end of data, whatever the reader.
//! * A line that is just `.` followed by a bare CR or LF is stored as `..`.
//! * Lines longer than 1000 octets (RFC 5321 §4.5.3.1.6) are accepted and
//!   stored unchanged: nothing here buffers a line, so they cost nothing,
//!   and RFC 5321 §4.5.3.1 asks receivers to be liberal. The message size
//!   limit still applies.
//!
//! Output never exceeds twice the input, so a bounded input chunk gives a
//! bounded output chunk.

/// Where the receiver is, relative to lines of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line the sender knows is a line (after CRLF or 354).
    LineStart,
    /// Read `.` at a line start; held back (end or stuffing unknown yet).
    Dot,
    /// Read `.` CR at a line start; held back.
    DotCr,
    /// Inside a line.
    Mid,
    /// Read CR inside a line (emitted; the LF is expected).
    Cr,
    /// At a line start made by normalising a bare CR or LF.
    FreshLine,
}

/// Incremental DATA receiver. Feed it chunks with [`ingest`](Self::ingest).
#[derive(Debug, Clone)]
pub struct DataReceiver {
    state: State,
    /// Bare CRs and LFs normalised so far (for logs and tests).
    pub bare_line_ends: u64,
}

impl Default for DataReceiver {
    fn default() -> Self {
        DataReceiver::new()
    }
}

impl DataReceiver {
    /// A receiver positioned right after the `354` reply.
    pub fn new() -> DataReceiver {
        DataReceiver {
            state: State::LineStart,
            bare_line_ends: 0,
        }
    }

    /// Consumes bytes of `input`, appending the stored form to `out`, until
    /// the end of the message or of `input`. Returns `(consumed, ended)`;
    /// when `ended`, the bytes after `consumed` belong to the next command.
    pub fn ingest(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Mid {
                // Inside a line only CR and LF change anything: the bytes up
                // to the next one are copied at once, not stepped one by one.
                let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                out.extend_from_slice(&input[i..i + run]);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            if self.step(input[i], out) {
                return (i + 1, true);
            }
            i += 1;
        }
        (input.len(), false)
    }

    /// One byte; returns true at the end of the message.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> bool {
        use State::*;
        self.state = match (self.state, b) {
            (LineStart, b'.') => Dot,
            (Dot, b'\r') => DotCr,
            (DotCr, b'\n') => return true,
            (Dot, b'\n') => {
                self.bare_line_ends += 1;
                out.extend_from_slice(b"..\r\n");
                FreshLine
            }
            (Dot, _) => {
                out.push(b'.');
                out.push(b);
                Mid
            }
            (DotCr, _) => {
                // `.` CR x: a bare CR after a lone dot.
                self.bare_line_ends += 1;
                out.extend_from_slice(b"..\r\n");
                self.state = FreshLine;
                return self.step(b, out);
            }
            (Cr, b'\n') => {
                out.push(b'\n');
                LineStart
            }
            (Cr, _) => {
                // The CR before was bare: complete it to CRLF.
                self.bare_line_ends += 1;
                out.push(b'\n');
                self.state = FreshLine;
                return self.step(b, out);
            }
            (FreshLine, b'.') => {
                out.extend_from_slice(b"..");
                Mid
            }
            (LineStart | FreshLine | Mid, b'\r') => {
                out.push(b'\r');
                Cr
            }
            (LineStart | FreshLine | Mid, b'\n') => {
                self.bare_line_ends += 1;
                out.extend_from_slice(b"\r\n");
                FreshLine
            }
            (LineStart | FreshLine | Mid, _) => {
                out.push(b);
                Mid
            }
        };
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `n` bytes; returns (stored, bytes consumed)
    /// or None when the message did not end.
    fn run(input: &[u8], n: usize) -> Option<(Vec<u8>, usize)> {
        let mut r = DataReceiver::new();
        let mut out = Vec::new();
        let mut pos = 0;
        for chunk in input.chunks(n) {
            let (used, ended) = r.ingest(chunk, &mut out);
            pos += used;
            if ended {
                return Some((out, pos));
            }
        }
        None
    }

    /// Same result for every chunk size from 1 to 512 (powers of two).
    fn all_sizes(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let whole = run(input, input.len().max(1));
        let mut n = 1;
        while n <= 512 {
            assert_eq!(run(input, n), whole, "chunk size {n}");
            n *= 2;
        }
        whole
    }

    fn stored(input: &[u8]) -> Vec<u8> {
        all_sizes(input).expect("message ends").0
    }

    /// The byte-at-a-time reference: [`DataReceiver::step`] alone.
    fn run_bytewise(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let mut r = DataReceiver::new();
        let mut out = Vec::new();
        for (i, &b) in input.iter().enumerate() {
            if r.step(b, &mut out) {
                return Some((out, i + 1));
            }
        }
        None
    }

    /// The bulk copy inside lines gives exactly what stepping every byte
    /// gives, on inputs dense in CR, LF and dots, in any chunking.
    #[test]
    fn bulk_copy_matches_bytewise_steps() {
        let alphabet = b"\r\n.ab";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for case in 0..3_000 {
            let len = case % 200;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .chain(*b"\r\n.\r\n")
                .collect();
            let want = run_bytewise(&input);
            for n in [1, 2, 3, 7, 64, input.len()] {
                assert_eq!(run(&input, n), want, "{input:?} in chunks of {n}");
            }
        }
    }

    #[test]
    fn plain_message_is_stored_in_wire_form() {
        let (out, used) = all_sizes(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n").unwrap();
        assert_eq!(out, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(used, 24);
    }

    #[test]
    fn empty_message() {
        assert_eq!(stored(b".\r\n"), b"");
    }

    #[test]
    fn dot_stuffing_is_kept() {
        assert_eq!(stored(b"..\r\n...x\r\n.\r\n"), b"..\r\n...x\r\n");
        assert_eq!(stored(b"a\r\n.b\r\n.\r\n"), b"a\r\n.b\r\n");
    }

    #[test]
    fn smuggling_lf_dot_crlf_does_not_end() {
        let input = b"a\n.\r\nMAIL FROM:<evil@x>\r\n.\r\n";
        let out = stored(input);
        assert_eq!(out, b"a\r\n..\r\nMAIL FROM:<evil@x>\r\n");
        assert_eq!(all_sizes(input).unwrap().1, input.len());
    }

    #[test]
    fn smuggling_cr_dot_crlf_does_not_end() {
        let out = stored(b"a\r.\r\nRSET\r\n.\r\n");
        assert_eq!(out, b"a\r\n..\r\nRSET\r\n");
    }

    #[test]
    fn smuggling_lf_dot_lf_and_crlf_dot_lf_do_not_end() {
        assert_eq!(stored(b"a\n.\nb\r\n.\r\n"), b"a\r\n..\r\nb\r\n");
        assert_eq!(stored(b"a\r\n.\nb\r\n.\r\n"), b"a\r\n..\r\nb\r\n");
        assert_eq!(stored(b"a\r\n.\rb\r\n.\r\n"), b"a\r\n..\r\nb\r\n");
    }

    #[test]
    fn bare_lf_and_cr_are_normalised() {
        assert_eq!(stored(b"a\nb\rc\r\r\n.\r\n"), b"a\r\nb\r\nc\r\n\r\n");
        let mut r = DataReceiver::new();
        let mut out = Vec::new();
        r.ingest(b"a\nb\r\n.\r\n", &mut out);
        assert_eq!(r.bare_line_ends, 1);
    }

    #[test]
    fn unterminated_message_does_not_end() {
        assert_eq!(all_sizes(b"a\r\n.\r"), None);
        assert_eq!(all_sizes(b"a\r\n."), None);
        assert_eq!(all_sizes(b"a\r\n"), None);
    }

    #[test]
    fn stored_form_never_contains_an_end_marker() {
        let nasty: &[&[u8]] = &[
            b"\n.\n",
            b"\r.\r",
            b"\n.\r\n",
            b"\r.\r\n",
            b".\n",
            b".\r",
            b"\r\n..\r\n",
        ];
        for a in nasty {
            for b in nasty {
                let mut input = b"x".to_vec();
                input.extend_from_slice(a);
                input.extend_from_slice(b);
                input.extend_from_slice(b"\r\n.\r\n");
                let out = stored(&input);
                let with_end = [b"\r\n".as_slice(), &out].concat();
                assert!(
                    !with_end.windows(5).any(|w| w == b"\r\n.\r\n"),
                    "{input:?} stored as {out:?}"
                );
                assert!(out.is_empty() || out.ends_with(b"\r\n"), "{out:?}");
                for (i, &c) in out.iter().enumerate() {
                    if c == b'\n' {
                        assert_eq!(out[i - 1], b'\r', "bare LF in {out:?}");
                    }
                    if c == b'\r' {
                        assert_eq!(out.get(i + 1), Some(&b'\n'), "bare CR in {out:?}");
                    }
                }
            }
        }
    }
}
