//! `events` broadcasts: several events of one jail under one signature. The
//! message is verified once, then each of its events is taken exactly as a lone
//! `event` would be (gate, holds, gaps, catch-up queue). A stand-in publisher (a
//! real PUB socket, a real REP socket for snapshots) signs with the test key.

mod common;

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use common::hub::{counting_subscriber, listed, snapshotted, Counting, Snapshotted};
use common::{
    ban, config, frames, http_get, ip, metrics_addr, other_key, refusals, sample, test_key, Logs,
    Running, TestPublisher, DEADLINE,
};
use f2b_common::config::Config;
use f2b_proto::{Action, Broadcast, Epoch, EventBatch, Sequenced};
use f2b_subscriber::{Notice, Refusal, ResyncReason};

const HB: Duration = Duration::from_millis(100);

fn start(cfg: &Config, applier: &Counting) -> Running {
    Running::start_with(counting_subscriber(cfg, applier).with_snapshot_timeout(DEADLINE))
}

fn batch(items: Vec<Sequenced>) -> Broadcast {
    Broadcast::Events(EventBatch::new(items).unwrap())
}

#[tokio::test]
async fn a_signed_events_message_applies_every_event_in_order() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "metrics_bind = \"127.0.0.1:0\"\nheartbeat_timeout = \"10m\"",
    );
    let applier = Counting::default();
    let logs = Logs::capture();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    let addr = metrics_addr(&logs);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.1");
    sub.applied("203.0.113.1").await;
    let ips = ["203.0.113.2", "203.0.113.3", "203.0.113.4", "203.0.113.5"];
    let sent = publ.events("web2", "sshd", &ips);
    assert_eq!(sent.iter().map(|s| s.seq).collect::<Vec<_>>(), [2, 3, 4, 5]);
    // Each event applied, with its own sequence number, in order.
    for (s, want) in sent.iter().zip(ips) {
        match sub.applied(want).await {
            Notice::Applied { seq, .. } => assert_eq!(seq, s.seq, "{want}"),
            n => panic!("{n:?}"),
        }
    }
    // A batch whose numbers follow on is no gap; one that skips some is, as if
    // its events had come one by one: 6 and 7 are missed before 8, 9 within.
    let epoch = publ.epoch;
    publ.send_batch(vec![
        ban(8, epoch, "203.0.113.8"),
        ban(10, epoch, "203.0.113.10"),
    ]);
    publ.skip(5);
    sub.applied("203.0.113.10").await;
    let text = http_get(&addr, "/metrics").await;
    let seen = sub.stop().await;
    let missed: Vec<u64> = seen
        .iter()
        .filter_map(|n| match n {
            Notice::Missed { count, .. } => Some(*count),
            _ => None,
        })
        .collect();
    assert_eq!(missed, [2, 1], "{seen:#?}");
    assert_eq!(
        applier.ips(),
        [
            ip("203.0.113.1"),
            ip("203.0.113.2"),
            ip("203.0.113.3"),
            ip("203.0.113.4"),
            ip("203.0.113.5"),
            ip("203.0.113.8"),
            ip("203.0.113.10"),
        ]
    );
    // Received counts events, not messages.
    assert_eq!(
        sample(&text, "f2b_subscriber_events_received_total"),
        Some(7.0),
        "{text}"
    );
}

#[tokio::test]
async fn an_unsigned_forged_or_tampered_events_message_applies_none_and_is_one_refusal() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "");
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    let epoch = publ.epoch;
    let three = |base: u64, last: u8| {
        batch(
            (0..3)
                .map(|i| ban(base + i, epoch, &format!("203.0.113.{}", last + i as u8)))
                .collect(),
        )
    };
    // Unsigned.
    publ.send_with(three(1, 20), None);
    // Signed by another key.
    publ.send_with(three(1, 30), Some(other_key()));
    // Signed by the right key, then one event of the list changed.
    let mut f = frames(&three(1, 40), Some(&test_key()));
    f[1] = three(1, 50).encode();
    publ.raw(f);
    // The loop goes on: a signed message is taken whole.
    let sent = publ.events("web2", "sshd", &["203.0.113.60", "203.0.113.61"]);
    assert_eq!(sent[0].seq, 1);
    sub.applied("203.0.113.61").await;
    let seen = sub.stop().await;
    assert_eq!(applier.ips(), [ip("203.0.113.60"), ip("203.0.113.61")]);
    // One refusal per message, not per event.
    assert_eq!(refusals(&seen, Refusal::Unsigned), 1, "{seen:#?}");
    assert_eq!(refusals(&seen, Refusal::BadSignature), 2, "{seen:#?}");
    // Refused messages prove nothing: no gap was counted for their numbers.
    assert!(
        !seen.iter().any(|n| matches!(n, Notice::Missed { .. })),
        "{seen:#?}"
    );
}

