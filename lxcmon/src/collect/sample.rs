//! Sampling: one reading of every discovered container's raw counters, files held open
//! across cycles, containers spread over the configured number of workers.

use crate::collect::discovery::Discovered;
use crate::readers::cgroup::subtree::Watcher;
use crate::readers::cgroup::{CgroupReader, CgroupSample, Layout};
use crate::readers::kfile::{self, KFile, ReadError};
use crate::readers::procfs::{self, NetTotals};
use crate::readers::sysfs::DeviceFilter;
use rustix::fd::OwnedFd;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    pub at: Instant,
    pub cgroup: CgroupSample,
    pub net_rx: u64,
    pub net_tx: u64,
    pub fs: FsUsage,
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
    #[error("the worker reading this container panicked")]
    WorkerPanicked,
}

impl SampleError {
    fn from_read(e: ReadError) -> Self {
        if e.is_gone() {
            Self::Gone
        } else {
            Self::Read(e)
        }
    }
}

/// Files held open for one container between cycles.
#[derive(Debug)]
struct ContainerState {
    rel: PathBuf,
    cgroup: CgroupReader,
    init: Option<InitHandles>,
    net: NetTotals,
}

#[derive(Debug)]
struct InitHandles {
    net_dev: Option<KFile>,
    root_dir: Option<OwnedFd>,
}

/// The file-reader collector.
#[derive(Debug)]
pub struct Sampler {
    root: PathBuf,
    layout: Layout,
    devices: DeviceFilter,
    options: Options,
    states: HashMap<String, ContainerState>,
    /// Containers whose network and I/O bytes are read from files every cycle although
    /// another collector counts the others (it cannot count these).
    files_for: HashSet<String>,
    /// Child-cgroup events for every container's subtree, drained once per cycle; `None`
    /// where inotify is refused.
    watcher: Option<Arc<Watcher>>,
}

impl Sampler {
    pub fn new(root: &Path, layout: Layout, devices: DeviceFilter, options: Options) -> Self {
        let watcher = match Watcher::new() {
            Ok(w) => Some(Arc::new(w)),
            Err(e) => {
                tracing::info!(error = %e, "no inotify: cgroup subtrees are checked by mtime");
                None
            }
        };
        Self {
            root: root.to_path_buf(),
            layout,
            devices,
            options,
            states: HashMap::new(),
            files_for: HashSet::new(),
            watcher,
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
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
        let mut work: Vec<(&Discovered, Option<ContainerState>)> = discovered
            .iter()
            .map(|d| (d, self.states.remove(&d.id).filter(|s| s.rel == d.rel)))
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
            files_for: &self.files_for,
        };
        let results: Vec<Result<ContainerSample, SampleError>> = if workers == 1 {
            let mut scratch = Scratch::default();
            work.iter_mut()
                .map(|(d, state)| ctx.sample_with_retry(d, state, &mut scratch))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = work
                    .chunks_mut(chunk)
                    .map(|part| {
                        let ctx = &ctx;
                        let len = part.len();
                        let handle = scope.spawn(move || {
                            let mut scratch = Scratch::default();
                            part.iter_mut()
                                .map(|(d, state)| ctx.sample_with_retry(d, state, &mut scratch))
                                .collect::<Vec<_>>()
                        });
                        (len, handle)
                    })
                    .collect();
                // A worker that panicked loses its part of the cycle, nothing else.
                handles
                    .into_iter()
                    .flat_map(|(len, h)| {
                        h.join().unwrap_or_else(|_| {
                            (0..len).map(|_| Err(SampleError::WorkerPanicked)).collect()
                        })
                    })
                    .collect()
            })
        };
        let mut sampled = Sampled::default();
        for ((d, state), result) in work.into_iter().zip(results) {
            match result {
                Ok(s) => sampled.containers.push(s),
                Err(SampleError::Gone) => {
                    tracing::debug!(container = %d.id, "not running at read time, skipped");
                    sampled.skipped += 1;
                }
                Err(e @ (SampleError::Read(_) | SampleError::WorkerPanicked)) => {
                    tracing::warn!(container = %d.id, error = %e, "left out of this cycle");
                    sampled.failed += 1;
                }
            }
            if let Some(state) = state {
                self.states.insert(d.id.clone(), state);
            }
        }
        sampled
    }
}

#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    pids: Vec<u32>,
}

