//! The subscriber's durable state, a SQLite file in `[subscriber] state_dir`
//! (`subscriber.sqlite3`), so that a restart neither applies an event twice nor
//! loses one that was received and not applied yet.
//!
//! # What is kept
//!
//! - `events`: every event accepted for application (past the filter), by id, with
//!   its state: `pending` (queued, not applied yet) or `done` (applied, skipped by
//!   the executor, or replaced by a later event of the same local jail, event jail and
//!   address). Pending rows are queued again at start; done rows make a
//!   re-received event (the same broadcast again, or the same ban listed in a
//!   snapshot) a duplicate.
//! - `held`: the bans applied from the cluster and not unbanned since, per (jail
//!   of the event, address): event id, node, epoch, sequence number, local jail,
//!   and the cluster's expiry when a snapshot told it. After a complete snapshot, a
//!   held ban of the snapshot's epoch that it does not list is unbanned.
//!
//! # Schema versions
//!
//! The file's schema version is its `PRAGMA user_version` ([`SCHEMA_VERSION`]). The
//! two indexes of `events` are partial ones, each over the rows of one state (a
//! settled event leaves one index and enters the other). Files written before
//! that have the same tables and version with full indexes; at open, an index
//! that is not the partial one (or is missing) is rebuilt, in one transaction, the
//! rows untouched. An older subscriber reads such a file as it is (its queries
//! name the state, so the partial indexes serve them), so going back to an older
//! version keeps the state. Files written before also have an index of the held
//! bans' ids (`held_by_id`) that no query needs any more (a held ban is looked up
//! by its event's jail and address): at open, it is dropped, the rows untouched;
//! an older subscriber reads the file without it (its lookup of a held id scans
//! the held bans instead). A version this subscriber does not know (a newer one)
//! is an unusable file (see below).
//!
//! # Durability
//!
//! The file is in WAL mode with `synchronous = NORMAL`: a crash of the subscriber
//! loses nothing committed; a crash of the machine may lose the last commits. An
//! event is marked done after its action succeeded, so a crash between the two
//! applies it again after the restart (at least once). The executor's records of
//! applied events wait up to [`SETTLE_DELAY`] and are written together (see
//! `State`), so that window is that long. `fail2ban-client set JAIL banip` and
//! `unbanip` are idempotent, so that repeats nothing visible.
//!
//! # Bounds
//!
//! Done rows are kept [`DONE_RETENTION`] and at most [`KEEP_DONE`] of them; held
//! bans until their expiry (or [`HELD_UNKNOWN_RETENTION`] after they were applied
//! when no snapshot ever told it), at most [`MAX_HELD`].
//!
//! # Damage
//!
//! A file that is not a sound SQLite database of this schema is moved away to
//! `subscriber.sqlite3.corrupt-<unix time>` and a new, empty state is started,
//! with an error in the log: the subscriber never refuses to start (or crashes in
//! a loop) over its own state. A missing file is a new state (with a warning). The
//! directory is created with mode 0700 and locked (`flock` on `subscriber.lock`),
//! so two subscribers never share it.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use f2b_proto::{Action, Epoch, Event, EventId, JailName, NodeName};
use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use f2b_common::log_batch::HeldLines;

use crate::filter::DEDUP_CAPACITY;
use crate::pending::Item;
use crate::ratelimit::RateLimit;

/// The state file's name in `state_dir`.
pub const STATE_FILE: &str = "subscriber.sqlite3";
/// The lock file's name in `state_dir`.
pub const LOCK_FILE: &str = "subscriber.lock";
/// The schema this subscriber writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;
/// Settled event ids kept for duplicate detection, at most.
pub const KEEP_DONE: usize = DEDUP_CAPACITY;
/// How long a settled event id is kept (if [`KEEP_DONE`] allows).
pub const DONE_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// Held bans remembered, at most (the oldest applied are forgotten first).
pub const MAX_HELD: usize = 1_000_000;
/// A held ban whose expiry no snapshot told is forgotten this long after it was
/// applied.
pub const HELD_UNKNOWN_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);

const BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether an event (id `?1`, jail `?2`, address `?3`) was accepted before or is a
/// held ban. A held ban is the row of its event's jail and address, so its primary
/// key finds it (no index of held ids is needed).
const KNOWN: &str = "SELECT EXISTS (SELECT 1 FROM events WHERE id = ?1) \
                     OR EXISTS (SELECT 1 FROM held WHERE jail = ?2 AND ip = ?3 AND id = ?1)";

const SCHEMA: &str = "
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
CREATE INDEX events_pending ON events (local_jail, ip) WHERE state = 'pending';
CREATE INDEX events_done ON events (done_ms) WHERE state = 'done';
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
CREATE INDEX held_by_epoch ON held (epoch);
";

/// Indexes that files written before had and that no query of this subscriber
/// needs (each one more page written per settled ban); [`drop_unused_indexes`]
/// drops them at open. `held_by_id` served the held ban lookup of [`KNOWN`], which
/// now goes by the primary key.
const UNUSED_INDEXES: [&str; 1] = ["held_by_id"];

