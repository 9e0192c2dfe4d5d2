//! The `f2b-publisher` binary: `--check`, the `listening on`, `ledger`, `trust` and
//! `rejected` log lines, legacy peers, SIGTERM ending it with status 0, a SIGKILL
//! and restart continuing the sequence, `import-legacy-config` and `keygen`.
//!
//! Every configuration here has a signing key and a credential for web1 (as a
//! real one must), unless a test is about their absence.

use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use f2b_common::sockets::new_socket;
use f2b_common::testing::{daemon_command, Process};
use f2b_common::zmq;
use f2b_proto::auth::{self, MonitorSecret, RequestAuth, SigningKey};
use f2b_proto::{NakReason, NodeName, Reply};

const DEADLINE: Duration = Duration::from_secs(10);

/// web1's secret in every test configuration.
const WEB1: &str = "web1-secret-SHOULD-NOT-BE-LOGGED-0123456789";

/// The seed of every test configuration's signing key.
const KEY_SEED: [u8; 32] = [7; 32];

/// A configuration file and the publisher's state directory, both removed on drop.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// Writes the configuration with these binds, `extra` lines in `[publisher]`,
    /// and `[trust]` (the test signing key and web1's credential); returns its
    /// path.
    fn config(&self, reply: &str, broadcast: &str, extra: &str) -> std::path::PathBuf {
        let key = self.dir.path().join("publisher.key");
        std::fs::write(&key, SigningKey::from_seed(KEY_SEED).to_file_text()).unwrap();
        let trust = format!(
            "[trust]\nsigning_key_file = {:?}\n[trust.monitors]\nweb1 = {WEB1:?}\n",
            key.display().to_string()
        );
        self.config_with_trust(reply, broadcast, extra, &trust)
    }

    /// The configuration with `trust` as its `[trust]` tables.
    fn config_with_trust(
        &self,
        reply: &str,
        broadcast: &str,
        extra: &str,
        trust: &str,
    ) -> std::path::PathBuf {
        let path = self.dir.path().join("publisher.conf");
        let text = format!(
            "[node]\nname = \"hub\"\n[publisher]\nreply_bind = \"{reply}\"\n\
             broadcast_bind = \"{broadcast}\"\nheartbeat_interval = \"250ms\"\n\
             ban_time = \"1h 30m\"\nstate_dir = {:?}\n{extra}\n{trust}",
            self.state_dir().display().to_string()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ephemeral(&self, extra: &str) -> std::path::PathBuf {
        self.config("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", extra)
    }
}

fn publisher() -> Command {
    Command::new(env!("CARGO_BIN_EXE_f2b-publisher"))
}

#[test]
fn check_prints_the_summary() {
    let setup = Setup::new();
    let conf = setup.ephemeral("legacy = true\nlegacy_token = \"hush-hush\"");
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for line in [
        "reply_bind = tcp://127.0.0.1:*",
        "broadcast_bind = tcp://127.0.0.1:*",
        "heartbeat_interval = 250ms",
        "ban_time = 90m",
        "legacy = true (token: set)",
        "rate_limit = 50/s",
        "quarantine_floor = 3000",
        "trust.monitors = 1 (web1)",
        &format!(
            "trust.public_key = {}",
            SigningKey::from_seed(KEY_SEED).public()
        ),
        "trust.max_clock_skew = 1m",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in {stdout}");
    }
    assert!(!stdout.contains("hush-hush"), "{stdout}");
    assert!(!stdout.contains(WEB1), "{stdout}");
    let key_text = SigningKey::from_seed(KEY_SEED).to_file_text();
    assert!(!stdout.contains(key_text.trim()), "{stdout}");
    assert!(
        !setup.state_dir().exists(),
        "--check created the state directory"
    );

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "[publisher]\nban_time = 0\n").unwrap();
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("publisher.ban_time"));

    // No signing key, no credential: refused, naming the key; and, for the
    // daemon itself, before anything starts.
    let untrusted = setup.config_with_trust("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", "", "");
    for check in [true, false] {
        let mut cmd = publisher();
        if check {
            cmd.arg("--check");
        }
        let out = cmd.arg("--config").arg(&untrusted).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("trust.signing_key_file") && err.contains("keygen"),
            "{err}"
        );
        assert!(err.contains("publisher.conf"), "{err}");
    }
    assert!(
        !setup.state_dir().exists(),
        "a refused start created the state"
    );
    let key = setup.dir.path().join("publisher.key");
    let no_monitors = setup.config_with_trust(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        "",
        &format!(
            "[trust]\nsigning_key_file = {:?}\n",
            key.display().to_string()
        ),
    );
    let out = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&no_monitors)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("trust.monitors"));
}

