//! systemd readiness (`Type=notify`): the real `f2b-publisher` binary, with
//! `NOTIFY_SOCKET` pointing at a datagram socket the test binds as systemd
//! would, sends `READY=1` once its sockets are bound and its ledger is open, and
//! `STOPPING=1` on SIGTERM; a start that fails never says `READY=1`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use f2b_common::testing::NotifySocket;

use f2b_proto::auth::SigningKey;

const BIN: &str = env!("CARGO_BIN_EXE_f2b-publisher");
const DEADLINE: Duration = Duration::from_secs(15);

/// A configuration with these binds, the test signing key and web1's credential.
fn config(dir: &Path, reply: &str, broadcast: &str) -> PathBuf {
    let key = dir.join("publisher.key");
    std::fs::write(&key, SigningKey::from_seed([7; 32]).to_file_text()).unwrap();
    let path = dir.join("publisher.conf");
    std::fs::write(
        &path,
        format!(
            "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"{reply}\"\n\
             broadcast_bind = \"{broadcast}\"\nstate_dir = {:?}\n\
             [trust]\nsigning_key_file = {:?}\n[trust.monitors]\n\
             web1 = \"web1-secret-0123456789abcdefghijklmnopqrstuvwxyz\"\n",
            dir.join("state").display().to_string(),
            key.display().to_string(),
        ),
    )
    .unwrap();
    path
}

#[test]
fn ready_once_bound_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let conf = config(dir.path(), "tcp://127.0.0.1:*", "tcp://127.0.0.1:*");
    let mut publ = notify.spawn(BIN, &conf);

    // The status names the real endpoints: the sockets were bound before.
    let status = notify.expect_status("READY=1", DEADLINE);
    assert!(
        status.starts_with("serving: reply tcp://127.0.0.1:")
            && status.contains(", broadcast tcp://127.0.0.1:")
            && !status.contains('*'),
        "{status}"
    );
    // The ledger was opened before.
    assert!(dir
        .path()
        .join("state")
        .read_dir()
        .unwrap()
        .next()
        .is_some());
    assert!(publ.is_running(), "still running");

    notify.assert_clean_stop(&mut publ, DEADLINE);
}

#[test]
fn a_failed_start_never_says_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    // The reply port is taken: the publisher cannot bind it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let conf = config(
        dir.path(),
        &format!("tcp://127.0.0.1:{port}"),
        "tcp://127.0.0.1:*",
    );
    let mut publ = notify.spawn(BIN, &conf);
    notify.assert_failed_start(&mut publ, "reply_bind", DEADLINE);
}
