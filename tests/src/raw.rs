//! Talking to a publisher without the daemons: raw ZeroMQ requests with any bytes,
//! and a hand-written ZMTP 3.0 peer that announces an enormous frame.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use f2b_proto::auth::{MonitorSecret, RequestAuth};
use f2b_proto::{Nak, Reply};
use serde_json::{json, Value};

/// How long a raw request waits for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A valid report, as JSON, for tests to spoil one field at a time.
pub fn report(id: &str, node: &str, jail: &str, action: &str, ip: &str) -> Value {
    json!({
        "v": 1,
        "type": "report",
        "event": {
            "id": id,
            "node": node,
            "jail": jail,
            "action": action,
            "ip": ip,
            "time_ms": now_ms(),
        }
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(d.as_millis()).expect("fits")
}

/// Sends one request made of `frames` on a fresh REQ socket connected to `endpoint`
/// and returns the reply's frames. Panics when no reply comes within 15 s.
pub fn request_frames(endpoint: &str, frames: &[&[u8]]) -> Vec<Vec<u8>> {
    let ctx = zmq::Context::new();
    let s = ctx.socket(zmq::REQ).expect("REQ socket");
    s.set_linger(0).expect("linger");
    s.set_rcvtimeo(i32::try_from(REPLY_TIMEOUT.as_millis()).expect("fits"))
        .expect("rcvtimeo");
    s.set_sndtimeo(5_000).expect("sndtimeo");
    s.connect(endpoint).expect("connect");
    s.send_multipart(frames.iter().copied(), 0)
        .unwrap_or_else(|e| panic!("send to {endpoint}: {e}"));
    s.recv_multipart(0)
        .unwrap_or_else(|e| panic!("no reply from {endpoint} within {REPLY_TIMEOUT:?}: {e}"))
}

/// Sends one single-frame request and returns the one-frame reply.
pub fn request(endpoint: &str, payload: &[u8]) -> Vec<u8> {
    let mut frames = request_frames(endpoint, &[payload]);
    assert_eq!(frames.len(), 1, "a reply has one frame");
    frames.pop().expect("one frame")
}

/// Sends `payload` and decodes the reply, which must be a NAK.
pub fn expect_nak(endpoint: &str, payload: &[u8]) -> Nak {
    let reply = request(endpoint, payload);
    match Reply::decode(&reply) {
        Ok(Reply::Nak(n)) => n,
        other => panic!(
            "expected a NAK for {:?}, got {other:?} ({:?})",
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&reply)
        ),
    }
}

/// Sends `payload` with an auth frame signed as `node` with `secret` (now, fresh
/// nonce) and returns the reply's frames and the auth frame sent.
pub fn signed_request(
    endpoint: &str,
    payload: &[u8],
    node: &str,
    secret: &MonitorSecret,
) -> (Vec<Vec<u8>>, RequestAuth) {
    let auth = crate::trust::sign(secret, node, payload);
    let frames = request_frames(endpoint, &[payload, &auth.encode()]);
    (frames, auth)
}

/// Sends a signed request (see [`signed_request`]) and decodes the reply; when it
/// carries a MAC frame, asserts that the MAC is right.
pub fn signed_reply(endpoint: &str, payload: &[u8], node: &str, secret: &MonitorSecret) -> Reply {
    let (frames, auth) = signed_request(endpoint, payload, node, secret);
    assert!(
        (1..=2).contains(&frames.len()),
        "a reply to a signed request has one or two frames: {frames:?}"
    );
    if let Some(mac) = frames.get(1) {
        assert!(
            crate::trust::reply_mac_ok(secret, &auth, &frames[0], mac),
            "wrong reply MAC for {:?}",
            String::from_utf8_lossy(&frames[0])
        );
    }
    Reply::decode(&frames[0]).unwrap_or_else(|e| {
        panic!(
            "undecodable reply {:?}: {e}",
            String::from_utf8_lossy(&frames[0])
        )
    })
}

/// The ZMTP 3.0 greeting of a client using the NULL mechanism.
fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3; // version 3.0
    g[12..16].copy_from_slice(b"NULL");
    // g[32] = 0: not as-server; the rest is filler.
    g
}

/// A READY command announcing `socket_type`.
fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    let name = b"Socket-Type";
    body.push(u8::try_from(name.len()).expect("short"));
    body.extend_from_slice(name);
    body.extend_from_slice(
        &u32::try_from(socket_type.len())
            .expect("short")
            .to_be_bytes(),
    );
    body.extend_from_slice(socket_type.as_bytes());
    let mut frame = vec![0x04, u8::try_from(body.len()).expect("short command")];
    frame.extend_from_slice(&body);
    frame
}

