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
/// `Array<u64>` with one element: bit `L` (below [`MAX_TRACKED_LEVEL`]) set when some tracked
/// cgroup sits at level `L`; the high 32 bits count changes of the tracked set (the generation
/// the scheduler programs' cached slots are valid for).
pub const MAP_TRACKED_LEVELS: &str = "LXCMON_LEVELS";
/// `Array<u64>` of [`SLOT_INDEX_SIZE`] entries: the tracked containers direct-mapped by cgroup
/// id (entry [`slot_index_pos`]`(id)`, encoded by [`slot_index_entry`]), so a program finds a
/// container with one array load instead of a hash lookup (about 90 ns per event measured on
/// this host's block tracepoint). Ids sharing an entry, and ids the entry cannot hold, are
/// marked [`SLOT_INDEX_SHARED`] there and looked up in [`MAP_TRACKED`], which always holds all.
pub const MAP_SLOT_INDEX: &str = "LXCMON_SLOT_INDEX";
/// Entries of [`MAP_SLOT_INDEX`] (128 KiB): at most a quarter full at [`MAX_CONTAINERS`].
pub const SLOT_INDEX_SIZE: u32 = 16384;
/// The id bits an entry holds: the kernfs inode (low 32 bits) and 19 bits of its generation.
pub const SLOT_INDEX_ID_MASK: u64 = (1 << 51) - 1;
/// Set in an entry when some tracked id at this position is not the one it holds.
pub const SLOT_INDEX_SHARED: u64 = 1 << 51;
const SLOT_INDEX_SLOT_SHIFT: u32 = 52;
const _: () = assert!(MAX_CONTAINERS <= 1 << (64 - SLOT_INDEX_SLOT_SHIFT));
const _: () = assert!(SLOT_INDEX_SIZE.is_power_of_two());

/// The entry of [`MAP_SLOT_INDEX`] a cgroup id maps to (its inode's low bits: cgroup inodes are
/// allocated in sequence, so the tracked ones spread).
#[inline(always)]
pub const fn slot_index_pos(id: u64) -> u32 {
    (id as u32) & (SLOT_INDEX_SIZE - 1)
}

/// Whether an entry can hold `id` (a generation beyond 19 bits never happens in practice).
#[inline(always)]
pub const fn slot_index_holds(id: u64) -> bool {
    id != 0 && id & !SLOT_INDEX_ID_MASK == 0
}

/// The entry holding `id` at `slot` (`id` must satisfy [`slot_index_holds`]): one 8-byte word,
/// so a program never reads one container's id with another's slot.
#[inline(always)]
pub const fn slot_index_entry(id: u64, slot: u32, shared: bool) -> u64 {
    id | ((slot as u64) << SLOT_INDEX_SLOT_SHIFT) | if shared { SLOT_INDEX_SHARED } else { 0 }
}

/// The slot `entry` holds for `id`, if it holds `id`.
#[inline(always)]
pub const fn slot_index_match(entry: u64, id: u64) -> Option<u32> {
    if entry & SLOT_INDEX_ID_MASK == id && id != 0 {
        Some((entry >> SLOT_INDEX_SLOT_SHIFT) as u32)
    } else {
        None
    }
}

/// `HashMap<u32 kernel dev_t, u8>`: block devices whose I/O is not counted.
pub const MAP_EXCLUDED_DEVS: &str = "LXCMON_EXCLDEV";
/// `Array<u64>` of [`EXCLDEV_INDEX_SIZE`] entries: the excluded devices direct-mapped by
/// [`excldev_pos`], so a counted bio's device is checked with one array load instead of a hash
/// lookup. An entry is 0, or [`EXCLDEV_PRESENT`] with one excluded `dev_t` in its low 32 bits,
/// plus [`EXCLDEV_SHARED`] when another excluded device maps there too (then the programs ask
/// [`MAP_EXCLUDED_DEVS`], which always holds all).
pub const MAP_EXCLDEV_INDEX: &str = "LXCMON_EXCLDEV_INDEX";
pub const EXCLDEV_INDEX_SIZE: u32 = 1024;
pub const EXCLDEV_PRESENT: u64 = 1 << 32;
pub const EXCLDEV_SHARED: u64 = 1 << 33;
const _: () = assert!(EXCLDEV_INDEX_SIZE.is_power_of_two());

