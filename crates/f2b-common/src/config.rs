//! The configuration file, `fail2ban-cluster.conf` (TOML), read in stages:
//!
//! 1. [`parse`]: text to raw structs ([`RawConfig`]); every table denies unknown keys,
//!    so a misspelt key is an error that names it.
//! 2. [`RawConfig::validate`]: raw values to typed ones (endpoints, CIDR networks,
//!    durations, node and jail names, keys; the secret and key files named in
//!    `[trust]` are read here), each error naming its key (and the file).
//! 3. [`load`]: reads the file and runs both, naming the file in every error.
//!
//! Every section is optional; a missing key takes the default named in [`defaults`].
//! The shipped `fail2ban-cluster.conf` documents every key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use f2b_proto::auth::{MonitorSecret, PublicKey, SigningKey};
use f2b_proto::{JailName, NodeName};
use ipnet::IpNet;
use serde::Deserialize;

/// Defaults for every key that has one.
pub mod defaults {
    /// Where the daemons look for their configuration.
    pub const CONFIG_PATH: &str = "/etc/fail2ban-cluster.conf";
    /// fail2ban's log on Debian and most distributions.
    pub const MONITOR_LOG_PATH: &str = "/var/log/fail2ban.log";
    /// The publisher's REP socket, as a monitor connects to it.
    pub const MONITOR_PUBLISHER: &str = "tcp://127.0.0.1:5678";
    pub const MONITOR_ACK_TIMEOUT: &str = "2s";
    pub const MONITOR_QUEUE_SIZE: usize = 100_000;
    pub const MONITOR_PIDFILE: &str = "/run/fail2ban-cluster/f2b-monitor.pid";
    /// The port fail2ban-zmq-tools used for its REP socket.
    pub const REPLY_BIND: &str = "tcp://*:5678";
    /// The port fail2ban-zmq-tools used for its PUB socket.
    pub const BROADCAST_BIND: &str = "tcp://*:5680";
    pub const HEARTBEAT_INTERVAL: &str = "1s";
    /// fail2ban's own default bantime.
    pub const BAN_TIME: &str = "10m";
    pub const PUBLISHER_PIDFILE: &str = "/run/fail2ban-cluster/f2b-publisher.pid";
    /// The publisher's PUB socket, as a subscriber connects to it.
    pub const SUBSCRIBER_PUBLISHER: &str = "tcp://127.0.0.1:5680";
    pub const SUBSCRIBER_ACTION: &str = "fail2ban-client";
    /// Loopback and link-local, IPv4 and IPv6.
    pub const IGNORE_IP: [&str; 4] = ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"];
    pub const FAIL2BAN_CLIENT: &str = "fail2ban-client";
    pub const FAIL2BAN_SOCKET: &str = "/var/run/fail2ban/fail2ban.sock";
    pub const SUBSCRIBER_LOG_PATH: &str = "/var/log/fail2ban-cluster.log";
    pub const HEARTBEAT_TIMEOUT: &str = "5s";
    pub const SUBSCRIBER_QUEUE_SIZE: usize = 100_000;
    pub const SUBSCRIBER_PIDFILE: &str = "/run/fail2ban-cluster/f2b-subscriber.pid";
    /// Where the monitor keeps its queue of unacknowledged events and its position
    /// in the log.
    pub const MONITOR_STATE_DIR: &str = "/var/lib/fail2ban-cluster/monitor";
    /// Where the publisher keeps its ledger.
    pub const PUBLISHER_STATE_DIR: &str = "/var/lib/fail2ban-cluster/publisher";
    /// Where the subscriber keeps what it applied and its pending events.
    pub const SUBSCRIBER_STATE_DIR: &str = "/var/lib/fail2ban-cluster/subscriber";
    /// `[trust] max_clock_skew`.
    pub const MAX_CLOCK_SKEW: &str = "60s";
    /// `[publisher] rate_limit`: reports per second per monitor node.
    pub const RATE_LIMIT: u32 = 50;
    /// `[publisher] rate_burst`.
    pub const RATE_BURST: u32 = 1000;
    /// `[publisher] quarantine_floor`: reports in one minute.
    pub const QUARANTINE_FLOOR: u32 = 3000;
    /// `[publisher] quarantine_factor`.
    pub const QUARANTINE_FACTOR: u32 = 10;
    /// `[publisher] quarantine_time`.
    pub const QUARANTINE_TIME: &str = "10m";
}

/// A configuration error: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {message}")]
    Value {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// A value error before the file name is known: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

fn key_err(key: impl Into<String>, message: impl fmt::Display) -> KeyError {
    KeyError {
        key: key.into(),
        message: message.to_string(),
    }
}

// ---------------------------------------------------------------------------
// Stage 1: raw structs, as written.

/// A duration as written: `"10m"`, `"1h 30m"`, `"500ms"`, or an integer of seconds
/// (as fail2ban's bantime).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RawDuration {
    Seconds(u64),
    Text(String),
}

/// One value or a list of them (`publisher = "tcp://a:5680"` or `["tcp://a:5680", ...]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A secret from the configuration (a token). Its `Debug` and `Display` print a mask,
/// so it never reaches a log line or `--check` output by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub node: RawNode,
    #[serde(default)]
    pub monitor: RawMonitor,
    #[serde(default)]
    pub publisher: RawPublisher,
    #[serde(default)]
    pub subscriber: RawSubscriber,
    #[serde(default)]
    pub trust: RawTrust,
}

/// `[trust]`: credentials and keys.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrust {
    pub allow_unauthenticated: Option<bool>,
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    pub publisher_key: Option<OneOrMany>,
    pub signing_key_file: Option<PathBuf>,
    pub max_clock_skew: Option<RawDuration>,
    pub monitors: Option<BTreeMap<String, RawCredential>>,
}

/// One monitor's credential in `[trust.monitors]`: the secret inline, or a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawCredential {
    Inline(Secret),
    File(RawCredentialFile),
}

