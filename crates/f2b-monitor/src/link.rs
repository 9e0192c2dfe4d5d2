//! Whether the publisher is there while no report is in flight: a libzmq socket
//! monitor on the sender's REQ socket, read by a thread of its own (the sender
//! thread waits on its queue while idle), keeps the `publisher_answering`
//! readiness condition ([`f2b_common::metrics::MonitorMetrics`]).
//!
//! - A completed ZeroMQ handshake (`HANDSHAKE_SUCCEEDED`: a ZeroMQ peer answered
//!   at `[monitor] publisher`, not merely an open TCP port) sets it, unless the
//!   last report went unanswered (a publisher that takes connections and answers
//!   nothing is not ready); a reply clears that again.
//! - A lost connection (`DISCONNECTED`) clears it.
//!
//! Each of these connection changes also becomes the unit's STATUS= line for
//! systemd (`reporting to tcp://hub:5678: connected`).
//!
//! The sender sets it on every reply and clears it on every ACK timeout itself
//! ([`crate::send`]). Each REQ socket the sender creates is handed over with
//! [`Link::attach`] before it connects, so that no event of it is missed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use f2b_common::metrics::Condition;
use f2b_common::sockets::shutdown_socket;
use f2b_common::zmq;
use tokio_util::sync::CancellationToken;

static LINK_ID: AtomicU64 = AtomicU64::new(0);

fn inproc(what: &str) -> String {
    format!(
        "inproc://f2b-monitor-{what}-{}-{}",
        std::process::id(),
        LINK_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The sender's side: hands each new REQ socket's monitor to the watcher.
/// Dropping it stops the watcher.
pub struct Link {
    ctx: zmq::Context,
    monitors: mpsc::Sender<zmq::Socket>,
    /// Wakes the watcher: a new monitor is in `monitors` (`b"new"`), or the
    /// sender is gone (`b"bye"`).
    poke: zmq::Socket,
    /// The last report went unanswered (its ACK timeout expired).
    unanswered: Arc<AtomicBool>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("unanswered", &self.unanswered)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Starts the watcher thread, which keeps `answering` until `shutdown` or
    /// until the returned [`Link`] is dropped. Call inside the tokio runtime.
    /// `None`, with a warning, if it cannot: readiness then follows the replies
    /// alone.
    pub fn start(
        ctx: &zmq::Context,
        answering: Condition,
        shutdown: CancellationToken,
    ) -> Option<Link> {
        match Link::try_start(ctx, answering, shutdown) {
            Ok(link) => Some(link),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot watch the connection to the publisher: readiness follows its replies only"
                );
                None
            }
        }
    }

    fn try_start(
        ctx: &zmq::Context,
        answering: Condition,
        shutdown: CancellationToken,
    ) -> std::io::Result<Link> {
        let name = inproc("link");
        let wake = ctx.socket(zmq::PAIR)?;
        wake.set_linger(0)?;
        wake.bind(&name)?;
        let poke = ctx.socket(zmq::PAIR)?;
        poke.set_linger(0)?;
        poke.connect(&name)?;
        let stop = shutdown_socket(ctx, shutdown)?;
        let (monitors, rx) = mpsc::channel();
        let unanswered = Arc::new(AtomicBool::new(false));
        let watcher = Watcher {
            wake,
            stop,
            monitors: rx,
            answering,
            unanswered: unanswered.clone(),
        };
        std::thread::Builder::new()
            .name("f2b-monitor-link".into())
            .spawn(move || watcher.run())?;
        Ok(Link {
            ctx: ctx.clone(),
            monitors,
            poke,
            unanswered,
        })
    }

    /// Watches `req`'s connections; call before `req` connects. A failure is
    /// logged (debug) and leaves readiness to the replies.
    pub fn attach(&self, req: &zmq::Socket) {
        if let Err(e) = self.try_attach(req) {
            tracing::debug!(error = %e, "cannot monitor the REQ socket");
        }
    }

    fn try_attach(&self, req: &zmq::Socket) -> zmq::Result<()> {
        let name = inproc("req");
        let events = i32::from(zmq::SocketEvent::HANDSHAKE_SUCCEEDED.to_raw())
            | i32::from(zmq::SocketEvent::DISCONNECTED.to_raw());
        req.monitor(&name, events)?;
        let pair = self.ctx.socket(zmq::PAIR)?;
        pair.set_linger(0)?;
        pair.connect(&name)?;
        if self.monitors.send(pair).is_ok() {
            self.poke.send("new", zmq::DONTWAIT)?;
        }
        Ok(())
    }

    /// Whether the last report went unanswered (set on an ACK timeout, cleared
    /// on a reply).
    pub fn set_unanswered(&self, unanswered: bool) {
        self.unanswered.store(unanswered, Ordering::Relaxed);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.poke.send("bye", zmq::DONTWAIT);
    }
}

/// The unit's STATUS= line (systemd, `systemctl status`) on a connection
/// change, `reporting to ENDPOINT: what`; a connection event is rare, never per
/// report.
fn link_status(frames: &[Vec<u8>], what: &str) {
    let endpoint = frames
        .get(1)
        .map(|e| String::from_utf8_lossy(e))
        .unwrap_or_default();
    f2b_common::daemon::notify_status(&format!("reporting to {endpoint}: {what}"));
}

struct Watcher {
    wake: zmq::Socket,
    stop: zmq::Socket,
    monitors: mpsc::Receiver<zmq::Socket>,
    answering: Condition,
    unanswered: Arc<AtomicBool>,
}

impl Watcher {
    fn run(self) {
        let mut current: Option<zmq::Socket> = None;
        loop {
            let mut items = vec![
                self.wake.as_poll_item(zmq::POLLIN),
                self.stop.as_poll_item(zmq::POLLIN),
            ];
            if let Some(m) = &current {
                items.push(m.as_poll_item(zmq::POLLIN));
            }
            match zmq::poll(&mut items, -1) {
                // Interrupted by a signal: poll again.
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "link watcher: poll failed, stopping");
                    return;
                }
                Ok(_) => {}
            }
            let (woken, stopped) = (items[0].is_readable(), items[1].is_readable());
            let event = items.get(2).is_some_and(|i| i.is_readable());
            drop(items);
            if stopped {
                return;
            }
            // Events of the socket being replaced first, in order.
            if event {
                if let Some(m) = &current {
                    self.read_events(m);
                }
            }
            if woken {
                while let Ok(msg) = self.wake.recv_bytes(zmq::DONTWAIT) {
                    if msg == b"bye" {
                        return;
                    }
                }
                while let Ok(m) = self.monitors.try_recv() {
                    // Earlier events of the old socket are no longer news.
                    current = Some(m);
                }
            }
        }
    }

    fn read_events(&self, monitor: &zmq::Socket) {
        while let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) {
            let Some(head) = frames.first() else { continue };
            let (Some(&a), Some(&b)) = (head.first(), head.get(1)) else {
                continue;
            };
            // The event number, 16 bits in native byte order.
            let event = u16::from_ne_bytes([a, b]);
            if event == zmq::SocketEvent::HANDSHAKE_SUCCEEDED.to_raw() {
                if !self.unanswered.load(Ordering::Relaxed) {
                    self.answering.set(true);
                    // An ACK timeout at this very moment wins.
                    if self.unanswered.load(Ordering::Relaxed) {
                        self.answering.set(false);
                    }
                }
                link_status(&frames, "connected");
            } else if event == zmq::SocketEvent::DISCONNECTED.to_raw() {
                self.answering.set(false);
                link_status(&frames, "disconnected, reports wait in the queue");
            }
        }
    }
}
