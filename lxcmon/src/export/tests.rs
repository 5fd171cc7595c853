//! Tests of `export`.

use super::*;
use crate::collect::sample::FsUsage;
use crate::derive::ContainerMetrics;
use chrono::{TimeZone, Utc};

pub fn metrics(id: &str, seed: u64) -> ContainerMetrics {
    ContainerMetrics {
        id: id.into(),
        name: format!("{id}-name"),
        started: Utc.timestamp_opt(1_700_000_000 - 3600, 0).unwrap(),
        cpu_percent: 12.345,
        cpu_cores_allowed: 2.0,
        cpu_usage_ns: 1_500_000_000,
        memory_bytes: 512 * 1024 * 1024 + seed,
        memory_limit_bytes: 1 << 30,
        swap_bytes: 3 * 1024 * 1024,
        swap_limit_bytes: 512 * 1024 * 1024,
        io_read_bytes: 1024 * seed,
        io_write_bytes: 2048 * seed,
        net_rx_bytes: 100 + seed,
        net_tx_bytes: 200 + seed,
        fs: FsUsage {
            total: 10 << 30,
            used: 4 << 30,
            free: 5 << 30,
        },
        processes: 7,
        threads: 9,
        runtime: crate::collect::discovery::Runtime::Lxc,
        project: None,
        limits: Default::default(),
        details: Default::default(),
        interfaces: Vec::new(),
        mounts: Vec::new(),
        latency: None,
    }
}

/// A container with every figure of the details present: pressure (cpu without `full`),
/// throttling, limits, events, breakdown, two interfaces, one device, two mounts.
pub fn metrics_full(id: &str) -> ContainerMetrics {
    use crate::readers::cgroup::details::*;
    use crate::readers::cgroup::Limits;
    use crate::readers::mounts::MountUsage;
    use crate::readers::procfs::InterfaceCounters;
    let mut m = metrics(id, 1);
    m.runtime = crate::collect::discovery::Runtime::Incus;
    m.project = Some("p2".into());
    m.limits = Limits {
        cpu_quota_cores: Some(0.5),
        cpuset_cpus: Some(2),
        memory_bytes: Some(64 << 20),
        swap_bytes: None,
        cpu_quota_us: Some(50_000),
        cpu_period_us: Some(100_000),
        memory_high_bytes: None,
        pids_max: Some(512),
    };
    m.details = Details {
        pressure: Pressure {
            cpu: Some(Stall {
                some_us: 2_500_000,
                full_us: None,
            }),
            memory: Some(Stall {
                some_us: 1_000,
                full_us: Some(500),
            }),
            io: None,
        },
        throttling: Some(Throttling {
            periods: 100,
            throttled_periods: 50,
            throttled_ns: 2_000_000_000,
        }),
        memory_events: MemoryEvents {
            max: Some(7),
            oom: Some(2),
            oom_kill: Some(2),
            ..Default::default()
        },
        memory: MemoryBreakdown {
            anon_bytes: Some(1 << 20),
            file_bytes: Some(2 << 20),
            workingset_refaults: Some(3),
            ..Default::default()
        },
        devices: vec![DeviceIo {
            dev: (8, 0),
            name: "sda".into(),
            read_bytes: 4096,
            write_bytes: 8192,
            reads: 1,
            writes: 2,
        }],
    };
    m.interfaces = ["eth0", "eth1"]
        .iter()
        .enumerate()
        .map(|(i, n)| InterfaceCounters {
            name: (*n).into(),
            rx_bytes: 1000 * (i as u64 + 1),
            rx_packets: 10,
            tx_bytes: 500,
            tx_packets: 5,
            ..Default::default()
        })
        .collect();
    m.mounts = vec![
        MountUsage {
            mountpoint: "/".into(),
            fstype: "ext4".into(),
            source: "/dev/sda1".into(),
            dev: (8, 1),
            size_bytes: 10 << 30,
            used_bytes: 1 << 30,
            avail_bytes: 8 << 30,
            inodes: 1000,
            inodes_free: 900,
            shared: true,
        },
        MountUsage {
            mountpoint: "/mnt/data \"quoted\"".into(),
            fstype: "ext4".into(),
            source: "/dev/loop3".into(),
            dev: (7, 3),
            size_bytes: 64 << 20,
            used_bytes: 1 << 20,
            avail_bytes: 60 << 20,
            inodes: 128,
            inodes_free: 117,
            shared: false,
        },
    ];
    m
}

pub fn cycle(secs: i64, ids: &[&str]) -> Cycle {
    let t = Utc
        .timestamp_opt(1_700_000_000 + secs, 123_456_000)
        .single()
        .unwrap();
    Cycle {
        started: t,
        ended: t + chrono::Duration::milliseconds(5),
        metrics: ids
            .iter()
            .enumerate()
            .map(|(i, id)| metrics(id, i as u64 + secs as u64))
            .collect(),
        total_containers: ids.len() + 1,
        failed_containers: 0,
        collector: "files",
        bpf_fallback: Default::default(),
        host_cpu_percent: 3.5,
        agent_rss_bytes: 8 * 1024 * 1024,
        subsecond: false,
    }
}

