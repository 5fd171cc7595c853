//! Running the agent against the fleet and measuring it from the outside: CPU time per cycle
//! (the agent's threads' on-CPU nanoseconds from /proc/<pid>/task/*/schedstat, sampled when
//! each cycle's debug line appears, cross-checked with utime+stime of /proc/<pid>/stat over
//! the whole window), wall time of a cycle (the agent's own `duration_us`), RSS, syscalls
//! (`strace -c -f`), and the floor: the same kernel files read by a tight loop here.

use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::fleet::Fleet;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub collector: String,
    pub interval: f64,
    pub workers: usize,
    pub max_entries: usize,
    pub format: &'static str,
    /// The figures beyond the seed's (`enable_pressure`, ...): all on, or all off.
    pub signals: bool,
}

pub struct Agent {
    child: Child,
    pid: u32,
    log: File,
    pending: String,
    pub dir: PathBuf,
    cfg: AgentConfig,
}

/// One cycle as seen from outside.
#[derive(Debug, Clone, Copy)]
pub struct CycleObs {
    pub cpu_ns: u64,
    pub wall_us: u64,
    pub found: usize,
}

#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub cycles: Vec<CycleObs>,
    /// utime+stime over the window, in seconds, and the window's wall length.
    pub stat_cpu_s: f64,
    pub window_s: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// The agent ran short of descriptors and let go of its rarely read files (limits, child
    /// cgroups' process lists), opening them for each read: it says so in its log.
    pub lean: bool,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl RunStats {
    pub fn found(&self) -> usize {
        self.cycles.last().map(|c| c.found).unwrap_or(0)
    }
    pub fn median_cpu_us(&self) -> f64 {
        median(self.cycles.iter().map(|c| c.cpu_ns as f64 / 1e3).collect())
    }
    pub fn median_wall_ms(&self) -> f64 {
        median(self.cycles.iter().map(|c| c.wall_us as f64 / 1e3).collect())
    }
    pub fn per_container_us(&self) -> f64 {
        self.median_cpu_us() / self.found().max(1) as f64
    }
    /// Mean CPU per cycle from the coarse utime+stime (10 ms ticks) over the window.
    pub fn stat_per_cycle_us(&self) -> f64 {
        self.stat_cpu_s * 1e6 / self.cycles.len().max(1) as f64
    }
    /// Share of one core over the window (stat figures).
    pub fn core_share(&self) -> f64 {
        if self.window_s > 0.0 {
            self.stat_cpu_s / self.window_s
        } else {
            f64::NAN
        }
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as f64
    } else {
        100.0
    }
}

/// utime+stime of the whole process (all threads, dead ones included), in seconds.
pub fn stat_cpu(pid: u32) -> Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).context("reading agent stat")?;
    let after = text
        .rsplit_once(')')
        .map(|(_, a)| a)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 overall; after the comm they are at index 11 and 12.
    let ut: f64 = f.get(11).and_then(|s| s.parse().ok()).context("utime")?;
    let st: f64 = f.get(12).and_then(|s| s.parse().ok()).context("stime")?;
    Ok((ut + st) / clk_tck())
}

