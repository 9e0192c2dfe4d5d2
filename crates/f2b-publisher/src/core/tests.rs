use std::collections::HashSet;
use std::net::IpAddr;

use f2b_proto::{event_topic, JailName, NodeName, MAX_MESSAGE_SIZE, MAX_SAFE_INTEGER};
use serde_json::{json, Value};

use super::*;
use f2b_proto::{SnapshotReply, SnapshotRequest};

/// 2025-11-21T05:13:20Z, a plausible "now".
const NOW: u64 = 1_763_702_000_000;
const BAN_TIME: Duration = Duration::from_secs(600);
const PEER: &str = "192.0.2.99";

fn core_with(epoch: u64, ban_time: Duration, limits: Limits) -> Core {
    Core::new(
        Ledger::in_memory(Epoch(epoch)).unwrap(),
        ban_time,
        limits,
        NOW,
    )
    .unwrap()
}

fn core() -> Core {
    core_with(0xfeed, BAN_TIME, Limits::default())
}

fn event(id: u128, jail: &str, action: Action, ip: &str) -> Event {
    Event::new(
        EventId::from_u128(id),
        NodeName::new("web1").unwrap(),
        JailName::new(jail).unwrap(),
        action,
        ip.parse().unwrap(),
        NOW - 5,
    )
    .unwrap()
}

fn report(e: &Event) -> Vec<u8> {
    Request::Report(e.clone()).encode()
}

fn send(core: &mut Core, e: &Event, now: u64) -> Outcome {
    core.handle(&[report(e)], PEER, now)
}

impl Outcome {
    /// The one event a report's outcome broadcasts, if any.
    fn broadcast(&self) -> Option<&Broadcast> {
        assert!(self.broadcasts.len() <= 1, "{self:?}");
        self.broadcasts.first().map(|b| &b.broadcast)
    }

    /// [`Outcome::broadcast`] in the legacy format, if it has one.
    fn legacy_broadcast(&self) -> Option<&str> {
        assert!(self.broadcasts.len() <= 1, "{self:?}");
        self.broadcasts.first().and_then(|b| b.legacy.as_deref())
    }
}

/// Asserts an ACK with `status` and `seq`, and returns the broadcast.
fn expect_ack(out: &Outcome, status: AckStatus, seq: Option<u64>) -> Option<Broadcast> {
    match &out.reply {
        Response::Reply(Reply::Ack(a)) => {
            assert_eq!((a.status, a.seq), (status, seq), "{out:?}");
        }
        other => panic!("expected {status:?}, got {other:?}"),
    }
    assert_eq!(
        out.broadcast().is_some(),
        status == AckStatus::Broadcast,
        "{out:?}"
    );
    out.broadcast().cloned()
}

fn expect_nak(out: &Outcome, reason: NakReason) -> &Nak {
    assert!(out.broadcast().is_none(), "a NAK broadcast: {out:?}");
    assert!(out.legacy_broadcast().is_none(), "a NAK broadcast: {out:?}");
    assert!(out.reply.is_refusal());
    match &out.reply {
        Response::Reply(Reply::Nak(n)) | Response::Snapshot(SnapshotReply::Nak(n)) => {
            assert_eq!(n.reason, reason, "{n:?}");
            assert!(n.detail.len() <= f2b_proto::MAX_DETAIL_LEN);
            n
        }
        other => panic!("expected NAK {reason}, got {other:?}"),
    }
}

#[test]
fn new_events_are_acked_and_broadcast_in_sequence() {
    let mut c = core();
    let e1 = event(1, "sshd", Action::Ban, "203.0.113.5");
    let b = expect_ack(&send(&mut c, &e1, NOW), AckStatus::Broadcast, Some(1)).unwrap();
    assert_eq!(
        b,
        Broadcast::Event(Sequenced {
            seq: 1,
            epoch: Epoch(0xfeed),
            event: e1.clone()
        })
    );
    assert_eq!(b.topic(), event_topic(&e1.jail));
    let e2 = event(2, "sshd", Action::Ban, "2001:db8::1");
    expect_ack(&send(&mut c, &e2, NOW), AckStatus::Broadcast, Some(2));
    let e3 = event(3, "nginx", Action::Unban, "198.51.100.7");
    expect_ack(&send(&mut c, &e3, NOW), AckStatus::Broadcast, Some(3));
    assert_eq!(c.last_seq(), 3);
    assert_eq!(
        c.heartbeat(Duration::from_millis(1500)),
        Broadcast::Heartbeat(Heartbeat {
            seq: 3,
            epoch: Epoch(0xfeed),
            interval_ms: 1500
        })
    );
}

#[test]
fn heartbeat_before_any_event_has_seq_zero() {
    let c = core();
    let Broadcast::Heartbeat(h) = c.heartbeat(Duration::from_secs(1)) else {
        panic!("not a heartbeat")
    };
    assert_eq!((h.seq, h.interval_ms), (0, 1000));
}

#[test]
fn duplicate_id_repeats_the_first_answer_and_is_not_rebroadcast() {
    let mut c = core();
    let e = event(7, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(1));
    expect_ack(&send(&mut c, &e, NOW + 1), AckStatus::Duplicate, Some(1));
    // Same id, other content: the id is the key.
    let mut other = event(7, "nginx", Action::Unban, "198.51.100.1");
    other.node = NodeName::new("web2").unwrap();
    expect_ack(
        &send(&mut c, &other, NOW + 2),
        AckStatus::Duplicate,
        Some(1),
    );
    // A duplicate of an unchanged event has no seq.
    let echo = event(8, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &echo, NOW), AckStatus::Unchanged, None);
    expect_ack(&send(&mut c, &echo, NOW), AckStatus::Duplicate, None);
    // Even after the ban expired, the id is still a duplicate.
    let later = NOW + 2 * 600_000;
    expect_ack(&send(&mut c, &e, later), AckStatus::Duplicate, Some(1));
    assert_eq!(c.last_seq(), 1);
}

#[test]
fn ban_of_banned_and_unban_of_unbanned_are_unchanged() {
    let mut c = core();
    let ip = "203.0.113.5";
    expect_ack(
        &send(&mut c, &event(1, "sshd", Action::Ban, ip), NOW),
        AckStatus::Broadcast,
        Some(1),
    );
    // The echo of the remote ban from another node.
    expect_ack(
        &send(&mut c, &event(2, "sshd", Action::Ban, ip), NOW + 1000),
        AckStatus::Unchanged,
        None,
    );
    // Another jail is another state.
    expect_ack(
        &send(&mut c, &event(3, "nginx", Action::Ban, ip), NOW + 1000),
        AckStatus::Broadcast,
        Some(2),
    );
    expect_ack(
        &send(&mut c, &event(4, "sshd", Action::Unban, ip), NOW + 2000),
        AckStatus::Broadcast,
        Some(3),
    );
    expect_ack(
        &send(&mut c, &event(5, "sshd", Action::Unban, ip), NOW + 2000),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        &send(&mut c, &event(6, "sshd", Action::Ban, ip), NOW + 3000),
        AckStatus::Broadcast,
        Some(4),
    );
    // An IPv4-mapped form is the same address.
    expect_ack(
        &send(
            &mut c,
            &event(7, "sshd", Action::Ban, "::ffff:203.0.113.5"),
            NOW + 3000,
        ),
        AckStatus::Unchanged,
        None,
    );
}

#[test]
fn unban_of_unknown_is_broadcast() {
    let mut c = core();
    expect_ack(
        &send(&mut c, &event(1, "sshd", Action::Unban, "203.0.113.5"), NOW),
        AckStatus::Broadcast,
        Some(1),
    );
    // ... and is then known unbanned.
    expect_ack(
        &send(&mut c, &event(2, "sshd", Action::Unban, "203.0.113.5"), NOW),
        AckStatus::Unchanged,
        None,
    );
}

#[test]
fn ban_expires_after_ban_time() {
    let mut c = core();
    let ip = "203.0.113.5";
    let t0 = NOW;
    let ban_ms = 600_000;
    expect_ack(
        &send(&mut c, &event(1, "sshd", Action::Ban, ip), t0),
        AckStatus::Broadcast,
        Some(1),
    );
    // An echo does not extend the ban.
    expect_ack(
        &send(&mut c, &event(2, "sshd", Action::Ban, ip), t0 + ban_ms - 1),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        &send(&mut c, &event(3, "sshd", Action::Ban, ip), t0 + ban_ms),
        AckStatus::Broadcast,
        Some(2),
    );
    // After that ban expired too, an unban is of an unknown state: broadcast.
    expect_ack(
        &send(
            &mut c,
            &event(4, "sshd", Action::Unban, ip),
            t0 + 3 * ban_ms,
        ),
        AckStatus::Broadcast,
        Some(3),
    );
    // And the expired entries were pruned from memory.
    assert_eq!(c.memory_len().1, 1);
}

#[test]
fn clock_going_backwards_is_harmless() {
    let mut c = core();
    let ip = "203.0.113.5";
    expect_ack(
        &send(&mut c, &event(1, "sshd", Action::Ban, ip), NOW),
        AckStatus::Broadcast,
        Some(1),
    );
    expect_ack(
        &send(&mut c, &event(2, "sshd", Action::Ban, ip), NOW - 3_600_000),
        AckStatus::Unchanged,
        None,
    );
}

/// A valid report as JSON, to be broken field by field.
fn report_json() -> Value {
    serde_json::from_slice(&report(&event(0x1234, "sshd", Action::Ban, "203.0.113.5"))).unwrap()
}

fn with_event_field(field: &str, value: Value) -> Vec<u8> {
    let mut v = report_json();
    v["event"][field] = value;
    serde_json::to_vec(&v).unwrap()
}

fn with_field(field: &str, value: Value) -> Vec<u8> {
    let mut v = report_json();
    v[field] = value;
    serde_json::to_vec(&v).unwrap()
}

fn without_event_field(field: &str) -> Vec<u8> {
    let mut v = report_json();
    v["event"].as_object_mut().unwrap().remove(field);
    serde_json::to_vec(&v).unwrap()
}

