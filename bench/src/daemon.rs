//! The daemons under measurement: the release binaries, started as child processes
//! whose log lines are read on a thread without being kept (a publisher taking a
//! million events prints a million lines): only the last few are kept, for error
//! messages, and lines are counted by the substrings asked for at start.
//! Also: a process's memory and CPU time from /proc.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Log lines kept per daemon, for error messages.
const TAIL: usize = 400;

/// Where the release binaries are: beside this one (`target/release/`).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("target/release"))
}

/// The path of a binary beside this one; an error saying how to build it when it
/// is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: scripts/bench builds the release binaries first \
             (cargo build --release -p f2b-publisher -p f2b-monitor -p f2b-subscriber)",
            p.display()
        );
    }
    Ok(p)
}

#[derive(Debug, Default)]
struct State {
    /// The last [`TAIL`] lines, with the index of the first.
    tail: VecDeque<String>,
    first: usize,
    total: usize,
    /// Per counter: how many lines matched, and when the last did.
    counts: Vec<(usize, Option<Instant>)>,
    open: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running daemon. Dropping it stops it by its own PID (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct Daemon {
    name: String,
    pid: u32,
    /// Run under `F2B_BENCH_WRAP_*`, in a process group of its own.
    group: bool,
    child: Mutex<Child>,
    shared: Arc<Shared>,
    counters: Vec<String>,
}

impl Daemon {
    /// Starts `cmd`; every output line containing `counters[i]` increments counter
    /// `i` ([`Daemon::wait_count`]). With `F2B_BENCH_WRAP_<NAME>` set (the daemon's
    /// binary name in upper case, `-` as `_`, for instance
    /// `F2B_BENCH_WRAP_F2B_PUBLISHER="valgrind --tool=callgrind"`), the daemon runs
    /// under that command, for profiling; with `F2B_BENCH_LOGS=DIR` its output is
    /// copied to a file there.
    pub fn spawn(name: &str, mut cmd: Command, counters: &[&str]) -> anyhow::Result<Daemon> {
        let program = cmd.get_program().to_owned();
        let var = format!(
            "F2B_BENCH_WRAP_{}",
            Path::new(&program)
                .file_name()
                .map(|f| f.to_string_lossy().to_uppercase().replace('-', "_"))
                .unwrap_or_default()
        );
        let mut group = false;
        if let Ok(wrap) = std::env::var(&var) {
            let mut words = wrap.split_whitespace();
            if let Some(first) = words.next() {
                let mut wrapped = Command::new(first);
                wrapped.args(words).arg(&program).args(cmd.get_args());
                for (k, v) in cmd.get_envs() {
                    match v {
                        Some(v) => wrapped.env(k, v),
                        None => wrapped.env_remove(k),
                    };
                }
                if let Some(d) = cmd.get_current_dir() {
                    wrapped.current_dir(d);
                }
                eprintln!("    {name}: run under {wrap:?} ({var})");
                // Its own process group, signalled whole by `stop`: a wrapper
                // such as strace detaches on SIGTERM and would leave the
                // daemon running.
                std::os::unix::process::CommandExt::process_group(&mut wrapped, 0);
                group = true;
                cmd = wrapped;
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            st.open = 2;
            st.counts = vec![(0, None); counters.len()];
        }
        let out = child.stdout.take().context("stdout is piped")?;
        let err = child.stderr.take().context("stderr is piped")?;
        let owned: Vec<String> = counters.iter().map(|c| (*c).to_owned()).collect();
        // Both streams go to the same copy; each start of a daemon to its own.
        let copy = log_copy(name);
        reader(name, out, shared.clone(), owned.clone(), copy.clone());
        reader(name, err, shared.clone(), owned.clone(), copy);
        Ok(Daemon {
            name: name.to_owned(),
            pid: child.id(),
            group,
            child: Mutex::new(child),
            shared,
            counters: owned,
        })
    }

    /// The number of lines printed so far (a mark for [`Daemon::wait_line_after`]).
    #[cfg(test)]
    fn mark(&self) -> usize {
        self.shared.lock().total
    }

    /// Waits for a line containing every one of `parts`, printed at or after line
    /// `mark`; returns it. An error with the last lines when `timeout` passes, the
    /// daemon exits first, or the line has already left the kept tail.
    pub fn wait_line_after(
        &self,
        mark: usize,
        parts: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut next = mark;
        let mut st = self.shared.lock();
        loop {
            if next < st.first {
                next = st.first;
            }
            while next < st.total {
                let line = &st.tail[next - st.first];
                if parts.iter().all(|p| line.contains(p)) {
                    return Ok(line.clone());
                }
                next += 1;
            }
            if st.open == 0 {
                drop(st);
                bail!(
                    "{} exited without printing a line with {parts:?}\n{}",
                    self.name,
                    self.tail_text()
                );
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                bail!(
                    "{} printed no line with {parts:?} within {timeout:?}\n{}",
                    self.name,
                    self.tail_text()
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// [`Daemon::wait_line_after`] from the first line.
    pub fn wait_line(&self, parts: &[&str], timeout: Duration) -> anyhow::Result<String> {
        self.wait_line_after(0, parts, timeout)
    }

    /// How many lines matched counter `i` so far.
    pub fn count(&self, i: usize) -> usize {
        self.shared.lock().counts[i].0
    }

    /// Waits until counter `i` reaches `n`; returns when the line that made it `n`
    /// (or more) was read. An error, with the last lines, on timeout.
    pub fn wait_count(&self, i: usize, n: usize, timeout: Duration) -> anyhow::Result<Instant> {
        match self.wait_count_for(i, n, timeout) {
            Some(t) => Ok(t),
            None => bail!(
                "{}: {} lines with {:?} within {timeout:?}, expected {n}{}\n{}",
                self.name,
                self.count(i),
                self.counters[i],
                if self.is_running() {
                    ""
                } else {
                    " (it exited)"
                },
                self.tail_text()
            ),
        }
    }

    /// As [`Daemon::wait_count`], `None` on timeout (or when the daemon exited).
    pub fn wait_count_for(&self, i: usize, n: usize, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let (count, at) = st.counts[i];
            if count >= n {
                return Some(at.unwrap_or_else(Instant::now));
            }
            let now = Instant::now();
            if now >= deadline || st.open == 0 {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The last lines, framed, for error messages.
    pub fn tail_text(&self) -> String {
        let st = self.shared.lock();
        let mut s = format!(
            "----- {} (pid {}), last {} of {} lines -----\n",
            self.name,
            self.pid,
            st.tail.len(),
            st.total
        );
        for l in &st.tail {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("-----");
        s
    }

    pub fn is_running(&self) -> bool {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(c.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the child.
    pub fn stop(&self, grace: Duration) {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = i32::try_from(self.pid).unwrap_or(i32::MAX);
        // A wrapped daemon: the whole group (the wrapper and the daemon).
        let pid = Pid::from_raw(if self.group { -pid } else { pid });
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
        let _ = c.wait();
    }

    /// The daemon's memory and CPU time now.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        Usage::of(self.pid)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// With `F2B_BENCH_LOGS=DIR`, each daemon's output is also appended to
/// `DIR/<NN>-<name>.log` (for a look at the daemons' own timestamps), `NN`
/// numbering the daemons in the order they started: the benchmarks start
/// daemons of the same name once per configuration, and each gets its own file.
fn log_copy(name: &str) -> Option<Arc<Mutex<std::fs::File>>> {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::var_os("F2B_BENCH_LOGS")?;
    let n = STARTED.fetch_add(1, Ordering::Relaxed);
    let path = Path::new(&dir).join(format!("{n:02}-{}.log", name.replace(' ', "-")));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(|f| Arc::new(Mutex::new(f)))
        .map_err(|e| eprintln!("cannot open {}: {e}", path.display()))
        .ok()
}

fn reader(
    name: &str,
    stream: impl Read + Send + 'static,
    shared: Arc<Shared>,
    counters: Vec<String>,
    copy: Option<Arc<Mutex<std::fs::File>>>,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-log"))
        .spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if let Some(f) = &copy {
                            let _ = f.lock().unwrap_or_else(|e| e.into_inner()).write_all(&buf);
                        }
                        let line = String::from_utf8_lossy(&buf)
                            .trim_end_matches(['\n', '\r'])
                            .to_owned();
                        let now = Instant::now();
                        let mut st = shared.lock();
                        for (i, c) in counters.iter().enumerate() {
                            if line.contains(c.as_str()) {
                                st.counts[i].0 += 1;
                                st.counts[i].1 = Some(now);
                            }
                        }
                        st.tail.push_back(line);
                        st.total += 1;
                        if st.tail.len() > TAIL {
                            st.tail.pop_front();
                            st.first += 1;
                        }
                        drop(st);
                        shared.changed.notify_all();
                    }
                }
            }
            shared.lock().open -= 1;
            shared.changed.notify_all();
        });
    if let Err(e) = spawned {
        eprintln!("cannot start a log reader thread: {e}");
    }
}

/// A process's resident memory and CPU time, from /proc.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// VmRSS, in MiB.
    pub rss_mib: f64,
    /// VmHWM (the peak of VmRSS so far), in MiB.
    pub peak_mib: f64,
    /// User plus system CPU time.
    pub cpu: Duration,
}

impl Usage {
    pub fn of(pid: u32) -> anyhow::Result<Usage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let kib = |key: &str| -> anyhow::Result<f64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        Ok(Usage {
            rss_mib: kib("VmRSS:")? / 1024.0,
            peak_mib: kib("VmHWM:")? / 1024.0,
            cpu: cpu_time(&stat).with_context(|| format!("cannot parse /proc/{pid}/stat"))?,
        })
    }
}

/// utime + stime of a /proc/PID/stat line (fields 14 and 15, after the command
/// name in parentheses, which may contain spaces).
fn cpu_time(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}

/// Clock ticks per second (USER_HZ): 100 on every Linux architecture in use.
fn clock_ticks() -> f64 {
    100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_utime_and_stime() {
        let stat = "4242 (f2b pub) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 50 0 0 20 0 4 0 100 1000 200 18446744073709551615";
        assert_eq!(cpu_time(stat), Some(Duration::from_secs(2)));
        assert_eq!(cpu_time("garbage"), None);
    }

    #[test]
    fn usage_of_this_process() {
        let u = Usage::of(std::process::id()).unwrap();
        assert!(u.rss_mib > 0.0 && u.peak_mib >= u.rss_mib, "{u:?}");
    }

    #[test]
    fn lines_are_counted_and_waited_for() {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("for i in 1 2 3; do echo \"applied ip=$i\"; done; echo done >&2; sleep 30");
        let d = Daemon::spawn("sh", cmd, &["applied"]).unwrap();
        d.wait_count(0, 3, Duration::from_secs(10)).unwrap();
        assert_eq!(d.count(0), 3);
        let line = d.wait_line(&["done"], Duration::from_secs(10)).unwrap();
        assert_eq!(line, "done");
        let err = d
            .wait_line_after(d.mark(), &["never"], Duration::from_millis(50))
            .unwrap_err();
        assert!(format!("{err}").contains("printed no line"), "{err}");
        let pid = d.pid;
        drop(d);
        assert!(
            kill(Pid::from_raw(pid as i32), None).is_err(),
            "stopped and reaped"
        );
    }
}
