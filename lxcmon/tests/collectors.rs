//! Both collectors on the same real containers and the same workloads: each against the
//! ground truth the test produces, and against each other; and `auto` without the
//! capabilities BPF needs. Built only with the `ebpf` feature; run by `cargo xtask test`.
#![cfg(feature = "ebpf")]

use anyhow::{ensure, Context, Result};
use lxcmon_testkit::agent::{run_once, AgentConfig, Daemon};
use lxcmon_testkit::contract::{check_records, get_str, get_u64};
use lxcmon_testkit::proc::poll;
use lxcmon_testkit::{Container, ContainerSpec, Lab};
use serde_json::{Map, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lxcmon"))
}

/// One `--once` records cycle under `collector`, as container name → record.
fn once(dir: &Path, collector: &str) -> Result<Vec<Map<String, Value>>> {
    let mut cfg = AgentConfig::new(dir, "records");
    cfg.collector = collector.to_string();
    let (v, stderr) = run_once(bin(), &cfg)?;
    check_records(&v).with_context(|| format!("{v:#}"))?;
    let records: Vec<Map<String, Value>> = v
        .as_array()
        .context("array")?
        .iter()
        .filter_map(|r| r.as_object().cloned())
        .collect();
    for r in &records {
        let got = get_str(r, "collector", "record")?;
        ensure!(
            got == collector,
            "asked for {collector}, ran {got}\n{stderr}"
        );
    }
    Ok(records)
}

