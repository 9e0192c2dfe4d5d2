//! The trust material of a test cluster: the publisher's Ed25519 signing key and one
//! monitor secret per node, drawn at random for each test (issue #6, docs/PROTOCOL.md
//! "Authentication").
//!
//! A [`Keyring`] holds a random seed; a node's secret is derived from it and the
//! node's name, so a publisher can be configured with credentials for nodes started
//! later, and a test can make a *wrong* secret or another publisher's key on purpose.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use f2b_proto::auth::{self, MonitorSecret, PublicKey, RequestAuth, SigningKey};
use f2b_proto::NodeName;
use sha2::{Digest as _, Sha256};

/// The node names a publisher holds credentials for unless its test names others
/// ([`crate::PublisherOptions::monitors`]): every name the suite's tests use.
pub const DEFAULT_MONITORS: &[&str] = &[
    "web1", "web2", "web3", "web4", "web5", "web6", "web7", "web8", "web9", "node-a", "node-b",
    "node-c", "node-d", "node-e", "node-f", "sub1", "sub2", "sub3", "node", "hub",
];

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b
}

/// A publisher's key pair and the credentials of the monitors it trusts.
#[derive(Debug, Clone)]
pub struct Keyring {
    seed: [u8; 32],
    signing: SigningKey,
}

impl Keyring {
    /// A new keyring from fresh random bytes.
    pub fn generate() -> Keyring {
        Keyring {
            seed: random_bytes(),
            signing: SigningKey::from_seed(random_bytes()),
        }
    }

    /// The publisher's signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The publisher's public key (what subscribers set as `publisher_key`).
    pub fn public_key(&self) -> PublicKey {
        self.signing.public()
    }

    /// The credential of monitor `node` (the same for the same keyring and name).
    pub fn secret(&self, node: &str) -> MonitorSecret {
        let mut h = Sha256::new();
        h.update(b"f2b-tests monitor secret\0");
        h.update(self.seed);
        h.update(node.as_bytes());
        MonitorSecret::from_random(h.finalize().into())
    }

    /// Writes the signing key file at `path`, mode 0600 (as `f2b-publisher keygen`).
    pub fn write_signing_key(&self, path: &Path) {
        write_private(path, &self.signing.to_file_text());
    }
}

/// Writes `text` to a new file (replacing any) readable by its owner only.
pub fn write_private(path: &Path, text: &str) {
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A random secret no publisher knows (valid in form: the base64 of 32 bytes).
pub fn stranger_secret() -> MonitorSecret {
    MonitorSecret::from_random(random_bytes())
}

/// The auth frame of `payload` sent as `node` with `secret`, now, with a fresh nonce.
pub fn sign(secret: &MonitorSecret, node: &str, payload: &[u8]) -> RequestAuth {
    sign_at(secret, node, crate::raw::now_ms(), payload)
}

/// The auth frame of `payload` sent as `node` with `secret` at `ts_ms`, with a fresh
/// nonce.
pub fn sign_at(secret: &MonitorSecret, node: &str, ts_ms: u64, payload: &[u8]) -> RequestAuth {
    let key = NodeName::new(node).unwrap_or_else(|e| panic!("node name {node:?}: {e}"));
    RequestAuth::sign(secret, &key, ts_ms, random_bytes(), payload)
}

/// Whether `frame` is the right reply MAC for `reply` to a request signed `auth`.
pub fn reply_mac_ok(
    secret: &MonitorSecret,
    auth: &RequestAuth,
    reply: &[u8],
    frame: &[u8],
) -> bool {
    auth::verify_reply(secret, &auth.mac, reply, frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn secrets_are_per_node_and_per_keyring() {
        let k = Keyring::generate();
        assert_eq!(k.secret("web1"), k.secret("web1"));
        assert_ne!(k.secret("web1"), k.secret("web2"));
        assert_ne!(k.secret("web1"), Keyring::generate().secret("web1"));
        assert!(MonitorSecret::new(k.secret("web1").expose()).is_ok());
        assert_ne!(k.public_key(), Keyring::generate().public_key());
    }

    #[test]
    fn the_signing_key_file_is_private_and_parses() {
        let d = tempfile::tempdir().unwrap();
        let k = Keyring::generate();
        let p = d.path().join("publisher.key");
        k.write_signing_key(&p);
        k.write_signing_key(&p);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = SigningKey::parse(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(back.public(), k.public_key());
    }

    #[test]
    fn signed_requests_verify() {
        let k = Keyring::generate();
        let a = sign(&k.secret("web1"), "web1", b"payload");
        assert!(a.verify(&k.secret("web1"), b"payload"));
        assert!(!a.verify(&k.secret("web2"), b"payload"));
        let m = auth::reply_mac(&k.secret("web1"), &a.mac, b"ack");
        assert!(reply_mac_ok(&k.secret("web1"), &a, b"ack", &m));
    }
}
