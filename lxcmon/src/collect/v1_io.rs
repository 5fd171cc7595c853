//! The one side effect of the file readers on cgroup v1: switching block I/O counting on.

use super::Purpose;
use crate::config::Config;
use crate::readers::cgroup::Layout;
use crate::readers::parse::parse_dev;
use crate::readers::procfs;
use crate::readers::sysfs::{self, DeviceFilter};
use std::path::Path;

/// cgroup v1 on kernels 6.9 and later counts block I/O per cgroup only once a throttle rule
/// exists on the disk. An unlimited rule written at the root switches counting on for that
/// disk until reboot and limits nothing. Without it every I/O figure would be a silent 0.
/// A diagnostic run (`--once`) changes nothing: it only says why its I/O figures may read 0.
/// A disk that has a rule already (counting is on; an administrator's limit) is left alone.
pub(crate) fn v1_io_accounting(root: &Path, layout: &Layout, cfg: &Config, purpose: Purpose) {
    let Some(blkio) = layout.controller("blkio") else {
        return;
    };
    if procfs::kernel_version(root).is_some_and(|v| v < (6, 9)) {
        return;
    }
    if !cfg.monitoring.enable_v1_io_accounting {
        tracing::warn!("cgroup v1 on kernel >= 6.9 counts block I/O only for disks with a throttle rule, and enable_v1_io_accounting is false: I/O figures read 0 (see README)");
        return;
    }
    let disks = match sysfs::whole_disks(root) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %crate::logging::Chain(&e), "cannot list disks: cgroup v1 I/O figures may read 0");
            return;
        }
    };
    if purpose == Purpose::Once {
        tracing::info!("--once writes no cgroup v1 throttle rule: on kernels >= 6.9, disks no running agent switched counting on read 0 I/O (see README)");
        return;
    }
    let rule_file = blkio.join("blkio.throttle.write_bps_device");
    let ruled: Vec<(u32, u32)> = std::fs::read_to_string(&rule_file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| parse_dev(l.split_whitespace().next()?))
        .collect();
    let filter = DeviceFilter::new(root, &cfg.monitoring.excluded_devices);
    let mut enabled = Vec::new();
    for sysfs::Disk {
        name,
        dev: (major, minor),
    } in disks
    {
        if filter.excludes_name(&name) {
            continue;
        }
        if ruled.contains(&(major, minor)) {
            enabled.push(name);
            continue;
        }
        match std::fs::write(&rule_file, format!("{major}:{minor} 0\n")) {
            Ok(()) => enabled.push(name),
            Err(e) => tracing::debug!(disk = %name, error = %e, "no throttle rule possible"),
        }
    }
    if enabled.is_empty() {
        tracing::warn!(
            "could not switch on cgroup v1 I/O counting for any disk: I/O figures may read 0"
        );
    } else {
        tracing::info!(disks = ?enabled, "switched on cgroup v1 block I/O counting (unlimited throttle rule; see README)");
    }
}
