//! lxcmon against real LXC containers on this host.
//!
//! Each test creates its own busybox containers (lxcmon-testkit), runs `lxcmon --once` before
//! and after a workload whose size the test itself knows (bytes written with O_DIRECT, bytes
//! sent over the bridge, processes started, memory held, a busy loop), and compares the
//! agent's deltas with it. The other container of the pair must not move. Both export formats
//! are checked field by field against shared/spec/export-formats.md, the autoscale_ml one also
//! by tests/contract/autoscale_ml_check.py (the autoscaler's pandas reader). The daemon test
//! runs lxcmon as a service, stops a container under it, and SIGTERMs it.
//!
//! The tests take turns (the lab holds a machine-wide lock) and need root, lxc,
//! busybox-static, gcc and python3-pandas: `cargo xtask test` installs those and runs them
//! with `--ignored`.

use anyhow::{bail, ensure, Context, Result};
use chrono::{Local, Utc};
use lxcmon_testkit::agent::{run_once, AgentConfig, Daemon};
use lxcmon_testkit::contract::{
    check_autoscale_ml, check_records, get_f64, get_str, get_u64, AmlCycle, RecordsCycle,
};
use lxcmon_testkit::lab::Site;
use lxcmon_testkit::proc::{poll, run_timeout};
use lxcmon_testkit::{ct, workload, Container, ContainerSpec, Lab};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lxcmon"))
}

fn checker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/contract/autoscale_ml_check.py")
}

/// One `--once` cycle in `records`, checked against the contract.
fn once_records(dir: &Path) -> Result<RecordsCycle> {
    let (v, stderr) = run_once(bin(), &AgentConfig::new(dir, "records"))?;
    let mut cycles = check_records(&v).with_context(|| format!("records output: {v:#}"))?;
    ensure!(
        cycles.len() == 1,
        "--once printed {} cycles (timestamps), not one: {v:#}\nstderr: {stderr}",
        cycles.len()
    );
    cycles.pop().context("no cycle")
}

/// One `--once` cycle in `autoscale_ml`, checked against the contract; also saved to
/// `dir/once-autoscale_ml.json` for the Python check.
fn once_aml(dir: &Path) -> Result<AmlCycle> {
    let (v, stderr) = run_once(bin(), &AgentConfig::new(dir, "autoscale_ml"))?;
    std::fs::write(dir.join("once-autoscale_ml.json"), v.to_string())?;
    let mut cycles =
        check_autoscale_ml(&v).with_context(|| format!("autoscale_ml output: {v:#}"))?;
    ensure!(
        cycles.len() == 1,
        "--once printed {} cycles, not one: {v:#}\nstderr: {stderr}",
        cycles.len()
    );
    cycles.pop().context("no cycle")
}

/// The record of container `c` in a cycle, with its identity checked.
fn rec<'a>(cycle: &'a RecordsCycle, c: &Container) -> Result<&'a Map<String, Value>> {
    let r = cycle.get(&c.name).with_context(|| {
        format!(
            "no record for container {} in the cycle: {:#?}",
            c.name, cycle.records
        )
    })?;
    let name = get_str(r, "container_name", &c.name)?;
    ensure!(name == c.name, "container_name {name:?} for id {}", c.name);
    Ok(r)
}

fn aml<'a>(cycle: &'a AmlCycle, c: &Container) -> Result<&'a Map<String, Value>> {
    cycle
        .containers
        .get(&c.name)
        .and_then(Value::as_object)
        .with_context(|| {
            format!(
                "no entry for {} in the cycle: {:#?}",
                c.name, cycle.containers
            )
        })
}

fn u(r: &Map<String, Value>, k: &str) -> Result<u64> {
    get_u64(r, k, "record")
}

fn f(r: &Map<String, Value>, k: &str) -> Result<f64> {
    get_f64(r, k, "record")
}

/// `after - before` of an integer field (counters must not go backwards).
fn delta(before: &Map<String, Value>, after: &Map<String, Value>, k: &str) -> Result<u64> {
    let (b, a) = (u(before, k)?, u(after, k)?);
    ensure!(a >= b, "{k} went backwards: {b} -> {a}");
    Ok(a - b)
}

/// Fails unless `got` is in `[truth, truth * (1 + slack)]`.
fn within_above(what: &str, got: u64, truth: u64, slack: f64) -> Result<()> {
    eprintln!(
        "{what}: lxcmon {got}, ground truth {truth} ({:+.3}%)",
        (got as f64 / truth as f64 - 1.0) * 100.0
    );
    ensure!(
        got >= truth && got as f64 <= truth as f64 * (1.0 + slack),
        "{what}: lxcmon says {got}, ground truth {truth} (allowed {truth} ..= {:.0})",
        truth as f64 * (1.0 + slack)
    );
    Ok(())
}

fn run_checker(file: &Path) -> Result<String> {
    let out = run_timeout(
        Command::new("/usr/bin/python3").arg(checker()).arg(file),
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "autoscale_ml_check.py rejected {}:\n{}{}",
        file.display(),
        out.stdout,
        out.stderr
    );
    Ok(out.stdout)
}

/// What statvfs of a container's rootfs showed while something ran.
struct FsEnvelope {
    block: u64,
    total: u64,
    reserved: u64,
    used: (u64, u64),
    free: (u64, u64),
}

