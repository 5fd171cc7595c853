//! Packet loss on a test container's host-side veth, and the kernel's TCP counters of a
//! network namespace (the ground truth of the TCP retransmit tests).
//!
//! This kernel has no netem (`CONFIG_NET_SCH_NETEM` is off and there is no modules
//! directory), so the loss is an nftables table of the test's own in the `netdev` family: a
//! chain bound to the one veth the test names, dropping a random share of the data segments of
//! one TCP port. The table is deleted when the [`Loss`] is dropped, and never touches another
//! interface.

use crate::lab::Container;
use crate::proc::run_ok;
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Which packets on the veth lose the given share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Entering the host from the container (the container's sends to the host).
    FromContainer,
    /// Leaving the host to the container (the host's sends to the container).
    ToContainer,
}

/// An nftables table of this process that drops packets on one veth; deleted on drop.
pub struct Loss {
    table: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn nft(script: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("nft");
    cmd.args(args);
    if let Some(script) = script {
        let path = std::env::temp_dir().join(format!(
            "lxcmon-test-nft-{}-{}.nft",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        cmd.arg("-f").arg(&path);
        let out = run_ok(cmd.stdin(Stdio::null()), Duration::from_secs(10));
        let _ = fs::remove_file(&path);
        return Ok(out?.stdout);
    }
    Ok(run_ok(cmd.stdin(Stdio::null()), Duration::from_secs(10))?.stdout)
}

impl Loss {
    /// Drops `percent` % of the TCP data segments (no SYN, FIN or RST, so connections open
    /// and close on time) to `port` between `host_ip` and the container behind `veth`, in
    /// `direction`.
    pub fn new(
        veth: &str,
        host_ip: Ipv4Addr,
        port: u16,
        percent: u8,
        direction: Direction,
    ) -> Result<Self> {
        ensure!(percent <= 100, "a share of {percent} %");
        let (hook, addr) = match direction {
            Direction::FromContainer => ("ingress", "daddr"),
            Direction::ToContainer => ("egress", "saddr"),
        };
        Self::with_rule(
            veth,
            hook,
            &format!(
                "ip {addr} {host_ip} tcp dport {port} tcp flags & (syn | fin | rst) == 0 \
                 numgen random mod 100 < {percent} counter drop"
            ),
        )
    }

    /// Drops every SYN-ACK the container sends from its listening `port` to `host_ip`: its
    /// listening socket sends them again.
    pub fn syn_acks(veth: &str, host_ip: Ipv4Addr, port: u16) -> Result<Self> {
        Self::with_rule(
            veth,
            "ingress",
            &format!(
                "ip daddr {host_ip} tcp sport {port} tcp flags & (syn | ack) == syn | ack counter drop"
            ),
        )
    }

    fn with_rule(veth: &str, hook: &str, rule: &str) -> Result<Self> {
        ensure!(
            veth.starts_with("veth") && fs::metadata(format!("/sys/class/net/{veth}")).is_ok(),
            "{veth} is not a veth of this host"
        );
        let table = format!(
            "lxcmon_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let script = format!(
            "table netdev {table} {{\n  chain lossy {{\n    type filter hook {hook} device \"{veth}\" priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        nft(Some(&script), &[]).context("creating the loss table")?;
        Ok(Self { table })
    }

    /// Packets dropped so far.
    pub fn dropped(&self) -> Result<u64> {
        let text = nft(None, &["list", "table", "netdev", &self.table])?;
        let packets = text
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .context("no counter in the loss table")?;
        Ok(packets.parse()?)
    }
}

impl Drop for Loss {
    fn drop(&mut self) {
        let _ = nft(None, &["delete", "table", "netdev", &self.table]);
    }
}

/// The host-side end of the container's `eth0`: the host interface whose index is the
/// container interface's `iflink`.
pub fn host_veth(c: &Container) -> Result<String> {
    let out = c.sh("cat /sys/class/net/eth0/iflink 2>/dev/null || ip -o link show eth0")?;
    let iflink: u32 = match out.trim().parse() {
        Ok(n) => n,
        // `2: eth0@if15: <...`
        Err(_) => out
            .split("@if")
            .nth(1)
            .and_then(|s| s.split(':').next())
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no peer index for eth0 in {out:?}"))?,
    };
    for e in fs::read_dir("/sys/class/net")? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let idx = fs::read_to_string(format!("/sys/class/net/{name}/ifindex")).unwrap_or_default();
        if idx.trim().parse::<u32>().ok() == Some(iflink) {
            return Ok(name);
        }
    }
    bail!(
        "no host interface with index {iflink} (the peer of {}'s eth0)",
        c.name
    )
}

/// One `name value` table of `/proc/<pid>/net/snmp` or `net/netstat` (`Tcp:`, `TcpExt:`).
fn table_value(text: &str, prefix: &str, field: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The kernel's TCP counters of one network namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// `Tcp: RetransSegs`: segments retransmitted (incremented before the send is tried).
    pub retrans_segs: u64,
    /// `Tcp: OutSegs`.
    pub out_segs: u64,
    /// `TcpExt: TCPRetransFail`: segments of retransmits the stack failed to send after
    /// counting them in `RetransSegs`.
    pub retrans_fail: u64,
}

/// The TCP counters of the network namespace of `pid` (`None`: this process's, the host's).
pub fn tcp_counters(pid: Option<u32>) -> Result<TcpCounters> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/net"),
        None => "/proc/self/net".into(),
    };
    let snmp = fs::read_to_string(format!("{dir}/snmp")).with_context(|| format!("{dir}/snmp"))?;
    let netstat =
        fs::read_to_string(format!("{dir}/netstat")).with_context(|| format!("{dir}/netstat"))?;
    let get = |text: &str, prefix: &str, field: &str| {
        table_value(text, prefix, field).with_context(|| format!("{dir}: no {prefix} {field}"))
    };
    Ok(TcpCounters {
        retrans_segs: get(&snmp, "Tcp:", "RetransSegs")?,
        out_segs: get(&snmp, "Tcp:", "OutSegs")?,
        retrans_fail: get(&netstat, "TcpExt:", "TCPRetransFail")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_named_field_of_a_proc_table() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens RetransSegs OutSegs\nTcp: 1 5 42 900\n";
        assert_eq!(table_value(text, "Tcp:", "RetransSegs"), Some(42));
        assert_eq!(table_value(text, "Tcp:", "OutSegs"), Some(900));
        assert_eq!(table_value(text, "Tcp:", "InSegs"), None);
        assert_eq!(table_value(text, "Udp:", "InDatagrams"), None);
    }
}
