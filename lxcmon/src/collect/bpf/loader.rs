//! Loading: bpffs and tracefs mounted, the embedded object loaded with its globals (the
//! `block_bio_queue` record offsets from tracefs, kernel struct offsets from BTF), the pin
//! directory locked, earlier pins reused.

use super::block::IoMode;
use super::error::{map_err, BpfError};
use super::latency::LatencyMode;
use super::net::{self, SkbSlot};
use super::pins::{Links, Loaded, PinLock};
use super::{btf, format, iolat, latency, retrans, sys, BpfCollector, BpfOptions, BPF_FS, TRACEFS};
use crate::logging::Chain;
use aya::maps::{Array, Map, MapData};
use aya::programs::links::FdLink;
use aya::programs::BtfTracePoint;
use aya::programs::{Program, ProgramError};
use aya::{Ebpf, EbpfLoader};
use lxcmon_common::{
    KernelOffsets, FOLIO_NR_ORDER_BYTE, FOLIO_NR_PAGES_U32, GLOBAL_BIO_DEV_OFF,
    GLOBAL_BIO_NR_SECTOR_OFF, GLOBAL_BIO_RWBS_OFF, GLOBAL_BLK_OFFSETS, GLOBAL_KERNEL_OFFSETS,
    GLOBAL_SCHED_OFFSETS, GLOBAL_TCP_OFFSETS, MAP_BPF_LOG, MAP_SKB_SLOT,
};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The BPF object built by `cargo xtask build-ebpf`; `build.rs` checks that it matches the
/// sources and gives its path.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LXCMON_BPF_OBJECT"));

pub(crate) const TP_CATEGORY: &str = "block";
pub(crate) const TP_NAME: &str = "block_bio_queue";

impl BpfCollector {
    /// Mounts bpffs and tracefs when absent, locks the pin directory, loads the programs
    /// (reusing pinned maps), attaches the block programs (or keeps the pinned attachments of
    /// an earlier agent), and restores the set of tracked containers from the pinned map.
    pub fn load(opts: &BpfOptions) -> Result<Self, BpfError> {
        let mount_err = |fstype, path: &str| {
            let path = PathBuf::from(path);
            move |source| BpfError::Mount {
                fstype,
                path,
                source,
            }
        };
        sys::ensure_mounted("bpf", Path::new(BPF_FS), sys::BPF_FS_MAGIC)
            .map_err(mount_err("bpf", BPF_FS))?;
        let tracefs = Path::new(TRACEFS);
        sys::ensure_mounted("tracefs", tracefs, sys::TRACEFS_MAGIC)
            .map_err(mount_err("tracefs", TRACEFS))?;

        // Ephemeral: maps declared as pinned are pinned by aya; pin them in a directory of
        // this process and unpin them right after loading (the descriptors keep them).
        let (lock, map_dir) = if opts.ephemeral {
            let dir = Path::new(BPF_FS).join(format!("lxcmon-once-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|source| BpfError::PinDir {
                path: dir.clone(),
                source,
            })?;
            (None, dir)
        } else {
            drop_stale_pins(&opts.pin_dir)?;
            (Some(PinLock::acquire(&opts.pin_dir)?), opts.pin_dir.clone())
        };
        let links = if opts.ephemeral {
            Links::Held(HashMap::new())
        } else {
            let dir = opts.pin_dir.join("links");
            std::fs::create_dir_all(&dir).map_err(|source| BpfError::PinDir {
                path: dir.clone(),
                source,
            })?;
            Links::pinned(dir)
        };

        let (dev_off, nr_off, rwbs_off) = bio_queue_offsets(tracefs)?;
        let btf = btf::Btf::from_sys_fs().map_err(|e| {
            format!(
                "reading /sys/kernel/btf/vmlinux: {}",
                crate::logging::Chain(&e)
            )
        });
        let koff = if opts.count_dirtied {
            btf.as_ref().map_err(Clone::clone).and_then(kernel_offsets)
        } else {
            Err("disabled by configuration".to_string())
        };
        let koff_value = koff.clone().unwrap_or_default();
        let sched = btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(latency::sched_offsets);
        let sched_value = sched.clone().unwrap_or_default();
        let blk = btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(iolat::blk_offsets);
        let blk_value = blk.clone().unwrap_or_default();
        let tcp = btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|b| retrans::tcp_offsets(b, tracefs));
        let tcp_value = tcp.clone().unwrap_or_default();
        drop(btf);
        let load = |standin: Option<&Path>| {
            let mut loader = EbpfLoader::new();
            loader
                .default_map_pin_directory(&map_dir)
                // aya-log's ring buffer is not pinned by its definition: pinned here, so an agent
                // that adopts an earlier one's links reads the log of the programs they run.
                .map_pin_path(MAP_BPF_LOG, map_dir.join(MAP_BPF_LOG))
                .override_global(GLOBAL_BIO_DEV_OFF, &dev_off, true)
                .override_global(GLOBAL_BIO_NR_SECTOR_OFF, &nr_off, true)
                .override_global(GLOBAL_BIO_RWBS_OFF, &rwbs_off, true)
                .override_global(GLOBAL_KERNEL_OFFSETS, &koff_value, true)
                .override_global(GLOBAL_SCHED_OFFSETS, &sched_value, true)
                .override_global(GLOBAL_BLK_OFFSETS, &blk_value, true)
                .override_global(GLOBAL_TCP_OFFSETS, &tcp_value, true);
            if let Some(path) = standin {
                loader.map_pin_path(MAP_SKB_SLOT, path);
            }
            loader.load(OBJECT)
        };
        let mut skb_slot = if opts.skb_storage {
            SkbSlot::Storage
        } else {
            SkbSlot::Walk("disabled by the collector's options".to_string())
        };
        // A kernel that refuses cgroup storage keyed by the cgroup id alone (before 5.9): the
        // rest loads with a stand-in map in its place, and the walk-only network pair is used.
        let loaded = match load(None) {
            Err(aya::EbpfError::MapError(aya::maps::MapError::CreateError { name, io_error }))
                if name == MAP_SKB_SLOT =>
            {
                skb_slot = SkbSlot::Walk(format!(
                    "the kernel refused a cgroup storage map keyed by the cgroup id \
                     (Linux 5.9+): {io_error}"
                ));
                // bpffs refuses names with a dot.
                let standin = map_dir.join("lxcmon-skb-slot-standin");
                let _ = std::fs::remove_file(&standin);
                sys::pin_standin_map(&standin).map_err(|source| BpfError::PinDir {
                    path: standin.clone(),
                    source,
                })?;
                let loaded = load(Some(&standin));
                let _ = std::fs::remove_file(&standin);
                loaded
            }
            other => other,
        };
        if opts.ephemeral {
            let _ = std::fs::remove_dir_all(&map_dir);
        }
        let mut ebpf = loaded.map_err(BpfError::Load)?;
        let skb_slot = net::load_skb(&mut ebpf, skb_slot)?;

