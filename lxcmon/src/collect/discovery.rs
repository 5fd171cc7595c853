//! Finding the running containers from the cgroup tree: no `pct`, no `lxc-ls`, no process.
//!
//! A running container has a cgroup; a stopped one has none. Layouts:
//! - plain LXC 4/5, Incus/LXD: `lxc.payload.<name>` at the hierarchy's top;
//! - Proxmox VE (and LXC 3): `lxc/<vmid>`, processes below `lxc/<vmid>/ns/` on VE 7/8.
//!
//! Monitor cgroups (`lxc.monitor.<name>`, `lxc.monitor/<vmid>`) hold no container.
//!
//! Incus and LXD run their containers through liblxc, so their cgroups are plain LXC's; what
//! tells them apart is the daemon's own directory for the instance
//! (`/var/lib/incus/containers/<cgroup name>`, LXD's under `/var/lib/lxd` or the snap's). They
//! name a container of project `p2` `p2_peer3` (an instance name cannot contain `_`): its id
//! stays `p2_peer3` (unique across projects), its name is `peer3`, its project `p2`.
//!
//! LXC names a container's cgroup `lxc.payload.<name>-1` (`-2`, …) when `<name>`'s is taken:
//! left behind, empty, by a container whose monitor was killed, or held by another runtime's
//! container of the same name. Such a container is exported under its own name, which its
//! monitor process carries (`[lxc monitor] <lxcpath> <name>`), and the empty cgroup it shadows
//! is no container; when the name is held by a running container, the cgroup's name stays
//! the id (two containers cannot share one).
//!
//! A cgroup name that is not valid UTF-8 (LXC accepts any bytes but `/`) is still a running
//! container: it is exported under an id with each invalid byte written `\xNN` (one warning
//! per container), and read through its real path.

use crate::readers::{kfile, procfs};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Proxmox,
    Lxc,
}

/// What runs the container, for the info series and dashboards' joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Proxmox,
    Lxc,
    Incus,
    Lxd,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Proxmox => "proxmox",
            Self::Lxc => "lxc",
            Self::Incus => "incus",
            Self::Lxd => "lxd",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// VMID on Proxmox, the container name on plain LXC.
    pub id: String,
    /// Proxmox `hostname:`; the name elsewhere.
    pub name: String,
    /// The container's cgroup below each hierarchy's root.
    pub rel: PathBuf,
    pub flavor: Flavor,
    pub runtime: Runtime,
    /// The Incus/LXD project, for containers outside the default one.
    pub project: Option<String>,
    /// Which instance of the container this is: the inode of its cgroup directory in the
    /// scanned hierarchy (the cgroup id on v2). A container restarted under the same id has a
    /// new one, and its figures start afresh.
    pub instance: u64,
}