/// `node = { secret_file = "..." }` in `[trust.monitors]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredentialFile {
    pub secret_file: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMonitor {
    pub log_path: Option<PathBuf>,
    pub publisher: Option<String>,
    pub ignore_jails: Option<Vec<String>>,
    pub ack_timeout: Option<RawDuration>,
    pub queue_size: Option<usize>,
    pub pidfile: Option<PathBuf>,
    pub legacy: Option<bool>,
    pub legacy_token: Option<Secret>,
    pub state_dir: Option<PathBuf>,
    pub metrics_bind: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublisher {
    pub reply_bind: Option<String>,
    pub broadcast_bind: Option<String>,
    pub heartbeat_interval: Option<RawDuration>,
    pub ban_time: Option<RawDuration>,
    pub pidfile: Option<PathBuf>,
    pub legacy: Option<bool>,
    pub legacy_token: Option<Secret>,
    pub legacy_broadcast_bind: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub ignore_ip: Option<Vec<String>>,
    pub rate_limit: Option<u32>,
    pub rate_burst: Option<u32>,
    pub quarantine_floor: Option<u32>,
    pub quarantine_factor: Option<u32>,
    pub quarantine_time: Option<RawDuration>,
    pub metrics_bind: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscriber {
    pub publisher: Option<OneOrMany>,
    pub jails: Option<Vec<String>>,
    pub action: Option<String>,
    pub ban_jail: Option<String>,
    pub ignore_ip: Option<Vec<String>>,
    pub fail2ban_client: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub log_path: Option<PathBuf>,
    pub exec: Option<Vec<String>>,
    pub heartbeat_timeout: Option<RawDuration>,
    pub queue_size: Option<usize>,
    pub pidfile: Option<PathBuf>,
    pub legacy: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub snapshot: Option<OneOrMany>,
    pub metrics_bind: Option<String>,
}

/// Stage 1: parses the text of a configuration file. Errors carry TOML's own
/// message, which quotes the line and names an unknown key.
pub fn parse(text: &str) -> Result<RawConfig, String> {
    toml::from_str(text).map_err(|e| {
        // TOML's own message quotes the offending line, which may hold a secret (a
        // token, a key); the error goes to standard error and the logs. So the line
        // is named by its number, and the message is kept unless that line may hold
        // a secret and the message may quote its value.
        let Some(start) = e.span().map(|s| s.start) else {
            return e.message().trim_end().to_owned();
        };
        let before = text.get(..start).unwrap_or("");
        let line_no = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let line = text.lines().nth(line_no - 1).unwrap_or("");
        let message = e.message().trim_end();
        let message = if may_hold_secret(line) && !message.starts_with("unknown field") {
            "invalid value (not shown: this line may hold a secret)"
        } else {
            message
        };
        let section = text
            .lines()
            .take(line_no)
            .filter_map(|l| {
                let l = l.trim();
                l.strip_prefix('[')?.split(']').next().map(str::trim)
            })
            .last();
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.is_empty() && !k.starts_with('['));
        let at = match (section, key) {
            (Some(s), Some(k)) => format!(", key `{s}.{k}`"),
            (None, Some(k)) => format!(", key `{k}`"),
            _ => String::new(),
        };
        format!("TOML parse error at line {line_no}, column {column}{at}: {message}")
    })
}

/// Whether a configuration line may carry a secret, by its key.
fn may_hold_secret(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    ["token", "secret", "key", "password"]
        .iter()
        .any(|w| l.contains(w))
}

// ---------------------------------------------------------------------------
// Stage 2: validated, typed configuration.

/// A ZeroMQ endpoint: `tcp://HOST:PORT`, `ipc://PATH` or `inproc://NAME`. In a bind
/// endpoint HOST may be `*` (all interfaces) and PORT may be `*` (an ephemeral port;
/// the daemon logs the port it got).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint(String);

impl Endpoint {
    fn parse(key: &str, value: &str, bind: bool) -> Result<Endpoint, KeyError> {
        let bad = |why: &str| key_err(key, format!("{value:?} is not a ZeroMQ endpoint: {why}"));
        if let Some(rest) = value.strip_prefix("tcp://") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp://HOST:PORT"))?;
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad("white space in host"));
            }
            if !bind && host == "*" {
                return Err(bad("`*` is for binding; name the host to connect to"));
            }
            let port_ok = match port {
                "*" | "0" => bind,
                p => p.parse::<u16>().map(|p| p != 0).unwrap_or(false),
            };
            if !port_ok {
                return Err(bad(if bind {
                    "port must be 1-65535 or `*`"
                } else {
                    "port must be 1-65535"
                }));
            }
            let port = if port == "0" { "*" } else { port };
            return Ok(Endpoint(format!("tcp://{host}:{port}")));
        }
        for scheme in ["ipc://", "inproc://"] {
            if let Some(rest) = value.strip_prefix(scheme) {
                if rest.is_empty() {
                    return Err(bad("empty path"));
                }
                return Ok(Endpoint(value.to_owned()));
            }
        }
        Err(bad("expected tcp://, ipc:// or inproc://"))
    }

    /// An endpoint to connect to (no wildcards).
    pub fn connect(value: &str) -> Result<Endpoint, KeyError> {
        Endpoint::parse("endpoint", value, false)
    }

    /// An endpoint to bind (wildcards allowed).
    pub fn bind(value: &str) -> Result<Endpoint, KeyError> {
        Endpoint::parse("endpoint", value, true)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[node]`: who this machine is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Default: the host name.
    pub name: NodeName,
}

/// `[monitor]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub log_path: PathBuf,
    /// The publisher's REP endpoint.
    pub publisher: Endpoint,
    /// Jails whose events are never reported (for instance the jail remote bans are
    /// applied in).
    pub ignore_jails: Vec<JailName>,
    /// How long to wait for an ACK before the socket is recreated and the event sent
    /// again.
    pub ack_timeout: Duration,
    /// Events read but not yet acknowledged, at most.
    pub queue_size: usize,
    pub pidfile: PathBuf,
    /// Report to a fail2ban-zmq-tools publisher in its format (`host|jail|Ban|ip`),
    /// with this token when it demands one.
    pub legacy: Option<LegacyPeer>,
    /// The durable queue and the saved log position live here.
    pub state_dir: PathBuf,
}

/// Talking to fail2ban-zmq-tools peers (docs/PROTOCOL.md, "Legacy").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyPeer {
    /// The shared token (`authtoken`), when authentication is on.
    pub token: Option<Secret>,
}

/// `[publisher]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    pub reply_bind: Endpoint,
    pub broadcast_bind: Endpoint,
    /// A heartbeat is broadcast when nothing else was for this long.
    pub heartbeat_interval: Duration,
    /// How long the cluster considers an address banned after a ban with no unban.
    pub ban_time: Duration,
    pub pidfile: PathBuf,
    /// Accept fail2ban-zmq-tools monitors' requests on the reply socket.
    pub legacy: Option<LegacyPeer>,
    /// Also publish every event in the legacy format, for fail2ban-zmq-tools
    /// subscribers, on this separate PUB socket.
    pub legacy_broadcast_bind: Option<Endpoint>,
    /// The ledger lives here.
    pub state_dir: PathBuf,
    /// Addresses no one may ban cluster-wide (NAK `forbidden`), on top of the
    /// reserved ranges.
    pub ignore_ip: Vec<IpNet>,
    /// Reports per second per monitor node (token bucket refill); 0: no limit.
    pub rate_limit: u32,
    /// The token bucket's size.
    pub rate_burst: u32,
    /// Reports in one minute below which a node is never quarantined.
    pub quarantine_floor: u32,
    /// A node whose last minute's reports exceed this many times its usual
    /// per-minute rate (and the floor) is quarantined.
    pub quarantine_factor: u32,
    /// How long a quarantine lasts.
    pub quarantine_time: Duration,
}

