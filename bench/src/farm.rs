//! Many SUB sockets in this process, read by one thread: the subscribers of the
//! throughput and fan-out benchmarks. For each event (by sequence number) it
//! counts the sockets that got it and reports the moment the last one did; it
//! checks that each socket got every sequence number, in order; and it counts the
//! deliveries of each millisecond, for rates that do not wait for the last socket.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use f2b_common::sockets::new_socket;

use crate::load::event_seqs;
use crate::stats::Rates;

/// SUB sockets per libzmq context.
const PER_CONTEXT: usize = 500;

/// What the sockets received, checked.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Events delivered, over all sockets.
    pub deliveries: u64,
    /// Sequence numbers a socket skipped (a socket's seq not one more than its
    /// previous one), over all sockets.
    pub gaps: u64,
    /// When the reading thread started: the origin of `per_ms`.
    pub origin: Option<Instant>,
    /// Deliveries read in each millisecond from `origin`.
    pub per_ms: Vec<u64>,
}

impl Received {
    /// The deliveries as events delivered to all `subscribers`: each delivery is
    /// 1/`subscribers` of an event, at the millisecond it was read, from `start`.
    /// Unlike the completions (the moment the last socket has an event), these do
    /// not come in bursts when the reading thread, behind, drains one socket's
    /// backlog after another's: over a run both add up to the same events.
    pub fn delivery_rates(&self, start: Instant, subscribers: usize) -> Rates {
        let mut rates = Rates::new(start);
        let Some(origin) = self.origin else {
            return rates;
        };
        let share = 1.0 / subscribers.max(1) as f64;
        for (ms, &n) in self.per_ms.iter().enumerate() {
            if n > 0 {
                rates.record_n(origin + Duration::from_millis(ms as u64), n as f64 * share);
            }
        }
        rates
    }
}

/// The SUB sockets and their reading thread.
#[derive(Debug)]
pub struct Farm {
    n: usize,
    ready: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// (seq, when the last socket got it).
    pub complete: mpsc::Receiver<(u64, Instant)>,
    handle: Option<JoinHandle<anyhow::Result<Received>>>,
}

impl Farm {
    /// `n` SUB sockets subscribed to everything, connected to `endpoint`.
    pub fn start(endpoint: &str, n: usize) -> anyhow::Result<Farm> {
        let ready = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        // A libzmq context holds at most 1023 sockets (ZMQ_MAX_SOCKETS, which the
        // zmq crate cannot set): one context per PER_CONTEXT sockets.
        let contexts: Vec<zmq::Context> = (0..n.div_ceil(PER_CONTEXT))
            .map(|_| zmq::Context::new())
            .collect();
        let mut socks = Vec::with_capacity(n);
        for i in 0..n {
            let s = new_socket(&contexts[i / PER_CONTEXT], zmq::SUB)?;
            s.set_subscribe(b"")?;
            s.connect(endpoint)
                .with_context(|| format!("connect {endpoint}"))?;
            socks.push(s);
        }
        let (r, st) = (ready.clone(), stop.clone());
        let handle = thread::Builder::new()
            .name("sub-farm".into())
            .spawn(move || read_all(&contexts, &socks, &r, &st, &tx))?;
        Ok(Farm {
            n,
            ready,
            stop,
            complete: rx,
            handle: Some(handle),
        })
    }

    /// Waits until every socket has received something (a heartbeat): all are
    /// connected and subscribed. `poke` is called every 50 ms meanwhile (a bare
    /// publisher sends something there).
    pub fn wait_ready(&self, timeout: Duration, mut poke: impl FnMut()) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.ready.load(Ordering::Relaxed) < self.n {
            if Instant::now() > deadline {
                bail!(
                    "{} of {} SUB sockets received something within {timeout:?}",
                    self.ready.load(Ordering::Relaxed),
                    self.n
                );
            }
            poke();
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Waits for the completion of `seq` (every socket has it); returns when.
    pub fn wait_complete(&self, seq: u64, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.complete.recv_timeout(left) {
                Ok((s, t)) if s == seq => return Ok(t),
                Ok(_) => {}
                Err(_) => bail!(
                    "event seq={seq} did not reach all {} SUB sockets within {timeout:?}",
                    self.n
                ),
            }
        }
    }

    /// Collects completions up to and including `last` (any order), stopping at
    /// `timeout`; returns them.
    pub fn collect_until(&self, first: u64, last: u64, timeout: Duration) -> Vec<(u64, Instant)> {
        let deadline = Instant::now() + timeout;
        let want = (last + 1).saturating_sub(first) as usize;
        let mut out = Vec::with_capacity(want);
        while out.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.complete.recv_timeout(left) {
                Ok((s, t)) if (first..=last).contains(&s) => out.push((s, t)),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        out
    }

    /// Stops the reading thread; what it saw.
    pub fn finish(mut self) -> anyhow::Result<Received> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow::anyhow!("the SUB reading thread panicked"))?,
            None => Ok(Received::default()),
        }
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What has been received, per socket and per sequence number.
#[derive(Debug)]
struct Tracker<'a> {
    n: usize,
    seen: Vec<bool>,
    last: Vec<u64>,
    /// counts[seq - base] for seq >= base; base: the first seq any socket got.
    base: Option<u64>,
    counts: Vec<u32>,
    out: Received,
    ready: &'a AtomicUsize,
    tx: &'a mpsc::Sender<(u64, Instant)>,
    topic: zmq::Message,
    part: zmq::Message,
    /// The sequence numbers of the message being read (several for `events`).
    seqs: Vec<u64>,
    /// The origin of `out.per_ms`.
    origin: Instant,
    /// The millisecond (from `origin`) the message being read was read in.
    now_ms: usize,
}

