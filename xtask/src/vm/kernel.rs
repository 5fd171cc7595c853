//! Debian cloud kernels, fetched with apt and cached under `.cache/vm/kernels/<package>/`.
//!
//! 6.1 comes from the machine's own sources (bookworm). 5.10 comes from Debian 11 through a
//! temporary one-line sources list for `bullseye` with the machine's mirror URI, passed to apt
//! with `-o Dir::Etc::SourceList=...`: the machine's own sources and lists are left alone.

use super::cache_dir;
use crate::deps;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules the guest needs; each is loaded unless the kernel has it built in.
const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "crc32c_generic",
    "veth",
    "bridge",
    "loop",
];

pub struct Kernel {
    /// "6.1" or "5.10".
    pub series: &'static str,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// The extracted package (`boot/`, `lib/modules/<version>/`).
    pub tree: PathBuf,
    /// Module files (relative to `lib/modules/<version>/`): the wanted ones and their
    /// dependencies.
    pub modules: Vec<String>,
    /// The wanted modules that are not built in, for `modprobe` in the guest.
    pub load: Vec<String>,
}

impl Kernel {
    pub fn modules_dir(&self) -> PathBuf {
        self.tree.join("lib/modules").join(&self.version)
    }
}

pub fn fetch(series: &'static str) -> Result<Kernel> {
    let kernels = cache_dir().join("kernels");
    std::fs::create_dir_all(&kernels)?;
    let prefix = match series {
        "6.1" => "linux-image-6.1.0-",
        "5.10" => "linux-image-5.10.0-",
        other => bail!("unknown kernel series {other}"),
    };
    let apt_opts = match series {
        "5.10" => bullseye_opts()?,
        _ => Vec::new(),
    };
    // Lists from an earlier run are used as they are; they are refreshed when they do not
    // name a kernel or when the named one cannot be downloaded any more.
    let resolved = query_package(&apt_opts, prefix).or_else(|_| {
        apt_update(&apt_opts)?;
        query_package(&apt_opts, prefix)
    });
    let mut pkg = match resolved {
        Ok(pkg) => pkg,
        Err(e) => {
            // Offline or mirror trouble: a kernel cached earlier still does the job.
            match newest_cached(&kernels, prefix) {
                Some(p) => {
                    eprintln!(
                        "xtask vm-test: cannot resolve the current {series} kernel ({e:#}); using cached {p}"
                    );
                    p
                }
                None => return Err(e),
            }
        }
    };
    if !kernels.join(&pkg).join(".complete").exists() {
        if let Err(e) = download(&kernels, &apt_opts, &pkg) {
            eprintln!("xtask vm-test: {e:#}; refreshing the package lists");
            apt_update(&apt_opts)?;
            pkg = query_package(&apt_opts, prefix)?;
            download(&kernels, &apt_opts, &pkg)?;
        }
    }
    let tree = kernels.join(&pkg).join("tree");
    let version = pkg.strip_prefix("linux-image-").unwrap_or(&pkg).to_string();
    let vmlinuz = tree.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        bail!("{} is missing", vmlinuz.display());
    }
    let mut k = Kernel {
        series,
        version,
        vmlinuz,
        tree,
        modules: Vec::new(),
        load: Vec::new(),
    };
    (k.modules, k.load) = resolve_modules(&k)?;
    Ok(k)
}

/// Downloads and unpacks one kernel package into `<kernels>/<pkg>/tree`.
fn download(kernels: &Path, apt_opts: &[String], pkg: &str) -> Result<()> {
    eprintln!("xtask vm-test: fetching {pkg}");
    let dir = kernels.join(pkg);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let dl = dir.join("download");
    std::fs::create_dir_all(&dl)?;
    deps::exec(
        Command::new("apt-get")
            .args(apt_opts)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", pkg])
            .current_dir(&dl),
    )?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dl.display()))?;
    deps::exec(
        Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("tree")),
    )?;
    std::fs::remove_dir_all(&dl)?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(())
}

fn apt_update(apt_opts: &[String]) -> Result<()> {
    deps::exec(
        Command::new("apt-get")
            .args(apt_opts)
            .args(["update", "-qq"]),
    )
}