        let ncpus =
            aya::util::nr_cpus().map_err(|(what, source)| BpfError::Cpus { what, source })?;
        let mut this = Self {
            ebpf,
            pin_dir: (!opts.ephemeral).then(|| opts.pin_dir.clone()),
            links,
            _lock: lock,
            tracked: HashMap::new(),
            values: HashMap::new(),
            ncpus,
            io_mode: IoMode::Files(String::new()),
            network: opts.network,
            skb_slot,
            batched: None,
            batch: sys::BatchBuf::default(),
            latency: latency::LatencyState::new(sched.map(drop), blk.map(|b| b.old_args == 1)),
            retrans: retrans::RetransState::new(tcp.map(drop)),
            log: None,
        };
        this.log = super::bpflog::init(&mut this.ebpf);
        this.io_mode = this.attach_block(koff.map(drop));
        this.set_runqueue(opts.runqueue);
        this.set_io_latency(opts.io_latency);
        this.set_tcp_retransmits(opts.tcp_retransmits);
        this.set_excluded_devices(&opts.excluded_devices)?;
        this.restore_tracked()?;
        info!(
            pin_dir = ?this.pin_dir,
            tracked = this.tracked.len(),
            io_mode = ?this.io_mode,
            runqueue = ?this.latency.mode,
            io_latency = ?this.latency.io.mode,
            tcp_retransmits = ?this.retrans.mode,
            skb_slot = ?this.skb_slot,
            "BPF collector loaded"
        );
        Ok(this)
    }

    pub(crate) fn map(&self, name: &'static str) -> Result<&Map, BpfError> {
        self.ebpf.map(name).ok_or(BpfError::MissingMap(name))
    }

    pub(crate) fn map_mut(&mut self, name: &'static str) -> Result<&mut Map, BpfError> {
        self.ebpf.map_mut(name).ok_or(BpfError::MissingMap(name))
    }

    /// Makes the `u64` array map `name` hold `want` (element i at key i): reads the current
    /// entries in one batched lookup (a plain array reads as a per-CPU one of one CPU; one
    /// lookup per entry where the kernel refuses batches) and writes only what differs, so a
    /// direct-mapped index is rewritten without a window where a kept entry reads 0.
    pub(crate) fn sync_array(&mut self, name: &'static str, want: &[u64]) -> Result<(), BpfError> {
        let count = u32::try_from(want.len()).unwrap_or(u32::MAX);
        // Rare (start-up, an index entry changing): a buffer of its own.
        let mut buf = sys::BatchBuf::default();
        let mut batch = Vec::with_capacity(want.len());
        if let Map::Array(data) = self.map(name)? {
            let read = buf.percpu_array_for_each(data.fd().as_fd(), count, 8, 1, |_, raw| {
                batch.extend(
                    raw.chunks_exact(8)
                        .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default())),
                );
            });
            if read.is_err() {
                batch.clear();
            }
        }
        let current = |pos: usize| batch.get(pos).copied();
        let mut array: Array<&mut MapData, u64> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (pos, &value) in (0u32..count).zip(want) {
            let now = match current(pos as usize) {
                Some(v) => v,
                None => array.get(&pos, 0).map_err(map_err(name))?,
            };
            if now != value {
                array.set(pos, value, 0).map_err(map_err(name))?;
            }
        }
        Ok(())
    }
}

