//! The hub protects the fleet: an allowlist of addresses no one may ban, a rate
//! limit per monitor node and a circuit breaker that quarantines a node which
//! suddenly reports far more than usual. Pure: the time is injected.
//!
//! # Rules
//!
//! - `[publisher] ignore_ip`: an address in one of these networks is refused
//!   `forbidden` ([`Guard::forbidden`]), on top of the reserved ranges
//!   ([`crate::core::reserved`]).
//! - Rate limit: each node has a token bucket of `rate_burst` tokens, refilled at
//!   `rate_limit` per second; a report takes one, and is refused `rate_limited`
//!   (transient: the monitor retries later) when there is none. `rate_limit = 0`
//!   turns it off.
//! - Circuit breaker: a node whose reports of the last minute exceed both
//!   `quarantine_floor` and `quarantine_factor` x its usual per-minute rate is
//!   quarantined for `quarantine_time`: that report and all its reports until then
//!   are refused `quarantined` (the monitor drops them), with one ERROR line naming
//!   the node and the numbers when it trips and one INFO line when it ends.
//!
//! # Definitions
//!
//! - A node is the event's node name. Native reports are authenticated as that
//!   node (see [`crate::trust`]); fail2ban-zmq-tools reports (and native ones
//!   accepted without authentication) are limited by the name they carry, counted
//!   apart from the authenticated node of that name: a flood that merely names
//!   `web1` can neither empty web1's bucket nor quarantine it.
//! - "Reports" are those that passed authentication, the quarantine and the rate
//!   limit, whatever their outcome (duplicates and refused addresses included).
//! - "The last minute's reports" are estimated from fixed one-minute windows per
//!   node: the current window's count plus the previous window's count weighted by
//!   the part of it still within the last 60 seconds.
//! - "The usual per-minute rate" is an exponentially weighted average of the node's
//!   completed one-minute windows, each weighing [`USUAL_WEIGHT`] (1/60: about the
//!   last hour), idle minutes counting as 0. It starts at 0 for a node the
//!   publisher has not seen since it started, so the floor alone governs new nodes.
//!   It lives in memory only: a restart starts every node afresh.
//!
//! # Memory
//!
//! One entry per node. Nodes with a monitor credential are never forgotten (there
//! are as many as `[trust.monitors]` lists); others (unauthenticated or legacy
//! reports, whose names the network chooses) are kept up to [`MAX_NODES`]: beyond
//! that a quarter of them, those seen least recently (quarantined ones last), are
//! forgotten at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use f2b_common::config::PublisherConfig;
use f2b_proto::{NakReason, NodeName};
use ipnet::IpNet;

/// The most nodes without a credential whose counters are kept.
pub const MAX_NODES: usize = 4096;

/// The weight of each completed minute in the usual per-minute rate.
pub const USUAL_WEIGHT: f64 = 1.0 / 60.0;

const MINUTE_MS: u64 = 60_000;

/// The guard's settings, from `[publisher]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    pub ignore_ip: Vec<IpNet>,
    /// Reports per second per node; 0: no limit.
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub quarantine_floor: u32,
    pub quarantine_factor: u32,
    pub quarantine_time: Duration,
}

impl GuardConfig {
    pub fn new(p: &PublisherConfig) -> GuardConfig {
        GuardConfig {
            ignore_ip: p.ignore_ip.clone(),
            rate_limit: p.rate_limit,
            rate_burst: p.rate_burst,
            quarantine_floor: p.quarantine_floor,
            quarantine_factor: p.quarantine_factor,
            quarantine_time: p.quarantine_time,
        }
    }

    /// No allowlist, no rate limit, a breaker that never trips: what a
    /// [`crate::Core`] starts with.
    pub fn off() -> GuardConfig {
        GuardConfig {
            ignore_ip: Vec::new(),
            rate_limit: 0,
            rate_burst: 1,
            quarantine_floor: u32::MAX,
            quarantine_factor: u32::MAX,
            quarantine_time: Duration::from_secs(1),
        }
    }
}

/// One node's counters.
#[derive(Debug, Clone)]
struct Node {
    /// Never forgotten (the node has a credential).
    pinned: bool,
    last_seen_ms: u64,
    /// The bucket, in thousandths of a report (exact integer arithmetic: each
    /// millisecond adds `rate_limit` of them).
    milli_tokens: u64,
    refilled_ms: u64,
    /// The current one-minute window: its start and its reports.
    window_ms: u64,
    this_minute: u64,
    /// The previous window's reports (0 if it was not the one just before).
    last_minute: u64,
    /// The usual per-minute rate.
    usual: f64,
    quarantine: Option<Quarantine>,
}

#[derive(Debug, Clone, Copy)]
struct Quarantine {
    since_ms: u64,
    until_ms: u64,
    refused: u64,
}

