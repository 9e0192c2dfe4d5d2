//! f2b-publisher, the fail2ban-cluster hub.
//!
//! Monitors report each Ban and Unban their fail2ban logged over a REQ socket to
//! this daemon's reply socket (`[publisher] reply_bind`; a ROUTER, which a REQ peer
//! cannot tell from a REP, so that requests arriving together are committed to the
//! ledger together, see [`server`]). The publisher validates the
//! report, answers it with an ACK or a NAK, and broadcasts each event that changes
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
//! - [`ledger`]: the SQLite ledger: schema, append, rebuild, snapshot pages,
//!   pruning, and what happens to a missing or corrupt file.
//! - [`legacy`]: the conversions between fail2ban-zmq-tools messages and events.
//! - [`memory`]: the bounded memories the core keeps (recent event ids, the ban
//!   state per jail and address), rebuilt from the ledger at start.
//! - [`throttle`]: the rate limit of the `rejected` log lines.
//! - [`server`]: the ZeroMQ sockets and the single blocking thread that polls them
//!   and prunes the ledger ([`bind`], [`Bound::serve`]).
//! - [`run`]: bind then serve, what `main.rs` calls through
//!   `f2b_common::daemon::main`; [`import_legacy_config`] is the
//!   `import-legacy-config` subcommand.

pub mod core;
pub mod ledger;
pub mod legacy;
pub mod memory;
pub mod server;
pub mod throttle;

pub use crate::core::{reserved, Core, Limits, Outcome, Response, PRUNE_INTERVAL};
pub use crate::ledger::{Ledger, LedgerError};
pub use crate::server::{bind, bind_with, Bound};

use std::path::Path;

use f2b_common::config::{Config, PublisherConfig};
use f2b_common::zmq;
use f2b_common::CancellationToken;

/// Why the publisher could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublisherError {
    #[error("cannot bind {key} = {endpoint}")]
    Bind {
        key: &'static str,
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    #[error("cannot {what}")]
    Socket {
        what: &'static str,
        #[source]
        source: zmq::Error,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the socket thread failed: {0}")]
    Thread(String),
}

/// Runs the publisher until `shutdown` is cancelled: opens the ledger (logging
/// `ledger path=.. epoch=.. seq=.. active=..`), binds the sockets (logging
/// `listening on reply=.. broadcast=..`, and `legacy_broadcast=..` when
/// configured), serves, and on shutdown lets queued broadcasts go out (at most
/// [`server::SHUTDOWN_LINGER`]) before returning `Ok`. Opening, pruning and
/// reading the ledger, which may take a while, happen on a blocking thread, never
/// on the runtime's.
pub async fn run(
    config: PublisherConfig,
    shutdown: CancellationToken,
) -> Result<(), PublisherError> {
    let bound = tokio::task::spawn_blocking(move || bind(&config))
        .await
        .map_err(|e| PublisherError::Thread(e.to_string()))??;
    bound.serve(shutdown).await
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

/// What `--check` prints for the publisher (never the legacy token).
pub fn summary(config: &Config) -> String {
    let p = &config.publisher;
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