#[cfg(test)]
impl Discovered {
    /// A plain LXC container `id` in `lxc.payload.<id>`, for tests of the later stages.
    pub(crate) fn lxc(id: &str, instance: u64) -> Self {
        Self {
            id: id.into(),
            name: id.into(),
            rel: format!("lxc.payload.{id}").into(),
            flavor: Flavor::Lxc,
            runtime: Runtime::Lxc,
            project: None,
            instance,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot list containers in {dir}")]
pub struct DiscoveryError {
    dir: PathBuf,
    source: std::io::Error,
}

#[derive(Debug)]
pub struct Discovery {
    root: PathBuf,
    hierarchy: PathBuf,
    /// Name, runtime and project, found once per container appearance (keyed by id).
    idents: HashMap<String, Identity>,
    /// Containers already warned about for a non-UTF-8 cgroup name.
    warned: HashSet<String>,
    /// Cgroup names already logged for a monitor's claim to another name.
    claims_logged: HashSet<String>,
}

impl Discovery {
    /// Scans `hierarchy` (the mount the figures come from); names come from `root/etc/pve`.
    pub fn new(root: &Path, hierarchy: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            hierarchy: hierarchy.to_path_buf(),
            idents: HashMap::new(),
            warned: HashSet::new(),
            claims_logged: HashSet::new(),
        }
    }

    pub fn scan(&mut self) -> Result<Vec<Discovered>, DiscoveryError> {
        let mut found = Vec::new();
        let top = std::fs::read_dir(&self.hierarchy).map_err(|source| DiscoveryError {
            dir: self.hierarchy.clone(),
            source,
        })?;
        for entry in top.flatten() {
            if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = entry.file_name();
            let bytes = name.as_bytes();
            if let Some(id) = bytes.strip_prefix(b"lxc.payload.") {
                let id = self.id_of(id);
                found.push((id, PathBuf::from(&name), Flavor::Lxc, entry.ino()));
            } else if bytes == b"lxc" || bytes == b"lxc.payload" {
                for child in std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let child_name = child.file_name();
                    let raw = child_name.as_bytes();
                    if !child.file_type().map(|t| t.is_dir()).unwrap_or(false)
                        || raw.starts_with(b"lxc.monitor")
                        || raw.starts_with(b"lxc.pivot")
                    {
                        continue;
                    }
                    let id = self.id_of(raw);
                    let flavor = if bytes == b"lxc" && self.pve_conf(&id).exists() {
                        Flavor::Proxmox
                    } else {
                        Flavor::Lxc
                    };
                    found.push((id, Path::new(&name).join(&child_name), flavor, child.ino()));
                }
            }
        }
        let ids: HashSet<&str> = found.iter().map(|f| f.0.as_str()).collect();
        self.idents.retain(|id, _| ids.contains(id.as_str()));
        self.warned.retain(|id| ids.contains(id.as_str()));
        self.claims_logged.retain(|id| ids.contains(id.as_str()));
        // Containers whose monitor gives another id than their cgroup's name, with that id.
        let mut claims = Vec::new();
        let mut list: Vec<Discovered> = (found.into_iter().enumerate())
            .map(|(i, (id, rel, flavor, instance))| {
                let ident = match self.idents.get(&id) {
                    Some(known) if known.instance == instance => known,
                    _ => {
                        let found = self.identify(&id, &rel, flavor, instance);
                        self.idents.insert(id.clone(), found);
                        &self.idents[&id]
                    }
                };
                if let Some(claim) = &ident.claim {
                    claims.push((i, claim.clone()));
                }
                Discovered {
                    name: ident.name.clone(),
                    runtime: ident.runtime,
                    project: ident.project.clone(),
                    id,
                    rel,
                    flavor,
                    instance,
                }
            })
            .collect();
        if !claims.is_empty() {
            self.settle_claims(&mut list, &claims);
        }
        list.sort_by(|a, b| id_order(&a.id, &b.id));
        Ok(list)
    }

    /// Gives each container whose monitor names it otherwise than its cgroup (see the
    /// module's doc) that name as its id, unless a running container holds it: an empty
    /// cgroup that holds it is left out, as no container.
    fn settle_claims(&mut self, list: &mut Vec<Discovered>, claims: &[(usize, String)]) {
        let mut renamed = Vec::new();
        let mut shadowed = HashSet::new();
        for (i, claim) in claims {
            let (i, claim) = (*i, claim.as_str());
            let rival = claims.iter().filter(|(_, c)| *c == claim).count() > 1;
            let holder = list.iter().position(|d| d.id == claim);
            let stale = holder.filter(|&h| self.walk(&list[h].rel) == Walk::Empty);
            let (cgroup, holder_rel) = (&list[i].rel, holder.map(|h| &list[h].rel));
            if rival || (holder.is_some() && stale.is_none()) {
                if self.claims_logged.insert(list[i].id.clone()) {
                    tracing::warn!(
                        container = claim,
                        cgroup = %cgroup.display(),
                        "two running containers are named alike: this one is exported under its cgroup's name"
                    );
                }
                continue;
            }
            if self.claims_logged.insert(list[i].id.clone()) {
                tracing::info!(
                    container = claim,
                    cgroup = %cgroup.display(),
                    left_over = ?holder_rel.map(|r| r.display()),
                    "LXC gave this container a suffixed cgroup name (its own was taken by an empty cgroup left over from an earlier run): exported under its own name"
                );
            }
            shadowed.extend(stale);
            renamed.push((i, claim.to_string()));
        }
        for (i, claim) in renamed {
            list[i].id = claim;
        }
        let mut i = 0;
        list.retain(|_| {
            i += 1;
            !shadowed.contains(&(i - 1))
        });
    }

    /// A process of the cgroup `rel` or of one below it, looked for breadth first in at
    /// most [`MAX_WALK`] directories.
    fn walk(&self, rel: &Path) -> Walk {
        let mut dirs = std::collections::VecDeque::from([self.hierarchy.join(rel)]);
        let mut seen = 0;
        while let Some(dir) = dirs.pop_front() {
            seen += 1;
            if seen > MAX_WALK {
                return Walk::TooBig;
            }
            if let Ok(procs) = kfile::read_to_string(&dir.join("cgroup.procs")) {
                if let Some(pid) = procs.split_whitespace().find_map(|p| p.parse().ok()) {
                    return Walk::Found(pid);
                }
            }
            let children = std::fs::read_dir(&dir).into_iter().flatten().flatten();
            dirs.extend(
                children
                    .filter(|c| c.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|c| c.path()),
            );
        }
        Walk::Empty
    }

    /// The lxcpath and name the LXC monitor of the container in `rel` gives it: the
    /// monitor is the parent of the container's init, an ancestor of each of its processes.
    fn monitor_of(&self, rel: &Path) -> Option<(Vec<u8>, Vec<u8>)> {
        let Walk::Found(mut pid) = self.walk(rel) else {
            return None;
        };
        for _ in 0..MAX_ANCESTORS {
            let proc = kfile::under(&self.root, &format!("/proc/{pid}"));
            if let Ok(cmdline) = std::fs::read(proc.join("cmdline")) {
                if let Some((path, name)) = procfs::parse_lxc_monitor(&cmdline) {
                    return Some((path.to_vec(), name.to_vec()));
                }
            }
            pid = procfs::parse_ppid(&kfile::read_to_string(&proc.join("stat")).ok()?)?;
            if pid <= 1 {
                return None;
            }
        }
        None
    }

    /// The container id of a cgroup name; invalid UTF-8 is escaped (warned once).
    fn id_of(&mut self, raw: &[u8]) -> String {
        let (id, escaped) = escape_invalid(raw);
        if escaped && self.warned.insert(id.clone()) {
            tracing::warn!(
                container = %id,
                cgroup = ?OsStr::from_bytes(raw),
                "container name is not valid UTF-8: exported with its invalid bytes as \\xNN"
            );
        }
        id
    }

    fn pve_conf(&self, vmid: &str) -> PathBuf {
        kfile::under(&self.root, &format!("/etc/pve/lxc/{vmid}.conf"))
    }

    /// Name, runtime and project of a container that just appeared (or restarted): Proxmox
    /// from its config, Incus/LXD from their instance directory, else plain LXC. A suffixed
    /// cgroup name (`<name>-<n>`) is checked against the container's monitor.
    fn identify(&self, id: &str, rel: &Path, flavor: Flavor, instance: u64) -> Identity {
        // The cgroup's own name (raw bytes: `id` may be escaped), without `lxc.payload.`.
        let cgroup_name = rel.file_name().map(OsStr::as_bytes).unwrap_or_default();
        let cgroup_name = cgroup_name
            .strip_prefix(b"lxc.payload.")
            .unwrap_or(cgroup_name);
        let monitor = (flavor == Flavor::Lxc && lxc_suffixed(cgroup_name))
            .then(|| self.monitor_of(rel))
            .flatten()
            .filter(|(_, name)| name.as_slice() != cgroup_name);
        let Some((lxcpath, raw)) = monitor else {
            return self.identify_as(id, cgroup_name, flavor, instance, None);
        };
        let claim = escape_invalid(&raw).0;
        let flavor = if self.pve_conf(&claim).exists() {
            Flavor::Proxmox
        } else {
            Flavor::Lxc
        };
        // The monitor's lxcpath tells the runtime: the daemons' own, else plain LXC.
        let lxcpath = Path::new(OsStr::from_bytes(&lxcpath));
        let runtime = INSTANCE_DIRS
            .iter()
            .find(|(dir, _)| Path::new(dir) == lxcpath)
            .map_or(Runtime::Lxc, |&(_, r)| r);
        let id = claim.clone();
        self.identify_as(&id, &raw, flavor, instance, Some((claim, runtime)))
    }

    /// [`Self::identify`] for the container whose id is `id` and cgroup name (without the
    /// prefix) `raw`; `claim` when its monitor gave the id, with the runtime its lxcpath is.
    fn identify_as(
        &self,
        id: &str,
        raw: &[u8],
        flavor: Flavor,
        instance: u64,
        claim: Option<(String, Runtime)>,
    ) -> Identity {
        let (claim, known_runtime) = claim.map_or((None, None), |(c, r)| (Some(c), Some(r)));
        let plain = |runtime| Identity {
            instance,
            name: id.to_string(),
            runtime,
            project: None,
            claim: claim.clone(),
        };
        if flavor == Flavor::Proxmox {
            let name = std::fs::read_to_string(self.pve_conf(id))
                .ok()
                .and_then(|conf| pve_hostname(&conf).map(str::to_string))
                .unwrap_or_else(|| id.to_string());
            return Identity {
                name,
                ..plain(Runtime::Proxmox)
            };
        }
        let raw = OsStr::from_bytes(raw);
        let runtime = known_runtime.or_else(|| {
            INSTANCE_DIRS
                .iter()
                .find(|(dir, _)| {
                    // Not followed: Incus's entry is a symlink into its storage pool, whose
                    // path is the daemon's and need not resolve under `root`.
                    std::fs::symlink_metadata(kfile::under(&self.root, dir).join(raw)).is_ok()
                })
                .map(|&(_, runtime)| runtime)
        });
        let Some(runtime) = runtime else {
            return plain(Runtime::Lxc);
        };
        match id.split_once('_') {
            Some((project, name)) if !project.is_empty() && !name.is_empty() => Identity {
                name: name.to_string(),
                project: Some(project.to_string()),
                ..plain(runtime)
            },
            _ => plain(runtime),
        }
    }
}

/// Where Incus and LXD keep a container's directory, named as its cgroup without
/// `lxc.payload.` (`<project>_<name>` outside the default project).
const INSTANCE_DIRS: &[(&str, Runtime)] = &[
    ("/var/lib/incus/containers", Runtime::Incus),
    ("/var/lib/lxd/containers", Runtime::Lxd),
    ("/var/snap/lxd/common/lxd/containers", Runtime::Lxd),
];

/// What discovery found out about one appearance of a container.
#[derive(Debug)]
struct Identity {
    instance: u64,
    name: String,
    runtime: Runtime,
    project: Option<String>,
    /// The id its monitor gives it, where that is not its cgroup's name.
    claim: Option<String>,
}

/// What [`Discovery::walk`] found in a cgroup's subtree.
#[derive(Debug, PartialEq, Eq)]
enum Walk {
    Found(u32),
    Empty,
    /// Too many directories to tell: taken as holding processes.
    TooBig,
}

/// Directories [`Discovery::walk`] looks through: a left-behind cgroup is small, a running
/// container's first process is found in the first few.
const MAX_WALK: usize = 256;
/// How far up from a container's process its monitor is looked for (init's parent).
const MAX_ANCESTORS: usize = 64;

/// Whether a cgroup name ends as LXC's suffix for a taken name does (`-<digits>`).
fn lxc_suffixed(name: &[u8]) -> bool {
    match name.iter().rposition(|&b| b == b'-') {
        Some(dash) => {
            let digits = &name[dash + 1..];
            dash > 0 && !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
        }
        None => false,
    }
}

/// The `hostname:` of the current configuration (snapshot sections `[name]` come after it).
pub fn pve_hostname(conf: &str) -> Option<&str> {
    conf.lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| l.strip_prefix("hostname:"))
        .map(str::trim)
        .filter(|h| !h.is_empty())
}

