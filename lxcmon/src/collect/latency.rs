//! Latency distributions per container (run-queue wait, block I/O latency), as the BPF collector counts them:
//! log-spaced buckets (powers of two from 1 µs, see `lxcmon_common::latency_bucket`), kept
//! cumulative and monotonic per container instance, with the growth over the last interval for
//! the per-interval figures (`records`' p50 / p99 / total).

use lxcmon_common::{LATENCY_BOUNDED, LATENCY_BUCKETS, LATENCY_FIRST_BOUND_NS};
use std::sync::OnceLock;

/// The buckets' upper bounds in seconds (1 µs · 2^i), ascending; the last bucket is `+Inf`.
pub fn bounds_seconds() -> &'static [f64] {
    static BOUNDS: OnceLock<Vec<f64>> = OnceLock::new();
    BOUNDS.get_or_init(|| {
        (0..LATENCY_BOUNDED)
            .map(|i| (LATENCY_FIRST_BOUND_NS << i) as f64 / 1e9)
            .collect()
    })
}

/// A latency histogram in the Prometheus sense; a plain array, so keeping it per container
/// and cycle allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Histogram {
    /// `cumulative[i]`: latencies of at most `bounds_seconds()[i]`; one more element than the
    /// bounds, the last being every latency (`le="+Inf"`, the count).
    pub cumulative: [u64; LATENCY_BUCKETS],
    /// Sum of the latencies, nanoseconds.
    pub sum_ns: u64,
}

impl Histogram {
    /// From per-bucket (not cumulative) counts, the overflow bucket last.
    pub fn from_buckets(buckets: &[u64; LATENCY_BUCKETS], sum_ns: u64) -> Self {
        let mut cumulative = *buckets;
        for i in 1..LATENCY_BUCKETS {
            cumulative[i] = cumulative[i].saturating_add(cumulative[i - 1]);
        }
        Self { cumulative, sum_ns }
    }

    pub fn count(&self) -> u64 {
        self.cumulative[LATENCY_BUCKETS - 1]
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// Per-bucket counts (not cumulative).
    pub fn buckets(&self) -> impl Iterator<Item = u64> + '_ {
        let mut prev = 0u64;
        self.cumulative.iter().map(move |c| {
            let b = c.saturating_sub(prev);
            prev = *c;
            b
        })
    }

    /// What was added since `earlier` (same instance, so every bucket only grew).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let mut cumulative = self.cumulative;
        for (c, e) in cumulative.iter_mut().zip(&earlier.cumulative) {
            *c = c.saturating_sub(*e);
        }
        Histogram {
            cumulative,
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly within its bucket as
    /// Prometheus' `histogram_quantile` does; in the overflow bucket, the highest bound. `None`
    /// without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let bounds = bounds_seconds();
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut below = 0u64;
        for (i, c) in self.cumulative.iter().enumerate() {
            if (*c as f64) >= rank && *c > below {
                let Some(upper) = bounds.get(i) else {
                    return bounds.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                let in_bucket = (*c - below) as f64;
                return Some(lower + (upper - lower) * (rank - below as f64) / in_bucket);
            }
            below = *c;
        }
        bounds.last().copied()
    }
}

/// A container's latency figures: each `None` where it is not measured (switched off, or the
/// kernel refused the programs).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Latency {
    /// Time its tasks waited on a run queue for a CPU, cumulative for this instance.
    pub runqueue: Option<Histogram>,
    /// The growth of `runqueue` over the last interval (`None` in an instance's first cycle).
    pub runqueue_interval: Option<Histogram>,
    /// Block I/O latency from the block layer's start of a request to its completion, reads
    /// and writes, cumulative for this instance.
    pub io_read: Option<Histogram>,
    pub io_write: Option<Histogram>,
    /// Their growth over the last interval (`None` in an instance's first cycle).
    pub io_read_interval: Option<Histogram>,
    pub io_write_interval: Option<Histogram>,
    /// TCP segments its sockets retransmitted, cumulative for this instance (a counter, not a
    /// latency: it comes from the same kernel side and flows the same way).
    pub tcp_retransmits: Option<u64>,
}

