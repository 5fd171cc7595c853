//! The whole agent against fake cgroupfs/procfs trees: every layout it supports, odd values,
//! and containers that vanish. The real kernel is covered by `lxc_host.rs` and the VM tests.

mod common;

use common::*;
use lxcmon::config::{Config, ExportFormat};
use serde_json::Value;

use std::process::Stdio;
use std::time::Duration;

/// Plain LXC on a hybrid host: figures from v1 controllers, `lxc.payload.<name>`.
fn plain_lxc_hybrid() -> Tree {
    let t = Tree::new(HYBRID);
    t.file("sys/fs/cgroup/unified/cgroup.controllers", "");
    let v1 = |ctrl: &str, name: &str, file: &str, content: &str| {
        t.file(
            &format!("sys/fs/cgroup/{ctrl}/lxc.payload.{name}/{file}"),
            content,
        )
    };
    for (name, pid, usage, cache) in [
        ("web", 3001u32, 200 * MIB, 50 * MIB),
        ("db", 4001, 80 * MIB, 0),
    ] {
        v1("cpu,cpuacct", name, "cpuacct.usage", "7000000000\n");
        v1("cpu,cpuacct", name, "cpu.cfs_quota_us", "-1\n");
        v1("cpu,cpuacct", name, "cpu.cfs_period_us", "100000\n");
        v1(
            "cpuset",
            name,
            "cpuset.effective_cpus",
            if name == "web" { "0\n" } else { "0-3\n" },
        );
        v1(
            "memory",
            name,
            "memory.usage_in_bytes",
            &format!("{usage}\n"),
        );
        v1(
            "memory",
            name,
            "memory.stat",
            &if name == "web" {
                // Swap accounting on: the kernel adds total_swap (as memsw - usage below).
                format!(
                    "cache 1\ntotal_cache {cache}\ntotal_rss 5\ntotal_swap {}\n",
                    3 * MIB
                )
            } else {
                format!("cache 1\ntotal_cache {cache}\ntotal_rss 5\n")
            },
        );
        v1(
            "memory",
            name,
            "memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        v1("blkio", name, "blkio.throttle.io_service_bytes_recursive", "254:0 Read 8192\n254:0 Write 65536\n254:0 Sync 0\n254:0 Total 73728\n7:0 Read 5\n7:0 Write 5\nTotal 73738\n");
        v1("pids", name, "pids.current", "4\n");
        v1(
            "pids",
            name,
            "cgroup.procs",
            &format!("{pid}\n{}\n", pid + 1),
        );
        v1("pids", name, ".lxc/cgroup.procs", &format!("{}\n", pid + 2));
        t.process(pid, &format!("{pid}\t1"), Some((100, 200)));
        t.process(pid + 1, &format!("{}\t2", pid + 1), None);
        t.process(pid + 2, &format!("{}\t3", pid + 2), None);
    }
    // web has swap accounting; db has none (no memsw files at all).
    v1(
        "memory",
        "web",
        "memory.memsw.usage_in_bytes",
        &format!("{}\n", 200 * MIB + 3 * MIB),
    );
    v1(
        "memory",
        "web",
        "memory.memsw.limit_in_bytes",
        "9223372036854771712\n",
    );
    for ctrl in ["memory", "pids", "cpu,cpuacct"] {
        t.file(
            &format!("sys/fs/cgroup/{ctrl}/lxc.monitor.web/cgroup.procs"),
            "998\n",
        );
    }
    t
}

/// Proxmox VE 6: hybrid v1, `<controller>/lxc/<vmid>/ns`.
fn proxmox_v1() -> Tree {
    let t = Tree::new(HYBRID);
    t.file("sys/fs/cgroup/unified/cgroup.controllers", "");
    let f = |ctrl: &str, file: &str, content: &str| {
        t.file(&format!("sys/fs/cgroup/{ctrl}/lxc/200/{file}"), content)
    };
    f(
        "cpu,cpuacct",
        "cpuacct.usage",
        "1
",
    );
    f(
        "cpu,cpuacct",
        "cpu.cfs_quota_us",
        "150000
",
    );
    f(
        "cpu,cpuacct",
        "cpu.cfs_period_us",
        "100000
",
    );
    f(
        "cpuset",
        "cpuset.cpus",
        "0-3
",
    );
    f(
        "memory",
        "memory.usage_in_bytes",
        &format!("{}\n", 40 * MIB),
    );
    f(
        "memory",
        "memory.stat",
        &format!("total_cache {}\n", 8 * MIB),
    );
    f(
        "memory",
        "memory.limit_in_bytes",
        &format!("{}\n", 256 * MIB),
    );
    f(
        "memory",
        "memory.memsw.usage_in_bytes",
        &format!("{}\n", 41 * MIB),
    );
    f(
        "memory",
        "memory.memsw.limit_in_bytes",
        &format!("{}\n", 512 * MIB),
    );
    f(
        "blkio",
        "blkio.throttle.io_service_bytes_recursive",
        "Total 0\n",
    );
    f("pids", "pids.current", "2\n");
    f("pids", "cgroup.procs", "");
    f("pids", "ns/cgroup.procs", "5001\n5002\n");
    t.process(5001, "5001\t1", Some((10, 20)));
    t.process(5002, "5002\t9", None);
    t.file("etc/pve/lxc/200.conf", "hostname: legacy\n");
    for ctrl in ["memory", "pids"] {
        t.file(
            &format!("sys/fs/cgroup/{ctrl}/lxc.monitor/200/cgroup.procs"),
            "997\n",
        );
    }
    t
}

/// Plain LXC 5 on a pure v2 host (Debian 12 with systemd): `lxc.payload.<name>`, `.lxc` child.
fn plain_lxc_v2() -> Tree {
    let t = Tree::new(V2);
    t.file(
        "sys/fs/cgroup/cgroup.controllers",
        "cpuset cpu io memory pids\n",
    );
    let c = "sys/fs/cgroup/lxc.payload.app";
    t.file(&format!("{c}/cpu.stat"), "usage_usec 1\n");
    t.file(&format!("{c}/memory.current"), &format!("{}\n", 20 * MIB));
    t.file(&format!("{c}/memory.stat"), &format!("file {}\n", 4 * MIB));
    t.file(&format!("{c}/memory.swap.current"), "0\n");
    t.file(
        &format!("{c}/io.stat"),
        "254:0 rbytes=512 wbytes=1024 rios=1 wios=1 dbytes=0 dios=0\n",
    );
    t.file(&format!("{c}/pids.current"), "3\n");
    t.file(&format!("{c}/cgroup.procs"), "6001\n");
    t.file(&format!("{c}/.lxc/cgroup.procs"), "6002\n6003\n");
    t.process(6001, "6001\t1", Some((1, 1)));
    t.process(6002, "6002\t7", None);
    t.process(6003, "6003\t8", None);
    t.file("sys/fs/cgroup/lxc.monitor.app/cgroup.procs", "996\n");
    t
}

#[test]
fn proxmox_6_on_v1() {
    let t = proxmox_v1();
    let records = once(&t, ExportFormat::Records);
    assert_eq!(records.len(), 1);
    let r = by_id(&records, "200");
    assert_eq!(r["container_name"], "legacy");
    assert_eq!(r["cpu_cores_allowed"], 1.5, "cfs quota 150000/100000");
    assert_eq!(r["memory_usage"], 32.0);
    assert_eq!(r["swap_usage"], 1.0);
    assert_eq!(r["memory_limit"], 256.0);
    assert_eq!(r["process_count"], 2);
    assert_eq!(r["io_write_bytes"], 0);
    let cycles = once(&t, ExportFormat::AutoscaleMl);
    assert_eq!(
        cycles[0]["200"]["swap_total_mb"], 256.0,
        "memsw limit - memory limit"
    );
}

#[test]
fn v1_io_counting_is_switched_on_for_non_excluded_disks_on_new_kernels() {
    for (kernel, enabled, expect) in [
        ("6.18.44-fc\n", true, Some("254:0 0\n")),
        ("6.18.44-fc\n", false, None),
        ("6.8.12-pve\n", true, None),
    ] {
        let t = proxmox_v1();
        t.file("proc/sys/kernel/osrelease", kernel);
        // Written in name order: loop0 would come last if it were not excluded.
        for (name, dev) in [("hda", "254:0"), ("loop0", "7:0")] {
            t.file(&format!("sys/block/{name}/dev"), &format!("{dev}\n"));
        }
        let rules = t.path("sys/fs/cgroup/blkio/blkio.throttle.write_bps_device");
        let mut cfg = config(0.1, ExportFormat::Records);
        cfg.monitoring.enable_v1_io_accounting = enabled;
        lxcmon::daemon::Pipeline::new(&cfg, t.root()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&rules).ok().as_deref(),
            expect,
            "{kernel} {enabled}"
        );
    }
}

