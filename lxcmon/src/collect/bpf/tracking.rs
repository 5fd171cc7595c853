//! Which containers are counted: the tracked map (cgroup id → counter slot and level), the
//! levels mask the programs walk, the per-CPU counter slots, and reading them each cycle.

use super::error::{map_err, BpfError};
use super::{sys, BpfCollector, Counters};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use lxcmon_common::{
    slot_index_entry, slot_index_holds, slot_index_pos, TrackedCgroup, MAP_COUNTERS,
    MAP_SLOT_INDEX, MAP_TRACKED, MAP_TRACKED_LEVELS, MAX_CONTAINERS, MAX_TRACKED_LEVEL,
    SLOT_INDEX_SHARED, SLOT_INDEX_SIZE,
};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use tracing::debug;

impl BpfCollector {
    fn tracked_map(&mut self) -> Result<BpfHashMap<&mut MapData, u64, TrackedCgroup>, BpfError> {
        BpfHashMap::try_from(self.map_mut(MAP_TRACKED)?).map_err(map_err(MAP_TRACKED))
    }

    /// Picks up containers tracked by an earlier agent (pinned map). Entries of containers
    /// that stopped meanwhile go with the first [`Self::retain`].
    pub(crate) fn restore_tracked(&mut self) -> Result<(), BpfError> {
        let entries: Vec<(u64, TrackedCgroup)> = {
            let map = self.tracked_map()?;
            map.iter().filter_map(Result::ok).collect()
        };
        // The adopted attachments' storage may predate this slot assignment (or be unwritten):
        // write each again.
        for (id, t) in &entries {
            self.store_skb_slot(*id, t.slot + 1);
        }
        self.tracked.extend(entries);
        self.write_levels()?;
        // The index as the tracked set has it, every entry: an adopted one may hold entries an
        // earlier agent had no time to clear, a new one (first start of this version) none.
        let mut at: HashMap<u32, Vec<(u64, u32)>> = HashMap::new();
        for (id, t) in &self.tracked {
            at.entry(slot_index_pos(*id))
                .or_default()
                .push((*id, t.slot));
        }
        let mut want = vec![0u64; SLOT_INDEX_SIZE as usize];
        for (pos, here) in at {
            if let Some(e) = want.get_mut(pos as usize) {
                *e = index_entry(here);
            }
        }
        self.sync_array(MAP_SLOT_INDEX, &want)
    }

    pub(crate) fn slot_index(&mut self) -> Result<Array<&mut MapData, u64>, BpfError> {
        Array::try_from(self.map_mut(MAP_SLOT_INDEX)?).map_err(map_err(MAP_SLOT_INDEX))
    }

    /// Writes the index entry of `id`'s position as the tracked set now has it: after an id
    /// was added to the tracked map, before one is removed from it, so the programs never
    /// miss a tracked id.
    fn write_index(&mut self, id: u64) -> Result<(), BpfError> {
        let pos = slot_index_pos(id);
        let value = index_entry(
            self.tracked
                .iter()
                .filter(|(id, _)| slot_index_pos(**id) == pos)
                .map(|(id, t)| (*id, t.slot))
                .collect(),
        );
        self.slot_index()?
            .set(pos, value, 0)
            .map_err(map_err(MAP_SLOT_INDEX))
    }

