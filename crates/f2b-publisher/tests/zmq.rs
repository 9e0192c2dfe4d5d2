//! The publisher over real ZeroMQ sockets on loopback, in process: REQ clients, SUB
//! clients, fail2ban-zmq-tools clients, snapshots, and hostile raw TCP peers.
//! Ephemeral ports only; every wait has a deadline (socket receive timeouts), none
//! is a sleep.
//!
//! Every hub here has a signing key and credentials for web1 and web2 (as a real
//! one must): reports are signed as their node, every reply MAC and every
//! broadcast and snapshot signature received is checked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use f2b_common::config::{self, Config};
use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::auth::{self, MonitorSecret, PublicKey, RequestAuth, SigningKey};
use f2b_proto::{
    event_topic, AckStatus, Action, Broadcast, Event, EventId, JailName, NakReason, NodeName,
    Reply, Request, SnapshotReply, SnapshotRequest, HEARTBEAT_TOPIC,
};
use f2b_publisher::{bind_trusted, bind_with, Bound, Limits, PublisherError};

/// How long any single wait may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// The monitors' secrets every test hub holds.
const WEB1: &str = "web1-secret-0123456789abcdef0123456789";
const WEB2: &str = "web2-secret-0123456789abcdef0123456789";

/// The seed of every test hub's signing key.
const KEY_SEED: [u8; 32] = [7; 32];

fn public_key() -> PublicKey {
    SigningKey::from_seed(KEY_SEED).public()
}

/// A publisher configuration on ephemeral loopback ports, its ledger in `state`,
/// `extra` lines in `[publisher]`, and `[trust]`: a signing key (its file in
/// `state`), credentials for web1 and web2, and `trust_extra`. The rate limit and
/// the quarantine are off unless `extra` sets them: some tests send thousands of
/// reports from one node.
fn trusted_config(state: &Path, extra: &str, trust_extra: &str) -> Config {
    std::fs::create_dir_all(state).unwrap();
    let key = state.join("publisher.key");
    std::fs::write(&key, SigningKey::from_seed(KEY_SEED).to_file_text()).unwrap();
    let mut guard = String::new();
    if !extra.contains("rate_limit") {
        guard.push_str("rate_limit = 0\n");
    }
    if !extra.contains("quarantine_floor") {
        guard.push_str("quarantine_floor = 1000000\n");
    }
    let text = format!(
        "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\n\
         broadcast_bind = \"tcp://127.0.0.1:*\"\nstate_dir = {:?}\n{guard}{extra}\n\
         [trust]\nsigning_key_file = {:?}\n{trust_extra}\n\
         [trust.monitors]\nweb1 = {WEB1:?}\nweb2 = {WEB2:?}\n",
        state.display().to_string(),
        key.display().to_string(),
    );
    config::from_str(&text, Path::new("test.conf")).expect("test config is valid")
}

fn config(state: &Path, extra: &str) -> Config {
    trusted_config(state, extra, "")
}

fn bind(c: &Config) -> Result<Bound, PublisherError> {
    bind_trusted(&c.publisher, &c.trust)
}

/// A publisher serving in its own runtime; stopped (and checked to stop) on drop.
struct Hub {
    rt: tokio::runtime::Runtime,
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), PublisherError>>>,
    reply: String,
    broadcast: String,
    legacy_broadcast: Option<String>,
    epoch: f2b_proto::Epoch,
    ctx: zmq::Context,
    /// The ledger's directory; dropped last (after `Drop` stopped the hub).
    state: tempfile::TempDir,
}

impl Hub {
    fn start(heartbeat: &str) -> Hub {
        Hub::start_with(&format!("heartbeat_interval = \"{heartbeat}\""))
    }

    /// A hub with `extra` configuration lines, in a new state directory.
    fn start_with(extra: &str) -> Hub {
        let state = tempfile::tempdir().unwrap();
        let bound = bind(&config(state.path(), extra)).unwrap();
        Hub::serve(bound, state)
    }

    fn serve(bound: Bound, state: tempfile::TempDir) -> Hub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let token = CancellationToken::new();
        let reply = bound.reply_endpoint().to_owned();
        let broadcast = bound.broadcast_endpoint().to_owned();
        let legacy_broadcast = bound.legacy_broadcast_endpoint().map(str::to_owned);
        let epoch = bound.epoch();
        let task = Some(rt.spawn(bound.serve(token.clone())));
        Hub {
            rt,
            token,
            task,
            reply,
            broadcast,
            legacy_broadcast,
            epoch,
            ctx: zmq::Context::new(),
            state,
        }
    }

    /// Cancels and returns how `serve` ended and how long it took.
    fn stop(&mut self) -> (Result<(), PublisherError>, Duration) {
        let start = Instant::now();
        self.token.cancel();
        let task = self.task.take().expect("stopped once");
        let result = self
            .rt
            .block_on(async { tokio::time::timeout(DEADLINE, task).await })
            .expect("serve did not return after shutdown")
            .expect("serve panicked");
        (result, start.elapsed())
    }

    /// A hub with `extra` lines in `[publisher]` and `trust_extra` in `[trust]`.
    fn start_trusted(extra: &str, trust_extra: &str) -> Hub {
        let state = tempfile::tempdir().unwrap();
        let bound = bind(&trusted_config(state.path(), extra, trust_extra)).unwrap();
        Hub::serve(bound, state)
    }

    fn req(&self) -> zmq::Socket {
        let s = new_socket(&self.ctx, zmq::REQ).unwrap();
        s.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
        s.connect(&self.reply).unwrap();
        s
    }

    /// A SUB socket subscribed to `prefixes`, returned once it has received a
    /// heartbeat, which proves the subscription is live.
    fn sub(&self, prefixes: &[&[u8]]) -> zmq::Socket {
        let s = new_socket(&self.ctx, zmq::SUB).unwrap();
        s.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
        for p in prefixes {
            s.set_subscribe(p).unwrap();
        }
        s.connect(&self.broadcast).unwrap();
        loop {
            if let Broadcast::Heartbeat(h) = recv_broadcast(&s) {
                assert_eq!(h.epoch, self.epoch);
                return s;
            }
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        // Always stop the serving thread: the runtime's drop waits for it.
        if self.task.is_some() {
            let (result, _) = self.stop();
            if !std::thread::panicking() {
                result.expect("serve failed");
            }
        }
    }
}

