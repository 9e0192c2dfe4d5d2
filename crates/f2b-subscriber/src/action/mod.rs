//! The actions: how an accepted event is applied on this machine.
//!
//! Each action implements [`Applier`]: one call applies one action (ban or unban) to
//! a batch of addresses in one local jail. The executor decides what to batch and
//! what to retry; an action only says how a call went ([`CallError`] and its
//! [`FailureScope`]).
//!
//! - [`fail2ban::Fail2banClient`]: `fail2ban-client [-s SOCKET] set JAIL banip|unbanip IP...`.
//! - [`socket::Fail2banSocket`]: the same `set JAIL banip|unbanip IP...` commands sent
//!   straight to fail2ban-server's Unix socket over one kept connection
//!   ([`pickle`] encodes the requests and decodes the replies).
//! - [`log::LogFile`]: one line per event appended to a file a fail2ban jail reads.
//! - [`exec::Exec`]: a command per event, argv with tags replaced, no shell.
//! - [`NoAction`]: logs what it would do.

pub mod exec;
pub mod fail2ban;
pub mod log;
pub mod pickle;
pub mod socket;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use f2b_common::config::SubscriberAction;
use f2b_proto::{Action, JailName};
use ipnet::IpNet;

use crate::pending::Item;

/// A boxed future, so that [`Applier`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a failed call concerned, which decides how it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureScope {
    /// The call as a whole failed, whatever the addresses (server unreachable,
    /// socket missing, program missing, file not writable): every address is kept
    /// and the jail is retried with backoff.
    Call,
    /// The local jail does not exist: like [`FailureScope::Call`], and logged as an
    /// error once.
    UnknownJail,
    /// Maybe one of the addresses: a batch is split in halves to find which; a
    /// single address is retried alone with backoff.
    Undetermined,
}

/// A failed call: its scope and the tool's own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
#[non_exhaustive]
pub struct CallError {
    pub scope: FailureScope,
    pub message: String,
}

impl CallError {
    pub fn new(scope: FailureScope, message: impl Into<String>) -> Self {
        CallError {
            scope,
            message: message.into(),
        }
    }
}

/// The addresses a local jail refuses to ban by itself (its `ignoreip`), which a
/// forced ban would bypass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JailIgnores {
    pub nets: Vec<IpNet>,
}

/// An action. Implementations must not panic on any input.
pub trait Applier: Send + fmt::Debug {
    /// The `action` configuration value, for logs.
    fn name(&self) -> &'static str;

    /// The most addresses one call takes (1: no batching).
    fn max_batch(&self) -> usize;

    /// Applies `action` to every item in local jail `jail`, in one call. All items
    /// have that jail and action.
    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// The local jail's own ignore list, asked before bans; default: nothing.
    fn jail_ignores<'a>(
        &'a mut self,
        _jail: &'a JailName,
    ) -> BoxFuture<'a, Result<JailIgnores, CallError>> {
        Box::pin(async { Ok(JailIgnores::default()) })
    }
}

/// `action = "none"`: logs `would apply` and succeeds.
#[derive(Debug, Default)]
pub struct NoAction;

impl Applier for NoAction {
    fn name(&self) -> &'static str {
        "none"
    }

    fn max_batch(&self) -> usize {
        crate::pending::MAX_BATCH
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            for i in items {
                tracing::info!(action = %action, jail = %jail, ip = %i.ip(), node = %i.event.node, "would apply");
            }
            Ok(())
        })
    }
}

/// The action configured in `[subscriber]`.
pub fn from_config(action: &SubscriberAction) -> Box<dyn Applier> {
    match action {
        SubscriberAction::Fail2banClient { program, socket } => Box::new(
            fail2ban::Fail2banClient::new(program.clone(), socket.clone()),
        ),
        SubscriberAction::Fail2banSocket { socket } => {
            Box::new(socket::Fail2banSocket::new(socket.clone()))
        }
        SubscriberAction::Log { path } => Box::new(log::LogFile::new(path.clone())),
        SubscriberAction::Exec { argv } => Box::new(exec::Exec::new(argv.clone())),
        SubscriberAction::None => Box::new(NoAction),
    }
}

/// Cuts a tool's message to a loggable length, at a character boundary.
pub(crate) fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}
