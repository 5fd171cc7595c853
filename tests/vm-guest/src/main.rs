//! The test driver inside the VM (started by the initramfs' /init as `/vm-guest run`).
//!
//! It mounts the kernel file systems and only cgroup2, builds a Proxmox VE layout by hand
//! (`lxc/<vmid>/ns/...`, `lxc.monitor/<vmid>`, `/etc/pve/lxc/<vmid>.conf`, a veth per
//! container on a bridge, a tmpfs root per container, PID 1 in a PID namespace), drives
//! workloads with a known footprint, runs `/lxcmon` and compares its figures with that ground
//! truth. Every comparison is one `LXCMON-VM-CHECK` line on the console; the last line is
//! `LXCMON-VM-RESULT pass|fail ...`, which the host parses.

mod agent;
mod ct;
mod details;
mod retrans;
mod scenario;
mod wl;

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = match args.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("", &[][..]),
    };
    let res = match cmd {
        "run" => {
            run();
            Ok(())
        }
        "ct-monitor" => ct::monitor(rest),
        "ct-init" => ct::init(rest),
        "ct-exec" => ct::exec(rest),
        "wl" => wl::main(rest),
        _ => Err(anyhow::anyhow!(
            "usage: vm-guest run | ct-monitor | ct-init | ct-exec | wl ..."
        )),
    };
    if let Err(e) = res {
        eprintln!("vm-guest {cmd}: {e:#}");
        std::process::exit(1);
    }
}

/// Runs a busybox command line from the driver, failing with its output.
pub fn sh(argv: &[&str]) -> Result<()> {
    let out = Command::new("/bin/busybox")
        .args(argv)
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed: {} {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Collects the checks and prints each one as it is made.
#[derive(Default)]
pub struct Report {
    pub total: usize,
    pub failed: Vec<String>,
}

impl Report {
    pub fn check(&mut self, name: &str, ok: bool, detail: &str) {
        self.total += 1;
        let verdict = if ok { "pass" } else { "FAIL" };
        println!("LXCMON-VM-CHECK {verdict} {name}: {detail}");
        if !ok {
            self.failed.push(name.to_string());
        }
    }

    /// `measured` within `rel` (fraction) of `expected`; an expected 0 allows `abs_zero`.
    pub fn near(&mut self, name: &str, measured: f64, expected: f64, rel: f64, abs_zero: f64) {
        let tol = if expected == 0.0 {
            abs_zero
        } else {
            expected.abs() * rel
        };
        let ok = (measured - expected).abs() <= tol;
        self.check(
            name,
            ok,
            &format!("measured={measured} expected={expected} tolerance=±{tol}"),
        );
    }

    pub fn eq<T: PartialEq + std::fmt::Debug>(&mut self, name: &str, measured: T, expected: T) {
        let ok = measured == expected;
        self.check(
            name,
            ok,
            &format!("measured={measured:?} expected={expected:?}"),
        );
    }
}

pub fn info(msg: &str) {
    println!("LXCMON-VM-INFO {msg}");
}

fn run() {
    let mut report = Report::default();
    let t0 = std::time::Instant::now();
    if let Err(e) = agent::drive(&mut report) {
        report.check("driver", false, &format!("{e:#}"));
    }
    let secs = t0.elapsed().as_secs_f64();
    if report.failed.is_empty() && report.total > 0 {
        println!(
            "LXCMON-VM-RESULT pass checks={} guest_seconds={secs:.1}",
            report.total
        );
    } else {
        println!(
            "LXCMON-VM-RESULT fail failed={}/{} guest_seconds={secs:.1} first={}",
            report.failed.len(),
            report.total,
            report.failed.first().map(String::as_str).unwrap_or("none")
        );
    }
}

/// Kernel command line parameter `lxcmon_vm.<key>=value`.
pub fn cmdline(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cmdline").ok()?;
    let want = format!("lxcmon_vm.{key}=");
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&want).map(str::to_string))
}

pub fn is_mounted(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(target))
        })
        .unwrap_or(false)
}

pub fn mount(fs: &str, target: &str, data: Option<&str>) -> Result<()> {
    if Path::new("/proc/self/mounts").exists() && is_mounted(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target)?;
    let data = data.map(std::ffi::CString::new).transpose()?;
    rustix::mount::mount(
        fs,
        target,
        fs,
        rustix::mount::MountFlags::empty(),
        data.as_deref(),
    )
    .with_context(|| format!("mounting {fs} on {target}"))
}
