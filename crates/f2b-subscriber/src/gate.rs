//! Which signed broadcasts may be used: the epoch and sequence rules that stop a
//! validly signed but old broadcast, replayed later, from undoing newer state.
//! (The signature itself is checked by the receive loop before anything else.)
//!
//! # Epochs
//!
//! An event is used only if its epoch is *current*. With catch-up (`[subscriber]
//! snapshot`, served by at least one publisher), an epoch becomes current only
//! when a signed snapshot reply to a fresh request (its nonce) says it is the
//! publisher's epoch: until then the events of that epoch are held (bounded), then
//! those above the snapshot's sequence number are used and the others dropped. An
//! epoch that a publisher's snapshot replaced, or that every publisher's snapshot
//! asked after it was first seen contradicted, is *retired*: its events are dropped
//! at once. Without catch-up nothing can confirm an epoch, so the first epoch seen
//! is adopted on sight; with a single publisher, a new epoch retires the previous
//! one (the publisher lost its ledger: the old epoch never comes back).
//!
//! # Sequence numbers
//!
//! Within a current epoch an event is used only if its `seq` is above every `seq`
//! used before in that epoch (the *event floor*) and above the sequence number of
//! the last snapshot that confirmed the epoch (the *snapshot floor*, which the
//! snapshot already reflects). The publisher numbers its broadcasts 1, 2, 3... and
//! one connection delivers them in order, so a live event is always above both. The
//! only legitimate exception is a publisher's rebroadcast after its own restart
//! (docs/PROTOCOL.md: the same event with its original `seq`): either this
//! subscriber received the original (dropping the copy loses nothing), or it did
//! not, and then it saw the gap (a later `seq`, or the heartbeat's) and asked for a
//! snapshot, which lists the ban or, for an unban, no longer lists it. So ignoring
//! old sequence numbers is safe, and it is what stops a replayed old ban from
//! undoing a newer unban even when the state no longer knows the old event's id.
//! Floors live in memory: after a restart the first snapshot sets them again (and
//! until it does, nothing is used).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use f2b_proto::Epoch;

/// Epochs remembered (floors, retired, awaiting confirmation), each at most.
const MAX_EPOCHS: usize = 16;

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Use it.
    Use,
    /// Its epoch is not confirmed yet: hold it until a snapshot says.
    Hold,
    /// Its `seq` is not above one already used in its epoch: a replay (or a
    /// publisher's rebroadcast of an event used already).
    Replayed { floor: u64 },
    /// Its `seq` is not above the snapshot that confirmed its epoch, which
    /// reflects it.
    Reflected { snapshot: u64 },
    /// Its epoch is no longer (or never was) the publisher's.
    Stale,
}

#[derive(Debug, Clone, Copy, Default)]
struct Floors {
    event: u64,
    snapshot: u64,
    touched: u64,
}

/// The epoch and sequence state of the receive loop.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Whether epochs must be confirmed by a snapshot.
    confirm: bool,
    single_publisher: bool,
    /// The epoch each snapshot target last confirmed.
    confirmed: HashMap<usize, Epoch>,
    /// Epochs adopted on sight (without confirmation).
    sighted: Vec<Epoch>,
    floors: HashMap<Epoch, Floors>,
    retired: VecDeque<Epoch>,
    /// Unconfirmed epochs whose events are held: since when, and which targets
    /// answered, to a request sent after that, with another epoch.
    waiting: HashMap<Epoch, (Instant, HashSet<usize>)>,
    tick: u64,
}

impl Gate {
    pub(crate) fn new(confirm: bool, single_publisher: bool) -> Self {
        Gate {
            confirm,
            single_publisher,
            confirmed: HashMap::new(),
            sighted: Vec::new(),
            floors: HashMap::new(),
            retired: VecDeque::new(),
            waiting: HashMap::new(),
            tick: 0,
        }
    }

    /// Whether epochs wait for a snapshot.
    pub(crate) fn confirming(&self) -> bool {
        self.confirm
    }

    /// No publisher serves snapshots any more: epochs are adopted on sight.
    pub(crate) fn stop_confirming(&mut self) {
        self.confirm = false;
        self.waiting.clear();
    }

    pub(crate) fn is_current(&self, epoch: Epoch) -> bool {
        self.confirmed.values().any(|e| *e == epoch) || self.sighted.contains(&epoch)
    }

    pub(crate) fn is_retired(&self, epoch: Epoch) -> bool {
        self.retired.contains(&epoch)
    }

