//! Real Incus containers: the daemon (started by hand when it does not run: no systemd here),
//! a network and storage pool of the test's own, a busybox image built and imported locally
//! (no image server is reachable), and Incus's own figures from `/1.0/metrics`.
//!
//! An [`IncusLab`] holds the suite's lab lock (as [`crate::Lab`] does) and its own bridge
//! [`BRIDGE`] on [`NET`] (the LXC labs have 10.213.77 and .78). Dropping it deletes its
//! containers and projects, the network and pool it created, and stops the daemon if it
//! started it: the host keeps only the installed packages and the cached image.
//!
//! Incus runs its containers through liblxc (config in `/var/lib/incus/containers/<x>`), so
//! the lab's [`Container`] drives them with the lxc tools given that path: the workloads are
//! the LXC tests' own.

use crate::lab::{build_memhog, v1_io_counting_on, Site};
use crate::proc::{poll, run_ok, run_timeout};
use crate::Container;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const INCUSD: &str = "/usr/libexec/incus/incusd";
/// The test's managed bridge and its /24 (host `.1`, containers from `.10`).
pub const BRIDGE: &str = "lxcmonbr2";
pub const NET: [u8; 3] = [10, 213, 79];
/// A `dir` pool: the containers' root filesystems are directories on the host's disk, so
/// their direct I/O reaches a real block device in their cgroup's name.
pub const POOL: &str = "lxcmon";
/// Where Incus keeps each container's liblxc config (its `lxcpath`).
pub const LXCPATH: &str = "/var/lib/incus/containers";
/// The image's alias: this prefix and a hash of what goes into it, so a changed recipe
/// builds afresh and an unchanged one is reused across runs.
const IMAGE_PREFIX: &str = "lxcmon-test-busybox-";
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Nothing runs in the container but busybox init: no getty, no DHCP client, no syslog.
const INITTAB: &str = "::sysinit:/etc/init.d/rcS\n";
const RCS: &str = "#!/bin/sh\nmount -t proc proc /proc 2>/dev/null\n";

fn incus() -> Command {
    Command::new("incus")
}

fn ok(args: &[&str]) -> Result<String> {
    Ok(run_ok(incus().args(args), CMD_TIMEOUT)?.stdout)
}

/// Whether `incus <args>` succeeds (for "does it exist" questions).
fn succeeds(args: &[&str]) -> bool {
    run_timeout(incus().args(args), CMD_TIMEOUT).is_ok_and(|o| o.status.success())
}

fn daemon_ready(timeout_s: u32) -> bool {
    run_timeout(
        Command::new(INCUSD).args(["waitready", &format!("--timeout={timeout_s}")]),
        Duration::from_secs(u64::from(timeout_s) + 5),
    )
    .is_ok_and(|o| o.status.success())
}

/// A container of the lab: the project it is in (`None`: default) and its Incus name.
#[derive(Debug, Clone)]
pub struct Instance {
    pub project: Option<String>,
    pub name: String,
    pub ct: Container,
}

impl Instance {
    /// Its cgroup's name part and LXC name: `<project>_<name>` outside the default project.
    pub fn lxc_name(&self) -> String {
        lxc_name(self.project.as_deref(), &self.name)
    }
}

fn lxc_name(project: Option<&str>, name: &str) -> String {
    match project {
        Some(p) => format!("{p}_{name}"),
        None => name.to_string(),
    }
}

fn project_args(project: Option<&str>) -> Vec<String> {
    project
        .map(|p| vec!["--project".to_string(), p.to_string()])
        .unwrap_or_default()
}

pub struct IncusLab {
    _lock: File,
    /// The daemon this lab (or a crashed earlier run) started, stopped on drop; `None` when
    /// it was someone else's.
    daemon: Option<Ours>,
    created_network: bool,
    created_pool: bool,
    projects: Vec<String>,
    instances: Vec<(Option<String>, String)>,
    image: String,
    next_host: u8,
}

