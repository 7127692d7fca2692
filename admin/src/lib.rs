//! The admin port that every PowerMail daemon runs.
//!
//! One small HTTP server per daemon, in its own thread, off the hot path:
//! `GET /stats` (JSON), `GET /metrics` (Prometheus text), `GET /config`, and
//! `POST /control/<action>?k=v` for runtime switches (`loglevel` is handled
//! here for every daemon; the daemon handles the rest). Every request must
//! carry the configured token (`Authorization: Bearer <token>`), so an admin
//! port is never an open door even when bound beyond loopback.
//!
//! [`Latencies`] keeps one HdrHistogram per operation and renders the
//! percentiles operators ask for (p50, p90, p99, p99.9, max).

mod latency;
mod prom;

pub use latency::{Latencies, Samples, LATENCY_MAX_US, SAMPLES_MAX};
pub use prom::Prometheus;

use std::sync::Arc;
use std::thread;
use std::time::Duration;

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

/// Longest request body accepted on the admin port.
const BODY_MAX_BYTES: u64 = 64 << 10;

/// Starts the admin port on `listen`, requiring `token` on every request.
/// Fails if `token` is empty (an empty token would let in anyone who sends
/// `Authorization: Bearer `) or the address cannot be bound.
pub fn spawn(
    listen: &str,
    token: &str,
    handler: Arc<dyn AdminHandler>,
) -> Result<AdminServer, AdminError> {
    if token.trim().is_empty() {
        return Err(AdminError {
            listen: listen.to_string(),
            reason: "the admin token must not be empty".into(),
        });
    }
    let server = tiny_http::Server::http(listen).map_err(|e| AdminError {
        listen: listen.to_string(),
        reason: e.to_string(),
    })?;
    let local_addr = server.server_addr().to_ip().ok_or_else(|| AdminError {
        listen: listen.to_string(),
        reason: "not an IP address".into(),
    })?;
    let token = token.to_string();
    thread::Builder::new()
        .name("admin".into())
        .spawn(move || loop {
            match server.recv_timeout(Duration::from_secs(1)) {
                Ok(Some(req)) => serve(req, &token, handler.as_ref()),
                Ok(None) => {}
                Err(e) => log::warn!("admin: accept failed: {e}"),
            }
        })
        .map_err(|e| AdminError {
            listen: listen.to_string(),
            reason: e.to_string(),
        })?;
    log::info!("admin port listening on {local_addr}");
    Ok(AdminServer { local_addr })
}

fn authorised(req: &tiny_http::Request, token: &str) -> bool {
    let want = format!("Bearer {token}");
    req.headers().iter().any(|h| {
        h.field.equiv("Authorization")
            && constant_time_eq(h.value.as_str().as_bytes(), want.as_bytes())
    })
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

fn serve(mut req: tiny_http::Request, token: &str, handler: &dyn AdminHandler) {
    let (status, content_type, body) = if !authorised(&req, token) {
        (401, "text/plain", "admin token required\n".to_string())
    } else {
        // Drain a bounded body so keep-alive works; its content is unused.
        let _ = std::io::copy(
            &mut req.as_reader().take(BODY_MAX_BYTES),
            &mut std::io::sink(),
        );
        let method = req.method().clone();
        let (path, params) = split_url(req.url());
        route(&method, path, &params, handler)
    };
    let response = tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(
            tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
                .expect("static header is valid"),
        );
    if let Err(e) = req.respond(response) {
        log::debug!("admin: reply failed: {e}");
    }
}

use std::io::Read;

fn route(
    method: &tiny_http::Method,
    path: &str,
    params: &[(String, String)],
    handler: &dyn AdminHandler,
) -> (u16, &'static str, String) {
    use tiny_http::Method::{Get, Post};
    match (method, path) {
        (Get, "/stats") => (200, "application/json", pretty(&handler.stats())),
        (Get, "/config") => (200, "application/json", pretty(&handler.config())),
        (Get, "/metrics") => (200, "text/plain; version=0.0.4", handler.metrics()),
        (Post, "/control/loglevel") => match params.iter().find(|(k, _)| k == "level") {
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
        (Post, p) if p.starts_with("/control/") => {
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

    struct Nothing;

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
            let e = spawn("127.0.0.1:0", token, Arc::new(Nothing)).err();
            assert!(e.is_some_and(|e| e.to_string().contains("must not be empty")));
        }
        assert!(spawn("127.0.0.1:0", "t0ken", Arc::new(Nothing)).is_ok());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
