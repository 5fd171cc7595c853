//! Small kernel interfaces the collector needs that aya does not expose: filesystem mounts,
//! cgroup v2 directory facts, the batched per-CPU array read, cgroup storage keyed by the cgroup
//! id alone and `BPF_PROG_TEST_RUN`. These `bpf(2)` commands go through libc: neither aya nor
//! rustix wraps them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
pub const TRACEFS_MAGIC: i64 = 0x7472_6163;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The filesystem magic of `path` (`statfs(2)` `f_type`).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let st = rustix::fs::statfs(path)?;
    // `f_type`'s width varies by arch.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64)
}

/// Mounts a pseudo filesystem (`bpf`, `tracefs`) at `target` unless one of that type is there.
pub fn ensure_mounted(fstype: &str, target: &Path, magic: i64) -> io::Result<()> {
    if fs_magic(target).ok() == Some(magic) {
        return Ok(());
    }
    std::fs::create_dir_all(target)?;
    rustix::mount::mount(
        fstype,
        target,
        fstype,
        rustix::mount::MountFlags::empty(),
        None,
    )?;
    Ok(())
}

/// What the collector needs to know of a cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// The cgroup id: the directory's inode number in the v2 hierarchy.
    pub id: u64,
    /// Depth below the hierarchy's root (the root is level 0).
    pub level: u32,
    pub path: PathBuf,
}

/// Reads the id and level of a cgroup v2 directory; fails when `path` is not one.
pub fn cgroup_dir(path: &Path) -> io::Result<CgroupDir> {
    if fs_magic(path)? != CGROUP2_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory of a cgroup v2 (cgroup2) filesystem",
        ));
    }
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory",
        ));
    }
    // The level is the number of parents on the same cgroup2 mount (same st_dev).
    let mut level = 0u32;
    let mut cur = path.to_path_buf();
    loop {
        let parent = cur.join("..");
        let pmeta = std::fs::metadata(&parent)?;
        if pmeta.dev() != meta.dev() || pmeta.ino() == std::fs::metadata(&cur)?.ino() {
            break;
        }
        level += 1;
        if level > 4096 {
            return Err(io::Error::other("cgroup nesting too deep"));
        }
        cur = parent;
    }
    Ok(CgroupDir {
        id: meta.ino(),
        level,
        path: path.to_path_buf(),
    })
}

/// Kernel-internal `dev_t` (`MKDEV`: major << 20 | minor), as block tracepoints record it.
pub fn kernel_dev_t(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & 0xf_ffff)
}

// bpf(2) commands and the parts of `union bpf_attr` used here.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct GetIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_prog_info`: all the kernel needs to copy for the tag.
#[repr(C)]
#[derive(Default)]
struct ProgInfoHead {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
}

/// The tag of the loaded program `id` (aya reads a program's info only through a descriptor it
/// opened itself or by walking every program on the host). The kernel's tag is a hash of the
/// instructions with map references masked: equal for the same code however often it is loaded.
/// `ENOENT` when no program has that id any more.
pub fn program_tag(id: u32) -> io::Result<u64> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut get = GetIdAttr {
        id,
        ..Default::default()
    };
    let fd = bpf_syscall(BPF_PROG_GET_FD_BY_ID, &mut get)?;
    // SAFETY: a new descriptor the kernel just returned, owned here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut head = ProgInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<ProgInfoHead>() as u32,
        info: &mut head as *mut ProgInfoHead as u64,
    };
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    // As aya's `ProgramInfo::tag`: the kernel's byte array read big-endian.
    Ok(u64::from_be_bytes(head.tag))
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins a one-element array map at `path`: a stand-in for a map type the kernel lacks, so the
/// object loads and only the programs that need the real map are refused.
pub fn pin_standin_map(path: &Path) -> io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let mut create = MapCreateAttr {
        map_type: 2, // BPF_MAP_TYPE_ARRAY
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        ..Default::default()
    };
    let fd = bpf_syscall(BPF_MAP_CREATE, &mut create)?;
    // SAFETY: a new descriptor the kernel just returned, owned here only.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the pin path"))?;
    let mut pin = ObjPinAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf_syscall(BPF_OBJ_PIN, &mut pin)?;
    Ok(())
}

