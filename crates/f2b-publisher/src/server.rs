//! The ZeroMQ side: opens the ledger, binds the REP and PUB sockets (and the legacy
//! PUB socket when configured), then one blocking thread waits in `zmq::poll` on the
//! REP socket and the shutdown socket, with a timeout that ends when the next
//! heartbeat or ledger pruning is due, and hands every request to the [`Core`].
//!
//! # Errors
//!
//! A socket error while handling one message (receiving a request or a part of
//! it, broadcasting, replying, a heartbeat) is logged (`socket error`, at most 10
//! lines per operation and second) and the loop goes on; only `ETERM` (the context
//! is being terminated) ends it. The REP socket's state machine is kept: a request
//! that was received is always answered, a message whose later part could not be
//! received is drained and answered `malformed`, and an event whose broadcast
//! failed is answered `busy` so that its monitor resends it (see
//! [`Core::broadcast_failed`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use f2b_common::config::PublisherConfig;
use f2b_common::sockets::{last_endpoint, new_socket, shutdown_socket};
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::{Broadcast, Epoch, Nak, NakReason, Reply, MAX_FRAMES};

use crate::core::{Core, Limits, Response};
use crate::ledger::{Ledger, PRUNE_BATCH};
use crate::throttle::Throttle;
use crate::PublisherError;

/// How long the PUB sockets may keep delivering queued broadcasts after shutdown.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// The publisher with both sockets bound, not yet serving. [`bind`] then
/// [`Bound::serve`] is what [`crate::run`] does; tests call them separately to learn
/// the real endpoints.
pub struct Bound {
    rep: zmq::Socket,
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
    let rep = new_socket(&ctx, zmq::REP).map_err(socket_err("create the REP socket"))?;
    rep.bind(config.reply_bind.as_str())
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
    let reply_endpoint = last_endpoint(&rep);
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
        rep,
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
    /// The REP endpoint really bound (the port chosen for `*`).
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
                self.rep.as_poll_item(zmq::POLLIN),
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
            if items[0].is_readable() && self.serve_one()? {
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

    /// Receives one request if one is waiting, answers it, broadcasts what the core
    /// says. Returns whether something was broadcast. Fails only on `ETERM`.
    fn serve_one(&mut self) -> Result<bool, PublisherError> {
        let received = match recv_request(&self.rep) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(false),
            // Nothing was received: the REP socket still waits for a request.
            Err(e) => {
                self.socket_error("receive a request", e)?;
                return Ok(false);
            }
        };
        let Received {
            frames,
            peer,
            broken,
        } = received;
        let outcome = match broken {
            None => {
                // The core commits an accepted event to the ledger before it returns.
                self.core.handle(&frames, &peer, now_ms())
            }
            Some(e) => {
                self.socket_error("receive a request part", e)?;
                let nak = Nak::new(
                    None,
                    NakReason::Malformed,
                    "the message could not be received whole",
                );
                crate::core::Outcome {
                    reply: Response::Reply(Reply::Nak(nak)),
                    broadcast: None,
                    legacy_broadcast: None,
                }
            }
        };
        // Broadcast next: an ACK with status `broadcast` then means the event is
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
        // A REP socket that received must send, or it takes no further request.
        self.reply(&reply)?;
        Ok(broadcast)
    }

    /// Sends `reply` on the REP socket, which routes it to the request's sender; it
    /// never blocks (a peer that does not read has its replies dropped at the
    /// high-water mark). Fails only on `ETERM`.
    fn reply(&mut self, reply: &Response) -> Result<(), PublisherError> {
        match self.rep.send(reply.encode(), zmq::DONTWAIT) {
            Ok(()) => Ok(()),
            // EFSM: the socket holds no request to answer; it still takes one.
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

/// One request as received: its parts (at most `MAX_FRAMES + 1`), the sender, and
/// the error that cut it short, if one did (then the rest was drained).
struct Received {
    frames: Vec<Vec<u8>>,
    peer: String,
    broken: Option<zmq::Error>,
}

/// Receives the parts of one message, keeping at most `MAX_FRAMES + 1` of them (one
/// more than allowed, so the core can refuse the message), and the sender's address.
/// `Ok(None)`: nothing waits. `Err`: nothing was received.
fn recv_request(rep: &zmq::Socket) -> Result<Option<Received>, zmq::Error> {
    let mut msg = zmq::Message::new();
    match rep.recv(&mut msg, zmq::DONTWAIT) {
        Ok(()) => {}
        Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => return Ok(None),
        Err(e) => return Err(e),
    }
    let peer = msg.gets("Peer-Address").unwrap_or("unknown").to_owned();
    let mut frames = vec![msg.to_vec()];
    let mut broken = None;
    let mut more = msg.get_more();
    while more {
        // The rest of a message that has started arriving is already queued.
        match rep.recv(&mut msg, 0) {
            Ok(()) => {
                more = msg.get_more();
                if frames.len() <= MAX_FRAMES {
                    frames.push(msg.to_vec());
                }
            }
            Err(zmq::Error::EINTR) => {}
            Err(e) => {
                // Drain what is left of the message, so that the socket is ready
                // to send the reply.
                let mut rest = zmq::Message::new();
                while !is_fatal(e) && rep.recv(&mut rest, zmq::DONTWAIT).is_ok() {
                    if !rest.get_more() {
                        break;
                    }
                }
                broken = Some(e);
                break;
            }
        }
    }
    Ok(Some(Received {
        frames,
        peer,
        broken,
    }))
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

    /// A reply the REP socket refuses (EFSM: it holds no request) is logged, not
    /// fatal, and the socket serves the next request.
    #[test]
    fn a_failed_reply_is_not_fatal_and_the_socket_serves_on() {
        let state = tempfile::tempdir().unwrap();
        let mut b = bound(state.path());
        let nak = Response::Reply(Reply::Nak(Nak::new(None, NakReason::Busy, "x")));
        b.reply(&nak).unwrap();

        let ctx = zmq::Context::new();
        let req = ctx.socket(zmq::REQ).unwrap();
        req.set_linger(0).unwrap();
        req.set_rcvtimeo(5000).unwrap();
        req.connect(b.reply_endpoint()).unwrap();
        req.send("{garbage", 0).unwrap();
        assert_eq!(b.rep.poll(zmq::POLLIN, 5000).unwrap(), 1);
        assert!(!b.serve_one().unwrap());
        let answer = Reply::decode(&req.recv_bytes(0).unwrap()).unwrap();
        assert!(
            matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed),
            "{answer:?}"
        );
        // Nothing waits: nothing is received, nothing fails.
        assert!(!b.serve_one().unwrap());
    }

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_timeout(Duration::ZERO), 0);
        assert_eq!(poll_timeout(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout(Duration::from_millis(50)), 50);
        assert_eq!(poll_timeout(Duration::from_micros(50_001)), 51);
    }
}
