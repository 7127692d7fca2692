//! A writer for the Prometheus text exposition format (version 0.0.4).
//!
//! Small on purpose: daemons know their metrics; this only gets the syntax
//! right (one `# TYPE` per family, labels in braces).
//!
//! Kept instead of the `prometheus-client` crate (0.26): it has no summary type
//! (our HdrHistogram quantiles would need a custom collector anyway), it writes
//! OpenMetrics, where pplistener's `connections` gauge and `connections_total`
//! counter would be one clashing family and dashboards' names would change, and
//! its typed per-family registry would duplicate the atomics the executors
//! already count into; the numbers themselves are declared once in
//! `src/metrics.rs`.

use std::collections::BTreeSet;
use std::fmt::Write;

/// Accumulates metric families into exposition text.
#[derive(Debug, Default)]
pub struct Prometheus {
    out: String,
    declared: BTreeSet<String>,
}

impl Prometheus {
    /// An empty document.
    pub fn new() -> Prometheus {
        Prometheus::default()
    }

    /// Declares a family once (`kind`: counter, gauge, summary).
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        if self.declared.insert(name.to_string()) {
            let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
    }

    /// One sample; `labels` is the inside of the braces, possibly empty.
    pub fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    /// A counter or gauge in one call.
    pub fn metric(&mut self, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
        self.header(name, kind, help);
        self.sample(name, labels, value);
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.out
    }
}
