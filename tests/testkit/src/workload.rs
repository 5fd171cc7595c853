//! Ground truth read fresh from the kernel, and workload steps whose effect the test knows
//! exactly (processes it can name and kill, a nested cgroup, a container restarted in place).
//!
//! The process count is taken from `/proc/<pid>/cgroup` of every process, never from a v1
//! `cgroup.procs`: opening a v1 `cgroup.procs` reloads the pid list the kernel shares with every
//! other reader of that cgroup, so a test reading it would refresh a stale agent's view and hide
//! exactly the defect it looks for.

use crate::lab::{CgroupLayout, Container};
use crate::proc::{poll, run_ok, run_timeout};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The container a process belongs to (`lxcmon-t-a` for `/lxc.payload.lxcmon-t-a/...`), from
/// the line of `/proc/<pid>/cgroup` of the hierarchy the process count comes from.
pub(crate) fn container_of(cgroup_text: &str, layout: CgroupLayout) -> Option<&str> {
    let path = cgroup_text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let wanted = match layout {
            CgroupLayout::V1 => ctrls.split(',').any(|c| c == "pids"),
            CgroupLayout::V2 => ctrls.is_empty(),
        };
        wanted.then_some(path)
    })?;
    let rest = path.strip_prefix("/lxc.payload.")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// Live processes (not threads, no zombies) per container name, from a walk of `/proc`.
pub fn processes_by_container(layout: CgroupLayout) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // A process may exit while we look: skip what cannot be read.
        let Ok(cg) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(container) = container_of(&cg, layout) else {
            continue;
        };
        if process_state(pid.parse().unwrap_or(0)) == Some('Z') {
            continue;
        }
        *out.entry(container.to_owned()).or_insert(0) += 1;
    }
    Ok(out)
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), `None` when it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Whether `/proc/<pid>` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z')
}

/// Memory in use without page cache, as the kernel charges it to the container's cgroup:
/// v1 `memory.usage_in_bytes` − `total_cache`, v2 `memory.current` − `file`.
pub fn memory_bytes(c: &Container) -> Result<u64> {
    let stat_key = |text: &str, key: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
    };
    let (usage_file, stat_file, cache_key) = match c.layout {
        CgroupLayout::V1 => ("memory.usage_in_bytes", "memory.stat", "total_cache"),
        CgroupLayout::V2 => ("memory.current", "memory.stat", "file"),
    };
    let dir = c.cgroup_dir("memory");
    let usage: u64 = fs::read_to_string(dir.join(usage_file))
        .with_context(|| format!("reading {usage_file} of {}", c.name))?
        .trim()
        .parse()
        .with_context(|| format!("{usage_file} of {}", c.name))?;
    let stat = fs::read_to_string(dir.join(stat_file))
        .with_context(|| format!("reading {stat_file} of {}", c.name))?;
    let cache = stat_key(&stat, cache_key)
        .with_context(|| format!("no {cache_key} in {stat_file} of {}", c.name))?;
    Ok(usage.saturating_sub(cache))
}

