//! Reloading the configuration on SIGHUP (`systemctl reload f2b-publisher`).
//!
//! The file given with `--config` is read again and validated as at start (and
//! [`TrustConfig::require_publisher`]). If it is invalid, an ERROR names the file
//! and the key, and the publisher goes on with the settings it runs with. If it is
//! valid, [`plan`] compares it with them:
//!
//! - applied at once, each change logged by name (never a secret): `[trust.monitors]`
//!   (a credential added works from its first report; one removed is refused
//!   `unauthenticated` from its next report: revocation without a restart; a
//!   changed secret takes effect at once), `trust.max_clock_skew`,
//!   `trust.allow_unauthenticated`, and the guard's `publisher.ignore_ip`,
//!   `rate_limit`, `rate_burst`, `quarantine_floor`, `quarantine_factor` and
//!   `quarantine_time` (the nodes' counters and quarantines carry on);
//! - not applied, and logged as `needs a restart` at each reload until the
//!   publisher restarts: the binds (`publisher.reply_bind`, `broadcast_bind`,
//!   `legacy_broadcast_bind`, `metrics_bind`), `state_dir`, `pidfile`,
//!   `heartbeat_interval`, `ban_time`, `legacy` and `legacy_token`, and
//!   `trust.signing_key_file` (the key itself);
//! - other daemons' sections (`[node]`, `[monitor]`, `[subscriber]`) are not the
//!   publisher's business and are ignored.
//!
//! The serving thread applies the new settings between two requests and logs
//! `configuration reloaded` when it has.
//!
//! [`TrustConfig::require_publisher`]: f2b_common::config::TrustConfig::require_publisher

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use f2b_common::config::{self, Config};
use f2b_common::CancellationToken;

use crate::guard::GuardConfig;
use crate::server::{Reload, Reloader};

/// What a reload does with a new, valid configuration.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The changes applied, one line each (names and values that are not secret).
    pub changes: Vec<String>,
    /// The keys that changed but need a restart.
    pub restart: Vec<&'static str>,
    /// The configuration now in force: the new one for what is applied, the
    /// running one for what needs a restart.
    pub applied: Config,
}

