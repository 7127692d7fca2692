//! The backend part of a frontend's configuration.
//!
//! Frontends embed these types in their own TOML structure: a shared
//! `secret`, an array of `[[backend]]` tables and a `[backend_pool]` table.
//! Every knob has a unit in its name and a default.

use serde::Deserialize;

/// One pplistener backend as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Name for logs and stats (need not match the backend's own name).
    pub name: String,
    /// `host:port` of the backend's protocol port.
    pub addr: String,
    /// Failure domain (host, rack, disk shelf). Copies of one message go to
    /// distinct groups when enough are healthy. Default: the backend's own
    /// name, i.e. every backend is its own group.
    #[serde(default)]
    pub group: Option<String>,
    /// Higher is preferred for new messages (default 0). Use it to fill new
    /// disks first or to keep a backend as a last resort (negative).
    #[serde(default)]
    pub priority: i32,
}

impl BackendSpec {
    /// A backend in its own group with priority 0.
    pub fn new(name: &str, addr: &str) -> BackendSpec {
        BackendSpec {
            name: name.to_string(),
            addr: addr.to_string(),
            group: None,
            priority: 0,
        }
    }

    /// The failure domain (the name when no group is set).
    pub fn group_name(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.name)
    }
}

/// Why a `[[backend]]` list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendListError {
    /// No `[[backend]]` table at all.
    #[error("no [[backend]] configured")]
    Empty,
    /// A backend with an empty name (logs, stats and `disable` need one).
    #[error("a [[backend]] has an empty name")]
    EmptyName,
    /// Two backends share a name: `disable NAME` would act on one of them only,
    /// and powerpop's delete journal (and powersmtp's undo journal) are keyed by name.
    #[error("backend name {0:?} is used more than once; names must be unique")]
    DuplicateName(String),
}

/// Checks a frontend's `[[backend]]` list: at least one backend, every name
/// non-empty and unique. Both frontends call it when parsing their file, so
/// a list one accepts the other accepts too.
pub fn validate_backends(specs: &[BackendSpec]) -> Result<(), BackendListError> {
    if specs.is_empty() {
        return Err(BackendListError::Empty);
    }
    let mut names: Vec<&str> = specs.iter().map(|b| b.name.as_str()).collect();
    if names.iter().any(|n| n.trim().is_empty()) {
        return Err(BackendListError::EmptyName);
    }
    names.sort_unstable();
    match names.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(BackendListError::DuplicateName(w[0].to_string())),
        None => Ok(()),
    }
}

/// Health checking and connection pooling, shared by every backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// How often each backend is asked for its STATUS.
    pub health_interval_ms: u64,
    /// Time-out of one health check (connect + STATUS); a backend that does
    /// not answer in time is marked down, and the connections in use to it
    /// are cut (see [`crate::cluster`]).
    pub health_timeout_ms: u64,
    /// Time-out of connecting to a backend for real work.
    pub connect_timeout_ms: u64,
    /// Time-out of every read and write on a working connection. A backend
    /// gone silent is cut sooner, by the health check.
    pub io_timeout_ms: u64,
    /// Most idle connections kept per backend for reuse.
    pub idle_max_per_backend: usize,
    /// Most connections open at once per backend (idle + in use); a caller
    /// beyond it waits up to `connect_timeout_ms`, then fails.
    pub open_max_per_backend: usize,
    /// An idle connection older than this is PINGed before reuse (the
    /// backend closes idle connections after its own time-out).
    pub ping_after_idle_ms: u64,
    /// Below this many free bytes a backend is treated as read-only.
    pub free_bytes_min: u64,
    /// Latency-aware selection: added to every backend's observed latency
    /// before comparing, so differences well below it (an fsync more or
    /// less) hardly change the spread. See [`crate::select`].
    pub latency_slack_us: u64,
    /// Latency-aware selection: the least share factor, in thousandths, of a
    /// slow or loaded backend (it keeps at least this fraction of the weight
    /// an equally fast one would get). 1000 turns latency-awareness off.
    pub latency_factor_min_permille: u32,
}

impl PoolConfig {
    /// The selection weighting these settings ask for.
    pub fn latency_weighting(&self) -> crate::select::LatencyWeighting {
        crate::select::LatencyWeighting {
            slack_us: self.latency_slack_us,
            factor_min_permille: self.latency_factor_min_permille.clamp(1, 1000),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            health_interval_ms: 1000,
            health_timeout_ms: 500,
            connect_timeout_ms: 2000,
            io_timeout_ms: 30_000,
            idle_max_per_backend: 32,
            open_max_per_backend: 256,
            ping_after_idle_ms: 2000,
            free_bytes_min: 0,
            latency_slack_us: 10_000,
            latency_factor_min_permille: 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        #[serde(rename = "backend")]
        backends: Vec<BackendSpec>,
        #[serde(default)]
        backend_pool: PoolConfig,
    }

    #[test]
    fn parses_backend_tables() {
        let f: File = toml::from_str(
            r#"
            [backend_pool]
            health_interval_ms = 250
            [[backend]]
            name = "a"
            addr = "127.0.0.1:7900"
            [[backend]]
            name = "b"
            addr = "10.0.0.2:7900"
            group = "host2"
            priority = 5
            "#,
        )
        .unwrap();
        assert_eq!(f.backends.len(), 2);
        assert_eq!(f.backends[0].group_name(), "a");
        assert_eq!(f.backends[1].group_name(), "host2");
        assert_eq!(f.backends[1].priority, 5);
        assert_eq!(f.backend_pool.health_interval_ms, 250);
        assert_eq!(f.backend_pool.io_timeout_ms, 30_000);
    }

    #[test]
    fn backend_lists_are_checked() {
        let a = BackendSpec::new("a", "127.0.0.1:1");
        let b = BackendSpec::new("b", "127.0.0.1:2");
        assert_eq!(validate_backends(&[a.clone(), b.clone()]), Ok(()));
        assert_eq!(validate_backends(&[]), Err(BackendListError::Empty));
        // Same name, different address: still refused.
        let a2 = BackendSpec::new("a", "127.0.0.1:3");
        assert_eq!(
            validate_backends(&[a.clone(), b, a2]),
            Err(BackendListError::DuplicateName("a".into()))
        );
        assert_eq!(
            validate_backends(&[a, BackendSpec::new(" ", "127.0.0.1:4")]),
            Err(BackendListError::EmptyName)
        );
    }
}
