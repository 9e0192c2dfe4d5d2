//! A real f2b-publisher in-process (ledger in a directory of the test, signing
//! with [`test_key`]), reports to it over REQ, a fake REP socket that answers
//! snapshot requests as a test says (signed like a publisher's), and an action
//! that counts what it applies.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use f2b_common::config::Config;
use f2b_common::{zmq, CancellationToken};
use f2b_proto::{
    AckStatus, Action, ActiveBan, Epoch, Event, JailName, Reply, Request, Sequenced, SnapshotPage,
    SnapshotReply,
};
use f2b_subscriber::action::BoxFuture;
use f2b_subscriber::pending::Item;
use f2b_subscriber::{Applier, CallError, Subscriber};

use super::{config, event, snapshot_lines, test_key, Running, TestPublisher, DEADLINE};

/// The `[trust]` lines of a subscriber of a [`Hub`]: the default, [`test_key`],
/// which the hub signs with.
pub const HUB_TRUST: &str = "";

/// A publisher serving on loopback until stopped, on a thread and runtime of its
/// own (so that a failing test's runtime never waits for it).
pub struct Hub {
    pub reply: String,
    pub broadcast: String,
    pub epoch: Epoch,
    pub state_dir: PathBuf,
    token: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Hub {
    /// A publisher on ephemeral ports, its ledger in `state_dir`.
    pub fn start(state_dir: &Path) -> Hub {
        Hub::start_at(state_dir, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    }

    /// A publisher on the given endpoints (to restart one on the same ports; the
    /// ports may still be held for a moment, so binding is retried).
    pub fn start_at(state_dir: &Path, reply: &str, broadcast: &str) -> Hub {
        std::fs::create_dir_all(state_dir).unwrap();
        let key_file = state_dir.join("publisher.key");
        std::fs::write(&key_file, test_key().to_file_text()).unwrap();
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        // Reports come without credentials (the subscriber is under test here).
        let text = format!(
            "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"{reply}\"\nbroadcast_bind = \"{broadcast}\"\n\
             heartbeat_interval = \"100ms\"\nban_time = \"1h\"\nstate_dir = {:?}\n\
             [trust]\nallow_unauthenticated = true\nsigning_key_file = {:?}\n",
            state_dir.to_str().unwrap(),
            key_file.to_str().unwrap(),
        );
        let full = f2b_common::config::from_str(&text, Path::new("hub.conf"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let (cfg, trust) = (full.publisher, full.trust);
        let start = Instant::now();
        let bound = loop {
            match f2b_publisher::bind_trusted(&cfg, &trust) {
                Ok(b) => break b,
                Err(e) if start.elapsed() < DEADLINE => {
                    eprintln!("hub bind: {e}, retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!(
                    "hub bind (reply {reply}, broadcast {broadcast}) still failing after \
                     {DEADLINE:?}: {e}"
                ),
            }
        };
        let token = CancellationToken::new();
        let (reply, broadcast, epoch) = (
            bound.reply_endpoint().to_owned(),
            bound.broadcast_endpoint().to_owned(),
            bound.epoch(),
        );
        let serving = token.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(bound.serve(serving)).expect("hub returned Ok");
        });
        Hub {
            reply,
            broadcast,
            epoch,
            state_dir: state_dir.to_owned(),
            token,
            thread: Some(thread),
        }
    }

    /// Stops it and waits until its sockets are closed (its thread has ended),
    /// failing the test after [`STOP_DEADLINE`].
    ///
    /// The wait polls the thread instead of joining it on a blocking task: a
    /// blocking task that never ends would hold the test's runtime at its shutdown
    /// (which waits for every blocking task) long after the test failed.
    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + STOP_DEADLINE;
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "hub (reply {}, broadcast {}) not stopped within {STOP_DEADLINE:?} of its \
                     cancellation",
                    self.reply,
                    self.broadcast
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(t.join().is_ok(), "the hub thread panicked");
        }
    }

    /// Reports an event; it must be accepted and broadcast. Returns it.
    pub async fn report(&self, node: &str, jail: &str, action: Action, ip: &str) -> Event {
        let e = event(node, jail, action, ip);
        let reply = request(&self.reply, Request::Report(e.clone()).encode()).await;
        match Reply::decode(&reply).unwrap() {
            Reply::Ack(a) => assert_eq!(a.status, AckStatus::Broadcast, "{a:?}"),
            other => panic!("{other:?}"),
        }
        e
    }
}

/// How long [`Hub::stop`] (and a dropped hub) waits for the publisher to stop; it
/// lets its PUB socket drain for `f2b_publisher::SHUTDOWN_LINGER` first.
pub const STOP_DEADLINE: Duration = Duration::from_secs(10);

impl Drop for Hub {
    /// Stops it (a test that failed with a hub running); waits for its thread for
    /// [`STOP_DEADLINE`] at most, then leaves it behind rather than hang.
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + STOP_DEADLINE;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                eprintln!(
                    "hub (reply {}, broadcast {}) not stopped within {STOP_DEADLINE:?}; its \
                     thread is left behind",
                    self.reply, self.broadcast
                );
            }
        }
    }
}

