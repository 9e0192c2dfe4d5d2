//! The real binaries end to end on loopback: a publisher and several nodes (a monitor
//! and a subscriber each), ephemeral ports, temporary configuration files, real fail2ban log
//! lines appended to each node's log. Subscribers apply events with the `exec`
//! recorder, which writes `<action> <jail> <ip> <node>` per event to a file per
//! node; the tests assert on those files and on the daemons' log lines.

use std::path::Path;

use f2b_tests::cluster::{append_lines, TestDir};
use f2b_tests::logline::{ban, fail2ban_line, stop_sequence, unban};
use f2b_tests::raw;
use f2b_tests::{Node, NodeOptions, Publisher, TIMEOUT};
use serde_json::json;

/// A publisher and nodes; dropped in order (daemons first, then the directory,
/// which is kept when the test failed).
struct Cluster {
    publisher: Publisher,
    nodes: Vec<Node>,
    _dir: TestDir,
}

impl Cluster {
    fn start(names: &[&str]) -> Cluster {
        Cluster::start_with(names, |_| NodeOptions::default())
    }

    fn start_with(names: &[&str], options: impl Fn(&str) -> NodeOptions) -> Cluster {
        let dir = TestDir::new();
        let publisher = Publisher::start(&dir.sub("hub"));
        let nodes = names
            .iter()
            .map(|n| Node::start(dir.path(), n, &publisher, options(n)))
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

    /// Waits until the monitor of `node` has had its report of `ip` acknowledged
    /// with `status`.
    fn wait_reported(&self, node: &str, action: &str, ip: &str, status: &str) -> String {
        self.node(node).monitor().wait_for_event(
            "reported",
            &[("action", action), ("ip", ip), ("status", status)],
            TIMEOUT,
        )
    }
}

/// A ban on one node reaches every other node, once, with the origin's name and the
/// jail; the origin's own subscriber receives it and skips it (own_node) instead of
/// applying it. A later manual unban travels the same way. IPv4 and IPv6.
#[test]
fn ban_reaches_every_other_node_and_not_the_origin() {
    let c = Cluster::start(&["web1", "web2", "web3"]);
    let (a, b, d) = (c.node("web1"), c.node("web2"), c.node("web3"));
    a.append_log(&[
        ban("sshd", "203.0.113.5"),
        ban("sshd", "2001:db8::dead:beef"),
    ]);

    for n in [b, d] {
        n.wait_recorded("ban sshd 203.0.113.5 web1", 1);
        n.wait_recorded("ban sshd 2001:db8::dead:beef web1", 1);
    }
    c.wait_reported("web1", "ban", "203.0.113.5", "broadcast");
    a.subscriber().wait_for_event(
        "skipped",
        &[("reason", "own_node"), ("ip", "2001:db8::dead:beef")],
        TIMEOUT,
    );
    assert!(
        a.recorded().is_empty(),
        "the origin applied its own ban: {:?}",
        a.recorded()
    );
    assert_eq!(c.publisher.broadcasts_of("203.0.113.5").len(), 1);

    a.append_log(&[unban("sshd", "203.0.113.5")]);
    for n in [b, d] {
        n.wait_recorded("unban sshd 203.0.113.5 web1", 1);
    }
    // Each event was applied exactly once on each other node.
    for n in [b, d] {
        assert_eq!(
            n.recorded_count("ban sshd 203.0.113.5 web1"),
            1,
            "{}",
            n.report()
        );
        assert_eq!(n.recorded().len(), 3, "{}", n.report());
    }
    assert!(a.recorded().is_empty());
}

/// `[subscriber] jails` filters by jail (at the publisher, by topic): a node
/// subscribed to one jail never gets another jail's events, a node with no filter
/// gets all. Events of one origin and one jail are applied in order; a subscriber
/// that gets several jails' events at once (a burst reported in one `reports`
/// request) may apply one jail's before another's.
#[test]
fn subscriber_jails_filter_events() {
    let c = Cluster::start_with(&["web1", "only-sshd", "only-recidive", "all"], |n| {
        NodeOptions {
            jails: match n {
                "only-sshd" => vec!["sshd".into()],
                "only-recidive" => vec!["recidive".into()],
                _ => vec![],
            },
            ..NodeOptions::default()
        }
    });
    let a = c.node("web1");
    a.append_log(&[
        ban("recidive", "198.51.100.1"),
        ban("sshd", "198.51.100.2"),
        ban("recidive", "198.51.100.3"),
    ]);
    let sshd_only = c.node("only-sshd");
    sshd_only.wait_recorded("ban sshd 198.51.100.2 web1", 1);
    let recidive_only = c.node("only-recidive");
    recidive_only.wait_recorded("ban recidive 198.51.100.3 web1", 1);
    let all = c.node("all");
    all.wait_recorded("ban recidive 198.51.100.3 web1", 1);
    all.wait_recorded("ban sshd 198.51.100.2 web1", 1);

    let mut got = all.recorded();
    let recidive: Vec<&String> = got.iter().filter(|l| l.contains("recidive")).collect();
    assert_eq!(
        recidive,
        [
            "ban recidive 198.51.100.1 web1",
            "ban recidive 198.51.100.3 web1"
        ]
    );
    got.sort();
    assert_eq!(
        got,
        [
            "ban recidive 198.51.100.1 web1",
            "ban recidive 198.51.100.3 web1",
            "ban sshd 198.51.100.2 web1"
        ]
    );
    assert_eq!(
        recidive_only.recorded(),
        [
            "ban recidive 198.51.100.1 web1",
            "ban recidive 198.51.100.3 web1"
        ]
    );
    // 198.51.100.3 (recidive) was broadcast after 198.51.100.2: wait for the
    // publisher to have sent it, then for the sshd node's heartbeat after it.
    c.publisher
        .process()
        .wait_for_event("broadcast", &[("ip", "198.51.100.3")], TIMEOUT);
    assert_eq!(sshd_only.recorded(), ["ban sshd 198.51.100.2 web1"]);
    assert_eq!(
        sshd_only
            .subscriber()
            .events("skipped", &[("ip", "198.51.100.1")]),
        Vec::<String>::new(),
        "a filtered jail must not even reach the subscriber"
    );
}

/// `[subscriber] ignore_ip`: the node skips (and logs) addresses in its list and
/// applies the rest; a node without that entry applies everything.
#[test]
fn subscriber_ignore_ip_is_honoured() {
    let c = Cluster::start_with(&["web1", "strict", "plain"], |n| NodeOptions {
        ignore_ip: (n == "strict")
            .then(|| vec!["198.51.100.0/24".into(), "2001:db8:1::/48".into()]),
        ..NodeOptions::default()
    });
    let a = c.node("web1");
    a.append_log(&[
        ban("sshd", "198.51.100.7"),
        ban("sshd", "2001:db8:1::7"),
        ban("sshd", "203.0.113.9"),
    ]);
    let strict = c.node("strict");
    let plain = c.node("plain");
    plain.wait_recorded("ban sshd 203.0.113.9 web1", 1);
    strict.wait_recorded("ban sshd 203.0.113.9 web1", 1);
    for ip in ["198.51.100.7", "2001:db8:1::7"] {
        strict.subscriber().wait_for_event(
            "skipped",
            &[("reason", "ignore_ip"), ("ip", ip)],
            TIMEOUT,
        );
    }
    assert_eq!(strict.recorded(), ["ban sshd 203.0.113.9 web1"]);
    assert_eq!(plain.recorded().len(), 3, "{}", plain.report());
}

/// When fail2ban stops a jail it writes `Flush ticket(s)`, an Unban per active ban
/// and `Jail 'x' stopped` (1.0.2): those Unbans are not propagated (the other nodes
/// keep the bans), while a later manual Unban is.
#[test]
fn unbans_of_a_stopping_jail_are_not_propagated() {
    let c = Cluster::start(&["web1", "web2"]);
    let (a, b) = (c.node("web1"), c.node("web2"));
    a.append_log(&[ban("sshd", "192.0.2.10"), ban("sshd", "192.0.2.11")]);
    b.wait_recorded("ban sshd 192.0.2.11 web1", 1);

    // A restart of fail2ban: the stop sequence, then the jail back with its bans.
    let mut lines = stop_sequence("sshd", "iptables-multiport", &["192.0.2.10", "192.0.2.11"]);
    lines.push(fail2ban_line(
        "fail2ban.jail",
        "INFO",
        "Jail 'sshd' started",
    ));
    lines.push(fail2ban_line(
        "fail2ban.actions",
        "NOTICE",
        "[sshd] Restore Ban 192.0.2.10",
    ));
    lines.push(fail2ban_line(
        "fail2ban.actions",
        "NOTICE",
        "[sshd] Restore Ban 192.0.2.11",
    ));
    a.append_log(&lines);
    for ip in ["192.0.2.10", "192.0.2.11"] {
        a.monitor().wait_for_event(
            "ignored",
            &[("reason", "jail_stopping"), ("action", "unban"), ("ip", ip)],
            TIMEOUT,
        );
    }
    // Then a manual unban, which must travel.
    a.append_log(&[unban("sshd", "192.0.2.11")]);
    b.wait_recorded("unban sshd 192.0.2.11 web1", 1);
    assert_eq!(
        b.recorded(),
        [
            "ban sshd 192.0.2.10 web1",
            "ban sshd 192.0.2.11 web1",
            "unban sshd 192.0.2.11 web1"
        ],
        "only the manual unban may reach the other node"
    );
    assert!(c
        .publisher
        .process()
        .events("broadcast", &[("action", "unban"), ("ip", "192.0.2.10")])
        .is_empty());
}

/// Log rotation loses no line. Rename + create (Debian's logrotate): lines written to
/// the old file before fail2ban reopens its log (flushlogs), then lines in the new
/// file. Then copytruncate.
#[test]
fn log_rotation_loses_no_line() {
    let c = Cluster::start(&["web1", "web2"]);
    let (a, b) = (c.node("web1"), c.node("web2"));
    let log = &a.log_path;
    let rotated = log.with_extension("log.1");

    a.append_log(&[ban("sshd", "203.0.113.1")]);
    b.wait_recorded("ban sshd 203.0.113.1 web1", 1);

    // logrotate: rename, create...
    std::fs::rename(log, &rotated).expect("rename");
    std::fs::write(log, "").expect("create");
    // ... fail2ban still writes to the old file until `fail2ban-client flushlogs` ...
    append_lines(&rotated, &[ban("sshd", "203.0.113.2")]);
    b.wait_recorded("ban sshd 203.0.113.2 web1", 1);
    // ... then to the new one.
    append_lines(
        log,
        &[fail2ban_line(
            "fail2ban.server",
            "INFO",
            &format!("rollover performed on {}", log.display()),
        )],
    );
    append_lines(log, &[ban("sshd", "203.0.113.3")]);
    b.wait_recorded("ban sshd 203.0.113.3 web1", 1);

    // copytruncate: copy, then truncate in place; writing goes on at offset 0.
    std::fs::copy(log, log.with_extension("log.2")).expect("copy");
    truncate(log);
    append_lines(log, &[ban("sshd", "203.0.113.4")]);
    b.wait_recorded("ban sshd 203.0.113.4 web1", 1);

    assert_eq!(
        b.recorded(),
        [
            "ban sshd 203.0.113.1 web1",
            "ban sshd 203.0.113.2 web1",
            "ban sshd 203.0.113.3 web1",
            "ban sshd 203.0.113.4 web1"
        ]
    );
}

fn truncate(path: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .expect("truncate");
}

/// The publisher crashes (SIGKILL) and comes back on the same ports (and its
/// ledger: same epoch, sequence numbers go on) while monitors and subscribers keep
/// running: each subscriber notices the silence, reconnects, and logs `connected`
/// again on the restarted publisher's first message; the event the monitor read
/// during the outage is delivered and ACKed after the restart, and reaches the
/// other node once, whether by its broadcast or by the snapshot the subscriber asks
/// for on reconnecting (it may reconnect after that broadcast); later bans
/// propagate as before.
#[test]
fn cluster_recovers_from_a_publisher_crash() {
    let mut c = Cluster::start_with(&["web1", "web2"], |_| NodeOptions {
        ack_timeout: Some("500ms".into()),
        heartbeat_timeout: Some("1s".into()),
        ..NodeOptions::default()
    });
    c.node("web1").append_log(&[ban("sshd", "198.51.100.20")]);
    c.node("web2")
        .wait_recorded("ban sshd 198.51.100.20 web1", 1);

    let marks: Vec<usize> = c.nodes.iter().map(|n| n.subscriber().mark()).collect();
    let monitor_mark = c.node("web1").monitor().mark();
    c.publisher.kill();

    // Read while the publisher is down: the monitor keeps it and retries.
    c.node("web1").append_log(&[ban("sshd", "198.51.100.21")]);
    c.node("web1").monitor().wait_for_event_after(
        monitor_mark,
        "publisher unreachable",
        &[],
        TIMEOUT,
    );
    // The subscribers see the link dead.
    for (n, mark) in c.nodes.iter().zip(&marks) {
        n.subscriber().wait_for_event_after(
            *mark,
            "no message from the publisher, reconnecting",
            &[],
            TIMEOUT,
        );
    }

    c.publisher.restart();
    let a = c.node("web1");
    a.monitor().wait_for_event_after(
        monitor_mark,
        "reported",
        &[("ip", "198.51.100.21"), ("status", "broadcast")],
        TIMEOUT,
    );
    for (n, mark) in c.nodes.iter().zip(&marks) {
        n.subscriber()
            .wait_for_event_after(*mark, "connected", &[], TIMEOUT);
    }
    let b = c.node("web2");
    b.wait_recorded("ban sshd 198.51.100.21 web1", 1);
    b.subscriber()
        .wait_for_event_after(marks[1], "resync", &[("reason", "reconnect")], TIMEOUT);
    a.append_log(&[ban("sshd", "198.51.100.22")]);
    b.wait_recorded("ban sshd 198.51.100.22 web1", 1);
    for ip in ["198.51.100.20", "198.51.100.21"] {
        assert_eq!(
            b.recorded_count(&format!("ban sshd {ip} web1")),
            1,
            "{}",
            b.report()
        );
    }
}

/// Every kind of invalid report sent over a raw REQ socket is answered with a NAK
/// carrying its reason code, and logged as `rejected` with that reason and the
/// peer's address; the publisher goes on serving. A request that is not a JSON
/// object is taken for a fail2ban-zmq-tools one: with `[publisher] legacy` off it
/// gets the old protocol's bare `NAK` (what an old monitor understands), logged as
/// `legacy_disabled`.
#[test]
fn invalid_reports_are_naked_with_their_reason() {
    let c = Cluster::start(&["web1", "web2"]);
    let ep = &c.publisher.reply;
    let id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
    let good = || raw::report(id, "web9", "sshd", "ban", "203.0.113.50");
    let with = |field: &str, value: serde_json::Value| {
        let mut r = good();
        r["event"][field] = value;
        serde_json::to_vec(&r).expect("json")
    };
    let rejected = |mark: usize, code: &str| {
        let line = c.publisher.process().wait_for_event_after(
            mark,
            "rejected",
            &[("reason", code)],
            TIMEOUT,
        );
        let peer = f2b_tests::field(&line, "peer").unwrap_or_default();
        assert!(peer.contains("127.0.0.1"), "no peer address in {line:?}");
    };

    let native: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "unterminated JSON",
            br#"{"v":1,"type":"rep"#.to_vec(),
            "malformed",
        ),
        ("no type", br#"{"v":1}"#.to_vec(), "malformed"),
        (
            "no event",
            br#"{"v":1,"type":"report"}"#.to_vec(),
            "malformed",
        ),
        (
            "event not an object",
            br#"{"v":1,"type":"report","event":[]}"#.to_vec(),
            "malformed",
        ),
        (
            "version 2",
            br#"{"v":2,"type":"report"}"#.to_vec(),
            "unsupported_version",
        ),
        (
            "unknown type",
            br#"{"v":1,"type":"launch"}"#.to_vec(),
            "unknown_type",
        ),
        ("bad node", with("node", json!("bad node")), "invalid_node"),
        ("bad jail", with("jail", json!("a b")), "invalid_jail"),
        ("short IPv4", with("ip", json!("10.1")), "invalid_ip"),
        ("CIDR", with("ip", json!("1.2.3.0/24")), "invalid_ip"),
        ("not an IP", with("ip", json!("not_an_ip")), "invalid_ip"),
        (
            "bad action",
            with("action", json!("drop")),
            "invalid_action",
        ),
        ("bad id", with("id", json!("nope")), "invalid_id"),
        ("time 0", with("time_ms", json!(0)), "invalid_time"),
        (
            "time 2^60",
            with("time_ms", json!(1u64 << 60)),
            "invalid_time",
        ),
        (
            "time as text",
            with("time_ms", json!("yesterday")),
            "malformed",
        ),
        ("loopback", with("ip", json!("127.0.0.1")), "forbidden"),
        ("IPv6 link-local", with("ip", json!("fe80::1")), "forbidden"),
    ];
    // Signed with web9's real credential, so that what is refused is the payload.
    let secret = c.publisher.secret("web9");
    for (what, payload, code) in &native {
        let mark = c.publisher.process().mark();
        let reply = raw::signed_reply(ep, payload, "web9", &secret);
        let f2b_proto::Reply::Nak(nak) = reply else {
            panic!("{what}: expected a NAK, got {reply:?}");
        };
        // `event.node` is not the credential's name either: which check comes first
        // is the publisher's choice.
        if *what == "bad node" && nak.reason.code() == "unauthenticated" {
            rejected(mark, "unauthenticated");
            continue;
        }
        assert_eq!(nak.reason.code(), *code, "{what}: {nak:?}");
        rejected(mark, code);
    }
    // More message parts than the protocol allows.
    let mark = c.publisher.process().mark();
    let frames = raw::request_frames(ep, &[b"{}", b"", b"", b"", b""]);
    let reply = f2b_proto::Reply::decode(&frames[0]).expect("a reply");
    assert!(
        matches!(&reply, f2b_proto::Reply::Nak(n) if n.reason.code() == "malformed"),
        "{reply:?}"
    );
    rejected(mark, "malformed");

