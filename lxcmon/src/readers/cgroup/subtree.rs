//! The processes of a container's cgroup subtree, without re-walking the tree every cycle.
//!
//! Creating or removing a child cgroup is a directory event. With a [`Watcher`] (one inotify
//! descriptor for the whole agent, drained once per cycle) an unchanged subtree costs no
//! syscall beyond its `cgroup.procs` reads. Without one (inotify refused, watch limit reached)
//! each cycle checks the mtime of every known directory instead; the kernel's timestamps are
//! coarse (a jiffy), so a directory modified within the last second is re-walked anyway.

use crate::readers::kfile::{KFile, ReadError};
use rustix::fs::inotify;
use std::collections::HashMap;
use std::fs::File;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Watches cgroup directories for children created, removed or renamed, and marks the
/// subtrees that hold them for a re-walk.
#[derive(Debug)]
pub struct Watcher {
    fd: OwnedFd,
    /// Watch descriptor to the dirty flags of the subtrees watching that directory (two only
    /// while a container's reader is being replaced).
    watches: Mutex<HashMap<i32, Vec<Arc<AtomicBool>>>>,
}

const WATCH_MASK: inotify::WatchFlags = inotify::WatchFlags::CREATE
    .union(inotify::WatchFlags::DELETE)
    .union(inotify::WatchFlags::MOVED_FROM)
    .union(inotify::WatchFlags::MOVED_TO)
    .union(inotify::WatchFlags::DELETE_SELF)
    .union(inotify::WatchFlags::ONLYDIR);

impl Watcher {
    pub fn new() -> std::io::Result<Self> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
        Ok(Self {
            fd,
            watches: Mutex::new(HashMap::new()),
        })
    }

    fn add(&self, dir: &Path, flag: &Arc<AtomicBool>) -> std::io::Result<i32> {
        let wd = inotify::add_watch(&self.fd, dir, WATCH_MASK)?;
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        let flags = watches.entry(wd).or_default();
        if !flags.iter().any(|f| Arc::ptr_eq(f, flag)) {
            flags.push(flag.clone());
        }
        Ok(wd)
    }

    fn remove(&self, wd: i32, flag: &Arc<AtomicBool>) {
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(flags) = watches.get_mut(&wd) {
            flags.retain(|f| !Arc::ptr_eq(f, flag));
            if flags.is_empty() {
                watches.remove(&wd);
                // Fails harmlessly when the directory, and with it the watch, is gone.
                let _ = inotify::remove_watch(&self.fd, wd);
            }
        }
    }

    /// Reads the pending events (one `read` when there are none) and marks their subtrees.
    pub fn drain(&self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        let mut watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let event = match reader.next() {
                Ok(e) => e,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "inotify read failed; every subtree re-walked");
                    mark_all(&watches);
                    return;
                }
            };
            let flags = event.events();
            if flags.contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                mark_all(&watches);
                continue;
            }
            let wd = event.wd();
            // Only directories are cgroups; files appear in fixture trees, not in cgroupfs.
            let relevant = flags.intersects(
                inotify::ReadFlags::ISDIR
                    | inotify::ReadFlags::DELETE_SELF
                    | inotify::ReadFlags::IGNORED,
            );
            if !relevant {
                continue;
            }
            if let Some(subtrees) = watches.get(&wd) {
                for f in subtrees {
                    f.store(true, Ordering::Relaxed);
                }
            }
            // The kernel dropped the watch (its directory is gone); the number may come back.
            if flags.contains(inotify::ReadFlags::IGNORED) {
                watches.remove(&wd);
            }
        }
    }
}

fn mark_all(watches: &HashMap<i32, Vec<Arc<AtomicBool>>>) {
    for f in watches.values().flatten() {
        f.store(true, Ordering::Relaxed);
    }
}

/// This subtree's part of the watcher.
#[derive(Debug)]
struct Watched {
    watcher: Arc<Watcher>,
    dirty: Arc<AtomicBool>,
    wds: Vec<i32>,
    /// A watch could not be added: the subtree goes back to mtime checks after this walk.
    failed: bool,
}

impl Drop for Watched {
    fn drop(&mut self) {
        for wd in self.wds.drain(..) {
            self.watcher.remove(wd, &self.dirty);
        }
    }
}

