//! The ledger: every event the publisher broadcast, in SQLite (`state_dir/ledger.sqlite3`),
//! so that the epoch, the sequence numbers, the cluster state and duplicate detection
//! survive a restart, and so that snapshots can list the active bans.
//!
//! fail2ban keeps its own bans in SQLite too; an operator can read the ledger with
//! `sqlite3 ledger.sqlite3 'select * from events'` while the publisher runs (WAL mode
//! lets readers in beside the writer).
//!
//! # Durability
//!
//! An event is committed (`synchronous = FULL`: the WAL is synced on every commit)
//! before its ACK is sent, so an ACK `broadcast` means the event survives a crash
//! of the publisher or of its machine (its broadcast may go out before the sync:
//! below). A write that fails is
//! refused with a transient NAK (`busy`); the monitor sends it again.
//!
//! Requests that arrive together are committed together (group commit): between
//! [`Ledger::begin_batch`] and [`Ledger::commit_batch`] each [`Ledger::append`]
//! writes into one transaction, and the server sends their broadcasts and replies
//! only once that transaction is committed, so one sync covers them all. If that
//! commit fails, none of them happened and every request of the batch is refused as
//! `busy`; the sequence number goes back unless the batch's events were already
//! broadcast (below). Appends have no savepoint each: an append that fails after
//! its `events` row (a disk error), or an error on which SQLite rolls the batch
//! back by itself, loses the whole batch. The appends after that in the batch are
//! refused without writing, the batch is not broadcast early, and its commit
//! fails the same way.
//!
//! # Broadcast before the sync
//!
//! The server may broadcast a batch's events before its commit, and send the
//! replies (the ACKs) only after it: an ACK still means durable, and the sync is
//! no longer on the path from one node's log to the other nodes' firewalls. A
//! sequence number that went out must then never be used again for another event,
//! even if its batch is lost:
//! - a commit that fails keeps [`Ledger::last_seq`] where the batch took it
//!   ([`Ledger::commit_batch`] with `keep_seqs`) and tries to write that number
//!   to `meta` on its own; the rows are gone, their monitors were answered
//!   `busy` and send the events again, under new numbers. A clean stop writes
//!   the number too ([`Ledger::stop_serving`]);
//! - the file's last number can lag behind the one in memory only while such
//!   writes fail (a failing disk): the server then broadcasts a batch early only
//!   while its numbers stay within [`EARLY_BROADCAST_MAX`] of the file's
//!   ([`Ledger::may_broadcast_early`]), and otherwise commits first (as it does
//!   a batch already rolled back, whose commit fails);
//! - a publisher that dies between the broadcast and the commit leaves `meta`
//!   `serving = 1` behind ([`Ledger::start_serving`] writes it, a clean stop
//!   clears it). The next start finds it and moves [`Ledger::last_seq`]
//!   [`EARLY_BROADCAST_MAX`] past the last committed number (the most a batch
//!   broadcasts before its commit), so the lost batch's numbers are skipped; the
//!   subscribers see the gap and take a snapshot.
//!
//! # Schema (version [`SCHEMA_VERSION`], in `PRAGMA user_version`)
//!
//! - `meta(key, value)`: `epoch` (16 hex digits), `last_seq` (the last sequence number
//!   used, which never goes back even when its row is pruned), `created_ms`,
//!   `serving` (1 while a publisher serves from the ledger, 0 after a clean stop).
//! - `events`: one row per broadcast event: `seq` (primary key), `epoch`, `id`,
//!   `node`, `jail`, `action` (`ban`/`unban`), `ip`, `time_ms` (the event's time),
//!   `accepted_ms` (the publisher's time), `expires_ms` (bans: `accepted_ms` +
//!   `ban_time`; unbans: null), `origin` (`native`/`legacy`), `peer` (the reporting
//!   socket's address), `credential` (unused, null: `reported_by` took its place)
//!   and `reported_by` (since version 3): the monitor credential that authenticated
//!   the report (its node name), `legacy` for a fail2ban-zmq-tools report, null for
//!   a report accepted without authentication (`trust.allow_unauthenticated`).
//! - `active_bans(seq, jail, ip, expires_ms)` (since version 2): the ban rows of
//!   `events` that no later row of their (jail, address) superseded, kept in the
//!   same transaction as each event (a ban replaces its (jail, address)'s row, an
//!   unban deletes it), so that snapshots read active bans only.
//! - `superseded(seq)` (since version 2): the `events` rows a later row of their
//!   (jail, address) superseded, queued for pruning.
//!
//! A version 1 or 2 ledger is upgraded in place when it is opened (its rows are
//! kept; the legacy ones get `reported_by = 'legacy'`, the others null, since no
//! report was authenticated before version 3).
//!
//! # Retention
//!
//! [`Ledger::prune`] deletes what no longer matters: bans that expired, rows
//! superseded by a later row of the same (jail, address) (a ban followed by an
//! unban), and unbans older than `ban_time`. What is left is the active bans and the
//! recent unbans: exactly what the in-memory state is rebuilt from at start.
//!
//! # Cost
//!
//! Nothing the network can ask for scans the ledger: a snapshot page looks at
//! most at [`SNAPSHOT_SCAN`] rows of `active_bans` (and one index probe per jail
//! named), and pruning finds what to delete through indexes and the `superseded`
//! queue, so it only touches the rows it deletes. [`Ledger::vm_steps`] counts the
//! work (SQLite virtual machine steps) so that tests can check it.

use std::cell::Cell;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use f2b_proto::{
    Action, ActiveBan, Epoch, Event, EventId, JailName, NodeName, SnapshotPage, MAX_SAFE_INTEGER,
};
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Statement, StatementStatus,
};

use crate::trust::Reporter;

/// The ledger's file name in `state_dir`.
pub const LEDGER_FILE: &str = "ledger.sqlite3";

/// The schema this publisher writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 3;

/// The most rows one [`Ledger::prune`] call deletes, so that a large backlog is
/// pruned in steps between requests instead of in one long stall.
pub const PRUNE_BATCH: usize = 10_000;

/// How long a write waits for a lock held by another connection (an operator's
/// `sqlite3` checkpointing) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_millis(500);

