//! The messages: requests (monitor to publisher), replies, broadcasts.
//!
//! Every message is one JSON object with `"v"` (the protocol version) and `"type"`.
//! Unknown fields are ignored, so a later version can add optional fields without
//! breaking older peers; see docs/PROTOCOL.md for the exact forms.

use std::fmt;
use std::str::FromStr;

use serde_json::json;

use crate::error::{NakReason, ProtoError};
use crate::event::Event;
use crate::snapshot::SnapshotRequest;
use crate::wire::{event_value, shown, to_bytes, write_event, Obj};
use crate::{EventId, JailName, MAX_DETAIL_LEN, PROTOCOL_VERSION};

/// A request on the REQ/REP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// A monitor reports an event it read from its fail2ban log.
    Report(Event),
    /// A monitor reports several events of its node at once, in the order they
    /// happened: 2 to [`MAX_REPORT_EVENTS`](crate::MAX_REPORT_EVENTS) events, all of
    /// one node. Answered with [`Reply::Replies`] (one answer per event, in order),
    /// or one [`Reply::Nak`] when the request as a whole is refused. Build it with
    /// [`Request::pack`].
    Reports(Vec<Event>),
    /// A subscriber asks for a page of the active bans; answered with a
    /// [`crate::SnapshotReply`].
    Snapshot(SnapshotRequest),
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            // The bytes of their `serde_json::Value` (keys sorted), written
            // directly.
            Request::Report(e) => {
                let mut out = Vec::with_capacity(192);
                out.extend_from_slice(b"{\"event\":");
                write_event(&mut out, e);
                out.extend_from_slice(
                    format!(",\"type\":\"report\",\"v\":{PROTOCOL_VERSION}}}").as_bytes(),
                );
                out
            }
            Request::Reports(events) => {
                let mut out = Vec::with_capacity(64 + 160 * events.len());
                out.extend_from_slice(b"{\"events\":[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_event(&mut out, e);
                }
                out.extend_from_slice(
                    format!("],\"type\":\"reports\",\"v\":{PROTOCOL_VERSION}}}").as_bytes(),
                );
                out
            }
            Request::Snapshot(r) => to_bytes(r.to_value()),
        }
    }

    /// The request that reports the longest prefix of `events` one request may
    /// carry, and how many events that is: up to [`MAX_REPORT_EVENTS`] events of
    /// the first event's node, in at most [`MAX_MESSAGE_SIZE`] bytes, as a
    /// `reports` request; a prefix of one (a lone event, or one too large to share
    /// a request) as a plain `report`, which every publisher understands. `None`
    /// for no events. Nothing waits to fill a request: a caller packs what it has.
    ///
    /// [`MAX_REPORT_EVENTS`]: crate::MAX_REPORT_EVENTS
    /// [`MAX_MESSAGE_SIZE`]: crate::MAX_MESSAGE_SIZE
    pub fn pack(events: &[Event]) -> Option<(Request, usize)> {
        let first = events.first()?;
        let mut size = REPORTS_OVERHEAD;
        let mut n = 0;
        let mut scratch = Vec::with_capacity(192);
        for e in events.iter().take(crate::MAX_REPORT_EVENTS) {
            if e.node != first.node {
                break;
            }
            scratch.clear();
            write_event(&mut scratch, e);
            let len = scratch.len() + usize::from(n > 0);
            if n > 0 && size + len > crate::MAX_MESSAGE_SIZE {
                break;
            }
            size += len;
            n += 1;
        }
        Some(match n {
            1 => (Request::Report(first.clone()), 1),
            _ => (Request::Reports(events[..n].to_vec()), n),
        })
    }

    pub fn decode(bytes: &[u8]) -> Result<Request, ProtoError> {
        let (obj, kind) = Obj::parse_message(bytes)?;
        match kind.as_str() {
            "report" => Ok(Request::Report(obj.obj("event")?.event()?)),
            "reports" => {
                let list = obj
                    .opt_array("events")?
                    .ok_or(ProtoError::MissingField { field: "events" })?;
                if list.len() < 2 || list.len() > crate::MAX_REPORT_EVENTS {
                    return Err(ProtoError::Malformed {
                        detail: format!(
                            "a reports request carries 2 to {} events, not {}",
                            crate::MAX_REPORT_EVENTS,
                            list.len()
                        ),
                    });
                }
                let mut events: Vec<Event> = Vec::with_capacity(list.len());
                for v in list {
                    let serde_json::Value::Object(m) = v else {
                        return Err(ProtoError::WrongType {
                            field: "events",
                            expected: "a list of objects",
                        });
                    };
                    let e = Obj::from_map(m).event()?;
                    if let Some(first) = events.first() {
                        if e.node != first.node {
                            return Err(ProtoError::Malformed {
                                detail: format!(
                                    "a reports request mixes nodes ({} and {})",
                                    shown(first.node.as_str()),
                                    shown(e.node.as_str())
                                ),
                            });
                        }
                    }
                    events.push(e);
                }
                Ok(Request::Reports(events))
            }
            "snapshot" => Ok(Request::Snapshot(SnapshotRequest::from_obj(&obj)?)),
            _ => Err(ProtoError::UnknownType {
                found: shown(&kind),
            }),
        }
    }

    /// The event id of a request that failed to decode, when it can still be read,
    /// so that the NAK can name it. Never fails; never trusts anything else.
    pub fn peek_event_id(bytes: &[u8]) -> Option<EventId> {
        let (obj, _) = Obj::parse_message(bytes).ok()?;
        obj.obj("event").ok()?.event_id("id").ok()
    }
}