/// `[trust]`: who may report, whose broadcasts are obeyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustConfig {
    /// The explicit opt-out: run without credentials or keys where none are set.
    pub allow_unauthenticated: bool,
    /// This node's credential (f2b-monitor, `f2b-monitor send`).
    pub secret: Option<MonitorSecret>,
    /// Where `secret` came from, for messages: `trust.secret` or the file.
    pub secret_source: Option<String>,
    /// The publishers' public keys (f2b-subscriber): a message signed by any of
    /// them is accepted.
    pub publisher_keys: Vec<PublicKey>,
    /// The publisher's signing key (f2b-publisher).
    pub signing_key: Option<SigningKey>,
    /// The replay window: how far a report's timestamp may be from the publisher's
    /// clock, and how long its nonce is remembered.
    pub max_clock_skew: Duration,
    /// The monitors' credentials, by node name (f2b-publisher).
    pub monitors: BTreeMap<NodeName, MonitorSecret>,
}

/// A daemon cannot run with this trust configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {message}")]
pub struct TrustError {
    pub key: &'static str,
    pub message: String,
}

impl TrustConfig {
    /// f2b-monitor (and `f2b-monitor send`): a secret, unless opted out.
    pub fn require_monitor(&self) -> Result<(), TrustError> {
        if self.secret.is_none() && !self.allow_unauthenticated {
            return Err(TrustError {
                key: "trust.secret",
                message: "not set: the monitor needs this node's credential (`trust.secret` or `trust.secret_file`; \
                          make one with `f2b-publisher keygen --monitor NODE` on the hub), \
                          or the explicit opt-out `trust.allow_unauthenticated = true`"
                    .into(),
            });
        }
        Ok(())
    }

    /// f2b-publisher: a signing key and at least one monitor credential, unless
    /// opted out.
    pub fn require_publisher(&self) -> Result<(), TrustError> {
        if self.allow_unauthenticated {
            return Ok(());
        }
        if self.signing_key.is_none() {
            return Err(TrustError {
                key: "trust.signing_key_file",
                message: "not set: the publisher signs every broadcast with its key \
                          (make one with `f2b-publisher keygen`), \
                          or set the explicit opt-out `trust.allow_unauthenticated = true`"
                    .into(),
            });
        }
        if self.monitors.is_empty() {
            return Err(TrustError {
                key: "trust.monitors",
                message: "no monitor credential: add `[trust.monitors]` with one line per node \
                          (`f2b-publisher keygen --monitor NODE` prints it), \
                          or set the explicit opt-out `trust.allow_unauthenticated = true`"
                    .into(),
            });
        }
        Ok(())
    }

    /// f2b-subscriber (native mode): a publisher key, unless opted out.
    pub fn require_subscriber(&self) -> Result<(), TrustError> {
        if self.publisher_keys.is_empty() && !self.allow_unauthenticated {
            return Err(TrustError {
                key: "trust.publisher_key",
                message:
                    "not set: the subscriber obeys only broadcasts signed by the publisher's key \
                          (`f2b-publisher keygen` prints the line to paste here), \
                          or set the explicit opt-out `trust.allow_unauthenticated = true`"
                        .into(),
            });
        }
        Ok(())
    }
}

/// How a subscriber applies an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriberAction {
    /// `fail2ban-client [-s socket] set <jail> banip|unbanip <ip>...`.
    Fail2banClient {
        program: PathBuf,
        socket: Option<PathBuf>,
    },
    /// `["set", <jail>, "banip"|"unbanip", <ip>...]` sent straight to fail2ban-server's
    /// Unix socket (no fail2ban-client process per call).
    Fail2banSocket { socket: PathBuf },
    /// One line per event appended to a file that a fail2ban jail reads.
    Log { path: PathBuf },
    /// A command (argv, no shell) with `<ip>`, `<jail>`, `<action>`, `<node>` replaced.
    Exec { argv: Vec<String> },
    /// Log what would be done; do nothing.
    None,
}

impl SubscriberAction {
    /// The name used in the `action` key.
    pub fn name(&self) -> &'static str {
        match self {
            SubscriberAction::Fail2banClient { .. } => "fail2ban-client",
            SubscriberAction::Fail2banSocket { .. } => "fail2ban-socket",
            SubscriberAction::Log { .. } => "log",
            SubscriberAction::Exec { .. } => "exec",
            SubscriberAction::None => "none",
        }
    }
}

/// The tags an `exec` argv may contain.
pub const EXEC_TAGS: [&str; 4] = ["<ip>", "<jail>", "<action>", "<node>"];

/// `[subscriber]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// The publishers' PUB endpoints (usually one).
    pub publisher: Vec<Endpoint>,
    /// Jails to receive events of; empty: all.
    pub jails: Vec<JailName>,
    pub action: SubscriberAction,
    /// The local jail bans are applied in; `None`: the event's own jail.
    pub ban_jail: Option<JailName>,
    /// Addresses never banned.
    pub ignore_ip: Vec<IpNet>,
    /// No message (event or heartbeat) for this long means the link is dead.
    pub heartbeat_timeout: Duration,
    /// Events received but not yet applied, at most.
    pub queue_size: usize,
    pub pidfile: PathBuf,
    /// Follow a fail2ban-zmq-tools publisher: one-frame `host|jail|Ban|ip` messages,
    /// no sequence numbers, no heartbeats.
    pub legacy: bool,
    /// What was applied, and what waits to be, live here.
    pub state_dir: PathBuf,
    /// The publishers' reply endpoints, to ask for a snapshot of the active bans on
    /// start, reconnect and after missed events; empty: no catch-up.
    pub snapshot: Vec<Endpoint>,
}

