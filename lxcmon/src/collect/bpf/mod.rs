//! The BPF collector (cargo feature `ebpf`): network bytes per container from `cgroup_skb`
//! programs attached to each container's cgroup v2 directory, block I/O bytes from the
//! `block/block_bio_queue` tracepoint charged to the submitting task's container.
//!
//! Maps and links are pinned under [`BpfOptions::pin_dir`] (default [`DEFAULT_PIN_DIR`], the
//! layout version is part of the path), so counting goes on while the agent restarts and a new
//! agent continues the same cumulative counts. [`cleanup_pinned`] removes everything (uninstall).
//!
//! Byte semantics: network counters are frame bytes as the container's (Ethernet) interfaces
//! count them: `skb->len` at the cgroup hooks plus the 14-byte Ethernet header, for sockets of
//! the container's processes, excluding the loopback device; packets the kernel answers itself
//! (ICMP echo, TCP resets without a socket) are not a socket's and are not counted. I/O counters
//! are bytes of bios submitted by the container's tasks, and buffered writes when their pages
//! are dirtied (see `lxcmon-ebpf/README.md`).
//!
//! The object is built by `cargo xtask build-ebpf` and embedded at compile time.

mod btf;
pub(crate) mod counters;
mod format;
pub mod sys;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint};
use aya::{Ebpf, EbpfLoader};
use lxcmon_common::{
    KernelOffsets, TrackedCgroup, FOLIO_NR_ORDER_BYTE, FOLIO_NR_PAGES_U32, GLOBAL_BIO_DEV_OFF,
    GLOBAL_BIO_NR_SECTOR_OFF, GLOBAL_BIO_RWBS_OFF, GLOBAL_KERNEL_OFFSETS, MAP_COUNTERS,
    MAP_EXCLUDED_DEVS, MAP_TRACKED, MAP_TRACKED_LEVELS, MAX_CONTAINERS, MAX_TRACKED_LEVEL,
    PROG_BIO_QUEUE, PROG_BIO_QUEUE_BTF, PROG_DIRTY_FOLIO, PROG_SKB_EGRESS, PROG_SKB_INGRESS,
};
use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tracing::{debug, info, warn};

pub use lxcmon_common::Counters;
pub use sys::kernel_dev_t;

/// The BPF object built by `cargo xtask build-ebpf`; `build.rs` checks that it matches the
/// sources and gives its path.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LXCMON_BPF_OBJECT"));

/// Where bpffs is mounted.
pub const BPF_FS: &str = "/sys/fs/bpf";
/// Where tracefs is mounted (mounted by [`BpfCollector::load`] when absent).
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Default pin directory; `v1` is [`lxcmon_common::PIN_LAYOUT_VERSION`].
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lxcmon/v1";

const TP_CATEGORY: &str = "block";
const TP_NAME: &str = "block_bio_queue";
const TP_DIRTY: &str = "writeback_dirty_folio";
const PIN_BIO_CLASSIC: &str = "block_bio_queue";
const PIN_BIO_BTF: &str = "block_bio_queue_btf";
const PIN_DIRTY: &str = "writeback_dirty_folio";

/// How block I/O is counted (see [`BpfCollector::io_mode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoMode {
    /// Bios submitted by the container's tasks (reads, direct I/O, and writeback the tasks do
    /// themselves such as fsync); buffered writes flushed by kernel threads are not counted.
    /// The string says why the dirtied-bytes mode is not in use.
    BiosOnly(String),
    /// Reads and direct writes from bios; buffered writes as page-cache bytes dirtied by the
    /// container's tasks (counted once, when a page turns dirty), whoever writes them back.
    BiosAndDirtied,
    /// No block program could be loaded (5.10's verifier lacks the ancestor-cgroup helper for
    /// tracepoints): the network programs run alone and block I/O is left to the file readers.
    /// The string is the kernel's reason.
    Files(String),
}

