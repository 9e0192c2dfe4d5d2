use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use f2b_proto::{SnapshotReply, MAX_MESSAGE_SIZE};
use rusqlite::params;

use super::*;

const NOW: u64 = 1_763_702_000_000;
const BAN_MS: u64 = 600_000;

fn event(id: u128, jail: &str, action: Action, ip: &str) -> Event {
    Event::new(
        EventId::from_u128(id),
        NodeName::new("web1").unwrap(),
        JailName::new(jail).unwrap(),
        action,
        ip.parse().unwrap(),
        NOW - 5,
    )
    .unwrap()
}

/// Appends the next event, accepted at `at`.
fn add(l: &mut Ledger, jail: &str, action: Action, ip: &str, at: u64) -> u64 {
    let seq = l.last_seq() + 1;
    l.append(&Record {
        seq,
        event: event(u128::from(seq as u32) + 1000, jail, action, ip),
        accepted_ms: at,
        expires_ms: (action == Action::Ban).then_some(at + BAN_MS),
        legacy: false,
        peer: "192.0.2.99".into(),
        reported_by: Reporter::Credential(NodeName::new("web1").unwrap()),
    })
    .unwrap();
    seq
}

fn rows(l: &Ledger) -> Vec<Record> {
    let mut all = Vec::new();
    assert_eq!(l.for_each(|r| all.push(r)).unwrap(), 0);
    all
}

/// Every page of the snapshot, following the cursors.
fn pages(l: &Ledger, jails: &[&str], now: u64) -> Vec<SnapshotPage> {
    let jails: Vec<JailName> = jails.iter().map(|j| JailName::new(j).unwrap()).collect();
    let mut cursor = None;
    let mut out = Vec::new();
    loop {
        let page = l.snapshot_page(&jails, cursor, now, l.last_seq()).unwrap();
        let bytes = SnapshotReply::Page(page.clone()).encode();
        assert!(bytes.len() <= MAX_MESSAGE_SIZE, "{} bytes", bytes.len());
        cursor = page.next;
        out.push(page);
        if cursor.is_none() {
            return out;
        }
        assert!(out.len() < 1000, "the cursor does not advance");
    }
}

fn snapshot_seqs(l: &Ledger, jails: &[&str], now: u64) -> Vec<u64> {
    pages(l, jails, now)
        .iter()
        .flat_map(|p| p.bans.iter().map(|b| b.seq))
        .collect()
}

#[test]
fn reopen_continues_the_sequence_in_the_same_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a/b/publisher");
    let mut l = Ledger::open(&state).unwrap();
    assert_eq!((l.opened(), l.last_seq()), (Opened::Created, 0));
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    assert_eq!(l.path(), state.join(LEDGER_FILE));
    let mode = std::fs::metadata(l.path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let epoch = l.epoch();
    for n in 0..3 {
        add(&mut l, "sshd", Action::Ban, &format!("203.0.113.{n}"), NOW);
    }
    drop(l);

    let mut l = Ledger::open(&state).unwrap();
    assert_eq!(
        (l.opened(), l.epoch(), l.last_seq()),
        (Opened::Existing, epoch, 3)
    );
    assert_eq!(
        rows(&l).iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let first = &rows(&l)[0];
    assert_eq!(first.event, event(1001, "sshd", Action::Ban, "203.0.113.0"));
    assert_eq!(
        (first.accepted_ms, first.expires_ms),
        (NOW, Some(NOW + BAN_MS))
    );
    // Neither a gap nor a reuse.
    let mut r = rows(&l)[0].clone();
    for seq in [3, 5] {
        r.seq = seq;
        let err = l.append(&r).unwrap_err();
        assert!(matches!(err, LedgerError::Sequence { .. }), "{err}");
    }
    assert_eq!(add(&mut l, "sshd", Action::Unban, "203.0.113.0", NOW), 4);
}

#[test]
fn the_last_seq_survives_pruning_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    add(&mut l, "sshd", Action::Unban, "203.0.113.2", NOW);
    let p = l.prune(NOW + 10 * BAN_MS, BAN_MS, PRUNE_BATCH).unwrap();
    assert_eq!(
        p,
        Pruned {
            deleted: 2,
            more: false
        }
    );
    assert_eq!(l.rows().unwrap(), 0);
    drop(l);
    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.last_seq(), 2);
    assert_eq!(add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW), 3);
}

