//! Deriving the exported figures from raw samples: CPU percent from deltas, limits resolved
//! against the host, units as the export contract wants them.
//!
//! Figures belong to a container *instance* (its cgroup's identity), not to its name: a
//! container restarted under the same id is a new instance that sets a new baseline, gets a
//! new start time and starts its counters afresh. Within one instance every cumulative counter
//! only grows, whatever its source does (a reload, a re-read after an error, a switch between
//! the file readers and the BPF programs): [`Deriver`] enforces it.

use crate::collect::discovery::{Discovered, Runtime};
use crate::collect::host::HostFacts;
use crate::collect::latency::Latency;
use crate::collect::sample::{ContainerSample, CounterSource, FsUsage};
use crate::collect::{BpfFallback, Collected};
use crate::config::Config;
use crate::readers::cgroup::details::Details;
use crate::readers::cgroup::Limits;
use crate::readers::mounts::MountUsage;
use crate::readers::procfs::InterfaceCounters;
use chrono::{DateTime, Utc};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// The figures of one container in one cycle, in base units (bytes, percent).
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerMetrics {
    pub id: String,
    pub name: String,
    /// When this instance of the container started (its init process; when that is unknown,
    /// when the agent first saw it). Cumulative figures count from this instance's start.
    pub started: DateTime<Utc>,
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
    pub runtime: Runtime,
    /// The Incus/LXD project outside the default one.
    pub project: Option<String>,
    /// The limits as configured (`None`: unlimited at the container's level).
    pub limits: Limits,
    /// Pressure, throttling, memory events and breakdown, per-device I/O: the kernel's own
    /// counters for this instance's cgroup, passed through.
    pub details: Details,
    pub interfaces: Vec<InterfaceCounters>,
    pub mounts: Vec<MountUsage>,
    /// Latency distributions (BPF collector; `None` without it).
    pub latency: Option<Box<Latency>>,
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
    /// Containers the BPF programs cannot count, and their tracking failures since start.
    pub bpf_fallback: BpfFallback,
    /// Host-wide CPU busy percent over the last interval.
    pub host_cpu_percent: f64,
    pub agent_rss_bytes: u64,
    /// Timestamps carry sub-second digits (intervals under a second).
    pub subsecond: bool,
}

/// The cumulative counters kept monotonic, in [`Counters`] order.
const COUNTERS: [&str; 5] = [
    "cpu_usage_ns",
    "io_read_bytes",
    "io_write_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
];
const CPU: usize = 0;
const IO_READ: usize = 1;
const IO_WRITE: usize = 2;
const NET_RX: usize = 3;
const NET_TX: usize = 4;

/// One cumulative counter of one instance: the source's last raw value and what was reported.
#[derive(Debug, Clone, Copy)]
struct Counter {
    raw: u64,
    source: CounterSource,
    reported: u64,
    /// The next raw value is a new base (the source's rules changed: a reload's settings).
    rebase: bool,
    /// Already logged as going backwards (once per instance and counter).
    warned: bool,
}

impl Counter {
    fn new(raw: u64, source: CounterSource) -> Self {
        Self {
            raw,
            source,
            reported: raw,
            rebase: false,
            warned: false,
        }
    }

    /// Takes the source's new value and returns the growth added to the reported one. A new
    /// source, or a new base, continues from the last reported value; a source that yields
    /// less than before is a fault: logged, and the counter holds.
    fn advance(&mut self, raw: u64, source: CounterSource, id: &str, which: usize) -> u64 {
        let growth = if source != self.source {
            tracing::info!(container = id, counter = COUNTERS[which], from = ?self.source, to = ?source,
                "counter source changed: continuing from the last reported value");
            0
        } else if self.rebase {
            0
        } else if raw < self.raw {
            if !self.warned {
                self.warned = true;
                tracing::error!(container = id, counter = COUNTERS[which], previous = self.raw, now = raw,
                    "a cumulative counter went backwards within one container instance: holding it (reported once per instance and counter)");
            }
            0
        } else {
            raw - self.raw
        };
        self.raw = raw;
        self.source = source;
        self.rebase = false;
        self.reported = self.reported.saturating_add(growth);
        growth
    }
}

