//! The TLS upgrade both frontends use: after STARTTLS / STLS, and from the first byte on
//! an implicit-TLS port (pop3s).

use std::io;
use std::net::TcpStream;
use std::sync::Arc;

/// A connection once TLS is up.
pub type TlsStream = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Runs the server side of a TLS handshake on `sock` with `config` and returns the
/// secured stream. The handshake is held to the socket's own read and write time-outs,
/// which the caller sets first; an error (time-out, bad record, peer gone) ends it.
pub fn upgrade(config: Arc<rustls::ServerConfig>, sock: TcpStream) -> io::Result<TlsStream> {
    let conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let mut secure = rustls::StreamOwned::new(conn, sock);
    while secure.conn.is_handshaking() {
        secure.conn.complete_io(&mut secure.sock)?;
    }
    Ok(secure)
}