/// The publisher with this configuration, its stderr lines awaited with
/// [`Process::wait_for_all`]; killed by PID if the test ends without stopping it.
fn start(config: &std::path::Path) -> Process {
    Process::spawn(&mut daemon_command(
        env!("CARGO_BIN_EXE_f2b-publisher"),
        config,
    ))
}

/// SIGTERM, the `stopped` line, then the exit status once standard error closed.
fn terminate(p: &mut Process) -> ExitStatus {
    p.signal("TERM");
    p.wait_for_all(&["stopped"], DEADLINE);
    p.wait_exit(DEADLINE)
}

fn field(line: &str, key: &str) -> String {
    let start = line.find(&format!(" {key}=")).expect(key) + key.len() + 2;
    line[start..].split(' ').next().unwrap().to_owned()
}

#[test]
fn serves_logs_and_stops_on_sigterm() {
    let setup = Setup::new();
    let conf = setup.ephemeral("");
    let mut p = start(&conf);
    let ledger = p.wait_for_all(&[": ledger path="], DEADLINE);
    let file = setup.state_dir().join("ledger.sqlite3");
    assert_eq!(
        field(&ledger, "path"),
        file.display().to_string(),
        "{ledger}"
    );
    assert_eq!(field(&ledger, "seq"), "0", "{ledger}");
    assert_eq!(field(&ledger, "active"), "0", "{ledger}");
    assert_eq!(field(&ledger, "epoch").len(), 16, "{ledger}");
    let line = p.wait_for_all(
        &[
            "listening on",
            "reply=tcp://127.0.0.1:",
            "broadcast=tcp://127.0.0.1:",
        ],
        DEADLINE,
    );
    let reply = field(&line, "reply");
    assert!(!reply.ends_with(":*"), "{line}");
    let trust = p.wait_for_all(&["trust:", "INFO"], DEADLINE);
    assert!(trust.contains("monitors=1"), "{trust}");
    assert_eq!(
        field(&trust, "public_key"),
        SigningKey::from_seed(KEY_SEED).public().to_string(),
        "{trust}"
    );

    let ctx = zmq::Context::new();
    let req = new_socket(&ctx, zmq::REQ).unwrap();
    req.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    req.connect(&reply).unwrap();
    req.send("{\"v\":1,\"type\":\"report\"", 0).unwrap();
    let answer = Reply::decode(&req.recv_bytes(0).unwrap()).unwrap();
    assert!(
        matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed),
        "{answer:?}"
    );
    let rejected = p.wait_for_all(&["rejected"], DEADLINE);
    assert!(rejected.contains(" WARN "), "{rejected}");
    assert_eq!(field(&rejected, "reason"), "malformed", "{rejected}");
    assert_eq!(field(&rejected, "peer"), "127.0.0.1", "{rejected}");
    // The detail is quoted and escaped: a hostile value cannot forge a log line.
    assert!(
        rejected.contains(" detail=\"malformed message: "),
        "{rejected}"
    );

    // A fail2ban-zmq-tools request, legacy being off: the old refusal.
    req.send("web1|sshd|Ban|203.0.113.5", 0).unwrap();
    assert_eq!(req.recv_bytes(0).unwrap(), b"NAK");
    let rejected = p.wait_for_all(&["rejected", "legacy"], DEADLINE);
    assert_eq!(field(&rejected, "reason"), "legacy_disabled", "{rejected}");
    assert_eq!(field(&rejected, "peer"), "127.0.0.1", "{rejected}");

    let status = terminate(&mut p);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

fn req_socket(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let req = new_socket(ctx, zmq::REQ).unwrap();
    req.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    req.connect(endpoint).unwrap();
    req
}

