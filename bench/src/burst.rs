//! Benchmark 3: a burst of 10,000 bans applied into a real fail2ban-server (a
//! private one from the tests' harness, with a no-op ban action, in the shipped
//! `cluster` jail) by one real subscriber:
//!
//! - (a) one fail2ban-client per ban: a sample of calls made here, one after the
//!   other (`fail2ban-client set cluster banip IP`), extrapolated to the burst;
//! - (b) the `fail2ban-client` action: the subscriber batches the burst, many
//!   addresses per call;
//! - (c) the `fail2ban-socket` action: the same batches over fail2ban-server's
//!   socket, without a Python process per call;
//! - and the `none` action, the floor: receiving, recording and queueing alone.
//!
//! (c) and the floor run twice: with one `event` message per ban (what the
//! publisher sends when reports reach it one at a time, from one monitor) and with
//! `events` messages packed as the publisher packs reports it decides together (a
//! busy hub), one signature per message.
//!
//! The burst comes from a stand-in publisher here, a PUB socket sending the
//! protocol's broadcasts (made with f2b-proto and signed before the clock starts)
//! as fast as it can, so the figure is the subscriber's and fail2ban's, not the
//! publisher's ingestion rate (benchmark 2). Timed from the first message sent to
//! the subscriber's last `applied` line; fail2ban is then asked how many addresses
//! its jail holds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use f2b_common::sockets::{last_endpoint, new_socket};
use f2b_proto::{Broadcast, Epoch, Heartbeat, NodeName, Sequenced};
use f2b_tests::cluster::toml_str;
use f2b_tests::fail2ban::{self, Fail2ban};

use crate::cluster::{self, SubscriberSpec};
use crate::load::{ban_event, ip_for};
use crate::report::{Check, Goal, Report, Row, Unit};
use crate::stats::Samples;
use crate::trust::Trust;
use crate::Sizes;

/// The stand-in publisher's epoch.
const EPOCH: Epoch = Epoch(0x0b5e_55ed_0000_0001);

/// How long one burst may take before the run fails (batched fail2ban-client is
/// a few seconds; one call per ban would be minutes, but is never run whole).
const BURST_TIMEOUT: Duration = Duration::from_secs(600);

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    if let Err(why) = fail2ban::available() {
        report.note(format!(
            "Benchmark 3 SKIPPED: it needs fail2ban ({why}); scripts/test installs it"
        ));
        eprintln!("\n********** SKIPPED benchmark 3: it needs fail2ban: {why} **********\n");
        return Ok(());
    }
    let n = sizes.burst_bans;
    let fb = Fail2ban::start(&dir.join("fail2ban"), &[]);
    let sock = fb.socket().to_owned();

    // (a) one fail2ban-client per ban, sampled.
    let mut per_call = Samples::new();
    for k in 0..sizes.client_sample {
        let ip = ip_for(5_000_000 + k as u64).to_string();
        let t = Instant::now();
        let out = fb.client(&["set", "cluster", "banip", &ip]);
        if !out.success {
            bail!("fail2ban-client set cluster banip {ip} failed: {out:?}");
        }
        per_call.push_ms(t.elapsed());
    }
    let (a_median, a_p99) = (
        per_call.median() * n as f64 / 1e3,
        per_call.p99() * n as f64 / 1e3,
    );
    let mut a_row = Row::single(
        3,
        format!(
            "(a) one fail2ban-client per ban: {n} bans, extrapolated from {} calls \
             ({:.1} ms median per call)",
            sizes.client_sample,
            per_call.median()
        ),
        Unit::Secs,
        a_median,
    );
    a_row.p99 = a_p99;
    a_row.n = per_call.len();
    report.add(a_row);

    let client = format!(
        "action = \"fail2ban-client\"\nfail2ban_client = \"fail2ban-client\"\nsocket = {}",
        toml_str(&sock.to_string_lossy())
    );
    let socket = format!(
        "action = \"fail2ban-socket\"\nsocket = {}",
        toml_str(&sock.to_string_lossy())
    );
    let none = "action = \"none\"".to_owned();
    let goal = || Some(Goal::new("<= 2 s for 10,000", &[Check::MedianAtMost(2.0)]));
    // (label, action, packed, goal). Unpacked: one `event` message per ban, as a
    // publisher sends reports decided one at a time (one monitor). Packed: `events`
    // messages of up to 4 KiB, as it sends reports decided together (a busy hub).
    let actions = [
        ("(b) fail2ban-client action, batched", client, false, None),
        (
            "(c) fail2ban-socket action, one event a message",
            socket.clone(),
            false,
            goal(),
        ),
        (
            "(c) fail2ban-socket action, events packed by the publisher",
            socket,
            true,
            goal(),
        ),
        (
            "floor: `none` action (no fail2ban), one event a message",
            none.clone(),
            false,
            None,
        ),
        ("floor: `none` action, events packed", none, true, None),
    ];
    let mut run_no = 0;
    let mut cpu_notes = Vec::new();
    for (label, action, packed, goal) in actions {
        let mut times = Samples::new();
        let mut cpu = Samples::new();
        for _ in 0..sizes.burst_reps {
            run_no += 1;
            let out = fb.client(&["unban", "--all"]);
            if !out.success {
                bail!("fail2ban-client unban --all failed: {out:?}");
            }
            let (took, cpu_per_ban) = burst(
                &dir.join(format!("run{run_no}")),
                &action,
                n,
                run_no as u64 * 100_000,
                packed,
            )?;
            if !action.contains("\"none\"") {
                let held = banned_count(&fb)?;
                if held < n {
                    bail!("{label}: fail2ban holds {held} bans after a burst of {n}");
                }
            }
            times.push(took.as_secs_f64());
            cpu.push(cpu_per_ban.as_secs_f64() * 1e6);
        }
        cpu_notes.push(format!(
            "{} {:.0} us",
            label.split(':').next().unwrap_or(label),
            cpu.median()
        ));
        let mut row = Row::new(3, format!("{label}: {n} bans"), Unit::Secs, &times)
            .baseline_values("(a)", a_median, a_p99);
        if let Some(g) = goal {
            row = row.goal(g);
        }
        report.add(row);
    }
    report.note(format!(
        "Benchmark 3: the subscriber's own CPU time (utime + stime) per ban, median of \
         the bursts: {}.",
        cpu_notes.join(", ")
    ));
    if sizes.burst_reps < 5 {
        report.note(format!(
            "Benchmark 3: {} burst(s) per action: with so few, the p99 column is the \
             slowest burst; the ratio is to (a)'s extrapolated median.",
            sizes.burst_reps
        ));
    }
    Ok(())
}

