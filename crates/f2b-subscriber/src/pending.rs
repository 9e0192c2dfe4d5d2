//! Events accepted by the filter and not yet applied: coalescing, batching,
//! retry backoff and the queue bound. Pure (the caller passes the time).
//!
//! One entry per (local jail, event jail, address): a newer event for the same
//! triple replaces the older one (the last action wins), so a burst of ban, unban,
//! ban applies one ban. Events of different event jails never replace each other,
//! even when `ban_jail` applies them in the same local jail.
//!
//! With `ban_jail`, several event jails can hold one (local jail, address): the
//! queue knows which ones (bans applied, waiting, or being applied), and an unban
//! from one jail is applied locally only when no other jail holds the address
//! ([`Pending::held_elsewhere`]).
//! Two kinds of delay keep a failing entry from being retried at once:
//! - a *gate* per local jail, closed after a failure of a whole call (fail2ban-server
//!   unreachable, jail unknown): nothing of that jail is tried before it opens;
//! - a per-entry delay after a failure that concerns that address alone.
//!
//! Both grow as [`backoff`] says and end at the first success.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use f2b_proto::{Action, Epoch, Event, EventId, JailName};
use tokio::time::Instant;

use crate::store::HELD_UNKNOWN_RETENTION;

/// The first retry delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The most entries taken for one round of calls.
pub const MAX_BATCH: usize = 500;

/// The delay before retry number `attempts` (1 after the first failure): 1 s, 2 s,
/// 4 s ... up to 60 s.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(16);
    BACKOFF_MIN.saturating_mul(1 << exp).min(BACKOFF_MAX)
}

/// One event to apply, with the local jail it is applied in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The local jail (`ban_jail`, or the event's own jail).
    pub jail: JailName,
    /// The event as received.
    pub event: Event,
    /// Its broadcast sequence number (0 for a fail2ban-zmq-tools message).
    pub seq: u64,
    /// The publisher epoch it came from; `None` for a fail2ban-zmq-tools message.
    pub epoch: Option<Epoch>,
    /// For a ban listed in a snapshot, when the cluster stops holding it (ms since
    /// the Unix epoch): a ban not applied by then is not applied at all. `None` for
    /// broadcasts, which carry no expiry.
    pub expires_ms: Option<u64>,
}

impl Item {
    /// An item of no known epoch and no expiry.
    pub fn new(jail: JailName, event: Event, seq: u64) -> Self {
        Item {
            jail,
            event,
            seq,
            epoch: None,
            expires_ms: None,
        }
    }

    /// Whether this is a ban whose expiry has passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.action() == Action::Ban && self.expires_ms.is_some_and(|t| t <= now_ms)
    }

    pub fn ip(&self) -> IpAddr {
        self.event.ip
    }

    pub fn action(&self) -> Action {
        self.event.action
    }

    pub(crate) fn key(&self) -> Key {
        (self.jail.clone(), self.event.jail.clone(), self.event.ip)
    }

    /// Whether the event's jail differs from the local jail (`ban_jail`).
    fn shared_local(&self) -> bool {
        self.jail != self.event.jail
    }
}

/// A queue entry's key: (local jail, event jail, address).
pub type Key = (JailName, JailName, IpAddr);

/// An entry taken out of the queue, to be applied and then dropped (success) or
/// handed back ([`Pending::retry`], [`Pending::requeue`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub item: Item,
    /// Failures of this entry alone so far.
    pub attempts: u32,
    order: u64,
}

#[derive(Debug)]
struct Entry {
    item: Item,
    attempts: u32,
    not_before: Instant,
    order: u64,
}

#[derive(Debug, Clone, Copy)]
struct Gate {
    attempts: u32,
    until: Instant,
}

/// Items of one local jail and one action, applied in one call when the action
/// takes batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub jail: JailName,
    pub action: Action,
    pub items: Vec<Taken>,
}