/// How many compiled statements the ledger's connection keeps.
const STATEMENT_CACHE: usize = 32;

/// The most rows of `active_bans` one snapshot page looks at; when it looked at
/// that many, its `next` says where to go on (the page may then even be empty,
/// for a jail filter that matches few of them). Many more than a page can hold (a
/// ban takes at least about 130 of the page's 8192 bytes).
pub const SNAPSHOT_SCAN: usize = 1024;

/// The schema of version 1.
const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key TEXT PRIMARY KEY NOT NULL,
    value NOT NULL
) WITHOUT ROWID;
CREATE TABLE events (
    seq INTEGER PRIMARY KEY NOT NULL,
    epoch TEXT NOT NULL,
    id TEXT NOT NULL,
    node TEXT NOT NULL,
    jail TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('ban', 'unban')),
    ip TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    accepted_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    origin TEXT NOT NULL,
    peer TEXT NOT NULL,
    credential BLOB
);
CREATE INDEX events_by_address ON events (jail, ip, seq);
";

/// What version 2 adds to version 1; from a version 1 ledger's rows, it fills the
/// new tables as [`Ledger::append`] would have.
const SCHEMA_V2: &str = "
CREATE TABLE active_bans (
    seq INTEGER PRIMARY KEY NOT NULL,
    jail TEXT NOT NULL,
    ip TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX active_bans_by_address ON active_bans (jail, ip);
CREATE INDEX active_bans_by_jail ON active_bans (jail, seq);
CREATE INDEX active_bans_by_expiry ON active_bans (expires_ms);
CREATE TABLE superseded (
    seq INTEGER PRIMARY KEY NOT NULL
);
CREATE INDEX events_bans_by_expiry ON events (expires_ms) WHERE action = 'ban';
CREATE INDEX events_unbans_by_age ON events (accepted_ms) WHERE action = 'unban';
INSERT OR REPLACE INTO active_bans (seq, jail, ip, expires_ms)
    SELECT e.seq, e.jail, e.ip, e.expires_ms FROM events e
    WHERE e.action = 'ban' AND e.expires_ms IS NOT NULL
    AND NOT EXISTS (SELECT 1 FROM events l WHERE l.jail = e.jail AND l.ip = e.ip AND l.seq > e.seq);
INSERT OR IGNORE INTO superseded (seq)
    SELECT e.seq FROM events e
    WHERE EXISTS (SELECT 1 FROM events l WHERE l.jail = e.jail AND l.ip = e.ip AND l.seq > e.seq);
";

/// What version 3 adds to version 2: who reported each event.
const SCHEMA_V3: &str = "
ALTER TABLE events ADD COLUMN reported_by TEXT;
UPDATE events SET reported_by = 'legacy' WHERE origin = 'legacy';
";

/// The columns a [`Record`] is read from, in [`record`]'s order.
const COLUMNS: &str = "e.seq, e.id, e.node, e.jail, e.action, e.ip, e.time_ms, e.accepted_ms, \
     e.expires_ms, e.origin, e.peer, e.reported_by";

/// A row is superseded when a later row of the same (jail, address) exists (one
/// probe of `events_by_address`).
const SUPERSEDED: &str =
    "EXISTS (SELECT 1 FROM events l WHERE l.jail = e.jail AND l.ip = e.ip AND l.seq > e.seq)";

/// Why the ledger cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("cannot create the state directory {path} (set [publisher] state_dir to a writable directory)")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot read or create the ledger {path} (check that [publisher] state_dir is a \
         directory the publisher's user owns and can write, and the ledger's owner and mode)"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot open the ledger {path} (check that [publisher] state_dir is a directory the \
         publisher's user owns and can write, and the ledger's owner and mode)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the ledger {path} is corrupt ({detail}); move it away and the publisher starts a new one"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} is a SQLite database but not a fail2ban-cluster ledger; move it away or set \
         [publisher] state_dir to another directory"
    )]
    Foreign { path: PathBuf },
    #[error(
        "the ledger {path} has schema version {found}, newer than this publisher's {supported}; \
         run the newer publisher, or move the ledger away (losing its state)"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("cannot move the corrupt ledger {path} away to {to}")]
    Quarantine {
        path: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger {path}: cannot {what}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger {path}: sequence number {found} does not follow {last}")]
    Sequence {
        path: PathBuf,
        last: u64,
        found: u64,
    },
    #[error("cannot draw a random epoch: {0}")]
    Random(String),
}

impl LedgerError {
    /// Whether this is a corruption of the file (rather than a permission, a lock or
    /// a full disk).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, LedgerError::Corrupt { .. })
    }
}

/// One broadcast event as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub event: Event,
    /// When the publisher accepted it, ms since the Unix epoch.
    pub accepted_ms: u64,
    /// For a ban, when the cluster stops holding it; `None` for an unban.
    pub expires_ms: Option<u64>,
    /// Whether a fail2ban-zmq-tools monitor reported it.
    pub legacy: bool,
    /// The reporting peer's address.
    pub peer: String,
    /// Which credential reported it.
    pub reported_by: Reporter,
}

/// What [`Ledger::prune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: usize,
    /// The batch was full: call again soon.
    pub more: bool,
}

/// Whether [`Ledger::open`] found a ledger or made a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Existing,
    Created,
}

/// The publisher's durable record of its epoch, sequence numbers and broadcast
/// events.
/// The most events the server may broadcast before their batch is committed; a
/// start after an unclean stop skips this many sequence numbers (see the module
/// docs).
pub const EARLY_BROADCAST_MAX: u64 = 4096;

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    epoch: Epoch,
    /// `epoch` as the `events` rows hold it.
    epoch_text: String,
    last_seq: u64,
    /// The last sequence number the file is known to hold (`meta` or a row):
    /// [`Self::last_seq`] but for the numbers of batches whose commit failed
    /// and could not be written since.
    durable_seq: u64,
    opened: Opened,
    /// SQLite virtual machine steps run by snapshots, pruning and rebroadcast
    /// look-ups (see [`Ledger::vm_steps`]).
    steps: Cell<u64>,
    /// While a batch is open, the last sequence number when it began.
    batch: Option<u64>,
    /// An append of the open batch failed half-way and rolled the batch back:
    /// its commit must fail.
    broken: bool,
    /// Makes the next [`Ledger::commit_batch`] fail, for tests.
    #[cfg(test)]
    fail_commit: bool,
    /// Makes the writes of `meta`'s last_seq outside a batch fail, for tests.
    #[cfg(test)]
    fail_last_seq: bool,
    /// Makes appends fail after their `events` row, for tests.
    #[cfg(test)]
    fail_half_way: bool,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

