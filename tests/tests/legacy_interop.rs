//! Interoperability with fail2ban-zmq-tools, the Python tool this project replaces
//! (docs/PROTOCOL.md, "Legacy: fail2ban-zmq-tools peers"), in each direction: the
//! real daemons against small pyzmq scripts (`tests/python/`) that play the old
//! monitor, publisher and subscriber on the wire as the old tool did (one string
//! frame, `[token|]host|jail|action|ip`, replies echoed or `NAK`, broadcasts of one
//! frame with no topic). Plus the conversion of the old configuration file, which
//! needs no Python.
//!
//! The tests named `pyzmq_*` need python3 with pyzmq. Without it they fail (a test
//! that cannot run never passes), after a loud `SKIPPED: pyzmq not installed` line;
//! with `F2B_REQUIRE_PYZMQ=1` they fail saying it was required. `F2B_TEST_PYTHON`
//! names another interpreter than `python3`.
//!
//! The scripts print one machine-readable line per thing they do, flushed at once
//! (`bound rep tcp://...`, `sent <string>`, `got <string>`, `published <string>`);
//! the tests wait for those lines with deadlines, as for the daemons' log lines.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use f2b_tests::bins;
use f2b_tests::cluster::{read_lines, toml_list, toml_str, trust_section, TestDir, LOG_LEVEL};
use f2b_tests::logline::{ban, unban};
use f2b_tests::raw;
use f2b_tests::trust::{Keyring, DEFAULT_MONITORS};
use f2b_tests::wait;
use f2b_tests::{Process, TIMEOUT};

// --- python ------------------------------------------------------------------------