/// How many addresses the `cluster` jail holds (`status cluster`).
fn banned_count(fb: &Fail2ban) -> anyhow::Result<usize> {
    let out = fb.client_ok(&["status", "cluster"]);
    out.lines()
        .find_map(|l| l.split_once("Currently banned:"))
        .and_then(|(_, n)| n.trim().parse().ok())
        .with_context(|| format!("no \"Currently banned\" in {out:?}"))
}

/// One burst of `n` bans (addresses from `ip_base`) through a fresh subscriber
/// with `action`, one `event` message per ban or (`packed`) as few `events`
/// messages as fit; how long from the first message sent to the last ban applied,
/// and the subscriber's CPU time per ban meanwhile. The messages are encoded and
/// signed before the clock starts: the publisher's cost is benchmark 2's.
fn burst(
    dir: &Path,
    action: &str,
    n: usize,
    ip_base: u64,
    packed: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let trust = Trust::generate(&[]);
    let ctx = zmq::Context::new();
    let publ = new_socket(&ctx, zmq::PUB)?;
    // The whole burst fits in the queue: nothing is dropped at the stand-in.
    publ.set_sndhwm(i32::try_from(n * 2 + 1000).unwrap_or(i32::MAX))?;
    publ.bind("tcp://127.0.0.1:*")?;
    let endpoint = last_endpoint(&publ);
    let frames = |b: &Broadcast| -> Vec<Vec<u8>> {
        let (topic, payload) = (b.topic(), b.encode());
        let mut frames = vec![topic.clone(), payload.clone()];
        frames.extend(trust.broadcast_frames(&topic, &payload));
        frames
    };
    let send = |b: &Broadcast| -> anyhow::Result<()> {
        publ.send_multipart(frames(b), 0)?;
        Ok(())
    };
    let heartbeat = |seq| {
        Broadcast::Heartbeat(Heartbeat {
            seq,
            epoch: EPOCH,
            interval_ms: 1000,
        })
    };
    let sub = cluster::spawn_subscriber(
        dir,
        &SubscriberSpec {
            name: "node2",
            publisher: &endpoint,
            snapshot: None,
            action: action.to_owned(),
        },
        &trust,
    )?;
    let deadline = Instant::now() + cluster::START_TIMEOUT;
    loop {
        send(&heartbeat(0))?;
        if sub
            .wait_line(&[": connected "], Duration::from_millis(100))
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            sub.wait_line(&[": connected "], Duration::ZERO)?;
        }
    }
    let node = NodeName::new("node1").context("valid")?;
    let events: Vec<Sequenced> = (1..=n as u64)
        .map(|seq| Sequenced {
            seq,
            epoch: EPOCH,
            event: ban_event(&node, ip_for(ip_base + seq)),
        })
        .collect();
    let msgs: Vec<Vec<Vec<u8>>> = match packed {
        true => f2b_proto::pack_events(events),
        false => events.into_iter().map(Broadcast::Event).collect(),
    }
    .iter()
    .map(frames)
    .collect();
    let cpu_before = sub.usage()?.cpu;
    let t0 = Instant::now();
    for m in msgs {
        publ.send_multipart(m, 0)?;
    }
    let deadline = t0 + BURST_TIMEOUT;
    let done = loop {
        if let Some(t) = sub.wait_count_for(0, n, Duration::from_millis(500)) {
            break t;
        }
        if Instant::now() > deadline || !sub.is_running() {
            sub.wait_count(0, n, Duration::ZERO)?;
        }
        send(&heartbeat(n as u64))?;
    };
    let cpu = sub.usage()?.cpu.saturating_sub(cpu_before);
    Ok((done.saturating_duration_since(t0), cpu / n as u32))
}
