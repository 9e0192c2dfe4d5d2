//! Telling a stopping fail2ban's Unbans from real ones: a pure state machine.
//!
//! When a jail stops (fail2ban-client stop, reload without the jail, server stop or
//! restart), fail2ban unbans every address the jail holds and logs an `Unban` line
//! for each, exactly like an expiry or a manual `unbanip`. Propagating those would
//! unban the whole jail on every node each time one node restarts fail2ban. What
//! fail2ban 1.0.2 really writes (measured with a private server, see
//! `tests/data`):
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
//! A stop's Unbans come in one tight burst, written by one loop with no wait in
//! it: in the captures they are within a few milliseconds of each other, and the
//! `Jail 'x' stopped` line follows the last one in the same millisecond (without a
//! Flush line) or within about 600 ms (after a Flush line, when the jail's threads
//! are joined).
//!
//! # The rules
//!
//! - From a server-wide stop line (`Shutdown in progress...`, `Stopping all jails`)
//!   every Unban is suppressed at once, until the server is gone or back
//!   (`Exiting Fail2ban`, `Starting Fail2ban`, `Daemon started`, `Reload finished.`,
//!   any `Jail 'x' started`), a line from another process id, or
//!   [`StopFilter::quiet`] passes with no line of the stop.
//! - Otherwise an Unban is *held*, for [`StopFilter::hold`] at most, and then
//!   decided by what comes next:
//!   - `Jail 'x' stopped`: the held Unbans of the jail that follow its
//!     `Flush ticket(s)` line are the stop's and are suppressed. Without a Flush
//!     line (actions with no `actionflush`) only the burst right before the
//!     stopped line is the stop's: going back from the stopped line, the held
//!     Unbans of the jail are suppressed as long as each is within [`BURST_GAP`]
//!     of the next one (the last within `BURST_GAP` of the stopped line), by the
//!     lines' timestamps (by when they were read, for lines without one). Older
//!     held Unbans of the jail were real and are reported.
//!   - a line from another process id: the old fail2ban process stopped, so every
//!     Unban still held from it was its stop flushing its bans: suppressed.
//!   - a sign that the jail is running (a Ban, Found, Restore/Increase Ban,
//!     "already banned", `Jail 'x' started`), another `Flush ticket(s)` line of
//!     the jail, or a server start, reload or stop line: reported.
//!   - nothing within `hold` (by the clock, or by the log's own timestamps):
//!     reported.
//! - An Unban follows a `Flush ticket(s)` line if it comes within `hold` of that
//!   line or of the flush's previous Unban, with no sign of life of the jail in
//!   between.
//!
//! At loglevel NOTICE (fail2ban's default is INFO) none of the INFO lines above are
//! written: no `Jail 'x' stopped`, no server lines. Until an INFO line has been
//! seen, an Unban after a `Flush ticket(s)` line is taken as part of a stop
//! whenever it is decided (hold run out, a sign of life such as the `Restore Ban`
//! lines of `fail2ban-client reload --restart`, a new process id), so `unban --all`
//! cannot be told from a stop there; and the Unbans of a stop with actions that
//! have no `actionflush` are recognised only when a new process id follows them
//! within `hold` (a restart), not for a stop of one jail.
//!
//! Nothing can stay suppressed: a held Unban is decided after `hold` at the
//! latest, and the server-wide state ends after `quiet`. The price is that an
//! Unban is reported `hold` late, and Unbans of different jails may be reported in
//! a different order than they were logged (within a jail the order is kept).
//!
//! Held Unbans are kept per jail, oldest first, and time only goes forward, so a
//! line costs a look at the oldest held Unban of each jail, not at all of them.

use std::collections::{BTreeMap, HashMap, VecDeque};
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

/// The largest gap between two Unbans of one stop burst, and between the last of
/// them and `Jail 'x' stopped`, when the jail logged no Flush line.
pub const BURST_GAP: Duration = Duration::from_secs(1);

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

impl Verdict {
    /// The event decided.
    pub fn seen(&self) -> &Seen {
        match self {
            Verdict::Report(s) | Verdict::Suppress(s, _) => s,
        }
    }
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
    /// The line number of the jail's `Flush ticket(s)` line this Unban follows.
    flush_line: Option<u64>,
}

impl Held {
    /// The first line this Unban's verdict depends on.
    fn first_line(&self) -> u64 {
        self.flush_line.unwrap_or(self.seen.line)
    }
}

