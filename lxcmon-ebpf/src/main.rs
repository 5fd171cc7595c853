//! lxcmon's kernel side: per-container network and block I/O byte counters.
//!
//! * `cgroup_skb` ingress/egress programs, attached by the agent to each container's cgroup v2
//!   directory, add `skb->len` plus the Ethernet header to the container's per-CPU counters; packets on
//!   the loopback device (ifindex 1 in every network namespace) are skipped. The container's
//!   slot is in the attachment's cgroup storage (`LXCMON_SKB_SLOT`), written by the agent; the
//!   ancestor walk below is the fallback (before that write, and on kernels without the map).
//! * The `block/block_bio_queue` tracepoint adds the bio's bytes to the container of the task
//!   that submits it (its cgroup or an ancestor of it), unless its device is in the
//!   excluded-device map.
//!
//! A packet's or task's cgroup may be a sub-cgroup of the container's: the programs look up its
//! ancestors (itself included) at the levels where some container is tracked, deepest first,
//! in the tracked-cgroup map; an untracked cgroup costs one lookup per tracked level (one on
//! a host whose containers all sit at the same depth), none if it sits above them all.
//! Counters are per-CPU, so the hot path has no atomics.
//!
//! * The scheduler programs (`sched.rs`) measure each tracked task's run-queue wait.
//! * The block request programs (`blk_latency.rs`) measure each tracked container's I/O latency.
//! * The TCP retransmit program (`tcp.rs`) counts segments each tracked container's sockets
//!   retransmit.
#![no_std]
#![no_main]

mod blk_latency;
mod kernel;
mod sched;
mod tcp;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_map_type::BPF_MAP_TYPE_CGROUP_STORAGE},
    helpers::bpf_probe_read_kernel,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_local_storage, bpf_skb_ancestor_cgroup_id,
    },
    macros::{btf_map, btf_tracepoint, cgroup_skb, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{BtfTracePointContext, SkBuffContext, TracePointContext},
    Global,
};
use kernel::load;
use lxcmon_common::{
    excldev_pos, slot_index_match, slot_index_pos, Counters, KernelOffsets, TrackedCgroup,
    EXCLDEV_INDEX_SIZE, EXCLDEV_PRESENT, EXCLDEV_SHARED, FOLIO_NR_ORDER_BYTE, FOLIO_NR_PAGES_U32,
    MAX_CONTAINERS, MAX_EXCLUDED_DEVICES, MAX_TRACKED_LEVEL, SLOT_INDEX_SHARED, SLOT_INDEX_SIZE,
};

#[map]
static LXCMON_TRACKED: HashMap<u64, TrackedCgroup> = HashMap::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_SLOT_INDEX: Array<u64> = Array::pinned(SLOT_INDEX_SIZE, 0);

#[map]
static LXCMON_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[map]
pub(crate) static LXCMON_LEVELS: Array<u64> = Array::pinned(1, 0);

#[map]
static LXCMON_EXCLDEV: HashMap<u32, u8> = HashMap::pinned(MAX_EXCLUDED_DEVICES, 0);

#[map]
static LXCMON_EXCLDEV_INDEX: Array<u64> = Array::pinned(EXCLDEV_INDEX_SIZE, 0);

/// Whether block I/O on `dev` is not counted: its entry in the direct-mapped index, the hash
/// only for an entry shared by several excluded devices (see `MAP_EXCLDEV_INDEX`).
#[inline(always)]
fn excluded(dev: u32) -> bool {
    let Some(&entry) = LXCMON_EXCLDEV_INDEX.get(excldev_pos(dev)) else {
        return false;
    };
    if entry & EXCLDEV_PRESENT != 0 && entry as u32 == dev {
        return true;
    }
    // SAFETY: plain lookup.
    entry & EXCLDEV_SHARED != 0 && unsafe { LXCMON_EXCLDEV.get(&dev) }.is_some()
}

/// Byte offsets in the `block/block_bio_queue` record, from its tracefs `format` file.
#[no_mangle]
static LXCMON_BIO_DEV_OFF: Global<u32> = Global::new(8);
#[no_mangle]
static LXCMON_BIO_NR_SECTOR_OFF: Global<u32> = Global::new(24);
#[no_mangle]
static LXCMON_BIO_RWBS_OFF: Global<u32> = Global::new(28);

