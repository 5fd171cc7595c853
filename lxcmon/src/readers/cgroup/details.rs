//! Figures beyond the seed's, read from the same cgroup: pressure (PSI), CPU throttling,
//! memory events and breakdown, block I/O per device. Each is `None` (or empty) where the
//! kernel or the layout does not have it: absent, never 0.

use super::LIMITS_TTL;
use crate::readers::kfile::{keyed_values, KFile, ReadError};
use crate::readers::sysfs::DeviceFilter;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// Cumulative stall time of one resource: the `total=` fields of its `*.pressure` file, in
/// microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stall {
    /// Time at least one task was stalled on the resource.
    pub some_us: u64,
    /// Time all non-idle tasks were stalled at once; `None` where the kernel has no `full`
    /// line (cpu before 5.13).
    pub full_us: Option<u64>,
}

/// PSI of the container's cgroup (on hybrid hosts: its directory in the unified tree).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub cpu: Option<Stall>,
    pub memory: Option<Stall>,
    pub io: Option<Stall>,
}

/// CFS bandwidth figures (v2 `cpu.stat`, v1 `cpu.stat` of the `cpu` controller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttling {
    /// Enforcement periods that elapsed with runnable tasks.
    pub periods: u64,
    /// Periods in which the quota ran out.
    pub throttled_periods: u64,
    /// Time the cgroup's tasks were held back by the quota.
    pub throttled_ns: u64,
}

/// Memory limit hits and OOM kills: the kernel's own cumulative counters for the cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// v2 `high`: times reclaim was forced by `memory.high`.
    pub high: Option<u64>,
    /// v2 `max`: times usage was about to exceed `memory.max`; v1 `memory.failcnt` +
    /// `memory.memsw.failcnt` (times a charge hit the memory or the memory+swap limit). A v1
    /// container without swap has both limits equal and its hits land on memsw, which recent
    /// kernels no longer count (`track_failcnt` is off for memsw; seen on this host's 6.18):
    /// there v1 under-reports, while `oom_kill` stays exact.
    pub max: Option<u64>,
    /// v2 `oom`: times the OOM killer was invoked (allocation failing at the limit).
    pub oom: Option<u64>,
    /// Processes killed by the OOM killer (v2 `oom_kill`, v1 `oom_kill` of
    /// `memory.oom_control`).
    pub oom_kill: Option<u64>,
    /// v2 `oom_group_kill` (5.17+).
    pub oom_group_kill: Option<u64>,
    /// `memory.swap.events` `high`, `max`, `fail`.
    pub swap_high: Option<u64>,
    pub swap_max: Option<u64>,
    pub swap_fail: Option<u64>,
}

/// Where the container's memory is, from `memory.stat` (v1: the `total_*` keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryBreakdown {
    /// Anonymous memory (v1 `total_rss`).
    pub anon_bytes: Option<u64>,
    /// Page cache (v1 `total_cache`).
    pub file_bytes: Option<u64>,
    /// Kernel memory: v2 `kernel` (5.18+, else `kernel_stack` + `pagetables` + `slab` +
    /// `sock` + `vmalloc` + `percpu`); v1 `memory.kmem.usage_in_bytes`.
    pub kernel_bytes: Option<u64>,
    pub slab_bytes: Option<u64>,
    pub shmem_bytes: Option<u64>,
    pub dirty_bytes: Option<u64>,
    pub writeback_bytes: Option<u64>,
    /// Pages faulted back in soon after eviction: thrashing (v2 `workingset_refault_anon` +
    /// `workingset_refault_file`, or `workingset_refault` before 5.9).
    pub workingset_refaults: Option<u64>,
    /// Major page faults (`pgmajfault`; v1 `total_pgmajfault`).
    pub major_faults: Option<u64>,
}

/// Block I/O of one device (`io.stat` `rbytes`/`wbytes`/`rios`/`wios`; v1
/// `blkio.throttle.io_service_bytes_recursive` and `io_serviced_recursive`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceIo {
    pub dev: (u32, u32),
    /// The kernel's name (`sda`, `nvme0n1`), from `/sys/dev/block`; `major:minor` when it has
    /// none. Shared with the device filter's cache.
    pub name: std::sync::Arc<str>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub reads: u64,
    pub writes: u64,
}

