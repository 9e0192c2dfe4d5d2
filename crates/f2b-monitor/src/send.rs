//! Delivering events to the publisher: a ZeroMQ REQ socket in a blocking thread.
//!
//! Each request is sent and its reply awaited for `ack_timeout`. On a timeout or
//! a socket error the REQ socket is closed (a REQ socket that lost its reply is
//! stuck in its send/receive lockstep) and recreated, and the same events (same
//! ids) are sent again after an exponential backoff from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`]. Events go strictly in order, one request at a time, at least
//! once; the publisher answers a repeated id with `duplicate` and does not
//! broadcast twice.
//!
//! A lone event goes at once as a `report`. When more events are there without
//! waiting (the one in hand and whatever the queue holds now: a burst, or a
//! backlog after an outage), the longest prefix one request carries
//! ([`Request::pack`]: up to [`MAX_REPORT_EVENTS`] events in 8 KiB) goes as one
//! `reports` request; nothing waits to fill one. Its `replies` are taken in order,
//! each as a single report's reply would be (ACKed, dropped, quarantined); at the
//! first transient NAK the rest of the request stays queued and is sent again,
//! packed anew, after the backoff. A `replies` that does not answer exactly the
//! events sent, in order, counts as unreadable. One NAK for the whole request: a
//! transient reason resends it after the backoff; `unknown_type` (a publisher
//! older than `reports`) is logged once and from then on every event goes alone;
//! any other reason sends those events again one per request, so that each gets
//! its own answer and none is dropped for another's fault. Such a refusal is
//! taken even without a valid MAC (a publisher cannot sign the answer to a
//! request it cannot decode), since sending one at a time cannot lose an event.
//! Metrics, logs and the saved queue count every event, whatever request it went
//! in.
//!
//! With this node's [`Credential`] (`[trust] secret`), every send of a request,
//! every resend too, is signed anew (a new time and nonce, the same payload and
//! event ids), and a reply counts only if its MAC is right (see `exchange.rs`).
//! A reply that fails authentication is treated like no reply (new socket,
//! resend after the backoff) and logged as a warning: the secrets differ between
//! this node's `[trust]` and the publisher's `[trust.monitors]`, or the reply is
//! forged.
//!
//! NAKs:
//! - `unauthenticated` (the publisher refused this node's credential) and
//!   `replayed` (the publisher found the timestamp too far from its clock, or the
//!   nonce seen before) keep the event and retry it with the backoff, with an
//!   error saying what to check. They are taken even without a valid MAC (a
//!   publisher that does not know this node's key cannot sign them), for "not
//!   now" only.
//! - `quarantined` (the publisher's circuit breaker) drops the event.
//! - other transient reasons (busy, rate limited) are retried;
//! - any other NAK drops the event, since sending it again cannot change the
//!   answer; it is logged at error level with its reason and detail (quoted and
//!   escaped: the detail is the publisher's text).
//!
//! A problem that repeats on every retry (no reply, a refused credential, a
//! refused clock, a quarantine, replies that fail authentication) is logged when
//! it starts, then
//! summarized at most every [`NAG_EVERY`], and once more when it ends, not once
//! per retry.
//!
//! A bare `NAK` in answer to a native request is an old fail2ban-zmq-tools
//! publisher refusing a format it does not know: logged once at error level
//! (`set [monitor] legacy = true`), and the event is resent every
//! [`SenderParams::max_backoff`] until the publisher is replaced or the
//! configuration fixed. It is never dropped.
//!
//! With `[monitor] legacy = true` the requests are in fail2ban-zmq-tools' format
//! (`[token|]host|jail|Ban|ip`, see [`f2b_proto::legacy`]) for an old publisher: its
//! reply is the message echoed without the token (success) or the bare string `NAK`
//! (dropped). Events that format cannot carry (IPv6, a jail with characters other
//! than letters, digits, `_` and `-`, longer than the old 64-byte limit) are
//! logged at error level and dropped. No credential is used in that format, and
//! every request carries one event.
//!
//! The thread polls the REQ socket together with the shutdown socket
//! ([`f2b_common::sockets::shutdown_socket`]); on shutdown it keeps delivering
//! what is queued for at most `drain_time`, then returns.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use f2b_common::config::LegacyPeer;
use f2b_common::metrics::prometheus_client::metrics::gauge::Gauge;
use f2b_common::metrics::{Condition, MonitorMetrics};
use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::{legacy, Ack, Event, Nak, NakReason, Reply, Request, MAX_REPORT_EVENTS};
use tokio::sync::mpsc;

pub use crate::exchange::Credential;
use crate::exchange::{self, Received};
use crate::link::Link;
use crate::state::StateStore;

/// The first wait before a resend.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between resends.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A problem that repeats on every retry is summarized in the log at most this
/// often (besides when it starts and when it ends).
pub const NAG_EVERY: Duration = Duration::from_secs(60);

/// `f2b_monitor_events_dropped_total`'s reason for an event a legacy publisher
/// refused (its bare `NAK`).
pub const DROPPED_LEGACY_NAK: &str = "legacy_nak";
/// `f2b_monitor_events_dropped_total`'s reason for an event the legacy format
/// cannot carry (never sent).
pub const DROPPED_LEGACY_FORMAT: &str = "legacy_format";

/// fail2ban-zmq-tools' only refusal: the bare string `NAK`.
fn is_legacy_nak(reply: &[u8]) -> bool {
    reply.trim_ascii() == b"NAK"
}

