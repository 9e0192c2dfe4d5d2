//! Benchmark 1: propagation latency, from a Ban line appended to a node's
//! fail2ban.log to the moment another node's subscriber hands the event to its
//! action, with 1 and 10 subscribers: real publisher, monitor and subscribers on
//! loopback, in their shipped configuration (snapshots on, `ban_jail = "cluster"`).
//!
//! The subscribers run the stock `log` action, whose `log_path` is a named pipe
//! (FIFO) that this process holds open for reading: the action's write of its line
//! is the moment measured, read here by a thread blocked in `read` and stamped with
//! the same monotonic clock that stamped the append. Nothing in the daemons is
//! changed or instrumented, no file is polled, and the reading costs the
//! subscriber nothing more than writing a regular file would.
//!
//! Each configuration runs twice. Back to back, the next line is written as soon
//! as the previous event reached every subscriber; its report may then wait for
//! the previous one's ACK, which the publisher sends after its ledger's sync.
//! After the ACK, the next line waits for the monitor's `reported` line of the
//! previous event as well, so each event starts on an idle path, as each of the
//! baseline's round trips starts after the previous reply.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::stat::Mode;

use crate::baseline;
use crate::cluster::{self, Publisher, SubscriberSpec};
use crate::daemon::Daemon;
use crate::load::ip_for;
use crate::report::{Check, Goal, Report, Row, Unit};
use crate::stats::Samples;
use crate::trust::Trust;
use crate::Sizes;

/// Events sent first and not measured (connections, caches and the first
/// SQLite pages warm up).
const WARMUP: usize = 3;

