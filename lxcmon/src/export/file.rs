//! Atomic replacement of the export file: temporary file beside it, fsync, rename, fsync dir.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

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

/// Replaces `path` with what `fill` writes, so readers see the old file or the new one,
/// never a part of either.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 16, &file);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable once the directory is; failing that is not worth an error.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
