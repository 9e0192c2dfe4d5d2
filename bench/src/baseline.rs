//! The bare libzmq baselines: the same sockets (created with the project's options,
//! f2b_common::sockets::new_socket) and the same message sizes, with nothing done
//! between receiving and sending. Each party has its own libzmq context (its own
//! I/O thread), as separate processes would.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use f2b_common::sockets::{last_endpoint, new_socket};

use crate::load::{ban_event, ip_for};
use crate::stats::{Rates, Samples};

/// A report as a monitor sends it, for realistic message sizes.
pub fn sample_report() -> Vec<u8> {
    sample_request(1).0
}

/// A request as a monitor sends it with `batch` events waiting (a `report` for
/// one, a `reports` packed by `Request::pack` for more), for realistic message
/// sizes; and the events it carries.
pub fn sample_request(batch: usize) -> (Vec<u8>, usize) {
    let node = f2b_proto::NodeName::new("web1").expect("valid");
    let events: Vec<_> = (0..batch.max(1) as u64)
        .map(|k| ban_event(&node, ip_for(12345 + k)))
        .collect();
    let (request, n) = f2b_proto::Request::pack(&events).expect("at least one event");
    (request.encode(), n)
}

/// An event broadcast's payload, for realistic message sizes.
fn sample_broadcast() -> Vec<u8> {
    let node = f2b_proto::NodeName::new("web1").expect("valid");
    f2b_proto::Broadcast::Event(f2b_proto::Sequenced {
        seq: 123_456,
        epoch: f2b_proto::Epoch(0x9f2c_6a1d_03b4_e857),
        event: ban_event(&node, ip_for(12345)),
    })
    .encode()
}

/// What the bare hub and subscribers of [`rtt_plus_hop`] do besides moving the
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Nothing: the baseline.
    None,
    /// The Ed25519 work no secure subscriber can skip (issue #6): the hub signs
    /// each broadcast, each subscriber verifies it.
    Signatures,
}

