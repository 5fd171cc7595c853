//! The real-container tests: what they need on the machine, and running them.
//!
//! They are `#[ignore]`d in the normal test run (they need root and create LXC containers, a
//! bridge `lxcmonbr0` and 10.213.77.0/24 on it); `cargo xtask test` runs them explicitly.

use crate::deps;
use anyhow::{ensure, Result};

/// Debian packages the LXC tests use: LXC with its busybox template, a static busybox for the
/// container, gcc/libc6-dev for the static memory-holding helper, iproute2 for the bridge,
/// and pandas for the autoscale_ml reader check (run with /usr/bin/python3).
pub const LXC_TEST_PACKAGES: &[&str] = &[
    "lxc",
    "busybox-static",
    "gcc",
    "libc6-dev",
    "iproute2",
    "python3-pandas",
    "libcap2-bin",
];

pub fn ensure_lxc_test_deps() -> Result<()> {
    deps::ensure_apt(LXC_TEST_PACKAGES)
}

/// Runs the harness self-test and the lxcmon real-container tests (one at a time: they share
/// the bridge and would disturb each other's measurements).
pub fn run_lxc_tests() -> Result<()> {
    let euid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    ensure!(euid == "0", "the LXC tests need root (uid 0, got {euid:?})");
    ensure_lxc_test_deps()?;
    deps::cargo(&[
        "test",
        "-p",
        "lxcmon-testkit",
        "--test",
        "harness",
        "--",
        "--ignored",
        "--test-threads=1",
    ])?;
    for collector in ["files", "ebpf"] {
        eprintln!("xtask: real-container tests with collector: {collector}");
        deps::exec(
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "test",
                    "-p",
                    "lxcmon",
                    "--features",
                    "ebpf",
                    "--test",
                    "lxc_host",
                ])
                .args(["--", "--ignored", "--test-threads=1"])
                .env("LXCMON_TEST_COLLECTOR", collector)
                .current_dir(deps::workspace_root()),
        )?;
    }
    deps::cargo(&[
        "test",
        "-p",
        "lxcmon",
        "--features",
        "ebpf",
        "--test",
        "collectors",
        "--",
        "--ignored",
        "--test-threads=1",
    ])?;
    // Pinned BPF state of the containers the tests made and removed.
    deps::exec(
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "run",
                "-q",
                "-p",
                "lxcmon",
                "--features",
                "ebpf",
                "--",
                "--cleanup-bpf",
            ])
            .current_dir(deps::workspace_root()),
    )
}