/// Runs `f` while sampling statvfs of the containers' rootfs every few milliseconds (and
/// once before and after), returning `f`'s result and the range each figure took.
fn with_statvfs_envelope<T>(
    cs: &[&Container],
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<FsEnvelope>)> {
    let roots: Vec<PathBuf> = cs.iter().map(|c| c.rootfs().to_path_buf()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sample = |root: &Path| -> Result<(u64, u64, u64, u64, u64)> {
        let s = rustix::fs::statvfs(root)?;
        let bs = s.f_frsize;
        Ok((
            bs,
            s.f_blocks * bs,
            (s.f_blocks - s.f_bfree) * bs,
            s.f_bavail * bs,
            (s.f_bfree - s.f_bavail) * bs,
        ))
    };
    let sampler = {
        let stop = stop.clone();
        let roots = roots.clone();
        std::thread::spawn(move || -> Result<Vec<FsEnvelope>> {
            let mut env: Vec<Option<FsEnvelope>> = roots.iter().map(|_| None).collect();
            loop {
                let last = stop.load(std::sync::atomic::Ordering::SeqCst);
                for (i, root) in roots.iter().enumerate() {
                    let (block, total, used, free, reserved) = sample(root)?;
                    let e = env[i].get_or_insert(FsEnvelope {
                        block,
                        total,
                        reserved,
                        used: (used, used),
                        free: (free, free),
                    });
                    ensure!(
                        e.total == total && e.reserved == reserved,
                        "{root:?} changed size"
                    );
                    e.used = (e.used.0.min(used), e.used.1.max(used));
                    e.free = (e.free.0.min(free), e.free.1.max(free));
                }
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            env.into_iter()
                .map(|e| e.context("no statvfs sample"))
                .collect()
        })
    };
    let out = f();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let env = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("statvfs sampler panicked"))??;
    Ok((out?, env))
}

/// SwapTotal of the host in MiB.
fn host_swap_total_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no SwapTotal in /proc/meminfo")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn tmpdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("lxcmon-lxc-").tempdir()?)
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn identity_limits_filesystem_and_both_formats() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container(
        "id-a",
        &ContainerSpec {
            one_core_quota: true,
            memory_limit_mib: Some(256),
            ..Default::default()
        },
    )?;
    let b = lab.container(
        "id-b",
        &ContainerSpec {
            cpuset: Some("1".into()),
            ..Default::default()
        },
    )?;

    let t0 = Utc::now();
    let (cycle, fs_env) = with_statvfs_envelope(&[&a, &b], || once_records(dir.path()))?;
    let t1 = Utc::now();
    ensure!(
        cycle.timestamp >= t0 - chrono::Duration::seconds(3)
            && cycle.timestamp <= t1 + chrono::Duration::seconds(1),
        "records timestamp {} is not the time of the run ({t0} .. {t1})",
        cycle.timestamp
    );
    for (i, c) in [&a, &b].into_iter().enumerate() {
        let r = rec(&cycle, c)?;
        ensure!(
            (f(r, "cpu_cores_allowed")? - 1.0).abs() < 1e-9,
            "{}: cpu_cores_allowed {:?}",
            c.name,
            r.get("cpu_cores_allowed")
        );
        let collector = get_str(r, "collector", &c.name)?;
        match lxcmon_testkit::agent::test_collector().as_str() {
            "files" => ensure!(collector == "files", "collector {collector:?}"),
            "ebpf" => ensure!(collector == "ebpf", "collector {collector:?}"),
            _ => ensure!(
                collector == "files" || collector == "ebpf",
                "collector {collector:?}"
            ),
        }
        ensure!(
            u(r, "thread_count")? >= u(r, "process_count")?,
            "threads < processes"
        );
        // Filesystem: statvfs of the rootfs as the host sees it. The host's disk is shared
        // with other work (builds create and delete files), so "used" and "free" move while
        // the agent runs: its figures must lie in the range statvfs showed during its run,
        // give or take two blocks. And since they come from one statvfs call, total - used -
        // free must be exactly the blocks reserved for root, which do not move.
        let fsu = r["filesystem_usage"]
            .as_object()
            .context("filesystem_usage")?;
        let env = &fs_env[i];
        let slack = 2 * env.block;
        let (t, used, free) = (u(fsu, "total")?, u(fsu, "used")?, u(fsu, "free")?);
        ensure!(
            t == env.total,
            "{}: filesystem total {t}, statvfs {}",
            c.name,
            env.total
        );
        ensure!(
            used + slack >= env.used.0 && used <= env.used.1 + slack,
            "{}: filesystem used {used}, statvfs during the run {:?}",
            c.name,
            env.used
        );
        ensure!(
            free + slack >= env.free.0 && free <= env.free.1 + slack,
            "{}: filesystem free {free}, statvfs during the run {:?}",
            c.name,
            env.free
        );
        ensure!(
            t - used - free == env.reserved,
            "{}: total - used - free = {} but the filesystem reserves {}",
            c.name,
            t - used - free,
            env.reserved
        );
    }
    // Swap: the containers never swap unless the host has swap; with none, every figure is 0.
    let host_swap_mib = host_swap_total_mib()?;
    for c in [&a, &b] {
        let s = f(rec(&cycle, c)?, "swap_usage")?;
        ensure!(
            s <= host_swap_mib,
            "{}: swap_usage {s} MiB, host swap {host_swap_mib} MiB",
            c.name
        );
    }
    let ra = rec(&cycle, &a)?;
    ensure!(
        (f(ra, "memory_limit")? - 256.0).abs() < 0.01,
        "memory_limit of {}: {:?}, configured 256 MiB",
        a.name,
        ra.get("memory_limit")
    );
    ensure!(
        f(ra, "memory_usage")? <= 256.0,
        "memory_usage over the limit"
    );

    // The same containers in autoscale_ml.
    let now_local = Local::now().naive_local();
    let (cyc, fs_env) = with_statvfs_envelope(&[&a, &b], || once_aml(dir.path()))?;
    let skew = (cyc.timestamp - now_local).num_seconds().abs();
    ensure!(
        skew <= 5,
        "autoscale_ml timestamp {} is not naive local time (local now {now_local})",
        cyc.timestamp
    );
    ensure!(get_u64(&cyc.summary, "total_containers", "summary")? >= 2);
    for (i, c) in [&a, &b].into_iter().enumerate() {
        let e = aml(&cyc, c)?;
        let gib = (1u64 << 30) as f64;
        let env = &fs_env[i];
        for key in ["swap_usage_mb", "swap_total_mb"] {
            let x = f(e, key)?;
            ensure!(
                x <= host_swap_mib,
                "{}: {key} {x}, host swap {host_swap_mib} MiB",
                c.name
            );
        }
        let total = f(e, "filesystem_total_gb")?;
        ensure!(
            // GiB; the agent may round to two decimals.
            (total - env.total as f64 / gib).abs() <= 0.0051,
            "{}: filesystem_total_gb {total}, statvfs {}",
            c.name,
            env.total as f64 / gib
        );
        // GiB, not GB: a 1e9 divisor would be off by 7%.
        for (key, (lo, hi)) in [
            ("filesystem_usage_gb", env.used),
            ("filesystem_free_gb", env.free),
        ] {
            let x = f(e, key)?;
            ensure!(
                x >= lo as f64 / gib - 0.01 && x <= hi as f64 / gib + 0.01,
                "{}: {key} {x}, statvfs {:.3} .. {:.3} GiB",
                c.name,
                lo as f64 / gib,
                hi as f64 / gib
            );
        }
    }
    let report = run_checker(&dir.path().join("once-autoscale_ml.json"))?;
    eprintln!("{report}");
    Ok(())
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn block_io_counts_direct_writes_and_reads() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container("io-a", &ContainerSpec::default())?;
    let b = lab.container("io-b", &ContainerSpec::default())?;

    // The first run may switch block I/O counting on (v1, kernel >= 6.9): baselines after it.
    once_records(dir.path())?;
    let c0 = once_records(dir.path())?;
    let k0 = a.kernel_io_bytes()?;
    let written = a.dd_write_direct("/lxcmon-io", 64)?;
    let c1 = once_records(dir.path())?;
    let k1 = a.kernel_io_bytes()?;
    let dw = delta(rec(&c0, &a)?, rec(&c1, &a)?, "io_write_bytes")?;
    within_above(
        &format!(
            "io_write_bytes delta of {} after dd oflag=direct (kernel counted {})",
            a.name,
            k1.1 - k0.1
        ),
        dw,
        written,
        0.05,
    )?;
    let bw = delta(rec(&c0, &b)?, rec(&c1, &b)?, "io_write_bytes")?;
    ensure!(
        bw < written / 100,
        "{} (idle) io_write_bytes moved by {bw}",
        b.name
    );

    let read = a.dd_read_direct("/lxcmon-io")?;
    let c2 = once_records(dir.path())?;
    let k2 = a.kernel_io_bytes()?;
    let dr = delta(rec(&c1, &a)?, rec(&c2, &a)?, "io_read_bytes")?;
    within_above(
        &format!(
            "io_read_bytes delta of {} after dd iflag=direct (kernel counted {})",
            a.name,
            k2.0 - k1.0
        ),
        dr,
        read,
        0.05,
    )?;
    let br = delta(rec(&c1, &b)?, rec(&c2, &b)?, "io_read_bytes")?;
    ensure!(
        br < read / 100,
        "{} (idle) io_read_bytes moved by {br}",
        b.name
    );

    // autoscale_ml carries the same counters in 512-byte sectors. Nothing ran in the
    // containers since c2, so the cumulative figures are those of c2.
    let cyc = once_aml(dir.path())?;
    for c in [&a, &b] {
        let r = rec(&c2, c)?;
        let io = aml(&cyc, c)?["io_stats"].as_object().context("io_stats")?;
        let (reads, writes) = (
            get_u64(io, "reads", "io_stats")?,
            get_u64(io, "writes", "io_stats")?,
        );
        ensure!(
            reads == u(r, "io_read_bytes")? / 512 && writes == u(r, "io_write_bytes")? / 512,
            "{}: autoscale_ml io_stats {reads}/{writes} sectors, records {} / {} bytes (/512 = {} / {})",
            c.name,
            u(r, "io_read_bytes")?,
            u(r, "io_write_bytes")?,
            u(r, "io_read_bytes")? / 512,
            u(r, "io_write_bytes")? / 512
        );
    }
    Ok(())
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn network_bytes_both_directions() -> Result<()> {
    // Ground truth is the TCP payload. The interface counters lxcmon reads also count the
    // Ethernet, IP and TCP headers of every frame: 14 + 20 + 32 (with timestamps) = 66 bytes.
    // The lab runs the bridge and the veths at MTU 9000, so a full segment carries 8948 bytes
    // of payload and the headers add 0.74% (with GSO, fewer header sets are counted). The
    // handshake, FIN and a few ARP frames add well under 1 KiB. So the counter delta in the
    // direction of the data must be >= the payload and <= payload + 5%; it cannot be less than
    // the payload. ACKs flow the other way and are not compared.
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container("net-a", &ContainerSpec::default())?;
    let b = lab.container("net-b", &ContainerSpec::default())?;

    let c0 = once_records(dir.path())?;
    let k0 = a.kernel_net_bytes()?;
    let sent = a.transfer_host_to_container(32 * MIB, 5201)?;
    let c1 = once_records(dir.path())?;
    let k1 = a.kernel_net_bytes()?;
    let rx = delta(rec(&c0, &a)?, rec(&c1, &a)?, "network_received_bytes")?;
    within_above(
        &format!(
            "network_received_bytes delta of {} for a host->container transfer (its eth0 counted {})",
            a.name,
            k1.0 - k0.0
        ),
        rx,
        sent,
        0.05,
    )?;

    let got = a.transfer_container_to_host(24 * MIB, 5202)?;
    let c2 = once_records(dir.path())?;
    let k2 = a.kernel_net_bytes()?;
    let tx = delta(rec(&c1, &a)?, rec(&c2, &a)?, "network_transmitted_bytes")?;
    within_above(
        &format!(
            "network_transmitted_bytes delta of {} for a container->host transfer (its eth0 counted {})",
            a.name,
            k2.1 - k1.1
        ),
        tx,
        got,
        0.05,
    )?;

    // The other container only sees flooded broadcasts (ARP) at most.
    for k in ["network_received_bytes", "network_transmitted_bytes"] {
        let d = delta(rec(&c0, &b)?, rec(&c2, &b)?, k)?;
        ensure!(d < 64 * 1024, "{} (idle) {k} moved by {d}", b.name);
    }

    // autoscale_ml: the same counters as rx_bytes / tx_bytes. Nothing was sent since c2
    // (the idle counters may only have moved by a stray frame).
    let cyc = once_aml(dir.path())?;
    let net = aml(&cyc, &a)?["network_usage"]
        .as_object()
        .context("network_usage")?;
    let (arx, atx) = (
        get_u64(net, "rx_bytes", "n")?,
        get_u64(net, "tx_bytes", "n")?,
    );
    let r2 = rec(&c2, &a)?;
    ensure!(
        arx >= u(r2, "network_received_bytes")? && arx - u(r2, "network_received_bytes")? < 4096,
        "autoscale_ml rx_bytes {arx}, records {}",
        u(r2, "network_received_bytes")?
    );
    ensure!(
        atx >= u(r2, "network_transmitted_bytes")?
            && atx - u(r2, "network_transmitted_bytes")? < 4096,
        "autoscale_ml tx_bytes {atx}, records {}",
        u(r2, "network_transmitted_bytes")?
    );
    Ok(())
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn process_count_and_memory() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let spec = ContainerSpec {
        memory_limit_mib: Some(512),
        ..Default::default()
    };
    let a = lab.container("pm-a", &spec)?;
    let b = lab.container("pm-b", &ContainerSpec::default())?;

    let c0 = once_records(dir.path())?;
    const N: u64 = 5;
    a.start_sleeps(N as u32)?;
    let c1 = once_records(dir.path())?;
    let (p0, p1) = (
        u(rec(&c0, &a)?, "process_count")?,
        u(rec(&c1, &a)?, "process_count")?,
    );
    eprintln!("process_count of {}: {p0} -> {p1}, {N} started", a.name);
    ensure!(
        p1 == p0 + N,
        "process_count of {}: {p0} -> {p1} after starting {N} sleep processes",
        a.name
    );
    let (q0, q1) = (
        u(rec(&c0, &b)?, "process_count")?,
        u(rec(&c1, &b)?, "process_count")?,
    );
    ensure!(q0 == q1, "{} (idle) process_count {q0} -> {q1}", b.name);

    const HELD: f64 = 128.0;
    a.hold_memory(HELD as u64)?;
    let c2 = once_records(dir.path())?;
    let (m1, m2) = (
        f(rec(&c1, &a)?, "memory_usage")?,
        f(rec(&c2, &a)?, "memory_usage")?,
    );
    eprintln!(
        "memory_usage of {}: {m1:.2} -> {m2:.2} MiB, {HELD} MiB held",
        a.name
    );
    ensure!(
        ((m2 - m1) - HELD).abs() <= HELD * 0.10,
        "memory_usage of {}: {m1:.2} -> {m2:.2} MiB after holding {HELD} MiB of anonymous memory",
        a.name
    );
    ensure!(m2 <= 512.0, "memory_usage {m2} over the 512 MiB limit");
    ensure!(
        u(rec(&c2, &a)?, "process_count")? == p1 + 1,
        "the memory holder is one more process"
    );
    let (n1, n2) = (
        f(rec(&c1, &b)?, "memory_usage")?,
        f(rec(&c2, &b)?, "memory_usage")?,
    );
    ensure!(
        (n2 - n1).abs() < 4.0,
        "{} (idle) memory_usage {n1} -> {n2}",
        b.name
    );

    let cyc = once_aml(dir.path())?;
    let e = aml(&cyc, &a)?;
    ensure!(get_u64(e, "process_count", "aml")? == p1 + 1);
    ensure!(
        (f(e, "memory_usage_mb")? - m2).abs() < 4.0,
        "autoscale_ml memory_usage_mb {} vs records {m2}",
        f(e, "memory_usage_mb")?
    );
    Ok(())
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn cpu_of_a_busy_one_core_container() -> Result<()> {
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let one_core = ContainerSpec {
        one_core_quota: true,
        ..Default::default()
    };
    let a = lab.container("cpu-a", &one_core)?;
    let b = lab.container("cpu-b", &one_core)?;
    a.busy_loop()?;
    std::thread::sleep(Duration::from_millis(500));
    let (c, (lo, hi)) = busy_share_around(&a, || once_records(dir.path()))?;
    let (ca, cb) = (f(rec(&c, &a)?, "cpu_usage")?, f(rec(&c, &b)?, "cpu_usage")?);
    eprintln!(
        "cpu_usage: busy {} {ca:.1}% (the loop's share of a core over any 1 s of the run: \
         {lo:.1}–{hi:.1}%), idle {} {cb:.1}%",
        a.name, b.name
    );
    ensure!(
        ca >= lo - SHARE_SLACK && ca <= hi + SHARE_SLACK,
        "cpu_usage of {} with a busy loop and a one-core quota: {ca}, the loop had {lo:.1}–{hi:.1}% of a core",
        a.name
    );
    ensure!(cb < 10.0, "cpu_usage of {} (idle): {cb}", b.name);
    ensure!((f(rec(&c, &a)?, "cpu_cores_allowed")? - 1.0).abs() < 1e-9);
    let (cyc, (lo, hi)) = busy_share_around(&a, || once_aml(dir.path()))?;
    let pa = f(aml(&cyc, &a)?, "cpu_usage_percent")?;
    eprintln!("autoscale_ml cpu_usage_percent: {pa:.1}% (the loop's share: {lo:.1}–{hi:.1}%)");
    ensure!(
        pa >= lo - SHARE_SLACK && pa <= hi + SHARE_SLACK,
        "autoscale_ml cpu_usage_percent of {}: {pa}, the loop had {lo:.1}–{hi:.1}% of a core",
        a.name
    );
    Ok(())
}

/// Points of tolerance around the loop's measured share: the agent's window is not one of the
/// sampled ones exactly (50 ms steps) and it reads the cgroup a little after each sample.
const SHARE_SLACK: f64 = 8.0;

/// Runs `f` while sampling container `c`'s CPU time every 50 ms; returns its result and the
/// lowest and highest share of one core (%) the container had over any 1 s stretch of the
/// run. `--once` measures over 1 s between its two samples, which lies inside the run, so its
/// figure lies between the two (a busy loop gets less than a core when the machine is busy).
/// A lowest share under 50 % cannot tell a share of the allowed core from a share of the
/// host's two CPUs: that fails as a run on a machine too busy for the check.
fn busy_share_around<T>(c: &Container, f: impl FnOnce() -> Result<T>) -> Result<(T, (f64, f64))> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        let c = c.clone();
        std::thread::spawn(move || -> Result<Vec<(Instant, u64)>> {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                samples.push((Instant::now(), lxcmon_testkit::workload::cpu_ns(&c)?));
                std::thread::sleep(Duration::from_millis(50));
            }
            samples.push((Instant::now(), lxcmon_testkit::workload::cpu_ns(&c)?));
            Ok(samples)
        })
    };
    let out = f();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))??;
    let out = out?;
    let mut shares = Vec::new();
    for (i, &(t0, n0)) in samples.iter().enumerate() {
        if let Some(&(t1, n1)) = samples[i..]
            .iter()
            .find(|(t, _)| t.duration_since(t0) >= Duration::from_secs(1))
        {
            shares.push((n1 - n0) as f64 / t1.duration_since(t0).as_nanos() as f64 * 100.0);
        }
    }
    ensure!(
        !shares.is_empty(),
        "the run lasted under 1 s: no window to compare"
    );
    let lo = shares.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = shares.iter().copied().fold(0.0, f64::max);
    ensure!(
        lo >= 50.0,
        "the busy loop of {} had only {lo:.1}% of a core over 1 s of the run: too busy a machine to tell a share of the allowed core",
        c.name
    );
    Ok((out, (lo, hi)))
}

