//! Telling a stopping fail2ban's Unbans from real ones: a pure state machine.
//!
//! When a jail stops (fail2ban-client stop, reload without the jail, server stop or
//! restart), fail2ban unbans every address the jail holds and logs an `Unban` line
//! for each, exactly like an expiry or a manual `unbanip`. Propagating those would
//! unban the whole jail on every node each time one node restarts fail2ban. What
//! fail2ban 1.0.2 really writes (measured with a private server):
//!
//! ```text
//! server stop:  Shutdown in progress...            (fail2ban.server)
//!               Stopping all jails
//!               [ja] Flush ticket(s) with <action>  (only for actions with actionflush)
//!               [ja] Unban 192.0.2.1                 ... one per active ban
//!               Jail 'ja' stopped
//!               Exiting Fail2ban
//! jail stop:    [jb] Flush ticket(s) with <action>  (only for actions with actionflush)
//!               [jb] Unban 2001:db8::5
//!               Jail 'jb' stopped
//! unban --all:  [ja] Flush ticket(s) with <action>
//!               [ja] Unban 192.0.2.1                 (no "stopped": a manual unban)
//! ```
//!
//! So:
//!
//! - From a server-wide stop line (`Shutdown in progress...`, `Stopping all jails`)
//!   every Unban is suppressed at once, until the server is gone or back
//!   (`Exiting Fail2ban`, `Starting Fail2ban`, `Daemon started`, `Reload finished.`,
//!   any `Jail 'x' started`), a line from another process id, or
//!   [`StopFilter::quiet`] passes with no line of the stop.
//! - Otherwise an Unban is *held* for [`StopFilter::hold`]: if `Jail 'x' stopped`
//!   follows within that time, the held Unbans of the jail are dropped (those after
//!   its `Flush ticket(s)` line if there was one, else all); if anything shows the
//!   jail alive (a Ban, Found, Restore/Increase Ban, "already banned"), or the time
//!   passes (by the clock or by the log's own timestamps), or another `Flush
//!   ticket(s)` line of the jail starts a new flush, they are reported.
//!
//! At loglevel NOTICE (fail2ban's default is INFO) none of the INFO lines above are
//! written. Until an INFO line has been seen, an Unban after a `Flush ticket(s)`
//! line whose hold runs out is taken as part of a stop and dropped (`unban --all`
//! cannot be told apart there), and the Unbans of a stop with actions that have no
//! `actionflush` cannot be recognised at all.
//!
//! Nothing can stay suppressed: a held Unban is decided after `hold` at the
//! latest, and the server-wide state ends after `quiet`. The price is that an
//! Unban is reported `hold` late, and Unbans of different jails may be reported in
//! a different order than they were logged (within a jail the order is kept).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use f2b_proto::{Action, JailName};

use crate::parse::{Kind, LogEntry, ServerNote, SkipReason};

/// How long an Unban waits for a `Jail 'x' stopped` that would make it part of a
/// stop.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(5);

/// How long a server-wide stop lasts with no line of it before Unbans are
/// reported again (a fail2ban that hangs while stopping).
pub const DEFAULT_QUIET: Duration = Duration::from_secs(60);

/// A Ban or Unban read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub jail: JailName,
    pub action: Action,
    pub ip: IpAddr,
    /// The line's timestamp, if it had a valid one.
    pub time: Option<NaiveDateTime>,
    /// The line number in the stream read (1-based), for logs and `scan`.
    pub line: u64,
}

/// Why an Unban is not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SuppressReason {
    /// Written while the whole server stopped.
    ServerStopping,
    /// Written while the jail stopped.
    JailStopping,
}

impl SuppressReason {
    pub fn code(self) -> &'static str {
        match self {
            SuppressReason::ServerStopping => "server_stopping",
            SuppressReason::JailStopping => "jail_stopping",
        }
    }
}

impl fmt::Display for SuppressReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// What to do with a [`Seen`] event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Report(Seen),
    Suppress(Seen, SuppressReason),
}

#[derive(Debug)]
struct ServerStop {
    last: Instant,
    last_time: Option<NaiveDateTime>,
}

