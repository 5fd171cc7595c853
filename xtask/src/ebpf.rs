//! `cargo xtask build-ebpf`: installs the BPF toolchain when it is missing (nightly `rust-src`,
//! Debian's LLVM 22 development files, `bpf-linker` 0.13.0 built against them), then builds
//! `lxcmon-ebpf` for `bpfel-unknown-none` and copies the object to [`object_path`], where the
//! agent's `ebpf` feature embeds it from.

use crate::deps;
use anyhow::{bail, Context, Result};
use lxcmon_common::fingerprint;
use std::path::{Path, PathBuf};
use std::process::Command;

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(clap::Args)]
pub struct BuildArgs {
    /// Build the BPF programs in debug mode (the default is release, which the verifier prefers).
    #[arg(long)]
    pub debug: bool,
}

/// Where the built object lands; the agent's `build.rs` hands this path to the embedding.
pub fn object_path() -> PathBuf {
    deps::workspace_root().join(fingerprint::OBJECT)
}

pub fn build(args: &BuildArgs) -> Result<()> {
    ensure_toolchain()?;
    build_object(!args.debug)?;
    eprintln!("xtask: BPF object at {}", object_path().display());
    Ok(())
}

/// Installs what the BPF build needs, skipping each part that is already there.
pub fn ensure_toolchain() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