/// Runs the daemon with `format`, stops container b under it, SIGTERMs it, checks the file.
fn daemon_run(format: &'static str, tag: &str) -> Result<()> {
    const MAX: usize = 4;
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container(&format!("{tag}-a"), &ContainerSpec::default())?;
    let b = lab.container(&format!("{tag}-b"), &ContainerSpec::default())?;
    let mut cfg = AgentConfig::new(dir.path(), format);
    cfg.check_interval = 0.5;
    cfg.max_metrics_entries = MAX as u32;
    let export = cfg.export_file();
    let started = Instant::now();
    let mut daemon = Daemon::start(bin(), &cfg)?;

    // (cycle time as seconds since the epoch, container ids) of every cycle in the file now.
    let read = || -> Result<Option<Vec<Cycle>>> {
        let Ok(text) = std::fs::read_to_string(&export) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("the export file does not parse: {text}"))?;
        Ok(Some(cycles_of(format, &v)?))
    };
    let has_b = poll(Duration::from_secs(20), || {
        ensure!(daemon.running(), "lxcmon exited early");
        Ok(read()?.filter(|c| c.iter().filter(|(_, ids)| ids.contains(&b.name)).count() >= 2))
    })?;
    ensure!(has_b.is_some(), "no two cycles with {} within 20 s", b.name);

    b.stop()?;
    let stopped_at = now_secs(format);
    let later = poll(Duration::from_secs(20), || {
        ensure!(daemon.running(), "lxcmon exited after a container stopped");
        Ok(read()?.filter(|c| c.iter().filter(|(t, _)| *t > stopped_at + 1.0).count() >= 2))
    })?;
    ensure!(
        later.is_some(),
        "no cycles written after {} stopped",
        b.name
    );
    // Long enough for more cycles than max_metrics_entries.
    let min_run = Duration::from_secs_f64(cfg.check_interval * (MAX as f64 + 4.0));
    if started.elapsed() < min_run {
        std::thread::sleep(min_run - started.elapsed());
    }

    let term_at = now_secs(format);
    let out = daemon.terminate(Duration::from_secs(10))?;
    ensure!(
        out.status.code() == Some(0),
        "lxcmon exited with {} after SIGTERM\nstderr:\n{}",
        out.status,
        out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .collect();
    ensure!(errors.is_empty(), "lxcmon logged errors: {errors:#?}");

    let text = std::fs::read_to_string(&export)?;
    let v: Value = serde_json::from_str(&text).context("export file after SIGTERM")?;
    let cycles = cycles_of(format, &v)?; // also the contract check, incl. increasing times
    ensure!(
        cycles.len() <= MAX,
        "{} cycles kept, max_metrics_entries is {MAX}",
        cycles.len()
    );
    ensure!(
        cycles.len() == MAX,
        "only {} cycles kept after running {:?} at 0.5 s (max_metrics_entries {MAX})",
        cycles.len(),
        started.elapsed()
    );
    let newest = cycles.last().map(|c| c.0).unwrap_or(0.0);
    ensure!(
        term_at - newest < 3.0,
        "the newest kept cycle is {:.1} s older than SIGTERM: the oldest were not dropped",
        term_at - newest
    );
    for (t, ids) in &cycles {
        ensure!(
            ids.contains(&a.name),
            "{} missing from the cycle at {t:.1} ({:.1} s after {} stopped): cycles kept {cycles:?}\nstderr:\n{}",
            a.name,
            t - stopped_at,
            b.name,
            out.stderr
        );
        if *t > stopped_at + 1.0 {
            ensure!(
                !ids.contains(&b.name),
                "{} still in a cycle {:.1} s after it stopped",
                b.name,
                t - stopped_at
            );
        }
    }
    if format == "autoscale_ml" {
        eprintln!("{}", run_checker(&export)?);
    }
    Ok(())
}