fn event(id: u128, jail: &str, action: Action, ip: &str) -> Event {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Event::new(
        EventId::from_u128(id),
        NodeName::new("web1").unwrap(),
        JailName::new(jail).unwrap(),
        action,
        ip.parse().unwrap(),
        now,
    )
    .unwrap()
}

/// Sends `frames` (no credential) and returns the reply, which has one frame.
fn request_frames(req: &zmq::Socket, frames: &[Vec<u8>]) -> Reply {
    req.send_multipart(frames, 0).unwrap();
    let bytes = req.recv_bytes(0).expect("no reply before the deadline");
    assert!(!req.get_rcvmore().unwrap(), "a reply has one frame");
    Reply::decode(&bytes).unwrap()
}

fn secret_of(node: &str) -> MonitorSecret {
    MonitorSecret::new(match node {
        "web1" => WEB1,
        "web2" => WEB2,
        other => panic!("no test secret for {other}"),
    })
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A report of `e` signed as credential `key` with `secret` at `ts_ms`, with a
/// fresh nonce: the request's two frames, and the auth it carries.
fn signed_as(
    e: &Event,
    key: &str,
    secret: &MonitorSecret,
    ts_ms: u64,
) -> (Vec<Vec<u8>>, RequestAuth) {
    let payload = Request::Report(e.clone()).encode();
    let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let a = RequestAuth::sign(secret, &NodeName::new(key).unwrap(), ts_ms, nonce, &payload);
    (vec![payload, a.encode()], a)
}

/// Sends a signed request and returns the reply; when `maced`, the reply must
/// carry a right MAC under `secret`, else it must have one frame.
fn signed_request(
    req: &zmq::Socket,
    frames: &[Vec<u8>],
    a: &RequestAuth,
    secret: &MonitorSecret,
    maced: bool,
) -> Reply {
    req.send_multipart(frames, 0).unwrap();
    let reply = req.recv_multipart(0).expect("no reply before the deadline");
    if maced {
        assert_eq!(reply.len(), 2, "a MACed reply has two frames");
        assert!(
            auth::verify_reply(secret, &a.mac, &reply[0], &reply[1]),
            "wrong reply MAC"
        );
    } else {
        assert_eq!(reply.len(), 1, "an unauthenticated reply has one frame");
    }
    Reply::decode(&reply[0]).unwrap()
}

/// Sends `frames` and returns the reply's one frame as bytes.
fn raw_request(req: &zmq::Socket, frames: &[Vec<u8>]) -> Vec<u8> {
    req.send_multipart(frames, 0).unwrap();
    let bytes = req.recv_bytes(0).expect("no reply before the deadline");
    assert!(!req.get_rcvmore().unwrap(), "a reply has one frame");
    bytes
}

/// Reports `e` as its node (signed now, with its secret); checks the reply MAC.
fn report(req: &zmq::Socket, e: &Event) -> Reply {
    let secret = secret_of(e.node.as_str());
    let (frames, a) = signed_as(e, e.node.as_str(), &secret, now_ms());
    signed_request(req, &frames, &a, &secret, true)
}

fn expect_ack(reply: Reply, status: AckStatus, seq: Option<u64>) {
    match reply {
        Reply::Ack(a) => assert_eq!((a.status, a.seq), (status, seq)),
        other => panic!("expected {status:?}, got {other:?}"),
    }
}

fn expect_nak(reply: Reply, reason: NakReason) {
    match reply {
        Reply::Nak(n) => assert_eq!(n.reason, reason, "{n:?}"),
        other => panic!("expected NAK {reason}, got {other:?}"),
    }
}

/// The next broadcast, its signature checked.
fn recv_broadcast(sub: &zmq::Socket) -> Broadcast {
    let frames = sub
        .recv_multipart(0)
        .expect("no broadcast before the deadline");
    assert_eq!(frames.len(), 3, "a signed broadcast has three frames");
    assert!(
        auth::verify_broadcast(&[public_key()], &frames[0], &frames[1], &frames[2]),
        "a broadcast with a wrong signature"
    );
    Broadcast::decode(&frames[0], &frames[1]).unwrap()
}

/// The next event broadcast, skipping heartbeats: (seq, event). For reports sent
/// one at a time, which are broadcast one at a time.
fn next_event(sub: &zmq::Socket) -> (u64, Event) {
    loop {
        match recv_broadcast(sub) {
            Broadcast::Event(s) => return (s.seq, s.event),
            Broadcast::Heartbeat(_) => {}
            batch => panic!("reports sent one at a time broadcast together: {batch:?}"),
        }
    }
}

#[test]
fn reports_are_acked_and_broadcast_in_sequence() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    let events = [
        event(1, "sshd", Action::Ban, "203.0.113.5"),
        event(2, "nginx", Action::Ban, "2001:db8::7"),
        event(3, "sshd", Action::Unban, "203.0.113.5"),
    ];
    for (n, e) in events.iter().enumerate() {
        expect_ack(report(&req, e), AckStatus::Broadcast, Some(n as u64 + 1));
    }
    // Not broadcast: a resend, an echo, a refusal.
    expect_ack(report(&req, &events[0]), AckStatus::Duplicate, Some(1));
    expect_ack(
        report(&req, &event(4, "nginx", Action::Ban, "2001:db8::7")),
        AckStatus::Unchanged,
        None,
    );
    expect_nak(
        report(&req, &event(5, "sshd", Action::Ban, "127.0.0.1")),
        NakReason::Forbidden,
    );
    expect_nak(
        request_frames(&req, &[b"{garbage".to_vec()]),
        NakReason::Malformed,
    );
    // Not JSON: a legacy request, and legacy is off.
    assert_eq!(raw_request(&req, &[b"garbage".to_vec()]), b"NAK");
    let last = event(6, "sshd", Action::Ban, "198.51.100.1");
    expect_ack(report(&req, &last), AckStatus::Broadcast, Some(4));

    for (n, e) in events.iter().chain([&last]).enumerate() {
        assert_eq!(next_event(&sub), (n as u64 + 1, e.clone()));
    }
    // The next heartbeat carries the last sequence number.
    loop {
        if let Broadcast::Heartbeat(h) = recv_broadcast(&sub) {
            assert_eq!((h.seq, h.epoch, h.interval_ms), (4, hub.epoch, 50));
            break;
        }
    }
}

