//! `action = "exec"`: runs `[subscriber] exec` once per event, without a shell.
//!
//! In every argument, `<ip>` is replaced by the address, `<jail>` by the local jail
//! (`ban_jail` or the event's jail), `<action>` by `ban` or `unban` and `<node>` by
//! the node that banned. Replacement is done in one pass, so a value that itself
//! contains a tag is not replaced again, and no character has any special meaning:
//! each argument reaches the program exactly as substituted. A non-zero exit or a
//! run longer than [`EXEC_TIMEOUT`] is a failure of that event, retried with backoff;
//! a program that cannot be started fails every event (retried as well).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use f2b_common::config::EXEC_TAGS;
use f2b_proto::{Action, JailName};
use tokio::process::Command;

use super::{clip, Applier, BoxFuture, CallError, FailureScope};
use crate::pending::Item;

/// How long one run may take before it is killed and counted as failed.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The exec action.
#[derive(Debug)]
pub struct Exec {
    argv: Vec<String>,
    timeout: Duration,
}

impl Exec {
    /// `argv[0]` is the program (a path, or a name looked up in `PATH`).
    pub fn new(argv: Vec<String>) -> Self {
        Exec {
            argv,
            timeout: EXEC_TIMEOUT,
        }
    }

    /// Sets the time limit of one run.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// `argv` with the tags replaced for `item` applied in `jail`.
pub fn substitute(argv: &[String], jail: &JailName, item: &Item) -> Vec<String> {
    let ip = item.ip().to_string();
    let values = [
        ip.as_str(),
        jail.as_str(),
        item.action().as_str(),
        item.event.node.as_str(),
    ];
    argv.iter()
        .map(|arg| {
            let mut out = String::with_capacity(arg.len());
            let mut rest = arg.as_str();
            'scan: while !rest.is_empty() {
                for (tag, value) in EXEC_TAGS.iter().zip(values) {
                    if let Some(after) = rest.strip_prefix(tag) {
                        out.push_str(value);
                        rest = after;
                        continue 'scan;
                    }
                }
                let mut chars = rest.chars();
                if let Some(c) = chars.next() {
                    out.push(c);
                }
                rest = chars.as_str();
            }
            out
        })
        .collect()
}

impl Applier for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn max_batch(&self) -> usize {
        1
    }

    fn apply<'a>(
        &'a mut self,
        jail: &'a JailName,
        _action: Action,
        items: &'a [Item],
    ) -> BoxFuture<'a, Result<(), CallError>> {
        Box::pin(async move {
            for item in items {
                self.run_one(jail, item).await?;
            }
            Ok(())
        })
    }
}

impl Exec {
    async fn run_one(&self, jail: &JailName, item: &Item) -> Result<(), CallError> {
        let argv = substitute(&self.argv, jail, item);
        let Some((program, args)) = argv.split_first() else {
            return Err(CallError::new(FailureScope::Call, "exec is empty"));
        };
        let child = Command::new(PathBuf::from(program))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                CallError::new(FailureScope::Call, format!("cannot run {program}: {e}"))
            })?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(CallError::new(
                    FailureScope::Undetermined,
                    format!("{program}: {e}"),
                ))
            }
            Err(_) => {
                return Err(CallError::new(
                    FailureScope::Undetermined,
                    format!(
                        "{program} did not finish within {:?} (killed)",
                        self.timeout
                    ),
                ))
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let said = [stderr.trim(), stdout.trim()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let status = match out.status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_owned(),
        };
        let message = if said.is_empty() {
            format!("{program}: {status}")
        } else {
            format!("{program}: {status}: {said}")
        };
        Err(CallError::new(
            FailureScope::Undetermined,
            clip(message, 512),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::{Event, EventId, NodeName};

    fn item(jail: &str, ip: &str, action: Action) -> Item {
        Item::new(
            JailName::new(jail).unwrap(),
            Event::new(
                EventId::from_u128(1),
                NodeName::new("web1").unwrap(),
                JailName::new("sshd").unwrap(),
                action,
                ip.parse().unwrap(),
                1_763_702_000_000,
            )
            .unwrap(),
            1,
        )
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn substitutes_every_tag_in_one_pass() {
        // Jail names cannot hold `<` (nor shell metacharacters, f2b_proto::JailName);
        // a tag's replacement is never substituted again all the same.
        let jail = JailName::new("sshd").unwrap();
        let i = item("cluster", "2001:db8::1", Action::Unban);
        let out = substitute(
            &argv(&[
                "/bin/prog",
                "--<action>=<ip>",
                "<jail>",
                "<node>/<node>",
                "<ip",
                "<>",
                "plain",
                "é<ip>é",
            ]),
            &jail,
            &i,
        );
        assert_eq!(
            out,
            argv(&[
                "/bin/prog",
                "--unban=2001:db8::1",
                "sshd",
                "web1/web1",
                "<ip",
                "<>",
                "plain",
                "é2001:db8::1é",
            ])
        );
    }

    #[tokio::test]
    async fn shell_metacharacters_reach_the_program_literally() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let jail = JailName::new("j:x@y+z.w_v-u").unwrap();
        let mut e = Exec::new(argv(&[
            "/bin/sh",
            "-c",
            "printf '%s\\n' \"$@\" > \"$0\"",
            out.to_str().unwrap(),
            "<jail>",
            "$(id) <ip> *",
            "<action>",
        ]));
        e.apply(
            &jail,
            Action::Ban,
            &[item(jail.as_str(), "203.0.113.5", Action::Ban)],
        )
        .await
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "j:x@y+z.w_v-u\n$(id) 203.0.113.5 *\nban\n");
    }

    #[tokio::test]
    async fn failures_carry_the_message() {
        let jail = JailName::new("sshd").unwrap();
        let i = [item("sshd", "203.0.113.5", Action::Ban)];
        let mut e = Exec::new(argv(&["/bin/sh", "-c", "echo nope >&2; exit 3"]));
        let err = e.apply(&jail, Action::Ban, &i).await.unwrap_err();
        assert_eq!(err.scope, FailureScope::Undetermined);
        assert_eq!(err.message, "/bin/sh: exit status 3: nope");

        let mut e = Exec::new(argv(&["/nonexistent/prog", "<ip>"]));
        let err = e.apply(&jail, Action::Ban, &i).await.unwrap_err();
        assert_eq!(err.scope, FailureScope::Call);

        let mut e = Exec::new(argv(&["/bin/sleep", "10"])).with_timeout(Duration::from_millis(100));
        let err = e.apply(&jail, Action::Ban, &i).await.unwrap_err();
        assert!(err.message.contains("did not finish"), "{err}");
    }
}