/// `meta`'s last_seq as another connection reads it (what a restart sees
/// once the rows are pruned).
fn meta_last_seq(dir: &Path) -> i64 {
    let conn = Connection::open(dir.join(LEDGER_FILE)).unwrap();
    conn.query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
        r.get(0)
    })
    .unwrap()
}

/// In a batch, `meta`'s last_seq is written once, by the commit, with the rows:
/// a restart after the batch's rows were pruned still goes on after them.
#[test]
fn a_batch_commits_the_last_seq_with_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    assert_eq!(meta_last_seq(dir.path()), 1);
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Unban, "203.0.113.1", NOW);
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    add(&mut l, "sshd", Action::Unban, "203.0.113.2", NOW);
    assert_eq!(l.last_seq(), 4);
    // Nothing of the batch is committed yet, the last_seq neither.
    assert_eq!(meta_last_seq(dir.path()), 1);
    l.commit_batch(true).unwrap();
    assert_eq!(meta_last_seq(dir.path()), 4);
    // An empty batch changes nothing.
    l.begin_batch().unwrap();
    l.commit_batch(true).unwrap();
    assert_eq!(meta_last_seq(dir.path()), 4);
    let p = l.prune(NOW + 10 * BAN_MS, BAN_MS, PRUNE_BATCH).unwrap();
    assert_eq!(p.deleted, 4);
    assert_eq!(l.rows().unwrap(), 0);
    drop(l);
    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.last_seq(), 4);
    // After an unclean stop, the skip counts from the batch's last number.
    assert_eq!(l.start_serving().unwrap(), 0);
    drop(l);
    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!(l.start_serving().unwrap(), EARLY_BROADCAST_MAX);
    assert_eq!(l.last_seq(), 4 + EARLY_BROADCAST_MAX);
    assert_eq!(
        add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW),
        5 + EARLY_BROADCAST_MAX
    );
}

/// Undo data (of savepoints and statements) stays in memory: no temporary files.
#[test]
fn temporary_data_stays_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let store: i64 = l
        .conn
        .pragma_query_value(None, "temp_store", |r| r.get(0))
        .unwrap();
    assert_eq!(store, 2, "PRAGMA temp_store = MEMORY");
}

/// An append that cannot be written whole (here a ban without an expiry, which
/// the `active_bans` row's NOT NULL refuses) is refused before anything is
/// written, in a batch or not, and the batch's other events are committed with
/// the right last_seq.
#[test]
fn a_failed_append_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    let broken = |seq: u64| Record {
        seq,
        event: event(u128::from(seq) + 5000, "sshd", Action::Ban, "203.0.113.7"),
        accepted_ms: NOW,
        // A ban without an expiry: its active_bans row could not be written.
        expires_ms: None,
        legacy: false,
        peer: "192.0.2.99".into(),
        reported_by: Reporter::Unauthenticated,
    };
    assert!(l.append(&broken(1)).is_err());
    assert_eq!((l.last_seq(), l.rows().unwrap()), (0, 0));
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    assert!(l.append(&broken(2)).is_err());
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    l.commit_batch(false).unwrap();
    assert_eq!(rows(&l).iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(meta_last_seq(dir.path()), 2);
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1, 2]);
}