/// Cgroups named as a container's, made as a run killed with its containers leaves them (empty,
/// in every hierarchy); removed on drop.
struct LeftBehind(Vec<PathBuf>);

impl LeftBehind {
    fn make(name: &str) -> Result<Self> {
        let mut made = Self(Vec::new());
        for h in ct::hierarchies()? {
            for leaf in [ct::Flavor::Lxc.cgroup(name), ct::Flavor::Lxc.monitor(name)] {
                made.0.push(h.create(&leaf)?);
            }
        }
        Ok(made)
    }
}

impl Drop for LeftBehind {
    fn drop(&mut self) {
        if let Err(e) = ct::remove_subtrees(&self.0, Duration::from_secs(10)) {
            eprintln!("removing the left-behind cgroups {:?}: {e:#}", self.0);
        }
    }
}

/// LXC names a container's cgroups `<name>-1` when cgroups of `<name>` are there already (left
/// behind, empty, by a container killed with its monitor). The running daemon exports it under
/// its own name on every cycle, with its processes, and the empty cgroups as no container.
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn a_container_whose_cgroup_name_was_left_behind_keeps_its_name() -> Result<()> {
    const CYCLES: usize = 6;
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    let name = format!("{}lb", Site::current().prefix);
    let _left = LeftBehind::make(&name)?;
    let c = lab.container("lb", &ContainerSpec::default())?;
    ensure!(c.name == name, "the lab named the container {}", c.name);
    ensure!(
        c.cgroup_name() == format!("{name}-1"),
        "premise: with lxc.payload.{name} taken, LXC put {name} in lxc.payload.{}, not in lxc.payload.{name}-1",
        c.cgroup_name()
    );
    let live = || -> Result<u64> {
        let all = workload::processes_by_container(c.layout)?;
        all.get(c.cgroup_name())
            .copied()
            .with_context(|| format!("no process of {name} found in /proc"))
    };
    let before = live()?;

    let mut cfg = AgentConfig::new(dir.path(), "records");
    cfg.check_interval = 0.5;
    cfg.max_metrics_entries = CYCLES as u32;
    let export = cfg.export_file();
    let mut daemon = Daemon::start(bin(), &cfg)?;
    let cycles = records_until(&mut daemon, &export, |c| c.len() >= CYCLES)?
        .with_context(|| format!("no {CYCLES} cycles within 30 s"))?;
    let out = daemon.terminate(Duration::from_secs(10))?;
    let after = live()?;
    ensure!(
        before == after,
        "premise: {name}'s processes changed during the run ({before} -> {after})"
    );
    for (i, cycle) in cycles.iter().enumerate() {
        let ids: Vec<&str> = (cycle.records.iter())
            .filter_map(|r| r.get("container_id").and_then(Value::as_str))
            .filter(|id| id.starts_with(&name))
            .collect();
        ensure!(
            ids == [name.as_str()],
            "cycle {i}: {name} (in lxc.payload.{}) exported as {ids:?}\nstderr:\n{}",
            c.cgroup_name(),
            out.stderr
        );
        let r = (cycle.records.iter())
            .find(|r| r.get("container_id").and_then(Value::as_str) == Some(&name))
            .context("no record")?;
        ensure!(
            u(r, "process_count")? == before,
            "cycle {i}: process_count of {name} {} while /proc has {before} of its processes",
            u(r, "process_count")?
        );
        ensure!(
            f(r, "memory_usage")? > 0.0,
            "cycle {i}: no memory counted for {name}"
        );
    }
    eprintln!(
        "{name} in lxc.payload.{}: exported under its own name with {before} processes in {} cycles",
        c.cgroup_name(),
        cycles.len()
    );
    Ok(())
}