#[test]
fn jail_filtered_subscriber_gets_its_jail_and_heartbeats_only() {
    let hub = Hub::start("50ms");
    let sshd = JailName::new("sshd").unwrap();
    let filtered = hub.sub(&[HEARTBEAT_TOPIC, &event_topic(&sshd)]);
    let req = hub.req();
    for (id, jail) in [(1, "sshd"), (2, "sshd-ddos"), (3, "nginx"), (4, "sshd")] {
        let ip = format!("203.0.113.{id}");
        expect_ack(
            report(&req, &event(id, jail, Action::Ban, &ip)),
            AckStatus::Broadcast,
            Some(id as u64),
        );
    }
    // PUB/SUB keeps order, so once seq 4 arrived, 2 and 3 would have come before.
    let mut seen = Vec::new();
    while seen.last() != Some(&4) {
        for s in recv_broadcast(&filtered).events() {
            assert_eq!(s.event.jail, sshd);
            seen.push(s.seq);
        }
    }
    assert_eq!(seen, [1, 4]);
}

/// A raw ZMTP 3.0 peer: greeting, READY as `socket_type`, then a frame header
/// announcing a 1 TiB frame. Returns the connection, which libzmq must then close.
fn huge_frame_peer(endpoint: &str, socket_type: &str) -> TcpStream {
    let addr = endpoint.strip_prefix("tcp://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut greeting = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    let mut mechanism = b"NULL".to_vec();
    mechanism.resize(20, 0);
    greeting.extend_from_slice(&mechanism);
    greeting.push(0); // as-server
    greeting.extend_from_slice(&[0; 31]);
    assert_eq!(greeting.len(), 64);
    s.write_all(&greeting).unwrap();
    let mut theirs = [0u8; 64];
    s.read_exact(&mut theirs).unwrap();
    assert_eq!((theirs[0], theirs[9], theirs[10]), (0xFF, 0x7F, 3));

    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut ready = vec![0x04, body.len() as u8];
    ready.extend_from_slice(&body);
    s.write_all(&ready).unwrap();

    let mut frame = vec![0x02];
    frame.extend_from_slice(&(1u64 << 40).to_be_bytes());
    frame.extend_from_slice(b"and then some bytes of it");
    s.write_all(&frame).unwrap();
    s
}

/// Reads until the server closes the connection; fails at the deadline.
fn assert_closed_by_server(mut s: TcpStream) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // the server's READY
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server kept the connection ({e})"),
        }
        assert!(start.elapsed() < DEADLINE, "the server kept the connection");
    }
}

#[test]
fn hostile_peers_do_not_stop_service() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    expect_ack(
        report(&req, &event(1, "sshd", Action::Ban, "203.0.113.1")),
        AckStatus::Broadcast,
        Some(1),
    );

    // 1 TiB frames announced to both sockets: libzmq drops those peers.
    let on_rep = huge_frame_peer(&hub.reply, "REQ");
    let on_pub = huge_frame_peer(&hub.broadcast, "SUB");
    assert_closed_by_server(on_rep);
    assert_closed_by_server(on_pub);

    // Garbage instead of a greeting, to both sockets (libzmq may take it for an
    // old ZMTP 1.0 peer and keep the connection: it must still serve the others).
    let mut garbage = Vec::new();
    for endpoint in [&hub.reply, &hub.broadcast] {
        let mut s = TcpStream::connect(endpoint.strip_prefix("tcp://").unwrap()).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let bytes: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(5000).collect();
        s.write_all(&bytes).unwrap();
        garbage.push(s);
    }

    // Multi-frame junk from a well-formed REQ is answered, once.
    let mut junk: Vec<Vec<u8>> = (0..50).map(|n| vec![n; 100]).collect();
    junk[0][0] = b'{';
    expect_nak(request_frames(&req, &junk), NakReason::Malformed);
    junk[0][0] = b'x';
    assert_eq!(raw_request(&req, &junk), b"NAK");

    // Honest peers are still served.
    expect_ack(
        report(&req, &event(2, "sshd", Action::Ban, "203.0.113.2")),
        AckStatus::Broadcast,
        Some(2),
    );
    let req2 = hub.req();
    expect_ack(
        report(&req2, &event(3, "sshd", Action::Ban, "203.0.113.3")),
        AckStatus::Broadcast,
        Some(3),
    );
    assert_eq!(next_event(&sub).0, 1);
    assert_eq!(next_event(&sub).0, 2);
    assert_eq!(next_event(&sub).0, 3);
    let late = hub.sub(&[b""]);
    expect_ack(
        report(&req, &event(4, "sshd", Action::Ban, "203.0.113.4")),
        AckStatus::Broadcast,
        Some(4),
    );
    assert_eq!(next_event(&late).0, 4);
    drop(garbage);
}

#[test]
fn shutdown_returns_promptly_and_delivers_what_was_broadcast() {
    // A long heartbeat interval: the loop must wake on the shutdown socket, not on
    // a poll timeout.
    let mut hub = Hub::start("1h");
    // Without heartbeats, prove the subscription live with a first event.
    let sub = new_socket(&hub.ctx, zmq::SUB).unwrap();
    sub.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.connect(&hub.broadcast).unwrap();
    let req = hub.req();
    let mut id = 0;
    loop {
        id += 1;
        let ip = format!("198.51.100.{}", id % 250 + 1);
        expect_ack(
            report(&req, &event(id, "sshd", Action::Ban, &ip)),
            AckStatus::Broadcast,
            Some(id as u64),
        );
        // recv with a short timeout while the subscription propagates.
        sub.set_rcvtimeo(20).unwrap();
        if let Ok(frames) = sub.recv_multipart(0) {
            assert!(auth::verify_broadcast(
                &[public_key()],
                &frames[0],
                &frames[1],
                &frames[2]
            ));
            let b = Broadcast::decode(&frames[0], &frames[1]).unwrap();
            assert!(matches!(b, Broadcast::Event(_)));
            break;
        }
        assert!(id < 250, "the subscription never became live");
    }
    sub.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    // Drain what else arrived, then broadcast one more and stop at once.
    let last = id as u64 + 1;
    expect_ack(
        report(&req, &event(1000, "sshd", Action::Ban, "192.0.2.200")),
        AckStatus::Broadcast,
        Some(last),
    );
    let (result, took) = hub.stop();
    result.unwrap();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    loop {
        let (seq, _) = next_event(&sub);
        if seq == last {
            break;
        }
    }
}

