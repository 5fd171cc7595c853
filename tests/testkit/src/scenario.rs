//! A daemon run held to ground truth on every cycle.
//!
//! A [`Run`] keeps one lxcmon daemon running while the test changes the workload in steps. The
//! timeline is a sequence of steady phases; for each the test records its wall-clock start and
//! end and what it knows to be true (processes it started and killed, bytes it moved in bursts,
//! which instance of a container is running). Meanwhile threads collect every cycle the daemon
//! exports (the export file, re-read often enough that retention drops nothing unseen, and
//! `/metrics` when it listens) and sample the kernel's own figures (memory, CPU time, the live
//! process list from `/proc`). At the end each cycle whose sampling lies inside a phase, one
//! interval after its start (the CPU figure spans the interval before the cycle), is checked
//! against that phase, and every mismatch is reported with its cycle's timestamp.

use crate::agent::{test_collector, AgentConfig, Daemon};
use crate::contract::{check_autoscale_ml, check_records, get_f64, get_str, get_u64};
use crate::lab::{CgroupLayout, Container};
use crate::workload::{self, unix_now};
use anyhow::{bail, ensure, Context, Result};
use chrono::TimeZone;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A `records` cycle carries only its start time; its reads take a few milliseconds on these
/// hosts. A cycle counts as inside a phase only when its start plus this lies before the end.
pub const RECORDS_READ_GUARD: f64 = 0.25;
/// Exported memory may differ from the kernel's figure by the per-CPU charge batches the
/// kernel has not yet folded into the counter, and by rounding to 0.01 MiB.
pub const MEMORY_TOLERANCE_BYTES: f64 = 2.0 * 1048576.0;
/// CPU % of one cycle against the cgroup's CPU time during the phase, in points beyond the
/// range of the kernel's own rates between the harness's samples ([`CpuTruth`]).
pub const CPU_TOLERANCE_POINTS: f64 = 20.0;

/// A container's CPU % during a phase from its cgroup's CPU time: over the whole phase, and
/// the lowest and highest between two consecutive samples of the harness (about 0.2 s apart).
/// On an idle host they are close; when the hypervisor steals time they spread, and a cycle
/// (an average over its own interval) may be anywhere among them.
#[derive(Debug, Clone, Copy)]
struct CpuTruth {
    mean: f64,
    lo: f64,
    hi: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    IoRead,
    IoWrite,
    NetRx,
    NetTx,
}

const COUNTERS: [Counter; 4] = [
    Counter::IoRead,
    Counter::IoWrite,
    Counter::NetRx,
    Counter::NetTx,
];

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Self::IoRead => "io_read_bytes",
            Self::IoWrite => "io_write_bytes",
            Self::NetRx => "network_received_bytes",
            Self::NetTx => "network_transmitted_bytes",
        }
    }
}

/// One container's figures in one exported cycle, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub processes: u64,
    pub memory_bytes: f64,
    /// Not in `/metrics` (it exports CPU seconds).
    pub cpu_pct: Option<f64>,
    pub counters: [u64; 4],
    /// A key naming when the instance started, should the export carry one.
    pub start_marker: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    File,
    Metrics,
}

/// One exported cycle: when it may have read the kernel (`lo ..= hi`, Unix seconds).
#[derive(Debug, Clone)]
pub struct Observed {
    pub source: Source,
    pub label: String,
    pub lo: f64,
    pub hi: f64,
    pub collector: Option<String>,
    pub containers: BTreeMap<String, Figures>,
}

/// A figure of a cycle that disagrees with the truth (or an export that cannot be read).
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub source: String,
    pub cycle: String,
    pub phase: String,
    pub container: String,
    pub check: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] cycle {} phase '{}' {}: {}: {}",
            self.source, self.cycle, self.phase, self.container, self.check, self.detail
        )
    }
}

fn start_marker(o: &Map<String, Value>) -> Option<String> {
    o.iter()
        .find(|(k, _)| k.contains("start") || k.starts_with("instance"))
        .map(|(k, v)| format!("{k}={v}"))
}

fn local_to_unix(t: chrono::NaiveDateTime) -> Result<f64> {
    let dt = chrono::Local
        .from_local_datetime(&t)
        .single()
        .with_context(|| format!("local time {t} is ambiguous"))?;
    Ok(dt.timestamp_micros() as f64 / 1e6)
}

