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
//! transaction, commit it once (one disk sync for all their events), and only then
//! broadcast and reply, in the order they arrived. An ACK still means the event is
//! durable; if the commit fails, every request of the batch is answered `busy`.
//! A message without the delimiter (not from a REQ-like peer) is dropped, as a REP
//! would.
//!
//! # Errors
//!
//! A socket error while handling one message (receiving a request or a part of
//! it, broadcasting, replying, a heartbeat) is logged (`socket error`, at most 10
//! lines per operation and second) and the loop goes on; only `ETERM` (the context
//! is being terminated) ends it. A request that was received is always answered: a
//! message whose later part could not be received is drained and answered
//! `malformed`, and an event whose broadcast failed is answered `busy` so that its
//! monitor resends it (see [`Core::broadcast_failed`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use f2b_common::config::PublisherConfig;
use f2b_common::sockets::{last_endpoint, new_socket, shutdown_socket};
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::{Broadcast, Epoch, Nak, NakReason, Reply, MAX_FRAMES};

use crate::core::{Core, Limits, Outcome, Response};
use crate::ledger::{Ledger, PRUNE_BATCH};
use crate::throttle::Throttle;
use crate::PublisherError;

/// How long the PUB sockets may keep delivering queued broadcasts after shutdown.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// The most requests decided and committed together.
pub const MAX_BATCH: usize = 64;

/// The most envelope frames (routing ids) a request may carry before its empty
/// delimiter: one from a direct peer, one more per proxy on the way.
const MAX_ENVELOPE: usize = 8;

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
}

fn socket_err(what: &'static str) -> impl FnOnce(zmq::Error) -> PublisherError {
    move |source| PublisherError::Socket { what, source }
}

/// Opens the ledger in `state_dir` (see [`Ledger::open_or_recover`]), prunes it,
/// rebuilds the core from it and logs `ledger path=.. epoch=.. seq=.. active=..`;
/// then creates the sockets, binds them and logs `listening on` with the real
/// endpoints. It blocks (file I/O, possibly a long prune): inside a runtime, call
/// it on a blocking thread, as [`crate::run`] does.
pub fn bind(config: &PublisherConfig) -> Result<Bound, PublisherError> {
    bind_with(config, Limits::default())
}

