//! A child process whose output lines the tests wait for.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use regex::Regex;

/// How long a process gets to exit after SIGTERM before it is killed (on drop).
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// How long [`Process::terminate_and_wait`] waits for a clean exit.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);

/// The most lines [`Process::dump`] prints (a daemon of a 10,000-event test prints
/// tens of thousands).
pub const DUMP_LINES: usize = 5000;

#[derive(Debug, Default)]
struct LogState {
    lines: Vec<String>,
    /// Output streams (stdout, stderr) not yet at end of file.
    open: usize,
}

#[derive(Debug, Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        // A reader thread never panics while holding the lock; recover anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running child. Its standard output and standard error are read line by line on
/// two reader threads into one shared buffer (in arrival order), which the test
/// waits on with a condition variable. Dropping it stops the child by its own PID
/// (SIGTERM, then SIGKILL after [`TERM_GRACE`]), and prints its whole output when
/// the test is failing.
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    child: Mutex<Child>,
    status: Mutex<Option<ExitStatus>>,
    log: Arc<Log>,
}

/// One matching line and its capture groups, owned.
#[derive(Debug, Clone)]
pub struct LineMatch {
    /// The whole line.
    pub line: String,
    /// Its index among the process's lines (for [`Process::wait_for_line_after`]).
    pub index: usize,
    groups: Vec<Option<String>>,
    names: Vec<(String, usize)>,
}

impl LineMatch {
    fn new(re: &Regex, line: &str, index: usize) -> Option<LineMatch> {
        let caps = re.captures(line)?;
        Some(LineMatch {
            line: line.to_owned(),
            index,
            groups: caps
                .iter()
                .map(|m| m.map(|m| m.as_str().to_owned()))
                .collect(),
            names: re
                .capture_names()
                .enumerate()
                .filter_map(|(i, n)| n.map(|n| (n.to_owned(), i)))
                .collect(),
        })
    }

    /// Capture group `i` (0: the whole match). Panics when it did not participate.
    pub fn get(&self, i: usize) -> &str {
        self.groups
            .get(i)
            .and_then(|g| g.as_deref())
            .unwrap_or_else(|| panic!("group {i} did not match in {:?}", self.line))
    }

    /// The named capture group `name`. Panics when it did not participate.
    pub fn name(&self, name: &str) -> &str {
        let i = self
            .names
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
            .unwrap_or_else(|| panic!("no group named {name:?}"));
        self.get(i)
    }

    /// The value of a `key=value` field of the line (see [`field`]). Panics when the
    /// line has no such field.
    pub fn field(&self, key: &str) -> String {
        field(&self.line, key).unwrap_or_else(|| panic!("no field {key:?} in line {:?}", self.line))
    }
}

/// An incremental count of the lines of one [`Process`] matching a pattern, for
/// polling thousands of lines: see [`Process::count`].
#[derive(Debug, Clone)]
pub struct LineCount {
    re: Regex,
    /// The index of the first line not matched yet.
    next: usize,
    /// The indexes of the matching lines.
    found: Vec<usize>,
}

impl LineCount {
    pub fn new(pattern: &str) -> LineCount {
        LineCount {
            re: compile(pattern),
            next: 0,
            found: Vec::new(),
        }
    }

    fn scan(&mut self, lines: &[String]) {
        for (i, l) in lines.iter().enumerate().skip(self.next) {
            if self.re.is_match(l) {
                self.found.push(i);
            }
        }
        self.next = self.next.max(lines.len());
    }
}