/// A program of the object, as its type.
pub(crate) fn program<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, BpfError>
where
    &'a T: TryFrom<&'a Program, Error = ProgramError>,
{
    ebpf.program(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| BpfError::Program {
            program: name,
            source,
        })
}

/// Starts the pin directory afresh when a map pinned there is not defined as this object
/// defines it (a layout changed without a new `PIN_LAYOUT_VERSION`): aya would reuse it as it
/// is, and the programs would be refused or the agent would misread it. The containers are then
/// tracked anew from the file readers' counts, as on a first start.
fn drop_stale_pins(pin_dir: &Path) -> Result<(), BpfError> {
    let stale = stale_pinned_maps(OBJECT, pin_dir);
    if stale.is_empty() {
        return Ok(());
    }
    warn!(
        pin_dir = %pin_dir.display(),
        maps = %stale.join("; "),
        "pinned BPF maps of another layout: starting the pins afresh (counts go on from the file readers')"
    );
    super::pins::cleanup_pinned(pin_dir).map(drop)
}

/// The maps pinned in `map_dir` whose type, flags, key size, value size or entry count differ
/// from the object's definition, each described. (A map of another type with the same sizes
/// loads: a per-CPU array read as a plain one would give wrong counts, not an error.) An
/// object that does not parse is the loader's to report: nothing here.
fn stale_pinned_maps(object: &[u8], map_dir: &Path) -> Vec<String> {
    let Ok(obj) = aya_obj::Object::parse(object) else {
        return Vec::new();
    };
    let mut stale: Vec<String> = obj
        .maps
        .iter()
        // The slot storage is left out: a map of another kind there makes the kernel refuse
        // the programs that read it, and the walk-only pair counts instead (its own fallback).
        .filter(|(name, def)| {
            (matches!(def.pinning(), aya_obj::maps::PinningType::ByName)
                || name.as_str() == MAP_BPF_LOG)
                && name.as_str() != MAP_SKB_SLOT
        })
        .filter_map(|(name, def)| {
            let info = aya::maps::MapInfo::from_pin(map_dir.join(name)).ok()?;
            // An unknown type reads as `Unspecified` (0), which no definition has.
            let kind = info.map_type().map_or(0, |t| t as u32);
            let pinned = (
                kind,
                info.map_flags(),
                info.key_size(),
                info.value_size(),
                info.max_entries(),
            );
            let ours = (
                def.map_type(),
                def.map_flags(),
                def.key_size(),
                def.value_size(),
                def.max_entries(),
            );
            (pinned != ours).then(|| {
                let show = |(t, f, k, v, n): (u32, u32, u32, u32, u32)| {
                    format!("type {t}, flags {f:#x}, key {k} B, value {v} B, {n} entries")
                };
                format!(
                    "{name} (pinned: {}; this agent's: {})",
                    show(pinned),
                    show(ours)
                )
            })
        })
        .collect();
    stale.sort();
    stale
}

/// A loaded program's id and tag; `None` when it is not loaded or its info is unreadable.
pub(crate) fn loaded(ebpf: &Ebpf, name: &str) -> Option<Loaded> {
    let info = ebpf.program(name)?.info().ok()?;
    Some(Loaded {
        id: info.id(),
        tag: info.tag(),
    })
}

/// A program of the object, as its type, for loading and attaching.
pub(crate) fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| BpfError::Program {
            program: name,
            source,
        })
}