/// Parses an export file of `format` into cycles.
pub fn parse_export(format: &str, v: &Value) -> Result<Vec<Observed>> {
    let mut out = Vec::new();
    match format {
        "records" => {
            for c in check_records(v)? {
                let label = c
                    .records
                    .first()
                    .and_then(|r| r.get("timestamp"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let res = if label.contains('.') { 0.001 } else { 1.0 };
                let lo = c.timestamp.timestamp_micros() as f64 / 1e6;
                let mut containers = BTreeMap::new();
                let mut collector = None;
                for r in &c.records {
                    let id = get_str(r, "container_id", "record")?.to_owned();
                    collector = r
                        .get("collector")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let mut counters = [0; 4];
                    for (i, k) in COUNTERS.iter().enumerate() {
                        counters[i] = get_u64(r, k.name(), &id)?;
                    }
                    containers.insert(
                        id.clone(),
                        Figures {
                            processes: get_u64(r, "process_count", &id)?,
                            memory_bytes: get_f64(r, "memory_usage", &id)? * 1048576.0,
                            cpu_pct: Some(get_f64(r, "cpu_usage", &id)?),
                            counters,
                            start_marker: start_marker(r),
                        },
                    );
                }
                out.push(Observed {
                    source: Source::File,
                    label,
                    lo,
                    hi: lo + res + RECORDS_READ_GUARD,
                    collector,
                    containers,
                });
            }
        }
        "autoscale_ml" => {
            for c in check_autoscale_ml(v)? {
                let start = get_str(&c.summary, "collection_start_time", "summary")?;
                let end = get_str(&c.summary, "collection_end_time", "summary")?;
                let lo = local_to_unix(crate::contract::parse_aml_timestamp(start)?)?;
                let hi = local_to_unix(crate::contract::parse_aml_timestamp(end)?)?;
                let mut containers = BTreeMap::new();
                for (id, e) in &c.containers {
                    let e = e.as_object().context("entry")?;
                    let io = e["io_stats"].as_object().context("io_stats")?;
                    let net = e["network_usage"].as_object().context("network_usage")?;
                    containers.insert(
                        id.clone(),
                        Figures {
                            processes: get_u64(e, "process_count", id)?,
                            memory_bytes: get_f64(e, "memory_usage_mb", id)? * 1048576.0,
                            cpu_pct: Some(get_f64(e, "cpu_usage_percent", id)?),
                            counters: [
                                get_u64(io, "reads", id)? * 512,
                                get_u64(io, "writes", id)? * 512,
                                get_u64(net, "rx_bytes", id)?,
                                get_u64(net, "tx_bytes", id)?,
                            ],
                            start_marker: start_marker(e),
                        },
                    );
                }
                out.push(Observed {
                    source: Source::File,
                    label: start.to_owned(),
                    lo,
                    // Six fractional digits: the end is exact to the microsecond.
                    hi: hi + 1e-6,
                    collector: c
                        .summary
                        .get("collector")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    containers,
                });
            }
        }
        _ => bail!("unknown export format {format}"),
    }
    Ok(out)
}

/// The value of `key="..."` in a Prometheus label set (escapes undone).
fn label_value(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let mut out = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Parses a `/metrics` body (Prometheus text format) into the cycle it renders.
pub fn parse_metrics(body: &str) -> Result<Option<Observed>> {
    let mut per: BTreeMap<String, HashMap<&str, f64>> = BTreeMap::new();
    let (mut ts, mut dur, mut collector) = (None, 0.0, None);
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').context("metrics line")?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("value in {line:?}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        match name {
            "lxcmon_last_cycle_timestamp_seconds" => ts = Some(value),
            "lxcmon_cycle_duration_seconds" => dur = value,
            "lxcmon_collector_info" => collector = label_value(labels, "collector"),
            _ if name.starts_with("lxcmon_container_") => {
                let id = label_value(labels, "container_id").context("no container_id")?;
                per.entry(id).or_default().insert(name, value);
            }
            _ => {}
        }
    }
    let Some(lo) = ts else { return Ok(None) };
    let mut containers = BTreeMap::new();
    for (id, m) in per {
        let g = |k: &str| -> Result<f64> {
            m.get(k)
                .copied()
                .with_context(|| format!("/metrics: no {k} for {id}"))
        };
        containers.insert(
            id.clone(),
            Figures {
                processes: g("lxcmon_container_processes")? as u64,
                memory_bytes: g("lxcmon_container_memory_bytes")?,
                cpu_pct: None,
                counters: [
                    g("lxcmon_container_io_read_bytes_total")? as u64,
                    g("lxcmon_container_io_written_bytes_total")? as u64,
                    g("lxcmon_container_network_receive_bytes_total")? as u64,
                    g("lxcmon_container_network_transmit_bytes_total")? as u64,
                ],
                start_marker: None,
            },
        );
    }
    Ok(Some(Observed {
        source: Source::Metrics,
        label: format!("{lo:.6}"),
        lo,
        hi: lo + dur + 1e-6,
        collector,
        containers,
    }))
}

/// GET `path` from 127.0.0.1:`port`; returns the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// What the collecting threads gathered.
#[derive(Default)]
struct Gathered {
    file: BTreeMap<String, Observed>,
    metrics: BTreeMap<String, Observed>,
    file_len: usize,
    anomalies: Vec<Mismatch>,
    truth: Vec<TruthSample>,
}

/// The kernel's figures for each container at one moment (`t_lo ..= t_hi`).
#[derive(Debug, Clone)]
struct TruthSample {
    t_lo: f64,
    t_hi: f64,
    /// name → (live processes, memory without cache, CPU ns)
    per: HashMap<String, (u64, Option<u64>, Option<u64>)>,
}

fn anomaly(source: &str, check: &'static str, detail: String) -> Mismatch {
    Mismatch {
        source: source.into(),
        cycle: format!("at {:.3}", unix_now()),
        phase: String::new(),
        container: String::new(),
        check,
        detail,
    }
}

/// Re-reads the export file and merges its cycles; a cycle seen before must be unchanged.
fn poll_file(g: &Mutex<Gathered>, path: &Path, format: &str) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let parsed = serde_json::from_str::<Value>(&text)
        .context("not JSON")
        .and_then(|v| parse_export(format, &v));
    let Ok(mut g) = g.lock() else { return };
    match parsed {
        Ok(cycles) => {
            g.file_len = cycles.len();
            for c in cycles {
                match g.file.get(&c.label) {
                    Some(old) if old.containers != c.containers => {
                        let m = anomaly(
                            "file",
                            "history rewritten",
                            format!(
                                "cycle {} changed: {:?} -> {:?}",
                                c.label, old.containers, c.containers
                            ),
                        );
                        g.anomalies.push(m);
                    }
                    Some(_) => {}
                    None => {
                        g.file.insert(c.label.clone(), c);
                    }
                }
            }
        }
        Err(e) => {
            let m = anomaly("file", "export unreadable", format!("{e:#}"));
            g.anomalies.push(m);
        }
    }
}

