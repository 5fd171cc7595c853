//! `cargo xtask bench`: placeholder until the fleet benchmark lands.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: &BenchArgs) -> Result<()> {
    bail!("the benchmark is not implemented yet")
}
