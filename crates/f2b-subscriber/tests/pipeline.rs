//! The subscriber in-process against a real ZeroMQ PUB socket on loopback: jail
//! filter, skips, liveness and reconnection, bad input, the exec and log actions,
//! and shutdown.

mod common;

use std::time::Duration;

use common::{config, Logs, Running, TestPublisher};
use f2b_proto::{Action, Sequenced};
use f2b_subscriber::{Notice, SkipReason};

const HB: Duration = Duration::from_millis(100);

#[tokio::test]
async fn applies_only_subscribed_jails() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "action = \"none\"\njails = [\"sshd\"]",
    );
    let mut sub = Running::start(&cfg);
    assert_eq!(sub.connected().await, publ.epoch);
    publ.event("web2", "sshd-ddos", Action::Ban, "203.0.113.1");
    publ.event("web2", "nginx", Action::Ban, "203.0.113.2");
    publ.event("web2", "sshd", Action::Ban, "203.0.113.3");
    match sub.applied("203.0.113.3").await {
        Notice::Applied {
            action, jail, seq, ..
        } => {
            assert_eq!(action, Action::Ban);
            assert_eq!(jail.as_str(), "sshd");
            assert_eq!(seq, 3);
        }
        n => panic!("{n:?}"),
    }
    // Events of one connection arrive in order: the other jails' would have come
    // first, and a jail filter makes sequence gaps normal (no "missed").
    let acted: Vec<&Notice> = sub
        .seen
        .iter()
        .filter(|n| {
            matches!(
                n,
                Notice::Applied { .. } | Notice::Skipped { .. } | Notice::Missed { .. }
            )
        })
        .collect();
    assert_eq!(acted.len(), 1, "{acted:#?}");
    sub.stop().await;
}

#[tokio::test]
async fn skips_own_node_ignore_ip_local_addresses_and_duplicates() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "action = \"none\"\nban_jail = \"cluster\"\nignore_ip = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
    );
    let mut sub = Running::start_with(
        f2b_subscriber::Subscriber::new(&cfg)
            .with_local_addresses(vec!["192.0.2.10".parse().unwrap()]),
    );
    sub.connected().await;
    let logs = Logs::capture();
    let cases = [
        ("WEB1", "203.0.113.1", SkipReason::OwnNode),
        ("web2", "10.9.8.7", SkipReason::IgnoreIp),
        ("web2", "::ffff:127.0.0.1", SkipReason::IgnoreIp),
        ("web2", "192.0.2.10", SkipReason::LocalAddress),
    ];
    for (node, ip, reason) in cases {
        publ.event(node, "sshd", Action::Ban, ip);
        let n = sub
            .wait_for("skipped", |n| matches!(n, Notice::Skipped { .. }))
            .await;
        assert!(
            matches!(n, Notice::Skipped { reason: r, .. } if r == reason),
            "{node} {ip}: {n:?}"
        );
    }
    let s = publ.event("web2", "sshd", Action::Ban, "203.0.113.9");
    match sub.applied("203.0.113.9").await {
        Notice::Applied { jail, .. } => assert_eq!(jail.as_str(), "cluster"),
        n => panic!("{n:?}"),
    }
    // The same event again (another seq, same id): a duplicate.
    publ.send(Sequenced { seq: 99, ..s });
    let n = sub
        .wait_for("skipped", |n| matches!(n, Notice::Skipped { .. }))
        .await;
    assert!(
        matches!(
            n,
            Notice::Skipped {
                reason: SkipReason::Duplicate,
                ..
            }
        ),
        "{n:?}"
    );
    // The `applied` line is logged with the event's record, up to 10 ms after
    // the action (at the latest when the subscriber stops).
    sub.stop().await;
    let text = logs.text();
    for want in [
        "skipped reason=own_node ip=203.0.113.1",
        "skipped reason=ignore_ip ip=10.9.8.7",
        "skipped reason=ignore_ip ip=127.0.0.1",
        "skipped reason=local_address ip=192.0.2.10",
        "skipped reason=duplicate ip=203.0.113.9",
        "applied action=ban jail=cluster ip=203.0.113.9 node=web2 seq=",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
}

#[tokio::test]
async fn dead_link_is_noticed_and_reconnected() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "action = \"none\"\nheartbeat_timeout = \"600ms\"",
    );
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.heartbeats(false);
    sub.wait_for("link dead", |n| matches!(n, Notice::LinkDead))
        .await;
    publ.heartbeats(true);
    // The socket was recreated: the first message proves the new one live.
    assert_eq!(sub.connected().await, publ.epoch);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.4");
    sub.applied("203.0.113.4").await;
    sub.stop().await;
}

