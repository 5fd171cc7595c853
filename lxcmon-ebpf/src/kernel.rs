//! Reading kernel structs in the BTF programs: plain loads through BTF-typed pointers, and the
//! walk from a cgroup to the tracked container whose subtree holds it (scheduler and TCP
//! programs).

use crate::tracked_slot;
use aya_ebpf::{macros::map, maps::PerCpuArray, programs::BtfTracePointContext};
use aya_log_ebpf::warn;
use lxcmon_common::{
    latency_bucket, LatencyHist, LATENCY_BUCKETS, MAX_TRACKED_LEVEL, RARE_EVENTS,
    RARE_RUNQ_CLOCK_BEHIND,
};

#[map]
static LXCMON_RARE: PerCpuArray<u64> = PerCpuArray::pinned(RARE_EVENTS, 0);

/// Adds one latency of `ns` nanoseconds to the histogram at `idx` of a per-CPU histogram map
/// (run-queue wait, block I/O latency).
#[inline(always)]
pub(crate) fn record_latency(map: &PerCpuArray<LatencyHist>, idx: u32, ns: u64) {
    if let Some(h) = map.get_ptr_mut(idx) {
        let b = latency_bucket(ns);
        if b < LATENCY_BUCKETS {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            unsafe {
                (*h).buckets[b] += 1;
                (*h).sum_ns += ns;
            }
        }
    }
}

/// Counts a rare kernel-side condition (one of `RARE_*`) and logs it through aya-log at its
/// 1st, 2nd, 4th, 8th... occurrence on this CPU: a steady stream of them costs a few dozen
/// lines, never one per event.
#[inline(never)]
pub(crate) fn rare(ctx: &BtfTracePointContext, what: u32) {
    let Some(c) = LXCMON_RARE.get_ptr_mut(what) else {
        return;
    };
    // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
    let n = unsafe {
        *c += 1;
        *c
    };
    if n & (n - 1) != 0 {
        return;
    }
    if what == RARE_RUNQ_CLOCK_BEHIND {
        warn!(
            ctx,
            "run-queue wait: a task of a tracked container was switched in with an enqueue time after its run-queue's clock ({} times on this CPU); those waits are not counted",
            n
        );
    } else {
        warn!(
            ctx,
            "block I/O latency: a tracked container's request completed without a start time ({} times on this CPU): its queue keeps none (iostats off, no I/O scheduler); those requests are not timed",
            n
        );
    }
}

/// A plain load of a kernel struct member through a BTF-typed pointer (the offsets are
/// constants of the frozen read-only data: the verifier checks each against the kernel's
/// types and makes the load fault-safe), cheaper than a `bpf_probe_read_kernel` call.
#[inline(always)]
pub(crate) fn load<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: `base` is a BTF-typed kernel pointer from the tracepoint's arguments (or a
    // member of one) and `off` a member's offset from BTF.
    unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize) as *const T) }
}

/// The offsets the walk needs: `cgroup.kn`, `kernfs_node.parent`, `kernfs_node.id`.
#[derive(Clone, Copy)]
pub(crate) struct KnOffsets {
    pub cgrp_kn: u32,
    pub kn_parent: u32,
    pub kn_id: u32,
}

/// The slot of the tracked container whose subtree holds the cgroup `cgrp` (at `level`, not
/// above every tracked level: the caller checked): the walk starts at its own level and goes
/// up through the kernfs parents to the shallowest tracked level, looking up only at tracked
/// levels.
#[inline(always)]
pub(crate) fn cgroup_slot(o: KnOffsets, cgrp: *const u8, level: u32, mask: u64) -> Option<u32> {
    let mut kn: *const u8 = load(cgrp, o.cgrp_kn);
    let mut l = level;
    for _ in 0..MAX_TRACKED_LEVEL {
        if kn.is_null() || l >= MAX_TRACKED_LEVEL {
            return None;
        }
        if mask & (1u64 << l) != 0 {
            let id: u64 = load(kn, o.kn_id);
            if let Some(slot) = tracked_slot(id) {
                return Some(slot);
            }
        }
        // No tracked level above this one: not a tracked container's cgroup.
        if mask & ((1u64 << l) - 1) == 0 {
            return None;
        }
        l -= 1;
        kn = load(kn, o.kn_parent);
    }
    None
}
