//! Real busybox LXC containers on a private bridge, and workloads of known size inside them.
//!
//! One [`Lab`] at a time per machine: [`Lab::new`] takes an exclusive lock
//! ([`LOCK_PATH`]), so tests running in parallel threads or processes take turns (their
//! measurements would disturb each other anyway). Under that lock it removes every container
//! named `lxcmon-t-*` and the bridge left behind by a crashed earlier run, then creates the
//! bridge afresh. Dropping the lab stops and destroys its containers and removes the bridge.

use crate::proc::{poll, run_ok, run_timeout};
use anyhow::{bail, ensure, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where a lab lives: its lock, the prefix of its containers' names (leftovers with it are
/// removed), its own bridge (lxc-net does not run here, and `lxcbr0` is left to others) and
/// its /24. The suite's labs take turns on [`SUITE`]; `cargo xtask soak` runs on [`SOAK`]
/// (`LXCMON_LAB_SITE=soak`), so the suite can run beside an hour-long soak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub lock: &'static str,
    pub prefix: &'static str,
    pub bridge: &'static str,
    /// The first three octets; the host is `.1`, containers `.10`, `.11`, ...
    pub net: [u8; 3],
    /// The agents' BPF pin directory, so that two sites' agents never share one.
    pub pin_dir: &'static str,
}

pub const SUITE: Site = Site {
    lock: "/run/lxcmon-testkit.lock",
    prefix: "lxcmon-t-",
    bridge: "lxcmonbr0",
    net: [10, 213, 77],
    pin_dir: "/sys/fs/bpf/lxcmon/v1",
};

pub const SOAK: Site = Site {
    lock: "/run/lxcmon-testkit-soak.lock",
    prefix: "lxcmon-s-",
    bridge: "lxcmonbr1",
    net: [10, 213, 78],
    pin_dir: "/sys/fs/bpf/lxcmon-soak/v1",
};

impl Site {
    /// The site this process runs on: `LXCMON_LAB_SITE=soak` or the suite's.
    pub fn current() -> Self {
        match std::env::var("LXCMON_LAB_SITE").as_deref() {
            Ok("soak") => SOAK,
            _ => SUITE,
        }
    }

    pub fn addr(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.net;
        Ipv4Addr::new(a, b, c, host)
    }

    /// The host's address on the bridge.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.addr(1)
    }
}
/// Jumbo frames on the bridge and the veths: TCP/IP/Ethernet headers are then under 1% of the
/// bytes of a bulk transfer, so interface counters can be compared with the payload at 5%.
pub const MTU: u32 = 9000;
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// The cgroup layout of this host, which decides the LXC config keys for limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// v1 controllers under `/sys/fs/cgroup/<controller>` (legacy or hybrid).
    V1,
    /// Pure v2 at `/sys/fs/cgroup`.
    V2,
}

impl CgroupLayout {
    pub fn detect() -> Result<Self> {
        if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
            Ok(Self::V1)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            Ok(Self::V2)
        } else {
            bail!("no cgroup v1 cpu controller and no cgroup v2 hierarchy at /sys/fs/cgroup")
        }
    }
}

/// Limits of one container.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// One core's worth of CPU through the CFS quota (100 ms per 100 ms period), plus a high
    /// CPU weight so that a busy loop gets that core even while the host is busy building.
    pub one_core_quota: bool,
    /// A cpuset, e.g. `"1"`.
    pub cpuset: Option<String>,
    /// A memory limit in MiB.
    pub memory_limit_mib: Option<u64>,
    /// A CFS quota in µs per 100 ms period (50000: half a core), with the high CPU weight of
    /// `one_core_quota`; instead of `one_core_quota`.
    pub cpu_quota_us: Option<u64>,
    /// No swap for the container: on v1 `memory.memsw.limit_in_bytes` = the memory limit, on
    /// v2 `memory.swap.max` = 0 (needs `memory_limit_mib`).
    pub no_swap: bool,
    /// `pids.max`.
    pub pids_max: Option<u64>,
    /// Further config lines, written as they are (e.g. an `lxc.mount.entry`).
    pub extra_config: Vec<String>,
}

