//! The publisher's decisions: request frames, the peer's address and the time in,
//! a reply and the broadcasts it causes out.
//!
//! [`Core::handle`] is the whole policy: validation, authentication (see
//! [`crate::trust`]), the allowlist, rate limits and the circuit breaker (see
//! [`crate::guard`]), reserved addresses, time sanity, duplicate ids, cluster-state
//! deduplication, sequence numbers, legacy (fail2ban-zmq-tools) requests and
//! snapshots. Its only I/O is the [`Ledger`] (which tests keep in memory): an
//! accepted event is appended there before `handle` returns (in the batch the
//! server opened, committed by [`Core::commit_batch`]), so the reply and the
//! broadcasts it returns describe a durable event. The ZeroMQ loop in
//! [`crate::server`] only moves bytes to and from it, so every rule here is tested
//! without sockets.
//!
//! A report goes through, in order: decoding; authentication ([`Trust::check`]:
//! `unauthenticated`, `replayed`); the node's quarantine and rate limit
//! ([`Guard::admit`]: `quarantined`, `rate_limited`); reserved ranges and
//! `ignore_ip` (`forbidden`); the event's time (`invalid_time`); duplicate ids; the
//! cluster state; the ledger. A legacy report skips authentication (its token was
//! checked when it was parsed) and is limited by its host name.
//!
//! A `reports` request (several events of one node) is decoded and authenticated
//! once, as a report is: a refusal there is one NAK without an id for the whole
//! request. Then its events are decided in order, each as a report from the
//! guard on, and answered with one `replies` ([`Reply::Replies`]), an answer per
//! event; its [`Outcome`] carries a broadcast per event accepted, each naming its
//! answer ([`ToBroadcast::answer`]). After the first event refused with a
//! transient reason ([`NakReason::is_transient`]), the later ones are refused with
//! that reason without being decided (not recorded, not counted by the guard), so
//! that the monitor's resend of them keeps their order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use f2b_common::config::LegacyPeer;
use f2b_proto::legacy::LegacyError;
use f2b_proto::{
    Ack, AckStatus, Action, Broadcast, Epoch, Event, EventId, Heartbeat, Nak, NakReason, Reply,
    Request, Sequenced, SnapshotReply, SnapshotRequest, MAX_DETAIL_LEN, MAX_FRAMES,
    MAX_SAFE_INTEGER,
};

use crate::guard::{Guard, GuardConfig};
use crate::ledger::{Ledger, LedgerError, Record};
use crate::legacy::{self, LEGACY_NAK};
use crate::memory::{BanState, ClusterState, RecentIds};
use crate::throttle::Throttle;
use crate::trust::{Reporter, Seal, Trust};

/// How many event ids the publisher remembers for duplicate detection.
pub const RECENT_IDS: usize = 100_000;

/// How many (jail, address) states the publisher remembers.
pub const CLUSTER_STATES: usize = 100_000;

/// How far an event's time may be ahead of the publisher's clock. Beyond it the
/// event is refused with `invalid_time`: its node's clock is wrong, or the report is
/// forged. Past times are accepted (a monitor may send a backlog after an outage).
pub const MAX_FUTURE: Duration = Duration::from_secs(24 * 60 * 60);

/// How often the ledger is pruned (also once at start).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The core's tunables; [`Limits::default`] holds the production values, tests
/// shrink them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Event ids remembered for duplicate detection.
    pub recent_ids: usize,
    /// (jail, address) states remembered.
    pub cluster_states: usize,
    /// How far an event's time may be ahead of the publisher's clock.
    pub max_future: Duration,
    /// How often the server prunes the ledger.
    pub prune_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            recent_ids: RECENT_IDS,
            cluster_states: CLUSTER_STATES,
            max_future: MAX_FUTURE,
            prune_interval: PRUNE_INTERVAL,
        }
    }
}

/// What to send back on the reply socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// The answer to a report (ACK or NAK) or to a `reports` request (`replies`,
    /// or one NAK refusing it whole).
    Reply(Reply),
    /// The answer to a snapshot request: a page or a NAK.
    Snapshot(SnapshotReply),
    /// The answer to a fail2ban-zmq-tools request: the message without its token
    /// (accepted), or [`LEGACY_NAK`].
    Legacy(String),
}

