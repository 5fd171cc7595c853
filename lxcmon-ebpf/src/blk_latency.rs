//! Block I/O latency per container: from the block layer's start time of a request
//! (`request.start_time_ns`, the span `/proc/diskstats` times: made, queued, dispatched,
//! served) to its completion (`block_rq_complete`), reads and writes apart, into the per-CPU
//! histogram of the container that submitted it.
//!
//! Attribution is the byte counters': the task that queues the bio (`block_bio_queue`, in its
//! own context). That program writes, for bios of tracked containers only, the bio's address,
//! its first sector and the container's slot into the entry of a fixed array at a hash of
//! that sector; completion reads the entry at the request's first sector, checks that it is
//! the request's first bio (`rq->bio`) with that sector (a freed bio's address reused by
//! another fails it), records the latency and frees the entry. No lock, no allocation, no clock read before completion; the
//! kernel already stamps the request. An entry nothing consumes (a bio merged behind another
//! request's first bio) is overwritten by a later bio at its index: the array is the bound.
//! Host I/O costs the tracked-cgroup lookup at queueing and, at completion, one byte of a
//! 16 KiB map that says whether the entry may hold a bio (the 384 KiB array's line, cold by
//! then, cost 2.5 times as much).

use crate::kernel::{load, rare, record_latency};
use crate::{slot_of, LXCMON_LEVELS, REQ_OP_MASK, REQ_OP_READ, REQ_OP_WRITE};
use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{
    bio_index, BlkLatOffsets, IoStart, LatencyHist, IO_BIOS, MAX_CONTAINERS, RARE_IOLAT_NO_START,
};

/// Histograms by `slot * 2 + write`.
#[map]
static LXCMON_IOLAT: PerCpuArray<LatencyHist> = PerCpuArray::pinned(MAX_CONTAINERS * 2, 0);

#[map]
static LXCMON_IOLAT_BIOS: Array<IoStart> = Array::pinned(IO_BIOS, 0);

/// Byte `i`: entry `i` may hold a bio (see `MAP_IOLAT_LIVE`).
#[map]
static LXCMON_IOLAT_LIVE: Array<[u8; IO_BIOS as usize]> = Array::pinned(1, 0);

/// The byte of entry `idx` in `LXCMON_IOLAT_LIVE` (`idx` below `IO_BIOS`: a hash's top bits).
#[inline(always)]
fn live(idx: u32) -> Option<*mut u8> {
    let all = LXCMON_IOLAT_LIVE.get_ptr_mut(0)?;
    // SAFETY: `idx < IO_BIOS`, the value's length; the verifier checks the bound too.
    Some(unsafe { (all as *mut u8).add((idx & (IO_BIOS - 1)) as usize) })
}

#[no_mangle]
static LXCMON_BLK_OFF: Global<BlkLatOffsets> = Global::new(BlkLatOffsets {
    enabled: 0,
    old_args: 0,
    rq_bio: 0,
    rq_sector: 0,
    rq_data_len: 0,
    rq_start_ns: 0,
    bio_opf: 0,
    bio_sector: 0,
});

#[inline(always)]
fn generation() -> u32 {
    LXCMON_LEVELS.get(0).map_or(0, |w| (*w >> 32) as u32)
}

/// `block_bio_queue(bio)`: a read or write bio of a tracked container's task is remembered.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn lxcmon_iolat_bio(ctx: BtfTracePointContext) -> i32 {
    on_bio(ctx.arg(0));
    0
}

/// Before 5.11 the tracepoint is `block_bio_queue(q, bio)`. A separate program rather than an
/// argument index chosen at run time: 5.10's verifier refuses a context access at a computed
/// offset.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn lxcmon_iolat_bio_old(ctx: BtfTracePointContext) -> i32 {
    on_bio(ctx.arg(1));
    0
}

#[inline(always)]
fn on_bio(bio: *const u8) {
    let k = LXCMON_BLK_OFF.load();
    if k.enabled == 0 {
        return;
    }
    // SAFETY: helper valid in tracing programs.
    let Some(slot) = slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) else {
        return;
    };
    let op = load::<u32>(bio, k.bio_opf) & REQ_OP_MASK;
    if op != REQ_OP_READ && op != REQ_OP_WRITE {
        return;
    }
    let sector: u64 = load(bio, k.bio_sector);
    let idx = bio_index(sector);
    if let Some(e) = LXCMON_IOLAT_BIOS.get_ptr_mut(idx) {
        // SAFETY: an entry of the array, valid for this run. Another CPU may write the same
        // entry at the same moment (two bios at one index): completion's address and sector
        // check drops what such a race could mix up.
        unsafe {
            *e = IoStart {
                bio: bio as u64,
                sector,
                slot: slot * 2 + op,
                generation: generation(),
            };
        }
        if let Some(b) = live(idx) {
            // SAFETY: a byte of the map's value, valid for this run.
            unsafe { *b = 1 };
        }
    }
}

/// `block_rq_complete(rq, error, nr_bytes)`: fires before the request's bios are ended, so
/// `rq->bio` is still the first one. A partial completion (fewer bytes than are left) is not
/// the end of the request: only the last one times it.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn lxcmon_iolat_complete(ctx: BtfTracePointContext) -> i32 {
    let k = LXCMON_BLK_OFF.load();
    if k.enabled == 0 {
        return 0;
    }
    let rq: *const u8 = ctx.arg(0);
    let sector: u64 = load(rq, k.rq_sector);
    let idx = bio_index(sector);
    let Some(b) = live(idx) else {
        return 0;
    };
    // SAFETY: a byte of the map's value, valid for this run.
    if unsafe { *b } == 0 {
        return 0;
    }
    let Some(e) = LXCMON_IOLAT_BIOS.get_ptr_mut(idx) else {
        return 0;
    };
    // SAFETY: an entry of the array, valid for this run.
    let (tag, queued_at, idx, gen) = unsafe { ((*e).bio, (*e).sector, (*e).slot, (*e).generation) };
    let bio: u64 = load(rq, k.rq_bio);
    if tag != bio || bio == 0 || queued_at != sector {
        return 0;
    }
    let nr_bytes: u64 = ctx.arg(2);
    if (nr_bytes as u32) < load::<u32>(rq, k.rq_data_len) {
        return 0;
    }
    // SAFETY: as above.
    unsafe {
        (*e).bio = 0;
        *b = 0;
    }
    // A slot given to another container since the bio was queued: dropped.
    if gen != generation() || idx >= MAX_CONTAINERS * 2 {
        return 0;
    }
    let start: u64 = load(rq, k.rq_start_ns);
    if start == 0 {
        rare(&ctx, RARE_IOLAT_NO_START);
        return 0;
    }
    // SAFETY: helper valid in tracing programs.
    let lat = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    record_latency(&LXCMON_IOLAT, idx, lat);
    0
}
