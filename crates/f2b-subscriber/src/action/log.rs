//! `action = "log"`: appends one line per event to `[subscriber] log_path`, for a
//! fail2ban jail that reads that file (filter `fail2ban-cluster`).
//!
//! The format is stable (a filter depends on it):
//!
//! ```text
//! 2026-11-21 04:52:53,446 f2b-subscriber[4242]: Ban 203.0.113.5 jail=sshd node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17
//! ```
//!
//! - local time `%Y-%m-%d %H:%M:%S,%3f` (fail2ban's own log format, which its
//!   default date detection reads), then `f2b-subscriber[PID]: `;
//! - `Ban` or `Unban`, one space, the address (IPv4 dotted, IPv6 compressed lower
//!   case);
//! - `jail=` the local jail the event is applied for (`ban_jail`, or the event's
//!   jail), `node=` the node that banned, `id=` the event id (UUID), `seq=` its
//!   broadcast sequence number.
//!
//! A fail2ban `failregex` for the Ban lines (fail2ban removes the date before
//! matching): [`FAILREGEX`].
//!
//! The file is opened (created if missing) for each batch and each line is written
//! with one `write` call, so lines are complete on disk at once and a rotated file
//! is followed without a signal.
//!
//! The lines are written on the executor's task when the file takes them without
//! waiting (a regular file; a pipe with room), which is the usual case: a write
//! to the page cache costs less than handing it to a blocking thread and back,
//! the two thread wake-ups that were on the path of every ban. What would wait
//! (a named pipe whose reader is slow or not there yet) goes to a blocking
//! thread, so the subscriber's other tasks do not wait for it. A regular file
//! cannot say it would wait: on storage that stalls (a hung network file
//! system, the kernel throttling writers while it flushes) the write holds the
//! subscriber's runtime meanwhile, as any page-cache write holds its thread.
//! Such a `log_path` is better on a local disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use chrono::{DateTime, Local};
use f2b_proto::{Action, JailName};

use super::{Applier, BoxFuture, CallError, FailureScope};
use crate::pending::Item;

/// A fail2ban `failregex` that matches the Ban lines of this action (checked with
/// fail2ban-regex 1.0.2 by this crate's tests). fail2ban cuts the date out of the
/// line before matching and leaves the space after it, hence the `^\s*`.
pub const FAILREGEX: &str =
    r"^\s*f2b-subscriber\[\d+\]: Ban <HOST> jail=\S+ node=\S+ id=[0-9a-f-]{36} seq=\d+$";

/// The log-file action.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    pid: u32,
}

impl LogFile {
    pub fn new(path: PathBuf) -> Self {
        LogFile {
            path,
            pid: std::process::id(),
        }
    }
}

/// One line (with its newline) of the log action.
pub fn format_line(time: DateTime<Local>, pid: u32, jail: &JailName, item: &Item) -> String {
    let verb = match item.action() {
        Action::Ban => "Ban",
        Action::Unban => "Unban",
    };
    format!(
        "{} f2b-subscriber[{pid}]: {verb} {} jail={jail} node={} id={} seq={}\n",
        time.format("%Y-%m-%d %H:%M:%S,%3f"),
        item.ip(),
        item.event.node,
        item.event.id,
        item.seq
    )
}

impl Applier for LogFile {
    fn name(&self) -> &'static str {
        "log"
    }

    fn max_batch(&self) -> usize {
        crate::pending::MAX_BATCH
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        _action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        let now = Local::now();
        let text: Vec<String> = items
            .iter()
            .map(|i| format_line(now, self.pid, jail, i))
            .collect();
        let path = self.path.clone();
        Box::pin(async move {
            let failed = |e: &dyn std::fmt::Display| {
                CallError::new(
                    FailureScope::Call,
                    format!("cannot append to {}: {e}", path.display()),
                )
            };
            let rest = append_now(&path, text).map_err(|e| failed(&e))?;
            if rest.lines.is_empty() {
                return Ok(());
            }
            let file = path.clone();
            match tokio::task::spawn_blocking(move || append(&file, rest)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(failed(&e)),
                Err(e) => Err(failed(&e)),
            }
        })
    }
}

/// What [`append_now`] could not write without waiting.
struct Rest {
    /// The file, still open (a reader of a pipe that sees every writer gone
    /// takes it for the end of the data); `None` when it could not be opened
    /// without waiting.
    file: Option<File>,
    lines: Vec<Vec<u8>>,
}

/// Appends what of `lines` the file takes without waiting, each line with one
/// `write`; returns the rest (from the first line not written whole, its
/// unwritten part first) for [`append`]. A named pipe with no reader yet
/// cannot even be opened so: then the rest is every line.
fn append_now(path: &Path, lines: Vec<String>) -> io::Result<Rest> {
    let mut lines = lines.into_iter().map(String::into_bytes);
    let opened = OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path);
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENXIO as i32) => {
            return Ok(Rest {
                file: None,
                lines: lines.collect(),
            })
        }
        Err(e) => return Err(e),
    };
    while let Some(mut line) = lines.next() {
        let written = match write_once(&mut f, &line) {
            Ok(n) if n == line.len() => continue,
            // Part of a line (a pipe takes up to PIPE_BUF bytes whole or not at
            // all, so only a line longer than that): the rest goes on next.
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        line.drain(..written);
        return Ok(Rest {
            file: Some(f),
            lines: std::iter::once(line).chain(lines).collect(),
        });
    }
    Ok(Rest {
        file: None,
        lines: Vec::new(),
    })
}