/// Every invalid input the publisher can meet from a well-meaning or hostile peer,
/// with the reason it must be refused with.
fn invalid_requests() -> Vec<(String, Vec<Vec<u8>>, NakReason)> {
    let one = |name: &str, bytes: Vec<u8>, reason| (name.to_owned(), vec![bytes], reason);
    let valid = serde_json::to_vec(&report_json()).unwrap();
    let mut cases = vec![
        one(
            "json truncated",
            valid[..valid.len() - 1].to_vec(),
            NakReason::Malformed,
        ),
        one(
            "no version",
            br#"{"type":"report"}"#.to_vec(),
            NakReason::Malformed,
        ),
        one(
            "version wrong type",
            with_field("v", json!("1")),
            NakReason::Malformed,
        ),
        one(
            "event not an object",
            with_field("event", json!([])),
            NakReason::Malformed,
        ),
        one(
            "event missing",
            with_field("event", Value::Null),
            NakReason::Malformed,
        ),
        one(
            "node missing",
            without_event_field("node"),
            NakReason::Malformed,
        ),
        one(
            "time_ms a string",
            with_event_field("time_ms", json!("yesterday")),
            NakReason::Malformed,
        ),
        one(
            "time_ms negative",
            with_event_field("time_ms", json!(-1)),
            NakReason::Malformed,
        ),
        one(
            "time_ms float",
            with_event_field("time_ms", json!(1.5)),
            NakReason::Malformed,
        ),
        one(
            "too large",
            {
                let mut v = report_json();
                v["padding"] = json!("x".repeat(MAX_MESSAGE_SIZE));
                serde_json::to_vec(&v).unwrap()
            },
            NakReason::TooLarge,
        ),
        one(
            "version 2",
            with_field("v", json!(2)),
            NakReason::UnsupportedVersion,
        ),
        one(
            "unknown type",
            with_field("type", json!("launch")),
            NakReason::UnknownType,
        ),
        one(
            "reply as request",
            with_field("type", json!("ack")),
            NakReason::UnknownType,
        ),
        one(
            "bad node",
            with_event_field("node", json!("web_1")),
            NakReason::InvalidNode,
        ),
        one(
            "empty node",
            with_event_field("node", json!("")),
            NakReason::InvalidNode,
        ),
        one(
            "bad jail",
            with_event_field("jail", json!("ss hd")),
            NakReason::InvalidJail,
        ),
        one(
            "jail with control character",
            with_event_field("jail", json!("sshd\u{1b}[31m")),
            NakReason::InvalidJail,
        ),
        one(
            "long jail",
            with_event_field("jail", json!("j".repeat(65))),
            NakReason::InvalidJail,
        ),
        one(
            "cidr",
            with_event_field("ip", json!("1.2.3.0/24")),
            NakReason::InvalidIp,
        ),
        one(
            "not an ip",
            with_event_field("ip", json!("not_an_ip")),
            NakReason::InvalidIp,
        ),
        one(
            "leading space ip",
            with_event_field("ip", json!(" 192.0.2.10")),
            NakReason::InvalidIp,
        ),
        one(
            "bad action",
            with_event_field("action", json!("drop")),
            NakReason::InvalidAction,
        ),
        one(
            "bad id",
            with_event_field("id", json!("nope")),
            NakReason::InvalidId,
        ),
        one(
            "time zero",
            with_event_field("time_ms", json!(0)),
            NakReason::InvalidTime,
        ),
        one(
            "time beyond 2^53",
            with_event_field("time_ms", json!(MAX_SAFE_INTEGER + 1)),
            NakReason::InvalidTime,
        ),
        one(
            "time more than a day ahead",
            with_event_field("time_ms", json!(NOW + 86_400_000 + 1)),
            NakReason::InvalidTime,
        ),
    ];
    cases.push((
        "too many frames".into(),
        vec![valid.clone(); MAX_FRAMES + 1],
        NakReason::Malformed,
    ));
    cases.push(("no frames".into(), vec![], NakReason::Malformed));
    for ip in [
        "0.0.0.0",
        "0.1.2.3",
        "127.0.0.1",
        "127.255.0.9",
        "169.254.1.1",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "ff02::1",
        "fe80::1",
        "febf::1",
    ] {
        cases.push(one(
            &format!("reserved {ip}"),
            with_event_field("ip", json!(ip)),
            NakReason::Forbidden,
        ));
    }
    cases
}

#[test]
fn every_invalid_request_is_naked_with_its_reason() {
    let mut c = core();
    let mut seen = HashSet::new();
    for (name, frames, reason) in invalid_requests() {
        let before = (c.last_seq(), c.memory_len());
        let out = c.handle(&frames, PEER, NOW);
        let nak = expect_nak(&out, reason);
        // A NAK changes nothing.
        assert_eq!((c.last_seq(), c.memory_len()), before, "{name}");
        // The NAK names the event whenever its id is readable.
        let readable = frames.first().and_then(|f| Request::peek_event_id(f));
        assert_eq!(nak.id, readable, "{name}");
        seen.insert(reason);
    }
    // Every reason is exercised, here or (authentication, rate limits and the
    // quarantine) in `every_trust_and_guard_refusal_is_naked_with_its_reason`, or
    // said here not to be produced by a request alone.
    let not_yet = [
        NakReason::Unauthenticated,
        NakReason::Replayed,
        NakReason::RateLimited,
        NakReason::Quarantined,
        NakReason::Busy,
    ];
    for reason in NakReason::ALL {
        assert!(
            seen.contains(&reason) || not_yet.contains(&reason),
            "no test refuses a request with {reason}"
        );
    }
}

#[test]
fn nak_names_the_event_and_forbidden_says_why() {
    let mut c = core();
    let out = send(&mut c, &event(9, "sshd", Action::Ban, "127.0.0.1"), NOW);
    let nak = expect_nak(&out, NakReason::Forbidden);
    assert_eq!(nak.id, Some(EventId::from_u128(9)));
    assert!(nak.detail.contains("loopback"), "{}", nak.detail);
    let out = c.handle(&[with_event_field("jail", json!("a b"))], PEER, NOW);
    assert_eq!(
        expect_nak(&out, NakReason::InvalidJail).id,
        Some(EventId::from_u128(0x1234))
    );
}

#[test]
fn extra_frames_after_the_auth_frame_up_to_the_limit_are_ignored() {
    let mut c = trusted_core("");
    let e = event(1, "sshd", Action::Ban, "203.0.113.5");
    let mut frames = signed(&e, WEB1, NOW, 1);
    frames.extend(std::iter::repeat_n(b"reserved".to_vec(), MAX_FRAMES - 2));
    expect_ack(&c.handle(&frames, PEER, NOW), AckStatus::Broadcast, Some(1));
}

#[test]
fn time_limits() {
    let mut c = core();
    let mut e = event(1, "sshd", Action::Ban, "203.0.113.5");
    e.time_ms = NOW + 86_400_000;
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(1));
    // A backlog from long ago is fine.
    let mut old = event(2, "sshd", Action::Ban, "203.0.113.6");
    old.time_ms = 1;
    expect_ack(&send(&mut c, &old, NOW), AckStatus::Broadcast, Some(2));
    // The limit is on the publisher's clock, not the wall clock of the test.
    let mut ahead = event(3, "sshd", Action::Ban, "203.0.113.7");
    ahead.time_ms = NOW + 86_400_001;
    expect_nak(&send(&mut c, &ahead, NOW), NakReason::InvalidTime);
}

#[test]
fn reserved_ranges() {
    for ip in [
        "10.0.0.1",
        "192.168.1.1",
        "1.1.1.1",
        "223.255.255.255",
        "255.255.255.254",
        "2001:db8::1",
        "fec0::1",
        "fe7f::1",
        "::ffff:203.0.113.5",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(reserved(f2b_proto::canonical_ip(ip)), None, "{ip}");
    }
}

#[test]
fn memory_stays_bounded() {
    let limits = Limits {
        recent_ids: 50,
        cluster_states: 30,
        ..Limits::default()
    };
    let mut c = core_with(1, Duration::from_secs(3600), limits);
    for n in 0..2000u32 {
        let ip = std::net::Ipv4Addr::from(0xCB00_7100 + n).to_string();
        let action = if n % 3 == 0 {
            Action::Unban
        } else {
            Action::Ban
        };
        let out = send(&mut c, &event(u128::from(n) + 1, "sshd", action, &ip), NOW);
        expect_ack(&out, AckStatus::Broadcast, Some(u64::from(n) + 1));
        let (ids, states) = c.memory_len();
        assert!(ids <= 50 && states <= 30, "{ids} ids, {states} states");
    }
    assert_eq!(c.memory_len(), (50, 30));
    // The oldest are forgotten: a resend of event 1 is broadcast again, the last
    // one is still a duplicate.
    let first = event(1, "sshd", Action::Unban, "203.0.113.0");
    expect_ack(&send(&mut c, &first, NOW), AckStatus::Broadcast, Some(2001));
    let last_ip = std::net::Ipv4Addr::from(0xCB00_7100u32 + 1999).to_string();
    let last = event(2000, "sshd", Action::Ban, &last_ip);
    expect_ack(&send(&mut c, &last, NOW), AckStatus::Duplicate, Some(2000));
}

/// Bytes that can never appear in valid JSON text at any position: control
/// characters other than white space, and bytes that never occur in UTF-8.
const POISON: &[u8] = &[
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0b, 0x0c, 0x0e, 0x0f, 0x10, 0x1b, 0x1f,
    0xc0, 0xc1, 0xf5, 0xf8, 0xfe, 0xff,
];

/// Bad values to put in a valid report's fields.
fn bad_values() -> Vec<(&'static str, Value)> {
    vec![
        ("v", json!(0)),
        ("v", json!(-1)),
        ("v", json!("one")),
        ("v", json!(null)),
        ("type", json!(null)),
        ("type", json!("Report")),
        ("type", json!(7)),
        ("event", json!("x")),
        ("event", json!({})),
        ("event.id", json!(12)),
        ("event.id", json!("6f9619ff8b86d011b42d00cf4fc964ff")),
        ("event.node", json!("-web")),
        ("event.node", json!({"a": 1})),
        ("event.jail", json!("")),
        ("event.jail", json!("[x]")),
        ("event.action", json!("BAN")),
        ("event.action", json!(true)),
        ("event.ip", json!("fe80::1%eth0")),
        ("event.ip", json!("224.0.0.251")),
        ("event.ip", json!("::")),
        ("event.ip", json!("010.1.1.1")),
        ("event.ip", json!(3_405_803_781u64)),
        ("event.time_ms", json!(0)),
        ("event.time_ms", json!(u64::MAX)),
        ("event.time_ms", json!(NOW + 2 * 86_400_000)),
        ("event.time_ms", json!([1])),
    ]
}

/// A seeded fuzzer: random bytes, random frame counts, and valid reports broken in
/// ways that must make them invalid (poison bytes inserted or overwritten,
/// truncation, bad field values). Every one must be NAKed and none broadcast.
/// Then arbitrary byte flips, which may leave a report valid: those must be
/// answered exactly as `Request::decode` and the rules say, and never panic.
#[test]
fn fuzz_invalid_input_is_always_naked_never_broadcast() {
    let mut rng = fastrand::Rng::with_seed(0x5eed_f2b0);
    let mut c = core_with(3, BAN_TIME, Limits::default());
    let valid = report(&event(0xabc, "sshd", Action::Ban, "203.0.113.5"));
    let bad = bad_values();
    let mut naks = 0;
    for round in 0..20_000 {
        let frames: Vec<Vec<u8>> = match round % 6 {
            0 => {
                let len = rng.usize(0..600);
                vec![std::iter::repeat_with(|| rng.u8(..)).take(len).collect()]
            }
            1 => {
                let mut b = valid.clone();
                let at = rng.usize(0..=b.len());
                b.insert(at, POISON[rng.usize(..POISON.len())]);
                vec![b]
            }
            2 => {
                let mut b = valid.clone();
                let at = rng.usize(0..b.len());
                b[at] = POISON[rng.usize(..POISON.len())];
                vec![b]
            }
            3 => vec![valid[..rng.usize(0..valid.len())].to_vec()],
            4 => {
                let (field, value) = &bad[rng.usize(..bad.len())];
                let mut v = report_json();
                v["event"]["id"] = json!(EventId::from_u128(rng.u128(..)).to_string());
                match field.strip_prefix("event.") {
                    Some(f) => v["event"][f] = value.clone(),
                    None => v[*field] = value.clone(),
                }
                vec![serde_json::to_vec(&v).unwrap()]
            }
            _ => {
                let n = rng.usize(MAX_FRAMES + 1..MAX_FRAMES + 20);
                (0..n).map(|_| valid.clone()).collect()
            }
        };
        let out = c.handle(&frames, PEER, NOW);
        assert!(
            out.reply.is_refusal() && out.broadcast().is_none(),
            "round {round}: {:?} -> {out:?}",
            frames
                .iter()
                .map(|f| String::from_utf8_lossy(f))
                .collect::<Vec<_>>()
        );
        naks += 1;
    }
    assert_eq!(c.last_seq(), 0);
    assert_eq!(c.memory_len(), (0, 0));

    // Arbitrary mutations: valid or not, the answer is the rules' answer.
    for round in 0..5_000 {
        let mut b = valid.clone();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(0..b.len());
            b[at] = rng.u8(..);
        }
        let out = c.handle(&[&b], PEER, NOW);
        if f2b_proto::legacy::is_legacy(&b) {
            // Legacy is off: the old publisher's refusal.
            assert_eq!(out.reply, Response::Legacy("NAK".into()), "round {round}");
            naks += 1;
            continue;
        }
        match Request::decode(&b) {
            Err(err) => {
                expect_nak(&out, err.nak_reason());
                naks += 1;
            }
            Ok(Request::Report(e)) => match &out.reply {
                Response::Reply(Reply::Ack(a)) => assert_eq!(a.id, e.id, "round {round}"),
                Response::Reply(Reply::Nak(n)) => assert!(
                    matches!(n.reason, NakReason::Forbidden | NakReason::InvalidTime),
                    "round {round}: {n:?}"
                ),
                other => panic!("round {round}: {other:?}"),
            },
            Ok(other) => panic!("round {round}: unexpected request {other:?}"),
        }
    }
    assert!(naks > 20_000);
}

