//! fail2ban-zmq-tools peers (docs/PROTOCOL.md, "Legacy"): what an accepted legacy
//! report becomes, and what a broadcast event looks like to an old subscriber.
//!
//! The wire format itself (parsing, validation as the old publisher did it,
//! formatting) is [`f2b_proto::legacy`]; this module only holds the publisher's
//! conversions, which [`crate::Core`] applies.

use std::net::IpAddr;

use f2b_proto::legacy::LegacyMessage;
use f2b_proto::{Event, EventId, JailName, NodeName, ProtoError};

/// The old publisher's refusal, sent as the whole reply.
pub const LEGACY_NAK: &str = "NAK";

/// The node name of a legacy host: lower-cased; a trailing dot (legal in the old
/// format, never in a node name) is dropped.
pub fn node_name(host: &str) -> Result<NodeName, ProtoError> {
    NodeName::new(host).or_else(|err| match host.strip_suffix('.') {
        Some(bare) => NodeName::new(bare),
        None => Err(err),
    })
}

/// The native event for an accepted legacy message: a new `id`, the publisher's
/// time `now_ms` (the old format has no time), the address as `inet_aton` read it.
/// Fails when the host is no node name (a 254- or 255-byte name) or the jail no
/// jail name (empty, or longer than 64 bytes).
pub fn to_event(msg: &LegacyMessage, id: EventId, now_ms: u64) -> Result<Event, ProtoError> {
    Event::new(
        id,
        node_name(&msg.host)?,
        JailName::new(&msg.jail)?,
        msg.action,
        IpAddr::V4(msg.ip),
        now_ms,
    )
}

/// Whether an old subscriber can be sent this jail: the old format allows
/// `^[a-zA-Z0-9_-]*$` only (a native jail may hold `|`, which would shift the
/// fields).
fn legacy_jail(jail: &JailName) -> bool {
    jail.as_str()
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The one frame an old subscriber is sent for a broadcast event: the legacy
/// report's own text (`wire`, what the old publisher rebroadcast) for an event that
/// came from an old monitor, else `node|jail|Ban|ip`. `None` for what an old
/// subscriber cannot take: an IPv6 address, a jail outside the old alphabet.
pub fn broadcast_text(event: &Event, wire: Option<&str>) -> Option<String> {
    let IpAddr::V4(v4) = event.ip else {
        return None;
    };
    if let Some(w) = wire {
        return Some(w.to_owned());
    }
    legacy_jail(&event.jail).then(|| {
        f2b_proto::legacy::format(event.node.as_str(), event.jail.as_str(), event.action, v4)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::Action;

    fn msg(text: &str) -> LegacyMessage {
        f2b_proto::legacy::parse(text.as_bytes(), None).unwrap()
    }

    #[test]
    fn legacy_messages_become_events() {
        let e = to_event(
            &msg("Web1.Example.org.|sshd|UnBan|10.1"),
            EventId::from_u128(1),
            5,
        )
        .unwrap();
        assert_eq!(e.node.as_str(), "web1.example.org");
        assert_eq!((e.jail.as_str(), e.action), ("sshd", Action::Unban));
        assert_eq!((e.ip.to_string(), e.time_ms), ("10.0.0.1".into(), 5));
        // Legal in the old format, not natively.
        assert!(to_event(&msg("web1||Ban|10.0.0.1"), EventId::from_u128(1), 5).is_err());
        let long_jail = format!("web1|{}|Ban|10.0.0.1", "j".repeat(65));
        assert!(to_event(&msg(&long_jail), EventId::from_u128(1), 5).is_err());
        let label = "a".repeat(63);
        let host_255 = [&label[..], &label, &label, &label].join(".");
        assert_eq!(host_255.len(), 255);
        let text = format!("{host_255}|sshd|Ban|10.0.0.1");
        assert!(to_event(&msg(&text), EventId::from_u128(1), 5).is_err());
        assert!(to_event(&msg("web1|sshd|Ban|10.0.0.1"), EventId::from_u128(1), 0).is_err());
    }

    #[test]
    fn broadcast_text_forms() {
        let e = |jail: &str, ip: &str| {
            Event::new(
                EventId::from_u128(1),
                NodeName::new("web1").unwrap(),
                JailName::new(jail).unwrap(),
                Action::Ban,
                ip.parse().unwrap(),
                1,
            )
            .unwrap()
        };
        assert_eq!(
            broadcast_text(&e("sshd", "192.0.2.1"), None).as_deref(),
            Some("web1|sshd|Ban|192.0.2.1")
        );
        assert_eq!(
            broadcast_text(&e("sshd", "10.0.0.1"), Some("WEB1|sshd|ban|10.1")).as_deref(),
            Some("WEB1|sshd|ban|10.1")
        );
        assert_eq!(broadcast_text(&e("sshd", "2001:db8::1"), None), None);
        assert_eq!(broadcast_text(&e("a:b", "192.0.2.1"), None), None);
        assert_eq!(broadcast_text(&e("a.b", "192.0.2.1"), None), None);
    }
}