#[test]
fn run_stops_on_cancel_and_bind_errors_name_the_key() {
    let hub = Hub::start("50ms");
    // The reply port is taken by the first hub.
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(state.path(), "");
    cfg.publisher.reply_bind = config::Endpoint::bind(&hub.reply).unwrap();
    let err = bind(&cfg).unwrap_err();
    assert!(
        matches!(
            err,
            PublisherError::Bind {
                key: "publisher.reply_bind",
                ..
            }
        ),
        "{err:?}"
    );
    let shown = f2b_common::daemon::error_chain(&err);
    assert!(shown.contains(&hub.reply), "{shown}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let token = CancellationToken::new();
        let c = config(state.path(), "");
        let task = tokio::spawn(f2b_publisher::run(c, None, token.clone()));
        token.cancel();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("run did not stop")
            .unwrap()
            .unwrap();
    });
}

#[test]
fn peers_that_never_read_do_not_block_the_others() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);

    // A subscriber that never reads, with the smallest buffers it can have: the PUB
    // socket queues for it up to its high-water mark, then drops; it never blocks.
    let idle_sub = new_socket(&hub.ctx, zmq::SUB).unwrap();
    idle_sub.set_rcvhwm(1).unwrap();
    idle_sub.set_rcvbuf(1024).unwrap();
    idle_sub.set_subscribe(b"").unwrap();
    idle_sub.connect(&hub.broadcast).unwrap();

    // A DEALER that pipelines requests and never reads the replies.
    let idle_req = new_socket(&hub.ctx, zmq::DEALER).unwrap();
    idle_req.set_rcvbuf(1024).unwrap();
    idle_req.connect(&hub.reply).unwrap();
    let junk = b"{\"v\":1}".to_vec();
    for _ in 0..500 {
        idle_req
            .send_multipart([Vec::new(), junk.clone()], zmq::DONTWAIT)
            .unwrap();
    }

    let req = hub.req();
    let n = 3000u32;
    for i in 1..=n {
        let ip = std::net::Ipv4Addr::from(0xC633_6400 + i).to_string();
        expect_ack(
            report(&req, &event(u128::from(i), "sshd", Action::Ban, &ip)),
            AckStatus::Broadcast,
            Some(u64::from(i)),
        );
    }
    for i in 1..=n {
        assert_eq!(next_event(&sub).0, u64::from(i));
    }
    drop((idle_sub, idle_req));
}

/// A SUB socket on the legacy PUB endpoint, returned once it provably receives:
/// native reports of fresh addresses are sent until one arrives in legacy form.
/// Returns the socket and the last sequence number those reports used.
fn legacy_sub(hub: &Hub, req: &zmq::Socket) -> (zmq::Socket, u64) {
    let s = new_socket(&hub.ctx, zmq::SUB).unwrap();
    s.set_subscribe(b"").unwrap();
    s.connect(
        hub.legacy_broadcast
            .as_deref()
            .expect("legacy_broadcast_bind"),
    )
    .unwrap();
    s.set_rcvtimeo(20).unwrap();
    for n in 1..=250u64 {
        let ip = format!("198.51.100.{n}");
        expect_ack(
            report(
                req,
                &event(u128::from(n) + 50_000, "prime", Action::Ban, &ip),
            ),
            AckStatus::Broadcast,
            Some(n),
        );
        if let Ok(frames) = s.recv_multipart(0) {
            assert_eq!(frames.len(), 1, "a legacy broadcast has one frame");
            // Later primers may still be in flight: drain them, they are all ours.
            while let Ok(f) = s.recv_multipart(0) {
                assert!(f[0].starts_with(b"web1|prime|Ban|198.51.100."));
            }
            s.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
            return (s, n);
        }
    }
    panic!("the legacy subscription never became live");
}

fn recv_legacy(sub: &zmq::Socket) -> String {
    let frames = sub
        .recv_multipart(0)
        .expect("no legacy broadcast before the deadline");
    assert_eq!(
        frames.len(),
        1,
        "a legacy broadcast has one frame: {frames:?}"
    );
    String::from_utf8(frames[0].clone()).unwrap()
}

#[test]
fn legacy_monitors_and_subscribers_are_served_beside_native_ones() {
    let hub = Hub::start_with(
        "heartbeat_interval = \"50ms\"\nlegacy = true\n\
         legacy_broadcast_bind = \"tcp://127.0.0.1:*\"",
    );
    let req = hub.req();
    let (old_sub, primed) = legacy_sub(&hub, &req);
    let sub = hub.sub(&[b""]);
    // Native reports of the primers may still be queued for `sub`: it subscribed
    // after them, so it gets none of them.

    // An old monitor's report: the exact echo, a native broadcast, the same string
    // on the legacy socket.
    let wire = "web1|sshd|Ban|203.0.113.5";
    assert_eq!(raw_request(&req, &[wire.into()]), wire.as_bytes());
    let (seq, e) = next_event(&sub);
    assert_eq!(seq, primed + 1);
    assert_eq!(
        (e.node.as_str(), e.jail.as_str(), e.action, e.ip.to_string()),
        ("web1", "sshd", Action::Ban, "203.0.113.5".into())
    );
    assert_eq!(recv_legacy(&old_sub), wire);

    // Refusals are the bare string; an echo of the cluster state is echoed.
    assert_eq!(
        raw_request(&req, &[b"web1|sshd|Drop|203.0.113.5".to_vec()]),
        b"NAK"
    );
    assert_eq!(
        raw_request(&req, &[b"web1|sshd|Ban|127.0.0.1".to_vec()]),
        b"NAK"
    );
    assert_eq!(
        raw_request(&req, &[b"web2|sshd|Ban|203.0.113.5".to_vec()]),
        b"web2|sshd|Ban|203.0.113.5"
    );

    // Native reports are mirrored in legacy form, IPv4 only.
    expect_ack(
        report(&req, &event(1, "sshd", Action::Ban, "2001:db8::5")),
        AckStatus::Broadcast,
        Some(primed + 2),
    );
    expect_ack(
        report(&req, &event(2, "nginx", Action::Unban, "192.0.2.7")),
        AckStatus::Broadcast,
        Some(primed + 3),
    );
    // PUB/SUB keeps order: had the IPv6 ban or a heartbeat been sent to old
    // subscribers, it would come first.
    assert_eq!(recv_legacy(&old_sub), "web1|nginx|Unban|192.0.2.7");
    assert_eq!(next_event(&sub).0, primed + 2);
    assert_eq!(next_event(&sub).0, primed + 3);
    // Nothing else for old subscribers, heartbeats included.
    old_sub.set_rcvtimeo(200).unwrap();
    assert!(
        old_sub.recv_multipart(0).is_err(),
        "a heartbeat or the IPv6 ban went to old subscribers"
    );
}

