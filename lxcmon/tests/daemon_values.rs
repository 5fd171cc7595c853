//! The daemon's figures across cycles on fixture trees: process counts on cgroup v1 that follow
//! a changed pid list, counters that never go backwards (interface gone, transient read error,
//! reload), a restarted container that is a new instance, and non-UTF-8 cgroup names.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// One plain-LXC container `name` on a hybrid (v1) tree, init `pid` with `net_dev` as its view.
fn v1_container(t: &Tree, name: &str, pid: u32, net_dev: &str) {
    let v1 = |ctrl: &str, file: &str, content: &str| {
        t.file(
            &format!("sys/fs/cgroup/{ctrl}/lxc.payload.{name}/{file}"),
            content,
        )
    };
    v1("cpu,cpuacct", "cpuacct.usage", "1000000000\n");
    v1(
        "memory",
        "memory.usage_in_bytes",
        &format!("{}\n", 10 * MIB),
    );
    v1("memory", "memory.stat", "total_cache 0\n");
    v1("pids", "pids.current", "1\n");
    v1("pids", "cgroup.procs", &format!("{pid}\n"));
    t.process(pid, &format!("{pid}\t1"), Some((0, 0)));
    t.file(&format!("proc/{pid}/net/dev"), net_dev);
}

fn net_dev(ifaces: &[(&str, u64)]) -> String {
    let mut s = String::from("Inter-| Receive | Transmit\n face |bytes|bytes\n");
    for (name, rx) in ifaces {
        s.push_str(&format!(
            "  {name}: {rx} 1 0 0 0 0 0 0 {} 1 0 0 0 0 0 0\n",
            rx / 2
        ));
    }
    s
}

fn hybrid() -> Tree {
    let t = Tree::new(HYBRID);
    t.file("sys/fs/cgroup/unified/cgroup.controllers", "");
    t
}

/// Replaces a file by a new one (a new inode) under the same name.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Daemon {
    child: Running,
    export: std::path::PathBuf,
    cfg: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(t: &Tree, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("metrics.json");
        let cfg = dir.path().join("cfg.yaml");
        std::fs::write(
            &cfg,
            format!(
                "monitoring:\n  check_interval: 0.1\n  retry_limit: 1\n  retry_delay: 0.01\n  max_metrics_entries: 1000\n  export_file: {}\n{extra}",
                export.display()
            ),
        )
        .unwrap();
        let child = daemon_on(&cfg, t.root());
        Self {
            child,
            export,
            cfg,
            _dir: dir,
        }
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read(&self.export)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// Records of `id`, oldest first.
    fn of(&self, id: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["container_id"] == id)
            .collect()
    }

    /// Waits until `n` more records of `id` have been exported.
    fn cycles(&self, id: &str, n: usize) -> Vec<Value> {
        let start = self.of(id).len();
        for _ in 0..200 {
            let now = self.of(id);
            if now.len() >= start + n {
                return now;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("{id}: fewer than {n} new cycles in 5 s");
    }

    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            sig,
        )
        .unwrap();
    }
}

fn field(r: &Value, k: &str) -> u64 {
    r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"))
}

fn assert_monotonic(records: &[Value]) {
    for k in ["network_received_bytes", "network_transmitted_bytes"] {
        let v: Vec<u64> = records.iter().map(|r| field(r, k)).collect();
        assert!(
            v.windows(2).all(|w| w[0] <= w[1]),
            "{k} went backwards: {v:?}"
        );
    }
}

#[test]
fn v1_process_count_follows_every_cycle() {
    let t = hybrid();
    v1_container(&t, "c1", 3001, &net_dev(&[("eth0", 100)]));
    let d = Daemon::start(&t, "");
    let procs = t.path("sys/fs/cgroup/pids/lxc.payload.c1/cgroup.procs");
    assert_eq!(field(d.cycles("c1", 2).last().unwrap(), "process_count"), 1);
    // The kernel hands a held v1 pid list out unchanged; a file replaced under the same name
    // is what a held descriptor equally cannot follow.
    for pid in 3002..3005 {
        t.process(pid, &format!("{pid}\t2"), None);
    }
    replace(&procs, "3001\n3002\n3003\n3004\n");
    d.cycles("c1", 1);
    assert_eq!(field(d.cycles("c1", 1).last().unwrap(), "process_count"), 4);
    replace(&procs, "3001\n3003\n");
    d.cycles("c1", 1);
    assert_eq!(field(d.cycles("c1", 1).last().unwrap(), "process_count"), 2);
}

