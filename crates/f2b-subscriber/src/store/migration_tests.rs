//! A state written before the indexes of `events` were partial (the same schema
//! version, full indexes), or before the index of held ban ids was dropped, opened
//! by this one.

use super::*;

/// The schema as those subscribers created it (version 1, full indexes).
const SCHEMA_V1: &str = "
CREATE TABLE events (
    id TEXT PRIMARY KEY NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    local_jail TEXT NOT NULL,
    node TEXT NOT NULL,
    jail TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('ban', 'unban')),
    ip TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    epoch TEXT,
    expires_ms INTEGER,
    received_ms INTEGER NOT NULL,
    done_ms INTEGER
);
CREATE INDEX events_pending ON events (state, local_jail, ip);
CREATE INDEX events_done ON events (state, done_ms);
CREATE TABLE held (
    jail TEXT NOT NULL,
    ip TEXT NOT NULL,
    local_jail TEXT NOT NULL,
    id TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires_ms INTEGER,
    applied_ms INTEGER NOT NULL,
    PRIMARY KEY (jail, ip)
) WITHOUT ROWID;
CREATE INDEX held_by_id ON held (id);
CREATE INDEX held_by_epoch ON held (epoch);
";

const NOW: u64 = 1_763_702_100_000;
const EPOCH: u64 = 1_763_000_000;

fn id(n: u128) -> EventId {
    EventId::from_u128(0x5ca1_ab1e_0000_0000_0000_0000_0000_0000 + n)
}

fn item(n: u128, action: Action, ip: &str) -> Item {
    Item {
        jail: JailName::new("cluster").unwrap(),
        event: Event::new(
            id(n),
            NodeName::new("web2").unwrap(),
            JailName::new("sshd").unwrap(),
            action,
            ip.parse().unwrap(),
            1_763_702_000_000 + n as u64,
        )
        .unwrap(),
        seq: n as u64,
        epoch: Some(Epoch(EPOCH)),
        expires_ms: None,
    }
}

/// An `events` row as version 1 wrote it.
fn v1_event(c: &Connection, n: u128, state: &str, action: Action, ip: &str) {
    c.execute(
        "INSERT INTO events (id, state, local_jail, node, jail, action, ip, time_ms, seq, \
         epoch, expires_ms, received_ms, done_ms) \
         VALUES (?1, ?2, 'cluster', 'web2', 'sshd', ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9)",
        params![
            id(n).to_string(),
            state,
            action.as_str(),
            ip,
            1_763_702_000_000 + n as i64,
            n as i64,
            Epoch(EPOCH).to_string(),
            sql_int(NOW - 1_000),
            (state == "done").then_some(sql_int(NOW - 500 + n as u64)),
        ],
    )
    .unwrap();
}

/// A `held` row as version 1 wrote it.
fn v1_held(c: &Connection, n: u128, ip: &str) {
    c.execute(
        "INSERT INTO held (jail, ip, local_jail, id, node, epoch, seq, expires_ms, applied_ms) \
         VALUES ('sshd', ?1, 'cluster', ?2, 'web2', ?3, ?4, NULL, ?5)",
        params![
            ip,
            id(n).to_string(),
            Epoch(EPOCH).to_string(),
            n as i64,
            sql_int(NOW - 400)
        ],
    )
    .unwrap();
}

fn has_index(c: &Connection, name: &str) -> bool {
    c.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?1)",
        [name],
        |r| r.get(0),
    )
    .unwrap()
}

fn index_sql(c: &Connection, name: &str) -> String {
    c.query_row(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
        [name],
        |r| r.get(0),
    )
    .unwrap()
}

/// Writes a version 1 state in `dir`: done events 1 (held) and 2 (an unban, done),
/// a held ban of event 3 whose done row was pruned already, and pending events 4
/// and 5 (203.0.113.4, 5 replacing 4 in the queue) and 6 (203.0.113.6). With
/// `crashed`, the last commits are in the WAL only (the writer never closed).
fn write_v1(dir: &Path, crashed: bool) {
    let c = Connection::open(dir.join(STATE_FILE)).unwrap();
    let _: String = c
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .unwrap();
    c.execute_batch(&format!(
        "BEGIN; {SCHEMA_V1} PRAGMA user_version = 1; COMMIT;"
    ))
    .unwrap();
    if crashed {
        c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    }
    v1_event(&c, 1, "done", Action::Ban, "203.0.113.1");
    v1_held(&c, 1, "203.0.113.1");
    v1_event(&c, 2, "done", Action::Unban, "203.0.113.2");
    v1_held(&c, 3, "203.0.113.3");
    v1_event(&c, 4, "pending", Action::Ban, "203.0.113.4");
    v1_event(&c, 5, "pending", Action::Ban, "203.0.113.4");
    v1_event(&c, 6, "pending", Action::Ban, "203.0.113.6");
    if crashed {
        // Neither checkpointed nor closed: what a killed subscriber leaves.
        std::mem::forget(c);
    }
}