fn parse(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn retention_keeps_the_newest_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    for format in [ExportFormat::Records, ExportFormat::AutoscaleMl] {
        let mut e = Exporter::open(&path, format, 3).unwrap();
        for i in 0..5 {
            assert!(e.push(&cycle(i, &["100", "101"])));
        }
        assert!(
            !e.push(&cycle(9, &[])),
            "a cycle without containers writes nothing"
        );
        e.write().unwrap();
        let v = parse(&path);
        let arr = v.as_array().unwrap();
        match format {
            ExportFormat::Records => {
                assert_eq!(arr.len(), 6, "3 cycles x 2 containers");
                assert_eq!(arr[0]["timestamp"], "2023-11-14T22:13:22Z");
                assert_eq!(arr[5]["timestamp"], "2023-11-14T22:13:24Z");
            }
            ExportFormat::AutoscaleMl => {
                assert_eq!(arr.len(), 3);
                assert_eq!(arr[2]["summary"]["collected_containers"], 2);
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn history_is_read_back_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    for format in [ExportFormat::Records, ExportFormat::AutoscaleMl] {
        let mut e = Exporter::open(&path, format, 10).unwrap();
        e.push(&cycle(0, &["a", "b"]));
        e.push(&cycle(1, &["a"]));
        e.write().unwrap();
        let before = std::fs::read(&path).unwrap();
        let mut again = Exporter::open(&path, format, 10).unwrap();
        assert_eq!(again.cycles(), 2, "{format:?}");
        again.write().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), before, "{format:?}");
        again.push(&cycle(2, &["a"]));
        again.write().unwrap();
        assert_eq!(Exporter::open(&path, format, 2).unwrap().cycles(), 2);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn unparsable_or_foreign_file_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    for (content, format) in [
        ("[{\"truncated\": ", ExportFormat::Records),
        ("{\"not\": \"an array\"}", ExportFormat::Records),
        ("[{\"a\": 1}]", ExportFormat::Records),
        ("[1, 2]", ExportFormat::AutoscaleMl),
    ] {
        std::fs::write(&path, content).unwrap();
        let e = Exporter::open(&path, format, 10).unwrap();
        assert_eq!(e.cycles(), 0);
        assert!(!path.exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|f| {
                f.file_name()
                    .to_string_lossy()
                    .starts_with("m.json.corrupt-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "{content}");
        assert_eq!(
            std::fs::read_to_string(aside[0].path()).unwrap(),
            content,
            "kept intact"
        );
        std::fs::remove_file(aside[0].path()).unwrap();
    }
    // A records history is not an autoscale_ml one: switching formats keeps the old file.
    let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
    e.push(&cycle(0, &["a"]));
    e.write().unwrap();
    assert_eq!(
        Exporter::open(&path, ExportFormat::AutoscaleMl, 10)
            .unwrap()
            .cycles(),
        0
    );
    assert!(!path.exists());
}

#[test]
fn failed_write_keeps_the_old_file_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("m.json");
    let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
    e.push(&cycle(0, &["a"]));
    e.write().unwrap();
    let before = std::fs::read(&path).unwrap();
    std::fs::rename(&sub, dir.path().join("moved")).unwrap();
    e.push(&cycle(1, &["a"]));
    let err = e.write().unwrap_err();
    assert!(err.to_string().contains("m.json"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("moved/m.json")).unwrap(),
        before
    );
    std::fs::create_dir(&sub).unwrap();
    e.write().unwrap();
    assert_eq!(
        parse(&path).as_array().unwrap().len(),
        2,
        "the retry writes both cycles"
    );
}

#[test]
fn rewrite_keeps_mode_owner_and_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (_dir, path, mut e) = one_cycle_written();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Group 4 (adm on Debian) when we may change it, else our own group: either way the
    // test sees whether the rewrite kept what was there.
    let gid = if rustix::process::geteuid().is_root() {
        4
    } else {
        rustix::process::getegid().as_raw()
    };
    std::os::unix::fs::chown(&path, None, Some(gid)).unwrap();
    let before = std::fs::metadata(&path).unwrap();
    e.push(&cycle(1, &["a"]));
    e.write().unwrap();
    let after = std::fs::metadata(&path).unwrap();
    assert_ne!(before.ino(), after.ino(), "a new file was renamed in");
    assert_eq!(after.mode() & 0o7777, 0o640);
    assert_eq!((after.uid(), after.gid()), (before.uid(), gid));
}

#[test]
fn stale_temporary_files_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    let dead = dir.path().join(".m.json.tmp-999999999");
    let init = dir.path().join(".m.json.tmp-1");
    let other = dir.path().join(".other.json.tmp-999999999");
    let not_ours = dir.path().join(".m.json.tmp-backup");
    for f in [&dead, &init, &other, &not_ours] {
        std::fs::write(f, "[").unwrap();
    }
    let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
    assert!(
        !dead.exists() && !init.exists(),
        "temporaries of dead or other processes"
    );
    assert!(
        other.exists() && not_ours.exists(),
        "only our own naming pattern"
    );
    e.push(&cycle(0, &["a"]));
    e.write().unwrap();
    assert_eq!(parse(&path).as_array().unwrap().len(), 1);
}

#[test]
fn set_aside_files_never_overwrite_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    let contents = ["[{\"first\": ", "[{\"second\": ", "[{\"third\": "];
    // Within the same second (three opens take microseconds).
    for c in contents {
        std::fs::write(&path, c).unwrap();
        Exporter::open(&path, ExportFormat::Records, 10).unwrap();
    }
    let mut kept: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|f| {
            f.file_name()
                .to_string_lossy()
                .starts_with("m.json.corrupt-")
        })
        .map(|f| std::fs::read_to_string(f.path()).unwrap())
        .collect();
    kept.sort();
    let mut want: Vec<String> = contents.iter().map(|c| c.to_string()).collect();
    want.sort();
    assert_eq!(kept, want, "every set-aside file kept intact");
}

