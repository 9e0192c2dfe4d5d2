//! What the three fail2ban-cluster daemons share besides the protocol: the
//! configuration file, ZeroMQ socket setup, and the plumbing of a daemon's `main`.
//!
//! # Layout
//!
//! - [`config`]: `fail2ban-cluster.conf`, parsed in stages (TOML to raw structs, raw
//!   to validated types) with errors that name the file and the key.
//! - [`sockets`]: every ZeroMQ socket is created by [`sockets::new_socket`], which sets
//!   the maximum message size, high-water marks, ZMTP heartbeats and keepalive; plus
//!   a shutdown socket that wakes a blocked `zmq::poll` when the daemon stops.
//! - [`legacy_config`]: converts a fail2ban-zmq-tools INI configuration to ours.
//! - [`state_file`]: recognising a damaged state database and moving it aside.
//! - [`metrics`]: Prometheus metrics (each daemon's set of typed handles) and the
//!   small HTTP server of `metrics_bind`: `/metrics`, `/healthz`, `/readyz`.
//! - [`daemon`]: common command-line options, logging, `--check`, `--daemon`,
//!   SIGTERM/SIGINT, systemd's readiness notification (`READY=1`, `STOPPING=1`),
//!   and error reporting, so each `main.rs` stays a few lines.
//! - [`log_batch`]: the log writer [`daemon::init_tracing`] installs, which lets a
//!   thread hold its log lines and write them in one go ([`log_batch::hold_log_lines`]).
//! - `testing` (feature `testing`, for the daemons' integration tests only): a
//!   spawned binary killed on drop whose log lines are awaited with a deadline, a
//!   stand-in for systemd's `NOTIFY_SOCKET`, and an HTTP GET for the metrics server.
//!
//! Kept apart from `f2b-proto` because all of it does I/O (files, sockets, signals),
//! which the protocol crate must not.

pub mod config;
pub mod daemon;
pub mod legacy_config;
pub mod log_batch;
pub mod metrics;
pub mod sockets;
pub mod state_file;
#[cfg(feature = "testing")]
pub mod testing;

pub use tokio_util::sync::CancellationToken;
pub use zmq;
