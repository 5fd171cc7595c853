//! Hand-made "containers": what LXC on Proxmox VE leaves behind, without LXC. Their cgroups
//! and namespaces are built with the testkit's `ct` (shared with the bench fleet); what is the
//! guest's own is the process model below, in one static binary.
//!
//! - `ct-monitor` (in `lxc.monitor/<vmid>`) unshares a PID namespace and starts `ct-init`, then
//!   sleeps in `wait()` like LXC's monitor process does.
//! - `ct-init` is PID 1 of that namespace (last `NSpid:` = 1); it joins its cgroup below
//!   `lxc/<vmid>/ns`, unshares mount, network, UTS and IPC namespaces, mounts its root (a
//!   tmpfs of known size, or a directory of the guest's disk bound like a directory-backed
//!   storage) and any extra filesystems (`mpN`) in its own mount namespace, chroots into it and
//!   reaps orphans forever.
//! - `ct-exec` enters a container like `lxc-attach`: joins a cgroup and the init's namespaces,
//!   chroots into its root and starts a command (which lands in the PID namespace).

use anyhow::{bail, Context, Result};
use lxcmon_testkit::ct::{self as tk, Flavor, Hierarchy};
use rustix::thread::UnshareFlags;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub const CGROOT: &str = "/sys/fs/cgroup";

/// The only hierarchy in the guest: cgroup2 at [`CGROOT`].
pub fn cgroups() -> Hierarchy {
    Hierarchy::v2(CGROOT)
}

/// Moves the calling process into `<CGROOT>/<rel>`.
pub fn join_cgroup(rel: impl AsRef<Path>) -> Result<()> {
    tk::join(&cgroups().dir(rel))
}

/// `ct-monitor <vmid> <hostname> <root> <init cgroup> [<mount>...]` (see [`init`]).
pub fn monitor(args: &[String]) -> Result<()> {
    let [vmid, hostname, size, init_cg, mounts @ ..] = args else {
        bail!("usage: ct-monitor VMID HOSTNAME ROOT INIT_CGROUP [DEV:FSTYPE:PATH...]");
    };
    join_cgroup(Flavor::Proxmox.monitor(vmid))?;
    // SAFETY: this process is single-threaded (no threads spawned before this point), and
    // NEWPID touches no file descriptor table.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }
        .context("unshare(CLONE_NEWPID)")?;
    let mut child = Command::new("/vm-guest")
        .args(["ct-init", vmid, hostname, size, init_cg])
        .args(mounts)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting ct-init")?;
    // The driver reads the init's PID (in the initial namespace) from this line.
    let mut out = std::io::stdout();
    writeln!(out, "INIT {}", child.id())?;
    out.flush()?;
    let status = child.wait()?;
    eprintln!("ct-monitor {vmid}: container init ended: {status}");
    Ok(())
}

