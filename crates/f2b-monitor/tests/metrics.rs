//! The built binary with `[monitor] metrics_bind` on 127.0.0.1:0: `/metrics`,
//! `/healthz` and `/readyz` scraped over TCP while a stand-in publisher (which
//! checks the reports' MACs) answers, refuses or ignores reports; SIGHUP; the
//! metrics server at shutdown.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{append, ACTION};
use f2b_common::testing::{daemon_command, http_get, sample, value, Process};
use f2b_common::zmq;
use f2b_proto::auth::{MonitorSecret, RequestAuth};
use f2b_proto::{Ack, AckStatus, Event, Nak, NakReason, Reply, Request};

const BIN: &str = env!("CARGO_BIN_EXE_f2b-monitor");
const SECRET: &str = "metrics-test-secret-0123456789abcdefghijk";
/// How long anything awaited may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// The monitor of an empty `fail2ban.log` in `dir` reporting to `publisher`
/// ([`config`] with `extra`), killed by its PID on drop so a failing test leaves
/// no process behind: the log's path, the process and its metrics address.
fn start_monitor(dir: &Path, publisher: &StandIn, extra: &str) -> (PathBuf, Process, SocketAddr) {
    let log = dir.join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let conf = config(dir, &log, &publisher.endpoint, extra);
    let mut m = Process::spawn(&mut daemon_command(BIN, &conf));
    let addr = metrics_addr(&mut m);
    (log, m, addr)
}

/// The address from the "metrics listening on ADDR" line.
fn metrics_addr(m: &mut Process) -> SocketAddr {
    let line = m.wait_for_line("metrics listening on ", DEADLINE);
    let (_, rest) = line.split_once("metrics listening on ").unwrap();
    let addr = rest.split_whitespace().next().unwrap();
    addr.parse()
        .unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
}

/// One HTTP/1.1 GET: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path, DEADLINE)
}

/// Scrapes `/metrics` until `name` satisfies `ok` (the deadline fails the
/// test, with the last scrape); returns the last scrape.
fn wait_metric(addr: SocketAddr, name: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, text) = get(addr, "/metrics");
        assert_eq!(status, 200, "{text}");
        if sample(&text, name).is_some_and(&ok) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never as expected; last scrape:\n{text}"
        );
        // A poll, not a guess: the next scrape after a short pause.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asks `/readyz` until it answers `want` (the deadline fails the test);
/// returns the body.
fn wait_ready(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (status, body) = get(addr, "/readyz");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never {want}; last: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A config for web1 with its credential, metrics on 127.0.0.1:0.
fn config(dir: &Path, log: &Path, publisher: &str, extra: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("node.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let conf = dir.join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n\
             [monitor]\nlog_path = {:?}\npublisher = {publisher:?}\nstate_dir = {:?}\n\
             metrics_bind = \"127.0.0.1:0\"\nignore_jails = [\"cluster\"]\n{extra}\n\
             [trust]\nsecret_file = {:?}\n",
            log.to_str().unwrap(),
            dir.join("state").to_str().unwrap(),
            secret.to_str().unwrap(),
        ),
    )
    .unwrap();
    conf
}

fn ban_line(jail: &str, ip: &str) -> String {
    format!("{ACTION}[{jail}] Ban {ip}\n")
}

/// A stand-in publisher: a ROUTER on an ephemeral port in a thread. Every
/// report must carry web1's valid credential; `answer` decides each reply by
/// the event and how many times its id was decided (1 = first); `None` leaves
/// the request unanswered. A `reports` request is decided event by event as
/// PROTOCOL.md says: after the first transient NAK the later events get the
/// same NAK, undecided. Stops when `stop` is set.
struct StandIn {
    endpoint: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    fn start(answer: impl Fn(&Event, usize) -> Option<Reply> + Send + 'static) -> StandIn {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_rcvtimeo(50).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = f2b_common::sockets::last_endpoint(&router);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let secret = MonitorSecret::new(SECRET).unwrap();
        let thread = std::thread::spawn(move || {
            let _ctx = ctx;
            let mut seen = std::collections::HashMap::<_, usize>::new();
            while !stopped.load(Ordering::Relaxed) {
                let Ok(mut frames) = router.recv_multipart(0) else {
                    continue;
                };
                let envelope: Vec<Vec<u8>> = frames.drain(..2).collect();
                assert_eq!(frames.len(), 2, "a payload and an auth frame");
                let auth = RequestAuth::decode(&frames[1]).expect("an auth frame");
                let (events, several) = match Request::decode(&frames[0]).unwrap() {
                    Request::Report(event) => (vec![event], false),
                    Request::Reports(events) => (events, true),
                    other => panic!("not a report: {other:?}"),
                };
                assert!(
                    auth.key == events[0].node && auth.verify(&secret, &frames[0]),
                    "signed with web1's secret"
                );
                let mut replies = Vec::new();
                let mut refused: Option<Nak> = None;
                for event in &events {
                    if let Some(nak) = &refused {
                        replies.push(Reply::Nak(Nak::new(
                            Some(event.id),
                            nak.reason,
                            "undecided",
                        )));
                        continue;
                    }
                    let n = seen.entry(event.id).or_default();
                    *n += 1;
                    let Some(reply) = answer(event, *n) else {
                        break;
                    };
                    if let Reply::Nak(nak) = &reply {
                        refused = Some(nak.clone()).filter(|n| n.reason.is_transient());
                    }
                    replies.push(reply);
                }
                if replies.len() < events.len() {
                    continue;
                }
                let reply = match several {
                    true => Reply::Replies(replies),
                    false => replies.swap_remove(0),
                }
                .encode();
                let mac = f2b_proto::auth::reply_mac(&secret, &auth.mac, &reply);
                let mut out = envelope;
                out.push(reply);
                out.push(mac.to_vec());
                router.send_multipart(out, 0).unwrap();
            }
        });
        StandIn {
            endpoint,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A failed assertion in the stand-in fails the test.
            if let Err(e) = t.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(e);
                }
            }
        }
    }
}