/// `linux-image-cloud-amd64` depends on the current ABI's package.
fn query_package(apt_opts: &[String], prefix: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(apt_opts)
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with(prefix) && p.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .with_context(|| {
            format!(
                "apt-cache found no {prefix}*-cloud-amd64 behind linux-image-cloud-amd64: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

fn newest_cached(kernels: &Path, prefix: &str) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(".complete").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    // linux-image-6.1.0-<abi>-cloud-amd64: order by the numeric ABI.
    names.sort_by_key(|n| {
        n.strip_prefix(prefix)
            .and_then(|r| r.split('-').next())
            .and_then(|a| a.parse::<u32>().ok())
            .unwrap_or(0)
    });
    names.pop()
}

/// apt options for a private Debian 11 list: sources file, lists and caches under the cache dir.
fn bullseye_opts() -> Result<Vec<String>> {
    let base = cache_dir().join("apt-bullseye");
    let lists = base.join("lists");
    let cache = base.join("cache");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(cache.join("archives/partial"))?;
    let uri = mirror_uri();
    let list = base.join("sources.list");
    std::fs::write(
        &list,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} bullseye main\n"
        ),
    )?;
    let opt = |k: &str, v: &Path| vec!["-o".to_string(), format!("{k}={}", v.display())];
    let mut opts = Vec::new();
    opts.extend(opt("Dir::Etc::SourceList", &list));
    opts.extend(opt("Dir::Etc::SourceParts", Path::new("/dev/null")));
    opts.extend(opt("Dir::State::Lists", &lists));
    opts.extend(opt("Dir::Cache", &cache));
    Ok(opts)
}

/// The main Debian mirror of the machine (deb822 `debian.sources`, else `sources.list`).
fn mirror_uri() -> String {
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let suites = field("Suites:").unwrap_or_default();
            if suites.split_whitespace().any(|s| s == "bookworm") {
                if let Some(uri) =
                    field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_string))
                {
                    return uri;
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.first() == Some(&"deb") {
                let rest: Vec<&str> = w[1..]
                    .iter()
                    .copied()
                    .filter(|x| !x.starts_with('['))
                    .collect();
                if rest.get(1) == Some(&"bookworm") {
                    if let Some(uri) = rest.first() {
                        return uri.to_string();
                    }
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// Runs busybox depmod on the extracted package (Debian ships no modules.dep; depmod runs at
/// install time) and returns the files of the wanted modules with their dependencies, and the
/// names of the wanted modules that need loading.
fn resolve_modules(k: &Kernel) -> Result<(Vec<String>, Vec<String>)> {
    let mdir = k.modules_dir();
    let dep_file = mdir.join("modules.dep");
    if !dep_file.exists() {
        deps::exec(
            Command::new("busybox")
                .args(["depmod", "-b"])
                .arg(&k.tree)
                .arg(&k.version),
        )?;
    }
    let norm = |p: &str| -> String {
        let base = p.rsplit('/').next().unwrap_or(p);
        let base = base.split(".ko").next().unwrap_or(base);
        base.replace('-', "_")
    };
    let text = std::fs::read_to_string(&dep_file)
        .with_context(|| format!("reading {}", dep_file.display()))?;
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let deps: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        by_name.insert(norm(path), (path.to_string(), deps));
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(mdir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(norm)
        .collect();
    let by_path: BTreeMap<String, Vec<String>> = by_name
        .values()
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect();
    let mut order: Vec<String> = Vec::new();
    let mut load = Vec::new();
    for want in WANTED_MODULES {
        if builtin.contains(*want) {
            continue;
        }
        load.push(want.to_string());
        let Some((path, deps)) = by_name.get(*want) else {
            bail!(
                "kernel {} has module {want} neither built in nor in modules.dep",
                k.version
            );
        };
        // modules.dep lists the full closure of dependencies.
        for d in deps {
            if !by_path.contains_key(d) {
                bail!("{d} is listed as a dependency but missing");
            }
            if !order.contains(d) {
                order.push(d.clone());
            }
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
    }
    Ok((order, load))
}
