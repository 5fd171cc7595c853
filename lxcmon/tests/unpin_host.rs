//! A stopped container's kernel objects are let go when its init exits, not at the agent's
//! next cycle: a "container" made by the test (a cgroup of its own, a network, pid and mount
//! namespace whose init is chrooted into an ext4 loop disk, the host end of a veth pair
//! outside) is sampled once by the agent's sampler, which then holds its init's `net/dev`,
//! root and mountinfo; the init is killed and, with no further sample, the host's veth must
//! vanish and the loop device detach within a second. The cgroup files the sampler still holds
//! do not keep the container's cgroups from being removed.
//!
//! Root, a hybrid cgroup host, `unshare`, `chroot`, `ip`, `losetup`, `mkfs.ext4`, busybox;
//! run under the lab's lock:
//! `flock /tmp/lxcmon-root.lock cargo test -p lxcmon --test unpin_host -- --ignored --nocapture`.

use lxcmon::collect::discovery::{Discovered, Flavor, Runtime};
use lxcmon::collect::sample::{Options, Sampler};
use lxcmon::readers::cgroup::details::DetailOptions;
use lxcmon::readers::cgroup::Layout;
use lxcmon::readers::sysfs::DeviceFilter;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The test's cgroups, process, veth and disk, removed whatever happens.
struct Lab {
    dirs: Vec<PathBuf>,
    child: Option<Child>,
    veth: String,
    tmp: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .status();
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

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?}: {st}");
}

/// Whether a loop device is still attached to `img` (autoclear: until its last user).
fn attached(img: &Path) -> bool {
    let out = Command::new("losetup").arg("-j").arg(img).output().unwrap();
    assert!(out.status.success());
    !out.stdout.is_empty()
}

/// The process of `procs` that is pid 1 of its namespace.
fn ns_init(procs: &Path) -> Option<u32> {
    let list = std::fs::read_to_string(procs).ok()?;
    list.lines()
        .filter_map(|l| l.parse().ok())
        .find(|pid: &u32| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .and_then(|l| l.split_whitespace().last())
                    == Some("1")
            })
        })
}

