//! A real HAProxy (Debian package `haproxy`) in TCP mode in front of the
//! frontends, for the PROXY-protocol suites (tests/system `proxy`,
//! tests/cluster `haproxy`): the configuration is written here once.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{connect, eventually, Place, START_TIMEOUT};

/// How long [`assert_proxy_header_refused`] waits for the refusal.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Most routes one [`Haproxy`] carries.
pub const ROUTES_MAX: usize = 16;
/// Most servers behind one route.
pub const SERVERS_MAX: usize = 16;

/// One listening address of the balancer: round robin over `servers`.
#[derive(Debug, Clone)]
pub struct Route {
    /// Where HAProxy listens.
    pub listen: SocketAddr,
    /// Where it connects to, in turn.
    pub servers: Vec<SocketAddr>,
    /// The rest of each `server` line (`send-proxy-v2`, `source 127.0.0.2`).
    pub options: String,
}

impl Route {
    /// A route from `listen` over `servers`, each `server` line ending in
    /// `options`.
    pub fn new(listen: SocketAddr, servers: &[SocketAddr], options: &str) -> Route {
        Route {
            listen,
            servers: servers.to_vec(),
            options: options.to_string(),
        }
    }
}

/// A running `haproxy -db` (at a [`Place`]), killed on drop.
pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// Whether haproxy is installed. Under CI (`CI` set) it must be (`.ci/run`
    /// installs it): there a missing one is a failure; elsewhere it prints
    /// why `test` is skipped.
    pub fn installed(test: &str) -> bool {
        let found = Command::new("haproxy")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: haproxy is required in CI"
            );
            eprintln!("SKIPPED {test}: haproxy is not installed");
        }
        found
    }

    /// Writes `dir/haproxy.cfg` (one `listen` section per route, round robin,
    /// TCP mode) and starts haproxy at `place` with its log in
    /// `dir/haproxy.log`; returns once every route's port accepts. Panics if
    /// it cannot (a test that cannot start its balancer has failed).
    pub fn start(place: &Place, dir: &Path, routes: &[Route]) -> Haproxy {
        assert!(
            routes.len() <= ROUTES_MAX,
            "more than {ROUTES_MAX} haproxy routes"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config(routes)).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        let mut command = match &place.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns, "haproxy"]);
                c
            }
            None => Command::new("haproxy"),
        };
        let child = command
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let haproxy = Haproxy { child };
        for route in routes {
            eventually(START_TIMEOUT, "haproxy listens", || {
                connect(route.listen).is_ok()
            });
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the frontend at `addr` directly (not through a trusted
/// balancer), reads the start of its greeting, sends the PROXY `header` and
/// asserts that the frontend refuses it: a line starting with `refusal`
/// (`"421 "`, `"-ERR "`) that names PROXY, before it closes.
pub fn assert_proxy_header_refused(addr: SocketAddr, header: &str, refusal: &str) {
    let mut s = connect(addr).expect("direct connection");
    let mut greeting = [0u8; 3];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(header.as_bytes()).expect("send header");
    s.set_read_timeout(Some(REFUSAL_TIMEOUT))
        .expect("read timeout");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.lines()
            .any(|l| l.starts_with(refusal) && l.contains("PROXY")),
        "{addr}: an untrusted PROXY header was not refused: {rest:?}"
    );
}

/// The configuration of `routes`: short time-outs, TCP mode, one `listen`
/// section each.
fn config(routes: &[Route]) -> String {
    let mut cfg = String::from(
        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
         timeout client 30s\n  timeout server 30s\n",
    );
    for (i, route) in routes.iter().enumerate() {
        assert!(
            route.servers.len() <= SERVERS_MAX,
            "more than {SERVERS_MAX} servers behind one haproxy route"
        );
        cfg.push_str(&format!(
            "listen l{i}\n  bind {}\n  balance roundrobin\n",
            route.listen
        ));
        for (j, server) in route.servers.iter().enumerate() {
            cfg.push_str(&format!("  server s{i}x{j} {server} {}\n", route.options));
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_listen_section_per_route_and_a_server_line_each() {
        let a: SocketAddr = "10.0.0.1:25".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:25".parse().expect("addr");
        let lb: SocketAddr = "10.0.0.9:2525".parse().expect("addr");
        let pop: SocketAddr = "10.0.0.9:1110".parse().expect("addr");
        let cfg = config(&[
            Route::new(lb, &[a, b], "send-proxy-v2"),
            Route::new(pop, &[a], "source 127.0.0.2 send-proxy"),
        ]);
        assert!(cfg.contains("mode tcp\n"), "{cfg}");
        assert!(
            cfg.contains("listen l0\n  bind 10.0.0.9:2525\n  balance roundrobin\n"),
            "{cfg}"
        );
        assert!(cfg.contains("  server s0x0 10.0.0.1:25 send-proxy-v2\n"));
        assert!(cfg.contains("  server s0x1 10.0.0.2:25 send-proxy-v2\n"));
        assert!(cfg.contains("listen l1\n  bind 10.0.0.9:1110\n"), "{cfg}");
        assert!(cfg.contains("  server s1x0 10.0.0.1:25 source 127.0.0.2 send-proxy\n"));
        assert_eq!(cfg.matches("listen ").count(), 2);
        assert_eq!(cfg.matches("  server ").count(), 3);
    }
}
