//! Prometheus metrics and health answers, served over HTTP on `metrics_bind`.
//!
//! Each daemon owns one [`Metrics`] registry, creates its set of typed handles with
//! [`MonitorMetrics::new`], [`PublisherMetrics::new`] or [`SubscriberMetrics::new`],
//! clones them into its tasks, and hands the registry to [`serve`] when
//! `metrics_bind` is set. Recording is a relaxed atomic operation (a counter's
//! `inc`, a gauge's `set`, [`LastSeen::touch`]; a histogram's `observe` and a
//! labelled counter add a short lock): cheap enough for every hot path, and
//! harmless when no server runs.
//!
//! # Wiring
//!
//! ```no_run
//! use f2b_common::config::Config;
//! use f2b_common::metrics::{self, Metrics, MonitorMetrics, Readiness};
//! use f2b_common::CancellationToken;
//!
//! # async fn run(config: Config, shutdown: CancellationToken) -> Result<(), metrics::MetricsError> {
//! let readiness = Readiness::new();
//! let mut registry = Metrics::new("f2b-monitor");
//! let m = MonitorMetrics::new(&mut registry, &readiness);
//! // Off (None) unless `[monitor] metrics_bind` is set; an address in use is an error.
//! let server = metrics::serve_if(config.metrics.monitor, registry, readiness, shutdown.clone()).await?;
//! m.queue_capacity.set(config.monitor.queue_size as i64);
//! // ... in the hot paths, clones of `m`:
//! m.lines_read.inc();
//! m.publisher_answering.set(true);
//! // ... at the end, after `shutdown` is cancelled:
//! if let Some(server) = server {
//!     server.join().await;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//!
//! - `GET /metrics`: every metric in the OpenMetrics text format
//!   (`application/openmetrics-text; version=1.0.0`), which Prometheus scrapes as is.
//! - `GET /healthz`: `200 ok` while the process answers (liveness).
//! - `GET /readyz`: `200 ready` when every condition of the daemon's [`Readiness`]
//!   holds, else `503` with one line saying which does not (readiness).
//!
//! Anything else is `404` (`405` for a method other than GET and HEAD). The server
//! takes at most [`MAX_CONNECTIONS`] connections at once, one request per
//! connection, headers within [`MAX_HEADER_BYTES`] and [`HEADER_TIMEOUT`], and
//! never reads a request body.
//!
//! # Metrics
//!
//! Names follow the Prometheus conventions: a `f2b_<daemon>_` prefix, base units
//! (`_seconds`), `_total` on counters. Labels take values from a closed set fixed
//! in the code (a NAK reason code, a skip reason), never a value from the network,
//! so no peer can grow the number of series; the known reasons are created at 0.
//! Every daemon also exposes `f2b_build_info{daemon, version} 1` and the usual
//! `process_*` metrics (CPU seconds, resident memory, open and maximum file
//! descriptors, start time), read from `/proc` when scraped.
//!
//! f2b-monitor ([`MonitorMetrics`]):
//!
//! | metric | type | recorded where |
//! |---|---|---|
//! | `f2b_monitor_lines_read_total` | counter | each line read from `log_path` |
//! | `f2b_monitor_events_found_total{action}` | counter | each Ban/Unban line turned into an event (`action` = `ban`, `unban`) |
//! | `f2b_monitor_events_ignored_total` | counter | events of an `ignore_jails` jail, or suppressed as fail2ban's stop |
//! | `f2b_monitor_events_sent_total` | counter | each report sent to the publisher (a resend counts again) |
//! | `f2b_monitor_events_acked_total` | counter | each ACK (an event leaves the queue) |
//! | `f2b_monitor_events_queued` | gauge | events in the queue (journal included) after each change |
//! | `f2b_monitor_queue_capacity` | gauge | `queue_size`, set once |
//! | `f2b_monitor_events_dropped_total{reason}` | counter | each event dropped: a NAK no retry fixes (`reason` = its code, e.g. `forbidden`, `quarantined`; in legacy mode `legacy_nak`, `legacy_format`) |
//! | `f2b_monitor_naks_total{reason}` | counter | each transient NAK (`unauthenticated`, `replayed`, `rate_limited`, `busy`), the event kept |
//! | `f2b_monitor_ack_timeouts_total` | counter | each `ack_timeout` expiry (socket recreated, event sent again) |
//! | `f2b_monitor_publisher_round_trip_seconds` | histogram | time from sending a report to its reply |
//!
//! f2b-publisher ([`PublisherMetrics`]):
//!
//! | metric | type | recorded where |
//! |---|---|---|
//! | `f2b_publisher_reports_received_total` | counter | each request on `reply_bind` (before any check; a `reports` request counts once, whatever its events) |
//! | `f2b_publisher_events_accepted_total` | counter | each event ACKed and recorded in the ledger (a report's, each of a `reports` request) |
//! | `f2b_publisher_events_duplicate_total` | counter | each event ACKed but not broadcast (id seen, or a ban the cluster holds) |
//! | `f2b_publisher_events_rejected_total{reason}` | counter | each NAK, by its code (`malformed` … `unauthenticated`, `replayed`, `rate_limited`, `quarantined`, `busy`): one per refused event of a `reports` request, one for a request refused whole; and fail2ban-zmq-tools requests refused with the bare `NAK` (`legacy_disabled`, `legacy_invalid`) |
//! | `f2b_publisher_events_broadcast_total` | counter | each event published on `broadcast_bind` |
//! | `f2b_publisher_heartbeats_sent_total` | counter | each heartbeat published |
//! | `f2b_publisher_snapshots_served_total` | counter | each snapshot page answered |
//! | `f2b_publisher_ledger_active_bans` | gauge | active bans in the ledger, after each change and each expiry sweep |
//! | `f2b_publisher_sequence` | gauge | the sequence number of the last broadcast |
//! | `f2b_publisher_connected_peers{socket}` | gauge | peers connected to `reply` / `broadcast` (ZeroMQ socket monitor: +1 accepted, -1 disconnected) |
//! | `f2b_publisher_quarantined_nodes` | gauge | nodes quarantined now |
//! | `f2b_publisher_quarantines_total` | counter | each time the circuit breaker trips for a node |
//!
//! The trust counters are `f2b_publisher_events_rejected_total` with `reason` =
//! `unauthenticated`, `replayed`, `rate_limited` and `quarantined`, plus the two
//! quarantine metrics.
//!
//! f2b-subscriber ([`SubscriberMetrics`]):
//!
//! | metric | type | recorded where |
//! |---|---|---|
//! | `f2b_subscriber_events_received_total` | counter | each verified event (after the signature check) |
//! | `f2b_subscriber_heartbeats_received_total` | counter | each verified heartbeat |
//! | `f2b_subscriber_broadcasts_refused_total{reason}` | counter | each broadcast refused: [`SUBSCRIBER_REFUSE_REASONS`] |
//! | `f2b_subscriber_events_applied_total` | counter | each event the action applied |
//! | `f2b_subscriber_events_skipped_total{reason}` | counter | each event not applied: [`SUBSCRIBER_SKIP_REASONS`] |
//! | `f2b_subscriber_events_failed_total` | counter | each failed attempt of the action (it will be retried) |
//! | `f2b_subscriber_retries_total` | counter | each retry of a failed event |
//! | `f2b_subscriber_events_queued` | gauge | events waiting to be applied |
//! | `f2b_subscriber_sequence_lag` | gauge | the publisher's last sequence (from events and heartbeats) minus the last one this subscriber has received |
//! | `f2b_subscriber_last_heartbeat_age_seconds` | gauge | seconds since the last verified message, event or heartbeat (computed at scrape; since start when none yet) |
//! | `f2b_subscriber_snapshots_total` | counter | each catch-up snapshot applied |
//! | `f2b_subscriber_apply_duration_seconds` | histogram | time one action call took |
//!
//! # Readiness
//!
//! What each daemon reports (the handles are in its metrics set):
//!
//! - f2b-monitor: `publisher_answering` (set on a reply, or on a completed ZeroMQ
//!   handshake unless the last report went unanswered; cleared on an `ack_timeout`
//!   or a disconnect) and `queue_has_room`
//!   (cleared while the queue is full).
//! - f2b-publisher: `bound` (both sockets bound) and `ledger_open`.
//! - f2b-subscriber: a verified message within `heartbeat_timeout`
//!   ([`SubscriberMetrics::last_heartbeat`], checked at request time).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use f2b_proto::NakReason;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use prometheus_client;

