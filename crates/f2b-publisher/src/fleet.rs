//! The fleet command line on the hub: `f2b-publisher bans` and `f2b-publisher
//! status`. Both read the ledger read-only ([`LedgerView`]), so they are safe
//! while the daemon runs, and never start, stop or change anything.
//!
//! - `bans [--ip IP|NET] [--jail J] [--node N] [--all] [--json]`: the active bans
//!   (origin node, jail, address, since, expiry, sequence number, the credential
//!   that reported it), as a table, or with `--json` as ONE JSON array of objects
//!   (`[]` when there is none). `--all` lists every row the ledger still keeps
//!   (recent unbans, and bans expired or superseded but not pruned yet), with their
//!   action and whether they are active.
//! - `status [--json]`: whether the daemon runs (its pidfile, a process running
//!   `f2b-publisher` with this configuration file, and `GET /readyz` on
//!   `[publisher] metrics_bind` when set), the ledger's epoch, last sequence number
//!   and active bans per jail and per node, the monitors' credential names (never
//!   a secret) and the public key. Exit status 0 when the daemon runs, 3 when it
//!   does not (as `systemctl status`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use f2b_common::config::Config;
use serde_json::{json, Value};

use crate::ledger::inspect::{Filter, InspectError, Kept, LedgerView, Summary};

/// How long `status` waits for the metrics endpoint.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The subcommands and options that make an `f2b-publisher` process something
/// other than the daemon.
const NOT_THE_DAEMON: [&str; 9] = [
    "bans",
    "status",
    "keygen",
    "man",
    "completions",
    "import-legacy-config",
    "help",
    "--check",
    "--help",
];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A time in milliseconds as RFC 3339 in UTC, to the second.
fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Parses `--ip`: an address (canonical, IPv4-mapped IPv6 as IPv4) or a network.
pub fn parse_ip_filter(value: &str) -> Result<ipnet::IpNet, String> {
    if value.contains('/') {
        return value
            .parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|e| format!("--ip {value:?}: not an address or a network ({e})"));
    }
    let ip = f2b_proto::event::parse_ip(value)
        .map_err(|e| format!("--ip {value:?}: not an address or a network ({e})"))?;
    Ok(ipnet::IpNet::from(ip))
}

/// `bans`: the rows `filter` asks for, as a table or a JSON array, from the
/// ledger in `config`'s `[publisher] state_dir`.
pub fn bans(config: &Config, filter: &Filter, json_out: bool) -> Result<String, InspectError> {
    let view = LedgerView::open(&config.publisher.state_dir)?;
    let rows = view.bans(filter, now_ms())?;
    Ok(if json_out {
        let all: Vec<Value> = rows.iter().map(ban_json).collect();
        let mut s = Value::Array(all).to_string();
        s.push('\n');
        s
    } else {
        table(&rows, filter.all)
    })
}

fn ban_json(k: &Kept) -> Value {
    let r = &k.record;
    json!({
        "seq": r.seq,
        "id": r.event.id.to_string(),
        "node": r.event.node.as_str(),
        "jail": r.event.jail.as_str(),
        "ip": r.event.ip.to_string(),
        "action": r.event.action.to_string(),
        "active": k.active,
        "time_ms": r.event.time_ms,
        "since_ms": r.accepted_ms,
        "since": time(r.accepted_ms),
        "expires_ms": r.expires_ms,
        "expires": r.expires_ms.map(time),
        "reported_by": r.reported_by.column(),
        "origin": if r.legacy { "legacy" } else { "native" },
        "peer": r.peer,
    })
}

fn table(rows: &[Kept], all: bool) -> String {
    if rows.is_empty() {
        return if all {
            "the ledger keeps no event\n".into()
        } else {
            "no active bans\n".into()
        };
    }
    let mut header = vec![
        "NODE",
        "JAIL",
        "IP",
        "SINCE",
        "EXPIRES",
        "SEQ",
        "REPORTED_BY",
    ];
    if all {
        header.extend(["ACTION", "ACTIVE"]);
    }
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for k in rows {
        let r = &k.record;
        let mut line = vec![
            r.event.node.to_string(),
            r.event.jail.to_string(),
            r.event.ip.to_string(),
            time(r.accepted_ms),
            r.expires_ms.map_or_else(|| "-".to_owned(), time),
            r.seq.to_string(),
            r.reported_by.to_string(),
        ];
        if all {
            line.push(r.event.action.to_string());
            line.push(if k.active { "yes" } else { "no" }.to_owned());
        }
        lines.push(line);
    }
    let widths: Vec<usize> = (0..lines[0].len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let active = rows.iter().filter(|k| k.active).count();
    out.push_str(&format!(
        "{} row{}{}\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        if all {
            format!(", {active} active")
        } else {
            String::new()
        }
    ));
    out
}

