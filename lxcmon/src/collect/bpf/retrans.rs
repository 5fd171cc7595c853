//! TCP retransmits: the `tp_btf/tcp_retransmit_skb` and `tcp_retransmit_synack` programs (and
//! `tcp_destroy_sock`, which lets go of a closed socket's last sum), the socket and cgroup
//! offsets they read from the kernel's BTF, and the per-container segment counters, read for
//! every container in one batched map read per cycle.

use super::btf::Btf;
use super::error::{map_err, BpfError};
use super::latency::LatencyMode;
use super::loader::TpBtf;
use super::{format, BpfCollector};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use lxcmon_common::{
    TcpOffsets, TcpSeen, MAP_TCP_RETRANS, MAP_TCP_SEEN, PROG_TCP_DESTROY, PROG_TCP_RETRANS,
    PROG_TCP_SYNACK,
};
use std::collections::HashMap;
use std::path::Path;

/// The programs, their tracepoints and link names.
const PROGRAMS: [TpBtf<'static>; 3] = [
    (
        PROG_TCP_RETRANS,
        "tcp_retransmit_skb",
        "tcp-tcp_retransmit_skb",
    ),
    (
        PROG_TCP_SYNACK,
        "tcp_retransmit_synack",
        "tcp-tcp_retransmit_synack",
    ),
    (PROG_TCP_DESTROY, "tcp_destroy_sock", "tcp-tcp_destroy_sock"),
];

/// The offsets the program needs, from the kernel's BTF, and whether the tracepoint passes
/// `err` (its tracefs record has the field: both came with the same kernel change). The error
/// is why retransmits cannot be counted.
pub(crate) fn tcp_offsets(btf: &Btf, tracefs: &Path) -> Result<TcpOffsets, String> {
    let m = |s: &str, f: &str| btf.member_offset(s, f).map_err(|e| e.to_string());
    let sk_cgrp = m("sock", "sk_cgrp_data.cgroup").map_err(|e| {
        format!(
            "{e}: the socket's cgroup pointer (Linux 5.15+) is needed to attribute a retransmit"
        )
    })?;
    let path = tracefs.join("events/tcp/tcp_retransmit_skb/format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (no tcp_retransmit_skb tracepoint)", path.display()))?;
    let err_arg = format::parse_format(&text).contains_key("err");
    Ok(TcpOffsets {
        enabled: 1,
        err_arg: u32::from(err_arg),
        sk_cgrp,
        skb_segs: m("sk_buff", "cb")? + m("tcp_skb_cb", "tcp_gso_segs")?,
        tp_total_retrans: m("tcp_sock", "total_retrans")?,
        sk_addrpair: m("sock", "__sk_common.skc_addrpair")?,
        sk_portpair: m("sock", "__sk_common.skc_portpair")?,
        cgrp_level: m("cgroup", "level")?,
        cgrp_kn: m("cgroup", "kn")?,
        // `__parent` since 6.15, `parent` before.
        kn_parent: m("kernfs_node", "__parent").or_else(|_| m("kernfs_node", "parent"))?,
        kn_id: m("kernfs_node", "id")?,
    })
}

/// TCP retransmit state of the collector.
#[derive(Debug)]
pub(crate) struct RetransState {
    pub(crate) mode: LatencyMode,
    /// The switch as last set (the mode may be off for the kernel's reason).
    wanted: bool,
    /// `Ok` when the offsets resolved (the program can run), else why not.
    offsets: Result<(), String>,
    /// Cumulative segments by cgroup id, as of the last refresh.
    counts: HashMap<u64, [u64; 1]>,
}

impl RetransState {
    pub(crate) fn new(offsets: Result<(), String>) -> Self {
        Self {
            mode: LatencyMode::Off("not attached yet".into()),
            wanted: false,
            offsets,
            counts: HashMap::new(),
        }
    }
}