/// Where each daemon serves its metrics and health answers (`metrics_bind` in
/// `[monitor]`, `[publisher]` and `[subscriber]`); `None`: not served (the default).
/// Kept apart from the daemons' own sections so that code building those by hand
/// is unaffected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    pub monitor: Option<SocketAddr>,
    pub publisher: Option<SocketAddr>,
    pub subscriber: Option<SocketAddr>,
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub monitor: MonitorConfig,
    pub publisher: PublisherConfig,
    pub subscriber: SubscriberConfig,
    pub trust: TrustConfig,
    pub metrics: MetricsConfig,
}

fn duration(key: &str, raw: Option<&RawDuration>, default: &str) -> Result<Duration, KeyError> {
    let d = match raw {
        Some(RawDuration::Seconds(s)) => Duration::from_secs(*s),
        Some(RawDuration::Text(t)) => humantime::parse_duration(t).map_err(|e| {
            key_err(
                key,
                format!("{t:?} is not a duration ({e}); try \"30s\" or \"10m\""),
            )
        })?,
        None => humantime::parse_duration(default).expect("defaults are valid durations"),
    };
    if d.is_zero() {
        return Err(key_err(key, "must be greater than zero"));
    }
    Ok(d)
}

fn jails(key: &str, raw: Option<&Vec<String>>) -> Result<Vec<JailName>, KeyError> {
    raw.map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, j)| JailName::new(j).map_err(|e| key_err(format!("{key}[{i}]"), e)))
        .collect()
}

fn positive(key: &str, raw: Option<usize>, default: usize) -> Result<usize, KeyError> {
    match raw.unwrap_or(default) {
        0 => Err(key_err(key, "must be at least 1")),
        n => Ok(n),
    }
}

fn nonempty_path(key: &str, raw: Option<&PathBuf>, default: &str) -> Result<PathBuf, KeyError> {
    let p = raw.cloned().unwrap_or_else(|| PathBuf::from(default));
    if p.as_os_str().is_empty() {
        return Err(key_err(key, "must not be empty"));
    }
    Ok(p)
}

fn connect_endpoints(key: &str, raw: Option<&OneOrMany>) -> Result<Vec<Endpoint>, KeyError> {
    match raw {
        None => Ok(Vec::new()),
        Some(OneOrMany::One(e)) => Ok(vec![Endpoint::parse(key, e, false)?]),
        Some(OneOrMany::Many(v)) => v
            .iter()
            .enumerate()
            .map(|(i, e)| Endpoint::parse(&format!("{key}[{i}]"), e, false))
            .collect(),
    }
}

fn legacy_peer(
    section: &str,
    on: Option<bool>,
    token: Option<&Secret>,
) -> Result<Option<LegacyPeer>, KeyError> {
    match (on.unwrap_or(false), token) {
        (true, t) => {
            if t.is_some_and(|t| t.expose().is_empty() || t.expose().contains('|')) {
                return Err(key_err(
                    format!("{section}.legacy_token"),
                    "must be non-empty and contain no '|'",
                ));
            }
            Ok(Some(LegacyPeer { token: t.cloned() }))
        }
        (false, Some(_)) => Err(key_err(
            format!("{section}.legacy_token"),
            "only used with legacy = true",
        )),
        (false, None) => Ok(None),
    }
}

fn positive_u32(key: &str, raw: Option<u32>, default: u32) -> Result<u32, KeyError> {
    match raw.unwrap_or(default) {
        0 => Err(key_err(key, "must be at least 1")),
        n => Ok(n),
    }
}

fn nets(key: &str, raw: Option<&Vec<String>>) -> Result<Vec<IpNet>, KeyError> {
    raw.map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(n).map_err(|e| key_err(format!("{key}[{i}]"), e)))
        .collect()
}

/// Reads a secret or key file named by `key`. The error names the key and the file,
/// never the content.
fn read_secret_file(key: &str, path: &Path) -> Result<String, KeyError> {
    if path.as_os_str().is_empty() {
        return Err(key_err(key, "must not be empty"));
    }
    std::fs::read_to_string(path)
        .map_err(|e| key_err(key, format!("cannot read {}: {e}", path.display())))
}

fn trust(t: &RawTrust) -> Result<TrustConfig, KeyError> {
    let (secret, secret_source) = match (&t.secret, &t.secret_file) {
        (Some(_), Some(_)) => {
            return Err(key_err(
                "trust.secret_file",
                "set either trust.secret or trust.secret_file, not both",
            ))
        }
        (Some(s), None) => (
            Some(MonitorSecret::new(s.expose()).map_err(|e| key_err("trust.secret", e))?),
            Some("trust.secret".to_owned()),
        ),
        (None, Some(path)) => {
            let text = read_secret_file("trust.secret_file", path)?;
            let secret = MonitorSecret::new(&text)
                .map_err(|e| key_err("trust.secret_file", format!("{}: {e}", path.display())))?;
            (Some(secret), Some(path.display().to_string()))
        }
        (None, None) => (None, None),
    };
    let publisher_keys = match &t.publisher_key {
        None => Vec::new(),
        Some(OneOrMany::One(k)) => vec![k
            .parse::<PublicKey>()
            .map_err(|e| key_err("trust.publisher_key", e))?],
        Some(OneOrMany::Many(v)) => v
            .iter()
            .enumerate()
            .map(|(i, k)| {
                k.parse::<PublicKey>()
                    .map_err(|e| key_err(format!("trust.publisher_key[{i}]"), e))
            })
            .collect::<Result<_, _>>()?,
    };
    let signing_key = match &t.signing_key_file {
        None => None,
        Some(path) => {
            let text = read_secret_file("trust.signing_key_file", path)?;
            Some(SigningKey::parse(&text).map_err(|e| {
                key_err("trust.signing_key_file", format!("{}: {e}", path.display()))
            })?)
        }
    };
    let mut monitors = BTreeMap::new();
    for (name, cred) in t.monitors.iter().flatten() {
        let key = format!("trust.monitors.{name}");
        let node =
            NodeName::new(name).map_err(|e| key_err(&key, format!("not a node name: {e}")))?;
        let secret = match cred {
            RawCredential::Inline(s) => {
                MonitorSecret::new(s.expose()).map_err(|e| key_err(&key, e))?
            }
            RawCredential::File(RawCredentialFile { secret_file }) => {
                let text = read_secret_file(&format!("{key}.secret_file"), secret_file)?;
                MonitorSecret::new(&text).map_err(|e| {
                    key_err(
                        format!("{key}.secret_file"),
                        format!("{}: {e}", secret_file.display()),
                    )
                })?
            }
        };
        if monitors.insert(node, secret).is_some() {
            return Err(key_err(
                &key,
                "names the same node as another entry (node names are compared in lower case)",
            ));
        }
    }
    Ok(TrustConfig {
        allow_unauthenticated: t.allow_unauthenticated.unwrap_or(false),
        secret,
        secret_source,
        publisher_keys,
        signing_key,
        max_clock_skew: duration(
            "trust.max_clock_skew",
            t.max_clock_skew.as_ref(),
            defaults::MAX_CLOCK_SKEW,
        )?,
        monitors,
    })
}

