//! procfs readers: a container's init, its network counters, and host-wide figures.

use crate::readers::kfile::{self, KFile, ReadError};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Whether a `/proc/<pid>/status` belongs to the first process of its innermost PID
/// namespace: the last `NSpid:` field is 1.
pub fn is_namespace_init(status: &str) -> bool {
    let Some(ids) = status.lines().find_map(|l| l.strip_prefix("NSpid:")) else {
        return false;
    };
    let mut ids = ids.split_whitespace();
    // One level only is the host's own PID namespace, where pid 1 is no container.
    ids.next().is_some() && ids.last() == Some("1")
}

/// The container's init among `pids` (shallowest cgroup first, so usually the first tried).
/// A process that exited meanwhile is passed over; any other failure (no descriptor left
/// above all) is the caller's to handle, not taken for "no init".
pub fn find_init(root: &Path, pids: &[u32], buf: &mut Vec<u8>) -> Result<Option<u32>, ReadError> {
    for &pid in pids {
        let status = KFile::open(kfile::under(root, &format!("/proc/{pid}/status")))
            .and_then(|f| f.read(buf).map(is_namespace_init));
        match status {
            Ok(true) => return Ok(Some(pid)),
            Ok(false) => {}
            Err(e) if e.is_gone() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One interface's counters from `/proc/<pid>/net/dev`, as the container sees them.
///
/// These are the kernel's counters of one interface *instance*: an interface that is deleted
/// and created again under the same name starts again from 0 (as node_exporter's do). Only the
/// totals ([`NetTotals`]) keep a vanished interface's bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_drops: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_drops: u64,
}

/// Cumulative bytes over the non-loopback interfaces of one network namespace.
///
/// Interface counters vanish with their interface; the last values of a vanished interface
/// are kept so the totals never go backwards while the container lives.
#[derive(Debug, Default, Clone)]
pub struct NetTotals {
    interfaces: Vec<Interface>,
    retired_rx: u64,
    retired_tx: u64,
}

#[derive(Debug, Clone)]
struct Interface {
    name: String,
    rx: u64,
    tx: u64,
    seen: bool,
}

impl NetTotals {
    /// Folds in a fresh `/proc/<pid>/net/dev`.
    pub fn update(&mut self, net_dev: &str) {
        self.update_with(net_dev, None);
    }

    /// Folds in a fresh `/proc/<pid>/net/dev` and, in the same pass over the text, replaces
    /// `per_interface` (when given) with each non-loopback interface's counters, in the
    /// file's order.
    pub fn update_with(
        &mut self,
        net_dev: &str,
        mut per_interface: Option<&mut Vec<InterfaceCounters>>,
    ) {
        if let Some(out) = per_interface.as_deref_mut() {
            out.clear();
        }
        for iface in &mut self.interfaces {
            iface.seen = false;
        }
        for line in net_dev_lines(net_dev) {
            let (name, rx, tx) = (line.name, line.rx_bytes, line.tx_bytes);
            if name == "lo" {
                continue;
            }
            if let Some(out) = per_interface.as_deref_mut() {
                if let Some(c) = line.counters() {
                    out.push(c);
                }
            }
            match self.interfaces.iter_mut().find(|i| i.name == name) {
                Some(iface) => {
                    if rx < iface.rx || tx < iface.tx {
                        // Same name, new interface: the old one's counts are history.
                        self.retired_rx += iface.rx;
                        self.retired_tx += iface.tx;
                    }
                    iface.rx = rx;
                    iface.tx = tx;
                    iface.seen = true;
                }
                None => self.interfaces.push(Interface {
                    name: name.to_string(),
                    rx,
                    tx,
                    seen: true,
                }),
            }
        }
        let (mut retired_rx, mut retired_tx) = (0, 0);
        self.interfaces.retain(|i| {
            if !i.seen {
                retired_rx += i.rx;
                retired_tx += i.tx;
            }
            i.seen
        });
        self.retired_rx += retired_rx;
        self.retired_tx += retired_tx;
    }

    pub fn rx(&self) -> u64 {
        self.retired_rx + self.interfaces.iter().map(|i| i.rx).sum::<u64>()
    }

    pub fn tx(&self) -> u64 {
        self.retired_tx + self.interfaces.iter().map(|i| i.tx).sum::<u64>()
    }

    /// Interfaces seen in the last update (loopback excluded).
    pub fn interface_count(&self) -> usize {
        self.interfaces.len()
    }
}

/// One line of `/proc/net/dev`: the name, both byte counters, and the rest of the fields.
struct NetDevLine<'a> {
    name: &'a str,
    rx_bytes: u64,
    tx_bytes: u64,
    /// The 16 counter fields where all of them parsed (a per-interface figure needs them).
    fields: Option<[u64; 16]>,
}

impl NetDevLine<'_> {
    fn counters(&self) -> Option<InterfaceCounters> {
        // Receive: bytes packets errs drop fifo frame compressed multicast; Transmit: bytes
        // packets errs drop fifo colls carrier compressed.
        let f = self.fields?;
        Some(InterfaceCounters {
            name: self.name.to_string(),
            rx_bytes: f[0],
            rx_packets: f[1],
            rx_errors: f[2],
            rx_drops: f[3],
            tx_bytes: f[8],
            tx_packets: f[9],
            tx_errors: f[10],
            tx_drops: f[11],
        })
    }
}

