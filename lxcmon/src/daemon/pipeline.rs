//! One cycle end to end: [`Collector`] collects, [`Deriver`] derives. The daemon and `--once`
//! run cycles through this, so collection never looks down the flow at derivation.

use crate::collect::{CollectError, Collector};
use crate::config::Config;
use crate::derive::{Cycle, Deriver};
use std::path::Path;

pub struct Pipeline {
    collector: Collector,
    deriver: Deriver,
}

impl Pipeline {
    /// The daemon's pipeline.
    pub fn new(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        Ok(Self::with(cfg, Collector::new(cfg, root)?))
    }

    /// A pipeline for a diagnostic run (`--once`): its collector leaves no kernel state.
    pub fn once(cfg: &Config, root: &Path) -> Result<Self, CollectError> {
        Ok(Self::with(cfg, Collector::once(cfg, root)?))
    }

    fn with(cfg: &Config, collector: Collector) -> Self {
        let mut deriver = Deriver::default();
        deriver.set_network(cfg.monitoring.enable_network);
        Self { collector, deriver }
    }

    /// Runs one cycle. Containers seen for the first time set their baseline and are exported
    /// from the next cycle on.
    pub fn cycle(&mut self) -> Result<Cycle, CollectError> {
        let mut collected = self.collector.collect()?;
        let (skipped, failed) = (collected.skipped, collected.failed);
        let cycle = self.deriver.cycle(&mut collected);
        self.collector.recycle(collected);
        tracing::debug!(
            duration_us = (cycle.ended - cycle.started)
                .num_microseconds()
                .unwrap_or(0),
            found = cycle.total_containers,
            exported = cycle.metrics.len(),
            skipped,
            failed,
            "cycle"
        );
        Ok(cycle)
    }

    /// Hands back a cycle that every export is done with: the next cycle fills its vectors
    /// again instead of allocating new ones.
    pub fn recycle(&mut self, cycle: Cycle) {
        self.deriver.recycle(cycle.metrics);
    }

    /// Applies a reloaded configuration for the next cycle, keeping each container instance's
    /// state (see [`Collector::reconfigure`] and [`Deriver::reconfigure`]).
    pub fn reconfigure(&mut self, old: &Config, new: &Config) {
        self.collector.reconfigure(old, new);
        self.deriver.reconfigure(old, new);
    }

    /// `ebpf` when network and I/O bytes come from the BPF programs, `files` otherwise.
    pub fn collector_name(&self) -> &'static str {
        self.collector.collector_name()
    }
}
