//! lxcmon: per-container metrics for LXC and Proxmox VE hosts.
//!
//! Data flows one way: [`discovery`] finds the running containers, [`sample`] reads their raw
//! counters through the cgroup and procfs readers, [`derive`] turns counters into the exported
//! figures, and [`export`] writes them. [`daemon`] drives that pipeline on the configured interval.

#[cfg(feature = "ebpf")]
pub mod bpf;
pub mod cgroup;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod derive;
pub mod discovery;
pub mod export;
pub mod kfile;
pub mod logging;
pub mod procfs;
pub mod prometheus;
pub mod sample;
pub mod sysfs;
