//! Run-queue wait per container: at each switch, the wait of the task switched in, from the
//! kernel's own `sched_info` accounting, into its container's per-CPU histogram.
//!
//! The scheduler already stamps every task when it becomes runnable (woken, new, or preempted
//! while still runnable: `sched_info.last_queued`, in its run-queue's clock) and adds
//! `rq->clock - last_queued` to the task's `run_delay` (`/proc/<pid>/schedstat`) when it is
//! switched in, just after this tracepoint. This program reads the same two values, so it needs
//! no wakeup program, no clock read and no in-flight state of its own (nothing to leak), and
//! its figure is the kernel's. Only `sched_switch` runs, once per context switch.
//!
//! The task's cgroup v2 is read from its `task_struct` (`cgroups->dfl_cgrp`, its `level`, then
//! `kn` and the kernfs parents up to the tracked levels) with offsets the agent took from the
//! kernel's BTF. The reads are plain loads through the BTF-typed tracepoint arguments (the
//! offsets are constants of the frozen read-only data, so the verifier checks each against the
//! kernel's types), not `bpf_probe_read_kernel` calls. A task above every tracked level (the
//! host's, in the root cgroup) costs three loads.

use crate::kernel::{cgroup_slot, load, rare, record_latency, KnOffsets};
use crate::LXCMON_LEVELS;
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{
    LatencyHist, SchedOffsets, MAX_CONTAINERS, MAX_TRACKED_LEVEL, RARE_RUNQ_CLOCK_BEHIND,
};

#[map]
static LXCMON_RUNQ: PerCpuArray<LatencyHist> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[no_mangle]
static LXCMON_SCHED_OFF: Global<SchedOffsets> = Global::new(SchedOffsets {
    enabled: 0,
    task_cgroups: 0,
    task_last_queued: 0,
    task_se_cfs_rq: 0,
    cfs_rq_rq: 0,
    rq_clock: 0,
    cset_dfl_cgrp: 0,
    cgrp_level: 0,
    cgrp_kn: 0,
    kn_parent: 0,
    kn_id: 0,
});

/// `sched_switch(preempt, prev, next, ...)`: `next`'s wait ends now.
#[btf_tracepoint(function = "sched_switch")]
pub fn lxcmon_sched_switch(ctx: BtfTracePointContext) -> i32 {
    let s = LXCMON_SCHED_OFF.load();
    if s.enabled == 0 {
        return 0;
    }
    let Some(word) = LXCMON_LEVELS.get(0) else {
        return 0;
    };
    let mask = *word & ((1u64 << MAX_TRACKED_LEVEL) - 1);
    if mask == 0 {
        return 0;
    }
    let next: *const u8 = ctx.arg(2);
    let cset: *const u8 = load(next, s.task_cgroups);
    if cset.is_null() {
        return 0;
    }
    let cgrp: *const u8 = load(cset, s.cset_dfl_cgrp);
    if cgrp.is_null() {
        return 0;
    }
    // Above every tracked level (the root cgroup, where host tasks and the idle task sit).
    let level: i32 = load(cgrp, s.cgrp_level);
    if level < 0 || (level as u32) < mask.trailing_zeros() {
        return 0;
    }
    let kn = KnOffsets {
        cgrp_kn: s.cgrp_kn,
        kn_parent: s.kn_parent,
        kn_id: s.kn_id,
    };
    let Some(slot) = cgroup_slot(kn, cgrp, level as u32, mask) else {
        return 0;
    };
    // No enqueue time: the kernel counts no wait for this switch either (`sched_info_arrive`
    // returns early, `pcount` stays), so neither does the histogram.
    let queued: u64 = load(next, s.task_last_queued);
    if queued == 0 {
        return 0;
    }
    let cfs_rq: *const u8 = load(next, s.task_se_cfs_rq);
    if cfs_rq.is_null() {
        return 0;
    }
    let rq: *const u8 = load(cfs_rq, s.cfs_rq_rq);
    if rq.is_null() {
        return 0;
    }
    let clock: u64 = load(rq, s.rq_clock);
    if clock < queued {
        rare(&ctx, RARE_RUNQ_CLOCK_BEHIND);
        return 0;
    }
    record_latency(&LXCMON_RUNQ, slot, clock - queued);
    0
}
