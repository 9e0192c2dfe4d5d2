//! Catch-up (the ZeroMQ guide's Clone pattern): while subscribed, ask each
//! publisher's reply socket (`[subscriber] snapshot`) for the bans the cluster holds,
//! page by page, and hand them to the intake together with the broadcasts received
//! meanwhile.
//!
//! Owned by the receive loop: the REQ socket is watched in the same wait as the
//! SUB socket, so broadcasts keep being received (and queued) while a snapshot is
//! fetched.
//!
//! One fetch at a time, one publisher after another. A fetch that fails (no answer
//! within the timeout, a refusal, a reply that makes no sense) releases the
//! broadcasts it queued to the receive loop at once (live events of a confirmed
//! epoch never wait for a retry), and is tried again after a backoff (1 s, 2 s, 4 s ... 60 s) with a new
//! socket; each attempt queues from its own start, so whatever it delivers is
//! consistent. A publisher that answers `unknown_type` (a version without
//! snapshots), or the bare `NAK` of a fail2ban-zmq-tools publisher, is warned about
//! once and not asked again.
//!
//! Every page request carries a fresh random nonce. With `[trust] publisher_key`,
//! a reply (page or refusal) must be two frames, the payload and the publisher's
//! signature over the exact request bytes sent and the payload
//! ([`f2b_proto::auth::verify_snapshot`]): a reply that is not is refused before it
//! is decoded, like a failed fetch (logged, retried after the backoff), and nothing
//! of that snapshot is used. A recorded reply cannot answer a later request (its
//! nonce differs), so a snapshot is always fresh. Even a refusal (`unknown_type`)
//! must be signed to stop the asking.

use std::fmt;
use std::time::{Duration, Instant};

use f2b_common::config::Endpoint;
use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::auth::{verify_snapshot, PublicKey, NONCE_LEN};
use f2b_proto::{
    ActiveBan, Epoch, JailName, NakReason, Request, Sequenced, SnapshotReply, SnapshotRequest,
};

use crate::pending::backoff;
use crate::receiver::recv_frames;
use crate::{Notice, Notices};

/// How long one snapshot page may take to arrive.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bans of one snapshot kept in memory. A snapshot that lists more is
/// cut there (with an error in the log): the bans kept are applied, and no held
/// ban is unbanned for being absent from it (the absence proves nothing).
pub const MAX_SNAPSHOT_BANS: usize = 200_000;

/// Why a resync was started; the `reason=` of the `resync` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResyncReason {
    /// The first connection since the subscriber started.
    Start,
    /// A connection to a publisher was re-established (same epoch).
    Reconnect,
    /// A publisher's epoch changed (it lost its ledger, or another one answers).
    Epoch,
    /// Sequence numbers were skipped: broadcasts were missed.
    Gap,
}

impl ResyncReason {
    /// The value logged as `reason=`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Start => "start",
            ResyncReason::Reconnect => "reconnect",
            ResyncReason::Epoch => "epoch",
            ResyncReason::Gap => "gap",
        }
    }
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A complete snapshot from one publisher, with the broadcasts received while it
/// was fetched (in order of arrival).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resync {
    pub(crate) reason: ResyncReason,
    pub(crate) endpoint: String,
    /// Which snapshot target answered (its index in `[subscriber] snapshot`).
    pub(crate) target: usize,
    /// When its first page was asked for.
    pub(crate) asked: Instant,
    pub(crate) epoch: Epoch,
    /// The first page's sequence number: every broadcast of `epoch` up to it is
    /// reflected in the snapshot.
    pub(crate) seq: u64,
    /// The jails asked for (empty: all).
    pub(crate) jails: Vec<JailName>,
    pub(crate) bans: Vec<ActiveBan>,
    pub(crate) queued: Vec<Sequenced>,
    /// Whether bans were left out ([`MAX_SNAPSHOT_BANS`]): absence from `bans`
    /// then proves nothing.
    pub(crate) truncated: bool,
}

/// What the receive loop must pass on to the intake.
#[derive(Debug)]
pub(crate) enum Out {
    /// A complete resync.
    Resync(Box<Resync>),
    /// Broadcasts queued by a fetch that ended without a snapshot, to deliver as
    /// they are.
    Release(Vec<Sequenced>),
}

