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
    let rel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = rel
        .trim()
        .split(['.', '-'])
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (5, 15)
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
    let veth = format!("veth{}i0", to.vmid);
    std::thread::sleep(Duration::from_millis(300));
    sh(&["ip", "link", "set", &veth, "down"])?;
    std::thread::sleep(Duration::from_millis(500));
    sh(&["ip", "link", "set", &veth, "up"])?;
    let sent = send.wait_with_output().context("TCP sender")?;
    let got = lines.next().and_then(|l| l.ok()).unwrap_or_default();
    let _ = recv.wait();
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