impl IncusLab {
    /// Waits for the suite's lab lock, starts incusd when it does not run, creates the
    /// network and pool when missing, imports the image unless cached, and removes
    /// `leftovers` (project, name) of a crashed earlier run.
    pub fn new(leftovers: &[(Option<&str>, &str)], projects: &[&str]) -> Result<Self> {
        ensure!(
            rustix::process::geteuid().is_root(),
            "the Incus tests need root"
        );
        ensure!(
            Path::new(INCUSD).exists(),
            "{INCUSD} not found: run `cargo xtask test`, which installs incus-base"
        );
        let site = Site::current();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(site.lock)
            .with_context(|| format!("opening {}", site.lock))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", site.lock))?;

        let mut lab = Self {
            _lock: lock,
            daemon: None,
            created_network: false,
            created_pool: false,
            projects: Vec::new(),
            instances: Vec::new(),
            image: String::new(),
            next_host: 10,
        };
        lab.daemon = if daemon_ready(1) {
            // Left running by an earlier run that crashed: still the suite's to stop.
            leftover_daemon().map(Ours::Leftover)
        } else {
            Some(Ours::Child(start_daemon()?))
        };
        for (project, name) in leftovers {
            let mut args = vec!["delete".to_string(), "--force".into(), name.to_string()];
            args.extend(project_args(*project));
            if run_timeout(incus().args(&args), CMD_TIMEOUT).is_ok_and(|o| o.status.success()) {
                eprintln!("testkit: removed leftover Incus container {name} ({project:?})");
            }
        }
        for p in projects {
            if succeeds(&["project", "show", p]) {
                eprintln!("testkit: removing leftover Incus project {p}");
                ok(&["project", "delete", p])?;
            }
        }
        lab.created_network = !succeeds(&["network", "show", BRIDGE]);
        lab.created_pool = !succeeds(&["storage", "show", POOL]);
        if lab.created_network || lab.created_pool {
            lab.preseed()?;
        }
        // Incus reads v1 I/O from the same throttle counters, which count only with a rule.
        if crate::lab::CgroupLayout::detect()? == crate::lab::CgroupLayout::V1 {
            v1_io_counting_on()?;
        }
        lab.image = ensure_image()?;
        Ok(lab)
    }

