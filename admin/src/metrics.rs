//! Counters and gauges declared once, rendered twice: the `/stats` JSON and
//! the `/metrics` Prometheus text come from the same list, so a number can no
//! longer be in one and missing from the other.
//!
//! A daemon declares its atomics with [`counters!`](crate::counters) (name,
//! kind, help); `metrics()` on the generated struct lists them as [`Metric`]s.
//! Values that live elsewhere (a journal's length, a derived flag) are pushed
//! onto that list as further [`Metric`]s. A [`Report`] puts the list together
//! with the latency histograms and the backends, and renders the one `/stats`
//! layout every daemon shares:
//!
//! ```text
//! {"daemon", "version", "counters": {..}, "gauges": {..}, "latency": {..},
//!  "backends": [{<state fields>, "counters": {..}, "gauges": {..}, "latency": {..}}, ..]}
//! ```
//!
//! and the Prometheus families: a counter `x` of daemon `d` is `d_x_total`
//! (`d_x` if `x` already ends in `_total`), a gauge is `d_x`; backend numbers
//! carry `backend="<name>"`.

use std::collections::BTreeSet;

use crate::{Latencies, Prometheus};

/// What a number is: monotonic since start, or a level that goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic since start (`_total` in Prometheus).
    Counter,
    /// A level now.
    Gauge,
}

/// One number as both renderings see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metric {
    /// Name, the JSON key (`[a-z0-9_]`).
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// One line of help for Prometheus.
    pub help: &'static str,
    /// A label `(name, value)`: metrics sharing `name` with different label
    /// values form one family, and one JSON object keyed by the label value.
    pub label: Option<(&'static str, &'static str)>,
    /// The value now.
    pub value: u64,
}

impl Metric {
    /// A counter.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Metric {
        Metric {
            name,
            kind: Kind::Counter,
            help,
            label: None,
            value,
        }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Metric {
        Metric {
            name,
            kind: Kind::Gauge,
            help,
            label: None,
            value,
        }
    }

    /// The same metric with a label.
    pub fn labelled(self, label: &'static str, value: &'static str) -> Metric {
        Metric {
            label: Some((label, value)),
            ..self
        }
    }

    /// Its Prometheus family name under `prefix` (the daemon's name).
    pub fn family(&self, prefix: &str) -> String {
        family(prefix, self.name, self.kind)
    }
}

/// `prefix_name_total` for a counter (`prefix_name` if it already ends in
/// `_total`), `prefix_name` for a gauge.
fn family(prefix: &str, name: &str, kind: Kind) -> String {
    match kind {
        Kind::Counter if name.ends_with("_total") => format!("{prefix}_{name}"),
        Kind::Counter => format!("{prefix}_{name}_total"),
        Kind::Gauge => format!("{prefix}_{name}"),
    }
}

/// Declares a struct of `AtomicU64` counters and gauges once, with a
/// `metrics()` that lists them as [`Metric`]s for both `/stats` and `/metrics`:
///
/// ```
/// powermail_admin::counters! {
///     /// Process-wide numbers.
///     pub struct Counters {
///         sessions: Counter = "sessions ended",
///         connections: Gauge = "connections open now",
///     }
/// }
/// let c = Counters::default();
/// c.sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
/// assert_eq!(c.metrics()[0].value, 1);
/// ```
#[macro_export]
macro_rules! counters {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($field:ident: $kind:ident = $help:literal,)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $(#[doc = $help] pub $field: ::std::sync::atomic::AtomicU64,)*
        }

        impl $name {
            /// Every number, in declaration order.
            pub fn metrics(&self) -> ::std::vec::Vec<$crate::Metric> {
                ::std::vec![$($crate::Metric {
                    name: ::std::stringify!($field),
                    kind: $crate::Kind::$kind,
                    help: $help,
                    label: ::std::option::Option::None,
                    value: self.$field.load(::std::sync::atomic::Ordering::Relaxed),
                },)*]
            }
        }
    };
}

/// `{"counters": {..}, "gauges": {..}}` of `metrics` into `out` (`gauges`
/// only when there are any); a labelled metric becomes an object keyed by
/// its label value.
pub fn insert_json(out: &mut serde_json::Map<String, serde_json::Value>, metrics: &[Metric]) {
    let mut counters = serde_json::Map::new();
    let mut gauges = serde_json::Map::new();
    for m in metrics {
        let into = match m.kind {
            Kind::Counter => &mut counters,
            Kind::Gauge => &mut gauges,
        };
        match m.label {
            None => {
                into.insert(m.name.to_string(), m.value.into());
            }
            Some((_, value)) => {
                let slot = into
                    .entry(m.name.to_string())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                if let serde_json::Value::Object(by_label) = slot {
                    by_label.insert(value.to_string(), m.value.into());
                }
            }
        }
    }
    out.insert("counters".into(), counters.into());
    if !gauges.is_empty() {
        out.insert("gauges".into(), gauges.into());
    }
}

