//! lxcmon against real Incus containers, side by side with Incus's own `/1.0/metrics`.
//!
//! One container in the default project and one (`peer3`) in project `p2` (cgroup
//! `lxc.payload.p2_peer3`), each with a memory limit. The test checks discovery (runtime
//! `incus`, the project and the instance name), then drives workloads whose size it knows
//! (memory held, bytes over the Incus bridge both ways, a direct-I/O write, one OOM kill) and
//! compares lxcmon's figures with Incus's for the same containers, and both with the kernel's
//! counters read by the test.
//!
//! Where the two differ by definition, and why:
//! - Incus caches `/1.0/metrics` for 8 s per project: the test waits until Incus shows the
//!   kernel's counters as they stand after the workloads (then it is fresh), and compares.
//! - Memory: Incus publishes `MemTotal` = the limit (host memory when unlimited or larger),
//!   `MemFree` = limit − usage and `MemAvailable` = limit − usage + cache, where usage is
//!   v1 `memory.usage_in_bytes` / v2 `memory.current` (page cache and kernel memory
//!   included) and cache is v1 `total_cache` / v2 `file` of `memory.stat`. So
//!   `MemTotal − MemAvailable` = usage − cache = lxcmon's `memory_usage`, to the byte when
//!   read at the same moment. Incus's `RSS` (v1 `total_rss`; absent on v2) is anonymous
//!   memory only: it leaves out the kernel memory (slab, page tables, stacks) charged to the
//!   container, so it is lower than lxcmon's figure by that much. `incus info`'s "memory
//!   usage" is the raw usage, page cache included.
//! - Network: Incus reads the container's interfaces in its own network namespace (netlink,
//!   the same kernel counters as the container's `/proc/net/dev`) and lists `lo` too;
//!   lxcmon's totals leave `lo` out.
//! - Disk: Incus sums v1 `blkio.throttle.io_service_bytes_recursive` / v2 `io.stat` per
//!   device, skipping loop devices only; lxcmon skips `excluded_devices` (`loop`, `dm-`).
//! - OOM kills: both read `oom_kill` (v1 `memory.oom_control`, v2 `memory.events`).
//!
//! Needs root and Incus (`incus-base`, `incus-client` from bookworm-backports): `cargo xtask
//! test` installs them and runs this with `--ignored`, under the lab lock.

use anyhow::{ensure, Context, Result};
use lxcmon_testkit::agent::{run_once, AgentConfig};
use lxcmon_testkit::incus::{IncusLab, Instance, Metrics, BRIDGE, LXCPATH};
use lxcmon_testkit::proc::poll;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const DEFAULT_CT: &str = "lxcmon-i1";
const PROJECT: &str = "p2";
const PEER: &str = "peer3";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lxcmon"))
}

/// `lxcmon --once` (records, file readers: Incus reads the same kernel files).
fn once_records(dir: &Path) -> Result<Vec<Value>> {
    let mut cfg = AgentConfig::new(dir, "records");
    cfg.collector = "files".into();
    let (v, _stderr) = run_once(bin(), &cfg)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn record<'a>(records: &'a [Value], id: &str) -> Result<&'a Value> {
    records
        .iter()
        .find(|r| r["container_id"] == id)
        .with_context(|| format!("{id} missing from the export: {records:#?}"))
}

fn u(v: &Value, key: &str) -> Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("{key} is not a count in {v}"))
}

/// The kernel's counters for one container, read by the test.
#[derive(Debug, Clone, PartialEq)]
struct Truth {
    /// (name, rx bytes, tx bytes) per interface of the container's own `/proc/net/dev`.
    interfaces: Vec<(String, u64, u64)>,
    io: (u64, u64),
    oom_kills: u64,
}

fn truth(i: &Instance) -> Result<Truth> {
    let pid = i.ct.init_pid()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))?;
    let mut interfaces = Vec::new();
    for l in text.lines().skip(2) {
        let (name, rest) = l.split_once(':').context("net/dev line")?;
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        ensure!(f.len() >= 9, "short net/dev line {l}");
        interfaces.push((name.trim().to_string(), f[0], f[8]));
    }
    interfaces.sort();
    let oom = match i.ct.layout {
        lxcmon_testkit::lab::CgroupLayout::V1 => {
            i.ct.cgroup_dir("memory").join("memory.oom_control")
        }
        lxcmon_testkit::lab::CgroupLayout::V2 => i.ct.cgroup_dir("").join("memory.events"),
    };
    let oom_kills = std::fs::read_to_string(&oom)?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .context("no oom_kill line")?
        .trim()
        .parse()?;
    Ok(Truth {
        interfaces,
        io: i.ct.kernel_io_bytes()?,
        oom_kills,
    })
}