/// Drops, in one transaction, each index of [`UNUSED_INDEXES`] that the file has;
/// the rows are untouched. Returns whether it dropped any.
fn drop_unused_indexes(conn: &Connection) -> rusqlite::Result<bool> {
    let mut batch = String::new();
    for name in UNUSED_INDEXES {
        let found: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if found {
            batch.push_str(&format!(" DROP INDEX IF EXISTS {name};"));
        }
    }
    if batch.is_empty() {
        return Ok(false);
    }
    conn.execute_batch(&format!("BEGIN;{batch} COMMIT;"))?;
    Ok(true)
}

/// The partial indexes of `events` (name, definition), as [`SCHEMA`] creates them.
/// Files written before they were partial have full indexes of these names;
/// [`ensure_indexes`] rebuilds those at open.
const EVENT_INDEXES: [(&str, &str); 2] = [
    (
        "events_pending",
        "CREATE INDEX events_pending ON events (local_jail, ip) WHERE state = 'pending'",
    ),
    (
        "events_done",
        "CREATE INDEX events_done ON events (done_ms) WHERE state = 'done'",
    ),
];

/// Rebuilds, in one transaction, each index of [`EVENT_INDEXES`] that is missing
/// or not the partial one (a file written before they were partial, or an index
/// dropped by hand); the rows are untouched. Returns whether it rebuilt any.
fn ensure_indexes(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stale = Vec::new();
    for (name, create) in EVENT_INDEXES {
        let sql: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        if sql.as_deref() != Some(create) {
            stale.push((name, create));
        }
    }
    if stale.is_empty() {
        return Ok(false);
    }
    let mut batch = String::from("BEGIN;");
    for (name, create) in stale {
        batch.push_str(&format!(" DROP INDEX IF EXISTS {name}; {create};"));
    }
    batch.push_str(" COMMIT;");
    conn.execute_batch(&batch)?;
    Ok(true)
}

/// Why the state cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot create the state directory {path} (set [subscriber] state_dir to a writable directory)")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the lock file {path}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is locked: another f2b-subscriber uses this state_dir (give each subscriber its own)")]
    Locked { path: PathBuf },
    #[error("cannot open the state {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the state {path} is unusable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot move the unusable state {path} away to {to}")]
    Quarantine {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path}: cannot {what}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// A ban applied from the cluster and not unbanned since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The event's jail (what snapshots are filtered by).
    pub jail: JailName,
    pub ip: IpAddr,
    /// The local jail it was applied in.
    pub local_jail: JailName,
    pub id: EventId,
    pub node: NodeName,
    pub epoch: Epoch,
    pub seq: u64,
    /// The cluster's expiry, once a snapshot told it.
    pub expires_ms: Option<u64>,
    pub applied_ms: u64,
}

/// A held ban applied in a local jail other than its event's jail: (local jail,
/// event jail, address, when it is forgotten in ms since the Unix epoch).
pub type HeldElsewhere = (JailName, JailName, IpAddr, u64);

/// Counts of what the state holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub done: u64,
    pub held: u64,
}

/// The open state: the SQLite connection and the directory's lock.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    _lock: Flock<File>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A savepoint begun and released through cached statements: rusqlite's
/// `Connection::savepoint` parses its two statements at each use. Dropped without
/// [`Savepoint::commit`], it is rolled back.
struct Savepoint<'c> {
    conn: &'c Connection,
    released: bool,
}

