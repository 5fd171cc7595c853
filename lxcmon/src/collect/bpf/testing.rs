//! The test-only side of the collector: running a loaded program once over a packet.

use super::error::BpfError;
use super::loader::program;
use super::{sys, BpfCollector};
use aya::programs::CgroupSkb;
use std::os::fd::AsFd;

impl BpfCollector {
    /// Runs a `cgroup_skb` program once over `frame` with `BPF_PROG_TEST_RUN` (self-test and
    /// tests): the packet's socket is in the calling process's cgroup, its device is `ifindex`.
    pub fn test_run_skb(&self, egress: bool, frame: &[u8], ifindex: u32) -> Result<u32, BpfError> {
        let [ingress, egress_prog] = self.skb_pair();
        let name = if egress { egress_prog } else { ingress };
        let prog: &CgroupSkb = program(&self.ebpf, name)?;
        let fd = prog.fd().map_err(|source| BpfError::Program {
            program: name,
            source,
        })?;
        sys::test_run_skb(fd.as_fd(), frame, ifindex).map_err(|source| BpfError::TestRun {
            program: name,
            source,
        })
    }

    /// Overwrites the raw value in a cgroup's slot storage (tests only: proves which slot the
    /// network programs count into). The collector writes it again on the next attach.
    #[doc(hidden)]
    pub fn overwrite_stored_skb_slot(&self, cgroup_id: u64, raw: u32) -> Result<(), BpfError> {
        sys::cgroup_storage_set(self.skb_slot_map()?, cgroup_id, raw).map_err(|source| {
            BpfError::MapIo {
                map: lxcmon_common::MAP_SKB_SLOT,
                source,
            }
        })
    }

    /// The raw entry of the direct-mapped slot index at a cgroup id's position (tests only).
    #[doc(hidden)]
    pub fn slot_index_raw(&mut self, cgroup_id: u64) -> Result<u64, BpfError> {
        let pos = lxcmon_common::slot_index_pos(cgroup_id);
        self.slot_index()?
            .get(&pos, 0)
            .map_err(super::error::map_err(lxcmon_common::MAP_SLOT_INDEX))
    }

    /// Overwrites the entry at a cgroup id's position (tests only: proves the programs read
    /// the index, and the tracked map for a shared entry). A restart writes it again.
    #[doc(hidden)]
    pub fn overwrite_slot_index(&mut self, cgroup_id: u64, raw: u64) -> Result<(), BpfError> {
        let pos = lxcmon_common::slot_index_pos(cgroup_id);
        self.slot_index()?
            .set(pos, raw, 0)
            .map_err(super::error::map_err(lxcmon_common::MAP_SLOT_INDEX))
    }
}
