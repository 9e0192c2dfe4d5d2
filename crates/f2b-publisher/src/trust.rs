//! Who may report, and the publisher's signatures (docs/PROTOCOL.md,
//! "Authentication").
//!
//! [`Trust`] holds the monitors' credentials (`[trust.monitors]`), the replay window
//! (`trust.max_clock_skew`) and the nonces seen within it, and the publisher's
//! signing key (`trust.signing_key_file`). [`Trust::check`] decides whether a
//! report's second frame, a [`RequestAuth`], proves who sent it; the time is
//! injected, so every rule is unit-tested. [`Trust::reply_frames`] and
//! [`Trust::broadcast_frames`] add the reply MAC and the signatures.
//!
//! # Rules, in order
//!
//! 1. No authentication frame: accepted as [`Reporter::Unauthenticated`] only with
//!    `trust.allow_unauthenticated`; else NAK `unauthenticated`.
//! 2. An authentication frame that does not decode, names a credential this
//!    publisher does not hold (unknown, or revoked by deleting it), carries a wrong
//!    MAC, or whose credential is not the event's node: NAK `unauthenticated`. A
//!    frame present is always checked, even with `allow_unauthenticated`.
//! 3. `ts_ms` further than `max_clock_skew` from the publisher's clock, either way:
//!    NAK `replayed` (the detail says to check the node's clock).
//! 4. A nonce already seen for that credential within the window: NAK `replayed`.
//!
//! A NAK to a request whose MAC was right (a credential reporting for another
//! node, rules 3 and 4, and every later rule) is answered with a reply MAC; the
//! others are not (the publisher cannot tell who sent them, and will not MAC what
//! a stranger chose).
//!
//! # The nonce memory and its bound
//!
//! A nonce is remembered, per credential, until the request's `ts_ms` +
//! `max_clock_skew` (and at most about 1/64 of the window longer: nonces are
//! forgotten by the bucket, see `Nonces`): after that rule 3 refuses the request
//! anyway, so forgetting it then never lets a replay through. A reload that widens
//! the window keeps every nonce that much longer; one that narrows it forgets none
//! earlier (the window may widen again). Only requests whose MAC is right are
//! remembered, so only a holder of a credential can fill its memory. Each
//! credential keeps at most [`NONCES_PER_KEY`] nonces: an honest monitor sends one
//! report at a time and waits for its answer (a REQ socket), and the rate limit
//! (`[publisher] rate_limit`, 50 per second by default) keeps it far below that
//! many within a window of a minute or two. When a credential's memory is full, its
//! new reports are refused `rate_limited` (transient: the monitor retries) until
//! older nonces leave the window; no nonce is ever forgotten early. A nonce is kept
//! as a 64-bit keyed hash in a hash set, 9 bytes a slot at a load of 44% to 87%,
//! about 14 bytes on average, so the memory is at most about 1.4 MB per configured
//! monitor (see `Nonces`).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::time::Duration;

use f2b_common::config::TrustConfig;
use f2b_proto::auth::{
    self, MonitorSecret, PublicKey, RequestAuth, SigningKey, MAC_LEN, NONCE_LEN,
};
use f2b_proto::{Broadcast, NakReason, NodeName};

/// The most nonces remembered per credential (see the module's documentation).
pub const NONCES_PER_KEY: usize = 65_536;

/// Who reported an event, as the ledger records it (`reported_by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reporter {
    /// A native report authenticated by this monitor credential (its node name).
    Credential(NodeName),
    /// A native report accepted without authentication
    /// (`trust.allow_unauthenticated`).
    Unauthenticated,
    /// A fail2ban-zmq-tools report (authenticated at most by a plaintext token).
    Legacy,
}

impl Reporter {
    /// The ledger's `reported_by` value: the credential's name, `legacy`, or null.
    pub fn column(&self) -> Option<&str> {
        match self {
            Reporter::Credential(n) => Some(n.as_str()),
            Reporter::Unauthenticated => None,
            Reporter::Legacy => Some("legacy"),
        }
    }
}

impl fmt::Display for Reporter {
    /// The credential's name, `-` (unauthenticated) or `legacy`, for log lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.column().unwrap_or("-"))
    }
}