impl<'c> Savepoint<'c> {
    fn new(conn: &'c Connection) -> rusqlite::Result<Savepoint<'c>> {
        conn.prepare_cached("SAVEPOINT store")?.execute([])?;
        Ok(Savepoint {
            conn,
            released: false,
        })
    }

    fn commit(mut self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("RELEASE store")?.execute([])?;
        self.released = true;
        Ok(())
    }
}

impl std::ops::Deref for Savepoint<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if !self.released {
            let _ = self.conn.execute_batch("ROLLBACK TO store; RELEASE store");
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The current time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store {
    /// Creates `dir` (mode 0700) if needed, locks it, and opens the state in it,
    /// creating a new one if there is none and moving an unusable one away (see
    /// the module documentation). Fails when the directory cannot be created or
    /// locked, or the file cannot be opened at all (permissions).
    pub fn open(dir: &Path, now: SystemTime) -> Result<Store, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        let lock_path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| StoreError::LockFile {
                path: lock_path.clone(),
                source,
            })?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked { path: lock_path })?;
        let path = dir.join(STATE_FILE);
        match Store::open_file(&path) {
            Ok((conn, created)) => {
                if created {
                    tracing::warn!(
                        path = %path.display(),
                        "new subscriber state: no previous state (first start, or it was \
                         deleted); events applied before are not known"
                    );
                }
                Ok(Store {
                    conn,
                    path,
                    _lock: lock,
                })
            }
            Err(StoreError::Corrupt { path, detail }) => {
                let moved = quarantine(&path, now)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved.display(),
                    detail = detail.as_str(),
                    "subscriber state unusable: moved it away and started a new, empty one; \
                     what it held (applied events, pending events) is forgotten"
                );
                let (conn, _) = Store::open_file(&path)?;
                Ok(Store {
                    conn,
                    path,
                    _lock: lock,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Opens (or creates) the file; returns whether it was created.
    fn open_file(path: &Path) -> Result<(Connection, bool), StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        check_header(path)?;
        // A new state is created private (SQLite gives its -wal and -shm files the
        // same mode); if it exists, or cannot be created, SQLite's open says so.
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.to_owned(),
            detail,
        };
        let sql = |what: &'static str| {
            move |source: rusqlite::Error| {
                if is_corruption(&source) {
                    StoreError::Corrupt {
                        path: path.to_owned(),
                        detail: source.to_string(),
                    }
                } else {
                    StoreError::Sql {
                        path: path.to_owned(),
                        what,
                        source,
                    }
                }
            }
        };
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("set the busy timeout"))?;
        let _: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql("switch to WAL mode"))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("set synchronous"))?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(sql("check the file"))?;
        if check != "ok" {
            return Err(corrupt(format!("quick_check: {check}")));
        }
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("read the schema version"))?;
        match version {
            0 => {
                let objects: i64 = conn
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(sql("read the schema"))?;
                if objects != 0 {
                    return Err(corrupt(
                        "a SQLite database, but not a subscriber state".into(),
                    ));
                }
                conn.execute_batch(&format!(
                    "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sql("create the schema"))?;
                Ok((conn, true))
            }
            SCHEMA_VERSION => {
                if ensure_indexes(&conn).map_err(sql("rebuild the indexes of events"))? {
                    tracing::info!(
                        path = %path.display(),
                        "subscriber state: the indexes of its events rebuilt (partial, one per state)"
                    );
                }
                if drop_unused_indexes(&conn).map_err(sql("drop the unused indexes"))? {
                    tracing::info!(
                        path = %path.display(),
                        "subscriber state: its index of held ban ids dropped (no longer used)"
                    );
                }
                Ok((conn, false))
            }
            v => Err(corrupt(format!(
                "schema version {v}, this subscriber reads {SCHEMA_VERSION}"
            ))),
        }
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sql {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pending events, oldest first. Rows that are not valid events (edited by
    /// hand) are deleted with a warning.
    pub fn pending(&mut self) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut bad = Vec::new();
        {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT id, local_jail, node, jail, action, ip, time_ms, seq, epoch, \
                     expires_ms FROM events INDEXED BY events_pending WHERE state = 'pending' \
                     ORDER BY rowid",
                )
                .map_err(self.sql("read the pending events"))?;
            let mut rows = stmt
                .query([])
                .map_err(self.sql("read the pending events"))?;
            while let Some(row) = rows.next().map_err(self.sql("read the pending events"))? {
                let id: String = row.get(0).map_err(self.sql("read a pending event"))?;
                match pending_row(row) {
                    Ok(item) => items.push(item),
                    Err(why) => {
                        tracing::warn!(path = %self.path.display(), id, why, "pending event in the state is invalid, dropped");
                        bad.push(id);
                    }
                }
            }
        }
        for id in bad {
            self.conn
                .execute("DELETE FROM events WHERE id = ?1", [id])
                .map_err(self.sql("drop an invalid row"))?;
        }
        Ok(items)
    }

    /// Whether the event was accepted before (its id pending or settled) or is a
    /// held ban.
    pub fn known(&self, event: &Event) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached(KNOWN)
            .and_then(|mut st| st.query_row(known_params(event), |r| r.get(0)))
            .map_err(self.sql("look an event up"))
    }

    /// [`Store::known`] of each of `events`, in one transaction.
    pub fn known_all(&mut self, events: &[&Event]) -> Result<Vec<bool>, StoreError> {
        let path = &self.path;
        let sql = move |source| StoreError::Sql {
            path: path.clone(),
            what: "look events up",
            source,
        };
        let tx = Savepoint::new(&self.conn).map_err(&sql)?;
        let mut out = Vec::with_capacity(events.len());
        {
            let mut stmt = tx.prepare_cached(KNOWN).map_err(&sql)?;
            for event in events {
                out.push(
                    stmt.query_row(known_params(event), |r| r.get(0))
                        .map_err(&sql)?,
                );
            }
        }
        tx.commit().map_err(&sql)?;
        Ok(out)
    }

    /// Records an event accepted for application, not applied yet.
    pub fn add_pending(&self, item: &Item, now_ms: u64) -> Result<(), StoreError> {
        insert(&self.conn, item, "pending", now_ms)
            .map(drop)
            .map_err(self.sql("record a pending event"))
    }

    /// [`Store::add_pending`] of each of `items`, in one transaction.
    pub fn add_pending_all(&mut self, items: &[Item], now_ms: u64) -> Result<(), StoreError> {
        let path = &self.path;
        let sql = move |source| StoreError::Sql {
            path: path.clone(),
            what: "record pending events",
            source,
        };
        let tx = Savepoint::new(&self.conn).map_err(&sql)?;
        for item in items {
            insert(&tx, item, "pending", now_ms).map_err(&sql)?;
        }
        tx.commit().map_err(&sql)
    }

    /// Records that `items` are settled: applied (`applied`: the held bans are
    /// updated), or given up (skipped). Pending rows of the same local jail, event
    /// jail and address recorded before each item are settled too (the queue
    /// replaced them with it).
    pub fn settle(&mut self, items: &[Item], applied: bool, now_ms: u64) -> Result<(), StoreError> {
        let path = &self.path;
        let sql = |what: &'static str| {
            move |source| StoreError::Sql {
                path: path.clone(),
                what,
                source,
            }
        };
        let tx = Savepoint::new(&self.conn).map_err(sql("begin"))?;
        for item in items {
            let e = &item.event;
            let row = Row::of(item);
            // Recorded done if it has no row yet; a row it has (pending, or done
            // already) is left as it is here.
            insert_row(&tx, item, &row, "done", now_ms).map_err(sql("record an event"))?;
            // Then its pending row (if any) and the earlier pending ones of its key,
            // which the queue replaced with it, are settled. Found first and settled
            // by rowid: an UPDATE that finds its rows through `events_pending`, the
            // index it changes, collects them in a temporary table first (on the
            // lone path, twice per event, for no row at all).
            let replaced: Vec<i64> = tx
                .prepare_cached(
                    "SELECT rowid FROM events WHERE state = 'pending' AND local_jail = ?2 \
                     AND ip = ?3 AND jail = ?4 \
                     AND rowid <= (SELECT rowid FROM events WHERE id = ?1)",
                )
                .and_then(|mut st| {
                    st.query_map(
                        params![row.id, item.jail.as_str(), row.ip, e.jail.as_str()],
                        |r| r.get(0),
                    )?
                    .collect()
                })
                .map_err(sql("settle an event"))?;
            for rowid in replaced {
                tx.prepare_cached(
                    "UPDATE events SET state = 'done', done_ms = ?2 WHERE rowid = ?1",
                )
                .and_then(|mut st| st.execute(params![rowid, sql_int(now_ms)]))
                .map_err(sql("settle an event"))?;
            }
            if !applied {
                continue;
            }
            match (e.action, row.epoch.as_deref()) {
                (Action::Ban, Some(epoch)) => {
                    tx.prepare_cached(
                        "INSERT INTO held (jail, ip, local_jail, id, node, epoch, seq, \
                         expires_ms, applied_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                         ON CONFLICT (jail, ip) DO UPDATE SET local_jail = excluded.local_jail, \
                         id = excluded.id, node = excluded.node, epoch = excluded.epoch, \
                         seq = excluded.seq, expires_ms = excluded.expires_ms, \
                         applied_ms = excluded.applied_ms",
                    )
                    .and_then(|mut st| {
                        st.execute(params![
                            e.jail.as_str(),
                            row.ip,
                            item.jail.as_str(),
                            row.id,
                            e.node.as_str(),
                            epoch,
                            sql_int(item.seq),
                            item.expires_ms.map(sql_int),
                            sql_int(now_ms),
                        ])
                    })
                    .map_err(sql("record a held ban"))?;
                }
                (Action::Ban, None) => {}
                (Action::Unban, _) => {
                    tx.prepare_cached("DELETE FROM held WHERE jail = ?1 AND ip = ?2")
                        .and_then(|mut st| st.execute(params![e.jail.as_str(), row.ip]))
                        .map_err(sql("forget a held ban"))?;
                }
            }
        }
        tx.commit().map_err(sql("commit"))
    }

    /// Forgets `items`, dropped from the queue unapplied (queue_size), and the
    /// pending rows of the same local jail, event jail and address recorded before
    /// each (the queue had replaced them with it): their ids are not known, so the
    /// same ban listed by a later snapshot or broadcast again is applied.
    pub fn forget_dropped(&mut self, items: &[Item]) -> Result<(), StoreError> {
        let path = &self.path;
        let sql = move |source| StoreError::Sql {
            path: path.clone(),
            what: "forget dropped events",
            source,
        };
        let tx = Savepoint::new(&self.conn).map_err(&sql)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "DELETE FROM events WHERE state = 'pending' AND local_jail = ?2 \
                     AND jail = ?3 AND ip = ?4 \
                     AND rowid <= (SELECT rowid FROM events WHERE id = ?1)",
                )
                .map_err(&sql)?;
            for item in items {
                let e = &item.event;
                stmt.execute(params![
                    e.id.to_string(),
                    item.jail.as_str(),
                    e.jail.as_str(),
                    e.ip.to_string()
                ])
                .map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)
    }

    /// The held bans applied from `epoch`.
    pub fn held(&self, epoch: Epoch) -> Result<Vec<Held>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT jail, ip, local_jail, id, node, seq, expires_ms, applied_ms \
                 FROM held WHERE epoch = ?1",
            )
            .map_err(self.sql("read the held bans"))?;
        let mut rows = stmt
            .query([epoch.to_string()])
            .map_err(self.sql("read the held bans"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql("read the held bans"))? {
            match held_row(row, epoch) {
                Ok(h) => out.push(h),
                Err(why) => {
                    tracing::warn!(path = %self.path.display(), why, "held ban in the state is invalid, ignored");
                }
            }
        }
        Ok(out)
    }

    /// The held bans applied in a local jail other than their event's jail
    /// (`ban_jail`): (local jail, event jail, address, when it is forgotten: its
    /// expiry, or [`HELD_UNKNOWN_RETENTION`] after it was applied).
    pub fn held_in_other_jails(&self) -> Result<Vec<HeldElsewhere>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT local_jail, jail, ip, COALESCE(expires_ms, applied_ms + ?1) \
                 FROM held WHERE local_jail != jail",
            )
            .map_err(self.sql("read the held bans"))?;
        let mut rows = stmt
            .query([sql_int(ms(HELD_UNKNOWN_RETENTION))])
            .map_err(self.sql("read the held bans"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(self.sql("read the held bans"))? {
            let (Ok(local), Ok(jail), Ok(ip), Ok(until)) = (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, i64>(3),
            ) else {
                continue;
            };
            if let (Ok(local), Ok(jail), Ok(ip)) = (
                JailName::new(&local),
                JailName::new(&jail),
                f2b_proto::event::parse_ip(&ip),
            ) {
                out.push((local, jail, ip, from_sql(until)));
            }
        }
        Ok(out)
    }

    /// How many held bans are applied in `local_jail` for `ip`.
    pub fn held_locally(&self, local_jail: &JailName, ip: IpAddr) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM held WHERE local_jail = ?1 AND ip = ?2",
                params![local_jail.as_str(), ip.to_string()],
                |r| r.get(0),
            )
            .map_err(self.sql("count the held bans"))?;
        Ok(from_sql(n))
    }

    /// Sets the expiry of the held ban `id` of (`jail`, `ip`), as a snapshot told it.
    pub fn learn_expiry(
        &self,
        jail: &JailName,
        ip: IpAddr,
        id: EventId,
        expires_ms: u64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE held SET expires_ms = ?4 WHERE jail = ?1 AND ip = ?2 AND id = ?3",
                params![
                    jail.as_str(),
                    ip.to_string(),
                    id.to_string(),
                    sql_int(expires_ms)
                ],
            )
            .map_err(self.sql("record an expiry"))?;
        Ok(())
    }

    /// [`Store::learn_expiry`] of each listed ban, in one transaction.
    pub fn learn_expiries(
        &mut self,
        bans: &[(&JailName, IpAddr, EventId, u64)],
    ) -> Result<(), StoreError> {
        let path = &self.path;
        let sql = move |source| StoreError::Sql {
            path: path.clone(),
            what: "record expiries",
            source,
        };
        let tx = Savepoint::new(&self.conn).map_err(&sql)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE held SET expires_ms = ?4 WHERE jail = ?1 AND ip = ?2 AND id = ?3 \
                     AND expires_ms IS NOT ?4",
                )
                .map_err(&sql)?;
            for (jail, ip, id, expires_ms) in bans {
                stmt.execute(params![
                    jail.as_str(),
                    ip.to_string(),
                    id.to_string(),
                    sql_int(*expires_ms)
                ])
                .map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)
    }

    /// Forgets the held ban of (`jail`, `ip`).
    pub fn forget_held(&self, jail: &JailName, ip: IpAddr) -> Result<(), StoreError> {
        self.conn
            .execute(
                "DELETE FROM held WHERE jail = ?1 AND ip = ?2",
                params![jail.as_str(), ip.to_string()],
            )
            .map_err(self.sql("forget a held ban"))?;
        Ok(())
    }

    /// Deletes what no longer matters at `now_ms` (see the module documentation);
    /// returns how many rows.
    pub fn prune(&mut self, now_ms: u64) -> Result<usize, StoreError> {
        let done_before = now_ms.saturating_sub(ms(DONE_RETENTION));
        let unknown_before = now_ms.saturating_sub(ms(HELD_UNKNOWN_RETENTION));
        let path = &self.path;
        let sql = move |source| StoreError::Sql {
            path: path.clone(),
            what: "prune",
            source,
        };
        let tx = Savepoint::new(&self.conn).map_err(&sql)?;
        let mut n = tx
            .execute(
                "DELETE FROM events WHERE state = 'done' AND done_ms < ?1",
                [sql_int(done_before)],
            )
            .map_err(&sql)?;
        // The newest done row beyond the KEEP_DONE newest, found by walking
        // events_done (not by collecting the kept ones, which took some 60 ms of
        // the state's lock each minute once the state was full), and all older.
        let beyond: Option<(Option<i64>, i64)> = tx
            .query_row(
                "SELECT done_ms, rowid FROM events WHERE state = 'done' \
                 ORDER BY done_ms DESC, rowid DESC LIMIT 1 OFFSET ?1",
                [sql_int(KEEP_DONE as u64)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&sql)?;
        if let Some((done_ms, rowid)) = beyond {
            n += match done_ms {
                Some(d) => tx.execute(
                    "DELETE FROM events WHERE state = 'done' AND (done_ms IS NULL \
                     OR done_ms < ?1 OR (done_ms = ?1 AND rowid <= ?2))",
                    [d, rowid],
                ),
                // Sorted last: only rows without a time are beyond.
                None => tx.execute(
                    "DELETE FROM events WHERE state = 'done' AND done_ms IS NULL \
                     AND rowid <= ?1",
                    [rowid],
                ),
            }
            .map_err(&sql)?;
        }
        n += tx
            .execute(
                "DELETE FROM held WHERE (expires_ms IS NOT NULL AND expires_ms <= ?1) \
                 OR (expires_ms IS NULL AND applied_ms < ?2)",
                params![sql_int(now_ms), sql_int(unknown_before)],
            )
            .map_err(&sql)?;
        // Sorting all held bans by age took some 140 ms for 70,000 of them: only
        // when there are too many.
        let held: i64 = tx
            .query_row("SELECT count(*) FROM held", [], |r| r.get(0))
            .map_err(&sql)?;
        if from_sql(held) > MAX_HELD as u64 {
            n += tx
                .execute(
                    "DELETE FROM held WHERE (jail, ip) NOT IN \
                     (SELECT jail, ip FROM held ORDER BY applied_ms DESC LIMIT ?1)",
                    [sql_int(MAX_HELD as u64)],
                )
                .map_err(&sql)?;
        }
        tx.commit().map_err(&sql)?;
        Ok(n)
    }

    /// What the state holds.
    pub fn counts(&self) -> Result<Counts, StoreError> {
        self.conn
            .query_row(
                "SELECT (SELECT count(*) FROM events WHERE state = 'pending'), \
                 (SELECT count(*) FROM events WHERE state = 'done'), \
                 (SELECT count(*) FROM held)",
                [],
                |r| {
                    Ok(Counts {
                        pending: from_sql(r.get(0)?),
                        done: from_sql(r.get(1)?),
                        held: from_sql(r.get(2)?),
                    })
                },
            )
            .map_err(self.sql("count"))
    }
}

