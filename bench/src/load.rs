//! A load generator speaking the protocol to a publisher's reply socket, as
//! monitors do: reports built with f2b-proto (and signed when the cluster
//! authenticates), on a REQ socket (one request in flight, like f2b-monitor) or a
//! DEALER (several in flight, to fill the publisher's batches); one event per
//! request (`report`), or several (`reports`, packed by [`Request::pack`], as a
//! monitor sends them when it has more than one event waiting).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use f2b_common::sockets::new_socket;
use f2b_proto::{
    Ack, AckStatus, Action, Event, EventId, JailName, NodeName, Reply, Request, MAX_REPORT_EVENTS,
};
use memchr::memmem;

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

/// How a client reports: requests in flight, events per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Requests in flight: 1 on a REQ socket (as f2b-monitor), more on a DEALER.
    pub in_flight: usize,
    /// Events per request: 1 sends `report`s; more sends `reports` of up to this
    /// many events (at most [`MAX_REPORT_EVENTS`], fewer when they would not fit
    /// in a frame).
    pub batch: usize,
}

impl Shape {
    /// One event per request, `in_flight` requests at once.
    pub const fn single(in_flight: usize) -> Shape {
        Shape {
            in_flight,
            batch: 1,
        }
    }

    /// `batch` events per request (a `reports` request when more than one),
    /// `in_flight` requests at once.
    pub const fn batched(in_flight: usize, batch: usize) -> Shape {
        Shape { in_flight, batch }
    }
}

/// One client of the reply socket.
pub struct Reporter {
    sock: zmq::Socket,
    dealer: bool,
    window: usize,
    batch: usize,
    node: NodeName,
    trust: Trust,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("node", &self.node)
            .field("window", &self.window)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

/// What came back, counted per event (each element of a `replies` answer).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub broadcast: u64,
    pub other_acks: u64,
    /// Requests answered (each carried one event, or several).
    pub requests: u64,
    /// The highest sequence number acknowledged.
    pub max_seq: u64,
    pub min_seq: u64,
}

impl Tally {
    /// Counts one event's ACK.
    fn count(&mut self, a: &Ack) {
        if a.status == AckStatus::Broadcast {
            self.broadcast += 1;
        } else {
            self.other_acks += 1;
        }
        if let Some(s) = a.seq {
            self.max_seq = self.max_seq.max(s);
            self.min_seq = self.min_seq.min(s);
        }
    }
}

impl Reporter {
    /// A client named `node` (the events' node) connected to `endpoint`, with at
    /// most `shape.in_flight` requests in flight (1: a REQ socket, as f2b-monitor;
    /// more: a DEALER) of `shape.batch` events each.
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        node: &str,
        shape: Shape,
        trust: &Trust,
    ) -> anyhow::Result<Reporter> {
        let window = shape.in_flight;
        let dealer = window > 1;
        let sock = new_socket(ctx, if dealer { zmq::DEALER } else { zmq::REQ })?;
        sock.set_rcvtimeo(REPLY_TIMEOUT.as_millis() as i32)?;
        sock.connect(endpoint)
            .with_context(|| format!("connect {endpoint}"))?;
        Ok(Reporter {
            sock,
            dealer,
            window: window.max(1),
            batch: shape.batch.clamp(1, MAX_REPORT_EVENTS),
            node: NodeName::new(node).context("a valid node name")?,
            trust: trust.clone(),
        })
    }

    fn send(&self, request: &Request) -> anyhow::Result<()> {
        let payload = request.encode();
        let mut frames: Vec<Vec<u8>> = Vec::with_capacity(3);
        if self.dealer {
            frames.push(Vec::new());
        }
        let auth = self.trust.request_frames(self.node.as_str(), &payload);
        frames.push(payload);
        frames.extend(auth);
        self.sock
            .send_multipart(frames, 0)
            .context("send a request")
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
    /// window of requests in flight, each of up to the batch's events; calls
    /// `on_reply` with each reply and when it came; returns the tally, per event.
    /// Fails on a NAK (of a request, or of one event of a `reports`), and when the
    /// answers do not add up to the events sent: a benchmark that is refused
    /// measures nothing.
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
        // Events drawn and not sent yet: a request carries fewer than the batch when
        // they would not all fit in a frame, and the rest go in the next one.
        let mut queued: Vec<Event> = Vec::with_capacity(self.batch);
        let mut sent = 0u64;
        let mut in_flight = 0usize;
        let mut done = false;
        loop {
            while in_flight < self.window {
                if !done {
                    done = !self.draw(ips, until, &mut queued);
                }
                let Some((request, n)) = Request::pack(&queued) else {
                    break;
                };
                self.send(&request)?;
                queued.drain(..n);
                sent += n as u64;
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let reply = self.recv()?;
            in_flight -= 1;
            let now = Instant::now();
            tally.requests += 1;
            match &reply {
                Reply::Ack(a) => tally.count(a),
                Reply::Nak(n) => bail!("the publisher refused a request: {n:?}"),
                Reply::Replies(items) => {
                    for item in items {
                        match item {
                            Reply::Ack(a) => tally.count(a),
                            Reply::Nak(n) => {
                                bail!("the publisher refused an event of a reports request: {n:?}")
                            }
                            Reply::Replies(_) => bail!("a replies answer inside a replies answer"),
                        }
                    }
                }
            }
            on_reply(now, &reply);
        }
        let answered = tally.broadcast + tally.other_acks;
        if answered != sent {
            bail!("{sent} events were reported and {answered} answered");
        }
        Ok(tally)
    }

    /// Tops `queued` up to the batch with bans of the next addresses of `ips`,
    /// unless `until` has come (checked once per request for a deadline, per
    /// address for a total); false once it has: there is no more to draw.
    fn draw(&self, ips: &IpCounter, until: &Until, queued: &mut Vec<Event>) -> bool {
        if matches!(until, Until::Deadline(d) if Instant::now() >= *d) {
            return false;
        }
        while queued.len() < self.batch {
            let n = ips.fetch_add(1, Ordering::Relaxed);
            if matches!(until, Until::Total(t) if n >= *t) {
                return false;
            }
            queued.push(ban_event(&self.node, ip_for(n)));
        }
        true
    }

    /// Reports one ban of `ip` and waits for its reply.
    pub fn report_one(&self, ip: IpAddr) -> anyhow::Result<Reply> {
        self.send(&Request::Report(ban_event(&self.node, ip)))?;
        let mut reply = self.recv()?;
        // A DEALER may get replies of earlier reports first; a benchmark calling
        // this has none in flight.
        while self.dealer && matches!(&reply, Reply::Ack(a) if a.seq.is_none()) {
            reply = self.recv()?;
        }
        Ok(reply)
    }
}

