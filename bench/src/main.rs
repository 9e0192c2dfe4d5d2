//! `f2b-bench`: the benchmarks of fail2ban-cluster (issue #7), run by
//! `scripts/bench`. Each figure is measured beside its baseline in the same run
//! (bare libzmq, or the slow path a fast path replaces) and reported as a median,
//! a p99 and a ratio, in a markdown table that `--write` puts in BENCHMARKS.md.
//!
//! # Layout
//!
//! - [`stats`] and [`report`]: samples, medians and p99s, rates per window; the
//!   table, goals, and the rewrite of the results part of BENCHMARKS.md.
//! - [`daemon`]: the release binaries as child processes whose logs are counted,
//!   not kept; memory and CPU time from /proc.
//! - [`cluster`]: configuration files and start-up of publisher, monitors and
//!   subscribers on loopback; [`trust`]: their credentials.
//! - [`load`]: a load generator speaking the protocol (f2b-proto) to the publisher;
//!   [`farm`]: many SUB sockets read by one thread, checking every delivery.
//! - [`baseline`]: the bare libzmq figures.
//! - [`latency`], [`throughput`], [`burst`], [`footprint`], [`fanout`]: the five
//!   benchmarks of the issue, in its order.
//! - [`machine`]: what the machine is, from /proc.

mod baseline;
mod burst;
mod cluster;
mod daemon;
mod fanout;
mod farm;
mod footprint;
mod latency;
mod load;
mod machine;
mod report;
mod stats;
mod throughput;
mod trust;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// Runs fail2ban-cluster's benchmarks (issue #7) and prints a markdown table.
#[derive(Debug, Parser)]
#[command(name = "f2b-bench", version)]
struct Cli {
    /// Run each benchmark briefly (small sizes, short idle time), to keep them
    /// working; the figures are not the ones to quote.
    #[arg(long)]
    quick: bool,
    /// Rewrite the results part of this file (between its markers), for instance
    /// BENCHMARKS.md.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// Run only these benchmarks (1 to 5, or latency, throughput, burst, footprint,
    /// fanout); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The command line to print as "the exact command" (scripts/bench passes its
    /// own).
    #[arg(long, hide = true)]
    command: Option<String>,
    /// Internal: a bare libzmq process that binds a PUB socket and waits, the
    /// baseline of the footprint benchmark.
    #[arg(long, hide = true)]
    idle_zmq: bool,
}

/// The sizes of one run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub quick: bool,
    /// Benchmark 1: events per subscriber count; bare round trips.
    pub latency_events: usize,
    pub baseline_iters: usize,
    /// Benchmark 2: seconds of load per configuration.
    pub throughput_secs: f64,
    /// Benchmark 3: bans per burst, bursts per action, fail2ban-client calls
    /// sampled for the one-call-per-ban figure.
    pub burst_bans: usize,
    pub burst_reps: usize,
    pub client_sample: usize,
    /// Benchmark 4: idle seconds, Ban lines of the load, events behind a stalled
    /// subscriber.
    pub idle_secs: u64,
    pub load_lines: usize,
    pub stalled_events: u64,
    /// Benchmark 5: subscribers, events timed one by one, events per burst,
    /// bursts.
    pub fanout_subs: usize,
    pub fanout_events: usize,
    pub fanout_burst: usize,
    pub fanout_bursts: usize,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                latency_events: 20,
                baseline_iters: 200,
                throughput_secs: 1.5,
                burst_bans: 1_000,
                burst_reps: 1,
                client_sample: 5,
                idle_secs: 5,
                load_lines: 300,
                stalled_events: 20_000,
                fanout_subs: 1_000,
                fanout_events: 10,
                fanout_burst: 200,
                fanout_bursts: 2,
            }
        } else {
            Sizes {
                quick,
                latency_events: 200,
                baseline_iters: 2_000,
                throughput_secs: 10.0,
                burst_bans: 10_000,
                burst_reps: 3,
                client_sample: 100,
                idle_secs: 60,
                load_lines: 3_000,
                stalled_events: 1_000_000,
                fanout_subs: 1_000,
                fanout_events: 100,
                fanout_burst: 500,
                fanout_bursts: 5,
            }
        }
    }
}

