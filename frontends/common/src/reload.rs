//! Configuration reload without a restart.
//!
//! A frontend keeps the parts of its configuration that may change at run time in a
//! [`Reloadable`]: every new session takes the current value once ([`Reloadable::get`],
//! an `Arc` clone) and keeps it to its end, so a reload never changes the rules under an
//! open connection and never drops one. A reload is asked for by `SIGHUP`
//! ([`powermail_admin::signals::on_sighup`]) or the admin port (`POST /control/reload`); both re-read the same file.
//! [`changes`] compares the old and new effective configurations so the frontend can log
//! what it applied and what still needs a restart (listening addresses, TLS, the
//! backend list, the userbase).

use std::sync::{Arc, RwLock};

/// A value replaced as a whole at run time and read by cloning an `Arc`.
#[derive(Debug)]
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Reloadable<T> {
        Reloadable {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The current value (sessions keep it for their whole life).
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the value for everyone who calls [`get`](Self::get) from now on.
    pub fn set(&self, value: T) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
    }
}

/// Every leaf that differs between two JSON configurations, as `path: old -> new`
/// (`limits.connections_max: 512 -> 2`), in key order.
pub fn changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

fn walk(path: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(
                    &sub,
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

/// Splits [`changes`] into those under one of `live` prefixes (applied now) and the
/// rest (need a restart).
pub fn split_live(changes: Vec<String>, live: &[&str]) -> (Vec<String>, Vec<String>) {
    changes
        .into_iter()
        .partition(|c| live.iter().any(|p| c.starts_with(&format!("{p}."))))
}

/// One reload: re-reads the file at `path` with `parse`, hands the new configuration to
/// `apply` (which applies what it can and returns the changes it applied and those that
/// need a restart, as [`split_live`] does), logs both and returns the admin reply. A file
/// that cannot be read or parsed changes nothing: the error is logged and returned.
pub fn reload_file<C, E: std::fmt::Display>(
    path: Option<&std::path::Path>,
    parse: impl FnOnce(&str) -> Result<C, E>,
    apply: impl FnOnce(C) -> (Vec<String>, Vec<String>),
) -> Result<String, String> {
    let result = read_file(path, parse).map(|new| {
        let (live, restart) = apply(new);
        log::warn!(
            "reload: applied [{}]; need a restart: [{}]",
            live.join("; "),
            restart.join("; ")
        );
        format!(
            "reloaded: {} change(s) applied to new sessions, {} need a restart{}",
            live.len(),
            restart.len(),
            if restart.is_empty() {
                String::new()
            } else {
                format!(" ({})", restart.join("; "))
            }
        )
    });
    if let Err(e) = &result {
        log::error!("reload failed, configuration unchanged: {e}");
    }
    result
}

fn read_file<C, E: std::fmt::Display>(
    path: Option<&std::path::Path>,
    parse: impl FnOnce(&str) -> Result<C, E>,
) -> Result<C, String> {
    let path = path.ok_or("started without a configuration file")?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("parsing {}: {e:#}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_changed_leaves() {
        let old = serde_json::json!({"limits": {"a": 1, "b": 2}, "listen": "x", "gone": 1});
        let new = serde_json::json!({"limits": {"a": 1, "b": 3}, "listen": "y"});
        let c = changes(&old, &new);
        assert_eq!(
            c,
            vec![
                "gone: 1 -> null",
                "limits.b: 2 -> 3",
                "listen: \"x\" -> \"y\""
            ]
        );
        let (live, restart) = split_live(c, &["limits"]);
        assert_eq!(live, vec!["limits.b: 2 -> 3"]);
        assert_eq!(restart.len(), 2);
    }

    #[test]
    fn sessions_keep_their_value() {
        let r = Reloadable::new(1);
        let held = r.get();
        r.set(2);
        assert_eq!((*held, *r.get()), (1, 2));
    }
}
