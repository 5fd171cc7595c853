//! Network bytes: the `cgroup_skb` ingress/egress pair, attached to each tracked container's
//! cgroup v2 directory (so host traffic runs no program), only while `enable_network` is on.
//!
//! The pair reads the container's counter slot from the attachment's cgroup storage
//! (`LXCMON_SKB_SLOT`, one value per cgroup): the agent writes slot + 1 right after attaching
//! (the storage exists only from then on), writes 0 before detaching (the kernel keeps a
//! cgroup's storage after a detach, and the slot may go to another container), and writes it
//! again for every attachment it adopts from pins. A 0 sends the programs to the ancestor walk,
//! so a packet between the attach and the write is still counted.

use super::error::{BpfError, Cause};
use super::loader::{loaded, program_mut};
use super::{sys, BpfCollector};
use crate::logging::Chain;
use aya::maps::Map;
use aya::programs::links::{FdLink, LinkError};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::Ebpf;
use lxcmon_common::{
    MAP_SKB_SLOT, PROG_SKB_EGRESS, PROG_SKB_EGRESS_WALK, PROG_SKB_INGRESS, PROG_SKB_INGRESS_WALK,
};
use std::os::fd::{AsFd, BorrowedFd};
use tracing::{debug, warn};

/// How the network programs find a packet's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkbSlot {
    /// In the attachment's cgroup storage: one helper call per packet, whatever the number of
    /// containers (the ancestor walk only until the agent wrote it).
    Storage,
    /// The tracked-ancestor walk for every packet: one hash lookup per tracked level. The
    /// reason the storage is not used.
    Walk(String),
}

const STORAGE_PAIR: [&str; 2] = [PROG_SKB_INGRESS, PROG_SKB_EGRESS];
const WALK_PAIR: [&str; 2] = [PROG_SKB_INGRESS_WALK, PROG_SKB_EGRESS_WALK];
const DIRECTIONS: [(&str, CgroupSkbAttachType); 2] = [
    ("ingress", CgroupSkbAttachType::Ingress),
    ("egress", CgroupSkbAttachType::Egress),
];

fn link_name(cgroup_id: u64, dir: &str) -> String {
    format!("cg-{cgroup_id}-{dir}")
}

/// Loads the pair `want` asks for; when the kernel refuses the storage pair, the walk pair, and
/// the reason goes into the returned mode.
pub(crate) fn load_skb(ebpf: &mut Ebpf, want: SkbSlot) -> Result<SkbSlot, BpfError> {
    let mode = match want {
        SkbSlot::Storage => match load_pair(ebpf, STORAGE_PAIR) {
            Ok(()) => return Ok(SkbSlot::Storage),
            Err(e) => SkbSlot::Walk(format!(
                "the kernel refused the network programs that read cgroup storage: {}",
                Chain(&e)
            )),
        },
        walk => walk,
    };
    load_pair(ebpf, WALK_PAIR)?;
    Ok(mode)
}

fn load_pair(ebpf: &mut Ebpf, pair: [&'static str; 2]) -> Result<(), BpfError> {
    for name in pair {
        let prog: &mut CgroupSkb = program_mut(ebpf, name)?;
        prog.load().map_err(|source| BpfError::Program {
            program: name,
            source,
        })?;
    }
    Ok(())
}

impl BpfCollector {
    /// The ingress and egress programs in use.
    pub(crate) fn skb_pair(&self) -> [&'static str; 2] {
        match self.skb_slot {
            SkbSlot::Storage => STORAGE_PAIR,
            SkbSlot::Walk(_) => WALK_PAIR,
        }
    }

    /// How the network programs find a packet's container.
    pub fn skb_slot(&self) -> &SkbSlot {
        &self.skb_slot
    }

    /// Whether both network programs are attached to the cgroup.
    pub(crate) fn skb_attached(&mut self, cgroup_id: u64) -> bool {
        let pair = self.skb_pair();
        pair.into_iter().zip(DIRECTIONS).all(|(program, (dir, _))| {
            let me = loaded(&self.ebpf, program);
            self.links.holds(&link_name(cgroup_id, dir), me)
        })
    }

    /// Attaches the network programs to a container's cgroup (those not attached yet), then
    /// writes its slot into the attachment's storage.
    pub(crate) fn attach_skb(&mut self, cg: &sys::CgroupDir, slot: u32) -> Result<(), BpfError> {
        let file = std::fs::File::open(&cg.path).map_err(|source| BpfError::Cgroup {
            path: cg.path.clone(),
            source,
        })?;
        for (program, (dir, ty)) in self.skb_pair().into_iter().zip(DIRECTIONS) {
            let name = link_name(cg.id, dir);
            if self.links.holds(&name, loaded(&self.ebpf, program)) {
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
        self.store_skb_slot(cg.id, slot + 1);
        Ok(())
    }

    /// Writes `value` (slot + 1, or 0) into the cgroup's storage, when the programs read it.
    /// A failure costs nothing but speed (the walk counts), so it is only logged; `ENOENT`
    /// means no attachment of these programs (an adopted one of an older object).
    pub(crate) fn store_skb_slot(&self, cgroup_id: u64, value: u32) {
        if self.skb_slot != SkbSlot::Storage {
            return;
        }
        let res = self
            .skb_slot_map()
            .and_then(|fd| sys::cgroup_storage_set(fd, cgroup_id, value).map_err(map_io));
        match res {
            Ok(()) => {}
            Err(BpfError::MapIo { source, .. })
                if source.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) =>
            {
                debug!(
                    cgroup_id,
                    "no cgroup storage of the network programs here: the walk counts"
                )
            }
            Err(e) => {
                warn!(cgroup_id, error = %Chain(&e), "cannot write the container's slot for the network programs: they walk the tracked cgroups instead")
            }
        }
    }

    /// The raw value (slot + 1, 0 = not written) in a cgroup's storage; `None` when it has none.
    pub fn stored_skb_slot(&self, cgroup_id: u64) -> Result<Option<u32>, BpfError> {
        sys::cgroup_storage_get(self.skb_slot_map()?, cgroup_id).map_err(map_io)
    }

    pub(crate) fn skb_slot_map(&self) -> Result<BorrowedFd<'_>, BpfError> {
        match self.map(MAP_SKB_SLOT)? {
            Map::CgroupStorage(data) => Ok(data.fd().as_fd()),
            _ => Err(BpfError::MissingMap(MAP_SKB_SLOT)),
        }
    }

    /// Detaches the network programs from a cgroup, its storage zeroed first; returns the
    /// first error.
    pub(crate) fn detach_skb(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        self.store_skb_slot(cgroup_id, 0);
        let mut first = Ok(());
        for (dir, _) in DIRECTIONS {
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

fn map_io(source: std::io::Error) -> BpfError {
    BpfError::MapIo {
        map: MAP_SKB_SLOT,
        source,
    }
}
