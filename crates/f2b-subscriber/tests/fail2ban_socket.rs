//! The fail2ban-socket action against a real, private fail2ban-server (see
//! common/fail2ban.rs). Skipped loudly when fail2ban is not installed, failed then
//! when F2B_REQUIRE_FAIL2BAN=1.

mod common;

use std::time::{Duration, Instant};

use common::fail2ban::{available, jail, Server};
use common::{config, Logs, Running, TestPublisher};
use f2b_proto::{Action, Event, EventId, JailName, NodeName};
use f2b_subscriber::action::fail2ban::Fail2banClient;
use f2b_subscriber::action::socket::Fail2banSocket;
use f2b_subscriber::pending::{Item, MAX_BATCH};
use f2b_subscriber::{Applier, FailureScope, Notice};
use ipnet::IpNet;

const HB: Duration = Duration::from_millis(100);

fn item(jail: &str, ip: &str, action: Action) -> Item {
    Item::new(
        JailName::new(jail).unwrap(),
        Event::new(
            EventId::from_u128(common::unique()),
            NodeName::new("web2").unwrap(),
            JailName::new("sshd").unwrap(),
            action,
            ip.parse().unwrap(),
            1_763_702_000_000,
        )
        .unwrap(),
        1,
    )
}

fn items(jail: &str, ips: &[&str], action: Action) -> Vec<Item> {
    ips.iter().map(|ip| item(jail, ip, action)).collect()
}

#[tokio::test]
async fn fail2ban_socket_action_bans_unbans_reads_ignoreip_and_names_unknown_jails() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[jail(
            "cluster",
            "192.0.2.0/24 198.51.100.7 localhost 10.1.2.3/8",
        )],
    );
    let mut c = Fail2banSocket::new(server.socket.clone());
    let cluster = JailName::new("cluster").unwrap();

    // Several addresses in one call, then again (not an error).
    let bans = items(
        "cluster",
        &["203.0.113.5", "203.0.113.6", "2001:db8::1"],
        Action::Ban,
    );
    c.apply(&cluster, Action::Ban, &bans).await.unwrap();
    assert_eq!(
        server.banned("cluster"),
        ["2001:db8::1", "203.0.113.5", "203.0.113.6"]
    );
    c.apply(&cluster, Action::Ban, &bans[..1]).await.unwrap();

    // Unban, including an address that is not banned.
    let unbans = items("cluster", &["203.0.113.5", "203.0.113.77"], Action::Unban);
    c.apply(&cluster, Action::Unban, &unbans).await.unwrap();
    assert_eq!(server.banned("cluster"), ["2001:db8::1", "203.0.113.6"]);

    // The jail's ignoreip, decoded from the socket's list reply.
    let ignores = c.jail_ignores(&cluster).await.unwrap();
    let mut nets: Vec<String> = ignores.nets.iter().map(IpNet::to_string).collect();
    nets.sort();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.7/32"]);

    // An unknown jail: fail2ban-client's own message, the whole call.
    let nojail = JailName::new("nojail").unwrap();
    let err = c
        .apply(
            &nojail,
            Action::Ban,
            &[item("nojail", "203.0.113.8", Action::Ban)],
        )
        .await
        .unwrap_err();
    assert_eq!(err.scope, FailureScope::UnknownJail);
    assert_eq!(err.message, "Sorry but the jail 'nojail' does not exist");
    let err = c.jail_ignores(&nojail).await.unwrap_err();
    assert_eq!(err.scope, FailureScope::UnknownJail);

    // The connection is still usable after an error reply.
    c.apply(&cluster, Action::Ban, &bans[..1]).await.unwrap();
    assert_eq!(
        server.banned("cluster"),
        ["2001:db8::1", "203.0.113.5", "203.0.113.6"]
    );
}