    for (what, payload) in [
        ("legacy text", &b"web1|sshd|Ban|1.2.3.4"[..]),
        ("JSON array", b"[1,2]"),
        ("binary", b"\xff\x00\xfe"),
    ] {
        let mark = c.publisher.process().mark();
        let reply = raw::request(ep, payload);
        assert_eq!(
            reply,
            b"NAK",
            "{what}: {:?}",
            String::from_utf8_lossy(&reply)
        );
        rejected(mark, "legacy_disabled");
    }

    // Nothing was broadcast, and a valid report is still served and propagated.
    assert!(c.publisher.process().events("broadcast", &[]).is_empty());
    let ack = raw::signed_reply(
        ep,
        &serde_json::to_vec(&good()).expect("json"),
        "web9",
        &secret,
    );
    assert!(matches!(ack, f2b_proto::Reply::Ack(_)), "{ack:?}");
    for n in &c.nodes {
        n.wait_recorded("ban sshd 203.0.113.50 web9", 1);
    }
}

/// A peer announcing a 1 TiB frame on either publisher port is disconnected at once
/// (ZMQ_MAXMSGSIZE), and the publisher keeps serving: a ban still propagates.
#[test]
fn huge_frame_headers_are_dropped_and_service_goes_on() {
    let c = Cluster::start(&["web1", "web2"]);
    for (endpoint, socket_type) in [(&c.publisher.reply, "REQ"), (&c.publisher.broadcast, "SUB")] {
        let took = raw::announce_huge_frame(endpoint, socket_type);
        assert!(took < TIMEOUT, "{endpoint}: {took:?}");
    }
    assert!(c.publisher.process().is_running());
    c.node("web1").append_log(&[ban("sshd", "192.0.2.99")]);
    c.node("web2").wait_recorded("ban sshd 192.0.2.99 web1", 1);
}

