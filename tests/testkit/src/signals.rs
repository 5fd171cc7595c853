//! Ground truth for the signals of issue 12 (pressure, CPU throttling, memory events, per
//! interface, per device, per mount, limits) and a daemon watched while a test drives them.
//!
//! [`Watch`] runs one lxcmon daemon (`records`, `/metrics` on 127.0.0.1) and gathers every
//! cycle it exports, while a thread reads the kernel's own counters of each container
//! ([`Truth`]) every 100 ms, with the time of each reading. The counters only grow, so the
//! figure of a cycle must lie between the last kernel reading before that cycle read the
//! kernel and the first reading after ([`bracket`]): exact to the counter's own resolution, on
//! every cycle, however fast the counter moves. Where the counter stands still (a quiet
//! interface, a finished OOM kill) the bracket is a single value.
//!
//! Values are kept in the export's units under the export's own paths (`pressure.cpu_some_seconds`,
//! `interfaces[eth0].rx_bytes`, `mounts[/mnt/data].used_bytes`; see [`value`]), so one
//! comparison serves every series.

use crate::agent::{AgentConfig, Daemon};
use crate::contract::check_records;
use crate::lab::{CgroupLayout, Container};
use crate::proc::poll;
use crate::scenario::{http_get, RECORDS_READ_GUARD};
use crate::workload::unix_now;
use anyhow::{ensure, Context, Result};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Floats in the export (seconds) may be rounded; the kernel's own resolution is 1 µs (PSI,
/// v2 `throttled_usec`), so a rounding below that is exact.
pub const SECONDS_EPS: f64 = 1e-6;

/// One exported cycle: when it may have read the kernel (`lo ..= hi`, Unix seconds) and the
/// record of each container, by name.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub label: String,
    pub lo: f64,
    pub hi: f64,
    pub records: BTreeMap<String, Map<String, Value>>,
}

/// The kernel's figures of every watched container at one moment (`t_lo ..= t_hi`), by
/// container name, then by export path.
#[derive(Debug, Clone)]
pub struct Sample {
    pub t_lo: f64,
    pub t_hi: f64,
    pub values: BTreeMap<String, BTreeMap<String, f64>>,
}

/// The value at an export path of a record: `a.b` for nested objects, `a[key].b` for an
/// array element whose `name` (interfaces, devices) or `mountpoint` (mounts) is `key`.
/// Numbers only; `None` when any step is missing.
pub fn value(rec: &Map<String, Value>, path: &str) -> Option<f64> {
    let mut cur = rec;
    let mut rest = path;
    loop {
        // One step: up to the next '.' or '['; a key in brackets is taken whole (mount
        // points may contain dots).
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        let (v, tail) = match tail.strip_prefix('[') {
            Some(t) => {
                let (key, t) = t.split_once(']')?;
                let e = cur.get(field)?.as_array()?.iter().find(|e| {
                    ["name", "mountpoint"]
                        .iter()
                        .any(|k| e.get(*k).and_then(Value::as_str) == Some(key))
                })?;
                (e, t)
            }
            None => (cur.get(field)?, tail),
        };
        if tail.is_empty() {
            return v.as_f64();
        }
        cur = v.as_object()?;
        rest = tail.strip_prefix('.')?;
    }
}

/// Reads the kernel's figures of one container, in the export's units and paths.
#[derive(Debug, Clone)]
pub struct Truth {
    pub name: String,
    layout: CgroupLayout,
    init_pid: u32,
    /// The container's directory in the unified tree (pressure: on hybrid hosts too).
    unified: PathBuf,
    cpu: PathBuf,
    memory: PathBuf,
    blkio: PathBuf,
    /// `major:minor` → kernel name of the whole disks seen in the I/O files.
    names: BTreeMap<String, String>,
}

/// `maj:min` → the kernel's name of the block device (`vda`), `maj:min` when it has none.
pub fn block_device_name(dev: &str) -> String {
    fs::read_to_string(format!("/sys/dev/block/{dev}/uevent"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_owned))
        })
        .unwrap_or_else(|| dev.to_owned())
}