#[test]
fn legacy_token_is_checked_and_stripped() {
    let hub = Hub::start_with("legacy = true\nlegacy_token = \"s3cret\"");
    let req = hub.req();
    let sub = hub.sub(&[b""]);
    assert_eq!(
        raw_request(&req, &[b"s3cret|web1|sshd|Ban|203.0.113.5".to_vec()]),
        b"web1|sshd|Ban|203.0.113.5"
    );
    assert_eq!(next_event(&sub).0, 1);
    assert_eq!(
        raw_request(&req, &[b"web1|sshd|Ban|203.0.113.6".to_vec()]),
        b"NAK"
    );
    assert_eq!(
        raw_request(&req, &[b"nope|web1|sshd|Ban|203.0.113.6".to_vec()]),
        b"NAK"
    );
    // Native reports are unaffected by the legacy token.
    expect_ack(
        report(&req, &event(1, "sshd", Action::Ban, "203.0.113.6")),
        AckStatus::Broadcast,
        Some(2),
    );
}

/// Asks for a snapshot page (with a fresh nonce, no credential) and checks the
/// reply's signature over the request.
fn snapshot(req: &zmq::Socket, jails: &[&str], cursor: Option<u64>) -> f2b_proto::SnapshotPage {
    let r = Request::Snapshot(SnapshotRequest {
        jails: jails.iter().map(|j| JailName::new(j).unwrap()).collect(),
        cursor,
        nonce: Some(std::array::from_fn(|_| fastrand::u8(..))),
    })
    .encode();
    req.send(&r, 0).unwrap();
    let reply = req.recv_multipart(0).expect("no reply before the deadline");
    assert_eq!(reply.len(), 2, "a signed snapshot reply has two frames");
    assert!(
        auth::verify_snapshot(&[public_key()], &r, &reply[0], &reply[1]),
        "a snapshot reply with a wrong signature"
    );
    match SnapshotReply::decode(&reply[0]).unwrap() {
        SnapshotReply::Page(p) => p,
        SnapshotReply::Nak(n) => panic!("{n:?}"),
    }
}

#[test]
fn snapshots_are_served_page_by_page() {
    let hub = Hub::start("1h");
    let req = hub.req();
    let mut active = Vec::new();
    for n in 1..=150u32 {
        let ip = std::net::Ipv4Addr::from(0xCB00_7100 + n).to_string();
        let jail = if n % 2 == 0 { "sshd" } else { "nginx" };
        expect_ack(
            report(&req, &event(n.into(), jail, Action::Ban, &ip)),
            AckStatus::Broadcast,
            Some(n.into()),
        );
        active.push((u64::from(n), jail, ip));
    }
    // Two of them are unbanned again.
    for (id, n) in [(1000u128, 10usize), (1001, 11)] {
        let (_, jail, ip) = active.remove(n);
        expect_ack(
            report(&req, &event(id, jail, Action::Unban, &ip)),
            AckStatus::Broadcast,
            Some(149 + id as u64 - 998),
        );
    }
    let last = 152;

    let mut got = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = snapshot(&req, &[], cursor);
        assert_eq!((page.epoch, page.seq), (hub.epoch, last));
        got.extend(
            page.bans
                .iter()
                .map(|b| (b.seq, b.event.jail.to_string(), b.event.ip.to_string())),
        );
        pages += 1;
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    let want: Vec<(u64, String, String)> = active
        .iter()
        .map(|(s, j, ip)| (*s, j.to_string(), ip.clone()))
        .collect();
    assert_eq!(got, want);

    let page = snapshot(&req, &["sshd"], None);
    assert!(page.bans.iter().all(|b| b.event.jail.as_str() == "sshd"));
    assert_eq!(page.bans.first().map(|b| b.seq), Some(2));
}

#[test]
fn a_restarted_hub_keeps_its_epoch_sequence_and_memory() {
    let mut hub = Hub::start("50ms");
    let req = hub.req();
    let ban = event(1, "sshd", Action::Ban, "203.0.113.5");
    expect_ack(report(&req, &ban), AckStatus::Broadcast, Some(1));
    expect_ack(
        report(&req, &event(2, "sshd", Action::Ban, "203.0.113.6")),
        AckStatus::Broadcast,
        Some(2),
    );
    let epoch = hub.epoch;
    let (result, _) = hub.stop();
    result.unwrap();
    let state = tempfile::tempdir().unwrap();
    let state = std::mem::replace(&mut hub.state, state);
    drop(hub);

    let bound = bind(&config(state.path(), "heartbeat_interval = \"50ms\"")).unwrap();
    let hub = Hub::serve(bound, state);
    assert_eq!(hub.epoch, epoch);
    let req = hub.req();
    let sub = hub.sub(&[b""]);
    // A resend from before the restart is a duplicate; the new process cannot
    // know whether the old one broadcast it, so it broadcasts it again, with its
    // original seq, once.
    expect_ack(report(&req, &ban), AckStatus::Duplicate, Some(1));
    expect_ack(report(&req, &ban), AckStatus::Duplicate, Some(1));
    expect_ack(
        report(&req, &event(3, "sshd", Action::Ban, "203.0.113.5")),
        AckStatus::Unchanged,
        None,
    );
    expect_ack(
        report(&req, &event(4, "sshd", Action::Unban, "203.0.113.5")),
        AckStatus::Broadcast,
        Some(3),
    );
    assert_eq!(next_event(&sub), (1, ban));
    let (seq, _) = next_event(&sub);
    assert_eq!(seq, 3);
    let page = snapshot(&req, &[], None);
    assert_eq!((page.epoch, page.seq), (hub.epoch, 3));
    assert_eq!(page.bans.iter().map(|b| b.seq).collect::<Vec<_>>(), [2]);
}

