//! Kernel files read with their descriptor kept open: one `pread` at offset 0 per sample.
//!
//! Holding a kernel file is only right where a read at offset 0 regenerates its content:
//! seq_file and sysfs/cgroupfs attribute files do (checked on this host for every file the
//! agent holds). cgroup v1 `cgroup.procs` and `tasks` do not: the kernel keeps the pid list
//! built for an open file and hands it out again until it has gone unused for about a second,
//! so those are read with [`read_path`], opened afresh each time.

use rustix::io::Errno;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A failed read of a kernel file, with the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The cause is the `source` (printed by `logging::Chain`), not part of this message.
    #[error("{path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unexpected content: {what}")]
    Parse { path: PathBuf, what: String },
}

impl ReadError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn parse(path: &Path, what: impl Into<String>) -> Self {
        Self::Parse {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    /// The object behind the file is gone: a removed cgroup (ENODEV), an exited process
    /// (ESRCH), or a path that no longer exists. Such a container is skipped, not retried.
    pub fn is_gone(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || matches!(
                        Errno::from_io_error(source),
                        Some(Errno::NODEV | Errno::SRCH)
                    )
            }
            Self::Parse { .. } => false,
        }
    }

    /// The process (EMFILE) or the system (ENFILE) has no descriptor left: a retry cannot
    /// help, and every container still to be opened fails the same way.
    pub fn is_out_of_descriptors(&self) -> bool {
        match self {
            Self::Io { source, .. } => {
                matches!(
                    Errno::from_io_error(source),
                    Some(Errno::MFILE | Errno::NFILE)
                )
            }
            Self::Parse { .. } => false,
        }
    }
}

/// A kernel file, normally held open. One read rarely (a limit) can instead be opened for
/// each read where descriptors are short ([`Self::open_optional_as`], [`Self::release`]).
#[derive(Debug)]
pub struct KFile {
    path: PathBuf,
    /// `None`: opened afresh for each read, holding no descriptor in between.
    file: Option<File>,
}

impl KFile {
    pub fn open(path: PathBuf) -> Result<Self, ReadError> {
        match File::open(&path) {
            Ok(file) => Ok(Self {
                path,
                file: Some(file),
            }),
            Err(e) => Err(ReadError::io(&path, e)),
        }
    }

    /// Opens the file if it exists; `None` when the kernel does not provide it here
    /// (a controller that is not enabled, swap accounting that is off).
    pub fn open_optional(path: PathBuf) -> Result<Option<Self>, ReadError> {
        Self::open_optional_as(path, true)
    }

    /// As [`Self::open_optional`], holding the descriptor only if `hold`; otherwise the file
    /// is only checked to exist now and opened for each read.
    pub fn open_optional_as(path: PathBuf, hold: bool) -> Result<Option<Self>, ReadError> {
        if hold {
            return match File::open(&path) {
                Ok(file) => Ok(Some(Self {
                    path,
                    file: Some(file),
                })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ReadError::io(&path, e)),
            };
        }
        match path.try_exists() {
            Ok(true) => Ok(Some(Self { path, file: None })),
            Ok(false) => Ok(None),
            Err(e) => Err(ReadError::io(&path, e)),
        }
    }

    /// Closes the descriptor; later reads open the file afresh. Whether one was held.
    pub fn release(&mut self) -> bool {
        self.file.take().is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the whole file into `buf`. Kernel seq files return everything that fits in one
    /// call, so a read that does not fill the buffer is complete; a full one grows and retries.
    pub fn read<'a>(&self, buf: &'a mut Vec<u8>) -> Result<&'a str, ReadError> {
        match &self.file {
            Some(file) => read_whole(file, &self.path, buf),
            None => read_path(&self.path, buf),
        }
    }
}

/// Closes the descriptors of these files (see [`KFile::release`]); how many were held.
pub fn release_all<'a>(files: impl IntoIterator<Item = &'a mut Option<KFile>>) -> usize {
    files
        .into_iter()
        .flatten()
        .map(|f| usize::from(f.release()))
        .sum()
}

/// Opens, reads whole and closes `path`: for kernel files whose held descriptor would serve
/// stale content (cgroup v1 pid lists).
pub fn read_path<'a>(path: &Path, buf: &'a mut Vec<u8>) -> Result<&'a str, ReadError> {
    let file = File::open(path).map_err(|e| ReadError::io(path, e))?;
    read_whole(&file, path, buf)
}

fn read_whole<'a>(file: &File, path: &Path, buf: &'a mut Vec<u8>) -> Result<&'a str, ReadError> {
    if buf.len() < 4096 {
        buf.resize(4096, 0);
    }
    loop {
        // rustix's raw `pread`: libc's wraps each call in a thread-cancellation point.
        let n =
            rustix::io::pread(file, &mut buf[..], 0).map_err(|e| ReadError::io(path, e.into()))?;
        if n < buf.len() {
            return std::str::from_utf8(&buf[..n]).map_err(|_| ReadError::parse(path, "not UTF-8"));
        }
        let grown = buf.len() * 2;
        buf.resize(grown, 0);
    }
}

impl KFile {
    /// Reads a file holding a single unsigned number (`max` is reported as `None`).
    pub fn read_u64_or_max(&self, buf: &mut Vec<u8>) -> Result<Option<u64>, ReadError> {
        let text = self.read(buf)?;
        parse_u64_or_max(text.trim()).ok_or_else(|| ReadError::parse(&self.path, text.trim()))
    }

    pub fn read_u64(&self, buf: &mut Vec<u8>) -> Result<u64, ReadError> {
        let text = self.read(buf)?;
        text.trim()
            .parse()
            .map_err(|_| ReadError::parse(&self.path, format!("{:?} is not a number", text.trim())))
    }
}

