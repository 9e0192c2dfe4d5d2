//! f2b-monitor: reads fail2ban's log and reports every Ban and Unban to the
//! publisher.
//!
//! An event travels: fail2ban writes `NOTICE [sshd] Ban 203.0.113.5` to its log;
//! [`tail::follow`] is woken by inotify and reads the new line; [`parse`] turns it
//! into a [`parse::LogEntry`]; [`stop::StopFilter`] decides whether an Unban is a
//! real one or part of fail2ban stopping; the event, with a random id, waits in a
//! bounded queue; the sender thread ([`send`]) delivers it over a REQ socket and
//! logs `reported` when the publisher ACKs it.
//!
//! # Layout
//!
//! - [`parse`]: one log line to a [`parse::LogEntry`], for every format fail2ban
//!   0.8 to 1.1 and its syslog target write. Pure.
//! - [`stop`]: the state machine that keeps a stopping fail2ban's Unbans (one per
//!   active ban) from being propagated. Pure.
//! - [`tail`]: following the log file across appends, rotation (rename and create,
//!   with fail2ban still writing to the old file until `flushlogs`), copytruncate
//!   and absence, woken by inotify.
//! - [`send`]: the REQ socket loop: ACK wait, resend with backoff, NAK handling.
//! - [`state`]: the position in the log and the unanswered events, kept in
//!   `[monitor] state_dir` across restarts.
//! - [`scan`]: the `scan FILE` subcommand: the events a file holds, as JSON lines.
//! - [`run`] ties them together; `main.rs` only parses the command line.

pub mod parse;
pub mod scan;
pub mod send;
pub mod state;
pub mod stop;
pub mod tail;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::{Local, NaiveDateTime, TimeZone};
use f2b_common::config::{MonitorConfig, NodeConfig};
use f2b_common::sockets::shutdown_socket;
use f2b_common::zmq;
use f2b_proto::{Event, EventId, JailName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::parse::{Kind, LogEntry};
use crate::state::StateStore;
use crate::stop::{StopFilter, Verdict};
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
}

impl MonitorError {
    pub(crate) fn task(task: &'static str, err: impl std::fmt::Display) -> Self {
        MonitorError::Task {
            task,
            detail: err.to_string(),
        }
    }
}

/// Lines read but not yet parsed, in batches (the event queue behind them is the
/// one `queue_size` bounds).
const LINE_BATCHES: usize = 64;

/// Runs the monitor until `shutdown` is cancelled: follows `config.log_path`
/// (from its end on the first start, from the saved position after that; see
/// [`state`]), reports each Ban and Unban as an event of node `node.name` to
/// `config.publisher`. On shutdown it stops reading, tries to deliver what is
/// queued for at most `config.ack_timeout`, and returns `Ok`; what is left stays
/// in `config.state_dir` for the next start.
///
/// If `state_dir` cannot be used (not writable, held by another monitor), the
/// monitor runs without it and says so in a warning.
pub async fn run(
    node: NodeConfig,
    config: MonitorConfig,
    shutdown: CancellationToken,
) -> Result<(), MonitorError> {
    let ctx = zmq::Context::new();
    // Stops the sender: on shutdown, or when the reading side fails.
    let stop_sender = shutdown.child_token();
    let endpoint = config.publisher.as_str().to_owned();
    let shutdown_sock =
        shutdown_socket(&ctx, stop_sender.clone()).map_err(|source| MonitorError::Socket {
            endpoint: endpoint.clone(),
            source,
        })?;
    let (state, saved) = open_state(&node, &config);
    let (event_tx, event_rx) = mpsc::channel::<Event>(config.queue_size);
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
    };
    let sender = tokio::task::spawn_blocking(move || send::run_sender(params, event_rx));

    let (line_tx, line_rx) = mpsc::channel::<Batch>(LINE_BATCHES);
    let started =
        tail::Follower::start(config.log_path.clone(), tail::DRAIN_GRACE, saved.position).await;
    let follower = match started {
        Ok(f) => tokio::spawn(f.run(line_tx, shutdown.clone())),
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
    };
    let processed = pipeline.process(line_rx, event_tx, shutdown.clone()).await;
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

/// Opens the state directory, or explains in a warning why the monitor runs
/// without one.
fn open_state(
    node: &NodeConfig,
    config: &MonitorConfig,
) -> (Option<Arc<Mutex<StateStore>>>, state::Saved) {
    match StateStore::open(&config.state_dir, &node.name, &config.log_path) {
        Ok((store, saved)) => {
            if saved.position.is_some() || !saved.pending.is_empty() {
                tracing::info!(
                    state_dir = %config.state_dir.display(),
                    pending = saved.pending.len(),
                    "resuming from the saved state"
                );
            }
            (Some(Arc::new(Mutex::new(store))), saved)
        }
        Err(e) => {
            tracing::warn!(
                state_dir = %config.state_dir.display(),
                error = %f2b_common::daemon::error_chain(&e),
                "cannot keep state: a restart will start at the end of the log and lose unsent events"
            );
            (None, state::Saved::default())
        }
    }
}

