//! Kernel-side cost of the agent's BPF programs: `kernel.bpf_stats_enabled=1` makes the kernel
//! keep run time and run count per program; `bpftool prog show` reads them. Each load step
//! runs a bounded workload (TCP to the bench bridge, direct and buffered writes), inside one
//! bench container (its cgroups and network namespace) or on the host, and the deltas give
//! nanoseconds per event for each program that ran. Empty programs on the same hooks
//! ([`empty_skb`], [`empty_tp`]) give each hook's floor in each step: the stats clock and the
//! program's entry, cache-cold where events are rare. Then, with the stats clock off, the
//! scheduler program's effect on `perf bench sched pipe` ([`pipe`]).

mod empty_skb;
mod empty_tp;
pub mod pipe;

use super::fleet::{Fleet, HOST_ADDR};
use super::measure::Agent;
use anyhow::{bail, Context, Result};
use empty_skb::EmptySkb;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Bytes per load step (network and each kind of write).
const LOAD_BYTES: u64 = 64 << 20;
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Runs of each load step (see `prog_costs`).
const STEP_REPEATS: usize = 5;
/// Direct writers at once in the step with several requests in flight.
const PARALLEL_WRITERS: u64 = 4;
/// Loopback connections per run of the socket-close step (five runs leave 10000 client ends
/// in TIME_WAIT, well inside the ephemeral ports).
const LOOPBACK_CONNECTIONS: usize = 2000;

/// `bpf_stats_enabled` set to `value` for as long as this lives; the old value is put back on
/// drop.
struct StatsSet {
    old: String,
}

impl StatsSet {
    fn new(value: &str) -> Result<Self> {
        let old = std::fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL}"))?;
        std::fs::write(SYSCTL, value).with_context(|| format!("writing {SYSCTL}"))?;
        Ok(Self {
            old: old.trim().to_string(),
        })
    }
}

impl Drop for StatsSet {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.old);
    }
}

/// Run time and count of one program, summed over every loaded program of that name.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    run_time_ns: u64,
    run_cnt: u64,
}

/// `lxcmon_*` programs by name (the kernel keeps 15 characters of it).
fn snapshot() -> Result<BTreeMap<String, Counts>> {
    let out = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .context("running bpftool prog show")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(parse_prog_show(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_prog_show(text: &str) -> BTreeMap<String, Counts> {
    let mut out: BTreeMap<String, Counts> = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .copied()
        };
        let Some(name) = after("name").filter(|n| n.starts_with("lxcmon_")) else {
            continue;
        };
        let num = |key: &str| after(key).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let c = out.entry(name.to_string()).or_default();
        c.run_time_ns += num("run_time_ns");
        c.run_cnt += num("run_cnt");
    }
    out
}

/// One program's cost during one load step.
pub struct ProgCost {
    pub step: &'static str,
    pub program: String,
    pub events: u64,
    pub ns_per_event: f64,
}

/// The empty program on the hook `program` runs on (full name or the kernel's first 15
/// characters): the agent's tracing programs by their tracepoint, its `cgroup_skb` programs by
/// `lxcmon_empty`. `None` for the empty programs themselves and for programs whose hook has
/// none (the classic-tracepoint bio program, the TCP retransmit programs).
pub fn empty_for(program: &str) -> Option<&'static str> {
    use lxcmon_common as c;
    let is = |name: &str| program == name || program == &name[..name.len().min(15)];
    if program.starts_with("lxcmon_skb_") || program.starts_with("lxcmon_walk_") {
        Some(empty_skb::NAME)
    } else if is(c::PROG_BIO_QUEUE_BTF) || is(c::PROG_IOLAT_BIO) || is(c::PROG_IOLAT_BIO_OLD) {
        Some(empty_tp::BIO_QUEUE.program)
    } else if is(c::PROG_IOLAT_COMPLETE) {
        Some(empty_tp::RQ_COMPLETE.program)
    } else if is(c::PROG_DIRTY_FOLIO) {
        Some(empty_tp::DIRTY_FOLIO.program)
    } else if is(c::PROG_SCHED_SWITCH) {
        Some(empty_tp::SCHED_SWITCH.program)
    } else if is(c::PROG_TCP_DESTROY) {
        Some(empty_tp::TCP_DESTROY.program)
    } else {
        None
    }
}

