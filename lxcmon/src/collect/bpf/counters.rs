//! The BPF collector as the cycle sees it: chooses BPF or the file readers at start, tracks
//! each discovered container, and overwrites the file readers' network and block I/O bytes with
//! the kernel's counts. A container that cannot be tracked runs on the file readers alone; only
//! a failure of the whole collector (returned by [`KernelCounters::apply`]) stops it for all.

use super::{cleanup_pinned, default_pin_dir, kernel_dev_t, BpfCollector, BpfError, BpfOptions};
use super::{Counters, IoMode, LatencyMode};
use crate::collect::discovery::Discovered;
use crate::collect::latency::{Histogram, Latency, Monotonic, MonotonicCount};
use crate::collect::sample::{ContainerSample, CounterSource};
use crate::config::{CollectorChoice, MonitoringConfig};
use crate::logging::Chain;
use crate::readers::cgroup::Layout;
use crate::readers::parse::parse_dev;
use crate::readers::sysfs::DeviceFilter;
use rustix::thread::CapabilitySet;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why the BPF collector cannot run at all.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("the BPF programs see the real kernel, not a --root tree")]
    FixtureRoot,
    #[error("missing capabilities: loading and attaching needs CAP_SYS_ADMIN, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (effective set {0:#x})")]
    Capabilities(u64),
    #[error("cannot read this process's capabilities")]
    CapGet(#[source] std::io::Error),
    #[error("no cgroup v2 hierarchy is mounted to attach to")]
    NoUnified,
    #[error(transparent)]
    Bpf(#[from] BpfError),
}

/// What the collector is for: the daemon keeps its kernel state pinned across restarts; a
/// diagnostic run (`--once`) leaves nothing behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Daemon,
    Once,
}

pub struct KernelCounters {
    bpf: BpfCollector,
    unified: PathBuf,
    /// Container id to the cgroup id its counters are kept under.
    ids: HashMap<String, u64>,
    /// Containers the kernel side cannot count (warned once): the file readers count them.
    untracked: HashSet<String>,
    /// Per-container tracking failures since start (each try: a new or restarted container).
    failures: u64,
    /// `enable_network`: when false network bytes stay 0, as with the file readers.
    network: bool,
    /// Run-queue wait per container: kept monotonic per instance (cgroup id), and this
    /// cycle's figures, handed on by [`Self::take_latency`].
    runqueue: HashMap<String, Monotonic>,
    /// Block I/O latency per container (reads, writes), monotonic per instance.
    io_latency: HashMap<String, [Monotonic; 2]>,
    /// TCP retransmitted segments per container, monotonic per instance.
    retrans: HashMap<String, MonotonicCount>,

    /// Boxed: a container's figures are 1.4 KiB, moved from here into its metrics, which
    /// are kept two cycles at a time.
    latency: HashMap<String, Box<Latency>>,
    /// `excluded_devices` as a filter (`None` until a configuration gives it; kept across
    /// listings for its per-device name cache), the `dev_t`s the programs skip, and when the
    /// block devices were last listed: a device that appears later (a new loop device or LVM
    /// volume) is excluded within [`DEVICES_TTL`], as the file readers exclude it from its
    /// first `io.stat` line.
    excluded_filter: Option<DeviceFilter>,
    excluded_set: Vec<u32>,
    devices_listed: Option<Instant>,
}

/// How often the block devices are listed again for the excluded set (a `/sys/dev/block`
/// directory read; a new device's name is resolved once).
const DEVICES_TTL: Duration = Duration::from_secs(5);

/// Without these the kernel refuses the programs, and libraries then report confusing
/// follow-on errors: say plainly what is missing instead.
fn check_capabilities() -> Result<(), Unavailable> {
    let eff = rustix::thread::capabilities(None)
        .map_err(|e| Unavailable::CapGet(e.into()))?
        .effective;
    let bpf_set = CapabilitySet::BPF | CapabilitySet::PERFMON | CapabilitySet::NET_ADMIN;
    if eff.contains(CapabilitySet::SYS_ADMIN) || eff.contains(bpf_set) {
        Ok(())
    } else {
        Err(Unavailable::Capabilities(eff.bits()))
    }
}

/// The kernel `dev_t` of every block device (and partition) the filter excludes, from the
/// `maj:min` names of `/sys/dev/block`.
fn excluded_dev_ts(filter: &DeviceFilter) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/dev/block") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .flatten()
        .filter_map(|e| parse_dev(e.file_name().to_str()?))
        .filter(|dev| filter.is_excluded(*dev))
        .map(|(major, minor)| kernel_dev_t(major, minor))
        .collect();
    out.sort_unstable();
    out
}

