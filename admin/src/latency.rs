//! Per-operation latency histograms.
//!
//! One HdrHistogram per operation name, in microseconds, so that p99.9 and
//! max are exact to three significant digits whatever the load. Owners keep
//! a `Latencies` where they record (a glommio executor keeps its own, with no
//! lock; threads share one behind a mutex and reach it through [`Samples`]) and
//! hand a clone to the admin thread.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// Largest latency recorded, in microseconds (longer ones are clamped).
pub const LATENCY_MAX_US: u64 = 600_000_000;

/// Histograms of operation latencies, keyed by operation name.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    by_op: BTreeMap<&'static str, Histogram<u64>>,
}

impl Latencies {
    /// An empty set.
    pub fn new() -> Latencies {
        Latencies::default()
    }

    /// Records one `op` that took `latency_us` microseconds.
    pub fn record(&mut self, op: &'static str, latency_us: u64) {
        let h = self.by_op.entry(op).or_insert_with(|| {
            Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
                .expect("static histogram bounds are valid")
        });
        h.saturating_record(latency_us.clamp(1, LATENCY_MAX_US));
    }

    /// The histogram of one operation, if it was ever recorded.
    pub fn get(&self, op: &str) -> Option<&Histogram<u64>> {
        self.by_op.get(op)
    }

    /// `{op: {count, p50_us, p90_us, p99_us, p999_us, max_us, buckets}}`, where
    /// `buckets` is `[[upper_us, count], ...]` over powers of two (1, 2, 4, ... µs), empty
    /// buckets left out: enough for `ppadmin status` to draw the distribution.
    pub fn summary(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (op, h) in &self.by_op {
            out.insert(
                op.to_string(),
                serde_json::json!({
                    "count": h.len(),
                    "p50_us": h.value_at_quantile(0.50),
                    "p90_us": h.value_at_quantile(0.90),
                    "p99_us": h.value_at_quantile(0.99),
                    "p999_us": h.value_at_quantile(0.999),
                    "max_us": h.max(),
                    "buckets": log2_buckets(h),
                }),
            );
        }
        serde_json::Value::Object(out)
    }

    /// Writes every histogram as a Prometheus summary named `name` with an
    /// `op` label (and the extra `labels`, e.g. `backend="0"`).
    pub fn write_prometheus(&self, p: &mut Prometheus, name: &str, labels: &str) {
        p.header(name, "summary", "operation latency in seconds");
        for (op, h) in &self.by_op {
            let sep = if labels.is_empty() { "" } else { "," };
            for q in [0.5, 0.9, 0.99, 0.999] {
                p.sample(
                    name,
                    &format!("{labels}{sep}op=\"{op}\",quantile=\"{q}\""),
                    h.value_at_quantile(q) as f64 / 1e6,
                );
            }
            p.sample(
                &format!("{name}_count"),
                &format!("{labels}{sep}op=\"{op}\""),
                h.len() as f64,
            );
        }
    }
}

/// Most samples a [`Samples`] holds before it flushes them into its sink.
pub const SAMPLES_MAX: usize = 256;

/// Latencies of one session or transaction on their way into a shared
/// [`Latencies`]. A histogram is ~160 KiB of counters: creating one per
/// session and merging it cost powersmtp ~100 µs of zeroing, page faults and
/// bucket walks per message. A `Samples` is a short list instead, flushed under
/// the sink's lock when full and when dropped.
pub struct Samples<'a> {
    sink: &'a std::sync::Mutex<Latencies>,
    buf: Vec<(&'static str, u64)>,
}

impl<'a> Samples<'a> {
    /// An empty list that will flush into `sink`.
    pub fn new(sink: &'a std::sync::Mutex<Latencies>) -> Samples<'a> {
        Samples {
            sink,
            buf: Vec::new(),
        }
    }

    /// Records one `op` that took `latency_us` microseconds.
    pub fn record(&mut self, op: &'static str, latency_us: u64) {
        if self.buf.len() >= SAMPLES_MAX {
            self.flush();
        }
        self.buf.push((op, latency_us));
    }

    /// Moves the samples into the sink (a poisoned lock is still used: the
    /// histograms cannot be left half-updated by a panic elsewhere).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        for (op, us) in self.buf.drain(..) {
            sink.record(op, us);
        }
    }
}

impl Drop for Samples<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

use crate::Prometheus;

/// Non-empty power-of-two buckets of `h`: `[[upper_us, count], ...]`, at most ~30.
fn log2_buckets(h: &Histogram<u64>) -> serde_json::Value {
    h.iter_log(1, 2.0)
        .filter(|v| v.count_since_last_iteration() > 0)
        .map(|v| serde_json::json!([v.value_iterated_to(), v.count_since_last_iteration()]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_reach_the_sink_when_full_and_when_dropped() {
        let sink = std::sync::Mutex::new(Latencies::new());
        let mut s = Samples::new(&sink);
        for us in 0..(SAMPLES_MAX as u64 + 10) {
            s.record("RETR", us + 1);
        }
        assert_eq!(sink.lock().unwrap().summary()["RETR"]["count"], SAMPLES_MAX);
        drop(s);
        assert_eq!(
            sink.lock().unwrap().summary()["RETR"]["count"],
            SAMPLES_MAX + 10
        );
    }

    #[test]
    fn percentiles_buckets_and_prometheus() {
        let mut a = Latencies::new();
        for us in 1..=1000 {
            a.record("PUT", us);
        }
        a.record("PUT", 5000);
        a.record("GET", 7);
        let s = a.summary();
        assert_eq!(s["PUT"]["count"], 1001);
        assert_eq!(s["GET"]["count"], 1);
        let p50 = s["PUT"]["p50_us"].as_u64().unwrap();
        assert!((495..=505).contains(&p50), "p50 {p50}");
        assert!(s["PUT"]["max_us"].as_u64().unwrap() >= 4995);
        let buckets = s["PUT"]["buckets"].as_array().unwrap();
        let total: u64 = buckets.iter().map(|b| b[1].as_u64().unwrap()).sum();
        assert_eq!(total, 1001, "{buckets:?}");
        assert_eq!(s["GET"]["buckets"][0], serde_json::json!([7, 1]));
        let mut p = Prometheus::new();
        a.write_prometheus(&mut p, "pm_latency_seconds", "backend=\"0\"");
        let text = p.finish();
        assert!(
            text.contains("pm_latency_seconds_count{backend=\"0\",op=\"PUT\"} 1001"),
            "{text}"
        );
    }
}
