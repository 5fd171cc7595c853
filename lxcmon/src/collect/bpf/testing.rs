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
}
