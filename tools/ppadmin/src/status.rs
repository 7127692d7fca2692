//! `ppadmin status`: the whole cluster on one screen.
//!
//! Two sources, so the table is right even when an admin port is missing: each backend's
//! own `STATUS` (PPL/1: up or down, mode, free space, connections) and every daemon's
//! `GET /stats` (counters and latency histograms). Stats are read twice, `--interval-ms`
//! apart, and the difference gives the rates. Below the tables, each daemon's busiest
//! operation is drawn as a histogram of power-of-two latency buckets.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::ClusterInfo;
use crate::store::human_bytes;
use powermail_admin::client as http;

/// Width of the longest histogram bar, in characters.
const BAR_MAX_CHARS: u64 = 40;

/// One daemon's two samples.
struct Sampled<'a> {
    name: &'a str,
    addr: &'a str,
    before: Option<Value>,
    after: Result<Value, String>,
}

/// A number in a JSON object, 0 when absent.
fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `{op: summary}` of a stats object (a daemon's or one of its backends').
fn latency_map(v: &Value) -> Option<&serde_json::Map<String, Value>> {
    v.get("latency").and_then(Value::as_object)
}

/// One of a stats object's `counters`, 0 if absent.
fn counter(v: &Value, key: &str) -> u64 {
    v.get("counters").map_or(0, |c| num(c, key))
}

/// One of a stats object's `gauges`, 0 if absent.
fn gauge(v: &Value, key: &str) -> u64 {
    v.get("gauges").map_or(0, |g| num(g, key))
}

/// Sum of every operation's count: the daemon's total operations.
fn ops(v: &Value) -> u64 {
    latency_map(v).map_or(0, |m| m.values().map(|s| num(s, "count")).sum())
}

/// Bytes moved, by what each daemon counts.
fn bytes(v: &Value) -> u64 {
    ["bytes", "bytes_in", "bytes_out", "bytes_retrieved"]
        .iter()
        .map(|k| counter(v, k))
        .sum()
}

/// The operation with most samples, and its summary.
fn busiest(v: &Value) -> Option<(&str, &Value)> {
    latency_map(v)?
        .iter()
        .max_by_key(|(_, s)| num(s, "count"))
        .map(|(op, s)| (op.as_str(), s))
}

/// `1234` µs → `1.2ms`.
fn human_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us}us"),
        1000..=999_999 => format!("{:.1}ms", us as f64 / 1e3),
        _ => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// `p50/p99/p999` of a summary.
fn percentiles(s: Option<&Value>) -> String {
    match s {
        Some(s) if num(s, "count") > 0 => format!(
            "{}/{}/{}",
            human_us(num(s, "p50_us")),
            human_us(num(s, "p99_us")),
            human_us(num(s, "p999_us"))
        ),
        _ => "-".into(),
    }
}

/// Per-second rate between two counter readings.
fn rate(before: u64, after: u64, interval: Duration) -> String {
    if interval.is_zero() {
        return "-".into();
    }
    format!(
        "{:.1}",
        after.saturating_sub(before) as f64 / interval.as_secs_f64()
    )
}

/// Prints rows as columns padded to the widest cell.
fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, cell)| format!("{cell:<w$}", w = widths[c]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// Draws `[[upper_us, count], ...]` as horizontal bars.
pub fn draw_histogram(title: &str, buckets: &[(u64, u64)]) {
    let total: u64 = buckets.iter().map(|(_, n)| n).sum();
    println!("{title} (n={total})");
    let top = buckets.iter().map(|(_, n)| *n).max().unwrap_or(0).max(1);
    for (upper, n) in buckets {
        let width = (n * BAR_MAX_CHARS).div_ceil(top);
        println!(
            "  <={:>8} {:<w$} {n}",
            human_us(*upper),
            "#".repeat(width as usize),
            w = BAR_MAX_CHARS as usize
        );
    }
}

/// Adds a summary's buckets into `into`.
fn add_buckets(into: &mut BTreeMap<u64, u64>, summary: &Value) {
    for b in summary
        .get("buckets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(upper), Some(n)) = (b[0].as_u64(), b[1].as_u64()) {
            *into.entry(upper).or_default() += n;
        }
    }
}

