//! The daemon as a service, on a fixture tree: `/metrics` scraped over loopback and parsed by
//! the Prometheus project's own Python parser, and SIGHUP configuration reloads.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn signal(child: &Running, sig: rustix::process::Signal) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        sig,
    )
    .unwrap();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A plain HTTP/1.1 GET over loopback; returns (status line, headers, body).
fn get(port: u16, path: &str, accept: Option<&str>) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Parses an exposition with prometheus_client (Debian's python3-prometheus-client) and
/// prints `name|labels-json|value` per sample.
fn parse_with_prometheus_client(body: &str, openmetrics: bool) -> Vec<(String, Value, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, body).unwrap();
    let parser = if openmetrics {
        "from prometheus_client.openmetrics.parser import text_string_to_metric_families"
    } else {
        "from prometheus_client.parser import text_string_to_metric_families"
    };
    let script = format!(
        "import json, sys\n{parser}\nfor fam in text_string_to_metric_families(open(sys.argv[1]).read()):\n    for s in fam.samples:\n        print(s.name + '|' + json.dumps(s.labels) + '|' + repr(float(s.value)))\n"
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script, file.to_str().unwrap()])
        .output()
        .expect(
            "python3 with prometheus_client (cargo xtask test installs python3-prometheus-client)",
        );
    assert!(
        out.status.success(),
        "the parser rejected the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut p = l.splitn(3, '|');
            let name = p.next().unwrap().to_string();
            let labels: Value = serde_json::from_str(p.next().unwrap()).unwrap();
            let value: f64 = p.next().unwrap().parse().unwrap();
            (name, labels, value)
        })
        .collect()
}

fn write_config(path: &Path, dir: &Path, extra: &str) {
    std::fs::write(
        path,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  check_interval: 0.1\n  export_file: {}\n{extra}",
            dir.join("agent.log").display(),
            dir.join("metrics.json").display(),
        ),
    )
    .unwrap();
}

#[test]
#[ignore = "needs python3-prometheus-client: run by cargo xtask test"]
fn metrics_endpoint_parses_in_both_formats_with_odd_names() {
    let t = proxmox_v2();
    // A hostname with every character the label escaping must handle.
    t.file("etc/pve/lxc/101.conf", "hostname: db \"primary\" \\ eu\n");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    let port = free_port();
    write_config(
        &cfg,
        dir.path(),
        &format!("  prometheus_listen: 127.0.0.1:{port}\n"),
    );
    let mut child = Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            t.root().to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_until("a scrape with container figures", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && get(port, "/metrics", None)
                .2
                .contains("lxcmon_container_memory_bytes{")
    });

    let (status, headers, body) = get(port, "/metrics", None);
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let samples = parse_with_prometheus_client(&body, false);
    let find = |samples: &[(String, Value, f64)], name: &str, id: &str| {
        samples
            .iter()
            .find(|(n, l, _)| n == name && l["container_id"] == id)
            .unwrap_or_else(|| panic!("{name} for {id} missing"))
            .clone()
    };
    let mem = find(&samples, "lxcmon_container_memory_bytes", "100");
    assert_eq!(mem.2, (200 * MIB) as f64);
    assert_eq!(mem.1["container_name"], "web-100");
    let odd = find(&samples, "lxcmon_container_processes", "101");
    assert_eq!(
        odd.1["container_name"], "db \"primary\" \\ eu",
        "escaping round-trips"
    );
    assert_eq!(
        find(&samples, "lxcmon_container_cpu_seconds_total", "100").2,
        5.0
    );
    assert_eq!(
        find(&samples, "lxcmon_container_io_written_bytes_total", "100").2,
        1048576.0
    );
    assert!(samples
        .iter()
        .any(|(n, l, v)| n == "lxcmon_collector_info" && l["collector"] == "files" && *v == 1.0));
    assert!(samples
        .iter()
        .any(|(n, _, v)| n == "lxcmon_containers_running" && *v == 3.0));

    let (_, headers, body) = get(
        port,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    let om = parse_with_prometheus_client(&body, true);
    assert_eq!(
        find(&om, "lxcmon_container_network_receive_bytes_total", "100").2,
        5000.0
    );
    assert_eq!(
        find(&om, "lxcmon_container_processes", "101").1["container_name"],
        "db \"primary\" \\ eu"
    );

    let (status, _, body) = get(port, "/healthz", None);
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
    assert!(get(port, "/nope", None).0.contains("404"));

    // Concurrent scrapes while the loop runs at 0.1 s.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..5).all(|_| get(port, "/metrics", None).0.contains("200"))
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
}