/// A `metrics_bind` value: an IP address and a port (0: any free port).
fn socket_addr(key: &str, raw: Option<&String>) -> Result<Option<SocketAddr>, KeyError> {
    raw.map(|v| {
        v.trim().parse::<SocketAddr>().map_err(|_| {
            key_err(
                key,
                format!(
                    "{v:?} is not an address and port: try \"127.0.0.1:9731\" or \"[::1]:9731\""
                ),
            )
        })
    })
    .transpose()
}

/// Parses one CIDR network or a bare address (taken as a single host).
pub fn parse_net(value: &str) -> Result<IpNet, String> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    value
        .parse::<std::net::IpAddr>()
        .map(|ip| IpNet::from(f2b_proto::canonical_ip(ip)))
        .map_err(|_| format!("{value:?} is not an address or CIDR network"))
}

impl RawConfig {
    /// Stage 2: converts every value to its type. `hostname` supplies the default
    /// node name (the caller passes the machine's host name).
    pub fn validate(&self, hostname: impl FnOnce() -> String) -> Result<Config, KeyError> {
        let node = NodeConfig {
            name: match &self.node.name {
                Some(n) => NodeName::new(n).map_err(|e| key_err("node.name", e))?,
                None => {
                    let h = hostname();
                    NodeName::new(&h).map_err(|e| {
                        key_err(
                            "node.name",
                            format!(
                                "not set, and the host name cannot be used: {e}; set [node] name"
                            ),
                        )
                    })?
                }
            },
        };

        let m = &self.monitor;
        let monitor = MonitorConfig {
            log_path: nonempty_path(
                "monitor.log_path",
                m.log_path.as_ref(),
                defaults::MONITOR_LOG_PATH,
            )?,
            publisher: Endpoint::parse(
                "monitor.publisher",
                m.publisher
                    .as_deref()
                    .unwrap_or(defaults::MONITOR_PUBLISHER),
                false,
            )?,
            ignore_jails: jails("monitor.ignore_jails", m.ignore_jails.as_ref())?,
            ack_timeout: duration(
                "monitor.ack_timeout",
                m.ack_timeout.as_ref(),
                defaults::MONITOR_ACK_TIMEOUT,
            )?,
            queue_size: positive(
                "monitor.queue_size",
                m.queue_size,
                defaults::MONITOR_QUEUE_SIZE,
            )?,
            pidfile: nonempty_path(
                "monitor.pidfile",
                m.pidfile.as_ref(),
                defaults::MONITOR_PIDFILE,
            )?,
            legacy: legacy_peer("monitor", m.legacy, m.legacy_token.as_ref())?,
            state_dir: nonempty_path(
                "monitor.state_dir",
                m.state_dir.as_ref(),
                defaults::MONITOR_STATE_DIR,
            )?,
        };

        let p = &self.publisher;
        let publisher = PublisherConfig {
            reply_bind: Endpoint::parse(
                "publisher.reply_bind",
                p.reply_bind.as_deref().unwrap_or(defaults::REPLY_BIND),
                true,
            )?,
            broadcast_bind: Endpoint::parse(
                "publisher.broadcast_bind",
                p.broadcast_bind
                    .as_deref()
                    .unwrap_or(defaults::BROADCAST_BIND),
                true,
            )?,
            heartbeat_interval: duration(
                "publisher.heartbeat_interval",
                p.heartbeat_interval.as_ref(),
                defaults::HEARTBEAT_INTERVAL,
            )?,
            ban_time: duration(
                "publisher.ban_time",
                p.ban_time.as_ref(),
                defaults::BAN_TIME,
            )?,
            pidfile: nonempty_path(
                "publisher.pidfile",
                p.pidfile.as_ref(),
                defaults::PUBLISHER_PIDFILE,
            )?,
            legacy: legacy_peer("publisher", p.legacy, p.legacy_token.as_ref())?,
            legacy_broadcast_bind: p
                .legacy_broadcast_bind
                .as_deref()
                .map(|e| Endpoint::parse("publisher.legacy_broadcast_bind", e, true))
                .transpose()?,
            state_dir: nonempty_path(
                "publisher.state_dir",
                p.state_dir.as_ref(),
                defaults::PUBLISHER_STATE_DIR,
            )?,
            ignore_ip: nets("publisher.ignore_ip", p.ignore_ip.as_ref())?,
            rate_limit: p.rate_limit.unwrap_or(defaults::RATE_LIMIT),
            rate_burst: positive_u32("publisher.rate_burst", p.rate_burst, defaults::RATE_BURST)?,
            quarantine_floor: positive_u32(
                "publisher.quarantine_floor",
                p.quarantine_floor,
                defaults::QUARANTINE_FLOOR,
            )?,
            quarantine_factor: positive_u32(
                "publisher.quarantine_factor",
                p.quarantine_factor,
                defaults::QUARANTINE_FACTOR,
            )?,
            quarantine_time: duration(
                "publisher.quarantine_time",
                p.quarantine_time.as_ref(),
                defaults::QUARANTINE_TIME,
            )?,
        };
        if publisher.legacy_broadcast_bind.is_some() && publisher.legacy.is_none() {
            return Err(key_err(
                "publisher.legacy_broadcast_bind",
                "only used with legacy = true",
            ));
        }
        if let Some(l) = &publisher.legacy_broadcast_bind {
            if !l.as_str().ends_with(":*")
                && (l == &publisher.broadcast_bind || l == &publisher.reply_bind)
            {
                return Err(key_err(
                    "publisher.legacy_broadcast_bind",
                    "must differ from broadcast_bind and reply_bind (a legacy subscriber cannot read native messages)",
                ));
            }
        }
        if publisher.reply_bind == publisher.broadcast_bind
            && !publisher.reply_bind.as_str().ends_with(":*")
        {
            return Err(key_err(
                "publisher.broadcast_bind",
                "must differ from publisher.reply_bind",
            ));
        }

        let s = &self.subscriber;
        let endpoints = match &s.publisher {
            None => vec![defaults::SUBSCRIBER_PUBLISHER.to_owned()],
            Some(OneOrMany::One(e)) => vec![e.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if endpoints.is_empty() {
            return Err(key_err("subscriber.publisher", "names no endpoint"));
        }
        let many = matches!(s.publisher, Some(OneOrMany::Many(_)));
        let publishers = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let key = if many {
                    format!("subscriber.publisher[{i}]")
                } else {
                    "subscriber.publisher".to_owned()
                };
                Endpoint::parse(&key, e, false)
            })
            .collect::<Result<Vec<_>, _>>()?;

        let action_name = s.action.as_deref().unwrap_or(defaults::SUBSCRIBER_ACTION);
        let action = match action_name {
            "fail2ban-client" => SubscriberAction::Fail2banClient {
                program: nonempty_path(
                    "subscriber.fail2ban_client",
                    s.fail2ban_client.as_ref(),
                    defaults::FAIL2BAN_CLIENT,
                )?,
                socket: s.socket.clone(),
            },
            "fail2ban-socket" => SubscriberAction::Fail2banSocket {
                socket: nonempty_path(
                    "subscriber.socket",
                    s.socket.as_ref(),
                    defaults::FAIL2BAN_SOCKET,
                )?,
            },
            "log" => SubscriberAction::Log {
                path: nonempty_path(
                    "subscriber.log_path",
                    s.log_path.as_ref(),
                    defaults::SUBSCRIBER_LOG_PATH,
                )?,
            },
            "exec" => {
                let argv = s.exec.clone().ok_or_else(|| {
                    key_err("subscriber.exec", "action = \"exec\" needs exec = [\"/path/to/program\", \"<action>\", \"<ip>\", ...]")
                })?;
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(key_err(
                        "subscriber.exec",
                        "the first element must name a program",
                    ));
                }
                SubscriberAction::Exec { argv }
            }
            "none" => SubscriberAction::None,
            other => {
                return Err(key_err(
                    "subscriber.action",
                    format!(
                        "{other:?} is not one of \"fail2ban-client\", \"fail2ban-socket\", \"log\", \"exec\", \"none\""
                    ),
                ))
            }
        };
        if s.socket.is_some()
            && !matches!(
                action,
                SubscriberAction::Fail2banClient { .. } | SubscriberAction::Fail2banSocket { .. }
            )
        {
            return Err(key_err(
                "subscriber.socket",
                format!("only used with action = \"fail2ban-client\" or \"fail2ban-socket\" (action is {action_name:?})"),
            ));
        }
        if s.exec.is_some() && !matches!(action, SubscriberAction::Exec { .. }) {
            return Err(key_err(
                "subscriber.exec",
                format!("only used with action = \"exec\" (action is {action_name:?})"),
            ));
        }

