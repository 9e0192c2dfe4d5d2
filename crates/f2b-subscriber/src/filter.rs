//! The filter core: decides, for each received event, whether it is applied or
//! skipped. Pure (no I/O, no clock): the caller supplies the machine's addresses.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;

use f2b_proto::{canonical_ip, Event, EventId, NodeName};
use ipnet::IpNet;

/// How many recent event ids are remembered to drop duplicates (an event received
/// twice, for instance from two publishers or after a reconnect).
pub const DEDUP_CAPACITY: usize = 65_536;

/// Why an event was not applied; the `reason=` of the `skipped` log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// The event came from this node (`[node] name`): its fail2ban already did it.
    OwnNode,
    /// The same event id was received recently.
    Duplicate,
    /// The address is in `[subscriber] ignore_ip`.
    IgnoreIp,
    /// The address belongs to this machine.
    LocalAddress,
    /// The address is in the local jail's own `ignoreip` (`banip` would bypass it).
    IgnoreIpOfJail,
    /// A ban whose expiry (as a snapshot told it) has passed.
    Expired,
    /// An unban from one jail while another jail's ban holds the same address in
    /// the same local jail (`ban_jail`): the local ban stays.
    HeldByOtherJail,
}

impl SkipReason {
    /// The value logged as `reason=`.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::OwnNode => "own_node",
            SkipReason::Duplicate => "duplicate",
            SkipReason::IgnoreIp => "ignore_ip",
            SkipReason::LocalAddress => "local_address",
            SkipReason::IgnoreIpOfJail => "ignoreip_of_jail",
            SkipReason::Expired => "expired",
            SkipReason::HeldByOtherJail => "held_by_other_jail",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bounded set of recently seen event ids: the oldest id is forgotten when a new
/// one would exceed the capacity.
#[derive(Debug)]
pub struct RecentIds {
    set: HashSet<EventId>,
    order: VecDeque<EventId>,
    capacity: usize,
}

impl RecentIds {
    pub fn new(capacity: usize) -> Self {
        RecentIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records `id`; returns false if it was already there.
    pub fn insert(&mut self, id: EventId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// The filter: own node, duplicates, `ignore_ip`, and the machine's own addresses.
#[derive(Debug)]
pub struct Filter {
    node: NodeName,
    ignore_ip: Vec<IpNet>,
    local: HashSet<IpAddr>,
    seen: RecentIds,
}

impl Filter {
    pub fn new(node: NodeName, ignore_ip: Vec<IpNet>) -> Self {
        Filter {
            node,
            ignore_ip,
            local: HashSet::new(),
            seen: RecentIds::new(DEDUP_CAPACITY),
        }
    }

    /// Replaces the set of this machine's addresses.
    pub fn set_local_addresses(&mut self, addrs: impl IntoIterator<Item = IpAddr>) {
        self.local = addrs.into_iter().map(canonical_ip).collect();
    }

    /// `None`: apply the event; `Some(reason)`: skip it. Records the event id, so a
    /// second call with the same id says [`SkipReason::Duplicate`].
    pub fn check(&mut self, event: &Event) -> Option<SkipReason> {
        if !self.seen.insert(event.id) {
            return Some(SkipReason::Duplicate);
        }
        if event.node == self.node {
            return Some(SkipReason::OwnNode);
        }
        let ip = canonical_ip(event.ip);
        if self.ignore_ip.iter().any(|n| n.contains(&ip)) {
            return Some(SkipReason::IgnoreIp);
        }
        if self.local.contains(&ip) {
            return Some(SkipReason::LocalAddress);
        }
        None
    }
}

/// This machine's addresses, from the network interfaces.
pub fn machine_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| canonical_ip(i.ip()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::{Action, JailName};

    fn ev(id: u128, node: &str, ip: &str) -> Event {
        Event::new(
            EventId::from_u128(id),
            NodeName::new(node).unwrap(),
            JailName::new("sshd").unwrap(),
            Action::Ban,
            ip.parse().unwrap(),
            1_763_702_000_000,
        )
        .unwrap()
    }

    fn filter() -> Filter {
        let ignore = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "2001:db8:ff::/48"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let mut f = Filter::new(NodeName::new("web1").unwrap(), ignore);
        f.set_local_addresses([
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ]);
        f
    }

    #[test]
    fn applies_foreign_events() {
        let mut f = filter();
        assert_eq!(f.check(&ev(1, "web2", "203.0.113.5")), None);
        assert_eq!(f.check(&ev(2, "web2", "2001:db8::5")), None);
    }

    #[test]
    fn skips_own_node_case_insensitively() {
        let mut f = filter();
        assert_eq!(
            f.check(&ev(1, "WEB1", "203.0.113.5")),
            Some(SkipReason::OwnNode)
        );
    }

    #[test]
    fn skips_ignore_ip_including_mapped_v4() {
        let mut f = filter();
        assert_eq!(
            f.check(&ev(1, "web2", "10.1.2.3")),
            Some(SkipReason::IgnoreIp)
        );
        assert_eq!(
            f.check(&ev(2, "web2", "::ffff:127.0.0.1")),
            Some(SkipReason::IgnoreIp)
        );
        assert_eq!(
            f.check(&ev(3, "web2", "2001:db8:ff:1::9")),
            Some(SkipReason::IgnoreIp)
        );
        assert_eq!(f.check(&ev(4, "web2", "11.0.0.1")), None);
    }

    #[test]
    fn skips_local_addresses_and_follows_refresh() {
        let mut f = filter();
        assert_eq!(
            f.check(&ev(1, "web2", "192.0.2.10")),
            Some(SkipReason::LocalAddress)
        );
        assert_eq!(
            f.check(&ev(2, "web2", "2001:db8::10")),
            Some(SkipReason::LocalAddress)
        );
        f.set_local_addresses(["::ffff:198.51.100.1".parse().unwrap()]);
        assert_eq!(f.check(&ev(3, "web2", "192.0.2.10")), None);
        assert_eq!(
            f.check(&ev(4, "web2", "198.51.100.1")),
            Some(SkipReason::LocalAddress)
        );
    }

    #[test]
    fn skips_duplicates() {
        let mut f = filter();
        assert_eq!(f.check(&ev(1, "web2", "203.0.113.5")), None);
        assert_eq!(
            f.check(&ev(1, "web2", "203.0.113.5")),
            Some(SkipReason::Duplicate)
        );
        assert_eq!(f.check(&ev(2, "web2", "203.0.113.5")), None);
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut r = RecentIds::new(3);
        for i in 0..5 {
            assert!(r.insert(EventId::from_u128(i)));
        }
        assert_eq!(r.len(), 3);
        // 0 and 1 were forgotten, 4 is remembered.
        assert!(r.insert(EventId::from_u128(0)));
        assert!(!r.insert(EventId::from_u128(4)));
    }

    #[test]
    fn machine_addresses_include_loopback() {
        let addrs = machine_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.is_loopback()), "{addrs:?}");
    }
}
