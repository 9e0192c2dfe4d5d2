use std::path::Path;

use f2b_proto::auth::{verify_broadcast, verify_reply, verify_snapshot};
use f2b_proto::{Epoch, Heartbeat};

use super::*;

const NOW: u64 = 1_763_702_000_000;
const SKEW: u64 = 60_000;
const WEB1: &str = "web1-secret-0123456789abcdef0123456789";
const WEB2: &str = "web2-secret-0123456789abcdef0123456789";

/// A `[trust]` table with credentials for web1 and web2, a signing key, and
/// `extra` lines; read as the daemon reads it.
fn config(extra: &str) -> TrustConfig {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.key");
    std::fs::write(&key, SigningKey::from_seed([7; 32]).to_file_text()).unwrap();
    let text = format!(
        "[node]\nname = \"hub\"\n[trust]\nsigning_key_file = {:?}\n{extra}\n\
         [trust.monitors]\nweb1 = {WEB1:?}\nweb2 = {WEB2:?}\n",
        key.display().to_string()
    );
    f2b_common::config::from_str(&text, Path::new("t.conf"))
        .unwrap()
        .trust
}

fn trust() -> Trust {
    Trust::new(&config(""))
}

fn node(n: &str) -> NodeName {
    NodeName::new(n).unwrap()
}

fn secret(s: &str) -> MonitorSecret {
    MonitorSecret::new(s).unwrap()
}

const PAYLOAD: &[u8] = br#"{"v":1,"type":"report","node":"web1"}"#;

fn auth(secret_text: &str, key: &str, ts_ms: u64, nonce: u8, payload: &[u8]) -> RequestAuth {
    RequestAuth::sign(
        &secret(secret_text),
        &node(key),
        ts_ms,
        [nonce; 16],
        payload,
    )
}

fn check(t: &mut Trust, a: &RequestAuth, node_name: &str, now: u64) -> Result<Checked, Refused> {
    t.check(PAYLOAD, Some(&a.encode()), &node(node_name), now)
}

fn refused(r: Result<Checked, Refused>, reason: NakReason) -> Refused {
    let r = r.expect_err("refused");
    assert_eq!(r.reason, reason, "{r:?}");
    assert!(
        !r.detail.contains(WEB1) && !r.detail.contains(WEB2),
        "{r:?}"
    );
    r
}

#[test]
fn a_right_mac_authenticates_the_node_and_its_reply() {
    let mut t = trust();
    let a = auth(WEB1, "web1", NOW, 1, PAYLOAD);
    let c = check(&mut t, &a, "web1", NOW).unwrap();
    assert_eq!(c.reporter, Reporter::Credential(node("web1")));
    assert_eq!(
        c.seal,
        Seal::Mac {
            key: node("web1"),
            request_mac: a.mac
        }
    );
    // The reply carries a MAC the monitor checks with its secret.
    let frames = t.reply_frames(b"ack".to_vec(), &c.seal);
    assert_eq!(frames.len(), 2);
    assert!(verify_reply(&secret(WEB1), &a.mac, b"ack", &frames[1]));
    assert!(!verify_reply(&secret(WEB2), &a.mac, b"ack", &frames[1]));
    assert_eq!(t.nonces_held(), 1);
}

#[test]
fn missing_frames_need_the_opt_out() {
    let mut t = trust();
    let r = refused(
        t.check(PAYLOAD, None, &node("web1"), NOW),
        NakReason::Unauthenticated,
    );
    assert!(
        r.detail.contains("secret") && r.detail.contains("web1"),
        "{r:?}"
    );
    assert_eq!(r.seal, Seal::None);

    let mut open = Trust::new(&config("allow_unauthenticated = true"));
    let c = open.check(PAYLOAD, None, &node("web9"), NOW).unwrap();
    assert_eq!(
        (c.reporter, c.seal),
        (Reporter::Unauthenticated, Seal::None)
    );
    // A frame present is checked all the same.
    let bad = auth(WEB2, "web1", NOW, 1, PAYLOAD);
    refused(
        check(&mut open, &bad, "web1", NOW),
        NakReason::Unauthenticated,
    );
    let c = Trust::open().check(PAYLOAD, None, &node("x"), NOW).unwrap();
    assert_eq!(c.reporter, Reporter::Unauthenticated);
}

