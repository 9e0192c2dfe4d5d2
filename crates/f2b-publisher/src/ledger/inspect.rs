//! Reading the ledger from another process (`f2b-publisher bans` and `status`)
//! while the daemon may be running.
//!
//! [`LedgerView::open`] opens the file read-only (`SQLITE_OPEN_READ_ONLY` and
//! `PRAGMA query_only`): it never creates, writes, upgrades or recovers anything,
//! and WAL mode lets it read beside the daemon, seeing the last committed state.
//! When there is no `-wal` file (the daemon is stopped: it removes it when it
//! stops cleanly), the file is read as immutable, so that not even SQLite's
//! `-wal` and `-shm` files are created beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use f2b_proto::Epoch;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{record, stored_last_seq, Record, COLUMNS, LEDGER_FILE, SCHEMA_VERSION};

/// Why the ledger cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    #[error("no ledger at {path}: is [publisher] state_dir right, has the publisher run?")]
    Missing { path: PathBuf },
    #[error(
        "cannot read the ledger {path}: permission denied (run this as root or as the \
         publisher's user: the state directory and the ledger are private to it)"
    )]
    Permission {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the ledger {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a fail2ban-cluster ledger ({detail})")]
    NotALedger { path: PathBuf, detail: String },
    #[error(
        "the ledger {path} has schema version {found}; this f2b-publisher reads version \
         {supported}: {hint}"
    )]
    Schema {
        path: PathBuf,
        found: i64,
        supported: i64,
        hint: &'static str,
    },
    #[error("ledger {path}: cannot {what}")]
    Sql {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// A row of `f2b-publisher bans`: an event the ledger keeps, and whether it is an
/// active ban at the time asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub record: Record,
    pub active: bool,
}

/// What `f2b-publisher bans` lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only addresses in this network (a single address is a /32 or /128).
    pub ip: Option<ipnet::IpNet>,
    pub jail: Option<String>,
    pub node: Option<String>,
    /// Every row kept (recent unbans, expired or superseded bans not pruned yet),
    /// not only the active bans.
    pub all: bool,
}

/// The ledger's numbers, for `f2b-publisher status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub path: PathBuf,
    pub epoch: Epoch,
    pub last_seq: u64,
    pub rows: u64,
    pub active: u64,
    pub active_by_jail: BTreeMap<String, u64>,
    pub active_by_node: BTreeMap<String, u64>,
}

/// A read-only view of the ledger in a state directory.
#[derive(Debug)]
pub struct LedgerView {
    conn: Connection,
    path: PathBuf,
}

