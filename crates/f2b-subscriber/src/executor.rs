//! The intake (filter, then queue) and the executor (queue, then action), two tasks
//! around the shared [`Pending`] queue.
//!
//! The intake never waits for an action, so the receive loop is always drained;
//! the executor takes every entry that is ready (up to [`MAX_BATCH`]) as soon as one
//! is, so a lone ban is applied at once and a burst is batched while the previous
//! call runs.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use f2b_proto::{Action, Epoch, Event, JailName, Sequenced};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::action::{Applier, CallError, FailureScope};
use crate::catchup::Resync;
use crate::filter::{machine_addresses, Filter, SkipReason};
use crate::pending::{group, Group, Item, Pending, Taken, MAX_BATCH};
use crate::ratelimit::RateLimit;
use crate::receiver::{random_id, Input};
use crate::store::{now_ms, State, Tx, SETTLE_DELAY};
use crate::{Notice, Notices};

/// How often the machine's own addresses are read again.
pub const LOCAL_ADDRESS_REFRESH: Duration = Duration::from_secs(60);

/// The queue and the executor's wake-up.
#[derive(Debug)]
pub(crate) struct Shared {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Shared {
    pub(crate) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Shared {
            pending: Mutex::new(Pending::new(capacity)),
            wake: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave Pending inconsistent in a way
        // worse than losing the panicking operation; keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the input: the executor finishes what is ready and returns.
    pub(crate) fn close(&self) {
        self.lock().close();
        self.wake.notify_one();
    }
}

/// Where the machine's addresses come from.
#[derive(Debug, Clone)]
pub(crate) enum LocalAddresses {
    /// The network interfaces, read again every [`LOCAL_ADDRESS_REFRESH`].
    Interfaces,
    /// A fixed list (tests).
    Fixed(Vec<IpAddr>),
}

fn log_dropped(
    dropped: Vec<Item>,
    total: u64,
    limit: &mut RateLimit,
    notices: &Notices,
    state: &State,
) {
    if dropped.is_empty() {
        return;
    }
    // Forgotten, not settled: a later snapshot or broadcast of the same event
    // must not count as a duplicate.
    state.with(|s| s.forget_dropped(&dropped));
    for item in dropped {
        notices.send(Notice::Dropped {
            jail: item.jail.clone(),
            ip: item.ip(),
        });
        if let Some(held) = limit.allow() {
            tracing::error!(
                jail = %item.jail,
                action = %item.action(),
                ip = %item.ip(),
                node = %item.event.node,
                seq = item.seq,
                dropped_total = total,
                held_back = held,
                "pending queue full (queue_size), dropped the oldest event"
            );
        }
    }
}

/// Whether no two of `items` share a queue key (local jail, event jail, address).
fn distinct_keys(items: &[Item]) -> bool {
    if items.len() < 2 {
        // A lone event, the common case: nothing to compare, nothing to allocate.
        return true;
    }
    let mut keys = HashSet::with_capacity(items.len());
    items.iter().all(|i| keys.insert(i.key()))
}

/// Queues `items` (already recorded as pending) and wakes the executor; the items
/// dropped to stay within the bound are settled and reported.
pub(crate) fn enqueue(
    shared: &Shared,
    items: Vec<Item>,
    drops: &mut RateLimit,
    notices: &Notices,
    state: &State,
) {
    let (dropped, total) = push(shared, items, notices);
    log_dropped(dropped, total, drops, notices, state);
}

/// Queues `items` and wakes the executor; returns the items dropped to stay
/// within the bound, and the count of drops so far, for [`log_dropped`].
fn push(shared: &Shared, items: Vec<Item>, notices: &Notices) -> (Vec<Item>, u64) {
    let dropped = {
        let mut p = shared.lock();
        let now = Instant::now();
        let mut d = Vec::new();
        for item in items {
            d.extend(p.push(item, now));
        }
        notices.queued(p.len());
        (d, p.dropped())
    };
    shared.wake.notify_one();
    dropped
}

/// How an event reached the intake, for its log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A broadcast, or a fail2ban-zmq-tools message: `skipped` at info.
    Live,
    /// Listed in a snapshot: `skipped` at debug (every resync lists every ban).
    Snapshot,
}

/// The intake task: filters received events, records and queues the others, and
/// applies snapshots (see [`Intake::resync`]).
pub(crate) struct Intake {
    pub(crate) rx: mpsc::Receiver<Input>,
    pub(crate) filter: Filter,
    pub(crate) local: LocalAddresses,
    pub(crate) ban_jail: Option<JailName>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) notices: Notices,
    pub(crate) state: State,
    /// Whether a lone ban may reach its action before it is recorded pending
    /// ([`Intake::record_and_queue`]): only when a restart's snapshot would
    /// recover it, that is with a snapshot endpoint for every publisher.
    pub(crate) act_first: bool,
}

impl Intake {
    fn refresh_local(&mut self, warned: &mut bool) {
        match &self.local {
            LocalAddresses::Fixed(v) => self.filter.set_local_addresses(v.clone()),
            LocalAddresses::Interfaces => match machine_addresses() {
                Ok(a) => {
                    self.filter.set_local_addresses(a);
                    *warned = false;
                }
                Err(e) => {
                    if !*warned {
                        tracing::warn!(error = %e, "cannot list this machine's addresses");
                        *warned = true;
                    }
                }
            },
        }
    }

    pub(crate) async fn run(mut self) {
        let mut warned = false;
        self.refresh_local(&mut warned);
        let mut refresh = tokio::time::interval_at(
            Instant::now() + LOCAL_ADDRESS_REFRESH,
            LOCAL_ADDRESS_REFRESH,
        );
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drops = RateLimit::new(Duration::from_secs(10));
        let shared = self.shared.clone();
        loop {
            let msg = tokio::select! {
                msg = self.rx.recv() => msg,
                _ = refresh.tick() => {
                    self.refresh_local(&mut warned);
                    let now = now_ms();
                    self.state.with(|s| s.prune(now));
                    self.shared.lock().prune_applied(now);
                    continue;
                }
            };
            match msg {
                Some(Input::Event { event, seq, epoch }) => {
                    self.live(event, seq, epoch, &mut drops).await;
                }
                Some(Input::Events(events)) => self.live_all(events, &mut drops).await,
                // Only `watch` asks for heartbeats.
                Some(Input::Heartbeat { .. }) => {}
                Some(Input::Resync(r)) => {
                    // A snapshot's reconciliation (up to MAX_SNAPSHOT_BANS bans and
                    // the state's held bans) runs off the async workers, logging
                    // through the caller's dispatcher.
                    let dispatch = tracing::dispatcher::get_default(Clone::clone);
                    let job = tokio::task::spawn_blocking(move || {
                        tracing::dispatcher::with_default(&dispatch, || {
                            self.resync(*r, &mut drops);
                            (self, drops)
                        })
                    });
                    match job.await {
                        Ok((me, d)) => {
                            self = me;
                            drops = d;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the resync failed; no more events are taken");
                            break;
                        }
                    }
                }
                None => break,
            }
        }
        shared.close();
    }

