//! Test containers built by hand, without LXC: what the bench fleet (xtask) and the VM guest
//! share. A container is its cgroup in the plain-LXC (`lxc.payload.<name>`) or Proxmox
//! (`lxc/<vmid>/ns`) layout ([`Flavor`]) in every mounted hierarchy ([`Hierarchy`], v1 cpuset
//! levels inheriting their parent's cpus and mems), an init in namespaces of its own, processes
//! placed in its cgroups ([`join`]) or in its namespaces ([`attach`]), a veth whose peer moves
//! into it ([`veth_peer`]), and a teardown that kills and removes whole subtrees
//! ([`remove_subtrees`]). The [`lab`](crate::lab) names its LXC containers' cgroups through
//! [`Flavor`] too.

use anyhow::{bail, Context, Result};
use rustix::fd::AsFd;
use rustix::thread::LinkNameSpaceType;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a container's cgroups sit: the layout of plain LXC 4/5 (Incus/LXD) or of Proxmox VE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Lxc,
    Proxmox,
}

impl Flavor {
    /// The container's cgroup below a hierarchy's root: `lxc.payload.<id>` or `lxc/<id>`.
    pub fn cgroup(self, id: &str) -> PathBuf {
        match self {
            Flavor::Lxc => PathBuf::from(format!("lxc.payload.{id}")),
            Flavor::Proxmox => Path::new("lxc").join(id),
        }
    }

    /// Where its processes live: the cgroup itself, or `ns/` below it on Proxmox.
    pub fn procs(self, id: &str) -> PathBuf {
        match self {
            Flavor::Lxc => self.cgroup(id),
            Flavor::Proxmox => self.cgroup(id).join("ns"),
        }
    }

    /// Its monitor process's cgroup (never part of the container).
    pub fn monitor(self, id: &str) -> PathBuf {
        match self {
            Flavor::Lxc => PathBuf::from(format!("lxc.monitor.{id}")),
            Flavor::Proxmox => Path::new("lxc.monitor").join(id),
        }
    }
}

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// The v1 cpuset hierarchy: a new cgroup there takes no process until it has cpus and mems.
    pub cpuset: bool,
    /// v1 controllers (empty for cgroup2 and named hierarchies).
    pub controllers: Vec<String>,
}

/// Every cgroup hierarchy mounted here, from /proc/self/mountinfo.
pub fn hierarchies() -> Result<Vec<Hierarchy>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let out = parse_hierarchies(&text);
    if out.is_empty() {
        bail!("no cgroup hierarchy is mounted");
    }
    Ok(out)
}

/// The cgroup hierarchies of a mountinfo text, each mount point once.
pub fn parse_hierarchies(mountinfo: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount) = pre.split(' ').nth(4) else {
            continue;
        };
        let mut post = post.split(' ');
        let (Some(fstype), Some(_), Some(opts)) = (post.next(), post.next(), post.next()) else {
            continue;
        };
        let controllers: Vec<String> = match fstype {
            "cgroup2" => Vec::new(),
            "cgroup" => opts
                .split(',')
                .filter(|o| {
                    !matches!(*o, "rw" | "ro" | "relatime" | "nosuid" | "nodev" | "noexec")
                        && !o.starts_with("name=")
                        && !o.starts_with("release_agent")
                        && *o != "clone_children"
                        && *o != "xattr"
                })
                .map(str::to_string)
                .collect(),
            _ => continue,
        };
        let mount = PathBuf::from(mount);
        if out.iter().any(|h| h.mount == mount) {
            continue;
        }
        out.push(Hierarchy {
            cpuset: controllers.iter().any(|c| c == "cpuset"),
            controllers,
            mount,
        });
    }
    out
}

