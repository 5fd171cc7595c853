//! One collection cycle: discover → sample → derive, plus the host figures the export needs.

use crate::cgroup::{Layout, LayoutError, Mode};
#[cfg(not(feature = "ebpf"))]
use crate::config::CollectorChoice;
use crate::config::Config;
use crate::derive::{Deriver, HostFacts};
use crate::discovery::{Discovery, DiscoveryError};
use crate::export::Cycle;
use crate::kfile::{self, KFile, ReadError};
use crate::procfs;
use crate::sample::{Options, Sampler};
use crate::sysfs::{self, DeviceFilter};
use chrono::Utc;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("cgroup layout: {0}")]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("host figures: {0}")]
    Host(#[from] ReadError),
    #[error("the BPF collector is not built into this binary (collector: ebpf); build it with `cargo xtask run` or use collector: auto")]
    NoBpf,
    #[error("the BPF collector cannot run (collector: ebpf): {0}")]
    Bpf(String),
}

/// Host-wide files read once per cycle, held open.
#[derive(Debug)]
struct HostFiles {
    online: KFile,
    meminfo: KFile,
    stat: KFile,
    self_status: KFile,
    last_cpu: Option<(u64, u64)>,
    buf: Vec<u8>,
}

impl HostFiles {
    fn open(root: &Path) -> Result<Self, ReadError> {
        Ok(Self {
            online: KFile::open(kfile::under(root, "/sys/devices/system/cpu/online"))?,
            meminfo: KFile::open(kfile::under(root, "/proc/meminfo"))?,
            stat: KFile::open(kfile::under(root, "/proc/stat"))?,
            // The agent's own figures come from the real /proc, whatever the root.
            self_status: KFile::open("/proc/self/status".into())?,
            last_cpu: None,
            buf: Vec::new(),
        })
    }

    fn facts(&mut self) -> Result<HostFacts, ReadError> {
        let online_text = self.online.read(&mut self.buf)?;
        let online_cpus = crate::cgroup::cpu_list_len(online_text)
            .ok_or_else(|| ReadError::parse(self.online.path(), online_text.trim()))?;
        let mem = procfs::parse_meminfo(self.meminfo.read(&mut self.buf)?)
            .ok_or_else(|| ReadError::parse(self.meminfo.path(), "no MemTotal"))?;
        Ok(HostFacts {
            online_cpus,
            mem_total: mem.mem_total,
            swap_total: mem.swap_total,
        })
    }

    /// Host CPU busy percent since the previous call (0 on the first).
    fn cpu_percent(&mut self) -> f64 {
        let Some(now) = self
            .stat
            .read(&mut self.buf)
            .ok()
            .and_then(procfs::host_cpu_times)
        else {
            return 0.0;
        };
        let pct = match self.last_cpu {
            Some((busy0, total0)) if now.1 > total0 => {
                now.0.saturating_sub(busy0) as f64 / (now.1 - total0) as f64 * 100.0
            }
            _ => 0.0,
        };
        self.last_cpu = Some(now);
        pct
    }

    fn rss(&mut self) -> u64 {
        self.self_status
            .read(&mut self.buf)
            .ok()
            .and_then(procfs::self_rss)
            .unwrap_or(0)
    }
}

pub struct Collector {
    discovery: Discovery,
    sampler: Sampler,
    deriver: Deriver,
    host: HostFiles,
    #[cfg(feature = "ebpf")]
    kernel: Option<kernel::KernelCounters>,
    subsecond: bool,
    root: std::path::PathBuf,
}

/// (network, block I/O): whether the file readers supply each every cycle.
#[cfg(feature = "ebpf")]
fn from_files(kernel: Option<&kernel::KernelCounters>) -> (bool, bool) {
    kernel.map_or((true, true), |k| (false, !k.counts_io()))
}

