//! What survives a restart (`[monitor] state_dir`): the position in the log and
//! the events read but not yet answered by the publisher.
//!
//! Three files per monitor, named after the node and a hash of the log path (so
//! monitors of different nodes or logs can share a directory):
//!
//! - `<key>.position`: `{"files":[{"dev":..,"ino":..,"offset":..}],"info_seen":..}`,
//!   where to read again from: before the first line whose verdict or event is
//!   not final yet (an Unban still held by [`crate::stop`], an event not yet in the
//!   queue file), else after the last line read; and whether the log had shown
//!   INFO lines. Replaced atomically (write, fsync, rename, fsync of the
//!   directory).
//! - `<key>.queue`: a journal, one line per change: `+<report>` when an event is
//!   queued (the protocol's own `report` request, so the event keeps its id and a
//!   resend is recognised by the publisher as a duplicate), `-<id>` when the
//!   publisher answered it. On start the events with no answer are sent first, in
//!   order. Queued events are fsynced before the position moves past their lines
//!   ([`StateStore::add_all`]), so an event not yet answered survives a crash of
//!   the machine; answers are not (an answer lost is a resend the publisher
//!   recognises). The file is emptied whenever nothing is pending and rewritten
//!   with only the pending events when it grows large. The monitor keeps at most
//!   `[monitor] queue_size` events pending.
//! - `<key>.lock`: held with `flock(2)` by the monitor using the files (the lock
//!   goes with the process, so a crash or a reboot leaves no stale lock); holds
//!   its process id, for the error message of a second monitor.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use f2b_proto::{Event, EventId, NodeName, Request};
use nix::fcntl::{Flock, FlockArg};

use crate::tail::FilePos;

/// The queue file is compacted when it grows beyond this.
const COMPACT_AT: u64 = 1024 * 1024;

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is held by another monitor{}", .pid.map(|p| format!(" (process {p})")).unwrap_or_default())]
    Locked { path: PathBuf, pid: Option<u32> },
}

/// What a previous run left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// `None` on the first start: begin at the end of the log.
    pub position: Option<Vec<FilePos>>,
    /// Whether the log had shown INFO lines (see [`crate::stop`]).
    pub info_seen: bool,
    /// Events read and never answered, oldest first.
    pub pending: Vec<Event>,
}

/// The open state files.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    position_path: PathBuf,
    queue_path: PathBuf,
    /// Held while the store is open; released by the kernel when the process
    /// ends, however it ends.
    _lock: Flock<File>,
    queue: File,
    queue_len: u64,
    /// Ids and journal lines of the events not yet answered.
    pending: VecDeque<(EventId, String)>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The file-name key of a monitor: its node name and a hash of its log path.
pub fn key(node: &NodeName, log_path: &Path) -> String {
    // FNV-1a: stable across versions and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in log_path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("monitor-{node}-{h:016x}")
}

impl StateStore {
    /// Creates `dir` if needed, takes the lock, reads what a previous run left and
    /// compacts the queue file. Fails with [`StateError::Locked`] while another
    /// monitor uses the same files.
    pub fn open(
        dir: &Path,
        node: &NodeName,
        log_path: &Path,
    ) -> Result<(StateStore, Saved), StateError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = key(node, log_path);
        let lock = take_lock(&dir.join(format!("{key}.lock")))?;
        let position_path = dir.join(format!("{key}.position"));
        let queue_path = dir.join(format!("{key}.queue"));
        let (position, info_seen) = read_position(&position_path)?;
        let pending = read_queue(&queue_path)?;
        // Rewrite the journal with only what is pending.
        let text = journal_text(&pending);
        replace(dir, &queue_path, text.as_bytes())?;
        let queue = OpenOptions::new()
            .append(true)
            .open(&queue_path)
            .map_err(io_err(&queue_path))?;
        let events = pending
            .iter()
            .filter_map(|(_, line)| decode_add(line))
            .collect();
        let store = StateStore {
            dir: dir.to_owned(),
            position_path,
            queue_path,
            _lock: lock,
            queue,
            queue_len: text.len() as u64,
            pending,
        };
        Ok((
            store,
            Saved {
                position,
                info_seen,
                pending: events,
            },
        ))
    }

    /// How many events wait for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records a queued event (not synced: see [`StateStore::add_all`]).
    pub fn add(&mut self, event: &Event) -> Result<(), StateError> {
        let line = format!(
            "+{}",
            String::from_utf8_lossy(&Request::Report(event.clone()).encode())
        );
        self.append(&line)?;
        self.pending.push_back((event.id, line));
        Ok(())
    }

    /// Records queued events and syncs the journal to the disk, so they survive a
    /// crash of the machine.
    pub fn add_all(&mut self, events: &[Event]) -> Result<(), StateError> {
        for e in events {
            self.add(e)?;
        }
        if !events.is_empty() {
            self.queue.sync_data().map_err(io_err(&self.queue_path))?;
        }
        Ok(())
    }

    /// Records that the publisher answered `id` (ACK, or a NAK that dropped it).
    pub fn done(&mut self, id: EventId) -> Result<(), StateError> {
        let Some(i) = self.pending.iter().position(|(p, _)| *p == id) else {
            return Ok(());
        };
        self.pending.remove(i);
        if self.pending.is_empty() {
            self.queue.set_len(0).map_err(io_err(&self.queue_path))?;
            self.queue_len = 0;
            return Ok(());
        }
        self.append(&format!("-{id}"))?;
        if self.queue_len > COMPACT_AT {
            self.compact()?;
        }
        Ok(())
    }

    /// Saves where to read the log again from, and whether it had shown INFO
    /// lines; on the disk when this returns.
    pub fn save_position(&mut self, files: &[FilePos], info_seen: bool) -> Result<(), StateError> {
        let files: Vec<serde_json::Value> = files
            .iter()
            .map(|f| serde_json::json!({"dev": f.dev, "ino": f.ino, "offset": f.offset}))
            .collect();
        let text = serde_json::json!({ "files": files, "info_seen": info_seen }).to_string();
        replace(&self.dir, &self.position_path, text.as_bytes())
    }

    fn append(&mut self, line: &str) -> Result<(), StateError> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.queue
            .write_all(&buf)
            .map_err(io_err(&self.queue_path))?;
        self.queue_len += buf.len() as u64;
        Ok(())
    }

    fn compact(&mut self) -> Result<(), StateError> {
        let text = journal_text(&self.pending);
        replace(&self.dir, &self.queue_path, text.as_bytes())?;
        self.queue = OpenOptions::new()
            .append(true)
            .open(&self.queue_path)
            .map_err(io_err(&self.queue_path))?;
        self.queue_len = text.len() as u64;
        Ok(())
    }
}

