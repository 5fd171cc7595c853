//! Where the collector's kernel objects live, and who may use them. The daemon pins maps and
//! links under its pin directory, so counting goes on while it restarts and a new agent
//! continues the counts; `--once` holds them by descriptor only, so nothing is left when it
//! exits. One agent per pin directory: an exclusive `flock` on the directory, held while the
//! collector lives.

use super::error::{BpfError, Cause};
use super::BPF_FS;
use aya::programs::links::{FdLink, PinnedLink};
use lxcmon_common::{PIN_LAYOUT_VERSION, PIN_ROOT};
use rustix::fs::{FlockOperation, Mode, OFlags};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tracing::{debug, info};

/// The default pin directory: [`PIN_ROOT`]`/v<PIN_LAYOUT_VERSION>`, so a changed map layout
/// never reads an old map.
pub fn default_pin_dir() -> PathBuf {
    Path::new(PIN_ROOT).join(format!("v{PIN_LAYOUT_VERSION}"))
}

/// An exclusive lock on a pin directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct PinLock {
    _dir: OwnedFd,
}

impl PinLock {
    /// Creates `pin_dir` when needed and locks it; refuses when another agent holds it.
    pub(crate) fn acquire(pin_dir: &Path) -> Result<Self, BpfError> {
        let fail = |source: std::io::Error| BpfError::PinDir {
            path: pin_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(pin_dir).map_err(fail)?;
        let dir = rustix::fs::open(
            pin_dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fail(e.into()))?;
        match rustix::fs::flock(&dir, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _dir: dir }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(BpfError::Locked {
                pin_dir: pin_dir.to_path_buf(),
                holder: lock_holder(Path::new("/proc/locks"), pin_dir),
            }),
            Err(e) => Err(fail(e.into())),
        }
    }
}

/// The pid holding the flock on `path`, from the kernel's lock table (`/proc/locks` lines:
/// `1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`, major and minor in hex).
fn lock_holder(locks: &Path, path: &Path) -> Option<u32> {
    let meta = std::fs::metadata(path).ok()?;
    let (major, minor) = (rustix::fs::major(meta.dev()), rustix::fs::minor(meta.dev()));
    let text = std::fs::read_to_string(locks).ok()?;
    parse_lock_holder(&text, (major, minor, meta.ino()))
}

fn parse_lock_holder(text: &str, (major, minor, ino): (u32, u32, u64)) -> Option<u32> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Waiters are listed with `->` after the number; only the holder counts.
        if f.get(1) != Some(&"FLOCK") {
            return None;
        }
        let mut id = f.get(5)?.split(':');
        let hex = |s: Option<&str>| s.and_then(|s| u32::from_str_radix(s, 16).ok());
        let matches = hex(id.next()) == Some(major)
            && hex(id.next()) == Some(minor)
            && id.next().and_then(|s| s.parse::<u64>().ok()) == Some(ino);
        matches.then(|| f.get(4)?.parse().ok()).flatten()
    })
}

/// Removes the pinned maps and links under `pin_dir` (uninstall, or `collector: files`
/// releasing what an earlier run left attached); counting stops once nothing holds them.
/// Refused while an agent holds the directory. Returns whether anything was there.
pub fn cleanup_pinned(pin_dir: &Path) -> Result<bool, BpfError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let lock = PinLock::acquire(pin_dir)?;
    let removed = match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(BpfError::Cleanup {
                path: pin_dir.to_path_buf(),
                source,
            })
        }
    };
    drop(lock);
    // The parent too (`/sys/fs/bpf/lxcmon`), once no other layout version is left in it.
    if let Some(parent) = pin_dir.parent().filter(|p| *p != Path::new(BPF_FS)) {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}

/// `lxcmon --cleanup-bpf`: removes every layout version under [`PIN_ROOT`] and `extra` (a
/// configured `bpf_pin_dir`), each only while no agent holds it. Returns what was removed.
pub fn cleanup_all(extra: Option<&Path>) -> Result<Vec<PathBuf>, BpfError> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(PIN_ROOT)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.extend(extra.map(Path::to_path_buf));
    let mut removed = Vec::new();
    for dir in dirs {
        if dir.is_dir() && cleanup_pinned(&dir)? {
            removed.push(dir);
        }
    }
    match std::fs::remove_dir(PIN_ROOT) {
        Ok(()) => removed.push(PathBuf::from(PIN_ROOT)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BpfError::Cleanup {
                path: PIN_ROOT.into(),
                source,
            })
        }
    }
    Ok(removed)
}

