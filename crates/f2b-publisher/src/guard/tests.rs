use super::*;

const NOW: u64 = 1_763_702_000_000;
const MIN: u64 = 60_000;

fn cfg(rate: u32, burst: u32, floor: u32, factor: u32, quarantine: Duration) -> GuardConfig {
    GuardConfig {
        ignore_ip: vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
        rate_limit: rate,
        rate_burst: burst,
        quarantine_floor: floor,
        quarantine_factor: factor,
        quarantine_time: quarantine,
    }
}

fn node(n: &str) -> NodeName {
    NodeName::new(n).unwrap()
}

/// Sends `n` reports of `name` spread evenly over `[from, from + span_ms)`;
/// returns how many were admitted and the first refusal's reason.
fn burst(g: &mut Guard, name: &str, n: u64, from: u64, span_ms: u64) -> (u64, Option<NakReason>) {
    let mut ok = 0;
    let mut first = None;
    for i in 0..n {
        match g.admit(&node(name), true, from + i * span_ms / n.max(1)) {
            Ok(()) => ok += 1,
            Err(r) => {
                first.get_or_insert(r.reason);
            }
        }
    }
    (ok, first)
}

#[test]
fn ignore_ip_is_forbidden() {
    let g = Guard::new(cfg(0, 1, 100, 10, Duration::from_secs(60)));
    assert_eq!(
        g.forbidden("10.1.2.3".parse().unwrap())
            .map(ToString::to_string),
        Some("10.0.0.0/8".into())
    );
    assert!(g.forbidden("2001:db8::5".parse().unwrap()).is_some());
    assert!(g.forbidden("11.0.0.1".parse().unwrap()).is_none());
    assert!(Guard::new(GuardConfig::off())
        .forbidden("10.0.0.1".parse().unwrap())
        .is_none());
}

#[test]
fn the_token_bucket_allows_the_burst_then_the_rate() {
    let mut g = Guard::new(cfg(2, 5, u32::MAX, u32::MAX, Duration::from_secs(60)));
    let web1 = node("web1");
    for _ in 0..5 {
        g.admit(&web1, true, NOW).unwrap();
    }
    let r = g.admit(&web1, true, NOW).unwrap_err();
    assert_eq!(r.reason, NakReason::RateLimited);
    assert!(
        r.detail.contains("web1") && r.detail.contains("rate_limit = 2/s"),
        "{r:?}"
    );
    // A refused report takes no token; half a second refills one.
    assert!(g.admit(&web1, true, NOW + 499).is_err());
    g.admit(&web1, true, NOW + 500).unwrap();
    assert!(g.admit(&web1, true, NOW + 500).is_err());
    // Other nodes have their own bucket.
    g.admit(&node("web2"), true, NOW).unwrap();
    // A long pause refills to the burst, no more.
    let later = NOW + 3_600_000;
    let (ok, first) = burst(&mut g, "web1", 10, later, 0);
    assert_eq!((ok, first), (5, Some(NakReason::RateLimited)));
    // rate_limit = 0: no limit.
    let mut off = Guard::new(cfg(0, 1, u32::MAX, u32::MAX, Duration::from_secs(60)));
    assert_eq!(burst(&mut off, "web1", 10_000, NOW, 0), (10_000, None));
}

#[test]
fn a_new_node_is_quarantined_above_the_floor_until_the_time_is_over() {
    let q = Duration::from_secs(600);
    let mut g = Guard::new(cfg(0, 1, 100, 10, q));
    // The floor itself is allowed: more than it trips.
    assert_eq!(burst(&mut g, "web1", 100, NOW, 30_000), (100, None));
    let r = g.admit(&node("web1"), true, NOW + 30_000).unwrap_err();
    assert_eq!(r.reason, NakReason::Quarantined);
    assert!(
        r.detail.contains("web1") && r.detail.contains("10m"),
        "{r:?}"
    );
    assert_eq!(g.quarantined(NOW + 30_000), [(node("web1"), NOW + 630_000)]);
    // Every report until it ends, whatever the rate.
    let r = g.admit(&node("web1"), true, NOW + 629_999).unwrap_err();
    assert_eq!(r.reason, NakReason::Quarantined);
    // Others are not affected.
    g.admit(&node("web2"), true, NOW + 40_000).unwrap();
    // Over: accepted again, and the flood that tripped it no longer counts.
    g.tick(NOW + 630_000);
    assert!(g.quarantined(NOW + 630_000).is_empty());
    assert_eq!(burst(&mut g, "web1", 100, NOW + 630_000, 1000), (100, None));
}

#[test]
fn a_short_quarantine_does_not_trip_again_at_once() {
    let mut g = Guard::new(cfg(0, 1, 100, 10, Duration::from_secs(5)));
    assert_eq!(
        burst(&mut g, "web1", 101, NOW, 1000),
        (100, Some(NakReason::Quarantined))
    );
    // Five seconds later, still within the same minute: its windows start afresh.
    assert_eq!(burst(&mut g, "web1", 50, NOW + 6000, 1000), (50, None));
}

