//! Every configuration file the project ships is parsed and validated here, so a
//! shipped example can never drift from the code. The list of files found must not be
//! empty: a test that matched no file and passed would prove nothing.

use std::path::{Path, PathBuf};

use f2b_common::config;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/f2b-common sits two levels below the workspace root")
        .to_owned()
}

/// The root `fail2ban-cluster.conf`, and every `*.conf` under `docker/` and
/// `examples/` except fail2ban's own files (its `jail.d`, `filter.d`, `action.d` and
/// `fail2ban` folders, `jail.conf`, `fail2ban.conf` and their `.local`).
fn shipped_configs() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = vec![root.join("fail2ban-cluster.conf")];
    for dir in ["docker", "examples"] {
        collect(&root.join(dir), &mut files);
    }
    files.sort();
    files
}

/// fail2ban's own INI files, which may sit beside ours in docker/.
const FAIL2BAN_FILES: [&str; 4] = ["jail.conf", "jail.local", "fail2ban.conf", "fail2ban.local"];

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            // fail2ban's own INI files live in these; they are not ours.
            let fail2ban_dir = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| matches!(n, "jail.d" | "filter.d" | "action.d" | "fail2ban"));
            if !fail2ban_dir {
                collect(&path, out);
            }
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".conf") && !FAIL2BAN_FILES.contains(&n))
        {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_config_is_valid() {
    let files = shipped_configs();
    assert!(!files.is_empty(), "no shipped configuration file found");
    let root = workspace_root().join("fail2ban-cluster.conf");
    assert!(root.exists(), "{} is missing", root.display());
    for file in &files {
        let cfg = config::load(file).unwrap_or_else(|e| panic!("{}", e));
        eprintln!("valid: {} (node {})", file.display(), cfg.node.name);
    }
    eprintln!("{} shipped configuration files checked", files.len());
}

#[test]
fn root_config_documents_every_key() {
    let text = std::fs::read_to_string(workspace_root().join("fail2ban-cluster.conf")).unwrap();
    // Every key of every section appears in the shipped file, set or commented out.
    let keys = [
        "name",
        "log_path",
        "publisher",
        "ignore_jails",
        "ack_timeout",
        "queue_size",
        "pidfile",
        "reply_bind",
        "broadcast_bind",
        "heartbeat_interval",
        "ban_time",
        "jails",
        "action",
        "ban_jail",
        "ignore_ip",
        "fail2ban_client",
        "socket",
        "exec",
        "heartbeat_timeout",
        "legacy",
        "legacy_token",
        "legacy_broadcast_bind",
        "state_dir",
        "snapshot",
        "rate_limit",
        "rate_burst",
        "quarantine_floor",
        "quarantine_factor",
        "quarantine_time",
        "allow_unauthenticated",
        "secret",
        "secret_file",
        "publisher_key",
        "signing_key_file",
        "max_clock_skew",
        "web1",
        "metrics_bind",
    ];
    for key in keys {
        let documented = text.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{key} ="))
        });
        assert!(
            documented,
            "fail2ban-cluster.conf does not document `{key}`"
        );
    }
}

#[test]
fn invalid_configs_fail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.conf");
    let good = std::fs::read_to_string(workspace_root().join("fail2ban-cluster.conf")).unwrap();
    for (from, to, key) in [
        (
            "ban_time = \"10m\"",
            "ban_time = \"ten minutes\"",
            "publisher.ban_time",
        ),
        (
            "action = \"fail2ban-client\"",
            "action = \"iptables\"",
            "subscriber.action",
        ),
        ("ack_timeout", "ack_timeot", "ack_timeot"),
    ] {
        assert!(good.contains(from), "{from}");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let err = config::load(&path).unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
        assert!(err.contains("bad.conf"), "{err}");
    }
}