fn migrates_keeping_every_row(crashed: bool) {
    let tmp = tempfile::tempdir().unwrap();
    write_v1(tmp.path(), crashed);
    let wal = tmp.path().join(format!("{STATE_FILE}-wal"));
    assert_eq!(
        std::fs::metadata(&wal)
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        crashed,
        "the rows are in the WAL only after a crash"
    );

    let mut s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    let version: i64 = s
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    assert!(index_sql(&s.conn, "events_pending").contains("WHERE state = 'pending'"));
    assert!(index_sql(&s.conn, "events_done").contains("WHERE state = 'done'"));
    assert!(!has_index(&s.conn, "held_by_id"));
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending: 3,
            done: 2,
            held: 2
        }
    );
    // Pending events are queued again, in order and whole.
    let pending = s.pending().unwrap();
    assert_eq!(
        pending,
        vec![
            item(4, Action::Ban, "203.0.113.4"),
            item(5, Action::Ban, "203.0.113.4"),
            item(6, Action::Ban, "203.0.113.6"),
        ]
    );
    // Done events and held bans still make a received event a duplicate.
    assert!(s.known(&item(1, Action::Ban, "203.0.113.1").event).unwrap());
    assert!(s
        .known(&item(2, Action::Unban, "203.0.113.2").event)
        .unwrap());
    assert!(s.known(&item(3, Action::Ban, "203.0.113.3").event).unwrap());
    assert!(s.known(&item(4, Action::Ban, "203.0.113.4").event).unwrap());
    assert!(!s.known(&item(7, Action::Ban, "203.0.113.7").event).unwrap());
    assert_eq!(
        s.known_all(&[
            &item(2, Action::Unban, "203.0.113.2").event,
            &item(7, Action::Ban, "203.0.113.7").event,
            &item(6, Action::Ban, "203.0.113.6").event
        ])
        .unwrap(),
        vec![true, false, true]
    );
    // Held bans are still held.
    let mut held = s.held(Epoch(EPOCH)).unwrap();
    held.sort_by_key(|h| h.seq);
    assert_eq!(
        held.iter().map(|h| (h.id, h.ip)).collect::<Vec<_>>(),
        vec![
            (id(1), "203.0.113.1".parse().unwrap()),
            (id(3), "203.0.113.3".parse().unwrap())
        ]
    );
    let cluster = JailName::new("cluster").unwrap();
    assert_eq!(
        s.held_locally(&cluster, "203.0.113.3".parse().unwrap())
            .unwrap(),
        1
    );

    // Settling 5 (which replaced 4 in the queue) settles both and holds the ban.
    s.settle(&[pending[1].clone()], true, NOW).unwrap();
    assert_eq!(s.pending().unwrap(), vec![pending[2].clone()]);
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending: 1,
            done: 4,
            held: 3
        }
    );
    // A dropped pending event is forgotten.
    s.forget_dropped(&[pending[2].clone()]).unwrap();
    assert!(!s.known(&pending[2].event).unwrap());
    // Pruning sees the old done rows through the new index: within the retention,
    // all stay; a day later, all go, the bans stay held.
    assert_eq!(s.prune(NOW).unwrap(), 0);
    assert_eq!(s.prune(NOW + ms(DONE_RETENTION) + 1_000).unwrap(), 4);
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending: 0,
            done: 0,
            held: 3
        }
    );
    // Held, its done row pruned: known by the held ban alone.
    assert!(s.known(&item(1, Action::Ban, "203.0.113.1").event).unwrap());
    drop(s);

    // Opened again: as it is (nothing rebuilt), nothing lost, nothing moved away.
    let s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    assert!(!ensure_indexes(&s.conn).unwrap());
    assert!(!drop_unused_indexes(&s.conn).unwrap());
    assert_eq!(s.counts().unwrap().held, 3);
    let moved: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("corrupt"))
        .collect();
    assert!(moved.is_empty(), "{moved:?}");
}

