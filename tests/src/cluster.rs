//! A cluster of real daemons on loopback: one [`Publisher`] and [`Node`]s (a monitor
//! and a subscriber each), configured through real configuration files.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use f2b_proto::auth::{MonitorSecret, PublicKey};

use crate::bins;
use crate::process::Process;
use crate::trust::{Keyring, DEFAULT_MONITORS};
use crate::wait::{self, TIMEOUT};

/// The log filter the daemons run with: info, and debug for the project's crates
/// (the `ignored`, `unchanged` and `duplicate` lines).
pub const LOG_LEVEL: &str =
    "info,f2b_monitor=debug,f2b_publisher=debug,f2b_subscriber=debug,f2b_common=debug";

/// A temporary directory for one test. Removed when dropped, unless the test is
/// failing: then it is kept, and its path printed, for a look at the files.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("f2b-test-")
            .tempdir()
            .expect("cannot create a temporary directory");
        TestDir {
            path: dir.path().to_owned(),
            dir: Some(dir),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory, created.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("test files kept in {}", kept.display());
            }
        }
    }
}

/// A TOML basic string (JSON's escapes are valid TOML).
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

/// A TOML array of strings.
pub fn toml_list<S: AsRef<str>>(items: &[S]) -> String {
    let items: Vec<String> = items.iter().map(|s| toml_str(s.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

fn path_str(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Appends lines to a file (created if missing), each followed by a newline, in one
/// write, as a logger would.
pub fn append_lines<S: AsRef<str>>(path: &Path, lines: &[S]) {
    let mut text = String::new();
    for l in lines {
        text.push_str(l.as_ref());
        text.push('\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// The lines of a file; none when it does not exist yet.
pub fn read_lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    }
}

/// `[publisher]` and `[trust]` settings. `Default`: ephemeral loopback ports, a
/// 200 ms heartbeat, and real trust: a fresh [`Keyring`] (signing key file written
/// 0600) and `[trust.monitors]` credentials for [`DEFAULT_MONITORS`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    pub reply_bind: String,
    pub broadcast_bind: String,
    pub heartbeat_interval: String,
    pub ban_time: String,
    /// The publisher's key pair and the monitors' secrets.
    pub keyring: Keyring,
    /// `[trust] signing_key_file` is written and set (`false`: no signing key).
    pub signing_key: bool,
    /// The nodes listed in `[trust.monitors]`, each with its secret from the keyring.
    pub monitors: Vec<String>,
    /// `[trust] allow_unauthenticated`.
    pub allow_unauthenticated: bool,
    /// Extra lines for the `[publisher]` section (e.g. `ignore_ip = [...]`).
    pub publisher_extra: String,
    /// Extra lines for the `[trust]` section (e.g. `max_clock_skew = "5s"`).
    pub trust_extra: String,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            reply_bind: "tcp://127.0.0.1:*".into(),
            broadcast_bind: "tcp://127.0.0.1:*".into(),
            heartbeat_interval: "200ms".into(),
            ban_time: "10m".into(),
            keyring: Keyring::generate(),
            signing_key: true,
            monitors: DEFAULT_MONITORS.iter().map(|&n| n.to_owned()).collect(),
            allow_unauthenticated: false,
            publisher_extra: String::new(),
            trust_extra: String::new(),
        }
    }
}

impl PublisherOptions {
    /// With the hub's rate limit off and its circuit breaker out of reach, for tests
    /// that push thousands of events through one node to test something else (the
    /// limits' own tests use the defaults or set them).
    pub fn without_hub_limits(mut self) -> PublisherOptions {
        self.publisher_extra
            .push_str("rate_limit = 0\nquarantine_floor = 4000000000\n");
        self
    }
}

/// The publisher's configuration file.
fn publisher_config(dir: &Path, o: &PublisherOptions) -> String {
    let mut c = format!(
        "[node]\nname = \"hub\"\n\n[publisher]\nreply_bind = {}\nbroadcast_bind = {}\n\
         heartbeat_interval = {}\nban_time = {}\npidfile = {}\nstate_dir = {}\n",
        toml_str(&o.reply_bind),
        toml_str(&o.broadcast_bind),
        toml_str(&o.heartbeat_interval),
        toml_str(&o.ban_time),
        path_str(&dir.join("publisher.pid")),
        path_str(&dir.join("publisher-state")),
    );
    c.push_str(&o.publisher_extra);
    let _ = writeln!(c, "\n[trust]");
    if o.allow_unauthenticated {
        let _ = writeln!(c, "allow_unauthenticated = true");
    }
    if o.signing_key {
        let path = dir.join("publisher.key");
        o.keyring.write_signing_key(&path);
        let _ = writeln!(c, "signing_key_file = {}", path_str(&path));
    }
    c.push_str(&o.trust_extra);
    if !o.monitors.is_empty() {
        let _ = writeln!(c, "\n[trust.monitors]");
        for m in &o.monitors {
            let _ = writeln!(
                c,
                "{} = {}",
                toml_str(m),
                toml_str(o.keyring.secret(m).expose())
            );
        }
    }
    c
}

/// A running `f2b-publisher`.
#[derive(Debug)]
pub struct Publisher {
    process: Process,
    /// Earlier runs (before [`Publisher::kill`] and [`Publisher::restart`]), kept so
    /// their output is printed if the test fails.
    earlier: Vec<Process>,
    dir: PathBuf,
    options: PublisherOptions,
    /// The REP endpoint really bound (monitors connect here).
    pub reply: String,
    /// The PUB endpoint really bound (subscribers connect here).
    pub broadcast: String,
}

impl Publisher {
    /// Starts a publisher on ephemeral loopback ports with a 200 ms heartbeat, in
    /// `dir` (its config file and pidfile live there).
    pub fn start(dir: &Path) -> Publisher {
        Publisher::start_with(dir, PublisherOptions::default())
    }

    /// Starts a publisher with `options`, and waits for its `listening on` line.
    pub fn start_with(dir: &Path, options: PublisherOptions) -> Publisher {
        std::fs::create_dir_all(dir).expect("mkdir publisher dir");
        let (process, reply, broadcast) = Publisher::launch(dir, &options, 0);
        Publisher {
            process,
            earlier: Vec::new(),
            dir: dir.to_owned(),
            options,
            reply,
            broadcast,
        }
    }

    fn launch(dir: &Path, o: &PublisherOptions, run: usize) -> (Process, String, String) {
        let config = dir.join("publisher.conf");
        write_file(&config, &publisher_config(dir, o));
        let mut cmd = Command::new(bins::publisher());
        cmd.arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg(LOG_LEVEL);
        let name = if run == 0 {
            "publisher".to_owned()
        } else {
            format!("publisher (run {})", run + 1)
        };
        let p = Process::spawn(name, cmd);
        // Not `metrics listening on ...`: the line with the endpoints.
        let m = p.wait_for_line(r"\blistening on\b.*\breply=", TIMEOUT);
        let reply = m.field("reply");
        let broadcast = m.field("broadcast");
        assert!(
            reply.starts_with("tcp://") && broadcast.starts_with("tcp://"),
            "unexpected endpoints in {:?}",
            m.line
        );
        (p, reply, broadcast)
    }

    /// The running publisher process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// SIGKILL (a crash: no clean-up), by its PID.
    pub fn kill(&self) {
        self.process.kill();
    }

    /// SIGTERM, and asserts a clean exit (status 0).
    pub fn stop(&self) {
        self.process.terminate_and_wait();
    }

    /// Every run so far, oldest first (the current one last).
    pub fn runs(&self) -> impl Iterator<Item = &Process> {
        self.earlier.iter().chain(std::iter::once(&self.process))
    }

    /// `[publisher] state_dir`, where its ledger is.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("publisher-state")
    }

    /// The options it runs with (its keyring among them).
    pub fn options(&self) -> &PublisherOptions {
        &self.options
    }

    /// The publisher's key pair and the monitors' secrets.
    pub fn keyring(&self) -> &Keyring {
        &self.options.keyring
    }

    /// Its public key (what subscribers set as `publisher_key`).
    pub fn public_key(&self) -> PublicKey {
        self.options.keyring.public_key()
    }

    /// The credential of monitor `node`, as the publisher knows it.
    pub fn secret(&self, node: &str) -> MonitorSecret {
        self.options.keyring.secret(node)
    }

    /// Starts the publisher again on the endpoints it had (after [`Publisher::kill`]
    /// or a clean stop), and asserts it got them.
    pub fn restart(&mut self) {
        self.restart_with(|_| {});
    }

    /// Like [`Publisher::restart`], with its options changed by `change` first (for
    /// instance a monitor's credential removed: a revocation).
    pub fn restart_with(&mut self, change: impl FnOnce(&mut PublisherOptions)) {
        assert!(
            !self.process.is_running(),
            "restart: the publisher is still running"
        );
        change(&mut self.options);
        let options = PublisherOptions {
            reply_bind: self.reply.clone(),
            broadcast_bind: self.broadcast.clone(),
            ..self.options.clone()
        };
        let run = self.earlier.len() + 1;
        let (process, reply, broadcast) = Publisher::launch(&self.dir, &options, run);
        assert_eq!(
            (&reply, &broadcast),
            (&self.reply, &self.broadcast),
            "the restarted publisher did not get its endpoints back"
        );
        let old = std::mem::replace(&mut self.process, process);
        self.earlier.push(old);
    }

    /// Lines of the current run that report a broadcast of `ip`.
    pub fn broadcasts_of(&self, ip: &str) -> Vec<String> {
        self.process.events("broadcast", &[("ip", ip)])
    }
}

/// How a node's subscriber applies events.
#[derive(Debug, Clone)]
pub enum NodeAction {
    /// `exec` with `f2b-test-record`: a line `<action> <jail> <ip> <node>` per event
    /// in the node's `applied.txt`.
    Record,
    /// `fail2ban-client` on a private fail2ban-server's socket, through the counting
    /// wrapper `f2b-test-fail2ban-client` (calls listed in the node's
    /// `fail2ban-client-calls.txt`).
    Fail2banClient { socket: PathBuf },
    /// `log`, to this file.
    Log { path: PathBuf },
    /// `log`, to the node's `applied.log` ([`Node::action_log_path`]): one line per
    /// applied event with its id and sequence number, read with
    /// [`crate::applied::ActionLog`]. Cheap at thousands of events, where
    /// [`NodeAction::Record`] starts a process per event.
    LogFile,
    /// `none`.
    None,
}

/// What a [`Node`] runs and how. `Default`: both daemons, action [`NodeAction::Record`],
/// all jails, default ignore_ip, a fresh empty fail2ban log, snapshots from the
/// publisher's reply endpoint.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub monitor: bool,
    pub subscriber: bool,
    /// The fail2ban log the monitor reads; default `<node dir>/fail2ban.log`.
    pub log_path: Option<PathBuf>,
    /// `[monitor] ignore_jails`.
    pub ignore_jails: Vec<String>,
    /// `[monitor] ack_timeout`.
    pub ack_timeout: Option<String>,
    /// `[subscriber] jails`.
    pub jails: Vec<String>,
    /// `[subscriber] ignore_ip`; `None`: the default.
    pub ignore_ip: Option<Vec<String>>,
    /// `[subscriber] ban_jail`.
    pub ban_jail: Option<String>,
    pub action: NodeAction,
    /// `[subscriber] heartbeat_timeout`.
    pub heartbeat_timeout: Option<String>,
    /// `[subscriber] snapshot`: `true` (the default) sets it to the publisher's reply
    /// endpoint, so the subscriber catches up (snapshots) on start, reconnection, a
    /// new epoch and a sequence gap; `false` leaves it unset.
    pub snapshot: bool,
    /// Extra lines for the `[subscriber]` section.
    pub subscriber_extra: String,
    /// `[trust] secret`: the monitor's credential.
    pub secret: NodeSecret,
    /// `[trust] publisher_key`; `None`: the publisher's real key.
    pub publisher_keys: Option<Vec<PublicKey>>,
    /// `[trust] allow_unauthenticated`.
    pub allow_unauthenticated: bool,
    /// `[monitor] publisher`; `None`: the publisher's reply endpoint (a proxy in
    /// between, for instance).
    pub monitor_publisher: Option<String>,
    /// More broadcast endpoints for `[subscriber] publisher` (after the publisher's).
    pub also_follow: Vec<String>,
    /// Wait for the subscriber's `connected` (and `resync`) line at start; `false`:
    /// only for its `starting` line (a subscriber that will refuse everything).
    pub wait_connected: bool,
}

