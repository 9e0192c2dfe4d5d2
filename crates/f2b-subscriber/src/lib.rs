//! f2b-subscriber: receives the bans the cluster broadcasts and applies them on
//! this node.
//!
//! An event travels: publisher PUB socket → [`receiver`] (SUB socket, the
//! publisher's signature, liveness, epochs, sequence gaps, reconnections; the
//! `gate`'s epoch and replay rules) → intake ([`filter`]: own node, duplicates,
//! `ignore_ip`, this machine's addresses; recorded as pending in the [`store`]) →
//! [`pending`] queue (coalesced per jail and address, bounded) → executor (batches
//! per jail and action, expiry, the local jail's `ignoreip`, retries with backoff)
//! → an [`action`] (`fail2ban-client`, `log`, `exec`, `none`) → recorded as applied.
//!
//! Catch-up ([`catchup`], `[subscriber] snapshot`): on start, on every
//! reconnection, on an epoch change and on a sequence gap, the receive loop asks
//! the publishers for a snapshot of the active bans while it keeps receiving (and
//! queueing) broadcasts; the intake applies the bans it does not have, unbans the
//! bans it holds that the cluster no longer does, then the queued broadcasts newer
//! than the snapshot.
//!
//! Trust (`[trust] publisher_key`): every broadcast and every snapshot reply must
//! be signed by the publisher's key, or it is dropped before it is decoded; a
//! signed broadcast is used only if its epoch was confirmed by a signed snapshot
//! reply to a fresh request and its sequence number is above what its epoch
//! already used (see the `gate` module), so a recorded broadcast replayed later
//! cannot undo newer state.
//!
//! Delivery is at least once: an event is marked applied in the state after its
//! action succeeded, so a crash in between applies it again after the restart
//! (`fail2ban-client banip`/`unbanip` are idempotent). Events received and not yet
//! applied survive a restart; events applied before are never applied again.
//!
//! # Layout
//!
//! - [`receiver`]: the ZeroMQ loop, a task woken by its sockets' descriptors; the
//!   socket monitor;
//!   logs `connected`, `disconnected`, `missed events`, dead links; legacy
//!   (fail2ban-zmq-tools) messages; sends events and snapshots on a channel.
//! - `gate`: which signed broadcasts may be used (epochs confirmed by snapshots,
//!   sequence floors against replays).
//! - [`catchup`]: fetching snapshots page by page over REQ (a fresh nonce per
//!   request, signed replies), queueing broadcasts meanwhile, backoff.
//! - [`watch`]: `f2b-subscriber watch`, the verified stream printed, nothing
//!   applied.
//! - [`filter`]: the pure filter core and its [`SkipReason`]s.
//! - [`pending`]: the pure queue: coalescing, grouping, backoff, the `queue_size` bound.
//! - `executor`: the intake (filter, record, queue, resync) and executor tasks
//!   around the queue.
//! - [`store`]: the SQLite state in `state_dir`: pending and applied events, the
//!   bans held from the cluster; lock, pruning, rebuild of a damaged file.
//! - [`action`]: the [`Applier`] trait and the four actions.
//!
//! [`run`] wires them with the configured action; [`Subscriber`] does the same with
//! an injected action and a channel of [`Notice`]s, for tests and embedding.

pub mod action;
pub mod catchup;
mod executor;
pub mod filter;
mod gate;
pub mod pending;
mod ratelimit;
pub mod receiver;
pub mod store;
pub mod watch;

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use f2b_common::config::{Config, NodeConfig, SubscriberConfig, TrustError};
use f2b_common::metrics::{self, Metrics, MetricsError, Readiness, SubscriberMetrics};
use f2b_common::{zmq, CancellationToken};
use f2b_proto::auth::PublicKey;
use f2b_proto::{Action, Epoch, JailName};
use tokio::sync::mpsc;
use tracing::instrument::WithSubscriber;

pub use action::{Applier, CallError, FailureScope};
pub use catchup::{ResyncReason, SNAPSHOT_TIMEOUT};
pub use executor::LOCAL_ADDRESS_REFRESH;
pub use filter::SkipReason;
pub use receiver::Refusal;
pub use store::StoreError;

