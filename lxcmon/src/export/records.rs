//! `records`: one object per container per cycle, the seed document's shape.

use super::file::Span;
use super::{round2, Cycle, MIB};
use crate::readers::cgroup::details;
use crate::readers::mounts::MountUsage;
use crate::readers::procfs::InterfaceCounters;
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
    runtime: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<&'a str>,
    #[serde(skip_serializing_if = "Pressure::is_empty")]
    pressure: Pressure,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_throttling: Option<Throttling>,
    #[serde(skip_serializing_if = "Limits::is_empty")]
    limits: Limits,
    #[serde(skip_serializing_if = "MemoryEvents::is_empty")]
    memory_events: MemoryEvents,
    #[serde(skip_serializing_if = "MemoryDetails::is_empty")]
    memory_details: MemoryDetails,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    devices: Vec<Device<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    mounts: Vec<Mount<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runqueue_wait: Option<crate::collect::latency::IntervalSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_latency: Option<crate::collect::latency::IoLatencySummary>,
    /// Cumulative, as every counter of the record (absent when not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_retransmits: Option<u64>,
}

/// Kernel event counters; each omitted where the kernel does not have it.
#[derive(Serialize, Default, PartialEq)]
struct MemoryEvents {
    #[serde(skip_serializing_if = "Option::is_none")]
    high: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oom_group_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_high: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_fail: Option<u64>,
}

