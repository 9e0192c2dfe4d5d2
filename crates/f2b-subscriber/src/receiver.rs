//! The receive loop: a SUB socket, liveness, epochs and sequence numbers,
//! (re)connections, and catch-up. Decoded events and snapshots go to the intake
//! over a channel; nothing here applies anything. It is a task on the subscriber's
//! runtime, woken by its sockets' descriptors (`ZMQ_FD` on tokio's reactor), so a
//! message reaches the intake on the same thread, without a hand-off (`run`).
//!
//! An `events` broadcast (several events of one jail and epoch under one
//! signature) is verified and decoded once; then each of its events is handled
//! exactly as an `event` message with that `seq` and the message's epoch would be,
//! in order (metrics, the `received` debug line, sequence gaps, the `gate`, held or
//! queued for a fetch).
//!
//! Messages are taken in groups: when the SUB socket is readable, every message
//! already waiting, up to 64 (`MAX_GROUP`), is read, never waiting for more (a lone
//! message is a group of one, handled at once). Their signatures are checked
//! together ([`f2b_proto::auth::verify_broadcasts`]: one Ed25519 batch, the same
//! answers as one by one), then each is handled in order exactly as if it had
//! come alone (refusals counted per message, the gate, holds, the catch-up
//! queue, heartbeats, gaps, connection events). The events to use go to the
//! intake together, in one channel send per group, which it records in one state
//! transaction; anything else sent to the intake (a heartbeat, catch-up output)
//! first sends the events before it, so the intake sees everything in order.
//!
//! A libzmq socket monitor on the SUB socket (read from an inproc PAIR socket
//! polled in the same loop) says when a connection to a publisher is established
//! or lost. libzmq reconnects by itself, so without it a publisher that restarts
//! with the same epoch (its ledger kept) would go unnoticed. The first message
//! after each (re)connection is logged as `connected` and, with `[subscriber]
//! snapshot` set, starts a resync ([`crate::catchup`]); so do an epoch change and,
//! without a jail filter, a sequence gap.
//!
//! With `[subscriber] legacy = true` the socket follows a fail2ban-zmq-tools
//! publisher instead: one-frame `host|jail|action|ip` messages, no heartbeats (no
//! dead-link timeout: ZMTP heartbeats and TCP keepalive watch the connection), no
//! sequence numbers, no snapshots.
//!
//! # Trust
//!
//! With `[trust] publisher_key`, every native message (events and heartbeats) must
//! be three frames, topic, payload and the publisher's Ed25519 signature over both
//! ([`f2b_proto::auth::verify_broadcast`]); anything else is dropped before its
//! payload is decoded, counted per [`Refusal`] and logged (the first of each
//! reason at once, then a summary a minute at most). A refused message proves
//! nothing: it does not keep the link alive, start a resync or count as a gap.
//! (An `events` message is one message here: one signature, one refusal.)
//! A signed event then passes the `gate`: its epoch must be current
//! (confirmed by a signed snapshot when catch-up is configured; events of an
//! unconfirmed epoch are held until one says) and its sequence number above what
//! its epoch already used. Without a key (`allow_unauthenticated`) messages are
//! taken as they come and frames after the payload are ignored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::marker::PhantomData;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use f2b_common::config::Endpoint;
use f2b_common::sockets::new_socket;
use f2b_common::{zmq, CancellationToken};
use f2b_proto::auth::{verify_broadcast, verify_broadcasts, PublicKey};
use f2b_proto::{
    event_topic, Broadcast, Epoch, Event, EventId, JailName, NodeName, Sequenced, HEARTBEAT_TOPIC,
    MAX_FRAMES,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use crate::catchup::{CatchUp, Out, Resync, ResyncReason};
use crate::gate::{Gate, Verdict};
use crate::ratelimit::RateLimit;
use crate::{Notice, Notices, SubscriberError};

/// Why a broadcast was dropped before it was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// Two frames, no signature, while `[trust] publisher_key` is set.
    Unsigned,
    /// A signature frame that no configured key made for this topic and payload
    /// (another publisher's key, or a forged or altered message).
    BadSignature,
    /// Signed, but its sequence number is not above one already used in its
    /// epoch: a replay (or a publisher's rebroadcast of an event already used).
    Replayed,
    /// Signed, but of an epoch that is no longer the publisher's (or that no
    /// snapshot confirmed): a replay of an old broadcast.
    StaleEpoch,
}

impl Refusal {
    /// The value logged as `reason=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::BadSignature => "bad_signature",
            Refusal::Replayed => "replayed",
            Refusal::StaleEpoch => "stale_epoch",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Refusal::Unsigned => 0,
            Refusal::BadSignature => 1,
            Refusal::Replayed => 2,
            Refusal::StaleEpoch => 3,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often refused broadcasts are summarised in the log, at most.
const REFUSAL_SUMMARY: Duration = Duration::from_secs(60);

/// Refused broadcasts, counted per reason: the first of each reason is logged at
/// once, the rest in periodic summaries.
#[derive(Debug)]
struct Refusals {
    total: [u64; 4],
    unreported: [u64; 4],
    next_summary: Instant,
}

impl Refusals {
    fn new() -> Self {
        Refusals {
            total: [0; 4],
            unreported: [0; 4],
            next_summary: Instant::now(),
        }
    }

    /// Counts one; true when it is the first of its reason (log it in full).
    fn record(&mut self, r: Refusal) -> bool {
        let i = r.index();
        self.total[i] += 1;
        if self.total[i] == 1 {
            return true;
        }
        self.unreported[i] += 1;
        false
    }

    /// The counts to summarise now, if any and if it is time.
    fn summary(&mut self, now: Instant) -> Option<[u64; 4]> {
        if now < self.next_summary || self.unreported.iter().all(|n| *n == 0) {
            return None;
        }
        self.next_summary = now + REFUSAL_SUMMARY;
        Some(std::mem::take(&mut self.unreported))
    }
}

/// What the receive loop hands to the intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    /// A broadcast event (`epoch` set), or a fail2ban-zmq-tools message (`epoch`
    /// `None`, `seq` 0).
    Event {
        event: Event,
        seq: u64,
        epoch: Option<Epoch>,
    },
    /// Broadcast events received together (those of the messages read together,
    /// `event` or `events`, that passed the gate, of any jails and epochs; or the
    /// broadcasts a fetch queued), in order: each is
    /// taken as an [`Input::Event`] would be, and the intake records them in one
    /// state transaction.
    Events(Vec<Sequenced>),
    /// A complete snapshot of one publisher, with the broadcasts queued meanwhile.
    Resync(Box<Resync>),
    /// A heartbeat (only with [`ReceiverConfig::heartbeats`], for `watch`).
    Heartbeat { epoch: Epoch, seq: u64 },
}

impl From<Sequenced> for Input {
    fn from(s: Sequenced) -> Self {
        Input::Event {
            event: s.event,
            seq: s.seq,
            epoch: Some(s.epoch),
        }
    }
}

/// Epochs remembered for sequence tracking.
const MAX_EPOCHS: usize = 16;
/// The most messages read from the SUB socket per wake-up before polling again.
pub(crate) const MAX_DRAIN: usize = 256;
/// The most messages taken from the SUB socket at one look: the messages already
/// waiting, up to this many, have their signatures checked together (one Ed25519
/// batch) and the events they bring go to the intake in one send.
const MAX_GROUP: usize = 64;
/// How often a snapshot REQ socket that could not be watched is looked at.
const REQ_LOOK: Duration = Duration::from_millis(50);
/// Groups of this many messages or more have their signatures checked on a
/// blocking thread, in parallel with the intake ([`Receiver::take_in_async`]).
const OFFLOAD_CHECK: usize = 8;
/// The longest the loop reads from the SUB socket per wake-up before it looks at its
/// other sockets and deadlines again.
const MAX_DRAIN_TIME: Duration = Duration::from_millis(50);
/// The longest the loop waits for its sockets before it looks at everything
/// again (the token wakes it at once; this bounds what a missed wake-up could
/// cost).
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(1);
/// A heartbeat interval announced by a publisher is believed up to this value.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(600);
/// The link is dead after this many announced heartbeat intervals without a
/// message, if that is longer than `heartbeat_timeout`.
const MISSED_HEARTBEATS: u32 = 3;

/// What the receive loop needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct ReceiverConfig {
    pub(crate) endpoints: Vec<Endpoint>,
    pub(crate) jails: Vec<JailName>,
    pub(crate) heartbeat_timeout: Duration,
    /// The publishers' reply endpoints to ask for snapshots; empty: no catch-up.
    pub(crate) snapshot: Vec<Endpoint>,
    pub(crate) snapshot_timeout: Duration,
    /// Broadcasts queued while a snapshot is fetched, at most.
    pub(crate) queue_limit: usize,
    /// Follow a fail2ban-zmq-tools publisher.
    pub(crate) legacy: bool,
    /// The publishers' keys; empty: broadcasts are not verified
    /// (`allow_unauthenticated`).
    pub(crate) keys: Vec<PublicKey>,
    /// Pass heartbeats on as [`Input::Heartbeat`].
    pub(crate) heartbeats: bool,
}

impl ReceiverConfig {
    /// The subscriptions: everything, or heartbeats plus each jail's topic. A
    /// legacy publisher's messages have no topic: everything, filtered here.
    pub(crate) fn topics(&self) -> Vec<Vec<u8>> {
        if self.jails.is_empty() || self.legacy {
            return vec![Vec::new()];
        }
        let mut t = vec![HEARTBEAT_TOPIC.to_vec()];
        t.extend(self.jails.iter().map(event_topic));
        t
    }