fn incus_project(i: &Instance) -> &str {
    i.project.as_deref().unwrap_or("default")
}

/// Incus's view of the same counters, from its metrics.
fn incus_truth(m: &Metrics, i: &Instance) -> Result<Truth> {
    let (p, n) = (incus_project(i), i.name.as_str());
    let mut interfaces = Vec::new();
    for s in m.of("incus_network_receive_bytes_total", p, n) {
        let dev = s.labels.get("device").context("no device label")?;
        let tx = m.value("incus_network_transmit_bytes_total", p, n, Some(dev))?;
        interfaces.push((dev.clone(), s.value as u64, tx as u64));
    }
    interfaces.sort();
    let sum = |metric: &str| -> u64 {
        m.of(metric, p, n)
            .filter(|s| {
                // lxcmon's excluded_devices (Incus itself skips only loop devices).
                s.labels
                    .get("device")
                    .is_some_and(|d| !d.starts_with("loop") && !d.starts_with("dm-"))
            })
            .map(|s| s.value as u64)
            .sum()
    };
    Ok(Truth {
        interfaces,
        io: (
            sum("incus_disk_read_bytes_total"),
            sum("incus_disk_written_bytes_total"),
        ),
        oom_kills: m.value("incus_memory_OOM_kills_total", p, n, None)? as u64,
    })
}

/// Waits until the kernel's counters of `all` hold still for 1 s, and returns them.
fn settled(all: &[&Instance]) -> Result<Vec<Truth>> {
    let read = || all.iter().map(|i| truth(i)).collect::<Result<Vec<_>>>();
    let mut last = read()?;
    let got = poll(Duration::from_secs(15), || {
        std::thread::sleep(Duration::from_secs(1));
        let now = read()?;
        let same = now == last;
        last = now;
        Ok(same.then(|| last.clone()))
    })?;
    got.context("the containers' counters did not settle in 15 s")
}

fn lo_less(t: &Truth) -> (u64, u64) {
    t.interfaces
        .iter()
        .filter(|(n, _, _)| n != "lo")
        .fold((0, 0), |(r, w), (_, rx, tx)| (r + rx, w + tx))
}