/// Sends one request on a new REQ socket to `endpoint`; returns the reply. Fails
/// the test when none comes within [`DEADLINE`] (the blocking task is bounded by
/// the socket's own timeouts, so it never outlives the test).
pub async fn request(endpoint: &str, frame: Vec<u8>) -> Vec<u8> {
    let endpoint = endpoint.to_owned();
    let ms = i32::try_from(DEADLINE.as_millis()).unwrap_or(i32::MAX);
    let label = endpoint.clone();
    tokio::task::spawn_blocking(move || {
        let ctx = zmq::Context::new();
        let req = f2b_common::sockets::new_socket(&ctx, zmq::REQ).unwrap();
        req.set_rcvtimeo(ms).unwrap();
        req.set_sndtimeo(ms).unwrap();
        req.connect(&endpoint).unwrap();
        req.send(frame, 0)
            .unwrap_or_else(|e| panic!("request to {endpoint}: send: {e}"));
        req.recv_bytes(0)
            .unwrap_or_else(|e| panic!("request to {endpoint}: no reply within {DEADLINE:?}: {e}"))
    })
    .await
    .unwrap_or_else(|e| match e.try_into_panic() {
        Ok(p) => std::panic::resume_unwind(p),
        Err(e) => panic!("request to {label}: {e}"),
    })
}