/// Which counters the file readers supply every cycle: (network, block I/O).
fn sample_options(cfg: &Config, (net_files, io_files): (bool, bool)) -> Options {
    let m = &cfg.monitoring;
    Options {
        swap: m.enable_swap,
        network: m.enable_network,
        filesystem: m.enable_filesystem,
        workers: cfg.workers(),
        retry_limit: m.retry_limit,
        retry_delay: m.retry_delay,
        net_files,
        io_files,
    }
}

impl Collector {
    pub fn new(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        let m = &cfg.monitoring;
        let layout = Layout::detect(root)?;
        let hierarchy = layout
            .primary()
            .ok_or_else(|| LayoutError::NoControllers(root.to_path_buf()))?
            .to_path_buf();
        tracing::info!(mode = ?layout.mode(), hierarchy = %hierarchy.display(), "cgroup layout");
        if layout.mode() == Some(Mode::V1) {
            v1_io_accounting(root, &layout, cfg);
        }
        let devices = DeviceFilter::new(root, &m.excluded_devices);
        #[cfg(feature = "ebpf")]
        let kernel = kernel::KernelCounters::choose(
            m.collector,
            root,
            &layout,
            &m.excluded_devices,
            m.enable_network,
        )?;
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
            deriver: Deriver::default(),
            host: HostFiles::open(root)?,
            #[cfg(feature = "ebpf")]
            kernel,
            subsecond: m.check_interval < std::time::Duration::from_secs(1),
            root: root.to_path_buf(),
        })
    }

    /// Applies a reloaded configuration for the next cycle, keeping what must survive: CPU
    /// baselines, discovery, the BPF programs and their counts. The collector choice itself
    /// takes effect on restart.
    pub fn reconfigure(&mut self, old: &Config, new: &Config) {
        let m = &new.monitoring;
        self.sampler = Sampler::new(
            &self.root,
            self.sampler.layout().clone(),
            DeviceFilter::new(&self.root, &m.excluded_devices),
            sample_options(new, self.files_supply()),
        );
        self.subsecond = m.check_interval < std::time::Duration::from_secs(1);
        #[cfg(feature = "ebpf")]
        if let Some(kernel) = &mut self.kernel {
            kernel.reconfigure(m);
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

    /// `ebpf` when network and I/O bytes come from the BPF programs, `files` otherwise.
    pub fn collector_name(&self) -> &'static str {
        #[cfg(feature = "ebpf")]
        if self.kernel.is_some() {
            return "ebpf";
        }
        "files"
    }

    /// Runs one cycle. Containers seen for the first time set their baseline and are exported
    /// from the next cycle on.
    pub fn cycle(&mut self) -> Result<Cycle, CollectError> {
        let started = Utc::now();
        let discovered = self.discovery.scan()?;
        let host = self.host.facts()?;
        #[allow(unused_mut)]
        let mut sampled = self.sampler.sample(&discovered);
        #[cfg(feature = "ebpf")]
        if let Some(kernel) = &mut self.kernel {
            if let Err(e) = kernel.apply(&discovered, &mut sampled.containers) {
                tracing::warn!(error = %e, "the BPF collector failed; network and I/O figures come from the file readers from now on");
                self.kernel = None;
                self.sampler.set_net_io_files();
                sampled = self.sampler.sample(&discovered);
            }
        }
        let metrics = self.deriver.derive(&sampled.containers, host);
        let ended = Utc::now();
        tracing::debug!(
            duration_us = (ended - started).num_microseconds().unwrap_or(0),
            found = discovered.len(),
            exported = metrics.len(),
            skipped = sampled.skipped,
            failed = sampled.failed,
            "cycle"
        );
        Ok(Cycle {
            started,
            ended,
            metrics,
            total_containers: discovered.len(),
            failed_containers: sampled.failed,
            collector: self.collector_name(),
            host_cpu_percent: self.host.cpu_percent(),
            agent_rss_bytes: self.host.rss(),
            subsecond: self.subsecond,
        })
    }
}

