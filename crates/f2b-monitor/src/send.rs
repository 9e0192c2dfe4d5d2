//! Delivering events to the publisher: a ZeroMQ REQ socket in a blocking thread.
//!
//! Each event is sent and its reply awaited for `ack_timeout`. On a timeout or a
//! socket error the REQ socket is closed (a REQ socket that lost its reply is
//! stuck in its send/receive lockstep) and recreated, and the same request (same
//! event id) is sent again after an exponential backoff from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`]. Events go strictly in order, one at a time, at least once; the
//! publisher answers a repeated id with `duplicate` and does not broadcast twice.
//!
//! A NAK with a transient reason (busy, rate limited) is retried the same way; any
//! other NAK is logged at error level with its reason and detail (quoted and
//! escaped: the detail is the publisher's text), and the event is dropped, since
//! sending it again cannot change the answer.
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
//! logged at error level and dropped.
//!
//! The thread polls the REQ socket together with the shutdown socket
//! ([`f2b_common::sockets::shutdown_socket`]); on shutdown it keeps delivering
//! what is queued for at most `drain_time`, then returns.

use std::fmt;
use std::time::{Duration, Instant};

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use f2b_common::config::LegacyPeer;
use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::{legacy, Event, Reply, Request};
use tokio::sync::mpsc;

use crate::state::StateStore;

/// The first wait before a resend.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest wait between resends.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

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
    /// Events left by a previous run, sent before anything from the queue.
    pub backlog: Vec<Event>,
    /// Where answered events are recorded, if state is kept.
    pub state: Option<Arc<Mutex<StateStore>>>,
    /// The longest wait between resends ([`BACKOFF_MAX`] in the daemon).
    pub max_backoff: Duration,
    /// The bound on events not yet answered, given a place back per answer;
    /// `None`: no bound.
    pub room: Option<Arc<Room>>,
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
}

impl Room {
    /// A bound of `capacity` events, `taken` of them already pending (a backlog).
    pub fn new(capacity: usize, taken: usize) -> Self {
        Room {
            places: tokio::sync::Semaphore::new(capacity.saturating_sub(taken)),
            capacity,
            debt: AtomicUsize::new(taken.saturating_sub(capacity)),
        }
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
    }
}

impl fmt::Debug for SenderParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SenderParams")
            .field("endpoint", &self.endpoint)
            .field("ack_timeout", &self.ack_timeout)
            .field("drain_time", &self.drain_time)
            .field("legacy", &self.legacy)
            .field("backlog", &self.backlog.len())
            .field("max_backoff", &self.max_backoff)
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
    /// Not delivered before the shutdown deadline.
    Abandoned,
}

struct Seq(Option<u64>);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, "{s}"),
            None => f.write_str("none"),
        }
    }
}