/// Seconds from now until the veth is gone and until the loop device is detached, polled
/// every 10 ms; `None` for what is still there after `limit`.
fn both_gone(limit: Duration, veth: &Path, img: &Path) -> (Option<f64>, Option<f64>) {
    let t0 = Instant::now();
    let (mut v, mut d) = (None, None);
    while t0.elapsed() < limit && (v.is_none() || d.is_none()) {
        let now = Some(t0.elapsed().as_secs_f64());
        if v.is_none() && !veth.exists() {
            v = now;
        }
        if d.is_none() && !attached(img) {
            d = now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (v, d)
}

#[test]
#[ignore = "needs root, a hybrid cgroup host, unshare, ip, losetup, mkfs.ext4; run under the lab lock"]
fn a_stopped_containers_veth_and_disk_are_let_go_at_once() {
    assert!(rustix::process::geteuid().is_root(), "needs root");
    let layout = Layout::detect(Path::new("/")).unwrap();
    let me = std::process::id();
    let rel = PathBuf::from(format!("lxcmt-unpin-{me}"));
    let tmp = tempfile::Builder::new()
        .prefix("lxcmon-unpin-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut lab = Lab {
        dirs: Vec::new(),
        child: None,
        veth: format!("lxcmt-{me}"),
        tmp,
    };
    let mut procs = Vec::new();
    let mut dirs: Vec<PathBuf> = ["cpu", "cpuacct", "memory", "blkio", "pids"]
        .iter()
        .filter_map(|c| Some(layout.controller(c)?.join(&rel)))
        .collect();
    dirs.extend(layout.unified.as_ref().map(|u| u.join(&rel)));
    for dir in dirs {
        if !lab.dirs.contains(&dir) {
            std::fs::create_dir(&dir).unwrap();
            procs.push(dir.join("cgroup.procs"));
            lab.dirs.push(dir);
        }
    }
    let primary = layout.primary().unwrap().join(&rel);

    let dir = lab.tmp.path().to_path_buf();
    let img = dir.join("root.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0"])
        .arg(&img)
        .stdout(Stdio::null()));
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // The init: pid 1 of new pid, network and mount namespaces, chrooted into the loop disk.
    let join: String = procs
        .iter()
        .map(|p| format!("echo $$ > {};", p.display()))
        .collect();
    let inner = format!(
        "set -e; mount -o loop {img} {mnt}; cp /bin/busybox {mnt}/busybox; \
         exec chroot {mnt} /busybox sleep 600",
        img = img.display(),
        mnt = mnt.display()
    );
    let script = format!(
        "{join} exec unshare --mount --propagation private --net --pid --fork --kill-child \
         sh -c '{inner}'"
    );
    lab.child = Some(Command::new("sh").arg("-c").arg(&script).spawn().unwrap());
    let procs_file = primary.join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let init = loop {
        let ready = ns_init(&procs_file).filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"/busybox\0sleep"))
        });
        if let Some(pid) = ready {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace's init did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(attached(&img));
    run(Command::new("ip").args([
        "link",
        "add",
        &lab.veth,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &init.to_string(),
    ]));
    let host_veth = PathBuf::from(format!("/sys/class/net/{}", lab.veth));
    assert!(host_veth.exists());

    let options = Options {
        swap: true,
        network: true,
        filesystem: true,
        per_interface: true,
        per_mount: true,
        details: DetailOptions::NONE,
        workers: 1,
        retry_limit: 0,
        retry_delay: Duration::ZERO,
        net_files: true,
        io_files: true,
    };
    let mut sampler = Sampler::new(Path::new("/"), layout, DeviceFilter::none(), options);
    let found = Discovered {
        id: "unpin".into(),
        name: "unpin".into(),
        rel: rel.clone(),
        flavor: Flavor::Lxc,
        runtime: Runtime::Lxc,
        project: None,
        instance: std::fs::metadata(&primary).unwrap().ino(),
    };
    let sampled = sampler.sample(std::slice::from_ref(&found));
    assert_eq!(sampled.containers.len(), 1, "{sampled:?}");
    let s = &sampled.containers[0];
    // The sampler read the container through its init: its interface, its disk.
    let names: Vec<_> = s.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["eth0"], "{s:?}");
    assert!(
        s.fs.total > 8 << 20 && s.fs.total <= 16 << 20,
        "the root is the 16 MiB disk: {:?}",
        s.fs
    );

    // The container stops; no cycle runs.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(init as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let (veth, disk) = both_gone(Duration::from_secs(3), &host_veth, &img);
    println!("after the init's exit: veth gone in {veth:?} s, loop device detached in {disk:?} s");
    if veth.is_none() || disk.is_none() {
        // How long they would stay: until the next cycle lets go of the files.
        drop(sampler);
        let (veth_after, disk_after) = both_gone(Duration::from_secs(10), &host_veth, &img);
        panic!(
            "the stopped container's objects were held by the sampler: veth {veth:?}, disk \
             {disk:?} (then gone {veth_after:?} / {disk_after:?} s after the sampler closed \
             its files)"
        );
    }
    assert!(veth.unwrap() < 1.0 && disk.unwrap() < 1.0);

    // The sampler still holds the container's cgroup files (v1 controllers, unified tree):
    // they pin nothing, its cgroups are removed at the first try once empty.
    let empty = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&procs_file)
        .unwrap()
        .trim()
        .is_empty()
    {
        assert!(
            Instant::now() < empty,
            "the container's processes did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for d in lab.dirs.iter().rev() {
        if let Err(e) = std::fs::remove_dir(d) {
            panic!("rmdir {} with its files held: {e}", d.display());
        }
    }

    // The next cycle finds it gone: the container is skipped, not an error.
    let sampled = sampler.sample(std::slice::from_ref(&found));
    assert_eq!(
        (sampled.containers.len(), sampled.skipped, sampled.failed),
        (0, 1, 0)
    );
}
