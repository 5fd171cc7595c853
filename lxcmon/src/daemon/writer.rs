//! The export file's own thread: a slow disk never delays collection.

use crate::derive::Cycle;
use crate::export::prometheus::Exposition;
use crate::export::Exporter;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

pub(super) enum WriterMsg {
    Cycle(Arc<Cycle>),
    /// The export settings changed: continue in the (possibly other) file.
    Reopen {
        path: PathBuf,
        format: crate::config::ExportFormat,
        max_entries: usize,
    },
}

/// Owns the export file on a thread of its own. Cycles that queue up while a write is slow
/// are folded into the next write.
pub(super) struct ExportWriter {
    tx: Option<mpsc::Sender<WriterMsg>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExportWriter {
    pub(super) fn spawn(mut exporter: Exporter, exposition: Arc<Exposition>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<WriterMsg>();
        let thread = std::thread::Builder::new()
            .name("lxcmon-export".into())
            .spawn(move || {
                let mut pending = false;
                let write = |exporter: &Exporter| match exporter.write() {
                    Ok(()) => false,
                    Err(e) => {
                        exposition
                            .export_write_failures
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %crate::logging::Chain(&e), "export failed; the previous file is intact, retrying next cycle");
                        true
                    }
                };
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
                        match msg {
                            WriterMsg::Cycle(c) => pending |= exporter.push(&c),
                            WriterMsg::Reopen {
                                path,
                                format,
                                max_entries,
                            } => {
                                if pending {
                                    write(&exporter);
                                }
                                match Exporter::open(&path, format, max_entries) {
                                    Ok(e) => exporter = e,
                                    Err(e) => tracing::error!(error = %crate::logging::Chain(&e), "cannot switch the export file; keeping the old one"),
                                }
                                pending = true;
                            }
                        }
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
