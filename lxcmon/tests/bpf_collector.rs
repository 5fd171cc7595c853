//! Root tests of the BPF collector against ground truth the tests produce themselves: bytes sent
//! over a veth pair between the host and a network namespace the test creates, bytes written
//! and read with direct I/O, by processes the test puts into a nested sub-cgroup of a cgroup v2
//! directory it creates. Run by `cargo xtask test` (as root, after `cargo xtask build-ebpf`):
//! `cargo test -p lxcmon --features ebpf --test bpf_collector -- --ignored --test-threads=1`.
#![cfg(feature = "ebpf")]

use lxcmon::collect::bpf::counters::{KernelCounters, Purpose};
use lxcmon::collect::bpf::{
    cleanup_pinned, kernel_dev_t, BpfCollector, BpfOptions, Counters, IoMode, SkbSlot,
};
use lxcmon::collect::discovery::{Discovered, Flavor, Runtime};
use lxcmon::collect::sample::{ContainerSample, CounterSource};
use lxcmon::config::{CollectorChoice, MonitoringConfig};
use lxcmon::readers::cgroup::Layout;
use lxcmon::readers::cgroup::{CgroupSample, IoBytes};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests move processes between cgroups and share the machine's network stack: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const V2_ROOT: &str = "/sys/fs/cgroup/unified";
const PREFIX: &str = "lxcmon-bpftest";

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Kills the processes of a cgroup v2 directory (and its children) and removes it.
fn remove_cgroup_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for p in pids {
            // SAFETY: plain kill(2) of a process of the test's own cgroup.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(dir);
}

/// A cgroup v2 directory `<PREFIX>-<name>` with a nested child `inner/leaf`, removed on drop.
struct TestCgroup {
    dir: PathBuf,
    leaf: PathBuf,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let dir = Path::new(V2_ROOT).join(format!("{PREFIX}-{name}"));
        remove_cgroup_tree(&dir);
        let leaf = dir.join("inner/leaf");
        std::fs::create_dir_all(&leaf).expect("creating the test cgroup");
        Self { dir, leaf }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.dir).expect("stat cgroup").ino()
    }

    /// A bash command line that first moves itself into the nested leaf cgroup.
    fn enter(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && ", self.leaf.display())
    }

    /// Runs a bash script in the nested leaf cgroup (at most two minutes).
    fn sh(&self, script: &str) {
        run(Command::new("timeout").args([
            "120",
            "bash",
            "-c",
            &format!("{}{script}", self.enter()),
        ]));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.dir);
    }
}

/// A network namespace with a veth pair to the host: host side `10.253.<n>.1/30`, namespace
/// side `10.253.<n>.2/30`, loopback up inside. Removed on drop.
struct TestNetns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl TestNetns {
    fn new(n: u8) -> Self {
        let name = format!("{PREFIX}-{n}");
        let host_if = format!("lxbt{n}h");
        let ns_if = format!("lxbt{n}c");
        quiet(Command::new("ip").args(["link", "del", &host_if]));
        quiet(Command::new("ip").args(["netns", "del", &name]));
        let host_ip = format!("10.253.{n}.1");
        let ns_ip = format!("10.253.{n}.2");
        run(Command::new("ip").args(["netns", "add", &name]));
        let this = Self {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
        };
        run(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if, "netns", &name,
        ]));
        run(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]));
        run(Command::new("ip").args(["link", "set", &host_if, "up"]));
        let ns = |args: &[&str]| {
            run(Command::new("ip").args(["netns", "exec", &name]).args(args));
        };
        ns(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        ns(&["ip", "link", "set", &ns_if, "up"]);
        ns(&["ip", "link", "set", "lo", "up"]);
        this
    }

    fn host_ifindex(&self) -> u32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.host_if))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("ifindex number")
    }

    /// Runs `script` with bash in the namespace, from a process in the leaf of `cg`.
    fn run_in(&self, cg: &TestCgroup, script: &str) -> String {
        let inner = script.replace('\'', r"'\''");
        run(Command::new("timeout").args([
            "60",
            "bash",
            "-c",
            &format!(
                "{}exec ip netns exec {} bash -c '{inner}'",
                cg.enter(),
                self.name
            ),
        ]))
    }
}

impl TestNetns {
    /// The namespace's `RetransSegs`: what its sockets sent again, on the wire (and through
    /// the egress program) a second time.
    fn retrans_segs(&self) -> u64 {
        in_netns(&self.name, || {
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
            lxcmon_testkit::netloss::tcp_counters(Some(tid)).map(|c| c.retrans_segs)
        })
        .join()
        .expect("netns thread")
        .expect("the namespace's TCP counters")
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        quiet(Command::new("ip").args(["link", "del", &self.host_if]));
        quiet(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// A pin directory of its own per test, removed on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new(name: &str) -> Self {
        let p = PathBuf::from(format!("/sys/fs/bpf/{PREFIX}/{name}"));
        let _ = cleanup_pinned(&p);
        Self(p)
    }
    fn opts(&self) -> BpfOptions {
        BpfOptions {
            pin_dir: self.0.clone(),
            ..BpfOptions::default()
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = cleanup_pinned(&self.0);
    }
}

fn counters(c: &mut BpfCollector, id: u64) -> Counters {
    c.refresh().expect("refresh");
    c.counters(id).expect("counters of a tracked cgroup")
}

/// Accepts one connection on `l` and reads it to the end; returns the bytes received.
fn sink(l: TcpListener) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        l.set_nonblocking(false).ok();
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        std::io::copy(&mut s, &mut std::io::sink()).expect("reading")
    })
}

/// Accepts one connection on `l` and sends `n` bytes, then closes.
fn source(l: TcpListener, n: usize) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_write_timeout(Some(Duration::from_secs(30))).ok();
        let buf = vec![0x5au8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(buf.len());
            s.write_all(&buf[..k]).expect("writing");
            left -= k;
        }
        s.shutdown(Shutdown::Write).ok();
        // Wait for the peer to close so all data is delivered before we return.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        n as u64
    })
}

/// Runs `f` on a thread inside the network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns file");
        // SAFETY: setns(2) on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