impl Hierarchy {
    /// A cgroup2 hierarchy mounted at `mount` (the VM guest mounts only that).
    pub fn v2(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
            cpuset: false,
            controllers: Vec::new(),
        }
    }

    /// The directory of cgroup `rel` (relative to the hierarchy's root; empty: the root).
    pub fn dir(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mount.join(rel)
    }

    /// Creates cgroup `rel` and its missing parents; on the v1 cpuset hierarchy each new level
    /// gets its parent's cpus and mems, or no process could join it.
    pub fn create(&self, rel: impl AsRef<Path>) -> Result<PathBuf> {
        let mut cur = self.mount.clone();
        for part in rel.as_ref().components() {
            let parent = cur.clone();
            cur.push(part);
            if cur.is_dir() {
                continue;
            }
            fs::create_dir(&cur).with_context(|| format!("creating cgroup {}", cur.display()))?;
            if self.cpuset {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = fs::read_to_string(parent.join(f))
                        .with_context(|| format!("reading {}", parent.join(f).display()))?;
                    fs::write(cur.join(f), v.trim())
                        .with_context(|| format!("writing {}", cur.join(f).display()))?;
                }
            }
        }
        Ok(cur)
    }

    /// cgroup2: enables each of `wanted` the cgroup has in its `cgroup.subtree_control`, so
    /// its children get them.
    pub fn enable_controllers(&self, rel: impl AsRef<Path>, wanted: &[&str]) -> Result<()> {
        let dir = self.dir(rel);
        let available = fs::read_to_string(dir.join("cgroup.controllers"))
            .with_context(|| format!("reading {}/cgroup.controllers", dir.display()))?;
        for c in wanted {
            if available.split_whitespace().any(|a| a == *c) {
                fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"))
                    .with_context(|| format!("enabling {c} in {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// The processes of cgroup `rel` and of every cgroup below it (parents before children).
    pub fn subtree_procs(&self, rel: impl AsRef<Path>) -> Result<Vec<u32>> {
        let dir = self.dir(rel);
        let mut out = Vec::new();
        let text = fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        for e in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                out.extend(self.subtree_procs(e.path())?);
            }
        }
        Ok(out)
    }
}

/// Moves the calling process into the cgroup at `dir`.
pub fn join(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, b"0").with_context(|| format!("joining cgroup {}", procs.display()))
}

/// Enters the IPC, UTS, network, PID and mount namespaces of the container whose init is
/// `pid`, and its root, like `lxc-attach` (what this process starts next lands in its PID
/// namespace). The caller must be single-threaded.
pub fn attach(pid: u32) -> Result<()> {
    let open = |p: String| fs::File::open(&p).with_context(|| format!("opening {p}"));
    let root = open(format!("/proc/{pid}/root"))?;
    let spaces = [
        ("ipc", LinkNameSpaceType::InterProcessCommunication),
        ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
        ("net", LinkNameSpaceType::Network),
        ("pid", LinkNameSpaceType::ProcessID),
        ("mnt", LinkNameSpaceType::Mount),
    ];
    // Every descriptor first: after the mount namespace /proc is the container's.
    let mut fds = Vec::new();
    for (name, ty) in spaces {
        fds.push((open(format!("/proc/{pid}/ns/{name}"))?, ty, name));
    }
    for (fd, ty, name) in &fds {
        rustix::thread::move_into_link_name_space(fd.as_fd(), Some(*ty))
            .with_context(|| format!("setns {name}"))?;
    }
    rustix::process::fchdir(&root).context("fchdir")?;
    rustix::process::chroot(".").context("chroot")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// The other end of a fresh veth pair, from sysfs (busybox `ip` ignores `peer name`).
pub fn veth_peer(dev: &str) -> Result<String> {
    let read = |p: String| fs::read_to_string(p).map(|s| s.trim().to_string());
    let ifindex = read(format!("/sys/class/net/{dev}/ifindex"))?;
    for e in fs::read_dir("/sys/class/net")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name != dev
            && read(format!("/sys/class/net/{name}/iflink")).ok() == Some(ifindex.clone())
        {
            return Ok(name);
        }
    }
    bail!("no peer found for {dev}")
}

/// SIGKILL to `pid` (never to 0 or 1, which would mean a group or init). To a PID namespace's
/// init it kills the whole namespace.
pub fn kill(pid: u32) {
    if pid > 1 {
        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// Cgroup directories below `dir`, deepest first, `dir` last.
pub fn subtree_deepest_first(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            subtree_deepest_first(&e.path(), out);
        }
    }
    out.push(dir.to_path_buf());
}

/// Kills every process in the cgroups at `tops` and below and removes the cgroups, deepest
/// first, retrying until `timeout` (a killed process leaves its cgroup a moment later).
pub fn remove_subtrees(tops: &[PathBuf], timeout: Duration) -> Result<()> {
    let mut dirs = Vec::new();
    for top in tops {
        subtree_deepest_first(top, &mut dirs);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut busy = false;
        for d in &dirs {
            if !d.exists() {
                continue;
            }
            for pid in fs::read_to_string(d.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                kill(pid);
            }
            if fs::remove_dir(d).is_err() && d.exists() {
                busy = true;
            }
        }
        if !busy {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("some cgroups could not be removed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavors_name_the_layouts_of_lxc_and_proxmox() {
        assert_eq!(Flavor::Lxc.cgroup("web"), Path::new("lxc.payload.web"));
        assert_eq!(Flavor::Lxc.procs("web"), Path::new("lxc.payload.web"));
        assert_eq!(Flavor::Lxc.monitor("web"), Path::new("lxc.monitor.web"));
        assert_eq!(Flavor::Proxmox.cgroup("101"), Path::new("lxc/101"));
        assert_eq!(Flavor::Proxmox.procs("101"), Path::new("lxc/101/ns"));
        assert_eq!(Flavor::Proxmox.monitor("101"), Path::new("lxc.monitor/101"));
    }

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        let mountinfo = "\
25 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
36 33 0:31 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset,clone_children
37 33 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
38 33 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
";
        let h = parse_hierarchies(mountinfo);
        let mounts: Vec<&str> = h.iter().map(|h| h.mount.to_str().unwrap()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/cpu,cpuacct"
            ]
        );
        assert!(h[0].controllers.is_empty() && !h[0].cpuset);
        assert!(h[1].controllers.is_empty());
        assert!(h[2].cpuset && h[2].controllers == ["cpuset"]);
        assert_eq!(h[3].controllers, ["cpu", "cpuacct"]);
    }

    #[test]
    fn create_inherits_cpus_and_mems_on_v1_cpuset() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cpuset.cpus"), "0-1\n").unwrap();
        fs::write(root.path().join("cpuset.mems"), "0\n").unwrap();
        let h = Hierarchy {
            mount: root.path().to_path_buf(),
            cpuset: true,
            controllers: vec!["cpuset".into()],
        };
        let dir = h.create("lxc/101/ns").unwrap();
        assert_eq!(dir, root.path().join("lxc/101/ns"));
        for level in ["lxc", "lxc/101", "lxc/101/ns"] {
            let d = root.path().join(level);
            assert_eq!(fs::read_to_string(d.join("cpuset.cpus")).unwrap(), "0-1");
            assert_eq!(fs::read_to_string(d.join("cpuset.mems")).unwrap(), "0");
        }
        // Existing levels are left as they are.
        fs::write(root.path().join("lxc/cpuset.cpus"), "1").unwrap();
        h.create("lxc/102").unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("lxc/102/cpuset.cpus")).unwrap(),
            "1"
        );
    }

    #[test]
    fn subtree_procs_lists_parents_before_children() {
        let root = tempfile::tempdir().unwrap();
        let h = Hierarchy::v2(root.path());
        for (rel, procs) in [("ct", "1\n"), ("ct/a", "2\n3\n"), ("ct/a/b", "4\n")] {
            fs::create_dir_all(root.path().join(rel)).unwrap();
            fs::write(root.path().join(rel).join("cgroup.procs"), procs).unwrap();
        }
        assert_eq!(h.subtree_procs("ct").unwrap(), [1, 2, 3, 4]);
    }
}