#[test]
fn forgeries_are_unauthenticated_and_their_naks_unmaced() {
    let mut t = trust();
    // Unknown (or revoked) credential.
    let a = auth(WEB1, "web9", NOW, 1, PAYLOAD);
    let r = refused(check(&mut t, &a, "web9", NOW), NakReason::Unauthenticated);
    assert!(r.detail.contains("web9") && r.detail.contains("unknown or revoked"));
    assert_eq!(r.seal, Seal::None);
    // Another node's secret.
    let a = auth(WEB2, "web1", NOW, 2, PAYLOAD);
    let r = refused(check(&mut t, &a, "web1", NOW), NakReason::Unauthenticated);
    assert!(r.detail.contains("wrong MAC"), "{r:?}");
    assert_eq!(r.seal, Seal::None);
    // A payload other than the one signed.
    let a = auth(WEB1, "web1", NOW, 3, b"{}");
    refused(check(&mut t, &a, "web1", NOW), NakReason::Unauthenticated);
    // web2's own credential, for an event of web1.
    let a = auth(WEB2, "web2", NOW, 4, PAYLOAD);
    let r = refused(check(&mut t, &a, "web1", NOW), NakReason::Unauthenticated);
    assert!(r.detail.contains("only for node web2"), "{r:?}");
    // ... whose sender holds web2's secret: that NAK is MACed for web2.
    assert_eq!(
        r.seal,
        Seal::Mac {
            key: node("web2"),
            request_mac: a.mac
        }
    );
    // Not an auth frame at all.
    for frame in [&b"garbage"[..], b"{\"v\":1,\"type\":\"auth\"}", &[0xff; 64]] {
        let r = refused(
            t.check(PAYLOAD, Some(frame), &node("web1"), NOW),
            NakReason::Unauthenticated,
        );
        assert!(
            r.detail.contains("authentication frame is invalid"),
            "{r:?}"
        );
    }
    // None of them was remembered.
    assert_eq!(t.nonces_held(), 0);
}

#[test]
fn revoking_a_credential_refuses_its_node() {
    let mut t = Trust::new(&config(""));
    let a = auth(WEB2, "web2", NOW, 1, PAYLOAD);
    assert!(check(&mut t, &a, "web2", NOW).is_ok());
    // The same configuration without web2 (deleted from [trust.monitors]).
    let mut cfg = config("");
    cfg.monitors.remove(&node("web2"));
    let mut t = Trust::new(&cfg);
    let a = auth(WEB2, "web2", NOW, 2, PAYLOAD);
    refused(check(&mut t, &a, "web2", NOW), NakReason::Unauthenticated);
    assert!(!t.knows(&node("web2")) && t.knows(&node("web1")));
}

#[test]
fn stale_or_future_timestamps_are_replays_with_a_maced_nak() {
    let mut t = trust();
    for (ts, way) in [(NOW - SKEW - 1, "behind"), (NOW + SKEW + 1, "ahead of")] {
        let a = auth(WEB1, "web1", ts, 1, PAYLOAD);
        let r = refused(check(&mut t, &a, "web1", NOW), NakReason::Replayed);
        assert!(
            r.detail.contains(way) && r.detail.contains("clock"),
            "{r:?}"
        );
        // The sender holds the secret: it can trust this NAK.
        assert_eq!(
            r.seal,
            Seal::Mac {
                key: node("web1"),
                request_mac: a.mac
            }
        );
    }
    // At the edges of the window: accepted.
    assert!(check(
        &mut t,
        &auth(WEB1, "web1", NOW - SKEW, 2, PAYLOAD),
        "web1",
        NOW
    )
    .is_ok());
    assert!(check(
        &mut t,
        &auth(WEB1, "web1", NOW + SKEW, 3, PAYLOAD),
        "web1",
        NOW
    )
    .is_ok());
    // The window is max_clock_skew.
    let mut t = Trust::new(&config("max_clock_skew = \"5s\""));
    let a = auth(WEB1, "web1", NOW - 5001, 1, PAYLOAD);
    refused(check(&mut t, &a, "web1", NOW), NakReason::Replayed);
}

