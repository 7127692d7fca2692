//! The admin port that every PowerMail daemon runs.
//!
//! One small HTTP server per daemon, in its own thread, off the hot path:
//! `GET /stats` (JSON), `GET /metrics` (Prometheus text), `GET /config`, and
//! `POST /control/<action>?k=v` for runtime switches (`loglevel` is handled
//! here for every daemon; the daemon handles the rest). Every request must
//! carry the configured token (`Authorization: Bearer <token>`), so an admin
//! port is never an open door even when bound beyond loopback. The port is
//! bounded like the mail ports: [`AdminLimits`] caps concurrent connections
//! (`503` beyond) and the time one request may take (`src/http.rs`).
//!
//! [`counters!`] declares a daemon's counters and gauges once; a [`Report`]
//! renders them, with the latencies and the backends, as both `/stats` (one
//! layout for every daemon) and `/metrics` (`src/metrics.rs`).
//!
//! [`Latencies`] keeps one HdrHistogram per operation and renders the
//! percentiles operators ask for (p50, p90, p99, p99.9, max).
//!
//! [`client`] is the other side of the port (ppadmin and the tests use it),
//! and [`announce_ready`] prints the one readiness line every daemon prints.
//! [`daemon::run`] is the `main` skeleton the three daemons share (command line,
//! logger, configuration file, exit codes), and [`AdminSettings`] the admin keys
//! of every daemon's configuration file; [`signals`] the SIGHUP and SIGTERM rules.

pub mod client;
pub mod daemon;
mod http;
mod latency;
mod logfmt;
mod metrics;
mod prom;
mod ready;
mod settings;
pub mod signals;
pub mod systemd;

pub use http::{default_connections_max, default_request_timeout_ms, AdminLimits};
pub use latency::{Latencies, Samples, LATENCY_MAX_US, SAMPLES_MAX};
pub use logfmt::{kv, LogValue, LOG_VALUE_MAX_BYTES};
pub use metrics::{
    families_in_stats, families_in_text, insert_json, write_prometheus, BackendReport, Kind,
    Metric, Report,
};
pub use prom::Prometheus;
pub use ready::{announce_ready, ReadyLine, READY_LISTEN_MAX, READY_ROLE_MAX_BYTES};
pub use settings::AdminSettings;

use std::sync::Arc;

/// What a daemon exposes on its admin port.
pub trait AdminHandler: Send + Sync + 'static {
    /// Current statistics as JSON.
    fn stats(&self) -> serde_json::Value;
    /// Current metrics in Prometheus text exposition format.
    fn metrics(&self) -> String;
    /// The effective configuration as JSON (secrets removed).
    fn config(&self) -> serde_json::Value;
    /// A runtime control action (`readonly`, `readwrite`, ...) with its query
    /// parameters. `Ok` text is returned to the caller; `Err` becomes a 400.
    fn control(&self, action: &str, params: &[(String, String)]) -> Result<String, String>;
}

/// Why the admin port could not start.
#[derive(Debug, thiserror::Error)]
#[error("admin port {listen}: {reason}")]
pub struct AdminError {
    listen: String,
    reason: String,
}

/// A running admin port; dropping the handle leaves it running (daemons keep
/// it for their whole life).
pub struct AdminServer {
    local_addr: std::net::SocketAddr,
}

impl AdminServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }
}

/// Starts `env_logger` so that the admin port's `loglevel` switch works at
/// run time: the logger itself lets everything through and `log`'s global
/// maximum level (initially from `RUST_LOG`, default `info`) does the
/// filtering, which `POST /control/loglevel?level=debug` changes.
pub fn init_logging() {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    let _ = env_logger::Builder::new()
        .filter_level(log::LevelFilter::Trace)
        .format_timestamp_micros()
        .try_init();
    log::set_max_level(initial);
}

/// Starts the admin port on `listen`, requiring `token` on every request,
/// within `limits`. Fails if `token` is empty (an empty token would let in
/// anyone who sends `Authorization: Bearer `), if a limit is zero, or if the
/// address cannot be bound.
pub fn spawn(
    listen: &str,
    token: &str,
    handler: Arc<dyn AdminHandler>,
    limits: AdminLimits,
) -> Result<AdminServer, AdminError> {
    let fail = |reason: String| AdminError {
        listen: listen.to_string(),
        reason,
    };
    if token.trim().is_empty() {
        return Err(fail("the admin token must not be empty".into()));
    }
    if limits.connections_max == 0 || limits.request_timeout_ms == 0 {
        return Err(fail(
            "admin_connections_max and admin_request_timeout_ms must be at least 1".into(),
        ));
    }
    let listener = std::net::TcpListener::bind(listen).map_err(|e| fail(e.to_string()))?;
    let local_addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    let token = token.to_string();
    http::serve(listener, limits, move |req| {
        answer(req, &token, handler.as_ref())
    })
    .map_err(|e| fail(e.to_string()))?;
    log::info!("admin port listening on {local_addr}");
    Ok(AdminServer { local_addr })
}