#[test]
fn the_usual_rate_raises_the_threshold_and_decays_when_idle() {
    let mut g = Guard::new(cfg(0, 1, 100, 10, Duration::from_secs(60)));
    // Two hours at 50 reports a minute: the usual rate nears 50, the threshold 500.
    for m in 0..120 {
        assert_eq!(
            burst(&mut g, "web1", 50, NOW + m * MIN, MIN),
            (50, None),
            "minute {m}"
        );
    }
    let t = NOW + 120 * MIN;
    // 300 in a minute is far above the floor but not above 10 x usual: admitted;
    // a new node doing the same is quarantined.
    assert_eq!(burst(&mut g, "web1", 300, t, MIN / 2), (300, None));
    assert_eq!(
        burst(&mut g, "new", 300, t, MIN / 2).1,
        Some(NakReason::Quarantined)
    );
    // Far more trips it even so.
    let (ok, first) = burst(&mut g, "web1", 1000, t + MIN / 2, MIN / 2);
    assert_eq!(first, Some(NakReason::Quarantined));
    assert!(ok < 400, "{ok} admitted");

    // After a day of silence the usual rate is back near 0: the floor governs.
    let mut g = Guard::new(cfg(0, 1, 100, 10, Duration::from_secs(60)));
    for m in 0..120 {
        burst(&mut g, "web1", 50, NOW + m * MIN, MIN);
    }
    let day = NOW + 24 * 60 * MIN;
    assert_eq!(
        burst(&mut g, "web1", 300, day, MIN / 2).1,
        Some(NakReason::Quarantined)
    );
}

#[test]
fn nodes_without_credentials_are_bounded_and_credentials_are_kept() {
    let mut g = Guard::new(cfg(1, 1, 1000, 10, Duration::from_secs(60))).with_max_nodes(8);
    let web1 = node("web1");
    g.admit(&web1, true, NOW).unwrap();
    // web1's bucket is empty now.
    assert!(g.admit(&web1, true, NOW).is_err());
    for i in 0..1000u64 {
        let name = node(&format!("host{i}"));
        g.admit(&name, false, NOW + i).unwrap();
        assert!(g.nodes() <= 9, "{} nodes", g.nodes());
    }
    // web1 was never forgotten: its bucket is still as it was (refilled by the
    // time that passed, 1 s: one token).
    g.admit(&web1, true, NOW + 1000).unwrap();
    assert!(g.admit(&web1, true, NOW + 1000).is_err());
}

#[test]
fn the_clock_going_back_is_harmless() {
    let mut g = Guard::new(cfg(10, 10, 100, 10, Duration::from_secs(60)));
    assert_eq!(burst(&mut g, "web1", 5, NOW, 0), (5, None));
    assert_eq!(burst(&mut g, "web1", 5, NOW - 3_600_000, 0), (5, None));
    assert!(g.admit(&node("web1"), true, NOW - 3_600_000).is_err());
    g.admit(&node("web1"), true, NOW + 1000).unwrap();
    g.tick(0);
    g.tick(u64::MAX);
    g.admit(&node("web1"), true, u64::MAX).unwrap();
}

#[test]
fn reports_that_only_name_a_node_are_counted_apart_from_it() {
    let mut g = Guard::new(cfg(1, 2, 3, 10, Duration::from_secs(60)));
    let web1 = node("web1");
    // Unauthenticated (or legacy) reports naming web1 empty their own bucket and
    // trip their own breaker...
    assert!(g.admit(&web1, false, NOW).is_ok());
    assert!(g.admit(&web1, false, NOW).is_ok());
    let r = g.admit(&web1, false, NOW).unwrap_err();
    assert_eq!(r.reason, NakReason::RateLimited);
    assert!(r.detail.contains("web1 (unauthenticated)"), "{r:?}");
    for i in 0..10 {
        let _ = g.admit(&web1, false, NOW + 2000 + i * 1000);
    }
    assert_eq!(g.quarantined(NOW + 20_000).len(), 1);
    // ... and the authenticated web1 is untouched by either.
    assert!(g.admit(&web1, true, NOW + 20_000).is_ok());
    assert!(g.admit(&web1, true, NOW + 20_000).is_ok());
}

/// A reload changes the limits and the allowlist and keeps the nodes' state: a
/// quarantine running goes on, a bucket is cut to a smaller burst.
#[test]
fn reconfigure_keeps_the_nodes_state() {
    let mut g = Guard::new(cfg(10, 100, 20, 2, Duration::from_secs(600)));
    let (ok, first) = burst(&mut g, "web1", 30, NOW, 1000);
    assert_eq!((ok, first), (20, Some(NakReason::Quarantined)));
    assert_eq!(g.trips(), 1);
    // web2's bucket holds 99 tokens after one report.
    assert!(g.admit(&node("web2"), true, NOW).is_ok());
    let mut new = cfg(10, 5, 1_000_000, 2, Duration::from_secs(60));
    new.ignore_ip = vec!["192.0.2.0/24".parse().unwrap()];
    g.reconfigure(new.clone());
    assert_eq!(g.config(), &new);
    assert!(g.forbidden("192.0.2.7".parse().unwrap()).is_some());
    assert!(g.forbidden("10.1.2.3".parse().unwrap()).is_none());
    // Still quarantined (the running quarantine keeps its end).
    assert_eq!(
        g.admit(&node("web1"), true, NOW + 2000).unwrap_err().reason,
        NakReason::Quarantined
    );
    // web2's bucket was cut to the new burst of 5.
    let (ok, first) = burst(&mut g, "web2", 10, NOW, 1);
    assert_eq!((ok, first), (5, Some(NakReason::RateLimited)));
}
