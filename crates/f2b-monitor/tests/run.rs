//! `run` in-process: a temporary log file, a real REP socket as the publisher,
//! the exact log lines other tests depend on, and shutdown.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use f2b_common::config::{Endpoint, MonitorConfig, NodeConfig, TrustConfig};
use f2b_common::sockets::last_endpoint;
use f2b_common::zmq;
use f2b_proto::auth::{reply_mac, MonitorSecret, RequestAuth};
use f2b_proto::{Ack, AckStatus, Action, Event, JailName, NodeName, Reply, Request};
use tokio::sync::watch;

use common::{append, bind_at, bind_loopback, wait_offset, ACTION, WAIT};
use tokio_util::sync::CancellationToken;

/// Everything logged by this test binary (one global subscriber).
struct Captured {
    text: Mutex<String>,
    changed: watch::Sender<u64>,
}

#[derive(Clone)]
struct Writer(Arc<Captured>);

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .text
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        self.0.changed.send_modify(|n| *n += 1);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> Arc<Captured> {
    static LOGS: OnceLock<Arc<Captured>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let c = Arc::new(Captured {
            text: Mutex::new(String::new()),
            changed: watch::channel(0).0,
        });
        let w = Writer(c.clone());
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        c
    })
    .clone()
}

/// Waits until a logged line contains all of `parts`; returns it.
async fn wait_log(parts: &[&str]) -> String {
    let logs = logs();
    let mut rx = logs.changed.subscribe();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(line) = logs
            .text
            .lock()
            .unwrap()
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return line.to_owned();
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!(
                "no log line with {parts:?} in:\n{}",
                logs.text.lock().unwrap()
            );
        }
    }
}

const SECRET: &str = "run-test-secret-0123456789abcdefghijklmnopq";

/// `[trust]` with this node's secret, as if read from `source`.
fn trust() -> TrustConfig {
    TrustConfig {
        allow_unauthenticated: false,
        secret: Some(MonitorSecret::new(SECRET).unwrap()),
        secret_source: Some("/etc/fail2ban-cluster/node.secret".into()),
        publisher_keys: Vec::new(),
        signing_key: None,
        max_clock_skew: Duration::from_secs(60),
        monitors: Default::default(),
    }
}

/// Receives one request on `rep` (a report, or a `reports` request of several
/// events), checks that it is signed with [`SECRET`] by the node it names, and
/// answers each event with `ack(event)` (in a `replies` message for several)
/// and the reply MAC. Returns the events, in order.
fn answer(rep: &zmq::Socket, mut ack: impl FnMut(&Event) -> Ack) -> Vec<Event> {
    let frames = rep.recv_multipart(0).expect("a report");
    assert_eq!(frames.len(), 2, "payload and auth frame");
    let events = match Request::decode(&frames[0]).unwrap() {
        Request::Report(e) => vec![e],
        Request::Reports(events) => events,
        other => panic!("not a report: {other:?}"),
    };
    let auth = RequestAuth::decode(&frames[1]).unwrap();
    let secret = MonitorSecret::new(SECRET).unwrap();
    assert_eq!(auth.key, events[0].node, "the credential is the node's");
    assert!(auth.verify(&secret, &frames[0]), "a valid MAC");
    let reply = match events.as_slice() {
        [e] => Reply::Ack(ack(e)),
        _ => Reply::Replies(events.iter().map(|e| Reply::Ack(ack(e))).collect()),
    }
    .encode();
    let mac = reply_mac(&secret, &auth.mac, &reply);
    rep.send_multipart([reply, mac.to_vec()], 0).unwrap();
    events
}

/// [`answer`] for a request that must carry one event.
fn answer_one(rep: &zmq::Socket, ack: impl FnMut(&Event) -> Ack) -> Event {
    let events = answer(rep, ack);
    let [e] = <[Event; 1]>::try_from(events).expect("one event");
    e
}

fn node_named(name: &str) -> NodeConfig {
    NodeConfig {
        name: NodeName::new(name).unwrap(),
    }
}

/// A temporary directory with an empty `fail2ban.log` in it.
fn empty_log() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    (dir, log)
}

type Monitor = tokio::task::JoinHandle<Result<(), f2b_monitor::MonitorError>>;

/// Spawns `run`; cancel the token to stop it.
fn start(
    node: NodeConfig,
    config: MonitorConfig,
    trust: TrustConfig,
) -> (CancellationToken, Monitor) {
    let token = CancellationToken::new();
    let monitor = tokio::spawn(f2b_monitor::run(node, config, trust, token.clone()));
    (token, monitor)
}

