//! Block I/O latency per container: from a request's issue to the device
//! (`block_rq_issue`) to its completion (`block_rq_complete`), reads and writes apart, into the
//! per-CPU histogram of the container that submitted it.
//!
//! Attribution is the byte counters': the task that queues the bio (`block_bio_queue`, in its
//! own context). That program records, for bios of tracked containers only, the container's
//! slot and the bio's first sector in an LRU hash keyed by the bio's address; at issue the
//! request's first bio (`rq->bio`) is looked up and, when its sector is the request's (a
//! recycled bio address of another request fails this check), the issue time is stored in the
//! same entry; completion looks it up again, records and deletes it. Bios merged behind
//! another request's first bio, and requests that never complete, leave entries that the LRU
//! evicts: the map is bounded. Host I/O costs one failed lookup at issue and one at
//! completion.

use crate::kernel::{load, rare, record_latency};
use crate::{slot_of, LXCMON_LEVELS, REQ_OP_MASK, REQ_OP_READ, REQ_OP_WRITE};
use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{
    BlkLatOffsets, IoStart, LatencyHist, IO_INFLIGHT_MAX, MAX_CONTAINERS, RARE_IOLAT_INSERT_FAILED,
};

/// Histograms by `slot * 2 + write`.
#[map]
static LXCMON_IOLAT: PerCpuArray<LatencyHist> = PerCpuArray::pinned(MAX_CONTAINERS * 2, 0);

#[map]
static LXCMON_IOLAT_INFLIGHT: LruHashMap<u64, IoStart> = LruHashMap::pinned(IO_INFLIGHT_MAX, 0);

#[no_mangle]
static LXCMON_BLK_OFF: Global<BlkLatOffsets> = Global::new(BlkLatOffsets {
    enabled: 0,
    issue_rq_arg: 0,
    rq_bio: 0,
    rq_sector: 0,
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
    on_bio(&ctx, ctx.arg(0));
    0
}

/// Before 5.11 the tracepoint is `block_bio_queue(q, bio)`. A separate program rather than an
/// argument index chosen at run time: 5.10's verifier refuses a context access at a computed
/// offset.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn lxcmon_iolat_bio_old(ctx: BtfTracePointContext) -> i32 {
    on_bio(&ctx, ctx.arg(1));
    0
}

#[inline(always)]
fn on_bio(ctx: &BtfTracePointContext, bio: *const u8) {
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
    let start = IoStart {
        ts: 0,
        sector,
        slot: slot * 2 + op,
        generation: generation(),
    };
    if LXCMON_IOLAT_INFLIGHT
        .insert(&(bio as u64), &start, 0)
        .is_err()
    {
        rare(ctx, RARE_IOLAT_INSERT_FAILED);
    }
}

/// `block_rq_issue(rq)`: the request goes to the device.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn lxcmon_iolat_issue(ctx: BtfTracePointContext) -> i32 {
    on_issue(ctx.arg(0));
    0
}

/// `block_rq_issue(q, rq)` before 5.11.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn lxcmon_iolat_issue_old(ctx: BtfTracePointContext) -> i32 {
    on_issue(ctx.arg(1));
    0
}

#[inline(always)]
fn on_issue(rq: *const u8) {
    let k = LXCMON_BLK_OFF.load();
    if k.enabled == 0 {
        return;
    }
    let bio: u64 = load(rq, k.rq_bio);
    let Some(st) = LXCMON_IOLAT_INFLIGHT.get_ptr_mut(&bio) else {
        return;
    };
    let sector: u64 = load(rq, k.rq_sector);
    // SAFETY: the entry is valid for this run.
    unsafe {
        if (*st).sector != sector {
            let _ = LXCMON_IOLAT_INFLIGHT.remove(&bio);
            return;
        }
        (*st).ts = bpf_ktime_get_ns();
    }
}

/// `block_rq_complete(rq, error, nr_bytes)`: fires before the request's bios are ended, so
/// `rq->bio` is still the one looked up at issue.
#[btf_tracepoint(function = "block_rq_complete")]
pub fn lxcmon_iolat_complete(ctx: BtfTracePointContext) -> i32 {
    let k = LXCMON_BLK_OFF.load();
    if k.enabled == 0 {
        return 0;
    }
    let rq: *const u8 = ctx.arg(0);
    let bio: u64 = load(rq, k.rq_bio);
    let Some(st) = LXCMON_IOLAT_INFLIGHT.get_ptr_mut(&bio) else {
        return 0;
    };
    // SAFETY: the entry is valid for this run.
    let (ts, idx, gen) = unsafe { ((*st).ts, (*st).slot, (*st).generation) };
    if ts == 0 {
        return 0; // queued, not issued yet (a partial completion of another request)
    }
    let _ = LXCMON_IOLAT_INFLIGHT.remove(&bio);
    // A slot given to another container since the bio was queued: dropped.
    if gen != generation() || idx >= MAX_CONTAINERS * 2 {
        return 0;
    }
    // SAFETY: helper valid in tracing programs.
    let lat = unsafe { bpf_ktime_get_ns() }.saturating_sub(ts);
    record_latency(&LXCMON_IOLAT, idx, lat);
    0
}
