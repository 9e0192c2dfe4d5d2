//! `legacy = true`: following a fail2ban-zmq-tools publisher, a PUB socket that
//! sends one-frame `host|jail|action|ip` text messages, no topic, no heartbeats.

mod common;

use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::hub::{start_counting as start, Counting};
use common::{config, Logs, Running};
use f2b_common::zmq;
use f2b_proto::Action;
use f2b_subscriber::{Notice, SkipReason};

/// An old publisher: a PUB socket on an ephemeral port, owned by a thread that
/// sends what it is told.
struct OldPublisher {
    endpoint: String,
    cmd: std_mpsc::Sender<Vec<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl OldPublisher {
    fn start() -> OldPublisher {
        let (cmd, rx) = std_mpsc::channel::<Vec<Vec<u8>>>();
        let (ep_tx, ep_rx) = std_mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let publ = ctx.socket(zmq::PUB).unwrap();
            publ.set_linger(0).unwrap();
            publ.bind("tcp://127.0.0.1:*").unwrap();
            ep_tx
                .send(f2b_common::sockets::last_endpoint(&publ))
                .unwrap();
            while let Ok(frames) = rx.recv() {
                publ.send_multipart(frames, 0).unwrap();
            }
        });
        OldPublisher {
            endpoint: ep_rx.recv().unwrap(),
            cmd,
            thread: Some(thread),
        }
    }

    fn send(&self, text: &str) {
        self.cmd.send(vec![text.as_bytes().to_vec()]).unwrap();
    }

    fn send_frames(&self, frames: &[&[u8]]) {
        self.cmd
            .send(frames.iter().map(|f| f.to_vec()).collect())
            .unwrap();
    }
}

impl Drop for OldPublisher {
    fn drop(&mut self) {
        let (dead, _) = std_mpsc::channel();
        drop(std::mem::replace(&mut self.cmd, dead));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the subscription is live: sends a message of the subscriber's own
/// host until it comes back as skipped (a PUB drops what it sends before it has
/// the subscription).
async fn wait_live(publ: &OldPublisher, sub: &mut Running) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        publ.send("web1|sshd|Ban|192.0.2.200");
        let got = tokio::time::timeout(
            Duration::from_millis(100),
            sub.wait_for("own node skipped", |n| {
                matches!(
                    n,
                    Notice::Skipped {
                        reason: SkipReason::OwnNode,
                        ..
                    }
                )
            }),
        )
        .await;
        if got.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription never became live"
        );
    }
}

#[tokio::test]
async fn old_publisher_messages_are_applied_like_events() {
    let publ = OldPublisher::start();
    // A short dead-link timeout that must not apply: the old publisher sends no
    // heartbeats.
    let cfg = config(
        "web1",
        &publ.endpoint,
        "legacy = true\nban_jail = \"cluster\"\nheartbeat_timeout = \"200ms\"",
    );
    let applier = Counting::default();
    let logs = Logs::capture();
    let mut sub = start(&cfg, &applier);
    match sub
        .wait_for("connected", |n| matches!(n, Notice::LegacyConnected { .. }))
        .await
    {
        Notice::LegacyConnected { publisher } => assert_eq!(publisher, publ.endpoint),
        n => panic!("{n:?}"),
    }
    wait_live(&publ, &mut sub).await;

    // Invalid messages are dropped; none of them produces a notice.
    for bad in [
        "web2|sshd|Drop|10.1",
        "garbage",
        "web2||Ban|10.1",
        "web2|sshd|Ban|2001:db8::1",
        "-web2|sshd|Ban|10.1",
        "web2|ss hd|Ban|10.1",
        "{\"v\":1,\"type\":\"event\"}",
    ] {
        publ.send(bad);
    }
    publ.send_frames(&[b"ev:sshd\0", b"web2|sshd|Ban|10.9"]);
    // The own host, whatever its case.
    publ.send("WEB1|sshd|Ban|10.2");
    publ.send("web2|sshd|Ban|10.1");
    publ.send("web3.example.org|nginx|UnBan|192.0.2.7|extra");

    let n = sub
        .wait_for("applied 10.0.0.1", |n| matches!(n, Notice::Applied { .. }))
        .await;
    match n {
        Notice::Applied {
            action,
            jail,
            ip,
            seq,
        } => {
            assert_eq!(action, Action::Ban);
            assert_eq!(jail.as_str(), "cluster");
            assert_eq!(ip.to_string(), "10.0.0.1");
            assert_eq!(seq, 0);
        }
        n => panic!("{n:?}"),
    }
    sub.applied("192.0.2.7").await;
    // Between the probe and the first application: only the own-host skip.
    let own: Vec<&Notice> = sub
        .seen
        .iter()
        .skip_while(|n| !matches!(n, Notice::Skipped { .. }))
        .filter(|n| matches!(n, Notice::Skipped { ip, .. } if ip.to_string() == "10.0.0.2"))
        .collect();
    assert_eq!(own.len(), 1, "{:#?}", sub.seen);

    // Quiet for longer than heartbeat_timeout: the link is not declared dead.
    tokio::time::sleep(Duration::from_millis(600)).await;
    publ.send("web2|sshd|Ban|198.51.100.1");
    sub.applied("198.51.100.1").await;
    assert!(
        !sub.seen.iter().any(|n| matches!(n, Notice::LinkDead)),
        "{:#?}",
        sub.seen
    );
    sub.stop().await;

    assert_eq!(
        applier.calls(),
        [
            ("cluster".into(), Action::Ban, "10.0.0.1".parse().unwrap()),
            (
                "cluster".into(),
                Action::Unban,
                "192.0.2.7".parse().unwrap()
            ),
            (
                "cluster".into(),
                Action::Ban,
                "198.51.100.1".parse().unwrap()
            ),
        ]
    );
    let text = logs.text();
    assert!(
        text.contains(&format!(
            "connected publisher={} legacy=true",
            publ.endpoint
        )),
        "{text}"
    );
    assert!(
        text.contains("applied action=ban jail=cluster ip=10.0.0.1 node=web2 seq=0"),
        "{text}"
    );
    assert!(text.contains("bad message dropped"), "{text}");
}

#[tokio::test]
async fn a_jail_filter_applies_to_old_messages() {
    let publ = OldPublisher::start();
    let cfg = config("web1", &publ.endpoint, "legacy = true\njails = [\"sshd\"]");
    let applier = Counting::default();
    let _logs = Logs::capture();
    let mut sub = start(&cfg, &applier);
    wait_live(&publ, &mut sub).await;
    publ.send("web2|nginx|Ban|192.0.2.1");
    publ.send("web2|sshd|Ban|192.0.2.2");
    sub.applied("192.0.2.2").await;
    sub.stop().await;
    assert_eq!(applier.calls().len(), 1, "{:?}", applier.calls());
}
