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
fn try_get(
    port: u16,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(String, String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_string(), headers.to_lowercase(), body.to_string()))
}

/// Whether the agent still runs and the end of its log and stderr: what a failed scrape needs
/// to say (it is either a server bug or an agent that died).
fn agent_state(agent: &Running, log: &Path) -> String {
    let alive = Path::new(&format!("/proc/{}/status", agent.id())).exists();
    let text = std::fs::read_to_string(log).unwrap_or_default()
        + &std::fs::read_to_string(log.with_extension("stderr")).unwrap_or_default();
    let mut tail: Vec<&str> = text.lines().rev().take(30).collect();
    tail.reverse();
    format!(
        "agent process alive: {alive}; its log ends:\n{}",
        tail.join("\n")
    )
}

/// [`try_get`] that fails the test with [`agent_state`].
fn get_from(
    agent: &Running,
    log: &Path,
    port: u16,
    path: &str,
    accept: Option<&str>,
) -> (String, String, String) {
    try_get(port, path, accept)
        .unwrap_or_else(|e| panic!("GET {path}: {e}; {}", agent_state(agent, log)))
}

/// A GET that fails the test on any I/O error.
fn get(port: u16, path: &str, accept: Option<&str>) -> (String, String, String) {
    try_get(port, path, accept).unwrap_or_else(|e| panic!("GET {path}: {e}"))
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
    let log = dir.path().join("agent.log");
    let mut child = Running(
        agent(&[
            "--config",
            cfg.to_str().unwrap(),
            "--root",
            t.root().to_str().unwrap(),
        ])
        .stderr(std::fs::File::create(log.with_extension("stderr")).unwrap())
        .spawn()
        .unwrap(),
    );
    let get = |path: &str, accept: Option<&str>| get_from(&child, &log, port, path, accept);
    wait_until("a scrape with container figures", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && get("/metrics", None)
                .2
                .contains("lxcmon_container_memory_bytes{")
    });

    let (status, headers, body) = get("/metrics", None);
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
    // The identity to join on, in pve-exporter's form.
    let info = find(&samples, "lxcmon_container_info", "100");
    assert_eq!(
        (info.1["runtime"].as_str(), info.1["id"].as_str(), info.2),
        (Some("proxmox"), Some("lxc/100"), 1.0)
    );

    let (_, headers, body) = get(
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
    assert_eq!(
        find(&om, "lxcmon_container_info", "101").1["id"],
        "lxc/101",
        "an info family in OpenMetrics"
    );

    let (status, _, body) = get("/healthz", None);
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
    assert!(get("/nope", None).0.contains("404"));

    // Concurrent scrapes while the loop runs at 0.1 s.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| try_get(port, "/metrics", None).map(|r| r.0))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for r in h.join().unwrap() {
            match r {
                Ok(status) => assert!(status.contains("200"), "{status}"),
                Err(e) => panic!(
                    "concurrent GET /metrics: {e}; {}",
                    agent_state(&child, &log)
                ),
            }
        }
    }
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
    let mut child = daemon_on(&cfg, t.root());
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

// --- Start-up, stop and systemd (issue 11, item 7) ---

use rustix::fs::{FileType, Mode, OFlags};
use rustix::process::Signal;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// A named pipe: the agent's read of it blocks until the test writes it, which is how the
/// tests hold the agent inside slow work (a BPF load, a hung /etc/pve) for as long as they want.
fn fifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