/// How a reply is authenticated (the frame after its payload).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Seal {
    /// Not at all: one frame.
    #[default]
    None,
    /// [`auth::reply_mac`] under the credential `key`, bound to the request's MAC.
    Mac {
        key: NodeName,
        request_mac: [u8; MAC_LEN],
    },
    /// [`auth::sign_snapshot`] over `request` (the request frame as received), with
    /// the publisher's key (when it has one).
    Snapshot { request: Vec<u8> },
}

/// A report that passed [`Trust::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub reporter: Reporter,
    /// How to authenticate the reply.
    pub seal: Seal,
}

/// A report [`Trust::check`] refused: the NAK's reason and detail, and how to
/// authenticate the NAK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: NakReason,
    pub detail: String,
    pub seal: Seal,
}

/// The nonces seen for one credential, until they leave the window.
///
/// A nonce is kept as a 64-bit tag: SipHash of its 16 bytes under a key drawn at
/// random when the process starts ([`Trust::tag`]). Two different nonces get the
/// same tag with a probability of about n / 2^64 (n the nonces held, at most
/// [`NONCES_PER_KEY`]), which no sender can raise without the key, and the harm of
/// that is a `replayed` refusal, which the monitor answers by signing anew. The
/// tags are already uniformly spread, so the sets index them as they are (no
/// second hash).
///
/// The tags are grouped in buckets by the request's `ts_ms` (`ts_ms / width_ms`),
/// and a whole bucket is forgotten at once, when the window has passed its last
/// millisecond (`until_ms`): a nonce is remembered at least until its own `ts_ms` +
/// `max_clock_skew`, and at most one bucket's width longer. So an entry costs one
/// slot of a hash set of `u64` (8 bytes and a control byte, at a load of 44% to
/// 87%), with no per-nonce expiry record. `width_ms` is a power of two, at least
/// [`MIN_BUCKET_MS`] and at least the window / [`BUCKETS_PER_WINDOW`], so a
/// credential has at most about 2 x [`BUCKETS_PER_WINDOW`] + 2 buckets (requests
/// are accepted with `ts_ms` up to the window away on either side), which a lookup
/// goes through: a replay is refused whatever `ts_ms` it carries.
#[derive(Debug)]
struct Nonces {
    width_ms: u64,
    buckets: Vec<Bucket>,
    /// How many tags the buckets hold.
    held: usize,
    /// The smallest `until_ms` of a bucket (`u64::MAX` when there is none): nothing
    /// is forgotten before.
    next_expiry_ms: u64,
}

/// The tags of the requests whose `ts_ms / width_ms` is `index`.
#[derive(Debug)]
struct Bucket {
    index: u64,
    /// Forget the bucket once the clock is past this: the last `ts_ms` it covers +
    /// the window (+ any widening of the window since).
    until_ms: u64,
    tags: HashSet<u64, BuildHasherDefault<TagHasher>>,
}

/// The hasher of a set of tags: a tag is already a keyed hash, so it is its own.
#[derive(Debug, Default)]
struct TagHasher(u64);

impl Hasher for TagHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the sets hold `u64`); anything else is folded
        // in, so this stays a hash.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Buckets of at least this width (ms).
const MIN_BUCKET_MS: u64 = 1024;

/// The replay window is cut into at least this many buckets (see [`Nonces`]).
const BUCKETS_PER_WINDOW: u64 = 64;

/// The bucket width for a window of `skew_ms` (see [`Nonces`]).
fn bucket_width(skew_ms: u64) -> u64 {
    (skew_ms / BUCKETS_PER_WINDOW)
        .max(MIN_BUCKET_MS)
        .checked_next_power_of_two()
        .unwrap_or(1 << 63)
}

impl Nonces {
    fn new(width_ms: u64) -> Nonces {
        Nonces {
            width_ms,
            buckets: Vec::new(),
            held: 0,
            next_expiry_ms: u64::MAX,
        }
    }

