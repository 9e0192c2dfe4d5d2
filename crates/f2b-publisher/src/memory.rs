//! The publisher's bounded memories: the event ids it answered recently and the
//! cluster's ban state per (jail, address).
//!
//! Both are filled by the network, so both have a fixed capacity and forget their
//! oldest entries first; forgetting only weakens deduplication (a forgotten event is
//! broadcast again, which subscribers tolerate), it never loses a ban.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;

use f2b_proto::{EventId, JailName};

/// The answers given to the last `capacity` accepted event ids: the sequence number
/// each was broadcast with, or `None` when it was not broadcast (unchanged); and for
/// each, whether this process may not have broadcast it (see [`Self::insert_unsent`]).
#[derive(Debug)]
pub struct RecentIds {
    capacity: usize,
    answers: HashMap<EventId, Answer>,
    /// Insertion order, oldest first; an id is inserted once, so this is exact.
    order: VecDeque<EventId>,
}

#[derive(Debug, Clone, Copy)]
struct Answer {
    seq: Option<u64>,
    unsent: bool,
}

impl RecentIds {
    /// Remembers at most `capacity` ids (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentIds {
            capacity,
            answers: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The sequence number `id` was answered with, if it is remembered.
    pub fn get(&self, id: &EventId) -> Option<Option<u64>> {
        self.answers.get(id).map(|a| a.seq)
    }

    /// Remembers the answer for `id`, forgetting the oldest id when full. An id
    /// already remembered keeps its first answer.
    pub fn insert(&mut self, id: EventId, seq: Option<u64>) {
        self.add(id, seq, false);
    }

    /// [`Self::insert`] for an event this process has not broadcast itself (one
    /// read back from the ledger at start: the previous process may have crashed
    /// between committing and broadcasting it).
    pub fn insert_unsent(&mut self, id: EventId, seq: Option<u64>) {
        self.add(id, seq, true);
    }

    /// Whether `id` is remembered as possibly not broadcast.
    pub fn is_unsent(&self, id: &EventId) -> bool {
        self.answers.get(id).is_some_and(|a| a.unsent)
    }

    /// Records whether `id` (if remembered) may not have been broadcast: `false`
    /// once it has been broadcast again, `true` when a broadcast failed.
    pub fn set_unsent(&mut self, id: &EventId, unsent: bool) {
        if let Some(a) = self.answers.get_mut(id) {
            a.unsent = unsent;
        }
    }

    fn add(&mut self, id: EventId, seq: Option<u64>, unsent: bool) {
        if self.answers.contains_key(&id) {
            return;
        }
        while self.order.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.answers.remove(&old);
                }
                None => break,
            }
        }
        self.answers.insert(id, Answer { seq, unsent });
        self.order.push_back(id);
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }
}

/// What the cluster was last told about a (jail, address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BanState {
    Banned,
    Unbanned,
}

#[derive(Debug)]
struct Entry {
    state: BanState,
    /// Until when the state is held, in ms since the Unix epoch: a ban's
    /// `expires_ms`, an unban's acceptance plus `ban_time`.
    until_ms: u64,
    /// Position in [`ClusterState::order`].
    stamp: u64,
}

type Key = (JailName, IpAddr);

/// The cluster's state per (jail, address): the last change broadcast and until
/// when it holds.
///
/// Each change is remembered until its own end, which the caller gives: a ban
/// until it expires (the ledger's `expires_ms`, so that a restart with another
/// `ban_time` keeps the ledger's answer), an unban for `ban_time` (after that it no
/// longer needs deduplicating). At most `capacity` entries are kept; beyond that the
/// least recently changed is forgotten.
#[derive(Debug)]
pub struct ClusterState {
    capacity: usize,
    entries: HashMap<Key, Entry>,
    /// Entries by stamp, least recently changed first.
    order: BTreeMap<u64, Key>,
    next_stamp: u64,
}

impl ClusterState {
    /// Keeps at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        ClusterState {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// The state of (jail, ip) at `now_ms`; `None` when unknown or expired.
    pub fn get(&self, jail: &JailName, ip: IpAddr, now_ms: u64) -> Option<BanState> {
        let entry = self.entries.get(&(jail.clone(), ip))?;
        (now_ms < entry.until_ms).then_some(entry.state)
    }

    /// Records that (jail, ip) changed to `state`, held until `until_ms`, then
    /// forgets what expired at `now_ms` or does not fit.
    pub fn set(
        &mut self,
        jail: &JailName,
        ip: IpAddr,
        state: BanState,
        until_ms: u64,
        now_ms: u64,
    ) {
        let key = (jail.clone(), ip);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some(old) = self.entries.insert(
            key.clone(),
            Entry {
                state,
                until_ms,
                stamp,
            },
        ) {
            self.order.remove(&old.stamp);
        }
        self.order.insert(stamp, key);
        self.prune(now_ms);
    }

