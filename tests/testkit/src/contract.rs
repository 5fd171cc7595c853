//! Field-by-field checks of an export against `shared/spec/export-formats.md`.

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

/// Fails on any `null` anywhere in `v`, naming where.
pub fn no_nulls(v: &Value, at: &str) -> Result<()> {
    match v {
        Value::Null => bail!("null at {at}"),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, x)| no_nulls(x, &format!("{at}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .try_for_each(|(k, x)| no_nulls(x, &format!("{at}.{k}"))),
        _ => Ok(()),
    }
}

/// Whether `s` matches `pat`, where `d` in the pattern stands for one ASCII digit.
fn shape(s: &str, pat: &str) -> bool {
    s.len() == pat.len()
        && s.bytes().zip(pat.bytes()).all(|(c, p)| match p {
            b'd' => c.is_ascii_digit(),
            _ => c == p,
        })
}

/// `2024-08-14T22:04:45Z` or with sub-second digits `2024-08-14T22:04:45.5Z`.
pub fn parse_records_timestamp(s: &str) -> Result<DateTime<Utc>> {
    let ok = s.is_ascii() && s.len() >= 20 && shape(&s[..19], "dddd-dd-ddTdd:dd:dd") && {
        let tail = &s[19..];
        tail == "Z"
            || (tail.len() > 2
                && tail.starts_with('.')
                && tail.ends_with('Z')
                && tail[1..tail.len() - 1].bytes().all(|b| b.is_ascii_digit()))
    };
    ensure!(ok, "records timestamp {s:?} is not RFC 3339 UTC with Z");
    Ok(DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("records timestamp {s:?}"))?
        .with_timezone(&Utc))
}

/// `2025-12-24T13:33:20.628660`: naive, exactly 6 fractional digits.
pub fn parse_aml_timestamp(s: &str) -> Result<NaiveDateTime> {
    ensure!(
        shape(s, "dddd-dd-ddTdd:dd:dd.dddddd"),
        "autoscale_ml timestamp {s:?} is not naive with 6 fractional digits"
    );
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.6f")
        .with_context(|| format!("autoscale_ml timestamp {s:?}"))
}

fn obj<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .with_context(|| format!("{at} is not an object: {v}"))
}

pub fn get_u64(o: &Map<String, Value>, key: &str, at: &str) -> Result<u64> {
    let v = o.get(key).with_context(|| format!("{at}: missing {key}"))?;
    v.as_u64()
        .with_context(|| format!("{at}.{key} is not a non-negative integer: {v}"))
}

pub fn get_f64(o: &Map<String, Value>, key: &str, at: &str) -> Result<f64> {
    let v = o.get(key).with_context(|| format!("{at}: missing {key}"))?;
    let x = v
        .as_f64()
        .with_context(|| format!("{at}.{key} is not a number: {v}"))?;
    ensure!(
        x.is_finite() && x >= 0.0,
        "{at}.{key} = {x} is not a finite non-negative number"
    );
    Ok(x)
}

pub fn get_str<'a>(o: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str> {
    let v = o.get(key).with_context(|| format!("{at}: missing {key}"))?;
    v.as_str()
        .with_context(|| format!("{at}.{key} is not a string: {v}"))
}

/// One cycle of a `records` export.
#[derive(Debug)]
pub struct RecordsCycle {
    pub timestamp: DateTime<Utc>,
    pub records: Vec<Map<String, Value>>,
}

impl RecordsCycle {
    pub fn get(&self, id: &str) -> Option<&Map<String, Value>> {
        self.records
            .iter()
            .find(|r| r.get("container_id").and_then(Value::as_str) == Some(id))
    }
}

/// Checks a `records` export and splits it into cycles (runs of one timestamp). Checks: an
/// array of objects, every documented key with its type, no nulls, RFC 3339 `Z` timestamps,
/// cpu 0..=100, a container at most once per cycle, cycles strictly increasing in time.
pub fn check_records(v: &Value) -> Result<Vec<RecordsCycle>> {
    no_nulls(v, "$")?;
    let arr = v.as_array().context("records export is not an array")?;
    let mut cycles: Vec<RecordsCycle> = Vec::new();
    let mut last_ts: Option<String> = None;
    for (i, r) in arr.iter().enumerate() {
        let at = format!("$[{i}]");
        let o = obj(r, &at)?;
        let id = get_str(o, "container_id", &at)?;
        ensure!(!id.is_empty(), "{at}.container_id is empty");
        let ts_s = get_str(o, "timestamp", &at)?;
        let ts = parse_records_timestamp(ts_s).with_context(|| at.clone())?;
        let cpu = get_f64(o, "cpu_usage", &at)?;
        ensure!(cpu <= 100.0, "{at}.cpu_usage = {cpu} is over 100");
        get_f64(o, "memory_usage", &at)?;
        get_f64(o, "swap_usage", &at)?;
        for k in [
            "io_read_bytes",
            "io_write_bytes",
            "network_received_bytes",
            "network_transmitted_bytes",
            "process_count",
        ] {
            get_u64(o, k, &at)?;
        }
        let fs_at = format!("{at}.filesystem_usage");
        let fsu = obj(
            o.get("filesystem_usage")
                .with_context(|| format!("{at}: missing filesystem_usage"))?,
            &fs_at,
        )?;
        let total = get_u64(fsu, "total", &fs_at)?;
        let used = get_u64(fsu, "used", &fs_at)?;
        let free = get_u64(fsu, "free", &fs_at)?;
        ensure!(
            used <= total && free <= total,
            "{fs_at}: used {used} / free {free} exceed total {total}"
        );
        if last_ts.as_deref() == Some(ts_s) {
            let cur = cycles.last_mut().context("no cycle")?;
            ensure!(
                cur.get(id).is_none(),
                "{at}: container {id} twice in the cycle {ts_s}"
            );
            cur.records.push(o.clone());
        } else {
            if let Some(prev) = cycles.last() {
                ensure!(
                    ts > prev.timestamp,
                    "{at}: cycle timestamp {ts_s} not after the previous cycle's {}",
                    prev.timestamp
                );
            }
            cycles.push(RecordsCycle {
                timestamp: ts,
                records: vec![o.clone()],
            });
            last_ts = Some(ts_s.to_owned());
        }
    }
    Ok(cycles)
}