#[tokio::test]
async fn publisher_restart_is_followed_to_the_new_epoch() {
    let publ = TestPublisher::start(HB);
    let endpoint = publ.endpoint.clone();
    let cfg = config("web1", &endpoint, "action = \"none\"");
    let mut sub = Running::start(&cfg);
    let first = sub.connected().await;
    drop(publ);
    let mut publ = TestPublisher::start_at(&endpoint, common::random_epoch(), HB);
    let second = sub.connected().await;
    assert_ne!(first, second);
    assert_eq!(second, publ.epoch);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.5");
    sub.applied("203.0.113.5").await;
    sub.stop().await;
}

#[tokio::test]
async fn sequence_gaps_are_reported() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "action = \"none\"");
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.6");
    sub.applied("203.0.113.6").await;
    publ.skip(2);
    publ.event("web2", "sshd", Action::Ban, "203.0.113.7");
    let n = sub
        .wait_for("missed", |n| matches!(n, Notice::Missed { .. }))
        .await;
    assert_eq!(
        n,
        Notice::Missed {
            epoch: publ.epoch,
            count: 2
        }
    );
    sub.applied("203.0.113.7").await;
    sub.stop().await;
}

#[tokio::test]
async fn bad_messages_are_dropped_and_the_loop_goes_on() {
    let mut publ = TestPublisher::start(HB);
    let cfg = config("web1", &publ.endpoint, "action = \"none\"");
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    let good = publ.event("web2", "sshd", Action::Ban, "203.0.113.8");
    sub.applied("203.0.113.8").await;
    let payload = f2b_proto::Broadcast::Event(good).encode();
    publ.raw(vec![b"ev:sshd\0".to_vec(), b"{not json".to_vec()]);
    publ.raw(vec![b"ev:sshd\0".to_vec()]);
    publ.raw(vec![
        b"ev:sshd\0".to_vec(),
        payload.clone(),
        b"extra".to_vec(),
    ]);
    publ.raw(vec![b"ev:nginx\0".to_vec(), payload]);
    publ.raw(vec![b"ev:sshd\0".to_vec(), vec![0xff; 100]]);
    // (A frame over MAX_MESSAGE_SIZE makes libzmq drop the connection before it is
    // read at all; f2b-common tests that limit.)
    publ.event("web2", "sshd", Action::Ban, "203.0.113.10");
    sub.applied("203.0.113.10").await;
    sub.stop().await;
}

#[tokio::test]
async fn exec_action_runs_the_command_without_a_shell() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exec.out");
    let mut publ = TestPublisher::start(HB);
    let script = "printf '%s|%s|%s|%s\\n' \"$1\" \"$2\" \"$3\" \"$4\" >> \"$0\"";
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "action = \"exec\"\nban_jail = \"cluster\"\nexec = [\"/bin/sh\", \"-c\", {script:?}, {:?}, \"<action>\", \"<ip>\", \"<jail>\", \"<node> $(id)\"]",
            out.to_str().unwrap()
        ),
    );
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.11");
    publ.event("web3", "sshd", Action::Unban, "2001:db8::11");
    sub.applied("203.0.113.11").await;
    sub.applied("2001:db8::11").await;
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(
        text,
        "ban|203.0.113.11|cluster|web2 $(id)\nunban|2001:db8::11|cluster|web3 $(id)\n"
    );
    sub.stop().await;
}

#[tokio::test]
async fn exec_failures_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ok");
    let mut publ = TestPublisher::start(HB);
    // Fails until the flag file exists.
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "action = \"exec\"\nexec = [\"/bin/sh\", \"-c\", \"test -e \\\"$0\\\" || {{ echo not yet >&2; exit 1; }}\", {:?}]",
            flag.to_str().unwrap()
        ),
    );
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    let logs = Logs::capture();
    publ.event("web2", "sshd", Action::Ban, "203.0.113.12");
    sub.wait_for("failure", |n| matches!(n, Notice::Failed { .. }))
        .await;
    std::fs::write(&flag, "").unwrap();
    sub.applied("203.0.113.12").await;
    let text = logs.text();
    assert!(
        text.contains("action failed, will retry") && text.contains("not yet"),
        "{text}"
    );
    sub.stop().await;
}