/// What the sender thread needs besides its queue.
pub struct SenderParams {
    pub ctx: zmq::Context,
    /// The publisher's REP endpoint.
    pub endpoint: String,
    pub ack_timeout: Duration,
    /// How long queued events are still tried after shutdown.
    pub drain_time: Duration,
    /// Readable once shutdown has begun ([`f2b_common::sockets::shutdown_socket`]).
    pub shutdown: zmq::Socket,
    /// Speak fail2ban-zmq-tools' format to an old publisher.
    pub legacy: Option<LegacyPeer>,
    /// This node's credential: every native report is signed with it and every
    /// reply checked. `None`: reports go unauthenticated (`[trust]
    /// allow_unauthenticated`). Not used in the legacy format.
    pub credential: Option<Credential>,
    /// Events left by a previous run, sent before anything from the queue.
    pub backlog: Vec<Event>,
    /// Where answered events are recorded, if state is kept.
    pub state: Option<Arc<Mutex<StateStore>>>,
    /// The longest wait between resends ([`BACKOFF_MAX`] in the daemon).
    pub max_backoff: Duration,
    /// The bound on events not yet answered, given a place back per answer;
    /// `None`: no bound.
    pub room: Option<Arc<Room>>,
    /// Where sends, answers, drops, timeouts and round trips are counted
    /// ([`crate::detached_metrics`] when nobody reads them).
    pub metrics: MonitorMetrics,
    /// Watches the connection to the publisher for readiness while idle
    /// ([`crate::link`]); with it, the socket is connected at start.
    pub link: Option<Link>,
}

/// The bound on events read but not yet answered (`[monitor] queue_size`): the
/// reading side takes a place for each event before it writes it to the queue
/// file and queues it, and the sender gives the place back when the publisher
/// has answered (or the event was dropped). So the queue file and the queue hold
/// at most `capacity` events (more only while a backlog left by a run with a
/// larger bound is sent).
#[derive(Debug)]
pub struct Room {
    places: tokio::sync::Semaphore,
    capacity: usize,
    /// Places not to give back: the events of a backlog beyond `capacity`.
    debt: AtomicUsize,
    /// The events held (`f2b_monitor_events_queued`).
    queued: Gauge,
    /// Readiness: a free place (`queue_has_room`).
    has_room: Option<Condition>,
}

impl Room {
    /// A bound of `capacity` events, `taken` of them already pending (a backlog).
    pub fn new(capacity: usize, taken: usize) -> Self {
        let queued = Gauge::default();
        queued.set(i64::try_from(taken).unwrap_or(i64::MAX));
        Room {
            places: tokio::sync::Semaphore::new(capacity.saturating_sub(taken)),
            capacity,
            debt: AtomicUsize::new(taken.saturating_sub(capacity)),
            queued,
            has_room: None,
        }
    }

    /// Keeps `queued` at the number of events held and `has_room` to whether a
    /// place is free, from now on and at every change.
    pub fn observed(mut self, queued: Gauge, has_room: Condition) -> Self {
        queued.set(self.queued.get());
        self.queued = queued;
        self.has_room = Some(has_room);
        self.changed();
        self
    }

    /// Updates `has_room` after a change. Another thread may change the places
    /// between the read and the store: read again until they agree, so that the
    /// last store is right (cheap: atomics, and a second pass only on a race).
    fn changed(&self) {
        let Some(has_room) = &self.has_room else {
            return;
        };
        loop {
            let free = self.places.available_permits() > 0;
            has_room.set(free);
            if (self.places.available_permits() > 0) == free {
                return;
            }
        }
    }

    fn took(&self, n: usize) {
        self.queued.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
        self.changed();
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Free places now.
    pub fn available(&self) -> usize {
        self.places.available_permits()
    }

    /// Waits for `n` free places and takes them.
    pub async fn take(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if let Ok(p) = self.places.acquire_many(n).await {
            p.forget();
            self.took(n as usize);
        }
    }

    /// Waits until `n` places are free, without taking them.
    pub async fn wait_free(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        // Taken and given back at once (the permit's drop).
        let _ = self.places.acquire_many(n).await;
    }

    /// Takes `n` places if they are free now; returns whether it did.
    pub fn try_take(&self, n: usize) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        match self.places.try_acquire_many(n) {
            Ok(p) => {
                p.forget();
                self.took(n as usize);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives one place back: an event was answered.
    pub fn give(&self) {
        let paid = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if !paid {
            self.places.add_permits(1);
        }
        self.queued.dec();
        self.changed();
    }
}

impl fmt::Debug for SenderParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderParams")
            .field("endpoint", &self.endpoint)
            .field("ack_timeout", &self.ack_timeout)
            .field("drain_time", &self.drain_time)
            .field("legacy", &self.legacy)
            .field("credential", &self.credential)
            .field("backlog", &self.backlog.len())
            .field("max_backoff", &self.max_backoff)
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ACKed (and logged as `reported`).
    Acked,
    /// Refused for good; dropped.
    Rejected,
}

/// A request ready to send: how many events it carries, its payload, and in the
/// legacy format the echo expected back.
type Packed = (usize, Vec<u8>, Option<Vec<u8>>);

struct Seq(Option<u64>);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "{s}"),
            None => f.write_str("none"),
        }
    }
}

