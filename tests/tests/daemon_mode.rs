//! `--daemon`: each binary detaches, writes the pidfile named in its configuration,
//! keeps working, and stops cleanly on SIGTERM sent to the PID in that file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use f2b_tests::cluster::{toml_str, trust_section};
use f2b_tests::{bins, wait, Keyring};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TIMEOUT: Duration = Duration::from_secs(30);

fn read_pid(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie of ours cannot occur (the daemon is not
    // our child after the double fork).
    kill(Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// Starts `binary --daemon` with `config`, returns the daemon's PID from the pidfile
/// once the launcher has exited 0.
fn start_daemon(binary: &Path, config: &Path, pidfile: &Path, log: &Path) -> i32 {
    let status = Command::new(binary)
        .arg("--config")
        .arg(config)
        .arg("--daemon")
        .arg("--log-file")
        .arg(log)
        .status()
        .expect("run the binary");
    assert!(
        status.success(),
        "{} --daemon exited {status}",
        binary.display()
    );
    let pid = wait::until(
        "the pidfile",
        TIMEOUT,
        || read_pid(pidfile),
        || format!("no pid in {}", pidfile.display()),
    );
    assert!(alive(pid), "the daemon {pid} is not running");
    assert_ne!(pid as u32, std::process::id());
    pid
}

fn stop_daemon(pid: i32, log: &Path) {
    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("signal the daemon");
    wait::until(
        "the daemon's exit",
        TIMEOUT,
        || (!alive(pid)).then_some(()),
        || format!("daemon {pid} still running after SIGTERM"),
    );
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(text.contains("shutting down"), "{text}");
    assert!(text.contains("stopped"), "{text}");
}

/// A guard that stops a daemon by its PID if the test fails half-way.
struct Guard(Option<i32>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn every_binary_detaches_writes_its_pidfile_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fail2ban.log"), "").unwrap();
    let config = d.join("fail2ban-cluster.conf");
    // Real trust: the publisher's key file and web1's credential on both sides.
    let keyring = Keyring::generate();
    keyring.write_signing_key(&d.join("publisher.key"));
    let trust = format!(
        "{}signing_key_file = \"{d}/publisher.key\"\n[trust.monitors]\nweb1 = {}\n",
        trust_section(
            Some(&keyring.secret("web1")),
            &[keyring.public_key()],
            false
        ),
        toml_str(keyring.secret("web1").expose()),
        d = d.display()
    );
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"web1\"\n\
             [publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\nbroadcast_bind = \"tcp://127.0.0.1:*\"\n\
             pidfile = \"{d}/run/publisher.pid\"\nstate_dir = \"{d}/publisher\"\n\
             [monitor]\nlog_path = \"{d}/fail2ban.log\"\npublisher = \"tcp://127.0.0.1:9\"\n\
             pidfile = \"{d}/run/monitor.pid\"\nstate_dir = \"{d}/monitor\"\n\
             [subscriber]\npublisher = \"tcp://127.0.0.1:9\"\naction = \"none\"\n\
             pidfile = \"{d}/run/subscriber.pid\"\nstate_dir = \"{d}/subscriber\"\n{trust}",
            d = d.display()
        ),
    )
    .unwrap();
    for (binary, name) in [
        (bins::publisher(), "publisher"),
        (bins::monitor(), "monitor"),
        (bins::subscriber(), "subscriber"),
    ] {
        let pidfile = d.join("run").join(format!("{name}.pid"));
        let log = d.join(format!("{name}.log"));
        let mut guard = Guard(None);
        let pid = start_daemon(&binary, &config, &pidfile, &log);
        guard.0 = Some(pid);
        // Working: the daemon logged its start into --log-file.
        let ready = match name {
            "publisher" => "listening on",
            "monitor" => "watching",
            _ => "starting",
        };
        wait::until(
            "the daemon's start",
            TIMEOUT,
            || {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|t| t.contains(ready))
                    .map(|_| ())
            },
            || format!("{name}: no {ready:?} in {}", log.display()),
        );
        stop_daemon(pid, &log);
        guard.0 = None;
        eprintln!(
            "{name}: detached as {pid}, wrote {}, stopped on SIGTERM",
            pidfile.display()
        );
    }
}