/// The harness: a bridge and the containers on it.
pub struct Lab {
    _lock: File,
    layout: CgroupLayout,
    lxcpath: PathBuf,
    memhog: PathBuf,
    names: Vec<String>,
    next_host: u8,
    site: Site,
}

/// A running container created by a [`Lab`] (the lab destroys it).
#[derive(Debug, Clone)]
pub struct Container {
    pub name: String,
    pub ip: Ipv4Addr,
    pub layout: CgroupLayout,
    /// The host's address on the lab's bridge.
    pub host_ip: Ipv4Addr,
    rootfs: PathBuf,
    /// Its cgroups' name without `lxc.payload.`: the container's name, or LXC's `<name>-<n>`
    /// where a cgroup of that name was there already.
    cgroup: String,
    /// LXC's directory of containers it belongs to (`-P` of the lxc tools): the lab's, or
    /// Incus's `/var/lib/incus/containers`, whose containers liblxc runs as well.
    lxcpath: PathBuf,
}

fn lxc(tool: &str) -> Command {
    Command::new(tool)
}

fn exists_on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// The names of all containers LXC knows about.
fn lxc_ls() -> Result<Vec<String>> {
    let out = run_ok(lxc("lxc-ls").arg("-1"), CMD_TIMEOUT)?;
    Ok(out.stdout.split_whitespace().map(str::to_owned).collect())
}

fn destroy(name: &str) {
    let _ = run_timeout(lxc("lxc-stop").args(["-k", "-n", name]), CMD_TIMEOUT);
    match run_timeout(lxc("lxc-destroy").args(["-f", "-n", name]), CMD_TIMEOUT) {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!("testkit: lxc-destroy {name} failed: {}", o.stderr.trim()),
        Err(e) => eprintln!("testkit: lxc-destroy {name}: {e:#}"),
    }
}

/// On cgroup v1 with kernels 6.9 and later, block I/O is counted per cgroup only for disks
/// with a throttle rule; the daemon writes an unlimited one at start (see the README), but
/// `--once` leaves the host as it is. The lab makes the host a daemon would have made, so the
/// `--once` tests see I/O: an unlimited rule (`maj:min 0`, which limits nothing) for each whole
/// disk that has no rule yet.
pub(crate) fn v1_io_counting_on() -> Result<()> {
    let rules_path = Path::new("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device");
    if !rules_path.exists() {
        return Ok(());
    }
    let rules = fs::read_to_string(rules_path)
        .with_context(|| format!("reading {}", rules_path.display()))?;
    for disk in fs::read_dir("/sys/block").context("listing /sys/block")? {
        let disk = disk?.path();
        let name = disk.file_name().unwrap_or_default().to_string_lossy();
        if ["loop", "ram", "zram", "dm-"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        let dev = fs::read_to_string(disk.join("dev")).unwrap_or_default();
        let dev = dev.trim();
        if dev.is_empty() || rules.lines().any(|l| l.starts_with(&format!("{dev} "))) {
            continue;
        }
        fs::write(rules_path, format!("{dev} 0\n"))
            .with_context(|| format!("writing {dev} 0 to {}", rules_path.display()))?;
    }
    Ok(())
}

/// Removes the cgroups of containers named `prefix…` that an earlier run left behind (its
/// containers killed with their monitors): LXC would name the next container of such a name
/// `<name>-1`.
fn remove_leftover_cgroups(prefix: &str) -> Result<()> {
    let ours = |name: &str| {
        ["lxc.payload.", "lxc.monitor."]
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|n| n.starts_with(prefix)))
    };
    let mut tops = Vec::new();
    for h in crate::ct::hierarchies()? {
        for e in fs::read_dir(&h.mount).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && ours(&e.file_name().to_string_lossy()) {
                tops.push(e.path());
            }
        }
    }
    if !tops.is_empty() {
        eprintln!("testkit: removing leftover cgroups {tops:?}");
        crate::ct::remove_subtrees(&tops, Duration::from_secs(10))
            .context("removing the cgroups an earlier run left behind")?;
    }
    Ok(())
}

fn remove_bridge(bridge: &str) {
    if Path::new("/sys/class/net").join(bridge).exists() {
        if let Err(e) = run_ok(
            Command::new("ip").args(["link", "del", bridge]),
            CMD_TIMEOUT,
        ) {
            eprintln!("testkit: removing bridge {bridge}: {e:#}");
        }
    }
}

