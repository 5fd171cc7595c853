//! Fake cgroupfs/procfs trees shared by the fixture-based tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Tree {
    pub dir: tempfile::TempDir,
}

pub const MIB: u64 = 1024 * 1024;

impl Tree {
    pub fn new(mountinfo: &str) -> Self {
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

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file of the tree. An existing file is rewritten in place (same inode, as the
    /// agent holds it open) without being emptied first: a daemon reading it meanwhile sees the
    /// old or the new text (possibly with the old text's tail), never an empty file, which a
    /// kernel file never is (an empty `net/dev` would mean every interface had gone).
    pub fn file(&self, rel: &str, content: &str) {
        use std::io::Write;
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f.set_len(content.len() as u64).unwrap();
    }

    /// A process: its status (with the NSpid chain), its network view and its root.
    pub fn process(&self, pid: u32, nspid: &str, net: Option<(u64, u64)>) {
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

pub const V2: &str =
    "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n";

pub const HYBRID: &str = "\
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
38 31 0:33 / /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
39 31 0:34 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
40 31 0:35 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
";

/// Proxmox VE 7/8: pure v2, `lxc/<vmid>` with processes below `ns/`.
pub fn proxmox_v2() -> Tree {
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

pub fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lxcmon"));
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// The daemon on config `cfg` reading the fixture tree at `root`, its stderr dropped.
pub fn daemon_on(cfg: &Path, root: &Path) -> Running {
    Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    )
}

/// A spawned agent that is killed if the test fails before stopping it.
pub struct Running(pub std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
