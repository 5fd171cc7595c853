//! Sampling: one reading of every discovered container's raw counters, files held open
//! across cycles, containers spread over the configured number of workers.

use crate::collect::discovery::{Discovered, Runtime};
use crate::collect::init;
use crate::logging::Chain;
use crate::readers::cgroup::subtree::Watcher;
use crate::readers::cgroup::{self, CgroupReader, CgroupSample, Layout, Scratch};
use crate::readers::kfile::ReadError;
use crate::readers::mounts::ChangeSignals;
use crate::readers::procfs::{self, NetTotals};
use crate::readers::sysfs::DeviceFilter;
use rustix::fd::AsFd;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Root filesystem figures in bytes, as `df` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsUsage {
    pub total: u64,
    pub used: u64,
    /// Available to unprivileged users.
    pub free: u64,
}

/// One container's raw counters at one instant.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    pub id: String,
    pub name: String,
    /// The container instance (see [`Discovered::instance`]) these counters belong to.
    pub instance: u64,
    /// When the instance's init process started, where it is known.
    pub init_started: Option<SystemTime>,
    pub at: Instant,
    pub cgroup: CgroupSample,
    pub net_rx: u64,
    pub net_tx: u64,
    pub fs: FsUsage,
    /// Per interface, loopback excluded (empty when per-interface figures are off).
    pub interfaces: Vec<procfs::InterfaceCounters>,
    /// Every filesystem of the container (empty when per-mount figures are off).
    pub mounts: Vec<crate::readers::mounts::MountUsage>,
    pub runtime: Runtime,
    pub project: Option<String>,
    /// The container's files were (re)opened for this sample: it is new, or it restarted.
    pub fresh: bool,
    /// Who counted `net_rx`/`net_tx` in this sample. A change of source must not make a
    /// cumulative figure jump (derive keeps them continuous per container instance).
    pub net_source: CounterSource,
    /// Who counted `cgroup.io` in this sample.
    pub io_source: CounterSource,
}

/// Where a cumulative counter of a sample came from: the file readers and the BPF programs
/// count by different rules (buffered writeback, Ethernet framing), so their values are not
/// interchangeable mid-stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CounterSource {
    #[default]
    Files,
    Bpf,
}

/// What a cycle's sampling found.
#[derive(Debug, Default)]
pub struct Sampled {
    pub containers: Vec<ContainerSample>,
    /// Containers that vanished or were not yet running at read time.
    pub skipped: usize,
    /// Containers left out after exhausting their retries.
    pub failed: usize,
}

/// Which optional figures are read at all (the `enable_*` settings).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub swap: bool,
    pub network: bool,
    pub filesystem: bool,
    /// Network counters per interface.
    pub per_interface: bool,
    /// Every filesystem of the container.
    pub per_mount: bool,
    /// The cgroup figures beyond the seed's.
    pub details: crate::readers::cgroup::details::DetailOptions,
    pub workers: usize,
    pub retry_limit: u32,
    pub retry_delay: Duration,
    /// Read network counters from files every cycle. When another collector counts them,
    /// they are read only in a container's fresh sample, to seed that collector.
    pub net_files: bool,
    /// The same for block I/O counters.
    pub io_files: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// The container stopped (or is still starting) at read time: skipped, not an error.
    #[error("container is not running")]
    Gone,
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the cgroup was replaced while its files were opened")]
    Replaced,
    /// The cgroup holds no process: left behind by a container whose monitor was killed, or
    /// a container between its cgroup's creation and its init. Skipped; its files are closed
    /// (the init's among them belong to a process that is gone or not yet there).
    #[error("the cgroup holds no process")]
    Empty,
    /// The container's init is in its cgroup but still in the host's root or network
    /// namespace: its runtime is setting it up. Skipped; its files are opened at a later cycle.
    #[error("the container is still being set up")]
    Starting,
    #[error("the worker reading this container panicked")]
    WorkerPanicked,
    /// The open file limit is reached: not retried (see [`ReadError::is_out_of_descriptors`]).
    #[error("no file descriptor left")]
    NoDescriptors(#[source] ReadError),
}

