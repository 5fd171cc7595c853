//! The real-container tests: what they need on the machine, and running them.
//!
//! They are `#[ignore]`d in the normal test run (they need root and create LXC containers, a
//! bridge `lxcmonbr0` and 10.213.77.0/24 on it; the Incus test an Incus network `lxcmonbr2`
//! on 10.213.79.0/24); `cargo xtask test` runs them explicitly.

use crate::deps;
use anyhow::{ensure, Result};

/// Debian packages the LXC tests use: LXC with its busybox template, a static busybox for the
/// container, gcc/libc6-dev for the static memory-holding helper, iproute2 for the bridge,
/// and pandas for the autoscale_ml reader check (run with /usr/bin/python3), e2fsprogs for the
/// ext4 disk the per-mount test mounts into a container.
pub const LXC_TEST_PACKAGES: &[&str] = &[
    "lxc",
    "busybox-static",
    "gcc",
    "libc6-dev",
    "iproute2",
    "python3-pandas",
    "libcap2-bin",
    "e2fsprogs",
];

pub fn ensure_lxc_test_deps() -> Result<()> {
    deps::ensure_apt(LXC_TEST_PACKAGES)
}

pub fn ensure_root() -> Result<()> {
    let euid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    ensure!(euid == "0", "the LXC tests need root (uid 0, got {euid:?})");
    Ok(())
}

/// Runs the harness self-test and the lxcmon real-container tests (one at a time: they share
/// the bridge and would disturb each other's measurements).
pub fn run_lxc_tests() -> Result<()> {
    ensure_root()?;
    ensure_lxc_test_deps()?;
    crate::incus::ensure_incus()?;
    deps::exec(&mut deps::cargo_test(
        "lxcmon-testkit",
        false,
        &[&["--test", "harness"], deps::ROOT_TESTS].concat(),
    ))?;
    // The v1 pid list read every 0.2 s on this host's own hierarchy, the cgroup details
    // (throttling, pressure, OOM kills, per device) on cgroups the tests make, and per-mount
    // figures of a directory-backed mount namespace with disks of known size (no containers),
    // and a stopped init's veth and loop disk let go at once (not at the next cycle).
    for test in [
        "v1_pid_list_host",
        "details_host",
        "mounts_host",
        "unpin_host",
    ] {
        deps::exec(&mut deps::cargo_test(
            "lxcmon",
            true,
            &[&["--test", test], deps::ROOT_TESTS].concat(),
        ))?;
    }
    for collector in ["files", "ebpf"] {
        // `--once` checks, then one daemon per run held to ground truth on every cycle (its
        // `soak` test runs the scenario once here; `cargo xtask soak` loops it for an hour).
        for test in ["lxc_host", "daemon_truth"] {
            eprintln!("xtask: real-container tests ({test}) with collector: {collector}");
            deps::exec(
                deps::cargo_test(
                    "lxcmon",
                    true,
                    &[&["--test", test], deps::ROOT_TESTS].concat(),
                )
                .env("LXCMON_TEST_COLLECTOR", collector),
            )?;
        }
        // Issue 12's figures that depend on the collector (per interface, per device).
        eprintln!("xtask: real-container tests (signals_truth) with collector: {collector}");
        deps::exec(
            deps::cargo_test(
                "lxcmon",
                true,
                &[
                    &["--test", "signals_truth"],
                    deps::ROOT_TESTS,
                    &["per_collector_"],
                ]
                .concat(),
            )
            .env("LXCMON_TEST_COLLECTOR", collector),
        )?;
    }
    // The rest of issue 12's figures (pressure, throttling, OOM kills, mounts, limits) are
    // read from files whatever the collector: once.
    eprintln!("xtask: real-container tests (signals_truth)");
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[
            &["--test", "signals_truth"],
            deps::ROOT_TESTS,
            &["--skip", "per_collector_"],
        ]
        .concat(),
    ))?;
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[&["--test", "collectors"], deps::ROOT_TESTS].concat(),
    ))?;
    // Latency from the BPF programs: run-queue wait against schedstat, block I/O latency
    // against timed direct I/O, both switched off and on.
    eprintln!("xtask: latency histograms against the kernel's own accounting");
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[&["--test", "latency_truth"], deps::ROOT_TESTS].concat(),
    ))?;
    // TCP retransmits from BPF against the containers' own RetransSegs, with loss added on
    // their veths by nftables; switched off; through the daemon.
    eprintln!("xtask: TCP retransmits against the kernel's RetransSegs");
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[&["--test", "retrans_truth"], deps::ROOT_TESTS].concat(),
    ))?;
    // Incus as a third runtime: discovery in a non-default project, and the figures side
    // by side with Incus's own /1.0/metrics (file readers, as Incus reads the same files).
    eprintln!("xtask: real Incus containers against Incus's own metrics");
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[&["--test", "incus_host"], deps::ROOT_TESTS].concat(),
    ))?;
    // Pinned BPF state of the containers the tests made and removed.
    deps::cargo(&[
        "run",
        "-q",
        "-p",
        "lxcmon",
        "--features",
        "ebpf",
        "--",
        "--cleanup-bpf",
    ])
}