/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;
/// The most a request's line and headers may take (hyper's smallest buffer).
pub const MAX_HEADER_BYTES: usize = 8192;
/// The most headers a request may have.
pub const MAX_HEADERS: usize = 32;
/// How long a client may take to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may last, whatever it does.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A label set with one label, `reason`, from a closed set of codes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// A label set with one label, `action`: `ban` or `unban`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

/// A label set with one label, `socket`: `reply` or `broadcast`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SocketLabel {
    pub socket: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    daemon: &'static str,
    version: &'static str,
}

/// A counter by reason: `counter.inc("forbidden")`.
#[derive(Debug, Clone, Default)]
pub struct ReasonCounter(Family<ReasonLabel, Counter>);

impl ReasonCounter {
    /// Adds one for `reason`, a code from the metric's documented set.
    pub fn inc(&self, reason: &'static str) {
        self.0.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Adds one for a NAK reason, by its wire code.
    pub fn inc_nak(&self, reason: NakReason) {
        self.inc(reason.code());
    }

    /// The count for `reason` (for tests and status output).
    pub fn get(&self, reason: &'static str) -> u64 {
        self.0.get_or_create(&ReasonLabel { reason }).get()
    }

    /// Creates the series of each known reason at 0, so that the first occurrence
    /// shows in `increase()` and a dashboard lists every reason from the start.
    fn known(self, reasons: impl IntoIterator<Item = &'static str>) -> Self {
        for reason in reasons {
            let _ = self.0.get_or_create(&ReasonLabel { reason });
        }
        self
    }
}

/// `f2b_subscriber_events_skipped_total`'s reasons: f2b-subscriber's
/// `SkipReason::as_str()` codes, and `queue_full` for events dropped by the queue's
/// bound.
pub const SUBSCRIBER_SKIP_REASONS: [&str; 8] = [
    "own_node",
    "duplicate",
    "ignore_ip",
    "local_address",
    "ignoreip_of_jail",
    "expired",
    "held_by_other_jail",
    "queue_full",
];

/// `f2b_subscriber_broadcasts_refused_total`'s reasons: f2b-subscriber's
/// `Refusal::as_str()` codes, and `malformed` for a message that does not decode.
pub const SUBSCRIBER_REFUSE_REASONS: [&str; 5] = [
    "unsigned",
    "bad_signature",
    "replayed",
    "stale_epoch",
    "malformed",
];

/// The time since something last happened, as a gauge in seconds computed when
/// scraped (and a readiness condition with [`Readiness::require_recent`]). Until
/// the first [`touch`](LastSeen::touch), the age counts from the creation of the
/// handle (the daemon's start), so an alert on a large age also fires when the
/// thing never happened.
#[derive(Debug, Clone)]
pub struct LastSeen {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last touch; `u64::MAX`: never.
    at_ms: Arc<AtomicU64>,
}

impl Default for LastSeen {
    fn default() -> Self {
        LastSeen {
            epoch: Instant::now(),
            at_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

impl LastSeen {
    /// It happened now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.at_ms.store(ms, Ordering::Relaxed);
    }

    /// How long ago it last happened; `None` if never.
    pub fn age(&self) -> Option<Duration> {
        match self.at_ms.load(Ordering::Relaxed) {
            u64::MAX => None,
            ms => Some(
                self.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// The age, or the time since the handle was created if it never happened.
    fn age_or_uptime(&self) -> Duration {
        self.age().unwrap_or_else(|| self.epoch.elapsed())
    }
}

impl EncodeMetric for LastSeen {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_gauge(&self.age_or_uptime().as_secs_f64())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

/// One readiness condition, set from the daemon's code. Starts as given to
/// [`Readiness::condition`].
#[derive(Debug, Clone)]
pub struct Condition(Arc<AtomicBool>);

impl Condition {
    pub fn set(&self, holds: bool) {
        self.0.store(holds, Ordering::Relaxed);
    }

    pub fn holds(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
enum Check {
    Flag {
        condition: Condition,
        reason: &'static str,
    },
    Recent {
        seen: LastSeen,
        within: Duration,
        what: &'static str,
    },
}

/// What `/readyz` answers: ready when every condition holds. Clone it freely; the
/// conditions are shared.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<Vec<Check>>>);

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition, holding or not at first; `reason` is what `/readyz` says
    /// while it does not hold ("ledger not open").
    pub fn condition(&self, reason: &'static str, initially: bool) -> Condition {
        let condition = Condition(Arc::new(AtomicBool::new(initially)));
        self.lock().push(Check::Flag {
            condition: condition.clone(),
            reason,
        });
        condition
    }

    /// Adds a condition: `seen` touched within `within`. `what` names it ("a
    /// verified message from the publisher").
    pub fn require_recent(&self, seen: &LastSeen, within: Duration, what: &'static str) {
        self.lock().push(Check::Recent {
            seen: seen.clone(),
            within,
            what,
        });
    }

    /// `Ok` when ready, else the first condition that does not hold, in one line.
    pub fn check(&self) -> Result<(), String> {
        for check in self.lock().iter() {
            match check {
                Check::Flag { condition, reason } => {
                    if !condition.holds() {
                        return Err((*reason).to_owned());
                    }
                }
                Check::Recent { seen, within, what } => match seen.age() {
                    None => return Err(format!("no {what} yet")),
                    Some(age) if age > *within => {
                        return Err(format!(
                            "no {what} for {} (more than {})",
                            humantime::format_duration(Duration::from_millis(
                                u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
                            )),
                            humantime::format_duration(*within)
                        ))
                    }
                    Some(_) => {}
                },
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Check>> {
        // A panic while holding this lock cannot leave the list half-changed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The process's own numbers, read from `/proc` at each scrape, under the names
/// Prometheus' other clients use (so the usual dashboards work):
/// `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`. Whatever cannot be read is left out.
#[derive(Debug)]
struct ProcessCollector;

/// Linux reports times in /proc in USER_HZ, 100 on every architecture Rust supports.
const USER_HZ: f64 = 100.0;

#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // The fields after the command name, which is in parentheses and may hold
        // spaces: state is field 3, utime 14, stime 15, starttime 22, vsize 23.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        ProcessStats {
            cpu_seconds: field(14)
                .zip(field(15))
                .map(|(u, s)| (u + s) as f64 / USER_HZ),
            resident_bytes: status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                .map(|kb| kb * 1024),
            virtual_bytes: field(23).and_then(|v| i64::try_from(v).ok()),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| i64::try_from(d.count()).unwrap_or(i64::MAX)),
            max_fds: limits
                .lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok()),
            start_time_seconds: field(22)
                .zip(boot_time)
                .map(|(ticks, boot)| boot as f64 + ticks as f64 / USER_HZ),
        }
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), fmt::Error> {
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let p = ProcessStats::read();
        if let Some(v) = p.cpu_seconds {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(v).encode(m)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes,
            ),
            ("process_open_fds", "Open file descriptors", p.open_fds),
            (
                "process_max_fds",
                "Most open file descriptors allowed",
                p.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
                ConstGauge::new(v).encode(m)?;
            }
        }
        if let Some(v) = p.start_time_seconds {
            let m = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(v).encode(m)?;
        }
        Ok(())
    }
}

/// One daemon's registry of metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// A registry with `f2b_build_info{daemon, version} 1` and the process's own
    /// numbers (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
    /// `process_open_fds`, ...).
    pub fn new(daemon: &'static str) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        registry.register(
            "f2b_build",
            "The daemon and its version",
            Info::new(BuildLabels {
                daemon,
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        Metrics { registry }
    }

    /// The registry, to add metrics of one's own.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every metric in the OpenMetrics text format, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would be a bug in a
        // metric, reported as such rather than served half-written.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            return format!("# encoding failed: {e}\n");
        }
        out
    }
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    r.register(name, help, g.clone());
    g
}

fn reasons(r: &mut Registry, name: &str, help: &str) -> ReasonCounter {
    let c = ReasonCounter::default();
    r.register(name, help, c.0.clone());
    c
}

/// Buckets for durations from 1 ms to about 65 s (powers of two).
fn seconds_histogram(r: &mut Registry, name: &str, help: &str) -> Histogram {
    let h = Histogram::new(exponential_buckets(0.001, 2.0, 17));
    r.register_with_unit(name, help, Unit::Seconds, h.clone());
    h
}

/// f2b-monitor's metrics and readiness conditions (the table in the module docs).
#[derive(Debug, Clone)]
pub struct MonitorMetrics {
    pub lines_read: Counter,
    /// `events_found.get_or_create(&ActionLabel { action: "ban" }).inc()`.
    pub events_found: Family<ActionLabel, Counter>,
    pub events_ignored: Counter,
    pub events_sent: Counter,
    pub events_acked: Counter,
    pub events_queued: Gauge,
    pub queue_capacity: Gauge,
    pub events_dropped: ReasonCounter,
    pub naks: ReasonCounter,
    pub ack_timeouts: Counter,
    pub round_trip: Histogram,
    /// Readiness: the publisher answers (or ZeroMQ reports the connection up).
    pub publisher_answering: Condition,
    /// Readiness: the queue is not full.
    pub queue_has_room: Condition,
}

impl MonitorMetrics {
    pub fn new(metrics: &mut Metrics, readiness: &Readiness) -> Self {
        let r = metrics.registry.sub_registry_with_prefix("f2b_monitor");
        MonitorMetrics {
            lines_read: counter(r, "lines_read", "Lines read from the fail2ban log"),
            events_found: {
                let f = Family::<ActionLabel, Counter>::default();
                r.register(
                    "events_found",
                    "Ban and Unban events read from the fail2ban log",
                    f.clone(),
                );
                for action in ["ban", "unban"] {
                    let _ = f.get_or_create(&ActionLabel { action });
                }
                f
            },
            events_ignored: counter(
                r,
                "events_ignored",
                "Events not reported (ignore_jails, or fail2ban's stop)",
            ),
            events_sent: counter(
                r,
                "events_sent",
                "Reports sent to the publisher, resends included",
            ),
            events_acked: counter(r, "events_acked", "Reports acknowledged by the publisher"),
            events_queued: gauge(
                r,
                "events_queued",
                "Events read and not yet acknowledged (the queue)",
            ),
            queue_capacity: gauge(r, "queue_capacity", "The queue's size (monitor.queue_size)"),
            events_dropped: reasons(
                r,
                "events_dropped",
                "Events dropped after a NAK no retry fixes, by reason",
            )
            .known(
                NakReason::ALL
                    .into_iter()
                    .filter(|n| !n.is_transient())
                    .map(NakReason::code),
            ),
            naks: reasons(
                r,
                "naks",
                "Transient NAKs (the event is kept and sent again), by reason",
            )
            .known(
                NakReason::ALL
                    .into_iter()
                    .filter(|n| n.is_transient())
                    .map(NakReason::code),
            ),
            ack_timeouts: counter(
                r,
                "ack_timeouts",
                "Reports unanswered within ack_timeout (sent again)",
            ),
            round_trip: seconds_histogram(
                r,
                "publisher_round_trip",
                "Time from sending a report to the publisher's reply",
            ),
            publisher_answering: readiness.condition(
                "the publisher has not answered (check monitor.publisher)",
                false,
            ),
            queue_has_room: readiness.condition("the event queue is full", true),
        }
    }
}

/// f2b-publisher's metrics and readiness conditions (the table in the module docs).
#[derive(Debug, Clone)]
pub struct PublisherMetrics {
    pub reports_received: Counter,
    pub events_accepted: Counter,
    pub events_duplicate: Counter,
    /// `events_rejected.inc_nak(reason)` for every NAK.
    pub events_rejected: ReasonCounter,
    pub events_broadcast: Counter,
    pub heartbeats_sent: Counter,
    pub snapshots_served: Counter,
    pub ledger_active_bans: Gauge,
    pub sequence: Gauge,
    /// `connected_peers.get_or_create(&SocketLabel { socket: "reply" }).inc()`.
    pub connected_peers: Family<SocketLabel, Gauge>,
    pub quarantined_nodes: Gauge,
    pub quarantines: Counter,
    /// Readiness: the reply and broadcast sockets are bound.
    pub bound: Condition,
    /// Readiness: the ledger is open.
    pub ledger_open: Condition,
}

impl PublisherMetrics {
    pub fn new(metrics: &mut Metrics, readiness: &Readiness) -> Self {
        let r = metrics.registry.sub_registry_with_prefix("f2b_publisher");
        PublisherMetrics {
            reports_received: counter(
                r,
                "reports_received",
                "Requests on the reply socket (a reports request of several events counts once)",
            ),
            events_accepted: counter(
                r,
                "events_accepted",
                "Events acknowledged and recorded in the ledger (each of a reports request)",
            ),
            events_duplicate: counter(
                r,
                "events_duplicate",
                "Events acknowledged but not broadcast (seen before, or a ban the cluster holds)",
            ),
            events_rejected: reasons(
                r,
                "events_rejected",
                "Events refused (NAK), by reason (a request refused whole counts once)",
            )
            .known(NakReason::ALL.map(NakReason::code)),
            events_broadcast: counter(r, "events_broadcast", "Events broadcast to subscribers"),
            heartbeats_sent: counter(r, "heartbeats_sent", "Heartbeats broadcast"),
            snapshots_served: counter(r, "snapshots_served", "Snapshot pages answered"),
            ledger_active_bans: gauge(r, "ledger_active_bans", "Active bans in the ledger"),
            sequence: gauge(r, "sequence", "Sequence number of the last broadcast"),
            connected_peers: {
                let f = Family::<SocketLabel, Gauge>::default();
                r.register(
                    "connected_peers",
                    "Peers connected, by socket (reply, broadcast)",
                    f.clone(),
                );
                for socket in ["reply", "broadcast"] {
                    let _ = f.get_or_create(&SocketLabel { socket });
                }
                f
            },
            quarantined_nodes: gauge(r, "quarantined_nodes", "Monitor nodes quarantined now"),
            quarantines: counter(
                r,
                "quarantines",
                "Times the circuit breaker quarantined a node",
            ),
            bound: readiness.condition("the reply and broadcast sockets are not bound", false),
            ledger_open: readiness.condition("the ledger is not open", false),
        }
    }
}

/// f2b-subscriber's metrics and readiness conditions (the table in the module docs).
#[derive(Debug, Clone)]
pub struct SubscriberMetrics {
    pub events_received: Counter,
    pub heartbeats_received: Counter,
    pub broadcasts_refused: ReasonCounter,
    pub events_applied: Counter,
    pub events_skipped: ReasonCounter,
    pub events_failed: Counter,
    pub retries: Counter,
    pub events_queued: Gauge,
    pub sequence_lag: Gauge,
    /// Touch on every verified message; exported as
    /// `f2b_subscriber_last_heartbeat_age_seconds` and required within
    /// `heartbeat_timeout` for readiness.
    pub last_heartbeat: LastSeen,
    pub snapshots: Counter,
    pub apply_duration: Histogram,
}

impl SubscriberMetrics {
    /// `heartbeat_timeout` is `[subscriber] heartbeat_timeout`: no verified message
    /// for longer makes the subscriber not ready.
    pub fn new(metrics: &mut Metrics, readiness: &Readiness, heartbeat_timeout: Duration) -> Self {
        let r = metrics.registry.sub_registry_with_prefix("f2b_subscriber");
        let last_heartbeat = LastSeen::default();
        r.register_with_unit(
            "last_heartbeat_age",
            "Time since the last verified message from the publisher (event or heartbeat)",
            Unit::Seconds,
            last_heartbeat.clone(),
        );
        readiness.require_recent(
            &last_heartbeat,
            heartbeat_timeout,
            "verified message from the publisher",
        );
        SubscriberMetrics {
            events_received: counter(r, "events_received", "Verified events received"),
            heartbeats_received: counter(r, "heartbeats_received", "Verified heartbeats received"),
            broadcasts_refused: reasons(
                r,
                "broadcasts_refused",
                "Broadcasts refused (not verified), by reason",
            )
            .known(SUBSCRIBER_REFUSE_REASONS),
            events_applied: counter(r, "events_applied", "Events applied by the action"),
            events_skipped: reasons(r, "events_skipped", "Events not applied, by reason")
                .known(SUBSCRIBER_SKIP_REASONS),
            events_failed: counter(
                r,
                "events_failed",
                "Failed attempts of the action (retried)",
            ),
            retries: counter(r, "retries", "Retries of failed events"),
            events_queued: gauge(r, "events_queued", "Events waiting to be applied"),
            sequence_lag: gauge(
                r,
                "sequence_lag",
                "The publisher's last sequence number minus the last one received",
            ),
            last_heartbeat,
            snapshots: counter(r, "snapshots", "Catch-up snapshots applied"),
            apply_duration: seconds_histogram(r, "apply_duration", "Time one action call took"),
        }
    }
}

/// The metrics server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    #[error("metrics_bind {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running metrics server.
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address actually bound (the port chosen when `metrics_bind` says 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Waits until the server has stopped (after the shutdown token is cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

struct Shared {
    metrics: Metrics,
    readiness: Readiness,
}

/// [`serve`] when `bind` is set (`metrics_bind`); `Ok(None)` when metrics are off.
pub async fn serve_if(
    bind: Option<SocketAddr>,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<Option<Server>, MetricsError> {
    match bind {
        Some(bind) => serve(bind, metrics, readiness, shutdown).await.map(Some),
        None => Ok(None),
    }
}

/// Binds `bind`, logs "metrics listening on ADDR" with the bound address, and
/// serves `/metrics`, `/healthz` and `/readyz` on the current tokio runtime until
/// `shutdown` is cancelled. Errors only when the address cannot be bound.
pub async fn serve(
    bind: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<Server, MetricsError> {
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| MetricsError::Bind { addr: bind, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr: bind, source })?;
    tracing::info!(addr = %local_addr, "metrics listening on {local_addr}");
    let shared = Arc::new(Shared { metrics, readiness });
    let task = tokio::spawn(accept_loop(listener, shared, shutdown));
    Ok(Server { local_addr, task })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many connections, closing");
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&shared, &req)) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .max_headers(MAX_HEADERS)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {
                    tracing::debug!(%peer, "metrics: connection timed out");
                }
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "metrics: bad request");
                    }
                }
            }
        });
    }
    tracing::debug!("metrics server stopped");
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

const PLAIN: &str = "text/plain; charset=utf-8";

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            OPENMETRICS_CONTENT_TYPE,
            shared.metrics.encode(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match shared.readiness.check() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {reason}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn encodes_with_conventional_names() {
        let readiness = Readiness::new();
        let mut metrics = Metrics::new("f2b-publisher");
        let p = PublisherMetrics::new(&mut metrics, &readiness);
        p.events_accepted.inc();
        p.events_rejected.inc_nak(NakReason::RateLimited);
        p.events_rejected.inc_nak(NakReason::RateLimited);
        p.ledger_active_bans.set(7);
        p.connected_peers
            .get_or_create(&SocketLabel { socket: "reply" })
            .inc();
        let text = metrics.encode();
        for line in [
            "f2b_publisher_events_accepted_total 1",
            "f2b_publisher_events_rejected_total{reason=\"rate_limited\"} 2",
            "f2b_publisher_ledger_active_bans 7",
            "f2b_publisher_connected_peers{socket=\"reply\"} 1",
            "# TYPE f2b_publisher_events_accepted counter",
            "f2b_publisher_heartbeats_sent_total 0",
            "f2b_publisher_events_rejected_total{reason=\"quarantined\"} 0",
            "f2b_publisher_connected_peers{socket=\"broadcast\"} 0",
            "f2b_build_info{daemon=\"f2b-publisher\",version=\"",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let p = ProcessStats::read();
        if !Path::new("/proc/self/stat").exists() {
            eprintln!("SKIPPED: no /proc here");
            return;
        }
        assert!(p.resident_bytes.unwrap() > 0, "{p:?}");
        assert!(p.open_fds.unwrap() >= 3, "{p:?}");
        assert!(p.max_fds.unwrap() >= p.open_fds.unwrap(), "{p:?}");
        assert!(p.cpu_seconds.unwrap() >= 0.0, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = p.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{p:?}"
        );
        let text = Metrics::new("f2b-monitor").encode();
        for name in [
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(name), "{name:?} missing from:\n{text}");
        }
    }

    #[test]
    fn monitor_histogram_in_seconds() {
        let mut metrics = Metrics::new("f2b-monitor");
        let m = MonitorMetrics::new(&mut metrics, &Readiness::new());
        m.round_trip.observe(0.003);
        m.events_found
            .get_or_create(&ActionLabel { action: "ban" })
            .inc();
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE f2b_monitor_publisher_round_trip_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("f2b_monitor_publisher_round_trip_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("f2b_monitor_events_found_total{action=\"ban\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn subscriber_age_and_readiness() {
        let readiness = Readiness::new();
        let mut metrics = Metrics::new("f2b-subscriber");
        let s = SubscriberMetrics::new(&mut metrics, &readiness, Duration::from_millis(50));
        let err = readiness.check().unwrap_err();
        assert!(err.contains("no verified message"), "{err}");
        s.last_heartbeat.touch();
        assert_eq!(readiness.check(), Ok(()));
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE f2b_subscriber_last_heartbeat_age_seconds gauge"),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(80));
        let err = readiness.check().unwrap_err();
        assert!(err.contains("more than 50ms"), "{err}");
        assert!(s.last_heartbeat.age().unwrap() >= Duration::from_millis(80));
    }

    #[test]
    fn conditions_name_the_first_that_fails() {
        let readiness = Readiness::new();
        let mut metrics = Metrics::new("f2b-monitor");
        let m = MonitorMetrics::new(&mut metrics, &readiness);
        assert!(readiness.check().unwrap_err().contains("publisher"));
        m.publisher_answering.set(true);
        assert_eq!(readiness.check(), Ok(()));
        m.queue_has_room.set(false);
        assert_eq!(
            readiness.check().unwrap_err(),
            "the event queue is full".to_owned()
        );
    }
}