/// The interface lines of `/proc/net/dev` (the two header lines have no number after `:`).
fn net_dev_lines(text: &str) -> impl Iterator<Item = NetDevLine<'_>> {
    text.lines().filter_map(|line| {
        // Wide counters can touch the colon (`eth0:123`); names never hold one.
        let (name, counters) = line.split_once(':')?;
        let mut all = [0u64; 16];
        let mut n = 0;
        for (slot, field) in all.iter_mut().zip(counters.split_ascii_whitespace()) {
            *slot = field.parse().ok()?;
            n += 1;
        }
        if n < 9 {
            return None;
        }
        Some(NetDevLine {
            name: name.trim(),
            rx_bytes: all[0],
            tx_bytes: all[8],
            fields: (n == 16).then_some(all),
        })
    })
}

/// `(interface, rx_bytes, tx_bytes)` for each line of `/proc/net/dev`.
pub fn parse_net_dev(text: &str) -> impl Iterator<Item = (&str, u64, u64)> {
    net_dev_lines(text).map(|l| (l.name, l.rx_bytes, l.tx_bytes))
}

/// Each non-loopback interface's counters in `/proc/<pid>/net/dev`, in the file's order.
pub fn parse_interfaces(text: &str) -> impl Iterator<Item = InterfaceCounters> + '_ {
    net_dev_lines(text)
        .filter(|l| l.name != "lo")
        .filter_map(|l| l.counters())
}

/// When the host booted (`btime` of `/proc/stat`).
pub fn boot_time(root: &Path) -> Option<SystemTime> {
    let text = kfile::read_to_string(&kfile::under(root, "/proc/stat")).ok()?;
    parse_btime(&text)
}