/// `stats [--daemon NAME]`: every daemon's `/stats` JSON as it is, one object per daemon.
pub fn stats(info: &ClusterInfo, only: Option<&str>) -> anyhow::Result<()> {
    let mut out = serde_json::Map::new();
    for d in info
        .daemons
        .iter()
        .filter(|d| only.is_none_or(|n| n == d.name))
    {
        let v = http::get_json(&d.addr, info.token_for(d).as_deref(), "/stats")
            .unwrap_or_else(|e| serde_json::json!({ "error": format!("{e:#}") }));
        out.insert(d.name.clone(), v);
    }
    anyhow::ensure!(!out.is_empty(), "no matching daemon with an admin port");
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(())
}

/// `status [--interval-ms N]`.
pub fn status(info: &ClusterInfo, interval: Duration) -> anyhow::Result<()> {
    let fetch = |name: &str| -> Result<Value, String> {
        let d = info
            .daemons
            .iter()
            .find(|d| d.name == name)
            .ok_or("no admin port")?;
        http::get_json(&d.addr, info.token_for(d).as_deref(), "/stats")
            .map_err(|e| format!("{e:#}"))
    };
    let mut sampled: Vec<Sampled<'_>> = info
        .daemons
        .iter()
        .map(|d| Sampled {
            name: &d.name,
            addr: &d.addr,
            before: if interval.is_zero() {
                None
            } else {
                fetch(&d.name).ok()
            },
            after: Err(String::new()),
        })
        .collect();
    std::thread::sleep(interval);
    for s in &mut sampled {
        s.after = fetch(s.name);
    }
    backends_table(info, &sampled, interval);
    println!();
    daemons_table(&sampled, interval);
    histograms(&sampled);
    Ok(())
}