fn sample_truth(layout: CgroupLayout, cs: &[Container]) -> TruthSample {
    let t_lo = unix_now();
    let procs = workload::processes_by_container(layout).unwrap_or_default();
    let mut per = HashMap::new();
    for c in cs {
        let p = procs.get(c.cgroup_name()).copied().unwrap_or(0);
        per.insert(
            c.name.clone(),
            (p, workload::memory_bytes(c).ok(), workload::cpu_ns(c).ok()),
        );
    }
    TruthSample {
        t_lo,
        t_hi: unix_now(),
        per,
    }
}

/// What a phase expects of one container.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Increases with each restart; counters and baselines belong to one instance.
    pub instance: u32,
    pub processes: u64,
    pub cores: f64,
    /// (counter, bytes, since): the counter is at least its value in the last cycle before
    /// `since` plus `bytes`.
    pub floors: Vec<(Counter, u64, f64)>,
}

#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub start: f64,
    pub end: f64,
    pub expect: BTreeMap<String, Expect>,
}

#[derive(Debug, Clone)]
struct Restart {
    name: String,
    stop_begin: f64,
    start_done: f64,
}

#[derive(Debug, Clone)]
struct Sighup {
    at: f64,
    max_entries: u32,
}

/// How a run is configured.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub interval: f64,
    pub format: &'static str,
    pub prometheus: bool,
    pub max_metrics_entries: u32,
}

/// One daemon, the collecting threads, and the timeline of phases.
pub struct Run {
    pub spec: RunSpec,
    cfg: AgentConfig,
    daemon: Option<Daemon>,
    port: Option<u16>,
    containers: Vec<Container>,
    state: BTreeMap<String, Expect>,
    phases: Vec<Phase>,
    restarts: Vec<Restart>,
    sighups: Vec<Sighup>,
    gathered: Arc<Mutex<Gathered>>,
    stop: Arc<AtomicBool>,
    /// Set before the daemon is stopped: `/metrics` going away then is no failure.
    stop_scraping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Failures of the test itself (the scenario did not do what it says).
    pub harness: Vec<String>,
}

/// The outcome of a run.
pub struct Outcome {
    pub mismatches: Vec<Mismatch>,
    pub harness: Vec<String>,
    pub cycles_checked: usize,
    pub daemon_stderr: String,
}