/// One `write` of `bytes`, again if interrupted by a signal.
fn write_once(f: &mut File, bytes: &[u8]) -> io::Result<usize> {
    loop {
        match f.write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Appends `rest`'s lines, waiting as long as the file makes it (on a
/// blocking thread): through the file [`append_now`] left open, made blocking,
/// or opened now.
fn append(path: &Path, rest: Rest) -> io::Result<()> {
    let mut f = match rest.file {
        Some(f) => {
            let flags = OFlag::from_bits_truncate(fcntl(&f, FcntlArg::F_GETFL)?);
            fcntl(&f, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
            f
        }
        None => OpenOptions::new().create(true).append(true).open(path)?,
    };
    for line in &rest.lines {
        f.write_all(line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use f2b_proto::{Event, EventId, NodeName};

    fn item(action: Action, ip: &str) -> Item {
        Item::new(
            JailName::new("cluster").unwrap(),
            Event::new(
                EventId::from_u128(0x0f1e_2d3c_4b5a_6978_8796_a5b4_c3d2_e1f0),
                NodeName::new("web1").unwrap(),
                JailName::new("sshd").unwrap(),
                action,
                ip.parse().unwrap(),
                1_763_702_000_000,
            )
            .unwrap(),
            17,
        )
    }

    fn time() -> DateTime<Local> {
        Local
            .with_ymd_and_hms(2026, 11, 21, 4, 52, 53)
            .single()
            .unwrap()
            + chrono::Duration::milliseconds(46)
    }

    #[test]
    fn line_format_is_stable() {
        let jail = JailName::new("sshd").unwrap();
        assert_eq!(
            format_line(time(), 4242, &jail, &item(Action::Ban, "203.0.113.5")),
            "2026-11-21 04:52:53,046 f2b-subscriber[4242]: Ban 203.0.113.5 jail=sshd node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17\n"
        );
        assert_eq!(
            format_line(time(), 7, &jail, &item(Action::Unban, "2001:DB8::1")),
            "2026-11-21 04:52:53,046 f2b-subscriber[7]: Unban 2001:db8::1 jail=sshd node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17\n"
        );
    }

    #[tokio::test]
    async fn appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.log");
        std::fs::write(&path, "earlier line\n").unwrap();
        let mut a = LogFile::new(path.clone());
        let jail = JailName::new("cluster").unwrap();
        let items = [item(Action::Ban, "203.0.113.5"), item(Action::Ban, "::1")];
        a.apply(&jail, Action::Ban, &items).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let pid = std::process::id();
        assert!(
            lines[1].ends_with(&format!("f2b-subscriber[{pid}]: Ban 203.0.113.5 jail=cluster node=web1 id=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0 seq=17")),
            "{text}"
        );
        assert!(lines[2].contains(": Ban ::1 jail=cluster"), "{text}");
    }

    /// A named pipe: what it takes at once is written on the task, the rest
    /// waits for the reader on a blocking thread: all of it if the reader is
    /// not there yet (the pipe cannot be opened without waiting), else what
    /// does not fit in the pipe (more than 64 KiB is written). Either way
    /// every line arrives whole and in order.
    #[tokio::test]
    async fn a_pipe_gets_every_line_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.fifo");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let ips: Vec<String> = (0..2000u32)
            .map(|n| std::net::Ipv4Addr::from(0xcb00_7100 + n).to_string())
            .collect();
        let items: Vec<Item> = ips.iter().map(|ip| item(Action::Ban, ip)).collect();
        let jail = JailName::new("cluster").unwrap();
        let mut a = LogFile::new(path.clone());
        let apply = tokio::spawn(async move { a.apply(&jail, Action::Ban, &items).await });
        // Opening for reading waits for the writer, and the writer's blocking
        // open for the reader: they meet in either order.
        let reader = std::thread::spawn(move || std::fs::read_to_string(&path).unwrap());
        apply.await.unwrap().unwrap();
        let text = reader.join().unwrap();
        let got: Vec<&str> = text
            .lines()
            .map(|l| l.split(": Ban ").nth(1).unwrap().split(' ').next().unwrap())
            .collect();
        assert_eq!(got, ips);
    }

    #[tokio::test]
    async fn unwritable_path_fails_the_whole_call() {
        let mut a = LogFile::new("/nonexistent/dir/cluster.log".into());
        let jail = JailName::new("cluster").unwrap();
        let err = a
            .apply(&jail, Action::Ban, &[item(Action::Ban, "203.0.113.5")])
            .await
            .unwrap_err();
        assert_eq!(err.scope, FailureScope::Call);
        assert!(
            err.message.contains("/nonexistent/dir/cluster.log"),
            "{err}"
        );
    }
}
