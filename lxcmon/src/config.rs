//! The YAML configuration: the seed monitor's keys, their defaults, and lxcmon's additions.
//!
//! Validation happens while deserialising, so every error carries the line of the offending
//! key; nothing is checked after the fact where the position would be lost.

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod checks;
use checks::{limits, paths};

/// Where the seed monitor kept its configuration; kept so a migration needs no flag.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lxc_autoscale_ml/lxc_monitor.yaml";

/// Largest configuration file accepted: real ones are a few KiB, and the YAML parser's cost
/// grows faster than the size, so a bound keeps a reload from stalling the agent.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Deepest nesting accepted (real files use 2 levels); the parser is quadratic in depth.
pub const MAX_CONFIG_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: larger than the limit of {limit} bytes for a configuration file", limit = MAX_CONFIG_BYTES)]
    TooLarge { path: PathBuf },
    #[error("{path}: nested deeper than the limit of {limit} levels at line {line}", limit = MAX_CONFIG_DEPTH)]
    TooDeep { path: PathBuf, line: usize },
    /// What start-up would refuse although the file itself is valid (a missing directory).
    #[error("{path}: {key}: {problem}")]
    Unusable {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub logging: LoggingConfig,
    pub monitoring: MonitoringConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub log_file: PathBuf,
    #[serde(deserialize_with = "log_max_bytes")]
    pub log_max_bytes: u64,
    pub log_backup_count: usize,
    pub log_level: LogLevel,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            log_file: PathBuf::from("/var/log/lxc_monitor.log"),
            log_max_bytes: 5 * 1024 * 1024,
            log_backup_count: 7,
            log_level: LogLevel::Info,
        }
    }
}

/// The seed's Python level names, mapped onto tracing's levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

impl LogLevel {
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            Self::Debug => tracing::Level::DEBUG,
            Self::Info => tracing::Level::INFO,
            Self::Warning => tracing::Level::WARN,
            Self::Error | Self::Critical => tracing::Level::ERROR,
        }
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_uppercase().as_str() {
            "DEBUG" | "TRACE" => Ok(Self::Debug),
            "INFO" => Ok(Self::Info),
            "WARNING" | "WARN" => Ok(Self::Warning),
            "ERROR" => Ok(Self::Error),
            "CRITICAL" | "FATAL" => Ok(Self::Critical),
            _ => Err(D::Error::custom(format!(
                "log_level: unknown level {s:?}, expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// One object per container per cycle, as the seed document shows.
    #[default]
    Records,
    /// One object per cycle keyed by container id plus `summary`, for lxc_autoscale_ml.
    AutoscaleMl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CollectorChoice {
    /// BPF when the kernel allows it, the file readers otherwise.
    #[default]
    Auto,
    Ebpf,
    Files,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    pub export_file: PathBuf,
    #[serde(deserialize_with = "check_interval")]
    pub check_interval: Duration,
    pub enable_swap: bool,
    pub enable_network: bool,
    pub enable_filesystem: bool,
    /// PSI stall time (cpu, memory, io) per container.
    pub enable_pressure: bool,
    /// CFS periods, throttled periods and time, quota and period.
    pub enable_throttling: bool,
    /// Memory events (limit hits, OOM kills), the memory breakdown and the extra limits.
    pub enable_memory_details: bool,
    /// Block I/O per device.
    pub enable_per_device: bool,
    /// Network counters per interface.
    pub enable_per_interface: bool,
    /// Size, use and inodes of every filesystem mounted in a container.
    pub enable_per_mount: bool,
    /// Run-queue wait histograms per container (BPF collector: scheduler programs attached).
    pub enable_runqueue_latency: bool,
    /// Block I/O latency histograms per container, reads and writes (BPF collector: block
    /// request programs attached).
    pub enable_io_latency: bool,
    /// TCP segments retransmitted by each container's sockets (BPF collector: the
    /// `tcp_retransmit_skb` program attached).
    pub enable_tcp_retransmits: bool,
    pub parallel_processing: bool,
    #[serde(deserialize_with = "max_workers")]
    pub max_workers: usize,
    pub excluded_devices: Vec<String>,
    pub export_format: ExportFormat,
    #[serde(deserialize_with = "max_metrics_entries")]
    pub max_metrics_entries: usize,
    /// Seconds between export file rewrites; the cycles in between are written together.
    /// `None` (absent, `0`): every cycle.
    #[serde(deserialize_with = "export_interval")]
    pub export_interval: Option<Duration>,
    pub retry_limit: u32,
    #[serde(deserialize_with = "retry_delay")]
    pub retry_delay: Duration,
    pub collector: CollectorChoice,
    /// cgroup v1 on kernels >= 6.9 counts block I/O only once a throttle rule exists on the
    /// disk; lxcmon writes an unlimited rule unless this is false (then I/O reads 0, logged).
    pub enable_v1_io_accounting: bool,
    /// Where the BPF collector pins its maps and links (one agent per directory); default
    /// `/sys/fs/bpf/lxcmon/v<layout version>`.
    pub bpf_pin_dir: Option<PathBuf>,
    /// Serve `/metrics` (Prometheus/OpenMetrics) and `/healthz` here, e.g. `127.0.0.1:9273`.
    #[serde(deserialize_with = "listen_address")]
    pub prometheus_listen: Option<std::net::SocketAddr>,
    /// The seed ran `pct exec` with this timeout; lxcmon spawns nothing, so it means nothing.
    #[serde(deserialize_with = "ignored")]
    pub command_timeout: Option<()>,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            export_file: PathBuf::from("/var/log/lxc_metrics.json"),
            check_interval: Duration::from_secs(60),
            enable_swap: true,
            enable_network: true,
            enable_filesystem: true,
            enable_pressure: true,
            enable_throttling: true,
            enable_memory_details: true,
            enable_per_device: true,
            enable_per_interface: true,
            enable_per_mount: true,
            enable_runqueue_latency: true,
            enable_io_latency: true,
            enable_tcp_retransmits: true,
            parallel_processing: true,
            max_workers: 8,
            excluded_devices: vec!["loop".into(), "dm-".into()],
            export_format: ExportFormat::Records,
            max_metrics_entries: 1000,
            export_interval: None,
            retry_limit: 3,
            retry_delay: Duration::from_secs(2),
            collector: CollectorChoice::Auto,
            enable_v1_io_accounting: true,
            bpf_pin_dir: None,
            prometheus_listen: None,
            command_timeout: None,
        }
    }
}

/// Shortest interval we accept: below it the cycle cost dominates what is measured.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

fn seconds<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Duration, D::Error> {
    let v = f64::deserialize(d)?;
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(D::Error::custom(format!(
            "{key}: {v} is not a number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

fn check_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = seconds(d, "check_interval")?;
    if v < MIN_INTERVAL {
        return Err(D::Error::custom(format!(
            "check_interval: {} s is too short, the minimum is 0.1 s",
            v.as_secs_f64()
        )));
    }
    Ok(v)
}

fn retry_delay<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    seconds(d, "retry_delay")
}

fn positive<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(D::Error::custom(format!("{key}: must be at least 1")));
    }
    Ok(v)
}

fn log_max_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    positive(d, "log_max_bytes").map(|v| v as u64)
}

fn max_workers<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    positive(d, "max_workers")
}

