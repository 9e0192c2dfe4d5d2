//! Condition waits with deadlines.

use std::time::{Duration, Instant};

/// The default deadline of every wait: a generous upper bound for a slow, loaded CI
/// machine. Waits return as soon as their condition holds, so it never slows a
/// passing test.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`until`] checks its condition.
const POLL: Duration = Duration::from_millis(20);

/// Checks `cond` until it returns `Some`, and returns that value; panics with `what`
/// and `report()` (the state that was waited on) when `timeout` passes first. For
/// conditions no event wakes up (a file written by another process, a command's
/// output); a process's log lines have [`crate::Process::wait_for_line`].
pub fn until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
    report: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                report()
            );
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_as_soon_as_the_condition_holds() {
        let mut n = 0;
        let v = until(
            "n to reach 3",
            TIMEOUT,
            || {
                n += 1;
                (n >= 3).then_some(n)
            },
            String::new,
        );
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after 50ms waiting for nothing\nstate: none")]
    fn panics_with_the_report_on_timeout() {
        until::<()>(
            "nothing",
            Duration::from_millis(50),
            || None,
            || "state: none".into(),
        );
    }
}
