//! Issue 12's figures from the running daemon, held to ground truth the test produces on real
//! LXC containers: a busy loop under a half-core quota (throttling, CPU pressure), two busy
//! loops on one CPU (CPU pressure), a process allocating past a 64 MiB limit without swap, twice
//! (OOM kills, limit hits, memory pressure), an ext4 disk of known size and inode count mounted
//! into a container and written to (per mount; the directory-backed root marked shared),
//! bounded transfers and direct I/O (per interface, per device), and the limits the test
//! configured.
//!
//! One daemon per test (`records` every 0.5 s and `/metrics`); every cycle's cumulative figures
//! are held between two readings of the kernel's own counters around it
//! (`lxcmon_testkit::signals::bracket`), and the workload's effect over its window is checked
//! against what the test did. `cargo xtask test` runs the `per_collector_` test once per
//! collector (its figures depend on it), the others once.
//!
//! Needs root, lxc, busybox-static, gcc, e2fsprogs; the tests take turns (the lab's lock).

use anyhow::{bail, ensure, Context, Result};
use lxcmon_testkit::proc::{run_ok, run_timeout};
use lxcmon_testkit::signals::{
    around, bracket, disk_of, growth, metric, statvfs_figures, value, Cycle, Sample, Watch,
};
use lxcmon_testkit::workload::{self, unix_now};
use lxcmon_testkit::{Container, ContainerSpec, Lab};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// The daemon's interval: two cycles a second keep the windows short.
const INTERVAL: f64 = 0.5;
/// The CFS period the lab sets (µs) and the half-core quota of the throttling scenario.
const PERIOD_US: u64 = 100_000;
const HALF_CORE_US: u64 = 50_000;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lxcmon"))
}

fn tmpdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("lxcmon-signals-")
        .tempdir()?)
}

/// Fails with every mismatch listed (and prints how many cycles were checked).
fn bracket_all(w: &Watch, c: &Container, paths: &[String], from: f64) -> Result<()> {
    let (cycles, samples) = (w.cycles(), w.samples());
    let b = bracket(&cycles, &samples, &c.name, paths, from);
    let (n, bad) = (b.checked, b.mismatches);
    eprintln!(
        "{}: {n} of {} cycles checked against the kernel ({} samples, {} exactly: counters \
         still) on {} figures",
        c.name,
        cycles.iter().filter(|c| c.lo >= from).count(),
        samples.iter().filter(|s| s.t_lo >= from).count(),
        b.exact,
        paths.len()
    );
    ensure!(n >= 3, "only {n} cycles of {} could be checked", c.name);
    // A fast counter's bracket is as wide as it moves in ~0.5 s; the quiet phases each test
    // ends with make the check exact.
    ensure!(
        b.exact >= 1,
        "no cycle of {} with all its counters still: no exact check",
        c.name
    );
    ensure!(
        bad.is_empty(),
        "{} mismatches with the kernel in {n} checked cycles of {}:\n  {}",
        bad.len(),
        c.name,
        bad.join("\n  ")
    );
    Ok(())
}

/// The paths the kernel samples of `c` have that start with one of `prefixes`.
fn truth_paths(w: &Watch, c: &Container, prefixes: &[&str]) -> Result<Vec<String>> {
    let s = w.sample_now()?;
    let m = s.values.get(&c.name).context("no kernel sample")?;
    Ok(m.keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .cloned()
        .collect())
}

fn rec<'a>(cycle: &'a Cycle, c: &Container) -> Result<&'a Map<String, Value>> {
    cycle
        .records
        .get(&c.name)
        .with_context(|| format!("cycle {}: no record of {}", cycle.label, c.name))
}

fn kernel(s: &Sample, c: &Container, path: &str) -> Result<f64> {
    s.values
        .get(&c.name)
        .and_then(|m| m.get(path))
        .copied()
        .with_context(|| format!("the kernel sample of {} has no {path}", c.name))
}