/// One of the bench's own empty programs (a hook's floor, not the agent's).
pub fn is_empty_program(program: &str) -> bool {
    program == empty_skb::NAME || empty_tp::HOOKS.iter().any(|h| h.program == program)
}

/// A program's cost in one step set against its hook's floor in that step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Own {
    /// The row is one of the empty programs.
    EmptyItself,
    /// No empty program runs on this program's hook.
    NoEmpty,
    /// The hook's empty program has no figure in this step (not attached, or it did not run).
    Unknown,
    /// The empty program's time per event and this program's own cost above it
    /// (measured − empty, same hook, same step).
    Known { empty: f64, own: f64 },
}

impl ProgCost {
    /// This cost against the empty program on the same hook in the same step of `all`.
    pub fn own(&self, all: &[ProgCost]) -> Own {
        if is_empty_program(&self.program) {
            return Own::EmptyItself;
        }
        let Some(empty) = empty_for(&self.program) else {
            return Own::NoEmpty;
        };
        match all
            .iter()
            .find(|c| c.step == self.step && c.program == empty && c.events > 0)
        {
            Some(e) => Own::Known {
                empty: e.ns_per_event,
                own: self.ns_per_event - e.ns_per_event,
            },
            None => Own::Unknown,
        }
    }
}

/// The BPF step's figures: each program's cost per load step, and the pipe benchmark's
/// slowdown with the scheduler program attached.
pub struct BpfCost {
    pub progs: Vec<ProgCost>,
    pub pipe: pipe::PipeOutcome,
}

/// Runs the load steps with stats enabled while `agent` (BPF collector) tracks the fleet, then
/// the pipe slowdown with stats off (the agent's scheduler program detached and re-attached).
/// A failed pipe step is its outcome's reason, not the whole step's failure.
pub fn measure(fleet: &Fleet, busybox: &Path, io_dir: &Path, agent: &mut Agent) -> Result<BpfCost> {
    let Some(c) = fleet.containers.first() else {
        bail!("no container to load");
    };
    let cgroup_procs: Vec<PathBuf> = fleet
        .hierarchies
        .iter()
        .map(|h| h.mount.join(&c.procs_rel).join("cgroup.procs"))
        .collect();
    let inside = Inside {
        cgroup_procs,
        init: c.init,
    };
    let has_perf = Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let btf_ids = empty_tp::trace_btf_ids().unwrap_or_else(|e| {
        eprintln!("bench: no empty tracepoint programs: {e:#}");
        BTreeMap::new()
    });
    let progs = {
        let _enabled = StatsSet::new("1")?;
        prog_costs(fleet, &inside, busybox, io_dir, has_perf, &btf_ids)?
    };
    let pipe = if !has_perf {
        pipe::PipeOutcome::Skipped("no `perf` (package linux-perf)".into())
    } else {
        // The stats clock adds two clock reads to every run of every program.
        let _off = StatsSet::new("0")?;
        let empty_sw = btf_ids.get(empty_tp::SCHED_SWITCH.tracepoint).copied();
        match pipe::measure(agent, &inside, empty_sw) {
            Ok(m) => pipe::PipeOutcome::Measured(m),
            Err(e) => {
                super::check_interrupted()?;
                eprintln!("bench: pipe slowdown not measured: {e:#}");
                pipe::PipeOutcome::Skipped(format!("{e:#}"))
            }
        }
    };
    Ok(BpfCost { progs, pipe })
}

