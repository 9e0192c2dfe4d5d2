//! ZeroMQ socket setup: every socket the daemons open goes through [`new_socket`],
//! so every one has a maximum message size, high-water marks, ZMTP heartbeats, TCP
//! keepalive and bounded reconnect intervals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Messages queued per peer before a socket drops (PUB) or blocks (REQ, SUB) them.
pub const HWM: i32 = 10_000;
/// ZMTP PING interval on every connection.
pub const ZMTP_HEARTBEAT_IVL: Duration = Duration::from_secs(1);
/// A connection with no traffic (PONG included) for this long is closed, and a
/// connecting socket reconnects.
pub const ZMTP_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// First reconnect delay after a lost connection.
pub const RECONNECT_IVL: Duration = Duration::from_millis(100);
/// Upper bound of the exponential reconnect delay.
pub const RECONNECT_IVL_MAX: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

/// Creates a socket of `kind` with the project's limits set.
pub fn new_socket(ctx: &zmq::Context, kind: zmq::SocketType) -> zmq::Result<zmq::Socket> {
    let s = ctx.socket(kind)?;
    s.set_maxmsgsize(f2b_proto::MAX_MESSAGE_SIZE as i64)?;
    s.set_sndhwm(HWM)?;
    s.set_rcvhwm(HWM)?;
    s.set_linger(0)?;
    s.set_heartbeat_ivl(ms(ZMTP_HEARTBEAT_IVL))?;
    s.set_heartbeat_timeout(ms(ZMTP_HEARTBEAT_TIMEOUT))?;
    s.set_heartbeat_ttl(ms(ZMTP_HEARTBEAT_TIMEOUT))?;
    s.set_tcp_keepalive(1)?;
    s.set_reconnect_ivl(ms(RECONNECT_IVL))?;
    s.set_reconnect_ivl_max(ms(RECONNECT_IVL_MAX))?;
    Ok(s)
}

/// The endpoint a socket really bound (with the port the system chose for `*`).
pub fn last_endpoint(s: &zmq::Socket) -> String {
    match s.get_last_endpoint() {
        Ok(Ok(e)) => e,
        Ok(Err(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<unknown: {e}>"),
    }
}

static WAKER_ID: AtomicU64 = AtomicU64::new(0);

/// A socket that becomes readable when `token` is cancelled, so a thread blocked in
/// `zmq::poll` on its other sockets wakes up at once on shutdown instead of polling a
/// flag. Must be called inside a tokio runtime (a task forwards the cancellation).
pub fn shutdown_socket(ctx: &zmq::Context, token: CancellationToken) -> zmq::Result<zmq::Socket> {
    let name = format!(
        "inproc://f2b-shutdown-{}-{}",
        std::process::id(),
        WAKER_ID.fetch_add(1, Ordering::Relaxed)
    );
    let rx = ctx.socket(zmq::PAIR)?;
    rx.set_linger(0)?;
    rx.bind(&name)?;
    let tx = ctx.socket(zmq::PAIR)?;
    tx.set_linger(0)?;
    tx.set_sndhwm(1)?;
    tx.connect(&name)?;
    tokio::spawn(async move {
        token.cancelled().await;
        // Never block a runtime worker: if the receiving side is already gone (its
        // thread finished first), or the one-message queue is already full, there
        // is nobody left to wake.
        let _ = tx.send("", zmq::DONTWAIT);
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_socket_wakes_poll() {
        let ctx = zmq::Context::new();
        let token = CancellationToken::new();
        let rx = shutdown_socket(&ctx, token.clone()).unwrap();
        let waiter = tokio::task::spawn_blocking(move || {
            let mut items = [rx.as_poll_item(zmq::POLLIN)];
            zmq::poll(&mut items, 10_000).unwrap();
            items[0].is_readable()
        });
        token.cancel();
        assert!(waiter.await.unwrap());
    }

    /// The receiving side may be dropped before shutdown (its thread ended first):
    /// cancelling must then neither block a runtime worker nor hang the runtime's
    /// shutdown.
    #[test]
    fn cancel_after_the_receiver_is_gone_does_not_hang() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let ctx = zmq::Context::new();
        let token = CancellationToken::new();
        runtime.block_on(async {
            let rx = shutdown_socket(&ctx, token.clone()).unwrap();
            drop(rx);
            token.cancel();
            // Give the forwarding task its turn on the single worker.
            tokio::task::yield_now().await;
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                tokio::task::yield_now().await;
            })
            .await
            .unwrap();
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(runtime);
            let _ = done_tx.send(());
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the runtime shut down");
    }

    #[test]
    fn sockets_carry_limits() {
        let ctx = zmq::Context::new();
        let s = new_socket(&ctx, zmq::PUB).unwrap();
        assert_eq!(
            s.get_maxmsgsize().unwrap(),
            f2b_proto::MAX_MESSAGE_SIZE as i64
        );
        assert_eq!(s.get_sndhwm().unwrap(), HWM);
        s.bind("tcp://127.0.0.1:*").unwrap();
        assert!(last_endpoint(&s).starts_with("tcp://127.0.0.1:"));
    }
}