    fn retire(&mut self, epoch: Epoch) {
        if self.is_current(epoch) || self.retired.contains(&epoch) {
            return;
        }
        if self.retired.len() >= MAX_EPOCHS {
            self.retired.pop_front();
        }
        self.retired.push_back(epoch);
        self.waiting.remove(&epoch);
        self.floors.remove(&epoch);
    }

    fn floors(&mut self, epoch: Epoch) -> &mut Floors {
        self.tick += 1;
        if !self.floors.contains_key(&epoch) && self.floors.len() >= MAX_EPOCHS {
            let current: Vec<Epoch> = self
                .confirmed
                .values()
                .chain(self.sighted.iter())
                .copied()
                .collect();
            if let Some(oldest) = self
                .floors
                .iter()
                .filter(|(e, _)| !current.contains(e))
                .min_by_key(|(_, f)| f.touched)
                .map(|(e, _)| *e)
            {
                self.floors.remove(&oldest);
            }
        }
        let tick = self.tick;
        let f = self.floors.entry(epoch).or_default();
        f.touched = tick;
        f
    }

    /// The verdict on an event of `epoch` numbered `seq`, received `now`. A
    /// [`Verdict::Use`] raises the event floor: ask once per event.
    pub(crate) fn check(&mut self, epoch: Epoch, seq: u64, now: Instant) -> Verdict {
        if self.is_retired(epoch) {
            return Verdict::Stale;
        }
        if !self.is_current(epoch) {
            if self.confirm {
                if !self.waiting.contains_key(&epoch) && self.waiting.len() >= MAX_EPOCHS {
                    return Verdict::Stale;
                }
                self.waiting
                    .entry(epoch)
                    .or_insert_with(|| (now, HashSet::new()));
                return Verdict::Hold;
            }
            if self.single_publisher {
                for old in std::mem::take(&mut self.sighted) {
                    self.retire(old);
                }
            }
            if self.sighted.len() >= MAX_EPOCHS {
                self.sighted.remove(0);
            }
            self.sighted.push(epoch);
        }
        let f = self.floors(epoch);
        if seq <= f.event {
            return Verdict::Replayed { floor: f.event };
        }
        if seq <= f.snapshot {
            return Verdict::Reflected {
                snapshot: f.snapshot,
            };
        }
        f.event = seq;
        Verdict::Use
    }

    /// A snapshot of snapshot target `target`, asked at `asked`, says the epoch is
    /// `epoch` at `seq`; `targets` are the targets that still serve snapshots.
    /// Returns whether an epoch still waits for a snapshot asked after it was first
    /// seen (ask again).
    pub(crate) fn confirm(
        &mut self,
        target: usize,
        epoch: Epoch,
        seq: u64,
        asked: Instant,
        targets: &[usize],
    ) -> bool {
        let old = self.confirmed.insert(target, epoch);
        self.retired.retain(|e| *e != epoch);
        if let Some(old) = old.filter(|o| *o != epoch) {
            self.retire(old);
        }
        let f = self.floors(epoch);
        f.snapshot = f.snapshot.max(seq);
        self.waiting.remove(&epoch);
        let mut again = false;
        let mut gone = Vec::new();
        for (e, (since, against)) in self.waiting.iter_mut() {
            if asked >= *since {
                against.insert(target);
            } else {
                again = true;
            }
            if targets.iter().all(|t| against.contains(t)) {
                gone.push(*e);
            }
        }
        for e in gone {
            self.waiting.remove(&e);
            self.retire(e);
        }
        again
    }

    /// The highest sequence number of `epoch` used or reflected by a snapshot, if
    /// the epoch is current.
    pub(crate) fn high(&self, epoch: Epoch) -> Option<u64> {
        if !self.is_current(epoch) {
            return None;
        }
        self.floors.get(&epoch).map(|f| f.event.max(f.snapshot))
    }