/// The load steps, each program's cost per event in each (stats on).
fn prog_costs(
    fleet: &Fleet,
    inside: &Inside,
    busybox: &Path,
    io_dir: &Path,
    has_perf: bool,
    btf_ids: &BTreeMap<&'static str, u32>,
) -> Result<Vec<ProgCost>> {
    let Some(c) = fleet.containers.first() else {
        bail!("no container to load");
    };
    std::fs::create_dir_all(io_dir).context("creating the BPF load dir")?;
    let file = io_dir.join("bpfcost");
    let file_s = file.display().to_string();
    // 4 KiB per write: one bio per direct write, one small folio per buffered one, so the
    // programs run thousands of times per step rather than a few dozen.
    let count = (LOAD_BYTES >> 12).to_string();
    let bb = busybox.display().to_string();
    // The same hooks with a program that does nothing (the container's cgroup for the packets,
    // each tracepoint of the agent's tracing programs): what the stats clock and a program's
    // entry cost by themselves on each hook in each step, the floor the own costs are above.
    let v2 = fleet
        .hierarchies
        .iter()
        .find(|h| h.controllers.is_empty() && h.mount.join("cgroup.controllers").exists())
        .map(|h| h.mount.join(&c.rel));
    let _baseline = match v2 {
        Some(dir) => match EmptySkb::attach(&dir) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("bench: no empty baseline program: {e:#}");
                None
            }
        },
        None => None,
    };
    let _empty_tps = empty_tp::attach_all(btf_ids);
    let mut costs = Vec::new();
    // Each step runs STEP_REPEATS times; a program's figure is the median of its per-run
    // figures (one run of a step moved by up to ±60 % on this VM, the whole machine's speed
    // drifting between minutes), its events the median count.
    let mut step = |name: &'static str, run: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let mut per: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for _ in 0..STEP_REPEATS {
            super::check_interrupted()?;
            let before = snapshot()?;
            run().with_context(|| format!("BPF load step '{name}'"))?;
            for (program, after) in snapshot()? {
                let b = before.get(&program).copied().unwrap_or_default();
                let events = after.run_cnt.saturating_sub(b.run_cnt);
                if events > 0 {
                    let ns = after.run_time_ns.saturating_sub(b.run_time_ns);
                    let e = per.entry(program).or_default();
                    e.0.push(events as f64);
                    e.1.push(ns as f64 / events as f64);
                }
            }
        }
        for (program, (events, ns)) in per {
            // A program seen in fewer runs than the others (stray packets): its missing runs
            // count as none.
            let mut events = events;
            events.resize(STEP_REPEATS, 0.0);
            costs.push(ProgCost {
                step: name,
                program,
                events: super::measure::median(events).round() as u64,
                ns_per_event: super::measure::median(ns),
            });
        }
        Ok(())
    };
    step("container: 64 MiB TCP to the host", &mut || {
        tcp_upload(inside, &bb)
    })?;
    let direct = [
        bb.as_str(),
        "dd",
        "if=/dev/zero",
        &format!("of={file_s}"),
        "bs=4k",
        &format!("count={count}"),
        "oflag=direct",
    ];
    let buffered = format!("{bb} dd if=/dev/zero of={file_s} bs=4k count={count} && {bb} sync");
    step("container: 64 MiB direct writes, 4 KiB each", &mut || {
        inside.run(&direct)
    })?;
    // The same bytes from four writers at once: requests in flight together, so completions
    // follow one another rather than each waking a CPU that sat idle waiting for it.
    let parallel = (0..PARALLEL_WRITERS)
        .map(|i| {
            format!(
                "{bb} dd if=/dev/zero of={file_s}.{i} bs=4k count={} oflag=direct &",
                (LOAD_BYTES >> 12) / PARALLEL_WRITERS
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
        + " wait";
    step(
        "container: 64 MiB direct writes, 4 KiB each, four writers at once",
        &mut || inside.run(&[bb.as_str(), "sh", "-c", &parallel]),
    )?;
    for i in 0..PARALLEL_WRITERS {
        let _ = std::fs::remove_file(format!("{file_s}.{i}"));
    }
    step(
        "container: 64 MiB buffered writes, 4 KiB each, + sync",
        &mut || inside.run(&[bb.as_str(), "sh", "-c", &buffered]),
    )?;
    step(
        "host (untracked): 64 MiB direct writes, 4 KiB each",
        &mut || run_bounded(Command::new(&bb).args(&direct[1..])),
    )?;
    let _ = std::fs::remove_file(&file);
    // Sockets closed: the program that lets go of a socket's retransmit sum runs for every
    // TCP socket the host closes; the host's own (no entry) take its lookup only.
    step(
        "host (untracked): 2000 TCP connections opened and closed on loopback",
        &mut || loopback_connections(LOOPBACK_CONNECTIONS),
    )?;
    // Context switches for the scheduler programs (run-queue wait): two tasks passing a byte
    // back and forth through pipes, two switches per round trip, in the container and on the
    // host (whose tasks take only the programs' early exits).
    let pipe = ["perf", "bench", "sched", "pipe", "-l", "100000"];
    if has_perf {
        step(
            "container: perf bench sched pipe, 100k round trips",
            &mut || inside.run(&pipe),
        )?;
        step(
            "host (untracked): perf bench sched pipe, 100k round trips",
            &mut || run_bounded(Command::new(pipe[0]).args(&pipe[1..])),
        )?;
    } else {
        eprintln!(
            "bench: no `perf` (linux-perf): the context-switch steps and the pipe slowdown are skipped"
        );
    }
    Ok(costs)
}

/// Runs commands in a container's cgroups (every hierarchy) and network namespace.
struct Inside {
    cgroup_procs: Vec<PathBuf>,
    init: u32,
}

impl Inside {
    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"for f in $LXB_JOIN; do echo $$ > "$f" || exit 1; done; exec "$@""#,
            "sh",
            "nsenter",
            "-t",
            &self.init.to_string(),
            "-n",
            "--",
        ])
        .args(argv)
        .env(
            "LXB_JOIN",
            self.cgroup_procs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
        cmd
    }

    fn run(&self, argv: &[&str]) -> Result<()> {
        run_bounded(&mut self.command(argv))
    }
}

