//! lxcmon's kernel side: per-container network and block I/O byte counters.
//!
//! * `cgroup_skb` ingress/egress programs, attached by the agent to each container's cgroup v2
//!   directory, add `skb->len` (IP-level bytes) to the container's per-CPU counters; packets on
//!   the loopback device (ifindex 1 in every network namespace) are skipped.
//! * The `block/block_bio_queue` tracepoint adds the bio's bytes to the container of the task
//!   that submits it (`bpf_get_current_cgroup_id` and its ancestors), unless its device is in the
//!   excluded-device map.
//!
//! A packet's or task's cgroup may be a sub-cgroup of the container's: the programs try the
//! cgroup itself, then its ancestors at the levels where some container is tracked (deepest
//! first), against the tracked-cgroup map; untracked cgroups end after one or two lookups.
//! Counters are per-CPU, so the hot path has no atomics.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray},
    programs::{SkBuffContext, TracePointContext},
    Global,
};
use lxcmon_common::{
    Counters, TrackedCgroup, MAX_CONTAINERS, MAX_EXCLUDED_DEVICES, MAX_TRACKED_LEVEL,
};

#[map]
static LXCMON_TRACKED: HashMap<u64, TrackedCgroup> = HashMap::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_COUNTERS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_LEVELS: Array<u64> = Array::pinned(1, 0);

#[map]
static LXCMON_EXCLDEV: HashMap<u32, u8> = HashMap::pinned(MAX_EXCLUDED_DEVICES, 0);

/// Byte offsets in the `block/block_bio_queue` record, from its tracefs `format` file.
#[no_mangle]
static LXCMON_BIO_DEV_OFF: Global<u32> = Global::new(8);
#[no_mangle]
static LXCMON_BIO_NR_SECTOR_OFF: Global<u32> = Global::new(24);
#[no_mangle]
static LXCMON_BIO_RWBS_OFF: Global<u32> = Global::new(28);

const LOOPBACK_IFINDEX: u32 = 1;
const SECTOR_BYTES: u64 = 512;

/// The counter slot of the tracked container that `id` (a cgroup) belongs to, if any.
/// `ancestor(level)` returns the id of the cgroup's ancestor at `level` (0 past its own level).
#[inline(always)]
fn slot_of(id: u64, ancestor: impl Fn(i32) -> u64) -> Option<u32> {
    // SAFETY: map values are plain integers; the pointer is valid for this program run.
    if let Some(t) = unsafe { LXCMON_TRACKED.get(&id) } {
        return Some(t.slot);
    }
    let mask = *LXCMON_LEVELS.get(0)?;
    if mask == 0 {
        return None;
    }
    let mut level = MAX_TRACKED_LEVEL;
    while level > 0 {
        level -= 1;
        if mask & (1u64 << level) != 0 {
            let anc = ancestor(level as i32);
            if anc != 0 && anc != id {
                // SAFETY: as above.
                if let Some(t) = unsafe { LXCMON_TRACKED.get(&anc) } {
                    return Some(t.slot);
                }
            }
        }
    }
    None
}

#[inline(always)]
fn count_skb(ctx: &SkBuffContext, ingress: bool) {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // SAFETY: `skb` is the program's context pointer; these fields are readable in cgroup_skb.
    let (ifindex, len) = unsafe { ((*skb).ifindex, (*skb).len) };
    if ifindex == LOOPBACK_IFINDEX {
        return;
    }
    // SAFETY: helpers valid for cgroup_skb programs.
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    let Some(slot) = slot_of(id, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level)
    }) else {
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
    count_skb(&ctx, true);
    1
}

#[cgroup_skb(egress)]
pub fn lxcmon_skb_egress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, false);
    1
}

#[tracepoint]
pub fn lxcmon_block_bio_queue(ctx: TracePointContext) -> u32 {
    // SAFETY: helpers valid in tracepoint programs.
    let id = unsafe { bpf_get_current_cgroup_id() };
    let Some(slot) = slot_of(id, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    }) else {
        return 0;
    };
    // SAFETY: offsets come from the tracepoint's own format description; reads are checked
    // by bpf_probe_read_kernel.
    let Ok(dev) = (unsafe { ctx.read_at::<u32>(LXCMON_BIO_DEV_OFF.load() as usize) }) else {
        return 0;
    };
    // SAFETY: plain lookup.
    if unsafe { LXCMON_EXCLDEV.get(&dev) }.is_some() {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
