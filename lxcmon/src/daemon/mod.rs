//! The daemon loop: a cycle every `check_interval` on a fixed grid (no drift), exports
//! written by a thread of their own so a slow disk never delays collection, `/metrics` served
//! from the latest cycle, SIGHUP re-reading the configuration, and a clean stop on
//! SIGTERM/SIGINT.

use crate::collect::Collector;
use crate::config::Config;
use crate::export::prometheus::Exposition;
use crate::export::{self, Exporter};
use crate::logging::LogControl;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use writer::{ExportWriter, WriterMsg};

mod writer;

/// Gap between the two samples of `--once`, and before the daemon's first export.
pub fn first_gap(cfg: &Config) -> Duration {
    cfg.monitoring.check_interval.min(Duration::from_secs(1))
}

/// One cycle with a CPU delta, as the export document of the configured format.
pub fn once(cfg: &Config, root: &Path) -> Result<Vec<u8>> {
    let mut collector = Collector::once(cfg, root).context("starting the collector")?;
    collector.cycle().context("first sample")?;
    std::thread::sleep(first_gap(cfg));
    let cycle = collector.cycle().context("second sample")?;
    Ok(export::document(cfg.monitoring.export_format, &cycle))
}

/// Where the configuration came from, so SIGHUP reads the same place again.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    File(PathBuf),
    /// The default path, which did not exist at start (built-in defaults until it does).
    Default(PathBuf),
}

impl ConfigSource {
    fn load(&self) -> Result<Config> {
        match self {
            Self::File(p) => Ok(Config::load(p)?),
            Self::Default(p) if p.exists() => Ok(Config::load(p)?),
            Self::Default(_) => Ok(Config::default()),
        }
    }
}

pub fn run(cfg: Config, source: ConfigSource, root: &Path, log: LogControl) -> Result<()> {
    let exporter = Exporter::open(
        &cfg.monitoring.export_file,
        cfg.monitoring.export_format,
        cfg.monitoring.max_metrics_entries,
    )?;
    let collector = Collector::new(&cfg, root).context("starting the collector")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let exposition = Arc::new(Exposition::new(
        collector.collector_name(),
        cfg.monitoring.check_interval,
    ));
    let writer = ExportWriter::spawn(exporter, exposition.clone())?;
    let mut daemon = Daemon {
        cfg,
        source,
        log,
        exposition,
        writer,
    };
    let result = runtime.block_on(daemon.run_loop(collector));
    daemon.writer.finish();
    result
}

struct Daemon {
    cfg: Config,
    source: ConfigSource,
    log: LogControl,
    exposition: Arc<Exposition>,
    writer: ExportWriter,
}

impl Daemon {
    async fn run_loop(&mut self, mut collector: Collector) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
        if let Some(addr) = self.cfg.monitoring.prometheus_listen {
            let bound = crate::export::prometheus::serve(addr, self.exposition.clone())
                .await
                .with_context(|| format!("prometheus_listen: cannot listen on {addr}"))?;
            tracing::info!(%bound, "serving /metrics and /healthz");
        }
        tracing::info!(
            interval_s = self.cfg.monitoring.check_interval.as_secs_f64(),
            export_file = %self.cfg.monitoring.export_file.display(),
            format = ?self.cfg.monitoring.export_format,
            workers = self.cfg.workers(),
            "lxcmon started"
        );
        // The first sample only sets each container's baseline.
        collector = self.cycle(collector).await?;
        let mut ticker = self.ticker(first_gap(&self.cfg));
        loop {
            tokio::select! {
                _ = ticker.tick() => collector = self.cycle(collector).await?,
                _ = sighup.recv() => {
                    if self.reload(&mut collector) {
                        ticker = self.ticker(self.cfg.monitoring.check_interval);
                    }
                }
                _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            }
        }
        Ok(())
    }

    fn ticker(&self, first: Duration) -> tokio::time::Interval {
        let mut t = tokio::time::interval_at(
            tokio::time::Instant::now() + first,
            self.cfg.monitoring.check_interval,
        );
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        t
    }

    /// Runs one cycle off the runtime thread; a failed cycle is logged and counted.
    async fn cycle(&self, mut collector: Collector) -> Result<Collector> {
        let (collector, cycle) = tokio::task::spawn_blocking(move || {
            let cycle = collector.cycle();
            (collector, cycle)
        })
        .await
        .context("the collection task panicked")?;
        match cycle {
            Ok(c) => {
                let c = Arc::new(c);
                self.exposition.publish(c.clone());
                self.writer.send(WriterMsg::Cycle(c));
            }
            Err(e) => {
                self.exposition.cycle_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "collection cycle failed");
            }
        }
        Ok(collector)
    }

    /// Re-reads the configuration. An invalid one is rejected with its reason and the old one
    /// stays in force. Returns whether the interval changed.
    fn reload(&mut self, collector: &mut Collector) -> bool {
        let new = match self.source.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "configuration reload rejected, the running configuration stays: {e:#}"
                );
                return false;
            }
        };
        let old = std::mem::replace(&mut self.cfg, new);
        let (old_m, new_m) = (&old.monitoring, &self.cfg.monitoring);
        self.log.set_level(self.cfg.logging.log_level);
        if old.logging.log_file != self.cfg.logging.log_file
            || old.logging.log_max_bytes != self.cfg.logging.log_max_bytes
            || old.logging.log_backup_count != self.cfg.logging.log_backup_count
        {
            tracing::warn!("log file settings take effect when the agent restarts");
        }
        if old_m.prometheus_listen != new_m.prometheus_listen {
            tracing::warn!("prometheus_listen takes effect when the agent restarts");
        }
        collector.reconfigure(&old, &self.cfg);
        if old_m.export_file != new_m.export_file
            || old_m.export_format != new_m.export_format
            || old_m.max_metrics_entries != new_m.max_metrics_entries
        {
            self.writer.send(WriterMsg::Reopen {
                path: new_m.export_file.clone(),
                format: new_m.export_format,
                max_entries: new_m.max_metrics_entries,
            });
        }
        self.exposition.set_interval(new_m.check_interval);
        for key in self.cfg.ignored_keys() {
            tracing::info!(
                key,
                "setting accepted for compatibility; lxcmon has no use for it"
            );
        }
        tracing::info!("configuration reloaded");
        old_m.check_interval != new_m.check_interval
    }
}
