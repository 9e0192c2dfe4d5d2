//! End to end with real fail2ban: four nodes on loopback, each with its own private
//! fail2ban-server (1.0.2, the project's `fail2ban/` files verbatim, a no-op ban
//! action), an `f2b-monitor` reading that server's log and an `f2b-subscriber`
//! applying bans with fail2ban-client on that server's socket, in the `cluster` jail
//! (`ban_jail = "cluster"`, `ignore_jails = ["cluster"]`), and one publisher.
//!
//! Every test is named `fail2ban_*`: scripts/test skips them, loudly, where
//! fail2ban cannot be installed. Every fail2ban-server and daemon is stopped when a
//! test ends, failed or not (drop guards).

use std::path::PathBuf;
use std::time::Duration;

use f2b_tests::cluster::{append_lines, TestDir};
use f2b_tests::fail2ban;
use f2b_tests::logline::sshd_failed_password;
use f2b_tests::wait;
use f2b_tests::{
    Fail2ban, JailConf, Node, NodeAction, NodeOptions, Publisher, PublisherOptions, TIMEOUT,
};

/// Failed logins before the sshd jail bans.
const MAXRETRY: u32 = 3;

/// One node: its fail2ban-server and its daemons. The daemons are dropped (stopped)
/// before the server.
struct E2eNode {
    node: Node,
    f2b: Fail2ban,
    auth_log: PathBuf,
}

impl E2eNode {
    /// `[sshd] Ban <ip>`-style lines for `ip` in this node's fail2ban log, any jail.
    fn ban_lines(&self, ip: &str) -> usize {
        self.f2b
            .count_log(&format!(r"NOTICE  \[[^\]]+\] Ban {}$", regex::escape(ip)))
    }

    fn ban_lines_in(&self, jail: &str, ip: &str) -> usize {
        self.f2b.count_log(&format!(
            r"NOTICE  \[{}\] Ban {}$",
            regex::escape(jail),
            regex::escape(ip)
        ))
    }

    /// Appends `n` failed ssh logins from `ip` to the node's auth log.
    fn attack(&self, ip: &str, n: u32) {
        let lines: Vec<String> = (0..n).map(|_| sshd_failed_password(ip)).collect();
        append_lines(&self.auth_log, &lines);
    }

    /// Waits until this node's monitor has dropped the echo of a remote ban (the
    /// `[cluster] Ban ip` line its fail2ban wrote when the subscriber applied it).
    fn wait_echo_ignored(&self, ip: &str) {
        self.node.monitor().wait_for_event(
            "ignored",
            &[("reason", "ignore_jails"), ("jail", "cluster"), ("ip", ip)],
            TIMEOUT,
        );
    }
}

struct E2e {
    publisher: Publisher,
    nodes: Vec<E2eNode>,
    _dir: TestDir,
}

/// Per-node customisation: extra jail sections for its fail2ban.
type Extra = fn(&str) -> Vec<JailConf>;

impl E2e {
    fn start(names: &[&str]) -> E2e {
        E2e::start_with(names, |_| Vec::new())
    }