/// A `/metrics` series of `c` against the kernel: at least its reading before the daemon's
/// last cycle began, at most its reading after the scrape (the figure was read in between).
fn metric_bracketed(
    w: &Watch,
    c: &Container,
    series: &str,
    labels: &[(&str, &str)],
    path: &str,
) -> Result<()> {
    let (_, body, after) = w.scrape()?;
    let cycle_ts = metric(&body, "lxcmon_last_cycle_timestamp_seconds", &[])
        .context("/metrics: no lxcmon_last_cycle_timestamp_seconds")?;
    let mut all = vec![("container_id", c.name.as_str())];
    all.extend_from_slice(labels);
    let got = metric(&body, series, &all)
        .with_context(|| format!("/metrics: no {series}{all:?} in\n{}", grep(&body, &c.name)))?;
    let samples = w.samples();
    let (before, _) = around(&samples, cycle_ts, cycle_ts);
    let lo = kernel(
        before.context("no kernel sample before the cycle")?,
        c,
        path,
    )?;
    let hi = kernel(&after, c, path)?;
    let eps = if series.contains("seconds") {
        1e-6
    } else {
        0.0
    };
    eprintln!("/metrics {series}{all:?} = {got} (kernel {lo} ..= {hi})");
    ensure!(
        got >= lo - eps && got <= hi + eps,
        "/metrics {series}{all:?} = {got}, the kernel had {lo} before the cycle and {hi} after"
    );
    Ok(())
}

/// A `/metrics` series of `c` with a known value.
fn metric_is(
    body: &str,
    c: &Container,
    series: &str,
    labels: &[(&str, &str)],
    want: f64,
) -> Result<()> {
    let mut all = vec![("container_id", c.name.as_str())];
    all.extend_from_slice(labels);
    let got = metric(body, series, &all)
        .with_context(|| format!("/metrics: no {series}{all:?} in\n{}", grep(body, &c.name)))?;
    ensure!(
        (got - want).abs() <= want.abs() * 1e-9,
        "/metrics {series}{all:?} = {got}, want {want}"
    );
    Ok(())
}