fn assert_within(what: &str, got: u64, truth: u64, pct: u64) {
    eprintln!("{what}: counted {got}, ground truth {truth}");
    assert!(
        got >= truth && got <= truth + truth * pct / 100,
        "{what}: counted {got} bytes, ground truth {truth} (allowed +{pct}% for headers)"
    );
}

/// Bytes a test sent over TCP and the segments its sender's namespace retransmitted
/// meanwhile (spurious or after a drop in a full backlog: the programs count them as the
/// interface does, so they widen the upper bound).
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    payload: u64,
    retrans_segs: u64,
}

impl std::ops::Add for Sent {
    type Output = Sent;
    fn add(self, o: Sent) -> Sent {
        Sent {
            payload: self.payload + o.payload,
            retrans_segs: self.retrans_segs + o.retrans_segs,
        }
    }
}

/// Largest IP packet on the test veths (MTU 1500): what one retransmitted segment can add.
const SEGMENT_MAX: u64 = 1500;

/// Counted bytes against a transfer: at least its payload, at most `pct` % above it for the
/// headers plus a full packet per segment sent again.
fn assert_net(what: &str, got: u64, sent: Sent, pct: u64) {
    let truth = sent.payload;
    let extra = sent.retrans_segs * SEGMENT_MAX;
    eprintln!(
        "{what}: counted {got}, ground truth {truth} (+{} retransmitted segments)",
        sent.retrans_segs
    );
    assert!(
        got >= truth && got <= truth + truth * pct / 100 + extra,
        "{what}: counted {got} bytes, ground truth {truth} (allowed +{pct}% for headers and \
         {extra} for {} retransmitted segments)",
        sent.retrans_segs
    );
}

const NET_BYTES: usize = 8 * 1024 * 1024;

/// TCP both ways over the veth from a process in a nested sub-cgroup: counted as the
/// container's, within 5% above the payload (Ethernet, IP and TCP headers, as the interface
/// counts them). Loopback traffic inside the namespace is not counted at all.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn network_bytes_over_veth_counted_loopback_not() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("net");
    let cg = TestCgroup::new("net");
    let ns = TestNetns::new(71);
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");
    assert_eq!(id, cg.id());
    let before = counters(&mut c, id);
    assert_eq!(before, Counters::default(), "a new slot starts at zero");
    assert!(
        c.last_refresh_batched(),
        "one batched read for all containers"
    );

    // Container -> host.
    let sent = send_from(&ns, &cg, NET_BYTES);
    let after_tx = counters(&mut c, id);
    assert_net("net_tx", after_tx.net_tx - before.net_tx, sent, 5);

    // Host -> container (the host's sockets retransmit, in the host's namespace).
    let host_r0 = lxcmon_testkit::netloss::tcp_counters(None)
        .expect("the host's TCP counters")
        .retrans_segs;
    let l = TcpListener::bind((ns.host_ip.as_str(), 0)).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let tx = source(l, NET_BYTES);
    let got: u64 = ns
        .run_in(
            &cg,
            &format!("exec 3<>/dev/tcp/{}/{port}; cat <&3 | wc -c", ns.host_ip),
        )
        .trim()
        .parse()
        .expect("wc -c output");
    tx.join().expect("source thread");
    assert_eq!(got, NET_BYTES as u64);
    let after_rx = counters(&mut c, id);
    let received = Sent {
        payload: got,
        retrans_segs: lxcmon_testkit::netloss::tcp_counters(None)
            .expect("the host's TCP counters")
            .retrans_segs
            - host_r0,
    };
    assert_net("net_rx", after_rx.net_rx - after_tx.net_rx, received, 5);

    // Loopback inside the namespace, both ways: not counted.
    let lo_bytes = 4 * 1024 * 1024;
    let (port_tx, lo_sink) = {
        let l = in_netns(&ns.name, || {
            TcpListener::bind("127.0.0.1:0").expect("bind lo")
        })
        .join()
        .expect("bind thread");
        (l.local_addr().expect("addr").port(), sink(l))
    };
    let (port_rx, lo_source) = {
        let l = in_netns(&ns.name, || {
            TcpListener::bind("127.0.0.1:0").expect("bind lo")
        })
        .join()
        .expect("bind thread");
        (l.local_addr().expect("addr").port(), source(l, lo_bytes))
    };
    let got: u64 = ns
        .run_in(
            &cg,
            &format!(
                "head -c {lo_bytes} /dev/zero > /dev/tcp/127.0.0.1/{port_tx} && \
                 exec 3<>/dev/tcp/127.0.0.1/{port_rx}; cat <&3 | wc -c"
            ),
        )
        .trim()
        .parse()
        .expect("wc -c output");
    assert_eq!(lo_sink.join().expect("lo sink"), lo_bytes as u64);
    lo_source.join().expect("lo source");
    assert_eq!(got, lo_bytes as u64);
    let after_lo = counters(&mut c, id);
    assert_eq!(
        after_lo.net_tx, after_rx.net_tx,
        "loopback egress must not count"
    );
    assert_eq!(
        after_lo.net_rx, after_rx.net_rx,
        "loopback ingress must not count"
    );

    c.untrack(id).expect("untrack");
}

/// Sends `n` bytes over TCP from a process in `cg`'s nested leaf (in `ns`) to the host; returns
/// the bytes the host received.
fn send_from(ns: &TestNetns, cg: &TestCgroup, n: usize) -> Sent {
    let r0 = ns.retrans_segs();
    let l = TcpListener::bind((ns.host_ip.as_str(), 0)).expect("bind");
    let port = l.local_addr().expect("addr").port();
    let rx = sink(l);
    ns.run_in(
        cg,
        &format!("head -c {n} /dev/zero > /dev/tcp/{}/{port}", ns.host_ip),
    );
    let got = rx.join().expect("sink thread");
    assert_eq!(got, n as u64);
    Sent {
        payload: got,
        retrans_segs: ns.retrans_segs() - r0,
    }
}

