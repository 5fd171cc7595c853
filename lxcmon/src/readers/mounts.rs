//! The filesystems of a container, as its own mount namespace shows them: root, Proxmox
//! mount points (`mpN`), bind mounts and extra disks; pseudo-filesystems left out.
//!
//! The table comes from `/proc/<init>/mountinfo`, held open and re-read only when the kernel
//! signals a change of the namespace's mounts (`poll()`, or one epoll for all containers).
//! Each cycle every mount point is opened (`O_PATH`) resolved inside the container's root and
//! asked `fstatvfs`: a container's symlinks never lead the agent to a host path. The
//! descriptor is closed again at once: held, it would keep the mount busy, and a `umount` in
//! the container would fail with EBUSY (seen on this host). The root's figures are the
//! statvfs of the init's root the sampler takes anyway.

use crate::readers::kfile::ReadError;
pub use crate::readers::mount_signals::ChangeSignals;
use crate::readers::mount_signals::{poll_changed, Watch};
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, StatVfs};
use std::borrow::Cow;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size and use of one filesystem mounted in a container, as `df` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountUsage {
    /// Where the container sees it (`/`, `/mnt/data`).
    pub mountpoint: String,
    pub fstype: String,
    /// The mount source (`/dev/mapper/pve-vm--101--disk--0`, `rpool/data/subvol-101-disk-1`).
    pub source: String,
    /// `major:minor` of the filesystem.
    pub dev: (u32, u32),
    pub size_bytes: u64,
    pub used_bytes: u64,
    /// Available to unprivileged users.
    pub avail_bytes: u64,
    pub inodes: u64,
    pub inodes_free: u64,
    /// Not the container's own: a subdirectory of a larger filesystem (a directory-backed
    /// storage, the host's root) or a filesystem another container mounts too. Its figures
    /// are the whole filesystem's, not the container's share.
    pub shared: bool,
}

/// Filesystem types that hold no storage of the container: kernel interfaces (`proc`,
/// `sysfs`, `cgroup*`, `bpf`, ...), memory-backed scratch space (`tmpfs`, `ramfs`, whose size
/// is a limit on RAM, not a disk), device nodes (`devtmpfs`, `devpts`, `mqueue`), LXCFS's
/// virtualised `/proc` files (`fuse.lxcfs`) and automount placeholders (`autofs`).
pub const PSEUDO_FILESYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fuse.lxcfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Mount points below these are kernel interfaces whatever their type (LXC binds parts of
/// `/proc` and `/sys` over one another).
const KERNEL_TREES: &[&str] = &["/proc", "/sys"];

/// One line of a mountinfo file, its paths unescaped (`\040` is a space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry<'a> {
    /// `major:minor` of the filesystem.
    pub dev: (u32, u32),
    /// The directory of the filesystem that is mounted (`/` unless a bind mount of a
    /// subdirectory).
    pub root: Cow<'a, [u8]>,
    pub mountpoint: Cow<'a, [u8]>,
    pub fstype: Cow<'a, [u8]>,
    pub source: Cow<'a, [u8]>,
}

impl MountEntry<'_> {
    /// Whether it is storage at all (see [`PSEUDO_FILESYSTEMS`]).
    pub fn is_storage(&self) -> bool {
        let fstype = &*self.fstype;
        if PSEUDO_FILESYSTEMS.iter().any(|p| p.as_bytes() == fstype) {
            return false;
        }
        !KERNEL_TREES.iter().any(|t| {
            let t = t.as_bytes();
            self.mountpoint.starts_with(t)
                && matches!(self.mountpoint.get(t.len()), None | Some(b'/'))
        })
    }
}