    fn publisher_label(&self) -> String {
        self.endpoints
            .iter()
            .map(Endpoint::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What one message told about the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Observation {
    /// First message of this epoch since the socket was (re)created.
    pub(crate) connected: bool,
    /// First message of this epoch ever (as far as remembered).
    pub(crate) new_epoch: bool,
    /// Events broadcast in this epoch that never arrived.
    pub(crate) missed: u64,
}

#[derive(Debug, Clone, Copy)]
struct EpochState {
    last_seq: u64,
    touched: u64,
}

/// Epochs and sequence numbers seen.
#[derive(Debug, Default)]
pub(crate) struct LinkState {
    epochs: HashMap<Epoch, EpochState>,
    live: HashSet<Epoch>,
    tick: u64,
    /// With one publisher, a new epoch after another one means a restart, and the
    /// new epoch's events before the first one received were missed.
    single_publisher: bool,
    /// False with a jail filter: the events of other jails are numbered too and
    /// never arrive, so gaps mean nothing.
    track_gaps: bool,
}

impl LinkState {
    pub(crate) fn new(single_publisher: bool, track_gaps: bool) -> Self {
        LinkState {
            single_publisher,
            track_gaps,
            ..LinkState::default()
        }
    }

    /// The socket was recreated: the next message of each epoch is a "connected".
    pub(crate) fn reset_live(&mut self) {
        self.live.clear();
    }

    /// Records a message of `epoch`: an event numbered `seq`, or a heartbeat saying
    /// `seq` events were broadcast so far.
    pub(crate) fn observe(&mut self, epoch: Epoch, seq: u64, is_event: bool) -> Observation {
        self.tick += 1;
        let connected = self.live.insert(epoch);
        let new_epoch = !self.epochs.contains_key(&epoch);
        // The last sequence number this message proves was broadcast before it.
        let before = if is_event { seq.saturating_sub(1) } else { seq };
        let missed = match self.epochs.get_mut(&epoch) {
            Some(st) => {
                st.touched = self.tick;
                let missed = before.saturating_sub(st.last_seq);
                st.last_seq = st.last_seq.max(seq);
                missed
            }
            None => {
                let restarted = self.single_publisher && !self.epochs.is_empty();
                self.epochs.insert(
                    epoch,
                    EpochState {
                        last_seq: seq,
                        touched: self.tick,
                    },
                );
                if self.epochs.len() > MAX_EPOCHS {
                    if let Some(oldest) = self
                        .epochs
                        .iter()
                        .min_by_key(|(_, s)| s.touched)
                        .map(|(e, _)| *e)
                    {
                        self.epochs.remove(&oldest);
                        self.live.remove(&oldest);
                    }
                }
                if restarted {
                    before
                } else {
                    0
                }
            }
        };
        Observation {
            connected,
            new_epoch,
            missed: if self.track_gaps { missed } else { 0 },
        }
    }
}

/// The link timeout once a publisher announced `interval_ms`.
pub(crate) fn link_timeout(configured: Duration, interval_ms: u64) -> Duration {
    let interval = Duration::from_millis(interval_ms).min(MAX_HEARTBEAT_INTERVAL);
    configured.max(interval * MISSED_HEARTBEATS)
}

/// Epochs whose endpoint is remembered (for the `connected` line).
const MAX_ORIGINS: usize = 64;

static MONITOR_ID: AtomicU64 = AtomicU64::new(0);

/// One SUB socket and its monitor.
struct Session {
    sub: zmq::Socket,
    monitor: Option<zmq::Socket>,
}

fn open(ctx: &zmq::Context, cfg: &ReceiverConfig) -> Result<Session, SubscriberError> {
    let sub = new_socket(ctx, zmq::SUB).map_err(|source| SubscriberError::Socket {
        what: "SUB",
        source,
    })?;
    for topic in cfg.topics() {
        sub.set_subscribe(&topic)
            .map_err(|source| SubscriberError::Subscribe {
                topic: String::from_utf8_lossy(&topic).into_owned(),
                source,
            })?;
    }
    // Before connecting, so that the first connection is seen too.
    let monitor = match attach_monitor(ctx, &sub) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot monitor the SUB socket: a publisher that restarts with the same epoch goes unnoticed"
            );
            None
        }
    };
    for e in &cfg.endpoints {
        sub.connect(e.as_str())
            .map_err(|source| SubscriberError::Connect {
                endpoint: e.to_string(),
                source,
            })?;
    }
    Ok(Session { sub, monitor })
}

/// Starts a libzmq socket monitor on `sub` (connections made and lost) and returns
/// the PAIR socket its events arrive on.
fn attach_monitor(ctx: &zmq::Context, sub: &zmq::Socket) -> zmq::Result<zmq::Socket> {
    let name = format!(
        "inproc://f2b-sub-monitor-{}-{}",
        std::process::id(),
        MONITOR_ID.fetch_add(1, Ordering::Relaxed)
    );
    let events = i32::from(zmq::SocketEvent::CONNECTED.to_raw())
        | i32::from(zmq::SocketEvent::DISCONNECTED.to_raw());
    sub.monitor(&name, events)?;
    let pair = ctx.socket(zmq::PAIR)?;
    pair.set_linger(0)?;
    pair.connect(&name)?;
    Ok(pair)
}

/// How long to wait for the sockets until `deadline`, at most `cap`
/// ([`MAX_POLL_WAIT`]).
fn wait_for(deadline: Option<Instant>, now: Instant, cap: Duration) -> Duration {
    deadline.map_or(cap, |d| d.saturating_duration_since(now).min(cap))
}

/// A connection event of the SUB socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    Connected(String),
    Disconnected(String),
}

/// Reads a socket monitor message: a frame of the event number (16 bits) and its
/// value (32 bits), native byte order, then a frame of the endpoint.
pub(crate) fn parse_monitor(frames: &[Vec<u8>]) -> Option<LinkEvent> {
    let head = frames.first()?;
    let event = u16::from_ne_bytes([*head.first()?, *head.get(1)?]);
    let endpoint = String::from_utf8_lossy(frames.get(1)?).into_owned();
    if event == zmq::SocketEvent::CONNECTED.to_raw() {
        Some(LinkEvent::Connected(endpoint))
    } else if event == zmq::SocketEvent::DISCONNECTED.to_raw() {
        Some(LinkEvent::Disconnected(endpoint))
    } else {
        None
    }
}

/// The connection events the socket monitor has ready, without waiting.
fn take_monitor(monitor: Option<&zmq::Socket>) -> Vec<LinkEvent> {
    let Some(m) = monitor else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Ok(frames) = m.recv_multipart(zmq::DONTWAIT) {
        out.extend(parse_monitor(&frames));
    }
    out
}

/// A random (version 4) event id, for events that arrive without one.
pub(crate) fn random_id() -> Option<EventId> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).ok()?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Some(EventId::from_u128(u128::from_be_bytes(b)))
}

/// A fail2ban-zmq-tools broadcast (`host|jail|action|ip`, maybe a fifth field) as a
/// native event with `id`, at `time_ms`: `Ok(None)` when its jail is not in `jails`
/// (when that is not empty), `Err` with why it is not valid.
pub(crate) fn legacy_event(
    bytes: &[u8],
    jails: &[JailName],
    id: EventId,
    time_ms: u64,
) -> Result<Option<Event>, String> {
    let m = f2b_proto::legacy::parse(bytes, None).map_err(|e| format!("legacy message: {e}"))?;
    let jail = JailName::new(&m.jail).map_err(|e| format!("legacy message: {e}"))?;
    if !jails.is_empty() && !jails.contains(&jail) {
        return Ok(None);
    }
    let host = m.host.strip_suffix('.').unwrap_or(&m.host);
    let node = NodeName::new(host).map_err(|e| format!("legacy message: {e}"))?;
    Event::new(id, node, jail, m.action, IpAddr::V4(m.ip), time_ms)
        .map(Some)
        .map_err(|e| format!("legacy message: {e}"))
}

/// A multipart message: at most [`MAX_FRAMES`] frames kept, all counted.
#[derive(Clone)]
pub(crate) struct Frames {
    pub(crate) kept: Vec<Vec<u8>>,
    pub(crate) count: usize,
}

/// Reads one multipart message without waiting (`Ok(None)`: none there).
pub(crate) fn recv_frames(sub: &zmq::Socket) -> zmq::Result<Option<Frames>> {
    let first = match sub.recv_bytes(zmq::DONTWAIT) {
        Ok(b) => b,
        Err(zmq::Error::EAGAIN) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut f = Frames {
        kept: vec![first],
        count: 1,
    };
    while sub.get_rcvmore()? {
        let part = sub.recv_bytes(0)?;
        f.count += 1;
        if f.kept.len() < MAX_FRAMES {
            f.kept.push(part);
        }
    }
    Ok(Some(f))
}

/// A message taken from the SUB socket, with the connection events the monitor
/// had ready just before it was read (applied just before it is handled, as if
/// each message were read and handled in turn).
#[derive(Clone)]
struct Received {
    link: Vec<LinkEvent>,
    frames: Frames,
}

/// The messages found waiting on the SUB socket at one look.
struct Group {
    messages: Vec<Received>,
    /// Connection events read after the last message (before the read that found
    /// none, or failed).
    tail: Vec<LinkEvent>,
    /// The read that ended the group failed (reconnect once the group is handled).
    failed: Option<zmq::Error>,
}

/// Takes the messages already waiting on `sub`, at most `max`, without waiting
/// for more: a lone message makes a group of one. `monitor_read`: the monitor
/// was read just before (nothing to look for before the first message).
fn take_group(s: &Session, max: usize, monitor_read: bool) -> Group {
    let mut g = Group {
        messages: Vec::new(),
        tail: Vec::new(),
        failed: None,
    };
    let mut look = !monitor_read;
    while g.messages.len() < max {
        // A connection made since the last look applies to what follows.
        let link = if look {
            take_monitor(s.monitor.as_ref())
        } else {
            Vec::new()
        };
        look = true;
        match recv_frames(&s.sub) {
            Ok(Some(frames)) => g.messages.push(Received { link, frames }),
            Ok(None) => {
                g.tail = link;
                break;
            }
            Err(e) => {
                g.tail = link;
                g.failed = Some(e);
                break;
            }
        }
    }
    g
}

/// For each message, whether its signature is by one of `keys`, checked all at
/// once ([`verify_broadcasts`]: one Ed25519 batch); `None` for those not checked
/// so (no key, not three frames: [`Receiver::verified`] says why).
fn check_signatures(keys: &[PublicKey], messages: &[Received]) -> Vec<Option<bool>> {
    let mut out = vec![None; messages.len()];
    if keys.is_empty() {
        return out;
    }
    let mut at = Vec::new();
    let mut signed = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if let (3, [topic, payload, sig, ..]) = (m.frames.count, m.frames.kept.as_slice()) {
            at.push(i);
            signed.push((topic.as_slice(), payload.as_slice(), sig.as_slice()));
        }
    }
    for (i, ok) in at.into_iter().zip(verify_broadcasts(keys, &signed)) {
        out[i] = Some(ok);
    }
    out
}