/// SIGTERM stops every daemon cleanly (exit status 0), including a monitor with an
/// event it cannot deliver (publisher gone) and a subscriber in the middle of
/// work.
#[test]
fn every_daemon_exits_cleanly_on_sigterm() {
    let c = Cluster::start(&["web1", "web2"]);
    let (a, b) = (c.node("web1"), c.node("web2"));
    a.append_log(&[ban("sshd", "203.0.113.60")]);
    b.wait_recorded("ban sshd 203.0.113.60 web1", 1);

    b.subscriber().terminate_and_wait();
    b.monitor().terminate_and_wait();
    c.publisher.process().terminate_and_wait();
    // The publisher is gone: web1's monitor holds an event it cannot deliver.
    a.append_log(&[ban("sshd", "203.0.113.61")]);
    a.monitor()
        .wait_for_event("queued", &[("ip", "203.0.113.61")], TIMEOUT);
    a.monitor().terminate_and_wait();
    a.subscriber().terminate_and_wait();
    for p in [
        a.monitor(),
        a.subscriber(),
        b.monitor(),
        b.subscriber(),
        c.publisher.process(),
    ] {
        assert!(
            !p.events("stopped", &[]).is_empty(),
            "{} did not log `stopped`\n{}",
            p.name(),
            p.dump()
        );
    }
}