type Counters = [Counter; 5];

fn raw_counters(s: &ContainerSample) -> [(u64, CounterSource); 5] {
    [
        (s.cgroup.cpu_usage_ns, CounterSource::Files),
        (s.cgroup.io.read, s.io_source),
        (s.cgroup.io.write, s.io_source),
        (s.net_rx, s.net_source),
        (s.net_tx, s.net_source),
    ]
}

/// What is kept per container instance between cycles.
#[derive(Debug, Clone)]
struct Previous {
    instance: u64,
    started: DateTime<Utc>,
    at: Instant,
    counters: Counters,
}

impl Previous {
    fn new(s: &ContainerSample) -> Self {
        let started = s
            .init_started
            .map(DateTime::<Utc>::from)
            .unwrap_or_else(Utc::now);
        Self {
            instance: s.instance,
            started,
            at: s.at,
            counters: raw_counters(s).map(|(raw, source)| Counter::new(raw, source)),
        }
    }
}

/// Which counters a reload may have changed the rules of.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebase {
    pub io: bool,
    pub net: bool,
}

#[derive(Debug, Default)]
pub struct Deriver {
    previous: HashMap<String, Previous>,
    /// `enable_network: false`: network figures read 0, each instance's counts kept aside
    /// and continued from when the family is switched on again.
    network_off: bool,
    /// An earlier cycle's metrics vector, emptied, for the next cycle (see [`Self::recycle`]).
    spare: Vec<ContainerMetrics>,
}

impl Deriver {
    /// Turns the cycle's samples into metrics. A container instance seen for the first time
    /// only sets its baseline and is not returned. `discovered` is every container found
    /// running: one left out of this cycle (a failed read) keeps its state for the next.
    pub fn derive(
        &mut self,
        mut samples: Vec<ContainerSample>,
        discovered: &[Discovered],
        host: HostFacts,
    ) -> Vec<ContainerMetrics> {
        self.derive_from(&mut samples, discovered, host)
    }

    /// [`Self::derive`], emptying `samples` but keeping its capacity for the next cycle.
    fn derive_from(
        &mut self,
        samples: &mut Vec<ContainerSample>,
        discovered: &[Discovered],
        host: HostFacts,
    ) -> Vec<ContainerMetrics> {
        // Stopped containers, and instances replaced by a new one, lose their state.
        let live: HashSet<(&str, u64)> = discovered
            .iter()
            .map(|d| (d.id.as_str(), d.instance))
            .chain(samples.iter().map(|s| (s.id.as_str(), s.instance)))
            .collect();
        self.previous
            .retain(|id, p| live.contains(&(id.as_str(), p.instance)));
        drop(live);
        // The samples are moved into the metrics: their per-container lists are not copied.
        let mut out = std::mem::take(&mut self.spare);
        out.reserve(samples.len());
        for s in samples.drain(..) {
            match self.previous.get_mut(&s.id) {
                Some(prev) if prev.instance == s.instance => {
                    if let Some(m) = metrics(s, prev, host, self.network_off) {
                        out.push(m);
                    }
                }
                _ => {
                    let p = Previous::new(&s);
                    self.previous.insert(s.id, p);
                }
            }
        }
        out
    }

    /// The cycle's figures from what was collected: containers seen for the first time set
    /// their baseline and are exported from the next cycle on. `c`'s samples are moved out
    /// and its latency figures taken: what is left can go back to the collector.
    pub fn cycle(&mut self, c: &mut Collected) -> Cycle {
        let mut metrics = self.derive_from(&mut c.samples, &c.discovered, c.host);
        for m in &mut metrics {
            m.latency = c.latency.remove(&m.id);
        }
        Cycle {
            started: c.started,
            ended: Utc::now(),
            metrics,
            total_containers: c.discovered.len(),
            failed_containers: c.failed,
            collector: c.collector,
            bpf_fallback: c.bpf_fallback,
            host_cpu_percent: c.host_cpu_percent,
            agent_rss_bytes: c.agent_rss_bytes,
            subsecond: c.subsecond,
        }
    }

