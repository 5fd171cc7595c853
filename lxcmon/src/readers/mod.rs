//! Leaf readers of kernel files: each takes a root path (fixture trees in tests) and returns
//! typed values; none imports anything above `readers`.

pub mod cgroup;
pub mod kfile;
pub mod mount_signals;
pub mod mountinfo;
pub mod mounts;
pub mod parse;
pub mod procfs;
pub mod sysfs;