/// The entry of [`MAP_EXCLDEV_INDEX`] a kernel `dev_t` (major << 20 | minor) maps to: a
/// device's minors (partitions, loop and dm numbers) land on consecutive entries.
#[inline(always)]
pub const fn excldev_pos(dev: u32) -> u32 {
    (dev >> 20).wrapping_mul(31).wrapping_add(dev & 0xf_ffff) & (EXCLDEV_INDEX_SIZE - 1)
}

/// `BPF_MAP_TYPE_CGROUP_STORAGE` keyed by the cgroup id alone (Linux 5.9+: one value per
/// cgroup, shared by its ingress and egress attachments): the attached container's counter
/// slot plus one, written by the agent right after attaching; 0 (not written yet) sends the
/// programs to the ancestor walk.
pub const MAP_SKB_SLOT: &str = "LXCMON_SKB_SLOT";

/// Program names in the object. The `cgroup_skb` pair reads the slot from [`MAP_SKB_SLOT`];
/// the `_WALK` pair (kernels without that map) only walks the tracked ancestors.
pub const PROG_SKB_INGRESS: &str = "lxcmon_skb_ingress";
pub const PROG_SKB_EGRESS: &str = "lxcmon_skb_egress";
pub const PROG_SKB_INGRESS_WALK: &str = "lxcmon_walk_ingress";
pub const PROG_SKB_EGRESS_WALK: &str = "lxcmon_walk_egress";
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

/// Run-queue wait: a per-CPU array of [`LatencyHist`] by [`TrackedCgroup::slot`].
pub const MAP_RUNQ_HIST: &str = "LXCMON_RUNQ";
/// Per-CPU array of [`RARE_EVENTS`] counters of rare kernel-side conditions (see
/// [`RARE_RUNQ_CLOCK_BEHIND`]), logged by the agent when they grow.
pub const MAP_RARE: &str = "LXCMON_RARE";

/// `tp_btf/sched_switch`: the task switched in stops waiting; its wait is the kernel's own
/// `sched_info` figure (run-queue clock now minus its enqueue time).
pub const PROG_SCHED_SWITCH: &str = "lxcmon_sched_switch";

/// Global holding [`SchedOffsets`].
pub const GLOBAL_SCHED_OFFSETS: &str = "LXCMON_SCHED_OFF";

/// Rare-condition counters in [`MAP_RARE`]: a tracked task switched in with an enqueue time
/// after its run-queue's clock (a stamp from another CPU's clock): that wait is not counted.
pub const RARE_RUNQ_CLOCK_BEHIND: u32 = 0;
/// A tracked container's request completed without the block layer's start time (its queue
/// keeps none: `iostats` off and no I/O scheduler): not timed.
pub const RARE_IOLAT_NO_START: u32 = 1;
pub const RARE_EVENTS: u32 = 2;
/// The aya-log ring buffer the programs log rare conditions to (aya-log's own name).
pub const MAP_BPF_LOG: &str = "AYA_LOGS";

/// Buckets of a latency histogram: bucket `i < LATENCY_BOUNDED` holds waits of at most
/// `LATENCY_FIRST_BOUND_NS << i` (1 µs, 2 µs, ... 2^23 µs ≈ 8.4 s); the last one the rest.
pub const LATENCY_BOUNDED: usize = 24;
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDED + 1;
pub const LATENCY_FIRST_BOUND_NS: u64 = 1000;

