//! Per-interface and per-mount figures through the whole pipeline, on fake trees of every
//! cgroup layout. A fixture's mount points are plain directories, so their statvfs is the
//! test's own filesystem: the expected figures are the statvfs the test takes itself.
//! The real kernel (mount namespaces, change signals, a filesystem of known size) is in
//! `mounts_host.rs`.

mod common;

use common::*;
use lxcmon::collect::discovery::Discovered;
use lxcmon::collect::sample::{Options, Sampler};
use lxcmon::config::{Config, ExportFormat};
use lxcmon::derive::ContainerMetrics;
use lxcmon::readers::cgroup::Layout as CgroupLayout;
use lxcmon::readers::sysfs::DeviceFilter;
use std::time::Duration;

#[derive(Clone, Copy, Debug)]
enum Layout {
    V2,
    Hybrid,
    V1,
}

const PURE_V1: &str = "\
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
36 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
37 31 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
38 31 0:33 / /sys/fs/cgroup/blkio rw,nosuid - cgroup cgroup rw,blkio
39 31 0:34 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
40 31 0:35 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
";

/// Plain LXC containers `a` (init 7001) and `b` (init 8001) in `layout`, with the cgroup
/// files the agent needs to sample them.
fn tree(layout: Layout) -> Tree {
    let t = match layout {
        Layout::V2 => {
            let t = Tree::new(V2);
            t.file(
                "sys/fs/cgroup/cgroup.controllers",
                "cpuset cpu io memory pids\n",
            );
            t
        }
        Layout::Hybrid => {
            let t = Tree::new(HYBRID);
            t.file("sys/fs/cgroup/unified/cgroup.controllers", "");
            t
        }
        Layout::V1 => Tree::new(PURE_V1),
    };
    for (name, pid) in [("a", 7001u32), ("b", 8001)] {
        match layout {
            Layout::V2 => {
                let c = format!("sys/fs/cgroup/lxc.payload.{name}");
                t.file(&format!("{c}/cpu.stat"), "usage_usec 1\n");
                t.file(&format!("{c}/memory.current"), &format!("{}\n", 8 * MIB));
                t.file(&format!("{c}/memory.stat"), "file 0\n");
                t.file(&format!("{c}/io.stat"), "");
                t.file(&format!("{c}/pids.current"), "1\n");
                t.file(&format!("{c}/cgroup.procs"), &format!("{pid}\n"));
            }
            Layout::Hybrid | Layout::V1 => {
                let v1 = |ctrl: &str, file: &str, content: &str| {
                    t.file(
                        &format!("sys/fs/cgroup/{ctrl}/lxc.payload.{name}/{file}"),
                        content,
                    )
                };
                v1("cpu,cpuacct", "cpuacct.usage", "1000\n");
                v1("cpuset", "cpuset.effective_cpus", "0-3\n");
                v1("memory", "memory.usage_in_bytes", &format!("{}\n", 8 * MIB));
                v1("memory", "memory.stat", "total_cache 0\n");
                v1("memory", "memory.limit_in_bytes", "9223372036854771712\n");
                v1(
                    "blkio",
                    "blkio.throttle.io_service_bytes_recursive",
                    "Total 0\n",
                );
                v1("pids", "pids.current", "1\n");
                v1("pids", "cgroup.procs", &format!("{pid}\n"));
            }
        }
        t.process(pid, &format!("{pid}\t1"), Some((1, 2)));
    }
    container_views(&t);
    t
}