/// Rows in the ledger, read through a connection of its own (WAL lets a reader in
/// beside the publisher, as an operator's sqlite3 would).
fn ledger_rows(state: &Path) -> i64 {
    let conn = rusqlite::Connection::open(state.join("ledger.sqlite3")).unwrap();
    conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn the_serving_hub_prunes_its_ledger_periodically() {
    let state = tempfile::tempdir().unwrap();
    let cfg = config(
        state.path(),
        "heartbeat_interval = \"50ms\"\nban_time = \"300ms\"",
    );
    let limits = Limits {
        prune_interval: Duration::from_millis(50),
        ..Limits::default()
    };
    let hub = Hub::serve(
        bind_with(&cfg.publisher, &cfg.trust, limits).unwrap(),
        state,
    );
    let req = hub.req();
    let sub = hub.sub(&[b""]);
    expect_ack(
        report(&req, &event(1, "sshd", Action::Ban, "203.0.113.5")),
        AckStatus::Broadcast,
        Some(1),
    );
    expect_ack(
        report(&req, &event(2, "sshd", Action::Unban, "203.0.113.6")),
        AckStatus::Broadcast,
        Some(2),
    );
    // Committed before the ACK.
    assert_eq!(ledger_rows(hub.state.path()), 2);
    let end = Instant::now() + DEADLINE;
    while ledger_rows(hub.state.path()) != 0 {
        assert!(Instant::now() < end, "the ledger was not pruned");
        // Heartbeats keep coming meanwhile: pruning runs in the serving thread.
        assert!(matches!(
            recv_broadcast(&sub),
            Broadcast::Heartbeat(_) | Broadcast::Event(_)
        ));
    }
    // The sequence goes on.
    expect_ack(
        report(&req, &event(3, "sshd", Action::Ban, "203.0.113.5")),
        AckStatus::Broadcast,
        Some(3),
    );
}

/// `run` opens, prunes and rebuilds the ledger off the async runtime's threads:
/// while another writer (an operator's `sqlite3`) holds the ledger's lock, the
/// runtime's only thread still runs other tasks.
#[test]
fn run_opens_the_ledger_without_blocking_the_runtime() {
    let state = tempfile::tempdir().unwrap();
    drop(f2b_publisher::Ledger::open(state.path()).unwrap());
    let lock = rusqlite::Connection::open(state.path().join("ledger.sqlite3")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let token = CancellationToken::new();
        let c = config(state.path(), "");
        let run = tokio::spawn(f2b_publisher::run(c, None, token.clone()));
        // The runtime's one thread polls `run` now: had it opened the ledger
        // there, it would have come back only after the lock's busy timeout.
        tokio::task::yield_now().await;
        assert!(!run.is_finished(), "run blocked the runtime's thread");
        let result = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("run did not end")
            .unwrap();
        // The ledger stayed locked: the start fails, and says why.
        let err = result.unwrap_err();
        assert!(matches!(err, PublisherError::Ledger(_)), "{err:?}");
    });
    lock.execute_batch("ROLLBACK").unwrap();
}

/// Not a pass/fail test of speed: prints how many reports per second get ACKed
/// over loopback, each committed (`synchronous = FULL`) to a file ledger before its
/// ACK, from one REQ client and from several at once. Run with `--nocapture` to
/// see the figures. Every ACK and every broadcast is still checked.
#[test]
fn throughput_of_durable_reports() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);
    let ip = |i: u32| std::net::Ipv4Addr::from(0x0A00_0000 + i).to_string();
    let n = 2000u32;
    let req = hub.req();
    let start = Instant::now();
    for i in 1..=n {
        expect_ack(
            report(&req, &event(u128::from(i), "sshd", Action::Ban, &ip(i))),
            AckStatus::Broadcast,
            Some(u64::from(i)),
        );
    }
    let one = start.elapsed();

    let clients = 8u32;
    let each = n / clients;
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let req = hub.req();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for k in 0..each {
                    let i = n + 1 + c * each + k;
                    let e = event(u128::from(i), "sshd", Action::Ban, &ip(i));
                    match report(&req, &e) {
                        Reply::Ack(a) if a.status == AckStatus::Broadcast => {
                            seqs.push(a.seq.unwrap())
                        }
                        other => panic!("{other:?}"),
                    }
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let many = start.elapsed();
    seqs.sort_unstable();
    let want: Vec<u64> = (u64::from(n) + 1..=u64::from(2 * n)).collect();
    assert_eq!(seqs, want);
    // Reports decided together are broadcast together (`events` messages).
    let mut broadcast = Vec::new();
    let mut messages = 0;
    while broadcast.len() < 2 * n as usize {
        let m = recv_broadcast(&sub);
        messages += usize::from(!m.events().is_empty());
        broadcast.extend(m.events().iter().map(|s| s.seq));
    }
    assert_eq!(broadcast, (1..=u64::from(2 * n)).collect::<Vec<_>>());
    let rate = |d: Duration| f64::from(n) / d.as_secs_f64();
    println!(
        "{n} durable reports from 1 client in {one:?}: {:.0} events/s; from {clients} \
         clients at once in {many:?}: {:.0} events/s; {messages} broadcast messages (ledger in {})",
        rate(one),
        rate(many),
        hub.state.path().display()
    );
}

/// A refused request: its name, frames and auth, the secret its sender holds,
/// the reason expected and whether the NAK is MACed.
type Case<'a> = (
    &'static str,
    Vec<Vec<u8>>,
    RequestAuth,
    &'a MonitorSecret,
    NakReason,
    bool,
);

