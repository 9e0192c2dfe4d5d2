//! The built binary: `scan`, `--check`, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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

fn write_config(dir: &Path, log: &Path) -> std::path::PathBuf {
    let conf = dir.join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[monitor]\nlog_path = {:?}\npublisher = \"tcp://127.0.0.1:9\"\nignore_jails = [\"cluster\"]\nstate_dir = {:?}\n",
            log.to_str().unwrap(),
            dir.join("state").to_str().unwrap()
        ),
    )
    .unwrap();
    conf
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
        format!("state_dir: {}", dir.path().join("state").display()),
    ] {
        assert!(text.contains(&want), "{want:?} in {text}");
    }
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let conf = write_config(dir.path(), &log);
    let mut child = Child(
        Command::new(BIN)
            .args(["--config", conf.to_str().unwrap(), "--log-level", "info"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("a `watching` line");
        if line.contains("watching") {
            assert!(line.contains(&format!("path={}", log.display())), "{line}");
            assert!(line.contains("offset=0"), "{line}");
            break;
        }
    }
    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // Log lines arrive until exit; the channel closes when stderr does.
        match rx.recv_timeout(left) {
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break child.0.wait().unwrap();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("no exit after SIGTERM"),
        }
    };
    assert_eq!(status.code(), Some(0));
}

/// A running `f2b-monitor` and its stderr, line by line.
struct Monitor {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Monitor {
    fn start(conf: &Path) -> Monitor {
        let mut child = Child(
            Command::new(BIN)
                .args(["--config", conf.to_str().unwrap(), "--log-level", "info"])
                .stderr(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stderr = child.0.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        Monitor { child, lines }
    }

    /// Waits for a line with every one of `parts`.
    fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {parts:?}"));
            if parts.iter().all(|p| line.contains(p)) {
                return line;
            }
        }
    }
}

/// Serves one report on `rep` with an ACK; returns its event.
fn serve_one(rep: &f2b_common::zmq::Socket) -> f2b_proto::Event {
    use f2b_proto::{Ack, AckStatus, Reply, Request};
    let bytes = rep.recv_bytes(0).expect("a report in time");
    let Request::Report(e) = Request::decode(&bytes).unwrap() else {
        panic!("not a report")
    };
    let ack = Ack {
        id: e.id,
        seq: Some(1),
        status: AckStatus::Broadcast,
    };
    rep.send(Reply::Ack(ack).encode(), 0).unwrap();
    e
}

#[test]
fn kill_9_while_an_unban_is_held_loses_nothing() {
    use f2b_common::zmq;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    let ctx = zmq::Context::new();
    let rep = ctx.socket(zmq::REP).unwrap();
    rep.set_rcvtimeo(15_000).unwrap();
    rep.set_linger(0).unwrap();
    rep.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = f2b_common::sockets::last_endpoint(&rep);
    let conf = dir.path().join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[monitor]\nlog_path = {:?}\npublisher = {endpoint:?}\nstate_dir = {:?}\n",
            log.to_str().unwrap(),
            dir.path().join("state").to_str().unwrap()
        ),
    )
    .unwrap();

    let mut m = Monitor::start(&conf);
    m.wait_for(&["watching"]);
    let p = "2026-11-21 04:53:00,000 fail2ban.actions        [1]: NOTICE  ";
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(
        &mut f,
        format!("{p}[sshd] Ban 192.0.2.90\n{p}[sshd] Unban 192.0.2.91\n").as_bytes(),
    )
    .unwrap();
    let ban = serve_one(&rep);
    assert_eq!(ban.ip.to_string(), "192.0.2.90");
    m.wait_for(&["reported", "ip=192.0.2.90"]);
    // The Unban is held by the stop filter (5 s, waiting for a `Jail 'sshd'
    // stopped` that would make it part of a stop). The machine crashes now.
    m.child.0.kill().unwrap();
    m.child.0.wait().unwrap();

    let m = Monitor::start(&conf);
    m.wait_for(&["watching"]);
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
    m.wait_for(&["reported", "ip=192.0.2.91"]);
}
