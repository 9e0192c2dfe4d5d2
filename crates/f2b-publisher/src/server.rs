//! The ZeroMQ side: binds the REP and PUB sockets, then one blocking thread waits in
//! `zmq::poll` on the REP socket and the shutdown socket, with a timeout that ends
//! when the next heartbeat is due, and hands every request to the [`Core`].

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use f2b_common::config::PublisherConfig;
use f2b_common::sockets::{last_endpoint, new_socket, shutdown_socket};
use f2b_common::zmq;
use f2b_common::CancellationToken;
use f2b_proto::{Broadcast, Epoch, MAX_FRAMES};

use crate::core::{Core, Limits};
use crate::PublisherError;

/// How long the PUB socket may keep delivering queued broadcasts after shutdown.
pub const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// The publisher with both sockets bound, not yet serving. [`bind`] then
/// [`Bound::serve`] is what [`crate::run`] does; tests call them separately to learn
/// the real endpoints.
pub struct Bound {
    rep: zmq::Socket,
    publ: zmq::Socket,
    reply_endpoint: String,
    broadcast_endpoint: String,
    heartbeat_interval: Duration,
    core: Core,
}

fn socket_err(what: &'static str) -> impl FnOnce(zmq::Error) -> PublisherError {
    move |source| PublisherError::Socket { what, source }
}

/// A random epoch, so subscribers can tell a restarted publisher apart.
fn random_epoch() -> Result<Epoch, PublisherError> {
    getrandom::u64()
        .map(Epoch)
        .map_err(|e| PublisherError::Random(e.to_string()))
}

/// Creates both sockets and binds them, logs `listening on` with the real
/// endpoints, and picks a random epoch.
pub fn bind(config: &PublisherConfig) -> Result<Bound, PublisherError> {
    bind_with(config, Limits::default())
}

/// [`bind`] with the core's memory limits given (tests use small ones).
pub fn bind_with(config: &PublisherConfig, limits: Limits) -> Result<Bound, PublisherError> {
    if config.legacy.is_some() || config.legacy_broadcast_bind.is_some() {
        tracing::warn!(
            "publisher.legacy and publisher.legacy_broadcast_bind are not implemented by \
             this version and are ignored: fail2ban-zmq-tools requests are refused as malformed"
        );
    }
    let epoch = random_epoch()?;
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
    let reply_endpoint = last_endpoint(&rep);
    let broadcast_endpoint = last_endpoint(&publ);
    tracing::info!(
        reply = %reply_endpoint,
        broadcast = %broadcast_endpoint,
        %epoch,
        "listening on"
    );
    Ok(Bound {
        rep,
        publ,
        reply_endpoint,
        broadcast_endpoint,
        heartbeat_interval: config.heartbeat_interval,
        core: Core::new(epoch, config.ban_time, limits),
    })
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("reply_endpoint", &self.reply_endpoint)
            .field("broadcast_endpoint", &self.broadcast_endpoint)
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

    /// This run's epoch.
    pub fn epoch(&self) -> Epoch {
        self.core.epoch()
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
        if let Err(e) = self.publ.set_linger(linger) {
            tracing::warn!(error = %e, "cannot set the PUB linger; queued broadcasts may be lost");
        }
        drop(self);
        result
    }

    fn serve_loop(&mut self, waker: &zmq::Socket) -> Result<(), PublisherError> {
        let interval = self.heartbeat_interval;
        let mut last_sent = Instant::now();
        loop {
            let due = last_sent + interval;
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
            if items[0].is_readable() && self.serve_one()? {
                last_sent = Instant::now();
            }
            if Instant::now() >= last_sent + interval {
                let hb = self.core.heartbeat(interval);
                self.send_broadcast(&hb)?;
                last_sent = Instant::now();
            }
        }
    }

    /// Receives one request if one is waiting, answers it, broadcasts what the core
    /// says. Returns whether something was broadcast.
    fn serve_one(&mut self) -> Result<bool, PublisherError> {
        let Some(Received { frames, peer }) = recv_request(&self.rep)? else {
            return Ok(false);
        };
        let outcome = self.core.handle(&frames, &peer, now_ms());
        // Broadcast first: an ACK with status `broadcast` then means the event is
        // already queued on the PUB socket.
        let broadcast = match &outcome.broadcast {
            Some(b) => {
                self.send_broadcast(b)?;
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
