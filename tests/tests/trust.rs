//! Trust end to end (issue #6, docs/PROTOCOL.md "Authentication" and "The hub's
//! limits"), with the real binaries: only monitors holding their credential report,
//! only the real publisher is obeyed, replays are refused, and the hub's allowlist
//! and circuit breaker protect the fleet.
//!
//! Absence is asserted after a later positive marker: an honest event sent after
//! the refused one is applied first, then the refused one is checked not to be.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use f2b_proto::{NakReason, Reply};
use f2b_tests::cluster::TestDir;
use f2b_tests::logline::ban;
use f2b_tests::trust::{self, stranger_secret};
use f2b_tests::{
    raw, Keyring, Node, NodeOptions, NodeSecret, Publisher, PublisherOptions, TIMEOUT,
};

/// A publisher and nodes, all with real trust unless their options say otherwise.
struct Cluster {
    publisher: Publisher,
    nodes: Vec<Node>,
    _dir: TestDir,
}

impl Cluster {
    fn start(publisher: PublisherOptions, nodes: &[(&str, NodeOptions)]) -> Cluster {
        let dir = TestDir::new();
        let publisher = Publisher::start_with(&dir.sub("hub"), publisher);
        let nodes = nodes
            .iter()
            .map(|(n, o)| Node::start(dir.path(), n, &publisher, o.clone()))
            .collect();
        Cluster {
            publisher,
            nodes,
            _dir: dir,
        }
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Asserts no node recorded anything about `ip`.
    fn assert_nowhere(&self, ip: &str) {
        for n in &self.nodes {
            let hits: Vec<String> = n
                .recorded()
                .into_iter()
                .filter(|l| l.split(' ').nth(2) == Some(ip))
                .collect();
            assert!(
                hits.is_empty(),
                "{ip} was applied on {}: {hits:?}\n{}",
                n.name,
                n.report()
            );
        }
        assert!(
            self.publisher.broadcasts_of(ip).is_empty(),
            "{ip} was broadcast\n{}",
            self.publisher.process().dump()
        );
    }
}

fn subscriber_only() -> NodeOptions {
    NodeOptions {
        monitor: false,
        ..NodeOptions::default()
    }
}

/// A monitor whose secret is not the one the publisher holds is refused
/// (`unauthenticated`, logged by the publisher), keeps its event and says what to
/// check; nothing of it reaches any subscriber, while the honest node's ban does.
#[test]
fn a_monitor_with_a_wrong_secret_is_refused() {
    let c = Cluster::start(
        PublisherOptions::default(),
        &[
            (
                "web1",
                NodeOptions {
                    secret: NodeSecret::Given(stranger_secret()),
                    ..NodeOptions::default()
                },
            ),
            ("web2", NodeOptions::default()),
            ("web3", subscriber_only()),
        ],
    );
    c.node("web1").append_log(&[ban("sshd", "203.0.113.10")]);
    c.publisher
        .process()
        .wait_for_event("rejected", &[("reason", "unauthenticated")], TIMEOUT);
    // The monitor says what to check, and keeps the event (transient).
    c.node("web1")
        .monitor()
        .wait_for_line(r"refused this node's credential", TIMEOUT);

    // The later, honest marker.
    c.node("web2").append_log(&[ban("sshd", "203.0.113.11")]);
    for n in ["web1", "web3"] {
        c.node(n).wait_recorded("ban sshd 203.0.113.11 web2", 1);
    }
    c.assert_nowhere("203.0.113.10");
    // The secret never reached a log.
    let secret = c.publisher.secret("web1");
    for p in c.nodes.iter().flat_map(Node::processes) {
        assert!(p.matching(&regex::escape(secret.expose())).is_empty());
    }
}

/// Revoking a node: the publisher restarted without its credential refuses its
/// reports (`unauthenticated`), while the other nodes go on.
#[test]
fn a_revoked_node_reports_no_more() {
    let fast = || NodeOptions {
        ack_timeout: Some("500ms".into()),
        heartbeat_timeout: Some("1s".into()),
        ..NodeOptions::default()
    };
    let mut c = Cluster::start(
        PublisherOptions::default(),
        &[("web1", fast()), ("web2", fast())],
    );
    c.node("web1").append_log(&[ban("sshd", "203.0.113.20")]);
    c.node("web2")
        .wait_recorded("ban sshd 203.0.113.20 web1", 1);

    c.publisher.stop();
    c.publisher
        .restart_with(|o| o.monitors.retain(|m| m != "web1"));
    let mark = c.publisher.process().mark();
    c.node("web1").append_log(&[ban("sshd", "203.0.113.21")]);
    let line = c.publisher.process().wait_for_event_after(
        mark,
        "rejected",
        &[("reason", "unauthenticated")],
        TIMEOUT,
    );
    assert!(
        line.contains("web1"),
        "the refusal names the credential: {line}"
    );

    c.node("web2").append_log(&[ban("sshd", "203.0.113.22")]);
    c.node("web1")
        .wait_recorded("ban sshd 203.0.113.22 web2", 1);
    c.assert_nowhere("203.0.113.21");
}

/// A subscriber configured with another publisher's key applies nothing from the
/// real publisher (it says why), while a correctly configured one applies all.
#[test]
fn a_subscriber_with_another_publishers_key_applies_nothing() {
    let c = Cluster::start(
        PublisherOptions::default(),
        &[
            ("web1", NodeOptions::default()),
            ("web2", subscriber_only()),
            (
                "web3",
                NodeOptions {
                    monitor: false,
                    publisher_keys: Some(vec![Keyring::generate().public_key()]),
                    wait_connected: false,
                    ..NodeOptions::default()
                },
            ),
        ],
    );
    let web3 = c.node("web3").subscriber();
    // Heartbeats are signed too: refused from the start.
    web3.wait_for_event("broadcast refused", &[("reason", "bad_signature")], TIMEOUT);
    for (i, ip) in ["203.0.113.40", "203.0.113.41"].iter().enumerate() {
        c.node("web1").append_log(&[ban("sshd", ip)]);
        c.node("web2")
            .wait_recorded(&format!("ban sshd {ip} web1"), 1);
        assert!(c.publisher.broadcasts_of(ip).len() == 1, "{i}");
    }
    // Whatever it refused since, it applied nothing, and no snapshot either.
    assert!(
        c.node("web3").recorded().is_empty(),
        "{}",
        c.node("web3").report()
    );
    assert!(web3.events("applied", &[]).is_empty(), "{}", web3.dump());
    assert!(web3.events("resync", &[]).is_empty(), "{}", web3.dump());
}

/// A forged publisher (a real f2b-publisher with another key, its own monitor
/// reporting to it) that a subscriber also follows cannot make it ban: its
/// broadcasts are refused as `bad_signature`, the real publisher's are applied.
#[test]
fn a_forged_publisher_cannot_make_a_subscriber_ban() {
    let dir = TestDir::new();
    let real = Publisher::start(&dir.sub("hub"));
    let forged = Publisher::start(&dir.sub("forged-hub"));
    // The forger's own monitor, with the forger's credential.
    let evil = Node::start(
        &dir.sub("forger"),
        "web9",
        &forged,
        NodeOptions {
            subscriber: false,
            ..NodeOptions::default()
        },
    );
    let honest = Node::start(
        dir.path(),
        "web1",
        &real,
        NodeOptions {
            subscriber: false,
            ..NodeOptions::default()
        },
    );
    let victim = Node::start(
        dir.path(),
        "web2",
        &real,
        NodeOptions {
            monitor: false,
            also_follow: vec![forged.broadcast.clone()],
            ..NodeOptions::default()
        },
    );
    let sub = victim.subscriber();
    evil.append_log(&[ban("sshd", "192.0.2.66")]);
    forged
        .process()
        .wait_for_event("broadcast", &[("ip", "192.0.2.66")], TIMEOUT);
    sub.wait_for_event("broadcast refused", &[("reason", "bad_signature")], TIMEOUT);
    honest.append_log(&[ban("sshd", "203.0.113.50")]);
    victim.wait_recorded("ban sshd 203.0.113.50 web1", 1);
    // A second forged ban after the first refusal, then an honest marker again.
    evil.append_log(&[ban("sshd", "192.0.2.67")]);
    forged
        .process()
        .wait_for_event("broadcast", &[("ip", "192.0.2.67")], TIMEOUT);
    honest.append_log(&[ban("sshd", "203.0.113.51")]);
    victim.wait_recorded("ban sshd 203.0.113.51 web1", 1);
    let recorded = victim.recorded();
    assert!(
        recorded.iter().all(|l| !l.contains("192.0.2.6")),
        "a forged ban was applied: {recorded:?}\n{}",
        sub.dump()
    );
    assert!(sub.events("applied", &[("node", "web9")]).is_empty());
}

// --- replays -------------------------------------------------------------------------

/// A ZeroMQ proxy between a monitor and the publisher that keeps a copy of every
/// request (the frames after the envelope), as an eavesdropper on the wire would.
struct Tap {
    endpoint: String,
    captured: Arc<Mutex<Vec<Vec<Vec<u8>>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Tap {
    fn start(upstream: &str) -> Tap {
        let ctx = zmq::Context::new();
        let router = ctx.socket(zmq::ROUTER).expect("ROUTER");
        router.set_linger(0).expect("linger");
        router.set_rcvtimeo(100).expect("rcvtimeo");
        router.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = router
            .get_last_endpoint()
            .expect("endpoint")
            .expect("utf-8");
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_owned();
        let thread = {
            let (captured, stop) = (captured.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(msg) = router.recv_multipart(0) else {
                        continue;
                    };
                    // The envelope ends with the empty delimiter frame.
                    let Some(split) = msg.iter().position(Vec::is_empty) else {
                        continue;
                    };
                    let (envelope, body) = msg.split_at(split + 1);
                    captured.lock().unwrap().push(body.to_vec());
                    let req = ctx.socket(zmq::REQ).expect("REQ");
                    req.set_linger(0).expect("linger");
                    req.set_rcvtimeo(5_000).expect("rcvtimeo");
                    req.connect(&upstream).expect("connect");
                    req.send_multipart(body, 0).expect("forward");
                    if let Ok(reply) = req.recv_multipart(0) {
                        let out: Vec<Vec<u8>> = envelope.iter().cloned().chain(reply).collect();
                        let _ = router.send_multipart(out, 0);
                    }
                }
            })
        };
        Tap {
            endpoint,
            captured,
            stop,
            thread: Some(thread),
        }
    }