/// A jail's flush in progress.
#[derive(Debug)]
struct Flushing {
    /// The `Flush ticket(s)` line.
    line: u64,
    /// When its last line (the Flush line or one of its Unbans) was written and
    /// read: the next Unban belongs to the flush only if it follows within `hold`.
    last_time: Option<NaiveDateTime>,
    last_read: Instant,
}

/// The state machine; see the module documentation.
///
/// The `now` given to one call must not be earlier than the one before.
#[derive(Debug)]
pub struct StopFilter {
    hold: Duration,
    quiet: Duration,
    server: Option<ServerStop>,
    /// Jails whose `Flush ticket(s)` line was seen, not yet followed by a stop or
    /// a sign of life.
    flushing: HashMap<String, Flushing>,
    /// Held Unbans per jail, oldest first; no empty queue is kept.
    held: BTreeMap<String, VecDeque<Held>>,
    held_count: usize,
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
            flushing: HashMap::new(),
            held: BTreeMap::new(),
            held_count: 0,
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
        self.held_count
    }

    /// Whether lines at level INFO have been seen (the log shows start and stop
    /// lines).
    pub fn info_seen(&self) -> bool {
        self.info_seen
    }

    /// Starts as if INFO lines had been seen (`true`): for a monitor resuming a
    /// log whose earlier lines a previous run read.
    pub fn with_info_seen(mut self, seen: bool) -> Self {
        self.info_seen = seen;
        self
    }

    /// The first line number whose verdict is not final: the oldest held Unban, or
    /// the Flush line it follows. A reader that stops now must read again from
    /// this line to reach the same verdicts.
    pub fn oldest_line(&self) -> Option<u64> {
        self.held
            .values()
            .filter_map(|q| q.front())
            .map(Held::first_line)
            .min()
    }

    /// When [`StopFilter::release_due`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held = self
            .held
            .values()
            .filter_map(|q| q.front())
            .map(|h| h.received + self.hold)
            .min();
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
        self.expire_fronts(out, |h| now >= h.received + hold);
    }

    /// Decides everything held as if its hold had run out (end of a scan,
    /// shutdown).
    pub fn release_all(&mut self, out: &mut Vec<Verdict>) {
        self.decide_all(out, None);
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
                // Another fail2ban process: the old one stopped, and every Unban
                // still held from it was its stop flushing its bans.
                self.server = None;
                self.flushing.clear();
                self.decide_all(out, Some(SuppressReason::ServerStopping));
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
            self.expire_fronts(out, |h| {
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
                            let flush_line = self.flush_of(jail.as_str(), entry.time, now);
                            self.held
                                .entry(jail.as_str().to_owned())
                                .or_default()
                                .push_back(Held {
                                    seen,
                                    received: now,
                                    flush_line,
                                });
                            self.held_count += 1;
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
                self.release_jail(jail, out);
                // A jail with several flushable actions logs one Flush line for
                // each, then the Unbans.
                self.flushing.insert(
                    jail.clone(),
                    Flushing {
                        line,
                        last_time: entry.time,
                        last_read: now,
                    },
                );
                self.touch_server(now, entry.time);
            }
            Kind::JailStarted { jail } => {
                self.server = None;
                self.alive(jail, out);
            }
            Kind::JailStopped { jail } => {
                self.touch_server(now, entry.time);
                self.flushing.remove(jail);
                self.jail_stopped(jail, entry.time, now, out);
            }
            Kind::Server(ServerNote::Stopping) => {
                self.decide_all(out, None);
                self.server = Some(ServerStop {
                    last: now,
                    last_time: entry.time,
                });
            }
            Kind::Server(ServerNote::Starting | ServerNote::Exited | ServerNote::Reloaded) => {
                self.server = None;
                self.flushing.clear();
                self.decide_all(out, None);
            }
            Kind::JailNote { .. } | Kind::Other => {}
        }
    }

    /// `Jail 'x' stopped`, written at `time` and read at `now`: decides the jail's
    /// held Unbans (see the module documentation).
    fn jail_stopped(
        &mut self,
        jail: &str,
        time: Option<NaiveDateTime>,
        now: Instant,
        out: &mut Vec<Verdict>,
    ) {
        let Some(queue) = self.held.remove(jail) else {
            return;
        };
        self.held_count -= queue.len();
        // After a Flush line the Unbans are the stop's. Without one, the burst
        // that ends at the stopped line is (and a flush that outlasts `hold` goes
        // on as such a burst).
        let mut burst_start = queue.len();
        let (mut next_time, mut next_read) = (time, now);
        while burst_start > 0 {
            let h = &queue[burst_start - 1];
            if h.flush_line.is_none()
                && gap(h.seen.time, h.received, next_time, next_read) > BURST_GAP
            {
                break;
            }
            burst_start -= 1;
            (next_time, next_read) = (h.seen.time, h.received);
        }
        for (i, h) in queue.into_iter().enumerate() {
            out.push(if i >= burst_start || h.flush_line.is_some() {
                Verdict::Suppress(h.seen, SuppressReason::JailStopping)
            } else {
                Verdict::Report(h.seen)
            });
        }
    }

    /// The Flush line an Unban of `jail` written at `time` and read at `now`
    /// follows: the jail's flush, if its last line came within `hold` (a flush
    /// unbans in one loop; an Unban long after a Flush whose jail showed nothing
    /// since is an expiry or a manual unban).
    fn flush_of(&mut self, jail: &str, time: Option<NaiveDateTime>, now: Instant) -> Option<u64> {
        let f = self.flushing.get_mut(jail)?;
        if gap(f.last_time, f.last_read, time, now) > self.hold {
            self.flushing.remove(jail);
            return None;
        }
        f.last_time = time.or(f.last_time);
        f.last_read = now;
        Some(f.line)
    }

    /// The jail shows it is running: its held Unbans are decided.
    fn alive(&mut self, jail: &str, out: &mut Vec<Verdict>) {
        self.flushing.remove(jail);
        self.release_jail(jail, out);
    }

    /// Decides the held Unbans of `jail` as if their hold had run out.
    fn release_jail(&mut self, jail: &str, out: &mut Vec<Verdict>) {
        if let Some(queue) = self.held.remove(jail) {
            self.held_count -= queue.len();
            let info_seen = self.info_seen;
            out.extend(queue.into_iter().map(|h| released(h, info_seen)));
        }
    }

    fn touch_server(&mut self, now: Instant, time: Option<NaiveDateTime>) {
        if let Some(s) = &mut self.server {
            s.last = now;
            s.last_time = time.or(s.last_time);
        }
    }

    /// Decides every held Unban, in line order: suppressed for `reason`, or, with
    /// none, as if its hold had run out.
    fn decide_all(&mut self, out: &mut Vec<Verdict>, reason: Option<SuppressReason>) {
        if self.held_count == 0 {
            return;
        }
        let held = std::mem::take(&mut self.held);
        self.held_count = 0;
        let info_seen = self.info_seen;
        let decided = held
            .into_values()
            .flatten()
            .map(|h| match reason {
                Some(r) => Verdict::Suppress(h.seen, r),
                None => released(h, info_seen),
            })
            .collect();
        sort_into(decided, out);
    }

    /// Ends the hold of the oldest Unbans of each jail while `due` says their time
    /// is up (each jail's queue is in time order).
    fn expire_fronts(&mut self, out: &mut Vec<Verdict>, due: impl Fn(&Held) -> bool) {
        if self.held_count == 0 {
            return;
        }
        let mut expired = Vec::new();
        self.held.retain(|_, queue| {
            while let Some(h) = queue.pop_front() {
                if !due(&h) {
                    queue.push_front(h);
                    break;
                }
                expired.push(h);
            }
            !queue.is_empty()
        });
        if expired.is_empty() {
            return;
        }
        self.held_count -= expired.len();
        let info_seen = self.info_seen;
        let decided = expired
            .into_iter()
            .map(|h| released(h, info_seen))
            .collect();
        sort_into(decided, out);
    }
}

/// The verdict on a held Unban whose hold ends with no stop line: reported,
/// except one after a Flush line when the log has no INFO lines (fail2ban at
/// loglevel NOTICE writes no `Jail 'x' stopped`, so a flush is taken for a stop).
fn released(h: Held, info_seen: bool) -> Verdict {
    if h.flush_line.is_some() && !info_seen {
        Verdict::Suppress(h.seen, SuppressReason::JailStopping)
    } else {
        Verdict::Report(h.seen)
    }
}

/// How long after `a` `b` came, by their log times if both have one, else by
/// when they were read; 0 if before.
fn gap(
    a_time: Option<NaiveDateTime>,
    a_read: Instant,
    b_time: Option<NaiveDateTime>,
    b_read: Instant,
) -> Duration {
    match (a_time, b_time) {
        (Some(a), Some(b)) => (b - a).to_std().unwrap_or(Duration::ZERO),
        _ => b_read.saturating_duration_since(a_read),
    }
}

/// Appends `verdicts` to `out` in log order.
fn sort_into(mut verdicts: Vec<Verdict>, out: &mut Vec<Verdict>) {
    verdicts.sort_by_key(|v| v.seen().line);
    out.append(&mut verdicts);
}
