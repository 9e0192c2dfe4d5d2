//! Helpers shared by the monitor's integration tests (`mod common;`). Not
//! every test binary uses every one of them.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use f2b_common::sockets::last_endpoint;
use f2b_common::zmq;

/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// The start of a fail2ban action line, up to the `[jail]`.
pub const ACTION: &str = "2026-11-21 04:53:00,000 fail2ban.actions        [1]: NOTICE  ";

/// Appends `text` to the file at `path`, as fail2ban writes its log.
pub fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// A socket of `kind` bound to `endpoint`, whose receives wait at most [`WAIT`].
pub fn bind_at(ctx: &zmq::Context, kind: zmq::SocketType, endpoint: &str) -> zmq::Socket {
    let s = ctx.socket(kind).unwrap();
    s.set_rcvtimeo(WAIT.as_millis() as i32).unwrap();
    s.bind(endpoint).unwrap();
    s
}

/// A socket of `kind` on an ephemeral loopback port (as [`bind_at`]), and
/// its endpoint.
pub fn bind_loopback(ctx: &zmq::Context, kind: zmq::SocketType) -> (zmq::Socket, String) {
    let s = bind_at(ctx, kind, "tcp://127.0.0.1:*");
    let endpoint = last_endpoint(&s);
    (s, endpoint)
}

/// Waits (at most [`WAIT`]) until the saved position at `path` is `offset` in
/// its first file; panics with the last one read otherwise.
pub fn wait_offset(path: &Path, offset: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let saved = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let at = saved
            .as_ref()
            .and_then(|s| s["files"][0]["offset"].as_u64());
        if at == Some(offset) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no saved position at offset {offset} in {}: {saved:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
