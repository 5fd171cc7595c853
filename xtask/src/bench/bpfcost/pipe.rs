//! The scheduler program's effect on a context-switch-heavy workload: `perf bench sched pipe`
//! with `lxcmon_sched_switch` attached and detached by the running agent (its config's
//! `enable_runqueue_latency` flipped, then SIGHUP), in the first bench container and on the
//! host, both tasks on one CPU and across CPUs. This VM's speed drifts by more than the effect
//! between runs seconds apart, much less within a pair: eleven pairs of short runs back to back,
//! the order alternating, and the median of the pairs' ratios. The same pairs with only an
//! empty program on `sched_switch` (the agent's detached) against nothing attached: the part of
//! the slowdown that is the tracepoint's dispatch to any program at all.

use super::super::measure::Agent;
use super::empty_tp::{self, EmptyTp};
use super::{read_bounded, Inside};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::process::Command;

/// Pairs of attached / detached runs per measurement (odd: the median is one pair's).
pub const PAIRS: usize = 11;
/// Round trips per run with both tasks on CPU 0: two context switches each, ~5 µs here.
const LOOPS_ONE_CPU: u32 = 100_000;
/// Round trips per run across CPUs: mostly cross-CPU wake-ups and idle exits, ~40 µs here.
const LOOPS_TWO_CPUS: u32 = 25_000;

/// What a measurement's pairs attach and detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switched {
    /// The agent's `lxcmon_sched_switch` (through the agent's reload).
    Agent,
    /// Only the bench's empty program on `sched_switch`, the agent's detached throughout.
    Empty,
}

/// One place and CPU layout: the pairs' slowdowns (attached ÷ detached − 1).
#[derive(Debug, Clone)]
pub struct PipeSlowdown {
    pub switched: Switched,
    pub place: &'static str,
    pub one_cpu: bool,
    pub loops: u32,
    pub ratios: Vec<f64>,
}

/// Median and range of a set of ratios.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// `None` for no values; the median of an even count is the mean of the middle two.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

impl PipeSlowdown {
    pub fn spread(&self) -> Option<Spread> {
        spread(&self.ratios)
    }

    /// "container, one CPU", "empty program on sched_switch, host, two CPUs" and the like.
    pub fn label(&self) -> String {
        format!(
            "{}{}, {}",
            match self.switched {
                Switched::Agent => "",
                Switched::Empty => "empty program on sched_switch, ",
            },
            self.place,
            if self.one_cpu { "one CPU" } else { "two CPUs" }
        )
    }
}

/// What the pipe step gave: figures, or why there are none.
#[derive(Debug, Clone)]
pub enum PipeOutcome {
    Measured(Vec<PipeSlowdown>),
    Skipped(String),
}

/// Runs the eleven pairs for each place and CPU layout, the agent's program switched, then
/// (with `empty_sw`, the BTF id of `btf_trace_sched_switch`) the empty program's pairs. The
/// agent's scheduler program is attached on entry (every group on) and is attached again on
/// return, also after an error. Failed empty pairs are said on stderr and left out.
pub(super) fn measure(
    agent: &mut Agent,
    inside: &Inside,
    empty_sw: Option<u32>,
) -> Result<Vec<PipeSlowdown>> {
    let result = measure_pairs(agent, inside, empty_sw);
    let restored = set_attached(agent, true);
    let out = result?;
    restored?;
    Ok(out)
}

fn measure_pairs(
    agent: &mut Agent,
    inside: &Inside,
    empty_sw: Option<u32>,
) -> Result<Vec<PipeSlowdown>> {
    // The state the agent is in, so a pair starting in it needs no reload.
    let mut attached = attached_links()? > 0;
    let mut out = layouts(Switched::Agent, inside, &mut |on| {
        if attached != on {
            set_attached(agent, on)?;
            attached = on;
        }
        Ok(())
    })?;
    let Some(btf_id) = empty_sw else {
        eprintln!("bench: pipe: no empty program on sched_switch (no BTF id for it)");
        return Ok(out);
    };
    if attached {
        set_attached(agent, false)?;
    }
    let mut empty: Option<EmptyTp> = None;
    let result = layouts(Switched::Empty, inside, &mut |on| {
        if on && empty.is_none() {
            empty = Some(EmptyTp::attach(empty_tp::SCHED_SWITCH, btf_id)?);
        } else if !on {
            // Dropping the link detaches the program.
            empty = None;
        }
        Ok(())
    });
    match result {
        Ok(rows) => out.extend(rows),
        Err(e) => {
            super::super::check_interrupted()?;
            eprintln!("bench: pipe slowdown of the empty program not measured: {e:#}");
        }
    }
    Ok(out)
}