/// The running daemon's `records` export, read at each poll until `enough` holds of its
/// cycles (checked against the contract each time), 30 s at most.
fn records_until(
    daemon: &mut Daemon,
    export: &Path,
    enough: impl Fn(&[RecordsCycle]) -> bool,
) -> Result<Option<Vec<RecordsCycle>>> {
    poll(Duration::from_secs(30), || {
        ensure!(daemon.running(), "lxcmon exited early");
        let Ok(text) = std::fs::read_to_string(export) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("the export file does not parse: {text}"))?;
        let cycles = check_records(&v)?;
        Ok(enough(&cycles).then_some(cycles))
    })
}

/// A cycle of either format: its time as seconds since the epoch, and its container ids.
type Cycle = (f64, Vec<String>);

/// Now, in the clock of the format's timestamps (UTC for records, naive local for
/// autoscale_ml), as seconds since the epoch.
fn now_secs(format: &str) -> f64 {
    if format == "records" {
        Utc::now().timestamp_micros() as f64 / 1e6
    } else {
        Local::now().naive_local().and_utc().timestamp_micros() as f64 / 1e6
    }
}

fn cycles_of(format: &str, v: &Value) -> Result<Vec<Cycle>> {
    Ok(match format {
        "records" => check_records(v)?
            .into_iter()
            .map(|c| {
                let ids = c
                    .records
                    .iter()
                    .filter_map(|r| r.get("container_id").and_then(Value::as_str))
                    .map(str::to_owned)
                    .collect();
                (c.timestamp.timestamp_micros() as f64 / 1e6, ids)
            })
            .collect(),
        "autoscale_ml" => check_autoscale_ml(v)?
            .into_iter()
            .map(|c| {
                (
                    c.timestamp.and_utc().timestamp_micros() as f64 / 1e6,
                    c.containers.keys().cloned().collect(),
                )
            })
            .collect(),
        _ => bail!("unknown format {format}"),
    })
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn daemon_records_sigterm_and_a_container_stopping() -> Result<()> {
    daemon_run("records", "dr")
}

#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn daemon_autoscale_ml_sigterm_and_a_container_stopping() -> Result<()> {
    daemon_run("autoscale_ml", "da")
}

