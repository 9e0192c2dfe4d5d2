//! The sender thread against real ZeroMQ sockets on 127.0.0.1 (ephemeral ports):
//! ACKs, a publisher that does not answer, NAKs, shutdown, the credential, and
//! bursts in `reports` requests with their `replies` and refusals: the
//! stand-in publishers check every report's auth frame with f2b_proto and sign
//! their replies (or, to test the monitor, do not).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use f2b_common::config::{LegacyPeer, Secret};
use f2b_common::sockets::last_endpoint;
use f2b_common::zmq;
use f2b_monitor::send::{run_sender, Credential, Room, SenderParams};
use f2b_monitor::MonitorError;
use f2b_proto::auth::{reply_mac, MonitorSecret, RequestAuth};
use f2b_proto::{
    Ack, AckStatus, Action, Event, EventId, JailName, Nak, NakReason, NodeName, Reply, Request,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Everything logged by this test binary (one global subscriber).
#[derive(Clone)]
struct Logs(Arc<Mutex<String>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs(Arc::new(Mutex::new(String::new())));
        let w = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        logs
    })
    .clone()
}

/// The logged lines that contain every one of `parts`.
fn logged(parts: &[&str]) -> Vec<String> {
    logs()
        .0
        .lock()
        .unwrap()
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .map(str::to_owned)
        .collect()
}

/// web1's secret, as in `[trust] secret` and the publisher's `[trust.monitors]`.
const SECRET: &str = "web1-test-secret-0123456789abcdefghijklmnop";

fn secret() -> MonitorSecret {
    MonitorSecret::new(SECRET).unwrap()
}

fn credential() -> Credential {
    Credential {
        key: NodeName::new("web1").unwrap(),
        secret: secret(),
    }
}

fn event(n: u128) -> Event {
    Event::new(
        EventId::from_u128(n),
        NodeName::new("web1").unwrap(),
        JailName::new("sshd").unwrap(),
        Action::Ban,
        match n {
            0..=255 => format!("192.0.2.{n}"),
            _ => format!("198.51.100.{}", n % 256),
        }
        .parse()
        .unwrap(),
        1_763_702_000_000,
    )
    .unwrap()
}

struct Harness {
    ctx: zmq::Context,
    endpoint: String,
    tx: Option<mpsc::Sender<Event>>,
    token: CancellationToken,
    sender: Option<JoinHandle<Result<(), MonitorError>>>,
    /// Makes the sender's shutdown socket readable without the runtime.
    stop: zmq::Socket,
}

impl Drop for Harness {
    /// A test that fails before [`Harness::finish`] starts the sender's
    /// shutdown (it gives up after its drain time), so that the runtime, which
    /// waits for its blocking threads, lets the failed test end. The token's
    /// forwarding task may never run once the test's runtime is going away, so
    /// this writes to the shutdown socket itself.
    fn drop(&mut self) {
        let _ = self.stop.send("", zmq::DONTWAIT);
    }
}

/// The sender's shutdown socket: readable when `token` is cancelled, as the
/// daemon's ([`shutdown_socket`]), or when the returned socket sends.
fn stop_sockets(ctx: &zmq::Context, token: CancellationToken) -> (zmq::Socket, zmq::Socket) {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("inproc://send-test-stop-{n}");
    let pull = ctx.socket(zmq::PULL).unwrap();
    pull.set_linger(0).unwrap();
    pull.bind(&name).unwrap();
    let push = |ctx: &zmq::Context| {
        let s = ctx.socket(zmq::PUSH).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&name).unwrap();
        s
    };
    let (by_token, by_drop) = (push(ctx), push(ctx));
    tokio::spawn(async move {
        token.cancelled().await;
        let _ = by_token.send("", zmq::DONTWAIT);
    });
    (pull, by_drop)
}

/// Starts the sender for `endpoint` with a short ACK timeout.
fn start(ctx: &zmq::Context, endpoint: &str, ack_timeout: Duration) -> Harness {
    start_with(ctx, endpoint, ack_timeout, None)
}

fn start_with(
    ctx: &zmq::Context,
    endpoint: &str,
    ack_timeout: Duration,
    legacy: Option<LegacyPeer>,
) -> Harness {
    start_full(
        ctx,
        endpoint,
        ack_timeout,
        legacy,
        f2b_monitor::send::BACKOFF_MAX,
        Some(credential()),
    )
}

/// Starts the signing sender for `endpoint` (5 s ACK timeout) with retries
/// backing off to at most `max_backoff`.
fn start_backing_off(ctx: &zmq::Context, endpoint: &str, max_backoff: Duration) -> Harness {
    start_full(
        ctx,
        endpoint,
        Duration::from_secs(5),
        None,
        max_backoff,
        Some(credential()),
    )
}

fn start_full(
    ctx: &zmq::Context,
    endpoint: &str,
    ack_timeout: Duration,
    legacy: Option<LegacyPeer>,
    max_backoff: Duration,
    credential: Option<Credential>,
) -> Harness {
    start_opts(
        ctx,
        endpoint,
        Opts {
            ack_timeout,
            legacy,
            max_backoff,
            credential,
            ..Opts::default()
        },
    )
}

