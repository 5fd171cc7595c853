//! Deriving the exported figures from raw samples: CPU percent from deltas, limits resolved
//! against the host, units as the export contract wants them.

use crate::collect::sample::{ContainerSample, FsUsage};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::time::Instant;

/// The figures of one container in one cycle, in base units (bytes, percent).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerMetrics {
    pub id: String,
    pub name: String,
    /// Percent (0–100) of the CPU the container may use.
    pub cpu_percent: f64,
    pub cpu_cores_allowed: f64,
    /// Cumulative CPU time of the container's cgroup.
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
    /// The container's memory limit, or the host's memory when unlimited.
    pub memory_limit_bytes: u64,
    pub swap_bytes: u64,
    /// Swap the container may use, capped by the host's swap.
    pub swap_limit_bytes: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub fs: FsUsage,
    pub processes: u64,
    pub threads: u64,
}

/// Everything one cycle exports.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub started: DateTime<Utc>,
    pub ended: DateTime<Utc>,
    pub metrics: Vec<ContainerMetrics>,
    /// Containers found running, exported or not.
    pub total_containers: usize,
    /// Containers left out after their retries failed.
    pub failed_containers: usize,
    pub collector: &'static str,
    /// Host-wide CPU busy percent over the last interval.
    pub host_cpu_percent: f64,
    pub agent_rss_bytes: u64,
    /// Timestamps carry sub-second digits (intervals under a second).
    pub subsecond: bool,
}

/// Host facts the derivation needs each cycle.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    pub online_cpus: u32,
    pub mem_total: u64,
    pub swap_total: u64,
}

#[derive(Debug, Clone, Copy)]
struct Previous {
    cpu_usage_ns: u64,
    at: Instant,
}

#[derive(Debug, Default)]
pub struct Deriver {
    previous: HashMap<String, Previous>,
}

impl Deriver {
    /// Turns the cycle's samples into metrics. A container seen for the first time (or whose
    /// CPU counter went backwards: a restart) only sets its baseline and is not returned.
    pub fn derive(
        &mut self,
        samples: &[ContainerSample],
        host: HostFacts,
    ) -> Vec<ContainerMetrics> {
        let mut out = Vec::with_capacity(samples.len());
        let mut next = HashMap::with_capacity(samples.len());
        for s in samples {
            let now = Previous {
                cpu_usage_ns: s.cgroup.cpu_usage_ns,
                at: s.at,
            };
            if let Some(prev) = self.previous.get(&s.id) {
                if let Some(m) = metrics(s, prev, host) {
                    out.push(m);
                }
            }
            next.insert(s.id.clone(), now);
        }
        // Containers absent this cycle lose their baseline: a restart starts afresh.
        self.previous = next;
        out
    }
}

