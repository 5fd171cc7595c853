//! `/proc/<pid>/mountinfo`: its lines, and which of them are a container's own storage.

use std::borrow::Cow;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