/// What the publisher did with an accepted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckStatus {
    /// Broadcast now, with the sequence number in the ACK.
    Broadcast,
    /// The same event id was accepted before; the ACK repeats that answer. Nothing is
    /// broadcast again, except once after a publisher restart, in case the previous
    /// process died between recording and broadcasting it (docs/PROTOCOL.md).
    Duplicate,
    /// Valid, but it changes nothing the cluster does not already know (a ban of an
    /// address already banned in that jail, an unban of one already unbanned, for
    /// instance the echo of a remote ban applied on another node); not broadcast.
    Unchanged,
}

impl AckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Broadcast => "broadcast",
            AckStatus::Duplicate => "duplicate",
            AckStatus::Unchanged => "unchanged",
        }
    }
}

impl FromStr for AckStatus {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        match s {
            "broadcast" => Ok(AckStatus::Broadcast),
            "duplicate" => Ok(AckStatus::Duplicate),
            "unchanged" => Ok(AckStatus::Unchanged),
            _ => Err(ProtoError::Malformed {
                detail: format!("unknown ack status {}", shown(s)),
            }),
        }
    }
}

/// A positive answer to a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: EventId,
    /// The sequence number the event was broadcast with, if it was (also on a
    /// duplicate of a broadcast event).
    pub seq: Option<u64>,
    pub status: AckStatus,
}

/// A refusal. The monitor logs it; it retries only transient reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nak {
    /// The refused event's id, when the request was readable enough to have one.
    pub id: Option<EventId>,
    pub reason: NakReason,
    /// A human-readable explanation, at most [`MAX_DETAIL_LEN`] bytes.
    pub detail: String,
}

impl Nak {
    /// A NAK whose detail is cut to [`MAX_DETAIL_LEN`] bytes at a character boundary.
    pub fn new(id: Option<EventId>, reason: NakReason, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL_LEN {
            let mut cut = MAX_DETAIL_LEN;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        Nak { id, reason, detail }
    }

    /// The NAK for a request that failed to decode.
    pub fn for_error(request: &[u8], err: &ProtoError) -> Self {
        Nak::new(
            Request::peek_event_id(request),
            err.nak_reason(),
            err.to_string(),
        )
    }
}

/// The publisher's answer on the REQ/REP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ack(Ack),
    Nak(Nak),
    /// The answers to a `reports` request, one per event and in its order, each an
    /// [`Reply::Ack`] or a [`Reply::Nak`] (never nested). The encoder shortens NAK
    /// details if that is what it takes to stay within
    /// [`MAX_MESSAGE_SIZE`](crate::MAX_MESSAGE_SIZE).
    Replies(Vec<Reply>),
}

/// Appends an ACK as an element of a `replies` list: the bytes of its
/// [`Reply::item_value`], without building that value.
fn write_ack(out: &mut Vec<u8>, a: &Ack) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = match a.seq {
        Some(seq) => write!(out, "{{\"id\":\"{}\",\"seq\":{seq},", a.id),
        None => write!(out, "{{\"id\":\"{}\",\"seq\":null,", a.id),
    };
    let _ = write!(
        out,
        "\"status\":\"{}\",\"type\":\"ack\"}}",
        a.status.as_str()
    );
}