#[derive(Debug)]
struct Target {
    endpoint: Endpoint,
    wanted: Option<ResyncReason>,
    attempts: u32,
    next_try: Instant,
    disabled: bool,
}

struct Fetch {
    target: usize,
    reason: ResyncReason,
    req: zmq::Socket,
    /// The request last sent, exactly (the reply's signature covers it).
    sent: Vec<u8>,
    asked: Instant,
    cursor: Option<u64>,
    first: Option<(Epoch, u64)>,
    bans: Vec<ActiveBan>,
    /// Bans left out for [`MAX_SNAPSHOT_BANS`].
    left_out: usize,
    queued: Vec<Sequenced>,
    deadline: Instant,
}

/// Why a fetch failed.
enum Failure {
    /// Worth retrying after a backoff.
    Retry(String),
    /// The publisher does not serve snapshots: never ask it again.
    Unsupported(String),
}

/// The catch-up state of the receive loop.
pub(crate) struct CatchUp {
    targets: Vec<Target>,
    fetch: Option<Fetch>,
    jails: Vec<JailName>,
    timeout: Duration,
    queue_limit: usize,
    /// [`MAX_SNAPSHOT_BANS`] (smaller in tests).
    max_bans: usize,
    /// The publishers' keys; empty: replies are not verified
    /// (`allow_unauthenticated`).
    keys: Vec<PublicKey>,
    notices: Notices,
}

impl fmt::Debug for CatchUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CatchUp")
            .field("targets", &self.targets)
            .field("fetching", &self.fetch.as_ref().map(|f| f.target))
            .finish_non_exhaustive()
    }
}

impl CatchUp {
    pub(crate) fn new(
        endpoints: &[Endpoint],
        jails: Vec<JailName>,
        timeout: Duration,
        queue_limit: usize,
        keys: Vec<PublicKey>,
        notices: Notices,
    ) -> Self {
        let now = Instant::now();
        CatchUp {
            targets: endpoints
                .iter()
                .map(|e| Target {
                    endpoint: e.clone(),
                    wanted: None,
                    attempts: 0,
                    next_try: now,
                    disabled: false,
                })
                .collect(),
            fetch: None,
            jails,
            timeout,
            queue_limit: queue_limit.max(1),
            max_bans: MAX_SNAPSHOT_BANS,
            keys,
            notices,
        }
    }

    /// The snapshot targets still asked (those that did not say they serve no
    /// snapshots).
    pub(crate) fn active_targets(&self) -> Vec<usize> {
        (0..self.targets.len())
            .filter(|i| !self.targets[*i].disabled)
            .collect()
    }

    /// Asks for a resync of every publisher (as soon as its backoff allows). A
    /// fetch under way goes on; another follows it.
    pub(crate) fn trigger(&mut self, reason: ResyncReason) {
        for t in self.targets.iter_mut().filter(|t| !t.disabled) {
            if t.wanted.is_none() {
                t.wanted = Some(reason);
            }
        }
    }

    /// Whether broadcasts are being queued.
    pub(crate) fn fetching(&self) -> bool {
        self.fetch.is_some()
    }

    /// Queues a broadcast received during a fetch. When the queue is full, the
    /// fetch is abandoned and started again after a backoff like a failed one (the
    /// new snapshot will be newer than everything queued): the queue is returned,
    /// to deliver as it is.
    pub(crate) fn queue(&mut self, s: Sequenced, now: Instant) -> Option<Out> {
        let f = self.fetch.as_mut()?;
        f.queued.push(s);
        if f.queued.len() < self.queue_limit {
            return None;
        }
        let f = self.fetch.take()?;
        let t = &mut self.targets[f.target];
        t.attempts = t.attempts.saturating_add(1);
        let delay = backoff(t.attempts);
        t.next_try = now + delay;
        t.wanted.get_or_insert(f.reason);
        tracing::warn!(
            publisher = %t.endpoint,
            queued = f.queued.len(),
            retry_in = ?delay,
            "too many broadcasts while fetching a snapshot (queue_size); delivering them and asking again"
        );
        Some(Out::Release(f.queued))
    }

