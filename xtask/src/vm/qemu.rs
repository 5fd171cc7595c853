//! One qemu boot (TCG), always under a host-side `timeout`, console on a log file.

use super::kernel::Kernel;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

/// Kills the qemu run (through `timeout`, which passes the signal on) if the host side stops
/// early, e.g. on an error or a panic.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let _ = self.0.wait();
        }
    }
}

pub struct Outcome {
    pub status: ExitStatus,
    pub log: String,
    pub log_path: PathBuf,
    pub timeout: u64,
}

impl Outcome {
    fn marker(&self) -> Option<&str> {
        self.log.lines().rev().find_map(|l| {
            l.trim_end_matches('\r')
                .split_once("LXCMON-VM-RESULT ")
                .map(|(_, rest)| rest.trim())
        })
    }

    pub fn passed(&self) -> bool {
        self.status.success() && self.marker().is_some_and(|m| m.starts_with("pass"))
    }

    pub fn verdict(&self) -> String {
        match (self.marker(), self.status.code()) {
            (_, Some(124)) | (_, Some(137)) => {
                format!("FAIL (timed out after {} s)", self.timeout)
            }
            (Some(m), _) if !self.status.success() => format!("FAIL ({m}; qemu {})", self.status),
            (Some(m), _) if m.starts_with("pass") => format!("PASS ({m})"),
            (Some(m), _) => format!("FAIL ({m})"),
            (None, _) => format!("FAIL (no result marker; qemu {})", self.status),
        }
    }

    /// The check lines on success; the whole console log on failure.
    pub fn print(&self, case: &str, verbose: bool) {
        if self.passed() && !verbose {
            eprintln!("---- {case}: guest checks ----");
            for l in self.log.lines() {
                let l = l.trim_end_matches('\r');
                if l.starts_with("LXCMON-VM-") {
                    eprintln!("{l}");
                }
            }
        } else {
            eprintln!(
                "---- {case}: guest console log ({}) ----",
                self.log_path.display()
            );
            eprintln!("{}", self.log);
            eprintln!("---- end of {case} console log: {} ----", self.verdict());
        }
    }
}

pub fn boot(
    k: &Kernel,
    initrd: &Path,
    disk: &Path,
    extra_cmdline: &str,
    dir: &Path,
    timeout: u64,
) -> Result<Outcome> {
    let log_path = dir.join("console.log");
    let append = format!("console=ttyS0 panic=-1 loglevel=4 ipv6.disable=1 {extra_cmdline}");
    let mut cmd = Command::new("timeout");
    cmd.args([
        "--kill-after=10",
        &timeout.to_string(),
        "qemu-system-x86_64",
    ])
    .args([
        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024",
    ])
    .args([
        "-nographic",
        "-nic",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .arg("-serial")
    .arg(format!("file:{}", log_path.display()))
    .arg("-kernel")
    .arg(&k.vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", &append])
    .arg("-drive")
    .arg(format!(
        "file={},format=raw,if=virtio,cache=unsafe",
        disk.display()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    eprintln!("xtask vm-test: booting {} ({append})", k.version);
    let mut guard = Guard(cmd.spawn().context("starting timeout qemu-system-x86_64")?);
    let status = guard.0.wait().context("waiting for qemu")?;
    let log = std::fs::read(&log_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(no console log at {}: {e})", log_path.display()));
    Ok(Outcome {
        status,
        log,
        log_path,
        timeout,
    })
}
