//! `f2b-subscriber watch`: the live, verified stream, one line per event, as an
//! administrator would tail it. Nothing is applied and the state is not touched.
//!
//! It connects like the daemon (the same receive loop: signatures, epochs
//! confirmed by snapshots, replay floors, reconnections) and prints each event
//! that the daemon would pass on to its intake to standard output, either as a
//! line of `key=value` fields or, with `--json`, as one JSON object per line.
//! Warnings (refused broadcasts, missed sequence numbers, a dead link, a failed
//! snapshot) go to standard error, each saying what to check.

use std::io::Write;
use std::time::{Duration, Instant};

use f2b_common::config::Config;
use f2b_common::{zmq, CancellationToken};
use f2b_proto::{Epoch, Event, JailName};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::instrument::WithSubscriber;

use crate::receiver::{self, Input, ReceiverConfig};
use crate::{check_trust, endpoints_label, Notice, Notices, Refusal, SubscriberError};

/// What `watch` prints.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// One JSON object per line instead of text.
    pub json: bool,
    /// Only these jails (empty: `[subscriber] jails`, or all).
    pub jails: Vec<JailName>,
    /// Print heartbeats too.
    pub heartbeats: bool,
}

/// How often a repeated warning is printed again, at most.
const REPEAT: Duration = Duration::from_secs(60);

/// A warning printed the first time and then at most once per [`REPEAT`], with
/// how many were held back.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(l) if now.duration_since(l) < REPEAT => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

fn time_text(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || ms.to_string(),
            |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        )
}

/// One event as printed (`epoch` `None`: a fail2ban-zmq-tools message).
pub fn event_line(event: &Event, seq: u64, epoch: Option<Epoch>, as_json: bool) -> String {
    if as_json {
        return json!({
            "type": "event",
            "time": time_text(event.time_ms),
            "time_ms": event.time_ms,
            "seq": seq,
            "epoch": epoch.map(|e| e.to_string()),
            "node": event.node.as_str(),
            "jail": event.jail.as_str(),
            "action": event.action.to_string(),
            "ip": event.ip.to_string(),
            "id": event.id.to_string(),
        })
        .to_string();
    }
    format!(
        "{} seq={} epoch={} node={} jail={} action={} ip={} id={}",
        time_text(event.time_ms),
        seq,
        epoch.map_or_else(|| "legacy".to_owned(), |e| e.to_string()),
        event.node,
        event.jail,
        event.action,
        event.ip,
        event.id,
    )
}

fn heartbeat_line(epoch: Epoch, seq: u64, as_json: bool) -> String {
    let now = crate::store::now_ms();
    if as_json {
        return json!({
            "type": "heartbeat",
            "time": time_text(now),
            "time_ms": now,
            "seq": seq,
            "epoch": epoch.to_string(),
        })
        .to_string();
    }
    format!("{} heartbeat seq={seq} epoch={epoch}", time_text(now))
}

struct Printer {
    opts: WatchOptions,
    publisher: String,
    timeout: Duration,
    snapshot: bool,
    dead: Throttle,
    refused: [Throttle; 4],
    missed: Throttle,
    snapshot_failed: Throttle,
}

impl Printer {
    /// Prints a line to standard output; false when it is closed (stop).
    fn out(&self, line: &str) -> bool {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{line}").and_then(|()| o.flush()).is_ok()
    }

    fn err(&self, line: &str) {
        let mut e = std::io::stderr().lock();
        let _ = writeln!(e, "f2b-subscriber watch: {line}");
    }

    fn input(&mut self, input: Input) -> bool {
        match input {
            Input::Event { event, seq, epoch } => {
                self.out(&event_line(&event, seq, epoch, self.opts.json))
            }
            Input::Events(events) => events
                .iter()
                .all(|s| self.out(&event_line(&s.event, s.seq, Some(s.epoch), self.opts.json))),
            Input::Heartbeat { epoch, seq } => {
                !self.opts.heartbeats || self.out(&heartbeat_line(epoch, seq, self.opts.json))
            }
            Input::Resync(r) => {
                self.err(&format!(
                    "snapshot from {}: epoch {} at seq {}, {} active ban(s) (not printed)",
                    r.endpoint,
                    r.epoch,
                    r.seq,
                    r.bans.len()
                ));
                r.queued
                    .iter()
                    .filter(|s| !(s.epoch == r.epoch && s.seq <= r.seq))
                    .all(|s| self.out(&event_line(&s.event, s.seq, Some(s.epoch), self.opts.json)))
            }
        }
    }