#[test]
fn counters_survive_a_vanished_interface_and_a_transient_read_error() {
    let t = hybrid();
    v1_container(
        &t,
        "c1",
        3001,
        &net_dev(&[("eth0", 300_000), ("eth1", 771_000)]),
    );
    let d = Daemon::start(&t, "");
    d.cycles("c1", 2);
    t.file("proc/3001/net/dev", &net_dev(&[("eth0", 300_000)]));
    let r = d.cycles("c1", 2);
    assert_eq!(
        field(r.last().unwrap(), "network_received_bytes"),
        1_071_000
    );
    // Unreadable for a few cycles (retries exhausted), then readable again.
    let usage = t.path("sys/fs/cgroup/cpu,cpuacct/lxc.payload.c1/cpuacct.usage");
    std::fs::write(&usage, "garbage\n").unwrap();
    std::thread::sleep(Duration::from_millis(400));
    std::fs::write(&usage, "2000000000\n").unwrap();
    let r = d.cycles("c1", 3);
    assert_eq!(
        field(r.last().unwrap(), "network_received_bytes"),
        1_071_000
    );
    assert_monotonic(&r);
}

#[test]
fn reload_keeps_the_counters_of_vanished_interfaces() {
    let t = hybrid();
    v1_container(
        &t,
        "c1",
        3001,
        &net_dev(&[("eth0", 300_000), ("eth1", 771_000)]),
    );
    let d = Daemon::start(&t, "");
    d.cycles("c1", 2);
    t.file("proc/3001/net/dev", &net_dev(&[("eth0", 300_000)]));
    d.cycles("c1", 2);
    // A changed configuration, as an admin's reload brings.
    let cfg = std::fs::read_to_string(&d.cfg).unwrap();
    std::fs::write(&d.cfg, format!("{cfg}  max_workers: 2\n")).unwrap();
    d.signal(rustix::process::Signal::HUP);
    std::thread::sleep(Duration::from_millis(300));
    let r = d.cycles("c1", 3);
    assert_eq!(
        field(r.last().unwrap(), "network_received_bytes"),
        1_071_000
    );
    assert_monotonic(&r);
}

#[test]
fn a_restarted_container_is_a_new_instance() {
    let t = hybrid();
    v1_container(&t, "c1", 3001, &net_dev(&[("eth0", 1_000_000)]));
    let d = Daemon::start(&t, "");
    let before = d.cycles("c1", 2);
    let started = before.last().unwrap()["started"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&started).is_ok(),
        "{started}"
    );
    assert_eq!(before.last().unwrap()["network_received_bytes"], 1_000_000);

    // Stopped and started again between two cycles: new cgroups (new directories, made while
    // the old ones still exist so they cannot share an inode), a new init, counters from zero.
    let staged = tempfile::tempdir_in(t.root()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    for ctrl in ["cpu,cpuacct", "memory", "pids"] {
        let live = t.path(&format!("sys/fs/cgroup/{ctrl}/lxc.payload.c1"));
        let new = staged.path().join(ctrl);
        std::fs::create_dir_all(&new).unwrap();
        for entry in std::fs::read_dir(&live).unwrap().flatten() {
            std::fs::copy(entry.path(), new.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(
        staged.path().join("cpu,cpuacct/cpuacct.usage"),
        "5000000000\n",
    )
    .unwrap();
    std::fs::write(staged.path().join("pids/cgroup.procs"), "4001\n").unwrap();
    t.process(4001, "4001\t1", Some((0, 0)));
    t.file("proc/4001/net/dev", &net_dev(&[("eth0", 500)]));
    // The hierarchy discovery scans (memory) is replaced last: a cycle that sees the new
    // instance sees all of its cgroups, as on a real host, where a restarted container's
    // cgroups exist before its processes do (a cycle between two of these renames must not
    // read the old init's files for the new instance).
    for ctrl in ["cpu,cpuacct", "pids", "memory"] {
        let live = t.path(&format!("sys/fs/cgroup/{ctrl}/lxc.payload.c1"));
        std::fs::remove_dir_all(&live).unwrap();
        std::fs::rename(staged.path().join(ctrl), &live).unwrap();
    }
    let after = d.cycles("c1", 3);
    let last = after.last().unwrap();
    assert_eq!(last["network_received_bytes"], 500, "counters start afresh");
    assert_ne!(
        last["started"].as_str().unwrap(),
        started,
        "a new start time"
    );
    // No cycle's CPU % spans the two instances (4 s of CPU in 0.1 s would read 100 %).
    for r in &after {
        assert_eq!(r["cpu_usage"], 0.0, "{r}");
    }
}

#[test]
fn non_utf8_cgroup_names_are_exported_escaped() {
    use std::os::unix::ffi::OsStrExt;
    let t = hybrid();
    v1_container(&t, "ok", 3001, &net_dev(&[("eth0", 1)]));
    for ctrl in ["cpu,cpuacct", "memory", "pids"] {
        let from = t.path(&format!("sys/fs/cgroup/{ctrl}/lxc.payload.ok"));
        let to = from
            .parent()
            .unwrap()
            .join(std::ffi::OsStr::from_bytes(b"lxc.payload.caf\xe9"));
        copy_dir(&from, &to);
    }
    let doc = lxcmon::daemon::once(
        &{
            let mut c = lxcmon::config::Config::default();
            c.monitoring.check_interval = Duration::from_millis(100);
            c
        },
        t.root(),
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&doc).unwrap();
    let ids: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["container_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["caf\\xe9", "ok"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}
