//! Block I/O: the BTF programs (`tp_btf/block_bio_queue` reading the bio, and
//! `tp_btf/writeback_dirty_folio` counting buffered writes when pages are dirtied), or the
//! classic `block/block_bio_queue` tracepoint where BTF is missing, or none (the file readers
//! count I/O). The excluded devices are a map the programs consult.

use super::error::{map_err, BpfError, Cause};
use super::loader::{loaded, program_mut, TP_CATEGORY, TP_NAME};
use super::BpfCollector;
use crate::logging::Chain;
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::programs::links::FdLink;
use aya::programs::TracePoint;
use lxcmon_common::{
    excldev_pos, EXCLDEV_INDEX_SIZE, EXCLDEV_PRESENT, EXCLDEV_SHARED, MAP_EXCLDEV_INDEX,
    MAP_EXCLUDED_DEVS, PROG_BIO_QUEUE, PROG_BIO_QUEUE_BTF, PROG_DIRTY_FOLIO,
};
use tracing::debug;

const TP_DIRTY: &str = "writeback_dirty_folio";
const LINK_BIO_CLASSIC: &str = "block_bio_queue";
const LINK_BIO_BTF: &str = "block_bio_queue_btf";
const LINK_DIRTY: &str = "writeback_dirty_folio";

/// How block I/O is counted (see [`BpfCollector::io_mode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoMode {
    /// Bios submitted by the container's tasks (reads, direct I/O, and writeback the tasks do
    /// themselves such as fsync); buffered writes flushed by kernel threads are not counted.
    /// The string says why the dirtied-bytes mode is not in use.
    BiosOnly(String),
    /// Reads and direct writes from bios; buffered writes as page-cache bytes dirtied by the
    /// container's tasks (counted once, when a page turns dirty), whoever writes them back.
    BiosAndDirtied,
    /// No block program could be loaded (5.10's verifier lacks the ancestor-cgroup helper for
    /// tracepoints): the network programs run alone and block I/O is left to the file readers.
    /// The string is the kernel's reason.
    Files(String),
}

impl IoMode {
    /// Whether the programs count block I/O at all.
    pub fn counts_io(&self) -> bool {
        !matches!(self, IoMode::Files(_))
    }
}

impl BpfCollector {
    /// How block I/O is counted on this kernel.
    pub fn io_mode(&self) -> &IoMode {
        &self.io_mode
    }

    /// Attaches the best block programs the kernel takes; `offsets` is whether the kernel
    /// struct offsets for the BTF programs were resolved (else why not).
    pub(crate) fn attach_block(&mut self, offsets: Result<(), String>) -> IoMode {
        match offsets.and_then(|()| self.attach_btf_io()) {
            Ok(()) => {
                let _ = self.links.remove(LINK_BIO_CLASSIC);
                IoMode::BiosAndDirtied
            }
            Err(why) => {
                self.detach_links([LINK_BIO_BTF, LINK_DIRTY]);
                match self.attach_classic_io() {
                    Ok(()) => IoMode::BiosOnly(why),
                    Err(e) => {
                        let _ = self.links.remove(LINK_BIO_CLASSIC);
                        IoMode::Files(Chain(&e).to_string())
                    }
                }
            }
        }
    }

    /// Loads and attaches the BTF block and dirtied-page programs, keeping the attachments of
    /// an earlier agent. Errors are the reason to fall back to the classic one (the caller
    /// detaches both, so neither counts alone).
    fn attach_btf_io(&mut self) -> Result<(), String> {
        self.attach_tp_btf(&[
            (PROG_BIO_QUEUE_BTF, TP_NAME, LINK_BIO_BTF),
            (PROG_DIRTY_FOLIO, TP_DIRTY, LINK_DIRTY),
        ])
    }

