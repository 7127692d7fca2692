//! A tiny blocking HTTP/1.0 client for the daemons' admin ports.
//!
//! The admin ports (`admin/src/http.rs`) are bounded HTTP servers on trusted addresses that
//! answer small JSON or text bodies, one request per connection. That needs one request
//! line, three headers and a bounded read to EOF — less code than configuring a general
//! client crate, and no dependency tree to build on small machines. Everything here is
//! bounded: the connect and every read/write time out, and a reply over [`REPLY_MAX_BYTES`]
//! is refused.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context};

/// Largest admin reply accepted (a /stats of a pplistener with many backends is ~100 KiB).
pub const REPLY_MAX_BYTES: u64 = 8 << 20;

/// Time-out of connecting and of each read and write.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// An admin reply.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// Sends `method path` to `addr` with the bearer `token`; returns the reply.
pub fn request(addr: &str, token: Option<&str>, method: &str, path: &str) -> anyhow::Result<Reply> {
    let sock = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("no address for {addr}"))?;
    let mut stream =
        TcpStream::connect_timeout(&sock, TIMEOUT).with_context(|| format!("connecting {addr}"))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(REPLY_MAX_BYTES + 1)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading the reply of {addr}"))?;
    if raw.len() as u64 > REPLY_MAX_BYTES {
        bail!("{addr}: reply over {REPLY_MAX_BYTES} bytes");
    }
    parse(&raw).with_context(|| format!("{addr}{path}"))
}

/// Splits a raw HTTP reply into its status and body.
fn parse(raw: &[u8]) -> anyhow::Result<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP reply (no header end)")?;
    let status = head
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    Ok(Reply {
        status,
        body: body.to_string(),
    })
}

/// `GET path`, expecting 200 and a JSON body.
pub fn get_json(addr: &str, token: Option<&str>, path: &str) -> anyhow::Result<serde_json::Value> {
    let reply = request(addr, token, "GET", path)?;
    if reply.status != 200 {
        bail!("{addr}{path}: HTTP {}: {}", reply.status, reply.body.trim());
    }
    serde_json::from_str(&reply.body).with_context(|| format!("{addr}{path}: not JSON"))
}

/// `POST /control/<action>?<query>`, expecting 200; returns the reply text.
pub fn control(
    addr: &str,
    token: Option<&str>,
    action: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<String> {
    let mut path = format!("/control/{action}");
    for (i, (k, v)) in query.iter().enumerate() {
        path.push(if i == 0 { '?' } else { '&' });
        path.push_str(&format!("{k}={}", encode(v)));
    }
    let reply = request(addr, token, "POST", &path)?;
    if reply.status != 200 {
        bail!(
            "{addr}: {action}: HTTP {}: {}",
            reply.status,
            reply.body.trim()
        );
    }
    Ok(reply.body.trim().to_string())
}

/// Percent-encodes everything but unreserved characters (names are simple anyway).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let r = parse(b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope\n").unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.body, "nope\n");
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("b0"), "b0");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }
}
