use anyhow::{Context, Result};
use clap::Parser;
use lxcmon::config::{Config, DEFAULT_CONFIG_PATH};
use lxcmon::daemon::ConfigSource;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Per-container metrics agent for LXC and Proxmox VE hosts.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// YAML configuration; without it, the default path if present, else built-in defaults.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Take two samples, print one cycle of the export to stdout, and exit.
    #[arg(long)]
    once: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Remove the BPF programs' pinned counters and attachments (/sys/fs/bpf/lxcmon) and exit;
    /// for an uninstall, with the service stopped.
    #[arg(long)]
    cleanup_bpf: bool,
    /// Read /sys, /proc and /etc below this directory (for fixture trees).
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,
}

fn load_config(cli: &Cli) -> Result<(Config, ConfigSource, String)> {
    match &cli.config {
        Some(path) => Ok((
            Config::load(path)?,
            ConfigSource::File(path.clone()),
            path.display().to_string(),
        )),
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            if default.exists() {
                Ok((
                    Config::load(&default)?,
                    ConfigSource::File(default),
                    DEFAULT_CONFIG_PATH.to_string(),
                ))
            } else {
                Ok((
                    Config::default(),
                    ConfigSource::Default(default),
                    "built-in defaults".to_string(),
                ))
            }
        }
    }
}

fn origin_path(source: &ConfigSource) -> &std::path::Path {
    match source {
        ConfigSource::File(p) | ConfigSource::Default(p) => p,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.cleanup_bpf {
        return cleanup_bpf(&cli);
    }
    // The daemon catches SIGTERM/SIGINT/SIGHUP before anything that takes time: one sent
    // right after the start is acted on, not fatal.
    let startup = if cli.once || cli.check_config {
        None
    } else {
        match lxcmon::daemon::Startup::begin() {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("lxcmon: {e:#}");
                return ExitCode::FAILURE;
            }
        }
    };
    let (cfg, source, origin) = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lxcmon: invalid configuration: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // What start-up needs beyond a valid file (the export directory...), checked alike by
    // --check-config and the daemon; --once writes no export.
    if !cli.once {
        if let Err(e) = cfg.check_usable(origin_path(&source)) {
            eprintln!("lxcmon: invalid configuration: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if cli.check_config {
        for w in cfg.warnings() {
            eprintln!("lxcmon: warning: {w}");
        }
        println!("{origin}: configuration OK");
        return ExitCode::SUCCESS;
    }
    let log = lxcmon::logging::init(&cfg.logging);
    tracing::info!(config = %origin, "configuration loaded");
    raise_fd_limit();
    for key in cfg.ignored_keys() {
        tracing::info!(
            key,
            "setting accepted for compatibility; lxcmon has no use for it"
        );
    }
    let result = match startup {
        Some(startup) => startup.run(cfg, source, &cli.root, log),
        None => run_once(&cfg, &cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--cleanup-bpf`: every layout version under the pin root, and the configured
/// `bpf_pin_dir` when the configuration names one.
fn cleanup_bpf(cli: &Cli) -> ExitCode {
    let extra = load_config(cli)
        .ok()
        .and_then(|(cfg, _, _)| cfg.monitoring.bpf_pin_dir);
    match lxcmon::collect::cleanup_bpf(extra.as_deref()) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing pinned at {}", lxcmon_common::PIN_ROOT);
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for dir in removed {
                println!("removed {}", dir.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lxcmon: --cleanup-bpf: {}", lxcmon::logging::Chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Each container keeps about a dozen kernel files open across cycles: the soft limit of 1024
/// that systemd gives a service would stop the agent at about 90 containers.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let old = getrlimit(Resource::Nofile);
    if old.current == old.maximum {
        return;
    }
    let new = Rlimit {
        current: old.maximum,
        maximum: old.maximum,
    };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => tracing::debug!(from = ?old.current, to = ?old.maximum, "open file limit raised"),
        Err(e) => {
            tracing::warn!(limit = ?old.current, error = %e, "cannot raise the open file limit")
        }
    }
}

fn run_once(cfg: &Config, cli: &Cli) -> Result<()> {
    let doc = lxcmon::daemon::once(cfg, &cli.root)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&doc).context("writing to stdout")?;
    out.flush().context("writing to stdout")
}
