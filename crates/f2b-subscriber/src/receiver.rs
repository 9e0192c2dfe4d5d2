//! The receive loop: a SUB socket on a blocking thread, liveness, epochs and
//! sequence numbers. Decoded events go to the intake over a channel; nothing here
//! applies anything.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use f2b_common::config::Endpoint;
use f2b_common::sockets::new_socket;
use f2b_common::{zmq, CancellationToken};
use f2b_proto::{event_topic, Broadcast, Epoch, JailName, Sequenced, HEARTBEAT_TOPIC, MAX_FRAMES};
use tokio::sync::mpsc;

use crate::ratelimit::RateLimit;
use crate::{Notice, Notices, SubscriberError};

/// Epochs remembered for sequence tracking.
const MAX_EPOCHS: usize = 16;
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
}

impl ReceiverConfig {
    /// The subscriptions: everything, or heartbeats plus each jail's topic.
    pub(crate) fn topics(&self) -> Vec<Vec<u8>> {
        if self.jails.is_empty() {
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
            missed: if self.track_gaps { missed } else { 0 },
        }
    }
}

/// The link timeout once a publisher announced `interval_ms`.
pub(crate) fn link_timeout(configured: Duration, interval_ms: u64) -> Duration {
    let interval = Duration::from_millis(interval_ms).min(MAX_HEARTBEAT_INTERVAL);
    configured.max(interval * MISSED_HEARTBEATS)
}

fn open(ctx: &zmq::Context, cfg: &ReceiverConfig) -> Result<zmq::Socket, SubscriberError> {
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
    for e in &cfg.endpoints {
        sub.connect(e.as_str())
            .map_err(|source| SubscriberError::Connect {
                endpoint: e.to_string(),
                source,
            })?;
    }
    Ok(sub)
}

/// A multipart message: at most [`MAX_FRAMES`] frames kept, all counted.
struct Frames {
    kept: Vec<Vec<u8>>,
    count: usize,
}

fn recv_frames(sub: &zmq::Socket) -> zmq::Result<Option<Frames>> {
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

/// Why the loop stopped.
enum Stop {
    Shutdown,
    Reopen,
}

/// The receive loop. Returns on shutdown (or when the intake is gone); errors only
/// when the socket cannot be set up at all.
///
/// `shutdown` (from [`f2b_common::sockets::shutdown_socket`]) wakes the poll at
/// once; `token` is checked at each wake-up as well, so the loop also ends if the
/// runtime that forwards the cancellation to `shutdown` is already gone.
pub(crate) fn run(
    ctx: zmq::Context,
    cfg: ReceiverConfig,
    shutdown: zmq::Socket,
    token: CancellationToken,
    tx: mpsc::Sender<Sequenced>,
    notices: Notices,
) -> Result<(), SubscriberError> {
    let mut r = Receiver {
        token,
        publisher: cfg.publisher_label(),
        link: LinkState::new(cfg.endpoints.len() == 1, cfg.jails.is_empty()),
        timeout: cfg.heartbeat_timeout,
        bad: RateLimit::new(Duration::from_secs(10)),
        dead: RateLimit::new(Duration::from_secs(60)),
        cfg,
        tx,
        notices,
    };
    loop {
        let sub = open(&ctx, &r.cfg)?;
        r.link.reset_live();
        tracing::debug!(publisher = %r.publisher, "subscribing");
        match r.session(&sub, &shutdown)? {
            Stop::Shutdown => return Ok(()),
            Stop::Reopen => drop(sub),
        }
    }
}

struct Receiver {
    token: CancellationToken,
    cfg: ReceiverConfig,
    publisher: String,
    link: LinkState,
    timeout: Duration,
    bad: RateLimit,
    dead: RateLimit,
    tx: mpsc::Sender<Sequenced>,
    notices: Notices,
}

impl Receiver {
    /// One socket's life: until shutdown or a dead link.
    fn session(
        &mut self,
        sub: &zmq::Socket,
        shutdown: &zmq::Socket,
    ) -> Result<Stop, SubscriberError> {
        let mut last = Instant::now();
        loop {
            if self.token.is_cancelled() {
                return Ok(Stop::Shutdown);
            }
            let now = Instant::now();
            let deadline = last + self.timeout;
            if now >= deadline {
                if let Some(held) = self.dead.allow() {
                    tracing::warn!(
                        publisher = %self.publisher,
                        timeout = ?self.timeout,
                        held_back = held,
                        "no message from the publisher, reconnecting"
                    );
                }
                self.notices.send(Notice::LinkDead);
                return Ok(Stop::Reopen);
            }
            let wait = i64::try_from((deadline - now).as_millis())
                .unwrap_or(i64::MAX)
                .saturating_add(1);
            let mut items = [
                sub.as_poll_item(zmq::POLLIN),
                shutdown.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, wait) {
                Ok(_) => {}
                Err(zmq::Error::EINTR) => continue,
                Err(source) => return Err(SubscriberError::Poll { source }),
            }
            if items[1].is_readable() {
                return Ok(Stop::Shutdown);
            }
            if !items[0].is_readable() {
                continue;
            }
            loop {
                match recv_frames(sub) {
                    Ok(Some(frames)) => {
                        last = Instant::now();
                        if !self.handle(frames) {
                            return Ok(Stop::Shutdown);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "receive failed, reconnecting");
                        return Ok(Stop::Reopen);
                    }
                }
            }
        }
    }

    fn bad_message(&mut self, error: &dyn std::fmt::Display) {
        if let Some(held) = self.bad.allow() {
            tracing::warn!(error = %error, held_back = held, "bad message dropped");
        }
    }

    /// Handles one message; false when the intake is gone.
    fn handle(&mut self, frames: Frames) -> bool {
        let (Some(topic), Some(payload), 2) =
            (frames.kept.first(), frames.kept.get(1), frames.count)
        else {
            self.bad_message(&format!(
                "expected 2 frames (topic, payload), got {}",
                frames.count
            ));
            return true;
        };
        let msg = match Broadcast::decode(topic, payload) {
            Ok(m) => m,
            Err(e) => {
                self.bad_message(&e);
                return true;
            }
        };
        match msg {
            Broadcast::Heartbeat(h) => {
                self.timeout = link_timeout(self.cfg.heartbeat_timeout, h.interval_ms);
                let obs = self.link.observe(h.epoch, h.seq, false);
                self.report(h.epoch, h.seq, obs);
                true
            }
            Broadcast::Event(s) => {
                let obs = self.link.observe(s.epoch, s.seq, true);
                self.report(s.epoch, s.seq, obs);
                tracing::debug!(
                    seq = s.seq,
                    jail = %s.event.jail,
                    action = %s.event.action,
                    ip = %s.event.ip,
                    node = %s.event.node,
                    id = %s.event.id,
                    "received"
                );
                self.tx.blocking_send(s).is_ok()
            }
        }
    }

    fn report(&self, epoch: Epoch, seq: u64, obs: Observation) {
        if obs.connected {
            tracing::info!(publisher = %self.publisher, epoch = %epoch, seq, "connected");
            self.notices.send(Notice::Connected { epoch });
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_jail_filter() {
        let mut cfg = ReceiverConfig {
            endpoints: vec![],
            jails: vec![],
            heartbeat_timeout: Duration::from_secs(5),
        };
        assert_eq!(cfg.topics(), vec![Vec::<u8>::new()]);
        cfg.jails = vec![JailName::new("sshd").unwrap()];
        assert_eq!(cfg.topics(), vec![b"hb:\0".to_vec(), b"ev:sshd\0".to_vec()]);
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