/// A report of a ban of `ip` by web1, signed now: the request's two frames.
fn ban(id: u128, ip: &str) -> Vec<Vec<u8>> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let e = f2b_proto::Event::new(
        f2b_proto::EventId::from_u128(id),
        f2b_proto::NodeName::new("web1").unwrap(),
        f2b_proto::JailName::new("sshd").unwrap(),
        f2b_proto::Action::Ban,
        ip.parse().unwrap(),
        now,
    )
    .unwrap();
    let payload = f2b_proto::Request::Report(e).encode();
    let a = RequestAuth::sign(
        &MonitorSecret::new(WEB1).unwrap(),
        &NodeName::new("web1").unwrap(),
        now,
        std::array::from_fn(|_| fastrand::u8(..)),
        &payload,
    );
    vec![payload, a.encode()]
}

/// Sends a signed report and returns the reply, its MAC checked.
fn signed_reply(req: &zmq::Socket, report: Vec<Vec<u8>>) -> Reply {
    let a = RequestAuth::decode(&report[1]).unwrap();
    req.send_multipart(report, 0).unwrap();
    let reply = req.recv_multipart(0).unwrap();
    assert_eq!(reply.len(), 2, "{reply:?}");
    let secret = MonitorSecret::new(WEB1).unwrap();
    assert!(auth::verify_reply(&secret, &a.mac, &reply[0], &reply[1]));
    Reply::decode(&reply[0]).unwrap()
}