/// What the containers see: `a` has two interfaces and its own disks, `b` is
/// directory-backed and mounts one of `a`'s disks too.
fn container_views(t: &Tree) {
    t.file(
        "proc/7001/net/dev",
        "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0
  eth0:18446744073709551000 2000 3 4    0     0          0         0   500000    1000    5    6    0     0       0          0
eth1: 300 3 0 1 0 0 0 0 700 7 2 0 0 0 0 0
",
    );
    t.file(
        "proc/7001/mountinfo",
        r"100 90 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/pve-vm--100--disk--0 rw
101 100 0:5 / /proc rw,nosuid - proc proc rw
102 101 0:44 /proc/meminfo /proc/meminfo rw - fuse.lxcfs lxcfs rw
103 100 0:40 / /run rw - tmpfs tmpfs rw,size=1024k
104 100 0:6 / /dev rw - devtmpfs udev rw
105 100 253:5 / /mnt/data rw shared:3 master:1 - xfs /dev/mapper/pve-vm--100--disk--1 rw
106 100 253:9 / /mnt/shared\040space rw - ext4 /dev/vdc rw
107 105 253:5 / /mnt/data/again rw - xfs /dev/mapper/pve-vm--100--disk--1 rw
108 100 0:61 / /mnt/link rw - ext4 /dev/vdd rw
109 100 0:62 / /mnt/nowhere rw - ext4 /dev/vde rw
",
    );
    let a = "proc/7001/root";
    for dir in ["mnt/data/again", "mnt/shared space", "srv/target"] {
        std::fs::create_dir_all(t.path(&format!("{a}/{dir}"))).unwrap();
    }
    // An absolute symlink at a mount point: resolved in the container's root (the host has
    // no /srv/target; a host-side resolution would leave the mount out).
    std::os::unix::fs::symlink("/srv/target", t.path(&format!("{a}/mnt/link"))).unwrap();
    assert!(!std::path::Path::new("/srv/target").exists());

    t.file(
        "proc/8001/mountinfo",
        "200 190 8:1 /var/lib/lxc/b/rootfs / rw - ext4 /dev/sda1 rw\n\
         201 200 0:5 / /proc rw - proc proc rw\n\
         202 200 253:9 / /common rw - ext4 /dev/vdc rw\n",
    );
    std::fs::create_dir_all(t.path("proc/8001/root/common")).unwrap();
}

fn config() -> Config {
    let mut c = Config::default();
    c.monitoring.check_interval = Duration::from_secs_f64(0.1);
    c.monitoring.export_format = ExportFormat::Records;
    c.monitoring.retry_delay = Duration::from_millis(10);
    c.monitoring.parallel_processing = false;
    c
}

/// The second cycle's metrics (the first sets the baseline).
fn two_cycles(t: &Tree, cfg: &Config) -> (lxcmon::daemon::Pipeline, Vec<ContainerMetrics>) {
    let mut p = lxcmon::daemon::Pipeline::new(cfg, t.root()).unwrap();
    assert!(p.cycle().unwrap().metrics.is_empty());
    let metrics = p.cycle().unwrap().metrics;
    (p, metrics)
}

fn by_id<'a>(metrics: &'a [ContainerMetrics], id: &str) -> &'a ContainerMetrics {
    metrics
        .iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("{id} missing from {metrics:#?}"))
}