        let ignore_ip = match &s.ignore_ip {
            None => defaults::IGNORE_IP
                .iter()
                .map(|n| parse_net(n).expect("defaults are valid networks"))
                .collect(),
            Some(v) => v
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    parse_net(n).map_err(|e| key_err(format!("subscriber.ignore_ip[{i}]"), e))
                })
                .collect::<Result<Vec<_>, _>>()?,
        };

        let subscriber = SubscriberConfig {
            publisher: publishers,
            jails: jails("subscriber.jails", s.jails.as_ref())?,
            action,
            ban_jail: s
                .ban_jail
                .as_deref()
                .map(|j| JailName::new(j).map_err(|e| key_err("subscriber.ban_jail", e)))
                .transpose()?,
            ignore_ip,
            heartbeat_timeout: duration(
                "subscriber.heartbeat_timeout",
                s.heartbeat_timeout.as_ref(),
                defaults::HEARTBEAT_TIMEOUT,
            )?,
            queue_size: positive(
                "subscriber.queue_size",
                s.queue_size,
                defaults::SUBSCRIBER_QUEUE_SIZE,
            )?,
            pidfile: nonempty_path(
                "subscriber.pidfile",
                s.pidfile.as_ref(),
                defaults::SUBSCRIBER_PIDFILE,
            )?,
            legacy: s.legacy.unwrap_or(false),
            state_dir: nonempty_path(
                "subscriber.state_dir",
                s.state_dir.as_ref(),
                defaults::SUBSCRIBER_STATE_DIR,
            )?,
            snapshot: connect_endpoints("subscriber.snapshot", s.snapshot.as_ref())?,
        };
        if subscriber.legacy && !subscriber.snapshot.is_empty() {
            return Err(key_err(
                "subscriber.snapshot",
                "a fail2ban-zmq-tools publisher (legacy = true) has no snapshots",
            ));
        }

        let trust = trust(&self.trust)?;

        let metrics = MetricsConfig {
            monitor: socket_addr("monitor.metrics_bind", self.monitor.metrics_bind.as_ref())?,
            publisher: socket_addr(
                "publisher.metrics_bind",
                self.publisher.metrics_bind.as_ref(),
            )?,
            subscriber: socket_addr(
                "subscriber.metrics_bind",
                self.subscriber.metrics_bind.as_ref(),
            )?,
        };

        Ok(Config {
            node,
            monitor,
            publisher,
            subscriber,
            trust,
            metrics,
        })
    }
}

/// The machine's host name, as the default node name.
pub fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

/// Stages 1 and 2 on the text of a file; errors name `path`.
pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw = parse(text).map_err(|message| ConfigError::Syntax {
        path: path.to_owned(),
        message,
    })?;
    raw.validate(hostname).map_err(|e| ConfigError::Value {
        path: path.to_owned(),
        key: e.key,
        message: e.message,
    })
}