fn ack(e: &Event) -> Reply {
    Reply::Ack(Ack {
        id: e.id,
        seq: Some(1),
        status: AckStatus::Broadcast,
    })
}

fn nak(e: &Event, reason: NakReason) -> Reply {
    Reply::Nak(Nak::new(Some(e.id), reason, "stand-in says no"))
}

#[test]
fn metrics_move_with_the_reports_and_readiness_follows_the_publisher() {
    let dir = tempfile::tempdir().unwrap();
    // 192.0.2.1 goes unanswered until `answering` is set, then is ACKed;
    // 192.0.2.2 gets `busy` once, then an ACK; 192.0.2.3 is forbidden. The
    // three are queued together, so once the first has timed out they go in
    // `reports` requests.
    let answering = Arc::new(AtomicBool::new(false));
    let answers = answering.clone();
    let publisher = StandIn::start(move |e, n| match e.ip.to_string().as_str() {
        "192.0.2.1" if !answers.load(Ordering::Relaxed) => None,
        "192.0.2.2" if n == 1 => Some(nak(e, NakReason::Busy)),
        "192.0.2.3" => Some(nak(e, NakReason::Forbidden)),
        _ => Some(ack(e)),
    });
    let (log, mut m, addr) = start_monitor(
        dir.path(),
        &publisher,
        "ack_timeout = \"300ms\"\nqueue_size = 10",
    );
    m.wait_for_line("watching", DEADLINE);

    let (status, body) = get(addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, _) = get(addr, "/nothing-here");
    assert_eq!(status, 404);
    let text = get(addr, "/metrics").1;
    assert_eq!(value(&text, "f2b_monitor_queue_capacity"), 10.0, "{text}");
    assert_eq!(value(&text, "f2b_monitor_lines_read_total"), 0.0);
    assert_eq!(value(&text, "f2b_monitor_events_queued"), 0.0);
    assert!(
        text.contains("f2b_build_info{daemon=\"f2b-monitor\""),
        "{text}"
    );

    let found =
        "2026-11-21 04:52:59,000 fail2ban.filter         [1]: INFO    [sshd] Found 192.0.2.1\n";
    append(
        &log,
        &format!(
            "{found}{}{}{}{}",
            ban_line("sshd", "192.0.2.1"),
            ban_line("cluster", "192.0.2.9"),
            ban_line("sshd", "192.0.2.2"),
            ban_line("sshd", "192.0.2.3"),
        ),
    );
    // Read and queued while the publisher does not answer: the first report
    // times out (and is sent again), and the monitor is not ready.
    let text = wait_metric(addr, "f2b_monitor_ack_timeouts_total", |v| v >= 1.0);
    assert_eq!(value(&text, "f2b_monitor_lines_read_total"), 5.0, "{text}");
    assert_eq!(
        value(&text, "f2b_monitor_events_found_total{action=\"ban\"}"),
        4.0,
        "{text}"
    );
    assert_eq!(value(&text, "f2b_monitor_events_ignored_total"), 1.0);
    assert_eq!(value(&text, "f2b_monitor_events_queued"), 3.0, "{text}");
    assert!(value(&text, "f2b_monitor_events_sent_total") >= 1.0);
    assert_eq!(value(&text, "f2b_monitor_events_acked_total"), 0.0);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("publisher"), "{body}");

    answering.store(true, Ordering::Relaxed);
    let text = wait_metric(
        addr,
        "f2b_monitor_events_dropped_total{reason=\"forbidden\"}",
        |v| v == 1.0,
    );
    m.wait_for_line("ip=192.0.2.3", DEADLINE);
    assert_eq!(
        value(&text, "f2b_monitor_events_acked_total"),
        2.0,
        "{text}"
    );
    // The three events queued by the time the publisher answers go in one
    // `reports` request: 192.0.2.1 ACKed, 192.0.2.2 busy and 192.0.2.3 refused
    // with it, undecided (two events kept: two NAKs counted); then 192.0.2.2 and
    // 192.0.2.3 again: ACKed and forbidden.
    assert_eq!(
        value(&text, "f2b_monitor_naks_total{reason=\"busy\"}"),
        2.0,
        "{text}"
    );
    // 192.0.2.1 at least twice, 192.0.2.2 twice, 192.0.2.3 twice: every event
    // of a request counts.
    assert!(
        value(&text, "f2b_monitor_events_sent_total") >= 6.0,
        "{text}"
    );
    // Two requests answered.
    assert_eq!(
        value(&text, "f2b_monitor_publisher_round_trip_seconds_count"),
        2.0,
        "{text}"
    );
    assert!(value(&text, "f2b_monitor_publisher_round_trip_seconds_sum") > 0.0);
    assert!(
        text.contains("# TYPE f2b_monitor_publisher_round_trip_seconds histogram"),
        "{text}"
    );
    // The gauge goes down just after the answer is counted: wait for it rather than
    // read it from the same scrape.
    wait_metric(addr, "f2b_monitor_events_queued", |v| v == 0.0);
    // Known reasons exist from the start; nothing else was refused.
    assert_eq!(
        value(
            &text,
            "f2b_monitor_events_dropped_total{reason=\"quarantined\"}"
        ),
        0.0
    );
    assert_eq!(
        value(&text, "f2b_monitor_naks_total{reason=\"unauthenticated\"}"),
        0.0
    );
    assert_eq!(wait_ready(addr, 200), "ready\n");
}

