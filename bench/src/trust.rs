//! The credentials the benchmarks run with: the secure configuration of issue #6,
//! as deployed. Fresh keys per cluster, from the operating system's random source:
//! an Ed25519 signing key for the publisher, written to a 0600 file, and one
//! monitor secret per node (the base64 of 32 random bytes, as `f2b-publisher keygen
//! --monitor` makes them); subscribers are given the publisher's public key; the
//! load generator signs each report with its node's secret (an auth frame per
//! report, a fresh nonce each); the stand-in publisher of the burst benchmark signs
//! each broadcast.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;
use f2b_proto::auth::{self, MonitorSecret, RequestAuth, SigningKey};
use f2b_proto::NodeName;
use f2b_tests::cluster::toml_str;

/// `N` bytes from the operating system's random source.
fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random source");
    b
}

/// The keys of one benchmark cluster.
#[derive(Debug, Clone)]
pub struct Trust {
    signing: SigningKey,
    monitors: BTreeMap<String, MonitorSecret>,
}

impl Trust {
    /// Fresh keys for a cluster whose monitors (and load clients) are named
    /// `nodes`.
    pub fn generate(nodes: &[&str]) -> Trust {
        let mut names: Vec<&str> = nodes.to_vec();
        if names.is_empty() {
            // A publisher needs at least one credential.
            names.push("bench");
        }
        Trust {
            signing: SigningKey::from_seed(random()),
            monitors: names
                .into_iter()
                .map(|n| (n.to_owned(), MonitorSecret::from_random(random())))
                .collect(),
        }
    }

    /// Whether the daemons run with authentication (always, now that they have it;
    /// kept for the report's header).
    pub fn secure(&self) -> bool {
        true
    }

    /// The publisher's `[trust]` settings; its signing key file is written in
    /// `dir`.
    pub fn publisher_toml(&self, dir: &Path) -> anyhow::Result<String> {
        let key = dir.join("publisher.key");
        let _ = std::fs::remove_file(&key);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .and_then(|mut f| f.write_all(self.signing.to_file_text().as_bytes()))
            .with_context(|| format!("cannot write {}", key.display()))?;
        let mut c = String::new();
        let _ = writeln!(c, "\n[trust]");
        let _ = writeln!(c, "signing_key_file = {}", toml_str(&key.to_string_lossy()));
        let _ = writeln!(c, "\n[trust.monitors]");
        for (m, secret) in &self.monitors {
            let _ = writeln!(c, "{m} = {}", toml_str(secret.expose()));
        }
        Ok(c)
    }

    fn secret(&self, node: &str) -> &MonitorSecret {
        self.monitors
            .get(node)
            .unwrap_or_else(|| panic!("no credential generated for node {node:?}"))
    }

    /// A monitor's `[trust]` settings.
    pub fn monitor_toml(&self, node: &str) -> String {
        format!(
            "\n[trust]\nsecret = {}\n",
            toml_str(self.secret(node).expose())
        )
    }

    /// A subscriber's `[trust]` settings.
    pub fn subscriber_toml(&self) -> String {
        format!(
            "\n[trust]\npublisher_key = {}\n",
            toml_str(&self.signing.public().to_string())
        )
    }

    /// The frames after a report's payload: its auth frame, signed now with a
    /// fresh nonce.
    pub fn request_frames(&self, node: &str, payload: &[u8]) -> Vec<Vec<u8>> {
        let name = NodeName::new(node).expect("benchmark node names are valid");
        let ts = crate::load::now_ms();
        vec![RequestAuth::sign(self.secret(node), &name, ts, random(), payload).encode()]
    }

    /// The frames after a broadcast's payload: its signature.
    pub fn broadcast_frames(&self, topic: &[u8], payload: &[u8]) -> Vec<Vec<u8>> {
        vec![auth::sign_broadcast(&self.signing, topic, payload).to_vec()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_keys() {
        let t = Trust::generate(&["load1"]);
        let d = tempfile::tempdir().unwrap();
        let p = t.publisher_toml(d.path()).unwrap();
        assert!(
            p.contains("signing_key_file") && p.contains("load1 = "),
            "{p}"
        );
        assert!(t.monitor_toml("load1").contains("secret = "));
        assert!(t.subscriber_toml().contains("publisher_key = \"ed25519:"));
        let frames = t.broadcast_frames(b"ev:sshd\0", b"{}");
        assert!(auth::verify_broadcast(
            &[t.signing.public()],
            b"ev:sshd\0",
            b"{}",
            &frames[0]
        ));
        let a = auth::RequestAuth::decode(&t.request_frames("load1", b"{}")[0]).unwrap();
        assert!(a.verify(t.secret("load1"), b"{}"));
        assert!(Trust::generate(&[]).monitors.contains_key("bench"));
        let key = std::fs::read_to_string(d.path().join("publisher.key")).unwrap();
        assert_eq!(
            SigningKey::parse(&key).unwrap().public(),
            t.signing.public()
        );
    }
}
