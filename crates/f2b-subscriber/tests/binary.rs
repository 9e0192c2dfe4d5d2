//! The `f2b-subscriber` binary: `--check`, a real run that survives SIGHUP and is
//! stopped by SIGTERM, and `watch`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{test_key, TestPublisher, DEADLINE};
use f2b_proto::Action;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-subscriber");

/// The child, killed (by its PID) if the test ends early.
struct Guard(Child);

impl Guard {
    /// SIGTERM; the process must exit with status 0 within 10 s.
    fn terminate_cleanly(&mut self) {
        let pid = self.0.id().to_string();
        let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(st.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "still running 10 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0));
    }
}

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
    let key = test_key().public().to_string();
    let conf_text = format!(
        "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"tcp://hub:5680\"\njails = [\"sshd\"]\nban_jail = \"cluster\"\nignore_ip = [\"10.0.0.0/8\"]\n[trust]\npublisher_key = \"{key}\"\n"
    );
    std::fs::write(&conf, &conf_text).unwrap();
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
        &format!("publisher_key: {key}"),
    ] {
        assert!(text.contains(want), "{want:?} not in {text}");
    }
    // Without a publisher key (and without the opt-out) it does not run.
    let unkeyed = conf_text.replace(&format!("publisher_key = \"{key}\""), "");
    std::fs::write(&conf, &unkeyed).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&conf)
        .arg("--check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trust.publisher_key") && err.contains("f2b-publisher keygen"),
        "{err}"
    );
    // The opt-out runs, and says so.
    std::fs::write(
        &conf,
        unkeyed.replace("[trust]\n", "[trust]\nallow_unauthenticated = true\n"),
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
    assert!(text.contains("publisher_key: (none"), "{text}");
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
            "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"{}\"\naction = \"log\"\nlog_path = {:?}\nstate_dir = {:?}\n[trust]\npublisher_key = \"{}\"\n",
            publ.endpoint,
            log.to_str().unwrap(),
            dir.path().join("state").to_str().unwrap(),
            test_key().public(),
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

    // SIGHUP (a `kill -HUP` meant for the publisher, say) is logged and changes
    // nothing: the subscriber goes on applying.
    let pid = child.0.id().to_string();
    let st = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(st.success());
    let hup = wait_line("nothing to reload");
    assert!(hup.contains("INFO") && hup.contains("SIGHUP"), "{hup}");
    assert!(child.0.try_wait().unwrap().is_none(), "alive after SIGHUP");
    publ.event("web2", "sshd", Action::Ban, "203.0.113.6");
    let applied = wait_line("applied");
    assert!(applied.contains("ip=203.0.113.6"), "{applied}");

    child.terminate_cleanly();
    wait_line("stopped");
}

