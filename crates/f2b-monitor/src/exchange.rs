//! One report and its reply, as both the daemon's sender ([`crate::send`]) and
//! `f2b-monitor send` ([`crate::manual`]) speak them: signing the request with this
//! node's [`Credential`], reading a bounded number of reply frames, and deciding
//! what a reply may be trusted for.
//!
//! With a credential a report is two frames: the payload, then
//! [`RequestAuth`] (this node's name, the time, a fresh random nonce and the
//! HMAC), signed anew for every send, resends included. The publisher answers with
//! the reply payload and a MAC bound to the request's MAC
//! ([`f2b_proto::auth::reply_mac`]). A reply without a valid MAC is not
//! trusted ([`Received::NotAuthentic`]), with one exception: a NAK `unauthenticated`
//! or `replayed`, which a publisher that does not know this node's key cannot sign;
//! it is taken only for what it is, "not now" ([`Received::UnverifiedNak`]), never as
//! an ACK and never as a reason to drop an event.

use std::fmt;

use f2b_common::zmq;
use f2b_proto::auth::{self, MonitorSecret, RequestAuth, MAC_LEN, NONCE_LEN};
use f2b_proto::{Nak, NakReason, NodeName, Reply, MAX_FRAMES};

/// This node's credential: the name it reports as (the node name) and the secret
/// it shares with the publisher (`[trust] secret` or `secret_file`). Debug output
/// masks the secret.
#[derive(Clone)]
pub struct Credential {
    /// The credential's name: this node's name.
    pub key: NodeName,
    pub secret: MonitorSecret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("key", &self.key)
            .field("secret", &self.secret)
            .finish()
    }
}

/// The frames of one send of a report, and the MAC its reply is bound to.
#[derive(Debug)]
pub(crate) struct Signed {
    pub frames: Vec<Vec<u8>>,
    pub mac: Option<[u8; MAC_LEN]>,
}

/// Signs `payload` for one send: a fresh nonce and the current time. Without a
/// credential, the payload alone. Fails only if the system has no randomness.
pub(crate) fn sign(credential: Option<&Credential>, payload: &[u8]) -> Result<Signed, String> {
    let Some(c) = credential else {
        return Ok(Signed {
            frames: vec![payload.to_vec()],
            mac: None,
        });
    };
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| format!("no random nonce: {e}"))?;
    let a = RequestAuth::sign(&c.secret, &c.key, crate::now_ms(), nonce, payload);
    Ok(Signed {
        frames: vec![payload.to_vec(), a.encode()],
        mac: Some(a.mac),
    })
}

/// Reads one whole message from `sock` without waiting (call when it is
/// readable): at most [`MAX_FRAMES`] frames are kept, the rest are read and
/// counted. Returns the frames kept and how many there were in all.
pub(crate) fn recv_frames(sock: &zmq::Socket) -> zmq::Result<(Vec<Vec<u8>>, usize)> {
    let mut frames = Vec::new();
    let mut total = 0;
    loop {
        let frame = sock.recv_bytes(zmq::DONTWAIT)?;
        total += 1;
        if frames.len() < MAX_FRAMES {
            frames.push(frame);
        }
        if !sock.get_rcvmore()? {
            return Ok((frames, total));
        }
    }
}

/// What a native reply may be trusted for.
#[derive(Debug)]
pub(crate) enum Received {
    /// Authentic (or no credential is used: nothing to check).
    Trusted(Reply),
    /// A NAK `unauthenticated` or `replayed` with no valid MAC: the publisher may
    /// not know this node's key, so it cannot sign it. Good only for "retry later".
    UnverifiedNak(Nak),
    /// A reply that failed authentication: why.
    NotAuthentic(String),
    /// Not a reply: why.
    Unreadable(String),
    /// A bare `NAK`, one frame: an old fail2ban-zmq-tools publisher. It can only
    /// make the sender wait, so it needs no MAC.
    OldPublisher,
}

