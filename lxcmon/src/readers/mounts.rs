//! The filesystems of a container, as its own mount namespace shows them: root, Proxmox
//! mount points (`mpN`), bind mounts and extra disks; pseudo-filesystems left out.

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