fn io_err(path: &Path, source: std::io::Error) -> InspectError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        InspectError::Permission {
            path: path.to_owned(),
            source,
        }
    } else {
        InspectError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// `path` as a SQLite URI with `query` (the characters URIs reserve escaped).
fn uri(path: &Path, query: &str) -> String {
    let mut s = String::from("file:");
    for c in path.display().to_string().chars() {
        match c {
            '%' => s.push_str("%25"),
            '?' => s.push_str("%3f"),
            '#' => s.push_str("%23"),
            c => s.push(c),
        }
    }
    s.push('?');
    s.push_str(query);
    s
}

impl LedgerView {
    /// Opens `state_dir/ledger.sqlite3` read-only (see the module's documentation).
    pub fn open(state_dir: &Path) -> Result<LedgerView, InspectError> {
        let path = state_dir.join(LEDGER_FILE);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(InspectError::NotALedger {
                    path,
                    detail: "not a file".into(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(InspectError::Missing { path })
            }
            Err(e) => return Err(io_err(&path, e)),
        }
        match f2b_common::state_file::looks_like_sqlite(&path) {
            Ok(true) => {}
            Ok(false) => {
                return Err(InspectError::NotALedger {
                    path,
                    detail: "no SQLite header".into(),
                })
            }
            Err(e) => return Err(io_err(&path, e)),
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        // Without a -wal file no writer has the ledger open (the daemon keeps one
        // while it runs, and removes it when it stops cleanly): read it as
        // immutable, which creates no -wal or -shm file beside it (files that,
        // made by root, the daemon's own user might not be able to open).
        let query = if wal_path(&path).exists() {
            "mode=ro"
        } else {
            "mode=ro&immutable=1"
        };
        let conn = Connection::open_with_flags(uri(&path, query), flags).map_err(|source| {
            InspectError::Sql {
                path: path.clone(),
                what: "open it read-only",
                source,
            }
        })?;
        LedgerView::checked(conn, &path)
    }

    /// Refuses writes on `conn` and checks the schema version.
    fn checked(conn: Connection, path: &Path) -> Result<LedgerView, InspectError> {
        let sql = |what: &'static str| {
            let path = path.to_owned();
            move |source| InspectError::Sql { path, what, source }
        };
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(sql("set the busy timeout"))?;
        conn.pragma_update(None, "query_only", true)
            .map_err(sql("make the connection read-only"))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql("read the schema version"))?;
        let hint = match version {
            SCHEMA_VERSION => None,
            0 => {
                return Err(InspectError::NotALedger {
                    path: path.to_owned(),
                    detail: "no schema version".into(),
                })
            }
            v if v < SCHEMA_VERSION => {
                Some("start this version of f2b-publisher once: it upgrades the ledger in place")
            }
            _ => Some("use the f2b-publisher that wrote it (a newer one)"),
        };
        if let Some(hint) = hint {
            return Err(InspectError::Schema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
                hint,
            });
        }
        Ok(LedgerView {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> InspectError + '_ {
        move |source| InspectError::Sql {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// The rows `filter` asks for at `now_ms`, in sequence order: the active bans
    /// (not expired, not superseded), or with `filter.all` every row kept. Rows
    /// that are not valid events (edited by hand) are skipped.
    pub fn bans(&self, filter: &Filter, now_ms: u64) -> Result<Vec<Kept>, InspectError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let from = if filter.all {
            "events e LEFT JOIN active_bans a ON a.seq = e.seq AND a.expires_ms > ?1"
        } else {
            "active_bans a JOIN events e ON e.seq = a.seq AND a.expires_ms > ?1"
        };
        let query = format!(
            "SELECT {COLUMNS}, a.seq IS NOT NULL FROM {from} \
             WHERE (?2 IS NULL OR e.jail = ?2) AND (?3 IS NULL OR e.node = ?3) ORDER BY e.seq"
        );
        let mut stmt = self
            .conn
            .prepare(&query)
            .map_err(self.sql("list the bans"))?;
        let rows = stmt
            .query_map(
                rusqlite::params![now, filter.jail.as_deref(), filter.node.as_deref()],
                |row| Ok((record(row)?, row.get::<_, bool>(12)?)),
            )
            .map_err(self.sql("list the bans"))?;
        let mut out = Vec::new();
        for row in rows {
            let (record, active) = row.map_err(self.sql("list the bans"))?;
            let Ok(record) = record else { continue };
            if let Some(net) = &filter.ip {
                if !net.contains(&record.event.ip) {
                    continue;
                }
            }
            out.push(Kept { record, active });
        }
        Ok(out)
    }

    /// The epoch, the last sequence number and the active bans counted by jail
    /// and node, at `now_ms`.
    pub fn summary(&self, now_ms: u64) -> Result<Summary, InspectError> {
        let epoch: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql("read the epoch"))?;
        let epoch = epoch
            .as_deref()
            .and_then(|e| e.parse::<Epoch>().ok())
            .ok_or_else(|| InspectError::NotALedger {
                path: self.path.clone(),
                detail: "no valid epoch in meta".into(),
            })?;
        let last_seq =
            stored_last_seq(&self.conn, &self.path).map_err(|e| InspectError::NotALedger {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
        let rows: i64 = self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .map_err(self.sql("count the rows"))?;
        let count = |column: &str| -> Result<BTreeMap<String, u64>, InspectError> {
            let query = format!(
                "SELECT e.{column}, count(*) FROM active_bans a JOIN events e ON e.seq = a.seq \
                 WHERE a.expires_ms > ?1 GROUP BY e.{column}"
            );
            let mut stmt = self
                .conn
                .prepare(&query)
                .map_err(self.sql("count the active bans"))?;
            let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(self.sql("count the active bans"))?;
            let mut out = BTreeMap::new();
            for row in rows {
                let (k, n) = row.map_err(self.sql("count the active bans"))?;
                out.insert(k, u64::try_from(n).unwrap_or(0));
            }
            Ok(out)
        };
        let active_by_jail = count("jail")?;
        let active_by_node = count("node")?;
        Ok(Summary {
            path: self.path.clone(),
            epoch,
            last_seq,
            rows: u64::try_from(rows).unwrap_or(0),
            active: active_by_jail.values().sum(),
            active_by_jail,
            active_by_node,
        })
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}