    /// Takes back the metrics of a cycle every export is done with: the next cycle fills the
    /// same vector (a few MiB at N = 1000, which glibc would otherwise scatter over the heap).
    pub fn recycle(&mut self, mut metrics: Vec<ContainerMetrics>) {
        metrics.clear();
        self.spare = metrics;
    }

    /// A reloaded configuration: sums over other devices or interfaces make the next values new
    /// bases, not growth; `enable_network` switches the network figures.
    pub fn reconfigure(&mut self, old: &Config, new: &Config) {
        let (o, n) = (&old.monitoring, &new.monitoring);
        self.rebase(Rebase {
            io: o.excluded_devices != n.excluded_devices,
            net: o.enable_network != n.enable_network,
        });
        self.set_network(n.enable_network);
    }

    pub fn set_network(&mut self, enabled: bool) {
        self.network_off = !enabled;
    }

    /// The next value of these counters is a new base (a reload changed which devices or
    /// interfaces they sum); the reported figures continue from where they are.
    pub fn rebase(&mut self, which: Rebase) {
        for p in self.previous.values_mut() {
            if which.io {
                p.counters[IO_READ].rebase = true;
                p.counters[IO_WRITE].rebase = true;
            }
            if which.net {
                p.counters[NET_RX].rebase = true;
                p.counters[NET_TX].rebase = true;
            }
        }
    }
}