    /// Filters one event (`known`: the state knows its id); returns it as an item
    /// to queue, or `None` when it is skipped. The caller records it as pending.
    fn admit(
        &mut self,
        ev: Event,
        seq: u64,
        epoch: Option<Epoch>,
        expires_ms: Option<u64>,
        source: Source,
        known: bool,
    ) -> Option<Item> {
        let skip = if known {
            Some(SkipReason::Duplicate)
        } else {
            self.filter.check(&ev)
        };
        if let Some(reason) = skip {
            if source == Source::Live {
                tracing::info!(
                    reason = %reason,
                    ip = %ev.ip,
                    jail = %ev.jail,
                    action = %ev.action,
                    node = %ev.node,
                    id = %ev.id,
                    seq,
                    "skipped"
                );
            } else {
                tracing::debug!(
                    reason = %reason,
                    ip = %ev.ip,
                    jail = %ev.jail,
                    node = %ev.node,
                    id = %ev.id,
                    seq,
                    "snapshot ban skipped"
                );
            }
            self.notices.send(Notice::Skipped {
                reason,
                jail: ev.jail.clone(),
                ip: ev.ip,
            });
            return None;
        }
        Some(Item {
            jail: self.ban_jail.clone().unwrap_or_else(|| ev.jail.clone()),
            event: ev,
            seq,
            epoch,
            expires_ms,
        })
    }

    /// A live event: filtered, recorded as pending and queued
    /// ([`Intake::record_and_queue`]).
    async fn live(&mut self, event: Event, seq: u64, epoch: Option<Epoch>, drops: &mut RateLimit) {
        let known = self.state.known(&event);
        if let Some(item) = self.admit(event, seq, epoch, None, Source::Live, known) {
            self.record_and_queue(vec![item], drops).await;
        }
    }

    /// Live events received together, in order: each filtered as by
    /// [`Intake::live`], the admitted ones recorded as pending in one state
    /// transaction and queued together.
    async fn live_all(&mut self, events: Vec<Sequenced>, drops: &mut RateLimit) {
        let all: Vec<&Event> = events.iter().map(|s| &s.event).collect();
        // Empty if the lookup failed: then none is known, as with `live`.
        let mut known = self.state.known_all(&all).into_iter();
        let mut items = Vec::with_capacity(events.len());
        for s in events {
            // A repeated id within the list: the filter's recent ids say so.
            let was_known = known.next().unwrap_or(false);
            if let Some(item) =
                self.admit(s.event, s.seq, Some(s.epoch), None, Source::Live, was_known)
            {
                items.push(item);
            }
        }
        self.record_and_queue(items, drops).await;
    }

    /// Records `items` as pending and queues them for the executor.
    ///
    /// When nothing else waits for the intake (a lone message, the common case),
    /// its bans are queued first and recorded after the executor has had its turn:
    /// a lone ban reaches its action without waiting for the state's write. The
    /// executor's settling of an item not recorded yet records it done, and the
    /// pending record that follows would then leave it done: it is not made for
    /// the items the executor settled meanwhile ([`Pending::settled_since_push`]:
    /// the executor hands a settling to the state in the same step, and the state
    /// writes it before any later write ([`State::settle_applied_later`]), so the id has
    /// its row already, or gets it done without the record). Only with
    /// [`Intake::act_first`] and for broadcast bans: a process crash in between
    /// loses the record, and the restart's snapshot, which lists the bans the
    /// cluster holds, is what applies such a ban again (twice is harmless). An
    /// unban, a fail2ban-zmq-tools message or a subscriber without snapshots is
    /// recorded first. Under a burst (more input waiting) everything is recorded
    /// first and the intake goes on taking input, so the executor finds the
    /// burst in its queue and batches it.
    ///
    /// This relies on the intake being the only producer of the queue, recording
    /// each message before it takes the next, and on the items queued first having
    /// distinct keys: a row is always recorded before a later item of the same key
    /// can replace it in the queue, and an item the queue drops (the oldest first)
    /// always has its row.
    async fn record_and_queue(&mut self, items: Vec<Item>, drops: &mut RateLimit) {
        if items.is_empty() {
            return;
        }
        // Two items of one key in one input: the queue keeps the later one, so
        // the earlier one's record would come after the later one's settling and
        // stay pending; such an input records first.
        let act_first = self.act_first
            && self.rx.is_empty()
            && items
                .iter()
                .all(|i| i.action() == Action::Ban && i.epoch.is_some())
            && distinct_keys(&items);
        if !act_first {
            self.record_pending(&items);
            enqueue(&self.shared, items, drops, &self.notices, &self.state);
            return;
        }
        let mut recorded = items.clone();
        let (dropped, total) = push(&self.shared, items, &self.notices);
        tokio::task::yield_now().await;
        {
            let p = self.shared.lock();
            recorded.retain(|i| !p.settled_since_push(i.event.id));
        }
        self.record_pending(&recorded);
        // After the record, as `enqueue` does: a dropped item is forgotten.
        log_dropped(dropped, total, drops, &self.notices, &self.state);
    }

    fn record_pending(&self, items: &[Item]) {
        match items {
            [] => {}
            [one] => self.state.with(|s| s.add_pending(one, now_ms())),
            all => self.state.with(|s| s.add_pending_all(all, now_ms())),
        }
    }

    /// Applies a complete snapshot of one publisher (the Clone pattern):
    ///
    /// 1. each listed ban not expired and not known (applied, pending, or held) goes
    ///    through the filter and is queued;
    /// 2. each held ban of the snapshot's epoch, of a jail the snapshot covers, with
    ///    a sequence number up to the snapshot's, that the snapshot does not list
    ///    and no queued broadcast concerns, was unbanned (or expired) in the cluster
    ///    meanwhile: it is unbanned here (unless another held ban of another jail
    ///    needs the same local jail and address, which the executor checks); a
    ///    pending ban in that situation is dropped, and one being applied is
    ///    followed by an unban;
    /// 3. the broadcasts queued during the fetch follow, except those of the
    ///    snapshot's epoch up to its sequence number, which it already reflects.
    fn resync(&mut self, r: Resync, drops: &mut RateLimit) {
        // One transaction for the whole reconciliation.
        let state = self.state.clone();
        let queue = state.transaction(|tx| self.reconcile(r, tx));
        enqueue(&self.shared, queue, drops, &self.notices, &self.state);
    }