/// `raw` as text, each byte that is not part of valid UTF-8 written `\xNN`; whether any was.
fn escape_invalid(raw: &[u8]) -> (String, bool) {
    let mut out = String::with_capacity(raw.len());
    let mut escaped = false;
    for chunk in raw.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            escaped = true;
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    (out, escaped)
}

/// Numeric ids in numeric order (VMIDs), then names.
fn id_order(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkdirs(base: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
    }

    #[test]
    fn plain_lxc_layout_skips_monitors() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("sys/fs/cgroup/memory");
        mkdirs(
            &h,
            &[
                "lxc.payload.web",
                "lxc.payload.db/.lxc",
                "lxc.monitor.web",
                "lxc.monitor.db",
                "system.slice",
                "user.slice",
            ],
        );
        std::fs::write(h.join("lxc.payload.file"), "").unwrap();
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        let ids: Vec<_> = found
            .iter()
            .map(|d| (d.id.as_str(), d.name.as_str(), d.rel.to_str().unwrap()))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("db", "db", "lxc.payload.db"),
                ("web", "web", "lxc.payload.web")
            ]
        );
        assert!(found.iter().all(|d| d.flavor == Flavor::Lxc));
    }

    #[test]
    fn proxmox_layout_with_hostnames() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("sys/fs/cgroup");
        mkdirs(
            &h,
            &[
                "lxc/100/ns/init.scope",
                "lxc/1000/ns",
                "lxc/99/ns",
                "lxc.monitor/100",
                "lxc.monitor/99",
                "lxc.pivot",
                "qemu.slice/101.scope",
            ],
        );
        let pve = dir.path().join("etc/pve/lxc");
        std::fs::create_dir_all(&pve).unwrap();
        std::fs::write(
            pve.join("100.conf"),
            "arch: amd64\nhostname: web-1\nmemory: 512\n[snap]\nhostname: old\n",
        )
        .unwrap();
        std::fs::write(pve.join("99.conf"), "arch: amd64\n").unwrap();
        let mut discovery = Discovery::new(dir.path(), &h);
        let found = discovery.scan().unwrap();
        let got: Vec<_> = found
            .iter()
            .map(|d| (d.id.as_str(), d.name.as_str(), d.flavor))
            .collect();
        assert_eq!(
            got,
            vec![
                ("99", "99", Flavor::Proxmox),
                ("100", "web-1", Flavor::Proxmox),
                ("1000", "1000", Flavor::Lxc)
            ]
        );
        assert_eq!(found[1].rel, PathBuf::from("lxc/100"));

        // A container that stops disappears; one that starts appears with its name.
        std::fs::remove_dir_all(h.join("lxc/99")).unwrap();
        std::fs::create_dir_all(h.join("lxc/101/ns")).unwrap();
        std::fs::write(pve.join("101.conf"), "hostname: new-one\n").unwrap();
        let ids: Vec<_> = discovery
            .scan()
            .unwrap()
            .into_iter()
            .map(|d| (d.id, d.name))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("100".into(), "web-1".into()),
                ("101".into(), "new-one".into()),
                ("1000".into(), "1000".into())
            ]
        );
    }

    #[test]
    fn missing_hierarchy_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Discovery::new(dir.path(), &dir.path().join("nope"))
            .scan()
            .unwrap_err();
        assert!(err.to_string().contains("nope"));
    }

    #[test]
    fn instance_is_the_cgroup_directory_and_changes_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("cg");
        mkdirs(&h, &["lxc.payload.a"]);
        let mut d = Discovery::new(dir.path(), &h);
        let first = d.scan().unwrap()[0].instance;
        assert_eq!(
            d.scan().unwrap()[0].instance,
            first,
            "same cgroup, same instance"
        );
        // The new cgroup exists before the old one goes, as a real restart's never share ids.
        mkdirs(&h, &["new"]);
        std::fs::remove_dir(h.join("lxc.payload.a")).unwrap();
        std::fs::rename(h.join("new"), h.join("lxc.payload.a")).unwrap();
        let again = d.scan().unwrap();
        assert_eq!(again[0].id, "a");
        assert_ne!(again[0].instance, first);
    }

    #[test]
    fn non_utf8_names_are_escaped_and_read_through_their_real_path() {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("cg");
        let raw = OsStr::from_bytes(b"lxc.payload.caf\xe9");
        std::fs::create_dir_all(h.join(raw)).unwrap();
        std::fs::create_dir_all(h.join("lxc").join(OsStr::from_bytes(b"\xff1"))).unwrap();
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        let got: Vec<_> = found.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(got, vec!["\\xff1", "caf\\xe9"]);
        assert!(found.iter().all(|d| h.join(&d.rel).is_dir()));
        assert_eq!(escape_invalid(b"plain"), ("plain".to_string(), false));
    }

    /// A fixture host: `cgroups` under its hierarchy, `instances` (paths from the root) made.
    fn host(cgroups: &[&str], instances: &[&str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let h = dir.path().join("sys/fs/cgroup");
        mkdirs(&h, cgroups);
        mkdirs(dir.path(), instances);
        (dir, h)
    }

    fn idents(found: &[Discovered]) -> Vec<(&str, &str, Runtime, Option<&str>)> {
        found
            .iter()
            .map(|d| {
                let project = d.project.as_deref();
                (d.id.as_str(), d.name.as_str(), d.runtime, project)
            })
            .collect()
    }

    #[test]
    fn incus_containers_in_default_and_other_projects() {
        let (dir, h) = host(
            &[
                "lxc.payload.web",
                "lxc.payload.p2_peer3",
                "lxc.monitor.web",
                "lxc.monitor.p2_peer3",
                "lxc.payload.plain_one",
            ],
            &[
                "var/lib/incus/containers/web",
                "var/lib/incus/containers/p2_peer3",
            ],
        );
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        assert_eq!(
            idents(&found),
            vec![
                ("p2_peer3", "peer3", Runtime::Incus, Some("p2")),
                // Not Incus's: an underscore in a plain LXC name is part of the name.
                ("plain_one", "plain_one", Runtime::Lxc, None),
                ("web", "web", Runtime::Incus, None),
            ]
        );
        assert_eq!(found[0].rel, PathBuf::from("lxc.payload.p2_peer3"));
        assert!(found.iter().all(|d| d.flavor == Flavor::Lxc));
    }

    #[test]
    fn incus_instance_entry_is_a_symlink_that_need_not_resolve() {
        // On a real host the entry points into the storage pool by the daemon's path.
        let (dir, h) = host(&["lxc.payload.p2_c1"], &["var/lib/incus/containers"]);
        std::os::unix::fs::symlink(
            "/var/lib/incus/storage-pools/default/containers/p2_c1",
            dir.path().join("var/lib/incus/containers/p2_c1"),
        )
        .unwrap();
        let found = Discovery::new(&dir.path().join("."), &h).scan().unwrap();
        assert_eq!(
            idents(&found),
            vec![("p2_c1", "c1", Runtime::Incus, Some("p2"))]
        );
    }

    #[test]
    fn lxd_deb_and_snap_layouts() {
        let (dir, h) = host(
            &["lxc.payload.a", "lxc.payload.proj_b", "lxc.payload.c"],
            &[
                "var/lib/lxd/containers/a",
                "var/snap/lxd/common/lxd/containers/proj_b",
            ],
        );
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        assert_eq!(
            idents(&found),
            vec![
                ("a", "a", Runtime::Lxd, None),
                ("c", "c", Runtime::Lxc, None),
                ("proj_b", "b", Runtime::Lxd, Some("proj")),
            ]
        );
    }

    #[test]
    fn proxmox_stays_proxmox_beside_incus() {
        let (dir, h) = host(
            &["lxc/100/ns", "lxc.payload.ct"],
            &[
                "var/lib/incus/containers/100",
                "var/lib/incus/containers/ct",
            ],
        );
        let pve = dir.path().join("etc/pve/lxc");
        std::fs::create_dir_all(&pve).unwrap();
        std::fs::write(pve.join("100.conf"), "hostname: pve_web\n").unwrap();
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        assert_eq!(
            idents(&found),
            vec![
                ("100", "pve_web", Runtime::Proxmox, None),
                ("ct", "ct", Runtime::Incus, None),
            ]
        );
    }

    #[test]
    fn runtime_is_found_once_per_appearance() {
        let (dir, h) = host(&["lxc.payload.p_x"], &[]);
        let mut d = Discovery::new(dir.path(), &h);
        assert_eq!(idents(&d.scan().unwrap())[0].2, Runtime::Lxc);
        // Not looked up again while the same cgroup lives.
        mkdirs(dir.path(), &["var/lib/incus/containers/p_x"]);
        assert_eq!(
            idents(&d.scan().unwrap()),
            vec![("p_x", "p_x", Runtime::Lxc, None)]
        );
        // A new appearance (restart: a new cgroup directory) is.
        mkdirs(&h, &["new"]);
        std::fs::remove_dir(h.join("lxc.payload.p_x")).unwrap();
        std::fs::rename(h.join("new"), h.join("lxc.payload.p_x")).unwrap();
        assert_eq!(
            idents(&d.scan().unwrap()),
            vec![("p_x", "x", Runtime::Incus, Some("p"))]
        );
    }

    /// Gives the fixture host a process `pid` with parent `ppid` and command line `cmdline`.
    fn process(root: &Path, pid: u32, ppid: u32, cmdline: &str) {
        let dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let stat =
            format!("{pid} (x y) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 9");
        std::fs::write(dir.join("stat"), stat).unwrap();
        std::fs::write(dir.join("cmdline"), cmdline.replace(' ', "\0") + "\0").unwrap();
    }

    /// Containers' processes, each `(cgroup, pid, lxcpath, name)`: its init `pid` (in
    /// `cgroup`, below the hierarchy `h`), a child of the LXC monitor `pid - 1` of `lxcpath`
    /// and `name`.
    fn lxc_containers(root: &Path, h: &Path, containers: &[(&str, u32, &str, &str)]) {
        for &(cgroup, pid, lxcpath, name) in containers {
            std::fs::create_dir_all(h.join(cgroup)).unwrap();
            std::fs::write(h.join(cgroup).join("cgroup.procs"), format!("{pid}\n")).unwrap();
            process(root, pid, pid - 1, "/sbin/init");
            let dir = root.join(format!("proc/{}", pid - 1));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), format!("{} (lxc-start) S 1 0", pid - 1)).unwrap();
            // liblxc's title: spaces, not NULs, between its words.
            let title = format!("[lxc monitor] {lxcpath} {name}\0");
            std::fs::write(dir.join("cmdline"), title).unwrap();
        }
    }

    fn ids_and_cgroups(found: &[Discovered]) -> Vec<(&str, &str, Runtime, &str)> {
        found
            .iter()
            .map(|d| {
                (
                    d.id.as_str(),
                    d.name.as_str(),
                    d.runtime,
                    d.rel.to_str().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn suffixed_cgroup_takes_its_monitors_name_and_the_empty_one_is_left_out() {
        let (dir, h) = host(&["lxc.payload.web", "lxc.monitor.web"], &[]);
        std::fs::write(h.join("lxc.payload.web/cgroup.procs"), "").unwrap();
        let lxc = "/var/lib/lxc";
        lxc_containers(
            dir.path(),
            &h,
            &[
                ("lxc.payload.web-1", 301, lxc, "web"),
                // Named so by its owner: the monitor agrees, nothing changes.
                ("lxc.payload.db-2", 401, lxc, "db-2"),
                // A process deeper in the tree leads to the same monitor (init is its
                // ancestor).
                ("lxc.payload.sys-1/init.scope", 501, lxc, "sys"),
            ],
        );
        process(dir.path(), 502, 501, "/usr/sbin/sshd -D");
        std::fs::write(h.join("lxc.payload.sys-1/init.scope/cgroup.procs"), "").unwrap();
        std::fs::create_dir_all(h.join("lxc.payload.sys-1/system.slice")).unwrap();
        std::fs::write(
            h.join("lxc.payload.sys-1/system.slice/cgroup.procs"),
            "502\n",
        )
        .unwrap();
        let mut d = Discovery::new(dir.path(), &h);
        let want = vec![
            ("db-2", "db-2", Runtime::Lxc, "lxc.payload.db-2"),
            ("sys", "sys", Runtime::Lxc, "lxc.payload.sys-1"),
            ("web", "web", Runtime::Lxc, "lxc.payload.web-1"),
        ];
        assert_eq!(ids_and_cgroups(&d.scan().unwrap()), want);
        assert_eq!(
            ids_and_cgroups(&d.scan().unwrap()),
            want,
            "and so every cycle"
        );
        // The leftover removed, nothing changes.
        std::fs::remove_dir_all(h.join("lxc.payload.web")).unwrap();
        assert_eq!(ids_and_cgroups(&d.scan().unwrap()), want);
    }

    #[test]
    fn a_running_container_keeps_its_name_and_the_other_its_cgroups() {
        let (dir, h) = host(&[], &["var/lib/incus/containers/web"]);
        // Incus's web runs in lxc.payload.web; plain LXC's web had to take web-1.
        let (incus, lxc) = ("/var/lib/incus/containers", "/var/lib/lxc");
        lxc_containers(
            dir.path(),
            &h,
            &[
                ("lxc.payload.web", 201, incus, "web"),
                ("lxc.payload.web-1", 301, lxc, "web"),
                // Two claims to one name: neither takes it.
                ("lxc.payload.db-1", 401, lxc, "db"),
                ("lxc.payload.db-2", 501, "/var/lib/lxc2", "db"),
            ],
        );
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        assert_eq!(
            ids_and_cgroups(&found),
            vec![
                ("db-1", "db", Runtime::Lxc, "lxc.payload.db-1"),
                ("db-2", "db", Runtime::Lxc, "lxc.payload.db-2"),
                ("web", "web", Runtime::Incus, "lxc.payload.web"),
                ("web-1", "web", Runtime::Lxc, "lxc.payload.web-1"),
            ]
        );
    }

    #[test]
    fn monitors_name_gives_the_runtime_project_and_proxmox_config() {
        let (dir, h) = host(&["lxc/100", "lxc.payload.p2_c1"], &[]);
        std::fs::write(h.join("lxc/100/cgroup.procs"), "").unwrap();
        std::fs::write(h.join("lxc.payload.p2_c1/cgroup.procs"), "").unwrap();
        let pve = dir.path().join("etc/pve/lxc");
        std::fs::create_dir_all(&pve).unwrap();
        std::fs::write(pve.join("100.conf"), "hostname: web\n").unwrap();
        lxc_containers(
            dir.path(),
            &h,
            &[("lxc/100-1/ns", 301, "/var/lib/lxc", "100")],
        );
        std::fs::write(h.join("lxc/100-1/cgroup.procs"), "").unwrap();
        let incus = "/var/lib/incus/containers";
        lxc_containers(
            dir.path(),
            &h,
            &[("lxc.payload.p2_c1-1", 401, incus, "p2_c1")],
        );
        // No process to follow (a fixture without /proc, or one that exited): as it is.
        mkdirs(&h, &["lxc.payload.gone-1"]);
        let found = Discovery::new(dir.path(), &h).scan().unwrap();
        assert_eq!(
            idents(&found),
            vec![
                ("100", "web", Runtime::Proxmox, None),
                ("gone-1", "gone-1", Runtime::Lxc, None),
                ("p2_c1", "c1", Runtime::Incus, Some("p2")),
            ]
        );
        assert_eq!(found[0].rel, PathBuf::from("lxc/100-1"));
    }

    #[test]
    fn lxc_suffix() {
        assert!(lxc_suffixed(b"web-1") && lxc_suffixed(b"a-b-12"));
        assert!(!lxc_suffixed(b"web") && !lxc_suffixed(b"web-") && !lxc_suffixed(b"-1"));
        assert!(!lxc_suffixed(b"web-1a") && !lxc_suffixed(b"100"));
    }

    #[test]
    fn hostname_parsing() {
        assert_eq!(pve_hostname("hostname:   spaced  \n"), Some("spaced"));
        assert_eq!(pve_hostname("hostname:\n"), None);
    }
}