/// The queue of events waiting to be applied.
#[derive(Debug)]
pub struct Pending {
    entries: HashMap<Key, Entry>,
    /// Insertion order (oldest first), for batching in order and dropping the oldest.
    order: BTreeMap<u64, Key>,
    next_order: u64,
    gates: HashMap<JailName, Gate>,
    /// Entries taken by the executor and not settled or handed back yet.
    in_flight: HashMap<Key, Item>,
    /// Bans applied in a local jail other than their event's jail: per (local
    /// jail, address), the event jails that hold it, each with when it is
    /// forgotten (ms since the Unix epoch: the cluster's expiry, or
    /// [`HELD_UNKNOWN_RETENTION`] after it was applied), as the state's held bans.
    applied: HashMap<(JailName, IpAddr), HashMap<JailName, u64>>,
    /// Bans waiting or being applied in a local jail other than their event's
    /// jail: per (local jail, address), how many per event jail.
    banning: HashMap<(JailName, IpAddr), HashMap<JailName, u32>>,
    capacity: usize,
    dropped: u64,
    closed: bool,
    /// The ids settled since the last push (at most [`SETTLED_SINCE_PUSH`]), for
    /// [`Pending::settled_since_push`].
    settled_since_push: Vec<EventId>,
}

/// How many ids [`Pending::settled_since_push`] remembers; later ones are not
/// (then it answers `false`, which is always safe).
const SETTLED_SINCE_PUSH: usize = 16;

impl Pending {
    /// A queue of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Pending {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_order: 0,
            gates: HashMap::new(),
            in_flight: HashMap::new(),
            applied: HashMap::new(),
            banning: HashMap::new(),
            capacity: capacity.max(1),
            dropped: 0,
            closed: false,
            settled_since_push: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries dropped because the queue was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Marks the end of input (shutdown): nothing new will be pushed.
    pub fn close(&mut self) {
        self.closed = true;
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Adds a new event, ready at once (unless its jail's gate is closed). An entry
    /// for the same (jail, address) is replaced: the last action wins. Returns the
    /// items dropped to stay within the capacity (the oldest first).
    pub fn push(&mut self, item: Item, now: Instant) -> Vec<Item> {
        self.settled_since_push.clear();
        let key = item.key();
        if let Some(old) = self.entries.remove(&key) {
            self.order.remove(&old.order);
            self.count(&old.item, false);
        }
        self.count(&item, true);
        let order = self.next_order;
        self.next_order += 1;
        self.order.insert(order, key.clone());
        self.entries.insert(
            key,
            Entry {
                item,
                attempts: 0,
                not_before: now,
                order,
            },
        );
        self.enforce_capacity()
    }

    fn enforce_capacity(&mut self) -> Vec<Item> {
        let mut dropped = Vec::new();
        while self.entries.len() > self.capacity {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.count(&e.item, false);
                self.dropped += 1;
                dropped.push(e.item);
            }
        }
        dropped
    }

    fn gate_open(&self, jail: &JailName, now: Instant) -> bool {
        self.gates.get(jail).is_none_or(|g| g.until <= now)
    }

    /// Removes (and returns) the waiting entries for which `pred` is true. Entries
    /// taken and not handed back yet are not seen.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&Item) -> bool) -> Vec<Item> {
        let keys: Vec<(u64, Key)> = self
            .entries
            .iter()
            .filter(|(_, e)| pred(&e.item))
            .map(|(k, e)| (e.order, k.clone()))
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for (order, key) in keys {
            self.order.remove(&order);
            if let Some(e) = self.entries.remove(&key) {
                self.count(&e.item, false);
                out.push(e.item);
            }
        }
        out
    }

    /// Takes up to `max` entries that may be tried at `now`, oldest first.
    pub fn take_ready(&mut self, now: Instant, max: usize) -> Vec<Taken> {
        let mut ready = Vec::new();
        for (&order, key) in &self.order {
            if ready.len() >= max {
                break;
            }
            let Some(e) = self.entries.get(key) else {
                continue;
            };
            if e.not_before <= now && self.gate_open(&key.0, now) {
                ready.push(order);
            }
        }
        ready
            .into_iter()
            .filter_map(|order| {
                let key = self.order.remove(&order)?;
                let e = self.entries.remove(&key)?;
                if let Some(old) = self.in_flight.insert(key, e.item.clone()) {
                    self.count(&old, false);
                }
                Some(Taken {
                    item: e.item,
                    attempts: e.attempts,
                    order: e.order,
                })
            })
            .collect()
    }