/// A disk with a throttle rule already keeps it: writing the unlimited rule would remove an
/// administrator's limit.
#[test]
fn v1_io_counting_keeps_an_existing_throttle_rule() {
    let t = proxmox_v1();
    t.file("proc/sys/kernel/osrelease", "6.18.44-fc\n");
    t.file("sys/block/hda/dev", "254:0\n");
    let rules = t.path("sys/fs/cgroup/blkio/blkio.throttle.write_bps_device");
    t.file(
        "sys/fs/cgroup/blkio/blkio.throttle.write_bps_device",
        "254:0 1048576\n",
    );
    lxcmon::daemon::Pipeline::new(&config(0.1, ExportFormat::Records), t.root()).unwrap();
    assert_eq!(
        std::fs::read_to_string(&rules).unwrap(),
        "254:0 1048576\n",
        "the limit stays"
    );
}

/// `--once` is a diagnostic run: it writes no throttle rule (the daemon does, above).
#[test]
fn once_writes_no_v1_throttle_rule() {
    let t = proxmox_v1();
    t.file("proc/sys/kernel/osrelease", "6.18.44-fc\n");
    t.file("sys/block/hda/dev", "254:0\n");
    let rules = t.path("sys/fs/cgroup/blkio/blkio.throttle.write_bps_device");
    let records = once(&t, ExportFormat::Records);
    assert_eq!(records.len(), 1);
    assert!(
        !rules.exists(),
        "--once wrote {:?}",
        std::fs::read_to_string(&rules)
    );
}

