//! Benchmark 5: fan-out. One real publisher and 1,000 SUB sockets in this process
//! (one reading thread, see [`crate::farm`]): the time for one event, reported over
//! REQ as a monitor does, to reach all of them (one event at a time), and the rate
//! of bursts reported by four pipelined clients, each event delivered to all of
//! them (rate: the burst over the time until the last socket has its last event).
//! Baseline: a bare PUB socket sending broadcast-sized messages to the same 1,000
//! SUB sockets.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use f2b_common::sockets::{last_endpoint, new_socket};
use f2b_proto::{Broadcast, Epoch, Heartbeat, NodeName, Reply, Sequenced};

use crate::cluster::Publisher;
use crate::farm::Farm;
use crate::load::{ban_event, ip_for, merge, Reporter, Shape, Until};
use crate::report::{Report, Row, Unit};
use crate::stats::{Rates, Samples};
use crate::trust::Trust;
use crate::Sizes;

const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let n = sizes.fanout_subs;
    let (burst, bursts) = (sizes.fanout_burst, sizes.fanout_bursts);
    let (base_lat, base_rate) = bare(n, sizes.fanout_events, burst, bursts)?;
    let (lat, rate, lost) = product(dir, n, sizes.fanout_events, burst, bursts)?;
    report.add(
        Row::new(
            5,
            format!("one event (report over REQ) -> all {n} subscribers"),
            Unit::Ms,
            &lat,
        )
        .baseline(format!("bare PUB -> {n} SUBs"), &base_lat, Unit::Ms),
    );
    report.add(
        Row::new(
            5,
            format!(
                "events/s to all {n} subscribers: {bursts} bursts of {burst} reported by 4 \
                 pipelined clients ({lost} deliveries lost)"
            ),
            Unit::PerSec,
            &rate,
        )
        .baseline(format!("bare PUB -> {n} SUBs"), &base_rate, Unit::PerSec),
    );
    Ok(())
}

fn payload(seq: u64, node: &NodeName, ip: IpAddr) -> (Vec<u8>, Vec<u8>) {
    let b = Broadcast::Event(Sequenced {
        seq,
        epoch: Epoch(0x9f2c_6a1d_03b4_e857),
        event: ban_event(node, ip),
    });
    (b.topic(), b.encode())
}

/// Events per second of a burst sent at `t0`: how many reached every socket, over
/// the time until the last did.
fn burst_rate(t0: Instant, done: &[(u64, Instant)]) -> f64 {
    let mut r = Rates::new(t0);
    for (_, t) in done {
        r.record(*t);
    }
    r.overall()
}

/// The bare baseline: latency of one message to all, and the rates of bursts.
fn bare(
    n: usize,
    events: usize,
    burst: usize,
    bursts: usize,
) -> anyhow::Result<(Samples, Samples)> {
    let ctx = zmq::Context::new();
    let publ = new_socket(&ctx, zmq::PUB)?;
    publ.bind("tcp://127.0.0.1:*")?;
    let farm = Farm::start(&last_endpoint(&publ), n)?;
    let hb = Broadcast::Heartbeat(Heartbeat {
        seq: 0,
        epoch: Epoch(1),
        interval_ms: 1000,
    });
    farm.wait_ready(Duration::from_secs(30), || {
        let _ = publ.send_multipart([hb.topic(), hb.encode()], zmq::DONTWAIT);
    })?;
    let node = NodeName::new("web1").context("valid")?;
    let mut lat = Samples::new();
    for k in 1..=events as u64 {
        let (topic, body) = payload(k, &node, ip_for(k));
        let t0 = Instant::now();
        publ.send_multipart([topic, body], 0)?;
        let t = farm.wait_complete(k, EVENT_TIMEOUT)?;
        lat.push_ms(t.saturating_duration_since(t0));
    }
    let mut rates = Samples::new();
    for b in 0..bursts as u64 {
        let first = events as u64 + b * burst as u64 + 1;
        let last = first + burst as u64 - 1;
        let msgs: Vec<(Vec<u8>, Vec<u8>)> = (first..=last)
            .map(|k| payload(k, &node, ip_for(k)))
            .collect();
        let t0 = Instant::now();
        for (topic, body) in msgs {
            publ.send_multipart([topic, body], 0)?;
        }
        rates.push(burst_rate(
            t0,
            &farm.collect_until(first, last, EVENT_TIMEOUT),
        ));
    }
    farm.finish()?;
    Ok((lat, rates))
}

/// The real publisher: latency of one reported event to all, the rates of bursts,
/// and the deliveries lost.
fn product(
    dir: &Path,
    n: usize,
    events: usize,
    burst: usize,
    bursts: usize,
) -> anyhow::Result<(Samples, Samples, u64)> {
    let nodes = ["load1", "load2", "load3", "load4"];
    let trust = Trust::generate(&nodes);
    let publisher = Publisher::start(dir, &trust, &[])?;
    let farm = Farm::start(&publisher.broadcast, n)?;
    farm.wait_ready(Duration::from_secs(30), || {})?;
    let ctx = zmq::Context::new();
    let one = Reporter::connect(&ctx, &publisher.reply, nodes[0], Shape::single(1), &trust)?;
    let mut lat = Samples::new();
    for k in 0..events as u64 {
        let t0 = Instant::now();
        let seq = match one.report_one(ip_for(k))? {
            Reply::Ack(a) => a.seq.context("a broadcast ACK without seq")?,
            Reply::Nak(nak) => anyhow::bail!("refused: {nak:?}"),
            Reply::Replies(r) => anyhow::bail!("replies to one report: {r:?}"),
        };
        let t = farm.wait_complete(seq, EVENT_TIMEOUT)?;
        lat.push_ms(t.saturating_duration_since(t0));
    }
    let mut clients: Vec<Reporter> = nodes
        .iter()
        .map(|node| Reporter::connect(&ctx, &publisher.reply, node, Shape::single(16), &trust))
        .collect::<anyhow::Result<_>>()?;
    let ips = Arc::new(AtomicU64::new(events as u64));
    let mut rates = Samples::new();
    let mut broadcast = 0;
    for b in 1..=bursts as u64 {
        let until = Until::Total(events as u64 + b * burst as u64);
        let t0 = Instant::now();
        let mut threads = Vec::new();
        for r in clients.drain(..) {
            let (ips, until) = (ips.clone(), until.clone());
            threads.push(thread::spawn(move || {
                let tally = r.run(&ips, &until, |_, _| {});
                (r, tally)
            }));
        }
        let mut tallies = Vec::new();
        for t in threads {
            let (r, tally) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a load client panicked"))?;
            clients.push(r);
            tallies.push(tally?);
        }
        let tally = merge(&tallies);
        broadcast += tally.broadcast;
        let done = farm.collect_until(tally.min_seq, tally.max_seq, EVENT_TIMEOUT);
        rates.push(burst_rate(t0, &done));
    }
    let received = farm.finish()?;
    let expected = (events as u64 + broadcast) * n as u64;
    let lost = expected
        .saturating_sub(received.deliveries)
        .max(received.gaps);
    Ok((lat, rates, lost))
}