// ---------------------------------------------------------------------------
// fail2ban-zmq-tools requests.

fn legacy_core(token: Option<&str>) -> Core {
    core().with_legacy(Some(LegacyPeer {
        token: token.map(f2b_common::config::Secret::new),
    }))
}

fn legacy_send(c: &mut Core, text: &[u8]) -> Outcome {
    c.handle(&[text], PEER, NOW)
}

const NAK_TEXT: &str = "NAK";

fn expect_legacy_nak(out: &Outcome) {
    assert_eq!(out.reply, Response::Legacy(NAK_TEXT.into()), "{out:?}");
    assert_eq!(out.reply.encode(), b"NAK");
    assert!(out.reply.is_refusal());
    assert!(out.broadcast().is_none() && out.legacy_broadcast().is_none());
}

/// Asserts the exact echo, and returns the broadcast event if there is one.
fn expect_echo(out: &Outcome, echo: &str) -> Option<Sequenced> {
    assert_eq!(out.reply, Response::Legacy(echo.into()), "{out:?}");
    assert_eq!(out.reply.encode(), echo.as_bytes());
    assert!(!out.reply.is_refusal());
    match out.broadcast() {
        Some(Broadcast::Event(s)) => Some(s.clone()),
        Some(other) => panic!("{other:?}"),
        None => {
            assert!(out.legacy_broadcast().is_none());
            None
        }
    }
}

#[test]
fn legacy_requests_are_refused_with_nak_when_legacy_is_off() {
    let mut c = core();
    for text in [
        &b"web1|sshd|Ban|203.0.113.5"[..],
        b"secret|web1|sshd|Ban|203.0.113.5",
        b"[1,2,3]",
        b"\x00\xff\xfe garbage",
        "[".repeat(5000).as_bytes(),
    ] {
        expect_legacy_nak(&legacy_send(&mut c, text));
    }
    assert_eq!((c.last_seq(), c.memory_len()), (0, (0, 0)));
}

/// An empty or blank frame cannot be a fail2ban-zmq-tools message (it has at least
/// `h|j|a|i`): it is answered with a native `malformed` NAK, legacy on or off.
#[test]
fn an_empty_or_blank_frame_is_a_native_malformed_nak() {
    for mut c in [core(), legacy_core(None), legacy_core(Some("s3cret"))] {
        for text in [&b""[..], b" ", b"\n", b" \t\r\n "] {
            let out = legacy_send(&mut c, text);
            assert!(
                matches!(out.reply, Response::Reply(Reply::Nak(_))),
                "{text:?}: {out:?}"
            );
            expect_nak(&out, NakReason::Malformed);
            // What goes on the wire is a JSON NAK, not the bare string.
            let bytes = out.reply.encode();
            assert!(
                matches!(Reply::decode(&bytes), Ok(Reply::Nak(_))),
                "{bytes:?}"
            );
        }
        // No frame at all is one too.
        expect_nak(&c.handle::<&[u8]>(&[], PEER, NOW), NakReason::Malformed);
        assert_eq!((c.last_seq(), c.memory_len()), (0, (0, 0)));
    }
}

#[test]
fn a_legacy_ban_is_echoed_and_broadcast_natively_and_in_legacy_form() {
    let mut c = legacy_core(None);
    let wire = "web1|sshd|Ban|203.0.113.5";
    let s = expect_echo(&legacy_send(&mut c, wire.as_bytes()), wire).unwrap();
    assert_eq!((s.seq, s.epoch), (1, Epoch(0xfeed)));
    let e = &s.event;
    assert_eq!(
        (
            e.node.as_str(),
            e.jail.as_str(),
            e.action,
            e.ip.to_string(),
            e.time_ms
        ),
        ("web1", "sshd", Action::Ban, "203.0.113.5".into(), NOW)
    );
    let out = legacy_send(&mut c, b"Web2.Example.org.|sshd|UnBan|203.0.113.5");
    assert_eq!(
        out.legacy_broadcast(),
        Some("Web2.Example.org.|sshd|UnBan|203.0.113.5"),
        "the old publisher rebroadcast the same string"
    );
    let s = expect_echo(&out, "Web2.Example.org.|sshd|UnBan|203.0.113.5").unwrap();
    assert_eq!(
        (s.seq, s.event.node.as_str(), s.event.action),
        (2, "web2.example.org", Action::Unban)
    );
    // Short forms are read as inet_aton reads them; the native event is canonical.
    let s = expect_echo(
        &legacy_send(&mut c, b"web1|sshd|ban|10.1"),
        "web1|sshd|ban|10.1",
    )
    .unwrap();
    assert_eq!(s.event.ip.to_string(), "10.0.0.1");
    // Each accepted legacy report got its own new id.
    assert_eq!(c.memory_len().0, 3);
    // The ledger says where they came from.
    let mut origins = Vec::new();
    c.ledger.for_each(|r| origins.push(r.legacy)).unwrap();
    assert_eq!(origins, [true, true, true]);
}

/// Without a legacy PUB socket (the server says so), broadcasts carry no text
/// for old subscribers: nothing would send it.
#[test]
fn without_legacy_subscribers_no_legacy_text_is_made() {
    let mut c = legacy_core(None).with_legacy_broadcast(false);
    let wire = "web1|sshd|Ban|203.0.113.5";
    let out = legacy_send(&mut c, wire.as_bytes());
    expect_echo(&out, wire).unwrap();
    assert_eq!(out.legacy_broadcast(), None);
    let e = event(1, "sshd", Action::Ban, "203.0.113.6");
    let out = send(&mut c, &e, NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(2));
    assert_eq!(out.legacy_broadcast(), None);
    // With it (the default), the same events carry their text.
    let mut c = legacy_core(None);
    let out = legacy_send(&mut c, wire.as_bytes());
    assert_eq!(out.legacy_broadcast(), Some(wire));
    let out = send(&mut c, &e, NOW);
    assert_eq!(out.legacy_broadcast(), Some("web1|sshd|Ban|203.0.113.6"));
}

#[test]
fn legacy_five_fields_without_a_token_echo_the_whole_message() {
    let mut c = legacy_core(None);
    let wire = "web1|sshd|Ban|203.0.113.6|whatever";
    let out = legacy_send(&mut c, wire.as_bytes());
    assert_eq!(out.legacy_broadcast(), Some(wire));
    let s = expect_echo(&out, wire).unwrap();
    assert_eq!(s.event.ip.to_string(), "203.0.113.6");
}

#[test]
fn legacy_token_is_required_checked_and_never_echoed() {
    let mut c = legacy_core(Some("s3cret"));
    let out = legacy_send(&mut c, b"s3cret|web1|sshd|Ban|203.0.113.7");
    assert_eq!(out.legacy_broadcast(), Some("web1|sshd|Ban|203.0.113.7"));
    expect_echo(&out, "web1|sshd|Ban|203.0.113.7").unwrap();
    for bad in [
        &b"web1|sshd|Ban|203.0.113.8"[..],
        b"wrong!|web1|sshd|Ban|203.0.113.8",
        b"s3cre|web1|sshd|Ban|203.0.113.8",
        b"|web1|sshd|Ban|203.0.113.8",
        b"s3cret|web1|sshd|Ban|203.0.113.8|x",
    ] {
        expect_legacy_nak(&legacy_send(&mut c, bad));
    }
    assert_eq!(c.last_seq(), 1);
}

#[test]
fn every_invalid_legacy_request_is_answered_nak() {
    let label = "a".repeat(63);
    let host_255 = [&label[..], &label, &label, &label].join(".");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("3 fields", b"web1|sshd|Ban".to_vec()),
        ("6 fields", b"web1|sshd|Ban|203.0.113.5|a|b".to_vec()),
        ("empty host", b"|sshd|Ban|203.0.113.5".to_vec()),
        ("hyphen host", b"-web1|sshd|Ban|203.0.113.5".to_vec()),
        ("underscore host", b"web_1|sshd|Ban|203.0.113.5".to_vec()),
        ("jail with space", b"web1|ss hd|Ban|203.0.113.5".to_vec()),
        ("jail with dot", b"web1|ss.hd|Ban|203.0.113.5".to_vec()),
        ("action", b"web1|sshd|Drop|203.0.113.5".to_vec()),
        ("IPv6", b"web1|sshd|Ban|2001:db8::1".to_vec()),
        ("host name as ip", b"web1|sshd|Ban|example.org".to_vec()),
        ("not UTF-8", b"web1|sshd|Ban|\xff".to_vec()),
        // Valid in the old format, impossible natively.
        ("empty jail", b"web1||Ban|203.0.113.5".to_vec()),
        (
            "65-byte jail",
            format!("web1|{}|Ban|203.0.113.5", "j".repeat(65)).into_bytes(),
        ),
        (
            "255-byte host",
            format!("{host_255}|sshd|Ban|203.0.113.5").into_bytes(),
        ),
        // The native rules apply after conversion.
        ("loopback short form", b"web1|sshd|Ban|127.1".to_vec()),
        ("zero", b"web1|sshd|Ban|0".to_vec()),
        ("broadcast", b"web1|sshd|Ban|255.255.255.255".to_vec()),
    ];
    let mut c = legacy_core(None);
    for (name, bytes) in &cases {
        let out = legacy_send(&mut c, bytes);
        assert_eq!(out.reply, Response::Legacy("NAK".into()), "{name}");
        assert!(out.broadcast().is_none(), "{name}");
    }
    // A legacy request has one frame.
    let two = [b"web1|sshd|Ban|203.0.113.5".to_vec(), b"more".to_vec()];
    expect_legacy_nak(&c.handle(&two, PEER, NOW));
    assert_eq!((c.last_seq(), c.memory_len()), (0, (0, 0)));
}