#[tokio::test]
async fn a_batch_partly_at_or_below_the_floor_applies_only_its_newer_events() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "");
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.70");
    publ.event("web2", "sshd", Action::Ban, "203.0.113.71");
    sub.applied("203.0.113.71").await;
    // Validly signed, new ids, but 1 and 2 were used already in this epoch.
    let epoch = publ.epoch;
    publ.send_batch(vec![
        ban(1, epoch, "203.0.113.72"),
        ban(2, epoch, "203.0.113.73"),
        ban(3, epoch, "203.0.113.74"),
        ban(4, epoch, "203.0.113.75"),
    ]);
    publ.skip(2);
    sub.applied("203.0.113.75").await;
    // A batch of nothing but used numbers is refused event by event.
    publ.send_batch(vec![
        ban(3, epoch, "203.0.113.76"),
        ban(4, epoch, "203.0.113.77"),
    ]);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.78");
    sub.applied("203.0.113.78").await;
    let seen = sub.stop().await;
    assert_eq!(
        applier.ips(),
        [
            ip("203.0.113.70"),
            ip("203.0.113.71"),
            ip("203.0.113.74"),
            ip("203.0.113.75"),
            ip("203.0.113.78"),
        ]
    );
    assert_eq!(refusals(&seen, Refusal::Replayed), 4, "{seen:#?}");
}

#[tokio::test]
async fn a_batch_of_an_unconfirmed_epoch_is_held_like_single_events() {
    let publ = TestPublisher::start(HB);
    let old = publ.epoch;
    let logs = Logs::capture();
    let Snapshotted {
        listing,
        rep: _rep,
        applier,
        mut sub,
    } = snapshotted(&publ, None, start).await;
    // The publisher starts a new epoch: its first batch waits for the snapshot
    // that confirms it, then the events above the snapshot's seq are applied.
    let new_epoch = Epoch(0x0900d);
    *listing.lock().unwrap() = (new_epoch, 1, vec![]);
    publ.send_batch(vec![
        ban(1, new_epoch, "203.0.113.80"),
        ban(2, new_epoch, "203.0.113.81"),
        ban(3, new_epoch, "203.0.113.82"),
    ]);
    match sub
        .wait_for(
            "resync of the new epoch",
            |n| matches!(n, Notice::Resynced { epoch, .. } if *epoch == new_epoch),
        )
        .await
    {
        Notice::Resynced { seq, .. } => assert_eq!(seq, 1),
        n => panic!("{n:?}"),
    }
    sub.applied("203.0.113.82").await;
    // The old epoch is retired: a batch of it is refused, event by event.
    publ.send_batch(vec![
        ban(7, old, "203.0.113.83"),
        ban(8, old, "203.0.113.84"),
    ]);
    publ.send_batch(vec![
        ban(4, new_epoch, "203.0.113.85"),
        ban(5, new_epoch, "203.0.113.86"),
    ]);
    sub.applied("203.0.113.86").await;
    let seen = sub.stop().await;
    // .80 (seq 1) is in the snapshot, which does not list it: not applied.
    assert_eq!(
        applier.ips(),
        [
            ip("203.0.113.81"),
            ip("203.0.113.82"),
            ip("203.0.113.85"),
            ip("203.0.113.86"),
        ]
    );
    assert_eq!(refusals(&seen, Refusal::StaleEpoch), 2, "{seen:#?}");
    // Held once per epoch, not once per event.
    assert_eq!(
        logs.text()
            .matches("broadcasts of this epoch are held until a signed snapshot confirms it")
            .count(),
        1,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_batch_received_during_a_fetch_is_queued_and_follows_the_snapshot() {
    let mut publ = TestPublisher::start(HB);
    let epoch = publ.epoch;
    let (go, gate) = std_mpsc::channel();
    let Snapshotted {
        listing,
        rep,
        applier,
        mut sub,
    } = snapshotted(&publ, Some(gate), start).await;
    let first = publ.event("web2", "sshd", Action::Ban, "203.0.113.90");
    sub.applied("203.0.113.90").await;
    // A gap before a batch: its events are used, and a snapshot is asked for.
    publ.skip(1);
    let gapped = publ.events("web2", "sshd", &["203.0.113.92", "203.0.113.93"]);
    sub.applied("203.0.113.93").await;
    rep.wait_requests(2).await;
    // The fetch is under way (its reply waits): this batch is queued.
    let queued = publ.events(
        "web2",
        "sshd",
        &["203.0.113.94", "203.0.113.95", "203.0.113.96"],
    );
    // The snapshot reflects seq 4: .94 was banned and unbanned meanwhile.
    *listing.lock().unwrap() = (
        epoch,
        queued[0].seq,
        vec![listed(&first), listed(&gapped[0]), listed(&gapped[1])],
    );
    go.send(()).unwrap();
    sub.wait_for(
        "resync after the gap",
        |n| matches!(n, Notice::Resynced { reason, .. } if *reason == ResyncReason::Gap),
    )
    .await;
    sub.applied("203.0.113.96").await;
    sub.stop().await;
    assert_eq!(
        applier.ips(),
        [
            ip("203.0.113.90"),
            ip("203.0.113.92"),
            ip("203.0.113.93"),
            ip("203.0.113.95"),
            ip("203.0.113.96"),
        ]
    );
}
