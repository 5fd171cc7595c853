//! The initramfs (busybox, modules, the agent, the guest driver, /init) and the virtio disk.

use super::kernel::Kernel;
use super::Binaries;
use crate::deps;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// PID 1 of the guest (`tests/vm/init`): loads the modules, runs the guest driver, powers
/// off. The driver prints the result marker; a missing marker (crash, hang) fails on the host.
const INIT: &str = include_str!("../../../tests/vm/init");

fn busybox() -> Result<PathBuf> {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).is_file() {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("busybox not found (package busybox-static)")
}

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Builds `<dir>/initrd.cpio` (newc, uncompressed: unpacks fastest under TCG).
pub fn initramfs(k: &Kernel, bins: &Binaries, dir: &Path) -> Result<PathBuf> {
    let root = dir.join("initramfs");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "mnt", "etc", "root",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let bb = busybox()?;
    copy(&bb, &root.join("bin/busybox"))?;
    let list = Command::new(&bb)
        .arg("--list-full")
        .output()
        .context("busybox --list-full")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = root.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)?;
        }
    }
    copy(&bins.agent, &root.join("lxcmon"))?;
    copy(&bins.guest, &root.join("vm-guest"))?;
    write_exec(&root.join("init"), INIT)?;
    mp0_image(&root.join(MP0_IMAGE.trim_start_matches('/')))?;

    let mdst = root.join("lib/modules").join(&k.version);
    std::fs::create_dir_all(&mdst)?;
    for m in &k.modules {
        copy(&k.modules_dir().join(m), &mdst.join(m))?;
    }
    for f in ["modules.builtin", "modules.order"] {
        let src = k.modules_dir().join(f);
        if src.exists() {
            copy(&src, &mdst.join(f))?;
        }
    }
    deps::exec(
        Command::new(&bb)
            .args(["depmod", "-b"])
            .arg(&root)
            .arg(&k.version),
    )?;
    std::fs::write(root.join("etc/vm-modules"), k.load.join("\n") + "\n")?;

    // The kernel opens /dev/console before /init runs: it must be in the archive.
    deps::exec(
        Command::new("mknod")
            .arg(root.join("dev/console"))
            .args(["c", "5", "1"]),
    )?;
    let out = dir.join("initrd.cpio");
    let file = std::fs::File::create(&out)?;
    let status = Command::new("sh")
        .args(["-c", "find . -print0 | cpio --null -o -H newc --quiet"])
        .current_dir(&root)
        .stdout(file)
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("cpio failed: {status}");
    }
    Ok(out)
}

/// Where the guest finds the image of its Proxmox mount point `mp0` (attached to a loop
/// device): in the initramfs, so that its I/O reaches no block device but the loop device.
pub const MP0_IMAGE: &str = "/mp0.img";

/// A 16 MiB ext4 image with 1 KiB blocks and a known inode count, initialised completely (no
/// lazy initialisation writing behind the guest's back).
fn mp0_image(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(16 << 20)?;
    drop(f);
    deps::exec(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "mp0", "-b", "1024", "-N", "512"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path),
    )
}

/// A fresh 256 MiB raw disk with ext4 (made here, so the guest only mounts it).
pub fn disk(dir: &Path) -> Result<PathBuf> {
    let img = dir.join("disk.img");
    let f = std::fs::File::create(&img)?;
    f.set_len(256 << 20)?;
    drop(f);
    deps::exec(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "vmdata"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&img),
    )?;
    Ok(img)
}
