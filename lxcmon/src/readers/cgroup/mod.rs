//! cgroup readers: where the hierarchies are mounted, and the per-container figures in them.
//!
//! On a pure v2 host (Proxmox VE 7/8) every figure comes from the unified tree. On v1 and
//! hybrid hosts (Proxmox VE 6, plain LXC on older systemd, this project's CI host) the figures
//! come from the v1 controllers, and the v2 tree, where mounted, only names the cgroup for BPF.

pub mod details;
#[cfg(test)]
mod fixture_tests;
pub mod subtree;
pub mod v1;
pub mod v2;

use crate::readers::kfile::{self, KFile, ReadError};
use crate::readers::sysfs::DeviceFilter;
use details::DetailOptions;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use subtree::{Subtree, Watcher};

/// Where the cgroup hierarchies are mounted, as seen under the configured root.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// The cgroup2 mount, if any (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub unified: Option<PathBuf>,
    /// Whether the unified tree carries the resource controllers (pure v2).
    pub unified_has_controllers: bool,
    /// v1 controller name (`memory`, `cpuacct`, `name=systemd`, ...) to its mount point.
    pub v1: BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Figures come from the unified hierarchy.
    V2,
    /// Figures come from v1 controllers (the unified tree may exist beside them: hybrid).
    V1,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("no cgroup hierarchy with resource controllers is mounted (looked in {0})")]
    NoControllers(PathBuf),
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl Layout {
    /// Finds the mounts from `/proc/self/mountinfo` under `root`.
    pub fn detect(root: &Path) -> Result<Self, LayoutError> {
        let mountinfo = kfile::under(root, "/proc/self/mountinfo");
        let text = kfile::read_to_string(&mountinfo)?;
        let mut layout = Self::from_mountinfo(&text, root);
        if let Some(unified) = &layout.unified {
            let controllers =
                kfile::read_to_string(&unified.join("cgroup.controllers")).unwrap_or_default();
            layout.unified_has_controllers = controllers
                .split_whitespace()
                .any(|c| c == "memory" || c == "cpu" || c == "pids");
        }
        if layout.mode().is_none() {
            return Err(LayoutError::NoControllers(mountinfo));
        }
        Ok(layout)
    }

    fn from_mountinfo(text: &str, root: &Path) -> Self {
        let mut layout = Self::default();
        for line in text.lines() {
            let Some((pre, post)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = pre.split(' ').nth(4) else {
                continue;
            };
            let mut post = post.split(' ');
            let (Some(fstype), Some(_source), Some(options)) =
                (post.next(), post.next(), post.next())
            else {
                continue;
            };
            let path = kfile::under(root, &unescape(mount_point));
            match fstype {
                "cgroup2" => {
                    layout.unified.get_or_insert(path);
                }
                "cgroup" => {
                    for opt in options.split(',') {
                        if is_v1_controller(opt) {
                            layout
                                .v1
                                .entry(opt.to_string())
                                .or_insert_with(|| path.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        layout
    }

    /// Which hierarchy the figures come from; `None` when no controller is mounted anywhere.
    pub fn mode(&self) -> Option<Mode> {
        if self.unified.is_some() && self.unified_has_controllers {
            Some(Mode::V2)
        } else if self.v1.contains_key("memory") || self.v1.contains_key("cpuacct") {
            Some(Mode::V1)
        } else {
            None
        }
    }

    /// The hierarchy that discovery scans: the one the figures come from.
    pub fn primary(&self) -> Option<&Path> {
        match self.mode()? {
            Mode::V2 => self.unified.as_deref(),
            Mode::V1 => ["memory", "pids", "cpuacct"]
                .iter()
                .find_map(|c| self.v1.get(*c))
                .map(PathBuf::as_path),
        }
    }

    pub fn controller(&self, name: &str) -> Option<&Path> {
        self.v1.get(name).map(PathBuf::as_path)
    }
}

fn is_v1_controller(opt: &str) -> bool {
    matches!(
        opt,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "blkio"
            | "pids"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "hugetlb"
            | "rdma"
            | "misc"
    ) || opt.starts_with("name=")
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u16, |acc, c| acc * 8 + u16::from(c - b'0'));
                out.push((v & 0xff) as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bytes read and written on the devices that are not excluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoBytes {
    pub read: u64,
    pub write: u64,
}

/// Limits change rarely (an admin's `pct set`); they are re-read at most this often.
pub const LIMITS_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Limits that bound the container; `None` means unlimited at the container's level.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// CPU quota in cores (quota / period).
    pub cpu_quota_cores: Option<f64>,
    /// CPUs in the container's effective cpuset.
    pub cpuset_cpus: Option<u32>,
    pub memory_bytes: Option<u64>,
    pub swap_bytes: Option<u64>,
    /// The CFS quota and period as configured (µs; v2 `cpu.max`, v1 `cpu.cfs_quota_us` and
    /// `cpu.cfs_period_us`); the quota `None` when unlimited. Both `None` with the throttling
    /// figures off.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: Option<u64>,
    /// v2 `memory.high` (throttling threshold below `memory.max`); `None` when `max`, on v1,
    /// or with the memory details off.
    pub memory_high_bytes: Option<u64>,
    /// `pids.max`; `None` when `max` or with the memory details off (`enable_memory_details`
    /// covers the extra limits).
    pub pids_max: Option<u64>,
}

/// What reading a cgroup gives.
pub type Sampled = Result<CgroupSample, ReadError>;

/// One reading of a container's cgroup figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupSample {
    pub cpu_usage_ns: u64,
    /// When the CPU counter was read: the middle of its read, so that a thread preempted
    /// during it (a loaded host) shifts the rate's clock by half that time at most.
    pub cpu_read_at: Option<Instant>,
    /// In use, excluding page cache.
    pub memory_bytes: u64,
    pub swap_bytes: u64,
    pub io: IoBytes,
    /// Tasks (threads) in the subtree.
    pub threads: u64,
    /// Processes in the subtree.
    pub processes: u64,
    pub limits: Limits,
    pub details: details::Details,
}

/// Buffers a reader reuses from one container to the next: the text of the last file read,
/// and the subtree's pids.
#[derive(Debug, Default)]
pub struct Scratch {
    pub buf: Vec<u8>,
    pub pids: Vec<u32>,
}

/// The figures each hierarchy reads its own way: CPU time (ns), memory and swap in use, block
/// I/O; and when the CPU time was read.
struct OwnFigures(u64, u64, u64, IoBytes, Instant);

/// `read`'s result and the middle of the time it took.
fn timed<T>(read: impl FnOnce() -> T) -> (T, Instant) {
    let before = Instant::now();
    let out = read();
    let after = Instant::now();
    (out, before + after.duration_since(before) / 2)
}

/// Parses a block I/O file: the totals over the devices not excluded, and each such device
/// into the list when one is given.
type IoParser = fn(&str, &DeviceFilter, Option<&mut Vec<details::DeviceIo>>) -> IoBytes;

/// Block I/O from `file`: the totals when the caller wants them (`totals`: the BPF collector
/// counts them otherwise), per device into `per_device` when that is on. No read when neither
/// is wanted or the controller is not there.
fn read_io(
    file: Option<&KFile>,
    devices: &DeviceFilter,
    totals: bool,
    per_device: Option<&mut Vec<details::DeviceIo>>,
    buf: &mut Vec<u8>,
    parse: IoParser,
) -> Result<IoBytes, ReadError> {
    let Some(f) = file.filter(|_| totals || per_device.is_some()) else {
        return Ok(IoBytes::default());
    };
    let io = parse(f.read(buf)?, devices, per_device);
    Ok(if totals { io } else { IoBytes::default() })
}

/// What both hierarchies read alike: threads from `pids.current`, the processes of the
/// subtree, and the limits, re-read at most every [`LIMITS_TTL`].
#[derive(Debug)]
struct SharedFiles {
    /// cftype read_s64: regenerated by each read, safe to hold.
    pids_current: Option<KFile>,
    subtree: Subtree,
    /// The limits and when they were read; `None` to read them at the next sample.
    limits: Option<(std::time::Instant, Limits)>,
}

impl SharedFiles {
    fn new(pids_current: Option<KFile>, subtree: Subtree) -> Self {
        Self {
            pids_current,
            subtree,
            limits: None,
        }
    }

    fn finish(
        &mut self,
        own: OwnFigures,
        details: details::Details,
        Scratch { buf, pids }: &mut Scratch,
        read_limits: impl FnOnce(&mut Vec<u8>) -> Result<Limits, ReadError>,
    ) -> Result<CgroupSample, ReadError> {
        let threads = match &self.pids_current {
            Some(f) => f.read_u64(buf)?,
            None => 0,
        };
        self.subtree.pids(buf, pids)?;
        let limits = match self.limits {
            Some((at, l)) if at.elapsed() < LIMITS_TTL => l,
            _ => {
                let l = read_limits(buf)?;
                self.limits = Some((std::time::Instant::now(), l));
                l
            }
        };
        let OwnFigures(cpu_usage_ns, memory_bytes, swap_bytes, io, cpu_read_at) = own;
        Ok(CgroupSample {
            cpu_usage_ns,
            cpu_read_at: Some(cpu_read_at),
            memory_bytes,
            swap_bytes,
            io,
            threads,
            processes: pids.len() as u64,
            limits,
            details,
        })
    }
}

/// Whether the cgroup `rel` or one below it holds a process: `populated` of its unified-tree
/// `cgroup.events` (one small read, no file held). `None` where that file is not there (pure
/// v1, a cgroup only in the v1 hierarchies): the caller reads the process lists instead.
pub fn populated(layout: &Layout, rel: &Path) -> Option<bool> {
    let dir = layout.unified.as_deref()?.join(rel);
    let text = kfile::read_to_string(&dir.join("cgroup.events")).ok()?;
    kfile::keyed_value(&text, "populated").map(|n| n != 0)
}

/// Per-container reader with its files held open.
#[derive(Debug)]
pub enum CgroupReader {
    V1(v1::Reader),
    V2(v2::Reader),
}

impl CgroupReader {
    /// Opens the reader for the container whose cgroup is `rel` below each hierarchy's root.
    /// `watcher` reports child cgroups created or removed; without one the subtree is checked
    /// by mtime.
    /// `details` says which figures beyond the seed's are read (their files opened); `lean`
    /// that descriptors are short (see [`Self::release_rare`]).
    pub fn open(
        layout: &Layout,
        rel: &Path,
        watcher: Option<Arc<Watcher>>,
        details: DetailOptions,
        lean: bool,
    ) -> Result<Self, ReadError> {
        match layout.mode() {
            Some(Mode::V2) | None => {
                let unified = layout.unified.as_deref().unwrap_or(Path::new("/"));
                Ok(Self::V2(v2::Reader::open(
                    unified.join(rel),
                    watcher,
                    details,
                    lean,
                )?))
            }
            Some(Mode::V1) => Ok(Self::V1(v1::Reader::open(
                layout, rel, watcher, details, lean,
            )?)),
        }
    }

    /// Descriptors are short: the limit files (read every [`LIMITS_TTL`]) and the child
    /// cgroups' `cgroup.procs` are opened for each read from now on, at about 4 µs per open
    /// here, rather than held. How many descriptors that closed.
    pub fn release_rare(&mut self) -> usize {
        match self {
            Self::V1(r) => r.release_rare(),
            Self::V2(r) => r.release_rare(),
        }
    }

    /// Switches the figures beyond the seed's on or off (a reloaded configuration), opening or
    /// closing their files; the limits are read again at the next sample.
    pub fn set_details(&mut self, details: DetailOptions) -> Result<(), ReadError> {
        match self {
            Self::V1(r) => r.set_details(details),
            Self::V2(r) => r.set_details(details),
        }
    }

    /// Controllers that are not there for this cgroup, so their figures read 0.
    pub fn missing(&self) -> Vec<&'static str> {
        let (names, present) = match self {
            Self::V1(r) => (v1::CONTROLLERS, r.present()),
            Self::V2(r) => (v2::CONTROLLERS, r.present()),
        };
        names
            .into_iter()
            .zip(present)
            .filter(|(_, there)| !there)
            .map(|(name, _)| name)
            .collect()
    }

    /// Reads the figures. `io_totals: false` leaves the block I/O totals at 0 (counted
    /// elsewhere); the block I/O file is then read only for the per-device figures, if on.
    pub fn sample(&mut self, devices: &DeviceFilter, io_totals: bool, s: &mut Scratch) -> Sampled {
        match self {
            Self::V1(r) => r.sample(devices, io_totals, s),
            Self::V2(r) => r.sample(devices, io_totals, s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_read_is_dated_at_its_middle() {
        let d = std::time::Duration::from_millis(40);
        let start = Instant::now();
        let ((), at) = timed(|| std::thread::sleep(d));
        let end = Instant::now();
        // Not the moment before the read nor after it: at least half the read from each.
        assert!(
            at.duration_since(start) >= d / 2,
            "{:?}",
            at.duration_since(start)
        );
        assert!(end.duration_since(at) >= d / 2 - std::time::Duration::from_millis(1));
    }

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
38 31 0:33 / /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
";

    #[test]
    fn hybrid_mountinfo() {
        let layout = Layout::from_mountinfo(HYBRID, Path::new("/r"));
        assert_eq!(
            layout.unified.as_deref(),
            Some(Path::new("/r/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            layout.controller("cpu"),
            Some(Path::new("/r/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(layout.controller("cpuacct"), layout.controller("cpu"));
        assert_eq!(
            layout.controller("name=systemd"),
            Some(Path::new("/r/sys/fs/cgroup/systemd"))
        );
        assert_eq!(layout.mode(), Some(Mode::V1));
        assert_eq!(layout.primary(), Some(Path::new("/r/sys/fs/cgroup/memory")));
    }

    #[test]
    fn pure_v2_mountinfo() {
        let text = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let mut layout = Layout::from_mountinfo(text, Path::new("/"));
        layout.unified_has_controllers = true;
        assert_eq!(layout.mode(), Some(Mode::V2));
        assert_eq!(layout.primary(), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn escaped_mount_points() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/tail\04"), r"/tail\04");
    }
}