/// `key value` lines into a map (cpu.stat, memory.events, memory.oom_control).
fn kv(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

impl Truth {
    pub fn new(c: &Container) -> Result<Self> {
        let unified = c.unified_dir();
        Ok(Self {
            name: c.name.clone(),
            layout: c.layout,
            init_pid: c.init_pid()?,
            unified,
            cpu: c.cgroup_dir("cpu"),
            memory: c.cgroup_dir("memory"),
            blkio: c.cgroup_dir("blkio"),
            names: BTreeMap::new(),
        })
    }

    /// Host pid of the container's init (read once: the tests restart nothing).
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// Everything this module knows how to read; a file that is missing leaves its paths out
    /// (the check then reports the export's figure as unverified, not as wrong).
    pub fn read(&mut self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        self.pressure(&mut out);
        self.throttling(&mut out);
        self.memory_events(&mut out);
        self.interfaces(&mut out);
        self.devices(&mut out);
        out
    }

    fn pressure(&self, out: &mut BTreeMap<String, f64>) {
        for res in ["cpu", "memory", "io"] {
            let Ok(text) = fs::read_to_string(self.unified.join(format!("{res}.pressure"))) else {
                continue;
            };
            for line in text.lines() {
                let mut f = line.split_whitespace();
                let Some(kind) = f.next() else { continue };
                let total = f.find_map(|t| t.strip_prefix("total="));
                if let Some(us) = total.and_then(|t| t.parse::<u64>().ok()) {
                    out.insert(format!("pressure.{res}_{kind}_seconds"), us as f64 / 1e6);
                }
            }
        }
    }

    fn throttling(&self, out: &mut BTreeMap<String, f64>) {
        let dir = match self.layout {
            CgroupLayout::V1 => &self.cpu,
            CgroupLayout::V2 => &self.unified,
        };
        let Ok(text) = fs::read_to_string(dir.join("cpu.stat")) else {
            return;
        };
        let m = kv(&text);
        if let (Some(p), Some(t)) = (m.get("nr_periods"), m.get("nr_throttled")) {
            out.insert("cpu_throttling.periods".into(), *p as f64);
            out.insert("cpu_throttling.throttled_periods".into(), *t as f64);
        }
        let secs = match (m.get("throttled_time"), m.get("throttled_usec")) {
            (Some(ns), _) if self.layout == CgroupLayout::V1 => Some(*ns as f64 / 1e9),
            (_, Some(us)) => Some(*us as f64 / 1e6),
            _ => None,
        };
        if let Some(s) = secs {
            out.insert("cpu_throttling.throttled_seconds".into(), s);
        }
    }

    fn memory_events(&self, out: &mut BTreeMap<String, f64>) {
        match self.layout {
            CgroupLayout::V1 => {
                if let Ok(t) = fs::read_to_string(self.memory.join("memory.oom_control")) {
                    if let Some(n) = kv(&t).get("oom_kill") {
                        out.insert("memory_events.oom_kill".into(), *n as f64);
                    }
                }
                // A charge fails at one of the two limits, memory or memory+swap, never both:
                // limit hits are the sum of their `failcnt`s (the second may be absent).
                let failcnt = |f: &str| -> Option<u64> {
                    fs::read_to_string(self.memory.join(f))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()
                };
                if let Some(n) = failcnt("memory.failcnt") {
                    let memsw = failcnt("memory.memsw.failcnt").unwrap_or(0);
                    out.insert("memory_events.max".into(), (n + memsw) as f64);
                }
            }
            CgroupLayout::V2 => {
                if let Ok(t) = fs::read_to_string(self.unified.join("memory.events")) {
                    for (k, v) in kv(&t) {
                        out.insert(format!("memory_events.{k}"), v as f64);
                    }
                }
            }
        }
    }

    /// The container's own `/proc/net/dev`, every interface but `lo`.
    fn interfaces(&self, out: &mut BTreeMap<String, f64>) {
        let Ok(text) = fs::read_to_string(format!("/proc/{}/net/dev", self.init_pid)) else {
            return;
        };
        const FIELDS: [(usize, &str); 8] = [
            (0, "rx_bytes"),
            (1, "rx_packets"),
            (2, "rx_errors"),
            (3, "rx_drops"),
            (8, "tx_bytes"),
            (9, "tx_packets"),
            (10, "tx_errors"),
            (11, "tx_drops"),
        ];
        for l in text.lines().skip(2) {
            let Some((iface, rest)) = l.split_once(':') else {
                continue;
            };
            let iface = iface.trim();
            if iface == "lo" {
                continue;
            }
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if f.len() < 16 {
                continue;
            }
            for (i, key) in FIELDS {
                out.insert(format!("interfaces[{iface}].{key}"), f[i] as f64);
            }
        }
    }

    fn name_of(&mut self, dev: &str) -> String {
        self.names
            .entry(dev.to_owned())
            .or_insert_with(|| block_device_name(dev))
            .clone()
    }

    fn devices(&mut self, out: &mut BTreeMap<String, f64>) {
        match self.layout {
            CgroupLayout::V1 => {
                for (file, read_key, write_key) in [
                    (
                        "blkio.throttle.io_service_bytes_recursive",
                        "read_bytes",
                        "write_bytes",
                    ),
                    ("blkio.throttle.io_serviced_recursive", "reads", "writes"),
                ] {
                    let Ok(text) = fs::read_to_string(self.blkio.join(file)) else {
                        continue;
                    };
                    for l in text.lines() {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        let [dev, op, n] = f[..] else { continue };
                        let Ok(n) = n.parse::<u64>() else { continue };
                        let key = match op {
                            "Read" => read_key,
                            "Write" => write_key,
                            _ => continue,
                        };
                        let name = self.name_of(dev);
                        out.insert(format!("devices[{name}].{key}"), n as f64);
                    }
                }
            }
            CgroupLayout::V2 => {
                let Ok(text) = fs::read_to_string(self.unified.join("io.stat")) else {
                    return;
                };
                for l in text.lines() {
                    let mut f = l.split_whitespace();
                    let Some(dev) = f.next() else { continue };
                    let name = self.name_of(dev);
                    for tok in f {
                        let Some((k, v)) = tok.split_once('=') else {
                            continue;
                        };
                        let key = match k {
                            "rbytes" => "read_bytes",
                            "wbytes" => "write_bytes",
                            "rios" => "reads",
                            "wios" => "writes",
                            _ => continue,
                        };
                        if let Ok(v) = v.parse::<u64>() {
                            out.insert(format!("devices[{name}].{key}"), v as f64);
                        }
                    }
                }
            }
        }
    }
}

/// The whole disk a path is on (`maj:min`, kernel name): the parent of a partition, as the
/// cgroup I/O files count it.
pub fn disk_of(path: &Path) -> Result<(String, String)> {
    let st = rustix::fs::stat(path).with_context(|| format!("stat {}", path.display()))?;
    let dev = format!(
        "{}:{}",
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev)
    );
    let sys = Path::new("/sys/dev/block").join(&dev);
    let dev = if sys.join("partition").exists() {
        let parent = fs::canonicalize(&sys)?.join("..").join("dev");
        fs::read_to_string(&parent)
            .with_context(|| format!("reading {}", parent.display()))?
            .trim()
            .to_owned()
    } else {
        dev
    };
    let name = block_device_name(&dev);
    Ok((dev, name))
}