/// Kernel struct offsets from BTF (see `KernelOffsets`); all zero (disabled) by default.
#[no_mangle]
static LXCMON_KOFF: Global<KernelOffsets> = Global::new(KernelOffsets {
    enabled: 0,
    page_size: 0,
    folio_flags: 0,
    folio_nr: 0,
    folio_nr_mode: 0,
    pg_head: 0,
    folio_mapping: 0,
    as_host: 0,
    inode_sb: 0,
    sb_dev: 0,
    sb_bdi: 0,
    bdi_caps: 0,
    bio_bdev: 0,
    bio_opf: 0,
    bio_size: 0,
    bio_idx: 0,
    bio_io_vec: 0,
    bdev_dev: 0,
    bvec_page: 0,
    bvec_size: 0,
});

const LOOPBACK_IFINDEX: u32 = 1;
/// `BDI_CAP_WRITEBACK` (include/linux/backing-dev.h, since 5.10): the mapping is written back.
const BDI_CAP_WRITEBACK: u32 = 1;
/// `REQ_OP_MASK` with `REQ_OP_BITS == 8`; `REQ_OP_READ == 0`, `REQ_OP_WRITE == 1`.
const REQ_OP_MASK: u32 = 0xff;
const REQ_OP_READ: u32 = 0;
const REQ_OP_WRITE: u32 = 1;
/// `PAGE_MAPPING_ANON` and `PAGE_MAPPING_MOVABLE` low bits of `page->mapping`.
const PAGE_MAPPING_FLAGS: u64 = 3;
const SECTOR_BYTES: u64 = 512;

/// The slot of the tracked container whose cgroup id is `id`: its entry in the direct-mapped
/// index, the tracked hash only when the entry is shared (see `MAP_SLOT_INDEX`).
#[inline(always)]
pub(crate) fn tracked_slot(id: u64) -> Option<u32> {
    let entry = *LXCMON_SLOT_INDEX.get(slot_index_pos(id))?;
    if let Some(slot) = slot_index_match(entry, id) {
        return Some(slot);
    }
    if entry & SLOT_INDEX_SHARED == 0 {
        return None;
    }
    // SAFETY: map values are plain integers; the pointer is valid for this run.
    unsafe { LXCMON_TRACKED.get(&id) }.map(|t| t.slot)
}

/// The counter slot of the tracked container a cgroup belongs to, if any. `ancestor(level)`
/// returns the id of the cgroup's ancestor at `level` (itself at its own level, 0 below it).
/// Only the levels where some container is tracked are tried, deepest first, starting at the
/// deepest of them: one index lookup per tracked level, none for a cgroup above them all.
#[inline(always)]
pub(crate) fn slot_of(ancestor: impl Fn(i32) -> u64) -> Option<u32> {
    let mask = *LXCMON_LEVELS.get(0)? & ((1u64 << MAX_TRACKED_LEVEL) - 1);
    if mask == 0 {
        return None;
    }
    let mut level = highest_bit(mask) + 1;
    while level > 0 {
        level -= 1;
        if mask & (1u64 << level) != 0 {
            let anc = ancestor(level as i32);
            if anc != 0 {
                if let Some(slot) = tracked_slot(anc) {
                    return Some(slot);
                }
            }
        }
    }
    None
}

/// Index of the highest set bit of a non-zero value below 2^32, by halving (BPF has no clz).
#[inline(always)]
pub(crate) fn highest_bit(mut v: u64) -> u32 {
    let mut n = 0;
    for shift in [16u32, 8, 4, 2, 1] {
        if v >> shift != 0 {
            v >>= shift;
            n += shift;
        }
    }
    n
}

/// The cgroup hooks see packets from the IP header on; the container's interfaces (veth, as
/// every LXC and Proxmox network device is) count the 14-byte Ethernet header too. Adding it
/// per packet makes both collectors count the same bytes ("as seen inside the container").
const ETH_HLEN: u32 = 14;

/// A BTF-defined cgroup storage map (aya-ebpf 0.2.1 has no wrapper for this type): no
/// `max_entries` (the kernel requires 0), a `u64` key (the cgroup id alone: one value per
/// cgroup, shared by both directions, Linux 5.9+), pinned by name so a restarted agent writes
/// into the storage of the attachments it adopts.
#[repr(C)]
pub struct CgroupStorage<V> {
    r#type: *const [i32; BPF_MAP_TYPE_CGROUP_STORAGE as usize],
    key: *const u64,
    value: *const V,
    pinning: *const [i32; PIN_BY_NAME],
}

/// `LIBBPF_PIN_BY_NAME`.
const PIN_BY_NAME: usize = 1;