/// The network programs take the container's slot from the attachment's cgroup storage: the
/// agent writes slot + 1 there on attach (a packet from a nested sub-cgroup is counted through
/// it; pointed at another slot, the packets go there; 0 falls back to the walk), and after an
/// untrack the storage never holds the old slot, which a new container may take: a re-tracked
/// container gets its new slot written.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn skb_slot_from_cgroup_storage_never_stale() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("storage");
    let a = TestCgroup::new("storage-a");
    let b = TestCgroup::new("storage-b");
    let ns = TestNetns::new(74);
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    assert_eq!(
        c.skb_slot(),
        &SkbSlot::Storage,
        "cgroup storage keyed by the cgroup id (Linux 5.9+)"
    );
    let ida = c.track(&a.dir).expect("track a");
    let idb = c.track(&b.dir).expect("track b");
    let (sa, sb) = (c.slot(ida).expect("slot a"), c.slot(idb).expect("slot b"));
    assert_ne!(sa, sb);
    assert_eq!(c.stored_skb_slot(ida).expect("lookup a"), Some(sa + 1));
    assert_eq!(c.stored_skb_slot(idb).expect("lookup b"), Some(sb + 1));

    const N: usize = 2 * 1024 * 1024;
    let sent = send_from(&ns, &a, N);
    let (ca, cb) = (counters(&mut c, ida), counters(&mut c, idb));
    assert_net("a's traffic, slot from storage", ca.net_tx, sent, 5);
    assert_eq!(cb.net_tx, 0, "b sent nothing");

    // Pointed at b's slot, a's packets are counted there: the slot comes from the storage.
    c.overwrite_stored_skb_slot(ida, sb + 1).expect("overwrite");
    let sent = send_from(&ns, &a, N);
    let (ca2, cb2) = (counters(&mut c, ida), counters(&mut c, idb));
    assert_net("a's traffic into b's slot", cb2.net_tx - cb.net_tx, sent, 5);
    assert_eq!(ca2.net_tx, ca.net_tx, "nothing into a's own slot");

    // Not written yet (0): the ancestor walk counts them to a.
    c.overwrite_stored_skb_slot(ida, 0).expect("overwrite");
    let sent = send_from(&ns, &a, N);
    let (ca3, cb3) = (counters(&mut c, ida), counters(&mut c, idb));
    assert_net(
        "a's traffic through the walk",
        ca3.net_tx - ca2.net_tx,
        sent,
        5,
    );
    assert_eq!(cb3.net_tx, cb2.net_tx);

    // Untracked: the storage (which the kernel may keep) does not hold the old slot.
    c.overwrite_stored_skb_slot(ida, sa + 1).expect("overwrite");
    c.untrack(ida).expect("untrack a");
    let left = c.stored_skb_slot(ida).expect("lookup after untrack");
    assert!(
        matches!(left, None | Some(0)),
        "a's storage after untrack: {left:?}"
    );
    // A new container takes a's old slot; a, tracked again, gets another one, written.
    let cc = TestCgroup::new("storage-c");
    let idc = c.track(&cc.dir).expect("track c");
    assert_eq!(c.slot(idc), Some(sa), "the freed slot is reused");
    assert_eq!(c.track(&a.dir).expect("track a again"), ida);
    let sa2 = c.slot(ida).expect("new slot of a");
    assert_ne!(sa2, sa);
    assert_eq!(c.stored_skb_slot(ida).expect("lookup"), Some(sa2 + 1));
    let sent = send_from(&ns, &a, N);
    let (ca4, cc4) = (counters(&mut c, ida), counters(&mut c, idc));
    assert_net("a's traffic in its new slot", ca4.net_tx, sent, 5);
    assert_eq!(cc4.net_tx, 0, "nothing into the reused slot's new owner");
    for id in [ida, idb, idc] {
        c.untrack(id).expect("untrack");
    }
}

/// With the storage off (as on kernels before 5.9), the walk-only programs are attached and
/// count the same bytes; their cgroup has no slot storage.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn walk_programs_count_without_cgroup_storage() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("walk");
    let cg = TestCgroup::new("walk");
    let ns = TestNetns::new(75);
    let opts = BpfOptions {
        skb_storage: false,
        ..pins.opts()
    };
    let mut c = BpfCollector::load(&opts).expect("load");
    assert!(matches!(c.skb_slot(), SkbSlot::Walk(_)));
    let id = c.track(&cg.dir).expect("track");
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        shown.contains("lxcmon_walk_in") && shown.contains("lxcmon_walk_eg"),
        "the walk programs are attached: {shown}"
    );
    assert_eq!(c.stored_skb_slot(id).expect("lookup"), None);
    let sent = send_from(&ns, &cg, 2 * 1024 * 1024);
    assert_net("net_tx by the walk", counters(&mut c, id).net_tx, sent, 5);
    c.untrack(id).expect("untrack");
}

/// When the kernel refuses the programs that read the slot storage (here: an array map pinned
/// in its place, which `bpf_get_local_storage` does not take), the walk-only programs are
/// loaded instead, with the kernel's reason, and count.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn storage_programs_refused_walk_programs_count() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("refused");
    let cg = TestCgroup::new("refused");
    let ns = TestNetns::new(76);
    std::fs::create_dir_all(&pins.0).expect("pin dir");
    let map = pins.0.join("LXCMON_SKB_SLOT");
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1"])
        .args(["name", "lxcmon_standin"]));
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    match c.skb_slot() {
        SkbSlot::Walk(why) => assert!(
            why.contains("refused the network programs"),
            "the reason names the refusal: {why}"
        ),
        other => panic!("storage programs loaded against an array map: {other:?}"),
    }
    let id = c.track(&cg.dir).expect("track");
    assert!(bpftool_cgroup_progs(&cg.dir).contains("lxcmon_walk_in"));
    let sent = send_from(&ns, &cg, 2 * 1024 * 1024);
    assert_net("net_tx by the walk", counters(&mut c, id).net_tx, sent, 5);
    c.untrack(id).expect("untrack");
}