/// The parameters of [`KNOWN`] for `event`.
fn known_params(event: &Event) -> (String, &str, String) {
    (
        event.id.to_string(),
        event.jail.as_str(),
        event.ip.to_string(),
    )
}

/// The text columns of an item's rows, formatted once for all its statements.
struct Row {
    id: String,
    ip: String,
    epoch: Option<String>,
}

impl Row {
    fn of(item: &Item) -> Row {
        Row {
            id: item.event.id.to_string(),
            ip: item.event.ip.to_string(),
            epoch: item.epoch.map(|x| x.to_string()),
        }
    }
}

fn insert(conn: &Connection, item: &Item, state: &str, now_ms: u64) -> rusqlite::Result<usize> {
    insert_row(conn, item, &Row::of(item), state, now_ms)
}

/// Records `item` (its columns `row`) in `state` unless its id has a row already;
/// returns how many rows it inserted.
fn insert_row(
    conn: &Connection,
    item: &Item,
    row: &Row,
    state: &str,
    now_ms: u64,
) -> rusqlite::Result<usize> {
    let e = &item.event;
    conn.prepare_cached(
        "INSERT OR IGNORE INTO events (id, state, local_jail, node, jail, action, ip, time_ms, \
         seq, epoch, expires_ms, received_ms, done_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        row.id,
        state,
        item.jail.as_str(),
        e.node.as_str(),
        e.jail.as_str(),
        e.action.as_str(),
        row.ip,
        sql_int(e.time_ms),
        sql_int(item.seq),
        row.epoch,
        item.expires_ms.map(sql_int),
        sql_int(now_ms),
        (state == "done").then_some(sql_int(now_ms)),
    ])
}

