//! `f2b-monitor send`: one Ban or Unban typed by an administrator, reported to
//! the publisher exactly like one read from fail2ban's log (this node's name and
//! credential, a new event id, now as its time), and the publisher's answer.
//!
//! The jail and the address are checked here before anything is sent, each
//! error naming its argument. Then the report is sent and its answer awaited for
//! at most the timeout: a `busy` or `rate_limited` NAK is retried within it with
//! the sender's backoff, any other answer is final. As in the daemon, a reply
//! counts only if its MAC is right (see `exchange.rs`), except a NAK
//! `unauthenticated` or `replayed`, which is shown for what it is.
//!
//! [`cli`] prints the outcome for a person or, with `--json`, as one JSON object
//! for scripts, and returns the exit status: [`EXIT_ACK`], [`EXIT_NAK`],
//! [`EXIT_INVALID`] or [`EXIT_NO_ANSWER`].

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use f2b_common::config::Config;
use f2b_common::sockets::new_socket;
use f2b_common::zmq;
use f2b_proto::event::parse_ip;
use f2b_proto::{
    Ack, AckStatus, Action, Event, EventId, JailName, Nak, NakReason, NodeName, ProtoError, Reply,
    Request,
};
use serde_json::json;

use crate::exchange::{self, Credential, Received};
use crate::send::{BACKOFF_MAX, BACKOFF_MIN};

/// How long `send` waits for the answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Exit status: the publisher acknowledged the event.
pub const EXIT_ACK: u8 = 0;
/// Exit status: the publisher refused it (NAK).
pub const EXIT_NAK: u8 = 1;
/// Exit status: an invalid argument or configuration; nothing was sent.
pub const EXIT_INVALID: u8 = 2;
/// Exit status: no answer that can be trusted within the timeout.
pub const EXIT_NO_ANSWER: u8 = 3;

/// What `f2b-monitor send` was asked.
#[derive(Debug, Clone)]
pub struct ManualArgs {
    pub jail: String,
    pub action: Action,
    pub ip: String,
    pub timeout: Duration,
    pub json: bool,
}

/// Why no answer could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManualError {
    #[error("--jail {value:?}: {source}")]
    InvalidJail {
        value: String,
        #[source]
        source: ProtoError,
    },
    #[error("--{flag} {value:?}: not an IP address (write it like 203.0.113.7 or 2001:db8::7, without a prefix length or port)")]
    InvalidIp { flag: &'static str, value: String },
    #[error("cannot build the event")]
    Event(#[source] ProtoError),
    #[error("{0}")]
    Config(String),
    #[error("ZeroMQ socket for {endpoint}")]
    Socket {
        endpoint: String,
        #[source]
        source: zmq::Error,
    },
    #[error("no random nonce for the credential: {0}")]
    Random(String),
    #[error("no answer from the publisher at {endpoint} within {timeout}: is f2b-publisher running at {endpoint}, is the port open, is [monitor] publisher right?")]
    NoAnswer { endpoint: String, timeout: String },
    #[error("the reply of the publisher at {endpoint} failed authentication ({why}): the secrets differ between [trust] on {node} and [trust.monitors] {node} on the publisher (or the publisher has none for {node}), or the reply is forged")]
    NotAuthentic {
        endpoint: String,
        node: NodeName,
        why: String,
    },
    #[error("the publisher at {endpoint} gave no usable answer: {why}")]
    Unreadable { endpoint: String, why: String },
}

impl ManualError {
    /// A short code for `--json`.
    pub fn code(&self) -> &'static str {
        match self {
            ManualError::InvalidJail { .. } | ManualError::InvalidIp { .. } => "invalid_argument",
            ManualError::Event(_) => "invalid_event",
            ManualError::Config(_) => "config",
            ManualError::Socket { .. } | ManualError::Random(_) => "socket",
            ManualError::NoAnswer { .. } => "no_answer",
            ManualError::NotAuthentic { .. } => "not_authentic",
            ManualError::Unreadable { .. } => "unreadable",
        }
    }

    /// The exit status for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            ManualError::InvalidJail { .. }
            | ManualError::InvalidIp { .. }
            | ManualError::Event(_)
            | ManualError::Config(_) => EXIT_INVALID,
            _ => EXIT_NO_ANSWER,
        }
    }
}

/// The publisher's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Acked(Ack),
    /// A NAK; `authentic` is false only for an `unauthenticated` or `replayed`
    /// NAK without a valid MAC.
    Refused {
        nak: Nak,
        authentic: bool,
    },
}

/// The event for `ip` in `jail`, from `node`, now, with a new id. The arguments
/// are checked here; each error names its argument.
pub fn event(node: &NodeName, jail: &str, action: Action, ip: &str) -> Result<Event, ManualError> {
    let jail_name = JailName::new(jail).map_err(|source| ManualError::InvalidJail {
        value: jail.to_owned(),
        source,
    })?;
    let flag = match action {
        Action::Ban => "ban",
        Action::Unban => "unban",
    };
    let addr: IpAddr = parse_ip(ip).map_err(|_| ManualError::InvalidIp {
        flag,
        value: ip.to_owned(),
    })?;
    let id = EventId::from_u128(uuid::Uuid::new_v4().as_u128());
    Event::new(id, node.clone(), jail_name, action, addr, crate::now_ms())
        .map_err(ManualError::Event)
}