#[test]
fn plain_lxc_on_pure_v2() {
    let t = plain_lxc_v2();
    let records = once(&t, ExportFormat::Records);
    assert_eq!(records.len(), 1);
    let r = by_id(&records, "app");
    assert_eq!(r["memory_usage"], 16.0);
    assert_eq!(r["process_count"], 3, "attached processes in .lxc count");
    assert_eq!(r["io_read_bytes"], 512);
    assert_eq!(
        r["cpu_cores_allowed"], 4.0,
        "no cpu.max or cpuset files: the host's CPUs"
    );
}

fn config(interval: f64, format: ExportFormat) -> Config {
    let mut c = Config::default();
    c.monitoring.check_interval = Duration::from_secs_f64(interval);
    c.monitoring.export_format = format;
    c.monitoring.retry_delay = Duration::from_millis(10);
    c
}

fn once(tree: &Tree, format: ExportFormat) -> Vec<Value> {
    let doc = lxcmon::daemon::once(&config(0.1, format), tree.root()).unwrap();
    let v: Value = serde_json::from_slice(&doc).unwrap();
    v.as_array().unwrap().clone()
}

fn by_id<'a>(records: &'a [Value], id: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["container_id"] == id)
        .unwrap_or_else(|| panic!("{id} missing from {records:#?}"))
}

#[test]
fn proxmox_pure_v2() {
    let t = proxmox_v2();
    let records = once(&t, ExportFormat::Records);
    let ids: Vec<_> = records
        .iter()
        .map(|r| r["container_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec!["100", "101"],
        "102 vanished, monitors are no containers"
    );

    let r = by_id(&records, "100");
    assert_eq!(r["container_name"], "web-100");
    assert_eq!(r["cpu_usage"], 0.0, "no CPU time between the samples");
    assert_eq!(
        r["cpu_cores_allowed"], 0.5,
        "quota 0.5 < cpuset 2 < online 4"
    );
    assert_eq!(r["memory_usage"], 200.0, "current - file");
    assert_eq!(r["swap_usage"], 10.0);
    assert_eq!(r["io_read_bytes"], 4096, "loop0 excluded");
    assert_eq!(r["io_write_bytes"], 1048576);
    assert_eq!(r["network_received_bytes"], 5000, "lo excluded");
    assert_eq!(r["network_transmitted_bytes"], 7000);
    assert_eq!(
        r["process_count"], 3,
        "processes in ns/ and nested below it"
    );
    assert_eq!(r["thread_count"], 5);
    assert_eq!(r["memory_limit"], 8192.0, "unlimited: the host's memory");

    let fs = &r["filesystem_usage"];
    let st = rustix::fs::statvfs(t.path("proc/1001/root")).unwrap();
    assert_eq!(fs["total"], st.f_blocks * st.f_frsize);
    assert!(fs["free"].as_u64().unwrap() <= fs["total"].as_u64().unwrap());

    let r = by_id(&records, "101");
    assert_eq!(r["container_name"], "db");
    assert_eq!(r["swap_usage"], 0.0, "no swap accounting reads 0");
    assert_eq!(r["io_write_bytes"], 0);
    assert_eq!(r["memory_limit"], 512.0);
    assert_eq!(r["cpu_cores_allowed"], 4.0);
    assert_eq!(r["network_received_bytes"], 1);
}

#[test]
fn proxmox_autoscale_ml_cycle() {
    let t = proxmox_v2();
    let cycles = once(&t, ExportFormat::AutoscaleMl);
    assert_eq!(cycles.len(), 1);
    let c = cycles[0].as_object().unwrap();
    let mut keys: Vec<_> = c.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, vec!["100", "101", "summary"]);
    assert_eq!(c["100"]["io_stats"]["writes"], 1048576 / 512);
    assert_eq!(
        c["100"]["swap_total_mb"], 1024.0,
        "unlimited swap: the host's swap"
    );
    assert_eq!(c["summary"]["total_containers"], 3);
    assert_eq!(c["summary"]["collected_containers"], 2);
    assert_eq!(c["summary"]["collector"], "files");
}

