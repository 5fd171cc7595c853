//! The BPF collector as the cycle sees it: chooses BPF or the file readers at start, tracks
//! each discovered container, and overwrites the file readers' network and block I/O bytes with
//! the kernel's counts.

use super::{self as bpf, BpfCollector, BpfError, BpfOptions, Counters};
use crate::collect::discovery::Discovered;
use crate::collect::sample::{ContainerSample, CounterSource};
use crate::collect::CollectError;
use crate::config::CollectorChoice;
use crate::readers::cgroup::Layout;
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
                s.net_source = CounterSource::Bpf;
            }
            if self.counts_io() {
                s.cgroup.io.read = c.io_read;
                s.cgroup.io.write = c.io_write;
                s.io_source = CounterSource::Bpf;
            }
        }
        Ok(())
    }
}