fn run_bounded(cmd: &mut Command) -> Result<()> {
    read_bounded(cmd).map(drop)
}

/// Runs `cmd` to its end within `STEP_TIMEOUT`; its standard output, read once it exited (the
/// commands here write a few lines: a pipe's buffer holds them).
fn read_bounded(cmd: &mut Command) -> Result<String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a load process")?;
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a load process")? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("load process failed ({status}): {}", err.trim());
            }
            let mut out = String::new();
            if let Some(mut o) = child.stdout.take() {
                o.read_to_string(&mut out)
                    .context("reading a load process's output")?;
            }
            return Ok(out);
        }
        if Instant::now() > deadline || super::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("load process did not finish in {STEP_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `LOAD_BYTES` from the container to a listener of this process on the bridge address; the
/// listener closes after the last byte, which ends the container's `nc`.
/// Opens `n` TCP connections to a listener of its own on loopback and closes both ends of
/// each: two sockets destroyed per connection (the client's end waits in TIME_WAIT, a socket
/// of another kind).
fn loopback_connections(n: usize) -> Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).context("listening on loopback")?;
    let addr = listener.local_addr().context("listener address")?;
    for _ in 0..n {
        let client = std::net::TcpStream::connect(addr).context("connecting on loopback")?;
        let (server, _) = listener.accept().context("accepting on loopback")?;
        drop(client);
        drop(server);
    }
    Ok(())
}

