//! Samples and their summaries: median and p99, and rates over time windows.

use std::time::{Duration, Instant};

/// A set of measurements of one quantity (durations in milliseconds, rates in
/// events per second, sizes in MiB...), summarised by its median and its 99th
/// percentile.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    values: Vec<f64>,
}

impl Samples {
    pub fn new() -> Samples {
        Samples::default()
    }

    pub fn from_values(values: Vec<f64>) -> Samples {
        Samples { values }
    }

    pub fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    /// Adds a duration, in milliseconds.
    pub fn push_ms(&mut self, d: Duration) {
        self.values.push(d.as_secs_f64() * 1e3);
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// The `q` quantile (0 to 1), nearest rank on the sorted values; NaN when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.values.is_empty() {
            return f64::NAN;
        }
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        let rank = (q * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }

    pub fn p99(&self) -> f64 {
        self.quantile(0.99)
    }

    /// The 1st percentile: for rates, the figure 99% of windows reach or exceed.
    pub fn p1(&self) -> f64 {
        self.quantile(0.01)
    }

    #[cfg(test)]
    fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// Completion times of events, turned into rates per time window: the median rate
/// and the rate 99% of windows reach (the "p99" of a throughput). A time may count
/// several events (a reply to a request of 32), or a fraction of one (one of the 50
/// deliveries an event takes to reach 50 subscribers).
#[derive(Debug, Clone)]
pub struct Rates {
    start: Instant,
    times: Vec<(Instant, f64)>,
}

impl Rates {
    pub fn new(start: Instant) -> Rates {
        Rates {
            start,
            times: Vec::new(),
        }
    }

    /// One event completed at `t`.
    pub fn record(&mut self, t: Instant) {
        self.record_n(t, 1.0);
    }

    /// `events` events (or a fraction of one) completed at `t`.
    pub fn record_n(&mut self, t: Instant, events: f64) {
        self.times.push((t, events));
    }

    /// The events recorded.
    pub fn count(&self) -> f64 {
        self.times.iter().map(|(_, n)| n).sum()
    }

    /// From the start to the last completion.
    pub fn elapsed(&self) -> Duration {
        self.times
            .iter()
            .map(|(t, _)| *t)
            .max()
            .map(|t| t.saturating_duration_since(self.start))
            .unwrap_or_default()
    }

    /// Events per second over the whole run.
    pub fn overall(&self) -> f64 {
        let s = self.elapsed().as_secs_f64();
        if s > 0.0 {
            self.count() / s
        } else {
            f64::NAN
        }
    }

    /// Events per second in each full `window` from the start to the last
    /// completion (a last, partial window is left out unless it is the only one).
    pub fn per_window(&self, window: Duration) -> Samples {
        let total = self.elapsed();
        let w = window.as_secs_f64();
        let full = (total.as_secs_f64() / w).floor() as usize;
        if full == 0 {
            return Samples::from_values(vec![self.overall()]);
        }
        let mut counts = vec![0f64; full];
        for (t, n) in &self.times {
            let i = (t.saturating_duration_since(self.start).as_secs_f64() / w) as usize;
            if i < full {
                counts[i] += n;
            }
        }
        Samples::from_values(counts.into_iter().map(|c| c / w).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let s = Samples::from_values((1..=100).map(f64::from).collect());
        assert_eq!(s.median(), 50.0);
        assert_eq!(s.p99(), 99.0);
        assert_eq!(s.p1(), 1.0);
        assert_eq!(s.max(), 100.0);
        let one = Samples::from_values(vec![7.0]);
        assert_eq!((one.median(), one.p99(), one.p1()), (7.0, 7.0, 7.0));
        assert!(Samples::new().median().is_nan());
    }

    #[test]
    fn rates_per_window() {
        let start = Instant::now();
        let mut r = Rates::new(start);
        // 10 events in the first 100 ms, 20 in the second, 1 in a partial third.
        for i in 0..10 {
            r.record(start + Duration::from_millis(i * 10));
        }
        for i in 0..20 {
            r.record(start + Duration::from_millis(100 + i * 5));
        }
        r.record(start + Duration::from_millis(250));
        let w = r.per_window(Duration::from_millis(100));
        assert_eq!(w.len(), 2);
        assert_eq!(w.median(), 100.0);
        assert_eq!(w.max(), 200.0);
        assert_eq!(r.count(), 31.0);
        assert!((r.overall() - 31.0 / 0.25).abs() < 1e-6);
    }

    #[test]
    fn rates_count_weighted_completions() {
        let start = Instant::now();
        let mut r = Rates::new(start);
        // A reply to a request of 32 events in each of two 100 ms windows, and
        // 50 deliveries of 1/50 of an event each in the second.
        r.record_n(start + Duration::from_millis(50), 32.0);
        r.record_n(start + Duration::from_millis(150), 32.0);
        for i in 0..50 {
            r.record_n(start + Duration::from_millis(100 + i), 1.0 / 50.0);
        }
        r.record_n(start + Duration::from_millis(200), 0.0);
        let w = r.per_window(Duration::from_millis(100));
        assert_eq!(w.len(), 2);
        assert!((w.median() - 320.0).abs() < 1e-6, "{}", w.median());
        assert!((w.max() - 330.0).abs() < 1e-6, "{}", w.max());
        assert!((r.count() - 65.0).abs() < 1e-9);
    }
}
