//! The export file: each cycle encoded once in the configured format, a bounded history of
//! those encodings, and an atomic rewrite of the whole file per cycle.

mod autoscale;
mod file;
pub mod prometheus;
mod records;

use crate::config::ExportFormat;
use crate::derive::Cycle;
use file::{Rewrite, Span};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the existing export file {path}")]
    ReadBack {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move the unreadable export file {path} aside")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the export file {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Encodes one cycle's entry: `None` when the cycle has nothing to write. The flag says a
/// container named `summary` was left out (`autoscale_ml`).
/// The cycle's entry in `format`, written into `out` (its capacity reused); `None` when the
/// cycle has no container. The flag: a container was left out (see [`warn_summary_left_out`]).
fn encode(format: ExportFormat, cycle: &Cycle, out: Vec<u8>) -> Option<(Vec<u8>, bool)> {
    if cycle.metrics.is_empty() {
        return None;
    }
    Some(match format {
        ExportFormat::Records => (records::encode(cycle, out), false),
        ExportFormat::AutoscaleMl => autoscale::encode(cycle, out),
    })
}

fn warn_summary_left_out() {
    tracing::warn!(
        "a container named \"summary\" cannot appear in the autoscale_ml format; left out"
    );
}

/// A standalone export document holding just `cycle` (what `--once` prints).
pub fn document(format: ExportFormat, cycle: &Cycle) -> Vec<u8> {
    let entry = encode(format, cycle, Vec::new());
    if entry.as_ref().is_some_and(|(_, left_out)| *left_out) {
        warn_summary_left_out();
    }
    let mut out = Vec::new();
    file::write_document(&mut out, entry.iter().map(|(e, _)| e.as_slice()))
        .map(|_| out)
        .unwrap_or_default()
}

/// What a call of [`Exporter::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file was rewritten: its size.
    Bytes(u64),
    /// Skipped: the filesystem is short of space (warned once per condition); the cycles stay
    /// queued for the next write.
    NoSpace,
}

/// The export file and its retained history. The history stays on disk: memory holds only
/// where each retained cycle lies in the current file, and the cycles not written yet. A
/// rewrite copies the retained run from the previous file in the kernel.
#[derive(Debug)]
pub struct Exporter {
    path: PathBuf,
    format: ExportFormat,
    max_entries: usize,
    /// The file last written or read back, held open: the retained cycles are copied from it
    /// even if the path was moved or replaced meanwhile.
    current: Option<File>,
    /// Byte ranges of the retained cycles in `current`, oldest first; contiguous but for the
    /// separators between them.
    on_disk: VecDeque<Span>,
    /// Encoded cycles not written yet, oldest first (after `on_disk`).
    pending: VecDeque<Vec<u8>>,
    /// The buffer of the last entry written, emptied and filled again by the next cycle.
    spare: Vec<u8>,
    /// Conditions already warned about, so a persisting one is logged once.
    summary_warned: bool,
    space_warned: bool,
    owner_warned: bool,
}