/// Logs a [`Nag`]'s occurrence: the first at `$level` with `$msg`, summaries at
/// the same level, the rest at debug level.
macro_rules! nag {
    ($tell:expr, $level:ident, $msg:expr, $($field:tt)*) => {
        match $tell {
            Tell::First => tracing::$level!($($field)* "{}", $msg),
            Tell::Again { untold, count, for_s } => tracing::$level!(
                $($field)* repeated = untold, count, for_s, "still: {}", $msg
            ),
            Tell::Quiet => tracing::debug!($($field)* "{}", $msg),
        }
    };
}

struct Sender {
    p: SenderParams,
    sock: Option<zmq::Socket>,
    /// Set when shutdown began: nothing is tried after it.
    deadline: Option<Instant>,
    /// Whether the "old publisher" error has been logged.
    told_old_publisher: bool,
    /// The publisher does not know `reports` requests: one event per request
    /// from now on.
    singles_only: bool,
    /// Problems that repeat on every retry, for the log.
    nags: Nags,
}

/// A problem that repeats on every retry, logged when it starts, then at most
/// every [`NAG_EVERY`], then when it ends.
#[derive(Debug, Default)]
struct Nag {
    since: Option<Instant>,
    told: Option<Instant>,
    count: u64,
    untold: u64,
}

/// Whether to log an occurrence of a [`Nag`].
#[derive(Debug, PartialEq, Eq)]
enum Tell {
    /// The first occurrence: say everything.
    First,
    /// A summary: `untold` occurrences since the last line, `count` in all, for
    /// `for_s` seconds.
    Again { untold: u64, count: u64, for_s: u64 },
    /// Nothing (debug level at most).
    Quiet,
}

impl Nag {
    fn hit(&mut self, now: Instant) -> Tell {
        self.count += 1;
        match (self.since, self.told) {
            (Some(since), Some(told)) => {
                self.untold += 1;
                if now.duration_since(told) < NAG_EVERY {
                    return Tell::Quiet;
                }
                self.told = Some(now);
                Tell::Again {
                    untold: std::mem::take(&mut self.untold),
                    count: self.count,
                    for_s: now.duration_since(since).as_secs(),
                }
            }
            _ => {
                *self = Nag {
                    since: Some(now),
                    told: Some(now),
                    count: 1,
                    untold: 0,
                };
                Tell::First
            }
        }
    }

    /// The problem is over: how many times it happened, for how many seconds, if
    /// it did.
    fn end(&mut self, now: Instant) -> Option<(u64, u64)> {
        let since = self.since?;
        let r = (self.count, now.duration_since(since).as_secs());
        *self = Nag::default();
        Some(r)
    }
}

#[derive(Debug, Default)]
struct Nags {
    unauthenticated: Nag,
    replayed: Nag,
    quarantined: Nag,
    not_authentic: Nag,
    unreachable: Nag,
}

/// The sender thread's body: delivers events from `rx` until it is closed (and
/// empty) or the shutdown deadline passes. Fails only if a socket cannot be
/// created or connected (a bad endpoint).
pub fn run_sender(
    mut params: SenderParams,
    mut rx: mpsc::Receiver<Event>,
) -> Result<(), crate::MonitorError> {
    let backlog = std::mem::take(&mut params.backlog);
    let mut s = Sender {
        p: params,
        sock: None,
        deadline: None,
        told_old_publisher: false,
        singles_only: false,
        nags: Nags::default(),
    };
    if s.p.link.is_some() {
        // Connect now: readiness shows whether the publisher is there before the
        // first event.
        s.socket()?;
    }
    // The events taken and not answered yet, oldest first: the backlog, then
    // what the queue gave.
    let mut pending: VecDeque<Event> = backlog.into();
    // How many events at the front go one per request (those of a `reports`
    // request refused as a whole).
    let mut singly = 0;
    let mut retry = Retry::new();
    loop {
        if pending.is_empty() {
            let Some(event) = s.next_event(&mut rx) else {
                return Ok(());
            };
            pending.push_back(event);
        }
        if s.packs() {
            // Whatever else is there now; nothing waits to fill a request.
            while pending.len() < MAX_REPORT_EVENTS {
                let Ok(event) = rx.try_recv() else {
                    break;
                };
                pending.push_back(event);
            }
        }
        s.note_shutdown();
        if s.past_deadline() {
            let left = pending.len() + drain_count(&mut rx);
            tracing::warn!(
                undelivered = left,
                "shutting down with events not delivered to the publisher"
            );
            return Ok(());
        }
        retry.attempt += 1;
        let one = singly > 0 || !s.packs();
        let Answer { settled, rest } = s.send_front(pending.make_contiguous(), one)?;
        if !settled.is_empty() {
            // Progress: the next event (or the rest of the request) starts afresh.
            retry = Retry::new();
            retry.attempt = u32::from(rest.is_some());
        }
        for outcome in settled {
            let Some(event) = pending.pop_front() else {
                break;
            };
            singly = usize::saturating_sub(singly, 1);
            if outcome == Outcome::Acked {
                s.p.metrics.events_acked.inc();
            }
            s.done(event.id);
        }
        match rest {
            None => {}
            Some(Failure::OneByOne(n)) => {
                singly = n;
                retry = Retry::new();
            }
            Some(failure) => {
                if let Some(event) = pending.front().cloned() {
                    s.retry_later(&event, failure, &mut retry);
                }
            }
        }
    }
}

/// The backoff before the next resend and how many sends the event at the
/// front of the queue has had.
struct Retry {
    backoff: Duration,
    attempt: u32,
}

