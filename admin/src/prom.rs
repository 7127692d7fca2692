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

use std::collections::BTreeMap;
use std::fmt::Write;

/// Accumulates metric families into exposition text. The samples of one
/// family stay together, in the order written, whenever they are written
/// (the format wants each family as one group: a daemon writes a family for
/// every backend in turn).
#[derive(Debug, Default)]
pub struct Prometheus {
    /// Families in the order first declared or sampled: header, samples.
    families: Vec<(String, String)>,
    /// Family name to its place in `families`.
    index: BTreeMap<String, usize>,
}

impl Prometheus {
    /// An empty document.
    pub fn new() -> Prometheus {
        Prometheus::default()
    }

    /// Declares a family once (`kind`: counter, gauge, summary).
    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        if !self.index.contains_key(name) {
            self.index.insert(name.to_string(), self.families.len());
            self.families.push((
                format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"),
                String::new(),
            ));
        }
    }

    /// The family a sample named `name` belongs to: its own, or that of a
    /// summary's `_count`/`_sum`; a family without a header if none.
    fn family_of(&mut self, name: &str) -> usize {
        let own = [name]
            .into_iter()
            .chain(
                ["_count", "_sum"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s)),
            )
            .find_map(|n| self.index.get(n).copied());
        own.unwrap_or_else(|| {
            self.index.insert(name.to_string(), self.families.len());
            self.families.push((String::new(), String::new()));
            self.families.len() - 1
        })
    }

    /// One sample; `labels` is the inside of the braces, possibly empty.
    pub fn sample(&mut self, name: &str, labels: &str, value: f64) {
        let at = self.family_of(name);
        let out = &mut self.families[at].1;
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }

    /// The finished text.
    pub fn finish(self) -> String {
        self.families
            .into_iter()
            .flat_map(|(head, samples)| [head, samples])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_written_in_turns_comes_out_as_one_group() {
        let mut p = Prometheus::new();
        for backend in ["a", "b"] {
            let labels = format!("backend=\"{backend}\"");
            p.header("x_total", "counter", "x");
            p.sample("x_total", &labels, 1.0);
            p.header("y", "gauge", "y");
            p.sample("y", &labels, 2.0);
            p.header("lat", "summary", "latency");
            p.sample("lat", &format!("{labels},quantile=\"0.5\""), 0.25);
            p.sample("lat_count", &labels, 4.0);
        }
        assert_eq!(
            p.finish(),
            "# HELP x_total x\n# TYPE x_total counter\n\
             x_total{backend=\"a\"} 1\nx_total{backend=\"b\"} 1\n\
             # HELP y y\n# TYPE y gauge\ny{backend=\"a\"} 2\ny{backend=\"b\"} 2\n\
             # HELP lat latency\n# TYPE lat summary\n\
             lat{backend=\"a\",quantile=\"0.5\"} 0.25\nlat_count{backend=\"a\"} 4\n\
             lat{backend=\"b\",quantile=\"0.5\"} 0.25\nlat_count{backend=\"b\"} 4\n"
        );
    }
}
