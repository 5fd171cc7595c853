//! The details on fixture trees for every layout: pure v2, hybrid (v1 controllers, PSI from
//! the unified tree), pure v1; files present, absent, `max`/empty.

use super::details::*;
use super::*;
use crate::readers::sysfs::tests::device_fixture;

const REL: &str = "lxc.payload.c1";

struct Fixture {
    dir: tempfile::TempDir,
    devices: DeviceFilter,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let devices = device_fixture(dir.path(), &[("254:0", "vda"), ("7:0", "loop0")], &["loop"]);
        Self { dir, devices }
    }

    /// Writes `content` to `<hierarchy>/<REL>/<name>`.
    fn file(&self, hierarchy: &str, name: &str, content: &str) {
        let p = self.dir.path().join(hierarchy).join(REL).join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn v2_layout(&self) -> Layout {
        Layout {
            unified: Some(self.path("unified")),
            unified_has_controllers: true,
            v1: BTreeMap::new(),
        }
    }

    /// v1 controllers; with the unified tree beside them when `hybrid`.
    fn v1_layout(&self, hybrid: bool) -> Layout {
        let mut v1 = BTreeMap::new();
        for (ctrl, dir) in [
            ("cpu", "cpu,cpuacct"),
            ("cpuacct", "cpu,cpuacct"),
            ("memory", "memory"),
            ("blkio", "blkio"),
            ("pids", "pids"),
        ] {
            v1.insert(ctrl.to_string(), self.path(dir));
        }
        Layout {
            unified: hybrid.then(|| self.path("unified")),
            unified_has_controllers: false,
            v1,
        }
    }

    /// One sample, the same whether the rare files are held, opened for each read (`lean`),
    /// or let go after a first sample (descriptors found short while running).
    fn read(&self, layout: &Layout, options: DetailOptions, io_totals: bool) -> CgroupSample {
        let open = |lean| CgroupReader::open(layout, Path::new(REL), None, options, lean).unwrap();
        let mut scratch = Scratch::default();
        // Each read is dated (compared here without its moment).
        let mut sample = |r: &mut CgroupReader| {
            r.sample(&self.devices, io_totals, &mut scratch).map(|s| {
                assert!(s.cpu_read_at.is_some(), "the CPU read is dated");
                CgroupSample {
                    cpu_read_at: None,
                    ..s
                }
            })
        };
        let held = sample(&mut open(false)).unwrap();
        assert_eq!(sample(&mut open(true)).unwrap(), held, "lean");
        let mut released = open(false);
        sample(&mut released).unwrap();
        released.release_rare();
        assert_eq!(sample(&mut released).unwrap(), held, "released");
        held
    }

    fn psi(&self, hierarchy: &str) {
        self.file(
            hierarchy,
            "cpu.pressure",
            "some avg10=1.00 avg60=0.50 avg300=0.10 total=1231\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=1113\n",
        );
        self.file(
            hierarchy,
            "memory.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=20\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=10\n",
        );
        self.file(
            hierarchy,
            "io.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
        );
    }

    /// The seed's v2 files, and the unified tree's processes.
    fn v2_base(&self) {
        self.file("unified", "cgroup.procs", "");
        self.file("unified", "memory.current", "1000000\n");
        self.file("unified", "pids.current", "3\n");
    }

    fn v1_base(&self) {
        self.file("cpu,cpuacct", "cpuacct.usage", "5000\n");
        self.file("cpu,cpuacct", "cpu.cfs_quota_us", "-1\n");
        self.file("cpu,cpuacct", "cpu.cfs_period_us", "100000\n");
        self.file("memory", "memory.usage_in_bytes", "1000000\n");
        self.file("memory", "memory.limit_in_bytes", "9223372036854771712\n");
        self.file("pids", "pids.current", "3\n");
        self.file("pids", "cgroup.procs", "");
    }
}

const V2_STAT: &str = "anon 4096\nfile 8192\nkernel 3000\nkernel_stack 100\npagetables 200\n\
    sec_pagetables 0\npercpu 50\nsock 0\nvmalloc 0\nshmem 1024\nfile_mapped 0\nfile_dirty 512\n\
    file_writeback 256\nslab_reclaimable 600\nslab_unreclaimable 400\nslab 1000\n\
    workingset_refault_anon 3\nworkingset_refault_file 4\npgfault 100\npgmajfault 7\n";

