//! The export file on disk: atomic rewrites (temporary file beside it, fsync, rename, fsync
//! dir) that keep the file's mode and owner, take the retained history from the previous file
//! by an in-kernel copy, and check free space first; stale temporaries; set-aside names that
//! never collide.

use rustix::fs::{Gid, Mode, Uid};
use rustix::io::Errno;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Writes `entries` as the elements of one JSON array, one entry per line.
pub fn write_document<'a>(
    w: &mut impl Write,
    entries: impl Iterator<Item = &'a [u8]>,
) -> io::Result<()> {
    w.write_all(b"[")?;
    for (i, entry) in entries.enumerate() {
        w.write_all(if i == 0 { b"\n" } else { b",\n" })?;
        w.write_all(entry)?;
    }
    w.write_all(b"\n]\n")
}

/// A byte range of the file: one cycle's entry, or the retained run of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// What a rewrite did.
#[derive(Debug)]
pub enum Rewrite {
    /// The new file is in place; `file` is it, held open for the next copy. `entries` are the
    /// new entries' spans in it, `copied_at` where the copied run starts.
    Written {
        file: File,
        size: u64,
        copied_at: u64,
        entries: Vec<Span>,
        /// The old file's owner could not be given to the new one (not root).
        owner_kept: bool,
    },
    /// Not written: the filesystem would keep less than its reserve.
    NoSpace { needed: u64, available: u64 },
}

fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn temp_prefix(path: &Path) -> io::Result<String> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    Ok(format!(".{}.tmp-", name.to_string_lossy()))
}

/// Bytes of the document holding the copied run `kept` and then `fresh`.
fn document_size(kept: u64, fresh: &[&[u8]]) -> u64 {
    let mut size = 1 + if kept > 0 { 1 + kept } else { 0 };
    for e in fresh {
        size += if size == 1 { 1 } else { 2 } + e.len() as u64;
    }
    size + 3
}

/// A rewrite may not leave the filesystem with less than this share free (1/20), so the
/// export never fills a small `/var/log` (log2ram) that the host's own tools need.
const RESERVE_DIVISOR: u64 = 20;