fn list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// Compares the configuration in force, `current`, with `new` (see the module's
/// documentation).
pub fn plan(current: &Config, new: &Config) -> Plan {
    let mut changes = Vec::new();
    let (ct, nt) = (&current.trust, &new.trust);
    let old_names: BTreeSet<_> = ct.monitors.keys().collect();
    let new_names: BTreeSet<_> = nt.monitors.keys().collect();
    let added: Vec<_> = new_names.difference(&old_names).collect();
    let removed: Vec<_> = old_names.difference(&new_names).collect();
    let changed: Vec<_> = old_names
        .intersection(&new_names)
        .filter(|n| ct.monitors.get(**n) != nt.monitors.get(**n))
        .collect();
    if !added.is_empty() {
        changes.push(format!(
            "trust.monitors: added {}",
            list(added.iter().map(|n| n.as_str()))
        ));
    }
    if !removed.is_empty() {
        changes.push(format!(
            "trust.monitors: removed {} (revoked: refused from their next report)",
            list(removed.iter().map(|n| n.as_str()))
        ));
    }
    if !changed.is_empty() {
        changes.push(format!(
            "trust.monitors: new secret for {}",
            list(changed.iter().map(|n| n.as_str()))
        ));
    }
    if ct.max_clock_skew != nt.max_clock_skew {
        changes.push(format!(
            "trust.max_clock_skew: {} -> {}",
            humantime::format_duration(ct.max_clock_skew),
            humantime::format_duration(nt.max_clock_skew)
        ));
    }
    if ct.allow_unauthenticated != nt.allow_unauthenticated {
        changes.push(format!(
            "trust.allow_unauthenticated: {} -> {}",
            ct.allow_unauthenticated, nt.allow_unauthenticated
        ));
    }
    let (cp, np) = (&current.publisher, &new.publisher);
    if cp.ignore_ip != np.ignore_ip {
        let nets: Vec<String> = np.ignore_ip.iter().map(ToString::to_string).collect();
        changes.push(format!(
            "publisher.ignore_ip: now [{}]",
            list(nets.iter().map(String::as_str))
        ));
    }
    let numbers = [
        ("publisher.rate_limit", cp.rate_limit, np.rate_limit),
        ("publisher.rate_burst", cp.rate_burst, np.rate_burst),
        (
            "publisher.quarantine_floor",
            cp.quarantine_floor,
            np.quarantine_floor,
        ),
        (
            "publisher.quarantine_factor",
            cp.quarantine_factor,
            np.quarantine_factor,
        ),
    ];
    for (key, old, new) in numbers {
        if old != new {
            changes.push(format!("{key}: {old} -> {new}"));
        }
    }
    if cp.quarantine_time != np.quarantine_time {
        changes.push(format!(
            "publisher.quarantine_time: {} -> {}",
            humantime::format_duration(cp.quarantine_time),
            humantime::format_duration(np.quarantine_time)
        ));
    }

    let mut restart = Vec::new();
    let mut differs = |key: &'static str, differ: bool| {
        if differ {
            restart.push(key);
        }
    };
    differs("publisher.reply_bind", cp.reply_bind != np.reply_bind);
    differs(
        "publisher.broadcast_bind",
        cp.broadcast_bind != np.broadcast_bind,
    );
    differs(
        "publisher.legacy_broadcast_bind",
        cp.legacy_broadcast_bind != np.legacy_broadcast_bind,
    );
    differs(
        "publisher.metrics_bind",
        current.metrics.publisher != new.metrics.publisher,
    );
    differs("publisher.state_dir", cp.state_dir != np.state_dir);
    differs("publisher.pidfile", cp.pidfile != np.pidfile);
    differs(
        "publisher.heartbeat_interval",
        cp.heartbeat_interval != np.heartbeat_interval,
    );
    differs("publisher.ban_time", cp.ban_time != np.ban_time);
    differs(
        "publisher.legacy",
        cp.legacy.is_some() != np.legacy.is_some(),
    );
    differs(
        "publisher.legacy_token",
        cp.legacy.is_some() && np.legacy.is_some() && cp.legacy != np.legacy,
    );
    differs(
        "trust.signing_key_file",
        ct.signing_key.as_ref().map(|k| k.public()) != nt.signing_key.as_ref().map(|k| k.public()),
    );

    let mut applied = current.clone();
    applied.trust.monitors = nt.monitors.clone();
    applied.trust.max_clock_skew = nt.max_clock_skew;
    applied.trust.allow_unauthenticated = nt.allow_unauthenticated;
    applied.publisher.ignore_ip = np.ignore_ip.clone();
    applied.publisher.rate_limit = np.rate_limit;
    applied.publisher.rate_burst = np.rate_burst;
    applied.publisher.quarantine_floor = np.quarantine_floor;
    applied.publisher.quarantine_factor = np.quarantine_factor;
    applied.publisher.quarantine_time = np.quarantine_time;
    Plan {
        changes,
        restart,
        applied,
    }
}