/// One client per node in `nodes` (each reporting as `shape` says), all
/// reporting from `ips` until `until`, each on its own thread; their tallies.
pub fn report_from_all<S: AsRef<str>>(
    ctx: &zmq::Context,
    endpoint: &str,
    nodes: &[S],
    shape: Shape,
    trust: &Trust,
    ips: &IpCounter,
    until: &Until,
) -> anyhow::Result<Vec<Tally>> {
    let mut threads = Vec::new();
    for node in nodes {
        let r = Reporter::connect(ctx, endpoint, node.as_ref(), shape, trust)?;
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

/// Merges the tallies of several clients.
pub fn merge(tallies: &[Tally]) -> Tally {
    let mut t = Tally {
        min_seq: u64::MAX,
        ..Tally::default()
    };
    for x in tallies {
        t.broadcast += x.broadcast;
        t.other_acks += x.other_acks;
        t.requests += x.requests;
        t.max_seq = t.max_seq.max(x.max_seq);
        t.min_seq = t.min_seq.min(x.min_seq);
    }
    t
}

/// The sequence numbers of a broadcast's payload (`"seq":N`: one for an `event`,
/// one per element for `events`), appended to `out` in order, without decoding the
/// whole JSON; none for a heartbeat or anything else.
pub fn event_seqs(payload: &[u8], out: &mut Vec<u64>) {
    // The farm calls this for each delivery, 50 or 1,000 of every message, on the
    // CPUs the publisher runs on: substring search with memchr's SIMD finders,
    // not a byte-by-byte window scan (which cost about 5 us per 4 KiB message).
    static EVENT: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"type\":\"event"));
    static SEQ: LazyLock<memmem::Finder<'static>> =
        LazyLock::new(|| memmem::Finder::new(b"\"seq\":"));
    // "event" or "events": the key is followed by `"` or `s"`.
    let typed = EVENT.find_iter(payload).any(|at| {
        let rest = &payload[at + EVENT.needle().len()..];
        rest.starts_with(b"\"") || rest.starts_with(b"s\"")
    });
    if !typed {
        return;
    }
    // Event objects have no "seq" key (and their strings cannot hold quotes), so
    // every "seq": is the message's (`event`) or an element's (`events`), in order.
    let key = SEQ.needle().len();
    for at in SEQ.find_iter(payload) {
        let rest = &payload[at + key..];
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

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_common::sockets::last_endpoint;
    use f2b_proto::{Broadcast, Epoch, Heartbeat, Nak, NakReason, Sequenced};
    use std::sync::atomic::AtomicBool;
    use std::thread::JoinHandle;

    /// How the stand-in publisher answers.
    #[derive(Clone, Copy)]
    enum Answer {
        /// An ACK per event (`replies` for a `reports`).
        Right,
        /// A NAK for the event with this index (counted over the run), ACKs for
        /// the others.
        NakEvent(u64),
        /// One ACK for a whole `reports` request, as if it were one event.
        OneAck,
    }

    /// A stand-in publisher on an ephemeral port: a ROUTER answering every
    /// request as `answer` says, sequence numbers from 1. Returns its endpoint, a
    /// flag that stops it, and its thread, which returns the events of each
    /// request, in order.
    fn hub(answer: Answer) -> (String, Arc<AtomicBool>, JoinHandle<Vec<usize>>) {
        let ctx = zmq::Context::new();
        let router = new_socket(&ctx, zmq::ROUTER).unwrap();
        router.set_rcvtimeo(20).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        let ep = last_endpoint(&router);
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let _ctx = ctx;
            let mut seen = Vec::new();
            let mut seq = 0u64;
            while !st.load(Ordering::Relaxed) {
                let Ok(frames) = router.recv_multipart(0) else {
                    continue;
                };
                // [peer, empty delimiter, payload, auth]
                assert_eq!(frames.len(), 4, "peer, delimiter, payload, auth");
                let mut ack = |e: &Event| {
                    seq += 1;
                    match answer {
                        Answer::NakEvent(k) if k + 1 == seq => Reply::Nak(Nak::new(
                            Some(e.id),
                            NakReason::Forbidden,
                            "refused for the test",
                        )),
                        _ => Reply::Ack(Ack {
                            id: e.id,
                            seq: Some(seq),
                            status: AckStatus::Broadcast,
                        }),
                    }
                };
                let reply = match Request::decode(&frames[2]).unwrap() {
                    Request::Report(e) => {
                        seen.push(1);
                        ack(&e)
                    }
                    Request::Reports(events) => {
                        seen.push(events.len());
                        let mut items: Vec<Reply> = events.iter().map(&mut ack).collect();
                        match answer {
                            Answer::OneAck => items.swap_remove(0),
                            _ => Reply::Replies(items),
                        }
                    }
                    other => panic!("not a report: {other:?}"),
                };
                router
                    .send_multipart([&frames[0][..], b"", &reply.encode()], 0)
                    .unwrap();
            }
            seen
        });
        (ep, stop, handle)
    }

    /// Runs one client of `shape` against a stand-in publisher answering as
    /// `answer` says, until `total` addresses; its tally and the events of each
    /// request the publisher got.
    fn run_against(
        shape: Shape,
        answer: Answer,
        total: u64,
    ) -> (anyhow::Result<Tally>, Vec<usize>) {
        let (ep, stop, hub) = hub(answer);
        let trust = Trust::generate(&["t1"]);
        let ctx = zmq::Context::new();
        let r = Reporter::connect(&ctx, &ep, "t1", shape, &trust).unwrap();
        let ips = Arc::new(AtomicU64::new(0));
        let tally = r.run(&ips, &Until::Total(total), |_, _| {});
        stop.store(true, Ordering::Relaxed);
        (tally, hub.join().unwrap())
    }

    #[test]
    fn a_batch_of_one_sends_reports_one_at_a_time() {
        let (tally, seen) = run_against(Shape::single(1), Answer::Right, 3);
        let t = tally.unwrap();
        assert_eq!(
            (t.broadcast, t.requests, t.min_seq, t.max_seq),
            (3, 3, 1, 3)
        );
        assert_eq!(seen, [1, 1, 1]);
    }

    #[test]
    fn a_batch_sends_reports_requests_and_counts_each_answer() {
        let (tally, seen) = run_against(Shape::batched(1, MAX_REPORT_EVENTS), Answer::Right, 100);
        let t = tally.unwrap();
        assert_eq!((t.broadcast, t.other_acks, t.requests), (100, 0, 4));
        assert_eq!((t.min_seq, t.max_seq), (1, 100));
        assert_eq!(
            seen,
            [32, 32, 32, 4],
            "the last request carries what is left"
        );
        // Pipelined, on a DEALER.
        let (tally, seen) = run_against(Shape::batched(4, 8), Answer::Right, 50);
        let t = tally.unwrap();
        assert_eq!((t.broadcast, t.requests, t.max_seq), (50, 7, 50));
        assert_eq!(seen, [8, 8, 8, 8, 8, 8, 2]);
    }

    #[test]
    fn a_refused_event_or_a_miscounted_answer_fails_the_run() {
        let (tally, _) = run_against(Shape::batched(1, 10), Answer::NakEvent(14), 40);
        let err = tally.unwrap_err().to_string();
        assert!(err.contains("refused an event"), "{err}");
        let (tally, _) = run_against(Shape::batched(1, 10), Answer::OneAck, 40);
        let err = tally.unwrap_err().to_string();
        assert!(
            err.contains("40 events were reported and 4 answered"),
            "{err}"
        );
    }

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
