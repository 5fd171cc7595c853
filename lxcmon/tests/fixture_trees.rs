//! The whole agent against fake cgroupfs/procfs trees: every layout it supports, odd values,
//! and containers that vanish. The real kernel is covered by `lxc_host.rs` and the VM tests.

use lxcmon::config::{Config, ExportFormat};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

struct Tree {
    dir: tempfile::TempDir,
}

const MIB: u64 = 1024 * 1024;

impl Tree {
    fn new(mountinfo: &str) -> Self {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        t.file("proc/self/mountinfo", mountinfo);
        t.file("sys/devices/system/cpu/online", "0-3\n");
        t.file(
            "proc/meminfo",
            "MemTotal:       8388608 kB\nSwapTotal:      1048576 kB\n",
        );
        t.file("proc/stat", "cpu  100 0 100 1000 0 0 0 0 0 0\n");
        t.file("proc/sys/kernel/osrelease", "6.1.0-test\n");
        for (dev, name) in [("254:0", "vda"), ("7:0", "loop0")] {
            let link = t.path("sys/dev/block").join(dev);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(format!("../../devices/virtual/block/{name}"), link)
                .unwrap();
        }
        t
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn file(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// A process: its status (with the NSpid chain), its network view and its root.
    fn process(&self, pid: u32, nspid: &str, net: Option<(u64, u64)>) {
        self.file(
            &format!("proc/{pid}/status"),
            &format!("Name:\tx\nPid:\t{pid}\nNSpid:\t{nspid}\n"),
        );
        if let Some((rx, tx)) = net {
            self.file(
                &format!("proc/{pid}/net/dev"),
                &format!(
                    "Inter-|   Receive |  Transmit\n face |bytes packets|bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: {rx} 10 0 0 0 0 0 0 {tx} 10 0 0 0 0 0 0\n"
                ),
            );
            std::fs::create_dir_all(self.path(&format!("proc/{pid}/root"))).unwrap();
        }
    }
}

const V2: &str =
    "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n";

const HYBRID: &str = "\
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
38 31 0:33 / /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
39 31 0:34 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
40 31 0:35 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
";

/// Proxmox VE 7/8: pure v2, `lxc/<vmid>` with processes below `ns/`.
fn proxmox_v2() -> Tree {
    let t = Tree::new(V2);
    t.file(
        "sys/fs/cgroup/cgroup.controllers",
        "cpuset cpu io memory pids\n",
    );
    let c = "sys/fs/cgroup/lxc/100";
    t.file(
        &format!("{c}/cpu.stat"),
        "usage_usec 5000000\nuser_usec 1\nsystem_usec 1\n",
    );
    t.file(&format!("{c}/cpu.max"), "50000 100000\n");
    t.file(&format!("{c}/cpuset.cpus.effective"), "0-1\n");
    t.file(&format!("{c}/memory.current"), &format!("{}\n", 300 * MIB));
    t.file(
        &format!("{c}/memory.stat"),
        &format!("anon {}\nfile {}\n", 150 * MIB, 100 * MIB),
    );
    t.file(
        &format!("{c}/memory.swap.current"),
        &format!("{}\n", 10 * MIB),
    );
    t.file(&format!("{c}/memory.swap.max"), "max\n");
    t.file(&format!("{c}/memory.max"), "max\n");
    t.file(
        &format!("{c}/io.stat"),
        "254:0 rbytes=4096 wbytes=1048576 rios=1 wios=4 dbytes=0 dios=0\n7:0 rbytes=999999 wbytes=999999 rios=1 wios=1 dbytes=0 dios=0\n",
    );
    t.file(&format!("{c}/pids.current"), "5\n");
    t.file(&format!("{c}/cgroup.procs"), "");
    t.file(&format!("{c}/ns/cgroup.procs"), "1001\n1002\n");
    t.file(&format!("{c}/ns/system.slice/cgroup.procs"), "");
    t.file(
        &format!("{c}/ns/system.slice/cron.service/cgroup.procs"),
        "1003\n",
    );
    t.process(1001, "1001\t1", Some((5000, 7000)));
    t.process(1002, "1002\t40", None);
    t.process(1003, "1003\t41", None);
    t.file("etc/pve/lxc/100.conf", "arch: amd64\nhostname: web-100\n");

    // 101: memory limit, no swap accounting, empty io.stat, one process.
    let c = "sys/fs/cgroup/lxc/101";
    t.file(&format!("{c}/cpu.stat"), "usage_usec 0\n");
    t.file(&format!("{c}/cpu.max"), "max 100000\n");
    t.file(&format!("{c}/memory.current"), &format!("{}\n", 64 * MIB));
    t.file(&format!("{c}/memory.stat"), "anon 1\nfile 0\n");
    t.file(&format!("{c}/memory.max"), &format!("{}\n", 512 * MIB));
    t.file(&format!("{c}/io.stat"), "");
    t.file(&format!("{c}/pids.current"), "1\n");
    t.file(&format!("{c}/ns/cgroup.procs"), "2001\n");
    t.file(&format!("{c}/cgroup.procs"), "");
    t.process(2001, "2001\t1", Some((1, 2)));
    t.file("etc/pve/lxc/101.conf", "hostname: db\n");

    // 102: listed, but its files are already gone (stopped between discovery and read).
    std::fs::create_dir_all(t.path("sys/fs/cgroup/lxc/102")).unwrap();
    // Monitor cgroups are never containers.
    t.file("sys/fs/cgroup/lxc.monitor/100/cgroup.procs", "999\n");
    t
}

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
            &format!("cache 1\ntotal_cache {cache}\ntotal_rss 5\n"),
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
        lxcmon::collect::Collector::new(&cfg, t.root()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&rules).ok().as_deref(),
            expect,
            "{kernel} {enabled}"
        );
    }
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
    assert_eq!(web["swap_usage"], 3.0, "memsw - usage");
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
    let mut c = lxcmon::collect::Collector::new(&cfg, t.root()).unwrap();
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
    let mut c = lxcmon::collect::Collector::new(&cfg, t.root()).unwrap();
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

fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lxcmon"));
    cmd.args(args).stdin(Stdio::null());
    cmd
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
    let mut child = agent(&[
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        t.root().to_str().unwrap(),
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
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
    let mut child = agent(&[
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        t.root().to_str().unwrap(),
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
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
