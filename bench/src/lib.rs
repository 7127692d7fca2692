//! Shared pieces of the load tools: latency recording across threads and a
//! report a person can read.

use std::time::Duration;

use hdrhistogram::Histogram;

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds are valid")
}

/// Prints throughput and latency percentiles for `ops` operations moving
/// `bytes` in `elapsed`.
pub fn report(label: &str, ops: u64, bytes: u64, elapsed: Duration, h: &Histogram<u64>) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "{label}: {ops} ops in {secs:.2} s = {:.0} ops/s, {:.1} MB/s; latency us p50={} p90={} p99={} p99.9={} max={}",
        ops as f64 / secs,
        bytes as f64 / secs / 1e6,
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}
