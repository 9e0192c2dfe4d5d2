//! Rate limiting of log lines the network can cause at will (the `rejected` lines,
//! socket errors): without a limit a flood of garbage would fill the disk.
//!
//! Per reason, at most [`REJECTED_LINES`] lines are logged per [`WINDOW`]; the
//! events beyond that are only counted, and when the window is over one summary
//! line says how many were not shown, e.g. `rejected (suppressed N more in the last
//! Xs)` with `reason=` and `suppressed=`. Every event is counted in the totals
//! either way.

use std::collections::HashMap;
use std::time::Duration;

/// The most `rejected` lines logged per reason and [`WINDOW`].
pub const REJECTED_LINES: u32 = 10;

/// The window [`REJECTED_LINES`] applies to.
pub const WINDOW: Duration = Duration::from_secs(1);

/// How many refusals of one reason there were, and how many of them were logged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub logged: u64,
}

/// Lines (`line`, their message) that were suppressed for `reason` over the last
/// `over_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Suppressed {
    pub line: &'static str,
    pub reason: &'static str,
    pub count: u64,
    pub over_ms: u64,
}

impl Suppressed {
    /// Logs the summary line.
    pub fn log(&self) {
        let secs = self.over_ms.div_ceil(1000).max(1);
        tracing::warn!(
            reason = %self.reason,
            suppressed = self.count,
            "{} (suppressed {} more in the last {secs}s)",
            self.line,
            self.count
        );
    }
}

#[derive(Debug)]
struct Window {
    start_ms: u64,
    logged: u32,
    suppressed: u64,
    counts: Counts,
}

/// The per-reason windows and totals.
#[derive(Debug)]
pub struct Throttle {
    line: &'static str,
    per_window: u32,
    window_ms: u64,
    reasons: HashMap<&'static str, Window>,
    /// The reason of the last event counted, until [`Throttle::take_last`].
    last: Option<&'static str>,
}

impl Throttle {
    /// At most [`REJECTED_LINES`] lines with the message `line` per reason and
    /// [`WINDOW`].
    pub fn for_lines(line: &'static str) -> Self {
        Throttle::new(line, REJECTED_LINES, WINDOW)
    }

    /// At most `per_window` lines with the message `line` per reason and `window`.
    pub fn new(line: &'static str, per_window: u32, window: Duration) -> Self {
        Throttle {
            line,
            per_window,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            reasons: HashMap::new(),
            last: None,
        }
    }

    /// Counts one refusal for `reason` at `now_ms`. Returns whether to log its
    /// line, and the summary of this reason's previous window if that one
    /// suppressed lines (to be logged first).
    pub fn admit(&mut self, reason: &'static str, now_ms: u64) -> (bool, Option<Suppressed>) {
        let window_ms = self.window_ms;
        let w = self.reasons.entry(reason).or_insert(Window {
            start_ms: now_ms,
            logged: 0,
            suppressed: 0,
            counts: Counts::default(),
        });
        let summary = roll(self.line, reason, w, now_ms, window_ms);
        w.counts.total += 1;
        self.last = Some(reason);
        let log = w.logged < self.per_window;
        if log {
            w.logged += 1;
            w.counts.logged += 1;
        } else {
            w.suppressed += 1;
        }
        (log, summary)
    }

    /// The summaries of the windows over at `now_ms` that suppressed lines, so that
    /// a flood that stopped is still summed up (the serving loop calls this).
    pub fn flush(&mut self, now_ms: u64) -> Vec<Suppressed> {
        let (line, window_ms) = (self.line, self.window_ms);
        self.reasons
            .iter_mut()
            .filter_map(|(reason, w)| roll(line, reason, w, now_ms, window_ms))
            .collect()
    }

    /// The reason of the last event counted since the last call, if any (the
    /// server asks after each request, to count its refusal in the metrics).
    pub fn take_last(&mut self) -> Option<&'static str> {
        self.last.take()
    }

    /// The counts per reason since the start, by reason.
    pub fn counts(&self) -> Vec<(&'static str, Counts)> {
        let mut all: Vec<_> = self.reasons.iter().map(|(r, w)| (*r, w.counts)).collect();
        all.sort_unstable_by_key(|(r, _)| *r);
        all
    }
}

/// Starts a new window for `w` if its window is over at `now_ms` (or the clock went
/// back); returns the old window's summary if it suppressed lines.
fn roll(
    line: &'static str,
    reason: &'static str,
    w: &mut Window,
    now_ms: u64,
    window_ms: u64,
) -> Option<Suppressed> {
    let over = now_ms < w.start_ms || now_ms - w.start_ms >= window_ms;
    if !over {
        return None;
    }
    let summary = (w.suppressed > 0).then(|| Suppressed {
        line,
        reason,
        count: w.suppressed,
        over_ms: now_ms.saturating_sub(w.start_ms),
    });
    w.start_ms = now_ms;
    w.logged = 0;
    w.suppressed = 0;
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_n_lines_per_window_then_one_summary() {
        let mut t = Throttle::new("rejected", 10, Duration::from_secs(1));
        let mut logged = 0;
        for n in 0..1000u64 {
            let (log, summary) = t.admit("malformed", 5000 + n % 1000);
            assert_eq!(summary, None);
            logged += u64::from(log);
        }
        assert_eq!(logged, 10);
        // Another reason has its own window.
        assert_eq!(t.admit("forbidden", 5500), (true, None));
        // Nothing to say before the window ends.
        assert_eq!(t.flush(5999), []);
        // The next refusal after the window logs the summary first.
        let (log, summary) = t.admit("malformed", 6000);
        assert!(log);
        assert_eq!(
            summary,
            Some(Suppressed {
                line: "rejected",
                reason: "malformed",
                count: 990,
                over_ms: 1000
            })
        );
        assert_eq!(
            t.counts(),
            [
                (
                    "forbidden",
                    Counts {
                        total: 1,
                        logged: 1
                    }
                ),
                (
                    "malformed",
                    Counts {
                        total: 1001,
                        logged: 11
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_flood_that_stopped_is_summed_up_by_flush_once() {
        let mut t = Throttle::new("rejected", 2, Duration::from_secs(1));
        for _ in 0..5 {
            t.admit("legacy_invalid", 1000);
        }
        t.admit("malformed", 1000);
        assert_eq!(
            t.flush(4000),
            [Suppressed {
                line: "rejected",
                reason: "legacy_invalid",
                count: 3,
                over_ms: 3000
            }]
        );
        assert_eq!(t.flush(9000), []);
        // A new window: lines again.
        assert_eq!(t.admit("legacy_invalid", 9001), (true, None));
    }

    #[test]
    fn the_clock_going_back_starts_a_new_window() {
        let mut t = Throttle::new("rejected", 1, Duration::from_secs(1));
        assert_eq!(t.admit("malformed", 10_000), (true, None));
        assert_eq!(t.admit("malformed", 10_001), (false, None));
        let (log, summary) = t.admit("malformed", 0);
        assert!(log);
        assert_eq!(summary.map(|s| (s.count, s.over_ms)), Some((1, 0)));
    }
}