/// `statvfs` of `path` as the export's `mounts` keys: size, used, avail bytes (as `df`),
/// inodes, inodes_free.
pub fn statvfs_figures(path: &Path) -> Result<BTreeMap<&'static str, f64>> {
    let s = rustix::fs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    let bs = s.f_frsize;
    Ok(BTreeMap::from([
        ("size_bytes", (s.f_blocks * bs) as f64),
        ("used_bytes", ((s.f_blocks - s.f_bfree) * bs) as f64),
        ("avail_bytes", (s.f_bavail * bs) as f64),
        ("inodes", s.f_files as f64),
        ("inodes_free", s.f_ffree as f64),
    ]))
}

#[derive(Default)]
struct Gathered {
    cycles: BTreeMap<String, Cycle>,
    samples: Vec<Sample>,
    errors: Vec<String>,
}

fn parse_cycles(v: &Value) -> Result<Vec<Cycle>> {
    let mut out = Vec::new();
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
        let mut records = BTreeMap::new();
        for r in c.records {
            let id = r
                .get("container_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            records.insert(id, r);
        }
        out.push(Cycle {
            label,
            lo,
            hi: lo + res + RECORDS_READ_GUARD,
            records,
        });
    }
    Ok(out)
}

/// One daemon (`records`, `/metrics`), its cycles gathered, and the kernel sampled.
pub struct Watch {
    pub cfg: AgentConfig,
    daemon: Option<Daemon>,
    pub port: u16,
    truths: Arc<Mutex<Vec<Truth>>>,
    gathered: Arc<Mutex<Gathered>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn sample(truths: &Mutex<Vec<Truth>>) -> Option<Sample> {
    let mut ts = truths.lock().ok()?;
    let t_lo = unix_now();
    let values = ts.iter_mut().map(|t| (t.name.clone(), t.read())).collect();
    Some(Sample {
        t_lo,
        t_hi: unix_now(),
        values,
    })
}

impl Watch {
    /// Starts the daemon (interval `interval` s, the suite's collector, `cfg_edit` for
    /// anything else) and waits until one cycle exports all `containers`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        interval: f64,
        containers: &[&Container],
        cfg_edit: impl FnOnce(&mut AgentConfig),
    ) -> Result<Self> {
        let mut cfg = AgentConfig::new(dir, "records");
        cfg.check_interval = interval;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        cfg.prometheus_listen = Some(format!("127.0.0.1:{port}"));
        cfg_edit(&mut cfg);
        let truths: Vec<Truth> = containers
            .iter()
            .map(|c| Truth::new(c))
            .collect::<Result<_>>()?;
        let truths = Arc::new(Mutex::new(truths));
        let gathered = Arc::new(Mutex::new(Gathered::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (t, g, stop) = (truths.clone(), gathered.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let (Some(s), Ok(mut g)) = (sample(&t), g.lock()) {
                        g.samples.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }));
        }
        let daemon = Daemon::start(bin, &cfg)?;
        {
            let (g, stop, path) = (gathered.clone(), stop.clone(), cfg.export_file());
            threads.push(std::thread::spawn(move || loop {
                let last = stop.load(Ordering::SeqCst);
                poll_file(&g, &path);
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }));
        }
        let mut w = Self {
            cfg,
            daemon: Some(daemon),
            port,
            truths,
            gathered,
            stop,
            threads,
        };
        let names: Vec<String> = containers.iter().map(|c| c.name.clone()).collect();
        let t0 = unix_now();
        w.wait_cycle(Duration::from_secs(30), |c| {
            c.lo >= t0 - 1.0 && names.iter().all(|n| c.records.contains_key(n))
        })
        .with_context(|| format!("no exported cycle with all of {names:?}"))?;
        Ok(w)
    }

    fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Daemon::running)
    }

    /// The daemon's stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.cfg.dir.join("daemon.stderr")).unwrap_or_default()
    }

    /// The cycles gathered so far, oldest first.
    pub fn cycles(&self) -> Vec<Cycle> {
        self.gathered
            .lock()
            .map(|g| g.cycles.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The kernel samples so far, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.gathered
            .lock()
            .map(|g| g.samples.clone())
            .unwrap_or_default()
    }

    /// The kernel's figures now (one extra sample, also kept).
    pub fn sample_now(&self) -> Result<Sample> {
        let s = sample(&self.truths).context("sampling the kernel")?;
        if let Ok(mut g) = self.gathered.lock() {
            g.samples.push(s.clone());
        }
        Ok(s)
    }

    /// Waits (up to `timeout`) for a gathered cycle that satisfies `pred`; returns the first.
    pub fn wait_cycle(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Cycle) -> bool,
    ) -> Result<Cycle> {
        let found = poll(timeout, || {
            ensure!(self.running(), "lxcmon exited: {}", self.stderr());
            Ok(self.cycles().into_iter().find(|c| pred(c)))
        })?;
        found.with_context(|| format!("no such cycle within {timeout:?}"))
    }

    /// The first cycle that started after now.
    pub fn next_cycle(&mut self) -> Result<Cycle> {
        let now = unix_now();
        let wait = Duration::from_secs_f64(5.0 + 3.0 * self.cfg.check_interval);
        self.wait_cycle(wait, |c| c.lo > now)
    }

    /// `GET /metrics`, with the kernel sampled just before and just after.
    pub fn scrape(&self) -> Result<(Sample, String, Sample)> {
        let before = self.sample_now()?;
        let body = http_get(self.port, "/metrics")?;
        let after = self.sample_now()?;
        Ok((before, body, after))
    }

    /// Stops the daemon (SIGTERM) and the threads; fails on errors the threads met.
    pub fn finish(mut self) -> Result<()> {
        let out = self
            .daemon
            .take()
            .context("no daemon")?
            .terminate(Duration::from_secs(20));
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let out = out?;
        ensure!(
            out.status.success(),
            "lxcmon exited with {} after SIGTERM:\n{}",
            out.status,
            out.stderr
        );
        let errors = self
            .gathered
            .lock()
            .map(|g| g.errors.clone())
            .unwrap_or_default();
        ensure!(errors.is_empty(), "the export: {}", errors.join("; "));
        Ok(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Re-reads the export and adds the cycles not seen before.
fn poll_file(g: &Mutex<Gathered>, path: &Path) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let parsed = serde_json::from_str::<Value>(&text)
        .context("not JSON")
        .and_then(|v| parse_cycles(&v));
    let Ok(mut g) = g.lock() else { return };
    match parsed {
        Ok(cycles) => {
            for c in cycles {
                g.cycles.entry(c.label.clone()).or_insert(c);
            }
        }
        // The daemon replaces the file atomically, so a partial read is a defect.
        Err(e) => {
            let e = format!("{e:#}");
            if !g.errors.contains(&e) {
                g.errors.push(e);
            }
        }
    }
}

/// The last sample that ended before `t` and the first that began after `t2`.
pub fn around(samples: &[Sample], t: f64, t2: f64) -> (Option<&Sample>, Option<&Sample>) {
    let before = samples.iter().rev().find(|s| s.t_hi <= t);
    let after = samples.iter().find(|s| s.t_lo >= t2);
    (before, after)
}

/// What [`bracket`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Bracketed {
    /// Cycles with kernel readings on both sides.
    pub checked: usize,
    /// Of those, cycles where every figure had one value before and after (the counters stood
    /// still): there the check is exact, however fast the counters move at other times.
    pub exact: usize,
    pub mismatches: Vec<String>,
}