#[test]
fn errors_print_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be: reading it back fails with EISDIR.
    let err = Exporter::open(dir.path(), ExportFormat::Records, 10).unwrap_err();
    let shown = crate::logging::Chain(&err).to_string();
    assert_eq!(shown.matches("os error 21").count(), 1, "{shown}");
    assert!(shown.contains(&dir.path().display().to_string()), "{shown}");
}

/// Log lines written while `f` runs, through a subscriber of the test's own.
pub fn captured_log(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = sink.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn summary_name_is_warned_about_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    let log = captured_log(|| {
        let mut e = Exporter::open(&path, ExportFormat::AutoscaleMl, 10).unwrap();
        for i in 0..4 {
            e.push(&cycle(i, &["100", "summary"]));
            e.write().unwrap();
        }
    });
    assert_eq!(log.matches("\"summary\"").count(), 1, "{log}");
    assert_eq!(parse(&path).as_array().unwrap().len(), 4);
}

#[test]
fn rewrites_from_the_file_equal_a_document_of_the_retained_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    for format in [ExportFormat::Records, ExportFormat::AutoscaleMl] {
        let mut e = Exporter::open(&path, format, 3).unwrap();
        let cycles: Vec<Cycle> = (0..7).map(|i| cycle(i, &["a", "b"])).collect();
        for (i, c) in cycles.iter().enumerate() {
            e.push(c);
            // Sometimes two cycles per write, as with export_interval.
            if i % 3 != 1 {
                assert!(matches!(e.write().unwrap(), Written::Bytes(_)));
                assert_eq!(e.unwritten(), 0, "nothing kept in memory after a write");
            }
            let first = (i + 1).saturating_sub(3);
            let mut want = Vec::new();
            file::write_document(
                &mut want,
                cycles[first..=i]
                    .iter()
                    .map(|c| encode(format, c, Vec::new()).unwrap().0)
                    .collect::<Vec<_>>()
                    .iter()
                    .map(Vec::as_slice),
            )
            .unwrap();
            if e.unwritten() == 0 {
                assert_eq!(std::fs::read(&path).unwrap(), want, "{format:?} cycle {i}");
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn a_foreign_layout_is_continued_from_its_own_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    // Pretty-printed, as Python's json.dump(indent=4) writes.
    let old: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::from_slice(
                &encode(ExportFormat::Records, &cycle(i, &["a"]), Vec::new())
                    .unwrap()
                    .0,
            )
            .unwrap()
        })
        .collect();
    std::fs::write(&path, serde_json::to_string_pretty(&old).unwrap()).unwrap();
    let mut e = Exporter::open(&path, ExportFormat::Records, 3).unwrap();
    assert_eq!(e.cycles(), 3);
    e.push(&cycle(3, &["a"]));
    e.write().unwrap();
    let got = parse(&path);
    let ts: Vec<_> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["timestamp"].clone())
        .collect();
    assert_eq!(ts.len(), 3);
    assert_eq!(ts[0], old[1]["timestamp"]);
    assert_eq!(got[1], old[2], "kept as it was");
    assert_eq!(ts[2], "2023-11-14T22:13:23Z");
}

#[test]
fn a_file_truncated_in_place_restarts_the_history() {
    let (_dir, path, mut e) = one_cycle_written();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    e.push(&cycle(1, &["a"]));
    e.write().unwrap();
    let v = parse(&path);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["timestamp"], "2023-11-14T22:13:21Z");
}

#[test]
fn document_of_one_cycle() {
    let doc = document(ExportFormat::Records, &cycle(0, &["a", "b"]));
    let v: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let empty: serde_json::Value =
        serde_json::from_slice(&document(ExportFormat::AutoscaleMl, &cycle(0, &[]))).unwrap();
    assert_eq!(empty, serde_json::json!([]));
}

/// A records export in a temporary directory with one cycle written.
fn one_cycle_written() -> (tempfile::TempDir, PathBuf, Exporter) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.json");
    let mut e = Exporter::open(&path, ExportFormat::Records, 10).unwrap();
    e.push(&cycle(0, &["a"]));
    e.write().unwrap();
    (dir, path, e)
}