fn random_epoch() -> Result<Epoch, LedgerError> {
    getrandom::u64()
        .map(Epoch)
        .map_err(|e| LedgerError::Random(e.to_string()))
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

/// A u64 as SQLite stores it (i64), saturating.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The last sequence number the file holds: `meta`'s, or that of the last row if
/// it is higher.
fn stored_last_seq(conn: &Connection, path: &Path) -> Result<u64, LedgerError> {
    let meta: Option<rusqlite::types::Value> = conn
        .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(sql_err(path, "read the last sequence number"))?;
    let meta_seq = match meta {
        Some(rusqlite::types::Value::Integer(n)) => u64::try_from(n).ok(),
        _ => None,
    }
    .ok_or_else(|| LedgerError::Corrupt {
        path: path.to_owned(),
        detail: "meta last_seq is missing or negative".into(),
    })?;
    let max_row: Option<i64> = conn
        .query_row("SELECT max(seq) FROM events", [], |r| r.get(0))
        .map_err(sql_err(path, "read the last sequence number"))?;
    Ok(meta_seq.max(max_row.and_then(|s| u64::try_from(s).ok()).unwrap_or(0)))
}

/// Adds the virtual machine steps `stmt` ran since the last call to `steps`.
fn count_steps(steps: &Cell<u64>, stmt: &Statement<'_>) {
    let n = u64::try_from(stmt.reset_status(StatementStatus::VmStep)).unwrap_or(0);
    steps.set(steps.get().saturating_add(n));
}

fn sql_err(path: &Path, what: &'static str) -> impl FnOnce(rusqlite::Error) -> LedgerError {
    let path = path.to_owned();
    move |source| LedgerError::Sql { path, what, source }
}

/// An error as SQLite would report it with `code`, for the failures the ledger
/// makes itself (refused appends, a lost batch) and tests inject.
fn sqlite_failure(code: std::ffi::c_int, message: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(message.into()))
}