    /// The body of [`Intake::resync`], in the state's transaction `tx`; returns the
    /// items to queue (recorded as pending).
    fn reconcile(&mut self, r: Resync, tx: &mut Tx<'_>) -> Vec<Item> {
        let now = now_ms();
        let epoch = r.epoch;
        let covered = |jail: &JailName| r.jails.is_empty() || r.jails.contains(jail);
        let reflected = |s: &Sequenced| s.epoch == epoch && s.seq <= r.seq;
        let mut keys: HashSet<(JailName, IpAddr)> = r
            .bans
            .iter()
            .map(|b| (b.event.jail.clone(), b.event.ip))
            .collect();
        keys.extend(
            r.queued
                .iter()
                .filter(|s| !reflected(s))
                .map(|s| (s.event.jail.clone(), s.event.ip)),
        );
        let listed = r.bans.len();
        // A ban applied from a broadcast learns its expiry; which ids are known
        // already.
        tx.with(|s| {
            let expiries: Vec<_> = r
                .bans
                .iter()
                .map(|b| (&b.event.jail, b.event.ip, b.event.id, b.expires_ms))
                .collect();
            s.learn_expiries(&expiries)
        });
        if let Some(local) = &self.ban_jail {
            let mut p = self.shared.lock();
            for b in &r.bans {
                p.learn_expiry(local, &b.event.jail, b.event.ip, b.expires_ms);
            }
        }
        let all: Vec<&Event> = r
            .bans
            .iter()
            .map(|b| &b.event)
            .chain(r.queued.iter().map(|s| &s.event))
            .collect();
        let known = tx.with(|s| s.known_all(&all));
        let mut known = known.into_iter();
        let mut queue = Vec::new();
        for ban in r.bans {
            let was_known = known.next().unwrap_or(false);
            if ban.expires_ms <= now {
                let reason = SkipReason::Expired;
                tracing::debug!(reason = %reason, ip = %ban.event.ip, jail = %ban.event.jail, id = %ban.event.id, "snapshot ban skipped");
                self.notices.send(Notice::Skipped {
                    reason,
                    jail: ban.event.jail.clone(),
                    ip: ban.event.ip,
                });
                continue;
            }
            if let Some(item) = self.admit(
                ban.event,
                ban.seq,
                Some(epoch),
                Some(ban.expires_ms),
                Source::Snapshot,
                was_known,
            ) {
                queue.push(item);
            }
        }
        let applied = queue.len();

        // A cut snapshot (MAX_SNAPSHOT_BANS) proves no absence.
        let gone = |jail: &JailName, ip: IpAddr, seq: u64| {
            !r.truncated && seq <= r.seq && covered(jail) && !keys.contains(&(jail.clone(), ip))
        };
        let mut unbanned = 0;
        for h in tx.with(|s| s.held(epoch)) {
            if !gone(&h.jail, h.ip, h.seq) {
                continue;
            }
            // Whether another event jail's ban keeps the local ban is decided by
            // the executor when it takes the unban (see Pending::held_elsewhere).
            let Some(id) = random_id() else {
                tracing::warn!(jail = %h.jail, ip = %h.ip, "cannot draw an event id; the unban is not applied");
                continue;
            };
            let Ok(event) = Event::new(
                id,
                h.node.clone(),
                h.jail.clone(),
                Action::Unban,
                h.ip,
                now.max(1),
            ) else {
                continue;
            };
            tracing::debug!(jail = %h.jail, ip = %h.ip, node = %h.node, id = %h.id, "unbanned in the cluster while away");
            queue.push(Item {
                jail: h.local_jail,
                event,
                seq: r.seq,
                epoch: Some(epoch),
                expires_ms: None,
            });
            unbanned += 1;
        }
        let is_gone = |i: &Item| {
            i.action() == Action::Ban
                && i.epoch == Some(epoch)
                && gone(&i.event.jail, i.event.ip, i.seq)
        };
        let (stale, flying) = {
            let mut p = self.shared.lock();
            let flying: Vec<Item> = p.in_flight().filter(|i| is_gone(i)).cloned().collect();
            (p.remove_where(is_gone), flying)
        };
        // A ban being applied that the snapshot no longer lists: an unban follows
        // it (it replaces the ban if the ban is handed back for a retry).
        for b in flying {
            let Some(id) = random_id() else {
                tracing::warn!(jail = %b.event.jail, ip = %b.ip(), "cannot draw an event id; the unban is not applied");
                continue;
            };
            let Ok(event) = Event::new(
                id,
                b.event.node.clone(),
                b.event.jail.clone(),
                Action::Unban,
                b.ip(),
                now.max(1),
            ) else {
                continue;
            };
            tracing::debug!(jail = %b.event.jail, ip = %b.ip(), node = %b.event.node, id = %b.event.id, "unbanned in the cluster while being applied");
            if queue.iter().any(|q: &Item| {
                q.action() == Action::Unban
                    && q.jail == b.jail
                    && q.event.jail == b.event.jail
                    && q.ip() == b.ip()
            }) {
                continue;
            }
            queue.push(Item {
                jail: b.jail,
                event,
                seq: r.seq,
                epoch: Some(epoch),
                expires_ms: None,
            });
            unbanned += 1;
        }
        if !stale.is_empty() {
            unbanned += stale.len();
            tx.with(|s| s.settle(&stale, false, now));
        }
        tracing::info!(
            reason = %r.reason,
            bans = listed,
            applied,
            unbanned,
            seq = r.seq,
            epoch = %epoch,
            publisher = %r.endpoint,
            "resync"
        );
        self.notices.send(Notice::Resynced {
            reason: r.reason,
            epoch,
            seq: r.seq,
            bans: listed,
            applied,
            unbanned,
        });
        for s in r.queued {
            let was_known = known.next().unwrap_or(false);
            if reflected(&s) {
                tracing::debug!(seq = s.seq, id = %s.event.id, "queued broadcast already in the snapshot");
                continue;
            }
            if let Some(item) =
                self.admit(s.event, s.seq, Some(s.epoch), None, Source::Live, was_known)
            {
                queue.push(item);
            }
        }
        tx.with(|s| s.add_pending_all(&queue, now));
        queue
    }
}

/// Awaits `call` (an action's), writing the events settled later
/// ([`State::settle_applied_later`]) when their time (`flush_at`) comes while the call
/// waits (a slow or hung call, up to its timeout, does not hold them back), or
/// after the call when it has come: never before the call, on its path.
/// Returns the call's output and how long the writes took (not the call's).
async fn flushing<T>(
    state: &State,
    flush_at: &mut Option<Instant>,
    call: impl std::future::Future<Output = T>,
) -> (T, Duration) {
    let mut writing = Duration::ZERO;
    let mut flush = |flush_at: &mut Option<Instant>| {
        // The clock of the call's metric (tokio's may be paused in tests).
        let started = std::time::Instant::now();
        *flush_at = None;
        state.flush();
        writing += started.elapsed();
    };
    let out = match *flush_at {
        None => call.await,
        Some(at) => {
            tokio::pin!(call);
            tokio::select! {
                biased;
                out = &mut call => out,
                _ = tokio::time::sleep_until(at) => {
                    flush(flush_at);
                    call.await
                }
            }
        }
    };
    if flush_at.is_some_and(|at| at <= Instant::now()) {
        flush(flush_at);
    }
    (out, writing)
}

/// Logs that `item` was applied by the action named `via` (the `applied`
/// line, one per event). The store logs it when it writes the event's record
/// ([`State::settle_applied_later`]): up to [`SETTLE_DELAY`] after the action,
/// with the others of that time in one write.
pub(crate) fn log_applied(item: &Item, via: &str) {
    tracing::info!(
        action = %item.action(),
        jail = %item.jail,
        ip = %item.ip(),
        node = %item.event.node,
        seq = item.seq,
        id = %item.event.id,
        via = %via,
        "applied"
    );
}

/// The executor task: applies queued events through the action.
pub(crate) struct Executor {
    pub(crate) applier: Box<dyn Applier>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) notices: Notices,
    state: State,
    unknown_jails: HashSet<JailName>,
    drops: RateLimit,
    /// When the events settled later are to be written ([`State::flush`]).
    flush_at: Option<Instant>,
}

impl Executor {
    pub(crate) fn new(
        applier: Box<dyn Applier>,
        shared: Arc<Shared>,
        notices: Notices,
        state: State,
    ) -> Self {
        Executor {
            applier,
            shared,
            notices,
            state,
            unknown_jails: HashSet::new(),
            drops: RateLimit::new(Duration::from_secs(10)),
            flush_at: None,
        }
    }

    fn skipped(&self, jail: &JailName, reason: SkipReason, t: &Taken) {
        let ip = t.item.ip();
        tracing::info!(
            reason = %reason,
            ip = %ip,
            jail = %jail,
            action = %t.item.action(),
            node = %t.item.event.node,
            id = %t.item.event.id,
            seq = t.item.seq,
            "skipped"
        );
        self.notices.send(Notice::Skipped {
            reason,
            jail: jail.clone(),
            ip,
        });
    }

    /// Records `skipped` as settled (never to be applied).
    fn settle_skipped(&self, skipped: Vec<Taken>) {
        if !skipped.is_empty() {
            let items: Vec<Item> = skipped.into_iter().map(|t| t.item).collect();
            {
                let mut p = self.shared.lock();
                for i in &items {
                    p.settled(i, false, now_ms());
                }
            }
            self.state.with(|s| s.settle(&items, false, now_ms()));
        }
    }