    /// Epochs whose events are held, waiting for a snapshot.
    pub(crate) fn waiting(&self) -> Vec<Epoch> {
        self.waiting.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn without_confirmation_the_first_epoch_is_adopted_and_old_seqs_refused() {
        let now = Instant::now();
        let mut g = Gate::new(false, true);
        let e = Epoch(1);
        assert_eq!(g.check(e, 5, now), Verdict::Use);
        assert_eq!(g.check(e, 6, now), Verdict::Use);
        assert_eq!(g.check(e, 5, now), Verdict::Replayed { floor: 6 });
        assert_eq!(g.check(e, 6, now), Verdict::Replayed { floor: 6 });
        // A gap is fine (recovered by a snapshot, if any).
        assert_eq!(g.check(e, 9, now), Verdict::Use);
        // The only publisher's new epoch retires the old one.
        assert_eq!(g.check(Epoch(2), 1, now), Verdict::Use);
        assert_eq!(g.check(e, 10, now), Verdict::Stale);
        // Several publishers: epochs live side by side.
        let mut g = Gate::new(false, false);
        assert_eq!(g.check(Epoch(1), 1, now), Verdict::Use);
        assert_eq!(g.check(Epoch(2), 1, now), Verdict::Use);
        assert_eq!(g.check(Epoch(1), 2, now), Verdict::Use);
    }

    #[test]
    fn with_confirmation_events_wait_for_a_snapshot_of_their_epoch() {
        let t0 = Instant::now();
        let mut g = Gate::new(true, true);
        let e = Epoch(7);
        assert_eq!(g.check(e, 3, t0), Verdict::Hold);
        assert_eq!(g.waiting(), vec![e]);
        assert!(!g.confirm(0, e, 4, t0, &[0]));
        assert!(g.waiting().is_empty());
        // Reflected by the snapshot, then used, then replayed.
        assert_eq!(g.check(e, 3, t0), Verdict::Reflected { snapshot: 4 });
        assert_eq!(g.check(e, 4, t0), Verdict::Reflected { snapshot: 4 });
        assert_eq!(g.check(e, 5, t0), Verdict::Use);
        assert_eq!(g.check(e, 5, t0), Verdict::Replayed { floor: 5 });
        // A forged or old epoch waits; a snapshot asked after it saw it contradicts
        // it: retired.
        let x = Epoch(9);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(g.check(x, 100, t1), Verdict::Hold);
        // A snapshot asked before the epoch was seen proves nothing: ask again.
        assert!(g.confirm(0, e, 5, t0, &[0]));
        assert_eq!(g.check(x, 101, t1), Verdict::Hold);
        assert!(!g.confirm(0, e, 5, t1 + Duration::from_secs(1), &[0]));
        assert_eq!(g.check(x, 102, t1), Verdict::Stale);
        assert_eq!(g.check(e, 6, t1), Verdict::Use);
    }

    #[test]
    fn a_new_confirmed_epoch_retires_the_old_one() {
        let t = Instant::now();
        let mut g = Gate::new(true, true);
        g.check(Epoch(1), 1, t);
        g.confirm(0, Epoch(1), 1, t, &[0]);
        assert_eq!(g.check(Epoch(2), 1, t), Verdict::Hold);
        g.confirm(0, Epoch(2), 1, t + Duration::from_secs(1), &[0]);
        assert_eq!(g.check(Epoch(1), 50, t), Verdict::Stale);
        assert_eq!(g.check(Epoch(2), 2, t), Verdict::Use);
    }

    #[test]
    fn with_two_publishers_an_epoch_is_retired_only_when_both_deny_it() {
        let t = Instant::now();
        let later = t + Duration::from_secs(1);
        let mut g = Gate::new(true, false);
        assert_eq!(g.check(Epoch(2), 1, t), Verdict::Hold);
        g.confirm(0, Epoch(1), 0, later, &[0, 1]);
        assert_eq!(g.check(Epoch(2), 2, t), Verdict::Hold);
        g.confirm(1, Epoch(2), 1, later, &[0, 1]);
        assert_eq!(g.check(Epoch(2), 2, t), Verdict::Use);
        assert_eq!(g.check(Epoch(3), 1, t), Verdict::Hold);
        g.confirm(0, Epoch(1), 0, later, &[0, 1]);
        assert_eq!(g.check(Epoch(3), 1, t), Verdict::Hold);
        g.confirm(1, Epoch(2), 2, later, &[0, 1]);
        assert_eq!(g.check(Epoch(3), 1, t), Verdict::Stale);
    }

    #[test]
    fn memory_is_bounded() {
        let t = Instant::now();
        let mut g = Gate::new(false, false);
        for i in 0..100 {
            g.check(Epoch(i), 1, t);
        }
        assert!(g.sighted.len() <= MAX_EPOCHS);
        assert!(g.floors.len() <= 2 * MAX_EPOCHS);
        let mut g = Gate::new(true, false);
        for i in 0..100 {
            g.check(Epoch(i), 1, t);
        }
        assert!(g.waiting.len() <= MAX_EPOCHS);
    }
}
