//! Authentication: monitors' HMAC credentials and the publisher's Ed25519 signatures.
//!
//! - A monitor proves who it is with a secret it shares with the publisher
//!   ([`MonitorSecret`]): each report carries a second frame, [`RequestAuth`], with
//!   the credential's name (the node name), a timestamp, a random nonce and an
//!   HMAC-SHA256 over all of them and the payload. The secret never travels.
//!   The publisher answers with the reply payload and [`reply_mac`], which binds the
//!   reply to the request's MAC, so a monitor can tell a real ACK from a forged one.
//! - The publisher signs every broadcast ([`sign_broadcast`]) and every snapshot
//!   reply ([`sign_snapshot`], bound to the exact request bytes, which carry a fresh
//!   nonce) with its [`SigningKey`]; subscribers hold its [`PublicKey`].
//!
//! Every MAC and signature input starts with a domain string (`f2b-cluster/1 ...\0`),
//! so no message of one kind can be passed off as another. Like the rest of the
//! crate this does no I/O: the caller supplies the time, the nonce and the key seed.
//! docs/PROTOCOL.md ("Authentication") is the specification.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

use crate::error::ProtoError;
use crate::wire::{shown, to_bytes, Obj};
use crate::{NodeName, PROTOCOL_VERSION};

type HmacSha256 = Hmac<Sha256>;

/// The shortest monitor secret accepted, in bytes. Generated secrets are the base64
/// form of 32 random bytes (44 characters).
pub const MIN_SECRET_LEN: usize = 32;

/// The longest monitor secret accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 1024;

/// The length of a request nonce, in bytes (sent as 32 hex digits).
pub const NONCE_LEN: usize = 16;

/// The length of an HMAC-SHA256 tag, in bytes.
pub const MAC_LEN: usize = 32;

/// The length of an Ed25519 signature, in bytes (the signature frame).
pub const SIGNATURE_LEN: usize = 64;

/// The prefix of a public key's text form.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";

/// The prefix of a signing key file's text.
pub const SIGNING_KEY_PREFIX: &str = "ed25519-secret:";

const REQUEST_DOMAIN: &[u8] = b"f2b-cluster/1 request\0";
const REPLY_DOMAIN: &[u8] = b"f2b-cluster/1 reply\0";
const BROADCAST_DOMAIN: &[u8] = b"f2b-cluster/1 broadcast\0";
const SNAPSHOT_DOMAIN: &[u8] = b"f2b-cluster/1 snapshot\0";

/// Why a key or secret text was refused. The message never quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("a monitor secret must be at least {MIN_SECRET_LEN} bytes long (it is {len}); generate one with `f2b-publisher keygen --monitor NODE`")]
    SecretTooShort { len: usize },
    #[error("a monitor secret must be at most {MAX_SECRET_LEN} bytes long (it is {len})")]
    SecretTooLong { len: usize },
    #[error("a monitor secret must be printable ASCII without spaces")]
    SecretCharacters,
    #[error("a public key is written \"ed25519:\" followed by the base64 form of 32 bytes, as `f2b-publisher keygen` prints it")]
    PublicKeyForm,
    #[error("not a valid Ed25519 public key")]
    PublicKeyInvalid,
    #[error("a signing key file holds one line, \"ed25519-secret:\" followed by the base64 form of 32 bytes, as `f2b-publisher keygen` writes it")]
    SigningKeyForm,
}

/// A monitor's credential: the secret it shares with the publisher. Printable ASCII,
/// [`MIN_SECRET_LEN`] to [`MAX_SECRET_LEN`] bytes; its bytes are the HMAC key. Debug
/// output is masked.
#[derive(Clone, PartialEq, Eq)]
pub struct MonitorSecret(Vec<u8>);