#[test]
#[ignore = "needs root and Incus: cargo xtask test installs and runs it"]
fn incus_containers_side_by_side_with_incus_metrics() -> Result<()> {
    let t0 = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut lab = IncusLab::new(&[(None, DEFAULT_CT), (Some(PROJECT), PEER)], &[PROJECT])?;
    let created_network = lab.created_network();
    lab.project(PROJECT)?;
    let a = lab.container(None, DEFAULT_CT, 128)?;
    let b = lab.container(Some(PROJECT), PEER, 64)?;
    eprintln!(
        "incus: daemon, image and two containers up in {:?}",
        t0.elapsed()
    );

    // ---- discovery: the id stays the cgroup's name part, unique across projects ----
    let records = once_records(dir.path())?;
    let (ra, rb) = (record(&records, DEFAULT_CT)?, record(&records, "p2_peer3")?);
    assert_eq!(
        (&rb["runtime"], &rb["project"], &rb["container_name"]),
        (
            &Value::from("incus"),
            &Value::from(PROJECT),
            &Value::from(PEER)
        ),
        "{rb}"
    );
    assert_eq!(
        (&ra["runtime"], &ra["container_name"]),
        (&Value::from("incus"), &Value::from(DEFAULT_CT)),
        "{ra}"
    );
    assert!(ra.get("project").is_none(), "default project: no key: {ra}");

    // ---- workloads of known size ----
    let before = settled(&[&a, &b])?;
    // Incus's figures now fill its cache (kept 8 s): read right after the workloads, they
    // are still these. (Only a daemon of the lab's own has no other client filling it.)
    let own_daemon = lab.started_daemon();
    let primed = lab.metrics()?;
    let t_primed = Instant::now();
    let stale = (incus_truth(&primed, &a)?, incus_truth(&primed, &b)?);
    if own_daemon {
        assert_eq!(
            (&stale.0, &stale.1),
            (&before[0], &before[1]),
            "Incus before the workloads"
        );
    }
    a.ct.hold_memory(48)?;
    let written = a.ct.dd_write_direct("/root/direct.bin", 16)?;
    let sent = b.ct.transfer_host_to_container(8 * MIB, 5301)?;
    let received = b.ct.transfer_container_to_host(4 * MIB, 5302)?;
    // Past its 64 MiB limit without swap: the memory holder is OOM-killed, exactly once.
    b.ct.spawn_detached("/bin/lxcmon-memhog 100 /oom.ready")?;
    let killed = poll(Duration::from_secs(20), || {
        Ok((truth(&b)?.oom_kills == before[1].oom_kills + 1).then_some(()))
    })?;
    ensure!(killed.is_some(), "no OOM kill in {PEER}");
    let kernel = settled(&[&a, &b])?;
    let (ka, kb) = (&kernel[0], &kernel[1]);
    assert_eq!(kb.oom_kills, before[1].oom_kills + 1);
    assert!(ka.io.1 - before[0].io.1 >= written, "{ka:?}");
    let (b_rx, b_tx) = lo_less(kb);
    let (b_rx0, b_tx0) = lo_less(&before[1]);
    assert!(b_rx - b_rx0 >= sent && b_tx - b_tx0 >= received, "{kb:?}");

    // ---- Incus's and lxcmon's figures, with the kernel's counters still around both ----
    // A stray packet (say, a neighbour probe) can move a counter between two reads: the
    // comparison counts only when the kernel's counters, read before Incus's and after
    // lxcmon's, did not move, and Incus's are those (then its cache is fresh).
    let t_wait = Instant::now();
    let mut first = true;
    let mut fresh_after = None;
    let mut last = None;
    let round = poll(Duration::from_secs(20), || {
        let asked = t_primed.elapsed();
        let k1 = (truth(&a)?, truth(&b)?);
        let m = lab.metrics()?;
        let now = (incus_truth(&m, &a)?, incus_truth(&m, &b)?);
        if std::mem::take(&mut first) && own_daemon && asked < Duration::from_millis(7500) {
            // Its cache: what Incus said before the workloads, until 8 s after it was filled.
            assert_eq!(now, stale, "Incus {asked:?} after filling its cache");
            eprintln!("incus: {asked:?} after its cache was filled, the pre-workload figures");
        }
        if now != k1 {
            last = Some((k1, now));
            std::thread::sleep(Duration::from_millis(500));
            return Ok(None);
        }
        fresh_after.get_or_insert(asked);
        let records = once_records(dir.path())?;
        let k2 = (truth(&a)?, truth(&b)?);
        if k2 != k1 {
            eprintln!("incus: the kernel's counters moved during the comparison; again");
            last = Some((k2, now));
            return Ok(None);
        }
        Ok(Some((k1, m, records)))
    })?;
    let Some((kernel_now, incus, records)) = round else {
        anyhow::bail!(
            "Incus's metrics never matched the kernel's counters in 20 s (kernel, Incus): \
             {last:#?}"
        );
    };
    let caught_up = fresh_after.unwrap_or_default();
    eprintln!(
        "incus: its metrics fresh {caught_up:?} after its cache was filled ({:?} of waiting)",
        t_wait.elapsed()
    );
    // Fresh once the 8 s are over (the settled counters were there before that or since).
    assert!(
        !own_daemon
            || caught_up < (t_wait - t_primed).max(Duration::from_secs(8)) + Duration::from_secs(3),
        "Incus took {caught_up:?} to show the settled counters"
    );
    let (ka, kb) = (&kernel_now.0, &kernel_now.1);

    for (i, k) in [(&a, ka), (&b, kb)] {
        let id = i.lxc_name();
        let (p, n) = (incus_project(i), i.name.as_str());
        let r = record(&records, &id)?;

        // Network totals: lxcmon (without lo) = Incus's devices without lo = the kernel's.
        let (rx, tx) = lo_less(k);
        assert_eq!(
            (
                u(r, "network_received_bytes")?,
                u(r, "network_transmitted_bytes")?
            ),
            (rx, tx),
            "{id}: lxcmon's network totals against Incus's (and the kernel's)"
        );
        // Per interface.
        match r.get("interfaces").and_then(Value::as_array) {
            None => anyhow::bail!("{id}: no per-interface figures in lxcmon's export"),
            Some(list) => {
                let mut ours = Vec::new();
                for x in list {
                    let name = x["name"].as_str().context("interface name")?.to_string();
                    ours.push((name, u(x, "rx_bytes")?, u(x, "tx_bytes")?));
                }
                ours.sort();
                // Incus lists lo too; it is compared where lxcmon lists it as well.
                let has_lo = ours.iter().any(|x| x.0 == "lo");
                let theirs: Vec<_> = k
                    .interfaces
                    .iter()
                    .filter(|x| has_lo || x.0 != "lo")
                    .cloned()
                    .collect();
                assert_eq!(ours, theirs, "{id}: per interface, lxcmon against Incus");
                eprintln!("{id}: per-interface figures match Incus's: {ours:?}");
            }
        }

        // Disk bytes: lxcmon = Incus's devices (lxcmon's exclusions applied) = the kernel's.
        assert_eq!(
            (u(r, "io_read_bytes")?, u(r, "io_write_bytes")?),
            k.io,
            "{id}: lxcmon's disk bytes against Incus's"
        );
        match r.get("devices").and_then(Value::as_array) {
            // A container that has done no block I/O has no device lines in the kernel's file.
            None if k.io == (0, 0) => eprintln!("{id}: no block I/O, no per-device figures"),
            None => anyhow::bail!("{id}: no per-device figures in lxcmon's export"),
            Some(list) => {
                for d in list {
                    let name = d["name"].as_str().context("device name")?;
                    let w = incus.value("incus_disk_written_bytes_total", p, n, Some(name))?;
                    let rd = incus.value("incus_disk_read_bytes_total", p, n, Some(name))?;
                    assert_eq!(
                        (u(d, "read_bytes")?, u(d, "write_bytes")?),
                        (rd as u64, w as u64),
                        "{id} {name}: lxcmon against Incus"
                    );
                }
                eprintln!("{id}: per-device figures match Incus's: {list:?}");
            }
        }

        // OOM kills (both read the kernel's oom_kill).
        match r.get("memory_events").and_then(|e| e.get("oom_kill")) {
            None => anyhow::bail!("{id}: no OOM kill figure in lxcmon's export"),
            Some(kills) => {
                assert_eq!(
                    kills.as_u64(),
                    Some(k.oom_kills),
                    "{id}: lxcmon's OOM kills against Incus's"
                );
                eprintln!("{id}: OOM kills match Incus's: {kills}");
            }
        }

        // Memory: Incus's MemTotal − MemAvailable is lxcmon's usage without page cache; the
        // two reads are up to a second apart, in which an idle busybox moves a few pages.
        let total = incus.value("incus_memory_MemTotal_bytes", p, n, None)?;
        let avail = incus.value("incus_memory_MemAvailable_bytes", p, n, None)?;
        let rss = incus.value("incus_memory_RSS_bytes", p, n, None).ok();
        let incus_used = (total - avail) / MIB as f64;
        let ours = r["memory_usage"].as_f64().context("memory_usage")?;
        let limit = r["memory_limit"].as_f64().context("memory_limit")?;
        eprintln!(
            "{id}: memory lxcmon {ours:.2} MiB, Incus MemTotal-MemAvailable {incus_used:.2} MiB, \
             Incus RSS {:?} MiB, limit lxcmon {limit} MiB / Incus {} MiB",
            rss.map(|v| v / MIB as f64),
            total / MIB as f64
        );
        assert!(
            (ours - incus_used).abs() <= 1.0,
            "{id}: memory {ours} MiB against Incus's {incus_used} MiB"
        );
        assert_eq!(limit, total / MIB as f64, "{id}: memory limit");
        if let Some(rss) = rss {
            assert!(
                ours * MIB as f64 >= rss,
                "{id}: usage without cache {ours} MiB below anonymous memory {rss}"
            );
        }
    }
    // The memory holder's 48 MiB in the first container, in both views.
    let ra = record(&records, DEFAULT_CT)?;
    assert!(ra["memory_usage"].as_f64().unwrap_or(0.0) >= 48.0, "{ra}");
    assert_eq!(kb.oom_kills, 1, "one OOM kill in {PEER}");

    // ---- cleanup leaves the host as it was ----
    let names = [a.lxc_name(), b.lxc_name()];
    drop(lab);
    for n in &names {
        assert!(
            !Path::new(LXCPATH).join(n).exists(),
            "{n} still in {LXCPATH} after the lab"
        );
        assert!(
            !Path::new("/sys/fs/cgroup/memory")
                .join(format!("lxc.payload.{n}"))
                .exists()
                && !Path::new("/sys/fs/cgroup")
                    .join(format!("lxc.payload.{n}"))
                    .exists(),
            "{n}'s cgroup is still there"
        );
    }
    if created_network {
        assert!(
            !Path::new("/sys/class/net").join(BRIDGE).exists(),
            "{BRIDGE} still there"
        );
    }
    eprintln!("incus: whole test {:?}", t0.elapsed());
    Ok(())
}