/// Every line of `/proc/<pid>/mountinfo`: `id parent maj:min root mountpoint options
/// [optional fields...] - fstype source super-options`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> impl Iterator<Item = MountEntry<'_>> {
    text.split(|&b| b == b'\n').filter_map(|line| {
        let mut f = line.split(|&b| b == b' ');
        let _id = f.next()?;
        let _parent = f.next()?;
        let (major, minor) = std::str::from_utf8(f.next()?).ok()?.split_once(':')?;
        let dev = (major.parse().ok()?, minor.parse().ok()?);
        let root = unescape(f.next()?);
        let mountpoint = unescape(f.next()?);
        let _options = f.next()?;
        // Optional fields (`shared:1`, `master:2`, ...), any number, up to the `-`.
        f.by_ref().find(|x| *x == b"-")?;
        let fstype = unescape(f.next()?);
        let source = unescape(f.next()?);
        Some(MountEntry {
            dev,
            root,
            mountpoint,
            fstype,
            source,
        })
    })
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash.
fn unescape(field: &[u8]) -> Cow<'_, [u8]> {
    if !field.contains(&b'\\') {
        return Cow::Borrowed(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (field[i], octal) {
            (b'\\', Some(d)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// The container's filesystems from its mountinfo: storage only, each filesystem once (by
/// `major:minor` and mounted directory; where it is mounted twice, the shortest mount point,
/// the first on a tie), a mount point mounted over hiding the one below.
pub fn container_filesystems(text: &[u8]) -> Vec<MountEntry<'_>> {
    let mut kept: Vec<MountEntry<'_>> = Vec::new();
    for e in parse_mountinfo(text) {
        // Mounted over: the earlier mount at this point is out of reach.
        kept.retain(|k| k.mountpoint != e.mountpoint);
        if !e.is_storage() {
            continue;
        }
        match kept.iter_mut().find(|k| k.dev == e.dev && k.root == e.root) {
            Some(k) if e.mountpoint.len() < k.mountpoint.len() => *k = e,
            Some(_) => {}
            None => kept.push(e),
        }
    }
    kept
}

/// Figures of one filesystem in bytes and inodes, from `statvfs`.
pub fn apply_statvfs(usage: &mut MountUsage, s: &StatVfs) {
    let unit = s.f_frsize.max(1);
    usage.size_bytes = s.f_blocks.saturating_mul(unit);
    usage.used_bytes = s.f_blocks.saturating_sub(s.f_bfree).saturating_mul(unit);
    usage.avail_bytes = s.f_bavail.saturating_mul(unit);
    usage.inodes = s.f_files;
    usage.inodes_free = s.f_ffree;
}

/// Opens `mountpoint` (absolute, as the container sees it) inside the container's root
/// `root`: absolute symlinks and `..` stay below `root`, `/proc/<pid>/...` magic links are
/// refused. `O_PATH`: nothing is read through it, `fstatvfs` works on it.
pub fn open_in_root(root: BorrowedFd<'_>, mountpoint: &[u8]) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        root,
        OsStr::from_bytes(mountpoint),
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// The filesystems of one container, held across cycles.
#[derive(Debug)]
pub struct MountTable {
    path: PathBuf,
    /// `/proc/<init>/mountinfo`: a seq_file regenerated by each read at offset 0, and the
    /// kernel's change signal for the namespace's mounts: `poll()` reports `POLLPRI|POLLERR`
    /// once after each change (the poll itself clears it; checked on this host).
    mountinfo: Source,
    mounts: Vec<Held>,
}

#[derive(Debug)]
enum Source {
    /// Held here, polled each cycle.
    Own(File),
    /// Held by the [`ChangeSignals`] watcher (closed when the init exits).
    Watched(Watch),
}

#[derive(Debug)]
struct Held {
    usage: MountUsage,
    /// The mount point's raw bytes, to open it again each cycle; `None` for the container's
    /// root, whose figures are the root statvfs the caller has.
    path: Option<Vec<u8>>,
    /// Opening or `fstatvfs` failed last time (logged once, until it works again).
    failing: bool,
}

impl MountTable {
    /// Opens `mountinfo` (a `/proc/<pid>/mountinfo`) and every filesystem it lists, resolved
    /// inside `root` (that process's root directory). With `signals`, the file is handed to
    /// that watcher (with the pid it belongs to on the real `/proc`: closed when it exits) and
    /// its changes are asked there (see [`Self::sample`]); without, by a `poll()` of its own.
    pub fn open(
        mountinfo: PathBuf,
        root: BorrowedFd<'_>,
        signals: Option<(&ChangeSignals, Option<u32>)>,
        buf: &mut Vec<u8>,
    ) -> Result<Self, ReadError> {
        let file = File::open(&mountinfo).map_err(|e| ReadError::io(&mountinfo, e))?;
        let mut table = Self {
            path: mountinfo,
            mountinfo: Source::Own(file),
            mounts: Vec::new(),
        };
        // Read after the open: a change from here on is signalled (at worst once too often).
        table.reload(root, buf)?;
        if let (Some((signals, pid)), Source::Own(file)) = (signals, &table.mountinfo) {
            let watched = file.try_clone().and_then(|dup| signals.watch(dup, pid));
            match watched {
                Ok(watch) => table.mountinfo = Source::Watched(watch),
                Err(e) => {
                    tracing::debug!(mountinfo = %table.path.display(), error = %e, "not watched: polled on its own")
                }
            }
        }
        Ok(table)
    }

    /// Whether the namespace's mounts changed since the last call (or since the open).
    pub fn changed(&self) -> Result<bool, ReadError> {
        let changed = match &self.mountinfo {
            Source::Own(file) => poll_changed(file),
            Source::Watched(w) => w.poll().unwrap_or_else(|| Err(exited())),
        };
        changed.map_err(|e| ReadError::io(&self.path, e))
    }

    /// Re-reads the table and opens its filesystems again.
    fn reload(&mut self, root: BorrowedFd<'_>, buf: &mut Vec<u8>) -> Result<(), ReadError> {
        match &self.mountinfo {
            Source::Own(file) => read_whole(|b| file.read_at(b, 0), &self.path, buf)?,
            Source::Watched(w) => read_whole(
                |b| w.read_at_zero(b).unwrap_or_else(|| Err(exited())),
                &self.path,
                buf,
            )?,
        };
        self.mounts.clear();
        for e in container_filesystems(buf) {
            let usage = MountUsage {
                mountpoint: String::from_utf8_lossy(&e.mountpoint).into_owned(),
                fstype: String::from_utf8_lossy(&e.fstype).into_owned(),
                source: String::from_utf8_lossy(&e.source).into_owned(),
                dev: e.dev,
                shared: &*e.root != b"/",
                ..MountUsage::default()
            };
            if &*e.mountpoint == b"/" {
                self.mounts.push(Held {
                    usage,
                    path: None,
                    failing: false,
                });
                continue;
            }
            let opened = open_in_root(root, &e.mountpoint).and_then(|fd| {
                // A file bound into the container (a device node, a config file) is no
                // filesystem of its own.
                Ok(FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Directory)
            });
            match opened {
                Ok(true) => self.mounts.push(Held {
                    usage,
                    path: Some(e.mountpoint.into_owned()),
                    failing: false,
                }),
                Ok(false) => {}
                Err(e) => tracing::info!(
                    mountinfo = %self.path.display(),
                    mountpoint = %usage.mountpoint,
                    error = %e,
                    "mount point not reachable in the container's root: no figures for it"
                ),
            }
        }
        Ok(())
    }

    /// Appends each filesystem's figures to `out`, after re-reading the table if it
    /// changed: for a table registered with the [`ChangeSignals`], whether its token is in
    /// `changed` (that cycle's [`ChangeSignals::drain`]); otherwise its own `poll()`.
    /// `root_stat` is the statvfs of the container's root (`/`), taken by the caller. A
    /// filesystem whose `fstatvfs` fails is left out (logged once).
    pub fn sample(
        &mut self,
        root: BorrowedFd<'_>,
        root_stat: &StatVfs,
        changed: Option<&[u64]>,
        buf: &mut Vec<u8>,
        out: &mut Vec<MountUsage>,
    ) -> Result<(), ReadError> {
        let changed = match (&self.mountinfo, changed) {
            (Source::Watched(w), Some(tokens)) => tokens.binary_search(&w.token()).is_ok(),
            _ => self.changed()?,
        };
        if changed {
            self.reload(root, buf)?;
        }
        out.reserve(self.mounts.len());
        for m in &mut self.mounts {
            let result = match &m.path {
                None => {
                    apply_statvfs(&mut m.usage, root_stat);
                    Ok(())
                }
                // Opened for this statvfs only: a held descriptor would keep the mount busy
                // (`umount` in the container fails with EBUSY; seen on this host).
                Some(path) => open_in_root(root, path)
                    .and_then(|fd| Ok(rustix::fs::fstatvfs(fd.as_fd())?))
                    .map(|st| apply_statvfs(&mut m.usage, &st)),
            };
            match result {
                Ok(()) => {
                    m.failing = false;
                    out.push(m.usage.clone());
                }
                Err(e) => {
                    if !m.failing {
                        tracing::warn!(mountinfo = %self.path.display(), mountpoint = %m.usage.mountpoint, error = %e, "statvfs failed: no figures for this filesystem until it works again");
                    }
                    m.failing = true;
                }
            }
        }
        Ok(())
    }

    /// The mount points held (for tests and the log).
    pub fn mountpoints(&self) -> impl Iterator<Item = &str> {
        self.mounts.iter().map(|m| m.usage.mountpoint.as_str())
    }
}

/// The watcher closed the file: the process it belongs to exited (a gone container).
fn exited() -> std::io::Error {
    std::io::Error::from_raw_os_error(3) // ESRCH
}

/// Reads the whole file at offset 0 into `buf` (grown until one read does not fill it).
fn read_whole<'a>(
    mut read_at_zero: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
    path: &Path,
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], ReadError> {
    if buf.len() < 4096 {
        buf.resize(4096, 0);
    }
    loop {
        let n = read_at_zero(buf).map_err(|e| ReadError::io(path, e))?;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        let grown = buf.len() * 2;
        buf.resize(grown, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A privileged LXC container's view, with what mountinfo can hold: escapes, optional
    /// fields (none, one, several), pseudo filesystems, a bind mount of a subdirectory, a
    /// filesystem mounted twice, a mount point mounted over.
    const MOUNTINFO: &str = r"22 1 8:1 /var/lib/lxc/ct/rootfs / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:5 / /proc rw,nosuid - proc proc rw
24 22 0:6 / /sys rw - sysfs sysfs rw
25 22 0:7 / /dev rw master:2 - devtmpfs udev rw,size=10k
26 25 0:8 / /dev/pts rw - devpts devpts rw
27 22 0:30 / /run rw - tmpfs tmpfs rw
28 23 0:31 /proc/cpuinfo /proc/cpuinfo rw - fuse.lxcfs lxcfs rw
29 23 8:1 /srv/x /proc/sys/fake rw - ext4 /dev/sda1 rw
30 22 253:2 / /mnt/my\040disk rw shared:5 master:3 propagate_from:1 - ext4 /dev/mapper/pve-vm--101--disk--1 rw
31 22 8:1 /srv/share /mnt/share rw - ext4 /dev/sda1 rw
32 30 253:2 / /mnt/my\040disk/again rw - ext4 /dev/mapper/pve-vm--101--disk--1 rw
33 22 253:2 / /d rw - ext4 /dev/mapper/pve-vm--101--disk--1 rw
34 22 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
35 22 0:41 / /dev/mqueue rw - mqueue mqueue rw
36 22 0:50 / /data rw - zfs rpool/data/subvol-101-disk-1 rw
37 36 0:51 / /data rw - nfs server:/x\011y rw
38 22 8:1 /etc/a\134b /etc/hosts rw - ext4 /dev/sda1 rw
garbage line
39 22 x:1 / /bad rw - ext4 /dev/sdz rw
";

    fn s(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn mountinfo_lines_with_escapes_and_optional_fields() {
        let all: Vec<_> = parse_mountinfo(MOUNTINFO.as_bytes()).collect();
        assert_eq!(all.len(), 17, "the two malformed lines are skipped");
        let disk = &all[8];
        assert_eq!(s(&disk.mountpoint), "/mnt/my disk");
        assert_eq!(disk.dev, (253, 2));
        assert_eq!(s(&disk.fstype), "ext4");
        assert_eq!(s(&disk.source), "/dev/mapper/pve-vm--101--disk--1");
        assert_eq!(s(&all[0].root), "/var/lib/lxc/ct/rootfs");
        assert_eq!(s(&all[15].source), "server:/x\ty");
        assert_eq!(s(&all[16].root), "/etc/a\\b");
        assert_eq!(&*unescape(br"a\04"), br"a\04", "not an escape: kept");
        assert_eq!(&*unescape(br"\012\\"), b"\n\\\\");
    }

    #[test]
    fn storage_only_each_filesystem_once() {
        let fs = container_filesystems(MOUNTINFO.as_bytes());
        let got: Vec<_> = fs
            .iter()
            .map(|e| (s(&e.mountpoint), s(&e.root), s(&e.fstype)))
            .collect();
        assert_eq!(
            got,
            [
                ("/", "/var/lib/lxc/ct/rootfs", "ext4"),
                // Mounted three times: the shortest mount point.
                ("/d", "/", "ext4"),
                ("/mnt/share", "/srv/share", "ext4"),
                // The ZFS dataset is mounted over by NFS: out of reach.
                ("/data", "/", "nfs"),
                ("/etc/hosts", "/etc/a\\b", "ext4"),
            ]
        );
        for e in &fs {
            assert!(e.is_storage());
        }
        // Below /proc and /sys whatever the type; /process is no kernel tree.
        let at = |mp: &str| MountEntry {
            dev: (8, 1),
            root: Cow::Borrowed(b"/"),
            mountpoint: Cow::Owned(mp.as_bytes().to_vec()),
            fstype: Cow::Borrowed(b"ext4"),
            source: Cow::Borrowed(b"/dev/sda1"),
        };
        assert!(!at("/proc").is_storage());
        assert!(!at("/sys/x").is_storage());
        assert!(at("/process").is_storage());
    }

    /// A container's root with `etc/` and mount points that are symlinks out of it.
    fn container_root() -> tempfile::TempDir {
        let ct = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(ct.path().join("etc")).unwrap();
        std::fs::create_dir_all(ct.path().join("mnt")).unwrap();
        std::os::unix::fs::symlink("/etc", ct.path().join("mnt/abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../etc", ct.path().join("mnt/up")).unwrap();
        ct
    }

    fn open_dir(p: &Path) -> OwnedFd {
        rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    #[test]
    fn symlinks_resolve_inside_the_container_root() {
        let ct = container_root();
        let root = open_dir(ct.path());
        let inside = std::fs::metadata(ct.path().join("etc")).unwrap();
        let host = std::fs::metadata("/etc").unwrap();
        assert_ne!((inside.dev(), inside.ino()), (host.dev(), host.ino()));
        for link in [&b"/mnt/abs"[..], b"/mnt/up", b"/../../etc"] {
            let fd = open_in_root(root.as_fd(), link).unwrap();
            let st = rustix::fs::fstat(&fd).unwrap();
            assert_eq!(
                (st.st_dev, st.st_ino),
                (inside.dev(), inside.ino()),
                "{} left the container root",
                s(link)
            );
        }
        // A plain open through the same link would have reached the host's /etc.
        let plain = std::fs::metadata(ct.path().join("mnt/abs")).unwrap();
        assert_eq!((plain.dev(), plain.ino()), (host.dev(), host.ino()));
    }

    #[test]
    fn table_of_a_tree_figures_from_statvfs() {
        let ct = container_root();
        std::fs::write(ct.path().join("etc/hostname"), "x\n").unwrap();
        let proc = tempfile::tempdir().unwrap();
        let info = proc.path().join("mountinfo");
        std::fs::write(
            &info,
            "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
             2 1 253:7 / /mnt/abs rw - xfs /dev/sdb rw\n\
             3 1 8:1 /x /etc/hostname rw - ext4 /dev/sda1 rw\n\
             4 1 253:8 / /mnt/missing rw - xfs /dev/sdc rw\n\
             5 1 0:9 / /run rw - tmpfs tmpfs rw\n",
        )
        .unwrap();
        let root = open_dir(ct.path());
        let mut buf = Vec::new();
        let mut table = MountTable::open(info.clone(), root.as_fd(), None, &mut buf).unwrap();
        // A file bound in, a mount point that is not there, tmpfs: none of them.
        assert_eq!(table.mountpoints().collect::<Vec<_>>(), ["/", "/mnt/abs"]);
        let mut root_stat = rustix::fs::fstatvfs(&root).unwrap();
        // The root's figures are the caller's statvfs, not asked again.
        root_stat.f_blocks = 1000;
        root_stat.f_bfree = 400;
        root_stat.f_bavail = 300;
        root_stat.f_frsize = 4096;
        root_stat.f_files = 77;
        root_stat.f_ffree = 7;
        let mut out = Vec::new();
        table
            .sample(root.as_fd(), &root_stat, None, &mut buf, &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        let r = &out[0];
        assert_eq!(
            (
                r.size_bytes,
                r.used_bytes,
                r.avail_bytes,
                r.inodes,
                r.inodes_free
            ),
            (4_096_000, 2_457_600, 1_228_800, 77, 7)
        );
        assert_eq!(
            (r.fstype.as_str(), r.source.as_str()),
            ("ext4", "/dev/sda1")
        );
        assert!(!r.shared);
        // /mnt/abs is a symlink to /etc: the container's etc/, on the test's filesystem.
        let want = rustix::fs::statvfs(ct.path().join("etc")).unwrap();
        let m = &out[1];
        assert_eq!(m.mountpoint, "/mnt/abs");
        assert_eq!(m.dev, (253, 7));
        assert_eq!(m.size_bytes, want.f_blocks * want.f_frsize);
        assert_eq!(m.inodes, want.f_files);
        assert!(m.used_bytes + m.avail_bytes <= m.size_bytes);
        // A regular file does not signal changes: the table stays as read.
        std::fs::write(&info, "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n").unwrap();
        assert!(!table.changed().unwrap());
    }
}
