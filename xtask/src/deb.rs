//! `cargo xtask deb`: the Debian package, built with cargo-deb from `[package.metadata.deb]` of
//! `lxcmon/Cargo.toml` (the agent with its BPF programs, the default configuration as a
//! conffile, the systemd unit, the README, the Grafana dashboard; maintainer scripts in
//! `dist/debian/`). [`test`] installs it on this machine, checks every file and the
//! conffile/remove/purge semantics, and puts the machine back as it was.

use crate::deps;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cargo-deb release known to build with the project's stable toolchain (rustc 1.95).
const CARGO_DEB_VERSION: &str = "3.8.0";
const PKG: &str = "lxcmon";
const BIN: &str = "/usr/bin/lxcmon";
const CONFFILE: &str = "/etc/lxc_autoscale_ml/lxc_monitor.yaml";
const CONF_DIR: &str = "/etc/lxc_autoscale_ml";
const DASHBOARD: &str = "/usr/share/lxcmon/grafana/lxcmon-dashboard.json";
const README: &str = "/usr/share/doc/lxcmon/README.md";
const UNIT_DIRS: &[&str] = &["/usr/lib/systemd/system", "/lib/systemd/system"];
const WANTS_LINK: &str = "/etc/systemd/system/multi-user.target.wants/lxcmon.service";
const PIN_ROOT: &str = "/sys/fs/bpf/lxcmon";
/// Files the agent writes at their default paths; purge removes them.
const STATE_FILES: &[&str] = &["/var/log/lxc_metrics.json", "/var/log/lxc_monitor.log"];

#[derive(clap::Args)]
pub struct DebArgs {
    /// Lighter, quicker compression of the package.
    #[arg(long)]
    pub fast: bool,
    /// Run the package tests instead (root): build, lintian, install, remove, purge on this
    /// machine (also part of `cargo xtask test`).
    #[arg(long)]
    pub test: bool,
}

/// Builds the BPF object, then the package; returns the path of the `.deb`.
pub fn build(args: &DebArgs) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    crate::ebpf::build(&crate::ebpf::BuildArgs { debug: false })
        .context("the package holds the agent with its BPF programs")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // --strip: the release profile keeps line tables for backtraces; the package does not.
    cmd.args(["deb", "-p", PKG, "--locked", "--strip"])
        .current_dir(deps::workspace_root());
    if args.fast {
        cmd.arg("--fast");
    }
    eprintln!("xtask: {cmd:?}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed: {}", out.status);
    }
    // cargo-deb prints the path of the package it wrote.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb printed no .deb path: {stdout}"))?;
    ensure!(deb.is_file(), "{} is not a file", deb.display());
    eprintln!("xtask: package at {}", deb.display());
    Ok(deb)
}

fn ensure_cargo_deb() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let have = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    // `dpkg-shlibdeps` (dpkg-dev) gives the exact library dependencies for `depends = "$auto"`.
    deps::ensure_apt(&["dpkg-dev"])?;
    deps::exec(Command::new(cargo).args([
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
    ]))
}

fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.output().with_context(|| format!("starting {shown}"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dpkg(args: &[&str]) -> Result<String> {
    ok(Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// dpkg's status of the package: "" when unknown, else e.g. "install ok installed".
fn pkg_status() -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PKG])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Whether some installed package owns `path`.
fn owned_by_package(path: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-S", path])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn exists(p: &str) -> bool {
    Path::new(p).symlink_metadata().is_ok()
}

fn unit_path() -> Option<String> {
    UNIT_DIRS
        .iter()
        .map(|d| format!("{d}/lxcmon.service"))
        .find(|p| exists(p))
}

/// Moves aside what the test would overwrite or delete (a configuration, export or log file
/// of the machine's own) and puts it back, and purges the test package, when dropped: also on
/// failure. The backup directory outlives a crash; the next run restores from it first.
struct Machine {
    backup: PathBuf,
    saved: Vec<(String, PathBuf)>,
    created_conf_dir: bool,
}

impl Machine {
    fn prepare() -> Result<Self> {
        let backup = deps::workspace_root().join("target/deb-test/backup");
        restore_from(&backup)?;
        if !pkg_status().is_empty() {
            eprintln!("xtask: purging an installed {PKG} package (leftover of an earlier run)");
            dpkg(&["--purge", PKG])?;
        }
        std::fs::create_dir_all(&backup)
            .with_context(|| format!("creating {}", backup.display()))?;
        let mut saved = Vec::new();
        for path in std::iter::once(CONFFILE).chain(STATE_FILES.iter().copied()) {
            if exists(path) {
                ensure!(
                    !owned_by_package(path),
                    "{path} belongs to an installed package; not touching it"
                );
                let to = backup.join(path.trim_start_matches('/').replace('/', "%"));
                std::fs::rename(path, &to).with_context(|| format!("moving {path} aside"))?;
                saved.push((path.to_string(), to));
            }
        }
        Ok(Self {
            backup,
            saved,
            created_conf_dir: !exists(CONF_DIR),
        })
    }
}

/// Puts back files an earlier run moved aside (`%` stands for `/` in their names).
fn restore_from(backup: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(backup) else {
        return Ok(());
    };
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().replace('%', "/");
        let to = PathBuf::from(format!("/{name}"));
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        eprintln!("xtask: restoring {}", to.display());
        std::fs::rename(e.path(), &to).with_context(|| format!("restoring {}", to.display()))?;
    }
    Ok(())
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !pkg_status().is_empty() {
            if let Err(e) = dpkg(&["--purge", PKG]) {
                eprintln!("xtask: cleanup: {e:#}");
            }
        }
        for (path, from) in &self.saved {
            if let Some(dir) = Path::new(path).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::rename(from, path) {
                eprintln!("xtask: cleanup: restoring {path}: {e}");
            }
        }
        if self.created_conf_dir {
            let _ = std::fs::remove_dir(CONF_DIR);
        }
        let _ = std::fs::remove_dir(&self.backup);
    }
}

/// The package part of `cargo xtask test` (root): dashboard checks, build, lintian, then
/// install / remove / reinstall / purge on this machine.
// Wired into `xtask/src/test.rs` by the lead (`crate::deb::test()?;`).
pub fn test() -> Result<()> {
    let root = deps::workspace_root();
    // The dashboard: shape, metric names, and PromQL evaluated by Prometheus' promtool.
    deps::ensure_apt(&["python3", "prometheus", "lintian", "util-linux", "systemd"])?;
    deps::exec(
        Command::new("python3")
            .arg(root.join("tests/deb/check_dashboard.py"))
            .arg("--promtool"),
    )?;

    let deb = build(&DebArgs {
        fast: true,
        test: false,
    })?;
    lintian(&deb)?;
    let machine = Machine::prepare()?;
    install_checks(&root, &deb)?;
    remove_purge_checks(&deb)?;
    drop(machine);
    eprintln!("xtask: deb: all package checks passed");
    Ok(())
}

/// Lintian's findings are printed; errors other than the ones listed here fail the test.
fn lintian(deb: &Path) -> Result<()> {
    let out = run(Command::new("lintian")
        .args(["--no-tag-display-limit", "--allow-root"])
        .arg(deb))?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("xtask: lintian findings:\n{text}");
    // Overridden in the package itself (dist/debian/lintian-overrides) need not be listed;
    // nothing else is accepted.
    const ACCEPTED: &[&str] = &[];
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("E: "))
        .filter(|l| !ACCEPTED.iter().any(|a| l.contains(a)))
        .collect();
    ensure!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    Ok(())
}

fn same_bytes(installed: &str, source: &Path) -> Result<()> {
    let a = std::fs::read(installed).with_context(|| format!("reading {installed}"))?;
    let b = std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    ensure!(a == b, "{installed} differs from {}", source.display());
    Ok(())
}

