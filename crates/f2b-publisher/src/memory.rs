//! The publisher's bounded memories: the event ids it answered recently and the
//! cluster's ban state per (jail, address).
//!
//! Both are filled by the network, so both have a fixed capacity and forget their
//! oldest entries first; forgetting only weakens deduplication (a forgotten event is
//! broadcast again, which subscribers tolerate), it never loses a ban.
//!
//! Both hold many entries (100,000 each by default), so an entry is kept small: no
//! heap allocation of its own, a fixed-size key, the state packed in a few bytes,
//! and tables that do not double under churn (see `insert_bounded`). At 100,000
//! entries an id costs about 50 bytes (a 24-byte slot and a control byte in a table
//! of 131,072, and 16 bytes in the insertion order), a (jail, address) about 65 to
//! 75 (a 32-byte slot and a control byte, and 20 bytes in the order, more while the
//! changes of a key changed again wait there to be compacted away); a jail's name is
//! held once, however many addresses it has.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
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

/// An answer in 8 bytes: the sequence number (at most `MAX_SAFE_INTEGER`, 2^53 - 1,
/// as every sequence number is) or [`Answer::NONE`], and the `unsent` flag in the
/// top bit.
#[derive(Debug, Clone, Copy)]
struct Answer(u64);

impl Answer {
    const UNSENT: u64 = 1 << 63;
    /// Not broadcast: no sequence number.
    const NONE: u64 = Self::UNSENT - 1;

    fn new(seq: Option<u64>, unsent: bool) -> Answer {
        let seq = match seq {
            // A larger number is not a sequence number; kept below the flag all the
            // same.
            Some(s) => s.min(Self::NONE - 1),
            None => Self::NONE,
        };
        Answer(seq | if unsent { Self::UNSENT } else { 0 })
    }

    fn seq(self) -> Option<u64> {
        let s = self.0 & !Self::UNSENT;
        (s != Self::NONE).then_some(s)
    }

    fn unsent(self) -> bool {
        self.0 & Self::UNSENT != 0
    }
}

/// Grows `order` for one more entry, to at most `max` entries: a [`VecDeque`]
/// doubles, which past a power of two would reserve up to twice what it may hold.
fn reserve_one<T>(order: &mut VecDeque<T>, max: usize) {
    if order.len() == order.capacity() {
        let want = (order.capacity() * 2).max(16).min(max).max(order.len() + 1);
        order.reserve_exact(want - order.len());
    }
}

/// Inserts into `map`, which never holds more than `max` entries, without letting
/// it grow past the table `max` needs.
///
/// A hash map that keeps forgetting and learning entries fills with tombstones, and
/// when it has no room left it grows to twice its size unless it is at most half
/// full. Near `max` (more than half the table `max` needs) that doubles the table
/// for nothing. Here, when the map has no room left, it is rebuilt into a table for
/// twice its entries or `max`, whichever is less: the same size once it is near
/// `max`, without the tombstones.
fn insert_bounded<K: Eq + Hash, V>(map: &mut HashMap<K, V>, max: usize, key: K, value: V) {
    if map.len() >= map.capacity() && !map.contains_key(&key) {
        let len = map.len();
        let want = len.saturating_mul(2).min(max).max(len + 1);
        let mut fresh = HashMap::with_capacity(want);
        fresh.extend(map.drain());
        *map = fresh;
    }
    map.insert(key, value);
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
        self.answers.get(id).map(|a| a.seq())
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
        self.answers.get(id).is_some_and(|a| a.unsent())
    }

    /// Records whether `id` (if remembered) may not have been broadcast: `false`
    /// once it has been broadcast again, `true` when a broadcast failed.
    pub fn set_unsent(&mut self, id: &EventId, unsent: bool) {
        if let Some(a) = self.answers.get_mut(id) {
            *a = Answer::new(a.seq(), unsent);
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
        insert_bounded(
            &mut self.answers,
            self.capacity,
            id,
            Answer::new(seq, unsent),
        );
        reserve_one(&mut self.order, self.capacity);
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

/// A (jail, address) in 20 bytes: the address as 16 bytes (an IPv4 address
/// IPv4-mapped), and the jail's number in [`Jails`] shifted left by one, its low
/// bit set for an IPv6 address (so `::ffff:192.0.2.1` and `192.0.2.1` stay apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    ip: [u8; 16],
    jail: u32,
}

impl Key {
    fn new(jail: u32, ip: IpAddr) -> Key {
        let (ip, v6) = match ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 0),
            IpAddr::V6(v6) => (v6.octets(), 1),
        };
        Key {
            ip,
            jail: jail << 1 | v6,
        }
    }

    fn jail(self) -> u32 {
        self.jail >> 1
    }
}