const BENCHES: [(&str, u8); 5] = [
    ("latency", 1),
    ("throughput", 2),
    ("burst", 3),
    ("footprint", 4),
    ("fanout", 5),
];

fn selected(only: &[String]) -> anyhow::Result<Vec<u8>> {
    if only.is_empty() {
        return Ok(BENCHES.iter().map(|(_, n)| *n).collect());
    }
    let mut out = Vec::new();
    for o in only {
        let n = BENCHES
            .iter()
            .find(|(name, n)| o == name || o == &n.to_string())
            .map(|(_, n)| *n)
            .ok_or_else(|| anyhow::anyhow!("--only {o:?}: not one of 1-5 or {BENCHES:?}"))?;
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Raises this process's soft limit of open files to its hard limit (the daemons
/// started inherit it): the fan-out benchmark holds a thousand connections on
/// each side, two descriptors per SUB socket here.
fn raise_file_limit(needed: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    if hard < needed {
        anyhow::bail!(
            "the open files limit is {hard} (ulimit -Hn) and the fan-out benchmark needs \
             about {needed}: raise it, or leave benchmark 5 out (--only 1,2,3,4)"
        );
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if cli.idle_zmq {
        return baseline::idle_zmq();
    }
    let sizes = Sizes::new(cli.quick);
    let benches = selected(&cli.only)?;
    let needed = if benches.contains(&5) {
        3 * sizes.fanout_subs as u64 + 256
    } else {
        1024
    };
    raise_file_limit(needed)?;
    let mut report = report::Report::default();
    let started = Instant::now();
    let trust = trust::Trust::generate(&[]);
    eprintln!(
        "f2b-bench: {} run of benchmarks {benches:?}, {}",
        if sizes.quick { "quick" } else { "full" },
        if trust.secure() {
            "with authentication (signed broadcasts, authenticated reports)"
        } else {
            "WITHOUT authentication (the daemons have none yet)"
        }
    );
    let tmp = tempfile::Builder::new().prefix("f2b-bench-").tempdir()?;
    for b in &benches {
        let t = Instant::now();
        eprintln!("==> benchmark {b}");
        let dir = tmp.path().join(format!("bench{b}"));
        std::fs::create_dir_all(&dir)?;
        match b {
            1 => latency::run(&dir, &sizes, &mut report)?,
            2 => throughput::run(&dir, &sizes, &mut report)?,
            3 => burst::run(&dir, &sizes, &mut report)?,
            4 => footprint::run(&dir, &sizes, &mut report)?,
            5 => fanout::run(&dir, &sizes, &mut report)?,
            _ => unreachable!("selected() returns 1 to 5"),
        }
        eprintln!("    ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let took = started.elapsed();
    let mut out = String::new();
    out.push_str(&machine::describe(
        cli.command.as_deref(),
        &sizes,
        took,
        trust.secure(),
    ));
    out.push('\n');
    out.push_str(&report.markdown());
    println!("{out}");
    if let Some(path) = &cli.write {
        report::rewrite_results(path, &out)?;
        eprintln!("results written to {}", path.display());
    }
    eprintln!("f2b-bench: done in {:.1} s", took.as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("f2b-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmarks_are_selected_by_name_or_number() {
        assert_eq!(selected(&[]).unwrap(), [1, 2, 3, 4, 5]);
        assert_eq!(
            selected(&["fanout".into(), "1".into(), "latency".into()]).unwrap(),
            [1, 5]
        );
        assert!(selected(&["6".into()]).is_err());
    }

    #[test]
    fn quick_sizes_are_smaller() {
        let (q, f) = (Sizes::new(true), Sizes::new(false));
        assert!(q.latency_events < f.latency_events);
        assert!(q.stalled_events < f.stalled_events);
        assert!(q.idle_secs < f.idle_secs);
        assert_eq!(f.burst_bans, 10_000);
        assert_eq!(f.stalled_events, 1_000_000);
        assert_eq!(f.fanout_subs, 1_000);
    }
}