pub(crate) const MEMHOG_C: &str = r#"
/* Holds argv[1] MiB of anonymous memory (every page written), creates the file argv[2] when
 * it is all resident, then sleeps until killed. Built static: the container has no libc. */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    size_t len = strtoull(argv[1], NULL, 10) << 20;
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    memset(p, 0x5a, len);
    int fd = open(argv[2], O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0) return 1;
    close(fd);
    for (;;) pause();
}
"#;

pub(crate) fn build_memhog(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let src = dir.join("memhog.c");
    let bin = dir.join("lxcmon-memhog");
    fs::write(&src, MEMHOG_C).with_context(|| format!("writing {}", src.display()))?;
    run_ok(
        Command::new("gcc")
            .args(["-static", "-O1", "-o"])
            .arg(&bin)
            .arg(&src),
        CMD_TIMEOUT,
    )
    .context("building the static memory-holding helper (needs gcc and libc6-dev)")?;
    Ok(bin)
}

impl Lab {
    /// Waits for the machine-wide lab lock, removes leftovers of an earlier run, creates the
    /// bridge. Needs root and the `lxc`, `busybox-static`, `gcc` packages.
    pub fn new() -> Result<Self> {
        ensure!(
            rustix::process::geteuid().is_root(),
            "the LXC tests need root"
        );
        for tool in ["lxc-create", "lxc-attach", "busybox", "gcc", "ip"] {
            ensure!(
                exists_on_path(tool),
                "{tool} not found: run `cargo xtask test`, which installs the test dependencies"
            );
        }
        let site = Site::current();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(site.lock)
            .with_context(|| format!("opening {}", site.lock))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", site.lock))?;

        for name in lxc_ls()? {
            if name.starts_with(site.prefix) {
                eprintln!("testkit: removing leftover container {name}");
                destroy(&name);
            }
        }
        remove_leftover_cgroups(site.prefix)?;
        remove_bridge(site.bridge);

        let layout = CgroupLayout::detect()?;
        if layout == CgroupLayout::V1 {
            v1_io_counting_on()?;
        }
        let lxcpath = PathBuf::from(
            run_ok(lxc("lxc-config").arg("lxc.lxcpath"), CMD_TIMEOUT)?
                .stdout
                .trim(),
        );
        let memhog = build_memhog(&std::env::temp_dir().join("lxcmon-testkit"))?;

        let lab = Self {
            _lock: lock,
            layout,
            lxcpath,
            memhog,
            names: Vec::new(),
            next_host: 10,
            site,
        };
        let bridge = site.bridge;
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args), CMD_TIMEOUT);
        ip(&["link", "add", bridge, "type", "bridge"])?;
        ip(&["link", "set", bridge, "mtu", &MTU.to_string()])?;
        // No IPv6 on the bridge: its router solicitations and MLD would be traffic the tests
        // did not make.
        let v6 = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
        if Path::new(&v6).exists() {
            fs::write(&v6, "1").with_context(|| format!("writing {v6}"))?;
        }
        ip(&[
            "addr",
            "add",
            &format!("{}/24", site.host_ip()),
            "dev",
            bridge,
        ])?;
        ip(&["link", "set", bridge, "up"])?;
        Ok(lab)
    }

    pub fn layout(&self) -> CgroupLayout {
        self.layout
    }

    /// Creates and starts `lxcmon-t-<short>` with the given limits, a static address on the
    /// bridge and nothing running but busybox init and a getty; checks that the limits are in
    /// the container's cgroups.
    pub fn container(&mut self, short: &str, spec: &ContainerSpec) -> Result<Container> {
        let name = format!("{}{short}", self.site.prefix);
        ensure!(name.len() <= 40, "container name {name} too long");
        let ip = self.site.addr(self.next_host);
        self.next_host += 1;
        self.names.push(name.clone());
        run_ok(
            lxc("lxc-create").args(["-n", &name, "-t", "busybox"]),
            CMD_TIMEOUT,
        )?;
        let dir = self.lxcpath.join(&name);
        let rootfs = dir.join("rootfs");

        // The config: the template's, with no AppArmor (none here), our bridge, and limits.
        let cfg_path = dir.join("config");
        let template_cfg = fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let mut cfg = String::new();
        for line in template_cfg.lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            match key {
                "lxc.apparmor.profile" | "lxc.apparmor.allow_nesting" | "lxc.net.0.link" => {}
                _ => {
                    cfg.push_str(line);
                    cfg.push('\n');
                }
            }
        }
        let (bridge, host_ip) = (self.site.bridge, self.site.host_ip());
        cfg.push_str(&format!(
            "\n# lxcmon-testkit\nlxc.apparmor.profile = unconfined\n\
             lxc.net.0.link = {bridge}\nlxc.net.0.name = eth0\nlxc.net.0.mtu = {MTU}\n\
             lxc.net.0.ipv4.address = {ip}/24\nlxc.net.0.ipv4.gateway = {host_ip}\n\
             lxc.sysctl.net.ipv6.conf.all.disable_ipv6 = 1\n\
             lxc.sysctl.net.ipv6.conf.default.disable_ipv6 = 1\n"
        ));
        for (key, value) in self.limit_keys(spec) {
            cfg.push_str(&format!("{key} = {value}\n"));
        }
        for line in &spec.extra_config {
            cfg.push_str(line);
            cfg.push('\n');
        }
        fs::write(&cfg_path, cfg).with_context(|| format!("writing {}", cfg_path.display()))?;

        // busybox's rcS starts udhcpc, which flushes the static address, and syslogd: the
        // container should run nothing the test did not start.
        let rcs = rootfs.join("etc/init.d/rcS");
        fs::write(&rcs, "#!/bin/sh\n/bin/mount -a\n")
            .with_context(|| format!("writing {}", rcs.display()))?;
        let hog = rootfs.join("bin/lxcmon-memhog");
        fs::copy(&self.memhog, &hog).with_context(|| format!("copying to {}", hog.display()))?;

        run_ok(lxc("lxc-start").args(["-n", &name]), CMD_TIMEOUT)?;
        let mut c = Container {
            ip,
            layout: self.layout,
            host_ip,
            rootfs,
            cgroup: name.clone(),
            lxcpath: self.lxcpath.clone(),
            name,
        };
        let ready = poll(Duration::from_secs(20), || {
            let Ok(pid) = c.init_pid() else {
                return Ok(None);
            };
            // Where LXC put it, read from its init (one line of /proc/<pid>/cgroup).
            let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if let Some(cg) = crate::workload::container_of(&text, c.layout) {
                c.cgroup = cg.to_owned();
            }
            let out = run_timeout(&mut c.attach_cmd("ip -4 addr show eth0"), CMD_TIMEOUT)?;
            Ok(out.stdout.contains(&format!("{ip}/24")).then_some(()))
        })?;
        ensure!(ready.is_some(), "{} did not come up with {ip}", c.name);
        // The busybox init runs rcS and then spawns getty; wait until that has happened, so
        // that the process count is stable from now on.
        let settled = poll(Duration::from_secs(10), || {
            let ps = c.sh("ps")?;
            Ok((!ps.contains("rcS")).then_some(()))
        })?;
        ensure!(settled.is_some(), "{}: rcS did not finish", c.name);
        self.check_limits(&c, spec)?;
        Ok(c)
    }

    fn limit_keys(&self, spec: &ContainerSpec) -> Vec<(String, String)> {
        let mut keys = Vec::new();
        let k = |s: &str| s.to_owned();
        match self.layout {
            CgroupLayout::V1 => {
                if spec.one_core_quota {
                    keys.push((k("lxc.cgroup.cpu.cfs_period_us"), k("100000")));
                    keys.push((k("lxc.cgroup.cpu.cfs_quota_us"), k("100000")));
                    keys.push((k("lxc.cgroup.cpu.shares"), k("8192")));
                }
                if let Some(cpus) = &spec.cpuset {
                    keys.push((k("lxc.cgroup.cpuset.cpus"), cpus.clone()));
                }
                if let Some(quota) = spec.cpu_quota_us {
                    keys.push((k("lxc.cgroup.cpu.cfs_period_us"), k("100000")));
                    keys.push((k("lxc.cgroup.cpu.cfs_quota_us"), quota.to_string()));
                    keys.push((k("lxc.cgroup.cpu.shares"), k("8192")));
                }
                if let Some(mib) = spec.memory_limit_mib {
                    keys.push((
                        k("lxc.cgroup.memory.limit_in_bytes"),
                        (mib << 20).to_string(),
                    ));
                    // After the memory limit: memsw may not be below it.
                    if spec.no_swap {
                        keys.push((
                            k("lxc.cgroup.memory.memsw.limit_in_bytes"),
                            (mib << 20).to_string(),
                        ));
                    }
                }
                if let Some(n) = spec.pids_max {
                    keys.push((k("lxc.cgroup.pids.max"), n.to_string()));
                }
            }
            CgroupLayout::V2 => {
                if spec.one_core_quota {
                    keys.push((k("lxc.cgroup2.cpu.max"), k("100000 100000")));
                    keys.push((k("lxc.cgroup2.cpu.weight"), k("800")));
                }
                if let Some(cpus) = &spec.cpuset {
                    keys.push((k("lxc.cgroup2.cpuset.cpus"), cpus.clone()));
                }
                if let Some(quota) = spec.cpu_quota_us {
                    keys.push((k("lxc.cgroup2.cpu.max"), format!("{quota} 100000")));
                    keys.push((k("lxc.cgroup2.cpu.weight"), k("800")));
                }
                if let Some(mib) = spec.memory_limit_mib {
                    keys.push((k("lxc.cgroup2.memory.max"), (mib << 20).to_string()));
                    if spec.no_swap {
                        keys.push((k("lxc.cgroup2.memory.swap.max"), k("0")));
                    }
                }
                if let Some(n) = spec.pids_max {
                    keys.push((k("lxc.cgroup2.pids.max"), n.to_string()));
                }
            }
        }
        keys
    }

    fn check_limits(&self, c: &Container, spec: &ContainerSpec) -> Result<()> {
        let read = |ctrl: &str, file: &str| -> Result<String> {
            let p = c.cgroup_dir(ctrl).join(file);
            Ok(fs::read_to_string(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_owned())
        };
        match self.layout {
            CgroupLayout::V1 => {
                if spec.one_core_quota {
                    ensure!(
                        read("cpu", "cpu.cfs_quota_us")? == "100000",
                        "cpu quota not set"
                    );
                    ensure!(
                        read("cpu", "cpu.cfs_period_us")? == "100000",
                        "cpu period not set"
                    );
                }
                if let Some(cpus) = &spec.cpuset {
                    ensure!(&read("cpuset", "cpuset.cpus")? == cpus, "cpuset not set");
                }
                if let Some(mib) = spec.memory_limit_mib {
                    ensure!(
                        read("memory", "memory.limit_in_bytes")? == (mib << 20).to_string(),
                        "memory limit not set"
                    );
                    if spec.no_swap {
                        ensure!(
                            read("memory", "memory.memsw.limit_in_bytes")?
                                == (mib << 20).to_string(),
                            "memory+swap limit not set"
                        );
                    }
                }
                if let Some(quota) = spec.cpu_quota_us {
                    ensure!(
                        read("cpu", "cpu.cfs_quota_us")? == quota.to_string(),
                        "cpu quota not set"
                    );
                }
                if let Some(n) = spec.pids_max {
                    ensure!(
                        read("pids", "pids.max")? == n.to_string(),
                        "pids.max not set"
                    );
                }
            }
            CgroupLayout::V2 => {
                if spec.one_core_quota {
                    ensure!(read("", "cpu.max")? == "100000 100000", "cpu.max not set");
                }
                if let Some(cpus) = &spec.cpuset {
                    ensure!(&read("", "cpuset.cpus")? == cpus, "cpuset not set");
                }
                if let Some(mib) = spec.memory_limit_mib {
                    ensure!(
                        read("", "memory.max")? == (mib << 20).to_string(),
                        "memory.max not set"
                    );
                    if spec.no_swap {
                        ensure!(
                            read("", "memory.swap.max")? == "0",
                            "memory.swap.max not set"
                        );
                    }
                }
                if let Some(quota) = spec.cpu_quota_us {
                    ensure!(
                        read("", "cpu.max")? == format!("{quota} 100000"),
                        "cpu.max not set"
                    );
                }
                if let Some(n) = spec.pids_max {
                    ensure!(read("", "pids.max")? == n.to_string(), "pids.max not set");
                }
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.names.drain(..) {
            destroy(&name);
        }
        remove_bridge(self.site.bridge);
    }
}

impl Container {
    /// A running container of another manager that liblxc runs (Incus): `name` is its LXC
    /// name (and cgroup name part), `lxcpath` where its LXC config lives.
    pub(crate) fn attached(
        name: String,
        ip: Ipv4Addr,
        host_ip: Ipv4Addr,
        rootfs: PathBuf,
        lxcpath: PathBuf,
    ) -> Result<Self> {
        Ok(Self {
            ip,
            layout: CgroupLayout::detect()?,
            host_ip,
            rootfs,
            cgroup: name.clone(),
            lxcpath,
            name,
        })
    }

    /// Its cgroups' name without `lxc.payload.` (see the field).
    pub fn cgroup_name(&self) -> &str {
        &self.cgroup
    }

    /// The container's cgroup directory for a v1 controller (ignored on v2).
    pub fn cgroup_dir(&self, controller: &str) -> PathBuf {
        let leaf = crate::ct::Flavor::Lxc.cgroup(&self.cgroup);
        match self.layout {
            CgroupLayout::V1 => Path::new("/sys/fs/cgroup").join(controller).join(leaf),
            CgroupLayout::V2 => Path::new("/sys/fs/cgroup").join(leaf),
        }
    }

    /// The container's directory in the cgroup v2 tree (`unified/` on a hybrid host), where
    /// the BPF programs are attached and PSI is read.
    pub fn unified_dir(&self) -> PathBuf {
        let leaf = crate::ct::Flavor::Lxc.cgroup(&self.cgroup);
        match self.layout {
            CgroupLayout::V1 => Path::new("/sys/fs/cgroup/unified").join(leaf),
            CgroupLayout::V2 => Path::new("/sys/fs/cgroup").join(leaf),
        }
    }

    /// The container's root directory as the host sees it.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// Host pid of the container's init.
    pub fn init_pid(&self) -> Result<u32> {
        let out = run_ok(
            lxc("lxc-info")
                .arg("-P")
                .arg(&self.lxcpath)
                .args(["-n", &self.name, "-p", "-H"]),
            CMD_TIMEOUT,
        )?;
        out.stdout
            .trim()
            .parse()
            .with_context(|| format!("lxc-info -p for {}: {:?}", self.name, out.stdout))
    }

    fn attach_cmd(&self, script: &str) -> Command {
        let mut cmd = lxc("lxc-attach");
        cmd.arg("-P").arg(&self.lxcpath).args([
            "-n",
            &self.name,
            "--clear-env",
            "--",
            "/bin/sh",
            "-c",
            script,
        ]);
        cmd
    }

    /// Runs a shell script inside the container and returns its stdout; fails on non-zero exit.
    pub fn sh(&self, script: &str) -> Result<String> {
        Ok(run_ok(&mut self.attach_cmd(script), CMD_TIMEOUT)
            .with_context(|| format!("in {}", self.name))?
            .stdout)
    }

    /// Starts `command` in the background inside the container, detached from lxc-attach
    /// (it is reparented to the container's init and keeps running).
    pub fn spawn_detached(&self, command: &str) -> Result<()> {
        self.sh(&format!("{command} </dev/null >/dev/null 2>&1 &"))?;
        Ok(())
    }

    /// Stops the container (the lab still destroys it at the end).
    pub fn stop(&self) -> Result<()> {
        run_ok(
            lxc("lxc-stop")
                .arg("-P")
                .arg(&self.lxcpath)
                .args(["-k", "-n", &self.name]),
            CMD_TIMEOUT,
        )?;
        Ok(())
    }

    // ---- workloads with known sizes ----

    /// Writes `mib` MiB with O_DIRECT to `path` inside the container (no page cache: the bytes
    /// reach the block device in this cgroup's name). Returns the bytes written.
    pub fn dd_write_direct(&self, path: &str, mib: u64) -> Result<u64> {
        self.sh(&format!(
            "dd if=/dev/zero of={path} bs=1M count={mib} oflag=direct 2>&1"
        ))?;
        let size = self.file_size(path)?;
        ensure!(
            size == mib << 20,
            "{path} is {size} bytes after dd, not {}",
            mib << 20
        );
        Ok(size)
    }

    /// Reads `path` inside the container with O_DIRECT. Returns the bytes read (the file size).
    pub fn dd_read_direct(&self, path: &str) -> Result<u64> {
        let out = self.sh(&format!(
            "dd if={path} of=/dev/null bs=1M iflag=direct 2>&1"
        ))?;
        let size = self.file_size(path)?;
        let mib = size >> 20;
        ensure!(
            out.contains(&format!("{mib}+0 records in")),
            "dd read of {path}: {out}"
        );
        Ok(size)
    }

    fn file_size(&self, path: &str) -> Result<u64> {
        let host = self.rootfs.join(path.trim_start_matches('/'));
        Ok(fs::metadata(&host)
            .with_context(|| format!("stat {}", host.display()))?
            .len())
    }

    /// Whether some socket in the container's network namespace listens on TCP `port`
    /// (busybox nc listens on an IPv6 socket that also takes IPv4, so both tables count).
    fn listening(&self, port: u16) -> Result<bool> {
        let pid = self.init_pid()?;
        let want = format!("{port:04X}");
        for table in ["tcp", "tcp6"] {
            let p = format!("/proc/{pid}/net/{table}");
            let text = fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
            let found = text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].rsplit(':').next() == Some(want.as_str()) && f[3] == "0A"
            });
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sends `bytes` bytes of payload from the host (bridge address) to a busybox `nc`
    /// listening in the container, and checks that the container received exactly that many.
    pub fn transfer_host_to_container(&self, bytes: u64, port: u16) -> Result<u64> {
        let child = self
            .attach_cmd(&format!("nc -l -p {port} | wc -c"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nc in the container")?;
        let result = (|| -> Result<()> {
            let up = poll(Duration::from_secs(10), || {
                Ok(self.listening(port)?.then_some(()))
            })?;
            ensure!(
                up.is_some(),
                "nc in {} is not listening on {port}",
                self.name
            );
            let addr = SocketAddr::from((self.ip, port));
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_write_timeout(Some(Duration::from_secs(30)))?;
            let buf = vec![0x42u8; 64 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                s.write_all(&buf[..n]).context("sending to the container")?;
                left -= n as u64;
            }
            s.shutdown(Shutdown::Write)?;
            Ok(())
        })();
        let out = crate::proc::wait_output(child, Duration::from_secs(60));
        result?;
        let out = out.context("waiting for `nc -l` in the container to finish")?;
        let got: u64 = out
            .stdout
            .trim()
            .parse()
            .with_context(|| format!("nc | wc -c printed {:?} ({})", out.stdout, out.stderr))?;
        ensure!(
            got == bytes,
            "the container received {got} bytes, {bytes} sent"
        );
        Ok(got)
    }

    /// The container sends `bytes` bytes of payload with busybox `nc` to a listener on the
    /// host's bridge address; checks that the host received exactly that many.
    pub fn transfer_container_to_host(&self, bytes: u64, port: u16) -> Result<u64> {
        let host_ip = self.host_ip;
        let listener = TcpListener::bind((host_ip, port))
            .with_context(|| format!("listening on {host_ip}:{port}"))?;
        listener.set_nonblocking(true)?;
        let child = self
            .attach_cmd(&format!("head -c {bytes} /dev/zero | nc {host_ip} {port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting nc in the container")?;
        let received = (|| -> Result<u64> {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match listener.accept() {
                    Ok((s, peer)) => {
                        ensure!(
                            peer.ip() == std::net::IpAddr::V4(self.ip),
                            "unexpected peer {peer}"
                        );
                        break s;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        ensure!(
                            Instant::now() < deadline,
                            "no connection from {}",
                            self.name
                        );
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0u64;
            while got < bytes {
                let n = s.read(&mut buf).context("receiving from the container")?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            // busybox nc does not close on stdin EOF; closing our side ends it.
            drop(s);
            Ok(got)
        })();
        let out = crate::proc::wait_output(child, Duration::from_secs(30))
            .context("waiting for `nc` in the container to finish")?;
        let got = received?;
        ensure!(
            got == bytes,
            "the host received {got} bytes, {bytes} sent ({})",
            out.stderr.trim()
        );
        Ok(got)
    }

    /// Starts `n` `sleep` processes in the container.
    pub fn start_sleeps(&self, n: u32) -> Result<()> {
        for _ in 0..n {
            self.spawn_detached("sleep 100000")?;
        }
        Ok(())
    }

    /// Starts a process holding `mib` MiB of anonymous memory (all pages written) and waits
    /// until it is resident.
    pub fn hold_memory(&self, mib: u64) -> Result<()> {
        let ready = format!("/lxcmon-memhog-{mib}.ready");
        let _ = fs::remove_file(self.rootfs.join(ready.trim_start_matches('/')));
        self.spawn_detached(&format!("/bin/lxcmon-memhog {mib} {ready}"))?;
        let host = self.rootfs.join(ready.trim_start_matches('/'));
        let ok = poll(Duration::from_secs(30), || Ok(host.exists().then_some(())))?;
        ensure!(
            ok.is_some(),
            "memory holder in {} did not get ready",
            self.name
        );
        Ok(())
    }

    /// Starts an endless shell loop (one core busy).
    pub fn busy_loop(&self) -> Result<()> {
        self.spawn_detached("sh -c 'while :; do :; done'")
    }

    // ---- kernel ground truth, for debugging the harness ----

    /// Bytes (read, write) the kernel charged to the container's cgroup (v1 throttle counters
    /// or v2 io.stat). On v1 with kernels >= 6.9 these stay 0 until a throttle rule exists.
    pub fn kernel_io_bytes(&self) -> Result<(u64, u64)> {
        let (mut r, mut w) = (0u64, 0u64);
        match self.layout {
            CgroupLayout::V1 => {
                let p = self
                    .cgroup_dir("blkio")
                    .join("blkio.throttle.io_service_bytes_recursive");
                for l in fs::read_to_string(&p)?.lines() {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    if f.len() == 3 {
                        match f[1] {
                            "Read" => r += f[2].parse::<u64>()?,
                            "Write" => w += f[2].parse::<u64>()?,
                            _ => {}
                        }
                    }
                }
            }
            CgroupLayout::V2 => {
                let p = self.cgroup_dir("").join("io.stat");
                for tok in fs::read_to_string(&p)?.split_whitespace() {
                    if let Some(v) = tok.strip_prefix("rbytes=") {
                        r += v.parse::<u64>()?;
                    } else if let Some(v) = tok.strip_prefix("wbytes=") {
                        w += v.parse::<u64>()?;
                    }
                }
            }
        }
        Ok((r, w))
    }

    /// (rx, tx) bytes on the container's non-loopback interfaces, from its own net/dev.
    pub fn kernel_net_bytes(&self) -> Result<(u64, u64)> {
        let p = format!("/proc/{}/net/dev", self.init_pid()?);
        let (mut rx, mut tx) = (0u64, 0u64);
        for l in fs::read_to_string(&p)?.lines().skip(2) {
            let Some((iface, rest)) = l.split_once(':') else {
                continue;
            };
            if iface.trim() == "lo" {
                continue;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            ensure!(f.len() >= 9, "short line in {p}: {l}");
            rx += f[0].parse::<u64>()?;
            tx += f[8].parse::<u64>()?;
        }
        Ok((rx, tx))
    }

    /// statvfs of the container's root filesystem as seen from the host:
    /// (total, used, available) bytes computed like `df`.
    pub fn rootfs_statvfs(&self) -> Result<(u64, u64, u64)> {
        let s = rustix::fs::statvfs(&self.rootfs)
            .with_context(|| format!("statvfs {}", self.rootfs.display()))?;
        let bs = s.f_frsize;
        Ok((
            s.f_blocks * bs,
            (s.f_blocks - s.f_bfree) * bs,
            s.f_bavail * bs,
        ))
    }
}