/// A valid two-container cycle in the autoscale_ml form, for the checker's negative tests.
fn sample_aml() -> Value {
    let entry = |ts: &str| {
        serde_json::json!({
            "timestamp": ts, "cpu_usage_percent": 1.5, "memory_usage_mb": 10.25,
            "swap_usage_mb": 0.0, "swap_total_mb": 0.0, "process_count": 3,
            "io_stats": {"reads": 8, "writes": 16},
            "network_usage": {"rx_bytes": 100, "tx_bytes": 200},
            "filesystem_usage_gb": 1.0, "filesystem_total_gb": 10.0, "filesystem_free_gb": 9.0
        })
    };
    let now = Local::now().naive_local();
    let ts = |s: i64| {
        (now - chrono::Duration::seconds(s))
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string()
    };
    let cycle = |s: i64| {
        serde_json::json!({
            "101": entry(&ts(s)), "web": entry(&ts(s)),
            "summary": {
                "collection_start_time": ts(s), "collection_end_time": ts(s),
                "total_containers": 2, "collected_containers": 2,
                "total_duration_seconds": 0.01, "monitor_cpu_percent": 3.0,
                "monitor_memory_usage_mb": 5.0
            }
        })
    };
    serde_json::json!([cycle(20), cycle(10)])
}