/// One cycle of an `autoscale_ml` export.
#[derive(Debug)]
pub struct AmlCycle {
    pub timestamp: NaiveDateTime,
    pub containers: Map<String, Value>,
    pub summary: Map<String, Value>,
}

/// The eleven keys every container entry carries.
pub const AML_KEYS: [&str; 11] = [
    "timestamp",
    "cpu_usage_percent",
    "memory_usage_mb",
    "swap_usage_mb",
    "swap_total_mb",
    "process_count",
    "io_stats",
    "network_usage",
    "filesystem_usage_gb",
    "filesystem_total_gb",
    "filesystem_free_gb",
];

/// Checks an `autoscale_ml` export: one object per cycle, `summary` plus container objects
/// with all eleven keys typed as documented, no nulls, one naive 6-digit timestamp per cycle,
/// summary counts agreeing with the cycle, cycles strictly increasing in time, no empty cycle.
pub fn check_autoscale_ml(v: &Value) -> Result<Vec<AmlCycle>> {
    no_nulls(v, "$")?;
    let arr = v
        .as_array()
        .context("autoscale_ml export is not an array")?;
    let mut cycles: Vec<AmlCycle> = Vec::new();
    for (i, c) in arr.iter().enumerate() {
        let at = format!("$[{i}]");
        let o = obj(c, &at)?;
        let summary = obj(
            o.get("summary")
                .with_context(|| format!("{at}: no summary"))?,
            &format!("{at}.summary"),
        )?;
        let sat = format!("{at}.summary");
        let start = parse_aml_timestamp(get_str(summary, "collection_start_time", &sat)?)?;
        let end = parse_aml_timestamp(get_str(summary, "collection_end_time", &sat)?)?;
        ensure!(start <= end, "{sat}: collection ends before it starts");
        let total = get_u64(summary, "total_containers", &sat)?;
        let collected = get_u64(summary, "collected_containers", &sat)?;
        get_f64(summary, "total_duration_seconds", &sat)?;
        get_f64(summary, "monitor_cpu_percent", &sat)?;
        get_f64(summary, "monitor_memory_usage_mb", &sat)?;

        let mut containers = Map::new();
        let mut ts: Option<String> = None;
        for (id, entry) in o.iter().filter(|(k, _)| k.as_str() != "summary") {
            let cat = format!("{at}[{id:?}]");
            let e = obj(entry, &cat)?;
            for k in AML_KEYS {
                ensure!(e.contains_key(k), "{cat}: missing {k}");
            }
            let t = get_str(e, "timestamp", &cat)?;
            parse_aml_timestamp(t).with_context(|| cat.clone())?;
            match &ts {
                None => ts = Some(t.to_owned()),
                Some(prev) => ensure!(
                    prev == t,
                    "{cat}: timestamp {t} differs from {prev} in the same cycle"
                ),
            }
            let cpu = get_f64(e, "cpu_usage_percent", &cat)?;
            ensure!(cpu <= 100.0, "{cat}.cpu_usage_percent = {cpu} is over 100");
            // The other plain numbers (timestamp, CPU, processes and the two objects have their
            // own checks).
            for k in AML_KEYS.iter().filter(|k| {
                !matches!(
                    **k,
                    "timestamp"
                        | "cpu_usage_percent"
                        | "process_count"
                        | "io_stats"
                        | "network_usage"
                )
            }) {
                get_f64(e, k, &cat)?;
            }
            get_u64(e, "process_count", &cat)?;
            let io = obj(&e["io_stats"], &format!("{cat}.io_stats"))?;
            get_u64(io, "reads", &format!("{cat}.io_stats"))?;
            get_u64(io, "writes", &format!("{cat}.io_stats"))?;
            let net = obj(&e["network_usage"], &format!("{cat}.network_usage"))?;
            get_u64(net, "rx_bytes", &format!("{cat}.network_usage"))?;
            get_u64(net, "tx_bytes", &format!("{cat}.network_usage"))?;
            containers.insert(id.clone(), entry.clone());
        }
        let Some(ts) = ts else {
            bail!("{at}: a cycle without containers (the contract says: write nothing)");
        };
        ensure!(
            collected == containers.len() as u64,
            "{sat}.collected_containers = {collected} but the cycle has {} containers",
            containers.len()
        );
        ensure!(
            total >= collected,
            "{sat}: total_containers {total} < collected_containers {collected}"
        );
        let timestamp = parse_aml_timestamp(&ts)?;
        if let Some(prev) = cycles.last() {
            ensure!(
                timestamp > prev.timestamp,
                "{at}: cycle timestamp {ts} not after the previous cycle's {}",
                prev.timestamp
            );
        }
        cycles.push(AmlCycle {
            timestamp,
            containers,
            summary: summary.clone(),
        });
    }
    Ok(cycles)
}
