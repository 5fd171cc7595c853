//! The BPF programs loaded on the host, as `bpftool prog show` lists them: which ones this
//! process holds, and their run time and count (`kernel.bpf_stats_enabled`).

use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashSet};
use std::process::Command;

const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn prog_show() -> Result<String> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .context("bpftool prog show")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Programs whose (15-character) name starts with `prefix` that this process holds a
/// descriptor of: their ids from `/proc/self/fdinfo` (`prog_id:`), names from bpftool.
pub fn own_programs(prefix: &str) -> Result<usize> {
    let ids: HashSet<u64> = std::fs::read_dir("/proc/self/fdinfo")?
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    Ok(prog_show()?
        .lines()
        .filter(|l| {
            let id = l
                .split(':')
                .next()
                .and_then(|v| v.trim().parse::<u64>().ok());
            let name = l.split_whitespace().skip_while(|w| *w != "name").nth(1);
            id.is_some_and(|id| ids.contains(&id)) && name.is_some_and(|n| n.starts_with(prefix))
        })
        .count())
}

/// What the kernel counts of a program's runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runs {
    /// Kernel time of its runs, ns (0 unless [`Stats`] is on).
    pub time_ns: u64,
    /// Its runs (0 unless [`Stats`] is on).
    pub count: u64,
    /// Runs the kernel skipped because the program was already running on that CPU.
    pub recursion_misses: u64,
}

/// [`Runs`] of the programs whose name starts with `prefix`, summed per name.
pub fn prog_stats(prefix: &str) -> Result<BTreeMap<String, Runs>> {
    let mut m: BTreeMap<String, Runs> = BTreeMap::new();
    for line in prog_show()?.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let after = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
        let Some(name) = after("name").filter(|n| n.starts_with(prefix)) else {
            continue;
        };
        let num = |k: &str| after(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let e = m.entry(name.to_string()).or_default();
        e.time_ns += num("run_time_ns");
        e.count += num("run_cnt");
        e.recursion_misses += num("recursion_misses");
    }
    Ok(m)
}

/// `kernel.bpf_stats_enabled` on while it lives, set back to what it was on drop.
pub struct Stats {
    old: String,
}

impl Stats {
    pub fn on() -> Result<Self> {
        let old = std::fs::read_to_string(STATS).context(STATS)?;
        std::fs::write(STATS, "1").context(STATS)?;
        Ok(Self {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for Stats {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS, &self.old);
    }
}
