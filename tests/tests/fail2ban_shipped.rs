//! The shipped fail2ban files (`fail2ban/`) in a real, private fail2ban-server, and
//! the fail2ban harness itself. Needs fail2ban (tests named `fail2ban_*`).

use f2b_tests::cluster::{append_lines, TestDir};
use f2b_tests::fail2ban::{self, shipped};
use f2b_tests::logline;
use f2b_tests::{Fail2ban, JailConf};

/// The shipped jail file loads as is: `[cluster]` is enabled with the cluster's
/// bantime, takes manual bans (IPv4 and IPv6) and bans nothing on its own;
/// `[fail2ban-cluster-log]` is disabled.
#[test]
fn fail2ban_shipped_cluster_jail_loads_and_takes_bans() {
    fail2ban::require();
    let dir = TestDir::new();
    let f2b = Fail2ban::start(&dir.sub("node"), &[]);
    let status = f2b.client_ok(&["status"]);
    assert!(status.contains("cluster"), "{status}");
    assert!(
        !status.contains("fail2ban-cluster-log"),
        "the log jail must be disabled by default: {status}"
    );
    assert_eq!(f2b.client_ok(&["get", "cluster", "bantime"]).trim(), "600");
    assert_eq!(
        f2b.client_ok(&["get", "cluster", "failregex"]).trim(),
        "No regular expression is defined",
        "the cluster jail must never match a log line"
    );
    assert!(f2b.banned("cluster").is_empty());
    f2b.ban("cluster", &["203.0.113.5", "2001:db8::dead:beef"]);
    let banned = f2b.banned("cluster");
    assert_eq!(banned, ["203.0.113.5", "2001:db8::dead:beef"]);
    f2b.unban("cluster", &["203.0.113.5"]);
    assert_eq!(f2b.banned("cluster"), ["2001:db8::dead:beef"]);
    assert_eq!(f2b.count_log(r"NOTICE  \[cluster\] Ban 203\.0\.113\.5$"), 1);
}

/// The shipped log filter matches the Ban lines of the subscriber's `log` action and
/// nothing else, checked with fail2ban-regex.
#[test]
fn fail2ban_regex_checks_the_log_filter() {
    fail2ban::require();
    let dir = TestDir::new();
    let log = dir.path().join("fail2ban-cluster.log");
    let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
    let id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
    append_lines(
        &log,
        &[
            format!("{now},446 f2b-subscriber[1234]: Ban 203.0.113.5 jail=sshd node=web1 id={id} seq=42"),
            format!("{now},447 f2b-subscriber[1234]: Ban 2001:db8::dead:beef jail=nginx-http-auth node=web-2 id={id} seq=43"),
            format!("{now},448 f2b-subscriber[1234]: Unban 203.0.113.5 jail=sshd node=web1 id={id} seq=44"),
            format!("{now},449 f2b-subscriber[1234]: Ban example.org jail=sshd node=web1 id={id} seq=45"),
            format!("{now},450 someone-else[1234]: Ban 192.0.2.1 jail=sshd node=web1 id={id} seq=46"),
        ],
    );
    let filter = shipped("filter.d")
        .into_iter()
        .find(|p| p.ends_with("fail2ban-cluster.conf"))
        .expect("filter.d/fail2ban-cluster.conf is shipped");
    let out = std::process::Command::new("fail2ban-regex")
        .arg(&log)
        .arg(&filter)
        .output()
        .expect("run fail2ban-regex");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Lines: 5 lines, 0 ignored, 2 matched, 3 missed"),
        "{text}"
    );
}

/// `[fail2ban-cluster-log]`, enabled, bans from a log written in the `log` action's
/// format.
#[test]
fn fail2ban_log_jail_bans_from_the_log_actions_lines() {
    fail2ban::require();
    let dir = TestDir::new();
    let node = dir.sub("node");
    let log = node.join("fail2ban-cluster.log");
    append_lines::<&str>(&log, &[]);
    let f2b = Fail2ban::start(
        &node,
        &[JailConf::new("fail2ban-cluster-log")
            .set("enabled", "true")
            .set("logpath", log.to_string_lossy())],
    );
    let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
    append_lines(
        &log,
        &[
            format!("{now},446 f2b-subscriber[77]: Ban 198.51.100.7 jail=sshd node=web1 id=6f9619ff-8b86-d011-b42d-00cf4fc964ff seq=1"),
            format!("{now},447 f2b-subscriber[77]: Ban 2001:db8::7 jail=sshd node=web1 id=6f9619ff-8b86-d011-b42d-00cf4fc964fe seq=2"),
        ],
    );
    f2b.wait_banned("fail2ban-cluster-log", "198.51.100.7");
    f2b.wait_banned("fail2ban-cluster-log", "2001:db8::7");
    assert_eq!(
        f2b.client_ok(&["get", "fail2ban-cluster-log", "bantime"])
            .trim(),
        "600"
    );
}

/// The harness's private server: the stock sshd filter bans after maxretry failed
/// logins; a stop logs `Flush ticket(s)`, one Unban per ban, `Jail 'x' stopped` (the
/// sequence the monitor must recognise); a start restores the bans.
#[test]
fn fail2ban_private_server_bans_stops_and_restores() {
    fail2ban::require();
    let dir = TestDir::new();
    let node = dir.sub("node");
    let auth = node.join("auth.log");
    append_lines::<&str>(&auth, &[]);
    let mut f2b = Fail2ban::start(&node, &[JailConf::sshd(&auth, 3)]);
    let attacker = "203.0.113.77";
    append_lines(
        &auth,
        &[
            logline::sshd_failed_password(attacker),
            logline::sshd_failed_password(attacker),
        ],
    );
    f2b.wait_log(r"\[sshd\] Found 203\.0\.113\.77", 2);
    assert!(f2b.banned("sshd").is_empty(), "banned before maxretry");
    append_lines(&auth, &[logline::sshd_failed_password(attacker)]);
    f2b.wait_banned("sshd", attacker);
    f2b.ban("cluster", &["192.0.2.44"]);

    f2b.restart();
    let log = f2b.log_lines();
    let pos = |pat: &str| {
        let re = regex::Regex::new(pat).unwrap();
        log.iter()
            .position(|l| re.is_match(l))
            .unwrap_or_else(|| panic!("no line matching {pat:?} in\n{}", log.join("\n")))
    };
    let flush = pos(r"NOTICE  \[sshd\] Flush ticket\(s\) with f2b-test-noop$");
    let unban = pos(r"NOTICE  \[sshd\] Unban 203\.0\.113\.77$");
    let stopped = pos(r"INFO    Jail 'sshd' stopped$");
    assert!(flush < unban && unban < stopped, "{}", log.join("\n"));
    pos(r"NOTICE  \[cluster\] Unban 192\.0\.2\.44$");
    f2b.wait_log(r"NOTICE  \[sshd\] Restore Ban 203\.0\.113\.77$", 1);
    f2b.wait_log(r"NOTICE  \[cluster\] Restore Ban 192\.0\.2\.44$", 1);
    assert_eq!(f2b.banned("cluster"), ["192.0.2.44"]);
}