/// Waits until the agent has `path` open for reading (it is then blocked reading it) and
/// returns the write end; writing and dropping it lets the agent go on.
fn blocked_reader(path: &Path, child: &mut Running) -> OwnedFd {
    for _ in 0..1000 {
        match rustix::fs::open(
            path,
            OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => return fd,
            Err(rustix::io::Errno::NXIO) => {}
            Err(e) => panic!("{}: {e}", path.display()),
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the agent ended ({status}) before it read {}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("the agent never opened {}", path.display());
}

fn release(fd: OwnedFd, content: &str) {
    rustix::io::write(&fd, content.as_bytes()).unwrap();
}

/// Waits for the agent to end, at most `limit`; `None` if it is still running then.
fn exit_within(child: &mut Running, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// The signals the process catches, from /proc (bit n-1 for signal n).
fn caught(child: &Running) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn catches_stop_and_reload(child: &Running) -> bool {
    let bits = [Signal::HUP, Signal::TERM, Signal::INT]
        .iter()
        .fold(0u64, |m, s| m | 1 << (s.as_raw() - 1));
    caught(child) & bits == bits
}

struct Agent {
    tree: Tree,
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

impl Agent {
    fn new(extra: &str) -> Self {
        let tree = proxmox_v2();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg.yaml");
        write_config(&cfg, dir.path(), extra);
        Self { tree, dir, cfg }
    }

    fn command(&self) -> std::process::Command {
        let mut c = agent(&[
            "--config",
            self.cfg.to_str().unwrap(),
            "--root",
            self.tree.root().to_str().unwrap(),
        ]);
        c.stderr(Stdio::null());
        c
    }

    fn spawn(&self) -> Running {
        Running(self.command().spawn().unwrap())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn export(&self) -> PathBuf {
        self.dir.path().join("metrics.json")
    }

    fn cycles(&self) -> usize {
        std::fs::read(self.export())
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.as_array().cloned())
            .map(|r| {
                r.iter()
                    .map(|x| x["timestamp"].to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .unwrap_or(0)
    }

    /// A Proxmox container `vmid` (a copy of 100) whose configuration file is a FIFO, as a hung
    /// pmxcfs: the first cycle that sees it blocks reading its name.
    fn hung_container(&self, vmid: &str) -> PathBuf {
        let conf = self.tree.path(&format!("etc/pve/lxc/{vmid}.conf"));
        fifo(&conf);
        let staged = self.tree.path(&format!("sys/fs/cgroup/.staged-{vmid}"));
        copy_dir(&self.tree.path("sys/fs/cgroup/lxc/100"), &staged);
        std::fs::rename(
            &staged,
            self.tree.path(&format!("sys/fs/cgroup/lxc/{vmid}")),
        )
        .unwrap();
        conf
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn signals_during_a_slow_start_are_acted_on_not_fatal() {
    for sig in [Signal::TERM, Signal::HUP, Signal::INT] {
        let a = Agent::new("");
        // Start-up blocks reading the mount table until the test writes it: a slow start
        // (BTF parsing, a large export read back) held open for as long as the test likes.
        let mountinfo = a.tree.path("proc/self/mountinfo");
        fifo(&mountinfo);
        let mut child = a.spawn();
        let w = blocked_reader(&mountinfo, &mut child);
        assert!(
            catches_stop_and_reload(&child),
            "{sig:?}: handlers must be in place before the slow start-up work (SigCgt {:x})",
            caught(&child)
        );
        signal(&child, sig);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            child.try_wait().unwrap(),
            None,
            "{sig:?} during start-up killed the agent"
        );
        release(w, V2);
        if sig == Signal::HUP {
            wait_until("the reload asked for during start-up", || {
                a.log().contains("configuration reloaded")
            });
            wait_until("cycles", || a.cycles() >= 2);
            signal(&child, Signal::TERM);
        }
        let status = exit_within(&mut child, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{sig:?}: still running"));
        assert_eq!(status.code(), Some(0), "{sig:?}: {status}");
        if sig != Signal::HUP {
            assert!(
                !a.export().exists(),
                "{sig:?}: a stop asked for during start-up ran a cycle anyway"
            );
            assert!(a.log().contains("stopping"), "{}", a.log());
        }
    }
}

#[test]
fn sigterm_at_any_moment_of_start_up_exits_0() {
    // From the moment the handlers exist (the earliest any program can catch a signal), through
    // configuration, logging, collector start and the first cycles.
    for delay_us in [0, 200, 500, 1000, 2000, 4000, 8000, 16000, 50000] {
        let a = Agent::new("");
        let mut child = a.spawn();
        wait_until("signal handlers", || catches_stop_and_reload(&child));
        std::thread::sleep(Duration::from_micros(delay_us));
        signal(&child, Signal::TERM);
        let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
        assert_eq!(status.code(), Some(0), "SIGTERM {delay_us} µs in: {status}");
    }
    // A reload at the same moments is never fatal.
    for delay_us in [0, 500, 2000, 8000, 50000] {
        let a = Agent::new("");
        let mut child = a.spawn();
        wait_until("signal handlers", || catches_stop_and_reload(&child));
        std::thread::sleep(Duration::from_micros(delay_us));
        signal(&child, Signal::HUP);
        wait_until("cycles after the reload", || a.cycles() >= 2);
        assert_eq!(child.try_wait().unwrap(), None);
        signal(&child, Signal::TERM);
        let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
        assert_eq!(status.code(), Some(0), "{status}");
    }
}

#[test]
fn stop_during_a_slow_cycle_ends_when_that_cycle_returns() {
    // tokio::select! without priority picks at random between a due tick and the signal: a
    // few runs make a random pick all but certain to show.
    for run in 0..5 {
        let a = Agent::new("");
        let mut child = a.spawn();
        wait_until("cycles", || a.cycles() >= 2);
        let conf = a.hung_container("110");
        let w = blocked_reader(&conf, &mut child);
        // A cycle is under way and stuck. Any cycle after it would hang for good on 111.
        let next = a.hung_container("111");
        signal(&child, Signal::TERM);
        // Several intervals pass: the ticker is due when the cycle returns.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(child.try_wait().unwrap(), None);
        release(w, "hostname: slow\n");
        let status = exit_within(&mut child, Duration::from_secs(3)).unwrap_or_else(|| {
            panic!(
                "run {run}: SIGTERM did not end the loop when the running cycle returned (another cycle started: {})",
                rustix::fs::open(&next, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty()).is_ok()
            )
        });
        assert_eq!(status.code(), Some(0), "run {run}: {status}");
    }
}

/// Notifications received on a socket bound by the test, as systemd's NOTIFY_SOCKET.
struct Notify {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        Self { sock, path }
    }

    /// Every message received within `d`, one line of state each.
    fn during(&self, d: Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < d {
            if let Ok(n) = self.sock.recv(&mut buf) {
                got.extend(
                    String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .map(str::to_string),
                );
            }
        }
        got
    }

    fn wait_for(&self, what: &str, limit: Duration) -> Vec<String> {
        let start = std::time::Instant::now();
        let mut got = Vec::new();
        while start.elapsed() < limit {
            got.extend(self.during(Duration::from_millis(50)));
            if got.iter().any(|l| l == what) {
                return got;
            }
        }
        panic!("no {what} within {limit:?}: {got:?}");
    }
}

#[test]
fn systemd_readiness_after_the_first_cycle_and_a_watchdog_fed_by_the_loop() {
    // A long interval: the watchdog must not depend on it.
    let a = Agent::new("");
    let text = std::fs::read_to_string(&a.cfg).unwrap();
    std::fs::write(
        &a.cfg,
        text.replace("check_interval: 0.1", "check_interval: 30"),
    )
    .unwrap();
    let notify = Notify::bind(a.dir.path());
    // The first cycle reads container 100's name from a FIFO: it lasts until the test says.
    let conf = a.tree.path("etc/pve/lxc/100.conf");
    fifo(&conf);
    let mut child = Running(
        a.command()
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "200000")
            .spawn()
            .unwrap(),
    );
    let w = blocked_reader(&conf, &mut child);
    // A wedged cycle: neither readiness nor watchdog pings, so systemd would restart it.
    let stuck = notify.during(Duration::from_millis(600));
    assert!(
        !stuck.iter().any(|l| l == "READY=1" || l == "WATCHDOG=1"),
        "during the stuck first cycle: {stuck:?}"
    );
    release(w, "hostname: web-100\n");
    let before = notify.wait_for("READY=1", Duration::from_secs(5));
    assert!(
        !before
            .iter()
            .take_while(|l| *l != "READY=1")
            .any(|l| l == "WATCHDOG=1"),
        "watchdog before readiness: {before:?}"
    );
    // Between cycles (the next one is 1 s away, then 30 s), pings at half the watchdog time.
    let pings = notify.during(Duration::from_millis(1500));
    let n = pings.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(
        (5..=20).contains(&n),
        "{n} pings in 1.5 s at WATCHDOG_USEC=200000: {pings:?}"
    );
    signal(&child, Signal::TERM);
    let bye = notify.wait_for("STOPPING=1", Duration::from_secs(5));
    assert!(!bye.is_empty());
    let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(0), "{status}");
}

#[test]
fn a_reload_is_announced_to_systemd() {
    // RELOADING=1 then READY=1 around a reload, so `systemctl reload` waits for it.
    let a = Agent::new("");
    let notify = Notify::bind(a.dir.path());
    let mut child = Running(
        a.command()
            .env("NOTIFY_SOCKET", &notify.path)
            .spawn()
            .unwrap(),
    );
    notify.wait_for("READY=1", Duration::from_secs(5));
    signal(&child, Signal::HUP);
    let got = notify.wait_for("RELOADING=1", Duration::from_secs(5));
    let after = if got
        .iter()
        .skip_while(|l| *l != "RELOADING=1")
        .any(|l| l == "READY=1")
    {
        got
    } else {
        notify.wait_for("READY=1", Duration::from_secs(5))
    };
    assert!(
        !after.iter().any(|l| l == "WATCHDOG=1"),
        "no watchdog asked for: {after:?}"
    );
    signal(&child, Signal::TERM);
    assert_eq!(
        exit_within(&mut child, Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn check_config_and_start_up_refuse_a_missing_export_directory() {
    let a = Agent::new("");
    let missing = a.dir.path().join("no-such-dir/metrics.json");
    for (export, what) in [
        (missing.clone(), "does not exist"),
        (a.dir.path().to_path_buf(), "is a directory"),
    ] {
        std::fs::write(
            &a.cfg,
            format!(
                "logging:\n  log_file: {}\nmonitoring:\n  check_interval: 0.1\n  export_file: {}\n",
                a.dir.path().join("agent.log").display(),
                export.display()
            ),
        )
        .unwrap();
        let check = agent(&["--check-config", "--config", a.cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(
            check.status.code(),
            Some(1),
            "--check-config accepted {export:?}: {err}"
        );
        assert!(err.contains("export_file") && err.contains(what), "{err}");
        let mut c = a.command();
        c.stderr(Stdio::piped());
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "start-up accepted {export:?}: {err}"
        );
        assert!(err.contains("export_file") && err.contains(what), "{err}");
    }
    assert!(!missing.parent().unwrap().exists(), "nothing created");
}

#[test]
fn check_config_accepts_what_start_up_accepts() {
    let a = Agent::new("");
    let out = agent(&["--check-config", "--config", a.cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    assert!(
        !a.export().exists() && !a.dir.path().join("agent.log").exists(),
        "nothing written"
    );
}

#[test]
fn each_cause_is_printed_once() {
    // An unreadable configuration (a directory).
    let dir = tempfile::tempdir().unwrap();
    let out = agent(&["--check-config", "--config", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.matches("os error 21").count(), 1, "{err}");

    // A failing export write: its directory disappears while the agent runs.
    let a = Agent::new("");
    let sub = a.dir.path().join("out");
    std::fs::create_dir(&sub).unwrap();
    write_config(&a.cfg, a.dir.path(), "");
    let text = std::fs::read_to_string(&a.cfg).unwrap().replace(
        &a.export().display().to_string(),
        &sub.join("m.json").display().to_string(),
    );
    std::fs::write(&a.cfg, text).unwrap();
    let mut child = a.spawn();
    wait_until("the export", || sub.join("m.json").exists());
    std::fs::remove_dir_all(&sub).unwrap();
    wait_until("a failed write in the log", || {
        a.log().contains("export failed")
    });
    signal(&child, Signal::TERM);
    assert_eq!(
        exit_within(&mut child, Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0)
    );
    let log = a.log();
    let line = log.lines().find(|l| l.contains("export failed")).unwrap();
    assert_eq!(line.matches("os error 2)").count(), 1, "{line}");
}

#[test]
fn a_slow_reload_does_not_stop_the_cycles() {
    let a = Agent::new("");
    let mut child = a.spawn();
    wait_until("cycles", || a.cycles() >= 2);
    let good = std::fs::read_to_string(&a.cfg).unwrap();
    // The configuration becomes a FIFO: reading it lasts until the test writes it, as a
    // huge or pathological file would.
    fifo(&a.cfg);
    signal(&child, Signal::HUP);
    let w = blocked_reader(&a.cfg, &mut child);
    let before = a.cycles();
    wait_until("cycles while the reload is read", || {
        a.cycles() >= before + 3
    });
    release(
        w,
        &good.replace("check_interval: 0.1", "check_interval: 0.2"),
    );
    wait_until("the reload applied", || {
        a.log().contains("configuration reloaded")
    });
    signal(&child, Signal::TERM);
    let status = exit_within(&mut child, Duration::from_secs(5)).expect("still running");
    assert_eq!(status.code(), Some(0), "{status}");
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
    let mut child = daemon_on(&cfg, t.root());
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
    let mut child = daemon_on(&cfg, t.root());
    wait_until("a first export", || export.exists());
    // Watch the file for 3.5 s: every rewrite is a new file (a freed inode number can come
    // back, so the inode and its change time together tell one rewrite from the next).
    let mut versions = Vec::new();
    let end = std::time::Instant::now() + Duration::from_millis(3500);
    while std::time::Instant::now() < end {
        if let Ok(m) = std::fs::metadata(&export) {
            let v = (m.ino(), m.ctime(), m.ctime_nsec());
            if versions.last() != Some(&v) {
                versions.push(v);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        (3..=6).contains(&versions.len()),
        "{} rewrites in 3.5 s at export_interval 1 s (0.1 s cycles)",
        versions.len()
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
