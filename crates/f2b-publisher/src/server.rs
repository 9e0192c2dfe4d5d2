//! The ZeroMQ side: opens the ledger, binds the reply and PUB sockets (and the
//! legacy PUB socket when configured), then one blocking thread waits in `zmq::poll`
//! on the reply socket and the shutdown socket, with a timeout that ends when the
//! next heartbeat or ledger pruning is due, and hands every request to the [`Core`].
//!
//! # The reply socket and group commit
//!
//! The reply socket is a ROUTER, which REQ peers (monitors, old fail2ban-zmq-tools
//! monitors, subscribers asking for snapshots) cannot tell from a REP: each request
//! carries its envelope (the peer's routing id, then an empty delimiter frame), and
//! its reply goes back with that envelope. Unlike a REP it lets the loop take every
//! request already waiting (at most [`MAX_BATCH`]), decide them all in one ledger
//! transaction, broadcast their events, commit the transaction once (one disk sync
//! for all their events: a `reports` request's up to
//! [`MAX_REPORT_EVENTS`](f2b_proto::MAX_REPORT_EVENTS) as well), and only then
//! reply, in the order they arrived. The batch's events go out in sequence order,
//! packed into `events` messages ([`f2b_proto::pack_events`]), whichever requests
//! they came in. An ACK still means the event is durable; if the commit fails,
//! every ACK of the batch (a report's, each of a `replies`) is sent as a `busy` NAK,
//! and the monitors send those events again. The broadcast does not wait for the
//! sync: the sync is the slowest step on the path from one node's log to the
//! others' firewalls, and a subscriber loses nothing by getting an event early
//! (it deduplicates the resend by id). What it must never see is one sequence
//! number used for two events, and the ledger sees to that (its docs, "Broadcast
//! before the sync"). A message without the delimiter (not from a REQ-like peer) is
//! dropped, as a REP would.
//!
//! # Errors
//!
//! A socket error while handling one message (receiving a request or a part of
//! it, broadcasting, replying, a heartbeat) is logged (`socket error`, at most 10
//! lines per operation and second) and the loop goes on; only `ETERM` (the context
//! is being terminated) ends it. A request that was received is always answered: a
//! message whose later part could not be received is drained and answered
//! `malformed`, and an event whose broadcast failed is answered `busy` (its own
//! answer in a `replies`, the others as decided) so that its monitor resends it
//! (see [`Core::broadcast_failed`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use f2b_common::config::{PublisherConfig, TrustConfig};
use f2b_common::metrics::{Metrics, PublisherMetrics, Readiness, SocketLabel};
use f2b_common::sockets::{last_endpoint, new_socket, shutdown_socket};
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::{AckStatus, Broadcast, Epoch, Nak, NakReason, Reply, SnapshotReply, MAX_FRAMES};

use crate::core::{Core, Limits, Outcome, Response, ToBroadcast};
use crate::guard::{Guard, GuardConfig};
use crate::ledger::{Ledger, PRUNE_BATCH};
use crate::throttle::Throttle;
use crate::trust::{Seal, Trust};
use crate::PublisherError;

/// How long the PUB sockets may keep delivering queued broadcasts after shutdown.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// The broadcast messages the PUB socket queues for one subscriber, at most (its
/// send high-water mark); past it, that subscriber misses messages, sees the gap
/// in the sequence numbers and catches up from a snapshot. libzmq counts
/// messages, not bytes, and a broadcast packs up to
/// [`f2b_proto::PACKED_MESSAGE_SIZE`] (4 KiB) of events: 2,500 of them hold at
/// most about 10 MiB of the publisher's memory per stalled subscriber (the
/// 10,000 of the other sockets would let one hold 40 MiB), and still about 60,000
/// events of a burst (2,500 lone events at worst) for a subscriber that is only
/// slow for a moment.
pub const BROADCAST_HWM: i32 = 2_500;

/// The PUB socket of the broadcasts: the project's options, and
/// [`BROADCAST_HWM`].
fn broadcast_socket(ctx: &zmq::Context) -> zmq::Result<zmq::Socket> {
    let publ = new_socket(ctx, zmq::PUB)?;
    publ.set_sndhwm(BROADCAST_HWM)?;
    Ok(publ)
}

/// The most requests decided and committed together.
pub const MAX_BATCH: usize = 64;

// A batch never broadcasts, before its commit, more than a start after a crash
// skips: each request carries at most MAX_REPORT_EVENTS events.
const _: () = assert!(
    (MAX_BATCH * f2b_proto::MAX_REPORT_EVENTS) as u64 <= crate::ledger::EARLY_BROADCAST_MAX
);

/// The most envelope frames (routing ids) a request may carry before its empty
/// delimiter: one from a direct peer, one more per proxy on the way.
const MAX_ENVELOPE: usize = 8;

/// The most often the gauges that cost a ledger query or a walk over the nodes
/// (`ledger_active_bans`, `quarantined_nodes`) are brought up to date.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// New settings for a running publisher: what a configuration reload (SIGHUP)
/// may change without a restart (see [`crate::reload`]).
#[derive(Debug, Clone)]
pub struct Reload {
    /// `[trust]`: the monitors' credentials, `max_clock_skew`,
    /// `allow_unauthenticated` (the signing key is not taken).
    pub trust: TrustConfig,
    /// `[publisher]` ignore_ip, rate limit and circuit breaker settings.
    pub guard: GuardConfig,
}

/// Hands [`Reload`]s to a serving [`Bound`] and wakes its thread (see
/// [`Bound::reloader`]).
pub struct Reloader {
    tx: mpsc::Sender<Reload>,
    wake: zmq::Socket,
    _ctx: zmq::Context,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Sends `reload` to the serving thread, which applies it between two
    /// requests and logs `configuration reloaded`. `false`: it is no longer
    /// serving. Never blocks.
    pub fn send(&self, reload: Reload) -> bool {
        if self.tx.send(reload).is_err() {
            return false;
        }
        // A wake already queued (high-water mark 1) wakes it as well.
        let _ = self.wake.send("", zmq::DONTWAIT);
        true
    }
}

/// The serving thread's side of a [`Reloader`].
struct Reloads {
    rx: mpsc::Receiver<Reload>,
    wake: zmq::Socket,
}

static MONITOR_ID: AtomicU64 = AtomicU64::new(0);

/// Watches `socket`'s connections (ZeroMQ socket monitor: accepted and
/// disconnected), for `f2b_publisher_connected_peers{socket=label}`. Set up before
/// the socket binds, so that no connection is missed.
fn watch_peers(
    ctx: &zmq::Context,
    socket: &zmq::Socket,
    label: &'static str,
) -> Result<(&'static str, zmq::Socket), PublisherError> {
    let endpoint = format!(
        "inproc://f2b-publisher-peers-{}-{}",
        std::process::id(),
        MONITOR_ID.fetch_add(1, Ordering::Relaxed)
    );
    let events = i32::from(zmq::SocketEvent::ACCEPTED.to_raw())
        | i32::from(zmq::SocketEvent::DISCONNECTED.to_raw());
    socket
        .monitor(&endpoint, events)
        .map_err(socket_err("monitor a socket's connections"))?;
    let reader = ctx
        .socket(zmq::PAIR)
        .map_err(socket_err("monitor a socket's connections"))?;
    reader
        .set_linger(0)
        .and_then(|()| reader.connect(&endpoint))
        .map_err(socket_err("monitor a socket's connections"))?;
    Ok((label, reader))
}

