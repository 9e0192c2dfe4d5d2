//! The built binary: `scan`, `--check`, SIGTERM, and `send` against a stand-in
//! publisher that checks credentials.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{append, bind_loopback, wait_offset, ACTION, WAIT};
use f2b_common::testing::{daemon_command, Process};
use f2b_common::zmq;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-monitor");

fn data(file: &str) -> String {
    format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn scan(args: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let events = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn short(v: &serde_json::Value) -> String {
    format!(
        "{}:{} {} {}",
        v["line"],
        v["action"].as_str().unwrap(),
        v["jail"].as_str().unwrap(),
        v["ip"].as_str().unwrap()
    )
}

#[test]
fn scan_without_a_config_file() {
    // No --config: the default path is read if it exists, and scan works
    // without it.
    let (code, events, stderr) = scan(&["scan", &data("fail2ban-1.0.2.log")]);
    assert_eq!(code, 0, "{stderr}");
    let got: Vec<String> = events.iter().map(short).collect();
    assert_eq!(
        got,
        [
            "6:ban sshd-test 203.0.113.5",
            "7:ban sshd-test 2001:db8::dead:beef",
            "9:ban manual 198.51.100.10",
            "10:unban manual 198.51.100.10",
            "11:unban sshd-test 2001:db8::dead:beef",
        ]
    );
    // RFC 3339 with the local offset, milliseconds kept.
    let t = events[0]["time"].as_str().unwrap();
    assert!(t.starts_with("2026-11-21T04:52:53.446"), "{t}");
    chrono::DateTime::parse_from_rfc3339(t).unwrap();
}

#[test]
fn scan_applies_ignore_jails_from_an_explicit_config() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("f2b.conf");
    std::fs::write(
        &conf,
        "[node]\nname = \"web1\"\n[monitor]\nignore_jails = [\"manual\"]\n",
    )
    .unwrap();
    let (code, events, stderr) = scan(&[
        "--config",
        conf.to_str().unwrap(),
        "scan",
        &data("fail2ban-1.0.2.log"),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e["jail"] == "sshd-test"));
    // The older formats and syslog.
    let (code, events, _) = scan(&["scan", &data("older-versions.log")]);
    assert_eq!(code, 0);
    assert_eq!(events.len(), 6);
}

#[test]
fn scan_with_an_invalid_explicit_config_fails() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.conf");
    std::fs::write(&conf, "[monitor]\nignore_jails = [\"bad jail\"]\n").unwrap();
    let (code, events, stderr) = scan(&[
        "--config",
        conf.to_str().unwrap(),
        "scan",
        &data("fail2ban-1.0.2.log"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(events.is_empty());
    assert!(stderr.contains("monitor.ignore_jails[0]"), "{stderr}");
    let (code, _, stderr) = scan(&[
        "--config",
        "/nonexistent/f2b.conf",
        "scan",
        &data("older-versions.log"),
    ]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = scan(&["scan", "/nonexistent/fail2ban.log"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("/nonexistent/fail2ban.log"), "{stderr}");
}

/// web1's credential, in `[trust] secret_file`.
const SECRET: &str = "cli-test-secret-0123456789abcdefghijklmnopq";

/// `[trust]` with web1's secret in a file (mode 0600) in `dir`.
fn trust_section(dir: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("node.secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!("[trust]\nsecret_file = {:?}\n", file.to_str().unwrap())
}

/// A config for the daemon as web1 in `dir`, tailing `log`, with `monitor`
/// (lines such as `publisher = ...`) added to its `[monitor]` section.
fn monitor_config(dir: &Path, log: &Path, monitor: &str) -> std::path::PathBuf {
    let conf = dir.join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[monitor]\nlog_path = {:?}\n{monitor}state_dir = {:?}\n{}",
            log.to_str().unwrap(),
            dir.join("state").to_str().unwrap(),
            trust_section(dir)
        ),
    )
    .unwrap();
    conf
}

fn write_config(dir: &Path, log: &Path) -> std::path::PathBuf {
    monitor_config(
        dir,
        log,
        "publisher = \"tcp://127.0.0.1:9\"\nignore_jails = [\"cluster\"]\n",
    )
}

#[test]
fn check_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    let conf = write_config(dir.path(), &log);
    let out = Command::new(BIN)
        .args(["--check", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "node: web1".to_owned(),
        format!("log_path: {}", log.display()),
        "publisher: tcp://127.0.0.1:9".to_owned(),
        "ignore_jails: [cluster]".to_owned(),
        "metrics: off".to_owned(),
        format!("state_dir: {}", dir.path().join("state").display()),
        format!(
            "credential: web1 (from {})",
            dir.path().join("node.secret").display()
        ),
    ] {
        assert!(text.contains(&want), "{want:?} in {text}");
    }
    assert!(!text.contains(SECRET), "never the secret: {text}");
}

#[test]
fn check_refuses_a_config_without_credential_or_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("f2b.conf");
    std::fs::write(&conf, "[node]\nname = \"web1\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["--check", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("trust.secret") && stderr.contains("allow_unauthenticated"),
        "{stderr}"
    );
    // The opt-out is valid, and says so; so is the legacy format, which has
    // no use for a credential.
    for (extra, want) in [
        (
            "[trust]\nallow_unauthenticated = true\n",
            "credential: none: reports go unauthenticated",
        ),
        (
            "[monitor]\nlegacy = true\n",
            "credential: not used (legacy format)",
        ),
    ] {
        std::fs::write(&conf, format!("[node]\nname = \"web1\"\n{extra}")).unwrap();
        let out = Command::new(BIN)
            .args(["--check", "--config", conf.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(want), "{want} in {stdout}");
    }
}

#[test]
fn sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let conf = write_config(dir.path(), &log);
    let mut child = start(&conf);
    let line = child.wait_for_line("watching", WAIT);
    assert!(line.contains(&format!("path={}", log.display())), "{line}");
    assert!(line.contains("offset=0"), "{line}");
    child.signal("TERM");
    let status = child.wait_exit(WAIT);
    assert_eq!(status.code(), Some(0));
}

/// A running `f2b-monitor --config CONF --log-level info`, killed on drop.
fn start(conf: &Path) -> Process {
    Process::spawn(&mut daemon_command(BIN, conf))
}

/// Kills `m` with SIGKILL (the machine crashes) and reaps it.
fn kill_9(m: &mut Process) {
    m.signal("KILL");
    m.wait_exit(WAIT);
}

/// A stand-in publisher (a REP on an ephemeral port) and a config for the
/// daemon as web1, tailing `log` and reporting to it.
fn publisher_and_config(dir: &Path, log: &Path) -> (zmq::Socket, std::path::PathBuf) {
    let ctx = zmq::Context::new();
    let (rep, endpoint) = bind_loopback(&ctx, zmq::REP);
    rep.set_linger(0).unwrap();
    let conf = monitor_config(dir, log, &format!("publisher = {endpoint:?}\n"));
    (rep, conf)
}

/// Serves one report on `rep` (a REP socket) with an authentic ACK, after
/// checking its credential; returns its event.
fn serve_one(rep: &zmq::Socket) -> f2b_proto::Event {
    use f2b_proto::{Ack, AckStatus, Reply};
    let got = recv_report(rep, false);
    assert!(got.authentic(), "signed with web1's secret");
    let ack = Ack {
        id: got.event.id,
        seq: Some(1),
        status: AckStatus::Broadcast,
    };
    reply_to(rep, &got, Reply::Ack(ack).encode(), Mac::Right);
    got.event
}

/// A report as the stand-in publisher received it.
struct Got {
    /// A ROUTER's envelope (identity, delimiter); empty for a REP.
    envelope: Vec<Vec<u8>>,
    payload: Vec<u8>,
    auth: Option<f2b_proto::auth::RequestAuth>,
    event: f2b_proto::Event,
}

impl Got {
    fn authentic(&self) -> bool {
        let secret = f2b_proto::auth::MonitorSecret::new(SECRET).unwrap();
        self.auth
            .as_ref()
            .is_some_and(|a| a.key == self.event.node && a.verify(&secret, &self.payload))
    }
}

fn recv_report(sock: &zmq::Socket, router: bool) -> Got {
    use f2b_proto::Request;
    let mut frames = sock.recv_multipart(0).expect("a report in time");
    let envelope = if router {
        frames.drain(..2).collect()
    } else {
        Vec::new()
    };
    let auth = frames
        .get(1)
        .map(|f| f2b_proto::auth::RequestAuth::decode(f).expect("an auth frame"));
    let payload = frames.swap_remove(0);
    let Request::Report(event) = Request::decode(&payload).unwrap() else {
        panic!("not a report")
    };
    Got {
        envelope,
        payload,
        auth,
        event,
    }
}

#[derive(Clone, Copy)]
enum Mac {
    Right,
    Missing,
}

fn reply_to(sock: &zmq::Socket, got: &Got, reply: Vec<u8>, mac: Mac) {
    let secret = f2b_proto::auth::MonitorSecret::new(SECRET).unwrap();
    let mut frames = got.envelope.clone();
    let tag = got
        .auth
        .as_ref()
        .map(|a| f2b_proto::auth::reply_mac(&secret, &a.mac, &reply));
    frames.push(reply);
    if let (Mac::Right, Some(tag)) = (mac, tag) {
        frames.push(tag.to_vec());
    }
    sock.send_multipart(frames, 0).unwrap();
}

#[test]
fn kill_9_while_an_unban_is_held_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let (rep, conf) = publisher_and_config(dir.path(), &log);

    let mut m = start(&conf);
    m.wait_for_all(&["watching"], WAIT);
    append(
        &log,
        &format!("{ACTION}[sshd] Ban 192.0.2.90\n{ACTION}[sshd] Unban 192.0.2.91\n"),
    );
    let ban = serve_one(&rep);
    assert_eq!(ban.ip.to_string(), "192.0.2.90");
    m.wait_for_all(&["reported", "ip=192.0.2.90"], WAIT);
    // The position past the Ban is saved just after the Ban is handed to the
    // sender (off the report's path), so it may come after the report: wait
    // for it. A kill before it is the pipeline's own test (the Ban read again
    // under a new id); a kill before the Ban is read resumes from the position
    // the first start saved (kill_9_on_a_first_start_before_any_event_loses_nothing).
    let position = dir.path().join("state").join(format!(
        "{}.position",
        f2b_monitor::state::key(&f2b_proto::NodeName::new("web1").unwrap(), &log)
    ));
    let ban_line = format!("{ACTION}[sshd] Ban 192.0.2.90\n");
    wait_offset(&position, ban_line.len() as u64);
    // The Unban is held by the stop filter (5 s, waiting for a `Jail 'sshd'
    // stopped` that would make it part of a stop). The machine crashes now.
    kill_9(&mut m);

    let mut m = start(&conf);
    m.wait_for_all(&["watching"], WAIT);
    let mut e = serve_one(&rep);
    if e.id == ban.id {
        // Killed between the ACK and its record: resent with its id (the
        // publisher answers `duplicate`).
        e = serve_one(&rep);
    }
    assert_eq!(
        (e.action, e.ip.to_string()),
        (f2b_proto::Action::Unban, "192.0.2.91".to_owned()),
        "the held Unban is read again and reported"
    );
    m.wait_for_all(&["reported", "ip=192.0.2.91"], WAIT);
}

#[test]
fn kill_9_on_a_first_start_before_any_event_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    // Written before the first start: not read (a first start begins at the
    // end of the log).
    let old = format!("{ACTION}[sshd] Ban 192.0.2.80\n");
    std::fs::write(&log, &old).unwrap();
    let (rep, conf) = publisher_and_config(dir.path(), &log);

    // First start, no saved position: it says it watches from the end, and
    // is killed before any event (the machine crashes).
    let mut m = start(&conf);
    m.wait_for_all(&["watching", &format!("offset={}", old.len())], WAIT);
    kill_9(&mut m);
    // Written while it is down, as fail2ban goes on.
    append(&log, &format!("{ACTION}[sshd] Ban 192.0.2.81\n"));

    // The restart resumes where the first start began, not at the log's new
    // end: the Ban is reported, and only it.
    let mut m = start(&conf);
    let watching = m.wait_for_all(&["watching"], WAIT);
    assert!(
        watching.contains(&format!("offset={}", old.len())),
        "resumes where the first start began: {watching}"
    );
    let e = serve_one(&rep);
    assert_eq!(
        (e.action, e.ip.to_string()),
        (f2b_proto::Action::Ban, "192.0.2.81".to_owned()),
        "the Ban written while the monitor was down is read and reported"
    );
    m.wait_for_all(&["reported", "ip=192.0.2.81"], WAIT);
}

/// A config for `send` to `endpoint`, with web1's credential.
fn send_config(dir: &Path, endpoint: &str) -> std::path::PathBuf {
    let conf = dir.join("send.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[monitor]\npublisher = {endpoint:?}\n{}",
            trust_section(dir)
        ),
    )
    .unwrap();
    conf
}