/// The lines of a `/metrics` body about one container (for failure messages).
fn grep(body: &str, name: &str) -> String {
    body.lines()
        .filter(|l| l.contains(&format!("\"{name}\"")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `limits.<key>` of a record: the value the test configured, or absent where it set none.
fn limit_is(r: &Map<String, Value>, name: &str, key: &str, want: Option<u64>) -> Result<()> {
    let got = r.get("limits").and_then(|l| l.get(key));
    match (want, got) {
        (Some(w), Some(v)) => ensure!(
            v.as_u64() == Some(w),
            "{name}: limits.{key} = {v}, configured {w}"
        ),
        (Some(w), None) => bail!("{name}: limits.{key} absent, configured {w} (record: {r:?})"),
        (None, Some(v)) => bail!("{name}: limits.{key} = {v}, but the test set no such limit"),
        (None, None) => {}
    }
    Ok(())
}

/// CPU: a single busy loop under a 0.5-core CFS quota (50 ms per 100 ms), and two busy loops in
/// a container whose cpuset is one CPU, side by side for one window.
///
/// The kernel's truth for the quota: the loop is runnable through every period, so
/// `nr_periods` grows by one per 100 ms of wall time, and it exhausts its 50 ms in each of them,
/// so (nearly) EVERY period is throttled (measured here: 40 of 40 in 4 s; the issue's "half the
/// periods" is the share of TIME, not of periods); it is held back for the rest of each period,
/// so throttled time grows by about half the wall time (at most 50 ms per period; measured
/// 0.43 at the default CPU weight while others built, 0.46-0.50 in this test, which gives the
/// container the lab's high weight). A
/// throttled task counts as stalled on CPU: `cpu.pressure` grows with the throttled time
/// (measured: some = full ≈ throttled time).
///
/// Two loops on one CPU: at every moment one of them is runnable and not running, so CPU
/// pressure `some` grows at the rate of the wall clock (PSI's `some` is the time at least one
/// task waits, not the share of tasks waiting: each loop waits half the time, the cgroup has a
/// waiter all the time; measured 4.006 s in 4.008 s).
///
/// Tolerances: the window is taken between two exported cycles, whose reads happen within
/// `RECORDS_READ_GUARD` (0.25 s) after their timestamps, so the wall time is known to ±0.25 s
/// of ~6 s (±4 %), plus one period at either end; a loaded host (other builds on 2 CPUs) can
/// take CPU from the quota loop (less throttled time, hence 0.3 at the low end).
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn cpu_throttling_and_pressure() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let q = lab.container(
        "sg-q",
        &ContainerSpec {
            cpu_quota_us: Some(HALF_CORE_US),
            pids_max: Some(64),
            memory_limit_mib: Some(256),
            no_swap: true,
            ..Default::default()
        },
    )?;
    let last_cpu = last_online_cpu()?;
    let s = lab.container(
        "sg-s",
        &ContainerSpec {
            cpuset: Some(last_cpu.to_string()),
            ..Default::default()
        },
    )?;
    let mut w = Watch::start(bin(), dir.path(), INTERVAL, &[&q, &s], |_| {})?;
    let start = unix_now();
    let q_loop = workload::busy_loop(&q)?;
    let s_loops = [workload::busy_loop(&s)?, workload::busy_loop(&s)?];
    // One cycle into the steady regime, then the window.
    w.next_cycle()?;
    let first = w.next_cycle()?;
    std::thread::sleep(Duration::from_secs(6));
    let last = w.next_cycle()?;
    workload::kill_and_wait(&[q_loop])?;
    workload::kill_and_wait(&s_loops)?;
    // A quiet phase: throttling and pressure stand still, so their bracket is one value.
    for _ in 0..3 {
        w.next_cycle()?;
    }

    let q_paths = truth_paths(&w, &q, &["pressure.", "cpu_throttling."])?;
    let s_paths = truth_paths(&w, &s, &["pressure."])?;
    let checked = (|| -> Result<()> {
        let dt = last.lo - first.lo;
        show_kernel_window(&w, &[&q, &s], first.lo, last.lo, &q_paths);
        let periods = dt / (PERIOD_US as f64 / 1e6);
        let g = |c: &Container, p: &str| growth(&first, &last, &c.name, p);
        let (dp, dtp, dts) = (
            g(&q, "cpu_throttling.periods")?,
            g(&q, "cpu_throttling.throttled_periods")?,
            g(&q, "cpu_throttling.throttled_seconds")?,
        );
        let (q_some, s_some) = (
            g(&q, "pressure.cpu_some_seconds")?,
            g(&s, "pressure.cpu_some_seconds")?,
        );
        eprintln!(
            "window {dt:.2} s = {periods:.1} periods: periods +{dp}, throttled +{dtp} periods \
             and +{dts:.3} s ({:.2} of the window), cpu some +{q_some:.3} s; two loops on one \
             CPU: cpu some +{s_some:.3} s ({:.2} of the window)",
            dts / dt,
            s_some / dt
        );
        let slack = 0.25 / dt;
        ensure!(
            dp >= periods * (1.0 - slack) - 1.0 && dp <= periods * (1.0 + slack) + 1.0,
            "periods grew by {dp} in {dt:.2} s, want {periods:.1} (one per 100 ms)"
        );
        ensure!(
            dtp >= 0.9 * dp && dtp <= dp,
            "throttled periods grew by {dtp} of {dp} periods: a busy loop under a 0.5-core \
             quota is throttled in (nearly) every period"
        );
        ensure!(
            dts >= 0.3 * dt && dts <= (0.5 + slack) * dt + 0.05,
            "throttled time grew by {dts:.3} s in {dt:.2} s, want about half (0.3 ..= 0.5)"
        );
        ensure!(
            q_some >= 0.1 * dt,
            "CPU pressure of the throttled container grew by {q_some:.3} s in {dt:.2} s"
        );
        ensure!(
            s_some >= (1.0 - slack - 0.1) * dt && s_some <= (1.0 + slack) * dt,
            "CPU pressure `some` of two loops on one CPU grew by {s_some:.3} s in {dt:.2} s, \
             want the whole window"
        );
        bracket_all(&w, &q, &q_paths, start)?;
        bracket_all(&w, &s, &s_paths, start)?;

        // Limits as configured; none where the test set none.
        let r = rec(&last, &q)?;
        limit_is(r, &q.name, "cpu_quota_us", Some(HALF_CORE_US))?;
        limit_is(r, &q.name, "cpu_period_us", Some(PERIOD_US))?;
        limit_is(r, &q.name, "pids_max", Some(64))?;
        limit_is(r, &q.name, "memory_max_bytes", Some(256 * MIB))?;
        limit_is(r, &q.name, "swap_max_bytes", Some(0))?;
        let r = rec(&last, &s)?;
        for key in [
            "cpu_quota_us",
            "pids_max",
            "memory_max_bytes",
            "swap_max_bytes",
        ] {
            limit_is(r, &s.name, key, None)?;
        }

        // /metrics: the same figures.
        metric_bracketed(
            &w,
            &q,
            "lxcmon_container_cpu_cfs_throttled_periods_total",
            &[],
            "cpu_throttling.throttled_periods",
        )?;
        metric_bracketed(
            &w,
            &q,
            "lxcmon_container_cpu_cfs_throttled_seconds_total",
            &[],
            "cpu_throttling.throttled_seconds",
        )?;
        metric_bracketed(
            &w,
            &s,
            "lxcmon_container_pressure_cpu_waiting_seconds_total",
            &[],
            "pressure.cpu_some_seconds",
        )?;
        let (_, body, _) = w.scrape()?;
        metric_is(
            &body,
            &q,
            "lxcmon_container_cpu_cfs_quota_seconds",
            &[],
            0.05,
        )?;
        metric_is(
            &body,
            &q,
            "lxcmon_container_cpu_cfs_period_seconds",
            &[],
            0.1,
        )?;
        metric_is(&body, &q, "lxcmon_container_pids_limit", &[], 64.0)?;
        Ok(())
    })();
    w.finish()?;
    checked
}

/// The kernel's own growth of `paths` between the samples nearest `t0` and `t1` (for the log:
/// what the export is compared with, should a check fail).
fn show_kernel_window(w: &Watch, cs: &[&Container], t0: f64, t1: f64, paths: &[String]) {
    let samples = w.samples();
    let (Some(a), Some(b)) = (around(&samples, t0, t0).0, around(&samples, t1, t1).0) else {
        return;
    };
    for c in cs {
        for p in paths {
            if let (Ok(x), Ok(y)) = (kernel(a, c, p), kernel(b, c, p)) {
                eprintln!(
                    "kernel {}: {p} +{:.3} in {:.2} s",
                    c.name,
                    y - x,
                    b.t_lo - a.t_lo
                );
            }
        }
    }
}

/// Whether the host has any swap (`/proc/swaps` lists a device or file).
fn host_has_swap() -> Result<bool> {
    Ok(std::fs::read_to_string("/proc/swaps")?.lines().count() > 1)
}

fn last_online_cpu() -> Result<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let last = text
        .trim()
        .rsplit([',', '-'])
        .next()
        .context("/sys/devices/system/cpu/online")?;
    Ok(last.parse()?)
}

/// Memory: a process allocating 128 MiB in a container limited to 64 MiB without swap, run
/// twice in the foreground.
///
/// "Without swap": where the host has swap, the memory+swap limit is set to the memory limit
/// (v2: `memory.swap.max` 0). A host without swap (this one) gets no memsw limit: on cgroup v1
/// the kernel (6.18 here) checks the memsw counter first and, when the two limits are equal, the
/// charge fails there, so `memory.failcnt` never counts the hit (and `memory.memsw.failcnt`
/// stays 0 as well: measured, two OOM kills with both at 0; without the memsw limit
/// `memory.failcnt` counted 75 and 139 hits). Limit hits would then not be observable on v1. The shell reports each one killed by
/// SIGKILL (exit 137), which the test did not send: the OOM killer did. Each kill must raise
/// `memory_events.oom_kill` by exactly one (the kernel's own counter too: otherwise the premise
/// of the test is off), limit hits (`max`; v1 `memory.failcnt`) must grow with each, and memory
/// pressure must grow (the allocation stalls in reclaim before the kill). Every cycle's memory
/// events and pressure are held between the kernel's readings around it.
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn oom_kills_limit_hits_and_memory_pressure() -> Result<()> {
    let dir = tmpdir()?;
    let host_swap = host_has_swap()?;
    let mut lab = Lab::new()?;
    let m = lab.container(
        "sg-m",
        &ContainerSpec {
            memory_limit_mib: Some(64),
            no_swap: host_swap,
            pids_max: Some(64),
            ..Default::default()
        },
    )?;
    let mut w = Watch::start(bin(), dir.path(), INTERVAL, &[&m], |_| {})?;
    let start = unix_now();
    let base = w.next_cycle()?;
    let k_base = w.sample_now()?;
    let oom0 = kernel(&k_base, &m, "memory_events.oom_kill")?;
    let mut kill_cycles = Vec::new();
    let mut harness = Vec::new();
    for kill in 1..=2 {
        let before = w.next_cycle()?;
        let out = m.sh("/bin/lxcmon-memhog 128 /lxcmon-never-ready; echo \"exit=$?\"")?;
        ensure!(
            out.contains("exit=137"),
            "the 128 MiB allocation in a 64 MiB container was not SIGKILLed: {out:?}"
        );
        let k = w.sample_now()?;
        let oom = kernel(&k, &m, "memory_events.oom_kill")?;
        if oom != oom0 + f64::from(kill) {
            harness.push(format!(
                "after kill {kill} the kernel counts {oom} OOM kills, {} before the first",
                oom0
            ));
        }
        let want = oom0 + f64::from(kill);
        let t = unix_now();
        let after = w
            .wait_cycle(Duration::from_secs(10), |c| {
                c.lo > t
                    && c.records
                        .get(&m.name)
                        .and_then(|r| value(r, "memory_events.oom_kill"))
                        == Some(want)
            })
            .with_context(|| format!("no cycle exports {want} OOM kills after kill {kill}"))?;
        kill_cycles.push((before, after));
    }
    // A quiet phase: the counters must stand still.
    w.next_cycle()?;
    let end = w.next_cycle()?;
    let paths = truth_paths(&w, &m, &["pressure.", "memory_events."])?;

    let checked = (|| -> Result<()> {
        ensure!(harness.is_empty(), "harness: {}", harness.join("; "));
        for (i, (b, a)) in kill_cycles.iter().enumerate() {
            let kills = growth(b, a, &m.name, "memory_events.oom_kill")?;
            let hits = growth(b, a, &m.name, "memory_events.max")?;
            eprintln!("kill {}: oom_kill +{kills}, max +{hits}", i + 1);
            ensure!(
                kills == 1.0,
                "kill {}: oom_kill grew by {kills}, not 1",
                i + 1
            );
            ensure!(hits >= 1.0, "kill {}: limit hits did not grow", i + 1);
        }
        let total = growth(&base, &end, &m.name, "memory_events.oom_kill")?;
        ensure!(total == 2.0, "two kills, oom_kill grew by {total}");
        let stall = growth(&base, &end, &m.name, "pressure.memory_some_seconds")?;
        let k_end = w.sample_now()?;
        let k_stall = kernel(&k_end, &m, "pressure.memory_some_seconds")?
            - kernel(&k_base, &m, "pressure.memory_some_seconds")?;
        eprintln!("memory pressure some: +{stall:.6} s exported, +{k_stall:.6} s in the kernel");
        ensure!(
            stall > 0.0,
            "memory pressure did not grow over two OOM kills"
        );
        bracket_all(&w, &m, &paths, start)?;

        let r = rec(&end, &m)?;
        limit_is(r, &m.name, "memory_max_bytes", Some(64 * MIB))?;
        limit_is(r, &m.name, "swap_max_bytes", host_swap.then_some(0))?;
        limit_is(r, &m.name, "pids_max", Some(64))?;
        limit_is(r, &m.name, "cpu_quota_us", None)?;

        let (_, body, _) = w.scrape()?;
        metric_is(
            &body,
            &m,
            "lxcmon_container_oom_kills_total",
            &[],
            oom0 + 2.0,
        )?;
        metric_bracketed(
            &w,
            &m,
            "lxcmon_container_memory_events_total",
            &[("event", "max")],
            "memory_events.max",
        )?;
        metric_bracketed(
            &w,
            &m,
            "lxcmon_container_pressure_memory_waiting_seconds_total",
            &[],
            "pressure.memory_some_seconds",
        )?;
        Ok(())
    })();
    w.finish()?;
    checked
}

/// An ext4 image of known size and inode count, loop-mounted on the host only until the
/// container has its own bind of it (`lxc.mount.entry`), then unmounted on the host: the
/// filesystem is the container's alone. `mount -o loop` sets autoclear, so the loop device
/// goes with the container's last reference.
struct LoopDisk {
    host_mnt: PathBuf,
    mounted: bool,
}

/// Inodes the test asks mkfs for (`-N`), and the image size.
const DISK_INODES: u64 = 2048;
const DISK_MIB: u64 = 64;

impl LoopDisk {
    fn create(dir: &Path) -> Result<Self> {
        let img = dir.join("disk.img");
        std::fs::File::create(&img)?.set_len(DISK_MIB * MIB)?;
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-N", &DISK_INODES.to_string()])
                .arg(&img),
            Duration::from_secs(60),
        )
        .context("mkfs.ext4 (e2fsprogs)")?;
        let host_mnt = dir.join("mnt");
        std::fs::create_dir(&host_mnt)?;
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&host_mnt),
            Duration::from_secs(30),
        )?;
        Ok(Self {
            host_mnt,
            mounted: true,
        })
    }

    fn unmount_on_host(&mut self) -> Result<()> {
        run_ok(
            Command::new("umount").arg(&self.host_mnt),
            Duration::from_secs(30),
        )?;
        self.mounted = false;
        Ok(())
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run_timeout(
                Command::new("umount").arg(&self.host_mnt),
                Duration::from_secs(30),
            );
        }
    }
}