/// The per-backend stats objects of every pplistener, by the backend's own name.
fn store_stats<'v>(sampled: &'v [Sampled<'_>], after: bool) -> BTreeMap<String, &'v Value> {
    let mut out = BTreeMap::new();
    for s in sampled.iter().filter(|s| s.name.starts_with("pplistener")) {
        let v = if after {
            s.after.as_ref().ok()
        } else {
            s.before.as_ref()
        };
        for b in v
            .and_then(|v| v.get("backends"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = b.get("name").and_then(Value::as_str) {
                out.insert(name.to_string(), b);
            }
        }
    }
    out
}

/// The frontends that have backend `name` disabled for new messages.
fn disabled_by<'a>(sampled: &'a [Sampled<'_>], name: &str) -> Vec<&'a str> {
    sampled
        .iter()
        .filter(|s| {
            s.after
                .as_ref()
                .ok()
                .and_then(|v| v.get("backends"))
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|b| {
                    b.get("name").and_then(Value::as_str) == Some(name)
                        && b.get("disabled").and_then(Value::as_bool) == Some(true)
                })
        })
        .map(|s| s.name)
        .collect()
}

fn backends_table(info: &ClusterInfo, sampled: &[Sampled<'_>], interval: Duration) {
    let (before, after) = (store_stats(sampled, false), store_stats(sampled, true));
    let mut rows = vec![[
        "BACKEND",
        "ADDR",
        "STATE",
        "MODE",
        "FREE",
        "CONNS",
        "PUTS",
        "OPS/s",
        "BYTES/s",
        "PUT p50/p99/p999",
        "DISABLED IN",
    ]
    .map(String::from)
    .to_vec()];
    for b in &info.backends {
        let status = info
            .connect(b)
            .and_then(|mut c| Ok(c.status()?))
            .map(|kv| kv.into_iter().collect::<BTreeMap<String, String>>());
        let row = match status {
            Ok(kv) => {
                let get = |k: &str| kv.get(k).cloned().unwrap_or_else(|| "-".into());
                let own = kv.get("name").cloned().unwrap_or_default();
                let (b0, b1) = (before.get(&own), after.get(&own));
                let free = kv
                    .get("free_bytes")
                    .and_then(|v| v.parse().ok())
                    .map_or("-".into(), human_bytes);
                vec![
                    b.name.clone(),
                    b.addr.clone(),
                    "up".into(),
                    get("mode"),
                    free,
                    get("connections"),
                    get("puts"),
                    match (b0, b1) {
                        (Some(x), Some(y)) => rate(ops(x), ops(y), interval),
                        _ => "-".into(),
                    },
                    match (b0, b1) {
                        (Some(x), Some(y)) => rate(bytes(x), bytes(y), interval),
                        _ => "-".into(),
                    },
                    percentiles(b1.and_then(|v| latency_map(v)).and_then(|m| m.get("PUT"))),
                    match disabled_by(sampled, &b.name) {
                        d if d.is_empty() => "-".into(),
                        d => d.join(","),
                    },
                ]
            }
            Err(_) => vec![b.name.clone(), b.addr.clone(), "DOWN".into()],
        };
        rows.push(row);
    }
    table(&rows);
}

fn daemons_table(sampled: &[Sampled<'_>], interval: Duration) {
    let mut rows = vec![[
        "DAEMON",
        "ADMIN",
        "STATE",
        "CONNS",
        "OPS/s",
        "BYTES/s",
        "BUSIEST OP",
        "p50/p99/p999",
    ]
    .map(String::from)
    .to_vec()];
    for s in sampled {
        let row = match &s.after {
            Ok(v) if !s.name.starts_with("pplistener") => {
                let (op, summary) = busiest(v).map_or(("-", None), |(op, s)| (op, Some(s)));
                let rates = s.before.as_ref().map(|b| {
                    (
                        rate(ops(b), ops(v), interval),
                        rate(bytes(b), bytes(v), interval),
                    )
                });
                let (ops_s, bytes_s) = rates.unwrap_or(("-".into(), "-".into()));
                vec![
                    s.name.to_string(),
                    s.addr.to_string(),
                    "up".into(),
                    gauge(v, "connections").to_string(),
                    ops_s,
                    bytes_s,
                    op.to_string(),
                    percentiles(summary),
                ]
            }
            Ok(v) => {
                let n = v
                    .get("backends")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                vec![
                    s.name.to_string(),
                    s.addr.to_string(),
                    "up".into(),
                    format!("({n} backends above)"),
                ]
            }
            Err(e) => vec![s.name.to_string(), s.addr.to_string(), format!("DOWN: {e}")],
        };
        rows.push(row);
    }
    table(&rows);
}

fn histograms(sampled: &[Sampled<'_>]) {
    for s in sampled {
        let Ok(v) = &s.after else { continue };
        let mut buckets = BTreeMap::new();
        let title;
        if s.name.starts_with("pplistener") {
            for b in v
                .get("backends")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(put) = latency_map(b).and_then(|m| m.get("PUT")) {
                    add_buckets(&mut buckets, put);
                }
            }
            title = format!("{} PUT latency, all backends", s.name);
        } else if let Some((op, summary)) = busiest(v) {
            add_buckets(&mut buckets, summary);
            title = format!("{} {op} latency", s.name);
        } else {
            continue;
        }
        if !buckets.is_empty() {
            println!();
            draw_histogram(&title, &buckets.into_iter().collect::<Vec<_>>());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_one_stats_layout() {
        let smtp = serde_json::json!({"counters": {"bytes": 100}, "gauges": {"connections": 2},
            "latency": {"transaction": {"count": 5, "p50_us": 1500, "p99_us": 9000, "p999_us": 9000}}});
        let store = serde_json::json!({"counters": {"bytes_in": 5, "bytes_out": 6}});
        let pop = serde_json::json!({"counters": {"bytes_retrieved": 7},
            "latency": {"RETR": {"count": 9}, "USER": {"count": 1}}});
        assert_eq!(ops(&smtp), 5);
        assert_eq!(bytes(&smtp), 100);
        assert_eq!(bytes(&pop), 7);
        assert_eq!(bytes(&store), 11);
        assert_eq!(gauge(&smtp, "connections"), 2);
        // The old powersmtp key is not read any more.
        assert_eq!(
            ops(&serde_json::json!({"latencies": {"x": {"count": 1}}})),
            0
        );
        assert_eq!(busiest(&pop).unwrap().0, "RETR");
        assert_eq!(
            percentiles(latency_map(&smtp).unwrap().get("transaction")),
            "1.5ms/9.0ms/9.0ms"
        );
        assert_eq!(rate(10, 30, Duration::from_secs(2)), "10.0");
        assert_eq!(rate(10, 30, Duration::ZERO), "-");
    }
}