impl SampleError {
    fn from_read(e: ReadError) -> Self {
        if e.is_gone() {
            Self::Gone
        } else if e.is_out_of_descriptors() {
            Self::NoDescriptors(e)
        } else {
            Self::Read(e)
        }
    }
}

/// What is kept for one container instance between cycles: its open files, and the network
/// totals, which hold the bytes of interfaces that have gone and so must outlive the files
/// (a failed read re-opens the files, never forgets those bytes).
#[derive(Debug)]
struct ContainerState {
    rel: PathBuf,
    instance: u64,
    /// Boxed: the states are moved out of the map and back every cycle, a pointer each rather
    /// than the readers' kilobyte.
    files: Option<Box<Files>>,
    net: NetTotals,
}

#[derive(Debug)]
struct Files {
    cgroup: CgroupReader,
    /// Emptied by the mount table watcher when the init exits (see `collect::init`).
    init: Option<init::Init>,
}

/// The file-reader collector.
#[derive(Debug)]
pub struct Sampler {
    root: PathBuf,
    layout: Layout,
    devices: DeviceFilter,
    options: Options,
    states: HashMap<String, ContainerState>,
    /// Boot time, to turn a process's start (ticks since boot) into a date.
    boot: Option<SystemTime>,
    /// Containers whose network and I/O bytes are read from files every cycle although
    /// another collector counts the others (it cannot count these).
    files_for: HashSet<String>,
    /// Child-cgroup events for every container's subtree, drained once per cycle; `None`
    /// where inotify is refused.
    watcher: Option<Arc<Watcher>>,
    /// Changes of every container's mount table, asked once per cycle; `None` where epoll
    /// is refused (each table is then polled on its own).
    mount_signals: Option<ChangeSignals>,
    /// The tables that changed this cycle (tokens of `mount_signals`), kept for its capacity.
    changed_mounts: Vec<u64>,
    /// When the open file limit was last reported (at most every [`FD_WARN_EVERY`]).
    fd_warned: Option<std::time::Instant>,
    /// The open file limit was reached once: the files read rarely (limits) and the child
    /// cgroups' process lists are opened for each read from then on, not held.
    lean: bool,
    /// One reader's buffers per worker, kept from cycle to cycle at their grown size.
    scratch: Vec<Scratch>,
    /// Each container's result, in `discovered` order, written by the workers in place; kept
    /// for its capacity (see [`Sampler::recycle`]).
    results: Vec<Option<Result<ContainerSample, SampleError>>>,
    /// The last cycle's samples, handed back emptied by [`Sampler::recycle`].
    spare: Vec<ContainerSample>,
}

/// How often running out of file descriptors is logged while it lasts.
const FD_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