/// The bucket of a latency of `ns` nanoseconds: the smallest `i` with
/// `ns <= LATENCY_FIRST_BOUND_NS << i`, or the overflow bucket. Branch-bounded, no loop, so the
/// BPF side can use it as is.
#[inline(always)]
pub fn latency_bucket(ns: u64) -> usize {
    // ceil(ns / 1000) <= 2^i  <=>  q + 1 <= 2^i with q = (ns - 1) / 1000.
    let q = ns.saturating_sub(1) / LATENCY_FIRST_BOUND_NS;
    if q == 0 {
        return 0;
    }
    let mut v = q;
    let mut n = 0usize;
    if v >> 32 != 0 {
        v >>= 32;
        n += 32;
    }
    if v >> 16 != 0 {
        v >>= 16;
        n += 16;
    }
    if v >> 8 != 0 {
        v >>= 8;
        n += 8;
    }
    if v >> 4 != 0 {
        v >>= 4;
        n += 4;
    }
    if v >> 2 != 0 {
        v >>= 2;
        n += 2;
    }
    if v >> 1 != 0 {
        n += 1;
    }
    // n = floor(log2(q)); the bound 2^(n+1) is the first >= q + 1.
    if n + 1 >= LATENCY_BOUNDED {
        LATENCY_BOUNDED
    } else {
        n + 1
    }
}

/// One CPU's share of a container's latency histogram (per-bucket counts, not cumulative).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencyHist {
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of the latencies, nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHist {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &LatencyHist) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// Byte offsets the scheduler program needs to read a task's cgroup v2 and its wait, from the
/// running kernel's BTF. `enabled == 0` leaves the program idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedOffsets {
    pub enabled: u32,
    /// `task_struct`: `cgroups` (the css_set).
    pub task_cgroups: u32,
    /// `task_struct`: `sched_info.last_queued` (run-queue clock when it was enqueued, 0 when
    /// not waiting) and `se.cfs_rq` (its CPU's CFS queue, set for every class).
    pub task_last_queued: u32,
    pub task_se_cfs_rq: u32,
    /// `cfs_rq.rq` (its CPU's run-queue) and `rq.clock` (the clock `sched_info` reads).
    pub cfs_rq_rq: u32,
    pub rq_clock: u32,
    /// `css_set` `dfl_cgrp`: the task's cgroup in the v2 hierarchy.
    pub cset_dfl_cgrp: u32,
    /// `cgroup`: `level`, `kn`; `kernfs_node`: `__parent` (or `parent`), `id`.
    pub cgrp_level: u32,
    pub cgrp_kn: u32,
    pub kn_parent: u32,
    pub kn_id: u32,
}

/// Block I/O latency: a per-CPU array of [`LatencyHist`] indexed by `slot * 2 + write`
/// (0: reads, 1: writes).
pub const MAP_IOLAT_HIST: &str = "LXCMON_IOLAT";
/// Block I/O latency: an array of [`IO_BIOS`] [`IoStart`] entries, a tracked container's bio
/// at [`bio_index`] of its first sector until its request completes. A fixed array, not a hash:
/// writing an entry takes no lock and allocates nothing, and an entry nothing consumes (a bio
/// merged behind another request's first bio) is simply overwritten later: bounded by
/// construction.
pub const MAP_IOLAT_BIOS: &str = "LXCMON_IOLAT_BIOS";
/// Block I/O latency: one [`IO_BIOS`]-byte value, byte `i` non-zero while entry `i` of
/// [`MAP_IOLAT_BIOS`] may hold a bio. Completion reads it first: the host's requests (most of
/// them, on most hosts) then touch these 16 KiB, which stay in cache, not a line of the
/// 384 KiB array that is cold by then (with its page's TLB entry).
pub const MAP_IOLAT_LIVE: &str = "LXCMON_IOLAT_LIVE";
/// Entries of [`MAP_IOLAT_BIOS`]: a power of two (`1 << IO_BIOS_BITS`). Two bios in flight at
/// the same index: the later one wins, the earlier request is not timed (with `k` requests in
/// flight, about `k / IO_BIOS` of them).
pub const IO_BIOS_BITS: u32 = 14;
pub const IO_BIOS: u32 = 1 << IO_BIOS_BITS;

/// The [`MAP_IOLAT_BIOS`] index of a bio, from its first sector (a request's first sector is
/// its first bio's; the verifier allows no arithmetic on the bio's address). Fibonacci
/// hashing: the product's top bits depend on every bit, so the sectors of sequential I/O
/// spread over the array.
#[inline(always)]
pub fn bio_index(sector: u64) -> u32 {
    (sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - IO_BIOS_BITS)) as u32
}