    /// Forgets the buckets the window has passed at `now_ms`.
    fn prune(&mut self, now_ms: u64) {
        if self.next_expiry_ms >= now_ms {
            return;
        }
        let mut next = u64::MAX;
        let mut held = self.held;
        self.buckets.retain(|b| {
            if b.until_ms < now_ms {
                held -= b.tags.len();
                false
            } else {
                next = next.min(b.until_ms);
                true
            }
        });
        self.held = held;
        self.next_expiry_ms = next;
    }

    /// Whether `tag` is held.
    fn contains(&self, tag: u64) -> bool {
        self.buckets.iter().any(|b| b.tags.contains(&tag))
    }

    /// Remembers `tag`, of a request signed at `ts_ms`, for a window of `skew_ms`.
    fn insert(&mut self, tag: u64, ts_ms: u64, skew_ms: u64) {
        let index = ts_ms / self.width_ms;
        let last_ms = index
            .saturating_mul(self.width_ms)
            .saturating_add(self.width_ms - 1);
        let until_ms = last_ms.saturating_add(skew_ms);
        let pos = match self.buckets.iter().position(|b| b.index == index) {
            Some(pos) => pos,
            None => {
                self.buckets.push(Bucket {
                    index,
                    until_ms,
                    tags: HashSet::default(),
                });
                self.buckets.len() - 1
            }
        };
        let bucket = &mut self.buckets[pos];
        bucket.until_ms = bucket.until_ms.max(until_ms);
        self.next_expiry_ms = self.next_expiry_ms.min(bucket.until_ms);
        if bucket.tags.insert(tag) {
            self.held += 1;
        }
    }

    /// The window grew by `more_ms`: every tag is kept that much longer, and the
    /// buckets are merged into buckets of `width_ms` if that is wider (widths are
    /// powers of two, so an old bucket falls into exactly one new one).
    fn widen(&mut self, more_ms: u64, width_ms: u64) {
        for b in &mut self.buckets {
            b.until_ms = b.until_ms.saturating_add(more_ms);
        }
        if width_ms > self.width_ms {
            let shift = (width_ms / self.width_ms).trailing_zeros();
            let mut merged: Vec<Bucket> = Vec::new();
            for mut b in std::mem::take(&mut self.buckets) {
                b.index >>= shift;
                match merged.iter_mut().find(|m| m.index == b.index) {
                    Some(m) => {
                        m.until_ms = m.until_ms.max(b.until_ms);
                        if m.tags.len() < b.tags.len() {
                            std::mem::swap(&mut m.tags, &mut b.tags);
                        }
                        m.tags.extend(b.tags);
                    }
                    None => merged.push(b),
                }
            }
            self.buckets = merged;
            self.width_ms = width_ms;
        }
        self.held = self.buckets.iter().map(|b| b.tags.len()).sum();
        self.next_expiry_ms = self
            .buckets
            .iter()
            .map(|b| b.until_ms)
            .min()
            .unwrap_or(u64::MAX);
    }
}

