//! The operations side of the `f2b-publisher` binary: its metrics endpoint
//! (`[publisher] metrics_bind`), the configuration reload on SIGHUP, the fleet
//! command line (`bans`, `status`) and the errors that say what to check.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use f2b_common::sockets::new_socket;
use f2b_common::testing::{daemon_command, http_get, sample, Process};
use f2b_common::zmq;
use f2b_proto::auth::{MonitorSecret, RequestAuth, SigningKey};
use f2b_proto::{AckStatus, NakReason, NodeName, Reply};

const DEADLINE: Duration = Duration::from_secs(10);
const WEB1: &str = "web1-secret-SHOULD-NOT-BE-LOGGED-0123456789";
const WEB2: &str = "web2-secret-SHOULD-NOT-BE-LOGGED-0123456789";
const WEB3: &str = "web3-secret-SHOULD-NOT-BE-LOGGED-0123456789";
const KEY_SEED: [u8; 32] = [7; 32];

/// A configuration file, a signing key and a state directory, removed on drop.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("publisher.key"),
            SigningKey::from_seed(KEY_SEED).to_file_text(),
        )
        .unwrap();
        Setup { dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("publisher.conf")
    }

    /// Writes the configuration: ephemeral binds unless `publisher` sets them,
    /// `publisher` lines in `[publisher]`, and `monitors` (name, secret) in
    /// `[trust.monitors]`.
    fn write(&self, publisher: &str, monitors: &[(&str, &str)]) -> PathBuf {
        let binds = if publisher.contains("reply_bind") {
            String::new()
        } else {
            "reply_bind = \"tcp://127.0.0.1:*\"\nbroadcast_bind = \"tcp://127.0.0.1:*\"\n".into()
        };
        let mut text = format!(
            "[node]\nname = \"hub\"\n[publisher]\n{binds}heartbeat_interval = \"250ms\"\n\
             state_dir = {:?}\npidfile = {:?}\n{publisher}\n[trust]\nsigning_key_file = {:?}\n\
             [trust.monitors]\n",
            self.state_dir().display().to_string(),
            self.dir.path().join("publisher.pid").display().to_string(),
            self.dir.path().join("publisher.key").display().to_string(),
        );
        for (name, secret) in monitors {
            text.push_str(&format!("{name} = {secret:?}\n"));
        }
        std::fs::write(self.path(), text).unwrap();
        self.path()
    }
}

fn publisher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_f2b-publisher"))
}

/// The publisher with this configuration, its stderr lines awaited with
/// [`Process::wait_for_all`]; killed by PID on drop if still running.
fn start(config: &Path) -> Process {
    Process::spawn(&mut daemon_command(
        env!("CARGO_BIN_EXE_f2b-publisher"),
        config,
    ))
}

/// SIGTERM, then the exit status once standard error closed.
fn terminate(p: &mut Process) -> ExitStatus {
    p.signal("TERM");
    p.wait_exit(DEADLINE)
}

