//! The publisher's decisions, without I/O: request frames, the peer's address and the
//! time in, a reply and at most one broadcast out.
//!
//! [`Core::handle`] is the whole policy: validation, reserved addresses, time
//! sanity, duplicate ids, cluster-state deduplication and sequence numbers. The
//! ZeroMQ loop in [`crate::server`] only moves bytes to and from it, so every rule
//! here is tested without sockets, and later stages (authentication, rate limits,
//! an allowlist, a persistent ledger, snapshots, legacy messages) slot in as further
//! steps of `handle` or as consumers of its [`Outcome`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use f2b_proto::{
    Ack, AckStatus, Action, Broadcast, Epoch, Event, Heartbeat, Nak, NakReason, Reply, Request,
    Sequenced, MAX_FRAMES, MAX_SAFE_INTEGER,
};

use crate::memory::{BanState, ClusterState, RecentIds};

/// How many event ids the publisher remembers for duplicate detection.
pub const RECENT_IDS: usize = 100_000;

/// How many (jail, address) states the publisher remembers.
pub const CLUSTER_STATES: usize = 100_000;

/// How far an event's time may be ahead of the publisher's clock. Beyond it the
/// event is refused with `invalid_time`: its node's clock is wrong, or the report is
/// forged. Past times are accepted (a monitor may send a backlog after an outage).
pub const MAX_FUTURE: Duration = Duration::from_secs(24 * 60 * 60);

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            recent_ids: RECENT_IDS,
            cluster_states: CLUSTER_STATES,
            max_future: MAX_FUTURE,
        }
    }
}

/// What to do with one request: the reply to send (always exactly one) and the
/// message to broadcast, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Reply,
    pub broadcast: Option<Broadcast>,
}

impl Outcome {
    fn reply(reply: Reply) -> Self {
        Outcome {
            reply,
            broadcast: None,
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

/// The publisher's state machine. One instance per publisher process (one epoch).
pub struct Core {
    epoch: Epoch,
    /// The last sequence number broadcast (0: none yet).
    last_seq: u64,
    ids: RecentIds,
    state: ClusterState,
    max_future_ms: u64,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("epoch", &self.epoch)
            .field("last_seq", &self.last_seq)
            .field("recent_ids", &self.ids.len())
            .field("cluster_states", &self.state.len())
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Core {
    /// A core for `epoch` that considers an address banned for `ban_time` after the
    /// ban was accepted.
    pub fn new(epoch: Epoch, ban_time: Duration, limits: Limits) -> Self {
        Core {
            epoch,
            last_seq: 0,
            ids: RecentIds::new(limits.recent_ids),
            state: ClusterState::new(limits.cluster_states, millis(ban_time)),
            max_future_ms: millis(limits.max_future),
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The last sequence number broadcast in this epoch (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// How many event ids and (jail, address) states are held: for tests and
    /// metrics.
    pub fn memory_len(&self) -> (usize, usize) {
        (self.ids.len(), self.state.len())
    }

    /// The heartbeat to broadcast now.
    pub fn heartbeat(&self, interval: Duration) -> Broadcast {
        Broadcast::Heartbeat(Heartbeat {
            seq: self.last_seq,
            epoch: self.epoch,
            interval_ms: millis(interval),
        })
    }

    /// Handles one request: the message's `frames` as received, the sender's
    /// address (for logs; later for rate limits and authentication) and the
    /// current time in milliseconds since the Unix epoch. Never panics, whatever the
    /// bytes.
    pub fn handle<F: AsRef<[u8]>>(&mut self, frames: &[F], peer: &str, now_ms: u64) -> Outcome {
        let outcome = self.decide(frames, now_ms);
        if let Reply::Nak(nak) = &outcome.reply {
            match nak.id {
                Some(id) => tracing::warn!(
                    reason = %nak.reason, %peer, detail = nak.detail.as_str(), %id, "rejected"
                ),
                None => {
                    tracing::warn!(reason = %nak.reason, %peer, detail = nak.detail.as_str(), "rejected")
                }
            }
        }
        outcome
    }

    fn decide<F: AsRef<[u8]>>(&mut self, frames: &[F], now_ms: u64) -> Outcome {
        // The first frame is the request. Frames 2..=MAX_FRAMES are reserved for
        // authentication and ignored for now; more than that is refused.
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
            Request::Report(event) => self.report(event, now_ms),
            // A request type f2b-proto knows but this publisher does not serve.
            #[allow(unreachable_patterns)]
            _ => nak(
                Request::peek_event_id(first),
                NakReason::UnknownType,
                "request type not served by this publisher",
            ),
        }
    }

    fn report(&mut self, event: Event, now_ms: u64) -> Outcome {
        let id = event.id;
        if let Some(range) = reserved(event.ip) {
            return nak(
                Some(id),
                NakReason::Forbidden,
                format!("{} is {range} and is never banned cluster-wide", event.ip),
            );
        }
        let limit = now_ms.saturating_add(self.max_future_ms);
        if event.time_ms > limit {
            return nak(
                Some(id),
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
            tracing::info!(%id, jail = %event.jail, ip = %event.ip, node = %event.node, seq, "duplicate");
            return ack(id, seq, AckStatus::Duplicate);
        }
        let wanted = match event.action {
            Action::Ban => BanState::Banned,
            Action::Unban => BanState::Unbanned,
        };
        // An unban of an unknown (jail, address) is broadcast: the publisher may have
        // restarted or forgotten, and an unban is harmless where nothing is banned.
        if self.state.get(&event.jail, event.ip, now_ms) == Some(wanted) {
            tracing::debug!(%id, jail = %event.jail, ip = %event.ip, node = %event.node, action = %event.action, "unchanged");
            self.ids.insert(id, None);
            return ack(id, None, AckStatus::Unchanged);
        }
        let Some(seq) = self
            .last_seq
            .checked_add(1)
            .filter(|s| *s <= MAX_SAFE_INTEGER)
        else {
            return nak(
                Some(id),
                NakReason::Busy,
                "sequence numbers exhausted; restart the publisher",
            );
        };
        self.last_seq = seq;
        self.state.set(&event.jail, event.ip, wanted, now_ms);
        self.ids.insert(id, Some(seq));
        tracing::info!(
            seq,
            jail = %event.jail,
            action = %event.action,
            ip = %event.ip,
            node = %event.node,
            %id,
            "broadcast"
        );
        Outcome {
            reply: Reply::Ack(Ack {
                id,
                seq: Some(seq),
                status: AckStatus::Broadcast,
            }),
            broadcast: Some(Broadcast::Event(Sequenced {
                seq,
                epoch: self.epoch,
                event,
            })),
        }
    }
}

fn nak(id: Option<f2b_proto::EventId>, reason: NakReason, detail: impl Into<String>) -> Outcome {
    Outcome::reply(Reply::Nak(Nak::new(id, reason, detail)))
}

fn ack(id: f2b_proto::EventId, seq: Option<u64>, status: AckStatus) -> Outcome {
    Outcome::reply(Reply::Ack(Ack { id, seq, status }))
}

#[cfg(test)]
mod tests;