fn metrics(s: &ContainerSample, prev: &Previous, host: HostFacts) -> Option<ContainerMetrics> {
    let used_ns = s.cgroup.cpu_usage_ns.checked_sub(prev.cpu_usage_ns)?;
    let wall_ns = s.at.checked_duration_since(prev.at)?.as_nanos() as f64;
    if wall_ns <= 0.0 {
        return None;
    }
    let limits = s.cgroup.limits;
    let mut cores = f64::from(host.online_cpus.max(1));
    if let Some(q) = limits.cpu_quota_cores {
        cores = cores.min(q);
    }
    if let Some(n) = limits.cpuset_cpus {
        cores = cores.min(f64::from(n));
    }
    let cpu_percent = if cores > 0.0 {
        (used_ns as f64 / (wall_ns * cores) * 100.0).clamp(0.0, 100.0)
    } else {
        0.0
    };
    Some(ContainerMetrics {
        id: s.id.clone(),
        name: s.name.clone(),
        cpu_percent,
        cpu_cores_allowed: cores,
        cpu_usage_ns: s.cgroup.cpu_usage_ns,
        memory_bytes: s.cgroup.memory_bytes,
        memory_limit_bytes: limits
            .memory_bytes
            .map_or(host.mem_total, |l| l.min(host.mem_total)),
        swap_bytes: s.cgroup.swap_bytes,
        swap_limit_bytes: limits
            .swap_bytes
            .map_or(host.swap_total, |l| l.min(host.swap_total)),
        io_read_bytes: s.cgroup.io.read,
        io_write_bytes: s.cgroup.io.write,
        net_rx_bytes: s.net_rx,
        net_tx_bytes: s.net_tx,
        fs: s.fs,
        processes: s.cgroup.processes,
        threads: s.cgroup.threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::cgroup::{CgroupSample, Limits};
    use std::time::Duration;

    const HOST: HostFacts = HostFacts {
        online_cpus: 4,
        mem_total: 8 << 30,
        swap_total: 1 << 30,
    };

    fn sample(id: &str, at: Instant, cpu_ns: u64, limits: Limits) -> ContainerSample {
        ContainerSample {
            id: id.into(),
            name: id.into(),
            at,
            cgroup: CgroupSample {
                cpu_usage_ns: cpu_ns,
                limits,
                ..Default::default()
            },
            net_rx: 0,
            net_tx: 0,
            fs: FsUsage::default(),
            fresh: false,
            net_source: Default::default(),
            io_source: Default::default(),
        }
    }

    #[test]
    fn first_sample_sets_the_baseline_only() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        assert!(d
            .derive(&[sample("a", t0, 0, Limits::default())], HOST)
            .is_empty());
        let t1 = t0 + Duration::from_secs(1);
        let m = d.derive(&[sample("a", t1, 2_000_000_000, Limits::default())], HOST);
        assert_eq!(m.len(), 1);
        // 2 CPU-seconds in 1 s on 4 cores: 50 %.
        assert!(
            (m[0].cpu_percent - 50.0).abs() < 1e-9,
            "{}",
            m[0].cpu_percent
        );
        assert_eq!(m[0].cpu_cores_allowed, 4.0);
        assert_eq!(m[0].memory_limit_bytes, HOST.mem_total);
    }

    #[test]
    fn allowed_cores_is_the_smallest_bound() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        let quota = Limits {
            cpu_quota_cores: Some(0.5),
            cpuset_cpus: Some(2),
            memory_bytes: Some(1 << 30),
            swap_bytes: Some(u64::MAX),
        };
        d.derive(&[sample("q", t0, 0, quota)], HOST);
        let m = d.derive(
            &[sample("q", t0 + Duration::from_secs(2), 900_000_000, quota)],
            HOST,
        );
        assert_eq!(m[0].cpu_cores_allowed, 0.5);
        assert!((m[0].cpu_percent - 90.0).abs() < 1e-9);
        assert_eq!(m[0].memory_limit_bytes, 1 << 30);
        assert_eq!(
            m[0].swap_limit_bytes, HOST.swap_total,
            "capped by host swap"
        );
        let cpuset = Limits {
            cpuset_cpus: Some(1),
            ..Default::default()
        };
        d.derive(&[sample("s", t0, 0, cpuset)], HOST);
        let m = d.derive(
            &[sample(
                "s",
                t0 + Duration::from_secs(1),
                5_000_000_000,
                cpuset,
            )],
            HOST,
        );
        assert_eq!(m[0].cpu_percent, 100.0, "clamped");
    }

    #[test]
    fn restart_and_absence_reset_the_baseline() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        let l = Limits::default();
        d.derive(&[sample("a", t0, 5_000, l)], HOST);
        // Counter went backwards: a new container under the same id.
        assert!(d
            .derive(&[sample("a", t0 + Duration::from_secs(1), 10, l)], HOST)
            .is_empty());
        assert_eq!(
            d.derive(&[sample("a", t0 + Duration::from_secs(2), 20, l)], HOST)
                .len(),
            1
        );
        // Gone for a cycle: no stale baseline afterwards.
        d.derive(&[], HOST);
        assert!(d
            .derive(&[sample("a", t0 + Duration::from_secs(3), 30, l)], HOST)
            .is_empty());
    }
}