#[test]
fn v2_every_detail() {
    let f = Fixture::new();
    f.v2_base();
    f.psi("unified");
    f.file(
        "unified",
        "cpu.stat",
        "usage_usec 10\nuser_usec 5\nsystem_usec 5\nnr_periods 40\nnr_throttled 20\nthrottled_usec 1500\nnr_bursts 0\nburst_usec 0\n",
    );
    f.file("unified", "cpu.max", "50000 100000\n");
    f.file("unified", "memory.stat", V2_STAT);
    f.file("unified", "memory.max", "67108864\n");
    f.file("unified", "memory.high", "60000000\n");
    f.file("unified", "pids.max", "512\n");
    f.file(
        "unified",
        "memory.events",
        "low 0\nhigh 5\nmax 9\noom 2\noom_kill 1\noom_group_kill 0\n",
    );
    f.file("unified", "memory.swap.events", "high 0\nmax 3\nfail 1\n");
    f.file(
        "unified",
        "io.stat",
        "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n\
         7:0 rbytes=99 wbytes=99 rios=9 wios=9 dbytes=0 dios=0\n\
         8:16 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n",
    );
    let s = f.read(&f.v2_layout(), DetailOptions::ALL, true);
    assert_eq!(s.cpu_usage_ns, 10_000);
    assert_eq!(s.memory_bytes, 1000000 - 8192);
    assert_eq!(
        s.io,
        IoBytes {
            read: 4097,
            write: 8194
        },
        "loop0 excluded"
    );
    let d = &s.details;
    assert_eq!(
        d.pressure,
        Pressure {
            cpu: Some(Stall {
                some_us: 1231,
                full_us: Some(1113)
            }),
            memory: Some(Stall {
                some_us: 20,
                full_us: Some(10)
            }),
            io: Some(Stall {
                some_us: 0,
                full_us: Some(0)
            }),
        }
    );
    assert_eq!(
        d.throttling,
        Some(Throttling {
            periods: 40,
            throttled_periods: 20,
            throttled_ns: 1_500_000
        })
    );
    assert_eq!(
        d.memory_events,
        MemoryEvents {
            high: Some(5),
            max: Some(9),
            oom: Some(2),
            oom_kill: Some(1),
            oom_group_kill: Some(0),
            swap_high: Some(0),
            swap_max: Some(3),
            swap_fail: Some(1),
        }
    );
    assert_eq!(
        d.memory,
        MemoryBreakdown {
            anon_bytes: Some(4096),
            file_bytes: Some(8192),
            kernel_bytes: Some(3000),
            slab_bytes: Some(1000),
            shmem_bytes: Some(1024),
            dirty_bytes: Some(512),
            writeback_bytes: Some(256),
            workingset_refaults: Some(7),
            major_faults: Some(7),
        }
    );
    assert_eq!(
        d.devices,
        vec![
            DeviceIo {
                dev: (254, 0),
                name: "vda".into(),
                read_bytes: 4096,
                write_bytes: 8192,
                reads: 1,
                writes: 2
            },
            DeviceIo {
                dev: (8, 16),
                name: "8:16".into(),
                read_bytes: 1,
                write_bytes: 2,
                reads: 3,
                writes: 4
            },
        ]
    );
    let l = s.limits;
    assert_eq!(l.cpu_quota_cores, Some(0.5));
    assert_eq!(
        (l.cpu_quota_us, l.cpu_period_us),
        (Some(50000), Some(100000))
    );
    assert_eq!(l.memory_bytes, Some(67108864));
    assert_eq!(l.memory_high_bytes, Some(60000000));
    assert_eq!(l.pids_max, Some(512));
}

