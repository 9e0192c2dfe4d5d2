//! The parser against every line of real fail2ban logs (tests/data), plus the
//! forms the samples do not cover.

use f2b_monitor::parse::{parse_line, Kind, Level, ServerNote};

fn render(line: &str) -> String {
    let Some(e) = parse_line(line) else {
        return "-".into();
    };
    match e.kind {
        Kind::Event { jail, action, ip } => format!("{action} {jail} {ip}"),
        Kind::Skipped { jail, reason } => format!("skip {jail} {reason}"),
        Kind::Flush { jail } => format!("flush {jail}"),
        Kind::Found { jail } => format!("found {jail}"),
        Kind::JailNote { jail } => format!("note {jail}"),
        Kind::JailStarted { jail } => format!("started {jail}"),
        Kind::JailStopped { jail } => format!("stopped {jail}"),
        Kind::Server(ServerNote::Starting) => "server starting".into(),
        Kind::Server(ServerNote::Stopping) => "server stopping".into(),
        Kind::Server(ServerNote::Exited) => "server exited".into(),
        Kind::Server(ServerNote::Reloaded) => "server reloaded".into(),
        Kind::Other => "other".into(),
    }
}

/// Checks every line of `file`: the listed line numbers must render as given,
/// every other line as "other" (a fail2ban line of no interest).
fn check_file(file: &str, expected: &[(usize, &str)]) {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect(&path);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() > 5, "{path} is nearly empty");
    for &(n, _) in expected {
        assert!(n >= 1 && n <= lines.len(), "{file}: no line {n}");
    }
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let want = expected
            .iter()
            .find(|(m, _)| *m == n)
            .map_or("other", |(_, w)| w);
        assert_eq!(render(line), want, "{file}:{n}: {line}");
    }
}

#[test]
fn shared_sample_1_0_2() {
    check_file(
        "fail2ban-1.0.2.log",
        &[
            (1, "started sshd-test"),
            (2, "found sshd-test"),
            (3, "found sshd-test"),
            (4, "note sshd-test"),
            (5, "note sshd-test"),
            (6, "ban sshd-test 203.0.113.5"),
            (7, "ban sshd-test 2001:db8::dead:beef"),
            (8, "skip sshd-test already_banned"),
            (9, "ban manual 198.51.100.10"),
            (10, "unban manual 198.51.100.10"),
            (11, "unban sshd-test 2001:db8::dead:beef"),
            (12, "found sshd-incr"),
            (13, "note sshd-incr"),
            (14, "skip sshd-incr increase_ban"),
            // 15: transmitter error quoting a command: other
            (16, "flush sshd-test"),
            (17, "unban sshd-test 203.0.113.9"),
            (18, "stopped sshd-test"),
            (19, "skip manual restore_ban"),
            // 20: "Jail 'sshd-test' reloaded", 21: rollover: other
        ],
    );
}

#[test]
fn shared_sample_older_versions() {
    check_file(
        "older-versions.log",
        &[
            (1, "ban ssh 192.0.2.1"),
            (2, "unban ssh 192.0.2.1"),
            (3, "ban ssh 192.0.2.2"),
            (4, "ban ssh 192.0.2.3"),
            (5, "ban sshd 192.0.2.4"),
            (6, "skip sshd restore_ban"),
            (7, "skip sshd repeal_ban"),
            (8, "ban sshd 192.0.2.7"),
        ],
    );
}

#[test]
fn private_server_with_flush() {
    check_file(
        "fail2ban-1.0.2-stops.log",
        &[
            (2, "server starting"),
            (3, "server starting"),
            (23, "started ja"),
            (24, "started jb"),
            (25, "found ja"),
            (26, "note ja"),
            (27, "note ja"),
            (28, "ban ja 192.0.2.1"),
            (29, "ban ja 192.0.2.2"),
            (30, "ban jb 2001:db8::5"),
            (31, "flush ja"),
            (32, "unban ja 192.0.2.1"),
            (33, "unban ja 192.0.2.2"),
            (34, "flush jb"),
            (35, "unban jb 2001:db8::5"),
            (36, "ban ja 192.0.2.3"),
            (38, "flush jb"),
            (39, "stopped jb"),
            (41, "server stopping"),
            (43, "flush ja"),
            (44, "unban ja 192.0.2.3"),
            (45, "stopped ja"),
            (62, "started ja"),
            (63, "started jb"),
            (64, "server reloaded"),
            (65, "skip ja restore_ban"),
            (66, "ban ja 192.0.2.4"),
            (67, "server stopping"),
            (70, "server stopping"),
            (73, "flush jb"),
            (74, "flush ja"),
            (75, "unban ja 192.0.2.3"),
            (76, "unban ja 192.0.2.4"),
            (77, "stopped ja"),
            (78, "stopped jb"),
            (80, "server exited"),
        ],
    );
}

