//! Types shared by the agent and its BPF programs: `#[repr(C)]`, `no_std`, defined once.
//!
//! The BPF side (`lxcmon-ebpf`) and the userspace loader (`lxcmon::collect::bpf`, feature `ebpf`) agree on
//! these layouts and on the map names below. A change to any of them is a change of the pinned
//! layout: bump [`PIN_LAYOUT_VERSION`] so a new agent does not reuse old pinned maps.
#![no_std]

#[cfg(feature = "fingerprint")]
pub mod fingerprint;

/// Version of the pinned map layout; part of the default pin directory
/// (`<PIN_ROOT>/v<PIN_LAYOUT_VERSION>`, `/sys/fs/bpf/lxcmon/v1`).
pub const PIN_LAYOUT_VERSION: u32 = 1;

/// Where every layout version of the agent's pins lives (`lxcmon --cleanup-bpf` removes it).
pub const PIN_ROOT: &str = "/sys/fs/bpf/lxcmon";

/// How many containers can be tracked at once (size of the counter array and tracked map).
pub const MAX_CONTAINERS: u32 = 4096;

/// Deepest cgroup v2 level (root = 0) at which a tracked container cgroup may sit. The BPF
/// programs try only the levels that hold a tracked cgroup (see [`MAP_TRACKED_LEVELS`]), deepest
/// first, so nested tracked containers are charged to the innermost one.
pub const MAX_TRACKED_LEVEL: u32 = 32;

/// How many excluded block devices the agent can hand to the kernel side.
pub const MAX_EXCLUDED_DEVICES: u32 = 1024;

/// `HashMap<u64 cgroup id, TrackedCgroup>`: container cgroups being counted.
pub const MAP_TRACKED: &str = "LXCMON_TRACKED";
/// `PerCpuArray<Counters>` indexed by [`TrackedCgroup::slot`].
pub const MAP_COUNTERS: &str = "LXCMON_COUNTERS";
/// `Array<u64>` with one element: bit `L` set when some tracked cgroup sits at level `L`.
pub const MAP_TRACKED_LEVELS: &str = "LXCMON_LEVELS";
/// `HashMap<u32 kernel dev_t, u8>`: block devices whose I/O is not counted.
pub const MAP_EXCLUDED_DEVS: &str = "LXCMON_EXCLDEV";

/// Program names in the object.
pub const PROG_SKB_INGRESS: &str = "lxcmon_skb_ingress";
pub const PROG_SKB_EGRESS: &str = "lxcmon_skb_egress";
pub const PROG_BIO_QUEUE: &str = "lxcmon_block_bio_queue";
/// BTF variant of the block program: reads the bio itself, so it can tell page-cache writeback
/// (already counted when the pages were dirtied) from direct I/O.
pub const PROG_BIO_QUEUE_BTF: &str = "lxcmon_bio_queue_btf";
/// Counts page-cache bytes dirtied by a container's tasks (buffered writes).
pub const PROG_DIRTY_FOLIO: &str = "lxcmon_dirty_folio";

/// Global holding [`KernelOffsets`].
pub const GLOBAL_KERNEL_OFFSETS: &str = "LXCMON_KOFF";

/// `folio_nr_pages` source in [`KernelOffsets::folio_nr_mode`].
pub const FOLIO_NR_PAGES_U32: u32 = 1;
pub const FOLIO_NR_ORDER_BYTE: u32 = 2;

/// Byte offsets of kernel struct members, resolved by the agent from `/sys/kernel/btf/vmlinux`
/// at start-up (Rust BPF has no CO-RE). `enabled == 0` leaves the BTF programs idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub enabled: u32,
    pub page_size: u32,
    /// `struct folio`: `flags`, and where its page count lives (see `folio_nr_mode`).
    pub folio_flags: u32,
    pub folio_nr: u32,
    pub folio_nr_mode: u32,
    /// `enum pageflags` `PG_head` (bit number).
    pub pg_head: u32,
    /// `struct folio` `mapping` (also `struct page` `mapping`).
    pub folio_mapping: u32,
    pub as_host: u32,
    pub inode_sb: u32,
    pub sb_dev: u32,
    pub sb_bdi: u32,
    pub bdi_caps: u32,
    /// `struct bio`: `bi_bdev`, `bi_opf`, `bi_iter.bi_size`, `bi_iter.bi_idx`, `bi_io_vec`.
    pub bio_bdev: u32,
    pub bio_opf: u32,
    pub bio_size: u32,
    pub bio_idx: u32,
    pub bio_io_vec: u32,
    /// `struct block_device` `bd_dev`; `struct bio_vec` `bv_page` and its size.
    pub bdev_dev: u32,
    pub bvec_page: u32,
    pub bvec_size: u32,
}

/// Globals the loader sets with the byte offsets of the `block/block_bio_queue` tracepoint
/// record fields, read from its `format` file in tracefs at start-up.
pub const GLOBAL_BIO_DEV_OFF: &str = "LXCMON_BIO_DEV_OFF";
pub const GLOBAL_BIO_NR_SECTOR_OFF: &str = "LXCMON_BIO_NR_SECTOR_OFF";
pub const GLOBAL_BIO_RWBS_OFF: &str = "LXCMON_BIO_RWBS_OFF";

/// A tracked container cgroup: its counter slot and its level in the v2 hierarchy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedCgroup {
    pub slot: u32,
    pub level: u32,
}

/// One CPU's share of a container's cumulative counters (bytes). Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frame bytes delivered to the container's sockets (skb->len at cgroup ingress + 14).
    pub net_rx: u64,
    /// Frame bytes sent by the container's sockets (skb->len at cgroup egress + 14).
    pub net_tx: u64,
    /// Block I/O bytes read, charged to the submitting task's container.
    pub io_read: u64,
    /// Block I/O bytes written, charged to the submitting task's container.
    pub io_write: u64,
}

impl Counters {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &Counters) {
        self.net_rx = self.net_rx.wrapping_add(other.net_rx);
        self.net_tx = self.net_tx.wrapping_add(other.net_tx);
        self.io_read = self.io_read.wrapping_add(other.io_read);
        self.io_write = self.io_write.wrapping_add(other.io_write);
    }
}

// SAFETY: all are `#[repr(C)]`, made of integers only, without padding.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for TrackedCgroup {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Counters {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for KernelOffsets {}