#[test]
fn interfaces_and_mounts_in_every_layout() {
    for layout in [Layout::V2, Layout::Hybrid, Layout::V1] {
        let t = tree(layout);
        let (mut p, metrics) = two_cycles(&t, &config());
        assert_eq!(metrics.len(), 2, "{layout:?}");
        let a = by_id(&metrics, "a");

        let ifaces: Vec<_> = a
            .interfaces
            .iter()
            .map(|i| {
                (
                    i.name.as_str(),
                    [i.rx_bytes, i.rx_packets, i.rx_errors, i.rx_drops],
                    [i.tx_bytes, i.tx_packets, i.tx_errors, i.tx_drops],
                )
            })
            .collect();
        assert_eq!(
            ifaces,
            [
                (
                    "eth0",
                    [18446744073709551000, 2000, 3, 4],
                    [500000, 1000, 5, 6]
                ),
                ("eth1", [300, 3, 0, 1], [700, 7, 2, 0]),
            ],
            "{layout:?}: lo excluded"
        );
        // The totals are as before: the sum of the same interfaces.
        assert_eq!(a.net_tx_bytes, 500_700, "{layout:?}");

        let got: Vec<_> = a
            .mounts
            .iter()
            .map(|m| (m.mountpoint.as_str(), m.fstype.as_str(), m.dev, m.shared))
            .collect();
        assert_eq!(
            got,
            [
                ("/", "ext4", (253, 1), false),
                ("/mnt/data", "xfs", (253, 5), false),
                // b mounts it too.
                ("/mnt/shared space", "ext4", (253, 9), true),
                ("/mnt/link", "ext4", (0, 61), false),
            ],
            "{layout:?}: no pseudo filesystems, /mnt/data once, /mnt/nowhere not there"
        );
        assert_eq!(a.mounts[1].source, "/dev/mapper/pve-vm--100--disk--1");
        // The root's figures are the root filesystem's (one statvfs for both).
        let root = &a.mounts[0];
        assert_eq!(
            (root.size_bytes, root.used_bytes, root.avail_bytes),
            (a.fs.total, a.fs.used, a.fs.free)
        );
        for (m, dir) in a.mounts[1..]
            .iter()
            .zip(["mnt/data", "mnt/shared space", "srv/target"])
        {
            let st = rustix::fs::statvfs(t.path(&format!("proc/7001/root/{dir}"))).unwrap();
            assert_eq!(m.size_bytes, st.f_blocks * st.f_frsize, "{}", m.mountpoint);
            assert_eq!(m.inodes, st.f_files, "{}", m.mountpoint);
            assert!(m.inodes_free <= m.inodes && m.inodes_free > 0);
            assert!(m.used_bytes > 0 && m.used_bytes + m.avail_bytes <= m.size_bytes);
            // Others write to this filesystem meanwhile: the free space moves a little.
            let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
            assert!(
                m.used_bytes.abs_diff(used) < 1 << 30,
                "{}: {} vs {used}",
                m.mountpoint,
                m.used_bytes
            );
        }

        let b = by_id(&metrics, "b");
        let got: Vec<_> = b
            .mounts
            .iter()
            .map(|m| (m.mountpoint.as_str(), m.shared))
            .collect();
        assert_eq!(
            got,
            [("/", true), ("/common", true)],
            "{layout:?}: a directory of the host's filesystem, a disk a mounts too"
        );
        let b_if: Vec<_> = b
            .interfaces
            .iter()
            .map(|i| (i.name.as_str(), i.rx_bytes, i.tx_bytes, i.rx_packets))
            .collect();
        assert_eq!(b_if, [("eth0", 1, 2, 10)]);

        // Per-interface counters are the kernel's of this instant: eth1 re-created reads
        // from its new counts, the total keeps the old instance's bytes.
        t.file(
            "proc/7001/net/dev",
            "  eth0: 18446744073709551000 2000 3 4 0 0 0 0 500100 1001 5 6 0 0 0 0\n  eth1: 10 1 0 0 0 0 0 0 20 2 0 0 0 0 0 0\n",
        );
        std::thread::sleep(Duration::from_millis(20));
        let metrics = p.cycle().unwrap().metrics;
        let a = by_id(&metrics, "a");
        let eth1 = &a.interfaces[1];
        assert_eq!((eth1.rx_bytes, eth1.tx_bytes), (10, 20));
        assert_eq!(a.interfaces[0].tx_bytes, 500_100);
        assert_eq!(a.net_tx_bytes, 500_100 + 700 + 20, "{layout:?}");
    }
}