/// How a hierarchy's `cgroup.procs` must be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidList {
    /// cgroup v2: the file is a seq_file regenerated by each read at offset 0 (checked here
    /// and on the VM matrix), so holding it is safe.
    Held,
    /// cgroup v1: the kernel serves the pid list cached for an open file until it has gone
    /// unused for ~1 s, so a held file polled faster freezes; opened afresh for every read.
    Reopen,
}

#[derive(Debug)]
struct Dir {
    /// Its `cgroup.procs`: held, or opened for each read (v1's cached pid lists, and children
    /// where descriptors are short).
    procs: KFile,
    /// Without a watcher: the directory, held open to check its mtime each cycle (`fstat`
    /// reads the inode's current times, nothing cached per open file).
    stamp: Option<(File, (i64, i64))>,
}

#[derive(Debug)]
pub struct Subtree {
    top: PathBuf,
    pid_list: PidList,
    /// Descriptors are short: the children's `cgroup.procs` are opened for each read (the
    /// top one stays held where the hierarchy allows).
    lean: bool,
    dirs: Vec<Dir>,
    watched: Option<Watched>,
    walks: u64,
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
    pub fn new(top: PathBuf, pid_list: PidList, watcher: Option<Arc<Watcher>>) -> Self {
        Self {
            top,
            pid_list,
            lean: false,
            dirs: Vec::new(),
            watched: watcher.map(|watcher| Watched {
                watcher,
                dirty: Arc::new(AtomicBool::new(false)),
                wds: Vec::new(),
                failed: false,
            }),
            walks: 0,
        }
    }

    /// Opens the children's `cgroup.procs` for each read when `lean` (see [`Self::lean`]).
    pub fn lean(mut self, lean: bool) -> Self {
        self.lean = lean;
        self
    }

    /// From now on the children's `cgroup.procs` are opened for each read; closes the held
    /// ones and says how many.
    pub fn release_children(&mut self) -> usize {
        self.lean = true;
        let mut closed = 0;
        for dir in self.dirs.iter_mut().skip(1) {
            closed += usize::from(dir.procs.release());
        }
        closed
    }

    /// How many times the subtree was walked (listed and its files opened).
    #[cfg(test)]
    pub fn walks(&self) -> u64 {
        self.walks
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

    /// Clears the dirty mark as it answers: a change after this point is seen next time.
    fn unchanged(&self) -> bool {
        if self.dirs.is_empty() {
            return false;
        }
        match &self.watched {
            Some(w) => !w.dirty.swap(false, Ordering::Relaxed),
            // A directory walked while watching has no stamp: walked again, now stamped.
            None => self.dirs.iter().all(|d| {
                d.stamp.as_ref().is_some_and(|(handle, stamp)| {
                    handle
                        .metadata()
                        .is_ok_and(|m| mtime(&m) == *stamp && settled(*stamp))
                })
            }),
        }
    }

    /// Starts watching `dir` before it is listed, so a child created meanwhile is an event.
    /// Watching a directory already watched gives back its number and costs nothing more.
    fn watch(&mut self, dir: &Path) {
        let Some(w) = &mut self.watched else {
            return;
        };
        if w.failed {
            return;
        }
        match w.watcher.add(dir, &w.dirty) {
            Ok(wd) => {
                if !w.wds.contains(&wd) {
                    w.wds.push(wd);
                }
            }
            // Removed since it was listed: the walk skips it too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no inotify watch; checking mtimes");
                w.failed = true;
            }
        }
    }

    fn walk(&mut self) -> Result<(), ReadError> {
        self.walks += 1;
        self.dirs.clear();
        // Events from here on mark it again at the next drain.
        let before = match &mut self.watched {
            Some(w) => {
                w.dirty.store(false, Ordering::Relaxed);
                std::mem::take(&mut w.wds)
            }
            None => Vec::new(),
        };
        let result = self.walk_dirs();
        if let Some(w) = &mut self.watched {
            // Directories that left the subtree (their watches may be gone with them).
            for wd in before {
                if w.failed || !w.wds.contains(&wd) {
                    w.watcher.remove(wd, &w.dirty);
                }
            }
            if result.is_err() {
                w.dirty.store(true, Ordering::Relaxed);
            }
            if w.failed {
                self.watched = None;
            }
        }
        if result.is_err() {
            self.dirs.clear();
        }
        result
    }

