//! The results: rows of figures beside their baselines, the markdown table, and the
//! rewrite of the results part of BENCHMARKS.md.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use crate::stats::Samples;

/// What a figure measures, for formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Milliseconds; lower is better.
    Ms,
    /// Seconds; lower is better.
    Secs,
    /// Events per second; higher is better.
    PerSec,
    /// Mebibytes of resident memory; lower is better.
    MiB,
    /// Milliseconds of CPU time per minute of wall time; lower is better.
    CpuMsPerMin,
}

impl Unit {
    pub fn higher_is_better(self) -> bool {
        matches!(self, Unit::PerSec)
    }

    pub fn format(self, v: f64) -> String {
        if v.is_nan() {
            return "-".into();
        }
        match self {
            Unit::Ms => format!("{} ms", sig3(v)),
            Unit::Secs => format!("{} s", sig3(v)),
            Unit::PerSec => format!("{}/s", thousands(v)),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::CpuMsPerMin => format!("{} ms/min", sig3(v)),
        }
    }
}

/// Three significant digits, no exponent.
fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// An integer with thousands separators.
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// One condition of a goal.
#[derive(Debug, Clone, Copy)]
pub enum Check {
    MedianAtMost(f64),
    P99AtMost(f64),
    MedianAtLeast(f64),
    /// The median's ratio to the baseline's median.
    RatioAtMost(f64),
    RatioAtLeast(f64),
}

/// A goal of the issue: its text and the conditions that make it met.
#[derive(Debug, Clone)]
pub struct Goal {
    pub text: String,
    pub checks: Vec<Check>,
}

impl Goal {
    pub fn new(text: impl Into<String>, checks: &[Check]) -> Goal {
        Goal {
            text: text.into(),
            checks: checks.to_vec(),
        }
    }
}

/// A baseline's figures.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub label: String,
    pub median: f64,
    pub p99: f64,
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The benchmark's number in the issue (1 to 5).
    pub bench: u8,
    pub what: String,
    pub unit: Unit,
    /// How many samples (or windows) the figures summarise.
    pub n: usize,
    pub median: f64,
    /// For rates: the rate 99% of windows reach (the slow tail), not the 99th
    /// percentile of the values.
    pub p99: f64,
    pub baseline: Option<Baseline>,
    pub goal: Option<Goal>,
}

impl Row {
    /// A row from samples: for rates the "p99" is the 1st percentile of the window
    /// rates (the slow tail); otherwise the 99th percentile.
    pub fn new(bench: u8, what: impl Into<String>, unit: Unit, s: &Samples) -> Row {
        let p99 = if unit.higher_is_better() {
            s.p1()
        } else {
            s.p99()
        };
        Row {
            bench,
            what: what.into(),
            unit,
            n: s.len(),
            median: s.median(),
            p99,
            baseline: None,
            goal: None,
        }
    }

    /// A row of one value (a memory size, a CPU time).
    pub fn single(bench: u8, what: impl Into<String>, unit: Unit, v: f64) -> Row {
        Row::new(bench, what, unit, &Samples::from_values(vec![v]))
    }

    pub fn baseline(mut self, label: impl Into<String>, s: &Samples, unit: Unit) -> Row {
        let p99 = if unit.higher_is_better() {
            s.p1()
        } else {
            s.p99()
        };
        self.baseline = Some(Baseline {
            label: label.into(),
            median: s.median(),
            p99,
        });
        self
    }

    /// A baseline known by its figures (an extrapolation).
    pub fn baseline_values(mut self, label: impl Into<String>, median: f64, p99: f64) -> Row {
        self.baseline = Some(Baseline {
            label: label.into(),
            median,
            p99,
        });
        self
    }

    pub fn goal(mut self, goal: Goal) -> Row {
        self.goal = Some(goal);
        self
    }

    /// The median over the baseline's median.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().map(|b| self.median / b.median)
    }

    /// Whether the goal is met; `None` without a goal.
    pub fn met(&self) -> Option<bool> {
        let goal = self.goal.as_ref()?;
        Some(goal.checks.iter().all(|c| match *c {
            Check::MedianAtMost(v) => self.median <= v,
            Check::P99AtMost(v) => self.p99 <= v,
            Check::MedianAtLeast(v) => self.median >= v,
            Check::RatioAtMost(v) => self.ratio().is_some_and(|r| r <= v),
            Check::RatioAtLeast(v) => self.ratio().is_some_and(|r| r >= v),
        }))
    }
}