/// Replaces `path` by a document of `previous`'s retained run (copied from that open file)
/// followed by `fresh`, so readers see the old file or the new one, never a part of either.
pub fn rewrite(
    path: &Path,
    previous: Option<(&File, Span)>,
    fresh: &[&[u8]],
) -> io::Result<Rewrite> {
    let dir_path = dir_of(path);
    let dir = File::open(dir_path)?;
    let kept = previous.map_or(0, |(_, s)| s.len);
    let needed = document_size(kept, fresh);
    let vfs = rustix::fs::fstatvfs(&dir)?;
    if vfs.f_blocks > 0 {
        let available = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let reserve = vfs.f_blocks.saturating_mul(vfs.f_frsize) / RESERVE_DIVISOR;
        if needed.saturating_add(reserve) > available {
            return Ok(Rewrite::NoSpace { needed, available });
        }
    }
    let tmp = dir_path.join(format!("{}{}", temp_prefix(path)?, std::process::id()));
    let result = fill(path, &tmp, previous, fresh).and_then(|written| {
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory is; failing that is not worth an error.
        let _ = dir.sync_all();
        Ok(written)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn fill(
    path: &Path,
    tmp: &Path,
    previous: Option<(&File, Span)>,
    fresh: &[&[u8]],
) -> io::Result<Rewrite> {
    // The existing file's mode and owner, given to the new one before any data is in it.
    let existing = rustix::fs::stat(path).ok();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if existing.is_some() { 0o600 } else { 0o666 })
        .open(tmp)?;
    let mut owner_kept = true;
    if let Some(st) = existing {
        let mine = rustix::fs::fstat(&file)?;
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid) {
            owner_kept = rustix::fs::fchown(
                &file,
                Some(Uid::from_raw(st.st_uid)),
                Some(Gid::from_raw(st.st_gid)),
            )
            .is_ok();
        }
        rustix::fs::fchmod(&file, Mode::from_raw_mode(st.st_mode & 0o7777))?;
    }
    let mut at = 1u64;
    file.write_all_at(b"[", 0)?;
    let copied_at = 2;
    if let Some((from, span)) = previous.filter(|(_, s)| s.len > 0) {
        file.write_all_at(b"\n", 1)?;
        copy_span(from, span, &file, copied_at)?;
        at = copied_at + span.len;
    }
    let mut seek = &file;
    seek.seek(SeekFrom::Start(at))?;
    let mut w = BufWriter::with_capacity(1 << 16, &file);
    let mut entries = Vec::with_capacity(fresh.len());
    for e in fresh {
        let sep: &[u8] = if at == 1 { b"\n" } else { b",\n" };
        w.write_all(sep)?;
        at += sep.len() as u64;
        w.write_all(e)?;
        entries.push(Span {
            offset: at,
            len: e.len() as u64,
        });
        at += e.len() as u64;
    }
    w.write_all(b"\n]\n")?;
    w.flush()?;
    drop(w);
    file.sync_all()?;
    Ok(Rewrite::Written {
        file,
        size: at + 3,
        copied_at,
        entries,
        owner_kept,
    })
}

/// Copies `span` of `from` to `to` at `at`: in the kernel (`copy_file_range`, a reflink on
/// XFS/btrfs/ZFS), through a small buffer where the kernel refuses it.
fn copy_span(from: &File, span: Span, to: &File, at: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (span.offset, at);
    while off_in < span.end() {
        let left = (span.end() - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), left) {
            Ok(0) => return Err(shorter()),
            Ok(_) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP | Errno::PERM) => {
                return copy_buffered(
                    from,
                    Span {
                        offset: off_in,
                        len: span.end() - off_in,
                    },
                    to,
                    off_out,
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn shorter() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the previous export file is shorter than the history it held",
    )
}

/// `copy_span` through user space, 256 KiB at a time.
pub(super) fn copy_buffered(from: &File, span: Span, to: &File, at: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (span.len.min(256 << 10)) as usize];
    let mut done = 0;
    while done < span.len {
        let want = ((span.len - done) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], span.offset + done)?;
        if n == 0 {
            return Err(shorter());
        }
        to.write_all_at(&buf[..n], at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Removes temporary files a killed agent left beside `path` (`.<name>.tmp-<pid>`, the pid
/// not ours): a kill mid-write leaves its temporary for good otherwise. Returns how many.
pub fn remove_stale_temps(path: &Path) -> usize {
    let Ok(prefix) = temp_prefix(path) else {
        return 0;
    };
    let Ok(dir) = std::fs::read_dir(dir_of(path)) else {
        return 0;
    };
    let ours = std::process::id().to_string();
    dir.flatten()
        .filter(|f| {
            let name = f.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix(&prefix).is_some_and(|pid| {
                !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && pid != ours
            })
        })
        .filter(|f| match std::fs::remove_file(f.path()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(path = %f.path().display(), error = %e, "cannot remove a stale temporary export file");
                false
            }
        })
        .count()
}

/// Renames `path` to `<path>.corrupt-<unix seconds>[-<n>]`, never over an existing file
/// (`RENAME_NOREPLACE`, or a hard link where the filesystem lacks it). Returns the new name.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for n in 0..10_000u32 {
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!(".corrupt-{stamp}"));
        if n > 0 {
            aside.push(format!("-{n}"));
        }
        let aside = PathBuf::from(aside);
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, path, cwd, &aside, rustix::fs::RenameFlags::NOREPLACE)
        {
            Ok(()) => return Ok(aside),
            Err(Errno::EXIST) => continue,
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {
                match std::fs::hard_link(path, &aside) {
                    Ok(()) => {
                        std::fs::remove_file(path)?;
                        return Ok(aside);
                    }
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "every set-aside name of this second is taken",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_copy_is_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("a"), &data).unwrap();
        let from = File::open(dir.path().join("a")).unwrap();
        let to = File::create(dir.path().join("b")).unwrap();
        let span = Span {
            offset: 3,
            len: 600_000,
        };
        copy_buffered(&from, span, &to, 2).unwrap();
        let b = std::fs::read(dir.path().join("b")).unwrap();
        assert_eq!(&b[2..], &data[3..600_003]);
        let past_end = Span {
            offset: 650_000,
            len: 100_000,
        };
        assert!(copy_buffered(&from, past_end, &to, 0).is_err());
        assert!(copy_span(&from, past_end, &to, 0).is_err());
    }

    #[test]
    fn document_size_matches_write_document() {
        for fresh in [
            vec![],
            vec![b"{}".as_slice()],
            vec![b"{\"a\":1}", b"{}", b"[]"],
        ] {
            let mut out = Vec::new();
            write_document(&mut out, fresh.iter().copied()).unwrap();
            assert_eq!(document_size(0, &fresh), out.len() as u64);
        }
    }
}