/// The value of a tracing `key=value` field in a log line: the text after `key=` up
/// to the next space, or the quoted string (quotes removed, `\"` and `\\`
/// unescaped) when the value was logged with Debug formatting.
pub fn field(line: &str, key: &str) -> Option<String> {
    let needle = format!("{key}=");
    let mut from = 0;
    while let Some(pos) = line[from..].find(&needle) {
        let start = from + pos;
        let at_word_start = start == 0 || line[..start].ends_with(char::is_whitespace);
        let value = &line[start + needle.len()..];
        if at_word_start {
            return Some(match value.strip_prefix('"') {
                Some(quoted) => {
                    let mut out = String::new();
                    let mut chars = quoted.chars();
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => break,
                            '\\' => out.extend(chars.next()),
                            c => out.push(c),
                        }
                    }
                    out
                }
                None => value.split_whitespace().next().unwrap_or("").to_owned(),
            });
        }
        from = start + needle.len();
    }
    None
}

/// Whether a tracing fmt line (`<time> <LEVEL> <target>: <message> k=v ...`) has the
/// message `message` and every field of `fields` with that value. The message may
/// go on after a `:` or `,` (a hint appended to it: `publisher unreachable: is ...`).
pub fn is_event(line: &str, message: &str, fields: &[(&str, &str)]) -> bool {
    let needle = format!(": {message}");
    let has_message = line.match_indices(&needle).any(|(i, _)| {
        let rest = &line[i + needle.len()..];
        rest.is_empty() || rest.starts_with([' ', ':', ','])
    });
    has_message
        && fields
            .iter()
            .all(|(k, v)| field(line, k).as_deref() == Some(*v))
}

/// Removes ANSI escape sequences (colours), in case a binary colours its logs.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn compile(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad regex {pattern:?}: {e}"))
}

fn spawn_reader(name: String, stream: impl Read + Send + 'static, log: Arc<Log>) {
    let echo = std::env::var_os("F2B_TEST_ECHO").is_some();
    std::thread::Builder::new()
        .name(format!("{name}-output"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let line = strip_ansi(text.trim_end_matches(['\n', '\r']));
                        if echo {
                            eprintln!("[{name}] {line}");
                        }
                        log.lock().lines.push(line);
                        log.changed.notify_all();
                    }
                }
            }
            log.lock().open -= 1;
            log.changed.notify_all();
        })
        .expect("cannot start a reader thread");
}