impl MonitorSecret {
    /// Checks a secret's text (surrounding white space, such as a file's final
    /// newline, is removed first).
    pub fn new(text: &str) -> Result<MonitorSecret, KeyError> {
        let t = text.trim();
        if t.len() < MIN_SECRET_LEN {
            return Err(KeyError::SecretTooShort { len: t.len() });
        }
        if t.len() > MAX_SECRET_LEN {
            return Err(KeyError::SecretTooLong { len: t.len() });
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::SecretCharacters);
        }
        Ok(MonitorSecret(t.as_bytes().to_vec()))
    }

    /// A new secret from 32 random bytes (the caller draws them): their base64 form.
    pub fn from_random(bytes: [u8; 32]) -> MonitorSecret {
        MonitorSecret(BASE64.encode(bytes).into_bytes())
    }

    /// The secret's text, to write into a file or a config. Handle with care.
    pub fn expose(&self) -> &str {
        // Only ever built from checked ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length.
        HmacSha256::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl fmt::Debug for MonitorSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MonitorSecret(****)")
    }
}

/// The authentication frame of a report (the request's second frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    /// The credential's name: the reporting node's name.
    pub key: NodeName,
    /// When the monitor signed the request, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Random, fresh for every request sent (a resend is signed anew).
    pub nonce: [u8; NONCE_LEN],
    /// HMAC-SHA256 over the domain, `key`, `ts_ms`, `nonce` and the payload frame.
    pub mac: [u8; MAC_LEN],
}

impl RequestAuth {
    /// Signs `payload` (the request frame exactly as sent).
    pub fn sign(
        secret: &MonitorSecret,
        key: &NodeName,
        ts_ms: u64,
        nonce: [u8; NONCE_LEN],
        payload: &[u8],
    ) -> RequestAuth {
        let mut m = secret.mac();
        feed_request(&mut m, key, ts_ms, &nonce, payload);
        RequestAuth {
            key: key.clone(),
            ts_ms,
            nonce,
            mac: m.finalize().into_bytes().into(),
        }
    }

    /// Whether `mac` is right for `payload` under `secret` (compared in constant
    /// time). The caller checks the time window and the nonce.
    pub fn verify(&self, secret: &MonitorSecret, payload: &[u8]) -> bool {
        let mut m = secret.mac();
        feed_request(&mut m, &self.key, self.ts_ms, &self.nonce, payload);
        m.verify_slice(&self.mac).is_ok()
    }

    /// The frame.
    pub fn encode(&self) -> Vec<u8> {
        to_bytes(json!({
            "v": PROTOCOL_VERSION,
            "type": "auth",
            "key": self.key.as_str(),
            "ts_ms": self.ts_ms,
            "nonce": hex::encode(self.nonce),
            "mac": hex::encode(self.mac),
        }))
    }

    /// Reads an authentication frame. Never trusts it: [`RequestAuth::verify`] does.
    pub fn decode(bytes: &[u8]) -> Result<RequestAuth, ProtoError> {
        let (obj, kind) = Obj::parse_message(bytes)?;
        if kind != "auth" {
            return Err(ProtoError::UnknownType {
                found: shown(&kind),
            });
        }
        let key = NodeName::new(obj.str("key")?)?;
        // Any time decodes; the publisher refuses one outside its window `replayed`.
        let ts_ms = obj.time("ts_ms")?;
        let nonce = fixed_hex::<NONCE_LEN>(&obj, "nonce")?;
        let mac = fixed_hex::<MAC_LEN>(&obj, "mac")?;
        Ok(RequestAuth {
            key,
            ts_ms,
            nonce,
            mac,
        })
    }
}

fn feed_request(m: &mut HmacSha256, key: &NodeName, ts_ms: u64, nonce: &[u8], payload: &[u8]) {
    m.update(REQUEST_DOMAIN);
    m.update(key.as_str().as_bytes());
    m.update(b"\0");
    m.update(ts_ms.to_string().as_bytes());
    m.update(b"\0");
    m.update(hex::encode(nonce).as_bytes());
    m.update(b"\0");
    m.update(payload);
}