impl IoMode {
    /// Whether the programs count block I/O at all.
    pub fn counts_io(&self) -> bool {
        !matches!(self, IoMode::Files(_))
    }
}

/// Errors of the BPF path; each carries the kernel's (or aya's) reason in its message, so the
/// agent can log "falling back to files: {error}".
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("mounting {fstype} at {path}: {source}")]
    Mount {
        fstype: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the BPF object: {reason}")]
    Load { reason: String },
    #[error("loading BPF program {program}: {reason}")]
    Program {
        program: &'static str,
        reason: String,
    },
    #[error("attaching {what}: {reason}")]
    Attach { what: String, reason: String },
    #[error("BPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path} sits at level {level}, deeper than the supported {max}")]
    TooDeep { path: PathBuf, level: u32, max: u32 },
    #[error("all {0} container slots are in use")]
    Full(u32),
    #[error("tracepoint format {path}: {reason}")]
    TraceFormat { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// The error and all its sources, joined: aya's top-level messages alone often omit the errno
/// or the verifier output.
fn reason(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

/// What [`BpfCollector::load`] needs.
#[derive(Debug, Clone)]
pub struct BpfOptions {
    /// Block devices (kernel `dev_t`, see [`kernel_dev_t`]) whose I/O is not counted.
    pub excluded_devices: Vec<u32>,
    /// Pin directory on bpffs for maps and links.
    pub pin_dir: PathBuf,
    /// Count buffered writes when pages are dirtied ([`IoMode::BiosAndDirtied`]); needs kernel
    /// BTF. Without it, only bios the container's tasks submit themselves are counted.
    pub count_dirtied: bool,
}

impl Default for BpfOptions {
    fn default() -> Self {
        Self {
            excluded_devices: Vec::new(),
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            count_dirtied: true,
        }
    }
}

/// The kernel `dev_t` of every block device (and partition) under `<sys>/class/block` whose
/// name starts with one of `prefixes` (the config's `excluded_devices`).
pub fn excluded_dev_ts(sys: &Path, prefixes: &[String]) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(sys.join("class/block")) else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            continue;
        }
        let Ok(dev) = std::fs::read_to_string(entry.path().join("dev")) else {
            continue;
        };
        let mut it = dev.trim().split(':').map(|v| v.parse::<u32>());
        if let (Some(Ok(maj)), Some(Ok(min))) = (it.next(), it.next()) {
            out.push(kernel_dev_t(maj, min));
        }
    }
    out.sort_unstable();
    out
}

/// Where the cgroup v2 hierarchy is mounted, from `<proc>/self/mounts` (`/sys/fs/cgroup` on
/// pure v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones); container cgroup directories for
/// [`BpfCollector::track`] are below it.
pub fn cgroup2_mount(proc_dir: &Path) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string(proc_dir.join("self/mounts")).ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_src, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
    })
}

/// Removes the pinned maps and links under `pin_dir` (uninstall); counting stops once no
/// running agent holds them.
pub fn cleanup_pinned(pin_dir: &Path) -> Result<(), BpfError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            // `/sys/fs/bpf/lxcmon` too, once no other layout version is left in it.
            if let Some(parent) = pin_dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Io {
            what: format!("removing {}", pin_dir.display()),
            source,
        }),
    }
}

/// Per-container byte counters from the kernel side.
pub struct BpfCollector {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    tracked: HashMap<u64, TrackedCgroup>,
    values: HashMap<u64, Counters>,
    ncpus: usize,
    io_mode: IoMode,
    /// `Some(true)` while batched reads work, `Some(false)` once the kernel refused one.
    batched: Option<bool>,
}

impl std::fmt::Debug for BpfCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfCollector")
            .field("pin_dir", &self.pin_dir)
            .field("tracked", &self.tracked)
            .finish_non_exhaustive()
    }
}

fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn skb_link_path(pin_dir: &Path, id: u64, dir: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("cg-{id}-{dir}"))
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Io { what, source }
}