/// An append that fails after its `events` row (a disk error) leaves nothing
/// behind: on its own, its transaction is rolled back; in a batch (which has no
/// savepoint per append), the whole batch is, and its commit fails, so that
/// every request of it is refused and sent again. The next batch works.
#[test]
fn an_append_that_fails_half_way_leaves_nothing_and_fails_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    let record = |seq: u64, ip: &str| Record {
        seq,
        event: event(u128::from(seq) + 7000, "sshd", Action::Ban, ip),
        accepted_ms: NOW,
        expires_ms: Some(NOW + BAN_MS),
        legacy: false,
        peer: "192.0.2.99".into(),
        reported_by: Reporter::Unauthenticated,
    };
    // On its own.
    l.fail_half_way(true);
    assert!(l.append(&record(1, "203.0.113.1")).is_err());
    l.fail_half_way(false);
    assert!(l.conn.is_autocommit(), "its transaction is gone");
    assert_eq!((l.last_seq(), l.rows().unwrap()), (0, 0));
    assert!(snapshot_seqs(&l, &[], NOW).is_empty());
    // In a batch: the event before it goes too, and the commit fails.
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    l.fail_half_way(true);
    assert!(l.append(&record(2, "203.0.113.3")).is_err());
    l.fail_half_way(false);
    assert!(l.conn.is_autocommit(), "the batch's transaction is gone");
    assert_eq!(l.rows().unwrap(), 0);
    // The appends after it in the batch are refused without writing anything
    // (its other events, decided against the lost ones, are sent again).
    assert!(l.append(&record(2, "203.0.113.4")).is_err());
    assert_eq!((l.last_seq(), l.rows().unwrap()), (1, 0));
    assert!(!l.may_broadcast_early(), "a lost batch is not broadcast");
    assert!(l.commit_batch(false).is_err());
    assert_eq!(
        l.last_seq(),
        0,
        "nothing went out: the numbers are used again"
    );
    assert_eq!(meta_last_seq(dir.path()), 0);
    // Broadcast before the commit: the numbers used are kept.
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    l.fail_half_way(true);
    assert!(l.append(&record(2, "203.0.113.3")).is_err());
    l.fail_half_way(false);
    assert!(l.commit_batch(true).is_err());
    assert_eq!((l.last_seq(), l.rows().unwrap()), (1, 0));
    assert_eq!(
        meta_last_seq(dir.path()),
        1,
        "the number that went out is written"
    );
    // The next batch works.
    l.begin_batch().unwrap();
    let seq = add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    l.commit_batch(false).unwrap();
    assert_eq!(seq, 2);
    assert_eq!(rows(&l).iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
    assert_eq!(snapshot_seqs(&l, &[], NOW), [2]);
    assert_eq!(meta_last_seq(dir.path()), 2);
}

/// A batch SQLite rolled back by itself (as it does on a full disk) is lost
/// whole: the appends after it are refused, it is not broadcast early, and its
/// commit fails.
#[test]
fn a_batch_sqlite_rolled_back_refuses_the_rest_and_fails_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    assert!(l.may_broadcast_early());
    l.conn.execute_batch("ROLLBACK").unwrap();
    assert!(!l.may_broadcast_early());
    let refused = Record {
        seq: 3,
        event: event(7003, "sshd", Action::Unban, "203.0.113.2"),
        accepted_ms: NOW,
        expires_ms: None,
        legacy: false,
        peer: "192.0.2.99".into(),
        reported_by: Reporter::Unauthenticated,
    };
    assert!(l.append(&refused).is_err());
    assert!(l.commit_batch(false).is_err());
    assert_eq!((l.last_seq(), l.rows().unwrap()), (1, 1));
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1]);
    l.begin_batch().unwrap();
    assert_eq!(add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW), 2);
    l.commit_batch(false).unwrap();
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1, 2]);
}

/// A leftover `active_bans` row with the number of a new ban (only a file
/// edited by hand holds one) does not block the ban: it is replaced.
#[test]
fn a_stray_active_ban_row_with_a_new_number_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.conn
        .execute(
            "INSERT INTO active_bans (seq, jail, ip, expires_ms) VALUES (1, 'x', '192.0.2.1', 1)",
            [],
        )
        .unwrap();
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    l.commit_batch(false).unwrap();
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1]);
    let stray: i64 = l
        .conn
        .query_row(
            "SELECT count(*) FROM active_bans WHERE jail = 'x'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stray, 0);
}

#[test]
fn a_deleted_ledger_starts_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut l = Ledger::open(&state).unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    let epoch = l.epoch();
    drop(l);
    std::fs::remove_dir_all(&state).unwrap();
    let l = Ledger::open(&state).unwrap();
    assert_eq!((l.opened(), l.last_seq()), (Opened::Created, 0));
    assert_ne!(l.epoch(), epoch);
}

