//! `cargo xtask test`: the whole suite, in the order that fails fastest.

use crate::deps;
use anyhow::Result;

#[derive(clap::Args)]
pub struct TestArgs {}

pub fn run(_args: &TestArgs) -> Result<()> {
    deps::ensure_run_deps()?;
    deps::ensure_apt(&["lxc", "busybox-static"])?;
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
    Ok(())
}
