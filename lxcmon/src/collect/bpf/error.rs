//! What can go wrong in the BPF collector, typed so the cycle can tell a failure of one
//! container (it then runs on the file readers alone) from one of the whole collector.

use std::path::PathBuf;

/// A cause from aya whose type differs by step (program, link, pin errors).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the BPF collector. Messages never repeat their source: log them with
/// `logging::Chain` (or anyhow's `{:#}`), which prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot mount {fstype} at {}", .path.display())]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is in use by another lxcmon agent{}: stop it, or give this one a pin directory of its own (monitoring.bpf_pin_dir)",
        .pin_dir.display(),
        .holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        pin_dir: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot create or lock the pin directory {}", .path.display())]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {}", .path.display())]
    Cleanup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot load the BPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} is missing from the BPF object")]
    MissingProgram(&'static str),
    #[error("cannot load BPF program {program}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot attach {program} to {tracepoint}")]
    AttachTracepoint {
        program: &'static str,
        tracepoint: String,
        source: Cause,
    },
    /// Attaching (or pinning the link) for one container's cgroup failed.
    #[error("cannot attach {program} to {}", .cgroup.display())]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        source: Cause,
    },
    #[error("cannot pin {}", .path.display())]
    Pin { path: PathBuf, source: Cause },
    #[error("map {0} is missing from the BPF object")]
    MissingMap(&'static str),
    #[error("BPF map {map}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    /// A raw map command (one aya has no wrapper for) failed.
    #[error("BPF map {map}")]
    MapIo {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("cgroup {}", .path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {} sits at level {level}, deeper than the supported {max}", .path.display())]
    TooDeep { path: PathBuf, level: u32, max: u32 },
    #[error("all {0} container slots are in use")]
    Full(u32),
    #[error("cannot read the tracepoint format {}", .path.display())]
    TraceFormat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint format {}: {reason}", .path.display())]
    TraceField { path: PathBuf, reason: String },
    #[error("cannot count the possible CPUs ({what})")]
    Cpus {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("BPF_PROG_TEST_RUN of {program}")]
    TestRun {
        program: &'static str,
        source: std::io::Error,
    },
}

impl BpfError {
    /// A failure of one container's tracking (its cgroup gone or unusable, too deep, the
    /// kernel refusing the attachment to it, no free slot): that container runs on the file
    /// readers, the others stay on BPF. Everything else concerns the whole collector.
    pub fn is_per_container(&self) -> bool {
        matches!(
            self,
            Self::Cgroup { .. } | Self::TooDeep { .. } | Self::Full(_) | Self::AttachCgroup { .. }
        )
    }

    /// The container's cgroup is gone (it stopped between discovery and tracking).
    pub fn is_gone(&self) -> bool {
        matches!(self, Self::Cgroup { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

pub(crate) fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}