#[test]
fn a_state_with_full_indexes_gets_the_partial_ones_keeping_every_row() {
    migrates_keeping_every_row(false);
}

#[test]
fn a_state_with_full_indexes_left_by_a_crash_gets_the_partial_ones_keeping_every_row() {
    migrates_keeping_every_row(true);
}

#[test]
fn a_new_state_has_the_partial_indexes_and_needs_no_rebuild() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    assert!(!ensure_indexes(&s.conn).unwrap());
    assert!(!drop_unused_indexes(&s.conn).unwrap());
    assert!(!has_index(&s.conn, "held_by_id"));
    for (name, create) in EVENT_INDEXES {
        assert_eq!(index_sql(&s.conn, name), create);
    }
}

/// An index dropped by hand (or lost to a partial restore) is rebuilt at open:
/// without it, reading the pending events (`INDEXED BY events_pending`) would
/// fail and they would not be queued again.
#[test]
fn a_missing_index_is_rebuilt_and_pending_events_still_come_back() {
    let tmp = tempfile::tempdir().unwrap();
    write_v1(tmp.path(), false);
    drop(Store::open(tmp.path(), SystemTime::now()).unwrap());
    {
        let c = Connection::open(tmp.path().join(STATE_FILE)).unwrap();
        c.execute_batch("DROP INDEX events_pending; DROP INDEX events_done;")
            .unwrap();
    }
    let mut s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    for (name, create) in EVENT_INDEXES {
        assert_eq!(index_sql(&s.conn, name), create);
    }
    assert_eq!(s.pending().unwrap().len(), 3);
}

/// What the subscriber before this one wrote (partial indexes of `events`, and an
/// index of the held bans' ids): the index is dropped at open, every row kept, and
/// an older subscriber's lookup of held ids still answers the same without it.
#[test]
fn a_state_with_the_index_of_held_ids_loses_it_keeping_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let c = Connection::open(tmp.path().join(STATE_FILE)).unwrap();
        let _: String = c
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .unwrap();
        c.execute_batch(&format!(
            "BEGIN; {SCHEMA} CREATE INDEX held_by_id ON held (id); \
             PRAGMA user_version = 1; COMMIT;"
        ))
        .unwrap();
        v1_event(&c, 1, "done", Action::Ban, "203.0.113.1");
        v1_held(&c, 1, "203.0.113.1");
        v1_held(&c, 3, "203.0.113.3");
        v1_event(&c, 4, "pending", Action::Ban, "203.0.113.4");
    }
    let mut s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    assert!(!has_index(&s.conn, "held_by_id"));
    assert!(has_index(&s.conn, "held_by_epoch"));
    assert!(!ensure_indexes(&s.conn).unwrap());
    assert_eq!(
        s.counts().unwrap(),
        Counts {
            pending: 1,
            done: 1,
            held: 2
        }
    );
    assert_eq!(
        s.pending().unwrap(),
        vec![item(4, Action::Ban, "203.0.113.4")]
    );
    assert_eq!(s.held(Epoch(EPOCH)).unwrap().len(), 2);
    let events = [
        item(1, Action::Ban, "203.0.113.1").event,
        item(3, Action::Ban, "203.0.113.3").event,
        item(4, Action::Ban, "203.0.113.4").event,
        item(7, Action::Ban, "203.0.113.7").event,
        // Event 3's id with another address: not that held ban.
        item(3, Action::Ban, "203.0.113.8").event,
    ];
    let all: Vec<&Event> = events.iter().collect();
    assert_eq!(
        s.known_all(&all).unwrap(),
        vec![true, true, true, false, false]
    );
    // The lookup of the subscribers that had the index, without it: the same
    // answers for the same ids.
    let old_known = |n: u128| -> bool {
        s.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM events WHERE id = ?1) \
                 OR EXISTS (SELECT 1 FROM held WHERE id = ?1)",
                [id(n).to_string()],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!([1, 3, 4, 7].map(old_known), [true, true, true, false]);
    drop(s);
    let s = Store::open(tmp.path(), SystemTime::now()).unwrap();
    assert!(!drop_unused_indexes(&s.conn).unwrap());
    assert_eq!(s.counts().unwrap().held, 2);
}
