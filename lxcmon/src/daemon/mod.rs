//! The daemon loop: a cycle every `check_interval` on a fixed grid (no drift), exports
//! written by a thread of their own so a slow disk never delays collection, `/metrics` served
//! from the latest cycle, SIGHUP re-reading the configuration (parsed off the loop), and a
//! clean stop on SIGTERM/SIGINT. Signals are caught from the first instant of start-up and
//! take priority over the ticker; systemd hears readiness after the first cycle and watchdog
//! pings from the loop between cycles.

use crate::config::Config;
use crate::derive::Cycle;
use crate::export::prometheus::Exposition;
use crate::export::{self, Exporter};
use crate::logging::{Chain, LogControl};
use anyhow::{Context, Result};
use sd_notify::NotifyState;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use writer::{ExportWriter, WriterMsg};

mod pipeline;
mod writer;

pub use pipeline::Pipeline;

/// Gap between the two samples of `--once`, and before the daemon's first export.
pub fn first_gap(cfg: &Config) -> Duration {
    cfg.monitoring.check_interval.min(Duration::from_secs(1))
}

/// One cycle with a CPU delta, as the export document of the configured format.
pub fn once(cfg: &Config, root: &Path) -> Result<Vec<u8>> {
    let mut collector = Pipeline::once(cfg, root).context("starting the collector")?;
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
    /// Loads and checks the configuration as start-up does (a reload that start-up would
    /// refuse is refused too).
    fn load(&self) -> Result<Config> {
        let (cfg, origin) = match self {
            Self::File(p) => (Config::load(p)?, p),
            Self::Default(p) if p.exists() => (Config::load(p)?, p),
            Self::Default(p) => (Config::default(), p),
        };
        cfg.check_usable(origin)?;
        Ok(cfg)
    }
}

/// The stop and reload signals, caught from the first instant of start-up: what arrives
/// during slow work (the BPF load parses kernel BTF, a large export is read back) waits here
/// instead of killing the process with the default action.
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// The daemon before its configuration is read: a runtime and the signal handlers, so that
/// `main` can install them before anything slow.
pub struct Startup {
    runtime: tokio::runtime::Runtime,
    signals: Signals,
}

impl Startup {
    pub fn begin() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let signals = {
            let _in_runtime = runtime.enter();
            Signals {
                term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
                hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            }
        };
        Ok(Self { runtime, signals })
    }

    /// A stop asked for so far, if any. A reload asked for stays pending for the loop.
    fn stop_requested(&mut self) -> Option<&'static str> {
        let signals = &mut self.signals;
        self.runtime.block_on(async {
            // One turn of the driver, which hands signals that arrived meanwhile to the streams.
            tokio::time::sleep(Duration::from_millis(1)).await;
            tokio::select! {
                biased;
                _ = signals.term.recv() => Some("SIGTERM"),
                _ = signals.int.recv() => Some("SIGINT"),
                _ = std::future::ready(()) => None,
            }
        })
    }

    /// Opens the export, starts the collector and runs the loop until SIGTERM/SIGINT. A stop
    /// asked for during start-up ends it after the step under way, before any cycle.
    pub fn run(
        mut self,
        cfg: Config,
        source: ConfigSource,
        root: &Path,
        log: LogControl,
    ) -> Result<()> {
        let exporter = Exporter::open(
            &cfg.monitoring.export_file,
            cfg.monitoring.export_format,
            cfg.monitoring.max_metrics_entries,
        )?;
        if let Some(sig) = self.stop_requested() {
            tracing::info!("{sig} during start-up: stopping");
            return Ok(());
        }
        let collector = Pipeline::new(&cfg, root).context("starting the collector")?;
        if let Some(sig) = self.stop_requested() {
            tracing::info!("{sig} during start-up: stopping");
            return Ok(());
        }
        let exposition = Arc::new(Exposition::new(
            collector.collector_name(),
            cfg.monitoring.check_interval,
        ));
        let writer =
            ExportWriter::spawn(exporter, exposition.clone(), cfg.monitoring.export_interval)?;
        let (reloaded_tx, reloaded) = mpsc::unbounded_channel();
        let mut daemon = Daemon {
            cfg,
            source,
            log,
            exposition,
            writer,
            reloaded_tx,
            last: None,
            spare: None,
        };
        let Startup {
            runtime,
            mut signals,
        } = self;
        let result = runtime.block_on(daemon.run_loop(collector, &mut signals, reloaded));
        daemon.writer.finish();
        result
    }
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) how the agent is doing.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %Chain(&e), "cannot notify systemd");
    }
}

/// The next tick of an optional ticker; never, without one.
async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