/// Reports `event` to the publisher at `endpoint` and waits at most `timeout`
/// for its answer (retrying `busy` and `rate_limited` NAKs within it).
pub fn send(
    ctx: &zmq::Context,
    endpoint: &str,
    credential: Option<&Credential>,
    event: &Event,
    timeout: Duration,
) -> Result<Answer, ManualError> {
    let deadline = Instant::now() + timeout;
    let socket_err = |source| ManualError::Socket {
        endpoint: endpoint.to_owned(),
        source,
    };
    let sock = new_socket(ctx, zmq::REQ).map_err(socket_err)?;
    sock.connect(endpoint).map_err(socket_err)?;
    let payload = Request::Report(event.clone()).encode();
    let unreadable = |why: String| ManualError::Unreadable {
        endpoint: endpoint.to_owned(),
        why,
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let signed = exchange::sign(credential, &payload).map_err(ManualError::Random)?;
        sock.send_multipart(signed.frames, zmq::DONTWAIT)
            .map_err(socket_err)?;
        if !readable_before(&sock, deadline).map_err(socket_err)? {
            return Err(ManualError::NoAnswer {
                endpoint: endpoint.to_owned(),
                timeout: humantime::format_duration(timeout).to_string(),
            });
        }
        let (frames, total) = exchange::recv_frames(&sock).map_err(socket_err)?;
        let nak = match exchange::classify(credential, signed.mac.as_ref(), &frames, total) {
            Received::Trusted(Reply::Ack(ack)) if ack.id == event.id => {
                return Ok(Answer::Acked(ack));
            }
            Received::Trusted(Reply::Ack(ack)) => {
                return Err(unreadable(format!(
                    "an ACK for another event {} (sent {})",
                    ack.id, event.id
                )));
            }
            Received::Trusted(Reply::Nak(nak)) => nak,
            Received::Trusted(Reply::Replies(_)) => {
                return Err(unreadable(
                    "a replies message, the answer to several events, for one report".into(),
                ))
            }
            Received::UnverifiedNak(nak) => {
                return Ok(Answer::Refused {
                    nak,
                    authentic: false,
                })
            }
            Received::NotAuthentic(why) => {
                return Err(ManualError::NotAuthentic {
                    endpoint: endpoint.to_owned(),
                    node: event.node.clone(),
                    why,
                })
            }
            Received::Unreadable(why) => return Err(unreadable(why)),
            Received::OldPublisher => {
                return Err(unreadable(
                    "a bare NAK: it is an old fail2ban-zmq-tools publisher, which `send` cannot talk to".into(),
                ))
            }
        };
        let later = matches!(nak.reason, NakReason::Busy | NakReason::RateLimited);
        if !later || Instant::now() + backoff >= deadline {
            return Ok(Answer::Refused {
                nak,
                authentic: true,
            });
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Waits until `sock` is readable or `deadline` passes.
fn readable_before(sock: &zmq::Socket, deadline: Instant) -> zmq::Result<bool> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        let ms = i64::try_from((deadline - now).as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        if sock.poll(zmq::POLLIN, ms)? > 0 {
            return Ok(true);
        }
    }
}

/// What to check after a NAK, for a person (`credential`: whether the report
/// was signed).
pub fn hint(reason: NakReason, node: &NodeName, credential: bool) -> String {
    match reason {
        NakReason::Unauthenticated if credential => format!(
            "the publisher refused this node's credential: check that [trust] secret/secret_file on {node} matches [trust.monitors] {node} on the publisher"
        ),
        NakReason::Unauthenticated => format!(
            "the publisher requires a credential: set [trust] secret or secret_file on {node}, the same as [trust.monitors] {node} on the publisher"
        ),
        NakReason::Replayed => format!(
            "the publisher found the clock of {node} too far from its own (more than its [trust] max_clock_skew): check time synchronisation (ntp, chrony, systemd-timesyncd) on both"
        ),
        NakReason::Quarantined => format!(
            "the publisher's circuit breaker has quarantined {node} for reporting far more than usual; see the publisher's log"
        ),
        NakReason::Forbidden => "the address is in a range no one may ban cluster-wide (reserved, or the publisher's [publisher] ignore_ip)".to_owned(),
        NakReason::RateLimited | NakReason::Busy => "the publisher is busy: try again later".to_owned(),
        _ => "the publisher refused the event as invalid".to_owned(),
    }
}

/// `f2b-monitor send`: checks `config` and `args`, reports the event, prints the
/// outcome to `out` (and problems to `err`, unless `--json`), and returns the exit
/// status.
pub fn cli(config: &Config, args: &ManualArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let endpoint = config.monitor.publisher.as_str();
    let result = prepare(config, args).and_then(|(event, credential)| {
        if credential.is_none() && !args.json {
            let _ = writeln!(
                err,
                "f2b-monitor send: warning: sending unauthenticated (trust.allow_unauthenticated = true and no trust.secret)"
            );
        }
        let ctx = zmq::Context::new();
        let answer = send(&ctx, endpoint, credential.as_ref(), &event, args.timeout);
        answer.map(|a| (event, credential.is_some(), a))
    });
    match result {
        Ok((event, has_credential, answer)) => {
            let code = match &answer {
                Answer::Acked(_) => EXIT_ACK,
                Answer::Refused { .. } => EXIT_NAK,
            };
            if args.json {
                let v = answer_json(&event, endpoint, has_credential, &answer);
                let _ = writeln!(out, "{v}");
            } else {
                print_answer(&event, endpoint, has_credential, &answer, out, err);
            }
            code
        }
        Err(e) => {
            let message = f2b_common::daemon::error_chain(&e);
            if args.json {
                let mut v = json!({
                    "ok": false,
                    "outcome": "error",
                    "error": e.code(),
                    "message": message,
                    "publisher": endpoint,
                });
                match &e {
                    ManualError::InvalidJail { .. } => v["argument"] = "--jail".into(),
                    ManualError::InvalidIp { flag, .. } => {
                        v["argument"] = format!("--{flag}").into()
                    }
                    _ => {}
                }
                let _ = writeln!(out, "{v}");
            } else {
                let _ = writeln!(err, "f2b-monitor send: {message}");
            }
            e.exit_code()
        }
    }
}

/// The event and the credential, or why `send` cannot run with this
/// configuration.
fn prepare(config: &Config, args: &ManualArgs) -> Result<(Event, Option<Credential>), ManualError> {
    let event = event(&config.node.name, &args.jail, args.action, &args.ip)?;
    if config.monitor.legacy.is_some() {
        return Err(ManualError::Config(
            "[monitor] legacy = true: `f2b-monitor send` speaks only the native protocol, not fail2ban-zmq-tools' format".into(),
        ));
    }
    config
        .trust
        .require_monitor()
        .map_err(|e| ManualError::Config(e.to_string()))?;
    let credential = config.trust.secret.clone().map(|secret| Credential {
        key: config.node.name.clone(),
        secret,
    });
    Ok((event, credential))
}

fn event_fields(event: &Event, endpoint: &str) -> serde_json::Value {
    json!({
        "id": event.id.to_string(),
        "node": event.node.as_str(),
        "jail": event.jail.as_str(),
        "action": event.action.as_str(),
        "ip": event.ip.to_string(),
        "time_ms": event.time_ms,
        "publisher": endpoint,
    })
}

/// The answer as one JSON object: `ok`, `outcome` (`ack` or `nak`), the event's
/// fields, and `status` and `seq`, or `reason`, `detail`, `authentic` and `hint`.
pub fn answer_json(
    event: &Event,
    endpoint: &str,
    credential: bool,
    answer: &Answer,
) -> serde_json::Value {
    let mut v = event_fields(event, endpoint);
    match answer {
        Answer::Acked(ack) => {
            v["ok"] = true.into();
            v["outcome"] = "ack".into();
            v["status"] = ack.status.as_str().into();
            v["seq"] = ack.seq.into();
        }
        Answer::Refused { nak, authentic } => {
            v["ok"] = false.into();
            v["outcome"] = "nak".into();
            v["reason"] = nak.reason.code().into();
            v["detail"] = nak.detail.clone().into();
            v["authentic"] = (*authentic).into();
            v["hint"] = hint(nak.reason, &event.node, credential).into();
        }
    }
    v
}

fn print_answer(
    event: &Event,
    endpoint: &str,
    credential: bool,
    answer: &Answer,
    out: &mut dyn Write,
    err: &mut dyn Write,
) {
    let what = format!(
        "{} {} in jail {} as node {} (event {})",
        event.action, event.ip, event.jail, event.node, event.id
    );
    let _ = match answer {
        Answer::Acked(ack) => match (ack.status, ack.seq) {
            (AckStatus::Broadcast, Some(seq)) => {
                writeln!(
                    out,
                    "reported {what}: broadcast to the cluster as seq {seq}"
                )
            }
            (AckStatus::Duplicate, seq) => writeln!(
                out,
                "reported {what}: duplicate, the publisher had it already (seq {})",
                seq.map_or("none".to_owned(), |s| s.to_string())
            ),
            (AckStatus::Unchanged, _) => writeln!(
                out,
                "reported {what}: unchanged, the cluster already knew it; nothing broadcast"
            ),
            (status, seq) => writeln!(
                out,
                "reported {what}: {} (seq {})",
                status.as_str(),
                seq.map_or("none".to_owned(), |s| s.to_string())
            ),
        },
        Answer::Refused { nak, authentic } => writeln!(
            err,
            "f2b-monitor send: the publisher at {endpoint} refused {what}: {}{} (detail {:?})\n{}",
            nak.reason,
            if *authentic {
                ""
            } else {
                ", in a reply without a valid MAC"
            },
            nak.detail,
            hint(nak.reason, &event.node, credential)
        ),
    };
}