impl Response {
    /// The reply frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Reply(r) => r.encode(),
            Response::Snapshot(s) => s.encode(),
            Response::Legacy(text) => text.clone().into_bytes(),
        }
    }

    /// This reply as a `busy` refusal, for a request whose effects were rolled
    /// back (its batch could not be committed): an ACK or a snapshot page becomes a
    /// `busy` NAK, every ACK of a `replies` too, a legacy echo the bare `NAK`; a
    /// refusal stays as it is.
    pub fn refused_busy(self) -> Response {
        match self {
            Response::Reply(r) => Response::Reply(reply_busy(r)),
            Response::Snapshot(SnapshotReply::Page(_)) => Response::Snapshot(SnapshotReply::nak(
                NakReason::Busy,
                "the publisher cannot read its ledger now; ask again later",
            )),
            Response::Legacy(text) if text != LEGACY_NAK => Response::Legacy(LEGACY_NAK.to_owned()),
            other => other,
        }
    }

    /// Whether this refuses the request (a `replies` does not, whatever its
    /// answers).
    pub fn is_refusal(&self) -> bool {
        match self {
            Response::Reply(r) => matches!(r, Reply::Nak(_)),
            Response::Snapshot(s) => matches!(s, SnapshotReply::Nak(_)),
            Response::Legacy(text) => text == LEGACY_NAK,
        }
    }
}

/// `reply` with its ACKs (its own, or those of a `replies`) turned into `busy`
/// NAKs: the events were not recorded after all.
fn reply_busy(reply: Reply) -> Reply {
    match reply {
        Reply::Ack(a) => Reply::Nak(Nak::new(
            Some(a.id),
            NakReason::Busy,
            "the publisher cannot record the event now; send it again later",
        )),
        Reply::Replies(answers) => Reply::Replies(answers.into_iter().map(reply_busy).collect()),
        nak @ Reply::Nak(_) => nak,
    }
}

/// What to do with one request: the reply to send (always exactly one), how to
/// authenticate it, and the events to broadcast, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Response,
    /// The reply MAC or signature to send after the reply (see
    /// [`Trust::reply_frames`]); it covers the reply as finally sent, so it is made
    /// only then.
    pub seal: Seal,
    /// The events to broadcast, in the order of the answers they belong to (and so
    /// in sequence order, but for a rebroadcast): at most one for a report or a
    /// legacy request, at most one per event of a `reports` request.
    pub broadcasts: Vec<ToBroadcast>,
}

/// One event to broadcast, and which answer of its request's reply it belongs to:
/// when it cannot be queued, that answer is what [`Core::broadcast_failed`] turns
/// into a `busy` NAK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToBroadcast {
    /// The index of the event's answer in a [`Reply::Replies`]; 0 for a request
    /// answered with one ACK (a report, a legacy request).
    pub answer: usize,
    pub broadcast: Broadcast,
    /// The event as an old subscriber reads it, for the legacy PUB socket (see
    /// [`legacy::broadcast_text`]); `None` when the event cannot be said in the old
    /// format (IPv6).
    pub legacy: Option<String>,
}

impl Outcome {
    fn reply(reply: Reply) -> Self {
        Outcome {
            reply: Response::Reply(reply),
            seal: Seal::None,
            broadcasts: Vec::new(),
        }
    }

    fn legacy_nak() -> Self {
        Outcome {
            reply: Response::Legacy(LEGACY_NAK.to_owned()),
            seal: Seal::None,
            broadcasts: Vec::new(),
        }
    }

    fn sealed(mut self, seal: Seal) -> Self {
        self.seal = seal;
        self
    }
}

/// One event decided under the rules of a report: its answer (an ACK or a NAK)
/// and its broadcast, if it has one (then `answer` is 0).
#[derive(Debug)]
struct Decided {
    answer: Reply,
    broadcast: Option<ToBroadcast>,
}

impl From<Decided> for Outcome {
    fn from(d: Decided) -> Self {
        Outcome {
            reply: Response::Reply(d.answer),
            seal: Seal::None,
            broadcasts: d.broadcast.into_iter().collect(),
        }
    }
}

/// Why an address may never be banned cluster-wide, if it may not: the reserved
/// ranges no real attacker can be reached from, and which banning everywhere would
/// break every node (loopback, unspecified, multicast, link-local, limited
/// broadcast). Expects a canonical address (IPv4-mapped IPv6 already converted).
pub fn reserved(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => reserved_v4(v4),
        IpAddr::V6(v6) => reserved_v6(v6),
    }
}

fn reserved_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let first = ip.octets()[0];
    if first == 0 {
        Some("unspecified (0.0.0.0/8)")
    } else if ip.is_loopback() {
        Some("loopback (127.0.0.0/8)")
    } else if ip.is_link_local() {
        Some("link-local (169.254.0.0/16)")
    } else if ip.is_multicast() {
        Some("multicast (224.0.0.0/4)")
    } else if ip.is_broadcast() {
        Some("broadcast (255.255.255.255)")
    } else {
        None
    }
}

fn reserved_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified (::)")
    } else if ip.is_loopback() {
        Some("loopback (::1)")
    } else if ip.is_multicast() {
        Some("multicast (ff00::/8)")
    } else if ip.segments()[0] & 0xffc0 == 0xfe80 {
        Some("link-local (fe80::/10)")
    } else {
        None
    }
}