#[test]
fn legacy_duplicates_of_the_cluster_state_are_echoed_not_broadcast() {
    let mut c = legacy_core(None);
    let wire = "web1|sshd|Ban|203.0.113.5";
    expect_echo(&legacy_send(&mut c, wire.as_bytes()), wire).unwrap();
    // The old monitor resending, or the echo of a remote ban on another node.
    assert!(expect_echo(&legacy_send(&mut c, wire.as_bytes()), wire).is_none());
    assert!(expect_echo(
        &legacy_send(&mut c, b"web2|sshd|Ban|203.0.113.5"),
        "web2|sshd|Ban|203.0.113.5"
    )
    .is_none());
    // A native report of the same state is unchanged too, and the other way round.
    expect_ack(
        &send(&mut c, &event(1, "sshd", Action::Ban, "203.0.113.5"), NOW),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        &send(&mut c, &event(2, "nginx", Action::Ban, "203.0.113.9"), NOW),
        AckStatus::Broadcast,
        Some(2),
    );
    assert!(expect_echo(
        &legacy_send(&mut c, b"web3|nginx|Ban|203.0.113.9"),
        "web3|nginx|Ban|203.0.113.9"
    )
    .is_none());
    assert_eq!(c.last_seq(), 2);
}

#[test]
fn native_events_have_a_legacy_form_when_the_old_format_can_carry_them() {
    let mut c = core();
    let out = send(&mut c, &event(1, "sshd", Action::Ban, "203.0.113.5"), NOW);
    assert_eq!(out.legacy_broadcast(), Some("web1|sshd|Ban|203.0.113.5"));
    let out = send(&mut c, &event(2, "sshd", Action::Unban, "203.0.113.5"), NOW);
    assert_eq!(out.legacy_broadcast(), Some("web1|sshd|Unban|203.0.113.5"));
    let out = send(&mut c, &event(3, "sshd", Action::Ban, "2001:db8::5"), NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(3));
    assert_eq!(out.legacy_broadcast(), None);
    let out = send(&mut c, &event(4, "a.b", Action::Ban, "203.0.113.5"), NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(4));
    assert_eq!(out.legacy_broadcast(), None);
}

/// Legacy on, hostile text: never a panic; the answer is NAK or the exact echo
/// `f2b_proto::legacy::parse` allows.
#[test]
fn fuzz_legacy_requests() {
    let mut rng = fastrand::Rng::with_seed(0x001e_9ac7);
    let mut c = legacy_core(None);
    let base = b"web1.example.org|sshd-ddos|UnBan|10.20.30.40".to_vec();
    let alphabet = b"|.-_ab09xX:{}\xff\x00 \n";
    let mut echoes = 0;
    for round in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..rng.usize(1..5) {
            match rng.u8(0..3) {
                0 if !b.is_empty() => {
                    let at = rng.usize(0..b.len());
                    b[at] = alphabet[rng.usize(..alphabet.len())];
                }
                1 => {
                    let at = rng.usize(0..=b.len());
                    b.insert(at, alphabet[rng.usize(..alphabet.len())]);
                }
                _ if !b.is_empty() => {
                    b.remove(rng.usize(0..b.len()));
                }
                _ => {}
            }
        }
        let out = c.handle(&[&b], PEER, NOW + round);
        match &out.reply {
            Response::Legacy(t) if t == "NAK" => assert!(out.broadcast().is_none()),
            Response::Legacy(t) => {
                let msg = f2b_proto::legacy::parse(&b, None).expect("echoed a refused message");
                assert_eq!(t, &msg.wire, "round {round}");
                echoes += 1;
            }
            // A mutation that made it start with `{` is a native request.
            other => assert!(!f2b_proto::legacy::is_legacy(&b), "{other:?}"),
        }
    }
    assert!(echoes > 100, "{echoes} echoes");
}

// ---------------------------------------------------------------------------
// The ledger behind the core.

#[test]
fn a_failed_ledger_write_is_busy_and_consumes_nothing() {
    let mut c = legacy_core(None);
    c.ledger.fail_writes(true);
    let e = event(1, "sshd", Action::Ban, "203.0.113.5");
    expect_nak(&send(&mut c, &e, NOW), NakReason::Busy);
    expect_legacy_nak(&legacy_send(&mut c, b"web1|sshd|Ban|203.0.113.6"));
    assert_eq!((c.last_seq(), c.memory_len()), (0, (0, 0)));
    c.ledger.fail_writes(false);
    // The resend goes through with the first sequence number.
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(1));
}

#[test]
fn state_and_duplicates_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now| {
        Core::new(
            Ledger::open(dir.path()).unwrap(),
            BAN_TIME,
            Limits::default(),
            now,
        )
        .unwrap()
    };
    let mut c = open(NOW);
    let epoch = c.epoch();
    let ban = event(1, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(1));
    let unban = event(2, "nginx", Action::Unban, "203.0.113.6");
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(2));
    drop(c);

    let mut c = open(NOW + 1000);
    assert_eq!((c.epoch(), c.last_seq()), (epoch, 2));
    // A resend after the restart is still a duplicate, with its seq (broadcast
    // again once: this process cannot know that the last one did).
    assert_eq!(
        rebroadcast(&send(&mut c, &ban, NOW + 1000), 1),
        Some((1, ban.clone()))
    );
    expect_ack(
        &send(&mut c, &ban, NOW + 1000),
        AckStatus::Duplicate,
        Some(1),
    );
    // The echo of the ban, and a repeated unban, are still unchanged.
    expect_ack(
        &send(
            &mut c,
            &event(3, "sshd", Action::Ban, "203.0.113.5"),
            NOW + 1000,
        ),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        &send(
            &mut c,
            &event(4, "nginx", Action::Unban, "203.0.113.6"),
            NOW + 1000,
        ),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        &send(
            &mut c,
            &event(5, "sshd", Action::Unban, "203.0.113.5"),
            NOW + 1000,
        ),
        AckStatus::Broadcast,
        Some(3),
    );
    drop(c);

    // Once the ban time passed, the reopened core holds nothing any more.
    let later = NOW + 1000 + BAN_TIME.as_millis() as u64;
    let mut c = open(later);
    assert_eq!(c.memory_len().1, 0);
    c.prune(later, 100).unwrap();
    assert_eq!(c.ledger().rows().unwrap(), 0);
    expect_ack(
        &send(&mut c, &event(6, "sshd", Action::Ban, "203.0.113.5"), later),
        AckStatus::Broadcast,
        Some(4),
    );
}

#[test]
fn snapshot_requests_are_answered_from_the_ledger() {
    let mut c = core();
    for n in 1..=3u8 {
        let ip = format!("203.0.113.{n}");
        expect_ack(
            &send(&mut c, &event(n.into(), "sshd", Action::Ban, &ip), NOW),
            AckStatus::Broadcast,
            Some(n.into()),
        );
    }
    expect_ack(
        &send(&mut c, &event(9, "sshd", Action::Unban, "203.0.113.2"), NOW),
        AckStatus::Broadcast,
        Some(4),
    );
    let req = Request::Snapshot(SnapshotRequest {
        jails: vec![],
        cursor: None,
        nonce: None,
    })
    .encode();
    let out = c.handle(&[&req], PEER, NOW + 1);
    assert!(out.broadcast().is_none());
    let Response::Snapshot(SnapshotReply::Page(page)) = &out.reply else {
        panic!("{out:?}")
    };
    assert_eq!((page.epoch, page.seq, page.next), (Epoch(0xfeed), 4, None));
    let bans: Vec<(u64, String)> = page
        .bans
        .iter()
        .map(|b| (b.seq, b.event.ip.to_string()))
        .collect();
    assert_eq!(bans, [(1, "203.0.113.1".into()), (3, "203.0.113.3".into())]);
    assert_eq!(page.bans[0].expires_ms, NOW + BAN_TIME.as_millis() as u64);
    assert_eq!(
        page.bans[0].event,
        event(1, "sshd", Action::Ban, "203.0.113.1")
    );
    // The encoded reply decodes as a snapshot page.
    assert_eq!(
        SnapshotReply::decode(&out.reply.encode()).unwrap(),
        SnapshotReply::Page(page.clone())
    );
    // A jail filter and a cursor.
    let req = Request::Snapshot(SnapshotRequest {
        jails: vec![JailName::new("nginx").unwrap()],
        cursor: Some(1),
        nonce: None,
    })
    .encode();
    let Response::Snapshot(SnapshotReply::Page(page)) = c.handle(&[&req], PEER, NOW).reply else {
        panic!()
    };
    assert!(page.bans.is_empty());
    // A broken snapshot request is a native NAK.
    let bad = br#"{"v":1,"type":"snapshot","jails":"sshd"}"#;
    expect_nak(&c.handle(&[&bad[..]], PEER, NOW), NakReason::Malformed);
}

/// The active-ban snapshot of the whole ledger, as one list of (seq, ip).
fn snapshot_bans(c: &mut Core, now: u64) -> Vec<(u64, String)> {
    let mut cursor = None;
    let mut out = Vec::new();
    loop {
        let req = Request::Snapshot(SnapshotRequest {
            jails: vec![],
            cursor,
            nonce: None,
        })
        .encode();
        let Response::Snapshot(SnapshotReply::Page(page)) = c.handle(&[&req], PEER, now).reply
        else {
            panic!("not a snapshot page")
        };
        out.extend(page.bans.iter().map(|b| (b.seq, b.event.ip.to_string())));
        cursor = page.next;
        if cursor.is_none() {
            return out;
        }
    }
}

/// After a restart with another ban_time, a ban in the ledger still ends when its
/// row says (`expires_ms`): deduplication agrees with the snapshot.
#[test]
fn the_rebuilt_state_follows_the_ledgers_expiry_not_the_new_ban_time() {
    let dir = tempfile::tempdir().unwrap();
    let open = |ban_time: Duration, now| {
        Core::new(
            Ledger::open(dir.path()).unwrap(),
            ban_time,
            Limits::default(),
            now,
        )
        .unwrap()
    };
    let mut c = open(BAN_TIME, NOW);
    let ban = event(1, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(1));
    drop(c);

    // ban_time shortened to 1 minute; 2 minutes later the ban (10 minutes) holds.
    let at = NOW + 120_000;
    let mut c = open(Duration::from_secs(60), at);
    assert_eq!(snapshot_bans(&mut c, at), [(1, "203.0.113.5".to_owned())]);
    let echo = event(2, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &echo, at), AckStatus::Unchanged, None);
    drop(c);

    // ban_time lengthened to 1 hour; after the ban's own 10 minutes it is over.
    let at = NOW + BAN_TIME.as_millis() as u64 + 1;
    let mut c = open(Duration::from_secs(3600), at);
    assert_eq!(snapshot_bans(&mut c, at), []);
    let again = event(3, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(&send(&mut c, &again, at), AckStatus::Broadcast, Some(2));
}

/// The event an outcome broadcasts again, for a duplicate: (seq, event).
fn rebroadcast(out: &Outcome, seq: u64) -> Option<(u64, Event)> {
    match &out.reply {
        Response::Reply(Reply::Ack(a)) => {
            assert_eq!(
                (a.status, a.seq),
                (AckStatus::Duplicate, Some(seq)),
                "{out:?}"
            );
        }
        other => panic!("expected a duplicate, got {other:?}"),
    }
    match out.broadcast() {
        Some(Broadcast::Event(s)) => Some((s.seq, s.event.clone())),
        Some(other) => panic!("{other:?}"),
        None => {
            assert!(out.legacy_broadcast().is_none(), "{out:?}");
            None
        }
    }
}