/// Checks `paths` of `container` in every cycle that started at or after `from` against the
/// kernel samples around it: `before - eps <= figure <= after + eps`. A figure the export
/// lacks while the kernel has it is a mismatch.
pub fn bracket(
    cycles: &[Cycle],
    samples: &[Sample],
    container: &str,
    paths: &[String],
    from: f64,
) -> Bracketed {
    let mut checked = 0;
    let mut exact = 0;
    let mut bad = Vec::new();
    for c in cycles.iter().filter(|c| c.lo >= from) {
        let Some(rec) = c.records.get(container) else {
            bad.push(format!("cycle {}: no record of {container}", c.label));
            continue;
        };
        let (Some(b), Some(a)) = around(samples, c.lo, c.hi) else {
            continue;
        };
        checked += 1;
        let mut still = true;
        for p in paths {
            let (Some(lo), Some(hi)) = (
                b.values.get(container).and_then(|m| m.get(p)),
                a.values.get(container).and_then(|m| m.get(p)),
            ) else {
                continue;
            };
            still &= lo == hi;
            let eps = if p.ends_with("_seconds") {
                SECONDS_EPS
            } else {
                0.0
            };
            match value(rec, p) {
                None => bad.push(format!(
                    "cycle {}: {container} {p} absent, the kernel has {lo}",
                    c.label
                )),
                Some(v) if v < lo - eps || v > hi + eps => bad.push(format!(
                    "cycle {}: {container} {p} = {v}, the kernel had {lo} before and {hi} after",
                    c.label
                )),
                Some(_) => {}
            }
        }
        exact += usize::from(still);
    }
    Bracketed {
        checked,
        exact,
        mismatches: bad,
    }
}

