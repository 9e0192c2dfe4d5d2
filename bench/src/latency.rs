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

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    for subs in [1usize, 10] {
        let (base, base_last) = baseline::rtt_plus_hop(subs, sizes.baseline_iters)?;
        let (each, last) = measure(
            &dir.join(format!("{subs}-subscribers")),
            subs,
            sizes.latency_events,
        )?;
        let goal = Goal::new(
            "p50 <= 2 ms, p99 <= 10 ms, <= 5x bare",
            &[
                Check::MedianAtMost(2.0),
                Check::P99AtMost(10.0),
                Check::RatioAtMost(5.0),
            ],
        );
        let label = "bare REQ/REP round trip + PUB/SUB hop";
        let what = if subs == 1 {
            "Ban line -> action, 1 subscriber".to_owned()
        } else {
            format!("Ban line -> action, {subs} subscribers (every delivery)")
        };
        report.add(
            Row::new(1, what, Unit::Ms, &each)
                .baseline(label, &base, Unit::Ms)
                .goal(goal.clone()),
        );
        if subs > 1 {
            report.add(
                Row::new(
                    1,
                    format!("Ban line -> action, {subs} subscribers (the last of them)"),
                    Unit::Ms,
                    &last,
                )
                .baseline(
                    format!("{label} (the last of {subs})"),
                    &base_last,
                    Unit::Ms,
                )
                .goal(goal),
            );
        }
    }
    Ok(())
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

/// Runs `events` bans through a publisher, one monitor and `subs` subscribers;
/// returns every delivery's latency and, per event, the latency to the last
/// subscriber (milliseconds).
fn measure(dir: &Path, subs: usize, events: usize) -> anyhow::Result<(Samples, Samples)> {
    let trust = Trust::generate(&["origin"]);
    let publisher = Publisher::start(&dir.join("hub"), &trust, &[])?;
    let origin_log = dir.join("origin").join("fail2ban.log");
    std::fs::create_dir_all(dir.join("origin"))?;
    let _monitor = cluster::start_monitor(
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
    for k in 0..WARMUP + events {
        let ip = ip_for(k as u64).to_string();
        let line = format!("{}\n", f2b_tests::logline::ban("sshd", &ip));
        let t0 = Instant::now();
        log.write_all(line.as_bytes())?;
        let mut got = vec![false; subs];
        let mut slowest = Duration::ZERO;
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
            slowest = slowest.max(d);
            if k >= WARMUP {
                each.push_ms(d);
            }
        }
        if k >= WARMUP {
            last.push_ms(slowest);
        }
    }
    Ok((each, last))
}