    /// Loads and attaches the classic `block/block_bio_queue` program.
    fn attach_classic_io(&mut self) -> Result<(), BpfError> {
        let tp: &mut TracePoint = program_mut(&mut self.ebpf, PROG_BIO_QUEUE)?;
        tp.load().map_err(|source| BpfError::Program {
            program: PROG_BIO_QUEUE,
            source,
        })?;
        let me = loaded(&self.ebpf, PROG_BIO_QUEUE);
        if self.links.holds(LINK_BIO_CLASSIC, me) {
            debug!("keeping the pinned block tracepoint attachment");
            return Ok(());
        }
        let tp: &mut TracePoint = program_mut(&mut self.ebpf, PROG_BIO_QUEUE)?;
        let attach_err = |source: Cause| BpfError::AttachTracepoint {
            program: PROG_BIO_QUEUE,
            tracepoint: format!("{TP_CATEGORY}/{TP_NAME}"),
            source,
        };
        let id = tp
            .attach(TP_CATEGORY, TP_NAME)
            .map_err(|e| attach_err(e.into()))?;
        let link = tp.take_link(id).map_err(|e| attach_err(e.into()))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| attach_err(e.into()))?;
        self.links.put(LINK_BIO_CLASSIC, fd).map_err(attach_err)
    }

    /// Replaces the excluded-device set: new devices into the hash, then every index entry as
    /// the new set has it (an adopted index may be of another set, a new one empty), then the
    /// devices no longer excluded out of the hash, so the programs never miss an excluded one.
    pub fn set_excluded_devices(&mut self, devs: &[u32]) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(self.map_mut(MAP_EXCLUDED_DEVS)?)
                .map_err(map_err(MAP_EXCLUDED_DEVS))?;
        let old: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for d in devs {
            map.insert(d, 1, 0).map_err(map_err(MAP_EXCLUDED_DEVS))?;
        }
        self.sync_array(MAP_EXCLDEV_INDEX, &excldev_index(devs))?;
        let mut map: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(self.map_mut(MAP_EXCLUDED_DEVS)?)
                .map_err(map_err(MAP_EXCLUDED_DEVS))?;
        for k in old.iter().filter(|k| !devs.contains(k)) {
            map.remove(k).map_err(map_err(MAP_EXCLUDED_DEVS))?;
        }
        Ok(())
    }
}

/// Every entry of the excluded-device index for the set `devs` (see `MAP_EXCLDEV_INDEX`).
fn excldev_index(devs: &[u32]) -> Vec<u64> {
    let mut index = vec![0u64; EXCLDEV_INDEX_SIZE as usize];
    let mut sorted = devs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for dev in sorted {
        let e = &mut index[excldev_pos(dev) as usize];
        *e = match *e {
            0 => EXCLDEV_PRESENT | u64::from(dev),
            held => held | EXCLDEV_SHARED,
        };
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the programs conclude from an entry, as `excluded` in the BPF object does; `hash`
    /// stands for the full set they ask for a shared entry.
    fn excluded(index: &[u64], hash: &[u32], dev: u32) -> bool {
        let e = index[excldev_pos(dev) as usize];
        (e & EXCLDEV_PRESENT != 0 && e as u32 == dev)
            || (e & EXCLDEV_SHARED != 0 && hash.contains(&dev))
    }

    #[test]
    fn the_excluded_device_index_answers_as_the_set() {
        let dev = |major: u32, minor: u32| (major << 20) | minor;
        // loop0-7, dm-0-2, and a device placed on loop1's entry (a shared entry).
        let mut set: Vec<u32> = (0..8).map(|m| dev(7, m)).collect();
        set.extend((0..3).map(|m| dev(253, m)));
        let colliding = (0..4096)
            .map(|m| dev(8, m))
            .find(|d| excldev_pos(*d) == excldev_pos(dev(7, 1)))
            .expect("some minor of major 8 shares loop1's entry");
        set.push(colliding);
        let index = excldev_index(&set);
        assert_ne!(index[excldev_pos(dev(7, 1)) as usize] & EXCLDEV_SHARED, 0);
        for major in [7, 8, 253, 259] {
            for minor in 0..2048 {
                let d = dev(major, minor);
                assert_eq!(
                    excluded(&index, &set, d),
                    set.contains(&d),
                    "{major}:{minor}"
                );
            }
        }
        assert!(excldev_index(&[]).iter().all(|e| *e == 0));
    }
}
