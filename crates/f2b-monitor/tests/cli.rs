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