fn field(line: &str, key: &str) -> String {
    let start = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    line[start..].split(' ').next().unwrap().to_owned()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A report of `action` of `ip` in `jail` by `node`, signed with `secret` (or
/// without an authentication frame when `None`).
fn report(
    node: &str,
    secret: Option<&str>,
    id: u128,
    jail: &str,
    ip: &str,
    action: f2b_proto::Action,
) -> Vec<Vec<u8>> {
    let now = now_ms();
    let e = f2b_proto::Event::new(
        f2b_proto::EventId::from_u128(id),
        NodeName::new(node).unwrap(),
        f2b_proto::JailName::new(jail).unwrap(),
        action,
        ip.parse().unwrap(),
        now,
    )
    .unwrap();
    let payload = f2b_proto::Request::Report(e).encode();
    let mut frames = vec![payload];
    if let Some(secret) = secret {
        let a = RequestAuth::sign(
            &MonitorSecret::new(secret).unwrap(),
            &NodeName::new(node).unwrap(),
            now,
            std::array::from_fn(|_| fastrand::u8(..)),
            &frames[0],
        );
        frames.push(a.encode());
    }
    frames
}

fn ban(node: &str, secret: Option<&str>, id: u128, ip: &str) -> Vec<Vec<u8>> {
    report(node, secret, id, "sshd", ip, f2b_proto::Action::Ban)
}

fn req_socket(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let req = new_socket(ctx, zmq::REQ).unwrap();
    req.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    req.connect(endpoint).unwrap();
    req
}

/// Sends a request and returns its reply's first frame, decoded.
fn ask(req: &zmq::Socket, frames: Vec<Vec<u8>>) -> Reply {
    req.send_multipart(frames, 0).unwrap();
    let reply = req.recv_multipart(0).unwrap();
    Reply::decode(&reply[0]).unwrap()
}

fn nak_reason(r: &Reply) -> Option<NakReason> {
    match r {
        Reply::Nak(n) => Some(n.reason),
        Reply::Ack(_) => None,
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn ack_status(r: &Reply) -> Option<AckStatus> {
    match r {
        Reply::Ack(a) => Some(a.status),
        _ => None,
    }
}

/// One HTTP GET over TCP: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    http_get(addr, path, DEADLINE)
}

/// Scrapes `/metrics` until every `(series, value)` holds; fails at the deadline
/// with the last scrape.
fn scrape_until(addr: &str, want: &[(&str, f64)]) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let (code, text) = get(addr, "/metrics");
        assert_eq!(code, 200, "{text}");
        let missing: Vec<_> = want
            .iter()
            .filter(|(s, v)| sample(&text, s) != Some(*v))
            .collect();
        if missing.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < end,
            "{missing:?} not as wanted in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_count_reports_refusals_peers_and_answer_readyz() {
    let setup = Setup::new();
    let conf = setup.write("metrics_bind = \"127.0.0.1:0\"", &[("web1", WEB1)]);
    let mut p = start(&conf);
    let line = p.wait_for_all(&["metrics listening on"], DEADLINE);
    let addr = field(&line, "addr");
    assert!(!addr.ends_with(":0"), "{line}");
    let line = p.wait_for_all(&["listening on", "reply="], DEADLINE);
    let (reply, broadcast) = (field(&line, "reply"), field(&line, "broadcast"));
    // Ready once the sockets are bound and the ledger open (the `listening on`
    // line comes just before the readiness is set).
    let end = Instant::now() + DEADLINE;
    loop {
        let (code, body) = get(&addr, "/readyz");
        if code == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("not ready: "), "{body}");
        assert!(Instant::now() < end, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&addr, "/healthz").0, 200);
    let before = scrape_until(&addr, &[("f2b_publisher_events_accepted_total", 0.0)]);
    assert_eq!(
        sample(&before, "f2b_publisher_connected_peers{socket=\"reply\"}"),
        Some(0.0),
        "{before}"
    );

    let ctx = zmq::Context::new();
    let sub = new_socket(&ctx, zmq::SUB).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.connect(&broadcast).unwrap();
    let req = req_socket(&ctx, &reply);
    for (id, ip) in [(1, "203.0.113.1"), (2, "203.0.113.2")] {
        let r = ask(&req, ban("web1", Some(WEB1), id, ip));
        assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");
    }
    // The same event again: a duplicate.
    let r = ask(&req, ban("web1", Some(WEB1), 1, "203.0.113.1"));
    assert_eq!(ack_status(&r), Some(AckStatus::Duplicate), "{r:?}");
    // Refused: no authentication frame, an unknown credential, garbage.
    let r = ask(&req, ban("web1", None, 3, "203.0.113.3"));
    assert_eq!(nak_reason(&r), Some(NakReason::Unauthenticated), "{r:?}");
    let r = ask(&req, ban("web9", Some(WEB2), 4, "203.0.113.4"));
    assert_eq!(nak_reason(&r), Some(NakReason::Unauthenticated), "{r:?}");
    let r = ask(&req, vec![b"{garbage".to_vec()]);
    assert_eq!(nak_reason(&r), Some(NakReason::Malformed), "{r:?}");
    let r = ask(&req, ban("web1", Some(WEB1), 5, "127.0.0.1"));
    assert_eq!(nak_reason(&r), Some(NakReason::Forbidden), "{r:?}");
    // A snapshot page.
    let snap = f2b_proto::Request::Snapshot(f2b_proto::SnapshotRequest {
        jails: Vec::new(),
        cursor: None,
        nonce: None,
    })
    .encode();
    req.send(snap, 0).unwrap();
    req.recv_multipart(0).unwrap();

    scrape_until(
        &addr,
        &[
            ("f2b_publisher_reports_received_total", 8.0),
            ("f2b_publisher_events_accepted_total", 2.0),
            ("f2b_publisher_events_duplicate_total", 1.0),
            (
                "f2b_publisher_events_rejected_total{reason=\"unauthenticated\"}",
                2.0,
            ),
            (
                "f2b_publisher_events_rejected_total{reason=\"malformed\"}",
                1.0,
            ),
            (
                "f2b_publisher_events_rejected_total{reason=\"forbidden\"}",
                1.0,
            ),
            (
                "f2b_publisher_events_rejected_total{reason=\"quarantined\"}",
                0.0,
            ),
            ("f2b_publisher_events_broadcast_total", 2.0),
            ("f2b_publisher_snapshots_served_total", 1.0),
            ("f2b_publisher_sequence", 2.0),
            ("f2b_publisher_ledger_active_bans", 2.0),
            ("f2b_publisher_connected_peers{socket=\"reply\"}", 1.0),
            ("f2b_publisher_connected_peers{socket=\"broadcast\"}", 1.0),
            ("f2b_publisher_quarantined_nodes", 0.0),
        ],
    );
    // Heartbeats go out every 250 ms.
    let end = Instant::now() + DEADLINE;
    loop {
        let (_, text) = get(&addr, "/metrics");
        if sample(&text, "f2b_publisher_heartbeats_sent_total").unwrap_or(0.0) >= 2.0 {
            break;
        }
        assert!(Instant::now() < end, "no heartbeats counted:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The peers leave: the socket monitors count them out.
    drop(req);
    drop(sub);
    scrape_until(
        &addr,
        &[
            ("f2b_publisher_connected_peers{socket=\"reply\"}", 0.0),
            ("f2b_publisher_connected_peers{socket=\"broadcast\"}", 0.0),
        ],
    );
    assert_eq!(terminate(&mut p).code(), Some(0));
}

/// The circuit breaker's trips are counted, and the node shows as quarantined.
#[test]
fn metrics_count_quarantines() {
    let setup = Setup::new();
    let conf = setup.write(
        "metrics_bind = \"127.0.0.1:0\"\nquarantine_floor = 3\nrate_limit = 0",
        &[("web1", WEB1)],
    );
    let mut p = start(&conf);
    let addr = field(&p.wait_for_all(&["metrics listening on"], DEADLINE), "addr");
    let reply = field(
        &p.wait_for_all(&["listening on", "reply="], DEADLINE),
        "reply",
    );
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    let mut quarantined = 0;
    for id in 1..=6u128 {
        let r = ask(
            &req,
            ban("web1", Some(WEB1), id, &format!("203.0.113.{id}")),
        );
        if nak_reason(&r) == Some(NakReason::Quarantined) {
            quarantined += 1;
        }
    }
    assert!(quarantined >= 2, "{quarantined}");
    scrape_until(
        &addr,
        &[
            ("f2b_publisher_quarantines_total", 1.0),
            ("f2b_publisher_quarantined_nodes", 1.0),
            (
                "f2b_publisher_events_rejected_total{reason=\"quarantined\"}",
                f64::from(quarantined),
            ),
        ],
    );
    assert_eq!(terminate(&mut p).code(), Some(0));
}

/// SIGHUP reloads the credentials: a node removed is refused from its next
/// report, a node added works; settings that need a restart are named and not
/// applied; an invalid file is refused with its name and key and the running
/// settings stay; no secret is logged.
#[test]
fn sighup_revokes_and_adds_credentials_and_keeps_running_on_an_invalid_file() {
    let setup = Setup::new();
    let conf = setup.write("", &[("web1", WEB1), ("web2", WEB2)]);
    let mut p = start(&conf);
    let line = p.wait_for_all(&["listening on", "reply="], DEADLINE);
    let reply = field(&line, "reply");
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    let r = ask(&req, ban("web2", Some(WEB2), 1, "203.0.113.1"));
    assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");
    let r = ask(&req, ban("web3", Some(WEB3), 2, "203.0.113.2"));
    assert_eq!(nak_reason(&r), Some(NakReason::Unauthenticated), "{r:?}");

    // web2 revoked, web3 added, a bind changed (not applied), a guard setting.
    setup.write(
        "reply_bind = \"tcp://127.0.0.1:1\"\nbroadcast_bind = \"tcp://127.0.0.1:*\"\n\
         ignore_ip = [\"198.51.100.0/24\"]",
        &[("web1", WEB1), ("web3", WEB3)],
    );
    p.signal("HUP");
    let restart = p.wait_for_all(&["publisher.reply_bind", "needs a restart"], DEADLINE);
    assert!(restart.contains(" WARN "), "{restart}");
    p.wait_for_all(&["reload:", "added web3"], DEADLINE);
    p.wait_for_all(&["reload:", "removed web2"], DEADLINE);
    p.wait_for_all(&["reload:", "publisher.ignore_ip"], DEADLINE);
    let done = p.wait_for_all(&["configuration reloaded"], DEADLINE);
    assert_eq!(field(&done, "monitors"), "2", "{done}");

    let r = ask(&req, ban("web2", Some(WEB2), 3, "203.0.113.3"));
    assert_eq!(nak_reason(&r), Some(NakReason::Unauthenticated), "{r:?}");
    let r = ask(&req, ban("web3", Some(WEB3), 4, "203.0.113.4"));
    assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");
    let r = ask(&req, ban("web3", Some(WEB3), 5, "198.51.100.7"));
    assert_eq!(nak_reason(&r), Some(NakReason::Forbidden), "{r:?}");
    // Still on the old reply endpoint.
    let r = ask(&req, ban("web1", Some(WEB1), 6, "203.0.113.6"));
    assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");

    // An invalid file: an ERROR naming the file and the key; nothing changes.
    std::fs::write(
        setup.path(),
        std::fs::read_to_string(setup.path())
            .unwrap()
            .replace("[publisher]\n", "[publisher]\nrate_limit = \"lots\"\n")
            .replace(&format!("web1 = {WEB1:?}\n"), ""),
    )
    .unwrap();
    p.signal("HUP");
    let err = p.wait_for_all(&["reload failed"], DEADLINE);
    assert!(err.contains("ERROR"), "{err}");
    assert!(err.contains("publisher.conf"), "{err}");
    assert!(err.contains("publisher.rate_limit"), "{err}");
    let r = ask(&req, ban("web1", Some(WEB1), 7, "203.0.113.7"));
    assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");
    let r = ask(&req, ban("web2", Some(WEB2), 8, "203.0.113.8"));
    assert_eq!(nak_reason(&r), Some(NakReason::Unauthenticated), "{r:?}");

    // A valid file again, without any credential: refused as at start.
    setup.write("", &[]);
    p.signal("HUP");
    let err = p.wait_for_all(&["reload failed"], DEADLINE);
    assert!(err.contains("trust.monitors"), "{err}");
    let r = ask(&req, ban("web3", Some(WEB3), 9, "203.0.113.9"));
    assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");

    assert_eq!(terminate(&mut p).code(), Some(0));
    let leaked: Vec<&String> = p
        .seen()
        .iter()
        .filter(|l| l.contains("SHOULD-NOT-BE-LOGGED"))
        .collect();
    assert!(leaked.is_empty(), "a secret was logged: {leaked:?}");
}

/// Runs `f2b-publisher ARGS --config CONF`: exit code, stdout, stderr.
fn fleet(conf: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = publisher()
        .args(args)
        .arg("--config")
        .arg(conf)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn json_rows(conf: &Path, args: &[&str]) -> Vec<serde_json::Value> {
    let (code, out, err) = fleet(conf, args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    match serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}")) {
        serde_json::Value::Array(rows) => rows,
        other => panic!("not an array: {other}"),
    }
}

/// The files of a directory: name, size and a hash of the content.
fn snapshot_dir(dir: &Path) -> Vec<(String, u64, u64)> {
    use std::hash::{Hash, Hasher};
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            (
                e.file_name().to_string_lossy().into_owned(),
                bytes.len() as u64,
                h.finish(),
            )
        })
        .collect();
    all.sort();
    all
}

/// `bans` and `status` on the ledger of a real run: while the daemon runs and
/// after it stopped, read-only, with filters, as a table and as JSON; a missing
/// ledger and an older schema are explained, never created or upgraded.
#[test]
fn bans_and_status_read_the_ledger_of_a_real_run() {
    let setup = Setup::new();
    let conf = setup.write("ban_time = \"1h\"", &[("web1", WEB1), ("web2", WEB2)]);
    let ledger = setup.state_dir().join("ledger.sqlite3");

    let (code, out, err) = fleet(&conf, &["bans"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(&format!(
            "no ledger at {}: is [publisher] state_dir right, has the publisher run?",
            ledger.display()
        )),
        "{err}"
    );
    let (code, out, _) = fleet(&conf, &["status"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("not running"), "{out}");
    assert!(out.contains("no ledger at"), "{out}");
    assert!(
        !setup.state_dir().exists(),
        "bans or status created the state"
    );

    let mut p = start(&conf);
    let epoch = field(&p.wait_for_all(&[": ledger path="], DEADLINE), "epoch");
    let reply = field(
        &p.wait_for_all(&["listening on", "reply="], DEADLINE),
        "reply",
    );
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    use f2b_proto::Action::{Ban, Unban};
    for (id, node, secret, jail, ip, action) in [
        (1, "web1", WEB1, "sshd", "203.0.113.1", Ban),
        (2, "web1", WEB1, "nginx", "203.0.113.2", Ban),
        (3, "web2", WEB2, "sshd", "198.51.100.3", Ban),
        (4, "web2", WEB2, "sshd", "2001:db8::1", Ban),
        (5, "web1", WEB1, "sshd", "203.0.113.1", Unban),
    ] {
        let r = ask(&req, report(node, Some(secret), id, jail, ip, action));
        assert_eq!(ack_status(&r), Some(AckStatus::Broadcast), "{r:?}");
    }

    // While it runs.
    let rows = json_rows(&conf, &["bans", "--json"]);
    let ips: Vec<&str> = rows.iter().map(|r| r["ip"].as_str().unwrap()).collect();
    assert_eq!(
        ips,
        ["203.0.113.2", "198.51.100.3", "2001:db8::1"],
        "{rows:?}"
    );
    let r = &rows[0];
    assert_eq!(r["node"], "web1");
    assert_eq!(r["jail"], "nginx");
    assert_eq!(r["seq"], 2);
    assert_eq!(r["reported_by"], "web1");
    assert_eq!(r["action"], "ban");
    assert_eq!(r["active"], true);
    assert_eq!(
        r["expires_ms"].as_u64().unwrap() - r["since_ms"].as_u64().unwrap(),
        3_600_000
    );
    assert!(r["since"].as_str().unwrap().ends_with('Z'), "{r}");
    let seqs = |args: &[&str]| -> Vec<u64> {
        json_rows(&conf, args)
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&["bans", "--json", "--jail", "sshd"]), [3, 4]);
    assert_eq!(seqs(&["bans", "--json", "--node", "web1"]), [2]);
    assert_eq!(seqs(&["bans", "--json", "--node", "Web2"]), [3, 4]);
    assert_eq!(seqs(&["bans", "--json", "--ip", "198.51.100.0/24"]), [3]);
    assert_eq!(seqs(&["bans", "--json", "--ip", "2001:db8::1"]), [4]);
    assert_eq!(
        seqs(&["bans", "--json", "--ip", "203.0.113.1"]),
        Vec::<u64>::new()
    );
    assert_eq!(seqs(&["bans", "--json", "--all"]), [1, 2, 3, 4, 5]);
    let all = json_rows(&conf, &["bans", "--json", "--all", "--ip", "203.0.113.1"]);
    assert_eq!(all[0]["active"], false);
    assert_eq!(all[1]["action"], "unban");
    assert_eq!(all[1]["expires_ms"], serde_json::Value::Null);

    let (code, table, err) = fleet(&conf, &["bans"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("REPORTED_BY"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("web1")
            && lines[1].contains("nginx")
            && lines[1].contains("203.0.113.2"),
        "{table}"
    );
    assert_eq!(lines.len(), 5, "{table}");
    assert_eq!(lines[4], "3 rows", "{table}");
    let (code, out, err) = fleet(&conf, &["bans", "--ip", "not-an-ip"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(err.contains("--ip"), "{err}");

    let (code, out, _) = fleet(&conf, &["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("running (process {})", p.id())),
        "{out}"
    );
    for want in [
        format!("epoch:        {epoch}"),
        "last seq:     5 (5 rows kept)".to_owned(),
        "active bans:  3".to_owned(),
        "by jail:    nginx 1, sshd 2".to_owned(),
        "by node:    web1 1, web2 2".to_owned(),
        "monitors:     2 credentials (web1, web2)".to_owned(),
        format!("public key:   {}", SigningKey::from_seed(KEY_SEED).public()),
    ] {
        assert!(out.contains(&want), "{want:?} missing in:\n{out}");
    }
    assert!(!out.contains("SHOULD-NOT-BE-LOGGED"), "{out}");
    let (code, out, _) = fleet(&conf, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["running"], true);
    assert_eq!(v["processes"][0], p.id());
    assert_eq!(v["ledger"]["last_seq"], 5);
    assert_eq!(v["ledger"]["active_bans"], 3);
    assert_eq!(v["ledger"]["by_node"]["web2"], 2);
    assert_eq!(v["trust"]["monitors"][1], "web2");
    assert!(!out.contains("SHOULD-NOT-BE-LOGGED"), "{out}");

    // Stopped: the same answers, and nothing in the state directory changes.
    drop(req);
    assert_eq!(terminate(&mut p).code(), Some(0));
    let before = snapshot_dir(&setup.state_dir());
    assert_eq!(seqs(&["bans", "--json"]), [2, 3, 4]);
    let (code, out, _) = fleet(&conf, &["status"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("not running") && out.contains("active bans:  3"),
        "{out}"
    );
    assert_eq!(
        snapshot_dir(&setup.state_dir()),
        before,
        "the state directory changed"
    );

    // An older schema is named, not upgraded.
    let conn = rusqlite::Connection::open(&ledger).unwrap();
    conn.pragma_update(None, "user_version", 2).unwrap();
    drop(conn);
    let before = snapshot_dir(&setup.state_dir());
    let (code, _, err) = fleet(&conf, &["bans"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("schema version 2") && err.contains("upgrades the ledger"),
        "{err}"
    );
    assert_eq!(
        snapshot_dir(&setup.state_dir()),
        before,
        "the ledger was changed"
    );
}

/// Starts the daemon with `conf` expecting it to fail: its standard error.
fn fails_to_start(conf: &Path) -> String {
    let out = publisher()
        .arg("--config")
        .arg(conf)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr).unwrap()
}

/// A port in use, an interface that does not exist, a metrics port in use and a
/// state_dir that cannot be one: each error names the key and says what to
/// check.
#[test]
fn start_errors_say_what_to_check() {
    let first = Setup::new();
    let mut p = start(&first.write("metrics_bind = \"127.0.0.1:0\"", &[("web1", WEB1)]));
    let metrics = field(&p.wait_for_all(&["metrics listening on"], DEADLINE), "addr");
    let reply = field(
        &p.wait_for_all(&["listening on", "reply="], DEADLINE),
        "reply",
    );

    let setup = Setup::new();
    let conf = setup.write(
        &format!("reply_bind = {reply:?}\nbroadcast_bind = \"tcp://127.0.0.1:*\""),
        &[("web1", WEB1)],
    );
    let err = fails_to_start(&conf);
    for want in [
        &format!("cannot bind publisher.reply_bind = {reply}"),
        "Address already in use",
        "another process listens on that port",
        "change publisher.reply_bind",
    ] {
        assert!(err.contains(want), "{want:?} missing in {err}");
    }

    let conf = setup.write(
        "reply_bind = \"tcp://127.0.0.1:*\"\nbroadcast_bind = \"tcp://nosuchif0:5680\"",
        &[("web1", WEB1)],
    );
    let err = fails_to_start(&conf);
    for want in [
        "cannot bind publisher.broadcast_bind = tcp://nosuchif0:5680",
        "no network interface of that name",
        "check publisher.broadcast_bind",
    ] {
        assert!(err.contains(want), "{want:?} missing in {err}");
    }

    let conf = setup.write(&format!("metrics_bind = {metrics:?}"), &[("web1", WEB1)]);
    let err = fails_to_start(&conf);
    for want in [
        "publisher.metrics_bind",
        &metrics,
        "another process listens on that port",
    ] {
        assert!(err.contains(want), "{want:?} missing in {err}");
    }
    assert_eq!(terminate(&mut p).code(), Some(0));

    // state_dir is a file.
    let file = setup.dir.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let conf = setup.write("", &[("web1", WEB1)]);
    let text = std::fs::read_to_string(&conf).unwrap().replace(
        &format!("state_dir = {:?}", setup.state_dir().display().to_string()),
        &format!("state_dir = {:?}", file.display().to_string()),
    );
    std::fs::write(&conf, text).unwrap();
    let err = fails_to_start(&conf);
    for want in [
        &format!("cannot create the state directory {}", file.display()),
        "[publisher] state_dir",
    ] {
        assert!(err.contains(want), "{want:?} missing in {err}");
    }
}

/// `status` asks `/readyz` on `metrics_bind`, and tells a stale pidfile from a
/// running daemon.
#[test]
fn status_probes_the_metrics_endpoint_and_sees_a_stale_pidfile() {
    let setup = Setup::new();
    let conf = setup.write("metrics_bind = \"127.0.0.1:0\"", &[("web1", WEB1)]);
    // A pidfile naming a process that is not f2b-publisher (this test).
    std::fs::write(
        setup.dir.path().join("publisher.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    let (code, out, _) = fleet(&conf, &["status"]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("stale pidfile"), "{out}");
    assert!(out.contains("port 0"), "{out}");

    let mut p = start(&conf);
    let addr = field(&p.wait_for_all(&["metrics listening on"], DEADLINE), "addr");
    p.wait_for_all(&["listening on", "reply="], DEADLINE);
    // The port it chose, written where status reads it (the daemon has bound it
    // already and reads the file again only on SIGHUP).
    setup.write(&format!("metrics_bind = {addr:?}"), &[("web1", WEB1)]);
    let end = Instant::now() + DEADLINE;
    loop {
        let (code, out, _) = fleet(&conf, &["status", "--json"]);
        assert_eq!(code, Some(0), "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["metrics"]["addr"], addr.as_str(), "{v}");
        if v["metrics"]["ready"] == true {
            assert_eq!(v["metrics"]["answer"], "ready", "{v}");
            break;
        }
        assert!(Instant::now() < end, "never ready: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, _) = fleet(&conf, &["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("metrics:      http://{addr}/readyz: ready")),
        "{out}"
    );
    assert!(out.contains(&format!("metrics on {addr}")), "{out}");
    assert_eq!(terminate(&mut p).code(), Some(0));
}
