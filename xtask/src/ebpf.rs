//! `cargo xtask build-ebpf`: placeholder until the BPF path lands.

use anyhow::{bail, Result};

#[derive(clap::Args)]
pub struct BuildArgs {}

pub fn build(_args: &BuildArgs) -> Result<()> {
    bail!("the BPF build is not implemented yet")
}
