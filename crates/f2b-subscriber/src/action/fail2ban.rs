//! `action = "fail2ban-client"`: bans through the local fail2ban-server.
//!
//! One call per (jail, action) batch, without a shell:
//! `fail2ban-client [-s SOCKET] set JAIL banip IP [IP...]` (or `unbanip`). What
//! fail2ban-client 1.0.2 answers (measured against a private fail2ban-server):
//!
//! | call | stdout | stderr | exit |
//! |---|---|---|---|
//! | `set J banip A B C` | number of addresses newly banned (`3`, `0` if all already were) | | 0 |
//! | `set J unbanip A` of a banned / not banned A | `1` / `0` | | 0 |
//! | `set J unbanip --report-absent A` not banned | `not banned: ['A']` | `... ERROR   NOK: ("not banned: ['A']",)` | 255 |
//! | unknown jail (any `set J`/`get J`) | `Sorry but the jail 'J' does not exist` | `... ERROR   NOK: ('J',)` | 255 |
//! | server down, socket file missing | | `... ERROR   Failed to access socket path: S. Is fail2ban running?` | 255 |
//! | socket file present, nobody listening | | `... ERROR   [[Errno 111] Connection refused] Unable to contact server. Is it running?` | 255 |
//!
//! `banip` accepts anything as an address and never fails for one address alone,
//! and it bypasses the jail's `ignoreip`: so before a ban the jail's `ignoreip` is
//! read (`get J ignoreip`, cached per jail for [`IGNOREIP_REFRESH`]) and addresses
//! in it are refused here. Its output is a tree:
//!
//! ```text
//! These IP addresses/networks are ignored:
//! |- 192.0.2.0/24
//! |- localhost
//! `- 198.51.100.7
//! ```
//!
//! or `No IP address/network is ignored`. Host names are not resolved (a warning
//! says so once per jail and name).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use f2b_proto::{canonical_ip, Action, JailName};
use ipnet::IpNet;
use tokio::process::Command;
use tokio::time::Instant;

use super::{clip, Applier, BoxFuture, CallError, FailureScope, JailIgnores};
use crate::pending::Item;

/// How long one fail2ban-client call may take before it is killed and counted as a
/// failure of the whole call.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a jail's `ignoreip` is cached.
pub const IGNOREIP_REFRESH: Duration = Duration::from_secs(60);
/// The longest tool message kept in a log line.
const MAX_MESSAGE: usize = 512;

/// The fail2ban-client action.
#[derive(Debug)]
pub struct Fail2banClient {
    program: PathBuf,
    socket: Option<PathBuf>,
    timeout: Duration,
    ignores: IgnoreCache,
}

impl Fail2banClient {
    /// `program` is the fail2ban-client to run; `socket` its `-s` option.
    pub fn new(program: PathBuf, socket: Option<PathBuf>) -> Self {
        Fail2banClient {
            program,
            socket,
            timeout: CLIENT_TIMEOUT,
            ignores: IgnoreCache::default(),
        }
    }

    /// Sets the time limit of one call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The arguments (after the program) of a ban or unban call.
    pub fn set_args(&self, jail: &JailName, action: Action, ips: &[IpAddr]) -> Vec<OsString> {
        let mut args = self.socket_args();
        args.push("set".into());
        args.push(jail.as_str().into());
        args.push(
            match action {
                Action::Ban => "banip",
                Action::Unban => "unbanip",
            }
            .into(),
        );
        args.extend(ips.iter().map(|ip| ip.to_string().into()));
        args
    }

    fn socket_args(&self) -> Vec<OsString> {
        match &self.socket {
            Some(s) => vec!["-s".into(), s.clone().into_os_string()],
            None => Vec::new(),
        }
    }

    /// Runs fail2ban-client with `args`; its standard output on success.
    async fn run(&self, args: Vec<OsString>) -> Result<String, CallError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            CallError::new(
                FailureScope::Call,
                format!("cannot run {}: {e}", self.program.display()),
            )
        })?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(CallError::new(
                    FailureScope::Call,
                    format!("{}: {e}", self.program.display()),
                ))
            }
            Err(_) => {
                return Err(CallError::new(
                    FailureScope::Call,
                    format!(
                        "{} did not answer within {:?} (killed)",
                        self.program.display(),
                        self.timeout
                    ),
                ))
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(classify(out.status.code(), &stdout, &stderr))
    }

    async fn fetch_ignores(&mut self, jail: &JailName) -> Result<IgnoreList, CallError> {
        let mut args = self.socket_args();
        args.extend(["get".into(), jail.as_str().into(), "ignoreip".into()]);
        let text = self.run(args).await?;
        Ok(parse_ignoreip(&text))
    }
}