/// Which of the figures above are read (the `enable_*` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetailOptions {
    pub pressure: bool,
    pub throttling: bool,
    pub memory_details: bool,
    pub per_device: bool,
}

impl DetailOptions {
    pub const ALL: Self = Self {
        pressure: true,
        throttling: true,
        memory_details: true,
        per_device: true,
    };
    pub const NONE: Self = Self {
        pressure: false,
        throttling: false,
        memory_details: false,
        per_device: false,
    };
}

/// Everything of this module in one reading.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    pub pressure: Pressure,
    pub throttling: Option<Throttling>,
    pub memory_events: MemoryEvents,
    pub memory: MemoryBreakdown,
    /// Devices not excluded by `excluded_devices`, in `io.stat` order.
    pub devices: Vec<DeviceIo>,
}

/// Why a figure is absent, said once per agent (not per cycle, not per container).
#[derive(Debug, Clone, Copy)]
pub(super) enum Absent {
    PsiNoUnified,
    PsiFiles,
    PsiLost,
    V1Throttling,
    V1Kmem,
    V1OomKill,
    V2MemoryEvents,
    V2Throttling,
}

/// `true` the first time `why` is asked about: the caller logs then. One relaxed load on
/// the paths that ask every cycle.
pub(super) fn first_time(why: Absent) -> bool {
    static SAID: AtomicU32 = AtomicU32::new(0);
    let bit = 1u32 << why as u32;
    SAID.load(Ordering::Relaxed) & bit == 0 && SAID.fetch_or(bit, Ordering::Relaxed) & bit == 0
}

/// The error and its cause in one line (readers log without the agent's `Chain`).
fn why(e: &ReadError) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The `total=` of the `some` and `full` lines of a `*.pressure` file; `None` without a
/// `some` line.
pub fn parse_pressure(text: &str) -> Option<Stall> {
    // `total=` is the kernel's last field (psi_show): one reverse byte search, the other
    // fields only looked through if it is not.
    let total = |line: &str| {
        let last = line.trim_end().rsplit_once(' ').map_or(line, |(_, f)| f);
        let value = match last.strip_prefix("total=") {
            Some(v) => v,
            None => line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("total="))?,
        };
        value.parse::<u64>().ok()
    };
    let (mut some, mut full) = (None, None);
    for line in text.lines() {
        if line.starts_with("some ") {
            some = total(line);
        } else if line.starts_with("full ") {
            full = total(line);
        }
    }
    Some(Stall {
        some_us: some?,
        full_us: full,
    })
}

const PSI: [&str; 3] = ["cpu.pressure", "memory.pressure", "io.pressure"];

/// The PSI files of one cgroup directory (v2: the container's; hybrid: its directory in the
/// unified tree), opened read-only: a write would create a PSI trigger.
#[derive(Debug)]
pub(super) struct PressureFiles {
    dir: PathBuf,
    /// cpu, memory, io. seq_show files regenerated by each read at offset 0 (checked on this
    /// host: `total=` grows on a held descriptor).
    files: [Option<KFile>; 3],
    /// Files that failed to read, and when. `cgroup.pressure` set to 0 makes a held PSI file
    /// fail with ENODEV, and it keeps failing when set back to 1 (checked on this host): so a
    /// lost file is opened again, at most every [`LIMITS_TTL`].
    lost: [bool; 3],
    lost_at: Option<Instant>,
    /// How long a lost file waits to be opened again ([`LIMITS_TTL`]).
    retry: std::time::Duration,
}