/// Classifies a reply's `frames` (`total` of them on the wire) to a request
/// signed with `request_mac` (`None`: sent without a credential).
pub(crate) fn classify(
    credential: Option<&Credential>,
    request_mac: Option<&[u8; MAC_LEN]>,
    frames: &[Vec<u8>],
    total: usize,
) -> Received {
    let Some(payload) = frames.first() else {
        return Received::Unreadable("an empty reply".into());
    };
    if total == 1 && payload.trim_ascii() == b"NAK" {
        return Received::OldPublisher;
    }
    let reply = match Reply::decode(payload) {
        Ok(r) => r,
        Err(e) => return Received::Unreadable(format!("unreadable reply: {e}")),
    };
    let (Some(c), Some(mac)) = (credential, request_mac) else {
        return Received::Trusted(reply);
    };
    let why = match (total, frames.get(1)) {
        (2, Some(frame)) if auth::verify_reply(&c.secret, mac, payload, frame) => {
            return Received::Trusted(reply);
        }
        (2, Some(_)) => "wrong reply MAC".to_owned(),
        (1, _) => "no reply MAC".to_owned(),
        (n, _) => format!("{n} frames instead of 2"),
    };
    match reply {
        Reply::Nak(nak)
            if matches!(nak.reason, NakReason::Unauthenticated | NakReason::Replayed) =>
        {
            Received::UnverifiedNak(nak)
        }
        _ => Received::NotAuthentic(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::{Ack, AckStatus, EventId};

    fn cred(c: char) -> Credential {
        Credential {
            key: NodeName::new("web1").unwrap(),
            secret: MonitorSecret::new(&c.to_string().repeat(40)).unwrap(),
        }
    }

    fn ack() -> Vec<u8> {
        Reply::Ack(Ack {
            id: EventId::from_u128(1),
            seq: Some(1),
            status: AckStatus::Broadcast,
        })
        .encode()
    }

    #[test]
    fn signed_frames_verify_and_nonces_differ() {
        let c = cred('a');
        let a = sign(Some(&c), b"payload").unwrap();
        let b = sign(Some(&c), b"payload").unwrap();
        assert_eq!(a.frames.len(), 2);
        let (ra, rb) = (
            RequestAuth::decode(&a.frames[1]).unwrap(),
            RequestAuth::decode(&b.frames[1]).unwrap(),
        );
        assert!(ra.verify(&c.secret, b"payload"));
        assert_ne!(ra.nonce, rb.nonce);
        assert_eq!(Some(ra.mac), a.mac);
        let none = sign(None, b"payload").unwrap();
        assert_eq!((none.frames.len(), none.mac), (1, None));
        // The secret is never in the frames nor in Debug output.
        let text = format!("{c:?} {:?}", String::from_utf8_lossy(&a.frames[1]));
        assert!(!text.contains("aaaa"), "{text}");
    }

    #[test]
    fn only_a_right_mac_makes_a_reply_trusted() {
        let c = cred('a');
        let mac = [7u8; MAC_LEN];
        let good = auth::reply_mac(&c.secret, &mac, &ack()).to_vec();
        let other = auth::reply_mac(&cred('b').secret, &mac, &ack()).to_vec();
        let trusted = |frames: &[Vec<u8>]| classify(Some(&c), Some(&mac), frames, frames.len());
        assert!(matches!(
            trusted(&[ack(), good.clone()]),
            Received::Trusted(_)
        ));
        assert!(matches!(trusted(&[ack()]), Received::NotAuthentic(w) if w == "no reply MAC"));
        assert!(
            matches!(trusted(&[ack(), other]), Received::NotAuthentic(w) if w == "wrong reply MAC")
        );
        assert!(matches!(
            trusted(&[ack(), good.clone(), good]),
            Received::NotAuthentic(_)
        ));
        // Without a credential nothing is checked.
        assert!(matches!(
            classify(None, None, &[ack()], 1),
            Received::Trusted(_)
        ));
        // Unauthenticated and replayed NAKs pass unverified; no other NAK does.
        for (reason, unverified) in [
            (NakReason::Unauthenticated, true),
            (NakReason::Replayed, true),
            (NakReason::Quarantined, false),
            (NakReason::InvalidIp, false),
        ] {
            let nak = Reply::Nak(Nak::new(None, reason, "x")).encode();
            let r = trusted(&[nak]);
            assert_eq!(
                matches!(r, Received::UnverifiedNak(_)),
                unverified,
                "{reason}: {r:?}"
            );
        }
        assert!(matches!(
            trusted(&[b"NAK".to_vec()]),
            Received::OldPublisher
        ));
        assert!(matches!(trusted(&[b"{".to_vec()]), Received::Unreadable(_)));
        assert!(matches!(trusted(&[]), Received::Unreadable(_)));
    }
}
