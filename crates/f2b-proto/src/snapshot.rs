//! Snapshots: the bans the cluster holds now, so a subscriber that was away (or just
//! started) can catch up (the ZeroMQ guide's Clone pattern).
//!
//! A subscriber subscribes first, then asks the publisher's reply socket for a
//! snapshot page by page ([`SnapshotRequest`], answered by [`SnapshotReply`]), applies
//! what it does not have, then applies the broadcasts it queued meanwhile whose
//! sequence number is above the snapshot's [`SnapshotPage::seq`].

use serde_json::{json, Value};

use crate::error::ProtoError;
use crate::message::{Epoch, Nak};
use crate::wire::{event_value, shown, to_bytes, Obj};
use crate::{Event, JailName, NakReason, MAX_MESSAGE_SIZE, PROTOCOL_VERSION};

/// The most jails one snapshot request may name.
pub const MAX_SNAPSHOT_JAILS: usize = 256;

/// A request for one page of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// Only these jails' bans; empty: all.
    pub jails: Vec<JailName>,
    /// Where to continue: the `next` of the previous page; `None` for the first page.
    pub cursor: Option<u64>,
    /// Random, fresh for every request: the publisher's signature on the reply
    /// covers the request bytes, so a recorded reply cannot answer a new request.
    pub nonce: Option<[u8; crate::auth::NONCE_LEN]>,
}

impl SnapshotRequest {
    pub(crate) fn to_value(&self) -> Value {
        json!({
            "v": PROTOCOL_VERSION,
            "type": "snapshot",
            "jails": self.jails.iter().map(|j| j.as_str()).collect::<Vec<_>>(),
            "cursor": self.cursor,
            "nonce": self.nonce.map(hex::encode),
        })
    }