/// cgroup v1 on kernels 6.9 and later counts block I/O per cgroup only once a throttle rule
/// exists on the disk. An unlimited rule written at the root switches counting on for that
/// disk until reboot and limits nothing. Without it every I/O figure would be a silent 0.
fn v1_io_accounting(root: &Path, layout: &Layout, cfg: &Config) {
    let Some(blkio) = layout.controller("blkio") else {
        return;
    };
    if procfs::kernel_version(root).is_some_and(|v| v < (6, 9)) {
        return;
    }
    if !cfg.monitoring.enable_v1_io_accounting {
        tracing::warn!("cgroup v1 on kernel >= 6.9 counts block I/O only for disks with a throttle rule, and enable_v1_io_accounting is false: I/O figures read 0 (see README)");
        return;
    }
    let disks = match sysfs::whole_disks(root) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list disks: cgroup v1 I/O figures may read 0");
            return;
        }
    };
    let rule_file = blkio.join("blkio.throttle.write_bps_device");
    let filter = DeviceFilter::new(root, &cfg.monitoring.excluded_devices);
    let mut enabled = Vec::new();
    for sysfs::Disk {
        name,
        dev: (major, minor),
    } in disks
    {
        if filter.excludes_name(&name) {
            continue;
        }
        match std::fs::write(&rule_file, format!("{major}:{minor} 0\n")) {
            Ok(()) => enabled.push(name),
            Err(e) => tracing::debug!(disk = %name, error = %e, "no throttle rule possible"),
        }
    }
    if enabled.is_empty() {
        tracing::warn!(
            "could not switch on cgroup v1 I/O counting for any disk: I/O figures may read 0"
        );
    } else {
        tracing::info!(disks = ?enabled, "switched on cgroup v1 block I/O counting (unlimited throttle rule; see README)");
    }
}

/// Network and block I/O bytes counted in the kernel by the BPF programs.
#[cfg(feature = "ebpf")]
mod kernel {
    use super::CollectError;
    use crate::bpf::{self, BpfCollector, BpfError, BpfOptions, Counters};
    use crate::cgroup::Layout;
    use crate::config::CollectorChoice;
    use crate::discovery::Discovered;
    use crate::sample::ContainerSample;
    use std::collections::{HashMap, HashSet};
    use std::path::{Path, PathBuf};

    pub struct KernelCounters {
        bpf: BpfCollector,
        unified: PathBuf,
        /// Container id to the cgroup id its counters are kept under.
        ids: HashMap<String, u64>,
        /// `enable_network`: when false network bytes stay 0, as with the file readers.
        network: bool,
    }

    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;