/// Cumulative CPU time of the container's cgroup in nanoseconds.
pub fn cpu_ns(c: &Container) -> Result<u64> {
    match c.layout {
        CgroupLayout::V1 => {
            let p = c.cgroup_dir("cpuacct").join("cpuacct.usage");
            fs::read_to_string(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .parse()
                .with_context(|| format!("{}", p.display()))
        }
        CgroupLayout::V2 => {
            let p = c.cgroup_dir("").join("cpu.stat");
            let text =
                fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
            let usec: u64 = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .context("no usage_usec in cpu.stat")?
                .trim()
                .parse()?;
            Ok(usec * 1000)
        }
    }
}

/// Host processes of container `c` whose command line contains `needle` (NUL-separated argv).
pub fn pids_matching(c: &Container, needle: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let (Ok(cmd), Ok(cg)) = (
            fs::read(format!("/proc/{pid}/cmdline")),
            fs::read_to_string(format!("/proc/{pid}/cgroup")),
        ) else {
            continue;
        };
        if container_of(&cg, c.layout) != Some(c.cgroup_name()) || !alive(pid) {
            continue;
        }
        if String::from_utf8_lossy(&cmd).contains(needle) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Sleep arguments no other process uses, so that the test finds exactly the ones it started.
static NEXT_MARK: AtomicU32 = AtomicU32::new(0);

/// Starts `n` `sleep` processes in the container (one `lxc-attach`) and returns their host
/// pids once all are running.
pub fn start_sleeps(c: &Container, n: u32) -> Result<Vec<u32>> {
    let mark =
        7_100_000 + std::process::id() % 1000 * 1000 + NEXT_MARK.fetch_add(1, Ordering::SeqCst);
    c.sh(&format!(
        "i=0; while [ $i -lt {n} ]; do sleep {mark} </dev/null >/dev/null 2>&1 & i=$((i+1)); done"
    ))?;
    let needle = format!("sleep\0{mark}\0");
    let found = poll(Duration::from_secs(10), || {
        let pids = pids_matching(c, &needle)?;
        Ok((pids.len() == n as usize).then_some(pids))
    })?;
    found.with_context(|| format!("{n} sleep {mark} did not all start in {}", c.name))
}

/// Starts the memory holder (`Container::hold_memory`) and returns its host pid.
pub fn hold_memory(c: &Container, mib: u64) -> Result<u32> {
    c.hold_memory(mib)?;
    let pids = pids_matching(c, &format!("lxcmon-memhog\0{mib}\0"))?;
    ensure!(
        pids.len() == 1,
        "expected one memory holder of {mib} MiB in {}, found {pids:?}",
        c.name
    );
    Ok(pids[0])
}

/// Starts a busy shell loop and returns its host pid.
pub fn busy_loop(c: &Container) -> Result<u32> {
    let before = pids_matching(c, "while :; do :; done")?;
    c.busy_loop()?;
    let found = poll(Duration::from_secs(10), || {
        let now: Vec<u32> = pids_matching(c, "while :; do :; done")?
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        Ok((now.len() == 1).then_some(now[0]))
    })?;
    found.with_context(|| format!("the busy loop did not start in {}", c.name))
}

/// SIGKILLs the processes and waits until each is gone (reaped by the container's init).
pub fn kill_and_wait(pids: &[u32]) -> Result<()> {
    for &pid in pids {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
    }
    let gone = poll(Duration::from_secs(10), || {
        Ok(pids
            .iter()
            .all(|&p| process_state(p).is_none())
            .then_some(()))
    })?;
    ensure!(
        gone.is_some(),
        "processes {pids:?} still there 10 s after SIGKILL"
    );
    Ok(())
}

/// A cgroup created below a container's own in every hierarchy it has, with processes moved in.
pub struct Nested {
    dirs: Vec<PathBuf>,
}

/// The container's directories in every mounted hierarchy (v1 controllers, named hierarchies
/// and the v2 tree of a hybrid host; just the one on pure v2).
fn container_dirs(c: &Container) -> Result<Vec<PathBuf>> {
    let leaf = format!("lxc.payload.{}", c.cgroup_name());
    let root = Path::new("/sys/fs/cgroup");
    if c.layout == CgroupLayout::V2 {
        return Ok(vec![root.join(leaf)]);
    }
    let mut dirs = Vec::new();
    for e in fs::read_dir(root).context("listing /sys/fs/cgroup")? {
        let p = e?.path().join(&leaf);
        // Controllers mounted together appear once per symlink: keep real directories once.
        if p.is_dir() && !fs::symlink_metadata(p.parent().unwrap_or(root))?.is_symlink() {
            dirs.push(p);
        }
    }
    ensure!(!dirs.is_empty(), "{} has no cgroup directories", c.name);
    Ok(dirs)
}

impl Nested {
    /// Creates `<container cgroup>/<leaf>` in every hierarchy and moves `pids` into it.
    pub fn create(c: &Container, leaf: &str, pids: &[u32]) -> Result<Self> {
        let mut nested = Self { dirs: Vec::new() };
        for parent in container_dirs(c)? {
            let dir = parent.join(leaf);
            fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            nested.dirs.push(dir.clone());
            // A v1 cpuset child takes no task until it has CPUs and memory nodes.
            for key in ["cpuset.cpus", "cpuset.mems"] {
                if dir.join(key).exists() {
                    let v = fs::read_to_string(parent.join(key))?;
                    fs::write(dir.join(key), v.trim())
                        .with_context(|| format!("writing {}/{key}", dir.display()))?;
                }
            }
            for pid in pids {
                fs::write(dir.join("cgroup.procs"), pid.to_string())
                    .with_context(|| format!("moving {pid} into {}", dir.display()))?;
            }
        }
        Ok(nested)
    }

    /// Removes the cgroup in every hierarchy (its processes must be gone).
    pub fn remove(mut self) -> Result<()> {
        for dir in std::mem::take(&mut self.dirs) {
            // The kernel may still hold the emptied cgroup for a moment.
            let removed = poll(Duration::from_secs(5), || {
                Ok(fs::remove_dir(&dir).is_ok().then_some(()))
            })?;
            ensure!(removed.is_some(), "cannot rmdir {}", dir.display());
        }
        Ok(())
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        for d in &self.dirs {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Stops the container and starts it again under the same name (a new cgroup, a new init, a
/// new veth), and waits until it is up as the lab leaves a fresh one: address configured, rcS
/// finished.
pub fn restart(c: &Container) -> Result<()> {
    run_ok(
        Command::new("lxc-stop").args(["-k", "-n", &c.name]),
        CMD_TIMEOUT,
    )?;
    run_ok(Command::new("lxc-start").args(["-n", &c.name]), CMD_TIMEOUT)?;
    let up = poll(Duration::from_secs(20), || {
        if c.init_pid().is_err() {
            return Ok(None);
        }
        let out = run_timeout(
            Command::new("lxc-attach").args([
                "-n",
                &c.name,
                "--clear-env",
                "--",
                "/bin/sh",
                "-c",
                "ip -4 addr show eth0; ps",
            ]),
            CMD_TIMEOUT,
        )?;
        Ok(
            (out.stdout.contains(&format!("{}/24", c.ip)) && !out.stdout.contains("rcS"))
                .then_some(()),
        )
    })?;
    ensure!(up.is_some(), "{} did not come back after a restart", c.name);
    Ok(())
}

/// A process's resident memory, open descriptors and CPU time.
#[derive(Debug, Clone, Copy)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub fds: u64,
    pub cpu_secs: f64,
}

/// Reads [`ProcStats`] of `pid` from `/proc`.
pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count() as u64;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command; in clock
    // ticks, which the kernel reports at USER_HZ = 100 on every architecture Linux exports it.
    if f.len() < 13 {
        bail!("short /proc/{pid}/stat: {stat}");
    }
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ProcStats {
        rss_kib,
        fds,
        cpu_secs: ticks as f64 / 100.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_of_takes_the_pids_line_on_v1_and_the_unified_line_on_v2() {
        let text =
            "12:pids:/lxc.payload.web/.lxc\n5:cpu,cpuacct:/lxc.payload.web\n0::/lxc.payload.db\n";
        assert_eq!(container_of(text, CgroupLayout::V1), Some("web"));
        assert_eq!(container_of(text, CgroupLayout::V2), Some("db"));
        assert_eq!(container_of("0::/init.scope\n", CgroupLayout::V2), None);
        assert_eq!(
            container_of("3:pids:/lxc.monitor.web\n", CgroupLayout::V1),
            None
        );
    }
}
