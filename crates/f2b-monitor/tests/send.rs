//! The sender thread against real ZeroMQ sockets on 127.0.0.1 (ephemeral ports):
//! ACKs, a publisher that does not answer, NAKs, shutdown.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use f2b_common::config::{LegacyPeer, Secret};
use f2b_common::sockets::{last_endpoint, shutdown_socket};
use f2b_common::zmq;
use f2b_monitor::send::{run_sender, SenderParams};
use f2b_monitor::MonitorError;
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

fn event(n: u128) -> Event {
    Event::new(
        EventId::from_u128(n),
        NodeName::new("web1").unwrap(),
        JailName::new("sshd").unwrap(),
        Action::Ban,
        format!("192.0.2.{n}").parse().unwrap(),
        1_763_702_000_000,
    )
    .unwrap()
}

struct Harness {
    ctx: zmq::Context,
    endpoint: String,
    tx: Option<mpsc::Sender<Event>>,
    token: CancellationToken,
    sender: JoinHandle<Result<(), MonitorError>>,
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
    )
}

fn start_full(
    ctx: &zmq::Context,
    endpoint: &str,
    ack_timeout: Duration,
    legacy: Option<LegacyPeer>,
    max_backoff: Duration,
) -> Harness {
    let _ = logs();
    let token = CancellationToken::new();
    let params = SenderParams {
        ctx: ctx.clone(),
        endpoint: endpoint.to_owned(),
        ack_timeout,
        drain_time: ack_timeout,
        shutdown: shutdown_socket(ctx, token.clone()).unwrap(),
        legacy,
        backlog: Vec::new(),
        state: None,
        max_backoff,
        room: None,
    };
    let (tx, rx) = mpsc::channel(16);
    let sender = tokio::task::spawn_blocking(move || run_sender(params, rx));
    Harness {
        ctx: ctx.clone(),
        endpoint: endpoint.to_owned(),
        tx: Some(tx),
        token,
        sender,
    }
}

impl Harness {
    async fn send(&self, e: Event) {
        self.tx.as_ref().unwrap().send(e).await.unwrap();
    }

    /// Closes the queue and waits for the sender to finish.
    async fn finish(mut self) {
        self.tx = None;
        let r = tokio::time::timeout(WAIT, self.sender)
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

/// A REP server run in a blocking thread: `answer` gets each request's event id
/// and returns the reply; the ids seen are returned when it has served `n`.
fn serve(
    rep: zmq::Socket,
    n: usize,
    mut answer: impl FnMut(usize, EventId) -> Vec<u8> + Send + 'static,
) -> JoinHandle<Vec<EventId>> {
    tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for i in 0..n {
            let msg = rep.recv_bytes(0).expect("a request within the deadline");
            let id = report_id(&msg);
            seen.push(id);
            rep.send(answer(i, id), 0).unwrap();
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_in_order() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let server = serve(rep, 3, |i, id| ack(id, i as u64 + 1));
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
    h.send(event(2)).await;
    let server = tokio::task::spawn_blocking(move || {
        let recv = || {
            let parts = router.recv_multipart(0).expect("a request in time");
            assert_eq!(parts.len(), 3, "identity, delimiter, body");
            (parts[0].clone(), report_id(&parts[2]), Instant::now())
        };
        let (_, first, t0) = recv(); // not answered
        let (peer, again, t1) = recv();
        router
            .send_multipart([peer, Vec::new(), ack(again, 1)], 0)
            .unwrap();
        let (peer, next, _) = recv();
        router
            .send_multipart([peer, Vec::new(), ack(next, 2)], 0)
            .unwrap();
        (vec![first, again, next], t1 - t0)
    });
    let (seen, gap) = tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    assert_eq!(
        seen,
        [1, 1, 2].map(EventId::from_u128),
        "resent, then the next one"
    );
    // The resend waited for the ACK timeout (300 ms) and the first backoff.
    assert!(gap >= Duration::from_millis(300), "{gap:?}");
    h.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn naks_drop_or_retry() {
    let ctx = zmq::Context::new();
    let (rep, ep) = bind(&ctx, zmq::REP);
    let server = serve(rep, 4, |i, id| match i {
        0 => nak(id, NakReason::InvalidIp), // permanent: dropped
        1 => nak(id, NakReason::Busy),      // transient: resent
        _ => ack(id, i as u64),
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
    let server = serve(rep, 1, |_, id| ack(id, 1));
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
    let h = start(&ctx, &ep, drain);
    for n in 1..=3 {
        h.send(event(n)).await;
    }
    let t0 = Instant::now();
    h.token.cancel();
    let Harness { tx, sender, .. } = h;
    drop(tx);
    tokio::time::timeout(WAIT, sender)
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
            let msg = String::from_utf8(rep.recv_bytes(0).expect("a request")).unwrap();
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
        Reply::Nak(Nak::new(Some(id), NakReason::InvalidIp, forged)).encode()
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
    let server = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for i in 0..5 {
            let msg = rep.recv_bytes(0).expect("a request within the deadline");
            let id = report_id(&msg);
            seen.push((id, Instant::now()));
            let reply = if i < 3 { b"NAK".to_vec() } else { ack(id, i) };
            rep.send(reply, 0).unwrap();
        }
        seen
    });
    let h = start_full(&ctx, &ep, Duration::from_secs(5), None, max_backoff);
    h.send(event(62)).await;
    h.send(event(63)).await;
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
