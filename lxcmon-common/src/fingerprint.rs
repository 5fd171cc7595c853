//! Which sources the embedded BPF object was built from. `cargo xtask build-ebpf` writes the
//! fingerprint of the BPF sources beside the object; the agent's build script recomputes it and
//! refuses to embed an object built from other sources (a stale or missing object would
//! otherwise be embedded silently). Shared so both sides hash exactly the same inputs.

extern crate std;

use std::format;
use std::io;
use std::path::{Path, PathBuf};
use std::string::String;
use std::vec::Vec;

/// The BPF object, relative to the workspace root.
pub const OBJECT: &str = "target/bpf/lxcmon.bpf.o";
/// The fingerprint of the sources the object was built from, relative to the workspace root.
pub const STAMP: &str = "target/bpf/lxcmon.bpf.o.sources";

/// Files and directories (relative to the workspace root) that the BPF object is built from.
pub const INPUTS: &[&str] = &[
    "lxcmon-ebpf/Cargo.toml",
    "lxcmon-ebpf/Cargo.lock",
    "lxcmon-ebpf/src",
    "lxcmon-ebpf/.cargo",
    "lxcmon-common/Cargo.toml",
    "lxcmon-common/src",
];

/// Every input file under `root`, sorted (directories walked recursively; a missing input is
/// skipped, so it changes the fingerprint by its absence).
pub fn input_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for input in INPUTS {
        let path = root.join(input);
        if path.is_dir() {
            walk(&path, &mut files)?;
        } else if path.exists() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// FNV-1a over each input's path (relative to `root`) and content: stable across toolchains and
/// checkouts, unlike mtimes.
pub fn fingerprint(root: &Path) -> io::Result<String> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for file in input_files(root)? {
        let rel = file.strip_prefix(root).unwrap_or(&file);
        feed(rel.to_string_lossy().as_bytes());
        feed(&[0]);
        feed(&std::fs::read(&file)?);
        feed(&[0]);
    }
    Ok(format!("{h:016x}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_of_any_input_changes_the_fingerprint() {
        let dir = std::env::temp_dir().join(format!("lxcmon-fp-{}", std::process::id()));
        let src = dir.join("lxcmon-ebpf/src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(dir.join("lxcmon-common/src")).unwrap();
        std::fs::write(src.join("main.rs"), "fn a() {}").unwrap();
        std::fs::write(
            dir.join("lxcmon-common/src/lib.rs"),
            "pub const A: u32 = 1;",
        )
        .unwrap();
        let first = fingerprint(&dir).unwrap();
        assert_eq!(fingerprint(&dir).unwrap(), first, "deterministic");
        std::fs::write(src.join("main.rs"), "fn a() { }").unwrap();
        let edited = fingerprint(&dir).unwrap();
        assert_ne!(edited, first);
        std::fs::write(src.join("extra.rs"), "").unwrap();
        assert_ne!(fingerprint(&dir).unwrap(), edited, "a new file counts");
        std::fs::write(dir.join("README.md"), "not an input").unwrap();
        let before = fingerprint(&dir).unwrap();
        std::fs::write(dir.join("README.md"), "still not an input").unwrap();
        assert_eq!(fingerprint(&dir).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
