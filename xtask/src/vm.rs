//! `cargo xtask vm-test`: placeholder until the VM matrix lands.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct VmArgs {}

pub fn run(_args: &VmArgs) -> Result<()> {
    bail!("the VM tests are not implemented yet")
}