fn authorised(req: &http::Request, token: &str) -> bool {
    let want = format!("Bearer {token}");
    req.authorization
        .as_ref()
        .is_some_and(|got| constant_time_eq(got.as_bytes(), want.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits `/path?a=1&b=2` into the path and its parameters.
fn split_url(url: &str) -> (&str, Vec<(String, String)>) {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let params = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    (path, params)
}

/// The answer to one request (its body, at most 64 KiB, was skipped).
fn answer(req: &http::Request, token: &str, handler: &dyn AdminHandler) -> http::Answer {
    if !authorised(req, token) {
        return (401, "text/plain", "admin token required\n".to_string());
    }
    let (path, params) = split_url(&req.target);
    route(&req.method, path, &params, handler)
}

fn route(
    method: &str,
    path: &str,
    params: &[(String, String)],
    handler: &dyn AdminHandler,
) -> http::Answer {
    match (method, path) {
        ("GET", "/stats") => (200, "application/json", pretty(&handler.stats())),
        ("GET", "/config") => (200, "application/json", pretty(&handler.config())),
        ("GET", "/metrics") => (200, "text/plain; version=0.0.4", handler.metrics()),
        ("POST", "/control/loglevel") => match params.iter().find(|(k, _)| k == "level") {
            Some((_, level)) => match level.parse::<log::LevelFilter>() {
                Ok(filter) => {
                    log::set_max_level(filter);
                    log::warn!("log level set to {filter}");
                    (200, "text/plain", format!("log level {filter}\n"))
                }
                Err(_) => (400, "text/plain", format!("bad level {level:?}\n")),
            },
            None => (400, "text/plain", "level=... required\n".into()),
        },
        ("POST", p) if p.starts_with("/control/") => {
            match handler.control(&p["/control/".len()..], params) {
                Ok(text) => (200, "text/plain", text + "\n"),
                Err(text) => (400, "text/plain", text + "\n"),
            }
        }
        _ => (404, "text/plain", "not found\n".into()),
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into()) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn urls_split_into_path_and_params() {
        let (p, q) = split_url("/control/readonly?backend=1&x");
        assert_eq!(p, "/control/readonly");
        assert_eq!(
            q,
            vec![("backend".into(), "1".into()), ("x".into(), String::new())]
        );
        assert_eq!(split_url("/stats").1, vec![]);
    }

    /// A handler with nothing to show (also used by `settings.rs`'s tests).
    pub(crate) struct Nothing;

    impl AdminHandler for Nothing {
        fn stats(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn metrics(&self) -> String {
            String::new()
        }
        fn config(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn control(&self, _: &str, _: &[(String, String)]) -> Result<String, String> {
            Err(String::new())
        }
    }

    #[test]
    fn an_empty_token_is_refused() {
        for token in ["", "  "] {
            let e = spawn(
                "127.0.0.1:0",
                token,
                Arc::new(Nothing),
                AdminLimits::default(),
            )
            .err();
            assert!(e.is_some_and(|e| e.to_string().contains("must not be empty")));
        }
        assert!(spawn(
            "127.0.0.1:0",
            "t0ken",
            Arc::new(Nothing),
            AdminLimits::default()
        )
        .is_ok());
    }

    /// Sends one request on a fresh connection; the status line of the answer.
    fn status_of(addr: std::net::SocketAddr, request: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        // A refused connection may be closed before the request is written.
        let _ = s.write_all(request.as_bytes());
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        answer.lines().next().unwrap_or("").to_string()
    }

    /// More idle connections than `connections_max`: a request on a fresh
    /// connection is refused cleanly (503) or served, the idle ones are cut
    /// by the request time-out, and then requests are served again.
    #[test]
    fn connections_beyond_the_limit_are_refused_and_idle_ones_cut() {
        use std::io::Read;
        let limits = AdminLimits {
            connections_max: 2,
            request_timeout_ms: 1_000,
        };
        let server = spawn("127.0.0.1:0", "t0ken", Arc::new(Nothing), limits).expect("spawn");
        let addr = server.local_addr();
        let get = "GET /stats HTTP/1.0\r\nAuthorization: Bearer t0ken\r\n\r\n";
        let started = Instant::now();
        let idle: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let status = status_of(addr, get);
        assert!(
            status == "HTTP/1.1 503 Service Unavailable" || status == "HTTP/1.1 200 OK",
            "beyond connections_max: {status:?}"
        );
        // Every idle connection ends (time-out, or 503 and close); generous bound.
        for mut c in idle {
            c.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let mut rest = Vec::new();
            let ended = c.read_to_end(&mut rest);
            assert!(ended.is_ok(), "idle connection not closed: {ended:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        // The server is healthy: requests are served again.
        let served = (0..100).any(|_| {
            let ok = status_of(addr, get) == "HTTP/1.1 200 OK";
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        assert!(served, "no request served after the idle connections ended");
        assert_eq!(
            status_of(addr, "GET /stats HTTP/1.0\r\n\r\n"),
            "HTTP/1.1 401 Unauthorized"
        );
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