impl MemoryEvents {
    fn new(e: &details::MemoryEvents) -> Self {
        Self {
            high: e.high,
            max: e.max,
            oom: e.oom,
            oom_kill: e.oom_kill,
            oom_group_kill: e.oom_group_kill,
            swap_high: e.swap_high,
            swap_max: e.swap_max,
            swap_fail: e.swap_fail,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The memory breakdown; each omitted where the kernel does not have it.
#[derive(Serialize, Default, PartialEq)]
struct MemoryDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    anon_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slab_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shmem_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dirty_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    writeback_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workingset_refaults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    major_faults: Option<u64>,
}

impl MemoryDetails {
    fn new(m: &details::MemoryBreakdown) -> Self {
        Self {
            anon_bytes: m.anon_bytes,
            file_bytes: m.file_bytes,
            kernel_bytes: m.kernel_bytes,
            slab_bytes: m.slab_bytes,
            shmem_bytes: m.shmem_bytes,
            dirty_bytes: m.dirty_bytes,
            writeback_bytes: m.writeback_bytes,
            workingset_refaults: m.workingset_refaults,
            major_faults: m.major_faults,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Serialize)]
struct Interface<'a> {
    name: &'a str,
    rx_bytes: u64,
    rx_packets: u64,
    rx_errors: u64,
    rx_drops: u64,
    tx_bytes: u64,
    tx_packets: u64,
    tx_errors: u64,
    tx_drops: u64,
}

impl<'a> Interface<'a> {
    fn new(i: &'a InterfaceCounters) -> Self {
        Self {
            name: &i.name,
            rx_bytes: i.rx_bytes,
            rx_packets: i.rx_packets,
            rx_errors: i.rx_errors,
            rx_drops: i.rx_drops,
            tx_bytes: i.tx_bytes,
            tx_packets: i.tx_packets,
            tx_errors: i.tx_errors,
            tx_drops: i.tx_drops,
        }
    }
}

#[derive(Serialize)]
struct Mount<'a> {
    mountpoint: &'a str,
    fstype: &'a str,
    source: &'a str,
    size_bytes: u64,
    used_bytes: u64,
    avail_bytes: u64,
    inodes: u64,
    inodes_free: u64,
    shared: bool,
}

impl<'a> Mount<'a> {
    fn new(u: &'a MountUsage) -> Self {
        Self {
            mountpoint: &u.mountpoint,
            fstype: &u.fstype,
            source: &u.source,
            size_bytes: u.size_bytes,
            used_bytes: u.used_bytes,
            avail_bytes: u.avail_bytes,
            inodes: u.inodes,
            inodes_free: u.inodes_free,
            shared: u.shared,
        }
    }
}

/// PSI stall time, cumulative seconds.
#[derive(Serialize, Default, PartialEq)]
struct Pressure {
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_some_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_full_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_some_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_full_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_some_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    io_full_seconds: Option<f64>,
}

impl Pressure {
    fn new(p: &details::Pressure) -> Self {
        let s = |us: u64| us as f64 / 1e6;
        Self {
            cpu_some_seconds: p.cpu.map(|c| s(c.some_us)),
            cpu_full_seconds: p.cpu.and_then(|c| c.full_us).map(s),
            memory_some_seconds: p.memory.map(|c| s(c.some_us)),
            memory_full_seconds: p.memory.and_then(|c| c.full_us).map(s),
            io_some_seconds: p.io.map(|c| s(c.some_us)),
            io_full_seconds: p.io.and_then(|c| c.full_us).map(s),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Serialize)]
struct Throttling {
    periods: u64,
    throttled_periods: u64,
    throttled_seconds: f64,
}

/// The limits as configured; each omitted when unlimited.
#[derive(Serialize, Default, PartialEq)]
struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_quota_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_period_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpuset_cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_high_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    swap_max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pids_max: Option<u64>,
}

impl Limits {
    fn new(l: &crate::readers::cgroup::Limits) -> Self {
        Self {
            cpu_quota_us: l.cpu_quota_us,
            cpu_period_us: l.cpu_period_us,
            cpuset_cpus: l.cpuset_cpus,
            memory_max_bytes: l.memory_bytes,
            memory_high_bytes: l.memory_high_bytes,
            swap_max_bytes: l.swap_bytes,
            pids_max: l.pids_max,
        }
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Serialize)]
struct Device<'a> {
    name: &'a str,
    major: u32,
    minor: u32,
    read_bytes: u64,
    write_bytes: u64,
    reads: u64,
    writes: u64,
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

/// The cycle's records, written into `out` (emptied first; its capacity is reused).
pub fn encode(cycle: &Cycle, mut out: Vec<u8>) -> Vec<u8> {
    let ts = timestamp(cycle);
    out.clear();
    out.reserve(cycle.metrics.len() * 420);
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
            runtime: m.runtime.as_str(),
            project: m.project.as_deref(),
            pressure: Pressure::new(&m.details.pressure),
            cpu_throttling: m.details.throttling.map(|t| Throttling {
                periods: t.periods,
                throttled_periods: t.throttled_periods,
                throttled_seconds: t.throttled_ns as f64 / 1e9,
            }),
            limits: Limits::new(&m.limits),
            memory_events: MemoryEvents::new(&m.details.memory_events),
            memory_details: MemoryDetails::new(&m.details.memory),
            interfaces: m.interfaces.iter().map(Interface::new).collect(),
            devices: m
                .details
                .devices
                .iter()
                .map(|d| Device {
                    name: &d.name,
                    major: d.dev.0,
                    minor: d.dev.1,
                    read_bytes: d.read_bytes,
                    write_bytes: d.write_bytes,
                    reads: d.reads,
                    writes: d.writes,
                })
                .collect(),
            mounts: m.mounts.iter().map(Mount::new).collect(),
            runqueue_wait: m.latency.as_ref().and_then(|l| l.runqueue_summary()),
            io_latency: m.latency.as_ref().and_then(|l| l.io_summary()),
            tcp_retransmits: m.latency.as_ref().and_then(|l| l.tcp_retransmits),
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

    /// A buffer handed back from an earlier cycle holds only the new cycle's records.
    #[test]
    fn a_reused_buffer_holds_only_the_new_cycle() {
        let old = encode(
            &crate::export::tests::cycle(0, &["a", "b", "c"]),
            Vec::new(),
        );
        let buf = old.as_ptr();
        let out = encode(&crate::export::tests::cycle(1, &["z"]), old);
        assert_eq!(out.as_ptr(), buf, "the same buffer");
        let v: serde_json::Value =
            serde_json::from_slice(&[b"[".as_slice(), &out, b"]"].concat()).unwrap();
        let ids: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["container_id"].clone())
            .collect();
        assert_eq!(ids, ["z"]);
    }