/// A running `f2b-subscriber watch`, its standard output and error read line by
/// line.
struct Watch {
    child: Guard,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Watch {
    fn start(conf: &std::path::Path, args: &[&str]) -> Watch {
        let mut child = Guard(
            Command::new(BIN)
                .arg("watch")
                .arg("--config")
                .arg(conf)
                .args(args)
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let out = lines(child.0.stdout.take().unwrap());
        let err = lines(child.0.stderr.take().unwrap());
        Watch { child, out, err }
    }

    /// The next line of `rx` containing `want`; the lines before it are returned
    /// too.
    fn wait(rx: &mpsc::Receiver<String>, want: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + DEADLINE;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no line with {want:?}; before it: {before:#?}"));
            if line.contains(want) {
                return (line, before);
            }
            before.push(line);
        }
    }

    /// SIGTERM; the exit status must be 0, promptly.
    fn stop(mut self) {
        self.child.terminate_cleanly();
    }
}

fn watch_config(dir: &std::path::Path, publisher: &str, extra: &str) -> std::path::PathBuf {
    let conf = dir.join("f2b.conf");
    std::fs::write(
        &conf,
        format!(
            "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"{publisher}\"\nstate_dir = {:?}\n{extra}\n[trust]\npublisher_key = \"{}\"\n",
            dir.join("state").to_str().unwrap(),
            test_key().public(),
        ),
    )
    .unwrap();
    conf
}

/// A test publisher and `f2b-subscriber watch` with `args` following it (its
/// configuration in the returned directory).
fn watch_publisher(args: &[&str]) -> (tempfile::TempDir, TestPublisher, Watch) {
    let dir = tempfile::tempdir().unwrap();
    let publ = TestPublisher::start(Duration::from_millis(100));
    let conf = watch_config(dir.path(), &publ.endpoint, "");
    let w = Watch::start(&conf, args);
    (dir, publ, w)
}

#[test]
fn watch_prints_verified_events_and_not_forged_ones() {
    let (dir, mut publ, w) = watch_publisher(&[]);
    let (connected, _) = Watch::wait(&w.err, "connected to");
    assert!(
        connected.contains(&format!("{}: epoch {}", publ.endpoint, publ.epoch)),
        "{connected}"
    );
    let forged = common::ban(1, publ.epoch, "203.0.113.66");
    publ.send_with(
        f2b_proto::Broadcast::Event(forged),
        Some(common::other_key()),
    );
    let real = publ.event("web2", "sshd", Action::Ban, "203.0.113.5");
    let (line, before) = Watch::wait(&w.out, "203.0.113.5");
    assert!(before.is_empty(), "{before:?}");
    assert!(
        line.ends_with(&format!(
            " seq=1 epoch={} node=web2 jail=sshd action=ban ip=203.0.113.5 id={}",
            publ.epoch, real.event.id
        )),
        "{line}"
    );
    assert!(line.starts_with("2025-11-21T05:13:20.000Z"), "{line}");
    let (warning, _) = Watch::wait(&w.err, "signed by another key");
    assert!(
        warning.contains(&format!(
            "broadcasts from {} are signed by another key: check [trust] publisher_key",
            publ.endpoint
        )),
        "{warning}"
    );
    // Nothing was applied or recorded: watch does not touch the state.
    assert!(!dir.path().join("state").exists());
    w.stop();
}

#[test]
fn watch_json_follows_the_jail_filter_and_heartbeats_on_request() {
    let (_dir, mut publ, w) = watch_publisher(&["--json", "--jail", "sshd", "--heartbeats"]);
    let (hb, _) = Watch::wait(&w.out, "heartbeat");
    let v: serde_json::Value = serde_json::from_str(&hb).unwrap();
    assert_eq!(v["epoch"], publ.epoch.to_string());
    publ.event("web2", "nginx", Action::Ban, "203.0.113.7");
    publ.event("web3", "sshd", Action::Unban, "2001:db8::8");
    let (line, before) = Watch::wait(&w.out, "\"type\":\"event\"");
    assert!(before.iter().all(|l| l.contains("heartbeat")), "{before:?}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["jail"], "sshd");
    assert_eq!(v["action"], "unban");
    assert_eq!(v["ip"], "2001:db8::8");
    assert_eq!(v["node"], "web3");
    assert_eq!(v["seq"], 2);
    w.stop();
}

#[test]
fn watch_prints_each_event_of_an_events_message() {
    let (_dir, mut publ, w) = watch_publisher(&[]);
    Watch::wait(&w.err, "connected to");
    let ips = ["203.0.113.21", "203.0.113.22", "203.0.113.23"];
    let sent = publ.events("web2", "sshd", &ips);
    // One line per event, in order, nothing else between them.
    let (line, before) = Watch::wait(&w.out, ips[2]);
    let mut lines = before;
    lines.push(line);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for (line, s) in lines.iter().zip(&sent) {
        assert!(
            line.ends_with(&format!(
                " seq={} epoch={} node=web2 jail=sshd action=ban ip={} id={}",
                s.seq, publ.epoch, s.event.ip, s.event.id
            )),
            "{line}"
        );
    }
    w.stop();
}

#[test]
fn watch_says_what_to_check_when_nothing_arrives() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let conf = watch_config(
        dir.path(),
        "tcp://127.0.0.1:1",
        "heartbeat_timeout = \"300ms\"",
    );
    let w = Watch::start(&conf, &[]);
    let (line, _) = Watch::wait(&w.err, "no message from");
    assert!(
        line.contains(
            "no message from tcp://127.0.0.1:1 for 0.3s: is f2b-publisher's broadcast_bind reachable, \
             is [subscriber] publisher right?"
        ),
        "{line}"
    );
    w.stop();
}

#[test]
fn watch_is_in_the_completions_and_the_man_page() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("watch"));
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("watch"));
}