impl BpfCollector {
    /// Whether TCP retransmits are counted on this kernel and configuration.
    pub fn tcp_retransmits(&self) -> &LatencyMode {
        &self.retrans.mode
    }

    /// The switch as last set (`enable_tcp_retransmits`).
    pub fn tcp_retransmits_wanted(&self) -> bool {
        self.retrans.wanted
    }

    /// Switches the programs on (keeping an earlier agent's pinned links) or off (detached).
    /// Returns the new mode; a refusal is the reason, the rest goes on.
    pub fn set_tcp_retransmits(&mut self, on: bool) -> &LatencyMode {
        self.retrans.wanted = on;
        let offsets = self.retrans.offsets.clone();
        self.retrans.mode = self.switch_family(
            on,
            "enable_tcp_retransmits",
            offsets,
            &PROGRAMS.map(|p| p.2),
            |c| c.attach_tp_btf(&PROGRAMS),
        );
        &self.retrans.mode
    }

    /// Zeroes a slot's counter on every CPU (a slot newly given to a container).
    pub(crate) fn reset_retrans_slot(&mut self, slot: u32) -> Result<(), BpfError> {
        let ncpus = self.ncpus;
        let mut map: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map_mut(MAP_TCP_RETRANS)?)
                .map_err(map_err(MAP_TCP_RETRANS))?;
        let zeros = PerCpuValues::try_from(vec![0u64; ncpus]).map_err(|e| BpfError::Map {
            map: MAP_TCP_RETRANS,
            source: aya::maps::MapError::IoError(e),
        })?;
        map.set(slot, zeros, 0).map_err(map_err(MAP_TCP_RETRANS))
    }

    /// Reads every tracked container's counter (CPUs folded), in one batched map read where
    /// the kernel supports it; nothing while off.
    pub(crate) fn refresh_retrans(&mut self) -> Result<(), BpfError> {
        self.retrans.counts.clear();
        if self.retrans.mode != LatencyMode::Counting {
            return Ok(());
        }
        let mut counts = std::mem::take(&mut self.retrans.counts);
        let read = self.read_slots(MAP_TCP_RETRANS, &mut counts);
        self.retrans.counts = counts;
        read
    }

    /// How many sockets' sums the kernel side keeps (tests: none once the sockets are closed).
    pub fn tcp_sockets_seen(&self) -> Result<usize, BpfError> {
        let map: aya::maps::HashMap<&MapData, u64, TcpSeen> =
            aya::maps::HashMap::try_from(self.map(MAP_TCP_SEEN)?).map_err(map_err(MAP_TCP_SEEN))?;
        Ok(map.keys().filter(Result::is_ok).count())
    }

    /// A tracked container's retransmitted segments as of the last refresh (`None` while
    /// retransmits are not counted).
    pub fn tcp_retransmitted(&self, cgroup_id: u64) -> Option<u64> {
        self.retrans.counts.get(&cgroup_id).map(|[n]| *n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_the_tcp_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return; // no kernel BTF here
        };
        let tracefs = Path::new(super::super::TRACEFS);
        let format = tracefs.join("events/tcp/tcp_retransmit_skb/format");
        let (Ok(text), Ok(_)) = (
            std::fs::read_to_string(format),
            btf.member_offset("sock", "sk_cgrp_data.cgroup"),
        ) else {
            return; // no tracefs here, or a kernel before 5.15: the family is off there
        };
        let o = tcp_offsets(&btf, tracefs).expect("offsets");
        assert_eq!(o.enabled, 1);
        assert_eq!(o.err_arg == 1, text.contains(" err;"));
        assert!(o.sk_cgrp > 0 && o.skb_segs > 0 && o.cgrp_kn > 0 && o.kn_id > 0);
        // `total_retrans` is past `struct sock` (the program reads it with a checked read);
        // the connection's ports follow its addresses in `sock_common`.
        assert!(o.tp_total_retrans >= btf.struct_size("sock").expect("struct sock"));
        assert!(o.sk_portpair > o.sk_addrpair);
    }
}
