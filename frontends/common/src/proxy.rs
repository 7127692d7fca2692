//! The PROXY protocol (HAProxy's, versions 1 and 2) in front of the SMTP and
//! POP3 listeners.
//!
//! Behind a load balancer every connection comes from the balancer's address,
//! so logs, login throttling, lock-outs, the Received header and virtual-server
//! mapping would all see the wrong client. A balancer configured with
//! `send-proxy` / `send-proxy-v2` starts each connection with a header naming
//! the original client and the address it connected to. The header is only
//! believed from the configured trusted sources (`proxy_from`, CIDR blocks;
//! default none): from those it is required before anything else, and from
//! anyone else it is refused, since it would let any client choose the address
//! it is judged by.
//!
//! The header is read exactly — 16 bytes and then the announced length for
//! version 2, up to the CRLF for version 1 — so nothing after it is consumed
//! (an implicit-TLS ClientHello may follow at once). Parsing is `ppp`'s.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use ppp::{v1, v2};

/// The 12 bytes every version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, CRLF included (the specification's bound).
const V1_MAX_BYTES: usize = 107;
/// Longest version 2 header accepted: 16 fixed bytes and at most this many
/// address and TLV bytes (HAProxy sends well under 256 without TLVs).
const V2_PAYLOAD_MAX_BYTES: usize = 1024;

/// Default of `proxy_timeout_ms`: how long a trusted balancer has to send
/// its header.
pub fn default_timeout_ms() -> u64 {
    5_000
}

/// Who may send a PROXY header, and how long it may take.
#[derive(Debug, Clone, Default)]
pub struct ProxyPolicy {
    trusted: Vec<IpNet>,
    timeout: Duration,
}

/// Why a connection was refused at the PROXY stage.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A trusted source did not send a header in time, or closed.
    #[error("no PROXY header from trusted source {peer}: {why}")]
    Missing {
        /// The balancer's address.
        peer: SocketAddr,
        /// What happened instead.
        why: String,
    },
    /// The header did not parse.
    #[error("malformed PROXY header from {peer}: {why}")]
    Malformed {
        /// The balancer's address.
        peer: SocketAddr,
        /// The parser's complaint.
        why: String,
    },
}

/// Where a connection really comes from and goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// The original client.
    pub client: SocketAddr,
    /// The address the client connected to (for virtual-server mapping).
    pub local: SocketAddr,
    /// Whether the addresses came from a PROXY header.
    pub proxied: bool,
}