impl Exporter {
    /// Reads the existing file back so history continues (one parse, for the index). A file
    /// that does not parse as `format` is renamed to `<file>.corrupt-<unix time>[-<n>]` and a
    /// new history starts. Temporary files a killed agent left beside it are removed.
    pub fn open(
        path: &Path,
        format: ExportFormat,
        max_entries: usize,
    ) -> Result<Self, ExportError> {
        let mut exporter = Self {
            path: path.to_path_buf(),
            format,
            max_entries: max_entries.max(1),
            current: None,
            on_disk: VecDeque::new(),
            pending: VecDeque::new(),
            spare: Vec::new(),
            summary_warned: false,
            space_warned: false,
            owner_warned: false,
        };
        let removed = file::remove_stale_temps(path);
        if removed > 0 {
            tracing::info!(path = %path.display(), removed, "removed temporary export files a stopped agent left");
        }
        let read_back = |source| ExportError::ReadBack {
            path: path.to_path_buf(),
            source,
        };
        let mut current = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(exporter),
            Err(e) => return Err(read_back(e)),
        };
        let mut bytes = Vec::new();
        current.read_to_end(&mut bytes).map_err(read_back)?;
        let Ok(text) = String::from_utf8(bytes) else {
            exporter.move_aside("it is not UTF-8")?;
            return Ok(exporter);
        };
        let parsed = match format {
            ExportFormat::Records => records::read_back(&text),
            ExportFormat::AutoscaleMl => autoscale::read_back(&text),
        };
        drop(text);
        match parsed {
            Ok(spans) => {
                exporter.on_disk = spans.into();
                exporter.current = Some(current);
                exporter.trim();
                tracing::info!(path = %path.display(), cycles = exporter.cycles(), "continuing the existing export history");
            }
            Err(why) => exporter.move_aside(&why)?,
        }
        Ok(exporter)
    }

    fn move_aside(&self, why: &str) -> Result<(), ExportError> {
        let aside = file::set_aside(&self.path).map_err(|source| ExportError::MoveAside {
            path: self.path.clone(),
            source,
        })?;
        tracing::warn!(
            path = %self.path.display(),
            moved_to = %aside.display(),
            reason = why,
            "the existing export file is not a valid {:?} export; kept aside, starting a new one",
            self.format
        );
        Ok(())
    }

    fn trim(&mut self) {
        while self.cycles() > self.max_entries {
            if self.on_disk.pop_front().is_none() {
                self.pending.pop_front();
            }
        }
    }

    /// Adds a cycle; returns whether it had anything to export.
    pub fn push(&mut self, cycle: &Cycle) -> bool {
        let spare = std::mem::take(&mut self.spare);
        let Some((entry, left_out)) = encode(self.format, cycle, spare) else {
            return false;
        };
        if left_out && !self.summary_warned {
            warn_summary_left_out();
        }
        self.summary_warned = left_out;
        self.pending.push_back(entry);
        self.trim();
        true
    }

    /// Cycles retained, written or not.
    pub fn cycles(&self) -> usize {
        self.on_disk.len() + self.pending.len()
    }

    /// Cycles pushed and not written yet.
    #[cfg(test)]
    pub fn unwritten(&self) -> usize {
        self.pending.len()
    }

    /// Rewrites the file atomically with the retained history: the retained run of the
    /// previous file copied in the kernel, then the new cycles. Skipped (and warned about
    /// once) when the filesystem is short of space. A failure changes nothing: the next
    /// write retries with everything.
    pub fn write(&mut self) -> Result<Written, ExportError> {
        let kept = match (self.on_disk.front(), self.on_disk.back()) {
            (Some(first), Some(last)) => Span {
                offset: first.offset,
                len: last.end() - first.offset,
            },
            _ => Span { offset: 0, len: 0 },
        };
        let previous = self.current.as_ref().map(|f| (f, kept));
        let fresh: Vec<&[u8]> = self.pending.iter().map(Vec::as_slice).collect();
        let done = match file::rewrite(&self.path, previous, &fresh) {
            // Someone truncated the file in place (copytruncate): what it held is gone, so
            // the history restarts from the cycles not written yet.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::warn!(path = %self.path.display(), cycles = self.on_disk.len(), "the export file was truncated by something else; its history is lost, continuing");
                self.on_disk.clear();
                self.current = None;
                return self.write();
            }
            done => done.map_err(|source| ExportError::Write {
                path: self.path.clone(),
                source,
            })?,
        };
        match done {
            Rewrite::NoSpace { needed, available } => {
                if !self.space_warned {
                    tracing::warn!(
                        path = %self.path.display(),
                        needed,
                        available,
                        "not enough free space for the export file (5 % of the filesystem is kept free); \
                         keeping the cycles and retrying each cycle (lower max_metrics_entries?)"
                    );
                    self.space_warned = true;
                }
                Ok(Written::NoSpace)
            }
            Rewrite::Written {
                file,
                size,
                copied_at,
                entries,
                owner_kept,
            } => {
                if self.space_warned {
                    tracing::info!(path = %self.path.display(), "enough free space again; export written");
                    self.space_warned = false;
                }
                if !owner_kept && !self.owner_warned {
                    tracing::warn!(path = %self.path.display(), "cannot give the rewritten export file the old file's owner and group (not root?)");
                }
                self.owner_warned = !owner_kept;
                for s in &mut self.on_disk {
                    s.offset = s.offset - kept.offset + copied_at;
                }
                self.on_disk.extend(entries);
                // One entry's buffer is kept for the next: a cycle's text (1.7 MiB at
                // N = 1000 with every figure on) is not allocated and freed every cycle.
                if let Some(last) = self.pending.pop_back() {
                    self.spare = last;
                }
                self.pending.clear();
                self.current = Some(file);
                Ok(Written::Bytes(size))
            }
        }
    }
}

/// Rounds for export: two decimals are more than any figure here is worth.
fn round2(v: f64) -> f64 {
    if v.is_finite() {
        (v * 100.0).round() / 100.0
    } else {
        0.0
    }
}

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

#[cfg(test)]
pub(crate) mod tests;
