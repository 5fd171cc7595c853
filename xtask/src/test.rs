//! `cargo xtask test`: the whole suite, in the order that fails fastest, with the time each
//! part took printed at the end (the README's timings come from that table).

use crate::deps;
use anyhow::{bail, Context, Result};
use std::time::Instant;

#[derive(clap::Args)]
pub struct TestArgs {
    /// Lint, unit and fixture tests only: nothing that needs root, containers or VMs.
    #[arg(long)]
    fast: bool,
    /// Start at this part, skipping the ones before it (to re-run the tail of a failed run):
    /// `metrics`, `bpf`, `lxc`, `vm` or `deb`. CI runs every part.
    #[arg(long, value_parser = ["metrics", "bpf", "lxc", "vm", "deb"])]
    from: Option<String>,
}

/// Runs the parts in order and reports how long each took, also when one fails.
struct Parts(Vec<(&'static str, f64)>);

impl Parts {
    fn run(&mut self, name: &'static str, part: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = Instant::now();
        let result = part();
        self.0.push((name, start.elapsed().as_secs_f64()));
        result
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        eprintln!("\nxtask test: time per part");
        for (name, secs) in &self.0 {
            eprintln!("  {name:<44} {secs:>7.1} s");
        }
    }
}

pub fn run(args: &TestArgs) -> Result<()> {
    let mut parts = Parts(Vec::new());
    // Whether the part `name` runs: every one, or from `--from` on.
    let order = ["metrics", "bpf", "lxc", "vm", "deb"];
    let start = args
        .from
        .as_deref()
        .and_then(|f| order.iter().position(|p| *p == f));
    let wanted = |name: &str| match start {
        None => true,
        Some(s) => order
            .iter()
            .position(|p| *p == name)
            .is_some_and(|i| i >= s),
    };
    if start.is_none() {
        lint_and_unit(&mut parts)?;
    }
    if args.fast {
        return Ok(());
    }
    if !is_root() {
        bail!("the real-container tests need root (or run `cargo xtask test --fast`)");
    }
    if wanted("metrics") {
        parts.run("/metrics through the Prometheus parser", || {
            deps::ensure_apt(&["python3-prometheus-client"])?;
            deps::exec(&mut deps::cargo_test(
                "lxcmon",
                false,
                &["--test", "service", "--", "--ignored"],
            ))
        })?;
    }
    // The BPF path: toolchain, object, its own lint and unit tests, root tests of the loader.
    if wanted("bpf") {
        parts.run("BPF: toolchain, build, loader tests", crate::ebpf::test)?;
    }
    // Real containers: the harness self-test, then the agent once per collector, and both
    // collectors compared on the same workloads.
    if wanted("lxc") {
        parts.run(
            "real LXC containers (both collectors)",
            crate::lxc::run_lxc_tests,
        )?;
    }
    // Pure cgroup v2 with a Proxmox layout, in VMs: Debian 6.1 (also under lockdown) and 5.10.
    if wanted("vm") {
        parts.run("VM matrix (6.1, 6.1 lockdown, 5.10)", || {
            crate::vm::run(&crate::vm::VmArgs::default())
        })?;
    }
    // The .deb: build, lintian, install, run with the unit's capabilities, remove, purge.
    if wanted("deb") {
        parts.run("Debian package", crate::deb::test)?;
    }
    Ok(())
}

/// Lint, then the unit and fixture-tree tests.
fn lint_and_unit(parts: &mut Parts) -> Result<()> {
    parts.run("lint (fmt, clippy)", || {
        shared_fixtures_match()?;
        deps::cargo(&["fmt", "--all", "--", "--check"])?;
        deps::cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    parts.run("unit and fixture-tree tests", || {
        deps::cargo(&["test", "--workspace"])
    })
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The config fixtures are copied into the repository so a clone tests anywhere; where the
/// team's originals sit beside the checkout, the copies must still be the same files.
fn shared_fixtures_match() -> Result<()> {
    let root = deps::workspace_root();
    let shared = root.join("../shared/fixtures/config");
    let ours = root.join("lxcmon/tests/fixtures/config");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        eprintln!(
            "xtask test: {} not present; testing the repository's copies of the config fixtures",
            shared.display()
        );
        return Ok(());
    };
    for entry in entries {
        let path = entry.context("listing the shared fixtures")?.path();
        let Some(name) = path.file_name() else {
            continue;
        };
        let theirs = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let copy = ours.join(name);
        match std::fs::read(&copy) {
            Ok(mine) if mine == theirs => {}
            Ok(_) => bail!(
                "{} differs from {}: copy the team's fixture again",
                copy.display(),
                path.display()
            ),
            Err(e) => bail!("{}: {e} (copy it from {})", copy.display(), path.display()),
        }
    }
    Ok(())
}
