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

use std::io::Write;
use std::path::PathBuf;

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
            let write = move || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                for line in &text {
                    f.write_all(line.as_bytes())?;
                }
                Ok(())
            };
            let path = self.path.display().to_string();
            match tokio::task::spawn_blocking(write).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CallError::new(
                    FailureScope::Call,
                    format!("cannot append to {path}: {e}"),
                )),
                Err(e) => Err(CallError::new(
                    FailureScope::Call,
                    format!("writing {path}: {e}"),
                )),
            }
        })
    }
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