impl PressureFiles {
    /// `None` when the cgroup has no PSI files (pure v1, a kernel without PSI or booted with
    /// `psi=0`, a cgroup with `cgroup.pressure` 0, no cgroup in the unified tree).
    pub(super) fn open(dir: Option<PathBuf>) -> Result<Option<Self>, ReadError> {
        let Some(dir) = dir else {
            if first_time(Absent::PsiNoUnified) {
                tracing::info!("pressure (PSI) figures are absent: no cgroup v2 tree for the containers (pure cgroup v1)");
            }
            return Ok(None);
        };
        let mut files = [None, None, None];
        for (slot, name) in files.iter_mut().zip(PSI) {
            *slot = KFile::open_optional(dir.join(name))?;
        }
        if files.iter().all(Option::is_none) {
            if first_time(Absent::PsiFiles) {
                tracing::info!(dir = %dir.display(), "pressure (PSI) figures are absent: no *.pressure files (kernel without PSI, booted with psi=0, cgroup.pressure 0, or no cgroup in the v2 tree)");
            }
            return Ok(None);
        }
        Ok(Some(Self {
            dir,
            files,
            lost: [false; 3],
            lost_at: None,
            retry: LIMITS_TTL,
        }))
    }

    /// A file that fails to read gives `None` for its resource, never an error for the
    /// container (the other figures of the cgroup say whether it is gone).
    pub(super) fn read(&mut self, buf: &mut Vec<u8>) -> Pressure {
        if self.lost_at.is_some_and(|at| at.elapsed() >= self.retry) {
            self.lost_at = None;
            for ((slot, lost), name) in self.files.iter_mut().zip(&mut self.lost).zip(PSI) {
                if *lost {
                    if let Ok(Some(f)) = KFile::open_optional(self.dir.join(name)) {
                        *slot = Some(f);
                        *lost = false;
                    } else {
                        self.lost_at = Some(Instant::now());
                    }
                }
            }
        }
        let mut out = [None; 3];
        for (i, slot) in self.files.iter_mut().enumerate() {
            let Some(f) = slot else { continue };
            match f.read(buf) {
                Ok(text) => out[i] = parse_pressure(text),
                Err(e) => {
                    if first_time(Absent::PsiLost) {
                        tracing::info!(error = %why(&e), "a pressure (PSI) file stopped reading (cgroup.pressure set to 0?): that figure is absent until it reads again");
                    }
                    *slot = None;
                    self.lost[i] = true;
                    self.lost_at = Some(Instant::now());
                }
            }
        }
        let [cpu, memory, io] = out;
        Pressure { cpu, memory, io }
    }
}

/// The keys of v2 `memory.stat` this module reads, `file` first (the seed's figure).
pub(super) const V2_STAT_KEYS: [&str; 16] = [
    "file",
    "anon",
    "kernel",
    "kernel_stack",
    "pagetables",
    "slab",
    "sock",
    "vmalloc",
    "percpu",
    "shmem",
    "file_dirty",
    "file_writeback",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_refault",
    "pgmajfault",
];

/// The breakdown from the values of [`V2_STAT_KEYS`].
pub(super) fn v2_breakdown(v: &[Option<u64>; 16]) -> MemoryBreakdown {
    let [file, anon, kernel, stack, pagetables, slab, sock, vmalloc, percpu, shmem, dirty, writeback, ref_anon, ref_file, refault, majfault] =
        *v;
    // Before 5.18 there is no `kernel` line: the sum of its parts, those the kernel has.
    let kernel = kernel.or_else(|| sum([stack, pagetables, slab, sock, vmalloc, percpu]));
    MemoryBreakdown {
        anon_bytes: anon,
        file_bytes: file,
        kernel_bytes: kernel,
        slab_bytes: slab,
        shmem_bytes: shmem,
        dirty_bytes: dirty,
        writeback_bytes: writeback,
        workingset_refaults: sum([ref_anon, ref_file]).or(refault),
        major_faults: majfault,
    }
}

/// The keys of v1 `memory.stat` this module reads (hierarchical `total_*`), the seed's two
/// first.
pub(super) const V1_STAT_KEYS: [&str; 10] = [
    "total_cache",
    "total_swap",
    "total_rss",
    "total_shmem",
    "total_dirty",
    "total_writeback",
    "total_pgmajfault",
    "total_workingset_refault_anon",
    "total_workingset_refault_file",
    "total_workingset_refault",
];