#[tokio::test]
async fn fail2ban_socket_action_down_is_a_whole_call_failure_then_reconnects() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[jail("cluster", "")]);
    let mut c = Fail2banSocket::new(server.socket.clone());
    let cluster = JailName::new("cluster").unwrap();
    c.apply(
        &cluster,
        Action::Ban,
        &items("cluster", &["203.0.113.1"], Action::Ban),
    )
    .await
    .unwrap();

    // Down: the kept connection is dead and the socket file gone.
    server.stop();
    let err = c
        .apply(
            &cluster,
            Action::Ban,
            &items("cluster", &["203.0.113.5"], Action::Ban),
        )
        .await
        .unwrap_err();
    assert_eq!(err.scope, FailureScope::Call, "{err}");
    assert!(err.message.contains("Is fail2ban running?"), "{err}");

    // Up again: applied over a new connection.
    server.launch();
    c.apply(
        &cluster,
        Action::Ban,
        &items("cluster", &["203.0.113.5", "203.0.113.6"], Action::Ban),
    )
    .await
    .unwrap();
    assert!(server.banned("cluster").contains(&"203.0.113.6".to_owned()));

    // A restart between two calls is not even a failure: the stale kept
    // connection is replaced at once.
    server.restart();
    c.apply(
        &cluster,
        Action::Ban,
        &items("cluster", &["203.0.113.7"], Action::Ban),
    )
    .await
    .unwrap();
    assert!(server.banned("cluster").contains(&"203.0.113.7".to_owned()));
}

#[tokio::test]
async fn fail2ban_socket_pipeline_unknown_jail_is_one_error() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[jail("cluster", "")]);
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "action = \"fail2ban-socket\"\nban_jail = \"nojail\"\nsocket = {:?}",
            server.socket.to_str().unwrap()
        ),
    );
    let logs = Logs::capture();
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.5");
    for _ in 0..2 {
        let n = sub
            .wait_for("failure", |n| matches!(n, Notice::Failed { .. }))
            .await;
        assert!(
            matches!(
                &n,
                Notice::Failed {
                    scope: FailureScope::UnknownJail,
                    ..
                }
            ),
            "{n:?}"
        );
    }
    sub.stop().await;
    let text = logs.text();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(
        errors[0].contains("Sorry but the jail 'nojail' does not exist"),
        "{text}"
    );
}

#[tokio::test]
async fn fail2ban_socket_pipeline_down_then_up_applies_every_pending_ban() {
    if !available() {
        return;
    }
    common::fail2ban::down_then_up_applies_every_pending_ban("action = \"fail2ban-socket\"\n", HB)
        .await;
}

/// 10,000 bans in batches of [`MAX_BATCH`], over the socket and through
/// fail2ban-client, into a real server. Prints the times; asserts only that every
/// ban arrived. Slow (fail2ban-server itself takes seconds): run with
/// `cargo test -p f2b-subscriber --test fail2ban_socket -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn fail2ban_measure_10000_bans_socket_vs_client() {
    if !available() {
        return;
    }
    const N: u32 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[jail("viasocket", ""), jail("viaclient", "")]);
    let ips: Vec<String> = (0..N)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff))
        .collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();

    let mut results = Vec::new();
    for (name, mut applier) in [
        (
            "viasocket",
            Box::new(Fail2banSocket::new(server.socket.clone())) as Box<dyn Applier>,
        ),
        (
            "viaclient",
            Box::new(Fail2banClient::new(
                "fail2ban-client".into(),
                Some(server.socket.clone()),
            )),
        ),
    ] {
        let jail = JailName::new(name).unwrap();
        let all = items(name, &refs, Action::Ban);
        let start = Instant::now();
        let mut calls = 0;
        for batch in all.chunks(MAX_BATCH) {
            applier.apply(&jail, Action::Ban, batch).await.unwrap();
            calls += 1;
        }
        let took = start.elapsed();
        assert_eq!(server.banned(name).len(), N as usize);
        results.push((applier.name(), calls, took));
    }
    // One address per call, for the per-call cost: 200 calls each.
    for (name, mut applier) in [
        (
            "viasocket",
            Box::new(Fail2banSocket::new(server.socket.clone())) as Box<dyn Applier>,
        ),
        (
            "viaclient",
            Box::new(Fail2banClient::new(
                "fail2ban-client".into(),
                Some(server.socket.clone()),
            )),
        ),
    ] {
        let jail = JailName::new(name).unwrap();
        let singles: Vec<Item> = (0..200u32)
            .map(|i| {
                item(
                    name,
                    &format!("172.16.{}.{}", i >> 8, i & 0xff),
                    Action::Ban,
                )
            })
            .collect();
        let start = Instant::now();
        for one in singles.chunks(1) {
            applier.apply(&jail, Action::Ban, one).await.unwrap();
        }
        results.push((applier.name(), 200, start.elapsed()));
    }
    for (name, calls, took) in results {
        eprintln!(
            "MEASURE {name}: {calls} calls in {took:?} ({:?} per call)",
            took / calls
        );
    }
}