// SAFETY: the fields are placeholders read by the loader, never dereferenced.
unsafe impl<V> Sync for CgroupStorage<V> {}

/// Slot + 1 of the container whose cgroup the program is attached to (0: not written yet).
#[btf_map]
static LXCMON_SKB_SLOT: CgroupStorage<u32> = CgroupStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    pinning: core::ptr::null(),
};

/// The slot the agent stored for the attachment's cgroup, if it has written it yet.
#[inline(always)]
fn stored_slot() -> Option<u32> {
    // SAFETY: a cgroup storage map of `u32`, valid in cgroup_skb programs; the kernel returns
    // the running attachment's storage (never null for an attached program).
    let p = unsafe {
        bpf_get_local_storage(&LXCMON_SKB_SLOT as *const CgroupStorage<u32> as *mut _, 0)
    } as *const u32;
    if p.is_null() {
        return None;
    }
    // SAFETY: points to the 4-byte value of this cgroup's storage.
    unsafe { *p }.checked_sub(1)
}

/// Adds a packet to the counters of the container the program is attached to. With
/// `storage`, the slot comes from the attachment's cgroup storage (one helper call, no hash
/// lookup, the same cost for any number of containers); the ancestor walk is the fallback
/// while the agent has not written it, and the whole path of the `_walk` programs.
#[inline(always)]
fn count_skb(ctx: &SkBuffContext, ingress: bool, storage: bool) {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer; these fields are readable in cgroup_skb.
    let (ifindex, ip_len) = unsafe { ((*skb).ifindex, (*skb).len) };
    let len = ip_len + ETH_HLEN;
    if ifindex == LOOPBACK_IFINDEX {
        return;
    }
    let stored = if storage { stored_slot() } else { None };
    // SAFETY: helpers valid for cgroup_skb programs.
    let Some(slot) =
        stored.or_else(|| slot_of(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) }))
    else {
        return;
    };
    if let Some(c) = LXCMON_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            if ingress {
                (*c).net_rx += u64::from(len);
            } else {
                (*c).net_tx += u64::from(len);
            }
        }
    }
}

#[cgroup_skb(ingress)]
pub fn lxcmon_skb_ingress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, true, true);
    1
}

#[cgroup_skb(egress)]
pub fn lxcmon_skb_egress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, false, true);
    1
}

#[cgroup_skb(ingress)]
pub fn lxcmon_walk_ingress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, true, false);
    1
}

#[cgroup_skb(egress)]
pub fn lxcmon_walk_egress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, false, false);
    1
}

#[tracepoint]
pub fn lxcmon_block_bio_queue(ctx: TracePointContext) -> u32 {
    // SAFETY: helpers valid in tracepoint programs.
    let Some(slot) = slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) else {
        return 0;
    };
    // SAFETY: offsets come from the tracepoint's own format description; reads are checked
    // by bpf_probe_read_kernel.
    let Ok(dev) = (unsafe { ctx.read_at::<u32>(LXCMON_BIO_DEV_OFF.load() as usize) }) else {
        return 0;
    };
    if excluded(dev) {
        return 0;
    }
    let Ok(nr_sector) = (unsafe { ctx.read_at::<u32>(LXCMON_BIO_NR_SECTOR_OFF.load() as usize) })
    else {
        return 0;
    };
    let Ok(rwbs) = (unsafe { ctx.read_at::<[u8; 2]>(LXCMON_BIO_RWBS_OFF.load() as usize) }) else {
        return 0;
    };
    // rwbs: an optional leading 'F' (preflush), then the operation: 'W', 'R', 'D', 'E', 'N'.
    let op = if rwbs[0] == b'F' { rwbs[1] } else { rwbs[0] };
    let bytes = u64::from(nr_sector) * SECTOR_BYTES;
    if bytes == 0 {
        return 0;
    }
    if let Some(c) = LXCMON_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe {
            match op {
                b'W' => (*c).io_write += bytes,
                b'R' => (*c).io_read += bytes,
                _ => {}
            }
        }
    }
    0
}

/// Reads a `T` at `base + off` of kernel memory.
#[inline(always)]
pub(crate) fn kread<T>(base: *const u8, off: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the access; a bad pointer yields an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T).ok() }
}

#[inline(always)]
fn add_io(slot: u32, write: bool, bytes: u64) {
    if let Some(c) = LXCMON_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot.
        unsafe {
            if write {
                (*c).io_write += bytes;
            } else {
                (*c).io_read += bytes;
            }
        }
    }
}

