//! The per-container families: one table of single-value families, and the families with a
//! label of their own (interface, device, mountpoint, event).

use super::text::{Kind, Writer};
use crate::derive::ContainerMetrics;

type Field = fn(&ContainerMetrics) -> f64;

pub const CONTAINER_FAMILIES: &[(&str, Kind, &str, Field)] = &[
    (
        "lxcmon_container_start_time_seconds",
        Kind::Gauge,
        "When this instance of the container started (Unix time); counters restart with it.",
        |m| m.started.timestamp() as f64,
    ),
    (
        "lxcmon_container_cpu_seconds_total",
        Kind::Counter,
        "CPU time used by the container's cgroup.",
        |m| m.cpu_usage_ns as f64 / 1e9,
    ),
    (
        "lxcmon_container_cpu_cores_allowed",
        Kind::Gauge,
        "CPUs the container may use: the smallest of its quota, its cpuset and the host's CPUs.",
        |m| m.cpu_cores_allowed,
    ),
    (
        "lxcmon_container_memory_bytes",
        Kind::Gauge,
        "Memory in use, page cache excluded.",
        |m| m.memory_bytes as f64,
    ),
    (
        "lxcmon_container_memory_limit_bytes",
        Kind::Gauge,
        "Memory limit (the host's memory when unlimited).",
        |m| m.memory_limit_bytes as f64,
    ),
    (
        "lxcmon_container_swap_bytes",
        Kind::Gauge,
        "Swap in use.",
        |m| m.swap_bytes as f64,
    ),
    (
        "lxcmon_container_swap_limit_bytes",
        Kind::Gauge,
        "Swap the container may use, capped by the host's swap.",
        |m| m.swap_limit_bytes as f64,
    ),
    (
        "lxcmon_container_io_read_bytes_total",
        Kind::Counter,
        "Bytes read from block devices not excluded.",
        |m| m.io_read_bytes as f64,
    ),
    (
        "lxcmon_container_io_written_bytes_total",
        Kind::Counter,
        "Bytes written to block devices not excluded.",
        |m| m.io_write_bytes as f64,
    ),
    (
        "lxcmon_container_network_receive_bytes_total",
        Kind::Counter,
        "Bytes received on the container's non-loopback interfaces.",
        |m| m.net_rx_bytes as f64,
    ),
    (
        "lxcmon_container_network_transmit_bytes_total",
        Kind::Counter,
        "Bytes sent on the container's non-loopback interfaces.",
        |m| m.net_tx_bytes as f64,
    ),
    (
        "lxcmon_container_filesystem_size_bytes",
        Kind::Gauge,
        "Size of the container's root filesystem.",
        |m| m.fs.total as f64,
    ),
    (
        "lxcmon_container_filesystem_used_bytes",
        Kind::Gauge,
        "Used bytes of the container's root filesystem.",
        |m| m.fs.used as f64,
    ),
    (
        "lxcmon_container_filesystem_avail_bytes",
        Kind::Gauge,
        "Bytes of the root filesystem available to unprivileged users.",
        |m| m.fs.free as f64,
    ),
    (
        "lxcmon_container_processes",
        Kind::Gauge,
        "Processes in the container's cgroup subtree.",
        |m| m.processes as f64,
    ),
    (
        "lxcmon_container_threads",
        Kind::Gauge,
        "Threads (tasks) in the container's cgroup subtree.",
        |m| m.threads as f64,
    ),
];

type Optional = fn(&ContainerMetrics) -> Option<f64>;

