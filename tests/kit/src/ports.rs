//! Ports for daemons under test.
//!
//! A port is taken from below the kernel's ephemeral range
//! (`/proc/sys/net/ipv4/ip_local_port_range`): the kernel never hands such
//! a port out as some connection's source port, so a port that was free
//! when checked stays free until a daemon binds it (or binds it *again*
//! after a restart). In one process a counter walks the range, so parallel
//! tests never get the same port; each process starts at an offset drawn
//! from its pid, so test binaries running side by side rarely meet, and a
//! port is only handed out after binding it succeeded.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port handed out (below it sit well-known and registered services).
pub const PORT_MIN: u16 = 10_000;

/// Ports tried by one call before it gives up.
const TRIES_MAX: u32 = 4_096;

/// Next candidate, relative to the process's start offset.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The first ephemeral port (32768 when `/proc` does not say).
fn ephemeral_min() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .filter(|&p| p > PORT_MIN + 1_000)
        .unwrap_or(32_768)
}

/// `n` consecutive candidates, or `None` if none could be bound.
fn take(n: u16) -> Option<u16> {
    let span = u32::from(ephemeral_min() - PORT_MIN - n);
    let offset = std::process::id().wrapping_mul(7_919);
    for _ in 0..TRIES_MAX {
        let step = NEXT.fetch_add(u32::from(n), Ordering::Relaxed);
        let base = PORT_MIN + (offset.wrapping_add(step) % span) as u16;
        if (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Some(base);
        }
    }
    None
}

/// A port below the ephemeral range that nobody listens on right now and
/// that this process has not handed out before.
pub fn free_port() -> u16 {
    free_range(1)
}

/// The first of `n` consecutive free ports (see [`free_port`]).
pub fn free_range(n: u16) -> u16 {
    assert!((1..=64).contains(&n), "free_range: 1 to 64 ports");
    take(n).unwrap_or_else(|| panic!("no {n} free ports below {}", ephemeral_min()))
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat() {
        let low = ephemeral_min();
        let ports: Vec<u16> = std::thread::scope(|s| {
            let hands: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..50).map(|_| free_port()).collect::<Vec<_>>()))
                .collect();
            hands
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        assert!(ports.iter().all(|&p| (PORT_MIN..low).contains(&p)));
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    }

    #[test]
    fn ranges_are_consecutive_and_free() {
        let base = free_range(3);
        for i in 0..3 {
            assert!(TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        }
    }
}