/// How long one event may take to reach every subscriber before the run fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// When the next Ban line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// As soon as the previous event reached every subscriber: the monitor may
    /// still be waiting for the publisher's ACK of it (which follows the
    /// ledger's sync), and the next report then waits for that ACK.
    BackToBack,
    /// Once the previous event also had its ACK at the monitor (its `reported`
    /// line): each event starts on an idle path, as each of the baseline's round
    /// trips starts after the previous one's reply.
    AfterAck,
}

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    for subs in [1usize, 10] {
        let (base, base_last) =
            baseline::rtt_plus_hop(subs, sizes.baseline_iters, baseline::Work::None)?;
        let (signed, signed_last) =
            baseline::rtt_plus_hop(subs, sizes.baseline_iters, baseline::Work::Signatures)?;
        for pace in [Pace::BackToBack, Pace::AfterAck] {
            let sub_dir = match pace {
                Pace::BackToBack => format!("{subs}-subscribers"),
                Pace::AfterAck => format!("{subs}-subscribers-after-ack"),
            };
            let (each, last, ranks) =
                measure(&dir.join(sub_dir), subs, sizes.latency_events, pace)?;
            add_rows(report, subs, pace, (&each, &last), (&base, &base_last));
            report.note(signed_note(
                subs,
                pace,
                (&each, &last),
                (&signed, &signed_last),
            ));
            if subs > 1 {
                let medians: Vec<String> =
                    ranks.iter().map(|r| format!("{:.3}", r.median())).collect();
                report.note(format!(
                    "Benchmark 1, {subs} subscribers{}: each event's deliveries in the \
                     order they came, medians: {} ms (the subscribers share the \
                     machine's CPUs, so each adds its work per event to the next ones)",
                    match pace {
                        Pace::BackToBack => ", back to back",
                        Pace::AfterAck => ", each line after the previous one's ACK",
                    },
                    medians.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// The figures of one configuration against the bare baseline that also does the
/// Ed25519 work every secure event needs (the hub signs the broadcast, each
/// subscriber verifies it): how much of the ratio to the baseline is that
/// work, which ten subscribers sharing two CPUs do one after another.
fn signed_note(
    subs: usize,
    pace: Pace,
    (each, last): (&Samples, &Samples),
    (signed, signed_last): (&Samples, &Samples),
) -> String {
    let paced = match pace {
        Pace::BackToBack => "back to back",
        Pace::AfterAck => "each line after the previous one's ACK",
    };
    let mut s = format!(
        "Benchmark 1, {subs} subscriber{}, {paced}: against the bare round trip and hop \
         with the signature work (the bare hub signs each broadcast, each bare \
         subscriber verifies it), {:.3} ms: {:.2}x",
        if subs == 1 { "" } else { "s" },
        signed.median(),
        each.median() / signed.median()
    );
    if subs > 1 {
        s.push_str(&format!(
            " (every delivery); the last of them against the last of that baseline, \
             {:.3} ms: {:.2}x",
            signed_last.median(),
            last.median() / signed_last.median()
        ));
    }
    s
}

/// The rows of one configuration: every delivery and, with several subscribers,
/// the last of each event's deliveries.
fn add_rows(
    report: &mut Report,
    subs: usize,
    pace: Pace,
    (each, last): (&Samples, &Samples),
    (base, base_last): (&Samples, &Samples),
) {
    let goal = Goal::new(
        "p50 <= 2 ms, p99 <= 10 ms, <= 5x bare",
        &[
            Check::MedianAtMost(2.0),
            Check::P99AtMost(10.0),
            Check::RatioAtMost(5.0),
        ],
    );
    let label = "bare REQ/REP round trip + PUB/SUB hop";
    let paced = match pace {
        Pace::BackToBack => "",
        Pace::AfterAck => ", each line after the previous one's ACK",
    };
    let what = if subs == 1 {
        format!("Ban line -> action, 1 subscriber{paced}")
    } else {
        format!("Ban line -> action, {subs} subscribers (every delivery){paced}")
    };
    report.add(
        Row::new(1, what, Unit::Ms, each)
            .baseline(label, base, Unit::Ms)
            .goal(goal.clone()),
    );
    if subs > 1 {
        report.add(
            Row::new(
                1,
                format!("Ban line -> action, {subs} subscribers (the last of them){paced}"),
                Unit::Ms,
                last,
            )
            .baseline(format!("{label} (the last of {subs})"), base_last, Unit::Ms)
            .goal(goal),
        );
    }
}

/// What one delivery said: which subscriber, which address, when.
type Delivery = (usize, String, Instant);

/// Reads the named pipe `path` line by line, sending each Ban's address.
fn fifo_reader(i: usize, path: &Path, tx: mpsc::Sender<Delivery>) -> anyhow::Result<()> {
    nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600))
        .with_context(|| format!("mkfifo {}", path.display()))?;
    // Read and write: the open does not wait for a writer, and the pipe never
    // reaches end of file while the subscriber reopens it for each batch.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    thread::Builder::new()
        .name(format!("fifo-{i}"))
        .spawn(move || {
            let mut r = BufReader::new(f);
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let now = Instant::now();
                // "... f2b-subscriber[PID]: Ban 100.64.0.3 jail=cluster ..."
                if let Some(rest) = line.split_once(": Ban ").map(|(_, r)| r) {
                    let ip = rest.split_whitespace().next().unwrap_or("").to_owned();
                    if tx.send((i, ip, now)).is_err() {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// Runs `events` bans through a publisher, one monitor and `subs` subscribers,
/// paced as `pace` says; returns every delivery's latency and, per event, the
/// latency to the last subscriber (milliseconds).
fn measure(
    dir: &Path,
    subs: usize,
    events: usize,
    pace: Pace,
) -> anyhow::Result<(Samples, Samples, Vec<Samples>)> {
    let trust = Trust::generate(&["origin"]);
    let publisher = Publisher::start(&dir.join("hub"), &trust, &[])?;
    let origin_log = dir.join("origin").join("fail2ban.log");
    std::fs::create_dir_all(dir.join("origin"))?;
    let monitor = cluster::start_monitor(
        &dir.join("origin"),
        "origin",
        &publisher.reply,
        &origin_log,
        &trust,
    )?;
    let (tx, rx) = mpsc::channel::<Delivery>();
    let mut subscribers: Vec<Daemon> = Vec::new();
    for i in 0..subs {
        let sdir = dir.join(format!("node{i}"));
        std::fs::create_dir_all(&sdir)?;
        let fifo = sdir.join("applied.fifo");
        fifo_reader(i, &fifo, tx.clone())?;
        let name = format!("node{i}");
        subscribers.push(cluster::spawn_subscriber(
            &sdir,
            &SubscriberSpec {
                name: &name,
                publisher: &publisher.broadcast,
                snapshot: Some(&publisher.reply),
                action: cluster::log_action(&fifo),
            },
            &trust,
        )?);
    }
    drop(tx);
    for s in &subscribers {
        cluster::wait_subscriber(s, true)?;
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(&origin_log)
        .with_context(|| format!("open {}", origin_log.display()))?;
    let mut each = Samples::new();
    let mut last = Samples::new();
    // By rank: the first delivery of each event, the second...
    let mut ranks = vec![Samples::new(); subs];
    for k in 0..WARMUP + events {
        let ip = ip_for(k as u64).to_string();
        let line = format!("{}\n", f2b_tests::logline::ban("sshd", &ip));
        if pace == Pace::AfterAck {
            // Counter 0 counts the monitor's `reported` lines: one per ACK.
            monitor.wait_count(0, k, EVENT_TIMEOUT)?;
        }
        let t0 = Instant::now();
        log.write_all(line.as_bytes())?;
        let mut got = vec![false; subs];
        let mut arrived = Vec::with_capacity(subs);
        let deadline = t0 + EVENT_TIMEOUT;
        while got.iter().any(|g| !g) {
            let left = deadline.saturating_duration_since(Instant::now());
            let (i, dip, t) = rx.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "ban of {ip} reached {} of {subs} subscribers within {EVENT_TIMEOUT:?}\n{}",
                    got.iter().filter(|g| **g).count(),
                    publisher.daemon.tail_text()
                )
            })?;
            if dip != ip || got[i] {
                continue;
            }
            got[i] = true;
            let d = t.saturating_duration_since(t0);
            arrived.push(d);
            if k >= WARMUP {
                each.push_ms(d);
            }
        }
        if k >= WARMUP {
            arrived.sort();
            for (rank, d) in ranks.iter_mut().zip(&arrived) {
                rank.push_ms(*d);
            }
            last.push_ms(arrived.last().copied().unwrap_or_default());
        }
    }
    Ok((each, last, ranks))
}