/// The interpreter: `F2B_TEST_PYTHON`, else `python3`.
fn python() -> OsString {
    std::env::var_os("F2B_TEST_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Fails the test unless python3 can import pyzmq: with `F2B_REQUIRE_PYZMQ=1` (set
/// by scripts/test when it installed pyzmq) as a plain failure, otherwise after a
/// loud SKIPPED line. Either way the test does not pass without running.
fn require_pyzmq() {
    let out = Command::new(python())
        .args([
            "-c",
            "import zmq; print(zmq.__version__, zmq.zmq_version())",
        ])
        .output();
    let why = match out {
        Ok(o) if o.status.success() => return,
        Ok(o) => format!(
            "{:?} -c 'import zmq' failed ({}): {}",
            python(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("cannot run {:?}: {e}", python()),
    };
    if std::env::var("F2B_REQUIRE_PYZMQ").as_deref() == Ok("1") {
        panic!("F2B_REQUIRE_PYZMQ=1 but pyzmq is not usable: {why}");
    }
    eprintln!("\n********** SKIPPED: pyzmq not installed: {why} **********\n");
    panic!(
        "SKIPPED: pyzmq not installed ({why}); this test plays fail2ban-zmq-tools with \
         pyzmq: `pip install pyzmq`, or run scripts/test"
    );
}

/// Starts `tests/python/<script>` with `args` (unbuffered output).
fn script(label: &str, script: &str, args: &[&str]) -> Process {
    let path = bins::workspace_root().join("tests/python").join(script);
    assert!(path.is_file(), "{} is missing", path.display());
    let mut cmd = Command::new(python());
    cmd.arg("-u").arg(&path).args(args);
    Process::spawn(label, cmd)
}

/// The `sent`/`got`/`verdict` triples printed by old_monitor.py, after its `done`.
fn exchanges(monitor: &Process) -> Vec<(String, String, String)> {
    monitor.wait_for_line("^done$", TIMEOUT);
    let lines: Vec<String> = monitor
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("sent ") || l.starts_with("got ") || l.starts_with("verdict "))
        .collect();
    assert_eq!(lines.len() % 3, 0, "{}", monitor.dump());
    lines
        .chunks(3)
        .map(|c| {
            let take = |l: &str, p: &str| {
                l.strip_prefix(p)
                    .unwrap_or_else(|| panic!("expected {p:?}, got {l:?}\n{}", monitor.dump()))
                    .to_owned()
            };
            (
                take(&c[0], "sent "),
                take(&c[1], "got "),
                take(&c[2], "verdict "),
            )
        })
        .collect()
}

/// Runs old_monitor.py against `endpoint` and returns its exchanges.
fn old_monitor(
    endpoint: &str,
    token: Option<&str>,
    messages: &[&str],
) -> Vec<(String, String, String)> {
    let mut args = vec![endpoint];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    args.extend(messages);
    let p = script("old monitor (pyzmq)", "old_monitor.py", &args);
    let x = exchanges(&p);
    assert_eq!(
        p.wait_exit(TIMEOUT).and_then(|s| s.code()),
        Some(0),
        "{}",
        p.dump()
    );
    x
}

/// Waits for the next message line (`got`, `multipart`, `undecodable`) that
/// old_subscriber.py prints from line index `from` on; returns it and the index
/// after it.
fn next_message(sub: &Process, from: usize) -> (String, usize) {
    let m = sub.wait_for_line_after(from, r"^(got|multipart|undecodable) ", TIMEOUT);
    (m.line, m.index + 1)
}

/// An exchange as expected: `(sent, got, verdict)`.
fn x(sent: &str, got: &str, verdict: &str) -> (String, String, String) {
    (sent.into(), got.into(), verdict.into())
}

// --- daemons -----------------------------------------------------------------------

/// A running f2b-publisher and the endpoints it logged.
#[derive(Debug)]
struct Hub {
    process: Process,
    reply: String,
    broadcast: String,
    legacy_broadcast: Option<String>,
    /// Its keys: native peers authenticate (legacy ones cannot).
    keyring: Keyring,
}

impl Hub {
    /// The `[trust]` section of a native node of this hub: its monitor's secret and
    /// the hub's public key.
    fn node_trust(&self, node: &str) -> String {
        trust_section(
            Some(&self.keyring.secret(node)),
            &[self.keyring.public_key()],
            false,
        )
    }
}

/// Starts f2b-publisher on ephemeral loopback ports with a temporary state_dir, real
/// trust (a signing key, credentials for the usual node names) and `extra` lines in
/// its `[publisher]` section; waits for `listening on`.
fn start_hub(dir: &Path, label: &str, extra: &str) -> Hub {
    std::fs::create_dir_all(dir).expect("mkdir");
    let config = dir.join("publisher.conf");
    let keyring = Keyring::generate();
    let key_file = dir.join("publisher.key");
    keyring.write_signing_key(&key_file);
    let mut monitors = String::new();
    for m in DEFAULT_MONITORS {
        let _ = writeln!(monitors, "{m} = {}", toml_str(keyring.secret(m).expose()));
    }
    let text = format!(
        "[node]\nname = \"hub\"\n\n[publisher]\nreply_bind = \"tcp://127.0.0.1:*\"\n\
         broadcast_bind = \"tcp://127.0.0.1:*\"\nheartbeat_interval = \"200ms\"\n\
         pidfile = {}\nstate_dir = {}\n{extra}\n\
         [trust]\nsigning_key_file = {}\n\n[trust.monitors]\n{monitors}",
        path_str(&dir.join("publisher.pid")),
        path_str(&dir.join("publisher-state")),
        path_str(&key_file),
    );
    write(&config, &text);
    let mut cmd = Command::new(bins::publisher());
    cmd.arg("--config")
        .arg(&config)
        .arg("--log-level")
        .arg(LOG_LEVEL);
    let process = Process::spawn(label, cmd);
    let m = process.wait_for_line(r"\blistening on\b.*\breply=", TIMEOUT);
    Hub {
        reply: m.field("reply"),
        broadcast: m.field("broadcast"),
        legacy_broadcast: f2b_tests::process::field(&m.line, "legacy_broadcast"),
        process,
        keyring,
    }
}

/// A node's files: its configuration, the fail2ban log its monitor reads, the file
/// its subscriber's recorder writes (`<action> <jail> <ip> <node>` lines).
#[derive(Debug)]
struct NodeFiles {
    config: PathBuf,
    log_path: PathBuf,
    record_path: PathBuf,
}

/// Writes a node's configuration in `dir`: its name, an optional `[monitor]` (the
/// publisher's reply endpoint and extra lines) and an optional `[subscriber]`
/// (publisher endpoint and extra lines; action `exec` with the recorder), each with
/// a temporary state_dir; `trust`, its `[trust]` section (see [`Hub::node_trust`],
/// or the opt-out for a peer of an old publisher); and an empty fail2ban log.
fn node_files(
    dir: &Path,
    name: &str,
    monitor: Option<(&str, &str)>,
    subscriber: Option<(&str, &str)>,
    trust: &str,
) -> NodeFiles {
    std::fs::create_dir_all(dir).expect("mkdir");
    let log_path = dir.join("fail2ban.log");
    write(&log_path, "");
    let record_path = dir.join("applied.txt");
    let mut c = format!("[node]\nname = {}\n\n", toml_str(name));
    if let Some((publisher, extra)) = monitor {
        let _ = writeln!(c, "[monitor]");
        let _ = writeln!(c, "log_path = {}", path_str(&log_path));
        let _ = writeln!(c, "publisher = {}", toml_str(publisher));
        let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("monitor.pid")));
        let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("monitor-state")));
        let _ = writeln!(c, "{extra}");
    }
    if let Some((publisher, extra)) = subscriber {
        let recorder = bins::recorder();
        let _ = writeln!(c, "[subscriber]");
        let _ = writeln!(c, "publisher = {}", toml_str(publisher));
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
        let _ = writeln!(c, "pidfile = {}", path_str(&dir.join("subscriber.pid")));
        let _ = writeln!(c, "state_dir = {}", path_str(&dir.join("subscriber-state")));
        let _ = writeln!(c, "{extra}");
    }
    c.push_str(trust);
    let config = dir.join("fail2ban-cluster.conf");
    write(&config, &c);
    NodeFiles {
        config,
        log_path,
        record_path,
    }
}