/// BPF_PROG_TEST_RUN of the cgroup_skb programs with the test process in a tracked cgroup: a
/// frame on a non-loopback device counts exactly its IP length, on loopback nothing.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn prog_test_run_counts_frame_length_and_skips_loopback() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("testrun");
    let cg = TestCgroup::new("testrun");
    let ns = TestNetns::new(72);
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");

    // An Ethernet frame carrying an IPv4/UDP packet with 1000 bytes of payload.
    let payload = 1000usize;
    let ip_len = 20 + 8 + payload;
    let mut frame = vec![0u8; 14 + ip_len];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&(ip_len as u16).to_be_bytes());
    frame[22] = 64;
    frame[23] = 17;
    frame[26..30].copy_from_slice(&[10, 253, 72, 2]);
    frame[30..34].copy_from_slice(&[10, 253, 72, 1]);

    // The kernel gives the test packet a socket in the caller's cgroup: move this process into
    // the nested leaf for the runs, and back afterwards (guarded).
    struct Back(String);
    impl Drop for Back {
        fn drop(&mut self) {
            let _ = std::fs::write(
                Path::new(V2_ROOT)
                    .join(self.0.trim_start_matches('/'))
                    .join("cgroup.procs"),
                std::process::id().to_string(),
            );
        }
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_string();
    let back = Back(own);
    std::fs::write(cg.leaf.join("cgroup.procs"), std::process::id().to_string())
        .expect("moving into the leaf cgroup");
    let runs = [
        (true, ns.host_ifindex()),
        (false, ns.host_ifindex()),
        (true, 1),
        (false, 1),
    ];
    let mut verdicts = Vec::new();
    for (egress, ifindex) in runs {
        verdicts.push(c.test_run_skb(egress, &frame, ifindex).expect("test run"));
    }
    drop(back);
    assert_eq!(
        verdicts,
        vec![1, 1, 1, 1],
        "the programs never drop packets"
    );
    let got = counters(&mut c, id);
    // The frame as the interface counts it: Ethernet header + IP packet.
    assert_eq!(
        got.net_tx,
        14 + ip_len as u64,
        "egress on the veth: frame length"
    );
    assert_eq!(
        got.net_rx,
        14 + ip_len as u64,
        "ingress on the veth: frame length"
    );
}

fn block_dev_of(path: &Path) -> u32 {
    let dev = std::fs::metadata(path).expect("stat").dev();
    kernel_dev_t(libc::major(dev), libc::minor(dev))
}

/// Direct-I/O writes and reads of known size by a process in a nested sub-cgroup are charged to
/// the container within 5%; the same I/O on an excluded device is not counted.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn direct_io_bytes_counted_and_excluded_devices_skipped() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Both block programs: the BTF one (with dirtied-page accounting) and the classic
    // tracepoint one it falls back to.
    for count_dirtied in [true, false] {
        direct_io_case(count_dirtied);
    }
}

fn direct_io_case(count_dirtied: bool) {
    let pins = PinDir::new(&format!("io-{count_dirtied}"));
    let cg = TestCgroup::new("io");
    // A directory on a real block device (not tmpfs): /var/tmp.
    let dir = PathBuf::from(format!("/var/tmp/{PREFIX}-io"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("io dir");
    struct RmDir(PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _rm = RmDir(dir.clone());
    let file = dir.join("data");

    let mut opts = pins.opts();
    opts.count_dirtied = count_dirtied;
    let mut c = BpfCollector::load(&opts).expect("load");
    assert_eq!(
        matches!(c.io_mode(), IoMode::BiosAndDirtied),
        count_dirtied,
        "{:?}",
        c.io_mode()
    );
    eprintln!("io mode {:?}", c.io_mode());
    let id = c.track(&cg.dir).expect("track");
    let mib = 32u64;
    let truth = mib * 1024 * 1024;
    let dd = |args: &str| cg.sh(&format!("exec dd {args} bs=1M status=none"));
    dd(&format!(
        "if=/dev/zero of={} count={mib} oflag=direct conv=fsync",
        file.display()
    ));
    assert_eq!(std::fs::metadata(&file).expect("stat").len(), truth);
    let w = counters(&mut c, id);
    assert_within("io_write", w.io_write, truth, 5);

    dd(&format!("if={} of=/dev/null iflag=direct", file.display()));
    let r = counters(&mut c, id);
    assert_within("io_read", r.io_read - w.io_read, truth, 5);

    // Exclude the file's device: the same I/O is no longer counted.
    opts.excluded_devices = vec![block_dev_of(&file)];
    c.set_excluded_devices(&opts.excluded_devices)
        .expect("exclude");
    dd(&format!(
        "if=/dev/zero of={} count={mib} oflag=direct conv=notrunc",
        file.display()
    ));
    dd(&format!("if={} of=/dev/null iflag=direct", file.display()));
    let x = counters(&mut c, id);
    assert_eq!(
        x.io_write, r.io_write,
        "writes to an excluded device are not counted"
    );
    assert_eq!(
        x.io_read, r.io_read,
        "reads from an excluded device are not counted"
    );
}

/// The programs find a container through its entry in the direct-mapped slot index: an entry
/// marked shared (another tracked id at its position) sends them to the tracked map, an entry
/// without the container loses its I/O (so the index is what they read), tracking an already
/// tracked container leaves the entry alone, and a restart writes it as the tracked set has it.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn slot_index_entries_found_shared_fall_back_and_are_rewritten() {
    use lxcmon_common::{slot_index_entry, SLOT_INDEX_SIZE};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("index");
    let cg = TestCgroup::new("index");
    let scratch = Scratch::new("index");
    let file = scratch.0.join("data");
    let mib = 8u64;
    let truth = mib * 1024 * 1024;
    let write = || {
        cg.sh(&format!(
            "exec dd if=/dev/zero of={} bs=1M count={mib} oflag=direct conv=notrunc status=none",
            file.display()
        ))
    };
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");
    let slot = c.slot(id).expect("slot");
    let own = slot_index_entry(id, slot, false);
    assert_eq!(
        c.slot_index_raw(id).expect("index"),
        own,
        "tracking writes the entry"
    );

    let mut written = counters(&mut c, id).io_write;
    write();
    let now = counters(&mut c, id).io_write;
    assert_within("io_write through the index", now - written, truth, 5);
    written = now;

    // Another id holds the position, marked shared: found in the tracked map.
    let other = id + u64::from(SLOT_INDEX_SIZE);
    let other_slot = (slot + 1) % 64;
    c.overwrite_slot_index(id, slot_index_entry(other, other_slot, true))
        .expect("overwrite");
    write();
    let now = counters(&mut c, id).io_write;
    assert_within("io_write through a shared entry", now - written, truth, 5);
    written = now;

    // The same without the shared mark: the programs do not find the container.
    c.overwrite_slot_index(id, slot_index_entry(other, other_slot, false))
        .expect("overwrite");
    write();
    assert_eq!(
        counters(&mut c, id).io_write,
        written,
        "an index entry of another id, not shared, hides the container"
    );
    c.track(&cg.dir).expect("track again");
    assert_eq!(
        c.slot_index_raw(id).expect("index"),
        slot_index_entry(other, other_slot, false),
        "tracking a tracked container again keeps its state"
    );

    // A restart rewrites every entry from the tracked map.
    drop(c);
    let mut c = BpfCollector::load(&pins.opts()).expect("reload");
    assert_eq!(c.slot_index_raw(id).expect("index"), own, "restored entry");
    write();
    let now = counters(&mut c, id).io_write;
    assert_within("io_write after the restart", now - written, truth, 5);

    c.untrack(id).expect("untrack");
    assert_eq!(
        c.slot_index_raw(id).expect("index"),
        0,
        "untrack clears the entry"
    );
}

fn bpftool_cgroup_progs(dir: &Path) -> String {
    run(Command::new("bpftool").args(["cgroup", "show"]).arg(dir))
}

/// `untrack` detaches both programs and removes the map entries; a second collector on the same
/// pins does not see the container any more.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn untrack_detaches_and_deletes_entries() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("untrack");
    let cg = TestCgroup::new("untrack");
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        shown.contains("cgroup_inet_ingress") && shown.contains("cgroup_inet_egress"),
        "bpftool shows both attachments: {shown}"
    );
    assert!(c.tracked_ids().any(|t| t == id));
    c.untrack(id).expect("untrack");
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        !shown.contains("cgroup_inet_ingress") && !shown.contains("cgroup_inet_egress"),
        "no attachment left: {shown}"
    );
    c.refresh().expect("refresh");
    assert!(c.counters(id).is_none());
    assert!(!c.tracked_ids().any(|t| t == id));
    drop(c);
    let c2 = BpfCollector::load(&pins.opts()).expect("reload");
    assert!(!c2.tracked_ids().any(|t| t == id), "no map entry left");

    // A container that went away (its cgroup removed) is untracked cleanly too.
    let mut c = c2;
    let gone = TestCgroup::new("untrack-gone");
    let gone_id = c.track(&gone.dir).expect("track");
    drop(gone);
    assert!(!Path::new(V2_ROOT)
        .join(format!("{PREFIX}-untrack-gone"))
        .exists());
    let errors = c.retain(&std::collections::HashSet::new());
    assert!(errors.is_empty(), "untracking a removed cgroup: {errors:?}");
    assert!(!c.tracked_ids().any(|t| t == gone_id));
    let links = pins.0.join("links");
    let left: Vec<String> = std::fs::read_dir(&links)
        .expect("links dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cg-"))
        .collect();
    assert!(left.is_empty(), "no pinned cgroup links left: {left:?}");
}