/// How a test starts the sender.
struct Opts {
    ack_timeout: Duration,
    legacy: Option<LegacyPeer>,
    max_backoff: Duration,
    credential: Option<Credential>,
    /// Events in the queue before the sender starts: all there at once.
    queued: Vec<Event>,
    room: Option<Arc<Room>>,
}

impl Default for Opts {
    /// Signing, a 5 s ACK timeout, backoff up to 200 ms, nothing queued.
    fn default() -> Self {
        Opts {
            ack_timeout: Duration::from_secs(5),
            legacy: None,
            max_backoff: Duration::from_millis(200),
            credential: Some(credential()),
            queued: Vec::new(),
            room: None,
        }
    }
}

fn start_opts(ctx: &zmq::Context, endpoint: &str, o: Opts) -> Harness {
    let _ = logs();
    let token = CancellationToken::new();
    let (shutdown, stop) = stop_sockets(ctx, token.clone());
    let params = SenderParams {
        ctx: ctx.clone(),
        endpoint: endpoint.to_owned(),
        ack_timeout: o.ack_timeout,
        drain_time: o.ack_timeout,
        shutdown,
        legacy: o.legacy,
        credential: o.credential,
        backlog: Vec::new(),
        state: None,
        max_backoff: o.max_backoff,
        room: o.room,
        metrics: f2b_monitor::detached_metrics(),
        link: None,
    };
    let (tx, rx) = mpsc::channel(16 + o.queued.len());
    for e in o.queued {
        tx.try_send(e).unwrap();
    }
    let sender = tokio::task::spawn_blocking(move || run_sender(params, rx));
    Harness {
        ctx: ctx.clone(),
        endpoint: endpoint.to_owned(),
        tx: Some(tx),
        token,
        sender: Some(sender),
        stop,
    }
}

impl Harness {
    async fn send(&self, e: Event) {
        self.tx.as_ref().unwrap().send(e).await.unwrap();
    }

    /// The queue's sending end, for a stand-in publisher to queue events at a
    /// chosen moment (`blocking_send`).
    fn queue(&self) -> mpsc::Sender<Event> {
        self.tx.clone().unwrap()
    }

    /// Closes the queue and waits for the sender to finish.
    async fn finish(mut self) {
        self.tx = None;
        let sender = self.sender.take().expect("finished once");
        let r = tokio::time::timeout(WAIT, sender)
            .await
            .expect("sender ends when the queue closes");
        r.unwrap().unwrap();
        let _ = (&self.ctx, &self.endpoint, &self.token);
    }
}

fn bind(ctx: &zmq::Context, kind: zmq::SocketType) -> (zmq::Socket, String) {
    let s = ctx.socket(kind).unwrap();
    s.set_rcvtimeo(WAIT.as_millis() as i32).unwrap();
    s.set_linger(0).unwrap();
    s.bind("tcp://127.0.0.1:*").unwrap();
    let ep = last_endpoint(&s);
    (s, ep)
}

fn report_id(bytes: &[u8]) -> EventId {
    match Request::decode(bytes).expect("a valid request") {
        Request::Report(e) => e.id,
        other => panic!("unexpected {other:?}"),
    }
}

/// The event ids of a `report` (one) or a `reports` request (several), and
/// whether it was a `reports` request.
fn request_ids(bytes: &[u8]) -> (Vec<EventId>, bool) {
    match Request::decode(bytes).expect("a valid request") {
        Request::Report(e) => (vec![e.id], false),
        Request::Reports(events) => (events.iter().map(|e| e.id).collect(), true),
        other => panic!("unexpected {other:?}"),
    }
}

/// A report (or a `reports` request) as a stand-in publisher received it.
struct Got {
    /// A ROUTER's envelope (peer identity, empty delimiter); empty for a REP.
    envelope: Vec<Vec<u8>>,
    payload: Vec<u8>,
    auth: Option<RequestAuth>,
    /// The events' ids, in the request's order.
    ids: Vec<EventId>,
    /// A `reports` request (not a `report`).
    several: bool,
    at: Instant,
}

impl Got {
    /// The id of a plain `report`'s event; fails for a `reports` request.
    fn one(&self) -> EventId {
        assert!(!self.several, "a report, not reports: {:?}", self.ids);
        self.ids[0]
    }

    /// Whether the auth frame is web1's and its MAC right for the payload.
    fn authentic(&self) -> bool {
        self.auth
            .as_ref()
            .is_some_and(|a| a.key.as_str() == "web1" && a.verify(&secret(), &self.payload))
    }
}

/// Receives one report on a REP (`router` false) or ROUTER socket.
fn recv_report(sock: &zmq::Socket, router: bool) -> Got {
    let mut frames = sock
        .recv_multipart(0)
        .expect("a request within the deadline");
    let at = Instant::now();
    let envelope = if router {
        frames.drain(..2).collect()
    } else {
        Vec::new()
    };
    assert!(
        (1..=2).contains(&frames.len()),
        "payload and auth frame: {frames:?}"
    );
    let auth = frames
        .get(1)
        .map(|f| RequestAuth::decode(f).expect("a readable auth frame"));
    let payload = frames.swap_remove(0);
    let (ids, several) = request_ids(&payload);
    Got {
        envelope,
        payload,
        auth,
        ids,
        several,
        at,
    }
}