    pub(crate) fn from_obj(obj: &Obj<'_>) -> Result<Self, ProtoError> {
        let jails = match obj.opt_array("jails")? {
            None => Vec::new(),
            Some(items) => {
                if items.len() > MAX_SNAPSHOT_JAILS {
                    return Err(ProtoError::Malformed {
                        detail: format!(
                            "{} jails named, at most {MAX_SNAPSHOT_JAILS}",
                            items.len()
                        ),
                    });
                }
                items
                    .iter()
                    .map(|v| match v.as_str() {
                        Some(s) => JailName::new(s),
                        None => Err(ProtoError::WrongType {
                            field: "jails",
                            expected: "a list of strings",
                        }),
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let nonce = if obj.has("nonce") {
            Some(crate::auth::nonce_field(obj, "nonce")?)
        } else {
            None
        };
        Ok(SnapshotRequest {
            jails,
            cursor: obj.opt_u64("cursor")?,
            nonce,
        })
    }
}

/// One active ban in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveBan {
    /// The sequence number the ban was broadcast with.
    pub seq: u64,
    /// When the cluster stops holding it, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// The ban event as it was broadcast.
    pub event: Event,
}

impl ActiveBan {
    fn to_value(&self) -> Value {
        json!({"seq": self.seq, "expires_ms": self.expires_ms, "event": event_value(&self.event)})
    }
}

/// One page of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPage {
    pub epoch: Epoch,
    /// The last sequence number broadcast when this page was made; the snapshot is
    /// consistent with it (broadcasts above it are newer).
    pub seq: u64,
    pub bans: Vec<ActiveBan>,
    /// The cursor of the next page; `None` on the last page.
    pub next: Option<u64>,
    /// Bytes the encoded page will take, kept up to date by [`Self::try_push`].
    encoded_len: usize,
}

/// A page's encoding with a cursor at its widest, without bans: the fixed part.
fn base_len(epoch: Epoch, seq: u64) -> usize {
    to_bytes(json!({
        "v": PROTOCOL_VERSION, "type": "snapshot", "epoch": epoch.to_string(),
        "seq": seq, "bans": [], "next": crate::MAX_SAFE_INTEGER,
    }))
    .len()
}

impl SnapshotPage {
    /// An empty page.
    pub fn new(epoch: Epoch, seq: u64) -> Self {
        SnapshotPage {
            epoch,
            seq,
            bans: Vec::new(),
            next: None,
            encoded_len: base_len(epoch, seq),
        }
    }

    /// Adds `ban` if the page still fits in [`MAX_MESSAGE_SIZE`]; returns whether it
    /// did. A page always takes at least one ban.
    pub fn try_push(&mut self, ban: ActiveBan) -> Result<(), ActiveBan> {
        let add = to_bytes(ban.to_value()).len() + usize::from(!self.bans.is_empty());
        if !self.bans.is_empty() && self.encoded_len + add > MAX_MESSAGE_SIZE {
            return Err(ban);
        }
        self.encoded_len += add;
        self.bans.push(ban);
        Ok(())
    }
}

/// The answer to a [`SnapshotRequest`]: a page, or a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReply {
    Page(SnapshotPage),
    Nak(Nak),
}

impl SnapshotReply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            SnapshotReply::Page(p) => to_bytes(json!({
                "v": PROTOCOL_VERSION,
                "type": "snapshot",
                "epoch": p.epoch.to_string(),
                "seq": p.seq,
                "bans": p.bans.iter().map(ActiveBan::to_value).collect::<Vec<_>>(),
                "next": p.next,
            })),
            SnapshotReply::Nak(n) => crate::Reply::Nak(n.clone()).encode(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<SnapshotReply, ProtoError> {
        let (obj, kind) = Obj::parse_message(bytes)?;
        match kind.as_str() {
            "snapshot" => {
                let epoch: Epoch = obj.str("epoch")?.parse()?;
                let seq = obj.u64("seq")?.min(crate::MAX_SAFE_INTEGER);
                let mut page = SnapshotPage::new(epoch, seq);
                for item in obj.opt_array("bans")?.unwrap_or_default() {
                    let Value::Object(map) = item else {
                        return Err(ProtoError::WrongType {
                            field: "bans",
                            expected: "a list of objects",
                        });
                    };
                    let o = Obj::from_map(map);
                    let ban = ActiveBan {
                        seq: o.seq("seq")?,
                        expires_ms: o.u64("expires_ms")?,
                        event: o.obj("event")?.event()?,
                    };
                    if ban.event.action != crate::Action::Ban {
                        return Err(ProtoError::Malformed {
                            detail: "a snapshot lists bans only".into(),
                        });
                    }
                    page.encoded_len +=
                        to_bytes(ban.to_value()).len() + usize::from(!page.bans.is_empty());
                    page.bans.push(ban);
                }
                page.next = obj.opt_u64("next")?;
                Ok(SnapshotReply::Page(page))
            }
            "nak" => match crate::Reply::decode(bytes)? {
                crate::Reply::Nak(n) => Ok(SnapshotReply::Nak(n)),
                crate::Reply::Ack(_) | crate::Reply::Replies(_) => Err(ProtoError::UnknownType {
                    found: shown("ack"),
                }),
            },
            _ => Err(ProtoError::UnknownType {
                found: shown(&kind),
            }),
        }
    }

    /// A NAK answering a snapshot request.
    pub fn nak(reason: NakReason, detail: impl Into<String>) -> Self {
        SnapshotReply::Nak(Nak::new(None, reason, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, EventId, NodeName, Request};

    fn ban(i: u128) -> ActiveBan {
        ActiveBan {
            seq: i as u64 + 1,
            expires_ms: 1_763_700_000_000,
            event: Event::new(
                EventId::from_u128(i),
                NodeName::new("web1").unwrap(),
                JailName::new("sshd").unwrap(),
                Action::Ban,
                format!("2001:db8::{:x}", i + 1).parse().unwrap(),
                1_763_600_000_000,
            )
            .unwrap(),
        }
    }

    #[test]
    fn integers_past_2_pow_53_are_refused() {
        for (json, field) in [
            (
                r#"{"v":1,"type":"snapshot","cursor":9007199254740992}"#,
                "cursor",
            ),
            (r#"{"v":1,"type":"snapshot","cursor":9007199254740991}"#, ""),
        ] {
            let r = crate::Request::decode(json.as_bytes());
            if field.is_empty() {
                assert!(r.is_ok(), "{json}: {r:?}");
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains(field) && e.contains("2^53"), "{e}");
            }
        }
    }

    #[test]
    fn request_round_trip() {
        for r in [
            SnapshotRequest {
                jails: vec![],
                cursor: None,
                nonce: None,
            },
            SnapshotRequest {
                jails: vec![JailName::new("sshd").unwrap()],
                cursor: Some(42),
                nonce: Some([0xab; 16]),
            },
        ] {
            let req = Request::Snapshot(r);
            assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }
    }

    #[test]
    fn pages_fill_up_to_the_limit_and_round_trip() {
        let mut page = SnapshotPage::new(Epoch(5), 1000);
        let mut i = 0;
        while page.try_push(ban(i)).is_ok() {
            i += 1;
        }
        assert!(page.bans.len() > 10, "{} bans", page.bans.len());
        page.next = Some(crate::MAX_SAFE_INTEGER);
        let reply = SnapshotReply::Page(page);
        let bytes = reply.encode();
        assert!(bytes.len() <= MAX_MESSAGE_SIZE, "{}", bytes.len());
        assert_eq!(SnapshotReply::decode(&bytes).unwrap(), reply);
    }

    #[test]
    fn nak_and_garbage() {
        let n = SnapshotReply::nak(NakReason::UnknownType, "old publisher");
        assert_eq!(SnapshotReply::decode(&n.encode()).unwrap(), n);
        let unban = {
            let mut b = ban(1);
            b.event.action = Action::Unban;
            b
        };
        let mut page = SnapshotPage::new(Epoch(1), 1);
        page.try_push(unban).unwrap();
        let bytes = SnapshotReply::Page(page).encode();
        assert!(SnapshotReply::decode(&bytes).is_err());
        assert!(SnapshotReply::decode(
            br#"{"v":1,"type":"snapshot","epoch":"0000000000000001","seq":1,"bans":[1]}"#
        )
        .is_err());
    }
}