/// A new collector on the same pins continues the counts, including traffic while no agent ran.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn restart_continues_counts_via_pins() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("restart");
    let cg = TestCgroup::new("restart");
    let ns = TestNetns::new(73);
    let send = |n: usize| send_from(&ns, &cg, n);
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");
    let first = send(NET_BYTES);
    let a = counters(&mut c, id);
    assert_net("net_tx before restart", a.net_tx, first, 5);
    let slot = c.slot(id).expect("slot");
    // As if the agent stopped between attaching and writing the slot: the next one writes it.
    c.overwrite_stored_skb_slot(id, 0).expect("overwrite");
    drop(c);
    // No collector loaded: the pinned links keep counting.
    let second = send(NET_BYTES);
    let started = Instant::now();
    let mut c = BpfCollector::load(&pins.opts()).expect("reload");
    assert!(c.tracked_ids().any(|t| t == id), "restored from pins");
    assert_eq!(
        c.stored_skb_slot(id).expect("lookup"),
        Some(slot + 1),
        "the adopted attachment's slot is written again"
    );
    // Tracking again keeps the counts.
    assert_eq!(c.track(&cg.dir).expect("track again"), id);
    let b = counters(&mut c, id);
    assert_net("net_tx across restart", b.net_tx, first + second, 5);
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// A pinned map of another layout than the agent's (a layout change shipped without a new
/// layout version) is not reused: the collector starts its pins afresh, with the map as its
/// object defines it, and counts. Reused, the programs would be refused (their accesses do not
/// fit the smaller value).
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn pinned_map_of_another_layout_starts_the_pins_afresh() {
    replaced_counters_map_starts_the_pins_afresh("layout", |_, _| {
        "type percpu_array key 4 value 8 entries 16".to_string()
    });
}

/// The same for a map of the right sizes but another type: a plain array where the object
/// has a per-CPU one loads, and would be read as per-CPU values: wrong counts, no error.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn pinned_map_of_another_type_starts_the_pins_afresh() {
    replaced_counters_map_starts_the_pins_afresh("maptype", |value, entries| {
        format!("type array key 4 value {value} entries {entries}")
    });
}

/// Replaces the pinned `LXCMON_COUNTERS` with a map `bpftool map create` makes from
/// `spec(value size, entries)` of the real one, then loads a collector on those pins.
fn replaced_counters_map_starts_the_pins_afresh(tag: &str, spec: impl Fn(u32, u32) -> String) {
    use aya::maps::{MapInfo, MapType};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new(tag);
    let cg = TestCgroup::new(tag);
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    let id = c.track(&cg.dir).expect("track");
    drop(c);
    let counters_pin = pins.0.join("LXCMON_COUNTERS");
    let info = |what| MapInfo::from_pin(&counters_pin).expect(what);
    let real = info("pinned");
    let (value_size, entries) = (real.value_size(), real.max_entries());
    assert_eq!(value_size as usize, std::mem::size_of::<Counters>());
    assert_eq!(real.map_type().ok(), Some(MapType::PerCpuArray));
    std::fs::remove_file(&counters_pin).expect("unpin");
    let spec = spec(value_size, entries);
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&counters_pin)
        .args(spec.split(' '))
        .args(["name", "LXCMON_COUNTERS"]));
    let planted = info("planted");
    assert!(
        (planted.map_type().ok(), planted.value_size()) != (real.map_type().ok(), value_size),
        "premise: the planted map ({spec}) differs"
    );

    let mut c = BpfCollector::load(&pins.opts()).expect("loads beside a map of another layout");
    let now = info("pinned again");
    assert_eq!(
        (now.map_type().ok(), now.value_size(), now.max_entries()),
        (Some(MapType::PerCpuArray), value_size, entries),
        "the map as the object defines it"
    );
    assert!(
        c.tracked_ids().next().is_none(),
        "started afresh: nothing restored from the old pins"
    );
    assert_eq!(c.track(&cg.dir).expect("track"), id);
    let scratch = Scratch::new(tag);
    cg.sh(&format!(
        "exec dd if=/dev/zero of={} bs=1M count=4 oflag=direct status=none",
        scratch.0.join("data").display()
    ));
    assert_within("io_write", counters(&mut c, id).io_write, 4 << 20, 5);
}