    /// Forgets the least recently changed entries while there are too many or they
    /// have expired. Stops at the first live one, so each call does work only for
    /// what it removes (an expired entry behind a live one, which only happens
    /// after a `ban_time` change, waits for it; [`Self::get`] ignores it meanwhile).
    pub fn prune(&mut self, now_ms: u64) {
        while let Some(entry) = self.order.first_entry() {
            let over = self.entries.len() > self.capacity;
            let expired = self
                .entries
                .get(entry.get())
                .is_none_or(|e| now_ms >= e.until_ms);
            if !over && !expired {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
        }
    }

    /// How many entries are held (some may have expired and not been pruned yet).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(s: &str) -> JailName {
        JailName::new(s).unwrap()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xC000_0200 + n))
    }

    #[test]
    fn recent_ids_are_bounded_and_forget_the_oldest() {
        let mut ids = RecentIds::new(3);
        for n in 0..10u128 {
            ids.insert(EventId::from_u128(n), Some(n as u64 + 1));
            assert!(ids.len() <= 3);
        }
        assert_eq!(ids.len(), 3);
        assert_eq!(ids.order.len(), 3);
        assert_eq!(ids.get(&EventId::from_u128(6)), None);
        assert_eq!(ids.get(&EventId::from_u128(7)), Some(Some(8)));
        assert_eq!(ids.get(&EventId::from_u128(9)), Some(Some(10)));
    }

    #[test]
    fn unsent_ids_are_flagged_until_cleared() {
        let mut ids = RecentIds::new(10);
        ids.insert_unsent(EventId::from_u128(1), Some(5));
        ids.insert(EventId::from_u128(2), Some(6));
        assert!(ids.is_unsent(&EventId::from_u128(1)));
        assert!(!ids.is_unsent(&EventId::from_u128(2)));
        assert!(!ids.is_unsent(&EventId::from_u128(3)));
        ids.set_unsent(&EventId::from_u128(1), false);
        ids.set_unsent(&EventId::from_u128(2), true);
        ids.set_unsent(&EventId::from_u128(3), true);
        assert!(!ids.is_unsent(&EventId::from_u128(1)));
        assert!(ids.is_unsent(&EventId::from_u128(2)));
        assert_eq!(ids.get(&EventId::from_u128(3)), None);
        assert_eq!(ids.get(&EventId::from_u128(1)), Some(Some(5)));
    }

    #[test]
    fn recent_ids_keep_the_first_answer() {
        let mut ids = RecentIds::new(10);
        ids.insert(EventId::from_u128(1), Some(5));
        ids.insert(EventId::from_u128(1), None);
        assert_eq!(ids.get(&EventId::from_u128(1)), Some(Some(5)));
        assert_eq!(ids.order.len(), 1);
    }

    #[test]
    fn state_expires_after_retention() {
        let mut s = ClusterState::new(10);
        s.set(&jail("sshd"), ip(1), BanState::Banned, 6000, 5000);
        assert_eq!(s.get(&jail("sshd"), ip(1), 5999), Some(BanState::Banned));
        assert_eq!(s.get(&jail("other"), ip(1), 5999), None);
        assert_eq!(s.get(&jail("sshd"), ip(1), 6000), None);
        s.prune(6000);
        assert!(s.is_empty());
    }

    #[test]
    fn each_entry_ends_at_its_own_time() {
        let mut s = ClusterState::new(10);
        // Set first, ends last (a longer ban_time before a restart).
        s.set(&jail("sshd"), ip(1), BanState::Banned, 9000, 1000);
        s.set(&jail("sshd"), ip(2), BanState::Banned, 3000, 1000);
        assert_eq!(s.get(&jail("sshd"), ip(2), 3000), None);
        assert_eq!(s.get(&jail("sshd"), ip(1), 8999), Some(BanState::Banned));
        assert_eq!(s.get(&jail("sshd"), ip(1), 9000), None);
        s.prune(9000);
        assert!(s.is_empty());
    }

    #[test]
    fn state_is_bounded_and_forgets_least_recently_changed() {
        let mut s = ClusterState::new(100);
        for n in 0..1000 {
            s.set(&jail("sshd"), ip(n), BanState::Banned, u64::MAX, 1);
            assert!(s.len() <= 100);
            assert_eq!(s.order.len(), s.len());
        }
        // Changing an old entry makes it the most recent.
        s.set(&jail("sshd"), ip(900), BanState::Unbanned, u64::MAX, 2);
        for n in 1000..1099 {
            s.set(&jail("sshd"), ip(n), BanState::Banned, u64::MAX, 3);
        }
        assert_eq!(s.get(&jail("sshd"), ip(900), 4), Some(BanState::Unbanned));
        assert_eq!(s.get(&jail("sshd"), ip(901), 4), None);
        assert_eq!(s.len(), 100);
        assert_eq!(s.order.len(), 100);
    }

    #[test]
    fn clock_going_backwards_does_not_panic_or_grow() {
        let mut s = ClusterState::new(5);
        for n in 0..50u32 {
            let now = if n % 2 == 0 { 1000 - u64::from(n) } else { 0 };
            s.set(&jail("j"), ip(n % 7), BanState::Banned, now + 10, now);
            assert!(s.len() <= 5);
        }
    }
}