#[test]
fn readiness_while_idle_follows_the_connection_to_the_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = StandIn::start(|e, _| Some(ack(e)));
    let (_log, _m, addr) = start_monitor(dir.path(), &publisher, "");
    // Ready with nothing to report: the ZeroMQ handshake with the publisher
    // completed.
    assert_eq!(wait_ready(addr, 200), "ready\n");
    let text = get(addr, "/metrics").1;
    assert_eq!(value(&text, "f2b_monitor_events_sent_total"), 0.0, "{text}");
    // The publisher goes away: not ready, and says why.
    drop(publisher);
    let body = wait_ready(addr, 503);
    assert!(body.contains("publisher"), "{body}");
    assert_eq!(get(addr, "/healthz").0, 200);
}

#[test]
fn sighup_is_logged_and_ignored_and_sigterm_stops_the_metrics_server() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = StandIn::start(|e, _| Some(ack(e)));
    let (log, mut m, addr) = start_monitor(dir.path(), &publisher, "");
    m.wait_for_line("watching", DEADLINE);

    for _ in 0..2 {
        m.signal("HUP");
        let line = m.wait_for_line("nothing to reload", DEADLINE);
        assert!(
            line.contains("INFO") && line.contains("restart to apply configuration changes"),
            "{line}"
        );
    }
    assert!(m.is_running(), "alive after SIGHUP");
    // Still at work: a Ban is reported, and the publisher's answer makes it ready.
    append(&log, &ban_line("sshd", "192.0.2.7"));
    m.wait_for_line("reported", DEADLINE);
    let text = wait_metric(addr, "f2b_monitor_events_acked_total", |v| v == 1.0);
    assert_eq!(value(&text, "f2b_monitor_lines_read_total"), 1.0);
    assert_eq!(wait_ready(addr, 200), "ready\n");

    // A client that connected and sends nothing does not hold up the stop.
    let idle = TcpStream::connect(addr).unwrap();
    m.signal("TERM");
    let status = m.wait_exit(DEADLINE);
    let seen = m.seen();
    assert_eq!(status.code(), Some(0), "{seen:#?}");
    assert!(
        !seen.iter().any(|l| l.contains("second signal")),
        "SIGHUP is not counted as a stop signal: {seen:#?}"
    );
    drop(idle);
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens on {addr} after the exit"
    );
}

#[test]
fn an_address_in_use_fails_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let conf = config(dir.path(), &log, "tcp://127.0.0.1:9", "");
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        "metrics_bind = \"127.0.0.1:0\"",
        &format!("metrics_bind = \"{}\"", taken.local_addr().unwrap()),
    );
    std::fs::write(&conf, text).unwrap();
    let out = Command::new(BIN)
        .args(["--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("metrics_bind")
            && stderr.contains(&taken.local_addr().unwrap().to_string()),
        "{stderr}"
    );
}