/// The `[trust]` section of a native peer of an old (fail2ban-zmq-tools) peer.
const UNAUTHENTICATED: &str = "\n[trust]\nallow_unauthenticated = true\n";

/// Starts `binary` on `config` with the tests' log level.
fn daemon(label: &str, binary: PathBuf, config: &Path) -> Process {
    let mut cmd = Command::new(binary);
    cmd.arg("--config")
        .arg(config)
        .arg("--log-level")
        .arg(LOG_LEVEL);
    Process::spawn(label, cmd)
}

/// Waits until the recorder file holds `line`.
fn wait_recorded(path: &Path, line: &str, others: &[&Process]) {
    wait::until(
        &format!("{line:?} in {}", path.display()),
        TIMEOUT,
        || read_lines(path).iter().any(|l| l == line).then_some(()),
        || {
            let mut s = format!("recorded: {:?}\n", read_lines(path));
            for p in others {
                s.push_str(&p.dump());
                s.push('\n');
            }
            s
        },
    );
}

fn append(path: &Path, lines: &[String]) {
    f2b_tests::cluster::append_lines(path, lines);
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn path_str(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
}

/// The first published string's arrival, through a PUB/SUB link whose subscription
/// may not have reached the publisher yet (slow joiner): `trigger(i)` makes the
/// publisher send probe `i` and returns the line that shows it arrived (a regex on
/// `receiver`); probes are sent until one shows within `per_probe`, bounded by
/// [`TIMEOUT`]. Returns the index of the line after the last probe's, once every
/// probe sent after the first that arrived has arrived too (the link keeps order).
fn probe_until_live(
    receiver: &Process,
    per_probe: Duration,
    mut trigger: impl FnMut(usize) -> String,
) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    let start = receiver.mark();
    let mut patterns = Vec::new();
    loop {
        let i = patterns.len();
        patterns.push(trigger(i));
        let any = patterns
            .iter()
            .map(|p| format!("(?:{p})"))
            .collect::<Vec<_>>()
            .join("|");
        if receiver
            .try_wait_for_line_after(start, &any, per_probe)
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no probe reached {} within {TIMEOUT:?} ({} probes)\n{}",
            receiver.name(),
            patterns.len(),
            receiver.dump()
        );
    }
    // The last probe was sent after the one that arrived: it arrives too.
    let last = patterns.last().expect("one probe at least");
    receiver.wait_for_line_after(start, last, TIMEOUT).index + 1
}