/// Per-interval summary of a latency histogram's growth (`records`): the median and 99th
/// percentile in milliseconds (omitted without observations) and the total in seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IntervalSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    pub total_seconds: f64,
}

impl IntervalSummary {
    pub fn new(growth: &Histogram) -> Self {
        let ms = |q: f64| growth.quantile(q).map(|s| (s * 1e6).round() / 1e3);
        Self {
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            total_seconds: (growth.sum_seconds() * 1e6).round() / 1e6,
        }
    }
}

/// Per-interval summary of an I/O latency histogram's growth: median and 99th percentile in
/// milliseconds (omitted without requests), how many requests completed, and their latencies'
/// total in seconds (the mean, `iostat`'s await, is `total_seconds / count`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IoSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    pub count: u64,
    pub total_seconds: f64,
}

impl IoSummary {
    pub fn new(growth: &Histogram) -> Self {
        let ms = |q: f64| growth.quantile(q).map(|s| (s * 1e6).round() / 1e3);
        Self {
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            count: growth.count(),
            total_seconds: (growth.sum_seconds() * 1e6).round() / 1e6,
        }
    }
}

/// `records`' `io_latency`: reads and writes of the last interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IoLatencySummary {
    pub read: IoSummary,
    pub write: IoSummary,
}

impl Latency {
    /// The block I/O latency of the last interval (`None` in an instance's first cycle, or
    /// when not measured).
    pub fn io_summary(&self) -> Option<IoLatencySummary> {
        Some(IoLatencySummary {
            read: IoSummary::new(self.io_read_interval.as_ref()?),
            write: IoSummary::new(self.io_write_interval.as_ref()?),
        })
    }

    /// The run-queue wait of the last interval (`None` in an instance's first cycle, or when
    /// not measured).
    pub fn runqueue_summary(&self) -> Option<IntervalSummary> {
        self.runqueue_interval.as_ref().map(IntervalSummary::new)
    }
}

/// Keeps a container's histogram monotonic per instance, whatever its source does (a slot
/// re-seeded after a tracking failure): like the cumulative counters, growth is added to what
/// was reported, a source that went backwards counts from its new value.
#[derive(Debug, Clone, Default)]
pub struct Monotonic {
    instance: u64,
    raw: Histogram,
    reported: Histogram,
    seen: bool,
}

impl Monotonic {
    /// Takes the raw cumulative histogram of `instance`; returns the cumulative figure to
    /// report and its growth since the last call (`None` for a new instance).
    pub fn advance(&mut self, instance: u64, raw: Histogram) -> (Histogram, Option<Histogram>) {
        if !self.seen || self.instance != instance {
            *self = Self {
                instance,
                raw,
                reported: raw,
                seen: true,
            };
            return (raw, None);
        }
        let went_back = raw.sum_ns < self.raw.sum_ns
            || raw
                .cumulative
                .iter()
                .zip(&self.raw.cumulative)
                .any(|(n, o)| n < o);
        let growth = if went_back { raw } else { raw.since(&self.raw) };
        for (r, g) in self.reported.cumulative.iter_mut().zip(&growth.cumulative) {
            *r = r.saturating_add(*g);
        }
        self.reported.sum_ns = self.reported.sum_ns.saturating_add(growth.sum_ns);
        self.raw = raw;
        (self.reported, Some(growth))
    }
}

/// Keeps a container's counter monotonic per instance, as [`Monotonic`] does for histograms.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicCount {
    instance: u64,
    raw: u64,
    reported: u64,
    seen: bool,
}