/// Reports that reach the publisher together are committed in one transaction and
/// broadcast together, as `events` messages under one signature each (a pipelined
/// client here, as many monitors at once would be): a real subscriber applies every
/// one, once, in the order of their sequence numbers, and a SUB socket of the test's
/// own sees every sequence number, in order, under valid signatures.
#[test]
fn reports_decided_together_are_broadcast_together_and_applied_in_order() {
    use f2b_proto::{auth, Action, Broadcast, Event, EventId, JailName, NodeName, Request};
    use f2b_tests::applied::ActionLog;
    use f2b_tests::{trust, wait, PublisherOptions};

    let dir = TestDir::new();
    let publisher = Publisher::start_with(
        &dir.sub("hub"),
        PublisherOptions::default().without_hub_limits(),
    );
    let web2 = Node::start(
        dir.path(),
        "web2",
        &publisher,
        NodeOptions::logging_subscriber(),
    );

    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_linger(0).unwrap();
    sub.set_rcvtimeo(TIMEOUT.as_millis() as i32).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.connect(&publisher.broadcast).unwrap();
    // Live once a heartbeat arrives (every 200 ms).
    sub.recv_multipart(0).expect("a heartbeat");

    let n = 250u32;
    let secret = publisher.secret("web1");
    let dealer = ctx.socket(zmq::DEALER).unwrap();
    dealer.set_linger(0).unwrap();
    dealer.set_rcvtimeo(TIMEOUT.as_millis() as i32).unwrap();
    dealer.connect(&publisher.reply).unwrap();
    let ip = |i: u32| std::net::Ipv4Addr::from(0xC633_6400 + i).to_string(); // 198.51.100.i
    for i in 1..=n {
        let event = Event::new(
            EventId::from_u128(0xE0E0_0000 + u128::from(i)),
            NodeName::new("web1").unwrap(),
            JailName::new("sshd").unwrap(),
            Action::Ban,
            ip(i).parse().unwrap(),
            f2b_tests::raw::now_ms(),
        )
        .unwrap();
        let payload = Request::Report(event).encode();
        let auth = trust::sign(&secret, "web1", &payload).encode();
        dealer
            .send_multipart([&b""[..], &payload, &auth], 0)
            .unwrap();
    }
    for i in 1..=n {
        let frames = dealer.recv_multipart(0).expect("a reply");
        match f2b_proto::Reply::decode(&frames[1]).unwrap() {
            f2b_proto::Reply::Ack(a) => assert_eq!(a.seq, Some(u64::from(i)), "{a:?}"),
            other => panic!("report {i}: {other:?}"),
        }
    }

    let (mut seqs, mut batches) = (Vec::new(), 0);
    while seqs.len() < n as usize {
        let frames = sub.recv_multipart(0).expect("the broadcasts");
        assert_eq!(frames.len(), 3, "signed: topic, payload, signature");
        assert!(auth::verify_broadcast(
            &[publisher.public_key()],
            &frames[0],
            &frames[1],
            &frames[2]
        ));
        let message = Broadcast::decode(&frames[0], &frames[1]).unwrap();
        batches += usize::from(matches!(message, Broadcast::Events(_)));
        seqs.extend(message.events().iter().map(|s| s.seq));
    }
    assert_eq!(seqs, (1..=u64::from(n)).collect::<Vec<_>>());
    println!("{n} reports sent at once: {batches} events messages among the broadcasts");
    // The client sent them all at once: while one transaction was being synced,
    // the next reports waited and were decided together.
    assert!(
        batches > 0,
        "no events message among the broadcasts of {n} reports"
    );

    let mut applied = ActionLog::new(&web2.action_log_path);
    wait::until(
        &format!("{n} bans applied on web2"),
        TIMEOUT,
        || (applied.refresh().len() >= n as usize).then_some(()),
        || web2.report(),
    );
    let got: Vec<(u64, String)> = applied
        .entries()
        .iter()
        .map(|a| (a.seq, a.ip.clone()))
        .collect();
    let want: Vec<(u64, String)> = (1..=n).map(|i| (u64::from(i), ip(i))).collect();
    assert_eq!(got, want);
    assert!(applied.bad_lines().is_empty(), "{:?}", applied.bad_lines());
}