/// Turns lines into queued events.
#[derive(Debug, Clone)]
struct Pipeline {
    node: f2b_proto::NodeName,
    ignore_jails: Vec<JailName>,
    state: Option<Arc<Mutex<StateStore>>>,
}

impl Pipeline {
    async fn process(
        &self,
        mut lines: mpsc::Receiver<Batch>,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), MonitorError> {
        let mut filter = StopFilter::default();
        let mut verdicts = Vec::new();
        // Events not queued because shutdown came while the queue was full.
        let mut dropped = 0usize;
        let mut paused = false;
        loop {
            let deadline = filter.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let batch = tokio::select! {
                b = lines.recv() => b,
                () = sleep => {
                    filter.release_due(Instant::now(), &mut verdicts);
                    Some(Batch { lines: Vec::new(), position: Vec::new() })
                }
            };
            let Some(batch) = batch else {
                // The follower ended (shutdown): what is held is real as far as we
                // know; queue it without waiting.
                filter.release_all(&mut verdicts);
                for v in verdicts.drain(..) {
                    if let Some(ev) = self.verdict(v) {
                        if events.try_send(ev).is_err() {
                            dropped += 1;
                        }
                    }
                }
                if dropped > 0 {
                    tracing::warn!(
                        events = dropped,
                        "shutting down with events read but not queued"
                    );
                }
                return Ok(());
            };
            let now_local = Local::now().naive_local();
            for line in &batch.lines {
                let Some(entry) = parse::parse_line_at(&line.text, now_local) else {
                    tracing::trace!(line = line.number, text = %line.text, "not a fail2ban line");
                    continue;
                };
                log_skipped(&entry, line.number);
                filter.push(&entry, line.number, Instant::now(), &mut verdicts);
            }
            for v in verdicts.drain(..) {
                let Some(ev) = self.verdict(v) else { continue };
                match events.try_send(ev) {
                    Ok(()) => {
                        if paused {
                            paused = false;
                            tracing::info!("event queue has room again");
                        }
                    }
                    Err(mpsc::error::TrySendError::Full(ev)) => {
                        // Backpressure: stop reading (the log file keeps the lines)
                        // until the sender takes an event. Logged once per episode.
                        if !paused {
                            paused = true;
                            tracing::warn!(
                                capacity = events.max_capacity(),
                                "event queue full, reading paused until the publisher catches up"
                            );
                        }
                        tokio::select! {
                            r = events.send(ev) => {
                                if r.is_err() {
                                    return Err(MonitorError::task("sender", "stopped"));
                                }
                            }
                            () = shutdown.cancelled() => {
                                dropped += 1;
                            }
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Err(MonitorError::task("sender", "stopped"));
                    }
                }
            }
            if !batch.position.is_empty() {
                // Every event of this batch is in the queue file: the lines are done.
                self.with_state(|st| st.save_position(&batch.position));
            }
        }
    }

    /// Runs `f` on the state files, if kept; a failure is logged, not fatal.
    fn with_state(&self, f: impl FnOnce(&mut StateStore) -> Result<(), state::StateError>) {
        if let Some(state) = &self.state {
            let r = match state.lock() {
                Ok(mut st) => f(&mut st),
                Err(poisoned) => f(&mut poisoned.into_inner()),
            };
            if let Err(e) = r {
                tracing::warn!(
                    error = %f2b_common::daemon::error_chain(&e),
                    "cannot update the saved state"
                );
            }
        }
    }

    /// The event to queue for a verdict, if any (logging the others). The event
    /// is recorded in the state files before it is queued.
    fn verdict(&self, v: Verdict) -> Option<Event> {
        let seen = match v {
            Verdict::Report(seen) => seen,
            Verdict::Suppress(seen, reason) => {
                tracing::debug!(
                    reason = %reason,
                    action = %seen.action,
                    jail = %seen.jail,
                    ip = %seen.ip,
                    line = seen.line,
                    "ignored"
                );
                return None;
            }
        };
        if self.ignore_jails.contains(&seen.jail) {
            tracing::debug!(
                reason = %"ignore_jails",
                action = %seen.action,
                jail = %seen.jail,
                ip = %seen.ip,
                line = seen.line,
                "ignored"
            );
            return None;
        }
        let id = EventId::from_u128(uuid::Uuid::new_v4().as_u128());
        let time_ms = event_time_ms(seen.time);
        match Event::new(
            id,
            self.node.clone(),
            seen.jail,
            seen.action,
            seen.ip,
            time_ms,
        ) {
            Ok(ev) => {
                self.with_state(|st| st.add(&ev));
                tracing::debug!(
                    action = %ev.action,
                    jail = %ev.jail,
                    ip = %ev.ip,
                    id = %ev.id,
                    line = seen.line,
                    "queued"
                );
                Some(ev)
            }
            Err(e) => {
                tracing::warn!(error = %e, line = seen.line, "cannot build the event");
                None
            }
        }
    }
}

fn log_skipped(entry: &LogEntry, line: u64) {
    if let Kind::Skipped { jail, reason } = &entry.kind {
        tracing::debug!(reason = %reason, jail = %jail, line, "ignored");
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