/// The publisher with both sockets bound, not yet serving. [`bind`] then
/// [`Bound::serve`] is what [`crate::run`] does; tests call them separately to learn
/// the real endpoints.
pub struct Bound {
    /// The reply socket, a ROUTER (see the module's documentation).
    router: zmq::Socket,
    publ: zmq::Socket,
    /// The PUB socket of fail2ban-zmq-tools subscribers, if configured.
    legacy_publ: Option<zmq::Socket>,
    reply_endpoint: String,
    broadcast_endpoint: String,
    legacy_broadcast_endpoint: Option<String>,
    heartbeat_interval: Duration,
    prune_interval: Duration,
    core: Core,
    /// Limits the `socket error` lines.
    errors: Throttle,
    metrics: PublisherMetrics,
    /// The socket monitors' readers, by `connected_peers` label.
    peer_monitors: Vec<(&'static str, zmq::Socket)>,
    reloads: Option<Reloads>,
    /// The breaker's trips already counted in `metrics.quarantines`.
    trips_counted: u64,
    /// When `ledger_active_bans` and `quarantined_nodes` were last updated, and
    /// whether the ledger changed since.
    gauges_at: Option<Instant>,
    gauges_stale: bool,
}

fn socket_err(what: &'static str) -> impl FnOnce(zmq::Error) -> PublisherError {
    move |source| PublisherError::Socket { what, source }
}

/// Checks `trust` ([`TrustConfig::require_publisher`]), opens the ledger in
/// `state_dir` (see [`Ledger::open_or_recover`]), prunes it, rebuilds the core from
/// it and logs `ledger path=.. epoch=.. seq=.. active=..`; then creates the
/// sockets, binds them and logs `listening on` with the real endpoints, and what
/// the trust configuration allows. It blocks (file I/O, possibly a long prune):
/// inside a runtime, call it on a blocking thread, as [`crate::run`] does.
pub fn bind_trusted(
    config: &PublisherConfig,
    trust: &TrustConfig,
) -> Result<Bound, PublisherError> {
    bind_with(config, trust, Limits::default())
}

/// [`bind_trusted`] with the core's memory limits given (tests use small ones).
pub fn bind_with(
    config: &PublisherConfig,
    trust: &TrustConfig,
    limits: Limits,
) -> Result<Bound, PublisherError> {
    trust.require_publisher()?;
    if trust.allow_unauthenticated {
        tracing::warn!(
            "trust.allow_unauthenticated is on: reports without an authentication frame are \
             accepted from anyone who can reach the reply socket, and may name any node"
        );
    }
    open_bound(config, Trust::new(trust), limits)
}

/// [`bind_trusted`] without credentials or a signing key: reports without
/// authentication are accepted and nothing is signed, as with only
/// `trust.allow_unauthenticated = true`. For other crates' tests that need a hub
/// but not its trust; the daemon never uses it.
pub fn bind(config: &PublisherConfig) -> Result<Bound, PublisherError> {
    open_bound(config, Trust::open(), Limits::default())
}

fn open_bound(
    config: &PublisherConfig,
    trust: Trust,
    limits: Limits,
) -> Result<Bound, PublisherError> {
    let mut ledger = Ledger::open_or_recover(&config.state_dir, SystemTime::now())?;
    let now = now_ms();
    let ban_time_ms = u64::try_from(config.ban_time.as_millis()).unwrap_or(u64::MAX);
    while ledger.prune(now, ban_time_ms, PRUNE_BATCH)?.more {}
    let prune_interval = limits.prune_interval;
    let mut core = Core::new(ledger, config.ban_time, limits, now)?
        .with_legacy(config.legacy.clone())
        .with_legacy_broadcast(config.legacy_broadcast_bind.is_some())
        .with_trust(trust)
        .with_guard(Guard::new(GuardConfig::new(config)));
    let skipped = core.start_serving()?;
    if skipped > 0 {
        tracing::warn!(
            skipped,
            seq = core.last_seq(),
            "the previous publisher did not stop cleanly: skipped {skipped} sequence numbers, \
             so that none it may have broadcast before a lost commit is used again; \
             subscribers see the gap and take a snapshot"
        );
    }
    tracing::info!(
        path = %core.ledger().path().display(),
        epoch = %core.epoch(),
        seq = core.last_seq(),
        active = core.ledger().active_bans(now)?,
        "ledger"
    );
    let epoch = core.epoch();
    let ctx = zmq::Context::new();
    let router = new_socket(&ctx, zmq::ROUTER).map_err(socket_err("create the reply socket"))?;
    let mut peer_monitors = vec![watch_peers(&ctx, &router, "reply")?];
    router
        .bind(config.reply_bind.as_str())
        .map_err(|error| PublisherError::Bind {
            key: "publisher.reply_bind",
            endpoint: config.reply_bind.to_string(),
            error,
            hint: bind_hint(error, "publisher.reply_bind"),
        })?;
    let publ = broadcast_socket(&ctx).map_err(socket_err("create the PUB socket"))?;
    peer_monitors.push(watch_peers(&ctx, &publ, "broadcast")?);
    publ.bind(config.broadcast_bind.as_str())
        .map_err(|error| PublisherError::Bind {
            key: "publisher.broadcast_bind",
            endpoint: config.broadcast_bind.to_string(),
            error,
            hint: bind_hint(error, "publisher.broadcast_bind"),
        })?;
    let legacy_publ = match &config.legacy_broadcast_bind {
        Some(endpoint) => {
            let s =
                new_socket(&ctx, zmq::PUB).map_err(socket_err("create the legacy PUB socket"))?;
            s.bind(endpoint.as_str())
                .map_err(|error| PublisherError::Bind {
                    key: "publisher.legacy_broadcast_bind",
                    endpoint: endpoint.to_string(),
                    error,
                    hint: bind_hint(error, "publisher.legacy_broadcast_bind"),
                })?;
            Some(s)
        }
        None => None,
    };
    let reply_endpoint = last_endpoint(&router);
    let broadcast_endpoint = last_endpoint(&publ);
    let legacy_broadcast_endpoint = legacy_publ.as_ref().map(last_endpoint);
    match &legacy_broadcast_endpoint {
        Some(legacy) => tracing::info!(
            reply = %reply_endpoint,
            broadcast = %broadcast_endpoint,
            legacy_broadcast = %legacy,
            %epoch,
            "listening on"
        ),
        None => tracing::info!(
            reply = %reply_endpoint,
            broadcast = %broadcast_endpoint,
            %epoch,
            "listening on"
        ),
    }
    let t = core.trust();
    match t.public_key() {
        Some(key) => tracing::info!(
            monitors = t.monitors(),
            public_key = %key,
            "trust: monitor credentials loaded; broadcasts and snapshots are signed"
        ),
        None => tracing::warn!(
            monitors = t.monitors(),
            "trust: no signing key (trust.signing_key_file): broadcasts and snapshots are not \
             signed, so subscribers cannot tell them from forgeries"
        ),
    }
    if let Some(legacy) = &config.legacy {
        tracing::info!(
            token = legacy.token.is_some(),
            "accepting fail2ban-zmq-tools requests on the reply socket"
        );
        tracing::warn!(
            "legacy reports (fail2ban-zmq-tools) are authenticated {}; they are not signed, and \
             are rate-limited by the host name they carry",
            if legacy.token.is_some() {
                "only by a plaintext token (publisher.legacy_token)"
            } else {
                "by nothing (no publisher.legacy_token)"
            }
        );
    }
    Ok(Bound {
        router,
        publ,
        legacy_publ,
        reply_endpoint,
        broadcast_endpoint,
        legacy_broadcast_endpoint,
        heartbeat_interval: config.heartbeat_interval,
        prune_interval,
        core,
        errors: Throttle::for_lines("socket error"),
        metrics: PublisherMetrics::new(&mut Metrics::new("f2b-publisher"), &Readiness::new()),
        peer_monitors,
        reloads: None,
        trips_counted: 0,
        gauges_at: None,
        gauges_stale: true,
    })
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("reply_endpoint", &self.reply_endpoint)
            .field("broadcast_endpoint", &self.broadcast_endpoint)
            .field("legacy_broadcast_endpoint", &self.legacy_broadcast_endpoint)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl Bound {
    /// The reply endpoint really bound (the port chosen for `*`).
    pub fn reply_endpoint(&self) -> &str {
        &self.reply_endpoint
    }

    /// The PUB endpoint really bound.
    pub fn broadcast_endpoint(&self) -> &str {
        &self.broadcast_endpoint
    }

    /// The legacy PUB endpoint really bound, if one is configured.
    pub fn legacy_broadcast_endpoint(&self) -> Option<&str> {
        self.legacy_broadcast_endpoint.as_deref()
    }

    /// The epoch (kept in the ledger across restarts).
    pub fn epoch(&self) -> Epoch {
        self.core.epoch()
    }

    /// The last sequence number broadcast (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.core.last_seq()
    }

    /// Records into `metrics` from now on (see `f2b_common::metrics`, the
    /// publisher's table): its readiness conditions `bound` and `ledger_open`
    /// hold from here (`ledger_open` stops holding while ledger commits fail), and
    /// the sequence number and active bans are set at once.
    pub fn with_metrics(mut self, metrics: PublisherMetrics) -> Bound {
        metrics.bound.set(true);
        metrics.ledger_open.set(true);
        metrics.sequence.set(gauge_value(self.core.last_seq()));
        self.metrics = metrics;
        self.gauges_stale = true;
        self.update_gauges(now_ms());
        self
    }

    /// A handle through which another task hands this publisher new settings
    /// while it serves (a configuration reload); replaces an earlier one.
    pub fn reloader(&mut self) -> Result<Reloader, PublisherError> {
        let ctx = zmq::Context::new();
        let name = format!(
            "inproc://f2b-publisher-reload-{}-{}",
            std::process::id(),
            MONITOR_ID.fetch_add(1, Ordering::Relaxed)
        );
        let what = "create the reload socket";
        let rx = ctx.socket(zmq::PAIR).map_err(socket_err(what))?;
        rx.set_linger(0)
            .and_then(|()| rx.bind(&name))
            .map_err(socket_err(what))?;
        let tx = ctx.socket(zmq::PAIR).map_err(socket_err(what))?;
        tx.set_linger(0)
            .and_then(|()| tx.set_sndhwm(1))
            .and_then(|()| tx.connect(&name))
            .map_err(socket_err(what))?;
        let (sender, receiver) = mpsc::channel();
        self.reloads = Some(Reloads {
            rx: receiver,
            wake: rx,
        });
        Ok(Reloader {
            tx: sender,
            wake: tx,
            _ctx: ctx,
        })
    }

    /// Serves until `shutdown` is cancelled, then lets the PUB socket deliver what
    /// is queued (at most [`SHUTDOWN_LINGER`]) and returns. Must be called inside a
    /// tokio runtime; the sockets are driven by one blocking thread.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), PublisherError> {
        // The waker lives in its own context: the sockets' context is then owned by
        // the serving thread alone, and terminating it there (which waits for the
        // PUB linger) cannot block on a socket held elsewhere.
        let waker_ctx = zmq::Context::new();
        let waker = shutdown_socket(&waker_ctx, shutdown)
            .map_err(socket_err("create the shutdown socket"))?;
        tokio::task::spawn_blocking(move || self.serve_blocking(waker))
            .await
            .map_err(|e| PublisherError::Thread(e.to_string()))?
    }