    /// When the next entry becomes ready, if any is waiting.
    pub fn next_ready(&self) -> Option<Instant> {
        self.entries
            .values()
            .map(|e| match self.gates.get(&e.item.jail) {
                Some(g) => g.until.max(e.not_before),
                None => e.not_before,
            })
            .min()
    }

    fn put_back(&mut self, taken: Taken, not_before: Instant) -> Vec<Item> {
        let key = taken.item.key();
        if let Some(old) = self.in_flight.remove(&key) {
            self.count(&old, false);
        }
        if self.entries.contains_key(&key) {
            // A newer event for the same (jail, address) arrived meanwhile: it wins.
            return Vec::new();
        }
        self.order.insert(taken.order, key.clone());
        self.count(&taken.item, true);
        self.entries.insert(
            key,
            Entry {
                item: taken.item,
                attempts: taken.attempts,
                not_before,
                order: taken.order,
            },
        );
        self.enforce_capacity()
    }

    /// Hands back an entry that failed on its own; returns its retry delay and the
    /// items dropped to stay within the capacity.
    pub fn retry(&mut self, mut taken: Taken, now: Instant) -> (Duration, Vec<Item>) {
        taken.attempts = taken.attempts.saturating_add(1);
        let delay = backoff(taken.attempts);
        (delay, self.put_back(taken, now + delay))
    }

    /// Hands back entries whose call failed as a whole; they wait for their jail's
    /// gate (see [`Pending::gate_failure`]), not for a delay of their own.
    pub fn requeue(&mut self, taken: impl IntoIterator<Item = Taken>, now: Instant) -> Vec<Item> {
        let mut dropped = Vec::new();
        for t in taken {
            dropped.extend(self.put_back(t, now));
        }
        dropped
    }

    /// Records that a taken entry is settled: applied (`applied`) or given up. An
    /// applied ban in a local jail other than its event's jail makes that jail a
    /// holder of the (local jail, address); an unban (applied or not) ends it.
    pub fn settled(&mut self, item: &Item, applied: bool, now_ms: u64) {
        if self.settled_since_push.len() < SETTLED_SINCE_PUSH {
            self.settled_since_push.push(item.event.id);
        }
        let key = item.key();
        if self
            .in_flight
            .get(&key)
            .is_some_and(|i| i.event.id == item.event.id)
        {
            if let Some(old) = self.in_flight.remove(&key) {
                self.count(&old, false);
            }
        }
        if !item.shared_local() {
            return;
        }
        let local = (item.jail.clone(), item.ip());
        match item.action() {
            Action::Ban if applied => {
                let retention =
                    u64::try_from(HELD_UNKNOWN_RETENTION.as_millis()).unwrap_or(u64::MAX);
                let until = item
                    .expires_ms
                    .unwrap_or_else(|| now_ms.saturating_add(retention));
                self.applied
                    .entry(local)
                    .or_default()
                    .insert(item.event.jail.clone(), until);
            }
            Action::Ban => {}
            Action::Unban => {
                if let Some(set) = self.applied.get_mut(&local) {
                    set.remove(&item.event.jail);
                    if set.is_empty() {
                        self.applied.remove(&local);
                    }
                }
            }
        }
    }

    /// Whether an item of event `id` was settled ([`Pending::settled`]) since the
    /// last [`Pending::push`]. `false` when it was not, or when too many were to
    /// remember them all.
    pub fn settled_since_push(&self, id: EventId) -> bool {
        self.settled_since_push.contains(&id)
    }

    /// Records a ban applied before (the state's held bans, at start) in `local`
    /// for event jail `jail`, forgotten at `until` (ms since the Unix epoch).
    pub fn held(&mut self, local: JailName, jail: JailName, ip: IpAddr, until: u64) {
        if local != jail {
            self.applied
                .entry((local, ip))
                .or_default()
                .insert(jail, until);
        }
    }

    /// Sets when the applied ban of `jail` in `local` for `ip` is forgotten (the
    /// cluster's expiry, as a snapshot told it).
    pub fn learn_expiry(&mut self, local: &JailName, jail: &JailName, ip: IpAddr, expires_ms: u64) {
        if let Some(until) = self
            .applied
            .get_mut(&(local.clone(), ip))
            .and_then(|m| m.get_mut(jail))
        {
            *until = expires_ms;
        }
    }