    /// Takes out of `items` (unbans) those of an event jail whose local ban another
    /// event jail still holds (`ban_jail`): that jail no longer holds it, the local
    /// ban stays.
    fn keep_held_bans(&self, jail: &JailName, items: Vec<Taken>) -> Vec<Taken> {
        let (kept, go): (Vec<Taken>, Vec<Taken>) = {
            let mut p = self.shared.lock();
            let mut kept = Vec::new();
            let mut go = Vec::new();
            for t in items {
                if p.held_elsewhere(&t.item) {
                    p.settled(&t.item, false, now_ms());
                    kept.push(t);
                } else {
                    go.push(t);
                }
            }
            (kept, go)
        };
        if !kept.is_empty() {
            for t in &kept {
                self.skipped(jail, SkipReason::HeldByOtherJail, t);
            }
            // Settled as applied: the event jail's held ban is forgotten.
            let items: Vec<Item> = kept.into_iter().map(|t| t.item).collect();
            self.state.with(|s| s.settle(&items, true, now_ms()));
        }
        go
    }

    /// Runs until the input is closed and nothing is ready; entries still waiting
    /// for a retry then are reported and given up. The applied events are
    /// recorded in the state within [`SETTLE_DELAY`] ([`State::settle_applied_later`]),
    /// and all of them before it returns.
    pub(crate) async fn run(mut self) {
        loop {
            let now = Instant::now();
            let (batch, next, closed) = {
                let mut p = self.shared.lock();
                let b = p.take_ready(now, MAX_BATCH);
                self.notices.queued(p.len());
                (b, p.next_ready(), p.is_closed())
            };
            if batch.is_empty() {
                // Idle: the records are written when their time has come (with
                // a batch ready, after its first call instead: see `flushing`).
                if self.flush_at.is_some_and(|at| at <= now) {
                    self.flush_at = None;
                    self.state.flush();
                }
                if closed {
                    self.state.flush();
                    let left = self.shared.lock().len();
                    if left > 0 {
                        tracing::warn!(
                            count = left,
                            "stopping with events not applied (waiting for a retry); they are applied after the restart"
                        );
                    }
                    return;
                }
                let wait = match (next, self.flush_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                match wait {
                    Some(at) => tokio::select! {
                        _ = self.shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    },
                    None => self.shared.wake.notified().await,
                }
                continue;
            }
            for g in group(batch) {
                self.apply_group(g).await;
            }
        }
    }

    async fn apply_group(&mut self, g: Group) {
        let Group {
            jail,
            action,
            mut items,
        } = g;
        if action == Action::Ban {
            // A ban the cluster no longer holds is not applied.
            let now = now_ms();
            let (expired, live): (Vec<Taken>, Vec<Taken>) =
                items.into_iter().partition(|t| t.item.expired(now));
            items = live;
            for t in &expired {
                self.skipped(&jail, SkipReason::Expired, t);
            }
            self.settle_skipped(expired);
            if items.is_empty() {
                return;
            }
            let ignores = self.applier.jail_ignores(&jail);
            match flushing(&self.state, &mut self.flush_at, ignores).await.0 {
                Ok(ignores) => {
                    let (ignored, kept): (Vec<Taken>, Vec<Taken>) =
                        items.into_iter().partition(|t| {
                            let ip = t.item.ip();
                            ignores.nets.iter().any(|n| n.contains(&ip))
                        });
                    items = kept;
                    for t in &ignored {
                        self.skipped(&jail, SkipReason::IgnoreIpOfJail, t);
                    }
                    self.settle_skipped(ignored);
                }
                Err(e) => {
                    self.whole_failure(&jail, action, items, e);
                    return;
                }
            }
        } else {
            items = self.keep_held_bans(&jail, items);
            if items.is_empty() {
                return;
            }
        }
        let max = self.applier.max_batch().max(1);
        // Chunks of at most `max`, first chunk on top of the stack.
        let mut stack: Vec<Vec<Taken>> = Vec::new();
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(max));
            stack.push(std::mem::replace(&mut items, rest));
        }
        stack.reverse();
        while let Some(chunk) = stack.pop() {
            let plain: Vec<Item> = chunk.iter().map(|t| t.item.clone()).collect();
            let started = std::time::Instant::now();
            let call = self.applier.apply(&jail, action, &plain);
            let (result, writing) = flushing(&self.state, &mut self.flush_at, call).await;
            if let Some(m) = self.notices.metrics() {
                // The call's time, without the state's writes made meanwhile.
                let took = started.elapsed().saturating_sub(writing);
                m.apply_duration.observe(took.as_secs_f64());
            }
            match result {
                Ok(()) => self.success(&jail, action, chunk),
                Err(e) if e.scope != FailureScope::Undetermined => {
                    let mut all = chunk;
                    all.extend(stack.drain(..).flatten());
                    self.whole_failure(&jail, action, all, e);
                    return;
                }
                Err(e) if chunk.len() > 1 => {
                    // Which address failed? Try each half.
                    tracing::debug!(jail = %jail, action = %action, count = chunk.len(), error = %e, "batch failed, splitting");
                    let mut first = chunk;
                    let second = first.split_off(first.len() / 2);
                    stack.push(second);
                    stack.push(first);
                }
                Err(e) => {
                    for t in chunk {
                        self.item_failure(&jail, action, t, &e);
                    }
                }
            }
        }
    }

    fn success(&mut self, jail: &JailName, action: Action, chunk: Vec<Taken>) {
        let items: Vec<Item> = chunk.iter().map(|t| t.item.clone()).collect();
        {
            let mut p = self.shared.lock();
            p.gate_success(jail);
            for i in &items {
                p.settled(i, true, now_ms());
            }
        }
        // Their `applied` lines are logged as their records are written.
        if self
            .state
            .settle_applied_later(items, self.applier.name(), now_ms())
        {
            self.flush_at = Some(Instant::now() + SETTLE_DELAY);
        }
        if self.unknown_jails.remove(jail) {
            tracing::info!(jail = %jail, "local jail exists now, applying its events");
        }
        for t in chunk {
            let i = &t.item;
            self.notices.send(Notice::Applied {
                action,
                jail: jail.clone(),
                ip: i.ip(),
                seq: i.seq,
            });
        }
    }

    fn whole_failure(&mut self, jail: &JailName, action: Action, items: Vec<Taken>, e: CallError) {
        let ips: Vec<IpAddr> = items.iter().map(|t| t.item.ip()).collect();
        let now = Instant::now();
        let (delay, dropped, total) = {
            let mut p = self.shared.lock();
            let delay = p.gate_failure(jail, now);
            let dropped = p.requeue(items, now);
            self.notices.queued(p.len());
            (delay, dropped, p.dropped())
        };
        if let Some(m) = self.notices.metrics() {
            m.retries.inc_by(ips.len() as u64);
        }
        if e.scope == FailureScope::UnknownJail {
            if self.unknown_jails.insert(jail.clone()) {
                tracing::error!(
                    jail = %jail,
                    error = %e.message,
                    via = %self.applier.name(),
                    "local jail does not exist: its events are kept and retried until it does (check ban_jail / jail.local)"
                );
            } else {
                tracing::debug!(jail = %jail, error = %e.message, retry_in = ?delay, "local jail still missing");
            }
        } else {
            tracing::warn!(
                jail = %jail,
                action = %action,
                count = ips.len(),
                error = %e.message,
                retry_in = ?delay,
                via = %self.applier.name(),
                "action failed, will retry"
            );
        }
        self.notices.send(Notice::Failed {
            scope: e.scope,
            jail: jail.clone(),
            ips,
            message: e.message,
        });
        log_dropped(dropped, total, &mut self.drops, &self.notices, &self.state);
    }

    fn item_failure(&mut self, jail: &JailName, action: Action, t: Taken, e: &CallError) {
        let ip = t.item.ip();
        let (delay, dropped, total) = {
            let mut p = self.shared.lock();
            let (delay, dropped) = p.retry(t, Instant::now());
            self.notices.queued(p.len());
            (delay, dropped, p.dropped())
        };
        if let Some(m) = self.notices.metrics() {
            m.retries.inc();
        }
        tracing::warn!(
            jail = %jail,
            action = %action,
            ip = %ip,
            error = %e.message,
            retry_in = ?delay,
            via = %self.applier.name(),
            "action failed, will retry"
        );
        self.notices.send(Notice::Failed {
            scope: e.scope,
            jail: jail.clone(),
            ips: vec![ip],
            message: e.message.clone(),
        });
        log_dropped(dropped, total, &mut self.drops, &self.notices, &self.state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::BoxFuture;
    use f2b_proto::{Event, EventId, NodeName};
    use tokio::sync::Semaphore;

    type Script = Box<dyn Fn(usize, &[IpAddr]) -> Result<(), CallError> + Send>;
    /// One recorded call: when, jail, action, addresses.
    type Call = (Instant, String, Action, Vec<IpAddr>);
    type Calls = Arc<Mutex<Vec<Call>>>;

    /// A scripted action: records each call (time, jail, action, addresses) and
    /// answers with `script(call_number, addresses)`. Calls wait for a permit of
    /// `gate` when one is set.
    struct Fake {
        calls: Calls,
        script: Script,
        gate: Option<Arc<Semaphore>>,
        max: usize,
    }

    impl std::fmt::Debug for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Fake")
        }
    }

    impl Applier for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn max_batch(&self) -> usize {
            self.max
        }
        fn apply<'a>(
            &'a mut self,
            jail: &'a JailName,
            action: Action,
            items: &'a [Item],
        ) -> BoxFuture<'a, Result<(), CallError>> {
            Box::pin(async move {
                if let Some(g) = &self.gate {
                    g.acquire().await.unwrap().forget();
                }
                let ips: Vec<IpAddr> = items.iter().map(Item::ip).collect();
                let n = {
                    let mut c = self.calls.lock().unwrap();
                    c.push((Instant::now(), jail.to_string(), action, ips.clone()));
                    c.len()
                };
                (self.script)(n, &ips)
            })
        }
    }

    fn item(n: u32, jail: &str, action: Action) -> Item {
        let ip = IpAddr::from(std::net::Ipv4Addr::from(0xCB00_7100 + n));
        Item::new(
            JailName::new(jail).unwrap(),
            Event::new(
                EventId::from_u128(n.into()),
                NodeName::new("web2").unwrap(),
                JailName::new("sshd").unwrap(),
                action,
                ip,
                1_763_702_000_000,
            )
            .unwrap(),
            n.into(),
        )
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0xCB00_7100 + n))
    }

    struct Rig {
        tx: Notices,
        drops: RateLimit,
        state: State,
        _dir: tempfile::TempDir,
        shared: Arc<Shared>,
        calls: Calls,
        notices: mpsc::UnboundedReceiver<Notice>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Rig {
        fn new(script: Script, gate: Option<Arc<Semaphore>>, max: usize, capacity: usize) -> Rig {
            let calls = Arc::new(Mutex::new(Vec::new()));
            let shared = Shared::new(capacity);
            let (tx, notices) = mpsc::unbounded_channel();
            let fake = Fake {
                calls: calls.clone(),
                script,
                gate,
                max,
            };
            let tx = Notices::to(tx);
            let (state, dir) = State::temp();
            let task = tokio::spawn(
                Executor::new(Box::new(fake), shared.clone(), tx.clone(), state.clone()).run(),
            );
            Rig {
                tx,
                drops: RateLimit::new(Duration::ZERO),
                state,
                _dir: dir,
                shared,
                calls,
                notices,
                task,
            }
        }

        /// Queues like the intake does.
        fn push(&mut self, item: Item) {
            let (dropped, total) = {
                let mut p = self.shared.lock();
                (p.push(item, Instant::now()), p.dropped())
            };
            self.shared.wake.notify_one();
            log_dropped(dropped, total, &mut self.drops, &self.tx, &self.state);
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        /// The next notice; fails the test after an hour of (paused) time, so a
        /// bug that retries forever ends the test instead of running away.
        async fn next(&mut self) -> Notice {
            tokio::time::timeout(Duration::from_secs(3600), self.notices.recv())
                .await
                .expect("no notice within an hour of test time")
                .expect("executor alive")
        }

        /// How long after `since` the state had its first done record written,
        /// in test time: it is looked at every millisecond of paused time (the
        /// write is internal, nothing announces it), for at most a minute.
        async fn first_record_written(&self, since: Instant) -> Duration {
            while self.state.written_counts().done == 0 {
                assert!(
                    since.elapsed() < Duration::from_secs(60),
                    "not written a minute (of test time) after it was applied"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            since.elapsed()
        }

        async fn applied(&mut self, n: usize) -> Vec<IpAddr> {
            let mut got = Vec::new();
            while got.len() < n {
                if let Notice::Applied { ip, .. } = self.next().await {
                    got.push(ip);
                }
            }
            got
        }
    }

    fn ok() -> Script {
        Box::new(|_, _| Ok(()))
    }

    #[tokio::test(start_paused = true)]
    async fn lone_ban_goes_at_once_and_a_burst_is_batched() {
        let gate = Arc::new(Semaphore::new(0));
        let mut rig = Rig::new(ok(), Some(gate.clone()), MAX_BATCH, 1000);
        let t0 = Instant::now();
        rig.push(item(1, "cluster", Action::Ban));
        // While the first call is in flight, a burst arrives.
        tokio::task::yield_now().await;
        rig.push(item(2, "cluster", Action::Ban));
        rig.push(item(3, "cluster", Action::Unban));
        rig.push(item(4, "cluster", Action::Ban));
        rig.push(item(2, "cluster", Action::Unban)); // coalesced: 2 is unbanned
        rig.push(item(5, "sshd", Action::Ban));
        gate.add_permits(100);
        rig.applied(5).await;
        let calls = rig.calls();
        let shape: Vec<(String, Action, Vec<IpAddr>)> = calls
            .iter()
            .map(|(_, j, a, i)| (j.clone(), *a, i.clone()))
            .collect();
        assert_eq!(
            shape,
            [
                ("cluster".into(), Action::Ban, vec![ip(1)]),
                ("cluster".into(), Action::Unban, vec![ip(3), ip(2)]),
                ("cluster".into(), Action::Ban, vec![ip(4)]),
                ("sshd".into(), Action::Ban, vec![ip(5)]),
            ]
        );
        // Nothing waited for a batch to fill: the paused clock never moved.
        assert!(calls.iter().all(|(at, ..)| *at == t0));
        rig.shared.close();
        rig.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn applied_events_are_recorded_within_the_settle_delay_and_at_the_end() {
        let mut rig = Rig::new(ok(), None, MAX_BATCH, 1000);
        rig.push(item(1, "cluster", Action::Ban));
        rig.applied(1).await;
        let applied_at = Instant::now();
        // Known at once, written later, by itself: no more input comes.
        assert!(rig.state.known(&item(1, "cluster", Action::Ban).event));
        assert_eq!(rig.state.written_counts().done, 0);
        let waited = rig.first_record_written(applied_at).await;
        assert!(
            waited >= SETTLE_DELAY - Duration::from_millis(1) && waited <= SETTLE_DELAY * 2,
            "written {waited:?} after it was applied"
        );
        // The last ones are written when the executor ends.
        rig.push(item(2, "cluster", Action::Ban));
        rig.applied(1).await;
        assert_eq!(rig.state.written_counts().done, 1);
        rig.shared.close();
        (&mut rig.task).await.unwrap();
        assert_eq!(rig.state.written_counts().done, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_does_not_hold_back_the_records_of_the_events_applied_before() {
        let gate = Arc::new(Semaphore::new(1));
        let mut rig = Rig::new(ok(), Some(gate.clone()), MAX_BATCH, 1000);
        rig.push(item(1, "cluster", Action::Ban));
        rig.applied(1).await;
        // The next call waits for the gate, as a hung fail2ban-client would.
        rig.push(item(2, "sshd", Action::Ban));
        let applied_at = Instant::now();
        assert!(rig.first_record_written(applied_at).await <= SETTLE_DELAY * 2);
        assert_eq!(rig.calls().len(), 1, "the second call is still waiting");
        gate.add_permits(1);
        assert_eq!(rig.applied(1).await, [ip(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_cut_at_max_batch() {
        let mut rig = Rig::new(ok(), None, 3, 1000);
        for n in 0..7 {
            rig.shared
                .lock()
                .push(item(n, "cluster", Action::Ban), Instant::now());
        }
        rig.shared.wake.notify_one();
        rig.applied(7).await;
        let sizes: Vec<usize> = rig.calls().iter().map(|c| c.3.len()).collect();
        assert_eq!(sizes, [3, 3, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn bisects_to_the_failing_address_and_resends_only_it() {
        let bad = ip(2);
        let script: Script = Box::new(move |n, ips| {
            // The bad address fails until the 7th call.
            if ips.contains(&bad) && n < 7 {
                Err(CallError::new(FailureScope::Undetermined, "rejected"))
            } else {
                Ok(())
            }
        });
        let mut rig = Rig::new(script, None, MAX_BATCH, 1000);
        let t0 = Instant::now();
        for n in 0..4 {
            rig.shared.lock().push(item(n, "cluster", Action::Ban), t0);
        }
        rig.shared.wake.notify_one();
        rig.applied(4).await;
        let calls = rig.calls();
        let shape: Vec<Vec<IpAddr>> = calls.iter().map(|c| c.3.clone()).collect();
        assert_eq!(
            shape,
            [
                vec![ip(0), ip(1), ip(2), ip(3)],
                vec![ip(0), ip(1)],
                vec![ip(2), ip(3)],
                vec![ip(2)],
                vec![ip(3)],
                vec![ip(2)],
                vec![ip(2)],
            ]
        );
        // The failing address alone is retried, after 1 s then 2 s.
        assert_eq!(calls[5].0 - t0, Duration::from_secs(1));
        assert_eq!(calls[6].0 - t0, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn whole_call_failures_back_off_and_keep_everything() {
        let script: Script = Box::new(|n, _| match n {
            1..=4 => Err(CallError::new(
                FailureScope::Call,
                "Failed to access socket path",
            )),
            _ => Ok(()),
        });
        let mut rig = Rig::new(script, None, MAX_BATCH, 1000);
        let t0 = Instant::now();
        rig.push(item(1, "cluster", Action::Ban));
        rig.push(item(2, "cluster", Action::Ban));
        let got = rig.applied(2).await;
        assert_eq!(got, [ip(1), ip(2)]);
        let calls = rig.calls();
        let at: Vec<u64> = calls.iter().map(|c| (c.0 - t0).as_secs()).collect();
        // The first call may hold one address or both (the second push can arrive
        // while it runs); from then on, every retry has both.
        assert_eq!(at[at.len() - 4..], [1, 3, 7, 15]);
        assert_eq!(calls.last().unwrap().3, [ip(1), ip(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_jail_is_retried_and_reported_once() {
        let script: Script = Box::new(|n, _| match n {
            1..=3 => Err(CallError::new(
                FailureScope::UnknownJail,
                "Sorry but the jail 'cluster' does not exist",
            )),
            _ => Ok(()),
        });
        let logs = crate::tests::capture_logs();
        let mut rig = Rig::new(script, None, MAX_BATCH, 1000);
        rig.push(item(1, "cluster", Action::Ban));
        rig.applied(1).await;
        let text = logs.text();
        assert_eq!(
            text.matches("local jail does not exist").count(),
            1,
            "{text}"
        );
        assert!(text.contains("ERROR"), "{text}");
        assert!(!text.contains("action failed, will retry"), "{text}");
        assert!(text.contains("local jail exists now"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_bound_drops_the_oldest_with_an_error() {
        let logs = crate::tests::capture_logs();
        let script: Script = Box::new(|_, _| Err(CallError::new(FailureScope::Call, "down")));
        let mut rig = Rig::new(script, None, MAX_BATCH, 2);
        rig.push(item(1, "cluster", Action::Ban));
        rig.push(item(2, "cluster", Action::Ban));
        rig.push(item(3, "cluster", Action::Ban));
        loop {
            if let Notice::Dropped { ip: dropped, .. } = rig.next().await {
                assert_eq!(dropped, ip(1));
                break;
            }
        }
        assert_eq!(rig.shared.lock().dropped(), 1);
        assert!(
            logs.text().contains("dropped the oldest event"),
            "{}",
            logs.text()
        );
    }

    /// An event of event jail `jail` for address `ip(n)`, applied in "cluster".
    fn in_cluster(id: u128, jail: &str, action: Action, n: u32) -> Item {
        Item::new(
            JailName::new("cluster").unwrap(),
            Event::new(
                EventId::from_u128(id),
                NodeName::new("web2").unwrap(),
                JailName::new(jail).unwrap(),
                action,
                ip(n),
                1_763_702_000_000,
            )
            .unwrap(),
            id as u64,
        )
    }

    /// The next applied or skipped notice: (action or reason, address).
    async fn outcome(rig: &mut Rig) -> (String, IpAddr) {
        loop {
            match rig.next().await {
                Notice::Applied { action, ip, .. } => return (action.to_string(), ip),
                Notice::Skipped { reason, ip, .. } => return (reason.to_string(), ip),
                _ => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unban_of_one_jail_keeps_another_jails_ban_in_the_shared_local_jail() {
        let mut rig = Rig::new(ok(), None, MAX_BATCH, 1000);
        // (a) applied ban of sshd, then an unban of nginx: the local ban stays.
        rig.push(in_cluster(1, "sshd", Action::Ban, 1));
        assert_eq!(outcome(&mut rig).await, ("ban".into(), ip(1)));
        rig.push(in_cluster(2, "nginx", Action::Unban, 1));
        assert_eq!(
            outcome(&mut rig).await,
            ("held_by_other_jail".into(), ip(1))
        );
        // The last holder's unban is applied.
        rig.push(in_cluster(3, "sshd", Action::Unban, 1));
        assert_eq!(outcome(&mut rig).await, ("unban".into(), ip(1)));
        // (b) a waiting ban of sshd is not replaced by an unban of nginx.
        rig.push(in_cluster(4, "sshd", Action::Ban, 2));
        rig.push(in_cluster(5, "nginx", Action::Unban, 2));
        let mut got = vec![outcome(&mut rig).await, outcome(&mut rig).await];
        got.sort();
        assert_eq!(
            got,
            [("ban".into(), ip(2)), ("held_by_other_jail".into(), ip(2))]
        );
        // Two holders: each unban but the last keeps the ban.
        rig.push(in_cluster(6, "nginx", Action::Ban, 3));
        rig.push(in_cluster(7, "sshd", Action::Ban, 3));
        assert_eq!(outcome(&mut rig).await, ("ban".into(), ip(3)));
        assert_eq!(outcome(&mut rig).await, ("ban".into(), ip(3)));
        rig.push(in_cluster(8, "sshd", Action::Unban, 3));
        assert_eq!(
            outcome(&mut rig).await,
            ("held_by_other_jail".into(), ip(3))
        );
        rig.push(in_cluster(9, "nginx", Action::Unban, 3));
        assert_eq!(outcome(&mut rig).await, ("unban".into(), ip(3)));
        let unbans: Vec<Vec<IpAddr>> = rig
            .calls()
            .into_iter()
            .filter(|c| c.2 == Action::Unban)
            .map(|c| c.3)
            .collect();
        assert_eq!(unbans, [vec![ip(1)], vec![ip(3)]]);
    }

    #[tokio::test(start_paused = true)]
    async fn without_ban_jail_jails_are_independent() {
        let mut rig = Rig::new(ok(), None, MAX_BATCH, 1000);
        let mut a = in_cluster(1, "sshd", Action::Ban, 1);
        a.jail = JailName::new("sshd").unwrap();
        let mut b = in_cluster(2, "nginx", Action::Unban, 1);
        b.jail = JailName::new("nginx").unwrap();
        rig.push(a);
        assert_eq!(outcome(&mut rig).await, ("ban".into(), ip(1)));
        rig.push(b);
        assert_eq!(outcome(&mut rig).await, ("unban".into(), ip(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_events_are_not_known_afterwards() {
        let script: Script = Box::new(|_, _| Err(CallError::new(FailureScope::Call, "down")));
        let mut rig = Rig::new(script, None, MAX_BATCH, 1);
        let first = item(1, "cluster", Action::Ban);
        let event = first.event.clone();
        rig.state.with(|s| s.add_pending(&first, now_ms()));
        assert!(rig.state.with(|s| s.known(&event)));
        rig.push(first);
        let second = item(2, "cluster", Action::Ban);
        rig.state.with(|s| s.add_pending(&second, now_ms()));
        rig.push(second);
        loop {
            if let Notice::Dropped { ip: dropped, .. } = rig.next().await {
                assert_eq!(dropped, ip(1));
                break;
            }
        }
        // A later snapshot or re-broadcast of it is not a duplicate.
        assert!(!rig.state.with(|s| s.known(&event)));
        assert_eq!(rig.state.with(|s| s.counts()).pending, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn resync_unbans_a_ban_being_applied_that_it_does_not_list() {
        let (mut intake, shared, _dir) = intake_with(
            vec![],
            Some(JailName::new("cluster").unwrap()),
            Notices::default(),
        );
        let epoch = Epoch(7);
        let mut ban = in_cluster(5, "sshd", Action::Ban, 1);
        ban.epoch = Some(epoch);
        let mut kept = in_cluster(6, "nginx", Action::Ban, 2);
        kept.epoch = Some(epoch);
        for i in [&ban, &kept] {
            intake.state.with(|s| s.add_pending(i, now_ms()));
            shared.lock().push(i.clone(), Instant::now());
        }
        // The executor took both and is applying them.
        let taken = shared.lock().take_ready(Instant::now(), MAX_BATCH);
        assert_eq!(taken.len(), 2);
        let listed = f2b_proto::ActiveBan {
            seq: kept.seq,
            expires_ms: now_ms() + 3_600_000,
            event: kept.event.clone(),
        };
        intake.resync(
            Resync {
                reason: crate::catchup::ResyncReason::Start,
                endpoint: "tcp://127.0.0.1:1".into(),
                target: 0,
                asked: std::time::Instant::now(),
                epoch,
                seq: 10,
                jails: Vec::new(),
                bans: vec![listed],
                queued: Vec::new(),
                truncated: false,
            },
            &mut RateLimit::new(Duration::ZERO),
        );
        let queued = shared.lock().take_ready(Instant::now(), MAX_BATCH);
        let got: Vec<(String, Action, IpAddr)> = queued
            .iter()
            .map(|t| (t.item.event.jail.to_string(), t.item.action(), t.item.ip()))
            .collect();
        assert_eq!(got, [("sshd".into(), Action::Unban, ip(1))]);
        assert_eq!(queued[0].item.jail.as_str(), "cluster");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_snapshot_unbans_nothing_for_being_absent() {
        let (mut intake, shared, _dir) = intake_with(vec![], None, Notices::default());
        let epoch = Epoch(7);
        let mut held = item(1, "sshd", Action::Ban);
        held.epoch = Some(epoch);
        intake.state.with(|s| s.settle(&[held], true, now_ms()));
        let resync = |truncated| Resync {
            reason: crate::catchup::ResyncReason::Start,
            endpoint: "tcp://127.0.0.1:1".into(),
            target: 0,
            asked: std::time::Instant::now(),
            epoch,
            seq: 10,
            jails: Vec::new(),
            bans: Vec::new(),
            queued: Vec::new(),
            truncated,
        };
        let mut drops = RateLimit::new(Duration::ZERO);
        intake.resync(resync(true), &mut drops);
        assert!(shared.lock().is_empty());
        intake.resync(resync(false), &mut drops);
        let t = shared.lock().take_ready(Instant::now(), MAX_BATCH);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].item.action(), Action::Unban);
    }

    #[tokio::test(start_paused = true)]
    async fn close_applies_what_is_ready_and_stops() {
        let gate = Arc::new(Semaphore::new(0));
        let mut rig = Rig::new(ok(), Some(gate.clone()), MAX_BATCH, 100);
        rig.push(item(1, "cluster", Action::Ban));
        tokio::task::yield_now().await;
        rig.push(item(2, "cluster", Action::Ban));
        rig.shared.close();
        gate.add_permits(10);
        (&mut rig.task).await.unwrap();
        assert_eq!(rig.applied(2).await, [ip(1), ip(2)]);
    }

    /// An intake of node web1 with the `local` addresses fixed, its state in the
    /// returned directory; nothing will come on its channel.
    fn intake_with(
        local: Vec<IpAddr>,
        ban_jail: Option<JailName>,
        notices: Notices,
    ) -> (Intake, Arc<Shared>, tempfile::TempDir) {
        let (state, dir) = State::temp();
        let shared = Shared::new(100);
        let (_tx, rx) = mpsc::channel(1);
        let intake = Intake {
            rx,
            filter: Filter::new(NodeName::new("web1").unwrap(), Vec::new()),
            local: LocalAddresses::Fixed(local),
            ban_jail,
            shared: shared.clone(),
            notices,
            state,
            act_first: true,
        };
        (intake, shared, dir)
    }

    fn intake(notices: Notices) -> (Intake, Arc<Shared>, tempfile::TempDir) {
        let (mut intake, shared, dir) = intake_with(vec![ip(9)], None, notices);
        intake.refresh_local(&mut false);
        (intake, shared, dir)
    }

    #[tokio::test(start_paused = true)]
    async fn events_received_together_are_taken_as_one_by_one() {
        let epoch = Epoch(7);
        let sequenced = |id: u128, node: &str, n: u32| Sequenced {
            seq: id as u64,
            epoch,
            event: Event::new(
                EventId::from_u128(id),
                NodeName::new(node).unwrap(),
                JailName::new("sshd").unwrap(),
                Action::Ban,
                ip(n),
                1_763_702_000_000,
            )
            .unwrap(),
        };
        let mut again = sequenced(4, "web2", 4);
        again.seq = 5;
        let list = vec![
            sequenced(1, "web2", 1),
            // Known to the state already (applied before a restart).
            sequenced(2, "web2", 2),
            // Own node; this machine's address.
            sequenced(3, "web1", 3),
            sequenced(4, "web2", 9),
            // The id of an event before it in the same list.
            again,
            sequenced(6, "web2", 6),
        ];
        let run = async |together: bool| {
            let (ntx, mut nrx) = mpsc::unbounded_channel();
            let (mut intake, shared, dir) = intake(Notices::to(ntx));
            let known = Item::new(
                JailName::new("sshd").unwrap(),
                list[1].event.clone(),
                list[1].seq,
            );
            intake.state.with(|s| s.settle(&[known], true, now_ms()));
            let mut drops = RateLimit::new(Duration::ZERO);
            if together {
                intake.live_all(list.clone(), &mut drops).await;
            } else {
                for s in list.clone() {
                    intake.live(s.event, s.seq, Some(s.epoch), &mut drops).await;
                }
            }
            let queued: Vec<(u64, IpAddr)> = shared
                .lock()
                .take_ready(Instant::now(), MAX_BATCH)
                .iter()
                .map(|t| (t.item.seq, t.item.ip()))
                .collect();
            let pending: Vec<(u64, Option<Epoch>)> = intake
                .state
                .with(|s| s.pending())
                .iter()
                .map(|i| (i.seq, i.epoch))
                .collect();
            let mut notices = Vec::new();
            while let Ok(n) = nrx.try_recv() {
                notices.push(n);
            }
            drop(dir);
            (queued, pending, notices)
        };
        let (queued, pending, notices) = run(true).await;
        assert_eq!(queued, [(1, ip(1)), (6, ip(6))]);
        assert_eq!(pending, [(1, Some(epoch)), (6, Some(epoch))]);
        let reasons: Vec<SkipReason> = notices
            .iter()
            .filter_map(|n| match n {
                Notice::Skipped { reason, .. } => Some(*reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            reasons,
            [
                SkipReason::Duplicate,
                SkipReason::OwnNode,
                SkipReason::LocalAddress,
                SkipReason::Duplicate
            ]
        );
        assert_eq!((queued, pending, notices), run(false).await);
    }

    /// An intake and an executor around one state.
    struct Pair {
        intake: Intake,
        /// The intake's input, kept open.
        tx: mpsc::Sender<Input>,
        /// At each call of the executor's fake action, how many events the state
        /// had pending.
        seen: Arc<Mutex<Vec<usize>>>,
        notices: mpsc::UnboundedReceiver<Notice>,
        _dir: tempfile::TempDir,
    }

    fn intake_and_executor() -> Pair {
        let (ntx, notices) = mpsc::unbounded_channel();
        let (mut intake, shared, dir) = intake_with(vec![ip(9)], None, Notices::to(ntx));
        let (tx, rx) = mpsc::channel(8);
        intake.rx = rx;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (state, at_call) = (intake.state.clone(), seen.clone());
        let fake = Fake {
            calls: Arc::new(Mutex::new(Vec::new())),
            script: Box::new(move |_, _| {
                let pending = state.with(|s| s.pending()).len();
                at_call.lock().unwrap().push(pending);
                Ok(())
            }),
            gate: None,
            max: 100,
        };
        tokio::spawn(
            Executor::new(
                Box::new(fake),
                shared,
                intake.notices.clone(),
                intake.state.clone(),
            )
            .run(),
        );
        Pair {
            intake,
            tx,
            seen,
            notices,
            _dir: dir,
        }
    }

    fn ban(id: u128, n: u32) -> Sequenced {
        Sequenced {
            seq: id as u64,
            epoch: Epoch(7),
            event: Event::new(
                EventId::from_u128(id),
                NodeName::new("web2").unwrap(),
                JailName::new("sshd").unwrap(),
                Action::Ban,
                ip(n),
                1_763_702_000_000,
            )
            .unwrap(),
        }
    }

    impl Pair {
        /// The next `applied` notice's address.
        async fn applied(&mut self) -> IpAddr {
            loop {
                let n = tokio::time::timeout(Duration::from_secs(3600), self.notices.recv())
                    .await
                    .expect("no notice within an hour of test time")
                    .expect("executor alive");
                if let Notice::Applied { ip, .. } = n {
                    return ip;
                }
            }
        }

        /// Hands `s` to the intake as a live event (with no epoch: a
        /// fail2ban-zmq-tools message), waits until it is applied, and returns
        /// how many events were pending at each action call so far.
        async fn live(&mut self, s: Sequenced, epoch: bool) -> Vec<usize> {
            let ip = s.event.ip;
            let mut drops = RateLimit::new(Duration::ZERO);
            let (seq, epoch) = if epoch {
                (s.seq, Some(s.epoch))
            } else {
                (0, None)
            };
            self.intake.live(s.event, seq, epoch, &mut drops).await;
            assert_eq!(self.applied().await, ip);
            self.seen.lock().unwrap().clone()
        }

        fn pending(&self) -> usize {
            self.intake.state.with(|s| s.pending()).len()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_reaches_its_action_before_its_pending_record_and_ends_done() {
        let mut pair = intake_and_executor();
        // The action ran before the state's write: nothing was pending yet.
        assert_eq!(pair.live(ban(1, 1), true).await, [0]);
        // Then recorded: done, not left pending by the record that came after.
        assert_eq!(pair.pending(), 0);
        assert!(pair.intake.state.with(|s| s.known(&ban(1, 1).event)));
        // The same for events received together.
        let mut drops = RateLimit::new(Duration::ZERO);
        pair.intake
            .live_all(vec![ban(2, 2), ban(3, 3)], &mut drops)
            .await;
        assert_eq!(pair.applied().await, ip(2));
        assert_eq!(pair.applied().await, ip(3));
        assert_eq!(*pair.seen.lock().unwrap(), [0, 0]);
        assert_eq!(pair.pending(), 0);
        let (b2, b3) = (ban(2, 2).event, ban(3, 3).event);
        assert_eq!(
            pair.intake.state.with(|s| s.known_all(&[&b2, &b3])),
            [true, true]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn two_bans_of_one_address_received_together_leave_nothing_pending() {
        let mut pair = intake_and_executor();
        // The queue keeps the later of the two; it is applied once and settles
        // the earlier one with it.
        let mut drops = RateLimit::new(Duration::ZERO);
        pair.intake
            .live_all(vec![ban(1, 4), ban(2, 4)], &mut drops)
            .await;
        assert_eq!(pair.applied().await, ip(4));
        // Recorded first: both were pending when the action ran.
        assert_eq!(*pair.seen.lock().unwrap(), [2]);
        assert_eq!(pair.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn unbans_and_subscribers_without_snapshots_record_before_the_action() {
        let mut pair = intake_and_executor();
        // An unban: a restart's snapshot could not always prove it.
        let mut unban = ban(1, 1);
        unban.event.action = Action::Unban;
        assert_eq!(pair.live(unban, true).await, [1]);
        // No snapshot would recover a ban lost before its record.
        pair.intake.act_first = false;
        assert_eq!(pair.live(ban(2, 2), true).await, [1, 1]);
        // A fail2ban-zmq-tools message (no epoch) likewise.
        pair.intake.act_first = true;
        assert_eq!(pair.live(ban(3, 3), false).await, [1, 1, 1]);
        assert_eq!(pair.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_more_input_waiting_events_are_recorded_before_their_action() {
        let mut pair = intake_and_executor();
        // A burst: more is waiting for the intake.
        let heartbeat = Input::Heartbeat {
            epoch: Epoch(7),
            seq: 1,
        };
        pair.tx.try_send(heartbeat).unwrap();
        assert_eq!(pair.live(ban(1, 1), true).await, [1]);
        assert_eq!(pair.pending(), 0);
    }
}