    fn serve_blocking(mut self, waker: zmq::Socket) -> Result<(), PublisherError> {
        let result = self.serve_loop(&waker);
        // Every batch is committed by now: a clean stop. (Unless the loop failed
        // on a fatal socket error with a batch open: the cleared mark is written
        // into that batch and thrown away with it, so the next start skips
        // numbers, as after a crash. Safe, if wasteful.)
        if let Err(e) = self.core.stop_serving() {
            tracing::warn!(error = %f2b_common::daemon::error_chain(&e), "cannot mark the ledger as cleanly stopped; the next start skips some sequence numbers");
        }
        // Let subscribers receive what was broadcast last. Dropping the sockets
        // closes them; the context's termination, when the last of them is dropped
        // here, waits for the PUB queue to drain or the linger to pass.
        let linger = i32::try_from(SHUTDOWN_LINGER.as_millis()).unwrap_or(i32::MAX);
        for publ in std::iter::once(&self.publ).chain(self.legacy_publ.as_ref()) {
            if let Err(e) = publ.set_linger(linger) {
                tracing::warn!(error = %e, "cannot set the PUB linger; queued broadcasts may be lost");
            }
        }
        drop(self);
        result
    }

    fn serve_loop(&mut self, waker: &zmq::Socket) -> Result<(), PublisherError> {
        let interval = self.heartbeat_interval;
        let mut last_sent = Instant::now();
        let mut next_prune = Instant::now() + self.prune_interval;
        loop {
            let mut due = (last_sent + interval).min(next_prune);
            if self.gauges_stale {
                if let Some(at) = self.gauges_at {
                    due = due.min(at + GAUGE_INTERVAL);
                }
            }
            let timeout = poll_timeout(due.saturating_duration_since(Instant::now()));
            // 0: requests, 1: shutdown, then the socket monitors, then reloads.
            let readable: Vec<bool> = {
                let mut items = vec![
                    self.router.as_poll_item(zmq::POLLIN),
                    waker.as_poll_item(zmq::POLLIN),
                ];
                items.extend(
                    self.peer_monitors
                        .iter()
                        .map(|(_, s)| s.as_poll_item(zmq::POLLIN)),
                );
                if let Some(r) = &self.reloads {
                    items.push(r.wake.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, timeout) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => return Err(socket_err("poll")(e)),
                }
                items.iter().map(|i| i.is_readable()).collect()
            };
            if readable[1] {
                tracing::debug!("shutdown requested");
                return Ok(());
            }
            let monitors = self.peer_monitors.len();
            for (i, r) in readable[2..2 + monitors].iter().enumerate() {
                if *r {
                    self.count_peers(i);
                }
            }
            if readable.get(2 + monitors) == Some(&true) {
                self.apply_reloads();
            }
            let now = now_ms();
            self.core.flush_log(now);
            for s in self.errors.flush(now) {
                s.log();
            }
            if readable[0] && self.serve_waiting()? {
                last_sent = Instant::now();
            }
            if Instant::now() >= last_sent + interval {
                let hb = self.core.heartbeat(interval);
                match self.send_broadcast(&hb) {
                    Ok(()) => {
                        self.metrics.heartbeats_sent.inc();
                    }
                    Err(e) => self.socket_error("broadcast a heartbeat", e)?,
                }
                last_sent = Instant::now();
            }
            if Instant::now() >= next_prune {
                // A full batch means more is left: go on after serving what waits.
                let more = self.prune();
                self.gauges_stale = true;
                next_prune = Instant::now()
                    + if more {
                        Duration::ZERO
                    } else {
                        self.prune_interval
                    };
            }
            self.update_gauges(now_ms());
        }
    }

