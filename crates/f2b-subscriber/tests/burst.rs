//! A burst of single-event broadcasts: the receive loop takes the messages it
//! finds waiting together (one signature batch, one send to the intake), and
//! must still handle each exactly as if it came alone: every signed event used
//! once and in order, forged and unsigned ones refused and counted one by one,
//! a heartbeat among them seen in its place (no false gap), nothing lost. A
//! stand-in publisher (a real PUB socket) sends frames signed beforehand, so
//! that they arrive faster than they are verified and pile up.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::hub::{start_counting as start, Counting};
use common::{config, frames, other_key, refusals, test_key, TestPublisher};
use f2b_proto::{Broadcast, Heartbeat};
use f2b_subscriber::{Notice, Refusal};

const HB: Duration = Duration::from_millis(100);

/// Honest events in the burst.
const N: u32 = 1200;

/// The `i`th address of a block (100.64.0.0/10 for honest events, 198.18.0.0/15
/// for forged ones).
fn nth(base: Ipv4Addr, i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(base) + i))
}

#[tokio::test]
async fn a_burst_of_single_event_messages_is_used_once_in_order_and_forgeries_refused() {
    let publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "heartbeat_timeout = \"10m\"");
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    // Only the burst from now on (the test publisher's own heartbeats do not
    // count raw frames).
    publ.heartbeats(false);
    let epoch = publ.epoch;
    let honest_base = Ipv4Addr::new(100, 64, 0, 0);
    let forged_base = Ipv4Addr::new(198, 18, 0, 0);
    let event = |seq: u32, ip: IpAddr| common::ban(u64::from(seq), epoch, &ip.to_string());
    let mut burst = Vec::new();
    let (mut forged, mut unsigned) = (0, 0);
    for seq in 1..=N {
        // A forgery of the next number just before the genuine one: another
        // key, or the right key's signature over another event.
        if seq % 7 == 0 {
            let fake = Broadcast::Event(event(seq, nth(forged_base, seq)));
            burst.push(frames(&fake, Some(&other_key())));
            forged += 1;
        }
        if seq % 13 == 0 {
            let signed = Broadcast::Event(event(seq, nth(honest_base, seq)));
            let mut f = frames(&signed, Some(&test_key()));
            f[1] = Broadcast::Event(event(seq, nth(forged_base, seq))).encode();
            burst.push(f);
            forged += 1;
        }
        if seq % 11 == 0 {
            let bare = Broadcast::Event(event(seq, nth(forged_base, seq + N)));
            burst.push(frames(&bare, None));
            unsigned += 1;
        }
        let real = Broadcast::Event(event(seq, nth(honest_base, seq)));
        burst.push(frames(&real, Some(&test_key())));
        if seq == N / 2 {
            // All events so far were broadcast: a heartbeat taken before any of
            // them would count a gap.
            let hb = Broadcast::Heartbeat(Heartbeat {
                seq: u64::from(seq),
                epoch,
                interval_ms: 100,
            });
            burst.push(frames(&hb, Some(&test_key())));
        }
    }
    for f in burst {
        publ.raw(f);
    }
    let last = nth(honest_base, N).to_string();
    sub.applied(&last).await;
    let seen = sub.stop().await;
    let want: Vec<IpAddr> = (1..=N).map(|i| nth(honest_base, i)).collect();
    let got = applier.ips();
    // Told briefly: where the applied list first departs from the honest one.
    let first_wrong = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(
        (got.len(), first_wrong),
        (want.len(), None),
        "each honest event applied once, in order (got {:?}, want {:?} there)",
        first_wrong.map(|i| got[i]),
        first_wrong.map(|i| want[i]),
    );
    assert_eq!(
        refusals(&seen, Refusal::BadSignature),
        forged,
        "each forged message refused and counted"
    );
    assert_eq!(refusals(&seen, Refusal::Unsigned), unsigned);
    assert!(
        !seen.iter().any(|n| matches!(
            n,
            Notice::Missed { .. }
                | Notice::Refused {
                    reason: Refusal::Replayed | Refusal::StaleEpoch,
                    ..
                }
        )),
        "no gap, no replay: {:#?}",
        seen.iter()
            .filter(|n| !matches!(n, Notice::Applied { .. }))
            .collect::<Vec<_>>()
    );
    let applied = seen
        .iter()
        .filter(|n| matches!(n, Notice::Applied { .. }))
        .count();
    assert_eq!(applied, want.len(), "one Applied notice per honest event");
}
