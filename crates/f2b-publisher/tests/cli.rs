//! The `f2b-publisher` binary: `--check`, the `listening on`, `ledger` and
//! `rejected` log lines, legacy peers, SIGTERM ending it with status 0, a SIGKILL
//! and restart continuing the sequence, and `import-legacy-config`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::{NakReason, Reply};

const DEADLINE: Duration = Duration::from_secs(10);

/// A configuration file and the publisher's state directory, both removed on drop.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// Writes the configuration with these binds and `extra` lines; returns its path.
    fn config(&self, reply: &str, broadcast: &str, extra: &str) -> std::path::PathBuf {
        let path = self.dir.path().join("publisher.conf");
        let text = format!(
            "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"{reply}\"\n\
             broadcast_bind = \"{broadcast}\"\nheartbeat_interval = \"250ms\"\n\
             ban_time = \"1h 30m\"\nstate_dir = {:?}\n{extra}\n",
            self.state_dir().display().to_string()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ephemeral(&self, extra: &str) -> std::path::PathBuf {
        self.config("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", extra)
    }
}

fn publisher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_f2b-publisher"))
}

#[test]
fn check_prints_the_summary() {
    let setup = Setup::new();
    let conf = setup.ephemeral("legacy = true\nlegacy_token = \"hush-hush\"");
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "reply_bind = tcp://127.0.0.1:*",
        "broadcast_bind = tcp://127.0.0.1:*",
        "heartbeat_interval = 250ms",
        "ban_time = 90m",
        "legacy = true (token: set)",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in {stdout}");
    }
    assert!(!stdout.contains("hush-hush"), "{stdout}");
    assert!(
        !setup.state_dir().exists(),
        "--check created the state directory"
    );

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "[publisher]\nban_time = 0\n").unwrap();
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("publisher.ban_time"));
}

/// A running publisher whose stderr lines arrive on a channel; killed by PID if
/// the test ends without stopping it.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(config: &std::path::Path) -> Running {
        let mut child = publisher()
            .arg("--config")
            .arg(config)
            .arg("--log-level")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line containing all of `parts`; fails at the deadline.
    fn wait_for(&mut self, parts: &[&str]) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {parts:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_for(&["stopped"]);
        // Standard error closes when the process exits.
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!("still running after SIGTERM"),
            }
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn field(line: &str, key: &str) -> String {
    let start = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    line[start..].split(' ').next().unwrap().to_owned()
}

#[test]
fn serves_logs_and_stops_on_sigterm() {
    let setup = Setup::new();
    let conf = setup.ephemeral("");
    let mut p = Running::start(&conf);
    let ledger = p.wait_for(&[": ledger path="]);
    let file = setup.state_dir().join("ledger.sqlite3");
    assert_eq!(
        field(&ledger, "path"),
        file.display().to_string(),
        "{ledger}"
    );
    assert_eq!(field(&ledger, "seq"), "0", "{ledger}");
    assert_eq!(field(&ledger, "active"), "0", "{ledger}");
    assert_eq!(field(&ledger, "epoch").len(), 16, "{ledger}");
    let line = p.wait_for(&[
        "listening on",
        "reply=tcp://127.0.0.1:",
        "broadcast=tcp://127.0.0.1:",
    ]);
    let reply = field(&line, "reply");
    assert!(!reply.ends_with(":*"), "{line}");

    let ctx = zmq::Context::new();
    let req = new_socket(&ctx, zmq::REQ).unwrap();
    req.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    req.connect(&reply).unwrap();
    req.send("{\"v\":1,\"type\":\"report\"", 0).unwrap();
    let answer = Reply::decode(&req.recv_bytes(0).unwrap()).unwrap();
    assert!(
        matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed),
        "{answer:?}"
    );
    let rejected = p.wait_for(&["rejected"]);
    assert!(rejected.contains(" WARN "), "{rejected}");
    assert_eq!(field(&rejected, "reason"), "malformed", "{rejected}");
    assert_eq!(field(&rejected, "peer"), "127.0.0.1", "{rejected}");
    // The detail is quoted and escaped: a hostile value cannot forge a log line.
    assert!(
        rejected.contains(" detail=\"malformed message: "),
        "{rejected}"
    );

    // A fail2ban-zmq-tools request, legacy being off: the old refusal.
    req.send("web1|sshd|Ban|203.0.113.5", 0).unwrap();
    assert_eq!(req.recv_bytes(0).unwrap(), b"NAK");
    let rejected = p.wait_for(&["rejected", "legacy"]);
    assert_eq!(field(&rejected, "reason"), "legacy_disabled", "{rejected}");
    assert_eq!(field(&rejected, "peer"), "127.0.0.1", "{rejected}");

    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