/// The records of the newest cycle of a running daemon's `records` export that started after
/// this call, so it holds everything done before it; checks the collector the daemon runs.
fn latest(cfg: &AgentConfig) -> Result<Vec<Map<String, Value>>> {
    let since = chrono::Utc::now();
    let stamp = |r: &Value| {
        r.get("timestamp")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let newest = poll(Duration::from_secs(15), || {
        let text = std::fs::read_to_string(cfg.export_file()).unwrap_or_default();
        let Ok(Value::Array(all)) = serde_json::from_str::<Value>(&text) else {
            return Ok(None);
        };
        let Some(last) = all.iter().filter_map(stamp).max() else {
            return Ok(None);
        };
        if last <= since {
            return Ok(None);
        }
        Ok(Some(
            all.iter()
                .filter(|r| stamp(r) == Some(last))
                .filter_map(|r| r.as_object().cloned())
                .collect::<Vec<_>>(),
        ))
    })?
    .context("no new cycle in the daemon's export within 15 s")?;
    for r in &newest {
        let got = get_str(r, "collector", "record")?;
        ensure!(
            got == cfg.collector,
            "asked for {}, ran {got}",
            cfg.collector
        );
    }
    Ok(newest)
}

fn field(records: &[Map<String, Value>], c: &Container, key: &str) -> Result<u64> {
    let r = records
        .iter()
        .find(|r| r.get("container_id").and_then(Value::as_str) == Some(c.name.as_str()))
        .with_context(|| format!("{} missing", c.name))?;
    get_u64(r, key, &c.name)
}

struct Deltas {
    io_write: u64,
    io_read: u64,
    rx: u64,
    tx: u64,
}

fn deltas(
    before: &[Map<String, Value>],
    after: &[Map<String, Value>],
    c: &Container,
) -> Result<Deltas> {
    let d =
        |k: &str| -> Result<u64> { Ok(field(after, c, k)?.saturating_sub(field(before, c, k)?)) };
    Ok(Deltas {
        io_write: d("io_write_bytes")?,
        io_read: d("io_read_bytes")?,
        rx: d("network_received_bytes")?,
        tx: d("network_transmitted_bytes")?,
    })
}

fn near(what: &str, got: u64, truth: u64, tolerance: f64) -> Result<()> {
    let rel = (got as f64 - truth as f64).abs() / truth.max(1) as f64;
    ensure!(
        rel <= tolerance,
        "{what}: {got} vs {truth} ({:+.2} %)",
        (got as f64 / truth.max(1) as f64 - 1.0) * 100.0
    );
    eprintln!(
        "{what}: {got} vs {truth} ({:+.2} %)",
        (got as f64 / truth.max(1) as f64 - 1.0) * 100.0
    );
    Ok(())
}

#[test]
#[ignore = "needs root, LXC and BPF: run by cargo xtask test"]
fn both_collectors_match_ground_truth_and_each_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container("cmp-a", &ContainerSpec::default())?;
    let b = lab.container("cmp-b", &ContainerSpec::default())?;

    // The file readers through `--once` (their counters are the kernel's own, whoever reads
    // them); the BPF programs as users run them: in a daemon, counting while the workloads run
    // (a `--once` run holds its programs only while it runs).
    once(dir.path(), "files")?;
    let daemon_dir = dir.path().join("ebpf-daemon");
    std::fs::create_dir_all(&daemon_dir)?;
    let mut daemon_cfg = AgentConfig::new(&daemon_dir, "records");
    daemon_cfg.collector = "ebpf".into();
    daemon_cfg.check_interval = 0.5;
    let daemon = Daemon::start(bin(), &daemon_cfg)?;
    // Its first cycle only sets each container's baseline: wait for one that exports `a`.
    poll(Duration::from_secs(15), || {
        Ok(latest(&daemon_cfg)?
            .iter()
            .any(|r| r.get("container_id").and_then(Value::as_str) == Some(a.name.as_str()))
            .then_some(()))
    })?
    .context("the ebpf daemon never exported the container")?;
    let files0 = once(dir.path(), "files")?;
    let ebpf0 = latest(&daemon_cfg)?;

    let written = a.dd_write_direct("/direct", 32)?;
    let read = a.dd_read_direct("/direct")?;
    let sent = a.transfer_host_to_container(16 * MIB, 5301)?;
    let got = a.transfer_container_to_host(16 * MIB, 5302)?;
    // Loopback inside the container: not a network interface the contract counts.
    a.sh("nc -l -p 7000 >/dev/null & sleep 0.3; dd if=/dev/zero bs=1M count=8 2>/dev/null | nc 127.0.0.1 7000; wait")?;

    let files1 = once(dir.path(), "files")?;
    let ebpf1 = latest(&daemon_cfg)?;
    let f = deltas(&files0, &files1, &a)?;
    let e = deltas(&ebpf0, &ebpf1, &a)?;

    for (name, d) in [("files", &f), ("ebpf", &e)] {
        near(&format!("{name} io_write_bytes"), d.io_write, written, 0.05)?;
        near(&format!("{name} io_read_bytes"), d.io_read, read, 0.05)?;
        // Payload plus headers: interface counters add Ethernet+IP+TCP, BPF adds IP+TCP.
        ensure!(
            d.rx >= sent && d.tx >= got,
            "{name}: rx {} of {sent}, tx {} of {got}",
            d.rx,
            d.tx
        );
        near(&format!("{name} network_received_bytes"), d.rx, sent, 0.05)?;
        near(
            &format!("{name} network_transmitted_bytes"),
            d.tx,
            got,
            0.05,
        )?;
    }
    near("ebpf vs files io_write", e.io_write, f.io_write, 0.05)?;
    near("ebpf vs files io_read", e.io_read, f.io_read, 0.05)?;
    near("ebpf vs files rx", e.rx, f.rx, 0.05)?;
    near("ebpf vs files tx", e.tx, f.tx, 0.05)?;

    // The idle container moved by no more than stray broadcasts under either collector.
    for (name, before, after) in [("files", &files0, &files1), ("ebpf", &ebpf0, &ebpf1)] {
        let d = deltas(before, after, &b)?;
        ensure!(
            d.io_write < MIB && d.rx < 64 * 1024 && d.tx < 64 * 1024,
            "{name}: idle {} moved: write {} rx {} tx {}",
            b.name,
            d.io_write,
            d.rx,
            d.tx
        );
    }

    // Buffered writes flushed later by the kernel: BPF charges them to the container when the
    // pages are dirtied. (On cgroup v1 the kernel charges writeback to the root, so the file
    // readers cannot see them; on v2 they can: the VM tests cover that.)
    let e2 = latest(&daemon_cfg)?;
    a.sh("dd if=/dev/zero of=/buffered bs=1M count=32 2>/dev/null; sync")?;
    let e3 = latest(&daemon_cfg)?;
    near(
        "ebpf buffered io_write_bytes",
        deltas(&e2, &e3, &a)?.io_write,
        32 * MIB,
        0.05,
    )?;
    let out = daemon.terminate(Duration::from_secs(10))?;
    ensure!(out.status.success(), "the ebpf daemon: {}", out.stderr);
    Ok(())
}

/// `capsh` runs the agent with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN gone from its bounding
/// set, so loading BPF fails in the kernel while the file readers still work as root.
fn once_without_bpf_caps(cfg: &AgentConfig) -> Result<std::process::Output> {
    let path = cfg.write()?;
    let cmd = format!(
        "exec {} --once --config {}",
        bin().display(),
        path.display()
    );
    Command::new("capsh")
        .args(["--drop=cap_bpf,cap_perfmon,cap_sys_admin", "--", "-c", &cmd])
        .output()
        .context("running capsh (libcap2-bin)")
}