    /// Opens every directory of the subtree (breadth first) with its `cgroup.procs`.
    fn walk_dirs(&mut self) -> Result<(), ReadError> {
        let mut queue = vec![self.top.clone()];
        let mut next = 0;
        while next < queue.len() {
            let path = queue[next].clone();
            let top = next == 0;
            next += 1;
            self.watch(&path);
            let watching = self.watched.as_ref().is_some_and(|w| !w.failed);
            let stamped = || {
                File::open(&path)
                    .and_then(|h| h.metadata().map(|m| (h, mtime(&m))))
                    .map_err(|e| ReadError::io(&path, e))
            };
            let opened = (if watching {
                Ok(None)
            } else {
                stamped().map(Some)
            })
            .and_then(|stamp| {
                // Listed after the watch or the stamp: a child created meanwhile is seen.
                let children = std::fs::read_dir(&path).map_err(|e| ReadError::io(&path, e))?;
                let procs_path = path.join("cgroup.procs");
                // Checked now (a held one by opening it) so a removed child is skipped here.
                let hold = self.pid_list == PidList::Held && (top || !self.lean);
                let procs =
                    KFile::open_optional_as(procs_path.clone(), hold)?.ok_or_else(|| {
                        ReadError::io(&procs_path, std::io::ErrorKind::NotFound.into())
                    })?;
                Ok((stamp, children, procs))
            });
            let (stamp, children, procs) = match opened {
                Ok(o) => o,
                Err(e) if !top && e.is_gone() => continue,
                Err(e) => return Err(e),
            };
            for entry in children.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    queue.push(entry.path());
                }
            }
            self.dirs.push(Dir { procs, stamp });
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
        let mut s = Subtree::new(top.clone(), PidList::Held, None);
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

