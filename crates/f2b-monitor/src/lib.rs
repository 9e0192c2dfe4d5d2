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
//!   reads. Read from the end of the log on first start; later starts resume
//!   from the saved position.
//! - `pipeline`: lines to queued events: the stop filter, the queue file, the
//!   saved position (never past a line whose outcome is not on the disk), the
//!   bound on unanswered events (backpressure).
//! - [`send`]: the REQ socket loop: ACK wait, resend with backoff, NAK handling.
//! - [`state`]: the position in the log and the unanswered events, kept in
//!   `[monitor] state_dir` across restarts and crashes.
//! - [`scan`]: the `scan FILE` subcommand: the events a file holds, as JSON lines.
//! - [`run`] ties them together; `main.rs` only parses the command line.

pub mod parse;
mod pipeline;
pub mod scan;
pub mod send;
pub mod state;
pub mod stop;
pub mod tail;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{Local, NaiveDateTime, TimeZone};
use f2b_common::config::{MonitorConfig, NodeConfig};
use f2b_common::sockets::shutdown_socket;
use f2b_common::zmq;
use f2b_proto::Event;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Pipeline;
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
        source: notify::Error,
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
}

impl MonitorError {
    pub(crate) fn task(task: &'static str, err: impl std::fmt::Display) -> Self {
        MonitorError::Task {
            task,
            detail: err.to_string(),
        }
    }
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
/// Fails at once with [`MonitorError::State`] if another monitor holds
/// `state_dir`'s lock for the same node and log. If `state_dir` cannot be used
/// for another reason (not writable), the monitor runs without it and says so in
/// a warning.
pub async fn run(
    node: NodeConfig,
    config: MonitorConfig,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
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
    let room = Arc::new(Room::new(config.queue_size, saved.pending.len()));
    // Never full: the room bounds the events taken from the log.
    let (event_tx, event_rx) = mpsc::channel::<Event>(config.queue_size.max(1));
    let params = send::SenderParams {
        ctx,
        endpoint,
        ack_timeout: config.ack_timeout,
        drain_time: config.ack_timeout,
        shutdown: shutdown_sock,
        legacy: config.legacy.clone(),
        backlog: saved.pending,
        state: state.clone(),
        max_backoff: send::BACKOFF_MAX,
        room: Some(room.clone()),
    };
    let sender = tokio::task::spawn_blocking(move || send::run_sender(params, event_rx));

    let (line_tx, line_rx) = mpsc::channel::<Batch>(LINE_BATCHES);
    let started =
        tail::Follower::start(config.log_path.clone(), tail::DRAIN_GRACE, saved.position).await;
    let (follower, start) = match started {
        Ok(f) => {
            let start = f.position();
            (tokio::spawn(f.run(line_tx, shutdown.clone())), start)
        }
        Err(e) => {
            stop_sender.cancel();
            drop(event_tx);
            let _ = sender.await;
            return Err(e);
        }
    };
    let pipeline = Pipeline {
        node: node.name.clone(),
        ignore_jails: config.ignore_jails.clone(),
        state,
        room,
        filter: StopFilter::default().with_info_seen(saved.info_seen),
    };
    let processed = pipeline
        .process(start, line_rx, event_tx, shutdown.clone())
        .await;
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

/// The event time of a line's timestamp (local time), or now if it has none.
pub fn event_time_ms(time: Option<NaiveDateTime>) -> u64 {
    time.and_then(|t| Local.from_local_datetime(&t).earliest())
        .map(|t| t.timestamp_millis())
        .and_then(|ms| u64::try_from(ms).ok())
        .filter(|&ms| ms > 0 && ms <= f2b_proto::MAX_SAFE_INTEGER)
        .unwrap_or_else(now_ms)
}

fn now_ms() -> u64 {
    u64::try_from(Local::now().timestamp_millis()).unwrap_or(1)
}