#[test]
fn a_nonce_is_accepted_once_per_credential_and_forgotten_when_harmless() {
    let mut t = trust();
    let a = auth(WEB1, "web1", NOW, 9, PAYLOAD);
    assert!(check(&mut t, &a, "web1", NOW).is_ok());
    let r = refused(check(&mut t, &a, "web1", NOW + 10), NakReason::Replayed);
    assert!(r.detail.contains("nonce"), "{r:?}");
    // Within the whole window.
    refused(check(&mut t, &a, "web1", NOW + SKEW), NakReason::Replayed);
    // Another credential's nonces are its own.
    let b = RequestAuth::sign(&secret(WEB2), &node("web2"), NOW, [9; 16], PAYLOAD);
    assert!(check(&mut t, &b, "web2", NOW).is_ok());
    assert_eq!(t.nonces_held(), 2);
    // Not forgotten before the window is over...
    t.prune(NOW + SKEW);
    assert_eq!(t.nonces_held(), 2);
    // ... and at most one bucket's width after: the request is stale by then.
    t.prune(NOW + SKEW + bucket_width(SKEW));
    assert_eq!(t.nonces_held(), 0);
    refused(
        check(&mut t, &a, "web1", NOW + SKEW + 1),
        NakReason::Replayed,
    );
    // A nonce is kept until its request's own time + the window, however late it
    // came: a request signed ahead of the clock is remembered longer.
    let ahead = auth(WEB1, "web1", NOW + SKEW, 10, PAYLOAD);
    assert!(check(&mut t, &ahead, "web1", NOW).is_ok());
    t.prune(NOW + 2 * SKEW);
    let r = refused(
        check(&mut t, &ahead, "web1", NOW + 2 * SKEW),
        NakReason::Replayed,
    );
    assert!(r.detail.contains("nonce"), "{r:?}");
}

#[test]
fn the_nonce_memory_is_bounded_and_never_forgets_early() {
    let mut t = trust().with_nonce_limit(3);
    for n in 0..3 {
        let a = auth(WEB1, "web1", NOW, n, PAYLOAD);
        assert!(check(&mut t, &a, "web1", NOW).is_ok());
    }
    let fourth = auth(WEB1, "web1", NOW, 3, PAYLOAD);
    let r = refused(
        check(&mut t, &fourth, "web1", NOW + 1),
        NakReason::RateLimited,
    );
    assert!(r.detail.contains("replay window"), "{r:?}");
    // The remembered ones are still refused as replays.
    refused(
        check(
            &mut t,
            &auth(WEB1, "web1", NOW, 0, PAYLOAD),
            "web1",
            NOW + 1,
        ),
        NakReason::Replayed,
    );
    // Other credentials are not affected.
    let b = auth(WEB2, "web2", NOW, 0, PAYLOAD);
    assert!(check(&mut t, &b, "web2", NOW + 1).is_ok());
    // Once the old ones left the window (and their bucket), there is room again.
    let later = NOW + SKEW + bucket_width(SKEW);
    let fresh = auth(WEB1, "web1", later, 4, PAYLOAD);
    assert!(check(&mut t, &fresh, "web1", later).is_ok());
    assert_eq!(t.nonces_held(), 2);
}

#[test]
fn broadcasts_and_snapshot_replies_are_signed_with_the_key() {
    let t = trust();
    let key = SigningKey::from_seed([7; 32]).public();
    assert_eq!(t.public_key(), Some(key));
    assert!(t.signs());
    let hb = Broadcast::Heartbeat(Heartbeat {
        seq: 3,
        epoch: Epoch(9),
        interval_ms: 1000,
    });
    let frames = t.broadcast_frames(&hb);
    assert_eq!(frames.len(), 3);
    assert_eq!((&frames[0], &frames[1]), (&hb.topic(), &hb.encode()));
    assert!(verify_broadcast(&[key], &frames[0], &frames[1], &frames[2]));

    let seal = Seal::Snapshot {
        request: b"req".to_vec(),
    };
    let frames = t.reply_frames(b"page".to_vec(), &seal);
    assert_eq!(frames.len(), 2);
    assert!(verify_snapshot(&[key], b"req", b"page", &frames[1]));
    assert!(!verify_snapshot(&[key], b"req2", b"page", &frames[1]));

    // Without a key: nothing signed; one frame for an unsealed reply.
    let open = Trust::open();
    assert!(!open.signs() && open.public_key().is_none());
    assert_eq!(open.broadcast_frames(&hb).len(), 2);
    assert_eq!(open.reply_frames(b"page".to_vec(), &seal).len(), 1);
    assert_eq!(t.reply_frames(b"x".to_vec(), &Seal::None).len(), 1);
}

