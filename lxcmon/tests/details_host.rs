//! The cgroup details on this host's real kernel (hybrid: v1 controllers and the unified tree),
//! read the way the daemon reads them: one reader, files held open, sampled before and after
//! a workload the test runs in a cgroup it creates: a busy loop under a 0.2-core quota, 1 MiB
//! of direct writes, one process allocating past a 32 MiB limit without swap.
//!
//! Root, a hybrid host; run under the lab's lock:
//! `flock /tmp/lxcmon-root.lock cargo test -p lxcmon --test details_host -- --ignored --nocapture`.

use lxcmon::readers::cgroup::details::DetailOptions;
use lxcmon::readers::cgroup::{CgroupReader, Layout, Mode, Scratch};
use lxcmon::readers::sysfs::DeviceFilter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The test's cgroups, removed whatever happens.
struct Lab {
    dirs: Vec<PathBuf>,
    file: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        for d in self.dirs.iter().rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[test]
#[ignore = "needs root and a hybrid cgroup layout; run under the lab lock"]
fn details_on_the_real_kernel() {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let layout = Layout::detect(Path::new("/")).unwrap();
    assert_eq!(
        layout.mode(),
        Some(Mode::V1),
        "this test is for hybrid hosts"
    );
    let unified = layout.unified.clone().expect("a unified tree (hybrid)");
    let rel = PathBuf::from(format!("lxcmon-t-details-{}", std::process::id()));
    let mut lab = Lab {
        dirs: Vec::new(),
        file: std::env::temp_dir().join(format!("{}.bin", rel.display())),
    };
    let mut procs = Vec::new();
    for ctrl in ["cpu", "cpuacct", "memory", "blkio", "pids"] {
        let dir = layout.controller(ctrl).unwrap().join(&rel);
        if !lab.dirs.contains(&dir) {
            std::fs::create_dir(&dir).unwrap();
            lab.dirs.push(dir.clone());
            procs.push(dir.join("cgroup.procs"));
        }
    }
    let udir = unified.join(&rel);
    std::fs::create_dir(&udir).unwrap();
    lab.dirs.push(udir.clone());
    procs.push(udir.join("cgroup.procs"));
    let cpu = layout.controller("cpu").unwrap().join(&rel);
    let memory = layout.controller("memory").unwrap().join(&rel);
    std::fs::write(cpu.join("cpu.cfs_quota_us"), "20000").unwrap();
    std::fs::write(
        memory.join("memory.limit_in_bytes"),
        (32u64 << 20).to_string(),
    )
    .unwrap();
    // Swap accounting on: memory+swap at the same limit, a container without swap.
    let memsw = memory.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        std::fs::write(&memsw, (32u64 << 20).to_string()).unwrap();
    }
    std::fs::write(
        layout
            .controller("pids")
            .unwrap()
            .join(&rel)
            .join("pids.max"),
        "64",
    )
    .unwrap();

    let devices = DeviceFilter::new(Path::new("/"), &["loop".into(), "zram".into()]);
    let mut reader = CgroupReader::open(&layout, &rel, None, DetailOptions::ALL, false).unwrap();
    let mut scratch = Scratch::default();
    let before = reader.sample(&devices, true, &mut scratch).unwrap();
    println!("before: {:#?}\n{:#?}", before.details, before.limits);

    let join: String = procs
        .iter()
        .map(|p| format!("echo $$ > {};", p.display()))
        .collect();
    let script = format!(
        "{join} timeout 1 sh -c 'while :; do :; done'; \
         dd if=/dev/zero of={file} bs=64k count=16 oflag=direct 2>/dev/null; \
         python3 -c 'x = bytearray(100 << 20)'; exit 0",
        file = lab.file.display()
    );
    let status = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(status.success());
    let after = reader.sample(&devices, true, &mut scratch).unwrap();
    // What this kernel's files hold, for the README.
    for f in [
        memory.join("memory.failcnt"),
        memory.join("memory.memsw.failcnt"),
        memory.join("memory.oom_control"),
        memory.join("memory.kmem.usage_in_bytes"),
        cpu.join("cpu.stat"),
        udir.join("cpu.pressure"),
        udir.join("memory.pressure"),
        udir.join("io.pressure"),
    ] {
        println!("{}: {:?}", f.display(), std::fs::read_to_string(&f));
    }
    println!("after: {:#?}\n{:#?}", after.details, after.limits);

    let (b, a) = (&before.details, &after.details);
    let (tb, ta) = (b.throttling.unwrap(), a.throttling.unwrap());
    assert!(ta.periods >= tb.periods + 5, "{tb:?} {ta:?}");
    assert!(
        ta.throttled_periods >= tb.throttled_periods + 5,
        "{tb:?} {ta:?}"
    );
    // A 0.2-core quota held back ~0.8 s of the 1 s loop.
    assert!(
        ta.throttled_ns - tb.throttled_ns > 500_000_000,
        "{tb:?} {ta:?}"
    );
    let (cb, ca) = (b.pressure.cpu.unwrap(), a.pressure.cpu.unwrap());
    assert!(ca.some_us > cb.some_us + 300_000, "{cb:?} {ca:?}");
    assert!(ca.full_us.is_some(), "6.x kernels have cpu full");
    assert!(a.pressure.memory.is_some() && a.pressure.io.is_some());
    assert_eq!(
        a.memory_events.oom_kill.unwrap(),
        b.memory_events.oom_kill.unwrap() + 1,
        "one process killed"
    );
    // With memory+swap at the memory limit the charge fails on memsw first, and recent
    // kernels (6.18 here) keep no failcnt for memsw: the limit hit is not counted anywhere in v1.
    println!(
        "limit hits with memsw == memory limit: {:?} -> {:?}",
        b.memory_events.max, a.memory_events.max
    );
    // With room above the memory limit for memsw, the memory counter fails first: counted.
    if memsw.exists() {
        std::fs::write(&memsw, (64u64 << 20).to_string()).unwrap();
    }
    let oom = format!("{join} python3 -c 'x = bytearray(100 << 20)'; exit 0");
    assert!(Command::new("sh")
        .arg("-c")
        .arg(&oom)
        .status()
        .unwrap()
        .success());
    let last = reader.sample(&devices, true, &mut scratch).unwrap();
    println!(
        "memory.failcnt: {:?}",
        std::fs::read_to_string(memory.join("memory.failcnt"))
    );
    let l = &last.details.memory_events;
    assert_eq!(l.oom_kill.unwrap(), a.memory_events.oom_kill.unwrap() + 1);
    assert!(
        l.max.unwrap() > a.memory_events.max.unwrap(),
        "limit hit: {l:?}"
    );
    assert!(
        a.memory.kernel_bytes.is_some(),
        "this kernel has kmem usage"
    );
    assert!(a.memory.workingset_refaults.is_some() && a.memory.major_faults.is_some());
    let disk = a
        .details_device("vda")
        .expect("the writes' disk is listed by name");
    assert!(disk.write_bytes >= 1 << 20 && disk.writes >= 16, "{disk:?}");
    assert_eq!(
        (
            after.limits.cpu_quota_us,
            after.limits.cpu_period_us,
            after.limits.pids_max
        ),
        (Some(20000), Some(100000), Some(64))
    );
}

trait DeviceByName {
    fn details_device(&self, name: &str) -> Option<&lxcmon::readers::cgroup::details::DeviceIo>;
}

impl DeviceByName for lxcmon::readers::cgroup::details::Details {
    fn details_device(&self, name: &str) -> Option<&lxcmon::readers::cgroup::details::DeviceIo> {
        self.devices.iter().find(|d| &*d.name == name)
    }
}
