//! The `f2b-publisher` binary: `--check`, the `listening on` and `rejected` log
//! lines, and SIGTERM ending it with status 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::{NakReason, Reply};

const DEADLINE: Duration = Duration::from_secs(10);

const CONFIG: &str = "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\n\
                      broadcast_bind = \"tcp://127.0.0.1:*\"\nheartbeat_interval = \"250ms\"\n\
                      ban_time = \"1h 30m\"\n";

fn config_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), CONFIG).unwrap();
    f
}

fn publisher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_f2b-publisher"))
}

#[test]
fn check_prints_the_summary() {
    let conf = config_file();
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(conf.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "reply_bind = tcp://127.0.0.1:*",
        "broadcast_bind = tcp://127.0.0.1:*",
        "heartbeat_interval = 250ms",
        "ban_time = 90m",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in {stdout}");
    }

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
    let conf = config_file();
    let mut p = Running::start(conf.path());
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
    req.send("web1|sshd|Ban|203.0.113.5", 0).unwrap();
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

    let status = p.terminate();
    assert_eq!(status.code(), Some(0), "{status:?}");
}