/// A publisher that crashed after committing an event but before broadcasting
/// it: the monitor's resend (same id) after the restart is a duplicate, and the
/// ledger's row is broadcast again with its original seq, once per run.
#[test]
fn a_duplicate_from_before_a_restart_is_broadcast_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now| {
        Core::new(
            Ledger::open(dir.path()).unwrap(),
            BAN_TIME,
            Limits::default(),
            now,
        )
        .unwrap()
    };
    let mut c = open(NOW);
    let epoch = c.epoch();
    let ban = event(1, "sshd", Action::Ban, "203.0.113.5");
    let unban = event(2, "nginx", Action::Unban, "203.0.113.6");
    // Committed; the outcomes (the broadcasts) are lost with the process.
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(1));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(2));
    // In the run that broadcast it, a duplicate is not broadcast again.
    assert_eq!(rebroadcast(&send(&mut c, &ban, NOW), 1), None);
    drop(c);

    let at = NOW + 1000;
    let mut c = open(at);
    let out = send(&mut c, &ban, at);
    assert_eq!(rebroadcast(&out, 1), Some((1, ban.clone())));
    assert_eq!(
        out.broadcast().unwrap(),
        &Broadcast::Event(Sequenced {
            seq: 1,
            epoch,
            event: ban.clone()
        })
    );
    assert_eq!(out.legacy_broadcast(), Some("web1|sshd|Ban|203.0.113.5"));
    // Once: the next resend is a plain duplicate.
    assert_eq!(rebroadcast(&send(&mut c, &ban, at), 1), None);
    // What goes out is the ledger's event, whatever the resend carries.
    let mut changed = unban.clone();
    changed.ip = "198.51.100.1".parse().unwrap();
    assert_eq!(
        rebroadcast(&send(&mut c, &changed, at), 2),
        Some((2, unban.clone()))
    );
    // Nothing new was sequenced.
    assert_eq!(c.last_seq(), 2);
}

/// A duplicate from before the restart whose row no longer describes the
/// cluster's state is not broadcast again: a later event of the same (jail,
/// address) superseded it, or the ban expired.
#[test]
fn a_stale_duplicate_from_before_a_restart_is_not_broadcast_again() {
    let dir = tempfile::tempdir().unwrap();
    let open = |now| {
        Core::new(
            Ledger::open(dir.path()).unwrap(),
            BAN_TIME,
            Limits::default(),
            now,
        )
        .unwrap()
    };
    let mut c = open(NOW);
    let ban = event(1, "sshd", Action::Ban, "203.0.113.5");
    let unban = event(2, "sshd", Action::Unban, "203.0.113.5");
    let other = event(3, "sshd", Action::Ban, "203.0.113.7");
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(1));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(2));
    expect_ack(&send(&mut c, &other, NOW), AckStatus::Broadcast, Some(3));
    drop(c);

    let mut c = open(NOW + 1000);
    // The ban was lifted since: broadcasting it again would ban it anew.
    assert_eq!(rebroadcast(&send(&mut c, &ban, NOW + 1000), 1), None);
    assert_eq!(
        rebroadcast(&send(&mut c, &unban, NOW + 1000), 2),
        Some((2, unban.clone()))
    );
    drop(c);

    // After the ban's time, an expired ban is not broadcast again either.
    let later = NOW + BAN_TIME.as_millis() as u64;
    let mut c = open(later);
    assert_eq!(rebroadcast(&send(&mut c, &other, later), 3), None);
}

/// A flood of garbage is counted in full but logged at most
/// [`crate::throttle::REJECTED_LINES`] times per reason and second.
#[test]
fn refusals_are_counted_and_their_lines_throttled() {
    let mut c = legacy_core(None);
    for n in 0..1000u64 {
        let now = NOW + n; // one second
        c.handle(&[&b"{garbage"[..]], PEER, now);
        c.handle(&[&b"web1|sshd|Drop|203.0.113.5"[..]], PEER, now);
        send(&mut c, &event(9, "sshd", Action::Ban, "127.0.0.1"), now);
    }
    let counts: Vec<(&str, u64, u64)> = c
        .rejected_counts()
        .into_iter()
        .map(|(r, n)| (r, n.total, n.logged))
        .collect();
    assert_eq!(
        counts,
        [
            ("forbidden", 1000, 10),
            ("legacy_invalid", 1000, 10),
            ("malformed", 1000, 10),
        ]
    );
    // The next second logs again.
    c.handle(&[&b"{garbage"[..]], PEER, NOW + 1000);
    assert_eq!(c.rejected_counts()[2].1.logged, 11);
}

/// The server could not queue a broadcast: the ACK becomes `busy`, and the
/// monitor's resend broadcasts the recorded event with its seq.
#[test]
fn a_broadcast_that_failed_is_refused_busy_and_sent_again_on_the_resend() {
    let mut c = core();
    let e = event(1, "sshd", Action::Ban, "203.0.113.5");
    let out = send(&mut c, &e, NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(1));
    let reply = c.broadcast_failed(out.reply, 0);
    let failed = Outcome {
        reply,
        seal: Seal::None,
        broadcasts: Vec::new(),
    };
    assert_eq!(expect_nak(&failed, NakReason::Busy).id, Some(e.id));
    assert_eq!(rebroadcast(&send(&mut c, &e, NOW), 1), Some((1, e.clone())));
    assert_eq!(rebroadcast(&send(&mut c, &e, NOW), 1), None);
    // Other replies are left alone.
    let nak = Response::Legacy("NAK".into());
    assert_eq!(c.broadcast_failed(nak.clone(), 0), nak);
    assert_eq!(c.last_seq(), 1);
}

/// Rows of the ledger in `dir` as another connection (a crash, a reader) sees
/// them: only what was committed.
fn committed_rows(dir: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join(crate::ledger::LEDGER_FILE)).unwrap();
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap()
}

/// Group commit: the events of a batch become durable together, at
/// `commit_batch`, not one by one.
#[test]
fn a_batch_is_committed_together() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Core::new(
        Ledger::open(dir.path()).unwrap(),
        BAN_TIME,
        Limits::default(),
        NOW,
    )
    .unwrap();
    c.begin_batch().unwrap();
    let a = event(1, "sshd", Action::Ban, "203.0.113.1");
    let b = event(2, "sshd", Action::Ban, "203.0.113.2");
    expect_ack(&send(&mut c, &a, NOW), AckStatus::Broadcast, Some(1));
    expect_ack(&send(&mut c, &b, NOW), AckStatus::Broadcast, Some(2));
    // Later requests of the batch see the earlier ones.
    expect_ack(&send(&mut c, &a, NOW), AckStatus::Duplicate, Some(1));
    let echo = event(3, "sshd", Action::Ban, "203.0.113.2");
    expect_ack(&send(&mut c, &echo, NOW), AckStatus::Unchanged, None);
    assert_eq!(snapshot_bans(&mut c, NOW).len(), 2);
    assert_eq!(committed_rows(dir.path()), 0);
    c.commit_batch(NOW, false).unwrap();
    assert_eq!(committed_rows(dir.path()), 2);
    // Outside a batch, each event is committed on its own.
    let d = event(4, "sshd", Action::Ban, "203.0.113.4");
    expect_ack(&send(&mut c, &d, NOW), AckStatus::Broadcast, Some(3));
    assert_eq!(committed_rows(dir.path()), 3);
}

/// A batch whose commit fails never happened: its sequence numbers are used
/// again, its events are new again, and its replies are sent as `busy`.
#[test]
fn a_failed_batch_commit_undoes_the_batch() {
    let mut c = legacy_core(None);
    let first = event(1, "sshd", Action::Ban, "203.0.113.1");
    expect_ack(&send(&mut c, &first, NOW), AckStatus::Broadcast, Some(1));
    c.begin_batch().unwrap();
    let ban = event(2, "sshd", Action::Ban, "203.0.113.2");
    let unban = event(3, "sshd", Action::Unban, "203.0.113.1");
    let out = send(&mut c, &ban, NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(2));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(3));
    let echo = expect_echo(
        &legacy_send(&mut c, b"web1|sshd|Ban|203.0.113.9"),
        "web1|sshd|Ban|203.0.113.9",
    );
    assert_eq!(echo.unwrap().seq, 4);
    c.ledger.fail_next_commit();
    assert!(c.commit_batch(NOW, false).is_err());
    assert_eq!((c.last_seq(), c.ledger().rows().unwrap()), (1, 1));
    assert_eq!(c.memory_len(), (1, 1));
    // How the server answers the batch's requests.
    let busy = Outcome {
        reply: out.reply.clone().refused_busy(),
        seal: Seal::None,
        broadcasts: Vec::new(),
    };
    assert_eq!(expect_nak(&busy, NakReason::Busy).id, Some(ban.id));
    assert_eq!(
        Response::Legacy("web1|sshd|Ban|203.0.113.9".into()).refused_busy(),
        Response::Legacy("NAK".into())
    );
    let page = Response::Snapshot(SnapshotReply::Page(f2b_proto::SnapshotPage::new(
        Epoch(1),
        4,
    )));
    assert!(matches!(
        page.refused_busy(),
        Response::Snapshot(SnapshotReply::Nak(ref n)) if n.reason == NakReason::Busy
    ));
    let nak = Response::Reply(Reply::Nak(Nak::new(None, NakReason::Malformed, "x")));
    assert_eq!(nak.clone().refused_busy(), nak);
    // The resends are new events again, with the same sequence numbers.
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(2));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(3));
    assert_eq!(c.ledger().rows().unwrap(), 3);
}

/// Commits a ban of 203.0.113.1 (seq 1), opens a batch and decides in it a ban
/// of 203.0.113.2 (seq 2); returns that ban and an unban of 203.0.113.1, not
/// sent yet.
fn open_batch_with_a_ban(c: &mut Core) -> (Event, Event) {
    let first = event(1, "sshd", Action::Ban, "203.0.113.1");
    expect_ack(&send(c, &first, NOW), AckStatus::Broadcast, Some(1));
    c.begin_batch().unwrap();
    let ban = event(2, "sshd", Action::Ban, "203.0.113.2");
    expect_ack(&send(c, &ban, NOW), AckStatus::Broadcast, Some(2));
    (ban, event(3, "sshd", Action::Unban, "203.0.113.1"))
}

/// A batch with an append that fails half-way (a disk error after its row) is
/// undone as a batch whose commit fails: the event before it is new again.
#[test]
fn an_append_failing_half_way_undoes_its_batch() {
    let mut c = core();
    let (ban, unban) = open_batch_with_a_ban(&mut c);
    c.ledger.fail_half_way(true);
    expect_nak(&send(&mut c, &unban, NOW), NakReason::Busy);
    c.ledger.fail_half_way(false);
    // A report after it in the same batch is refused too, and not recorded.
    let later = event(4, "sshd", Action::Ban, "203.0.113.4");
    expect_nak(&send(&mut c, &later, NOW), NakReason::Busy);
    assert!(!c.ledger().may_broadcast_early());
    assert!(c.commit_batch(NOW, false).is_err());
    assert_eq!((c.last_seq(), c.ledger().rows().unwrap()), (1, 1));
    assert_eq!(c.memory_len(), (1, 1));
    // The resends are new events again, with the same sequence numbers.
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(2));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(3));
    expect_ack(&send(&mut c, &later, NOW), AckStatus::Broadcast, Some(4));
    assert_eq!(c.ledger().rows().unwrap(), 4);
}