impl Retry {
    fn new() -> Self {
        Retry {
            backoff: BACKOFF_MIN,
            attempt: 0,
        }
    }
}

/// What one send of a request settled.
struct Answer {
    /// The outcomes of the first events of the request, in order (ACKed or
    /// dropped); the events after them are still queued.
    settled: Vec<Outcome>,
    /// Why the events after them wait, if they do.
    rest: Option<Failure>,
}

impl Answer {
    fn failed(failure: Failure) -> Self {
        Answer {
            settled: Vec::new(),
            rest: Some(failure),
        }
    }
}

impl From<Result<Outcome, Failure>> for Answer {
    fn from(r: Result<Outcome, Failure>) -> Self {
        match r {
            Ok(outcome) => Answer {
                settled: vec![outcome],
                rest: None,
            },
            Err(failure) => Answer::failed(failure),
        }
    }
}

fn drain_count(rx: &mut mpsc::Receiver<Event>) -> usize {
    rx.close();
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    n
}

impl Sender {
    /// Records the answer in the state files, if kept, and frees its place.
    fn done(&self, id: f2b_proto::EventId) {
        if let Some(state) = &self.p.state {
            let r = match state.lock() {
                Ok(mut st) => st.done(id),
                Err(poisoned) => poisoned.into_inner().done(id),
            };
            if let Err(e) = r {
                tracing::warn!(error = %f2b_common::daemon::error_chain(&e), "cannot update the saved queue");
            }
        }
        if let Some(room) = &self.p.room {
            room.give();
        }
    }

    fn next_event(&mut self, rx: &mut mpsc::Receiver<Event>) -> Option<Event> {
        // The tail side closes the queue on shutdown, so this does not block
        // forever; it blocks only while waiting for the next log line.
        rx.blocking_recv()
    }

    fn socket(&mut self) -> Result<&zmq::Socket, crate::MonitorError> {
        if self.sock.is_none() {
            let err = |source| crate::MonitorError::Socket {
                endpoint: self.p.endpoint.clone(),
                source,
            };
            let s = new_socket(&self.p.ctx, zmq::REQ).map_err(err)?;
            if let Some(link) = &self.p.link {
                link.attach(&s);
            }
            s.connect(&self.p.endpoint).map_err(err)?;
            self.sock = Some(s);
        }
        Ok(self.sock.as_ref().expect("just set"))
    }

    /// Checks the shutdown socket without waiting; starts the drain deadline.
    fn note_shutdown(&mut self) {
        if self.deadline.is_none() && self.p.shutdown.poll(zmq::POLLIN, 0).unwrap_or(0) > 0 {
            let _ = self.p.shutdown.recv_bytes(zmq::DONTWAIT);
            self.deadline = Some(Instant::now() + self.p.drain_time);
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Waits up to `timeout` (cut to the shutdown deadline) for the REQ socket to
    /// be readable, watching the shutdown socket. Returns whether it is readable.
    fn wait_reply(&mut self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let end = self.deadline.map_or(end, |d| d.min(end));
            let now = Instant::now();
            if now >= end {
                return false;
            }
            let ms = i64::try_from((end - now).as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let Some(sock) = &self.sock else {
                return false;
            };
            let mut items = [
                sock.as_poll_item(zmq::POLLIN),
                self.p.shutdown.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, ms) {
                // A signal (a SIGHUP, which the daemon ignores) is not a reply
                // lost: wait for the rest of the time.
                Err(zmq::Error::EINTR) => continue,
                Err(_) => return false,
                Ok(_) => {}
            }
            let (readable, stop) = (items[0].is_readable(), items[1].is_readable());
            if stop {
                self.note_shutdown();
            }
            if readable {
                return true;
            }
        }
    }

    /// Sleeps `d` (cut to the shutdown deadline), waking early on shutdown.
    fn pause(&mut self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            let end = self.deadline.map_or(end, |dl| dl.min(end));
            let now = Instant::now();
            if now >= end {
                return;
            }
            let ms = i64::try_from((end - now).as_millis())
                .unwrap_or(i64::MAX)
                .max(1);
            let mut items = [self.p.shutdown.as_poll_item(zmq::POLLIN)];
            match zmq::poll(&mut items, ms) {
                Err(zmq::Error::EINTR) => continue,
                Err(_) => return,
                Ok(_) => {}
            }
            if items[0].is_readable() {
                // Shutdown: stop waiting, retry at once within the drain time.
                self.note_shutdown();
                return;
            }
        }
    }

    /// Whether several events may share a request: not in the legacy format,
    /// nor after the publisher said it does not know `reports` requests.
    fn packs(&self) -> bool {
        self.p.legacy.is_none() && !self.singles_only
    }

    /// The request for the events at the front of the queue (the first alone if
    /// `one`, else as many as one request carries), how many it carries and the
    /// legacy echo expected back; or why the configured format cannot carry the
    /// first.
    fn request(&self, front: &[Event], one: bool) -> Result<Packed, String> {
        let Some(event) = front.first() else {
            return Err("no event".into());
        };
        if self.p.legacy.is_some() {
            let (wire, echo) = self.encode_legacy(event)?;
            return Ok((1, wire, Some(echo)));
        }
        if !one {
            if let Some((request, n)) = Request::pack(front) {
                return Ok((n, request.encode(), None));
            }
        }
        Ok((1, Request::Report(event.clone()).encode(), None))
    }

    /// `event` in fail2ban-zmq-tools' format, and the echo expected back, or why
    /// that format cannot carry it.
    fn encode_legacy(&self, event: &Event) -> Result<(Vec<u8>, Vec<u8>), String> {
        let Some(peer) = &self.p.legacy else {
            return Err("not in the legacy format".into());
        };
        let IpAddr::V4(ip) = event.ip else {
            return Err("the legacy format carries IPv4 addresses only".into());
        };
        let jail = event.jail.as_str();
        if !jail
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err("the legacy format allows only letters, digits, _ and - in jails".into());
        }
        let echo = legacy::format(event.node.as_str(), jail, event.action, ip);
        let wire = match &peer.token {
            Some(t) => format!("{}|{echo}", t.expose()),
            None => echo.clone(),
        };
        if wire.len() > legacy::MAX_LEGACY_MESSAGE {
            return Err(format!(
                "longer than the legacy limit of {} bytes",
                legacy::MAX_LEGACY_MESSAGE
            ));
        }
        Ok((wire.into_bytes(), echo.into_bytes()))
    }

