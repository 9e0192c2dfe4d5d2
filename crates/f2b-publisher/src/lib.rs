//! f2b-publisher, the fail2ban-cluster hub.
//!
//! Monitors report each Ban and Unban their fail2ban logged over a REQ socket to
//! this daemon's reply socket (`[publisher] reply_bind`; a ROUTER, which a REQ peer
//! cannot tell from a REP, so that requests arriving together are committed to the
//! ledger together, see [`server`]); a monitor with several events waiting sends
//! up to 32 of them in one `reports` request. The publisher validates each
//! event, answers it with an ACK or a NAK (those of a `reports` request together,
//! in one `replies`), and broadcasts each event that changes
//! the cluster's state, numbered 1, 2, 3... within an epoch, on its PUB socket
//! (`[publisher] broadcast_bind`), under the topic of the event's jail. When nothing
//! was broadcast for `heartbeat_interval` it broadcasts a heartbeat carrying the last
//! sequence number. Subscribers apply the broadcasts on every node.
//!
//! Every broadcast event is first committed to the ledger, a SQLite file in
//! `[publisher] state_dir`: the epoch and the sequence numbers carry on across a
//! restart (no number is used twice, none is skipped), duplicate and state
//! deduplication survive it, and a subscriber can ask the reply socket for a
//! snapshot of the active bans (`snapshot` requests, answered page by page). An
//! event committed but never broadcast (the publisher died in between) is not lost:
//! its monitor, which got no ACK, resends it, and the restarted publisher answers
//! `duplicate` and broadcasts the ledger's row again with its original sequence
//! number (once per run, and only while it still is the cluster's state).
//!
//! Every report is authenticated: its second frame carries the monitor's
//! credential name, a timestamp, a nonce and an HMAC under the secret the publisher
//! holds for that node (`[trust.monitors]`); the reply carries a MAC back. Every
//! broadcast and snapshot reply is signed with the publisher's Ed25519 key
//! (`[trust] signing_key_file`, made by `f2b-publisher keygen`). The hub also
//! protects the fleet: addresses in `[publisher] ignore_ip` are never broadcast, each
//! node is rate-limited, and a node that suddenly reports far more than usual is
//! quarantined.
//!
//! With `[publisher] legacy = true` the reply socket also takes fail2ban-zmq-tools
//! requests (`host|jail|action|ip`, one frame, optionally after a token) and answers
//! them as the old publisher did; with `legacy_broadcast_bind`, every IPv4 event is
//! also published there in the old one-frame format, for old subscribers.
//!
//! # Layout
//!
//! - [`core`]: the decisions: [`Core::handle`] takes a request's frames, the peer's
//!   address and the time, and returns the reply and the broadcasts ([`Outcome`]).
//!   Validation, reserved addresses, time sanity, duplicate ids, cluster-state
//!   deduplication, legacy requests and snapshots all live there and are
//!   unit-tested and fuzzed (with an in-memory ledger).
//! - [`trust`]: the monitors' credentials (checking a report's authentication
//!   frame, the replay window and its nonces), the reply MAC and the signatures.
//! - [`guard`]: `ignore_ip`, the rate limit per node and the circuit breaker.
//! - [`ledger`]: the SQLite ledger: schema, append, rebuild, snapshot pages,
//!   pruning, and what happens to a missing or corrupt file.
//! - [`legacy`]: the conversions between fail2ban-zmq-tools messages and events.
//! - [`memory`]: the bounded memories the core keeps (recent event ids, the ban
//!   state per jail and address), rebuilt from the ledger at start.
//! - [`throttle`]: the rate limit of the `rejected` log lines.
//! - [`server`]: the ZeroMQ sockets and the single blocking thread that polls them
//!   and prunes the ledger ([`bind`], [`Bound::serve`]), and records the metrics
//!   (`f2b_common::metrics::PublisherMetrics`, [`Bound::with_metrics`]).
//! - [`reload`]: the configuration reload on SIGHUP: what may change without a
//!   restart, handed to the serving thread through a [`Reloader`].
//! - [`fleet`]: the `bans` and `status` subcommands, which read the ledger
//!   read-only ([`ledger::inspect`]) beside a running daemon.
//! - [`run`]: bind then serve, what `main.rs` calls through
//!   `f2b_common::daemon::main`; [`import_legacy_config`] is the
//!   `import-legacy-config` subcommand, [`keygen`] the `keygen` one.