    /// Reads what the socket monitor `i` reported: +1 peer per accepted
    /// connection, -1 per disconnection.
    fn count_peers(&mut self, i: usize) {
        let (label, reader) = &self.peer_monitors[i];
        let accepted = zmq::SocketEvent::ACCEPTED.to_raw();
        let disconnected = zmq::SocketEvent::DISCONNECTED.to_raw();
        // An event is two frames: 2 bytes of event number and 4 of value, then
        // the endpoint.
        while let Ok(frames) = reader.recv_multipart(zmq::DONTWAIT) {
            let Some(head) = frames.first().filter(|f| f.len() >= 2) else {
                continue;
            };
            let event = u16::from_ne_bytes([head[0], head[1]]);
            let peers = self
                .metrics
                .connected_peers
                .get_or_create(&SocketLabel { socket: label });
            if event == accepted {
                peers.inc();
            } else if event == disconnected && peers.get() > 0 {
                peers.dec();
            }
        }
    }

    /// Applies every [`Reload`] waiting (the last one wins).
    fn apply_reloads(&mut self) {
        let Some(r) = &self.reloads else {
            return;
        };
        while r.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
        let mut last = None;
        while let Ok(reload) = r.rx.try_recv() {
            last = Some(reload);
        }
        if let Some(reload) = last {
            self.core.reconfigure(&reload.trust, reload.guard);
            let t = self.core.trust();
            tracing::info!(
                monitors = t.monitors(),
                allow_unauthenticated = t.allows_unauthenticated(),
                "configuration reloaded"
            );
        }
    }

    /// Brings `ledger_active_bans` and `quarantined_nodes` up to date if they may
    /// be stale, at most once per [`GAUGE_INTERVAL`] (each costs a ledger count or
    /// a walk over the nodes); and counts the breaker's new trips at once.
    fn update_gauges(&mut self, now: u64) {
        let trips = self.core.guard().trips();
        if trips > self.trips_counted {
            self.metrics.quarantines.inc_by(trips - self.trips_counted);
            self.trips_counted = trips;
            self.gauges_stale = true;
            self.gauges_at = None;
        }
        let due = self
            .gauges_at
            .is_none_or(|at| at.elapsed() >= GAUGE_INTERVAL);
        if !due {
            return;
        }
        // Quarantines end with time alone: looked at every interval.
        let quarantined = self.core.guard().quarantined(now).len();
        self.metrics
            .quarantined_nodes
            .set(i64::try_from(quarantined).unwrap_or(i64::MAX));
        if self.gauges_stale {
            match self.core.ledger().active_bans(now) {
                Ok(n) => {
                    self.metrics.ledger_active_bans.set(gauge_value(n));
                }
                Err(e) => {
                    tracing::debug!(error = %f2b_common::daemon::error_chain(&e), "cannot count the active bans")
                }
            }
            self.gauges_stale = false;
        }
        self.gauges_at = Some(Instant::now());
    }

    /// Prunes one batch of the ledger; returns whether more is left. A failure is
    /// logged and retried at the next interval: the ledger only grows meanwhile.
    fn prune(&mut self) -> bool {
        let started = Instant::now();
        match self.core.prune(now_ms(), PRUNE_BATCH) {
            Ok(p) => {
                if p.deleted > 0 {
                    tracing::debug!(
                        deleted = p.deleted,
                        took_ms = started.elapsed().as_millis() as u64,
                        "ledger pruned"
                    );
                }
                p.more
            }
            Err(e) => {
                tracing::error!(error = %f2b_common::daemon::error_chain(&e), "ledger pruning failed");
                false
            }
        }
    }

    /// What a socket error during one message means: `ETERM` (the context is
    /// being terminated) ends the loop; anything else is logged, throttled, and the
    /// loop goes on.
    fn socket_error(&mut self, what: &'static str, e: zmq::Error) -> Result<(), PublisherError> {
        if is_fatal(e) {
            return Err(socket_err(what)(e));
        }
        let (log, summary) = self.errors.admit(what, now_ms());
        if let Some(s) = summary {
            s.log();
        }
        if log {
            tracing::error!(reason = %what, error = %e, "socket error");
        }
        Ok(())
    }