/// An older kernel, limits at `max`, no PSI, no memory.events: absent, not 0.
#[test]
fn v2_old_kernel_unlimited_and_absent() {
    let f = Fixture::new();
    f.v2_base();
    // No cpu controller for the cgroup: cpu.stat without the CFS lines.
    f.file(
        "unified",
        "cpu.stat",
        "usage_usec 10\nuser_usec 5\nsystem_usec 5\n",
    );
    f.file("unified", "cpu.max", "max 100000\n");
    f.file("unified", "memory.high", "max\n");
    f.file("unified", "pids.max", "max\n");
    // 5.8: no `kernel`, `percpu` or `vmalloc`; one workingset_refault.
    f.file(
        "unified",
        "memory.stat",
        "anon 10\nfile 20\nkernel_stack 1\npagetables 2\nsock 3\nshmem 0\nfile_dirty 0\n\
         file_writeback 0\nslab 4\nworkingset_refault 6\npgmajfault 0\n",
    );
    // Without oom_group_kill (before 5.17), no swap events (no swap accounting).
    f.file(
        "unified",
        "memory.events",
        "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    );
    f.file("unified", "io.stat", "");
    let s = f.read(&f.v2_layout(), DetailOptions::ALL, true);
    let d = &s.details;
    assert_eq!(d.pressure, Pressure::default(), "no *.pressure files");
    assert_eq!(d.throttling, None);
    assert_eq!(
        d.memory.kernel_bytes,
        Some(1 + 2 + 3 + 4),
        "the sum of its parts"
    );
    assert_eq!(d.memory.workingset_refaults, Some(6));
    assert_eq!(d.memory.shmem_bytes, Some(0), "0 is a value");
    assert_eq!(d.memory_events.oom_kill, Some(0));
    assert_eq!(d.memory_events.oom_group_kill, None);
    assert_eq!(
        (
            d.memory_events.swap_high,
            d.memory_events.swap_max,
            d.memory_events.swap_fail
        ),
        (None, None, None)
    );
    assert!(d.devices.is_empty());
    let l = s.limits;
    assert_eq!((l.cpu_quota_us, l.cpu_period_us), (None, Some(100000)));
    assert_eq!((l.memory_high_bytes, l.pids_max), (None, None));

    // No memory controller at all: no events, no breakdown; an empty limit is an error.
    let f = Fixture::new();
    f.file("unified", "cgroup.procs", "");
    f.file("unified", "cpu.stat", "usage_usec 10\n");
    let s = f.read(&f.v2_layout(), DetailOptions::ALL, true);
    assert_eq!(s.details, Details::default());
    f.file("unified", "pids.max", "");
    let mut r = CgroupReader::open(
        &f.v2_layout(),
        Path::new(REL),
        None,
        DetailOptions::ALL,
        false,
    )
    .unwrap();
    assert!(r.sample(&f.devices, true, &mut Scratch::default()).is_err());
}

#[test]
fn psi_without_cpu_full_line() {
    let f = Fixture::new();
    f.v2_base();
    f.file("unified", "cpu.stat", "usage_usec 10\n");
    f.file(
        "unified",
        "cpu.pressure",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=77\n",
    );
    let s = f.read(&f.v2_layout(), DetailOptions::ALL, true);
    assert_eq!(
        s.details.pressure,
        Pressure {
            cpu: Some(Stall {
                some_us: 77,
                full_us: None
            }),
            memory: None,
            io: None,
        }
    );
    assert_eq!(parse_pressure(""), None);
    assert_eq!(
        parse_pressure("full avg10=0.00 total=5\n"),
        None,
        "no some line"
    );
    // The kernel's field order, and another one (total= not last).
    let kernel = "some avg10=1.00 avg60=0.50 avg300=0.10 total=123456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=789\n";
    let reordered = "some total=123456 avg10=1.00\nfull avg10=0.00 total=789 \n";
    for text in [kernel, reordered] {
        assert_eq!(
            parse_pressure(text),
            Some(Stall {
                some_us: 123456,
                full_us: Some(789)
            }),
            "{text:?}"
        );
    }
}

/// Off: nothing read. The detail files are directories here, which fail any read.
#[test]
fn switched_off_details_read_nothing() {
    let f = Fixture::new();
    f.v2_base();
    f.file(
        "unified",
        "cpu.stat",
        "usage_usec 10\nnr_periods 4\nnr_throttled 2\nthrottled_usec 1\n",
    );
    f.file("unified", "memory.stat", V2_STAT);
    f.file("unified", "cpu.max", "50000 100000\n");
    for name in [
        "cpu.pressure",
        "memory.events",
        "memory.swap.events",
        "memory.high",
        "pids.max",
        "io.stat",
    ] {
        std::fs::create_dir_all(f.path("unified").join(REL).join(name)).unwrap();
    }
    let s = f.read(&f.v2_layout(), DetailOptions::NONE, false);
    assert_eq!(s.details, Details::default());
    assert_eq!(s.limits.cpu_quota_cores, Some(0.5));
    assert_eq!((s.limits.cpu_quota_us, s.limits.pids_max), (None, None));
    assert_eq!(s.memory_bytes, 1000000 - 8192);

    // Switched on later (a reload): the files are opened, and read.
    std::fs::remove_dir(f.path("unified").join(REL).join("cpu.pressure")).unwrap();
    f.file("unified", "cpu.pressure", "some total=9\n");
    let mut r = CgroupReader::open(
        &f.v2_layout(),
        Path::new(REL),
        None,
        DetailOptions::NONE,
        false,
    )
    .unwrap();
    let mut scratch = Scratch::default();
    r.sample(&f.devices, false, &mut scratch).unwrap();
    let on = DetailOptions {
        pressure: true,
        throttling: true,
        ..DetailOptions::NONE
    };
    r.set_details(on).unwrap();
    let s = r.sample(&f.devices, false, &mut scratch).unwrap();
    assert_eq!(
        s.details.pressure.cpu,
        Some(Stall {
            some_us: 9,
            full_us: None
        })
    );
    assert_eq!(s.details.throttling.map(|t| t.throttled_periods), Some(2));
    assert_eq!(s.limits.cpu_quota_us, Some(50000), "limits read again");
}

/// Per device with the totals counted elsewhere (BPF): the file is read for the devices, the
/// totals stay 0; with per-device off too, it is not read at all.
#[test]
fn per_device_without_totals() {
    let f = Fixture::new();
    f.v2_base();
    f.file("unified", "cpu.stat", "usage_usec 10\n");
    f.file(
        "unified",
        "io.stat",
        "7:0 rbytes=1 wbytes=1 rios=1 wios=1\n254:0 rbytes=10 wbytes=20 rios=3 wios=4\n",
    );
    let s = f.read(&f.v2_layout(), DetailOptions::ALL, false);
    assert_eq!(s.io, IoBytes::default());
    assert_eq!(s.details.devices.len(), 1, "loop0 excluded");
    assert_eq!(
        (&*s.details.devices[0].name, s.details.devices[0].writes),
        ("vda", 4)
    );
    std::fs::remove_file(f.path("unified").join(REL).join("io.stat")).unwrap();
    std::fs::create_dir(f.path("unified").join(REL).join("io.stat")).unwrap();
    let s = f.read(&f.v2_layout(), DetailOptions::NONE, false);
    assert!(s.details.devices.is_empty());
}

const V1_STAT: &str = "cache 1\nrss 2\ntotal_cache 8192\ntotal_rss 4096\ntotal_rss_huge 0\n\
    total_shmem 1024\ntotal_mapped_file 0\ntotal_dirty 512\ntotal_writeback 256\n\
    total_workingset_refault_anon 3\ntotal_workingset_refault_file 4\ntotal_swap 0\n\
    total_pgfault 100\ntotal_pgmajfault 7\n";

fn v1_details(f: &Fixture) {
    f.v1_base();
    f.file("cpu,cpuacct", "cpu.cfs_quota_us", "50000\n");
    f.file(
        "cpu,cpuacct",
        "cpu.stat",
        "nr_periods 14\nnr_throttled 14\nthrottled_time 1016663219\nnr_bursts 0\nburst_time 0\n",
    );
    f.file("memory", "memory.stat", V1_STAT);
    f.file(
        "memory",
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
    );
    f.file("memory", "memory.failcnt", "5\n");
    f.file("memory", "memory.memsw.failcnt", "2\n");
    f.file("memory", "memory.kmem.usage_in_bytes", "147456\n");
    f.file("pids", "pids.max", "100\n");
    f.file(
        "blkio",
        "blkio.throttle.io_service_bytes_recursive",
        "254:0 Read 57344\n254:0 Write 8056832\n254:0 Sync 8114176\n254:0 Async 0\n\
         254:0 Discard 0\n254:0 Total 8114176\n7:0 Read 5\n7:0 Write 5\nTotal 8114186\n",
    );
    f.file(
        "blkio",
        "blkio.throttle.io_serviced_recursive",
        "254:0 Read 6\n254:0 Write 1728\n254:0 Sync 1734\n254:0 Async 0\n254:0 Discard 0\n\
         254:0 Total 1734\n7:0 Read 1\n7:0 Write 1\nTotal 1736\n",
    );
}

/// Hybrid (this host's layout): v1 figures, PSI from the container's unified-tree directory.
#[test]
fn hybrid_every_detail() {
    let f = Fixture::new();
    v1_details(&f);
    f.file("unified", "cgroup.procs", "");
    f.psi("unified");
    let s = f.read(&f.v1_layout(true), DetailOptions::ALL, true);
    let d = &s.details;
    assert_eq!(
        d.pressure.cpu,
        Some(Stall {
            some_us: 1231,
            full_us: Some(1113)
        })
    );
    assert_eq!(
        d.pressure.memory,
        Some(Stall {
            some_us: 20,
            full_us: Some(10)
        })
    );
    assert_eq!(
        d.throttling,
        Some(Throttling {
            periods: 14,
            throttled_periods: 14,
            throttled_ns: 1016663219
        })
    );
    assert_eq!(
        d.memory_events,
        MemoryEvents {
            max: Some(5 + 2),
            oom_kill: Some(1),
            ..MemoryEvents::default()
        }
    );
    assert_eq!(
        d.memory,
        MemoryBreakdown {
            anon_bytes: Some(4096),
            file_bytes: Some(8192),
            kernel_bytes: Some(147456),
            slab_bytes: None,
            shmem_bytes: Some(1024),
            dirty_bytes: Some(512),
            writeback_bytes: Some(256),
            workingset_refaults: Some(7),
            major_faults: Some(7),
        }
    );
    assert_eq!(
        d.devices,
        vec![DeviceIo {
            dev: (254, 0),
            name: "vda".into(),
            read_bytes: 57344,
            write_bytes: 8056832,
            reads: 6,
            writes: 1728
        }]
    );
    assert_eq!(
        s.io,
        IoBytes {
            read: 57344,
            write: 8056832
        }
    );
    let l = s.limits;
    assert_eq!(
        (l.cpu_quota_us, l.cpu_period_us, l.cpu_quota_cores),
        (Some(50000), Some(100000), Some(0.5))
    );
    assert_eq!(
        (l.pids_max, l.memory_high_bytes, l.memory_bytes),
        (Some(100), None, None)
    );
}

/// Pure v1: no PSI anywhere; an old kernel's oom_control without `oom_kill`; no kmem file, no
/// swap accounting, no CFS quota, `pids.max` at `max`.
#[test]
fn pure_v1_absent_figures() {
    let f = Fixture::new();
    f.v1_base();
    f.file("memory", "memory.stat", "total_cache 10\ntotal_rss 20\n");
    f.file(
        "memory",
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\n",
    );
    f.file("memory", "memory.failcnt", "0\n");
    f.file("pids", "pids.max", "max\n");
    f.file(
        "cpu,cpuacct",
        "cpu.stat",
        "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    );
    f.file(
        "blkio",
        "blkio.throttle.io_service_bytes_recursive",
        "Total 0\n",
    );
    f.file("blkio", "blkio.throttle.io_serviced_recursive", "Total 0\n");
    // A unified tree without this container's cgroup counts as no PSI too.
    for layout in [f.v1_layout(false), f.v1_layout(true)] {
        let s = f.read(&layout, DetailOptions::ALL, true);
        let d = &s.details;
        assert_eq!(d.pressure, Pressure::default());
        assert_eq!(
            d.throttling,
            Some(Throttling::default()),
            "0 periods is a value"
        );
        assert_eq!(
            d.memory_events,
            MemoryEvents {
                max: Some(0),
                ..MemoryEvents::default()
            },
            "no oom_kill line: absent"
        );
        assert_eq!(d.memory.anon_bytes, Some(20));
        assert_eq!(
            (
                d.memory.kernel_bytes,
                d.memory.shmem_bytes,
                d.memory.workingset_refaults
            ),
            (None, None, None)
        );
        assert!(d.devices.is_empty());
        assert_eq!(
            (s.limits.cpu_quota_us, s.limits.cpu_period_us),
            (None, Some(100000))
        );
        assert_eq!(s.limits.pids_max, None);
    }
}
