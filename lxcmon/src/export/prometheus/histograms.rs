//! The per-container latency histograms (`_bucket` with `le` in seconds, `_sum`, `_count`).
//! The family is declared in every scrape; containers without the figure (run-queue wait off,
//! or not measurable on this kernel) have no samples.

use super::text::Writer;
use crate::collect::latency::{bounds_seconds, Histogram};
use crate::derive::ContainerMetrics;

const RUNQUEUE: &str = "lxcmon_container_runqueue_wait_seconds";
const RUNQUEUE_HELP: &str =
    "Time the container's tasks waited on a run queue for a CPU, from becoming runnable to running.";

pub fn render(w: &mut Writer, metrics: &[ContainerMetrics]) {
    family(w, RUNQUEUE, RUNQUEUE_HELP);
    for m in metrics {
        if let Some(h) = m.latency.as_ref().and_then(|l| l.runqueue.as_ref()) {
            histogram(w, RUNQUEUE, m, h);
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

fn histogram(w: &mut Writer, name: &str, m: &ContainerMetrics, h: &Histogram) {
    let bucket = format!("{name}_bucket");
    let bounds = bounds_seconds();
    for (i, c) in h.cumulative.iter().enumerate() {
        let le = bounds
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
        w.sample(
            &bucket,
            &[
                ("container_id", &m.id),
                ("container_name", &m.name),
                ("le", &le),
            ],
            *c as f64,
        );
    }
    let ids = [("container_id", m.id.as_str()), ("container_name", &m.name)];
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
            latency: Some(Latency {
                runqueue: Some(Histogram::from_buckets(&b, 2_500_000_000)),
                runqueue_interval: None,
            }),
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
        }
    }
}
