//! Hand-assembled calibration program: aya loads no bare instructions, and it is not the agent's.

use anyhow::{Context, Result};
use std::path::Path;

/// The program's name (the kernel keeps 15 characters; this has 12).
pub const NAME: &str = "lxcmon_empty";

/// A two-instruction `cgroup_skb` program (`return 1`) attached for ingress and egress beside
/// the agent's, named `lxcmon_empty` so the snapshots see it; detached and closed on drop.
pub struct EmptySkb {
    cgroup: std::fs::File,
    prog: std::os::fd::OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `bpf(2)` with a zero-padded `union bpf_attr` built by the caller.
pub(super) fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: attr is a valid, writable 128-byte buffer for the duration of the call, larger
    // than every field these commands read.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

impl EmptySkb {
    pub fn attach(cgroup_dir: &Path) -> Result<Self> {
        use std::os::fd::FromRawFd;
        // r0 = 1 (BPF_ALU64 | BPF_MOV | BPF_K); exit.
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SKB.to_ne_bytes());
        put(&mut attr, 4, &2u32.to_ne_bytes());
        put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 48, NAME.as_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty program")?;
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let prog = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        let cgroup = std::fs::File::open(cgroup_dir)
            .with_context(|| format!("opening {}", cgroup_dir.display()))?;
        let this = Self { cgroup, prog };
        for at in [BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS] {
            bpf(
                BPF_PROG_ATTACH,
                &mut this.attach_attr(at, BPF_F_ALLOW_MULTI),
            )
            .context("attaching the empty program")?;
        }
        Ok(this)
    }

    /// The `bpf_attr` of BPF_PROG_ATTACH / BPF_PROG_DETACH for this program and cgroup.
    fn attach_attr(&self, attach_type: u32, flags: u32) -> [u8; 128] {
        use std::os::fd::AsRawFd;
        let mut attr = [0u8; 128];
        put(
            &mut attr,
            0,
            &(self.cgroup.as_raw_fd() as u32).to_ne_bytes(),
        );
        put(&mut attr, 4, &(self.prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &attach_type.to_ne_bytes());
        put(&mut attr, 12, &flags.to_ne_bytes());
        attr
    }
}

impl Drop for EmptySkb {
    fn drop(&mut self) {
        for at in [BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS] {
            let _ = bpf(BPF_PROG_DETACH, &mut self.attach_attr(at, 0));
        }
    }
}