/// Writes `metrics` as Prometheus families under `prefix`, each sample
/// carrying `labels` (the inside of the braces, possibly empty) and its own label.
pub fn write_prometheus(p: &mut Prometheus, prefix: &str, labels: &str, metrics: &[Metric]) {
    for m in metrics {
        let family = m.family(prefix);
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        p.header(&family, kind, m.help);
        let own = m.label.map(|(k, v)| format!("{k}=\"{v}\""));
        let all = match (labels.is_empty(), own) {
            (_, None) => labels.to_string(),
            (true, Some(own)) => own,
            (false, Some(own)) => format!("{labels},{own}"),
        };
        p.sample(&family, &all, m.value as f64);
    }
}

/// One backend in a [`Report`].
#[derive(Debug, Default)]
pub struct BackendReport {
    /// Its name (the `backend` label in Prometheus).
    pub name: String,
    /// What it is and its state (`name`, `listen`, `mode`, ...), shown as is.
    pub state: serde_json::Map<String, serde_json::Value>,
    /// Its own counters and gauges.
    pub metrics: Vec<Metric>,
    /// Its own latencies, if it keeps any.
    pub latency: Option<Latencies>,
}

/// Everything one daemon shows on `/stats` and `/metrics`.
#[derive(Debug)]
pub struct Report {
    /// `pplistener`, `powersmtp`, `powerpop`: the key `daemon` and the
    /// Prometheus prefix.
    pub daemon: &'static str,
    /// The daemon's version.
    pub version: &'static str,
    /// Process-wide counters and gauges.
    pub metrics: Vec<Metric>,
    /// Process-wide latencies.
    pub latency: Latencies,
    /// The Prometheus summary the latencies (process-wide and per backend) go to.
    pub latency_family: &'static str,
    /// The prefix of the backends' families: the daemon's name for
    /// pplistener (`pplistener_puts_total{backend=..}`), `<daemon>_backend`
    /// for a frontend's view of its backends (`powerpop_backend_up{backend=..}`).
    pub backend_prefix: &'static str,
    /// The backends.
    pub backends: Vec<BackendReport>,
}

impl Report {
    /// The `/stats` document.
    pub fn stats(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        out.insert("daemon".into(), self.daemon.into());
        out.insert("version".into(), self.version.into());
        insert_json(&mut out, &self.metrics);
        out.insert("latency".into(), self.latency.summary());
        let backends = self
            .backends
            .iter()
            .map(|b| {
                let mut one = b.state.clone();
                one.insert("name".into(), b.name.clone().into());
                if !b.metrics.is_empty() {
                    insert_json(&mut one, &b.metrics);
                }
                if let Some(latency) = &b.latency {
                    one.insert("latency".into(), latency.summary());
                }
                serde_json::Value::Object(one)
            })
            .collect::<Vec<_>>();
        out.insert("backends".into(), backends.into());
        serde_json::Value::Object(out)
    }

    /// Writes every family of the report into `p` (a frontend adds its
    /// backend health gauges after).
    pub fn write_prometheus(&self, p: &mut Prometheus) {
        write_prometheus(p, self.daemon, "", &self.metrics);
        self.latency.write_prometheus(p, self.latency_family, "");
        for b in &self.backends {
            let labels = format!("backend=\"{}\"", b.name);
            write_prometheus(p, self.backend_prefix, &labels, &b.metrics);
            if let Some(latency) = &b.latency {
                latency.write_prometheus(p, self.latency_family, &labels);
            }
        }
    }

    /// The `/metrics` text.
    pub fn prometheus(&self) -> String {
        let mut p = Prometheus::new();
        self.write_prometheus(&mut p);
        p.finish()
    }
}

/// The counter and gauge families a `/stats` document names (its
/// `counters`/`gauges` under `prefix`, and those of each backend under
/// `backend_prefix`), as Prometheus family names: what a drift test compares
/// with [`families_in_text`].
pub fn families_in_stats(
    stats: &serde_json::Value,
    prefix: &str,
    backend_prefix: &str,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut walk = |v: &serde_json::Value, prefix: &str| {
        for (key, kind) in [("counters", Kind::Counter), ("gauges", Kind::Gauge)] {
            if let Some(map) = v[key].as_object() {
                for name in map.keys() {
                    out.insert(family(prefix, name, kind));
                }
            }
        }
    };
    walk(stats, prefix);
    for b in stats["backends"].as_array().into_iter().flatten() {
        walk(b, backend_prefix);
    }
    out
}

