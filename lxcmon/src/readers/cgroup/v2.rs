//! cgroup v2 (unified) figures: `cpu.stat`, `memory.*`, `io.stat`, `pids.current`.

use super::subtree::{Subtree, Watcher};
use super::{CgroupSample, IoBytes, Limits, LIMITS_TTL};
use crate::readers::kfile::{keyed_value, parse_u64_or_max, KFile, ReadError};
use crate::readers::parse::{cpu_list_len, parse_dev};
use crate::readers::sysfs::DeviceFilter;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug)]
pub struct Reader {
    dir: PathBuf,
    subtree: Subtree,
    limits: Option<(Instant, Limits)>,
    cpu_stat: KFile,
    memory_current: Option<KFile>,
    memory_stat: Option<KFile>,
    swap_current: Option<KFile>,
    memory_max: Option<KFile>,
    swap_max: Option<KFile>,
    io_stat: Option<KFile>,
    pids_current: Option<KFile>,
    cpu_max: Option<KFile>,
    cpuset: Option<KFile>,
}

impl Reader {
    pub fn open(dir: PathBuf, watcher: Option<Arc<Watcher>>) -> Result<Self, ReadError> {
        let opt = |name: &str| KFile::open_optional(dir.join(name));
        Ok(Self {
            cpu_stat: KFile::open(dir.join("cpu.stat"))?,
            memory_current: opt("memory.current")?,
            memory_stat: opt("memory.stat")?,
            swap_current: opt("memory.swap.current")?,
            memory_max: opt("memory.max")?,
            swap_max: opt("memory.swap.max")?,
            io_stat: opt("io.stat")?,
            pids_current: opt("pids.current")?,
            cpu_max: opt("cpu.max")?,
            cpuset: opt("cpuset.cpus.effective")?,
            subtree: Subtree::new(dir.clone(), watcher),
            limits: None,
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Controllers that are not enabled for this cgroup, so their figures read 0.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.memory_current.is_none() || self.memory_stat.is_none() {
            missing.push("memory");
        }
        if self.io_stat.is_none() {
            missing.push("io");
        }
        if self.pids_current.is_none() {
            missing.push("pids");
        }
        missing
    }

    pub fn sample(
        &mut self,
        devices: Option<&DeviceFilter>,
        buf: &mut Vec<u8>,
        pids: &mut Vec<u32>,
    ) -> Result<CgroupSample, ReadError> {
        let cpu = self.cpu_stat.read(buf)?;
        let cpu_usage_ns = keyed_value(cpu, "usage_usec")
            .ok_or_else(|| ReadError::parse(self.cpu_stat.path(), "no usage_usec"))?
            .saturating_mul(1000);

        let memory_bytes = match (&self.memory_current, &self.memory_stat) {
            (Some(current), Some(stat)) => {
                let current = current.read_u64(buf)?;
                let file = keyed_value(stat.read(buf)?, "file")
                    .ok_or_else(|| ReadError::parse(stat.path(), "no file"))?;
                current.saturating_sub(file)
            }
            _ => 0,
        };
        let swap_bytes = match &self.swap_current {
            Some(f) => f.read_u64(buf)?,
            None => 0,
        };
        let io = match (&self.io_stat, devices) {
            (Some(f), Some(devices)) => parse_io_stat(f.read(buf)?, devices),
            _ => IoBytes::default(),
        };
        let threads = match &self.pids_current {
            Some(f) => f.read_u64(buf)?,
            None => 0,
        };
        self.subtree.pids(buf, pids)?;
        let limits = match self.limits {
            Some((at, l)) if at.elapsed() < LIMITS_TTL => l,
            _ => {
                let l = self.read_limits(buf)?;
                self.limits = Some((Instant::now(), l));
                l
            }
        };
        Ok(CgroupSample {
            cpu_usage_ns,
            memory_bytes,
            swap_bytes,
            io,
            threads,
            processes: pids.len() as u64,
            limits,
        })
    }
}

impl Reader {
    fn read_limits(&self, buf: &mut Vec<u8>) -> Result<Limits, ReadError> {
        Ok(Limits {
            cpu_quota_cores: match &self.cpu_max {
                Some(f) => parse_cpu_max(f.read(buf)?)
                    .ok_or_else(|| ReadError::parse(f.path(), "bad cpu.max"))?,
                None => None,
            },
            cpuset_cpus: match &self.cpuset {
                Some(f) => cpu_list_len(f.read(buf)?),
                None => None,
            },
            memory_bytes: read_max(self.memory_max.as_ref(), buf)?,
            swap_bytes: read_max(self.swap_max.as_ref(), buf)?,
        })
    }
}

fn read_max(file: Option<&KFile>, buf: &mut Vec<u8>) -> Result<Option<u64>, ReadError> {
    match file {
        Some(f) => f.read_u64_or_max(buf),
        None => Ok(None),
    }
}

/// `cpu.max` is `<quota|max> <period>`; the result is the quota in cores.
pub fn parse_cpu_max(text: &str) -> Option<Option<f64>> {
    let mut it = text.split_whitespace();
    let quota = parse_u64_or_max(it.next()?)?;
    let period: u64 = it.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if period == 0 {
        return None;
    }
    Some(quota.map(|q| q as f64 / period as f64))
}

/// Sums `rbytes`/`wbytes` over the devices of `io.stat` that are not excluded.
pub fn parse_io_stat(text: &str, devices: &DeviceFilter) -> IoBytes {
    let mut io = IoBytes::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(dev) = fields.next().and_then(parse_dev) else {
            continue;
        };
        if devices.is_excluded(dev) {
            continue;
        }
        for field in fields {
            match field.split_once('=') {
                Some(("rbytes", v)) => io.read += v.parse::<u64>().unwrap_or(0),
                Some(("wbytes", v)) => io.write += v.parse::<u64>().unwrap_or(0),
                _ => {}
            }
        }
    }
    io
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::readers::sysfs::DeviceFilter;

    #[test]
    fn cpu_max_forms() {
        assert_eq!(parse_cpu_max("max 100000\n"), Some(None));
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(Some(1.5)));
        assert_eq!(parse_cpu_max("50000 0"), None);
        assert_eq!(parse_cpu_max(""), None);
    }

    #[test]
    fn io_stat_skips_excluded_devices() {
        let dir = tempfile::tempdir().unwrap();
        let filter = crate::readers::sysfs::tests::device_fixture(
            dir.path(),
            &[("254:0", "vda"), ("7:0", "loop0"), ("253:1", "dm-1")],
            &["loop", "dm-"],
        );
        let text = "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n\
                    7:0 rbytes=1000000 wbytes=0 rios=9 wios=0 dbytes=0 dios=0\n\
                    253:1 rbytes=5 wbytes=5 rios=1 wios=1 dbytes=0 dios=0\n\
                    8:0 rbytes=1 wbytes=2 rios=1 wios=1 dbytes=0 dios=0\n";
        assert_eq!(
            parse_io_stat(text, &filter),
            IoBytes {
                read: 4097,
                write: 8194
            }
        );
        assert_eq!(parse_io_stat("", &DeviceFilter::none()), IoBytes::default());
    }
}