#[test]
fn each_group_switches_off() {
    let t = tree(Layout::V2);
    let mut cfg = config();
    cfg.monitoring.enable_per_interface = false;
    let (_, metrics) = two_cycles(&t, &cfg);
    let a = by_id(&metrics, "a");
    assert!(a.interfaces.is_empty());
    assert_eq!(a.mounts.len(), 4);
    assert_eq!(a.net_rx_bytes, 18446744073709551000 + 300);

    let mut cfg = config();
    cfg.monitoring.enable_per_mount = false;
    let (_, metrics) = two_cycles(&t, &cfg);
    let a = by_id(&metrics, "a");
    assert!(a.mounts.is_empty());
    assert_eq!(a.interfaces.len(), 2);

    // Without network figures there are no interfaces either; mounts need no root figure.
    let mut cfg = config();
    cfg.monitoring.enable_network = false;
    cfg.monitoring.enable_filesystem = false;
    let (_, metrics) = two_cycles(&t, &cfg);
    let a = by_id(&metrics, "a");
    assert!(a.interfaces.is_empty());
    assert_eq!(a.fs.total, 0);
    assert_eq!(a.mounts.len(), 4);
    assert!(a.mounts[0].size_bytes > 0);
}

/// A tree whose processes have no mountinfo: the container is sampled, without mounts.
#[test]
fn no_mount_table_no_mounts() {
    let t = tree(Layout::Hybrid);
    std::fs::remove_file(t.path("proc/8001/mountinfo")).unwrap();
    let (_, metrics) = two_cycles(&t, &config());
    assert!(by_id(&metrics, "b").mounts.is_empty());
    assert_eq!(by_id(&metrics, "a").mounts.len(), 4);
    // /common is b's no more: a's copy of it is its own.
    assert!(!by_id(&metrics, "a").mounts[2].shared);
}

/// When another collector counts the network totals (`net_files` off), net/dev is read
/// only in a container's fresh sample, unless per-interface figures want it every cycle.
#[test]
fn net_dev_every_cycle_only_for_per_interface_figures() {
    for per_interface in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("lxc.payload.a");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("cpu.stat"), "usage_usec 1\n").unwrap();
        std::fs::write(cg.join("cgroup.procs"), "7\n").unwrap();
        let proc = dir.path().join("proc/7");
        std::fs::create_dir_all(proc.join("net")).unwrap();
        std::fs::write(proc.join("status"), "NSpid:\t7\t1\n").unwrap();
        let net_dev = |rx: u64| {
            std::fs::write(
                proc.join("net/dev"),
                format!("  eth0: {rx} 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n"),
            )
            .unwrap()
        };
        net_dev(100);
        let layout = CgroupLayout {
            unified: Some(dir.path().to_path_buf()),
            unified_has_controllers: true,
            ..CgroupLayout::default()
        };
        let options = Options {
            swap: false,
            network: true,
            filesystem: false,
            per_interface,
            per_mount: false,
            details: lxcmon::readers::cgroup::details::DetailOptions::NONE,
            workers: 1,
            retry_limit: 0,
            retry_delay: Duration::ZERO,
            net_files: false,
            io_files: true,
        };
        let mut sampler = Sampler::new(dir.path(), layout, DeviceFilter::none(), options);
        let found = [Discovered {
            id: "a".into(),
            name: "a".into(),
            rel: "lxc.payload.a".into(),
            flavor: lxcmon::collect::discovery::Flavor::Lxc,
            runtime: lxcmon::collect::discovery::Runtime::Lxc,
            project: None,
            instance: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg).unwrap()),
        }];
        let first = sampler.sample(&found).containers.remove(0);
        assert!(first.fresh);
        assert_eq!(
            first.net_rx, 100,
            "the fresh sample seeds the other collector"
        );
        net_dev(250);
        let next = sampler.sample(&found).containers.remove(0);
        let rx: Vec<u64> = next.interfaces.iter().map(|i| i.rx_bytes).collect();
        if per_interface {
            assert_eq!(rx, [250]);
        } else {
            assert!(rx.is_empty());
            assert_eq!(next.net_rx, 100, "net/dev not read: as before");
        }
    }
}