/// Where the collector keeps its links.
#[derive(Debug)]
pub(crate) enum Links {
    /// Pinned in this directory: they stay attached when the agent exits. `tags` caches the
    /// kernel tag of the programs pinned links point at, by program id.
    Pinned {
        dir: PathBuf,
        tags: HashMap<u32, u64>,
    },
    /// Held by this process only: detached when it exits.
    Held(HashMap<String, FdLink>),
}

/// A program this agent loaded, as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub id: u32,
    /// The kernel's hash of its instructions (map references masked).
    pub tag: u64,
}

impl Links {
    pub(crate) fn pinned(dir: PathBuf) -> Self {
        Self::Pinned {
            dir,
            tags: HashMap::new(),
        }
    }

    /// Whether `name` holds a link to `program`'s code: `program` itself, or a program of the
    /// same instructions an earlier agent loaded (same kernel tag), which goes on counting into
    /// the same pinned maps. A link to other code (an earlier version's program, after an
    /// upgrade) does not: the caller attaches `program`, and [`Self::put`] replaces the pin,
    /// which detaches the old one. Without `program`'s identity (its info unreadable) or the
    /// old program's tag, an existing link is kept.
    pub(crate) fn holds(&mut self, name: &str, program: Option<Loaded>) -> bool {
        match self {
            Self::Held(held) => held.contains_key(name),
            Self::Pinned { dir, tags } => {
                let Ok(link) = PinnedLink::from_pin(dir.join(name)) else {
                    return false;
                };
                let (Some(me), Ok(info)) = (program, FdLink::from(link).info()) else {
                    return true;
                };
                let old = info.program_id();
                if old == me.id {
                    return true;
                }
                let tag = match tags.get(&old) {
                    Some(&t) => t,
                    None => match super::sys::program_tag(old) {
                        Ok(t) => *tags.entry(old).or_insert(t),
                        Err(e) => {
                            debug!(link = name, program_id = old, error = %e, "cannot read the pinned link's program: keeping it");
                            return true;
                        }
                    },
                };
                if tag != me.tag {
                    info!(
                        link = name,
                        "replacing a pinned attachment of another version's program"
                    );
                }
                tag == me.tag
            }
        }
    }

    /// Keeps `link` under `name` (replacing a stale pin file).
    pub(crate) fn put(&mut self, name: &str, link: FdLink) -> Result<(), Cause> {
        match self {
            Self::Pinned { dir, .. } => {
                let path = dir.join(name);
                let _ = std::fs::remove_file(&path);
                link.pin(&path).map(drop).map_err(Cause::from)
            }
            Self::Held(held) => {
                held.insert(name.to_string(), link);
                Ok(())
            }
        }
    }

    /// Drops the link (detaching the program once nothing else holds it). A missing one is
    /// not an error.
    pub(crate) fn remove(&mut self, name: &str) -> Result<(), BpfError> {
        match self {
            Self::Pinned { dir, .. } => {
                let path = dir.join(name);
                match PinnedLink::from_pin(&path) {
                    Ok(link) => link.unpin().map(drop).map_err(|e| BpfError::Pin {
                        path,
                        source: e.into(),
                    }),
                    Err(_) => {
                        let _ = std::fs::remove_file(&path);
                        Ok(())
                    }
                }
            }
            Self::Held(held) => {
                held.remove(name);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_flock_holder_of_an_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 99 00:1f:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 00:1f:77 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 5151 00:1f:77 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 17 fd:01:77 0 EOF\n";
        assert_eq!(parse_lock_holder(locks, (0, 0x1f, 77)), Some(4242));
        assert_eq!(parse_lock_holder(locks, (0xfd, 1, 77)), Some(17));
        assert_eq!(parse_lock_holder(locks, (0, 0x1f, 78)), None);
    }

    #[test]
    fn default_pin_dir_carries_the_layout_version() {
        assert_eq!(
            default_pin_dir(),
            PathBuf::from(format!("/sys/fs/bpf/lxcmon/v{PIN_LAYOUT_VERSION}"))
        );
    }
}