impl Outcome {
    /// Fails with a summary (per check and container: count, first and last cycle) when any
    /// cycle disagreed with the truth or the scenario itself went wrong; every mismatch has
    /// been printed before.
    pub fn into_result(self) -> Result<()> {
        if self.mismatches.is_empty() && self.harness.is_empty() {
            return Ok(());
        }
        let mut groups: BTreeMap<(String, &str, String), (usize, String, String)> = BTreeMap::new();
        for m in &self.mismatches {
            let e = groups
                .entry((m.source.clone(), m.check, m.container.clone()))
                .or_insert((0, m.cycle.clone(), m.cycle.clone()));
            e.0 += 1;
            e.2 = m.cycle.clone();
        }
        let mut msg = format!(
            "{} mismatches against ground truth over {} checked cycles, {} harness errors\n",
            self.mismatches.len(),
            self.cycles_checked,
            self.harness.len()
        );
        for ((src, check, c), (n, first, last)) in groups {
            let example = self
                .mismatches
                .iter()
                .find(|m| m.source == src && m.check == check && m.container == c)
                .map(|m| m.detail.clone())
                .unwrap_or_default();
            msg.push_str(&format!(
                "  [{src}] {check} {c}: {n} cycles ({first} .. {last}), e.g. {example}\n"
            ));
        }
        for h in &self.harness {
            msg.push_str(&format!("  harness: {h}\n"));
        }
        bail!("{msg}")
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Run {
    /// Starts the daemon on `containers` and waits until a cycle exports all of them. `cores`
    /// gives the CPUs each container may use (the CPU % divisor), in the same order.
    pub fn start(
        bin: &Path,
        dir: &Path,
        spec: RunSpec,
        containers: &[(&Container, f64)],
    ) -> Result<Self> {
        let mut cfg = AgentConfig::new(dir, spec.format);
        cfg.check_interval = spec.interval;
        cfg.max_metrics_entries = spec.max_metrics_entries;
        let port = if spec.prometheus {
            let p = free_port()?;
            cfg.prometheus_listen = Some(format!("127.0.0.1:{p}"));
            Some(p)
        } else {
            None
        };
        let list: Vec<Container> = containers.iter().map(|(c, _)| (*c).clone()).collect();
        let layout = list.first().context("no containers")?.layout;
        let gathered = Arc::new(Mutex::new(Gathered::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_scraping = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (g, stop, cs) = (gathered.clone(), stop.clone(), list.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let s = sample_truth(layout, &cs);
                    if let Ok(mut g) = g.lock() {
                        g.truth.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }));
        }
        let daemon = Daemon::start(bin, &cfg)?;
        {
            let (g, stop) = (gathered.clone(), stop.clone());
            let (path, format): (PathBuf, &str) = (cfg.export_file(), spec.format);
            threads.push(std::thread::spawn(move || loop {
                // One last read after the stop, so the final cycles are in.
                let last = stop.load(Ordering::SeqCst);
                poll_file(&g, &path, format);
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }));
        }
        if let Some(port) = port {
            let (g, stop) = (gathered.clone(), stop_scraping.clone());
            let period = Duration::from_secs_f64((spec.interval / 2.0).clamp(0.1, 0.25));
            threads.push(std::thread::spawn(move || {
                let mut up = false;
                while !stop.load(Ordering::SeqCst) {
                    let got = http_get(port, "/metrics").and_then(|b| parse_metrics(&b));
                    if let Ok(mut g) = g.lock() {
                        match got {
                            Ok(Some(o)) => {
                                up = true;
                                g.metrics.entry(o.label.clone()).or_insert(o);
                            }
                            Ok(None) => {}
                            // Once the daemon is being stopped, a reset is expected.
                            Err(e) if up && !stop.load(Ordering::SeqCst) => {
                                let m = anomaly("/metrics", "scrape failed", format!("{e:#}"));
                                g.anomalies.push(m);
                            }
                            Err(_) => {}
                        }
                    }
                    std::thread::sleep(period);
                }
            }));
        }
        let mut run = Self {
            spec,
            cfg,
            daemon: Some(daemon),
            port,
            containers: list,
            state: BTreeMap::new(),
            phases: Vec::new(),
            restarts: Vec::new(),
            sighups: Vec::new(),
            gathered,
            stop,
            stop_scraping,
            threads,
            harness: Vec::new(),
        };
        let names: Vec<String> = run.containers.iter().map(|c| c.name.clone()).collect();
        let deadline = unix_now() + 30.0 + 3.0 * run.spec.interval;
        loop {
            ensure!(
                run.daemon_running(),
                "lxcmon exited at start: {}",
                run.stderr()
            );
            let all = run
                .gathered
                .lock()
                .map(|g| {
                    g.file
                        .values()
                        .any(|o| names.iter().all(|n| o.containers.contains_key(n)))
                })
                .unwrap_or(false);
            if all {
                break;
            }
            ensure!(
                unix_now() < deadline,
                "no exported cycle with {names:?} in time"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        run.settle_after(run.newest_file_cycle());
        for (c, cores) in containers {
            let processes = run.live_processes(c)?;
            run.state.insert(
                c.name.clone(),
                Expect {
                    instance: 0,
                    processes,
                    cores: *cores,
                    floors: Vec::new(),
                },
            );
        }
        Ok(run)
    }

    /// The live process count of `c`, the same in two reads 300 ms apart (it must be steady).
    pub fn live_processes(&self, c: &Container) -> Result<u64> {
        let read = || -> Result<u64> {
            Ok(workload::processes_by_container(c.layout)?
                .get(c.cgroup_name())
                .copied()
                .unwrap_or(0))
        };
        let mut last = read()?;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(300));
            let now = read()?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        bail!("the process count of {} does not settle", c.name)
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    fn daemon_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Daemon::running)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.cfg.dir.join("daemon.stderr")).unwrap_or_default()
    }

    fn state_of(&mut self, c: &Container) -> Result<&mut Expect> {
        self.state
            .get_mut(&c.name)
            .with_context(|| format!("{} is not in the run", c.name))
    }

    /// The test started (positive) or killed (negative) processes in `c`.
    pub fn processes_changed(&mut self, c: &Container, delta: i64) -> Result<()> {
        let s = self.state_of(c)?;
        s.processes = s
            .processes
            .checked_add_signed(delta)
            .context("process count below zero")?;
        Ok(())
    }

    /// A burst of `bytes` on `counter` of `c` began at `since` and has completed.
    pub fn burst(&mut self, c: &Container, counter: Counter, bytes: u64, since: f64) -> Result<()> {
        // Only the newest burst per counter: an earlier one is implied by it together with
        // the check that counters never go backwards (and a soak makes thousands).
        let floors = &mut self.state_of(c)?.floors;
        floors.retain(|f| f.0 != counter);
        floors.push((counter, bytes, since));
        Ok(())
    }

    /// Holds the current state for `secs` and records it as a phase.
    pub fn phase(&mut self, name: &str, secs: f64) -> Result<()> {
        let start = unix_now();
        let end = start + secs;
        while unix_now() < end {
            ensure!(
                self.daemon_running(),
                "lxcmon exited during phase '{name}': {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.phases.push(Phase {
            name: name.into(),
            start,
            end: unix_now(),
            expect: self.state.clone(),
        });
        Ok(())
    }

    /// Rewrites the configuration with `change` and sends SIGHUP.
    pub fn sighup(&mut self, change: impl FnOnce(&mut AgentConfig)) -> Result<()> {
        change(&mut self.cfg);
        self.cfg.write()?;
        let pid = self.daemon_pid().context("no daemon")?;
        let pid = rustix::process::Pid::from_raw(pid as i32).context("pid")?;
        let at = unix_now();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).context("SIGHUP")?;
        self.sighups.push(Sighup {
            at,
            max_entries: self.cfg.max_metrics_entries,
        });
        Ok(())
    }