/// The pairs for each CPU layout and place, `switch(on)` putting the switched program in the
/// state wanted before each run (a no-op when it already is).
fn layouts(
    switched: Switched,
    inside: &Inside,
    switch: &mut dyn FnMut(bool) -> Result<()>,
) -> Result<Vec<PipeSlowdown>> {
    let mut out = Vec::new();
    for one_cpu in [true, false] {
        let loops = if one_cpu {
            LOOPS_ONE_CPU
        } else {
            LOOPS_TWO_CPUS
        };
        for place in ["container", "host"] {
            let mut ratios = Vec::with_capacity(PAIRS);
            for pair in 0..PAIRS {
                super::super::check_interrupted()?;
                let mut run = |on: bool| -> Result<f64> {
                    switch(on)?;
                    pipe_seconds(inside, place == "container", loops, one_cpu)
                };
                // Attached first in even pairs, detached first in odd ones: the state of the
                // previous run carries over, so only one switch per pair.
                let (on, off) = if pair % 2 == 0 {
                    let on = run(true)?;
                    (on, run(false)?)
                } else {
                    let off = run(false)?;
                    (run(true)?, off)
                };
                ratios.push(on / off - 1.0);
            }
            let s = PipeSlowdown {
                switched,
                place,
                one_cpu,
                loops,
                ratios,
            };
            if let Some(sp) = s.spread() {
                eprintln!(
                    "bench: pipe {}: {loops} round trips, attached vs detached: median {:+.1} % (pairs {:+.1} to {:+.1} %)",
                    s.label(),
                    sp.median * 100.0,
                    sp.min * 100.0,
                    sp.max * 100.0
                );
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// Switches the agent's run-queue family and checks the kernel's links agree.
fn set_attached(agent: &mut Agent, on: bool) -> Result<()> {
    agent.reload_runqueue(on)?;
    let links = attached_links()?;
    if on != (links > 0) {
        bail!(
            "after the agent's reload ({}), {links} link(s) of {} are attached",
            if on { "attach" } else { "detach" },
            lxcmon_common::PROG_SCHED_SWITCH
        );
    }
    Ok(())
}

/// Seconds `perf bench sched pipe` reports for `loops` round trips.
fn pipe_seconds(inside: &Inside, in_container: bool, loops: u32, one_cpu: bool) -> Result<f64> {
    let loops = loops.to_string();
    let mut argv = Vec::new();
    if one_cpu {
        argv.extend(["taskset", "-c", "0"]);
    }
    argv.extend(["perf", "bench", "sched", "pipe", "-l", &loops]);
    let text = if in_container {
        read_bounded(&mut inside.command(&argv))?
    } else {
        read_bounded(Command::new(argv[0]).args(&argv[1..]))?
    };
    parse_total_time(&text).with_context(|| format!("no `Total time:` in perf's output: {text}"))
}

/// The `Total time: 0.512 [sec]` line of `perf bench sched pipe`.
fn parse_total_time(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Total time:")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    })
}

/// Links whose program is `lxcmon_sched_switch` (any agent's), from `bpftool`.
fn attached_links() -> Result<usize> {
    let progs = bpftool(&["prog", "show"])?;
    let links = bpftool(&["link", "show"])?;
    Ok(count_links(
        &progs,
        &links,
        lxcmon_common::PROG_SCHED_SWITCH,
    ))
}

fn bpftool(args: &[&str]) -> Result<String> {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .with_context(|| format!("running bpftool {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "bpftool {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `<id>: <rest>` of an object's first line in `bpftool ... show` (continuations are indented).
fn id_line(line: &str) -> Option<(u64, &str)> {
    let (id, rest) = line.split_once(':')?;
    Some((id.parse::<u64>().ok()?, rest))
}

/// Links (`bpftool link show`: `<id>: <type>  prog <prog id>`) of programs named `program`
/// (`bpftool prog show`: `<id>: <type>  name <name>`, the whole name from the program's BTF,
/// else the kernel's first 15 characters).
fn count_links(prog_show: &str, link_show: &str, program: &str) -> usize {
    let short = &program[..program.len().min(15)];
    let after = |rest: &str, key: &str| {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let i = words.iter().position(|w| *w == key)?;
        words.get(i + 1).map(|w| w.to_string())
    };
    let ids: HashSet<u64> = prog_show
        .lines()
        .filter_map(id_line)
        .filter(|(_, rest)| after(rest, "name").is_some_and(|n| n == program || n == short))
        .map(|(id, _)| id)
        .collect();
    link_show
        .lines()
        .filter_map(id_line)
        .filter_map(|(_, rest)| after(rest, "prog")?.parse::<u64>().ok())
        .filter(|p| ids.contains(p))
        .count()
}

/// The budget the issue sets for the pipe benchmark's slowdown.
pub const TARGET: &str = "≤ 3 %";

impl PipeSlowdown {
    /// The budget for the agent's rows; the empty program's rows are its reference.
    pub fn target(&self) -> &'static str {
        match self.switched {
            Switched::Agent => TARGET,
            Switched::Empty => "(the dispatch alone)",
        }
    }
}

fn pct(v: f64) -> String {
    format!("{:+.1} %", v * 100.0)
}

/// The README's rows (label | measured | target), one per place and CPU layout.
pub fn readme_rows(outcome: Result<&PipeOutcome, &str>) -> Vec<String> {
    let why = match outcome {
        Ok(PipeOutcome::Measured(m)) => {
            return m
                .iter()
                .map(|s| {
                    let measured = s.spread().map_or("no pairs".into(), |sp| {
                        format!(
                            "{} (median of {} pairs, {} round trips each; pairs {} to {})",
                            pct(sp.median),
                            s.ratios.len(),
                            s.loops,
                            pct(sp.min),
                            pct(sp.max)
                        )
                    });
                    format!(
                        "| pipe slowdown, {} | {measured} | {} |",
                        s.label(),
                        s.target()
                    )
                })
                .collect()
        }
        Ok(PipeOutcome::Skipped(why)) => why.as_str(),
        Err(why) => why,
    };
    vec![format!(
        "| pipe slowdown | not measured: {} | {TARGET} |",
        why.replace('|', "/")
    )]
}

/// `bench/results.md`'s section: every fleet size's figures, each pair's ratio.
pub fn results_section(per_n: &[(usize, Result<&PipeOutcome, &str>)]) -> String {
    let mut md = String::from(
        "\n## Scheduler program: pipe benchmark slowdown\n\n\
         `perf bench sched pipe` (two tasks passing a byte through pipes: every round trip two \
         context switches) in the cgroups of the first bench container and on the host, with \
         `lxcmon_sched_switch` attached and detached by the running agent (its config's \
         `enable_runqueue_latency` flipped, then SIGHUP; `bpftool link show` checked after each \
         reload), every other program attached throughout and `kernel.bpf_stats_enabled=0`. \
         One CPU: both tasks `taskset -c 0` (pure context switches); two CPUs: unpinned \
         (cross-CPU wake-ups and idle exits). Eleven pairs of runs back to back, attached first \
         in even pairs and detached first in odd ones; slowdown = attached ÷ detached − 1 per \
         pair, the median and the range over the pairs (this VM's speed drifts by 10–20 % \
         between runs seconds apart, much less within a pair). The rows \"empty program on \
         sched_switch\": the same pairs with the agent's program detached throughout and the \
         bench's empty `lxcmon_nop_sw` (`r0 = 0; exit`) attached and detached instead, so the \
         slowdown of the tracepoint's dispatch to any program, apart from the agent's work.\n\n\
         | N | place, CPUs | round trips per run | median | range | pairs | target |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (n, outcome) in per_n {
        let why = match outcome {
            Ok(PipeOutcome::Measured(m)) => {
                for s in m {
                    let Some(sp) = s.spread() else { continue };
                    md += &format!(
                        "| {n} | {} | {} | {} | {} to {} | {} | {} |\n",
                        s.label(),
                        s.loops,
                        pct(sp.median),
                        pct(sp.min),
                        pct(sp.max),
                        s.ratios
                            .iter()
                            .map(|r| pct(*r))
                            .collect::<Vec<_>>()
                            .join(", "),
                        s.target()
                    );
                }
                continue;
            }
            Ok(PipeOutcome::Skipped(why)) => why.as_str(),
            Err(why) => why,
        };
        md += &format!(
            "| {n} | – | – | not measured: {} | – | – | {TARGET} |\n",
            why.replace('|', "/")
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_is_median_and_range() {
        let s = spread(&[0.05, -0.01, 0.02, 0.30, 0.03]).unwrap();
        assert_eq!(
            s,
            Spread {
                median: 0.03,
                min: -0.01,
                max: 0.30
            }
        );
        let even = spread(&[0.04, 0.01, 0.02, 0.03]).unwrap();
        assert!((even.median - 0.025).abs() < 1e-12);
        assert_eq!((even.min, even.max), (0.01, 0.04));
        assert_eq!(spread(&[]), None);
    }

    #[test]
    fn perf_total_time_is_read() {
        let text = "# Running 'sched/pipe' benchmark:\n# Executed 100000 pipe operations between two processes\n\n     Total time: 0.512 [sec]\n\n       5.120000 usecs/op\n";
        assert_eq!(parse_total_time(text), Some(0.512));
        assert_eq!(parse_total_time("usecs/op"), None);
    }

    #[test]
    fn only_links_of_the_named_program_count() {
        let progs = "\
41: tracing  name lxcmon_sched_switch  tag 0123  gpl
\tloaded_at 2026-12-02T06:00:00+0000  uid 0
42: tracing  name lxcmon_iolat_is  tag 4567  gpl
43: tracing  name lxcmon_sched_sw  tag 0123  gpl
";
        let links = "\
7: raw_tracepoint  prog 41
\ttp 'sched_switch'
8: raw_tracepoint  prog 42
\ttp 'block_rq_issue'
9: cgroup  prog 50
";
        assert_eq!(count_links(progs, links, "lxcmon_sched_switch"), 1);
        let two = format!("{links}10: tracing  prog 43\n");
        assert_eq!(count_links(progs, &two, "lxcmon_sched_switch"), 2);
        assert_eq!(count_links(progs, "", "lxcmon_sched_switch"), 0);
        assert_eq!(count_links(progs, links, "lxcmon_iolat_issue"), 1);
    }

    fn sample() -> Vec<PipeSlowdown> {
        vec![
            PipeSlowdown {
                switched: Switched::Agent,
                place: "container",
                one_cpu: true,
                loops: 100_000,
                ratios: vec![0.05, -0.01, 0.02],
            },
            PipeSlowdown {
                switched: Switched::Agent,
                place: "host",
                one_cpu: false,
                loops: 25_000,
                ratios: vec![0.001, 0.004, 0.125],
            },
            PipeSlowdown {
                switched: Switched::Empty,
                place: "container",
                one_cpu: true,
                loops: 100_000,
                ratios: vec![0.01, 0.03, 0.02],
            },
        ]
    }

    #[test]
    fn readme_rows_give_median_range_and_target() {
        let rows = readme_rows(Ok(&PipeOutcome::Measured(sample())));
        assert_eq!(
            rows,
            [
                "| pipe slowdown, container, one CPU | +2.0 % (median of 3 pairs, 100000 round trips each; pairs -1.0 % to +5.0 %) | ≤ 3 % |",
                "| pipe slowdown, host, two CPUs | +0.4 % (median of 3 pairs, 25000 round trips each; pairs +0.1 % to +12.5 %) | ≤ 3 % |",
                "| pipe slowdown, empty program on sched_switch, container, one CPU | +2.0 % (median of 3 pairs, 100000 round trips each; pairs +1.0 % to +3.0 %) | (the dispatch alone) |",
            ]
        );
        let skipped = readme_rows(Ok(&PipeOutcome::Skipped("no `perf` (a|b)".into())));
        assert_eq!(
            skipped,
            ["| pipe slowdown | not measured: no `perf` (a/b) | ≤ 3 % |"]
        );
        assert_eq!(
            readme_rows(Err("load step failed")),
            ["| pipe slowdown | not measured: load step failed | ≤ 3 % |"]
        );
    }

    #[test]
    fn results_section_lists_every_pair() {
        let measured = PipeOutcome::Measured(sample());
        let skipped = PipeOutcome::Skipped("no `perf`".into());
        let md = results_section(&[(10, Ok(&measured)), (100, Ok(&skipped))]);
        assert!(md.contains("## Scheduler program: pipe benchmark slowdown"));
        assert!(md.contains(
            "| 10 | container, one CPU | 100000 | +2.0 % | -1.0 % to +5.0 % | +5.0 %, -1.0 %, +2.0 % | ≤ 3 % |"
        ));
        assert!(md.contains("| 10 | host, two CPUs | 25000 | +0.4 % | +0.1 % to +12.5 % |"));
        assert!(md.contains(
            "| 10 | empty program on sched_switch, container, one CPU | 100000 | +2.0 % | +1.0 % to +3.0 % | +1.0 %, +3.0 %, +2.0 % | (the dispatch alone) |"
        ));
        assert!(md.contains("| 100 | – | – | not measured: no `perf` | – | – | ≤ 3 % |"));
    }
}
