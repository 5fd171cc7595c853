//! Per-packet cost of the network programs with 1000 tracked containers: the slot from the
//! attachment's cgroup storage against the tracked-ancestor walk, each beside an empty
//! `cgroup_skb` program on the same cgroup (what the `bpf_stats` clock and the dispatch cost by
//! themselves). A measurement run by hand, as root, not part of `cargo xtask test`:
//! `cargo test -p lxcmon --features ebpf --test skb_cost -- --ignored --nocapture`.
//! It checks that each mode counts the transfer (the counts are what the cost buys).
#![cfg(feature = "ebpf")]

use lxcmon::collect::bpf::{BpfCollector, BpfOptions, SkbSlot};
use lxcmon_testkit::bpfprog::{prog_stats, Runs, Stats};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const V2_ROOT: &str = "/sys/fs/cgroup/unified";
const PREFIX: &str = "lxcmon-skbcost";
/// Tracked containers (the measured one included).
const N: usize = 1000;
const BYTES: u64 = 64 << 20;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// `N` cgroup v2 directories at level 1; the first has a nested `inner/leaf` the traffic runs
/// from. Removed on drop (the processes have exited by then).
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn new() -> Self {
        let dirs: Vec<PathBuf> = (0..N)
            .map(|i| Path::new(V2_ROOT).join(format!("{PREFIX}-{i}")))
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).expect("mkdir cgroup");
        }
        std::fs::create_dir_all(dirs[0].join("inner/leaf")).expect("mkdir leaf");
        Self(dirs)
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        if let Some(first) = self.0.first() {
            let _ = std::fs::remove_dir(first.join("inner/leaf"));
            let _ = std::fs::remove_dir(first.join("inner"));
        }
        for d in &self.0 {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A namespace with a veth pair to the host (`10.253.90.1/30` host side); removed on drop.
struct Netns;

const NS: &str = "lxcmon-skbcost";
const HOST_IF: &str = "lxbc90h";
const HOST_IP: &str = "10.253.90.1";

impl Netns {
    fn new() -> Self {
        quiet(Command::new("ip").args(["link", "del", HOST_IF]));
        quiet(Command::new("ip").args(["netns", "del", NS]));
        run(Command::new("ip").args(["netns", "add", NS]));
        let this = Self;
        run(Command::new("ip").args([
            "link", "add", HOST_IF, "type", "veth", "peer", "name", "lxbc90c", "netns", NS,
        ]));
        run(Command::new("ip").args(["addr", "add", "10.253.90.1/30", "dev", HOST_IF]));
        run(Command::new("ip").args(["link", "set", HOST_IF, "up"]));
        for args in [
            &["ip", "addr", "add", "10.253.90.2/30", "dev", "lxbc90c"][..],
            &["ip", "link", "set", "lxbc90c", "up"],
        ] {
            run(Command::new("ip").args(["netns", "exec", NS]).args(args));
        }
        this
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        quiet(Command::new("ip").args(["link", "del", HOST_IF]));
        quiet(Command::new("ip").args(["netns", "del", NS]));
    }
}

/// A two-instruction `cgroup_skb` program (`return 1`) named `lxcmon_empty`, attached for
/// ingress and egress beside the agent's; detached on drop. Raw `bpf(2)`: aya loads no bare
/// instructions.
struct EmptySkb {
    cgroup: std::fs::File,
    prog: OwnedFd,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: a valid, writable 128-byte `union bpf_attr` for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128u32) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl EmptySkb {
    fn attach(dir: &Path) -> Self {
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = b"GPL\0";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&8u32.to_ne_bytes()); // BPF_PROG_TYPE_CGROUP_SKB
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        attr[48..60].copy_from_slice(b"lxcmon_empty");
        let fd = bpf(5, &mut attr).expect("BPF_PROG_LOAD");
        // SAFETY: a new descriptor from the kernel, owned here only.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let this = Self {
            cgroup: std::fs::File::open(dir).expect("open cgroup"),
            prog,
        };
        for at in [0u32, 1] {
            bpf(8, &mut this.attr(at, 2)).expect("BPF_PROG_ATTACH (multi)");
        }
        this
    }

    fn attr(&self, attach_type: u32, flags: u32) -> [u8; 128] {
        let mut a = [0u8; 128];
        a[0..4].copy_from_slice(&(self.cgroup.as_raw_fd() as u32).to_ne_bytes());
        a[4..8].copy_from_slice(&(self.prog.as_raw_fd() as u32).to_ne_bytes());
        a[8..12].copy_from_slice(&attach_type.to_ne_bytes());
        a[12..16].copy_from_slice(&flags.to_ne_bytes());
        a
    }
}

impl Drop for EmptySkb {
    fn drop(&mut self) {
        for at in [0u32, 1] {
            let _ = bpf(9, &mut self.attr(at, 0)); // BPF_PROG_DETACH
        }
    }
}

/// Sends `BYTES` over TCP from the leaf of the first cgroup, in the namespace, to the host.
fn transfer(cgs: &Cgroups) -> u64 {
    let l = TcpListener::bind((HOST_IP, 0)).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        std::io::copy(&mut s, &mut std::io::sink()).expect("read")
    });
    run(Command::new("timeout").args([
        "60",
        "bash",
        "-c",
        &format!(
            "echo $$ > {}/inner/leaf/cgroup.procs && exec ip netns exec {NS} bash -c \
             'head -c {BYTES} /dev/zero > /dev/tcp/{HOST_IP}/{port}'",
            cgs.0[0].display()
        ),
    ]));
    sink.join().expect("sink")
}

fn per_run(before: &Runs, after: &Runs) -> (f64, u64) {
    let n = after.count - before.count;
    ((after.time_ns - before.time_ns) as f64 / n.max(1) as f64, n)
}

fn measure(cgs: &Cgroups, storage: bool) {
    let mut c = BpfCollector::load(&BpfOptions {
        ephemeral: true,
        skb_storage: storage,
        runqueue: false,
        io_latency: false,
        tcp_retransmits: false,
        ..BpfOptions::default()
    })
    .expect("load");
    assert_eq!(matches!(c.skb_slot(), SkbSlot::Storage), storage);
    let ids: Vec<u64> = cgs.0.iter().map(|d| c.track(d).expect("track")).collect();
    let empty = EmptySkb::attach(&cgs.0[0]);
    let before_c = {
        c.refresh().expect("refresh");
        c.counters(ids[0]).expect("counters")
    };
    let _stats = Stats::on().expect("bpf_stats");
    let before = prog_stats("lxcmon_").expect("stats");
    let sent = transfer(cgs);
    let after = prog_stats("lxcmon_").expect("stats");
    drop(empty);
    c.refresh().expect("refresh");
    let counted = c.counters(ids[0]).expect("counters").net_tx - before_c.net_tx;
    assert_eq!(sent, BYTES);
    assert!(
        counted >= sent && counted <= sent + sent / 20,
        "counted {counted} of {sent} bytes sent"
    );
    let mode = if storage { "storage" } else { "walk" };
    for (name, a) in &after {
        let b = before.get(name).copied().unwrap_or_default();
        let (ns, runs) = per_run(&b, a);
        if runs > 0 {
            eprintln!("skb_cost N={N} {mode}: {name} {ns:.1} ns/run over {runs} runs");
        }
    }
}

/// Both modes, twice each, alternating.
#[test]
#[ignore = "measurement, as root: run by hand"]
fn skb_cost_storage_against_walk() {
    let cgs = Cgroups::new();
    let _ns = Netns::new();
    for storage in [false, true, false, true] {
        measure(&cgs, storage);
    }
}