impl ProxyPolicy {
    /// A policy trusting the CIDR blocks (or single addresses) in `from`;
    /// fails on a block that does not parse.
    pub fn new(from: &[String], timeout_ms: u64) -> anyhow::Result<ProxyPolicy> {
        let trusted = from
            .iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        anyhow::anyhow!("proxy_from: {s:?} is not an address or CIDR block")
                    })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(ProxyPolicy {
            trusted,
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    /// Whether `ip` is a configured balancer (IPv4-mapped IPv6 counts as IPv4).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The connection's real endpoints: from the PROXY header when the peer
    /// is trusted (which must then send one), else the socket's own. Leaves
    /// the stream's read time-out unset for the caller to choose.
    pub fn accept(&self, stream: &TcpStream) -> Result<Endpoints, ProxyError> {
        let peer = stream.peer_addr().map_err(|e| ProxyError::Missing {
            peer: SocketAddr::from(([0, 0, 0, 0], 0)),
            why: e.to_string(),
        })?;
        let local = stream.local_addr().unwrap_or(peer);
        let own = Endpoints {
            client: peer,
            local,
            proxied: false,
        };
        if !self.trusts(peer.ip()) {
            return Ok(own);
        }
        let missing = |why: String| ProxyError::Missing { peer, why };
        let header = read_header(stream, Instant::now() + self.timeout).map_err(|e| match e {
            ReadError::Io(e) => missing(e.to_string()),
            ReadError::Malformed(why) => ProxyError::Malformed { peer, why },
        })?;
        let parsed = parse(&header).map_err(|why| ProxyError::Malformed { peer, why })?;
        Ok(parsed.map_or(own, |(client, local)| Endpoints {
            client,
            local,
            proxied: true,
        }))
    }
}

/// Whether the first bytes a client sent look like a PROXY header: from an
/// untrusted source that is refused rather than parsed as commands.
pub fn looks_like_header(first: &[u8]) -> bool {
    first.starts_with(b"PROXY ")
        || (first.len() >= 5 && V2_SIGNATURE.starts_with(&first[..first.len().min(12)]))
}

enum ReadError {
    Io(io::Error),
    Malformed(String),
}

/// Reads exactly one header's bytes by `deadline`.
fn read_header(mut stream: &TcpStream, deadline: Instant) -> Result<Vec<u8>, ReadError> {
    let mut read_exact = |buf: &mut [u8]| -> Result<(), ReadError> {
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Io(io::ErrorKind::TimedOut.into()));
            }
            stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
        Ok(())
    };
    let mut header = vec![0u8; 16];
    read_exact(&mut header[..6])?;
    if &header[..6] == b"PROXY " {
        header.truncate(6);
        // Byte by byte to the LF: nothing past the header is consumed.
        while header.len() < V1_MAX_BYTES {
            let mut b = [0u8; 1];
            read_exact(&mut b)?;
            header.push(b[0]);
            if b[0] == b'\n' {
                return Ok(header);
            }
        }
        return Err(ReadError::Malformed("version 1 line too long".into()));
    }
    if header[..6] != V2_SIGNATURE[..6] {
        return Err(ReadError::Malformed("no PROXY signature".into()));
    }
    read_exact(&mut header[6..16])?;
    let payload = u16::from_be_bytes([header[14], header[15]]) as usize;
    if payload > V2_PAYLOAD_MAX_BYTES {
        return Err(ReadError::Malformed(format!(
            "version 2 payload of {payload} bytes"
        )));
    }
    header.resize(16 + payload, 0);
    read_exact(&mut header[16..])?;
    Ok(header)
}