/// Filesystem types the per-mount figures leave out (the issue: not `/proc`, `/sys`, tmpfs or
/// the host's pseudo-filesystems).
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "fusectl",
    "configfs",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "ramfs",
    "nsfs",
];

/// Per mount: an ext4 disk of 64 MiB with 2048 inodes at `/mnt/data` in the container, and its
/// directory-backed root. The disk's size, use, availability and inodes match `statvfs` of it
/// as the container sees it (and its inode count is the test's own); writing an 8 MiB file
/// (synced) raises its use by 8 MiB (plus at most 16 blocks of metadata) and takes exactly one
/// inode, which the daemon reports (mount usage may be read less often than every cycle: it
/// must show within 20 s). The root lies on the host's own filesystem: `shared: true`, with the
/// size of the host's filesystem. No pseudo-filesystem is listed.
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn mounts_of_a_loop_disk_and_the_shared_root() -> Result<()> {
    let dir = tmpdir()?;
    let mut disk = LoopDisk::create(dir.path())?;
    let mut lab = Lab::new()?;
    let d = lab.container(
        "sg-d",
        &ContainerSpec {
            extra_config: vec![format!(
                "lxc.mount.entry = {} mnt/data none bind,create=dir 0 0",
                disk.host_mnt.display()
            )],
            ..Default::default()
        },
    )?;
    disk.unmount_on_host()?;
    let pid = d.init_pid()?;
    let in_ct = PathBuf::from(format!("/proc/{pid}/root/mnt/data"));
    let truth0 = statvfs_figures(&in_ct)?;
    ensure!(
        truth0["inodes"] == DISK_INODES as f64,
        "harness: mkfs -N {DISK_INODES} made {} inodes",
        truth0["inodes"]
    );
    let size_max = (DISK_MIB * MIB) as f64;
    ensure!(
        truth0["size_bytes"] <= size_max && truth0["size_bytes"] >= 0.85 * size_max,
        "harness: a {DISK_MIB} MiB ext4 has {} bytes",
        truth0["size_bytes"]
    );
    let root_truth = statvfs_figures(d.rootfs())?;

    let mut w = Watch::start(bin(), dir.path(), INTERVAL, &[&d], |_| {})?;
    let result = (|| -> Result<()> {
        let data = "mounts[/mnt/data]";
        let t = unix_now();
        let c0 = w
            .wait_cycle(Duration::from_secs(20), |c| {
                c.lo > t
                    && c.records
                        .get(&d.name)
                        .and_then(|r| value(r, &format!("{data}.size_bytes")))
                        .is_some()
            })
            .with_context(|| {
                format!(
                    "no cycle reports /mnt/data; last record: {:?}",
                    w.cycles()
                        .last()
                        .and_then(|c| c.records.get(&d.name).cloned())
                )
            })?;
        let r = rec(&c0, &d)?;
        let mounts = r
            .get("mounts")
            .and_then(Value::as_array)
            .context("no mounts array")?;
        for mnt in mounts {
            let fstype = mnt.get("fstype").and_then(Value::as_str).unwrap_or("");
            let mp = mnt.get("mountpoint").and_then(Value::as_str).unwrap_or("");
            ensure!(
                !PSEUDO_FS.contains(&fstype)
                    && !["/proc", "/sys", "/dev"]
                        .iter()
                        .any(|p| mp == *p || mp.starts_with(&format!("{p}/"))),
                "a pseudo-filesystem in the mounts of {}: {mnt}",
                d.name
            );
        }
        let entry = |r: &Map<String, Value>, mp: &str| -> Result<Map<String, Value>> {
            r.get("mounts")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|m| m.get("mountpoint").and_then(Value::as_str) == Some(mp))
                })
                .and_then(Value::as_object)
                .cloned()
                .with_context(|| format!("no mount {mp} in {r:?}"))
        };
        let e = entry(r, "/mnt/data")?;
        ensure!(
            e.get("fstype").and_then(Value::as_str) == Some("ext4"),
            "/mnt/data: {e:?}"
        );
        ensure!(
            e.get("source")
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with("/dev/loop")),
            "/mnt/data source: {e:?}"
        );
        ensure!(
            e.get("shared").and_then(Value::as_bool) == Some(false),
            "/mnt/data is the container's own disk, exported as {e:?}"
        );
        for (k, v) in &truth0 {
            let got = value(r, &format!("{data}.{k}"));
            ensure!(
                got == Some(*v),
                "/mnt/data {k}: exported {got:?}, statvfs {v}"
            );
        }
        let root = entry(r, "/")?;
        ensure!(
            root.get("shared").and_then(Value::as_bool) == Some(true),
            "the directory-backed root is on the host's filesystem, exported as {root:?}"
        );
        for k in ["size_bytes", "inodes"] {
            let got = value(r, &format!("mounts[/].{k}"));
            ensure!(
                got == Some(root_truth[k]),
                "/ {k}: exported {got:?}, statvfs of the host's filesystem {}",
                root_truth[k]
            );
        }

        // Write 8 MiB and sync; the test knows the new use.
        d.sh("dd if=/dev/zero of=/mnt/data/blob bs=1M count=8 2>/dev/null && sync")?;
        let truth1 = statvfs_figures(&in_ct)?;
        let grew = truth1["used_bytes"] - truth0["used_bytes"];
        ensure!(
            grew >= (8 * MIB) as f64 && grew <= (8 * MIB + 16 * 4096) as f64,
            "harness: 8 MiB written, used grew by {grew}"
        );
        ensure!(
            truth1["inodes_free"] == truth0["inodes_free"] - 1.0,
            "harness: one file created, free inodes {} -> {}",
            truth0["inodes_free"],
            truth1["inodes_free"]
        );
        let t = unix_now();
        let shown = w
            .wait_cycle(Duration::from_secs(20), |c| {
                c.lo > t
                    && c.records.get(&d.name).is_some_and(|r| {
                        value(r, &format!("{data}.used_bytes")) == Some(truth1["used_bytes"])
                            && value(r, &format!("{data}.inodes_free"))
                                == Some(truth1["inodes_free"])
                    })
            })
            .context("the daemon did not report the 8 MiB written and the inode taken")?;
        eprintln!(
            "/mnt/data: +{grew} bytes used and one inode shown {:.1} s after the write",
            shown.lo - t
        );
        // From then on every cycle has exactly the new figures (nothing else writes there).
        w.next_cycle()?;
        for c in w.cycles().iter().filter(|c| c.lo >= shown.lo) {
            let r = rec(c, &d)?;
            for (k, v) in &truth1 {
                let got = value(r, &format!("{data}.{k}"));
                ensure!(
                    got == Some(*v),
                    "cycle {}: /mnt/data {k} = {got:?}, statvfs {v}",
                    c.label
                );
            }
        }
        let (_, body, _) = w.scrape()?;
        let labels = [("mountpoint", "/mnt/data"), ("shared", "false")];
        metric_is(
            &body,
            &d,
            "lxcmon_container_mount_size_bytes",
            &labels,
            truth1["size_bytes"],
        )?;
        metric_is(
            &body,
            &d,
            "lxcmon_container_mount_used_bytes",
            &labels,
            truth1["used_bytes"],
        )?;
        metric_is(
            &body,
            &d,
            "lxcmon_container_mount_files",
            &labels,
            DISK_INODES as f64,
        )?;
        metric_is(
            &body,
            &d,
            "lxcmon_container_mount_files_free",
            &labels,
            truth1["inodes_free"],
        )?;
        metric_is(
            &body,
            &d,
            "lxcmon_container_mount_size_bytes",
            &[("mountpoint", "/"), ("shared", "true")],
            root_truth["size_bytes"],
        )?;
        Ok(())
    })();
    w.finish()?;
    result
}

