//! A synthetic fleet of containers in the plain-LXC (`lxc.payload.<name>`) or Proxmox
//! (`lxc/<vmid>/ns`) cgroup layout, built without LXC: one `unshare` per container (new PID,
//! network and mount namespaces), a tmpfs root it chroots into, a veth pair to a bench
//! bridge, sleeping processes at the top of its cgroup and in a nested sub-cgroup.
//!
//! The cgroups (layout, hierarchies, v1 cpuset inheritance, teardown) come from the testkit's
//! [`ct`], which the VM guest builds its containers with too; what is the fleet's own is the
//! batch start through `unshare` and the busybox init script.
//!
//! Everything carries the `lxcmon-bench` prefix (Proxmox: VMIDs from [`VMID_BASE`]) so
//! [`cleanup`] can remove leftovers of a crashed run by name. [`Fleet`] tears down on drop.

use anyhow::{bail, Context, Result};
use lxcmon_testkit::ct::{self, Hierarchy};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

pub const PREFIX: &str = "lxcmon-bench-";
/// Proxmox-layout VMIDs are `VMID_BASE + i`; cleanup only touches this range.
pub const VMID_BASE: u32 = 910_000;
const VMID_SPAN: u32 = 10_000;
pub const BRIDGE: &str = "lxcmbench0";
const VETH_PREFIX: &str = "lxcmb-";
const RUN_DIR: &str = "/run/lxcmon-bench";
pub const IO_DIR: &str = "/var/tmp/lxcmon-bench-io";
/// The bridge's address; containers get 10.213.x.y/16, and their only traffic goes here.
pub const HOST_ADDR: &str = "10.213.0.1";
/// Every this-many-th container runs light background I/O and pings the bridge.
const ACTIVE_EVERY: usize = 10;

pub use ct::Flavor;

/// One synthetic container.
#[derive(Debug)]
pub struct Container {
    pub index: usize,
    /// Its cgroup relative to each hierarchy's root (`lxc.payload.X` or `lxc/<vmid>`).
    pub rel: PathBuf,
    /// Where its processes live (`rel`, or `rel/ns` on Proxmox).
    pub procs_rel: PathBuf,
    /// Host PID of its init (last NSpid 1).
    pub init: u32,
    unshare: Child,
    stdin: Option<ChildStdin>,
}

pub struct Fleet {
    pub flavor: Flavor,
    pub hierarchies: Vec<Hierarchy>,
    pub containers: Vec<Container>,
    torn_down: bool,
}

fn container_rel(flavor: Flavor, i: usize) -> (PathBuf, PathBuf) {
    let id = match flavor {
        Flavor::Lxc => format!("{PREFIX}{i}"),
        Flavor::Proxmox => (VMID_BASE + i as u32).to_string(),
    };
    (flavor.cgroup(&id), flavor.procs(&id))
}

fn container_addr(i: usize) -> String {
    // 10.213.1.1 .. 10.213.40.250 for up to 10000 containers; the bridge is 10.213.0.1.
    format!("10.213.{}.{}/16", 1 + i / 250, 1 + i % 250)
}

const INIT_SCRIPT: &str = r#"
set -e
for f in $LXB_CG; do echo 0 > "$f"; done
R="$LXB_ROOT"
busybox mount -t tmpfs -o size=4m,mode=755 lxcmon-bench "$R"
busybox mkdir "$R/bin" "$R/io"
: > "$R/bin/busybox"
busybox mount --bind "$LXB_BUSYBOX" "$R/bin/busybox"
if [ -n "$LXB_IO" ]; then busybox mount --bind "$LXB_IO" "$R/io"; fi
read -r go
busybox ip link set lo up
busybox ip addr add "$LXB_ADDR" dev eth0
busybox ip link set eth0 up
( for f in $LXB_SUBCG; do echo 0 > "$f"; done; exec busybox chroot "$R" /bin/busybox sleep 2147483647 ) &
busybox chroot "$R" /bin/busybox sleep 2147483647 &
if [ -n "$LXB_IO" ]; then
  busybox chroot "$R" /bin/busybox sh -c 'i=0; while [ $i -lt 300 ]; do /bin/busybox dd if=/bin/busybox of=/io/data bs=64k count=4 oflag=direct conv=fsync 2>/dev/null; /bin/busybox dd if=/io/data of=/io/null bs=64k iflag=direct 2>/dev/null; i=$((i+1)); /bin/busybox sleep 2; done' </dev/null >/dev/null 2>&1 &
  busybox chroot "$R" /bin/busybox ping -q -c 600 -i 1 -s 200 -w 900 "$LXB_PING" </dev/null >/dev/null 2>&1 &
