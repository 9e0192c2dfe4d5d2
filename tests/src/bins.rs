//! Where the binaries under test are.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The workspace root (the directory holding the root `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_owned()
}

/// The cargo target directory: `CARGO_TARGET_DIR` (relative to the workspace root
/// when relative) or the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The path of a binary of the workspace, profile debug. Panics, saying how to build
/// it, when it does not exist; warns when it is older than its crate's sources.
pub fn bin_path(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    let meta = match path.metadata() {
        Ok(m) if m.is_file() => m,
        _ => panic!(
            "{} not found: the integration tests run the real binaries; \
             run scripts/test, or cargo build --workspace --bins first",
            path.display()
        ),
    };
    if let (Ok(built), Some(newest)) = (meta.modified(), newest_source(name)) {
        if newest > built {
            eprintln!(
                "WARNING: {} is older than its sources; the tests run the old binary \
                 (cargo build --workspace --bins)",
                path.display()
            );
        }
    }
    path
}

/// The newest modification time of the sources a daemon binary is built from.
fn newest_source(name: &str) -> Option<SystemTime> {
    let crates = workspace_root().join("crates");
    let own = crates.join(name);
    if !own.is_dir() {
        return None;
    }
    [own, crates.join("f2b-common"), crates.join("f2b-proto")]
        .iter()
        .filter_map(|c| newest_in(&c.join("src")))
        .max()
}

fn newest_in(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_in(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

/// `f2b-publisher`.
pub fn publisher() -> PathBuf {
    bin_path("f2b-publisher")
}

/// `f2b-monitor`.
pub fn monitor() -> PathBuf {
    bin_path("f2b-monitor")
}

/// `f2b-subscriber`.
pub fn subscriber() -> PathBuf {
    bin_path("f2b-subscriber")
}

/// `f2b-test-record`, the `exec` action of the tests.
pub fn recorder() -> PathBuf {
    bin_path("f2b-test-record")
}

/// `f2b-test-fail2ban-client`, the counting wrapper around fail2ban-client.
pub fn counting_client() -> PathBuf {
    bin_path("f2b-test-fail2ban-client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workspace_root_has_the_root_manifest() {
        let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(text.contains("[workspace]"), "{text}");
    }

    #[test]
    #[should_panic(expected = "cargo build --workspace --bins")]
    fn a_missing_binary_says_how_to_build_it() {
        bin_path("f2b-no-such-binary");
    }
}
