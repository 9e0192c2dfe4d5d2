//! A private, real fail2ban-server for a test: its own configuration directory
//! (fail2ban.conf, jail.conf, a no-op ban action), socket, pidfile, log and database
//! in the test's temporary directory. It never reads or writes the system's
//! /etc/fail2ban or /var/run/fail2ban and blocks nothing (the action does nothing).
//! Dropping it kills the server by its PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True when the fail2ban tests can run. When fail2ban is not installed this says
/// so loudly and fails the test: a test that cannot run never passes. These tests
/// are all named `fail2ban_*`, which scripts/test filters out (nextest reports them
/// as skipped) when it could not install fail2ban.
pub fn available() -> bool {
    let ok = ["fail2ban-server", "fail2ban-client"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if ok {
        return true;
    }
    if std::env::var("F2B_REQUIRE_FAIL2BAN").as_deref() == Ok("1") {
        panic!("F2B_REQUIRE_FAIL2BAN=1 but fail2ban-server / fail2ban-client cannot be run");
    }
    eprintln!("\n********** SKIPPED: fail2ban-server not installed **********\n");
    panic!(
        "fail2ban not installed: this test cannot run (scripts/test installs fail2ban, \
         or skips the fail2ban_* tests saying why)"
    );
}

/// The scenario both fail2ban actions must pass: fail2ban-server is down while bans
/// arrive (a whole-call failure, logged with fail2ban's own message), then comes
/// back, and every pending ban is applied. `action` holds the `[subscriber]` lines
/// choosing the action under test (empty: the default, fail2ban-client).
pub async fn down_then_up_applies_every_pending_ban(action: &str, heartbeat: Duration) {
    use f2b_proto::Action;
    use f2b_subscriber::{FailureScope, Notice};

    use super::{config, Logs, Running, TestPublisher};

    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &[jail("cluster", "")]);
    server.stop();
    let mut publ = TestPublisher::start(heartbeat);
    let cfg = config(
        "web1",
        &publ.endpoint,
        &format!(
            "{action}ban_jail = \"cluster\"\nsocket = {:?}",
            server.socket.to_str().unwrap()
        ),
    );
    let logs = Logs::capture();
    let mut sub = Running::start(&cfg);
    sub.connected().await;
    let ips = ["203.0.113.21", "203.0.113.22", "203.0.113.23"];
    for ip in ips {
        publ.event("web2", "sshd", Action::Ban, ip);
    }
    sub.wait_for("failure", |n| {
        matches!(
            n,
            Notice::Failed {
                scope: FailureScope::Call,
                ..
            }
        )
    })
    .await;
    server.launch();
    for ip in ips {
        sub.applied(ip).await;
    }
    assert_eq!(server.banned("cluster"), ips);
    sub.stop().await;
    let text = logs.text();
    assert!(
        text.contains("action failed, will retry") && text.contains("Is fail2ban running?"),
        "{text}"
    );
}

/// A jail of the private server: name and `ignoreip` (may be empty).
#[derive(Debug, Clone)]
pub struct Jail {
    pub name: String,
    pub ignoreip: String,
}

pub fn jail(name: &str, ignoreip: &str) -> Jail {
    Jail {
        name: name.into(),
        ignoreip: ignoreip.into(),
    }
}

/// A running private fail2ban-server.
pub struct Server {
    pub dir: PathBuf,
    pub socket: PathBuf,
    jails: Vec<Jail>,
    child: Option<Child>,
}

impl Server {
    /// Writes the configuration under `dir` and starts the server; returns once
    /// every jail is running.
    pub fn start(dir: &Path, jails: &[Jail]) -> Server {
        let conf = dir.join("conf");
        std::fs::create_dir_all(conf.join("action.d")).unwrap();
        std::fs::create_dir_all(conf.join("filter.d")).unwrap();
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            conf.join("fail2ban.conf"),
            format!(
                "[Definition]\nloglevel = INFO\nlogtarget = {}\nsyslogsocket = auto\nsocket = {}\npidfile = {}\ndbfile = {}\ndbpurgeage = 1d\nallowipv6 = auto\n",
                run.join("fail2ban.log").display(),
                run.join("f2b.sock").display(),
                run.join("f2b.pid").display(),
                run.join("f2b.sqlite3").display(),
            ),
        )
        .unwrap();
        std::fs::write(
            conf.join("action.d/f2b-test-noop.conf"),
            "[Definition]\nactionstart =\nactionstop =\nactioncheck =\nactionban =\nactionunban =\n",
        )
        .unwrap();
        let mut jc = String::from(
            "[DEFAULT]\nbanaction = f2b-test-noop\naction = f2b-test-noop\nbackend = polling\nignoreself = false\nbantime = 1h\n",
        );
        for j in jails {
            jc.push_str(&format!(
                "\n[{}]\nenabled = true\nfilter =\nlogpath = /dev/null\nignoreip = {}\n",
                j.name, j.ignoreip
            ));
        }
        std::fs::write(conf.join("jail.conf"), jc).unwrap();
        let mut s = Server {
            dir: dir.to_owned(),
            socket: run.join("f2b.sock"),
            jails: jails.to_vec(),
            child: None,
        };
        s.launch();
        s
    }

    /// Starts the server (again, after [`Server::stop`]) and waits until it is ready.
    pub fn launch(&mut self) {
        let run = self.dir.join("run");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join("server.out"))
            .unwrap();
        let child = Command::new("fail2ban-server")
            .arg("-c")
            .arg(self.dir.join("conf"))
            .arg("-s")
            .arg(&self.socket)
            .arg("-p")
            .arg(run.join("f2b.pid"))
            .args(["-x", "-f", "start"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("fail2ban-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.client(&["status"]);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            if o.status.success() && self.jails.iter().all(|j| text.contains(&j.name)) {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!(
                        "fail2ban-server exited ({st}): {}",
                        std::fs::read_to_string(run.join("server.out")).unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "fail2ban-server not ready in 30 s: {text} {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `fail2ban-client -s SOCKET args...`.
    pub fn client(&self, args: &[&str]) -> Output {
        Command::new("fail2ban-client")
            .arg("-s")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("fail2ban-client runs")
    }

    /// The addresses banned in `jail` (`get JAIL banned`).
    pub fn banned(&self, jail: &str) -> Vec<String> {
        let o = self.client(&["get", jail, "banned"]);
        assert!(o.status.success(), "{o:?}");
        let text = String::from_utf8_lossy(&o.stdout);
        let mut v: Vec<String> = text
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(',')
            .map(|s| s.trim().trim_matches('\'').to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        v.sort();
        v
    }

    /// Stops the server the clean way and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = self.client(&["stop"]);
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if Instant::now() > deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }

    /// Starts the server again with the same configuration and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Our own child, by its PID; never a broad kill.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
