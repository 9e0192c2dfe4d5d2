//! systemd readiness (`Type=notify`): the real `f2b-subscriber` binary, with
//! `NOTIFY_SOCKET` pointing at a datagram socket the test binds as systemd
//! would, sends `READY=1` once its state is open and its SUB socket connected,
//! even with no publisher up (a unit must not fail to start because the hub is
//! down), and `STOPPING=1` on SIGTERM; a start that fails never says `READY=1`.

mod common;

use std::path::{Path, PathBuf};

use common::{test_key, DEADLINE};
use f2b_common::testing::NotifySocket;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-subscriber");

/// A configuration subscribed to `publisher` with the test key, action `none`.
fn config(dir: &Path, publisher: &str, state_dir: &Path) -> PathBuf {
    let path = dir.join("f2b.conf");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"{publisher}\"\naction = \"none\"\n\
             state_dir = {:?}\n[trust]\npublisher_key = \"{}\"\n",
            state_dir.display().to_string(),
            test_key().public(),
        ),
    )
    .unwrap();
    path
}

/// A loopback endpoint nothing listens on.
fn closed_endpoint() -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("tcp://{}", closed.local_addr().unwrap())
}

#[test]
fn ready_with_no_publisher_up_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let endpoint = closed_endpoint();
    let state = dir.path().join("state");
    let conf = config(dir.path(), &endpoint, &state);
    let mut sub = notify.spawn(BIN, &conf);

    let status = notify.expect_status("READY=1", DEADLINE);
    assert_eq!(status, format!("subscribed to {endpoint}"));
    // The state was opened before.
    assert!(state.read_dir().unwrap().next().is_some());
    assert!(sub.is_running(), "still running");

    notify.assert_clean_stop(&mut sub, DEADLINE);
}

#[test]
fn a_failed_start_never_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    // The state directory cannot be made: its parent is a file.
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, "").unwrap();
    let conf = config(dir.path(), &closed_endpoint(), &file.join("state"));
    let mut sub = notify.spawn(BIN, &conf);
    notify.assert_failed_start(&mut sub, "not-a-directory", DEADLINE);
}

#[test]
fn status_says_when_the_publisher_is_heard() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let publ = common::TestPublisher::start(std::time::Duration::from_millis(100));
    let conf = config(dir.path(), &publ.endpoint, &dir.path().join("state"));
    let mut sub = notify.spawn(BIN, &conf);

    notify.expect("READY=1", DEADLINE);
    notify.expect(
        &format!("STATUS=receiving from the publisher (epoch {})", publ.epoch),
        DEADLINE,
    );

    let (_, status) = notify.stop(&mut sub, DEADLINE);
    let lines = sub.seen();
    assert_eq!(status.code(), Some(0), "{}", lines.join("\n"));
}
