//! TCP retransmits per container: each segment a tracked container's socket retransmits, into
//! its container's per-CPU counter.
//!
//! Retransmits mostly run in softirq or timer context, so the current task says nothing: the
//! container is the one whose cgroup v2 subtree holds the socket's cgroup
//! (`sk->sk_cgrp_data.cgroup`, set when the socket was created), found by walking the kernfs
//! parents up to the tracked levels as the scheduler programs do. The reads are plain loads
//! through the BTF-typed tracepoint arguments with offsets the agent took from the kernel's
//! BTF (constants of the frozen read-only data). A socket of no tracked container costs the
//! levels lookup, two loads and, below the shallowest tracked level, one lookup per tracked
//! level it crosses.
//!
//! It counts what the kernel adds to `RetransSegs` (`/proc/net/snmp`): `tcp_skb_pcount(skb)`
//! (`TCP_SKB_CB(skb)->tcp_gso_segs`) per retransmitted skb, not one per call, and 1 per
//! SYN-ACK a listening socket sends again. Where `tcp_retransmit_skb` carries `err` (6.17+) it
//! fires for refused retransmits too; those are skipped, as older kernels never report them.

use crate::kernel::{cgroup_slot, load, KnOffsets};
use crate::LXCMON_LEVELS;
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuArray,
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{TcpOffsets, MAX_CONTAINERS, MAX_TRACKED_LEVEL};

#[map]
static LXCMON_RETRANS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[no_mangle]
static LXCMON_TCP_OFF: Global<TcpOffsets> = Global::new(TcpOffsets {
    enabled: 0,
    err_arg: 0,
    sk_cgrp: 0,
    skb_segs: 0,
    cgrp_level: 0,
    cgrp_kn: 0,
    kn_parent: 0,
    kn_id: 0,
});

/// Adds `segs` to the counter of the tracked container whose subtree holds the socket's
/// cgroup, if any.
#[inline(always)]
fn count(o: &TcpOffsets, sk: *const u8, segs: u64) {
    let Some(word) = LXCMON_LEVELS.get(0) else {
        return;
    };
    let mask = *word & ((1u64 << MAX_TRACKED_LEVEL) - 1);
    if mask == 0 {
        return;
    }
    let cgrp: *const u8 = load(sk, o.sk_cgrp);
    if cgrp.is_null() {
        return;
    }
    // Above every tracked level (the root cgroup, where host sockets are): done.
    let level: i32 = load(cgrp, o.cgrp_level);
    if level < 0 || (level as u32) < mask.trailing_zeros() {
        return;
    }
    let kn = KnOffsets {
        cgrp_kn: o.cgrp_kn,
        kn_parent: o.kn_parent,
        kn_id: o.kn_id,
    };
    let Some(slot) = cgroup_slot(kn, cgrp, level as u32, mask) else {
        return;
    };
    if let Some(c) = LXCMON_RETRANS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += segs };
    }
}

/// `tcp_retransmit_skb(sk, skb[, err])`: a retransmitted data (or SYN, FIN) skb.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn lxcmon_tcp_retransmit(ctx: BtfTracePointContext) -> i32 {
    let o = LXCMON_TCP_OFF.load();
    if o.enabled == 0 {
        return 0;
    }
    // A constant of the read-only data: the verifier never sees the third argument read on a
    // kernel whose tracepoint has two.
    if o.err_arg != 0 {
        let err: i32 = ctx.arg(2);
        if err != 0 {
            return 0;
        }
    }
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    let segs: u16 = load(skb, o.skb_segs);
    count(&o, sk, u64::from(segs.max(1)));
    0
}

/// `tcp_retransmit_synack(sk, req)`: a listening socket sent a SYN-ACK again (`tcp_rtx_synack`
/// adds 1 to `RetransSegs`, and fires this only when it was sent).
#[btf_tracepoint(function = "tcp_retransmit_synack")]
pub fn lxcmon_tcp_synack(ctx: BtfTracePointContext) -> i32 {
    let o = LXCMON_TCP_OFF.load();
    if o.enabled == 0 {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    count(&o, sk, 1);
    0
}
