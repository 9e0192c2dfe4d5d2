//! Reading one fail2ban log line: pure, no I/O, no clock.
//!
//! [`parse_line`] recognises the header of every format fail2ban has written
//! (0.8.0 to 1.1, and the syslog target) and classifies the message into a
//! [`Kind`]: a Ban or Unban to report, a line that looks like one but must not be
//! reported (with a [`SkipReason`]), or one of the lines the stop-suppression state
//! machine ([`crate::stop`]) needs (jail and server start/stop, ticket flushes).
//!
//! Formats handled (the message is what follows the level):
//!
//! ```text
//! 0.8.0-0.8.11   2013-05-07 10:23:33,468 fail2ban.actions: WARNING [ssh] Ban 192.0.2.1
//! 0.8.12-0.8.14  2014-03-02 10:12:44,123 fail2ban.actions[1234]: WARNING [ssh] Ban 192.0.2.2
//! 0.9.1-1.1      2017-01-30 21:14:02,887 fail2ban.actions        [812]: NOTICE  [sshd] Ban 192.0.2.4
//! syslog         Nov 21 04:52:53 web1 fail2ban.actions[4994]: NOTICE [sshd] Ban 192.0.2.7
//! ```
//!
//! Addresses are parsed with the protocol's strictness ([`f2b_proto::event::parse_ip`]):
//! `fail2ban-client set J banip` logs whatever it was given (`not_an_ip`,
//! `1.2.3.0/24`, ` 192.0.2.10` with a leading space), and none of that may become an
//! event.

use std::fmt;
use std::net::IpAddr;

use chrono::NaiveDateTime;
use f2b_proto::{Action, JailName};

/// One recognised fail2ban log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The timestamp of the line, local time without zone. Syslog lines carry no
    /// year; [`parse_line_at`] takes it from the current date.
    pub time: Option<NaiveDateTime>,
    /// The fail2ban server's process id, when the format has one (not 0.8.0-0.8.11).
    pub pid: Option<u32>,
    /// The line's level.
    pub level: Level,
    /// What the line says.
    pub kind: Kind,
}

/// A log line's level. fail2ban's default `loglevel` is INFO; at NOTICE and above,
/// the jail and server start and stop lines are not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// DEBUG, and fail2ban's TRACEDEBUG and HEAVYDEBUG.
    Debug,
    Info,
    Notice,
    Warning,
    Error,
    Critical,
    /// A level name fail2ban does not define.
    Other,
}

impl Level {
    fn from_name(name: &str) -> Level {
        match name {
            "DEBUG" | "TRACEDEBUG" | "HEAVYDEBUG" => Level::Debug,
            "INFO" => Level::Info,
            "NOTICE" => Level::Notice,
            "WARNING" | "WARN" => Level::Warning,
            "ERROR" => Level::Error,
            "CRITICAL" | "FATAL" => Level::Critical,
            _ => Level::Other,
        }
    }

    /// Whether a server logging this line logs INFO lines (so its start and stop
    /// lines are in the log).
    pub fn shows_info(self) -> bool {
        matches!(self, Level::Debug | Level::Info)
    }
}

/// What a fail2ban log line says, as far as the monitor cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `[jail] Ban IP` or `[jail] Unban IP` with a valid jail name and address (the
    /// address canonical).
    Event {
        jail: JailName,
        action: Action,
        ip: IpAddr,
    },
    /// A jail's line that looks like a ban or unban but is not one to report.
    Skipped { jail: String, reason: SkipReason },
    /// `[jail] Flush ticket(s) with <action>`: the Unbans that follow are a flush
    /// (jail stop, or `unban --all`).
    Flush { jail: String },
    /// `[jail] Found IP ...`: the jail's filter is running.
    Found { jail: String },
    /// Any other line tagged with a jail (`Ignore`, warnings, debug lines...).
    JailNote { jail: String },
    /// `Jail 'x' started`.
    JailStarted { jail: String },
    /// `Jail 'x' stopped`.
    JailStopped { jail: String },
    /// A server-wide line that matters for stop suppression.
    Server(ServerNote),
    /// Any other fail2ban line.
    Other,
}