/// On-CPU nanoseconds of the process's live threads.
pub fn schedstat_ns(pid: u32) -> u64 {
    let mut sum = 0;
    for e in fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(t) = fs::read_to_string(e.path().join("schedstat")) {
            sum += t
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    sum
}

/// On-CPU nanoseconds of the calling thread.
pub fn thread_cpu_ns() -> u64 {
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

/// The agent's YAML for `cfg` in `dir`; `runqueue` is `enable_runqueue_latency` (the other
/// groups follow `cfg.signals`).
fn config_yaml(cfg: &AgentConfig, dir: &Path, runqueue: bool) -> String {
    format!(
            "logging:\n  log_file: {d}/lxcmon.log\n  log_level: INFO\nmonitoring:\n  export_file: {d}/export.json\n  check_interval: {i}\n  collector: {c}\n  parallel_processing: {p}\n  max_workers: {w}\n  max_metrics_entries: {m}\n  export_format: {f}\n{s}",
            d = dir.display(),
            i = cfg.interval,
            c = cfg.collector,
            p = cfg.workers > 1,
            w = cfg.workers.max(1),
            m = cfg.max_entries,
            f = cfg.format,
            s = [
                "enable_pressure",
                "enable_throttling",
                "enable_memory_details",
                "enable_per_device",
                "enable_per_interface",
                "enable_per_mount",
                "enable_io_latency",
            ]
            .map(|k| format!("  {k}: {}\n", cfg.signals))
            .concat()
            + &format!("  enable_runqueue_latency: {runqueue}\n"),
    )
}

impl Agent {
    pub fn start(bin: &Path, cfg: &AgentConfig) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lxcmon-bench-agent-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).context("creating the agent's temp dir")?;
        let config_path = dir.join("lxcmon.yaml");
        fs::write(&config_path, config_yaml(cfg, &dir, cfg.signals))
            .context("writing the agent config")?;
        File::create(dir.join("lxcmon.log")).context("creating the agent log")?;
        let log = File::open(dir.join("lxcmon.log")).context("opening the agent log")?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,lxcmon::daemon::pipeline=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("stderr.log")).context("agent stderr file")?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        Ok(Self {
            child,
            pid,
            log,
            pending: String::new(),
            dir,
            cfg: cfg.clone(),
        })
    }

    /// Rewrites the config with `enable_runqueue_latency: on`, sends SIGHUP and waits until the
    /// agent says it applied it: its run-queue line ("measured" / "not measured") and then
    /// "configuration reloaded". The config must change the switch (no line otherwise).
    pub fn reload_runqueue(&mut self, on: bool) -> Result<()> {
        fs::write(
            self.dir.join("lxcmon.yaml"),
            config_yaml(&self.cfg, &self.dir, on),
        )
        .context("rewriting the agent config")?;
        // SAFETY: signalling the agent we started (still our child: not reaped, pid not reused).
        if unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGHUP) } != 0 {
            bail!("SIGHUP to the agent: {}", std::io::Error::last_os_error());
        }
        let want = if on {
            "run-queue wait: measured"
        } else {
            "run-queue wait: not measured"
        };
        let mut seen = false;
        let timeout = Duration::from_secs_f64(self.cfg.interval * 3.0 + 30.0);
        loop {
            let line = self.next_line(timeout, "configuration reloaded")?;
            if line.contains("configuration reload rejected") {
                bail!("the agent rejected the reload: {}", strip_ansi(line.trim()));
            }
            seen |= line.contains(want);
            if line.contains("configuration reloaded") {
                if !seen {
                    bail!("the agent reloaded without `{want}` in its log");
                }
                return Ok(());
            }
        }
    }

    /// The agent's next log line, waiting up to `timeout` for it (`what` names what the wait
    /// is for, in the error).
    fn next_line(&mut self, timeout: Duration, what: &str) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(nl) = self.pending.find('\n') {
                return Ok(self.pending.drain(..=nl).collect());
            }
            let mut chunk = String::new();
            self.log
                .read_to_string(&mut chunk)
                .context("reading the agent log")?;
            if chunk.is_empty() {
                if super::interrupted() {
                    bail!("interrupted");
                }
                if let Some(why) = self.exited() {
                    bail!("the agent exited: {why}");
                }
                if Instant::now() > deadline {
                    bail!("no `{what}` line from the agent in {timeout:?}");
                }
                // Reading at EOF leaves the position where it was: poll again.
                std::thread::sleep(Duration::from_millis(1));
            } else {
                self.pending.push_str(&chunk);
            }
        }
    }

    /// Whether the agent has exited (it refuses a config, for example), with its stderr tail.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let err = fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                let err = strip_ansi(&err);
                let tail: Vec<&str> = err.lines().rev().take(2).collect();
                Some(format!(
                    "{status}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                ))
            }
            _ => None,
        }
    }

    /// Waits for the next `cycle` debug line; returns (duration_us, found).
    pub fn next_cycle(&mut self, timeout: Duration) -> Result<(u64, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_line(left, "cycle")?;
            if line.contains(" cycle ") || line.trim_end().ends_with(" cycle") {
                // duration_us: the agent's own wall time of the cycle (0 when an older
                // agent does not log it).
                if let Some(f) = field::<usize>(&line, "found=") {
                    return Ok((field::<u64>(&line, "duration_us=").unwrap_or(0), f));
                }
            }
        }
    }

    /// Skips `warm` cycles, then observes `k` cycles.
    pub fn observe(&mut self, warm: usize, k: usize, interval: f64) -> Result<RunStats> {
        self.observe_with(warm, k, interval, || Ok(()))
    }

    /// As [`Self::observe`], calling `between` after each observed cycle (while the agent
    /// waits for its next one).
    pub fn observe_with(
        &mut self,
        warm: usize,
        k: usize,
        interval: f64,
        mut between: impl FnMut() -> Result<()>,
    ) -> Result<RunStats> {
        let timeout = Duration::from_secs_f64(interval * 3.0 + 30.0);
        for _ in 0..warm {
            self.next_cycle(timeout)?;
        }
        let t0 = Instant::now();
        let stat0 = stat_cpu(self.pid)?;
        let mut last = schedstat_ns(self.pid);
        let mut stats = RunStats::default();
        for _ in 0..k {
            let (wall_us, found) = self.next_cycle(timeout)?;
            let now = schedstat_ns(self.pid);
            stats.cycles.push(CycleObs {
                cpu_ns: now.saturating_sub(last),
                wall_us,
                found,
            });
            last = now;
            // The agent's CPU while this runs (its export, a late thread) counts in its next
            // cycle's figure, as without it.
            between()?;
        }
        stats.stat_cpu_s = stat_cpu(self.pid)? - stat0;
        stats.window_s = t0.elapsed().as_secs_f64();
        stats.rss_kib = status_kib(self.pid, "VmRSS:");
        stats.hwm_kib = status_kib(self.pid, "VmHWM:");
        stats.lean = fs::read_to_string(self.dir.join("lxcmon.log"))
            .is_ok_and(|log| log.contains("descriptors short"));
        Ok(stats)
    }

    /// `strace -c -f` attached for `k` cycles: calls per syscall over those cycles.
    pub fn strace(&mut self, k: usize, interval: f64) -> Result<(Vec<(String, u64)>, String)> {
        let timeout = Duration::from_secs_f64(interval * 3.0 + 30.0);
        self.next_cycle(timeout)?;
        let out = self.dir.join("strace.txt");
        let mut st = Command::new("strace")
            .args(["-c", "-f", "-q", "-o"])
            .arg(&out)
            .arg("-p")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting strace (apt-get install strace)")?;
        // Attach, then count exactly k whole cycles: from just after one cycle line to just
        // after the k-th next one (plus the export write that follows it).
        std::thread::sleep(Duration::from_millis(200).min(Duration::from_secs_f64(interval / 4.0)));
        for _ in 0..k {
            self.next_cycle(timeout)?;
        }
        std::thread::sleep(Duration::from_secs_f64((interval / 4.0).min(0.2)));
        // SAFETY: signalling the strace we started.
        unsafe {
            libc::kill(st.id() as libc::pid_t, libc::SIGINT);
        }
        st.wait().context("waiting for strace")?;
        let text = fs::read_to_string(&out).context("reading the strace summary")?;
        let mut calls = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            if f.len() >= 5 && f[0].parse::<f64>().is_ok() {
                let name = f[f.len() - 1];
                if name == "total" {
                    continue;
                }
                if let Ok(n) = f[3].parse::<u64>() {
                    calls.push((name.to_string(), n));
                }
            }
        }
        if calls.is_empty() {
            bail!("strace counted nothing: {}", text.trim());
        }
        calls.sort_by_key(|c| std::cmp::Reverse(c.1));
        Ok((calls, text))
    }

    pub fn stop(mut self) -> Result<()> {
        // SAFETY: signalling the agent we started.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The floor: the files a collector reads per container every cycle, held open here and
/// read with one pread each (fstatvfs for the root), in a tight loop over the fleet. Every
/// other per-container file (limits, read every 5 s; memsw) is timed too, for the per-file list.
pub struct Floor {
    files: Vec<(&'static str, File)>,
    roots: Vec<File>,
    per_cycle: Vec<&'static str>,
}

/// What the agent reads per container every cycle on this (hybrid) host (limits are re-read
/// every 5 s); `signals`: the figures beyond the seed's are on.
fn per_cycle_files(collector: &str, signals: bool) -> Vec<&'static str> {
    let mut v = vec![
        "cpuacct.usage",
        "memory.usage_in_bytes",
        "memory.stat",
        "pids.current",
        "cgroup.procs",
        SUB_PROCS,
    ];
    // Block I/O and net/dev: for the totals under the file readers, and for the per-device
    // and per-interface figures under either collector.
    if collector != "ebpf" || signals {
        v.extend([
            "blkio.throttle.io_service_bytes_recursive",
            "/proc/<init>/net/dev",
        ]);
    }
    if signals {
        v.extend([
            "cpu.stat",
            "memory.oom_control",
            "memory.failcnt",
            "memory.memsw.failcnt",
            "memory.kmem.usage_in_bytes",
            "blkio.throttle.io_serviced_recursive",
            "cpu.pressure",
            "memory.pressure",
            "io.pressure",
        ]);
    }
    v
}

const SUB_PROCS: &str = "cgroup.procs (nested)";
/// How many containers' other files (read only for the per-file list) the floor holds: at
/// N = 1000 the per-cycle files alone take 19000 of this host's hard limit of 20000.
const PER_FILE_SAMPLE: usize = 50;
/// The container's directory in the unified tree (PSI on hybrid hosts).
const UNIFIED: &str = "unified";

pub struct FloorResult {
    /// A tight loop over the fleet: hot caches, the kernel's cost alone.
    pub per_container_us: f64,
    /// One pass over the fleet per interval, as the agent reads: caches as cold as the
    /// agent finds them, between the agent's cycles ([`Floor::pass_us`]).
    pub paced_us: Option<f64>,
    pub syscalls_per_container: f64,
    /// CPU per container per cycle for each kind of file (one pread each; "fstatvfs root").
    pub per_file_us: Vec<(&'static str, f64)>,
}

impl Floor {
    pub fn open(fleet: &Fleet, collector: &str, signals: bool) -> Result<Self> {
        let mut files = Vec::new();
        let mut roots = Vec::new();
        let open = |p: PathBuf| File::open(&p).with_context(|| format!("opening {}", p.display()));
        let per_cycle = per_cycle_files(collector, signals);
        for (i, c) in fleet.containers.iter().enumerate() {
            // The files timed only for the per-file list are held for the first containers
            // alone: all of them for a thousand containers exceed a hard limit of 20000.
            let all = i < PER_FILE_SAMPLE;
            let per: [(&str, &str, bool); 22] = [
                ("cpu", "cpu.stat", false),
                ("memory", "memory.oom_control", false),
                ("memory", "memory.failcnt", false),
                ("memory", "memory.memsw.failcnt", false),
                ("memory", "memory.kmem.usage_in_bytes", false),
                ("blkio", "blkio.throttle.io_serviced_recursive", false),
                (UNIFIED, "cpu.pressure", false),
                (UNIFIED, "memory.pressure", false),
                (UNIFIED, "io.pressure", false),
                ("pids", "pids.max", false),
                ("cpuacct", "cpuacct.usage", false),
                ("memory", "memory.usage_in_bytes", false),
                ("memory", "memory.stat", false),
                ("memory", "memory.memsw.usage_in_bytes", false),
                ("memory", "memory.limit_in_bytes", false),
                ("memory", "memory.memsw.limit_in_bytes", false),
                ("blkio", "blkio.throttle.io_service_bytes_recursive", false),
                ("pids", "pids.current", false),
                ("pids", "cgroup.procs", true),
                ("cpu", "cpu.cfs_quota_us", false),
                ("cpu", "cpu.cfs_period_us", false),
                ("cpuset", "cpuset.effective_cpus", false),
            ];
            for (ctrl, name, procs) in per {
                if !all && !per_cycle.contains(&name) {
                    continue;
                }
                let rel = if procs { &c.procs_rel } else { &c.rel };
                // The processes as the agent reads them: from the unified tree where the
                // container has a cgroup there (hybrid hosts), else from v1.
                let dir = match procs {
                    true => fleet
                        .unified_dir(rel)
                        .filter(|d| d.join(name).exists())
                        .or_else(|| fleet.dir(ctrl, rel)),
                    false if ctrl == UNIFIED => fleet.unified_dir(rel),
                    false => fleet.dir(ctrl, rel),
                };
                if let Some(d) = dir {
                    let p = d.join(name);
                    if p.exists() {
                        files.push((name, open(p)?));
                    }
                    if procs && (all || per_cycle.contains(&SUB_PROCS)) {
                        // The nested sub-cgroup's processes too.
                        files.push((SUB_PROCS, open(d.join("sub").join(name))?));
                    }
                }
            }
            files.push((
                "/proc/<init>/net/dev",
                open(PathBuf::from(format!("/proc/{}/net/dev", c.init)))?,
            ));
            roots.push(
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                    .open(format!("/proc/{}/root", c.init))
                    .context("opening a container root")?,
            );
        }
        Ok(Self {
            files,
            roots,
            per_cycle,
        })
    }

    /// The files read every cycle.
    fn per_cycle(&self) -> Vec<&File> {
        self.files
            .iter()
            .filter(|(k, _)| self.per_cycle.contains(k))
            .map(|(_, f)| f)
            .collect()
    }

    /// One cycle's reads over the whole fleet, as the agent makes them.
    fn pass(&self, per_cycle: &[&File], buf: &mut [u8]) -> Result<()> {
        for f in per_cycle {
            f.read_at(buf, 0).context("floor pread")?;
        }
        for r in &self.roots {
            statvfs_fd(r)?;
        }
        Ok(())
    }

    /// One pass over the fleet's per-cycle files: CPU per container, µs. Made half an
    /// interval after each of the agent's cycles ([`Agent::observe_with`]), so the floor and
    /// the agent are measured in the same minutes (this VM's speed drifts by tens of per cent
    /// between runs minutes apart) and the floor finds the caches as cold as the agent does.
    pub fn pass_us(&self) -> Result<f64> {
        let n = self.roots.len().max(1);
        let mut buf = vec![0u8; 4096];
        let per_cycle = self.per_cycle();
        let t0 = thread_cpu_ns();
        self.pass(&per_cycle, &mut buf)?;
        Ok(thread_cpu_ns().saturating_sub(t0) as f64 / 1e3 / n as f64)
    }

    pub fn run(&self, rounds: usize) -> Result<FloorResult> {
        let n = self.roots.len().max(1);
        let mut buf = vec![0u8; 4096];
        let per_cycle = self.per_cycle();
        let t0 = thread_cpu_ns();
        for _ in 0..rounds {
            self.pass(&per_cycle, &mut buf)?;
        }
        let ns = thread_cpu_ns().saturating_sub(t0);
        // The same, one kind of file at a time.
        let mut kinds: Vec<&'static str> = Vec::new();
        for (k, _) in &self.files {
            if !kinds.contains(k) {
                kinds.push(k);
            }
        }
        let mut per_file_us = Vec::new();
        let per = |ns: u64| ns as f64 / 1e3 / (rounds * n) as f64;
        for kind in kinds {
            let of_kind: Vec<&File> = self
                .files
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, f)| f)
                .collect();
            let t = thread_cpu_ns();
            for _ in 0..rounds {
                for f in &of_kind {
                    f.read_at(&mut buf, 0).context("floor pread")?;
                }
            }
            // Per read: one file of each kind per container (held for some containers only).
            let us = (thread_cpu_ns().saturating_sub(t)) as f64
                / 1e3
                / (rounds * of_kind.len().max(1)) as f64;
            per_file_us.push((kind, us));
        }
        let t = thread_cpu_ns();
        for _ in 0..rounds {
            for r in &self.roots {
                statvfs_fd(r)?;
            }
        }
        per_file_us.push((
            "fstatvfs(/proc/<init>/root)",
            per(thread_cpu_ns().saturating_sub(t)),
        ));
        Ok(FloorResult {
            per_container_us: per(ns),
            paced_us: None,
            syscalls_per_container: (per_cycle.len() + self.roots.len()) as f64 / n as f64,
            per_file_us,
        })
    }
}

fn statvfs_fd(r: &File) -> Result<()> {
    // SAFETY: fstatvfs writes into the zeroed struct we own.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatvfs(r.as_raw_fd(), &mut s) } != 0 {
        bail!("fstatvfs: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes terminal colour sequences (`ESC [ ... m`) from the agent's stderr.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