#[test]
fn plain_lxc_on_hybrid_v1() {
    let t = plain_lxc_hybrid();
    let records = once(&t, ExportFormat::Records);
    assert_eq!(records.len(), 2);
    let web = by_id(&records, "web");
    assert_eq!(web["container_name"], "web");
    assert_eq!(web["memory_usage"], 150.0, "usage - total_cache");
    assert_eq!(web["swap_usage"], 3.0, "total_swap");
    assert_eq!(web["io_read_bytes"], 8192);
    assert_eq!(web["io_write_bytes"], 65536);
    assert_eq!(
        web["process_count"], 3,
        "processes in the payload cgroup and .lxc"
    );
    assert_eq!(web["thread_count"], 4);
    assert_eq!(web["cpu_cores_allowed"], 1.0, "cpuset of one CPU");
    assert_eq!(web["network_received_bytes"], 100);
    let db = by_id(&records, "db");
    assert_eq!(db["swap_usage"], 0.0);
    assert_eq!(db["cpu_cores_allowed"], 4.0);
    assert_eq!(db["memory_usage"], 80.0);
}

/// On a hybrid host the processes are read from the container's cgroup in the unified tree
/// (its `cgroup.procs` is not cached, so it stays open); v1 only where that cgroup is missing.
#[test]
fn hybrid_host_counts_processes_in_the_unified_tree() {
    let t = plain_lxc_hybrid();
    t.file(
        "sys/fs/cgroup/unified/lxc.payload.web/cgroup.procs",
        "3001\n",
    );
    t.file(
        "sys/fs/cgroup/unified/lxc.payload.web/init.scope/cgroup.procs",
        "3002\n3003\n3005\n",
    );
    t.process(3005, "3005\t4", None);
    let records = once(&t, ExportFormat::Records);
    assert_eq!(
        by_id(&records, "web")["process_count"],
        4,
        "unified subtree"
    );
    assert_eq!(
        by_id(&records, "db")["process_count"],
        3,
        "v1: no unified cgroup"
    );
}

#[test]
fn cpu_time_between_samples_shows_as_percent() {
    let t = plain_lxc_hybrid();
    // 100 CPU-seconds within ~0.1 s is far over the one allowed CPU: clamped to 100 %.
    t.file(
        "sys/fs/cgroup/cpu,cpuacct/lxc.payload.web/cpuacct.usage",
        "0\n",
    );
    let mut cfg = config(0.1, ExportFormat::Records);
    cfg.monitoring.parallel_processing = false;
    let mut c = lxcmon::daemon::Pipeline::new(&cfg, t.root()).unwrap();
    assert!(
        c.cycle().unwrap().metrics.is_empty(),
        "first sample: baseline only"
    );
    t.file(
        "sys/fs/cgroup/cpu,cpuacct/lxc.payload.web/cpuacct.usage",
        "100000000000\n",
    );
    std::thread::sleep(Duration::from_millis(100));
    let cycle = c.cycle().unwrap();
    let web = cycle.metrics.iter().find(|m| m.id == "web").unwrap();
    assert_eq!(web.cpu_percent, 100.0);
    let db = cycle.metrics.iter().find(|m| m.id == "db").unwrap();
    assert_eq!(db.cpu_percent, 0.0);
}