    fn write_levels(&mut self) -> Result<(), BpfError> {
        let mask = self
            .tracked
            .values()
            .fold(0u64, |m, t| m | (1u64 << t.level));
        let mut levels: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(MAP_TRACKED_LEVELS)?)
                .map_err(map_err(MAP_TRACKED_LEVELS))?;
        // A new generation on every change: slots the scheduler programs cached go stale.
        let generation = levels
            .get(&0, 0)
            .map_or(0, |old| (old >> 32).wrapping_add(1));
        levels
            .set(0, mask | (generation << 32), 0)
            .map_err(map_err(MAP_TRACKED_LEVELS))
    }

    /// Sets a slot's counters to `seed` (held by CPU 0; the others start at zero).
    fn seed_slot(&mut self, slot: u32, seed: Counters) -> Result<(), BpfError> {
        let ncpus = self.ncpus;
        let mut counters: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.map_mut(MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?;
        let mut values = vec![Counters::default(); ncpus];
        if let Some(first) = values.first_mut() {
            *first = seed;
        }
        let values = PerCpuValues::try_from(values).map_err(|e| BpfError::Map {
            map: MAP_COUNTERS,
            source: aya::maps::MapError::IoError(e),
        })?;
        counters.set(slot, values, 0).map_err(map_err(MAP_COUNTERS))
    }

    /// The counter slot of a tracked container.
    pub fn slot(&self, cgroup_id: u64) -> Option<u32> {
        self.tracked.get(&cgroup_id).map(|t| t.slot)
    }

    /// Ids of the tracked container cgroups (also those restored from pins).
    pub fn tracked_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.tracked.keys().copied()
    }

    /// Starts counting a container: `cgroup_v2_dir` is its cgroup directory in the v2
    /// hierarchy; its id (the directory's inode) is the key for [`Self::counters`]. Tracking an
    /// already tracked cgroup keeps its counts. Returns the cgroup id.
    pub fn track(&mut self, cgroup_v2_dir: &Path) -> Result<u64, BpfError> {
        self.track_seeded(cgroup_v2_dir, Counters::default())
    }

    /// [`Self::track`], starting a newly tracked container's counters at `seed` (what the file
    /// readers counted before the programs were attached), so both collectors report the same
    /// cumulative figures. A container already tracked (also through pins) keeps its counts.
    pub fn track_seeded(&mut self, cgroup_v2_dir: &Path, seed: Counters) -> Result<u64, BpfError> {
        let cg = sys::cgroup_dir(cgroup_v2_dir).map_err(|source| BpfError::Cgroup {
            path: cgroup_v2_dir.to_path_buf(),
            source,
        })?;
        if cg.level >= MAX_TRACKED_LEVEL {
            return Err(BpfError::TooDeep {
                path: cg.path,
                level: cg.level,
                max: MAX_TRACKED_LEVEL - 1,
            });
        }
        let known = self.tracked.get(&cg.id).copied();
        if known.is_some() && (!self.network || self.skb_attached(cg.id)) {
            return Ok(cg.id);
        }
        let entry = match known {
            Some(entry) => entry,
            None => {
                let used: BTreeSet<u32> = self.tracked.values().map(|t| t.slot).collect();
                let slot = (0..MAX_CONTAINERS)
                    .find(|s| !used.contains(s))
                    .ok_or(BpfError::Full(MAX_CONTAINERS))?;
                self.seed_slot(slot, seed)?;
                self.reset_latency_slot(slot)?;
                self.reset_retrans_slot(slot)?;
                TrackedCgroup {
                    slot,
                    level: cg.level,
                }
            }
        };
        self.tracked_map()?
            .insert(cg.id, entry, 0)
            .map_err(map_err(MAP_TRACKED))?;
        self.tracked.insert(cg.id, entry);
        self.write_index(cg.id)?;
        self.write_levels()?;
        if self.network {
            if let Err(e) = self.attach_skb(&cg, entry.slot) {
                let _ = self.untrack(cg.id);
                return Err(e);
            }
        }
        debug!(cgroup = %cg.path.display(), id = cg.id, level = cg.level, slot = entry.slot, "tracking");
        Ok(cg.id)
    }

    /// Stops counting a container: detaches its programs and deletes its map entries. An
    /// unknown id is not an error.
    pub fn untrack(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let detached = self.detach_skb(cgroup_id);
        self.tracked.remove(&cgroup_id);
        self.write_index(cgroup_id)?;
        let removed = match self.tracked_map()?.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_TRACKED)(e)),
        };
        self.values.remove(&cgroup_id);
        self.write_levels()?;
        detached.and(removed)
    }

    /// Untracks every tracked container whose id is not in `keep` (containers that stopped,
    /// also while no agent ran). Returns the errors, per id, of those that failed.
    pub fn retain(&mut self, keep: &HashSet<u64>) -> Vec<(u64, BpfError)> {
        let gone: Vec<u64> = self.tracked_ids().filter(|id| !keep.contains(id)).collect();
        gone.into_iter()
            .filter_map(|id| self.untrack(id).err().map(|e| (id, e)))
            .collect()
    }

    /// Reads all counters, in one batched map read where the kernel supports it.
    pub fn refresh(&mut self) -> Result<(), BpfError> {
        self.values.clear();
        let mut buf = std::mem::take(&mut self.batch);
        let read = self.refresh_counters(&mut buf);
        self.batch = buf;
        read?;
        self.refresh_latency()?;
        self.refresh_retrans()
    }

    fn refresh_counters(&mut self, buf: &mut sys::BatchBuf) -> Result<(), BpfError> {
        if self.tracked.is_empty() {
            return Ok(());
        }
        let mut values = std::mem::take(&mut self.values);
        let batch = match self.map(MAP_COUNTERS)? {
            Map::PerCpuArray(data) if self.batched != Some(false) => {
                self.fold_batched::<Counters>(data, 1, buf, |id, _, v| {
                    values.insert(id, *v);
                })
            }
            _ => false,
        };
        self.values = values;
        self.batched = Some(batch);
        match batch {
            true => {}
            false => {
                // Older kernels without batched array reads: one read per container.
                let counters: PerCpuArray<&MapData, Counters> =
                    PerCpuArray::try_from(self.map(MAP_COUNTERS)?)
                        .map_err(map_err(MAP_COUNTERS))?;
                let mut values = HashMap::new();
                for (id, t) in &self.tracked {
                    let per_cpu = counters.get(&t.slot, 0).map_err(map_err(MAP_COUNTERS))?;
                    let mut sum = Counters::default();
                    for c in per_cpu.iter() {
                        sum.add(c);
                    }
                    values.insert(*id, sum);
                }
                self.values = values;
            }
        }
        Ok(())
    }

    /// Whether the last [`Self::refresh`] read all counters with batched map reads.
    pub fn last_refresh_batched(&self) -> bool {
        self.batched == Some(true)
    }

    /// Cumulative counters of a tracked container as of the last [`Self::refresh`].
    pub fn counters(&self, cgroup_id: u64) -> Option<Counters> {
        self.values.get(&cgroup_id).copied()
    }
}