/// The program a pinned link runs: its id and (truncated) name.
fn pinned_program(pin: &Path) -> (u32, String) {
    use aya::programs::links::{FdLink, PinnedLink};
    let link = PinnedLink::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let id = FdLink::from(link).info().expect("link info").program_id();
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
        .expect("the link's program is loaded");
    (id, name)
}

/// After an upgrade the pins may hold another version's programs. A new collector replaces each
/// pinned attachment whose program is not of its own code (the kernel's tag), and the old
/// program is gone (nothing counts twice), while an attachment of the same code is adopted as
/// it is. Another version is stood in for by two pins of the same tracepoint, swapped: each then
/// runs the other's program.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn pinned_attachments_of_other_code_are_replaced() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("upgrade");
    let links = pins.0.join("links");
    let (bytes, latency, sched) = (
        links.join("block_bio_queue_btf"),
        links.join("iolat-block_bio_queue"),
        links.join("sched-sched_switch"),
    );
    let c = BpfCollector::load(&pins.opts()).expect("load");
    for p in [&bytes, &latency, &sched] {
        assert!(p.exists(), "{} pinned (needs kernel BTF)", p.display());
    }
    drop(c);
    let tmp = links.join("swap");
    std::fs::rename(&bytes, &tmp).expect("rename");
    std::fs::rename(&latency, &bytes).expect("rename");
    std::fs::rename(&tmp, &latency).expect("rename");
    let (old_bytes, old_bytes_name) = pinned_program(&bytes);
    let (old_latency, old_latency_name) = pinned_program(&latency);
    assert_eq!(old_bytes_name, "lxcmon_iolat_bi", "swapped");
    assert_eq!(old_latency_name, "lxcmon_bio_queu", "swapped");
    let (old_sched, _) = pinned_program(&sched);

    let _c = BpfCollector::load(&pins.opts()).expect("reload");
    let (new_bytes, name) = pinned_program(&bytes);
    assert_eq!(name, "lxcmon_bio_queu", "its own program attached again");
    let (new_latency, name) = pinned_program(&latency);
    assert_eq!(name, "lxcmon_iolat_bi", "its own program attached again");
    assert!(
        new_bytes != old_latency && new_latency != old_bytes,
        "new programs"
    );
    assert_eq!(
        pinned_program(&sched).0,
        old_sched,
        "the same code is adopted, not attached again"
    );
    // Freed once their last link is gone (after an RCU grace period).
    let loaded = |id: u32| {
        aya::programs::loaded_programs()
            .flatten()
            .any(|p| p.id() == id)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while (loaded(old_bytes) || loaded(old_latency)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !loaded(old_bytes) && !loaded(old_latency),
        "the replaced programs are detached and freed"
    );
}

/// Removes a directory tree (and unmounts a mount on it) on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = PathBuf::from(format!("/var/tmp/{PREFIX}-{name}"));
        quiet(Command::new("umount").arg("-l").arg(dir.join("tmpfs")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        quiet(Command::new("umount").arg("-l").arg(self.0.join("tmpfs")));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Buffered writes are charged to the container that dirtied the pages, once: whether the
/// container flushes them itself (fsync: the bios are then skipped as page-cache writeback) or a
/// kernel thread writes them back later (sync from outside the container). Writes to tmpfs are
/// not block I/O.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn buffered_writes_counted_once_when_dirtied() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("dirty");
    let cg = TestCgroup::new("dirty");
    let scratch = Scratch::new("dirty");
    let file = scratch.0.join("data");
    let mut c = BpfCollector::load(&pins.opts()).expect("load");
    assert_eq!(c.io_mode(), &IoMode::BiosAndDirtied, "this kernel has BTF");
    let id = c.track(&cg.dir).expect("track");
    let mib = 32u64;
    let truth = mib * 1024 * 1024;
    let sh = |script: &str| cg.sh(script);

    // The container writes and fsyncs itself.
    sh(&format!(
        "exec dd if=/dev/zero of={} bs=1M count={mib} conv=fsync status=none",
        file.display()
    ));
    let a = counters(&mut c, id);
    assert_within("io_write (buffered + fsync)", a.io_write, truth, 5);

    // The container writes; the host flushes (kernel writeback threads do the bios).
    std::fs::remove_file(&file).expect("rm");
    sh(&format!(
        "exec dd if=/dev/zero of={} bs=1M count={mib} status=none",
        file.display()
    ));
    run(&mut Command::new("sync"));
    let b = counters(&mut c, id);
    assert_within(
        "io_write (buffered, flushed by the host)",
        b.io_write - a.io_write,
        truth,
        5,
    );

    // tmpfs: not block I/O.
    let tmpfs = scratch.0.join("tmpfs");
    std::fs::create_dir_all(&tmpfs).expect("tmpfs dir");
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&tmpfs));
    sh(&format!(
        "exec dd if=/dev/zero of={} bs=1M count=16 conv=fsync status=none",
        tmpfs.join("data").display()
    ));
    let t = counters(&mut c, id);
    assert_eq!(t.io_write, b.io_write, "tmpfs writes are not counted");
}

/// One agent per pin directory: a second collector on the same pins is refused with a message
/// naming the holder's pid and the `bpf_pin_dir` way out; once the first is gone, it loads.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn second_agent_on_the_same_pin_dir_is_refused() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("lock");
    let first = BpfCollector::load(&pins.opts()).expect("load");
    let err = BpfCollector::load(&pins.opts())
        .expect_err("a second agent on the same pin directory must be refused");
    let msg = lxcmon::logging::Chain(&err).to_string();
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "names the holder: {msg}"
    );
    assert!(msg.contains("bpf_pin_dir"), "names the way out: {msg}");
    assert!(!err.is_per_container(), "a global error: {msg}");
    assert!(
        cleanup_pinned(&pins.0).is_err() && pins.0.join("LXCMON_COUNTERS").exists(),
        "--cleanup-bpf leaves the pins of a running agent alone"
    );
    drop(first);
    BpfCollector::load(&pins.opts()).expect("the pins are free once the first agent is gone");
}

