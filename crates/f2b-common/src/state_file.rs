//! Files that hold a daemon's state (the publisher's ledger, the subscriber's
//! store): telling a damaged one from a sound one, and moving a damaged one aside so
//! the daemon can start afresh while the evidence is kept.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The first 16 bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Whether `path` is absent, empty or starts with SQLite's header. `Ok(false)`: it
/// exists, has content, and is not a SQLite database. An unreadable file is
/// `Ok(true)`: opening it with SQLite says why, better than this check could.
pub fn looks_like_sqlite(path: &Path) -> std::io::Result<bool> {
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(true);
    };
    let mut head = Vec::with_capacity(SQLITE_MAGIC.len());
    file.take(SQLITE_MAGIC.len() as u64)
        .read_to_end(&mut head)?;
    Ok(head.is_empty() || head.as_slice() == SQLITE_MAGIC)
}

/// Moving a damaged file aside failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot move {path} aside to {to}: {source}")]
pub struct QuarantineError {
    pub path: PathBuf,
    pub to: PathBuf,
    pub source: std::io::Error,
}

/// Moves `path` and its SQLite `-wal` and `-shm` files to
/// `<path>.corrupt-<unix seconds>` (with `.1`, `.2`... when that exists); returns the
/// new name of `path`. A `-wal` that cannot be moved is removed: a stale write-ahead
/// log beside a new database would be replayed into it.
pub fn quarantine(path: &Path, now: SystemTime) -> Result<PathBuf, QuarantineError> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = format!("{}.corrupt-{secs}", path.display());
    let mut to = PathBuf::from(&base);
    let mut n = 1;
    while to.exists() {
        to = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &to).map_err(|source| QuarantineError {
        path: path.to_owned(),
        to: to.clone(),
        source,
    })?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let side_to = PathBuf::from(format!("{}{suffix}", to.display()));
            if std::fs::rename(&side, &side_to).is_err() {
                std::fs::remove_file(&side).map_err(|source| QuarantineError {
                    path: side.clone(),
                    to: side_to,
                    source,
                })?;
            }
        }
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn header_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        assert!(looks_like_sqlite(&p).unwrap(), "absent");
        std::fs::write(&p, b"").unwrap();
        assert!(looks_like_sqlite(&p).unwrap(), "empty");
        std::fs::write(&p, b"SQLite format 3\0rest").unwrap();
        assert!(looks_like_sqlite(&p).unwrap());
        std::fs::write(&p, b"garbage garbage garbage").unwrap();
        assert!(!looks_like_sqlite(&p).unwrap());
    }

    #[test]
    fn quarantine_moves_the_file_and_its_wal() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let t = UNIX_EPOCH + Duration::from_secs(1000);
        std::fs::write(&p, b"x").unwrap();
        std::fs::write(dir.path().join("db-wal"), b"w").unwrap();
        let to = quarantine(&p, t).unwrap();
        assert_eq!(to, dir.path().join("db.corrupt-1000"));
        assert!(!p.exists() && to.exists());
        assert!(dir.path().join("db.corrupt-1000-wal").exists());
        std::fs::write(&p, b"y").unwrap();
        let again = quarantine(&p, t).unwrap();
        assert_eq!(again, dir.path().join("db.corrupt-1000.1"));
    }
}