/// What `status` found out about the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Liveness {
    pub pidfile: PathBuf,
    /// The pid in the pidfile, if there is one, and whether that process is an
    /// `f2b-publisher`.
    pub pidfile_pid: Option<(u32, bool)>,
    /// `f2b-publisher` daemons running with this configuration file.
    pub processes: Vec<u32>,
    /// The metrics endpoint and what `/readyz` answered (or why it did not).
    pub probe: Option<(SocketAddr, Result<String, String>)>,
}

impl Liveness {
    pub fn running(&self) -> bool {
        matches!(self.pidfile_pid, Some((_, true)))
            || !self.processes.is_empty()
            || matches!(self.probe, Some((_, Ok(_))))
    }
}

/// Whether process `pid` runs `f2b-publisher`.
fn is_publisher(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "f2b-publisher")
}

/// The `f2b-publisher` daemons (not this command, not another subcommand) whose
/// `--config` is `config_path`.
fn daemons(config_path: &Path) -> Vec<u32> {
    let want = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_owned());
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || !is_publisher(pid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .skip(1)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| NOT_THE_DAEMON.contains(&a.as_str())) {
            continue;
        }
        let mut config = PathBuf::from(f2b_common::config::defaults::CONFIG_PATH);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--config" || a == "-c" {
                if let Some(v) = it.next() {
                    config = PathBuf::from(v);
                }
            } else if let Some(v) = a.strip_prefix("--config=") {
                config = PathBuf::from(v);
            }
        }
        // A relative path is relative to that process's working directory.
        let config = if config.is_relative() {
            std::fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd.join(&config))
                .unwrap_or(config)
        } else {
            config
        };
        if std::fs::canonicalize(&config).unwrap_or(config) == want {
            found.push(pid);
        }
    }
    found.sort_unstable();
    found
}

