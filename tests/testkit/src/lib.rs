//! Test support for lxcmon: real LXC containers with ground-truth workloads.
//!
//! - [`ct`]: test containers built by hand (cgroups of the LXC or Proxmox layout in every
//!   hierarchy, namespaces, veths, teardown), shared by the bench fleet and the VM guest.
//! - [`lab`]: creates busybox LXC containers on a private bridge, runs workloads inside them
//!   whose size the test knows exactly, and tears everything down (also leftovers of a crashed
//!   earlier run).
//! - [`agent`]: writes an lxcmon config and runs the agent (`--once` or as a daemon).
//! - [`incus`]: real Incus containers (daemon, network, pool, a local busybox image) and
//!   Incus's own `/1.0/metrics`.
//! - [`contract`]: checks an export against `shared/spec/export-formats.md`, field by field.
//! - [`netloss`]: packet loss on a test container's veth (nftables) and the kernel's TCP
//!   counters of a network namespace.
//! - [`bpfprog`]: the BPF programs this process holds, and their run time per event.
//! - [`workload`]: ground truth read fresh from the kernel, and steps whose effect is known.
//! - [`scenario`]: one daemon held to that truth on every cycle through a timeline of phases.
//! - [`signals`]: the kernel's pressure, throttling, memory-event, per-interface and
//!   per-device counters, and a daemon whose every cycle is held between two readings of them.
//!
//! This crate is test code: it spawns processes (lxc-*, ip, gcc) freely.

pub mod agent;
pub mod bpfprog;
pub mod contract;
pub mod ct;
pub mod direct_io;
pub mod incus;
pub mod lab;
pub mod netloss;
pub mod proc;
pub mod scenario;
pub mod schedstat;
pub mod signals;
pub mod workload;

pub use lab::{Container, ContainerSpec, Lab};
