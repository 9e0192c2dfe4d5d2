//! The ZeroMQ side: opens the ledger, binds the REP and PUB sockets (and the legacy
//! PUB socket when configured), then one blocking thread waits in `zmq::poll` on the
//! REP socket and the shutdown socket, with a timeout that ends when the next
//! heartbeat or ledger pruning is due, and hands every request to the [`Core`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use f2b_common::config::PublisherConfig;
use f2b_common::sockets::{last_endpoint, new_socket, shutdown_socket};
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::{Broadcast, Epoch, MAX_FRAMES};

use crate::core::{Core, Limits};
use crate::ledger::{Ledger, PRUNE_BATCH};
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
}

fn socket_err(what: &'static str) -> impl FnOnce(zmq::Error) -> PublisherError {
    move |source| PublisherError::Socket { what, source }
}

/// Opens the ledger in `state_dir` (see [`Ledger::open_or_recover`]), prunes it,
/// rebuilds the core from it and logs `ledger path=.. epoch=.. seq=.. active=..`;
/// then creates the sockets, binds them and logs `listening on` with the real
/// endpoints.
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
            self.core.flush_log(now_ms());
            if items[0].is_readable() && self.serve_one()? {
                last_sent = Instant::now();
            }
            if Instant::now() >= last_sent + interval {
                let hb = self.core.heartbeat(interval);
                self.send_broadcast(&hb)?;
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

    /// Receives one request if one is waiting, answers it, broadcasts what the core
    /// says. Returns whether something was broadcast.
    fn serve_one(&mut self) -> Result<bool, PublisherError> {
        let Some(Received { frames, peer }) = recv_request(&self.rep)? else {
            return Ok(false);
        };
        // The core commits an accepted event to the ledger before it returns.
        let outcome = self.core.handle(&frames, &peer, now_ms());
        // Broadcast next: an ACK with status `broadcast` then means the event is
        // durable and already queued on the PUB socket(s).
        let broadcast = match &outcome.broadcast {
            Some(b) => {
                self.send_broadcast(b)?;
                self.send_legacy(b, outcome.legacy_broadcast.as_deref())?;
                true
            }
            None => false,
        };
        // REP routes the reply to the request's sender; it never blocks (a peer that
        // does not read has its replies dropped at the high-water mark).
        self.rep
            .send(outcome.reply.encode(), zmq::DONTWAIT)
            .map_err(socket_err("send a reply"))?;
        Ok(broadcast)
    }

    /// Sends `text` (one frame, no topic) to fail2ban-zmq-tools subscribers, when
    /// there is a legacy PUB socket.
    fn send_legacy(&self, b: &Broadcast, text: Option<&str>) -> Result<(), PublisherError> {
        let Some(publ) = &self.legacy_publ else {
            return Ok(());
        };
        match text {
            Some(t) => publ
                .send(t.as_bytes(), zmq::DONTWAIT)
                .map_err(socket_err("broadcast to legacy subscribers")),
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

    fn send_broadcast(&self, b: &Broadcast) -> Result<(), PublisherError> {
        // PUB never blocks: a subscriber at its high-water mark loses messages (and
        // learns from the next heartbeat's seq that it did).
        self.publ
            .send(b.topic(), zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| self.publ.send(b.encode(), zmq::DONTWAIT))
            .map_err(socket_err("broadcast"))
    }
}

/// One request as received: its parts (at most `MAX_FRAMES + 1`) and the sender.
struct Received {
    frames: Vec<Vec<u8>>,
    peer: String,
}

/// Receives the parts of one message, keeping at most `MAX_FRAMES + 1` of them (one
/// more than allowed, so the core can refuse the message), and the sender's address.
fn recv_request(rep: &zmq::Socket) -> Result<Option<Received>, PublisherError> {
    let mut msg = zmq::Message::new();
    match rep.recv(&mut msg, zmq::DONTWAIT) {
        Ok(()) => {}
        Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => return Ok(None),
        Err(e) => return Err(socket_err("receive a request")(e)),
    }
    let peer = msg.gets("Peer-Address").unwrap_or("unknown").to_owned();
    let mut frames = vec![msg.to_vec()];
    while msg.get_more() {
        // The rest of a message that has started arriving is already queued.
        rep.recv(&mut msg, 0)
            .map_err(socket_err("receive a request part"))?;
        if frames.len() <= MAX_FRAMES {
            frames.push(msg.to_vec());
        }
    }
    Ok(Some(Received { frames, peer }))
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

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_timeout(Duration::ZERO), 0);
        assert_eq!(poll_timeout(Duration::from_micros(1)), 1);
        assert_eq!(poll_timeout(Duration::from_millis(50)), 50);
        assert_eq!(poll_timeout(Duration::from_micros(50_001)), 51);
    }
}