#[test]
fn prune_keeps_active_bans_and_recent_unbans_only() {
    let mut l = Ledger::in_memory(Epoch(1)).unwrap();
    let t = NOW;
    let expired = add(&mut l, "sshd", Action::Ban, "203.0.113.1", t - BAN_MS);
    let active = add(&mut l, "sshd", Action::Ban, "203.0.113.2", t - 1000);
    let superseded = add(&mut l, "sshd", Action::Ban, "203.0.113.3", t - 2000);
    let recent_unban = add(&mut l, "sshd", Action::Unban, "203.0.113.3", t - 1000);
    let old_unban = add(&mut l, "nginx", Action::Unban, "203.0.113.4", t - BAN_MS);
    // The same address in another jail is another ban.
    let other_jail = add(&mut l, "nginx", Action::Ban, "203.0.113.3", t - 1000);
    let unbanned_then_banned = add(&mut l, "nginx", Action::Unban, "203.0.113.5", t - 3000);
    let banned_again = add(&mut l, "nginx", Action::Ban, "203.0.113.5", t - 2000);

    // In small batches: `more` until the last one.
    let mut deleted = 0;
    loop {
        let p = l.prune(t, BAN_MS, 1).unwrap();
        deleted += p.deleted;
        if !p.more {
            break;
        }
    }
    assert_eq!(deleted, 4);
    let kept: Vec<u64> = rows(&l).iter().map(|r| r.seq).collect();
    assert_eq!(kept, [active, recent_unban, other_jail, banned_again]);
    for gone in [expired, superseded, old_unban, unbanned_then_banned] {
        assert!(!kept.contains(&gone));
    }
    assert_eq!(l.active_bans(t).unwrap(), 3);
    assert_eq!(l.last_seq(), banned_again);
    // Later, the bans expire and the unban ages out.
    l.prune(t + BAN_MS, BAN_MS, PRUNE_BATCH).unwrap();
    assert_eq!(l.rows().unwrap(), 0);
    assert_eq!(l.active_bans(t + BAN_MS).unwrap(), 0);
}

#[test]
fn snapshot_pages_cover_every_active_ban_once_in_order() {
    let mut l = Ledger::in_memory(Epoch(7)).unwrap();
    let mut expected = Vec::new();
    for n in 0..400u32 {
        let ip = std::net::Ipv4Addr::from(0xC633_6400 + n).to_string();
        let jail = ["sshd", "nginx", "postfix"][n as usize % 3];
        let seq = add(&mut l, jail, Action::Ban, &ip, NOW);
        if n % 7 == 0 {
            // Unbanned later: not in the snapshot.
            add(&mut l, jail, Action::Unban, &ip, NOW);
        } else {
            expected.push((seq, jail));
        }
    }
    // An unban of an address never banned is no ban either.
    add(&mut l, "sshd", Action::Unban, "192.0.2.1", NOW);
    let all = pages(&l, &[], NOW);
    assert!(all.len() >= 4, "{} pages", all.len());
    for p in &all {
        assert_eq!((p.epoch, p.seq), (Epoch(7), l.last_seq()));
        assert!(!p.bans.is_empty());
        for b in &p.bans {
            assert_eq!(b.event.action, Action::Ban);
            assert_eq!(b.expires_ms, NOW + BAN_MS);
        }
    }
    let seqs: Vec<u64> = all
        .iter()
        .flat_map(|p| p.bans.iter().map(|b| b.seq))
        .collect();
    assert_eq!(seqs, expected.iter().map(|(s, _)| *s).collect::<Vec<_>>());

    // A jail filter.
    let want: Vec<u64> = expected
        .iter()
        .filter(|(_, j)| *j != "nginx")
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(snapshot_seqs(&l, &["sshd", "postfix"], NOW), want);
    assert_eq!(snapshot_seqs(&l, &["no-such-jail"], NOW), Vec::<u64>::new());

    // Expired bans are not listed, even before they are pruned.
    assert_eq!(snapshot_seqs(&l, &[], NOW + BAN_MS), Vec::<u64>::new());
    let later = add(&mut l, "sshd", Action::Ban, "192.0.2.2", NOW + BAN_MS);
    assert_eq!(snapshot_seqs(&l, &[], NOW + BAN_MS), [later]);
}

#[test]
fn an_empty_snapshot_is_one_page() {
    let l = Ledger::in_memory(Epoch(7)).unwrap();
    let all = pages(&l, &[], NOW);
    assert_eq!(all.len(), 1);
    assert!(all[0].bans.is_empty());
    assert_eq!(all[0].seq, 0);
}

#[test]
fn a_cursor_past_the_end_gives_an_empty_last_page() {
    let mut l = Ledger::in_memory(Epoch(7)).unwrap();
    add(&mut l, "sshd", Action::Ban, "192.0.2.2", NOW);
    let page = l.snapshot_page(&[], Some(u64::MAX), NOW, 1).unwrap();
    assert!(page.bans.is_empty() && page.next.is_none());
}