use executor::{enqueue, Executor, Intake, LocalAddresses, Shared};
use filter::Filter;
use ratelimit::RateLimit;
use receiver::ReceiverConfig;
use store::{State, Store};

/// After shutdown is requested, how long in-flight and ready events may still take
/// to be applied before the executor is stopped.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Received events buffered between the receive loop and the intake.
const CHANNEL_CAPACITY: usize = 4096;

/// A fatal error of the subscriber.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscriberError {
    #[error("cannot create the {what} socket")]
    Socket {
        what: &'static str,
        source: zmq::Error,
    },
    #[error("cannot subscribe to topic {topic:?}")]
    Subscribe { topic: String, source: zmq::Error },
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        source: zmq::Error,
    },
    #[error("cannot read the state of the subscriber's ZeroMQ sockets (ZMQ_FD, ZMQ_EVENTS)")]
    Poll { source: zmq::Error },
    #[error("cannot watch the {what} socket's file descriptor")]
    Watch {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot use the state directory")]
    State { source: StoreError },
    #[error("the {what} task failed")]
    Task {
        what: &'static str,
        source: tokio::task::JoinError,
    },
    #[error("cannot follow a publisher without its key")]
    Trust { source: TrustError },
    #[error("cannot serve metrics")]
    Metrics { source: MetricsError },
    #[error("cannot install the SIGHUP handler")]
    Signal { source: std::io::Error },
}

/// Whether the configuration lets a subscriber run: `[trust] publisher_key`, or
/// the explicit opt-out, unless it follows a fail2ban-zmq-tools publisher
/// (`legacy = true`), which cannot sign.
pub fn check_trust(config: &Config) -> Result<(), TrustError> {
    if config.subscriber.legacy {
        return Ok(());
    }
    config.trust.require_subscriber()
}

/// Logs which publisher keys are in use, and warns when broadcasts are not
/// authenticated.
fn log_trust(config: &Config) {
    let keys = &config.trust.publisher_keys;
    if config.subscriber.legacy {
        tracing::warn!(
            "legacy = true: the broadcasts of a fail2ban-zmq-tools publisher are not authenticated \
             (it cannot sign them): anyone who can reach this subscriber's connection to it could make \
             this node ban or unban addresses"
        );
    } else if keys.is_empty() {
        tracing::warn!(
            "running without a publisher key ([trust] allow_unauthenticated = true): broadcasts and \
             snapshots are not verified, and anyone who can reach this subscriber's connection to the \
             publisher could make this node ban or unban addresses; set [trust] publisher_key"
        );
    } else {
        tracing::info!(
            publisher_key = %keys_label(keys),
            "broadcasts and snapshots must be signed by this key"
        );
        if config.trust.allow_unauthenticated {
            tracing::warn!(
                "[trust] allow_unauthenticated = true: this subscriber still refuses every broadcast \
                 and snapshot not signed by publisher_key (the opt-out only matters where no key is set)"
            );
        }
    }
}