/// How a stand-in signs its reply.
#[derive(Clone, Copy, Debug)]
enum Mac {
    /// With web1's secret, bound to the request: authentic.
    Right,
    /// With another secret (an impostor, or a publisher with another key).
    Wrong,
    /// No MAC frame.
    Missing,
}

fn reply_to(sock: &zmq::Socket, got: &Got, reply: Vec<u8>, mac: Mac) {
    let request_mac = got.auth.as_ref().expect("an auth frame").mac;
    let mut frames = got.envelope.clone();
    let tag = match mac {
        Mac::Right => Some(reply_mac(&secret(), &request_mac, &reply)),
        Mac::Wrong => Some(reply_mac(
            &MonitorSecret::new(&"x".repeat(40)).unwrap(),
            &request_mac,
            &reply,
        )),
        Mac::Missing => None,
    };
    frames.push(reply);
    if let Some(tag) = tag {
        frames.push(tag.to_vec());
    }
    sock.send_multipart(frames, 0).unwrap();
}

fn ack(id: EventId, seq: u64) -> Vec<u8> {
    Reply::Ack(Ack {
        id,
        seq: Some(seq),
        status: AckStatus::Broadcast,
    })
    .encode()
}

fn nak(id: EventId, reason: NakReason) -> Vec<u8> {
    Reply::Nak(Nak::new(Some(id), reason, "test says no")).encode()
}

fn replies(items: Vec<Reply>) -> Vec<u8> {
    Reply::Replies(items).encode()
}

/// A REP server run in a blocking thread, checking every request's credential.
/// It decides the events of each request in order, as a publisher does:
/// `answer` gets the number of events decided before and the event's id and
/// returns its reply (an ACK or a NAK); after a transient NAK the request's
/// later events get the same NAK, undecided. The reply (a `replies` message for
/// a `reports` request) goes with its MAC. Returns the ids decided when it has
/// decided `n`.
fn serve(
    rep: zmq::Socket,
    n: usize,
    mut answer: impl FnMut(usize, EventId) -> Reply + Send + 'static,
) -> JoinHandle<Vec<EventId>> {
    tokio::task::spawn_blocking(move || {
        let mut decided = Vec::new();
        while decided.len() < n {
            let got = recv_report(&rep, false);
            assert!(got.authentic(), "request is signed with web1's secret");
            let mut items = Vec::new();
            let mut refused: Option<NakReason> = None;
            for &id in &got.ids {
                let reply = match refused {
                    Some(reason) => Reply::Nak(Nak::new(Some(id), reason, "undecided")),
                    None => {
                        let r = answer(decided.len(), id);
                        decided.push(id);
                        r
                    }
                };
                if let Reply::Nak(nak) = &reply {
                    refused = refused.or(Some(nak.reason).filter(|r| r.is_transient()));
                }
                items.push(reply);
            }
            let reply = match got.several {
                true => replies(items),
                false => items.swap_remove(0).encode(),
            };
            reply_to(&rep, &got, reply, Mac::Right);
        }
        decided
    })
}

fn ack_of(id: EventId, seq: u64) -> Reply {
    Reply::Ack(Ack {
        id,
        seq: Some(seq),
        status: AckStatus::Broadcast,
    })
}