/// Sends a report and returns the sequence number it was broadcast with.
fn broadcast_seq(req: &zmq::Socket, report: Vec<Vec<u8>>) -> u64 {
    match signed_reply(req, report) {
        Reply::Ack(a) if a.status == f2b_proto::AckStatus::Broadcast => a.seq.unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_sigkill_a_restart_continues_the_sequence_in_the_same_epoch() {
    let setup = Setup::new();
    let mut p = start(&setup.ephemeral(""));
    let ledger = p.wait_for_all(&[": ledger path="], DEADLINE);
    let epoch = field(&ledger, "epoch");
    let line = p.wait_for_all(&["listening on"], DEADLINE);
    let (reply, broadcast) = (field(&line, "reply"), field(&line, "broadcast"));

    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    for n in 1..=5u64 {
        let ip = format!("203.0.113.{n}");
        assert_eq!(broadcast_seq(&req, ban(n.into(), &ip)), n);
    }
    // SIGKILL by PID: no clean-up, no chance to flush anything.
    p.signal("KILL");
    let status = p.wait_exit(DEADLINE);
    assert_eq!(status.code(), None, "{status:?}");
    drop(req);

    // The same ports, the same state directory. The dead process may have
    // broadcast a batch it never committed (broadcasts go out before the sync), so
    // the numbers such a batch could have used are skipped, loudly.
    let skip = f2b_publisher::ledger::EARLY_BROADCAST_MAX;
    let mut p = start(&setup.config(&reply, &broadcast, ""));
    let warned = p.wait_for_all(&["did not stop cleanly", "skipped="], DEADLINE);
    assert_eq!(field(&warned, "skipped"), skip.to_string(), "{warned}");
    let ledger = p.wait_for_all(&[": ledger path="], DEADLINE);
    assert_eq!(field(&ledger, "epoch"), epoch, "{ledger}");
    assert_eq!(field(&ledger, "seq"), (5 + skip).to_string(), "{ledger}");
    assert_eq!(field(&ledger, "active"), "5", "{ledger}");
    let line = p.wait_for_all(&["listening on"], DEADLINE);
    assert_eq!(field(&line, "reply"), reply);
    let req = req_socket(&ctx, &reply);
    let next = 6 + skip;
    assert_eq!(broadcast_seq(&req, ban(6, "203.0.113.6")), next);
    let line = p.wait_for_all(&["broadcast", &format!("seq={next}")], DEADLINE);
    assert!(line.contains("ip=203.0.113.6"), "{line}");
    assert_eq!(field(&line, "reported_by"), "web1", "{line}");
    // A resend from before the crash is a duplicate, not a new broadcast.
    match signed_reply(&req, ban(3, "203.0.113.3")) {
        Reply::Ack(a) => assert_eq!(
            (a.status, a.seq),
            (f2b_proto::AckStatus::Duplicate, Some(3))
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(terminate(&mut p).code(), Some(0));
    drop(req);

    // After a clean stop nothing is skipped.
    let mut p = start(&setup.config(&reply, &broadcast, ""));
    let ledger = p.wait_for_all(&[": ledger path="], DEADLINE);
    assert_eq!(field(&ledger, "seq"), next.to_string(), "{ledger}");
    assert!(!p.seen().iter().any(|l| l.contains("did not stop cleanly")));
    p.wait_for_all(&["listening on"], DEADLINE);
    let req = req_socket(&ctx, &reply);
    assert_eq!(broadcast_seq(&req, ban(7, "203.0.113.7")), next + 1);
    assert_eq!(terminate(&mut p).code(), Some(0));
}

/// A flood of refused requests: every one is answered, at most 10 `rejected` lines
/// per second are logged, and summary lines account for all the others.
#[test]
fn a_flood_of_garbage_is_logged_throttled_and_summed_up() {
    let setup = Setup::new();
    let mut p = start(&setup.ephemeral(""));
    let line = p.wait_for_all(&["listening on"], DEADLINE);
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &field(&line, "reply"));
    let n = 300u64;
    let start = Instant::now();
    for _ in 0..n {
        req.send("{garbage", 0).unwrap();
        let answer = Reply::decode(&req.recv_bytes(0).unwrap()).unwrap();
        assert!(matches!(answer, Reply::Nak(ref n) if n.reason == NakReason::Malformed));
    }
    let took = start.elapsed();
    let (mut logged, mut suppressed) = (0u64, 0u64);
    while logged + suppressed < n {
        let line = p.wait_for_all(&["rejected", "reason=malformed"], DEADLINE);
        if line.contains("(suppressed ") {
            assert!(line.contains(" more in the last "), "{line}");
            suppressed += field(&line, "suppressed").parse::<u64>().unwrap();
        } else {
            assert_eq!(field(&line, "peer"), "127.0.0.1", "{line}");
            logged += 1;
        }
    }
    assert_eq!(logged + suppressed, n);
    // Windows of one second: those the flood spanned, and one more at most.
    let windows = took.as_secs() + 2;
    assert!(logged <= 10 * windows, "{logged} lines logged in {took:?}");
    assert!(suppressed > 0);
    assert_eq!(terminate(&mut p).code(), Some(0));
}

#[test]
fn legacy_peers_and_the_token_never_in_the_log() {
    let setup = Setup::new();
    let token = "tok-SECRET-value";
    let conf = setup.ephemeral(&format!(
        "legacy = true\nlegacy_token = \"{token}\"\nlegacy_broadcast_bind = \"tcp://127.0.0.1:*\""
    ));
    let mut p = start(&conf);
    let line = p.wait_for_all(
        &["listening on", "legacy_broadcast=tcp://127.0.0.1:"],
        DEADLINE,
    );
    let reply = field(&line, "reply");
    let legacy = field(&line, "legacy_broadcast");
    assert!(
        !legacy.ends_with(":*") && legacy != field(&line, "broadcast"),
        "{line}"
    );

    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &reply);
    req.send(format!("{token}|web1|sshd|Ban|203.0.113.5").as_bytes(), 0)
        .unwrap();
    assert_eq!(req.recv_bytes(0).unwrap(), b"web1|sshd|Ban|203.0.113.5");
    let line = p.wait_for_all(&["broadcast", "seq=1"], DEADLINE);
    assert!(line.contains("origin=legacy"), "{line}");
    assert_eq!(field(&line, "reported_by"), "legacy", "{line}");
    assert!(
        p.seen()
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("only by a plaintext token")),
        "no warning about the legacy token"
    );
    for bad in [
        "web1|sshd|Ban|203.0.113.6".to_owned(),
        format!("{token}x|web1|sshd|Ban|203.0.113.6"),
        format!("{token}|web1|sshd|Ban|::1"),
    ] {
        req.send(bad.as_bytes(), 0).unwrap();
        assert_eq!(req.recv_bytes(0).unwrap(), b"NAK", "{bad}");
        let rejected = p.wait_for_all(&["rejected"], DEADLINE);
        assert_eq!(field(&rejected, "reason"), "legacy_invalid", "{rejected}");
    }
    assert_eq!(terminate(&mut p).code(), Some(0));
    let leaked: Vec<&String> = p
        .seen()
        .iter()
        .filter(|l| l.contains("SECRET") || l.contains("SHOULD-NOT-BE-LOGGED"))
        .collect();
    assert!(leaked.is_empty(), "the token was logged: {leaked:?}");
}

#[test]
fn import_legacy_config_prints_the_converted_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.conf");
    std::fs::write(
        &old,
        "[publisher]\npidfile = /var/run/fail2ban-publisher.pid\n\
         broadcasterbindurl = tcp://*:5680\nreplybindurl = tcp://*:5678\n",
    )
    .unwrap();
    let out = publisher()
        .arg("import-legacy-config")
        .arg(&old)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&old.display().to_string()), "{text}");
    // What it prints is a valid configuration, which the publisher accepts (with
    // the explicit opt-out of credentials, until the converter writes one: old
    // monitors have none).
    let new = dir.path().join("new.conf");
    let accepted = if text.contains("[trust]") {
        text.clone()
    } else {
        format!("{text}\n[trust]\nallow_unauthenticated = true\n")
    };
    std::fs::write(&new, &accepted).unwrap();
    let check = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&new)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}\n{text}");
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(
        summary.contains("legacy_broadcast_bind = tcp://*:5680"),
        "{summary}"
    );
    assert!(
        out.stderr.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (name, content) in [
        ("missing.conf", None),
        ("empty.conf", Some("[other]\na = 1\n")),
    ] {
        let path = dir.path().join(name);
        if let Some(c) = content {
            std::fs::write(&path, c).unwrap();
        }
        let out = publisher()
            .arg("import-legacy-config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name), "{err}");
    }
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `keygen` writes a private key file, prints the subscribers' line, refuses to
/// overwrite without --force; the key it wrote is the one the publisher then
/// signs with.
#[test]
fn keygen_writes_a_private_signing_key_and_prints_the_public_one() {
    let setup = Setup::new();
    let key = setup.dir.path().join("keys/publisher.key");
    let out = publisher()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    let signing = SigningKey::parse(&text).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = format!("publisher_key = \"{}\"", signing.public());
    assert!(stdout.lines().any(|l| l == line), "{stdout}");
    assert!(!stdout.contains(text.trim()), "the secret key was printed");
    // What it prints is valid in a subscriber's configuration.
    let toml: f2b_common::config::RawConfig =
        f2b_common::config::parse(&format!("[trust]\n{stdout}")).unwrap();
    assert!(toml.trust.publisher_key.is_some());

    // Not overwritten without --force.
    let out = publisher()
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_to_string(&key).unwrap(), text);
    let out = publisher()
        .args(["keygen", "--force", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let new = std::fs::read_to_string(&key).unwrap();
    assert_ne!(new, text);
    assert_eq!(mode(&key), 0o600);

    // The publisher signs with it: its start line names the public key.
    let conf = setup.config_with_trust(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        "",
        &format!(
            "[trust]\nsigning_key_file = {:?}\n[trust.monitors]\nweb1 = {WEB1:?}\n",
            key.display().to_string()
        ),
    );
    let mut p = start(&conf);
    let line = p.wait_for_all(&["trust:"], DEADLINE);
    assert_eq!(
        field(&line, "public_key"),
        SigningKey::parse(&new).unwrap().public().to_string()
    );
    assert_eq!(terminate(&mut p).code(), Some(0));
    assert!(
        !p.seen()
            .iter()
            .any(|l| l.contains(new.trim()) || l.contains(WEB1)),
        "a secret was logged"
    );
}

/// `keygen --monitor NODE`: a fresh credential, to a private file or printed in
/// the config lines; the lines make a configuration the publisher accepts.
#[test]
fn keygen_makes_monitor_credentials() {
    let setup = Setup::new();
    let file = setup.dir.path().join("monitors/web2.secret");
    let out = publisher()
        .args(["keygen", "--monitor", "web2", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mode(&file), 0o600);
    let secret = std::fs::read_to_string(&file).unwrap();
    assert!(MonitorSecret::new(&secret).is_ok());
    assert_eq!(secret.trim().len(), 44);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(!stdout.contains(secret.trim()), "{stdout}");
    let hub_line = format!(
        "web2 = {{ secret_file = {:?} }}",
        file.display().to_string()
    );
    let node_line = format!("secret_file = {:?}", file.display().to_string());
    assert!(stdout.lines().any(|l| l == hub_line), "{stdout}");
    assert!(stdout.lines().any(|l| l == node_line), "{stdout}");
    // Not overwritten without --force.
    let again = publisher()
        .args(["keygen", "--monitor", "web2", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);

    // Without a file: the secret is in the lines, which the publisher (and the
    // node) accept as they are.
    let out = publisher()
        .args(["keygen", "--monitor", "Web3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hub_line = stdout
        .lines()
        .find(|l| l.starts_with("web3 = \""))
        .unwrap_or_else(|| panic!("{stdout}"));
    let node_line = stdout
        .lines()
        .find(|l| l.starts_with("secret = \""))
        .unwrap_or_else(|| panic!("{stdout}"));
    let key = setup.dir.path().join("publisher.key");
    std::fs::write(&key, SigningKey::from_seed(KEY_SEED).to_file_text()).unwrap();
    let conf = setup.config_with_trust(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        "",
        &format!(
            "[trust]\nsigning_key_file = {:?}\n[trust.monitors]\n{hub_line}\n{}\n",
            key.display().to_string(),
            format_args!(
                "web2 = {{ secret_file = {:?} }}",
                file.display().to_string()
            ),
        ),
    );
    let check = publisher()
        .arg("--check")
        .arg("--config")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let summary = String::from_utf8_lossy(&check.stdout);
    assert!(
        summary.contains("trust.monitors = 2 (web2, web3)"),
        "{summary}"
    );
    assert!(!summary.contains(secret.trim()), "{summary}");
    let node: f2b_common::config::RawConfig =
        f2b_common::config::parse(&format!("[trust]\n{node_line}\n")).unwrap();
    assert!(node.trust.secret.is_some());

    let out = publisher()
        .args(["keygen", "--monitor", "bad name"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--monitor"));
    // The subcommand is in the man page and the completions.
    for args in [&["man"][..], &["completions", "bash"]] {
        let out = publisher().args(args).output().unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("keygen"),
            "{args:?}"
        );
    }
}

/// With the explicit opt-out, a report without credentials is accepted, and the
/// start says loudly what that allows.
#[test]
fn allow_unauthenticated_warns_at_start_and_accepts_reports_without_credentials() {
    let setup = Setup::new();
    let conf = setup.config_with_trust(
        "tcp://127.0.0.1:*",
        "tcp://127.0.0.1:*",
        "",
        "[trust]\nallow_unauthenticated = true\n",
    );
    let mut p = start(&conf);
    let warn = p.wait_for_all(&["allow_unauthenticated"], DEADLINE);
    assert!(
        warn.contains(" WARN ") && warn.contains("without an authentication frame"),
        "{warn}"
    );
    let line = p.wait_for_all(&["listening on"], DEADLINE);
    let unsigned = p.wait_for_all(&["no signing key"], DEADLINE);
    assert!(unsigned.contains(" WARN "), "{unsigned}");
    let ctx = zmq::Context::new();
    let req = req_socket(&ctx, &field(&line, "reply"));
    let mut frames = ban(1, "203.0.113.1");
    frames.truncate(1);
    req.send_multipart(frames, 0).unwrap();
    let reply = req.recv_multipart(0).unwrap();
    assert_eq!(reply.len(), 1);
    assert!(matches!(Reply::decode(&reply[0]).unwrap(), Reply::Ack(_)));
    let line = p.wait_for_all(&["broadcast", "seq=1"], DEADLINE);
    assert_eq!(field(&line, "reported_by"), "-", "{line}");
    assert_eq!(terminate(&mut p).code(), Some(0));
}