fn now_ms(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads a row of [`COLUMNS`]. The outer error is SQLite's; the inner one says why a
/// row (edited by hand, or damaged) is not a valid event.
fn record(row: &Row<'_>) -> rusqlite::Result<Result<Record, String>> {
    let seq: i64 = row.get(0)?;
    let id: String = row.get(1)?;
    let node: String = row.get(2)?;
    let jail: String = row.get(3)?;
    let action: String = row.get(4)?;
    let ip: String = row.get(5)?;
    let time_ms: i64 = row.get(6)?;
    let accepted_ms: i64 = row.get(7)?;
    let expires_ms: Option<i64> = row.get(8)?;
    let origin: String = row.get(9)?;
    let peer: String = row.get(10)?;
    let reported_by: Option<String> = row.get(11)?;
    let build = || -> Result<Record, String> {
        let seq = u64::try_from(seq)
            .ok()
            .filter(|s| (1..=MAX_SAFE_INTEGER).contains(s))
            .ok_or_else(|| format!("seq {seq} out of range"))?;
        let bad = |what: &str, e: &dyn std::fmt::Display| format!("seq {seq}: {what}: {e}");
        let event = Event::new(
            id.parse::<EventId>().map_err(|e| bad("id", &e))?,
            NodeName::new(&node).map_err(|e| bad("node", &e))?,
            JailName::new(&jail).map_err(|e| bad("jail", &e))?,
            action.parse::<Action>().map_err(|e| bad("action", &e))?,
            f2b_proto::event::parse_ip(&ip).map_err(|e| bad("ip", &e))?,
            u64::try_from(time_ms).map_err(|e| bad("time_ms", &e))?,
        )
        .map_err(|e| bad("event", &e))?;
        let expires_ms = match expires_ms {
            Some(v) => Some(u64::try_from(v).map_err(|e| bad("expires_ms", &e))?),
            None => None,
        };
        if event.action == Action::Ban && expires_ms.is_none() {
            return Err(format!("seq {seq}: a ban without expires_ms"));
        }
        let legacy = origin == "legacy";
        let reported_by = match reported_by.as_deref() {
            None => Reporter::Unauthenticated,
            Some("legacy") if legacy => Reporter::Legacy,
            Some(name) => {
                Reporter::Credential(NodeName::new(name).map_err(|e| bad("reported_by", &e))?)
            }
        };
        Ok(Record {
            seq,
            event,
            accepted_ms: u64::try_from(accepted_ms).map_err(|e| bad("accepted_ms", &e))?,
            expires_ms,
            legacy,
            peer,
            reported_by,
        })
    };
    Ok(build())
}

impl Ledger {
    /// Opens `dir/ledger.sqlite3`, creating the directory (mode 0700) and a new
    /// ledger with a random epoch if there is none. Fails with
    /// [`LedgerError::Corrupt`] when the file is not a sound SQLite database (see
    /// [`Ledger::open_or_recover`]), and with a clear error for a ledger of a newer
    /// schema or a database that is not a ledger.
    pub fn open(dir: &Path) -> Result<Ledger, LedgerError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| LedgerError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        let path = dir.join(LEDGER_FILE);
        // SQLite deletes the WAL of a file it does not recognise: look at the file
        // first, so that what recovery moves away is the whole evidence.
        check_header(&path)?;
        // A new ledger is created private (SQLite gives its -wal and -shm files the
        // same mode); an empty file is an empty database to SQLite.
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(LedgerError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LedgerError::Open {
            path: path.clone(),
            source,
        })?;
        let ledger = Ledger::init(conn, path.clone(), true).map_err(|e| match e {
            LedgerError::Sql { source, .. } | LedgerError::Open { source, .. }
                if is_corruption(&source) =>
            {
                LedgerError::Corrupt {
                    path: path.clone(),
                    detail: source.to_string(),
                }
            }
            other => other,
        })?;
        if ledger.opened == Opened::Created {
            tracing::warn!(
                path = %path.display(),
                epoch = %ledger.epoch,
                "new ledger: no previous state (first start, or the ledger was deleted or \
                 moved away); sequence numbers start at 1 in a new epoch"
            );
        }
        Ok(ledger)
    }

    /// [`Ledger::open`], but a corrupt ledger file is moved away to
    /// `ledger.sqlite3.corrupt-<unix time>` (with its `-wal` and `-shm` files) and a
    /// new ledger with a new epoch is started, with a loud error in the log: the hub
    /// stays up, the evidence is kept, and subscribers see the new epoch. Every
    /// other failure (permissions, a newer schema, a foreign database) is returned.
    pub fn open_or_recover(dir: &Path, now: SystemTime) -> Result<Ledger, LedgerError> {
        match Ledger::open(dir) {
            Err(LedgerError::Corrupt { path, detail }) => {
                let moved = quarantine(&path, now)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved.display(),
                    detail = detail.as_str(),
                    "ledger corrupt: moved it away and started a new ledger with a new \
                     epoch; the bans it held are no longer in snapshots"
                );
                Ledger::open(dir)
            }
            other => other,
        }
    }

    /// A ledger in memory with `epoch`, for tests and tools: nothing survives it.
    pub fn in_memory(epoch: Epoch) -> Result<Ledger, LedgerError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| LedgerError::Open {
            path: path.clone(),
            source,
        })?;
        let mut ledger = Ledger::init(conn, path, false)?;
        ledger.epoch = epoch;
        ledger.epoch_text = epoch.to_string();
        ledger
            .conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'epoch'",
                [epoch.to_string()],
            )
            .map_err(ledger.sql("set the epoch"))?;
        Ok(ledger)
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> LedgerError + '_ {
        move |source| LedgerError::Sql {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Sets the connection up, checks the file, creates the schema in a new ledger
    /// and reads the epoch and last sequence number.
    fn init(mut conn: Connection, path: PathBuf, file: bool) -> Result<Ledger, LedgerError> {
        let sql = |what: &'static str| {
            let path = path.clone();
            move |source| LedgerError::Sql { path, what, source }
        };
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("set the busy timeout"))?;
        // Every statement the ledger runs more than once stays compiled (an
        // append's, a batch's, snapshots', pruning's): more than rusqlite's
        // default of 16.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        // The page copies a savepoint or a statement keeps to undo itself (the
        // sub-journal; appends keep none since session 10, other writes may)
        // stay in memory: by default SQLite moves them past 64 KiB to a new
        // temporary file (created, unlinked, written, closed), which under load
        // it did several times a second. They only serve a rollback inside
        // the open transaction, never crash recovery (that is the WAL).
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(sql("keep temporary data in memory"))?;
        if file {
            // The first statement that reads the file: a file that is not a
            // database fails here.
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
                .map_err(sql("switch to WAL mode"))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(path = %path.display(), mode, "the ledger is not in WAL mode");
            }
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(sql("set synchronous = FULL"))?;
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(sql("check the file"))?;
            if check != "ok" {
                return Err(LedgerError::Corrupt {
                    path,
                    detail: format!("quick_check: {check}"),
                });
            }
        }
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("read the schema version"))?;
        let opened = match version {
            0 => {
                let objects: i64 = conn
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(sql("read the schema"))?;
                if objects != 0 {
                    return Err(LedgerError::Foreign { path });
                }
                let epoch = random_epoch()?;
                let tx = conn.transaction().map_err(sql("begin"))?;
                tx.execute_batch(SCHEMA_V1)
                    .and_then(|()| tx.execute_batch(SCHEMA_V2))
                    .and_then(|()| tx.execute_batch(SCHEMA_V3))
                    .map_err(sql("create the schema"))?;
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('epoch', ?1), ('last_seq', 0), \
                     ('created_ms', ?2)",
                    params![epoch.to_string(), sql_int(now_ms(SystemTime::now()))],
                )
                .map_err(sql("write the epoch"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(sql("write the schema version"))?;
                tx.commit().map_err(sql("create the ledger"))?;
                Opened::Created
            }
            1 | 2 => {
                let tx = conn.transaction().map_err(sql("begin"))?;
                if version == 1 {
                    tx.execute_batch(SCHEMA_V2)
                        .map_err(sql("upgrade the schema to version 2"))?;
                }
                tx.execute_batch(SCHEMA_V3)
                    .map_err(sql("upgrade the schema to version 3"))?;
                tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                    .map_err(sql("write the schema version"))?;
                tx.commit()
                    .map_err(sql("upgrade the schema to version 3"))?;
                tracing::info!(path = %path.display(), from = version, to = SCHEMA_VERSION, "ledger schema upgraded");
                Opened::Existing
            }
            SCHEMA_VERSION => Opened::Existing,
            v if v > SCHEMA_VERSION => {
                return Err(LedgerError::NewerSchema {
                    path,
                    found: v,
                    supported: SCHEMA_VERSION,
                })
            }
            _ => return Err(LedgerError::Foreign { path }),
        };
        let meta = |key: &'static str| {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .optional()
        };
        let corrupt = |detail: String| LedgerError::Corrupt {
            path: path.clone(),
            detail,
        };
        let epoch = match meta("epoch").map_err(sql("read the epoch"))? {
            Some(rusqlite::types::Value::Text(t)) => t
                .parse::<Epoch>()
                .map_err(|e| corrupt(format!("meta epoch: {e}")))?,
            other => return Err(corrupt(format!("meta epoch is {other:?}"))),
        };
        let last_seq = stored_last_seq(&conn, &path)?;
        Ok(Ledger {
            conn,
            path,
            epoch_text: epoch.to_string(),
            epoch,
            last_seq,
            durable_seq: last_seq,
            opened,
            steps: Cell::new(0),
            batch: None,
            broken: false,
            #[cfg(test)]
            fail_commit: false,
            #[cfg(test)]
            fail_last_seq: false,
            #[cfg(test)]
            fail_half_way: false,
        })
    }

    /// Marks the ledger as served from (`meta` `serving = 1`, committed and
    /// synced). If the mark was already there, the previous publisher did not stop
    /// cleanly and may have broadcast up to [`EARLY_BROADCAST_MAX`] events whose
    /// batch was never committed: [`Self::last_seq`] moves that far past the last
    /// committed number (written to `meta` too), so none of those numbers is used
    /// again. Returns how many numbers were skipped (0 after a clean stop).
    pub fn start_serving(&mut self) -> Result<u64, LedgerError> {
        let was: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'serving'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err(&self.path, "read the serving mark"))?;
        let skipped = match was {
            Some(1) => EARLY_BROADCAST_MAX,
            _ => 0,
        };
        let last = self
            .last_seq
            .saturating_add(skipped)
            .min(f2b_proto::MAX_SAFE_INTEGER);
        let tx = self
            .conn
            .transaction()
            .map_err(sql_err(&self.path, "begin"))?;
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('serving', 1), ('last_seq', ?1)",
            [sql_int(last)],
        )
        .and_then(|_| tx.commit())
        .map_err(sql_err(&self.path, "write the serving mark"))?;
        let skipped = last - self.last_seq;
        self.last_seq = last;
        self.durable_seq = last;
        Ok(skipped)
    }

    /// Clears the mark [`Self::start_serving`] wrote: a clean stop, after the last
    /// batch was committed. Writes [`Self::last_seq`] with it, in the same
    /// statement: numbers that went out in a batch whose commit failed are then
    /// not used again by the next start either. A publisher that cannot clear it
    /// only makes the next start skip some sequence numbers.
    pub fn stop_serving(&mut self) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('serving', 0), ('last_seq', ?1)",
                [sql_int(self.last_seq)],
            )
            .map_err(sql_err(&self.path, "clear the serving mark"))?;
        self.durable_seq = self.last_seq;
        Ok(())
    }

    /// Whether the numbers used since the file's last known number are few
    /// enough that the next start after a crash skips them all
    /// ([`EARLY_BROADCAST_MAX`]), and the open batch was not rolled back already
    /// (its commit will fail): only then may its events be broadcast before its
    /// commit. Always true unless commits failed and their numbers could not be
    /// written since, or the open batch is lost.
    pub fn may_broadcast_early(&self) -> bool {
        !self.batch_lost() && self.last_seq <= self.durable_seq.saturating_add(EARLY_BROADCAST_MAX)
    }

    /// Whether the open batch was rolled back before its commit (an append that
    /// failed half-way, or SQLite on an error): its commit must fail.
    fn batch_lost(&self) -> bool {
        self.batch.is_some() && (self.broken || self.conn.is_autocommit())
    }

    /// The file (`:memory:` for an in-memory ledger).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The last sequence number used (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Whether this ledger was made by this open.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    /// Opens a batch: the [`Self::append`]s until [`Self::commit_batch`] are
    /// committed together, by it. Takes the write lock now (waiting at most the
    /// busy timeout for another writer). Nothing happens if a batch is open.
    pub fn begin_batch(&mut self) -> Result<(), LedgerError> {
        if self.batch.is_some() {
            return Ok(());
        }
        self.run_cached("BEGIN IMMEDIATE")
            .map_err(sql_err(&self.path, "begin a batch"))?;
        self.batch = Some(self.last_seq);
        self.broken = false;
        Ok(())
    }

    /// Commits the open batch (if any), with `meta`'s last_seq (the last number its
    /// appends used): when this returns `Ok`, every event
    /// appended since [`Self::begin_batch`] is durable. When it fails, the batch is
    /// rolled back and [`Self::last_seq`] is read again from the file: what it was
    /// before the batch (the appends after a rollback in the batch, by an append
    /// that failed half-way or by SQLite itself on an error, were refused).
    ///
    /// With `keep_seqs` (the batch's events were broadcast already), a failure
    /// leaves [`Self::last_seq`] where the batch took it instead, so that no number
    /// that went out is used again.
    pub fn commit_batch(&mut self, keep_seqs: bool) -> Result<(), LedgerError> {
        let Some(start) = self.batch.take() else {
            return Ok(());
        };
        let reached = self.last_seq;
        #[cfg(test)]
        let injected = std::mem::take(&mut self.fail_commit)
            .then(|| sqlite_failure(rusqlite::ffi::SQLITE_IOERR, "injected commit failure"));
        #[cfg(not(test))]
        let injected: Option<rusqlite::Error> = None;
        // An append that failed half-way rolled the batch back (see `append`).
        let injected = injected.or_else(|| {
            std::mem::take(&mut self.broken).then(|| {
                sqlite_failure(
                    rusqlite::ffi::SQLITE_ABORT,
                    "an append failed half-way and rolled the batch back",
                )
            })
        });
        // The batch's appends left `meta`'s last_seq to this commit (see
        // `append`): written in the transaction, if it is still open (if SQLite
        // rolled it back by itself, the COMMIT fails below).
        let meta = if reached != start && !self.conn.is_autocommit() {
            self.write_last_seq(reached)
        } else {
            Ok(())
        };
        let committed = match (meta, injected) {
            (Err(e), _) | (Ok(()), Some(e)) => Err(e),
            (Ok(()), None) => self.run_cached("COMMIT"),
        };
        if let Err(source) = committed {
            // A failed COMMIT may leave the transaction open (SQLITE_BUSY) or have
            // rolled it back already; either way it must be gone.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            let floor = if keep_seqs { reached } else { start };
            let stored = stored_last_seq(&self.conn, &self.path);
            self.last_seq = match &stored {
                Ok(n) => (*n).max(floor),
                Err(e) => {
                    tracing::error!(error = %f2b_common::daemon::error_chain(e), "cannot read the last sequence number back");
                    floor
                }
            };
            if let Ok(n) = stored {
                self.durable_seq = n;
            }
            if self.last_seq > self.durable_seq {
                // Numbers that went out: written on their own, so that the next
                // start does not use them again, crash or not.
                match self.write_last_seq_alone(self.last_seq) {
                    Ok(()) => self.durable_seq = self.last_seq,
                    Err(e) => tracing::error!(
                        error = %e,
                        last_seq = self.last_seq,
                        on_disk = self.durable_seq,
                        "cannot write the last sequence number; until it is written, batches are committed before they are broadcast"
                    ),
                }
            }
            return Err(LedgerError::Sql {
                path: self.path.clone(),
                what: "commit a batch",
                source,
            });
        }
        if reached != start {
            self.durable_seq = reached;
        }
        Ok(())
    }

    /// Makes the next [`Self::commit_batch`] fail, as a full disk would.
    #[cfg(test)]
    pub(crate) fn fail_next_commit(&mut self) {
        self.fail_commit = true;
    }

    /// Makes appends fail after their `events` row is written (`true`), as a
    /// disk error would, or work again.
    #[cfg(test)]
    pub(crate) fn fail_half_way(&mut self, fail: bool) {
        self.fail_half_way = fail;
    }

    /// Makes the writes of `meta`'s last_seq on their own (after a failed
    /// commit) fail, or work again.
    #[cfg(test)]
    pub(crate) fn fail_last_seq_writes(&mut self, fail: bool) {
        self.fail_last_seq = fail;
    }

    /// Writes `seq` as `meta`'s last sequence number in a transaction of its
    /// own (no batch may be open).
    fn write_last_seq_alone(&self, seq: u64) -> rusqlite::Result<()> {
        #[cfg(test)]
        if self.fail_last_seq {
            return Err(sqlite_failure(
                rusqlite::ffi::SQLITE_IOERR,
                "injected write failure",
            ));
        }
        self.write_last_seq(seq)
    }

    /// Commits `record`, whose `seq` must be [`Self::last_seq`] + 1, with what it
    /// changes in `active_bans` and `superseded`, and the new last sequence number:
    /// in a transaction of its own, or, in a batch, into the batch's transaction
    /// (then it is durable once [`Self::commit_batch`] succeeds, and `meta`'s
    /// last_seq is written once for the whole batch, by that commit, in the same
    /// transaction).
    ///
    /// An append that fails leaves nothing of itself behind. In a batch it has no
    /// savepoint of its own: the page copies a savepoint keeps were about a fifth
    /// of the publisher's work per event. What could make one of its statements
    /// break a constraint is checked before anything is written (a ban without
    /// expires_ms), so a statement fails only on an error of the disk or of
    /// SQLite. If the first one (the `events` row) fails with the batch still
    /// open, it wrote nothing, and the batch goes on. Otherwise the whole batch
    /// is rolled back (by this append, or by SQLite itself, as it does on a full
    /// disk), the appends after it in the batch are refused without writing
    /// anything, and [`Self::commit_batch`] fails, as when the commit itself
    /// fails: every request of the batch is refused as `busy` and sent again.
    pub fn append(&mut self, record: &Record) -> Result<(), LedgerError> {
        if record.seq != self.last_seq.saturating_add(1) {
            return Err(LedgerError::Sequence {
                path: self.path.clone(),
                last: self.last_seq,
                found: record.seq,
            });
        }
        if record.event.action == Action::Ban && record.expires_ms.is_none() {
            // The `active_bans` row's NOT NULL constraint, checked before the
            // `events` row is written.
            return Err(sql_err(&self.path, "write an event")(sqlite_failure(
                rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL,
                "a ban without expires_ms",
            )));
        }
        if self.batch_lost() {
            self.broken = true;
            return Err(sql_err(&self.path, "write an event")(sqlite_failure(
                rusqlite::ffi::SQLITE_ABORT,
                "an earlier append rolled the batch back",
            )));
        }
        // Inside an open transaction (a batch), `meta`'s last_seq is written once,
        // by `commit_batch`, in the same transaction; on its own (no batch) the
        // append writes it with its row, in a transaction of its own.
        let own = self.batch.is_none();
        if own && !self.conn.is_autocommit() {
            // A transaction left open by a ROLLBACK that could not run.
            let _ = self.run_cached("ROLLBACK");
        }
        if own {
            self.run_cached("BEGIN IMMEDIATE")
                .map_err(sql_err(&self.path, "write an event"))?;
        }
        let mut first = true;
        let written = self.write_rows(record, own, &mut first).and_then(|()| {
            if own {
                self.run_cached("COMMIT")
            } else {
                Ok(())
            }
        });
        if let Err(source) = written {
            // Half-way, or a transaction of its own: roll back what it holds
            // (nothing if SQLite rolled it back already). In a batch that is the
            // whole batch, which `commit_batch` then refuses.
            if (own || !first) && !self.conn.is_autocommit() {
                let _ = self.run_cached("ROLLBACK");
            }
            // Half-way (even if that ROLLBACK could not run: the commit must
            // not keep the half), or rolled back by SQLite: the batch is lost.
            if !own && (!first || self.conn.is_autocommit()) {
                self.broken = true;
            }
            return Err(sql_err(&self.path, "write an event")(source));
        }
        self.last_seq = record.seq;
        if own {
            // Committed with its row.
            self.durable_seq = record.seq;
        }
        Ok(())
    }

    /// Runs `sql`, a statement without parameters, compiled once.
    fn run_cached(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([]).map(drop)
    }

    /// The statements of [`Self::append`]: the row, what it supersedes, its
    /// `active_bans` change, and (`meta`: not in a batch) the last sequence number.
    /// `first` stays true until the first statement (the row) is written.
    fn write_rows(&self, record: &Record, meta: bool, first: &mut bool) -> rusqlite::Result<()> {
        let e = &record.event;
        let (seq, jail, ip) = (sql_int(record.seq), e.jail.as_str(), e.ip.to_string());
        self.conn
            .prepare_cached(
                "INSERT INTO events (seq, epoch, id, node, jail, action, ip, time_ms, \
                 accepted_ms, expires_ms, origin, peer, credential, reported_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL, ?13)",
            )?
            .execute(params![
                seq,
                self.epoch_text.as_str(),
                e.id.to_string(),
                e.node.as_str(),
                jail,
                e.action.as_str(),
                ip,
                sql_int(e.time_ms),
                sql_int(record.accepted_ms),
                record.expires_ms.map(sql_int),
                if record.legacy { "legacy" } else { "native" },
                record.peer.as_str(),
                record.reported_by.column(),
            ])?;
        *first = false;
        #[cfg(test)]
        if self.fail_half_way {
            return Err(sqlite_failure(
                rusqlite::ffi::SQLITE_IOERR,
                "injected failure after the row",
            ));
        }
        // The row this one supersedes (the last one of its (jail, address); those
        // before it were queued when it was appended).
        self.conn
            .prepare_cached(
                "INSERT OR IGNORE INTO superseded (seq) SELECT seq FROM events \
                 WHERE jail = ?1 AND ip = ?2 AND seq < ?3 ORDER BY seq DESC LIMIT 1",
            )?
            .execute(params![jail, ip, seq])?;
        // A ban replaces its (jail, address)'s row, an unban deletes it. Not one
        // INSERT OR REPLACE: a statement that may delete a row and then abort
        // (its NOT NULL) keeps a statement journal, page copies that cost about a
        // tenth of the publisher's work per event. The DELETE also takes a row
        // with this event's seq, which only a file edited by hand could hold
        // (INSERT OR REPLACE took it too), so that the INSERT breaks no
        // constraint (`append` checked expires_ms).
        self.conn
            .prepare_cached("DELETE FROM active_bans WHERE (jail = ?1 AND ip = ?2) OR seq = ?3")?
            .execute(params![jail, ip, seq])?;
        if e.action == Action::Ban {
            self.conn
                .prepare_cached(
                    "INSERT INTO active_bans (seq, jail, ip, expires_ms) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![seq, jail, ip, record.expires_ms.map(sql_int)])?;
        }
        if meta {
            self.write_last_seq(record.seq)?;
        }
        Ok(())
    }

    /// Writes `seq` as `meta`'s last sequence number.
    fn write_last_seq(&self, seq: u64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_seq'")?
            .execute([sql_int(seq)])
            .map(drop)
    }

    /// Calls `f` with every row kept, in sequence order; returns how many rows were
    /// skipped as invalid (each logged).
    pub fn for_each(&self, mut f: impl FnMut(Record)) -> Result<usize, LedgerError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM events e ORDER BY e.seq"))
            .map_err(self.sql("read the events"))?;
        let mut rows = stmt.query([]).map_err(self.sql("read the events"))?;
        let mut skipped = 0;
        while let Some(row) = rows.next().map_err(self.sql("read the events"))? {
            match record(row).map_err(self.sql("read an event"))? {
                Ok(r) => f(r),
                Err(why) => {
                    skipped += 1;
                    tracing::warn!(path = %self.path.display(), why, "ledger row skipped");
                }
            }
        }
        Ok(skipped)
    }

    /// The row with sequence number `seq` if it still describes the cluster's state
    /// at `now_ms`: kept, valid, not superseded by a later row of the same (jail,
    /// address), and (a ban) not expired.
    pub fn current(&self, seq: u64, now_ms: u64) -> Result<Option<Record>, LedgerError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events e WHERE e.seq = ?1 \
                 AND (e.action = 'unban' OR e.expires_ms > ?2) AND NOT {SUPERSEDED}"
            ))
            .map_err(self.sql("read an event"))?;
        let row = stmt
            .query_row([sql_int(seq), sql_int(now_ms)], record)
            .optional()
            .map_err(self.sql("read an event"))?;
        count_steps(&self.steps, &stmt);
        Ok(match row {
            Some(Ok(r)) => Some(r),
            Some(Err(why)) => {
                tracing::warn!(path = %self.path.display(), why, "ledger row skipped");
                None
            }
            None => None,
        })
    }

    /// How many bans are active at `now_ms` (unexpired, not superseded).
    pub fn active_bans(&self, now_ms: u64) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM active_bans WHERE expires_ms > ?1",
                [sql_int(now_ms)],
                |r| r.get(0),
            )
            .map_err(self.sql("count the active bans"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One snapshot page: the active bans at `now_ms` with a sequence number above
    /// `cursor`, of `jails` (all when empty), in sequence order, as many as fit in a
    /// message. `seq` is the page's [`SnapshotPage::seq`] (the last broadcast).
    /// `next` is where the next page starts when more may follow: after the last
    /// ban of a full page, or after the last row looked at when the page looked at
    /// [`SNAPSHOT_SCAN`] rows (a page may then hold few bans, or none).
    pub fn snapshot_page(
        &self,
        jails: &[JailName],
        cursor: Option<u64>,
        now_ms: u64,
        seq: u64,
    ) -> Result<SnapshotPage, LedgerError> {
        let wanted: HashSet<&str> = jails.iter().map(JailName::as_str).collect();
        let after = cursor.unwrap_or(0);
        let mut page = SnapshotPage::new(self.epoch, seq);
        // With a jail filter, start at the first ban of those jails past the
        // cursor (one index probe per jail); if there is none, this is the end.
        let mut from = after;
        if !wanted.is_empty() {
            let mut probe = self
                .conn
                .prepare_cached("SELECT min(seq) FROM active_bans WHERE jail = ?1 AND seq > ?2")
                .map_err(self.sql("read a snapshot"))?;
            let mut first: Option<i64> = None;
            for jail in &wanted {
                let found: Option<i64> = probe
                    .query_row(params![jail, sql_int(after)], |r| r.get(0))
                    .map_err(self.sql("read a snapshot"))?;
                first = match (first, found) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            count_steps(&self.steps, &probe);
            match first.and_then(|s| u64::try_from(s).ok()) {
                Some(s) => from = s.saturating_sub(1).max(after),
                None => return Ok(page),
            }
        }
        let mut scan = self
            .conn
            .prepare_cached(
                "SELECT seq, jail, expires_ms FROM active_bans WHERE seq > ?1 \
                 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.sql("read a snapshot"))?;
        let mut fetch = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM events e WHERE e.seq = ?1"))
            .map_err(self.sql("read a snapshot"))?;
        let filled = self.fill_page(&mut page, &mut scan, &mut fetch, &wanted, from, now_ms);
        count_steps(&self.steps, &scan);
        count_steps(&self.steps, &fetch);
        filled.map_err(self.sql("read a snapshot"))?;
        Ok(page)
    }

    /// Fills `page` from the rows of `active_bans` after `from` (see
    /// [`Self::snapshot_page`]).
    fn fill_page(
        &self,
        page: &mut SnapshotPage,
        scan: &mut Statement<'_>,
        fetch: &mut Statement<'_>,
        wanted: &HashSet<&str>,
        from: u64,
        now_ms: u64,
    ) -> rusqlite::Result<()> {
        let limit = i64::try_from(SNAPSHOT_SCAN).unwrap_or(i64::MAX);
        let mut rows = scan.query(params![sql_int(from), limit])?;
        let mut looked = 0;
        let mut last = from;
        while let Some(row) = rows.next()? {
            looked += 1;
            let row_seq: i64 = row.get(0)?;
            let jail: String = row.get(1)?;
            let expires_ms: i64 = row.get(2)?;
            last = u64::try_from(row_seq).unwrap_or(last);
            if expires_ms <= sql_int(now_ms)
                || (!wanted.is_empty() && !wanted.contains(jail.as_str()))
            {
                continue;
            }
            let r = match fetch.query_row([row_seq], record).optional()? {
                Some(Ok(r)) => r,
                Some(Err(why)) => {
                    tracing::warn!(path = %self.path.display(), why, "ledger row skipped");
                    continue;
                }
                // Pruned meanwhile (it expired).
                None => continue,
            };
            let ban = ActiveBan {
                seq: r.seq,
                expires_ms: r.expires_ms.unwrap_or(0),
                event: r.event,
            };
            if page.try_push(ban).is_err() {
                // The page is full: the next one starts after the last ban in it.
                page.next = page.bans.last().map(|b| b.seq);
                return Ok(());
            }
        }
        if looked == SNAPSHOT_SCAN {
            page.next = Some(last);
        }
        Ok(())
    }

    /// Deletes at most `batch` rows that no longer matter at `now_ms`: expired bans,
    /// rows superseded by a later row of the same (jail, address), and unbans older
    /// than `ban_time_ms`, in one transaction. Each is found through an index or
    /// the `superseded` queue: the cost is that of the rows deleted, not of the
    /// ledger's size. The last sequence number is kept in `meta`, so pruning its
    /// row never lets a sequence number be used twice.
    pub fn prune(
        &mut self,
        now_ms: u64,
        ban_time_ms: u64,
        batch: usize,
    ) -> Result<Pruned, LedgerError> {
        let now = sql_int(now_ms);
        let unbans_before = sql_int(now_ms.saturating_sub(ban_time_ms));
        let tx = self
            .conn
            .transaction()
            .map_err(sql_err(&self.path, "prune"))?;
        let steps = &self.steps;
        let mut left = i64::try_from(batch).unwrap_or(i64::MAX);
        let mut deleted = 0;
        let mut more = false;
        let run = |sql: &str, args: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<usize> {
            let mut stmt = tx.prepare_cached(sql)?;
            let n = stmt.execute(args)?;
            count_steps(steps, &stmt);
            Ok(n)
        };
        let pruned = (|| {
            // 1. Rows superseded by a later row of their (jail, address).
            let queue = "SELECT seq FROM superseded ORDER BY seq LIMIT ?1";
            deleted += run(
                &format!("DELETE FROM events WHERE seq IN ({queue})"),
                &[&left],
            )?;
            let taken = run(
                &format!("DELETE FROM superseded WHERE seq IN ({queue})"),
                &[&left],
            )?;
            more |= taken as i64 >= left;
            left -= taken as i64;
            // 2. Expired bans, and their active_bans rows.
            if left > 0 {
                let gone = run(
                    "DELETE FROM active_bans WHERE seq IN (SELECT seq FROM active_bans \
                     WHERE expires_ms <= ?1 ORDER BY expires_ms LIMIT ?2)",
                    &[&now, &left],
                )?;
                more |= gone as i64 >= left;
                let n = run(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events \
                     WHERE action = 'ban' AND expires_ms <= ?1 ORDER BY expires_ms LIMIT ?2)",
                    &[&now, &left],
                )?;
                more |= n as i64 >= left;
                deleted += n;
                left -= n as i64;
            }
            // 3. Unbans older than ban_time.
            if left > 0 {
                let n = run(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events \
                     WHERE action = 'unban' AND accepted_ms <= ?1 ORDER BY accepted_ms LIMIT ?2)",
                    &[&unbans_before, &left],
                )?;
                more |= n as i64 >= left;
                deleted += n;
                left -= n as i64;
            }
            more |= left <= 0;
            Ok(())
        })()
        .and_then(|()| tx.commit());
        pruned.map_err(sql_err(&self.path, "prune"))?;
        Ok(Pruned { deleted, more })
    }

    /// The SQLite virtual machine steps run so far by snapshots, pruning and
    /// [`Self::current`]: a measure of the rows they examined that, unlike time,
    /// does not depend on the machine. For tests and metrics.
    pub fn vm_steps(&self) -> u64 {
        self.steps.get()
    }

    /// How many rows the ledger holds.
    pub fn rows(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .map_err(self.sql("count the events"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Makes every later write fail (`true`), as a full or read-only disk would, or
    /// work again (`false`).
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, fail: bool) {
        self.conn
            .pragma_update(None, "query_only", fail)
            .expect("set query_only");
    }
}

/// Fails with [`LedgerError::Corrupt`] when `path` exists, is not empty and does not
/// start with SQLite's header.
fn check_header(path: &Path) -> Result<(), LedgerError> {
    match f2b_common::state_file::looks_like_sqlite(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(LedgerError::Corrupt {
            path: path.to_owned(),
            detail: "not a SQLite database (no SQLite header)".into(),
        }),
        Err(source) => Err(LedgerError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Moves the ledger and its `-wal`/`-shm` aside (see
/// [`f2b_common::state_file::quarantine`]); returns its new name.
fn quarantine(path: &Path, now: SystemTime) -> Result<PathBuf, LedgerError> {
    f2b_common::state_file::quarantine(path, now).map_err(|e| LedgerError::Quarantine {
        path: e.path,
        to: e.to,
        source: e.source,
    })
}

pub mod inspect;

#[cfg(test)]
mod tests;