/// Which `[trust] secret` a node is configured with.
#[derive(Debug, Clone, Default)]
pub enum NodeSecret {
    /// The one the publisher holds for the node's name (the default).
    #[default]
    Publisher,
    /// This one (a wrong one, another keyring's).
    Given(MonitorSecret),
    /// None.
    None,
}

impl NodeOptions {
    /// A node with a subscriber only (no monitor) whose action writes what it
    /// applies to a log file ([`NodeAction::LogFile`]), for tests that read it.
    pub fn logging_subscriber() -> NodeOptions {
        NodeOptions {
            monitor: false,
            action: NodeAction::LogFile,
            ..NodeOptions::default()
        }
    }
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            monitor: true,
            subscriber: true,
            log_path: None,
            ignore_jails: Vec::new(),
            ack_timeout: None,
            jails: Vec::new(),
            ignore_ip: None,
            ban_jail: None,
            action: NodeAction::Record,
            heartbeat_timeout: None,
            snapshot: true,
            subscriber_extra: String::new(),
            secret: NodeSecret::Publisher,
            publisher_keys: None,
            allow_unauthenticated: false,
            monitor_publisher: None,
            also_follow: Vec::new(),
            wait_connected: true,
        }
    }
}

/// One node: an `f2b-monitor` reading a fail2ban log and an `f2b-subscriber`, both
/// from the node's configuration file.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    /// The node's configuration file.
    pub config: PathBuf,
    /// The fail2ban log its monitor reads.
    pub log_path: PathBuf,
    /// Where [`NodeAction::Record`] writes.
    pub record_path: PathBuf,
    /// Where [`NodeAction::Fail2banClient`] lists the fail2ban-client calls.
    pub calls_path: PathBuf,
    /// Where [`NodeAction::LogFile`] writes.
    pub action_log_path: PathBuf,
    /// Whether the subscriber asks for snapshots ([`NodeOptions::snapshot`]).
    snapshot: bool,
    /// [`NodeOptions::wait_connected`].
    wait_connected: bool,
    monitor: Option<Process>,
    subscriber: Option<Process>,
    earlier: Vec<Process>,
}