// --- 1. old monitor -> new publisher -----------------------------------------------

/// An old monitor (pyzmq REQ, one string frame) reports to f2b-publisher with
/// `legacy = true`: valid reports are echoed exactly and become native events that
/// a native f2b-subscriber applies (`10.1` as 10.0.0.1); invalid ones get exactly
/// `NAK`. With `legacy_token`, the token is required and removed from the echo, and
/// never logged.
#[test]
fn pyzmq_old_monitor_to_new_publisher() {
    require_pyzmq();
    let dir = TestDir::new();
    let hub = start_hub(&dir.sub("hub"), "publisher", "legacy = true\n");
    let web5 = node_files(
        &dir.sub("web5"),
        "web5",
        None,
        Some((hub.broadcast.as_str(), "")),
        &hub.node_trust("web5"),
    );
    let sub = daemon("subscriber web5", bins::subscriber(), &web5.config);
    sub.wait_for_line(r"\bconnected\b", TIMEOUT);

    let got = old_monitor(
        &hub.reply,
        None,
        &[
            "web1|sshd|Ban|192.0.2.10",
            "web1|sshd|UnBan|10.1",
            "web_1|sshd|Ban|1.2.3.4",
            "web1|sshd|Drop|1.2.3.4",
            "web1|sshd|Ban|2001:db8::1",
            "a|b|c",
        ],
    );
    assert_eq!(
        got,
        [
            x(
                "web1|sshd|Ban|192.0.2.10",
                "web1|sshd|Ban|192.0.2.10",
                "accepted"
            ),
            x("web1|sshd|UnBan|10.1", "web1|sshd|UnBan|10.1", "accepted"),
            x("web_1|sshd|Ban|1.2.3.4", "NAK", "rejected"),
            x("web1|sshd|Drop|1.2.3.4", "NAK", "rejected"),
            x("web1|sshd|Ban|2001:db8::1", "NAK", "rejected"),
            x("a|b|c", "NAK", "rejected"),
        ],
        "{}",
        hub.process.dump()
    );
    hub.process.wait_for_event(
        "broadcast",
        &[("ip", "192.0.2.10"), ("node", "web1"), ("origin", "legacy")],
        TIMEOUT,
    );
    hub.process.wait_for_event(
        "broadcast",
        &[
            ("ip", "10.0.0.1"),
            ("action", "unban"),
            ("origin", "legacy"),
        ],
        TIMEOUT,
    );
    hub.process
        .wait_for_count(r"rejected.*reason=legacy_invalid", 4, TIMEOUT);
    assert_eq!(
        hub.process.count_lines(r"rejected.*reason=legacy_invalid"),
        4,
        "{}",
        hub.process.dump()
    );

    // The native subscriber applies what the old monitor reported.
    wait_recorded(
        &web5.record_path,
        "ban sshd 192.0.2.10 web1",
        &[&sub, &hub.process],
    );
    wait_recorded(
        &web5.record_path,
        "unban sshd 10.0.0.1 web1",
        &[&sub, &hub.process],
    );
    assert_eq!(
        read_lines(&web5.record_path),
        ["ban sshd 192.0.2.10 web1", "unban sshd 10.0.0.1 web1"],
        "only the accepted reports are applied"
    );
    sub.terminate_and_wait();
    hub.process.terminate_and_wait();

    // With a token.
    let hub = start_hub(
        &dir.sub("hub-token"),
        "publisher (token)",
        "legacy = true\nlegacy_token = \"s3cret\"\n",
    );
    let wrong = old_monitor(&hub.reply, Some("wrong"), &["web1|sshd|Ban|192.0.2.11"]);
    assert_eq!(
        wrong,
        [x("wrong|web1|sshd|Ban|192.0.2.11", "NAK", "rejected")]
    );
    let missing = old_monitor(&hub.reply, None, &["web1|sshd|Ban|192.0.2.11"]);
    assert_eq!(missing, [x("web1|sshd|Ban|192.0.2.11", "NAK", "rejected")]);
    let right = old_monitor(&hub.reply, Some("s3cret"), &["web1|sshd|Ban|192.0.2.11"]);
    assert_eq!(
        right,
        [x(
            "s3cret|web1|sshd|Ban|192.0.2.11",
            "web1|sshd|Ban|192.0.2.11",
            "accepted"
        )],
        "{}",
        hub.process.dump()
    );
    hub.process.wait_for_event(
        "broadcast",
        &[("ip", "192.0.2.11"), ("node", "web1"), ("origin", "legacy")],
        TIMEOUT,
    );
    hub.process
        .wait_for_count(r"rejected.*reason=legacy_invalid", 2, TIMEOUT);
    hub.process.terminate_and_wait();
    let leaks = hub.process.matching("s3cret");
    assert!(leaks.is_empty(), "the token reached the log: {leaks:?}");
}

