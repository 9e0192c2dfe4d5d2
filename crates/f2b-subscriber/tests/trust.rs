//! Trust: only what the publisher's key signed is obeyed. A stand-in publisher (a
//! real PUB socket, a real REP socket for snapshots) signs with the test key; the
//! tests forge, tamper with and replay its messages.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::hub::{
    listed, listing_rep, page_of, snapshotted, start_counting as start, Counting, FakeRep,
    Snapshotted,
};
use common::{config, frames, ip, other_key, test_key, Logs, TestPublisher};
use f2b_proto::{Action, Broadcast, Epoch, Heartbeat};
use f2b_subscriber::{Notice, Refusal};

const HB: Duration = Duration::from_millis(100);

#[tokio::test]
async fn unsigned_forged_and_tampered_broadcasts_are_refused_and_nothing_is_applied() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "");
    let applier = Counting::default();
    let logs = Logs::capture();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    // Signed: applied.
    publ.event("web2", "sshd", Action::Ban, "203.0.113.1");
    sub.applied("203.0.113.1").await;

    let forge = |seq: u64, ip: &str| common::ban(seq, publ.epoch, ip);
    // Unsigned.
    publ.send_with(Broadcast::Event(forge(2, "203.0.113.2")), None);
    sub.refused(Refusal::Unsigned).await;
    // Signed by another key.
    publ.send_with(Broadcast::Event(forge(3, "203.0.113.3")), Some(other_key()));
    sub.refused(Refusal::BadSignature).await;
    // Signed by the right key, then the payload changed (another address).
    let mut f = frames(
        &Broadcast::Event(forge(4, "203.0.113.4")),
        Some(&test_key()),
    );
    f[1] = Broadcast::Event(forge(4, "203.0.113.44")).encode();
    publ.raw(f);
    sub.refused(Refusal::BadSignature).await;
    // ... or the topic changed (a jail the subscriber might filter otherwise).
    let mut f = frames(
        &Broadcast::Event(forge(5, "203.0.113.5")),
        Some(&test_key()),
    );
    f[0] = b"ev:nginx\0".to_vec();
    publ.raw(f);
    sub.refused(Refusal::BadSignature).await;
    // A signature frame that is no signature at all.
    let mut f = frames(&Broadcast::Event(forge(6, "203.0.113.6")), None);
    f.push(vec![0; 64]);
    publ.raw(f);
    sub.refused(Refusal::BadSignature).await;

    // The loop goes on: the next signed event is applied, nothing forged was.
    publ.skip(5);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.7");
    sub.applied("203.0.113.7").await;
    sub.stop().await;
    let applied = applier.ips();
    assert_eq!(applied, [ip("203.0.113.1"), ip("203.0.113.7")]);
    let text = logs.text();
    for want in [
        "broadcast refused: it is not signed",
        "broadcast refused: its signature is not by [trust] publisher_key",
        "check [trust] publisher_key",
        &format!("publisher={}", publ.endpoint),
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    // The first of each reason in full, the rest counted for the summary.
    assert_eq!(
        text.matches("its signature is not by [trust] publisher_key")
            .count(),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn a_publisher_signing_with_another_key_is_not_obeyed_and_its_heartbeats_prove_nothing() {
    // Every message of this publisher, heartbeats included, is signed by a key
    // the subscriber does not trust.
    let mut publ = TestPublisher::start_signing(HB, Some(other_key()));
    let cfg = config(
        "web1",
        &publ.endpoint,
        "heartbeat_timeout = \"500ms\"\nsnapshot = \"tcp://127.0.0.1:1\"",
    );
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.refused(Refusal::BadSignature).await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.10");
    // Its heartbeats do not keep the link alive.
    sub.wait_for("link dead", |n| matches!(n, Notice::LinkDead))
        .await;
    let seen = sub.stop().await;
    assert!(applier.calls().is_empty(), "{:?}", applier.calls());
    assert!(
        !seen.iter().any(|n| matches!(
            n,
            Notice::Connected { .. } | Notice::Missed { .. } | Notice::Resynced { .. }
        )),
        "{seen:#?}"
    );
}

#[tokio::test]
async fn a_forged_heartbeat_triggers_nothing() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "");
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    // A heartbeat of the same epoch claiming 50 events were broadcast, and one of
    // a new epoch: signed by another key, neither counts a gap nor a new epoch.
    for (epoch, seq) in [(publ.epoch, 50), (Epoch(0x5eed), 3)] {
        let hb = Broadcast::Heartbeat(Heartbeat {
            seq,
            epoch,
            interval_ms: 100,
        });
        publ.send_with(hb, Some(other_key()));
        sub.refused(Refusal::BadSignature).await;
    }
    publ.event("web2", "sshd", Action::Ban, "203.0.113.11");
    sub.applied("203.0.113.11").await;
    let seen = sub.stop().await;
    let triggered = |n: &Notice| match n {
        Notice::Missed { .. } | Notice::Resynced { .. } => true,
        Notice::Connected { epoch } => *epoch != publ.epoch,
        _ => false,
    };
    assert!(!seen.iter().any(triggered), "{seen:#?}");
}