fn pending_row(row: &rusqlite::Row<'_>) -> Result<Item, String> {
    let get_s = |i: usize| row.get::<_, String>(i).map_err(|e| e.to_string());
    let get_i = |i: usize| row.get::<_, i64>(i).map_err(|e| e.to_string());
    let id: EventId = get_s(0)?.parse().map_err(|e| format!("id: {e}"))?;
    let local = JailName::new(&get_s(1)?).map_err(|e| format!("local_jail: {e}"))?;
    let node = NodeName::new(&get_s(2)?).map_err(|e| format!("node: {e}"))?;
    let jail = JailName::new(&get_s(3)?).map_err(|e| format!("jail: {e}"))?;
    let action: Action = get_s(4)?.parse().map_err(|e| format!("action: {e}"))?;
    let ip = f2b_proto::event::parse_ip(&get_s(5)?).map_err(|e| format!("ip: {e}"))?;
    let time_ms = u64::try_from(get_i(6)?).map_err(|e| format!("time_ms: {e}"))?;
    let seq = u64::try_from(get_i(7)?).map_err(|e| format!("seq: {e}"))?;
    let epoch = match row.get::<_, Option<String>>(8).map_err(|e| e.to_string())? {
        Some(s) => Some(s.parse::<Epoch>().map_err(|e| format!("epoch: {e}"))?),
        None => None,
    };
    let expires_ms = match row.get::<_, Option<i64>>(9).map_err(|e| e.to_string())? {
        Some(v) => Some(u64::try_from(v).map_err(|e| format!("expires_ms: {e}"))?),
        None => None,
    };
    let event =
        Event::new(id, node, jail, action, ip, time_ms).map_err(|e| format!("event: {e}"))?;
    Ok(Item {
        jail: local,
        event,
        seq,
        epoch,
        expires_ms,
    })
}

