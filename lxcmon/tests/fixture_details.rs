//! Issue 12's cgroup details through the whole pipeline on fixture trees: what a cycle gives
//! for pure v2 and hybrid (v1 controllers, PSI from the unified tree), and the switches.

mod common;

use common::*;
use lxcmon::config::{Config, ExportFormat};
use lxcmon::derive::ContainerMetrics;
use lxcmon::readers::cgroup::details::*;
use std::time::Duration;

fn config() -> Config {
    let mut c = Config::default();
    c.monitoring.check_interval = Duration::from_millis(100);
    c.monitoring.export_format = ExportFormat::Records;
    c.monitoring.retry_delay = Duration::from_millis(10);
    c.monitoring.parallel_processing = false;
    c
}

/// The second cycle's figures (the first is a baseline) for container `id`.
fn second_cycle(t: &Tree, cfg: &Config, id: &str) -> ContainerMetrics {
    let mut p = lxcmon::daemon::Pipeline::new(cfg, t.root()).unwrap();
    p.cycle().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let cycle = p.cycle().unwrap();
    cycle
        .metrics
        .into_iter()
        .find(|m| m.id == id)
        .unwrap_or_else(|| panic!("{id} not in the cycle"))
}

fn psi(t: &Tree, dir: &str) {
    t.file(
        &format!("{dir}/cpu.pressure"),
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1000000\n",
    );
    t.file(
        &format!("{dir}/memory.pressure"),
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=30\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=20\n",
    );
    t.file(
        &format!("{dir}/io.pressure"),
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=5\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=4\n",
    );
}

fn proxmox_v2_details() -> Tree {
    let t = proxmox_v2();
    let c = "sys/fs/cgroup/lxc/100";
    psi(&t, c);
    t.file(
        &format!("{c}/cpu.stat"),
        "usage_usec 5000000\nuser_usec 1\nsystem_usec 1\nnr_periods 100\nnr_throttled 40\nthrottled_usec 2000000\n",
    );
    t.file(
        &format!("{c}/memory.stat"),
        &format!(
            "anon {}\nfile {}\nkernel 4096\nslab 2048\nshmem 0\nfile_dirty 8192\nfile_writeback 0\nworkingset_refault_anon 1\nworkingset_refault_file 2\npgmajfault 3\n",
            150 * MIB,
            100 * MIB
        ),
    );
    t.file(
        &format!("{c}/memory.events"),
        "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
    );
    t.file(&format!("{c}/memory.high"), &format!("{}\n", 256 * MIB));
    t.file(&format!("{c}/pids.max"), "max\n");
    t
}

#[test]
fn pure_v2_details_and_limits_in_a_cycle() {
    let t = proxmox_v2_details();
    let m = second_cycle(&t, &config(), "100");
    let d = &m.details;
    assert_eq!(
        d.pressure,
        Pressure {
            cpu: Some(Stall {
                some_us: 2_500_000,
                full_us: Some(1_000_000)
            }),
            memory: Some(Stall {
                some_us: 30,
                full_us: Some(20)
            }),
            io: Some(Stall {
                some_us: 5,
                full_us: Some(4)
            }),
        }
    );
    assert_eq!(
        d.throttling,
        Some(Throttling {
            periods: 100,
            throttled_periods: 40,
            throttled_ns: 2_000_000_000
        })
    );
    assert_eq!(
        d.memory_events,
        MemoryEvents {
            high: Some(0),
            max: Some(12),
            oom: Some(2),
            oom_kill: Some(2),
            oom_group_kill: Some(0),
            ..MemoryEvents::default()
        },
        "no memory.swap.events in this tree: swap events absent"
    );
    assert_eq!(d.memory.anon_bytes, Some(150 * MIB));
    assert_eq!(d.memory.kernel_bytes, Some(4096));
    assert_eq!(d.memory.workingset_refaults, Some(3));
    assert_eq!(
        d.devices,
        vec![DeviceIo {
            dev: (254, 0),
            name: "vda".into(),
            read_bytes: 4096,
            write_bytes: 1048576,
            reads: 1,
            writes: 4
        }],
        "loop0 is excluded by default"
    );
    let l = m.limits;
    assert_eq!(
        (l.cpu_quota_us, l.cpu_period_us),
        (Some(50000), Some(100000))
    );
    assert_eq!(l.memory_high_bytes, Some(256 * MIB));
    assert_eq!((l.pids_max, l.memory_bytes), (None, None), "max: unlimited");

    // 101 has none of the detail files: absent, not 0.
    let mut p = lxcmon::daemon::Pipeline::new(&config(), t.root()).unwrap();
    p.cycle().unwrap();
    let cycle = p.cycle().unwrap();
    let other = cycle.metrics.iter().find(|m| m.id == "101").unwrap();
    assert_eq!(other.details.pressure, Pressure::default());
    assert_eq!(other.details.throttling, None);
    assert_eq!(other.details.memory_events, MemoryEvents::default());
    assert_eq!(other.details.memory.kernel_bytes, None);
    assert!(other.details.devices.is_empty(), "empty io.stat");
}

