//! Latencies recorded into an HDR histogram and summed up as percentiles.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The largest latency kept apart, in µs (a minute); longer ones count as this. The
/// histogram is sized for it up front so that recording never allocates mid-run.
const MAX_RECORDED_US: u64 = 60_000_000;
/// Significant decimal digits kept: values are exact up to 2048 µs, and within 0.1%
/// above.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The report of `rr` and `connect`: how many operations were timed and their
/// latency in µs. Percentiles and max are the histogram's (3 significant digits), the
/// mean is exact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Operations timed.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

/// Collects latencies for a [`LatencyReport`].
pub(super) struct LatencyRecorder {
    histogram: Histogram<u64>,
    total: Duration,
}

impl LatencyRecorder {
    pub(super) fn new() -> LatencyRecorder {
        LatencyRecorder {
            histogram: Histogram::new_with_max(MAX_RECORDED_US, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid"),
            total: Duration::ZERO,
        }
    }

    pub(super) fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.histogram.saturating_record(us);
        self.total += latency;
    }

    /// The summary, or `None` when nothing was recorded.
    pub(super) fn report(&self) -> Option<LatencyReport> {
        let count = self.histogram.len();
        if count == 0 {
            return None;
        }
        Some(LatencyReport {
            count,
            p50_us: self.histogram.value_at_quantile(0.50),
            p90_us: self.histogram.value_at_quantile(0.90),
            p99_us: self.histogram.value_at_quantile(0.99),
            max_us: self.histogram.max(),
            mean_us: self.total.as_secs_f64() * 1e6 / count as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_latencies() {
        let mut recorder = LatencyRecorder::new();
        assert_eq!(recorder.report(), None);
        for us in 1..=100 {
            recorder.record(Duration::from_micros(us));
        }
        // Beyond the histogram's range: kept as the largest value, counted in the mean.
        recorder.record(Duration::from_secs(3600));
        let report = recorder.report().unwrap();
        assert_eq!(report.count, 101);
        assert_eq!((report.p50_us, report.p90_us, report.p99_us), (51, 91, 100));
        assert!(
            report.max_us >= MAX_RECORDED_US && report.max_us < MAX_RECORDED_US * 1001 / 1000,
            "{report:?}"
        );
        let mean = (5050.0 + 3600e6) / 101.0;
        assert!((report.mean_us - mean).abs() < 1e-3, "{report:?}");
    }
}
