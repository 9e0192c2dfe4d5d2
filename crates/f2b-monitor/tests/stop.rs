//! The stop-suppression state machine: real stop sequences (tests/data) and
//! synthetic ones, including the ways it must not get stuck.

use std::time::{Duration, Instant};

use f2b_monitor::parse::parse_line;
use f2b_monitor::scan::scan_reader;
use f2b_monitor::stop::{StopFilter, SuppressReason, Verdict};

fn scan_text(text: &str) -> Vec<String> {
    scan_reader(text.as_bytes(), &[])
        .unwrap()
        .iter()
        .map(|s| format!("{}:{} {} {}", s.line, s.action, s.jail, s.ip))
        .collect()
}

fn scan_data(file: &str) -> Vec<String> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    scan_text(&std::fs::read_to_string(&path).expect(&path))
}

#[test]
fn real_stop_with_flush_lines() {
    // unban --all (31-35) is a manual unban: reported. stop jb (38-39) had no
    // bans left. reload --restart (41-45) and the server stop (67-80): suppressed.
    assert_eq!(
        scan_data("fail2ban-1.0.2-stops.log"),
        [
            "28:ban ja 192.0.2.1",
            "29:ban ja 192.0.2.2",
            "30:ban jb 2001:db8::5",
            "32:unban ja 192.0.2.1",
            "33:unban ja 192.0.2.2",
            "35:unban jb 2001:db8::5",
            "36:ban ja 192.0.2.3",
            "66:ban ja 192.0.2.4",
        ]
    );
}

#[test]
fn real_stop_without_flush_lines() {
    // stop jb (37-39) logs no Flush line: its Unbans are held and dropped at
    // "Jail 'jb' stopped". The manual unbans (32, 40) are reported.
    assert_eq!(
        scan_data("fail2ban-1.0.2-noflush.log"),
        [
            "28:ban ja 192.0.2.1",
            "29:ban ja 192.0.2.2",
            "30:ban jb 2001:db8::5",
            "31:ban jb 2001:db8::6",
            "32:unban ja 192.0.2.2",
            "40:unban ja 192.0.2.1",
            "41:ban ja 198.51.100.1",
            "42:ban ja 198.51.100.2",
        ]
    );
}

#[test]
fn shared_samples() {
    // The 1.0.2 sample's jail stop (16-18) is suppressed; manual and expiry
    // unbans (10, 11) are reported.
    assert_eq!(
        scan_data("fail2ban-1.0.2.log"),
        [
            "6:ban sshd-test 203.0.113.5",
            "7:ban sshd-test 2001:db8::dead:beef",
            "9:ban manual 198.51.100.10",
            "10:unban manual 198.51.100.10",
            "11:unban sshd-test 2001:db8::dead:beef",
        ]
    );
    assert_eq!(scan_data("older-versions.log").len(), 6);
}

/// A line as fail2ban 1.0 writes it: start/stop lines at INFO, the rest at NOTICE.
fn line(t: &str, logger: &str, msg: &str) -> String {
    let level = match logger {
        "jail" | "server" => "INFO   ",
        _ => "NOTICE ",
    };
    format!("2026-11-21 {t},000 fail2ban.{logger:<16}[100]: {level} {msg}")
}

#[test]
fn stop_sequence_then_manual_unban() {
    let text = [
        line("10:00:00", "actions", "[sshd] Ban 192.0.2.1"),
        line("10:00:01", "actions", "[sshd] Ban 192.0.2.2"),
        line(
            "10:00:02",
            "actions",
            "[sshd] Flush ticket(s) with iptables",
        ),
        line("10:00:02", "actions", "[sshd] Unban 192.0.2.1"),
        line("10:00:02", "actions", "[sshd] Unban 192.0.2.2"),
        line("10:00:03", "jail", "Jail 'sshd' stopped"),
        line("10:00:10", "jail", "Jail 'sshd' started"),
        line("10:00:11", "actions", "[sshd] Restore Ban 192.0.2.2"),
        line("10:00:20", "actions", "[sshd] Unban 192.0.2.2"),
    ]
    .join("\n");
    assert_eq!(
        scan_text(&text),
        [
            "1:ban sshd 192.0.2.1",
            "2:ban sshd 192.0.2.2",
            "9:unban sshd 192.0.2.2"
        ]
    );
}

