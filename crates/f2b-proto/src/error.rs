//! Decoding and validation errors, and the NAK reason codes they map to.

use std::fmt;

/// How many characters of an offending value an error keeps. Values come from the
/// network; an error must name them without copying a whole hostile message into a
/// log line.
const MAX_SHOWN: usize = 64;

/// A value quoted in an error: truncated, and shown with control characters escaped.
#[derive(Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    /// Keeps at most the first 64 characters of `value`.
    pub fn new(value: &str) -> Self {
        let mut s: String = value.chars().take(MAX_SHOWN).collect();
        if value.chars().count() > MAX_SHOWN {
            s.push('…');
        }
        Shown(s)
    }

    /// The (possibly truncated) value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug formatting quotes the value and escapes control characters, so a
        // value with a newline or an escape sequence cannot forge a log line.
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Everything that can be wrong with bytes handed to a decoder or a value handed to
/// a validating constructor. Each variant names the field and carries the offending
/// value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {detail}")]
    Malformed { detail: String },
    #[error("missing field {field:?}")]
    MissingField { field: &'static str },
    #[error("field {field:?} must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("unsupported protocol version {found} (this peer speaks {supported})")]
    UnsupportedVersion { found: u64, supported: u64 },
    #[error("unknown message type {found}")]
    UnknownType { found: Shown },
    #[error("invalid node name {value}: {reason}")]
    InvalidNode { value: Shown, reason: &'static str },
    #[error("invalid jail name {value}: {reason}")]
    InvalidJail { value: Shown, reason: &'static str },
    #[error("invalid IP address {value}")]
    InvalidIp { value: Shown },
    #[error("invalid action {value} (expected \"ban\" or \"unban\")")]
    InvalidAction { value: Shown },
    #[error("invalid event id {value} (expected a UUID)")]
    InvalidEventId { value: Shown },
    #[error("invalid time_ms {value} (expected 1..=2^53-1 milliseconds since the Unix epoch)")]
    InvalidTime { value: u64 },
    #[error("invalid sequence number {value} (expected 1..=2^53-1)")]
    InvalidSequence { value: u64 },
    #[error("invalid epoch {value} (expected 16 lower-case hex digits)")]
    InvalidEpoch { value: Shown },
    #[error("invalid NAK reason {value}")]
    InvalidReason { value: Shown },
    #[error("topic frame {found} does not match the payload (expected {expected})")]
    TopicMismatch { expected: Shown, found: Shown },
}

impl ProtoError {
    /// The NAK reason a publisher answers this error with.
    pub fn nak_reason(&self) -> NakReason {
        match self {
            ProtoError::TooLarge { .. } => NakReason::TooLarge,
            ProtoError::Malformed { .. }
            | ProtoError::MissingField { .. }
            | ProtoError::WrongType { .. }
            | ProtoError::InvalidSequence { .. }
            | ProtoError::InvalidEpoch { .. }
            | ProtoError::InvalidReason { .. }
            | ProtoError::TopicMismatch { .. } => NakReason::Malformed,
            ProtoError::UnsupportedVersion { .. } => NakReason::UnsupportedVersion,
            ProtoError::UnknownType { .. } => NakReason::UnknownType,
            ProtoError::InvalidNode { .. } => NakReason::InvalidNode,
            ProtoError::InvalidJail { .. } => NakReason::InvalidJail,
            ProtoError::InvalidIp { .. } => NakReason::InvalidIp,
            ProtoError::InvalidAction { .. } => NakReason::InvalidAction,
            ProtoError::InvalidEventId { .. } => NakReason::InvalidId,
            ProtoError::InvalidTime { .. } => NakReason::InvalidTime,
        }
    }
}

/// Why a publisher refused a request. Sent on the wire as the snake_case code
/// ([`NakReason::code`]); docs/PROTOCOL.md lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NakReason {
    /// Not JSON, not an object, a field missing or of the wrong type.
    Malformed,
    /// Larger than [`crate::MAX_MESSAGE_SIZE`].
    TooLarge,
    /// A `"v"` this publisher does not speak.
    UnsupportedVersion,
    /// A `"type"` this publisher does not know, or one not valid as a request.
    UnknownType,
    InvalidNode,
    InvalidJail,
    InvalidIp,
    InvalidAction,
    InvalidId,
    InvalidTime,
    /// The address may never be banned cluster-wide (reserved ranges, allowlist).
    Forbidden,
    /// The report has no authentication frame, names a credential the publisher does
    /// not hold (unknown or revoked), its MAC is wrong, or its event names another
    /// node than its credential. Transient: a monitor keeps its events and retries
    /// while an administrator fixes the key.
    Unauthenticated,
    /// The authentication frame's nonce was seen before, or its timestamp is further
    /// from the publisher's clock than `max_clock_skew`. Transient: a monitor signs
    /// the report anew and retries.
    Replayed,
    /// The node sends faster than its rate limit allows. Transient.
    RateLimited,
    /// The publisher's circuit breaker has quarantined the node: it suddenly reported
    /// far more than usual. Not transient: the monitor drops the event (logged).
    Quarantined,
    /// The publisher cannot take the event now (for instance shutting down); retry.
    Busy,
}

impl NakReason {
    /// Every reason, for tests and documentation.
    pub const ALL: [NakReason; 16] = [
        NakReason::Malformed,
        NakReason::TooLarge,
        NakReason::UnsupportedVersion,
        NakReason::UnknownType,
        NakReason::InvalidNode,
        NakReason::InvalidJail,
        NakReason::InvalidIp,
        NakReason::InvalidAction,
        NakReason::InvalidId,
        NakReason::InvalidTime,
        NakReason::Forbidden,
        NakReason::Unauthenticated,
        NakReason::Replayed,
        NakReason::RateLimited,
        NakReason::Quarantined,
        NakReason::Busy,
    ];

    /// The code sent on the wire.
    pub fn code(self) -> &'static str {
        match self {
            NakReason::Malformed => "malformed",
            NakReason::TooLarge => "too_large",
            NakReason::UnsupportedVersion => "unsupported_version",
            NakReason::UnknownType => "unknown_type",
            NakReason::InvalidNode => "invalid_node",
            NakReason::InvalidJail => "invalid_jail",
            NakReason::InvalidIp => "invalid_ip",
            NakReason::InvalidAction => "invalid_action",
            NakReason::InvalidId => "invalid_id",
            NakReason::InvalidTime => "invalid_time",
            NakReason::Forbidden => "forbidden",
            NakReason::Unauthenticated => "unauthenticated",
            NakReason::Replayed => "replayed",
            NakReason::RateLimited => "rate_limited",
            NakReason::Quarantined => "quarantined",
            NakReason::Busy => "busy",
        }
    }

    /// Parses a wire code.
    pub fn from_code(code: &str) -> Option<NakReason> {
        NakReason::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether the same request may succeed if sent again later. A monitor retries
    /// these and drops (with an error in its log) the others, which no retry fixes.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            NakReason::Busy
                | NakReason::RateLimited
                | NakReason::Unauthenticated
                | NakReason::Replayed
        )
    }
}

impl fmt::Display for NakReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}
