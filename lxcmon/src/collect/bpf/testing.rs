//! The test-only side of the collector: running a loaded program once over a packet.

use super::error::BpfError;
use super::loader::program;
use super::{sys, BpfCollector};
use aya::programs::CgroupSkb;
use lxcmon_common::{PROG_SKB_EGRESS, PROG_SKB_INGRESS};
use std::os::fd::AsFd;

impl BpfCollector {
    /// Runs a `cgroup_skb` program once over `frame` with `BPF_PROG_TEST_RUN` (self-test and
    /// tests): the packet's socket is in the calling process's cgroup, its device is `ifindex`.
    pub fn test_run_skb(&self, egress: bool, frame: &[u8], ifindex: u32) -> Result<u32, BpfError> {
        let name = if egress {
            PROG_SKB_EGRESS
        } else {
            PROG_SKB_INGRESS
        };
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
}