/// The configured pin directory.
fn pin_dir(m: &MonitoringConfig) -> PathBuf {
    m.bpf_pin_dir.clone().unwrap_or_else(default_pin_dir)
}

/// `collector: files`: what an earlier BPF run pinned would go on counting (and running on
/// every container's packets) for nobody. The daemon removes it unless another agent holds it.
fn release_pins(pin_dir: &Path, purpose: Purpose) {
    if !pin_dir.exists() {
        return;
    }
    if purpose == Purpose::Once {
        tracing::info!(pins = %pin_dir.display(), "BPF pins of an earlier run are attached; `lxcmon --cleanup-bpf` removes them");
        return;
    }
    match cleanup_pinned(pin_dir) {
        Ok(_) => {
            tracing::info!(pins = %pin_dir.display(), "collector: files: removed the BPF programs an earlier run left attached")
        }
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "collector: files: BPF pins of another run stay attached (`lxcmon --cleanup-bpf` removes them once it stopped)")
        }
    }
}

/// A container's state in `map`, made on its first cycle: the id is copied only then, not
/// every cycle as `entry` would.
fn state<'a, T: Default>(map: &'a mut HashMap<String, T>, id: &str) -> &'a mut T {
    if !map.contains_key(id) {
        map.insert(id.to_owned(), T::default());
    }
    map.get_mut(id).expect("inserted above when missing")
}

impl KernelCounters {
    /// Each counted container's run-queue and block I/O latency histograms, monotonic per
    /// instance, with their growth over the interval.
    fn collect_latency(&mut self) {
        self.latency.clear();
        // The map is handed on each cycle: sized at once, not grown by rehashing.
        self.latency.reserve(self.ids.len());
        self.runqueue.retain(|id, _| self.ids.contains_key(id));
        self.io_latency.retain(|id, _| self.ids.contains_key(id));
        self.retrans.retain(|id, _| self.ids.contains_key(id));
        for (id, cgroup_id) in &self.ids {
            let mut l = Latency::default();
            if let Some(raw) = self.bpf.runqueue_hist(*cgroup_id) {
                let raw = Histogram::from_buckets(&raw.buckets, raw.sum_ns);
                let (cumulative, interval) = state(&mut self.runqueue, id).advance(*cgroup_id, raw);
                l.runqueue = Some(cumulative);
                l.runqueue_interval = interval;
            }
            if let Some([read, write]) = self.bpf.io_latency_hists(*cgroup_id) {
                let mono = state(&mut self.io_latency, id);
                let (r, ri) = mono[0].advance(
                    *cgroup_id,
                    Histogram::from_buckets(&read.buckets, read.sum_ns),
                );
                let (w, wi) = mono[1].advance(
                    *cgroup_id,
                    Histogram::from_buckets(&write.buckets, write.sum_ns),
                );
                (l.io_read, l.io_read_interval) = (Some(r), ri);
                (l.io_write, l.io_write_interval) = (Some(w), wi);
            }
            if let Some(raw) = self.bpf.tcp_retransmitted(*cgroup_id) {
                l.tcp_retransmits = Some(state(&mut self.retrans, id).advance(*cgroup_id, raw));
            }
            if l != Latency::default() {
                self.latency.insert(id.clone(), Box::new(l));
            }
        }
    }

    /// The collector itself (tests: in-flight entries, rare conditions).
    pub fn collector(&self) -> &BpfCollector {
        &self.bpf
    }