#[tokio::test]
async fn a_replayed_old_ban_does_not_undo_a_newer_unban() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "");
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    let ban = publ.event("web2", "sshd", Action::Ban, "203.0.113.20");
    sub.applied("203.0.113.20").await;
    publ.event("web2", "sshd", Action::Unban, "203.0.113.20");
    sub.wait_for("unban", |n| {
        matches!(
            n,
            Notice::Applied {
                action: Action::Unban,
                ..
            }
        )
    })
    .await;
    // The recorded ban, validly signed, sent again.
    publ.send(ban.clone());
    sub.refused(Refusal::Replayed).await;
    // Even under a new event id (which the state does not know): its seq is old.
    let mut renamed = ban;
    renamed.event = common::event("web2", "sshd", Action::Ban, "203.0.113.20");
    publ.send(renamed);
    sub.refused(Refusal::Replayed).await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.21");
    sub.applied("203.0.113.21").await;
    sub.stop().await;
    assert_eq!(applier.count(Action::Ban, "203.0.113.20"), 1);
    assert_eq!(applier.count(Action::Unban, "203.0.113.20"), 1);
}

#[tokio::test]
async fn after_a_restart_a_replay_older_than_the_snapshot_is_not_applied() {
    // The cluster banned and unbanned .30 (seq 1, 2) while this subscriber was
    // not running: it never saw either id. A recording of the ban is replayed.
    let mut publ = TestPublisher::start(HB);
    let epoch = publ.epoch;
    let old_ban = common::ban(1, epoch, "203.0.113.30");
    publ.skip(2);
    let listing = Arc::new(Mutex::new((epoch, 2, Vec::new())));
    let rep = listing_rep(listing, None);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!("snapshot = \"{}\"", rep.endpoint),
    );
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    sub.resynced().await;
    publ.send(old_ban);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.31");
    sub.applied("203.0.113.31").await;
    sub.stop().await;
    assert_eq!(applier.count(Action::Ban, "203.0.113.30"), 0);
}