/// `GET /readyz` on the metrics endpoint: the answer's body, or why there is none.
fn probe(addr: SocketAddr) -> Result<String, String> {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    if addr.port() == 0 {
        return Err("metrics_bind has port 0 (any free port): cannot probe it".into());
    }
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
        .map_err(|e| format!("no answer on {addr}: {e}"))?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(PROBE_TIMEOUT)))
        .and_then(|()| {
            write!(
                s,
                "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
        })
        .map_err(|e| format!("no answer on {addr}: {e}"))?;
    let mut text = String::new();
    s.take(64 * 1024)
        .read_to_string(&mut text)
        .map_err(|e| format!("no answer on {addr}: {e}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 503") {
        Ok(body.to_owned())
    } else {
        Err(format!(
            "{addr} answered, but not as f2b-publisher's metrics: {}",
            text.lines().next().unwrap_or("")
        ))
    }
}

/// Looks for the daemon of the configuration at `config_path`.
pub fn liveness(config: &Config, config_path: &Path) -> Liveness {
    let pidfile = config.publisher.pidfile.clone();
    let pidfile_pid = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map(|pid| (pid, is_publisher(pid)));
    Liveness {
        pidfile,
        pidfile_pid,
        processes: daemons(config_path),
        probe: config.metrics.publisher.map(|a| (a, probe(a))),
    }
}

/// `status`: the text (or JSON) to print and whether the daemon runs.
pub fn status(config: &Config, config_path: &Path, json_out: bool) -> (String, bool) {
    let live = liveness(config, config_path);
    let ledger = LedgerView::open(&config.publisher.state_dir).and_then(|v| v.summary(now_ms()));
    let t = &config.trust;
    let monitors: Vec<&str> = t.monitors.keys().map(|n| n.as_str()).collect();
    let public_key = t.signing_key.as_ref().map(|k| k.public().to_string());
    let running = live.running();
    if json_out {
        let v = json!({
            "running": running,
            "config": config_path.display().to_string(),
            "pidfile": live.pidfile.display().to_string(),
            "pidfile_pid": live.pidfile_pid.map(|(p, _)| p),
            "pidfile_pid_alive": live.pidfile_pid.map(|(_, a)| a),
            "processes": live.processes,
            "metrics": live.probe.as_ref().map(|(addr, r)| json!({
                "addr": addr.to_string(),
                "ready": matches!(r, Ok(b) if b == "ready"),
                "answer": match r { Ok(b) => b.clone(), Err(e) => e.clone() },
            })),
            "ledger": match &ledger {
                Ok(s) => summary_json(s),
                Err(e) => json!({ "error": f2b_common::daemon::error_chain(e) }),
            },
            "trust": {
                "monitors": monitors,
                "allow_unauthenticated": t.allow_unauthenticated,
                "public_key": public_key,
            },
        });
        return (format!("{v}\n"), running);
    }
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    let how: Vec<String> = [
        live.pidfile_pid
            .filter(|(_, alive)| *alive)
            .map(|(p, _)| format!("pid {p} in {}", live.pidfile.display())),
        (!live.processes.is_empty()).then(|| {
            let pids: Vec<String> = live.processes.iter().map(u32::to_string).collect();
            format!("process {}", pids.join(", "))
        }),
        match &live.probe {
            Some((a, Ok(_))) => Some(format!("metrics on {a}")),
            _ => None,
        },
    ]
    .into_iter()
    .flatten()
    .collect();
    line(
        "daemon:",
        if running {
            format!("running ({})", how.join("; "))
        } else {
            let pidfile = match live.pidfile_pid {
                Some((p, false)) => format!("stale pidfile {} (pid {p})", live.pidfile.display()),
                _ => format!("no pidfile at {}", live.pidfile.display()),
            };
            format!("not running ({pidfile}, no f2b-publisher process with this --config)")
        },
    );
    match &live.probe {
        Some((a, Ok(body))) => line("metrics:", format!("http://{a}/readyz: {body}")),
        Some((_, Err(e))) => line("metrics:", e.clone()),
        None => line("metrics:", "off ([publisher] metrics_bind not set)".into()),
    }
    match &ledger {
        Ok(s) => {
            line("ledger:", s.path.display().to_string());
            line("epoch:", s.epoch.to_string());
            line(
                "last seq:",
                format!("{} ({} rows kept)", s.last_seq, s.rows),
            );
            line("active bans:", s.active.to_string());
            if !s.active_by_jail.is_empty() {
                line("  by jail:", counts(&s.active_by_jail));
                line("  by node:", counts(&s.active_by_node));
            }
        }
        Err(e) => line("ledger:", f2b_common::daemon::error_chain(e)),
    }
    line(
        "monitors:",
        format!(
            "{} credential{} ({}){}",
            monitors.len(),
            if monitors.len() == 1 { "" } else { "s" },
            monitors.join(", "),
            if t.allow_unauthenticated {
                "; allow_unauthenticated = true"
            } else {
                ""
            }
        ),
    );
    line(
        "public key:",
        public_key.unwrap_or_else(|| "none (trust.signing_key_file not set)".into()),
    );
    (out, running)
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "path": s.path.display().to_string(),
        "epoch": s.epoch.to_string(),
        "last_seq": s.last_seq,
        "rows": s.rows,
        "active_bans": s.active,
        "by_jail": s.active_by_jail,
        "by_node": s.active_by_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `answer`.
    fn server(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                // The whole request first: closing with unread data would reset
                // the connection before the client reads the answer.
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(answer.as_bytes());
                let _ = s.shutdown(std::net::Shutdown::Write);
            }
        });
        addr
    }

    #[test]
    fn probe_reads_readyz() {
        let a = server("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n");
        assert_eq!(probe(a), Ok("ready".to_owned()));
        let a =
            server("HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: the ledger is not open\n");
        assert_eq!(probe(a), Ok("not ready: the ledger is not open".to_owned()));
        let a = server("HTTP/1.1 404 Not Found\r\n\r\nnope\n");
        assert!(probe(a)
            .unwrap_err()
            .contains("not as f2b-publisher's metrics"));
        // Nobody listens there any more.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(probe(closed).unwrap_err().contains("no answer"));
        assert!(probe("127.0.0.1:0".parse().unwrap())
            .unwrap_err()
            .contains("port 0"));
    }

    #[test]
    fn ip_filters_are_addresses_or_networks() {
        assert_eq!(
            parse_ip_filter("203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_ip_filter("::ffff:203.0.113.7").unwrap().to_string(),
            "203.0.113.7/32"
        );
        assert_eq!(
            parse_ip_filter("203.0.113.7/24").unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert!(parse_ip_filter("web1").unwrap_err().contains("--ip"));
    }
}