/// Reads and checks the file at `path` as a reload does; the error names the file
/// and the key.
pub fn load(path: &Path) -> Result<Config, String> {
    let config = config::load(path).map_err(|e| f2b_common::daemon::error_chain(&e).to_string())?;
    config
        .trust
        .require_publisher()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Reloads the configuration at `path` on each SIGHUP (`hup`) until `shutdown`,
/// starting from `current`, and hands what may change to the serving thread.
pub async fn on_sighup(
    path: PathBuf,
    mut current: Config,
    reloader: Reloader,
    mut hup: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        tracing::info!(path = %path.display(), "SIGHUP: reloading the configuration");
        let p = path.clone();
        let loaded = match tokio::task::spawn_blocking(move || load(&p)).await {
            Ok(loaded) => loaded,
            Err(e) => Err(format!("the reload task failed: {e}")),
        };
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    error = %e,
                    "reload failed: the configuration is invalid; going on with the settings in force"
                );
                continue;
            }
        };
        let plan = plan(&current, &new);
        for key in &plan.restart {
            tracing::warn!(
                key,
                "reload: {key} changed, which needs a restart (systemctl restart f2b-publisher): not applied"
            );
        }
        if plan.changes.is_empty() {
            tracing::info!("reload: no change to apply");
        }
        for change in &plan.changes {
            tracing::info!(change = change.as_str(), "reload: {change}");
        }
        if plan.applied.trust.allow_unauthenticated && !current.trust.allow_unauthenticated {
            tracing::warn!(
                "trust.allow_unauthenticated is on: reports without an authentication frame are \
                 accepted from anyone who can reach the reply socket, and may name any node"
            );
        }
        let reload = Reload {
            trust: plan.applied.trust.clone(),
            guard: GuardConfig::new(&plan.applied.publisher),
        };
        if !reloader.send(reload) {
            return;
        }
        current = plan.applied;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_publisher: &str, monitors: &str) -> Config {
        let text = format!(
            "[node]\nname = \"hub\"\n[publisher]\n{extra_publisher}\n[trust]\n\
             allow_unauthenticated = true\n[trust.monitors]\n{monitors}\n"
        );
        config::from_str(&text, Path::new("test.conf")).unwrap()
    }

    const A: &str = "web1 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n";
    const B: &str = "web2 = \"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n";
    const A2: &str = "web1 = \"cccccccccccccccccccccccccccccccccccccccc\"\n";

    #[test]
    fn credentials_and_guard_settings_are_applied_and_named() {
        let old = config("", &format!("{A}{B}"));
        let new = config(
            "rate_limit = 5\nignore_ip = [\"192.0.2.0/24\"]\nquarantine_time = \"1h\"",
            &format!("{A2}web3 = \"dddddddddddddddddddddddddddddddddddddddd\"\n"),
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.changes,
            vec![
                "trust.monitors: added web3".to_owned(),
                "trust.monitors: removed web2 (revoked: refused from their next report)".into(),
                "trust.monitors: new secret for web1".into(),
                "publisher.ignore_ip: now [192.0.2.0/24]".into(),
                "publisher.rate_limit: 50 -> 5".into(),
                "publisher.quarantine_time: 10m -> 1h".into(),
            ]
        );
        assert!(p.restart.is_empty(), "{:?}", p.restart);
        assert_eq!(p.applied.trust.monitors, new.trust.monitors);
        assert_eq!(p.applied.publisher.rate_limit, 5);
        // No secret in what is logged.
        let all = p.changes.join("\n");
        assert!(!all.contains("aaaa") && !all.contains("cccc") && !all.contains("dddd"));
    }

    #[test]
    fn binds_and_state_need_a_restart_and_stay() {
        let old = config("", A);
        let new = config(
            "reply_bind = \"tcp://127.0.0.1:6000\"\nstate_dir = \"/elsewhere\"\n\
             ban_time = \"2h\"\nmetrics_bind = \"127.0.0.1:9999\"",
            A,
        );
        let p = plan(&old, &new);
        assert!(p.changes.is_empty(), "{:?}", p.changes);
        assert_eq!(
            p.restart,
            vec![
                "publisher.reply_bind",
                "publisher.metrics_bind",
                "publisher.state_dir",
                "publisher.ban_time"
            ]
        );
        // The running values stay, so the next reload says it again.
        assert_eq!(p.applied, old);
        assert_eq!(plan(&p.applied, &new).restart.len(), 4);
    }

    #[test]
    fn an_invalid_file_names_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.conf");
        std::fs::write(&path, "[publisher]\nrate_limit = \"lots\"\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            err.contains("p.conf") && err.contains("rate_limit"),
            "{err}"
        );
        std::fs::write(&path, "[publisher]\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            err.contains("p.conf") && err.contains("trust.signing_key_file"),
            "{err}"
        );
    }
}