    /// Sends the events at the front of the queue once (see [`Sender::request`])
    /// and takes the answer.
    fn send_front(&mut self, front: &[Event], one: bool) -> Result<Answer, crate::MonitorError> {
        let (n, request, echo) = match self.request(front, one) {
            Ok(r) => r,
            Err(why) => {
                let Some(event) = front.first() else {
                    return Ok(Answer::failed(Failure::Broken(why)));
                };
                tracing::error!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    detail = %why,
                    "event cannot be sent to a legacy publisher, dropped"
                );
                self.p.metrics.events_dropped.inc(DROPPED_LEGACY_FORMAT);
                return Ok(Ok(Outcome::Rejected).into());
            }
        };
        self.attempt(&front[..n], &request, echo.as_deref())
    }

    /// After a failed send: logs it as its kind asks, drops the socket if it
    /// cannot be used again, and waits the backoff (`event`: the first one
    /// still queued).
    fn retry_later(&mut self, event: &Event, failure: Failure, retry: &mut Retry) {
        let Retry { backoff, attempt } = *retry;
        match failure {
            Failure::Transient | Failure::OneByOne(_) => {}
            Failure::OldPublisher => {
                if self.told_old_publisher {
                    tracing::debug!(
                        publisher = %self.p.endpoint,
                        id = %event.id,
                        attempt,
                        "the publisher answered NAK in the fail2ban-zmq-tools format, will retry"
                    );
                } else {
                    self.told_old_publisher = true;
                    tracing::error!(
                        publisher = %self.p.endpoint,
                        id = %event.id,
                        retry_every_ms = self.p.max_backoff.as_millis() as u64,
                        "the publisher answered NAK in the fail2ban-zmq-tools format: it is an old publisher; set [monitor] legacy = true"
                    );
                }
                // Nothing changes until the publisher or the configuration
                // does: retry slowly, keep the event.
                retry.backoff = self.p.max_backoff;
            }
            Failure::NotAuthentic(why) => {
                self.not_authentic(event, attempt, backoff, &why);
                // As with no reply: a new connection, the request signed anew.
                self.sock = None;
            }
            Failure::NoReply(why) => {
                self.p.metrics.ack_timeouts.inc();
                if let Some(link) = &self.p.link {
                    link.set_unanswered(true);
                }
                self.p.metrics.publisher_answering.set(false);
                let tell = self.nags.unreachable.hit(Instant::now());
                let endpoint = self.p.endpoint.as_str();
                nag!(
                    tell,
                    warn,
                    format!("publisher unreachable: is f2b-publisher running at {endpoint}, is the port open, is [monitor] publisher right? events are kept and resent"),
                    publisher = %endpoint,
                    id = %event.id,
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %why,
                );
                // A REQ socket that lost its reply cannot send again.
                self.sock = None;
            }
            Failure::Broken(why) => {
                tracing::warn!(
                    publisher = %self.p.endpoint,
                    id = %event.id,
                    attempt,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %why,
                    "no usable reply from the publisher, will retry"
                );
                // A new connection, in case this one is broken.
                self.sock = None;
            }
        }
        self.pause(retry.backoff);
        retry.backoff = (retry.backoff * 2).min(self.p.max_backoff);
    }

    /// One send of the request for `events` (one, or several in a `reports`
    /// request) and the wait for its answer.
    fn attempt(
        &mut self,
        events: &[Event],
        request: &[u8],
        echo: Option<&[u8]>,
    ) -> Result<Answer, crate::MonitorError> {
        // Signed anew for every send: a resend gets a new time and nonce.
        let credential = self.p.credential.clone().filter(|_| echo.is_none());
        let signed = match exchange::sign(credential.as_ref(), request) {
            Ok(s) => s,
            Err(why) => return Ok(Answer::failed(Failure::Broken(why))),
        };
        let sock = self.socket()?;
        if let Err(e) = sock.send_multipart(signed.frames, zmq::DONTWAIT) {
            return Ok(Answer::failed(Failure::Broken(format!("send: {e}"))));
        }
        let sent_at = Instant::now();
        self.p
            .metrics
            .events_sent
            .inc_by(u64::try_from(events.len()).unwrap_or(u64::MAX));
        if !self.wait_reply(self.p.ack_timeout) {
            return Ok(Answer::failed(if self.past_deadline() {
                Failure::Broken("shutdown deadline".to_owned())
            } else {
                Failure::NoReply(format!("no reply within {:?}", self.p.ack_timeout))
            }));
        }
        let Some(sock) = &self.sock else {
            return Ok(Answer::failed(Failure::Broken("socket gone".into())));
        };
        let (frames, total) = match exchange::recv_frames(sock) {
            Ok(f) => f,
            Err(e) => return Ok(Answer::failed(Failure::Broken(format!("receive: {e}")))),
        };
        self.p
            .metrics
            .round_trip
            .observe(sent_at.elapsed().as_secs_f64());
        self.answered();
        let [event, ..] = events else {
            return Ok(Answer::failed(Failure::Broken("nothing sent".into())));
        };
        if let Some(echo) = echo {
            return Ok(match frames.as_slice() {
                [reply] => legacy_reply(event, reply, echo, &self.p.metrics),
                _ => Err(Failure::Broken(format!(
                    "a legacy reply of {total} frames instead of 1"
                ))),
            }
            .into());
        }
        let received = exchange::classify(credential.as_ref(), signed.mac.as_ref(), &frames, total);
        Ok(match events {
            [event] => self.on_reply(event, received).into(),
            _ => {
                let payload = frames.first().map_or(&[][..], Vec::as_slice);
                self.on_reports_answer(events, received, payload)
            }
        })
    }

    /// The answer to a single `report` of `event`.
    fn on_reply(&mut self, event: &Event, received: Received) -> Result<Outcome, Failure> {
        match received {
            Received::OldPublisher => Err(Failure::OldPublisher),
            Received::Unreadable(why) => Err(Failure::Broken(why)),
            Received::NotAuthentic(why) => Err(Failure::NotAuthentic(why)),
            Received::UnverifiedNak(nak) => self.on_nak(event, nak, false),
            Received::Trusted(Reply::Nak(nak)) => self.on_nak(event, nak, true),
            Received::Trusted(Reply::Ack(ack)) if ack.id == event.id => Ok(self.acked(event, &ack)),
            Received::Trusted(Reply::Ack(ack)) => Err(Failure::Broken(format!(
                "ACK for another event {} (expected {})",
                ack.id, event.id
            ))),
            Received::Trusted(Reply::Replies(_)) => Err(Failure::Broken(
                "a replies message, the answer to several events, for one report".into(),
            )),
        }
    }

    /// An authentic ACK of `event`.
    fn acked(&mut self, event: &Event, ack: &Ack) -> Outcome {
        self.accepted();
        tracing::info!(
            action = %event.action,
            jail = %event.jail,
            ip = %event.ip,
            id = %event.id,
            status = %ack.status.as_str(),
            seq = %Seq(ack.seq),
            "reported"
        );
        Outcome::Acked
    }

    /// The answer to a `reports` request of `events` (`payload`: the reply's
    /// first frame).
    fn on_reports_answer(
        &mut self,
        events: &[Event],
        received: Received,
        payload: &[u8],
    ) -> Answer {
        match received {
            Received::Trusted(Reply::Replies(replies)) => self.on_replies(events, replies),
            Received::Trusted(Reply::Nak(nak)) => self.on_request_nak(events, nak, true),
            Received::UnverifiedNak(nak) => self.on_request_nak(events, nak, false),
            Received::Trusted(Reply::Ack(ack)) => Answer::failed(Failure::Broken(format!(
                "an ACK of one event ({}) for a reports request of {} events",
                ack.id,
                events.len()
            ))),
            Received::NotAuthentic(why) => match Reply::decode(payload) {
                // A refusal of the request as a whole that the publisher could
                // not sign (it could not decode the request: an older publisher's
                // `unknown_type`). Taken only for "send them one at a time", which
                // loses nothing: each event then gets its own, verified, answer.
                Ok(Reply::Nak(nak)) if !nak.reason.is_transient() => {
                    self.on_request_nak(events, nak, false)
                }
                _ => Answer::failed(Failure::NotAuthentic(why)),
            },
            Received::Unreadable(why) => Answer::failed(Failure::Broken(why)),
            Received::OldPublisher => Answer::failed(Failure::OldPublisher),
        }
    }

    /// One NAK refusing a `reports` request of `events` as a whole.
    fn on_request_nak(&mut self, events: &[Event], nak: Nak, authentic: bool) -> Answer {
        let Some(first) = events.first() else {
            return Answer::failed(Failure::Transient);
        };
        if nak.reason.is_transient() {
            // Counted per event kept, as single reports' NAKs would be (on_nak
            // counts the first).
            for _ in 1..events.len() {
                self.p.metrics.naks.inc_nak(nak.reason);
            }
            return match self.on_nak(first, nak, authentic) {
                Err(failure) => Answer::failed(failure),
                Ok(_) => Answer::failed(Failure::Transient),
            };
        }
        if nak.reason == NakReason::UnknownType {
            if !self.singles_only {
                self.singles_only = true;
                tracing::warn!(
                    publisher = %self.p.endpoint,
                    authentic,
                    detail = ?nak.detail,
                    "the publisher does not know `reports` requests (an older release); reporting one event at a time"
                );
            }
        } else {
            tracing::warn!(
                publisher = %self.p.endpoint,
                events = events.len(),
                id = %first.id,
                reason = %nak.reason,
                authentic,
                detail = ?nak.detail,
                "the publisher refused a reports request as a whole; sending its events again one at a time"
            );
        }
        Answer::failed(Failure::OneByOne(events.len()))
    }

    /// The `replies` to a `reports` request of `events`: each answer taken in
    /// order as a single report's, up to the first transient NAK.
    fn on_replies(&mut self, events: &[Event], replies: Vec<Reply>) -> Answer {
        if replies.len() != events.len() {
            return Answer::failed(Failure::Broken(format!(
                "{} answers to a reports request of {} events",
                replies.len(),
                events.len()
            )));
        }
        for (reply, event) in replies.iter().zip(events) {
            let id = match reply {
                Reply::Ack(ack) => Some(ack.id),
                Reply::Nak(nak) => nak.id,
                Reply::Replies(_) => {
                    return Answer::failed(Failure::Broken(
                        "a replies message inside a replies message".into(),
                    ))
                }
            };
            if let Some(id) = id.filter(|id| *id != event.id) {
                return Answer::failed(Failure::Broken(format!(
                    "an answer for another event {id} (expected {})",
                    event.id
                )));
            }
        }
        let mut settled = Vec::with_capacity(events.len());
        let mut answers = replies.into_iter().zip(events);
        for (reply, event) in answers.by_ref() {
            let outcome = match reply {
                Reply::Ack(ack) => Ok(self.acked(event, &ack)),
                Reply::Nak(nak) => self.on_nak(event, nak, true),
                Reply::Replies(_) => Err(Failure::Broken("nested replies".into())),
            };
            match outcome {
                Ok(outcome) => settled.push(outcome),
                Err(failure) => {
                    // This event and every later one stay queued; the publisher
                    // refused the later ones with the same reason without
                    // deciding them. Counted, not logged one by one.
                    for (reply, _) in answers {
                        if let Reply::Nak(nak) = reply {
                            if nak.reason.is_transient() {
                                self.p.metrics.naks.inc_nak(nak.reason);
                            }
                        }
                    }
                    return Answer {
                        settled,
                        rest: Some(failure),
                    };
                }
            }
        }
        Answer {
            settled,
            rest: None,
        }
    }

    /// A NAK (`authentic`: its MAC was right, or no credential is used).
    fn on_nak(&mut self, event: &Event, nak: Nak, authentic: bool) -> Result<Outcome, Failure> {
        let now = Instant::now();
        let node = event.node.as_str();
        let endpoint = self.p.endpoint.as_str();
        if nak.reason.is_transient() {
            self.p.metrics.naks.inc_nak(nak.reason);
        } else {
            self.p.metrics.events_dropped.inc_nak(nak.reason);
        }
        match nak.reason {
            NakReason::Unauthenticated => {
                let tell = self.nags.unauthenticated.hit(now);
                if self.p.credential.is_some() {
                    nag!(
                        tell,
                        error,
                        format!("the publisher at {endpoint} refused this node's credential: check that [trust] secret/secret_file on {node} matches [trust.monitors] {node} on the publisher; events are kept and retried"),
                        publisher = %endpoint,
                        node = %node,
                        id = %event.id,
                        authentic,
                        detail = ?nak.detail,
                    );
                } else {
                    nag!(
                        tell,
                        error,
                        format!("the publisher at {endpoint} requires a credential and this node sends none: set [trust] secret or secret_file on {node}, the same as [trust.monitors] {node} on the publisher; events are kept and retried"),
                        publisher = %endpoint,
                        node = %node,
                        id = %event.id,
                        authentic,
                        detail = ?nak.detail,
                    );
                }
                Err(Failure::Transient)
            }
            NakReason::Replayed => {
                let tell = self.nags.replayed.hit(now);
                nag!(
                    tell,
                    error,
                    format!("the publisher at {endpoint} refused a report as replayed: this node's clock is probably too far from the publisher's (more than its [trust] max_clock_skew); check time synchronisation (ntp, chrony, systemd-timesyncd) on {node} and on the publisher; events are signed anew and retried"),
                    publisher = %endpoint,
                    node = %node,
                    id = %event.id,
                    ts_ms = crate::now_ms(),
                    authentic,
                    detail = ?nak.detail,
                );
                Err(Failure::Transient)
            }
            NakReason::Quarantined => {
                let tell = self.nags.quarantined.hit(now);
                nag!(
                    tell,
                    error,
                    format!("the publisher's circuit breaker has quarantined node {node}: it reported far more than usual; its events are dropped until the quarantine ends (see the publisher's log and what fail2ban on {node} is banning)"),
                    publisher = %endpoint,
                    node = %node,
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    detail = ?nak.detail,
                );
                tracing::debug!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    reason = %nak.reason,
                    "event rejected by the publisher, dropped"
                );
                Ok(Outcome::Rejected)
            }
            r if r.is_transient() => {
                tracing::warn!(
                    id = %event.id,
                    reason = %nak.reason,
                    detail = ?nak.detail,
                    "publisher asked to retry later"
                );
                Err(Failure::Transient)
            }
            _ => {
                tracing::error!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    reason = %nak.reason,
                    detail = ?nak.detail,
                    "event rejected by the publisher, dropped"
                );
                Ok(Outcome::Rejected)
            }
        }
    }

    /// A reply that failed authentication.
    fn not_authentic(&mut self, event: &Event, attempt: u32, backoff: Duration, why: &str) {
        let tell = self.nags.not_authentic.hit(Instant::now());
        let node = event.node.as_str();
        nag!(
            tell,
            warn,
            format!("the publisher's reply failed authentication: the secrets differ between [trust] on {node} and [trust.monitors] {node} on the publisher (or the publisher has none for {node}), or the reply is forged; the event is resent"),
            publisher = %self.p.endpoint,
            node = %node,
            id = %event.id,
            attempt,
            retry_in_ms = backoff.as_millis() as u64,
            error = %why,
        );
    }

    /// A reply came, whatever it says: the publisher is reachable.
    fn answered(&mut self) {
        if let Some(link) = &self.p.link {
            link.set_unanswered(false);
        }
        self.p.metrics.publisher_answering.set(true);
        if let Some((timeouts, for_s)) = self.nags.unreachable.end(Instant::now()) {
            tracing::info!(publisher = %self.p.endpoint, timeouts, for_s, "the publisher answers again");
        }
    }

    /// An authentic ACK: what kept failing is over.
    fn accepted(&mut self) {
        let now = Instant::now();
        let endpoint = self.p.endpoint.as_str();
        if let Some((refusals, for_s)) = self.nags.unauthenticated.end(now) {
            tracing::info!(publisher = %endpoint, refusals, for_s, "the publisher accepts this node's credential again");
        }
        if let Some((refusals, for_s)) = self.nags.replayed.end(now) {
            tracing::info!(publisher = %endpoint, refusals, for_s, "the publisher accepts this node's timestamps again");
        }
        if let Some((dropped, for_s)) = self.nags.quarantined.end(now) {
            tracing::info!(publisher = %endpoint, dropped, for_s, "the publisher accepts this node's reports again (quarantine over)");
        }
        if let Some((failed, for_s)) = self.nags.not_authentic.end(now) {
            tracing::info!(publisher = %endpoint, failed, for_s, "the publisher's replies authenticate again");
        }
    }
}

