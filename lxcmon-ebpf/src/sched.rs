//! Run-queue wait per container: from the moment a task of a tracked container becomes
//! runnable (woken, new, or switched out while still runnable) to the moment it is switched
//! in, into its container's per-CPU histogram.
//!
//! The wakee of `sched_wakeup` is not the current task, so its cgroup v2 is read from its
//! `task_struct` (`cgroups->dfl_cgrp`, its `level`, then `kn` and the kernfs parents up to the
//! tracked levels) with offsets the agent took from the kernel's BTF. The reads are plain loads
//! through the BTF-typed tracepoint arguments (the offsets are constants of the frozen
//! read-only data, so the verifier checks each against the kernel's types), not
//! `bpf_probe_read_kernel` calls. A task of no tracked container costs those loads and no map
//! write. In-flight enqueue times live in task-local storage, created only for tasks of
//! tracked containers and freed by the kernel with the task: nothing can leak.

use crate::kernel::{cgroup_slot, load, KnOffsets};
use crate::{slot_of, LXCMON_LEVELS};
use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE,
    },
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns, bpf_task_storage_get},
    macros::{btf_map, btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{
    latency_bucket, LatencyHist, RunqStart, SchedOffsets, LATENCY_BUCKETS, MAX_CONTAINERS,
    MAX_TRACKED_LEVEL, RARE_EVENTS, RARE_INFLIGHT_FAILED,
};

#[map]
static LXCMON_RUNQ: PerCpuArray<LatencyHist> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_RARE: PerCpuArray<u64> = PerCpuArray::pinned(RARE_EVENTS, 0);

/// A BTF-defined task storage map (aya-ebpf 0.2.1 has no wrapper for this type): the layout
/// libbpf and aya read from the object's BTF.
#[repr(C)]
pub struct TaskStorage<V> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const V,
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders read by the loader, never dereferenced.
unsafe impl<V> Sync for TaskStorage<V> {}

#[btf_map]
static LXCMON_RUNQ_TASK: TaskStorage<RunqStart> = TaskStorage {
    r#type: core::ptr::null(),
    key: core::ptr::null(),
    value: core::ptr::null(),
    map_flags: core::ptr::null(),
};

#[no_mangle]
static LXCMON_SCHED_OFF: Global<SchedOffsets> = Global::new(SchedOffsets {
    enabled: 0,
    task_cgroups: 0,
    task_state: 0,
    task_on_cpu: 0,
    cset_dfl_cgrp: 0,
    cgrp_level: 0,
    cgrp_kn: 0,
    kn_parent: 0,
    kn_id: 0,
    _pad: 0,
});

/// The storage of `task` (created when `create`), or null.
#[inline(always)]
fn storage(task: *const u8, create: bool) -> *mut RunqStart {
    let flags = if create {
        u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the map is a task storage map of `RunqStart`; `task` is a BTF-typed
    // `task_struct` pointer from the tracepoint's arguments.
    unsafe {
        bpf_task_storage_get(
            &LXCMON_RUNQ_TASK as *const TaskStorage<RunqStart> as *mut _,
            task as *mut _,
            core::ptr::null_mut(),
            flags,
        ) as *mut RunqStart
    }
}

#[inline(always)]
fn rare(what: u32) {
    if let Some(c) = LXCMON_RARE.get_ptr_mut(what) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The task's cgroup v2 (`task->cgroups->dfl_cgrp`), null when unreadable.
#[inline(always)]
fn task_cgroup(s: &SchedOffsets, task: *const u8) -> *const u8 {
    let cset: *const u8 = load(task, s.task_cgroups);
    if cset.is_null() {
        return core::ptr::null();
    }
    load(cset, s.cset_dfl_cgrp)
}

/// The levels word: (tracked levels mask, generation).
#[inline(always)]
fn levels() -> Option<(u64, u32)> {
    let word = *LXCMON_LEVELS.get(0)?;
    Some((
        word & ((1u64 << MAX_TRACKED_LEVEL) - 1),
        (word >> 32) as u32,
    ))
}

/// The slot cached in the task's storage, when it was resolved for this cgroup in this
/// generation of the tracked set.
#[inline(always)]
fn cached(st: *mut RunqStart, cgrp: *const u8, generation: u32) -> Option<u32> {
    if st.is_null() {
        return None;
    }
    // SAFETY: the task's own storage, valid for this run.
    unsafe { ((*st).cgrp == cgrp as u64 && (*st).generation == generation).then(|| (*st).slot) }
}

/// The task starts waiting now: its storage (created: it belongs to a tracked container)
/// gets the time and the resolved slot.
#[inline(always)]
fn start_wait(task: *const u8, st: *mut RunqStart, key: (*const u8, u32, u32), now: u64) {
    let st = if st.is_null() {
        storage(task, true)
    } else {
        st
    };
    if st.is_null() {
        rare(RARE_INFLIGHT_FAILED);
        return;
    }
    let (cgrp, slot, generation) = key;
    // SAFETY: the task's own storage, valid for this run.
    unsafe {
        (*st).ts = now;
        (*st).cgrp = cgrp as u64;
        (*st).slot = slot;
        (*st).generation = generation;
    }
}

#[inline(always)]
fn on_wakeup(ctx: &BtfTracePointContext) {
    let s = LXCMON_SCHED_OFF.load();
    if s.enabled == 0 {
        return;
    }
    let Some((mask, generation)) = levels() else {
        return;
    };
    if mask == 0 {
        return;
    }
    let task: *const u8 = ctx.arg(0);
    let cgrp = task_cgroup(&s, task);
    if cgrp.is_null() {
        return;
    }
    // Above every tracked level (the root cgroup, where host tasks sit): done.
    let level: i32 = load(cgrp, s.cgrp_level);
    if level < 0 || (level as u32) < mask.trailing_zeros() {
        return;
    }
    let st = storage(task, false);
    let Some(slot) = cached(st, cgrp, generation).or_else(|| {
        cgroup_slot(
            KnOffsets {
                cgrp_kn: s.cgrp_kn,
                kn_parent: s.kn_parent,
                kn_id: s.kn_id,
            },
            cgrp,
            level as u32,
            mask,
        )
    }) else {
        return;
    };
    // Woken while still on its CPU (it had not gone to sleep yet): it does not wait.
    if load::<i32>(task, s.task_on_cpu) != 0 {
        return;
    }
    // SAFETY: helper valid in tracing programs.
    let now = unsafe { bpf_ktime_get_ns() };
    start_wait(task, st, (cgrp, slot, generation), now);
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
    let mut now = 0u64;
    let st = storage(next, false);
    if !st.is_null() {
        // SAFETY: the task's own storage, valid for this run.
        let (ts, slot, generation) = unsafe { ((*st).ts, (*st).slot, (*st).generation) };
        // A wait that began before the tracked set changed may belong to a slot given to
        // another container since: dropped.
        let current = levels().map_or(!generation, |(_, g)| g);
        if ts != 0 && generation != current {
            // SAFETY: as above.
            unsafe { (*st).ts = 0 };
        } else if ts != 0 {
            // SAFETY: as above; helper valid in tracing programs.
            unsafe {
                (*st).ts = 0;
                now = bpf_ktime_get_ns();
            }
            let wait = now.saturating_sub(ts);
            if let Some(h) = LXCMON_RUNQ.get_ptr_mut(slot) {
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
    }
    if load::<u32>(prev, s.task_state) != 0 {
        return 0;
    }
    let Some((mask, generation)) = levels() else {
        return 0;
    };
    if mask == 0 {
        return 0;
    }
    // `prev` is the current task: a task without storage (never enqueued while tracked: the
    // host's) is resolved through the cgroup helpers, which cost no loads of its cgroup.
    let st = storage(prev, false);
    let cgrp = task_cgroup(&s, prev);
    let slot = match cached(st, cgrp, generation) {
        Some(slot) => slot,
        // SAFETY: helpers valid in tracing programs.
        None => match slot_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) }) {
            Some(slot) => slot,
            None => return 0,
        },
    };
    if now == 0 {
        // SAFETY: helper valid in tracing programs.
        now = unsafe { bpf_ktime_get_ns() };
    }
    start_wait(prev, st, (cgrp, slot, generation), now);
    0
}