impl Node {
    fn new(pinned: bool, now_ms: u64, burst: u32) -> Node {
        Node {
            pinned,
            last_seen_ms: now_ms,
            milli_tokens: u64::from(burst) * 1000,
            refilled_ms: now_ms,
            window_ms: now_ms,
            this_minute: 0,
            last_minute: 0,
            usual: 0.0,
            quarantine: None,
        }
    }

    /// Moves the one-minute window to the one holding `now_ms`, folding the
    /// completed ones into the usual rate.
    fn roll(&mut self, now_ms: u64) {
        if now_ms < self.window_ms {
            // The clock went back: start over from here, keeping the usual rate.
            self.window_ms = now_ms;
            self.last_minute = 0;
            self.this_minute = 0;
            return;
        }
        let passed = (now_ms - self.window_ms) / MINUTE_MS;
        if passed == 0 {
            return;
        }
        let completed = self.this_minute as f64;
        self.usual += USUAL_WEIGHT * (completed - self.usual);
        let idle = passed - 1;
        if idle > 0 {
            let idle = i32::try_from(idle.min(100_000)).unwrap_or(100_000);
            self.usual *= (1.0 - USUAL_WEIGHT).powi(idle);
        }
        self.last_minute = if passed == 1 { self.this_minute } else { 0 };
        self.this_minute = 0;
        self.window_ms = self
            .window_ms
            .saturating_add(passed.saturating_mul(MINUTE_MS));
    }

    /// The reports of the last 60 seconds (see the module's documentation).
    fn recent(&self, now_ms: u64) -> f64 {
        let into = now_ms.saturating_sub(self.window_ms).min(MINUTE_MS) as f64;
        self.this_minute as f64 + self.last_minute as f64 * (1.0 - into / MINUTE_MS as f64)
    }
}

/// Why the guard refused a report: the NAK's reason and detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: NakReason,
    pub detail: String,
}