#[tokio::test]
async fn another_epoch_is_applied_only_once_a_signed_snapshot_confirms_it() {
    let publ = TestPublisher::start(HB);
    let epoch = publ.epoch;
    let logs = Logs::capture();
    let Snapshotted {
        listing,
        rep,
        applier,
        mut sub,
    } = snapshotted(&publ, None, start).await;
    let asked = rep.requests.load(std::sync::atomic::Ordering::SeqCst);
    // A signed broadcast of an epoch the publisher does not have (a recording
    // from before it lost its ledger, say): held, the publisher asked, refused.
    let forged = common::ban(99, Epoch(0x0bad), "203.0.113.40");
    publ.send(forged);
    sub.refused(Refusal::StaleEpoch).await;
    assert!(rep.requests.load(std::sync::atomic::Ordering::SeqCst) > asked);
    // Once refused, at once: no more asking.
    let asked = rep.requests.load(std::sync::atomic::Ordering::SeqCst);
    publ.send(common::ban(100, Epoch(0x0bad), "203.0.113.41"));
    sub.refused(Refusal::StaleEpoch).await;
    assert_eq!(
        rep.requests.load(std::sync::atomic::Ordering::SeqCst),
        asked
    );

    // The publisher really starts a new epoch: its first events wait for the
    // snapshot that says so, then those above its seq are applied.
    let new_epoch = Epoch(0x0900d);
    let s = |seq, ip| common::ban(seq, new_epoch, ip);
    *listing.lock().unwrap() = (new_epoch, 1, vec![]);
    publ.send(s(1, "203.0.113.42"));
    publ.send(s(2, "203.0.113.43"));
    match sub
        .wait_for(
            "resync of the new epoch",
            |n| matches!(n, Notice::Resynced { epoch, .. } if *epoch == new_epoch),
        )
        .await
    {
        Notice::Resynced { epoch, seq, .. } => assert_eq!((epoch, seq), (new_epoch, 1)),
        n => panic!("{n:?}"),
    }
    sub.applied("203.0.113.43").await;
    // The old epoch is over: a replay of it is refused at once.
    publ.send(common::ban(50, epoch, "203.0.113.44"));
    sub.refused(Refusal::StaleEpoch).await;
    sub.stop().await;
    let applied = applier.ips();
    // .42 (seq 1) is in the snapshot, which does not list it: not applied.
    assert_eq!(applied, [ip("203.0.113.43")]);
    assert!(
        logs.text()
            .contains("broadcasts of this epoch are held until a signed snapshot confirms it"),
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn snapshot_replies_signed_by_another_key_or_for_another_request_are_refused() {
    let mut publ = TestPublisher::start(HB);
    let epoch = publ.epoch;
    let one = common::ban(1, epoch, "203.0.113.50");
    let page = page_of(epoch, 1, vec![listed(&one)]);
    // Signed by another key: refused, every time.
    let payload = page.clone();
    let rep = FakeRep::start_frames(move |req| {
        let sig = f2b_proto::auth::sign_snapshot(&other_key(), req, &payload);
        vec![payload.clone(), sig.to_vec()]
    });
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!("snapshot = \"{}\"", rep.endpoint),
    );
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    publ.skip(1);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.51");
    let failed = sub
        .wait_for("a refused snapshot", |n| {
            matches!(n, Notice::SnapshotFailed { .. })
        })
        .await;
    assert!(
        matches!(&failed, Notice::SnapshotFailed { error, .. } if error.contains("not by [trust] publisher_key")),
        "{failed:?}"
    );
    sub.stop().await;
    // Nothing of it, and nothing of the unconfirmed epoch, was applied.
    assert!(applier.calls().is_empty(), "{:?}", applier.calls());
    drop(rep);

    // Signed by the right key, but for another request: the first reply is
    // recorded and sent again to answer the second request (its nonce differs).
    let recorded: std::sync::Arc<std::sync::Mutex<Option<Vec<Vec<u8>>>>> = Default::default();
    let keep = recorded.clone();
    let payload = page;
    let rep = FakeRep::start_frames(move |req| {
        let mut r = keep.lock().unwrap();
        if let Some(old) = r.as_ref() {
            return old.clone();
        }
        let sig = f2b_proto::auth::sign_snapshot(&test_key(), req, &payload);
        let frames = vec![payload.clone(), sig.to_vec()];
        *r = Some(frames.clone());
        frames
    });
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!("snapshot = \"{}\"", rep.endpoint),
    );
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    sub.resynced().await;
    sub.applied("203.0.113.50").await;
    // A gap: a second snapshot is asked for, and answered with the recording.
    publ.skip(3);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.52");
    let failed = sub
        .wait_for("a refused snapshot", |n| {
            matches!(n, Notice::SnapshotFailed { .. })
        })
        .await;
    assert!(
        matches!(&failed, Notice::SnapshotFailed { error, .. } if error.contains("signature")),
        "{failed:?}"
    );
    let seen = sub.stop().await;
    assert_eq!(
        seen.iter()
            .filter(|n| matches!(n, Notice::Resynced { .. }))
            .count(),
        1,
        "{seen:#?}"
    );
}

#[tokio::test]
async fn without_a_key_broadcasts_and_snapshots_are_taken_as_they_come() {
    // allow_unauthenticated and no publisher_key: unsigned messages are taken, and
    // a signature frame (which it cannot check) is ignored.
    let mut publ = TestPublisher::start_signing(HB, None);
    let epoch = publ.epoch;
    let one = common::ban(1, epoch, "203.0.113.60");
    let page = page_of(epoch, 1, vec![listed(&one)]);
    let rep = FakeRep::start_frames(move |_| vec![page.clone()]);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!("snapshot = \"{}\"{}", rep.endpoint, common::UNAUTHENTICATED),
    );
    assert!(cfg.trust.publisher_keys.is_empty());
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    sub.applied("203.0.113.60").await;
    publ.skip(1);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.61");
    sub.applied("203.0.113.61").await;
    let signed = common::ban(3, epoch, "203.0.113.62");
    publ.send_with(Broadcast::Event(signed), Some(other_key()));
    sub.applied("203.0.113.62").await;
    sub.stop().await;
}