#[test]
#[ignore = "needs root, LXC and BPF: run by cargo xtask test"]
fn auto_falls_back_to_files_without_bpf_capabilities() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container("cap-a", &ContainerSpec::default())?;
    a.start_sleeps(4)?;

    let mut cfg = AgentConfig::new(dir.path(), "records");
    cfg.collector = "auto".into();
    let out = once_without_bpf_caps(&cfg)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "auto without BPF caps failed: {stderr}"
    );
    ensure!(
        stderr.contains("BPF unavailable"),
        "no fallback warning: {stderr}"
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    check_records(&v)?;
    let fallback: Vec<Map<String, Value>> = v
        .as_array()
        .context("array")?
        .iter()
        .filter_map(|r| r.as_object().cloned())
        .collect();
    let files = once(dir.path(), "files")?;
    for r in &fallback {
        ensure!(get_str(r, "collector", "r")? == "files", "{r:?}");
    }
    // Same figures as a normal run on the file readers (nothing moved in between).
    for key in ["process_count", "io_write_bytes", "io_read_bytes"] {
        let (x, y) = (field(&fallback, &a, key)?, field(&files, &a, key)?);
        ensure!(x == y, "{key}: fallback {x}, files {y}");
    }
    let rx = (
        field(&fallback, &a, "network_received_bytes")?,
        field(&files, &a, "network_received_bytes")?,
    );
    ensure!(rx.1 >= rx.0 && rx.1 - rx.0 < 64 * 1024, "rx {rx:?}");

    cfg.collector = "ebpf".into();
    let out = once_without_bpf_caps(&cfg)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "collector: ebpf without BPF caps must not start"
    );
    ensure!(
        stderr.contains("BPF collector cannot run") && stderr.contains("missing capabilities"),
        "the reason is missing: {stderr}"
    );
    Ok(())
}

/// Pinned links of the container whose v2 cgroup has inode `id` (ingress and egress).
fn links_of(id: u64) -> usize {
    std::fs::read_dir("/sys/fs/bpf/lxcmon/v1/links")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("cg-{id}-"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Containers with pinned links, of any test or none.
fn tracked_by_links() -> usize {
    std::fs::read_dir("/sys/fs/bpf/lxcmon/v1/links")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("cg-") && n.ends_with("-ingress")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Entries of the tracked-cgroup map, as bpftool sees the pinned map.
fn tracked_entries() -> Result<usize> {
    let out = Command::new("bpftool")
        .args([
            "-j",
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/lxcmon/v1/LXCMON_TRACKED",
        ])
        .output()
        .context("bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array().map_or(0, Vec::len))
}

/// Programs attached to a cgroup directory, as `bpftool cgroup show` lists them.
fn attached(cgroup: &Path) -> usize {
    Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup)
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root, LXC and BPF: run by cargo xtask test"]
fn container_churn_leaves_no_attachment_or_map_entry() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir()?;
    let mut lab = Lab::new()?;
    let a = lab.container("churn-a", &ContainerSpec::default())?;
    let mut cfg = AgentConfig::new(dir.path(), "records");
    cfg.collector = "ebpf".into();
    cfg.check_interval = 0.3;
    let daemon = lxcmon_testkit::agent::Daemon::start(bin(), &cfg)?;
    let wait = |what: &str, cond: &dyn Fn() -> Result<bool>| -> Result<()> {
        let ok = lxcmon_testkit::proc::poll(std::time::Duration::from_secs(20), || {
            Ok(cond()?.then_some(()))
        })?;
        ensure!(ok.is_some(), "timed out waiting for {what}");
        Ok(())
    };
    // The map holds exactly the containers with links: no stale entry at any step.
    let consistent = || -> Result<bool> { Ok(tracked_entries()? == tracked_by_links()) };
    let id_a = std::fs::metadata(a.unified_dir())?.ino();
    wait("the first container tracked", &|| {
        Ok(links_of(id_a) == 2 && consistent()?)
    })?;
    let b = lab.container("churn-b", &ContainerSpec::default())?;
    let id_b = std::fs::metadata(b.unified_dir())?.ino();
    wait("the second container tracked", &|| {
        Ok(links_of(id_b) == 2 && consistent()?)
    })?;
    ensure!(
        attached(&b.unified_dir()) == 2,
        "ingress and egress attached to {}",
        b.name
    );
    b.stop()?;
    wait("the stopped container forgotten", &|| {
        Ok(links_of(id_b) == 0 && links_of(id_a) == 2 && consistent()?)
    })?;
    a.stop()?;
    wait("both forgotten", &|| {
        Ok(links_of(id_a) == 0 && consistent()?)
    })?;
    let out = daemon.terminate(std::time::Duration::from_secs(20))?;
    ensure!(out.status.success(), "daemon: {}", out.stderr);
    ensure!(
        !out.stderr.contains("ERROR") && !out.stderr.contains("WARN"),
        "no cycle failed: {}",
        out.stderr
    );
    Ok(())
}
