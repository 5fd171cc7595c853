//! Ground truth for run-queue wait: the kernel's own per-task scheduler statistics
//! (`/proc/<tid>/schedstat`: time on the CPU, time waiting on a run queue (`run_delay`), and
//! the number of times the task ran after waiting (`pcount`)), summed over the tasks of a
//! cgroup v2 subtree; and a context-switch-heavy benchmark (`perf bench sched pipe`).

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// One task's scheduler statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedStat {
    pub run_ns: u64,
    pub run_delay_ns: u64,
    pub pcount: u64,
}

/// Parses `/proc/<tid>/schedstat` (three numbers).
pub fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut f = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    Some(SchedStat {
        run_ns: f.next()??,
        run_delay_ns: f.next()??,
        pcount: f.next()??,
    })
}

/// Every thread of the cgroup v2 subtree at `dir` (its `cgroup.threads` and its
/// descendants'), with its statistics; tasks that exit while they are read are left out.
pub fn subtree(dir: &Path) -> Result<BTreeMap<u32, SchedStat>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let threads = fs::read_to_string(d.join("cgroup.threads"))
            .with_context(|| format!("reading {}/cgroup.threads", d.display()))?;
        for tid in threads.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if let Some(s) = fs::read_to_string(format!("/proc/{tid}/schedstat"))
                .ok()
                .as_deref()
                .and_then(parse_schedstat)
            {
                out.insert(tid, s);
            }
        }
        for e in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                dirs.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Growth of the summed statistics between two [`subtree`] readings, over the tasks present
/// in both; also whether the set of tasks stayed the same.
pub fn growth(
    before: &BTreeMap<u32, SchedStat>,
    after: &BTreeMap<u32, SchedStat>,
) -> (SchedStat, bool) {
    let mut g = SchedStat::default();
    for (tid, a) in after {
        if let Some(b) = before.get(tid) {
            g.run_ns += a.run_ns.saturating_sub(b.run_ns);
            g.run_delay_ns += a.run_delay_ns.saturating_sub(b.run_delay_ns);
            g.pcount += a.pcount.saturating_sub(b.pcount);
        }
    }
    let same = before.keys().eq(after.keys());
    (g, same)
}

/// Runs `perf bench sched pipe -l <loops>` (two tasks passing a byte through a pipe pair,
/// two context switches per round trip), in the cgroup v2 directory `cgroup` when given, both
/// tasks on CPU 0 when `one_cpu` (pure context switches; across CPUs a round trip is mostly
/// cross-CPU wakeups and idle exits), and returns the time it reports.
pub fn sched_pipe(cgroup: Option<&Path>, loops: u32, one_cpu: bool) -> Result<Duration> {
    let enter = cgroup
        .map(|d| format!("echo $$ > {}/cgroup.procs && ", d.display()))
        .unwrap_or_default();
    let pin = if one_cpu { "taskset -c 0 " } else { "" };
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("{enter}exec {pin}perf bench sched pipe -l {loops}"),
        ])
        .output()
        .context("running perf bench sched pipe (package linux-perf)")?;
    if !out.status.success() {
        bail!(
            "perf bench sched pipe: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let secs = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Total time:")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .with_context(|| format!("no `Total time:` in perf's output: {text}"))?;
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sums_schedstat() {
        assert_eq!(
            parse_schedstat("328357 56684 17\n"),
            Some(SchedStat {
                run_ns: 328357,
                run_delay_ns: 56684,
                pcount: 17
            })
        );
        assert_eq!(parse_schedstat("1 2"), None);
        let s = |d, p| SchedStat {
            run_ns: 0,
            run_delay_ns: d,
            pcount: p,
        };
        let before = BTreeMap::from([(1, s(10, 1)), (2, s(20, 2))]);
        let after = BTreeMap::from([(1, s(15, 3)), (2, s(30, 2))]);
        assert_eq!(growth(&before, &after), (s(15, 2), true));
        let after = BTreeMap::from([(1, s(15, 3)), (3, s(99, 9))]);
        assert_eq!(growth(&before, &after), (s(5, 2), false));
    }
}