/// A (jail, address)'s state in 12 bytes: until when it holds, in ms since the Unix
/// epoch (a ban's `expires_ms`, an unban's acceptance plus `ban_time`), split in
/// two halves to keep the entry 4-byte aligned; and its change's stamp (see
/// [`ClusterState::order`]) in the low 31 bits, the top bit set when banned.
#[derive(Debug, Clone, Copy)]
struct Entry {
    until: [u32; 2],
    stamp: u32,
}

const BANNED: u32 = 1 << 31;

impl Entry {
    fn new(state: BanState, until_ms: u64, stamp: u32) -> Entry {
        let flag = match state {
            BanState::Banned => BANNED,
            BanState::Unbanned => 0,
        };
        Entry {
            // Two halves of the u64 (truncation intended).
            until: [(until_ms >> 32) as u32, until_ms as u32],
            stamp: stamp & !BANNED | flag,
        }
    }

    fn until_ms(self) -> u64 {
        u64::from(self.until[0]) << 32 | u64::from(self.until[1])
    }

    fn state(self) -> BanState {
        if self.stamp & BANNED != 0 {
            BanState::Banned
        } else {
            BanState::Unbanned
        }
    }

    fn stamp(self) -> u32 {
        self.stamp & !BANNED
    }
}

/// The jail names of [`ClusterState`]'s keys, each held once and numbered, with how
/// many keys use it: a name no key uses is forgotten and its number reused, so this
/// holds at most as many names as the state has entries.
#[derive(Debug, Default)]
struct Jails {
    numbers: HashMap<JailName, u32>,
    /// By number: the name and how many keys use it (`None`: free).
    slots: Vec<Option<(JailName, u32)>>,
    free: Vec<u32>,
}

impl Jails {
    fn number(&self, jail: &JailName) -> Option<u32> {
        self.numbers.get(jail).copied()
    }

    /// `jail`'s number, given one if it has none yet (used by no key until
    /// [`Self::acquire`]).
    fn number_or_add(&mut self, jail: &JailName) -> u32 {
        if let Some(n) = self.number(jail) {
            return n;
        }
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                self.slots.push(None);
                // At most one more name than entries, and those are at most
                // `MAX_CAPACITY`: it fits.
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX >> 1)
            }
        };
        if let Some(slot) = self.slots.get_mut(n as usize) {
            *slot = Some((jail.clone(), 0));
        }
        self.numbers.insert(jail.clone(), n);
        n
    }

    /// One more key uses jail `n`.
    fn acquire(&mut self, n: u32) {
        if let Some(Some((_, users))) = self.slots.get_mut(n as usize) {
            *users += 1;
        }
    }

    /// One key less uses jail `n`; forgets it when none does.
    fn release(&mut self, n: u32) {
        let Some(slot) = self.slots.get_mut(n as usize) else {
            return;
        };
        if let Some((name, users)) = slot {
            *users = users.saturating_sub(1);
            if *users == 0 {
                self.numbers.remove(name);
                *slot = None;
                self.free.push(n);
            }
        }
    }

    /// How many names are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.numbers.len()
    }
}

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
    /// The key of each change, least recent first: the change at position `i` has
    /// the stamp `first_stamp + i` (modulo 2^31). A change superseded by a later one
    /// of its key stays here (its stamp is no longer its entry's) until it reaches
    /// the front or [`Self::compact`] drops it.
    order: VecDeque<Key>,
    first_stamp: u32,
    jails: Jails,
}