/// An old publisher's answer: the echo of what was sent, or `NAK`.
fn legacy_reply(
    event: &Event,
    reply: &[u8],
    echo: &[u8],
    metrics: &MonitorMetrics,
) -> Result<Outcome, Failure> {
    if reply == echo {
        tracing::info!(
            action = %event.action,
            jail = %event.jail,
            ip = %event.ip,
            id = %event.id,
            status = %"legacy",
            seq = %Seq(None),
            "reported"
        );
        Ok(Outcome::Acked)
    } else if is_legacy_nak(reply) {
        tracing::error!(
            action = %event.action,
            jail = %event.jail,
            ip = %event.ip,
            id = %event.id,
            reason = %"legacy_nak",
            detail = %"the legacy publisher answered NAK",
            "event rejected by the publisher, dropped"
        );
        metrics.events_dropped.inc(DROPPED_LEGACY_NAK);
        Ok(Outcome::Rejected)
    } else {
        Err(Failure::Broken(format!(
            "unexpected legacy reply {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(80)])
        )))
    }
}

enum Failure {
    /// The publisher answered "later": same socket, resend after the backoff.
    Transient,
    /// A reply that failed authentication: as `Broken`, with its own warning.
    NotAuthentic(String),
    /// No reply within the ACK timeout: new socket, resend after the backoff.
    NoReply(String),
    /// No usable answer (a socket error, an unreadable reply): new socket,
    /// resend after the backoff.
    Broken(String),
    /// A fail2ban-zmq-tools publisher's bare `NAK` to a native request: same
    /// socket, resend after the longest backoff.
    OldPublisher,
    /// A `reports` request of this many events refused as a whole (not for a
    /// transient reason): send them again one per request, at once.
    OneByOne(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_keeps_the_queued_gauge_and_readiness() {
        use f2b_common::metrics::Readiness;
        let readiness = Readiness::new();
        let has_room = readiness.condition("the event queue is full", true);
        let queued = Gauge::default();
        // A backlog of 1 of 2 places.
        let room = Room::new(2, 1).observed(queued.clone(), has_room.clone());
        assert_eq!((queued.get(), has_room.holds()), (1, true));
        assert!(room.try_take(1));
        assert_eq!((queued.get(), has_room.holds()), (2, false));
        assert!(!room.try_take(1), "full");
        assert_eq!(queued.get(), 2);
        room.give();
        assert_eq!((queued.get(), has_room.holds()), (1, true));
        room.give();
        assert_eq!((queued.get(), has_room.holds()), (0, true));
        // A backlog beyond the bound: full until it is paid back.
        let room = Room::new(1, 3).observed(queued.clone(), has_room.clone());
        assert_eq!((queued.get(), has_room.holds()), (3, false));
        room.give();
        room.give();
        assert_eq!((queued.get(), has_room.holds()), (1, false));
        room.give();
        assert_eq!((queued.get(), has_room.holds()), (0, true));
    }

    #[test]
    fn a_nag_is_told_first_then_summarized_then_ended() {
        let t0 = Instant::now();
        let mut nag = Nag::default();
        assert_eq!(nag.end(t0), None, "nothing to end");
        assert_eq!(nag.hit(t0), Tell::First);
        for s in 1..=3 {
            assert_eq!(nag.hit(t0 + Duration::from_secs(s)), Tell::Quiet);
        }
        assert_eq!(
            nag.hit(t0 + NAG_EVERY),
            Tell::Again {
                untold: 4,
                count: 5,
                for_s: NAG_EVERY.as_secs()
            }
        );
        assert_eq!(
            nag.hit(t0 + NAG_EVERY + Duration::from_secs(1)),
            Tell::Quiet
        );
        assert_eq!(
            nag.end(t0 + NAG_EVERY * 2),
            Some((6, NAG_EVERY.as_secs() * 2))
        );
        // Over: the next occurrence is a new first one.
        assert_eq!(nag.hit(t0 + NAG_EVERY * 3), Tell::First);
    }
}