fn req_socket(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let req = new_socket(ctx, zmq::REQ).unwrap();
    req.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    req.connect(endpoint).unwrap();
    req
}

fn ban(id: u128, ip: &str) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let e = f2b_proto::Event::new(
        f2b_proto::EventId::from_u128(id),
        f2b_proto::NodeName::new("web1").unwrap(),
        f2b_proto::JailName::new("sshd").unwrap(),
        f2b_proto::Action::Ban,
        ip.parse().unwrap(),
        now,
    )
    .unwrap();
    f2b_proto::Request::Report(e).encode()
}

/// Sends a report and returns the sequence number it was broadcast with.
fn broadcast_seq(req: &zmq::Socket, report: Vec<u8>) -> u64 {
    req.send(report, 0).unwrap();
    match Reply::decode(&req.recv_bytes(0).unwrap()).unwrap() {
        Reply::Ack(a) if a.status == f2b_proto::AckStatus::Broadcast => a.seq.unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_sigkill_a_restart_continues_the_sequence_in_the_same_epoch() {
    let setup = Setup::new();
    let mut p = Running::start(&setup.ephemeral(""));
    let ledger = p.wait_for(&[": ledger path="]);
    let epoch = field(&ledger, "epoch");
    let line = p.wait_for(&["listening on"]);
    let (reply, broadcast) = (field(&line, "reply"), field(&line, "broadcast"));

    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    for n in 1..=5u64 {
        let ip = format!("203.0.113.{n}");
        assert_eq!(broadcast_seq(&req, ban(n.into(), &ip)), n);
    }
    // SIGKILL by PID: no clean-up, no chance to flush anything.
    let status = Command::new("kill")
        .arg("-KILL")
        .arg(p.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = p.child.wait().unwrap();
    assert_eq!(status.code(), None, "{status:?}");
    drop(req);

    // The same ports, the same state directory.
    let mut p = Running::start(&setup.config(&reply, &broadcast, ""));
    let ledger = p.wait_for(&[": ledger path="]);
    assert_eq!(field(&ledger, "epoch"), epoch, "{ledger}");
    assert_eq!(field(&ledger, "seq"), "5", "{ledger}");
    assert_eq!(field(&ledger, "active"), "5", "{ledger}");
    let line = p.wait_for(&["listening on"]);
    assert_eq!(field(&line, "reply"), reply);
    let req = req_socket(&ctx, &reply);
    assert_eq!(broadcast_seq(&req, ban(6, "203.0.113.6")), 6);
    let line = p.wait_for(&["broadcast", "seq=6"]);
    assert!(line.contains("ip=203.0.113.6"), "{line}");
    // A resend from before the crash is a duplicate, not a new broadcast.
    req.send(ban(3, "203.0.113.3"), 0).unwrap();
    match Reply::decode(&req.recv_bytes(0).unwrap()).unwrap() {
        Reply::Ack(a) => assert_eq!(
            (a.status, a.seq),
            (f2b_proto::AckStatus::Duplicate, Some(3))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.terminate().code(), Some(0));
}

/// A flood of refused requests: every one is answered, at most 10 `rejected` lines
/// per second are logged, and summary lines account for all the others.
#[test]
fn a_flood_of_garbage_is_logged_throttled_and_summed_up() {
    let setup = Setup::new();
    let mut p = Running::start(&setup.ephemeral(""));
    let line = p.wait_for(&["listening on"]);
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &field(&line, "reply"));
    let n = 300u64;
    let start = Instant::now();
    for _ in 0..n {
        req.send("{garbage", 0).unwrap();
        let answer = Reply::decode(&req.recv_bytes(0).unwrap()).unwrap();
        assert!(matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed));
    }
    let took = start.elapsed();
    let (mut logged, mut suppressed) = (0u64, 0u64);
    while logged + suppressed < n {
        let line = p.wait_for(&["rejected", "reason=malformed"]);
        if line.contains("(suppressed ") {
            assert!(line.contains(" more in the last "), "{line}");
            suppressed += field(&line, "suppressed").parse::<u64>().unwrap();
        } else {
            assert_eq!(field(&line, "peer"), "127.0.0.1", "{line}");
            logged += 1;
        }
    }
    assert_eq!(logged + suppressed, n);
    // Windows of one second: those the flood spanned, and one more at most.
    let windows = took.as_secs() + 2;
    assert!(logged <= 10 * windows, "{logged} lines logged in {took:?}");
    assert!(suppressed > 0);
    assert_eq!(p.terminate().code(), Some(0));
}

#[test]
fn legacy_peers_and_the_token_never_in_the_log() {
    let setup = Setup::new();
    let token = "tok-SECRET-value";
    let conf = setup.ephemeral(&format!(
        "legacy = true\nlegacy_token = \"{token}\"\nlegacy_broadcast_bind = \"tcp://127.0.0.1:*\""
    ));
    let mut p = Running::start(&conf);
    let line = p.wait_for(&["listening on", "legacy_broadcast=tcp://127.0.0.1:"]);
    let reply = field(&line, "reply");
    let legacy = field(&line, "legacy_broadcast");
    assert!(
        !legacy.ends_with(":*") && legacy != field(&line, "broadcast"),
        "{line}"
    );

    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    req.send(format!("{token}|web1|sshd|Ban|203.0.113.5").as_bytes(), 0)
        .unwrap();
    assert_eq!(req.recv_bytes(0).unwrap(), b"web1|sshd|Ban|203.0.113.5");
    let line = p.wait_for(&["broadcast", "seq=1"]);
    assert!(line.contains("origin=legacy"), "{line}");
    for bad in [
        "web1|sshd|Ban|203.0.113.6".to_owned(),
        format!("{token}x|web1|sshd|Ban|203.0.113.6"),
        format!("{token}|web1|sshd|Ban|::1"),
    ] {
        req.send(bad.as_bytes(), 0).unwrap();
        assert_eq!(req.recv_bytes(0).unwrap(), b"NAK", "{bad}");
        let rejected = p.wait_for(&["rejected"]);
        assert_eq!(field(&rejected, "reason"), "legacy_invalid", "{rejected}");
    }
    assert_eq!(p.terminate().code(), Some(0));
    let leaked: Vec<&String> = p.seen.iter().filter(|l| l.contains("SECRET")).collect();
    assert!(leaked.is_empty(), "the token was logged: {leaked:?}");
}

#[test]
fn import_legacy_config_prints_the_converted_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.conf");
    std::fs::write(
        &old,
        "[publisher]\npidfile = /var/run/fail2ban-publisher.pid\n\
         broadcasterbindurl = tcp://*:5680\nreplybindurl = tcp://*:5678\n",
    )
    .unwrap();
    let out = publisher()
        .arg("import-legacy-config")
        .arg(&old)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&old.display().to_string()), "{text}");
    // What it prints is a valid configuration, which the publisher accepts.
    let new = dir.path().join("new.conf");
    std::fs::write(&new, &text).unwrap();
    let check = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&new)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}\n{text}");
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(
        summary.contains("legacy_broadcast_bind = tcp://*:5680"),
        "{summary}"
    );
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (name, content) in [
        ("missing.conf", None),
        ("empty.conf", Some("[other]\na = 1\n")),
    ] {
        let path = dir.path().join(name);
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
        }
        let out = publisher()
            .arg("import-legacy-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{err}");
    }
}