impl Node {
    /// Writes the node's configuration for `publisher`, starts its daemons and waits
    /// until they are ready: the monitor's `watching` line, the subscriber's
    /// `connected` line (the subscription is live).
    pub fn start(root: &Path, name: &str, publisher: &Publisher, options: NodeOptions) -> Node {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir node dir");
        let log_path = options
            .log_path
            .clone()
            .unwrap_or_else(|| dir.join("fail2ban.log"));
        if !log_path.exists() {
            write_file(&log_path, "");
        }
        let record_path = dir.join("applied.txt");
        let calls_path = dir.join("fail2ban-client-calls.txt");
        let action_log_path = dir.join("applied.log");
        let config = dir.join("fail2ban-cluster.conf");
        let secret = match &options.secret {
            NodeSecret::Publisher => Some(publisher.secret(name)),
            NodeSecret::Given(s) => Some(s.clone()),
            NodeSecret::None => None,
        };
        let keys = options
            .publisher_keys
            .clone()
            .unwrap_or_else(|| vec![publisher.public_key()]);
        let text = node_config(
            name,
            &dir,
            &log_path,
            (&record_path, &action_log_path),
            (&publisher.reply, &publisher.broadcast),
            &options,
            bins::bin_path,
        ) + &trust_section(secret.as_ref(), &keys, options.allow_unauthenticated);
        write_file(&config, &text);
        let mut node = Node {
            name: name.to_owned(),
            dir,
            config,
            log_path,
            record_path,
            calls_path,
            action_log_path,
            snapshot: options.snapshot,
            wait_connected: options.wait_connected,
            monitor: None,
            subscriber: None,
            earlier: Vec::new(),
        };
        if options.monitor {
            node.start_monitor();
        }
        if options.subscriber {
            node.start_subscriber();
        }
        node
    }