    /// Takes the requests waiting (at most [`MAX_BATCH`]), decides them in one
    /// ledger transaction, commits it, then broadcasts what the core says and
    /// answers each, in order. Returns whether something was broadcast. Fails only
    /// on `ETERM`.
    fn serve_waiting(&mut self) -> Result<bool, PublisherError> {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            match recv_request(&self.router) {
                Ok(Some(r)) => batch.push(r),
                Ok(None) => break,
                Err(e) => {
                    self.socket_error("receive a request", e)?;
                    break;
                }
            }
        }
        if batch.is_empty() {
            return Ok(false);
        }
        let now = now_ms();
        // Without a batch (it could not begin), each event commits on its own.
        let batched = match self.core.begin_batch() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %f2b_common::daemon::error_chain(&e), "cannot begin a ledger batch; committing one by one");
                false
            }
        };
        // The lines logged while deciding (a `broadcast` line per event) go out
        // in one write once the batch is decided: one system call per batch, not
        // one per line. Not held across anything that waits (the ledger's sync;
        // without a batch each event syncs as it is decided), so a stalled disk
        // never keeps them back.
        let lines = batched.then(f2b_common::log_batch::hold_log_lines);
        let mut outcomes = Vec::with_capacity(batch.len());
        for r in &batch {
            self.metrics.reports_received.inc();
            let outcome = match r.broken {
                // The core records an accepted event in the ledger (in the batch).
                None => {
                    let outcome = self.core.handle(&r.frames, &r.peer, now);
                    (outcome, self.core.take_refusal())
                }
                Some(e) => {
                    self.socket_error("receive a request part", e)?;
                    let nak = Nak::new(
                        None,
                        NakReason::Malformed,
                        "the message could not be received whole",
                    );
                    let outcome = Outcome {
                        reply: Response::Reply(Reply::Nak(nak)),
                        seal: Seal::None,
                        broadcasts: Vec::new(),
                    };
                    (outcome, Some(NakReason::Malformed.code()))
                }
            };
            outcomes.push(outcome);
        }
        // Broadcast before the commit's sync (see the module docs); the replies
        // wait for it. Without a batch every event was committed on its own.
        // After commits failed and their numbers could not be written, or when
        // the batch was rolled back already (an append failed half-way), the
        // batch is committed first (`Ledger::may_broadcast_early`).
        let early = if batched && self.core.ledger().may_broadcast_early() {
            Some(self.broadcast_all(&outcomes)?)
        } else {
            None
        };
        // The held lines go out once the broadcasts are queued (sending them
        // waits for nothing), so their write, and the wake-up of whoever reads
        // them, are not on the events' path; before the commit's sync.
        drop(lines);
        if batched {
            let committed = self.core.commit_batch(now, early.is_some());
            self.metrics.ledger_open.set(committed.is_ok());
            if let Err(e) = committed {
                tracing::error!(
                    error = %f2b_common::daemon::error_chain(&e),
                    requests = outcomes.len(),
                    "ledger commit failed; the requests are refused as busy and will be resent"
                );
                for (o, refusal) in &mut outcomes {
                    o.reply = std::mem::replace(&mut o.reply, Response::Legacy(String::new()))
                        .refused_busy();
                    o.broadcasts.clear();
                    *refusal = Some(NakReason::Busy.code());
                }
            }
        }
        // An ACK with status `broadcast` means the event is durable and already
        // queued on the PUB socket(s).
        let queued = match early {
            Some(queued) => queued,
            None => self.broadcast_all(&outcomes)?,
        };
        let mut broadcast = false;
        for ((r, (outcome, refusal)), queued) in batch.iter().zip(outcomes).zip(queued) {
            broadcast |= self.deliver(&r.envelope, outcome, refusal, &queued)?;
        }
        if broadcast {
            self.gauges_stale = true;
            self.metrics.sequence.set(gauge_value(self.core.last_seq()));
        }
        Ok(broadcast)
    }

    /// Counts a request's answer in the metrics: refused (by `refusal`, the
    /// reason the core or the server gave), a snapshot page, an event accepted
    /// (recorded and broadcast) or a duplicate; the answers of a `replies` one by
    /// one, each as the answer to a report.
    fn count_answer(&self, reply: &Response, refusal: Option<&'static str>, broadcast: bool) {
        let m = &self.metrics;
        match (reply, refusal) {
            (Response::Reply(Reply::Replies(answers)), _) => {
                answers.iter().for_each(|a| self.count_event(a));
            }
            (_, Some(reason)) => m.events_rejected.inc(reason),
            (Response::Reply(r), None) => self.count_event(r),
            (Response::Snapshot(SnapshotReply::Nak(n)), None) => {
                m.events_rejected.inc_nak(n.reason)
            }
            (Response::Snapshot(SnapshotReply::Page(_)), None) => {
                m.snapshots_served.inc();
            }
            (Response::Legacy(_), None) if broadcast => {
                m.events_accepted.inc();
            }
            (Response::Legacy(_), None) => {
                m.events_duplicate.inc();
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }

    /// Counts the answer to one event: a NAK by its reason, an ACK as accepted
    /// (status `broadcast`) or a duplicate (any other).
    fn count_event(&self, answer: &Reply) {
        let m = &self.metrics;
        match answer {
            Reply::Nak(n) => m.events_rejected.inc_nak(n.reason),
            Reply::Ack(a) if a.status == AckStatus::Broadcast => {
                m.events_accepted.inc();
            }
            Reply::Ack(_) => {
                m.events_duplicate.inc();
            }
            // Never nested; each of its answers would be counted.
            Reply::Replies(answers) => answers.iter().for_each(|a| self.count_event(a)),
        }
    }

    /// Broadcasts the events of a batch's `outcomes`, in sequence order, packed into
    /// as few messages as the protocol allows ([`f2b_proto::pack_events`]: each run
    /// of one jail's events under one signature), then sends each to the legacy PUB
    /// socket if there is one. Returns, per outcome and per event it broadcasts (in
    /// the order of [`Outcome::broadcasts`]), whether the event's message was
    /// queued. Nothing waits to fill a message: a lone report's event goes out
    /// alone, at once. Fails only on `ETERM`.
    fn broadcast_all(
        &mut self,
        outcomes: &[(Outcome, Option<&'static str>)],
    ) -> Result<Vec<Vec<bool>>, PublisherError> {
        let mut queued: Vec<Vec<bool>> = outcomes
            .iter()
            .map(|(o, _)| vec![false; o.broadcasts.len()])
            .collect();
        let mut events = Vec::new();
        // (outcome, event of that outcome) of each entry of `events`.
        let mut owners = Vec::new();
        for (i, (o, _)) in outcomes.iter().enumerate() {
            for (j, b) in o.broadcasts.iter().enumerate() {
                match &b.broadcast {
                    Broadcast::Event(s) => {
                        events.push(s.clone());
                        owners.push((i, j));
                    }
                    // The core makes only events; anything else goes out alone.
                    other => {
                        queued[i][j] = self.send_one(other, &[b])?;
                    }
                }
            }
        }
        let mut owners = owners.into_iter();
        for message in f2b_proto::pack_events(events) {
            let mine: Vec<(usize, usize)> = owners.by_ref().take(message.events().len()).collect();
            let carried: Vec<&ToBroadcast> = mine
                .iter()
                .map(|&(i, j)| &outcomes[i].0.broadcasts[j])
                .collect();
            let ok = self.send_one(&message, &carried)?;
            for (i, j) in mine {
                queued[i][j] = ok;
            }
        }
        Ok(queued)
    }

    /// Sends one broadcast message carrying the events `carried`, then each of
    /// them to the legacy PUB socket. Returns whether it was queued. Fails only on
    /// `ETERM`.
    fn send_one(
        &mut self,
        message: &Broadcast,
        carried: &[&ToBroadcast],
    ) -> Result<bool, PublisherError> {
        match self.send_broadcast(message) {
            Ok(()) => {
                self.metrics
                    .events_broadcast
                    .inc_by(carried.len().max(1) as u64);
                for b in carried {
                    if let Err(e) = self.send_legacy(&b.broadcast, b.legacy.as_deref()) {
                        self.socket_error("broadcast to legacy subscribers", e)?;
                    }
                }
                Ok(true)
            }
            Err(e) => {
                self.socket_error("broadcast", e)?;
                Ok(false)
            }
        }
    }

    /// Sends `outcome`'s reply back along `envelope`, with a `busy` NAK instead of
    /// each ACK whose event's broadcast could not be queued (`queued`: per
    /// [`Outcome::broadcasts`]). Returns whether one of its events was broadcast.
    fn deliver(
        &mut self,
        envelope: &[Vec<u8>],
        outcome: Outcome,
        mut refusal: Option<&'static str>,
        queued: &[bool],
    ) -> Result<bool, PublisherError> {
        let mut reply = outcome.reply;
        for (b, ok) in outcome.broadcasts.iter().zip(queued) {
            if !ok {
                reply = self.core.broadcast_failed(reply, b.answer);
            }
        }
        if queued.contains(&false) && reply.is_refusal() {
            refusal = Some(NakReason::Busy.code());
        }
        self.count_answer(&reply, refusal, !outcome.broadcasts.is_empty());
        self.reply(envelope, &reply, &outcome.seal)?;
        Ok(queued.contains(&true))
    }

    /// Sends `reply` along `envelope` (routing ids, then the empty delimiter), and
    /// after it the MAC or signature `seal` asks for. It never blocks: a reply to a
    /// peer that is gone, or that does not read and is at its high-water mark, is
    /// dropped. Fails only on `ETERM`.
    fn reply(
        &mut self,
        envelope: &[Vec<u8>],
        reply: &Response,
        seal: &Seal,
    ) -> Result<(), PublisherError> {
        let frames = self.core.trust().reply_frames(reply.encode(), seal);
        let mut sent = 0;
        let mut result = Ok(());
        let last = envelope.len() + frames.len() - 1;
        for (i, frame) in envelope.iter().chain(&frames).enumerate() {
            let more = if i < last { zmq::SNDMORE } else { 0 };
            result = self.router.send(frame.as_slice(), more | zmq::DONTWAIT);
            if result.is_err() {
                break;
            }
            sent += 1;
        }
        if result.is_err() && sent > 0 {
            // End the message begun, so that the next one starts afresh.
            let _ = self.router.send(&[][..], zmq::DONTWAIT);
        }
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.socket_error("send a reply", e),
        }
    }

    /// Sends `text` (one frame, no topic) to fail2ban-zmq-tools subscribers, when
    /// there is a legacy PUB socket.
    fn send_legacy(&self, b: &Broadcast, text: Option<&str>) -> Result<(), zmq::Error> {
        let Some(publ) = &self.legacy_publ else {
            return Ok(());
        };
        match text {
            Some(t) => publ.send(t.as_bytes(), zmq::DONTWAIT),
            None => {
                if let Broadcast::Event(s) = b {
                    tracing::debug!(
                        seq = s.seq,
                        jail = %s.event.jail,
                        ip = %s.event.ip,
                        "not sent to legacy subscribers (IPv6, or a jail name the old format cannot carry)"
                    );
                }
                Ok(())
            }
        }
    }

    /// Sends `b` as topic, payload and (with a signing key) signature.
    fn send_broadcast(&self, b: &Broadcast) -> Result<(), zmq::Error> {
        // PUB never blocks: a subscriber at its high-water mark loses messages (and
        // learns from the next heartbeat's seq that it did). A PUB socket takes a
        // multipart message whole or not at all.
        self.publ
            .send_multipart(self.core.trust().broadcast_frames(b), zmq::DONTWAIT)
    }
}

/// Whether a socket error ends the serving loop: only `ETERM`, the context being
/// terminated (the sockets cannot be used any more).
fn is_fatal(e: zmq::Error) -> bool {
    e == zmq::Error::ETERM
}

/// One request as received: its envelope (routing ids and the empty delimiter),
/// its parts (at most `MAX_FRAMES + 1`), the sender, and the error that cut it
/// short, if one did (then the rest was drained).
struct Received {
    envelope: Vec<Vec<u8>>,
    frames: Vec<Vec<u8>>,
    peer: String,
    broken: Option<zmq::Error>,
}

/// Receives one message from the ROUTER socket: the envelope up to and including
/// the empty delimiter, then the request's parts, keeping at most `MAX_FRAMES + 1`
/// of them (one more than allowed, so the core can refuse the message), and the
/// sender's address. `Ok(None)`: nothing waits. `Err`: nothing was received. A
/// message without a delimiter among its first [`MAX_ENVELOPE`] + 1 frames cannot
/// be answered: it is dropped and the next one is taken.
fn recv_request(router: &zmq::Socket) -> Result<Option<Received>, zmq::Error> {
    loop {
        let mut msg = zmq::Message::new();
        match router.recv(&mut msg, zmq::DONTWAIT) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut peer = None;
        let mut envelope = Vec::new();
        let mut frames = Vec::new();
        let mut delimited = false;
        let mut broken = None;
        // `msg` holds a received part, not stored yet.
        loop {
            if peer.is_none() {
                peer = msg.gets("Peer-Address").map(str::to_owned);
            }
            if !delimited {
                delimited = msg.is_empty();
                if envelope.len() <= MAX_ENVELOPE {
                    envelope.push(msg.to_vec());
                }
            } else if frames.len() <= MAX_FRAMES {
                frames.push(msg.to_vec());
            }
            if !msg.get_more() {
                break;
            }
            // The rest of a message that has started arriving is already queued.
            let next = loop {
                match router.recv(&mut msg, 0) {
                    Err(zmq::Error::EINTR) => {}
                    other => break other,
                }
            };
            if let Err(e) = next {
                drain(router, e);
                broken = Some(e);
                break;
            }
        }
        if !delimited || envelope.len() > MAX_ENVELOPE {
            tracing::debug!(
                peer = peer.as_deref().unwrap_or("unknown"),
                "dropped a message without a REQ envelope"
            );
            continue;
        }
        return Ok(Some(Received {
            envelope,
            frames,
            peer: peer.unwrap_or_else(|| "unknown".to_owned()),
            broken,
        }));
    }
}

/// Drains what is left of a message whose part could not be received (`e`), so
/// that the next receive starts a new message.
fn drain(router: &zmq::Socket, e: zmq::Error) {
    if is_fatal(e) {
        return;
    }
    let mut rest = zmq::Message::new();
    while router.recv(&mut rest, zmq::DONTWAIT).is_ok() && rest.get_more() {}
}

/// A `zmq::poll` timeout in whole milliseconds, rounded up so the loop does not wake
/// just before the heartbeat is due and spin.
fn poll_timeout(wait: Duration) -> i64 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// What to check when binding `key` failed with `e`.
pub fn bind_hint(e: zmq::Error, key: &str) -> String {
    match e {
        zmq::Error::EADDRINUSE => format!(
            "another process listens on that port (another f2b-publisher? `ss -ltnp` shows \
             which): stop it, or change {key}"
        ),
        zmq::Error::ENODEV => format!(
            "no network interface of that name on this machine (`ip link` lists them; under \
             systemd, naming an interface needs AF_NETLINK in RestrictAddressFamilies=): \
             check {key}"
        ),
        zmq::Error::EADDRNOTAVAIL => format!(
            "that address is not one of this machine's (`ip addr` lists them): check {key}, \
             or bind all addresses with tcp://*:PORT"
        ),
        zmq::Error::EACCES => format!(
            "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE; choose a higher \
             port in {key}"
        ),
        _ => format!("check {key} (tcp://ADDRESS:PORT, tcp://*:PORT or tcp://INTERFACE:PORT)"),
    }
}

/// What to check when the metrics server could not listen (`key` is its
/// `metrics_bind`).
pub fn listen_hint(e: &f2b_common::metrics::MetricsError, key: &str) -> String {
    let kind = match e {
        f2b_common::metrics::MetricsError::Bind { source, .. } => Some(source.kind()),
        #[allow(unreachable_patterns)]
        _ => None,
    };
    match kind {
        Some(std::io::ErrorKind::AddrInUse) => format!(
            "another process listens on that port (`ss -ltnp` shows which): stop it, or \
             change {key}"
        ),
        Some(std::io::ErrorKind::AddrNotAvailable) => {
            format!("that address is not one of this machine's (`ip addr` lists them): check {key}")
        }
        Some(std::io::ErrorKind::PermissionDenied) => format!(
            "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE; choose a higher \
             port in {key}"
        ),
        _ => format!("check {key} (ADDRESS:PORT)"),
    }
}

/// A count as a gauge's value.
fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broadcast_socket_queues_at_most_broadcast_hwm_messages_per_subscriber() {
        let ctx = zmq::Context::new();
        let publ = broadcast_socket(&ctx).unwrap();
        assert_eq!(publ.get_sndhwm().unwrap(), BROADCAST_HWM);
        // Full packed messages for a stalled subscriber stay near 10 MiB.
        let bound = BROADCAST_HWM as usize * f2b_proto::PACKED_MESSAGE_SIZE;
        assert!(bound <= 10 * 1024 * 1024, "{bound}");
        // The other options are the project's.
        assert_eq!(
            publ.get_maxmsgsize().unwrap(),
            f2b_proto::MAX_MESSAGE_SIZE as i64
        );
    }

    fn bound(state: &std::path::Path) -> Bound {
        let text = format!(
            "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\n\
             broadcast_bind = \"tcp://127.0.0.1:*\"\nstate_dir = {:?}\n",
            state.display().to_string()
        );
        let config = f2b_common::config::from_str(&text, std::path::Path::new("test.conf"))
            .unwrap()
            .publisher;
        bind(&config).unwrap()
    }

    #[test]
    fn only_eterm_is_fatal() {
        assert!(is_fatal(zmq::Error::ETERM));
        for e in [
            zmq::Error::EFSM,
            zmq::Error::EAGAIN,
            zmq::Error::EINTR,
            zmq::Error::EHOSTUNREACH,
            zmq::Error::EMSGSIZE,
        ] {
            assert!(!is_fatal(e), "{e}");
        }
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        assert!(b
            .socket_error("broadcast", zmq::Error::EHOSTUNREACH)
            .is_ok());
        let err = b.socket_error("broadcast", zmq::Error::ETERM).unwrap_err();
        assert!(
            matches!(
                err,
                PublisherError::Socket {
                    what: "broadcast",
                    source: zmq::Error::ETERM
                }
            ),
            "{err:?}"
        );
    }

    fn dealer(ctx: &zmq::Context, b: &Bound) -> zmq::Socket {
        let d = ctx.socket(zmq::DEALER).unwrap();
        d.set_linger(0).unwrap();
        d.set_rcvtimeo(5000).unwrap();
        d.connect(b.reply_endpoint()).unwrap();
        d
    }

    /// Serves until `n` replies reached `d`; returns their bodies (the delimiter
    /// checked and stripped).
    fn served(b: &mut Bound, d: &zmq::Socket, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while out.len() < n {
            assert!(Instant::now() < end, "{} of {n} replies", out.len());
            if b.router.poll(zmq::POLLIN, 50).unwrap() > 0 {
                b.serve_waiting().unwrap();
            }
            while let Ok(frames) = d.recv_multipart(zmq::DONTWAIT) {
                assert_eq!(frames.len(), 2, "{frames:?}");
                assert!(frames[0].is_empty());
                out.push(frames[1].clone());
            }
        }
        out
    }

    /// A message without the empty delimiter cannot be answered (a REP drops it
    /// too); the next one, with it, is; a reply to a peer that is gone is dropped,
    /// not an error.
    #[test]
    fn messages_without_an_envelope_are_dropped_and_service_goes_on() {
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        let nak = Response::Reply(Reply::Nak(Nak::new(None, NakReason::Busy, "x")));
        b.reply(&[b"\0gone".to_vec(), Vec::new()], &nak, &Seal::None)
            .unwrap();

        let ctx = zmq::Context::new();
        let d = dealer(&ctx, &b);
        d.send("{no delimiter", 0).unwrap();
        d.send_multipart([&b""[..], b"{garbage"], 0).unwrap();
        let replies = served(&mut b, &d, 1);
        let answer = Reply::decode(&replies[0]).unwrap();
        assert!(
            matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed),
            "{answer:?}"
        );
        assert!(d.recv_multipart(zmq::DONTWAIT).is_err(), "a second reply");
        // Nothing waits: nothing is received, nothing fails.
        assert!(!b.serve_waiting().unwrap());
    }

    /// Requests pipelined by one peer are decided in batches and answered in the
    /// order they were sent, each event with the next sequence number.
    #[test]
    fn requests_waiting_together_are_answered_in_order() {
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        let ctx = zmq::Context::new();
        let d = dealer(&ctx, &b);
        let n = 200u32;
        for i in 1..=n {
            let e = f2b_proto::Event::new(
                f2b_proto::EventId::from_u128(i.into()),
                f2b_proto::NodeName::new("web1").unwrap(),
                f2b_proto::JailName::new("sshd").unwrap(),
                f2b_proto::Action::Ban,
                std::net::Ipv4Addr::from(0x0A00_0000 + i).into(),
                now_ms(),
            )
            .unwrap();
            let report = f2b_proto::Request::Report(e).encode();
            d.send_multipart([&b""[..], &report], 0).unwrap();
        }
        let sub = live_sub(&ctx, &b);
        let replies = served(&mut b, &d, n as usize);
        // Broadcast in the same order, whatever the batches were.
        let got = events_received(&sub, n as usize);
        let seqs: Vec<u64> = got
            .iter()
            .flat_map(|m| m.events().iter().map(|s| s.seq))
            .collect();
        assert_eq!(seqs, (1..=u64::from(n)).collect::<Vec<_>>());
        for (i, r) in replies.iter().enumerate() {
            match Reply::decode(r).unwrap() {
                Reply::Ack(a) => assert_eq!(
                    (a.id, a.seq),
                    (
                        f2b_proto::EventId::from_u128(i as u128 + 1),
                        Some(i as u64 + 1)
                    )
                ),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(b.core.ledger().rows().unwrap(), u64::from(n));
    }

    /// A SUB socket on `b`'s broadcast endpoint, once it receives (heartbeats are
    /// sent until one arrives, then drained).
    fn live_sub(ctx: &zmq::Context, b: &Bound) -> zmq::Socket {
        let sub = ctx.socket(zmq::SUB).unwrap();
        sub.set_linger(0).unwrap();
        sub.set_subscribe(b"").unwrap();
        sub.connect(b.broadcast_endpoint()).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(Instant::now() < end, "the subscription never became live");
            b.send_broadcast(&b.core.heartbeat(Duration::from_secs(1)))
                .unwrap();
            if sub.poll(zmq::POLLIN, 20).unwrap() > 0 {
                break;
            }
        }
        while sub.poll(zmq::POLLIN, 20).unwrap() > 0 {
            sub.recv_multipart(0).unwrap();
        }
        sub
    }

    /// The event broadcasts received on `sub` until they carried `n` events.
    fn events_received(sub: &zmq::Socket, n: usize) -> Vec<Broadcast> {
        let mut out: Vec<Broadcast> = Vec::new();
        while out.iter().map(|m| m.events().len()).sum::<usize>() < n {
            let have: Vec<usize> = out.iter().map(|m| m.events().len()).collect();
            assert!(
                sub.poll(zmq::POLLIN, 5000).unwrap() > 0,
                "broadcasts missing after messages of {have:?} events"
            );
            let frames = sub.recv_multipart(0).unwrap();
            let m = Broadcast::decode(&frames[0], &frames[1]).unwrap();
            if !matches!(m, Broadcast::Heartbeat(_)) {
                out.push(m);
            }
        }
        out
    }

    fn outcome(seq: u64, jail: &str, ip: u32) -> (Outcome, Option<&'static str>) {
        let e = f2b_proto::Event::new(
            f2b_proto::EventId::from_u128(seq.into()),
            f2b_proto::NodeName::new("web1").unwrap(),
            f2b_proto::JailName::new(jail).unwrap(),
            f2b_proto::Action::Ban,
            std::net::Ipv4Addr::from(ip).into(),
            now_ms(),
        )
        .unwrap();
        let ack = Reply::Ack(f2b_proto::Ack {
            id: e.id,
            seq: Some(seq),
            status: AckStatus::Broadcast,
        });
        let o = Outcome {
            reply: Response::Reply(ack),
            seal: Seal::None,
            broadcasts: vec![ToBroadcast {
                answer: 0,
                broadcast: Broadcast::Event(f2b_proto::Sequenced {
                    seq,
                    epoch: Epoch(1),
                    event: e,
                }),
                legacy: None,
            }],
        };
        (o, None)
    }

    /// A batch's events go out in sequence order, each run of one jail as few
    /// `events` messages as fit, a lone event as an `event`; every outcome with a
    /// broadcast is marked queued, the others not.
    #[test]
    fn a_batchs_events_are_broadcast_together_in_order() {
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        let ctx = zmq::Context::new();
        let sub = live_sub(&ctx, &b);
        let mut outcomes: Vec<_> = (1..=100)
            .map(|n| outcome(n, "sshd", 0x0A00_0000 + n as u32))
            .collect();
        outcomes.push(outcome(101, "nginx", 0x0A01_0000));
        outcomes.extend((102..=110).map(|n| outcome(n, "sshd", 0x0A00_0000 + n as u32)));
        let mut refused = outcome(0, "sshd", 0x0A02_0000);
        refused.0.broadcasts.clear();
        outcomes.insert(10, refused);

        let queued = b.broadcast_all(&outcomes).unwrap();
        let expected: Vec<Vec<bool>> = outcomes
            .iter()
            .map(|(o, _)| vec![true; o.broadcasts.len()])
            .collect();
        assert_eq!(queued, expected);

        let got = events_received(&sub, 110);
        let shape: Vec<(&str, usize)> = got
            .iter()
            .map(|m| match m {
                Broadcast::Events(batch) => (batch.jail().as_str(), batch.items().len()),
                Broadcast::Event(s) => (s.event.jail.as_str(), 1),
                Broadcast::Heartbeat(_) => unreachable!(),
            })
            .collect();
        // 100 sshd events pass PACKED_MESSAGE_SIZE: several messages, each full
        // but the last; then nginx alone; then 9 sshd in one.
        let k = shape.len() - 2;
        assert!(k >= 2, "{shape:?}");
        assert!(
            shape[..k].iter().all(|(jail, _)| *jail == "sshd"),
            "{shape:?}"
        );
        assert_eq!(shape[..k].iter().map(|(_, n)| n).sum::<usize>(), 100);
        for m in &got[..k - 1] {
            let len = m.encode().len();
            assert!(
                len <= f2b_proto::PACKED_MESSAGE_SIZE && len + 200 > f2b_proto::PACKED_MESSAGE_SIZE,
                "{len}"
            );
        }
        assert!(matches!(got[k], Broadcast::Event(_)), "{:?}", got[k]);
        assert_eq!(shape[k], ("nginx", 1));
        assert_eq!(shape[k + 1], ("sshd", 9));
        let seqs: Vec<u64> = got
            .iter()
            .flat_map(|m| m.events().iter().map(|s| s.seq))
            .collect();
        assert_eq!(seqs, (1..=110).collect::<Vec<_>>());
        assert!(
            sub.poll(zmq::POLLIN, 50).unwrap() == 0 || {
                let f = sub.recv_multipart(0).unwrap();
                matches!(
                    Broadcast::decode(&f[0], &f[1]).unwrap(),
                    Broadcast::Heartbeat(_)
                )
            }
        );
    }

    /// `reports` requests waiting beside a report are answered each with its
    /// `replies`, in order; their events are broadcast in sequence order, and the
    /// metrics count events (and requests once each).
    #[test]
    fn reports_requests_are_answered_in_order_and_counted_per_event() {
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        let ctx = zmq::Context::new();
        let d = dealer(&ctx, &b);
        let ev = |id: u32, ip: u32| {
            f2b_proto::Event::new(
                f2b_proto::EventId::from_u128(id.into()),
                f2b_proto::NodeName::new("web1").unwrap(),
                f2b_proto::JailName::new("sshd").unwrap(),
                f2b_proto::Action::Ban,
                std::net::Ipv4Addr::from(ip).into(),
                now_ms(),
            )
            .unwrap()
        };
        let first: Vec<_> = (1..=10).map(|i| ev(i, 0x0A00_0000 + i)).collect();
        let requests = [
            f2b_proto::Request::Reports(first.clone()),
            f2b_proto::Request::Report(ev(11, 0x0A00_000B)),
            // New, forbidden (loopback), a resend of event 1.
            f2b_proto::Request::Reports(vec![
                ev(12, 0x0A00_000C),
                ev(13, 0x7F00_0001),
                ev(1, 0x0A00_0001),
            ]),
        ];
        for r in &requests {
            d.send_multipart([&b""[..], &r.encode()], 0).unwrap();
        }
        let sub = live_sub(&ctx, &b);
        let replies: Vec<Reply> = served(&mut b, &d, requests.len())
            .iter()
            .map(|r| Reply::decode(r).unwrap())
            .collect();
        let ack = |id: u32, status, seq: Option<u64>| {
            Reply::Ack(f2b_proto::Ack {
                id: f2b_proto::EventId::from_u128(id.into()),
                seq,
                status,
            })
        };
        assert_eq!(
            replies[0],
            Reply::Replies(
                (1..=10)
                    .map(|i| ack(i, AckStatus::Broadcast, Some(i.into())))
                    .collect()
            )
        );
        assert_eq!(replies[1], ack(11, AckStatus::Broadcast, Some(11)));
        let Reply::Replies(last) = &replies[2] else {
            panic!("{:?}", replies[2]);
        };
        assert_eq!(last[0], ack(12, AckStatus::Broadcast, Some(12)));
        assert!(
            matches!(&last[1], Reply::Nak(n) if n.reason == NakReason::Forbidden),
            "{last:?}"
        );
        assert_eq!(last[2], ack(1, AckStatus::Duplicate, Some(1)));
        let seqs: Vec<u64> = events_received(&sub, 12)
            .iter()
            .flat_map(|m| m.events().iter().map(|s| s.seq))
            .collect();
        assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
        let m = &b.metrics;
        assert_eq!(m.reports_received.get(), 3);
        assert_eq!(m.events_accepted.get(), 12);
        assert_eq!(m.events_duplicate.get(), 1);
        assert_eq!(m.events_rejected.get("forbidden"), 1);
        assert_eq!(m.events_broadcast.get(), 12);
        assert_eq!(b.core.ledger().rows().unwrap(), 12);
    }

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_timeout(Duration::ZERO), 0);
        assert_eq!(poll_timeout(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout(Duration::from_millis(50)), 50);
        assert_eq!(poll_timeout(Duration::from_micros(50_001)), 51);
    }
}