#[test]
fn nothing_secret_in_debug_output() {
    let t = trust();
    let shown = format!("{t:?}");
    assert!(!shown.contains(WEB1) && !shown.contains(WEB2), "{shown}");
    assert!(
        shown.contains("web1") && shown.contains("ed25519:"),
        "{shown}"
    );
    assert_eq!(Reporter::Unauthenticated.to_string(), "-");
    assert_eq!(Reporter::Legacy.to_string(), "legacy");
    assert_eq!(Reporter::Credential(node("web1")).to_string(), "web1");
}

/// A reload revokes and adds credentials in place; a kept credential keeps its
/// nonces, so a request seen before the reload is still a replay after it, also
/// when the window grew.
#[test]
fn reconfigure_revokes_adds_and_keeps_the_replay_memory() {
    let mut t = trust();
    let seen = auth(WEB1, "web1", NOW, 1, PAYLOAD);
    assert!(check(&mut t, &seen, "web1", NOW).is_ok());
    let a = auth(WEB2, "web2", NOW, 2, PAYLOAD);
    assert!(check(&mut t, &a, "web2", NOW).is_ok());

    let mut cfg = config("max_clock_skew = \"5m\"");
    cfg.monitors.remove(&node("web2"));
    cfg.monitors.insert(
        node("web3"),
        secret("web3-secret-0123456789abcdef0123456789"),
    );
    t.reconfigure(&cfg);
    let a = auth(WEB2, "web2", NOW, 3, PAYLOAD);
    refused(check(&mut t, &a, "web2", NOW), NakReason::Unauthenticated);
    let a = auth(
        "web3-secret-0123456789abcdef0123456789",
        "web3",
        NOW,
        4,
        PAYLOAD,
    );
    assert!(check(&mut t, &a, "web3", NOW).is_ok());
    // The old window would have forgotten the nonce by now; the new one not.
    let later = NOW + 2 * SKEW;
    refused(check(&mut t, &seen, "web1", later), NakReason::Replayed);
    assert!(t.public_key().is_some(), "the signing key stays");
}

/// A nonce seen is refused again whatever `ts_ms` it is signed with (only a holder
/// of the secret can sign it anew, but the rule is "a nonce seen").
#[test]
fn a_nonce_is_refused_whatever_time_it_is_signed_with() {
    let mut t = trust();
    assert!(check(&mut t, &auth(WEB1, "web1", NOW, 5, PAYLOAD), "web1", NOW).is_ok());
    for ts in [NOW - SKEW, NOW - 1, NOW + 1, NOW + 5_000, NOW + SKEW] {
        let again = auth(WEB1, "web1", ts, 5, PAYLOAD);
        let r = refused(check(&mut t, &again, "web1", NOW), NakReason::Replayed);
        assert!(r.detail.contains("nonce"), "{ts}: {r:?}");
    }
    assert_eq!(t.nonces_held(), 1);
}