    fn daemon(&self, binary: PathBuf, label: &str) -> Process {
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg(LOG_LEVEL)
            .env("F2B_TEST_CALLS_FILE", &self.calls_path);
        Process::spawn(format!("{label} {}", self.name), cmd)
    }

    /// Starts (or starts again) the monitor; waits for its `watching` line.
    pub fn start_monitor(&mut self) {
        let p = self.daemon(bins::monitor(), "monitor");
        p.wait_for_line(r"\bwatching\b", TIMEOUT);
        if let Some(old) = self.monitor.replace(p) {
            self.earlier.push(old);
        }
    }

    /// Starts (or starts again) the subscriber; waits for its `connected` line (the
    /// subscription is live) and, when it asks for snapshots, for the `resync` line
    /// of its start (it has caught up with what the cluster holds).
    pub fn start_subscriber(&mut self) {
        let p = self.daemon(bins::subscriber(), "subscriber");
        if !self.wait_connected {
            p.wait_for_event("starting", &[], TIMEOUT);
        } else {
            p.wait_for_line(r"\bconnected\b", TIMEOUT);
        }
        if self.snapshot && self.wait_connected {
            p.wait_for_event("resync", &[("reason", "start")], TIMEOUT);
        }
        if let Some(old) = self.subscriber.replace(p) {
            self.earlier.push(old);
        }
    }

