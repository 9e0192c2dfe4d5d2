//! The fail2ban-cluster wire protocol.
//!
//! This crate owns every byte that crosses the network between `f2b-monitor`,
//! `f2b-publisher` and `f2b-subscriber`: the message types, their encoding, and the
//! validation that turns untrusted bytes into typed values. It does no I/O (no
//! sockets, no files, no clock), so it can be read on its own, unit-tested
//! exhaustively and fuzzed. docs/PROTOCOL.md is the human-readable specification;
//! this crate is the reference implementation of it.
//!
//! # Layout
//!
//! - [`auth`]: monitor credentials (HMAC-SHA256 request MACs) and the publisher's
//!   Ed25519 signatures on broadcasts and snapshot replies.
//! - [`names`]: validated [`NodeName`] and [`JailName`].
//! - [`event`]: [`Event`], [`Action`], [`EventId`], [`canonical_ip`].
//! - [`message`]: the three message families, [`Request`] (monitor to publisher),
//!   [`Reply`] (publisher to monitor) and [`Broadcast`] (publisher to subscribers),
//!   with their `encode`/`decode` functions and the PUB/SUB topic frames.
//! - [`snapshot`]: the snapshot request and its paged reply, for subscribers that
//!   catch up after an absence.
//! - [`legacy`]: the wire format of fail2ban-zmq-tools (`host|jail|action|ip`), for
//!   mixed clusters during a migration.
//! - [`error`]: [`ProtoError`], one variant per way input can be wrong, each carrying
//!   the offending value, and its mapping to a NAK [`NakReason`].
//!
//! Limits are the named constants below; input larger than [`MAX_MESSAGE_SIZE`] is
//! refused before it is parsed.

pub mod auth;
pub mod error;
pub mod event;
pub mod legacy;
pub mod message;
pub mod names;
pub mod snapshot;

mod wire;

pub use error::{NakReason, ProtoError};
pub use event::{canonical_ip, Action, Event, EventId};
pub use message::{
    event_topic, pack_events, Ack, AckStatus, Broadcast, Epoch, EventBatch, Heartbeat, Nak, Reply,
    Request, Sequenced, HEARTBEAT_TOPIC,
};
pub use names::{JailName, NodeName};
pub use snapshot::{ActiveBan, SnapshotPage, SnapshotReply, SnapshotRequest};

/// The protocol version this crate speaks; every message carries it as `"v"`.
pub const PROTOCOL_VERSION: u64 = 1;

/// The largest message part (ZeroMQ frame) any fail2ban-cluster socket accepts, in
/// bytes. Sockets set `ZMQ_MAXMSGSIZE` to this value, so a peer that announces a
/// larger frame is disconnected by libzmq before the frame is buffered, and the
/// decoders refuse anything larger before parsing it.
pub const MAX_MESSAGE_SIZE: usize = 8 * 1024;

/// The most bytes [`pack_events`] puts in one `events` payload (about 25 events of
/// typical size). Smaller than [`MAX_MESSAGE_SIZE`] on purpose: ZeroMQ's
/// high-water marks count messages, not bytes, so this keeps the memory a stalled
/// subscriber can hold on the publisher at about 2,500 x 4 KiB = 10 MiB at worst
/// (the publisher's PUB socket queues 2,500 messages per subscriber), and a slow
/// one in itself at 10,000 x 4 KiB (its receive queue). Receivers accept up to
/// [`MAX_MESSAGE_SIZE`].
pub const PACKED_MESSAGE_SIZE: usize = 4 * 1024;

/// The most events one `reports` request carries ([`Request::pack`]), and so the
/// most answers in one `replies` message. 32 events of typical size (about 135
/// bytes each) make a request of about 4.3 KiB; events with long node names fill
/// [`MAX_MESSAGE_SIZE`] sooner and a request then carries fewer. The answers to 32
/// events fit in [`MAX_MESSAGE_SIZE`] with NAK details shortened if need be.
pub const MAX_REPORT_EVENTS: usize = 32;

/// The most message parts (frames) a fail2ban-cluster message may have. Today's
/// messages use two at most besides the topic: a payload and its authentication
/// frame (a report's [`auth::RequestAuth`], a reply's MAC, a signature); the rest is
/// room for later additions.
pub const MAX_FRAMES: usize = 4;

/// The longest jail name accepted, in bytes.
pub const MAX_JAIL_LEN: usize = 64;

/// The longest node name accepted, in bytes (RFC 1123 host name).
pub const MAX_NODE_LEN: usize = 253;

/// The largest integer JSON peers in every language read exactly (2^53 - 1); times
/// and sequence numbers above it are refused.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// The longest free-text NAK detail carried on the wire, in bytes.
pub const MAX_DETAIL_LEN: usize = 256;