#[test]
fn switched_off_groups_are_absent_in_a_cycle() {
    let t = proxmox_v2_details();
    let mut cfg = config();
    cfg.monitoring.enable_pressure = false;
    cfg.monitoring.enable_throttling = false;
    cfg.monitoring.enable_memory_details = false;
    cfg.monitoring.enable_per_device = false;
    let m = second_cycle(&t, &cfg, "100");
    assert_eq!(m.details, Details::default());
    assert_eq!(
        (m.limits.cpu_quota_us, m.limits.memory_high_bytes),
        (None, None)
    );
    assert_eq!(
        m.limits.cpu_quota_cores,
        Some(0.5),
        "the seed's limit stays"
    );

    // Switched on by a reload: the next cycles read them.
    let mut p = lxcmon::daemon::Pipeline::new(&cfg, t.root()).unwrap();
    p.cycle().unwrap();
    let on = config();
    p.reconfigure(&cfg, &on);
    let cycle = p.cycle().unwrap();
    let m = cycle.metrics.iter().find(|m| m.id == "100").unwrap();
    assert_eq!(m.details.throttling.map(|t| t.throttled_periods), Some(40));
    assert_eq!(m.details.memory_events.oom_kill, Some(2));
    assert_eq!(m.limits.memory_high_bytes, Some(256 * MIB));
}

/// Plain LXC on a hybrid host: v1 figures, PSI from the container's unified-tree directory.
fn plain_lxc_hybrid_details() -> Tree {
    let t = Tree::new(HYBRID);
    t.file("sys/fs/cgroup/unified/cgroup.controllers", "");
    let c = "lxc.payload.web";
    let v1 = |ctrl: &str, file: &str, content: &str| {
        t.file(&format!("sys/fs/cgroup/{ctrl}/{c}/{file}"), content)
    };
    v1("cpu,cpuacct", "cpuacct.usage", "7000000000\n");
    v1("cpu,cpuacct", "cpu.cfs_quota_us", "25000\n");
    v1("cpu,cpuacct", "cpu.cfs_period_us", "100000\n");
    v1(
        "cpu,cpuacct",
        "cpu.stat",
        "nr_periods 10\nnr_throttled 5\nthrottled_time 123456789\nnr_bursts 0\nburst_time 0\n",
    );
    v1("cpuset", "cpuset.effective_cpus", "0-1\n");
    v1(
        "memory",
        "memory.usage_in_bytes",
        &format!("{}\n", 64 * MIB),
    );
    v1(
        "memory",
        "memory.stat",
        "cache 1\ntotal_cache 4096\ntotal_rss 8192\ntotal_shmem 0\ntotal_dirty 0\ntotal_writeback 0\ntotal_workingset_refault_anon 0\ntotal_workingset_refault_file 9\ntotal_swap 0\ntotal_pgmajfault 1\n",
    );
    v1(
        "memory",
        "memory.limit_in_bytes",
        &format!("{}\n", 128 * MIB),
    );
    v1(
        "memory",
        "memory.memsw.usage_in_bytes",
        &format!("{}\n", 64 * MIB),
    );
    v1(
        "memory",
        "memory.memsw.limit_in_bytes",
        &format!("{}\n", 128 * MIB),
    );
    v1(
        "memory",
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
    );
    v1("memory", "memory.failcnt", "0\n");
    v1("memory", "memory.memsw.failcnt", "17\n");
    v1("memory", "memory.kmem.usage_in_bytes", "315392\n");
    v1(
        "blkio",
        "blkio.throttle.io_service_bytes_recursive",
        "254:0 Read 8192\n254:0 Write 65536\n254:0 Total 73728\n7:0 Read 5\n7:0 Write 5\nTotal 73738\n",
    );
    v1(
        "blkio",
        "blkio.throttle.io_serviced_recursive",
        "254:0 Read 2\n254:0 Write 16\n254:0 Total 18\n7:0 Read 1\n7:0 Write 1\nTotal 20\n",
    );
    v1("pids", "pids.current", "1\n");
    v1("pids", "pids.max", "200\n");
    v1("pids", "cgroup.procs", "3001\n");
    t.file(&format!("sys/fs/cgroup/unified/{c}/cgroup.procs"), "3001\n");
    psi(&t, &format!("sys/fs/cgroup/unified/{c}"));
    t.process(3001, "3001\t1", Some((100, 200)));
    t
}

#[test]
fn hybrid_details_and_limits_in_a_cycle() {
    let t = plain_lxc_hybrid_details();
    let m = second_cycle(&t, &config(), "web");
    let d = &m.details;
    assert_eq!(
        d.pressure.cpu,
        Some(Stall {
            some_us: 2_500_000,
            full_us: Some(1_000_000)
        })
    );
    assert_eq!(
        d.pressure.io,
        Some(Stall {
            some_us: 5,
            full_us: Some(4)
        })
    );
    assert_eq!(
        d.throttling,
        Some(Throttling {
            periods: 10,
            throttled_periods: 5,
            throttled_ns: 123456789
        })
    );
    assert_eq!(
        d.memory_events,
        MemoryEvents {
            max: Some(17),
            oom_kill: Some(3),
            ..MemoryEvents::default()
        },
        "limit hits counted by memsw when that limit binds"
    );
    assert_eq!(
        d.memory,
        MemoryBreakdown {
            anon_bytes: Some(8192),
            file_bytes: Some(4096),
            kernel_bytes: Some(315392),
            slab_bytes: None,
            shmem_bytes: Some(0),
            dirty_bytes: Some(0),
            writeback_bytes: Some(0),
            workingset_refaults: Some(9),
            major_faults: Some(1),
        }
    );
    assert_eq!(
        d.devices,
        vec![DeviceIo {
            dev: (254, 0),
            name: "vda".into(),
            read_bytes: 8192,
            write_bytes: 65536,
            reads: 2,
            writes: 16
        }]
    );
    let l = m.limits;
    assert_eq!(
        (l.cpu_quota_us, l.cpu_period_us, l.cpu_quota_cores),
        (Some(25000), Some(100000), Some(0.25))
    );
    assert_eq!(
        (l.pids_max, l.memory_high_bytes, l.cpuset_cpus),
        (Some(200), None, Some(2))
    );
    assert_eq!(l.memory_bytes, Some(128 * MIB));
}