/// The counter and gauge families (`# TYPE x counter|gauge`) of a
/// Prometheus text; summaries are left out.
pub fn families_in_text(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, kind)| *kind == "counter" || *kind == "gauge")
        .map(|(name, _)| name.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    crate::counters! {
        /// Test numbers.
        struct Numbers {
            sessions: Counter = "sessions ended",
            connections_total: Counter = "connections accepted",
            connections: Gauge = "connections open",
        }
    }

    fn report() -> Report {
        let n = Numbers::default();
        n.sessions.fetch_add(3, Ordering::Relaxed);
        n.connections_total.fetch_add(5, Ordering::Relaxed);
        n.connections.store(2, Ordering::Relaxed);
        let mut metrics = n.metrics();
        metrics.push(Metric::counter("replies", "replies by class", 7).labelled("class", "2xx"));
        metrics.push(Metric::counter("replies", "replies by class", 1).labelled("class", "5xx"));
        let mut latency = Latencies::new();
        latency.record("PUT", 100);
        let mut state = serde_json::Map::new();
        state.insert("mode".into(), "rw".into());
        Report {
            daemon: "testd",
            version: "1.2.3",
            metrics,
            latency: Latencies::new(),
            latency_family: "testd_latency_seconds",
            backend_prefix: "testd_backend",
            backends: vec![BackendReport {
                name: "b0".into(),
                state,
                metrics: vec![Metric::counter("puts", "messages stored", 9)],
                latency: Some(latency),
            }],
        }
    }

    #[test]
    fn the_macro_lists_every_field_with_its_kind() {
        let n = Numbers::default();
        n.connections.store(4, Ordering::Relaxed);
        let m = n.metrics();
        let names: Vec<_> = m.iter().map(|m| (m.name, m.kind, m.value)).collect();
        assert_eq!(
            names,
            vec![
                ("sessions", Kind::Counter, 0),
                ("connections_total", Kind::Counter, 0),
                ("connections", Kind::Gauge, 4),
            ]
        );
        assert_eq!(m[0].help, "sessions ended");
    }

    #[test]
    fn family_names_keep_total_once() {
        assert_eq!(
            Metric::counter("sessions", "", 0).family("d"),
            "d_sessions_total"
        );
        assert_eq!(
            Metric::counter("connections_total", "", 0).family("d"),
            "d_connections_total"
        );
        assert_eq!(
            Metric::gauge("connections", "", 0).family("d"),
            "d_connections"
        );
    }

    #[test]
    fn stats_has_the_one_layout() {
        let s = report().stats();
        assert_eq!(s["daemon"], "testd");
        assert_eq!(s["version"], "1.2.3");
        assert_eq!(s["counters"]["sessions"], 3);
        assert_eq!(s["counters"]["connections_total"], 5);
        assert_eq!(s["counters"]["replies"]["2xx"], 7);
        assert_eq!(s["counters"]["replies"]["5xx"], 1);
        assert_eq!(s["gauges"]["connections"], 2);
        assert!(s["latency"].as_object().is_some_and(|l| l.is_empty()));
        let b = &s["backends"][0];
        assert_eq!(b["name"], "b0");
        assert_eq!(b["mode"], "rw");
        assert_eq!(b["counters"]["puts"], 9);
        assert!(b.get("gauges").is_none(), "{b}");
        assert_eq!(b["latency"]["PUT"]["count"], 1);
    }

    #[test]
    fn prometheus_has_the_same_numbers() {
        let text = report().prometheus();
        for want in [
            "# TYPE testd_sessions_total counter\ntestd_sessions_total 3\n",
            "# TYPE testd_connections_total counter\ntestd_connections_total 5\n",
            "# TYPE testd_connections gauge\ntestd_connections 2\n",
            "testd_replies_total{class=\"2xx\"} 7\ntestd_replies_total{class=\"5xx\"} 1\n",
            "testd_backend_puts_total{backend=\"b0\"} 9\n",
            "testd_latency_seconds_count{backend=\"b0\",op=\"PUT\"} 1\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        assert_eq!(text.matches("# TYPE testd_replies_total").count(), 1);
    }

    #[test]
    fn stats_and_metrics_name_the_same_families() {
        let r = report();
        let from_stats = families_in_stats(&r.stats(), "testd", "testd_backend");
        let from_text = families_in_text(&r.prometheus());
        assert_eq!(from_stats, from_text);
        assert!(
            from_text.contains("testd_backend_puts_total"),
            "{from_text:?}"
        );
        assert!(
            !from_text.contains("testd_latency_seconds"),
            "{from_text:?}"
        );
        // A number in one rendering only would show up as a difference.
        let mut p = Prometheus::new();
        r.write_prometheus(&mut p);
        p.header("testd_stray", "gauge", "only here");
        p.sample("testd_stray", "", 1.0);
        assert_ne!(families_in_text(&p.finish()), from_stats);
    }
}