/// One BTF tracepoint program of a set: its name in the object, the tracepoint, and the name
/// its link is pinned under.
pub(crate) type TpBtf<'a> = (&'static str, &'static str, &'a str);

impl BpfCollector {
    /// Loads every program of a set (once per object), then attaches each in the set's order
    /// under its link name, keeping a link an earlier agent pinned. The error names the step
    /// that failed; the caller detaches the set ([`Self::detach_links`]).
    pub(crate) fn attach_tp_btf(&mut self, set: &[TpBtf<'_>]) -> Result<(), String> {
        let btf = aya::Btf::from_sys_fs().map_err(|e| format!("kernel BTF: {}", Chain(&e)))?;
        for &(name, tp, _) in set {
            let prog: &mut BtfTracePoint =
                program_mut(&mut self.ebpf, name).map_err(|e| Chain(&e).to_string())?;
            if prog.fd().is_err() {
                prog.load(tp, &btf)
                    .map_err(|e| format!("loading {name} for tp_btf/{tp}: {}", Chain(&e)))?;
            }
        }
        for &(name, _, link) in set {
            if self.links.holds(link, loaded(&self.ebpf, name)) {
                continue;
            }
            let prog: &mut BtfTracePoint =
                program_mut(&mut self.ebpf, name).map_err(|e| Chain(&e).to_string())?;
            let fail =
                |e: &(dyn std::error::Error + 'static)| format!("attaching {name}: {}", Chain(e));
            let id = prog.attach().map_err(|e| fail(&e))?;
            let fd: FdLink = prog.take_link(id).map_err(|e| fail(&e))?.into();
            self.links
                .put(link, fd)
                .map_err(|e| format!("pinning {link}: {}", Chain(e.as_ref())))?;
        }
        Ok(())
    }

    /// Detaches (and unpins) the named links; a missing one is not an error.
    pub(crate) fn detach_links<'a>(&mut self, links: impl IntoIterator<Item = &'a str>) {
        for link in links {
            let _ = self.links.remove(link);
        }
    }

    /// A latency family switched on (attached by `attach` when its offsets resolved) or off:
    /// its new mode. A refusal detaches `links` and is the reason; the rest goes on.
    pub(crate) fn switch_family(
        &mut self,
        on: bool,
        config_key: &str,
        offsets: Result<(), String>,
        links: &[&str],
        attach: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> LatencyMode {
        let why = if on {
            match offsets.and_then(|()| attach(self)) {
                Ok(()) => return LatencyMode::Counting,
                Err(why) => why,
            }
        } else {
            format!("disabled by configuration ({config_key})")
        };
        self.detach_links(links.iter().copied());
        LatencyMode::Off(why)
    }
}

/// Reads the record offsets of `block/block_bio_queue` from tracefs.
fn bio_queue_offsets(tracefs: &Path) -> Result<(u32, u32, u32), BpfError> {
    let path = tracefs
        .join("events")
        .join(TP_CATEGORY)
        .join(TP_NAME)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| BpfError::TraceFormat {
        path: path.clone(),
        source,
    })?;
    let fields = format::parse_format(&text);
    let get = |name: &str, size: u32| {
        fields
            .get(name)
            .filter(|f| f.size == size || (name == "rwbs" && f.size >= size))
            .map(|f| f.offset)
            .ok_or_else(|| BpfError::TraceField {
                path: path.clone(),
                reason: format!("no field `{name}` of {size} bytes"),
            })
    };
    Ok((get("dev", 4)?, get("nr_sector", 4)?, get("rwbs", 2)?))
}

/// Resolves the struct offsets the BTF programs need from the running kernel's BTF. The error
/// is the reason the dirtied-bytes mode is not used.
fn kernel_offsets(btf: &btf::Btf) -> Result<KernelOffsets, String> {
    let m = |s: &str, f: &str| btf.member_offset(s, f).map_err(|e| e.to_string());
    // `folio_nr_pages`: `_nr_pages` (6.15+), `_folio_nr_pages` (5.18-6.14), else the order byte
    // at the start of `_flags_1`.
    let (folio_nr, folio_nr_mode) =
        match m("folio", "_nr_pages").or_else(|_| m("folio", "_folio_nr_pages")) {
            Ok(off) => (off, FOLIO_NR_PAGES_U32),
            Err(_) => (m("folio", "_flags_1")?, FOLIO_NR_ORDER_BYTE),
        };
    let pg_head = btf
        .enum_value("pageflags", "PG_head")
        .map_err(|e| e.to_string())?;
    Ok(KernelOffsets {
        enabled: 1,
        page_size: u32::try_from(rustix::param::page_size())
            .map_err(|_| "bad page size".to_string())?,
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