fn tcp_upload(inside: &Inside, busybox: &str) -> Result<()> {
    let listener = TcpListener::bind((HOST_ADDR, 0)).context("listening on the bench bridge")?;
    let port = listener.local_addr().context("listener address")?.port();
    let script = format!(
        "{busybox} head -c {LOAD_BYTES} /dev/zero | {busybox} nc {HOST_ADDR} {port} > /dev/null"
    );
    let mut child = inside
        .command(&[busybox, "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the container's nc")?;
    let received = receive(&listener, STEP_TIMEOUT);
    let _ = child.kill();
    let _ = child.wait();
    let received = received?;
    if received < LOAD_BYTES {
        bail!("received {received} of {LOAD_BYTES} bytes");
    }
    Ok(())
}

fn receive(listener: &TcpListener, timeout: Duration) -> Result<u64> {
    listener
        .set_nonblocking(true)
        .context("listener nonblocking")?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline || super::interrupted() {
                    bail!("the container's nc did not connect");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accepting the container's nc"),
        }
    };
    stream
        .set_nonblocking(false)
        .context("stream blocking mode")?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .context("stream read timeout")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    while total < LOAD_BYTES && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => return Err(e).context("reading from the container"),
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prog_show_is_summed_per_name() {
        let text = "\
12: cgroup_skb  name lxcmon_skb_ingr  tag 1a2b  gpl run_time_ns 3000 run_cnt 40
\tloaded_at 2026-11-29T21:00:00+0000  uid 0
13: cgroup_skb  name lxcmon_skb_ingr  tag 1a2b  gpl run_time_ns 1000 run_cnt 10
14: tracepoint  name lxcmon_block_b  tag 3c4d  gpl
15: cgroup_skb  name other_prog  tag 5e6f  gpl run_time_ns 9 run_cnt 9
";
        let m = parse_prog_show(text);
        assert_eq!(m.len(), 2);
        let skb = m["lxcmon_skb_ingr"];
        assert_eq!((skb.run_time_ns, skb.run_cnt), (4000, 50));
        assert_eq!(m["lxcmon_block_b"].run_cnt, 0);
    }

    #[test]
    fn programs_map_to_the_empty_program_on_their_hook() {
        let cases = [
            ("lxcmon_bio_queue_btf", Some("lxcmon_nop_bioq")),
            ("lxcmon_bio_queu", Some("lxcmon_nop_bioq")),
            ("lxcmon_iolat_bio", Some("lxcmon_nop_bioq")),
            ("lxcmon_iolat_bio_old", Some("lxcmon_nop_bioq")),
            ("lxcmon_iolat_complete", Some("lxcmon_nop_rqc")),
            ("lxcmon_iolat_co", Some("lxcmon_nop_rqc")),
            ("lxcmon_dirty_folio", Some("lxcmon_nop_dirt")),
            ("lxcmon_sched_switch", Some("lxcmon_nop_sw")),
            ("lxcmon_sched_sw", Some("lxcmon_nop_sw")),
            ("lxcmon_sk_destroy", Some("lxcmon_nop_tcpd")),
            ("lxcmon_sk_destr", Some("lxcmon_nop_tcpd")),
            ("lxcmon_skb_ingress", Some("lxcmon_empty")),
            ("lxcmon_skb_ingr", Some("lxcmon_empty")),
            ("lxcmon_walk_egress", Some("lxcmon_empty")),
            // A classic tracepoint and the TCP programs have no empty twin.
            ("lxcmon_block_bio_queue", None),
            ("lxcmon_tcp_retransmit", None),
            ("lxcmon_empty", None),
            ("lxcmon_nop_sw", None),
        ];
        for (program, empty) in cases {
            assert_eq!(empty_for(program), empty, "{program}");
        }
        assert!(is_empty_program("lxcmon_empty"));
        assert!(is_empty_program("lxcmon_nop_bioq"));
        assert!(!is_empty_program("lxcmon_iolat_bio"));
    }

    fn cost(step: &'static str, program: &str, events: u64, ns: f64) -> ProgCost {
        ProgCost {
            step,
            program: program.into(),
            events,
            ns_per_event: ns,
        }
    }

    #[test]
    fn own_cost_is_above_the_empty_program_of_the_same_hook_and_step() {
        let all = [
            cost("direct", "lxcmon_nop_bioq", 16000, 210.0),
            cost("direct", "lxcmon_iolat_bio", 16000, 370.0),
            cost("direct", "lxcmon_iolat_complete", 15900, 377.0),
            cost("direct", "lxcmon_nop_sw", 33000, 80.0),
            cost("pipe", "lxcmon_nop_sw", 200000, 50.0),
            cost("pipe", "lxcmon_sched_switch", 200000, 117.0),
            cost("direct", "lxcmon_sched_switch", 33000, 121.0),
            cost("tcp", "lxcmon_skb_egress", 59000, 95.0),
            cost("tcp", "lxcmon_empty", 98000, 55.0),
            cost("buffered", "lxcmon_nop_dirt", 0, 0.0),
            cost("buffered", "lxcmon_dirty_folio", 16000, 356.0),
            cost("tcp", "lxcmon_tcp_retransmit", 10, 900.0),
        ];
        let own = |i: usize| all[i].own(&all);
        assert_eq!(
            own(1),
            Own::Known {
                empty: 210.0,
                own: 160.0
            }
        );
        // The same program in two steps: each against its own step's empty figure.
        assert_eq!(
            own(5),
            Own::Known {
                empty: 50.0,
                own: 67.0
            }
        );
        assert_eq!(
            own(6),
            Own::Known {
                empty: 80.0,
                own: 41.0
            }
        );
        assert_eq!(
            own(7),
            Own::Known {
                empty: 55.0,
                own: 40.0
            }
        );
        // No empty figure on the hook in that step: unknown, not the raw figure.
        assert_eq!(own(2), Own::Unknown);
        assert_eq!(own(10), Own::Unknown);
        assert_eq!(own(0), Own::EmptyItself);
        assert_eq!(own(8), Own::EmptyItself);
        assert_eq!(own(11), Own::NoEmpty);
    }
}