/// Writes the `u32` value of a cgroup's storage in a cgroup storage map keyed by the cgroup id
/// alone (aya's `CgroupStorage` takes only the older per-attach-type key). The storage exists
/// only while some program using the map is (or was) attached to the cgroup: `ENOENT` before.
pub fn cgroup_storage_set(map: BorrowedFd<'_>, cgroup_id: u64, value: u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &cgroup_id as *const u64 as u64,
        value: &value as *const u32 as u64,
        ..Default::default() // BPF_ANY: the kernel creates no element here either way.
    };
    bpf_syscall(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Reads the `u32` value of a cgroup's storage; `None` when the cgroup has none.
pub fn cgroup_storage_get(map: BorrowedFd<'_>, cgroup_id: u64) -> io::Result<Option<u32>> {
    let mut value = 0u32;
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &cgroup_id as *const u64 as u64,
        value: &mut value as *mut u32 as u64,
        ..Default::default()
    };
    match bpf_syscall(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn bpf_syscall<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` points to a properly laid out, zero-padded `union bpf_attr` prefix of
    // `size_of::<T>()` bytes that lives for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Bytes of map values one batched read returns at most: the buffer is kept from one read to
/// the next, and its size does not grow with the fleet or the number of CPUs (a fleet's
/// histograms are 624 bytes per container per CPU; read whole, 40 MiB at 1000 containers on
/// 64 CPUs, allocated and freed every cycle).
const BATCH_BYTES: usize = 128 * 1024;

/// The buffers of batched per-CPU array reads, kept across reads (see [`BATCH_BYTES`]).
#[derive(Debug, Default)]
pub struct BatchBuf {
    keys: Vec<u32>,
    values: Vec<u8>,
}

impl BatchBuf {
    /// Reads elements `0..count` of a per-CPU array map of `value_size`-byte values with
    /// `BPF_MAP_LOOKUP_BATCH`, a bounded run of elements per call, and hands each run to `f`:
    /// the index of its first element and, per element, the raw bytes of each possible CPU's
    /// value (`ncpus` values, each padded to 8 bytes). Returns how many elements were read
    /// (fewer than `count` only if the map is smaller).
    pub fn percpu_array_for_each(
        &mut self,
        map: BorrowedFd<'_>,
        count: u32,
        value_size: usize,
        ncpus: usize,
        mut f: impl FnMut(usize, &[u8]),
    ) -> io::Result<usize> {
        let stride = value_size.div_ceil(8) * 8 * ncpus.max(1);
        let n = count as usize;
        let per_call = (BATCH_BYTES / stride).clamp(1, n.max(1));
        if self.keys.len() < per_call {
            self.keys.resize(per_call, 0);
        }
        if self.values.len() < per_call * stride {
            self.values.resize(per_call * stride, 0);
        }
        let mut done = 0usize;
        let mut in_batch = 0u32;
        let mut out_batch = 0u32;
        while done < n {
            let want = per_call.min(n - done);
            let mut attr = BatchAttr {
                in_batch: if done == 0 {
                    0
                } else {
                    &mut in_batch as *mut u32 as u64
                },
                out_batch: &mut out_batch as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: want as u32,
                map_fd: map.as_raw_fd() as u32,
                ..Default::default()
            };
            let res = bpf_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
            // The kernel never reports more than it was asked for; bounded anyway.
            let got = (attr.count as usize).min(want);
            let end = match res {
                Ok(_) => false,
                // ENOENT: the end of the map was reached; `count` holds what was read.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
                Err(e) => return Err(e),
            };
            // Array batches return keys in order from 0.
            f(done, &self.values[..got * stride]);
            done += got;
            if end || got == 0 {
                break;
            }
            in_batch = out_batch;
        }
        Ok(done)
    }
}

/// Runs a loaded `cgroup_skb` program once over `frame` (an Ethernet frame) with
/// `BPF_PROG_TEST_RUN`. The kernel builds the skb on the device `ifindex` (the loopback device
/// when `ifindex <= 1`) with a socket in the calling task's cgroup. Returns the program's verdict.
pub fn test_run_skb(prog: BorrowedFd<'_>, frame: &[u8], ifindex: u32) -> io::Result<u32> {
    // struct __sk_buff is 192 bytes; `ifindex` is at offset 40.
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut attr = TestRunAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    bpf_syscall(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(attr.retval)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// A per-CPU array too large for one batch is read in several, each element once, in
    /// order, every CPU's value where the kernel put it; a count past the map's end stops at it.
    #[test]
    #[ignore = "needs root and BPF: run by cargo xtask test"]
    fn batched_reads_come_in_bounded_runs_that_cover_the_map() {
        let ncpus = aya::util::nr_cpus().expect("possible CPUs");
        let (value_size, entries) = (208usize, 1000u32);
        let mut create = MapCreateAttr {
            map_type: 6, // BPF_MAP_TYPE_PERCPU_ARRAY
            key_size: 4,
            value_size: value_size as u32,
            max_entries: entries,
            ..Default::default()
        };
        let fd = bpf_syscall(BPF_MAP_CREATE, &mut create).expect("creating the map");
        // SAFETY: a new descriptor the kernel just returned, owned here only.
        let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mark = |key: usize, cpu: usize| (key * 1000 + cpu + 1) as u64;
        for key in 0..entries {
            let mut value = vec![0u8; value_size * ncpus];
            for cpu in 0..ncpus {
                let word = mark(key as usize, cpu).to_ne_bytes();
                value[cpu * value_size..cpu * value_size + 8].copy_from_slice(&word);
            }
            let mut attr = ElemAttr {
                map_fd: map.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: value.as_ptr() as u64,
                ..Default::default()
            };
            bpf_syscall(BPF_MAP_UPDATE_ELEM, &mut attr).expect("writing an element");
        }
        let per_call = BATCH_BYTES / (value_size * ncpus);
        assert!(
            per_call < entries as usize,
            "the test needs more than one batch"
        );
        let mut buf = BatchBuf::default();
        for count in [entries, entries + 200] {
            let (mut runs, mut next) = (0, 0usize);
            let read = buf
                .percpu_array_for_each(map.as_fd(), count, value_size, ncpus, |first, raw| {
                    assert_eq!(first, next, "runs in order, none skipped");
                    assert!(raw.len() <= BATCH_BYTES, "a run of {} bytes", raw.len());
                    for (k, cpus) in raw.chunks_exact(value_size * ncpus).enumerate() {
                        for (cpu, v) in cpus.chunks_exact(value_size).enumerate() {
                            let word = u64::from_ne_bytes(v[..8].try_into().expect("8 bytes"));
                            assert_eq!(word, mark(first + k, cpu), "key {} CPU {cpu}", first + k);
                        }
                    }
                    next += raw.len() / (value_size * ncpus);
                    runs += 1;
                })
                .expect("batched read");
            assert_eq!((read, next), (entries as usize, entries as usize));
            assert_eq!(runs, (entries as usize).div_ceil(per_call));
        }
        assert!(buf.values.len() <= BATCH_BYTES, "the buffer stays bounded");
    }
}
