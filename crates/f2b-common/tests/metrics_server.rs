//! The metrics server over real TCP on loopback: served on port 0, scraped with a
//! raw HTTP/1.1 client, values seen to move, bad requests answered without harm,
//! the connection limit, and shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use f2b_common::metrics::{
    self, Metrics, MonitorMetrics, PublisherMetrics, Readiness, SubscriberMetrics, MAX_CONNECTIONS,
};
use f2b_common::CancellationToken;
use f2b_proto::NakReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single exchange may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `request` as is and reads the whole answer (the server closes after one).
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    tokio::time::timeout(DEADLINE, async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read");
        let answer = String::from_utf8(answer).expect("utf-8 answer");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {answer:?}"));
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    })
    .await
    .expect("the server answered within the deadline")
}

/// Serves `registry` on an ephemeral loopback port until the returned token is
/// cancelled.
async fn serve(registry: Metrics, readiness: Readiness) -> (metrics::Server, CancellationToken) {
    let token = CancellationToken::new();
    let server = metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        registry,
        readiness,
        token.clone(),
    )
    .await
    .unwrap();
    (server, token)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    exchange(addr, request.as_bytes()).await
}

/// One `/healthz` request on a new connection: the raw answer, empty when the
/// server closed the connection without one.
async fn healthz(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    answer
}

/// The value of the sample `name` (with its labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn publisher_metrics_move_and_readiness_follows() {
    let readiness = Readiness::new();
    let mut registry = Metrics::new("f2b-publisher");
    let m = PublisherMetrics::new(&mut registry, &readiness);
    let (server, token) = serve(registry, readiness.clone()).await;
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0, "the real port is reported");

    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sample(&body, "f2b_publisher_events_accepted_total"),
        Some(0.0),
        "{body}"
    );
    assert!(body.ends_with("# EOF\n"), "{body}");

    m.events_accepted.inc();
    m.events_accepted.inc();
    m.events_rejected.inc_nak(NakReason::Unauthenticated);
    m.ledger_active_bans.set(42);
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(
        sample(&body, "f2b_publisher_events_accepted_total"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "f2b_publisher_events_rejected_total{reason=\"unauthenticated\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "f2b_publisher_ledger_active_bans"),
        Some(42.0)
    );

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready: the reply and broadcast sockets are not bound\n"
    );
    m.bound.set(true);
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: the ledger is not open\n")
    );
    m.ledger_open.set(true);
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".to_owned()));

    token.cancel();
    tokio::time::timeout(DEADLINE, server.join())
        .await
        .expect("the server stops when the token is cancelled");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens after shutdown"
    );
}

#[tokio::test]
async fn monitor_and_subscriber_sets_serve() {
    let readiness = Readiness::new();
    let mut registry = Metrics::new("f2b-monitor");
    let m = MonitorMetrics::new(&mut registry, &readiness);
    let (server, token) = serve(registry, readiness).await;
    m.lines_read.inc_by(3);
    m.round_trip.observe(0.002);
    m.publisher_answering.set(true);
    let (_, body) = get(server.local_addr(), "/metrics").await;
    assert_eq!(sample(&body, "f2b_monitor_lines_read_total"), Some(3.0));
    assert_eq!(
        sample(&body, "f2b_monitor_publisher_round_trip_seconds_count"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(get(server.local_addr(), "/readyz").await.0, 200);
    token.cancel();

    let readiness = Readiness::new();
    let mut registry = Metrics::new("f2b-subscriber");
    let s = SubscriberMetrics::new(&mut registry, &readiness, Duration::from_secs(60));
    let (server, token) = serve(registry, readiness).await;
    let (status, body) = get(server.local_addr(), "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("no verified message from the publisher yet"),
        "{body}"
    );
    s.last_heartbeat.touch();
    s.events_skipped.inc("own_node");
    s.sequence_lag.set(5);
    assert_eq!(get(server.local_addr(), "/readyz").await.0, 200);
    let (_, body) = get(server.local_addr(), "/metrics").await;
    let age = sample(&body, "f2b_subscriber_last_heartbeat_age_seconds").expect("age");
    assert!((0.0..60.0).contains(&age), "{body}");
    assert_eq!(
        sample(
            &body,
            "f2b_subscriber_events_skipped_total{reason=\"own_node\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&body, "f2b_subscriber_sequence_lag"), Some(5.0));
    token.cancel();
}

#[tokio::test]
async fn bad_requests_are_answered_and_harmless() {
    let (server, token) = serve(Metrics::new("f2b-monitor"), Readiness::new()).await;
    let addr = server.local_addr();

    // The content type Prometheus negotiates on, and HEAD without a body.
    let raw = tokio::time::timeout(DEADLINE, async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    })
    .await
    .expect("answered, and closed after one request");
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{raw}"
    );
    let (status, body) = exchange(addr, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(get(addr, "/nope").await.0, 404);
    assert_eq!(get(addr, "/metrics?x=1").await.0, 200);
    let (status, _) = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(exchange(addr, b"\x00\x01 garbage\r\n\r\n").await.0, 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, _) = exchange(addr, huge.as_bytes()).await;
    assert!(
        status == 431 || status == 400,
        "oversized headers: {status}"
    );
    let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    assert!(exchange(addr, request.as_bytes()).await.0 >= 400);

    // The limit: MAX_CONNECTIONS idle connections hold every slot; one more is
    // closed at once, and once they go, requests are served again.
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        idle.push(s);
    }
    // Each idle connection was accepted and holds a slot once the server has read
    // its first bytes; a request on top is refused until they go.
    let refused = tokio::time::timeout(DEADLINE, async {
        loop {
            if healthz(addr).await.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(refused.is_ok(), "a connection beyond the limit is closed");
    drop(idle);
    let served = tokio::time::timeout(DEADLINE, async {
        loop {
            if healthz(addr).await.starts_with(b"HTTP/1.1 200") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        served.is_ok(),
        "served again once the idle connections closed"
    );
    token.cancel();
}

/// A writer into a shared buffer, for the log.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn logs_the_bound_address_and_serves_nothing_when_off() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let token = CancellationToken::new();
    let server = metrics::serve_if(
        Some("127.0.0.1:0".parse().unwrap()),
        Metrics::new("f2b-subscriber"),
        Readiness::new(),
        token.clone(),
    )
    .await
    .unwrap()
    .expect("a server when metrics_bind is set");
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let expected = format!("metrics listening on {}", server.local_addr());
    assert!(
        text.contains(&expected),
        "{expected:?} not in the log: {text}"
    );
    token.cancel();
    server.join().await;

    let off = metrics::serve_if(
        None,
        Metrics::new("f2b-subscriber"),
        Readiness::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(off.is_none());
}

#[tokio::test]
async fn a_taken_address_is_an_error_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = metrics::serve(
        addr,
        Metrics::new("f2b-monitor"),
        Readiness::new(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("metrics_bind") && err.contains(&addr.to_string()),
        "{err}"
    );
}