fn install_checks(root: &Path, deb: &Path) -> Result<()> {
    let deb_s = deb.to_string_lossy();
    dpkg(&["--install", &deb_s])?;
    ensure!(
        pkg_status() == "install ok installed",
        "status after install: {:?}",
        pkg_status()
    );

    // Every file where it belongs, with the bytes of the tree it was built from.
    let unit = unit_path().context("lxcmon.service not installed")?;
    same_bytes(&unit, &root.join("dist/lxcmon.service"))?;
    same_bytes(CONFFILE, &root.join("dist/lxc_monitor.yaml"))?;
    same_bytes(README, &root.join("README.md"))?;
    same_bytes(DASHBOARD, &root.join("dist/grafana/lxcmon-dashboard.json"))?;
    let listed = ok(Command::new("dpkg-query").args(["-L", PKG]))?;
    for p in [BIN, CONFFILE, README, DASHBOARD, unit.as_str()] {
        ensure!(
            listed.lines().any(|l| l == p),
            "{p} not in dpkg -L {PKG}:\n{listed}"
        );
    }
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PKG]))?;
    ensure!(
        conffiles.contains(CONFFILE),
        "{CONFFILE} is not a conffile: {conffiles:?}"
    );

    // The binary runs, is this version, and accepts the installed configuration, both named
    // and found at the default path.
    let version = ok(Command::new(BIN).arg("--version"))?;
    let want = format!("lxcmon {}", env!("CARGO_PKG_VERSION"));
    ensure!(
        version.trim() == want,
        "--version: {version:?}, want {want:?}"
    );
    let named = ok(Command::new(BIN).args(["--check-config", "--config", CONFFILE]))?;
    ensure!(named.contains("configuration OK"), "{named}");
    let default = ok(Command::new(BIN).arg("--check-config"))?;
    ensure!(
        default.contains(CONFFILE),
        "the default path was not used: {default}"
    );

    // The unit: systemd's own check on the installed file; enabled by the postinst.
    let verify = run(Command::new("systemd-analyze").args(["verify", &unit]))?;
    let verify_err = String::from_utf8_lossy(&verify.stderr);
    ensure!(
        verify.status.success() && !verify_err.contains("lxcmon.service"),
        "systemd-analyze verify {unit}: {}\n{verify_err}",
        verify.status
    );
    ensure!(
        Path::new(WANTS_LINK).symlink_metadata().is_ok(),
        "postinst did not enable the unit ({WANTS_LINK} missing)"
    );

    // The packaged agent has its BPF programs, and they load with no more than the unit's
    // capability bounding set and no_new_privs: `collector: ebpf` refuses to start otherwise.
    let caps = bounding_set(&unit)?;
    let dir = deps::workspace_root().join("target/deb-test");
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("ebpf.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  collector: ebpf\n  check_interval: 0.2\n",
            dir.join("once.log").display()
        ),
    )?;
    let out = run(Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg("--inh-caps=-all")
        .arg("--no-new-privs")
        .arg(BIN)
        .args(["--once", "--config"])
        .arg(&cfg))?;
    let log = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && log.contains("collector: ebpf"),
        "the installed agent with the unit's capabilities ({caps}) did not run the BPF \
         collector: {}\n{log}",
        out.status
    );
    // `--once` holds its programs only while it runs: it leaves no pin directory behind.
    let left: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("lxcmon-once-"))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        left.is_empty(),
        "--once of the installed agent left BPF pins: {left:?}"
    );
    daemon_checks(&dir, &caps)
}

/// Kills the agent started by [`daemon_checks`] if a check fails before it is stopped.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One HTTP/1.0 GET over loopback: (status code, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {resp:?}"))?;
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_string()))
}

fn wait_healthy(port: u16, agent: &mut Agent) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited: {status}");
        }
        if let Ok((200, _)) = http_get(port, "/healthz") {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "/healthz not 200 within 15 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn signal(agent: &Agent, sig: &str) -> Result<()> {
    ok(Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(agent.0.id().to_string()))
    .map(|_| ())
}