/// `Some(Some(n))` for a number, `Some(None)` for `max`, `None` for anything else.
pub fn parse_u64_or_max(s: &str) -> Option<Option<u64>> {
    if s == "max" {
        Some(None)
    } else {
        s.parse().ok().map(Some)
    }
}

/// Value of `key` in a flat `key value` file such as memory.stat or cpu.stat.
pub fn keyed_value(text: &str, key: &str) -> Option<u64> {
    let [v] = keyed_values(text, [key]);
    v
}

/// Several keys of a `key value` file in one pass over its lines. Lines are cut at their
/// ASCII newline and space by plain byte scans: `lines()` and `split_once` were 3 % of the
/// agent's CPU on `memory.stat` (about 70 lines, 10 keys) in the N = 100 profile.
pub fn keyed_values<const N: usize>(text: &str, keys: [&str; N]) -> [Option<u64>; N] {
    let mut out = [None; N];
    let mut found = [false; N];
    let mut left = N;
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() && left > 0 {
        let end =
            (bytes[start..].iter().position(|&b| b == b'\n')).map_or(bytes.len(), |n| start + n);
        // Cut at ASCII bytes: always a char boundary.
        let line = &text[start..end];
        start = end + 1;
        let Some(space) = line.bytes().position(|b| b == b' ') else {
            continue;
        };
        let (k, v) = (&line[..space], &line[space + 1..]);
        if let Some(i) = keys.iter().position(|key| *key == k) {
            if !found[i] {
                found[i] = true;
                out[i] = v.trim().parse().ok();
                left -= 1;
            }
        }
    }
    out
}

/// Reads a small file once, for values read at discovery rather than every cycle.
pub fn read_to_string(path: &Path) -> Result<String, ReadError> {
    std::fs::read_to_string(path).map_err(|e| ReadError::io(path, e))
}

/// Joins an absolute kernel path (`/sys/...`) under the configured root.
pub fn under(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_whole_file_again_from_offset_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "12\n").unwrap();
        let f = KFile::open(path.clone()).unwrap();
        let mut buf = Vec::new();
        assert_eq!(f.read_u64(&mut buf).unwrap(), 12);
        std::fs::write(&path, "345\n").unwrap();
        assert_eq!(f.read_u64(&mut buf).unwrap(), 345);
    }

    #[test]
    fn read_path_sees_a_replaced_file_a_held_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("procs");
        std::fs::write(&path, "1\n").unwrap();
        let held = KFile::open(path.clone()).unwrap();
        let mut buf = Vec::new();
        // A new inode under the same name: what a held descriptor cannot follow.
        std::fs::write(dir.path().join("new"), "1\n2\n").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert_eq!(held.read(&mut buf).unwrap(), "1\n");
        assert_eq!(read_path(&path, &mut buf).unwrap(), "1\n2\n");
        let err = read_path(&dir.path().join("gone"), &mut buf).unwrap_err();
        assert!(err.is_gone());
        assert!(
            !err.to_string().contains("os error"),
            "cause not in the message: {err}"
        );
    }

    #[test]
    fn an_unheld_file_is_read_afresh_and_a_released_one_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.max");
        std::fs::write(&path, "1\n").unwrap();
        let unheld = KFile::open_optional_as(path.clone(), false)
            .unwrap()
            .unwrap();
        let mut held = KFile::open_optional_as(path.clone(), true)
            .unwrap()
            .unwrap();
        let mut buf = Vec::new();
        std::fs::write(dir.path().join("new"), "2\n").unwrap();
        std::fs::rename(dir.path().join("new"), &path).unwrap();
        assert_eq!(unheld.read_u64(&mut buf).unwrap(), 2);
        assert_eq!(held.read_u64(&mut buf).unwrap(), 1, "the held inode");
        assert!(held.release());
        assert!(!held.release(), "nothing left to release");
        assert_eq!(held.read_u64(&mut buf).unwrap(), 2);
        assert!(KFile::open_optional_as(dir.path().join("nope"), false)
            .unwrap()
            .is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(unheld.read(&mut buf).unwrap_err().is_gone());
    }

    #[test]
    fn grows_for_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let content = "x 1\n".repeat(5000);
        std::fs::write(&path, &content).unwrap();
        let f = KFile::open(path).unwrap();
        let mut buf = Vec::new();
        assert_eq!(f.read(&mut buf).unwrap().len(), content.len());
    }

    #[test]
    fn max_and_garbage() {
        assert_eq!(parse_u64_or_max("max"), Some(None));
        assert_eq!(parse_u64_or_max("42"), Some(Some(42)));
        assert_eq!(parse_u64_or_max(""), None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, "").unwrap();
        let f = KFile::open(path).unwrap();
        let err = f.read_u64_or_max(&mut Vec::new()).unwrap_err();
        assert!(!err.is_gone());
    }

    #[test]
    fn missing_file_is_gone_and_optional() {
        let dir = tempfile::tempdir().unwrap();
        let err = KFile::open(dir.path().join("nope")).unwrap_err();
        assert!(err.is_gone());
        assert!(KFile::open_optional(dir.path().join("nope"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn keyed_values_in_one_pass() {
        let text = "anon 10\nfile 2048\nfile_mapped 5\n";
        assert_eq!(keyed_value(text, "file"), Some(2048));
        assert_eq!(keyed_value(text, "shmem"), None);
        assert_eq!(
            keyed_values(text, ["file_mapped", "shmem", "anon"]),
            [Some(5), None, Some(10)]
        );
        // The first line of a key counts, a malformed value reads as absent; no newline at
        // the end, an empty line and a line without a space are fine.
        let odd = "anon x\n\nnospace\nanon 3\nfile  7 ";
        assert_eq!(keyed_values(odd, ["anon", "file"]), [None, Some(7)]);
    }
}
