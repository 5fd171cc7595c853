//! `/metrics` for Prometheus (text format 0.0.4) and OpenMetrics 1.0, plus `/healthz`.
//!
//! A scrape renders the latest cycle the daemon published: it never triggers collection and
//! never waits for one. Counters are cumulative (CPU seconds, bytes); rates are the
//! scraper's business, so no percentage is exported here.

mod containers;
mod histograms;
mod text;

use crate::derive::Cycle;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use text::{Kind, Writer};

const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the daemon publishes for scrapes: the latest cycle and its own counters.
#[derive(Debug)]
pub struct Exposition {
    latest: RwLock<Option<Arc<Cycle>>>,
    published_at: RwLock<Option<Instant>>,
    collector: RwLock<&'static str>,
    interval: RwLock<Duration>,
    /// Containers left out of a cycle after their retries.
    pub container_errors: AtomicU64,
    /// Cycles that failed as a whole (the cgroup tree could not be listed, ...).
    pub cycle_errors: AtomicU64,
    /// The BPF collector failed at run time and the file readers took over.
    pub bpf_errors: AtomicU64,
    pub export_write_failures: AtomicU64,
    /// Export rewrites skipped because the filesystem was short of space.
    pub export_writes_skipped: AtomicU64,
    /// Bytes of export files written (each rewrite's whole size, copied part included).
    pub export_bytes_written: AtomicU64,
}

impl Exposition {
    pub fn new(collector: &'static str, interval: Duration) -> Self {
        Self {
            latest: RwLock::new(None),
            published_at: RwLock::new(None),
            collector: RwLock::new(collector),
            interval: RwLock::new(interval),
            container_errors: AtomicU64::new(0),
            cycle_errors: AtomicU64::new(0),
            bpf_errors: AtomicU64::new(0),
            export_write_failures: AtomicU64::new(0),
            export_writes_skipped: AtomicU64::new(0),
            export_bytes_written: AtomicU64::new(0),
        }
    }

    pub fn publish(&self, cycle: Arc<Cycle>) {
        if cycle.collector != self.collector() {
            self.bpf_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.container_errors
            .fetch_add(cycle.failed_containers as u64, Ordering::Relaxed);
        if let Ok(mut c) = self.collector.write() {
            *c = cycle.collector;
        }
        if let Ok(mut l) = self.latest.write() {
            *l = Some(cycle);
        }
        if let Ok(mut t) = self.published_at.write() {
            *t = Some(Instant::now());
        }
    }

    pub fn set_interval(&self, interval: Duration) {
        if let Ok(mut i) = self.interval.write() {
            *i = interval;
        }
    }

    /// The collector of the latest published cycle.
    pub fn collector(&self) -> &'static str {
        self.collector.read().map(|c| *c).unwrap_or("files")
    }

    fn latest(&self) -> Option<Arc<Cycle>> {
        self.latest.read().ok().and_then(|l| l.clone())
    }

    /// Healthy while cycles keep coming: the last one is at most three intervals old (and
    /// the first is allowed its interval plus the priming second).
    fn healthy(&self, started: Instant) -> bool {
        let interval = self.interval.read().map(|i| *i).unwrap_or_default();
        let limit = interval * 3 + Duration::from_secs(2);
        match self.published_at.read().ok().and_then(|t| *t) {
            Some(t) => t.elapsed() <= limit,
            None => started.elapsed() <= limit,
        }
    }

    /// The exposition text. `openmetrics` selects OpenMetrics 1.0 over Prometheus 0.0.4.
    pub fn render(&self, openmetrics: bool) -> String {
        let cycle = self.latest();
        let collector = self.collector.read().map(|c| *c).unwrap_or("files");
        render(cycle.as_deref(), collector, self, openmetrics)
    }
}

