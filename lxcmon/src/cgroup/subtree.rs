//! The processes of a container's cgroup subtree, without re-walking the tree every cycle.
//!
//! Creating or removing a child cgroup updates its parent directory's mtime, so a cycle checks
//! one `fstat` per known directory and re-walks only when one changed. The kernel's timestamps
//! are coarse (a jiffy), so a directory modified within the last second is re-walked anyway.

use crate::kfile::{KFile, ReadError};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug)]
struct Dir {
    handle: File,
    procs: KFile,
    mtime: (i64, i64),
}

#[derive(Debug)]
pub struct Subtree {
    top: PathBuf,
    dirs: Vec<Dir>,
}

/// A modification this recent may be followed by another with the same coarse timestamp.
const SETTLE_NS: i128 = 1_000_000_000;

fn mtime(meta: &std::fs::Metadata) -> (i64, i64) {
    (meta.mtime(), meta.mtime_nsec())
}

fn settled(mtime: (i64, i64)) -> bool {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    let then = i128::from(mtime.0) * 1_000_000_000 + i128::from(mtime.1);
    now - then > SETTLE_NS
}

impl Subtree {
    pub fn new(top: PathBuf) -> Self {
        Self {
            top,
            dirs: Vec::new(),
        }
    }

    pub fn top(&self) -> &Path {
        &self.top
    }

    /// Lists the subtree's processes, shallowest cgroup first, into `pids`.
    pub fn pids(&mut self, buf: &mut Vec<u8>, pids: &mut Vec<u32>) -> Result<(), ReadError> {
        if !self.unchanged() {
            self.walk()?;
        }
        pids.clear();
        for (i, dir) in self.dirs.iter().enumerate() {
            match dir.procs.read(buf) {
                Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
                // A child removed since the check: its processes are gone or moved up.
                Err(e) if i > 0 && e.is_gone() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn unchanged(&self) -> bool {
        !self.dirs.is_empty()
            && self.dirs.iter().all(|d| {
                d.handle
                    .metadata()
                    .is_ok_and(|m| mtime(&m) == d.mtime && settled(d.mtime))
            })
    }

    /// Opens every directory of the subtree (breadth first) with its `cgroup.procs`.
    fn walk(&mut self) -> Result<(), ReadError> {
        self.dirs.clear();
        let mut queue = vec![self.top.clone()];
        let mut next = 0;
        while next < queue.len() {
            let path = queue[next].clone();
            let top = next == 0;
            next += 1;
            let opened = File::open(&path)
                .and_then(|h| h.metadata().map(|m| (h, mtime(&m))))
                .map_err(|e| ReadError::io(&path, e))
                .and_then(|(handle, mtime)| {
                    // Listed before its procs are opened: a child created meanwhile changes mtime.
                    let children = std::fs::read_dir(&path).map_err(|e| ReadError::io(&path, e))?;
                    let procs = KFile::open(path.join("cgroup.procs"))?;
                    Ok((handle, mtime, children, procs))
                });
            let (handle, mtime, children, procs) = match opened {
                Ok(o) => o,
                Err(e) if !top && e.is_gone() => continue,
                Err(e) => return Err(e),
            };
            for entry in children.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    queue.push(entry.path());
                }
            }
            self.dirs.push(Dir {
                handle,
                procs,
                mtime,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort();
        v
    }

    #[test]
    fn nested_processes_shallowest_first_and_vanishing_children() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("lxc.payload.c1");
        std::fs::create_dir_all(top.join(".lxc")).unwrap();
        std::fs::create_dir_all(top.join("system.slice/cron.service")).unwrap();
        std::fs::write(top.join("cgroup.procs"), "100\n").unwrap();
        std::fs::write(top.join(".lxc/cgroup.procs"), "200\n201\n").unwrap();
        std::fs::write(top.join("system.slice/cgroup.procs"), "").unwrap();
        std::fs::write(top.join("system.slice/cron.service/cgroup.procs"), "300\n").unwrap();
        let mut s = Subtree::new(top.clone());
        let (mut buf, mut pids) = (Vec::new(), Vec::new());
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(pids[0], 100, "shallowest first");
        assert_eq!(sorted(pids.clone()), vec![100, 200, 201, 300]);

        // Processes move within known cgroups: seen without a walk.
        std::fs::write(top.join(".lxc/cgroup.procs"), "200\n").unwrap();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(sorted(pids.clone()), vec![100, 200, 300]);

        // A new child cgroup changes its parent's mtime: walked again.
        std::fs::create_dir_all(top.join("system.slice/ssh.service")).unwrap();
        std::fs::write(top.join("system.slice/ssh.service/cgroup.procs"), "400\n").unwrap();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(sorted(pids.clone()), vec![100, 200, 300, 400]);

        // A child removed under us is skipped; the top one gone is an error.
        std::fs::remove_dir_all(top.join(".lxc")).unwrap();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(sorted(pids.clone()), vec![100, 300, 400]);
        std::fs::remove_dir_all(&top).unwrap();
        assert!(s.pids(&mut buf, &mut pids).unwrap_err().is_gone());
    }

    #[test]
    fn settled_directories_are_not_walked_again() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("c");
        std::fs::create_dir_all(&top).unwrap();
        std::fs::write(top.join("cgroup.procs"), "1\n").unwrap();
        // Backdate the directory so it counts as settled.
        let old = std::fs::File::open(&top).unwrap();
        old.set_modified(SystemTime::now() - std::time::Duration::from_secs(10))
            .unwrap();
        let mut s = Subtree::new(top.clone());
        s.pids(&mut Vec::new(), &mut Vec::new()).unwrap();
        assert!(s.unchanged());
        std::fs::create_dir(top.join("new")).unwrap();
        assert!(!s.unchanged(), "a new child is noticed");
    }
}
