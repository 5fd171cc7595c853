//! Hand-assembled empty BTF tracepoint programs, the floor of each tracepoint the agent's
//! tracing programs run on: aya loads no bare instructions, and they are not the agent's.

use super::empty_skb::{bpf, put};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// A BTF tracepoint and the name of the empty program attached to it (`lxcmon_` and at most 15
/// characters, so the kernel keeps it whole and the snapshots see it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub tracepoint: &'static str,
    pub program: &'static str,
}

pub const BIO_QUEUE: Hook = Hook {
    tracepoint: "block_bio_queue",
    program: "lxcmon_nop_bioq",
};
pub const RQ_COMPLETE: Hook = Hook {
    tracepoint: "block_rq_complete",
    program: "lxcmon_nop_rqc",
};
pub const DIRTY_FOLIO: Hook = Hook {
    tracepoint: "writeback_dirty_folio",
    program: "lxcmon_nop_dirt",
};
pub const SCHED_SWITCH: Hook = Hook {
    tracepoint: "sched_switch",
    program: "lxcmon_nop_sw",
};
pub const TCP_DESTROY: Hook = Hook {
    tracepoint: "tcp_destroy_sock",
    program: "lxcmon_nop_tcpd",
};
/// Every tracepoint an agent program of the BPF-cost table runs on.
pub const HOOKS: [Hook; 5] = [
    BIO_QUEUE,
    RQ_COMPLETE,
    DIRTY_FOLIO,
    SCHED_SWITCH,
    TCP_DESTROY,
];

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;