/// The credentials, the replay window and the signing key.
pub struct Trust {
    monitors: BTreeMap<NodeName, MonitorSecret>,
    allow_unauthenticated: bool,
    skew_ms: u64,
    signing_key: Option<SigningKey>,
    nonces: HashMap<NodeName, Nonces>,
    nonces_per_key: usize,
    /// The bucket width of the nonce memories (see [`Nonces`]): set by the widest
    /// window so far.
    bucket_ms: u64,
    /// The key of the nonce tags (see [`Nonces`]), random per process.
    tag_key: RandomState,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("monitors", &self.monitors.keys().collect::<Vec<_>>())
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .field("skew_ms", &self.skew_ms)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Trust {
    /// From the validated `[trust]` table.
    pub fn new(config: &TrustConfig) -> Trust {
        Trust {
            monitors: config.monitors.clone(),
            allow_unauthenticated: config.allow_unauthenticated,
            skew_ms: millis(config.max_clock_skew),
            signing_key: config.signing_key.clone(),
            nonces: HashMap::new(),
            nonces_per_key: NONCES_PER_KEY,
            bucket_ms: bucket_width(millis(config.max_clock_skew)),
            tag_key: RandomState::new(),
        }
    }

    /// No credentials, no signing key, reports without authentication accepted
    /// (as `trust.allow_unauthenticated = true` with nothing else set): what a
    /// [`crate::Core`] starts with, for tests and tools.
    pub fn open() -> Trust {
        Trust {
            monitors: BTreeMap::new(),
            allow_unauthenticated: true,
            skew_ms: 60_000,
            signing_key: None,
            nonces: HashMap::new(),
            nonces_per_key: NONCES_PER_KEY,
            bucket_ms: bucket_width(60_000),
            tag_key: RandomState::new(),
        }
    }

    /// Takes the credentials, the replay window and `allow_unauthenticated` of a
    /// reloaded `[trust]` (SIGHUP); the signing key stays (changing it needs a
    /// restart). A removed credential is refused from the next report on, and
    /// its nonces are forgotten; a kept one keeps its nonces, so a replay stays
    /// refused across the reload.
    pub fn reconfigure(&mut self, config: &TrustConfig) {
        self.monitors = config.monitors.clone();
        self.allow_unauthenticated = config.allow_unauthenticated;
        let skew_ms = millis(config.max_clock_skew);
        if skew_ms > self.skew_ms {
            // A wider window: each nonce must now be remembered until its ts_ms +
            // the new skew, or a replay could pass in the difference.
            // A narrower one keeps what it holds as it is: the window may widen
            // again.
            let more = skew_ms - self.skew_ms;
            self.bucket_ms = self.bucket_ms.max(bucket_width(skew_ms));
            for n in self.nonces.values_mut() {
                n.widen(more, self.bucket_ms);
            }
        }
        self.skew_ms = skew_ms;
        let monitors = &self.monitors;
        self.nonces.retain(|name, _| monitors.contains_key(name));
    }

    /// Remembers at most `n` nonces per credential (tests use few).
    pub fn with_nonce_limit(mut self, n: usize) -> Trust {
        self.nonces_per_key = n.max(1);
        self
    }

    /// Whether `node` has a credential here.
    pub fn knows(&self, node: &NodeName) -> bool {
        self.monitors.contains_key(node)
    }

    /// How many monitor credentials are held.
    pub fn monitors(&self) -> usize {
        self.monitors.len()
    }

    /// Whether reports without authentication are accepted.
    pub fn allows_unauthenticated(&self) -> bool {
        self.allow_unauthenticated
    }

    /// The public key of the signing key, if there is one.
    pub fn public_key(&self) -> Option<PublicKey> {
        self.signing_key.as_ref().map(SigningKey::public)
    }

    /// Whether broadcasts and snapshot replies are signed.
    pub fn signs(&self) -> bool {
        self.signing_key.is_some()
    }

    /// How many nonces are remembered, over all credentials: for tests and metrics.
    pub fn nonces_held(&self) -> usize {
        self.nonces.values().map(|n| n.held).sum()
    }

    /// Forgets the nonces that left the window at `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        for n in self.nonces.values_mut() {
            n.prune(now_ms);
        }
    }

    /// Checks a report: `payload` is its first frame as received, `auth` its second
    /// frame (if any), `node` the event's node. See the module's documentation for
    /// the rules. The details never quote a secret or a MAC.
    pub fn check(
        &mut self,
        payload: &[u8],
        auth: Option<&[u8]>,
        node: &NodeName,
        now_ms: u64,
    ) -> Result<Checked, Refused> {
        let refused = |reason, detail: String| Refused {
            reason,
            detail,
            seal: Seal::None,
        };
        let Some(frame) = auth else {
            if self.allow_unauthenticated {
                return Ok(Checked {
                    reporter: Reporter::Unauthenticated,
                    seal: Seal::None,
                });
            }
            return Err(refused(
                NakReason::Unauthenticated,
                format!(
                    "no authentication frame: set [trust] secret or secret_file on node {node} \
                     (its credential from [trust.monitors] on the publisher)"
                ),
            ));
        };
        let ra = RequestAuth::decode(frame).map_err(|e| {
            refused(
                NakReason::Unauthenticated,
                format!("the authentication frame is invalid ({e}); is the monitor up to date?"),
            )
        })?;
        let key = &ra.key;
        let Some(secret) = self.monitors.get(key) else {
            return Err(refused(
                NakReason::Unauthenticated,
                format!(
                    "credential {key} is unknown or revoked: add it to [trust.monitors] on the \
                     publisher, or check [node] name on that node"
                ),
            ));
        };
        if !ra.verify(secret, payload) {
            return Err(refused(
                NakReason::Unauthenticated,
                format!(
                    "wrong MAC for credential {key}: the secret in [trust] on node {key} differs \
                     from [trust.monitors] {key} on the publisher"
                ),
            ));
        }
        // From here on the sender holds the secret: the NAKs are MACed.
        let seal = Seal::Mac {
            key: key.clone(),
            request_mac: ra.mac,
        };
        if key != node {
            return Err(Refused {
                reason: NakReason::Unauthenticated,
                detail: format!(
                    "credential {key} may report only for node {key}, not {node}: check [node] \
                     name and the secret on that node"
                ),
                seal,
            });
        }
        let off = ra.ts_ms.abs_diff(now_ms);
        if off > self.skew_ms {
            let way = if ra.ts_ms > now_ms {
                "ahead of"
            } else {
                "behind"
            };
            return Err(Refused {
                reason: NakReason::Replayed,
                detail: format!(
                    "signed at ts_ms {}, {off} ms {way} the publisher's clock (max_clock_skew is \
                     {} ms): check node {key}'s clock (NTP)",
                    ra.ts_ms, self.skew_ms
                ),
                seal,
            });
        }
        let limit = self.nonces_per_key;
        let tag = self.tag(&ra.nonce);
        let width = self.bucket_ms;
        let nonces = self
            .nonces
            .entry(key.clone())
            .or_insert_with(|| Nonces::new(width));
        nonces.prune(now_ms);
        if nonces.contains(tag) {
            return Err(Refused {
                reason: NakReason::Replayed,
                detail: format!(
                    "nonce already seen for credential {key} within max_clock_skew: a replayed \
                     request (a monitor signs every send anew)"
                ),
                seal,
            });
        }
        if nonces.held >= limit {
            return Err(Refused {
                reason: NakReason::RateLimited,
                detail: format!(
                    "more than {limit} reports signed by {key} within the replay window; \
                     send again later"
                ),
                seal,
            });
        }
        nonces.insert(tag, ra.ts_ms, self.skew_ms);
        Ok(Checked {
            reporter: Reporter::Credential(key.clone()),
            seal,
        })
    }

    /// What the nonce memory keeps of `nonce` (see [`Nonces`]).
    fn tag(&self, nonce: &[u8; NONCE_LEN]) -> u64 {
        let mut h = self.tag_key.build_hasher();
        h.write(nonce);
        h.finish()
    }

    /// The frames of a reply whose payload is `payload`: the payload, then the
    /// reply MAC or the snapshot signature that `seal` asks for (none when the
    /// publisher has no signing key, or the credential is gone).
    pub fn reply_frames(&self, payload: Vec<u8>, seal: &Seal) -> Vec<Vec<u8>> {
        let extra = match seal {
            Seal::None => None,
            Seal::Mac { key, request_mac } => self
                .monitors
                .get(key)
                .map(|s| auth::reply_mac(s, request_mac, &payload).to_vec()),
            Seal::Snapshot { request } => self
                .signing_key
                .as_ref()
                .map(|k| auth::sign_snapshot(k, request, &payload).to_vec()),
        };
        let mut frames = vec![payload];
        frames.extend(extra);
        frames
    }

    /// The frames of a broadcast: topic, payload and, with a signing key, the
    /// signature over both.
    pub fn broadcast_frames(&self, b: &Broadcast) -> Vec<Vec<u8>> {
        let (topic, payload) = (b.topic(), b.encode());
        let sig = self
            .signing_key
            .as_ref()
            .map(|k| auth::sign_broadcast(k, &topic, &payload).to_vec());
        let mut frames = vec![topic, payload];
        frames.extend(sig);
        frames
    }
}

#[cfg(test)]
mod tests;