#[test]
fn garbage_is_a_corrupt_ledger_which_recovery_moves_away() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(LEDGER_FILE);
    let garbage: Vec<u8> = (0..10_000u32).map(|n| (n * 7919 % 251) as u8).collect();
    std::fs::write(&file, &garbage).unwrap();
    std::fs::write(dir.path().join("ledger.sqlite3-wal"), b"stale wal").unwrap();

    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let shown = f2b_common::daemon::error_chain(&err);
    assert!(
        shown.contains(&file.display().to_string()) && shown.contains("move it away"),
        "{shown}"
    );
    // Still there: open alone never deletes anything.
    assert_eq!(std::fs::read(&file).unwrap(), garbage);
    assert!(dir.path().join("ledger.sqlite3-wal").exists());

    let now = UNIX_EPOCH + Duration::from_secs(1_763_702_000);
    let l = Ledger::open_or_recover(dir.path(), now).unwrap();
    assert_eq!((l.opened(), l.last_seq()), (Opened::Created, 0));
    let moved = dir.path().join("ledger.sqlite3.corrupt-1763702000");
    assert_eq!(std::fs::read(&moved).unwrap(), garbage);
    assert_eq!(
        std::fs::read(dir.path().join("ledger.sqlite3.corrupt-1763702000-wal")).unwrap(),
        b"stale wal"
    );
    drop(l);
    // The new ledger is sound, and a second corruption in the same second does
    // not overwrite the first one's evidence.
    assert_eq!(Ledger::open(dir.path()).unwrap().opened(), Opened::Existing);
    std::fs::write(&file, b"garbage again, but shorter").unwrap();
    Ledger::open_or_recover(dir.path(), now).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("ledger.sqlite3.corrupt-1763702000.1")).unwrap(),
        b"garbage again, but shorter"
    );
    assert_eq!(std::fs::read(&moved).unwrap(), garbage);
}

#[test]
fn damaged_pages_are_a_corrupt_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    for n in 0..2000u32 {
        let ip = std::net::Ipv4Addr::from(0xC633_6400 + n).to_string();
        add(&mut l, "sshd", Action::Ban, &ip, NOW);
    }
    drop(l); // the last connection checkpoints the WAL into the file
    let file = dir.path().join(LEDGER_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 64 * 1024, "{}", bytes.len());
    for (n, b) in bytes[8192..].iter_mut().enumerate() {
        *b = (n * 31 % 256) as u8;
    }
    std::fs::write(&file, &bytes).unwrap();
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
    let l = Ledger::open_or_recover(dir.path(), SystemTime::now()).unwrap();
    assert_eq!(l.last_seq(), 0);
}

#[test]
fn foreign_and_newer_databases_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(LEDGER_FILE);
    let other = Connection::open(&file).unwrap();
    other
        .execute_batch("CREATE TABLE bans (ip TEXT); INSERT INTO bans VALUES ('x');")
        .unwrap();
    drop(other);
    for attempt in [
        Ledger::open(dir.path()),
        Ledger::open_or_recover(dir.path(), SystemTime::now()),
    ] {
        let err = attempt.unwrap_err();
        assert!(matches!(err, LedgerError::Foreign { .. }), "{err:?}");
    }
    std::fs::remove_file(&file).unwrap();

    drop(Ledger::open(dir.path()).unwrap());
    let conn = Connection::open(&file).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Ledger::open_or_recover(dir.path(), SystemTime::now()).unwrap_err();
    assert!(
        matches!(err, LedgerError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
    assert!(file.exists());
}

#[test]
fn an_unwritable_state_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"").unwrap();
    let err = Ledger::open(&blocker.join("state")).unwrap_err();
    assert!(matches!(err, LedgerError::Dir { .. }), "{err:?}");
    assert!(err.to_string().contains("state_dir"), "{err}");
}

#[test]
fn hand_edited_rows_are_skipped_not_fatal() {
    let mut l = Ledger::in_memory(Epoch(1)).unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
    add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
    l.conn
        .execute("UPDATE events SET ip = 'not an ip' WHERE seq = 1", [])
        .unwrap();
    let mut seen = BTreeSet::new();
    assert_eq!(
        l.for_each(|r| {
            seen.insert(r.seq);
        })
        .unwrap(),
        1
    );
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), [2]);
    assert_eq!(snapshot_seqs(&l, &[], NOW), [2]);
}

