//! `records`: one object per container per cycle, the seed document's shape.

use super::file::Span;
use super::{round2, Cycle, MIB};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Serialize)]
struct Record<'a> {
    container_id: &'a str,
    timestamp: &'a str,
    cpu_usage: f64,
    memory_usage: f64,
    swap_usage: f64,
    io_read_bytes: u64,
    io_write_bytes: u64,
    network_received_bytes: u64,
    network_transmitted_bytes: u64,
    filesystem_usage: Filesystem,
    process_count: u64,
    container_name: &'a str,
    thread_count: u64,
    cpu_cores_allowed: f64,
    memory_limit: f64,
    collector: &'a str,
    /// When this instance of the container started: cumulative figures count from it, and a
    /// new value means a restart (counters start afresh).
    started: String,
}

#[derive(Serialize)]
struct Filesystem {
    total: u64,
    used: u64,
    free: u64,
}

pub fn timestamp(cycle: &Cycle) -> String {
    let precision = if cycle.subsecond {
        SecondsFormat::Millis
    } else {
        SecondsFormat::Secs
    };
    cycle.started.to_rfc3339_opts(precision, true)
}

pub fn encode(cycle: &Cycle) -> Vec<u8> {
    let ts = timestamp(cycle);
    let mut out = Vec::with_capacity(cycle.metrics.len() * 420);
    for (i, m) in cycle.metrics.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        let record = Record {
            container_id: &m.id,
            timestamp: &ts,
            cpu_usage: round2(m.cpu_percent),
            memory_usage: round2(m.memory_bytes as f64 / MIB),
            swap_usage: round2(m.swap_bytes as f64 / MIB),
            io_read_bytes: m.io_read_bytes,
            io_write_bytes: m.io_write_bytes,
            network_received_bytes: m.net_rx_bytes,
            network_transmitted_bytes: m.net_tx_bytes,
            filesystem_usage: Filesystem {
                total: m.fs.total,
                used: m.fs.used,
                free: m.fs.free,
            },
            process_count: m.processes,
            container_name: &m.name,
            thread_count: m.threads,
            cpu_cores_allowed: round2(m.cpu_cores_allowed),
            memory_limit: round2(m.memory_limit_bytes as f64 / MIB),
            collector: cycle.collector,
            started: m.started.to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        // Serialising plain structs of numbers and strings into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, &record);
    }
    out
}

#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    timestamp: std::borrow::Cow<'a, str>,
    #[allow(dead_code)]
    container_id: std::borrow::Cow<'a, str>,
}

/// Finds an existing file's cycles (consecutive records sharing a timestamp form one cycle):
/// each cycle's byte range in `text`, from its first record to its last.
pub fn read_back(text: &str) -> Result<Vec<Span>, String> {
    let records: Vec<&RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON array of records: {e}"))?;
    let mut cycles: Vec<Span> = Vec::new();
    let mut last_ts: Option<std::borrow::Cow<str>> = None;
    for (i, raw) in records.iter().enumerate() {
        let probe: Probe = serde_json::from_str(raw.get())
            .map_err(|e| format!("element {i} is not a record: {e}"))?;
        let span = span_in(text, raw.get());
        let same_cycle = last_ts.as_deref() == Some(probe.timestamp.as_ref());
        match cycles.last_mut() {
            Some(entry) if same_cycle => entry.len = span.end() - entry.offset,
            _ => {
                cycles.push(span);
                last_ts = Some(probe.timestamp);
            }
        }
    }
    Ok(cycles)
}

/// Where `part`, a slice of `text`, lies in it.
pub fn span_in(text: &str, part: &str) -> Span {
    Span {
        offset: (part.as_ptr() as usize - text.as_ptr() as usize) as u64,
        len: part.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::cycle;

    #[test]
    fn record_fields_follow_the_contract() {
        let c = cycle(0, &["100", "web"]);
        let v: serde_json::Value =
            serde_json::from_slice(&[b"[".as_slice(), &encode(&c), b"]"].concat()).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        let r = &arr[0];
        assert_eq!(r["container_id"], "100");
        assert_eq!(r["container_name"], "100-name");
        assert_eq!(r["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(
            arr[1]["timestamp"], r["timestamp"],
            "one timestamp per cycle"
        );
        assert_eq!(r["cpu_usage"], 12.35);
        assert_eq!(r["memory_usage"], 512.0);
        assert_eq!(r["swap_usage"], 3.0);
        assert_eq!(r["io_read_bytes"], 0);
        assert_eq!(arr[1]["io_write_bytes"], 2048);
        assert_eq!(r["network_received_bytes"], 100);
        assert_eq!(r["network_transmitted_bytes"], 200);
        assert_eq!(
            r["filesystem_usage"],
            serde_json::json!({"total": 10u64 << 30, "used": 4u64 << 30, "free": 5u64 << 30})
        );
        assert_eq!(r["process_count"], 7);
        assert_eq!(r["thread_count"], 9);
        assert_eq!(r["memory_limit"], 1024.0);
        assert_eq!(r["collector"], "files");
        assert_eq!(r["started"], "2023-11-14T21:13:20Z");
        for (k, val) in r.as_object().unwrap() {
            assert!(!val.is_null(), "{k} is null");
        }
    }

    #[test]
    fn subsecond_timestamps() {
        let mut c = cycle(0, &["a"]);
        c.subsecond = true;
        assert_eq!(timestamp(&c), "2023-11-14T22:13:20.123Z");
    }
}