struct Sender {
    p: SenderParams,
    sock: Option<zmq::Socket>,
    /// Set when shutdown began: nothing is tried after it.
    deadline: Option<Instant>,
    /// Whether the "old publisher" error has been logged.
    told_old_publisher: bool,
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
    };
    let mut backlog = backlog.into_iter();
    loop {
        let Some(event) = backlog.next().or_else(|| s.next_event(&mut rx)) else {
            return Ok(());
        };
        match s.deliver(&event)? {
            Outcome::Abandoned => {
                let left = 1 + backlog.len() + drain_count(&mut rx);
                tracing::warn!(
                    undelivered = left,
                    "shutting down with events not delivered to the publisher"
                );
                return Ok(());
            }
            Outcome::Acked | Outcome::Rejected => s.done(event.id),
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
            if zmq::poll(&mut items, ms).is_err() {
                return false;
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
            if zmq::poll(&mut items, ms).is_err() {
                return;
            }
            if items[0].is_readable() {
                // Shutdown: stop waiting, retry at once within the drain time.
                self.note_shutdown();
                return;
            }
        }
    }

    /// The request for `event`, and the legacy echo expected back, or why the
    /// configured format cannot carry it.
    fn encode(&self, event: &Event) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
        let Some(peer) = &self.p.legacy else {
            return Ok((Request::Report(event.clone()).encode(), None));
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
        Ok((wire.into_bytes(), Some(echo.into_bytes())))
    }

    fn deliver(&mut self, event: &Event) -> Result<Outcome, crate::MonitorError> {
        let (request, echo) = match self.encode(event) {
            Ok(r) => r,
            Err(why) => {
                tracing::error!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    detail = %why,
                    "event cannot be sent to a legacy publisher, dropped"
                );
                return Ok(Outcome::Rejected);
            }
        };
        let mut backoff = BACKOFF_MIN;
        let mut attempt: u32 = 0;
        loop {
            self.note_shutdown();
            if self.past_deadline() {
                return Ok(Outcome::Abandoned);
            }
            attempt += 1;
            let failure = match self.attempt(event, &request, echo.as_deref())? {
                Ok(outcome) => return Ok(outcome),
                Err(failure) => failure,
            };
            match failure {
                Failure::Transient => {}
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
                    backoff = self.p.max_backoff;
                }
                Failure::Broken(why) => {
                    tracing::warn!(
                        publisher = %self.p.endpoint,
                        id = %event.id,
                        attempt,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %why,
                        "publisher unreachable, will retry"
                    );
                    // A REQ socket that lost its reply cannot send again.
                    self.sock = None;
                }
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(self.p.max_backoff);
        }
    }

    /// One send and wait. `Err(Failure)` means try again.
    fn attempt(
        &mut self,
        event: &Event,
        request: &[u8],
        echo: Option<&[u8]>,
    ) -> Result<Result<Outcome, Failure>, crate::MonitorError> {
        let sock = self.socket()?;
        if let Err(e) = sock.send(request, zmq::DONTWAIT) {
            return Ok(Err(Failure::Broken(format!("send: {e}"))));
        }
        if !self.wait_reply(self.p.ack_timeout) {
            let why = if self.past_deadline() {
                "shutdown deadline".to_owned()
            } else {
                format!("no reply within {:?}", self.p.ack_timeout)
            };
            return Ok(Err(Failure::Broken(why)));
        }
        let Some(sock) = &self.sock else {
            return Ok(Err(Failure::Broken("socket gone".into())));
        };
        let bytes = match sock.recv_bytes(zmq::DONTWAIT) {
            Ok(b) => b,
            Err(e) => return Ok(Err(Failure::Broken(format!("receive: {e}")))),
        };
        if let Some(echo) = echo {
            return Ok(legacy_reply(event, &bytes, echo));
        }
        if is_legacy_nak(&bytes) {
            return Ok(Err(Failure::OldPublisher));
        }
        let reply = match Reply::decode(&bytes) {
            Ok(r) => r,
            Err(e) => return Ok(Err(Failure::Broken(format!("unreadable reply: {e}")))),
        };
        match reply {
            Reply::Ack(ack) if ack.id == event.id => {
                tracing::info!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    status = %ack.status.as_str(),
                    seq = %Seq(ack.seq),
                    "reported"
                );
                Ok(Ok(Outcome::Acked))
            }
            Reply::Ack(ack) => Ok(Err(Failure::Broken(format!(
                "ACK for another event {} (expected {})",
                ack.id, event.id
            )))),
            Reply::Nak(nak) if nak.reason.is_transient() => {
                tracing::warn!(
                    id = %event.id,
                    reason = %nak.reason,
                    detail = ?nak.detail,
                    "publisher asked to retry later"
                );
                Ok(Err(Failure::Transient))
            }
            Reply::Nak(nak) => {
                tracing::error!(
                    action = %event.action,
                    jail = %event.jail,
                    ip = %event.ip,
                    id = %event.id,
                    reason = %nak.reason,
                    detail = ?nak.detail,
                    "event rejected by the publisher, dropped"
                );
                Ok(Ok(Outcome::Rejected))
            }
        }
    }
}

/// An old publisher's answer: the echo of what was sent, or `NAK`.
fn legacy_reply(event: &Event, reply: &[u8], echo: &[u8]) -> Result<Outcome, Failure> {
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
    /// No usable answer: new socket, resend after the backoff.
    Broken(String),
    /// A fail2ban-zmq-tools publisher's bare `NAK` to a native request: same
    /// socket, resend after the longest backoff.
    OldPublisher,
}
