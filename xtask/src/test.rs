//! `cargo xtask test`: the whole suite, in the order that fails fastest.

use crate::deps;
use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct TestArgs {
    /// Lint, unit and fixture tests only: nothing that needs root, containers or VMs.
    #[arg(long)]
    fast: bool,
}

pub fn run(args: &TestArgs) -> Result<()> {
    deps::cargo(&["fmt", "--all", "--", "--check"])?;
    deps::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    deps::cargo(&["test", "--workspace"])?;
    if args.fast {
        return Ok(());
    }
    if !is_root() {
        bail!("the real-container tests need root (or run `cargo xtask test --fast`)");
    }
    // /metrics parsed by the Prometheus project's Python parser.
    deps::ensure_apt(&["python3-prometheus-client"])?;
    deps::cargo(&[
        "test",
        "-p",
        "lxcmon",
        "--test",
        "service",
        "--",
        "--ignored",
    ])?;
    // The BPF path: toolchain, object, its own lint and unit tests, root tests of the loader.
    crate::ebpf::test()?;
    // Real containers: the harness self-test, then the agent once per collector; with the
    // `ebpf` feature the suite also compares both collectors on the same workloads.
    crate::lxc::run_lxc_tests()?;
    // Pure cgroup v2 with a Proxmox layout, in VMs: Debian 6.1 (also under lockdown) and 5.10.
    crate::vm::run(&crate::vm::VmArgs::default())?;
    // The Debian package: dashboard checks, build, lintian, install/remove/purge here.
    crate::deb::test()?;
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
