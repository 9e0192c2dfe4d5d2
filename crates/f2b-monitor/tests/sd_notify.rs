//! systemd readiness (`Type=notify`): the real `f2b-monitor` binary, with
//! `NOTIFY_SOCKET` pointing at a datagram socket the test binds as systemd
//! would, sends `READY=1` once its state is loaded and the log is watched, even
//! with the publisher unreachable (a unit must not fail to start because the hub
//! is down), and `STOPPING=1` on SIGTERM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use f2b_common::testing::NotifySocket;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-monitor");
const DEADLINE: Duration = Duration::from_secs(15);

/// A configuration reporting to `publisher`, web1's secret in a file (mode 0600).
fn config(dir: &Path, log: &Path, publisher: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("node.secret");
    std::fs::write(&secret, "notify-test-secret-0123456789abcdefghijklmnop\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.join("f2b.conf");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"web1\"\n[monitor]\nlog_path = {:?}\npublisher = \"{publisher}\"\n\
             state_dir = {:?}\n[trust]\nsecret_file = {:?}\n",
            log.display().to_string(),
            dir.join("state").display().to_string(),
            secret.display().to_string(),
        ),
    )
    .unwrap();
    path
}

/// A temporary directory with the notification socket and an empty
/// `fail2ban.log` in it.
fn setup() -> (tempfile::TempDir, NotifySocket, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(dir.path());
    let log = dir.path().join("fail2ban.log");
    std::fs::write(&log, "").unwrap();
    (dir, notify, log)
}

#[test]
fn ready_with_the_publisher_unreachable_and_stopping_on_sigterm() {
    let (dir, mut notify, log) = setup();
    // A loopback port nothing listens on: the publisher is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp://{}", closed.local_addr().unwrap());
    drop(closed);
    let conf = config(dir.path(), &log, &endpoint);
    let mut monitor = notify.spawn(BIN, &conf);

    let status = notify.expect_status("READY=1", DEADLINE);
    assert_eq!(
        status,
        format!("watching {}, reporting to {endpoint}", log.display())
    );
    // The state was loaded (its directory made) before.
    assert!(dir.path().join("state").is_dir());
    assert!(monitor.is_running(), "still running");

    notify.assert_clean_stop(&mut monitor, DEADLINE);
}

#[test]
fn status_follows_the_connection_to_the_publisher() {
    let (dir, mut notify, log) = setup();
    // A ZeroMQ peer where the publisher should be: the handshake completes.
    let ctx = f2b_common::zmq::Context::new();
    let rep = ctx.socket(f2b_common::zmq::REP).unwrap();
    rep.set_linger(0).unwrap();
    rep.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = rep.get_last_endpoint().unwrap().unwrap();
    let conf = config(dir.path(), &log, &endpoint);
    let mut monitor = notify.spawn(BIN, &conf);

    // The handshake may complete before the monitor is ready or after.
    notify.seen_or_expect("READY=1", DEADLINE);
    notify.seen_or_expect(
        &format!("STATUS=reporting to {endpoint}: connected"),
        DEADLINE,
    );
    // The publisher goes away.
    drop(rep);
    notify.expect(
        &format!("STATUS=reporting to {endpoint}: disconnected, reports wait in the queue"),
        DEADLINE,
    );

    let (_, status) = notify.stop(&mut monitor, DEADLINE);
    let lines = monitor.seen();
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
}
