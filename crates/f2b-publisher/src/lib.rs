//! f2b-publisher, the fail2ban-cluster hub.
//!
//! Monitors report each Ban and Unban their fail2ban logged over a REQ socket to
//! this daemon's REP socket (`[publisher] reply_bind`). The publisher validates the
//! report, answers it with an ACK or a NAK, and broadcasts each event that changes
//! the cluster's state, numbered 1, 2, 3... within a random epoch, on its PUB socket
//! (`[publisher] broadcast_bind`), under the topic of the event's jail. When nothing
//! was broadcast for `heartbeat_interval` it broadcasts a heartbeat carrying the last
//! sequence number. Subscribers apply the broadcasts on every node.
//!
//! # Layout
//!
//! - [`core`]: the decisions, with no I/O: [`Core::handle`] takes a request's frames,
//!   the peer's address and the time, and returns the reply and the broadcast
//!   ([`Outcome`]). Validation, reserved addresses, time sanity, duplicate ids and
//!   cluster-state deduplication all live there and are unit-tested and fuzzed.
//! - [`memory`]: the bounded memories the core keeps (recent event ids, the ban
//!   state per jail and address).
//! - [`server`]: the ZeroMQ sockets and the single blocking thread that polls them
//!   ([`bind`], [`Bound::serve`]).
//! - [`run`]: bind then serve, what `main.rs` calls through
//!   `f2b_common::daemon::main`.

pub mod core;
pub mod memory;
pub mod server;

pub use crate::core::{reserved, Core, Limits, Outcome};
pub use crate::server::{bind, bind_with, Bound};

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
    #[error("cannot draw a random epoch: {0}")]
    Random(String),
    #[error("the socket thread failed: {0}")]
    Thread(String),
}

/// Runs the publisher until `shutdown` is cancelled: binds both sockets (logging
/// `listening on reply=.. broadcast=..`), serves, and on shutdown lets queued
/// broadcasts go out (at most [`server::SHUTDOWN_LINGER`]) before returning `Ok`.
pub async fn run(
    config: PublisherConfig,
    shutdown: CancellationToken,
) -> Result<(), PublisherError> {
    bind(&config)?.serve(shutdown).await
}

/// What `--check` prints for the publisher.
pub fn summary(config: &Config) -> String {
    let p = &config.publisher;
    format!(
        "reply_bind = {}\nbroadcast_bind = {}\nheartbeat_interval = {}\nban_time = {}",
        p.reply_bind,
        p.broadcast_bind,
        humantime_like(p.heartbeat_interval),
        humantime_like(p.ban_time),
    )
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
