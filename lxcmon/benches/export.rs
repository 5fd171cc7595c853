//! Export cost at full retention: a file of `max_metrics_entries` cycles of `containers`
//! containers, read back by `Exporter::open` (as at a restart), then `push` + `write` of one
//! more cycle, timed, with the process's RSS. The history stays on disk (only byte ranges in
//! memory) and each rewrite copies it in the kernel, so RSS does not follow the file size.
//! Plain harness (no criterion): `cargo xtask bench` runs it and reads the
//! `lxcmon-bench-export` lines.
//!
//! `cargo bench -p lxcmon --bench export [-- CONTAINERS RETAINED ROUNDS]`; without arguments,
//! 100 and 1000 containers at the default retention (1000 cycles).

use chrono::Utc;
use lxcmon::collect::sample::FsUsage;
use lxcmon::config::ExportFormat;
use lxcmon::derive::ContainerMetrics;
use lxcmon::derive::Cycle;
use lxcmon::export::{document, Exporter, Written};
use lxcmon::readers::cgroup::details::*;
use lxcmon::readers::mounts::MountUsage;
use lxcmon::readers::procfs::InterfaceCounters;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What a v2 host with every group on gives a container: pressure, throttling, events, the
/// memory breakdown and one disk.
fn details(s: u64) -> Details {
    let stall = Some(Stall {
        some_us: s * 1000,
        full_us: Some(s * 100),
    });
    Details {
        pressure: Pressure {
            cpu: stall,
            memory: stall,
            io: stall,
        },
        throttling: Some(Throttling {
            periods: s * 10,
            throttled_periods: s,
            throttled_ns: s * 1_000_000,
        }),
        memory_events: MemoryEvents {
            high: Some(0),
            max: Some(s % 7),
            oom: Some(0),
            oom_kill: Some(0),
            oom_group_kill: Some(0),
            swap_high: Some(0),
            swap_max: Some(0),
            swap_fail: Some(0),
        },
        memory: MemoryBreakdown {
            anon_bytes: Some(150 << 20),
            file_bytes: Some(50 << 20),
            kernel_bytes: Some(8 << 20),
            slab_bytes: Some(4 << 20),
            shmem_bytes: Some(1 << 20),
            dirty_bytes: Some(s * 4096),
            writeback_bytes: Some(0),
            workingset_refaults: Some(s),
            major_faults: Some(s / 3),
        },
        devices: vec![DeviceIo {
            dev: (8, 0),
            name: "sda".into(),
            read_bytes: s * 65536,
            write_bytes: s * 131072,
            reads: s * 16,
            writes: s * 32,
        }],
    }
}

/// Cycle `seq` of a 60 s interval: each has its own timestamp, as the agent's do.
fn cycle(seq: u64, containers: usize) -> Cycle {
    let now = Utc::now() + chrono::Duration::seconds(60 * seq as i64);
    Cycle {
        started: now,
        ended: now,
        metrics: (0..containers)
            .map(|i| {
                let s = seq * 1000 + i as u64;
                ContainerMetrics {
                    id: format!("{}", 100 + i),
                    started: now - chrono::Duration::hours(1),
                    name: format!("bench-container-{i}"),
                    cpu_percent: (s % 10_000) as f64 / 100.0,
                    cpu_cores_allowed: 2.0,
                    cpu_usage_ns: s * 10_000_000,
                    memory_bytes: 200 * 1024 * 1024 + s * 4096,
                    memory_limit_bytes: 1 << 30,
                    swap_bytes: s * 512,
                    swap_limit_bytes: 512 << 20,
                    io_read_bytes: s * 65536,
                    io_write_bytes: s * 131072,
                    net_rx_bytes: s * 1500,
                    net_tx_bytes: s * 900,
                    fs: FsUsage {
                        total: 8 << 30,
                        used: (3 << 30) + s * 4096,
                        free: (5 << 30) - s * 4096,
                    },
                    processes: 12,
                    threads: 30,
                    runtime: lxcmon::collect::discovery::Runtime::Proxmox,
                    project: None,
                    limits: Default::default(),
                    details: details(s),
                    interfaces: vec![InterfaceCounters {
                        name: "eth0".into(),
                        rx_bytes: s * 1500,
                        rx_packets: s,
                        tx_bytes: s * 900,
                        tx_packets: s,
                        ..Default::default()
                    }],
                    mounts: vec![MountUsage {
                        mountpoint: "/".into(),
                        fstype: "ext4".into(),
                        source: format!("/dev/mapper/pve-vm--{}--disk--0", 100 + i),
                        dev: (253, i as u32),
                        size_bytes: 8 << 30,
                        used_bytes: (3 << 30) + s * 4096,
                        avail_bytes: (5 << 30) - s * 4096,
                        inodes: 524288,
                        inodes_free: 400000,
                        shared: false,
                    }],
                    latency: None,
                }
            })
            .collect(),
        total_containers: containers,
        failed_containers: 0,
        collector: "files",
        bpf_fallback: Default::default(),
        host_cpu_percent: 12.5,
        agent_rss_bytes: 9 << 20,
        subsecond: false,
    }
}