fn keys_label(keys: &[PublicKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Something the subscriber did, for tests and embedding (the same facts as the
/// log lines).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// First message of a publisher epoch since the socket was (re)created, or
    /// first message after a connection was re-established.
    Connected { epoch: Epoch },
    /// A connection to a fail2ban-zmq-tools publisher was made (`legacy = true`).
    LegacyConnected { publisher: String },
    /// A connection to a publisher was lost (libzmq reconnects by itself).
    Disconnected { publisher: String },
    /// No message for the link timeout: the socket is recreated.
    LinkDead,
    /// A snapshot was applied.
    Resynced {
        reason: ResyncReason,
        epoch: Epoch,
        /// The snapshot's sequence number.
        seq: u64,
        /// Bans it listed.
        bans: usize,
        /// Of those, bans queued to be applied (the others were known or skipped).
        applied: usize,
        /// Held or pending bans the cluster no longer holds, unbanned or dropped.
        unbanned: usize,
    },
    /// Sequence numbers skipped in an epoch.
    Missed { epoch: Epoch, count: u64 },
    /// A broadcast dropped before it was used (`publisher`: the configured
    /// endpoint(s) it came from).
    Refused { reason: Refusal, publisher: String },
    /// A snapshot fetch failed (or its reply was refused); it is retried.
    SnapshotFailed { publisher: String, error: String },
    /// An event not applied, and why.
    Skipped {
        reason: SkipReason,
        jail: JailName,
        ip: IpAddr,
    },
    /// An event applied (in local jail `jail`).
    Applied {
        action: Action,
        jail: JailName,
        ip: IpAddr,
        seq: u64,
    },
    /// A call failed; its addresses are retried.
    Failed {
        scope: FailureScope,
        jail: JailName,
        ips: Vec<IpAddr>,
        message: String,
    },
    /// An event dropped because the queue was full.
    Dropped { jail: JailName, ip: IpAddr },
}

/// An optional channel of [`Notice`]s, and the metrics they count.
#[derive(Debug, Clone, Default)]
pub(crate) struct Notices {
    tx: Option<mpsc::UnboundedSender<Notice>>,
    metrics: Option<SubscriberMetrics>,
    /// Whether to tell systemd when subscribed (the daemon, not `watch`).
    notify_ready: bool,
}

impl Notices {
    pub(crate) fn to(tx: mpsc::UnboundedSender<Notice>) -> Self {
        Notices {
            tx: Some(tx),
            metrics: None,
            notify_ready: false,
        }
    }

    /// The SUB socket(s) are connected for the first time (the state is open
    /// before): the daemon is started, whether or not a publisher is up yet, and
    /// tells systemd so (`READY=1`).
    pub(crate) fn subscribed(&self, publisher: &str) {
        if self.notify_ready {
            f2b_common::daemon::notify_ready(&format!("subscribed to {publisher}"));
        }
    }

    /// The metrics, when recorded (the daemon, not `watch`).
    pub(crate) fn metrics(&self) -> Option<&SubscriberMetrics> {
        self.metrics.as_ref()
    }

    /// Events waiting to be applied now.
    pub(crate) fn queued(&self, len: usize) {
        if let Some(m) = &self.metrics {
            m.events_queued.set(i64::try_from(len).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn send(&self, n: Notice) {
        if let Some(m) = &self.metrics {
            count(m, &n);
        }
        if self.notify_ready {
            link_status(&n);
        }
        if let Some(tx) = &self.tx {
            // Nobody listening any more is fine.
            let _ = tx.send(n);
        }
    }
}

/// The unit's STATUS= line (systemd, `systemctl status`) when the link to the
/// publisher changes; the other notices (one per event) send nothing.
fn link_status(n: &Notice) {
    let status = match n {
        Notice::Connected { epoch } => format!("receiving from the publisher (epoch {epoch})"),
        Notice::LegacyConnected { publisher } => format!("connected to {publisher} (legacy)"),
        Notice::Disconnected { publisher } => {
            format!("disconnected from {publisher}, reconnecting")
        }
        Notice::LinkDead => {
            "no message from the publisher within heartbeat_timeout, reconnecting".to_owned()
        }
        _ => return,
    };
    f2b_common::daemon::notify_status(&status);
}

/// The metrics a notice stands for.
fn count(m: &SubscriberMetrics, n: &Notice) {
    match n {
        Notice::Applied { .. } => {
            m.events_applied.inc();
        }
        Notice::Skipped { reason, .. } => m.events_skipped.inc(reason.as_str()),
        Notice::Dropped { .. } => m.events_skipped.inc("queue_full"),
        Notice::Failed { .. } => {
            m.events_failed.inc();
        }
        Notice::Resynced { .. } => {
            m.snapshots.inc();
        }
        Notice::Refused { reason, .. } => m.broadcasts_refused.inc(reason.as_str()),
        _ => {}
    }
}

/// A subscriber to run, with optional test hooks.
#[derive(Debug)]
pub struct Subscriber {
    node: NodeConfig,
    config: SubscriberConfig,
    /// `[trust]` as a whole (only publisher_keys and the opt-out are used).
    full: Config,
    applier: Option<Box<dyn Applier>>,
    notices: Notices,
    local: LocalAddresses,
    snapshot_timeout: Duration,
}

impl Subscriber {
    /// A subscriber for `config`'s `[node]`, `[subscriber]` and `[trust]`.
    pub fn new(config: &Config) -> Self {
        Subscriber {
            node: config.node.clone(),
            config: config.subscriber.clone(),
            full: config.clone(),
            applier: None,
            notices: Notices::default(),
            local: LocalAddresses::Interfaces,
            snapshot_timeout: SNAPSHOT_TIMEOUT,
        }
    }

    /// How long a snapshot page may take before the request is abandoned and
    /// retried (default [`SNAPSHOT_TIMEOUT`]).
    pub fn with_snapshot_timeout(mut self, timeout: Duration) -> Self {
        self.snapshot_timeout = timeout;
        self
    }

    /// Uses `applier` instead of the configured action.
    pub fn with_applier(mut self, applier: Box<dyn Applier>) -> Self {
        self.applier = Some(applier);
        self
    }

    /// Sends a [`Notice`] for everything the subscriber does.
    pub fn with_notices(mut self, tx: mpsc::UnboundedSender<Notice>) -> Self {
        self.notices.tx = Some(tx);
        self
    }

    /// Uses a fixed list as this machine's addresses instead of the interfaces.
    pub fn with_local_addresses(mut self, addrs: Vec<IpAddr>) -> Self {
        self.local = LocalAddresses::Fixed(addrs);
        self
    }

    /// Runs until `shutdown` is cancelled, then applies what is in flight or ready
    /// (for at most [`DRAIN_TIMEOUT`]) and returns. Once its state is open and its
    /// SUB socket(s) connected it tells systemd it is ready (`READY=1`, for a
    /// `Type=notify` unit), without waiting for a publisher. Fails at once when the state
    /// directory cannot be created or is locked by another subscriber, or when
    /// [`check_trust`] refuses the configuration.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SubscriberError> {
        let Subscriber {
            node,
            config,
            full,
            applier,
            notices,
            local,
            snapshot_timeout,
        } = self;
        let applier = applier.unwrap_or_else(|| action::from_config(&config.action));
        tracing::info!(
            node = %node.name,
            publisher = %endpoints_label(&config.publisher),
            jails = %jails_label(&config.jails),
            action = %applier.name(),
            ban_jail = %config.ban_jail.as_ref().map_or("(event's jail)", |j| j.as_str()),
            snapshot = %endpoints_label(&config.snapshot),
            legacy = config.legacy,
            "starting"
        );
        check_trust(&full).map_err(|source| SubscriberError::Trust { source })?;
        log_trust(&full);
        // Metrics (served only with `[subscriber] metrics_bind`; recording is
        // cheap either way).
        let mut notices = notices;
        let readiness = Readiness::new();
        let mut registry = Metrics::new("f2b-subscriber");
        notices.notify_ready = true;
        notices.metrics = Some(SubscriberMetrics::new(
            &mut registry,
            &readiness,
            config.heartbeat_timeout,
        ));
        let metrics_server = metrics::serve_if(
            full.metrics.subscriber,
            registry,
            readiness,
            shutdown.clone(),
        )
        .await
        .map_err(|source| SubscriberError::Metrics { source })?;
        if !config.legacy && config.snapshot.is_empty() {
            tracing::warn!(
                "no [subscriber] snapshot endpoint: events broadcast while this subscriber is \
                 stopped or cut off from the publisher will not be recovered, and no snapshot \
                 confirms the publisher's epoch (the first one seen is taken)"
            );
        }
        if !config.legacy
            && !config.snapshot.is_empty()
            && config.snapshot.len() < config.publisher.len()
        {
            tracing::warn!(
                publishers = config.publisher.len(),
                snapshot = config.snapshot.len(),
                "fewer [subscriber] snapshot endpoints than publishers: the broadcasts of a publisher \
                 whose epoch no snapshot confirms are refused (list each publisher's reply endpoint)"
            );
        }
        let store = Store::open(&config.state_dir, SystemTime::now())
            .map_err(|source| SubscriberError::State { source })?;
        let state = State::new(store);
        state.with(|s| s.prune(store::now_ms()));
        let waiting = state.with(|s| s.pending());
        let counts = state.with(|s| s.counts());
        tracing::info!(
            path = %config.state_dir.display(),
            pending = counts.pending,
            applied = counts.done,
            held = counts.held,
            "state"
        );

        let ctx = zmq::Context::new();
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let shared = Shared::new(config.queue_size);
        {
            let held = state.with(|s| s.held_in_other_jails());
            let mut p = shared.lock();
            for (local, jail, ip, until) in held {
                p.held(local, jail, ip, until);
            }
        }
        if !waiting.is_empty() {
            tracing::info!(
                count = waiting.len(),
                "events received before the restart and not applied yet are queued again"
            );
            enqueue(
                &shared,
                waiting,
                &mut RateLimit::new(Duration::from_secs(10)),
                &notices,
                &state,
            );
        }

        let rcfg = ReceiverConfig {
            endpoints: config.publisher.clone(),
            jails: config.jails.clone(),
            heartbeat_timeout: config.heartbeat_timeout,
            snapshot: config.snapshot.clone(),
            snapshot_timeout,
            queue_limit: config.queue_size,
            legacy: config.legacy,
            keys: full.trust.publisher_keys.clone(),
            heartbeats: false,
        };
        // The receive loop is a task of this runtime, woken by its sockets'
        // descriptors: a message reaches the intake without a thread hand-off. It
        // logs through the caller's tracing dispatcher, even a scoped
        // (thread-local) one.
        let receiver = tokio::spawn(
            receiver::run(ctx, rcfg, shutdown.clone(), tx, notices.clone())
                .with_current_subscriber(),
        );
        // A restart's snapshot recovers a ban lost before its record.
        let act_first = !config.legacy && config.snapshot.len() >= config.publisher.len();
        let intake = tokio::spawn(
            Intake {
                rx,
                filter: Filter::new(node.name.clone(), config.ignore_ip.clone()),
                local,
                ban_jail: config.ban_jail.clone(),
                shared: shared.clone(),
                notices: notices.clone(),
                state: state.clone(),
                act_first,
            }
            .run(),
        );
        let mut executor = tokio::spawn(Executor::new(applier, shared, notices, state).run());

        // The receive loop ends on shutdown (or on a fatal socket error); then the
        // intake drains the channel and closes the queue, and the executor finishes.
        let received = receiver.await;
        let intake_done = intake.await;
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, &mut executor).await;
        if drained.is_err() {
            executor.abort();
            // Wait until it is dropped: it holds the state (and its lock).
            let _ = (&mut executor).await;
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "in-flight events not finished in time, stopped");
        }
        received.map_err(|source| SubscriberError::Task {
            what: "receive",
            source,
        })??;
        intake_done.map_err(|source| SubscriberError::Task {
            what: "intake",
            source,
        })?;
        if let Ok(done) = drained {
            done.map_err(|source| SubscriberError::Task {
                what: "executor",
                source,
            })?;
        }
        if let Some(server) = metrics_server {
            server.join().await;
        }
        Ok(())
    }
}

/// Runs the subscriber with its configured action until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), SubscriberError> {
    Subscriber::new(&config).run(shutdown).await
}

fn endpoints_label(endpoints: &[f2b_common::config::Endpoint]) -> String {
    endpoints
        .iter()
        .map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn jails_label(jails: &[JailName]) -> String {
    if jails.is_empty() {
        "(all)".to_owned()
    } else {
        jails
            .iter()
            .map(JailName::as_str)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What `f2b-subscriber --check` prints about a valid configuration.
pub fn summary(config: &Config) -> String {
    let s = &config.subscriber;
    let action = match &s.action {
        f2b_common::config::SubscriberAction::Fail2banClient { program, socket } => format!(
            "fail2ban-client ({}{})",
            program.display(),
            socket
                .as_ref()
                .map(|p| format!(" -s {}", p.display()))
                .unwrap_or_default()
        ),
        f2b_common::config::SubscriberAction::Fail2banSocket { socket } => {
            format!("fail2ban-socket ({})", socket.display())
        }
        f2b_common::config::SubscriberAction::Log { path } => format!("log ({})", path.display()),
        f2b_common::config::SubscriberAction::Exec { argv } => format!("exec ({argv:?})"),
        f2b_common::config::SubscriberAction::None => "none".to_owned(),
    };
    format!(
        "node: {}\npublisher: {}\npublisher_key: {}\njails: {}\naction: {}\nban_jail: {}\nignore_ip: {}\nheartbeat_timeout: {:?}\nqueue_size: {}\nlegacy: {}\nstate_dir: {}\nsnapshot: {}",
        config.node.name,
        s.publisher
            .iter()
            .map(|e| e.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if s.legacy {
            "(legacy: not authenticated)".to_owned()
        } else if config.trust.publisher_keys.is_empty() {
            "(none: allow_unauthenticated, broadcasts not verified)".to_owned()
        } else {
            keys_label(&config.trust.publisher_keys).replace(',', ", ")
        },
        jails_label(&s.jails),
        action,
        s.ban_jail
            .as_ref()
            .map_or("(the event's jail)", |j| j.as_str()),
        s.ignore_ip
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        s.heartbeat_timeout,
        s.queue_size,
        s.legacy,
        s.state_dir.display(),
        if s.snapshot.is_empty() {
            "(none: no catch-up)".to_owned()
        } else {
            s.snapshot
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Log lines written by the current thread while the returned guard lives
    /// (tests run on a current-thread runtime, so their tasks log here too).
    pub(crate) struct Captured {
        buf: Arc<Mutex<Vec<u8>>>,
        _guard: tracing::subscriber::DefaultGuard,
    }

    impl Captured {
        pub(crate) fn text(&self) -> String {
            String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
        }
    }

    #[derive(Clone)]
    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(crate) fn capture_logs() -> Captured {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = Writer(buf.clone());
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || w.clone())
            .finish();
        Captured {
            buf,
            _guard: tracing::subscriber::set_default(sub),
        }
    }

    fn conf(extra: &str) -> Config {
        f2b_common::config::from_str(
            &format!(
                "[node]\nname = \"web1\"\n[subscriber]\npublisher = \"tcp://hub:5680\"\n{extra}"
            ),
            std::path::Path::new("x.conf"),
        )
        .unwrap()
    }

    #[test]
    fn trust_is_required_and_its_absence_warned_about() {
        let key = f2b_proto::auth::SigningKey::from_seed([1; 32]).public();
        let err = check_trust(&conf("")).unwrap_err();
        assert_eq!(err.key, "trust.publisher_key");
        // A fail2ban-zmq-tools publisher cannot sign: no key needed, a warning.
        let legacy = conf("legacy = true\n");
        assert!(check_trust(&legacy).is_ok());
        let logs = capture_logs();
        log_trust(&legacy);
        assert!(
            logs.text().contains("WARN") && logs.text().contains("not authenticated"),
            "{}",
            logs.text()
        );
        let open = conf("[trust]\nallow_unauthenticated = true\n");
        assert!(check_trust(&open).is_ok());
        let logs = capture_logs();
        log_trust(&open);
        assert!(
            logs.text()
                .contains("could make this node ban or unban addresses"),
            "{}",
            logs.text()
        );
        let keyed = conf(&format!("[trust]\npublisher_key = \"{key}\"\n"));
        assert!(check_trust(&keyed).is_ok());
        let logs = capture_logs();
        log_trust(&keyed);
        assert!(
            logs.text().contains(&format!("publisher_key={key}")) && !logs.text().contains("WARN"),
            "{}",
            logs.text()
        );
    }

    #[test]
    fn summary_names_the_keys() {
        let c = f2b_common::config::from_str(
            "[node]\nname = \"web1\"\n[subscriber]\npublisher = [\"tcp://hub1:5680\", \"tcp://hub2:5680\"]\njails = [\"sshd\"]\nban_jail = \"cluster\"\nsocket = \"/run/f2b.sock\"\n",
            std::path::Path::new("x.conf"),
        )
        .unwrap();
        let s = summary(&c);
        for want in [
            "node: web1",
            "publisher: tcp://hub1:5680, tcp://hub2:5680",
            "jails: sshd",
            "action: fail2ban-client (fail2ban-client -s /run/f2b.sock)",
            "ban_jail: cluster",
            "ignore_ip: 127.0.0.0/8, ::1/128, 169.254.0.0/16, fe80::/10",
        ] {
            assert!(s.contains(want), "{want:?} not in\n{s}");
        }
    }
}