/// The most bytes of detail each NAK of a `replies` message keeps when the
/// message would otherwise be too large; then none at all.
const SHORT_DETAIL_LEN: usize = 96;

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Replies(items) => {
                // The bytes of `{"v":..,"type":"replies","replies":[..]}` through a
                // `serde_json::Value` (keys sorted), an ACK written directly.
                let encode = |cut: Option<usize>| {
                    let mut out = Vec::with_capacity(64 + 96 * items.len());
                    out.extend_from_slice(b"{\"replies\":[");
                    for (i, r) in items.iter().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        match r {
                            Reply::Ack(a) => write_ack(&mut out, a),
                            other => out.extend_from_slice(&to_bytes(other.item_value(cut))),
                        }
                    }
                    out.extend_from_slice(
                        format!("],\"type\":\"replies\",\"v\":{PROTOCOL_VERSION}}}").as_bytes(),
                    );
                    out
                };
                let mut out = encode(None);
                for cut in [SHORT_DETAIL_LEN, 0] {
                    if out.len() <= crate::MAX_MESSAGE_SIZE {
                        break;
                    }
                    out = encode(Some(cut));
                }
                out
            }
            one => {
                let mut v = one.item_value(None);
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("v".into(), PROTOCOL_VERSION.into());
                }
                to_bytes(v)
            }
        }
    }

    /// An ACK or NAK as a JSON object without `"v"` (an element of a `replies`
    /// list), its detail cut to `cut` bytes if given.
    fn item_value(&self, cut: Option<usize>) -> serde_json::Value {
        match self {
            Reply::Ack(a) => json!({
                "type": "ack",
                "id": a.id.to_string(),
                "seq": a.seq,
                "status": a.status.as_str(),
            }),
            Reply::Nak(n) => {
                let detail = match cut {
                    Some(max) => Nak::new(n.id, n.reason, cut_at(&n.detail, max)).detail,
                    None => n.detail.clone(),
                };
                json!({
                    "type": "nak",
                    "id": n.id.map(|i| i.to_string()),
                    "reason": n.reason.code(),
                    "detail": detail,
                })
            }
            Reply::Replies(_) => json!({"type": "replies"}),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Reply, ProtoError> {
        let (obj, kind) = Obj::parse_message(bytes)?;
        if kind == "replies" {
            let list = obj
                .opt_array("replies")?
                .ok_or(ProtoError::MissingField { field: "replies" })?;
            if list.is_empty() || list.len() > crate::MAX_REPORT_EVENTS {
                return Err(ProtoError::Malformed {
                    detail: format!(
                        "a replies message carries 1 to {} answers, not {}",
                        crate::MAX_REPORT_EVENTS,
                        list.len()
                    ),
                });
            }
            let mut items = Vec::with_capacity(list.len());
            for v in list {
                let serde_json::Value::Object(m) = v else {
                    return Err(ProtoError::WrongType {
                        field: "replies",
                        expected: "a list of objects",
                    });
                };
                let item = Obj::from_map(m);
                let kind = item.str("type")?.to_owned();
                if kind == "replies" {
                    return Err(ProtoError::Malformed {
                        detail: "a replies message inside a replies message".into(),
                    });
                }
                items.push(Reply::from_obj(&item, &kind)?);
            }
            return Ok(Reply::Replies(items));
        }
        Reply::from_obj(&obj, &kind)
    }

    /// An `ack` or `nak` object of type `kind`.
    fn from_obj(obj: &Obj<'_>, kind: &str) -> Result<Reply, ProtoError> {
        match kind {
            "ack" => {
                let seq = match obj.has("seq") {
                    true => Some(obj.seq("seq")?),
                    false => None,
                };
                Ok(Reply::Ack(Ack {
                    id: obj.event_id("id")?,
                    seq,
                    status: obj.str("status")?.parse()?,
                }))
            }
            "nak" => {
                let id = match obj.has("id") {
                    true => Some(obj.event_id("id")?),
                    false => None,
                };
                let code = obj.str("reason")?;
                let reason = NakReason::from_code(code)
                    .ok_or_else(|| ProtoError::InvalidReason { value: shown(code) })?;
                let detail = if obj.has("detail") {
                    obj.str("detail")?
                } else {
                    ""
                };
                Ok(Reply::Nak(Nak::new(id, reason, detail)))
            }
            _ => Err(ProtoError::UnknownType { found: shown(kind) }),
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut_at(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// The bytes of a `reports` request around its list's elements and commas.
const REPORTS_OVERHEAD: usize = r#"{"v":1,"type":"reports","events":[]}"#.len();

/// A publisher instance's identity: random, chosen at each start. A subscriber that
/// sees the epoch change knows the publisher restarted and its sequence numbers
/// started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Epoch {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let ok = s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        match ok {
            true => u64::from_str_radix(s, 16)
                .map(Epoch)
                .map_err(|_| ProtoError::InvalidEpoch { value: shown(s) }),
            false => Err(ProtoError::InvalidEpoch { value: shown(s) }),
        }
    }
}

/// An event as broadcast, with the publisher's sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    /// 1, 2, 3... within one epoch.
    pub seq: u64,
    pub epoch: Epoch,
    pub event: Event,
}

/// Sent by the publisher on the PUB socket when it has sent nothing else for a
/// heartbeat interval. It proves the link alive and carries the last sequence number,
/// so a subscriber can tell that it missed something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The last sequence number broadcast in this epoch (0: none yet).
    pub seq: u64,
    pub epoch: Epoch,
    /// How often the publisher sends heartbeats, in milliseconds.
    pub interval_ms: u64,
}

/// A message on the PUB/SUB socket: a topic frame then a payload frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broadcast {
    Event(Sequenced),
    /// Several events of one jail and one epoch, in increasing sequence order, in
    /// one message (so under one signature). [`pack_events`] makes them.
    Events(EventBatch),
    Heartbeat(Heartbeat),
}

/// Events of one jail and one epoch with strictly increasing sequence numbers, at
/// least one: the content of an `events` broadcast. The constructor checks all of
/// that, so a batch in hand is always one a subscriber accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBatch(Vec<Sequenced>);

impl EventBatch {
    /// Checks that `items` are one jail's, of one epoch, in strictly increasing
    /// `seq` order, and that there is at least one.
    pub fn new(items: Vec<Sequenced>) -> Result<EventBatch, ProtoError> {
        let Some(first) = items.first() else {
            return Err(ProtoError::Malformed {
                detail: "an events broadcast with no events".into(),
            });
        };
        for pair in items.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if b.event.jail != first.event.jail {
                return Err(ProtoError::Malformed {
                    detail: format!(
                        "an events broadcast mixes jails ({} and {})",
                        first.event.jail, b.event.jail
                    ),
                });
            }
            if b.epoch != first.epoch {
                return Err(ProtoError::Malformed {
                    detail: "an events broadcast mixes epochs".into(),
                });
            }
            if b.seq <= a.seq {
                return Err(ProtoError::Malformed {
                    detail: format!(
                        "an events broadcast's sequence numbers must increase ({} then {})",
                        a.seq, b.seq
                    ),
                });
            }
        }
        Ok(EventBatch(items))
    }

    /// The events, in sequence order.
    pub fn items(&self) -> &[Sequenced] {
        &self.0
    }

    /// The events, in sequence order.
    pub fn into_items(self) -> Vec<Sequenced> {
        self.0
    }

    /// Their common jail.
    pub fn jail(&self) -> &JailName {
        &self.0[0].event.jail
    }

    /// Their common epoch.
    pub fn epoch(&self) -> Epoch {
        self.0[0].epoch
    }

    /// The last (highest) sequence number.
    pub fn last_seq(&self) -> u64 {
        self.0[self.0.len() - 1].seq
    }
}