pub mod core;
pub mod fleet;
pub mod guard;
pub mod keygen;
pub mod ledger;
pub mod legacy;
pub mod memory;
pub mod reload;
pub mod server;
pub mod throttle;
pub mod trust;

pub use crate::core::{reserved, Core, Limits, Outcome, Response, PRUNE_INTERVAL};
pub use crate::ledger::{Ledger, LedgerError};
pub use crate::server::{bind, bind_trusted, bind_with, Bound, Reload, Reloader};
pub use crate::trust::{Reporter, Seal, Trust};

use std::path::{Path, PathBuf};

use f2b_common::config::{Config, TrustError};
use f2b_common::metrics::{self, Metrics, MetricsError, PublisherMetrics, Readiness};
use f2b_common::zmq;
use f2b_common::CancellationToken;

/// Why the publisher could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublisherError {
    /// `hint` says what to check (see [`server::bind_hint`]).
    #[error("cannot bind {key} = {endpoint}: {error}: {hint}")]
    Bind {
        key: &'static str,
        endpoint: String,
        error: zmq::Error,
        hint: String,
    },
    #[error("cannot {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// The metrics server could not listen on `publisher.metrics_bind`; `hint`
    /// says what to check.
    #[error("publisher.metrics_bind: {error}: {hint}")]
    Metrics { error: MetricsError, hint: String },
    #[error("cannot install the SIGHUP handler (configuration reload)")]
    Signal(#[source] std::io::Error),
    #[error("the socket thread failed: {0}")]
    Thread(String),
}

/// Runs the publisher until `shutdown` is cancelled: checks `[trust]`
/// ([`TrustConfig::require_publisher`](f2b_common::config::TrustConfig::require_publisher)),
/// serves metrics on `[publisher] metrics_bind` when set (logging `metrics
/// listening on`), opens the ledger (logging `ledger path=.. epoch=.. seq=..
/// active=..`), binds the sockets (logging `listening on reply=.. broadcast=..`,
/// and `legacy_broadcast=..` when configured), tells systemd it is ready
/// (`READY=1` when started by a `Type=notify` unit), serves, and on shutdown lets
/// queued broadcasts go out (at most [`server::SHUTDOWN_LINGER`]) before
/// returning `Ok`. With `config_path`, each SIGHUP reloads that file (see
/// [`reload`]). Opening, pruning and reading the ledger, which may take a while,
/// happen on a blocking thread, never on the runtime's.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), PublisherError> {
    // First: SIGHUP's default action would end the process.
    let hup = match &config_path {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(PublisherError::Signal)?,
        ),
        None => None,
    };
    let readiness = Readiness::new();
    let mut registry = Metrics::new("f2b-publisher");
    let m = PublisherMetrics::new(&mut registry, &readiness);
    let server = metrics::serve_if(
        config.metrics.publisher,
        registry,
        readiness,
        shutdown.clone(),
    )
    .await
    .map_err(|error| {
        let hint = server::listen_hint(&error, "publisher.metrics_bind");
        PublisherError::Metrics { error, hint }
    })?;
    let (publisher, trust) = (config.publisher.clone(), config.trust.clone());
    let bound = tokio::task::spawn_blocking(move || bind_trusted(&publisher, &trust))
        .await
        .map_err(|e| PublisherError::Thread(e.to_string()))?;
    let mut bound = match bound {
        Ok(b) => b.with_metrics(m),
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    if let (Some(path), Some(hup)) = (config_path, hup) {
        let reloader = bound.reloader()?;
        tokio::spawn(reload::on_sighup(
            path,
            config,
            reloader,
            hup,
            shutdown.clone(),
        ));
    }
    // Bound and the ledger open: a `Type=notify` unit's start is complete.
    f2b_common::daemon::notify_ready(&ready_status(&bound));
    let result = bound.serve(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(server) = server {
        server.join().await;
    }
    result
}

/// The unit's STATUS= line once serving, e.g. `serving: reply tcp://0.0.0.0:5678,
/// broadcast tcp://0.0.0.0:5680`.
fn ready_status(bound: &Bound) -> String {
    let mut s = format!(
        "serving: reply {}, broadcast {}",
        bound.reply_endpoint(),
        bound.broadcast_endpoint()
    );
    if let Some(legacy) = bound.legacy_broadcast_endpoint() {
        s.push_str(&format!(", legacy broadcast {legacy}"));
    }
    s
}

/// Why `import-legacy-config` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}")]
    Convert {
        path: std::path::PathBuf,
        #[source]
        source: f2b_common::legacy_config::LegacyConfigError,
    },
}