fn render(cycle: Option<&Cycle>, collector: &str, stats: &Exposition, openmetrics: bool) -> String {
    let mut w = Writer {
        out: String::with_capacity(256 + cycle.map_or(0, |c| c.metrics.len() * 1800)),
        openmetrics,
    };
    if let Some(cycle) = cycle {
        containers::render(&mut w, &cycle.metrics);
        w.family(
            "lxcmon_cycle_duration_seconds",
            Kind::Gauge,
            "Time the last collection cycle took.",
        );
        let took = (cycle.ended - cycle.started).to_std().unwrap_or_default();
        w.sample("lxcmon_cycle_duration_seconds", &[], took.as_secs_f64());
        w.family(
            "lxcmon_last_cycle_timestamp_seconds",
            Kind::Gauge,
            "When the last cycle started (Unix time).",
        );
        w.sample(
            "lxcmon_last_cycle_timestamp_seconds",
            &[],
            cycle.started.timestamp_micros() as f64 / 1e6,
        );
    }
    let (running, exported) = cycle.map_or((0, 0), |c| (c.total_containers, c.metrics.len()));
    w.family(
        "lxcmon_containers_running",
        Kind::Gauge,
        "Containers found running in the last cycle.",
    );
    w.sample("lxcmon_containers_running", &[], running as f64);
    w.family(
        "lxcmon_containers_exported",
        Kind::Gauge,
        "Containers with figures in the last cycle.",
    );
    w.sample("lxcmon_containers_exported", &[], exported as f64);
    if openmetrics {
        let _ = writeln!(
            w.out,
            "# HELP lxcmon_collector Which collector counts network and block I/O."
        );
        let _ = writeln!(w.out, "# TYPE lxcmon_collector info");
    } else {
        w.family(
            "lxcmon_collector_info",
            Kind::Gauge,
            "Which collector counts network and block I/O.",
        );
    }
    w.sample("lxcmon_collector_info", &[("collector", collector)], 1.0);
    w.family(
        "lxcmon_errors_total",
        Kind::Counter,
        "Errors by kind since start.",
    );
    let fallback = cycle.map(|c| c.bpf_fallback).unwrap_or_default();
    for (kind, count) in [
        ("container", stats.container_errors.load(Ordering::Relaxed)),
        ("cycle", stats.cycle_errors.load(Ordering::Relaxed)),
        ("bpf", stats.bpf_errors.load(Ordering::Relaxed)),
        // A container the BPF programs could not count (it runs on the file readers).
        ("bpf_container", fallback.failures_total),
    ] {
        w.sample("lxcmon_errors_total", &[("kind", kind)], count as f64);
    }
    w.family(
        "lxcmon_bpf_fallback_containers",
        Kind::Gauge,
        "Containers the BPF programs cannot count: their network and I/O bytes come from the file readers.",
    );
    w.sample(
        "lxcmon_bpf_fallback_containers",
        &[],
        fallback.containers as f64,
    );
    for (name, help, counter) in [
        (
            "lxcmon_export_write_failures_total",
            "Export file writes that failed.",
            &stats.export_write_failures,
        ),
        (
            "lxcmon_export_writes_skipped_total",
            "Export file writes skipped: the filesystem was short of space.",
            &stats.export_writes_skipped,
        ),
        (
            "lxcmon_export_bytes_written_total",
            "Bytes of export files written (each rewrite's whole size).",
            &stats.export_bytes_written,
        ),
    ] {
        w.family(name, Kind::Counter, help);
        w.sample(name, &[], counter.load(Ordering::Relaxed) as f64);
    }
    if openmetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// Whether the scraper asked for OpenMetrics.
fn wants_openmetrics(accept: Option<&HeaderValue>) -> bool {
    accept
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"))
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn handle(req: &Request<Incoming>, shared: &Exposition, started: Instant) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let om = wants_openmetrics(req.headers().get(ACCEPT));
            let body = shared.render(om);
            respond(
                StatusCode::OK,
                if om {
                    OPENMETRICS_TYPE
                } else {
                    PROMETHEUS_TYPE
                },
                body,
            )
        }
        "/healthz" => {
            if shared.healthy(started) {
                respond(StatusCode::OK, "text/plain", "ok\n".into())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no recent cycle\n".into(),
                )
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "see /metrics and /healthz\n".into(),
        ),
    }
}

