//! Run-queue wait per container: from the moment a task of a tracked container becomes
//! runnable (woken, new, or switched out while still runnable) to the moment it is switched
//! in, into its container's per-CPU histogram.
//!
//! The wakee of `sched_wakeup` is not the current task, so its cgroup v2 is read from its
//! `task_struct` (`cgroups->dfl_cgrp`, its `level` and ancestors) with offsets the agent took
//! from the kernel's BTF; a task of no tracked container costs three reads and no map write.
//! At `sched_switch` the previous task is the current one (the cgroup helpers apply), and the
//! next task's in-flight entry (keyed by its kernel address) is looked up and deleted: every
//! switch costs one hash lookup that misses for host tasks. Entries live only between enqueue
//! and switch-in; the LRU bounds what a missed switch-in could leave.

use crate::{highest_bit, kread, slot_of, LXCMON_LEVELS, LXCMON_TRACKED};
use aya_ebpf::{
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{
    latency_bucket, LatencyHist, RunqStart, SchedOffsets, ANCESTORS_IDS, ANCESTORS_PTRS,
    LATENCY_BUCKETS, MAX_CONTAINERS, MAX_RUNQ_INFLIGHT, MAX_TRACKED_LEVEL, RARE_CGROUP_UNREADABLE,
    RARE_EVENTS, RARE_INFLIGHT_FAILED,
};

#[map]
static LXCMON_RUNQ: PerCpuArray<LatencyHist> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_RUNQ_START: LruHashMap<u64, RunqStart> =
    LruHashMap::pinned(MAX_RUNQ_INFLIGHT, 0);

#[map]
static LXCMON_RARE: PerCpuArray<u64> = PerCpuArray::pinned(RARE_EVENTS, 0);

#[no_mangle]
static LXCMON_SCHED_OFF: Global<SchedOffsets> = Global::new(SchedOffsets {
    enabled: 0,
    task_cgroups: 0,
    task_state: 0,
    task_on_cpu: 0,
    cset_dfl_cgrp: 0,
    cgrp_level: 0,
    cgrp_ancestors: 0,
    ancestors_mode: 0,
    cgrp_kn: 0,
    kn_id: 0,
});

#[inline(always)]
fn rare(what: u32) {
    if let Some(c) = LXCMON_RARE.get_ptr_mut(what) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The cgroup v2 id of `cgrp`'s ancestor at `level` (`level <= cgrp.level`).
#[inline(always)]
fn ancestor_id(s: &SchedOffsets, cgrp: *const u8, level: u32) -> Option<u64> {
    let off = s.cgrp_ancestors + level * 8;
    if s.ancestors_mode == ANCESTORS_PTRS {
        let anc = kread::<*const u8>(cgrp, off)?;
        let kn = kread::<*const u8>(anc, s.cgrp_kn)?;
        kread::<u64>(kn, s.kn_id)
    } else if s.ancestors_mode == ANCESTORS_IDS {
        kread::<u64>(cgrp, off)
    } else {
        None
    }
}

/// The slot of the tracked container whose subtree holds `task`, from its cgroup v2: tracked
/// levels deeper than the task's cgroup are skipped, so a host task in a shallow cgroup costs
/// the three reads that find its cgroup and level, and no lookup.
#[inline(always)]
fn task_slot(s: &SchedOffsets, task: *const u8) -> Option<u32> {
    let mask = *LXCMON_LEVELS.get(0)? & ((1u64 << MAX_TRACKED_LEVEL) - 1);
    if mask == 0 {
        return None;
    }
    let Some(cgrp) = kread::<*const u8>(task, s.task_cgroups)
        .and_then(|cset| kread::<*const u8>(cset, s.cset_dfl_cgrp))
    else {
        rare(RARE_CGROUP_UNREADABLE);
        return None;
    };
    let Some(level) = kread::<i32>(cgrp, s.cgrp_level) else {
        rare(RARE_CGROUP_UNREADABLE);
        return None;
    };
    if level < 0 {
        return None;
    }
    let level = level as u32;
    let mask = if level + 1 >= MAX_TRACKED_LEVEL {
        mask
    } else {
        mask & ((1u64 << (level + 1)) - 1)
    };
    if mask == 0 {
        return None;
    }
    let mut l = highest_bit(mask) + 1;
    while l > 0 {
        l -= 1;
        if mask & (1u64 << l) != 0 {
            let id = ancestor_id(s, cgrp, l)?;
            // SAFETY: map values are plain integers; the pointer is valid for this run.
            if let Some(t) = unsafe { LXCMON_TRACKED.get(&id) } {
                return Some(t.slot);
            }
        }
    }
    None
}

#[inline(always)]
fn start_wait(task: *const u8, slot: u32, now: u64) {
    let entry = RunqStart {
        ts: now,
        slot,
        _pad: 0,
    };
    if LXCMON_RUNQ_START.insert(task as u64, entry, 0).is_err() {
        rare(RARE_INFLIGHT_FAILED);
    }
}

#[inline(always)]
fn on_wakeup(ctx: &BtfTracePointContext) {
    let s = LXCMON_SCHED_OFF.load();
    if s.enabled == 0 {
        return;
    }
    let task: *const u8 = ctx.arg(0);
    let Some(slot) = task_slot(&s, task) else {
        return;
    };
    // Woken while still on its CPU (it had not gone to sleep yet): it does not wait.
    if kread::<i32>(task, s.task_on_cpu).unwrap_or(0) != 0 {
        return;
    }
    // SAFETY: helper valid in tracing programs.
    start_wait(task, slot, unsafe { bpf_ktime_get_ns() });
}

#[btf_tracepoint(function = "sched_wakeup")]
pub fn lxcmon_sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(&ctx);
    0
}

#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn lxcmon_sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    on_wakeup(&ctx);
    0
}

/// `sched_switch(preempt, prev, next, ...)`: `next`'s wait ends; `prev`, the current task,
/// waits again from now when it stays runnable (`__state == TASK_RUNNING`, as the kernel's own
/// `sched_info` accounting decides it).
#[btf_tracepoint(function = "sched_switch")]
pub fn lxcmon_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let s = LXCMON_SCHED_OFF.load();
    if s.enabled == 0 {
        return 0;
    }
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let key = next as u64;
    let mut now = 0u64;
    // SAFETY: plain lookup; the value is copied out before the entry is deleted.
    if let Some(start) = unsafe { LXCMON_RUNQ_START.get(&key) }.copied() {
        let _ = LXCMON_RUNQ_START.remove(&key);
        // SAFETY: helper valid in tracing programs.
        now = unsafe { bpf_ktime_get_ns() };
        let wait = now.saturating_sub(start.ts);
        if let Some(h) = LXCMON_RUNQ.get_ptr_mut(start.slot) {
            let b = latency_bucket(wait);
            if b < LATENCY_BUCKETS {
                // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
                unsafe {
                    (*h).buckets[b] += 1;
                    (*h).sum_ns += wait;
                }
            }
        }
    }
    if kread::<u32>(prev, s.task_state) != Some(0) {
        return 0;
    }
    // SAFETY: helpers valid in tracing programs; `prev` is the current task here.
    let Some(slot) = slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) else {
        return 0;
    };
    if now == 0 {
        // SAFETY: helper valid in tracing programs.
        now = unsafe { bpf_ktime_get_ns() };
    }
    start_wait(prev, slot, now);
    0
}