/// Packs events to broadcast, in sequence order, into as few messages as the
/// protocol allows without reordering them: each maximal run of consecutive events
/// of one jail and one epoch becomes `events` messages of at most
/// [`PACKED_MESSAGE_SIZE`](crate::PACKED_MESSAGE_SIZE) bytes (a run of one, an `event`
/// message, understood by every subscriber). The output keeps the input's order,
/// so a subscriber still sees sequence numbers rise across jails. `items` must be
/// in increasing `seq` order within an epoch, as a publisher assigns them; an item
/// out of order starts a new message.
pub fn pack_events(items: Vec<Sequenced>) -> Vec<Broadcast> {
    let mut out = Vec::new();
    let mut run: Vec<Sequenced> = Vec::new();
    let mut run_len = 0;
    for s in items {
        let len = batch_item(&s).len();
        let fits = run.last().is_some_and(|last: &Sequenced| {
            last.event.jail == s.event.jail
                && last.epoch == s.epoch
                && last.seq < s.seq
                && batch_overhead(&s.epoch) + run_len + 1 + len <= crate::PACKED_MESSAGE_SIZE
        });
        if !fits && !run.is_empty() {
            out.push(run_message(std::mem::take(&mut run)));
            run_len = 0;
        }
        run_len += len + usize::from(!run.is_empty());
        run.push(s);
    }
    if !run.is_empty() {
        out.push(run_message(run));
    }
    out
}

fn run_message(mut run: Vec<Sequenced>) -> Broadcast {
    match run.len() {
        1 => Broadcast::Event(run.remove(0)),
        _ => Broadcast::Events(EventBatch(run)),
    }
}

/// One element of an `events` list: `{"event":{...},"seq":N}`, written directly
/// (the same bytes as serialising it through a `serde_json::Value`, without
/// building one: this runs twice per event a publisher broadcasts).
fn batch_item(s: &Sequenced) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    out.extend_from_slice(b"{\"event\":");
    write_event(&mut out, &s.event);
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(s.seq.to_string().as_bytes());
    out.push(b'}');
    out
}

/// The bytes of an `events` payload around its list's elements and commas.
fn batch_overhead(epoch: &Epoch) -> usize {
    batch_prefix(epoch).len() + BATCH_SUFFIX.len()
}