    /// Waits until a cycle that started at `lo` has surely finished reading, whatever the
    /// resolution of the file's timestamps, so that the next step falls after it.
    fn settle_after(&self, lo: f64) {
        let res = if self.spec.interval >= 1.0 && self.spec.format == "records" {
            1.0
        } else {
            0.001
        };
        let until = lo + res + RECORDS_READ_GUARD;
        while unix_now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The start of the newest cycle seen in the file or on `/metrics` (which has it first).
    fn newest_file_cycle(&self) -> f64 {
        self.gathered
            .lock()
            .ok()
            .and_then(|g| {
                g.file
                    .values()
                    .chain(g.metrics.values())
                    .map(|o| o.lo)
                    .reduce(f64::max)
            })
            .unwrap_or(0.0)
    }

    /// Right after a cycle, stops `c` and starts it again under the same name with `restart`,
    /// then runs `then` (which returns the processes it started); the new instance's live
    /// process count after `restart` becomes the expectation.
    pub fn restart(
        &mut self,
        c: &Container,
        restart: impl FnOnce() -> Result<()>,
        then: impl FnOnce() -> Result<i64>,
    ) -> Result<()> {
        let seen = self.newest_file_cycle();
        let deadline = unix_now() + 3.0 * self.spec.interval + 5.0;
        while self.newest_file_cycle() <= seen {
            ensure!(unix_now() < deadline, "no new cycle before the restart");
            std::thread::sleep(Duration::from_millis(20));
        }
        let newest = self.newest_file_cycle();
        self.settle_after(newest);
        let stop_begin = unix_now();
        restart()?;
        let start_done = unix_now();
        let processes = workload::processes_by_container(c.layout)?
            .get(c.cgroup_name())
            .copied()
            .unwrap_or(0);
        let started = then()?;
        let then_done = unix_now();
        eprintln!(
            "daemon_truth: {} restarted in {:.2} s (cycle seen {:.2} s before), the next step took {:.2} s",
            c.name,
            start_done - stop_begin,
            stop_begin - newest,
            then_done - start_done
        );
        self.restarts.push(Restart {
            name: c.name.clone(),
            stop_begin,
            start_done,
        });
        let s = self.state_of(c)?;
        s.instance += 1;
        s.floors.clear();
        s.processes = processes
            .checked_add_signed(started)
            .context("process count below zero")?;
        Ok(())
    }

    /// Stops the collection and the daemon (SIGTERM) and checks every cycle.
    pub fn finish(mut self) -> Result<Outcome> {
        let daemon = self.daemon.take().context("no daemon")?;
        self.stop_scraping.store(true, Ordering::SeqCst);
        let out = daemon.terminate(Duration::from_secs(15))?;
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let g = std::mem::take(&mut *self.gathered.lock().map_err(|_| anyhow::anyhow!("lock"))?);
        let mut mismatches = g.anomalies.clone();
        if out.status.code() != Some(0) {
            mismatches.push(anomaly(
                "daemon",
                "exit status",
                format!("lxcmon exited with {} after SIGTERM", out.status),
            ));
        }
        let reloads = out.stderr.matches("configuration reloaded").count();
        if reloads < self.sighups.len() {
            mismatches.push(anomaly(
                "log",
                "reload not applied",
                format!("{} SIGHUPs, {reloads} reloads logged", self.sighups.len()),
            ));
        }
        if let Some(h) = self.sighups.last() {
            if g.file_len > h.max_entries as usize {
                mismatches.push(anomaly(
                    "file",
                    "retention after reload",
                    format!(
                        "{} cycles in the file, max_metrics_entries is now {}",
                        g.file_len, h.max_entries
                    ),
                ));
            }
        }
        let metrics: Vec<Observed> = g.metrics.values().cloned().collect();
        // A `records` timestamp in whole seconds only says which second the cycle started in;
        // `/metrics` rendered the same cycle with its exact start and duration.
        let file: Vec<Observed> = g
            .file
            .values()
            .cloned()
            .map(|mut f| {
                if f.hi - f.lo > 1.0 {
                    if let Some(m) = metrics.iter().find(|m| m.lo >= f.lo && m.lo < f.lo + 1.0) {
                        f.lo = m.lo;
                        f.hi = m.hi;
                    }
                }
                f
            })
            .collect();
        let mut checked = 0;
        for obs in [file, metrics] {
            let mut obs = obs;
            obs.sort_by(|a, b| a.lo.total_cmp(&b.lo));
            checked += self.check_source(&obs, &g.truth, &mut mismatches);
        }
        for m in &mismatches {
            eprintln!("MISMATCH {m}");
        }
        for h in &self.harness {
            eprintln!("HARNESS {h}");
        }
        eprintln!(
            "daemon_truth: {} phases, {} file cycles, {} /metrics cycles, {} checked against a phase, {} mismatches",
            self.phases.len(),
            g.file.len(),
            g.metrics.len(),
            checked,
            mismatches.len()
        );
        Ok(Outcome {
            mismatches,
            harness: std::mem::take(&mut self.harness),
            cycles_checked: checked,
            daemon_stderr: out.stderr,
        })
    }

    /// Which instance of `name` a cycle read, or `None` when it may straddle a restart.
    fn instance(&self, name: &str, o: &Observed) -> Option<u32> {
        let mut i = 0;
        for r in self.restarts.iter().filter(|r| r.name == name) {
            if o.lo > r.start_done {
                i += 1;
            } else if o.hi >= r.stop_begin {
                return None;
            }
        }
        Some(i)
    }

    fn truth_in(
        &self,
        truth: &[TruthSample],
        p: &Phase,
        name: &str,
    ) -> Vec<(f64, u64, Option<u64>, Option<u64>)> {
        truth
            .iter()
            .filter(|s| s.t_lo >= p.start && s.t_hi <= p.end)
            .filter_map(|s| {
                s.per
                    .get(name)
                    .map(|&(pr, m, c)| ((s.t_lo + s.t_hi) / 2.0, pr, m, c))
            })
            .collect()
    }

    /// Checks the cycles of one source; returns how many fell inside a phase.
    fn check_source(
        &mut self,
        obs: &[Observed],
        truth: &[TruthSample],
        out: &mut Vec<Mismatch>,
    ) -> usize {
        let Some(first) = obs.first() else { return 0 };
        let src = match first.source {
            Source::File => "file",
            Source::Metrics => "/metrics",
        };
        let interval = self.spec.interval;
        let want_collector = match test_collector().as_str() {
            "files" => Some("files".to_owned()),
            "ebpf" => Some("ebpf".to_owned()),
            _ => first.collector.clone(),
        };
        let mk =
            |o: &Observed, phase: &str, c: &str, check: &'static str, detail: String| Mismatch {
                source: src.into(),
                cycle: o.label.clone(),
                phase: phase.into(),
                container: c.into(),
                check,
                detail,
            };
        let names: Vec<String> = self.containers.iter().map(|c| c.name.clone()).collect();
        let phase_of = |o: &Observed| -> Option<&Phase> {
            self.phases
                .iter()
                .find(|p| o.lo >= p.start + interval && o.hi <= p.end)
        };
        let mut checked = 0;
        let mut per_phase: HashMap<String, usize> = HashMap::new();
        // Truth per phase and container: (process counts seen, memory range, CPU % range).
        type PhaseTruth = (Vec<u64>, Option<(u64, u64)>, Option<CpuTruth>);
        let mut ptruth: HashMap<(String, String), PhaseTruth> = HashMap::new();
        for p in &self.phases {
            for (name, e) in &p.expect {
                let s = self.truth_in(truth, p, name);
                let procs: Vec<u64> = s.iter().map(|x| x.1).collect();
                let mems: Vec<u64> = s.iter().filter_map(|x| x.2).collect();
                let mem = mems
                    .iter()
                    .min()
                    .zip(mems.iter().max())
                    .map(|(a, b)| (*a, *b));
                let cpus: Vec<(f64, u64)> =
                    s.iter().filter_map(|x| x.3.map(|c| (x.0, c))).collect();
                let pct = |a: &(f64, u64), b: &(f64, u64)| {
                    b.1.saturating_sub(a.1) as f64 / 1e9 / (b.0 - a.0) / e.cores * 100.0
                };
                let cpu = match (cpus.first(), cpus.last()) {
                    (Some(a), Some(b)) if b.0 - a.0 >= 0.5 => {
                        let mean = pct(a, b);
                        // The kernel's own rate between consecutive samples (each about a
                        // cycle of 0.2 s apart): steady on an idle host, spread when the
                        // hypervisor steals time from the loops.
                        let rates = cpus.windows(2).map(|w| pct(&w[0], &w[1]));
                        let (lo, hi) = rates.fold((mean, mean), |(l, h), r| (l.min(r), h.max(r)));
                        Some(CpuTruth { mean, lo, hi })
                    }
                    _ => None,
                };
                ptruth.insert((p.name.clone(), name.clone()), (procs, mem, cpu));
            }
        }
        if src == "file" {
            for p in &self.phases {
                for (name, e) in &p.expect {
                    let Some((procs, mem, _)) = ptruth.get(&(p.name.clone(), name.clone())) else {
                        continue;
                    };
                    if procs.iter().any(|&n| n != e.processes) {
                        self.harness.push(format!(
                            "phase '{}': {name} had live process counts {procs:?}, the scenario expects {}",
                            p.name, e.processes
                        ));
                    }
                    if let Some((lo, hi)) = mem {
                        if hi - lo > 16 << 20 {
                            self.harness.push(format!(
                                "phase '{}': the memory of {name} was not steady ({lo} ..= {hi} bytes)",
                                p.name
                            ));
                        }
                    }
                }
            }
        }
        for (i, o) in obs.iter().enumerate() {
            if let (Some(w), Some(got)) = (&want_collector, &o.collector) {
                if w != got {
                    out.push(mk(
                        o,
                        "",
                        "",
                        "collector",
                        format!("{got}, the run uses {w}"),
                    ));
                }
            }
            let Some(p) = phase_of(o) else { continue };
            checked += 1;
            *per_phase.entry(p.name.clone()).or_default() += 1;
            for (name, e) in &p.expect {
                let Some(f) = o.containers.get(name) else {
                    out.push(mk(o, &p.name, name, "missing", "not in the cycle".into()));
                    continue;
                };
                let Some((procs, mem, cpu)) = ptruth.get(&(p.name.clone(), name.clone())) else {
                    continue;
                };
                if f.processes != e.processes {
                    out.push(mk(
                        o,
                        &p.name,
                        name,
                        "process_count",
                        format!(
                            "exported {}, live {} (the kernel's list during the phase: {:?})",
                            f.processes,
                            e.processes,
                            dedup(procs)
                        ),
                    ));
                }
                if let Some((lo, hi)) = mem {
                    let (lo, hi) = (
                        *lo as f64 - MEMORY_TOLERANCE_BYTES,
                        *hi as f64 + MEMORY_TOLERANCE_BYTES,
                    );
                    if f.memory_bytes < lo || f.memory_bytes > hi {
                        out.push(mk(o, &p.name, name, "memory", format!(
                            "exported {:.2} MiB, the kernel's figure during the phase {:.2} ..= {:.2} MiB (±2 MiB)",
                            f.memory_bytes / 1048576.0, (lo + MEMORY_TOLERANCE_BYTES) / 1048576.0,
                            (hi - MEMORY_TOLERANCE_BYTES) / 1048576.0
                        )));
                    }
                }
                if let (Some(got), Some(t)) = (f.cpu_pct, cpu) {
                    if got < t.lo - CPU_TOLERANCE_POINTS || got > t.hi + CPU_TOLERANCE_POINTS {
                        out.push(mk(o, &p.name, name, "cpu", format!(
                            "exported {got:.1} %, the cgroup's CPU time over the phase gives {:.1} % (between its samples {:.1} ..= {:.1} %)",
                            t.mean, t.lo, t.hi
                        )));
                    }
                }
                for &(counter, bytes, since) in &e.floors {
                    let k = counter as usize;
                    let before = obs[..i].iter().rev().find(|b| {
                        b.hi < since
                            && b.containers.contains_key(name)
                            && self.instance(name, b) == Some(e.instance)
                    });
                    let Some(before) = before else {
                        self.harness.push(format!(
                            "[{src}] no cycle of {name} before the burst on {} at {since:.3}",
                            counter.name()
                        ));
                        continue;
                    };
                    let base = before.containers[name].counters[k];
                    if f.counters[k] < base + bytes {
                        out.push(mk(
                            o,
                            &p.name,
                            name,
                            "burst",
                            format!(
                                "{} {} < {base} (cycle {}) + {bytes} moved by the test",
                                counter.name(),
                                f.counters[k],
                                before.label
                            ),
                        ));
                    }
                }
            }
        }
        // Counters never go backwards within an instance, in any cycle.
        for name in &names {
            let mut prev: Option<(&Observed, u32)> = None;
            for o in obs {
                let Some(f) = o.containers.get(name) else {
                    continue;
                };
                let Some(inst) = self.instance(name, o) else {
                    self.harness.push(format!(
                        "[{src}] cycle {} of {name} straddles a restart",
                        o.label
                    ));
                    continue;
                };
                if let Some((p, pi)) = prev {
                    if pi == inst {
                        for c in COUNTERS {
                            let (a, b) = (
                                p.containers[name].counters[c as usize],
                                f.counters[c as usize],
                            );
                            if b < a {
                                out.push(mk(
                                    o,
                                    "",
                                    name,
                                    "went backwards",
                                    format!("{} {a} (cycle {}) -> {b}", c.name(), p.label),
                                ));
                            }
                        }
                    }
                }
                prev = Some((o, inst));
            }
        }
        // A restart: the first cycle after it sets the new instance's baseline, and the new
        // instance's counters start afresh.
        for r in &self.restarts {
            let name = &r.name;
            let before = obs
                .iter()
                .rev()
                .find(|o| o.hi < r.stop_begin && o.containers.contains_key(name));
            let after = obs.iter().find(|o| o.lo > r.start_done);
            let (Some(before), Some(after)) = (before, after) else {
                self.harness
                    .push(format!("[{src}] no cycles around the restart of {name}"));
                continue;
            };
            if src == "file" && after.lo - before.lo > 1.5 * interval + (before.hi - before.lo) {
                self.harness.push(format!(
                    "the restart of {name} did not fit in one interval (cycles {} and {})",
                    before.label, after.label
                ));
            }
            let old = &before.containers[name];
            if src == "file" {
                if let Some(f) = after.containers.get(name) {
                    let new_instance_said =
                        f.start_marker.is_some() && f.start_marker != old.start_marker;
                    if !new_instance_said {
                        out.push(mk(after, "restart", name, "cpu across instances", format!(
                            "exported in the first cycle after the restart with cpu {:?} %: a CPU % from the old \
                             instance's baseline (a restart sets a new baseline; the README: it appears from the next cycle)",
                            f.cpu_pct
                        )));
                    }
                }
            }
            if let Some(first_new) = obs
                .iter()
                .find(|o| o.lo > r.start_done && o.containers.contains_key(name))
            {
                let f = &first_new.containers[name];
                for c in COUNTERS {
                    let (o_v, n_v) = (old.counters[c as usize], f.counters[c as usize]);
                    if o_v >= 1 << 20 && n_v >= o_v {
                        out.push(mk(first_new, "restart", name, "counters not afresh", format!(
                            "{} {n_v} in the new instance's first cycle, the old instance ended at {o_v}",
                            c.name()
                        )));
                    }
                }
            }
        }
        if src == "file" {
            // SIGHUP: no cycle lost around it.
            for h in &self.sighups {
                let prev = obs.iter().rev().find(|o| o.lo < h.at);
                let next = obs.iter().find(|o| o.lo > h.at);
                if let (Some(p), Some(n)) = (prev, next) {
                    let res = p.hi - p.lo;
                    if n.lo - p.lo > 1.5 * interval + res {
                        out.push(mk(n, "sighup", "", "cycle lost at SIGHUP", format!(
                            "{:.3} s between cycle {} and {} around the SIGHUP at {:.3}, interval {interval} s",
                            n.lo - p.lo, p.label, n.label, h.at
                        )));
                    }
                } else {
                    out.push(anomaly(
                        "file",
                        "cycle lost at SIGHUP",
                        format!("no cycles around the SIGHUP at {:.3}", h.at),
                    ));
                }
            }
            for p in &self.phases {
                if !per_phase.contains_key(&p.name) {
                    self.harness.push(format!(
                        "phase '{}' ({:.1} s) has no cycle inside it: make it longer",
                        p.name,
                        p.end - p.start
                    ));
                }
            }
        }
        checked
    }

