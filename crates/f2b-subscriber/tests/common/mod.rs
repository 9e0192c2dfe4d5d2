//! Test harness: a real ZeroMQ PUB socket on an ephemeral loopback port that sends
//! heartbeats and events signed with a test key, a subscriber run in-process with
//! a channel of notices, and log capture.

#![allow(dead_code)]

pub mod fail2ban;
pub mod hub;

use std::net::IpAddr;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use f2b_common::config::Config;
use f2b_common::{zmq, CancellationToken};
use f2b_proto::auth::{sign_broadcast, SigningKey};
use f2b_proto::{
    Action, Broadcast, Epoch, Event, EventBatch, EventId, Heartbeat, JailName, NodeName, Sequenced,
};
use f2b_subscriber::{Applier, Notice, Refusal, Subscriber, SubscriberError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// How long a test waits for anything before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The key test publishers sign with; the subscribers' `[trust] publisher_key`
/// unless a test says otherwise.
pub fn test_key() -> SigningKey {
    SigningKey::from_seed([42; 32])
}

/// A key no subscriber trusts.
pub fn other_key() -> SigningKey {
    SigningKey::from_seed([43; 32])
}

/// The frames of `b`: topic, payload and, with `key`, its signature.
pub fn frames(b: &Broadcast, key: Option<&SigningKey>) -> Vec<Vec<u8>> {
    let (topic, payload) = (b.topic(), b.encode());
    let mut f = vec![topic, payload];
    if let Some(k) = key {
        f.push(sign_broadcast(k, &f[0], &f[1]).to_vec());
    }
    f
}

enum Cmd {
    Send(Broadcast),
    SendWith(Box<(Broadcast, Option<SigningKey>)>),
    Raw(Vec<Vec<u8>>),
    Heartbeats(bool),
    Stop,
}

/// A publisher stand-in: a PUB socket owned by a thread that sends a heartbeat
/// every interval (while enabled) and whatever it is told to.
pub struct TestPublisher {
    pub endpoint: String,
    pub epoch: Epoch,
    cmd: std_mpsc::Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
}

impl TestPublisher {
    /// Binds tcp://127.0.0.1:* with a random epoch; signs with [`test_key`].
    pub fn start(interval: Duration) -> TestPublisher {
        TestPublisher::start_at("tcp://127.0.0.1:*", random_epoch(), interval)
    }

    /// Like [`TestPublisher::start`], signing with `key` (`None`: unsigned).
    pub fn start_signing(interval: Duration, key: Option<SigningKey>) -> TestPublisher {
        TestPublisher::start_at_with("tcp://127.0.0.1:*", random_epoch(), interval, key)
    }

    /// Binds `endpoint` (to restart a publisher on the same port).
    pub fn start_at(endpoint: &str, epoch: Epoch, interval: Duration) -> TestPublisher {
        TestPublisher::start_at_with(endpoint, epoch, interval, Some(test_key()))
    }

    /// Binds `endpoint`, signing with `key` (`None`: unsigned).
    pub fn start_at_with(
        endpoint: &str,
        epoch: Epoch,
        interval: Duration,
        key: Option<SigningKey>,
    ) -> TestPublisher {
        let (cmd, rx) = std_mpsc::channel();
        let (ep_tx, ep_rx) = std_mpsc::channel();
        let endpoint = endpoint.to_owned();
        let label = endpoint.clone();
        let thread = std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let publ = f2b_common::sockets::new_socket(&ctx, zmq::PUB).unwrap();
            // The port of a restarted publisher may still be held for a moment.
            let start = std::time::Instant::now();
            loop {
                match publ.bind(&endpoint) {
                    Ok(()) => break,
                    Err(e) if start.elapsed() < DEADLINE => {
                        eprintln!("bind {endpoint}: {e}, retrying");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("bind {endpoint}: {e}"),
                }
            }
            ep_tx
                .send(f2b_common::sockets::last_endpoint(&publ))
                .unwrap();
            let mut beating = true;
            let mut last_seq = 0;
            loop {
                match rx.recv_timeout(interval) {
                    Ok(Cmd::Send(b)) => {
                        if let Some(s) = b.events().last() {
                            last_seq = last_seq.max(s.seq);
                        }
                        publ.send_multipart(frames(&b, key.as_ref()), 0).unwrap();
                    }
                    Ok(Cmd::SendWith(bk)) => {
                        let (b, k) = *bk;
                        publ.send_multipart(frames(&b, k.as_ref()), 0).unwrap()
                    }
                    Ok(Cmd::Raw(frames)) => publ.send_multipart(frames, 0).unwrap(),
                    Ok(Cmd::Heartbeats(on)) => beating = on,
                    Ok(Cmd::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        if beating {
                            let hb = Broadcast::Heartbeat(Heartbeat {
                                seq: last_seq,
                                epoch,
                                interval_ms: interval.as_millis() as u64,
                            });
                            publ.send_multipart(frames(&hb, key.as_ref()), 0).unwrap();
                        }
                    }
                }
            }
        });
        // Bounded: the thread binds within DEADLINE or panics (which closes the
        // channel at once).
        let endpoint = ep_rx
            .recv_timeout(DEADLINE + Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("test publisher on {label} not bound: {e}"));
        TestPublisher {
            endpoint,
            epoch,
            cmd,
            thread: Some(thread),
            next_seq: 1,
        }
    }

    /// Broadcasts an event with the next sequence number; returns it.
    pub fn event(&mut self, node: &str, jail: &str, action: Action, ip: &str) -> Sequenced {
        let s = Sequenced {
            seq: self.next_seq,
            epoch: self.epoch,
            event: event(node, jail, action, ip),
        };
        self.next_seq += 1;
        self.send(s.clone());
        s
    }

    /// Broadcasts one `events` message of bans of `jail`, one per address, with
    /// the next sequence numbers; returns them.
    pub fn events(&mut self, node: &str, jail: &str, ips: &[&str]) -> Vec<Sequenced> {
        let items: Vec<Sequenced> = ips
            .iter()
            .map(|ip| {
                let s = Sequenced {
                    seq: self.next_seq,
                    epoch: self.epoch,
                    event: event(node, jail, Action::Ban, ip),
                };
                self.next_seq += 1;
                s
            })
            .collect();
        self.send_batch(items.clone());
        items
    }

    /// Broadcasts `items` as one `events` message (they must make a valid one).
    pub fn send_batch(&self, items: Vec<Sequenced>) {
        let batch = EventBatch::new(items).expect("a valid events message");
        self.cmd.send(Cmd::Send(Broadcast::Events(batch))).unwrap();
    }

    /// Broadcasts `s` as given.
    pub fn send(&self, s: Sequenced) {
        self.cmd.send(Cmd::Send(Broadcast::Event(s))).unwrap();
    }

    /// Broadcasts `b` signed with `key` instead of the publisher's own (`None`:
    /// unsigned); heartbeats do not count it.
    pub fn send_with(&self, b: Broadcast, key: Option<SigningKey>) {
        self.cmd.send(Cmd::SendWith(Box::new((b, key)))).unwrap();
    }

    /// Skips `n` sequence numbers (events the subscriber never gets).
    pub fn skip(&mut self, n: u64) {
        self.next_seq += n;
    }

    pub fn raw(&self, frames: Vec<Vec<u8>>) {
        self.cmd.send(Cmd::Raw(frames)).unwrap();
    }

    pub fn heartbeats(&self, on: bool) {
        self.cmd.send(Cmd::Heartbeats(on)).unwrap();
    }
}

