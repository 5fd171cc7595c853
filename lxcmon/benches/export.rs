//! Export cost at full retention: an `Exporter` holding `max_metrics_entries` cycles of
//! `containers` containers, then `push` + `write` of one more cycle, timed. Plain harness
//! (no criterion): `cargo xtask bench` runs it and reads the `lxcmon-bench-export` lines.
//!
//! `cargo bench -p lxcmon --bench export [-- CONTAINERS RETAINED ROUNDS]`

use chrono::Utc;
use lxcmon::collect::sample::FsUsage;
use lxcmon::config::ExportFormat;
use lxcmon::derive::ContainerMetrics;
use lxcmon::derive::Cycle;
use lxcmon::export::Exporter;
use std::time::Instant;

fn cycle(seq: u64, containers: usize) -> Cycle {
    let now = Utc::now();
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
                }
            })
            .collect(),
        total_containers: containers,
        failed_containers: 0,
        collector: "files",
        host_cpu_percent: 12.5,
        agent_rss_bytes: 9 << 20,
        subsecond: false,
    }
}

/// On-CPU nanoseconds of this thread.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let nums: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let containers = nums.first().copied().unwrap_or(100);
    let retained = nums.get(1).copied().unwrap_or(1000);
    let rounds = nums.get(2).copied().unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("lxcmon-bench-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    for (name, format) in [
        ("records", ExportFormat::Records),
        ("autoscale_ml", ExportFormat::AutoscaleMl),
    ] {
        let path = dir.join(format!("{name}.json"));
        let _ = std::fs::remove_file(&path);
        let mut ex = Exporter::open(&path, format, retained)?;
        for seq in 0..retained as u64 {
            ex.push(&cycle(seq, containers));
        }
        ex.write()?;
        let (mut push_us, mut write_us, mut cpu_us) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds as u64 {
            let c = cycle(retained as u64 + r, containers);
            let cpu0 = thread_cpu_ns();
            let t0 = Instant::now();
            ex.push(&c);
            let t1 = Instant::now();
            ex.write()?;
            let t2 = Instant::now();
            cpu_us.push(thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e3);
            push_us.push((t1 - t0).as_secs_f64() * 1e6);
            write_us.push((t2 - t1).as_secs_f64() * 1e6);
        }
        let bytes = std::fs::metadata(&path)?.len();
        println!(
            "lxcmon-bench-export format={name} containers={containers} retained={} push_us={:.0} write_us={:.0} cpu_us={:.0} bytes={bytes}",
            ex.cycles(),
            median(push_us),
            median(write_us),
            median(cpu_us),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
