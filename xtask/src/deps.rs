//! Installing what a task needs, and running commands with their failures reported.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command to completion and fails with its name when it does not succeed.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// `cargo` (the one running xtask) in the workspace root.
pub fn cargo_cmd() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn cargo(args: &[&str]) -> Result<()> {
    exec(cargo_cmd().args(args))
}

/// After `--`: the `#[ignore]`d root tests, one at a time (they share machine state).
pub const ROOT_TESTS: &[&str] = &["--", "--ignored", "--test-threads=1"];

/// `cargo test -p PKG [--features ebpf] ARGS...` (ARGS: test selection, then anything after
/// `--`), ready to run with [`exec`] or to get more environment first.
pub fn cargo_test(pkg: &str, ebpf: bool, args: &[&str]) -> Command {
    let mut cmd = cargo_cmd();
    cmd.args(["test", "-p", pkg]);
    if ebpf {
        cmd.args(["--features", "ebpf"]);
    }
    cmd.args(args);
    cmd
}

pub fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the Debian packages that are missing (one `apt-get update` first, only if needed).
pub fn ensure_apt(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
