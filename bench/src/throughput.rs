//! Benchmark 2: hub throughput. Four clients report bans to a real publisher as
//! monitors do (f2b-proto reports on REQ sockets, one in flight each), the
//! publisher validates, sequences, commits each batch to its ledger (one sync per
//! batch of up to 64) and broadcasts to 50 SUB sockets in this process, which check
//! that every one of them got every sequence number. The rate counted is of events
//! delivered to all 50 (each delivery a fiftieth of an event). The same again with four pipelined clients (DEALER, 16
//! reports in flight each), which fill the publisher's batches. Baseline: a bare
//! ROUTER echoing the same requests to the same clients.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::baseline;
use crate::cluster::Publisher;
use crate::farm::Farm;
use crate::load::{self, merge, Until};
use crate::report::{Check, Goal, Report, Row, Unit};
use crate::stats::Rates;
use crate::trust::Trust;
use crate::Sizes;

pub const CLIENTS: usize = 4;
pub const SUBSCRIBERS: usize = 50;

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let window = if sizes.throughput_secs >= 5.0 {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(100)
    };
    let mut cpu_notes = Vec::new();
    for (label, in_flight) in [
        ("4 monitors (REQ, 1 report in flight each)", 1usize),
        ("4 pipelined clients (DEALER, 16 in flight each)", 16),
    ] {
        let base = baseline::reqrep_throughput(CLIENTS, in_flight, 1, sizes.throughput_secs)?;
        let (rates, lost, total, cpu_us) = measure(
            &dir.join(format!("window{in_flight}")),
            in_flight,
            sizes.throughput_secs,
        )?;
        cpu_notes.push(format!("{cpu_us:.0} us"));
        report.add(
            Row::new(
                2,
                format!(
                    "{label}, {SUBSCRIBERS} subscribers: events/s delivered to all \
                     ({total} events, {lost} deliveries lost)"
                ),
                Unit::PerSec,
                &rates.per_window(window),
            )
            .baseline(
                "bare REQ/REP, same clients",
                &base.per_window(window),
                Unit::PerSec,
            )
            .goal(Goal::new(
                ">= 20,000/s and >= 50% of bare",
                &[Check::MedianAtLeast(20_000.0), Check::RatioAtLeast(0.5)],
            )),
        );
    }
    report.note(format!(
        "Benchmark 2: the publisher's own CPU time (utime + stime from /proc) per event \
         broadcast: {} with monitors on REQ, {} with pipelined clients.",
        cpu_notes[0], cpu_notes[1]
    ));
    report.note(format!(
        "Benchmark 2: rates are counted per {} ms window from the deliveries the \
         {SUBSCRIBERS} SUB sockets read (each 1/{SUBSCRIBERS} of an event, at the \
         millisecond it was read), no longer from the moment the last socket has an \
         event: the reading thread drains one socket's backlog after another, so those \
         moments came in bursts and a quick run had empty windows (a median or p99 of \
         0/s). Over a run both count the same events. The p99 column of a rate is the \
         rate 99% of the windows reached (its slow tail).",
        window.as_millis()
    ));
    Ok(())
}

/// Runs the load for `secs` and waits until every subscriber has every event
/// broadcast (or 30 s more); returns the deliveries (each 1/SUBSCRIBERS of an
/// event, when it was read), the deliveries lost, the events broadcast and the
/// publisher's CPU time per event (microseconds).
fn measure(dir: &Path, in_flight: usize, secs: f64) -> anyhow::Result<(Rates, u64, u64, f64)> {
    let nodes: Vec<String> = (1..=CLIENTS).map(|i| format!("load{i}")).collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let trust = Trust::generate(&names);
    let publisher = Publisher::start(dir, &trust, &[])?;
    let farm = Farm::start(&publisher.broadcast, SUBSCRIBERS)?;
    farm.wait_ready(Duration::from_secs(20), || {})?;
    let ctx = zmq::Context::new();
    let ips = Arc::new(AtomicU64::new(0));
    let cpu_before = publisher.daemon.usage()?.cpu;
    let start = Instant::now();
    let until = Until::Deadline(start + Duration::from_secs_f64(secs));
    let tallies = load::report_from_all(
        &ctx,
        &publisher.reply,
        &nodes,
        in_flight,
        &trust,
        &ips,
        &until,
    )?;
    let tally = merge(&tallies);
    if tally.broadcast == 0 {
        anyhow::bail!("nothing was broadcast\n{}", publisher.daemon.tail_text());
    }
    // Completions are only waited for here: the rates come from the deliveries.
    farm.collect_until(tally.min_seq, tally.max_seq, Duration::from_secs(30));
    let cpu = publisher.daemon.usage()?.cpu.saturating_sub(cpu_before);
    let cpu_us = cpu.as_secs_f64() * 1e6 / tally.broadcast as f64;
    let received = farm.finish()?;
    let rates = received.delivery_rates(start, SUBSCRIBERS);
    let expected = tally.broadcast * SUBSCRIBERS as u64;
    // A gap is a lost delivery too, and shows even when a duplicate made up the count.
    let lost = expected
        .saturating_sub(received.deliveries)
        .max(received.gaps);
    Ok((rates, lost, tally.broadcast, cpu_us))
}
