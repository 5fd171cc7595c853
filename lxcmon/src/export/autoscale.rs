//! `autoscale_ml`: one object per cycle, keyed by container id plus `summary`, in the form
//! the lxc_autoscale_ml data loader (pandas) accepts.

use super::file::Span;
use super::{round2, Cycle, GIB, MIB};
use chrono::{DateTime, Local, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

#[derive(Serialize)]
struct Container<'a> {
    timestamp: &'a str,
    cpu_usage_percent: f64,
    memory_usage_mb: f64,
    swap_usage_mb: f64,
    swap_total_mb: f64,
    process_count: u64,
    io_stats: IoStats,
    network_usage: Network,
    filesystem_usage_gb: f64,
    filesystem_total_gb: f64,
    filesystem_free_gb: f64,
}

#[derive(Serialize)]
struct IoStats {
    reads: u64,
    writes: u64,
}

#[derive(Serialize)]
struct Network {
    rx_bytes: u64,
    tx_bytes: u64,
}

#[derive(Serialize)]
struct Summary<'a> {
    collection_start_time: &'a str,
    collection_end_time: &'a str,
    total_containers: usize,
    collected_containers: usize,
    total_duration_seconds: f64,
    monitor_cpu_percent: f64,
    monitor_memory_usage_mb: f64,
    collector: &'a str,
}

/// Naive local time with exactly six fractional digits: the reader compares it with a
/// naive "now", so no offset may appear.
pub fn naive_local(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local)
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string()
}

/// The reader takes every key but `summary` for a container.
const RESERVED: &str = "summary";

/// The cycle's object, and whether a container named `summary` had to be left out (the
/// caller warns once per condition, not per cycle).
pub fn encode(cycle: &Cycle, mut out: Vec<u8>) -> (Vec<u8>, bool) {
    let ts = naive_local(cycle.started);
    let end = naive_local(cycle.ended);
    out.clear();
    out.reserve(cycle.metrics.len() * 400 + 300);
    out.push(b'{');
    let mut collected = 0;
    let mut left_out = false;
    for m in &cycle.metrics {
        if m.id == RESERVED {
            left_out = true;
            continue;
        }
        let c = Container {
            timestamp: &ts,
            cpu_usage_percent: round2(m.cpu_percent),
            memory_usage_mb: round2(m.memory_bytes as f64 / MIB),
            swap_usage_mb: round2(m.swap_bytes as f64 / MIB),
            swap_total_mb: round2(m.swap_limit_bytes as f64 / MIB),
            process_count: m.processes,
            io_stats: IoStats {
                reads: m.io_read_bytes / 512,
                writes: m.io_write_bytes / 512,
            },
            network_usage: Network {
                rx_bytes: m.net_rx_bytes,
                tx_bytes: m.net_tx_bytes,
            },
            filesystem_usage_gb: round2(m.fs.used as f64 / GIB),
            filesystem_total_gb: round2(m.fs.total as f64 / GIB),
            filesystem_free_gb: round2(m.fs.free as f64 / GIB),
        };
        let _ = serde_json::to_writer(&mut out, &m.id);
        out.push(b':');
        let _ = serde_json::to_writer(&mut out, &c);
        out.push(b',');
        collected += 1;
    }
    let summary = Summary {
        collection_start_time: &ts,
        collection_end_time: &end,
        total_containers: cycle.total_containers,
        collected_containers: collected,
        total_duration_seconds: (cycle.ended - cycle.started)
            .to_std()
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
        monitor_cpu_percent: round2(cycle.host_cpu_percent),
        monitor_memory_usage_mb: round2(cycle.agent_rss_bytes as f64 / MIB),
        collector: cycle.collector,
    };
    out.extend_from_slice(b"\"summary\":");
    let _ = serde_json::to_writer(&mut out, &summary);
    out.push(b'}');
    (out, left_out)
}

/// Finds an existing file's cycles: each one's byte range in `text`. Every element must be
/// an object with a `summary` object and only objects beside it.
pub fn read_back(text: &str) -> Result<Vec<Span>, String> {
    let cycles: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array: {e}"))?;
    cycles
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let keys: HashMap<&str, &RawValue> = serde_json::from_str(raw.get())
                .map_err(|e| format!("cycle {i} is not an object: {e}"))?;
            if !keys.contains_key(RESERVED) {
                return Err(format!("cycle {i} has no summary"));
            }
            if let Some((k, _)) = keys.iter().find(|(_, v)| !v.get().starts_with('{')) {
                return Err(format!("cycle {i}: {k} is not an object"));
            }
            Ok(super::records::span_in(text, raw.get()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::cycle;

    #[test]
    fn cycle_object_follows_the_contract() {
        let mut c = cycle(0, &["100", "101", "summary"]);
        c.metrics[1].io_write_bytes = 4096 + 100;
        let (bytes, left_out) = encode(&c, Vec::new());
        assert!(left_out);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            vec!["100", "101", "summary"],
            "the reserved id is left out"
        );
        let ts = obj["100"]["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2023-11-14T22:13:20.123456".len(), "{ts}");
        assert!(!ts.ends_with('Z') && !ts.contains('+'), "{ts}");
        assert_eq!(ts.split('.').nth(1).map(str::len), Some(6));
        assert_eq!(obj["101"]["timestamp"], obj["100"]["timestamp"]);
        let c100 = obj["100"].as_object().unwrap();
        assert_eq!(c100.len(), 11, "exactly the eleven keys");
        assert_eq!(
            obj["101"]["io_stats"]["writes"], 8,
            "bytes / 512, whole sectors"
        );
        assert_eq!(obj["100"]["swap_total_mb"], 512.0);
        assert_eq!(obj["100"]["filesystem_total_gb"], 10.0);
        assert_eq!(obj["100"]["filesystem_usage_gb"], 4.0);
        assert_eq!(obj["100"]["network_usage"]["rx_bytes"], 100);
        let s = &obj["summary"];
        assert_eq!(s["total_containers"], 4);
        assert_eq!(s["collected_containers"], 2);
        assert_eq!(s["collection_start_time"], obj["100"]["timestamp"]);
        assert_eq!(s["total_duration_seconds"], 0.005);
        assert_eq!(s["monitor_memory_usage_mb"], 8.0);
    }
}