/// [`bind`] with the core's memory limits given (tests use small ones).
pub fn bind_with(config: &PublisherConfig, limits: Limits) -> Result<Bound, PublisherError> {
    let mut ledger = Ledger::open_or_recover(&config.state_dir, SystemTime::now())?;
    let now = now_ms();
    let ban_time_ms = u64::try_from(config.ban_time.as_millis()).unwrap_or(u64::MAX);
    while ledger.prune(now, ban_time_ms, PRUNE_BATCH)?.more {}
    let prune_interval = limits.prune_interval;
    let core = Core::new(ledger, config.ban_time, limits, now)?.with_legacy(config.legacy.clone());
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
    router
        .bind(config.reply_bind.as_str())
        .map_err(|source| PublisherError::Bind {
            key: "publisher.reply_bind",
            endpoint: config.reply_bind.to_string(),
            source,
        })?;
    let publ = new_socket(&ctx, zmq::PUB).map_err(socket_err("create the PUB socket"))?;
    publ.bind(config.broadcast_bind.as_str())
        .map_err(|source| PublisherError::Bind {
            key: "publisher.broadcast_bind",
            endpoint: config.broadcast_bind.to_string(),
            source,
        })?;
    let legacy_publ = match &config.legacy_broadcast_bind {
        Some(endpoint) => {
            let s =
                new_socket(&ctx, zmq::PUB).map_err(socket_err("create the legacy PUB socket"))?;
            s.bind(endpoint.as_str())
                .map_err(|source| PublisherError::Bind {
                    key: "publisher.legacy_broadcast_bind",
                    endpoint: endpoint.to_string(),
                    source,
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
    if config.legacy.is_some() {
        tracing::info!(
            token = config.legacy.as_ref().is_some_and(|l| l.token.is_some()),
            "accepting fail2ban-zmq-tools requests on the reply socket"
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
            let due = (last_sent + interval).min(next_prune);
            let timeout = poll_timeout(due.saturating_duration_since(Instant::now()));
            let mut items = [
                self.router.as_poll_item(zmq::POLLIN),
                waker.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, timeout) {
                Ok(_) => {}
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(socket_err("poll")(e)),
            }
            if items[1].is_readable() {
                tracing::debug!("shutdown requested");
                return Ok(());
            }
            let now = now_ms();
            self.core.flush_log(now);
            for s in self.errors.flush(now) {
                s.log();
            }
            if items[0].is_readable() && self.serve_waiting()? {
                last_sent = Instant::now();
            }
            if Instant::now() >= last_sent + interval {
                let hb = self.core.heartbeat(interval);
                if let Err(e) = self.send_broadcast(&hb) {
                    self.socket_error("broadcast a heartbeat", e)?;
                }
                last_sent = Instant::now();
            }
            if Instant::now() >= next_prune {
                // A full batch means more is left: go on after serving what waits.
                let more = self.prune();
                next_prune = Instant::now()
                    + if more {
                        Duration::ZERO
                    } else {
                        self.prune_interval
                    };
            }
        }
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
        let mut outcomes = Vec::with_capacity(batch.len());
        for r in &batch {
            let outcome = match r.broken {
                // The core records an accepted event in the ledger (in the batch).
                None => self.core.handle(&r.frames, &r.peer, now),
                Some(e) => {
                    self.socket_error("receive a request part", e)?;
                    let nak = Nak::new(
                        None,
                        NakReason::Malformed,
                        "the message could not be received whole",
                    );
                    Outcome {
                        reply: Response::Reply(Reply::Nak(nak)),
                        broadcast: None,
                        legacy_broadcast: None,
                    }
                }
            };
            outcomes.push(outcome);
        }
        if batched {
            if let Err(e) = self.core.commit_batch(now) {
                tracing::error!(
                    error = %f2b_common::daemon::error_chain(&e),
                    requests = outcomes.len(),
                    "ledger commit failed; the requests are refused as busy and will be resent"
                );
                for o in &mut outcomes {
                    o.reply = std::mem::replace(&mut o.reply, Response::Legacy(String::new()))
                        .refused_busy();
                    o.broadcast = None;
                    o.legacy_broadcast = None;
                }
            }
        }
        let mut broadcast = false;
        for (r, outcome) in batch.iter().zip(outcomes) {
            broadcast |= self.deliver(&r.envelope, outcome)?;
        }
        Ok(broadcast)
    }

    /// Broadcasts what `outcome` says, then sends its reply back along
    /// `envelope`. Returns whether something was broadcast.
    fn deliver(&mut self, envelope: &[Vec<u8>], outcome: Outcome) -> Result<bool, PublisherError> {
        // Broadcast first: an ACK with status `broadcast` then means the event is
        // durable and already queued on the PUB socket(s).
        let mut reply = outcome.reply;
        let broadcast = match &outcome.broadcast {
            Some(b) => match self.send_broadcast(b) {
                Ok(()) => {
                    if let Err(e) = self.send_legacy(b, outcome.legacy_broadcast.as_deref()) {
                        self.socket_error("broadcast to legacy subscribers", e)?;
                    }
                    true
                }
                Err(e) => {
                    self.socket_error("broadcast", e)?;
                    reply = self.core.broadcast_failed(reply);
                    false
                }
            },
            None => false,
        };
        self.reply(envelope, &reply)?;
        Ok(broadcast)
    }

    /// Sends `reply` along `envelope` (routing ids, then the empty delimiter). It
    /// never blocks: a reply to a peer that is gone, or that does not read and is at
    /// its high-water mark, is dropped. Fails only on `ETERM`.
    fn reply(&mut self, envelope: &[Vec<u8>], reply: &Response) -> Result<(), PublisherError> {
        let mut sent = 0;
        let mut result = Ok(());
        for frame in envelope {
            result = self
                .router
                .send(frame.as_slice(), zmq::SNDMORE | zmq::DONTWAIT);
            if result.is_err() {
                break;
            }
            sent += 1;
        }
        if result.is_ok() {
            result = self.router.send(reply.encode(), zmq::DONTWAIT);
        } else if sent > 0 {
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

    fn send_broadcast(&self, b: &Broadcast) -> Result<(), zmq::Error> {
        // PUB never blocks: a subscriber at its high-water mark loses messages (and
        // learns from the next heartbeat's seq that it did).
        self.publ
            .send(b.topic(), zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| self.publ.send(b.encode(), zmq::DONTWAIT))
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        b.reply(&[b"\0gone".to_vec(), Vec::new()], &nak).unwrap();

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
        let replies = served(&mut b, &d, n as usize);
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

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_timeout(Duration::ZERO), 0);
        assert_eq!(poll_timeout(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout(Duration::from_millis(50)), 50);
        assert_eq!(poll_timeout(Duration::from_micros(50_001)), 51);
    }
}