/// The work one call does, in SQLite virtual machine steps.
fn steps<T>(l: &mut Ledger, f: impl FnOnce(&mut Ledger) -> T) -> (u64, T) {
    let before = l.vm_steps();
    let out = f(l);
    (l.vm_steps() - before, out)
}

/// With 100,000 rows, what snapshot pages and pruning cost, in SQLite virtual
/// machine steps (a measure of the rows examined that, unlike time, does not
/// depend on the machine). Before version 2 of the schema, one page cost 300,000
/// to 900,000 steps here and a prune 1,800,000, whatever it deleted; now a page
/// costs what its [`SNAPSHOT_SCAN`] rows do, and a prune what it deletes.
#[test]
fn snapshots_and_pruning_do_not_scan_a_large_ledger() {
    const JAILS: [&str; 4] = ["sshd", "nginx", "postfix", "dovecot"];
    let mut l = Ledger::in_memory(Epoch(7)).unwrap();
    let ip = |i: u32| std::net::Ipv4Addr::from(0x0A00_0000 + i).to_string();
    // 80,000 bans, the first 20,000 of which are lifted again: 100,000 rows.
    for i in 0..80_000u32 {
        add(&mut l, JAILS[i as usize % 4], Action::Ban, &ip(i), NOW);
    }
    for i in 0..20_000u32 {
        add(&mut l, JAILS[i as usize % 4], Action::Unban, &ip(i), NOW);
    }
    assert_eq!(l.rows().unwrap(), 100_000);
    let jail = |j: &str| vec![JailName::new(j).unwrap()];
    let last = l.last_seq();

    // A jail with no ban: one index probe, the last page at once.
    let (absent, page) = steps(&mut l, |l| {
        l.snapshot_page(&jail("no-such-jail"), None, NOW, last)
            .unwrap()
    });
    assert!(page.bans.is_empty() && page.next.is_none());
    // The first page of one jail (its first 5,000 bans were lifted) and of all.
    let (one_jail, page) = steps(&mut l, |l| {
        l.snapshot_page(&jail("dovecot"), None, NOW, last).unwrap()
    });
    assert!(page.bans.len() > 10 && page.next.is_some());
    assert_eq!(page.bans[0].seq, 20_004);
    let (all, page) = steps(&mut l, |l| l.snapshot_page(&[], None, NOW, last).unwrap());
    assert!(page.bans.len() > 10 && page.next.is_some());
    // Everything expired (not pruned yet): bounded pages, empty, with a cursor.
    let (expired, page) = steps(&mut l, |l| {
        l.snapshot_page(&[], None, NOW + BAN_MS, last).unwrap()
    });
    assert!(page.bans.is_empty());
    assert!(page.next.is_some_and(|n| n >= SNAPSHOT_SCAN as u64));
    // Every page of a whole snapshot of one jail.
    let (whole, seqs) = steps(&mut l, |l| snapshot_seqs(l, &["postfix"], NOW));
    assert_eq!(seqs.len(), 15_000);

    // Pruning: the 20,000 superseded bans and nothing else, in batches.
    let mut prune_steps = Vec::new();
    loop {
        let (n, p) = steps(&mut l, |l| l.prune(NOW + 1, BAN_MS, PRUNE_BATCH).unwrap());
        prune_steps.push((n, p.deleted));
        if !p.more {
            break;
        }
    }
    assert_eq!(prune_steps.iter().map(|(_, d)| d).sum::<usize>(), 20_000);
    assert_eq!(l.rows().unwrap(), 80_000);
    let (idle_prune, p) = steps(&mut l, |l| l.prune(NOW + 1, BAN_MS, PRUNE_BATCH).unwrap());
    assert_eq!(p.deleted, 0);
    println!(
        "100000 rows; VM steps: snapshot page of an absent jail {absent}, first page of \
         one jail {one_jail}, of all jails {all}, of all expired {expired}, a whole \
         one-jail snapshot {whole}; prune batches (steps, deleted) {prune_steps:?}, \
         a prune with nothing to delete {idle_prune}"
    );
    assert!(absent < 100, "{absent}");
    for (what, n) in [("one jail", one_jail), ("all", all), ("expired", expired)] {
        assert!(n < 40 * SNAPSHOT_SCAN as u64, "{what}: {n}");
    }
    // 15,000 bans over about 250 pages: linear, not quadratic.
    assert!(whole < 200 * 15_000, "{whole}");
    for (n, deleted) in &prune_steps {
        assert!(
            *n < 200 + 50 * *deleted as u64,
            "{n} steps for {deleted} rows"
        );
    }
    assert!(idle_prune < 200, "{idle_prune}");
}