impl Tracker<'_> {
    fn drain(&mut self, i: usize, sock: &zmq::Socket) -> anyhow::Result<()> {
        // ZMQ_FD signals a change, not readiness: ask ZMQ_EVENTS, read until EAGAIN,
        // and ask again (reading may have let more in).
        // The parts are read into two reused messages, without copying: this
        // thread handles every delivery of the benchmark and shares the CPUs with
        // the publisher.
        while sock.get_events()?.contains(zmq::POLLIN) {
            loop {
                match sock.recv(&mut self.topic, zmq::DONTWAIT) {
                    Ok(()) => {}
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(e.into()),
                }
                self.now_ms = self.origin.elapsed().as_millis() as usize;
                let mut seqs = std::mem::take(&mut self.seqs);
                seqs.clear();
                let mut more = self.topic.get_more();
                let mut part = 1;
                while more {
                    sock.recv(&mut self.part, 0)?;
                    if part == 1 && self.topic.starts_with(b"ev:") {
                        event_seqs(&self.part, &mut seqs);
                    }
                    part += 1;
                    more = self.part.get_more();
                }
                if seqs.is_empty() {
                    self.message(i, None);
                }
                for &seq in &seqs {
                    self.message(i, Some(seq));
                }
                self.seqs = seqs;
            }
        }
        Ok(())
    }

    fn message(&mut self, i: usize, seq: Option<u64>) {
        if !self.seen[i] {
            self.seen[i] = true;
            self.ready.fetch_add(1, Ordering::Relaxed);
        }
        let Some(seq) = seq else {
            return;
        };
        self.out.deliveries += 1;
        if self.out.per_ms.len() <= self.now_ms {
            self.out.per_ms.resize(self.now_ms + 1, 0);
        }
        self.out.per_ms[self.now_ms] += 1;
        if self.last[i] != 0 && seq != self.last[i] + 1 {
            self.out.gaps += 1;
        }
        self.last[i] = seq;
        let b = *self.base.get_or_insert(seq);
        if seq < b {
            return;
        }
        let k = (seq - b) as usize;
        if self.counts.len() <= k {
            self.counts.resize(k + 1, 0);
        }
        self.counts[k] += 1;
        if self.counts[k] as usize == self.n {
            let _ = self.tx.send((seq, Instant::now()));
        }
    }
}

/// The reading loop: epoll on the sockets' ZMQ_FDs (zmq_poll over a thousand
/// sockets costs milliseconds per call, which would be measured), and every 50 ms
/// a sweep of all of them in case an edge was missed.
#[allow(deprecated)] // epoll_ctl: zmq::Socket has a RawFd, not an AsFd.
fn read_all(
    _contexts: &[zmq::Context],
    socks: &[zmq::Socket],
    ready: &AtomicUsize,
    stop: &AtomicBool,
    tx: &mpsc::Sender<(u64, Instant)>,
) -> anyhow::Result<Received> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::epoll::{epoll_ctl, Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollOp};

    let n = socks.len();
    let origin = Instant::now();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, s) in socks.iter().enumerate() {
        let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, i as u64);
        epoll_ctl(
            epoll.0.as_raw_fd(),
            EpollOp::EpollCtlAdd,
            s.get_fd()?,
            &mut ev,
        )?;
    }
    let mut t = Tracker {
        n,
        seen: vec![false; n],
        last: vec![0; n],
        base: None,
        counts: Vec::new(),
        out: Received {
            origin: Some(origin),
            ..Received::default()
        },
        ready,
        tx,
        topic: zmq::Message::new(),
        part: zmq::Message::new(),
        seqs: Vec::new(),
        origin,
        now_ms: 0,
    };
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let got = epoll.wait(&mut events, 50u16)?;
        for ev in &events[..got] {
            let i = ev.data() as usize;
            t.drain(i, &socks[i])?;
        }
        if got == 0 || last_sweep.elapsed() > Duration::from_millis(50) {
            for (i, s) in socks.iter().enumerate() {
                t.drain(i, s)?;
            }
            last_sweep = Instant::now();
        }
    }
    Ok(t.out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_common::sockets::last_endpoint;

    /// Every socket gets every event, in order, and each event's completion is
    /// reported once.
    #[test]
    fn a_bare_pub_reaches_every_socket() {
        let ctx = zmq::Context::new();
        let publ = new_socket(&ctx, zmq::PUB).unwrap();
        publ.bind("tcp://127.0.0.1:*").unwrap();
        let n = std::env::var("FARM_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let farm = Farm::start(&last_endpoint(&publ), n).unwrap();
        farm.wait_ready(Duration::from_secs(20), || {
            publ.send_multipart([&b"hb:\0"[..], b"{}"], 0).unwrap();
        })
        .unwrap();
        for seq in 1..=10u64 {
            let body = format!("{{\"v\":1,\"type\":\"event\",\"seq\":{seq}}}");
            let t0 = Instant::now();
            publ.send_multipart([&b"ev:x\0"[..], body.as_bytes()], 0)
                .unwrap();
            let t = farm.wait_complete(seq, Duration::from_secs(10)).unwrap();
            assert!(t >= t0);
        }
        let r = farm.finish().unwrap();
        assert_eq!(r.deliveries, 10 * n as u64);
        assert_eq!(r.gaps, 0);
        assert_eq!(r.per_ms.iter().sum::<u64>(), r.deliveries);
        let rates = r.delivery_rates(r.origin.unwrap(), n);
        assert!((rates.count() - 10.0).abs() < 1e-9, "{}", rates.count());
    }
}