// --- 2. new publisher -> old subscriber --------------------------------------------

/// An old subscriber (pyzmq SUB, subscribed to "") on f2b-publisher's
/// `legacy_broadcast_bind` receives what a native f2b-monitor reports, as one frame
/// `node|jail|Ban|ip`; IPv6 events are not sent there.
#[test]
fn pyzmq_new_publisher_to_old_subscriber() {
    require_pyzmq();
    let dir = TestDir::new();
    let hub = start_hub(
        &dir.sub("hub"),
        "publisher",
        "legacy = true\nlegacy_broadcast_bind = \"tcp://127.0.0.1:*\"\n",
    );
    let legacy = hub.legacy_broadcast.clone().unwrap_or_else(|| {
        panic!(
            "no legacy_broadcast= in `listening on`\n{}",
            hub.process.dump()
        )
    });
    assert_ne!(legacy, hub.broadcast);
    let web2 = node_files(
        &dir.sub("web2"),
        "web2",
        Some((hub.reply.as_str(), "")),
        None,
        &hub.node_trust("web2"),
    );
    let monitor = daemon("monitor web2", bins::monitor(), &web2.config);
    monitor.wait_for_line(r"\bwatching\b", TIMEOUT);
    let old = script("old subscriber (pyzmq)", "old_subscriber.py", &[&legacy]);
    old.wait_for_line("^subscribed ", TIMEOUT);

    // Until the subscription has reached the publisher, what it sends is lost.
    let mut from = probe_until_live(&old, Duration::from_millis(500), |i| {
        let ip = format!("192.0.2.{}", 100 + i);
        append(&web2.log_path, &[ban("sshd", &ip)]);
        monitor.wait_for_event("reported", &[("ip", &ip), ("status", "broadcast")], TIMEOUT);
        format!(r"^got web2\|sshd\|Ban\|{}$", regex::escape(&ip))
    });

    let expect_next = |from: &mut usize, want: &str| {
        let (line, next) = next_message(&old, *from);
        assert_eq!(line, format!("got {want}"), "{}", hub.process.dump());
        *from = next;
    };

    append(&web2.log_path, &[ban("sshd", "203.0.113.7")]);
    expect_next(&mut from, "web2|sshd|Ban|203.0.113.7");

    // IPv6 is not for old subscribers: the marker after it is the next message.
    append(
        &web2.log_path,
        &[ban("sshd", "2001:db8::7"), ban("sshd", "203.0.113.8")],
    );
    monitor.wait_for_event(
        "reported",
        &[("ip", "2001:db8::7"), ("status", "broadcast")],
        TIMEOUT,
    );
    expect_next(&mut from, "web2|sshd|Ban|203.0.113.8");
    hub.process.wait_for_event(
        "not sent to legacy subscribers (IPv6, or a jail name the old format cannot carry)",
        &[("ip", "2001:db8::7")],
        TIMEOUT,
    );

    // A lone Unban is held by the monitor (it may be a jail stopping); a Ban of the
    // jail after it shows the jail running and releases it at once.
    append(
        &web2.log_path,
        &[unban("sshd", "203.0.113.7"), ban("sshd", "203.0.113.9")],
    );
    expect_next(&mut from, "web2|sshd|Unban|203.0.113.7");
    expect_next(&mut from, "web2|sshd|Ban|203.0.113.9");

    let odd = old.matching("^(multipart|undecodable) ");
    assert!(odd.is_empty(), "not one-frame text: {odd:?}");
    monitor.terminate_and_wait();
    hub.process.terminate_and_wait();
}