/// The (client, destination) a complete header names; `None` for a header
/// that names none (v1 `UNKNOWN`, v2 `LOCAL` health checks, UNIX sockets):
/// the socket's own addresses apply.
fn parse(header: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, String> {
    if header.starts_with(b"PROXY ") {
        let h = v1::Header::try_from(header).map_err(|e| e.to_string())?;
        return Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            v1::Addresses::Tcp6(a) => Some((
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            v1::Addresses::Unknown => None,
        });
    }
    let h = v2::Header::try_from(header).map_err(|e| e.to_string())?;
    if h.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        v2::Addresses::IPv4(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::IPv6(a) => Some((
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        )),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// A connected pair: (what the server accepted, the client's end).
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (l.accept().unwrap().0, c)
    }

    fn trusting_loopback() -> ProxyPolicy {
        ProxyPolicy::new(&["127.0.0.0/8".into()], 500).unwrap()
    }

    fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn policy_parses_blocks_and_single_addresses() {
        let p = ProxyPolicy::new(&["10.0.0.0/8".into(), "192.0.2.7".into()], 1).unwrap();
        assert!(p.trusts("10.1.2.3".parse().unwrap()));
        assert!(p.trusts("::ffff:10.1.2.3".parse().unwrap()));
        assert!(p.trusts("192.0.2.7".parse().unwrap()));
        assert!(!p.trusts("192.0.2.8".parse().unwrap()));
        assert!(!ProxyPolicy::default().trusts("127.0.0.1".parse().unwrap()));
        assert!(ProxyPolicy::new(&["10.0.0.0/33".into()], 1).is_err());
        assert!(ProxyPolicy::new(&["not-an-ip".into()], 1).is_err());
    }

    #[test]
    fn v1_header_gives_the_client_and_leaves_the_rest_unread() {
        let (server, mut client) = pair();
        client
            .write_all(b"PROXY TCP4 198.51.100.9 203.0.113.5 40000 25\r\nEHLO x\r\n")
            .unwrap();
        let ends = trusting_loopback().accept(&server).unwrap();
        assert!(ends.proxied);
        assert_eq!(ends.client, "198.51.100.9:40000".parse().unwrap());
        assert_eq!(ends.local, "203.0.113.5:25".parse().unwrap());
        let mut rest = [0u8; 8];
        (&server).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"EHLO x\r\n");
    }

    #[test]
    fn v2_header_split_in_pieces() {
        let (server, mut client) = pair();
        let h = v2_header(
            "[2001:db8::1]:5000".parse().unwrap(),
            "[2001:db8::2]:110".parse().unwrap(),
        );
        let t = std::thread::spawn(move || {
            for piece in h.chunks(5) {
                client.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            client.write_all(b"\x16\x03\x01").unwrap(); // a ClientHello's start
            client
        });
        let ends = trusting_loopback().accept(&server).unwrap();
        assert_eq!(ends.client, "[2001:db8::1]:5000".parse().unwrap());
        assert_eq!(ends.local, "[2001:db8::2]:110".parse().unwrap());
        let _client = t.join().unwrap();
        let mut rest = [0u8; 3];
        (&server).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"\x16\x03\x01");
    }

    #[test]
    fn local_command_and_unknown_keep_the_socket_addresses() {
        for h in [
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Local,
                v2::Protocol::Unspecified,
                v2::Addresses::Unspecified,
            )
            .build()
            .unwrap(),
        ] {
            let (server, mut client) = pair();
            client.write_all(&h).unwrap();
            let ends = trusting_loopback().accept(&server).unwrap();
            assert!(!ends.proxied);
            assert_eq!(ends.client, client.local_addr().unwrap());
        }
    }

    #[test]
    fn trusted_source_without_header_is_refused() {
        // Silence: refused when the time-out runs out.
        let (server, _client) = pair();
        let e = trusting_loopback().accept(&server).unwrap_err();
        assert!(matches!(e, ProxyError::Missing { .. }), "{e}");
        // A plain command instead of a header.
        let (server, mut client) = pair();
        client.write_all(b"EHLO mail.example\r\n").unwrap();
        let e = trusting_loopback().accept(&server).unwrap_err();
        assert!(matches!(e, ProxyError::Malformed { .. }), "{e}");
    }

    #[test]
    fn malformed_headers_are_refused() {
        let mut oversized = V2_SIGNATURE.to_vec();
        oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        for bad in [
            b"PROXY TCP4 1.2.3.4\r\n".to_vec(),
            b"PROXY TCP4 999.2.3.4 1.2.3.4 1 2\r\n".to_vec(),
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
            oversized,
        ] {
            let (server, mut client) = pair();
            client.write_all(&bad).unwrap();
            let e = trusting_loopback().accept(&server).unwrap_err();
            assert!(matches!(e, ProxyError::Malformed { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn untrusted_source_is_taken_as_it_is() {
        let (server, mut client) = pair();
        client
            .write_all(b"PROXY TCP4 198.51.100.9 203.0.113.5 40000 25\r\n")
            .unwrap();
        let ends = ProxyPolicy::default().accept(&server).unwrap();
        assert!(!ends.proxied);
        assert_eq!(ends.client, client.local_addr().unwrap());
    }

    #[test]
    fn header_detection_for_untrusted_sources() {
        assert!(looks_like_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(looks_like_header(&V2_SIGNATURE[..6]));
        assert!(!looks_like_header(b"\r\n\r\nUSER a\r\n"));
        assert!(!looks_like_header(b"EHLO x\r\n"));
        assert!(!looks_like_header(b"\r\n"));
        assert!(!looks_like_header(b"USER a\r\n"));
    }
}