/// Reads the record offsets of `block/block_bio_queue` from tracefs.
fn bio_queue_offsets(tracefs: &Path) -> Result<(u32, u32, u32), BpfError> {
    let path = tracefs
        .join("events")
        .join(TP_CATEGORY)
        .join(TP_NAME)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| BpfError::TraceFormat {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let fields = format::parse_format(&text);
    let get = |name: &str, min_size: u32| {
        fields
            .get(name)
            .filter(|f| f.size >= min_size)
            .map(|f| f.offset)
            .ok_or_else(|| BpfError::TraceFormat {
                path: path.clone(),
                reason: format!("no field `{name}` of at least {min_size} bytes"),
            })
    };
    let dev = get("dev", 4)?;
    let nr = get("nr_sector", 4)?;
    let rwbs = get("rwbs", 2)?;
    if fields.get("dev").map(|f| f.size) != Some(4)
        || fields.get("nr_sector").map(|f| f.size) != Some(4)
    {
        return Err(BpfError::TraceFormat {
            path,
            reason: "`dev` and `nr_sector` must be 4-byte fields".into(),
        });
    }
    Ok((dev, nr, rwbs))
}

/// Resolves the struct offsets the BTF programs need from the running kernel's BTF.
fn kernel_offsets() -> Result<KernelOffsets, String> {
    let btf =
        btf::Btf::from_sys_fs().map_err(|e| format!("reading /sys/kernel/btf/vmlinux: {e}"))?;
    let m = |s: &str, f: &str| btf.member_offset(s, f).map_err(|e| e.to_string());
    // `folio_nr_pages`: `_nr_pages` (6.15+), `_folio_nr_pages` (5.18-6.14), else the order byte
    // at the start of `_flags_1`.
    let (folio_nr, folio_nr_mode) =
        match m("folio", "_nr_pages").or_else(|_| m("folio", "_folio_nr_pages")) {
            Ok(off) => (off, FOLIO_NR_PAGES_U32),
            Err(_) => (m("folio", "_flags_1")?, FOLIO_NR_ORDER_BYTE),
        };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let pg_head = btf
        .enum_value("pageflags", "PG_head")
        .map_err(|e| e.to_string())?;
    Ok(KernelOffsets {
        enabled: 1,
        page_size: u32::try_from(page_size).map_err(|_| "bad page size".to_string())?,
        folio_flags: m("folio", "flags")?,
        folio_nr,
        folio_nr_mode,
        pg_head: u32::try_from(pg_head).map_err(|_| "bad PG_head".to_string())?,
        folio_mapping: m("folio", "mapping")?,
        as_host: m("address_space", "host")?,
        inode_sb: m("inode", "i_sb")?,
        sb_dev: m("super_block", "s_dev")?,
        sb_bdi: m("super_block", "s_bdi")?,
        bdi_caps: m("backing_dev_info", "capabilities")?,
        bio_bdev: m("bio", "bi_bdev")?,
        bio_opf: m("bio", "bi_opf")?,
        bio_size: m("bio", "bi_iter.bi_size")?,
        bio_idx: m("bio", "bi_iter.bi_idx")?,
        bio_io_vec: m("bio", "bi_io_vec")?,
        bdev_dev: m("block_device", "bd_dev")?,
        bvec_page: m("bio_vec", "bv_page")?,
        bvec_size: btf.struct_size("bio_vec").map_err(|e| e.to_string())?,
    })
}

/// Removes a pinned link (detaching it once nothing else holds it).
fn unpin_link(path: &Path) {
    if let Ok(link) = PinnedLink::from_pin(path) {
        let _ = link.unpin();
    } else {
        let _ = std::fs::remove_file(path);
    }
}

/// Pins `link` at `path`.
fn pin_link(link: FdLink, path: &Path) -> Result<(), BpfError> {
    link.pin(path).map(drop).map_err(|e| BpfError::Pin {
        path: path.to_path_buf(),
        reason: reason(&e),
    })
}

impl BpfCollector {
    /// Mounts bpffs and tracefs when absent, loads the programs (reusing pinned maps), attaches
    /// the block tracepoint (or keeps the pinned attachment of an earlier agent), and restores
    /// the set of tracked containers from the pinned map.
    pub fn load(opts: &BpfOptions) -> Result<Self, BpfError> {
        sys::ensure_mounted("bpf", Path::new(BPF_FS), sys::BPF_FS_MAGIC).map_err(|source| {
            BpfError::Mount {
                fstype: "bpf",
                path: BPF_FS.into(),
                source,
            }
        })?;
        let tracefs = Path::new(TRACEFS);
        if sys::fs_magic(tracefs).ok() != Some(sys::TRACEFS_MAGIC) {
            sys::ensure_mounted("tracefs", tracefs, sys::TRACEFS_MAGIC).map_err(|source| {
                BpfError::Mount {
                    fstype: "tracefs",
                    path: tracefs.into(),
                    source,
                }
            })?;
        }
        let pin_dir = opts.pin_dir.clone();
        std::fs::create_dir_all(links_dir(&pin_dir)).map_err(io_err(format!(
            "creating {}",
            links_dir(&pin_dir).display()
        )))?;

        let (dev_off, nr_off, rwbs_off) = bio_queue_offsets(tracefs)?;
        let koff = if opts.count_dirtied {
            kernel_offsets()
        } else {
            Err("disabled by configuration".to_string())
        };
        let koff_value = koff.clone().unwrap_or_default();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .override_global(GLOBAL_BIO_DEV_OFF, &dev_off, true)
            .override_global(GLOBAL_BIO_NR_SECTOR_OFF, &nr_off, true)
            .override_global(GLOBAL_BIO_RWBS_OFF, &rwbs_off, true)
            .override_global(GLOBAL_KERNEL_OFFSETS, &koff_value, true)
            .load(OBJECT)
            .map_err(|e| BpfError::Load { reason: reason(&e) })?;

        for name in [PROG_SKB_INGRESS, PROG_SKB_EGRESS] {
            let prog: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            prog.load().map_err(|e| BpfError::Program {
                program: name,
                reason: reason(&e),
            })?;
        }
        let links = links_dir(&pin_dir);
        let io_mode = match koff.and_then(|_| Self::attach_btf_io(&mut ebpf, &links)) {
            Ok(()) => {
                unpin_link(&links.join(PIN_BIO_CLASSIC));
                IoMode::BiosAndDirtied
            }
            Err(why) => {
                unpin_link(&links.join(PIN_BIO_BTF));
                unpin_link(&links.join(PIN_DIRTY));
                match Self::attach_classic_io(&mut ebpf, &links) {
                    Ok(()) => IoMode::BiosOnly(why),
                    Err(e) => {
                        unpin_link(&links.join(PIN_BIO_CLASSIC));
                        IoMode::Files(e.to_string())
                    }
                }
            }
        };

        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| BpfError::Io {
            what: what.to_string(),
            source: e,
        })?;
        let mut this = Self {
            ebpf,
            pin_dir,
            tracked: HashMap::new(),
            values: HashMap::new(),
            ncpus,
            io_mode,
            batched: None,
        };
        this.set_excluded_devices(&opts.excluded_devices)?;
        this.restore_tracked()?;
        info!(
            pin_dir = %this.pin_dir.display(),
            tracked = this.tracked.len(),
            io_mode = ?this.io_mode,
            "BPF collector loaded"
        );
        Ok(this)
    }

    /// Loads and attaches (pinned) the BTF block and dirtied-page programs, keeping pinned
    /// attachments of an earlier agent. Errors are the reason to fall back to the classic one.
    fn attach_btf_io(ebpf: &mut Ebpf, links: &Path) -> Result<(), String> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {}", reason(&e)))?;
        for (name, tp) in [(PROG_BIO_QUEUE_BTF, TP_NAME), (PROG_DIRTY_FOLIO, TP_DIRTY)] {
            let prog: &mut BtfTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            prog.load(tp, &btf)
                .map_err(|e| format!("loading {name} for tp_btf/{tp}: {}", reason(&e)))?;
        }
        for (name, pin) in [
            (PROG_BIO_QUEUE_BTF, PIN_BIO_BTF),
            (PROG_DIRTY_FOLIO, PIN_DIRTY),
        ] {
            let path = links.join(pin);
            if PinnedLink::from_pin(&path).is_ok() {
                continue;
            }
            let _ = std::fs::remove_file(&path);
            let prog: &mut BtfTracePoint = program_mut(ebpf, name).map_err(|e| e.to_string())?;
            let fail = |e: &dyn std::error::Error| format!("attaching {name}: {}", reason(e));
            let id = prog.attach().map_err(|e| fail(&e))?;
            let link: FdLink = prog.take_link(id).map_err(|e| fail(&e))?.into();
            if let Err(e) = pin_link(link, &path) {
                // Do not leave one of the pair counting alone.
                unpin_link(&links.join(PIN_BIO_BTF));
                unpin_link(&links.join(PIN_DIRTY));
                return Err(e.to_string());
            }
        }
        Ok(())
    }

    /// Loads and attaches (pinned) the classic `block/block_bio_queue` program.
    fn attach_classic_io(ebpf: &mut Ebpf, links: &Path) -> Result<(), BpfError> {
        let tp: &mut TracePoint = program_mut(ebpf, PROG_BIO_QUEUE)?;
        tp.load().map_err(|e| BpfError::Program {
            program: PROG_BIO_QUEUE,
            reason: reason(&e),
        })?;
        let tp_pin = links.join(PIN_BIO_CLASSIC);
        if PinnedLink::from_pin(&tp_pin).is_ok() {
            debug!(pin = %tp_pin.display(), "keeping the pinned block tracepoint attachment");
            return Ok(());
        }
        let _ = std::fs::remove_file(&tp_pin);
        let attach_err = |e: &dyn std::error::Error| BpfError::Attach {
            what: format!("tracepoint {TP_CATEGORY}/{TP_NAME}"),
            reason: reason(e),
        };
        let id = tp
            .attach(TP_CATEGORY, TP_NAME)
            .map_err(|e| attach_err(&e))?;
        let link = tp.take_link(id).map_err(|e| attach_err(&e))?;
        let fd: FdLink = link
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?;
        pin_link(fd, &tp_pin)
    }

    /// How block I/O is counted on this kernel.
    pub fn io_mode(&self) -> &IoMode {
        &self.io_mode
    }

    fn map(&self, name: &'static str) -> Result<&Map, BpfError> {
        self.ebpf.map(name).ok_or(BpfError::Map {
            map: name,
            reason: "missing from the object".into(),
        })
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, BpfError> {
        self.ebpf.map_mut(name).ok_or(BpfError::Map {
            map: name,
            reason: "missing from the object".into(),
        })
    }

    fn tracked_map(&mut self) -> Result<BpfHashMap<&mut MapData, u64, TrackedCgroup>, BpfError> {
        BpfHashMap::try_from(self.map_mut(MAP_TRACKED)?).map_err(map_err(MAP_TRACKED))
    }

    /// Replaces the excluded-device set.
    pub fn set_excluded_devices(&mut self, devs: &[u32]) -> Result<(), BpfError> {
        let mut map: BpfHashMap<&mut MapData, u32, u8> =
            BpfHashMap::try_from(self.map_mut(MAP_EXCLUDED_DEVS)?)
                .map_err(map_err(MAP_EXCLUDED_DEVS))?;
        let old: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for k in old.iter().filter(|k| !devs.contains(k)) {
            map.remove(k).map_err(map_err(MAP_EXCLUDED_DEVS))?;
        }
        for d in devs {
            map.insert(d, 1, 0).map_err(map_err(MAP_EXCLUDED_DEVS))?;
        }
        Ok(())
    }

    /// Picks up containers tracked by an earlier agent (pinned map), dropping entries whose
    /// attachments are gone.
    fn restore_tracked(&mut self) -> Result<(), BpfError> {
        let entries: Vec<(u64, TrackedCgroup)> = {
            let map = self.tracked_map()?;
            map.iter().filter_map(Result::ok).collect()
        };
        for (id, t) in entries {
            let ok = ["ingress", "egress"]
                .iter()
                .all(|d| PinnedLink::from_pin(skb_link_path(&self.pin_dir, id, d)).is_ok());
            if ok {
                self.tracked.insert(id, t);
            } else {
                warn!(
                    cgroup_id = id,
                    "dropping a pinned container entry without attachments"
                );
                let _ = self.untrack(id);
            }
        }
        self.write_levels()
    }

    fn write_levels(&mut self) -> Result<(), BpfError> {
        let mask = self
            .tracked
            .values()
            .fold(0u64, |m, t| m | (1u64 << t.level));
        let mut levels: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(MAP_TRACKED_LEVELS)?)
                .map_err(map_err(MAP_TRACKED_LEVELS))?;
        levels.set(0, mask, 0).map_err(map_err(MAP_TRACKED_LEVELS))
    }

    /// Sets a slot's counters to `seed` (held by CPU 0; the others start at zero).
    fn seed_slot(&mut self, slot: u32, seed: Counters) -> Result<(), BpfError> {
        let ncpus = self.ncpus;
        let mut counters: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.map_mut(MAP_COUNTERS)?).map_err(map_err(MAP_COUNTERS))?;
        let mut values = vec![Counters::default(); ncpus];
        if let Some(first) = values.first_mut() {
            *first = seed;
        }
        let zeros = PerCpuValues::try_from(values).map_err(|e| BpfError::Map {
            map: MAP_COUNTERS,
            reason: e.to_string(),
        })?;
        counters.set(slot, zeros, 0).map_err(map_err(MAP_COUNTERS))
    }

    /// Ids of the tracked container cgroups (also those restored from pins).
    pub fn tracked_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.tracked.keys().copied()
    }

    /// Starts counting a container: `cgroup_v2_dir` is its cgroup directory in the v2
    /// hierarchy; its id (the directory's inode) is the key for [`Self::counters`]. Tracking an
    /// already tracked cgroup keeps its counts. Returns the cgroup id.
    pub fn track(&mut self, cgroup_v2_dir: &Path) -> Result<u64, BpfError> {
        self.track_seeded(cgroup_v2_dir, Counters::default())
    }

    /// [`Self::track`], starting a newly tracked container's counters at `seed` (what the file
    /// readers counted before the programs were attached), so both collectors report the same
    /// cumulative figures. A container already tracked (also through pins) keeps its counts.
    pub fn track_seeded(&mut self, cgroup_v2_dir: &Path, seed: Counters) -> Result<u64, BpfError> {
        let cg = sys::cgroup_dir(cgroup_v2_dir).map_err(|source| BpfError::Cgroup {
            path: cgroup_v2_dir.to_path_buf(),
            source,
        })?;
        if cg.level >= MAX_TRACKED_LEVEL {
            return Err(BpfError::TooDeep {
                path: cg.path,
                level: cg.level,
                max: MAX_TRACKED_LEVEL - 1,
            });
        }
        let pins_ok = ["ingress", "egress"]
            .iter()
            .all(|d| PinnedLink::from_pin(skb_link_path(&self.pin_dir, cg.id, d)).is_ok());
        if self.tracked.contains_key(&cg.id) && pins_ok {
            return Ok(cg.id);
        }
        let used: BTreeSet<u32> = self.tracked.values().map(|t| t.slot).collect();
        let slot = (0..MAX_CONTAINERS)
            .find(|s| !used.contains(s))
            .ok_or(BpfError::Full(MAX_CONTAINERS))?;
        let entry = TrackedCgroup {
            slot: self.tracked.get(&cg.id).map_or(slot, |t| t.slot),
            level: cg.level,
        };
        if !self.tracked.contains_key(&cg.id) {
            self.seed_slot(entry.slot, seed)?;
        }
        self.tracked_map()?
            .insert(cg.id, entry, 0)
            .map_err(map_err(MAP_TRACKED))?;
        self.tracked.insert(cg.id, entry);
        self.write_levels()?;
        if let Err(e) = self.attach_skb(&cg) {
            let _ = self.untrack(cg.id);
            return Err(e);
        }
        debug!(cgroup = %cg.path.display(), id = cg.id, level = cg.level, slot = entry.slot, "tracking");
        Ok(cg.id)
    }

    fn attach_skb(&mut self, cg: &sys::CgroupDir) -> Result<(), BpfError> {
        let file = std::fs::File::open(&cg.path).map_err(|source| BpfError::Cgroup {
            path: cg.path.clone(),
            source,
        })?;
        for (name, dir, ty) in [
            (PROG_SKB_INGRESS, "ingress", CgroupSkbAttachType::Ingress),
            (PROG_SKB_EGRESS, "egress", CgroupSkbAttachType::Egress),
        ] {
            let pin = skb_link_path(&self.pin_dir, cg.id, dir);
            if PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            let _ = std::fs::remove_file(&pin);
            let what = format!("{name} to {}", cg.path.display());
            let attach_err = |e: &dyn std::error::Error| BpfError::Attach {
                what: what.clone(),
                reason: reason(e),
            };
            let prog: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
            let id = prog
                .attach(file.as_fd(), ty, CgroupAttachMode::Single)
                .map_err(|e| attach_err(&e))?;
            let link = prog.take_link(id).map_err(|e| attach_err(&e))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?;
            fd.pin(&pin).map_err(|e| BpfError::Pin {
                path: pin.clone(),
                reason: reason(&e),
            })?;
        }
        Ok(())
    }

    /// Stops counting a container: detaches its programs and deletes its map entries. An
    /// unknown id is not an error.
    pub fn untrack(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        let mut first_err = None;
        for dir in ["ingress", "egress"] {
            let pin = skb_link_path(&self.pin_dir, cgroup_id, dir);
            match PinnedLink::from_pin(&pin) {
                // Dropping the last reference to the link detaches the program.
                Ok(link) => {
                    if let Err(e) = link.unpin() {
                        first_err.get_or_insert(BpfError::Pin {
                            path: pin,
                            reason: e.to_string(),
                        });
                    }
                }
                Err(_) => {
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        match self.tracked_map()?.remove(&cgroup_id) {
            Ok(()) => {}
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => {
                first_err.get_or_insert(map_err(MAP_TRACKED)(e));
            }
        }
        self.tracked.remove(&cgroup_id);
        self.values.remove(&cgroup_id);
        self.write_levels()?;
        first_err.map_or(Ok(()), Err)
    }

    /// Untracks every tracked container whose id is not in `keep` (containers that stopped,
    /// also while no agent ran). Returns the errors, per id, of those that failed.
    pub fn retain(&mut self, keep: &std::collections::HashSet<u64>) -> Vec<(u64, BpfError)> {
        let gone: Vec<u64> = self.tracked_ids().filter(|id| !keep.contains(id)).collect();
        gone.into_iter()
            .filter_map(|id| self.untrack(id).err().map(|e| (id, e)))
            .collect()
    }

    /// Reads all counters, in one batched map read where the kernel supports it.
    pub fn refresh(&mut self) -> Result<(), BpfError> {
        self.values.clear();
        let Some(max_slot) = self.tracked.values().map(|t| t.slot).max() else {
            return Ok(());
        };
        let count = max_slot + 1;
        let value_size = std::mem::size_of::<Counters>();
        let stride = value_size.div_ceil(8) * 8;
        let batch = match self.map(MAP_COUNTERS)? {
            Map::PerCpuArray(data) if self.batched != Some(false) => {
                match sys::percpu_array_lookup_batch(
                    data.fd().as_fd(),
                    count,
                    value_size,
                    self.ncpus,
                ) {
                    Ok(raw) => Some(raw),
                    Err(e) => {
                        debug!(error = %e, "batched map read refused: reading per container");
                        None
                    }
                }
            }
            _ => None,
        };
        self.batched = Some(batch.is_some());
        let per_slot = stride * self.ncpus;
        match batch {
            Some(raw) if raw.len() >= per_slot * count as usize => {
                for (id, t) in &self.tracked {
                    let base = t.slot as usize * per_slot;
                    let mut sum = Counters::default();
                    for cpu in 0..self.ncpus {
                        let off = base + cpu * stride;
                        sum.add(&counters_from_bytes(&raw[off..off + value_size]));
                    }
                    self.values.insert(*id, sum);
                }
            }
            _ => {
                // Older kernels without batched array reads: one read per container.
                let counters: PerCpuArray<&MapData, Counters> =
                    PerCpuArray::try_from(self.map(MAP_COUNTERS)?)
                        .map_err(map_err(MAP_COUNTERS))?;
                let mut values = HashMap::new();
                for (id, t) in &self.tracked {
                    let per_cpu = counters.get(&t.slot, 0).map_err(map_err(MAP_COUNTERS))?;
                    let mut sum = Counters::default();
                    for c in per_cpu.iter() {
                        sum.add(c);
                    }
                    values.insert(*id, sum);
                }
                self.values = values;
            }
        }
        Ok(())
    }

    /// Whether the last [`Self::refresh`] read all counters with batched map reads.
    pub fn last_refresh_batched(&self) -> bool {
        self.batched == Some(true)
    }

    /// Cumulative counters of a tracked container as of the last [`Self::refresh`].
    pub fn counters(&self, cgroup_id: u64) -> Option<Counters> {
        self.values.get(&cgroup_id).copied()
    }

    /// Runs a `cgroup_skb` program once over `frame` with `BPF_PROG_TEST_RUN` (self-test and
    /// tests): the packet's socket is in the calling process's cgroup, its device is `ifindex`.
    pub fn test_run_skb(&self, egress: bool, frame: &[u8], ifindex: u32) -> Result<u32, BpfError> {
        let name = if egress {
            PROG_SKB_EGRESS
        } else {
            PROG_SKB_INGRESS
        };
        let prog: &CgroupSkb = self
            .ebpf
            .program(name)
            .ok_or(BpfError::Program {
                program: name,
                reason: "missing from the object".into(),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| BpfError::Program {
                program: name,
                reason: reason(&e),
            })?;
        let fd = prog.fd().map_err(|e| BpfError::Program {
            program: name,
            reason: reason(&e),
        })?;
        sys::test_run_skb(fd.as_fd(), frame, ifindex).map_err(|source| BpfError::Io {
            what: format!("BPF_PROG_TEST_RUN of {name}"),
            source,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

fn counters_from_bytes(b: &[u8]) -> Counters {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        if let Some(s) = b.get(i * 8..i * 8 + 8) {
            w.copy_from_slice(s);
        }
        u64::from_ne_bytes(w)
    };
    Counters {
        net_rx: word(0),
        net_tx: word(1),
        io_read: word(2),
        io_write: word(3),
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Program {
            program: name,
            reason: "missing from the object".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| BpfError::Program {
            program: name,
            reason: reason(&e),
        })
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> BpfError {
    move |e| BpfError::Map {
        map: name,
        reason: reason(&e),
    }
}
