//! The event: one Ban or Unban that happened on one node.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use uuid::Uuid;

use crate::error::{ProtoError, Shown};
use crate::names::{JailName, NodeName};
use crate::MAX_SAFE_INTEGER;

/// What happened to the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Ban,
    Unban,
}

impl Action {
    /// The wire form: `"ban"` or `"unban"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Ban => "ban",
            Action::Unban => "unban",
        }
    }
}

impl FromStr for Action {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        match s {
            "ban" => Ok(Action::Ban),
            "unban" => Ok(Action::Unban),
            _ => Err(ProtoError::InvalidAction {
                value: Shown::new(s),
            }),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A unique event id, chosen by the monitor that read the event (a random UUID).
/// The publisher drops a second report with an id it has seen recently, which makes
/// the monitor's at-least-once resending safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// An id from 128 bits (the monitor passes random ones).
    pub fn from_u128(v: u128) -> Self {
        EventId(Uuid::from_u128(v))
    }

    /// The id as 128 bits.
    pub fn as_u128(self) -> u128 {
        self.0.as_u128()
    }
}

impl FromStr for EventId {
    type Err = ProtoError;
    /// Accepts the hyphenated UUID form only (`8-4-4-4-12` hex digits, any case).
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        let bad = || ProtoError::InvalidEventId {
            value: Shown::new(s),
        };
        if s.len() != 36 {
            return Err(bad());
        }
        Uuid::try_parse(s).map(EventId).map_err(|_| bad())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// The canonical form of an address: an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`)
/// is its IPv4 address; everything else is unchanged. Display of the result is the
/// canonical text (IPv6 lower-case and compressed, as fail2ban logs it).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Parses an IP address strictly (no host names, CIDR, scope ids, short IPv4 forms or
/// leading zeros) and returns it in canonical form.
pub fn parse_ip(s: &str) -> Result<IpAddr, ProtoError> {
    IpAddr::from_str(s)
        .map(canonical_ip)
        .map_err(|_| ProtoError::InvalidIp {
            value: Shown::new(s),
        })
}

/// One Ban or Unban, as a monitor reports it and a publisher broadcasts it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event {
    /// Unique per event; the key for duplicate detection.
    pub id: EventId,
    /// The node whose fail2ban banned or unbanned.
    pub node: NodeName,
    /// The jail on that node.
    pub jail: JailName,
    pub action: Action,
    /// Always canonical (see [`canonical_ip`]).
    pub ip: IpAddr,
    /// When it happened, in milliseconds since the Unix epoch (UTC).
    pub time_ms: u64,
}

impl Event {
    /// Builds an event, canonicalising the address and checking the time.
    pub fn new(
        id: EventId,
        node: NodeName,
        jail: JailName,
        action: Action,
        ip: IpAddr,
        time_ms: u64,
    ) -> Result<Self, ProtoError> {
        check_time(time_ms)?;
        Ok(Event {
            id,
            node,
            jail,
            action,
            ip: canonical_ip(ip),
            time_ms,
        })
    }
}

pub(crate) fn check_time(time_ms: u64) -> Result<u64, ProtoError> {
    if time_ms == 0 || time_ms > MAX_SAFE_INTEGER {
        return Err(ProtoError::InvalidTime { value: time_ms });
    }
    Ok(time_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ips_are_canonical() {
        assert_eq!(
            parse_ip("::ffff:192.0.2.1").unwrap().to_string(),
            "192.0.2.1"
        );
        assert_eq!(
            parse_ip("2001:DB8:0:0::DEAD:BEEF").unwrap().to_string(),
            "2001:db8::dead:beef"
        );
        for bad in [
            "10.1",
            "010.1.1.1",
            "1.2.3.0/24",
            " 192.0.2.10",
            "fe80::1%eth0",
            "not_an_ip",
            "",
            "example.org",
        ] {
            assert!(parse_ip(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_ids() {
        let id: EventId = "6F9619FF-8B86-D011-B42D-00CF4FC964FF".parse().unwrap();
        assert_eq!(id.to_string(), "6f9619ff-8b86-d011-b42d-00cf4fc964ff");
        for bad in [
            "6f9619ff8b86d011b42d00cf4fc964ff",
            "{6f9619ff-8b86-d011-b42d-00cf4fc964ff}",
            "x",
            "",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn actions() {
        assert_eq!("ban".parse::<Action>().unwrap(), Action::Ban);
        assert_eq!("unban".parse::<Action>().unwrap(), Action::Unban);
        for bad in ["Ban", "BAN", "unBan", "drop", ""] {
            assert!(bad.parse::<Action>().is_err());
        }
    }
}