/// The journal holding only `pending`.
fn journal_text(pending: &VecDeque<(EventId, String)>) -> String {
    let mut text = String::new();
    for (_, line) in pending {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// Replaces `path` in `dir` with `bytes`, durably: write a temporary file, sync
/// it, rename it over `path`, sync the directory.
fn replace(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Takes the lock file with `flock(2)`, unless another process holds it.
fn take_lock(path: &Path) -> Result<Flock<File>, StateError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let me = std::process::id();
            lock.set_len(0)
                .and_then(|()| lock.rewind())
                .and_then(|()| writeln!(*lock, "{me}"))
                .map_err(io_err(path))?;
            Ok(lock)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            Err(StateError::Locked {
                path: path.to_owned(),
                pid,
            })
        }
        Err((_, errno)) => Err(io_err(path)(io::Error::from(errno))),
    }
}

fn read_position(path: &Path) -> Result<(Option<Vec<FilePos>>, bool), StateError> {
    // Read as bytes: a damaged file (not UTF-8) is an unreadable position like any
    // other, to be discarded, not a reason to give up the whole state.
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, false)),
        Err(e) => return Err(io_err(path)(e)),
    };
    let parsed = serde_json::from_str::<serde_json::Value>(&text).ok();
    let files = parsed
        .as_ref()
        .and_then(|v| v.get("files"))
        .and_then(|f| f.as_array())
        .map(|files| {
            files
                .iter()
                .filter_map(|f| {
                    Some(FilePos {
                        dev: f.get("dev")?.as_u64()?,
                        ino: f.get("ino")?.as_u64()?,
                        offset: f.get("offset")?.as_u64()?,
                    })
                })
                .collect::<Vec<_>>()
        });
    let info_seen = parsed
        .as_ref()
        .and_then(|v| v.get("info_seen"))
        .and_then(|i| i.as_bool())
        .unwrap_or(false);
    match files {
        Some(files) => Ok((Some(files), info_seen)),
        None => {
            tracing::warn!(path = %path.display(), "unreadable saved position, starting at the end of the log");
            Ok((None, false))
        }
    }
}

fn decode_add(line: &str) -> Option<Event> {
    match Request::decode(line.strip_prefix('+')?.as_bytes()).ok()? {
        Request::Report(e) => Some(e),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

fn read_queue(path: &Path) -> Result<VecDeque<(EventId, String)>, StateError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VecDeque::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut pending: VecDeque<(EventId, String)> = VecDeque::new();
    let mut bad = 0usize;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io_err(path))?;
        let Ok(line) = String::from_utf8(line) else {
            bad += 1;
            continue;
        };
        if let Some(e) = decode_add(&line) {
            pending.push_back((e.id, line));
        } else if let Some(id) = line
            .strip_prefix('-')
            .and_then(|i| i.parse::<EventId>().ok())
        {
            pending.retain(|(p, _)| *p != id);
        } else if !line.is_empty() {
            // A line cut by a crash, or damage: skip it.
            bad += 1;
        }
    }
    if bad > 0 {
        tracing::warn!(path = %path.display(), lines = bad, "skipped unreadable lines of the saved queue");
    }
    Ok(pending)
}
