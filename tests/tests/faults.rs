//! Issue 5's fault tests: streams of real fail2ban 1.0.2 Ban lines (distinct
//! addresses) through the real daemons while one of them is killed, stopped,
//! restarted, has its log rotated under it or its state destroyed; then every
//! subscriber's applied events are counted from the file of its `log` action
//! ([`NodeAction::LogFile`]: one line per applied event, with its id).
//!
//! Each test prints a line per subscriber,
//! `<test> <subscriber>: sent=N applied=N lost=N duplicated=N`, where `sent` is
//! the number of bans that subscriber must apply (those of the other nodes),
//! `applied` the Ban lines of its action, `lost` the expected addresses it never
//! banned and `duplicated` the addresses it banned more than once; and asserts
//! `lost == 0` and `duplicated == 0`. Run with `--no-capture` to see them.
//!
//! Each test states its time bound; each wait is a condition with a deadline. On a
//! failure the whole output of every daemon is saved in the test's directory
//! (kept, its path printed) under `output/`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use f2b_tests::applied::{ActionLog, Tally, Verb};
use f2b_tests::cluster::{append_lines, secs, TestDir};
use f2b_tests::logline::{ban, fail2ban_line, unban};
use f2b_tests::process::is_event;
use f2b_tests::wait;
use f2b_tests::{
    LineCount, Node, NodeAction, NodeOptions, Process, Publisher, PublisherOptions, TIMEOUT,
};

/// The address of event `n`: 198.18.0.0/15 (RFC 2544, benchmarking), 131,072
/// addresses that are never this machine's and never reserved.
fn addr(n: u32) -> String {
    assert!(n < 1 << 17, "event {n} has no address");
    format!("198.{}.{}.{}", 18 + (n >> 16), (n >> 8) & 255, n & 255)
}

/// Monitor, subscriber, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    Both,
    Monitor,
    Subscriber,
}

/// The daemons of a test. On a failure, every process's whole output is saved
/// under `<test dir>/output/` (the directory is kept) before they are stopped.
struct Faults {
    publisher: Publisher,
    nodes: Vec<Node>,
    dir: TestDir,
}

