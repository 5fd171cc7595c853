//! lxcmon: per-container metrics for LXC and Proxmox VE hosts.
//!
//! Data flows one way, and the folders follow it:
//!
//! - [`readers`]: leaf readers of kernel files (cgroup v1/v2, procfs, sysfs), held open across
//!   cycles; they import nothing above them.
//! - [`collect`]: one cycle's collection: discovery of the running containers, sampling through
//!   the readers, and the BPF collector (feature `ebpf`) that owns its programs' whole lifecycle.
//! - [`derive`]: owns the cycle's types and turns raw counters into the exported figures, per
//!   container instance (its cgroup's identity), cumulative counters never going backwards.
//! - [`export`]: the JSON export file (`records`, `autoscale_ml`) and the Prometheus endpoint.
//! - [`daemon`]: drives that pipeline ([`daemon::Pipeline`]: collect, then derive) on the
//!   configured interval; [`config`] and [`logging`] serve every layer.
//!
//! Each module imports only from those before it in this list (and `config`, `logging`).

pub mod collect;
pub mod config;
pub mod daemon;
pub mod derive;
pub mod export;
pub mod logging;
pub mod readers;
