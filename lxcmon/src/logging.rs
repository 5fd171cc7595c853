//! Logging through `tracing`: stderr always, and the configured file with size rotation.

use crate::config::LoggingConfig;
use file_rotate::{compression::Compression, suffix::AppendCount, ContentLimit, FileRotate};
use std::fs::OpenOptions;
use std::sync::Mutex;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::fmt;
use tracing_subscriber::prelude::*;

/// Installs the global subscriber. A log file that cannot be opened leaves logging on stderr
/// with a warning rather than stopping the agent. `RUST_LOG` overrides the level when set.
pub fn init(cfg: &LoggingConfig) {
    let level = LevelFilter::from_level(cfg.log_level.as_tracing());
    let filter = || {
        EnvFilter::builder()
            .with_default_directive(level.into())
            .from_env_lossy()
    };
    let stderr = fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_filter(filter());
    let (file_layer, file_problem) = match open_rotating(cfg) {
        Ok(writer) => (
            Some(
                fmt::layer()
                    .with_writer(Mutex::new(writer))
                    .with_ansi(false)
                    .with_target(false)
                    .with_filter(filter()),
            ),
            None,
        ),
        Err(e) => (None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer)
        .try_init();
    if let Some(e) = file_problem {
        tracing::warn!(log_file = %cfg.log_file.display(), error = %e, "cannot write the log file; logging to stderr only");
    }
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
