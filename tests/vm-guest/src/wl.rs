//! Workloads with a known footprint, run inside the containers (`vm-guest wl ...`). Each one
//! prints what it did; the driver turns that into ground truth.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize, fill: u8) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len, 4096)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            bail!("allocating {len} bytes");
        }
        // SAFETY: ptr points to len writable bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, len) };
        Ok(Self { ptr, layout })
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len come from a live allocation owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn direct_flag() -> i32 {
    rustix::fs::OFlags::DIRECT.bits() as i32
}

pub fn main(args: &[String]) -> Result<()> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["write", path, bytes, mode] => write(path, bytes.parse()?, *mode == "direct"),
        ["read", path, bytes] => read_direct(path, bytes.parse()?),
        ["dio", path, count] => dio(path, count.parse()?),
        ["udp-recv", port, count] => udp_recv(port.parse()?, count.parse()?),
        ["udp-send", dst, port, count, size] => {
            udp_send(dst, port.parse()?, count.parse()?, size.parse()?)
        }
        ["udp-bcast", dst, port, size] => {
            let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            sock.set_broadcast(true)?;
            let n = sock.send_to(&vec![0x42u8; size.parse()?], (*dst, port.parse::<u16>()?))?;
            println!("SENT 1 {n}");
            Ok(())
        }
        ["tcp-recv", port] => tcp_recv(port.parse()?),
        ["tcp-send", dst, port, bytes, ms] => {
            tcp_send(dst, port.parse()?, bytes.parse()?, ms.parse()?)
        }
        ["mem", mib, ready] => mem(mib.parse()?, ready),
        ["oom", mib] => oom(mib),
        ["touch", mib] => touch(mib.parse()?),
        ["spin"] => spin(),
        ["burn", ms] => burn(ms.parse()?),
        _ => bail!("unknown workload {a:?}"),
    }
}

/// Writes `bytes` (a multiple of 1 MiB) to `path` with O_DIRECT, or buffered and then fsync.
fn write(path: &str, bytes: usize, direct: bool) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if direct {
        opts.custom_flags(direct_flag());
    }
    let mut f = opts.open(path).with_context(|| format!("opening {path}"))?;
    let mut buf = Aligned::new(CHUNK, 0x5a)?;
    let mut done = 0;
    while done < bytes {
        let n = f.write(buf.slice())?;
        done += n;
    }
    f.sync_all()?;
    println!("WROTE {done}");
    Ok(())
}

fn read_direct(path: &str, bytes: usize) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(direct_flag())
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    let mut buf = Aligned::new(CHUNK, 0)?;
    let mut done = 0;
    while done < bytes {
        let n = f.read(buf.slice())?;
        if n == 0 {
            break;
        }
        done += n;
    }
    println!("READ {done}");
    Ok(())
}

/// `count` 4 KiB O_DIRECT overwrites of an existing file's first blocks, then `count` 4 KiB
/// O_DIRECT reads of them: one block request each (an overwrite allocates nothing, so the
/// filesystem adds no request of the task's own).
fn dio(path: &str, count: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(direct_flag())
        .open(path)
        .with_context(|| format!("opening {path}"))?;
    let len = f.metadata()?.len();
    if len < count * BLOCK as u64 {
        bail!("{path} has {len} bytes, not the {count} blocks to overwrite");
    }
    let mut buf = Aligned::new(BLOCK, 0x77)?;
    for i in 0..count {
        let n = f.write_at(buf.slice(), i * BLOCK as u64)?;
        if n != BLOCK {
            bail!("short direct write: {n} bytes");
        }
    }
    for i in 0..count {
        let n = f.read_at(buf.slice(), i * BLOCK as u64)?;
        if n != BLOCK {
            bail!("short direct read: {n} bytes");
        }
    }
    println!("DIO {count} {count}");
    Ok(())
}

/// Receives up to `count` datagrams on 0.0.0.0:port; stops 5 s after the last one.
fn udp_recv(port: u16, count: usize) -> Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", port))?;
    // Room for every datagram even if this process gets no CPU for a while (TCG): a drop in
    // the socket would leave the ground truth unsure. The driver raised net.core.rmem_max.
    rustix::net::sockopt::set_socket_recv_buffer_size(&sock, 8 << 20)?;
    println!("READY");
    std::io::stdout().flush()?;
    let mut buf = vec![0u8; 65536];
    let (mut n, mut bytes) = (0usize, 0usize);
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    while n < count {
        match sock.recv_from(&mut buf) {
            Ok((len, _)) => {
                n += 1;
                bytes += len;
                sock.set_read_timeout(Some(Duration::from_secs(5)))?;
            }
            Err(_) => break,
        }
    }
    println!("RECEIVED {n} {bytes}");
    Ok(())
}

