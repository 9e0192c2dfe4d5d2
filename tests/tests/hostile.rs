//! The hostile input suite (issue #6): thousands of crafted messages at the real
//! publisher, on its reply socket and its broadcast socket, while honest monitors
//! keep reporting; and forged broadcasts at a real subscriber.
//!
//! Every hostile input must be refused (a NAK with the expected reason, the bare
//! legacy `NAK`, or the connection dropped), none broadcast, no subscriber action
//! run for one; the publisher keeps serving the honest monitors throughout and its
//! memory stays bounded. Each test prints a table of what it tried, per kind, on
//! standard error (`--no-capture` to see it), and the seed of its random inputs
//! (`F2B_HOSTILE_SEED` replays one).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::TcpStream;
use std::time::Instant;

use f2b_proto::auth::{self, MonitorSecret, SigningKey};
use f2b_proto::{Reply, MAX_MESSAGE_SIZE};
use f2b_tests::cluster::TestDir;
use f2b_tests::logline::ban;
use f2b_tests::trust::{self, random_bytes, stranger_secret};
use f2b_tests::{raw, Node, NodeOptions, Publisher, PublisherOptions, TIMEOUT};
use serde_json::{json, Value};

/// The random inputs' seed: `F2B_HOSTILE_SEED`, else a fixed one.
fn seed() -> u64 {
    std::env::var("F2B_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00f2_b6e5_7113)
}

/// The credential the attacker stole (listed on the publisher, as in a real fleet
/// where one node was compromised): its signed inputs pass authentication and
/// must be refused for what they carry.
const STOLEN: &str = "web9";

/// What the publisher must answer.
#[derive(Debug, Clone)]
enum Expect {
    /// A NAK with one of these reasons (more than one where the order of checks is
    /// the publisher's choice).
    Nak(&'static [&'static str]),
    /// Any refusal: a NAK of any reason, or the legacy `NAK`.
    Refused,
}

/// One crafted request: its kind (a row of the table), its frames, what must come
/// back.
struct Input {
    kind: &'static str,
    frames: Vec<Vec<u8>>,
    expect: Expect,
}

/// The tally: per kind, how many were tried and what came back.
#[derive(Default)]
struct Table {
    rows: BTreeMap<&'static str, BTreeMap<String, usize>>,
}

impl Table {
    fn add(&mut self, kind: &'static str, outcome: impl Into<String>) {
        *self
            .rows
            .entry(kind)
            .or_default()
            .entry(outcome.into())
            .or_default() += 1;
    }

    fn total(&self) -> usize {
        self.rows.values().flat_map(BTreeMap::values).sum()
    }

    fn print(&self, title: &str) {
        let mut out = format!("\n{title}\n{:<44} {:>6}  outcomes\n", "kind", "tried");
        for (kind, outcomes) in &self.rows {
            let tried: usize = outcomes.values().sum();
            let o: Vec<String> = outcomes.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!("{kind:<44} {tried:>6}  {}\n", o.join(", ")));
        }
        out.push_str(&format!("{:<44} {:>6}\n", "TOTAL", self.total()));
        let _ = std::io::stderr().write_all(out.as_bytes());
    }
}

/// How long a hostile-suite client waits for one reply before failing.
const REPLY_TIMEOUT_MS: i32 = 60_000;

/// A REQ socket kept across requests.
struct Client {
    _ctx: zmq::Context,
    socket: zmq::Socket,
}

impl Client {
    fn new(endpoint: &str) -> Client {
        let ctx = zmq::Context::new();
        let socket = ctx.socket(zmq::REQ).expect("REQ");
        socket.set_linger(0).expect("linger");
        // A bound for a publisher that never answers, not a wait: each sync of its
        // ledger can take seconds when other processes fill the disk (a CI run
        // failed at 15 s while a release build ran beside it).
        socket.set_rcvtimeo(REPLY_TIMEOUT_MS).expect("rcvtimeo");
        socket.set_sndtimeo(5_000).expect("sndtimeo");
        socket.connect(endpoint).expect("connect");
        Client { _ctx: ctx, socket }
    }

    fn ask(&self, frames: &[Vec<u8>], what: &str) -> Vec<Vec<u8>> {
        self.socket
            .send_multipart(frames, 0)
            .unwrap_or_else(|e| panic!("send {what}: {e}"));
        self.socket.recv_multipart(0).unwrap_or_else(|e| {
            panic!(
                "no reply to {what} within {} s: {e}",
                REPLY_TIMEOUT_MS / 1000
            )
        })
    }
}

/// The reply's outcome as a table cell: the NAK reason, `legacy NAK`, or a panic
/// for anything accepted.
fn outcome(input: &Input, reply: &[Vec<u8>]) -> String {
    let first = &reply[0];
    let got = if first == b"NAK" {
        "legacy NAK".to_owned()
    } else {
        match Reply::decode(first) {
            Ok(Reply::Nak(n)) => n.reason.code().to_owned(),
            other => panic!(
                "{}: NOT REFUSED: {other:?} ({:?}) for {:?}",
                input.kind,
                String::from_utf8_lossy(first),
                input
                    .frames
                    .iter()
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect::<Vec<_>>()
            ),
        }
    };
    if let Expect::Nak(reasons) = &input.expect {
        assert!(
            reasons.contains(&got.as_str()),
            "{}: expected a NAK {reasons:?}, got {got} for {:?}",
            input.kind,
            input
                .frames
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect::<Vec<_>>()
        );
    }
    got
}