/// A batch broadcast before its commit, whose commit then fails, is undone too,
/// except its sequence numbers: they went out, so the resends get new ones.
#[test]
fn a_failed_commit_after_the_broadcast_keeps_the_sequence_numbers_used() {
    let mut c = core();
    let (ban, unban) = open_batch_with_a_ban(&mut c);
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(3));
    c.ledger.fail_next_commit();
    assert!(c.commit_batch(NOW, true).is_err());
    assert_eq!((c.last_seq(), c.ledger().rows().unwrap()), (3, 1));
    assert_eq!(c.memory_len(), (1, 1));
    // The resends are new events again (their rows are gone), under new numbers.
    expect_ack(&send(&mut c, &ban, NOW), AckStatus::Broadcast, Some(4));
    expect_ack(&send(&mut c, &unban, NOW), AckStatus::Broadcast, Some(5));
    assert_eq!(c.ledger().rows().unwrap(), 3);
}

/// A start after a stop that did not clear the serving mark skips the numbers a
/// lost batch may have broadcast; a clean stop skips none.
#[test]
fn an_unclean_stop_skips_the_numbers_a_lost_batch_may_have_used() {
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        let mut c = Core::new(
            Ledger::open(dir.path()).unwrap(),
            BAN_TIME,
            Limits::default(),
            NOW,
        )
        .unwrap();
        let skipped = c.start_serving().unwrap();
        (c, skipped)
    };
    let (mut c, skipped) = open();
    assert_eq!((skipped, c.last_seq()), (0, 0));
    let e = event(1, "sshd", Action::Ban, "203.0.113.1");
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(1));
    c.stop_serving().unwrap();
    drop(c);
    // A clean stop: the numbers go on.
    let (mut c, skipped) = open();
    assert_eq!((skipped, c.last_seq()), (0, 1));
    let e = event(2, "sshd", Action::Ban, "203.0.113.2");
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(2));
    // A crash: the mark is left behind.
    drop(c);
    let (mut c, skipped) = open();
    let next = 2 + crate::ledger::EARLY_BROADCAST_MAX;
    assert_eq!(
        (skipped, c.last_seq()),
        (crate::ledger::EARLY_BROADCAST_MAX, next)
    );
    let e = event(3, "sshd", Action::Ban, "203.0.113.3");
    expect_ack(&send(&mut c, &e, NOW), AckStatus::Broadcast, Some(next + 1));
    // The skip itself is durable: another crash right away skips again from there.
    drop(c);
    let (c, _) = open();
    assert_eq!(c.last_seq(), next + 1 + crate::ledger::EARLY_BROADCAST_MAX);
    // Tools that only read the ledger do not mark it.
    drop(c);
    assert_eq!(
        Ledger::open(dir.path()).unwrap().last_seq(),
        next + 1 + crate::ledger::EARLY_BROADCAST_MAX
    );
}

// ---------------------------------------------------------------------------
// Authentication, signatures, the allowlist, rate limits and the quarantine.

const WEB1: &str = "web1-secret-0123456789abcdef0123456789";
const WEB2: &str = "web2-secret-0123456789abcdef0123456789";
const KEY_SEED: [u8; 32] = [7; 32];

/// A configuration with a signing key, credentials for web1 and web2, and the
/// extra lines of `[trust]` and `[publisher]`, read as the daemon reads it.
fn trust_config(trust_extra: &str, publisher_extra: &str) -> f2b_common::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.key");
    std::fs::write(
        &key,
        f2b_proto::auth::SigningKey::from_seed(KEY_SEED).to_file_text(),
    )
    .unwrap();
    let text = format!(
        "[node]\nname = \"hub\"\n[publisher]\n{publisher_extra}\n[trust]\nsigning_key_file = {:?}\n\
         {trust_extra}\n[trust.monitors]\nweb1 = {WEB1:?}\nweb2 = {WEB2:?}\n",
        key.display().to_string()
    );
    f2b_common::config::from_str(&text, std::path::Path::new("t.conf")).unwrap()
}

fn trusted_core_with(trust_extra: &str, publisher_extra: &str) -> Core {
    let cfg = trust_config(trust_extra, publisher_extra);
    core()
        .with_legacy(cfg.publisher.legacy.clone())
        .with_trust(Trust::new(&cfg.trust))
        .with_guard(Guard::new(GuardConfig::new(&cfg.publisher)))
}

fn trusted_core(publisher_extra: &str) -> Core {
    trusted_core_with("", publisher_extra)
}

/// A report of `e` and its auth frame, signed as credential `key` with `secret`.
fn signed_as(e: &Event, key: &str, secret: &str, ts_ms: u64, nonce: u8) -> Vec<Vec<u8>> {
    with_auth(report(e), key, secret, ts_ms, nonce)
}

/// `payload` and its auth frame, signed as credential `key` with `secret`.
fn with_auth(payload: Vec<u8>, key: &str, secret: &str, ts_ms: u64, nonce: u8) -> Vec<Vec<u8>> {
    let auth = f2b_proto::auth::RequestAuth::sign(
        &f2b_proto::auth::MonitorSecret::new(secret).unwrap(),
        &NodeName::new(key).unwrap(),
        ts_ms,
        [nonce; 16],
        &payload,
    );
    vec![payload, auth.encode()]
}

/// [`signed_as`] the event's own node.
/// Whether `reply` (a payload and its MAC frame) is authentic, for a monitor
/// holding `secret`, as the answer to `request` (a payload and its auth frame).
fn reply_verifies(secret: &str, request: &[Vec<u8>], reply: &[Vec<u8>]) -> bool {
    let request_mac = f2b_proto::auth::RequestAuth::decode(&request[1])
        .unwrap()
        .mac;
    let secret = f2b_proto::auth::MonitorSecret::new(secret).unwrap();
    f2b_proto::auth::verify_reply(&secret, &request_mac, &reply[0], &reply[1])
}

fn signed(e: &Event, secret: &str, ts_ms: u64, nonce: u8) -> Vec<Vec<u8>> {
    signed_as(e, e.node.as_str(), secret, ts_ms, nonce)
}

fn reporters(c: &Core) -> Vec<(u64, Reporter)> {
    let mut all = Vec::new();
    c.ledger()
        .for_each(|r| all.push((r.seq, r.reported_by)))
        .unwrap();
    all
}

fn counts(c: &Core) -> std::collections::HashMap<&'static str, u64> {
    c.rejected_counts()
        .into_iter()
        .map(|(r, n)| (r, n.total))
        .collect()
}

#[test]
fn authenticated_reports_are_acked_maced_and_recorded_with_their_credential() {
    let mut c = trusted_core("");
    let e = event(1, "sshd", Action::Ban, "203.0.113.5");
    let frames = signed(&e, WEB1, NOW, 1);
    let out = c.handle(&frames, PEER, NOW);
    let b = expect_ack(&out, AckStatus::Broadcast, Some(1)).unwrap();
    // The reply's MAC, over the reply as sent, bound to the request's MAC.
    let reply = c.trust().reply_frames(out.reply.encode(), &out.seal);
    assert_eq!(reply.len(), 2);
    assert!(reply_verifies(WEB1, &frames, &reply));
    // A busy refusal sent instead is MACed all the same.
    let busy = c
        .trust()
        .reply_frames(out.reply.clone().refused_busy().encode(), &out.seal);
    assert!(reply_verifies(WEB1, &frames, &busy));
    // The broadcast is signed.
    let key = f2b_proto::auth::SigningKey::from_seed(KEY_SEED).public();
    let bf = c.trust().broadcast_frames(&b);
    assert!(f2b_proto::auth::verify_broadcast(
        &[key],
        &bf[0],
        &bf[1],
        &bf[2]
    ));
    let hb = c
        .trust()
        .broadcast_frames(&c.heartbeat(Duration::from_secs(1)));
    assert!(f2b_proto::auth::verify_broadcast(
        &[key],
        &hb[0],
        &hb[1],
        &hb[2]
    ));
    // A resend is signed anew (another nonce): a duplicate, MACed too.
    let out = c.handle(&signed(&e, WEB1, NOW + 5, 2), PEER, NOW + 5);
    expect_ack(&out, AckStatus::Duplicate, Some(1));
    assert!(matches!(out.seal, Seal::Mac { .. }));
    // web2 reports for itself.
    let mut e2 = event(2, "sshd", Action::Ban, "203.0.113.6");
    e2.node = NodeName::new("web2").unwrap();
    expect_ack(
        &c.handle(&signed(&e2, WEB2, NOW, 1), PEER, NOW),
        AckStatus::Broadcast,
        Some(2),
    );
    assert_eq!(
        reporters(&c),
        [
            (1, Reporter::Credential(NodeName::new("web1").unwrap())),
            (2, Reporter::Credential(NodeName::new("web2").unwrap())),
        ]
    );
}

#[test]
fn every_trust_and_guard_refusal_is_naked_with_its_reason() {
    let mut c = trusted_core("rate_limit = 1\nrate_burst = 3\nquarantine_floor = 4");
    let e = |id: u128| event(id, "sshd", Action::Ban, &format!("203.0.113.{id}"));
    let mut other_node = e(6);
    other_node.node = NodeName::new("web2").unwrap();
    let replayed = signed(&e(5), WEB1, NOW, 5);
    expect_ack(
        &c.handle(&replayed, PEER, NOW),
        AckStatus::Broadcast,
        Some(1),
    );
    let cases: Vec<(&str, Vec<Vec<u8>>, NakReason, bool)> = vec![
        (
            "no auth frame",
            vec![report(&e(1))],
            NakReason::Unauthenticated,
            false,
        ),
        (
            "wrong MAC",
            signed_as(&e(2), "web1", WEB2, NOW, 2),
            NakReason::Unauthenticated,
            false,
        ),
        (
            "another node's name",
            signed_as(&other_node, "web1", WEB1, NOW, 6),
            NakReason::Unauthenticated,
            true,
        ),
        (
            "unknown credential",
            signed_as(&e(3), "web9", WEB1, NOW, 3),
            NakReason::Unauthenticated,
            false,
        ),
        (
            "stale time",
            signed(&e(4), WEB1, NOW - 60_001, 4),
            NakReason::Replayed,
            true,
        ),
        (
            "replayed nonce",
            replayed.clone(),
            NakReason::Replayed,
            true,
        ),
    ];
    for (name, frames, reason, maced) in cases {
        let out = c.handle(&frames, PEER, NOW);
        let nak = expect_nak(&out, reason);
        assert_eq!(
            nak.id,
            Request::peek_event_id(&frames[0]),
            "{name}: the NAK names the event"
        );
        assert!(
            !nak.detail.contains(WEB1) && !nak.detail.contains(WEB2),
            "{name}"
        );
        assert_eq!(matches!(out.seal, Seal::Mac { .. }), maced, "{name}");
        assert_eq!(c.last_seq(), 1, "{name}: nothing recorded");
    }
    // Rate limit: a burst of 3, then 1 per second (the first report took one).
    for n in 0..2u8 {
        let ev = e(10 + u128::from(n));
        expect_ack(
            &c.handle(&signed(&ev, WEB1, NOW, 10 + n), PEER, NOW),
            AckStatus::Broadcast,
            Some(2 + u64::from(n)),
        );
    }
    let out = c.handle(&signed(&e(12), WEB1, NOW, 12), PEER, NOW);
    assert!(expect_nak(&out, NakReason::RateLimited)
        .detail
        .contains("web1"));
    // The quarantine: more than 4 reports in a minute (the floor; the usual rate
    // of a node new to this publisher is 0).
    let mut t = NOW;
    let mut n = 13u8;
    let out = loop {
        t += 1000;
        n += 1;
        let out = c.handle(&signed(&e(u128::from(n)), WEB1, t, n), PEER, t);
        if out.reply.is_refusal() {
            break out;
        }
        assert!(n < 20, "never quarantined");
    };
    let nak = expect_nak(&out, NakReason::Quarantined);
    assert!(nak.detail.contains("web1"), "{nak:?}");
    assert!(matches!(out.seal, Seal::Mac { .. }));
    assert_eq!(c.guard().quarantined(t).len(), 1);
    let seq = c.last_seq();
    // web2 is not affected.
    let mut w2 = e(40);
    w2.node = NodeName::new("web2").unwrap();
    expect_ack(
        &c.handle(&signed(&w2, WEB2, t, 40), PEER, t),
        AckStatus::Broadcast,
        Some(seq + 1),
    );
    let counted = counts(&c);
    for reason in ["unauthenticated", "replayed", "rate_limited", "quarantined"] {
        assert!(
            counted.get(reason).copied().unwrap_or(0) > 0,
            "{reason}: {counted:?}"
        );
    }
    assert_eq!(counted["unauthenticated"], 4);
    assert_eq!(counted["replayed"], 2);
}