/// Forged, replayed, stale and revoked reports over real sockets: each is NAKed
/// with its reason (MACed only when the sender proved it holds the secret) and
/// none is broadcast; honest reports go on being served, and the ledger records
/// which credential reported each event.
#[test]
fn forged_or_replayed_reports_are_refused_and_never_broadcast() {
    let hub = Hub::start_trusted("heartbeat_interval = \"50ms\"", "max_clock_skew = \"10s\"");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    let (s1, s2) = (secret_of("web1"), secret_of("web2"));
    let first = event(1, "sshd", Action::Ban, "203.0.113.1");
    let (replay, replay_auth) = signed_as(&first, "web1", &s1, now_ms());
    expect_ack(
        signed_request(&req, &replay, &replay_auth, &s1, true),
        AckStatus::Broadcast,
        Some(1),
    );

    let e = |id: u128| event(id, "sshd", Action::Ban, &format!("203.0.113.{id}"));
    let mut web2_event = e(5);
    web2_event.node = NodeName::new("web2").unwrap();
    let revoked = MonitorSecret::new("web3-secret-0123456789abcdef0123456789").unwrap();
    let cases: Vec<Case> = {
        let (wrong_mac, a1) = signed_as(&e(2), "web1", &s2, now_ms());
        let (other_node, a2) = signed_as(&web2_event, "web1", &s1, now_ms());
        let (stale, a3) = signed_as(&e(3), "web1", &s1, now_ms() - 11_000);
        let (ahead, a4) = signed_as(&e(4), "web1", &s1, now_ms() + 11_000);
        let (unknown, a5) = signed_as(&e(6), "web3", &revoked, now_ms());
        vec![
            (
                "wrong MAC",
                wrong_mac,
                a1,
                &s2,
                NakReason::Unauthenticated,
                false,
            ),
            (
                "another node's name",
                other_node,
                a2,
                &s1,
                NakReason::Unauthenticated,
                true,
            ),
            ("stale time", stale, a3, &s1, NakReason::Replayed, true),
            ("time ahead", ahead, a4, &s1, NakReason::Replayed, true),
            (
                "revoked credential",
                unknown,
                a5,
                &revoked,
                NakReason::Unauthenticated,
                false,
            ),
            (
                "replayed nonce",
                replay.clone(),
                replay_auth.clone(),
                &s1,
                NakReason::Replayed,
                true,
            ),
        ]
    };
    for (name, frames, a, secret, reason, maced) in cases {
        match signed_request(&req, &frames, &a, secret, maced) {
            Reply::Nak(n) => assert_eq!(n.reason, reason, "{name}: {n:?}"),
            other => panic!("{name}: accepted {other:?}"),
        }
    }
    // Without any credential.
    expect_nak(
        request_frames(&req, &[Request::Report(e(7)).encode()]),
        NakReason::Unauthenticated,
    );
    // An honest report of web2 is still served, and is the next broadcast.
    let honest = {
        let mut h = e(8);
        h.node = NodeName::new("web2").unwrap();
        h
    };
    expect_ack(report(&req, &honest), AckStatus::Broadcast, Some(2));
    assert_eq!(next_event(&sub), (1, first));
    assert_eq!(next_event(&sub), (2, honest));

    let conn = rusqlite::Connection::open(hub.state.path().join("ledger.sqlite3")).unwrap();
    let rows: Vec<(i64, Option<String>)> = conn
        .prepare("SELECT seq, reported_by FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        [(1, Some("web1".to_owned())), (2, Some("web2".to_owned()))]
    );
}

/// A broadcast (event and heartbeat) and a snapshot page verify with the
/// publisher's public key, and with no other key; a snapshot reply is bound to its
/// request.
#[test]
fn broadcasts_and_snapshot_pages_carry_valid_signatures() {
    let hub = Hub::start("50ms");
    let sub = new_socket(&hub.ctx, zmq::SUB).unwrap();
    sub.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    sub.set_subscribe(b"").unwrap();
    sub.connect(&hub.broadcast).unwrap();
    let other = SigningKey::from_seed([8; 32]).public();
    // A heartbeat, then an event.
    let frames = sub.recv_multipart(0).expect("a heartbeat");
    assert_eq!(frames[0], HEARTBEAT_TOPIC);
    assert!(auth::verify_broadcast(
        &[public_key()],
        &frames[0],
        &frames[1],
        &frames[2]
    ));
    assert!(!auth::verify_broadcast(
        &[other],
        &frames[0],
        &frames[1],
        &frames[2]
    ));
    let req = hub.req();
    let e = event(1, "sshd", Action::Ban, "203.0.113.1");
    expect_ack(report(&req, &e), AckStatus::Broadcast, Some(1));
    let frames = loop {
        let f = sub.recv_multipart(0).expect("the event");
        if f[0] != HEARTBEAT_TOPIC {
            break f;
        }
    };
    assert_eq!(frames.len(), 3);
    assert!(auth::verify_broadcast(
        &[other, public_key()],
        &frames[0],
        &frames[1],
        &frames[2]
    ));
    let mut tampered = frames[1].clone();
    tampered[10] ^= 1;
    assert!(!auth::verify_broadcast(
        &[public_key()],
        &frames[0],
        &tampered,
        &frames[2]
    ));

    let page = snapshot(&req, &[], None);
    assert_eq!(page.bans.len(), 1);
    // The signature covers the request: the same reply does not answer another.
    let r1 = Request::Snapshot(SnapshotRequest {
        jails: vec![],
        cursor: None,
        nonce: Some([1; 16]),
    })
    .encode();
    req.send(&r1, 0).unwrap();
    let reply = req.recv_multipart(0).unwrap();
    assert!(auth::verify_snapshot(
        &[public_key()],
        &r1,
        &reply[0],
        &reply[1]
    ));
    let r2 = Request::Snapshot(SnapshotRequest {
        jails: vec![],
        cursor: None,
        nonce: Some([2; 16]),
    })
    .encode();
    assert!(!auth::verify_snapshot(
        &[public_key()],
        &r2,
        &reply[0],
        &reply[1]
    ));
    // A request that does not decode gets the plain NAK of any request (the
    // signed snapshot NAKs, `busy`, are unit-tested in the core).
    let bad = br#"{"v":1,"type":"snapshot","jails":["a b"]}"#.to_vec();
    req.send(&bad, 0).unwrap();
    let reply = req.recv_multipart(0).unwrap();
    assert_eq!(
        reply.len(),
        1,
        "a request that does not decode is no snapshot: {reply:?}"
    );
}

/// A node that suddenly reports more than the floor is quarantined over real
/// sockets: its reports are NAKed `quarantined` and not broadcast; another node's
/// are.
#[test]
fn a_flooding_node_is_quarantined_and_others_are_served() {
    let hub = Hub::start_trusted("heartbeat_interval = \"50ms\"\nquarantine_floor = 5", "");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    for id in 1..=5u128 {
        let e = event(id, "sshd", Action::Ban, &format!("203.0.113.{id}"));
        expect_ack(report(&req, &e), AckStatus::Broadcast, Some(id as u64));
    }
    for id in 6..=8u128 {
        let e = event(id, "sshd", Action::Ban, &format!("203.0.113.{id}"));
        expect_nak(report(&req, &e), NakReason::Quarantined);
    }
    let mut other = event(9, "sshd", Action::Ban, "203.0.113.9");
    other.node = NodeName::new("web2").unwrap();
    expect_ack(report(&req, &other), AckStatus::Broadcast, Some(6));
    for seq in 1..=6 {
        assert_eq!(next_event(&sub).0, seq);
    }
}