fn output_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_nightly_rust_src() -> Result<()> {
    let have_nightly = output_of(Command::new("rustup").args(["toolchain", "list"]))
        .context("running `rustup toolchain list` (rustup is required)")?
        .lines()
        .any(|l| l.starts_with("nightly"));
    if !have_nightly {
        deps::exec(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        deps::exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn bpf_linker_version() -> Option<String> {
    let bin = cargo_bin_dir().join("bpf-linker");
    let out = output_of(Command::new(&bin).arg("--version"))
        .or_else(|| output_of(Command::new("bpf-linker").arg("--version")))?;
    Some(out.trim().to_string())
}

fn ensure_bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        if v.contains(BPF_LINKER_VERSION) {
            return Ok(());
        }
        eprintln!("xtask: found {v}, want bpf-linker {BPF_LINKER_VERSION}: reinstalling");
    }
    deps::ensure_apt(LLVM_PACKAGES)?;
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("{LLVM_PREFIX}/bin/llvm-config missing after installing {LLVM_PACKAGES:?}");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    deps::exec(
        Command::new(cargo)
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn build_object(release: bool) -> Result<()> {
    let root = deps::workspace_root();
    // The sources as the build starts: an edit during the build leaves the object stale.
    let sources = fingerprint::fingerprint(&root).context("fingerprinting the BPF sources")?;
    let crate_dir = root.join("lxcmon-ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        // lxcmon-ebpf/Cargo.lock pins aya-build 0.2.0 (0.2.1 needs rustc 1.98).
        "--locked",
        "--target",
        BPF_TARGET,
        "-Z",
        "build-std=core",
    ])
    .current_dir(&crate_dir)
    // The xtask's own cargo sets these for the stable toolchain; the nightly build must not
    // inherit them.
    .env_remove("RUSTC")
    .env_remove("RUSTDOC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("CARGO")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO_TARGET_DIR")
    .env("PATH", path_with_cargo_bin());
    if release {
        cmd.arg("--release");
    }
    deps::exec(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    let built = crate_dir
        .join("target")
        .join(BPF_TARGET)
        .join(profile)
        .join("lxcmon");
    let dest = object_path();
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Copy only a changed object: a new mtime would make cargo rebuild the agent that embeds it.
    let object = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    if std::fs::read(&dest).ok().as_deref() != Some(object.as_slice()) {
        std::fs::write(&dest, &object).with_context(|| format!("writing {}", dest.display()))?;
    }
    let stamp = root.join(fingerprint::STAMP);
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(sources.as_str()) {
        std::fs::write(&stamp, &sources).with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(())
}

/// Shows that the agent never embeds a stale or missing object: in a copy of the workspace
/// (sharing this target directory for the dependencies), `cargo check --features ebpf` fails
/// naming `cargo xtask build-ebpf` without the object, passes with the object built from these
/// sources, and fails again after an edit of `lxcmon-ebpf/src`.
fn stale_object_is_refused() -> Result<()> {
    let root = deps::workspace_root();
    let copy = std::env::temp_dir().join(format!("lxcmon-stale-bpf-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    let result = (|| {
        // The workspace's members, and every input of the BPF object's fingerprint.
        for dir in ["lxcmon", "xtask", "tests"] {
            copy_tree(&root.join(dir), &copy.join(dir))?;
        }
        for input in ["Cargo.toml", "Cargo.lock"]
            .iter()
            .chain(fingerprint::INPUTS)
        {
            let (from, to) = (root.join(input), copy.join(input));
            if from.is_dir() {
                copy_tree(&from, &to)?;
            } else if from.exists() {
                if let Some(parent) = to.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::copy(&from, &to).with_context(|| format!("copying {input}"))?;
            }
        }
        let check = || -> Result<(bool, String)> {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args([
                    "check",
                    "--quiet",
                    "-p",
                    "lxcmon",
                    "--features",
                    "ebpf",
                    "--lib",
                ])
                .current_dir(&copy)
                .env("CARGO_TARGET_DIR", root.join("target"))
                .output()
                .context("running cargo check")?;
            Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        };
        let names_the_command = |stderr: &str| stderr.contains("run `cargo xtask build-ebpf`");
        let (ok, stderr) = check()?;
        if ok || !names_the_command(&stderr) {
            bail!("without the BPF object, cargo check passed={ok}; stderr:\n{stderr}");
        }
        let bpf_dir = copy.join("target/bpf");
        std::fs::create_dir_all(&bpf_dir)?;
        for file in [fingerprint::OBJECT, fingerprint::STAMP] {
            std::fs::copy(root.join(file), copy.join(file))
                .with_context(|| format!("copying {file}"))?;
        }
        let (ok, stderr) = check()?;
        if !ok {
            bail!("with the object built from these sources, cargo check failed:\n{stderr}");
        }
        let main = copy.join("lxcmon-ebpf/src/main.rs");
        let mut text = std::fs::read_to_string(&main)?;
        text.push_str("\n// an edit after the object was built\n");
        std::fs::write(&main, text)?;
        let (ok, stderr) = check()?;
        if ok || !names_the_command(&stderr) {
            bail!("after an edit of lxcmon-ebpf/src, cargo check passed={ok}; stderr:\n{stderr}");
        }
        eprintln!(
            "xtask: a missing or stale BPF object is refused, naming `cargo xtask build-ebpf`"
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&copy);
    result
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default();
        if name == "target" {
            continue;
        }
        if path.is_dir() {
            copy_tree(&path, &to.join(name))?;
        } else {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

/// `PATH` with cargo's bin directory first, so the freshly installed `bpf-linker` is found.
fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut parts = vec![cargo_bin_dir()];
    if let Some(p) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(parts).unwrap_or_else(|_| std::ffi::OsString::from("/usr/bin:/bin"))
}

/// The BPF part of `cargo xtask test` (root): builds the object, lints and unit-tests the
/// `ebpf` feature, then runs the root tests of `lxcmon/tests/bpf_*.rs` one at a time.
// Wired into `xtask/src/test.rs` by the lead (`ebpf::test()?;`).
pub fn test() -> Result<()> {
    build(&BuildArgs { debug: false })?;
    deps::ensure_apt(&["bpftool", "iproute2"])?;
    deps::cargo(&[
        "clippy",
        "-p",
        "lxcmon",
        "--features",
        "ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        // The ignored ones need root and BPF (batched map reads on a map of their own).
        &["--lib", "collect::bpf::", "--", "--include-ignored"],
    ))?;
    stale_object_is_refused()?;
    deps::exec(&mut deps::cargo_test(
        "lxcmon",
        true,
        &[&["--test", "bpf_collector"], deps::ROOT_TESTS].concat(),
    ))
}
