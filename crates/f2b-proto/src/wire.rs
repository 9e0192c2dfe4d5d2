//! Field extraction from a JSON object with errors that name the field.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::error::{ProtoError, Shown};
use crate::event::{check_time, parse_ip, Event};
use crate::{EventId, JailName, NodeName, MAX_MESSAGE_SIZE, MAX_SAFE_INTEGER, PROTOCOL_VERSION};

/// A decoded JSON object with typed accessors: a whole message (owned), or an
/// object inside one (borrowed from it, not copied).
pub(crate) struct Obj<'a>(Cow<'a, Map<String, Value>>);

impl<'a> Obj<'a> {
    /// Parses `bytes` as one JSON object, refusing oversized input before parsing,
    /// and checks the protocol version.
    pub(crate) fn parse_message(bytes: &[u8]) -> Result<(Obj<'static>, String), ProtoError> {
        if bytes.len() > MAX_MESSAGE_SIZE {
            return Err(ProtoError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_SIZE,
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| ProtoError::Malformed {
            detail: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(ProtoError::Malformed {
                detail: "not a JSON object".into(),
            });
        };
        let obj = Obj(Cow::Owned(map));
        let v = obj.u64("v")?;
        if v != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion {
                found: v,
                supported: PROTOCOL_VERSION,
            });
        }
        let kind = obj.str("type")?.to_owned();
        Ok((obj, kind))
    }

    pub(crate) fn from_map(map: &'a Map<String, Value>) -> Obj<'a> {
        Obj(Cow::Borrowed(map))
    }

    pub(crate) fn opt_array(&self, field: &'static str) -> Result<Option<&[Value]>, ProtoError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(ProtoError::WrongType {
                field,
                expected: "a list",
            }),
        }
    }

    fn get(&self, field: &'static str) -> Result<&Value, ProtoError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Err(ProtoError::MissingField { field }),
            Some(v) => Ok(v),
        }
    }

    pub(crate) fn has(&self, field: &'static str) -> bool {
        !matches!(self.0.get(field), None | Some(Value::Null))
    }

    pub(crate) fn str(&self, field: &'static str) -> Result<&str, ProtoError> {
        self.get(field)?.as_str().ok_or(ProtoError::WrongType {
            field,
            expected: "a string",
        })
    }

    /// An integer field: non-negative and at most 2^53 - 1 (docs/PROTOCOL.md), so
    /// that every JSON implementation reads it exactly.
    pub(crate) fn u64(&self, field: &'static str) -> Result<u64, ProtoError> {
        self.get(field)?
            .as_u64()
            .filter(|&n| n <= MAX_SAFE_INTEGER)
            .ok_or(ProtoError::WrongType {
                field,
                expected: "an integer from 0 to 2^53 - 1",
            })
    }

    /// A time field, any non-negative integer: the caller judges its range with a
    /// reason of its own (`invalid_time`, `replayed`) rather than a type error.
    pub(crate) fn time(&self, field: &'static str) -> Result<u64, ProtoError> {
        self.get(field)?.as_u64().ok_or(ProtoError::WrongType {
            field,
            expected: "a non-negative integer",
        })
    }

    pub(crate) fn opt_u64(&self, field: &'static str) -> Result<Option<u64>, ProtoError> {
        if self.has(field) {
            self.u64(field).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn seq(&self, field: &'static str) -> Result<u64, ProtoError> {
        let seq = self.u64(field)?;
        if seq == 0 || seq > MAX_SAFE_INTEGER {
            return Err(ProtoError::InvalidSequence { value: seq });
        }
        Ok(seq)
    }

    pub(crate) fn obj(&self, field: &'static str) -> Result<Obj<'_>, ProtoError> {
        match self.get(field)? {
            Value::Object(m) => Ok(Obj(Cow::Borrowed(m))),
            _ => Err(ProtoError::WrongType {
                field,
                expected: "an object",
            }),
        }
    }

    pub(crate) fn event_id(&self, field: &'static str) -> Result<EventId, ProtoError> {
        self.str(field)?.parse()
    }

    pub(crate) fn event(&self) -> Result<Event, ProtoError> {
        let id = self.event_id("id")?;
        let node = NodeName::new(self.str("node")?)?;
        let jail = JailName::new(self.str("jail")?)?;
        let action = self.str("action")?.parse()?;
        let ip = parse_ip(self.str("ip")?)?;
        // Out of range is `invalid_time` (its own NAK reason), not a type error.
        let time_ms = self.get("time_ms")?.as_u64().ok_or(ProtoError::WrongType {
            field: "time_ms",
            expected: "a non-negative integer",
        })?;
        let time_ms = check_time(time_ms)?;
        Ok(Event {
            id,
            node,
            jail,
            action,
            ip,
            time_ms,
        })
    }
}

pub(crate) fn event_value(e: &Event) -> Value {
    serde_json::json!({
        "id": e.id.to_string(),
        "node": e.node.as_str(),
        "jail": e.jail.as_str(),
        "action": e.action.as_str(),
        "ip": e.ip.to_string(),
        "time_ms": e.time_ms,
    })
}

/// Appends [`event_value`]`(e)` as JSON to `out`, the same bytes as
/// [`to_bytes`] would give (its keys in serde_json's order, sorted), without
/// building the value.
pub(crate) fn write_event(out: &mut Vec<u8>, e: &Event) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "{{\"action\":\"{}\",\"id\":\"{}\",\"ip\":\"{}\",\"jail\":",
        e.action.as_str(),
        e.id,
        e.ip
    );
    let _ = serde_json::to_writer(&mut *out, e.jail.as_str());
    out.extend_from_slice(b",\"node\":");
    let _ = serde_json::to_writer(&mut *out, e.node.as_str());
    let _ = write!(out, ",\"time_ms\":{}}}", e.time_ms);
}

pub(crate) fn to_bytes(v: Value) -> Vec<u8> {
    // Serialising a Value built from strings and integers cannot fail.
    serde_json::to_vec(&v).unwrap_or_default()
}

pub(crate) fn shown(s: &str) -> Shown {
    Shown::new(s)
}
