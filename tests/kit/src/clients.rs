//! Small blocking SMTP and POP3 clients on `TcpStream` that send exactly the
//! bytes they are given and keep the exact bytes they read, so stored and
//! retrieved messages can be compared and hashed. Every read and write
//! times out after [`IO_TIMEOUT`].

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

use crate::IO_TIMEOUT;

/// Most lines one SMTP reply may have (EHLO answers have about ten).
pub const REPLY_LINES_MAX: usize = 100;

/// A connected socket with both time-outs set.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// A blocking SMTP client that sends exactly the bytes it is given.
pub struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Smtp {
    /// Connects, reads the greeting and says EHLO; fails unless both are 2xx.
    pub fn connect(addr: SocketAddr) -> io::Result<Smtp> {
        let mut c = Smtp::greet(addr)?;
        let (code, text) = c.cmd("EHLO client.sys.test")?;
        if code != 250 {
            return Err(io::Error::other(format!("EHLO {code} {text}")));
        }
        Ok(c)
    }

    /// Connects and reads the greeting only (no EHLO); fails unless it is 220.
    pub fn greet(addr: SocketAddr) -> io::Result<Smtp> {
        let s = connect(addr)?;
        let mut c = Smtp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let (code, text) = c.reply()?;
        if code != 220 {
            return Err(io::Error::other(format!("greeting {code} {text}")));
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply: its code and last line.
    pub fn reply(&mut self) -> io::Result<(u16, String)> {
        let (code, mut lines) = self.reply_lines()?;
        Ok((code, lines.pop().unwrap_or_default()))
    }

    /// Reads one reply: its code and every line (at most
    /// [`REPLY_LINES_MAX`]), without line ends.
    pub fn reply_lines(&mut self) -> io::Result<(u16, Vec<String>)> {
        let mut lines = Vec::new();
        while lines.len() < REPLY_LINES_MAX {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.trim_end().to_string());
            if last {
                return Ok((code, lines));
            }
        }
        Err(io::Error::other("reply longer than REPLY_LINES_MAX lines"))
    }

    /// Sends one command line and reads every line of its reply.
    pub fn cmd_lines(&mut self, line: &str) -> io::Result<(u16, Vec<String>)> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply_lines()
    }

    /// Sends one command line and reads its reply.
    pub fn cmd(&mut self, line: &str) -> io::Result<(u16, String)> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// One transaction of `wire` (dot-stuffed, CRLF-terminated) to `rcpts`;
    /// returns the final code (the first refusal if any step is refused).
    pub fn send(&mut self, from: &str, rcpts: &[&str], wire: &[u8]) -> io::Result<u16> {
        let (code, _) = self.cmd(&format!("MAIL FROM:<{from}>"))?;
        if code != 250 {
            self.cmd("RSET")?;
            return Ok(code);
        }
        for r in rcpts {
            let (code, _) = self.cmd(&format!("RCPT TO:<{r}>"))?;
            if code != 250 {
                self.cmd("RSET")?;
                return Ok(code);
            }
        }
        let (code, _) = self.cmd("DATA")?;
        if code != 354 {
            self.cmd("RSET")?;
            return Ok(code);
        }
        let mut data = Vec::with_capacity(wire.len() + 3);
        data.extend_from_slice(wire);
        data.extend_from_slice(b".\r\n");
        self.w.write_all(&data)?;
        Ok(self.reply()?.0)
    }

    /// QUIT, ignoring the outcome.
    pub fn quit(mut self) {
        let _ = self.cmd("QUIT");
    }
}

/// A blocking POP3 client that keeps the raw (dot-stuffed) message bytes.
pub struct Pop {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Pop {
    /// Connects and reads the greeting (must be +OK).
    pub fn connect(addr: SocketAddr) -> io::Result<Pop> {
        let s = connect(addr)?;
        let mut c = Pop {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let g = c.line()?;
        if !g.starts_with("+OK") {
            return Err(io::Error::other(format!("greeting {g}")));
        }
        Ok(c)
    }

    /// Connects and logs in with USER/PASS.
    pub fn login(addr: SocketAddr, user: &str, pass: &str) -> io::Result<Pop> {
        let mut c = Pop::connect(addr)?;
        c.auth(user, pass)?;
        Ok(c)
    }

    /// USER + PASS; an error unless both are +OK.
    pub fn auth(&mut self, user: &str, pass: &str) -> io::Result<()> {
        let r = self.cmd(&format!("USER {user}"))?;
        if !r.starts_with("+OK") {
            return Err(io::Error::other(format!("USER: {r}")));
        }
        let r = self.cmd(&format!("PASS {pass}"))?;
        if !r.starts_with("+OK") {
            return Err(io::Error::other(format!("PASS: {r}")));
        }
        Ok(())
    }

    /// One reply line, without CRLF.
    pub fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_string())
    }

    /// Sends a command, returns the status line.
    pub fn cmd(&mut self, line: &str) -> io::Result<String> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.line()
    }

    /// Writes raw bytes.
    pub fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Sends a command with a multi-line answer; returns the status line and
    /// the raw bytes up to (not including) the terminating `.CRLF`.
    pub fn multi(&mut self, line: &str) -> io::Result<(String, Vec<u8>)> {
        let status = self.cmd(line)?;
        if !status.starts_with("+OK") {
            return Ok((status, Vec::new()));
        }
        let mut body = Vec::new();
        loop {
            let mut l = Vec::new();
            if self.r.read_until(b'\n', &mut l)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if l == b".\r\n" {
                return Ok((status, body));
            }
            body.extend_from_slice(&l);
        }
    }

    /// UIDL: (message number, unique id).
    pub fn uidl(&mut self) -> io::Result<Vec<(usize, String)>> {
        let (status, body) = self.multi("UIDL")?;
        if !status.starts_with("+OK") {
            return Err(io::Error::other(format!("UIDL: {status}")));
        }
        Ok(String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| {
                let (n, u) = l.split_once(' ')?;
                Some((n.parse().ok()?, u.to_string()))
            })
            .collect())
    }

    /// RETR `n`: the raw stored bytes.
    pub fn retr(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let (status, body) = self.multi(&format!("RETR {n}"))?;
        if !status.starts_with("+OK") {
            return Err(io::Error::other(format!("RETR {n}: {status}")));
        }
        Ok(body)
    }

    /// QUIT; returns its status line.
    pub fn quit(mut self) -> io::Result<String> {
        self.cmd("QUIT")
    }
}