/// Everything one run measured, and the notes it made on the way.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn add(&mut self, row: Row) {
        eprintln!("    {}", one_line(&row));
        self.rows.push(row);
    }

    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("    note: {text}");
        self.notes.push(text);
    }

    /// The markdown table (and the run's notes).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "| # | measurement | n | median | p99 | baseline (median / p99) | ratio | goal | met? |\n\
             |---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let base = match &r.baseline {
                Some(b) => format!(
                    "{}: {} / {}",
                    b.label,
                    r.unit.format(b.median),
                    r.unit.format(b.p99)
                ),
                None => "-".into(),
            };
            let ratio = r.ratio().map_or_else(|| "-".into(), format_ratio);
            let met = match r.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.bench,
                r.what,
                r.n,
                r.unit.format(r.median),
                r.unit.format(r.p99),
                base,
                ratio,
                r.goal.as_ref().map_or("-", |g| g.text.as_str()),
                met
            );
        }
        if !self.notes.is_empty() {
            s.push_str("\nNotes of this run:\n\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

/// A ratio: two decimals, or "1/N" when below 0.1 (a fast path against the slow
/// one it replaces).
fn format_ratio(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        "-".into()
    } else if x < 0.1 {
        format!("1/{:.0}", 1.0 / x)
    } else {
        format!("{x:.2}x")
    }
}

fn one_line(r: &Row) -> String {
    let mut s = format!(
        "[{}] {}: median {} p99 {} (n={})",
        r.bench,
        r.what,
        r.unit.format(r.median),
        r.unit.format(r.p99),
        r.n
    );
    if let (Some(b), Some(x)) = (&r.baseline, r.ratio()) {
        let _ = write!(
            s,
            "; {} median {} p99 {}; ratio {}",
            b.label,
            r.unit.format(b.median),
            r.unit.format(b.p99),
            format_ratio(x)
        );
    }
    if let Some(m) = r.met() {
        let _ = write!(s, "; goal {}", if m { "met" } else { "NOT met" });
    }
    s
}

/// The markers around the part of BENCHMARKS.md a run rewrites.
pub const START_MARKER: &str = "<!-- results: written by scripts/bench --write; edit outside -->";
pub const END_MARKER: &str = "<!-- end of results -->";

/// Replaces the text between the markers of `path` with `results` (the markers
/// stay); appends markers and results when the file has none. Refuses a file with
/// only one marker, or with them in the wrong order.
pub fn rewrite_results(path: &Path, results: &str) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let new = splice(&text, results)
        .with_context(|| format!("cannot place the results in {}", path.display()))?;
    std::fs::write(path, new).with_context(|| format!("cannot write {}", path.display()))
}

fn splice(text: &str, results: &str) -> anyhow::Result<String> {
    let block = format!("{START_MARKER}\n\n{}\n{END_MARKER}", results.trim_end());
    match (text.find(START_MARKER), text.find(END_MARKER)) {
        (Some(a), Some(b)) if a < b => Ok(format!(
            "{}{block}{}",
            &text[..a],
            &text[b + END_MARKER.len()..]
        )),
        (None, None) => {
            let sep = if text.is_empty() || text.ends_with("\n\n") {
                ""
            } else if text.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            Ok(format!("{text}{sep}{block}\n"))
        }
        _ => anyhow::bail!(
            "the markers {START_MARKER:?} and {END_MARKER:?} are not both present, in that order"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_format() {
        assert_eq!(Unit::Ms.format(0.41234), "0.412 ms");
        assert_eq!(Unit::Ms.format(12.345), "12.3 ms");
        assert_eq!(Unit::PerSec.format(1234567.4), "1,234,567/s");
        assert_eq!(Unit::PerSec.format(999.0), "999/s");
        assert_eq!(Unit::MiB.format(3.25), "3.2 MiB");
        assert_eq!(Unit::Secs.format(f64::NAN), "-");
        assert_eq!(format_ratio(0.5), "0.50x");
        assert_eq!(format_ratio(0.004), "1/250");
        assert_eq!(format_ratio(f64::NAN), "-");
    }

    #[test]
    fn goals_and_ratios() {
        let s = Samples::from_values(vec![1.0, 2.0, 3.0]);
        let base = Samples::from_values(vec![0.5, 0.5, 1.0]);
        let r = Row::new(1, "x", Unit::Ms, &s)
            .baseline("bare", &base, Unit::Ms)
            .goal(Goal::new(
                "p50 <= 2 ms, <= 5x",
                &[Check::MedianAtMost(2.0), Check::RatioAtMost(5.0)],
            ));
        assert_eq!(r.ratio(), Some(4.0));
        assert_eq!(r.met(), Some(true));
        let r = r.goal(Goal::new("p99 <= 2 ms", &[Check::P99AtMost(2.0)]));
        assert_eq!(r.met(), Some(false));
        let rate = Row::new(
            2,
            "y",
            Unit::PerSec,
            &Samples::from_values(vec![10.0, 20.0]),
        );
        assert_eq!(rate.p99, 10.0, "the slow tail of a rate");
        assert!(rate.met().is_none());
        let md = Report {
            rows: vec![r, rate],
            notes: vec!["a note".into()],
        }
        .markdown();
        assert!(md.contains("| 1 | x | 3 | 2.00 ms | 3.00 ms | bare: 0.500 ms / 1.00 ms | 4.00x | p99 <= 2 ms | **no** |"), "{md}");
        assert!(md.contains("- a note"), "{md}");
    }

    #[test]
    fn results_are_spliced_between_the_markers() {
        let doc = format!("# B\n\nintro\n\n{START_MARKER}\nold\n{END_MARKER}\n\n## Method\n");
        let new = splice(&doc, "new table\n").unwrap();
        assert_eq!(
            new,
            format!("# B\n\nintro\n\n{START_MARKER}\n\nnew table\n{END_MARKER}\n\n## Method\n")
        );
        assert_eq!(splice(&new, "new table").unwrap(), new, "idempotent");
        let appended = splice("# B\n", "t").unwrap();
        assert_eq!(
            appended,
            format!("# B\n\n{START_MARKER}\n\nt\n{END_MARKER}\n")
        );
        assert!(splice(&format!("{END_MARKER}\n{START_MARKER}"), "t").is_err());
        assert!(splice(START_MARKER, "t").is_err());
    }
}