/// The most entries a [`ClusterState`] keeps, whatever its capacity: stamps and jail
/// numbers are 31-bit.
const MAX_CAPACITY: usize = 1 << 29;

impl ClusterState {
    /// Keeps at most `capacity` entries (at least one, at most 2^29).
    pub fn new(capacity: usize) -> Self {
        ClusterState {
            capacity: capacity.clamp(1, MAX_CAPACITY),
            entries: HashMap::new(),
            order: VecDeque::new(),
            first_stamp: 0,
            jails: Jails::default(),
        }
    }

    /// The state of (jail, ip) at `now_ms`; `None` when unknown or expired.
    pub fn get(&self, jail: &JailName, ip: IpAddr, now_ms: u64) -> Option<BanState> {
        let entry = self.entries.get(&Key::new(self.jails.number(jail)?, ip))?;
        (now_ms < entry.until_ms()).then_some(entry.state())
    }

    /// The most changes [`Self::order`] holds before it is compacted: half again
    /// the entries, so compacting costs at most three steps per change.
    fn order_limit(&self) -> usize {
        let n = self.capacity + 1;
        n + n / 2 + 32
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
        if self.order.len() >= self.entries.len() + self.entries.len() / 2 + 32 {
            self.compact();
        }
        let number = self.jails.number_or_add(jail);
        let key = Key::new(number, ip);
        let stamp = self.stamp_at(self.order.len());
        let entry = Entry::new(state, until_ms, stamp);
        match self.entries.get_mut(&key) {
            Some(e) => *e = entry,
            None => {
                // Briefly one more than the capacity, until `prune`.
                insert_bounded(&mut self.entries, self.capacity + 1, key, entry);
                self.jails.acquire(number);
            }
        }
        let limit = self.order_limit();
        reserve_one(&mut self.order, limit);
        self.order.push_back(key);
        self.prune(now_ms);
    }

    /// The stamp of the change at position `i` of the order.
    fn stamp_at(&self, i: usize) -> u32 {
        // Positions are below 2^31 (`order_limit`); the sum wraps at 2^31.
        self.first_stamp.wrapping_add(i as u32) & !BANNED
    }

    /// Whether the change at the front of the order is still its key's last.
    fn front_is_current(&self) -> Option<(Key, bool)> {
        let key = *self.order.front()?;
        let current = self
            .entries
            .get(&key)
            .is_some_and(|e| e.stamp() == self.first_stamp);
        Some((key, current))
    }

    fn pop_front(&mut self) {
        if self.order.pop_front().is_some() {
            self.first_stamp = self.first_stamp.wrapping_add(1) & !BANNED;
        }
    }