impl Applier for Fail2banClient {
    fn name(&self) -> &'static str {
        "fail2ban-client"
    }

    fn max_batch(&self) -> usize {
        crate::pending::MAX_BATCH
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            let ips: Vec<IpAddr> = items.iter().map(Item::ip).collect();
            let args = self.set_args(jail, action, &ips);
            self.run(args).await.map(|_| ())
        })
    }

    fn jail_ignores<'a>(
        &'a mut self,
        jail: &'a JailName,
    ) -> BoxFuture<'a, Result<JailIgnores, CallError>> {
        Box::pin(async move {
            let now = Instant::now();
            if let Some(list) = self.ignores.fresh(jail, now) {
                return Ok(list);
            }
            let list = self.fetch_ignores(jail).await?;
            Ok(self.ignores.store(jail, now, list))
        })
    }
}

/// fail2ban-client's message without its log prefix (`2026-11-21 05:18:45,912
/// fail2ban [19135]: ERROR   `), standard output first, lines joined with `; `.
pub fn clean_message(stdout: &str, stderr: &str) -> String {
    let lines: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .map(|l| {
            let l = l.trim();
            match l.split_once("]: ") {
                Some((prefix, rest)) if prefix.starts_with(|c: char| c.is_ascii_digit()) => {
                    let rest = rest.trim_start();
                    match rest.split_once(char::is_whitespace) {
                        Some((level, msg)) if level.chars().all(|c| c.is_ascii_uppercase()) => {
                            msg.trim_start()
                        }
                        _ => rest,
                    }
                }
                _ => l,
            }
        })
        .filter(|l| !l.is_empty())
        .collect();
    clip(lines.join("; "), MAX_MESSAGE)
}

/// The scope of a failed fail2ban-client call, from its exit status and output.
pub fn classify(code: Option<i32>, stdout: &str, stderr: &str) -> CallError {
    let mut message = clean_message(stdout, stderr);
    if message.is_empty() {
        message = match code {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_owned(),
        };
    }
    let lower = format!("{stdout}\n{stderr}").to_lowercase();
    let scope = if lower.contains("sorry but the jail") && lower.contains("does not exist") {
        FailureScope::UnknownJail
    } else if code.is_none()
        || [
            "failed to access socket path",
            "unable to contact server",
            "is it running",
            "is fail2ban running",
            "permission denied",
            "connection refused",
            "no such file",
            "server not yet ready",
            "timed out",
        ]
        .iter()
        .any(|p| lower.contains(p))
    {
        FailureScope::Call
    } else {
        FailureScope::Undetermined
    };
    CallError::new(scope, message)
}

/// A jail's `ignoreip`, as read from `get J ignoreip`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IgnoreList {
    /// Addresses and networks.
    pub nets: Vec<IpNet>,
    /// Entries that are neither (host names, `file:` lists...): not resolved.
    pub names: Vec<String>,
}

/// Each local jail's `ignoreip`, kept for [`IGNOREIP_REFRESH`], shared by the actions
/// that ask fail2ban for it. Host names in it are warned about once per jail and name.
#[derive(Debug, Default)]
pub struct IgnoreCache {
    entries: HashMap<JailName, (Instant, JailIgnores)>,
    warned_names: HashSet<(JailName, String)>,
}

impl IgnoreCache {
    /// The cached list of `jail`, if read less than [`IGNOREIP_REFRESH`] ago.
    pub fn fresh(&self, jail: &JailName, now: Instant) -> Option<JailIgnores> {
        self.entries
            .get(jail)
            .filter(|(at, _)| now.duration_since(*at) < IGNOREIP_REFRESH)
            .map(|(_, list)| list.clone())
    }

    /// Keeps the list just read for `jail`, warning once about each host name in it.
    pub fn store(&mut self, jail: &JailName, now: Instant, list: IgnoreList) -> JailIgnores {
        for name in list.names {
            if self.warned_names.insert((jail.clone(), name.clone())) {
                tracing::warn!(
                    jail = %jail,
                    entry = %name,
                    "ignoreip of the local jail names a host; not resolved, so bans of its addresses are not refused"
                );
            }
        }
        let ignores = JailIgnores { nets: list.nets };
        self.entries.insert(jail.clone(), (now, ignores.clone()));
        ignores
    }
}

/// Parses the output of `fail2ban-client get J ignoreip`.
pub fn parse_ignoreip(text: &str) -> IgnoreList {
    let mut list = IgnoreList::default();
    for line in text.lines() {
        let line = line.trim_end();
        let Some(entry) = line
            .strip_prefix("|- ")
            .or_else(|| line.strip_prefix("`- "))
            .map(str::trim)
        else {
            continue;
        };
        if entry.is_empty() {
            continue;
        }
        match parse_ignore_entry(entry) {
            Some(net) => list.nets.push(net),
            None => list.names.push(entry.to_owned()),
        }
    }
    list
}

