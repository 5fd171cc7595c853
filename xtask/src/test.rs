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
    deps::ensure_run_deps()?;
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
    deps::ensure_apt(&["lxc", "busybox-static"])?;
    Ok(())
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