/// Buffered writes: `writeback/writeback_dirty_folio(folio, mapping)` fires in the dirtying
/// task when a page-cache folio turns dirty (the kernel's `task_io_account_write` point), so
/// the bytes are charged to that task's container even though kernel threads write them back
/// later. Only mappings whose backing device does writeback (not tmpfs/shmem) count.
#[btf_tracepoint(function = "writeback_dirty_folio")]
pub fn lxcmon_dirty_folio(ctx: BtfTracePointContext) -> i32 {
    let k = LXCMON_KOFF.load();
    if k.enabled == 0 {
        return 0;
    }
    // SAFETY: helpers valid in tracing programs.
    let Some(slot) = slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) else {
        return 0;
    };
    let folio: *const u8 = ctx.arg(0);
    let mapping: *const u8 = ctx.arg(1);
    // The verifier types `mapping` as possibly null: it wants the check before any offset.
    if folio.is_null() || mapping.is_null() {
        return 0;
    }
    // Plain loads through the BTF-typed arguments (a null pointer on the way reads 0).
    let host: *const u8 = load(mapping, k.as_host);
    let sb: *const u8 = load(host, k.inode_sb);
    let bdi: *const u8 = load(sb, k.sb_bdi);
    if load::<u32>(bdi, k.bdi_caps) & BDI_CAP_WRITEBACK == 0 {
        return 0;
    }
    let dev: u32 = load(sb, k.sb_dev);
    if excluded(dev) {
        return 0;
    }
    let flags: u64 = load(folio, k.folio_flags);
    let mut pages: u64 = 1;
    if flags & (1u64 << (k.pg_head & 63)) != 0 {
        if k.folio_nr_mode == FOLIO_NR_PAGES_U32 {
            pages = u64::from(load::<u32>(folio, k.folio_nr));
        } else if k.folio_nr_mode == FOLIO_NR_ORDER_BYTE {
            pages = 1u64 << (load::<u8>(folio, k.folio_nr) & 31);
        }
    }
    add_io(slot, true, pages * u64::from(k.page_size));
    0
}

/// Block I/O from the bio itself (`block/block_bio_queue(bio)`, BTF): like the classic
/// tracepoint program, but a write whose data are page-cache pages is skipped, because those
/// bytes were counted when the pages were dirtied (fsync/sync in the task's own context).
#[btf_tracepoint(function = "block_bio_queue")]
pub fn lxcmon_bio_queue_btf(ctx: BtfTracePointContext) -> i32 {
    let k = LXCMON_KOFF.load();
    if k.enabled == 0 {
        return 0;
    }
    // SAFETY: helpers valid in tracing programs.
    let Some(slot) = slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) else {
        return 0;
    };
    let bio: *const u8 = ctx.arg(0);
    let bdev: *const u8 = load(bio, k.bio_bdev);
    let dev: u32 = load(bdev, k.bdev_dev);
    if excluded(dev) {
        return 0;
    }
    let size: u32 = load(bio, k.bio_size);
    if size == 0 {
        return 0;
    }
    let op = load::<u32>(bio, k.bio_opf) & REQ_OP_MASK;
    if op == REQ_OP_WRITE {
        if is_page_cache_write(bio, k) {
            return 0;
        }
        add_io(slot, true, u64::from(size));
    } else if op == REQ_OP_READ {
        add_io(slot, false, u64::from(size));
    }
    0
}

/// Whether a write bio's first page belongs to a file's page cache (a mapping without the
/// anon/movable low bits). `page->mapping` is read as a number through
/// `bpf_probe_read_kernel`: the verifier allows no bit test on a loaded pointer. A bio not at
/// its first vector (split) reads the vector at a computed offset, which only the helper may.
#[inline(always)]
fn is_page_cache_write(bio: *const u8, k: KernelOffsets) -> bool {
    let idx: u32 = load(bio, k.bio_idx);
    let page = if idx == 0 {
        let vec: *const u8 = load(bio, k.bio_io_vec);
        load::<*const u8>(vec, k.bvec_page)
    } else {
        let vec = kread::<*const u8>(bio, k.bio_io_vec).unwrap_or(core::ptr::null());
        if vec.is_null() || idx >= 4096 {
            return false;
        }
        let bv = vec.wrapping_add((idx * k.bvec_size) as usize);
        kread::<*const u8>(bv, k.bvec_page).unwrap_or(core::ptr::null())
    };
    let mapping = kread::<u64>(page, k.folio_mapping).unwrap_or(0);
    mapping != 0 && mapping & PAGE_MAPPING_FLAGS == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
