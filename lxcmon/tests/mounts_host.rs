//! Per-mount figures against the real kernel: a directory-backed "container" (a mount
//! namespace pivoted into a directory of this host's filesystem, as LXC does) with an ext4
//! loop disk and tmpfs mounts of known size, read the way the agent reads them.
//!
//! Root, `unshare`, `nsenter`, `mkfs.ext4`, busybox-static; run under the lab's lock:
//! `flock /tmp/lxcmon-root.lock cargo test -p lxcmon --test mounts_host -- --ignored`.

use lxcmon::readers::mounts::{open_in_root, ChangeSignals, MountTable, MountUsage};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;

/// The namespace's process and its directory, removed whatever happens.
struct Ct {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Ct {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ct {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Runs busybox `args` inside the namespace (its root is the container's).
    fn exec(&self, args: &[&str]) {
        let st = Command::new("nsenter")
            .args(["-t", &self.pid().to_string(), "-m", "/bin/busybox"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "busybox {args:?} in the namespace: {st}");
    }

    /// `stat -f` inside the namespace: (blocks, free, avail, block size, inodes, free inodes).
    fn statfs(&self, path: &str) -> [u64; 6] {
        let out = Command::new("nsenter")
            .args(["-t", &self.pid().to_string(), "-m", "/bin/busybox"])
            .args(["stat", "-f", "-c", "%b %f %a %S %c %d", path])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let v: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        v.try_into().unwrap()
    }
}

/// A directory-backed container: `rootfs/` (busybox, `mnt/data` with a 32 MiB ext4 on a loop
/// device, a symlink out of it), the namespace pivoted into it.
fn container() -> Ct {
    let dir = tempfile::Builder::new()
        .prefix("lxcmon-mounts-")
        .tempdir_in("/tmp")
        .unwrap();
    let r = dir.path().join("rootfs");
    for d in ["bin", "etc", "mnt/data", "mnt/t", "mnt/sub", "old"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("mnt/evil")).unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-N", "2048", "-m", "0"])
        .arg(&img)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4");
    // LXC's way: the rootfs bind-mounted on itself, pivot_root into it, the old root detached.
    let script = format!(
        "set -e; mount --bind {r} {r}; mount -o loop {img} {r}/mnt/data; \
         mkdir {r}/mnt/data/sub; cd {r}; pivot_root . old; \
         exec /bin/busybox sh -c '/bin/busybox umount -l /old; exec /bin/busybox sleep 600'",
        img = img.display(),
        r = r.display()
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .spawn()
        .unwrap();
    let ct = Ct { child, dir };
    // Ready when the old root is gone from its table.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", ct.pid())).unwrap_or_default();
        if info.contains(" /mnt/data ") && !info.contains(" /old") {
            break;
        }
        assert!(Instant::now() < deadline, "namespace not ready:\n{info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    ct
}

fn open_root(pid: u32) -> OwnedFd {
    rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap()
}

/// One cycle of a table that polls itself (`changed` `None`) or asks the shared epoll.
fn sample(table: &mut MountTable, root: &OwnedFd, changed: Option<&[u64]>) -> Vec<MountUsage> {
    let stat = rustix::fs::fstatvfs(root).unwrap();
    let mut out = Vec::new();
    table
        .sample(root.as_fd(), &stat, changed, &mut Vec::new(), &mut out)
        .unwrap();
    out
}

fn points(mounts: &[MountUsage]) -> Vec<&str> {
    mounts.iter().map(|m| m.mountpoint.as_str()).collect()
}

/// The watcher's thread takes the epoll events and files the tokens a moment after the change
/// (a cycle later, in the agent): after a mount or unmount, wait (bounded) until one arrives.
fn drain_after_change(signals: &ChangeSignals, tokens: &mut Vec<u64>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        signals.drain(tokens).unwrap();
        if !tokens.is_empty() || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore = "needs root, unshare, nsenter, mkfs.ext4, busybox; run under the lab lock"]
fn mounts_of_a_directory_backed_container() {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let ct = container();
    let pid = ct.pid();
    let root = open_root(pid);
    let mut buf = Vec::new();
    let info = PathBuf::from(format!("/proc/{pid}/mountinfo"));
    // The same table twice: one polled on its own, one watched by the shared epoll.
    let mut table = MountTable::open(info.clone(), root.as_fd(), None, &mut buf).unwrap();
    let signals = ChangeSignals::new().unwrap();
    let mut watched =
        MountTable::open(info, root.as_fd(), Some((&signals, Some(pid))), &mut buf).unwrap();
    let mut tokens = Vec::new();
    assert!(!table.changed().unwrap(), "held and unchanged: no event");
    signals.drain(&mut tokens).unwrap();
    assert!(tokens.is_empty(), "no change: no table to read again");

    let got = sample(&mut table, &root, None);
    assert_eq!(points(&got), ["/", "/mnt/data"], "{got:#?}");
    assert_eq!(sample(&mut watched, &root, Some(&tokens)), got);
    // The root is a directory of this host's filesystem: shared, with the host's figures.
    let host = rustix::fs::statvfs("/").unwrap();
    assert!(got[0].shared, "a directory-backed root is shared");
    assert_eq!(got[0].size_bytes, host.f_blocks * host.f_frsize);
    assert_eq!(got[0].fstype, host_fstype("/"));

    // The disk: its own (a filesystem of the container), figures as `stat -f` inside says.
    let data = &got[1];
    assert!(!data.shared);
    assert_eq!(data.fstype, "ext4");
    assert!(data.source.starts_with("/dev/loop"), "{}", data.source);
    let [blocks, free, avail, bsize, inodes, ifree] = ct.statfs("/mnt/data");
    assert_eq!(data.size_bytes, blocks * bsize);
    assert_eq!(data.used_bytes, (blocks - free) * bsize);
    assert_eq!(data.avail_bytes, avail * bsize);
    assert_eq!((data.inodes, data.inodes_free), (inodes, ifree));
    assert!(data.size_bytes > 24 * MIB && data.size_bytes <= 32 * MIB);
    assert!(data.inodes >= 2048);

    // 4 MiB written to it: used grows by that much (a few metadata blocks aside), one inode.
    let file = ct.rootfs().join("mnt/data/sub/blob");
    let host_view = format!("/proc/{pid}/root/mnt/data/sub/blob");
    std::fs::write(&host_view, vec![7u8; 4 * MIB as usize]).unwrap();
    rustix::fs::sync();
    let after = sample(&mut table, &root, None);
    let grown = after[1].used_bytes - data.used_bytes;
    assert!(
        (4 * MIB..4 * MIB + 256 * 1024).contains(&grown),
        "used grew by {grown}"
    );
    assert_eq!(after[1].inodes_free, data.inodes_free - 1);
    assert!(!file.exists(), "the disk is mounted in the namespace only");

    // A tmpfs of known size: a change of the table, signalled once by poll().
    ct.exec(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=8m,nr_inodes=1000",
        "tmpfs",
        "/mnt/t",
    ]);
    assert!(table.changed().unwrap(), "a mount in the namespace: event");
    assert!(!table.changed().unwrap(), "the poll cleared it");
    drain_after_change(&signals, &mut tokens);
    assert_eq!(tokens.len(), 1, "the watched table changed");
    let token = tokens.clone();
    signals.drain(&mut tokens).unwrap();
    assert!(tokens.is_empty(), "reported once");
    let t = open_in_root(root.as_fd(), b"/mnt/t").unwrap();
    let st = rustix::fs::fstatvfs(&t).unwrap();
    assert_eq!(st.f_blocks * st.f_frsize, 8 * MIB);
    assert_eq!(st.f_files, 1000);
    // tmpfs is no storage of the container; the table is unchanged by it.
    assert_eq!(points(&sample(&mut table, &root, None)), ["/", "/mnt/data"]);
    assert_eq!(
        points(&sample(&mut watched, &root, Some(&token))),
        ["/", "/mnt/data"]
    );

    // A bind mount of a subdirectory of the disk: found on the next sample (its poll saw the
    // change, the table was read again at offset 0), shared (a part of a filesystem).
    ct.exec(&["mount", "-o", "bind", "/mnt/data/sub", "/mnt/sub"]);
    let got = sample(&mut table, &root, None);
    let sub = got.iter().find(|m| m.mountpoint == "/mnt/sub").unwrap();
    assert!(sub.shared);
    assert_eq!((sub.dev, sub.size_bytes), (got[1].dev, got[1].size_bytes));
    drain_after_change(&signals, &mut tokens);
    assert_eq!(tokens, token);
    assert_eq!(
        points(&sample(&mut watched, &root, Some(&tokens))),
        ["/", "/mnt/data", "/mnt/sub"]
    );
    ct.exec(&["umount", "/mnt/sub"]);
    assert_eq!(sample(&mut table, &root, None).len(), 2);
    drain_after_change(&signals, &mut tokens);
    assert_eq!(sample(&mut watched, &root, Some(&tokens)).len(), 2);

    // The container's symlink to /etc: its own etc/, never the host's.
    let inside = std::fs::metadata(ct.rootfs().join("etc")).unwrap();
    let fd = open_in_root(root.as_fd(), b"/mnt/evil").unwrap();
    let st = rustix::fs::fstat(&fd).unwrap();
    assert_eq!((st.st_dev, st.st_ino), (inside.dev(), inside.ino()));
    // Through /proc/<pid>/root by a plain path walk it would have been the host's.
    let naive = std::fs::metadata(format!("/proc/{pid}/root/mnt/evil")).unwrap();
    let host_etc = std::fs::metadata("/etc").unwrap();
    assert_eq!(naive.ino(), host_etc.ino());
    assert_ne!(inside.ino(), host_etc.ino());

    // The container stops. A mountinfo held open keeps its namespace, and so its disk, alive;
    // the watcher lets it go when the init exits, without waiting for a cycle.
    drop((t, fd, root));
    let img = ct.dir.path().join("disk.img");
    let mut ct = ct;
    ct.child.kill().unwrap();
    ct.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(attached(&img), "the polled table still holds the namespace");
    drop(table);
    let deadline = Instant::now() + Duration::from_secs(5);
    while attached(&img) {
        assert!(
            Instant::now() < deadline,
            "the loop device stays attached: the stopped container's mounts are held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let root = open_root(std::process::id());
    let stat = rustix::fs::fstatvfs(&root).unwrap();
    let err = watched
        .sample(root.as_fd(), &stat, None, &mut buf, &mut Vec::new())
        .unwrap_err();
    assert!(err.is_gone(), "{err}");
}

/// Whether a loop device is still attached to `img` (autoclear: until its last user).
fn attached(img: &std::path::Path) -> bool {
    let out = Command::new("losetup").arg("-j").arg(img).output().unwrap();
    assert!(out.status.success());
    !out.stdout.is_empty()
}

/// The type of the filesystem at `path`, from this process's own mount table.
fn host_fstype(path: &str) -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(path))
        .and_then(|l| l.split(" - ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_string()
}