/// The allowlist, the rate limits and the circuit breaker.
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    quarantine_ms: u64,
    /// By (name, authenticated).
    nodes: HashMap<(NodeName, bool), Node>,
    max_nodes: usize,
    /// How many times the breaker tripped since the start.
    trips: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Guard {
    pub fn new(config: GuardConfig) -> Guard {
        Guard {
            quarantine_ms: millis(config.quarantine_time),
            config,
            nodes: HashMap::new(),
            max_nodes: MAX_NODES,
            trips: 0,
        }
    }

    /// The settings, as configured.
    pub fn config(&self) -> &GuardConfig {
        &self.config
    }

    /// Takes new settings (a configuration reload), keeping every node's counters
    /// and quarantine: a quarantine already running keeps its end, a bucket fuller
    /// than a smaller `rate_burst` is cut down to it, and the new `rate_limit`,
    /// floor, factor and `quarantine_time` apply from the next report.
    pub fn reconfigure(&mut self, config: GuardConfig) {
        let cap = u64::from(config.rate_burst) * 1000;
        for node in self.nodes.values_mut() {
            node.milli_tokens = node.milli_tokens.min(cap);
        }
        self.quarantine_ms = millis(config.quarantine_time);
        self.config = config;
    }

    /// How many times the circuit breaker tripped since the start (for metrics).
    pub fn trips(&self) -> u64 {
        self.trips
    }

    /// Keeps at most `n` nodes without a credential (tests use few).
    pub fn with_max_nodes(mut self, n: usize) -> Guard {
        self.max_nodes = n.max(1);
        self
    }

    /// The network of `ignore_ip` that holds `ip`, if one does.
    pub fn forbidden(&self, ip: IpAddr) -> Option<&IpNet> {
        self.config.ignore_ip.iter().find(|n| n.contains(&ip))
    }

    /// How many nodes' counters are kept: for tests and metrics.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The nodes quarantined at `now_ms`, with when their quarantine ends.
    pub fn quarantined(&self, now_ms: u64) -> Vec<(NodeName, u64)> {
        let mut q: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|((n, _), s)| {
                s.quarantine
                    .filter(|q| q.until_ms > now_ms)
                    .map(|q| (n.clone(), q.until_ms))
            })
            .collect();
        q.sort();
        q
    }

    /// Ends the quarantines that are over at `now_ms` (an INFO line each); the
    /// serving loop calls it now and then, so the end is logged even when the node
    /// stays silent.
    pub fn tick(&mut self, now_ms: u64) {
        for (key, node) in &mut self.nodes {
            end_quarantine(&Shown(key), node, now_ms);
        }
    }

    /// Counts a report of `node` at `now_ms` (`authenticated`: by the node's
    /// credential, which also keeps its counters from being forgotten), or refuses
    /// it: `quarantined` while the node is, or if this report trips the breaker;
    /// `rate_limited` when its bucket is empty.
    pub fn admit(
        &mut self,
        node: &NodeName,
        authenticated: bool,
        now_ms: u64,
    ) -> Result<(), Refusal> {
        let key = (node.clone(), authenticated);
        if !authenticated && !self.nodes.contains_key(&key) {
            self.make_room();
        }
        let burst = self.config.rate_burst;
        let n = self
            .nodes
            .entry(key)
            .or_insert_with(|| Node::new(authenticated, now_ms, burst));
        let node = &Shown(&(node.clone(), authenticated));
        n.last_seen_ms = now_ms;
        end_quarantine(node, n, now_ms);
        if let Some(q) = &mut n.quarantine {
            q.refused += 1;
            return Err(Refusal {
                reason: NakReason::Quarantined,
                detail: quarantine_detail(node, q.until_ms.saturating_sub(now_ms)),
            });
        }
        let c = &self.config;
        if c.rate_limit > 0 {
            let elapsed = now_ms.saturating_sub(n.refilled_ms);
            n.milli_tokens = n
                .milli_tokens
                .saturating_add(elapsed.saturating_mul(u64::from(c.rate_limit)))
                .min(u64::from(c.rate_burst) * 1000);
            n.refilled_ms = now_ms.max(n.refilled_ms);
            if n.milli_tokens < 1000 {
                return Err(Refusal {
                    reason: NakReason::RateLimited,
                    detail: format!(
                        "node {node} sends more than rate_limit = {}/s (rate_burst = {}); \
                         send again later",
                        c.rate_limit, c.rate_burst
                    ),
                });
            }
            n.milli_tokens -= 1000;
        }
        n.roll(now_ms);
        n.this_minute += 1;
        let recent = n.recent(now_ms);
        let threshold = f64::from(c.quarantine_factor) * n.usual;
        if recent > f64::from(c.quarantine_floor) && recent > threshold {
            self.trips += 1;
            n.quarantine = Some(Quarantine {
                since_ms: now_ms,
                until_ms: now_ms.saturating_add(self.quarantine_ms),
                refused: 1,
            });
            let qt = humantime::format_duration(c.quarantine_time);
            tracing::error!(
                node = %node,
                last_minute = recent.round() as u64,
                usual_per_minute = format!("{:.1}", n.usual),
                quarantine_factor = c.quarantine_factor,
                quarantine_floor = c.quarantine_floor,
                quarantine_time = %qt,
                "node quarantined: {:.0} reports in the last minute, more than {} x its usual \
                 {:.1} per minute and more than quarantine_floor {}; its reports are refused \
                 (NAK quarantined) for {qt}: check that node",
                recent,
                c.quarantine_factor,
                n.usual,
                c.quarantine_floor,
            );
            return Err(Refusal {
                reason: NakReason::Quarantined,
                detail: quarantine_detail(node, self.quarantine_ms),
            });
        }
        Ok(())
    }

    /// Forgets a quarter of the nodes without a credential, those seen least
    /// recently (quarantined ones last), when there are `max_nodes` of them.
    fn make_room(&mut self) {
        let mut unpinned: Vec<(bool, u64, (NodeName, bool))> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.pinned)
            .map(|(key, n)| (n.quarantine.is_some(), n.last_seen_ms, key.clone()))
            .collect();
        if unpinned.len() < self.max_nodes {
            return;
        }
        unpinned.sort_unstable();
        let drop = (self.max_nodes / 4).max(1);
        for (_, _, key) in unpinned.into_iter().take(drop) {
            self.nodes.remove(&key);
        }
    }
}

/// A node as logs and NAKs name it: `web1`, or `web1 (unauthenticated)` for the
/// reports that only carry its name.
struct Shown<'a>(&'a (NodeName, bool));

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            (n, true) => write!(f, "{n}"),
            (n, false) => write!(f, "{n} (unauthenticated)"),
        }
    }
}

/// Ends `node`'s quarantine if it is over at `now_ms`: an INFO line, and its
/// windows start afresh (the flood that tripped it no longer counts).
fn end_quarantine(name: &Shown<'_>, node: &mut Node, now_ms: u64) {
    let Some(q) = node.quarantine else {
        return;
    };
    if q.until_ms > now_ms {
        return;
    }
    node.quarantine = None;
    node.window_ms = now_ms;
    node.this_minute = 0;
    node.last_minute = 0;
    tracing::info!(
        node = %name,
        lasted_ms = now_ms.saturating_sub(q.since_ms),
        refused = q.refused,
        "quarantine ended: the node's reports are accepted again"
    );
}

fn quarantine_detail(node: &Shown<'_>, left_ms: u64) -> String {
    format!(
        "node {node} is quarantined for {} more: it suddenly reported far more than usual \
         (see the publisher's log); this event is dropped",
        humantime::format_duration(Duration::from_millis(left_ms.div_ceil(1000) * 1000))
    )
}

#[cfg(test)]
mod tests;
