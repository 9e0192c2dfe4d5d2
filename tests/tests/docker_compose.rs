//! The docker-compose demo cluster, built and run for real by `scripts/docker-test`:
//! images from a base image made offline from Debian's archive, a hub and three
//! nodes with real fail2ban, an attack on node 1, every node's fail2ban asked
//! whether it banned the attacker, node 2 stopped and restarted.
//!
//! The script exits 0 when its assertions hold, 77 when no Docker engine is
//! reachable. A skipped run never passes: this test then fails with the reason,
//! and scripts/test, which checks `docker info` first, filters `docker_` tests out
//! (nextest counts them as skipped) and prints why.

use std::process::Command;

#[test]
fn docker_compose_cluster_propagates_bans() {
    let root = f2b_tests::bins::workspace_root();
    // bin_path checks the binary exists (and says how to build it).
    let publisher = f2b_tests::bins::publisher();
    let bin_dir = publisher.parent().expect("binaries sit in a directory");
    let status = Command::new("bash")
        .arg(root.join("scripts/docker-test"))
        .current_dir(&root)
        // The debug binaries the other tests use: no second, release build.
        .env("F2B_BIN_DIR", bin_dir)
        .status()
        .expect("run scripts/docker-test");
    match status.code() {
        Some(0) => {}
        Some(77) => panic!(
            "SKIPPED: no Docker engine reachable (scripts/docker-test exit 77); \
             a test that cannot run does not pass: scripts/test filters it out instead"
        ),
        other => panic!("scripts/docker-test failed with {other:?}; its output is above"),
    }
}