// --- 3. new monitor -> old publisher -----------------------------------------------

/// A native f2b-monitor with `legacy = true` and `legacy_token` reports to an old
/// publisher (pyzmq REP): one string frame `token|node|jail|Ban|ip`; the echo is
/// taken as an ACK (`reported status=legacy`); an IPv6 ban, which the old format
/// cannot carry, is dropped with an error and never sent.
#[test]
fn pyzmq_new_monitor_to_old_publisher() {
    require_pyzmq();
    let dir = TestDir::new();
    let old = script(
        "old publisher (pyzmq)",
        "old_publisher.py",
        &["--token", "tok"],
    );
    let rep = old
        .wait_for_line(r"^bound rep (tcp://\S+)$", TIMEOUT)
        .get(1)
        .to_owned();
    old.wait_for_line(r"^bound pub ", TIMEOUT);
    let web3 = node_files(
        &dir.sub("web3"),
        "web3",
        Some((rep.as_str(), "legacy = true\nlegacy_token = \"tok\"")),
        None,
        // An old publisher cannot check a credential: the explicit opt-out.
        UNAUTHENTICATED,
    );
    let monitor = daemon("monitor web3", bins::monitor(), &web3.config);
    monitor.wait_for_line(r"\bwatching\b", TIMEOUT);

    let mut from = 0;
    let mut expect_next = |want_got: &str, want_sent: &str| {
        let m = old.wait_for_line_after(from, r"^got ", TIMEOUT);
        assert_eq!(m.line, format!("got {want_got}"), "{}", monitor.dump());
        let s = old.wait_for_line_after(m.index + 1, r"^sent ", TIMEOUT);
        assert_eq!(s.line, format!("sent {want_sent}"));
        from = s.index + 1;
    };

    append(&web3.log_path, &[ban("sshd", "198.51.100.5")]);
    expect_next(
        "tok|web3|sshd|Ban|198.51.100.5",
        "web3|sshd|Ban|198.51.100.5",
    );
    monitor.wait_for_event(
        "reported",
        &[
            ("action", "ban"),
            ("jail", "sshd"),
            ("ip", "198.51.100.5"),
            ("status", "legacy"),
        ],
        TIMEOUT,
    );

    append(
        &web3.log_path,
        &[ban("sshd", "2001:db8::5"), ban("sshd", "198.51.100.6")],
    );
    expect_next(
        "tok|web3|sshd|Ban|198.51.100.6",
        "web3|sshd|Ban|198.51.100.6",
    );
    monitor.wait_for_event(
        "event cannot be sent to a legacy publisher, dropped",
        &[("ip", "2001:db8::5")],
        TIMEOUT,
    );
    monitor.wait_for_event(
        "reported",
        &[("ip", "198.51.100.6"), ("status", "legacy")],
        TIMEOUT,
    );

    // A lone Unban is held by the monitor (it may be a jail stopping); a Ban of the
    // jail after it shows the jail running and releases it at once.
    append(
        &web3.log_path,
        &[unban("sshd", "198.51.100.5"), ban("sshd", "198.51.100.7")],
    );
    expect_next(
        "tok|web3|sshd|Unban|198.51.100.5",
        "web3|sshd|Unban|198.51.100.5",
    );
    expect_next(
        "tok|web3|sshd|Ban|198.51.100.7",
        "web3|sshd|Ban|198.51.100.7",
    );
    monitor.wait_for_event(
        "reported",
        &[
            ("action", "unban"),
            ("ip", "198.51.100.5"),
            ("status", "legacy"),
        ],
        TIMEOUT,
    );
    assert_eq!(old.count_lines("^got "), 4, "{}", old.dump());
    monitor.terminate_and_wait();
}

// --- 4. old publisher -> new subscriber --------------------------------------------

