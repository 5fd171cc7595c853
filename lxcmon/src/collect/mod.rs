//! Collection: every cycle, [`discovery`] finds the running containers, [`sample`] reads their
//! raw counters through the readers, and the BPF collector ([`bpf`], feature `ebpf`) supplies
//! network and block I/O bytes counted in the kernel. What a cycle collected ([`Collected`])
//! goes on to [`crate::derive`]; nothing here looks further down the flow.

#[cfg(feature = "ebpf")]
pub mod bpf;
pub mod discovery;
pub mod host;
mod init;
pub mod latency;
pub mod sample;
mod v1_io;

#[cfg(not(feature = "ebpf"))]
use crate::config::CollectorChoice;
use crate::config::Config;
use crate::readers::cgroup::details::DetailOptions;
use crate::readers::cgroup::{Layout, LayoutError, Mode};
use crate::readers::kfile::ReadError;
use crate::readers::sysfs::DeviceFilter;
use chrono::{DateTime, Utc};
use discovery::Discovered;
use discovery::{Discovery, DiscoveryError};
use host::{HostFacts, HostFiles};
use sample::{ContainerSample, Options, Sampler};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cgroup layout")]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("host figures")]
    Host(#[from] ReadError),
    #[error("the BPF collector is not built into this binary (collector: ebpf); build it with `cargo xtask run` or use collector: auto")]
    NoBpf,
    #[cfg(feature = "ebpf")]
    #[error("the BPF collector cannot run (collector: ebpf)")]
    Bpf(#[source] bpf::counters::Unavailable),
}

#[cfg(feature = "ebpf")]
pub use bpf::counters::Purpose;

/// What the collector is for: the daemon keeps its kernel state pinned across restarts; a
/// diagnostic run (`--once`) leaves nothing behind.
#[cfg(not(feature = "ebpf"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Daemon,
    Once,
}

/// `lxcmon --cleanup-bpf`: removes the pinned BPF state of every layout version (and of a
/// configured `bpf_pin_dir`); refused for a directory an agent still holds. Returns what was
/// removed.
#[cfg(feature = "ebpf")]
pub fn cleanup_bpf(extra: Option<&Path>) -> Result<Vec<std::path::PathBuf>, bpf::BpfError> {
    bpf::cleanup_all(extra)
}

