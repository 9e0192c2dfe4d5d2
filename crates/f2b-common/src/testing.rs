//! Support for the daemons' integration tests, which run the real binaries as
//! processes (feature `testing`, off by default; the daemon crates turn it on in
//! their `[dev-dependencies]`).
//!
//! - [`Process`]: a spawned binary, killed by its own PID when dropped (a failing
//!   test leaves nothing running), whose standard error lines arrive on a channel:
//!   [`Process::wait_for_line`] waits for one with a deadline and fails the test
//!   with every line seen so far; [`Process::signal`] and [`Process::wait_exit`].
//! - [`NotifySocket`]: stands in for systemd's `NOTIFY_SOCKET`, a Unix datagram
//!   socket the daemon sends `READY=1`, `STATUS=...` and `STOPPING=1` to.
//! - [`http_get`]: one HTTP/1.1 GET over a plain `TcpStream` (the `/metrics`,
//!   `/healthz` and `/readyz` scrapes), and [`sample`]/[`value`] to read a value
//!   out of the Prometheus/OpenMetrics text.
//!
//! Every wait here takes its limit as an argument and panics when it passes,
//! saying what it waited for and what came instead (at the test's line: the
//! waits are `#[track_caller]`): tests never sleep and hope.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// `bin --config CONFIG --log-level info`: a daemon as the tests run it, to add
/// to (`.env("NOTIFY_SOCKET", ...)`) and hand to [`Process::spawn`].
pub fn daemon_command(bin: &str, config: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(config)
        .args(["--log-level", "info"]);
    cmd
}

