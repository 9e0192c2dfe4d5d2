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
        s.save_position(
            &[FilePos {
                dev: 1,
                ino: 2,
                offset: 3,
            }],
            true,
        )
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
    assert!(saved.info_seen);
}

#[test]
fn add_all_and_position_are_on_the_disk_when_they_return() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut s, _) = open(dir.path());
        s.add_all(&[event(1), event(2)]).unwrap();
        s.save_position(
            &[FilePos {
                dev: 1,
                ino: 2,
                offset: 30,
            }],
            false,
        )
        .unwrap();
        // Nothing half-written is left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }
    let (_s, saved) = open(dir.path());
    assert_eq!(saved.pending, [event(1), event(2)]);
    assert_eq!(saved.position.unwrap()[0].offset, 30);
    assert!(!saved.info_seen);
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
    let (held, _) = open(dir.path());
    // The lock is flock(2): a second open, even from this process, is refused,
    // and says who holds it.
    let err =
        StateStore::open(dir.path(), &node(), Path::new("/var/log/fail2ban.log")).unwrap_err();
    let me = std::process::id();
    assert!(
        matches!(err, StateError::Locked { pid: Some(p), .. } if p == me),
        "{err}"
    );
    assert!(err.to_string().contains(&format!("process {me}")), "{err}");
    // Another node or another log: other files.
    assert!(StateStore::open(dir.path(), &node(), Path::new("/var/log/other.log")).is_ok());
    // Released when the store is dropped (or the process ends).
    drop(held);
    let (_again, _) = open(dir.path());
}

#[test]
fn a_stale_lock_file_is_not_a_lock() {
    // After a reboot the lock file may name a process id now used by another
    // program (here pid 1, always alive): nobody holds the lock, so it is taken.
    let dir = tempfile::tempdir().unwrap();
    let k = key(&node(), Path::new("/var/log/fail2ban.log"));
    std::fs::write(dir.path().join(format!("{k}.lock")), "1\n").unwrap();
    let (_s, _) = open(dir.path());
    let text = std::fs::read_to_string(dir.path().join(format!("{k}.lock"))).unwrap();
    assert_eq!(text.trim(), std::process::id().to_string());
}
