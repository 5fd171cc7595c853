//! Running the lxcmon binary under test with a config of the test's own.

use crate::proc::{run_timeout, wait_output, Output};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The settings a test varies; everything else is written explicitly with the seed's values.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub export_format: &'static str,
    pub check_interval: f64,
    pub max_metrics_entries: u32,
    /// `collector:` of the config: `LXCMON_TEST_COLLECTOR` (`files`, `ebpf`, `auto`), else `auto`.
    pub collector: String,
    /// Where the config, the export file and the log go.
    pub dir: PathBuf,
    /// `excluded_devices:` (the seed's `['loop', 'dm-']` unless a test changes it).
    pub excluded_devices: Vec<String>,
    /// `prometheus_listen:`, e.g. `127.0.0.1:9273`; not written when `None`.
    pub prometheus_listen: Option<String>,
    /// Further `monitoring:` keys, written as they are (e.g. `enable_tcp_retransmits: false`).
    pub monitoring_extra: Vec<String>,
}

/// The collector the suite runs under (`cargo xtask test` runs it once per collector).
pub fn test_collector() -> String {
    std::env::var("LXCMON_TEST_COLLECTOR").unwrap_or_else(|_| "auto".into())
}

impl AgentConfig {
    pub fn new(dir: &Path, export_format: &'static str) -> Self {
        Self {
            export_format,
            check_interval: 1.0,
            max_metrics_entries: 1000,
            collector: test_collector(),
            dir: dir.to_path_buf(),
            excluded_devices: vec!["loop".into(), "dm-".into()],
            prometheus_listen: None,
            monitoring_extra: Vec::new(),
        }
    }

    pub fn export_file(&self) -> PathBuf {
        self.dir
            .join(format!("metrics-{}.json", self.export_format))
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("lxcmon.log")
    }

    /// Writes the YAML config and returns its path.
    pub fn write(&self) -> Result<PathBuf> {
        let path = self.dir.join(format!("lxcmon-{}.yaml", self.export_format));
        let excluded: Vec<String> = self
            .excluded_devices
            .iter()
            .map(|d| format!("'{d}'"))
            .collect();
        let mut yaml = format!(
            "logging:\n  log_file: {log}\n  log_max_bytes: 5242880\n  log_backup_count: 2\n  \
             log_level: INFO\nmonitoring:\n  export_file: {export}\n  check_interval: {ci}\n  \
             enable_swap: true\n  enable_network: true\n  enable_filesystem: true\n  \
             parallel_processing: true\n  max_workers: 4\n  excluded_devices: [{excluded}]\n  \
             export_format: {fmt}\n  max_metrics_entries: {max}\n  collector: {col}\n",
            log = self.log_file().display(),
            export = self.export_file().display(),
            ci = self.check_interval,
            fmt = self.export_format,
            max = self.max_metrics_entries,
            col = self.collector,
            excluded = excluded.join(", "),
        );
        if let Some(listen) = &self.prometheus_listen {
            yaml.push_str(&format!("  prometheus_listen: {listen}\n"));
        }
        for line in &self.monitoring_extra {
            yaml.push_str(&format!("  {line}\n"));
        }
        // Agents of another lab site (the soak) keep their BPF pins apart from the suite's.
        let site = crate::lab::Site::current();
        if site != crate::lab::SUITE {
            yaml.push_str(&format!("  bpf_pin_dir: {}\n", site.pin_dir));
        }
        fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Runs `lxcmon --once --config CFG`, requires exit 0 and returns the parsed JSON array it
/// printed, together with its stderr.
pub fn run_once(bin: &Path, cfg: &AgentConfig) -> Result<(Value, String)> {
    let path = cfg.write()?;
    let out: Output = run_timeout(
        Command::new(bin).arg("--once").arg("--config").arg(&path),
        Duration::from_secs(60),
    )?;
    if !out.status.success() {
        bail!(
            "lxcmon --once exited with {}\nstderr:\n{}\nstdout:\n{}",
            out.status,
            out.stderr,
            out.stdout
        );
    }
    let v: Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "lxcmon --once printed no JSON\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })?;
    if !v.is_array() {
        bail!("lxcmon --once printed JSON that is not an array: {v}");
    }
    Ok((v, out.stderr))
}

/// A daemon started by [`Daemon::start`]; killed on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Daemon {
    pub fn start(bin: &Path, cfg: &AgentConfig) -> Result<Self> {
        let path = cfg.write()?;
        // Output goes to files: a pipe nobody reads while it runs could fill up and block it.
        let stdout = cfg.dir.join("daemon.stdout");
        let stderr = cfg.dir.join("daemon.stderr");
        let file =
            |p: &Path| fs::File::create(p).with_context(|| format!("creating {}", p.display()));
        let child = Command::new(bin)
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child: Some(child),
            stdout,
            stderr,
        })
    }

    /// Its process id while it has not been collected.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM and waits (up to `timeout`) for it to exit; returns its output.
    pub fn terminate(mut self, timeout: Duration) -> Result<Output> {
        let Some(child) = self.child.take() else {
            bail!("daemon already collected");
        };
        let pid = rustix::process::Pid::from_raw(child.id() as i32)
            .context("daemon pid is not a valid pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("sending SIGTERM to lxcmon")?;
        let out =
            wait_output(child, timeout).context("waiting for lxcmon to exit after SIGTERM")?;
        let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
        Ok(Output {
            status: out.status,
            stdout: read(&self.stdout),
            stderr: read(&self.stderr),
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