fi
exec busybox chroot "$R" /bin/busybox sleep 2147483647
"#;

pub fn which(name: &str) -> Result<PathBuf> {
    for dir in ["/usr/bin", "/bin", "/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(fs::canonicalize(&p).unwrap_or(p));
        }
    }
    bail!("{name} not found (apt-get install busybox-static util-linux iproute2)")
}

fn ip_batch(lines: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting ip -batch")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(lines.as_bytes())
            .context("feeding ip -batch")?;
    }
    let status = child.wait().context("waiting for ip -batch")?;
    if !status.success() {
        bail!("ip -batch failed ({status})");
    }
    Ok(())
}

/// The forked child of an `unshare --fork`: the container's init.
fn child_of(pid: u32, deadline: Instant) -> Result<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    loop {
        let text = fs::read_to_string(&path).unwrap_or_default();
        if let Some(c) = text.split_whitespace().next().and_then(|s| s.parse().ok()) {
            return Ok(c);
        }
        if Instant::now() > deadline {
            bail!("unshare {pid} did not fork its init in time");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Fleet {
    /// Builds `n` containers, `batch` at a time.
    pub fn build(flavor: Flavor, n: usize) -> Result<Self> {
        let busybox = which("busybox")?;
        let hierarchies = ct::hierarchies()?;
        let mut fleet = Fleet {
            flavor,
            hierarchies,
            containers: Vec::with_capacity(n),
            torn_down: false,
        };
        let started = Instant::now();
        ip_batch(&format!(
            "link add {BRIDGE} type bridge\naddr add {HOST_ADDR}/16 dev {BRIDGE}\nlink set {BRIDGE} up\n"
        ))?;
        fs::create_dir_all(RUN_DIR).context("creating the bench run dir")?;
        fs::create_dir_all(IO_DIR).context("creating the bench I/O dir")?;
        const BATCH: usize = 100;
        let mut i = 0;
        while i < n {
            let end = (i + BATCH).min(n);
            fleet.spawn_batch(i..end, &busybox)?;
            i = end;
        }
        fleet.wait_ready(Duration::from_secs(120 + n as u64 / 5))?;
        eprintln!(
            "bench: fleet of {n} containers ({flavor:?} layout) ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(fleet)
    }

    fn spawn_batch(&mut self, range: std::ops::Range<usize>, busybox: &Path) -> Result<()> {
        let first = self.containers.len();
        for i in range {
            let (rel, procs_rel) = container_rel(self.flavor, i);
            let sub_rel = procs_rel.join("sub");
            let mut top = Vec::new();
            let mut sub = Vec::new();
            for h in &self.hierarchies {
                h.create(&sub_rel)?;
                top.push(h.mount.join(&procs_rel).join("cgroup.procs"));
                sub.push(h.mount.join(&sub_rel).join("cgroup.procs"));
            }
            let join = |v: &[PathBuf]| {
                v.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let root = Path::new(RUN_DIR).join(i.to_string());
            fs::create_dir_all(&root).context("creating a container root dir")?;
            let active = i % ACTIVE_EVERY == 0;
            let io = if active {
                let d = Path::new(IO_DIR).join(i.to_string());
                fs::create_dir_all(&d).context("creating a container I/O dir")?;
                d.display().to_string()
            } else {
                String::new()
            };
            let mut child = Command::new("unshare")
                .args(["--pid", "--fork", "--kill-child", "--net", "--mount", "--"])
                .arg(busybox)
                .args(["sh", "-c", INIT_SCRIPT])
                .env("LXB_CG", join(&top))
                .env("LXB_SUBCG", join(&sub))
                .env("LXB_ROOT", &root)
                .env("LXB_BUSYBOX", busybox)
                .env("LXB_IO", io)
                .env("LXB_PING", HOST_ADDR)
                .env("LXB_ADDR", container_addr(i))
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting unshare")?;
            let stdin = child.stdin.take();
            self.containers.push(Container {
                index: i,
                rel,
                procs_rel,
                init: 0,
                unshare: child,
                stdin,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut batch = String::new();
        for c in &mut self.containers[first..] {
            c.init = child_of(c.unshare.id(), deadline)?;
            let veth = format!("{VETH_PREFIX}{}", c.index);
            batch.push_str(&format!(
                "link add {veth} type veth peer name eth0 netns {}\nlink set {veth} master {BRIDGE} up\n",
                c.init
            ));
        }
        ip_batch(&batch)?;
        for c in &mut self.containers[first..] {
            if let Some(mut stdin) = c.stdin.take() {
                stdin
                    .write_all(b"go\n")
                    .context("releasing a container's init")?;
            }
        }
        Ok(())
    }

    /// Waits until every init has exec'd its final sleep (its setup is done).
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for c in &mut self.containers {
            loop {
                let cmd = fs::read(format!("/proc/{}/cmdline", c.init)).unwrap_or_default();
                if cmd.starts_with(b"/bin/busybox\0sleep") {
                    break;
                }
                if let Ok(Some(status)) = c.unshare.try_wait() {
                    bail!(
                        "container {} failed during setup ({status}); rerun with a smaller fleet or see `cargo xtask bench --cleanup`",
                        c.index
                    );
                }
                if super::interrupted() {
                    bail!("interrupted");
                }
                if Instant::now() > deadline {
                    bail!("container {} not ready in time", c.index);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    }

    /// Per-container paths in each hierarchy that has the controller's files.
    pub fn dir(&self, controller: &str, rel: &Path) -> Option<PathBuf> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
            .map(|h| h.mount.join(rel))
    }

    /// The container's cgroup in the unified (cgroup2) tree, where one is mounted.
    pub fn unified_dir(&self, rel: &Path) -> Option<PathBuf> {
        self.hierarchies
            .iter()
            .find(|h| h.mount.join("cgroup.controllers").exists())
            .map(|h| h.mount.join(rel))
    }

    pub fn teardown(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let started = Instant::now();
        for c in &mut self.containers {
            // SIGKILL to a PID namespace's init kills the whole namespace; --kill-child then
            // lets unshare exit.
            ct::kill(c.init);
            c.stdin.take();
        }
        for c in &mut self.containers {
            let _ = c.unshare.kill();
            let _ = c.unshare.wait();
        }
        let result = cleanup();
        eprintln!(
            "bench: fleet torn down in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        result
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("bench: teardown: {e:#}");
        }
    }
}

fn is_bench_cgroup(top: &str, child: Option<&str>) -> bool {
    if top.starts_with(&format!("lxc.payload.{PREFIX}")) {
        return true;
    }
    if top == "lxc" {
        if let Some(id) = child.and_then(|c| c.parse::<u32>().ok()) {
            return (VMID_BASE..VMID_BASE + VMID_SPAN).contains(&id);
        }
    }
    false
}

/// The bench cgroups present in `h` (top level of each container).
fn bench_cgroups(h: &Hierarchy) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(&h.mount).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_bench_cgroup(&name, None) {
            out.push(e.path());
        } else if name == "lxc" {
            for c in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let id = c.file_name().to_string_lossy().into_owned();
                if is_bench_cgroup("lxc", Some(&id)) {
                    out.push(c.path());
                }
            }
        }
    }
    out
}

/// Removes every bench leftover by name: processes in bench cgroups, the cgroups, the
/// veths and the bridge, the run directories.
pub fn cleanup() -> Result<()> {
    let hierarchies = ct::hierarchies()?;
    let tops: Vec<PathBuf> = hierarchies.iter().flat_map(bench_cgroups).collect();
    let mut problems = Vec::new();
    if let Err(e) = ct::remove_subtrees(&tops, Duration::from_secs(60)) {
        problems.push(format!("bench cgroups: {e}"));
    }
    // An `lxc` parent the bench created for the Proxmox layout goes when it is empty.
    for h in &hierarchies {
        let _ = fs::remove_dir(h.mount.join("lxc"));
    }
    // Host veth ends vanish with their namespaces; any left (a crashed build) go here.
    if let Ok(entries) = fs::read_dir("/sys/class/net") {
        let mut batch = String::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(VETH_PREFIX) || name == BRIDGE {
                batch.push_str(&format!("link del {name}\n"));
            }
        }
        if !batch.is_empty() {
            // Links may vanish between listing and deleting: -force goes on past errors.
            let _ = Command::new("ip")
                .args(["-force", "-batch", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .and_then(|mut c| {
                    if let Some(mut s) = c.stdin.take() {
                        s.write_all(batch.as_bytes())?;
                    }
                    c.wait()
                });
        }
    }
    for d in [RUN_DIR, IO_DIR] {
        if Path::new(d).exists() {
            if let Err(e) = fs::remove_dir_all(d) {
                problems.push(format!("removing {d}: {e}"));
            }
        }
    }
    if !problems.is_empty() {
        bail!("cleanup incomplete: {}", problems.join("; "));
    }
    Ok(())
}