fn to_vec(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// A well-formed report of `ip` by `node` with a fresh random id.
fn report(node: &str, jail: &str, ip: &str, rng: &mut fastrand::Rng) -> Value {
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        rng.u32(..),
        rng.u16(..),
        rng.u16(..0x1000),
        rng.u16(..0x1000),
        rng.u64(..1 << 48)
    );
    let mut r = raw::report(&id, node, jail, "ban", ip);
    r["event"]["id"] = json!(id);
    r
}

/// A hostile address for well-formed reports: TEST-NET-1, never an honest one.
fn hostile_ip(rng: &mut fastrand::Rng) -> String {
    format!("192.0.2.{}", rng.u8(1..255))
}

/// `payload` with an auth frame signed by `secret` as `key`.
fn signed(secret: &MonitorSecret, key: &str, payload: Vec<u8>) -> Vec<Vec<u8>> {
    let a = trust::sign(secret, key, &payload);
    vec![payload, a.encode()]
}

/// Random printable-ish JSON text, often almost a report.
fn garbled_json(rng: &mut fastrand::Rng, good: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    match rng.u8(..4) {
        0 => b.truncate(rng.usize(1..b.len())),
        1 => {
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..b.len());
                b[i] = b"{}[]\":,\\0x-e9 \t\x00\xff"[rng.usize(..17)];
            }
        }
        2 => {
            let i = rng.usize(1..b.len());
            b.insert(i, b"{[\"\\"[rng.usize(..4)]);
        }
        _ => {
            // Deep nesting.
            let depth = rng.usize(100..3000);
            b = [
                b"{\"v\":1,\"type\":\"report\",\"event\":".as_slice(),
                &vec![b'['; depth],
            ]
            .concat();
            b.extend(vec![b']'; depth]);
            b.push(b'}');
        }
    }
    b
}

