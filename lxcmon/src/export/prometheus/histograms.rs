//! The per-container latency histograms (`_bucket` with `le` in seconds, `_sum`, `_count`).
//! The family is declared in every scrape; containers without the figure (run-queue wait off,
//! or not measurable on this kernel) have no samples.

use super::text::Writer;
use crate::collect::latency::{bounds_seconds, Histogram};
use crate::derive::ContainerMetrics;

const RUNQUEUE: &str = "lxcmon_container_runqueue_wait_seconds";
const RUNQUEUE_HELP: &str =
    "Time the container's tasks waited on a run queue for a CPU, from becoming runnable to running.";

const IO: &str = "lxcmon_container_io_latency_seconds";
const IO_HELP: &str =
    "Time the container's block I/O requests took from issue to the device to completion, by operation.";

pub fn render(w: &mut Writer, metrics: &[ContainerMetrics]) {
    family(w, RUNQUEUE, RUNQUEUE_HELP);
    for m in metrics {
        if let Some(h) = m.latency.as_ref().and_then(|l| l.runqueue.as_ref()) {
            histogram(w, RUNQUEUE, m, None, h);
        }
    }
    family(w, IO, IO_HELP);
    for m in metrics {
        let Some(l) = m.latency.as_ref() else {
            continue;
        };
        for (op, h) in [("read", &l.io_read), ("write", &l.io_write)] {
            if let Some(h) = h {
                histogram(w, IO, m, Some(op), h);
            }
        }
    }
}

fn family(w: &mut Writer, name: &str, help: &str) {
    w.out.push_str("# HELP ");
    w.out.push_str(name);
    w.out.push(' ');
    w.out.push_str(help);
    w.out.push_str("\n# TYPE ");
    w.out.push_str(name);
    w.out.push_str(" histogram\n");
}

/// One histogram's series; `op` adds the `op` label (I/O latency).
fn histogram(w: &mut Writer, name: &str, m: &ContainerMetrics, op: Option<&str>, h: &Histogram) {
    let bucket = format!("{name}_bucket");
    let bounds = bounds_seconds();
    let mut ids: Vec<(&str, &str)> = vec![("container_id", &m.id), ("container_name", &m.name)];
    if let Some(op) = op {
        ids.push(("op", op));
    }
    for (i, c) in h.cumulative.iter().enumerate() {
        let le = bounds
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
        let mut labels = ids.clone();
        labels.push(("le", &le));
        w.sample(&bucket, &labels, *c as f64);
    }
    w.sample(&format!("{name}_sum"), &ids, h.sum_seconds());
    w.sample(&format!("{name}_count"), &ids, h.count() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::latency::Latency;
    use lxcmon_common::LATENCY_BUCKETS;

    fn with_hist(id: &str) -> ContainerMetrics {
        let mut b = [0u64; LATENCY_BUCKETS];
        b[0] = 2;
        b[3] = 5;
        b[LATENCY_BUCKETS - 1] = 1;
        ContainerMetrics {
            latency: Some(Box::new(Latency {
                runqueue: Some(Histogram::from_buckets(&b, 2_500_000_000)),
                ..Latency::default()
            })),
            ..crate::export::tests::metrics(id, 1)
        }
    }

    #[test]
    fn a_histogram_has_cumulative_buckets_sum_and_count() {
        for openmetrics in [false, true] {
            let mut w = Writer {
                out: String::new(),
                openmetrics,
            };
            let plain = crate::export::tests::metrics("b", 2);
            render(&mut w, &[with_hist("a"), plain]);
            let out = w.out;
            assert!(out.contains("# TYPE lxcmon_container_runqueue_wait_seconds histogram\n"));
            let line = |needle: &str| {
                out.lines()
                    .find(|l| l.contains(needle))
                    .unwrap_or_else(|| panic!("no {needle} in\n{out}"))
                    .to_string()
            };
            assert!(line(r#"le="0.000001"}"#).ends_with(" 2"));
            assert!(line(r#"le="0.000004"}"#).ends_with(" 2"));
            assert!(line(r#"le="0.000008"}"#).ends_with(" 7"));
            assert!(line(r#"le="8.388608"}"#).ends_with(" 7"));
            assert!(line(r#"le="+Inf"}"#).ends_with(" 8"));
            assert!(line("_sum{").ends_with(" 2.5"));
            assert!(line("_count{").ends_with(" 8"));
            assert_eq!(out.matches("_bucket{").count(), LATENCY_BUCKETS);
            assert!(!out.contains(r#"container_id="b""#), "absent, not 0");
            assert!(out.contains("# TYPE lxcmon_container_io_latency_seconds histogram\n"));
            assert!(!out.contains("lxcmon_container_io_latency_seconds_count"));
        }
    }

    /// The retransmit counter (declared with the single-value families): a sample where
    /// counted, 0 included; none where absent.
    #[test]
    fn tcp_retransmits_is_a_counter_sample_or_none() {
        let mut w = Writer {
            out: String::new(),
            openmetrics: false,
        };
        let mut some = crate::export::tests::metrics("some", 1);
        some.latency = Some(Box::new(Latency {
            tcp_retransmits: Some(42),
            ..Latency::default()
        }));
        let mut zero = crate::export::tests::metrics("zero", 1);
        zero.latency = Some(Box::new(Latency {
            tcp_retransmits: Some(0),
            ..Latency::default()
        }));
        let off = crate::export::tests::metrics("off", 1);
        super::super::containers::render(&mut w, &[some, zero, off]);
        let f = "lxcmon_container_tcp_retransmitted_segments_total";
        assert!(w.out.contains(&format!("# TYPE {f} counter\n")));
        let sample = |id: &str| {
            w.out
                .lines()
                .find(|l| l.starts_with(f) && l.contains(&format!("container_id=\"{id}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(sample("some").as_deref(), Some("42"));
        assert_eq!(sample("zero").as_deref(), Some("0"));
        assert_eq!(sample("off"), None, "absent, not 0");
    }

    #[test]
    fn io_latency_has_an_op_label_per_operation() {
        let mut b = [0u64; LATENCY_BUCKETS];
        b[6] = 4; // (32 us, 64 us]
        let mut m = crate::export::tests::metrics("a", 1);
        m.latency = Some(Box::new(Latency {
            io_read: Some(Histogram::from_buckets(&b, 200_000)),
            io_write: Some(Histogram::default()),
            ..Latency::default()
        }));
        let mut w = Writer {
            out: String::new(),
            openmetrics: false,
        };
        render(&mut w, &[m]);
        let out = w.out;
        let read = out
            .lines()
            .find(|l| {
                l.starts_with("lxcmon_container_io_latency_seconds_count")
                    && l.contains(r#"op="read""#)
            })
            .unwrap_or_else(|| panic!("{out}"));
        assert!(read.ends_with(" 4"), "{read}");
        assert!(out.contains(r#"op="read",le="0.000064"} 4"#), "{out}");
        assert!(out.contains(r#"op="read",le="0.000032"} 0"#), "{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with("lxcmon_container_io_latency_seconds_sum")
                    && l.contains(r#"op="read""#)
                    && l.ends_with(" 0.0002")),
            "{out}"
        );
        assert!(
            out.lines().any(
                |l| l.starts_with("lxcmon_container_io_latency_seconds_count")
                    && l.contains(r#"op="write""#)
            ),
            "{out}"
        );
        assert!(!out.contains("lxcmon_container_runqueue_wait_seconds_count"));
    }
}
