//! Project tasks: `cargo xtask <task>`. Each task installs what it needs when it is missing,
//! so the README's commands work on a fresh Debian machine.

mod bench;
mod deb;
mod deps;
mod ebpf;
mod incus;
mod lxc;
mod soak;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "lxcmon project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the BPF object (installs nightly rust-src and bpf-linker when missing).
    BuildEbpf(ebpf::BuildArgs),
    /// Build and run the agent as a daemon (extra arguments go to lxcmon).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole test suite: lint, unit and fixture tests, real-container tests, VM tests.
    Test(test::TestArgs),
    /// Boot the VM kernel matrix and run the agent checks inside.
    VmTest(vm::VmArgs),
    /// Build the Debian package (the agent with its BPF programs, unit, config, dashboard).
    Deb(deb::DebArgs),
    /// Measure the agent's cost on a synthetic fleet of containers (not part of `test`).
    Bench(bench::BenchArgs),
    /// Run the daemon_truth scenario in a loop against one daemon (default 60 minutes);
    /// reports RSS, descriptors and CPU time, fails on any mismatch or growth (as root).
    Soak(soak::SoakArgs),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf(args) => ebpf::build(&args),
        Task::Run { args } => run(&args),
        Task::Test(args) => test::run(&args),
        Task::VmTest(args) => vm::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Soak(args) => soak::run(&args),
        Task::Deb(args) if args.test => deb::test(),
        Task::Deb(args) => deb::build(&args).map(|p| println!("{}", p.display())),
    }
}

/// Builds the agent with its BPF programs (installing the BPF toolchain when missing); where
/// that toolchain cannot be had, builds it without them: it then runs on the file readers.
fn run(args: &[String]) -> Result<()> {
    match ebpf::build(&ebpf::BuildArgs { debug: false }) {
        Ok(()) => deps::cargo(&["build", "--release", "-p", "lxcmon", "--features", "ebpf"])?,
        Err(e) => {
            eprintln!(
                "xtask: building without BPF programs ({e:#}); the agent will use the file readers"
            );
            deps::cargo(&["build", "--release", "-p", "lxcmon"])?;
        }
    }
    let bin = deps::workspace_root().join("target/release/lxcmon");
    deps::exec(std::process::Command::new(bin).args(args))
}
