//! Block I/O latency: the request programs (`tp_btf/block_bio_queue`, `block_rq_complete`),
//! the struct offsets they read from the kernel's BTF, and the per-container read and write
//! histograms, read in one batched map read per cycle.
//!
//! A tracked container's bio waits for its request's completion in a fixed array at a hash of
//! its first sector (bounded by construction: an entry nothing consumes is overwritten later).

use super::btf::Btf;
use super::error::{map_err, BpfError};
use super::latency::LatencyMode;
use super::loader::TpBtf;
use super::BpfCollector;
use lxcmon_common::{
    BlkLatOffsets, IoStart, LatencyHist, MAP_IOLAT_BIOS, MAP_IOLAT_HIST, PROG_IOLAT_BIO,
    PROG_IOLAT_BIO_OLD, PROG_IOLAT_COMPLETE,
};
use std::collections::HashMap;

/// Attached in this order: completion first and bio queueing last, so no entry is made that
/// nothing would consume. Link names are `iolat-<tracepoint>`.
const PROGRAMS: [TpBtf<'static>; 2] = [
    (
        PROG_IOLAT_COMPLETE,
        "block_rq_complete",
        "iolat-block_rq_complete",
    ),
    (PROG_IOLAT_BIO, "block_bio_queue", "iolat-block_bio_queue"),
];
/// Before 5.11 (the queue as the first argument).
const PROGRAMS_OLD: [TpBtf<'static>; 2] = [
    (
        PROG_IOLAT_COMPLETE,
        "block_rq_complete",
        "iolat-block_rq_complete",
    ),
    (
        PROG_IOLAT_BIO_OLD,
        "block_bio_queue",
        "iolat-block_bio_queue",
    ),
];
/// Links of earlier versions' programs, detached whenever the family is switched: an agent
/// that adopts an older one's pins must not leave its issue-time program running.
const RETIRED_LINKS: [&str; 1] = ["iolat-block_rq_issue"];

/// The request and bio offsets the programs need, from the kernel's BTF; the error is why
/// block I/O latency cannot be measured.
pub(crate) fn blk_offsets(btf: &Btf) -> Result<BlkLatOffsets, String> {
    let m = |s: &str, f: &str| btf.member_offset(s, f).map_err(|e| e.to_string());
    // `block_bio_queue(struct bio *)` since 5.11, with the `struct request_queue *` first
    // before.
    let before_5_11 = aya::util::KernelVersion::current()
        .map(|v| v < aya::util::KernelVersion::new(5, 11, 0))
        .map_err(|e| format!("kernel version: {e}"))?;
    Ok(BlkLatOffsets {
        enabled: 1,
        old_args: u32::from(before_5_11),
        rq_bio: m("request", "bio")?,
        rq_sector: m("request", "__sector")?,
        rq_data_len: m("request", "__data_len")?,
        rq_start_ns: m("request", "start_time_ns")?,
        bio_opf: m("bio", "bi_opf")?,
        bio_sector: m("bio", "bi_iter.bi_sector")?,
    })
}

/// Block I/O latency state of the collector.
#[derive(Debug)]
pub(crate) struct IoLatState {
    pub(crate) mode: LatencyMode,
    /// The kernel predates 5.11: the `_old` programs.
    old: bool,
    /// The switch as last set (the mode may be off for the kernel's reason).
    wanted: bool,
    offsets: Result<(), String>,
    /// (reads, writes) by cgroup id, as of the last refresh.
    hists: HashMap<u64, [LatencyHist; 2]>,
}

impl IoLatState {
    pub(crate) fn new(offsets: Result<bool, String>) -> Self {
        let old = offsets.as_ref().is_ok_and(|o| *o);
        let offsets = offsets.map(drop);
        Self {
            mode: LatencyMode::Off("not attached yet".into()),
            old,
            wanted: false,
            offsets,
            hists: HashMap::new(),
        }
    }
}

impl BpfCollector {
    /// Whether block I/O latency is measured on this kernel and configuration.
    pub fn io_latency(&self) -> &LatencyMode {
        &self.latency.io.mode
    }

    /// Whether block I/O latency was last switched on (measured or refused by the kernel).
    pub fn io_latency_wanted(&self) -> bool {
        self.latency.io.wanted
    }

    /// Switches the request programs on (keeping an earlier agent's pinned links) or off.
    /// Returns the new mode; a refusal is the reason, the rest goes on.
    pub fn set_io_latency(&mut self, on: bool) -> &LatencyMode {
        self.latency.io.wanted = on;
        self.detach_links(RETIRED_LINKS);
        let offsets = self.latency.io.offsets.clone();
        self.latency.io.mode = self.switch_family(
            on,
            "enable_io_latency",
            offsets,
            &PROGRAMS.map(|p| p.2),
            Self::attach_iolat,
        );
        &self.latency.io.mode
    }

    fn programs(&self) -> [TpBtf<'static>; 2] {
        if self.latency.io.old {
            PROGRAMS_OLD
        } else {
            PROGRAMS
        }
    }

    /// Loads both, then attaches them in [`PROGRAMS`]' order. The tracepoints' argument
    /// lists changed in 5.11 but some 5.10 stable kernels (Debian's 5.10.223) have the new
    /// ones: when the set the version chose is refused, the other is tried.
    fn attach_iolat(&mut self) -> Result<(), String> {
        self.attach_tp_btf(&self.programs()).or_else(|why| {
            self.detach_links(PROGRAMS.map(|p| p.2));
            self.latency.io.old = !self.latency.io.old;
            self.attach_tp_btf(&self.programs()).map_err(|_| why)
        })
    }

    /// Reads every tracked container's (read, write) histograms; nothing while off.
    pub(crate) fn refresh_io_latency(&mut self) -> Result<(), BpfError> {
        self.latency.io.hists.clear();
        if self.latency.io.mode != LatencyMode::Counting {
            return Ok(());
        }
        let mut hists = std::mem::take(&mut self.latency.io.hists);
        let read = self.read_slots(MAP_IOLAT_HIST, &mut hists);
        self.latency.io.hists = hists;
        read
    }

    /// How many bios wait for their request's completion in the kernel side's array (tests:
    /// nothing is left once the I/O is done).
    pub fn io_inflight(&self) -> Result<usize, BpfError> {
        let map: aya::maps::Array<&aya::maps::MapData, IoStart> =
            aya::maps::Array::try_from(self.map(MAP_IOLAT_BIOS)?)
                .map_err(map_err(MAP_IOLAT_BIOS))?;
        Ok(map
            .iter()
            .filter(|e| e.as_ref().is_ok_and(|e| e.bio != 0))
            .count())
    }

    /// A tracked container's block I/O latency histograms (reads, writes) as of the last
    /// refresh (`None` while block I/O latency is off).
    pub fn io_latency_hists(&self, cgroup_id: u64) -> Option<[LatencyHist; 2]> {
        self.latency.io.hists.get(&cgroup_id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_the_request_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return; // no kernel BTF here
        };
        let o = blk_offsets(&btf).expect("offsets");
        assert_eq!((o.enabled, o.old_args), (1, 0));
        assert!(o.rq_bio > 0 && o.rq_sector > 0 && o.bio_sector > 0);
        assert!(o.rq_data_len > 0 && o.rq_start_ns > 0);
        assert_ne!(o.bio_opf, o.bio_sector);
    }
}