#[test]
fn the_quarantine_ends_after_its_time() {
    let mut c = trusted_core("rate_limit = 0\nquarantine_floor = 2\nquarantine_time = \"30s\"");
    let e = |id: u128| event(id, "sshd", Action::Ban, &format!("203.0.113.{id}"));
    for id in 1..=2 {
        let frames = signed(&e(id), WEB1, NOW, id as u8);
        expect_ack(
            &c.handle(&frames, PEER, NOW),
            AckStatus::Broadcast,
            Some(id as u64),
        );
    }
    let out = c.handle(&signed(&e(3), WEB1, NOW, 3), PEER, NOW);
    expect_nak(&out, NakReason::Quarantined);
    let out = c.handle(&signed(&e(4), WEB1, NOW + 29_999, 4), PEER, NOW + 29_999);
    expect_nak(&out, NakReason::Quarantined);
    c.flush_log(NOW + 30_000);
    assert!(c.guard().quarantined(NOW + 30_000).is_empty());
    let out = c.handle(&signed(&e(4), WEB1, NOW + 30_000, 5), PEER, NOW + 30_000);
    expect_ack(&out, AckStatus::Broadcast, Some(3));
}

#[test]
fn reports_without_credentials_need_the_opt_out_and_are_recorded_as_such() {
    let mut c = trusted_core_with("allow_unauthenticated = true", "");
    let e = event(1, "sshd", Action::Ban, "203.0.113.5");
    let out = c.handle(&[report(&e)], PEER, NOW);
    expect_ack(&out, AckStatus::Broadcast, Some(1));
    assert_eq!(out.seal, Seal::None);
    // A wrong credential is refused even so.
    let bad = event(2, "sshd", Action::Ban, "203.0.113.6");
    expect_nak(
        &c.handle(&signed_as(&bad, "web1", WEB2, NOW, 1), PEER, NOW),
        NakReason::Unauthenticated,
    );
    let good = event(3, "sshd", Action::Ban, "203.0.113.7");
    expect_ack(
        &c.handle(&signed(&good, WEB1, NOW, 2), PEER, NOW),
        AckStatus::Broadcast,
        Some(2),
    );
    assert_eq!(
        reporters(&c),
        [
            (1, Reporter::Unauthenticated),
            (2, Reporter::Credential(NodeName::new("web1").unwrap()))
        ]
    );
}

#[test]
fn legacy_reports_are_recorded_as_legacy_and_limited_by_host_name() {
    let mut c = trusted_core("legacy = true\nrate_limit = 1\nrate_burst = 1");
    expect_echo(
        &legacy_send(&mut c, b"web1|sshd|Ban|203.0.113.9"),
        "web1|sshd|Ban|203.0.113.9",
    );
    // The same host again at once: its bucket is empty.
    expect_legacy_nak(&legacy_send(&mut c, b"web1|sshd|Ban|203.0.113.10"));
    // Another host has its own.
    expect_echo(
        &legacy_send(&mut c, b"web3|sshd|Ban|203.0.113.10"),
        "web3|sshd|Ban|203.0.113.10",
    );
    assert_eq!(
        reporters(&c),
        [(1, Reporter::Legacy), (2, Reporter::Legacy)]
    );
    assert_eq!(counts(&c)["rate_limited"], 1);
}

#[test]
fn ignore_ip_is_forbidden_and_says_which_network() {
    let mut c = trusted_core("ignore_ip = [\"198.51.100.0/24\", \"2001:db8:1::/48\"]");
    for (n, ip) in [
        (1u8, "198.51.100.7"),
        (2, "2001:db8:1::5"),
        (3, "::ffff:198.51.100.8"),
    ] {
        let e = event(n.into(), "sshd", Action::Ban, ip);
        let out = c.handle(&signed(&e, WEB1, NOW, n), PEER, NOW);
        let nak = expect_nak(&out, NakReason::Forbidden);
        assert!(nak.detail.contains("ignore_ip"), "{nak:?}");
    }
    let e = event(4, "sshd", Action::Unban, "198.51.101.7");
    expect_ack(
        &c.handle(&signed(&e, WEB1, NOW, 4), PEER, NOW),
        AckStatus::Broadcast,
        Some(1),
    );
}

#[test]
fn snapshot_replies_need_no_credential_and_are_signed_over_the_request() {
    let mut c = trusted_core("");
    expect_ack(
        &c.handle(
            &signed(&event(1, "sshd", Action::Ban, "203.0.113.5"), WEB1, NOW, 1),
            PEER,
            NOW,
        ),
        AckStatus::Broadcast,
        Some(1),
    );
    let req = Request::Snapshot(SnapshotRequest {
        jails: vec![],
        cursor: None,
        nonce: Some([3; 16]),
    })
    .encode();
    let out = c.handle(&[&req], PEER, NOW);
    assert!(
        matches!(out.reply, Response::Snapshot(SnapshotReply::Page(ref p)) if p.bans.len() == 1)
    );
    assert_eq!(
        out.seal,
        Seal::Snapshot {
            request: req.clone()
        }
    );
    let key = f2b_proto::auth::SigningKey::from_seed(KEY_SEED).public();
    let frames = c.trust().reply_frames(out.reply.encode(), &out.seal);
    assert!(f2b_proto::auth::verify_snapshot(
        &[key],
        &req,
        &frames[0],
        &frames[1]
    ));
    // A busy NAK in its place is signed as well.
    let nak = c
        .trust()
        .reply_frames(out.reply.refused_busy().encode(), &out.seal);
    assert!(f2b_proto::auth::verify_snapshot(
        &[key],
        &req,
        &nak[0],
        &nak[1]
    ));
    // Without a signing key (the open core), a snapshot reply is one frame.
    let mut open = core();
    let out = open.handle(&[&req], PEER, NOW);
    assert_eq!(out.seal, Seal::None);
}

// ---------------------------------------------------------------------------
// `reports` requests: several events of one node, answered with `replies`.

/// A `reports` request of `events` and its auth frame, signed as credential `key`
/// with `secret`.
fn reports_signed_as(
    events: &[Event],
    key: &str,
    secret: &str,
    ts_ms: u64,
    nonce: u8,
) -> Vec<Vec<u8>> {
    let payload = Request::Reports(events.to_vec()).encode();
    with_auth(payload, key, secret, ts_ms, nonce)
}

/// [`reports_signed_as`] the events' node.
fn reports_signed(events: &[Event], secret: &str, ts_ms: u64, nonce: u8) -> Vec<Vec<u8>> {
    reports_signed_as(events, events[0].node.as_str(), secret, ts_ms, nonce)
}

/// The answers of a `replies`, asserting there is one per event of `events`,
/// each naming its event, and that every broadcast belongs to an ACK `broadcast`
/// (or a rebroadcast duplicate) and carries that event.
fn expect_replies<'a>(out: &'a Outcome, events: &[Event]) -> &'a [Reply] {
    let Response::Reply(Reply::Replies(answers)) = &out.reply else {
        panic!("expected replies, got {out:?}");
    };
    assert!(!out.reply.is_refusal());
    assert_eq!(answers.len(), events.len(), "{out:?}");
    for (a, e) in answers.iter().zip(events) {
        let id = match a {
            Reply::Ack(a) => Some(a.id),
            Reply::Nak(n) => n.id,
            Reply::Replies(_) => panic!("nested: {out:?}"),
        };
        assert_eq!(id, Some(e.id), "{out:?}");
    }
    for b in &out.broadcasts {
        let Broadcast::Event(s) = &b.broadcast else {
            panic!("{b:?}");
        };
        assert_eq!(s.event, events[b.answer], "{b:?}");
        match &answers[b.answer] {
            Reply::Ack(a) => assert_eq!(a.seq, Some(s.seq), "{b:?}"),
            other => panic!("a broadcast for {other:?}"),
        }
    }
    answers
}

/// The status and seq of an ACK, or the reason of a NAK, of each answer.
fn shape(answers: &[Reply]) -> Vec<Result<(AckStatus, Option<u64>), NakReason>> {
    answers
        .iter()
        .map(|a| match a {
            Reply::Ack(a) => Ok((a.status, a.seq)),
            Reply::Nak(n) => Err(n.reason),
            Reply::Replies(_) => panic!("nested"),
        })
        .collect()
}

/// The sequence numbers broadcast, in order.
fn broadcast_seqs(out: &Outcome) -> Vec<u64> {
    out.broadcasts
        .iter()
        .flat_map(|b| b.broadcast.events().iter().map(|s| s.seq))
        .collect()
}

