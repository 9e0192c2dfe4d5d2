//! f2b-monitor: reads fail2ban's log and reports every Ban and Unban to the
//! publisher.
//!
//! An event travels: fail2ban writes `NOTICE [sshd] Ban 203.0.113.5` to its log;
//! [`tail::follow`] is woken by inotify and reads the new line; [`parse`] turns it
//! into a [`parse::LogEntry`]; [`stop::StopFilter`] decides whether an Unban is a
//! real one or part of fail2ban stopping; the event, with a random id, is written
//! to the queue file in `[monitor] state_dir` and waits in a bounded queue; the
//! sender thread ([`send`]) delivers it over a REQ socket and logs `reported`
//! when the publisher ACKs it.
//!
//! # Layout
//!
//! - [`parse`]: one log line to a [`parse::LogEntry`], for every format fail2ban
//!   0.8 to 1.1 and its syslog target write. Pure.
//! - [`stop`]: the state machine that keeps a stopping fail2ban's Unbans (one per
//!   active ban) from being propagated. Pure.
//! - [`tail`]: following the log file across appends, rotation (rename and create,
//!   with fail2ban still writing to the old file until `flushlogs`), copytruncate
//!   (lines written between logrotate's copy and its truncation are lost: that
//!   is inherent to copytruncate) and absence, woken by inotify, in bounded
//!   reads. Read from the end of the log on first start (that position is
//!   saved before anything is read, so a crash before the first event loses
//!   nothing); later starts resume from the saved position.
//! - `pipeline`: lines to queued events: the stop filter, the queue file, the
//!   saved position (never past a line whose outcome is not on the disk), the
//!   bound on unanswered events (backpressure).
//! - [`send`]: the REQ socket loop: the events queued together packed into one
//!   `reports` request (a lone one a `report`), ACK wait, resend with backoff,
//!   NAK handling.
//! - [`link`]: whether the publisher is connected while nothing is sent (a
//!   socket monitor on the REQ socket), for readiness.
//! - `exchange`: one report and its reply: signing with this node's credential
//!   (`[trust] secret`), reading the reply, checking its MAC.
//! - [`manual`]: the `send` subcommand: one event typed by an administrator,
//!   reported like a logged one, and its answer.
//! - [`state`]: the position in the log and the unanswered events, kept in
//!   `[monitor] state_dir` across restarts and crashes.
//! - [`scan`]: the `scan FILE` subcommand: the events a file holds, as JSON lines.
//! - [`run`] ties them together, [`run_with`] also serves metrics and health
//!   ([`Telemetry`], `[monitor] metrics_bind`); `main.rs` only parses the command
//!   line.
//!
//! # Metrics
//!
//! The counters of [`f2b_common::metrics::MonitorMetrics`] are recorded where
//! its table says: lines read and events found or ignored in `pipeline`, the
//! events queued and the room left in [`send::Room`], sends, answers, NAKs,
//! drops, ACK timeouts and the round trip in [`send`]. Each is an atomic
//! operation; label lookups are done once, not per line.

mod exchange;
pub mod link;
pub mod manual;
pub mod parse;
mod pipeline;
pub mod scan;
pub mod send;
pub mod state;
pub mod stop;
pub mod tail;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{Local, NaiveDateTime, TimeZone};
use f2b_common::config::{MonitorConfig, NodeConfig, TrustConfig, TrustError};
use f2b_common::metrics::{self, Metrics, MetricsError, MonitorMetrics, Readiness};
use f2b_common::sockets::shutdown_socket;
use f2b_common::zmq;
use f2b_proto::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pipeline::{Counters, Pipeline};
use crate::send::Room;
use crate::state::{StateError, StateStore};
use crate::stop::StopFilter;
use crate::tail::Batch;