impl Process {
    /// Starts `cmd` (standard input from /dev/null, output captured). `name` labels
    /// it in messages.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Process {
        let name = name.into();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        let log = Arc::new(Log::default());
        log.lock().open = 2;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        spawn_reader(name.clone(), stdout, log.clone());
        spawn_reader(name.clone(), stderr, log.clone());
        Process {
            pid: child.id(),
            name,
            child: Mutex::new(child),
            status: Mutex::new(None),
            log,
        }
    }

    /// The label given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().lines.clone()
    }

    /// The number of lines so far: pass it to [`Process::wait_for_line_after`] to
    /// wait for a line printed after this point.
    pub fn mark(&self) -> usize {
        self.log.lock().lines.len()
    }

    /// The lines so far that match `pattern`.
    pub fn matching(&self, pattern: &str) -> Vec<String> {
        let re = compile(pattern);
        self.log
            .lock()
            .lines
            .iter()
            .filter(|l| re.is_match(l))
            .cloned()
            .collect()
    }

    /// How many lines so far match `pattern`.
    pub fn count_lines(&self, pattern: &str) -> usize {
        self.matching(pattern).len()
    }

    /// Waits until a line (any so far, or a later one) matches `pattern`, and returns
    /// the first that does. Panics with the whole output when `timeout` passes first
    /// or the process closes its output (exits) without printing one.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> LineMatch {
        self.wait_for_line_after(0, pattern, timeout)
    }

    /// As [`Process::wait_for_line`], considering only lines from index `mark` on.
    pub fn wait_for_line_after(&self, mark: usize, pattern: &str, timeout: Duration) -> LineMatch {
        self.try_wait_for_line_after(mark, pattern, timeout)
            .unwrap_or_else(|why| panic!("{why}\n{}", self.dump()))
    }

    /// As [`Process::wait_for_line_after`], returning why it failed instead of
    /// panicking.
    pub fn try_wait_for_line_after(
        &self,
        mark: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Result<LineMatch, String> {
        let re = compile(pattern);
        self.wait_until_line(
            mark,
            &format!("a line matching {pattern:?}"),
            timeout,
            |l, i| LineMatch::new(&re, l, i),
        )
    }

    /// The core of every wait: the first line from index `mark` on for which `test`
    /// returns something, waiting for new lines until `timeout`.
    fn wait_until_line<T>(
        &self,
        mark: usize,
        what: &str,
        timeout: Duration,
        mut test: impl FnMut(&str, usize) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        let mut next = mark;
        let mut st = self.log.lock();
        loop {
            while next < st.lines.len() {
                if let Some(found) = test(&st.lines[next], next) {
                    return Ok(found);
                }
                next += 1;
            }
            if st.open == 0 {
                drop(st);
                return Err(format!(
                    "{} exited ({}) without printing {what}",
                    self.name,
                    self.describe_status()
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "{} (pid {}) printed no {what} within {timeout:?}",
                    self.name, self.pid
                ));
            }
            st = self
                .log
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for a log event: a line whose message is `message` and whose fields
    /// include every `(key, value)` of `fields` (in any order, quoted or not).
    /// Returns the line.
    pub fn wait_for_event(
        &self,
        message: &str,
        fields: &[(&str, &str)],
        timeout: Duration,
    ) -> String {
        self.wait_for_event_after(0, message, fields, timeout)
    }

    /// As [`Process::wait_for_event`], considering only lines from index `mark` on.
    pub fn wait_for_event_after(
        &self,
        mark: usize,
        message: &str,
        fields: &[(&str, &str)],
        timeout: Duration,
    ) -> String {
        let what = format!("a {message:?} line with {fields:?}");
        self.wait_until_line(mark, &what, timeout, |l, _| {
            is_event(l, message, fields).then(|| l.to_owned())
        })
        .unwrap_or_else(|why| panic!("{why}\n{}", self.dump()))
    }

    /// The lines so far that are the event `message` with `fields`.
    pub fn events(&self, message: &str, fields: &[(&str, &str)]) -> Vec<String> {
        self.log
            .lock()
            .lines
            .iter()
            .filter(|l| is_event(l, message, fields))
            .cloned()
            .collect()
    }

    /// Waits until at least `n` lines match `pattern`; returns them all. Each new
    /// line is matched once, so waiting for thousands of lines costs little.
    pub fn wait_for_count(&self, pattern: &str, n: usize, timeout: Duration) -> Vec<String> {
        let mut count = LineCount::new(pattern);
        let deadline = Instant::now() + timeout;
        let mut st = self.log.lock();
        loop {
            count.scan(&st.lines);
            if count.found.len() >= n {
                return count.found.iter().map(|&i| st.lines[i].clone()).collect();
            }
            let now = Instant::now();
            if now >= deadline || st.open == 0 {
                let found = count.found.len();
                drop(st);
                panic!(
                    "{} printed {found} lines matching {pattern:?}, expected at least {n} \
                     (within {timeout:?})\n{}",
                    self.name,
                    self.dump()
                );
            }
            st = self
                .log
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// How many lines match `counter`'s pattern so far; only the lines printed since
    /// the counter's last use are matched.
    pub fn count(&self, counter: &mut LineCount) -> usize {
        counter.scan(&self.log.lock().lines);
        counter.found.len()
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            *status = child.try_wait().ok().flatten();
        }
        *status
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    fn describe_status(&self) -> String {
        match self.try_status() {
            Some(s) => s.to_string(),
            None => "still running".into(),
        }
    }

    /// Sends `signal` to the process, by its own PID, if it has not exited (a child
    /// not yet reaped keeps its PID, so this never hits another process).
    pub fn signal(&self, signal: Signal) {
        if self.is_running() {
            let pid = i32::try_from(self.pid).expect("PIDs fit in i32");
            // ESRCH: it exited between the check and the kill.
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None`. When it
    /// has exited, its output is read to the end first (for at most 5 s more: a
    /// grandchild may hold the pipes).
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                // Its last lines may still be in the pipes: read them first.
                self.wait_output_closed(Duration::from_secs(5));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) until both output streams are closed, so that the last lines
    /// are in the buffer. A grandchild that inherited the streams can keep them open:
    /// then this gives up after `timeout`.
    fn wait_output_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.log.lock();
        while st.open > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            st = self
                .log
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&self) {
        self.signal(Signal::SIGKILL);
        if self.wait_exit(SHUTDOWN_TIMEOUT).is_none() {
            panic!("{} (pid {}) survived SIGKILL", self.name, self.pid);
        }
        self.wait_output_closed(Duration::from_secs(2));
    }

    /// Sends SIGTERM and asserts that the process exits with status 0 within
    /// [`SHUTDOWN_TIMEOUT`]: the shutdown path of a daemon.
    pub fn terminate_and_wait(&self) {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(SHUTDOWN_TIMEOUT) {
            Some(s) if s.success() => self.wait_output_closed(Duration::from_secs(5)),
            Some(s) => {
                self.wait_output_closed(Duration::from_secs(2));
                panic!(
                    "{} did not exit cleanly on SIGTERM: {s}\n{}",
                    self.name,
                    self.dump()
                )
            }
            None => panic!(
                "{} did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM\n{}",
                self.name,
                self.dump()
            ),
        }
    }

    /// The output, framed, for failure messages: all of it up to [`DUMP_LINES`]
    /// lines, else its first and last lines (see [`Process::save_output`] for
    /// everything).
    pub fn dump(&self) -> String {
        let lines = self.lines();
        let mut s = format!(
            "----- {} (pid {}, {}), {} lines of output -----\n",
            self.name,
            self.pid,
            self.describe_status(),
            lines.len()
        );
        let (head, tail) = if lines.len() > DUMP_LINES {
            (DUMP_LINES / 5, DUMP_LINES - DUMP_LINES / 5)
        } else {
            (lines.len(), 0)
        };
        for l in &lines[..head] {
            s.push_str(l);
            s.push('\n');
        }
        if tail > 0 {
            s.push_str(&format!(
                "[... {} lines left out ...]\n",
                lines.len() - head - tail
            ));
            for l in &lines[lines.len() - tail..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s.push_str(&format!("----- end of {} -----", self.name));
        s
    }

    /// Writes the whole output to `path`, one line per line.
    pub fn save_output(&self, path: &std::path::Path) {
        let mut text = self.lines().join("\n");
        text.push('\n');
        if let Err(e) = std::fs::write(path, text) {
            eprintln!(
                "cannot save the output of {} to {}: {e}",
                self.name,
                path.display()
            );
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(Signal::SIGTERM);
            if self.wait_exit(TERM_GRACE).is_none() {
                self.signal(Signal::SIGKILL);
                let _ = self.wait_exit(SHUTDOWN_TIMEOUT);
            }
        }
        if std::thread::panicking() {
            self.wait_output_closed(Duration::from_secs(1));
            eprintln!("{}", self.dump());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str) -> Process {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script);
        Process::spawn(name, cmd)
    }

    #[test]
    fn fields_plain_and_quoted() {
        let line = r#"2026-11-21T04:52:53Z  INFO f2b_publisher: broadcast seq=3 jail="ssh d" ip=203.0.113.5 detail="say \"hi\"" xseq=9"#;
        assert_eq!(field(line, "seq").as_deref(), Some("3"));
        assert_eq!(field(line, "jail").as_deref(), Some("ssh d"));
        assert_eq!(field(line, "ip").as_deref(), Some("203.0.113.5"));
        assert_eq!(field(line, "detail").as_deref(), Some(r#"say "hi""#));
        assert_eq!(field(line, "node"), None);
        assert_eq!(field("a=1 b=", "b").as_deref(), Some(""));
    }

    #[test]
    fn events_match_message_and_fields() {
        let line = "2026-11-21T05:29:01.123Z  INFO f2b_monitor::send: reported action=ban jail=\"sshd\" ip=203.0.113.5 status=broadcast seq=3";
        assert!(is_event(line, "reported", &[]));
        assert!(is_event(
            line,
            "reported",
            &[("ip", "203.0.113.5"), ("jail", "sshd")]
        ));
        assert!(!is_event(line, "reported", &[("ip", "203.0.113.50")]));
        assert!(!is_event(line, "report", &[]));
        assert!(
            !is_event(line, "broadcast", &[]),
            "a field value is not a message"
        );
        let hinted = "2026-11-21T05:29:01.123Z  WARN f2b_monitor::send: publisher unreachable: is it running? attempt=1";
        assert!(is_event(
            hinted,
            "publisher unreachable",
            &[("attempt", "1")]
        ));
        let old = "2026-11-21T05:29:01.123Z  WARN f2b_monitor::send: publisher unreachable, will retry attempt=1";
        assert!(is_event(old, "publisher unreachable", &[]));
        assert!(!is_event(old, "publisher unreach", &[]));
    }

    #[test]
    fn ansi_colours_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=1"),
            "2026  INFO x=1"
        );
    }

    #[test]
    fn waits_for_lines_on_both_streams() {
        let p = sh(
            "sh",
            "echo 'listening on reply=tcp://127.0.0.1:1 broadcast=tcp://127.0.0.1:2'; \
             echo 'err line' >&2; sleep 30",
        );
        let m = p.wait_for_line(r"listening on reply=(\S+) broadcast=(?P<b>\S+)", TIMEOUT);
        assert_eq!(m.get(1), "tcp://127.0.0.1:1");
        assert_eq!(m.name("b"), "tcp://127.0.0.1:2");
        assert_eq!(m.field("reply"), "tcp://127.0.0.1:1");
        p.wait_for_line("^err line$", TIMEOUT);
        assert_eq!(p.count_lines("line"), 1);
        assert!(p.is_running());
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn wait_after_a_mark_ignores_earlier_lines() {
        let p = sh("sh", "echo one; echo two; sleep 0.2; echo one; sleep 30");
        p.wait_for_line("two", TIMEOUT);
        let mark = p.mark();
        let m = p.wait_for_line_after(mark, "^one$", TIMEOUT);
        assert!(m.index >= mark);
        assert_eq!(p.wait_for_count("^one$", 2, TIMEOUT).len(), 2);
    }

    #[test]
    fn an_exited_process_fails_the_wait_at_once() {
        let p = sh("quitter", "echo bye; exit 3");
        let start = Instant::now();
        let err = p
            .try_wait_for_line_after(0, "never", Duration::from_secs(30))
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10), "{err}");
        assert!(err.contains("quitter exited"), "{err}");
        assert_eq!(p.wait_exit(TIMEOUT).and_then(|s| s.code()), Some(3));
    }

    #[test]
    fn terminate_and_wait_checks_the_exit_status() {
        let p = sh(
            "sleeper",
            "trap 'exit 0' TERM; echo ready; while :; do sleep 0.05; done",
        );
        p.wait_for_line("ready", TIMEOUT);
        p.terminate_and_wait();
        assert_eq!(p.try_status().and_then(|s| s.code()), Some(0));

        let bad = sh(
            "bad",
            "trap 'exit 1' TERM; echo ready; while :; do sleep 0.05; done",
        );
        bad.wait_for_line("ready", TIMEOUT);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bad.terminate_and_wait()));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("did not exit cleanly"), "{msg}");
    }

    #[test]
    fn drop_kills_by_pid_even_when_sigterm_is_ignored() {
        let p = sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        );
        p.wait_for_line("ready", TIMEOUT);
        let pid = p.pid();
        let start = Instant::now();
        drop(p);
        assert!(start.elapsed() < TERM_GRACE + Duration::from_secs(5));
        // The PID is reaped: signalling it fails (unless reused, which is unlikely
        // this fast).
        assert!(kill(Pid::from_raw(pid as i32), None).is_err());
    }
}