/// Runs `f2b-monitor --config CONF send ARGS...`: exit status, stdout, stderr.
fn send(conf: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["--config", conf.to_str().unwrap(), "send"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A stand-in publisher's answer to a report, and how it signs it.
type Step = (fn(&f2b_proto::Event) -> Vec<u8>, Mac);

/// A stand-in publisher (ROUTER on an ephemeral port) in a thread: answers each
/// report in turn with `script`'s reply and MAC; returns what it received.
fn stand_in(script: Vec<Step>) -> (String, std::thread::JoinHandle<Vec<Got>>) {
    let ctx = zmq::Context::new();
    let (router, endpoint) = bind_loopback(&ctx, zmq::ROUTER);
    router.set_linger(0).unwrap();
    let server = std::thread::spawn(move || {
        let _ctx = ctx;
        script
            .into_iter()
            .map(|(reply, mac)| {
                let got = recv_report(&router, true);
                reply_to(&router, &got, reply(&got.event), mac);
                got
            })
            .collect()
    });
    (endpoint, server)
}

fn ack(e: &f2b_proto::Event, status: f2b_proto::AckStatus, seq: Option<u64>) -> Vec<u8> {
    f2b_proto::Reply::Ack(f2b_proto::Ack {
        id: e.id,
        seq,
        status,
    })
    .encode()
}

fn nak(e: &f2b_proto::Event, reason: f2b_proto::NakReason) -> Vec<u8> {
    f2b_proto::Reply::Nak(f2b_proto::Nak::new(Some(e.id), reason, "stand-in says no")).encode()
}

#[test]
fn send_reports_like_a_logged_event_and_prints_the_outcome() {
    use f2b_proto::{AckStatus, Action};
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, server) = stand_in(vec![
        (|e| ack(e, AckStatus::Broadcast, Some(42)), Mac::Right),
        (|e| ack(e, AckStatus::Duplicate, Some(42)), Mac::Right),
        (|e| ack(e, AckStatus::Unchanged, None), Mac::Right),
    ]);
    let conf = send_config(dir.path(), &endpoint);
    let (code, stdout, stderr) = send(&conf, &["--jail", "sshd", "--ban", "203.0.113.7"]);
    assert_eq!(code, 0, "{stdout} {stderr}");
    assert!(
        stdout.contains("reported ban 203.0.113.7 in jail sshd as node web1")
            && stdout.contains("broadcast to the cluster as seq 42"),
        "{stdout}"
    );
    let (code, stdout, stderr) = send(
        &conf,
        &["--jail", "sshd", "--unban", "2001:DB8::7", "--json"],
    );
    assert_eq!(code, 0, "{stdout} {stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["outcome"], "ack");
    assert_eq!(v["status"], "duplicate");
    assert_eq!(v["seq"], 42);
    assert_eq!(v["action"], "unban");
    assert_eq!(v["ip"], "2001:db8::7", "canonical form");
    assert_eq!(v["publisher"], endpoint.as_str());
    let (code, stdout, _) = send(
        &conf,
        &["--jail", "sshd", "--ban", "203.0.113.8", "--timeout", "5s"],
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("unchanged"), "{stdout}");

    let got = server.join().unwrap();
    assert!(
        got.iter().all(Got::authentic),
        "every report carries web1's credential"
    );
    let e = &got[0].event;
    assert_eq!(
        (e.node.as_str(), e.jail.as_str(), e.action, e.ip.to_string()),
        ("web1", "sshd", Action::Ban, "203.0.113.7".to_owned())
    );
    let now = chrono::Utc::now().timestamp_millis() as u64;
    assert!(
        e.time_ms <= now && now - e.time_ms < 60_000,
        "now as its time"
    );
    assert_eq!(v["id"], got[1].event.id.to_string());
    assert_ne!(got[0].event.id, got[1].event.id, "a new event id each time");
}

#[test]
fn send_exit_codes_for_naks_and_replies_that_fail_authentication() {
    use f2b_proto::{AckStatus, NakReason};
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, server) = stand_in(vec![
        // A publisher that does not know web1's key: no MAC.
        (|e| nak(e, NakReason::Unauthenticated), Mac::Missing),
        (|e| nak(e, NakReason::Unauthenticated), Mac::Missing),
        (|e| nak(e, NakReason::Quarantined), Mac::Right),
        // Busy is retried within the timeout.
        (|e| nak(e, NakReason::Busy), Mac::Right),
        (|e| ack(e, AckStatus::Broadcast, Some(7)), Mac::Right),
        // An ACK without its MAC is no ACK.
        (|e| ack(e, AckStatus::Broadcast, Some(8)), Mac::Missing),
    ]);
    let conf = send_config(dir.path(), &endpoint);
    let ban = ["--jail", "sshd", "--ban", "203.0.113.9"];

    let (code, stdout, stderr) = send(&conf, &ban);
    assert_eq!(code, 1, "{stdout} {stderr}");
    assert!(stderr.contains("unauthenticated"), "{stderr}");
    assert!(
        stderr.contains(
            "check that [trust] secret/secret_file on web1 matches [trust.monitors] web1 on the publisher"
        ),
        "{stderr}"
    );
    let (code, stdout, _) = send(&conf, &[&ban[..], &["--json"]].concat());
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(
        (&v["ok"], &v["outcome"], &v["reason"], &v["authentic"]),
        (
            &false.into(),
            &"nak".into(),
            &"unauthenticated".into(),
            &false.into()
        ),
        "{v}"
    );
    assert_eq!(v["detail"], "stand-in says no");

    let (code, _, stderr) = send(&conf, &ban);
    assert_eq!(code, 1);
    assert!(stderr.contains("quarantined"), "{stderr}");

    let (code, stdout, stderr) = send(&conf, &ban);
    assert_eq!(code, 0, "busy, then ACKed: {stdout} {stderr}");
    assert!(stdout.contains("seq 7"), "{stdout}");

    let (code, stdout, stderr) = send(&conf, &ban);
    assert_eq!(code, 3, "{stdout} {stderr}");
    assert!(stderr.contains("failed authentication"), "{stderr}");
    assert!(stderr.contains("[trust.monitors] web1"), "{stderr}");
    assert!(!stderr.contains("reported"), "{stderr}");

    let got = server.join().unwrap();
    assert_eq!(got.len(), 6);
    assert_eq!(
        got[3].event.id, got[4].event.id,
        "busy: the same event again"
    );
    assert_ne!(
        got[3].auth.as_ref().unwrap().nonce,
        got[4].auth.as_ref().unwrap().nonce,
        "signed anew"
    );
}

#[test]
fn send_to_an_unreachable_publisher_says_what_to_check_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let endpoint = bind_loopback(&zmq::Context::new(), zmq::REP).1;
    let conf = send_config(dir.path(), &endpoint);
    let t0 = std::time::Instant::now();
    let (code, stdout, stderr) = send(
        &conf,
        &["--jail", "sshd", "--ban", "203.0.113.10", "--timeout", "1s"],
    );
    let took = t0.elapsed();
    assert_eq!(code, 3, "{stdout} {stderr}");
    assert!(
        stderr.contains(&format!(
            "no answer from the publisher at {endpoint} within 1s: is f2b-publisher running at {endpoint}, is the port open, is [monitor] publisher right?"
        )),
        "{stderr}"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
    let (code, stdout, _) = send(
        &conf,
        &[
            "--jail",
            "sshd",
            "--ban",
            "203.0.113.10",
            "--timeout",
            "200ms",
            "--json",
        ],
    );
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
    assert_eq!(
        (&v["ok"], &v["error"]),
        (&false.into(), &"no_answer".into()),
        "{v}"
    );
}

#[test]
fn send_checks_its_arguments_and_the_credential_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 on loopback: never reached, every case fails before sending.
    let conf = send_config(dir.path(), "tcp://127.0.0.1:9");
    let (code, _, stderr) = send(&conf, &["--jail", "bad jail", "--ban", "203.0.113.1"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--jail \"bad jail\""), "{stderr}");
    for (flag, value) in [
        ("--ban", "300.1.1.1"),
        ("--unban", "example.com"),
        ("--ban", "10.0.0.0/8"),
    ] {
        let (code, stdout, stderr) = send(&conf, &["--jail", "sshd", flag, value, "--json"]);
        assert_eq!(code, 2, "{flag} {value}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect(&stdout);
        assert_eq!(v["error"], "invalid_argument", "{v}");
        assert_eq!(v["argument"], flag, "{v}");
        assert!(v["message"].as_str().unwrap().contains(value), "{v}");
    }
    // One of --ban and --unban, not both, not neither (clap's usage error).
    let (code, _, stderr) = send(&conf, &["--jail", "sshd"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = send(
        &conf,
        &[
            "--jail",
            "sshd",
            "--ban",
            "203.0.113.1",
            "--unban",
            "203.0.113.1",
        ],
    );
    assert_eq!(code, 2, "{stderr}");
    // No credential and no opt-out.
    let bare = dir.path().join("bare.conf");
    std::fs::write(&bare, "[node]\nname = \"web1\"\n").unwrap();
    let (code, _, stderr) = send(&bare, &["--jail", "sshd", "--ban", "203.0.113.1"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("trust.secret"), "{stderr}");
}
