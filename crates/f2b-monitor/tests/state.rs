//! The state files: the queue journal and the saved position survive a reopen.

use std::path::Path;

use f2b_monitor::state::{key, StateError, StateStore};
use f2b_monitor::tail::FilePos;
use f2b_proto::{Action, Event, EventId, JailName, NodeName};

fn node() -> NodeName {
    NodeName::new("web1").unwrap()
}

fn event(n: u128) -> Event {
    Event::new(
        EventId::from_u128(n),
        node(),
        JailName::new("sshd").unwrap(),
        Action::Ban,
        format!("192.0.2.{n}").parse().unwrap(),
        1_763_702_000_000 + n as u64,
    )
    .unwrap()
}

fn open(dir: &Path) -> (StateStore, f2b_monitor::state::Saved) {
    StateStore::open(dir, &node(), Path::new("/var/log/fail2ban.log")).unwrap()
}

#[test]
fn first_start_has_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, saved) = open(dir.path());
    assert_eq!(saved.position, None);
    assert!(saved.pending.is_empty());
}

#[test]
fn pending_events_and_position_survive() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(dir.path());
        for n in 1..=4 {
            s.add(&event(n)).unwrap();
        }
        s.done(EventId::from_u128(1)).unwrap();
        s.done(EventId::from_u128(3)).unwrap();
        s.save_position(&[FilePos {
            dev: 1,
            ino: 2,
            offset: 3,
        }])
        .unwrap();
        assert_eq!(s.pending(), 2);
    }
    let (s, saved) = open(dir.path());
    assert_eq!(saved.pending, [event(2), event(4)], "same ids, same order");
    assert_eq!(
        saved.position,
        Some(vec![FilePos {
            dev: 1,
            ino: 2,
            offset: 3
        }])
    );
    assert_eq!(s.pending(), 2);
}

#[test]
fn queue_file_is_emptied_when_nothing_is_pending() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _) = open(dir.path());
    s.add(&event(1)).unwrap();
    s.done(EventId::from_u128(1)).unwrap();
    let queue = dir.path().join(format!(
        "{}.queue",
        key(&node(), Path::new("/var/log/fail2ban.log"))
    ));
    assert_eq!(std::fs::metadata(&queue).unwrap().len(), 0);
}

#[test]
fn a_cut_last_line_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(dir.path());
        s.add(&event(1)).unwrap();
        s.add(&event(2)).unwrap();
    }
    let queue = dir.path().join(format!(
        "{}.queue",
        key(&node(), Path::new("/var/log/fail2ban.log"))
    ));
    let text = std::fs::read_to_string(&queue).unwrap();
    // A crash in the middle of writing a third line.
    std::fs::write(&queue, format!("{text}+{{\"v\":1,\"type\":\"rep")).unwrap();
    let (_s, saved) = open(dir.path());
    assert_eq!(saved.pending, [event(1), event(2)]);
}

#[test]
fn one_monitor_per_state() {
    let dir = tempfile::tempdir().unwrap();
    let k = key(&node(), Path::new("/var/log/fail2ban.log"));
    // A live process (pid 1) holds the lock.
    std::fs::write(dir.path().join(format!("{k}.lock")), "1\n").unwrap();
    let err =
        StateStore::open(dir.path(), &node(), Path::new("/var/log/fail2ban.log")).unwrap_err();
    assert!(matches!(err, StateError::Locked { pid: 1, .. }), "{err}");
    // Another node or another log: other files.
    assert!(StateStore::open(dir.path(), &node(), Path::new("/var/log/other.log")).is_ok());
    // A stale lock (no such process) is taken over.
    std::fs::write(dir.path().join(format!("{k}.lock")), "4000000000\n").unwrap();
    let (s, _) = open(dir.path());
    drop(s);
    assert!(
        !dir.path().join(format!("{k}.lock")).exists(),
        "released on drop"
    );
}