fn held_row(row: &rusqlite::Row<'_>, epoch: Epoch) -> Result<Held, String> {
    let get_s = |i: usize| row.get::<_, String>(i).map_err(|e| e.to_string());
    let get_i = |i: usize| row.get::<_, i64>(i).map_err(|e| e.to_string());
    Ok(Held {
        jail: JailName::new(&get_s(0)?).map_err(|e| format!("jail: {e}"))?,
        ip: f2b_proto::event::parse_ip(&get_s(1)?).map_err(|e| format!("ip: {e}"))?,
        local_jail: JailName::new(&get_s(2)?).map_err(|e| format!("local_jail: {e}"))?,
        id: get_s(3)?.parse().map_err(|e| format!("id: {e}"))?,
        node: NodeName::new(&get_s(4)?).map_err(|e| format!("node: {e}"))?,
        epoch,
        seq: from_sql(get_i(5)?),
        expires_ms: row
            .get::<_, Option<i64>>(6)
            .map_err(|e| e.to_string())?
            .map(from_sql),
        applied_ms: from_sql(get_i(7)?),
    })
}

/// Fails with [`StoreError::Corrupt`] when `path` exists, is not empty and does not
/// start with SQLite's header.
fn check_header(path: &Path) -> Result<(), StoreError> {
    match f2b_common::state_file::looks_like_sqlite(path) {
        Ok(false) => Err(StoreError::Corrupt {
            path: path.to_owned(),
            detail: "not a SQLite database (no SQLite header)".into(),
        }),
        // Unreadable: SQLite's open says why.
        Ok(true) | Err(_) => Ok(()),
    }
}