    /// SIGKILLs the monitor, by its PID (a crash: no clean-up).
    pub fn kill_monitor(&self) {
        self.monitor().kill();
    }

    /// SIGTERMs the monitor and asserts a clean exit.
    pub fn stop_monitor(&self) {
        self.monitor().terminate_and_wait();
    }

    /// SIGKILLs the subscriber, by its PID (a crash: no clean-up).
    pub fn kill_subscriber(&self) {
        self.subscriber().kill();
    }

    /// SIGTERMs the subscriber and asserts a clean exit.
    pub fn stop_subscriber(&self) {
        self.subscriber().terminate_and_wait();
    }

    /// `[monitor] state_dir`.
    pub fn monitor_state_dir(&self) -> PathBuf {
        self.dir.join("monitor-state")
    }

    /// `[subscriber] state_dir`.
    pub fn subscriber_state_dir(&self) -> PathBuf {
        self.dir.join("subscriber-state")
    }

    /// Every daemon process the node ran, earlier runs included.
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.earlier
            .iter()
            .chain(self.monitor.iter())
            .chain(self.subscriber.iter())
    }

    /// The monitor. Panics when the node runs none.
    pub fn monitor(&self) -> &Process {
        self.monitor.as_ref().expect("this node runs no monitor")
    }

    /// The subscriber. Panics when the node runs none.
    pub fn subscriber(&self) -> &Process {
        self.subscriber
            .as_ref()
            .expect("this node runs no subscriber")
    }

    /// Appends lines to the fail2ban log the monitor reads.
    pub fn append_log<S: AsRef<str>>(&self, lines: &[S]) {
        append_lines(&self.log_path, lines);
    }

    /// What the recorder wrote so far: `<action> <jail> <ip> <node>` lines.
    pub fn recorded(&self) -> Vec<String> {
        read_lines(&self.record_path)
    }

    /// Waits until the recorder has written `line` (exactly) `count` times or more.
    pub fn wait_recorded(&self, line: &str, count: usize) {
        wait::until(
            &format!("{count} x {line:?} in {}", self.record_path.display()),
            TIMEOUT,
            || (self.recorded().iter().filter(|l| *l == line).count() >= count).then_some(()),
            || self.report(),
        );
    }

    /// How many times the recorder wrote `line`.
    pub fn recorded_count(&self, line: &str) -> usize {
        self.recorded().iter().filter(|l| *l == line).count()
    }

    /// The fail2ban-client calls the subscriber made (through the counting wrapper).
    pub fn client_calls(&self) -> Vec<String> {
        read_lines(&self.calls_path)
    }

    /// A description of the node's state for failure messages.
    pub fn report(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "node {}: recorded {:?}", self.name, self.recorded());
        for p in [&self.monitor, &self.subscriber].into_iter().flatten() {
            let _ = writeln!(s, "{}", p.dump());
        }
        s
    }
}