/// Stage 3: reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_str(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<Config, String> {
        from_str(text, Path::new("test.conf")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_takes_defaults() {
        let c = from_str("[node]\nname = \"Web1\"\n", Path::new("x")).unwrap();
        assert_eq!(c.node.name.as_str(), "web1");
        assert_eq!(c.publisher.reply_bind.as_str(), "tcp://*:5678");
        assert_eq!(c.publisher.broadcast_bind.as_str(), "tcp://*:5680");
        assert_eq!(c.publisher.ban_time, Duration::from_secs(600));
        assert_eq!(c.monitor.log_path, PathBuf::from("/var/log/fail2ban.log"));
        assert_eq!(c.subscriber.ignore_ip.len(), 4);
        assert!(c.subscriber.jails.is_empty());
        assert_eq!(c.subscriber.ban_jail, None);
        assert!(matches!(
            c.subscriber.action,
            SubscriberAction::Fail2banClient { socket: None, .. }
        ));
    }

    #[test]
    fn fail2ban_socket_action_parses() {
        let c = validate("[subscriber]\naction = \"fail2ban-socket\"\n").unwrap();
        assert_eq!(
            c.subscriber.action,
            SubscriberAction::Fail2banSocket {
                socket: PathBuf::from("/var/run/fail2ban/fail2ban.sock")
            }
        );
        assert_eq!(c.subscriber.action.name(), "fail2ban-socket");
        let c = validate("[subscriber]\naction = \"fail2ban-socket\"\nsocket = \"/run/f.sock\"\n")
            .unwrap();
        assert_eq!(
            c.subscriber.action,
            SubscriberAction::Fail2banSocket {
                socket: PathBuf::from("/run/f.sock")
            }
        );
        let err = validate("[subscriber]\naction = \"fail2ban-socket\"\nsocket = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `subscriber.socket`"), "{err}");
    }

    #[test]
    fn values_parse() {
        let c = validate(
            r#"
            [node]
            name = "web1"
            [monitor]
            ignore_jails = ["cluster"]
            ack_timeout = 3
            [publisher]
            reply_bind = "tcp://127.0.0.1:0"
            broadcast_bind = "tcp://127.0.0.1:*"
            ban_time = "1h 30m"
            [subscriber]
            publisher = ["tcp://hub1:5680", "tcp://hub2:5680"]
            jails = ["sshd"]
            action = "exec"
            exec = ["/bin/echo", "<action>", "<ip>"]
            ignore_ip = ["10.0.0.0/8", "192.0.2.1", "2001:db8::/32"]
            "#,
        )
        .unwrap();
        assert_eq!(c.monitor.ack_timeout, Duration::from_secs(3));
        assert_eq!(c.publisher.reply_bind.as_str(), "tcp://127.0.0.1:*");
        assert_eq!(c.publisher.ban_time, Duration::from_secs(5400));
        assert_eq!(c.subscriber.publisher.len(), 2);
        assert_eq!(c.subscriber.ignore_ip[1].to_string(), "192.0.2.1/32");
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let cases = [
            ("[monitor]\nlog_pth = \"x\"\n", "log_pth"),
            ("[nodes]\nname = \"x\"\n", "nodes"),
            ("[node]\nname = \"web_1\"\n", "key `node.name`"),
            (
                "[monitor]\npublisher = \"tcp://*:5678\"\n",
                "key `monitor.publisher`",
            ),
            (
                "[monitor]\npublisher = \"http://hub\"\n",
                "key `monitor.publisher`",
            ),
            (
                "[monitor]\nignore_jails = [\"ok\", \"bad jail\"]\n",
                "key `monitor.ignore_jails[1]`",
            ),
            (
                "[monitor]\nack_timeout = \"soon\"\n",
                "key `monitor.ack_timeout`",
            ),
            ("[monitor]\nqueue_size = 0\n", "key `monitor.queue_size`"),
            (
                "[publisher]\nreply_bind = \"tcp://*:99999\"\n",
                "key `publisher.reply_bind`",
            ),
            ("[publisher]\nban_time = 0\n", "key `publisher.ban_time`"),
            (
                "[subscriber]\nignore_ip = [\"10.0.0.0/33\"]\n",
                "key `subscriber.ignore_ip[0]`",
            ),
            (
                "[subscriber]\naction = \"drop\"\n",
                "key `subscriber.action`",
            ),
            ("[subscriber]\naction = \"exec\"\n", "key `subscriber.exec`"),
            (
                "[subscriber]\nexec = [\"/bin/true\"]\n",
                "key `subscriber.exec`",
            ),
            (
                "[subscriber]\naction = \"log\"\nsocket = \"/x\"\n",
                "key `subscriber.socket`",
            ),
            (
                "[subscriber]\npublisher = [\"tcp://a:1\", \"tcp://b\"]\n",
                "key `subscriber.publisher[1]`",
            ),
            (
                "[subscriber]\nban_jail = \"\"\n",
                "key `subscriber.ban_jail`",
            ),
            ("[subscriber]\njails = \"sshd\"\n", "jails"),
            ("this is not toml", "test.conf"),
            (
                "[monitor]\nlegacy_token = \"x\"\n",
                "key `monitor.legacy_token`",
            ),
            (
                "[publisher]\nlegacy = true\nlegacy_token = \"a|b\"\n",
                "key `publisher.legacy_token`",
            ),
            (
                "[publisher]\nlegacy_broadcast_bind = \"tcp://*:5681\"\n",
                "key `publisher.legacy_broadcast_bind`",
            ),
            (
                "[publisher]\nlegacy = true\nlegacy_broadcast_bind = \"tcp://*:5680\"\n",
                "key `publisher.legacy_broadcast_bind`",
            ),
        ];
        for (text, expected) in cases {
            let full = format!("[node]\nname = \"n1\"\n{text}");
            let text = if text.starts_with("[node]") {
                text.to_owned()
            } else {
                full
            };
            let err = validate(&text).expect_err(&text);
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with("test.conf"), "{err}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let c = validate(
            "[node]\nname = \"n\"\n[publisher]\nlegacy = true\nlegacy_token = \"hunter2\"\n",
        )
        .unwrap();
        let token = c.publisher.legacy.as_ref().unwrap().token.as_ref().unwrap();
        assert_eq!(token.expose(), "hunter2");
        let shown = format!("{c:?} {token}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn syntax_errors_do_not_quote_secrets() {
        for text in [
            "[publisher]\nlegacy = true\nlegacy_token = \"hunter2\n",
            "[publisher]\nlegacy = true\nlegacy_token = 1234hunter2\n",
            "[publisher]\nlegacy_tokn = \"hunter2\"\n",
        ] {
            let err = validate(text).unwrap_err();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(
                err.contains("line 3") || err.contains("legacy_tokn"),
                "{err}"
            );
        }
        let err = validate("[monitor]\nlog_pth = \"/x\"\n").unwrap_err();
        assert!(err.contains("log_pth"), "{err}");
    }

    #[test]
    fn bad_hostname_needs_node_name() {
        let raw = parse("").unwrap();
        let err = raw.validate(|| "my_host".into()).unwrap_err();
        assert_eq!(err.key, "node.name");
        assert!(err.message.contains("set [node] name"), "{err}");
        let ok = raw.validate(|| "my-host".into()).unwrap();
        assert_eq!(ok.node.name.as_str(), "my-host");
    }

    #[test]
    fn metrics_bind_is_a_socket_address() {
        let c = validate("[node]\nname = \"n\"\n").unwrap();
        assert_eq!(c.metrics, MetricsConfig::default());
        let c = validate(
            "[monitor]\nmetrics_bind = \"127.0.0.1:9731\"\n[publisher]\nmetrics_bind = \"[::1]:0\"\n\
             [subscriber]\nmetrics_bind = \"0.0.0.0:9733\"\n",
        )
        .unwrap();
        assert_eq!(c.metrics.monitor, Some("127.0.0.1:9731".parse().unwrap()));
        assert_eq!(c.metrics.publisher, Some("[::1]:0".parse().unwrap()));
        assert_eq!(c.metrics.subscriber, Some("0.0.0.0:9733".parse().unwrap()));
        for section in ["monitor", "publisher", "subscriber"] {
            for bad in ["localhost:9731", "127.0.0.1", "127.0.0.1:99999", ""] {
                let err = validate(&format!("[{section}]\nmetrics_bind = {bad:?}\n")).unwrap_err();
                assert!(
                    err.contains(&format!("key `{section}.metrics_bind`"))
                        && err.contains("test.conf"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn missing_file_is_named() {
        let err = load(Path::new("/nonexistent/f2b.conf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/f2b.conf"), "{err}");
    }
}

#[cfg(test)]
mod trust_tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn validate(text: &str) -> Result<Config, String> {
        from_str(text, Path::new("t.conf")).map_err(|e| e.to_string())
    }

    #[test]
    fn trust_defaults_require_keys_per_daemon() {
        let c = validate("[node]\nname = \"web1\"\n").unwrap();
        assert!(!c.trust.allow_unauthenticated);
        assert_eq!(c.trust.max_clock_skew, Duration::from_secs(60));
        let e = c.trust.require_monitor().unwrap_err().to_string();
        assert!(
            e.contains("trust.secret") && e.contains("allow_unauthenticated"),
            "{e}"
        );
        let e = c.trust.require_publisher().unwrap_err().to_string();
        assert!(e.contains("trust.signing_key_file"), "{e}");
        let e = c.trust.require_subscriber().unwrap_err().to_string();
        assert!(e.contains("trust.publisher_key"), "{e}");
        let c = validate("[trust]\nallow_unauthenticated = true\n").unwrap();
        assert!(c.trust.require_monitor().is_ok());
        assert!(c.trust.require_publisher().is_ok());
        assert!(c.trust.require_subscriber().is_ok());
        assert_eq!(c.publisher.rate_limit, defaults::RATE_LIMIT);
        assert!(c.publisher.ignore_ip.is_empty());
    }

    #[test]
    fn trust_keys_and_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = f2b_proto::auth::SigningKey::from_seed([5; 32]);
        let key_path = dir.path().join("publisher.key");
        std::fs::write(&key_path, key.to_file_text()).unwrap();
        let web2 = dir.path().join("web2.secret");
        std::fs::write(&web2, format!("{SECRET}x\n")).unwrap();
        let text = format!(
            "[trust]\nsecret = {SECRET:?}\npublisher_key = [{:?}]\nsigning_key_file = {:?}\n\
             max_clock_skew = \"5s\"\n[trust.monitors]\nWeb1 = {SECRET:?}\nweb2 = {{ secret_file = {:?} }}\n\
             [publisher]\nignore_ip = [\"10.0.0.0/8\", \"192.0.2.1\"]\nrate_limit = 0\n",
            key.public().to_string(),
            key_path.display().to_string(),
            web2.display().to_string(),
        );
        let c = validate(&text).unwrap();
        assert_eq!(c.trust.publisher_keys, vec![key.public()]);
        assert_eq!(
            c.trust.signing_key.as_ref().map(|k| k.public()),
            Some(key.public())
        );
        assert_eq!(c.trust.max_clock_skew, Duration::from_secs(5));
        let names: Vec<&str> = c.trust.monitors.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["web1", "web2"]);
        assert_eq!(
            c.trust.monitors.values().nth(1).unwrap().expose(),
            format!("{SECRET}x")
        );
        assert_eq!(c.trust.secret.as_ref().unwrap().expose(), SECRET);
        assert!(c.trust.require_publisher().is_ok() && c.trust.require_monitor().is_ok());
        assert_eq!(c.publisher.ignore_ip.len(), 2);
        assert_eq!(c.publisher.rate_limit, 0);
        // --check prints the config with {:?}: no secret in it.
        let shown = format!("{c:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(!shown.contains(key.to_file_text().trim()), "{shown}");
    }

    #[test]
    fn trust_errors_name_key_and_file_but_never_the_secret() {
        let e = validate("[trust]\nsecret = \"short-secret-value\"\n").unwrap_err();
        assert!(e.contains("trust.secret") && e.contains("t.conf"), "{e}");
        assert!(!e.contains("short-secret-value"), "{e}");
        let e = validate("[trust]\nsecret_file = \"/nonexistent/node.secret\"\n").unwrap_err();
        assert!(
            e.contains("trust.secret_file") && e.contains("/nonexistent/node.secret"),
            "{e}"
        );
        let e = validate(&format!(
            "[trust]\nsecret = {SECRET:?}\nsecret_file = \"/x\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = validate("[trust]\npublisher_key = \"ed25519:nope\"\n").unwrap_err();
        assert!(
            e.contains("trust.publisher_key") && e.contains("keygen"),
            "{e}"
        );
        let e = validate("[trust]\npublisher_key = [\"ed25519:nope\"]\n").unwrap_err();
        assert!(e.contains("trust.publisher_key[0]"), "{e}");
        let e = validate("[trust.monitors]\n\"bad name\" = \"0123456789abcdef0123456789abcdef\"\n")
            .unwrap_err();
        assert!(e.contains("trust.monitors.bad name"), "{e}");
        assert!(!e.contains("0123456789abcdef"), "{e}");
        let e = validate("[trust.monitors]\nweb1 = { secret_fil = \"/x\" }\n").unwrap_err();
        assert!(e.contains("t.conf"), "{e}");
        let e = validate(&format!(
            "[trust.monitors]\nweb1 = {SECRET:?}\nWEB1 = {SECRET:?}\n"
        ))
        .unwrap_err();
        assert!(e.contains("same node"), "{e}");
        assert!(!e.contains(SECRET), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not a key\n").unwrap();
        let e = validate(&format!(
            "[trust]\nsigning_key_file = {:?}\n",
            bad.display().to_string()
        ))
        .unwrap_err();
        assert!(
            e.contains("trust.signing_key_file") && e.contains("bad.key"),
            "{e}"
        );
        let e = validate("[publisher]\nignore_ip = [\"10.0.0.0/33\"]\n").unwrap_err();
        assert!(e.contains("publisher.ignore_ip[0]"), "{e}");
        let e = validate("[publisher]\nrate_burst = 0\n").unwrap_err();
        assert!(e.contains("publisher.rate_burst"), "{e}");
    }
}