/// Benchmark 1's baseline: a REQ/REP round trip (a report-sized request and
/// reply) plus one PUB/SUB hop of a broadcast-sized message to each of `subs`
/// subscribers; one sample per (iteration, subscriber): round trip + that hop, in
/// milliseconds; and per iteration, the slowest of them. With
/// [`Work::Signatures`], the hop includes signing the broadcast and verifying it.
pub fn rtt_plus_hop(subs: usize, iters: usize, work: Work) -> anyhow::Result<(Samples, Samples)> {
    let base = Instant::now();
    let hub_ctx = zmq::Context::new();
    let router = new_socket(&hub_ctx, zmq::ROUTER)?;
    router.bind("tcp://127.0.0.1:*")?;
    let publ = new_socket(&hub_ctx, zmq::PUB)?;
    publ.bind("tcp://127.0.0.1:*")?;
    let (reply_ep, pub_ep) = (last_endpoint(&router), last_endpoint(&publ));
    let broadcast = sample_broadcast();
    let key = f2b_proto::auth::SigningKey::from_seed([7; 32]);
    let keys = [key.public()];
    let hub = thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let mut frames = router.recv_multipart(0)?;
            let body = frames.pop().unwrap_or_default();
            let stop = body == b"stop";
            if body == b"pub" || stop {
                let stamp = base.elapsed().as_nanos().to_string();
                let topic: &[u8] = if stop { b"stop" } else { b"ev" };
                match work {
                    Work::None => publ.send_multipart([topic, stamp.as_bytes(), &broadcast], 0)?,
                    Work::Signatures => {
                        let signature = f2b_proto::auth::sign_broadcast(&key, topic, &broadcast);
                        publ.send_multipart(
                            [topic, stamp.as_bytes(), &broadcast, &signature[..]],
                            0,
                        )?;
                    }
                }
            }
            frames.push(body);
            router.send_multipart(frames, 0)?;
            if stop {
                return Ok(());
            }
        }
    });
    let (tx, rx) = mpsc::channel::<(usize, Duration)>();
    let mut sub_threads = Vec::new();
    for i in 0..subs {
        let tx = tx.clone();
        let ep = pub_ep.clone();
        sub_threads.push(thread::spawn(move || -> anyhow::Result<()> {
            let ctx = zmq::Context::new();
            let sub = new_socket(&ctx, zmq::SUB)?;
            sub.set_subscribe(b"")?;
            sub.connect(&ep)?;
            loop {
                let frames = sub.recv_multipart(0)?;
                if frames.first().is_some_and(|t| t == b"stop") {
                    return Ok(());
                }
                if work == Work::Signatures {
                    let part = |i: usize| frames.get(i).map(Vec::as_slice).unwrap_or_default();
                    if !f2b_proto::auth::verify_broadcast(&keys, part(0), part(2), part(3)) {
                        bail!("a bare subscriber got a broadcast whose signature fails");
                    }
                }
                // After the check: the hop includes it, as a subscriber's does.
                let now = base.elapsed();
                let sent: u128 = std::str::from_utf8(frames.get(1).context("no stamp")?)?
                    .parse()
                    .context("a bad stamp")?;
                let hop = now.saturating_sub(Duration::from_nanos(sent as u64));
                if tx.send((i, hop)).is_err() {
                    return Ok(());
                }
            }
        }));
    }
    drop(tx);
    let ctx = zmq::Context::new();
    let req = new_socket(&ctx, zmq::REQ)?;
    req.set_rcvtimeo(10_000)?;
    req.connect(&reply_ep)?;
    let report = sample_report();
    let call = |body: &[u8]| -> anyhow::Result<()> {
        req.send(body, 0)?;
        req.recv_bytes(0).context("no reply from the bare hub")?;
        Ok(())
    };
    // Until every subscriber has its subscription in place (slow joiners).
    let mut seen = vec![false; subs];
    let warm_deadline = Instant::now() + Duration::from_secs(20);
    while seen.iter().any(|s| !s) {
        if Instant::now() > warm_deadline {
            bail!("bare subscribers did not all connect within 20 s");
        }
        call(b"pub")?;
        while let Ok((i, _)) = rx.recv_timeout(Duration::from_millis(20)) {
            seen[i] = true;
        }
    }
    while rx.recv_timeout(Duration::from_millis(50)).is_ok() {}
    let mut samples = Samples::new();
    let mut slowest = Samples::new();
    for _ in 0..iters {
        let t0 = Instant::now();
        call(&report)?;
        let rtt = t0.elapsed();
        call(b"pub")?;
        let mut max = Duration::ZERO;
        for _ in 0..subs {
            let (_, hop) = rx
                .recv_timeout(Duration::from_secs(10))
                .context("a bare subscriber got nothing within 10 s")?;
            samples.push_ms(rtt + hop);
            max = max.max(rtt + hop);
        }
        slowest.push_ms(max);
    }
    call(b"stop")?;
    hub.join()
        .map_err(|_| anyhow::anyhow!("the bare hub panicked"))??;
    for t in sub_threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a bare subscriber panicked"))??;
    }
    Ok((samples, slowest))
}