impl Sampler {
    pub fn new(root: &Path, layout: Layout, devices: DeviceFilter, options: Options) -> Self {
        let watcher = match Watcher::new() {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::info!(error = %e, "no inotify: cgroup subtrees are checked by mtime");
                None
            }
        };
        let mount_signals = ChangeSignals::start();
        Self {
            root: root.to_path_buf(),
            layout,
            devices,
            options,
            states: HashMap::new(),
            boot: procfs::boot_time(root),
            files_for: HashSet::new(),
            watcher,
            mount_signals,
            changed_mounts: Vec::new(),
            fd_warned: None,
            lean: false,
            scratch: Vec::new(),
            results: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Takes back a cycle's samples once derive has emptied them: the next cycle fills the
    /// same vector. Vectors of a few MiB allocated and freed every cycle (at N = 1000) are
    /// what glibc scatters over the heap, which then stays resident.
    pub fn recycle(&mut self, mut samples: Vec<ContainerSample>) {
        samples.clear();
        self.spare = samples;
    }

    /// Applies reloaded settings in place: each container instance keeps its state (the bytes
    /// of interfaces that have gone above all), so no counter goes back on a reload.
    pub fn reconfigure(&mut self, devices: DeviceFilter, options: Options) {
        let init = |o: &Options| (o.network, o.filesystem, o.per_mount);
        let init_files = init(&options) != init(&self.options);
        if options.details != self.options.details {
            for st in self.states.values_mut() {
                let Some(files) = st.files.as_mut() else {
                    continue;
                };
                if let Err(e) = files.cgroup.set_details(options.details) {
                    // Opened afresh at the next sample, as after a failed read.
                    tracing::debug!(error = %Chain(&e), "reopening a container's files");
                    st.files = None;
                }
            }
        }
        self.devices = devices;
        self.options = options;
        if init_files {
            for files in self.states.values_mut().filter_map(|s| s.files.as_mut()) {
                files.init = None;
            }
        }
    }

    /// Network and block I/O from the files every cycle (the BPF collector gave up).
    pub fn set_net_io_files(&mut self) {
        self.options.net_files = true;
        self.options.io_files = true;
    }

    /// Network and block I/O from the files every cycle for these containers.
    pub fn set_files_for(&mut self, ids: &HashSet<String>) {
        self.files_for.clone_from(ids);
    }

    /// Reads every container once. Containers that are gone are skipped silently; one that
    /// fails otherwise is retried `retry_limit` times before it is left out of the cycle.
    pub fn sample(&mut self, discovered: &[Discovered]) -> Sampled {
        if let Some(w) = &self.watcher {
            w.drain();
        }
        // Without the watcher's answer, each table polls itself this cycle.
        let signals_ok = self.options.per_mount
            && (self.mount_signals.as_ref()).is_some_and(|s| s.take(&mut self.changed_mounts));
        // Each state's key goes back with it after the cycle: no id copied per container.
        let mut keys: Vec<Option<String>> = Vec::with_capacity(discovered.len());
        let mut work: Vec<(&Discovered, Option<ContainerState>)> = discovered
            .iter()
            .map(|d| {
                let (key, state) = self
                    .states
                    .remove_entry(&d.id)
                    .map_or((None, None), |(k, s)| (Some(k), Some(s)));
                keys.push(key);
                let same = |s: &ContainerState| s.rel == d.rel && s.instance == d.instance;
                (d, state.filter(same))
            })
            .collect();
        // What is left belongs to containers that are gone: their files close here.
        self.states.clear();
        let workers = self.options.workers.clamp(1, work.len().max(1));
        let chunk = work.len().div_ceil(workers).max(1);
        let ctx = Ctx {
            root: &self.root,
            layout: &self.layout,
            watcher: self.watcher.as_ref(),
            devices: &self.devices,
            options: self.options,
            boot: self.boot,
            files_for: &self.files_for,
            mount_signals: self.mount_signals.as_ref(),
            changed_mounts: signals_ok.then_some(&self.changed_mounts[..]),
            lean: self.lean,
        };
        let mut scratches = std::mem::take(&mut self.scratch);
        scratches.resize_with(workers, Scratch::default);
        // Each worker writes its part's results in place; a slot left empty belongs to a
        // worker that panicked (that container is lost for this cycle, nothing else).
        let mut results = std::mem::take(&mut self.results);
        results.clear();
        results.resize_with(work.len(), || None);
        if workers == 1 {
            ctx.read_part(&mut work, &mut results, &mut scratches[0]);
        } else {
            std::thread::scope(|scope| {
                // The first part is read on this thread: one thread fewer to start per cycle.
                let mut parts = (work.chunks_mut(chunk))
                    .zip(results.chunks_mut(chunk))
                    .zip(scratches.iter_mut());
                let first = parts.next();
                let ctx = &ctx;
                let handles: Vec<_> = parts
                    .map(|((part, out), scratch)| {
                        scope.spawn(move || ctx.read_part(part, out, scratch))
                    })
                    .collect();
                if let Some(((part, out), scratch)) = first {
                    let read = std::panic::AssertUnwindSafe(|| ctx.read_part(part, out, scratch));
                    let _ = std::panic::catch_unwind(read);
                }
                for h in handles {
                    let _ = h.join();
                }
            });
        }
        self.scratch = scratches;
        let short = |r: &Option<Result<ContainerSample, SampleError>>| {
            matches!(r, Some(Err(SampleError::NoDescriptors(_))))
        };
        if !ctx.lean && results.iter().any(short) {
            // Out of descriptors: every reader lets go of its rarely read files, and the
            // containers that did not fit are tried again, now opened that way.
            let freed: usize = (work.iter_mut())
                .filter_map(|(_, st)| st.as_mut()?.files.as_mut())
                .map(|f| f.cgroup.release_rare())
                .sum();
            let ctx = Ctx { lean: true, ..ctx };
            let mut scratch = Scratch::default();
            let mut retried = 0usize;
            for ((d, state), result) in work.iter_mut().zip(results.iter_mut()) {
                if short(result) {
                    retried += 1;
                    *result = Some(ctx.sample_with_retry(d, state, &mut scratch));
                }
            }
            let still = results.iter().filter(|r| short(r)).count();
            tracing::warn!(
                freed,
                retried,
                still_short = still,
                "descriptors short: the limit files and the child cgroups' process lists are now opened for each read instead of held (about 4 µs per open); raise LimitNOFILE to hold them again"
            );
            self.lean = true;
        }
        let mut containers = std::mem::take(&mut self.spare);
        containers.reserve(work.len());
        let mut sampled = Sampled {
            containers,
            ..Sampled::default()
        };
        let mut out_of_fds = 0usize;
        for (((d, state), result), key) in work.into_iter().zip(results.drain(..)).zip(keys) {
            match result.unwrap_or(Err(SampleError::WorkerPanicked)) {
                Ok(s) => sampled.containers.push(s),
                Err(SampleError::Gone) => {
                    tracing::debug!(container = %d.id, "not running at read time, skipped");
                    sampled.skipped += 1;
                }
                Err(SampleError::Replaced) => {
                    tracing::debug!(container = %d.id, "restarted while read, skipped");
                    sampled.skipped += 1;
                }
                Err(SampleError::Empty) => {
                    tracing::debug!(container = %d.id, "no process in its cgroup, skipped");
                    sampled.skipped += 1;
                }
                Err(SampleError::Starting) => {
                    tracing::debug!(container = %d.id, "its init is not in its own root or network yet, skipped");
                    sampled.skipped += 1;
                }
                Err(SampleError::NoDescriptors(e)) => {
                    tracing::debug!(container = %d.id, error = %Chain(&e), "no descriptor left");
                    out_of_fds += 1;
                    sampled.failed += 1;
                }
                Err(e @ (SampleError::Read(_) | SampleError::WorkerPanicked)) => {
                    tracing::warn!(container = %d.id, error = %Chain(&e), "left out of this cycle");
                    sampled.failed += 1;
                }
            }
            if let Some(state) = state {
                self.states
                    .insert(key.unwrap_or_else(|| d.id.clone()), state);
            }
        }
        self.results = results;
        if out_of_fds > 0 && self.fd_warned.is_none_or(|t| t.elapsed() >= FD_WARN_EVERY) {
            self.fd_warned = Some(std::time::Instant::now());
            let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
            tracing::warn!(
                containers = out_of_fds,
                open_file_limit = ?limit,
                held = sampled.containers.len(),
                "open file limit reached: some containers are not read (the agent holds one to three dozen kernel files per container): raise LimitNOFILE, or switch figures off (enable_*)"
            );
        }
        sampled
    }
}

struct Ctx<'a> {
    root: &'a Path,
    layout: &'a Layout,
    watcher: Option<&'a Arc<Watcher>>,
    devices: &'a DeviceFilter,
    options: Options,
    boot: Option<SystemTime>,
    files_for: &'a HashSet<String>,
    mount_signals: Option<&'a ChangeSignals>,
    changed_mounts: Option<&'a [u64]>,
    /// Open the rarely read files for each read (see `Sampler::lean`).
    lean: bool,
}