#[test]
#[ignore = "needs python3-pandas: run by cargo xtask test"]
fn autoscale_ml_checker_rejects_broken_exports() -> Result<()> {
    let dir = tmpdir()?;
    let good = sample_aml();
    check_autoscale_ml(&good).context("the Rust contract check rejects the good sample")?;
    let path = dir.path().join("good.json");
    std::fs::write(&path, good.to_string())?;
    run_checker(&path).context("the good sample must pass")?;

    type Breaker = fn(&mut Value);
    let broken: Vec<(&str, Breaker)> = vec![
        ("a null", |v| v[0]["web"]["memory_usage_mb"] = Value::Null),
        ("a Z timestamp", |v| {
            let t = v[0]["web"]["timestamp"].as_str().unwrap_or("").to_owned();
            v[0]["web"]["timestamp"] = Value::from(format!("{t}Z"));
            v[0]["101"]["timestamp"] = Value::from(format!("{t}Z"));
        }),
        ("3 fractional digits", |v| {
            let t = v[1]["web"]["timestamp"].as_str().unwrap_or("").to_owned();
            let short = t[..t.len() - 3].to_owned();
            v[1]["web"]["timestamp"] = Value::from(short.clone());
            v[1]["101"]["timestamp"] = Value::from(short);
        }),
        ("two timestamps in a cycle", |v| {
            v[1]["web"]["timestamp"] = v[0]["web"]["timestamp"].clone()
        }),
        ("a non-object top-level key", |v| {
            v[0]["version"] = Value::from(2)
        }),
        ("a missing key", |v| {
            if let Some(o) = v[0]["101"].as_object_mut() {
                o.remove("swap_total_mb");
            }
        }),
        ("a number as a string", |v| {
            v[1]["101"]["cpu_usage_percent"] = Value::from("12.5")
        }),
        ("bytes where sectors are counted as an object", |v| {
            v[0]["101"]["io_stats"] = Value::from(4096)
        }),
        ("no summary", |v| {
            if let Some(o) = v[1].as_object_mut() {
                o.remove("summary");
            }
        }),
    ];
    for (what, breaker) in broken {
        let mut v = good.clone();
        breaker(&mut v);
        ensure!(
            check_autoscale_ml(&v).is_err(),
            "the Rust contract check accepts {what}"
        );
        let p = dir.path().join("broken.json");
        std::fs::write(&p, v.to_string())?;
        let out = run_timeout(
            Command::new("/usr/bin/python3").arg(checker()).arg(&p),
            Duration::from_secs(60),
        )?;
        ensure!(
            out.status.code() == Some(1),
            "autoscale_ml_check.py accepted {what} ({}): {}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        eprintln!(
            "rejected {what}: {}",
            out.stderr.lines().next().unwrap_or("")
        );
    }
    Ok(())
}

