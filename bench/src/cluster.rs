//! Starting the release daemons from real configuration files on loopback, with
//! ephemeral ports, each in its own directory.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use f2b_tests::cluster::{toml_list, toml_str};
use f2b_tests::field;

use crate::daemon::{binary, Daemon};
use crate::trust::Trust;

/// How long a daemon may take to start and say it is ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

fn path_str(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A running publisher and the endpoints it really bound.
#[derive(Debug)]
pub struct Publisher {
    pub daemon: Daemon,
    pub reply: String,
    pub broadcast: String,
}

impl Publisher {
    /// Starts `f2b-publisher` in `dir` on ephemeral loopback ports with the default
    /// heartbeat (1 s) and ban time, authentication on, the rate limit and the
    /// quarantine off; waits for its `listening on` line. Its lines containing
    /// `counters[i]` are counted.
    pub fn start(dir: &Path, trust: &Trust, counters: &[&str]) -> anyhow::Result<Publisher> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("publisher.conf");
        let mut c = String::new();
        let _ = writeln!(c, "[node]\nname = \"hub\"\n\n[publisher]");
        let _ = writeln!(c, "reply_bind = \"tcp://127.0.0.1:*\"");
        let _ = writeln!(c, "broadcast_bind = \"tcp://127.0.0.1:*\"");
        let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("publisher.pid")));
        let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("state")));
        // The rate limit and the circuit breaker stop a runaway node; a load
        // generator is one by design, so they are off (see BENCHMARKS.md).
        let _ = writeln!(c, "rate_limit = 0");
        let _ = writeln!(c, "quarantine_floor = {}", u32::MAX);
        c.push_str(&trust.publisher_toml(dir)?);
        write(&config, &c)?;
        let mut cmd = Command::new(binary("f2b-publisher")?);
        cmd.arg("--config").arg(&config);
        let daemon = Daemon::spawn("publisher", cmd, counters)?;
        let line = daemon.wait_line(&["listening on"], START_TIMEOUT)?;
        let reply = field(&line, "reply").context("no reply= in the listening line")?;
        let broadcast = field(&line, "broadcast").context("no broadcast= in the listening line")?;
        Ok(Publisher {
            daemon,
            reply,
            broadcast,
        })
    }
}

/// Starts `f2b-monitor` as node `name` reading `log_path` (created empty), reporting
/// to `reply`; waits for its `watching` line.
pub fn start_monitor(
    dir: &Path,
    name: &str,
    reply: &str,
    log_path: &Path,
    trust: &Trust,
) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    if !log_path.exists() {
        write(log_path, "")?;
    }
    let config = dir.join("monitor.conf");
    let mut c = String::new();
    let _ = writeln!(c, "[node]\nname = {}\n\n[monitor]", toml_str(name));
    let _ = writeln!(c, "log_path = {}", path_str(log_path));
    let _ = writeln!(c, "publisher = {}", toml_str(reply));
    let _ = writeln!(c, "ignore_jails = {}", toml_list(&["cluster"]));
    let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("monitor.pid")));
    let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("monitor-state")));
    c.push_str(&trust.monitor_toml(name));
    write(&config, &c)?;
    let mut cmd = Command::new(binary("f2b-monitor")?);
    cmd.arg("--config").arg(&config);
    let d = Daemon::spawn(&format!("monitor {name}"), cmd, &[": reported "])?;
    d.wait_line(&[": watching "], START_TIMEOUT)?;
    Ok(d)
}

/// A subscriber's settings.
#[derive(Debug, Clone)]
pub struct SubscriberSpec<'a> {
    pub name: &'a str,
    /// The PUB endpoint it follows.
    pub publisher: &'a str,
    /// The reply endpoint it asks for snapshots, if any.
    pub snapshot: Option<&'a str>,
    /// The `action = ...` line and the keys of that action.
    pub action: String,
}

/// Starts `f2b-subscriber`; waits for its `connected` line and, with snapshots, for
/// the `resync` of its start. Its `applied` lines are counted (counter 0).
pub fn start_subscriber(
    dir: &Path,
    spec: &SubscriberSpec<'_>,
    trust: &Trust,
) -> anyhow::Result<Daemon> {
    let d = spawn_subscriber(dir, spec, trust)?;
    wait_subscriber(&d, spec.snapshot.is_some())?;
    Ok(d)
}

/// Starts `f2b-subscriber` without waiting (see [`wait_subscriber`]), so that
/// several start together.
pub fn spawn_subscriber(
    dir: &Path,
    spec: &SubscriberSpec<'_>,
    trust: &Trust,
) -> anyhow::Result<Daemon> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("subscriber.conf");
    let mut c = String::new();
    let _ = writeln!(c, "[node]\nname = {}\n\n[subscriber]", toml_str(spec.name));
    let _ = writeln!(c, "publisher = {}", toml_str(spec.publisher));
    if let Some(s) = spec.snapshot {
        let _ = writeln!(c, "snapshot = {}", toml_str(s));
    }
    let _ = writeln!(c, "ban_jail = \"cluster\"");
    c.push_str(&spec.action);
    c.push('\n');
    let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("subscriber.pid")));
    let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("subscriber-state")));
    c.push_str(&trust.subscriber_toml());
    write(&config, &c)?;
    let mut cmd = Command::new(binary("f2b-subscriber")?);
    cmd.arg("--config").arg(&config);
    Daemon::spawn(&format!("subscriber {}", spec.name), cmd, &[": applied "])
}

/// Waits for a subscriber's `connected` line and, with snapshots, for the `resync`
/// of its start (it has caught up).
pub fn wait_subscriber(d: &Daemon, snapshot: bool) -> anyhow::Result<()> {
    d.wait_line(&[": connected "], START_TIMEOUT)?;
    if snapshot {
        d.wait_line(&[": resync ", "reason=start"], START_TIMEOUT)?;
    }
    Ok(())
}

/// `action = "log"` to `path`.
pub fn log_action(path: &Path) -> String {
    format!("action = \"log\"\nlog_path = {}", path_str(path))
}