/// Server-wide lines of fail2ban's start and stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerNote {
    /// `Starting Fail2ban v...`, `Daemon started`: a new server.
    Starting,
    /// `Shutdown in progress...`, `Stopping all jails`: every Unban that follows is
    /// the stop flushing its bans.
    Stopping,
    /// `Exiting Fail2ban`.
    Exited,
    /// `Reload finished.`
    Reloaded,
}

/// Why a ban-like line is not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// `Restore Ban`: a ban restored from fail2ban's database at start (0.10+).
    RestoreBan,
    /// `Increase Ban`: bantime.increment prolonging a ban (0.11+).
    IncreaseBan,
    /// `Repeal Ban`: 1.1.1's form of a stop's unban.
    RepealBan,
    /// `Reban`: actions re-applied to an existing ban.
    Reban,
    /// `IP already banned`.
    AlreadyBanned,
    /// The "address" is not a strict IP address.
    NotAnIp,
    /// The jail name is not one the protocol accepts.
    InvalidJail,
}

impl SkipReason {
    /// The code logged as `reason=`.
    pub fn code(self) -> &'static str {
        match self {
            SkipReason::RestoreBan => "restore_ban",
            SkipReason::IncreaseBan => "increase_ban",
            SkipReason::RepealBan => "repeal_ban",
            SkipReason::Reban => "reban",
            SkipReason::AlreadyBanned => "already_banned",
            SkipReason::NotAnIp => "not_an_ip",
            SkipReason::InvalidJail => "invalid_jail",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Parses one line (without its line terminator; a trailing `\r` or `\n` is
/// ignored). `now` (local time) supplies the year of syslog timestamps, which have
/// none: the current year, or the previous one if that would put the line more
/// than a day in the future (a December line read in January). Returns `None`
/// when the line is not a fail2ban log line (continuation lines of tracebacks,
/// other programs' syslog lines).
pub fn parse_line_at(line: &str, now: NaiveDateTime) -> Option<LogEntry> {
    let line = line.trim_end_matches(['\n', '\r']);
    let (time, rest) = split_timestamp(line, now)?;
    let (pid, level_and_message) = split_logger(rest)?;
    let (level, message) = split_level(level_and_message)?;
    Some(LogEntry {
        time,
        pid,
        level,
        kind: classify(message),
    })
}

/// [`parse_line_at`] with the local clock's time.
pub fn parse_line(line: &str) -> Option<LogEntry> {
    parse_line_at(line, chrono::Local::now().naive_local())
}

/// Splits the timestamp off the front: fail2ban's own `YYYY-MM-DD HH:MM:SS,mmm`,
/// a syslog `Mmm dd HH:MM:SS host`, or an RFC 3339 syslog timestamp and host. The
/// time is `None` when the prefix has the shape of a timestamp but no valid value.
fn split_timestamp(line: &str, now: NaiveDateTime) -> Option<(Option<NaiveDateTime>, &str)> {
    let b = line.as_bytes();
    // fail2ban: 2026-11-21 04:52:47,440 (23 bytes) then a space.
    if b.len() > 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && (b[19] == b',' || b[19] == b'.')
        && b[23] == b' '
    {
        let time = parse_f2b_time(line.get(..23)?);
        return Some((time, line.get(24..)?));
    }
    // rsyslog high precision: 2026-11-21T04:52:53.123456+01:00 host rest
    if b.len() > 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' {
        let (stamp, after) = line.split_once(' ')?;
        let (_host, rest) = after.split_once(' ')?;
        let time = chrono::DateTime::parse_from_rfc3339(stamp)
            .ok()
            .map(|t| t.with_timezone(&chrono::Local).naive_local());
        return Some((time, rest));
    }
    // BSD syslog: Nov 21 04:52:53 host rest (day may be space-padded: "Nov  1").
    if b.len() > 16 && b[3] == b' ' && b[6] == b' ' && b[9] == b':' && b[12] == b':' {
        let stamp = line.get(..15)?;
        let after = line.get(16..)?.trim_start_matches(' ');
        let (_host, rest) = after.split_once(' ')?;
        let time = parse_syslog_time(stamp, now);
        return Some((time, rest));
    }
    None
}

fn parse_f2b_time(s: &str) -> Option<NaiveDateTime> {
    use chrono::Timelike;
    let whole = NaiveDateTime::parse_from_str(s.get(..19)?, "%Y-%m-%d %H:%M:%S").ok()?;
    let millis: u32 = s.get(20..23)?.parse().ok()?;
    whole.with_nanosecond(millis * 1_000_000)
}

fn parse_syslog_time(stamp: &str, now: NaiveDateTime) -> Option<NaiveDateTime> {
    use chrono::Datelike;
    // "Nov 21 04:52:53" or "Nov  1 04:52:53"
    let words = stamp.split_whitespace().collect::<Vec<_>>().join(" ");
    let in_year = |year: i32| {
        NaiveDateTime::parse_from_str(&format!("{year} {words}"), "%Y %b %d %H:%M:%S").ok()
    };
    let t = in_year(now.year())?;
    if t > now + chrono::Duration::days(1) {
        return in_year(now.year() - 1).or(Some(t));
    }
    Some(t)
}

/// Splits `fail2ban.actions        [4994]: ` (or `fail2ban.actions: `) off the front;
/// returns the process id, if any, and the rest (level and message).
fn split_logger(rest: &str) -> Option<(Option<u32>, &str)> {
    let end = rest.find([' ', '[', ':']).unwrap_or(rest.len());
    let name = &rest[..end];
    if name != "fail2ban" && !name.starts_with("fail2ban.") {
        return None;
    }
    let after = rest[end..].trim_start_matches(' ');
    let (pid, after) = match after.strip_prefix('[') {
        Some(p) => {
            let (digits, tail) = p.split_once(']')?;
            (Some(digits.parse::<u32>().ok()?), tail)
        }
        None => (None, after),
    };
    let after = after.strip_prefix(':')?;
    Some((pid, after.strip_prefix(' ')?))
}

/// Splits the level (`NOTICE `, `INFO    `, `WARNING `) off; returns it and the
/// message.
fn split_level(rest: &str) -> Option<(Level, &str)> {
    let rest = rest.trim_start_matches(' ');
    let end = rest.find(' ')?;
    let level = &rest[..end];
    if level.is_empty() || !level.bytes().all(|c| c.is_ascii_uppercase()) {
        return None;
    }
    // The level is padded (`%(levelname)-7s`), then one space; the message starts
    // at the first non-space. A message never starts with a space in fail2ban.
    Some((Level::from_name(level), rest[end..].trim_start_matches(' ')))
}

fn classify(message: &str) -> Kind {
    if let Some(tagged) = message.strip_prefix('[') {
        if let Some((jail, text)) = tagged.split_once("] ") {
            return classify_jail(jail, text);
        }
        return Kind::Other;
    }
    if let Some(jail) = jail_quoted(message, " started") {
        return Kind::JailStarted { jail };
    }
    if let Some(jail) = jail_quoted(message, " stopped") {
        return Kind::JailStopped { jail };
    }
    if message.starts_with("Starting Fail2ban v") || message == "Daemon started" {
        return Kind::Server(ServerNote::Starting);
    }
    if message == "Shutdown in progress..." || message == "Stopping all jails" {
        return Kind::Server(ServerNote::Stopping);
    }
    if message == "Exiting Fail2ban" {
        return Kind::Server(ServerNote::Exited);
    }
    if message == "Reload finished." {
        return Kind::Server(ServerNote::Reloaded);
    }
    Kind::Other
}

/// `Jail 'x' started`: the name between quotes (Python's repr uses `"` when the
/// name contains `'`).
fn jail_quoted(message: &str, suffix: &str) -> Option<String> {
    let inner = message.strip_prefix("Jail ")?.strip_suffix(suffix)?;
    let name = inner
        .strip_prefix('\'')
        .and_then(|s| s.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|s| s.strip_suffix('"')))?;
    Some(name.to_owned())
}

fn classify_jail(jail: &str, text: &str) -> Kind {
    let skip = |reason| Kind::Skipped {
        jail: jail.to_owned(),
        reason,
    };
    let action_ip = if let Some(ip) = text.strip_prefix("Ban ") {
        Some((Action::Ban, ip))
    } else {
        text.strip_prefix("Unban ").map(|ip| (Action::Unban, ip))
    };
    if let Some((action, raw_ip)) = action_ip {
        let Ok(ip) = f2b_proto::event::parse_ip(raw_ip) else {
            return skip(SkipReason::NotAnIp);
        };
        let Ok(jail) = JailName::new(jail) else {
            return skip(SkipReason::InvalidJail);
        };
        return Kind::Event { jail, action, ip };
    }
    if text.starts_with("Restore Ban ") {
        return skip(SkipReason::RestoreBan);
    }
    if text.starts_with("Increase Ban ") {
        return skip(SkipReason::IncreaseBan);
    }
    if text.starts_with("Repeal Ban ") {
        return skip(SkipReason::RepealBan);
    }
    if text.starts_with("Reban ") {
        return skip(SkipReason::Reban);
    }
    if text.ends_with(" already banned") {
        return skip(SkipReason::AlreadyBanned);
    }
    if text.starts_with("Found ") {
        return Kind::Found {
            jail: jail.to_owned(),
        };
    }
    if text.starts_with("Flush ticket(s) with ") {
        return Kind::Flush {
            jail: jail.to_owned(),
        };
    }
    Kind::JailNote {
        jail: jail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(line: &str) -> Kind {
        parse_line(line).expect(line).kind
    }

    #[test]
    fn header_forms() {
        let e = parse_line(
            "2026-11-21 04:52:53,446 fail2ban.actions        [4994]: NOTICE  [sshd-test] Ban 203.0.113.5",
        )
        .unwrap();
        assert_eq!(e.pid, Some(4994));
        assert_eq!(
            e.time.unwrap().to_string(),
            "2026-11-21 04:52:53.446",
            "milliseconds kept"
        );
        let e = parse_line("2013-05-07 10:23:33,468 fail2ban.actions: WARNING [ssh] Ban 192.0.2.1")
            .unwrap();
        assert_eq!(e.pid, None);
        let now = |s| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        let syslog = "Nov  1 04:52:53 web1 fail2ban.actions[4994]: NOTICE [sshd] Ban 192.0.2.7";
        let e = parse_line_at(syslog, now("2025-11-02 00:00:00")).unwrap();
        assert_eq!(e.time.unwrap().to_string(), "2025-11-01 04:52:53");
        let e = parse_line_at(syslog, now("2026-01-02 00:00:00")).unwrap();
        assert_eq!(
            e.time.unwrap().to_string(),
            "2025-11-01 04:52:53",
            "last year"
        );
        assert!(parse_line("Nov 21 04:52:53 web1 sshd[99]: Accepted publickey").is_none());
        assert!(parse_line("Traceback (most recent call last):").is_none());
        assert!(parse_line("").is_none());
    }

    #[test]
    fn bad_timestamp_keeps_the_line() {
        let e = parse_line(
            "2026-13-45 99:52:53,446 fail2ban.actions        [1]: NOTICE  [s] Ban 192.0.2.1",
        )
        .unwrap();
        assert_eq!(e.time, None);
        assert!(matches!(e.kind, Kind::Event { .. }));
    }

    #[test]
    fn jail_names_with_quotes() {
        assert_eq!(
            kind(r#"2026-11-21 04:52:47,440 fail2ban.jail [1]: INFO    Jail "o'k" started"#),
            Kind::JailStarted { jail: "o'k".into() }
        );
    }

    #[test]
    fn crlf_and_ipv6_canonical() {
        assert_eq!(
            kind("2026-11-21 04:52:53,446 fail2ban.actions [1]: NOTICE  [s] Unban ::FFFF:192.0.2.9\r\n"),
            Kind::Event {
                jail: JailName::new("s").unwrap(),
                action: Action::Unban,
                ip: "192.0.2.9".parse().unwrap()
            }
        );
    }
}