/// A burst in one node's log (a botnet hitting it) leaves its monitor as `reports`
/// requests of up to 32 events rather than one round trip per ban: the publisher
/// counts far fewer requests than events. The other node applies every ban once, in
/// the log's order and with rising sequence numbers.
#[test]
fn a_burst_in_one_log_is_reported_in_batches_and_applied_once_in_order() {
    use f2b_common::testing::{http_get, sample};
    use f2b_tests::applied::ActionLog;
    use f2b_tests::{wait, PublisherOptions};

    let dir = TestDir::new();
    let mut options = PublisherOptions::default().without_hub_limits();
    options
        .publisher_extra
        .push_str("metrics_bind = \"127.0.0.1:0\"\n");
    let publisher = Publisher::start_with(&dir.sub("hub"), options);
    let metrics = publisher
        .process()
        .wait_for_line(r"metrics listening on", TIMEOUT)
        .field("addr");
    let web1 = Node::start(dir.path(), "web1", &publisher, NodeOptions::default());
    let web2 = Node::start(
        dir.path(),
        "web2",
        &publisher,
        NodeOptions::logging_subscriber(),
    );

    let n = 600u32;
    let ip = |i: u32| std::net::Ipv4Addr::from(0xC633_6400 + i).to_string(); // 198.51.100.i
    let lines: Vec<String> = (1..=n).map(|i| ban("sshd", &ip(i))).collect();
    web1.append_log(&lines);

    let mut applied = ActionLog::new(&web2.action_log_path);
    wait::until(
        &format!("{n} bans applied on web2"),
        TIMEOUT,
        || (applied.refresh().len() >= n as usize).then_some(()),
        || web2.report(),
    );
    let entries = applied.entries();
    let ips: Vec<String> = entries.iter().map(|a| a.ip.clone()).collect();
    assert_eq!(ips, (1..=n).map(ip).collect::<Vec<_>>(), "the log's order");
    assert!(
        entries.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequence numbers rise"
    );
    assert!(applied.bad_lines().is_empty(), "{:?}", applied.bad_lines());

    let (code, text) = http_get(metrics.as_str(), "/metrics", TIMEOUT);
    assert_eq!(code, 200, "{text}");
    let accepted = sample(&text, "f2b_publisher_events_accepted_total").unwrap_or(0.0);
    let requests = sample(&text, "f2b_publisher_reports_received_total").unwrap_or(0.0);
    println!("{n} bans in one write: {requests} requests on the reply socket");
    assert_eq!(accepted, f64::from(n), "{text}");
    // 600 events in requests of up to 32 are 19 requests when they all wait at
    // once; the monitor may send the first ones while it still reads, so allow
    // several times that, far below one request per event.
    assert!(
        requests <= f64::from(n) / 8.0,
        "{requests} requests for {n} events: not batched"
    );
}
