//! The harness of fail2ban-cluster's workspace-level integration tests: it starts the
//! real binaries (`target/debug/f2b-{publisher,monitor,subscriber}`) and, for the
//! `fail2ban_*` tests, private real fail2ban-servers, all on loopback with ephemeral
//! ports and temporary files, and waits on what they log.
//!
//! # Layout
//!
//! - [`bins`]: where the binaries are (`CARGO_TARGET_DIR` or the workspace's
//!   `target/`, profile debug), with a clear panic when they were not built.
//! - [`process`]: [`Process`], a child whose standard error and output are read line
//!   by line on reader threads; tests wait for a line matching a regex (a condition
//!   with a generous deadline, never a sleep), or count lines incrementally
//!   ([`LineCount`]). Killed by its own PID on drop; its output is printed when a
//!   test fails.
//! - [`cluster`]: [`Publisher`] and [`Node`] (monitor + subscriber) started from real
//!   configuration files, and [`TestDir`], the temporary directory kept when a test
//!   fails. The default subscriber action is `exec` with the `f2b-test-record`
//!   helper, which appends `<action> <jail> <ip> <node>` to a file per node; for
//!   thousands of events, the `log` action to a file per node
//!   ([`NodeAction::LogFile`]). Subscribers ask the publisher for snapshots (catch
//!   up) unless told not to.
//! - [`trust`]: [`Keyring`], a test cluster's keys: the publisher's signing key and
//!   a secret per monitor node, random per test. Every publisher and node the
//!   harness starts runs with real trust (signed broadcasts, authenticated reports)
//!   unless its options say otherwise (the opt-out, wrong keys).
//! - [`applied`]: reading the files of the subscribers' `log` action
//!   incrementally, and counting what was lost or applied twice.
//! - [`fail2ban`]: [`Fail2ban`], a private fail2ban-server configured with the
//!   project's `fail2ban/` files verbatim, and the skip rules of `fail2ban_*` tests.
//! - [`raw`]: talking to a publisher without the daemons: a raw ZeroMQ REQ, and a
//!   hand-written ZMTP 3.0 peer announcing a 1 TiB frame.
//! - [`logline`]: fail2ban and sshd log lines as the real programs write them.
//! - [`wait`]: [`wait::until`], the condition wait for files and commands.
//!
//! The helper binaries `f2b-test-record` and `f2b-test-fail2ban-client` (a counting
//! wrapper around the real fail2ban-client) are built with this crate.

pub mod applied;
pub mod bins;
pub mod cluster;
pub mod fail2ban;
pub mod logline;
pub mod process;
pub mod raw;
pub mod trust;
pub mod wait;

pub use cluster::{
    Node, NodeAction, NodeOptions, NodeSecret, Publisher, PublisherOptions, TestDir,
};
pub use fail2ban::{Fail2ban, JailConf};
pub use process::{field, LineCount, LineMatch, Process};
pub use trust::Keyring;
pub use wait::TIMEOUT;