fn nak_of(id: EventId, reason: NakReason) -> Reply {
    Reply::Nak(Nak::new(Some(id), reason, "test says no"))
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_in_order() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let server = serve(rep, 3, |i, id| ack_of(id, i as u64 + 1));
    let h = start(&ctx, &ep, Duration::from_secs(5));
    for n in 1..=3 {
        h.send(event(n)).await;
    }
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(seen, (1..=3).map(EventId::from_u128).collect::<Vec<_>>());
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_answer_means_resend_with_the_same_id() {
    let ctx = zmq::Context::new();
    // A ROUTER is a REP that may leave a request unanswered.
    let (router, ep) = bind(&ctx, zmq::ROUTER);
    let h = start(&ctx, &ep, Duration::from_millis(300));
    h.send(event(1)).await;
    let queue = h.queue();
    let server = tokio::task::spawn_blocking(move || {
        let first = recv_report(&router, true); // not answered
        let again = recv_report(&router, true);
        // The next event is queued only now: a report of its own.
        queue.blocking_send(event(2)).unwrap();
        reply_to(&router, &again, ack(again.one(), 1), Mac::Right);
        let next = recv_report(&router, true);
        reply_to(&router, &next, ack(next.one(), 2), Mac::Right);
        [first, again, next]
    });
    let got = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(
        got.iter().map(Got::one).collect::<Vec<_>>(),
        [1, 1, 2].map(EventId::from_u128),
        "resent, then the next one"
    );
    // The resend waited for the ACK timeout (300 ms) and the first backoff.
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(300), "{gap:?}");
    // The resend is the same payload (same event id), signed anew: a new nonce.
    assert!(got.iter().all(Got::authentic));
    assert_eq!(got[0].payload, got[1].payload);
    let (a0, a1) = (got[0].auth.as_ref().unwrap(), got[1].auth.as_ref().unwrap());
    assert_ne!(a0.nonce, a1.nonce, "a resend has a new nonce");
    assert_ne!(a0.mac, a1.mac);
    assert!(a1.ts_ms >= a0.ts_ms);
    h.finish().await;
    // Said once, with what to check, and when it is over.
    let told = logged(&["publisher unreachable", &ep, " WARN "]);
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].contains(&format!(
            "is f2b-publisher running at {ep}, is the port open, is [monitor] publisher right?"
        )),
        "{}",
        told[0]
    );
    assert_eq!(
        logged(&["the publisher answers again", &ep, "timeouts=1"]).len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn naks_drop_or_retry() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let server = serve(rep, 4, |i, id| match i {
        0 => nak_of(id, NakReason::InvalidIp), // permanent: dropped
        1 => nak_of(id, NakReason::Busy),      // transient: resent
        _ => ack_of(id, i as u64),
    });
    let h = start(&ctx, &ep, Duration::from_secs(5));
    for n in 1..=3 {
        h.send(event(n)).await;
    }
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(seen, [1, 2, 2, 3].map(EventId::from_u128));
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_publisher_then_it_starts() {
    let ctx = zmq::Context::new();
    // Reserve a port, then free it: nothing listens there for a while.
    let (probe, ep) = bind(&ctx, zmq::REP);
    drop(probe);
    let h = start(&ctx, &ep, Duration::from_millis(200));
    h.send(event(7)).await;
    // The publisher comes up later on the same endpoint.
    let rep = ctx.socket(zmq::REP).unwrap();
    rep.set_rcvtimeo(WAIT.as_millis() as i32).unwrap();
    let deadline = Instant::now() + WAIT;
    while let Err(e) = rep.bind(&ep) {
        assert!(Instant::now() < deadline, "cannot bind {ep} again: {e}");
        std::thread::yield_now();
    }
    let server = serve(rep, 1, |_, id| ack_of(id, 1));
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(seen, [EventId::from_u128(7)]);
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_gives_up_after_the_drain_time() {
    let ctx = zmq::Context::new();
    // A publisher that takes requests and never answers.
    let (_router, ep) = bind(&ctx, zmq::ROUTER);
    let drain = Duration::from_millis(500);
    let mut h = start(&ctx, &ep, drain);
    for n in 1..=3 {
        h.send(event(n)).await;
    }
    let t0 = Instant::now();
    h.token.cancel();
    h.tx = None;
    tokio::time::timeout(WAIT, h.sender.take().unwrap())
        .await
        .expect("sender stops after the drain time")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < drain * 4, "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_format_echo_and_nak() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let server = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for i in 0..3 {
            let frames = rep.recv_multipart(0).expect("a request");
            assert_eq!(frames.len(), 1, "no auth frame in the legacy format");
            let msg = String::from_utf8(frames[0].clone()).unwrap();
            let reply = match i {
                1 => "NAK".to_owned(),
                _ => msg
                    .strip_prefix("tok|")
                    .expect("the token first")
                    .to_owned(),
            };
            seen.push(msg);
            rep.send(reply.as_bytes(), 0).unwrap();
        }
        seen
    });
    let legacy = LegacyPeer {
        token: Some(Secret::new("tok")),
    };
    let h = start_with(&ctx, &ep, Duration::from_secs(5), Some(legacy));
    let mut v6 = event(9);
    v6.ip = "2001:db8::9".parse().unwrap();
    let mut unban = event(4);
    unban.action = Action::Unban;
    for e in [event(1), event(2), v6, unban] {
        h.send(e).await;
    }
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    // The IPv6 event cannot be carried and is not sent; the NAKed one is not resent.
    assert_eq!(
        seen,
        [
            "tok|web1|sshd|Ban|192.0.2.1",
            "tok|web1|sshd|Ban|192.0.2.2",
            "tok|web1|sshd|Unban|192.0.2.4",
        ]
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nak_detail_is_logged_quoted_and_escaped() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    // A publisher (or anything answering on its port) trying to forge a log line.
    let forged = "no\n2026-11-21T05:29:01Z  INFO f2b_monitor::send: reported ip=192.0.2.66";
    let server = serve(rep, 1, move |_, id| {
        Reply::Nak(Nak::new(Some(id), NakReason::InvalidIp, forged))
    });
    let h = start(&ctx, &ep, Duration::from_secs(5));
    h.send(event(61)).await;
    tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    h.finish().await;
    let id = EventId::from_u128(61).to_string();
    let line = logged(&["event rejected by the publisher", &id]);
    assert_eq!(line.len(), 1, "{line:?}");
    assert!(
        line[0].contains(r#"detail="no\n2026-11-21T05:29:01Z  INFO"#),
        "{}",
        line[0]
    );
    assert!(
        logged(&["reported ip=192.0.2.66"])
            .iter()
            .all(|l| l.contains("detail=")),
        "no forged line of its own"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_nak_from_an_old_publisher_is_retried_not_dropped() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let max_backoff = Duration::from_millis(300);
    // An old fail2ban-zmq-tools publisher answers a native request with a bare NAK;
    // then the operator replaces it (here: the same socket starts to ACK).
    let h = start_backing_off(&ctx, &ep, max_backoff);
    let queue = h.queue();
    let server = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for i in 0..5 {
            let got = recv_report(&rep, false);
            seen.push((got.one(), got.at));
            if i < 3 {
                // An old publisher has no MAC to give.
                rep.send(&b"NAK"[..], 0).unwrap();
            } else {
                if i == 3 {
                    // Queued now: a report of its own.
                    queue.blocking_send(event(63)).unwrap();
                }
                reply_to(&rep, &got, ack(got.one(), i), Mac::Right);
            }
        }
        seen
    });
    h.send(event(62)).await;
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    let ids: Vec<EventId> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids,
        [62, 62, 62, 62, 63].map(EventId::from_u128),
        "kept, resent, then the next one"
    );
    for pair in seen[..4].windows(2) {
        let gap = pair[1].1 - pair[0].1;
        assert!(
            gap >= max_backoff,
            "resent after the longest backoff: {gap:?}"
        );
    }
    let id = EventId::from_u128(62).to_string();
    let told = logged(&["it is an old publisher; set [monitor] legacy = true"]);
    assert_eq!(told.len(), 1, "logged once: {told:?}");
    assert!(told[0].contains(" ERROR "), "{}", told[0]);
    assert!(told[0].contains(&format!("id={id}")), "{}", told[0]);
    assert!(logged(&["event rejected", &id]).is_empty(), "not dropped");
    assert!(
        logged(&["publisher unreachable", &id]).is_empty(),
        "not taken for an unreachable publisher"
    );
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_without_a_right_mac_is_no_ack() {
    let ctx = zmq::Context::new();
    let (router, ep) = bind(&ctx, zmq::ROUTER);
    let h = start_backing_off(&ctx, &ep, Duration::from_millis(200));
    let queue = h.queue();
    // An impostor, or a publisher holding another secret for web1: ACKs with no
    // MAC, with a wrong one, a quarantine NAK with no MAC; then the real answer.
    let server = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for mac in [Mac::Missing, Mac::Wrong, Mac::Missing, Mac::Right] {
            let got = recv_report(&router, true);
            assert!(got.authentic());
            let reply = if seen.len() == 2 {
                nak(got.one(), NakReason::Quarantined)
            } else {
                ack(got.one(), 9)
            };
            if let Mac::Right = mac {
                // Queued now: a report of its own.
                queue.blocking_send(event(72)).unwrap();
            }
            reply_to(&router, &got, reply, mac);
            seen.push(got);
        }
        let next = recv_report(&router, true);
        reply_to(&router, &next, ack(next.one(), 10), Mac::Right);
        seen.push(next);
        seen
    });
    h.send(event(71)).await;
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(
        seen.iter().map(Got::one).collect::<Vec<_>>(),
        [71, 71, 71, 71, 72].map(EventId::from_u128),
        "resent until an authentic ACK, neither taken as ACKed nor dropped"
    );
    let nonces: std::collections::HashSet<_> = seen
        .iter()
        .map(|g| g.auth.as_ref().unwrap().nonce)
        .collect();
    assert_eq!(nonces.len(), seen.len(), "every send has its own nonce");
    h.finish().await;
    let id = EventId::from_u128(71).to_string();
    let warned = logged(&["reply failed authentication", &id, " WARN "]);
    assert_eq!(
        warned.len(),
        1,
        "one warning, not one per resend: {warned:?}"
    );
    assert!(warned[0].contains("[trust.monitors] web1"), "{}", warned[0]);
    assert!(warned[0].contains("error=no reply MAC"), "{}", warned[0]);
    assert!(!warned[0].contains(SECRET), "{}", warned[0]);
    assert_eq!(
        logged(&["reported", &format!("id={id}")]).len(),
        1,
        "reported once, after the authentic ACK"
    );
    assert!(logged(&["event rejected", &id]).is_empty(), "not dropped");
    assert!(
        logged(&["replies authenticate again", &ep]).len() == 1,
        "the end of the problem is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unauthenticated_and_replayed_are_retried_quarantined_dropped() {
    let ctx = zmq::Context::new();
    let (router, ep) = bind(&ctx, zmq::ROUTER);
    // A publisher that does not know web1's key (NAKs with no MAC), then one
    // that finds web1's clock off (replayed), then accepts; the next event is
    // quarantined (an authentic NAK), the one after accepted.
    let answers = [
        (NakReason::Unauthenticated, Mac::Missing),
        (NakReason::Unauthenticated, Mac::Missing),
        (NakReason::Unauthenticated, Mac::Right),
        (NakReason::Replayed, Mac::Missing),
        (NakReason::Replayed, Mac::Right),
    ];
    let h = start_backing_off(&ctx, &ep, Duration::from_millis(200));
    let queue = h.queue();
    let server = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for (reason, mac) in answers {
            let got = recv_report(&router, true);
            reply_to(&router, &got, nak(got.one(), reason), mac);
            seen.push(got);
        }
        for (reply, next) in [
            (ack as fn(EventId, u64) -> Vec<u8>, Some(82)),
            (|id, _| nak(id, NakReason::Quarantined), Some(83)),
            (ack, None),
        ] {
            let got = recv_report(&router, true);
            // The next event is queued only now: a report of its own.
            if let Some(n) = next {
                queue.blocking_send(event(n)).unwrap();
            }
            reply_to(&router, &got, reply(got.one(), 1), Mac::Right);
            seen.push(got);
        }
        seen
    });
    h.send(event(81)).await;
    let seen = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(
        seen.iter().map(Got::one).collect::<Vec<_>>(),
        [81, 81, 81, 81, 81, 81, 82, 83].map(EventId::from_u128),
        "kept and retried through unauthenticated and replayed; the quarantined one dropped"
    );
    assert!(seen.iter().all(Got::authentic));
    // Each retry waited for a backoff.
    for pair in seen[..6].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= f2b_monitor::send::BACKOFF_MIN, "{gap:?}");
    }
    h.finish().await;

    let refused = logged(&["refused this node's credential", &ep, " ERROR "]);
    assert_eq!(refused.len(), 1, "said once, not per retry: {refused:?}");
    assert!(refused[0].contains(" ERROR "), "{}", refused[0]);
    assert!(
        refused[0].contains("check that [trust] secret/secret_file on web1 matches [trust.monitors] web1 on the publisher"),
        "{}",
        refused[0]
    );
    let clock = logged(&["refused a report as replayed", &ep, " ERROR "]);
    assert_eq!(clock.len(), 1, "{clock:?}");
    assert!(
        clock[0].contains(" ERROR ") && clock[0].contains("ntp"),
        "{}",
        clock[0]
    );
    assert_eq!(
        logged(&["accepts this node's credential again", &ep]).len(),
        1
    );
    assert_eq!(
        logged(&["accepts this node's timestamps again", &ep]).len(),
        1
    );
    let q = logged(&["quarantined node web1", &ep, " ERROR "]);
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].contains(" ERROR "), "{}", q[0]);
    assert!(
        q[0].contains(&EventId::from_u128(82).to_string()),
        "{}",
        q[0]
    );
    assert_eq!(
        logged(&["quarantine over", &ep, "dropped=1"]).len(),
        1,
        "the end of the quarantine is logged with what was dropped"
    );
    assert!(
        !logs().0.lock().unwrap().contains(SECRET),
        "the secret is never logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_credential_reports_are_one_frame() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    // A publisher that requires credentials, then one that does not.
    let server = tokio::task::spawn_blocking(move || {
        let frames = rep.recv_multipart(0).expect("a request");
        rep.send(nak(report_id(&frames[0]), NakReason::Unauthenticated), 0)
            .unwrap();
        let frames = rep.recv_multipart(0).expect("the request again");
        rep.send(ack(report_id(&frames[0]), 1), 0).unwrap();
        frames.len()
    });
    let h = start_full(
        &ctx,
        &ep,
        Duration::from_secs(5),
        None,
        f2b_monitor::send::BACKOFF_MAX,
        None,
    );
    h.send(event(91)).await;
    let frames = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(frames, 1, "the payload alone");
    h.finish().await;
    let id = EventId::from_u128(91).to_string();
    assert_eq!(logged(&["reported", &format!("id={id}")]).len(), 1);
    let told = logged(&[
        "requires a credential and this node sends none",
        &ep,
        " ERROR ",
    ]);
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].contains("set [trust] secret or secret_file on web1"),
        "{}",
        told[0]
    );
}

