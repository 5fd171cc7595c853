//! One collection cycle: discover → sample → derive, plus the host figures the export needs.

use crate::cgroup::{Layout, LayoutError, Mode};
use crate::config::{CollectorChoice, Config};
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
    #[error("the BPF collector is not built into this binary (collector: ebpf); build with `cargo xtask build-ebpf` or use collector: auto")]
    NoBpf,
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
    collector_name: &'static str,
    subsecond: bool,
}

impl Collector {
    pub fn new(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        let m = &cfg.monitoring;
        let collector_name = match m.collector {
            CollectorChoice::Ebpf => return Err(CollectError::NoBpf),
            CollectorChoice::Auto => {
                tracing::info!("collector: files (this binary has no BPF programs built in)");
                "files"
            }
            CollectorChoice::Files => {
                tracing::info!("collector: files (as configured)");
                "files"
            }
        };
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
        let options = Options {
            swap: m.enable_swap,
            network: m.enable_network,
            filesystem: m.enable_filesystem,
            workers: cfg.workers(),
            retry_limit: m.retry_limit,
            retry_delay: m.retry_delay,
        };
        Ok(Self {
            discovery: Discovery::new(root, &hierarchy),
            sampler: Sampler::new(root, layout, devices, options),
            deriver: Deriver::default(),
            host: HostFiles::open(root)?,
            collector_name,
            subsecond: m.check_interval < std::time::Duration::from_secs(1),
        })
    }

    pub fn collector_name(&self) -> &'static str {
        self.collector_name
    }

    /// Runs one cycle. Containers seen for the first time set their baseline and are exported
    /// from the next cycle on.
    pub fn cycle(&mut self) -> Result<Cycle, CollectError> {
        let started = Utc::now();
        let discovered = self.discovery.scan()?;
        let host = self.host.facts()?;
        let sampled = self.sampler.sample(&discovered);
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
            collector: self.collector_name,
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