/// `tp_btf/block_bio_queue`: remembers a tracked container's bio.
pub const PROG_IOLAT_BIO: &str = "lxcmon_iolat_bio";
/// Its variant for kernels before 5.11 (`block_bio_queue(q, bio)`).
pub const PROG_IOLAT_BIO_OLD: &str = "lxcmon_iolat_bio_old";
/// `tp_btf/block_rq_complete`: a remembered request's latency (the block layer's own start
/// time to now) goes into the container's histogram.
pub const PROG_IOLAT_COMPLETE: &str = "lxcmon_iolat_complete";
/// Global holding [`BlkLatOffsets`].
pub const GLOBAL_BLK_OFFSETS: &str = "LXCMON_BLK_OFF";

/// A tracked container's bio on its way to a request: its address (0: a free entry), its
/// first sector (checked against the request's at completion: a freed bio's address reused by
/// another bio), `slot * 2 + write` and the tracking generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoStart {
    pub bio: u64,
    pub sector: u64,
    pub slot: u32,
    pub generation: u32,
}

/// Byte offsets the block latency programs need, from the running kernel's BTF.
/// `enabled == 0` leaves them idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkLatOffsets {
    pub enabled: u32,
    /// 1 before 5.11, where `block_bio_queue` takes the queue first: the agent then attaches
    /// the `_old` program.
    pub old_args: u32,
    /// `request`: `bio`, `__sector`, `__data_len` (bytes left), `start_time_ns` (when the block
    /// layer made it: the start of the span `/proc/diskstats` times); `bio`: `bi_opf`,
    /// `bi_iter.bi_sector`.
    pub rq_bio: u32,
    pub rq_sector: u32,
    pub rq_data_len: u32,
    pub rq_start_ns: u32,
    pub bio_opf: u32,
    pub bio_sector: u32,
}

/// TCP retransmits: a per-CPU array of `u64` by [`TrackedCgroup::slot`], segments the
/// container's sockets retransmitted.
pub const MAP_TCP_RETRANS: &str = "LXCMON_RETRANS";
/// `tp_btf/tcp_retransmit_skb`: adds the growth of the socket's `total_retrans` (the
/// segments it added to `RetransSegs`) to the socket's container.
pub const PROG_TCP_RETRANS: &str = "lxcmon_tcp_retransmit";
/// An LRU hash by socket address: a tracked container's socket's `total_retrans` at its last
/// retransmit, and its connection.
pub const MAP_TCP_SEEN: &str = "LXCMON_RETRANS_SEEN";
/// A value of [`MAP_TCP_SEEN`]: the socket's `total_retrans` at its last retransmit, and its
/// connection (`skc_portpair`, `skc_addrpair`), so a socket made later at the same address is
/// known as another one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSeen {
    pub total: u32,
    pub ports: u32,
    pub addrs: u64,
}

/// Sockets [`MAP_TCP_SEEN`] has room for: the least recently retransmitting go first (their
/// next retransmit counts its own segments).
pub const TCP_SEEN_SOCKETS: u32 = 16384;

/// `tp_btf/tcp_destroy_sock`: lets go of a socket's entry in [`MAP_TCP_SEEN`] when the socket
/// goes (named apart from `lxcmon_tcp_*`, the programs that count).
pub const PROG_TCP_DESTROY: &str = "lxcmon_sk_destroy";
/// `tp_btf/tcp_retransmit_synack`: adds 1 to the listening socket's container per SYN-ACK sent
/// again (the kernel's `RetransSegs` counts those too).
pub const PROG_TCP_SYNACK: &str = "lxcmon_tcp_synack";
/// Global holding [`TcpOffsets`].
pub const GLOBAL_TCP_OFFSETS: &str = "LXCMON_TCP_OFF";