/// Requests signed all over the window, checked again as time passes: each is
/// refused for as long as its time is within the window (by its nonce), and each
/// is forgotten at most one bucket's width after; the buckets stay few.
#[test]
fn nonces_are_forgotten_by_the_bucket_never_before_their_window_ends() {
    let mut t = trust();
    let width = bucket_width(SKEW);
    let mut sent = Vec::new();
    let mut n: u32 = 0;
    // Every 300 ms of signing time, from a window behind to a window ahead.
    let mut ts = NOW - SKEW;
    while ts <= NOW + SKEW {
        let mut nonce = [0u8; 16];
        nonce[..4].copy_from_slice(&n.to_le_bytes());
        let a = RequestAuth::sign(&secret(WEB1), &node("web1"), ts, nonce, PAYLOAD);
        assert!(check(&mut t, &a, "web1", NOW).is_ok(), "{ts}");
        sent.push((ts, a));
        n += 1;
        ts += 300;
    }
    let buckets = t.nonces[&node("web1")].buckets.len() as u64;
    assert!(buckets <= 2 * BUCKETS_PER_WINDOW + 2, "{buckets} buckets");
    let mut now = NOW;
    while now <= NOW + 2 * SKEW + 2 * width {
        t.prune(now);
        let live = sent.iter().filter(|(ts, _)| ts + SKEW >= now).count();
        let kept = sent
            .iter()
            .filter(|(ts, _)| ts + SKEW + width > now)
            .count();
        let held = t.nonces_held();
        assert!(
            live <= held && held <= kept,
            "{now}: {live} <= {held} <= {kept}"
        );
        for (ts, a) in &sent {
            if ts.abs_diff(now) <= SKEW {
                let r = refused(check(&mut t, a, "web1", now), NakReason::Replayed);
                assert!(r.detail.contains("nonce"), "{ts} at {now}: {r:?}");
            }
        }
        now += 997;
    }
    assert_eq!(t.nonces_held(), 0);
    assert!(t.nonces[&node("web1")].buckets.is_empty());
}

/// A reload to a much wider window merges the buckets (they stay few) and keeps
/// every nonce for the new window; narrowing and widening again forgets none
/// early.
#[test]
fn a_wider_window_merges_the_buckets_and_keeps_every_nonce() {
    let mut t = trust();
    let mut sent = Vec::new();
    for n in 0..200u8 {
        let ts = NOW - SKEW + u64::from(n) * 600;
        let a = auth(WEB1, "web1", ts, n, PAYLOAD);
        assert!(check(&mut t, &a, "web1", NOW).is_ok());
        sent.push((ts, a));
    }
    // Narrower: nothing is forgotten before its time + the old window (the window
    // may widen again).
    t.reconfigure(&config("max_clock_skew = \"5s\""));
    t.prune(NOW);
    assert_eq!(t.nonces_held(), 200);
    // Then much wider: each nonce is kept until its time + the old window + what
    // the window grew by since.
    t.reconfigure(&config("max_clock_skew = \"1h\""));
    assert_eq!(t.nonces_held(), 200);
    let hour = 3_600_000;
    let nonces = &t.nonces[&node("web1")];
    assert_eq!(nonces.width_ms, bucket_width(hour));
    assert!(nonces.buckets.len() as u64 <= 2 * BUCKETS_PER_WINDOW + 2);
    // (60 s narrowed to 5 s then widened to 1 h: kept for 60 s + 3,595 s.) An
    // hour later the requests signed from NOW on are within the window again, and
    // refused by their nonce.
    let now = NOW + hour;
    t.prune(now);
    let mut by_nonce = 0;
    for (ts, a) in &sent {
        let r = refused(check(&mut t, a, "web1", now), NakReason::Replayed);
        if *ts >= NOW {
            assert!(r.detail.contains("nonce"), "{ts}: {r:?}");
            by_nonce += 1;
        }
    }
    assert_eq!(by_nonce, 100);
    // A new nonce lands in the new buckets, and is refused once.
    let fresh = auth(WEB1, "web1", now, 250, PAYLOAD);
    assert!(check(&mut t, &fresh, "web1", now).is_ok());
    refused(check(&mut t, &fresh, "web1", now + 1), NakReason::Replayed);
}

#[test]
fn bucket_widths_are_powers_of_two_of_at_least_a_second() {
    assert_eq!(bucket_width(1), MIN_BUCKET_MS);
    assert_eq!(bucket_width(SKEW), 1024);
    assert_eq!(bucket_width(3_600_000), 65_536);
    assert!(bucket_width(u64::MAX).is_power_of_two());
    for skew in [1, 999, 60_000, 65_537, 3_600_000, 86_400_000, u64::MAX / 3] {
        let w = bucket_width(skew);
        assert!(w.is_power_of_two() && w >= MIN_BUCKET_MS && w >= skew / BUCKETS_PER_WINDOW);
    }
}
