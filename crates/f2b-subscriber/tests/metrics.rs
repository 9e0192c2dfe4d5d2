//! `[subscriber] metrics_bind`: the subscriber's metrics move with what it does,
//! and /readyz follows the verified messages.

mod common;

use std::time::Duration;

use common::{
    ban, config, http_get, metrics_addr, other_key, sample, Logs, Running, TestPublisher,
};
use f2b_proto::{Action, Broadcast};
use f2b_subscriber::{Notice, Refusal};

const HB: Duration = Duration::from_millis(100);

#[tokio::test]
async fn metrics_count_what_the_subscriber_did() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "action = \"none\"\nmetrics_bind = \"127.0.0.1:0\"\nheartbeat_timeout = \"3s\"",
    );
    let logs = Logs::capture();
    let mut sub =
        Running::start_with(f2b_subscriber::Subscriber::new(&cfg).with_local_addresses(vec![]));
    sub.connected().await;
    let addr = metrics_addr(&logs);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.1");
    sub.applied("203.0.113.1").await;
    publ.event("web1", "sshd", Action::Ban, "203.0.113.2");
    sub.wait_for("skipped", |n| matches!(n, Notice::Skipped { .. }))
        .await;
    let forged = ban(3, publ.epoch, "203.0.113.3");
    publ.send_with(Broadcast::Event(forged), Some(other_key()));
    sub.refused(Refusal::BadSignature).await;
    let text = http_get(&addr, "/metrics").await;
    for (name, want) in [
        ("f2b_subscriber_events_received_total", 2.0),
        ("f2b_subscriber_events_applied_total", 1.0),
        (
            "f2b_subscriber_events_skipped_total{reason=\"own_node\"}",
            1.0,
        ),
        (
            "f2b_subscriber_broadcasts_refused_total{reason=\"bad_signature\"}",
            1.0,
        ),
        (
            "f2b_subscriber_broadcasts_refused_total{reason=\"unsigned\"}",
            0.0,
        ),
    ] {
        assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
    }
    assert!(
        sample(&text, "f2b_subscriber_heartbeats_received_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    let ready = http_get(&addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // No verified message for heartbeat_timeout: not ready.
    publ.heartbeats(false);
    sub.wait_for("link dead", |n| matches!(n, Notice::LinkDead))
        .await;
    let ready = http_get(&addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    sub.stop().await;
}
