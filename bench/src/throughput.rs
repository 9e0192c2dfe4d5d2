//! Benchmark 2: hub throughput. Four clients report bans to a real publisher as
//! monitors do (f2b-proto reports on REQ sockets, one in flight each), the
//! publisher validates, sequences, commits each batch to its ledger (one sync per
//! batch of up to 64) and broadcasts to 50 SUB sockets in this process, which check
//! that every one of them got every sequence number. The rate counted is of events
//! delivered to all 50 (each delivery a fiftieth of an event). The same again with
//! four pipelined clients (DEALER, 16 reports in flight each), which fill the
//! publisher's batches; and with four monitors under a burst, each sending
//! `reports` requests of 32 events, one in flight. Baseline: a bare ROUTER echoing
//! requests of the same size to the same clients; for the `reports` row, as the
//! issue puts it, the bare REQ/REP throughput of the same clients (the first
//! row's, one event per round trip), with the echo of report-sized messages
//! (counted at 32 events per echo) given in a note.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use f2b_proto::MAX_REPORT_EVENTS;

use crate::baseline;
use crate::cluster::Publisher;
use crate::farm::Farm;
use crate::load::{self, merge, Shape, Until};
use crate::report::{Check, Goal, Report, Row, Unit};
use crate::stats::Rates;
use crate::trust::Trust;
use crate::Sizes;

pub const CLIENTS: usize = 4;
pub const SUBSCRIBERS: usize = 50;

/// The load configurations, in the table's order.
const CONFIGS: [(&str, Shape); 3] = [
    (
        "4 monitors (REQ, 1 report in flight each)",
        Shape::single(1),
    ),
    (
        "4 pipelined clients (DEALER, 16 in flight each)",
        Shape::single(16),
    ),
    (
        "4 monitors (REQ, 1 request in flight, reports of 32 events)",
        Shape::batched(1, MAX_REPORT_EVENTS),
    ),
];

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let window = if sizes.throughput_secs >= 5.0 {
        Duration::from_millis(250)
    } else {
        Duration::from_millis(100)
    };
    let mut cpu_notes = Vec::new();
    let mut bare_one_event = None;
    for (label, shape) in CONFIGS {
        let base = baseline::reqrep_throughput(
            CLIENTS,
            shape.in_flight,
            shape.batch,
            sizes.throughput_secs,
        )?
        .per_window(window);
        let m = measure(
            &dir.join(format!("in{}x{}", shape.in_flight, shape.batch)),
            shape,
            sizes.throughput_secs,
        )?;
        let rates = m.rates.per_window(window);
        cpu_notes.push(format!("{:.0} us {}", m.cpu_us, short(shape)));
        let counted = if shape.batch > 1 {
            format!("{} events in {} requests", m.events, m.requests)
        } else {
            format!("{} events", m.events)
        };
        if shape == Shape::single(1) {
            bare_one_event = Some(base.clone());
        }
        // Monitors under a burst: the baseline, the bare REQ/REP throughput
        // of the same clients (the first row's, one event per round trip). The
        // same clients echoing messages of this request's size, counted at
        // `batch` events per echo, is given beside it: the hub's work per event
        // against only moving the bytes.
        let (base, base_label) = match (&bare_one_event, shape.batch > 1) {
            (Some(b1), true) => {
                report.note(format!(
                    "Benchmark 2: {label}: the baseline is the bare REQ/REP throughput of \
                     the same clients (the first row's, one event per round trip), as the \
                     issue states it. The same clients echoing messages the size of a \
                     reports request of {n} events, counted at {n} events per echo, reach \
                     {:.0}/s: against that the row is at 1/{:.0} (the hub verifies, \
                     sequences, records, signs and delivers each event to \
                     {SUBSCRIBERS} subscribers; an echo only moves the bytes).",
                    base.median(),
                    base.median() / rates.median(),
                    n = shape.batch,
                ));
                (
                    b1.clone(),
                    "bare REQ/REP, same clients (the first row's)".to_owned(),
                )
            }
            (None, true) => (
                base,
                format!(
                    "bare REQ/REP, same clients and message size, {} events per message",
                    shape.batch
                ),
            ),
            (_, false) => (base, "bare REQ/REP, same clients".to_owned()),
        };
        report.add(
            Row::new(
                2,
                format!(
                    "{label}, {SUBSCRIBERS} subscribers: events/s delivered to all \
                     ({counted}, {} deliveries lost)",
                    m.lost
                ),
                Unit::PerSec,
                &rates,
            )
            .baseline(base_label, &base, Unit::PerSec)
            .goal(Goal::new(
                ">= 20,000/s and >= 50% of bare",
                &[Check::MedianAtLeast(20_000.0), Check::RatioAtLeast(0.5)],
            )),
        );
    }
    report.note(format!(
        "Benchmark 2: the publisher's own CPU time (utime + stime from /proc) per event \
         broadcast: {}.",
        cpu_notes.join(", ")
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

/// A configuration in a few words, for the notes.
fn short(shape: Shape) -> String {
    match (shape.in_flight, shape.batch) {
        (1, 1) => "with monitors on REQ".into(),
        (_, 1) => "with pipelined clients".into(),
        (_, b) => format!("with monitors sending reports of {b}"),
    }
}

/// What one configuration measured.
#[derive(Debug)]
struct Measured {
    /// Deliveries to the subscribers, each 1/SUBSCRIBERS of an event.
    rates: Rates,
    /// Deliveries lost (missing, or gaps in a socket's sequence numbers).
    lost: u64,
    /// Events broadcast, and the requests that carried them.
    events: u64,
    requests: u64,
    /// The publisher's CPU time per event broadcast, in microseconds.
    cpu_us: f64,
}

/// Runs the load for `secs` and waits until every subscriber has every event
/// broadcast (or 30 s more).
fn measure(dir: &Path, shape: Shape, secs: f64) -> anyhow::Result<Measured> {
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
    let tallies =
        load::report_from_all(&ctx, &publisher.reply, &nodes, shape, &trust, &ips, &until)?;
    let tally = merge(&tallies);
    if tally.broadcast == 0 {
        anyhow::bail!("nothing was broadcast\n{}", publisher.daemon.tail_text());
    }
    // Completions are only waited for here: the rates come from the deliveries.
    farm.collect_until(tally.min_seq, tally.max_seq, Duration::from_secs(30));
    let cpu = publisher.daemon.usage()?.cpu.saturating_sub(cpu_before);
    let cpu_us = cpu.as_secs_f64() * 1e6 / tally.broadcast as f64;
    let received = farm.finish()?;
    let expected = tally.broadcast * SUBSCRIBERS as u64;
    // A gap is a lost delivery too, and shows even when a duplicate made up the count.
    let lost = expected
        .saturating_sub(received.deliveries)
        .max(received.gaps);
    Ok(Measured {
        rates: received.delivery_rates(start, SUBSCRIBERS),
        lost,
        events: tally.broadcast,
        requests: tally.requests,
        cpu_us,
    })
}