    /// The port `/metrics` listens on, when it does.
    pub fn metrics_port(&self) -> Option<u16> {
        self.port
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stop_scraping.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn dedup(v: &[u64]) -> Vec<u64> {
    let mut d = v.to_vec();
    d.dedup();
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text_becomes_a_cycle() {
        let body = "# HELP x\nlxcmon_last_cycle_timestamp_seconds 1700000000.25\n\
            lxcmon_cycle_duration_seconds 0.004\nlxcmon_collector_info{collector=\"ebpf\"} 1\n\
            lxcmon_container_processes{container_id=\"a\\\"b\",container_name=\"x\"} 7\n\
            lxcmon_container_memory_bytes{container_id=\"a\\\"b\",container_name=\"x\"} 1048576\n\
            lxcmon_container_io_read_bytes_total{container_id=\"a\\\"b\",container_name=\"x\"} 1\n\
            lxcmon_container_io_written_bytes_total{container_id=\"a\\\"b\",container_name=\"x\"} 2\n\
            lxcmon_container_network_receive_bytes_total{container_id=\"a\\\"b\",container_name=\"x\"} 3\n\
            lxcmon_container_network_transmit_bytes_total{container_id=\"a\\\"b\",container_name=\"x\"} 4\n";
        let o = parse_metrics(body).unwrap().unwrap();
        assert_eq!(o.collector.as_deref(), Some("ebpf"));
        assert!((o.hi - o.lo - 0.004).abs() < 1e-5);
        let f = &o.containers["a\"b"];
        assert_eq!(f.processes, 7);
        assert_eq!(f.counters, [1, 2, 3, 4]);
    }
}
