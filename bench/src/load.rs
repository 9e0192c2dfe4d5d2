//! A load generator speaking the protocol to a publisher's reply socket, as
//! monitors do: reports built with f2b-proto (and signed when the cluster
//! authenticates), on a REQ socket (one report in flight, like f2b-monitor) or a
//! DEALER (several in flight, to fill the publisher's batches).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use f2b_common::sockets::new_socket;
use f2b_proto::{Action, Event, EventId, JailName, NodeName, Reply, Request};

use crate::trust::Trust;

/// How long a report may wait for its reply before the run is declared broken.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The `n`th address of the benchmarks: 100.64.0.0/10 (shared address space, 4
/// million addresses, never a real attacker), so each event is a new (jail, ip)
/// that the publisher broadcasts.
pub fn ip_for(n: u64) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    IpAddr::V4(Ipv4Addr::from(base + (n % (1 << 22)) as u32))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

/// A ban of `ip` in jail `sshd` reported by `node`, with a fresh id.
pub fn ban_event(node: &NodeName, ip: IpAddr) -> Event {
    Event::new(
        EventId::from_u128(fastrand::u128(..)),
        node.clone(),
        JailName::new("sshd").expect("a valid jail name"),
        Action::Ban,
        ip,
        now_ms(),
    )
    .expect("a valid event")
}

/// The next address index to report, shared by the clients of a run.
pub type IpCounter = Arc<AtomicU64>;

/// What a run of a [`Reporter`] sends.
#[derive(Debug, Clone)]
pub enum Until {
    /// Until this instant.
    Deadline(Instant),
    /// Until the shared counter of addresses reaches this many.
    Total(u64),
}

/// One client of the reply socket.
pub struct Reporter {
    sock: zmq::Socket,
    dealer: bool,
    window: usize,
    node: NodeName,
    trust: Trust,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("node", &self.node)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// What came back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub broadcast: u64,
    pub other_acks: u64,
    /// The highest sequence number acknowledged.
    pub max_seq: u64,
    pub min_seq: u64,
}

impl Reporter {
    /// A client named `node` (the events' node) connected to `endpoint`, with at
    /// most `window` reports in flight (1: a REQ socket, as f2b-monitor; more: a
    /// DEALER).
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        node: &str,
        window: usize,
        trust: &Trust,
    ) -> anyhow::Result<Reporter> {
        let dealer = window > 1;
        let sock = new_socket(ctx, if dealer { zmq::DEALER } else { zmq::REQ })?;
        sock.set_rcvtimeo(REPLY_TIMEOUT.as_millis() as i32)?;
        sock.connect(endpoint)
            .with_context(|| format!("connect {endpoint}"))?;
        Ok(Reporter {
            sock,
            dealer,
            window: window.max(1),
            node: NodeName::new(node).context("a valid node name")?,
            trust: trust.clone(),
        })
    }

    fn send(&self, event: &Event) -> anyhow::Result<()> {
        let payload = Request::Report(event.clone()).encode();
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(3);
        if self.dealer {
            frames.push(Vec::new());
        }
        let auth = self.trust.request_frames(self.node.as_str(), &payload);
        frames.push(payload);
        frames.extend(auth);
        self.sock.send_multipart(frames, 0).context("send a report")
    }

    fn recv(&self) -> anyhow::Result<Reply> {
        let frames = self
            .sock
            .recv_multipart(0)
            .with_context(|| format!("no reply within {REPLY_TIMEOUT:?}"))?;
        let payload = frames
            .get(usize::from(self.dealer))
            .context("a reply without its payload")?;
        Reply::decode(payload).context("an unreadable reply")
    }

    /// Reports ban after ban (addresses from `ips`) until `until`, keeping up to the
    /// window in flight; calls `on_reply` with each reply and when it came; returns
    /// the tally. Fails on a NAK: a benchmark that is refused measures nothing.
    pub fn run(
        &self,
        ips: &IpCounter,
        until: &Until,
        mut on_reply: impl FnMut(Instant, &Reply),
    ) -> anyhow::Result<Tally> {
        let mut tally = Tally {
            min_seq: u64::MAX,
            ..Tally::default()
        };
        let mut in_flight = 0usize;
        let mut done = false;
        loop {
            while !done && in_flight < self.window {
                let more = match until {
                    Until::Deadline(d) => Instant::now() < *d,
                    Until::Total(_) => true,
                };
                let n = ips.fetch_add(1, Ordering::Relaxed);
                if !more || matches!(until, Until::Total(t) if n >= *t) {
                    done = true;
                    break;
                }
                self.send(&ban_event(&self.node, ip_for(n)))?;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let reply = self.recv()?;
            in_flight -= 1;
            let now = Instant::now();
            match &reply {
                Reply::Ack(a) => {
                    if a.status == f2b_proto::AckStatus::Broadcast {
                        tally.broadcast += 1;
                    } else {
                        tally.other_acks += 1;
                    }
                    if let Some(s) = a.seq {
                        tally.max_seq = tally.max_seq.max(s);
                        tally.min_seq = tally.min_seq.min(s);
                    }
                }
                Reply::Nak(n) => bail!("the publisher refused a report: {n:?}"),
                Reply::Replies(r) => bail!("replies to one report: {r:?}"),
            }
            on_reply(now, &reply);
        }
        Ok(tally)
    }

    /// Reports one ban of `ip` and waits for its reply.
    pub fn report_one(&self, ip: IpAddr) -> anyhow::Result<Reply> {
        self.send(&ban_event(&self.node, ip))?;
        let mut reply = self.recv()?;
        // A DEALER may get replies of earlier reports first; a benchmark calling
        // this has none in flight.
        while self.dealer && matches!(&reply, Reply::Ack(a) if a.seq.is_none()) {
            reply = self.recv()?;
        }
        Ok(reply)
    }
}

