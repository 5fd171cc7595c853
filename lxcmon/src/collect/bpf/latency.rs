//! Run-queue wait: the scheduler program (`tp_btf/sched_switch`), the task offsets it reads
//! from the kernel's BTF, and the per-container histograms, read for every container in one
//! batched map read per cycle.
//!
//! The program keeps no in-flight state: each task's enqueue time is the kernel's own
//! (`sched_info.last_queued`), read when the task is switched in, so there is nothing to leak
//! and the wait is the one `/proc/<pid>/schedstat` adds up.

use super::btf::Btf;
use super::error::{map_err, BpfError};
use super::loader::TpBtf;
use super::{sys, BpfCollector};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use lxcmon_common::{
    LatencyHist, SchedOffsets, MAP_IOLAT_HIST, MAP_RARE, MAP_RUNQ_HIST, PROG_SCHED_SWITCH,
    RARE_EVENTS,
};
use std::collections::HashMap;
use std::os::fd::AsFd;

/// The scheduler program, its tracepoint and link name (`sched-<tracepoint>`).
const PROGRAMS: [TpBtf<'static>; 1] = [(PROG_SCHED_SWITCH, "sched_switch", "sched-sched_switch")];

/// Whether run-queue wait is measured (see [`BpfCollector::runqueue`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LatencyMode {
    Counting,
    /// Not measured, and why (configuration, or the kernel's reason).
    Off(String),
}

/// The task and cgroup offsets the scheduler program needs, from the kernel's BTF; the error
/// is why run-queue wait cannot be measured (a kernel without `CONFIG_SCHED_INFO` has no
/// `sched_info`, one without `CONFIG_FAIR_GROUP_SCHED` no `cfs_rq.rq`).
pub(crate) fn sched_offsets(btf: &Btf) -> Result<SchedOffsets, String> {
    let m = |s: &str, f: &str| btf.member_offset(s, f).map_err(|e| e.to_string());
    Ok(SchedOffsets {
        enabled: 1,
        task_cgroups: m("task_struct", "cgroups")?,
        task_last_queued: m("task_struct", "sched_info.last_queued")?,
        task_se_cfs_rq: m("task_struct", "se.cfs_rq")?,
        cfs_rq_rq: m("cfs_rq", "rq")?,
        rq_clock: m("rq", "clock")?,
        cset_dfl_cgrp: m("css_set", "dfl_cgrp")?,
        cgrp_level: m("cgroup", "level")?,
        cgrp_kn: m("cgroup", "kn")?,
        // `__parent` since 6.15, `parent` before.
        kn_parent: m("kernfs_node", "__parent").or_else(|_| m("kernfs_node", "parent"))?,
        kn_id: m("kernfs_node", "id")?,
    })
}

/// Latency state of the collector.
#[derive(Debug)]
pub(crate) struct LatencyState {
    pub(crate) mode: LatencyMode,
    /// `Ok` when the offsets resolved (the programs can run), else why not.
    offsets: Result<(), String>,
    hists: HashMap<u64, [LatencyHist; 1]>,
    /// Block I/O latency: whether measured, and each container's (read, write) histograms.
    pub(crate) io: super::iolat::IoLatState,
}

impl LatencyState {
    pub(crate) fn new(offsets: Result<(), String>, io_offsets: Result<bool, String>) -> Self {
        Self {
            mode: LatencyMode::Off("not attached yet".into()),
            offsets,
            hists: HashMap::new(),
            io: super::iolat::IoLatState::new(io_offsets),
        }
    }
}

impl BpfCollector {
    /// Whether run-queue wait is measured on this kernel and configuration.
    pub fn runqueue(&self) -> &LatencyMode {
        &self.latency.mode
    }

    /// Switches the scheduler program on (attached, keeping an earlier agent's pinned links)
    /// or off (detached). Returns the new mode; a refusal is the reason, the rest goes on.
    pub fn set_runqueue(&mut self, on: bool) -> &LatencyMode {
        let offsets = self.latency.offsets.clone();
        self.latency.mode = self.switch_family(
            on,
            "enable_runqueue_latency",
            offsets,
            &PROGRAMS.map(|p| p.2),
            |c| c.attach_tp_btf(&PROGRAMS),
        );
        &self.latency.mode
    }

    /// Zeroes a slot's histograms on every CPU (a slot newly given to a container).
    pub(crate) fn reset_latency_slot(&mut self, slot: u32) -> Result<(), BpfError> {
        self.zero_hists(MAP_RUNQ_HIST, &[slot])?;
        self.zero_hists(MAP_IOLAT_HIST, &[slot * 2, slot * 2 + 1])
    }