fn secs_us(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Families whose value the kernel or the layout may not have: a container without it has no
/// sample (absent, not 0).
pub const OPTIONAL_FAMILIES: &[(&str, Kind, &str, Optional)] = &[
    (
        "lxcmon_container_pressure_cpu_waiting_seconds_total",
        Kind::Counter,
        "Time at least one task of the container waited for a CPU (PSI cpu some).",
        |m| m.details.pressure.cpu.map(|s| secs_us(s.some_us)),
    ),
    (
        "lxcmon_container_pressure_cpu_stalled_seconds_total",
        Kind::Counter,
        "Time all non-idle tasks of the container waited for a CPU at once (PSI cpu full).",
        |m| m.details.pressure.cpu.and_then(|s| s.full_us).map(secs_us),
    ),
    (
        "lxcmon_container_pressure_memory_waiting_seconds_total",
        Kind::Counter,
        "Time at least one task of the container stalled on memory (PSI memory some).",
        |m| m.details.pressure.memory.map(|s| secs_us(s.some_us)),
    ),
    (
        "lxcmon_container_pressure_memory_stalled_seconds_total",
        Kind::Counter,
        "Time all non-idle tasks of the container stalled on memory at once (PSI memory full).",
        |m| m.details.pressure.memory.and_then(|s| s.full_us).map(secs_us),
    ),
    (
        "lxcmon_container_pressure_io_waiting_seconds_total",
        Kind::Counter,
        "Time at least one task of the container stalled on I/O (PSI io some).",
        |m| m.details.pressure.io.map(|s| secs_us(s.some_us)),
    ),
    (
        "lxcmon_container_pressure_io_stalled_seconds_total",
        Kind::Counter,
        "Time all non-idle tasks of the container stalled on I/O at once (PSI io full).",
        |m| m.details.pressure.io.and_then(|s| s.full_us).map(secs_us),
    ),
    (
        "lxcmon_container_cpu_cfs_periods_total",
        Kind::Counter,
        "CFS enforcement periods that elapsed with runnable tasks.",
        |m| m.details.throttling.map(|t| t.periods as f64),
    ),
    (
        "lxcmon_container_cpu_cfs_throttled_periods_total",
        Kind::Counter,
        "CFS periods in which the container used up its CPU quota.",
        |m| m.details.throttling.map(|t| t.throttled_periods as f64),
    ),
    (
        "lxcmon_container_cpu_cfs_throttled_seconds_total",
        Kind::Counter,
        "Time the container's tasks were held back by its CPU quota.",
        |m| m.details.throttling.map(|t| t.throttled_ns as f64 / 1e9),
    ),
    (
        "lxcmon_container_cpu_cfs_quota_seconds",
        Kind::Gauge,
        "CPU time the container may use per CFS period (absent when unlimited).",
        |m| m.limits.cpu_quota_us.map(secs_us),
    ),
    (
        "lxcmon_container_cpu_cfs_period_seconds",
        Kind::Gauge,
        "The CFS enforcement period.",
        |m| m.limits.cpu_period_us.map(secs_us),
    ),
    (
        "lxcmon_container_cpuset_cpus",
        Kind::Gauge,
        "CPUs in the container's effective cpuset.",
        |m| m.limits.cpuset_cpus.map(f64::from),
    ),
    (
        "lxcmon_container_oom_kills_total",
        Kind::Counter,
        "Processes of the container killed by the OOM killer.",
        |m| m.details.memory_events.oom_kill.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_anon_bytes",
        Kind::Gauge,
        "Anonymous memory (heap, stacks, anonymous mappings).",
        |m| m.details.memory.anon_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_file_bytes",
        Kind::Gauge,
        "Page cache charged to the container.",
        |m| m.details.memory.file_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_kernel_bytes",
        Kind::Gauge,
        "Kernel memory charged to the container (slab, stacks, page tables, ...).",
        |m| m.details.memory.kernel_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_slab_bytes",
        Kind::Gauge,
        "Slab memory charged to the container.",
        |m| m.details.memory.slab_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_shmem_bytes",
        Kind::Gauge,
        "Shared memory and tmpfs pages charged to the container.",
        |m| m.details.memory.shmem_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_dirty_bytes",
        Kind::Gauge,
        "Page cache waiting to be written back.",
        |m| m.details.memory.dirty_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_writeback_bytes",
        Kind::Gauge,
        "Page cache being written back.",
        |m| m.details.memory.writeback_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_workingset_refaults_total",
        Kind::Counter,
        "Pages faulted back in soon after they were evicted: the container is thrashing.",
        |m| m.details.memory.workingset_refaults.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_major_page_faults_total",
        Kind::Counter,
        "Page faults that needed I/O.",
        |m| m.details.memory.major_faults.map(|v| v as f64),
    ),
    (
        "lxcmon_container_memory_high_bytes",
        Kind::Gauge,
        "memory.high: above it the container's allocations are throttled and reclaimed (absent when unset).",
        |m| m.limits.memory_high_bytes.map(|v| v as f64),
    ),
    (
        "lxcmon_container_pids_limit",
        Kind::Gauge,
        "pids.max of the container (absent when unlimited).",
        |m| m.limits.pids_max.map(|v| v as f64),
    ),
    (
        "lxcmon_container_tcp_retransmitted_segments_total",
        Kind::Counter,
        "TCP segments the container's sockets retransmitted (BPF collector; as the kernel's RetransSegs).",
        |m| m.latency.as_ref()?.tcp_retransmits.map(|v| v as f64),
    ),
];

/// Renders every per-container family. Each family is declared even without a sample (no
/// container, or the figure absent everywhere), so a scrape always lists what the agent serves.
pub fn render(w: &mut Writer, metrics: &[ContainerMetrics]) {
    info(w, metrics);
    for (name, kind, help, field) in CONTAINER_FAMILIES {
        w.family(name, *kind, help);
        for m in metrics {
            w.sample(name, &ids(m), field(m));
        }
    }
    for (name, kind, help, field) in OPTIONAL_FAMILIES {
        w.family(name, *kind, help);
        for m in metrics {
            if let Some(v) = field(m) {
                w.sample(name, &ids(m), v);
            }
        }
    }
    memory_events(w, metrics);
    interfaces(w, metrics);
    devices(w, metrics);
    mounts(w, metrics);
    super::histograms::render(w, metrics);
}

fn ids(m: &ContainerMetrics) -> [(&'static str, &str); 2] {
    [("container_id", &m.id), ("container_name", &m.name)]
}

/// `lxcmon_container_info`: what to join other series on (pve-exporter's `id="lxc/<vmid>"`).
fn info(w: &mut Writer, metrics: &[ContainerMetrics]) {
    let help =
        "The container's identity: runtime, Incus project, and pve-exporter's id on Proxmox.";
    if w.openmetrics {
        w.out.push_str("# HELP lxcmon_container ");
        w.out.push_str(help);
        w.out.push_str("\n# TYPE lxcmon_container info\n");
    } else {
        w.family("lxcmon_container_info", Kind::Gauge, help);
    }
    for m in metrics {
        let pve_id = match m.runtime {
            crate::collect::discovery::Runtime::Proxmox => format!("lxc/{}", m.id),
            _ => String::new(),
        };
        let [id, name] = ids(m);
        w.sample(
            "lxcmon_container_info",
            &[
                id,
                name,
                ("runtime", m.runtime.as_str()),
                ("project", m.project.as_deref().unwrap_or("")),
                ("id", &pve_id),
            ],
            1.0,
        );
    }
}

/// Limit hits by kind; OOM kills have a family of their own.
fn memory_events(w: &mut Writer, metrics: &[ContainerMetrics]) {
    const NAME: &str = "lxcmon_container_memory_events_total";
    w.family(
        NAME,
        Kind::Counter,
        "Memory events of the container's cgroup: high (reclaim forced by memory.high), max (the limit reached), oom (the OOM killer invoked), ...",
    );
    for m in metrics {
        let e = &m.details.memory_events;
        for (event, v) in [
            ("high", e.high),
            ("max", e.max),
            ("oom", e.oom),
            ("oom_group_kill", e.oom_group_kill),
            ("swap_high", e.swap_high),
            ("swap_max", e.swap_max),
            ("swap_fail", e.swap_fail),
        ] {
            let Some(v) = v else { continue };
            let [id, name] = ids(m);
            w.sample(NAME, &[id, name, ("event", event)], v as f64);
        }
    }
}

/// Each item's label values and figures.
/// Label values borrowed from the metrics: a scrape copies no names.
type Items<'m, const L: usize, const N: usize> = Vec<([&'m str; L], [f64; N])>;