/// A native f2b-subscriber with `legacy = true` follows an old publisher (pyzmq
/// PUB, one frame, no topic): it applies another host's ban (`10.1` as 10.0.0.1),
/// skips its own host's, and drops invalid strings.
#[test]
fn pyzmq_old_publisher_to_new_subscriber() {
    require_pyzmq();
    let dir = TestDir::new();
    // --broadcast-refused: the old publisher also publishes what it refuses, as a
    // faulty peer might, so that the invalid strings reach the subscriber.
    let old = script(
        "old publisher (pyzmq)",
        "old_publisher.py",
        &["--broadcast-refused"],
    );
    let rep = old
        .wait_for_line(r"^bound rep (tcp://\S+)$", TIMEOUT)
        .get(1)
        .to_owned();
    let publ = old
        .wait_for_line(r"^bound pub (tcp://\S+)$", TIMEOUT)
        .get(1)
        .to_owned();
    let web4 = node_files(
        &dir.sub("web4"),
        "web4",
        None,
        Some((publ.as_str(), "legacy = true")),
        // An old publisher signs nothing: the explicit opt-out, no publisher_key.
        UNAUTHENTICATED,
    );
    let sub = daemon("subscriber web4", bins::subscriber(), &web4.config);
    sub.wait_for_line(r"\bconnected\b", TIMEOUT);

    // What the old publisher is asked to publish, and its reply.
    let publish = |msg: &str, reply: &str| {
        let got = raw::request(&rep, msg.as_bytes());
        assert_eq!(String::from_utf8_lossy(&got), reply, "reply to {msg:?}");
    };
    // Connected is not subscribed: probe until a probe shows.
    probe_until_live(&sub, Duration::from_millis(500), |i| {
        let probe = format!("probe|sshd|Ban|198.18.0.{}", i + 1);
        publish(&probe, &probe);
        format!(
            r"\breceived\b.*\bip={}( |$)",
            regex::escape(&format!("198.18.0.{}", i + 1))
        )
    });

    publish("web9|sshd|Ban|10.1", "web9|sshd|Ban|10.1");
    publish("web4|sshd|Ban|192.0.2.99", "web4|sshd|Ban|192.0.2.99");
    for bad in [
        "web_9|sshd|Ban|192.0.2.98",
        "web9|sshd|Ban|2001:db8::98",
        "web9|sshd|Drop|192.0.2.97",
        "web9|ss;hd|Ban|192.0.2.96",
        "a|b|c",
    ] {
        publish(bad, "NAK");
    }
    publish("web9|sshd|Ban|192.0.2.77", "web9|sshd|Ban|192.0.2.77");

    let others = [&sub, &old];
    wait_recorded(&web4.record_path, "ban sshd 192.0.2.77 web9", &others);
    wait_recorded(&web4.record_path, "ban sshd 10.0.0.1 web9", &others);
    sub.wait_for_event(
        "skipped",
        &[
            ("reason", "own_node"),
            ("ip", "192.0.2.99"),
            ("node", "web4"),
        ],
        TIMEOUT,
    );
    sub.wait_for_event("bad message dropped", &[], TIMEOUT);
    let applied: Vec<String> = read_lines(&web4.record_path)
        .into_iter()
        .filter(|l| !l.ends_with(" probe"))
        .collect();
    assert_eq!(
        applied,
        ["ban sshd 10.0.0.1 web9", "ban sshd 192.0.2.77 web9"],
        "{}",
        sub.dump()
    );
    sub.terminate_and_wait();
}

// --- 5. configuration ----------------------------------------------------------------