/// What a message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// From the publisher (verified, or no key is configured): the link is alive.
    Genuine,
    /// Dropped; proves nothing.
    Ignored,
    /// The intake is gone.
    Stop,
}

impl Handled {
    /// What a message was of which two parts (events of one `events` message)
    /// were `self` and `other`: `Stop` wins, then `Genuine` (one event used, held
    /// or reflected proves the link alive), else `Ignored`.
    fn and(self, other: Handled) -> Handled {
        match (self, other) {
            (Handled::Stop, _) | (_, Handled::Stop) => Handled::Stop,
            (Handled::Genuine, _) | (_, Handled::Genuine) => Handled::Genuine,
            _ => Handled::Ignored,
        }
    }
}

/// `Genuine` if a send to the intake worked, else `Stop`.
fn alive(ok: bool) -> Handled {
    if ok {
        Handled::Genuine
    } else {
        Handled::Stop
    }
}

/// Why the loop stopped.
enum Stop {
    Shutdown,
    Reopen,
}

/// The receive loop, a task on the caller's runtime. Returns on shutdown (`token`
/// cancelled) or when the intake is gone; errors only when the socket cannot be
/// set up at all.
///
/// It waits on the sockets' file descriptors (`ZMQ_FD`, through tokio's reactor),
/// the token and its next deadline, so a message wakes the runtime's thread
/// directly: no thread of its own to hand each message over from. As libzmq
/// requires (the descriptor only says that something may have changed, and only
/// once), it reads `ZMQ_EVENTS` of every socket before it waits, except after a
/// group that ended with the SUB socket and the monitor read empty: such a read
/// leaves libzmq set to signal the descriptor for whatever comes next.
pub(crate) async fn run(
    ctx: zmq::Context,
    cfg: ReceiverConfig,
    token: CancellationToken,
    tx: mpsc::Sender<Input>,
    notices: Notices,
) -> Result<(), SubscriberError> {
    Receiver::new(cfg, token, tx, notices).run(ctx).await
}

impl Receiver {
    /// [`run`], for a receiver made (or adjusted by a test) beforehand.
    async fn run(mut self, ctx: zmq::Context) -> Result<(), SubscriberError> {
        let mut subscribed = false;
        loop {
            let mut session = open(&ctx, &self.cfg)?;
            if !subscribed {
                subscribed = true;
                self.notices.subscribed(&self.publisher);
            }
            self.link.reset_live();
            self.fresh.clear();
            tracing::debug!(publisher = %self.publisher, "subscribing");
            match self.session(&ctx, &mut session).await? {
                Stop::Shutdown => {
                    // Broadcasts queued by a fetch under way are still applied.
                    if let Some(out) = self.catchup.abandon() {
                        self.deliver(out);
                    }
                    self.send_backlog().await;
                    if !self.held.is_empty() {
                        tracing::info!(
                            count = self.held.len(),
                            "broadcasts of an epoch no snapshot confirmed yet are not applied (the next start's snapshot lists the bans)"
                        );
                    }
                    return Ok(());
                }
                Stop::Reopen => {
                    if let Some(out) = self.catchup.abandon() {
                        if !self.deliver(out) || !self.send_backlog().await {
                            return Ok(());
                        }
                    }
                    drop(session);
                }
            }
        }
    }
}

/// A socket's `ZMQ_FD` (owned by libzmq, which closes it with the socket).
struct ZmqFd(RawFd);

impl AsRawFd for ZmqFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// A socket's `ZMQ_FD` registered with tokio's reactor, for as long as the socket
/// is borrowed: it cannot be closed (its descriptor with it) while this is
/// registered.
struct Watched<'s> {
    fd: AsyncFd<ZmqFd>,
    _socket: PhantomData<&'s ()>,
}

/// Empty, but it makes the borrow of the socket last until the registration is
/// dropped (without it, the borrow would end at the last use of the value, and the
/// socket could be closed before the registration is removed).
impl Drop for Watched<'_> {
    fn drop(&mut self) {}
}

impl Watched<'_> {
    /// Waits until the descriptor says the socket may have changed, then clears
    /// that (the caller reads `ZMQ_EVENTS` next). Never, if the reactor is gone.
    async fn changed(&self) {
        match self.fd.readable().await {
            Ok(mut guard) => guard.clear_ready(),
            Err(_) => std::future::pending().await,
        }
    }
}

/// Watches `socket`'s `ZMQ_FD` for readability.
///
/// The project's one `unsafe` block (the workspace denies them): tokio's
/// registration of a descriptor it does not own. Sound because `Watched<'s>`
/// borrows the socket until it is dropped (its `Drop` makes the borrow last that
/// long), so the descriptor stays open while it is registered.
#[allow(unsafe_code)]
fn watch<'s>(socket: &'s zmq::Socket, what: &'static str) -> Result<Watched<'s>, SubscriberError> {
    let fd = socket
        .get_fd()
        .map_err(|source| SubscriberError::Poll { source })?;
    // SAFETY: `fd` is the socket's own descriptor, open until the socket is
    // closed; the socket stays borrowed until the registration is dropped
    // (`Watched`'s `Drop`).
    let fd =
        unsafe { AsyncFd::register_with_interest(ZmqFd(fd), Interest::READABLE) }.map_err(|e| {
            SubscriberError::Watch {
                what,
                source: e.into(),
            }
        })?;
    Ok(Watched {
        fd,
        _socket: PhantomData,
    })
}