/// The publisher's state machine: one per publisher process, over its ledger.
pub struct Core {
    ledger: Ledger,
    ids: RecentIds,
    state: ClusterState,
    max_future_ms: u64,
    ban_time_ms: u64,
    limits: Limits,
    legacy: Option<LegacyPeer>,
    /// Whether broadcasts carry their text for old subscribers
    /// ([`ToBroadcast::legacy`]): only worth making when there is a legacy PUB
    /// socket to send it to.
    legacy_broadcast: bool,
    rejects: Throttle,
    trust: Trust,
    guard: Guard,
    /// When the guard's quarantines and the nonce memory are next looked at.
    next_tick_ms: u64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("ledger", &self.ledger)
            .field("recent_ids", &self.ids.len())
            .field("cluster_states", &self.state.len())
            .field("legacy", &self.legacy.is_some())
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A random (version 4) event id for an event that arrived without one.
fn random_id() -> Result<EventId, String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(EventId::from_u128(u128::from_be_bytes(b)))
}

/// Counts a refusal and logs it, `rejected reason=<code> peer=<address>
/// detail="..."`, unless `throttle` says too many of that reason were logged in the
/// last second (see [`crate::throttle`]).
fn rejected(
    throttle: &mut Throttle,
    now_ms: u64,
    reason: &'static str,
    peer: &str,
    detail: &str,
    id: Option<EventId>,
) {
    let (log, summary) = throttle.admit(reason, now_ms);
    if let Some(s) = summary {
        s.log();
    }
    if !log {
        return;
    }
    match id {
        Some(id) => tracing::warn!(%reason, %peer, detail, %id, "rejected"),
        None => tracing::warn!(%reason, %peer, detail, "rejected"),
    }
}

/// What a refused legacy message is logged with. The values it quotes come from
/// the network and are cut to [`MAX_DETAIL_LEN`]. When this publisher has no token
/// and a 5-field message has an invalid host, the first field is not shown: it is
/// likely an old monitor's token.
fn legacy_detail(err: &LegacyError, bytes: &[u8], token: bool) -> String {
    let five = bytes.iter().filter(|b| **b == b'|').count() == 4;
    let mut detail = match err {
        LegacyError::Host(_) if five && !token => "invalid host name in the first of 5 fields \
             (not shown: it may be a token; is legacy_token set on the monitor but not here?)"
            .to_owned(),
        other => other.to_string(),
    };
    if detail.len() > MAX_DETAIL_LEN {
        let mut cut = MAX_DETAIL_LEN;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
    }
    detail
}

/// The recent event ids and the cluster state, as of `now_ms`, from what `ledger`
/// kept.
fn rebuild(
    ledger: &Ledger,
    ban_time_ms: u64,
    limits: &Limits,
    now_ms: u64,
) -> Result<(RecentIds, ClusterState), LedgerError> {
    let mut ids = RecentIds::new(limits.recent_ids);
    let mut state = ClusterState::new(limits.cluster_states);
    ledger.for_each(|r| {
        // The previous process may have crashed between committing this row and
        // broadcasting it.
        ids.insert_unsent(r.event.id, Some(r.seq));
        let (s, until_ms) = match r.event.action {
            Action::Ban => (
                BanState::Banned,
                r.expires_ms
                    .unwrap_or_else(|| r.accepted_ms.saturating_add(ban_time_ms)),
            ),
            Action::Unban => (
                BanState::Unbanned,
                r.accepted_ms.saturating_add(ban_time_ms),
            ),
        };
        state.set(&r.event.jail, r.event.ip, s, until_ms, now_ms);
    })?;
    state.prune(now_ms);
    Ok((ids, state))
}

impl Core {
    /// A core over `ledger`, that considers an address banned for `ban_time` after
    /// the ban was accepted. The recent event ids and the cluster state are rebuilt
    /// from what the ledger kept, as of `now_ms`, so duplicate and state
    /// deduplication survive a restart: a ban kept in the ledger holds until its
    /// row's `expires_ms` (the `ban_time` it was accepted under), as snapshots say;
    /// an unban is remembered for the current `ban_time`. Legacy requests are
    /// refused until [`Core::with_legacy`]. It starts with [`Trust::open`] (no
    /// credentials, reports without authentication accepted, nothing signed) and
    /// [`GuardConfig::off`]: [`Core::with_trust`] and [`Core::with_guard`] set the
    /// configured ones, as [`crate::bind`] does.
    pub fn new(
        ledger: Ledger,
        ban_time: Duration,
        limits: Limits,
        now_ms: u64,
    ) -> Result<Self, LedgerError> {
        let ban_time_ms = millis(ban_time);
        let (ids, state) = rebuild(&ledger, ban_time_ms, &limits, now_ms)?;
        Ok(Core {
            ledger,
            ids,
            state,
            max_future_ms: millis(limits.max_future),
            ban_time_ms,
            limits,
            legacy: None,
            legacy_broadcast: true,
            rejects: Throttle::for_lines("rejected"),
            trust: Trust::open(),
            guard: Guard::new(GuardConfig::off()),
            next_tick_ms: 0,
        })
    }