#[test]
fn malformed_file_fails_that_container_only() {
    let t = proxmox_v2();
    t.file("sys/fs/cgroup/lxc/101/memory.current", "");
    let mut cfg = config(0.1, ExportFormat::Records);
    cfg.monitoring.retry_limit = 2;
    let mut c = lxcmon::daemon::Pipeline::new(&cfg, t.root()).unwrap();
    c.cycle().unwrap();
    let cycle = c.cycle().unwrap();
    let ids: Vec<_> = cycle.metrics.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["100"]);
    assert_eq!(cycle.total_containers, 3);
    // Fixed on disk: back in the next cycles (a fresh baseline first).
    t.file("sys/fs/cgroup/lxc/101/memory.current", "1048576\n");
    c.cycle().unwrap();
    let cycle = c.cycle().unwrap();
    assert_eq!(cycle.metrics.len(), 2);
}

#[test]
fn bad_config_names_key_and_line_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "logging:\n  log_level: INFO\nmonitoring:\n  check_interval: 0\n",
    )
    .unwrap();
    let out = agent(&["--check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("check_interval") && err.contains("line 4"),
        "{err}"
    );

    let good = dir.path().join("good.yaml");
    std::fs::write(&good, "monitoring:\n  check_interval: 0.5\n").unwrap();
    let out = agent(&["--check-config", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());

    let out = agent(&[
        "--check-config",
        "--config",
        dir.path().join("absent.yaml").to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn daemon_exports_cycles_follows_churn_and_stops_on_sigterm() {
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("metrics.json");
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  check_interval: 0.1\n  max_metrics_entries: 5\n  export_file: {}\n",
            dir.path().join("agent.log").display(),
            export.display()
        ),
    )
    .unwrap();
    let mut child = daemon_on(&cfg, t.root());
    let read = || -> Vec<Value> {
        std::fs::read(&export)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    };
    let wait_for = |cond: &dyn Fn(&[Value]) -> bool| {
        for _ in 0..100 {
            if cond(&read()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(
        wait_for(&|r| r.len() >= 10),
        "5 cycles of 2 containers: {:?}",
        read().len()
    );
    // 101 stops: its cgroup goes away.
    std::fs::remove_dir_all(t.path("sys/fs/cgroup/lxc/101")).unwrap();
    assert!(wait_for(
        &|r| r.len() == 5 && r.iter().all(|x| x["container_id"] == "100")
    ));

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let records = read();
    let stamps: Vec<_> = records
        .iter()
        .map(|r| r["timestamp"].as_str().unwrap().to_string())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert!(std::fs::read_to_string(dir.path().join("agent.log"))
        .unwrap()
        .contains("lxcmon started"));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn log_file_rotates_by_size_and_keeps_backup_count() {
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\n  log_max_bytes: 2000\n  log_backup_count: 2\n  log_level: DEBUG\nmonitoring:\n  check_interval: 0.1\n  export_file: {}\n",
            log.display(),
            dir.path().join("m.json").display()
        ),
    )
    .unwrap();
    let mut child = daemon_on(&cfg, t.root());
    let rotated = |n: u32| dir.path().join(format!("agent.log.{n}"));
    for _ in 0..100 {
        if rotated(2).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    assert!(rotated(1).exists() && rotated(2).exists(), "rotated files");
    assert!(!rotated(3).exists(), "at most log_backup_count backups");
    let size = std::fs::metadata(rotated(1)).unwrap().len();
    assert!(
        (2000..4000).contains(&size),
        "rotated near log_max_bytes: {size}"
    );
}

#[test]
fn unwritable_log_file_falls_back_to_stderr() {
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    // A path below a regular file can never be created.
    std::fs::write(dir.path().join("file"), "").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  check_interval: 0.1\n",
            dir.path().join("file/sub/agent.log").display()
        ),
    )
    .unwrap();
    let out = agent(&[
        "--once",
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        t.root().to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot write the log file"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "the agent still ran");
}

/// systemd starts services with a soft limit of 1024 open files; the agent keeps about a dozen
/// per container open, so it raises the soft limit to the hard one itself.
#[test]
fn more_containers_than_the_soft_open_file_limit_allows() {
    let (out, stderr) = once_under_ulimit("ulimit -Sn 64", 60, false);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 60, "{stderr}");
}

/// Past the hard limit (20000 on some hosts: a thousand containers with every figure on), the
/// containers that do not fit are left out at once, not retried (the seed's retries sleep 2 s
/// each, a cycle of hours), and the log says why once, not once per container.
#[test]
fn past_the_hard_open_file_limit_containers_are_left_out_with_one_warning() {
    let (out, stderr) = once_under_ulimit("ulimit -Sn 64 && ulimit -Hn 64", 60, false);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v.as_array().unwrap().len();
    assert!(n > 0 && n < 60, "{n} containers exported\n{stderr}");
    assert_eq!(
        stderr.matches("open file limit reached").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("left out of this cycle"), "{stderr}");
    assert!(!stderr.contains("retrying"), "{stderr}");
}

/// Where holding every file does not fit the limit but holding all but the rarely read ones
/// does, the agent lets go of those (the limits, the child cgroups' process lists) and reads
/// every container, with the same figures: its limits included, and the processes of its
/// child cgroup.
#[test]
fn short_of_descriptors_the_rarely_read_files_are_let_go_and_every_container_is_read() {
    // Per container 15 files held (8 per cycle, 6 limits, a child's cgroup.procs), 8 let go.
    let n = 40;
    let (out, stderr) = once_under_ulimit("ulimit -Sn 400 && ulimit -Hn 400", n, true);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = v.as_array().unwrap();
    assert_eq!(records.len(), n as usize, "{stderr}");
    for r in records {
        assert_eq!(r["memory_limit"], 512.0, "{r}");
        assert_eq!(r["cpu_cores_allowed"], 0.5, "{r}");
        assert_eq!(r["process_count"], 2, "the child cgroup's process too: {r}");
        assert_eq!(r["limits"]["pids_max"], 77, "{r}");
    }
    assert_eq!(stderr.matches("descriptors short").count(), 1, "{stderr}");
    assert!(!stderr.contains("open file limit reached"), "{stderr}");
    // With room for everything nothing is let go.
    let (out, stderr) = once_under_ulimit("ulimit -Sn 4000", n, true);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("descriptors short"), "{stderr}");
}

/// The agent's `--once` over `n` containers, started under `limits` (a shell `ulimit` line);
/// with `limits_and_child`, each has every v2 limit file and a child cgroup with a process.
fn once_under_ulimit(
    limits: &str,
    n: u32,
    limits_and_child: bool,
) -> (std::process::Output, String) {
    let t = Tree::new(V2);
    t.file("sys/fs/cgroup/cgroup.controllers", "cpu io memory pids\n");
    for i in 0..n {
        let c = format!("sys/fs/cgroup/lxc.payload.c{i}");
        let pid = 20_000 + i;
        t.file(&format!("{c}/cpu.stat"), "usage_usec 1\n");
        t.file(&format!("{c}/memory.current"), &format!("{}\n", 8 * MIB));
        t.file(&format!("{c}/memory.stat"), "file 0\n");
        t.file(&format!("{c}/memory.swap.current"), "0\n");
        t.file(&format!("{c}/io.stat"), "");
        t.file(&format!("{c}/pids.current"), "1\n");
        t.file(&format!("{c}/cgroup.procs"), &format!("{pid}\n"));
        t.process(pid, &format!("{pid}\t1"), Some((1, 1)));
        if limits_and_child {
            t.file(&format!("{c}/memory.max"), &format!("{}\n", 512 * MIB));
            t.file(&format!("{c}/memory.swap.max"), "0\n");
            t.file(&format!("{c}/memory.high"), "max\n");
            t.file(&format!("{c}/cpu.max"), "50000 100000\n");
            t.file(&format!("{c}/cpuset.cpus.effective"), "0-1\n");
            t.file(&format!("{c}/pids.max"), "77\n");
            t.file(
                &format!("{c}/ns/cgroup.procs"),
                &format!("{}\n", pid + 1000),
            );
        } else {
            t.file(&format!("{c}/memory.max"), "max\n");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    std::fs::write(&cfg, "monitoring:\n  check_interval: 0.1\n").unwrap();
    let out = std::process::Command::new("sh")
        .args(["-c", &format!(r#"{limits} && exec "$@""#), "sh"])
        .arg(env!("CARGO_BIN_EXE_lxcmon"))
        .args(["--once", "--config"])
        .arg(&cfg)
        .arg("--root")
        .arg(t.root())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}