    fn zero_hists(&mut self, name: &'static str, indices: &[u32]) -> Result<(), BpfError> {
        let ncpus = self.ncpus;
        let mut map: PerCpuArray<&mut MapData, LatencyHist> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for i in indices {
            let zeros =
                PerCpuValues::try_from(vec![LatencyHist::default(); ncpus]).map_err(|e| {
                    BpfError::Map {
                        map: name,
                        source: aya::maps::MapError::IoError(e),
                    }
                })?;
            map.set(*i, zeros, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Reads every tracked container's histograms (run-queue wait, block I/O latency; CPUs
    /// folded), each in one batched map read where the kernel supports it. Nothing is read for
    /// a family that is off.
    pub(crate) fn refresh_latency(&mut self) -> Result<(), BpfError> {
        self.latency.hists.clear();
        if let Some(log) = &mut self.log {
            log.flush();
        }
        if self.latency.mode == LatencyMode::Counting {
            let mut hists = std::mem::take(&mut self.latency.hists);
            let read = self.read_slots(MAP_RUNQ_HIST, &mut hists);
            self.latency.hists = hists;
            read?;
        }
        self.refresh_io_latency()
    }

    /// Every tracked container's `K` consecutive values of `name` (a per-CPU array indexed by
    /// `slot * K + i`), CPUs folded, into `out` (emptied first, and left empty on an error):
    /// histograms, or the retransmit counter. `out` is the caller's map of the last cycle, so
    /// its capacity is reused rather than a map and a vector per container built every cycle.
    pub(crate) fn read_slots<T: SlotValue, const K: usize>(
        &mut self,
        name: &'static str,
        out: &mut HashMap<u64, [T; K]>,
    ) -> Result<(), BpfError> {
        out.clear();
        let mut buf = std::mem::take(&mut self.batch);
        let read = self.read_slots_into(name, out, &mut buf);
        self.batch = buf;
        if read.is_err() {
            out.clear();
        }
        read
    }

    fn read_slots_into<T: SlotValue, const K: usize>(
        &self,
        name: &'static str,
        out: &mut HashMap<u64, [T; K]>,
        buf: &mut sys::BatchBuf,
    ) -> Result<(), BpfError> {
        let per_slot = K as u32;
        let batched = match self.map(name)? {
            Map::PerCpuArray(data) if self.batched != Some(false) => {
                self.fold_batched::<T>(data, per_slot, buf, |id, i, v| {
                    if let Some(sum) = out.entry(id).or_insert([T::default(); K]).get_mut(i) {
                        sum.add(v);
                    }
                })
            }
            _ => false,
        };
        match batched {
            true => {}
            false => {
                // Older kernels without batched array reads: one read per container.
                out.clear();
                let map: PerCpuArray<&MapData, T> =
                    PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
                for (id, t) in &self.tracked {
                    let mut v = [T::default(); K];
                    for (i, sum) in (0..per_slot).zip(v.iter_mut()) {
                        let per_cpu = map
                            .get(&(t.slot * per_slot + i), 0)
                            .map_err(map_err(name))?;
                        for x in per_cpu.iter() {
                            sum.add(x);
                        }
                    }
                    out.insert(*id, v);
                }
            }
        }
        Ok(())
    }

    /// Reads a per-CPU array indexed by `slot * per_slot + i` in bounded batches and hands
    /// each tracked container's values on as they arrive, CPUs folded: `put(cgroup id, i,
    /// value)`. False where the kernel refused a batch or returned fewer elements than asked
    /// (part may have been handed on: the caller starts over with single reads).
    pub(crate) fn fold_batched<T: SlotValue>(
        &self,
        data: &MapData,
        per_slot: u32,
        buf: &mut sys::BatchBuf,
        mut put: impl FnMut(u64, usize, &T),
    ) -> bool {
        let Some(max_slot) = self.tracked.values().map(|t| t.slot).max() else {
            return true;
        };
        // The container of each slot (0: none; cgroup ids are never 0).
        let mut ids = vec![0u64; max_slot as usize + 1];
        for (id, t) in &self.tracked {
            ids[t.slot as usize] = *id;
        }
        let count = (max_slot + 1) * per_slot;
        let value_size = std::mem::size_of::<T>();
        let stride = value_size.div_ceil(8) * 8;
        let per_index = stride * self.ncpus;
        let per_slot = per_slot as usize;
        let read = buf.percpu_array_for_each(
            data.fd().as_fd(),
            count,
            value_size,
            self.ncpus,
            |first, raw| {
                for (k, cpus) in raw.chunks_exact(per_index).enumerate() {
                    let key = first + k;
                    let id = ids.get(key / per_slot).copied().unwrap_or(0);
                    if id == 0 {
                        continue;
                    }
                    let mut sum = T::default();
                    for cpu in cpus.chunks_exact(stride) {
                        sum.add(&from_bytes(cpu));
                    }
                    put(id, key % per_slot, &sum);
                }
            },
        );
        match read {
            Ok(n) if n == count as usize => true,
            Ok(n) => {
                tracing::debug!(
                    read = n,
                    asked = count,
                    "batched map read came short: reading per container"
                );
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "batched map read refused: reading per container");
                false
            }
        }
    }

    /// A tracked container's run-queue wait histogram as of the last refresh (`None` while
    /// run-queue wait is off).
    pub fn runqueue_hist(&self, cgroup_id: u64) -> Option<LatencyHist> {
        self.latency.hists.get(&cgroup_id).map(|[h]| *h)
    }

    /// Whether the programs' own log (aya-log's ring buffer) is read into the agent's log.
    pub fn reads_kernel_log(&self) -> bool {
        self.log.is_some()
    }

    /// The rare kernel-side conditions (`RARE_*`: a tracked task switched in with an enqueue
    /// time after its run-queue's clock, a bio the I/O latency in-flight map refused), summed over CPUs. The
    /// programs log them themselves (aya-log); this is their count.
    pub fn rare_events(&self) -> Result<[u64; RARE_EVENTS as usize], BpfError> {
        let map: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.map(MAP_RARE)?).map_err(map_err(MAP_RARE))?;
        let mut out = [0u64; RARE_EVENTS as usize];
        for (i, o) in out.iter_mut().enumerate() {
            *o = map
                .get(&(i as u32), 0)
                .map_err(map_err(MAP_RARE))?
                .iter()
                .sum();
        }
        Ok(out)
    }
}

/// A value of a per-CPU array read for every container at once: plain data, summed over CPUs.
pub(crate) trait SlotValue: aya::Pod + Default {
    fn add(&mut self, other: &Self);
}

impl SlotValue for LatencyHist {
    fn add(&mut self, other: &Self) {
        LatencyHist::add(self, other);
    }
}

impl SlotValue for lxcmon_common::Counters {
    fn add(&mut self, other: &Self) {
        lxcmon_common::Counters::add(self, other);
    }
}

impl SlotValue for u64 {
    fn add(&mut self, other: &Self) {
        *self = self.wrapping_add(*other);
    }
}

/// One CPU's value from a batched read's bytes (`size_of::<T>()` of them).
fn from_bytes<T: SlotValue>(b: &[u8]) -> T {
    if b.len() < std::mem::size_of::<T>() {
        return T::default();
    }
    // SAFETY: `T` is `Pod` (any bit pattern is a value) and `b` holds at least its size;
    // the read is unaligned-safe.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lxcmon_common::LATENCY_BUCKETS;

    #[test]
    fn the_running_kernel_has_the_sched_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            return; // no kernel BTF here
        };
        let s = sched_offsets(&btf).expect("offsets");
        assert_eq!(s.enabled, 1);
        assert!(s.task_cgroups > 0 && s.cgrp_kn > 0 && s.cgrp_level > 0 && s.kn_id > 0);
        assert!(s.task_last_queued > 0 && s.task_se_cfs_rq > 0 && s.cfs_rq_rq > 0);
        // `sched_info` and `se` are members of `task_struct`, the fields inside them.
        let m = |a: &str, b: &str| btf.member_offset(a, b).expect(b);
        assert_eq!(
            s.task_last_queued,
            m("task_struct", "sched_info") + m("sched_info", "last_queued")
        );
        assert_eq!(
            s.task_se_cfs_rq,
            m("task_struct", "se") + m("sched_entity", "cfs_rq")
        );
    }

    #[test]
    fn decodes_a_histogram_value() {
        let mut bytes = Vec::new();
        for i in 0..=LATENCY_BUCKETS as u64 {
            bytes.extend((i * 3).to_ne_bytes());
        }
        let h: LatencyHist = from_bytes(&bytes);
        assert_eq!(h.buckets[0], 0);
        assert_eq!(
            h.buckets[LATENCY_BUCKETS - 1],
            (LATENCY_BUCKETS as u64 - 1) * 3
        );
        assert_eq!(h.sum_ns, LATENCY_BUCKETS as u64 * 3);
        let mut n = 3u64;
        n.add(&from_bytes::<u64>(&u64::MAX.to_ne_bytes()));
        assert_eq!(n, 2, "counters wrap as the kernel's do");
        assert_eq!(from_bytes::<u64>(&[1, 2]), 0, "too short: nothing");
    }
}