    /// Checks reports' credentials and signs with `trust`'s key.
    pub fn with_trust(mut self, trust: Trust) -> Self {
        self.trust = trust;
        self
    }

    /// Applies `guard`'s allowlist, rate limits and circuit breaker.
    pub fn with_guard(mut self, guard: Guard) -> Self {
        self.guard = guard;
        self
    }

    /// Applies a reloaded configuration (SIGHUP): the monitors' credentials, the
    /// replay window and `allow_unauthenticated` ([`Trust::reconfigure`]; the
    /// signing key stays), and the guard's settings ([`Guard::reconfigure`]; the
    /// nodes' counters stay).
    pub fn reconfigure(&mut self, trust: &f2b_common::config::TrustConfig, guard: GuardConfig) {
        self.trust.reconfigure(trust);
        self.guard.reconfigure(guard);
    }

    /// The credentials and the signing key, to make the frames of replies and
    /// broadcasts.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// The allowlist, rate limits and circuit breaker: for tests and metrics.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// Accepts fail2ban-zmq-tools requests (`Some`), with the token they must carry
    /// if it has one; refuses them (`None`).
    pub fn with_legacy(mut self, legacy: Option<LegacyPeer>) -> Self {
        self.legacy = legacy;
        self
    }

    /// Whether broadcasts carry their text for old subscribers
    /// ([`ToBroadcast::legacy`]; they do unless told otherwise): the server says
    /// `false` when it has no legacy PUB socket, and the text is not made.
    pub fn with_legacy_broadcast(mut self, on: bool) -> Self {
        self.legacy_broadcast = on;
        self
    }

    /// The text of `event` for old subscribers, when they are sent broadcasts.
    fn legacy_text(&self, event: &Event, wire: Option<&str>) -> Option<String> {
        if self.legacy_broadcast {
            legacy::broadcast_text(event, wire)
        } else {
            None
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.ledger.epoch()
    }

    /// The last sequence number broadcast in this epoch (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.ledger.last_seq()
    }

    /// The ledger, for its path, counts and pruning.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Prunes the ledger at `now_ms` (see [`Ledger::prune`]), at most `batch` rows.
    pub fn prune(
        &mut self,
        now_ms: u64,
        batch: usize,
    ) -> Result<crate::ledger::Pruned, LedgerError> {
        self.state.prune(now_ms);
        self.ledger.prune(now_ms, self.ban_time_ms, batch)
    }

    /// Opens a batch: the events accepted until [`Core::commit_batch`] are
    /// committed together by it (see [`Ledger::begin_batch`]). Their outcomes must
    /// not be sent before it succeeded.
    pub fn begin_batch(&mut self) -> Result<(), LedgerError> {
        self.ledger.begin_batch()
    }

    /// Commits the open batch. On failure nothing of it happened (an append that
    /// failed half-way, or SQLite on an error, rolled it back and the appends
    /// after that were refused; or the commit failed): the ledger is
    /// rolled back, the memories are rebuilt from it as of `now_ms`, and every
    /// outcome of the batch must be sent as [`Response::refused_busy`] without its
    /// broadcasts (`broadcast`: they went out already; then their sequence numbers
    /// are not used again, see [`Ledger::commit_batch`]).
    pub fn commit_batch(&mut self, now_ms: u64, broadcast: bool) -> Result<(), LedgerError> {
        let Err(err) = self.ledger.commit_batch(broadcast) else {
            return Ok(());
        };
        match rebuild(&self.ledger, self.ban_time_ms, &self.limits, now_ms) {
            Ok((ids, state)) => (self.ids, self.state) = (ids, state),
            Err(e) => {
                // Forgetting only weakens deduplication.
                tracing::error!(error = %f2b_common::daemon::error_chain(&e), "ledger read failed; the publisher's memories start empty");
                self.ids = RecentIds::new(self.limits.recent_ids);
                self.state = ClusterState::new(self.limits.cluster_states);
            }
        }
        Err(err)
    }

    /// Marks the ledger as served from; see [`Ledger::start_serving`].
    pub fn start_serving(&mut self) -> Result<u64, LedgerError> {
        self.ledger.start_serving()
    }

    /// Clears the mark of [`Core::start_serving`]: a clean stop.
    pub fn stop_serving(&mut self) -> Result<(), LedgerError> {
        self.ledger.stop_serving()
    }