    /// Without these the kernel refuses the programs, and libraries then report confusing
    /// follow-on errors: say plainly what is missing instead.
    fn check_capabilities() -> Result<(), String> {
        let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .ok_or("no CapEff in /proc/self/status")?;
        let has = |cap: u32| eff & (1u64 << cap) != 0;
        if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)) {
            Ok(())
        } else {
            Err(format!(
                "missing capabilities: loading and attaching needs CAP_SYS_ADMIN, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (effective set {eff:#x})"
            ))
        }
    }

    impl KernelCounters {
        /// Loads the programs as `choice` says: `auto` falls back to the file readers with one
        /// warning carrying the kernel's reason, `ebpf` fails with it.
        pub fn choose(
            choice: CollectorChoice,
            root: &Path,
            layout: &Layout,
            excluded: &[String],
            network: bool,
        ) -> Result<Option<Self>, CollectError> {
            if choice == CollectorChoice::Files {
                tracing::info!("collector: files (as configured)");
                return Ok(None);
            }
            match Self::load(root, layout, excluded, network) {
                Ok(k) => {
                    tracing::info!(io = ?k.bpf.io_mode(), pins = %k.bpf.pin_dir().display(), "collector: ebpf");
                    if let bpf::IoMode::Files(reason) = k.bpf.io_mode() {
                        tracing::warn!(%reason, "the kernel refused the block I/O programs: network bytes come from BPF, block I/O from the file readers");
                    }
                    Ok(Some(k))
                }
                Err(reason) if choice == CollectorChoice::Auto => {
                    tracing::warn!(%reason, "collector: files (BPF unavailable)");
                    Ok(None)
                }
                Err(reason) => Err(CollectError::Bpf(reason)),
            }
        }

        /// Loading parses the kernel's BTF (several MiB, three times: the loader, the BTF
        /// programs, the offsets); glibc keeps the freed pages unless asked to return them.
        fn release_freed_heap() {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free heap pages to the kernel.
            unsafe {
                libc::malloc_trim(0);
            }
        }

        fn load(
            root: &Path,
            layout: &Layout,
            excluded: &[String],
            network: bool,
        ) -> Result<Self, String> {
            if root != Path::new("/") {
                return Err("the BPF programs see the real kernel, not a --root tree".into());
            }
            check_capabilities()?;
            let unified = layout
                .unified
                .clone()
                .ok_or("no cgroup v2 hierarchy is mounted to attach to")?;
            let opts = BpfOptions {
                excluded_devices: bpf::excluded_dev_ts(Path::new("/sys"), excluded),
                ..BpfOptions::default()
            };
            let bpf = BpfCollector::load(&opts).map_err(|e| e.to_string())?;
            Self::release_freed_heap();
            Ok(Self {
                bpf,
                unified,
                ids: HashMap::new(),
                network,
            })
        }

        /// False when the kernel took the network programs but refused the block ones.
        pub fn counts_io(&self) -> bool {
            self.bpf.io_mode().counts_io()
        }

        pub fn reconfigure(&mut self, m: &crate::config::MonitoringConfig) {
            self.network = m.enable_network;
            let devs = bpf::excluded_dev_ts(Path::new("/sys"), &m.excluded_devices);
            if let Err(e) = self.bpf.set_excluded_devices(&devs) {
                tracing::warn!(error = %e, "cannot update the excluded devices of the BPF programs");
            }
        }

        /// Tracks new (or restarted) containers, seeded with what the files counted so far,
        /// forgets stopped ones, and replaces the samples' network and I/O bytes with the
        /// kernel's counts. Samples of containers that vanished before they could be tracked
        /// are dropped.
        pub fn apply(
            &mut self,
            discovered: &[Discovered],
            samples: &mut Vec<ContainerSample>,
        ) -> Result<(), BpfError> {
            let by_id: HashMap<&str, &Discovered> =
                discovered.iter().map(|d| (d.id.as_str(), d)).collect();
            let mut vanished = HashSet::new();
            for s in samples.iter() {
                if !s.fresh && self.ids.contains_key(&s.id) {
                    continue;
                }
                let Some(d) = by_id.get(s.id.as_str()) else {
                    continue;
                };
                let seed = Counters {
                    net_rx: s.net_rx,
                    net_tx: s.net_tx,
                    io_read: s.cgroup.io.read,
                    io_write: s.cgroup.io.write,
                };
                match self.bpf.track_seeded(&self.unified.join(&d.rel), seed) {
                    Ok(id) => {
                        self.ids.insert(s.id.clone(), id);
                    }
                    Err(BpfError::Cgroup { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        vanished.insert(s.id.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
            self.ids.retain(|id, _| by_id.contains_key(id.as_str()));
            let keep: HashSet<u64> = self.ids.values().copied().collect();
            for (id, e) in self.bpf.retain(&keep) {
                tracing::warn!(cgroup_id = id, error = %e, "cannot detach from a stopped container");
            }
            self.bpf.refresh()?;
            samples.retain(|s| !vanished.contains(&s.id));
            for s in samples.iter_mut() {
                let Some(c) = self.ids.get(&s.id).and_then(|id| self.bpf.counters(*id)) else {
                    continue;
                };
                if self.network {
                    s.net_rx = c.net_rx;
                    s.net_tx = c.net_tx;
                }
                if self.counts_io() {
                    s.cgroup.io.read = c.io_read;
                    s.cgroup.io.write = c.io_write;
                }
            }
            Ok(())
        }
    }
}