#[derive(Debug)]
struct Held {
    seen: Seen,
    received: Instant,
    after_flush: bool,
}

/// The state machine; see the module documentation.
#[derive(Debug)]
pub struct StopFilter {
    hold: Duration,
    quiet: Duration,
    server: Option<ServerStop>,
    /// Jails whose `Flush ticket(s)` line was seen, not yet followed by a stop or a
    /// sign of life.
    flushing: HashSet<String>,
    held: VecDeque<Held>,
    pid: Option<u32>,
    /// Whether INFO lines have been seen: only then are `Jail 'x' stopped` lines
    /// written, so only then does a Flush without one mean `unban --all`.
    info_seen: bool,
}

impl Default for StopFilter {
    fn default() -> Self {
        StopFilter::new(DEFAULT_HOLD, DEFAULT_QUIET)
    }
}

impl StopFilter {
    /// A filter that holds Unbans for `hold` and ends a silent server stop after
    /// `quiet`.
    pub fn new(hold: Duration, quiet: Duration) -> Self {
        StopFilter {
            hold,
            quiet,
            server: None,
            flushing: HashSet::new(),
            held: VecDeque::new(),
            pid: None,
            info_seen: false,
        }
    }

    /// How long an Unban is held.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// How long a server-wide stop lasts without a line of it.
    pub fn quiet(&self) -> Duration {
        self.quiet
    }

    /// Whether a server-wide stop is in progress.
    pub fn server_stopping(&self) -> bool {
        self.server.is_some()
    }

    /// How many Unbans are held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// When [`StopFilter::release_due`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held = self.held.iter().map(|h| h.received + self.hold).min();
        let server = self.server.as_ref().map(|s| s.last + self.quiet);
        match (held, server) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Releases what has waited long enough at `now`.
    pub fn release_due(&mut self, now: Instant, out: &mut Vec<Verdict>) {
        if self
            .server
            .as_ref()
            .is_some_and(|s| now >= s.last + self.quiet)
        {
            self.server = None;
        }
        let hold = self.hold;
        self.expire_where(out, |h| now >= h.received + hold);
    }

    /// Decides everything held as if its hold had run out (end of a scan,
    /// shutdown).
    pub fn release_all(&mut self, out: &mut Vec<Verdict>) {
        self.expire_where(out, |_| true);
    }

    /// Reports everything held (a stop or start line shows none of it was part of
    /// a stop).
    fn report_all(&mut self, out: &mut Vec<Verdict>) {
        out.extend(self.held.drain(..).map(|h| Verdict::Report(h.seen)));
    }