/// Acks of every event of `got`: a `replies` message for a `reports` request,
/// an `ack` for a report.
fn ack_all(got: &Got) -> Vec<u8> {
    let items: Vec<Reply> = got.ids.iter().map(|&id| ack_of(id, 1)).collect();
    match got.several {
        true => replies(items),
        false => items[0].encode(),
    }
}

fn ids(range: std::ops::RangeInclusive<u128>) -> Vec<EventId> {
    range.map(EventId::from_u128).collect()
}

/// Lines of "reported" for the event `n`.
fn reported(n: u128) -> usize {
    let id = EventId::from_u128(n).to_string();
    logged(&[" reported ", &format!("id={id}")]).len()
}

/// A stand-in ROUTER publisher and a sender started with the events numbered
/// `numbers` already queued (all there at once), with `o`'s other options.
/// Returns the endpoint too, which some log lines name.
fn queued(numbers: std::ops::RangeInclusive<u128>, o: Opts) -> (Harness, zmq::Socket, String) {
    let ctx = zmq::Context::new();
    let (router, ep) = bind(&ctx, zmq::ROUTER);
    let queued = numbers.map(event).collect();
    let h = start_opts(&ctx, &ep, Opts { queued, ..o });
    (h, router, ep)
}

/// Runs the stand-in publisher `serve` on a blocking thread, with the queue's
/// sending end (to queue events at a chosen moment, `blocking_send`); the
/// returned future gives what `serve` returns, within [`WAIT`].
fn stand_in<T: Send + 'static>(
    h: &Harness,
    router: zmq::Socket,
    serve: impl FnOnce(&zmq::Socket, &mpsc::Sender<Event>) -> T + Send + 'static,
) -> impl std::future::Future<Output = T> {
    let queue = h.queue();
    let task = tokio::task::spawn_blocking(move || serve(&router, &queue));
    async move {
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the stand-in publisher finishes within the deadline")
            .expect("the stand-in publisher's checks hold")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_goes_in_reports_requests_of_up_to_32_and_a_lone_event_alone() {
    // 70 events read (their places taken) and queued before the sender starts:
    // all there at once.
    let room = Arc::new(Room::new(100, 70));
    let o = Opts {
        room: Some(room.clone()),
        ..Opts::default()
    };
    let (h, router, _) = queued(1001..=1070, o);
    let server = stand_in(&h, router, move |router, _| {
        let mut seen = Vec::new();
        while seen.iter().map(|g: &Got| g.ids.len()).sum::<usize>() < 70 {
            let got = recv_report(router, true);
            assert!(got.authentic(), "signed as a report is");
            reply_to(router, &got, ack_all(&got), Mac::Right);
            seen.push(got);
        }
        let lone = recv_report(router, true);
        reply_to(router, &lone, ack_all(&lone), Mac::Right);
        (seen, lone)
    });
    // Sent once the burst is answered (every place given back): alone.
    tokio::time::timeout(WAIT, room.wait_free(100))
        .await
        .unwrap_or_else(|_| panic!("{} places", room.available()));
    assert!(room.try_take(1));
    h.send(event(1071)).await;
    let (seen, lone) = server.await;
    assert_eq!(
        seen.iter()
            .map(|g| (g.several, g.ids.len()))
            .collect::<Vec<_>>(),
        [(true, 32), (true, 32), (true, 6)],
        "reports requests of up to 32"
    );
    let all: Vec<EventId> = seen.iter().flat_map(|g| g.ids.clone()).collect();
    assert_eq!(all, ids(1001..=1070), "in order, each once");
    assert_eq!(
        lone.one(),
        EventId::from_u128(1071),
        "a lone event is a report"
    );
    h.finish().await;
    // Per event: a place given back, a "reported" line.
    assert_eq!(room.available(), 100);
    assert!((1001..=1071).all(|n| reported(n) == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_nak_in_replies_resends_that_event_and_the_later_ones() {
    let (h, router, _) = queued(1101..=1105, Opts::default());
    let server = stand_in(&h, router, move |router, _| {
        let first = recv_report(router, true);
        // The third is rate limited; so are the later ones, undecided.
        let items = first
            .ids
            .iter()
            .enumerate()
            .map(|(k, &id)| match k {
                0 | 1 => ack_of(id, k as u64 + 1),
                _ => nak_of(id, NakReason::RateLimited),
            })
            .collect();
        reply_to(router, &first, replies(items), Mac::Right);
        let again = recv_report(router, true);
        reply_to(router, &again, ack_all(&again), Mac::Right);
        (first, again)
    });
    let (first, again) = server.await;
    assert_eq!(first.ids, ids(1101..=1105));
    assert!(again.several);
    assert_eq!(again.ids, ids(1103..=1105), "the refused ones, in order");
    let gap = again.at - first.at;
    assert!(
        gap >= f2b_monitor::send::BACKOFF_MIN,
        "after the backoff: {gap:?}"
    );
    h.finish().await;
    assert!((1101..=1105).all(|n| reported(n) == 1));
    let id = EventId::from_u128(1103).to_string();
    assert_eq!(
        logged(&["publisher asked to retry later", &id]).len(),
        1,
        "one line for the request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_nak_in_replies_drops_only_that_event() {
    let (h, router, _) = queued(1201..=1203, Opts::default());
    let server = stand_in(&h, router, move |router, queue| {
        let first = recv_report(router, true);
        let items = vec![
            ack_of(first.ids[0], 1),
            nak_of(first.ids[1], NakReason::Forbidden),
            ack_of(first.ids[2], 2),
        ];
        queue.blocking_send(event(1204)).unwrap();
        reply_to(router, &first, replies(items), Mac::Right);
        let next = recv_report(router, true);
        reply_to(router, &next, ack_all(&next), Mac::Right);
        (first, next)
    });
    let (first, next) = server.await;
    assert_eq!(first.ids, ids(1201..=1203));
    assert_eq!(
        next.one(),
        EventId::from_u128(1204),
        "nothing of the request resent"
    );
    h.finish().await;
    let dropped = EventId::from_u128(1202).to_string();
    assert_eq!(
        logged(&[
            "event rejected by the publisher, dropped",
            &dropped,
            " ERROR "
        ])
        .len(),
        1
    );
    assert_eq!(
        [1201, 1202, 1203, 1204].map(reported),
        [1, 0, 1, 1],
        "the others are ACKed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_type_makes_every_later_request_a_single_report() {
    let (h, router, ep) = queued(1301..=1303, Opts::default());
    let server = stand_in(&h, router, move |router, queue| {
        let first = recv_report(router, true);
        // An older publisher: it cannot decode the request, so its NAK has no
        // MAC (and no id).
        let old = Reply::Nak(Nak::new(
            None,
            NakReason::UnknownType,
            "unknown type \"reports\"",
        ));
        reply_to(router, &first, old.encode(), Mac::Missing);
        let mut singles = Vec::new();
        for k in 0..5 {
            let got = recv_report(router, true);
            if k == 2 {
                // A burst, all queued before the answer: still one at a time.
                queue.blocking_send(event(1304)).unwrap();
                queue.blocking_send(event(1305)).unwrap();
            }
            reply_to(router, &got, ack_all(&got), Mac::Right);
            singles.push(got);
        }
        (first, singles)
    });
    let (first, singles) = server.await;
    assert!(first.several);
    assert_eq!(first.ids, ids(1301..=1303));
    assert_eq!(
        singles.iter().map(Got::one).collect::<Vec<_>>(),
        ids(1301..=1305),
        "one report each, in order"
    );
    h.finish().await;
    assert!((1301..=1305).all(|n| reported(n) == 1));
    let told = logged(&["the publisher does not know `reports` requests", &ep]);
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].contains(" WARN "), "{}", told[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reports_request_refused_whole_is_resent_one_event_at_a_time() {
    let (h, router, _) = queued(1401..=1403, Opts::default());
    let server = stand_in(&h, router, move |router, queue| {
        let first = recv_report(router, true);
        let whole = Reply::Nak(Nak::new(None, NakReason::Malformed, "test says malformed"));
        reply_to(router, &first, whole.encode(), Mac::Right);
        let mut singles = Vec::new();
        for k in 0..3 {
            let got = recv_report(router, true);
            if k == 2 {
                queue.blocking_send(event(1404)).unwrap();
                queue.blocking_send(event(1405)).unwrap();
            }
            reply_to(router, &got, ack_all(&got), Mac::Right);
            singles.push(got);
        }
        // This time only: the next burst is packed again.
        let next = recv_report(router, true);
        reply_to(router, &next, ack_all(&next), Mac::Right);
        (first, singles, next)
    });
    let (first, singles, next) = server.await;
    assert_eq!(first.ids, ids(1401..=1403));
    assert_eq!(
        singles.iter().map(Got::one).collect::<Vec<_>>(),
        ids(1401..=1403),
        "one report each, in order"
    );
    assert!(next.several);
    assert_eq!(next.ids, ids(1404..=1405));
    h.finish().await;
    assert!((1401..=1405).all(|n| reported(n) == 1), "none dropped");
    let told = logged(&["refused a reports request as a whole", "reason=malformed"]);
    assert_eq!(told.len(), 1, "{told:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_that_do_not_match_the_events_are_unreadable() {
    let (h, router, _) = queued(1501..=1503, Opts::default());
    let server = stand_in(&h, router, move |router, _| {
        let mut seen = Vec::new();
        // Two answers for three events; then three, in another order; then
        // the right ones.
        for round in 0..3 {
            let got = recv_report(router, true);
            let mut items: Vec<Reply> = got.ids.iter().map(|&id| ack_of(id, 1)).collect();
            match round {
                0 => {
                    items.pop();
                }
                1 => items.swap(0, 1),
                _ => {}
            }
            reply_to(router, &got, replies(items), Mac::Right);
            seen.push(got);
        }
        seen
    });
    let seen = server.await;
    for got in &seen {
        assert!(got.several);
        assert_eq!(got.ids, ids(1501..=1503), "resent whole");
    }
    h.finish().await;
    assert!(
        (1501..=1503).all(|n| reported(n) == 1),
        "nothing taken from a wrong replies"
    );
    let first = EventId::from_u128(1501).to_string();
    let warned = logged(&["no usable reply from the publisher", &first]);
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(
        warned[0].contains("2 answers to a reports request of 3 events"),
        "{}",
        warned[0]
    );
    assert!(
        warned[1].contains("an answer for another event"),
        "{}",
        warned[1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_without_a_right_mac_are_not_taken() {
    let (h, router, _) = queued(1601..=1603, Opts::default());
    let server = stand_in(&h, router, move |router, _| {
        let mut seen = Vec::new();
        for mac in [Mac::Missing, Mac::Wrong, Mac::Right] {
            let got = recv_report(router, true);
            assert!(got.authentic());
            reply_to(router, &got, ack_all(&got), mac);
            seen.push(got);
        }
        seen
    });
    let seen = server.await;
    for got in &seen {
        assert!(got.several);
        assert_eq!(
            got.ids,
            ids(1601..=1603),
            "resent until an authentic answer"
        );
    }
    let nonces: std::collections::HashSet<_> = seen
        .iter()
        .map(|g| g.auth.as_ref().unwrap().nonce)
        .collect();
    assert_eq!(nonces.len(), 3, "signed anew for every send");
    h.finish().await;
    assert!(
        (1601..=1603).all(|n| reported(n) == 1),
        "ACKed once, by the authentic replies"
    );
    let first = EventId::from_u128(1601).to_string();
    assert_eq!(
        logged(&["reply failed authentication", &first, " WARN "]).len(),
        1
    );
}