/// [`Watched::changed`] of `w`; never, without one.
async fn changed(w: Option<&Watched<'_>>) {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Whether libzmq has a message to read on `socket` (`ZMQ_EVENTS`; reading it also
/// lets its `ZMQ_FD` signal again).
fn has_input(socket: &zmq::Socket) -> Result<bool, SubscriberError> {
    socket
        .get_events()
        .map(|e| e.contains(zmq::POLLIN))
        .map_err(|source| SubscriberError::Poll { source })
}

struct Receiver {
    token: CancellationToken,
    cfg: ReceiverConfig,
    publisher: String,
    link: LinkState,
    gate: Gate,
    /// Events of epochs that no snapshot confirmed yet, in order of arrival.
    held: VecDeque<Sequenced>,
    /// Events of the messages being handled (a group read together) that go to
    /// the intake, sent together when the group is done or before any other
    /// input (one channel send, one state transaction).
    outbox: Vec<Sequenced>,
    /// Inputs for the intake that found its channel full, in order: sent (waiting
    /// for room) before the loop reads on; while it is not empty, every input
    /// goes behind it.
    backlog: VecDeque<Input>,
    refusals: Refusals,
    /// The longest wait for the sockets ([`MAX_POLL_WAIT`]; tests make it long,
    /// so that a missed wake-up shows).
    max_wait: Duration,
    waiting_log: RateLimit,
    timeout: Duration,
    bad: RateLimit,
    dead: RateLimit,
    catchup: CatchUp,
    /// Endpoints connected (as the monitor said) whose first message has not come.
    fresh: Vec<String>,
    /// Which endpoint an epoch's messages came from, as far as known.
    origin: HashMap<Epoch, String>,
    /// Whether any publisher message was received yet (the first is a "start").
    started: bool,
    tx: mpsc::Sender<Input>,
    notices: Notices,
}

impl Receiver {
    fn new(
        cfg: ReceiverConfig,
        token: CancellationToken,
        tx: mpsc::Sender<Input>,
        notices: Notices,
    ) -> Self {
        let snapshot = if cfg.legacy { &[][..] } else { &cfg.snapshot };
        Receiver {
            token,
            publisher: cfg.publisher_label(),
            link: LinkState::new(cfg.endpoints.len() == 1, cfg.jails.is_empty()),
            gate: Gate::new(!snapshot.is_empty(), cfg.endpoints.len() == 1),
            held: VecDeque::new(),
            outbox: Vec::new(),
            backlog: VecDeque::new(),
            refusals: Refusals::new(),
            max_wait: MAX_POLL_WAIT,
            waiting_log: RateLimit::new(Duration::from_secs(60)),
            timeout: cfg.heartbeat_timeout,
            bad: RateLimit::new(Duration::from_secs(10)),
            dead: RateLimit::new(Duration::from_secs(60)),
            catchup: CatchUp::new(
                snapshot,
                cfg.jails.clone(),
                cfg.snapshot_timeout,
                cfg.queue_limit,
                cfg.keys.clone(),
                notices.clone(),
            ),
            fresh: Vec::new(),
            origin: HashMap::new(),
            started: false,
            cfg,
            tx,
            notices,
        }
    }

    /// One socket's life: until shutdown or a dead link.
    async fn session(
        &mut self,
        ctx: &zmq::Context,
        s: &mut Session,
    ) -> Result<Stop, SubscriberError> {
        let token = self.token.clone();
        let sub_fd = watch(&s.sub, "SUB")?;
        let mon_fd = match s.monitor.as_ref() {
            Some(m) => Some(watch(m, "SUB socket's monitor")?),
            None => None,
        };
        let mut last = Instant::now();
        // The last group ended with the SUB socket (and the monitor) read empty.
        let mut drained = false;
        // The `last` for which the dead-link timeout was put off once, to read
        // what the socket held.
        let mut graced: Option<Instant> = None;
        loop {
            if token.is_cancelled() || !self.send_backlog().await {
                return Ok(Stop::Shutdown);
            }
            let now = Instant::now();
            self.summarise_refusals(now);
            if let Some(out) = self.catchup.step(ctx, now) {
                if !self.deliver(out) {
                    return Ok(Stop::Shutdown);
                }
            }
            let mut deadline = self.catchup.deadline();
            if !self.cfg.legacy {
                // What the socket already holds was sent before now: a loop held
                // up (a stalled runtime, a full channel) must not take that for a
                // silent publisher and drop it with the socket. It is read first,
                // once per timeout: only a genuine message moves `last`, so a
                // stream of refused ones still ends in a dead link.
                let dead_at = last + self.timeout;
                let mut grace = false;
                if now >= dead_at && graced != Some(last) {
                    // (Asked now: the shortcut below no longer holds.)
                    drained = false;
                    if has_input(&s.sub)? {
                        graced = Some(last);
                        grace = true;
                    }
                }
                if now >= dead_at && !grace {
                    if let Some(held) = self.dead.allow() {
                        tracing::warn!(
                            publisher = %self.publisher,
                            timeout = ?self.timeout,
                            held_back = held,
                            "no message from the publisher, reconnecting: is f2b-publisher's broadcast_bind \
                             reachable from here, is [subscriber] publisher right?"
                        );
                    }
                    self.notices.send(Notice::LinkDead);
                    return Ok(Stop::Reopen);
                }
                deadline = Some(deadline.map_or(dead_at, |d| d.min(dead_at)));
            }
            // What each socket has, as libzmq says; only when none has anything,
            // wait for a descriptor, the token or the deadline, then look again.
            //
            // After a group that ended with the SUB socket found empty (the last
            // reads of both it and the monitor said "nothing"), libzmq signals the
            // descriptors for whatever comes next: no need to ask again first.
            let (sub_ready, mon_ready) = if std::mem::take(&mut drained) {
                (false, false)
            } else {
                let mon = match s.monitor.as_ref() {
                    Some(m) => has_input(m)?,
                    None => false,
                };
                (has_input(&s.sub)?, mon)
            };
            let req_ready = match self.catchup.socket() {
                Some(r) => has_input(r)?,
                None => false,
            };
            if !(sub_ready || mon_ready || req_ready) {
                // The fetch's REQ socket comes and goes with each fetch. Should it
                // not be watched (the reactor out of room), it is looked at every
                // REQ_LOOK instead, and the fetch's own timeout still applies.
                let mut wait = wait_for(deadline, now, self.max_wait);
                let req_fd = match self.catchup.socket().map(|r| watch(r, "snapshot REQ")) {
                    Some(Ok(w)) => Some(w),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "cannot watch the snapshot REQ socket, looking at it every 50 ms");
                        wait = wait.min(REQ_LOOK);
                        None
                    }
                    None => None,
                };
                tokio::select! {
                    _ = token.cancelled() => return Ok(Stop::Shutdown),
                    _ = sub_fd.changed() => {}
                    _ = changed(mon_fd.as_ref()) => {}
                    _ = changed(req_fd.as_ref()) => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            if mon_ready {
                self.read_monitor(s.monitor.as_ref());
            }
            if req_ready {
                if let Some(out) = self.catchup.readable(Instant::now()) {
                    if !self.deliver(out) {
                        return Ok(Stop::Shutdown);
                    }
                }
            }
            if !sub_ready {
                continue;
            }
            // At most MAX_DRAIN messages (or MAX_DRAIN_TIME: each is verified), then
            // back to the other sockets: a backlog must not starve the token, the
            // fetch's deadline or its REQ socket. They are taken in groups of what
            // is already waiting (never waiting for more), each verified as one
            // batch and its events passed on in one send. Then the intake and the
            // executor, on the same runtime, have their turn before the next look.
            let drain_until = Instant::now() + MAX_DRAIN_TIME;
            let mut taken = 0;
            while taken < MAX_DRAIN && Instant::now() < drain_until {
                // The monitor was just read (or found empty) before the first group.
                let max = (MAX_DRAIN - taken).min(MAX_GROUP);
                let group = take_group(s, max, taken == 0);
                taken += group.messages.len();
                let more = group.messages.len() == max && group.failed.is_none();
                drained = !more && group.failed.is_none();
                match self.take_in_async(group.messages).await {
                    Handled::Genuine => {
                        last = Instant::now();
                        if let Some(m) = self.notices.metrics() {
                            m.last_heartbeat.touch();
                        }
                    }
                    Handled::Ignored => {}
                    Handled::Stop => return Ok(Stop::Shutdown),
                }
                for ev in group.tail {
                    self.link_event(ev);
                }
                if !self.send_backlog().await {
                    return Ok(Stop::Shutdown);
                }
                if let Some(e) = group.failed {
                    tracing::warn!(error = %e, "receive failed, reconnecting");
                    return Ok(Stop::Reopen);
                }
                if !more {
                    break;
                }
            }
            if taken > 0 {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Handles `messages` (read together) in order, exactly as one by one, except
    /// that their signatures are checked as one batch first and the events to use
    /// go to the intake together: accumulated in the outbox, sent before any
    /// other input (a heartbeat, catch-up output) and at the end. `Genuine` if any
    /// message was (the link is alive), `Stop` when the intake is gone.
    fn take_in(&mut self, messages: Vec<Received>) -> Handled {
        let signed = self.check_signatures(&messages);
        self.take_checked(messages, signed)
    }

    /// [`Receiver::take_in`], with a group of [`OFFLOAD_CHECK`] messages or more
    /// checked on a blocking thread: the intake and the executor, on the
    /// runtime's thread, go on with the previous groups meanwhile (a burst keeps
    /// both CPUs busy). A lone message is checked here, with no thread hand-off.
    async fn take_in_async(&mut self, messages: Vec<Received>) -> Handled {
        if messages.len() < OFFLOAD_CHECK || self.cfg.legacy || self.cfg.keys.is_empty() {
            return self.take_in(messages);
        }
        let messages = Arc::new(messages);
        let (keys, shared) = (self.cfg.keys.clone(), Arc::clone(&messages));
        let signed = tokio::task::spawn_blocking(move || check_signatures(&keys, &shared)).await;
        let messages = Arc::unwrap_or_clone(messages);
        // Should the job fail, each message is verified on its own, here.
        let signed = signed.unwrap_or_else(|_| vec![None; messages.len()]);
        self.take_checked(messages, signed)
    }

    /// Handles `messages` whose signatures `signed` says (as
    /// [`Receiver::check_signatures`] does).
    fn take_checked(&mut self, messages: Vec<Received>, signed: Vec<Option<bool>>) -> Handled {
        let mut handled = Handled::Ignored;
        for (m, signed) in messages.into_iter().zip(signed) {
            for ev in m.link {
                self.link_event(ev);
            }
            handled = handled.and(self.handle(m.frames, signed));
            if handled == Handled::Stop {
                return Handled::Stop;
            }
        }
        if self.flush() {
            handled
        } else {
            Handled::Stop
        }
    }

    /// For each message, whether its signature is by a configured key, checked
    /// all at once ([`verify_broadcasts`]); `None` for those not checked so
    /// (legacy, no key configured, not three frames: [`Receiver::verified`] says
    /// why).
    fn check_signatures(&self, messages: &[Received]) -> Vec<Option<bool>> {
        if self.cfg.legacy {
            return vec![None; messages.len()];
        }
        check_signatures(&self.cfg.keys, messages)
    }

    /// Passes catch-up output to the intake; false when the intake is gone.
    ///
    /// A complete snapshot confirms its epoch: the held events are looked at again
    /// (those of its epoch above its sequence number go with it, those of a
    /// retired epoch are dropped, the others wait on). A failed fetch releases the
    /// events it queued (their epoch was current when they came).
    fn deliver(&mut self, out: Out) -> bool {
        // Events of the messages being handled, before what follows them.
        if !self.flush() {
            return false;
        }
        match out {
            Out::Resync(mut r) => {
                let targets = self.catchup.active_targets();
                let again = self
                    .gate
                    .confirm(r.target, r.epoch, r.seq, r.asked, &targets);
                r.queued.extend(self.recheck_held());
                if again {
                    self.catchup.trigger(ResyncReason::Epoch);
                }
                self.send(Input::Resync(r))
            }
            Out::Release(queued) => {
                let mut ok = self.send_events(queued);
                if self.gate.confirming() && self.catchup.active_targets().is_empty() {
                    tracing::warn!(
                        "no publisher serves snapshots: epochs are adopted as they come, without confirmation"
                    );
                    self.gate.stop_confirming();
                    let released = self.recheck_held();
                    ok = ok && self.send_events(released);
                } else if !self.held.is_empty() {
                    if let Some(suppressed) = self.waiting_log.allow() {
                        let waiting: Vec<String> = self
                            .gate
                            .waiting()
                            .iter()
                            .map(ToString::to_string)
                            .collect();
                        tracing::warn!(
                            publisher = %self.publisher,
                            epochs = %waiting.join(","),
                            held = self.held.len(),
                            held_back = suppressed,
                            "broadcasts wait for a signed snapshot to confirm their epoch, and none came yet: \
                             is [subscriber] snapshot the reply endpoint of the same publisher, and reachable?"
                        );
                    }
                }
                ok
            }
        }
    }

    /// Looks at the held events again; returns those to use now, in order.
    fn recheck_held(&mut self) -> Vec<Sequenced> {
        let now = Instant::now();
        let mut used = Vec::new();
        for s in std::mem::take(&mut self.held) {
            match self.gate.check(s.epoch, s.seq, now) {
                Verdict::Use => used.push(s),
                Verdict::Hold => self.held.push_back(s),
                Verdict::Reflected { snapshot } => {
                    tracing::debug!(seq = s.seq, snapshot, id = %s.event.id, "held broadcast already in the snapshot");
                }
                Verdict::Replayed { floor } => self.refuse(Refusal::Replayed, Some((&s, floor))),
                Verdict::Stale => self.refuse(Refusal::StaleEpoch, Some((&s, 0))),
            }
        }
        used
    }

    /// Holds an event of an unconfirmed epoch (the oldest held is dropped when
    /// `queue_size` are held: the snapshot that confirms the epoch lists its bans).
    fn hold(&mut self, s: Sequenced) {
        if self.held.len() >= self.cfg.queue_limit.max(1) {
            if let Some(old) = self.held.pop_front() {
                if let Some(suppressed) = self.waiting_log.allow() {
                    tracing::warn!(
                        epoch = %old.epoch,
                        seq = old.seq,
                        held = self.held.len() + 1,
                        held_back = suppressed,
                        "too many broadcasts wait for a snapshot to confirm their epoch (queue_size): dropped the oldest"
                    );
                }
            }
        }
        self.held.push_back(s);
    }

    /// Counts and logs a refused broadcast (`event`: the event and the floor it
    /// was under, for replays).
    fn refuse(&mut self, reason: Refusal, event: Option<(&Sequenced, u64)>) {
        let first = self.refusals.record(reason);
        self.notices.send(Notice::Refused {
            reason,
            publisher: self.publisher.clone(),
        });
        if !first {
            return;
        }
        let (seq, epoch) = event.map_or((None, None), |(s, _)| {
            (Some(s.seq), Some(s.epoch.to_string()))
        });
        let publisher = self.publisher.as_str();
        match reason {
            Refusal::Unsigned => tracing::warn!(
                publisher,
                reason = %reason,
                "broadcast refused: it is not signed; is the publisher older, or running without \
                 [trust] signing_key_file? This subscriber takes only broadcasts signed by [trust] publisher_key \
                 (further refusals are summarised)"
            ),
            Refusal::BadSignature => tracing::warn!(
                publisher,
                reason = %reason,
                "broadcast refused: its signature is not by [trust] publisher_key (signed by another key, \
                 or altered): check [trust] publisher_key (further refusals are summarised)"
            ),
            Refusal::Replayed => tracing::info!(
                publisher,
                reason = %reason,
                seq,
                epoch,
                floor = event.map(|(_, f)| f),
                "broadcast ignored: its sequence number is not above one already applied in its epoch \
                 (a replay, or the publisher's rebroadcast after a restart; further ones are summarised)"
            ),
            Refusal::StaleEpoch => tracing::warn!(
                publisher,
                reason = %reason,
                seq,
                epoch,
                "broadcast ignored: its epoch is no longer the publisher's (a replay of an old broadcast; \
                 or, with several publishers, one whose reply endpoint [subscriber] snapshot lacks; \
                 further ones are summarised)"
            ),
        }
    }

    fn summarise_refusals(&mut self, now: Instant) {
        if let Some(c) = self.refusals.summary(now) {
            let [unsigned, bad_signature, replayed, stale_epoch] = c;
            let [t_unsigned, t_bad, t_replayed, t_stale] = self.refusals.total;
            tracing::warn!(
                publisher = %self.publisher,
                unsigned,
                bad_signature,
                replayed,
                stale_epoch,
                total = t_unsigned + t_bad + t_replayed + t_stale,
                "broadcasts refused since the last report"
            );
        }
    }

    fn read_monitor(&mut self, monitor: Option<&zmq::Socket>) {
        for ev in take_monitor(monitor) {
            self.link_event(ev);
        }
    }

    /// A connection made or lost, as the socket monitor said.
    fn link_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Connected(ep) => {
                if self.cfg.legacy {
                    tracing::info!(publisher = %ep, legacy = true, "connected");
                    self.notices.send(Notice::LegacyConnected { publisher: ep });
                } else {
                    tracing::debug!(publisher = %ep, "connection established");
                    if !self.fresh.contains(&ep) {
                        self.fresh.push(ep);
                    }
                }
            }
            LinkEvent::Disconnected(ep) => {
                tracing::info!(publisher = %ep, "disconnected");
                self.fresh.retain(|f| *f != ep);
                self.notices.send(Notice::Disconnected { publisher: ep });
            }
        }
    }

    fn bad_message(&mut self, error: &dyn std::fmt::Display) {
        if let Some(m) = self.notices.metrics() {
            m.broadcasts_refused.inc("malformed");
        }
        if let Some(held) = self.bad.allow() {
            tracing::warn!(error = %error, held_back = held, "bad message dropped");
        }
    }

    /// The topic and payload of a native message, if its signature is right (or
    /// no key is configured); refusals are counted and logged here. `signed`: the
    /// signature's check when already made ([`Receiver::check_signatures`]).
    fn verified(&mut self, frames: &Frames, signed: Option<bool>) -> Option<(Vec<u8>, Vec<u8>)> {
        let (Some(topic), Some(payload)) = (frames.kept.first(), frames.kept.get(1)) else {
            let expected = if self.cfg.keys.is_empty() {
                "topic, payload"
            } else {
                "topic, payload, signature"
            };
            self.bad_message(&format!(
                "expected {} frames ({expected}), got {}",
                if self.cfg.keys.is_empty() { 2 } else { 3 },
                frames.count
            ));
            return None;
        };
        if self.cfg.keys.is_empty() {
            // allow_unauthenticated without a key: frames after the payload (a
            // signature this subscriber cannot check) are ignored.
            return Some((topic.clone(), payload.clone()));
        }
        match (frames.count, frames.kept.get(2)) {
            (2, _) => {
                self.refuse(Refusal::Unsigned, None);
                None
            }
            (3, Some(sig)) => {
                if signed.unwrap_or_else(|| verify_broadcast(&self.cfg.keys, topic, payload, sig)) {
                    Some((topic.clone(), payload.clone()))
                } else {
                    self.refuse(Refusal::BadSignature, None);
                    None
                }
            }
            (count, _) => {
                self.bad_message(&format!(
                    "expected 3 frames (topic, payload, signature), got {count}"
                ));
                None
            }
        }
    }

    /// Handles one message (`signed`: its signature's check, if already made).
    /// The events it brings to use are left in the outbox, for
    /// [`Receiver::take_in`] to pass on.
    fn handle(&mut self, frames: Frames, signed: Option<bool>) -> Handled {
        if self.cfg.legacy {
            return match self.handle_legacy(frames) {
                true => Handled::Genuine,
                false => Handled::Stop,
            };
        }
        let Some((topic, payload)) = self.verified(&frames, signed) else {
            return Handled::Ignored;
        };
        let msg = match Broadcast::decode(&topic, &payload) {
            Ok(m) => m,
            Err(e) => {
                self.bad_message(&e);
                return Handled::Ignored;
            }
        };
        match msg {
            Broadcast::Heartbeat(h) => {
                if self.gate.is_retired(h.epoch) {
                    tracing::debug!(epoch = %h.epoch, seq = h.seq, "heartbeat of a retired epoch ignored");
                    return Handled::Ignored;
                }
                self.timeout = link_timeout(self.cfg.heartbeat_timeout, h.interval_ms);
                if let Some(m) = self.notices.metrics() {
                    m.heartbeats_received.inc();
                    // With a jail filter the other jails' numbers never arrive.
                    if let (true, Some(high)) = (self.cfg.jails.is_empty(), self.gate.high(h.epoch))
                    {
                        m.sequence_lag
                            .set(i64::try_from(h.seq.saturating_sub(high)).unwrap_or(i64::MAX));
                    }
                }
                let obs = self.link.observe(h.epoch, h.seq, false);
                self.report(h.epoch, h.seq, obs);
                if self.cfg.heartbeats {
                    // After the events of the messages before it.
                    return alive(
                        self.flush()
                            && self.send(Input::Heartbeat {
                                epoch: h.epoch,
                                seq: h.seq,
                            }),
                    );
                }
                Handled::Genuine
            }
            Broadcast::Event(s) => self.event(s),
            Broadcast::Events(batch) => {
                // Verified once, above; each event then goes through exactly what
                // a lone `event` would, in order (link, gate, hold, catch-up).
                let mut handled = Handled::Ignored;
                for s in batch.into_items() {
                    handled = handled.and(self.event(s));
                    if matches!(handled, Handled::Stop) {
                        break;
                    }
                }
                handled
            }
        }
    }

    /// One broadcast event (alone, or an element of an `events` message with its
    /// epoch): metrics, the link's sequence tracking, the gate, then held, queued
    /// for a fetch under way, or put in the outbox (sent by [`Receiver::flush`]).
    fn event(&mut self, s: Sequenced) -> Handled {
        if let Some(m) = self.notices.metrics() {
            m.events_received.inc();
        }
        if self.gate.is_retired(s.epoch) {
            self.refuse(Refusal::StaleEpoch, Some((&s, 0)));
            return Handled::Ignored;
        }
        let obs = self.link.observe(s.epoch, s.seq, true);
        self.report(s.epoch, s.seq, obs);
        tracing::debug!(
            seq = s.seq,
            epoch = %s.epoch,
            jail = %s.event.jail,
            action = %s.event.action,
            ip = %s.event.ip,
            node = %s.event.node,
            id = %s.event.id,
            "received"
        );
        let was_waiting = self.gate.waiting().contains(&s.epoch);
        match self.gate.check(s.epoch, s.seq, Instant::now()) {
            Verdict::Use => {}
            Verdict::Hold => {
                if !was_waiting {
                    tracing::info!(
                        epoch = %s.epoch,
                        "broadcasts of this epoch are held until a signed snapshot confirms it"
                    );
                    self.catchup.trigger(ResyncReason::Epoch);
                }
                self.hold(s);
                return Handled::Genuine;
            }
            Verdict::Reflected { snapshot } => {
                tracing::debug!(seq = s.seq, snapshot, id = %s.event.id, "broadcast already in the last snapshot");
                return Handled::Genuine;
            }
            Verdict::Replayed { floor } => {
                self.refuse(Refusal::Replayed, Some((&s, floor)));
                return Handled::Ignored;
            }
            Verdict::Stale => {
                self.refuse(Refusal::StaleEpoch, Some((&s, 0)));
                return Handled::Ignored;
            }
        }
        if self.catchup.fetching() {
            match self.catchup.queue(s, Instant::now()) {
                Some(out) => alive(self.deliver(out)),
                None => Handled::Genuine,
            }
        } else {
            self.outbox.push(s);
            Handled::Genuine
        }
    }

    /// Passes the events accumulated in the outbox on to the intake, in one send;
    /// false when the intake is gone.
    fn flush(&mut self) -> bool {
        let out = std::mem::take(&mut self.outbox);
        self.send_events(out)
    }

    /// Sends `events` to the intake in order: one as an [`Input::Event`], several
    /// as one [`Input::Events`]; false when the intake is gone.
    fn send_events(&mut self, mut events: Vec<Sequenced>) -> bool {
        let input = match events.len() {
            0 => return true,
            1 => Input::from(events.remove(0)),
            _ => Input::Events(events),
        };
        self.send(input)
    }

    /// Passes `input` on to the intake, after whatever waits in the backlog; false
    /// when the intake is gone. Never waits: when the channel is full, the input
    /// goes to the backlog, which the loop sends (waiting for room) before it
    /// reads another group ([`Receiver::send_backlog`]).
    fn send(&mut self, input: Input) -> bool {
        if !self.backlog.is_empty() {
            self.backlog.push_back(input);
            return !self.tx.is_closed();
        }
        match self.tx.try_send(input) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(input)) => {
                self.backlog.push_back(input);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Sends the backlog to the intake in order, waiting for room in the channel
    /// (the intake runs meanwhile); false when the intake is gone.
    async fn send_backlog(&mut self) -> bool {
        while let Some(input) = self.backlog.pop_front() {
            if self.tx.send(input).await.is_err() {
                return false;
            }
        }
        true
    }

    fn handle_legacy(&mut self, frames: Frames) -> bool {
        let (Some(bytes), 1) = (frames.kept.first(), frames.count) else {
            self.bad_message(&format!(
                "expected 1 frame (a fail2ban-zmq-tools message), got {}",
                frames.count
            ));
            return true;
        };
        let Some(id) = random_id() else {
            self.bad_message(&"cannot draw a random event id");
            return true;
        };
        match legacy_event(bytes, &self.cfg.jails, id, crate::store::now_ms()) {
            Ok(Some(event)) => {
                tracing::debug!(
                    jail = %event.jail,
                    action = %event.action,
                    ip = %event.ip,
                    node = %event.node,
                    id = %event.id,
                    "received"
                );
                // (The outbox is empty with `legacy`; flushed for order all the same.)
                self.flush()
                    && self.send(Input::Event {
                        event,
                        seq: 0,
                        epoch: None,
                    })
            }
            Ok(None) => true,
            Err(why) => {
                self.bad_message(&why);
                true
            }
        }
    }

    /// Which of the fresh connections a message of `epoch` proves live, if any.
    fn fresh_for(&self, epoch: Epoch) -> Option<usize> {
        if self.fresh.is_empty() {
            return None;
        }
        match self.origin.get(&epoch) {
            Some(ep) => self
                .fresh
                .iter()
                .position(|f| f == ep)
                .or_else(|| (self.cfg.endpoints.len() == 1).then_some(0)),
            None => Some(0),
        }
    }

    fn report(&mut self, epoch: Epoch, seq: u64, obs: Observation) {
        let fresh = self.fresh_for(epoch);
        let connected = obs.connected || fresh.is_some();
        if connected {
            let publisher = match fresh {
                Some(i) => {
                    let ep = self.fresh.remove(i);
                    if self.origin.len() >= MAX_ORIGINS && !self.origin.contains_key(&epoch) {
                        self.origin.clear();
                    }
                    self.origin.insert(epoch, ep.clone());
                    ep
                }
                None => self
                    .origin
                    .get(&epoch)
                    .cloned()
                    .unwrap_or_else(|| self.publisher.clone()),
            };
            tracing::info!(publisher = %publisher, epoch = %epoch, seq, "connected");
            self.notices.send(Notice::Connected { epoch });
            let reason = if !self.started {
                ResyncReason::Start
            } else if obs.new_epoch {
                ResyncReason::Epoch
            } else {
                ResyncReason::Reconnect
            };
            self.started = true;
            self.catchup.trigger(reason);
        }
        if obs.missed > 0 {
            tracing::warn!(
                publisher = %self.publisher,
                epoch = %epoch,
                count = obs.missed,
                seq,
                "missed events"
            );
            self.notices.send(Notice::Missed {
                epoch,
                count: obs.missed,
            });
            if !connected {
                self.catchup.trigger(ResyncReason::Gap);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::auth::{sign_broadcast, SigningKey};
    use f2b_proto::{Action, Heartbeat};

    fn key() -> SigningKey {
        SigningKey::from_seed([42; 32])
    }

    fn sequenced(seq: u64, epoch: Epoch, ip: &str) -> Sequenced {
        let event = Event::new(
            EventId::from_u128(u128::from(seq) + 1000 * u128::from(ip.len() as u64)),
            NodeName::new("web2").unwrap(),
            JailName::new("sshd").unwrap(),
            Action::Ban,
            ip.parse().unwrap(),
            1_763_702_000_000,
        )
        .unwrap();
        Sequenced { seq, epoch, event }
    }

    /// A message as read from the socket: topic, payload and, with `key`, the
    /// signature.
    fn message(b: &Broadcast, key: Option<&SigningKey>) -> Received {
        let mut kept = vec![b.topic(), b.encode()];
        if let Some(k) = key {
            kept.push(sign_broadcast(k, &kept[0], &kept[1]).to_vec());
        }
        Received {
            link: Vec::new(),
            frames: Frames {
                count: kept.len(),
                kept,
            },
        }
    }

    /// A receiver's configuration with no endpoints, jails, snapshots or keys,
    /// not passing heartbeats on.
    fn plain_config() -> ReceiverConfig {
        ReceiverConfig {
            endpoints: vec![],
            jails: vec![],
            heartbeat_timeout: Duration::from_secs(5),
            snapshot: vec![],
            snapshot_timeout: Duration::from_secs(5),
            queue_limit: 10,
            legacy: false,
            keys: vec![],
            heartbeats: false,
        }
    }

    /// A receiver trusting [`key`], passing heartbeats on, with what it sends to
    /// the intake and its notices.
    fn receiver(
        keys: Vec<PublicKey>,
    ) -> (
        Receiver,
        mpsc::Receiver<Input>,
        mpsc::UnboundedReceiver<Notice>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        let (ntx, nrx) = mpsc::unbounded_channel();
        let cfg = ReceiverConfig {
            keys,
            heartbeats: true,
            ..plain_config()
        };
        let r = Receiver::new(cfg, CancellationToken::new(), tx, Notices::to(ntx));
        (r, rx, nrx)
    }

    fn inputs(rx: &mut mpsc::Receiver<Input>) -> Vec<Input> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn a_group_sends_its_events_together_flushed_before_a_heartbeat() {
        let (mut r, mut rx, mut nrx) = receiver(vec![key().public()]);
        let other = SigningKey::from_seed([43; 32]);
        let e = Epoch(9);
        let ev = |seq, ip| Broadcast::Event(sequenced(seq, e, ip));
        let group = vec![
            message(&ev(1, "203.0.113.1"), Some(&key())),
            message(&ev(2, "203.0.113.2"), Some(&key())),
            // Forged: another key, the next number; refused, no gap, no use.
            message(&ev(3, "198.51.100.3"), Some(&other)),
            message(&ev(3, "203.0.113.3"), Some(&key())),
            message(
                &Broadcast::Heartbeat(Heartbeat {
                    seq: 3,
                    epoch: e,
                    interval_ms: 1000,
                }),
                Some(&key()),
            ),
            message(&ev(4, "203.0.113.4"), Some(&key())),
            // Unsigned.
            message(&ev(5, "198.51.100.5"), None),
            message(&ev(5, "203.0.113.5"), Some(&key())),
        ];
        assert_eq!(r.take_in(group), Handled::Genuine);
        assert_eq!(
            inputs(&mut rx),
            [
                Input::Events(vec![
                    sequenced(1, e, "203.0.113.1"),
                    sequenced(2, e, "203.0.113.2"),
                    sequenced(3, e, "203.0.113.3"),
                ]),
                Input::Heartbeat { epoch: e, seq: 3 },
                Input::Events(vec![
                    sequenced(4, e, "203.0.113.4"),
                    sequenced(5, e, "203.0.113.5"),
                ]),
            ]
        );
        let notices: Vec<Notice> = std::iter::from_fn(|| nrx.try_recv().ok()).collect();
        let refused = |why| {
            notices
                .iter()
                .filter(|n| matches!(n, Notice::Refused { reason, .. } if *reason == why))
                .count()
        };
        assert_eq!(refused(Refusal::BadSignature), 1, "{notices:?}");
        assert_eq!(refused(Refusal::Unsigned), 1, "{notices:?}");
        assert!(
            !notices.iter().any(|n| matches!(n, Notice::Missed { .. })),
            "{notices:?}"
        );
        assert!(r.outbox.is_empty());
    }

    #[tokio::test]
    async fn a_group_checked_on_a_blocking_thread_is_handled_as_one_checked_here() {
        let other = SigningKey::from_seed([43; 32]);
        let e = Epoch(9);
        let ev = |seq, ip: &str| Broadcast::Event(sequenced(seq, e, ip));
        let group = || {
            let mut g = Vec::new();
            for seq in 1..=OFFLOAD_CHECK as u64 + 2 {
                let ip = format!("203.0.113.{seq}");
                match seq % 4 {
                    // Forged and unsigned ones, refused.
                    1 => g.push(message(&ev(seq, "198.51.100.1"), Some(&other))),
                    2 => g.push(message(&ev(seq, "198.51.100.2"), None)),
                    _ => {}
                }
                g.push(message(&ev(seq, &ip), Some(&key())));
            }
            g
        };
        assert!(group().len() >= OFFLOAD_CHECK);
        let outcome = |mut rx: mpsc::Receiver<Input>, mut nrx: mpsc::UnboundedReceiver<Notice>| {
            let refused: Vec<String> = std::iter::from_fn(|| nrx.try_recv().ok())
                .filter_map(|n| match n {
                    Notice::Refused { reason, .. } => Some(reason.to_string()),
                    _ => None,
                })
                .collect();
            (inputs(&mut rx), refused)
        };
        let (mut here, rx1, n1) = receiver(vec![key().public()]);
        assert_eq!(here.take_in(group()), Handled::Genuine);
        let (mut there, rx2, n2) = receiver(vec![key().public()]);
        assert_eq!(there.take_in_async(group()).await, Handled::Genuine);
        let (want, got) = (outcome(rx1, n1), outcome(rx2, n2));
        assert_eq!(want, got);
        // All ten used, the six forged or unsigned refused.
        assert_eq!(want.1.len(), 6, "{want:?}");
        let used: usize = want
            .0
            .iter()
            .map(|i| match i {
                Input::Events(v) => v.len(),
                _ => 1,
            })
            .sum();
        assert_eq!(used, OFFLOAD_CHECK + 2);
    }

    #[test]
    fn a_lone_message_is_sent_at_once_as_one_event() {
        let (mut r, mut rx, _n) = receiver(vec![key().public()]);
        let s = sequenced(1, Epoch(3), "203.0.113.7");
        let group = vec![message(&Broadcast::Event(s.clone()), Some(&key()))];
        assert_eq!(r.take_in(group), Handled::Genuine);
        assert_eq!(inputs(&mut rx), [Input::from(s)]);
        // Nothing but refusals: nothing sent, the link not proven alive.
        let forged = sequenced(2, Epoch(3), "198.51.100.1");
        let other = SigningKey::from_seed([43; 32]);
        let group = vec![
            message(&Broadcast::Event(forged.clone()), Some(&other)),
            message(&Broadcast::Event(forged), None),
        ];
        assert_eq!(r.take_in(group), Handled::Ignored);
        assert_eq!(inputs(&mut rx), []);
    }

    #[test]
    fn signatures_are_checked_together_for_three_frame_messages_only() {
        let s = Broadcast::Event(sequenced(1, Epoch(3), "203.0.113.7"));
        let other = SigningKey::from_seed([43; 32]);
        let mut four = message(&s, Some(&key()));
        four.frames.kept.push(b"extra".to_vec());
        four.frames.count = 4;
        let group = || {
            vec![
                message(&s, None),
                message(&s, Some(&key())),
                message(&s, Some(&other)),
                message(&s, Some(&key())),
            ]
        };
        let (r, _rx, _n) = receiver(vec![key().public()]);
        assert_eq!(
            r.check_signatures(&group()),
            [None, Some(true), Some(false), Some(true)]
        );
        assert_eq!(r.check_signatures(&[four]), [None]);
        // No key (allow_unauthenticated): nothing to check.
        let (r, _rx, _n) = receiver(vec![]);
        assert_eq!(r.check_signatures(&group()), [None; 4]);
    }

    #[test]
    fn an_intake_gone_stops_the_group() {
        let (mut r, rx, _n) = receiver(vec![key().public()]);
        drop(rx);
        let s = Broadcast::Event(sequenced(1, Epoch(3), "203.0.113.7"));
        assert_eq!(r.take_in(vec![message(&s, Some(&key()))]), Handled::Stop);
    }

    /// Every input until the channel closes.
    async fn all_inputs(mut rx: mpsc::Receiver<Input>) -> Vec<Input> {
        let mut got = Vec::new();
        while let Some(i) = rx.recv().await {
            got.push(i);
        }
        got
    }

    #[tokio::test]
    async fn inputs_that_find_the_channel_full_wait_in_order_and_none_is_lost() {
        let (tx, rx) = mpsc::channel(1);
        let cfg = ReceiverConfig {
            heartbeats: true,
            ..plain_config()
        };
        let mut r = Receiver::new(cfg, CancellationToken::new(), tx, Notices::default());
        let e = Epoch(4);
        let hb = |seq| {
            message(
                &Broadcast::Heartbeat(Heartbeat {
                    seq,
                    epoch: e,
                    interval_ms: 1000,
                }),
                None,
            )
        };
        let ev = |seq, ip| message(&Broadcast::Event(sequenced(seq, e, ip)), None);
        // Four inputs for a channel of one: never a wait, nothing dropped.
        let group = vec![ev(1, "203.0.113.1"), hb(1), ev(2, "203.0.113.2"), hb(2)];
        assert_eq!(r.take_in(group), Handled::Genuine);
        assert_eq!(r.backlog.len(), 3);
        // The backlog goes first, in order, as the intake makes room.
        let reader = tokio::spawn(all_inputs(rx));
        assert!(r.send_backlog().await);
        assert!(r.backlog.is_empty());
        drop(r);
        assert_eq!(
            reader.await.unwrap(),
            [
                Input::from(sequenced(1, e, "203.0.113.1")),
                Input::Heartbeat { epoch: e, seq: 1 },
                Input::from(sequenced(2, e, "203.0.113.2")),
                Input::Heartbeat { epoch: e, seq: 2 },
            ]
        );
    }

    #[tokio::test]
    async fn with_the_backlog_not_empty_a_new_input_goes_behind_it() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut r = Receiver::new(
            plain_config(),
            CancellationToken::new(),
            tx,
            Notices::default(),
        );
        let e = Epoch(4);
        assert!(r.send(Input::from(sequenced(1, e, "203.0.113.1"))));
        assert!(r.send(Input::from(sequenced(2, e, "203.0.113.2"))));
        // Room again, but the backlog is older.
        assert!(rx.recv().await.is_some());
        assert!(r.send(Input::from(sequenced(3, e, "203.0.113.3"))));
        assert_eq!(r.backlog.len(), 2);
        let reader = tokio::spawn(all_inputs(rx));
        assert!(r.send_backlog().await);
        drop(r);
        assert_eq!(
            reader.await.unwrap(),
            [
                Input::from(sequenced(2, e, "203.0.113.2")),
                Input::from(sequenced(3, e, "203.0.113.3")),
            ]
        );
    }

    /// Every broadcast wakes the loop through its socket's descriptor: with the
    /// fallback wait and the dead-link timeout an hour long, a missed wake-up
    /// would leave an input undelivered and fail the test. Lone messages (the
    /// loop then waits with the socket read empty, without asking libzmq again)
    /// and pairs sent back to back, over real TCP.
    #[tokio::test]
    async fn every_message_wakes_the_loop_without_a_fallback_timer() {
        const HOUR: Duration = Duration::from_secs(3600);
        let ctx = zmq::Context::new();
        let publ = new_socket(&ctx, zmq::PUB).unwrap();
        publ.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = Endpoint::connect(&f2b_common::sockets::last_endpoint(&publ)).unwrap();
        let cfg = ReceiverConfig {
            endpoints: vec![endpoint],
            heartbeat_timeout: HOUR,
            heartbeats: true,
            ..plain_config()
        };
        let (tx, mut rx) = mpsc::channel(64);
        let token = CancellationToken::new();
        let mut r = Receiver::new(cfg, token.clone(), tx, Notices::default());
        r.max_wait = HOUR;
        let task = tokio::spawn(r.run(ctx.clone()));
        let send = |b: &Broadcast| publ.send_multipart([b.topic(), b.encode()], 0).unwrap();
        let e = Epoch(11);
        async fn within(rx: &mut mpsc::Receiver<Input>) -> Input {
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("an input within 20 s (a missed wake-up waits an hour)")
                .expect("the receive loop is running")
        }
        // The subscription reaches the publisher at some point: heartbeats until
        // one arrives (each waited for, so none is lost to a wake-up either).
        let mut hb = 0;
        loop {
            hb += 1;
            send(&Broadcast::Heartbeat(Heartbeat {
                seq: 0,
                epoch: e,
                interval_ms: 1000,
            }));
            match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                Ok(Some(Input::Heartbeat { .. })) => break,
                Ok(other) => panic!("{other:?}"),
                Err(_) => assert!(hb < 200, "the subscription never arrived"),
            }
        }
        let mut seq = 0;
        for round in 0..100 {
            seq += 1;
            let one = sequenced(seq, e, "203.0.113.9");
            send(&Broadcast::Event(one.clone()));
            let mut want = vec![Input::from(one)];
            if round % 3 == 0 {
                seq += 1;
                let two = sequenced(seq, e, "203.0.113.10");
                send(&Broadcast::Event(two.clone()));
                want.push(Input::from(two));
            }
            // A pair may come as one group (one `Events` input) or as two.
            let mut got = Vec::new();
            while got.len() < want.len() {
                match within(&mut rx).await {
                    Input::Events(v) => got.extend(v.into_iter().map(Input::from)),
                    i => got.push(i),
                }
            }
            assert_eq!(got, want, "round {round}");
        }
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// A loop held up longer than the dead-link timeout (its runtime's thread
    /// blocked, here by the test itself) finds what came meanwhile in its socket:
    /// that is a live link, not a silent publisher, and nothing is dropped.
    #[tokio::test]
    async fn a_stalled_loop_does_not_take_what_waits_in_its_socket_for_a_dead_link() {
        let ctx = zmq::Context::new();
        let publ = new_socket(&ctx, zmq::PUB).unwrap();
        publ.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = Endpoint::connect(&f2b_common::sockets::last_endpoint(&publ)).unwrap();
        let timeout = Duration::from_millis(200);
        let cfg = ReceiverConfig {
            endpoints: vec![endpoint],
            heartbeat_timeout: timeout,
            heartbeats: true,
            ..plain_config()
        };
        let (tx, mut rx) = mpsc::channel(64);
        let (ntx, mut nrx) = mpsc::unbounded_channel();
        let token = CancellationToken::new();
        let task =
            tokio::spawn(Receiver::new(cfg, token.clone(), tx, Notices::to(ntx)).run(ctx.clone()));
        let e = Epoch(12);
        let send = |b: &Broadcast| publ.send_multipart([b.topic(), b.encode()], 0).unwrap();
        let heartbeat = Broadcast::Heartbeat(Heartbeat {
            seq: 0,
            epoch: e,
            interval_ms: 50,
        });
        let mut tries = 0;
        loop {
            tries += 1;
            send(&heartbeat);
            match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
                Ok(Some(Input::Heartbeat { .. })) => break,
                Ok(other) => panic!("{other:?}"),
                Err(_) => assert!(tries < 400, "the subscription never arrived"),
            }
        }
        let ban = sequenced(1, e, "203.0.113.21");
        send(&Broadcast::Event(ban.clone()));
        // The runtime's thread held up three timeouts long (the receive loop with
        // it); libzmq's I/O thread receives the event meanwhile.
        std::thread::sleep(3 * timeout);
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("the event within 20 s")
            .expect("the receive loop is running");
        assert_eq!(got, Input::from(ban));
        let notices: Vec<Notice> = std::iter::from_fn(|| nrx.try_recv().ok()).collect();
        assert!(
            !notices.iter().any(|n| matches!(n, Notice::LinkDead)),
            "{notices:?}"
        );
        token.cancel();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn the_wait_is_never_longer_than_max_poll_wait() {
        let now = Instant::now();
        // No deadline (legacy, no fetch): not forever.
        assert_eq!(wait_for(None, now, MAX_POLL_WAIT), MAX_POLL_WAIT);
        // A far dead-link deadline (heartbeat_timeout = "10m").
        assert_eq!(
            wait_for(Some(now + Duration::from_secs(600)), now, MAX_POLL_WAIT),
            MAX_POLL_WAIT
        );
        assert_eq!(
            wait_for(Some(now + Duration::from_millis(200)), now, MAX_POLL_WAIT),
            Duration::from_millis(200)
        );
        // A deadline passed: no wait.
        assert_eq!(
            wait_for(Some(now), now + Duration::from_secs(1), MAX_POLL_WAIT),
            Duration::ZERO
        );
    }

    #[test]
    fn a_message_of_several_events_is_what_its_most_telling_event_was() {
        use Handled::{Genuine, Ignored, Stop};
        for (a, b, want) in [
            (Ignored, Ignored, Ignored),
            (Ignored, Genuine, Genuine),
            (Genuine, Ignored, Genuine),
            (Genuine, Genuine, Genuine),
            (Genuine, Stop, Stop),
            (Stop, Ignored, Stop),
            (Ignored, Stop, Stop),
        ] {
            assert_eq!(a.and(b), want, "{a:?} and {b:?}");
        }
    }

    #[test]
    fn topics_follow_the_jail_filter() {
        let mut cfg = plain_config();
        assert_eq!(cfg.topics(), vec![Vec::<u8>::new()]);
        cfg.jails = vec![JailName::new("sshd").unwrap()];
        assert_eq!(cfg.topics(), vec![b"hb:\0".to_vec(), b"ev:sshd\0".to_vec()]);
        cfg.legacy = true;
        assert_eq!(cfg.topics(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn new_epochs_are_told_apart_from_reconnections() {
        let mut l = LinkState::new(true, true);
        assert!(l.observe(Epoch(1), 0, false).new_epoch);
        assert!(!l.observe(Epoch(1), 0, false).new_epoch);
        l.reset_live();
        let o = l.observe(Epoch(1), 0, false);
        assert!(o.connected && !o.new_epoch);
        assert!(l.observe(Epoch(2), 0, false).new_epoch);
    }

    #[test]
    fn monitor_messages_are_read() {
        let frame = |ev: zmq::SocketEvent| {
            let mut b = ev.to_raw().to_ne_bytes().to_vec();
            b.extend_from_slice(&7u32.to_ne_bytes());
            b
        };
        let ep = b"tcp://127.0.0.1:5680".to_vec();
        assert_eq!(
            parse_monitor(&[frame(zmq::SocketEvent::CONNECTED), ep.clone()]),
            Some(LinkEvent::Connected("tcp://127.0.0.1:5680".into()))
        );
        assert_eq!(
            parse_monitor(&[frame(zmq::SocketEvent::DISCONNECTED), ep.clone()]),
            Some(LinkEvent::Disconnected("tcp://127.0.0.1:5680".into()))
        );
        assert_eq!(
            parse_monitor(&[frame(zmq::SocketEvent::CLOSED), ep.clone()]),
            None
        );
        assert_eq!(parse_monitor(&[vec![1], ep]), None);
        assert_eq!(parse_monitor(&[frame(zmq::SocketEvent::CONNECTED)]), None);
        assert_eq!(parse_monitor(&[]), None);
    }

    #[test]
    fn legacy_messages_become_events() {
        let id = EventId::from_u128(7);
        let e = legacy_event(b"web1|sshd|Ban|10.1", &[], id, 1_763_702_000_000)
            .unwrap()
            .unwrap();
        assert_eq!(e.node.as_str(), "web1");
        assert_eq!(e.jail.as_str(), "sshd");
        assert_eq!(e.action, f2b_proto::Action::Ban);
        assert_eq!(e.ip.to_string(), "10.0.0.1");
        assert_eq!(e.id, id);
        assert_eq!(e.time_ms, 1_763_702_000_000);
        let e = legacy_event(b"Web2.example.org.|sshd|UnBan|192.0.2.1|x", &[], id, 1)
            .unwrap()
            .unwrap();
        assert_eq!(e.node.as_str(), "web2.example.org");
        assert_eq!(e.action, f2b_proto::Action::Unban);
        let sshd = [JailName::new("sshd").unwrap()];
        assert_eq!(legacy_event(b"web1|nginx|Ban|10.1", &sshd, id, 1), Ok(None));
        assert!(legacy_event(b"web1|sshd|Ban|10.1", &sshd, id, 1)
            .unwrap()
            .is_some());
        for bad in [
            &b"web1||Ban|10.1"[..],
            b"web1|sshd|Drop|10.1",
            b"web1|sshd|Ban|2001:db8::1",
            b"web1|sshd|Ban",
            b"{\"v\":1}",
            b"",
            b"\xff|sshd|Ban|10.1",
        ] {
            assert!(
                legacy_event(bad, &[], id, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn random_ids_are_version_4_and_differ() {
        let a = random_id().unwrap();
        let b = random_id().unwrap();
        assert_ne!(a, b);
        assert_eq!((a.as_u128() >> 76) & 0xf, 4);
    }

    #[test]
    fn connected_once_per_epoch_and_socket() {
        let mut l = LinkState::new(true, true);
        let e = Epoch(1);
        assert!(l.observe(e, 0, false).connected);
        assert!(!l.observe(e, 1, true).connected);
        l.reset_live();
        assert!(l.observe(e, 1, false).connected);
        assert!(l.observe(Epoch(2), 0, false).connected);
    }

    #[test]
    fn counts_gaps_within_an_epoch() {
        let mut l = LinkState::new(true, true);
        let e = Epoch(7);
        // Joining a running publisher: earlier events are not a gap.
        assert_eq!(l.observe(e, 40, false).missed, 0);
        assert_eq!(l.observe(e, 41, true).missed, 0);
        assert_eq!(l.observe(e, 44, true).missed, 2);
        assert_eq!(l.observe(e, 44, false).missed, 0);
        assert_eq!(l.observe(e, 46, false).missed, 2);
        // A replayed or duplicate event is not a gap either.
        assert_eq!(l.observe(e, 45, true).missed, 0);
        assert_eq!(l.observe(e, 47, true).missed, 0);
    }

    #[test]
    fn restart_of_the_only_publisher_counts_events_before_the_first_seen() {
        let mut l = LinkState::new(true, true);
        l.observe(Epoch(1), 5, false);
        assert_eq!(l.observe(Epoch(2), 3, true).missed, 2);
        let mut many = LinkState::new(false, true);
        many.observe(Epoch(1), 5, false);
        assert_eq!(many.observe(Epoch(2), 3, true).missed, 0);
    }

    #[test]
    fn no_gaps_with_a_jail_filter() {
        let mut l = LinkState::new(true, false);
        l.observe(Epoch(1), 1, true);
        assert_eq!(l.observe(Epoch(1), 9, true).missed, 0);
        assert_eq!(l.observe(Epoch(1), 20, false).missed, 0);
    }

    #[test]
    fn remembers_a_bounded_number_of_epochs() {
        let mut l = LinkState::new(false, true);
        for i in 0..100 {
            l.observe(Epoch(i), 1, false);
        }
        assert!(l.epochs.len() <= MAX_EPOCHS);
        assert!(l.epochs.contains_key(&Epoch(99)));
    }

    #[test]
    fn link_timeout_follows_announced_interval() {
        let five = Duration::from_secs(5);
        assert_eq!(link_timeout(five, 1000), five);
        assert_eq!(link_timeout(five, 0), five);
        assert_eq!(link_timeout(five, 10_000), Duration::from_secs(30));
        assert_eq!(link_timeout(five, u64::MAX), Duration::from_secs(1800));
    }
}
