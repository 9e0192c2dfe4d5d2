//! Benchmark 4: footprint. Resident memory (VmRSS, and VmHWM for the peak under
//! load) and CPU time (utime + stime) of each daemon, from /proc: idle, under a
//! load of Ban lines going through the whole pipeline, and the publisher's memory
//! with one stalled subscriber (connected, reading nothing) after a million events.
//! Baseline: a bare libzmq process (`f2b-bench --idle-zmq`: a context, a bound
//! PUB socket and a SUB connected to it, waiting in zmq_poll).

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use f2b_common::sockets::new_socket;

use crate::cluster::{self, Publisher, SubscriberSpec};
use crate::daemon::{Daemon, Usage};
use crate::load::{self, ip_for, merge, Shape, Until};
use crate::report::{Check, Goal, Report, Row, Unit};
use crate::stats::Samples;
use crate::trust::Trust;
use crate::Sizes;

/// The load clients behind the stalled subscriber.
const STALLED_CLIENTS: usize = 16;

pub fn run(dir: &Path, sizes: &Sizes, report: &mut Report) -> anyhow::Result<()> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--idle-zmq");
    let bare = Daemon::spawn("bare libzmq process", cmd, &[])?;
    bare.wait_line(&["ready"], Duration::from_secs(10))?;

    let trust = Trust::generate(&["web1"]);
    let publisher = Publisher::start(&dir.join("hub"), &trust, &[])?;
    let log = dir.join("web1").join("fail2ban.log");
    std::fs::create_dir_all(dir.join("web1"))?;
    let monitor =
        cluster::start_monitor(&dir.join("web1"), "web1", &publisher.reply, &log, &trust)?;
    let subscriber = cluster::start_subscriber(
        &dir.join("web2"),
        &SubscriberSpec {
            name: "web2",
            publisher: &publisher.broadcast,
            snapshot: Some(&publisher.reply),
            action: cluster::log_action(&dir.join("web2").join("applied.log")),
        },
        &trust,
    )?;
    let daemons: [(&str, &Daemon); 3] = [
        ("f2b-publisher", &publisher.daemon),
        ("f2b-monitor", &monitor),
        ("f2b-subscriber", &subscriber),
    ];
    // Idle: let start-up finish, then measure CPU over the idle period.
    thread::sleep(Duration::from_secs(1));
    let before: Vec<Usage> = daemons
        .iter()
        .map(|(_, d)| d.usage())
        .collect::<anyhow::Result<_>>()?;
    let bare_before = bare.usage()?;
    let idle = Duration::from_secs(sizes.idle_secs);
    let t0 = Instant::now();
    thread::sleep(idle);
    let wall = t0.elapsed();
    let per_min = |a: &Usage, b: &Usage| {
        (b.cpu.saturating_sub(a.cpu)).as_secs_f64() * 1e3 * 60.0 / wall.as_secs_f64()
    };
    let bare_after = bare.usage()?;
    let bare_rss = Samples::from_values(vec![bare_after.rss_mib]);
    let bare_cpu = Samples::from_values(vec![per_min(&bare_before, &bare_after)]);
    let after: Vec<Usage> = daemons
        .iter()
        .map(|(_, d)| d.usage())
        .collect::<anyhow::Result<_>>()?;
    for (((name, _), a), b) in daemons.iter().zip(&before).zip(&after) {
        report.add(
            Row::single(4, format!("{name} RSS, idle"), Unit::MiB, b.rss_mib).baseline(
                "bare libzmq process",
                &bare_rss,
                Unit::MiB,
            ),
        );
        report.add(
            Row::single(
                4,
                format!("{name} CPU, idle ({} s)", sizes.idle_secs),
                Unit::CpuMsPerMin,
                per_min(a, b),
            )
            .baseline("bare libzmq process", &bare_cpu, Unit::CpuMsPerMin)
            .goal(Goal::new(
                "~0 (<= 60 ms/min, 0.1% of a CPU)",
                &[Check::MedianAtMost(60.0)],
            )),
        );
    }
    if sizes.idle_secs < 60 {
        report.note(format!(
            "Benchmark 4: idle CPU measured over {} s (quick mode), scaled to a minute; \
             /proc counts CPU time in 10 ms ticks.",
            sizes.idle_secs
        ));
    }

    // Under load: Ban lines through monitor -> publisher -> subscriber.
    let n = sizes.load_lines;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log)?;
    let t0 = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let mut text = String::new();
        for k in chunk {
            text.push_str(&f2b_tests::logline::ban(
                "sshd",
                &ip_for(*k as u64).to_string(),
            ));
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
    }
    let done = subscriber.wait_count(0, n, Duration::from_secs(600))?;
    let took = done.saturating_duration_since(t0);
    for (name, d) in daemons {
        let u = d.usage()?;
        report.add(
            Row::single(
                4,
                format!("{name} RSS, peak under load"),
                Unit::MiB,
                u.peak_mib,
            )
            .baseline("bare libzmq process", &bare_rss, Unit::MiB),
        );
    }
    report.note(format!(
        "Benchmark 4: the load is {n} Ban lines appended to one node's fail2ban.log \
         (100 per write); all were applied by the other node's subscriber in {:.1} s \
         ({:.0} events/s: one monitor, one request in flight, each request a \
         `reports` of the events read and waiting, up to 32, committed before its ACK).",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    ));
    drop(monitor);
    drop(subscriber);
    drop(publisher);

    // A stalled subscriber, against the same load with no subscriber at all: the
    // difference is what the subscriber that reads nothing costs.
    let (rss, peak, rate) = stalled(&dir.join("stalled"), sizes.stalled_events, true)?;
    let (alone, _, _) = stalled(&dir.join("alone"), sizes.stalled_events, false)?;
    report.add(
        Row::single(
            4,
            format!(
                "f2b-publisher RSS after {} events with a stalled subscriber (peak {:.1} MiB)",
                sizes.stalled_events, peak
            ),
            Unit::MiB,
            rss,
        )
        .baseline(
            "the same load, no subscriber",
            &Samples::from_values(vec![alone]),
            Unit::MiB,
        )
        .goal(Goal::new(
            "bounded by the HWM, <= 64 MiB",
            &[Check::MedianAtMost(64.0)],
        )),
    );
    report.note(format!(
        "Benchmark 4: the {} events behind the stalled subscriber were reported by \
         {STALLED_CLIENTS} pipelined clients (DEALER, 4 in flight each, each its own \
         node: the publisher takes at most 65,536 signed reports per node within its \
         60 s replay window) at {:.0} events/s.",
        sizes.stalled_events, rate
    ));
    Ok(())
}