/// Moves the store and its `-wal`/`-shm` aside (see
/// [`f2b_common::state_file::quarantine`]); returns its new name.
fn quarantine(path: &Path, now: SystemTime) -> Result<PathBuf, StoreError> {
    f2b_common::state_file::quarantine(path, now).map_err(|e| StoreError::Quarantine {
        path: e.path,
        to: e.to,
        source: e.source,
    })
}

/// How long the settling of applied events may wait before it is written
/// (`State::settle_applied_later`).
pub const SETTLE_DELAY: Duration = Duration::from_millis(10);
/// Applied events waiting to be written, at most: one more writes them at once.
pub const SETTLE_LATER_MAX: usize = 512;

/// The store shared by the intake and the executor. A failing operation is logged
/// (at most one line per 10 s) and the subscriber goes on without it: applying bans
/// matters more than remembering them.
///
/// # Settling later
///
/// The executor records its applied events with [`State::settle_applied_later`]: they
/// are written within [`SETTLE_DELAY`] (the executor calls [`State::flush`] then,
/// even while an action's call is in flight), in one transaction with the others
/// of that time, and before any other use of the
/// store ([`State::with`], [`State::transaction`], and when the state is dropped).
/// So the store sees every operation in the order it was made (a pending row
/// recorded after an event was applied is never settled by that event's record),
/// and a lone ban's record is no longer written right behind its action, on the
/// CPU the other subscribers of a machine, or the next events, need then.
/// [`State::known`] answers from the waiting events too, without writing them.
/// A crash (SIGKILL, power) loses the records of the last [`SETTLE_DELAY`]: those
/// events are applied again after the restart (from their pending rows, or the
/// snapshot's list), as an event applied and not yet recorded always was.
#[derive(Debug, Clone)]
pub(crate) struct State(Arc<Mutex<Inner>>);

#[derive(Debug)]
struct Inner {
    store: Store,
    limit: RateLimit,
    /// Applied events not written yet, in the order they were applied.
    later: Vec<Item>,
    /// When the first of them was settled (their `done_ms`).
    later_ms: u64,
    /// The `applied` lines of `later`, logged when they are written: runs of
    /// (how many events, the name of the action that applied them); `None` for
    /// events recorded without a line.
    later_lines: Vec<(usize, Option<&'static str>)>,
}

/// Logs a failing use of the store, at most one line per 10 s (`limit`).
fn log_failure(limit: &mut RateLimit, e: &StoreError) {
    if let Some(held) = limit.allow() {
        tracing::warn!(
            error = %f2b_common::daemon::error_chain(e),
            held_back = held,
            "cannot use the subscriber state; going on without it (events may be applied again after a restart)"
        );
    }
}

impl Inner {
    fn log(&mut self, e: &StoreError) {
        log_failure(&mut self.limit, e);
    }

    /// Writes the events settled later, if any, in one transaction. If that
    /// fails (logged), none of them is recorded: they are applied again after a
    /// restart, as after a crash (writing them later, or one by one, could put
    /// them after a later write and break the order).
    ///
    /// Their `applied` lines are formatted here and held: they are written in
    /// one write when the returned hold drops, which the caller lets happen
    /// after it has released the state's lock (a stalled log pipe then holds
    /// no other use of the state).
    #[must_use = "the applied lines are written when the hold drops"]
    fn flush(&mut self) -> Option<HeldLines> {
        if self.later.is_empty() {
            return None;
        }
        let items = std::mem::take(&mut self.later);
        let lines = std::mem::take(&mut self.later_lines);
        if let Err(e) = self.store.settle(&items, true, self.later_ms) {
            self.log(&e);
        }
        // Their lines in one write (one wake-up of journald, not one a ban).
        let held = f2b_common::log_batch::hold_log_lines();
        let mut items = items.iter();
        for (n, via) in lines {
            for item in items.by_ref().take(n) {
                if let Some(via) = via {
                    crate::executor::log_applied(item, via);
                }
            }
        }
        Some(held)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.flush());
    }
}