/// The installed agent as the unit runs it (same capabilities, no_new_privs) serving
/// `/metrics` on loopback: every metric the dashboard uses is in its scrape; SIGHUP (the unit's
/// ExecReload) keeps it serving; SIGTERM stops it with status 0.
fn daemon_checks(dir: &Path, caps: &str) -> Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = dir.join("daemon.yaml");
    std::fs::write(
        &cfg,
        format!(
            "logging:\n  log_file: {}\nmonitoring:\n  export_file: {}\n  check_interval: 0.2\n  \
             prometheus_listen: \"127.0.0.1:{port}\"\n",
            dir.join("daemon.log").display(),
            dir.join("export.json").display()
        ),
    )?;
    let mut agent = Agent(
        Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg("--inh-caps=-all")
            .arg("--no-new-privs")
            .arg(BIN)
            .arg("--config")
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the installed agent")?,
    );
    wait_healthy(port, &mut agent)?;
    // /healthz is 200 from the start; the container families appear with the first cycle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let body = loop {
        let (code, body) = http_get(port, "/metrics")?;
        ensure!(code == 200, "/metrics: HTTP {code}");
        if body.contains("\nlxcmon_cycle_duration_seconds ") {
            break body;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no cycle in /metrics within 15 s:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let scrape = dir.join("metrics.txt");
    std::fs::write(&scrape, &body)?;
    deps::exec(
        Command::new("python3")
            .arg(deps::workspace_root().join("tests/deb/check_dashboard.py"))
            .arg("--served")
            .arg(&scrape),
    )?;

    signal(&agent, "HUP")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    wait_healthy(port, &mut agent).context("after SIGHUP")?;

    signal(&agent, "TERM")?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.0.try_wait()? {
            break s;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // (No export file is expected: with no container running there is nothing to export.)
    ensure!(
        status.success(),
        "the agent stopped with {status} on SIGTERM"
    );
    Ok(())
}

/// `CapabilityBoundingSet=` of the unit as setpriv wants it: `+bpf,+perfmon,...`.
fn bounding_set(unit: &str) -> Result<String> {
    let text = std::fs::read_to_string(unit)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit has no CapabilityBoundingSet=")?;
    let caps: Vec<String> = line
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    ensure!(!caps.is_empty(), "empty CapabilityBoundingSet=");
    Ok(caps.join(","))
}

fn remove_purge_checks(deb: &Path) -> Result<()> {
    // A local change to the conffile (a comment: the configuration stays the defaults).
    let marker = format!(
        "# changed by the lxcmon package test {}\n",
        std::process::id()
    );
    let mut conf = std::fs::read_to_string(CONFFILE)?;
    conf.push_str(&marker);
    std::fs::write(CONFFILE, &conf)?;

    // Remove: program files and BPF pins go, the changed conffile stays.
    dpkg(&["--remove", PKG])?;
    ensure!(
        pkg_status() == "deinstall ok config-files",
        "status after remove: {:?}",
        pkg_status()
    );
    for p in [BIN, README, DASHBOARD] {
        ensure!(!exists(p), "{p} left after dpkg --remove");
    }
    ensure!(unit_path().is_none(), "unit left after dpkg --remove");
    ensure!(
        !exists(PIN_ROOT),
        "{PIN_ROOT} left after dpkg --remove (prerm cleanup)"
    );
    ensure!(
        std::fs::read_to_string(CONFFILE).ok().as_deref() == Some(conf.as_str()),
        "the changed conffile did not survive dpkg --remove"
    );

    // Reinstall over the kept configuration: the local change is kept, not replaced.
    dpkg(&["--force-confold", "--install", &deb.to_string_lossy()])?;
    ensure!(
        std::fs::read_to_string(CONFFILE).ok().as_deref() == Some(conf.as_str()),
        "reinstalling replaced the changed conffile"
    );
    ensure!(exists(BIN), "{BIN} missing after reinstall");

    // Purge: give it state to remove (export, log, a pin directory), then nothing may remain.
    for f in STATE_FILES {
        std::fs::write(f, b"written by the lxcmon package test\n")?;
    }
    if Path::new("/sys/fs/bpf").is_dir() {
        std::fs::create_dir_all(format!("{PIN_ROOT}/v1")).context("mkdir in bpffs")?;
    }
    dpkg(&["--purge", PKG])?;
    ensure!(
        pkg_status().is_empty() || pkg_status().starts_with("unknown ok not-installed"),
        "status after purge: {:?}",
        pkg_status()
    );
    let mut left: Vec<String> = [BIN, CONFFILE, README, DASHBOARD, WANTS_LINK, PIN_ROOT]
        .iter()
        .chain(STATE_FILES)
        .chain(&[
            "/usr/share/lxcmon",
            "/usr/share/doc/lxcmon",
            "/etc/systemd/system/lxcmon.service",
            "/var/lib/systemd/deb-systemd-helper-enabled/lxcmon.service.dsh-also",
            "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/lxcmon.service",
            "/var/lib/systemd/deb-systemd-helper-masked/lxcmon.service",
        ])
        .filter(|p| exists(p))
        .map(|p| p.to_string())
        .collect();
    if let Some(u) = unit_path() {
        left.push(u);
    }
    for e in std::fs::read_dir("/var/lib/dpkg/info")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.starts_with("lxcmon.") {
            left.push(format!("/var/lib/dpkg/info/{name}"));
        }
    }
    ensure!(left.is_empty(), "left after dpkg --purge: {left:?}");
    Ok(())
}