/// One family per figure, one sample per (container, item): `labelled` yields each item's
/// label values and figures, in the order of `figures`.
fn per_item<'m, const L: usize, const N: usize>(
    w: &mut Writer,
    metrics: &'m [ContainerMetrics],
    labels: [&'static str; L],
    figures: [(&'static str, Kind, &'static str); N],
    items: impl Fn(&'m ContainerMetrics) -> Items<'m, L, N>,
) {
    let rows: Vec<(&ContainerMetrics, Items<'m, L, N>)> =
        metrics.iter().map(|m| (m, items(m))).collect();
    for (i, (name, kind, help)) in figures.iter().enumerate() {
        w.family(name, *kind, help);
        for (m, items) in &rows {
            for (values, figures) in items {
                let [id, cname] = ids(m);
                let mut l: Vec<(&str, &str)> = vec![id, cname];
                l.extend(labels.iter().zip(values.iter()).map(|(k, v)| (*k, *v)));
                w.sample(name, &l, figures[i]);
            }
        }
    }
}

fn interfaces(w: &mut Writer, metrics: &[ContainerMetrics]) {
    per_item(
        w,
        metrics,
        ["interface"],
        [
            (
                "lxcmon_container_interface_receive_bytes_total",
                Kind::Counter,
                "Bytes received on the interface, as the container sees it.",
            ),
            (
                "lxcmon_container_interface_receive_packets_total",
                Kind::Counter,
                "Packets received on the interface.",
            ),
            (
                "lxcmon_container_interface_receive_errors_total",
                Kind::Counter,
                "Receive errors on the interface.",
            ),
            (
                "lxcmon_container_interface_receive_drops_total",
                Kind::Counter,
                "Received packets dropped on the interface.",
            ),
            (
                "lxcmon_container_interface_transmit_bytes_total",
                Kind::Counter,
                "Bytes sent on the interface.",
            ),
            (
                "lxcmon_container_interface_transmit_packets_total",
                Kind::Counter,
                "Packets sent on the interface.",
            ),
            (
                "lxcmon_container_interface_transmit_errors_total",
                Kind::Counter,
                "Transmit errors on the interface.",
            ),
            (
                "lxcmon_container_interface_transmit_drops_total",
                Kind::Counter,
                "Packets dropped on the interface while sending.",
            ),
        ],
        |m| {
            m.interfaces
                .iter()
                .map(|i| {
                    (
                        [i.name.as_str()],
                        [
                            i.rx_bytes,
                            i.rx_packets,
                            i.rx_errors,
                            i.rx_drops,
                            i.tx_bytes,
                            i.tx_packets,
                            i.tx_errors,
                            i.tx_drops,
                        ]
                        .map(|v| v as f64),
                    )
                })
                .collect()
        },
    );
}

fn devices(w: &mut Writer, metrics: &[ContainerMetrics]) {
    per_item(
        w,
        metrics,
        ["device"],
        [
            (
                "lxcmon_container_device_read_bytes_total",
                Kind::Counter,
                "Bytes the container read from the block device.",
            ),
            (
                "lxcmon_container_device_written_bytes_total",
                Kind::Counter,
                "Bytes the container wrote to the block device.",
            ),
            (
                "lxcmon_container_device_reads_total",
                Kind::Counter,
                "Read operations of the container on the block device.",
            ),
            (
                "lxcmon_container_device_writes_total",
                Kind::Counter,
                "Write operations of the container on the block device.",
            ),
        ],
        |m| {
            m.details
                .devices
                .iter()
                .map(|d| {
                    (
                        [&*d.name],
                        [d.read_bytes, d.write_bytes, d.reads, d.writes].map(|v| v as f64),
                    )
                })
                .collect()
        },
    );
}

fn mounts(w: &mut Writer, metrics: &[ContainerMetrics]) {
    per_item(
        w,
        metrics,
        ["mountpoint", "fstype", "shared"],
        [
            ("lxcmon_container_mount_size_bytes", Kind::Gauge, "Size of a filesystem mounted in the container (shared=\"true\": not the container's own, its figures are the whole filesystem's)."),
            ("lxcmon_container_mount_used_bytes", Kind::Gauge, "Used bytes of a filesystem mounted in the container."),
            ("lxcmon_container_mount_avail_bytes", Kind::Gauge, "Bytes of a filesystem mounted in the container available to unprivileged users."),
            ("lxcmon_container_mount_files", Kind::Gauge, "Inodes of a filesystem mounted in the container."),
            ("lxcmon_container_mount_files_free", Kind::Gauge, "Free inodes of a filesystem mounted in the container."),
        ],
        |m| {
            m.mounts
                .iter()
                .map(|u| {
                    (
                        [
                            u.mountpoint.as_str(),
                            u.fstype.as_str(),
                            if u.shared { "true" } else { "false" },
                        ],
                        [u.size_bytes, u.used_bytes, u.avail_bytes, u.inodes, u.inodes_free]
                            .map(|v| v as f64),
                    )
                })
                .collect()
        },
    );
}