#[test]
fn private_server_without_flush() {
    check_file(
        "fail2ban-1.0.2-noflush.log",
        &[
            (2, "server starting"),
            (3, "server starting"),
            (23, "found ja"),
            (24, "note ja"),
            (25, "note ja"),
            (26, "started ja"),
            (27, "started jb"),
            (28, "ban ja 192.0.2.1"),
            (29, "ban ja 192.0.2.2"),
            (30, "ban jb 2001:db8::5"),
            (31, "ban jb 2001:db8::6"),
            (32, "unban ja 192.0.2.2"),
            (33, "skip ja not_an_ip"),
            (34, "skip ja not_an_ip"),
            (35, "skip ja not_an_ip"),
            (37, "unban jb 2001:db8::5"),
            (38, "unban jb 2001:db8::6"),
            (39, "stopped jb"),
            (40, "unban ja 192.0.2.1"),
            (41, "ban ja 198.51.100.1"),
            (42, "ban ja 198.51.100.2"),
            (43, "server stopping"),
            (46, "server stopping"),
            (48, "skip ja not_an_ip"),
            (49, "skip ja not_an_ip"),
            (50, "skip ja not_an_ip"),
            (51, "unban ja 198.51.100.1"),
            (52, "unban ja 198.51.100.2"),
            (53, "stopped ja"),
            (55, "server exited"),
        ],
    );
}

const PFX: &str = "2026-11-21 04:52:53,446 fail2ban.actions        [4994]: NOTICE  ";

#[test]
fn addresses_are_strict_and_canonical() {
    let cases = [
        (
            "[s] Ban 2001:DB8:0:0::DEAD:BEEF",
            "ban s 2001:db8::dead:beef",
        ),
        ("[s] Ban ::ffff:192.0.2.1", "ban s 192.0.2.1"),
        ("[s] Unban fe80::1", "unban s fe80::1"),
        ("[s] Ban not_an_ip", "skip s not_an_ip"),
        ("[s] Ban 1.2.3.0/24", "skip s not_an_ip"),
        ("[s] Ban  192.0.2.10", "skip s not_an_ip"),
        ("[s] Ban 192.0.2.10 ", "skip s not_an_ip"),
        ("[s] Unban  192.0.2.10", "skip s not_an_ip"),
        ("[s] Ban 010.1.1.1", "skip s not_an_ip"),
        ("[s] Ban 10.1", "skip s not_an_ip"),
        ("[s] Ban fe80::1%eth0", "skip s not_an_ip"),
        ("[s] Ban example.org", "skip s not_an_ip"),
        ("[s] Ban ", "skip s not_an_ip"),
        ("[sshd] Ban 192.0.2.1", "ban sshd 192.0.2.1"),
        ("[ünï] Ban 192.0.2.1", "skip ünï invalid_jail"),
        ("[s] Restore Ban 192.0.2.1", "skip s restore_ban"),
        (
            "[s] Increase Ban 192.0.2.1 (2 # 20s -> 2026-11-21 04:53:45)",
            "skip s increase_ban",
        ),
        ("[s] Repeal Ban 192.0.2.1", "skip s repeal_ban"),
        ("[s] Reban 192.0.2.1, action 'x'", "skip s reban"),
        ("[s] 192.0.2.1 already banned", "skip s already_banned"),
        ("[s] Flush ticket(s) with iptables-multiport", "flush s"),
        ("[s] Found 192.0.2.1 - 2026-11-21 04:52:52", "found s"),
        ("[s]Ban 192.0.2.1", "other"),
        ("Ban 192.0.2.1", "other"),
    ];
    for (msg, want) in cases {
        let line = format!("{PFX}{msg}");
        assert_eq!(render(&line), want, "{line:?}");
    }
}