    /// The reply to send instead of `reply` when the broadcast of its answer
    /// `answer` ([`ToBroadcast::answer`]) could not be queued on the PUB socket. The
    /// event is durable but was not broadcast: a native ACK (the reply, or that
    /// answer of a `replies`) becomes a `busy` NAK, so the monitor sends the event
    /// again, and that resend (a duplicate) broadcasts the ledger's row again with
    /// its seq. A legacy echo is left as it is: an old monitor never resends with
    /// the same id.
    pub fn broadcast_failed(&mut self, reply: Response, answer: usize) -> Response {
        match reply {
            Response::Reply(Reply::Replies(mut answers)) => {
                if let Some(a) = answers.get_mut(answer) {
                    let one = std::mem::replace(a, Reply::Replies(Vec::new()));
                    *a = self.unsent(one);
                }
                Response::Reply(Reply::Replies(answers))
            }
            Response::Reply(one) => Response::Reply(self.unsent(one)),
            other => other,
        }
    }

    /// An ACK whose event was not broadcast, as a `busy` NAK; the event is marked
    /// for a rebroadcast on its resend.
    fn unsent(&mut self, reply: Reply) -> Reply {
        match reply {
            Reply::Ack(a) => {
                self.ids.set_unsent(&a.id, true);
                Reply::Nak(Nak::new(
                    Some(a.id),
                    NakReason::Busy,
                    "recorded but not broadcast; send it again",
                ))
            }
            other => other,
        }
    }

    /// How many event ids and (jail, address) states are held: for tests and
    /// metrics.
    pub fn memory_len(&self) -> (usize, usize) {
        (self.ids.len(), self.state.len())
    }

    /// The heartbeat to broadcast now.
    pub fn heartbeat(&self, interval: Duration) -> Broadcast {
        Broadcast::Heartbeat(Heartbeat {
            seq: self.last_seq(),
            epoch: self.epoch(),
            interval_ms: millis(interval),
        })
    }

    /// Handles one request: the message's `frames` as received, the sender's
    /// address (for logs and the ledger; later for rate limits and authentication)
    /// and the current time in milliseconds since the Unix epoch. Never panics,
    /// whatever the bytes.
    pub fn handle<F: AsRef<[u8]>>(&mut self, frames: &[F], peer: &str, now_ms: u64) -> Outcome {
        self.rejects.take_last();
        if let Some(first) = frames.first().map(AsRef::as_ref) {
            // An empty or blank frame is no fail2ban-zmq-tools message (that has at
            // least `h|j|a|i`): it gets the native `malformed` NAK.
            let blank = first.iter().all(u8::is_ascii_whitespace);
            if !blank && f2b_proto::legacy::is_legacy(first) {
                return self.legacy(frames.len(), first, peer, now_ms);
            }
        }
        let outcome = self.decide(frames, peer, now_ms);
        let mut log_nak = |nak: &Nak| {
            let reason = nak.reason.code();
            rejected(&mut self.rejects, now_ms, reason, peer, &nak.detail, nak.id);
        };
        match &outcome.reply {
            Response::Reply(Reply::Nak(nak)) | Response::Snapshot(SnapshotReply::Nak(nak)) => {
                log_nak(nak);
            }
            Response::Reply(Reply::Replies(answers)) => {
                for answer in answers {
                    if let Reply::Nak(nak) = answer {
                        log_nak(nak);
                    }
                }
                // The request itself was not refused: its answers are counted
                // one by one.
                self.rejects.take_last();
            }
            _ => {}
        }
        outcome
    }

    /// Logs the summaries of `rejected` lines suppressed in windows that are over
    /// at `now_ms`; the serving loop calls it now and then, so that the end of a
    /// flood is summed up without waiting for the next refusal.
    /// It also ends the quarantines that are over (at most once a second) and
    /// forgets the nonces that left the replay window.
    pub fn flush_log(&mut self, now_ms: u64) {
        for s in self.rejects.flush(now_ms) {
            s.log();
        }
        if now_ms >= self.next_tick_ms || now_ms.saturating_add(1000) < self.next_tick_ms {
            self.guard.tick(now_ms);
            self.trust.prune(now_ms);
            self.next_tick_ms = now_ms.saturating_add(1000);
        }
    }