impl MonotonicCount {
    /// Takes the raw cumulative count of `instance`; returns the cumulative figure to report.
    pub fn advance(&mut self, instance: u64, raw: u64) -> u64 {
        if !self.seen || self.instance != instance {
            *self = Self {
                instance,
                raw,
                reported: raw,
                seen: true,
            };
            return raw;
        }
        // A source that went backwards (a re-seeded slot) counts from its new value.
        let growth = raw.checked_sub(self.raw).unwrap_or(raw);
        self.raw = raw;
        self.reported = self.reported.saturating_add(growth);
        self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(pairs: &[(usize, u64)], sum_ns: u64) -> Histogram {
        let mut b = [0u64; LATENCY_BUCKETS];
        for (i, n) in pairs {
            b[*i] = *n;
        }
        Histogram::from_buckets(&b, sum_ns)
    }

    #[test]
    fn bounds_are_powers_of_two_microseconds() {
        let b = bounds_seconds();
        assert_eq!(b.len(), LATENCY_BOUNDED);
        assert_eq!(b[0], 1e-6);
        assert_eq!(b[10], 1.024e-3);
        assert!((b[23] - 8.388608).abs() < 1e-12);
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        // 100 waits in (1 ms, 2 ms] (bucket 11: 1.024 ms .. 2.048 ms).
        let h = hist(&[(11, 100)], 150_000_000);
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - (1.024e-3 + 0.5 * 1.024e-3)).abs() < 1e-12, "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((p99 - (1.024e-3 + 0.99 * 1.024e-3)).abs() < 1e-12, "{p99}");
        // 90 fast, 10 slow: p50 among the fast, p99 among the slow.
        let h = hist(&[(2, 90), (20, 10)], 0);
        assert!(h.quantile(0.5).unwrap() <= 4e-6);
        assert!(h.quantile(0.99).unwrap() > bounds_seconds()[19]);
        // Overflow: the highest bound.
        let h = hist(&[(LATENCY_BOUNDED, 3)], 0);
        assert_eq!(h.quantile(0.5), bounds_seconds().last().copied());
        assert_eq!(Histogram::default().quantile(0.5), None);
        assert_eq!(hist(&[], 0).quantile(0.99), None);
    }

    #[test]
    fn interval_summary_in_milliseconds() {
        let s = IntervalSummary::new(&hist(&[(11, 100)], 150_000_000));
        assert_eq!(s.p50_ms, Some(1.536));
        assert_eq!(s.total_seconds, 0.15);
        let s = IntervalSummary::new(&hist(&[], 0));
        assert_eq!((s.p50_ms, s.p99_ms, s.total_seconds), (None, None, 0.0));
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"total_seconds":0.0}"#
        );
    }

    #[test]
    fn io_summary_counts_requests_and_needs_both_growths() {
        let mut l = Latency {
            io_read_interval: Some(hist(&[(7, 10)], 1_000_000)),
            ..Latency::default()
        };
        assert_eq!(l.io_summary(), None, "first cycle: no growth yet");
        l.io_write_interval = Some(hist(&[], 0));
        let s = l.io_summary().unwrap();
        assert_eq!(s.read.count, 10);
        assert_eq!(s.read.p50_ms, Some(0.096)); // (64 us, 128 us], halfway
        assert_eq!(s.read.total_seconds, 0.001);
        assert_eq!(
            serde_json::to_string(&s.write).unwrap(),
            r#"{"count":0,"total_seconds":0.0}"#
        );
    }

    #[test]
    fn a_count_is_monotonic_per_instance() {
        let mut m = MonotonicCount::default();
        assert_eq!(m.advance(1, 5), 5);
        assert_eq!(m.advance(1, 9), 9);
        // Reset source: its new value is growth.
        assert_eq!(m.advance(1, 2), 11);
        assert_eq!(m.advance(1, 3), 12);
        // A new instance starts afresh.
        assert_eq!(m.advance(2, 1), 1);
    }

    #[test]
    fn monotonic_per_instance_with_interval_growth() {
        let mut m = Monotonic::default();
        let (r, i) = m.advance(1, hist(&[(3, 5)], 50));
        assert_eq!((r.count(), i), (5, None));
        let (r, i) = m.advance(1, hist(&[(3, 7), (5, 1)], 90));
        assert_eq!(r.count(), 8);
        let i = i.unwrap();
        assert_eq!((i.count(), i.sum_ns), (3, 40));
        assert_eq!(i.buckets().collect::<Vec<_>>()[3..6], [2, 0, 1]);
        // The source was reset (re-seeded slot): its new counts are growth, nothing goes back.
        let (r, i) = m.advance(1, hist(&[(3, 1)], 10));
        assert_eq!((r.count(), r.sum_ns), (9, 100));
        assert_eq!(i.unwrap().count(), 1);
        // A new instance starts afresh.
        let (r, i) = m.advance(2, hist(&[(1, 2)], 4));
        assert_eq!((r.count(), i), (2, None));
    }
}