/// A tmpfs the test mounted for a container's root; the container is stopped before it is
/// unmounted (and the lab destroys it afterwards, its root then an empty directory).
struct TmpfsRoot {
    mount: PathBuf,
    container: String,
}

impl Drop for TmpfsRoot {
    fn drop(&mut self) {
        let _ = Command::new("lxc-stop")
            .args(["-k", "-n", &self.container])
            .status();
        let _ = rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::DETACH);
    }
}

/// LXC moves a container's first process into its cgroups before it mounts and pivots into
/// the container's root (for as long as the hooks and the network setup take: seconds on
/// Proxmox VE). A daemon that sees the container then must not hold the host's root as the
/// container's: here a pre-mount hook holds that phase for 3 s under a daemon cycling every
/// 0.5 s, and the container's root is a tmpfs of its own, so every cycle's filesystem figure
/// is checked against that tmpfs, not the host's disk.
#[test]
#[ignore = "needs root and LXC: run by cargo xtask test"]
fn a_container_seen_while_lxc_sets_it_up_reports_its_own_root() -> Result<()> {
    const CYCLES: usize = 6;
    let dir = tmpdir()?;
    let mut lab = Lab::new()?;
    // A busybox root to copy onto the tmpfs.
    let donor = lab.container("su-a", &ContainerSpec::default())?;
    let mount = dir.path().join("root");
    std::fs::create_dir(&mount)?;
    let name = format!("{}su-b", Site::current().prefix);
    rustix::mount::mount(
        "lxcmon-test",
        &mount,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=48m,mode=755",
    )
    .context("mounting the tmpfs root")?;
    let _root = TmpfsRoot {
        mount: mount.clone(),
        container: name.clone(),
    };
    let copied = Command::new("cp")
        .arg("-a")
        .arg(donor.rootfs().join("."))
        .arg(&mount)
        .status()?;
    ensure!(copied.success(), "copying {}'s root: {copied}", donor.name);
    let st = rustix::fs::statvfs(&mount)?;
    let tmpfs_total = st.f_blocks * st.f_frsize;
    let host = rustix::fs::statvfs("/")?;
    ensure!(
        host.f_blocks * host.f_frsize != tmpfs_total,
        "premise: the host's root has the tmpfs's size"
    );
    let hook = dir.path().join("slow-setup.sh");
    std::fs::write(&hook, "#!/bin/sh\nsleep 3\n")?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;

    let mut cfg = AgentConfig::new(dir.path(), "records");
    cfg.check_interval = 0.5;
    cfg.max_metrics_entries = 100;
    let export = cfg.export_file();
    let mut daemon = Daemon::start(bin(), &cfg)?;
    let started = Instant::now();
    let b = lab.container(
        "su-b",
        &ContainerSpec {
            extra_config: vec![
                format!("lxc.rootfs.path = dir:{}", mount.display()),
                format!("lxc.hook.pre-mount = {}", hook.display()),
            ],
            ..Default::default()
        },
    )?;
    ensure!(b.name == name, "the lab named the container {}", b.name);
    let setup = started.elapsed();
    ensure!(
        setup >= Duration::from_secs(3),
        "premise: the container came up in {setup:?}, before its hook's 3 s"
    );
    let records_of_b = |cycles: &[RecordsCycle]| -> Vec<(usize, Map<String, Value>)> {
        (cycles.iter().enumerate())
            .filter_map(|(i, c)| {
                let r = c.records.iter().find(|r| {
                    r.get("container_id").and_then(Value::as_str) == Some(name.as_str())
                })?;
                Some((i, r.clone()))
            })
            .collect()
    };
    let cycles = records_until(&mut daemon, &export, |c| records_of_b(c).len() >= CYCLES)?
        .with_context(|| format!("{name} not in {CYCLES} cycles within 30 s"))?;
    let out = daemon.terminate(Duration::from_secs(10))?;
    let ours = records_of_b(&cycles);
    for (i, r) in &ours {
        let fsu = r["filesystem_usage"]
            .as_object()
            .context("filesystem_usage")?;
        ensure!(
            u(fsu, "total")? == tmpfs_total,
            "cycle {i}: {name}'s filesystem total {} is not its tmpfs root's {tmpfs_total} (the host's root: {})\nstderr:\n{}",
            u(fsu, "total")?,
            host.f_blocks * host.f_frsize,
            out.stderr
        );
    }
    eprintln!(
        "{name}: up after {setup:?} of setup under the daemon; its own root ({tmpfs_total} bytes) in all {} of its cycles",
        ours.len()
    );
    Ok(())
}
