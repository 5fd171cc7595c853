//! The BPF collector (cargo feature `ebpf`): network bytes per container from `cgroup_skb`
//! programs attached to each container's cgroup v2 directory, block I/O bytes from block
//! tracepoints charged to the submitting (or page-dirtying) task's container.
//!
//! One owner per step of the lifecycle, one file each:
//! - [`loader`](self::loader): mounts, the object, its globals (tracepoint record and kernel
//!   struct offsets);
//! - [`block`](self::block): the block programs and how I/O is counted ([`IoMode`]);
//! - [`net`](self::net): the `cgroup_skb` pair attached to each container, and the slot it
//!   reads from the attachment's cgroup storage;
//! - [`tracking`](self::tracking): which containers are counted in which slot, and reading
//!   the counters;
//! - [`pins`](self::pins): pinned or process-held links, the pin directory lock, clean-up;
//! - [`latency`](self::latency): the scheduler programs and the run-queue wait histograms;
//! - [`iolat`](self::iolat): the block request programs and the I/O latency histograms;
//! - [`retrans`](self::retrans): the TCP retransmit program and its per-container counters;
//! - [`counters`]: what the cycle sees (choice of collector, per-container fallback);
//! - [`testing`](self::testing): `BPF_PROG_TEST_RUN` for tests;
//! - [`bpflog`](self::bpflog): the programs' own log lines (aya-log) into the agent's log.
//!
//! The daemon pins maps and links under [`BpfOptions::pin_dir`] (default
//! [`default_pin_dir`]), so counting goes on while the agent restarts and a new agent continues
//! the same cumulative counts; [`cleanup_pinned`] removes everything (uninstall).
//! [`BpfOptions::ephemeral`] (`--once`) pins nothing: everything goes when the process exits.
//!
//! Byte semantics: network counters are frame bytes as the container's (Ethernet) interfaces
//! count them: `skb->len` at the cgroup hooks plus the 14-byte Ethernet header, for sockets of
//! the container's processes, excluding the loopback device; packets the kernel answers itself
//! (ICMP echo, TCP resets without a socket) are not a socket's and are not counted. I/O counters
//! are bytes of bios submitted by the container's tasks, and buffered writes when their pages
//! are dirtied (see `lxcmon-ebpf/README.md`).

mod block;
mod bpflog;
mod btf;
pub mod counters;
mod error;
mod format;
mod iolat;
mod latency;
mod loader;
mod net;
mod pins;
mod retrans;
mod sys;
mod testing;
mod tracking;

use aya::Ebpf;
use lxcmon_common::TrackedCgroup;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use block::IoMode;
pub use error::BpfError;
pub use latency::LatencyMode;
pub use lxcmon_common::Counters;
pub use net::SkbSlot;
pub use pins::{cleanup_all, cleanup_pinned, default_pin_dir};
pub use sys::kernel_dev_t;

/// Where bpffs is mounted.
pub const BPF_FS: &str = "/sys/fs/bpf";
/// Where tracefs is mounted (mounted by [`BpfCollector::load`] when absent).
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// What [`BpfCollector::load`] needs.
#[derive(Debug, Clone)]
pub struct BpfOptions {
    /// Block devices (kernel `dev_t`, see [`kernel_dev_t`]) whose I/O is not counted.
    pub excluded_devices: Vec<u32>,
    /// Pin directory on bpffs for maps and links (locked by the collector while it lives).
    pub pin_dir: PathBuf,
    /// Leave nothing behind (`--once`): no pins, no lock, links held by this process only.
    /// Counts start from the seeds given to [`BpfCollector::track_seeded`].
    pub ephemeral: bool,
    /// Count buffered writes when pages are dirtied ([`IoMode::BiosAndDirtied`]); needs kernel
    /// BTF. Without it, only bios the container's tasks submit themselves are counted.
    pub count_dirtied: bool,
    /// Attach the network programs to tracked containers (`enable_network`).
    pub network: bool,
    /// Attach the scheduler programs (`enable_runqueue_latency`).
    pub runqueue: bool,
    /// Attach the block request programs (`enable_io_latency`).
    pub io_latency: bool,
    /// Attach the TCP retransmit program (`enable_tcp_retransmits`).
    pub tcp_retransmits: bool,
    /// Let the network programs read the container's slot from cgroup storage (where the
    /// kernel has it); off, they walk the tracked ancestors of every packet (tests, cost
    /// comparisons).
    pub skb_storage: bool,
}

impl Default for BpfOptions {
    fn default() -> Self {
        Self {
            excluded_devices: Vec::new(),
            pin_dir: default_pin_dir(),
            ephemeral: false,
            count_dirtied: true,
            network: true,
            runqueue: true,
            io_latency: true,
            tcp_retransmits: true,
            skb_storage: true,
        }
    }
}

/// Per-container byte counters from the kernel side.
pub struct BpfCollector {
    ebpf: Ebpf,
    /// `None` when ephemeral.
    pin_dir: Option<PathBuf>,
    links: pins::Links,
    /// One agent per pin directory (`None` when ephemeral).
    _lock: Option<pins::PinLock>,
    tracked: HashMap<u64, TrackedCgroup>,
    values: HashMap<u64, Counters>,
    ncpus: usize,
    io_mode: IoMode,
    network: bool,
    skb_slot: net::SkbSlot,
    /// `Some(true)` while batched reads work, `Some(false)` once the kernel refused one.
    batched: Option<bool>,
    /// The batched reads' buffers, kept across cycles.
    batch: sys::BatchBuf,
    latency: latency::LatencyState,
    retrans: retrans::RetransState,
    /// The programs' log (rare conditions), drained every refresh.
    log: Option<aya_log::EbpfLogger<bpflog::ToTracing>>,
}

impl std::fmt::Debug for BpfCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfCollector")
            .field("pin_dir", &self.pin_dir)
            .field("tracked", &self.tracked)
            .finish_non_exhaustive()
    }
}

impl BpfCollector {
    /// The pin directory, `None` for an ephemeral collector.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}