/// Accepts one TCP connection on `port` and reads it to its end (bounded: 60 s).
fn tcp_recv(port: u16) -> Result<()> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    println!("READY");
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; 65536];
    let mut bytes = 0usize;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => bytes += n,
        }
    }
    println!("RECEIVED {bytes}");
    Ok(())
}

/// Sends `bytes` over TCP to `dst:port`, spread over about `ms` milliseconds (64 KiB writes),
/// then closes and waits for the receiver's close.
fn tcp_send(dst: &str, port: u16, bytes: usize, ms: u64) -> Result<()> {
    let mut s = std::net::TcpStream::connect((dst, port))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let chunk = vec![0x5au8; 65536];
    let chunks = bytes.div_ceil(chunk.len()).max(1);
    let t0 = Instant::now();
    let mut sent = 0;
    for i in 0..chunks {
        let n = chunk.len().min(bytes - sent);
        s.write_all(&chunk[..n])?;
        sent += n;
        let due = Duration::from_millis(ms * (i as u64 + 1) / chunks as u64);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = [0u8; 16];
    while s.read(&mut rest)? > 0 {}
    println!("SENT {sent}");
    Ok(())
}

/// Sends `count` datagrams of `size` payload bytes, paced so that nothing is dropped.
fn udp_send(dst: &str, port: u16, count: usize, size: usize) -> Result<()> {
    let sock = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
    let payload = vec![0xa5u8; size];
    let mut sent = 0;
    for i in 0..count {
        sock.send_to(&payload, (dst, port))?;
        sent += 1;
        if i % 16 == 15 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    println!("SENT {sent}");
    Ok(())
}

/// Allocates and touches `mib` MiB of anonymous memory, says so in `ready`, then sleeps.
fn mem(mib: usize, ready: &str) -> Result<()> {
    // A non-zero fill writes every page (a zeroed allocation could stay unbacked).
    let mut v: Vec<u8> = vec![0x11; mib << 20];
    for i in (0..v.len()).step_by(4096) {
        v[i] = (i >> 12) as u8 | 1;
    }
    std::hint::black_box(&v);
    std::fs::write(ready, format!("{}\n", v.len()))?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        std::hint::black_box(&v);
    }
}

/// Runs `touch <mib>` as a child and says how it ended: `CHILD signal=9` when the OOM killer
/// took it (this small parent is not the one it picks).
fn oom(mib: &str) -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new("/bin/vm-guest")
        .args(["wl", "touch", mib])
        .status()
        .context("starting the allocating child")?;
    match status.signal() {
        Some(sig) => println!("CHILD signal={sig}"),
        None => println!("CHILD exit={}", status.code().unwrap_or(-1)),
    }
    Ok(())
}

/// Allocates and touches `mib` MiB of anonymous memory, 1 MiB at a time, then exits: past the
/// cgroup's memory.max (without swap) it never gets to the end.
fn touch(mib: usize) -> Result<()> {
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(mib);
    for _ in 0..mib {
        // A non-zero fill writes every page.
        held.push(std::hint::black_box(vec![0x5au8; CHUNK]));
    }
    std::hint::black_box(&held);
    println!("SURVIVED {mib}");
    Ok(())
}

/// Burns `ms` milliseconds of CPU time (the process's own clock), then exits: a known amount
/// of `usage_usec` for the cgroup.
fn burn(ms: u64) -> Result<()> {
    let target = Duration::from_millis(ms);
    let mut x: u64 = 0;
    loop {
        for _ in 0..100_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        if Duration::new(t.tv_sec as u64, t.tv_nsec as u32) >= target {
            break;
        }
    }
    println!("BURNT {ms}");
    Ok(())
}

fn spin() -> Result<()> {
    let t0 = Instant::now();
    let mut x: u64 = 0;
    loop {
        for _ in 0..1_000_000 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        std::hint::black_box(t0.elapsed());
    }
}