fn node_config(
    name: &str,
    dir: &Path,
    log_path: &Path,
    (record_path, action_log_path): (&Path, &Path),
    (reply, broadcast): (&str, &str),
    o: &NodeOptions,
    helper: impl Fn(&str) -> PathBuf,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "[node]\nname = {}\n", toml_str(name));
    let _ = writeln!(c, "[monitor]");
    let _ = writeln!(c, "log_path = {}", path_str(log_path));
    let monitor_publisher = o.monitor_publisher.as_deref().unwrap_or(reply);
    let _ = writeln!(c, "publisher = {}", toml_str(monitor_publisher));
    let _ = writeln!(c, "ignore_jails = {}", toml_list(&o.ignore_jails));
    if let Some(t) = &o.ack_timeout {
        let _ = writeln!(c, "ack_timeout = {}", toml_str(t));
    }
    let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("monitor.pid")));
    let _ = writeln!(c, "state_dir = {}\n", path_str(&dir.join("monitor-state")));
    let _ = writeln!(c, "[subscriber]");
    let mut follow = vec![broadcast.to_owned()];
    follow.extend(o.also_follow.iter().cloned());
    let _ = writeln!(c, "publisher = {}", toml_list(&follow));
    let _ = writeln!(c, "jails = {}", toml_list(&o.jails));
    if let Some(ips) = &o.ignore_ip {
        let _ = writeln!(c, "ignore_ip = {}", toml_list(ips));
    }
    if let Some(j) = &o.ban_jail {
        let _ = writeln!(c, "ban_jail = {}", toml_str(j));
    }
    if let Some(t) = &o.heartbeat_timeout {
        let _ = writeln!(c, "heartbeat_timeout = {}", toml_str(t));
    }
    if o.snapshot {
        let _ = writeln!(c, "snapshot = {}", toml_str(reply));
    }
    match &o.action {
        NodeAction::Record => {
            let recorder = helper("f2b-test-record");
            let _ = writeln!(c, "action = \"exec\"");
            let _ = writeln!(
                c,
                "exec = {}",
                toml_list(&[
                    recorder.to_string_lossy().as_ref(),
                    record_path.to_string_lossy().as_ref(),
                    "<action>",
                    "<jail>",
                    "<ip>",
                    "<node>",
                ])
            );
        }
        NodeAction::Fail2banClient { socket } => {
            let _ = writeln!(c, "action = \"fail2ban-client\"");
            let _ = writeln!(
                c,
                "fail2ban_client = {}",
                path_str(&helper("f2b-test-fail2ban-client"))
            );
            let _ = writeln!(c, "socket = {}", path_str(socket));
        }
        NodeAction::Log { path } => {
            let _ = writeln!(c, "action = \"log\"");
            let _ = writeln!(c, "log_path = {}", path_str(path));
        }
        NodeAction::LogFile => {
            let _ = writeln!(c, "action = \"log\"");
            let _ = writeln!(c, "log_path = {}", path_str(action_log_path));
        }
        NodeAction::None => {
            let _ = writeln!(c, "action = \"none\"");
        }
    }
    c.push_str(&o.subscriber_extra);
    let _ = writeln!(c, "\npidfile = {}", path_str(&dir.join("subscriber.pid")));
    let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("subscriber-state")));
    c
}

/// A node's `[trust]` section: its monitor's secret, the publisher keys its
/// subscriber obeys, the opt-out.
pub fn trust_section(
    secret: Option<&MonitorSecret>,
    publisher_keys: &[PublicKey],
    allow_unauthenticated: bool,
) -> String {
    let mut c = String::from("\n[trust]\n");
    if allow_unauthenticated {
        c.push_str("allow_unauthenticated = true\n");
    }
    if let Some(s) = secret {
        let _ = writeln!(c, "secret = {}", toml_str(s.expose()));
    }
    if !publisher_keys.is_empty() {
        let keys: Vec<String> = publisher_keys.iter().map(ToString::to_string).collect();
        let _ = writeln!(c, "publisher_key = {}", toml_list(&keys));
    }
    c
}