#[test]
fn header_variants() {
    let cases = [
        // 0.8.0-0.8.11: name padded to 16, no pid, WARNING level.
        ("2013-05-07 10:23:33,468 fail2ban.actions: WARNING [ssh] Ban 192.0.2.1", "ban ssh 192.0.2.1"),
        ("2013-05-07 10:23:33,468 fail2ban.jail    : INFO   Jail 'ssh' started", "started ssh"),
        // 0.8.12-0.8.14.
        ("2014-03-02 10:12:44,123 fail2ban.jail   [1234]: INFO    Jail 'ssh' stopped", "stopped ssh"),
        // syslog target, BSD timestamp, space-padded day.
        ("Nov 21 04:52:53 web1 fail2ban.actions[4994]: NOTICE [sshd] Ban 192.0.2.7", "ban sshd 192.0.2.7"),
        ("Nov  1 04:52:53 web1 fail2ban.actions[4994]: NOTICE [sshd] Unban 2001:db8::7", "unban sshd 2001:db8::7"),
        ("Nov 21 04:52:53 web1 fail2ban.server[4994]: INFO Stopping all jails", "server stopping"),
        // rsyslog RFC 3339 timestamps.
        ("2026-11-21T04:52:53.123456+01:00 web1 fail2ban.actions[4994]: NOTICE [sshd] Ban 192.0.2.8", "ban sshd 192.0.2.8"),
        // Not fail2ban.
        ("Nov 21 04:52:53 web1 sshd[99]: NOTICE [sshd] Ban 192.0.2.9", "-"),
        ("2026-11-21 04:52:53,446 other.logger [1]: NOTICE  [s] Ban 192.0.2.1", "-"),
        ("    raise Exception('x')", "-"),
        ("2026-11-21 04:52:53,446 fail2ban.actions        [x]: NOTICE  [s] Ban 192.0.2.1", "-"),
        ("2026-11-21 04:52:53,446 fail2ban.actions        [1]: notice  [s] Ban 192.0.2.1", "-"),
    ];
    for (line, want) in cases {
        assert_eq!(render(line), want, "{line:?}");
    }
}

#[test]
fn timestamps_and_pids() {
    let e =
        parse_line("2014-03-02 10:12:44,123 fail2ban.actions[1234]: WARNING [ssh] Ban 192.0.2.2")
            .unwrap();
    assert_eq!(e.pid, Some(1234));
    assert_eq!(e.time.unwrap().to_string(), "2014-03-02 10:12:44.123");
    let e = parse_line("2013-05-07 10:23:33,468 fail2ban.actions: WARNING [ssh] Ban 192.0.2.1")
        .unwrap();
    assert_eq!(e.pid, None);
    assert_eq!(e.time.unwrap().to_string(), "2013-05-07 10:23:33.468");
}

#[test]
fn levels() {
    let level = |l: &str| parse_line(l).unwrap().level;
    assert_eq!(level(&format!("{PFX}[s] Ban 192.0.2.1")), Level::Notice);
    assert_eq!(
        level("2013-05-07 10:23:33,468 fail2ban.actions: WARNING [ssh] Ban 192.0.2.1"),
        Level::Warning
    );
    assert_eq!(
        level("2026-11-21 04:52:47,440 fail2ban.jail           [4994]: INFO    Jail 'x' started"),
        Level::Info
    );
    assert_eq!(
        level("2026-11-21 04:52:47,440 fail2ban.actions        [1]: HEAVYDEBUG [s] x"),
        Level::Debug
    );
}

/// Every prefix and many one-character corruptions of every real line: the parser
/// returns, it never panics.
#[test]
fn mangled_lines_never_panic() {
    let dir = format!("{}/tests/data", env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let chars: Vec<char> = line.chars().collect();
            for i in 0..=chars.len() {
                let prefix: String = chars[..i].iter().collect();
                let _ = parse_line(&prefix);
                for c in ['\0', ' ', '[', ']', ':', ',', 'é', '\u{1F600}', '9'] {
                    let mut m = chars.clone();
                    if i < m.len() {
                        m[i] = c;
                    } else {
                        m.push(c);
                    }
                    let _ = parse_line(&m.iter().collect::<String>());
                }
                count += 1;
            }
        }
    }
    assert!(count > 1000, "only {count} cases");
}