/// Everything that stops the monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    #[error("cannot watch the directory {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error("ZeroMQ socket for {endpoint}")]
    Socket {
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    /// `[trust]` does not let the monitor run (no credential, no opt-out).
    #[error("invalid [trust] configuration")]
    Trust(#[source] TrustError),
    #[error("the {task} task failed: {detail}")]
    Task { task: &'static str, detail: String },
    /// Another monitor uses the same state files (and so the same log): two
    /// monitors would report every event twice.
    #[error("cannot use the state directory {dir}")]
    State {
        dir: PathBuf,
        #[source]
        source: StateError,
    },
    /// `[monitor] metrics_bind` cannot be listened on.
    #[error("cannot serve metrics")]
    Metrics(#[source] MetricsError),
    #[error("cannot install the SIGHUP handler")]
    Signal(#[source] std::io::Error),
}

impl MonitorError {
    pub(crate) fn task(task: &'static str, err: impl std::fmt::Display) -> Self {
        MonitorError::Task {
            task,
            detail: err.to_string(),
        }
    }
}

/// The monitor's metrics and readiness, and where to serve them.
#[derive(Debug)]
pub struct Telemetry {
    /// `[monitor] metrics_bind`: `None`, no server (the handles still count).
    pub bind: Option<SocketAddr>,
    pub registry: Metrics,
    pub readiness: Readiness,
    /// The handles; clone them before [`run_with`] to read them in-process.
    pub metrics: MonitorMetrics,
}

impl Telemetry {
    /// A registry with the monitor's metrics, served on `bind` if set.
    pub fn new(bind: Option<SocketAddr>) -> Self {
        let readiness = Readiness::new();
        let mut registry = Metrics::new("f2b-monitor");
        let metrics = MonitorMetrics::new(&mut registry, &readiness);
        Telemetry {
            bind,
            registry,
            readiness,
            metrics,
        }
    }
}

/// Metric handles registered nowhere: they count, and nobody reads them (for
/// [`send::SenderParams::metrics`] outside the daemon).
pub fn detached_metrics() -> MonitorMetrics {
    Telemetry::new(None).metrics
}

/// Lines read but not yet parsed, in batches of at most [`tail::READ_LINES`]
/// (the event queue behind them is the one `queue_size` bounds).
const LINE_BATCHES: usize = 8;

/// Runs the monitor until `shutdown` is cancelled: follows `config.log_path`
/// (read from its end on first start; later starts resume from the saved
/// position, see [`state`]; with copytruncate rotation, lines written between
/// logrotate's copy and its truncation are lost, which is inherent to
/// copytruncate), reports each Ban and Unban as an event of node `node.name` to
/// `config.publisher`. On shutdown it stops reading, tries to deliver what is
/// queued for at most `config.ack_timeout`, and returns `Ok`; what is left stays
/// in `config.state_dir` for the next start, and so do the Unbans the stop filter
/// still holds (their lines are read again).
///
/// Native reports are signed with `trust.secret` (see [`send`]); without one the
/// monitor runs only with `trust.allow_unauthenticated`, and warns.
///
/// Once its state is loaded and the log is watched it tells systemd it is ready
/// (`READY=1`, for a `Type=notify` unit), without waiting for the publisher.
///
/// Fails at once with [`MonitorError::Trust`] if `trust` has neither, and with
/// [`MonitorError::State`] if another monitor holds `state_dir`'s lock for the
/// same node and log. If `state_dir` cannot be used for another reason (not
/// writable), the monitor runs without it and says so in a warning.
pub async fn run(
    node: NodeConfig,
    config: MonitorConfig,
    trust: TrustConfig,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    run_with(node, config, trust, Telemetry::new(None), shutdown).await
}

/// [`run`], recording [`Telemetry::metrics`] and serving them with `/healthz`
/// and `/readyz` on [`Telemetry::bind`] if set ("metrics listening on ADDR" in
/// the log). The server starts before the monitor's work (an address that
/// cannot be bound fails the start with [`MonitorError::Metrics`]) and has
/// stopped when this returns, on shutdown or on an error; a scrape in progress
/// does not hold it up.
pub async fn run_with(
    node: NodeConfig,
    config: MonitorConfig,
    trust: TrustConfig,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let credential = credential(&node, &config, &trust)?;
    let Telemetry {
        bind,
        registry,
        readiness,
        metrics: m,
    } = telemetry;
    // Stopped when `run` returns, whether or not `shutdown` came.
    let stop_server = shutdown.child_token();
    let server = metrics::serve_if(bind, registry, readiness, stop_server.clone())
        .await
        .map_err(MonitorError::Metrics)?;
    let result = monitor(node, config, trust, credential, m, shutdown).await;
    stop_server.cancel();
    if let Some(server) = server {
        server.join().await;
    }
    result
}

async fn monitor(
    node: NodeConfig,
    config: MonitorConfig,
    trust: TrustConfig,
    credential: Option<send::Credential>,
    m: MonitorMetrics,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    log_credential(&node, &config, &trust, credential.as_ref());
    m.queue_capacity
        .set(i64::try_from(config.queue_size).unwrap_or(i64::MAX));
    let (state, saved) = open_state(&node, &config).await?;
    let ctx = zmq::Context::new();
    // Stops the sender: on shutdown, or when the reading side fails.
    let stop_sender = shutdown.child_token();
    let endpoint = config.publisher.as_str().to_owned();
    let shutdown_sock =
        shutdown_socket(&ctx, stop_sender.clone()).map_err(|source| MonitorError::Socket {
            endpoint: endpoint.clone(),
            source,
        })?;
    let room = Arc::new(
        Room::new(config.queue_size, saved.pending.len())
            .observed(m.events_queued.clone(), m.queue_has_room.clone()),
    );
    // Never full: the room bounds the events taken from the log.
    let (event_tx, event_rx) = mpsc::channel::<Event>(config.queue_size.max(1));
    let link = link::Link::start(&ctx, m.publisher_answering.clone(), stop_sender.clone());
    let params = send::SenderParams {
        ctx,
        endpoint,
        ack_timeout: config.ack_timeout,
        drain_time: config.ack_timeout,
        shutdown: shutdown_sock,
        legacy: config.legacy.clone(),
        credential,
        backlog: saved.pending,
        state: state.clone(),
        max_backoff: send::BACKOFF_MAX,
        room: Some(room.clone()),
        metrics: m.clone(),
        link,
    };
    let sender = tokio::task::spawn_blocking(move || send::run_sender(params, event_rx));

    let (line_tx, line_rx) = mpsc::channel::<Batch>(LINE_BATCHES);
    let first_start = saved.position.is_none();
    let started =
        tail::Follower::open(config.log_path.clone(), tail::DRAIN_GRACE, saved.position).await;
    let (follower, start) = match started {
        Ok(f) => {
            let start = f.position();
            (f, start)
        }
        Err(e) => {
            stop_sender.cancel();
            drop(event_tx);
            let _ = sender.await;
            return Err(e);
        }
    };
    // A first start reads from the end of the log: that decision is saved
    // before anything is read (and before `watching`), so a crash at any later
    // moment resumes from there instead of from a later end of the log.
    let start_saved = first_start && save_start(state.as_ref(), &start, saved.info_seen).await;
    follower.announce();
    let follower = tokio::spawn(follower.run(line_tx, shutdown.clone()));
    // The state is loaded, the REQ socket's thread and the log watcher are up:
    // ready, whether or not the publisher answers (a unit must not fail to start
    // because the hub is down; /readyz tells that apart).
    f2b_common::daemon::notify_ready(&format!(
        "watching {}, reporting to {}",
        config.log_path.display(),
        config.publisher.as_str()
    ));
    let pipeline = Pipeline {
        node: node.name.clone(),
        ignore_jails: config.ignore_jails.clone(),
        state,
        room,
        filter: StopFilter::default().with_info_seen(saved.info_seen),
        counters: Counters::new(&m),
    };
    // A task of its own, not this future (which the caller may run in
    // `block_on`): the follower's channel send then wakes it on the runtime's
    // thread, the follower's, with no hop to another thread between reading a
    // line and queueing its event.
    // Dropping this future (a caller giving up on it) stops the pipeline task as
    // well, which would otherwise go on alone.
    let pipeline_stop = shutdown.child_token();
    let _stop_pipeline_on_drop = pipeline_stop.clone().drop_guard();
    let processed =
        tokio::spawn(pipeline.process(start, start_saved, line_rx, event_tx, pipeline_stop))
            .await
            .map_err(|e| MonitorError::task("pipeline", e))
            .and_then(|r| r);
    let followed = follower
        .await
        .map_err(|e| MonitorError::task("follower", e))
        .and_then(|r| r);
    if followed.is_err() || processed.is_err() {
        stop_sender.cancel();
    }
    let sent = sender
        .await
        .map_err(|e| MonitorError::task("sender", e))
        .and_then(|r| r);
    // The sender's error is the root cause when the queue closed under the reader.
    sent?;
    followed?;
    processed
}

/// This node's credential for native reports: `None` in the legacy format, or
/// with `trust.allow_unauthenticated` and no secret; an error with neither a
/// secret nor the opt-out.
pub fn credential(
    node: &NodeConfig,
    config: &MonitorConfig,
    trust: &TrustConfig,
) -> Result<Option<send::Credential>, MonitorError> {
    if config.legacy.is_some() {
        return Ok(None);
    }
    trust.require_monitor().map_err(MonitorError::Trust)?;
    Ok(trust.secret.clone().map(|secret| send::Credential {
        key: node.name.clone(),
        secret,
    }))
}

/// Says at start how reports are authenticated: the credential's name and where
/// its secret came from (never the secret), or a warning when they go without.
fn log_credential(
    node: &NodeConfig,
    config: &MonitorConfig,
    trust: &TrustConfig,
    credential: Option<&send::Credential>,
) {
    let source = trust.secret_source.as_deref().unwrap_or("trust.secret");
    if config.legacy.is_some() {
        if trust.secret.is_some() {
            tracing::info!(
                source = %source,
                "[monitor] legacy = true: reports use the fail2ban-zmq-tools format and its token, not this node's [trust] credential"
            );
        }
    } else if let Some(c) = credential {
        tracing::info!(
            key = %c.key,
            source = %source,
            "reports are signed with this node's credential"
        );
    } else {
        tracing::warn!(
            node = %node.name,
            "reports are sent unauthenticated (trust.allow_unauthenticated = true and no trust.secret): \
             a publisher that checks credentials refuses them (NAK unauthenticated, retried), \
             and one that accepts them lets anyone who can reach it report bans and unbans in any node's name"
        );
    }
}

/// Opens the state directory (on a blocking thread): an error if another monitor
/// holds it; for any other failure a warning, and the monitor runs without it.
async fn open_state(
    node: &NodeConfig,
    config: &MonitorConfig,
) -> Result<(Option<Arc<Mutex<StateStore>>>, state::Saved), MonitorError> {
    let (dir, name, log) = (
        config.state_dir.clone(),
        node.name.clone(),
        config.log_path.clone(),
    );
    let opened = tokio::task::spawn_blocking(move || StateStore::open(&dir, &name, &log))
        .await
        .map_err(|e| MonitorError::task("state", e))?;
    match opened {
        Ok((store, saved)) => {
            if saved.position.is_some() || !saved.pending.is_empty() {
                tracing::info!(
                    state_dir = %config.state_dir.display(),
                    pending = saved.pending.len(),
                    "resuming from the saved state"
                );
            }
            Ok((Some(Arc::new(Mutex::new(store))), saved))
        }
        Err(source @ StateError::Locked { .. }) => Err(MonitorError::State {
            dir: config.state_dir.clone(),
            source,
        }),
        Err(e) => {
            tracing::warn!(
                state_dir = %config.state_dir.display(),
                error = %f2b_common::daemon::error_chain(&e),
                "cannot keep state: a restart will start at the end of the log and lose unsent events"
            );
            Ok((None, state::Saved::default()))
        }
    }
}

/// Saves a first start's position (the end of the log, or no file when the log
/// does not exist yet: it is then read from its start, as this run reads it),
/// on a blocking thread. `true` once it is on the disk; a failure is logged, not
/// fatal, and the pipeline saves a position at its first commit.
async fn save_start(
    state: Option<&Arc<Mutex<StateStore>>>,
    start: &[tail::FilePos],
    info_seen: bool,
) -> bool {
    let Some(state) = state.cloned() else {
        return false;
    };
    let position = start.to_vec();
    let saved = tokio::task::spawn_blocking(move || {
        let mut st = match state.lock() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        st.save_position(&position, info_seen)
    })
    .await;
    match saved {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(
                error = %f2b_common::daemon::error_chain(&e),
                "cannot save the starting position (tried again with the first lines read): a crash before then starts the next run at the end of the log"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot save the starting position");
            false
        }
    }
}

/// The event time of a line's timestamp (local time), or now if it has none.
pub fn event_time_ms(time: Option<NaiveDateTime>) -> u64 {
    time.and_then(|t| Local.from_local_datetime(&t).earliest())
        .map(|t| t.timestamp_millis())
        .and_then(|ms| u64::try_from(ms).ok())
        .filter(|&ms| ms > 0 && ms <= f2b_proto::MAX_SAFE_INTEGER)
        .unwrap_or_else(now_ms)
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(Local::now().timestamp_millis()).unwrap_or(1)
}