/// fail2ban-zmq-tools' configuration file, laid out as its shipped example (inline
/// `#` comments included, which Python's configparser kept in the values).
fn old_config(token: &str) -> String {
    format!(
        "\
# CONFIGURATION FILE FOR fail2ban-cluster aka fail2ban-zmq-tools
# Sections for fail2ban-monitor, fail2ban-subscriber and fail2ban-publisher.

[monitor]
pidfile = /var/run/fail2ban-monitor.pid
zmqreplyserver = tcp://f2bcluster.example.org:5678
fail2banlogpath = /var/log/fail2ban.log

# If the Publisher demands authentication, set auth to true, and fill in the authtoken
auth = true

# authtoken will be provided by Publisher
authtoken = {token}

[subscriber]
pidfile = /var/run/fail2ban-subscriber.pid
zmqpublisherurl = tcp://f2bcluster.example.org:5680
zmqprefixfilter = \"\" #empty prefix filter by default. this will become useful in the future.

# log: just log, no action.
subscriberaction = log

[publisher]
pidfile = /var/run/fail2ban-publisher.pid
broadcasterbindurl = tcp://*:5680   # address to which subscribers will connect to to receive broadcasts
replybindurl = tcp://*:5678      # address to which Monitors will send messages (usually the same host, different port)

# Should Publisher demand auth from Monitors? (see [monitor], too)
auth = true
authtoken = {token}

#TODO: add support for multiple tokens
"
    )
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `f2b-publisher import-legacy-config` turns the old INI file into a configuration
/// that every daemon's `--check` accepts, that keeps speaking the old protocol where
/// the old tool did, and that holds the token only as the value of `legacy_token`.
#[test]
fn legacy_config_conversion() {
    let dir = TestDir::new();
    let token = "Zq7-old-cluster-token";
    let old = dir.path().join("fail2ban-cluster.ini");
    write(&old, &old_config(token));

    let (code, toml, err) = run(Command::new(bins::publisher())
        .arg("import-legacy-config")
        .arg(&old));
    assert_eq!(code, 0, "import-legacy-config failed: {err}");
    assert!(
        !err.contains(token),
        "the token reached standard error: {err}"
    );
    let new = dir.path().join("fail2ban-cluster.conf");
    write(&new, &toml);

    for bin in [bins::publisher(), bins::monitor(), bins::subscriber()] {
        let (code, out, err) = run(Command::new(&bin).arg("--check").arg("--config").arg(&new));
        assert_eq!(
            code,
            0,
            "{} --check refused the converted file:\n{out}{err}\n--- file ---\n{toml}",
            bin.display()
        );
        assert!(out.contains("is valid"), "{out}{err}");
        assert!(
            !out.contains(token) && !err.contains(token),
            "{} --check printed the token:\n{out}{err}",
            bin.display()
        );
    }

    // The token only as a value, once per section that had it.
    let with_token: Vec<&str> = toml.lines().filter(|l| l.contains(token)).collect();
    assert_eq!(
        with_token,
        [
            format!("legacy_token = \"{token}\""),
            format!("legacy_token = \"{token}\"")
        ],
        "{toml}"
    );

    // What the daemons will run with: the old endpoints, the old protocol.
    let c = f2b_common::config::from_str(&toml, &new).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(
        c.monitor.publisher.as_str(),
        "tcp://f2bcluster.example.org:5678"
    );
    assert_eq!(c.monitor.log_path, Path::new("/var/log/fail2ban.log"));
    let m = c.monitor.legacy.as_ref().expect("[monitor] legacy");
    assert_eq!(m.token.as_ref().map(|t| t.expose()), Some(token));
    assert_eq!(
        c.publisher.reply_bind.as_str(),
        "tcp://*:5678",
        "inline comment kept?"
    );
    assert_eq!(
        c.publisher
            .legacy_broadcast_bind
            .as_ref()
            .map(|e| e.as_str()),
        Some("tcp://*:5680"),
        "old subscribers keep the old broadcast address"
    );
    assert_ne!(c.publisher.broadcast_bind.as_str(), "tcp://*:5680");
    let p = c.publisher.legacy.as_ref().expect("[publisher] legacy");
    assert_eq!(p.token.as_ref().map(|t| t.expose()), Some(token));
    assert!(c.subscriber.legacy);
    assert_eq!(
        c.subscriber.publisher[0].as_str(),
        "tcp://f2bcluster.example.org:5680"
    );
    assert_eq!(c.subscriber.action.name(), "log");

    // Not an old configuration: exit status 2 and a message.
    let other = dir.path().join("other.ini");
    write(&other, "[other]\nkey = value\n");
    let (code, out, err) = run(Command::new(bins::publisher())
        .arg("import-legacy-config")
        .arg(&other));
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("no [monitor], [publisher] or [subscriber] section"),
        "{err}"
    );
}
