//! Host-wide figures the derivation and the export need: online CPUs, memory, host CPU %, the
//! agent's own RSS.

use crate::derive::HostFacts;
use crate::readers::kfile::{self, KFile, ReadError};
use crate::readers::parse::cpu_list_len;
use crate::readers::procfs;
use std::path::Path;

/// Host-wide files read once per cycle, held open.
#[derive(Debug)]
pub(crate) struct HostFiles {
    online: KFile,
    meminfo: KFile,
    stat: KFile,
    self_status: KFile,
    last_cpu: Option<(u64, u64)>,
    buf: Vec<u8>,
}

impl HostFiles {
    pub(crate) fn open(root: &Path) -> Result<Self, ReadError> {
        Ok(Self {
            online: KFile::open(kfile::under(root, "/sys/devices/system/cpu/online"))?,
            meminfo: KFile::open(kfile::under(root, "/proc/meminfo"))?,
            stat: KFile::open(kfile::under(root, "/proc/stat"))?,
            // The agent's own figures come from the real /proc, whatever the root.
            self_status: KFile::open("/proc/self/status".into())?,
            last_cpu: None,
            buf: Vec::new(),
        })
    }

    pub(crate) fn facts(&mut self) -> Result<HostFacts, ReadError> {
        let online_text = self.online.read(&mut self.buf)?;
        let online_cpus = cpu_list_len(online_text)
            .ok_or_else(|| ReadError::parse(self.online.path(), online_text.trim()))?;
        let mem = procfs::parse_meminfo(self.meminfo.read(&mut self.buf)?)
            .ok_or_else(|| ReadError::parse(self.meminfo.path(), "no MemTotal"))?;
        Ok(HostFacts {
            online_cpus,
            mem_total: mem.mem_total,
            swap_total: mem.swap_total,
        })
    }

    /// Host CPU busy percent since the previous call (0 on the first).
    pub(crate) fn cpu_percent(&mut self) -> f64 {
        let Some(now) = self
            .stat
            .read(&mut self.buf)
            .ok()
            .and_then(procfs::host_cpu_times)
        else {
            return 0.0;
        };
        let pct = match self.last_cpu {
            Some((busy0, total0)) if now.1 > total0 => {
                now.0.saturating_sub(busy0) as f64 / (now.1 - total0) as f64 * 100.0
            }
            _ => 0.0,
        };
        self.last_cpu = Some(now);
        pct
    }

    pub(crate) fn rss(&mut self) -> u64 {
        self.self_status
            .read(&mut self.buf)
            .ok()
            .and_then(procfs::self_rss)
            .unwrap_or(0)
    }
}