    #[test]
    fn record_fields_follow_the_contract() {
        let c = cycle(0, &["100", "web"]);
        let v: serde_json::Value =
            serde_json::from_slice(&[b"[".as_slice(), &encode(&c, Vec::new()), b"]"].concat())
                .unwrap();
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

    /// The details' keys: present with the kernel's values in their units, omitted (not 0,
    /// not null) where absent; a container without details has none of them.
    #[test]
    fn detail_keys_are_present_or_omitted() {
        let mut c = cycle(0, &["plain"]);
        c.metrics.push(crate::export::tests::metrics_full("full"));
        let v: serde_json::Value =
            serde_json::from_slice(&[b"[".as_slice(), &encode(&c, Vec::new()), b"]"].concat())
                .unwrap();
        let (plain, full) = (&v[0], &v[1]);
        assert_eq!(plain["runtime"], "lxc");
        for key in [
            "project",
            "pressure",
            "cpu_throttling",
            "limits",
            "memory_events",
            "memory_details",
            "interfaces",
            "devices",
            "mounts",
        ] {
            assert!(plain.get(key).is_none(), "{key} in {plain}");
            assert!(full.get(key).is_some(), "{key} missing in {full}");
        }
        assert_eq!(full["runtime"], "incus");
        assert_eq!(full["project"], "p2");
        assert_eq!(
            full["pressure"],
            serde_json::json!({"cpu_some_seconds": 2.5, "memory_some_seconds": 0.001,
                "memory_full_seconds": 0.0005})
        );
        assert_eq!(
            full["cpu_throttling"],
            serde_json::json!({"periods": 100, "throttled_periods": 50, "throttled_seconds": 2.0})
        );
        assert_eq!(
            full["limits"],
            serde_json::json!({"cpu_quota_us": 50000, "cpu_period_us": 100000, "cpuset_cpus": 2,
                "memory_max_bytes": 67108864, "pids_max": 512})
        );
        assert_eq!(
            full["memory_events"],
            serde_json::json!({"max": 7, "oom": 2, "oom_kill": 2})
        );
        assert_eq!(
            full["memory_details"],
            serde_json::json!({"anon_bytes": 1048576, "file_bytes": 2097152,
                "workingset_refaults": 3})
        );
        assert_eq!(full["interfaces"][1]["name"], "eth1");
        assert_eq!(full["interfaces"][1]["rx_bytes"], 2000);
        assert_eq!(full["interfaces"][1]["tx_drops"], 0);
        assert_eq!(
            full["devices"],
            serde_json::json!([{"name": "sda", "major": 8, "minor": 0, "read_bytes": 4096,
                "write_bytes": 8192, "reads": 1, "writes": 2}])
        );
        assert_eq!(full["mounts"][0]["shared"], true);
        assert_eq!(full["mounts"][1]["mountpoint"], "/mnt/data \"quoted\"");
        assert_eq!(full["mounts"][1]["inodes_free"], 117);
        assert_eq!(full["mounts"][1]["size_bytes"], 64u64 << 20);
    }

    /// `tcp_retransmits`: the cumulative count where counted (0 included), omitted where not.
    #[test]
    fn tcp_retransmits_is_the_count_or_omitted() {
        let mut c = cycle(0, &["off"]);
        for (id, n) in [("some", 7), ("none", 0)] {
            let mut m = crate::export::tests::metrics(id, 1);
            m.latency = Some(Box::new(crate::collect::latency::Latency {
                tcp_retransmits: Some(n),
                ..Default::default()
            }));
            c.metrics.push(m);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&[b"[".as_slice(), &encode(&c, Vec::new()), b"]"].concat())
                .unwrap();
        assert!(v[0].get("tcp_retransmits").is_none(), "{}", v[0]);
        assert_eq!(v[1]["tcp_retransmits"], 7);
        assert_eq!(v[2]["tcp_retransmits"], 0);
    }

    #[test]
    fn subsecond_timestamps() {
        let mut c = cycle(0, &["a"]);
        c.subsecond = true;
        assert_eq!(timestamp(&c), "2023-11-14T22:13:20.123Z");
    }
}