    fn notice(&mut self, n: Notice) {
        match n {
            Notice::Connected { epoch } => {
                self.err(&format!("connected to {}: epoch {epoch}", self.publisher))
            }
            Notice::LegacyConnected { publisher } => self.err(&format!(
                "connected to {publisher} (a fail2ban-zmq-tools publisher: not authenticated)"
            )),
            Notice::Disconnected { publisher } => {
                self.err(&format!("disconnected from {publisher}"))
            }
            Notice::LinkDead => {
                if let Some(held) = self.dead.allow() {
                    self.err(&format!(
                        "no message from {} for {}s: is f2b-publisher's broadcast_bind reachable, \
                         is [subscriber] publisher right?{}",
                        self.publisher,
                        self.timeout.as_secs_f64(),
                        repeated(held)
                    ));
                }
            }
            Notice::Missed { epoch, count } => {
                if let Some(held) = self.missed.allow() {
                    self.err(&format!(
                        "missed {count} event(s) of epoch {epoch}{}{}",
                        if self.snapshot {
                            " (a snapshot recovers the bans; missed events are not printed)"
                        } else {
                            " ([subscriber] snapshot is not set: they are not recovered)"
                        },
                        repeated(held)
                    ));
                }
            }
            Notice::Refused { reason, publisher } => {
                let Some(held) = self.refused[reason.index()].allow() else {
                    return;
                };
                let text = match reason {
                    Refusal::Unsigned => format!(
                        "broadcasts from {publisher} are not signed: is f2b-publisher older, or \
                         without [trust] signing_key_file? (refused; check [trust] publisher_key)"
                    ),
                    Refusal::BadSignature => format!(
                        "broadcasts from {publisher} are signed by another key: check [trust] publisher_key"
                    ),
                    Refusal::Replayed => format!(
                        "ignored a broadcast from {publisher} whose sequence number was already used \
                         in its epoch (a replay, or the publisher's rebroadcast after a restart)"
                    ),
                    _ => format!(
                        "ignored a broadcast from {publisher} of an epoch that is no longer the \
                         publisher's (a replay of an old broadcast)"
                    ),
                };
                self.err(&format!("{text}{}", repeated(held)));
            }
            Notice::SnapshotFailed { publisher, error } => {
                if let Some(held) = self.snapshot_failed.allow() {
                    self.err(&format!(
                        "snapshot from {publisher} failed: {error}; retrying (events of an epoch \
                         no snapshot confirmed are not printed until one does){}",
                        repeated(held)
                    ));
                }
            }
            _ => {}
        }
    }
}

fn repeated(held: u64) -> String {
    if held == 0 {
        String::new()
    } else {
        format!(" ({held} more like this since the last report)")
    }
}

/// Prints the verified stream until `shutdown` is cancelled (or standard output
/// is closed).
pub async fn watch(
    config: &Config,
    opts: WatchOptions,
    shutdown: CancellationToken,
) -> Result<(), SubscriberError> {
    check_trust(config).map_err(|source| SubscriberError::Trust { source })?;
    let s = &config.subscriber;
    let keys = config.trust.publisher_keys.clone();
    if s.legacy {
        eprintln!(
            "f2b-subscriber watch: legacy = true: a fail2ban-zmq-tools publisher's broadcasts are not authenticated"
        );
    } else if keys.is_empty() {
        eprintln!(
            "f2b-subscriber watch: no [trust] publisher_key (allow_unauthenticated): what follows is not verified"
        );
    }
    let jails = if opts.jails.is_empty() {
        s.jails.clone()
    } else {
        opts.jails.clone()
    };
    let rcfg = ReceiverConfig {
        endpoints: s.publisher.clone(),
        jails,
        heartbeat_timeout: s.heartbeat_timeout,
        snapshot: s.snapshot.clone(),
        snapshot_timeout: crate::SNAPSHOT_TIMEOUT,
        queue_limit: s.queue_size,
        legacy: s.legacy,
        keys,
        heartbeats: true,
    };
    let ctx = zmq::Context::new();
    let (tx, mut rx) = mpsc::channel(crate::CHANNEL_CAPACITY);
    let (ntx, mut nrx) = mpsc::unbounded_channel();
    let notices = Notices::to(ntx);
    let stop = shutdown.clone();
    let receiver =
        tokio::spawn(receiver::run(ctx, rcfg, stop, tx, notices).with_current_subscriber());
    let mut p = Printer {
        opts,
        publisher: endpoints_label(&s.publisher),
        timeout: s.heartbeat_timeout,
        snapshot: !s.snapshot.is_empty() && !s.legacy,
        dead: Throttle::default(),
        refused: Default::default(),
        missed: Throttle::default(),
        snapshot_failed: Throttle::default(),
    };
    let mut notices_open = true;
    loop {
        tokio::select! {
            input = rx.recv() => match input {
                Some(i) => {
                    if !p.input(i) {
                        // Standard output closed (`| head`): stop quietly.
                        shutdown.cancel();
                    }
                }
                None => break,
            },
            n = nrx.recv(), if notices_open => match n {
                Some(n) => p.notice(n),
                None => notices_open = false,
            },
        }
    }
    receiver.await.map_err(|source| SubscriberError::Task {
        what: "receive",
        source,
    })??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_every_field() {
        let e = Event::new(
            f2b_proto::EventId::from_u128(7),
            f2b_proto::NodeName::new("web2").unwrap(),
            JailName::new("sshd").unwrap(),
            f2b_proto::Action::Ban,
            "203.0.113.5".parse().unwrap(),
            1_763_702_000_446,
        )
        .unwrap();
        let line = event_line(&e, 42, Some(Epoch(0x9f2c)), false);
        assert!(
            line.starts_with("2025-11-21T05:13:20.446Z seq=42 epoch=0000000000009f2c node=web2 jail=sshd action=ban ip=203.0.113.5 id="),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(&event_line(&e, 42, None, true)).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["epoch"], serde_json::Value::Null);
        assert_eq!(v["action"], "ban");
        assert_eq!(v["ip"], "203.0.113.5");
        assert_eq!(v["time"], "2025-11-21T05:13:20.446Z");
        let hb: serde_json::Value =
            serde_json::from_str(&heartbeat_line(Epoch(1), 3, true)).unwrap();
        assert_eq!(hb["type"], "heartbeat");
    }
}