fn max_metrics_entries<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    positive(d, "max_metrics_entries")
}

fn export_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let Some(v) = Option::<f64>::deserialize(d)? else {
        return Ok(None);
    };
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(D::Error::custom(format!(
            "export_interval: {v} is not a number of seconds"
        )));
    }
    Ok((v > 0.0).then(|| Duration::from_secs_f64(v)))
}

fn listen_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let Some(s) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    s.parse().map(Some).map_err(|_| {
        D::Error::custom(format!(
            "prometheus_listen: {s:?} is not an address:port such as 127.0.0.1:9273 or [::1]:9273"
        ))
    })
}

fn ignored<'de, D: Deserializer<'de>>(d: D) -> Result<Option<()>, D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Ok(Some(()))
}

/// The parser's message, with the line added where it knows none (an unknown key at the
/// top level): the first line that defines that key.
fn with_line(e: &serde_yaml_ng::Error, text: &str) -> String {
    let message = e.to_string();
    if message.contains(" at line ") {
        return message;
    }
    let key = message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(key, _)| key);
    let line = key.and_then(|key| {
        text.lines().position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
    });
    match line {
        Some(n) => format!("{message} at line {}", n + 1),
        None => message,
    }
}

impl Config {
    /// Parses a YAML document; an empty one (or one of comments only) gives the defaults.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: origin.to_path_buf(),
            });
        }
        if let Some(line) = limits::too_deep(text, MAX_CONFIG_DEPTH) {
            return Err(ConfigError::TooDeep {
                path: origin.to_path_buf(),
                line,
            });
        }
        let parsed: Option<Config> =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
                path: origin.to_path_buf(),
                message: with_line(&e, text),
            })?;
        Ok(parsed.unwrap_or_default())
    }

    /// Reads and parses a file; one over [`MAX_CONFIG_BYTES`] is refused before it is read.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read_err)?
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Self::from_yaml(&text, path)
    }

    /// What start-up needs beyond a valid file, checked without changing anything (for
    /// `--check-config`, start-up and reloads alike): the export file's directory exists and
    /// is writable, the export file is no directory, the collector can be had in this binary.
    /// `origin` names the file in the message.
    pub fn check_usable(&self, origin: &Path) -> Result<(), ConfigError> {
        let unusable = |key, problem: String| ConfigError::Unusable {
            path: origin.to_path_buf(),
            key,
            problem,
        };
        let export = &self.monitoring.export_file;
        if let Some(problem) = paths::unwritable_file(export) {
            return Err(unusable(
                "monitoring.export_file",
                format!("{}: {problem}", export.display()),
            ));
        }
        if !cfg!(feature = "ebpf") && self.monitoring.collector == CollectorChoice::Ebpf {
            return Err(unusable(
                "monitoring.collector",
                "ebpf: this binary is built without the BPF collector".into(),
            ));
        }
        Ok(())
    }

    /// Problems start-up only warns about: a log file that cannot be written (the agent then
    /// logs to stderr alone).
    pub fn warnings(&self) -> Vec<String> {
        let log = &self.logging.log_file;
        paths::unwritable_file(log)
            .map(|p| {
                format!(
                    "logging.log_file: {}: {p}; the agent would log to stderr only",
                    log.display()
                )
            })
            .into_iter()
            .collect()
    }

    /// Settings that are accepted for compatibility but change nothing, for one log line each.
    pub fn ignored_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.monitoring.command_timeout.is_some() {
            keys.push("monitoring.command_timeout");
        }
        keys
    }

    /// Worker threads for one cycle: 1 when parallel processing is off.
    pub fn workers(&self) -> usize {
        if self.monitoring.parallel_processing {
            self.monitoring.max_workers
        } else {
            1
        }
    }
}

#[cfg(test)]
mod tests;