/// Ids of lxcmon's programs in `bpftool prog show`.
fn lxcmon_programs() -> std::collections::BTreeSet<u32> {
    run(Command::new("bpftool").args(["prog", "show"]))
        .lines()
        .filter(|l| l.contains(" name lxcmon_"))
        .filter_map(|l| l.split(':').next()?.trim().parse().ok())
        .collect()
}

/// Diagnostic runs leave nothing: `--once` with the BPF collector pins nothing and leaves no
/// program loaded (so none attached) after it exits; `--check-config` touches nothing either.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn once_and_check_config_leave_no_kernel_state() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let default_pins = lxcmon::collect::bpf::default_pin_dir();
    cleanup_pinned(&default_pins).expect("no agent holds the default pins during root tests");
    let programs_before = lxcmon_programs();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("lxcmon.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {d}/log\nmonitoring:\n  collector: ebpf\n  check_interval: 0.2\n  export_file: {d}/export.json\n",
            d = dir.path().display()
        ),
    )
    .expect("config");
    for args in [&["--check-config"][..], &["--once"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_lxcmon"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("running lxcmon");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {}\n{stderr}", out.status);
        if args == ["--once"] {
            assert!(
                stderr.contains("collector: ebpf"),
                "--once ran the BPF collector: {stderr}"
            );
        }
        assert!(
            !default_pins.exists(),
            "{args:?} left pins: {:?}",
            std::fs::read_dir(&default_pins)
                .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        );
        // Programs are freed shortly after the last reference (the process) is gone.
        let left = || -> Vec<u32> {
            lxcmon_programs()
                .difference(&programs_before)
                .copied()
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !left().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            left().is_empty(),
            "{args:?} left BPF programs loaded: {:?}",
            left()
        );
    }
    assert!(
        !dir.path().join("export.json").exists(),
        "--once writes no export file"
    );
}

/// A sample as the file readers produce it: `net` bytes each way, `io` bytes read and written.
fn file_sample(id: &str, fresh: bool, net: u64, io: u64) -> ContainerSample {
    ContainerSample {
        id: id.into(),
        name: id.into(),
        instance: 1,
        init_started: None,
        at: Instant::now(),
        cgroup: CgroupSample {
            io: IoBytes {
                read: io,
                write: io,
            },
            ..CgroupSample::default()
        },
        net_rx: net,
        net_tx: net,
        fs: Default::default(),
        interfaces: Vec::new(),
        mounts: Vec::new(),
        runtime: Runtime::Lxc,
        project: None,
        fresh,
        net_source: CounterSource::Files,
        io_source: CounterSource::Files,
    }
}

/// A block device that appears while the agent runs (a new loop device; on Proxmox a new LVM
/// volume) is excluded once the devices are listed again, within `DEVICES_TTL` (5 s): its
/// direct writes are not counted, as the file readers skip its `io.stat` line; writes to the
/// file system are counted as before.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn a_block_device_that_appears_later_is_excluded() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("newdev");
    let cg = TestCgroup::new("newdev");
    let scratch = Scratch::new("newdev");
    let discovered = vec![Discovered {
        id: "ct".into(),
        name: "ct".into(),
        rel: cg
            .dir
            .strip_prefix(V2_ROOT)
            .expect("below v2")
            .to_path_buf(),
        flavor: Flavor::Lxc,
        runtime: Runtime::Lxc,
        project: None,
        instance: 1,
    }];
    let bpf = BpfCollector::load(&pins.opts()).expect("load");
    let mut k = KernelCounters::new(bpf, V2_ROOT.into(), true);
    k.reconfigure(&MonitoringConfig {
        excluded_devices: vec!["loop".into()],
        ..MonitoringConfig::default()
    });
    // The device appears after the agent listed the devices: a loop device number the host
    // has none of, added through /dev/loop-control (LOOP_CTL_ADD), then removed.
    let n = (64..1024)
        .find(|n| !Path::new(&format!("/sys/block/loop{n}")).exists())
        .expect("a free loop number");
    let loop_ctl = |request: u32| {
        Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import fcntl, os; fcntl.ioctl(os.open('/dev/loop-control', os.O_RDWR), {request}, {n})"
            ))
            .status()
            .is_ok_and(|s| s.success())
    };
    struct Remove<F: Fn()>(F);
    impl<F: Fn()> Drop for Remove<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let loopdev = format!("/dev/loop{n}");
    assert!(loop_ctl(0x4C80), "LOOP_CTL_ADD {n}");
    let _remove = Remove(|| {
        quiet(Command::new("losetup").args(["-d", &loopdev]));
        loop_ctl(0x4C81); // LOOP_CTL_REMOVE
    });
    let image = scratch.0.join("disk.img");
    std::fs::write(&image, vec![0u8; 16 << 20]).expect("image");
    run(Command::new("losetup").arg(&loopdev).arg(&image));
    std::thread::sleep(Duration::from_millis(5200));
    let mut samples = vec![file_sample("ct", true, 0, 0)];
    k.apply(&discovered, &mut samples).expect("apply");
    let written = |k: &mut KernelCounters| {
        let mut samples = vec![file_sample("ct", false, 0, 0)];
        k.apply(&discovered, &mut samples).expect("apply");
        samples[0].cgroup.io.write
    };
    let before = written(&mut k);
    cg.sh(&format!(
        "exec dd if=/dev/zero of={loopdev} bs=1M count=8 oflag=direct status=none"
    ));
    assert_eq!(written(&mut k), before, "{loopdev}: excluded once listed");
    cg.sh(&format!(
        "exec dd if=/dev/zero of={} bs=1M count=8 oflag=direct status=none",
        scratch.0.join("data").display()
    ));
    assert_within(
        "io_write to the file system",
        written(&mut k) - before,
        8 << 20,
        5,
    );
}