    /// Feeds one parsed line (number `line`), read at `now`; verdicts go to `out`,
    /// in the order they are decided.
    pub fn push(&mut self, entry: &LogEntry, line: u64, now: Instant, out: &mut Vec<Verdict>) {
        self.release_due(now, out);
        if entry.level.shows_info() {
            self.info_seen = true;
        }
        if let Some(pid) = entry.pid {
            if self.pid.is_some_and(|p| p != pid) {
                // Another fail2ban process: whatever the old one was doing is over.
                self.server = None;
                self.flushing.clear();
                self.report_all(out);
            }
            self.pid = Some(pid);
        }
        if let Some(t) = entry.time {
            let hold = chrono::Duration::from_std(self.hold).unwrap_or(chrono::Duration::MAX);
            let quiet = chrono::Duration::from_std(self.quiet).unwrap_or(chrono::Duration::MAX);
            if self
                .server
                .as_ref()
                .and_then(|s| s.last_time)
                .is_some_and(|last| last.checked_add_signed(quiet).is_some_and(|end| t > end))
            {
                self.server = None;
            }
            self.expire_where(out, |h| {
                h.seen
                    .time
                    .and_then(|ht| ht.checked_add_signed(hold))
                    .is_some_and(|end| t > end)
            });
        }
        match &entry.kind {
            Kind::Event { jail, action, ip } => {
                let seen = Seen {
                    jail: jail.clone(),
                    action: *action,
                    ip: *ip,
                    time: entry.time,
                    line,
                };
                match action {
                    Action::Ban => {
                        self.alive(jail.as_str(), out);
                        out.push(Verdict::Report(seen));
                    }
                    Action::Unban => {
                        if let Some(s) = &mut self.server {
                            s.last = now;
                            s.last_time = entry.time.or(s.last_time);
                            out.push(Verdict::Suppress(seen, SuppressReason::ServerStopping));
                        } else {
                            let after_flush = self.flushing.contains(jail.as_str());
                            self.held.push_back(Held {
                                seen,
                                received: now,
                                after_flush,
                            });
                        }
                    }
                }
            }
            Kind::Skipped { jail, reason } => match reason {
                SkipReason::RestoreBan
                | SkipReason::IncreaseBan
                | SkipReason::AlreadyBanned
                | SkipReason::Reban => self.alive(jail, out),
                _ => {}
            },
            Kind::Found { jail } => self.alive(jail, out),
            Kind::Flush { jail } => {
                // Unbans held from before this flush are not part of it (an earlier
                // `unban --all` not followed by a stop, an expiry, a manual unban).
                self.release_where(out, |h| h.seen.jail.as_str() == jail);
                self.flushing.insert(jail.clone());
                self.touch_server(now, entry.time);
            }
            Kind::JailStarted { jail } => {
                self.server = None;
                self.alive(jail, out);
            }
            Kind::JailStopped { jail } => {
                self.touch_server(now, entry.time);
                self.flushing.remove(jail);
                let mine = |h: &Held| h.seen.jail.as_str() == jail;
                // With a Flush line, the Unbans after it are the stop's; without one
                // (actions with no actionflush), every Unban still held is.
                let any_after_flush = self.held.iter().any(|h| mine(h) && h.after_flush);
                let mut kept = VecDeque::with_capacity(self.held.len());
                for h in self.held.drain(..) {
                    let drop = mine(&h) && (h.after_flush || !any_after_flush);
                    if drop {
                        out.push(Verdict::Suppress(h.seen, SuppressReason::JailStopping));
                    } else if mine(&h) {
                        out.push(Verdict::Report(h.seen));
                    } else {
                        kept.push_back(h);
                    }
                }
                self.held = kept;
            }
            Kind::Server(ServerNote::Stopping) => {
                self.report_all(out);
                self.server = Some(ServerStop {
                    last: now,
                    last_time: entry.time,
                });
            }
            Kind::Server(ServerNote::Starting | ServerNote::Exited | ServerNote::Reloaded) => {
                self.server = None;
                self.flushing.clear();
                self.report_all(out);
            }
            Kind::JailNote { .. } | Kind::Other => {}
        }
    }

    /// The jail shows it is running: its held Unbans are real.
    fn alive(&mut self, jail: &str, out: &mut Vec<Verdict>) {
        self.flushing.remove(jail);
        self.release_where(out, |h| h.seen.jail.as_str() == jail);
    }

    fn touch_server(&mut self, now: Instant, time: Option<NaiveDateTime>) {
        if let Some(s) = &mut self.server {
            s.last = now;
            s.last_time = time.or(s.last_time);
        }
    }

    /// Ends the hold of the Unbans matching `pred` because their time is up: they
    /// are reported, except those after a Flush line when the log has no INFO
    /// lines (fail2ban at loglevel NOTICE writes no `Jail 'x' stopped`, so a flush
    /// is taken for a stop).
    fn expire_where(&mut self, out: &mut Vec<Verdict>, pred: impl Fn(&Held) -> bool) {
        if !self.held.iter().any(&pred) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.held.len());
        for h in self.held.drain(..) {
            if !pred(&h) {
                kept.push_back(h);
            } else if h.after_flush && !self.info_seen {
                out.push(Verdict::Suppress(h.seen, SuppressReason::JailStopping));
            } else {
                out.push(Verdict::Report(h.seen));
            }
        }
        self.held = kept;
    }

    fn release_where(&mut self, out: &mut Vec<Verdict>, pred: impl Fn(&Held) -> bool) {
        if !self.held.iter().any(&pred) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.held.len());
        for h in self.held.drain(..) {
            if pred(&h) {
                out.push(Verdict::Report(h.seen));
            } else {
                kept.push_back(h);
            }
        }
        self.held = kept;
    }
}
