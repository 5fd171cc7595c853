//! TCP retransmits (issue 13) against the kernel's own count: 101 sends to 102 over TCP while
//! 102's host-side veth is down for a moment, so 101 retransmits. The agent's cumulative
//! `tcp_retransmits` of 101 must grow by what the kernel added to `RetransSegs` in 101's
//! network namespace, less at most the segments counted there but refused by the stack
//! (`TCPRetransFail`). On a kernel without the socket's cgroup pointer (before 5.15) the
//! figure is absent and the agent says why.

use crate::ct::Container;
use crate::{info, sh, Report};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

/// `RetransSegs` and `TCPRetransFail` of one network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Kernel {
    segs: u64,
    fail: u64,
}

fn field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// The TCP counters of the network namespace of `pid`.
pub(crate) fn kernel(pid: u32) -> Result<Kernel> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp"))?;
    let netstat = std::fs::read_to_string(format!("/proc/{pid}/net/netstat"))?;
    Ok(Kernel {
        segs: field(&snmp, "Tcp:", "RetransSegs").context("no RetransSegs")?,
        fail: field(&netstat, "TcpExt:", "TCPRetransFail").context("no TCPRetransFail")?,
    })
}

/// Whether the running kernel has the socket's cgroup pointer the program reads (5.15+).
pub(crate) fn kernel_counts() -> bool {
    kernel_at_least(5, 15)
}

/// Whether the running kernel is `major.minor` or later (`/proc/sys/kernel/osrelease`).
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = rel
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (major, minor)
}

/// 4 MiB from `from` to `to` over about 1.5 s; 0.3 s in, `to`'s host-side veth goes down for
/// 0.5 s (its segments die on the bridge) and up again: `from` retransmits after its timeout.
pub(crate) fn transfer_with_outage(from: &Container, to: &Container, port: u16) -> Result<()> {
    let mut recv = to
        .exec_cmd(
            "",
            "wait",
            &["/bin/vm-guest", "wl", "tcp-recv", &port.to_string()],
        )
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the TCP receiver")?;
    let stdout = recv.stdout.take().context("receiver stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(l)) if l.trim() == "READY" => {}
        other => bail!("TCP receiver said {other:?}"),
    }
    let bytes = (4u64 << 20).to_string();
    let send = from
        .exec_cmd(
            "",
            "wait",
            &[
                "/bin/vm-guest",
                "wl",
                "tcp-send",
                &to.ip,
                &port.to_string(),
                &bytes,
                "1500",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the TCP sender")?;
    // The receiver's port goes down for 0.5 s: its segments die at the bridge. A port going
    // down flushes its forwarding entries, so the bridge floods frames for the receiver to
    // every other port until it learns them again: flooding is off on the other containers'
    // ports meanwhile, or they would receive (and count) the transfer.
    let veth = format!("veth{}i0", to.vmid);
    let others = quiet_ports(&[&format!("veth{}i0", from.vmid), &veth])?;
    std::thread::sleep(Duration::from_millis(300));
    let flap = sh(&["ip", "link", "set", &veth, "down"]).and_then(|()| {
        std::thread::sleep(Duration::from_millis(500));
        sh(&["ip", "link", "set", &veth, "up"])
    });
    let sent = send.wait_with_output().context("TCP sender")?;
    let got = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let _ = recv.wait();
    for (flood, old) in others {
        std::fs::write(&flood, old).with_context(|| flood.clone())?;
    }
    flap?;
    let sent = String::from_utf8_lossy(&sent.stdout).trim().to_string();
    info(&format!("retrans: sender {sent:?}, receiver {got:?}"));
    if sent != format!("SENT {bytes}") || got.trim() != format!("RECEIVED {bytes}") {
        bail!(
            "TCP {}->{}: sender {sent:?}, receiver {got:?}",
            from.vmid,
            to.vmid
        );
    }
    Ok(())
}

/// Turns unicast flooding off on every port of the bridge of `keep[1]` but `keep`; returns
/// each port's flag file and its old value, to restore.
fn quiet_ports(keep: &[&str]) -> Result<Vec<(String, String)>> {
    let brif = format!("/sys/class/net/{}/brport/bridge/brif", keep[1]);
    let mut out = Vec::new();
    for e in std::fs::read_dir(&brif).with_context(|| brif.clone())? {
        let port = e?.file_name().to_string_lossy().into_owned();
        if keep.contains(&port.as_str()) {
            continue;
        }
        let flood = format!("{brif}/{port}/unicast_flood");
        let old = std::fs::read_to_string(&flood).with_context(|| flood.clone())?;
        std::fs::write(&flood, "0").with_context(|| flood.clone())?;
        out.push((flood, old.trim().to_string()));
    }
    Ok(out)
}

/// Holds 101's record before and after the transfer to the kernel's counts around it.
pub(crate) fn check(
    report: &mut Report,
    before: Option<&Value>,
    after: Option<&Value>,
    k: (Kernel, Kernel),
    errlog: &str,
) {
    let p = "retrans/101";
    let value = |r: Option<&Value>| r.and_then(|r| r.get("tcp_retransmits")?.as_u64());
    let (segs, fail) = (k.1.segs - k.0.segs, k.1.fail - k.0.fail);
    info(&format!(
        "retrans: kernel RetransSegs +{segs} (TCPRetransFail +{fail}), records {:?} -> {:?}",
        value(before),
        value(after)
    ));
    report.check(
        &format!("{p}/kernel-retransmitted"),
        segs > 0,
        &format!("RetransSegs +{segs}"),
    );
    if kernel_counts() {
        match (value(before), value(after)) {
            (Some(a), Some(b)) => {
                let d = b.saturating_sub(a);
                report.check(
                    &format!("{p}/tcp_retransmits-delta-vs-RetransSegs"),
                    b >= a && d <= segs && segs - d <= fail,
                    &format!("record {a} -> {b} (+{d}), kernel RetransSegs +{segs}, TCPRetransFail +{fail}"),
                );
            }
            other => report.check(&format!("{p}/present"), false, &format!("{other:?}")),
        }
    } else {
        report.check(
            &format!("{p}/absent-before-5.15"),
            value(before).is_none() && value(after).is_none(),
            &format!("{:?} {:?}", value(before), value(after)),
        );
        let log = std::fs::read_to_string(errlog).unwrap_or_default();
        report.check(
            &format!("{p}/reason-logged"),
            log.contains("TCP retransmits: not counted"),
            "the agent says why the figure is absent",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_fields() {
        let t = "Tcp: RtoAlgorithm RetransSegs\nTcp: 1 7\n";
        assert_eq!(field(t, "Tcp:", "RetransSegs"), Some(7));
        assert_eq!(field(t, "Tcp:", "OutSegs"), None);
    }
}