#[test]
fn sighup_applies_a_valid_config_and_rejects_an_invalid_one() {
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    write_config(&cfg, dir.path(), "  max_metrics_entries: 50\n");
    let export = dir.path().join("metrics.json");
    let mut child = Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            t.root().to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let records = || -> Vec<Value> {
        std::fs::read(&export)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    };
    wait_until("a few cycles", || records().len() >= 6);
    assert!(records().iter().all(|r| r["network_received_bytes"] != 0));

    // Valid: network off, fewer cycles kept. History is kept (trimmed), CPU baselines too:
    // the very next cycle exports both containers again.
    write_config(
        &cfg,
        dir.path(),
        "  max_metrics_entries: 4\n  enable_network: false\n",
    );
    signal(&child, rustix::process::Signal::HUP);
    wait_until("network figures off", || {
        records()
            .last()
            .is_some_and(|r| r["network_received_bytes"] == 0)
    });
    wait_until("retention of 4 cycles", || {
        let r = records();
        let cycles: std::collections::BTreeSet<_> =
            r.iter().map(|x| x["timestamp"].to_string()).collect();
        cycles.len() == 4 && r.len() == 8
    });

    // Invalid: rejected with the reason, the running configuration stays.
    std::fs::write(&cfg, "monitoring:\n  check_interval: 0\n").unwrap();
    signal(&child, rustix::process::Signal::HUP);
    let log = dir.path().join("agent.log");
    wait_until("the rejection in the log", || {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.contains("configuration reload rejected") && l.contains("check_interval")
        })
    });
    let before = records().last().map(|r| r["timestamp"].clone());
    wait_until("cycles going on", || {
        records().last().map(|r| r["timestamp"].clone()) != before
    });
    assert!(child.try_wait().unwrap().is_none(), "still running");
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
    assert_eq!(records().len(), 8);
}

