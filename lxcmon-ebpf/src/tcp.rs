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
//! It counts what the kernel adds to `RetransSegs` (`/proc/net/snmp`), taken from the socket's
//! own running sum of it, `tcp_sock.total_retrans`: each call counts the sum's growth since
//! the socket's last call (kept per socket in an LRU map, the entry removed when the socket
//! is destroyed). Counting the skb instead, `tcp_skb_pcount(skb)` as the tracepoint sees it,
//! fell short in about one run in twenty of the loss test on 6.18: at one call the sum had
//! grown by more than the skb's segments (29 against 7, 8 against 7, 2 against 1), with `err`
//! 0 and no run skipped. The sum also
//! takes in a retransmit the stack counted and then failed to send (`TCPRetransFail`), on
//! every kernel: it is in `RetransSegs` too. A socket's first call (or its first after the
//! LRU let it go) counts its skb's segments, when sent. A SYN-ACK a listening socket sends
//! again counts 1 (it has no `tcp_sock` of its own yet).
//!
//! Where `tcp_retransmit_skb` carries `err` (6.17+) it fires for every call, also those that
//! sent nothing; before, only for sent ones (the sum carries the others to the next).

use crate::kernel::{cgroup_slot, load, KnOffsets};
use crate::LXCMON_LEVELS;
use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
    Global,
};
use lxcmon_common::{TcpOffsets, TcpSeen, MAX_CONTAINERS, MAX_TRACKED_LEVEL, TCP_SEEN_SOCKETS};

#[map]
static LXCMON_RETRANS: PerCpuArray<u64> = PerCpuArray::pinned(MAX_CONTAINERS, 0);

#[map]
static LXCMON_RETRANS_SEEN: LruHashMap<u64, TcpSeen> =
    LruHashMap::with_max_entries(TCP_SEEN_SOCKETS, 0);

#[no_mangle]
static LXCMON_TCP_OFF: Global<TcpOffsets> = Global::new(TcpOffsets {
    enabled: 0,
    err_arg: 0,
    sk_cgrp: 0,
    skb_segs: 0,
    tp_total_retrans: 0,
    sk_addrpair: 0,
    sk_portpair: 0,
    cgrp_level: 0,
    cgrp_kn: 0,
    kn_parent: 0,
    kn_id: 0,
});

/// The slot of the tracked container whose subtree holds the socket's cgroup, if any.
#[inline(always)]
fn socket_slot(o: &TcpOffsets, sk: *const u8) -> Option<u32> {
    let word = LXCMON_LEVELS.get(0)?;
    let mask = *word & ((1u64 << MAX_TRACKED_LEVEL) - 1);
    if mask == 0 {
        return None;
    }
    let cgrp: *const u8 = load(sk, o.sk_cgrp);
    if cgrp.is_null() {
        return None;
    }
    // Above every tracked level (the root cgroup, where host sockets are): done.
    let level: i32 = load(cgrp, o.cgrp_level);
    if level < 0 || (level as u32) < mask.trailing_zeros() {
        return None;
    }
    let kn = KnOffsets {
        cgrp_kn: o.cgrp_kn,
        kn_parent: o.kn_parent,
        kn_id: o.kn_id,
    };
    cgroup_slot(kn, cgrp, level as u32, mask)
}

/// Adds `segs` to a container's counter.
#[inline(always)]
fn add(slot: u32, segs: u64) {
    if segs == 0 {
        return;
    }
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
    let sk: *const u8 = ctx.arg(0);
    let Some(slot) = socket_slot(&o, sk) else {
        return 0;
    };
    // A constant of the read-only data: the verifier never sees the third argument read on a
    // kernel whose tracepoint has two.
    let sent = o.err_arg == 0 || ctx.arg::<i32>(2) == 0;
    // `total_retrans` is past `struct sock`, where a BTF-typed load may not reach.
    // SAFETY: `sk` is the tracepoint's socket, a TCP one; the read is fault-checked.
    let total = unsafe {
        bpf_probe_read_kernel(sk.wrapping_add(o.tp_total_retrans as usize) as *const u32)
    };
    let Ok(total) = total else {
        return 0;
    };
    let ports: u32 = load(sk, o.sk_portpair);
    let addrs: u64 = load(sk, o.sk_addrpair);
    let key = sk as u64;
    if let Some(seen) = LXCMON_RETRANS_SEEN.get_ptr_mut(key) {
        // SAFETY: a map value valid for this run; one socket's calls hold its lock.
        let seen = unsafe { &mut *seen };
        // A sum below the one kept is another socket's (one made at a freed one's address).
        if seen.ports == ports && seen.addrs == addrs && total >= seen.total {
            add(slot, u64::from(total.wrapping_sub(seen.total)));
            seen.total = total;
            return 0;
        }
    }
    if sent {
        let skb: *const u8 = ctx.arg(1);
        let segs: u16 = load(skb, o.skb_segs);
        add(slot, u64::from(segs.max(1)));
    }
    let seen = TcpSeen {
        total,
        ports,
        addrs,
    };
    let _ = LXCMON_RETRANS_SEEN.insert(key, seen, 0);
    0
}

/// `tcp_destroy_sock(sk)`: a TCP socket goes; its entry, if it had one, goes with it (the LRU
/// bound is for sockets that never close). One lookup for every other socket.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn lxcmon_sk_destroy(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let key = sk as u64;
    // SAFETY: only the presence is read.
    if unsafe { LXCMON_RETRANS_SEEN.get(key) }.is_some() {
        let _ = LXCMON_RETRANS_SEEN.remove(key);
    }
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
    if let Some(slot) = socket_slot(&o, sk) {
        add(slot, 1);
    }
    0
}
