//! The client side of the admin port: one blocking HTTP/1.0 request per
//! connection, used by `ppadmin` and by the test suites.
//!
//! The admin ports (`src/http.rs`) are bounded HTTP servers on trusted
//! addresses that answer small JSON or text bodies, one request per
//! connection. That needs one request line, three headers and a bounded read
//! to EOF — less code than configuring a general client crate, and no
//! dependency tree to build on small machines. Everything here is bounded:
//! the connect and every read/write time out, and a reply over
//! [`REPLY_MAX_BYTES`] is refused.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest admin reply accepted (a /stats of a pplistener with many backends is ~100 KiB).
pub const REPLY_MAX_BYTES: u64 = 8 << 20;

/// Time-out of connecting and of each read and write, in milliseconds.
pub const CLIENT_TIMEOUT_MS: u64 = 10_000;

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address did not resolve, or could not be reached or read.
    #[error("{addr}: {what}: {source}")]
    Io {
        /// The admin address.
        addr: String,
        /// The step that failed.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The reply was not HTTP, too long, not JSON, or not a 200 where one was needed.
    #[error("{addr}{path}: {reason}")]
    Reply {
        /// The admin address.
        addr: String,
        /// The request path.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// An admin reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// Sends `method path` to `addr` with the bearer `token`; returns the reply
/// whatever its status.
pub fn request(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> Result<Reply, ClientError> {
    let io = |what: &'static str| {
        move |source| ClientError::Io {
            addr: addr.to_string(),
            what,
            source,
        }
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(io("resolving"))?
        .next()
        .ok_or_else(|| io("resolving")(std::io::ErrorKind::NotFound.into()))?;
    let timeout = Duration::from_millis(CLIENT_TIMEOUT_MS);
    let mut stream = TcpStream::connect_timeout(&sock, timeout).map_err(io("connecting"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(io("connecting"))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.flush())
    .map_err(io("sending the request"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(REPLY_MAX_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(io("reading the reply"))?;
    let fail = |reason: String| ClientError::Reply {
        addr: addr.to_string(),
        path: path.to_string(),
        reason,
    };
    if raw.len() as u64 > REPLY_MAX_BYTES {
        return Err(fail(format!("reply over {REPLY_MAX_BYTES} bytes")));
    }
    parse(&raw).ok_or_else(|| fail("malformed HTTP reply".into()))
}

/// Splits a raw HTTP reply into its status and body.
fn parse(raw: &[u8]) -> Option<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(Reply {
        status,
        body: body.to_string(),
    })
}

/// `GET path`, expecting 200 and a JSON body.
pub fn get_json(
    addr: &str,
    token: Option<&str>,
    path: &str,
) -> Result<serde_json::Value, ClientError> {
    let reply = request(addr, token, "GET", path)?;
    let fail = |reason: String| ClientError::Reply {
        addr: addr.to_string(),
        path: path.to_string(),
        reason,
    };
    if reply.status != 200 {
        return Err(fail(format!(
            "HTTP {}: {}",
            reply.status,
            reply.body.trim()
        )));
    }
    serde_json::from_str(&reply.body).map_err(|e| fail(format!("not JSON: {e}")))
}

/// `POST /control/<action>?<query>`, expecting 200; returns the reply text.
pub fn control(
    addr: &str,
    token: Option<&str>,
    action: &str,
    query: &[(&str, &str)],
) -> Result<String, ClientError> {
    let mut path = format!("/control/{action}");
    for (i, (k, v)) in query.iter().enumerate() {
        path.push(if i == 0 { '?' } else { '&' });
        path.push_str(&format!("{k}={}", encode(v)));
    }
    let reply = request(addr, token, "POST", &path)?;
    if reply.status != 200 {
        return Err(ClientError::Reply {
            addr: addr.to_string(),
            path,
            reason: format!("HTTP {}: {}", reply.status, reply.body.trim()),
        });
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
        let r = parse(b"HTTP/1.0 401 Unauthorized\r\nContent-Length: 5\r\n\r\nnope\n");
        assert_eq!(
            r,
            Some(Reply {
                status: 401,
                body: "nope\n".into()
            })
        );
        assert_eq!(parse(b"garbage"), None);
        assert_eq!(parse(b"HTTP/1.0 abc\r\n\r\n"), None);
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("b0"), "b0");
        assert_eq!(encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn an_unreachable_port_is_an_io_error() {
        // Port 1 on loopback: nobody listens there in a test run.
        let e = request("127.0.0.1:1", None, "GET", "/stats");
        assert!(matches!(e, Err(ClientError::Io { .. })), "{e:?}");
    }
}