/// The index entry of one position for the tracked ids (and slots) there: the smallest id it
/// can hold, marked shared when another id maps there too; 0 for none.
fn index_entry(mut here: Vec<(u64, u32)>) -> u64 {
    here.sort_unstable();
    let shared = here.len() > 1;
    match here.iter().find(|(id, _)| slot_index_holds(*id)) {
        Some(&(id, slot)) => slot_index_entry(id, slot, shared),
        None if here.is_empty() => 0,
        None => SLOT_INDEX_SHARED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lxcmon_common::slot_index_match;

    #[test]
    fn index_entries_hold_the_smallest_id_and_mark_the_shared() {
        let n = u64::from(SLOT_INDEX_SIZE);
        assert_eq!(index_entry(vec![]), 0);
        let one = index_entry(vec![(7, 3)]);
        assert_eq!(slot_index_match(one, 7), Some(3));
        assert_eq!(one & SLOT_INDEX_SHARED, 0);
        // Two ids at one position: the smaller one is held, whatever the order; both ids
        // reach the tracked map through the shared mark.
        for here in [vec![(7 + n, 4), (7, 3)], vec![(7, 3), (7 + n, 4)]] {
            let e = index_entry(here);
            assert_eq!(slot_index_match(e, 7), Some(3));
            assert_eq!(slot_index_match(e, 7 + n), None);
            assert_ne!(e & SLOT_INDEX_SHARED, 0);
        }
        // An id the entry cannot hold: shared only, so the programs look it up in the map.
        let big = (1u64 << 51) | 7;
        assert_eq!(index_entry(vec![(big, 1)]), SLOT_INDEX_SHARED);
        let e = index_entry(vec![(big, 1), (7, 3)]);
        assert_eq!(slot_index_match(e, 7), Some(3));
        assert_ne!(e & SLOT_INDEX_SHARED, 0);
    }
}
