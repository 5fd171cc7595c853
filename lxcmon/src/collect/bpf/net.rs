//! Network bytes: the `cgroup_skb` ingress/egress pair, attached to each tracked container's
//! cgroup v2 directory (so host traffic runs no program), only while `enable_network` is on.

use super::error::{BpfError, Cause};
use super::loader::program_mut;
use super::{sys, BpfCollector};
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use lxcmon_common::{PROG_SKB_EGRESS, PROG_SKB_INGRESS};
use std::os::fd::AsFd;

const DIRECTIONS: [(&str, &str, CgroupSkbAttachType); 2] = [
    (PROG_SKB_INGRESS, "ingress", CgroupSkbAttachType::Ingress),
    (PROG_SKB_EGRESS, "egress", CgroupSkbAttachType::Egress),
];

fn link_name(cgroup_id: u64, dir: &str) -> String {
    format!("cg-{cgroup_id}-{dir}")
}

impl BpfCollector {
    /// Whether both network programs are attached to the cgroup.
    pub(crate) fn skb_attached(&self, cgroup_id: u64) -> bool {
        DIRECTIONS
            .iter()
            .all(|(_, dir, _)| self.links.has(&link_name(cgroup_id, dir)))
    }

    /// Attaches the network programs to a container's cgroup (those not attached yet).
    pub(crate) fn attach_skb(&mut self, cg: &sys::CgroupDir) -> Result<(), BpfError> {
        let file = std::fs::File::open(&cg.path).map_err(|source| BpfError::Cgroup {
            path: cg.path.clone(),
            source,
        })?;
        for (program, dir, ty) in DIRECTIONS {
            let name = link_name(cg.id, dir);
            if self.links.has(&name) {
                continue;
            }
            let attach_err = |source: Cause| BpfError::AttachCgroup {
                program,
                cgroup: cg.path.clone(),
                source,
            };
            let prog: &mut CgroupSkb = program_mut(&mut self.ebpf, program)?;
            let id = prog
                .attach(file.as_fd(), ty, CgroupAttachMode::Single)
                .map_err(|e| attach_err(e.into()))?;
            let link = prog.take_link(id).map_err(|e| attach_err(e.into()))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: LinkError| attach_err(e.into()))?;
            self.links.put(&name, fd).map_err(attach_err)?;
        }
        Ok(())
    }

    /// Detaches the network programs from a cgroup; returns the first error.
    pub(crate) fn detach_skb(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let mut first = Ok(());
        for (_, dir, _) in DIRECTIONS {
            if let Err(e) = self.links.remove(&link_name(cgroup_id, dir)) {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// `enable_network` changed: off detaches the network programs from every tracked
    /// container now; on attaches them when each container is tracked again.
    pub fn set_network(&mut self, on: bool) -> Vec<(u64, BpfError)> {
        self.network = on;
        if on {
            return Vec::new();
        }
        let ids: Vec<u64> = self.tracked.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.detach_skb(id).err().map(|e| (id, e)))
            .collect()
    }
}