    /// Lean (descriptors short), or let go of later: a child's `cgroup.procs` is opened for
    /// each read, so a new file under its name is seen; the top one stays held.
    #[test]
    fn lean_children_are_read_afresh_the_top_stays_held() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("c");
        std::fs::create_dir_all(top.join("ns")).unwrap();
        std::fs::write(top.join("cgroup.procs"), "1\n").unwrap();
        std::fs::write(top.join("ns/cgroup.procs"), "2\n").unwrap();
        let replace = |rel: &str, text: &str| {
            std::fs::write(dir.path().join("new"), text).unwrap();
            std::fs::rename(dir.path().join("new"), top.join(rel)).unwrap();
        };
        let (mut buf, mut pids) = (Vec::new(), Vec::new());
        // A watcher: a file renamed into a directory is not a reason to walk again (without
        // one, the directory's new mtime would be), so held files stay held.
        let w = Arc::new(Watcher::new().unwrap());
        let mut lean = Subtree::new(top.clone(), PidList::Held, Some(w.clone())).lean(true);
        let mut kept = Subtree::new(top.clone(), PidList::Held, Some(w.clone()));
        lean.pids(&mut buf, &mut pids).unwrap();
        kept.pids(&mut buf, &mut pids).unwrap();
        replace("ns/cgroup.procs", "3\n");
        lean.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(pids, vec![1, 3]);
        kept.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(pids, vec![1, 2], "a held child keeps its inode");
        assert_eq!(kept.release_children(), 1);
        kept.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(pids, vec![1, 3]);
        replace("cgroup.procs", "4\n");
        lean.pids(&mut buf, &mut pids).unwrap();
        w.drain();
        lean.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(pids, vec![1, 3], "the top stays held");
        assert_eq!(lean.walks(), 1);
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
        let mut s = Subtree::new(top.clone(), PidList::Held, None);
        s.pids(&mut Vec::new(), &mut Vec::new()).unwrap();
        assert!(s.unchanged());
        std::fs::create_dir(top.join("new")).unwrap();
        assert!(!s.unchanged(), "a new child is noticed");
    }

    /// The v1 rule, at fixture level: a `cgroup.procs` replaced by a new file (what a held v1
    /// descriptor cannot follow, like the kernel's cached pid list) is seen at the next read.
    #[test]
    fn v1_pid_lists_are_read_afresh_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("c");
        tree(&top);
        let replace = |rel: &str, content: &str| {
            let tmp = dir.path().join("tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, top.join(rel)).unwrap();
        };
        let (mut buf, mut pids) = (Vec::new(), Vec::new());
        // Watched: replacing a file is no directory event, so neither subtree is walked again.
        let watcher = Arc::new(Watcher::new().unwrap());
        let mut v1 = Subtree::new(top.clone(), PidList::Reopen, Some(watcher.clone()));
        let mut v2 = Subtree::new(top.clone(), PidList::Held, Some(watcher.clone()));
        v1.pids(&mut buf, &mut pids).unwrap();
        v2.pids(&mut buf, &mut pids).unwrap();
        replace("cgroup.procs", "1\n7\n8\n");
        replace(".lxc/cgroup.procs", "");
        watcher.drain();
        v1.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(sorted(pids.clone()), vec![1, 7, 8]);
        v2.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(
            sorted(pids.clone()),
            vec![1, 2],
            "held: the files as opened"
        );
        assert_eq!((v1.walks(), v2.walks()), (1, 1));
        // A child removed between the walk and the read is skipped, as with held files.
        std::fs::remove_dir_all(top.join(".lxc")).unwrap();
        v1.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(sorted(pids.clone()), vec![1, 7, 8]);
        watcher.drain();
        v1.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((v1.walks(), sorted(pids.clone())), (2, vec![1, 7, 8]));
    }

    fn tree(top: &Path) {
        std::fs::create_dir_all(top.join(".lxc")).unwrap();
        std::fs::write(top.join("cgroup.procs"), "1\n").unwrap();
        std::fs::write(top.join(".lxc/cgroup.procs"), "2\n").unwrap();
    }

    #[test]
    fn watched_subtree_is_walked_only_after_a_child_event() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("c");
        tree(&top);
        let watcher = Arc::new(Watcher::new().unwrap());
        let mut s = Subtree::new(top.clone(), PidList::Held, Some(watcher.clone()));
        let (mut buf, mut pids) = (Vec::new(), Vec::new());
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!(s.walks(), 1);
        // Freshly created directories would be re-walked for a second by mtime; not here.
        for _ in 0..3 {
            watcher.drain();
            s.pids(&mut buf, &mut pids).unwrap();
        }
        assert_eq!(s.walks(), 1);
        assert_eq!(sorted(pids.clone()), vec![1, 2]);

        // A process moving between known cgroups needs no walk.
        std::fs::write(top.join(".lxc/cgroup.procs"), "2\n3\n").unwrap();
        watcher.drain();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((s.walks(), sorted(pids.clone())), (1, vec![1, 2, 3]));

        // A new nested cgroup: one event, one walk, its processes counted.
        std::fs::create_dir_all(top.join(".lxc/sub/deeper")).unwrap();
        std::fs::write(top.join(".lxc/sub/cgroup.procs"), "").unwrap();
        std::fs::write(top.join(".lxc/sub/deeper/cgroup.procs"), "4\n").unwrap();
        watcher.drain();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((s.walks(), sorted(pids.clone())), (2, vec![1, 2, 3, 4]));
        // The directory created below the new one is watched too.
        std::fs::create_dir(top.join(".lxc/sub/deeper/x")).unwrap();
        std::fs::write(top.join(".lxc/sub/deeper/x/cgroup.procs"), "5\n").unwrap();
        watcher.drain();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((s.walks(), sorted(pids.clone())), (3, vec![1, 2, 3, 4, 5]));

        // Removal is an event too.
        std::fs::remove_dir_all(top.join(".lxc/sub")).unwrap();
        watcher.drain();
        s.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((s.walks(), sorted(pids.clone())), (4, vec![1, 2, 3]));

        // The container's own cgroup gone: an error that says so. A directory gone before its
        // watch was added is no reason to give up watching.
        std::fs::remove_dir_all(&top).unwrap();
        watcher.drain();
        assert!(s.pids(&mut buf, &mut pids).unwrap_err().is_gone());
        assert!(s.watched.is_some());
    }

    #[test]
    fn replacing_a_reader_keeps_the_directory_watched() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("c");
        tree(&top);
        let watcher = Arc::new(Watcher::new().unwrap());
        let (mut buf, mut pids) = (Vec::new(), Vec::new());
        let mut old = Subtree::new(top.clone(), PidList::Held, Some(watcher.clone()));
        old.pids(&mut buf, &mut pids).unwrap();
        let mut new = Subtree::new(top.clone(), PidList::Held, Some(watcher.clone()));
        new.pids(&mut buf, &mut pids).unwrap();
        drop(old);
        std::fs::create_dir(top.join("late")).unwrap();
        std::fs::write(top.join("late/cgroup.procs"), "9\n").unwrap();
        watcher.drain();
        new.pids(&mut buf, &mut pids).unwrap();
        assert_eq!((new.walks(), sorted(pids.clone())), (2, vec![1, 2, 9]));
        drop(new);
        assert!(
            watcher.watches.lock().unwrap().is_empty(),
            "no watch outlives its subtrees"
        );
    }
}