/// Byte offsets the TCP retransmit program needs, from the running kernel's BTF.
/// `enabled == 0` leaves it idle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    pub enabled: u32,
    /// 1 where the tracepoint has a third argument, `int err` (Linux 6.17+: it then fires for
    /// failed retransmits too, which are skipped; before, only for sent ones).
    pub err_arg: u32,
    /// `sock` `sk_cgrp_data.cgroup`: the socket's cgroup v2 (Linux 5.15+).
    pub sk_cgrp: u32,
    /// `sk_buff` `cb` + `tcp_skb_cb` `tcp_gso_segs`: `tcp_skb_pcount(skb)`, the segments of
    /// a socket's first retransmit the program sees.
    pub skb_segs: u32,
    /// `tcp_sock` `total_retrans`: the socket's own sum of what the kernel added to
    /// `RetransSegs`; its growth between two calls is what the later one counts.
    pub tp_total_retrans: u32,
    /// `sock` `__sk_common.skc_addrpair` and `skc_portpair`: the connection, so a socket
    /// freed and another made at the same address is not taken for the same one.
    pub sk_addrpair: u32,
    pub sk_portpair: u32,
    /// `cgroup`: `level`, `kn`; `kernfs_node`: `__parent` (or `parent`), `id`.
    pub cgrp_level: u32,
    pub cgrp_kn: u32,
    pub kn_parent: u32,
    pub kn_id: u32,
}

// SAFETY: all are `#[repr(C)]`, made of integers only, without padding.
#[cfg(feature = "aya")]
unsafe impl aya::Pod for TrackedCgroup {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for Counters {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for KernelOffsets {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for LatencyHist {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for SchedOffsets {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for IoStart {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for BlkLatOffsets {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for TcpOffsets {}
#[cfg(feature = "aya")]
unsafe impl aya::Pod for TcpSeen {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_index_entries_hold_the_id_and_slot_in_one_word() {
        let id = (1u64 << 32) | 0x1234_5678; // generation 1, as the kernel's first cycle
        assert!(slot_index_holds(id));
        for slot in [0, 1, MAX_CONTAINERS - 1] {
            for shared in [false, true] {
                let e = slot_index_entry(id, slot, shared);
                assert_eq!(slot_index_match(e, id), Some(slot));
                assert_eq!(e & SLOT_INDEX_SHARED != 0, shared);
                // Another id at the same position is not matched, nor the id's neighbours.
                assert_eq!(slot_index_match(e, id + SLOT_INDEX_SIZE as u64), None);
                assert_eq!(slot_index_match(e, id + 1), None);
                assert_eq!(slot_index_match(e, id ^ (1 << 32)), None);
            }
        }
        assert_eq!(slot_index_pos(id), 0x5678 & (SLOT_INDEX_SIZE - 1));
        // Nothing matches an empty entry or a shared-only one, not even id 0.
        for e in [0, SLOT_INDEX_SHARED] {
            assert_eq!(slot_index_match(e, 0), None);
            assert_eq!(slot_index_match(e, id), None);
        }
        assert!(!slot_index_holds(0));
        assert!(!slot_index_holds(1 << 51), "a generation beyond 19 bits");
        assert!(slot_index_holds(SLOT_INDEX_ID_MASK));
    }

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        let cases = [
            (0, 0),
            (1, 0),
            (1000, 0),
            (1001, 1),
            (2000, 1),
            (2001, 2),
            (4000, 2),
            (4001, 3),
            (1_000_000, 10), // 1 ms <= 1024 us
            (1_024_000, 10),
            (1_024_001, 11),
            ((1000u64 << 23), 23),
            ((1000u64 << 23) + 1, LATENCY_BOUNDED),
            (u64::MAX, LATENCY_BOUNDED),
        ];
        for (ns, want) in cases {
            assert_eq!(latency_bucket(ns), want, "{ns} ns");
        }
        // Every value lands in the first bucket whose bound holds it.
        for ns in (1..40_000_000u64).step_by(997) {
            let b = latency_bucket(ns);
            assert!(ns <= LATENCY_FIRST_BOUND_NS << b || b == LATENCY_BOUNDED);
            assert!(b == 0 || ns > LATENCY_FIRST_BOUND_NS << (b - 1), "{ns}");
        }
    }
}
