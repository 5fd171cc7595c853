//! Figures beyond the seed's, read from the same cgroup: pressure (PSI), CPU throttling,
//! memory events and breakdown, block I/O per device. Each is `None` (or empty) where the
//! kernel or the layout does not have it: absent, never 0.

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
    /// v2 `max`: times usage was about to exceed `memory.max`; v1 `memory.failcnt` (times
    /// a charge hit the limit).
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
    /// none.
    pub name: String,
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