/// Every crafted request for the reply socket, in a deterministic order.
fn crafted(rng: &mut fastrand::Rng, stolen: &MonitorSecret, web1: &MonitorSecret) -> Vec<Input> {
    let mut v = Vec::new();
    let mut push = |kind, frames: Vec<Vec<u8>>, expect| {
        v.push(Input {
            kind,
            frames,
            expect,
        })
    };
    let good = |rng: &mut fastrand::Rng| to_vec(&report(STOLEN, "sshd", &hostile_ip(rng), rng));
    let with = |rng: &mut fastrand::Rng, field: &str, value: Value| {
        let mut r = report(STOLEN, "sshd", &hostile_ip(rng), rng);
        r["event"][field] = value;
        to_vec(&r)
    };
    const MALFORMED: &[&str] = &["malformed", "unsupported_version", "unknown_type"];

    // Malformed encodings (JSON objects, so native, not legacy).
    for _ in 0..600 {
        let g = good(rng);
        let frames = vec![garbled_json(rng, &g)];
        push("malformed JSON", frames, Expect::Refused);
    }
    for (p, _) in [
        (&br#"{"v":1}"#[..], ()),
        (br#"{"v":1,"type":"report"}"#, ()),
        (br#"{"v":1,"type":"report","event":[]}"#, ()),
        (br#"{"v":1,"type":"report","event":null}"#, ()),
        (br#"{"v":"1","type":"report"}"#, ()),
        (br#"{"type":"report","v":1,"v":2}"#, ()),
        (br#"{"v":2,"type":"report"}"#, ()),
        (br#"{"v":1,"type":"launch"}"#, ()),
        (br#"{"v":1,"type":"ack","id":"x"}"#, ()),
        (br#"{}"#, ()),
    ] {
        for _ in 0..10 {
            push(
                "malformed: wrong structure",
                vec![p.to_vec()],
                Expect::Nak(MALFORMED),
            );
        }
    }

    // Every field at and past its bound. At the bound the report is valid, so it is
    // sent without authentication (refused for that); past it, signed with the
    // stolen credential (refused for the field).
    let node_at = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(node_at.len(), f2b_proto::MAX_NODE_LEN);
    for _ in 0..20 {
        let ip = hostile_ip(rng);
        for (kind, payload) in [
            (
                "bound: jail of 64 bytes, unsigned",
                to_vec(&report(STOLEN, &"j".repeat(64), &ip, rng)),
            ),
            (
                "bound: node of 253 bytes, unsigned",
                to_vec(&report(&node_at, "sshd", &ip, rng)),
            ),
            (
                "bound: time_ms 2^53-1, unsigned",
                with(rng, "time_ms", json!(f2b_proto::MAX_SAFE_INTEGER)),
            ),
        ] {
            push(kind, vec![payload], Expect::Nak(&["unauthenticated"]));
        }
        for (kind, field, value, reasons) in [
            (
                "past bound: jail of 65 bytes",
                "jail",
                json!("j".repeat(65)),
                &["invalid_jail"][..],
            ),
            (
                "past bound: empty jail",
                "jail",
                json!(""),
                &["invalid_jail"],
            ),
            (
                "past bound: node of 254 bytes",
                "node",
                json!(format!("{node_at}e")),
                &["invalid_node", "unauthenticated"],
            ),
            (
                "past bound: node label of 64",
                "node",
                json!("n".repeat(64)),
                &["invalid_node", "unauthenticated"],
            ),
            (
                "past bound: time_ms 2^53",
                "time_ms",
                json!(1u64 << 53),
                &["invalid_time"],
            ),
            (
                "past bound: time_ms 0",
                "time_ms",
                json!(0),
                &["invalid_time"],
            ),
            (
                "past bound: time_ms -1",
                "time_ms",
                json!(-1),
                &["malformed", "invalid_time"],
            ),
            (
                "past bound: time_ms 1.5",
                "time_ms",
                json!(1.5),
                &["malformed", "invalid_time"],
            ),
            (
                "past bound: time_ms 2^64",
                "time_ms",
                json!(18_446_744_073_709_551_616.0f64),
                &["malformed", "invalid_time"],
            ),
            (
                "past bound: id not a UUID",
                "id",
                json!("0b3c2f3e-6f0a-4b7e-9a55-3f1d8f6c2a1"),
                &["invalid_id"],
            ),
            (
                "past bound: action unknown",
                "action",
                json!("drop"),
                &["invalid_action"],
            ),
        ] {
            let payload = with(rng, field, value);
            push(kind, signed(stolen, STOLEN, payload), Expect::Nak(reasons));
        }
        // A frame of exactly MAX_MESSAGE_SIZE bytes (padded with blanks): valid.
        let mut p = good(rng);
        p.resize(MAX_MESSAGE_SIZE, b' ');
        push(
            "bound: frame of 8192 bytes, unsigned",
            vec![p],
            Expect::Nak(&["unauthenticated"]),
        );
    }

    // Shell metacharacters and control characters in jail and node names.
    let nasty = [
        "sshd;reboot",
        "$(reboot)",
        "`id`",
        "a|b",
        "a&&b",
        "x>/etc/passwd",
        "'; DROP TABLE bans;--",
        "../../etc/shadow",
        "a\nb",
        "a\rb",
        "a\tb",
        "a\u{0}b",
        "\u{1b}[31mred",
        "a b",
        "sshd\u{7f}",
        "s\u{e9}shd",
        "[sshd]",
        "*",
        "%s%n",
        "\\\\x00",
    ];
    for name in nasty {
        for _ in 0..5 {
            let ip = hostile_ip(rng);
            let payload = to_vec(&report(STOLEN, name, &ip, rng));
            // Unsigned, and with a wrong MAC: refused whatever the name.
            push(
                "names: metachar/control in jail, unsigned",
                vec![payload.clone()],
                Expect::Nak(&["invalid_jail", "unauthenticated"]),
            );
            push(
                "names: metachar/control in jail, wrong MAC",
                signed(&stranger_secret(), STOLEN, payload),
                Expect::Nak(&["invalid_jail", "unauthenticated"]),
            );
            let payload = to_vec(&report(name, "sshd", &ip, rng));
            // Signed: the node name is never valid, nor the stolen credential's.
            push(
                "names: metachar/control in node, signed",
                signed(stolen, STOLEN, payload),
                Expect::Nak(&["invalid_node", "unauthenticated"]),
            );
            // Signed with a valid credential: a jail name with any of these is
            // refused for itself (f2b_proto::JailName allows letters, digits and
            // `_ - . @ + :` only), so no credential can put one on the wire.
            let payload = to_vec(&report(STOLEN, name, &ip, rng));
            push(
                "names: metachar/control in jail, signed",
                signed(stolen, STOLEN, payload),
                Expect::Nak(&["invalid_jail"]),
            );
        }
    }

    // Not IP addresses (signed: refused for the address).
    let not_ips = [
        "not_an_ip",
        "1.2.3",
        "10.1",
        "1.2.3.4/24",
        "999.1.1.1",
        "1.2.3.4.5",
        "",
        " 192.0.2.1",
        "192.0.2.1 ",
        "0x7f000001",
        "2130706433",
        "localhost",
        "::ffff:zz",
        "1::2::3",
        "fe80::1%eth0",
        "192.0.2.1;id",
        "$(id)",
        "\u{0}",
        "12345678901234567890",
    ];
    for ip in not_ips {
        for _ in 0..5 {
            let payload = to_vec(&report(STOLEN, "sshd", ip, rng));
            push(
                "address: not an IP, signed",
                signed(stolen, STOLEN, payload),
                Expect::Nak(&["invalid_ip"]),
            );
        }
    }
    for ip in [
        "127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "169.254.1.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "ff02::1",
    ] {
        for _ in 0..5 {
            let payload = to_vec(&report(STOLEN, "sshd", ip, rng));
            push(
                "address: reserved range, signed",
                signed(stolen, STOLEN, payload),
                Expect::Nak(&["forbidden"]),
            );
        }
    }

    // Missing, wrong and garbled authentication.
    for _ in 0..150 {
        push(
            "auth: no auth frame",
            vec![good(rng)],
            Expect::Nak(&["unauthenticated"]),
        );
        let p = good(rng);
        push(
            "auth: MAC under another secret",
            signed(&stranger_secret(), STOLEN, p),
            Expect::Nak(&["unauthenticated"]),
        );
        let p = good(rng);
        let mut a = trust::sign(stolen, STOLEN, &p);
        a.mac[rng.usize(..32)] ^= 1 << rng.u8(..8);
        push(
            "auth: one MAC bit flipped",
            vec![p, a.encode()],
            Expect::Nak(&["unauthenticated"]),
        );
        let p = good(rng);
        let a = trust::sign(stolen, STOLEN, &p);
        let mut other = p.clone();
        other.insert(1, b' ');
        push(
            "auth: payload changed after signing",
            vec![other, a.encode()],
            Expect::Nak(&["unauthenticated"]),
        );
        // Someone else's name under the stolen credential.
        let p = to_vec(&report("web1", "sshd", &hostile_ip(rng), rng));
        push(
            "auth: credential of another node",
            signed(stolen, STOLEN, p),
            Expect::Nak(&["unauthenticated"]),
        );
        // web1's real secret, but the report claims web2.
        let p = to_vec(&report("web2", "sshd", &hostile_ip(rng), rng));
        push(
            "auth: node differs from key (real key)",
            signed(web1, "web1", p),
            Expect::Nak(&["unauthenticated"]),
        );
        let name = format!("intruder{}", rng.u16(..));
        let p = to_vec(&report(&name, "sshd", &hostile_ip(rng), rng));
        push(
            "auth: frame for an unknown key",
            signed(&stranger_secret(), &name, p),
            Expect::Nak(&["unauthenticated"]),
        );
        let p = good(rng);
        let junk: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
        push(
            "auth: random bytes as auth frame",
            vec![p, junk],
            Expect::Nak(&["unauthenticated"]),
        );
    }
    for bad in [
        json!({"v":1,"type":"auth","key":STOLEN,"ts_ms":1,"nonce":"00","mac":"00"}),
        json!({"v":1,"type":"auth","key":STOLEN,"ts_ms":"now","nonce":"0".repeat(32),"mac":"0".repeat(64)}),
        json!({"v":1,"type":"auth","key":STOLEN,"ts_ms":1,"nonce":"A".repeat(32),"mac":"0".repeat(64)}),
        json!({"v":1,"type":"auth","key":"bad key","ts_ms":1,"nonce":"0".repeat(32),"mac":"0".repeat(64)}),
        json!({"v":1,"type":"report","key":STOLEN}),
        json!({"v":2,"type":"auth"}),
        json!([]),
    ] {
        for _ in 0..10 {
            push(
                "auth: malformed auth frame",
                vec![good(rng), to_vec(&bad)],
                Expect::Nak(&["unauthenticated"]),
            );
        }
    }

    // Stale and future timestamps, correctly signed.
    for _ in 0..50 {
        for (kind, ts) in [
            ("replay: ts_ms 10 min old", raw::now_ms() - 600_000),
            ("replay: ts_ms 10 min ahead", raw::now_ms() + 600_000),
            ("replay: ts_ms 0", 0),
            ("replay: ts_ms u64::MAX", u64::MAX),
        ] {
            let p = good(rng);
            let a = trust::sign_at(stolen, STOLEN, ts, &p);
            push(kind, vec![p, a.encode()], Expect::Nak(&["replayed"]));
        }
    }

    // Snapshot requests (served to anyone) past their bounds.
    let jails: Vec<String> = (0..257).map(|i| format!("j{i}")).collect();
    for (kind, bad) in [
        (
            "snapshot: 257 jails",
            json!({"v":1,"type":"snapshot","jails":jails}),
        ),
        (
            "snapshot: jail with a space",
            json!({"v":1,"type":"snapshot","jails":["a b"]}),
        ),
        (
            "snapshot: cursor -1",
            json!({"v":1,"type":"snapshot","cursor":-1}),
        ),
        (
            "snapshot: nonce of 31 hex digits",
            json!({"v":1,"type":"snapshot","nonce":"0".repeat(31)}),
        ),
        (
            "snapshot: nonce upper-case",
            json!({"v":1,"type":"snapshot","nonce":"A".repeat(32)}),
        ),
    ] {
        for _ in 0..10 {
            push(kind, vec![to_vec(&bad)], Expect::Refused);
        }
    }

    // Too many frames.
    for n in 5..=12 {
        for _ in 0..5 {
            let mut frames = signed(stolen, STOLEN, good(rng));
            frames.resize(n, b"x".to_vec());
            push(
                "frames: more than MAX_FRAMES",
                frames,
                Expect::Nak(&["malformed"]),
            );
        }
    }

    // Random bytes, one to three frames (legacy-looking ones get the bare NAK).
    for _ in 0..1500 {
        let frames = (0..rng.usize(1..4))
            .map(|_| (0..rng.usize(0..2000)).map(|_| rng.u8(..)).collect())
            .collect();
        push("random bytes", frames, Expect::Refused);
    }
    // Legacy text with legacy off.
    for _ in 0..50 {
        let m = format!("web1|sshd|Ban|{}", hostile_ip(rng));
        push(
            "legacy text (legacy off)",
            vec![m.into_bytes()],
            Expect::Refused,
        );
    }
    v
}

/// The `name{reason="..."} value` samples of a Prometheus text page, by reason.
fn by_reason(page: &str, name: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{name}{{reason=\"");
    page.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (reason, value) = rest.split_once("\"} ")?;
            Some((reason.to_owned(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// GET /metrics from a daemon's `metrics_bind` (the address it logged).
fn scrape(process: &f2b_tests::Process) -> String {
    let line = process.wait_for_event("metrics listening on", &[], TIMEOUT);
    let addr = f2b_tests::field(&line, "addr").expect("addr= in the metrics line");
    let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
        .expect("send");
    let mut page = String::new();
    std::io::Read::read_to_string(&mut s, &mut page).expect("read /metrics");
    assert!(page.starts_with("HTTP/1."), "{page}");
    page
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The broadcast socket from the subscriber side: a SUB peer flooding
/// subscriptions, an XSUB sending garbage upstream, raw TCP garbage, a 1 TiB frame
/// header. Returns its table.
fn abuse_broadcast_socket(endpoint: &str, seed: u64) -> Table {
    let mut t = Table::default();
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xb0ad);
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).expect("SUB");
    sub.set_linger(0).expect("linger");
    sub.connect(endpoint).expect("connect");
    for _ in 0..10_000 {
        let topic: Vec<u8> = (0..rng.usize(0..200)).map(|_| rng.u8(..)).collect();
        sub.set_subscribe(&topic).expect("subscribe");
        t.add("broadcast: SUB subscription flood", "sent");
    }
    for _ in 0..2_000 {
        let topic: Vec<u8> = (0..rng.usize(0..50)).map(|_| rng.u8(..)).collect();
        let _ = sub.set_unsubscribe(&topic);
        t.add("broadcast: SUB unsubscribe flood", "sent");
    }
    let xsub = ctx.socket(zmq::XSUB).expect("XSUB");
    xsub.set_linger(0).expect("linger");
    xsub.set_sndtimeo(2_000).expect("sndtimeo");
    xsub.connect(endpoint).expect("connect");
    for _ in 0..3_000 {
        let frames: Vec<Vec<u8>> = (0..rng.usize(1..4))
            .map(|_| (0..rng.usize(0..1000)).map(|_| rng.u8(..)).collect())
            .collect();
        let outcome = if xsub.send_multipart(frames, 0).is_ok() {
            "sent"
        } else {
            "send refused"
        };
        t.add("broadcast: XSUB garbage messages", outcome);
    }
    let addr = endpoint.strip_prefix("tcp://").expect("tcp endpoint");
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).expect("connect");
        let junk: Vec<u8> = (0..rng.usize(1..4000)).map(|_| rng.u8(..)).collect();
        let outcome = if s.write_all(&junk).is_ok() {
            "sent, closed by us"
        } else {
            "dropped by the publisher"
        };
        t.add("broadcast: raw TCP garbage (no ZMTP)", outcome);
    }
    let took = raw::announce_huge_frame(endpoint, "SUB");
    t.add(
        "broadcast: 1 TiB frame header",
        format!("dropped (in {} ms)", took.as_millis()),
    );
    let took = raw::announce_frame(
        endpoint,
        "SUB",
        MAX_MESSAGE_SIZE as u64 + 1,
        &vec![b'x'; MAX_MESSAGE_SIZE + 1],
    );
    t.add(
        "broadcast: frame of 8193 bytes",
        format!("dropped (in {} ms)", took.as_millis()),
    );
    drop((sub, xsub));
    t
}

/// Thousands of crafted requests on the reply socket and abuse of the broadcast
/// socket, while two honest monitors report: every hostile request refused with
/// the expected reason (or dropped), none broadcast or applied, the honest events
/// all applied, the publisher's RSS bounded.
#[test]
fn hostile_inputs_are_refused_while_honest_monitors_are_served() {
    let seed = seed();
    eprintln!("hostile input seed: {seed} (F2B_HOSTILE_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = TestDir::new();
    let publisher = Publisher::start_with(
        &dir.sub("hub"),
        PublisherOptions {
            publisher_extra: "ignore_ip = [\"198.51.100.0/24\"]\nmetrics_bind = \"127.0.0.1:0\"\n"
                .into(),
            ..PublisherOptions::default()
        }
        .without_hub_limits(),
    );
    let nodes: Vec<Node> = ["web1", "web2"]
        .iter()
        .map(|n| Node::start(dir.path(), n, &publisher, NodeOptions::default()))
        .collect();
    let stolen = publisher.secret(STOLEN);
    let pid = publisher.process().pid();

    let mut honest: Vec<(usize, String)> = Vec::new();
    // One honest ban, reported and ACKed before going on. Under load an ACK may come
    // after the monitor's ack_timeout: it resends, and the resend is ACKed
    // `duplicate` (the first was broadcast); either way it was broadcast once.
    let mut honest_event = || {
        let n = honest.len();
        let ip = format!("203.0.113.{}", n + 1);
        let node = &nodes[n % 2];
        node.append_log(&[ban("sshd", &ip)]);
        let line = node
            .monitor()
            .wait_for_event("reported", &[("ip", &ip)], TIMEOUT);
        let status = f2b_tests::field(&line, "status").unwrap_or_default();
        assert!(
            status == "broadcast" || status == "duplicate",
            "honest report of {ip}: {line}"
        );
        honest.push((n % 2, ip));
    };
    honest_event();
    let rss_before = rss_kib(pid);

    let endpoint = publisher.broadcast.clone();
    let broadcast_abuse = std::thread::spawn(move || abuse_broadcast_socket(&endpoint, seed));

    let mut table = Table::default();
    let inputs = crafted(&mut rng, &stolen, &publisher.secret("web1"));
    let client = Client::new(&publisher.reply);
    let started = Instant::now();
    for (i, input) in inputs.iter().enumerate() {
        let reply = client.ask(&input.frames, input.kind);
        table.add(input.kind, outcome(input, &reply));
        if i % 250 == 249 {
            honest_event();
        }
    }

    // Replays: a correctly signed report refused after authentication (an address
    // in the publisher's ignore_ip), its nonce now seen, sent again verbatim.
    for _ in 0..200 {
        let p = to_vec(&report(
            STOLEN,
            "sshd",
            &format!("198.51.100.{}", rng.u8(1..255)),
            &mut rng,
        ));
        let frames = signed(&stolen, STOLEN, p);
        let first = Input {
            kind: "replay: original (ignore_ip)",
            frames: frames.clone(),
            expect: Expect::Nak(&["forbidden"]),
        };
        let reply = client.ask(&first.frames, first.kind);
        table.add(first.kind, outcome(&first, &reply));
        for _ in 0..2 {
            let again = Input {
                kind: "replay: captured request resent verbatim",
                frames: frames.clone(),
                expect: Expect::Nak(&["replayed"]),
            };
            let reply = client.ask(&again.frames, again.kind);
            table.add(again.kind, outcome(&again, &reply));
        }
    }

    // Frames past the size limit, and the 1 TiB header: the connection is dropped.
    for _ in 0..20 {
        let body = vec![b'{'; MAX_MESSAGE_SIZE + 1];
        let took = raw::announce_frame(&publisher.reply, "REQ", body.len() as u64, &body);
        table.add(
            "frames: one of 8193 bytes",
            format!(
                "dropped (<{} ms)",
                took.as_millis().max(1).next_power_of_two()
            ),
        );
    }
    for _ in 0..5 {
        let took = raw::announce_huge_frame(&publisher.reply, "REQ");
        table.add(
            "frames: 1 TiB frame header",
            format!(
                "dropped (<{} ms)",
                took.as_millis().max(1).next_power_of_two()
            ),
        );
    }
    // Raw TCP garbage without ZMTP.
    let addr = publisher.reply.strip_prefix("tcp://").expect("tcp");
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).expect("connect");
        let junk: Vec<u8> = (0..rng.usize(1..4000)).map(|_| rng.u8(..)).collect();
        let _ = s.write_all(&junk);
        table.add("raw TCP garbage (no ZMTP)", "sent, no reply");
    }
    let broadcast_table = broadcast_abuse.join().expect("broadcast abuse thread");
    let took = started.elapsed();

    // Still serving: the last honest events, after all of it.
    honest_event();
    honest_event();
    let rss_after = rss_kib(pid);

    // Every honest event applied on the other node, nothing else applied anywhere.
    for (i, node) in nodes.iter().enumerate() {
        let other = nodes[1 - i].name.as_str();
        let expected: BTreeSet<String> = honest
            .iter()
            .filter(|(n, _)| *n != i)
            .map(|(_, ip)| format!("ban sshd {ip} {other}"))
            .collect();
        for line in &expected {
            node.wait_recorded(line, 1);
        }
        let got: BTreeSet<String> = node.recorded().into_iter().collect();
        assert_eq!(
            got,
            expected,
            "{} applied something hostile\n{}",
            node.name,
            node.report()
        );
        assert_eq!(
            node.recorded().len(),
            expected.len(),
            "{}: applied twice",
            node.name
        );
    }
    let broadcasts = publisher.process().events("broadcast", &[]);
    assert_eq!(
        broadcasts.len(),
        honest.len(),
        "only the honest events are broadcast: {broadcasts:#?}"
    );
    assert!(publisher.process().is_running());

    table.print(&format!(
        "hostile inputs on the reply socket (seed {seed}), {} in {:.1} s",
        table.total(),
        took.as_secs_f64()
    ));
    broadcast_table.print("hostile inputs on the broadcast socket");
    eprintln!(
        "honest events reported during the run: {} (all applied on the other node); \
         publisher VmRSS {rss_before} KiB before, {rss_after} KiB after",
        honest.len()
    );
    // The publisher's own count of what it refused, by reason, against the table.
    let page = scrape(publisher.process());
    let counted = by_reason(&page, "f2b_publisher_events_rejected_total");
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for outcomes in table.rows.values() {
        for (o, n) in outcomes {
            let reason = match o.as_str() {
                "legacy NAK" => "legacy_disabled",
                o if o.starts_with("dropped") || o.starts_with("sent") => continue,
                o => o,
            };
            *sent.entry(reason.to_owned()).or_default() += *n as u64;
        }
    }
    // The raw TCP garbage may happen to parse as old-ZMTP messages, which the
    // publisher refuses too (and no one sees the answer): that much slack.
    let slack = table
        .rows
        .iter()
        .filter(|(k, _)| k.starts_with("raw TCP garbage"))
        .flat_map(|(_, o)| o.values())
        .sum::<usize>() as u64;
    eprintln!(
        "refusals by reason: the suite's NAKs / the publisher's \
         f2b_publisher_events_rejected_total"
    );
    let mut extra = 0;
    let reasons: BTreeSet<&String> = sent.keys().chain(counted.keys()).collect();
    for reason in reasons {
        let n = sent.get(reason).copied().unwrap_or(0);
        let c = counted.get(reason).copied().unwrap_or(0);
        eprintln!("  {reason:<22} {n:>6} / {c:>6}");
        assert!(
            c >= n,
            "{reason}: the publisher counted {c}, the suite got {n} NAKs\n{page}"
        );
        extra += c - n;
    }
    assert!(
        extra <= slack,
        "the publisher refused {extra} more than the suite saw (at most {slack} from raw \
         garbage)\n{page}"
    );
    assert!(
        table.total() >= 5_000,
        "thousands of inputs: {}",
        table.total()
    );
    assert!(
        rss_after <= rss_before + 64 * 1024,
        "the publisher's memory grew from {rss_before} KiB to {rss_after} KiB"
    );
}

// --- forged broadcasts at a subscriber ----------------------------------------------

/// A hostile PUB that a subscriber also follows (an XPUB, so the test sees the
/// subscriber's subscription arrive before sending): unsigned broadcasts, ones
/// signed by another key, signatures of the real key over other bytes, random
/// signatures, wrong frame counts, garbage; and a real broadcast captured from the
/// real publisher and replayed. The subscriber applies none of them, and applies the
/// honest event sent after them.
#[test]
fn forged_broadcasts_are_refused_by_a_subscriber() {
    let seed = seed();
    eprintln!("forged broadcast seed: {seed}");
    let mut rng = fastrand::Rng::with_seed(seed ^ 0xf0f0);
    let dir = TestDir::new();
    let publisher = Publisher::start(&dir.sub("hub"));
    let ctx = zmq::Context::new();
    let xpub = ctx.socket(zmq::XPUB).expect("XPUB");
    xpub.set_linger(0).expect("linger");
    xpub.set_rcvtimeo(i32::try_from(TIMEOUT.as_millis()).expect("fits"))
        .expect("rcvtimeo");
    xpub.set_sndhwm(100_000).expect("sndhwm");
    xpub.bind("tcp://127.0.0.1:*").expect("bind");
    let forged_endpoint = xpub.get_last_endpoint().expect("endpoint").expect("utf-8");
    // A raw subscriber on the real publisher, to capture a real signed broadcast.
    let spy = ctx.socket(zmq::SUB).expect("SUB");
    spy.set_rcvtimeo(i32::try_from(TIMEOUT.as_millis()).expect("fits"))
        .expect("rcvtimeo");
    spy.set_subscribe(b"ev:").expect("subscribe");
    spy.connect(&publisher.broadcast).expect("connect");

    let web1 = Node::start(
        dir.path(),
        "web1",
        &publisher,
        NodeOptions {
            subscriber: false,
            ..NodeOptions::default()
        },
    );
    let web2 = Node::start(
        dir.path(),
        "web2",
        &publisher,
        NodeOptions {
            monitor: false,
            also_follow: vec![forged_endpoint.clone()],
            subscriber_extra: "metrics_bind = \"127.0.0.1:0\"\n".into(),
            ..NodeOptions::default()
        },
    );
    // The subscriber's subscriptions reached the hostile PUB.
    let sub = xpub
        .recv_bytes(0)
        .expect("a subscription from the subscriber within the timeout");
    assert_eq!(sub.first(), Some(&1), "a subscribe message: {sub:?}");

    // A real broadcast, applied, captured by the spy (the spy may have joined late:
    // probe until it sees one).
    let mut captured = None;
    for i in 1..=20 {
        let ip = format!("203.0.113.{i}");
        web1.append_log(&[ban("sshd", &ip)]);
        web2.wait_recorded(&format!("ban sshd {ip} web1"), 1);
        if let Ok(frames) = spy.recv_multipart(zmq::DONTWAIT) {
            captured = Some(frames);
            break;
        }
        if i == 20 {
            captured = Some(spy.recv_multipart(0).expect("the spy saw a broadcast"));
        }
    }
    let captured = captured.expect("a captured broadcast");
    assert_eq!(captured.len(), 3, "topic, payload, signature");

    let other = SigningKey::from_seed(random_bytes());
    let real = publisher.keyring().signing_key().clone();
    let mut t = Table::default();
    let mut forged_ips = Vec::new();
    let mut event = |rng: &mut fastrand::Rng, seq: u64| {
        let ip = format!("192.0.2.{}", rng.u8(1..255));
        let id = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            rng.u32(..),
            rng.u64(..1 << 48)
        );
        let payload = to_vec(&json!({
            "v": 1, "type": "event", "seq": seq, "epoch": "00000000000000ff",
            "event": {"id": id, "node": "web9", "jail": "sshd", "action": "ban", "ip": ip, "time_ms": raw::now_ms()},
        }));
        forged_ips.push(ip);
        (b"ev:sshd\0".to_vec(), payload)
    };
    for i in 0..500u64 {
        let (topic, payload) = event(&mut rng, 1_000_000 + i);
        let frames: Vec<Vec<u8>> = match i % 8 {
            0 => {
                t.add("forged: unsigned (2 frames)", "sent");
                vec![topic, payload]
            }
            1 => {
                let s = auth::sign_broadcast(&other, &topic, &payload);
                t.add("forged: signed by another key", "sent");
                vec![topic, payload, s.to_vec()]
            }
            2 => {
                // The real key's signature over other bytes, with this payload.
                let s = auth::sign_broadcast(&real, &topic, b"{}");
                t.add("forged: real signature transplanted", "sent");
                vec![topic, payload, s.to_vec()]
            }
            3 => {
                let s: Vec<u8> = (0..64).map(|_| rng.u8(..)).collect();
                t.add("forged: random 64-byte signature", "sent");
                vec![topic, payload, s]
            }
            4 => {
                let s = auth::sign_broadcast(&other, &topic, &payload);
                t.add("forged: signature truncated/extended", "sent");
                let mut s = s.to_vec();
                if rng.bool() {
                    s.pop();
                } else {
                    s.push(0);
                }
                vec![topic, payload, s]
            }
            5 => {
                let s = auth::sign_broadcast(&other, &topic, &payload);
                t.add("forged: 4 frames", "sent");
                vec![topic, payload, s.to_vec(), b"x".to_vec()]
            }
            6 => {
                t.add("forged: garbage payload", "sent");
                let junk: Vec<u8> = (0..rng.usize(0..500)).map(|_| rng.u8(..)).collect();
                vec![topic, junk, vec![0; 64]]
            }
            _ => {
                let hb = to_vec(
                    &json!({"v":1,"type":"heartbeat","seq":999_999,"epoch":"00000000000000ff","interval_ms":1000}),
                );
                t.add("forged: unsigned heartbeat (new epoch)", "sent");
                vec![b"hb:\0".to_vec(), hb]
            }
        };
        xpub.send_multipart(frames, 0).expect("send forged");
    }
    for _ in 0..50 {
        xpub.send_multipart(captured.clone(), 0)
            .expect("send replay");
        t.add("replayed: a real signed broadcast, verbatim", "sent");
    }
    // The replays were sent last on that connection, which keeps order: once the
    // first is refused, every forged broadcast before it has been handled.
    web2.subscriber()
        .wait_for_event("broadcast ignored", &[("reason", "replayed")], TIMEOUT);
    // The marker: an honest event after all of it.
    web1.append_log(&[ban("sshd", "203.0.113.200")]);
    web2.wait_recorded("ban sshd 203.0.113.200 web1", 1);
    let s = web2.subscriber();
    s.wait_for_event("broadcast refused", &[("reason", "unsigned")], TIMEOUT);
    s.wait_for_event("broadcast refused", &[("reason", "bad_signature")], TIMEOUT);
    let sent = t.total();
    let recorded = web2.recorded();
    for ip in &forged_ips {
        assert!(
            !recorded.iter().any(|l| l.contains(&format!(" {ip} "))),
            "forged {ip} applied: {recorded:?}"
        );
    }
    let mut seen = BTreeSet::new();
    for l in &recorded {
        assert!(
            seen.insert(l.clone()),
            "{l} applied twice (a replay): {recorded:?}"
        );
        assert!(l.ends_with(" web1"), "{l}");
    }
    // What the subscriber counted (its metrics): every unsigned and wrongly signed
    // broadcast, and the replays.
    let page = scrape(s);
    let refused = by_reason(&page, "f2b_subscriber_broadcasts_refused_total");
    let kinds = |names: &[&str]| -> u64 {
        names
            .iter()
            .map(|k| t.rows.get(k).map_or(0, |o| o.values().sum::<usize>()) as u64)
            .sum()
    };
    let unsigned = kinds(&[
        "forged: unsigned (2 frames)",
        "forged: unsigned heartbeat (new epoch)",
    ]);
    let bad = kinds(&[
        "forged: signed by another key",
        "forged: real signature transplanted",
        "forged: random 64-byte signature",
        "forged: signature truncated/extended",
        "forged: garbage payload",
    ]);
    let replayed = kinds(&["replayed: a real signed broadcast, verbatim"]);
    let got = |r: &str| refused.get(r).copied().unwrap_or(0);
    t.print(&format!(
        "forged broadcasts at a subscriber (seed {seed}), {sent} sent, none applied; the \
         subscriber's f2b_subscriber_broadcasts_refused_total: {refused:?}"
    ));
    assert!(
        got("unsigned") >= unsigned,
        "unsigned: {refused:?}, sent {unsigned}"
    );
    assert!(
        got("bad_signature") >= bad,
        "bad_signature: {refused:?}, sent {bad}"
    );
    assert!(
        got("replayed") >= replayed,
        "replayed: {refused:?}, sent {replayed}"
    );
    // Every message sent on the hostile PUB was refused one way or another.
    let total: u64 = refused.values().sum();
    assert!(
        total >= sent as u64,
        "{sent} hostile broadcasts sent, {total} refused: {refused:?}"
    );
}