/// The breakdown from the values of [`V1_STAT_KEYS`]; kernel memory comes from its own file,
/// and v1 has no slab figure.
pub(super) fn v1_breakdown(v: &[Option<u64>; 10], kmem: Option<u64>) -> MemoryBreakdown {
    let [cache, _swap, rss, shmem, dirty, writeback, majfault, ref_anon, ref_file, refault] = *v;
    MemoryBreakdown {
        anon_bytes: rss,
        file_bytes: cache,
        kernel_bytes: kmem,
        slab_bytes: None,
        shmem_bytes: shmem,
        dirty_bytes: dirty,
        writeback_bytes: writeback,
        workingset_refaults: sum([ref_anon, ref_file]).or(refault),
        major_faults: majfault,
    }
}

/// The sum of the values present; `None` when none is.
fn sum<const N: usize>(values: [Option<u64>; N]) -> Option<u64> {
    values
        .into_iter()
        .flatten()
        .reduce(|a, b| a.saturating_add(b))
}

/// v2 `memory.events`. It counts the whole subtree (the container's nested cgroups
/// included), as every figure of the container does; `memory.events.local` would not.
pub(super) fn v2_memory_events(text: &str) -> MemoryEvents {
    let [high, max, oom, oom_kill, oom_group_kill] =
        keyed_values(text, ["high", "max", "oom", "oom_kill", "oom_group_kill"]);
    MemoryEvents {
        high,
        max,
        oom,
        oom_kill,
        oom_group_kill,
        ..MemoryEvents::default()
    }
}

/// v2 `memory.swap.events` into `events`.
pub(super) fn v2_swap_events(text: &str, events: &mut MemoryEvents) {
    [events.swap_high, events.swap_max, events.swap_fail] =
        keyed_values(text, ["high", "max", "fail"]);
}

/// Sorts per-device figures into `devices`, by device, keeping first-seen order.
pub(super) fn device_entry<'a>(
    devices: &'a mut Vec<DeviceIo>,
    dev: (u32, u32),
    filter: &DeviceFilter,
) -> &'a mut DeviceIo {
    let i = match devices.iter().position(|d| d.dev == dev) {
        Some(i) => i,
        None => {
            devices.push(DeviceIo {
                dev,
                name: filter.label(dev),
                ..DeviceIo::default()
            });
            devices.len() - 1
        }
    };
    &mut devices[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PSI file that stops reading (ENODEV on the real kernel when `cgroup.pressure` goes
    /// to 0; a directory here, which fails any read) gives `None`, not an error, and is
    /// opened again once it is back.
    #[test]
    fn lost_pressure_file_is_absent_then_reopened() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cpu.pressure")).unwrap();
        std::fs::write(
            dir.path().join("io.pressure"),
            "some total=3\nfull total=1\n",
        )
        .unwrap();
        let mut p = PressureFiles::open(Some(dir.path().to_path_buf()))
            .unwrap()
            .unwrap();
        let mut buf = Vec::new();
        let first = p.read(&mut buf);
        assert_eq!((first.cpu, first.memory), (None, None));
        assert_eq!(
            first.io,
            Some(Stall {
                some_us: 3,
                full_us: Some(1)
            })
        );
        std::fs::remove_dir(dir.path().join("cpu.pressure")).unwrap();
        std::fs::write(dir.path().join("cpu.pressure"), "some total=8\n").unwrap();
        assert_eq!(p.read(&mut buf).cpu, None, "not before the retry time");
        p.retry = std::time::Duration::ZERO;
        assert_eq!(
            p.read(&mut buf).cpu,
            Some(Stall {
                some_us: 8,
                full_us: None
            })
        );
        assert!(p.lost_at.is_none());
        // memory.pressure was never there: not retried, still absent.
        assert_eq!(p.read(&mut buf).memory, None);

        let empty = tempfile::tempdir().unwrap();
        assert!(PressureFiles::open(Some(empty.path().to_path_buf()))
            .unwrap()
            .is_none());
        assert!(PressureFiles::open(None).unwrap().is_none());
    }
}