    /// Forgets the applied bans whose time has come at `now_ms` (as the state
    /// prunes its held bans): they no longer keep another jail's unban back.
    pub fn prune_applied(&mut self, now_ms: u64) {
        self.applied.retain(|_, m| {
            m.retain(|_, until| *until > now_ms);
            !m.is_empty()
        });
    }

    /// Whether an event jail other than `item`'s holds `item`'s (local jail,
    /// address): a ban of it applied, waiting, or being applied. Always false
    /// without `ban_jail` (the local jail is the event's jail).
    pub fn held_elsewhere(&self, item: &Item) -> bool {
        if !item.shared_local() {
            return false;
        }
        let jail = &item.event.jail;
        let local = (item.jail.clone(), item.ip());
        self.applied
            .get(&local)
            .is_some_and(|m| m.keys().any(|j| j != jail))
            || self
                .banning
                .get(&local)
                .is_some_and(|m| m.iter().any(|(j, &n)| j != jail && n > 0))
    }

    /// Counts `item` in or out of [`Pending::banning`] (bans in a local jail other
    /// than their event's jail only).
    fn count(&mut self, item: &Item, add: bool) {
        if !item.shared_local() || item.action() != Action::Ban {
            return;
        }
        let local = (item.jail.clone(), item.ip());
        if add {
            *self
                .banning
                .entry(local)
                .or_default()
                .entry(item.event.jail.clone())
                .or_insert(0) += 1;
            return;
        }
        if let Some(m) = self.banning.get_mut(&local) {
            if let Some(n) = m.get_mut(&item.event.jail) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&item.event.jail);
                }
            }
            if m.is_empty() {
                self.banning.remove(&local);
            }
        }
    }

    /// The entries being applied (taken, not settled or handed back).
    pub fn in_flight(&self) -> impl Iterator<Item = &Item> {
        self.in_flight.values()
    }

    /// Records a failure of a whole call for `jail`: closes its gate for the next
    /// backoff delay, which is returned.
    pub fn gate_failure(&mut self, jail: &JailName, now: Instant) -> Duration {
        let g = self.gates.entry(jail.clone()).or_insert(Gate {
            attempts: 0,
            until: now,
        });
        g.attempts = g.attempts.saturating_add(1);
        let delay = backoff(g.attempts);
        g.until = now + delay;
        delay
    }

    /// Records a successful call for `jail`: opens its gate and resets its backoff.
    pub fn gate_success(&mut self, jail: &JailName) {
        self.gates.remove(jail);
    }
}

