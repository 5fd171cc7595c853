//! Host facts from sysfs: block device names, whole disks, online CPUs.

use crate::readers::kfile::{self, ReadError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Decides which block devices count for I/O, by name prefix (`loop`, `dm-`), resolving
/// `major:minor` to a name through `/sys/dev/block` once per device.
#[derive(Debug)]
pub struct DeviceFilter {
    dev_block: PathBuf,
    prefixes: Vec<String>,
    verdicts: RwLock<HashMap<(u32, u32), bool>>,
    /// Names for the per-device figures, resolved once per device like the verdicts.
    labels: RwLock<HashMap<(u32, u32), Arc<str>>>,
}

impl DeviceFilter {
    pub fn new(root: &Path, prefixes: &[String]) -> Self {
        Self {
            dev_block: kfile::under(root, "/sys/dev/block"),
            prefixes: prefixes.iter().filter(|p| !p.is_empty()).cloned().collect(),
            verdicts: RwLock::new(HashMap::new()),
            labels: RwLock::new(HashMap::new()),
        }
    }

    /// A filter that excludes nothing.
    pub fn none() -> Self {
        Self::new(Path::new("/nonexistent"), &[])
    }

    pub fn is_excluded(&self, dev: (u32, u32)) -> bool {
        if self.prefixes.is_empty() {
            return false;
        }
        if let Some(v) = self.verdicts.read().ok().and_then(|m| m.get(&dev).copied()) {
            return v;
        }
        let verdict = self
            .name(dev)
            .is_some_and(|name| self.prefixes.iter().any(|p| name.starts_with(p.as_str())));
        if let Ok(mut m) = self.verdicts.write() {
            m.insert(dev, verdict);
        }
        verdict
    }

    /// Name of a block device (`vda`, `dm-0`) from its `/sys/dev/block/M:m` link.
    pub fn name(&self, (major, minor): (u32, u32)) -> Option<String> {
        let link = std::fs::read_link(self.dev_block.join(format!("{major}:{minor}"))).ok()?;
        link.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// The device's name for its per-device figures (cached), `major:minor` where
    /// `/sys/dev/block` has none.
    /// Shared, so the per-device figures of every cycle take no allocation for it.
    pub fn label(&self, dev: (u32, u32)) -> Arc<str> {
        if let Some(l) = self.labels.read().ok().and_then(|m| m.get(&dev).cloned()) {
            return l;
        }
        let label: Arc<str> = self
            .name(dev)
            .unwrap_or_else(|| format!("{}:{}", dev.0, dev.1))
            .into();
        if let Ok(mut m) = self.labels.write() {
            m.insert(dev, label.clone());
        }
        label
    }

    pub fn excludes_name(&self, name: &str) -> bool {
        self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }
}

/// A whole disk (not a partition) and its `major:minor`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Disk {
    pub name: String,
    pub dev: (u32, u32),
}

/// Whole disks from `/sys/block/*/dev`.
pub fn whole_disks(root: &Path) -> Result<Vec<Disk>, ReadError> {
    let dir = kfile::under(root, "/sys/block");
    let entries = std::fs::read_dir(&dir).map_err(|e| ReadError::io(&dir, e))?;
    let mut disks = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(dev) = kfile::read_to_string(&entry.path().join("dev")) else {
            continue;
        };
        if let Some(dev) = crate::readers::parse::parse_dev(dev.trim()) {
            disks.push(Disk { name, dev });
        }
    }
    disks.sort();
    Ok(disks)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds `sys/dev/block` links under `root` and a filter on them.
    pub fn device_fixture(root: &Path, devs: &[(&str, &str)], prefixes: &[&str]) -> DeviceFilter {
        let dev_block = root.join("sys/dev/block");
        std::fs::create_dir_all(&dev_block).unwrap();
        for (dev, name) in devs {
            std::os::unix::fs::symlink(
                format!("../../devices/virtual/block/{name}"),
                dev_block.join(dev),
            )
            .unwrap();
        }
        let prefixes: Vec<String> = prefixes.iter().map(|s| s.to_string()).collect();
        DeviceFilter::new(root, &prefixes)
    }

    #[test]
    fn excludes_by_prefix_and_counts_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let f = device_fixture(
            dir.path(),
            &[("7:0", "loop0"), ("254:0", "vda"), ("253:0", "dm-0")],
            &["loop", "dm-"],
        );
        assert!(f.is_excluded((7, 0)));
        assert!(f.is_excluded((253, 0)));
        assert!(!f.is_excluded((254, 0)));
        assert!(!f.is_excluded((8, 16)), "unknown devices are counted");
        assert_eq!(f.name((254, 0)).as_deref(), Some("vda"));
        assert_eq!(&*f.label((254, 0)), "vda");
        assert_eq!(&*f.label((8, 16)), "8:16", "no name: the numbers");
        // Cached: a link removed later does not change the name given.
        std::fs::remove_file(dir.path().join("sys/dev/block/254:0")).unwrap();
        assert_eq!(&*f.label((254, 0)), "vda");
        assert!(!DeviceFilter::none().is_excluded((7, 0)));
    }

    #[test]
    fn disks_and_cpus() {
        let dir = tempfile::tempdir().unwrap();
        for (name, dev) in [("vda", "254:0"), ("loop0", "7:0")] {
            let d = dir.path().join("sys/block").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
        }
        assert_eq!(
            whole_disks(dir.path()).unwrap(),
            vec![
                Disk {
                    name: "loop0".into(),
                    dev: (7, 0)
                },
                Disk {
                    name: "vda".into(),
                    dev: (254, 0)
                }
            ]
        );
    }
}