#[tokio::test]
async fn log_action_writes_the_documented_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.log");
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!("action = \"log\"\nlog_path = {:?}", path.to_str().unwrap()),
    );
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    let s = publ.event("web2", "sshd", Action::Ban, "203.0.113.13");
    sub.applied("203.0.113.13").await;
    let text = std::fs::read_to_string(&path).unwrap();
    let want = format!(
        " f2b-subscriber[{}]: Ban 203.0.113.13 jail=sshd node=web2 id={} seq={}\n",
        std::process::id(),
        s.event.id,
        s.seq
    );
    assert!(text.ends_with(&want), "{text:?} does not end with {want:?}");
    // 2026-11-21 04:52:53,446 : 23 characters of local time.
    let time = &text[..23];
    assert!(
        time.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b' ',
            13 | 16 => b == b':',
            19 => b == b',',
            _ => b.is_ascii_digit(),
        }),
        "{time:?}"
    );
    sub.stop().await;
}

#[tokio::test]
async fn shutdown_without_a_publisher_is_prompt() {
    // Nothing listens there; the subscriber keeps reconnecting until stopped.
    let cfg = config(
        "web1",
        "tcp://127.0.0.1:1",
        "action = \"none\"\nheartbeat_timeout = \"200ms\"",
    );
    let mut sub = Running::start(&cfg);
    sub.wait_for("link dead", |n| matches!(n, Notice::LinkDead))
        .await;
    let t = std::time::Instant::now();
    sub.stop().await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn shutdown_bounds_an_action_that_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "action = \"exec\"\nexec = [\"/bin/sh\", \"-c\", \"touch \\\"$0\\\"; exec sleep 60\", {:?}]",
            started.to_str().unwrap()
        ),
    );
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.14");
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "exec never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = std::time::Instant::now();
    sub.stop().await;
    let took = t.elapsed();
    assert!(
        took >= f2b_subscriber::DRAIN_TIMEOUT - Duration::from_millis(100)
            && took < f2b_subscriber::DRAIN_TIMEOUT + Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn shutdown_is_prompt_under_a_flood_of_messages() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // A publisher that sends heartbeats as fast as it can: the SUB socket never
    // runs dry, yet the cancellation must still be looked at.
    let ctx = f2b_common::zmq::Context::new();
    let publ = f2b_common::sockets::new_socket(&ctx, f2b_common::zmq::PUB).unwrap();
    publ.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = f2b_common::sockets::last_endpoint(&publ);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let hb = f2b_proto::Broadcast::Heartbeat(f2b_proto::Heartbeat {
                seq: 0,
                epoch: common::random_epoch(),
                interval_ms: 100,
            });
            // Signed: every one is verified, the costly path.
            let frames = common::frames(&hb, Some(&common::test_key()));
            while !stop.load(Ordering::Relaxed) {
                let _ = publ.send_multipart(&frames, f2b_common::zmq::DONTWAIT);
            }
        })
    };
    let cfg = config("web1", &endpoint, "action = \"none\"");
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    // Let the backlog build up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    sub.stop().await;
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
}

/// A runtime dropped while the subscriber runs (a caller's future abandoned, a
/// test that panicked): its shutdown must not wait for the receive loop. When that
/// loop was a blocking thread, it once waited in `zmq::poll` until the dead-link
/// timeout: 10 minutes here (a test that failed after 20 s hung for 620 s). It is
/// a task of the runtime now, dropped with it.
#[test]
fn a_runtime_dropped_under_a_running_subscriber_shuts_down_promptly() {
    let publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        "action = \"none\"\nheartbeat_timeout = \"10m\"",
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut sub = Running::start(&cfg);
            sub.connected().await;
            // The publisher gone, nothing arrives that would show the receive
            // loop that the intake is gone (as in a test that failed while its
            // publisher was down).
            drop(publ);
            sub.wait_for("disconnected", |n| matches!(n, Notice::Disconnected { .. }))
                .await;
            // Leaves with it running: dropping `sub` cancels its token, and
            // `block_on` returns before any other task runs.
        });
        let t = std::time::Instant::now();
        drop(rt);
        let _ = done_tx.send(t.elapsed());
    });
    // Bounded: a runtime that never finishes its shutdown fails the test (its
    // thread is left behind) instead of hanging it.
    let took = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the runtime shut down within 10 s of being dropped");
    thread.join().unwrap();
    assert!(
        took < f2b_subscriber::receiver::MAX_POLL_WAIT + Duration::from_secs(2),
        "{took:?}"
    );
}