#[test]
fn interleaved_jails() {
    // sshd stops while nginx unbans by expiry and bans: only sshd's Unbans go.
    let text = [
        line(
            "10:00:00",
            "actions",
            "[sshd] Flush ticket(s) with iptables",
        ),
        line("10:00:00", "actions", "[sshd] Unban 192.0.2.1"),
        line("10:00:00", "actions", "[nginx] Unban 198.51.100.1"),
        line("10:00:00", "actions", "[sshd] Unban 192.0.2.2"),
        line("10:00:01", "actions", "[nginx] Ban 198.51.100.2"),
        line("10:00:01", "jail", "Jail 'sshd' stopped"),
        line("10:00:02", "actions", "[nginx] Unban 198.51.100.3"),
    ]
    .join("\n");
    assert_eq!(
        scan_text(&text),
        [
            "3:unban nginx 198.51.100.1",
            "5:ban nginx 198.51.100.2",
            "7:unban nginx 198.51.100.3"
        ]
    );
}

#[test]
fn an_unban_before_the_flush_is_not_part_of_the_stop() {
    let text = [
        line("10:00:00", "actions", "[sshd] Unban 192.0.2.9"),
        line(
            "10:00:01",
            "actions",
            "[sshd] Flush ticket(s) with iptables",
        ),
        line("10:00:01", "actions", "[sshd] Unban 192.0.2.1"),
        line("10:00:01", "jail", "Jail 'sshd' stopped"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["1:unban sshd 192.0.2.9"]);
}

#[test]
fn server_stop_suppresses_every_jail_until_restart() {
    let text = [
        line("10:00:00", "server", "Shutdown in progress..."),
        line("10:00:00", "server", "Stopping all jails"),
        line("10:00:01", "actions", "[a] Unban 192.0.2.1"),
        line("10:00:01", "jail", "Jail 'a' stopped"),
        line("10:00:02", "actions", "[b] Unban 192.0.2.2"),
        line("10:00:02", "jail", "Jail 'b' stopped"),
        line("10:00:02", "server", "Exiting Fail2ban"),
        line("10:00:05", "actions", "[a] Unban 192.0.2.3"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["8:unban a 192.0.2.3"]);
}

fn feed(f: &mut StopFilter, text: &str, now: Instant) -> Vec<Verdict> {
    let mut out = Vec::new();
    f.push(&parse_line(text).unwrap(), 1, now, &mut out);
    out
}

fn reported(v: &[Verdict]) -> Vec<String> {
    v.iter()
        .filter_map(|v| match v {
            Verdict::Report(s) => Some(format!("{} {} {}", s.action, s.jail, s.ip)),
            Verdict::Suppress(..) => None,
        })
        .collect()
}

#[test]
fn held_unban_is_released_by_the_clock() {
    let hold = Duration::from_secs(5);
    let mut f = StopFilter::new(hold, Duration::from_secs(60));
    let t0 = Instant::now();
    assert!(feed(
        &mut f,
        &line("10:00:00", "actions", "[s] Unban 192.0.2.1"),
        t0
    )
    .is_empty());
    assert_eq!(f.held(), 1);
    assert_eq!(f.next_deadline(), Some(t0 + hold));
    let mut out = Vec::new();
    f.release_due(t0 + hold - Duration::from_millis(1), &mut out);
    assert!(out.is_empty());
    f.release_due(t0 + hold, &mut out);
    assert_eq!(reported(&out), ["unban s 192.0.2.1"]);
    assert_eq!(f.next_deadline(), None);
}

#[test]
fn unban_all_without_stop_is_reported() {
    // `fail2ban-client unban --all`: Flush then Unbans, no "stopped" (at loglevel
    // INFO, which shows in the jail's start line).
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    feed(&mut f, &line("09:00:00", "jail", "Jail 's' started"), t0);
    feed(
        &mut f,
        &line("10:00:00", "actions", "[s] Flush ticket(s) with x"),
        t0,
    );
    feed(
        &mut f,
        &line("10:00:00", "actions", "[s] Unban 192.0.2.1"),
        t0,
    );
    let mut out = Vec::new();
    f.release_due(t0 + f.hold(), &mut out);
    assert_eq!(reported(&out), ["unban s 192.0.2.1"]);
    // And the jail is not left "flushing": a later unban is not held for a stop.
    let t1 = t0 + Duration::from_secs(60);
    feed(
        &mut f,
        &line("10:01:00", "actions", "[s] Ban 192.0.2.2"),
        t1,
    );
    feed(
        &mut f,
        &line("10:01:01", "actions", "[s] Unban 192.0.2.2"),
        t1,
    );
    let out = feed(&mut f, &line("10:01:01", "jail", "Jail 's' stopped"), t1);
    // Without a Flush line, the stop takes the Unbans held at that moment.
    assert_eq!(out.len(), 1);
    assert!(matches!(
        out[0],
        Verdict::Suppress(_, SuppressReason::JailStopping)
    ));
}

#[test]
fn a_ban_releases_the_jails_held_unbans_first() {
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    feed(
        &mut f,
        &line("10:00:00", "actions", "[s] Unban 192.0.2.1"),
        t0,
    );
    let out = feed(
        &mut f,
        &line("10:00:01", "actions", "[s] Ban 192.0.2.1"),
        t0,
    );
    assert_eq!(reported(&out), ["unban s 192.0.2.1", "ban s 192.0.2.1"]);
}

#[test]
fn server_stop_cannot_get_stuck() {
    let quiet = Duration::from_secs(60);
    let t0 = Instant::now();
    let unban = line("10:00:01", "actions", "[s] Unban 192.0.2.1");

    // By the clock: a stop with no line for `quiet` is over.
    let mut f = StopFilter::new(Duration::from_secs(5), quiet);
    feed(
        &mut f,
        &line("10:00:00", "server", "Stopping all jails"),
        t0,
    );
    assert!(f.server_stopping());
    assert_eq!(f.next_deadline(), Some(t0 + quiet));
    let mut out = Vec::new();
    f.release_due(t0 + quiet, &mut out);
    assert!(!f.server_stopping());

    // By the log's time.
    let mut f = StopFilter::new(Duration::from_secs(5), quiet);
    feed(
        &mut f,
        &line("10:00:00", "server", "Stopping all jails"),
        t0,
    );
    feed(
        &mut f,
        &line("10:05:00", "actions", "[s] Unban 192.0.2.1"),
        t0,
    );
    assert!(!f.server_stopping());
    assert_eq!(f.held(), 1);

    // A new server (another pid), or its start line, ends it.
    for restart in [
        "2026-11-21 10:00:02,000 fail2ban.actions        [200]: NOTICE  [s] Unban 192.0.2.1",
        "2026-11-21 10:00:02,000 fail2ban.server         [100]: INFO    Starting Fail2ban v1.0.2",
        "2026-11-21 10:00:02,000 fail2ban.jail           [100]: INFO    Jail 's' started",
        "2026-11-21 10:00:02,000 fail2ban.server         [100]: INFO    Reload finished.",
        "2026-11-21 10:00:02,000 fail2ban.server         [100]: INFO    Exiting Fail2ban",
    ] {
        let mut f = StopFilter::default();
        feed(
            &mut f,
            &line("10:00:00", "server", "Stopping all jails"),
            t0,
        );
        let out = feed(&mut f, &unban, t0);
        assert!(matches!(
            out[0],
            Verdict::Suppress(_, SuppressReason::ServerStopping)
        ));
        feed(&mut f, restart, t0);
        assert!(!f.server_stopping(), "{restart}");
    }
}

#[test]
fn jail_flush_state_is_cleared_by_start_and_stop() {
    let t0 = Instant::now();
    for clear in ["Jail 's' started", "Jail 's' stopped"] {
        let mut f = StopFilter::default();
        feed(
            &mut f,
            &line("10:00:00", "actions", "[s] Flush ticket(s) with x"),
            t0,
        );
        feed(&mut f, &line("10:00:00", "jail", clear), t0);
        // A later manual unban, then another jail's stop: not taken as s's flush.
        feed(
            &mut f,
            &line("10:00:01", "actions", "[s] Unban 192.0.2.1"),
            t0,
        );
        let out = feed(
            &mut f,
            &line("10:00:01", "jail", "Jail 'other' stopped"),
            t0,
        );
        assert!(out.is_empty());
        let mut out = Vec::new();
        f.release_all(&mut out);
        assert_eq!(reported(&out), ["unban s 192.0.2.1"], "{clear}");
    }
}

#[test]
fn at_loglevel_notice_a_flush_is_taken_for_a_stop() {
    // No INFO line at all: no "Jail 'x' stopped" will come to confirm a stop.
    let notice = |t: &str, msg: &str| {
        format!("2026-11-21 {t},000 fail2ban.actions        [100]: NOTICE  {msg}")
    };
    let text = [
        notice("10:00:00", "[s] Ban 192.0.2.1"),
        notice("10:00:01", "[s] Unban 192.0.2.1"),
        notice("10:00:20", "[s] Flush ticket(s) with iptables"),
        notice("10:00:20", "[s] Unban 192.0.2.2"),
        notice("10:00:20", "[t] Flush ticket(s) with iptables"),
        notice("10:00:20", "[t] Unban 192.0.2.3"),
    ]
    .join("\n");
    assert_eq!(
        scan_text(&text),
        ["1:ban s 192.0.2.1", "2:unban s 192.0.2.1"],
        "the plain unban is reported, the flushed ones are not"
    );
    // The same with the clock running out instead of the end of the input.
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    feed(
        &mut f,
        &notice("10:00:20", "[s] Flush ticket(s) with x"),
        t0,
    );
    feed(&mut f, &notice("10:00:20", "[s] Unban 192.0.2.2"), t0);
    let mut out = Vec::new();
    f.release_due(t0 + f.hold(), &mut out);
    assert!(matches!(
        out[..],
        [Verdict::Suppress(_, SuppressReason::JailStopping)]
    ));
}

/// A fail2ban 1.0 line of process `pid` at `t` (`HH:MM:SS,mmm`).
fn line_of(pid: u32, t: &str, logger: &str, msg: &str) -> String {
    let level = match logger {
        "jail" | "server" => "INFO   ",
        _ => "NOTICE ",
    };
    format!("2026-11-21 {t} fail2ban.{logger:<16}[{pid}]: {level} {msg}")
}

#[test]
fn at_loglevel_notice_a_restart_does_not_unban() {
    // `fail2ban-client restart` at loglevel NOTICE: the old process flushes, the
    // new one restores the bans 2 s later. Nothing of it is an unban to report.
    let text = [
        line_of(4994, "10:00:00,000", "actions", "[s] Ban 192.0.2.1"),
        line_of(
            4994,
            "10:00:05,000",
            "actions",
            "[s] Flush ticket(s) with x",
        ),
        line_of(4994, "10:00:05,003", "actions", "[s] Unban 192.0.2.1"),
        line_of(7503, "10:00:07,000", "actions", "[s] Restore Ban 192.0.2.1"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["1:ban s 192.0.2.1"]);
    // `reload --restart`: the same process restores the bans (a sign of life of
    // the jail, which at NOTICE does not make a flushed Unban real).
    let text = [
        line_of(
            4994,
            "10:00:05,000",
            "actions",
            "[s] Flush ticket(s) with x",
        ),
        line_of(4994, "10:00:05,003", "actions", "[s] Unban 192.0.2.1"),
        line_of(4994, "10:00:06,000", "actions", "[s] Restore Ban 192.0.2.1"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), Vec::<String>::new());
}

#[test]
fn a_new_process_id_makes_the_held_unbans_a_stop() {
    // No Flush line (an action without actionflush), no stop lines (the old
    // process was killed, or logs at NOTICE): every Unban still held when another
    // process writes is the old one's stop.
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    let mut out = Vec::new();
    for l in [
        line_of(100, "10:00:00,000", "jail", "Jail 's' started"),
        line_of(100, "10:00:01,000", "actions", "[s] Unban 192.0.2.1"),
        line_of(100, "10:00:01,001", "actions", "[t] Unban 192.0.2.2"),
    ] {
        f.push(&parse_line(&l).unwrap(), 1, t0, &mut out);
    }
    assert!(out.is_empty());
    let l = line_of(200, "10:00:03,000", "server", "Starting Fail2ban v1.0.2");
    f.push(&parse_line(&l).unwrap(), 2, t0, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out
        .iter()
        .all(|v| matches!(v, Verdict::Suppress(_, SuppressReason::ServerStopping))));
    assert_eq!(f.held(), 0);
}

#[test]
fn without_a_flush_line_only_the_burst_before_stopped_is_the_stop() {
    // A manual unban 3.5 s before a stop of a jail whose action has no
    // actionflush: reported; the stop's burst (same millisecond as the stopped
    // line, as fail2ban writes it) suppressed.
    let text = [
        line_of(100, "10:00:00,000", "jail", "Jail 's' started"),
        line_of(100, "10:00:01,000", "actions", "[s] Ban 192.0.2.1"),
        line_of(100, "10:00:01,000", "actions", "[s] Ban 192.0.2.2"),
        line_of(100, "10:00:01,000", "actions", "[s] Ban 192.0.2.3"),
        line_of(100, "10:00:02,000", "actions", "[s] Unban 192.0.2.1"),
        line_of(100, "10:00:05,500", "actions", "[s] Unban 192.0.2.2"),
        line_of(100, "10:00:05,501", "actions", "[s] Unban 192.0.2.3"),
        line_of(100, "10:00:05,501", "jail", "Jail 's' stopped"),
    ]
    .join("\n");
    assert_eq!(
        scan_text(&text),
        [
            "2:ban s 192.0.2.1",
            "3:ban s 192.0.2.2",
            "4:ban s 192.0.2.3",
            "5:unban s 192.0.2.1"
        ]
    );
}

#[test]
fn a_slow_burst_is_followed_back_gap_by_gap() {
    // Each Unban within BURST_GAP of the next, the last within it of the stopped
    // line: one burst, though it spans more than BURST_GAP. One Unban 1.5 s before
    // the burst is not part of it.
    let text = [
        line_of(100, "10:00:00,000", "jail", "Jail 's' started"),
        line_of(100, "10:00:01,000", "actions", "[s] Unban 192.0.2.9"),
        line_of(100, "10:00:02,500", "actions", "[s] Unban 192.0.2.1"),
        line_of(100, "10:00:03,400", "actions", "[s] Unban 192.0.2.2"),
        line_of(100, "10:00:04,300", "actions", "[s] Unban 192.0.2.3"),
        line_of(100, "10:00:05,200", "jail", "Jail 's' stopped"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["2:unban s 192.0.2.9"]);
    // The stopped line 1.5 s after the last Unban: no burst ends there.
    let text = [
        line_of(100, "10:00:00,000", "jail", "Jail 's' started"),
        line_of(100, "10:00:01,000", "actions", "[s] Unban 192.0.2.9"),
        line_of(100, "10:00:02,500", "jail", "Jail 's' stopped"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["2:unban s 192.0.2.9"]);
}

#[test]
fn without_timestamps_the_burst_is_measured_by_read_time() {
    use f2b_monitor::parse::{Kind, Level, LogEntry};
    use f2b_proto::{Action, JailName};
    let entry = |kind| LogEntry {
        time: None,
        pid: Some(1),
        level: Level::Info,
        kind,
    };
    let unban = |ip: &str| {
        entry(Kind::Event {
            jail: JailName::new("s").unwrap(),
            action: Action::Unban,
            ip: ip.parse().unwrap(),
        })
    };
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    let mut out = Vec::new();
    f.push(&unban("192.0.2.1"), 1, t0, &mut out);
    let t1 = t0 + Duration::from_secs(3);
    f.push(&unban("192.0.2.2"), 2, t1, &mut out);
    let stopped = entry(Kind::JailStopped { jail: "s".into() });
    f.push(&stopped, 3, t1 + Duration::from_millis(2), &mut out);
    assert_eq!(reported(&out), ["unban s 192.0.2.1"]);
    assert!(matches!(
        &out[1],
        Verdict::Suppress(s, SuppressReason::JailStopping) if s.line == 2
    ));
}

#[test]
fn an_unban_long_after_a_lone_flush_is_not_the_flush() {
    // At loglevel NOTICE, `unban --all` on a jail with no bans leaves a Flush line
    // alone; an expiry ten minutes later is not part of it.
    let text = [
        line_of(100, "10:00:00,000", "actions", "[s] Flush ticket(s) with x"),
        line_of(100, "10:10:00,000", "actions", "[s] Unban 192.0.2.1"),
    ]
    .join("\n");
    assert_eq!(scan_text(&text), ["2:unban s 192.0.2.1"]);
}

#[test]
fn oldest_line_is_the_first_line_still_needed() {
    let mut f = StopFilter::default();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut push = |f: &mut StopFilter, n: u64, l: String| {
        f.push(&parse_line(&l).unwrap(), n, t0, &mut out);
    };
    push(
        &mut f,
        1,
        line_of(100, "10:00:00,000", "actions", "[s] Ban 192.0.2.1"),
    );
    assert_eq!(f.oldest_line(), None);
    push(
        &mut f,
        2,
        line_of(100, "10:00:00,000", "actions", "[t] Unban 192.0.2.7"),
    );
    push(
        &mut f,
        3,
        line_of(100, "10:00:00,000", "actions", "[s] Flush ticket(s) with x"),
    );
    push(
        &mut f,
        4,
        line_of(100, "10:00:00,000", "actions", "[s] Unban 192.0.2.1"),
    );
    assert_eq!(f.oldest_line(), Some(2));
    push(
        &mut f,
        5,
        line_of(100, "10:00:00,000", "actions", "[t] Ban 192.0.2.8"),
    );
    assert_eq!(
        f.oldest_line(),
        Some(3),
        "the Flush line the held Unban follows"
    );
    push(
        &mut f,
        6,
        line_of(100, "10:00:00,000", "jail", "Jail 's' stopped"),
    );
    assert_eq!(f.oldest_line(), None);
}

#[test]
fn many_held_unbans_cost_linear_time() {
    // A jail with 50,000 bans stops (no Flush line) while another jail keeps
    // banning: each line must look only at the oldest held Unban of each jail.
    use f2b_monitor::parse::{Kind, Level, LogEntry};
    use f2b_proto::{Action, JailName};
    const N: u32 = 50_000;
    let t = chrono::NaiveDate::from_ymd_opt(2026, 11, 21)
        .unwrap()
        .and_hms_opt(10, 0, 0)
        .unwrap();
    let event = |jail: &str, action, n: u32| LogEntry {
        time: Some(t),
        pid: Some(1),
        level: Level::Notice,
        kind: Kind::Event {
            jail: JailName::new(jail).unwrap(),
            action,
            ip: std::net::IpAddr::from((0x0a00_0000u32 + n).to_be_bytes()),
        },
    };
    let mut lines = Vec::with_capacity(2 * N as usize + 1);
    for n in 0..N {
        lines.push(event("big", Action::Unban, n));
        lines.push(event("other", Action::Ban, n));
    }
    lines.push(LogEntry {
        time: Some(t),
        pid: Some(1),
        level: Level::Info,
        kind: Kind::JailStopped { jail: "big".into() },
    });
    let mut f = StopFilter::default();
    let mut out = Vec::new();
    let started = Instant::now();
    let now = Instant::now();
    for (i, l) in lines.iter().enumerate() {
        f.push(l, i as u64 + 1, now, &mut out);
    }
    let took = started.elapsed();
    assert_eq!(f.held(), 0);
    assert_eq!(out.len(), 2 * N as usize);
    assert_eq!(
        reported(&out).len(),
        N as usize,
        "only the other jail's bans"
    );
    // Quadratic work (2.5e9 steps) takes minutes; linear work well under a second.
    assert!(took < Duration::from_secs(10), "{took:?}");
}
