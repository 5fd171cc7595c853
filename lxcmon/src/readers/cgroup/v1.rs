//! cgroup v1 figures, one controller hierarchy each: cpuacct, cpu, cpuset, memory, blkio, pids.

use super::subtree::{Subtree, Watcher};
use super::{CgroupSample, IoBytes, Layout, Limits, LIMITS_TTL};
use crate::readers::kfile::{keyed_values, KFile, ReadError};
use crate::readers::parse::{cpu_list_len, parse_dev};
use crate::readers::sysfs::DeviceFilter;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// v1 reports "unlimited" as the largest page-aligned counter value; anything this big is.
const UNLIMITED: u64 = 1 << 62;

#[derive(Debug)]
pub struct Reader {
    subtree: Subtree,
    limits: Option<(Instant, Limits)>,
    cpuacct_usage: KFile,
    cfs_quota: Option<KFile>,
    cfs_period: Option<KFile>,
    cpuset: Option<KFile>,
    memory_usage: Option<KFile>,
    memory_stat: Option<KFile>,
    memsw_usage: Option<KFile>,
    memory_limit: Option<KFile>,
    memsw_limit: Option<KFile>,
    blkio: Option<KFile>,
    pids_current: Option<KFile>,
}

impl Reader {
    pub fn open(
        layout: &Layout,
        rel: &Path,
        watcher: Option<Arc<Watcher>>,
    ) -> Result<Self, ReadError> {
        let dir = |ctrl: &str| layout.controller(ctrl).map(|m| m.join(rel));
        let opt = |ctrl: &str, name: &str| match dir(ctrl) {
            Some(d) => KFile::open_optional(d.join(name)),
            None => Ok(None),
        };
        let cpuacct = dir("cpuacct")
            .ok_or_else(|| ReadError::parse(rel, "the cpuacct controller is not mounted"))?;
        let procs_dir = ["pids", "memory", "cpuacct"]
            .iter()
            .find_map(|c| dir(c))
            .unwrap_or_else(|| cpuacct.clone());
        let cpuset = match opt("cpuset", "cpuset.effective_cpus")? {
            Some(f) => Some(f),
            None => opt("cpuset", "cpuset.cpus")?,
        };
        Ok(Self {
            cpuacct_usage: KFile::open(cpuacct.join("cpuacct.usage"))?,
            cfs_quota: opt("cpu", "cpu.cfs_quota_us")?,
            cfs_period: opt("cpu", "cpu.cfs_period_us")?,
            cpuset,
            memory_usage: opt("memory", "memory.usage_in_bytes")?,
            memory_stat: opt("memory", "memory.stat")?,
            memsw_usage: opt("memory", "memory.memsw.usage_in_bytes")?,
            memory_limit: opt("memory", "memory.limit_in_bytes")?,
            memsw_limit: opt("memory", "memory.memsw.limit_in_bytes")?,
            blkio: opt("blkio", "blkio.throttle.io_service_bytes_recursive")?,
            pids_current: opt("pids", "pids.current")?,
            subtree: Subtree::new(procs_dir, watcher),
            limits: None,
        })
    }

    /// Controllers that are not mounted or not present, so their figures read 0.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.memory_usage.is_none() || self.memory_stat.is_none() {
            missing.push("memory");
        }
        if self.blkio.is_none() {
            missing.push("blkio");
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
        let cpu_usage_ns = self.cpuacct_usage.read_u64(buf)?;
        let (memory_bytes, usage, stat_swap) = match (&self.memory_usage, &self.memory_stat) {
            (Some(usage), Some(stat)) => {
                let usage = usage.read_u64(buf)?;
                let [cache, swap] = keyed_values(stat.read(buf)?, ["total_cache", "total_swap"]);
                let cache = cache.ok_or_else(|| ReadError::parse(stat.path(), "no total_cache"))?;
                (usage.saturating_sub(cache), usage, swap)
            }
            _ => (0, 0, None),
        };
        // With swap accounting memory.stat carries total_swap, which saves a read of memsw.
        let swap_bytes = match (&self.memsw_usage, stat_swap) {
            (None, _) => 0,
            (Some(_), Some(swap)) => swap,
            (Some(f), None) => f.read_u64(buf)?.saturating_sub(usage),
        };
        let io = match (&self.blkio, devices) {
            (Some(f), Some(devices)) => parse_throttle_bytes(f.read(buf)?, devices),
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
        let cpu_quota_cores = match (&self.cfs_quota, &self.cfs_period) {
            (Some(q), Some(p)) => {
                let quota = q
                    .read(buf)?
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| ReadError::parse(q.path(), "not a number"))?;
                let period = p.read_u64(buf)?;
                (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
            }
            _ => None,
        };
        let memory_limit = limited(self.memory_limit.as_ref(), buf)?;
        let swap_limit = match (memory_limit, limited(self.memsw_limit.as_ref(), buf)?) {
            (Some(mem), Some(memsw)) => Some(memsw.saturating_sub(mem)),
            _ => None,
        };
        Ok(Limits {
            cpu_quota_cores,
            cpuset_cpus: match &self.cpuset {
                Some(f) => cpu_list_len(f.read(buf)?),
                None => None,
            },
            memory_bytes: memory_limit,
            swap_bytes: swap_limit,
        })
    }
}

fn limited(file: Option<&KFile>, buf: &mut Vec<u8>) -> Result<Option<u64>, ReadError> {
    match file {
        Some(f) => Ok(Some(f.read_u64(buf)?).filter(|v| *v < UNLIMITED)),
        None => Ok(None),
    }
}

/// Sums the `Read` and `Write` lines of `blkio.throttle.io_service_bytes*` over devices that
/// are not excluded.
pub fn parse_throttle_bytes(text: &str, devices: &DeviceFilter) -> IoBytes {
    let mut io = IoBytes::default();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(dev), Some(op), Some(value)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(dev) = parse_dev(dev) else { continue };
        if devices.is_excluded(dev) {
            continue;
        }
        let value: u64 = value.parse().unwrap_or(0);
        match op {
            "Read" => io.read += value,
            "Write" => io.write += value,
            _ => {}
        }
    }
    io
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_bytes_read_write_only() {
        let dir = tempfile::tempdir().unwrap();
        let filter = crate::readers::sysfs::tests::device_fixture(
            dir.path(),
            &[("254:0", "vda"), ("7:3", "loop3")],
            &["loop"],
        );
        let text = "254:0 Read 499712\n254:0 Write 8388608\n254:0 Sync 17276928\n254:0 Async 0\n\
                    254:0 Discard 8388608\n254:0 Total 25165824\n7:3 Read 77\n7:3 Write 77\nTotal 25165978\n";
        assert_eq!(
            parse_throttle_bytes(text, &filter),
            IoBytes {
                read: 499712,
                write: 8388608
            }
        );
        assert_eq!(
            parse_throttle_bytes("Total 0\n", &filter),
            IoBytes::default()
        );
    }
}