impl Drop for TestPublisher {
    fn drop(&mut self) {
        let _ = self.cmd.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A value unique in this process and unlikely to repeat across runs.
pub fn unique() -> u128 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    (nanos << 32) ^ u128::from(n) ^ (u128::from(std::process::id()) << 96)
}

pub fn random_epoch() -> Epoch {
    Epoch(unique() as u64)
}

pub fn event(node: &str, jail: &str, action: Action, ip: &str) -> Event {
    Event::new(
        EventId::from_u128(unique()),
        NodeName::new(node).unwrap(),
        JailName::new(jail).unwrap(),
        action,
        ip.parse().unwrap(),
        1_763_702_000_000,
    )
    .unwrap()
}

/// A ban of `ip` in jail sshd from node web2, numbered `seq` of `epoch`.
pub fn ban(seq: u64, epoch: Epoch, ip: &str) -> Sequenced {
    Sequenced {
        seq,
        epoch,
        event: event("web2", "sshd", Action::Ban, ip),
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An expiry an hour from now.
pub fn until() -> u64 {
    f2b_subscriber::store::now_ms() + 3_600_000
}

/// How many of `seen` are refusals for `reason`.
pub fn refusals(seen: &[Notice], reason: Refusal) -> usize {
    seen.iter()
        .filter(|n| matches!(n, Notice::Refused { reason: r, .. } if *r == reason))
        .count()
}

/// The `[subscriber]` lines of a subscriber that asks `endpoint` for snapshots
/// and never gives the link up for dead during a test.
pub fn snapshot_lines(endpoint: &str) -> String {
    format!("snapshot = \"{endpoint}\"\nheartbeat_timeout = \"10m\"")
}

/// The answer to an HTTP GET of `path` from `addr` (status line, headers, body).
pub async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    out
}

/// The value of the sample line starting with `name` (with its labels).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The address the metrics endpoint says it listens on, from its log line
/// (logged before the subscriber connects).
pub fn metrics_addr(logs: &Logs) -> String {
    logs.text()
        .lines()
        .find_map(|l| {
            l.split("metrics listening on ")
                .nth(1)
                .map(|a| a.split_whitespace().next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no metrics line in\n{}", logs.text()))
}

/// A new directory for a test's files, under the target directory's `tmp` (kept
/// after the test, for a look at what went wrong).
pub fn scratch_dir() -> std::path::PathBuf {
    tempfile::Builder::new()
        .prefix("f2b-subscriber-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch directory")
        .keep()
}

/// A configuration with `[node]` and `[subscriber]` from TOML lines (`publisher`
/// is added, and a new `state_dir` unless the lines set one), and `[trust]
/// publisher_key` = [`test_key`] unless the lines have a `[trust]` table of their
/// own (after the subscriber's keys).
pub fn config(node: &str, endpoint: &str, subscriber: &str) -> Config {
    let state = if subscriber.contains("state_dir") {
        String::new()
    } else {
        format!("state_dir = {:?}\n", scratch_dir().join("state"))
    };
    let trust = if subscriber.contains("[trust]") {
        String::new()
    } else {
        format!("[trust]\npublisher_key = \"{}\"\n", test_key().public())
    };
    let text = format!(
        "[node]\nname = \"{node}\"\n[subscriber]\npublisher = \"{endpoint}\"\n{state}{subscriber}\n{trust}"
    );
    f2b_common::config::from_str(&text, Path::new("test.conf"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The `[trust]` lines of a subscriber that verifies nothing.
pub const UNAUTHENTICATED: &str = "\n[trust]\nallow_unauthenticated = true";

/// A subscriber running in-process.
pub struct Running {
    pub token: CancellationToken,
    handle: Option<tokio::task::JoinHandle<Result<(), SubscriberError>>>,
    notices: mpsc::UnboundedReceiver<Notice>,
    /// Every notice received so far.
    pub seen: Vec<Notice>,
}

impl Running {
    pub fn start(config: &Config) -> Running {
        Running::start_with(Subscriber::new(config))
    }

    pub fn start_applier(config: &Config, applier: Box<dyn Applier>) -> Running {
        Running::start_with(Subscriber::new(config).with_applier(applier))
    }

    pub fn start_with(s: Subscriber) -> Running {
        keep_logs_interesting();
        let (tx, notices) = mpsc::unbounded_channel();
        let token = CancellationToken::new();
        let handle = tokio::spawn(s.with_notices(tx).run(token.clone()));
        Running {
            token,
            handle: Some(handle),
            notices,
            seen: Vec::new(),
        }
    }

    /// Waits for a notice matching `pred` (any time after the previous match),
    /// failing the test after `DEADLINE`.
    pub async fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Notice) -> bool) -> Notice {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let n = tokio::time::timeout_at(deadline, self.notices.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}; seen: {:#?}", self.seen))
                .expect("subscriber stopped");
            self.seen.push(n.clone());
            if pred(&n) {
                return n;
            }
        }
    }

    pub async fn connected(&mut self) -> Epoch {
        match self
            .wait_for("connected", |n| matches!(n, Notice::Connected { .. }))
            .await
        {
            Notice::Connected { epoch } => epoch,
            _ => unreachable!(),
        }
    }

    pub async fn resynced(&mut self) -> Notice {
        self.wait_for("resync", |n| matches!(n, Notice::Resynced { .. }))
            .await
    }

    pub async fn refused(&mut self, reason: Refusal) {
        self.wait_for(
            &format!("refused {reason}"),
            |n| matches!(n, Notice::Refused { reason: r, .. } if *r == reason),
        )
        .await;
    }

    pub async fn applied(&mut self, ip: &str) -> Notice {
        let ip: IpAddr = ip.parse().unwrap();
        self.wait_for(
            &format!("applied {ip}"),
            |n| matches!(n, Notice::Applied { ip: i, .. } if *i == ip),
        )
        .await
    }

    /// Cancels and waits for `run` to return, which must be Ok and prompt; returns
    /// the notices seen.
    pub async fn stop(mut self) -> Vec<Notice> {
        self.token.cancel();
        let h = self.handle.take().unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("run returned within 10 s of shutdown")
            .expect("run did not panic");
        r.expect("run returned Ok");
        std::mem::take(&mut self.seen)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Log lines written on the current thread while alive (the subscriber's tasks run
/// on the test's current-thread runtime, so their lines are captured).
pub struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

/// Installs, once, a global subscriber that wants every event up to DEBUG and
/// writes them nowhere. Captures are thread-scoped; tracing caches each log
/// call's interest when it is first hit, from the subscribers alive then, and a
/// call first hit while no capture was alive (another test's thread) could be
/// cached as "never" and missed by a capture created at that moment. With this
/// one alive for the whole process, no call is ever cached as "never".
pub fn keep_logs_interesting() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let sink = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(std::io::sink)
            .finish();
        let _ = tracing::subscriber::set_global_default(sink);
    });
}

impl Logs {
    pub fn capture() -> Logs {
        keep_logs_interesting();
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Writer(buf.clone());
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || w.clone())
            .finish();
        Logs {
            buf,
            _guard: tracing::subscriber::set_default(sub),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }
}

#[derive(Clone)]
struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
