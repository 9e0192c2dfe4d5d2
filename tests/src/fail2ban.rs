//! A private, real fail2ban-server per test node.
//!
//! Each server has its own configuration directory, socket, pidfile, log and
//! database under the test's temporary directory, and blocks nothing (its ban action
//! is a no-op). It never touches /etc/fail2ban (only reads it: jail.conf, paths and
//! filters are copied from there), the system's socket, or the firewall. The
//! project's `fail2ban/` files are installed verbatim, so a broken shipped file fails
//! the tests.

use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bins::workspace_root;
use crate::process::Process;
use crate::wait::{self, TIMEOUT};

/// The system's fail2ban configuration, read (never written) for jail.conf, the
/// paths files and the stock filters.
pub const SYSTEM_CONF: &str = "/etc/fail2ban";

/// The no-op ban action the private servers use (`banaction`). It defines
/// `actionflush`, as every firewall action does, so that a stop logs `Flush
/// ticket(s) with f2b-test-noop` before its Unban lines, as on a real site.
pub const NOOP_ACTION: &str = "f2b-test-noop";

/// How long one fail2ban-client call may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether fail2ban is usable here: fail2ban-server and fail2ban-client run, and the
/// stock configuration this harness copies from exists.
pub fn available() -> Result<(), String> {
    for program in ["fail2ban-server", "fail2ban-client"] {
        match Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => return Err(format!("`{program} --version` failed: {s}")),
            Err(e) => return Err(format!("{program} cannot be run: {e}")),
        }
    }
    for f in ["jail.conf", "paths-common.conf", "filter.d/sshd.conf"] {
        let p = Path::new(SYSTEM_CONF).join(f);
        if !p.is_file() {
            return Err(format!("{} is missing", p.display()));
        }
    }
    Ok(())
}

/// Called first by every `fail2ban_*` test. When fail2ban is not available it panics
/// (a test that cannot run must never pass): with `F2B_REQUIRE_FAIL2BAN=1` (set by
/// scripts/test once fail2ban is installed) as a plain failure, otherwise after a
/// loud SKIPPED line. scripts/test filters these tests out when it could not install
/// fail2ban, so nextest reports them as skipped.
pub fn require() {
    let Err(why) = available() else {
        return;
    };
    if std::env::var("F2B_REQUIRE_FAIL2BAN").as_deref() == Ok("1") {
        panic!("F2B_REQUIRE_FAIL2BAN=1 but fail2ban is not usable: {why}");
    }
    eprintln!("\n********** SKIPPED: this test needs fail2ban: {why} **********\n");
    panic!("fail2ban not installed: run scripts/test, which skips these tests ({why})");
}

/// One jail section of the test's `jail.d/zz-test.local` (read after the shipped
/// `jail.d/fail2ban-cluster.conf`, so it can override it).
#[derive(Debug, Clone)]
pub struct JailConf {
    pub name: String,
    pub settings: Vec<(String, String)>,
}

impl JailConf {
    pub fn new(name: &str) -> JailConf {
        JailConf {
            name: name.to_owned(),
            settings: Vec::new(),
        }
    }

    /// Sets `key = value` in the section.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> JailConf {
        self.settings.push((key.to_owned(), value.into()));
        self
    }

    /// The stock `sshd` jail, enabled, reading `auth_log`, banning after `maxretry`
    /// failures.
    pub fn sshd(auth_log: &Path, maxretry: u32) -> JailConf {
        JailConf::new("sshd")
            .set("enabled", "true")
            .set("logpath", auth_log.to_string_lossy())
            .set("maxretry", maxretry.to_string())
            .set("findtime", "10m")
            .set("bantime", "10m")
    }

    fn render(&self) -> String {
        let mut s = format!("[{}]\n", self.name);
        for (k, v) in &self.settings {
            let _ = writeln!(s, "{k} = {v}");
        }
        s
    }
}