struct Ctx<'a> {
    root: &'a Path,
    layout: &'a Layout,
    watcher: Option<&'a Arc<Watcher>>,
    devices: &'a DeviceFilter,
    options: Options,
    files_for: &'a HashSet<String>,
}

impl Ctx<'_> {
    fn sample_with_retry(
        &self,
        d: &Discovered,
        state: &mut Option<ContainerState>,
        scratch: &mut Scratch,
    ) -> Result<ContainerSample, SampleError> {
        let mut attempt = 0;
        loop {
            let had_state = state.is_some();
            match self.sample_one(d, state, scratch) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    // Whatever failed, the open files may be stale (a restarted container
                    // has a new cgroup under the same name): start over from the paths.
                    *state = None;
                    match e {
                        SampleError::Gone if had_state => continue,
                        SampleError::Gone => return Err(e),
                        SampleError::WorkerPanicked => return Err(e),
                        SampleError::Read(_) if attempt >= self.options.retry_limit => {
                            return Err(e)
                        }
                        SampleError::Read(ref err) => {
                            attempt += 1;
                            tracing::debug!(container = %d.id, attempt, error = %err, "retrying");
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
        let fresh = state.is_none();
        if fresh {
            let cgroup = CgroupReader::open(self.layout, &d.rel, self.watcher.cloned())
                .map_err(SampleError::from_read)?;
            let missing = match &cgroup {
                CgroupReader::V1(r) => r.missing(),
                CgroupReader::V2(r) => r.missing(),
            };
            if !missing.is_empty() {
                tracing::warn!(container = %d.id, ?missing, "controllers not available for this container: their figures read 0");
            }
            *state = Some(ContainerState {
                rel: d.rel.clone(),
                cgroup,
                init: None,
                net: NetTotals::default(),
            });
        }
        let Some(st) = state.as_mut() else {
            return Err(SampleError::Gone);
        };
        let at = Instant::now();
        let always = self.files_for.contains(&d.id);
        let io = self.options.io_files || fresh || always;
        let net = self.options.net_files || fresh || always;
        let mut cgroup = st
            .cgroup
            .sample(
                io.then_some(self.devices),
                &mut scratch.buf,
                &mut scratch.pids,
            )
            .map_err(SampleError::from_read)?;
        if !self.options.swap {
            cgroup.swap_bytes = 0;
        }
        if st.init.is_none() && (self.options.network || self.options.filesystem) {
            let pid = procfs::find_init(self.root, &scratch.pids, &mut scratch.buf)
                .ok_or(SampleError::Gone)?;
            st.init = Some(self.open_init(pid).map_err(SampleError::from_read)?);
        }
        let mut fs = FsUsage::default();
        if let Some(init) = &st.init {
            if let (Some(net_dev), true) = (&init.net_dev, net) {
                st.net.update(
                    net_dev
                        .read(&mut scratch.buf)
                        .map_err(SampleError::from_read)?,
                );
            }
            if let Some(root_dir) = &init.root_dir {
                fs = statvfs(root_dir).map_err(|e| {
                    SampleError::from_read(ReadError::io(Path::new("container root"), e))
                })?;
            }
        }
        Ok(ContainerSample {
            id: d.id.clone(),
            name: d.name.clone(),
            at,
            cgroup,
            net_rx: st.net.rx(),
            net_tx: st.net.tx(),
            fs,
            fresh,
            net_source: CounterSource::Files,
            io_source: CounterSource::Files,
        })
    }

    fn open_init(&self, pid: u32) -> Result<InitHandles, ReadError> {
        let proc = kfile::under(self.root, &format!("/proc/{pid}"));
        let net_dev = if self.options.network {
            Some(KFile::open(proc.join("net/dev"))?)
        } else {
            None
        };
        let root_dir = if self.options.filesystem {
            let path = proc.join("root");
            let fd = rustix::fs::open(
                &path,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| ReadError::io(&path, e.into()))?;
            Some(fd)
        } else {
            None
        };
        Ok(InitHandles { net_dev, root_dir })
    }
}

fn statvfs(fd: &OwnedFd) -> std::io::Result<FsUsage> {
    let s = rustix::fs::fstatvfs(fd)?;
    let unit = s.f_frsize.max(1);
    Ok(FsUsage {
        total: s.f_blocks.saturating_mul(unit),
        used: s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit),
        free: s.f_bavail.saturating_mul(unit),
    })
}