/// Convenience: a [`Duration`] of seconds.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_helpers_quote() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_list(&["x", "y"]), r#"["x", "y"]"#);
        assert_eq!(toml_list::<&str>(&[]), "[]");
    }

    #[test]
    fn node_configs_are_valid_configs() {
        let dir = Path::new("/tmp/x");
        let keyring = Keyring::generate();
        let secret = keyring.secret("node-a");
        let actions = [
            NodeAction::Record,
            NodeAction::Fail2banClient {
                socket: "/tmp/x/f2b.sock".into(),
            },
            NodeAction::Log {
                path: "/tmp/x/cluster.log".into(),
            },
            NodeAction::LogFile,
            NodeAction::None,
        ];
        for action in actions {
            let o = NodeOptions {
                ignore_jails: vec!["cluster".into()],
                ack_timeout: Some("500ms".into()),
                jails: vec!["sshd".into(), "nginx".into()],
                ignore_ip: Some(vec!["192.0.2.0/24".into(), "2001:db8::1".into()]),
                ban_jail: Some("cluster".into()),
                heartbeat_timeout: Some("2s".into()),
                action,
                ..NodeOptions::default()
            };
            let text = node_config(
                "node-a",
                dir,
                &dir.join("fail2ban.log"),
                (&dir.join("applied.txt"), &dir.join("applied.log")),
                ("tcp://hub.invalid:5000", "tcp://hub.invalid:5001"),
                &o,
                |name| Path::new("/usr/local/bin").join(name),
            ) + &trust_section(Some(&secret), &[keyring.public_key()], false);
            let c = f2b_common::config::from_str(&text, Path::new("node.conf"))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(c.node.name.as_str(), "node-a");
            assert_eq!(c.trust.secret.as_ref(), Some(&secret));
            assert_eq!(c.trust.publisher_keys, [keyring.public_key()]);
            assert!(!c.trust.allow_unauthenticated);
            c.trust.require_monitor().unwrap();
            c.trust.require_subscriber().unwrap();
            assert_eq!(c.subscriber.jails.len(), 2);
            assert_eq!(c.monitor.ack_timeout, Duration::from_millis(500));
            assert_eq!(c.subscriber.pidfile, dir.join("subscriber.pid"));
            assert_eq!(c.subscriber.snapshot.len(), 1);
            assert_eq!(c.subscriber.snapshot[0].as_str(), "tcp://hub.invalid:5000");
            assert_eq!(
                c.subscriber.action.name(),
                match o.action {
                    NodeAction::Record => "exec",
                    NodeAction::Fail2banClient { .. } => "fail2ban-client",
                    NodeAction::Log { .. } | NodeAction::LogFile => "log",
                    NodeAction::None => "none",
                }
            );
        }
    }

    #[test]
    fn publisher_configs_are_valid_configs() {
        let d = TestDir::new();
        let o = PublisherOptions {
            publisher_extra: "ignore_ip = [\"192.0.2.0/24\"]\n".into(),
            trust_extra: "max_clock_skew = \"5s\"\n".into(),
            ..PublisherOptions::default()
        }
        .without_hub_limits();
        let text = publisher_config(d.path(), &o);
        let c = f2b_common::config::from_str(&text, &d.path().join("publisher.conf"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        c.trust.require_publisher().unwrap();
        assert_eq!(
            c.trust.signing_key.as_ref().map(|k| k.public()),
            Some(o.keyring.public_key())
        );
        assert_eq!(c.trust.monitors.len(), DEFAULT_MONITORS.len());
        let web1 = f2b_proto::NodeName::new("web1").unwrap();
        assert_eq!(c.trust.monitors.get(&web1), Some(&o.keyring.secret("web1")));
        assert_eq!(c.trust.max_clock_skew, Duration::from_secs(5));
        assert_eq!(c.publisher.ignore_ip.len(), 1);
        assert_eq!(c.publisher.rate_limit, 0);
        assert_eq!(c.publisher.quarantine_floor, 4_000_000_000);
        assert!(!text.contains(o.keyring.signing_key().to_file_text().trim()));

        // The opt-out, without keys.
        let o = PublisherOptions {
            signing_key: false,
            monitors: Vec::new(),
            allow_unauthenticated: true,
            ..PublisherOptions::default()
        };
        let text = publisher_config(d.path(), &o);
        let c = f2b_common::config::from_str(&text, &d.path().join("publisher.conf"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(c.trust.allow_unauthenticated && c.trust.signing_key.is_none());
        c.trust.require_publisher().unwrap();
    }

    #[test]
    fn test_dir_is_removed_when_the_test_passes() {
        let d = TestDir::new();
        let p = d.path().to_owned();
        let sub = d.sub("a/b");
        append_lines(&sub.join("f"), &["one", "two"]);
        assert_eq!(read_lines(&sub.join("f")), ["one", "two"]);
        assert!(read_lines(&sub.join("missing")).is_empty());
        drop(d);
        assert!(!p.exists());
    }
}