impl Faults {
    /// A publisher and `nodes`, all with a short ACK timeout (500 ms) and dead-link
    /// timeout (1 s, the publisher's heartbeat is 200 ms), applying with the `log`
    /// action, catching up with snapshots.
    fn start(nodes: &[(&str, Runs)]) -> Faults {
        let dir = TestDir::new();
        // Thousands of events from one node: the hub's limits would hold them back.
        let publisher = Publisher::start_with(
            &dir.sub("hub"),
            PublisherOptions::default().without_hub_limits(),
        );
        let nodes = nodes
            .iter()
            .map(|(name, runs)| {
                Node::start(
                    dir.path(),
                    name,
                    &publisher,
                    NodeOptions {
                        monitor: *runs != Runs::Subscriber,
                        subscriber: *runs != Runs::Monitor,
                        ack_timeout: Some("500ms".into()),
                        heartbeat_timeout: Some("1s".into()),
                        action: NodeAction::LogFile,
                        ..NodeOptions::default()
                    },
                )
            })
            .collect();
        Faults {
            publisher,
            nodes,
            dir,
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn processes(&self) -> Vec<&Process> {
        let mut all: Vec<&Process> = self.publisher.runs().collect();
        for n in &self.nodes {
            all.extend(n.processes());
        }
        all
    }

    /// The last lines of every daemon, for a failure message.
    fn report(&self) -> String {
        let mut s = String::new();
        for p in self.processes() {
            let lines = p.lines();
            let from = lines.len().saturating_sub(30);
            s.push_str(&format!(
                "--- {} (pid {}): last {} of {} lines\n",
                p.name(),
                p.pid(),
                lines.len() - from,
                lines.len()
            ));
            for l in &lines[from..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s.push_str(&format!(
            "(whole outputs in {}/output/)",
            self.dir.path().display()
        ));
        s
    }
}

impl Drop for Faults {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let out = self.dir.sub("output");
            for (i, p) in self.processes().into_iter().enumerate() {
                let name: String = p
                    .name()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                p.save_output(&out.join(format!("{i:02}-{name}.log")));
            }
        }
    }
}

/// Counts `reported` lines across every run of some monitors, incrementally.
#[derive(Debug, Default)]
struct Reports {
    counts: HashMap<u32, LineCount>,
}

impl Reports {
    fn total<'a>(&mut self, monitors: impl IntoIterator<Item = &'a Process>) -> usize {
        monitors
            .into_iter()
            .map(|p| {
                let c = self
                    .counts
                    .entry(p.pid())
                    .or_insert_with(|| LineCount::new(r": reported action="));
                p.count(c)
            })
            .sum()
    }
}

/// Waits until the `reported` lines of `monitors` are at least `written - lead`:
/// the writer stays at most `lead` lines ahead of the publisher's ACKs, so that
/// what the test does next happens in the middle of the stream.
fn keep_lead(
    reports: &mut Reports,
    monitors: &[&Process],
    written: usize,
    lead: usize,
    report: impl FnOnce() -> String,
) {
    wait::until(
        &format!(
            "the monitors to report {} events",
            written.saturating_sub(lead)
        ),
        TIMEOUT,
        || (reports.total(monitors.iter().copied()) + lead >= written).then_some(()),
        report,
    );
}

/// Waits until the action log holds a Ban of every address of `expected`.
fn wait_applied(log: &mut ActionLog, expected: &HashSet<String>, within: Duration, who: &str) {
    let started = Instant::now();
    let last = loop {
        log.refresh();
        let banned: HashSet<&str> = log
            .entries()
            .iter()
            .filter(|a| a.verb == Verb::Ban)
            .map(|a| a.ip.as_str())
            .collect();
        let missing = expected
            .iter()
            .filter(|ip| !banned.contains(ip.as_str()))
            .count();
        if missing == 0 {
            return;
        }
        if started.elapsed() >= within {
            break (log.entries().len(), missing);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let sample: Vec<&String> = {
        let banned: HashSet<&str> = log.entries().iter().map(|a| a.ip.as_str()).collect();
        expected
            .iter()
            .filter(|ip| !banned.contains(ip.as_str()))
            .take(10)
            .collect()
    };
    panic!(
        "{who}: {} of {} expected bans still missing after {within:?} ({} lines applied); \
         for instance {sample:?}",
        last.1,
        expected.len(),
        last.0
    );
}

/// Prints the report line of one subscriber and asserts nothing was lost or
/// applied twice.
fn check_tally(test: &str, who: &str, log: &mut ActionLog, expected: &HashSet<String>) -> Tally {
    log.refresh();
    let t = log.tally(expected);
    println!("{test} {who}: {t}");
    assert!(log.bad_lines().is_empty(), "{who}: {:?}", log.bad_lines());
    assert_eq!(t.lost, 0, "{who} lost bans: {t}");
    assert_eq!(t.duplicated, 0, "{who} applied bans twice: {t}");
    assert_eq!(
        t.unexpected, 0,
        "{who} applied bans it should not (its own node's?): {t}"
    );
    t
}

/// What the monitors reported, from their `reported` lines (every run).
#[derive(Debug, Clone)]
struct Reported {
    ip: String,
    id: String,
    status: String,
    seq: String,
}

fn reported(monitors: &[&Process]) -> Vec<Reported> {
    monitors
        .iter()
        .flat_map(|p| p.events("reported", &[]))
        .map(|l| {
            let f = |k: &str| f2b_tests::field(&l, k).unwrap_or_default();
            Reported {
                ip: f("ip"),
                id: f("id"),
                status: f("status"),
                seq: f("seq"),
            }
        })
        .collect()
}

/// The events the publisher sent, from its `broadcast` and `rebroadcast` lines
/// (every run): id -> [(seq, ip)].
fn broadcasts(publisher: &Publisher) -> HashMap<String, Vec<(String, String)>> {
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for p in publisher.runs() {
        for l in p.lines() {
            if is_event(&l, "broadcast", &[]) || is_event(&l, "rebroadcast", &[]) {
                let f = |k: &str| f2b_tests::field(&l, k).unwrap_or_default();
                out.entry(f("id")).or_default().push((f("seq"), f("ip")));
            }
        }
    }
    out
}

/// Every report a monitor had ACKed (status `broadcast` or `duplicate`) matches a
/// `broadcast`/`rebroadcast` line of the publisher with the same id, address and
/// sequence number.
fn check_reports_match_broadcasts(reports: &[Reported], publisher: &Publisher) {
    let sent = broadcasts(publisher);
    for r in reports {
        if r.status == "unchanged" {
            continue;
        }
        let lines = sent
            .get(&r.id)
            .unwrap_or_else(|| panic!("reported {r:?}: no broadcast of that id"));
        assert!(
            lines.iter().any(|(seq, ip)| *seq == r.seq && *ip == r.ip),
            "reported {r:?}: the publisher broadcast {lines:?}"
        );
    }
}

/// Issue 5 (a). Three monitors report 10,000 bans (distinct addresses, appended to
/// their fail2ban logs in chunks of 50, at most 1,500 lines ahead of the ACKs);
/// the publisher is SIGKILLed (by its PID) twice in the middle of the stream, and
/// restarted (same ports, same ledger) once 600 more lines were written (200 per
/// node) and every monitor has noticed (a report timed out). Two of the nodes run
/// a subscriber.
///
/// Every ban is applied exactly once on each subscriber that is not its origin and
/// never on its origin's; every event a monitor had ACKed is one the publisher
/// broadcast with that sequence number. Bound: 90 s in all (asserted), of which
/// at most 60 s for the monitors to deliver everything after the stream is written
/// and 30 s for the subscribers to apply it; about 10 s on a 2-core machine.
#[test]
fn publisher_killed_twice_in_10000_events_loses_and_repeats_nothing() {
    const BOUND: Duration = Duration::from_secs(90);
    const EVENTS: usize = 10_000;
    const CHUNK: usize = 50;
    const LEAD: usize = 1_500;
    const KILL_AT: [usize; 2] = [3_000, 6_500];
    const OUTAGE_LINES: usize = 600;
    const NODES: [&str; 3] = ["web1", "web2", "web3"];
    let test = "publisher_killed";
    let t0 = Instant::now();
    let mut c = Faults::start(&[
        ("web1", Runs::Both),
        ("web2", Runs::Both),
        ("web3", Runs::Monitor),
    ]);
    // Node k's j-th event is address k * 20,000 + j.
    let mut by_node: Vec<Vec<String>> = vec![Vec::new(); NODES.len()];
    let mut reports = Reports::default();
    let mut written = 0;
    let mut kills = KILL_AT.iter().peekable();
    // While the publisher is down: when it was killed, and the monitors' marks.
    let mut down: Option<(usize, Vec<usize>)> = None;
    while written < EVENTS {
        match &down {
            Some((at, marks)) if written >= at + OUTAGE_LINES => {
                // Every monitor had lines to send during the outage, and noticed.
                for (n, m) in c.nodes.iter().zip(marks) {
                    n.monitor()
                        .wait_for_event_after(*m, "publisher unreachable", &[], TIMEOUT);
                }
                let restarted = Instant::now();
                c.publisher.restart();
                println!(
                    "{test}: publisher restarted at {written} lines ({:?} to listen)",
                    restarted.elapsed()
                );
                down = None;
            }
            None if kills.peek().is_some_and(|k| written >= **k) => {
                kills.next();
                let marks: Vec<usize> = c.nodes.iter().map(|n| n.monitor().mark()).collect();
                c.publisher.kill();
                println!(
                    "{test}: publisher SIGKILLed at {written} lines ({:?})",
                    t0.elapsed()
                );
                down = Some((written, marks));
            }
            _ => {}
        }
        if down.is_none() {
            let monitors: Vec<&Process> = c.nodes.iter().map(|n| n.monitor()).collect();
            keep_lead(&mut reports, &monitors, written, LEAD, || c.report());
        }
        let k = (written / CHUNK) % NODES.len();
        let lines: Vec<String> = (0..CHUNK)
            .map(|_| {
                let n = by_node[k].len() as u32 + 20_000 * k as u32;
                let ip = addr(n);
                let line = ban("sshd", &ip);
                by_node[k].push(ip);
                line
            })
            .collect();
        c.nodes[k].append_log(&lines);
        written += CHUNK;
    }
    if down.is_some() {
        c.publisher.restart();
    }
    println!("{test}: {written} lines written in {:?}", t0.elapsed());

    // Every monitor delivers everything.
    let deadline = Instant::now() + secs(60);
    for (k, n) in c.nodes.iter().enumerate() {
        n.monitor().wait_for_count(
            r": reported action=",
            by_node[k].len(),
            deadline.saturating_duration_since(Instant::now()),
        );
    }
    println!("{test}: every event ACKed after {:?}", t0.elapsed());
    // A last ban from web3, reported after everything else: once a subscriber has
    // applied it, it has received everything before it.
    let sentinel = addr(100_000);
    c.node("web3").append_log(&[ban("sshd", &sentinel)]);
    by_node[2].push(sentinel.clone());

    // Each line was ACKed once, as broadcast (or as a duplicate: a resend whose
    // first ACK was lost with the publisher).
    let monitors: Vec<&Process> = c.nodes.iter().map(|n| n.monitor()).collect();
    let mut acks: HashMap<String, usize> = HashMap::new();
    for r in reported(&monitors) {
        assert!(
            r.status == "broadcast" || r.status == "duplicate",
            "unexpected ACK {r:?}"
        );
        if r.ip != sentinel {
            *acks.entry(r.ip).or_insert(0) += 1;
        }
    }
    assert_eq!(acks.len(), EVENTS, "ACKed addresses");
    assert!(acks.values().all(|n| *n == 1), "an event was ACKed twice");

    let subscribers = ["web1", "web2"];
    let mut logs: Vec<ActionLog> = subscribers
        .iter()
        .map(|s| ActionLog::new(&c.node(s).action_log_path))
        .collect();
    let expected: Vec<HashSet<String>> = subscribers
        .iter()
        .map(|s| {
            NODES
                .iter()
                .zip(&by_node)
                .filter(|(n, _)| *n != s)
                .flat_map(|(_, ips)| ips.iter().cloned())
                .collect()
        })
        .collect();
    for ((s, log), exp) in subscribers.iter().zip(&mut logs).zip(&expected) {
        wait_applied(log, exp, secs(30), s);
    }
    println!("{test}: every ban applied after {:?}", t0.elapsed());
    let reports = reported(&monitors);
    check_reports_match_broadcasts(&reports, &c.publisher);
    for ((s, log), exp) in subscribers.iter().zip(&mut logs).zip(&expected) {
        check_tally(test, s, log, exp);
        let sub = c.node(s).subscriber();
        println!(
            "{test} {s}: resyncs {:?}, missed-events lines {}",
            ["start", "reconnect", "epoch", "gap"]
                .map(|r| (r, sub.events("resync", &[("reason", r)]).len())),
            sub.events("missed events", &[]).len()
        );
    }
    let dups = c
        .publisher
        .runs()
        .map(|p| p.events("duplicate", &[]).len())
        .sum::<usize>();
    let rebroadcasts = c
        .publisher
        .runs()
        .map(|p| p.events("rebroadcast", &[]).len())
        .sum::<usize>();
    println!(
        "{test}: {} reports ACKed ({dups} as duplicates, {rebroadcasts} rebroadcast) in {:?}",
        reports.len(),
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < BOUND,
        "took {:?}, over {BOUND:?}",
        t0.elapsed()
    );
}

/// What a subscriber holds at the end, compared with what the cluster holds.
struct Held {
    /// Bans reported (the stream's, and the sentinel).
    sent: usize,
    /// Ban lines of its action.
    applied: usize,
    /// Active bans it does not hold.
    lost: usize,
    /// Addresses banned, or unbanned, more than once (outside the crash window
    /// below).
    duplicated: usize,
    /// Unbanned addresses it still holds.
    unbanned_held: usize,
    /// Bans applied again by the next run after a SIGKILL: the action had
    /// succeeded but the run died before it logged `applied` (and recorded it);
    /// delivery is at least once across a subscriber crash (documented).
    redelivered: usize,
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent={} applied={} lost={} duplicated={} unbanned_held={} redelivered_after_crash={}",
            self.sent,
            self.applied,
            self.lost,
            self.duplicated,
            self.unbanned_held,
            self.redelivered
        )
    }
}

/// The ids of the events a subscriber's state file records done (read after the
/// subscriber was SIGKILLed, before it starts again).
fn recorded_done(state_dir: &Path) -> HashSet<String> {
    let db = rusqlite::Connection::open(state_dir.join("subscriber.sqlite3"))
        .expect("open the killed subscriber's state");
    let mut st = db
        .prepare("SELECT id FROM events WHERE state = 'done'")
        .expect("query the state");
    st.query_map([], |r| r.get(0))
        .expect("read the state")
        .collect::<Result<_, _>>()
        .expect("read the state")
}

/// Compares `log` with the cluster's state: `active` must be held, `unbanned` must
/// not. `crashed`: the SIGKILLed runs of this subscriber, each with the ids its
/// state file recorded done when it died; the bans such a run applied and had
/// not recorded done (the subscriber records them up to 10 ms after their
/// action) may be applied once more by the next run.
fn held(
    log: &ActionLog,
    sent: usize,
    active: &HashSet<String>,
    unbanned: &HashSet<String>,
    crashed: &[(&Process, HashSet<String>)],
) -> Held {
    let holds = log.held();
    // Ids the crashed runs applied (in the file) without recording them done.
    // The records follow the actions in order, so those are the run's last
    // actions, and it recorded the ones before them.
    let mut window: HashSet<String> = HashSet::new();
    for (run, recorded) in crashed {
        let ids: Vec<&str> = log
            .entries()
            .iter()
            .filter(|a| a.pid == run.pid())
            .map(|a| a.id.as_str())
            .collect();
        let first_unrecorded = ids
            .iter()
            .rposition(|id| recorded.contains(*id))
            .map_or(0, |i| i + 1);
        assert!(
            first_unrecorded > 0,
            "the crashed run (pid {}) applied {} events and recorded none done",
            run.pid(),
            ids.len()
        );
        let tail = &ids[first_unrecorded..];
        assert!(
            ids[..first_unrecorded]
                .iter()
                .all(|id| recorded.contains(*id)),
            "the crashed run (pid {}) left events unrecorded before recorded ones",
            run.pid()
        );
        window.extend(tail.iter().map(|id| (*id).to_owned()));
    }
    // A repeat counts as the crash's only when a crashed run applied it first and
    // a later run once more.
    let crashed_pids: HashSet<u32> = crashed.iter().map(|(run, _)| run.pid()).collect();
    let mut applied: HashMap<(Verb, &str), Vec<(&str, u32)>> = HashMap::new();
    for a in log.entries() {
        applied
            .entry((a.verb, a.ip.as_str()))
            .or_default()
            .push((a.id.as_str(), a.pid));
    }
    let (mut duplicated, mut redelivered) = (0, 0);
    for ids in applied.values().filter(|ids| ids.len() > 1) {
        let after_crash = ids.len() == 2
            && ids[0].0 == ids[1].0
            && window.contains(ids[0].0)
            && crashed_pids.contains(&ids[0].1)
            && ids[1].1 != ids[0].1;
        if after_crash {
            redelivered += 1;
        } else {
            duplicated += 1;
        }
    }
    Held {
        sent,
        applied: applied
            .iter()
            .filter(|((v, _), _)| *v == Verb::Ban)
            .map(|(_, ids)| ids.len())
            .sum(),
        lost: active
            .iter()
            .filter(|ip| !holds.contains(ip.as_str()))
            .count(),
        duplicated,
        unbanned_held: unbanned
            .iter()
            .filter(|ip| holds.contains(ip.as_str()))
            .count(),
        redelivered,
    }
}

/// Issue 5 (b). One node reports 1,000 bans, and unbans 130 of them, while three
/// subscribers follow: `sub1` is stopped (SIGTERM) after it applied the first
/// bans and stays away while 500 bans and 100 unbans happen (60 of bans it
/// holds, 40 of bans it never saw); `sub2` is SIGKILLed (by its PID) after it
/// applied bans that are unbanned while it is down, and restarted 150 bans later;
/// `sub3` stays up. Both return during the stream and catch up with a snapshot:
/// they apply the bans they missed and unban what the cluster unbanned while they
/// were away.
///
/// Within 30 s of the end of the stream every subscriber holds every active ban
/// and none of the unbanned addresses, and applied no ban twice (a SIGKILL may
/// repeat the bans its last run applied without recording them done, as its
/// state file shows right after the kill: counted apart, as the subscriber's
/// delivery is at least once across its own crash). Bound:
/// 60 s in all (asserted); about 3 s on a 2-core machine.
#[test]
fn subscribers_stopped_and_killed_catch_up_bans_and_unbans() {
    const BOUND: Duration = Duration::from_secs(60);
    const EVENTS: u32 = 1_000;
    const CHUNK: u32 = 25;
    const LEAD: usize = 100;
    const CONVERGE: Duration = Duration::from_secs(30);
    let test = "subscribers_away";
    let t0 = Instant::now();
    let mut c = Faults::start(&[
        ("web1", Runs::Monitor),
        ("sub1", Runs::Subscriber),
        ("sub2", Runs::Subscriber),
        ("sub3", Runs::Subscriber),
    ]);
    let mut logs: HashMap<&str, ActionLog> = ["sub1", "sub2", "sub3"]
        .into_iter()
        .map(|s| (s, ActionLog::new(&c.node(s).action_log_path)))
        .collect();
    let range = |r: std::ops::Range<u32>| -> HashSet<String> { r.map(addr).collect() };
    let mut unbanned: HashSet<String> = HashSet::new();
    let mut reports = Reports::default();
    let mut lines_written = 0;
    let mut crashed_pid = None;
    let mut recorded = HashSet::new();
    let mut n = 0;
    while n < EVENTS {
        match n {
            200 => {
                // sub1 holds bans that will be unbanned while it is away.
                wait_applied(
                    logs.get_mut("sub1").unwrap(),
                    &range(0..60),
                    TIMEOUT,
                    "sub1",
                );
                c.node("sub1").stop_subscriber();
                println!("{test}: sub1 stopped (SIGTERM) at {n} bans");
            }
            300 => {
                let lines: Vec<String> = (0..60).map(|i| unban("sshd", &addr(i))).collect();
                c.node("web1").append_log(&lines);
                lines_written += lines.len();
                unbanned.extend(range(0..60));
            }
            400 => {
                wait_applied(
                    logs.get_mut("sub2").unwrap(),
                    &range(250..290),
                    TIMEOUT,
                    "sub2",
                );
                crashed_pid = Some(c.node("sub2").subscriber().pid());
                c.node("sub2").kill_subscriber();
                recorded = recorded_done(&c.node("sub2").subscriber_state_dir());
                println!(
                    "{test}: sub2 SIGKILLed at {n} bans, {} events recorded done",
                    recorded.len()
                );
            }
            450 => {
                // Bans sub2 held when it died, and sub1 never saw.
                let lines: Vec<String> = (250..290).map(|i| unban("sshd", &addr(i))).collect();
                c.node("web1").append_log(&lines);
                lines_written += lines.len();
                unbanned.extend(range(250..290));
            }
            550 => {
                c.node_mut("sub2").start_subscriber();
                println!("{test}: sub2 restarted at {n} bans ({:?})", t0.elapsed());
            }
            700 => {
                c.node_mut("sub1").start_subscriber();
                println!("{test}: sub1 restarted at {n} bans ({:?})", t0.elapsed());
            }
            850 => {
                let lines: Vec<String> = (800..830).map(|i| unban("sshd", &addr(i))).collect();
                c.node("web1").append_log(&lines);
                lines_written += lines.len();
                unbanned.extend(range(800..830));
            }
            _ => {}
        }
        let monitor = [c.node("web1").monitor()];
        keep_lead(&mut reports, &monitor, lines_written, LEAD, || c.report());
        let lines: Vec<String> = (n..n + CHUNK).map(|i| ban("sshd", &addr(i))).collect();
        c.node("web1").append_log(&lines);
        lines_written += lines.len();
        n += CHUNK;
    }
    let sentinel = addr(100_000);
    c.node("web1").append_log(&[ban("sshd", &sentinel)]);
    let end = Instant::now();
    println!("{test}: stream written ({:?})", t0.elapsed());

    let mut active: HashSet<String> = range(0..EVENTS).difference(&unbanned).cloned().collect();
    active.insert(sentinel);
    for (s, log) in logs.iter_mut() {
        let within = CONVERGE.saturating_sub(end.elapsed());
        let started = Instant::now();
        loop {
            log.refresh();
            let h = log.held();
            let lost = active.iter().filter(|ip| !h.contains(ip.as_str())).count();
            let kept = unbanned.iter().filter(|ip| h.contains(ip.as_str())).count();
            if lost == 0 && kept == 0 {
                break;
            }
            assert!(
                started.elapsed() < within,
                "{s} does not hold the cluster's bans {CONVERGE:?} after the stream: \
                 {lost} active bans not held, {kept} unbanned ones held\n{}",
                c.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    println!(
        "{test}: every subscriber converged {:?} after the end of the stream",
        end.elapsed()
    );
    let crashed: Vec<(&Process, HashSet<String>)> = c
        .node("sub2")
        .processes()
        .filter(|p| Some(p.pid()) == crashed_pid)
        .map(|p| (p, recorded.clone()))
        .collect();
    assert_eq!(crashed.len(), 1);
    for s in ["sub1", "sub2", "sub3"] {
        let log = &logs[s];
        let h = held(
            log,
            EVENTS as usize + 1,
            &active,
            &unbanned,
            if s == "sub2" { &crashed } else { &[] },
        );
        println!("{test} {s}: {h}");
        assert!(log.bad_lines().is_empty(), "{s}: {:?}", log.bad_lines());
        assert_eq!((h.lost, h.unbanned_held), (0, 0), "{s}: {h}");
        assert_eq!(h.duplicated, 0, "{s} applied bans twice: {h}");
        for r in c.node(s).subscriber().events("resync", &[]) {
            println!("{test} {s}: {}", &r[r.find("resync").unwrap_or(0)..]);
        }
    }
    // The returning subscribers unbanned what the cluster unbanned while they
    // were away (the catch-up's reconciliation), each once.
    for (s, gone) in [("sub1", 0..60), ("sub2", 250..290)] {
        let log = &logs[s];
        for ip in range(gone) {
            let unbans = log
                .entries()
                .iter()
                .filter(|a| a.verb == Verb::Unban && a.ip == ip)
                .count();
            assert_eq!(unbans, 1, "{s}: unbans of {ip}");
        }
    }
    assert!(
        t0.elapsed() < BOUND,
        "took {:?}, over {BOUND:?}",
        t0.elapsed()
    );
}

/// The position of the last line written to a log: waits until the monitor has
/// queued (read) the address of that line.
fn wait_read(monitor: &Process, ip: &str) {
    monitor.wait_for_event("queued", &[("ip", ip)], TIMEOUT);
}

/// Issue 5 (c). One node reports 3,000 bans while its monitor is SIGKILLed (by its
/// PID) twice and its fail2ban.log rotated ten times, every 250 lines:
///
/// - rename and create (odd rotations; Debian's logrotate): the log is renamed to
///   `fail2ban.log.<k>` and an empty one created; 100 more lines go to the renamed
///   file (fail2ban still has it open) until a simulated `fail2ban-client
///   flushlogs` (fail2ban's `rollover performed` line in the new file), then the
///   stream goes on in the new file;
/// - copytruncate (even rotations): the log is copied to `fail2ban.log.<k>` and
///   truncated, with no write in between (atomic for the test's writer, which
///   writes from this thread). The test waits for the monitor to have read the
///   file to its end before, and to have noticed the truncation after: what is
///   written before the copy and read after the truncation, or written after the
///   truncation beyond the old size before the monitor looks, is lost, as with any
///   reader of a copytruncate'd log (documented in the monitor's tail.rs).
///
/// The first kill is between rotations, with 100 lines written while the monitor
/// is down; the second in the middle of the seventh rotation: half of the renamed
/// file's lines and the flushlogs are written while it is down, so it must find
/// the renamed file and read its end first. Nothing lost, nothing applied twice
/// (a line read again after a kill is a new report of a ban the cluster holds:
/// ACKed `unchanged`, not broadcast). Bound: 60 s in all (asserted), of which at
/// most 30 s to apply everything after the stream is written; about 3 s on a
/// 2-core machine.
#[test]
fn monitor_killed_and_log_rotated_ten_times_loses_and_repeats_nothing() {
    const BOUND: Duration = Duration::from_secs(60);
    const EVENTS: u32 = 3_000;
    const CHUNK: u32 = 25;
    const LEAD: usize = 300;
    const EVERY: u32 = 250;
    const OLD_LINES: u32 = 100;
    let test = "monitor_and_rotation";
    let t0 = Instant::now();
    let mut c = Faults::start(&[("web1", Runs::Monitor), ("web2", Runs::Subscriber)]);
    let log_path = c.node("web1").log_path.clone();
    let mut reports = Reports::default();
    let mut n = 0;
    // Where the stream writes now: the log, or a renamed file until flushlogs.
    let mut target: PathBuf = log_path.clone();
    let mut rotation = 0;
    // Lines still to write to the renamed file before flushlogs.
    let mut old_left = 0;
    let mut kills = 0;
    let write = |c: &Faults, target: &Path, from: u32, count: u32, reports: &mut Reports| {
        let runs: Vec<&Process> = c.node("web1").processes().collect();
        keep_lead(reports, &runs, from as usize, LEAD, || c.report());
        let lines: Vec<String> = (from..from + count)
            .map(|i| ban("sshd", &addr(i)))
            .collect();
        append_lines(target, &lines);
    };
    while n < EVENTS {
        if old_left == 0 && n > 0 && n % EVERY == 0 && rotation < 10 {
            rotation += 1;
            let rotated = log_path.with_extension(format!("log.{rotation}"));
            if rotation % 2 == 1 {
                std::fs::rename(&log_path, &rotated).expect("rename");
                std::fs::write(&log_path, "").expect("create");
                target = rotated;
                old_left = OLD_LINES;
            } else {
                let monitor = c.node("web1").monitor();
                wait_read(monitor, &addr(n - 1));
                let mark = monitor.mark();
                std::fs::copy(&log_path, &rotated).expect("copy");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&log_path)
                    .and_then(|f| f.set_len(0))
                    .expect("truncate");
                monitor.wait_for_line_after(mark, "log file truncated", TIMEOUT);
            }
            println!(
                "{test}: rotation {rotation} ({}) at {n} lines",
                if rotation % 2 == 1 {
                    "rename and create"
                } else {
                    "copytruncate"
                }
            );
        }
        // The kills: between rotations, and in the middle of the seventh.
        let kill_now =
            (kills == 0 && n == 1_375) || (kills == 1 && rotation == 7 && old_left == 50);
        if kill_now {
            kills += 1;
            c.node("web1").kill_monitor();
            println!(
                "{test}: monitor SIGKILLed at {n} lines ({:?})",
                t0.elapsed()
            );
            // While it is down: 100 lines, or the rest of the renamed file's, the
            // flushlogs and 50 lines in the new file.
            let down: Vec<String> = (n..n + 50).map(|i| ban("sshd", &addr(i))).collect();
            append_lines(&target, &down);
            n += 50;
            if old_left > 0 {
                old_left = 0;
                target = log_path.clone();
                append_lines(&target, &[rollover(&log_path)]);
            }
            let down: Vec<String> = (n..n + 50).map(|i| ban("sshd", &addr(i))).collect();
            append_lines(&target, &down);
            n += 50;
            c.node_mut("web1").start_monitor();
            println!("{test}: monitor restarted at {n} lines");
            continue;
        }
        write(&c, &target, n, CHUNK, &mut reports);
        n += CHUNK;
        if old_left > 0 {
            old_left -= CHUNK;
            if old_left == 0 {
                // fail2ban-client flushlogs: fail2ban reopens its log.
                target = log_path.clone();
                append_lines(&target, &[rollover(&log_path)]);
            }
        }
    }
    assert_eq!((rotation, kills), (10, 2));
    let sentinel = addr(100_000);
    append_lines(&target, &[ban("sshd", &sentinel)]);
    println!("{test}: stream written ({:?})", t0.elapsed());

    let mut expected: HashSet<String> = (0..EVENTS).map(addr).collect();
    expected.insert(sentinel);
    let mut log = ActionLog::new(&c.node("web2").action_log_path);
    wait_applied(&mut log, &expected, secs(30), "web2");
    println!("{test}: every ban applied after {:?}", t0.elapsed());
    check_tally(test, "web2", &mut log, &expected);

    let runs: Vec<&Process> = c.node("web1").processes().collect();
    let reports = reported(&runs);
    check_reports_match_broadcasts(&reports, &c.publisher);
    let mut statuses: HashMap<&str, usize> = HashMap::new();
    for r in &reports {
        *statuses.entry(r.status.as_str()).or_insert(0) += 1;
    }
    println!("{test}: monitor ACKs by status {statuses:?}");
    // Every line was ACKed as broadcast, or as a duplicate (a resend after a kill:
    // the first ACK died with the monitor); a line read again after a kill is a
    // new event, ACKed `unchanged`.
    let broadcast: HashSet<&str> = reports
        .iter()
        .filter(|r| r.status == "broadcast" || r.status == "duplicate")
        .map(|r| r.ip.as_str())
        .collect();
    assert_eq!(broadcast.len(), expected.len(), "addresses broadcast");
    assert!(
        t0.elapsed() < BOUND,
        "took {:?}, over {BOUND:?}",
        t0.elapsed()
    );
}

/// fail2ban's line when `fail2ban-client flushlogs` made it reopen its log.
fn rollover(path: &Path) -> String {
    fail2ban_line(
        "fail2ban.server",
        "INFO",
        &format!("rollover performed on {}", path.display()),
    )
}

/// `len` bytes of garbage (a fixed pseudo-random sequence, newlines included).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The files in `dir` whose names start with `prefix`.
fn files_like(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found
}

/// Overwrites each of `files` with 64 KiB of garbage.
fn corrupt(files: &[PathBuf]) {
    assert!(!files.is_empty(), "nothing to corrupt");
    for f in files {
        std::fs::write(f, garbage(64 * 1024)).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

/// Removes every file of `dir` whose name starts with `prefix`; asserts there was
/// one.
fn delete(dir: &Path, prefix: &str) {
    let files = files_like(dir, prefix);
    assert!(!files.is_empty(), "no {prefix}* in {}", dir.display());
    for f in files {
        std::fs::remove_file(&f).unwrap_or_else(|e| panic!("rm {}: {e}", f.display()));
    }
}

/// The `epoch=` of the publisher's current run.
fn epoch(p: &Publisher) -> String {
    p.process()
        .wait_for_line(r"\blistening on\b", TIMEOUT)
        .field("epoch")
}

/// Issue 5 (d). Each daemon's state is deleted, then damaged, while the daemon is
/// stopped (SIGTERM); it is started again once and must come up saying what
/// happened, keep running (no exit, so no crash loop under a supervisor) and
/// serve: a new ban from web1 reaches web2 (monitor damage on web1, subscriber
/// damage on web2, so every damaged daemon is on the path). What each daemon does,
/// asserted from its log:
///
/// - monitor (`monitor-<node>-<hash>.position` and `.queue`, plain files):
///   deleted, it starts at the end of the log, resuming nothing; text garbage
///   (valid UTF-8), a clean rebuild: `unreadable saved position, starting at the
///   end of the log` and `skipped unreadable lines of the saved queue` (warnings),
///   and the state is kept from then on; binary garbage: the same clean rebuild
///   (the position is discarded with the same warning, the queue's unreadable lines
///   skipped), never a monitor without state.
/// - subscriber (`subscriber.sqlite3`): deleted, a new empty state (`new subscriber
///   state`, warning); garbage (no SQLite header) or damaged pages (a valid header,
///   garbage after it), a clean rebuild: the file is moved away
///   (`subscriber state unusable: moved it away`, error, naming `moved_to`) and a
///   new state started. It then applies again the active bans the snapshot lists
///   (it forgot applying them; bans are idempotent): counted apart, as
///   `reapplied_after_state_loss`.
/// - publisher (`ledger.sqlite3`): deleted, a new ledger (`new ledger: no previous
///   state`, warning); garbage or damaged pages, the file is moved away (`ledger
///   corrupt: moved it away`, error) and a new ledger started; either way a new
///   epoch, which the subscribers follow (`connected` with the new epoch, then
///   `resync reason=epoch`).
///
/// Bound: 60 s in all (asserted), each new ban within 30 s; about 3 s on a 2-core
/// machine.
#[test]
fn damaged_state_is_rebuilt_or_refused_clearly_and_service_goes_on() {
    const BOUND: Duration = Duration::from_secs(60);
    let test = "damaged_state";
    let t0 = Instant::now();
    let mut c = Faults::start(&[("web1", Runs::Both), ("web2", Runs::Both)]);
    let mut log = ActionLog::new(&c.node("web2").action_log_path);
    let mut sent: Vec<String> = Vec::new();
    // A new ban from web1 reaches web2, and every daemon is still running.
    let mut propagates = |c: &Faults, what: &str| {
        let ip = addr(sent.len() as u32);
        c.node("web1").append_log(&[ban("sshd", &ip)]);
        sent.push(ip.clone());
        wait_applied(&mut log, &HashSet::from([ip]), TIMEOUT, "web2");
        for p in [
            c.publisher.process(),
            c.node("web1").monitor(),
            c.node("web1").subscriber(),
            c.node("web2").monitor(),
            c.node("web2").subscriber(),
        ] {
            assert!(
                p.is_running(),
                "{} exited after {what}\n{}",
                p.name(),
                p.dump()
            );
        }
        println!("{test}: {what}: a new ban propagates ({:?})", t0.elapsed());
    };
    propagates(&c, "start");
    propagates(&c, "start");

    // --- monitor (web1) ---
    let mdir = c.node("web1").monitor_state_dir();
    for damage in ["deleted", "text garbage", "binary garbage"] {
        c.node("web1").stop_monitor();
        let files = files_like(&mdir, "monitor-web1-");
        let (position, queue) = (
            files
                .iter()
                .find(|f| f.extension().is_some_and(|e| e == "position")),
            files
                .iter()
                .find(|f| f.extension().is_some_and(|e| e == "queue")),
        );
        let (position, queue) = (
            position.expect("a saved position").clone(),
            queue.expect("a saved queue").clone(),
        );
        match damage {
            "deleted" => delete(&mdir, "monitor-web1-"),
            "text garbage" => {
                std::fs::write(&position, "{\"files\": [garbage").expect("write");
                std::fs::write(&queue, "+{not a report\n-not an id\n\n+\n").expect("write");
            }
            _ => corrupt(&[position.clone(), queue.clone()]),
        }
        c.node_mut("web1").start_monitor();
        let m = c.node("web1").monitor();
        let size = std::fs::metadata(&c.node("web1").log_path)
            .expect("the log")
            .len()
            .to_string();
        m.wait_for_event("watching", &[("offset", &size)], TIMEOUT);
        assert!(m.events("resuming from the saved state", &[]).is_empty());
        match damage {
            "deleted" => {}
            "text garbage" => {
                let p = position.display().to_string();
                let q = queue.display().to_string();
                m.wait_for_event(
                    "unreadable saved position, starting at the end of the log",
                    &[("path", &p)],
                    TIMEOUT,
                );
                m.wait_for_event(
                    "skipped unreadable lines of the saved queue",
                    &[("path", &q), ("lines", "3")],
                    TIMEOUT,
                );
            }
            _ => {
                let p = position.display().to_string();
                let q = queue.display().to_string();
                m.wait_for_event(
                    "unreadable saved position, starting at the end of the log",
                    &[("path", &p)],
                    TIMEOUT,
                );
                m.wait_for_event(
                    "skipped unreadable lines of the saved queue",
                    &[("path", &q)],
                    TIMEOUT,
                );
                assert!(
                    m.matching("cannot keep state").is_empty(),
                    "a damaged file must not cost the monitor its state"
                );
            }
        }
        propagates(&c, &format!("monitor state {damage}"));
    }

    // --- subscriber (web2) ---
    let sdir = c.node("web2").subscriber_state_dir();
    let state = sdir.join("subscriber.sqlite3");
    // Runs of web2's subscriber that started with a new state.
    let mut fresh: Vec<u32> = Vec::new();
    for damage in ["deleted", "garbage", "damaged pages"] {
        c.node("web2").stop_subscriber();
        damage_sqlite(&state, damage);
        c.node_mut("web2").start_subscriber();
        let s = c.node("web2").subscriber();
        fresh.push(s.pid());
        if damage == "deleted" {
            s.wait_for_line(
                r"WARN .*new subscriber state: no previous state .*events applied before are not known",
                TIMEOUT,
            );
        } else {
            let line = s.wait_for_line(
                r"ERROR .*subscriber state unusable: moved it away and started a new, empty one",
                TIMEOUT,
            );
            println!("{test}: subscriber, {damage}: {}", line.line);
            let moved = line.field("moved_to");
            assert!(Path::new(&moved).exists(), "{moved} missing");
        }
        propagates(&c, &format!("subscriber state {damage}"));
    }

    // --- publisher ---
    let ledger = c.publisher.state_dir().join("ledger.sqlite3");
    let mut old_epoch = epoch(&c.publisher);
    for damage in ["deleted", "garbage", "damaged pages"] {
        let marks: Vec<usize> = c.nodes.iter().map(|n| n.subscriber().mark()).collect();
        c.publisher.stop();
        damage_sqlite(&ledger, damage);
        c.publisher.restart();
        let p = c.publisher.process();
        if damage == "deleted" {
            p.wait_for_line(r"WARN .*new ledger: no previous state", TIMEOUT);
        } else {
            let line = p.wait_for_line(r"ERROR .*ledger corrupt: moved it away", TIMEOUT);
            println!("{test}: publisher, {damage}: {}", line.line);
            let moved = line.field("moved_to");
            assert!(Path::new(&moved).exists(), "{moved} missing");
        }
        let new_epoch = epoch(&c.publisher);
        assert_ne!(new_epoch, old_epoch, "a new ledger has a new epoch");
        for (n, m) in c.nodes.iter().zip(marks) {
            n.subscriber()
                .wait_for_event_after(m, "connected", &[("epoch", &new_epoch)], TIMEOUT);
            n.subscriber()
                .wait_for_event_after(m, "resync", &[("reason", "epoch")], TIMEOUT);
        }
        old_epoch = new_epoch;
        propagates(&c, &format!("publisher ledger {damage}"));
    }

    // Every ban reached web2 once, except that a subscriber run started with a
    // new state applies again the bans the snapshot lists.
    log.refresh();
    let expected: HashSet<String> = sent.iter().cloned().collect();
    let t = log.tally(&expected);
    let mut reapplied = 0;
    let mut duplicated = 0;
    for (ip, n) in log.ban_counts().into_iter().filter(|(_, n)| *n > 1) {
        let again: Vec<u32> = log
            .entries()
            .iter()
            .filter(|a| a.verb == Verb::Ban && a.ip == ip)
            .skip(1)
            .map(|a| a.pid)
            .collect();
        let distinct: HashSet<&u32> = again.iter().collect();
        if distinct.len() == again.len() && again.iter().all(|p| fresh.contains(p)) {
            reapplied += n - 1;
        } else {
            duplicated += 1;
        }
    }
    println!(
        "{test} web2: sent={} applied={} lost={} duplicated={duplicated} reapplied_after_state_loss={reapplied}",
        t.sent, t.applied, t.lost
    );
    assert!(log.bad_lines().is_empty(), "{:?}", log.bad_lines());
    assert_eq!((t.lost, t.unexpected, duplicated), (0, 0, 0), "{t}");
    assert!(
        t0.elapsed() < BOUND,
        "took {:?}, over {BOUND:?}",
        t0.elapsed()
    );
}

/// Deletes an SQLite file (with its `-wal` and `-shm`), overwrites it with
/// garbage, or keeps its 100-byte header and overwrites the rest.
fn damage_sqlite(path: &Path, damage: &str) {
    let name = path.file_name().and_then(|n| n.to_str()).expect("a name");
    let dir = path.parent().expect("a directory");
    match damage {
        "deleted" => {
            delete(dir, name);
            assert!(!path.exists());
        }
        "garbage" => corrupt(&[path.to_owned()]),
        "damaged pages" => {
            let mut data = std::fs::read(path).expect("read the database");
            assert!(data.starts_with(b"SQLite format 3\0"), "not a database");
            let len = data.len().max(64 * 1024);
            data.truncate(100);
            data.extend_from_slice(&garbage(len - 100));
            std::fs::write(path, data).expect("write");
        }
        other => panic!("no damage {other:?}"),
    }
}
