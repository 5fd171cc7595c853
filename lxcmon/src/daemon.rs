//! The daemon loop: a cycle every `check_interval` on a fixed grid (no drift), exports
//! written by a thread of their own so a slow disk never delays collection, and a clean
//! stop on SIGTERM/SIGINT.

use crate::collect::Collector;
use crate::config::Config;
use crate::export::{self, Cycle, Exporter};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Gap between the two samples of `--once`, and before the daemon's first export.
pub fn first_gap(cfg: &Config) -> Duration {
    cfg.monitoring.check_interval.min(Duration::from_secs(1))
}

/// One cycle with a CPU delta, as the export document of the configured format.
pub fn once(cfg: &Config, root: &Path) -> Result<Vec<u8>> {
    let mut collector = Collector::new(cfg, root).context("starting the collector")?;
    collector.cycle().context("first sample")?;
    std::thread::sleep(first_gap(cfg));
    let cycle = collector.cycle().context("second sample")?;
    Ok(export::document(cfg.monitoring.export_format, &cycle))
}

pub fn run(cfg: &Config, root: &Path) -> Result<()> {
    let exporter = Exporter::open(
        &cfg.monitoring.export_file,
        cfg.monitoring.export_format,
        cfg.monitoring.max_metrics_entries,
    )?;
    let collector = Collector::new(cfg, root).context("starting the collector")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let writer = ExportWriter::spawn(exporter)?;
    let result = runtime.block_on(run_loop(cfg, collector, &writer));
    writer.finish();
    result
}

async fn run_loop(cfg: &Config, mut collector: Collector, writer: &ExportWriter) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let interval = cfg.monitoring.check_interval;
    tracing::info!(
        interval_s = interval.as_secs_f64(),
        export_file = %cfg.monitoring.export_file.display(),
        format = ?cfg.monitoring.export_format,
        workers = cfg.workers(),
        "lxcmon started"
    );
    // The first sample only sets each container's baseline.
    let (c, _) = cycle_blocking(collector).await?;
    collector = c;
    let start = tokio::time::Instant::now() + first_gap(cfg);
    let mut ticker = tokio::time::interval_at(start, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let (c, cycle) = cycle_blocking(collector).await?;
                collector = c;
                if let Some(cycle) = cycle {
                    writer.send(cycle);
                }
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    Ok(())
}

/// Runs one cycle off the runtime thread; a failed cycle is logged and the loop goes on.
async fn cycle_blocking(mut collector: Collector) -> Result<(Collector, Option<Cycle>)> {
    let joined = tokio::task::spawn_blocking(move || {
        let cycle = collector.cycle();
        (collector, cycle)
    })
    .await
    .context("the collection task panicked")?;
    let (collector, cycle) = joined;
    match cycle {
        Ok(c) => Ok((collector, Some(c))),
        Err(e) => {
            tracing::error!(error = %e, "collection cycle failed");
            Ok((collector, None))
        }
    }
}

/// Owns the export file on a thread of its own. Cycles that queue up while a write is slow
/// are folded into the next write.
struct ExportWriter {
    tx: Option<mpsc::Sender<Cycle>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExportWriter {
    fn spawn(mut exporter: Exporter) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Cycle>();
        let thread = std::thread::Builder::new()
            .name("lxcmon-export".into())
            .spawn(move || {
                let mut pending = false;
                while let Ok(cycle) = rx.recv() {
                    pending |= exporter.push(&cycle);
                    while let Ok(more) = rx.try_recv() {
                        pending |= exporter.push(&more);
                    }
                    if pending {
                        pending = write(&exporter);
                    }
                }
                if pending {
                    write(&exporter);
                }
            })
            .context("starting the export thread")?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn send(&self, cycle: Cycle) {
        if let Some(tx) = &self.tx {
            if tx.send(cycle).is_err() {
                tracing::error!("the export thread has stopped; cycle not exported");
            }
        }
    }

    /// Flushes what is queued and waits for the last write.
    fn finish(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes the file; returns whether a write is still owed (it failed).
fn write(exporter: &Exporter) -> bool {
    match exporter.write() {
        Ok(()) => false,
        Err(e) => {
            tracing::error!(error = %e, "export failed; the previous file is intact, retrying next cycle");
            true
        }
    }
}