    /// Abandons a fetch under way (the SUB socket is being recreated); its queue is
    /// returned. The publisher is asked again later.
    pub(crate) fn abandon(&mut self) -> Option<Out> {
        let f = self.fetch.take()?;
        self.targets[f.target].wanted.get_or_insert(f.reason);
        Some(Out::Release(f.queued))
    }

    /// When [`CatchUp::step`] must be called next, if ever.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.fetch {
            Some(f) => Some(f.deadline),
            None => self
                .targets
                .iter()
                .filter(|t| t.wanted.is_some() && !t.disabled)
                .map(|t| t.next_try)
                .min(),
        }
    }

    /// The REQ socket of the fetch under way, to poll.
    pub(crate) fn socket(&self) -> Option<&zmq::Socket> {
        self.fetch.as_ref().map(|f| &f.req)
    }

    /// Times a fetch out, or starts the next one that is due.
    pub(crate) fn step(&mut self, ctx: &zmq::Context, now: Instant) -> Option<Out> {
        if let Some(f) = &self.fetch {
            if now >= f.deadline {
                let why = format!("no answer within {:?}", self.timeout);
                return self.fail(Failure::Retry(why), now);
            }
            return None;
        }
        let i = self
            .targets
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.disabled && t.wanted.is_some() && t.next_try <= now)
            .min_by_key(|(_, t)| t.next_try)
            .map(|(i, _)| i)?;
        let reason = self.targets[i].wanted.take()?;
        let endpoint = self.targets[i].endpoint.clone();
        let req = match open_req(ctx, &endpoint) {
            Ok(r) => r,
            Err(e) => {
                self.targets[i].wanted = Some(reason);
                let t = &mut self.targets[i];
                t.attempts = t.attempts.saturating_add(1);
                let delay = backoff(t.attempts);
                t.next_try = now + delay;
                tracing::warn!(publisher = %endpoint, error = %e, retry_in = ?delay, "snapshot failed, will retry");
                return None;
            }
        };
        let mut f = Fetch {
            target: i,
            reason,
            req,
            sent: Vec::new(),
            asked: now,
            cursor: None,
            first: None,
            bans: Vec::new(),
            left_out: 0,
            queued: Vec::new(),
            deadline: now + self.timeout,
        };
        tracing::debug!(publisher = %endpoint, reason = %reason, "asking for a snapshot");
        match send_page_request(&f.req, &self.jails, None) {
            Ok(sent) => f.sent = sent,
            Err(e) => {
                f.deadline = now;
                self.fetch = Some(f);
                return self.fail(Failure::Retry(format!("send: {e}")), now);
            }
        }
        self.fetch = Some(f);
        None
    }

    /// Reads the reply that arrived on the REQ socket.
    pub(crate) fn readable(&mut self, now: Instant) -> Option<Out> {
        let f = self.fetch.as_mut()?;
        let frames = match recv_frames(&f.req) {
            Ok(Some(frames)) => frames,
            Ok(None) => return None,
            Err(e) => return self.fail(Failure::Retry(format!("receive: {e}")), now),
        };
        let bytes = match (frames.kept.first(), frames.kept.get(1), frames.count) {
            (Some(payload), _, _) if self.keys.is_empty() => payload.clone(),
            (Some(payload), Some(sig), 2) => {
                if !verify_snapshot(&self.keys, &f.sent, payload, sig) {
                    let why = "the reply's signature is not by [trust] publisher_key \
                               (another publisher's key, or a forged or recorded reply): refused";
                    return self.fail(Failure::Retry(why.into()), now);
                }
                payload.clone()
            }
            (_, _, count) => {
                let why = format!(
                    "the reply has {count} frame(s), expected 2 (payload, signature): \
                     not signed, refused (is the publisher older, or without its signing key?)"
                );
                return self.fail(Failure::Retry(why), now);
            }
        };
        let page = match SnapshotReply::decode(&bytes) {
            Ok(SnapshotReply::Page(p)) => p,
            Ok(SnapshotReply::Nak(n)) if n.reason == NakReason::UnknownType => {
                return self.fail(
                    Failure::Unsupported(format!("unknown_type: {}", n.detail)),
                    now,
                )
            }
            Ok(SnapshotReply::Nak(n)) => {
                let why = format!("refused: {} {}", n.reason.code(), n.detail);
                return self.fail(Failure::Retry(why), now);
            }
            Err(_) if bytes.trim_ascii() == b"NAK" => {
                return self.fail(
                    Failure::Unsupported("a fail2ban-zmq-tools publisher (bare NAK)".into()),
                    now,
                )
            }
            Err(e) => return self.fail(Failure::Retry(format!("bad reply: {e}")), now),
        };
        let (epoch, seq) = *f.first.get_or_insert((page.epoch, page.seq));
        if page.epoch != epoch {
            let why = format!(
                "the publisher's epoch changed from {epoch} to {} between pages",
                page.epoch
            );
            return self.fail(Failure::Retry(why), now);
        }
        let room = self.max_bans.saturating_sub(f.bans.len());
        let count = page.bans.len();
        f.bans.extend(page.bans.into_iter().take(room));
        f.left_out = f.left_out.saturating_add(count.saturating_sub(room));
        match page.next {
            Some(next) if f.cursor.is_some_and(|c| next <= c) => {
                let why = format!("the page cursor went back from {:?} to {next}", f.cursor);
                self.fail(Failure::Retry(why), now)
            }
            Some(next) => {
                f.cursor = Some(next);
                f.deadline = now + self.timeout;
                match send_page_request(&f.req, &self.jails, Some(next)) {
                    Ok(sent) => f.sent = sent,
                    Err(e) => return self.fail(Failure::Retry(format!("send: {e}")), now),
                }
                None
            }
            None => {
                let f = self.fetch.take()?;
                let t = &mut self.targets[f.target];
                t.attempts = 0;
                if f.left_out > 0 {
                    tracing::error!(
                        publisher = %t.endpoint,
                        kept = f.bans.len(),
                        left_out = f.left_out,
                        max = self.max_bans,
                        "snapshot lists more bans than this subscriber keeps: the first are applied, \
                         the rest are not, and no ban is unbanned for being absent from it"
                    );
                }
                Some(Out::Resync(Box::new(Resync {
                    reason: f.reason,
                    endpoint: t.endpoint.to_string(),
                    target: f.target,
                    asked: f.asked,
                    epoch,
                    seq,
                    jails: self.jails.clone(),
                    bans: f.bans,
                    queued: f.queued,
                    truncated: f.left_out > 0,
                })))
            }
        }
    }

    fn fail(&mut self, failure: Failure, now: Instant) -> Option<Out> {
        let f = self.fetch.take()?;
        let t = &mut self.targets[f.target];
        match failure {
            Failure::Retry(why) => {
                t.attempts = t.attempts.saturating_add(1);
                let delay = backoff(t.attempts);
                t.next_try = now + delay;
                t.wanted.get_or_insert(f.reason);
                tracing::warn!(
                    publisher = %t.endpoint,
                    error = why.as_str(),
                    retry_in = ?delay,
                    "snapshot failed, will retry"
                );
                self.notices.send(Notice::SnapshotFailed {
                    publisher: t.endpoint.to_string(),
                    error: why,
                });
            }
            Failure::Unsupported(why) => {
                t.disabled = true;
                t.wanted = None;
                tracing::warn!(
                    publisher = %t.endpoint,
                    detail = why.as_str(),
                    "this publisher serves no snapshots (an older version): events missed while disconnected will not be recovered from it"
                );
            }
        }
        // The socket is closed at once (linger 0); the queue goes to the intake.
        drop(f.req);
        Some(Out::Release(f.queued))
    }
}

