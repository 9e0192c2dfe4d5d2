//! The `f2b-subscriber` binary: `--check`, and a real run stopped by SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{TestPublisher, DEADLINE};
use f2b_proto::Action;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-subscriber");

/// The child, killed (by its PID) if the test ends early.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn check_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("f2b.conf");
    std::fs::write(
        &conf,
        "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"tcp://hub:5680\"\njails = [\"sshd\"]\nban_jail = \"cluster\"\nignore_ip = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&conf)
        .arg("--check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "is valid",
        "node: web1",
        "publisher: tcp://hub:5680",
        "jails: sshd",
        "action: fail2ban-client (fail2ban-client)",
        "ban_jail: cluster",
        "ignore_ip: 10.0.0.0/8",
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    std::fs::write(&conf, "[subscriber]\naction = \"drop\"\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&conf)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("subscriber.action"));
}

#[test]
fn runs_applies_and_stops_on_sigterm_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cluster.log");
    let mut publ = TestPublisher::start(Duration::from_millis(100));
    let conf = dir.path().join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"{}\"\naction = \"log\"\nlog_path = {:?}\nstate_dir = {:?}\n",
            publ.endpoint,
            log.to_str().unwrap(),
            dir.path().join("state").to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Guard(
        Command::new(BIN)
            .arg("--config")
            .arg(&conf)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let wait_line = |want: &str| -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {want:?}"));
            if line.contains(want) {
                return line;
            }
        }
    };
    let connected = wait_line(" connected publisher=");
    assert!(
        connected.contains(&format!(
            "connected publisher={} epoch={}",
            publ.endpoint, publ.epoch
        )),
        "{connected}"
    );
    publ.event("web2", "sshd", Action::Ban, "203.0.113.5");
    let applied = wait_line("applied");
    assert!(
        applied.contains("applied action=ban jail=sshd ip=203.0.113.5 node=web2 seq=1"),
        "{applied}"
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains(": Ban 203.0.113.5 jail=sshd node=web2 id="));

    let pid = child.0.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    wait_line("stopped");
}