/// BPF failures are per container: a container the programs cannot count (its cgroup nested
/// deeper than the programs walk) keeps its file readers' bytes, cycle after cycle, and is
/// named for the sampler to read from files; the other container stays on BPF, its counts
/// continuing from the files' seed.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn a_container_that_cannot_be_tracked_runs_on_files_the_others_stay_on_bpf() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("per-container");
    let ok = TestCgroup::new("pc-ok");
    let deep = TestCgroup::new("pc-deep");
    let mut deep_rel = deep
        .dir
        .strip_prefix(V2_ROOT)
        .expect("below v2")
        .to_path_buf();
    for _ in 0..lxcmon_common::MAX_TRACKED_LEVEL {
        deep_rel.push("d");
    }
    std::fs::create_dir_all(Path::new(V2_ROOT).join(&deep_rel)).expect("nested cgroups");
    let discovered = vec![
        Discovered {
            id: "ok".into(),
            name: "ok".into(),
            rel: ok
                .dir
                .strip_prefix(V2_ROOT)
                .expect("below v2")
                .to_path_buf(),
            flavor: Flavor::Lxc,
            runtime: Runtime::Lxc,
            project: None,
            instance: 1,
        },
        Discovered {
            id: "deep".into(),
            name: "deep".into(),
            rel: deep_rel,
            flavor: Flavor::Lxc,
            runtime: Runtime::Lxc,
            project: None,
            instance: 2,
        },
    ];
    let bpf = BpfCollector::load(&pins.opts()).expect("load");
    let mut k = KernelCounters::new(bpf, V2_ROOT.into(), true);

    // First cycle: both new, their files read (the seed).
    let mut samples = vec![
        file_sample("ok", true, 1000, 4096),
        file_sample("deep", true, 2000, 8192),
    ];
    k.apply(&discovered, &mut samples)
        .expect("one container that cannot be tracked is no failure of the collector");
    let by = |samples: &[ContainerSample], id: &str| {
        samples
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} kept in the cycle"))
    };
    let (o, d) = (by(&samples, "ok"), by(&samples, "deep"));
    assert_eq!(
        (o.net_source, o.io_source),
        (CounterSource::Bpf, CounterSource::Bpf)
    );
    assert_eq!(
        (o.net_rx, o.cgroup.io.write),
        (1000, 4096),
        "BPF counts start at the seed"
    );
    assert_eq!(
        (d.net_source, d.io_source),
        (CounterSource::Files, CounterSource::Files)
    );
    assert_eq!(
        (d.net_rx, d.cgroup.io.write),
        (2000, 8192),
        "the files' bytes are kept"
    );
    assert_eq!(
        k.untracked().iter().collect::<Vec<_>>(),
        vec!["deep"],
        "the sampler reads it from files"
    );
    assert_eq!(
        k.failures(),
        1,
        "one tracking failure counted (errors_total)"
    );

    // Next cycles: the files count on for `deep`; `ok` stays on BPF.
    for (cycle, deep_bytes) in [(2u64, 3000u64), (3, 3500)] {
        let mut samples = vec![
            file_sample("ok", false, 0, 0),
            file_sample("deep", false, deep_bytes, deep_bytes),
        ];
        k.apply(&discovered, &mut samples).expect("apply");
        let (o, d) = (by(&samples, "ok"), by(&samples, "deep"));
        assert_eq!(o.net_source, CounterSource::Bpf, "cycle {cycle}");
        assert!(
            o.net_rx >= 1000 && o.cgroup.io.write >= 4096,
            "cycle {cycle}: {o:?}"
        );
        assert_eq!(d.net_source, CounterSource::Files, "cycle {cycle}");
        assert_eq!(d.net_rx, deep_bytes, "cycle {cycle}");
    }
    assert_eq!(k.failures(), 1, "not tried again until its sample is fresh");
}

/// `enable_network: false` attaches no network program to a tracked container (its block I/O
/// is still counted); turning it on (SIGHUP) attaches them when the container is tracked
/// again, turning it off detaches them.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn network_off_attaches_no_network_programs() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("no-net");
    let cg = TestCgroup::new("no-net");
    let opts = BpfOptions {
        network: false,
        ..pins.opts()
    };
    let mut c = BpfCollector::load(&opts).expect("load");
    let id = c.track(&cg.dir).expect("track");
    assert!(c.tracked_ids().any(|t| t == id), "tracked for block I/O");
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        !shown.contains("cgroup_inet"),
        "no network program: {shown}"
    );
    assert!(c.set_network(true).is_empty());
    assert_eq!(c.track(&cg.dir).expect("track again"), id);
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        shown.contains("cgroup_inet_ingress") && shown.contains("cgroup_inet_egress"),
        "attached once enabled: {shown}"
    );
    assert!(c.set_network(false).is_empty());
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        !shown.contains("cgroup_inet"),
        "detached once disabled: {shown}"
    );
}

/// `collector: files` removes what an earlier BPF run left pinned and attached, unless another
/// agent holds those pins.
#[test]
#[ignore = "needs root and BPF: run by cargo xtask test"]
fn collector_files_removes_the_pins_of_an_earlier_run() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pins = PinDir::new("files");
    let cg = TestCgroup::new("files");
    let mut earlier = BpfCollector::load(&pins.opts()).expect("load");
    earlier.track(&cg.dir).expect("track");
    let layout = Layout::detect(Path::new("/")).expect("layout");
    let m = MonitoringConfig {
        collector: CollectorChoice::Files,
        bpf_pin_dir: Some(pins.0.clone()),
        ..MonitoringConfig::default()
    };
    let choose = || {
        KernelCounters::choose(
            CollectorChoice::Files,
            Path::new("/"),
            &layout,
            &m,
            Purpose::Daemon,
        )
        .expect("files")
        .is_none()
    };
    // Still held by the earlier agent: left alone.
    assert!(choose());
    assert!(
        pins.0.join("LXCMON_COUNTERS").exists(),
        "pins of a running agent stay"
    );
    drop(earlier);
    assert!(
        bpftool_cgroup_progs(&cg.dir).contains("cgroup_inet_ingress"),
        "pins keep it attached"
    );
    assert!(choose());
    assert!(!pins.0.exists(), "pins removed");
    let shown = bpftool_cgroup_progs(&cg.dir);
    assert!(
        !shown.contains("cgroup_inet"),
        "nothing attached any more: {shown}"
    );
}