impl Ctx<'_> {
    /// Reads the containers of one worker's part into `out` (as long as the part).
    fn read_part(
        &self,
        part: &mut [(&Discovered, Option<ContainerState>)],
        out: &mut [Option<Result<ContainerSample, SampleError>>],
        scratch: &mut Scratch,
    ) {
        for ((d, state), slot) in part.iter_mut().zip(out) {
            *slot = Some(self.sample_with_retry(d, state, scratch));
        }
    }

    fn sample_with_retry(
        &self,
        d: &Discovered,
        state: &mut Option<ContainerState>,
        scratch: &mut Scratch,
    ) -> Result<ContainerSample, SampleError> {
        let mut attempt = 0;
        loop {
            let had_state = state.as_ref().is_some_and(|s| s.files.is_some());
            match self.sample_one(d, state, scratch) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // Whatever failed, the open files may be stale: open them again from
                    // the paths (the instance's network totals stay).
                    if let Some(st) = state.as_mut() {
                        st.files = None;
                    }
                    match e {
                        SampleError::Gone if had_state => continue,
                        SampleError::Gone
                        | SampleError::Replaced
                        | SampleError::Empty
                        | SampleError::Starting => return Err(e),
                        SampleError::WorkerPanicked | SampleError::NoDescriptors(_) => {
                            return Err(e)
                        }
                        SampleError::Read(_) if attempt >= self.options.retry_limit => {
                            return Err(e)
                        }
                        SampleError::Read(ref err) => {
                            attempt += 1;
                            tracing::debug!(container = %d.id, attempt, error = %Chain(err), "retrying");
                            std::thread::sleep(self.options.retry_delay);
                        }
                    }
                }
            }
        }
    }

    fn sample_one(
        &self,
        d: &Discovered,
        state: &mut Option<ContainerState>,
        scratch: &mut Scratch,
    ) -> Result<ContainerSample, SampleError> {
        let st = state.get_or_insert_with(|| ContainerState {
            rel: d.rel.clone(),
            instance: d.instance,
            files: None,
            net: NetTotals::default(),
        });
        let fresh = st.files.is_none();
        let files = match &mut st.files {
            Some(f) => f,
            None => {
                // A cgroup left behind empty costs this one read a cycle, not an open of each
                // of its files and a sample.
                if cgroup::populated(self.layout, &d.rel) == Some(false) {
                    return Err(SampleError::Empty);
                }
                st.files.insert(Box::new(self.open_files(d)?))
            }
        };
        let at = Instant::now();
        let always = self.files_for.contains(&d.id);
        let io = self.options.io_files || fresh || always;
        // Per-interface figures come only from net/dev: read it every cycle for them, whoever
        // counts the totals.
        let per_interface = self.options.network && self.options.per_interface;
        let net = self.options.net_files || fresh || always || per_interface;
        let mut cgroup = files
            .cgroup
            .sample(self.devices, io, scratch)
            .map_err(SampleError::from_read)?;
        if cgroup.processes == 0 {
            return Err(SampleError::Empty);
        }
        // The rates' clock: when the CPU counter was read, rather than before the read.
        let at = cgroup.cpu_read_at.unwrap_or(at);
        if !self.options.swap {
            cgroup.swap_bytes = 0;
        }
        if files.init.is_none()
            && (self.options.network || self.options.filesystem || self.options.per_mount)
        {
            let pid = procfs::find_init(self.root, &scratch.pids, &mut scratch.buf)
                .map_err(SampleError::from_read)?
                .ok_or(SampleError::Gone)?;
            let (signals, buf) = (self.mount_signals, &mut scratch.buf);
            let init = init::open(self.root, pid, &self.options, signals, self.boot, buf);
            let init = init.map_err(SampleError::from_read)?;
            files.init = Some(init.ok_or(SampleError::Starting)?);
        }
        let mut fs = FsUsage::default();
        let mut init_started = None;
        let mut interfaces = Vec::new();
        let mut mounts = Vec::new();
        if let Some(slot) = &files.init {
            init_started = slot.started;
            let mut held = slot.files.lock();
            // Emptied by the watcher: the init exited.
            let init = held.as_mut().ok_or(SampleError::Gone)?;
            if let (Some(net_dev), true) = (&init.net_dev, net) {
                let text = net_dev
                    .read(&mut scratch.buf)
                    .map_err(SampleError::from_read)?;
                if per_interface {
                    interfaces.reserve_exact(st.net.interface_count());
                    st.net.update_with(text, Some(&mut interfaces));
                } else {
                    st.net.update(text);
                }
            }
            if let Some(root_dir) = &init.root_dir {
                let stat = rustix::fs::fstatvfs(root_dir).map_err(|e| {
                    SampleError::from_read(ReadError::io(Path::new("container root"), e.into()))
                })?;
                if self.options.filesystem {
                    fs = fs_usage(&stat);
                }
                if let Some(table) = &mut init.mounts {
                    let changed = self.changed_mounts;
                    let buf = &mut scratch.buf;
                    let sampled = table.sample(root_dir.as_fd(), &stat, changed, buf, &mut mounts);
                    sampled.map_err(SampleError::from_read)?;
                }
            }
        }
        Ok(ContainerSample {
            id: d.id.clone(),
            name: d.name.clone(),
            instance: d.instance,
            init_started,
            at,
            cgroup,
            net_rx: st.net.rx(),
            net_tx: st.net.tx(),
            fs,
            interfaces,
            mounts,
            runtime: d.runtime,
            project: d.project.clone(),
            fresh,
            net_source: CounterSource::Files,
            io_source: CounterSource::Files,
        })
    }

    /// Opens the container's cgroup files, then checks they belong to the instance discovery
    /// saw: a container restarted in between has a new cgroup directory.
    fn open_files(&self, d: &Discovered) -> Result<Files, SampleError> {
        let cgroup = CgroupReader::open(
            self.layout,
            &d.rel,
            self.watcher.cloned(),
            self.options.details,
            self.lean,
        )
        .map_err(SampleError::from_read)?;
        if let Some(primary) = self.layout.primary() {
            let dir = primary.join(&d.rel);
            let meta = std::fs::metadata(&dir)
                .map_err(|e| SampleError::from_read(ReadError::io(&dir, e)))?;
            if meta.ino() != d.instance {
                return Err(SampleError::Replaced);
            }
        }
        let missing = cgroup.missing();
        if !missing.is_empty() {
            tracing::warn!(container = %d.id, ?missing, "controllers not available for this container: their figures read 0");
        }
        Ok(Files { cgroup, init: None })
    }
}

