//! The export file's own thread: a slow disk never delays collection, and with
//! `export_interval` the cycles of that interval are written together (none lost).

use crate::derive::Cycle;
use crate::export::prometheus::Exposition;
use crate::export::{Exporter, Written};
use crate::logging::Chain;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub(super) enum WriterMsg {
    Cycle(Arc<Cycle>),
    /// The export settings changed: continue in the (possibly other) file.
    Reopen {
        path: PathBuf,
        format: crate::config::ExportFormat,
        max_entries: usize,
    },
    /// `export_interval` changed (`None`: every cycle).
    Interval(Option<Duration>),
}

/// Owns the export file on a thread of its own. Cycles that queue up while a write is slow,
/// or until `export_interval` has passed, are folded into the next write.
pub(super) struct ExportWriter {
    tx: Option<mpsc::Sender<WriterMsg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The thread's state: the exporter, when it may write next, and what it has logged.
struct State {
    exporter: Exporter,
    exposition: Arc<Exposition>,
    every: Duration,
    last_attempt: Option<Instant>,
    /// Something to write (cycles, or a reopened file to rewrite).
    dirty: bool,
    /// A message arrived since the last attempt: a failed write is retried with the next
    /// cycle, not in a loop.
    fresh: bool,
    /// The last failure logged, so a persisting one is logged once.
    failing: Option<String>,
}

impl State {
    /// Time left before the next write may happen.
    fn wait(&self) -> Duration {
        self.last_attempt.map_or(Duration::ZERO, |t| {
            (t + self.every).saturating_duration_since(Instant::now())
        })
    }

    fn write(&mut self) {
        self.last_attempt = Some(Instant::now());
        self.fresh = false;
        match self.exporter.write() {
            Ok(Written::Bytes(n)) => {
                self.dirty = false;
                self.exposition
                    .export_bytes_written
                    .fetch_add(n, Ordering::Relaxed);
                if self.failing.take().is_some() {
                    tracing::info!("export written again");
                }
            }
            Ok(Written::NoSpace) => {
                self.exposition
                    .export_writes_skipped
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.exposition
                    .export_write_failures
                    .fetch_add(1, Ordering::Relaxed);
                let shown = Chain(&e).to_string();
                if self.failing.as_deref() != Some(shown.as_str()) {
                    tracing::error!(error = %shown, "export failed; the previous file is intact, retrying with each cycle (logged again when the error changes)");
                    self.failing = Some(shown);
                }
            }
        }
    }

    fn handle(&mut self, msg: WriterMsg) {
        match msg {
            WriterMsg::Cycle(c) => {
                if self.exporter.push(&c) {
                    self.dirty = true;
                    self.fresh = true;
                }
            }
            WriterMsg::Reopen {
                path,
                format,
                max_entries,
            } => {
                if self.dirty {
                    self.write();
                }
                match Exporter::open(&path, format, max_entries) {
                    Ok(e) => self.exporter = e,
                    Err(e) => {
                        tracing::error!(error = %Chain(&e), "cannot switch the export file; keeping the old one")
                    }
                }
                self.dirty = true;
                self.fresh = true;
            }
            WriterMsg::Interval(every) => self.every = every.unwrap_or_default(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<WriterMsg>) {
        loop {
            let first = if self.fresh {
                match rx.recv_timeout(self.wait()) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            };
            let mut next = first;
            while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                self.handle(msg);
            }
            if self.fresh && self.dirty && self.wait().is_zero() {
                self.write();
            }
        }
        // Stopping: what is queued is written now, whatever the interval.
        if self.dirty {
            self.write();
        }
    }
}

impl ExportWriter {
    pub(super) fn spawn(
        exporter: Exporter,
        exposition: Arc<Exposition>,
        export_interval: Option<Duration>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<WriterMsg>();
        let state = State {
            exporter,
            exposition,
            every: export_interval.unwrap_or_default(),
            last_attempt: None,
            dirty: false,
            fresh: false,
            failing: None,
        };
        let thread = std::thread::Builder::new()
            .name("lxcmon-export".into())
            .spawn(move || state.run(rx))
            .context("starting the export thread")?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(super) fn send(&self, msg: WriterMsg) {
        if let Some(tx) = &self.tx {
            if tx.send(msg).is_err() {
                tracing::error!("the export thread has stopped; cycle not exported");
            }
        }
    }

    /// Flushes what is queued and waits for the last write.
    pub(super) fn finish(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