/// A two-instruction tracing program (`return 0`) attached to one BTF tracepoint beside the
/// agent's; the link closes (detaching it) and the program is freed on drop.
pub struct EmptyTp {
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl EmptyTp {
    /// Loads and attaches `hook`'s program; `btf_id` is the vmlinux BTF id of the typedef
    /// `btf_trace_<tracepoint>` (what a `tp_btf` program names as its target).
    pub fn attach(hook: Hook, btf_id: u32) -> Result<Self> {
        // r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit.
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        // Tracing programs must carry a GPL-compatible license.
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_PROG_TYPE_TRACING.to_ne_bytes());
        put(&mut attr, 4, &2u32.to_ne_bytes());
        put(&mut attr, 8, &(insns.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        // prog_name: 16 bytes, the last a NUL; the names above have at most 15.
        let name = &hook.program.as_bytes()[..hook.program.len().min(15)];
        put(&mut attr, 48, name);
        put(&mut attr, 68, &BPF_TRACE_RAW_TP.to_ne_bytes());
        put(&mut attr, 108, &btf_id.to_ne_bytes());
        // attach_btf_obj_fd (112) stays 0: the target is in vmlinux.
        let fd = bpf(BPF_PROG_LOAD, &mut attr)
            .with_context(|| format!("loading {} for {}", hook.program, hook.tracepoint))?;
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // name 0: a tracing program attaches to the target it was loaded for.
        let mut attr = [0u8; 128];
        put(&mut attr, 8, &(prog.as_raw_fd() as u32).to_ne_bytes());
        let fd = bpf(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
            .with_context(|| format!("attaching {} to {}", hook.program, hook.tracepoint))?;
        // SAFETY: as above, a descriptor the kernel just returned.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self {
            _link: link,
            _prog: prog,
        })
    }
}

/// The vmlinux BTF ids of the `btf_trace_<tracepoint>` typedefs of [`HOOKS`] (those found),
/// from `bpftool btf dump`.
pub fn trace_btf_ids() -> Result<BTreeMap<&'static str, u32>> {
    let out = Command::new("bpftool")
        .args(["btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
        .output()
        .context("running bpftool btf dump")?;
    if !out.status.success() {
        bail!(
            "bpftool btf dump: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_typedef_ids(&String::from_utf8_lossy(&out.stdout)))
}

/// `[12345] TYPEDEF 'btf_trace_sched_switch' type_id=...` lines, by tracepoint.
fn parse_typedef_ids(dump: &str) -> BTreeMap<&'static str, u32> {
    let mut out = BTreeMap::new();
    for line in dump.lines() {
        let Some((id, rest)) = line
            .strip_prefix('[')
            .and_then(|l| l.split_once("] TYPEDEF 'btf_trace_"))
        else {
            continue;
        };
        let Some((tp, _)) = rest.split_once('\'') else {
            continue;
        };
        let Some(hook) = HOOKS.iter().find(|h| h.tracepoint == tp) else {
            continue;
        };
        if let Ok(id) = id.parse::<u32>() {
            out.insert(hook.tracepoint, id);
        }
    }
    out
}

/// Attaches the empty program of every hook in `ids`; a hook that fails (or is missing from
/// `ids`) is said on stderr and left out.
pub fn attach_all(ids: &BTreeMap<&'static str, u32>) -> Vec<EmptyTp> {
    let mut out = Vec::new();
    for hook in HOOKS {
        let Some(&id) = ids.get(hook.tracepoint) else {
            eprintln!(
                "bench: no empty program on {}: no btf_trace_{} in the kernel's BTF",
                hook.tracepoint, hook.tracepoint
            );
            continue;
        };
        match EmptyTp::attach(hook, id) {
            Ok(p) => out.push(p),
            Err(e) => eprintln!("bench: no empty program on {}: {e:#}", hook.tracepoint),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typedef_ids_of_the_hooks_are_read() {
        let dump = "\
[10305] STRUCT 'trace_event_raw_sched_switch' size=64 vlen=7
\t'ent' type_id=100 bits_offset=0
[10306] TYPEDEF 'btf_trace_sched_switch' type_id=10307
[10307] PTR '(anon)' type_id=10308
[17785] TYPEDEF 'btf_trace_writeback_dirty_folio' type_id=17786
[17790] TYPEDEF 'btf_trace_writeback_dirty_folio_x' type_id=17786
[28870] TYPEDEF 'btf_trace_block_rq_complete' type_id=12959
[28871] FUNC 'btf_trace_block_bio_queue' type_id=12953 linkage=static
[28872] TYPEDEF 'btf_trace_sched_wakeup' type_id=12953
";
        let ids = parse_typedef_ids(dump);
        assert_eq!(ids.len(), 3);
        assert_eq!(ids["sched_switch"], 10306);
        assert_eq!(ids["writeback_dirty_folio"], 17785);
        assert_eq!(ids["block_rq_complete"], 28870);
        assert!(!ids.contains_key("block_bio_queue"));
    }

    /// Needs root and a kernel with BTF: `cargo test -p xtask -- --ignored empty_programs`.
    #[test]
    #[ignore]
    fn empty_programs_load_attach_and_run() {
        let ids = trace_btf_ids().unwrap();
        assert_eq!(ids.len(), HOOKS.len(), "{ids:?}");
        let attached = attach_all(&ids);
        assert_eq!(attached.len(), HOOKS.len());
        let shown = |progs: &str| {
            let shown = super::super::parse_prog_show(progs);
            HOOKS
                .iter()
                .filter(|h| shown.contains_key(h.program))
                .count()
        };
        let progs = |args: &[&str]| {
            let out = Command::new("bpftool").args(args).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(shown(&progs(&["prog", "show"])), HOOKS.len());
        let links = progs(&["link", "show"]);
        for h in HOOKS {
            assert!(links.contains(&format!("'{}'", h.tracepoint)), "{links}");
        }
        drop(attached);
        // The kernel frees a closed program after an RCU grace period.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shown(&progs(&["prog", "show"])) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(shown(&progs(&["prog", "show"])), 0);
    }

    #[test]
    fn names_fit_the_kernel_and_the_snapshot() {
        for h in HOOKS {
            assert!(h.program.starts_with("lxcmon_"), "{}", h.program);
            assert!(h.program.len() <= 15, "{}", h.program);
        }
    }
}