/// Connects to `endpoint` (`tcp://host:port`) with a raw TCP stream, completes the
/// ZMTP 3.0 handshake as a `socket_type` peer ("REQ" for the reply port, "SUB" for the
/// broadcast port), then sends the header of a message frame of 2^40 bytes (1 TiB)
/// and a few bytes of it. Returns how long the peer took to close the connection;
/// panics when it keeps it open for 15 s (it would be buffering the frame).
pub fn announce_huge_frame(endpoint: &str, socket_type: &str) -> Duration {
    announce_frame(endpoint, socket_type, 1u64 << 40, &[0x41; 64])
}

/// Like [`announce_huge_frame`], with a message frame announcing `len` bytes of
/// which `body` is sent (all of them for a frame just past a size limit). Returns
/// how long the peer took to close the connection; panics when it keeps it open.
pub fn announce_frame(endpoint: &str, socket_type: &str, len: u64, body: &[u8]) -> Duration {
    let addr = endpoint
        .strip_prefix("tcp://")
        .unwrap_or_else(|| panic!("not a tcp endpoint: {endpoint}"));
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("write timeout");
    s.write_all(&greeting()).expect("send greeting");
    let mut peer = [0u8; 64];
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut got = 0;
    while got < peer.len() {
        match s.read(&mut peer[got..]) {
            Ok(0) => panic!("{endpoint} closed the connection during the greeting"),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(
                    Instant::now() < deadline,
                    "no ZMTP greeting from {endpoint}"
                );
            }
            Err(e) => panic!("greeting from {endpoint}: {e}"),
        }
    }
    assert_eq!(peer[0], 0xff, "not a ZMTP peer: {peer:?}");
    assert_eq!(peer[10], 3, "not ZMTP 3: {peer:?}");
    s.write_all(&ready(socket_type)).expect("send READY");
    let mut header = vec![0x02u8]; // a long message frame, no more frames
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(body);
    let sent = Instant::now();
    // The peer may already have dropped the connection.
    let _ = s.write_all(&header);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return sent.elapsed(),
            // Its READY, heartbeats: keep reading.
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return sent.elapsed()
            }
            Err(e) => panic!("reading from {endpoint}: {e}"),
        }
        if sent.elapsed() > REPLY_TIMEOUT {
            panic!(
                "{endpoint} kept the connection open {REPLY_TIMEOUT:?} after a frame header \
                 of {len} bytes: it is not enforcing its maximum message size"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_and_ready_have_the_zmtp_layout() {
        let g = greeting();
        assert_eq!(&g[..2], &[0xff, 0]);
        assert_eq!(g[9], 0x7f);
        assert_eq!(&g[10..16], &[3, 0, b'N', b'U', b'L', b'L']);
        let r = ready("REQ");
        assert_eq!(r[0], 0x04);
        assert_eq!(usize::from(r[1]), r.len() - 2);
        assert_eq!(&r[2..8], b"\x05READY");
        assert!(r.ends_with(b"\x0bSocket-Type\x00\x00\x00\x03REQ"));
    }

    /// The hand-written peer against a real libzmq socket with the project's limits:
    /// libzmq must drop the connection, and the socket keep working.
    #[test]
    fn a_socket_with_project_limits_drops_a_huge_frame() {
        let ctx = zmq::Context::new();
        let rep = f2b_common::sockets::new_socket(&ctx, zmq::REP).unwrap();
        rep.bind("tcp://127.0.0.1:*").unwrap();
        let endpoint = f2b_common::sockets::last_endpoint(&rep);
        let took = announce_huge_frame(&endpoint, "REQ");
        assert!(took < Duration::from_secs(10));
        let replier = std::thread::spawn(move || {
            let msg = rep.recv_bytes(0).unwrap();
            rep.send(&msg, 0).unwrap();
        });
        assert_eq!(request(&endpoint, b"still here"), b"still here");
        replier.join().unwrap();
    }

    #[test]
    fn reports_are_valid_requests() {
        let r = report(
            "6f9619ff-8b86-d011-b42d-00cf4fc964ff",
            "web1",
            "sshd",
            "ban",
            "203.0.113.5",
        );
        let bytes = serde_json::to_vec(&r).unwrap();
        assert!(f2b_proto::Request::decode(&bytes).is_ok());
    }
}