/// A `reports` request of `events` signed as credential `key` with `secret` at
/// `ts_ms`, with a fresh nonce: the request's two frames, and the auth it carries.
fn reports_signed_as(
    events: &[Event],
    key: &str,
    secret: &MonitorSecret,
    ts_ms: u64,
) -> (Vec<Vec<u8>>, RequestAuth) {
    let payload = Request::Reports(events.to_vec()).encode();
    let nonce: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
    let a = RequestAuth::sign(secret, &NodeName::new(key).unwrap(), ts_ms, nonce, &payload);
    (vec![payload, a.encode()], a)
}

/// The event broadcasts received until they carried `n` events, skipping
/// heartbeats, each signature checked.
fn broadcasts_of(sub: &zmq::Socket, n: usize) -> Vec<Broadcast> {
    let mut got: Vec<Broadcast> = Vec::new();
    while got.iter().map(|b| b.events().len()).sum::<usize>() < n {
        match recv_broadcast(sub) {
            Broadcast::Heartbeat(_) => {}
            b => got.push(b),
        }
    }
    got
}

/// A signed `reports` of 32 events is answered with one `replies` of 32 ACKs,
/// MACed for the monitor's secret alone, and its events reach a subscriber in
/// sequence order, packed into `events` messages.
#[test]
fn a_signed_reports_request_gets_maced_replies_and_is_broadcast_packed() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    let s1 = secret_of("web1");
    let events: Vec<Event> = (1..=f2b_proto::MAX_REPORT_EVENTS as u128)
        .map(|n| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}")))
        .collect();
    let (frames, a) = reports_signed_as(&events, "web1", &s1, now_ms());
    assert!(frames[0].len() <= f2b_proto::MAX_MESSAGE_SIZE);
    req.send_multipart(&frames, 0).unwrap();
    let reply = req.recv_multipart(0).expect("no reply before the deadline");
    assert_eq!(reply.len(), 2, "a MACed reply has two frames");
    assert!(auth::verify_reply(&s1, &a.mac, &reply[0], &reply[1]));
    assert!(!auth::verify_reply(
        &secret_of("web2"),
        &a.mac,
        &reply[0],
        &reply[1]
    ));
    let (_, other) = reports_signed_as(&events, "web1", &s1, now_ms());
    assert!(!auth::verify_reply(&s1, &other.mac, &reply[0], &reply[1]));
    let Reply::Replies(answers) = Reply::decode(&reply[0]).unwrap() else {
        panic!("not replies: {:?}", String::from_utf8_lossy(&reply[0]));
    };
    assert_eq!(answers.len(), events.len());
    for (n, (answer, e)) in answers.iter().zip(&events).enumerate() {
        match answer {
            Reply::Ack(ack) => assert_eq!(
                (ack.id, ack.status, ack.seq),
                (e.id, AckStatus::Broadcast, Some(n as u64 + 1))
            ),
            other => panic!("event {n}: {other:?}"),
        }
    }

    let got = broadcasts_of(&sub, events.len());
    assert!(
        got.iter().all(|b| matches!(b, Broadcast::Events(_))),
        "not packed: {got:?}"
    );
    assert!(got.len() < events.len() / 4, "{} messages", got.len());
    let received: Vec<(u64, Event)> = got
        .iter()
        .flat_map(|b| b.events().iter().map(|s| (s.seq, s.event.clone())))
        .collect();
    let expected: Vec<(u64, Event)> = (1..).zip(events.iter().cloned()).collect();
    assert_eq!(received, expected);

    // Resent whole: every event a duplicate, nothing broadcast again; the next
    // event is the next broadcast.
    let (frames, a) = reports_signed_as(&events, "web1", &s1, now_ms());
    let Reply::Replies(answers) = signed_request(&req, &frames, &a, &s1, true) else {
        panic!("not replies");
    };
    assert!(answers
        .iter()
        .zip(1..)
        .all(|(r, seq)| matches!(r, Reply::Ack(a) if a.status == AckStatus::Duplicate && a.seq == Some(seq))));
    let last = event(100, "sshd", Action::Ban, "198.51.100.1");
    expect_ack(report(&req, &last), AckStatus::Broadcast, Some(33));
    assert_eq!(next_event(&sub), (33, last));
}

/// A `reports` request whose credential does not hold is refused whole, with
/// one NAK without an id (MACed only when the sender proved its secret), and
/// nothing of it is recorded or broadcast.
#[test]
fn a_reports_request_with_a_bad_credential_is_refused_whole() {
    let hub = Hub::start("50ms");
    let sub = hub.sub(&[b""]);
    let req = hub.req();
    let events: Vec<Event> = (1..=3)
        .map(|n| event(n, "sshd", Action::Ban, &format!("203.0.113.{n}")))
        .collect();
    let revoked = MonitorSecret::new("web3-secret-0123456789abcdef0123456789").unwrap();
    let s2 = secret_of("web2");
    let (unknown, a) = reports_signed_as(&events, "web3", &revoked, now_ms());
    let (other_node, b) = reports_signed_as(&events, "web2", &s2, now_ms());
    for (name, frames, a, secret, maced) in [
        ("unknown credential", unknown, a, &revoked, false),
        ("another node's credential", other_node, b, &s2, true),
    ] {
        match signed_request(&req, &frames, &a, secret, maced) {
            Reply::Nak(n) => assert_eq!(
                (n.reason, n.id),
                (NakReason::Unauthenticated, None),
                "{name}: {n:?}"
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
    // Without an auth frame.
    expect_nak(
        request_frames(&req, &[Request::Reports(events.clone()).encode()]),
        NakReason::Unauthenticated,
    );
    // None of them was recorded: the events are new when reported right.
    let (frames, a) = reports_signed_as(&events, "web1", &secret_of("web1"), now_ms());
    let Reply::Replies(answers) = signed_request(&req, &frames, &a, &secret_of("web1"), true)
    else {
        panic!("not replies");
    };
    let seqs: Vec<Option<u64>> = answers
        .iter()
        .map(|r| match r {
            Reply::Ack(a) if a.status == AckStatus::Broadcast => a.seq,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3)]);
    let got = broadcasts_of(&sub, 3);
    let seqs: Vec<u64> = got
        .iter()
        .flat_map(|b| b.events().iter().map(|s| s.seq))
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
}