#[test]
fn a_reports_request_is_acked_per_event_in_order_and_maced() {
    let mut c = trusted_core("");
    let events: Vec<Event> = (1..=5)
        .map(|n| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}")))
        .collect();
    let frames = reports_signed(&events, WEB1, NOW, 1);
    let out = c.handle(&frames, PEER, NOW);
    let answers = expect_replies(&out, &events);
    assert_eq!(
        shape(answers),
        (1..=5)
            .map(|s| Ok((AckStatus::Broadcast, Some(s))))
            .collect::<Vec<_>>()
    );
    assert_eq!(broadcast_seqs(&out), [1, 2, 3, 4, 5]);
    assert_eq!(
        out.broadcasts.iter().map(|b| b.answer).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    // The legacy form is there for subscribers of the old format.
    assert_eq!(
        out.broadcasts[0].legacy.as_deref(),
        legacy::broadcast_text(&events[0], None).as_deref()
    );
    assert!(out.broadcasts[0].legacy.is_some());
    assert_eq!(c.take_refusal(), None);
    // The replies are MACed for the monitor, bound to the request's MAC.
    let reply = c.trust().reply_frames(out.reply.encode(), &out.seal);
    assert_eq!(reply.len(), 2);
    assert!(reply_verifies(WEB1, &frames, &reply));
    assert!(!reply_verifies(WEB2, &frames, &reply));
    assert_eq!(
        Reply::decode(&reply[0]).unwrap(),
        Reply::Replies(answers.to_vec())
    );
    let web1 = Reporter::Credential(NodeName::new("web1").unwrap());
    assert_eq!(
        reporters(&c),
        (1..=5).map(|s| (s, web1.clone())).collect::<Vec<_>>()
    );
}

#[test]
fn each_event_of_a_reports_request_gets_its_own_answer() {
    let mut c = core();
    let known = event(1, "sshd", Action::Ban, "203.0.113.1");
    expect_ack(&send(&mut c, &known, NOW), AckStatus::Broadcast, Some(1));
    let mut future = event(7, "sshd", Action::Ban, "203.0.113.7");
    future.time_ms = NOW + 2 * 86_400_000;
    let events = vec![
        event(2, "sshd", Action::Ban, "203.0.113.2"),
        // Forbidden: refused alone, the rest is decided.
        event(3, "sshd", Action::Ban, "127.0.0.1"),
        // A resend of an event accepted before.
        known.clone(),
        // The cluster holds that ban already.
        event(4, "sshd", Action::Ban, "203.0.113.1"),
        event(5, "sshd", Action::Ban, "203.0.113.5"),
        // The same ban again in the same request.
        event(6, "sshd", Action::Ban, "203.0.113.5"),
        future,
        event(8, "nginx", Action::Unban, "203.0.113.8"),
    ];
    let out = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    let answers = expect_replies(&out, &events);
    assert_eq!(
        shape(answers),
        [
            Ok((AckStatus::Broadcast, Some(2))),
            Err(NakReason::Forbidden),
            Ok((AckStatus::Duplicate, Some(1))),
            Ok((AckStatus::Unchanged, None)),
            Ok((AckStatus::Broadcast, Some(3))),
            Ok((AckStatus::Unchanged, None)),
            Err(NakReason::InvalidTime),
            Ok((AckStatus::Broadcast, Some(4))),
        ]
    );
    let Reply::Nak(forbidden) = &answers[1] else {
        unreachable!()
    };
    assert!(forbidden.detail.contains("loopback"), "{forbidden:?}");
    assert_eq!(
        out.broadcasts.iter().map(|b| b.answer).collect::<Vec<_>>(),
        [0, 4, 7]
    );
    assert_eq!(broadcast_seqs(&out), [2, 3, 4]);
    assert_eq!(c.ledger().rows().unwrap(), 4);
    // Each refusal is counted (and logged) on its own; the request is not one.
    let counted = counts(&c);
    assert_eq!(
        (counted["forbidden"], counted["invalid_time"]),
        (1, 1),
        "{counted:?}"
    );
    assert_eq!(c.take_refusal(), None);
    // The same request again: every event is a duplicate now, or refused again.
    let again = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    assert_eq!(
        shape(expect_replies(&again, &events)),
        [
            Ok((AckStatus::Duplicate, Some(2))),
            Err(NakReason::Forbidden),
            Ok((AckStatus::Duplicate, Some(1))),
            Ok((AckStatus::Duplicate, None)),
            Ok((AckStatus::Duplicate, Some(3))),
            Ok((AckStatus::Duplicate, None)),
            Err(NakReason::InvalidTime),
            Ok((AckStatus::Duplicate, Some(4))),
        ]
    );
    assert!(again.broadcasts.is_empty());
}

/// After the first event refused with a transient reason, the rest of the
/// request is refused with it undecided; the monitor's resend of that suffix is
/// decided in its order once the node may send again.
#[test]
fn a_transient_refusal_refuses_the_rest_of_the_request_undecided() {
    let mut c = trusted_core("rate_limit = 1\nrate_burst = 4\nquarantine_floor = 1000");
    let e = |n: u128| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}"));
    // One token of 4 taken.
    expect_ack(
        &c.handle(&signed(&e(1), WEB1, NOW, 1), PEER, NOW),
        AckStatus::Broadcast,
        Some(1),
    );
    // e(5) finds the bucket empty; e(1) after it would be a duplicate if it were
    // decided.
    let events = vec![e(2), e(3), e(4), e(5), e(1), e(6)];
    let out = c.handle(&reports_signed(&events, WEB1, NOW, 2), PEER, NOW);
    let answers = expect_replies(&out, &events);
    assert_eq!(
        shape(answers),
        [
            Ok((AckStatus::Broadcast, Some(2))),
            Ok((AckStatus::Broadcast, Some(3))),
            Ok((AckStatus::Broadcast, Some(4))),
            Err(NakReason::RateLimited),
            Err(NakReason::RateLimited),
            Err(NakReason::RateLimited),
        ]
    );
    let details: Vec<&str> = answers[3..]
        .iter()
        .map(|a| match a {
            Reply::Nak(n) => n.detail.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(details[0].contains("rate_limit"), "{details:?}");
    for d in &details[1..] {
        assert!(d.contains("earlier event of this request"), "{d}");
        assert!(d.contains(&e(5).id.to_string()), "{d}");
        assert!(!d.contains("rate_limit ="), "decided by the guard: {d}");
    }
    assert_eq!(broadcast_seqs(&out), [2, 3, 4]);
    assert!(matches!(out.seal, Seal::Mac { .. }));
    // Nothing of the suffix was recorded or remembered.
    assert_eq!((c.last_seq(), c.ledger().rows().unwrap()), (4, 4));
    assert_eq!(counts(&c)["rate_limited"], 3);
    // Three seconds later the bucket holds three tokens: exactly the suffix,
    // which the guard did not count (each event of it takes one now).
    let later = NOW + 3000;
    let suffix = events[3..].to_vec();
    let out = c.handle(&reports_signed(&suffix, WEB1, later, 3), PEER, later);
    assert_eq!(
        shape(expect_replies(&out, &suffix)),
        [
            Ok((AckStatus::Broadcast, Some(5))),
            Ok((AckStatus::Duplicate, Some(1))),
            Ok((AckStatus::Broadcast, Some(6))),
        ]
    );
    assert_eq!(broadcast_seqs(&out), [5, 6]);
    assert_eq!(
        out.broadcasts.iter().map(|b| b.answer).collect::<Vec<_>>(),
        [0, 2]
    );
    // The bucket is empty again.
    let out = c.handle(&signed(&e(7), WEB1, later, 4), PEER, later);
    expect_nak(&out, NakReason::RateLimited);
}

/// A ledger write that fails is `busy`, transient too: the rest is refused with
/// it and nothing is recorded.
#[test]
fn a_failed_write_in_a_reports_request_refuses_the_rest_busy() {
    let mut c = core();
    let events: Vec<Event> = (1..=3)
        .map(|n| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}")))
        .collect();
    c.ledger.fail_writes(true);
    let out = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    let answers = expect_replies(&out, &events);
    assert_eq!(shape(answers), [Err(NakReason::Busy); 3]);
    for (i, a) in answers.iter().enumerate() {
        let Reply::Nak(n) = a else { unreachable!() };
        // Only the first was tried.
        assert_eq!(n.detail.contains("earlier event"), i > 0, "{n:?}");
    }
    assert!(out.broadcasts.is_empty());
    c.ledger.fail_writes(false);
    let out = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    assert_eq!(broadcast_seqs(&out), [1, 2, 3]);
}

/// The request is authenticated once: a credential that does not hold, or that
/// is not the events' node, refuses it whole with one NAK without an id.
#[test]
fn a_reports_request_is_authenticated_whole() {
    let mut c = trusted_core("");
    let mut events: Vec<Event> = (1..=3)
        .map(|n| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}")))
        .collect();
    let cases: Vec<(&str, Vec<Vec<u8>>, NakReason, bool)> = vec![
        (
            "no auth frame",
            vec![Request::Reports(events.clone()).encode()],
            NakReason::Unauthenticated,
            false,
        ),
        (
            "another node's credential",
            reports_signed_as(&events, "web2", WEB2, NOW, 1),
            NakReason::Unauthenticated,
            true,
        ),
        (
            "unknown credential",
            reports_signed_as(&events, "web9", WEB1, NOW, 2),
            NakReason::Unauthenticated,
            false,
        ),
        (
            "wrong MAC",
            reports_signed_as(&events, "web1", WEB2, NOW, 3),
            NakReason::Unauthenticated,
            false,
        ),
        (
            "stale",
            reports_signed(&events, WEB1, NOW - 60_001, 4),
            NakReason::Replayed,
            true,
        ),
    ];
    for (name, frames, reason, maced) in cases {
        let out = c.handle(&frames, PEER, NOW);
        let nak = expect_nak(&out, reason);
        assert_eq!(nak.id, None, "{name}");
        assert_eq!(matches!(out.seal, Seal::Mac { .. }), maced, "{name}");
        assert_eq!(c.take_refusal(), Some(reason.code()), "{name}");
        assert_eq!(c.last_seq(), 0, "{name}: nothing recorded");
    }
    // Events of several nodes do not decode: malformed, without an id.
    events[2].node = NodeName::new("web2").unwrap();
    let out = c.handle(&reports_signed_as(&events, "web1", WEB1, NOW, 5), PEER, NOW);
    assert_eq!(expect_nak(&out, NakReason::Malformed).id, None);
    // The right credential: accepted.
    events[2].node = NodeName::new("web1").unwrap();
    let out = c.handle(&reports_signed(&events, WEB1, NOW, 6), PEER, NOW);
    assert_eq!(broadcast_seqs(&out), [1, 2, 3]);
}

/// A failed commit turns every ACK of a `replies` busy (the refusals stay); a
/// broadcast that could not be queued turns its own event's ACK busy, and the
/// resend of that event broadcasts it again.
#[test]
fn failed_commits_and_broadcasts_turn_the_acks_of_replies_busy() {
    let mut c = core();
    c.begin_batch().unwrap();
    let events = vec![
        event(1, "sshd", Action::Ban, "203.0.113.1"),
        event(2, "sshd", Action::Ban, "127.0.0.1"),
        event(3, "sshd", Action::Ban, "203.0.113.3"),
    ];
    let out = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    assert_eq!(broadcast_seqs(&out), [1, 2]);
    c.ledger.fail_next_commit();
    assert!(c.commit_batch(NOW, false).is_err());
    assert_eq!(c.last_seq(), 0);
    let busy = Outcome {
        reply: out.reply.clone().refused_busy(),
        seal: Seal::None,
        broadcasts: Vec::new(),
    };
    assert_eq!(
        shape(expect_replies(&busy, &events)),
        [
            Err(NakReason::Busy),
            Err(NakReason::Forbidden),
            Err(NakReason::Busy)
        ]
    );
    // The resend: new events again, with the same seqs. Its second broadcast
    // could not be queued.
    let out = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    assert_eq!(broadcast_seqs(&out), [1, 2]);
    let failed = out.broadcasts[1].answer;
    assert_eq!(failed, 2);
    let reply = c.broadcast_failed(out.reply.clone(), failed);
    let sent = Outcome {
        reply,
        seal: Seal::None,
        broadcasts: Vec::new(),
    };
    assert_eq!(
        shape(expect_replies(&sent, &events)),
        [
            Ok((AckStatus::Broadcast, Some(1))),
            Err(NakReason::Forbidden),
            Err(NakReason::Busy)
        ]
    );
    // Only that event is broadcast again when it is sent again.
    let again = c.handle(&[Request::Reports(events.clone()).encode()], PEER, NOW);
    assert_eq!(
        shape(expect_replies(&again, &events)),
        [
            Ok((AckStatus::Duplicate, Some(1))),
            Err(NakReason::Forbidden),
            Ok((AckStatus::Duplicate, Some(2))),
        ]
    );
    assert_eq!(broadcast_seqs(&again), [2]);
    assert_eq!(again.broadcasts[0].answer, 2);
}