/// Benchmark 2's baseline: a ROUTER that echoes every request at once (what a
/// REP does), and `clients` clients with `window` requests in flight each (1: REQ,
/// as monitors; more: DEALER), each the size of a request of `batch` events, for
/// `secs`. Returns the completion times of the replies, each counting the events
/// its request would carry (messages/s times events per message).
pub fn reqrep_throughput(
    clients: usize,
    window: usize,
    batch: usize,
    secs: f64,
) -> anyhow::Result<Rates> {
    let hub_ctx = zmq::Context::new();
    let router = new_socket(&hub_ctx, zmq::ROUTER)?;
    router.bind("tcp://127.0.0.1:*")?;
    let ep = last_endpoint(&router);
    let hub = thread::spawn(move || -> anyhow::Result<()> {
        loop {
            let frames = router.recv_multipart(0)?;
            if frames.last().is_some_and(|b| b == b"stop") {
                return Ok(());
            }
            router.send_multipart(frames, 0)?;
        }
    });
    let ctx = zmq::Context::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut threads = Vec::new();
    for _ in 0..clients {
        let ctx = ctx.clone();
        let ep = ep.clone();
        threads.push(thread::spawn(
            move || -> anyhow::Result<(Vec<Instant>, usize)> {
                let dealer = window > 1;
                let s = new_socket(&ctx, if dealer { zmq::DEALER } else { zmq::REQ })?;
                s.set_rcvtimeo(10_000)?;
                s.connect(&ep)?;
                let (report, events) = sample_request(batch);
                let mut done = Vec::new();
                let mut in_flight = 0;
                loop {
                    while in_flight < window && Instant::now() < deadline {
                        if dealer {
                            s.send_multipart([&b""[..], &report], 0)?;
                        } else {
                            s.send(&report, 0)?;
                        }
                        in_flight += 1;
                    }
                    if in_flight == 0 {
                        return Ok((done, events));
                    }
                    s.recv_multipart(0).context("no echo within 10 s")?;
                    in_flight -= 1;
                    done.push(Instant::now());
                }
            },
        ));
    }
    let mut rates = Rates::new(start);
    for t in threads {
        let (done, events) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a bare client panicked"))??;
        for i in done {
            rates.record_n(i, events as f64);
        }
    }
    let stop = new_socket(&ctx, zmq::REQ)?;
    stop.connect(&ep)?;
    stop.send(&b"stop"[..], 0)?;
    hub.join()
        .map_err(|_| anyhow::anyhow!("the bare hub panicked"))??;
    Ok(rates)
}

/// `f2b-bench --idle-zmq`: a process with a libzmq context and a bound PUB socket
/// that waits for ever (until killed): the memory and CPU floor of a daemon built
/// on libzmq.
pub fn idle_zmq() -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let publ = new_socket(&ctx, zmq::PUB)?;
    publ.bind("tcp://127.0.0.1:*")?;
    let sub = new_socket(&ctx, zmq::SUB)?;
    sub.connect(&last_endpoint(&publ))?;
    println!("ready {}", last_endpoint(&publ));
    loop {
        let mut items = [sub.as_poll_item(zmq::POLLIN)];
        zmq::poll(&mut items, -1)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bare_round_trip_and_hop_measure_something() {
        for work in [Work::None, Work::Signatures] {
            let (s, last) = rtt_plus_hop(2, 20, work).unwrap();
            assert_eq!((s.len(), last.len()), (40, 20));
            assert!(last.median() >= s.median());
            assert!(s.median() > 0.0 && s.median() < 1000.0, "{}", s.median());
        }
    }

    #[test]
    fn the_bare_throughput_counts_replies() {
        let r = reqrep_throughput(2, 1, 1, 0.2).unwrap();
        assert!(r.overall() > 10.0, "{}", r.overall());
        let r = reqrep_throughput(2, 8, 1, 0.2).unwrap();
        assert!(r.overall() > 10.0, "{}", r.overall());
    }

    #[test]
    fn the_bare_throughput_of_reports_counts_their_events() {
        let (one, n) = sample_request(1);
        assert_eq!(n, 1);
        assert!(matches!(
            f2b_proto::Request::decode(&one),
            Ok(f2b_proto::Request::Report(_))
        ));
        let (many, n) = sample_request(f2b_proto::MAX_REPORT_EVENTS);
        assert_eq!(n, f2b_proto::MAX_REPORT_EVENTS);
        assert!(
            many.len() > 20 * one.len() && many.len() <= f2b_proto::MAX_MESSAGE_SIZE,
            "{} bytes",
            many.len()
        );
        let r = reqrep_throughput(2, 1, f2b_proto::MAX_REPORT_EVENTS, 0.2).unwrap();
        let replies = r.count() / n as f64;
        assert!(replies >= 1.0 && replies.fract() == 0.0, "{}", r.count());
    }
}