    fn start_with(names: &[&str], extra: Extra) -> E2e {
        fail2ban::require();
        let dir = TestDir::new();
        // A thousand bans from one node: the hub's limits would hold them back.
        let publisher = Publisher::start_with(
            &dir.sub("hub"),
            PublisherOptions::default().without_hub_limits(),
        );
        // The servers start in parallel (each is a Python start-up), the daemons
        // after them.
        let servers: Vec<(Fail2ban, PathBuf)> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    let node_dir = dir.sub(name);
                    s.spawn(move || {
                        let auth_log = node_dir.join("auth.log");
                        append_lines::<&str>(&auth_log, &[]);
                        let mut jails = vec![JailConf::sshd(&auth_log, MAXRETRY)];
                        jails.extend(extra(name));
                        (
                            Fail2ban::start(&node_dir.join("fail2ban"), &jails),
                            auth_log,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let nodes = names
            .iter()
            .zip(servers)
            .map(|(name, (f2b, auth_log))| {
                let node = Node::start(
                    dir.path(),
                    name,
                    &publisher,
                    NodeOptions {
                        log_path: Some(f2b.log_path().to_owned()),
                        ignore_jails: vec!["cluster".into()],
                        ban_jail: Some("cluster".into()),
                        action: NodeAction::Fail2banClient {
                            socket: f2b.socket().to_owned(),
                        },
                        ..NodeOptions::default()
                    },
                );
                E2eNode {
                    node,
                    f2b,
                    auth_log,
                }
            })
            .collect();
        E2e {
            publisher,
            nodes,
            _dir: dir,
        }
    }

    fn node(&self, name: &str) -> &E2eNode {
        self.nodes
            .iter()
            .find(|n| n.node.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn others(&self, name: &str) -> impl Iterator<Item = &E2eNode> {
        let name = name.to_owned();
        self.nodes.iter().filter(move |n| n.node.name != name)
    }
}

impl Drop for E2e {
    /// Stops every fail2ban-server at once (a stop takes most of a second); the
    /// fields' own drops then stop the daemons and reap the servers.
    fn drop(&mut self) {
        std::thread::scope(|s| {
            for n in &self.nodes {
                s.spawn(|| n.f2b.request_stop());
            }
        });
    }
}

const NODES: [&str; 4] = ["node-a", "node-b", "node-c", "node-d"];

/// Failed ssh logins on node A: A's fail2ban bans (sshd jail), and every other
/// node's fail2ban lists the address in its `cluster` jail. A does not ban it a
/// second time: its subscriber skips its own event, its cluster jail stays empty.
#[test]
fn fail2ban_attack_on_one_node_is_banned_on_every_node() {
    let c = E2e::start(&NODES);
    let a = c.node("node-a");
    let ip = "203.0.113.5";
    a.attack(ip, MAXRETRY);
    a.f2b.wait_banned("sshd", ip);
    for n in c.others("node-a") {
        n.f2b.wait_banned("cluster", ip);
    }
    a.node
        .subscriber()
        .wait_for_event("skipped", &[("reason", "own_node"), ("ip", ip)], TIMEOUT);
    assert!(
        !a.f2b.banned("cluster").iter().any(|b| b == ip),
        "the origin banned its own ban again in its cluster jail"
    );
    assert_eq!(a.ban_lines_in("sshd", ip), 1);
    assert_eq!(a.ban_lines(ip), 1, "{}", a.f2b.log_tail(40));
}

/// Loop prevention, counted: one attack on A gives exactly one broadcast, and
/// exactly one Ban line in each node's fail2ban log, once every echo (the `[cluster]
/// Ban` line of each receiving node) has been read and dropped by that node's
/// monitor.
#[test]
fn fail2ban_one_attack_one_broadcast_one_ban_per_node() {
    let c = E2e::start(&NODES);
    let a = c.node("node-a");
    let ip = "198.51.100.23";
    // The attack goes on after the ban ("already banned").
    a.attack(ip, MAXRETRY);
    a.f2b.wait_banned("sshd", ip);
    a.attack(ip, 2);
    for n in c.others("node-a") {
        n.f2b.wait_banned("cluster", ip);
        n.wait_echo_ignored(ip);
    }
    a.node
        .subscriber()
        .wait_for_event("skipped", &[("reason", "own_node"), ("ip", ip)], TIMEOUT);
    a.f2b.wait_log(r"\[sshd\] Found 198\.51\.100\.23", 5);

    let broadcasts = c.publisher.broadcasts_of(ip);
    assert_eq!(broadcasts.len(), 1, "{broadcasts:#?}");
    for n in &c.nodes {
        assert_eq!(
            n.ban_lines(ip),
            1,
            "{}: {}",
            n.node.name,
            n.f2b.log_tail(40)
        );
    }
    for n in c.others("node-a") {
        assert_eq!(n.ban_lines_in("cluster", ip), 1);
    }
}

/// The same address then attacks node C, which already holds it in its cluster
/// jail: C's sshd bans it too and C's monitor reports that, but the publisher
/// answers `unchanged` (the cluster already has it banned in that jail) and
/// broadcasts nothing: the state backstop of loop prevention.
#[test]
fn fail2ban_second_local_ban_of_a_banned_address_is_not_rebroadcast() {
    let c = E2e::start(&NODES[..3]);
    let (a, node_c) = (c.node("node-a"), c.node("node-c"));
    let ip = "198.51.100.24";
    a.attack(ip, MAXRETRY);
    node_c.f2b.wait_banned("cluster", ip);
    node_c.attack(ip, MAXRETRY);
    node_c.f2b.wait_banned("sshd", ip);
    node_c.node.monitor().wait_for_event(
        "reported",
        &[("action", "ban"), ("ip", ip), ("status", "unchanged")],
        TIMEOUT,
    );
    assert_eq!(c.publisher.broadcasts_of(ip).len(), 1);
}

/// A manual `fail2ban-client unbanip` on A unbans the address on every node; a
/// restart of A's fail2ban (which logs an Unban for every active ban) unbans nothing
/// elsewhere.
#[test]
fn fail2ban_manual_unban_travels_but_a_restart_does_not() {
    let mut c = E2e::start(&NODES);
    let (x, y) = ("203.0.113.31", "203.0.113.32");
    {
        let a = c.node("node-a");
        a.attack(x, MAXRETRY);
        a.attack(y, MAXRETRY);
        for n in c.others("node-a") {
            n.f2b.wait_banned("cluster", x);
            n.f2b.wait_banned("cluster", y);
        }
    }

    // Restart A's fail2ban: a stop (Unban x, Unban y), a start (Restore Ban x, y).
    let mark = c.node("node-a").node.monitor().mark();
    c.nodes[0].f2b.restart();
    let a = c.node("node-a");
    assert_eq!(a.node.name, "node-a");
    a.f2b.wait_banned("sshd", x);
    let m = a.node.monitor();
    for ip in [x, y] {
        let unban =
            m.wait_for_event_after(mark, "ignored", &[("action", "unban"), ("ip", ip)], TIMEOUT);
        let reason = f2b_tests::field(&unban, "reason").unwrap_or_default();
        assert!(
            reason == "server_stopping" || reason == "jail_stopping",
            "unexpected reason in {unban:?}"
        );
    }
    // Both Restore Ban lines were read (and are not reported: not new bans).
    m.wait_for_count(r": ignored reason=restore_ban ", 2, TIMEOUT);
    for n in c.others("node-a") {
        for ip in [x, y] {
            assert!(
                n.f2b.banned("cluster").iter().any(|b| b == ip),
                "{}: {ip} was unbanned by node-a's restart",
                n.node.name
            );
        }
    }
    assert!(c
        .publisher
        .process()
        .events("broadcast", &[("action", "unban")])
        .is_empty());

    // A manual unban of x on A: every node unbans x, and keeps y.
    a.f2b.unban("sshd", &[x]);
    for n in c.others("node-a") {
        n.f2b.wait_not_banned("cluster", x);
        assert!(n.f2b.banned("cluster").iter().any(|b| b == y));
    }
    assert_eq!(
        c.publisher
            .process()
            .events("broadcast", &[("action", "unban")])
            .len(),
        1
    );
}

/// The `cluster` jail's own `ignoreip` on node B is honoured (fail2ban-client banip
/// would bypass it): B refuses the ban, logged as skipped, the other nodes ban.
#[test]
fn fail2ban_cluster_jail_ignoreip_is_honoured() {
    let c = E2e::start_with(&NODES, |name| {
        if name == "node-b" {
            vec![JailConf::new("cluster").set("ignoreip", "127.0.0.1/8 ::1 198.51.100.0/24")]
        } else {
            Vec::new()
        }
    });
    let a = c.node("node-a");
    let ip = "198.51.100.77";
    a.attack(ip, MAXRETRY);
    for name in ["node-c", "node-d"] {
        c.node(name).f2b.wait_banned("cluster", ip);
    }
    let b = c.node("node-b");
    b.node.subscriber().wait_for_event(
        "skipped",
        &[("reason", "ignoreip_of_jail"), ("ip", ip)],
        TIMEOUT,
    );
    assert!(
        b.f2b.banned("cluster").is_empty(),
        "{:?}",
        b.f2b.banned("cluster")
    );
    assert_eq!(b.ban_lines(ip), 0);
}

/// An IPv6 attacker, end to end.
#[test]
fn fail2ban_ipv6_attacker_is_banned_everywhere() {
    let c = E2e::start(&NODES);
    let a = c.node("node-a");
    let ip = "2001:db8::bad:1";
    a.attack("2001:DB8:0:0::BAD:1", MAXRETRY);
    a.f2b.wait_banned("sshd", ip);
    for n in c.others("node-a") {
        n.f2b.wait_banned("cluster", ip);
    }
    assert_eq!(c.publisher.broadcasts_of(ip).len(), 1);
}

/// 1,000 distinct addresses banned on A in one `banip` call reach every other node's
/// fail2ban, all of them; the subscribers batch them (far fewer fail2ban-client
/// calls than addresses).
#[test]
fn fail2ban_burst_of_a_thousand_bans_reaches_every_node_in_batches() {
    const N: usize = 1000;
    let c = E2e::start(&NODES);
    let a = c.node("node-a");
    let ips: Vec<String> = (0..N)
        .map(|i| format!("198.18.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    a.f2b.ban("sshd", &refs);
    assert_eq!(a.f2b.banned("sshd").len(), N);

    let deadline = Duration::from_secs(120);
    for n in c.others("node-a") {
        wait::until(
            &format!("{N} addresses in {}'s cluster jail", n.node.name),
            deadline,
            || (n.f2b.banned("cluster").len() >= N).then_some(()),
            || {
                format!(
                    "{} has {} of {N}\n{}",
                    n.node.name,
                    n.f2b.banned("cluster").len(),
                    n.f2b.log_tail(20)
                )
            },
        );
        let mut banned = n.f2b.banned("cluster");
        banned.sort();
        let mut want = ips.clone();
        want.sort();
        assert_eq!(banned, want, "{}", n.node.name);

        let calls = n.node.client_calls();
        let banip_calls = calls.iter().filter(|l| l.contains(" banip ")).count();
        assert!(
            banip_calls * 4 <= N,
            "{}: {banip_calls} banip calls for {N} addresses: not batched",
            n.node.name
        );
        eprintln!(
            "{}: {N} bans in {banip_calls} banip calls ({} fail2ban-client calls in all)",
            n.node.name,
            calls.len()
        );
    }
    assert_eq!(c.publisher.process().events("broadcast", &[]).len(), N);
}

/// Node B's fail2ban-server is down for a while: B's subscriber keeps the bans it
/// cannot apply and applies them all when the server is back; none is lost.
#[test]
fn fail2ban_bans_wait_for_a_stopped_server_and_none_is_lost() {
    let mut c = E2e::start(&NODES[..3]);
    let b_index = 1;
    assert_eq!(c.nodes[b_index].node.name, "node-b");
    let mark = c.nodes[b_index].node.subscriber().mark();
    c.nodes[b_index].f2b.stop();

    let a = c.node("node-a");
    let ips = ["192.0.2.61", "192.0.2.62", "192.0.2.63", "2001:db8::63"];
    a.attack(ips[0], MAXRETRY);
    a.f2b.ban("sshd", &ips[1..]);
    let node_c = c.node("node-c");
    for ip in ips {
        node_c.f2b.wait_banned("cluster", ip);
    }
    let b = c.node("node-b");
    b.node
        .subscriber()
        .wait_for_event_after(mark, "action failed, will retry", &[], TIMEOUT);
    assert!(b.node.subscriber().is_running());

    c.nodes[b_index].f2b.start_again();
    let b = c.node("node-b");
    for ip in ips {
        b.f2b.wait_banned("cluster", ip);
    }
    for ip in ips {
        b.node
            .subscriber()
            .wait_for_event_after(mark, "applied", &[("ip", ip)], TIMEOUT);
    }
}

/// `[subscriber] action = "log"` with the shipped `[fail2ban-cluster-log]` jail: the
/// real subscriber's lines, read by fail2ban through the shipped filter, ban the
/// address (IPv4 and IPv6); its Unban lines unban nothing.
#[test]
fn fail2ban_log_action_feeds_the_shipped_log_jail() {
    fail2ban::require();
    let dir = TestDir::new();
    let publisher = Publisher::start(&dir.sub("hub"));
    let origin = Node::start(
        dir.path(),
        "node-a",
        &publisher,
        NodeOptions {
            subscriber: false,
            ..NodeOptions::default()
        },
    );
    let b_dir = dir.sub("node-b");
    let cluster_log = b_dir.join("fail2ban-cluster.log");
    append_lines::<&str>(&cluster_log, &[]);
    let f2b = Fail2ban::start(
        &b_dir.join("fail2ban"),
        &[JailConf::new("fail2ban-cluster-log")
            .set("enabled", "true")
            .set("logpath", cluster_log.to_string_lossy())],
    );
    let receiver = Node::start(
        dir.path(),
        "node-b",
        &publisher,
        NodeOptions {
            monitor: false,
            action: NodeAction::Log {
                path: cluster_log.clone(),
            },
            ..NodeOptions::default()
        },
    );
    origin.append_log(&[
        f2b_tests::logline::ban("sshd", "203.0.113.41"),
        f2b_tests::logline::ban("sshd", "2001:db8::41"),
    ]);
    f2b.wait_banned("fail2ban-cluster-log", "203.0.113.41");
    f2b.wait_banned("fail2ban-cluster-log", "2001:db8::41");

    origin.append_log(&[f2b_tests::logline::unban("sshd", "203.0.113.41")]);
    receiver.subscriber().wait_for_event(
        "applied",
        &[("action", "unban"), ("ip", "203.0.113.41")],
        TIMEOUT,
    );
    let lines = f2b_tests::cluster::read_lines(&cluster_log);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].contains(": Ban 203.0.113.41 jail=sshd node=node-a "),
        "{lines:#?}"
    );
    assert!(
        lines[2].contains(": Unban 203.0.113.41 jail=sshd node=node-a "),
        "{lines:#?}"
    );
    // A later ban proves fail2ban read past the Unban line, and kept the ban.
    origin.append_log(&[f2b_tests::logline::ban("sshd", "203.0.113.42")]);
    f2b.wait_banned("fail2ban-cluster-log", "203.0.113.42");
    assert!(f2b
        .banned("fail2ban-cluster-log")
        .iter()
        .any(|b| b == "203.0.113.41"));
}