impl State {
    pub(crate) fn new(store: Store) -> Self {
        State(Arc::new(Mutex::new(Inner {
            store,
            limit: RateLimit::new(Duration::from_secs(10)),
            later: Vec::new(),
            later_ms: 0,
            later_lines: Vec::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A state in a new temporary directory (which must outlive it).
    #[cfg(test)]
    pub(crate) fn temp() -> (State, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(dir.path(), SystemTime::now()).expect("open the state");
        (State::new(store), dir)
    }

    /// [`State::settle_applied_later`] without the `applied` lines.
    #[cfg(test)]
    pub(crate) fn settle_later(&self, items: Vec<Item>, now_ms: u64) -> bool {
        self.settle_later_logged(items, None, now_ms)
    }

    /// Records `items` applied, as [`Store::settle`] does, within [`SETTLE_DELAY`]
    /// (see [the type's documentation](State)); at once when [`SETTLE_LATER_MAX`]
    /// are waiting. Returns whether none was waiting before: the caller then calls
    /// [`State::flush`] [`SETTLE_DELAY`] later. The `applied` line of each of
    /// `items` ([`crate::executor::log_applied`], the action named `via`) is
    /// logged when they are written, those of that time in one write.
    pub(crate) fn settle_applied_later(
        &self,
        items: Vec<Item>,
        via: &'static str,
        now_ms: u64,
    ) -> bool {
        self.settle_later_logged(items, Some(via), now_ms)
    }

    fn settle_later_logged(
        &self,
        items: Vec<Item>,
        via: Option<&'static str>,
        now_ms: u64,
    ) -> bool {
        // Declared before the lock: the lines are written after it is released.
        let mut lines = None;
        let mut g = self.lock();
        let first = g.later.is_empty();
        if first {
            g.later_ms = now_ms;
        }
        g.later_lines.push((items.len(), via));
        g.later.extend(items);
        if g.later.len() >= SETTLE_LATER_MAX {
            lines = g.flush();
        }
        drop(g);
        drop(lines);
        first
    }

    /// Writes the events settled later now.
    pub(crate) fn flush(&self) {
        let lines = self.lock().flush();
        drop(lines);
    }

    /// The store's counts as written, without writing the events settled later.
    #[cfg(test)]
    pub(crate) fn written_counts(&self) -> Counts {
        self.lock().store.counts().expect("counts")
    }

    /// [`Store::known`], counting the events settled later; on error logs it and
    /// answers `false`. Writes nothing.
    pub(crate) fn known(&self, event: &Event) -> bool {
        let mut g = self.lock();
        if g.later.iter().any(|i| i.event.id == event.id) {
            return true;
        }
        match g.store.known(event) {
            Ok(k) => k,
            Err(e) => {
                g.log(&e);
                false
            }
        }
    }

    /// [`Store::known_all`], counting the events settled later; on error logs it
    /// and returns an empty list. Writes nothing.
    pub(crate) fn known_all(&self, events: &[&Event]) -> Vec<bool> {
        let mut g = self.lock();
        match g.store.known_all(events) {
            Ok(mut k) => {
                if !g.later.is_empty() {
                    let later: std::collections::HashSet<EventId> =
                        g.later.iter().map(|i| i.event.id).collect();
                    for (known, event) in k.iter_mut().zip(events) {
                        *known = *known || later.contains(&event.id);
                    }
                }
                k
            }
            Err(e) => {
                g.log(&e);
                Vec::new()
            }
        }
    }

    /// Runs `f` with the store in one transaction (the store's own operations
    /// nest in it as savepoints), after writing the events settled later. The
    /// state is locked meanwhile: `f` must not use this `State` itself, only the
    /// [`Tx`] it is given.
    pub(crate) fn transaction<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> T) -> T {
        // Declared before the lock, so dropped after it: the applied lines of
        // the flush are written once the state is unlocked.
        let _lines;
        let mut g = self.lock();
        _lines = g.flush();
        let Inner { store, limit, .. } = &mut *g;
        let began = store
            .conn
            .execute_batch("BEGIN")
            .map_err(store.sql("begin"));
        let mut tx = Tx { store, limit };
        if let Err(e) = began {
            tx.log(&e);
            return f(&mut tx);
        }
        // A panic in `f` rolls the transaction back before it goes on: the
        // connection is left as it was found, and the next writes (the waiting
        // records' among them, at the latest when the state is dropped) are not
        // made inside a transaction nobody commits.
        let out = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut tx))) {
            Ok(out) => out,
            Err(panic) => {
                let _ = tx.store.conn.execute_batch("ROLLBACK");
                std::panic::resume_unwind(panic);
            }
        };
        if let Err(e) = tx
            .store
            .conn
            .execute_batch("COMMIT")
            .map_err(tx.store.sql("commit"))
        {
            tx.log(&e);
            let _ = tx.store.conn.execute_batch("ROLLBACK");
        }
        out
    }

    /// Runs `f` on the store, after writing the events settled later; on error
    /// logs it and returns `T::default()`.
    pub(crate) fn with<T: Default>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> T {
        // Dropped after the lock, as in `transaction`.
        let _lines;
        let mut g = self.lock();
        _lines = g.flush();
        match f(&mut g.store) {
            Ok(v) => v,
            Err(e) => {
                g.log(&e);
                T::default()
            }
        }
    }
}

/// The store inside [`State::transaction`].
pub(crate) struct Tx<'a> {
    store: &'a mut Store,
    limit: &'a mut RateLimit,
}

impl Tx<'_> {
    fn log(&mut self, e: &StoreError) {
        log_failure(self.limit, e);
    }

    /// Like [`State::with`], inside the transaction.
    pub(crate) fn with<T: Default>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> T {
        match f(self.store) {
            Ok(v) => v,
            Err(e) => {
                self.log(&e);
                T::default()
            }
        }
    }
}

#[cfg(test)]
mod migration_tests;
#[cfg(test)]
mod tests;