fn open_req(ctx: &zmq::Context, endpoint: &Endpoint) -> zmq::Result<zmq::Socket> {
    let req = new_socket(ctx, zmq::REQ)?;
    req.connect(endpoint.as_str())?;
    Ok(req)
}

/// Sends a page request with a fresh nonce; returns the bytes sent.
fn send_page_request(
    req: &zmq::Socket,
    jails: &[JailName],
    cursor: Option<u64>,
) -> Result<Vec<u8>, String> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| format!("cannot draw a nonce: {e}"))?;
    let bytes = Request::Snapshot(SnapshotRequest {
        jails: jails.to_vec(),
        cursor,
        nonce: Some(nonce),
    })
    .encode();
    req.send(&bytes, zmq::DONTWAIT).map_err(|e| e.to_string())?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_overflow_backs_off_before_asking_again() {
        let ctx = zmq::Context::new();
        let rep = new_socket(&ctx, zmq::REP).unwrap();
        rep.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = Endpoint::connect(&f2b_common::sockets::last_endpoint(&rep)).unwrap();
        let mut c = CatchUp::new(
            &[endpoint],
            Vec::new(),
            SNAPSHOT_TIMEOUT,
            2,
            Vec::new(),
            Notices::default(),
        );
        c.trigger(ResyncReason::Start);
        let now = Instant::now();
        assert!(c.step(&ctx, now).is_none());
        assert!(c.fetching());
        let s = |seq: u64| Sequenced {
            seq,
            epoch: Epoch(1),
            event: f2b_proto::Event::new(
                f2b_proto::EventId::from_u128(seq.into()),
                f2b_proto::NodeName::new("web2").unwrap(),
                JailName::new("sshd").unwrap(),
                f2b_proto::Action::Ban,
                "203.0.113.1".parse().unwrap(),
                1_763_702_000_000,
            )
            .unwrap(),
        };
        assert!(c.queue(s(1), now).is_none());
        assert!(matches!(c.queue(s(2), now), Some(Out::Release(q)) if q.len() == 2));
        // Not asked again at once: after the first backoff.
        assert!(c.step(&ctx, now).is_none());
        assert!(!c.fetching());
        assert_eq!(c.deadline(), Some(now + backoff(1)));
        assert!(c.step(&ctx, now + backoff(1)).is_none());
        assert!(c.fetching());
    }

    fn ban(n: u8) -> ActiveBan {
        ActiveBan {
            seq: n.into(),
            expires_ms: 4_000_000_000_000,
            event: f2b_proto::Event::new(
                f2b_proto::EventId::from_u128(n.into()),
                f2b_proto::NodeName::new("web2").unwrap(),
                JailName::new("sshd").unwrap(),
                f2b_proto::Action::Ban,
                std::net::IpAddr::from([203, 0, 113, n]),
                1_763_702_000_000,
            )
            .unwrap(),
        }
    }

    #[test]
    fn a_snapshot_over_the_cap_keeps_what_fits_and_says_so() {
        let ctx = zmq::Context::new();
        let rep = new_socket(&ctx, zmq::REP).unwrap();
        rep.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = Endpoint::connect(&f2b_common::sockets::last_endpoint(&rep)).unwrap();
        let mut c = CatchUp::new(
            &[endpoint],
            Vec::new(),
            SNAPSHOT_TIMEOUT,
            100,
            Vec::new(),
            Notices::default(),
        );
        c.max_bans = 3;
        c.trigger(ResyncReason::Start);
        assert!(c.step(&ctx, Instant::now()).is_none());
        let mut out = None;
        for (bans, next) in [
            (vec![ban(1), ban(2)], Some(1)),
            (vec![ban(3), ban(4)], None),
        ] {
            rep.recv_bytes(0).unwrap();
            let mut page = f2b_proto::SnapshotPage::new(Epoch(1), 9);
            for b in bans {
                page.try_push(b).unwrap();
            }
            page.next = next;
            rep.send(SnapshotReply::Page(page).encode(), 0).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let mut items = [c.socket().unwrap().as_poll_item(zmq::POLLIN)];
                zmq::poll(&mut items, 100).unwrap();
                if items[0].is_readable() {
                    break;
                }
                assert!(Instant::now() < deadline, "no reply");
            }
            out = c.readable(Instant::now());
        }
        let Some(Out::Resync(r)) = out else {
            panic!("no resync: {out:?}");
        };
        assert!(r.truncated);
        let seqs: Vec<u64> = r.bans.iter().map(|b| b.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn reasons_print_as_logged() {
        let all = [
            (ResyncReason::Start, "start"),
            (ResyncReason::Reconnect, "reconnect"),
            (ResyncReason::Epoch, "epoch"),
            (ResyncReason::Gap, "gap"),
        ];
        for (r, s) in all {
            assert_eq!(r.to_string(), s);
        }
    }
}
