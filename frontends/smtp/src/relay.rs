//! Forwarding without a queue: a minimal SMTP client to the configured
//! outgoing relay, driven inside the incoming transaction.
//!
//! The relay session is opened at the first RCPT whose mailbox forwards
//! (EHLO, MAIL FROM with the same reverse path), every forward target is
//! given to it as RCPT and its answer becomes the answer to the incoming
//! RCPT. At DATA the relay gets the same bytes as the backends (the stored
//! form is SMTP wire form, so it is sent as is), and its answer to the final
//! `.` decides, together with the backends, the reply to the sender.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::session::Reply;

/// Longest reply line read from the relay.
const REPLY_LINE_MAX_BYTES: u64 = 1024;
/// Most lines of one multi-line reply.
const REPLY_LINES_MAX: usize = 64;

/// An open session with the relay.
#[derive(Debug)]
pub struct Relay {
    reader: BufReader<TcpStream>,
    writer: io::BufWriter<TcpStream>,
}

impl Relay {
    /// Connects, reads the greeting, says EHLO `hostname` and MAIL FROM
    /// `from`. Any failure is the reply to give the sender (always
    /// temporary here: the relay's refusal of our sender is not the
    /// sender's fault).
    pub fn open(addr: &str, hostname: &str, from: &str, timeout: Duration) -> Result<Relay, Reply> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            log::warn!("relay {addr}: {what}: {e}");
            Reply::new(451, "4.4.0 Forwarding relay unavailable, try again later")
        };
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| fail("resolve", &e))?
            .next()
            .ok_or_else(|| fail("resolve", &"no address"))?;
        let stream = TcpStream::connect_timeout(&sa, timeout).map_err(|e| fail("connect", &e))?;
        let setup = |s: &TcpStream| -> io::Result<TcpStream> {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            s.set_nodelay(true)?;
            s.try_clone()
        };
        let clone = setup(&stream).map_err(|e| fail("socket", &e))?;
        let mut relay = Relay {
            reader: BufReader::new(clone),
            writer: io::BufWriter::with_capacity(64 << 10, stream),
        };
        for (cmd, want) in [
            (None, 220),
            (Some(format!("EHLO {hostname}\r\n")), 250),
            (Some(format!("MAIL FROM:<{from}>\r\n")), 250),
        ] {
            let r = match cmd {
                Some(c) => relay.command(&c),
                None => relay.reply(),
            }
            .map_err(|e| fail("I/O", &e))?;
            if r.code != want {
                return Err(fail("refused", &format!("{} {}", r.code, r.text)));
            }
        }
        Ok(relay)
    }

    /// Offers one forward target. `Ok` when the relay accepted it; the
    /// relay's refusal is passed on (5xx as 550 5.7.1, else 451 4.4.0).
    pub fn rcpt(&mut self, target: &str) -> Result<(), Reply> {
        match self.command(&format!("RCPT TO:<{target}>\r\n")) {
            Ok(r) if r.code / 100 == 2 => Ok(()),
            Ok(r) if r.code / 100 == 5 => Err(Reply::new(
                550,
                format!(
                    "5.7.1 Forwarding to {target} refused: {} {}",
                    r.code, r.text
                ),
            )),
            Ok(r) => Err(Reply::new(
                451,
                format!(
                    "4.4.0 Forwarding to {target} deferred: {} {}",
                    r.code, r.text
                ),
            )),
            Err(e) => Err(Reply::new(
                451,
                format!("4.4.0 Forwarding relay failed: {e}"),
            )),
        }
    }

    /// Sends DATA and waits for 354.
    pub fn data(&mut self) -> io::Result<()> {
        let r = self.command("DATA\r\n")?;
        if r.code != 354 {
            return Err(io::Error::other(format!(
                "DATA refused: {} {}",
                r.code, r.text
            )));
        }
        Ok(())
    }

    /// Message bytes, already in wire form.
    pub fn chunk(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Ends the message and returns the relay's answer.
    pub fn end(&mut self) -> io::Result<Reply> {
        self.command(".\r\n")
    }

    /// Says goodbye, errors ignored.
    pub fn quit(mut self) {
        let _ = self.command("QUIT\r\n");
    }

    fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.flush()?;
        self.reply()
    }

    /// Reads one (possibly multi-line) reply; returns its code and last line.
    fn reply(&mut self) -> io::Result<Reply> {
        for _ in 0..REPLY_LINES_MAX {
            let mut line = Vec::new();
            (&mut self.reader)
                .take(REPLY_LINE_MAX_BYTES)
                .read_until(b'\n', &mut line)?;
            if line.last() != Some(&b'\n') {
                return Err(io::Error::other("relay reply line missing or too long"));
            }
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let code = text.get(..3).and_then(|c| c.parse::<u16>().ok());
            match (code, text.as_bytes().get(3)) {
                (Some(_), Some(b'-')) => continue,
                (Some(code), _) => {
                    return Ok(Reply::new(code, text.get(4..).unwrap_or("").to_string()))
                }
                _ => return Err(io::Error::other(format!("bad relay reply {text:?}"))),
            }
        }
        Err(io::Error::other("relay reply too long"))
    }
}