/// Per interface and per device, under the suite's collector (`cargo xtask test` runs this once
/// per collector): 4 MiB from the host into the container and 4 MiB back over the lab's bridge,
/// then 16 MiB written and read with O_DIRECT on the container's root. Every cycle's counters
/// of `eth0` (bytes, packets, errors, drops each way) and of the container's disk (bytes and
/// operations each way) lie between the kernel's readings around it: the container's own
/// `/proc/net/dev` and the cgroup's `blkio.throttle.io_service_bytes_recursive` /
/// `io_serviced_recursive` (v2 `io.stat`); in the quiet phases that is one exact value. Over
/// the run the interface grew by at least the payload and by at most 5 % more (headers at MTU
/// 9000, the handshakes), the disk by the 16 MiB each way (at most 1 MiB more), in at least 16
/// operations each.
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test, once per collector"]
fn per_collector_interfaces_and_devices() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let n = lab.container("sg-n", &ContainerSpec::default())?;
    let (_, disk) = disk_of(n.rootfs())?;
    let mut w = Watch::start(bin(), dir.path(), INTERVAL, &[&n], |_| {})?;
    let start = unix_now();
    w.next_cycle()?;
    let first = w.next_cycle()?;
    let rx = n.transfer_host_to_container(4 * MIB, 5311)?;
    let tx = n.transfer_container_to_host(4 * MIB, 5312)?;
    let written = n.dd_write_direct("/lxcmon-signals-io", 16)?;
    let read = n.dd_read_direct("/lxcmon-signals-io")?;
    // A quiet phase: the counters stand still, the bracket is one value.
    for _ in 0..3 {
        w.next_cycle()?;
    }
    let last = w.next_cycle()?;
    let all = truth_paths(&w, &n, &["interfaces[", "devices["])?;
    let result = (|| -> Result<()> {
        // The container's interfaces but `lo`, and its disk (other devices, e.g. loop ones the
        // config excludes, are not the test's).
        let paths: Vec<String> = all
            .iter()
            .filter(|p| p.starts_with("interfaces[") || p.starts_with(&format!("devices[{disk}]")))
            .cloned()
            .collect();
        ensure!(
            paths.iter().any(|p| p == "interfaces[eth0].rx_bytes")
                && paths
                    .iter()
                    .any(|p| p == &format!("devices[{disk}].write_bytes")),
            "harness: the kernel shows no eth0 or no {disk} for {}: {all:?}",
            n.name
        );
        bracket_all(&w, &n, &paths, start)?;
        // The kernel lists a device only from its first I/O in the cgroup on: absent before,
        // in the export and in the kernel alike (the bracket holds the export to the kernel),
        // it counts from 0.
        let g = |p: &str| -> Result<f64> {
            let end = value(rec(&last, &n)?, p)
                .with_context(|| format!("cycle {}: no {p} for {}", last.label, n.name))?;
            Ok(end - value(rec(&first, &n)?, p).unwrap_or(0.0))
        };
        let within = |what: &str, got: f64, truth: u64, slack: f64, extra: f64| -> Result<()> {
            eprintln!("{what}: +{got} for {truth} moved");
            ensure!(
                got >= truth as f64 && got <= truth as f64 * (1.0 + slack) + extra,
                "{what} grew by {got}, the test moved {truth}"
            );
            Ok(())
        };
        within(
            "eth0 rx_bytes",
            g("interfaces[eth0].rx_bytes")?,
            rx,
            0.05,
            65536.0,
        )?;
        within(
            "eth0 tx_bytes",
            g("interfaces[eth0].tx_bytes")?,
            tx,
            0.05,
            65536.0,
        )?;
        // The veth counts a GSO packet once: at most 64 KiB of payload each.
        for (dir, bytes) in [("rx", rx), ("tx", tx)] {
            let pk = g(&format!("interfaces[eth0].{dir}_packets"))?;
            ensure!(
                pk >= (bytes / 65536) as f64,
                "eth0 {dir}_packets grew by {pk} for {bytes} bytes"
            );
        }
        within(
            &format!("{disk} write_bytes"),
            g(&format!("devices[{disk}].write_bytes"))?,
            written,
            0.0,
            MIB as f64,
        )?;
        within(
            &format!("{disk} read_bytes"),
            g(&format!("devices[{disk}].read_bytes"))?,
            read,
            0.0,
            MIB as f64,
        )?;
        for op in ["writes", "reads"] {
            let ops = g(&format!("devices[{disk}].{op}"))?;
            ensure!(ops >= 16.0, "{disk} {op} grew by {ops} for 16 × 1 MiB");
        }
        // The export names only what the container has, counted by the collector asked for.
        let r = rec(&last, &n)?;
        let asked = lxcmon_testkit::agent::test_collector();
        if asked != "auto" {
            let used = r.get("collector").and_then(Value::as_str);
            ensure!(
                used == Some(asked.as_str()),
                "collector {used:?}, {asked} asked for"
            );
        }
        for i in r
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = i.get("name").and_then(Value::as_str).unwrap_or("");
            ensure!(
                paths.contains(&format!("interfaces[{name}].rx_bytes")),
                "interface {name:?} exported, not in the container's /proc/net/dev (or lo)"
            );
        }
        for dv in r
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = dv.get("name").and_then(Value::as_str).unwrap_or("");
            ensure!(
                !name.starts_with("loop") && !name.starts_with("dm-"),
                "device {name} exported though excluded_devices has it"
            );
        }
        metric_bracketed(
            &w,
            &n,
            "lxcmon_container_interface_receive_bytes_total",
            &[("interface", "eth0")],
            "interfaces[eth0].rx_bytes",
        )?;
        metric_bracketed(
            &w,
            &n,
            "lxcmon_container_interface_transmit_packets_total",
            &[("interface", "eth0")],
            "interfaces[eth0].tx_packets",
        )?;
        metric_bracketed(
            &w,
            &n,
            "lxcmon_container_device_written_bytes_total",
            &[("device", &disk)],
            &format!("devices[{disk}].write_bytes"),
        )?;
        metric_bracketed(
            &w,
            &n,
            "lxcmon_container_device_reads_total",
            &[("device", &disk)],
            &format!("devices[{disk}].reads"),
        )?;
        Ok(())
    })();
    w.finish()?;
    result
}
