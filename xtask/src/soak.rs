//! `cargo xtask soak`: the daemon_truth scenario in a loop against one daemon for N minutes.
//!
//! It runs the `soak` test of `lxcmon/tests/daemon_truth.rs` (real LXC containers, root), which
//! checks every cycle against ground truth and reports the daemon's RSS, open descriptors and
//! CPU time at the start, after the warm-up, every ~5 minutes and at the end; it fails on any
//! mismatch, or when RSS grows by more than 8 MiB or descriptors by more than 4 after the
//! warm-up (the retained history full).

use crate::deps;
use anyhow::{ensure, Result};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the scenario loops.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// The collector under test.
    #[arg(long, default_value = "ebpf", value_parser = ["files", "ebpf"])]
    collector: String,
}

pub fn run(args: &SoakArgs) -> Result<()> {
    ensure!(args.minutes > 0, "--minutes must be at least 1");
    crate::lxc::ensure_root()?;
    crate::lxc::ensure_lxc_test_deps()?;
    // The agent is built with its BPF programs, as `cargo xtask test` builds it.
    crate::ebpf::build(&crate::ebpf::BuildArgs { debug: false })?;
    let result = deps::exec(
        deps::cargo_test(
            "lxcmon",
            true,
            &[
                "--test",
                "daemon_truth",
                "--",
                "--ignored",
                "--exact",
                "soak",
                "--nocapture",
            ],
        )
        .env("LXCMON_SOAK_SECS", (args.minutes * 60).to_string())
        // A lab site of its own (lock, names, bridge, pin directory): the suite can run meanwhile.
        .env("LXCMON_LAB_SITE", "soak")
        .env("LXCMON_TEST_COLLECTOR", &args.collector),
    );
    // The soak's daemon pinned its counters in the soak site's own directory; its containers
    // are gone, so nothing of it stays attached once the pins are removed.
    if let Some(dir) = std::path::Path::new(lxcmon_testkit::lab::SOAK.pin_dir).parent() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("xtask soak: removing {}: {e}", dir.display());
            }
        }
    }
    result
}