    /// Drops the superseded changes from the order and stamps the others anew.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.order);
        let mut kept = VecDeque::new();
        kept.reserve_exact(self.entries.len());
        for (i, key) in old.into_iter().enumerate() {
            let stamp = self.stamp_at(i);
            let new_stamp = self.first_stamp.wrapping_add(kept.len() as u32) & !BANNED;
            if let Some(e) = self.entries.get_mut(&key) {
                if e.stamp() == stamp {
                    *e = Entry::new(e.state(), e.until_ms(), new_stamp);
                    kept.push_back(key);
                }
            }
        }
        self.order = kept;
    }

    /// Forgets the least recently changed entries while there are too many or they
    /// have expired. Stops at the first live one, so each call does work only for
    /// what it removes (an expired entry behind a live one, which only happens
    /// after a `ban_time` change, waits for it; [`Self::get`] ignores it meanwhile).
    pub fn prune(&mut self, now_ms: u64) {
        while let Some((key, current)) = self.front_is_current() {
            if current {
                let over = self.entries.len() > self.capacity;
                let expired = self
                    .entries
                    .get(&key)
                    .is_none_or(|e| now_ms >= e.until_ms());
                if !over && !expired {
                    break;
                }
                self.entries.remove(&key);
                self.jails.release(key.jail());
            }
            self.pop_front();
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

    #[test]
    fn answers_keep_their_sequence_number_and_flag() {
        let mut ids = RecentIds::new(100);
        let seqs = [None, Some(0), Some(1), Some(f2b_proto::MAX_SAFE_INTEGER)];
        let mut n = 0u128;
        for seq in seqs {
            for unsent in [false, true] {
                let id = EventId::from_u128(n);
                n += 1;
                if unsent {
                    ids.insert_unsent(id, seq);
                } else {
                    ids.insert(id, seq);
                }
                assert_eq!((ids.get(&id), ids.is_unsent(&id)), (Some(seq), unsent));
                ids.set_unsent(&id, !unsent);
                assert_eq!((ids.get(&id), ids.is_unsent(&id)), (Some(seq), !unsent));
            }
        }
        assert_eq!(ids.len(), 8);
    }

    #[test]
    fn the_id_order_never_reserves_past_the_capacity() {
        let mut ids = RecentIds::new(1000);
        for n in 0..5000u128 {
            ids.insert(EventId::from_u128(n), Some(n as u64));
            assert!(ids.order.capacity() <= 1000, "{}", ids.order.capacity());
        }
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn keys_tell_jails_and_address_families_apart() {
        let mut s = ClusterState::new(10);
        let v4 = IpAddr::from([192, 0, 2, 1]);
        let mapped = IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped());
        s.set(&jail("sshd"), v4, BanState::Banned, 100, 1);
        assert_eq!(s.get(&jail("sshd"), v4, 2), Some(BanState::Banned));
        assert_eq!(s.get(&jail("sshd"), mapped, 2), None);
        assert_eq!(s.get(&jail("web"), v4, 2), None);
        s.set(&jail("sshd"), mapped, BanState::Unbanned, 100, 1);
        s.set(&jail("web"), v4, BanState::Unbanned, 100, 1);
        assert_eq!(s.get(&jail("sshd"), v4, 2), Some(BanState::Banned));
        assert_eq!(s.get(&jail("sshd"), mapped, 2), Some(BanState::Unbanned));
        assert_eq!(s.get(&jail("web"), v4, 2), Some(BanState::Unbanned));
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn a_jail_name_is_held_once_and_forgotten_with_its_last_address() {
        let mut s = ClusterState::new(100);
        for n in 0..60 {
            s.set(&jail("sshd"), ip(n), BanState::Banned, 1000, 1);
            s.set(&jail("web"), ip(n), BanState::Banned, 2000, 1);
        }
        assert_eq!((s.len(), s.jails.len()), (100, 2));
        // Evicting every sshd entry forgets the name; its number is reused.
        for n in 0..100 {
            s.set(&jail(&format!("j{n}")), ip(n), BanState::Banned, 3000, 1);
        }
        assert_eq!(s.len(), 100);
        assert_eq!(s.jails.len(), 100);
        assert_eq!(s.get(&jail("sshd"), ip(59), 2), None);
        assert!(s.jails.slots.len() <= 101, "{}", s.jails.slots.len());
        // Expiry forgets names too.
        s.prune(3000);
        assert!(s.is_empty());
        assert_eq!(s.jails.len(), 0);
        assert!(s.jails.numbers.is_empty());
    }

    #[test]
    fn changing_one_key_over_and_over_keeps_the_order_small() {
        let mut s = ClusterState::new(10);
        for n in 0..5 {
            s.set(&jail("sshd"), ip(n), BanState::Banned, u64::MAX, 1);
        }
        for k in 0..10_000u64 {
            let state = if k % 2 == 0 {
                BanState::Unbanned
            } else {
                BanState::Banned
            };
            s.set(&jail("sshd"), ip(1), state, u64::MAX, 2);
            assert_eq!(s.get(&jail("sshd"), ip(1), 3), Some(state));
            assert!(
                s.order.len() <= s.len() + s.len() / 2 + 33,
                "{}",
                s.order.len()
            );
        }
        assert!(s.order.capacity() <= s.order_limit());
        // Nothing else was lost, and the least recently changed goes first.
        assert_eq!(s.len(), 5);
        for n in 5..11 {
            s.set(&jail("sshd"), ip(n), BanState::Banned, u64::MAX, 4);
        }
        assert_eq!(s.get(&jail("sshd"), ip(0), 5), None);
        assert_eq!(s.get(&jail("sshd"), ip(1), 5), Some(BanState::Banned));
        assert_eq!(s.get(&jail("sshd"), ip(2), 5), Some(BanState::Banned));
    }

    /// The state as it was kept before it was made compact: (jail, address) keys,
    /// and the order as a map by stamp.
    #[derive(Default)]
    struct Model {
        capacity: usize,
        entries: HashMap<(JailName, IpAddr), (BanState, u64, u64)>,
        order: std::collections::BTreeMap<u64, (JailName, IpAddr)>,
        next: u64,
    }

    impl Model {
        fn get(&self, jail: &JailName, ip: IpAddr, now: u64) -> Option<BanState> {
            let (state, until, _) = self.entries.get(&(jail.clone(), ip))?;
            (now < *until).then_some(*state)
        }

        fn set(&mut self, jail: &JailName, ip: IpAddr, state: BanState, until: u64, now: u64) {
            let key = (jail.clone(), ip);
            let stamp = self.next;
            self.next += 1;
            if let Some(old) = self.entries.insert(key.clone(), (state, until, stamp)) {
                self.order.remove(&old.2);
            }
            self.order.insert(stamp, key);
            self.prune(now);
        }

        fn prune(&mut self, now: u64) {
            while let Some(e) = self.order.first_entry() {
                let over = self.entries.len() > self.capacity;
                let expired = self.entries.get(e.get()).is_none_or(|v| now >= v.1);
                if !over && !expired {
                    break;
                }
                let key = e.remove();
                self.entries.remove(&key);
            }
        }
    }

    /// Random changes, compared with [`Model`] after each.
    #[test]
    fn the_compact_state_answers_as_the_plain_one() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let jails = [jail("sshd"), jail("web"), jail("mail")];
        let ips: Vec<IpAddr> = (0..20)
            .map(|n| {
                if n % 3 == 0 {
                    IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n))
                } else {
                    ip(u32::from(n))
                }
            })
            .collect();
        for capacity in [1, 7, 25, 100] {
            let mut s = ClusterState::new(capacity);
            let mut m = Model {
                capacity,
                ..Model::default()
            };
            let mut now = 1000u64;
            for _ in 0..20_000 {
                now = match next(20) {
                    0 => now.saturating_sub(next(30)),
                    _ => now + next(5),
                };
                let j = &jails[next(3) as usize];
                let a = ips[next(20) as usize];
                if next(10) == 0 {
                    s.prune(now);
                    m.prune(now);
                } else {
                    let state = if next(2) == 0 {
                        BanState::Banned
                    } else {
                        BanState::Unbanned
                    };
                    let until = now + next(200);
                    s.set(j, a, state, until, now);
                    m.set(j, a, state, until, now);
                }
                assert_eq!(s.len(), m.entries.len());
                for j in &jails {
                    assert_eq!(s.get(j, a, now), m.get(j, a, now));
                }
                assert!(s.jails.len() <= s.len().max(1));
                assert!(s.order.len() <= s.len() + s.len() / 2 + 33);
            }
        }
    }

    /// Forgetting and learning ids for a long time does not grow the table past what
    /// the capacity needs (a plain map doubles, its slots being tombstones).
    #[test]
    fn churn_does_not_double_the_tables() {
        let mut ids = RecentIds::new(1000);
        let mut s = ClusterState::new(1000);
        // The table 1001 entries need (2048 slots, 1792 of them usable).
        let right = HashMap::<u32, u32>::with_capacity(1001).capacity();
        for n in 0..200_000u32 {
            ids.insert(EventId::from_u128(u128::from(n)), Some(u64::from(n)));
            s.set(&jail("sshd"), ip(n), BanState::Banned, u64::MAX, 1);
            assert!(ids.answers.capacity() <= right, "{n}");
            assert!(s.entries.capacity() <= right, "{n}");
        }
        assert_eq!((ids.len(), s.len()), (1000, 1000));
        assert_eq!(s.get(&jail("sshd"), ip(199_999), 2), Some(BanState::Banned));
        assert_eq!(ids.get(&EventId::from_u128(199_000)), Some(Some(199_000)));
    }
}