/// A version 1 ledger (no `active_bans`, no `superseded`) is upgraded in place
/// when opened: same rows, same epoch, and snapshots and pruning work as if it had
/// been written by this version.
#[test]
fn a_version_1_ledger_is_upgraded_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(LEDGER_FILE);
    let conn = Connection::open(&file).unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    conn.execute_batch(
        "INSERT INTO meta (key, value) VALUES ('epoch', '00000000000000aa'), \
         ('last_seq', 5), ('created_ms', 1); PRAGMA user_version = 1;",
    )
    .unwrap();
    let row = |seq: i64, id: u128, action: &str, ip: &str, at: u64| {
        let expires = (action == "ban").then_some((at + BAN_MS) as i64);
        conn.execute(
            "INSERT INTO events VALUES (?1, '00000000000000aa', ?2, 'web1', 'sshd', ?3, ?4, \
             1, ?5, ?6, 'native', 'peer', NULL)",
            params![
                seq,
                EventId::from_u128(id).to_string(),
                action,
                ip,
                at as i64,
                expires
            ],
        )
        .unwrap();
    };
    row(1, 1, "ban", "203.0.113.1", NOW); // active
    row(2, 2, "ban", "203.0.113.2", NOW); // superseded by 3
    row(3, 3, "unban", "203.0.113.2", NOW); // recent unban
    row(4, 4, "ban", "203.0.113.4", NOW - BAN_MS); // expired
    row(5, 5, "ban", "203.0.113.5", NOW); // active
    drop(conn);

    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!(
        (l.opened(), l.epoch(), l.last_seq()),
        (Opened::Existing, Epoch(0xaa), 5)
    );
    assert_eq!(rows(&l).len(), 5);
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1, 5]);
    assert_eq!(snapshot_seqs(&l, &["sshd"], NOW), [1, 5]);
    assert_eq!(l.active_bans(NOW).unwrap(), 2);
    let p = l.prune(NOW, BAN_MS, PRUNE_BATCH).unwrap();
    assert_eq!(p.deleted, 2);
    assert_eq!(
        rows(&l).iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 3, 5]
    );
    assert_eq!(add(&mut l, "sshd", Action::Unban, "203.0.113.1", NOW), 6);
    assert_eq!(snapshot_seqs(&l, &[], NOW), [5]);
    drop(l);
    let version: i64 = Connection::open(&file)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // Opened again: nothing to upgrade.
    assert_eq!(Ledger::open(dir.path()).unwrap().last_seq(), 6);
}

/// A version 2 ledger is upgraded in place: its rows are kept, the legacy ones
/// recorded as reported by `legacy`, the others by no credential (nothing was
/// authenticated before version 3); new rows record their credential.
#[test]
fn a_version_2_ledger_is_upgraded_and_records_who_reported() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(LEDGER_FILE);
    let conn = Connection::open(&file).unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    conn.execute_batch(
        "INSERT INTO meta (key, value) VALUES ('epoch', '00000000000000bb'), \
         ('last_seq', 2), ('created_ms', 1); PRAGMA user_version = 2;",
    )
    .unwrap();
    for (seq, origin) in [(1i64, "native"), (2, "legacy")] {
        conn.execute(
            "INSERT INTO events VALUES (?1, '00000000000000bb', ?2, 'web1', 'sshd', 'ban', ?3, \
             1, ?4, ?5, ?6, 'peer', NULL)",
            params![
                seq,
                EventId::from_u128(seq as u128).to_string(),
                format!("203.0.113.{seq}"),
                NOW as i64,
                (NOW + BAN_MS) as i64,
                origin
            ],
        )
        .unwrap();
    }
    // What version 2 added, filled from those rows as a version 2 publisher did.
    conn.execute_batch(SCHEMA_V2).unwrap();
    drop(conn);

    let mut l = Ledger::open(dir.path()).unwrap();
    assert_eq!((l.epoch(), l.last_seq()), (Epoch(0xbb), 2));
    let seq = add(&mut l, "sshd", Action::Ban, "203.0.113.3", NOW);
    l.append(&Record {
        seq: seq + 1,
        event: event(99, "sshd", Action::Ban, "203.0.113.4"),
        accepted_ms: NOW,
        expires_ms: Some(NOW + BAN_MS),
        legacy: false,
        peer: "192.0.2.1".into(),
        reported_by: Reporter::Unauthenticated,
    })
    .unwrap();
    let got: Vec<(u64, bool, Reporter)> = rows(&l)
        .into_iter()
        .map(|r| (r.seq, r.legacy, r.reported_by))
        .collect();
    let web1 = Reporter::Credential(NodeName::new("web1").unwrap());
    assert_eq!(
        got,
        [
            (1, false, Reporter::Unauthenticated),
            (2, true, Reporter::Legacy),
            (3, false, web1),
            (4, false, Reporter::Unauthenticated),
        ]
    );
    assert_eq!(snapshot_seqs(&l, &[], NOW), [1, 2, 3, 4]);
    drop(l);
    // As an operator reads it.
    let conn = Connection::open(&file).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 3);
    let column: Vec<Option<String>> = conn
        .prepare("SELECT reported_by FROM events ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        column,
        [None, Some("legacy".into()), Some("web1".into()), None]
    );
}

