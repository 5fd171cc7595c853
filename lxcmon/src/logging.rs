//! Logging through `tracing`: stderr always, and the configured file with size rotation.

use crate::config::{LogLevel, LoggingConfig};
use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};
use std::fs::OpenOptions;
use std::sync::Mutex;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, Registry};

/// An error and all its sources, `: `-joined, for log fields (`error = %Chain(&e)`). Error types
/// keep their source out of their own message (thiserror `#[source]`/`source` field), so neither
/// this nor anyhow's `{:#}` prints a cause twice.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Changes the level of the running subscriber (on a configuration reload).
pub struct LogControl {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    pub fn set_level(&self, level: LogLevel) {
        if let Err(e) = self.filter.modify(|f| *f = filter(level)) {
            tracing::warn!(error = %Chain(&e), "cannot change the log level");
        }
    }
}

/// `RUST_LOG`, when set, overrides the configured level.
fn filter(level: LogLevel) -> EnvFilter {
    EnvFilter::builder()
        .with_default_directive(LevelFilter::from_level(level.as_tracing()).into())
        .from_env_lossy()
}

/// Installs the global subscriber. A log file that cannot be opened leaves logging on stderr
/// with a warning rather than stopping the agent.
pub fn init(cfg: &LoggingConfig) -> LogControl {
    let (filter_layer, handle) = reload::Layer::new(filter(cfg.log_level));
    let stderr = fmt::layer().with_writer(std::io::stderr).with_target(false);
    let (file_layer, file_problem) = match open_rotating(cfg) {
        Ok(writer) => (
            Some(
                fmt::layer()
                    .with_writer(Mutex::new(writer))
                    .with_ansi(false)
                    .with_target(false),
            ),
            None,
        ),
        Err(e) => (None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(filter_layer)
        .with(stderr)
        .with(file_layer)
        .try_init();
    if let Some(e) = file_problem {
        tracing::warn!(log_file = %cfg.log_file.display(), error = %Chain(&e), "cannot write the log file; logging to stderr only");
    }
    LogControl { filter: handle }
}

fn open_rotating(cfg: &LoggingConfig) -> std::io::Result<FileRotate<AppendCount>> {
    // FileRotate panics where it cannot create the directory: try the file ourselves first.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.log_file)?;
    Ok(FileRotate::new(
        &cfg.log_file,
        AppendCount::new(cfg.log_backup_count),
        ContentLimit::BytesSurpassed(cfg.log_max_bytes.max(1) as usize),
        Compression::None,
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot write {path}")]
    struct Outer {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn chain_prints_each_cause_once() {
        let e = Outer {
            path: "/x",
            source: std::io::Error::from_raw_os_error(21),
        };
        let shown = Chain(&e).to_string();
        assert!(shown.starts_with("cannot write /x: "), "{shown}");
        assert_eq!(shown.matches("os error 21").count(), 1, "{shown}");
    }
}