fn fs_usage(s: &rustix::fs::StatVfs) -> FsUsage {
    let unit = s.f_frsize.max(1);
    FsUsage {
        total: s.f_blocks.saturating_mul(unit),
        used: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit),
        free: s.f_bavail.saturating_mul(unit),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's cgroup figures, one worker, no retry; `filesystem` or not.
    fn seed_options(filesystem: bool) -> Options {
        Options {
            swap: false,
            network: false,
            filesystem,
            per_interface: false,
            per_mount: false,
            details: crate::readers::cgroup::details::DetailOptions::NONE,
            workers: 1,
            retry_limit: 0,
            retry_delay: Duration::ZERO,
            net_files: true,
            io_files: true,
        }
    }

    /// A container restarted between discovery and the opening of its files is skipped, not
    /// read as the instance discovery saw.
    #[test]
    fn files_of_another_instance_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("lxc.payload.a");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("cpu.stat"), "usage_usec 1\n").unwrap();
        std::fs::write(cg.join("cgroup.procs"), "4242\n").unwrap();
        let layout = Layout {
            unified: Some(dir.path().to_path_buf()),
            unified_has_controllers: true,
            ..Layout::default()
        };
        let options = seed_options(false);
        let mut sampler = Sampler::new(dir.path(), layout, DeviceFilter::none(), options);
        let ino = std::fs::metadata(&cg).unwrap().ino();
        let found = |instance| Discovered::lxc("a", instance);
        let stale = sampler.sample(&[found(ino + 1)]);
        assert_eq!((stale.containers.len(), stale.skipped), (0, 1));
        let live = sampler.sample(&[found(ino)]);
        assert_eq!(live.containers.len(), 1);
        assert_eq!(live.containers[0].instance, ino);
        assert_eq!(live.containers[0].cgroup.cpu_usage_ns, 1000);

        // Its processes gone, the cgroup left behind is no container; one that is started in
        // it again is read.
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        let empty = sampler.sample(&[found(ino)]);
        assert_eq!((empty.containers.len(), empty.skipped), (0, 1));
        std::fs::write(cg.join("cgroup.procs"), "4243\n").unwrap();
        let again = sampler.sample(&[found(ino)]);
        assert_eq!(again.containers.len(), 1);
        assert_eq!(again.containers[0].cgroup.processes, 1);

        // Where the kernel says the subtree is empty (`cgroup.events`), the cgroup's files
        // are not opened: its (here stale) process list is not read.
        std::fs::write(cg.join("cgroup.procs"), "").unwrap();
        assert_eq!(sampler.sample(&[found(ino)]).skipped, 1);
        std::fs::write(cg.join("cgroup.procs"), "4243\n").unwrap();
        std::fs::write(cg.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        let unopened = sampler.sample(&[found(ino)]);
        assert_eq!((unopened.containers.len(), unopened.skipped), (0, 1));
        std::fs::write(cg.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let opened = sampler.sample(&[found(ino)]);
        assert_eq!(
            opened.containers.len(),
            1,
            "populated: its files are opened"
        );
    }

    /// A container whose init is in its cgroup but still in the host's root (LXC sets it up
    /// there: hooks, mounts, then the pivot) is skipped, not held to the host's root for its
    /// life; once the init is in its own root it is read. Past the setup grace, an init that
    /// shares the host's root is taken as it is.
    #[test]
    fn an_init_still_in_the_hosts_root_is_read_only_once_in_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let cg = root.join("sys/fs/cgroup/lxc.payload.a");
        std::fs::create_dir_all(&cg).unwrap();
        std::fs::write(cg.join("cpu.stat"), "usage_usec 1\n").unwrap();
        std::fs::write(cg.join("cgroup.procs"), "4242\n").unwrap();
        let proc = root.join("proc/4242");
        std::fs::create_dir_all(&proc).unwrap();
        std::fs::write(proc.join("status"), "Name:\tinit\nNSpid:\t4242\t1\n").unwrap();
        // Started 10 ticks after a boot `age` seconds ago.
        let stat = "4242 (init) S 1 4242 4242 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 10 0 0\n";
        std::fs::write(proc.join("stat"), stat).unwrap();
        let boot = |age: u64| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap();
            let text = format!("cpu 0 0 0 0\nbtime {}\n", now.as_secs() - age);
            std::fs::write(root.join("proc/stat"), text).unwrap();
        };
        // The init's root is the tree's own: the host's root, seen from the fixture.
        std::os::unix::fs::symlink("../..", proc.join("root")).unwrap();
        let layout = Layout {
            unified: Some(root.join("sys/fs/cgroup")),
            unified_has_controllers: true,
            ..Layout::default()
        };
        let options = seed_options(true);
        let found = Discovered::lxc("a", std::fs::metadata(&cg).unwrap().ino());
        let sampler = |age| {
            boot(age);
            Sampler::new(root, layout.clone(), DeviceFilter::none(), options)
        };

        let mut young = sampler(1);
        let starting = young.sample(std::slice::from_ref(&found));
        assert_eq!((starting.containers.len(), starting.skipped), (0, 1));
        // Pivoted: its root is a directory of its own.
        std::fs::remove_file(proc.join("root")).unwrap();
        std::fs::create_dir(proc.join("root")).unwrap();
        let ready = young.sample(std::slice::from_ref(&found));
        assert_eq!(ready.containers.len(), 1);

        std::fs::remove_dir(proc.join("root")).unwrap();
        std::os::unix::fs::symlink("../..", proc.join("root")).unwrap();
        let old = sampler(init::SETUP_GRACE.as_secs() + 60).sample(std::slice::from_ref(&found));
        assert_eq!(
            old.containers.len(),
            1,
            "an init past the grace is read in the host's root"
        );
    }
}