pub(crate) fn nonce_field(obj: &Obj, field: &'static str) -> Result<[u8; NONCE_LEN], ProtoError> {
    fixed_hex::<NONCE_LEN>(obj, field)
}

fn fixed_hex<const N: usize>(obj: &Obj, field: &'static str) -> Result<[u8; N], ProtoError> {
    let text = obj.str(field)?;
    let mut out = [0u8; N];
    if text.len() != 2 * N
        || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        || hex::decode_to_slice(text, &mut out).is_err()
    {
        return Err(ProtoError::WrongType {
            field,
            expected: if N == NONCE_LEN {
                "32 lower-case hex digits"
            } else {
                "64 lower-case hex digits"
            },
        });
    }
    Ok(out)
}

/// The MAC frame of a reply to an authenticated request: binds `reply` (the reply
/// payload as sent) to the request's MAC, under the monitor's secret.
pub fn reply_mac(
    secret: &MonitorSecret,
    request_mac: &[u8; MAC_LEN],
    reply: &[u8],
) -> [u8; MAC_LEN] {
    let mut m = secret.mac();
    m.update(REPLY_DOMAIN);
    m.update(request_mac);
    m.update(reply);
    m.finalize().into_bytes().into()
}

/// Whether `frame` is the right reply MAC (constant-time comparison).
pub fn verify_reply(
    secret: &MonitorSecret,
    request_mac: &[u8; MAC_LEN],
    reply: &[u8],
    frame: &[u8],
) -> bool {
    let mut m = secret.mac();
    m.update(REPLY_DOMAIN);
    m.update(request_mac);
    m.update(reply);
    m.verify_slice(frame).is_ok()
}

/// The publisher's Ed25519 public key; text form `ed25519:<base64 of 32 bytes>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        let b64 = s
            .trim()
            .strip_prefix(PUBLIC_KEY_PREFIX)
            .ok_or(KeyError::PublicKeyForm)?;
        let bytes: [u8; 32] = BASE64
            .decode(b64)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(KeyError::PublicKeyForm)?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::PublicKeyInvalid)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", BASE64.encode(self.0.to_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The publisher's Ed25519 signing key. Debug output is masked.
#[derive(Clone)]
pub struct SigningKey(ed25519_dalek::SigningKey);

impl SigningKey {
    /// The key made from a 32-byte seed (the caller draws it at random).
    pub fn from_seed(seed: [u8; 32]) -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }

    /// Reads a key file's text: one line, `ed25519-secret:<base64 of the seed>`.
    pub fn parse(text: &str) -> Result<SigningKey, KeyError> {
        let b64 = text
            .trim()
            .strip_prefix(SIGNING_KEY_PREFIX)
            .ok_or(KeyError::SigningKeyForm)?;
        let seed: [u8; 32] = BASE64
            .decode(b64)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(KeyError::SigningKeyForm)?;
        Ok(SigningKey::from_seed(seed))
    }

    /// The key file's text (with a final newline). Handle with care.
    pub fn to_file_text(&self) -> String {
        format!("{SIGNING_KEY_PREFIX}{}\n", BASE64.encode(self.0.to_bytes()))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    fn sign(&self, parts: &[&[u8]]) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&parts.concat()).to_bytes()
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &SigningKey) -> bool {
        self.public() == other.public()
    }
}

impl Eq for SigningKey {}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(****, public {})", self.public())
    }
}

fn len_prefix(bytes: &[u8]) -> [u8; 4] {
    // Frames are at most MAX_MESSAGE_SIZE bytes; saturate rather than wrap anyway.
    u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes()
}

/// The signature frame of a broadcast: over its topic frame and payload frame.
pub fn sign_broadcast(key: &SigningKey, topic: &[u8], payload: &[u8]) -> [u8; SIGNATURE_LEN] {
    key.sign(&[BROADCAST_DOMAIN, &len_prefix(topic), topic, payload])
}