/// The value of the series `name` whose labels include every pair of `labels`, in a
/// `/metrics` body.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, want)| rest.contains(&format!("{k}=\"{}\"", escape(want))));
        all.then(|| v.parse().ok())?
    })
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A figure's growth between the records of `container` in two cycles.
pub fn growth(a: &Cycle, b: &Cycle, container: &str, path: &str) -> Result<f64> {
    let get = |c: &Cycle| -> Result<f64> {
        c.records
            .get(container)
            .and_then(|r| value(r, path))
            .with_context(|| format!("cycle {}: no {path} for {container}", c.label))
    };
    Ok(get(b)? - get(a)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_walks_objects_and_named_array_elements() {
        let v: Value = serde_json::json!({
            "pressure": {"cpu_some_seconds": 1.5},
            "interfaces": [{"name": "eth0", "rx_bytes": 10}, {"name": "eth1", "rx_bytes": 20}],
            "mounts": [{"mountpoint": "/mnt/data.1", "size_bytes": 7}],
        });
        let r = v.as_object().unwrap();
        assert_eq!(value(r, "pressure.cpu_some_seconds"), Some(1.5));
        assert_eq!(value(r, "interfaces[eth1].rx_bytes"), Some(20.0));
        assert_eq!(value(r, "mounts[/mnt/data.1].size_bytes"), Some(7.0));
        assert_eq!(value(r, "interfaces[eth2].rx_bytes"), None);
        assert_eq!(value(r, "pressure.io_some_seconds"), None);
    }

    #[test]
    fn metric_matches_name_and_labels() {
        let body = "# HELP x\nlxcmon_a{container_id=\"c1\",interface=\"eth0\"} 5\n\
                    lxcmon_a{container_id=\"c2\",interface=\"eth0\"} 6\nlxcmon_ab 7\n";
        assert_eq!(
            metric(
                body,
                "lxcmon_a",
                &[("container_id", "c2"), ("interface", "eth0")]
            ),
            Some(6.0)
        );
        assert_eq!(metric(body, "lxcmon_a", &[("container_id", "c3")]), None);
        assert_eq!(metric(body, "lxcmon_ab", &[]), Some(7.0));
    }

    #[test]
    fn bracket_accepts_values_between_the_readings_around_a_cycle() {
        let rec = |v: f64| {
            let mut m = Map::new();
            m.insert("x".into(), serde_json::json!({ "n": v }));
            BTreeMap::from([("c".to_owned(), m)])
        };
        let s = |t: f64, v: f64| Sample {
            t_lo: t,
            t_hi: t + 0.01,
            values: BTreeMap::from([("c".into(), BTreeMap::from([("x.n".into(), v)]))]),
        };
        let samples = vec![s(0.0, 10.0), s(1.0, 12.0), s(2.0, 15.0)];
        let cyc = |lo: f64, v: f64| Cycle {
            label: format!("{lo}"),
            lo,
            hi: lo + 0.5,
            records: rec(v),
        };
        let paths = vec!["x.n".to_owned()];
        let ok = [cyc(0.1, 11.0), cyc(0.1, 10.0), cyc(0.1, 12.0)];
        let b = bracket(&ok, &samples, "c", &paths, 0.0);
        assert_eq!((b.checked, b.exact, b.mismatches.len()), (3, 0, 0));
        let b = bracket(&[cyc(0.1, 9.0), cyc(1.1, 16.0)], &samples, "c", &paths, 0.0);
        assert_eq!((b.checked, b.mismatches.len()), (2, 2));
        // Where the counter stood still the check is exact.
        let still = vec![s(0.0, 10.0), s(1.0, 10.0)];
        let b = bracket(&[cyc(0.1, 10.0), cyc(0.2, 10.5)], &still, "c", &paths, 0.0);
        assert_eq!((b.checked, b.exact, b.mismatches.len()), (2, 2, 1));
    }
}
