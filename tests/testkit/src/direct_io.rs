//! Ground truth for block I/O latency: 4 KiB O_DIRECT writes and reads timed one by one by a
//! process that joined a container's cgroups (so the kernel charges its I/O to the
//! container), with the kernel's own count of the container's requests (cgroup v1
//! `blkio.throttle.io_serviced_recursive`, or v2 `io.stat` `rios`/`wios`).
//!
//! The timed process is the test binary itself, re-run with [`CHILD_ENV`] set (see
//! [`run_child`]): a fresh single-threaded process can move itself into the cgroups and do the
//! I/O with nothing else of the test in the way.

use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `cgroup.procs files (comma-separated, may be empty)|file|count`.
pub const CHILD_ENV: &str = "LXCMON_DIRECT_IO_CHILD";
const BLOCK: usize = 4096;

/// Per-I/O wall times in nanoseconds, as the doing process saw them (the syscall included).
#[derive(Debug, Default, Clone)]
pub struct Timed {
    pub write_ns: Vec<u64>,
    pub read_ns: Vec<u64>,
    /// Time the process waited on a run queue during the writes and during the reads (its
    /// `run_delay`): part of the timed figures, none of the devices'.
    pub write_wait_ns: u64,
    pub read_wait_ns: u64,
}

impl Timed {
    pub fn mean_write_ns(&self) -> f64 {
        mean(&self.write_ns)
    }
    pub fn mean_read_ns(&self) -> f64 {
        mean(&self.read_ns)
    }
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }
}

/// Creates `file` with `count` 4 KiB blocks allocated and on disk (from this process: host
/// I/O), so the timed writes overwrite in place without allocating.
pub fn prepare(file: &Path, count: usize) -> Result<()> {
    let mut f = fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    f.write_all(&vec![0x5a; BLOCK * count])?;
    f.sync_all()?;
    Ok(())
}

/// Runs `test` of the current test binary as the timed process: it joins `procs` (the
/// `cgroup.procs` files of the container's cgroups; none: it stays a host process), writes
/// then reads `count` blocks of `file` with O_DIRECT, each timed.
pub fn timed_in(test: &str, procs: &[PathBuf], file: &Path, count: usize) -> Result<Timed> {
    let procs: Vec<String> = procs.iter().map(|p| p.display().to_string()).collect();
    let spec = format!("{}|{}|{count}", procs.join(","), file.display());
    let out = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, spec)
        .output()
        .context("running the timed I/O process")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "timed I/O process failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut t = Timed::default();
    for l in stdout.lines() {
        let mut f = l.split_whitespace();
        let (Some(tag), Some(v)) = (f.next(), f.next()) else {
            continue;
        };
        match tag {
            "direct-io-w" => t.write_ns.push(v.parse()?),
            "direct-io-r" => t.read_ns.push(v.parse()?),
            "direct-io-wait-w" => t.write_wait_ns = v.parse()?,
            "direct-io-wait-r" => t.read_wait_ns = v.parse()?,
            _ => {}
        }
    }
    ensure!(
        t.write_ns.len() == count && t.read_ns.len() == count,
        "timed I/O process gave {} writes and {} reads, not {count}: {stdout}",
        t.write_ns.len(),
        t.read_ns.len()
    );
    Ok(t)
}

/// The timed process' side: does nothing unless [`CHILD_ENV`] is set. Call it first in the
/// test named to [`timed_in`]; returns true when it ran (the test then returns).
pub fn run_child() -> Result<bool> {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return Ok(false);
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [procs, file, count] = parts[..] else {
        bail!("bad {CHILD_ENV}: {spec}");
    };
    let count: usize = count.parse()?;
    for p in procs.split(',').filter(|p| !p.is_empty()) {
        fs::write(p, "0").with_context(|| format!("joining {p}"))?;
    }
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(file)
        .with_context(|| format!("opening {file} with O_DIRECT"))?;
    let mut raw = vec![0u8; BLOCK * 2];
    let skip = raw.as_ptr().align_offset(BLOCK);
    let buf = &mut raw[skip..skip + BLOCK];
    buf.fill(0xa5);
    // The test harness prints the test's name without a newline before it.
    let mut out = String::from("\n");
    let w0 = run_delay()?;
    for i in 0..count {
        let t = Instant::now();
        f.write_all_at(buf, (i * BLOCK) as u64)?;
        out.push_str(&format!("direct-io-w {}\n", t.elapsed().as_nanos()));
    }
    let w1 = run_delay()?;
    for i in 0..count {
        let t = Instant::now();
        f.read_exact_at(buf, (i * BLOCK) as u64)?;
        out.push_str(&format!("direct-io-r {}\n", t.elapsed().as_nanos()));
    }
    let r1 = run_delay()?;
    out.push_str(&format!("direct-io-wait-w {}\n", w1 - w0));
    out.push_str(&format!("direct-io-wait-r {}\n", r1 - w1));
    print!("{out}");
    Ok(true)
}

/// This thread's run-queue wait so far (`/proc/thread-self/schedstat`, second field).
fn run_delay() -> Result<u64> {
    let s = fs::read_to_string("/proc/thread-self/schedstat")?;
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("parsing /proc/thread-self/schedstat")
}

/// Requests (reads, writes) the kernel counted for a cgroup: v1 `blkio` directory
/// (`io_serviced_recursive`) or v2 directory (`io.stat`).
pub fn kernel_requests(dir: &Path) -> Result<(u64, u64)> {
    let (mut r, mut w) = (0u64, 0u64);
    let v1 = dir.join("blkio.throttle.io_serviced_recursive");
    if v1.exists() {
        for l in fs::read_to_string(&v1)?.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 3 {
                match f[1] {
                    "Read" => r += f[2].parse::<u64>()?,
                    "Write" => w += f[2].parse::<u64>()?,
                    _ => {}
                }
            }
        }
    } else {
        for tok in fs::read_to_string(dir.join("io.stat"))?.split_whitespace() {
            if let Some(v) = tok.strip_prefix("rios=") {
                r += v.parse::<u64>()?;
            } else if let Some(v) = tok.strip_prefix("wios=") {
                w += v.parse::<u64>()?;
            }
        }
    }
    Ok((r, w))
}