/// Groups taken entries by (local jail, action), keeping the order in which each
/// group first appears and the order of items inside a group.
pub fn group(taken: Vec<Taken>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<(JailName, Action), usize> = HashMap::new();
    for t in taken {
        let k = (t.item.jail.clone(), t.item.action());
        match index.get(&k) {
            Some(&i) => groups[i].items.push(t),
            None => {
                index.insert(k, groups.len());
                groups.push(Group {
                    jail: t.item.jail.clone(),
                    action: t.item.action(),
                    items: vec![t],
                });
            }
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::{EventId, NodeName};

    fn item(id: u128, jail: &str, action: Action, ip: &str) -> Item {
        Item::new(
            JailName::new(jail).unwrap(),
            Event::new(
                EventId::from_u128(id),
                NodeName::new("web2").unwrap(),
                JailName::new("sshd").unwrap(),
                action,
                ip.parse().unwrap(),
                1_763_702_000_000,
            )
            .unwrap(),
            id as u64,
        )
    }

    #[test]
    fn remove_where_takes_waiting_entries_out() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(item(1, "cluster", Action::Ban, "203.0.113.1"), now);
        p.push(item(2, "cluster", Action::Ban, "203.0.113.2"), now);
        p.push(item(3, "cluster", Action::Unban, "203.0.113.3"), now);
        let gone = p.remove_where(|i| i.seq == 2);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].seq, 2);
        let left: Vec<u64> = p
            .take_ready(now, MAX_BATCH)
            .iter()
            .map(|t| t.item.seq)
            .collect();
        assert_eq!(left, [1, 3]);
    }

    #[test]
    fn expiry_concerns_bans_only() {
        let mut ban = item(1, "cluster", Action::Ban, "203.0.113.1");
        assert!(!ban.expired(u64::MAX));
        ban.expires_ms = Some(1000);
        assert!(!ban.expired(999));
        assert!(ban.expired(1000));
        let mut unban = item(2, "cluster", Action::Unban, "203.0.113.1");
        unban.expires_ms = Some(1000);
        assert!(!unban.expired(2000));
    }

    fn ips(t: &[Taken]) -> Vec<String> {
        t.iter().map(|t| t.item.ip().to_string()).collect()
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert_eq!(backoff(0), BACKOFF_MIN);
    }

    #[test]
    fn coalesces_per_jail_and_address_last_action_wins() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(item(1, "cluster", Action::Ban, "203.0.113.1"), now);
        p.push(item(2, "cluster", Action::Ban, "203.0.113.2"), now);
        p.push(item(3, "cluster", Action::Unban, "203.0.113.1"), now);
        p.push(item(4, "other", Action::Ban, "203.0.113.1"), now);
        p.push(item(5, "cluster", Action::Ban, "203.0.113.2"), now);
        assert_eq!(p.len(), 3);
        let taken = p.take_ready(now, MAX_BATCH);
        assert!(p.is_empty());
        let got: Vec<(String, Action, u64)> = taken
            .iter()
            .map(|t| (t.item.jail.to_string(), t.item.action(), t.item.seq))
            .collect();
        assert_eq!(
            got,
            [
                ("cluster".into(), Action::Unban, 3),
                ("other".into(), Action::Ban, 4),
                ("cluster".into(), Action::Ban, 5),
            ]
        );
    }

    #[test]
    fn settled_since_push_remembers_the_ids_settled_after_the_last_push() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        let a = item(1, "sshd", Action::Ban, "203.0.113.1");
        let b = item(2, "sshd", Action::Ban, "203.0.113.2");
        p.push(a.clone(), now);
        let taken = p.take_ready(now, MAX_BATCH);
        assert!(!p.settled_since_push(a.event.id), "taken, not settled");
        p.settled(&taken[0].item, true, 0);
        assert!(p.settled_since_push(a.event.id));
        p.push(b.clone(), now);
        assert!(!p.settled_since_push(a.event.id), "forgotten at the push");
        assert!(!p.settled_since_push(b.event.id));
        // At most SETTLED_SINCE_PUSH: beyond, `false` (the record is made).
        for n in 0..=SETTLED_SINCE_PUSH as u128 {
            p.settled(&item(10 + n, "sshd", Action::Ban, "203.0.113.3"), false, 0);
        }
        assert!(p.settled_since_push(EventId::from_u128(10)));
        assert!(!p.settled_since_push(EventId::from_u128(10 + SETTLED_SINCE_PUSH as u128)));
    }

    fn in_cluster(id: u128, jail: &str, action: Action, ip: &str) -> Item {
        let mut i = item(id, "cluster", action, ip);
        i.event.jail = JailName::new(jail).unwrap();
        i
    }

    #[test]
    fn events_of_other_jails_do_not_replace_each_other_in_a_shared_local_jail() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(in_cluster(1, "sshd", Action::Ban, "203.0.113.1"), now);
        p.push(in_cluster(2, "nginx", Action::Unban, "203.0.113.1"), now);
        assert_eq!(p.len(), 2);
        let unban = in_cluster(3, "nginx", Action::Unban, "203.0.113.1");
        assert!(p.held_elsewhere(&unban));
        let taken = p.take_ready(now, MAX_BATCH);
        // Being applied still holds it.
        assert!(p.held_elsewhere(&unban));
        p.settled(&taken[0].item, true, 0);
        p.settled(&taken[1].item, false, 0);
        // Applied holds it.
        assert!(p.held_elsewhere(&unban));
        p.settled(
            &in_cluster(4, "sshd", Action::Unban, "203.0.113.1"),
            true,
            0,
        );
        assert!(!p.held_elsewhere(&unban));
    }

    #[test]
    fn the_count_of_bans_per_local_jail_follows_every_move() {
        let now = Instant::now();
        let mut p = Pending::new(2);
        let unban = in_cluster(100, "nginx", Action::Unban, "203.0.113.1");
        // Replaced by an unban of the same jail: no longer counted.
        p.push(in_cluster(1, "sshd", Action::Ban, "203.0.113.1"), now);
        assert!(p.held_elsewhere(&unban));
        p.push(in_cluster(2, "sshd", Action::Unban, "203.0.113.1"), now);
        assert!(!p.held_elsewhere(&unban));
        // Taken, retried, taken again, settled without being applied.
        p.push(in_cluster(3, "sshd", Action::Ban, "203.0.113.1"), now);
        let t: Vec<Taken> = p
            .take_ready(now, MAX_BATCH)
            .into_iter()
            .filter(|t| t.item.action() == Action::Ban)
            .collect();
        assert!(p.held_elsewhere(&unban));
        let (delay, _) = p.retry(t.into_iter().next().unwrap(), now);
        assert!(p.held_elsewhere(&unban));
        let t = p.take_ready(now + delay, MAX_BATCH);
        p.settled(&t[0].item, false, 0);
        assert!(!p.held_elsewhere(&unban));
        // Removed, or dropped for the capacity.
        p.push(in_cluster(4, "sshd", Action::Ban, "203.0.113.1"), now);
        p.remove_where(|i| i.seq == 4);
        assert!(!p.held_elsewhere(&unban));
        p.push(in_cluster(5, "sshd", Action::Ban, "203.0.113.1"), now);
        p.push(in_cluster(6, "sshd", Action::Ban, "203.0.113.2"), now);
        p.push(in_cluster(7, "sshd", Action::Ban, "203.0.113.3"), now);
        assert!(!p.held_elsewhere(&unban));
        assert_eq!(p.banning.len(), 2);
    }

    #[test]
    fn applied_holders_are_forgotten_at_their_expiry() {
        let mut p = Pending::new(10);
        let unban = in_cluster(100, "nginx", Action::Unban, "203.0.113.1");
        let mut known = in_cluster(1, "sshd", Action::Ban, "203.0.113.1");
        known.expires_ms = Some(5_000);
        p.settled(&known, true, 1_000);
        assert!(p.held_elsewhere(&unban));
        p.prune_applied(4_999);
        assert!(p.held_elsewhere(&unban));
        p.prune_applied(5_000);
        assert!(!p.held_elsewhere(&unban));
        // No expiry told: kept HELD_UNKNOWN_RETENTION, unless a snapshot tells one.
        p.settled(
            &in_cluster(2, "sshd", Action::Ban, "203.0.113.1"),
            true,
            1_000,
        );
        p.prune_applied(1_000_000);
        assert!(p.held_elsewhere(&unban));
        let cluster = JailName::new("cluster").unwrap();
        let sshd = JailName::new("sshd").unwrap();
        p.learn_expiry(&cluster, &sshd, "203.0.113.1".parse().unwrap(), 2_000_000);
        p.prune_applied(2_000_000);
        assert!(!p.held_elsewhere(&unban));
        p.held(cluster, sshd, "203.0.113.1".parse().unwrap(), 3_000_000);
        assert!(p.held_elsewhere(&unban));
    }

    #[test]
    fn groups_by_jail_and_action() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        for (i, (jail, action, ip)) in [
            ("cluster", Action::Ban, "203.0.113.1"),
            ("cluster", Action::Unban, "203.0.113.2"),
            ("cluster", Action::Ban, "203.0.113.3"),
            ("sshd", Action::Ban, "203.0.113.4"),
            ("cluster", Action::Ban, "2001:db8::1"),
        ]
        .into_iter()
        .enumerate()
        {
            p.push(item(i as u128, jail, action, ip), now);
        }
        let groups = group(p.take_ready(now, MAX_BATCH));
        let shape: Vec<(String, Action, Vec<String>)> = groups
            .iter()
            .map(|g| (g.jail.to_string(), g.action, ips(&g.items)))
            .collect();
        assert_eq!(
            shape,
            [
                (
                    "cluster".into(),
                    Action::Ban,
                    vec![
                        "203.0.113.1".into(),
                        "203.0.113.3".into(),
                        "2001:db8::1".into()
                    ]
                ),
                ("cluster".into(), Action::Unban, vec!["203.0.113.2".into()]),
                ("sshd".into(), Action::Ban, vec!["203.0.113.4".into()]),
            ]
        );
    }

    #[test]
    fn take_ready_honours_max_and_order() {
        let now = Instant::now();
        let mut p = Pending::new(10_000);
        for i in 0..1200u32 {
            let ip = std::net::Ipv4Addr::from(0xCB00_7100 + i).to_string();
            p.push(item(i.into(), "cluster", Action::Ban, &ip), now);
        }
        let a = p.take_ready(now, MAX_BATCH);
        assert_eq!(a.len(), MAX_BATCH);
        assert_eq!(a[0].item.seq, 0);
        assert_eq!(p.take_ready(now, MAX_BATCH)[0].item.seq, 500);
        assert_eq!(p.take_ready(now, MAX_BATCH).len(), 200);
        assert!(p.take_ready(now, MAX_BATCH).is_empty());
        assert_eq!(p.next_ready(), None);
    }

    #[test]
    fn capacity_drops_the_oldest_and_counts() {
        let now = Instant::now();
        let mut p = Pending::new(2);
        assert!(p
            .push(item(1, "cluster", Action::Ban, "203.0.113.1"), now)
            .is_empty());
        assert!(p
            .push(item(2, "cluster", Action::Ban, "203.0.113.2"), now)
            .is_empty());
        let dropped = p.push(item(3, "cluster", Action::Ban, "203.0.113.3"), now);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].seq, 1);
        assert_eq!(p.dropped(), 1);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn per_item_retry_waits_its_backoff() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(item(1, "cluster", Action::Ban, "203.0.113.1"), now);
        p.push(item(2, "cluster", Action::Ban, "203.0.113.2"), now);
        let mut taken = p.take_ready(now, MAX_BATCH);
        let bad = taken.remove(0);
        let (delay, dropped) = p.retry(bad, now);
        assert!(dropped.is_empty());
        assert_eq!(delay, Duration::from_secs(1));
        assert!(p.take_ready(now, MAX_BATCH).is_empty());
        assert_eq!(p.next_ready(), Some(now + Duration::from_secs(1)));
        let again = p.take_ready(now + Duration::from_secs(1), MAX_BATCH);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempts, 1);
        let (delay, _) = p.retry(again.into_iter().next().unwrap(), now);
        assert_eq!(delay, Duration::from_secs(2));
    }

    #[test]
    fn newer_event_wins_over_a_retried_one() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(item(1, "cluster", Action::Ban, "203.0.113.1"), now);
        let taken = p.take_ready(now, MAX_BATCH);
        // While the ban was in flight, an unban of the same address arrived.
        p.push(item(2, "cluster", Action::Unban, "203.0.113.1"), now);
        p.requeue(taken, now);
        let t = p.take_ready(now, MAX_BATCH);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].item.action(), Action::Unban);
    }

    #[test]
    fn gate_holds_a_whole_jail_including_new_events() {
        let now = Instant::now();
        let mut p = Pending::new(100);
        p.push(item(1, "cluster", Action::Ban, "203.0.113.1"), now);
        p.push(item(2, "sshd", Action::Ban, "203.0.113.2"), now);
        let taken = p.take_ready(now, MAX_BATCH);
        let (cluster, sshd): (Vec<_>, Vec<_>) = taken
            .into_iter()
            .partition(|t| t.item.jail.as_str() == "cluster");
        assert_eq!(sshd.len(), 1);
        let cluster_jail = JailName::new("cluster").unwrap();
        assert_eq!(p.gate_failure(&cluster_jail, now), Duration::from_secs(1));
        p.requeue(cluster, now);
        p.push(item(3, "cluster", Action::Ban, "203.0.113.3"), now);
        assert!(p.take_ready(now, MAX_BATCH).is_empty());
        assert_eq!(p.next_ready(), Some(now + Duration::from_secs(1)));
        let later = now + Duration::from_secs(1);
        assert_eq!(p.gate_failure(&cluster_jail, later), Duration::from_secs(2));
        assert!(p.take_ready(later, MAX_BATCH).is_empty());
        let t = p.take_ready(later + Duration::from_secs(2), MAX_BATCH);
        assert_eq!(t.len(), 2);
        // Attempts of the entries themselves are untouched by a gate failure.
        assert!(t.iter().all(|t| t.attempts == 0));
        p.gate_success(&cluster_jail);
        p.push(item(4, "cluster", Action::Ban, "203.0.113.4"), later);
        assert_eq!(p.take_ready(later, MAX_BATCH).len(), 1);
    }
}