/// `lxcmon --cleanup-bpf` in a binary without the BPF collector: removes what a BPF-enabled
/// build pinned.
#[cfg(not(feature = "ebpf"))]
pub fn cleanup_bpf(extra: Option<&Path>) -> Result<Vec<std::path::PathBuf>, std::io::Error> {
    let mut removed = Vec::new();
    for dir in [Some(Path::new(lxcmon_common::PIN_ROOT)), extra]
        .into_iter()
        .flatten()
    {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => removed.push(dir.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Everything one cycle collected, raw: the input of [`crate::derive`].
#[derive(Debug)]
pub struct Collected {
    pub started: DateTime<Utc>,
    /// Every container found running, sampled or not.
    pub discovered: Vec<Discovered>,
    pub samples: Vec<ContainerSample>,
    pub host: HostFacts,
    /// Containers that vanished or were not yet running at read time.
    pub skipped: usize,
    /// Containers left out after their retries failed.
    pub failed: usize,
    pub collector: &'static str,
    /// The BPF collector's own view: containers it cannot count, read from files instead, and
    /// its per-container tracking failures since start (both 0 without it).
    pub bpf_fallback: BpfFallback,
    /// Host-wide CPU busy percent over the last interval.
    pub host_cpu_percent: f64,
    pub agent_rss_bytes: u64,
    /// Timestamps carry sub-second digits (intervals under a second).
    pub subsecond: bool,
    /// Latency figures by container id (BPF collector only; absent containers have none).
    pub latency: std::collections::HashMap<String, Box<latency::Latency>>,
}

/// Containers the BPF programs cannot count (each runs on the file readers alone), now and
/// since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfFallback {
    pub containers: usize,
    pub failures_total: u64,
}

pub struct Collector {
    discovery: Discovery,
    sampler: Sampler,
    host: HostFiles,
    #[cfg(feature = "ebpf")]
    kernel: Option<bpf::counters::KernelCounters>,
    subsecond: bool,
    root: std::path::PathBuf,
    /// Containers mounting each filesystem (`major:minor`) this cycle, kept for its capacity.
    dev_users: HashMap<(u32, u32), u32>,
}

/// Marks `shared` each filesystem that more than one container mounts: its figures are not
/// one container's. `users` is scratch space.
fn mark_shared_mounts(samples: &mut [ContainerSample], users: &mut HashMap<(u32, u32), u32>) {
    users.clear();
    for s in samples.iter() {
        for (i, m) in s.mounts.iter().enumerate() {
            // Once per container: two subdirectories of one filesystem are one user.
            if !s.mounts[..i].iter().any(|o| o.dev == m.dev) {
                *users.entry(m.dev).or_default() += 1;
            }
        }
    }
    for m in samples.iter_mut().flat_map(|s| s.mounts.iter_mut()) {
        if users.get(&m.dev).is_some_and(|&n| n > 1) {
            m.shared = true;
        }
    }
}

/// (network, block I/O): whether the file readers supply each every cycle.
#[cfg(feature = "ebpf")]
fn from_files(kernel: Option<&bpf::counters::KernelCounters>) -> (bool, bool) {
    kernel.map_or((true, true), |k| (false, !k.counts_io()))
}

/// Which counters the file readers supply every cycle: (network, block I/O).
fn sample_options(cfg: &Config, (net_files, io_files): (bool, bool)) -> Options {
    let m = &cfg.monitoring;
    Options {
        swap: m.enable_swap,
        network: m.enable_network,
        filesystem: m.enable_filesystem,
        per_interface: m.enable_per_interface,
        per_mount: m.enable_per_mount,
        details: DetailOptions {
            pressure: m.enable_pressure,
            throttling: m.enable_throttling,
            memory_details: m.enable_memory_details,
            per_device: m.enable_per_device,
        },
        workers: cfg.workers(),
        retry_limit: m.retry_limit,
        retry_delay: m.retry_delay,
        net_files,
        io_files,
    }
}

impl Collector {
    /// The daemon's collector.
    pub fn new(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        Self::build(cfg, root, Purpose::Daemon)
    }

    /// A collector for a diagnostic run (`--once`) that leaves no kernel state: BPF maps and
    /// links held by this process only (its counts start from the file readers'), no cgroup v1
    /// throttle rule written.
    pub fn once(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        Self::build(cfg, root, Purpose::Once)
    }

    fn build(cfg: &Config, root: &Path, purpose: Purpose) -> Result<Self, CollectError> {
        let m = &cfg.monitoring;
        let layout = Layout::detect(root)?;
        let hierarchy = layout
            .primary()
            .ok_or_else(|| LayoutError::NoControllers(root.to_path_buf()))?
            .to_path_buf();
        tracing::info!(mode = ?layout.mode(), hierarchy = %hierarchy.display(), "cgroup layout");
        if layout.mode() == Some(Mode::V1) {
            v1_io::v1_io_accounting(root, &layout, cfg, purpose);
        }
        let devices = DeviceFilter::new(root, &m.excluded_devices);
        #[cfg(feature = "ebpf")]
        let kernel = bpf::counters::KernelCounters::choose(m.collector, root, &layout, m, purpose)
            .map_err(CollectError::Bpf)?;
        #[cfg(not(feature = "ebpf"))]
        match m.collector {
            CollectorChoice::Ebpf => return Err(CollectError::NoBpf),
            CollectorChoice::Auto => {
                tracing::info!("collector: files (this binary has no BPF programs built in)")
            }
            CollectorChoice::Files => tracing::info!("collector: files (as configured)"),
        }
        #[cfg(feature = "ebpf")]
        let files = from_files(kernel.as_ref());
        #[cfg(not(feature = "ebpf"))]
        let files = (true, true);
        Ok(Self {
            discovery: Discovery::new(root, &hierarchy),
            sampler: Sampler::new(root, layout, devices, sample_options(cfg, files)),
            host: HostFiles::open(root)?,
            #[cfg(feature = "ebpf")]
            kernel,
            subsecond: m.check_interval < std::time::Duration::from_secs(1),
            root: root.to_path_buf(),
            dev_users: HashMap::new(),
        })
    }

    /// Applies a reloaded configuration for the next cycle, keeping what must survive: each
    /// container instance's files and state (the bytes of interfaces that have gone),
    /// discovery, the BPF programs and their counts. The collector choice itself takes effect
    /// on restart.
    pub fn reconfigure(&mut self, old: &Config, new: &Config) {
        let m = &new.monitoring;
        self.sampler.reconfigure(
            DeviceFilter::new(&self.root, &m.excluded_devices),
            sample_options(new, self.files_supply()),
        );
        self.subsecond = m.check_interval < std::time::Duration::from_secs(1);
        #[cfg(feature = "ebpf")]
        if let Some(kernel) = &mut self.kernel {
            kernel.reconfigure(m);
            self.sampler.set_files_for(kernel.untracked());
        }
        if old.monitoring.collector != m.collector {
            tracing::warn!("monitoring.collector changes take effect when the agent restarts");
        }
    }

    /// (network, block I/O): whether the file readers supply each every cycle.
    fn files_supply(&self) -> (bool, bool) {
        #[cfg(feature = "ebpf")]
        let files = from_files(self.kernel.as_ref());
        #[cfg(not(feature = "ebpf"))]
        let files = (true, true);
        files
    }

    fn bpf_fallback(&self) -> BpfFallback {
        #[cfg(feature = "ebpf")]
        if let Some(k) = &self.kernel {
            return BpfFallback {
                containers: k.untracked().len(),
                failures_total: k.failures(),
            };
        }
        BpfFallback::default()
    }

    /// `ebpf` when network and I/O bytes come from the BPF programs, `files` otherwise.
    pub fn collector_name(&self) -> &'static str {
        #[cfg(feature = "ebpf")]
        if self.kernel.is_some() {
            return "ebpf";
        }
        "files"
    }

    /// Takes back what derive left of a cycle's collection: its vectors are filled again by
    /// the next cycle (see [`Sampler::recycle`]).
    pub fn recycle(&mut self, c: Collected) {
        let Collected {
            samples, latency, ..
        } = c;
        self.sampler.recycle(samples);
        #[cfg(feature = "ebpf")]
        if let Some(kernel) = &mut self.kernel {
            kernel.recycle_latency(latency);
        }
        #[cfg(not(feature = "ebpf"))]
        drop(latency);
    }

    /// Collects one cycle: discovery, the host's figures and every container's raw counters.
    pub fn collect(&mut self) -> Result<Collected, CollectError> {
        let started = Utc::now();
        let discovered = self.discovery.scan()?;
        let host = self.host.facts()?;
        #[allow(unused_mut)]
        let mut sampled = self.sampler.sample(&discovered);
        #[cfg(feature = "ebpf")]
        if let Some(kernel) = &mut self.kernel {
            match kernel.apply(&discovered, &mut sampled.containers) {
                // Containers the programs cannot count are read from files from now on.
                Ok(()) => self.sampler.set_files_for(kernel.untracked()),
                Err(e) => {
                    // The whole collector failed: the file readers take over for everyone
                    // (the samples say so; derive keeps the counters continuous).
                    tracing::warn!(error = %crate::logging::Chain(&e), "the BPF collector failed; network and I/O figures come from the file readers from now on");
                    self.kernel = None;
                    self.sampler.set_net_io_files();
                    sampled = self.sampler.sample(&discovered);
                }
            }
        }
        mark_shared_mounts(&mut sampled.containers, &mut self.dev_users);
        #[cfg(feature = "ebpf")]
        let latency = self
            .kernel
            .as_mut()
            .map(|k| k.take_latency())
            .unwrap_or_default();
        #[cfg(not(feature = "ebpf"))]
        let latency = Default::default();
        Ok(Collected {
            latency,
            started,
            discovered,
            samples: sampled.containers,
            host,
            skipped: sampled.skipped,
            failed: sampled.failed,
            collector: self.collector_name(),
            bpf_fallback: self.bpf_fallback(),
            host_cpu_percent: self.host.cpu_percent(),
            agent_rss_bytes: self.host.rss(),
            subsecond: self.subsecond,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_mounts(id: &str, mounts: &[((u32, u32), bool)]) -> ContainerSample {
        ContainerSample {
            id: id.into(),
            name: id.into(),
            instance: 1,
            init_started: None,
            at: std::time::Instant::now(),
            cgroup: Default::default(),
            net_rx: 0,
            net_tx: 0,
            fs: Default::default(),
            interfaces: Vec::new(),
            mounts: mounts
                .iter()
                .map(|&(dev, shared)| crate::readers::mounts::MountUsage {
                    dev,
                    shared,
                    ..Default::default()
                })
                .collect(),
            runtime: discovery::Runtime::Lxc,
            project: None,
            fresh: false,
            net_source: Default::default(),
            io_source: Default::default(),
        }
    }

    #[test]
    fn a_filesystem_two_containers_mount_is_shared() {
        let mut samples = vec![
            // Its own disk, and one also in b.
            with_mounts("a", &[((253, 1), false), ((253, 9), false)]),
            with_mounts("b", &[((253, 2), false), ((253, 9), false)]),
            // Two subdirectories of one filesystem (already shared) in one container only.
            with_mounts("c", &[((8, 1), true), ((8, 1), true), ((253, 3), false)]),
        ];
        let mut users = HashMap::new();
        mark_shared_mounts(&mut samples, &mut users);
        let shared: Vec<Vec<bool>> = samples
            .iter()
            .map(|s| s.mounts.iter().map(|m| m.shared).collect())
            .collect();
        assert_eq!(
            shared,
            [
                vec![false, true],
                vec![false, true],
                vec![true, true, false]
            ]
        );
        // The next cycle starts from no users: b stopped, a's second disk is its own now.
        samples.remove(1);
        for m in samples.iter_mut().flat_map(|s| s.mounts.iter_mut()) {
            m.shared = false;
        }
        mark_shared_mounts(&mut samples, &mut users);
        assert!(!samples[0].mounts[1].shared);
    }

    #[test]
    fn an_error_prints_its_cause_once() {
        let io = std::io::Error::from_raw_os_error(21);
        let e = CollectError::Host(ReadError::io(Path::new("/proc/stat"), io));
        let text = crate::logging::Chain(&e).to_string();
        assert_eq!(text.matches("os error 21").count(), 1, "{text}");
        assert!(text.starts_with("host figures: /proc/stat: "), "{text}");
    }
}
