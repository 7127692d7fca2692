//! Splitting the client's byte stream into command lines, with a bound.
//!
//! POP3 commands are lines ending in CRLF (a bare LF is accepted too: some
//! clients send it and refusing it helps nobody). [`LineReader`] is fed any
//! chunk of bytes and hands out complete lines one at a time. A line longer
//! than the limit is never buffered whole: its bytes are dropped as they
//! arrive and the reader yields [`Line::TooLong`] once its end is seen, so a
//! hostile client cannot make the server buffer without bound.

/// One complete line from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// The line without its CRLF (or LF).
    Complete(Vec<u8>),
    /// The line was longer than the limit; its content is gone.
    TooLong,
}

/// An incremental, bounded line splitter.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Bytes of `buf` before this index were handed out already.
    start: usize,
    line_max_bytes: usize,
    /// The current line overflowed: drop bytes up to the next LF.
    discarding: bool,
    /// A [`Line::TooLong`] is ready to be handed out.
    overflowed: bool,
}

impl LineReader {
    /// A reader refusing lines longer than `line_max_bytes` (CRLF included).
    pub fn new(line_max_bytes: usize) -> LineReader {
        assert!(line_max_bytes >= 3, "a line needs room for a command");
        LineReader {
            buf: Vec::with_capacity(line_max_bytes.min(4096)),
            start: 0,
            line_max_bytes,
            discarding: false,
            overflowed: false,
        }
    }

    /// Adds bytes read from the client. The caller drains [`next_line`]
    /// before feeding more, so the buffer holds at most one partial line
    /// (bounded by the limit) plus one chunk.
    ///
    /// [`next_line`]: Self::next_line
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.discarding {
            let Some(i) = data.iter().position(|&b| b == b'\n') else {
                return;
            };
            self.discarding = false;
            self.overflowed = true;
            // The overflowed line must come out before any line that
            // follows it, so keep the rest for later.
            self.buf.extend_from_slice(&data[i + 1..]);
            return;
        }
        self.buf.extend_from_slice(data);
        self.check_overflow();
    }

    /// If the unfinished tail is already too long, drop it and discard
    /// until its end.
    fn check_overflow(&mut self) {
        let tail = &self.buf[self.start..];
        if !tail.contains(&b'\n') && tail.len() >= self.line_max_bytes {
            self.buf.truncate(self.start);
            self.discarding = true;
        }
    }

    /// The next complete line, if one has arrived.
    pub fn next_line(&mut self) -> Option<Line> {
        if self.overflowed {
            self.overflowed = false;
            self.check_overflow();
            return Some(Line::TooLong);
        }
        let tail = &self.buf[self.start..];
        let i = tail.iter().position(|&b| b == b'\n')?;
        let with_lf = i + 1;
        let mut line = &tail[..i];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let out = if with_lf > self.line_max_bytes {
            Line::TooLong
        } else {
            Line::Complete(line.to_vec())
        };
        self.start += with_lf;
        self.check_overflow();
        Some(out)
    }

    /// Bytes buffered and not yet handed out (for tests and assertions).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(input: &[u8], chunk: usize, max: usize) -> Vec<Line> {
        let mut r = LineReader::new(max);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            r.feed(c);
            while let Some(l) = r.next_line() {
                out.push(l);
            }
            assert!(r.buffered() < max + chunk, "buffer bounded");
        }
        out
    }

    #[test]
    fn same_lines_whatever_the_chunking() {
        let long = vec![b'x'; 3000];
        let mut input = b"USER a\r\nPASS b c\r\nSTAT\nNOOP\r\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\r\nQUIT\r\n\r\nRE");
        let want = vec![
            Line::Complete(b"USER a".to_vec()),
            Line::Complete(b"PASS b c".to_vec()),
            Line::Complete(b"STAT".to_vec()),
            Line::Complete(b"NOOP".to_vec()),
            Line::TooLong,
            Line::Complete(b"QUIT".to_vec()),
            Line::Complete(b"".to_vec()),
        ];
        let mut chunk = 1;
        while chunk <= 512 {
            assert_eq!(split_all(&input, chunk, 255), want, "chunk {chunk}");
            chunk *= 2;
        }
    }

    #[test]
    fn limit_counts_the_crlf() {
        let line = format!("{}\r\n", "a".repeat(253));
        assert_eq!(
            split_all(line.as_bytes(), 7, 255),
            vec![Line::Complete(vec![b'a'; 253])]
        );
        let line = format!("{}\r\n", "a".repeat(254));
        assert_eq!(split_all(line.as_bytes(), 7, 255), vec![Line::TooLong]);
    }
}