pub fn parse_btime(stat: &str) -> Option<SystemTime> {
    let secs = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// A process's start in clock ticks since boot (field 22 of `/proc/<pid>/stat`); `None` if
/// the process is gone or the file does not have it. Any other failed read is an error, so
/// that an agent short of descriptors does not give an init an unknown start for its life.
pub fn start_ticks(stat_path: &Path) -> Result<Option<u64>, ReadError> {
    match kfile::read_to_string(stat_path) {
        Ok(text) => Ok(parse_start_ticks(&text)),
        Err(e) if e.is_gone() => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count after its last `)`.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The parent's pid, from a `/proc/<pid>/stat`.
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The lxcpath and name of the container an LXC monitor runs, from the monitor's
/// `/proc/<pid>/cmdline`: liblxc retitles it `[lxc monitor] <lxcpath> <name>`.
pub fn parse_lxc_monitor(cmdline: &[u8]) -> Option<(&[u8], &[u8])> {
    let title = cmdline.strip_prefix(b"[lxc monitor] ")?;
    let title = title.split(|&b| b == 0).next()?;
    let space = title.iter().position(|&b| b == b' ')?;
    let (path, name) = (&title[..space], &title[space + 1..]);
    (!path.is_empty() && !name.is_empty()).then_some((path, name))
}

/// Clock ticks (`USER_HZ`) as a duration.
pub fn ticks(n: u64) -> Duration {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_secs(n / hz) + Duration::from_nanos((n % hz) * 1_000_000_000 / hz)
}

/// Host memory and swap totals in bytes, from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostMemory {
    pub mem_total: u64,
    pub swap_total: u64,
}

pub fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    Some(HostMemory {
        mem_total: kib("MemTotal")?,
        swap_total: kib("SwapTotal").unwrap_or(0),
    })
}

/// Busy and total jiffies of the host, from the `cpu` line of `/proc/stat`.
pub fn host_cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`).
pub fn self_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Kernel release (`6.18.1-...`) as (major, minor).
pub fn kernel_version(root: &Path) -> Option<(u32, u32)> {
    let text = kfile::read_to_string(&kfile::under(root, "/proc/sys/kernel/osrelease")).ok()?;
    let mut parts = text.trim().split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  123456     100    0    0    0     0          0         0   123456     100    0    0    0     0       0          0
  eth0: 1000000    2000    0    0    0     0          0         0   500000    1000    0    0    0     0       0          0
  eth1:     300       3    0    0    0     0          0         0      700       7    0    0    0     0       0          0
";

    /// A process that exited is passed over; a status that cannot be read for another reason
    /// (here EISDIR; on a host, EMFILE) is an error, not "this container has no init": the
    /// sampler must not skip a container because it ran short of descriptors.
    #[test]
    fn find_init_passes_over_exited_processes_only() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let status = |pid: u32, nspid: &str| {
            std::fs::create_dir_all(proc.join(pid.to_string())).unwrap();
            let text = format!("Name:\tinit\nNSpid:\t{nspid}\n");
            std::fs::write(proc.join(format!("{pid}/status")), text).unwrap();
        };
        status(11, "11");
        status(12, "12\t1");
        let mut buf = Vec::new();
        // 10 has exited (no /proc/10), 11 is not an init.
        let found = find_init(dir.path(), &[10, 11, 12], &mut buf).unwrap();
        assert_eq!(found, Some(12));
        assert_eq!(find_init(dir.path(), &[10, 11], &mut buf).unwrap(), None);
        std::fs::create_dir_all(proc.join("13/status")).unwrap();
        let err = find_init(dir.path(), &[13, 12], &mut buf).unwrap_err();
        assert!(!err.is_gone(), "{err}");
    }

    #[test]
    fn net_dev_excludes_loopback() {
        let mut t = NetTotals::default();
        t.update(NET_DEV);
        assert_eq!((t.rx(), t.tx()), (1_000_300, 500_700));
    }

    #[test]
    fn vanished_interface_keeps_its_history() {
        let mut t = NetTotals::default();
        t.update(NET_DEV);
        let without_eth1 = NET_DEV
            .lines()
            .filter(|l| !l.contains("eth1"))
            .collect::<Vec<_>>()
            .join("\n");
        t.update(&without_eth1);
        assert_eq!((t.rx(), t.tx()), (1_000_300, 500_700));
        // eth1 comes back as a new interface starting from zero.
        t.update(&NET_DEV.replace("    300       3", "     10       1"));
        assert_eq!(t.rx(), 1_000_310);
    }

    /// Odd spacing: counters wide enough to touch the colon, tabs, names of every length,
    /// a line cut short (a figure the kernel did not give is no interface of the list).
    const NET_DEV_ODD: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:99 1 0 0 0 0 0 0 99 1 0 0 0 0 0 0
eth0:18446744073709551615 7 1 2 0 0 0 0 5\t6   3 4 0 0 0 0
veth-with-long-name: 10 20 30 40 50 60 70 80 90 100 110 120 130 140 150 160
 short: 1 2 3 4 5 6 7 8 9
";

    #[test]
    fn per_interface_counters_from_the_same_text() {
        let mut t = NetTotals::default();
        let mut out = Vec::new();
        t.update_with(NET_DEV_ODD, Some(&mut out));
        let names: Vec<_> = out.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "veth-with-long-name"], "{out:#?}");
        assert_eq!(
            out[0],
            InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: u64::MAX,
                rx_packets: 7,
                rx_errors: 1,
                rx_drops: 2,
                tx_bytes: 5,
                tx_packets: 6,
                tx_errors: 3,
                tx_drops: 4,
            }
        );
        let v = &out[1];
        assert_eq!(
            (v.rx_bytes, v.rx_packets, v.rx_errors, v.rx_drops),
            (10, 20, 30, 40)
        );
        assert_eq!(
            (v.tx_bytes, v.tx_packets, v.tx_errors, v.tx_drops),
            (90, 100, 110, 120)
        );
        // The totals still count the short line's bytes, as before.
        assert_eq!(t.tx(), 5 + 90 + 9);
        assert_eq!(parse_interfaces(NET_DEV_ODD).collect::<Vec<_>>(), out);
    }

    #[test]
    fn many_interfaces_and_a_recreated_one() {
        let mut text = String::from("Inter-| x\n face |y\n");
        for i in 0..200u64 {
            text.push_str(&format!(
                "  veth{i}: {} {} 0 0 0 0 0 0 {} {} 0 0 0 0 0 0\n",
                i * 1000,
                i,
                i * 10,
                i + 1
            ));
        }
        let mut t = NetTotals::default();
        let mut out = vec![InterfaceCounters {
            name: "stale".into(),
            ..Default::default()
        }];
        t.update_with(&text, Some(&mut out));
        assert_eq!(out.len(), 200, "the previous content is replaced");
        assert_eq!(out[199].name, "veth199");
        assert_eq!((out[199].rx_bytes, out[199].tx_packets), (199_000, 200));
        assert_eq!(t.rx(), (0..200).map(|i| i * 1000).sum::<u64>());
        // veth5 deleted and created again: its own counters start again, the total keeps
        // the old instance's bytes.
        let again = text.replace("veth5: 5000 5 ", "veth5: 7 1 ");
        t.update_with(&again, Some(&mut out));
        assert_eq!(out[5].rx_bytes, 7);
        assert_eq!(
            t.rx(),
            (0..200).map(|i| i * 1000).sum::<u64>() - 5000 + 5000 + 7
        );
    }

    #[test]
    fn process_start_time() {
        let stat =
            "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 12345 1000 10\n";
        assert_eq!(parse_start_ticks(stat), Some(12345));
        assert_eq!(parse_start_ticks("4242 (x) S 1\n"), None);
    }

    #[test]
    fn parent_and_lxc_monitor_title() {
        let stat = "14253 (init (x) y) S 14252 14253 14253 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 5";
        assert_eq!(parse_ppid(stat), Some(14252));
        assert_eq!(parse_ppid("garbage"), None);
        let title = b"[lxc monitor] /var/lib/lxc web\0";
        assert_eq!(
            parse_lxc_monitor(title),
            Some((&b"/var/lib/lxc"[..], &b"web"[..]))
        );
        assert_eq!(parse_lxc_monitor(b"/sbin/init\0"), None);
        assert_eq!(parse_lxc_monitor(b"[lxc monitor] /var/lib/lxc\0"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        // This very process started after the host booted, and not in the future.
        let boot = boot_time(Path::new("/")).unwrap();
        let me = start_ticks(Path::new("/proc/self/stat")).unwrap().unwrap();
        let started = boot + ticks(me);
        assert!(started <= SystemTime::now() + Duration::from_secs(2));
        assert!(started > boot);
    }

    #[test]
    fn nspid_init_detection() {
        assert!(is_namespace_init("Name:\tinit\nNSpid:\t4242\t1\n"));
        assert!(is_namespace_init("NSpid:\t4242\t77\t1\n"));
        assert!(!is_namespace_init("NSpid:\t4243\t2\n"));
        assert!(
            !is_namespace_init("NSpid:\t1\n"),
            "the host's own init is no container"
        );
        assert!(!is_namespace_init("Name:\told kernel\n"));
    }

    #[test]
    fn host_figures() {
        assert_eq!(
            host_cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n"),
            Some((150, 1000))
        );
        assert_eq!(host_cpu_times("intr 1\n"), None);
        assert_eq!(
            self_rss("Name:\tlxcmon\nVmRSS:\t    2048 kB\n"),
            Some(2048 * 1024)
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel")).unwrap();
        std::fs::write(
            dir.path().join("proc/sys/kernel/osrelease"),
            "6.18.44-fc-v782\n",
        )
        .unwrap();
        let m = parse_meminfo("MemTotal:       16384 kB\nSwapTotal:    1024 kB\n").unwrap();
        assert_eq!((m.mem_total, m.swap_total), (16384 * 1024, 1024 * 1024));
        assert_eq!(kernel_version(dir.path()), Some((6, 18)));
    }
}