/// Merges the tallies of several clients.
/// One client per node in `nodes` (each with `window` reports in flight), all
/// reporting from `ips` until `until`, each on its own thread; their tallies.
pub fn report_from_all<S: AsRef<str>>(
    ctx: &zmq::Context,
    endpoint: &str,
    nodes: &[S],
    window: usize,
    trust: &Trust,
    ips: &IpCounter,
    until: &Until,
) -> anyhow::Result<Vec<Tally>> {
    let mut threads = Vec::new();
    for node in nodes {
        let r = Reporter::connect(ctx, endpoint, node.as_ref(), window, trust)?;
        let (ips, until) = (ips.clone(), until.clone());
        threads.push(std::thread::spawn(move || r.run(&ips, &until, |_, _| {})));
    }
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|_| anyhow::anyhow!("a load client panicked"))?
        })
        .collect()
}

pub fn merge(tallies: &[Tally]) -> Tally {
    let mut t = Tally {
        min_seq: u64::MAX,
        ..Tally::default()
    };
    for x in tallies {
        t.broadcast += x.broadcast;
        t.other_acks += x.other_acks;
        t.max_seq = t.max_seq.max(x.max_seq);
        t.min_seq = t.min_seq.min(x.min_seq);
    }
    t
}

/// The sequence numbers of a broadcast's payload (`"seq":N`: one for an `event`,
/// one per element for `events`), appended to `out` in order, without decoding the
/// whole JSON; none for a heartbeat or anything else.
pub fn event_seqs(payload: &[u8], out: &mut Vec<u64>) {
    if !contains(payload, b"\"type\":\"event\"") && !contains(payload, b"\"type\":\"events\"") {
        return;
    }
    // Event objects have no "seq" key (and their strings cannot hold quotes), so
    // every "seq": is the message's (`event`) or an element's (`events`), in order.
    let key = b"\"seq\":";
    let mut rest = payload;
    while let Some(at) = rest.windows(key.len()).position(|w| w == key) {
        rest = &rest[at + key.len()..];
        let mut seq: u64 = 0;
        let mut digits = 0;
        for b in rest.iter().take_while(|b| b.is_ascii_digit()) {
            match seq
                .checked_mul(10)
                .and_then(|s| s.checked_add(u64::from(b - b'0')))
            {
                Some(s) => seq = s,
                None => return,
            }
            digits += 1;
        }
        if digits > 0 {
            out.push(seq);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).rev().any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::{Broadcast, Epoch, Heartbeat, Sequenced};

    #[test]
    fn addresses_are_distinct_and_allowed() {
        assert_eq!(ip_for(0).to_string(), "100.64.0.0");
        assert_eq!(ip_for(1_000_000).to_string(), "100.79.66.64");
        assert_ne!(ip_for(7), ip_for(8));
    }

    #[test]
    fn seq_is_read_from_event_payloads_only() {
        let node = NodeName::new("web1").unwrap();
        let ev = Broadcast::Event(Sequenced {
            seq: 4242,
            epoch: Epoch(7),
            event: ban_event(&node, ip_for(3)),
        });
        let seqs = |b: &Broadcast| {
            let mut out = Vec::new();
            event_seqs(&b.encode(), &mut out);
            out
        };
        assert_eq!(seqs(&ev), [4242]);
        let hb = Broadcast::Heartbeat(Heartbeat {
            seq: 9,
            epoch: Epoch(7),
            interval_ms: 1000,
        });
        assert!(seqs(&hb).is_empty());
        let batch = f2b_proto::pack_events(
            (10..13)
                .map(|seq| Sequenced {
                    seq,
                    epoch: Epoch(7),
                    event: ban_event(&node, ip_for(seq)),
                })
                .collect(),
        );
        assert!(matches!(batch[0], Broadcast::Events(_)));
        assert_eq!(seqs(&batch[0]), [10, 11, 12]);
        let req = Request::Report(ban_event(&node, ip_for(1))).encode();
        assert!(Request::decode(&req).is_ok());
    }
}