fn batch_prefix(epoch: &Epoch) -> String {
    format!(r#"{{"v":{PROTOCOL_VERSION},"type":"events","epoch":"{epoch}","events":["#)
}

const BATCH_SUFFIX: &str = "]}";

/// The topic frame of heartbeats. A subscriber that filters by jail subscribes to
/// this as well as to [`event_topic`] of each jail.
pub const HEARTBEAT_TOPIC: &[u8] = b"hb:\0";

/// The topic frame of events of `jail`: `ev:<jail>` then a NUL byte, so that a
/// subscription to `sshd` does not also match `sshd-ddos` (ZeroMQ matches prefixes;
/// jail names never contain NUL).
pub fn event_topic(jail: &JailName) -> Vec<u8> {
    let mut t = Vec::with_capacity(jail.as_str().len() + 4);
    t.extend_from_slice(b"ev:");
    t.extend_from_slice(jail.as_str().as_bytes());
    t.push(0);
    t
}

impl Broadcast {
    /// The topic frame this message is sent under.
    pub fn topic(&self) -> Vec<u8> {
        match self {
            Broadcast::Event(s) => event_topic(&s.event.jail),
            Broadcast::Events(b) => event_topic(b.jail()),
            Broadcast::Heartbeat(_) => HEARTBEAT_TOPIC.to_vec(),
        }
    }

    /// The events this message carries, in sequence order (none for a heartbeat).
    pub fn events(&self) -> &[Sequenced] {
        match self {
            Broadcast::Event(s) => std::slice::from_ref(s),
            Broadcast::Events(b) => b.items(),
            Broadcast::Heartbeat(_) => &[],
        }
    }

    /// The payload frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Broadcast::Event(s) => to_bytes(json!({
                "v": PROTOCOL_VERSION,
                "type": "event",
                "seq": s.seq,
                "epoch": s.epoch.to_string(),
                "event": event_value(&s.event),
            })),
            Broadcast::Events(b) => {
                let mut out = batch_prefix(&b.epoch()).into_bytes();
                for (i, s) in b.items().iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&batch_item(s));
                }
                out.extend_from_slice(BATCH_SUFFIX.as_bytes());
                out
            }
            Broadcast::Heartbeat(h) => to_bytes(json!({
                "v": PROTOCOL_VERSION,
                "type": "heartbeat",
                "seq": h.seq,
                "epoch": h.epoch.to_string(),
                "interval_ms": h.interval_ms,
            })),
        }
    }

    /// Decodes a payload frame and checks that it was sent under the right topic.
    pub fn decode(topic: &[u8], payload: &[u8]) -> Result<Broadcast, ProtoError> {
        let (obj, kind) = Obj::parse_message(payload)?;
        let msg = match kind.as_str() {
            "event" => Broadcast::Event(Sequenced {
                seq: obj.seq("seq")?,
                epoch: obj.str("epoch")?.parse()?,
                event: obj.obj("event")?.event()?,
            }),
            "events" => {
                let epoch: Epoch = obj.str("epoch")?.parse()?;
                let list = obj
                    .opt_array("events")?
                    .ok_or(ProtoError::MissingField { field: "events" })?;
                let mut items = Vec::with_capacity(list.len());
                for v in list {
                    let serde_json::Value::Object(m) = v else {
                        return Err(ProtoError::WrongType {
                            field: "events",
                            expected: "a list of objects",
                        });
                    };
                    let item = Obj::from_map(m);
                    items.push(Sequenced {
                        seq: item.seq("seq")?,
                        epoch,
                        event: item.obj("event")?.event()?,
                    });
                }
                Broadcast::Events(EventBatch::new(items)?)
            }
            "heartbeat" => Broadcast::Heartbeat(Heartbeat {
                seq: obj.u64("seq")?.min(crate::MAX_SAFE_INTEGER),
                epoch: obj.str("epoch")?.parse()?,
                interval_ms: obj.opt_u64("interval_ms")?.unwrap_or(0),
            }),
            _ => {
                return Err(ProtoError::UnknownType {
                    found: shown(&kind),
                })
            }
        };
        let expected = msg.topic();
        if topic != expected.as_slice() {
            return Err(ProtoError::TopicMismatch {
                expected: shown(&String::from_utf8_lossy(&expected)),
                found: shown(&String::from_utf8_lossy(topic)),
            });
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, NodeName};

    fn event() -> Event {
        Event::new(
            EventId::from_u128(0x1234),
            NodeName::new("web1").unwrap(),
            JailName::new("sshd").unwrap(),
            Action::Ban,
            "::ffff:203.0.113.5".parse().unwrap(),
            1_763_702_000_123,
        )
        .unwrap()
    }

    /// Requests written directly are the bytes of their `serde_json::Value`.
    #[test]
    fn requests_are_written_as_their_json_value() {
        let events: Vec<Event> = (1..=3).map(|n| event_of("web-1.example.org", n)).collect();
        let report = to_bytes(json!({
            "v": PROTOCOL_VERSION,
            "type": "report",
            "event": event_value(&events[0]),
        }));
        let reports = to_bytes(json!({
            "v": PROTOCOL_VERSION,
            "type": "reports",
            "events": events.iter().map(event_value).collect::<Vec<_>>(),
        }));
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        assert_eq!(
            text(Request::Report(events[0].clone()).encode()),
            text(report)
        );
        assert_eq!(text(Request::Reports(events).encode()), text(reports));
    }

    /// A `replies` message written directly is the bytes of its
    /// `serde_json::Value`, ACKs (with and without seq) and NAKs alike.
    #[test]
    fn replies_are_written_as_their_json_value() {
        let id = |n| EventId::from_u128(n);
        let items = vec![
            Reply::Ack(Ack {
                id: id(1),
                seq: Some(9_007_199_254_740_991),
                status: AckStatus::Broadcast,
            }),
            Reply::Ack(Ack {
                id: id(2),
                seq: None,
                status: AckStatus::Unchanged,
            }),
            Reply::Nak(Nak::new(
                Some(id(3)),
                NakReason::Busy,
                "a \"quoted\" détail",
            )),
            Reply::Nak(Nak::new(None, NakReason::Malformed, "")),
            Reply::Ack(Ack {
                id: id(4),
                seq: Some(1),
                status: AckStatus::Duplicate,
            }),
        ];
        let value = to_bytes(json!({
            "v": PROTOCOL_VERSION,
            "type": "replies",
            "replies": items.iter().map(|r| r.item_value(None)).collect::<Vec<_>>(),
        }));
        let reply = Reply::Replies(items);
        assert_eq!(
            String::from_utf8(reply.encode()).unwrap(),
            String::from_utf8(value).unwrap()
        );
        assert_eq!(Reply::decode(&reply.encode()).unwrap(), reply);
    }

    /// The `events` items written directly are the bytes their `serde_json::Value`
    /// gives.
    #[test]
    fn batch_items_are_written_as_their_json_value() {
        for (jail, ip, action) in [
            ("sshd", "203.0.113.5", Action::Ban),
            ("nginx_ddos-2.x@y+z:w", "2001:db8::1", Action::Unban),
            ("a", "::ffff:192.0.2.1", Action::Ban),
        ] {
            let jail = JailName::new(jail).unwrap();
            let s = Sequenced {
                seq: 9_007_199_254_740_991,
                epoch: Epoch(7),
                event: Event::new(
                    EventId::from_u128(0xfeed_beef),
                    NodeName::new("web-1.example.org").unwrap(),
                    jail,
                    action,
                    ip.parse().unwrap(),
                    1_763_702_000_123,
                )
                .unwrap(),
            };
            let value = to_bytes(json!({"seq": s.seq, "event": event_value(&s.event)}));
            assert_eq!(
                String::from_utf8(batch_item(&s)).unwrap(),
                String::from_utf8(value).unwrap()
            );
        }
    }

    #[test]
    fn request_round_trip() {
        let r = Request::Report(event());
        let bytes = r.encode();
        assert_eq!(Request::decode(&bytes).unwrap(), r);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(r#""ip":"203.0.113.5""#), "{text}");
        assert!(text.contains(r#""v":1"#), "{text}");
    }

    fn event_of(node: &str, n: u128) -> Event {
        Event::new(
            EventId::from_u128(n),
            NodeName::new(node).unwrap(),
            JailName::new("sshd").unwrap(),
            Action::Ban,
            std::net::IpAddr::from([203, 0, 113, (n % 250) as u8]),
            1_763_702_000_123,
        )
        .unwrap()
    }

    #[test]
    fn reports_round_trip() {
        let events: Vec<Event> = (1..=5).map(|n| event_of("web1", n)).collect();
        let r = Request::Reports(events.clone());
        let bytes = r.encode();
        assert!(bytes.len() <= crate::PACKED_MESSAGE_SIZE);
        assert_eq!(Request::decode(&bytes).unwrap(), r);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains(r#""type":"reports""#), "{text}");
    }

    #[test]
    fn pack_takes_what_fits_and_a_lone_event_stays_a_report() {
        assert_eq!(Request::pack(&[]), None);
        let one = [event_of("web1", 1)];
        assert_eq!(
            Request::pack(&one),
            Some((Request::Report(one[0].clone()), 1))
        );
        let many: Vec<Event> = (1..=100).map(|n| event_of("web1", n)).collect();
        let (r, n) = Request::pack(&many).unwrap();
        assert_eq!(n, crate::MAX_REPORT_EVENTS);
        assert_eq!(r, Request::Reports(many[..n].to_vec()));
        // Only one node's events go together; the next node starts a new request.
        let mut mixed: Vec<Event> = (1..=3).map(|n| event_of("web1", n)).collect();
        mixed.push(event_of("web2", 4));
        assert_eq!(Request::pack(&mixed).unwrap().1, 3);
        // The size limit: long node names leave room for fewer events.
        let long = vec!["n".repeat(63); 4].join(".")[..crate::MAX_NODE_LEN].to_owned();
        let big: Vec<Event> = (1..=100).map(|n| event_of(&long, n)).collect();
        let (r, n) = Request::pack(&big).unwrap();
        assert!(n > 1 && n < crate::MAX_REPORT_EVENTS, "{n}");
        let bytes = r.encode();
        assert!(bytes.len() <= crate::MAX_MESSAGE_SIZE, "{}", bytes.len());
        assert_eq!(Request::decode(&bytes).unwrap(), r);
        // Every packed request decodes back to the events it took, in order.
        let mut rest = &big[..];
        let mut seen = Vec::new();
        while let Some((r, n)) = Request::pack(rest) {
            match Request::decode(&r.encode()).unwrap() {
                Request::Reports(e) => seen.extend(e),
                Request::Report(e) => seen.push(e),
                other => panic!("{other:?}"),
            }
            rest = &rest[n..];
        }
        assert_eq!(seen, big);
    }

    #[test]
    fn reports_of_the_wrong_shape_are_refused_with_the_reason() {
        let decode = |events: Vec<Event>| {
            let text = String::from_utf8(Request::Reports(events).encode()).unwrap();
            Request::decode(text.as_bytes())
        };
        for n in [0, 1, crate::MAX_REPORT_EVENTS + 1] {
            let events = (0..n as u128).map(|i| event_of("web1", i)).collect();
            let err = decode(events).unwrap_err();
            assert_eq!(err.nak_reason(), NakReason::Malformed, "{n}: {err}");
            assert!(err.to_string().contains("2 to 32 events"), "{err}");
        }
        let err = decode(vec![event_of("web1", 1), event_of("web2", 2)]).unwrap_err();
        assert!(err.to_string().contains("mixes nodes"), "{err}");
        let err = Request::decode(br#"{"v":1,"type":"reports","events":[1,2]}"#).unwrap_err();
        assert_eq!(err.nak_reason(), NakReason::Malformed, "{err}");
        let err = Request::decode(br#"{"v":1,"type":"reports"}"#).unwrap_err();
        assert!(err.to_string().contains("events"), "{err}");
        // One bad event refuses the request, naming the field.
        let mut text = String::from_utf8(
            Request::Reports(vec![event_of("web1", 1), event_of("web1", 2)]).encode(),
        )
        .unwrap();
        text = text.replacen(r#""ip":"203.0.113.2""#, r#""ip":"nope""#, 1);
        let err = Request::decode(text.as_bytes()).unwrap_err();
        assert_eq!(err.nak_reason(), NakReason::InvalidIp, "{err}");
    }

    #[test]
    fn replies_round_trip_and_always_fit() {
        let r = Reply::Replies(vec![
            Reply::Ack(Ack {
                id: EventId::from_u128(1),
                seq: Some(9),
                status: AckStatus::Broadcast,
            }),
            Reply::Nak(Nak::new(
                Some(EventId::from_u128(2)),
                NakReason::Busy,
                "later",
            )),
        ]);
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        // The worst case: every answer a NAK whose detail is all control characters
        // (six bytes each once escaped). The details are shortened, nothing else.
        let worst: Vec<Reply> = (0..crate::MAX_REPORT_EVENTS as u128)
            .map(|i| {
                Reply::Nak(Nak::new(
                    Some(EventId::from_u128(i)),
                    NakReason::UnsupportedVersion,
                    "\u{1}".repeat(crate::MAX_DETAIL_LEN),
                ))
            })
            .collect();
        let bytes = Reply::Replies(worst.clone()).encode();
        assert!(bytes.len() <= crate::MAX_MESSAGE_SIZE, "{}", bytes.len());
        let Reply::Replies(back) = Reply::decode(&bytes).unwrap() else {
            panic!("not replies");
        };
        assert_eq!(back.len(), worst.len());
        for (b, w) in back.iter().zip(&worst) {
            let (Reply::Nak(b), Reply::Nak(w)) = (b, w) else {
                panic!("{b:?}");
            };
            assert_eq!((b.id, b.reason), (w.id, w.reason));
        }
        // Fits without cutting: the details stay whole.
        let few = Reply::Replies(worst[..2].to_vec());
        assert_eq!(Reply::decode(&few.encode()).unwrap(), few);
    }

    #[test]
    fn replies_of_the_wrong_shape_are_refused() {
        for text in [
            r#"{"v":1,"type":"replies","replies":[]}"#,
            r#"{"v":1,"type":"replies"}"#,
            r#"{"v":1,"type":"replies","replies":[1]}"#,
            r#"{"v":1,"type":"replies","replies":[{"type":"replies","replies":[]}]}"#,
            r#"{"v":1,"type":"replies","replies":[{"type":"event"}]}"#,
        ] {
            assert!(Reply::decode(text.as_bytes()).is_err(), "{text}");
        }
        let many: Vec<String> = (0..=crate::MAX_REPORT_EVENTS)
            .map(|i| {
                format!(
                    r#"{{"type":"nak","reason":"busy","id":"{}"}}"#,
                    EventId::from_u128(i as u128)
                )
            })
            .collect();
        let text = format!(
            r#"{{"v":1,"type":"replies","replies":[{}]}}"#,
            many.join(",")
        );
        assert!(Reply::decode(text.as_bytes()).is_err());
    }

    #[test]
    fn reply_round_trip() {
        for r in [
            Reply::Ack(Ack {
                id: EventId::from_u128(7),
                seq: Some(42),
                status: AckStatus::Broadcast,
            }),
            Reply::Ack(Ack {
                id: EventId::from_u128(7),
                seq: None,
                status: AckStatus::Unchanged,
            }),
            Reply::Nak(Nak::new(None, NakReason::Malformed, "bad")),
            Reply::Nak(Nak::new(
                Some(EventId::from_u128(9)),
                NakReason::InvalidIp,
                "é".repeat(300),
            )),
        ] {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
    }

    #[test]
    fn broadcast_round_trip_and_topic_check() {
        let b = Broadcast::Event(Sequenced {
            seq: 3,
            epoch: Epoch(0xdead_beef),
            event: event(),
        });
        assert_eq!(b.topic(), b"ev:sshd\0");
        assert_eq!(Broadcast::decode(&b.topic(), &b.encode()).unwrap(), b);
        let err = Broadcast::decode(b"ev:other\0", &b.encode()).unwrap_err();
        assert!(matches!(err, ProtoError::TopicMismatch { .. }), "{err}");
        let h = Broadcast::Heartbeat(Heartbeat {
            seq: 0,
            epoch: Epoch(1),
            interval_ms: 1000,
        });
        assert_eq!(Broadcast::decode(HEARTBEAT_TOPIC, &h.encode()).unwrap(), h);
    }

    fn seqd(seq: u64, jail: &str, last_octet: u8) -> Sequenced {
        let mut e = event();
        e.jail = JailName::new(jail).unwrap();
        e.id = EventId::from_u128(u128::from(seq) << 8 | u128::from(last_octet));
        e.ip = std::net::IpAddr::from([203, 0, 113, last_octet]);
        Sequenced {
            seq,
            epoch: Epoch(0xfeed),
            event: e,
        }
    }

    #[test]
    fn events_round_trip_under_their_jails_topic() {
        let b = Broadcast::Events(
            EventBatch::new(vec![
                seqd(4, "sshd", 1),
                seqd(5, "sshd", 2),
                seqd(9, "sshd", 3),
            ])
            .unwrap(),
        );
        assert_eq!(b.topic(), b"ev:sshd\0");
        let bytes = b.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"v":1,"type":"events","epoch":"000000000000feed","events":[{"#),
            "{text}"
        );
        assert_eq!(Broadcast::decode(&b.topic(), &bytes).unwrap(), b);
        assert_eq!(b.events().len(), 3);
        let err = Broadcast::decode(b"ev:nginx\0", &bytes).unwrap_err();
        assert!(matches!(err, ProtoError::TopicMismatch { .. }), "{err}");
    }

    #[test]
    fn events_that_break_the_rules_are_refused() {
        let payload = |items: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({
                "v": 1, "type": "events", "epoch": "000000000000feed", "events": items,
            }))
            .unwrap()
        };
        let item =
            |s: &Sequenced| serde_json::json!({"seq": s.seq, "event": event_value(&s.event)});
        let (a, b, other) = (seqd(4, "sshd", 1), seqd(5, "sshd", 2), seqd(6, "nginx", 3));
        let cases = [
            ("empty", payload(serde_json::json!([]))),
            ("not a list", payload(serde_json::json!({"seq": 1}))),
            (
                "missing",
                br#"{"v":1,"type":"events","epoch":"000000000000feed"}"#.to_vec(),
            ),
            (
                "an item not an object",
                payload(serde_json::json!([item(&a), 7])),
            ),
            (
                "seq repeated",
                payload(serde_json::json!([item(&a), item(&a)])),
            ),
            (
                "seq going down",
                payload(serde_json::json!([item(&b), item(&a)])),
            ),
            (
                "seq 0",
                payload(serde_json::json!([{"seq": 0, "event": event_value(&a.event)}])),
            ),
            (
                "mixed jails",
                payload(serde_json::json!([item(&a), item(&other)])),
            ),
            (
                "bad event",
                payload(serde_json::json!([{"seq": 4, "event": {"ip": "10.1"}}])),
            ),
        ];
        for (what, bytes) in cases {
            assert!(
                Broadcast::decode(b"ev:sshd\0", &bytes).is_err(),
                "{what}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        assert!(EventBatch::new(Vec::new()).is_err());
        assert!(EventBatch::new(vec![a.clone(), other]).is_err());
        let mut later_epoch = b.clone();
        later_epoch.epoch = Epoch(1);
        assert!(EventBatch::new(vec![a, later_epoch]).is_err());
    }

    #[test]
    fn packing_keeps_the_order_and_splits_runs_of_one_jail() {
        let items = vec![
            seqd(1, "sshd", 1),
            seqd(2, "sshd", 2),
            seqd(3, "nginx", 3),
            seqd(4, "sshd", 4),
            seqd(5, "sshd", 5),
            seqd(6, "sshd", 6),
        ];
        let out = pack_events(items.clone());
        let kinds: Vec<(usize, &str)> = out
            .iter()
            .map(|b| {
                let kind = match b {
                    Broadcast::Event(_) => "event",
                    Broadcast::Events(_) => "events",
                    Broadcast::Heartbeat(_) => "heartbeat",
                };
                (b.events().len(), kind)
            })
            .collect();
        assert_eq!(kinds, [(2, "events"), (1, "event"), (3, "events")]);
        let flat: Vec<Sequenced> = out.iter().flat_map(|b| b.events().to_vec()).collect();
        assert_eq!(flat, items);
        for b in &out {
            assert_eq!(Broadcast::decode(&b.topic(), &b.encode()).unwrap(), *b);
        }
        assert!(pack_events(Vec::new()).is_empty());
    }

    #[test]
    fn packing_fills_messages_up_to_the_size_limit() {
        let items: Vec<Sequenced> = (1..=1000)
            .map(|n| seqd(n, "sshd", (n % 250) as u8))
            .collect();
        let out = pack_events(items.clone());
        assert!(out.len() > 1, "1000 events cannot fit one message");
        for (i, b) in out.iter().enumerate() {
            let len = b.encode().len();
            assert!(
                len <= crate::PACKED_MESSAGE_SIZE,
                "message {i}: {len} bytes"
            );
            if i + 1 < out.len() {
                // Full: the next event would not have fitted.
                let next = batch_item(&out[i + 1].events()[0]).len();
                assert!(
                    len + 1 + next > crate::PACKED_MESSAGE_SIZE,
                    "message {i} not full: {len}"
                );
            }
        }
        let flat: Vec<Sequenced> = out.iter().flat_map(|b| b.events().to_vec()).collect();
        assert_eq!(flat, items);
    }

    fn report_with(field: &str, value: serde_json::Value) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&Request::Report(event()).encode())
            .expect("own encoding is JSON");
        v["event"][field] = value;
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn each_invalid_field_has_its_reason() {
        use serde_json::json;
        let cases = [
            ("node", json!("bad node"), NakReason::InvalidNode),
            ("jail", json!("a b"), NakReason::InvalidJail),
            ("ip", json!("10.1"), NakReason::InvalidIp),
            ("ip", json!("1.2.3.0/24"), NakReason::InvalidIp),
            ("action", json!("drop"), NakReason::InvalidAction),
            ("id", json!("nope"), NakReason::InvalidId),
            ("time_ms", json!(0), NakReason::InvalidTime),
            ("time_ms", json!(1u64 << 60), NakReason::InvalidTime),
            ("time_ms", json!("yesterday"), NakReason::Malformed),
            ("node", serde_json::Value::Null, NakReason::Malformed),
        ];
        for (field, value, reason) in cases {
            let bytes = report_with(field, value.clone());
            let err = Request::decode(&bytes).unwrap_err();
            assert_eq!(err.nak_reason(), reason, "{field}={value}: {err}");
            if field != "id" {
                assert_eq!(
                    Nak::for_error(&bytes, &err).id,
                    Some(EventId::from_u128(0x1234))
                );
            }
        }
    }

    #[test]
    fn envelope_errors() {
        let cases: [(&[u8], NakReason); 7] = [
            (b"", NakReason::Malformed),
            (b"web1|sshd|Ban|1.2.3.4", NakReason::Malformed),
            (b"[1,2]", NakReason::Malformed),
            (br#"{"type":"report"}"#, NakReason::Malformed),
            (br#"{"v":2,"type":"report"}"#, NakReason::UnsupportedVersion),
            (br#"{"v":1,"type":"launch"}"#, NakReason::UnknownType),
            (
                br#"{"v":1,"type":"report","event":[]}"#,
                NakReason::Malformed,
            ),
        ];
        for (bytes, reason) in cases {
            let err = Request::decode(bytes).unwrap_err();
            assert_eq!(
                err.nak_reason(),
                reason,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let big = vec![b' '; crate::MAX_MESSAGE_SIZE + 1];
        assert_eq!(
            Request::decode(&big).unwrap_err().nak_reason(),
            NakReason::TooLarge
        );
        let deep = "[".repeat(5000);
        assert!(Request::decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let bytes = report_with("duration_s", serde_json::json!(600));
        assert_eq!(Request::decode(&bytes).unwrap(), Request::Report(event()));
    }

    #[test]
    fn nak_reason_codes_round_trip() {
        for r in NakReason::ALL {
            assert_eq!(NakReason::from_code(r.code()), Some(r));
        }
    }
}