/// Whether `signature` is a broadcast signature by one of `keys`.
pub fn verify_broadcast(
    keys: &[PublicKey],
    topic: &[u8],
    payload: &[u8],
    signature: &[u8],
) -> bool {
    verify(
        keys,
        &[BROADCAST_DOMAIN, &len_prefix(topic), topic, payload],
        signature,
    )
}

/// Whether each of `broadcasts` (topic, payload, signature frame) carries a
/// signature by one of `keys`: the same answers as [`verify_broadcast`] on each,
/// in fewer steps. All of them are checked at once as an Ed25519 batch (about
/// half the work per signature for a few dozen), under each key in turn (a
/// subscriber trusting an old and a new key while the publisher's key is
/// replaced); when no batch passes (a bad signature among them, or messages of
/// publishers with different keys), each is checked on its own. For a subscriber
/// that finds several broadcasts waiting.
pub fn verify_broadcasts(keys: &[PublicKey], broadcasts: &[(&[u8], &[u8], &[u8])]) -> Vec<bool> {
    let one =
        |(topic, payload, sig): &(&[u8], &[u8], &[u8])| verify_broadcast(keys, topic, payload, sig);
    if keys.is_empty() {
        return vec![false; broadcasts.len()];
    }
    if broadcasts.len() < 2 {
        return broadcasts.iter().map(one).collect();
    }
    let signatures: Option<Vec<ed25519_dalek::Signature>> = broadcasts
        .iter()
        .map(|(_, _, sig)| ed25519_dalek::Signature::from_slice(sig).ok())
        .collect();
    if let Some(signatures) = signatures {
        let messages: Vec<Vec<u8>> = broadcasts
            .iter()
            .map(|(topic, payload, _)| {
                [BROADCAST_DOMAIN, &len_prefix(topic), topic, payload].concat()
            })
            .collect();
        let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        for key in keys {
            let keys_for = vec![key.0; broadcasts.len()];
            if ed25519_dalek::verify_batch(&messages, &signatures, &keys_for).is_ok() {
                return vec![true; broadcasts.len()];
            }
        }
    }
    broadcasts.iter().map(one).collect()
}

/// The signature frame of a snapshot reply (page or NAK): over the request exactly
/// as received (it carries the subscriber's nonce, so a recorded reply cannot be
/// replayed to another request) and the reply payload.
pub fn sign_snapshot(key: &SigningKey, request: &[u8], reply: &[u8]) -> [u8; SIGNATURE_LEN] {
    key.sign(&[SNAPSHOT_DOMAIN, &len_prefix(request), request, reply])
}

/// Whether `signature` is a snapshot reply signature by one of `keys`.
pub fn verify_snapshot(keys: &[PublicKey], request: &[u8], reply: &[u8], signature: &[u8]) -> bool {
    verify(
        keys,
        &[SNAPSHOT_DOMAIN, &len_prefix(request), request, reply],
        signature,
    )
}