/// A failed commit of a batch that was broadcast keeps its numbers, and writes
/// the last of them on its own: a restart, after a clean stop or not, never
/// uses them again for other events.
#[test]
fn a_failed_commits_numbers_are_not_used_again_after_a_restart() {
    for clean in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Ledger::open(dir.path()).unwrap();
        l.start_serving().unwrap();
        add(&mut l, "sshd", Action::Ban, "203.0.113.1", NOW);
        l.begin_batch().unwrap();
        add(&mut l, "sshd", Action::Ban, "203.0.113.2", NOW);
        add(&mut l, "sshd", Action::Ban, "203.0.113.3", NOW);
        l.fail_next_commit();
        assert!(l.commit_batch(true).is_err());
        assert_eq!(l.last_seq(), 3, "the broadcast numbers are kept");
        assert_eq!(meta_last_seq(dir.path()), 3, "and written");
        assert!(l.may_broadcast_early());
        if clean {
            l.stop_serving().unwrap();
        }
        drop(l);
        let mut l = Ledger::open(dir.path()).unwrap();
        let skipped = l.start_serving().unwrap();
        assert_eq!(skipped, if clean { 0 } else { EARLY_BROADCAST_MAX });
        assert_eq!(
            add(&mut l, "sshd", Action::Ban, "203.0.113.4", NOW),
            4 + skipped,
            "clean stop: {clean}"
        );
    }
}

/// While the numbers of failed commits cannot be written, batches may be
/// broadcast early only as long as the next start's skip covers every number
/// used since the file's last one; a clean stop writes the number with its
/// mark.
#[test]
fn early_broadcasts_stop_when_the_file_lags_too_far_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Ledger::open(dir.path()).unwrap();
    l.start_serving().unwrap();
    l.fail_last_seq_writes(true);
    let mut n = 0u32;
    while l.may_broadcast_early() {
        l.begin_batch().unwrap();
        for _ in 0..64 {
            n += 1;
            let ip = format!("10.0.{}.{}", n / 256, n % 256);
            add(&mut l, "sshd", Action::Ban, &ip, NOW);
        }
        l.fail_next_commit();
        assert!(l.commit_batch(true).is_err());
        assert!(l.last_seq() <= EARLY_BROADCAST_MAX + 64);
    }
    assert_eq!(meta_last_seq(dir.path()), 0, "nothing could be written");
    assert!(l.last_seq() > EARLY_BROADCAST_MAX);
    // A crash now: the next start's skip would not cover these numbers, which
    // is why no batch goes out before its commit any more. A commit that
    // works brings the file level again.
    l.fail_last_seq_writes(false);
    l.begin_batch().unwrap();
    let seq = add(&mut l, "sshd", Action::Ban, "203.0.113.9", NOW);
    l.commit_batch(false).unwrap();
    assert_eq!(meta_last_seq(dir.path()), seq as i64);
    assert!(l.may_broadcast_early());
    // A clean stop writes the number with the mark.
    l.fail_last_seq_writes(true);
    l.begin_batch().unwrap();
    add(&mut l, "sshd", Action::Ban, "203.0.113.10", NOW);
    l.fail_next_commit();
    assert!(l.commit_batch(true).is_err());
    l.stop_serving().unwrap();
    assert_eq!(meta_last_seq(dir.path()), seq as i64 + 1);
}