/// On-CPU nanoseconds of this thread (user and kernel).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

/// User and system CPU of this thread in clock ticks (fields 14 and 15 of `stat`).
fn thread_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (
        f.get(11).copied().unwrap_or(0),
        f.get(12).copied().unwrap_or(0),
    )
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Writes a full-retention export the way the agent would have, streaming (not through an
/// `Exporter`, which would hold the unwritten cycles).
fn fill(
    path: &Path,
    format: ExportFormat,
    containers: usize,
    retained: usize,
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    w.write_all(b"[")?;
    for seq in 0..retained as u64 {
        let doc = document(format, &cycle(seq, containers));
        // One cycle's document is "[\n<entry>\n]\n": keep the entry.
        let entry = &doc[2..doc.len() - 3];
        w.write_all(if seq == 0 { b"\n" } else { b",\n" })?;
        w.write_all(entry)?;
    }
    w.write_all(b"\n]\n")?;
    w.flush()
}

fn bench(
    dir: &Path,
    containers: usize,
    retained: usize,
    rounds: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    for (name, format) in [
        ("records", ExportFormat::Records),
        ("autoscale_ml", ExportFormat::AutoscaleMl),
    ] {
        let path = dir.join(format!("{name}.json"));
        fill(&path, format, containers, retained)?;
        let t0 = Instant::now();
        let mut ex = Exporter::open(&path, format, retained)?;
        let open_ms = t0.elapsed().as_secs_f64() * 1e3;
        let (mut push_us, mut write_us, mut cpu_us) = (Vec::new(), Vec::new(), Vec::new());
        let (mut rss_kib, mut bytes) = (0, 0);
        let (u0, s0) = thread_ticks();
        for r in 0..rounds as u64 {
            let c = cycle(retained as u64 + r, containers);
            let cpu0 = thread_cpu_ns();
            let t0 = Instant::now();
            ex.push(&c);
            let t1 = Instant::now();
            match ex.write()? {
                Written::Bytes(n) => bytes = n,
                Written::NoSpace => return Err("no space for the bench's export file".into()),
            }
            let t2 = Instant::now();
            cpu_us.push(thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e3);
            push_us.push((t1 - t0).as_secs_f64() * 1e6);
            write_us.push((t2 - t1).as_secs_f64() * 1e6);
            rss_kib = rss_kib.max(status_kib("VmRSS"));
        }
        let (u1, s1) = thread_ticks();
        let tick_ms = 1000 / 100;
        println!(
            "lxcmon-bench-export format={name} containers={containers} retained={} push_us={:.0} write_us={:.0} cpu_us={:.0} user_ms_per_write={:.1} sys_ms_per_write={:.1} bytes={bytes} rss_kib={rss_kib} open_ms={open_ms:.0}",
            ex.cycles(),
            median(push_us),
            median(write_us),
            median(cpu_us),
            ((u1 - u0) * tick_ms) as f64 / rounds as f64,
            ((s1 - s0) * tick_ms) as f64 / rounds as f64,
        );
        std::fs::remove_file(&path)?;
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let dir = std::env::temp_dir().join(format!("lxcmon-bench-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = match nums.first() {
        Some(&containers) => bench(
            &dir,
            containers,
            nums.get(1).copied().unwrap_or(1000),
            nums.get(2).copied().unwrap_or(20),
        ),
        None => bench(&dir, 100, 1000, 20).and_then(|_| bench(&dir, 1000, 1000, 5)),
    };
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!(
        "lxcmon-bench-export peak_rss_kib={} (the read-back at open parses the file once)",
        status_kib("VmHWM")
    );
    Ok(())
}
