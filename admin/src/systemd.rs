//! The systemd readiness notification (`sd_notify(3)`), in a few lines on
//! the `NOTIFY_SOCKET` datagram socket: a unit with `Type=notify` is started
//! only when the daemon says `READY=1`, after its ports are open.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Longest notification state sent (systemd reads at most a page).
const STATE_MAX_BYTES: usize = 4096;

/// Sends `state` (e.g. `READY=1`, `STOPPING=1`, `RELOADING=1`) to the socket
/// named by `NOTIFY_SOCKET`. Not under systemd (no variable): `Ok(false)`.
/// A path starting with `@` is a Linux abstract socket.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    if state.len() > STATE_MAX_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "notification too long",
        ));
    }
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    match bytes.split_first() {
        Some((b'@', name)) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        Some(_) => {
            sock.send_to(state.as_bytes(), &path)?;
        }
        None => return Ok(false),
    }
    Ok(true)
}

/// [`notify`] `READY=1` with a status line; a failure is logged, never fatal
/// (the daemon serves either way).
pub fn notify_ready(status: &str) {
    let state = format!("READY=1\nSTATUS={}", status.replace('\n', " "));
    if let Err(e) = notify(&state) {
        log::warn!("sd_notify READY=1 failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = tempfile_dir();
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        // The environment is process-wide: this is the only test here that sets it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1\nSTATUS=up").expect("send"));
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=up");
        assert!(!notify("READY=1").expect("no socket is fine"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pm-notify-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }
}