/// `ct-init <vmid> <hostname> <root> <init cgroup> [<dev>:<fstype>:<path>...]`: PID 1 of the
/// container. `<root>` is a size in MiB (a tmpfs of that size) or `dir:<path>` (that
/// directory of the guest, bound: the root shares its filesystem with the guest); each
/// `<dev>:<fstype>:<path>` is mounted at `<path>` in the container, in its namespace only.
pub fn init(args: &[String]) -> Result<()> {
    let [vmid, hostname, size, init_cg, mounts @ ..] = args else {
        bail!("usage: ct-init VMID HOSTNAME ROOT INIT_CGROUP [DEV:FSTYPE:PATH...]");
    };
    join_cgroup(init_cg)?;
    let flags =
        UnshareFlags::NEWNS | UnshareFlags::NEWNET | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    // SAFETY: single-threaded; FILES is not among the flags.
    unsafe { rustix::thread::unshare_unsafe(flags) }.context("unshare")?;
    use rustix::mount::{MountFlags, MountPropagationFlags};
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .context("making / private")?;
    rustix::system::sethostname(hostname.as_bytes()).context("sethostname")?;
    let root = format!("/ct/{vmid}");
    std::fs::create_dir_all(&root)?;
    let dir_root = size.strip_prefix("dir:");
    if let Some(dir) = dir_root {
        rustix::mount::mount_bind(dir, root.as_str())
            .with_context(|| format!("binding {dir} as the container's root"))?;
    } else {
        let opts = std::ffi::CString::new(format!("size={size}m,mode=755"))?;
        rustix::mount::mount(
            "tmpfs",
            root.as_str(),
            "tmpfs",
            MountFlags::empty(),
            opts.as_c_str(),
        )
        .context("mounting the container's root tmpfs")?;
    }
    for d in ["bin", "proc", "data", "tmp", "dev", "etc", "sys"] {
        std::fs::create_dir_all(format!("{root}/{d}"))?;
    }
    std::fs::copy("/bin/busybox", format!("{root}/bin/busybox"))?;
    std::fs::copy("/vm-guest", format!("{root}/bin/vm-guest"))?;
    for applet in ["sh", "sleep", "cat", "ls", "ps", "df"] {
        std::os::unix::fs::symlink("busybox", format!("{root}/bin/{applet}"))?;
    }
    std::fs::write(format!("{root}/etc/hostname"), format!("{hostname}\n"))?;
    if dir_root.is_none() {
        // A tmpfs root gets a directory of the disk for its block I/O (a directory root is
        // on the disk already).
        let data = format!("/mnt/vdisk/ct{vmid}");
        std::fs::create_dir_all(&data)?;
        rustix::mount::mount_bind(data.as_str(), format!("{root}/data").as_str())
            .context("binding the disk directory")?;
    }
    for m in mounts {
        let mut parts = m.splitn(3, ':');
        let (Some(dev), Some(fstype), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("mount {m:?} is not DEV:FSTYPE:PATH");
        };
        let target = format!("{root}{path}");
        std::fs::create_dir_all(&target)?;
        rustix::mount::mount(dev, target.as_str(), fstype, MountFlags::empty(), None)
            .with_context(|| format!("mounting {dev} ({fstype}) on {path} in the container"))?;
    }
    rustix::mount::mount_bind_recursive("/dev", format!("{root}/dev").as_str())
        .context("binding /dev")?;
    rustix::mount::mount(
        "proc",
        format!("{root}/proc").as_str(),
        "proc",
        MountFlags::empty(),
        None,
    )
    .context("mounting proc")?;
    std::env::set_current_dir(&root)?;
    rustix::process::chroot(".").context("chroot")?;
    std::env::set_current_dir("/")?;
    std::fs::write("/ready", b"")?;
    loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(_) => {}
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(200)),
        }
    }
}

/// `ct-exec <init pid> <cgroup> <wait|detach> <program> [args...]`
pub fn exec(args: &[String]) -> Result<()> {
    let [pid, cgroup, mode, prog, rest @ ..] = args else {
        bail!("usage: ct-exec PID CGROUP wait|detach PROGRAM [ARGS...]");
    };
    join_cgroup(cgroup)?;
    tk::attach(pid.parse().with_context(|| format!("init pid {pid:?}"))?)?;
    let mut cmd = Command::new(prog);
    cmd.args(rest);
    if mode == "detach" {
        // Orphaned right away: the container's init adopts it.
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        cmd.spawn().with_context(|| format!("starting {prog}"))?;
        return Ok(());
    }
    let status = cmd.status().with_context(|| format!("running {prog}"))?;
    std::process::exit(status.code().unwrap_or(128));
}

/// A container as the driver sees it.
pub struct Container {
    pub vmid: u32,
    pub hostname: String,
    pub init_pid: u32,
    pub monitor: std::process::Child,
    /// Size of the tmpfs root; 0 for a directory root.
    pub rootfs_mib: u64,
    pub ip: String,
    pub mac: String,
    pub init_cgroup: String,
}