/// A publisher with (`with_sub`) one SUB socket that reads one heartbeat (it is
/// connected) and then nothing, while `events` events are reported; the
/// publisher's VmRSS and VmHWM after, and the reporting rate.
fn stalled(dir: &Path, events: u64, with_sub: bool) -> anyhow::Result<(f64, f64, f64)> {
    // Sixteen nodes with 4 reports in flight each: the publisher remembers at most
    // 65,536 nonces per node within its replay window (60 s) and refuses more
    // (rate_limited), so no node may report more than that in a minute.
    let owned: Vec<String> = (1..=STALLED_CLIENTS).map(|i| format!("load{i}")).collect();
    let nodes: Vec<&str> = owned.iter().map(String::as_str).collect();
    let trust = Trust::generate(&nodes);
    let publisher = Publisher::start(dir, &trust, &[])?;
    let sub_ctx = zmq::Context::new();
    let sub = new_socket(&sub_ctx, zmq::SUB)?;
    if with_sub {
        sub.set_subscribe(b"")?;
        sub.set_rcvtimeo(10_000)?;
        sub.connect(&publisher.broadcast)?;
        sub.recv_multipart(0)
            .context("the stalled subscriber got no heartbeat within 10 s")?;
    }
    let ctx = zmq::Context::new();
    let ips = Arc::new(AtomicU64::new(0));
    let until = Until::Total(events);
    let t0 = Instant::now();
    let tallies = load::report_from_all(
        &ctx,
        &publisher.reply,
        &nodes,
        Shape::single(4),
        &trust,
        &ips,
        &until,
    )?;
    let took = t0.elapsed();
    let tally = merge(&tallies);
    if tally.broadcast != events {
        anyhow::bail!(
            "{} of {events} events were broadcast\n{}",
            tally.broadcast,
            publisher.daemon.tail_text()
        );
    }
    let u = publisher.daemon.usage()?;
    drop(sub);
    Ok((u.rss_mib, u.peak_mib, events as f64 / took.as_secs_f64()))
}