    /// The network and pool through `incus admin init --preseed` (only the missing ones:
    /// an existing entry would be updated, which is not the test's to do).
    fn preseed(&self) -> Result<()> {
        let [a, b, c] = NET;
        let mut yaml = String::new();
        if self.created_network {
            // No NAT, DHCP, DNS or IPv6: the test's traffic is all the bridge carries, and
            // no dnsmasq runs. Jumbo frames as on the LXC lab's bridge.
            yaml.push_str(&format!(
                "networks:\n- name: {BRIDGE}\n  type: bridge\n  config:\n    \
                 ipv4.address: {a}.{b}.{c}.1/24\n    ipv4.nat: \"false\"\n    \
                 ipv4.dhcp: \"false\"\n    ipv4.firewall: \"false\"\n    \
                 ipv6.address: none\n    dns.mode: none\n    bridge.mtu: \"{}\"\n",
                crate::lab::MTU
            ));
        }
        if self.created_pool {
            yaml.push_str(&format!("storage_pools:\n- name: {POOL}\n  driver: dir\n"));
        }
        let mut child = incus()
            .args(["admin", "init", "--preseed"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting incus admin init --preseed")?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            stdin.write_all(yaml.as_bytes())?;
        }
        let out = crate::proc::wait_output(child, CMD_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "incus admin init --preseed failed: {}\n{yaml}",
            out.stderr.trim()
        );
        Ok(())
    }

    /// Whether the lab started incusd (then no other client shares its metrics cache).
    pub fn started_daemon(&self) -> bool {
        self.daemon.is_some()
    }

    /// Whether the lab made the network (and removes it, with its bridge, when dropped).
    pub fn created_network(&self) -> bool {
        self.created_network
    }

    /// A project whose instances use the default project's images and profiles.
    pub fn project(&mut self, name: &str) -> Result<()> {
        ok(&[
            "project",
            "create",
            name,
            "-c",
            "features.images=false",
            "-c",
            "features.profiles=false",
        ])?;
        self.projects.push(name.to_string());
        Ok(())
    }

    /// Launches `name` in `project` with a memory limit and no swap, no IPv6, a static
    /// address on the bridge; waits until it answers with that address.
    pub fn container(
        &mut self,
        project: Option<&str>,
        name: &str,
        memory_mib: u64,
    ) -> Result<Instance> {
        let [a, b, c] = NET;
        let ip = Ipv4Addr::new(a, b, c, self.next_host);
        self.next_host += 1;
        let mut args: Vec<String> = ["launch", &self.image, name, "-s", POOL, "-n", BRIDGE, "-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(format!("limits.memory={memory_mib}MiB"));
        for cfg in [
            "limits.memory.swap=false",
            "linux.sysctl.net.ipv6.conf.all.disable_ipv6=1",
            "linux.sysctl.net.ipv6.conf.default.disable_ipv6=1",
        ] {
            args.push("-c".into());
            args.push(cfg.into());
        }
        args.extend(project_args(project));
        self.instances
            .push((project.map(str::to_string), name.to_string()));
        run_ok(incus().args(&args).stdin(Stdio::null()), CMD_TIMEOUT)
            .with_context(|| format!("launching {name} in {project:?}"))?;
        let lxc = lxc_name(project, name);
        let ct = Container::attached(
            lxc.clone(),
            ip,
            Ipv4Addr::new(a, b, c, 1),
            Path::new(LXCPATH).join(&lxc).join("rootfs"),
            PathBuf::from(LXCPATH),
        )?;
        let up = poll(Duration::from_secs(20), || Ok(ct.init_pid().ok()))?;
        ensure!(up.is_some(), "{lxc} has no init process");
        ct.sh(&format!(
            "ip link set eth0 up && ip addr add {ip}/24 dev eth0 && ip -4 addr show eth0"
        ))
        .with_context(|| format!("configuring {ip} in {lxc}"))?;
        // Permanent neighbour entries on both sides: no ARP probes after the workloads, so
        // the counters hold still while Incus and lxcmon read them.
        let br_mac = fs::read_to_string(format!("/sys/class/net/{BRIDGE}/address"))
            .with_context(|| format!("reading {BRIDGE}'s address"))?;
        let ct_mac = ct.sh("cat /sys/class/net/eth0/address")?;
        ct.sh(&format!(
            "arp -i eth0 -s {}.{}.{}.1 {}",
            a,
            b,
            c,
            br_mac.trim()
        ))?;
        run_ok(
            Command::new("ip").args([
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                ct_mac.trim(),
                "dev",
                BRIDGE,
                "nud",
                "permanent",
            ]),
            CMD_TIMEOUT,
        )?;
        Ok(Instance {
            project: project.map(str::to_string),
            name: name.to_string(),
            ct,
        })
    }

    /// Incus's own figures for every instance of every project (`/1.0/metrics` without
    /// `?project=` covers all projects; Incus caches them 8 s per project).
    pub fn metrics(&self) -> Result<Metrics> {
        Metrics::parse(&ok(&["query", "/1.0/metrics"])?)
    }
}

impl Drop for IncusLab {
    fn drop(&mut self) {
        for (project, name) in self.instances.drain(..) {
            let mut args = vec!["delete".to_string(), "--force".into(), name.clone()];
            args.extend(project_args(project.as_deref()));
            if let Err(e) = run_ok(incus().args(&args), CMD_TIMEOUT) {
                eprintln!("testkit: deleting Incus container {name}: {e:#}");
            }
        }
        for p in self.projects.drain(..) {
            if let Err(e) = ok(&["project", "delete", &p]) {
                eprintln!("testkit: deleting Incus project {p}: {e:#}");
            }
        }
        if self.created_network {
            if let Err(e) = ok(&["network", "delete", BRIDGE]) {
                eprintln!("testkit: deleting Incus network {BRIDGE}: {e:#}");
            }
        }
        if self.created_pool {
            if let Err(e) = ok(&["storage", "delete", POOL]) {
                eprintln!("testkit: deleting Incus pool {POOL}: {e:#}");
            }
        }
        if let Some(ours) = self.daemon.take() {
            stop_daemon(ours);
        }
    }
}

/// An incusd the suite started: this run's child, or an earlier run's (by its pid file).
enum Ours {
    Child(Child),
    Leftover(i32),
}

/// The pid of the incusd the suite started, while it runs (it is stopped at the end of a
/// run; a file left by a crash names it so the next run stops it).
const PID_FILE: &str = "/run/lxcmon-testkit-incusd.pid";

fn leftover_daemon() -> Option<i32> {
    let pid: i32 = fs::read_to_string(PID_FILE).ok()?.trim().parse().ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    (exe == Path::new(INCUSD)).then_some(pid)
}

/// Starts incusd as the packaged `startup` script would (its log in /var/log/incus).
fn start_daemon() -> Result<Child> {
    fs::create_dir_all("/var/log/incus").context("creating /var/log/incus")?;
    eprintln!("testkit: starting {INCUSD}");
    let mut child = Command::new(INCUSD)
        .args([
            "--group",
            "incus-admin",
            "--logfile=/var/log/incus/incus.log",
        ])
        // Else it fetches instance types from images.linuxcontainers.org at start: the
        // test's traffic stays between the host and its containers.
        .env("INCUS_SKIP_INSTANCE_TYPES", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {INCUSD}"))?;
    if !daemon_ready(30) {
        let _ = child.kill();
        let _ = child.wait();
        bail!("incusd did not get ready in 30 s (see /var/log/incus/incus.log)");
    }
    fs::write(PID_FILE, child.id().to_string()).with_context(|| format!("writing {PID_FILE}"))?;
    Ok(child)
}

/// `incusd shutdown` (it stops its instances and exits), then a kill if it has not.
fn stop_daemon(ours: Ours) {
    let _ = run_timeout(
        Command::new(INCUSD).args(["shutdown", "--timeout=30"]),
        Duration::from_secs(40),
    );
    match ours {
        Ours::Child(mut child) => {
            let gone = poll(Duration::from_secs(10), || {
                Ok(child.try_wait().ok().flatten().map(|_| ()))
            });
            if !matches!(gone, Ok(Some(()))) {
                eprintln!("testkit: incusd did not exit after `incusd shutdown`: killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ours::Leftover(pid) => {
            let proc_dir = format!("/proc/{pid}");
            let gone = poll(Duration::from_secs(10), || {
                Ok((!Path::new(&proc_dir).exists()).then_some(()))
            });
            if !matches!(gone, Ok(Some(()))) {
                if let Some(p) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
    }
    let _ = fs::remove_file(PID_FILE);
}

/// FNV-1a: a stable hash of the image's recipe (std's hasher may change between releases).
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The alias of the busybox image, imported now unless an image of the same recipe is.
fn ensure_image() -> Result<String> {
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox (busybox-static)")?;
    let recipe = fnv(&[
        &busybox,
        INITTAB.as_bytes(),
        RCS.as_bytes(),
        crate::lab::MEMHOG_C.as_bytes(),
    ]);
    let alias = format!("{IMAGE_PREFIX}{recipe:016x}");
    if succeeds(&["image", "show", &alias]) {
        return Ok(alias);
    }
    // Older recipes' images go: only one is kept.
    for line in ok(&["image", "alias", "list", "--format=csv"])?.lines() {
        if let Some(old) = line
            .split(',')
            .next()
            .filter(|a| a.starts_with(IMAGE_PREFIX))
        {
            eprintln!("testkit: deleting the outdated image {old}");
            ok(&["image", "delete", old])?;
        }
    }
    let dir = std::env::temp_dir().join("lxcmon-testkit-incus-image");
    let _ = fs::remove_dir_all(&dir);
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "sbin",
        "etc/init.d",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "run",
    ] {
        fs::create_dir_all(root.join(d)).with_context(|| format!("creating {d}"))?;
    }
    fs::write(root.join("bin/busybox"), &busybox)?;
    let applets = run_ok(Command::new("/bin/busybox").arg("--list"), CMD_TIMEOUT)?.stdout;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    std::os::unix::fs::symlink("../bin/busybox", root.join("sbin/init"))?;
    fs::write(root.join("etc/inittab"), INITTAB)?;
    fs::write(root.join("etc/init.d/rcS"), RCS)?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let memhog = build_memhog(&dir.join("build"))?;
    fs::copy(&memhog, root.join("bin/lxcmon-memhog")).context("copying the memory holder")?;
    for exe in ["bin/busybox", "etc/init.d/rcS", "bin/lxcmon-memhog"] {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(root.join(exe), fs::Permissions::from_mode(0o755))?;
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    fs::write(
        dir.join("metadata.yaml"),
        format!(
            "architecture: x86_64\ncreation_date: {created}\nproperties:\n  \
             description: lxcmon test busybox\n  os: busybox\n"
        ),
    )?;
    let tarball = dir.join("image.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-czf")
            .arg(&tarball)
            .args(["metadata.yaml", "rootfs"]),
        CMD_TIMEOUT,
    )?;
    eprintln!("testkit: importing the busybox image as {alias}");
    run_ok(
        incus()
            .args(["image", "import"])
            .arg(&tarball)
            .args(["--alias", &alias]),
        CMD_TIMEOUT,
    )?;
    let _ = fs::remove_dir_all(&dir);
    Ok(alias)
}

/// One Prometheus sample: its labels and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// `/1.0/metrics` parsed: samples by metric name.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<String, Vec<Sample>>,
}

impl Metrics {
    /// The text exposition format as Incus writes it (`name{k="v",...} value`).
    pub fn parse(text: &str) -> Result<Self> {
        let mut m = Self::default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("metrics line without a value: {line}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("metrics value in {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = BTreeMap::new();
            // Incus's label values (names, devices, projects) contain no `,` or `"`.
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .with_context(|| format!("label {pair} in {line}"))?;
                map.insert(k.to_string(), v.trim_matches('"').to_string());
            }
            m.samples
                .entry(name.to_string())
                .or_default()
                .push(Sample { labels: map, value });
        }
        Ok(m)
    }

    /// The samples of `metric` for one instance (`project`: `default` for the default one).
    pub fn of<'a>(
        &'a self,
        metric: &str,
        project: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .get(metric)
            .into_iter()
            .flatten()
            .filter(move |s| {
                s.labels.get("project").map(String::as_str) == Some(project)
                    && s.labels.get("name").map(String::as_str) == Some(name)
            })
    }

    /// The one sample of `metric` for the instance (with `device` when given).
    pub fn value(
        &self,
        metric: &str,
        project: &str,
        name: &str,
        device: Option<&str>,
    ) -> Result<f64> {
        let found: Vec<f64> = self
            .of(metric, project, name)
            .filter(|s| {
                device.is_none_or(|d| s.labels.get("device").map(String::as_str) == Some(d))
            })
            .map(|s| s.value)
            .collect();
        match found.as_slice() {
            [v] => Ok(*v),
            _ => bail!("{metric} of {project}/{name} (device {device:?}): {found:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_incus_metrics_text() {
        let m = Metrics::parse(
            "# HELP incus_memory_OOM_kills_total x\n# TYPE incus_memory_OOM_kills_total counter\n\
             incus_memory_OOM_kills_total{name=\"peer3\",project=\"p2\",type=\"container\"} 1\n\
             incus_network_receive_bytes_total{device=\"eth0\",name=\"a\",project=\"default\",type=\"container\"} 1.6777216e+07\n\
             incus_network_receive_bytes_total{device=\"lo\",name=\"a\",project=\"default\",type=\"container\"} 0\n",
        )
        .unwrap();
        assert_eq!(
            m.value("incus_memory_OOM_kills_total", "p2", "peer3", None)
                .unwrap(),
            1.0
        );
        assert_eq!(
            m.value(
                "incus_network_receive_bytes_total",
                "default",
                "a",
                Some("eth0")
            )
            .unwrap(),
            16777216.0
        );
        assert!(m
            .value("incus_network_receive_bytes_total", "default", "a", None)
            .is_err());
        assert_eq!(fnv(&[b"a", b"b"]), fnv(&[b"a", b"b"]));
        assert_ne!(fnv(&[b"ab"]), fnv(&[b"a", b"b"]));
    }
}
