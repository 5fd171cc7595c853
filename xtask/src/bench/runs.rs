//! The measurement runs: the agent against the fleet per collector, the rate search at the
//! largest fleet, and the export bench.

use super::measure::{Agent, AgentConfig, Floor, RunStats};
use super::report::{CollectorRow, ExportRow, FilesRow, RateRow};
use super::{bpfcost, check_interrupted, fleet, BenchArgs};
use crate::deps;
use anyhow::{bail, Context, Result};
use fleet::Fleet;
use std::path::Path;
use std::time::Duration;

pub fn export_bench() -> Result<Vec<ExportRow>> {
    let out = deps::cargo_cmd()
        .args([
            "bench", "-p", "lxcmon", "--bench", "export", "--", "100", "1000", "20",
        ])
        .output()
        .context("running the export bench")?;
    if !out.status.success() {
        bail!(
            "export bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("lxcmon-bench-export "))
        .map(|l| ExportRow {
            line: l.to_string(),
        })
        .collect())
}

fn agent_config(args: &BenchArgs, collector: &str, interval: f64) -> AgentConfig {
    AgentConfig {
        collector: collector.to_string(),
        interval,
        workers: args.workers,
        // The export's own cost is measured separately (export bench); here the file holds
        // one cycle so the figures are the collection's.
        max_entries: 1,
        format: "records",
        signals: !args.seed_only,
    }
}

pub fn measure_collector(
    args: &BenchArgs,
    bin: &Path,
    fleet: &Fleet,
    collector: &str,
    n: usize,
) -> Result<CollectorRow> {
    let cfg = agent_config(args, collector, args.interval);
    let mut runs = Vec::new();
    let mut syscalls = Vec::new();
    let mut bpf = None;
    let strace_cycles = 5;
    // Opened before the agent runs: its one-pass figure is taken between the agent's cycles.
    let floor = Floor::open(fleet, collector, !args.seed_only)?;
    let mut paced = Vec::new();
    for r in 0..args.repeat.max(1) {
        check_interrupted()?;
        let mut agent = Agent::start(bin, &cfg)?;
        std::thread::sleep(Duration::from_millis(500));
        if let Some(why) = agent.exited() {
            if collector != "files" {
                eprintln!("bench: collector {collector} not available: {why}");
                return Ok(CollectorRow::NotAvailable {
                    collector: collector.to_string(),
                    n,
                    why,
                });
            }
            bail!("the agent exited at start: {why}");
        }
        let half = Duration::from_secs_f64(args.interval / 2.0);
        let stats = agent.observe_with(2, args.cycles, args.interval, || {
            std::thread::sleep(half);
            paced.push(floor.pass_us()?);
            Ok(())
        })?;
        eprintln!(
            "bench: N={n} {collector} run {}: found {} | median {:.0} us CPU/cycle ({:.1} us/container), {:.1} ms wall | stat mean {:.0} us/cycle | RSS {} KiB (HWM {})",
            r + 1,
            stats.found(),
            stats.median_cpu_us(),
            stats.per_container_us(),
            stats.median_wall_ms(),
            stats.stat_per_cycle_us(),
            stats.rss_kib,
            stats.hwm_kib
        );
        if r == 0 {
            let (calls, raw) = agent.strace(strace_cycles, args.interval)?;
            syscalls = calls;
            let out = deps::workspace_root().join(&args.output);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir).context("creating the results dir")?;
                let name = format!("strace-{collector}-n{n}.txt");
                std::fs::write(
                    dir.join(name),
                    format!("# strace -c -f of the agent over {strace_cycles} cycles, {} containers found\n{raw}", stats.found()),
                )
                .context("writing the strace summary")?;
            }
        }
        if r == 0 && collector == "ebpf" {
            let measured = bpfcost::measure(
                fleet,
                &fleet::which("busybox")?,
                &Path::new(fleet::IO_DIR).join("bpfcost"),
                &mut agent,
            );
            check_interrupted()?;
            if let Err(e) = &measured {
                eprintln!("bench: BPF program cost not measured: {e:#}");
            }
            bpf = Some(measured.map_err(|e| format!("{e:#}")));
        }
        agent.stop()?;
        runs.push(stats);
    }
    let rounds = (20_000 / n.max(1)).clamp(20, 2000);
    let _ = floor.run(rounds / 10 + 1)?;
    let mut result = floor.run(rounds)?;
    result.paced_us = Some(super::measure::median(paced));
    let floor = result;
    eprintln!(
        "bench: N={n} floor {:.2} us/container tight, {:.2} us one pass per interval ({:.0} syscalls)",
        floor.per_container_us,
        floor.paced_us.unwrap_or(f64::NAN),
        floor.syscalls_per_container
    );
    Ok(CollectorRow::Files(FilesRow {
        collector: collector.to_string(),
        n,
        runs,
        syscalls,
        strace_cycles,
        floor,
        bpf,
    }))
}

/// At the largest fleet: the interval where the agent would use 5% of one core, checked by
/// running it there, and a run at 0.1 s.
pub fn rate_runs(args: &BenchArgs, bin: &Path, row: &FilesRow) -> Result<Vec<RateRow>> {
    // The estimate from CPU per cycle, or from the whole-process stat figure (which also has
    // the agent's work between cycles), whichever is larger; then checked by running there and
    // moved up 0.05 s at a time until the measured share is under 5 %.
    let per_cycle_s = row
        .runs
        .iter()
        .map(|r| r.median_cpu_us().max(r.stat_per_cycle_us()))
        .fold(0.0, f64::max)
        / 1e6;
    let at_5pct = (per_cycle_s / 0.05).max(0.1);
    let round = |v: f64| ((v / 0.05).ceil() * 0.05 * 100.0).round() / 100.0;
    let mut candidate = round(at_5pct);
    let mut out = Vec::new();
    for _ in 0..6 {
        let stats = rate_run(args, bin, candidate)?;
        let share = stats.core_share();
        out.push(RateRow {
            interval: candidate,
            stats,
        });
        if share < 0.05 {
            break;
        }
        candidate = round(candidate + 0.05);
    }
    if out.iter().all(|r| (r.interval - 0.1).abs() > 1e-9) {
        let stats = rate_run(args, bin, 0.1)?;
        out.push(RateRow {
            interval: 0.1,
            stats,
        });
    }
    Ok(out)
}

fn rate_run(args: &BenchArgs, bin: &Path, interval: f64) -> Result<RunStats> {
    check_interrupted()?;
    let mut agent = Agent::start(bin, &agent_config(args, "files", interval))?;
    let k = ((10.0 / interval) as usize).clamp(20, 100);
    let stats = agent.observe(3, k, interval)?;
    eprintln!(
        "bench: interval {interval} s: {:.1}% of one core (stat), median {:.1} ms CPU/cycle, {:.1} ms wall",
        stats.core_share() * 100.0,
        stats.median_cpu_us() / 1e3,
        stats.median_wall_ms()
    );
    agent.stop()?;
    Ok(stats)
}