fn verify(keys: &[PublicKey], parts: &[&[u8]], signature: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    let msg = parts.concat();
    keys.iter().any(|k| k.0.verify(&msg, &sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(c: char) -> MonitorSecret {
        MonitorSecret::new(&c.to_string().repeat(40)).unwrap()
    }

    fn node(n: &str) -> NodeName {
        NodeName::new(n).unwrap()
    }

    #[test]
    fn broadcasts_verified_together_get_the_answers_of_each_alone() {
        let key = SigningKey::from_seed([3; 32]);
        let other = SigningKey::from_seed([4; 32]);
        let topics: Vec<Vec<u8>> = (0..40).map(|i| format!("ev:j{i}\0").into_bytes()).collect();
        let payloads: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        let mut sigs: Vec<Vec<u8>> = topics
            .iter()
            .zip(&payloads)
            .map(|(t, p)| sign_broadcast(&key, t, p).to_vec())
            .collect();
        let all = |sigs: &[Vec<u8>], keys: &[PublicKey]| {
            let items: Vec<(&[u8], &[u8], &[u8])> = topics
                .iter()
                .zip(&payloads)
                .zip(sigs)
                .map(|((t, p), s)| (t.as_slice(), p.as_slice(), s.as_slice()))
                .collect();
            let together = verify_broadcasts(keys, &items);
            let alone: Vec<bool> = items
                .iter()
                .map(|(t, p, s)| verify_broadcast(keys, t, p, s))
                .collect();
            assert_eq!(together, alone);
            together
        };
        assert!(all(&sigs, &[key.public()]).iter().all(|&ok| ok));
        // Under another key first, or only another key.
        assert!(all(&sigs, &[other.public(), key.public()])
            .iter()
            .all(|&ok| ok));
        assert!(all(&sigs, &[other.public()]).iter().all(|&ok| !ok));
        assert!(all(&sigs, &[]).iter().all(|&ok| !ok));
        // One signed by another key, one altered, one cut short, one another's
        // message: only those are refused.
        sigs[3] = sign_broadcast(&other, &topics[3], &payloads[3]).to_vec();
        sigs[7][10] ^= 1;
        sigs[11].truncate(63);
        sigs[20] = sigs[21].clone();
        let got = all(&sigs, &[key.public()]);
        let refused: Vec<usize> = (0..40).filter(|&i| !got[i]).collect();
        assert_eq!(refused, [3, 7, 11, 20]);
        // Two keys configured, signatures by both: each accepted.
        let got = all(&sigs, &[key.public(), other.public()]);
        let refused: Vec<usize> = (0..40).filter(|&i| !got[i]).collect();
        assert_eq!(refused, [7, 11, 20]);
        assert!(verify_broadcasts(&[key.public()], &[]).is_empty());
    }

    #[test]
    fn request_auth_round_trips_and_verifies() {
        let s = secret('a');
        let payload = br#"{"v":1,"type":"report"}"#;
        let a = RequestAuth::sign(&s, &node("web1"), 1_700_000_000_000, [7; 16], payload);
        let back = RequestAuth::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        assert!(back.verify(&s, payload));
        // Another secret, another payload, another key name, time or nonce: refused.
        assert!(!back.verify(&secret('b'), payload));
        assert!(!back.verify(&s, br#"{"v":1,"type":"report "}"#));
        for tampered in [
            RequestAuth {
                key: node("web2"),
                ..a.clone()
            },
            RequestAuth {
                ts_ms: a.ts_ms + 1,
                ..a.clone()
            },
            RequestAuth {
                nonce: [8; 16],
                ..a.clone()
            },
        ] {
            assert!(!tampered.verify(&s, payload), "{tampered:?}");
        }
    }

    #[test]
    fn request_auth_decode_names_the_bad_field() {
        let good = RequestAuth::sign(&secret('a'), &node("web1"), 5, [0; 16], b"x");
        let mut v: serde_json::Value = serde_json::from_slice(&good.encode()).unwrap();
        v["mac"] = "ABCD".into();
        let err = RequestAuth::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.to_string().contains("\"mac\""), "{err}");
        v["mac"] = hex::encode([0xabu8; 32]).to_uppercase().into();
        assert!(RequestAuth::decode(&serde_json::to_vec(&v).unwrap()).is_err());
        v["mac"] = hex::encode([0u8; 32]).into();
        v["key"] = "bad name!".into();
        assert!(matches!(
            RequestAuth::decode(&serde_json::to_vec(&v).unwrap()),
            Err(ProtoError::InvalidNode { .. })
        ));
        assert!(RequestAuth::decode(b"{\"v\":1,\"type\":\"report\"}").is_err());
        assert!(RequestAuth::decode(&[0xff; 40]).is_err());
    }

    #[test]
    fn reply_mac_binds_request_and_reply() {
        let s = secret('a');
        let m = reply_mac(&s, &[1; 32], b"ack");
        assert!(verify_reply(&s, &[1; 32], b"ack", &m));
        assert!(!verify_reply(&s, &[2; 32], b"ack", &m));
        assert!(!verify_reply(&s, &[1; 32], b"nak", &m));
        assert!(!verify_reply(&secret('b'), &[1; 32], b"ack", &m));
        assert!(!verify_reply(&s, &[1; 32], b"ack", &m[..31]));
    }

    #[test]
    fn secrets_are_checked_and_masked() {
        assert!(matches!(
            MonitorSecret::new("short"),
            Err(KeyError::SecretTooShort { len: 5 })
        ));
        assert!(matches!(
            MonitorSecret::new(&"a b".repeat(20)),
            Err(KeyError::SecretCharacters)
        ));
        let s = MonitorSecret::new(&format!("{}\n", "x".repeat(32))).unwrap();
        assert_eq!(s.expose(), "x".repeat(32));
        assert!(!format!("{s:?}").contains("xxxx"));
        let r = MonitorSecret::from_random([9; 32]);
        assert_eq!(r.expose().len(), 44);
        assert!(MonitorSecret::new(r.expose()).is_ok());
        for e in [
            KeyError::SecretTooShort { len: 3 },
            KeyError::SecretCharacters,
            KeyError::PublicKeyForm,
            KeyError::SigningKeyForm,
        ] {
            assert!(!e.to_string().contains("xxxx"));
        }
    }

    #[test]
    fn keys_round_trip_through_their_text() {
        let k = SigningKey::from_seed([3; 32]);
        let text = k.to_file_text();
        assert!(text.starts_with("ed25519-secret:") && text.ends_with('\n'));
        let back = SigningKey::parse(&text).unwrap();
        assert_eq!(back.public(), k.public());
        assert!(!format!("{k:?}").contains(text.trim()));
        let p: PublicKey = k.public().to_string().parse().unwrap();
        assert_eq!(p, k.public());
        assert!("ed25519:AAAA".parse::<PublicKey>().is_err());
        assert!(k.public().to_string()[8..].parse::<PublicKey>().is_err());
        assert!(SigningKey::parse("ed25519:AAAA").is_err());
        assert!(SigningKey::parse(&k.public().to_string()).is_err());
    }

    #[test]
    fn broadcast_signatures_cover_topic_and_payload() {
        let k = SigningKey::from_seed([1; 32]);
        let other = SigningKey::from_seed([2; 32]);
        let sig = sign_broadcast(&k, b"ev:sshd\0", b"{}");
        let keys = [other.public(), k.public()];
        assert!(verify_broadcast(&keys, b"ev:sshd\0", b"{}", &sig));
        assert!(!verify_broadcast(
            &[other.public()],
            b"ev:sshd\0",
            b"{}",
            &sig
        ));
        assert!(!verify_broadcast(&keys, b"ev:sshd2\0", b"{}", &sig));
        assert!(!verify_broadcast(&keys, b"ev:sshd\0", b"{ }", &sig));
        // The boundary between topic and payload is part of what is signed.
        assert!(!verify_broadcast(&keys, b"ev:sshd", b"\0{}", &sig));
        assert!(!verify_broadcast(&keys, b"ev:sshd\0", b"{}", &sig[..63]));
        assert!(!verify_broadcast(&[], b"ev:sshd\0", b"{}", &sig));
        // A broadcast signature is no snapshot signature.
        assert!(!verify_snapshot(&keys, b"ev:sshd\0", b"{}", &sig));
    }

    #[test]
    fn snapshot_signatures_bind_the_request() {
        let k = SigningKey::from_seed([1; 32]);
        let sig = sign_snapshot(&k, b"req-1", b"page");
        assert!(verify_snapshot(&[k.public()], b"req-1", b"page", &sig));
        assert!(!verify_snapshot(&[k.public()], b"req-2", b"page", &sig));
        assert!(!verify_snapshot(&[k.public()], b"req-1", b"page2", &sig));
    }
}
