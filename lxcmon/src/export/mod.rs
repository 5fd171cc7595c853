//! The export file: each cycle encoded once in the configured format, a bounded history of
//! those encodings, and an atomic rewrite of the whole file per cycle.

mod autoscale;
mod file;
pub mod prometheus;
mod records;

use crate::config::ExportFormat;
use crate::derive::Cycle;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

pub use file::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot read the existing export file {path}: {source}")]
    ReadBack {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot move the unreadable export file {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the export file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Encodes one cycle's entry: `None` when the cycle has nothing to write.
pub fn encode(format: ExportFormat, cycle: &Cycle) -> Option<Vec<u8>> {
    if cycle.metrics.is_empty() {
        return None;
    }
    Some(match format {
        ExportFormat::Records => records::encode(cycle),
        ExportFormat::AutoscaleMl => autoscale::encode(cycle),
    })
}

/// A standalone export document holding just `cycle` (what `--once` prints).
pub fn document(format: ExportFormat, cycle: &Cycle) -> Vec<u8> {
    let mut out = Vec::new();
    file::write_document(&mut out, encode(format, cycle).iter().map(Vec::as_slice))
        .map(|_| out)
        .unwrap_or_default()
}

/// The export file and its retained history.
#[derive(Debug)]
pub struct Exporter {
    path: PathBuf,
    format: ExportFormat,
    max_entries: usize,
    /// Encoded cycles, oldest first.
    history: VecDeque<Vec<u8>>,
}

impl Exporter {
    /// Reads the existing file back so history continues. A file that does not parse as
    /// `format` is renamed to `<file>.corrupt-<unix time>` and a new history starts.
    pub fn open(
        path: &Path,
        format: ExportFormat,
        max_entries: usize,
    ) -> Result<Self, ExportError> {
        let mut exporter = Self {
            path: path.to_path_buf(),
            format,
            max_entries: max_entries.max(1),
            history: VecDeque::new(),
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(exporter),
            Err(source) if source.kind() == std::io::ErrorKind::InvalidData => {
                exporter.move_aside("it is not UTF-8")?;
                return Ok(exporter);
            }
            Err(source) => {
                return Err(ExportError::ReadBack {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let parsed = match format {
            ExportFormat::Records => records::read_back(&text),
            ExportFormat::AutoscaleMl => autoscale::read_back(&text),
        };
        match parsed {
            Ok(entries) => {
                exporter.history = entries.into();
                exporter.trim();
                tracing::info!(path = %path.display(), cycles = exporter.history.len(), "continuing the existing export history");
            }
            Err(why) => exporter.move_aside(&why)?,
        }
        Ok(exporter)
    }

    fn move_aside(&self, why: &str) -> Result<(), ExportError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut aside = self.path.clone().into_os_string();
        aside.push(format!(".corrupt-{stamp}"));
        std::fs::rename(&self.path, &aside).map_err(|source| ExportError::MoveAside {
            path: self.path.clone(),
            source,
        })?;
        tracing::warn!(
            path = %self.path.display(),
            moved_to = %PathBuf::from(&aside).display(),
            reason = why,
            "the existing export file is not a valid {:?} export; kept aside, starting a new one",
            self.format
        );
        Ok(())
    }

    fn trim(&mut self) {
        while self.history.len() > self.max_entries {
            self.history.pop_front();
        }
    }

    /// Adds a cycle; returns whether it had anything to export.
    pub fn push(&mut self, cycle: &Cycle) -> bool {
        match encode(self.format, cycle) {
            Some(entry) => {
                self.history.push_back(entry);
                self.trim();
                true
            }
            None => false,
        }
    }

    pub fn cycles(&self) -> usize {
        self.history.len()
    }

    /// Rewrites the file atomically with the retained history.
    pub fn write(&self) -> Result<(), ExportError> {
        write_atomic(&self.path, |w| {
            file::write_document(w, self.history.iter().map(Vec::as_slice))
        })
        .map_err(|source| ExportError::Write {
            path: self.path.clone(),
            source,
        })
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
pub(crate) mod tests {
    use super::*;
    use crate::collect::sample::FsUsage;
    use crate::derive::ContainerMetrics;
    use chrono::{TimeZone, Utc};

    pub fn metrics(id: &str, seed: u64) -> ContainerMetrics {
        ContainerMetrics {
            id: id.into(),
            name: format!("{id}-name"),
            started: Utc.timestamp_opt(1_700_000_000 - 3600, 0).unwrap(),
            cpu_percent: 12.345,
            cpu_cores_allowed: 2.0,
            cpu_usage_ns: 1_500_000_000,
            memory_bytes: 512 * 1024 * 1024 + seed,
            memory_limit_bytes: 1 << 30,
            swap_bytes: 3 * 1024 * 1024,
            swap_limit_bytes: 512 * 1024 * 1024,
            io_read_bytes: 1024 * seed,
            io_write_bytes: 2048 * seed,
            net_rx_bytes: 100 + seed,
            net_tx_bytes: 200 + seed,
            fs: FsUsage {
                total: 10 << 30,
                used: 4 << 30,
                free: 5 << 30,
            },
            processes: 7,
            threads: 9,
        }
    }

    pub fn cycle(secs: i64, ids: &[&str]) -> Cycle {
        let t = Utc
            .timestamp_opt(1_700_000_000 + secs, 123_456_000)
            .single()
            .unwrap();
        Cycle {
            started: t,
            ended: t + chrono::Duration::milliseconds(5),
            metrics: ids
                .iter()
                .enumerate()
                .map(|(i, id)| metrics(id, i as u64 + secs as u64))
                .collect(),
            total_containers: ids.len() + 1,
            failed_containers: 0,
            collector: "files",
            host_cpu_percent: 3.5,
            agent_rss_bytes: 8 * 1024 * 1024,
            subsecond: false,
        }
    }

    fn parse(path: &Path) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn retention_keeps_the_newest_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        for format in [ExportFormat::Records, ExportFormat::AutoscaleMl] {
            let mut e = Exporter::open(&path, format, 3).unwrap();
            for i in 0..5 {
                assert!(e.push(&cycle(i, &["100", "101"])));
            }
            assert!(
                !e.push(&cycle(9, &[])),
                "a cycle without containers writes nothing"
            );
            e.write().unwrap();
            let v = parse(&path);
            let arr = v.as_array().unwrap();
            match format {
                ExportFormat::Records => {
                    assert_eq!(arr.len(), 6, "3 cycles x 2 containers");
                    assert_eq!(arr[0]["timestamp"], "2023-11-14T22:13:22Z");
                    assert_eq!(arr[5]["timestamp"], "2023-11-14T22:13:24Z");
                }
                ExportFormat::AutoscaleMl => {
                    assert_eq!(arr.len(), 3);
                    assert_eq!(arr[2]["summary"]["collected_containers"], 2);
                }
            }
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn history_is_read_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        for format in [ExportFormat::Records, ExportFormat::AutoscaleMl] {
            let mut e = Exporter::open(&path, format, 10).unwrap();
            e.push(&cycle(0, &["a", "b"]));
            e.push(&cycle(1, &["a"]));
            e.write().unwrap();
            let before = std::fs::read(&path).unwrap();
            let mut again = Exporter::open(&path, format, 10).unwrap();
            assert_eq!(again.cycles(), 2, "{format:?}");
            again.write().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), before, "{format:?}");
            again.push(&cycle(2, &["a"]));
            again.write().unwrap();
            assert_eq!(Exporter::open(&path, format, 2).unwrap().cycles(), 2);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn unparsable_or_foreign_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        for (content, format) in [
            ("[{\"truncated\": ", ExportFormat::Records),
            ("{\"not\": \"an array\"}", ExportFormat::Records),
            ("[{\"a\": 1}]", ExportFormat::Records),
            ("[1, 2]", ExportFormat::AutoscaleMl),
        ] {
            std::fs::write(&path, content).unwrap();
            let e = Exporter::open(&path, format, 10).unwrap();
            assert_eq!(e.cycles(), 0);
            assert!(!path.exists());
            let aside: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|f| {
                    f.file_name()
                        .to_string_lossy()
                        .starts_with("m.json.corrupt-")
                })
                .collect();
            assert_eq!(aside.len(), 1, "{content}");
            assert_eq!(
                std::fs::read_to_string(aside[0].path()).unwrap(),
                content,
                "kept intact"
            );
            std::fs::remove_file(aside[0].path()).unwrap();
        }
        // A records history is not an autoscale_ml one: switching formats keeps the old file.
        let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
        e.push(&cycle(0, &["a"]));
        e.write().unwrap();
        assert_eq!(
            Exporter::open(&path, ExportFormat::AutoscaleMl, 10)
                .unwrap()
                .cycles(),
            0
        );
        assert!(!path.exists());
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("m.json");
        let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
        e.push(&cycle(0, &["a"]));
        e.write().unwrap();
        let before = std::fs::read(&path).unwrap();
        std::fs::rename(&sub, dir.path().join("moved")).unwrap();
        e.push(&cycle(1, &["a"]));
        let err = e.write().unwrap_err();
        assert!(err.to_string().contains("m.json"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("moved/m.json")).unwrap(),
            before
        );
        std::fs::create_dir(&sub).unwrap();
        e.write().unwrap();
        assert_eq!(
            parse(&path).as_array().unwrap().len(),
            2,
            "the retry writes both cycles"
        );
    }

    #[test]
    fn document_of_one_cycle() {
        let doc = document(ExportFormat::Records, &cycle(0, &["a", "b"]));
        let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        let empty: serde_json::Value =
            serde_json::from_slice(&document(ExportFormat::AutoscaleMl, &cycle(0, &[]))).unwrap();
        assert_eq!(empty, serde_json::json!([]));
    }
}