    fn captured(&self) -> Vec<Vec<Vec<u8>>> {
        self.captured.lock().unwrap().clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Decodes a reply to a request signed by `node` and checks its MAC frame.
fn nak_of(frames: &[Vec<u8>]) -> f2b_proto::Nak {
    match Reply::decode(&frames[0]) {
        Ok(Reply::Nak(n)) => n,
        other => panic!(
            "expected a NAK, got {other:?} ({:?})",
            String::from_utf8_lossy(&frames[0])
        ),
    }
}

/// A report captured on the wire (a real monitor's, through a tap) and sent again
/// verbatim is refused `replayed`; so is a correctly signed one whose timestamp is
/// outside the window. The event is applied once.
#[test]
fn a_captured_report_replayed_verbatim_is_refused() {
    let dir = TestDir::new();
    let publisher = Publisher::start(&dir.sub("hub"));
    let tap = Tap::start(&publisher.reply);
    let web1 = Node::start(
        dir.path(),
        "web1",
        &publisher,
        NodeOptions {
            subscriber: false,
            monitor_publisher: Some(tap.endpoint.clone()),
            ..NodeOptions::default()
        },
    );
    let web2 = Node::start(dir.path(), "web2", &publisher, subscriber_only());
    web1.append_log(&[ban("sshd", "203.0.113.30")]);
    web2.wait_recorded("ban sshd 203.0.113.30 web1", 1);
    web1.monitor()
        .wait_for_event("reported", &[("ip", "203.0.113.30")], TIMEOUT);
    let captured = tap.captured();
    let report = captured
        .iter()
        .find(|frames| String::from_utf8_lossy(&frames[0]).contains("203.0.113.30"))
        .unwrap_or_else(|| panic!("the tap saw no report of 203.0.113.30: {captured:?}"));
    assert_eq!(report.len(), 2, "a report is payload + auth frame");
    let auth = f2b_proto::auth::RequestAuth::decode(&report[1]).expect("an auth frame");
    assert_eq!(auth.key.as_str(), "web1");

    let mark = publisher.process().mark();
    let frames: Vec<&[u8]> = report.iter().map(Vec::as_slice).collect();
    let reply = raw::request_frames(&publisher.reply, &frames);
    let nak = nak_of(&reply);
    assert_eq!(nak.reason, NakReason::Replayed, "{nak:?}");
    if let Some(mac) = reply.get(1) {
        assert!(trust::reply_mac_ok(
            &publisher.secret("web1"),
            &auth,
            &reply[0],
            mac
        ));
    }
    publisher
        .process()
        .wait_for_event_after(mark, "rejected", &[("reason", "replayed")], TIMEOUT);

    // Signed right, but ten minutes old (max_clock_skew is 60 s by default); and
    // ten minutes ahead.
    let payload = &report[0];
    for ts in [raw::now_ms() - 600_000, raw::now_ms() + 600_000] {
        let a = trust::sign_at(&publisher.secret("web1"), "web1", ts, payload);
        let reply = raw::request_frames(&publisher.reply, &[payload, &a.encode()]);
        assert_eq!(nak_of(&reply).reason, NakReason::Replayed);
    }

    // The marker, then: applied once.
    web1.append_log(&[ban("sshd", "203.0.113.31")]);
    web2.wait_recorded("ban sshd 203.0.113.31 web1", 1);
    assert_eq!(web2.recorded_count("ban sshd 203.0.113.30 web1"), 1);
    assert_eq!(publisher.broadcasts_of("203.0.113.30").len(), 1);
}

// --- the hub's limits ------------------------------------------------------------------

/// `[publisher] ignore_ip`: a ban of an address in the allowlist is refused
/// (`forbidden`) and never broadcast; other bans go through.
#[test]
fn publisher_ignore_ip_is_enforced_end_to_end() {
    let c = Cluster::start(
        PublisherOptions {
            publisher_extra: "ignore_ip = [\"198.51.100.0/24\", \"2001:db8:f00::/48\"]\n".into(),
            ..PublisherOptions::default()
        },
        &[
            ("web1", NodeOptions::default()),
            ("web2", subscriber_only()),
        ],
    );
    c.node("web1")
        .append_log(&[ban("sshd", "198.51.100.7"), ban("sshd", "2001:db8:f00::7")]);
    c.publisher
        .process()
        .wait_for_count(r"\brejected\b.*reason=forbidden", 2, TIMEOUT);
    for ip in ["198.51.100.7", "2001:db8:f00::7"] {
        c.node("web1").monitor().wait_for_event(
            "event rejected by the publisher, dropped",
            &[("ip", ip)],
            TIMEOUT,
        );
    }
    c.node("web1").append_log(&[ban("sshd", "203.0.113.60")]);
    c.node("web2")
        .wait_recorded("ban sshd 203.0.113.60 web1", 1);
    c.assert_nowhere("198.51.100.7");
    c.assert_nowhere("2001:db8:f00::7");
}

/// The circuit breaker: a node that floods the hub is quarantined (an ERROR line
/// naming it), its further reports refused `quarantined` and dropped by its
/// monitor; subscribers get no more of the flood than the floor lets through, and
/// the other nodes' bans still propagate.
#[test]
fn a_flooding_node_is_quarantined() {
    const FLOOR: usize = 20;
    const FLOOD: usize = 120;
    let c = Cluster::start(
        PublisherOptions {
            publisher_extra: format!(
                "rate_limit = 0\nquarantine_floor = {FLOOR}\nquarantine_factor = 10\n\
                 quarantine_time = \"10m\"\n"
            ),
            ..PublisherOptions::default()
        },
        &[
            ("web1", NodeOptions::default()),
            ("web2", NodeOptions::default()),
            ("web3", subscriber_only()),
        ],
    );
    let flood: Vec<String> = (0..FLOOD)
        .map(|i| ban("sshd", &format!("198.18.{}.{}", i / 200, i % 200 + 1)))
        .collect();
    c.node("web1").append_log(&flood);
    let error = c
        .publisher
        .process()
        .wait_for_line(r"ERROR.*node quarantined", TIMEOUT);
    assert!(error.line.contains("web1"), "{}", error.line);
    c.node("web1")
        .monitor()
        .wait_for_line(r"quarantined node web1", TIMEOUT);
    // Every line of the flood is settled: reported, or dropped as quarantined.
    let web1 = c.node("web1").monitor();
    f2b_tests::wait::until(
        "every flood report settled",
        TIMEOUT,
        || {
            let done = web1.events("reported", &[]).len()
                + web1
                    .events(
                        "event rejected by the publisher, dropped",
                        &[("reason", "quarantined")],
                    )
                    .len();
            (done >= FLOOD).then_some(())
        },
        || web1.dump(),
    );

    c.node("web2").append_log(&[ban("sshd", "203.0.113.70")]);
    for n in ["web1", "web3"] {
        c.node(n).wait_recorded("ban sshd 203.0.113.70 web2", 1);
    }
    let broadcast = c
        .publisher
        .process()
        .events("broadcast", &[("node", "web1")])
        .len();
    assert!(
        (1..=FLOOR + 1).contains(&broadcast),
        "{broadcast} of the flood broadcast (floor {FLOOR})"
    );
    for n in ["web2", "web3"] {
        let got = c
            .node(n)
            .recorded()
            .iter()
            .filter(|l| l.ends_with(" web1"))
            .count();
        assert!(
            got <= broadcast,
            "{n} applied {got} of the flood, {broadcast} were broadcast"
        );
    }
    eprintln!(
        "quarantine: {FLOOD} reports flooded, {broadcast} broadcast before the breaker tripped"
    );
}

/// The hub's rate limit: a node over `rate_limit` is told `rate_limited`, which is
/// transient: its monitor keeps the events and sends them again, so every one of
/// them arrives, only later.
#[test]
fn a_rate_limited_node_loses_nothing() {
    const EVENTS: usize = 30;
    let c = Cluster::start(
        PublisherOptions {
            publisher_extra: "rate_limit = 10\nrate_burst = 5\n".into(),
            ..PublisherOptions::default()
        },
        &[
            ("web1", NodeOptions::default()),
            ("web2", subscriber_only()),
        ],
    );
    let lines: Vec<String> = (1..=EVENTS)
        .map(|i| ban("sshd", &format!("198.18.0.{i}")))
        .collect();
    c.node("web1").append_log(&lines);
    c.publisher
        .process()
        .wait_for_event("rejected", &[("reason", "rate_limited")], TIMEOUT);
    for i in 1..=EVENTS {
        c.node("web2")
            .wait_recorded(&format!("ban sshd 198.18.0.{i} web1"), 1);
    }
    assert_eq!(c.node("web2").recorded().len(), EVENTS);
}

/// `[trust] allow_unauthenticated = true` without any key: the explicit opt-out
/// works end to end (unsigned reports, unsigned broadcasts) and every daemon warns
/// about it at start.
#[test]
fn the_explicit_opt_out_works_and_every_daemon_warns() {
    let open = NodeOptions {
        secret: NodeSecret::None,
        publisher_keys: Some(Vec::new()),
        allow_unauthenticated: true,
        ..NodeOptions::default()
    };
    let c = Cluster::start(
        PublisherOptions {
            signing_key: false,
            monitors: Vec::new(),
            allow_unauthenticated: true,
            ..PublisherOptions::default()
        },
        &[("web1", open.clone()), ("web2", open)],
    );
    c.node("web1").append_log(&[ban("sshd", "203.0.113.80")]);
    c.node("web2")
        .wait_recorded("ban sshd 203.0.113.80 web1", 1);
    let mut daemons = vec![c.publisher.process()];
    daemons.extend(c.nodes.iter().flat_map(Node::processes));
    for p in daemons {
        assert!(
            !p.matching(r"WARN.*allow_unauthenticated").is_empty(),
            "{} did not warn about the opt-out\n{}",
            p.name(),
            p.dump()
        );
    }
}

/// Without their keys, and without the opt-out, the daemons refuse to start, with an
/// error naming the key to set.
#[test]
fn daemons_refuse_to_start_without_their_keys() {
    let dir = TestDir::new();
    let d = dir.path();
    std::fs::write(d.join("fail2ban.log"), "").expect("log");
    let config = d.join("fail2ban-cluster.conf");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"web1\"\n\
             [publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\nbroadcast_bind = \"tcp://127.0.0.1:*\"\n\
             state_dir = \"{d}/publisher\"\n\
             [monitor]\nlog_path = \"{d}/fail2ban.log\"\npublisher = \"tcp://127.0.0.1:9\"\n\
             state_dir = \"{d}/monitor\"\n\
             [subscriber]\npublisher = \"tcp://127.0.0.1:9\"\naction = \"none\"\n\
             state_dir = \"{d}/subscriber\"\n",
            d = d.display()
        ),
    )
    .expect("config");
    for (binary, key) in [
        (f2b_tests::bins::publisher(), "trust.signing_key_file"),
        (f2b_tests::bins::monitor(), "trust.secret"),
        (f2b_tests::bins::subscriber(), "trust.publisher_key"),
    ] {
        let mut cmd = std::process::Command::new(&binary);
        cmd.arg("--config").arg(&config);
        let p = f2b_tests::Process::spawn(binary.display().to_string(), cmd);
        let status = p
            .wait_exit(TIMEOUT)
            .unwrap_or_else(|| panic!("{} kept running without its keys", p.name()));
        assert!(!status.success(), "{} exited 0\n{}", p.name(), p.dump());
        assert!(
            !p.matching(&regex::escape(key)).is_empty(),
            "{}: the error does not name {key}\n{}",
            p.name(),
            p.dump()
        );
    }
}