    /// The reason the last request handled was refused for, if it was (a NAK
    /// code, `legacy_disabled` or `legacy_invalid`), and forgets it: the server
    /// counts each refusal in the metrics by it. `None` after a `reports` request
    /// answered with `replies`: the server counts its answers one by one.
    pub fn take_refusal(&mut self) -> Option<&'static str> {
        self.rejects.take_last()
    }

    /// The refusals counted per reason (NAK codes, `legacy_disabled`,
    /// `legacy_invalid`) since the start, logged or not: for tests and metrics.
    pub fn rejected_counts(&self) -> Vec<(&'static str, crate::throttle::Counts)> {
        self.rejects.counts()
    }

    fn decide<F: AsRef<[u8]>>(&mut self, frames: &[F], peer: &str, now_ms: u64) -> Outcome {
        // The first frame is the request; a report's (or a reports request's) second
        // is its authentication (see [`Trust::check`]). Frames 3..=MAX_FRAMES are
        // reserved and ignored; more than that is refused.
        let Some(first) = frames.first().map(AsRef::as_ref) else {
            return nak(None, NakReason::Malformed, "empty message");
        };
        if frames.len() > MAX_FRAMES {
            return nak(
                Request::peek_event_id(first),
                NakReason::Malformed,
                format!("more than {MAX_FRAMES} message parts"),
            );
        }
        let request = match Request::decode(first) {
            Ok(r) => r,
            Err(err) => return Outcome::reply(Reply::Nak(Nak::for_error(first, &err))),
        };
        match request {
            Request::Report(event) => {
                let auth = frames.get(1).map(AsRef::as_ref);
                match self.trust.check(first, auth, &event.node, now_ms) {
                    Ok(checked) => {
                        Outcome::from(self.report(event, peer, now_ms, None, checked.reporter))
                            .sealed(checked.seal)
                    }
                    Err(refused) => {
                        nak(Some(event.id), refused.reason, refused.detail).sealed(refused.seal)
                    }
                }
            }
            Request::Reports(events) => {
                // Decoding guarantees 2 to MAX_REPORT_EVENTS events of one node.
                let Some(node) = events.first().map(|e| e.node.clone()) else {
                    return nak(
                        None,
                        NakReason::Malformed,
                        "a reports request without events",
                    );
                };
                // Checked once for the request: a refusal refuses it whole.
                let auth = frames.get(1).map(AsRef::as_ref);
                match self.trust.check(first, auth, &node, now_ms) {
                    Ok(checked) => self
                        .reports(events, peer, now_ms, &checked.reporter)
                        .sealed(checked.seal),
                    Err(refused) => nak(None, refused.reason, refused.detail).sealed(refused.seal),
                }
            }
            Request::Snapshot(req) => {
                let seal = if self.trust.signs() {
                    Seal::Snapshot {
                        request: first.to_vec(),
                    }
                } else {
                    Seal::None
                };
                self.snapshot(&req, peer, now_ms).sealed(seal)
            }
            // A request type f2b-proto knows but this publisher does not serve.
            #[allow(unreachable_patterns)]
            _ => nak(
                Request::peek_event_id(first),
                NakReason::UnknownType,
                "request type not served by this publisher",
            ),
        }
    }

    /// A fail2ban-zmq-tools request (one frame of text): answered as the old
    /// publisher did, with the message without its token or `NAK`; accepted ones
    /// become native events under the same rules as a report.
    fn legacy(&mut self, parts: usize, bytes: &[u8], peer: &str, now_ms: u64) -> Outcome {
        let Some(config) = &self.legacy else {
            rejected(
                &mut self.rejects,
                now_ms,
                "legacy_disabled",
                peer,
                "not JSON: a fail2ban-zmq-tools request, and [publisher] legacy is off",
                None,
            );
            return Outcome::legacy_nak();
        };
        if parts != 1 {
            let detail = format!("{parts} message parts (a legacy request has 1)");
            rejected(
                &mut self.rejects,
                now_ms,
                "legacy_invalid",
                peer,
                &detail,
                None,
            );
            return Outcome::legacy_nak();
        }
        let token = config.token.as_ref().map(|t| t.expose());
        let msg = match f2b_proto::legacy::parse(bytes, token) {
            Ok(m) => m,
            Err(err) => {
                let detail = legacy_detail(&err, bytes, token.is_some());
                rejected(
                    &mut self.rejects,
                    now_ms,
                    "legacy_invalid",
                    peer,
                    &detail,
                    None,
                );
                return Outcome::legacy_nak();
            }
        };
        let id = match random_id() {
            Ok(id) => id,
            Err(e) => {
                let detail = format!("cannot draw an event id: {e}");
                rejected(
                    &mut self.rejects,
                    now_ms,
                    NakReason::Busy.code(),
                    peer,
                    &detail,
                    None,
                );
                return Outcome::legacy_nak();
            }
        };
        let event = match legacy::to_event(&msg, id, now_ms) {
            Ok(e) => e,
            Err(err) => {
                rejected(
                    &mut self.rejects,
                    now_ms,
                    err.nak_reason().code(),
                    peer,
                    &err.to_string(),
                    None,
                );
                return Outcome::legacy_nak();
            }
        };
        let decided = self.report(event, peer, now_ms, Some(&msg.wire), Reporter::Legacy);
        match decided.answer {
            Reply::Ack(_) => Outcome {
                reply: Response::Legacy(msg.wire),
                seal: Seal::None,
                broadcasts: decided.broadcast.into_iter().collect(),
            },
            Reply::Nak(nak) => {
                rejected(
                    &mut self.rejects,
                    now_ms,
                    nak.reason.code(),
                    peer,
                    &nak.detail,
                    nak.id,
                );
                Outcome::legacy_nak()
            }
            Reply::Replies(_) => Outcome::legacy_nak(),
        }
    }

    /// The events of a `reports` request (authenticated as `reporter`), decided in
    /// order, each as [`Core::report`] decides a report, and answered with
    /// `replies`. After the first event refused with a transient reason, the later
    /// ones are refused with that reason without being decided (neither recorded
    /// nor counted by the guard): the monitor sends them again in their order.
    fn reports(
        &mut self,
        events: Vec<Event>,
        peer: &str,
        now_ms: u64,
        reporter: &Reporter,
    ) -> Outcome {
        let mut answers = Vec::with_capacity(events.len());
        let mut broadcasts = Vec::new();
        let mut stopped: Option<(NakReason, EventId)> = None;
        for event in events {
            if let Some((reason, first)) = stopped {
                answers.push(Reply::Nak(Nak::new(
                    Some(event.id),
                    reason,
                    format!(
                        "not decided: an earlier event of this request ({first}) was refused as \
                         {reason}; send this one again after it"
                    ),
                )));
                continue;
            }
            let index = answers.len();
            let id = event.id;
            let decided = self.report(event, peer, now_ms, None, reporter.clone());
            if let Reply::Nak(n) = &decided.answer {
                if n.reason.is_transient() {
                    stopped = Some((n.reason, id));
                }
            }
            answers.push(decided.answer);
            broadcasts.extend(
                decided
                    .broadcast
                    .map(|b| ToBroadcast { answer: index, ..b }),
            );
        }
        Outcome {
            reply: Response::Reply(Reply::Replies(answers)),
            seal: Seal::None,
            broadcasts,
        }
    }

    /// A report (authenticated as `reporter`): the rules, then (if it changes the
    /// cluster's state) the ledger, then the broadcast. `wire` is the legacy
    /// message it came from, if it did.
    fn report(
        &mut self,
        event: Event,
        peer: &str,
        now_ms: u64,
        wire: Option<&str>,
        reporter: Reporter,
    ) -> Decided {
        let id = event.id;
        let pinned = matches!(&reporter, Reporter::Credential(_));
        if let Err(r) = self.guard.admit(&event.node, pinned, now_ms) {
            return refuse(id, r.reason, r.detail);
        }
        if let Some(range) = reserved(event.ip) {
            return refuse(
                id,
                NakReason::Forbidden,
                format!("{} is {range} and is never banned cluster-wide", event.ip),
            );
        }
        if let Some(net) = self.guard.forbidden(event.ip) {
            return refuse(
                id,
                NakReason::Forbidden,
                format!(
                    "{} is in [publisher] ignore_ip ({net}) and is never banned cluster-wide",
                    event.ip
                ),
            );
        }
        let limit = now_ms.saturating_add(self.max_future_ms);
        if event.time_ms > limit {
            return refuse(
                id,
                NakReason::InvalidTime,
                format!(
                    "time_ms {} is {} ms ahead of the publisher's clock (at most {} allowed)",
                    event.time_ms,
                    event.time_ms - now_ms,
                    self.max_future_ms
                ),
            );
        }
        if let Some(seq) = self.ids.get(&id) {
            tracing::info!(%id, jail = %event.jail, ip = %event.ip, node = %event.node, seq, reported_by = %reporter, "duplicate");
            return match seq {
                Some(seq) if self.ids.is_unsent(&id) => self.rebroadcast(id, seq, now_ms),
                _ => acked(id, seq, AckStatus::Duplicate),
            };
        }
        let wanted = match event.action {
            Action::Ban => BanState::Banned,
            Action::Unban => BanState::Unbanned,
        };
        // An unban of an unknown (jail, address) is broadcast: the publisher may have
        // forgotten, and an unban is harmless where nothing is banned.
        if self.state.get(&event.jail, event.ip, now_ms) == Some(wanted) {
            tracing::debug!(%id, jail = %event.jail, ip = %event.ip, node = %event.node, action = %event.action, reported_by = %reporter, "unchanged");
            self.ids.insert(id, None);
            return acked(id, None, AckStatus::Unchanged);
        }
        let Some(seq) = self
            .last_seq()
            .checked_add(1)
            .filter(|s| *s <= MAX_SAFE_INTEGER)
        else {
            return refuse(
                id,
                NakReason::Busy,
                "sequence numbers exhausted; move the ledger away and restart the publisher",
            );
        };
        let until_ms = now_ms.saturating_add(self.ban_time_ms);
        let record = Record {
            seq,
            event,
            accepted_ms: now_ms,
            expires_ms: (wanted == BanState::Banned).then_some(until_ms),
            legacy: wire.is_some(),
            peer: peer.to_owned(),
            reported_by: reporter,
        };
        // Recorded before it is broadcast, durable before it is ACKed.
        if let Err(err) = self.ledger.append(&record) {
            tracing::error!(
                error = %f2b_common::daemon::error_chain(&err),
                %id,
                "ledger write failed; the report is refused as busy and will be resent"
            );
            return refuse(
                id,
                NakReason::Busy,
                "the publisher cannot record the event now; send it again later",
            );
        }
        let event = record.event;
        self.state
            .set(&event.jail, event.ip, wanted, until_ms, now_ms);
        self.ids.insert(id, Some(seq));
        tracing::info!(
            seq,
            jail = %event.jail,
            action = %event.action,
            ip = %event.ip,
            node = %event.node,
            %id,
            origin = %if wire.is_some() { "legacy" } else { "native" },
            reported_by = %record.reported_by,
            "broadcast"
        );
        Decided {
            answer: Reply::Ack(Ack {
                id,
                seq: Some(seq),
                status: AckStatus::Broadcast,
            }),
            broadcast: Some(ToBroadcast {
                answer: 0,
                legacy: self.legacy_text(&event, wire),
                broadcast: Broadcast::Event(Sequenced {
                    seq,
                    epoch: self.epoch(),
                    event,
                }),
            }),
        }
    }

    /// The answer to a duplicate of an event committed as `seq` that this process
    /// may not have broadcast (it was read from the ledger at start): the previous
    /// process may have crashed after the commit and before the broadcast, and then
    /// the monitor's resend is the only chance left to deliver it. The ledger's row
    /// is broadcast again with its original seq (subscribers deduplicate by id),
    /// once, and only while it is still the cluster's state: a row superseded by a
    /// later event of its (jail, address), or an expired ban, is not (that would
    /// undo the later event).
    fn rebroadcast(&mut self, id: EventId, seq: u64, now_ms: u64) -> Decided {
        let record = match self.ledger.current(seq, now_ms) {
            Ok(r) => r,
            Err(err) => {
                tracing::error!(
                    error = %f2b_common::daemon::error_chain(&err),
                    %id,
                    seq,
                    "ledger read failed; the duplicate is refused as busy and will be resent"
                );
                return refuse(
                    id,
                    NakReason::Busy,
                    "the publisher cannot read its ledger now; send it again later",
                );
            }
        };
        self.ids.set_unsent(&id, false);
        let Some(record) = record.filter(|r| r.event.id == id) else {
            return acked(id, Some(seq), AckStatus::Duplicate);
        };
        let event = record.event;
        tracing::info!(
            seq,
            jail = %event.jail,
            action = %event.action,
            ip = %event.ip,
            node = %event.node,
            %id,
            reported_by = %record.reported_by,
            "rebroadcast"
        );
        Decided {
            answer: Reply::Ack(Ack {
                id,
                seq: Some(seq),
                status: AckStatus::Duplicate,
            }),
            broadcast: Some(ToBroadcast {
                answer: 0,
                legacy: self.legacy_text(&event, None),
                broadcast: Broadcast::Event(Sequenced {
                    seq,
                    epoch: self.epoch(),
                    event,
                }),
            }),
        }
    }

    /// A snapshot page, from the ledger, consistent with the last broadcast.
    fn snapshot(&self, req: &SnapshotRequest, peer: &str, now_ms: u64) -> Outcome {
        let reply = match self
            .ledger
            .snapshot_page(&req.jails, req.cursor, now_ms, self.last_seq())
        {
            Ok(page) => {
                tracing::info!(
                    %peer,
                    jails = req.jails.len(),
                    cursor = req.cursor.unwrap_or(0),
                    bans = page.bans.len(),
                    next = page.next.unwrap_or(0),
                    seq = page.seq,
                    "snapshot"
                );
                SnapshotReply::Page(page)
            }
            Err(err) => {
                tracing::error!(error = %f2b_common::daemon::error_chain(&err), "ledger read failed");
                SnapshotReply::nak(
                    NakReason::Busy,
                    "the publisher cannot read its ledger now; ask again later",
                )
            }
        };
        Outcome {
            reply: Response::Snapshot(reply),
            seal: Seal::None,
            broadcasts: Vec::new(),
        }
    }
}

fn nak(id: Option<EventId>, reason: NakReason, detail: impl Into<String>) -> Outcome {
    Outcome::reply(Reply::Nak(Nak::new(id, reason, detail)))
}

/// An event refused.
fn refuse(id: EventId, reason: NakReason, detail: impl Into<String>) -> Decided {
    Decided {
        answer: Reply::Nak(Nak::new(Some(id), reason, detail)),
        broadcast: None,
    }
}

/// An event accepted and not broadcast.
fn acked(id: EventId, seq: Option<u64>, status: AckStatus) -> Decided {
    Decided {
        answer: Reply::Ack(Ack { id, seq, status }),
        broadcast: None,
    }
}

#[cfg(test)]
mod tests;