/// Connections served at once; more are closed at once, so idle sockets can never take the
/// descriptors the collection needs.
pub const MAX_CONNECTIONS: usize = 64;
/// A request's headers must arrive within this, on a new connection and on an idle
/// kept-alive one (hyper's header-read timeout runs whenever it waits for a request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, however it trickles.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Binds the listener now (so a taken port fails start-up) and serves it on the runtime.
pub async fn serve(addr: SocketAddr, shared: Arc<Exposition>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let started = Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut refusing = false;
        let mut accept_failing = false;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    if !accept_failing {
                        tracing::warn!(error = %e, "accepting a scrape failed (logged once until one succeeds)");
                        accept_failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            accept_failing = false;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if !refusing {
                    tracing::warn!(
                        limit = MAX_CONNECTIONS,
                        "too many /metrics connections; closing new ones until some end"
                    );
                    refusing = true;
                }
                drop(stream);
                continue;
            };
            refusing = false;
            let shared = shared.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let resp = handle(&req, &shared, started);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(io, service);
                match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "scrape connection ended with an error")
                    }
                    Err(_) => tracing::debug!("scrape connection closed at its deadline"),
                }
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::tests::cycle;
    use containers::CONTAINER_FAMILIES;

    #[test]
    fn both_formats_carry_every_family_with_escaped_labels() {
        let shared = Exposition::new("files", Duration::from_secs(1));
        let mut c = cycle(0, &["100", "101"]);
        c.metrics[1].name = "odd \"name\"\\with\nnewline".into();
        shared.publish(Arc::new(c));
        let prom = shared.render(false);
        assert!(prom.contains("# TYPE lxcmon_container_cpu_seconds_total counter"));
        assert!(prom.contains(
            "lxcmon_container_cpu_seconds_total{container_id=\"100\",container_name=\"100-name\"} 1.5\n"
        ));
        assert!(
            prom.contains("container_name=\"odd \\\"name\\\"\\\\with\\nnewline\""),
            "{prom}"
        );
        assert!(prom.contains("lxcmon_collector_info{collector=\"files\"} 1\n"));
        assert!(!prom.contains("# EOF"));
        let om = shared.render(true);
        assert!(om.contains("# TYPE lxcmon_container_cpu_seconds counter\n"));
        assert!(om.contains("lxcmon_container_cpu_seconds_total{"));
        assert!(om.contains("# TYPE lxcmon_collector info\n"));
        assert!(om.ends_with("# EOF\n"));
        for (name, ..) in CONTAINER_FAMILIES {
            assert_eq!(prom.matches(&format!("\n{name}{{")).count(), 2, "{name}");
        }
    }

    /// The details' families in both formats: labelled per interface, device, mount and
    /// event; every family declared, an absent figure without a sample.
    #[test]
    fn detail_families_carry_their_labels_and_leave_absent_figures_out() {
        let shared = Exposition::new("files", Duration::from_secs(1));
        assert!(
            !shared.render(false).contains("lxcmon_container_info"),
            "no cycle yet"
        );
        shared.publish(Arc::new(cycle(0, &["plain"])));
        let only_plain = shared.render(false);
        for name in super::containers::OPTIONAL_FAMILIES
            .iter()
            .map(|f| f.0)
            .chain([
                "lxcmon_container_memory_events_total",
                "lxcmon_container_interface_receive_bytes_total",
                "lxcmon_container_mount_size_bytes",
            ])
        {
            assert!(
                only_plain.contains(&format!("# TYPE {name} ")),
                "{name} undeclared"
            );
            assert!(
                !only_plain.contains(&format!("\n{name}{{")),
                "{name} has a sample"
            );
        }
        let mut c = cycle(0, &["plain"]);
        c.metrics.push(crate::export::tests::metrics_full("full"));
        shared.publish(Arc::new(c));
        let prom = shared.render(false);
        let ids = "container_id=\"full\",container_name=\"full-name\"";
        for line in [
            "lxcmon_container_info{container_id=\"plain\",container_name=\"plain-name\",runtime=\"lxc\",project=\"\",id=\"\"} 1".to_string(),
            format!("lxcmon_container_info{{{ids},runtime=\"incus\",project=\"p2\",id=\"\"}} 1"),
            format!("lxcmon_container_pressure_cpu_waiting_seconds_total{{{ids}}} 2.5"),
            format!("lxcmon_container_pressure_memory_stalled_seconds_total{{{ids}}} 0.0005"),
            format!("lxcmon_container_cpu_cfs_throttled_periods_total{{{ids}}} 50"),
            format!("lxcmon_container_cpu_cfs_throttled_seconds_total{{{ids}}} 2"),
            format!("lxcmon_container_cpu_cfs_quota_seconds{{{ids}}} 0.05"),
            format!("lxcmon_container_oom_kills_total{{{ids}}} 2"),
            format!("lxcmon_container_memory_events_total{{{ids},event=\"max\"}} 7"),
            format!("lxcmon_container_memory_workingset_refaults_total{{{ids}}} 3"),
            format!("lxcmon_container_pids_limit{{{ids}}} 512"),
            format!("lxcmon_container_interface_receive_bytes_total{{{ids},interface=\"eth1\"}} 2000"),
            format!("lxcmon_container_device_writes_total{{{ids},device=\"sda\"}} 2"),
            format!("lxcmon_container_mount_files_free{{{ids},mountpoint=\"/mnt/data \\\"quoted\\\"\",fstype=\"ext4\",shared=\"false\"}} 117"),
            format!("lxcmon_container_mount_size_bytes{{{ids},mountpoint=\"/\",fstype=\"ext4\",shared=\"true\"}} 10737418240"),
        ] {
            assert!(prom.contains(&format!("\n{line}\n")), "{line} missing:\n{prom}");
        }
        for absent in [
            "lxcmon_container_pressure_cpu_stalled_seconds_total{",
            "lxcmon_container_pressure_io_waiting_seconds_total{",
            "lxcmon_container_memory_high_bytes{",
            "event=\"high\"",
        ] {
            assert!(!prom.contains(absent), "{absent} present");
        }
        assert_eq!(
            prom.matches("# TYPE lxcmon_container_interface_receive_bytes_total counter")
                .count(),
            1
        );
        let om = shared.render(true);
        assert!(om.contains("# TYPE lxcmon_container info\n"));
        assert!(om.contains("# TYPE lxcmon_container_oom_kills counter\n"));
        assert!(om.contains(&format!("lxcmon_container_oom_kills_total{{{ids}}} 2\n")));
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn counters_accumulate_and_health_follows_cycles() {
        let shared = Exposition::new("ebpf", Duration::from_millis(10));
        let started = Instant::now() - Duration::from_secs(60);
        assert!(!shared.healthy(started), "no cycle for long after start");
        let mut c = cycle(0, &["a"]);
        c.failed_containers = 2;
        shared.publish(Arc::new(c.clone()));
        shared.publish(Arc::new(c));
        assert!(shared.healthy(started));
        assert!(shared
            .render(false)
            .contains("lxcmon_errors_total{kind=\"container\"} 4\n"));
        assert!(wants_openmetrics(Some(&HeaderValue::from_static(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        ))));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn containers_the_bpf_programs_cannot_count_are_shown() {
        let shared = Exposition::new("ebpf", Duration::from_millis(10));
        let prom = shared.render(false);
        assert!(prom.contains("lxcmon_errors_total{kind=\"bpf_container\"} 0\n"));
        assert!(prom.contains("lxcmon_bpf_fallback_containers 0\n"));
        let mut c = cycle(0, &["a", "b"]);
        c.bpf_fallback = crate::collect::BpfFallback {
            containers: 1,
            failures_total: 3,
        };
        shared.publish(Arc::new(c));
        let prom = shared.render(false);
        assert!(
            prom.contains("lxcmon_errors_total{kind=\"bpf_container\"} 3\n"),
            "{prom}"
        );
        assert!(
            prom.contains("lxcmon_bpf_fallback_containers 1\n"),
            "{prom}"
        );
    }
}