impl Container {
    /// `lxc/<vmid>`, relative to [`CGROOT`].
    pub fn base(&self) -> String {
        Flavor::Proxmox
            .cgroup(&self.vmid.to_string())
            .display()
            .to_string()
    }

    /// A path inside the container's root, from the driver's side.
    pub fn path(&self, p: &str) -> String {
        format!("/proc/{}/root{p}", self.init_pid)
    }

    /// Runs a program in the container (cgroup relative to `lxc/<vmid>/ns`, empty: the init's
    /// cgroup), waiting for it;
    /// returns its stdout.
    pub fn run(&self, cgroup: &str, argv: &[&str]) -> Result<String> {
        let out = self
            .exec_cmd(cgroup, "wait", argv)
            .output()
            .with_context(|| format!("ct-exec in {}: {argv:?}", self.vmid))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "{argv:?} in container {} failed: {} (stdout {text:?}, stderr {:?})",
                self.vmid,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// Starts a long-lived program in the container, not waiting for it.
    pub fn detach(&self, cgroup: &str, argv: &[&str]) -> Result<()> {
        let status = self
            .exec_cmd(cgroup, "detach", argv)
            .status()
            .with_context(|| format!("ct-exec in {}: {argv:?}", self.vmid))?;
        if !status.success() {
            bail!(
                "starting {argv:?} in container {} failed: {status}",
                self.vmid
            );
        }
        Ok(())
    }

    pub fn exec_cmd(&self, cgroup: &str, mode: &str, argv: &[&str]) -> Command {
        let cg = if cgroup.is_empty() {
            self.init_cgroup.clone()
        } else {
            format!("{}/ns/{cgroup}", self.base())
        };
        let mut cmd = Command::new("/vm-guest");
        cmd.args(["ct-exec", &self.init_pid.to_string(), &cg, mode]);
        cmd.args(argv);
        cmd
    }

    /// Runs a busybox command in the container's network namespace only (from the driver).
    pub fn net(&self, argv: &[&str]) -> Result<()> {
        let pid = self.init_pid.to_string();
        crate::sh(&[&["nsenter", "-t", &pid, "-n", "--"], argv].concat())
    }
}

/// Starts one container with a tmpfs root and waits until its init has entered its root.
pub fn start(
    vmid: u32,
    hostname: &str,
    rootfs_mib: u64,
    init_cgroup: &str,
    index: u32,
) -> Result<Container> {
    start_with(
        vmid,
        hostname,
        &rootfs_mib.to_string(),
        init_cgroup,
        index,
        &[],
    )
}

/// [`start`] with a root spec (`<MiB>` or `dir:<path>`) and extra `DEV:FSTYPE:PATH` mounts.
pub fn start_with(
    vmid: u32,
    hostname: &str,
    root: &str,
    init_cgroup: &str,
    index: u32,
    mounts: &[String],
) -> Result<Container> {
    use std::io::BufRead;
    let rootfs_mib = root.parse().unwrap_or(0);
    let mut monitor = Command::new("/vm-guest")
        .args(["ct-monitor", &vmid.to_string(), hostname, root, init_cgroup])
        .args(mounts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting ct-monitor")?;
    let stdout = monitor.stdout.take().context("monitor stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let init_pid: u32 = line
        .trim()
        .strip_prefix("INIT ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("ct-monitor {vmid} said {line:?}"))?;
    let ready = format!("/proc/{init_pid}/root/ready");
    let t0 = std::time::Instant::now();
    while !Path::new(&ready).exists() {
        if t0.elapsed().as_secs() > 20 {
            bail!("container {vmid}: init {init_pid} never got ready");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(Container {
        vmid,
        hostname: hostname.to_string(),
        init_pid,
        monitor,
        rootfs_mib,
        ip: format!("10.99.0.{}", 10 + index),
        mac: format!("02:00:00:00:00:{:02x}", 0x10 + index),
        init_cgroup: init_cgroup.to_string(),
    })
}