fn metrics(
    s: ContainerSample,
    prev: &mut Previous,
    host: HostFacts,
    network_off: bool,
) -> Option<ContainerMetrics> {
    let raw = raw_counters(&s);
    let mut growth = [0u64; 5];
    for (i, (value, source)) in raw.into_iter().enumerate() {
        if network_off && (i == NET_RX || i == NET_TX) {
            continue;
        }
        growth[i] = prev.counters[i].advance(value, source, &s.id, i);
    }
    let wall = s.at.checked_duration_since(prev.at);
    prev.at = s.at;
    let wall_ns = wall?.as_nanos() as f64;
    if wall_ns <= 0.0 {
        return None;
    }
    let used_ns = growth[CPU];
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
    let reported = |i: usize| prev.counters[i].reported;
    Some(ContainerMetrics {
        id: s.id,
        name: s.name,
        started: prev.started,
        cpu_percent,
        cpu_cores_allowed: cores,
        cpu_usage_ns: reported(CPU),
        memory_bytes: s.cgroup.memory_bytes,
        memory_limit_bytes: limits
            .memory_bytes
            .map_or(host.mem_total, |l| l.min(host.mem_total)),
        swap_bytes: s.cgroup.swap_bytes,
        swap_limit_bytes: limits
            .swap_bytes
            .map_or(host.swap_total, |l| l.min(host.swap_total)),
        io_read_bytes: reported(IO_READ),
        io_write_bytes: reported(IO_WRITE),
        net_rx_bytes: if network_off { 0 } else { reported(NET_RX) },
        net_tx_bytes: if network_off { 0 } else { reported(NET_TX) },
        fs: s.fs,
        processes: s.cgroup.processes,
        threads: s.cgroup.threads,
        runtime: s.runtime,
        project: s.project,
        limits,
        details: s.cgroup.details,
        interfaces: if network_off {
            Vec::new()
        } else {
            s.interfaces
        },
        mounts: s.mounts,
        latency: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::cgroup::CgroupSample;
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
            instance: 1,
            init_started: None,
            at,
            cgroup: CgroupSample {
                cpu_usage_ns: cpu_ns,
                limits,
                ..Default::default()
            },
            net_rx: 0,
            net_tx: 0,
            fs: FsUsage::default(),
            interfaces: Vec::new(),
            mounts: Vec::new(),
            runtime: Runtime::Lxc,
            project: None,
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
            .derive(vec![sample("a", t0, 0, Limits::default())], &[], HOST)
            .is_empty());
        let t1 = t0 + Duration::from_secs(1);
        let m = d.derive(
            vec![sample("a", t1, 2_000_000_000, Limits::default())],
            &[],
            HOST,
        );
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

    /// A recycled metrics vector and the samples vector are filled again in place, holding
    /// this cycle's containers only.
    #[test]
    fn recycled_vectors_are_reused_and_hold_only_this_cycle() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let two = |t| {
            vec![
                sample("a", t, 0, Limits::default()),
                sample("b", t, 0, Limits::default()),
            ]
        };
        let mut samples = two(at(0));
        assert!(d.derive_from(&mut samples, &[], HOST).is_empty());
        assert!(
            samples.is_empty() && samples.capacity() >= 2,
            "emptied, capacity kept"
        );
        samples.extend(two(at(1)));
        let m = d.derive_from(&mut samples, &[], HOST);
        assert_eq!(m.len(), 2);
        let metrics_buf = m.as_ptr();
        d.recycle(m);
        samples.push(sample("a", at(2), 1_000_000_000, Limits::default()));
        let m = d.derive_from(&mut samples, &[], HOST);
        assert_eq!(m.as_ptr(), metrics_buf, "the recycled vector");
        let ids: Vec<&str> = m.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["a"], "nothing of the cycle before");
        assert!(
            (m[0].cpu_percent - 25.0).abs() < 1e-9,
            "{}",
            m[0].cpu_percent
        );
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
            ..Limits::default()
        };
        d.derive(vec![sample("q", t0, 0, quota)], &[], HOST);
        let m = d.derive(
            vec![sample("q", t0 + Duration::from_secs(2), 900_000_000, quota)],
            &[],
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
        d.derive(vec![sample("s", t0, 0, cpuset)], &[], HOST);
        let m = d.derive(
            vec![sample(
                "s",
                t0 + Duration::from_secs(1),
                5_000_000_000,
                cpuset,
            )],
            &[],
            HOST,
        );
        assert_eq!(m[0].cpu_percent, 100.0, "clamped");
    }

    fn of(id: &str, instance: u64, at: Instant, cpu_ns: u64) -> ContainerSample {
        ContainerSample {
            instance,
            ..sample(id, at, cpu_ns, Limits::default())
        }
    }

    #[test]
    fn restart_within_one_interval_is_a_new_instance() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        let sec = |n: u64| t0 + Duration::from_secs(n);
        d.derive(vec![of("a", 1, t0, 1_000_000_000)], &[], HOST);
        let first = d.derive(vec![of("a", 1, sec(1), 1_000_000_000)], &[], HOST);
        assert_eq!(first[0].cpu_percent, 0.0);
        // Restarted under the same id; the new cgroup has already used more CPU than the old
        // one had: no CPU % may span the two.
        assert!(d
            .derive(vec![of("a", 2, sec(2), 3_000_000_000)], &[], HOST)
            .is_empty());
        let m = d.derive(vec![of("a", 2, sec(3), 5_000_000_000)], &[], HOST);
        assert!(
            (m[0].cpu_percent - 50.0).abs() < 1e-9,
            "{}",
            m[0].cpu_percent
        );
        assert_eq!(
            m[0].cpu_usage_ns, 5_000_000_000,
            "the new instance's own count"
        );
        assert!(m[0].started >= first[0].started);
        // Gone (not discovered) for a cycle: no stale baseline afterwards.
        d.derive(vec![], &[], HOST);
        assert!(d
            .derive(vec![of("a", 2, sec(4), 6_000_000_000)], &[], HOST)
            .is_empty());
    }

    #[test]
    fn a_container_left_out_of_a_cycle_keeps_its_state() {
        let mut d = Deriver::default();
        let t0 = Instant::now();
        let mut s = of("a", 7, t0, 0);
        s.net_rx = 1_071_000;
        d.derive(vec![s.clone()], &[], HOST);
        let found = Discovered::lxc("a", 7);
        // Running, but its read failed this cycle.
        assert!(d.derive(vec![], &[found], HOST).is_empty());
        s.at = t0 + Duration::from_secs(2);
        s.cgroup.cpu_usage_ns = 2_000_000_000;
        s.net_rx = 300_000;
        let m = d.derive(vec![s], &[], HOST);
        assert!(
            (m[0].cpu_percent - 25.0).abs() < 1e-9,
            "over both intervals"
        );
        assert_eq!(m[0].net_rx_bytes, 1_071_000, "held, not back to 300 000");
    }

    /// A source that goes backwards, a switch from the files to BPF and back, a rebase.
    #[test]
    fn cumulative_counters_never_go_backwards() {
        use CounterSource::{Bpf, Files};
        let mut d = Deriver::default();
        let t0 = Instant::now();
        // (net_rx, net source, io_write, io source, cpu) -> expected (net_rx, io_write, cpu).
        type Step = (
            (u64, CounterSource, u64, CounterSource, u64),
            (u64, u64, u64),
        );
        let steps: &[Step] = &[
            ((100, Files, 1000, Files, 10), (0, 0, 0)),
            ((200, Files, 1500, Files, 20), (200, 1500, 20)),
            // Backwards: held, logged once.
            ((150, Files, 1400, Files, 5), (200, 1500, 20)),
            // Growth from the lower value counts.
            ((180, Files, 1450, Files, 15), (230, 1550, 30)),
            // The BPF counts start (seeded, but by other rules): no leap, then its growth.
            ((9_000, Bpf, 99_000, Bpf, 16), (230, 1550, 31)),
            ((9_100, Bpf, 99_500, Bpf, 17), (330, 2050, 32)),
            // BPF gives up for all containers: back to the files, no jump back.
            ((190, Files, 1460, Files, 18), (330, 2050, 33)),
            ((200, Files, 1470, Files, 19), (340, 2060, 34)),
        ];
        let mut out = Vec::new();
        for (i, ((rx, ns, wr, is, cpu), _)) in steps.iter().enumerate() {
            let mut s = of("a", 1, t0 + Duration::from_secs(i as u64), *cpu);
            (s.net_rx, s.net_source) = (*rx, *ns);
            (s.cgroup.io.write, s.io_source) = (*wr, *is);
            let m = d.derive(vec![s], &[], HOST);
            out.push(m.first().map_or((0, 0, 0), |m| {
                (m.net_rx_bytes, m.io_write_bytes, m.cpu_usage_ns)
            }));
        }
        let want: Vec<_> = steps.iter().map(|s| s.1).collect();
        assert_eq!(out, want);

        // A reload that changes which devices are summed: the new sum is a new base.
        d.rebase(Rebase {
            io: true,
            net: false,
        });
        let mut s = of("a", 1, t0 + Duration::from_secs(20), 40);
        (s.net_rx, s.cgroup.io.write) = (210, 50);
        let m = d.derive(vec![s.clone()], &[], HOST);
        assert_eq!((m[0].net_rx_bytes, m[0].io_write_bytes), (350, 2060));
        s.at += Duration::from_secs(1);
        s.cgroup.io.write = 70;
        let m = d.derive(vec![s.clone()], &[], HOST);
        assert_eq!(m[0].io_write_bytes, 2080);

        // Network switched off by a reload: 0 while off; switched on again, the count goes on
        // from where it was, whatever the source's value is now.
        d.set_network(false);
        (s.at, s.net_rx) = (s.at + Duration::from_secs(1), 0);
        assert_eq!(d.derive(vec![s.clone()], &[], HOST)[0].net_rx_bytes, 0);
        d.set_network(true);
        d.rebase(Rebase {
            io: false,
            net: true,
        });
        (s.at, s.net_rx) = (s.at + Duration::from_secs(1), 5_000);
        assert_eq!(d.derive(vec![s.clone()], &[], HOST)[0].net_rx_bytes, 350);
        (s.at, s.net_rx) = (s.at + Duration::from_secs(1), 5_010);
        assert_eq!(d.derive(vec![s], &[], HOST)[0].net_rx_bytes, 360);
    }
}
