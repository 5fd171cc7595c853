//! Incus for the third-runtime test: Debian's `incus-base` and `incus-client` from
//! `bookworm-backports`, installed when missing.
//!
//! Not the `incus` package: it pulls a newer qemu from backports, which replaces the one the
//! VM tests use (see `vm.rs`). `incus-base` has the daemon (`incusd`) and its LXC; the test
//! starts it by hand (no systemd here).

use crate::deps;
use anyhow::{Context, Result};
use std::path::Path;

/// A sources file of its own, so removing it removes the suite.
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/lxcmon-bookworm-backports.sources";

const BACKPORTS_ENTRY: &str = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

pub const INCUS_PACKAGES: &[&str] = &["incus-base", "incus-client"];

/// Adds `bookworm-backports` (when no sources file names it yet) and installs the Incus
/// packages that are missing; does nothing when both are installed.
pub fn ensure_incus() -> Result<()> {
    if INCUS_PACKAGES.iter().all(|p| deps::dpkg_installed(p)) {
        return Ok(());
    }
    if !backports_listed() {
        eprintln!("xtask: adding bookworm-backports in {BACKPORTS_SOURCES}");
        std::fs::write(BACKPORTS_SOURCES, BACKPORTS_ENTRY)
            .with_context(|| format!("writing {BACKPORTS_SOURCES}"))?;
    }
    // `ensure_apt` runs `apt-get update` first, which picks up the new suite. Packages only
    // in backports install from it without `-t`; their dependencies come from bookworm
    // where its versions suffice, which keeps qemu and the rest of the host as they are.
    deps::ensure_apt(INCUS_PACKAGES)
}

/// Whether some apt sources file already has the suite (an administrator's own entry counts).
fn backports_listed() -> bool {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources")),
        );
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == "bookworm-backports"))
        })
    })
}
