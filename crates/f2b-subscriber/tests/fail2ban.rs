//! The fail2ban-client action against a real, private fail2ban-server (see
//! common/fail2ban.rs). Skipped loudly when fail2ban is not installed, failed then
//! when F2B_REQUIRE_FAIL2BAN=1.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::fail2ban::{available, jail, Server};
use common::{config, Logs, Running, TestPublisher};
use f2b_proto::{Action, Event, EventId, JailName, NodeName};
use f2b_subscriber::action::fail2ban::Fail2banClient;
use f2b_subscriber::pending::Item;
use f2b_subscriber::{Applier, FailureScope, Notice, SkipReason};

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

fn client(server: &Server) -> Fail2banClient {
    Fail2banClient::new("fail2ban-client".into(), Some(server.socket.clone()))
}

#[tokio::test]
async fn fail2ban_client_action_batches_unbans_and_reads_ignoreip() {
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
    let mut c = client(&server);
    let cluster = JailName::new("cluster").unwrap();

    // Several addresses in one call.
    let bans: Vec<Item> = ["203.0.113.5", "203.0.113.6", "2001:db8::1"]
        .iter()
        .map(|ip| item("cluster", ip, Action::Ban))
        .collect();
    c.apply(&cluster, Action::Ban, &bans).await.unwrap();
    assert_eq!(
        server.banned("cluster"),
        ["2001:db8::1", "203.0.113.5", "203.0.113.6"]
    );
    // Banning again is not an error.
    c.apply(&cluster, Action::Ban, &bans[..1]).await.unwrap();

    // Unban, including an address that is not banned (not an error either).
    let unbans = [
        item("cluster", "203.0.113.5", Action::Unban),
        item("cluster", "203.0.113.77", Action::Unban),
    ];
    c.apply(&cluster, Action::Unban, &unbans).await.unwrap();
    assert_eq!(server.banned("cluster"), ["2001:db8::1", "203.0.113.6"]);

    // An unknown jail fails the whole call, with fail2ban-client's own message.
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
    assert!(
        err.message
            .contains("Sorry but the jail 'nojail' does not exist"),
        "{err}"
    );
    let err = c.jail_ignores(&nojail).await.unwrap_err();
    assert_eq!(err.scope, FailureScope::UnknownJail);

    // The jail's ignoreip, host names left out.
    let ign = c.jail_ignores(&cluster).await.unwrap();
    let mut nets: Vec<String> = ign.nets.iter().map(ToString::to_string).collect();
    nets.sort();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.0/24", "198.51.100.7/32"]);
}

#[tokio::test]
async fn fail2ban_server_down_is_a_whole_call_failure() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[jail("cluster", "")]);
    server.stop();
    let mut c = client(&server);
    let cluster = JailName::new("cluster").unwrap();
    let err = c
        .apply(
            &cluster,
            Action::Ban,
            &[item("cluster", "203.0.113.5", Action::Ban)],
        )
        .await
        .unwrap_err();
    assert_eq!(err.scope, FailureScope::Call, "{err}");
    assert!(err.message.contains("Is fail2ban running?"), "{err}");
}

#[tokio::test]
async fn fail2ban_pipeline_applies_bans_and_honours_the_jails_ignoreip() {
    if !available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[jail("cluster", "192.0.2.0/24 localhost")]);
    let mut publ = TestPublisher::start(HB);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "ban_jail = \"cluster\"\nsocket = {:?}",
            server.socket.to_str().unwrap()
        ),
    );
    let logs = Logs::capture();
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    publ.event("web2", "sshd", Action::Ban, "203.0.113.5");
    publ.event("web2", "sshd", Action::Ban, "192.0.2.5");
    publ.event("web3", "nginx", Action::Ban, "203.0.113.6");
    publ.event("web3", "nginx", Action::Ban, "2001:db8::6");
    sub.applied("203.0.113.5").await;
    sub.applied("203.0.113.6").await;
    sub.applied("2001:db8::6").await;
    let skipped: Vec<&Notice> = sub
        .seen
        .iter()
        .filter(|n| matches!(n, Notice::Skipped { .. }))
        .collect();
    let ip: IpAddr = "192.0.2.5".parse().unwrap();
    assert!(
        matches!(skipped[..], [Notice::Skipped { reason: SkipReason::IgnoreIpOfJail, ip: i, .. }] if *i == ip),
        "{skipped:?}"
    );
    assert_eq!(
        server.banned("cluster"),
        ["2001:db8::6", "203.0.113.5", "203.0.113.6"]
    );
    publ.event("web2", "sshd", Action::Unban, "203.0.113.5");
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
    assert_eq!(server.banned("cluster"), ["2001:db8::6", "203.0.113.6"]);
    sub.stop().await;
    let text = logs.text();
    for want in [
        "skipped reason=ignoreip_of_jail ip=192.0.2.5 jail=cluster",
        "applied action=ban jail=cluster ip=203.0.113.5 node=web2 seq=1",
        "applied action=unban jail=cluster ip=203.0.113.5 node=web2 seq=5",
        "ignoreip of the local jail names a host",
    ] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    assert_eq!(
        text.matches("ignoreip of the local jail names a host")
            .count(),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn fail2ban_unknown_jail_is_one_error_and_never_a_crash() {
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
            "ban_jail = \"nojail\"\nsocket = {:?}",
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
        errors[0].contains("local jail does not exist")
            && errors[0].contains("Sorry but the jail 'nojail' does not exist"),
        "{text}"
    );
}

#[tokio::test]
async fn fail2ban_down_then_up_applies_every_pending_ban() {
    if !available() {
        return;
    }
    common::fail2ban::down_then_up_applies_every_pending_ban("", HB).await;
}

#[test]
fn fail2ban_regex_matches_the_log_action_ban_lines() {
    if !available() {
        return;
    }
    use f2b_subscriber::action::log::{format_line, FAILREGEX};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.log");
    let jail = JailName::new("sshd").unwrap();
    let now = chrono::Local::now();
    let text: String = [
        item("sshd", "203.0.113.5", Action::Ban),
        item("sshd", "203.0.113.5", Action::Unban),
        item("sshd", "2001:db8::1", Action::Ban),
    ]
    .iter()
    .map(|i| format_line(now, 4242, &jail, i))
    .collect();
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new("fail2ban-regex")
        .arg("--print-all-matched")
        .arg(&path)
        .arg(FAILREGEX)
        .output()
        .expect("fail2ban-regex runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("Lines: 3 lines, 0 ignored, 2 matched, 1 missed"),
        "{report}"
    );
    // The matched lines are the two Ban lines.
    let matched = report
        .split("Matched line(s):")
        .nth(1)
        .and_then(|r| r.split("Missed line(s):").next())
        .unwrap_or_default();
    assert!(
        matched.contains(": Ban 203.0.113.5 jail=sshd")
            && matched.contains(": Ban 2001:db8::1 jail=sshd")
            && !matched.contains("Unban"),
        "{report}"
    );
}