/// Cancels `token` and waits (at most [`WAIT`]) for `monitor` to return `Ok`.
async fn stop(token: CancellationToken, monitor: Monitor) {
    token.cancel();
    tokio::time::timeout(WAIT, monitor)
        .await
        .expect("run returns on shutdown")
        .unwrap()
        .unwrap();
}

/// Waits for the line saying `log` is watched; returns it.
async fn wait_watching(log: &std::path::Path) -> String {
    wait_log(&["watching", &format!("path={}", log.display())]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_events_and_stops() {
    let _ = logs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(
        &log,
        "2026-11-21 04:52:53,446 fail2ban.actions        [1]: NOTICE  [sshd] Ban 192.0.2.99\n",
    )
    .unwrap();

    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);

    let config = MonitorConfig {
        ignore_jails: vec![JailName::new("cluster").unwrap()],
        ack_timeout: Duration::from_secs(5),
        ..config_in(dir.path(), &endpoint, 16)
    };
    let node = node_named("web1");
    let (token, monitor) = start(node, config, trust());

    let watching = wait_watching(&log).await;
    assert!(watching.contains(" INFO "), "{watching}");
    let signed = wait_log(&["reports are signed with this node's credential"]).await;
    assert!(signed.contains("key=web1"), "{signed}");
    assert!(
        signed.contains("source=/etc/fail2ban-cluster/node.secret"),
        "{signed}"
    );
    assert!(watching.contains("offset=83"), "{watching}");

    append(
        &log,
        &format!(
            "{ACTION}[cluster] Ban 198.51.100.1\n{ACTION}[sshd] Restore Ban 198.51.100.2\n\
             {ACTION}[sshd] Ban 2001:DB8::1\n{ACTION}[sshd] Ban not_an_ip\n"
        ),
    );
    let server = tokio::task::spawn_blocking(move || {
        let e = answer_one(&rep, |e| Ack {
            id: e.id,
            seq: Some(41),
            status: AckStatus::Broadcast,
        });
        (rep, e)
    });
    let (rep, e) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(
        (e.node.as_str(), e.jail.as_str(), e.action, e.ip.to_string()),
        ("web1", "sshd", Action::Ban, "2001:db8::1".into())
    );
    let reported = wait_log(&["reported", &format!("id={}", e.id)]).await;
    for field in [
        "action=ban",
        "jail=sshd",
        "ip=2001:db8::1",
        "status=broadcast",
        "seq=41",
    ] {
        assert!(reported.contains(field), "{field} in {reported}");
    }
    wait_log(&["ignored", "reason=ignore_jails", "jail=cluster"]).await;
    wait_log(&["ignored", "reason=restore_ban"]).await;
    wait_log(&["ignored", "reason=not_an_ip"]).await;

    // A manual unban is reported (after the stop-suppression hold).
    append(&log, &format!("{ACTION}[sshd] Unban 2001:db8::1\n"));
    let server = tokio::task::spawn_blocking(move || {
        answer_one(&rep, |e| Ack {
            id: e.id,
            seq: None,
            status: AckStatus::Unchanged,
        })
    });
    let e = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(e.action, Action::Unban);
    wait_log(&["reported", &format!("id={}", e.id), "status=unchanged"]).await;

    stop(token, monitor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_directory_is_an_error() {
    let _ = logs();
    let state = tempfile::tempdir().unwrap();
    let config = MonitorConfig {
        log_path: "/nonexistent-f2b-dir/fail2ban.log".into(),
        publisher: Endpoint::connect("tcp://127.0.0.1:9").unwrap(),
        ignore_jails: vec![],
        ack_timeout: Duration::from_secs(1),
        queue_size: 16,
        pidfile: "/tmp/x.pid".into(),
        legacy: None,
        state_dir: state.path().to_owned(),
    };
    let node = node_named("web1");
    let r = tokio::time::timeout(
        WAIT,
        f2b_monitor::run(node, config, trust(), CancellationToken::new()),
    )
    .await
    .expect("fails at once");
    let err = r.unwrap_err();
    assert!(
        matches!(err, f2b_monitor::MonitorError::Watch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent-f2b-dir"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_pauses_reading_and_loses_nothing() {
    let _ = logs();
    let (dir, log) = empty_log();
    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);
    let config = MonitorConfig {
        ack_timeout: Duration::from_secs(10),
        ..config_in(dir.path(), &endpoint, 1)
    };
    let node = node_named("backpressure");
    let token = CancellationToken::new();
    let telemetry = f2b_monitor::Telemetry::new(None);
    let m = telemetry.metrics.clone();
    let monitor = tokio::spawn(f2b_monitor::run_with(
        node,
        config,
        trust(),
        telemetry,
        token.clone(),
    ));
    wait_watching(&log).await;

    let text: String = (1..=6)
        .map(|i| format!("{ACTION}[bp] Ban 203.0.113.{i}\n"))
        .collect();
    append(&log, &text);
    // One event in flight, one queued: the third finds the queue full.
    wait_log(&["event queue full", "capacity=1"]).await;
    assert!(
        !m.queue_has_room.holds(),
        "not ready while the queue is full"
    );
    assert_eq!((m.events_queued.get(), m.queue_capacity.get()), (1, 1));
    let server = tokio::task::spawn_blocking(move || {
        let mut ips = Vec::new();
        while ips.len() < 6 {
            let events = answer(&rep, |e| Ack {
                id: e.id,
                seq: None,
                status: AckStatus::Unchanged,
            });
            ips.extend(events.iter().map(|e| e.ip.to_string()));
        }
        ips
    });
    let ips = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    let want: Vec<String> = (1..=6).map(|i| format!("203.0.113.{i}")).collect();
    assert_eq!(ips, want, "all delivered, in order");
    // Loud: a warning when the episode starts, a line when it ends.
    let full = wait_log(&["event queue full", "capacity=1"]).await;
    assert!(full.contains(" WARN "), "{full}");
    assert!(full.contains("episodes="), "{full}");
    let resumed = wait_log(&["event queue has room again", "capacity=1"]).await;
    assert!(resumed.contains(" INFO "), "{resumed}");
    assert!(resumed.contains("paused_ms="), "{resumed}");
    stop(token, monitor).await;
    assert_eq!(m.events_acked.get(), 6);
    assert_eq!(m.events_queued.get(), 0);
    assert!(m.queue_has_room.holds());
}

/// Serves requests on `rep` until `n` events came (ACKing each) and returns
/// them.
fn serve(
    rep: zmq::Socket,
    n: usize,
) -> tokio::task::JoinHandle<(zmq::Socket, Vec<f2b_proto::Event>)> {
    tokio::task::spawn_blocking(move || {
        let mut events = Vec::new();
        while events.len() < n {
            let mut seq = events.len() as u64;
            events.extend(answer(&rep, |e| {
                seq += 1;
                Ack {
                    id: e.id,
                    seq: Some(seq),
                    status: AckStatus::Broadcast,
                }
            }));
        }
        (rep, events)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_resumes_position_and_resends_with_the_same_id() {
    let _ = logs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "before the first start\n").unwrap();
    let ctx = zmq::Context::new();
    let endpoint = free_endpoint(&ctx);
    let config = config_in(dir.path(), &endpoint, 16);
    let node = node_named("restarter");

    // First run: the publisher is down; the event is read and kept.
    let (token, monitor) = start(node.clone(), config.clone(), trust());
    wait_log(&["watching", &format!("path={}", log.display()), "offset=23"]).await;
    append(&log, &format!("{ACTION}[rs] Ban 203.0.113.71\n"));
    let queued = wait_log(&["queued", "ip=203.0.113.71"]).await;
    let id = queued
        .split_whitespace()
        .find_map(|f| f.strip_prefix("id="))
        .expect("an id field")
        .to_owned();
    stop(token, monitor).await;

    // Written while the monitor is stopped.
    append(&log, &format!("{ACTION}[rs] Ban 203.0.113.72\n"));

    // Second run, publisher up: the kept event first (same id), then the new line.
    let rep = bind_at(&ctx, zmq::REP, &endpoint);
    let server = serve(rep, 2);
    let (token, monitor) = start(node, config, trust());
    let (_rep, events) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(events[0].id.to_string(), id, "resent with its id");
    assert_eq!(events[0].ip.to_string(), "203.0.113.71");
    assert_eq!(events[1].ip.to_string(), "203.0.113.72");
    wait_log(&["resuming from the saved state", "pending=1"]).await;
    stop(token, monitor).await;
}

fn config_in(dir: &std::path::Path, endpoint: &str, queue_size: usize) -> MonitorConfig {
    MonitorConfig {
        log_path: dir.join("fail2ban.log"),
        publisher: Endpoint::connect(endpoint).unwrap(),
        ignore_jails: vec![],
        ack_timeout: Duration::from_millis(300),
        queue_size,
        pidfile: dir.join("pid"),
        legacy: None,
        state_dir: dir.join("state"),
    }
}

/// An endpoint with nobody behind it, for now.
fn free_endpoint(ctx: &zmq::Context) -> String {
    let probe = ctx.socket(zmq::REP).unwrap();
    probe.bind("tcp://127.0.0.1:*").unwrap();
    last_endpoint(&probe)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_monitor_on_the_same_state_refuses_to_start() {
    let _ = logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fail2ban.log"), "").unwrap();
    let ctx = zmq::Context::new();
    let config = config_in(dir.path(), &free_endpoint(&ctx), 16);
    let node = node_named("twice");
    // The first monitor's lock.
    let (_first, _) =
        f2b_monitor::state::StateStore::open(&config.state_dir, &node.name, &config.log_path)
            .unwrap();
    let r = tokio::time::timeout(
        WAIT,
        f2b_monitor::run(node, config.clone(), trust(), CancellationToken::new()),
    )
    .await
    .expect("refuses at once instead of running without state");
    let err = r.unwrap_err();
    assert!(
        matches!(err, f2b_monitor::MonitorError::State { .. }),
        "{err}"
    );
    let chain = f2b_common::daemon::error_chain(&err);
    assert!(chain.contains("held by another monitor"), "{chain}");
    assert!(
        chain.contains(&config.state_dir.display().to_string()),
        "{chain}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queue_file_is_bounded_and_the_rest_is_read_again() {
    let _ = logs();
    let (dir, log) = empty_log();
    let ctx = zmq::Context::new();
    let endpoint = free_endpoint(&ctx);
    let config = config_in(dir.path(), &endpoint, 3);
    let node = node_named("bounded");

    // The publisher is down: three events fill the queue, reading pauses.
    let (token, monitor) = start(node.clone(), config.clone(), trust());
    wait_watching(&log).await;
    let text: String = (1..=10)
        .map(|i| format!("{ACTION}[bq] Ban 203.0.113.{i}\n"))
        .collect();
    append(&log, &text);
    let full = wait_log(&["event queue full", "capacity=3"]).await;
    assert!(full.contains(" WARN "), "{full}");
    assert!(full.contains("waiting=7"), "{full}");
    let queue = dir.path().join("state").join(format!(
        "{}.queue",
        f2b_monitor::state::key(&node.name, &log)
    ));
    let journaled = std::fs::read_to_string(&queue).unwrap();
    assert_eq!(
        journaled.lines().filter(|l| l.starts_with('+')).count(),
        3,
        "the queue file holds queue_size events:\n{journaled}"
    );
    stop(token, monitor).await;

    // Publisher up: the three kept events (same ids), then the seven lines read
    // again, in order, none twice.
    let rep = bind_at(&ctx, zmq::REP, &endpoint);
    let server = serve(rep, 10);
    let (token, monitor) = start(node, config, trust());
    let (rep, events) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    let ips: Vec<String> = events.iter().map(|e| e.ip.to_string()).collect();
    let want: Vec<String> = (1..=10).map(|i| format!("203.0.113.{i}")).collect();
    assert_eq!(ips, want);
    for e in &events[..3] {
        assert!(journaled.contains(&e.id.to_string()), "{} resent", e.id);
    }
    // Nothing more comes.
    rep.set_rcvtimeo(500).unwrap();
    assert!(rep.recv_bytes(0).is_err(), "no duplicate");
    stop(token, monitor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_position_stays_before_a_held_unban() {
    let _ = logs();
    let (dir, log) = empty_log();
    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);
    let config = config_in(dir.path(), &endpoint, 16);
    let node = node_named("holder");
    let (token, monitor) = start(node.clone(), config.clone(), trust());
    wait_watching(&log).await;
    let ban = format!("{ACTION}[hp] Ban 203.0.113.80\n");
    let unban = format!("{ACTION}[hp] Unban 203.0.113.81\n");
    append(&log, &format!("{ban}{unban}"));
    let server = serve(rep, 1);
    let (rep, events) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(events[0].ip.to_string(), "203.0.113.80");
    // The Ban is in the queue file, and the position is saved once it is
    // handed to the sender (just after, off the report's path: waited for);
    // the Unban is held for 5 s: a crash now must read it again, so the
    // position stays before it. A position past it would never match.
    let position = dir.path().join("state").join(format!(
        "{}.position",
        f2b_monitor::state::key(&node.name, &log)
    ));
    let (saved_at, offset) = (position.clone(), ban.len() as u64);
    tokio::task::spawn_blocking(move || wait_offset(&saved_at, offset))
        .await
        .unwrap();
    // Once it is reported, the position moves past it.
    let server = serve(rep, 1);
    let (_rep, events) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(events[0].ip.to_string(), "203.0.113.81");
    stop(token, monitor).await;
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&position).unwrap()).unwrap();
    assert_eq!(
        saved["files"][0]["offset"].as_u64(),
        Some((ban.len() + unban.len()) as u64),
        "{saved}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_warning_per_backpressure_episode() {
    let _ = logs();
    let (dir, log) = empty_log();
    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);
    // Capacity 2: no other test of this binary uses it, so the lines are ours.
    let config = config_in(dir.path(), &endpoint, 2);
    let node = node_named("episodes");
    let (token, monitor) = start(node, config, trust());
    wait_watching(&log).await;
    let text: String = (1..=20)
        .map(|i| format!("{ACTION}[ep] Ban 198.51.100.{i}\n"))
        .collect();
    append(&log, &text);
    wait_log(&["event queue full", "capacity=2"]).await;
    // The publisher answers one event at a time: each answer frees one place,
    // taken at once by the next event. Still one episode.
    let (_rep, events) = tokio::time::timeout(WAIT, serve(rep, 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.len(), 20);
    wait_log(&["event queue has room again", "capacity=2"]).await;
    let text = logs().text.lock().unwrap().clone();
    let count = |what: &str| {
        text.lines()
            .filter(|l| l.contains(what) && l.contains("capacity=2"))
            .count()
    };
    assert_eq!(count("event queue full"), 1, "{text}");
    assert_eq!(count("event queue has room again"), 1, "{text}");
    stop(token, monitor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credential_and_no_opt_out_refuses_to_start() {
    let _ = logs();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fail2ban.log"), "").unwrap();
    let ctx = zmq::Context::new();
    let config = config_in(dir.path(), &free_endpoint(&ctx), 16);
    let node = node_named("nokey");
    let none = TrustConfig {
        secret: None,
        secret_source: None,
        ..trust()
    };
    let r = tokio::time::timeout(
        WAIT,
        f2b_monitor::run(
            node.clone(),
            config.clone(),
            none.clone(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("fails at once");
    let err = r.unwrap_err();
    assert!(matches!(err, f2b_monitor::MonitorError::Trust(_)), "{err}");
    let chain = f2b_common::daemon::error_chain(&err);
    assert!(
        chain.contains("trust.secret") && chain.contains("allow_unauthenticated"),
        "{chain}"
    );

    // The legacy format needs no credential.
    let legacy = MonitorConfig {
        legacy: Some(f2b_common::config::LegacyPeer { token: None }),
        ..config.clone()
    };
    let (token, monitor) = start(node.clone(), legacy, none.clone());
    wait_log(&["watching", &format!("path={}", config.log_path.display())]).await;
    stop(token, monitor).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_opt_out_runs_unauthenticated_with_a_warning() {
    let _ = logs();
    let (dir, log) = empty_log();
    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);
    let config = config_in(dir.path(), &endpoint, 16);
    let node = node_named("optout");
    let open = TrustConfig {
        allow_unauthenticated: true,
        secret: None,
        secret_source: None,
        ..trust()
    };
    let (token, monitor) = start(node, config, open);
    let warned = wait_log(&["reports are sent unauthenticated", "node=optout"]).await;
    assert!(warned.contains(" WARN "), "{warned}");
    assert!(warned.contains("in any node's name"), "{warned}");
    wait_watching(&log).await;
    append(&log, &format!("{ACTION}[oo] Ban 203.0.113.90\n"));
    let server = tokio::task::spawn_blocking(move || {
        let frames = rep.recv_multipart(0).expect("a report");
        let Request::Report(e) = Request::decode(&frames[0]).unwrap() else {
            panic!("not a report")
        };
        let ack = Reply::Ack(Ack {
            id: e.id,
            seq: Some(1),
            status: AckStatus::Broadcast,
        });
        rep.send(ack.encode(), 0).unwrap();
        frames.len()
    });
    let frames = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(frames, 1, "no auth frame");
    wait_log(&["reported", "ip=203.0.113.90"]).await;
    stop(token, monitor).await;
}