/// One `ignoreip` entry as fail2ban reads it: an address, `ADDR/PREFIX`, or
/// `IPV4/DOTTED.MASK`. `None`: something else (a host name).
pub fn parse_ignore_entry(entry: &str) -> Option<IpNet> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(IpNet::from(canonical_ip(ip)));
    }
    if let Ok(net) = entry.parse::<IpNet>() {
        return Some(canonical_net(net.trunc()));
    }
    let (addr, mask) = entry.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let mask: Ipv4Addr = mask.parse().ok()?;
    let prefix = ipnet::ipv4_mask_to_prefix(mask).ok()?;
    IpNet::new(IpAddr::V4(addr), prefix).ok().map(|n| n.trunc())
}

/// `::ffff:a.b.c.d/96+n` as the IPv4 network `a.b.c.d/n`, since events carry
/// canonical (IPv4) addresses.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), n.prefix_len() - 96)
                .map(|n| n.trunc())
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_tree_output() {
        let text = "These IP addresses/networks are ignored:\n|- 192.0.2.0/24\n|- localhost\n|- example.invalid\n|- 2001:db8:1::/48\n|- 10.1.2.3/8\n|- 172.16.0.0/255.240.0.0\n|- ::ffff:198.51.100.0/120\n`- 198.51.100.7\n";
        let l = parse_ignoreip(text);
        let nets: Vec<String> = l.nets.iter().map(ToString::to_string).collect();
        assert_eq!(
            nets,
            [
                "192.0.2.0/24",
                "2001:db8:1::/48",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "198.51.100.0/24",
                "198.51.100.7/32"
            ]
        );
        assert_eq!(l.names, ["localhost", "example.invalid"]);
    }

    #[test]
    fn parses_empty_and_single_outputs() {
        assert_eq!(
            parse_ignoreip("No IP address/network is ignored\n"),
            IgnoreList::default()
        );
        let l = parse_ignoreip("These IP addresses/networks are ignored:\n`- ::1\n");
        assert_eq!(l.nets, ["::1/128".parse::<IpNet>().unwrap()]);
        assert!(parse_ignoreip("").nets.is_empty());
    }

    #[test]
    fn classifies_measured_failures() {
        let unknown = classify(
            Some(255),
            "Sorry but the jail 'nojail' does not exist\n",
            "2026-11-21 05:18:45,912 fail2ban                [19135]: ERROR   NOK: ('nojail',)\n",
        );
        assert_eq!(unknown.scope, FailureScope::UnknownJail);
        assert_eq!(
            unknown.message,
            "Sorry but the jail 'nojail' does not exist; NOK: ('nojail',)"
        );
        let down = classify(
            Some(255),
            "",
            "2026-11-21 05:18:50,951 fail2ban                [19642]: ERROR   Failed to access socket path: /tmp/x.sock. Is fail2ban running?\n",
        );
        assert_eq!(down.scope, FailureScope::Call);
        assert_eq!(
            down.message,
            "Failed to access socket path: /tmp/x.sock. Is fail2ban running?"
        );
        let refused = classify(
            Some(255),
            "",
            "2026-11-21 05:18:51,110 fail2ban                [19652]: ERROR   [[Errno 111] Connection refused] Unable to contact server. Is it running?\n",
        );
        assert_eq!(refused.scope, FailureScope::Call);
        let absent = classify(
            Some(255),
            "not banned: ['203.0.113.77']\n",
            "2026-11-21 05:18:45,747 fail2ban                [19123]: ERROR   NOK: (\"not banned: ['203.0.113.77']\",)\n",
        );
        assert_eq!(absent.scope, FailureScope::Undetermined);
        assert_eq!(classify(None, "", "").scope, FailureScope::Call);
        assert_eq!(classify(Some(3), "", "").message, "exit status 3");
    }

    #[test]
    fn builds_argv_without_shell() {
        let c = Fail2banClient::new("fail2ban-client".into(), Some("/run/f2b.sock".into()));
        let args = c.set_args(
            &JailName::new("cluster").unwrap(),
            Action::Unban,
            &[
                "203.0.113.5".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
        );
        assert_eq!(
            args,
            [
                "-s",
                "/run/f2b.sock",
                "set",
                "cluster",
                "unbanip",
                "203.0.113.5",
                "2001:db8::1"
            ]
            .map(OsString::from)
        );
        let c = Fail2banClient::new("fail2ban-client".into(), None);
        let args = c.set_args(
            &JailName::new("sshd").unwrap(),
            Action::Ban,
            &["203.0.113.5".parse().unwrap()],
        );
        assert_eq!(
            args,
            ["set", "sshd", "banip", "203.0.113.5"].map(OsString::from)
        );
    }

    #[tokio::test]
    async fn missing_program_fails_the_whole_call() {
        let mut c = Fail2banClient::new("/nonexistent/fail2ban-client".into(), None);
        let err = c
            .jail_ignores(&JailName::new("sshd").unwrap())
            .await
            .unwrap_err();
        assert_eq!(err.scope, FailureScope::Call);
        assert!(
            err.message.contains("/nonexistent/fail2ban-client"),
            "{err}"
        );
    }
}