/// The output of one fail2ban-client call.
#[derive(Debug, Clone)]
pub struct ClientOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A private fail2ban-server, run in the foreground as our child.
#[derive(Debug)]
pub struct Fail2ban {
    name: String,
    dir: PathBuf,
    conf: PathBuf,
    socket: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    process: Option<Process>,
    earlier: Vec<Process>,
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

fn mkdir(p: &Path) {
    std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
}

/// Copies every regular `*.conf` file of `from` into `to`; returns how many.
fn copy_confs(from: &Path, to: &Path) -> usize {
    let mut n = 0;
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_file() && p.extension().is_some_and(|e| e == "conf") {
            copy(&p, &to.join(entry.file_name()));
            n += 1;
        }
    }
    n
}

/// The project's shipped fail2ban files, `fail2ban/<sub>/*.conf`.
pub fn shipped(sub: &str) -> Vec<PathBuf> {
    let dir = workspace_root().join("fail2ban").join(sub);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no shipped file in {}: the tests would test nothing",
        dir.display()
    );
    files
}

/// Parses fail2ban-client's rendering of a Python list of strings, `['a', 'b']`.
pub fn parse_list(text: &str) -> Vec<String> {
    let t = text.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not a list: {text:?}"));
    inner
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Fail2ban {
    /// Writes a private configuration in `dir` (created) and starts fail2ban-server
    /// on it; returns once the server has loaded every jail and answers `ping`.
    ///
    /// The configuration: the system's jail.conf and paths files and stock filters,
    /// the project's `fail2ban/jail.d` and `fail2ban/filter.d` files verbatim, a
    /// `jail.local` setting `[DEFAULT] banaction` to the no-op action (as a site sets
    /// its own), and `jails` in `jail.d/zz-test.local`.
    pub fn start(dir: &Path, jails: &[JailConf]) -> Fail2ban {
        require();
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "fail2ban".into());
        let conf = dir.join("conf");
        let sys = Path::new(SYSTEM_CONF);
        for sub in ["jail.d", "filter.d", "action.d"] {
            mkdir(&conf.join(sub));
        }
        for f in ["jail.conf", "paths-common.conf", "paths-debian.conf"] {
            if sys.join(f).is_file() {
                copy(&sys.join(f), &conf.join(f));
            }
        }
        assert!(copy_confs(&sys.join("filter.d"), &conf.join("filter.d")) > 0);
        for sub in ["jail.d", "filter.d"] {
            for f in shipped(sub) {
                copy(&f, &conf.join(sub).join(f.file_name().expect("a file")));
            }
        }
        let socket = dir.join("fail2ban.sock");
        let pidfile = dir.join("fail2ban.pid");
        let log = dir.join("fail2ban.log");
        std::fs::write(
            conf.join("fail2ban.conf"),
            format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {}\nsyslogsocket = auto\n\
                 socket = {}\npidfile = {}\nallowipv6 = auto\ndbfile = {}\n\
                 dbpurgeage = 1d\ndbmaxmatches = 10\n\n[Thread]\n",
                log.display(),
                socket.display(),
                pidfile.display(),
                dir.join("fail2ban.sqlite3").display()
            ),
        )
        .expect("write fail2ban.conf");
        std::fs::write(
            conf.join("action.d").join(format!("{NOOP_ACTION}.conf")),
            "# A ban action that blocks nothing (tests never touch the firewall).\n\
             [Definition]\nactionstart =\nactionstop =\nactioncheck =\nactionban =\n\
             actionunban =\nactionflush = true\n",
        )
        .expect("write the no-op action");
        std::fs::write(
            conf.join("jail.local"),
            format!(
                "# The site's defaults: a private test server blocks nothing.\n\
                 [DEFAULT]\nbanaction = {NOOP_ACTION}\nbanaction_allports = {NOOP_ACTION}\n\
                 ignoreself = true\nignoreip = 127.0.0.1/8 ::1\n"
            ),
        )
        .expect("write jail.local");
        let mut local = String::from("# This test's jails.\n");
        for j in jails {
            local.push_str(&j.render());
            local.push('\n');
        }
        std::fs::write(conf.join("jail.d").join("zz-test.local"), local)
            .expect("write zz-test.local");
        let mut f = Fail2ban {
            name,
            dir: dir.to_owned(),
            conf,
            socket,
            pidfile,
            log,
            process: None,
            earlier: Vec::new(),
        };
        f.launch();
        f
    }

    fn launch(&mut self) {
        assert!(self.process.is_none(), "{} is already running", self.name);
        let mut cmd = Command::new("fail2ban-server");
        cmd.arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.socket)
            .arg("-p")
            .arg(&self.pidfile)
            .arg("-x")
            .arg("-f")
            .arg("start")
            .current_dir(&self.dir);
        let run = self.earlier.len() + 1;
        let p = Process::spawn(format!("fail2ban-server {} (run {run})", self.name), cmd);
        // "Server ready" is printed once the whole configuration (every jail) is
        // loaded and started.
        if let Err(why) = p.try_wait_for_line_after(0, r"^Server ready", TIMEOUT) {
            let dump = p.dump();
            drop(p);
            panic!("{why}\n{dump}\n{}", self.log_tail(100));
        }
        self.process = Some(p);
        let out = self.client(&["ping"]);
        assert!(
            out.success && out.stdout.contains("pong"),
            "{}: ping failed: {out:?}\n{}",
            self.name,
            self.log_tail(100)
        );
    }

    /// The server's socket (for `[subscriber] socket`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's log (for `[monitor] log_path`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The private configuration directory.
    pub fn conf_dir(&self) -> &Path {
        &self.conf
    }

    /// Whether the server is running.
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(|p| p.is_running())
    }

    /// Runs `fail2ban-client -c CONF -s SOCKET args...`, bounded by a timeout.
    pub fn client(&self, args: &[&str]) -> ClientOutput {
        self.try_client(args, CLIENT_TIMEOUT)
            .unwrap_or_else(|why| panic!("{why}\n{}", self.log_tail(60)))
    }

    /// As [`Fail2ban::client`], returning an error instead of panicking when the
    /// call cannot be made or takes longer than `timeout`.
    pub fn try_client(&self, args: &[&str], timeout: Duration) -> Result<ClientOutput, String> {
        let mut child = Command::new("fail2ban-client")
            .arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run fail2ban-client: {e}"))?;
        let mut stdout_pipe = child.stdout.take().ok_or("stdout not piped")?;
        let mut stderr_pipe = child.stderr.take().ok_or("stderr not piped")?;
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout_pipe.read_to_string(&mut s);
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => return Err(format!("wait for fail2ban-client: {e}")),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "fail2ban-client {args:?} on {} took more than {timeout:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(ClientOutput {
            success: status.success(),
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// As [`Fail2ban::client`], asserting success; returns standard output.
    pub fn client_ok(&self, args: &[&str]) -> String {
        let out = self.client(args);
        assert!(
            out.success,
            "fail2ban-client {args:?} on {} failed: {out:?}",
            self.name
        );
        out.stdout
    }

    /// The addresses banned in `jail` (`get <jail> banned`).
    pub fn banned(&self, jail: &str) -> Vec<String> {
        parse_list(&self.client_ok(&["get", jail, "banned"]))
    }

    /// `set <jail> banip <ips>...` in one call.
    pub fn ban(&self, jail: &str, ips: &[&str]) {
        let mut args = vec!["set", jail, "banip"];
        args.extend_from_slice(ips);
        self.client_ok(&args);
    }

    /// `set <jail> unbanip <ips>...` in one call.
    pub fn unban(&self, jail: &str, ips: &[&str]) {
        let mut args = vec!["set", jail, "unbanip"];
        args.extend_from_slice(ips);
        self.client_ok(&args);
    }

    /// Waits until `jail` holds `ip`.
    pub fn wait_banned(&self, jail: &str, ip: &str) {
        wait::until(
            &format!("{ip} banned in [{jail}] on {}", self.name),
            TIMEOUT,
            || self.banned(jail).iter().any(|b| b == ip).then_some(()),
            || self.log_tail(60),
        );
    }

    /// Waits until `jail` no longer holds `ip`.
    pub fn wait_not_banned(&self, jail: &str, ip: &str) {
        wait::until(
            &format!("{ip} not banned in [{jail}] on {}", self.name),
            TIMEOUT,
            || (!self.banned(jail).iter().any(|b| b == ip)).then_some(()),
            || self.log_tail(60),
        );
    }

    /// Stops the server (`fail2ban-client stop`, which unbans everything and logs an
    /// Unban per active ban) and waits for the process to exit.
    pub fn stop(&mut self) {
        let Some(p) = self.process.take() else {
            return;
        };
        if p.is_running() {
            let out = self.client(&["stop"]);
            if p.wait_exit(TIMEOUT).is_none() {
                panic!(
                    "{} did not exit after `fail2ban-client stop` ({out:?})\n{}",
                    self.name,
                    p.dump()
                );
            }
        }
        self.earlier.push(p);
    }

    /// Asks the server to stop (`fail2ban-client stop`, bounded) without waiting for
    /// it to exit or panicking; for clean-up code. The drop reaps it.
    pub fn request_stop(&self) {
        if self.is_running() {
            let _ = self.try_client(&["stop"], Duration::from_secs(10));
        }
    }

    /// Starts the server again on the same configuration and database (bans come
    /// back as `Restore Ban`).
    pub fn start_again(&mut self) {
        self.launch();
    }

    /// [`Fail2ban::stop`] then [`Fail2ban::start_again`], as a service restart.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The server's log so far.
    pub fn log_lines(&self) -> Vec<String> {
        crate::cluster::read_lines(&self.log)
    }

    /// How many log lines match `pattern`.
    pub fn count_log(&self, pattern: &str) -> usize {
        let re = regex::Regex::new(pattern).expect("valid regex");
        self.log_lines().iter().filter(|l| re.is_match(l)).count()
    }

    /// Waits until the log has at least `n` lines matching `pattern`.
    pub fn wait_log(&self, pattern: &str, n: usize) {
        wait::until(
            &format!("{n} lines matching {pattern:?} in {}", self.log.display()),
            TIMEOUT,
            || (self.count_log(pattern) >= n).then_some(()),
            || self.log_tail(60),
        );
    }

    /// The last `n` lines of the server's log, framed, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.log_lines();
        let from = lines.len().saturating_sub(n);
        format!(
            "----- {} (last {} of {} lines) -----\n{}\n----- end of {} -----",
            self.log.display(),
            lines.len() - from,
            lines.len(),
            lines[from..].join("\n"),
            self.log.display()
        )
    }
}

impl Drop for Fail2ban {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(200));
        }
        if let Some(p) = &self.process {
            // A clean stop first; the Process's own drop then kills it by PID if it
            // is still there. Nothing here may panic (this may run while a failing
            // test unwinds).
            self.request_stop();
            let _ = p.wait_exit(Duration::from_secs(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_lists_parse() {
        assert_eq!(
            parse_list("['203.0.113.5', '2001:db8::1']\n"),
            ["203.0.113.5", "2001:db8::1"]
        );
        assert!(parse_list("[]").is_empty());
    }

    #[test]
    fn the_project_ships_fail2ban_files() {
        let jails = shipped("jail.d");
        let filters = shipped("filter.d");
        assert!(jails
            .iter()
            .any(|p| p.ends_with("jail.d/fail2ban-cluster.conf")));
        assert!(filters
            .iter()
            .any(|p| p.ends_with("filter.d/fail2ban-cluster.conf")));
    }

    #[test]
    fn jail_sections_render() {
        let j = JailConf::new("cluster").set("ignoreip", "192.0.2.0/24");
        assert_eq!(j.render(), "[cluster]\nignoreip = 192.0.2.0/24\n");
    }
}
