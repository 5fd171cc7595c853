//! The process count on this host's real cgroup v1 `pids` hierarchy, read the way the daemon
//! reads it: one reader kept across cycles, re-read every 0.2 s while processes are moved in
//! and killed. The kernel caches a v1 pid list for an open `cgroup.procs` for about a second,
//! so a reader that held the file would report a frozen count here.
//!
//! Root, a v1 `pids` and `cpuacct` hierarchy (this host is hybrid); run under the lab's lock:
//! `flock /tmp/lxcmon-root.lock cargo test -p lxcmon --test v1_pid_list_host -- --ignored`.

use lxcmon::readers::cgroup::details::DetailOptions;
use lxcmon::readers::cgroup::{CgroupReader, Layout, Mode};
use lxcmon::readers::sysfs::DeviceFilter;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The test's cgroups and processes, removed whatever happens.
struct Lab {
    dirs: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
#[ignore = "needs root and a cgroup v1 pids hierarchy; run under the lab lock"]
fn v1_process_count_follows_every_read_at_a_short_interval() {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let layout = Layout::detect(Path::new("/")).unwrap();
    assert_eq!(
        layout.mode(),
        Some(Mode::V1),
        "this test is for v1/hybrid hosts"
    );
    let pids_root = layout
        .controller("pids")
        .expect("v1 pids hierarchy")
        .to_path_buf();
    let rel = PathBuf::from(format!("lxcmon-t-pidlist-{}", std::process::id()));
    let mut lab = Lab {
        dirs: Vec::new(),
        children: Vec::new(),
    };
    for ctrl in ["pids", "cpuacct"] {
        let dir = layout.controller(ctrl).unwrap().join(&rel);
        std::fs::create_dir(&dir).unwrap();
        lab.dirs.push(dir);
    }
    let procs = pids_root.join(&rel).join("cgroup.procs");
    let mut reader = CgroupReader::open(&layout, &rel, None, DetailOptions::NONE, false).unwrap();
    let mut scratch = lxcmon::readers::cgroup::Scratch::default();
    let mut read = || {
        reader
            .sample(&DeviceFilter::none(), false, &mut scratch)
            .unwrap()
            .processes
    };
    assert_eq!(read(), 0);

    // (step, processes live in the cgroup after it); each read 0.2 s after the previous one,
    // well inside the kernel's ~1 s cache of a held file's pid list.
    let mut expected = 0;
    let mut log = Vec::new();
    for step in ["+", "+", "+", "+", "-", "+", "-", "-", "+", "-", "-", "-"] {
        std::thread::sleep(Duration::from_millis(200));
        if step == "+" {
            let child = Command::new("sleep").arg("60").spawn().unwrap();
            std::fs::write(&procs, child.id().to_string()).unwrap();
            lab.children.push(child);
            expected += 1;
        } else {
            let mut child = lab.children.remove(0);
            child.kill().unwrap();
            child.wait().unwrap();
            expected -= 1;
        }
        // Ground truth from each process's own view (opening the cgroup's `cgroup.procs`
        // here would refresh the kernel's shared pid list and hide the fault).
        let inside = lab
            .children
            .iter()
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{}/cgroup", c.id()))
                    .unwrap()
                    .lines()
                    .any(|l| l.contains(":pids:") && l.ends_with(rel.to_str().unwrap()))
            })
            .count() as u64;
        assert_eq!(inside, expected, "ground truth");
        let got = read();
        log.push((step, expected, got));
        assert_eq!(got, expected, "after steps {log:?}");
    }
}