/// A running binary whose standard error lines arrive on a channel; killed (by
/// its own PID, through [`Child::kill`]) on drop if it is still running.
#[derive(Debug)]
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Process {
    /// Spawns `cmd` (its program, arguments and environment as the test set
    /// them) with standard input and output on `/dev/null` and standard error
    /// read line by line by a thread.
    pub fn spawn(cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        let stderr = child.stderr.take().expect("standard error is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Every standard error line read so far, by any wait.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// The next line containing `part`; panics after `within`, or if standard
    /// error closes first, with every line seen so far.
    #[track_caller]
    pub fn wait_for_line(&mut self, part: &str, within: Duration) -> String {
        self.wait_for_all(&[part], within)
    }

    /// The next line containing every one of `parts`; panics like
    /// [`wait_for_line`](Self::wait_for_line).
    #[track_caller]
    pub fn wait_for_all(&mut self, parts: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {parts:?} ({e}); output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Sends signal `sig` (a name such as `TERM`, `HUP`, `KILL`) to this process
    /// with `kill(1)`; panics if that fails.
    #[track_caller]
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(&pid)
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{sig} {pid}: {status}");
    }

    /// Waits for the exit: reads standard error until it closes (the lines go to
    /// [`seen`](Self::seen)), then reaps the process. Panics after `within`
    /// with every line seen so far.
    #[track_caller]
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let end = Instant::now() + within;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "still running after {within:?}; output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Stands in for systemd's notification socket: a Unix datagram socket bound
/// as `notify.sock` in a directory of the test; pass [`path`](Self::path) to the
/// daemon as `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl NotifySocket {
    /// Binds `dir/notify.sock`.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock =
            UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts the daemon `bin` with `config` ([`daemon_command`]) and
    /// `NOTIFY_SOCKET` set to this socket.
    pub fn spawn(&self, bin: &str, config: &Path) -> Process {
        Process::spawn(daemon_command(bin, config).env("NOTIFY_SOCKET", &self.path))
    }

    /// The next datagram with a line equal to `line` (such as `READY=1`);
    /// panics after `within` with every datagram received so far.
    #[track_caller]
    pub fn expect(&mut self, line: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line:?} from the daemon; got {:?}",
                self.seen
            );
            self.sock
                .set_read_timeout(Some(left))
                .expect("read timeout");
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(text.clone());
                    if text.lines().any(|l| l == line) {
                        return text;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("notification socket: {e}"),
            }
        }
    }

    /// A datagram already received with a line equal to `line`, or else the
    /// next one ([`expect`](Self::expect)).
    #[track_caller]
    pub fn seen_or_expect(&mut self, line: &str, within: Duration) -> String {
        match self.seen.iter().find(|d| d.lines().any(|l| l == line)) {
            Some(d) => d.clone(),
            None => self.expect(line, within),
        }
    }

    /// The `STATUS=` text of the next datagram with a line equal to `line`
    /// (such as `READY=1`); panics like [`expect`](Self::expect), or if that
    /// datagram has no `STATUS=`.
    #[track_caller]
    pub fn expect_status(&mut self, line: &str, within: Duration) -> String {
        let datagram = self.expect(line, within);
        match datagram.lines().find_map(|l| l.strip_prefix("STATUS=")) {
            Some(status) => status.to_owned(),
            None => panic!("a STATUS= with {line}: {datagram:?}"),
        }
    }

    /// Stops `daemon` as systemd does: SIGTERM, then the next datagram with
    /// `STOPPING=1` and the exit, each within `within`; returns that datagram
    /// and the exit status.
    #[track_caller]
    pub fn stop(&mut self, daemon: &mut Process, within: Duration) -> (String, ExitStatus) {
        daemon.signal("TERM");
        let stopping = self.expect("STOPPING=1", within);
        (stopping, daemon.wait_exit(within))
    }

    /// Asserts a clean stop as systemd sees it: after SIGTERM ([`stop`](Self::stop)),
    /// a `STOPPING=1` datagram with `STATUS=stopping (SIGTERM)`, exit status 0,
    /// and `READY=1` sent exactly once in the daemon's life.
    #[track_caller]
    pub fn assert_clean_stop(&mut self, daemon: &mut Process, within: Duration) {
        let (stopping, status) = self.stop(daemon, within);
        assert!(
            stopping.contains("STATUS=stopping (SIGTERM)"),
            "{stopping:?}"
        );
        assert_eq!(status.code(), Some(0), "{}", daemon.seen().join("\n"));
        assert_eq!(self.count("READY=1"), 1, "READY=1 once: {:?}", self.seen);
    }

    /// Asserts a failed start: `daemon` exits within `within` with a status
    /// other than success, a line of its standard error contains `part` (what
    /// the error names), and it never sent `READY=1`.
    #[track_caller]
    pub fn assert_failed_start(&mut self, daemon: &mut Process, part: &str, within: Duration) {
        let status = daemon.wait_exit(within);
        let lines = daemon.seen().join("\n");
        assert!(!status.success(), "{lines}");
        assert!(daemon.seen().iter().any(|l| l.contains(part)), "{lines}");
        assert_eq!(
            self.count("READY=1"),
            0,
            "no READY=1 from a failed start: {:?}",
            self.seen
        );
    }

    /// How many datagrams received so far, the queued ones included, have a
    /// line equal to `line`.
    pub fn count(&mut self, line: &str) -> usize {
        self.drain()
            .iter()
            .filter(|d| d.lines().any(|l| l == line))
            .count()
    }

    /// Every datagram received so far (without reading the queue).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Every datagram received: those seen by earlier waits and those queued now.
    pub fn drain(&mut self) -> Vec<String> {
        self.sock.set_nonblocking(true).expect("non-blocking");
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.seen.clone()
    }
}

/// One HTTP/1.1 GET of `path` from `addr` over a new connection
/// (`Connection: close`): the status code and the body. Panics if there is no
/// answer within `within` or it is not HTTP.
pub fn http_get<A>(addr: A, path: &str, within: Duration) -> (u16, String)
where
    A: ToSocketAddrs + std::fmt::Display,
{
    let mut s = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_read_timeout(Some(within)).expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("writing the request");
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("reading the answer to GET {path} from {addr}: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not HTTP (no end of headers): {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP (no status line): {head:?}"));
    (status, body.to_owned())
}

/// The value of the sample `series` (its name and labels exactly as exposed,
/// such as `f2b_monitor_naks_total{reason="busy"}`) in a Prometheus/OpenMetrics
/// text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The value of the sample `series`; panics with the whole text if it is absent.
#[track_caller]
pub fn value(text: &str, series: &str) -> f64 {
    match sample(text, series) {
        Some(v) => v,
        None => panic!("{series} missing from:\n{text}"),
    }
}