/// A REP socket that answers each request with what `answer` makes of it.
pub struct FakeRep {
    pub endpoint: String,
    /// Requests received so far.
    pub requests: Arc<AtomicUsize>,
    stop: std_mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRep {
    /// Answers each request with `answer`'s payload, signed with [`test_key`]
    /// over the request as received.
    pub fn start(mut answer: impl FnMut(&[u8]) -> Vec<u8> + Send + 'static) -> FakeRep {
        let key = test_key();
        FakeRep::start_frames(move |req| {
            let payload = answer(req);
            let sig = f2b_proto::auth::sign_snapshot(&key, req, &payload);
            vec![payload, sig.to_vec()]
        })
    }

    /// Answers each request with the frames `answer` makes of it.
    pub fn start_frames(mut answer: impl FnMut(&[u8]) -> Vec<Vec<u8>> + Send + 'static) -> FakeRep {
        let (stop, stopped) = std_mpsc::channel();
        let (ep_tx, ep_rx) = std_mpsc::channel();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let thread = std::thread::spawn(move || {
            let ctx = zmq::Context::new();
            let rep = f2b_common::sockets::new_socket(&ctx, zmq::REP).unwrap();
            rep.bind("tcp://127.0.0.1:*").unwrap();
            ep_tx
                .send(f2b_common::sockets::last_endpoint(&rep))
                .unwrap();
            loop {
                match stopped.try_recv() {
                    Ok(()) | Err(std_mpsc::TryRecvError::Disconnected) => return,
                    Err(std_mpsc::TryRecvError::Empty) => {}
                }
                let mut items = [rep.as_poll_item(zmq::POLLIN)];
                zmq::poll(&mut items, 50).unwrap();
                if !items[0].is_readable() {
                    continue;
                }
                let req = rep.recv_bytes(0).unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                rep.send_multipart(answer(&req), 0).unwrap();
            }
        });
        FakeRep {
            endpoint: ep_rx
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|e| panic!("fake REP socket not bound: {e}")),
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

/// What [`listing_rep`] serves: (epoch, seq, bans).
pub type Listing = Arc<Mutex<(Epoch, u64, Vec<ActiveBan>)>>;

/// A REP that serves what `listing` holds at each request, in one page, signed
/// with [`test_key`]; with `gate`, each request after the first waits for a word
/// on it.
pub fn listing_rep(listing: Listing, gate: Option<std_mpsc::Receiver<()>>) -> FakeRep {
    let mut first = true;
    FakeRep::start(move |_| {
        if let (false, Some(g)) = (first, &gate) {
            g.recv_timeout(DEADLINE)
                .expect("the test lets the snapshot go");
        }
        first = false;
        let (epoch, seq, bans) = listing.lock().unwrap().clone();
        page_of(epoch, seq, bans)
    })
}

/// A subscriber that asks a [`listing_rep`] for snapshots, with what it was
/// started with.
pub struct Snapshotted {
    /// What the REP serves; at first `publ`'s epoch at seq 0, no bans.
    pub listing: Listing,
    pub rep: FakeRep,
    pub applier: Counting,
    pub sub: Running,
}

/// Starts a [`listing_rep`] (with `gate`) and, with `start`, a subscriber of
/// `publ` that asks it for snapshots (see [`snapshot_lines`]); returns once the
/// subscriber is connected and past its first resync.
pub async fn snapshotted(
    publ: &TestPublisher,
    gate: Option<std_mpsc::Receiver<()>>,
    start: fn(&Config, &Counting) -> Running,
) -> Snapshotted {
    let listing = Arc::new(Mutex::new((publ.epoch, 0, Vec::new())));
    let rep = listing_rep(listing.clone(), gate);
    let cfg = config("web1", &publ.endpoint, &snapshot_lines(&rep.endpoint));
    let applier = Counting::default();
    let mut sub = start(&cfg, &applier);
    sub.connected().await;
    sub.resynced().await;
    Snapshotted {
        listing,
        rep,
        applier,
        sub,
    }
}

/// The payload of a snapshot reply: one page of `epoch` at `seq` with `bans`.
pub fn page_of(epoch: Epoch, seq: u64, bans: Vec<ActiveBan>) -> Vec<u8> {
    let mut page = SnapshotPage::new(epoch, seq);
    for b in bans {
        page.try_push(b).unwrap();
    }
    SnapshotReply::Page(page).encode()
}

/// `s` as a snapshot lists it, expiring in an hour.
pub fn listed(s: &Sequenced) -> ActiveBan {
    ActiveBan {
        seq: s.seq,
        expires_ms: super::until(),
        event: s.event.clone(),
    }
}

impl FakeRep {
    /// Waits until it has received `n` requests, failing the test after
    /// [`DEADLINE`].
    pub async fn wait_requests(&self, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.requests.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "fewer than {n} snapshot requests within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeRep {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One application: (local jail, action, address).
pub type Applied = (String, Action, IpAddr);

/// An action that records every address it applies, and fails while `failing`.
#[derive(Debug, Clone, Default)]
pub struct Counting {
    pub applied: Arc<Mutex<Vec<Applied>>>,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
}

impl Counting {
    pub fn calls(&self) -> Vec<Applied> {
        self.applied.lock().unwrap().clone()
    }

    /// The addresses applied, in order.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.calls().iter().map(|c| c.2).collect()
    }

    /// How many times `action` of `ip` was applied.
    pub fn count(&self, action: Action, ip: &str) -> usize {
        let ip: IpAddr = ip.parse().unwrap();
        self.calls()
            .iter()
            .filter(|(_, a, i)| *a == action && *i == ip)
            .count()
    }
}

/// A subscriber applying with `applier`, and no local addresses (the test
/// machine's own must not decide what is skipped).
pub fn counting_subscriber(cfg: &Config, applier: &Counting) -> Subscriber {
    Subscriber::new(cfg)
        .with_applier(Box::new(applier.clone()))
        .with_local_addresses(vec![])
}

/// [`counting_subscriber`], running.
pub fn start_counting(cfg: &Config, applier: &Counting) -> Running {
    Running::start_with(counting_subscriber(cfg, applier))
}

impl Applier for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn max_batch(&self) -> usize {
        500
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err(CallError::new(
                    f2b_subscriber::FailureScope::Call,
                    "failing on purpose",
                ));
            }
            let mut a = self.applied.lock().unwrap();
            for i in items {
                a.push((jail.to_string(), action, i.ip()));
            }
            Ok(())
        })
    }
}
