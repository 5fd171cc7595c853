//! Test support for lxcmon: real LXC containers with ground-truth workloads.