struct Daemon {
    cfg: Config,
    source: ConfigSource,
    log: LogControl,
    exposition: Arc<Exposition>,
    writer: ExportWriter,
    reloaded_tx: mpsc::UnboundedSender<Result<Config>>,
    /// The last cycle published, and the one before it once every export let go of it: its
    /// vectors go back to the pipeline for the next cycle.
    last: Option<Arc<Cycle>>,
    spare: Option<Cycle>,
}

impl Daemon {
    async fn run_loop(
        &mut self,
        mut collector: Pipeline,
        signals: &mut Signals,
        mut reloaded: mpsc::UnboundedReceiver<Result<Config>>,
    ) -> Result<()> {
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
        // systemd's watchdog (WatchdogSec=): pinged at half its time by this loop between
        // cycles, so a cycle or loop that hangs gets the agent restarted, whatever the interval.
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        let mut pings = watchdog.map(|d| {
            let half = d / 2;
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            t
        });
        // The first sample only sets each container's baseline; the first export follows
        // `first_gap` later.
        let mut ticker = self.ticker(Duration::ZERO);
        let mut ready = false;
        // A reload being parsed, and whether another SIGHUP came meanwhile.
        let (mut reloading, mut reload_again) = (false, false);
        loop {
            // Signals first: a stop or reload never waits behind a due tick.
            tokio::select! {
                biased;
                _ = signals.term.recv() => { tracing::info!("SIGTERM: stopping"); break; }
                _ = signals.int.recv() => { tracing::info!("SIGINT: stopping"); break; }
                _ = signals.hup.recv() => {
                    if reloading {
                        reload_again = true;
                    } else {
                        reloading = self.start_reload();
                    }
                }
                Some(new) = reloaded.recv() => {
                    // Before the first cycle (a SIGHUP during start-up) that cycle stays due
                    // now, and readiness waits for it.
                    if self.reload(new, &mut collector) && ready {
                        ticker = self.ticker(self.cfg.monitoring.check_interval);
                    }
                    reloading = reload_again && self.start_reload();
                    reload_again = false;
                    if !reloading && ready {
                        notify(&[NotifyState::Ready, NotifyState::Status("collecting")]);
                    }
                }
                _ = tick(&mut pings), if ready => notify(&[NotifyState::Watchdog]),
                _ = ticker.tick() => {
                    collector = self.cycle(collector).await?;
                    if !ready {
                        ready = true;
                        ticker = self.ticker(first_gap(&self.cfg));
                        notify(&[NotifyState::Ready, NotifyState::Status("collecting")]);
                    }
                }
            }
        }
        notify(&[NotifyState::Stopping]);
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
    async fn cycle(&mut self, mut collector: Pipeline) -> Result<Pipeline> {
        let spare = self.spare.take();
        let (collector, cycle) = tokio::task::spawn_blocking(move || {
            if let Some(spare) = spare {
                collector.recycle(spare);
            }
            let cycle = collector.cycle();
            (collector, cycle)
        })
        .await
        .context("the collection task panicked")?;
        match cycle {
            Ok(c) => {
                let c = Arc::new(c);
                self.exposition.publish(c.clone());
                self.writer.send(WriterMsg::Cycle(c.clone()));
                // The exposition has just let go of the cycle before; the export thread wrote
                // it long ago, unless it is slow or waiting for export_interval (then it is
                // simply dropped when done). Its containers' figures are dropped now, as
                // before; only the vectors wait for the next cycle.
                if let Some(previous) = self.last.replace(c) {
                    self.spare = Arc::try_unwrap(previous).ok().map(|mut spare| {
                        spare.metrics.clear();
                        spare
                    });
                }
            }
            Err(e) => {
                self.exposition.cycle_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %Chain(&e), "collection cycle failed");
            }
        }
        Ok(collector)
    }

    /// Reads and parses the configuration on a thread of its own, so cycles go on meanwhile;
    /// the result arrives on `reloaded`. Returns whether a reload is under way.
    fn start_reload(&self) -> bool {
        notify(&[
            NotifyState::Reloading,
            NotifyState::Status("reloading the configuration"),
        ]);
        let (source, tx) = (self.source.clone(), self.reloaded_tx.clone());
        let spawned = std::thread::Builder::new()
            .name("lxcmon-reload".into())
            .spawn(move || {
                let _ = tx.send(source.load());
            });
        if let Err(e) = spawned {
            tracing::error!(error = %Chain(&e), "cannot start the configuration reload");
            notify(&[NotifyState::Ready]);
            return false;
        }
        true
    }

    /// Applies a reloaded configuration. An invalid one is rejected with its reason and the
    /// old one stays in force. Returns whether the interval changed.
    fn reload(&mut self, new: Result<Config>, collector: &mut Pipeline) -> bool {
        let new = match new {
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
        if old_m.export_interval != new_m.export_interval {
            self.writer.send(WriterMsg::Interval(new_m.export_interval));
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