/// `f2b-publisher import-legacy-config OLD.conf`: the fail2ban-zmq-tools
/// configuration at `path`, converted to a fail2ban-cluster configuration (TOML).
pub fn import_legacy_config(path: &Path) -> Result<String, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
        path: path.to_owned(),
        source,
    })?;
    f2b_common::legacy_config::convert(&text, &path.display().to_string()).map_err(|source| {
        ImportError::Convert {
            path: path.to_owned(),
            source,
        }
    })
}

/// What `--check` prints for the publisher (never a secret: the legacy token, the
/// monitors' secrets and the signing key are only said to be set).
pub fn summary(config: &Config) -> String {
    let p = &config.publisher;
    let t = &config.trust;
    let mut s = format!(
        "reply_bind = {}\nbroadcast_bind = {}\nheartbeat_interval = {}\nban_time = {}\nstate_dir = {}",
        p.reply_bind,
        p.broadcast_bind,
        humantime_like(p.heartbeat_interval),
        humantime_like(p.ban_time),
        p.state_dir.display(),
    );
    if let Some(l) = &p.legacy {
        s.push_str(&format!(
            "\nlegacy = true (token: {})",
            if l.token.is_some() { "set" } else { "none" }
        ));
    }
    if let Some(e) = &p.legacy_broadcast_bind {
        s.push_str(&format!("\nlegacy_broadcast_bind = {e}"));
    }
    let nets: Vec<String> = p.ignore_ip.iter().map(ToString::to_string).collect();
    s.push_str(&format!(
        "\nignore_ip = [{}]\nrate_limit = {}{}\nrate_burst = {}\nquarantine_floor = {}\n\
         quarantine_factor = {}\nquarantine_time = {}",
        nets.join(", "),
        p.rate_limit,
        if p.rate_limit == 0 { " (off)" } else { "/s" },
        p.rate_burst,
        p.quarantine_floor,
        p.quarantine_factor,
        humantime_like(p.quarantine_time),
    ));
    let names: Vec<&str> = t.monitors.keys().map(|n| n.as_str()).collect();
    s.push_str(&format!(
        "\ntrust.monitors = {} ({})\ntrust.public_key = {}\ntrust.max_clock_skew = {}",
        names.len(),
        names.join(", "),
        t.signing_key.as_ref().map_or_else(
            || "none (nothing is signed)".to_owned(),
            |k| k.public().to_string()
        ),
        humantime_like(t.max_clock_skew),
    ));
    if t.allow_unauthenticated {
        s.push_str(
            "\ntrust.allow_unauthenticated = true (reports without credentials are accepted)",
        );
    }
    s
}

/// A duration as the configuration file would write it (`1s`, `10m`, `500ms`).
fn humantime_like(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    match ms {
        m if m % 3_600_000 == 0 => format!("{}h", m / 3_600_000),
        m if m % 60_000 == 0 => format!("{}m", m / 60_000),
        m if m % 1000 == 0 => format!("{}s", m / 1000),
        m => format!("{m}ms"),
    }
}