/// Sockets the process holds open (its descriptors that are sockets).
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|f| {
                    std::fs::read_link(f.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Whether the server closed this connection (EOF or reset) within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn idle_connections_are_bounded_and_timed_out() {
    const BOUND: usize = 64;
    const IDLE: usize = 150;
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    let port = free_port();
    write_config(
        &cfg,
        dir.path(),
        &format!("  prometheus_listen: 127.0.0.1:{port}\n"),
    );
    let export = dir.path().join("metrics.json");
    let mut child = Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            t.root().to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_until("/metrics answering", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && get(port, "/metrics", None).0.contains("200")
    });
    let baseline = open_sockets(child.id());

    // A kept-alive scrape connection, then left idle.
    let mut kept = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(kept, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    // Idle sockets that never send a byte, and one that sends half a header.
    let mut idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    let mut slow = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(slow, "GET /metrics HTTP/1.1\r\nHost: loc").unwrap();
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let held = open_sockets(child.id()) - baseline;
    assert!(
        held <= BOUND,
        "{held} connections held, the bound is {BOUND}"
    );
    // The excess was closed at once.
    let refused = idle
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(20)))
        .filter(|&closed| closed)
        .count();
    // The kept-alive connection holds one slot; the half-header one came last.
    assert!(refused >= IDLE + 1 - BOUND, "only {refused} refused");
    // The collection goes on meanwhile.
    let cycles = |_: ()| std::fs::read(&export).map(|b| b.len()).unwrap_or(0);
    let size = cycles(());
    wait_until("cycles exported during the flood", || cycles(()) != size);

    // Every idle one is closed by the header-read timeout, the kept-alive one too.
    for s in idle.iter_mut().chain([&mut kept, &mut slow]) {
        assert!(closed_within(s, Duration::from_secs(12)), "still open");
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    wait_until("descriptors released", || {
        open_sockets(child.id()) <= baseline
    });
    let (status, _, body) = get(port, "/metrics", None);
    assert!(status.contains("200") && body.contains("lxcmon_container_memory_bytes{"));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
}

/// Cycle start times (milliseconds since the epoch) of a `records` export, oldest first.
fn cycle_times(export: &Path) -> Vec<i64> {
    let records: Vec<Value> = std::fs::read(export)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut times: Vec<i64> = records
        .iter()
        .filter_map(|r| r["timestamp"].as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_millis())
        .collect();
    times.dedup();
    times
}

/// No cycle missing: consecutive cycles of a 0.1 s interval are at most 0.25 s apart.
fn assert_no_gap(times: &[i64]) {
    for w in times.windows(2) {
        assert!(w[1] > w[0] && w[1] - w[0] <= 250, "gap or disorder: {w:?}");
    }
}

#[test]
fn export_interval_writes_the_cycles_together_and_loses_none() {
    use std::os::unix::fs::MetadataExt;
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.yaml");
    write_config(&cfg, dir.path(), "  export_interval: 1\n");
    let export = dir.path().join("metrics.json");
    let mut child = Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            t.root().to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    wait_until("a first export", || export.exists());
    // Watch the file for 3.5 s: every rewrite is a new inode.
    let mut inodes = std::collections::BTreeSet::new();
    let end = std::time::Instant::now() + Duration::from_millis(3500);
    while std::time::Instant::now() < end {
        if let Ok(m) = std::fs::metadata(&export) {
            inodes.insert(m.ino());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        (3..=6).contains(&inodes.len()),
        "{} rewrites in 3.5 s at export_interval 1 s (0.1 s cycles)",
        inodes.len()
    );
    let written = cycle_times(&export);
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
    // The stop writes what was queued: more cycles than the last rewrite had, none missing.
    let all = cycle_times(&export);
    assert!(
        all.len() > written.len(),
        "{} vs {}",
        all.len(),
        written.len()
    );
    assert!(all.len() >= 35, "{} cycles", all.len());
    assert_no_gap(&all);
}

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let v = rustix::fs::statvfs(path).unwrap();
    v.f_bavail * v.f_frsize
}

#[test]
#[ignore = "root: mounts a small tmpfs in a mount namespace of its own (cargo xtask test)"]
fn a_full_export_filesystem_skips_writes_once_warned_and_loses_nothing() {
    let t = proxmox_v2();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("varlog");
    std::fs::create_dir(&mnt).unwrap();
    let cfg = dir.path().join("cfg.yaml");
    let log = dir.path().join("agent.log");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  check_interval: 0.1\n  export_file: {}\n  \
             max_metrics_entries: 100000\n",
            log.display(),
            mnt.join("metrics.json").display(),
        ),
    )
    .unwrap();
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "{}  prometheus_listen: 127.0.0.1:{port}\n",
            std::fs::read_to_string(&cfg).unwrap()
        ),
    )
    .unwrap();
    // A 1 MiB tmpfs (log2ram's /var/log in small), seen only by the agent.
    let bin = env!("CARGO_BIN_EXE_lxcmon");
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs {m} && head -c 860000 /dev/zero > {m}/filler && exec {bin} --config {c} --root {r}",
        m = mnt.display(),
        c = cfg.display(),
        r = t.root().display(),
    );
    let mut child = Running(
        std::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The agent's view of the tmpfs.
    let inside = std::path::PathBuf::from(format!("/proc/{}/root{}", child.id(), mnt.display()));
    let export = inside.join("metrics.json");
    let scrape = |name: &str| -> f64 {
        let body = get(port, "/metrics", None).2;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    wait_until("/metrics answering", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    wait_until("writes skipped for lack of space", || {
        scrape("lxcmon_export_writes_skipped_total") >= 5.0
    });
    let reserve = 1024 * 1024 / 20;
    assert!(free_bytes(&inside) >= reserve, "the reserve is kept free");
    let warned = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        warned.matches("not enough free space").count(),
        1,
        "one warning for the condition, not one per cycle"
    );
    let before = cycle_times(&export);
    assert_no_gap(&before);
    // Space again: the next write has every cycle, those queued while skipping included.
    std::fs::remove_file(inside.join("filler")).unwrap();
    wait_until("a write after the space came back", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("enough free space again"))
    });
    let after = cycle_times(&export);
    assert!(after.len() > before.len() + 5);
    assert_eq!(&after[..before.len()], &before[..]);
    assert_no_gap(&after);
    assert!(scrape("lxcmon_export_bytes_written_total") > 0.0);
    signal(&child, rustix::process::Signal::TERM);
    assert!(child.wait().unwrap().success());
}
