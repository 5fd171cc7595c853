//! `cargo xtask bench`: the agent's cost on a synthetic fleet of N containers on this host
//! (root). Builds the fleet ([`fleet`]), runs the release agent against it with a temporary
//! config ([`runs`]), measures it from outside ([`measure`], and [`bpfcost`] for the kernel
//! side), runs the export bench (`lxcmon/benches/export.rs`), and writes `bench/results.md`
//! and the README summary ([`report`]) with the targets beside the numbers. The fleet is torn down afterwards, also on failure and on Ctrl-C;
//! `--cleanup` removes leftovers of a killed run by name.

mod bpfcost;
mod fleet;
mod measure;
mod report;
mod runs;

use anyhow::{bail, Context, Result};
use fleet::{Flavor, Fleet};
use report::{CollectorRow, Report, README_BEGIN, README_END};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::deps;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Fleet sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    containers: Vec<usize>,
    /// Collectors to measure, comma-separated (one that refuses to start is reported as
    /// not available).
    #[arg(long, value_delimiter = ',', default_value = "files,ebpf")]
    collector: Vec<String>,
    /// Build the Proxmox layout (`lxc/<vmid>`, processes under `ns/`) instead of plain LXC.
    #[arg(long)]
    proxmox: bool,
    /// Only remove leftovers of an earlier run (cgroups, veths, bridge, run dirs) and exit.
    #[arg(long)]
    cleanup: bool,
    /// Cycles observed per measurement run.
    #[arg(long, default_value_t = 20)]
    cycles: usize,
    /// Agent check_interval (s) for the main measurement.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Measurement runs per fleet size and collector (to show the noise).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Agent workers (1 = parallel_processing: false).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Skip the export bench.
    #[arg(long)]
    no_export: bool,
    /// Cargo features for the agent build (`ebpf` builds the BPF object first; "" for none).
    #[arg(long, default_value = "ebpf")]
    agent_features: String,
    /// Only build the fleet (first size of --containers), keep it up this many seconds (or
    /// until Ctrl-C) for profiling by hand, then tear it down.
    #[arg(long)]
    hold: Option<u64>,
    /// Where the markdown table goes (relative to the workspace root).
    #[arg(long, default_value = "bench/results.md")]
    output: PathBuf,
    /// Leave the README's summary table (between its bench markers) as it is.
    #[arg(long)]
    no_readme: bool,
    /// Only the seed's figures: every `enable_*` group beyond them off (pressure, throttling,
    /// memory details, per device, per interface, per mount, run-queue and I/O latency), in the
    /// agent and the floor; for comparisons with runs made before those groups existed.
    #[arg(long)]
    seed_only: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C / SIGTERM arrived; loops check it and unwind so the guards tear down.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

fn build_agent(args: &BenchArgs) -> Result<()> {
    if args.agent_features.split(',').any(|f| f.trim() == "ebpf") {
        crate::ebpf::build(&crate::ebpf::BuildArgs { debug: false })?;
    }
    let mut build = vec!["build", "--release", "-p", "lxcmon"];
    if !args.agent_features.is_empty() {
        build.extend(["--features", args.agent_features.as_str()]);
    }
    deps::cargo(&build)
}

pub fn run(args: &BenchArgs) -> Result<()> {
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench builds cgroups and namespaces: run it as root");
    }
    install_signal_handlers();
    if args.cleanup {
        fleet::cleanup()?;
        eprintln!("bench: leftovers removed");
        return Ok(());
    }
    ensure_tools()?;
    fleet::cleanup().context("removing leftovers of an earlier run")?;
    if let Some(secs) = args.hold {
        let n = args.containers.first().copied().unwrap_or(10);
        build_agent(args)?;
        let flavor = if args.proxmox {
            Flavor::Proxmox
        } else {
            Flavor::Lxc
        };
        let _fleet = Fleet::build(flavor, n)?;
        eprintln!("bench: holding the fleet for {secs} s (Ctrl-C tears it down)");
        let end = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < end && !interrupted() {
            std::thread::sleep(Duration::from_millis(100));
        }
        return Ok(());
    }
    let root = deps::workspace_root();
    let bin = root.join("target/release/lxcmon");

    let export = if args.no_export {
        Vec::new()
    } else {
        runs::export_bench()?
    };
    // After the export bench: `cargo bench` rebuilds target/release/lxcmon without features.
    build_agent(args)?;

    let flavor = if args.proxmox {
        Flavor::Proxmox
    } else {
        Flavor::Lxc
    };
    let mut rows = Vec::new();
    let mut rates = Vec::new();
    let largest = args.containers.iter().copied().max().unwrap_or(0);
    for &n in &args.containers {
        check_interrupted()?;
        let fleet = Fleet::build(flavor, n)?;
        for collector in &args.collector {
            check_interrupted()?;
            let row = runs::measure_collector(args, &bin, &fleet, collector, n)?;
            if n == largest && collector == "files" {
                if let CollectorRow::Files(r) = &row {
                    rates = runs::rate_runs(args, &bin, r)?;
                }
            }
            rows.push(row);
        }
        drop(fleet);
        // The BPF collector pinned links for containers that are gone now.
        let _ = Command::new(&bin).arg("--cleanup-bpf").status();
    }
    let report = Report {
        args,
        flavor,
        rows: &rows,
        rates: &rates,
        export: &export,
    };
    let md = report.results_md();
    let out = root.join(&args.output);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).context("creating the results dir")?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("bench: results written to {}", out.display());
    if !args.no_readme {
        let readme = root.join("README.md");
        let summary = report.readme_summary();
        match report::splice(&readme, &summary)? {
            true => eprintln!("bench: README summary updated"),
            false => eprintln!(
                "bench: README has no `{README_BEGIN}` / `{README_END}` markers; summary not written"
            ),
        }
    }
    Ok(())
}

fn ensure_tools() -> Result<()> {
    let mut pkgs = vec!["strace", "iproute2", "util-linux", "bpftool"];
    if !Path::new("/usr/bin/busybox").exists() && !Path::new("/bin/busybox").exists() {
        pkgs.push("busybox-static");
    }
    deps::ensure_apt(&pkgs)
}