    /// Loads the programs as `choice` says: `auto` falls back to the file readers with one
    /// warning carrying the kernel's reason, `ebpf` fails with it.
    pub fn choose(
        choice: CollectorChoice,
        root: &Path,
        layout: &Layout,
        m: &MonitoringConfig,
        purpose: Purpose,
    ) -> Result<Option<Self>, Unavailable> {
        if choice == CollectorChoice::Files {
            tracing::info!("collector: files (as configured)");
            if root == Path::new("/") {
                release_pins(&pin_dir(m), purpose);
            }
            return Ok(None);
        }
        match Self::load(root, layout, m, purpose) {
            Ok(k) => {
                tracing::info!(io = ?k.bpf.io_mode(), pins = ?k.bpf.pin_dir(), "collector: ebpf");
                if let IoMode::Files(reason) = k.bpf.io_mode() {
                    tracing::warn!(%reason, "the kernel refused the block I/O programs: network bytes come from BPF, block I/O from the file readers");
                }
                if let super::SkbSlot::Walk(reason) = k.bpf.skb_slot() {
                    tracing::warn!(%reason, "network programs: the container's slot is not in cgroup storage, every packet walks the tracked cgroups (slower, same counts)");
                }
                k.log_runqueue();
                k.log_io_latency();
                k.log_tcp_retransmits();
                Ok(Some(k))
            }
            Err(e) if choice == CollectorChoice::Auto => {
                tracing::warn!(reason = %Chain(&e), "collector: files (BPF unavailable)");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Loading parses the kernel's BTF (several MiB, three times: the loader, the BTF
    /// programs, the offsets); glibc keeps the freed pages unless asked to return them.
    fn release_freed_heap() {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap pages to the kernel (libc: glibc-only,
        // no safe wrapper exists).
        unsafe {
            libc::malloc_trim(0);
        }
    }

    fn load(
        root: &Path,
        layout: &Layout,
        m: &MonitoringConfig,
        purpose: Purpose,
    ) -> Result<Self, Unavailable> {
        if root != Path::new("/") {
            return Err(Unavailable::FixtureRoot);
        }
        check_capabilities()?;
        let unified = layout.unified.clone().ok_or(Unavailable::NoUnified)?;
        let filter = DeviceFilter::new(root, &m.excluded_devices);
        let opts = BpfOptions {
            excluded_devices: excluded_dev_ts(&filter),
            pin_dir: pin_dir(m),
            ephemeral: purpose == Purpose::Once,
            network: m.enable_network,
            runqueue: m.enable_runqueue_latency,
            io_latency: m.enable_io_latency,
            tcp_retransmits: m.enable_tcp_retransmits,
            ..BpfOptions::default()
        };
        let bpf = BpfCollector::load(&opts)?;
        Self::release_freed_heap();
        let mut k = Self::new(bpf, unified, m.enable_network);
        k.excluded_filter = Some(filter);
        k.excluded_set = opts.excluded_devices;
        k.devices_listed = Some(Instant::now());
        Ok(k)
    }

    /// Wraps a loaded collector; container cgroups are below `unified` (the v2 mount).
    pub fn new(bpf: BpfCollector, unified: PathBuf, network: bool) -> Self {
        Self {
            bpf,
            unified,
            ids: HashMap::new(),
            untracked: HashSet::new(),
            failures: 0,
            network,
            runqueue: HashMap::new(),
            io_latency: HashMap::new(),
            retrans: HashMap::new(),
            latency: HashMap::new(),
            excluded_filter: None,
            excluded_set: Vec::new(),
            devices_listed: None,
        }
    }

    /// Says once why run-queue wait is not measured (when it is not).
    fn log_runqueue(&self) {
        match self.bpf.runqueue() {
            LatencyMode::Counting => tracing::info!("run-queue wait: measured per container"),
            LatencyMode::Off(reason) => {
                tracing::warn!(%reason, "run-queue wait: not measured, its figures are absent")
            }
        }
    }

    /// Says once why block I/O latency is not measured (when it is not).
    fn log_io_latency(&self) {
        match self.bpf.io_latency() {
            LatencyMode::Counting => tracing::info!("block I/O latency: measured per container"),
            LatencyMode::Off(reason) => {
                tracing::warn!(%reason, "block I/O latency: not measured, its figures are absent")
            }
        }
    }

    /// Says once why TCP retransmits are not counted (when they are not).
    fn log_tcp_retransmits(&self) {
        match self.bpf.tcp_retransmits() {
            LatencyMode::Counting => tracing::info!("TCP retransmits: counted per container"),
            LatencyMode::Off(reason) => {
                tracing::warn!(%reason, "TCP retransmits: not counted, the figure is absent")
            }
        }
    }

    /// This cycle's latency figures by container id (absent for containers not counted).
    pub fn take_latency(&mut self) -> HashMap<String, Box<Latency>> {
        std::mem::take(&mut self.latency)
    }

    /// Takes back the map [`Self::take_latency`] handed on, to fill it again next cycle at
    /// its size instead of allocating and freeing it every cycle.
    pub fn recycle_latency(&mut self, mut latency: HashMap<String, Box<Latency>>) {
        latency.clear();
        self.latency = latency;
    }

    /// False when the kernel took the network programs but refused the block ones.
    pub fn counts_io(&self) -> bool {
        self.bpf.io_mode().counts_io()
    }

    /// Containers whose network and I/O bytes the file readers count every cycle.
    pub fn untracked(&self) -> &HashSet<String> {
        &self.untracked
    }

    /// Per-container tracking failures since start.
    pub fn failures(&self) -> u64 {
        self.failures
    }

    pub fn reconfigure(&mut self, m: &MonitoringConfig) {
        if self.network != m.enable_network {
            for (id, e) in self.bpf.set_network(m.enable_network) {
                tracing::warn!(cgroup_id = id, error = %Chain(&e), "cannot detach the network programs");
            }
        }
        self.network = m.enable_network;
        let counting = *self.bpf.runqueue() == LatencyMode::Counting;
        if counting != m.enable_runqueue_latency {
            self.bpf.set_runqueue(m.enable_runqueue_latency);
            self.runqueue.clear();
            self.log_runqueue();
        }
        // Only a changed switch retries the programs, not every reload after the kernel refused
        // them (a try parses BTF and runs the verifier: long enough to delay a cycle).
        if self.bpf.io_latency_wanted() != m.enable_io_latency {
            self.bpf.set_io_latency(m.enable_io_latency);
            self.io_latency.clear();
            self.log_io_latency();
        }
        if self.bpf.tcp_retransmits_wanted() != m.enable_tcp_retransmits {
            self.bpf.set_tcp_retransmits(m.enable_tcp_retransmits);
            self.retrans.clear();
            self.log_tcp_retransmits();
        }
        self.excluded_filter = Some(DeviceFilter::new(Path::new("/"), &m.excluded_devices));
        self.refresh_excluded(true);
    }

    /// Lists the block devices again (at most every [`DEVICES_TTL`] unless `force`) and hands
    /// the programs the excluded set when it changed (or when forced: a reload).
    fn refresh_excluded(&mut self, force: bool) {
        let Some(filter) = &self.excluded_filter else {
            return;
        };
        if !force
            && self
                .devices_listed
                .is_some_and(|t| t.elapsed() < DEVICES_TTL)
        {
            return;
        }
        self.devices_listed = Some(Instant::now());
        let devs = excluded_dev_ts(filter);
        if !force && devs == self.excluded_set {
            return;
        }
        match self.bpf.set_excluded_devices(&devs) {
            Ok(()) => {
                tracing::debug!(devices = devs.len(), "excluded block devices updated");
                self.excluded_set = devs;
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "cannot update the excluded devices of the BPF programs")
            }
        }
    }

    /// Tracks new (or restarted) containers, seeded with what the files counted so far,
    /// forgets stopped ones, and replaces the samples' network and I/O bytes with the
    /// kernel's counts. A container that cannot be tracked keeps its file readers' bytes (and
    /// is read from files from now on, see [`Self::untracked`]). Samples of containers that
    /// vanished before they could be tracked are dropped. An error concerns the whole
    /// collector.
    pub fn apply(
        &mut self,
        discovered: &[Discovered],
        samples: &mut Vec<ContainerSample>,
    ) -> Result<(), BpfError> {
        self.refresh_excluded(false);
        let by_id: HashMap<&str, &Discovered> =
            discovered.iter().map(|d| (d.id.as_str(), d)).collect();
        let mut dropped = HashSet::new();
        for s in samples.iter() {
            // A fresh sample (new or restarted container, files read) gets a (new) try.
            if !s.fresh && (self.ids.contains_key(&s.id) || self.untracked.contains(&s.id)) {
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
                    self.untracked.remove(&s.id);
                }
                Err(e) if e.is_gone() => {
                    dropped.insert(s.id.clone());
                }
                Err(e) if e.is_per_container() => {
                    self.failures += 1;
                    self.ids.remove(&s.id);
                    if self.untracked.insert(s.id.clone()) {
                        tracing::warn!(container = %s.id, error = %Chain(&e), "the BPF programs cannot count this container: its network and I/O bytes come from the file readers");
                    }
                    if !s.fresh {
                        // Its files were not read this cycle: from the next one on.
                        dropped.insert(s.id.clone());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.ids.retain(|id, _| by_id.contains_key(id.as_str()));
        self.untracked.retain(|id| by_id.contains_key(id.as_str()));
        let keep: HashSet<u64> = self.ids.values().copied().collect();
        for (id, e) in self.bpf.retain(&keep) {
            tracing::warn!(cgroup_id = id, error = %Chain(&e), "cannot detach from a stopped container");
        }
        self.bpf.refresh()?;
        samples.retain(|s| !dropped.contains(&s.id));
        self.collect_latency();
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
