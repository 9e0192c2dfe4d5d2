//! What survives a restart (`[monitor] state_dir`): the position in the log and
//! the events read but not yet answered by the publisher.
//!
//! Three files per monitor, named after the node and a hash of the log path (so
//! monitors of different nodes or logs can share a directory):
//!
//! - `<key>.position`: `{"files":[{"dev":..,"ino":..,"offset":..}]}`, the
//!   [`Tailer::position`](crate::tail::Tailer::position) after the last batch whose
//!   events are all in the queue file; replaced atomically (write, rename).
//! - `<key>.queue`: a journal, one line per change: `+<report>` when an event is
//!   queued (the protocol's own `report` request, so the event keeps its id and a
//!   resend is recognised by the publisher as a duplicate), `-<id>` when the
//!   publisher answered it. On start the events with no answer are sent first, in
//!   order. The file is emptied whenever nothing is pending and rewritten with only
//!   the pending events when it grows large.
//! - `<key>.lock`: the process id of the monitor using the files.
//!
//! Writes are not fsynced: a crash of the monitor loses nothing, a crash of the
//! machine may lose the last writes.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use f2b_proto::{Event, EventId, NodeName, Request};

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
    #[error("{path} is held by another monitor (process {pid})")]
    Locked { path: PathBuf, pid: u32 },
}

/// What a previous run left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Saved {
    /// `None` on the first start: begin at the end of the log.
    pub position: Option<Vec<FilePos>>,
    /// Events read and never answered, oldest first.
    pub pending: Vec<Event>,
}

/// The open state files.
#[derive(Debug)]
pub struct StateStore {
    position_path: PathBuf,
    queue_path: PathBuf,
    lock_path: PathBuf,
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
    /// compacts the queue file.
    pub fn open(
        dir: &Path,
        node: &NodeName,
        log_path: &Path,
    ) -> Result<(StateStore, Saved), StateError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = key(node, log_path);
        let lock_path = dir.join(format!("{key}.lock"));
        take_lock(&lock_path)?;
        let position_path = dir.join(format!("{key}.position"));
        let queue_path = dir.join(format!("{key}.queue"));
        let opened = (|| {
            let position = read_position(&position_path)?;
            let pending = read_queue(&queue_path)?;
            // Rewrite the journal with only what is pending.
            let tmp = queue_path.with_extension("queue.tmp");
            let mut text = String::new();
            for (_, line) in &pending {
                text.push_str(line);
                text.push('\n');
            }
            std::fs::write(&tmp, &text).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &queue_path).map_err(io_err(&queue_path))?;
            let queue = OpenOptions::new()
                .append(true)
                .open(&queue_path)
                .map_err(io_err(&queue_path))?;
            let events = pending
                .iter()
                .filter_map(|(_, line)| decode_add(line))
                .collect();
            let store = StateStore {
                position_path: position_path.clone(),
                queue_path: queue_path.clone(),
                lock_path: lock_path.clone(),
                queue,
                queue_len: text.len() as u64,
                pending,
            };
            Ok((
                store,
                Saved {
                    position,
                    pending: events,
                },
            ))
        })();
        if opened.is_err() {
            let _ = std::fs::remove_file(&lock_path);
        }
        opened
    }

    /// How many events wait for an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Records a queued event.
    pub fn add(&mut self, event: &Event) -> Result<(), StateError> {
        let line = format!(
            "+{}",
            String::from_utf8_lossy(&Request::Report(event.clone()).encode())
        );
        self.append(&line)?;
        self.pending.push_back((event.id, line));
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

    /// Saves how far the log has been read.
    pub fn save_position(&mut self, files: &[FilePos]) -> Result<(), StateError> {
        let files: Vec<serde_json::Value> = files
            .iter()
            .map(|f| serde_json::json!({"dev": f.dev, "ino": f.ino, "offset": f.offset}))
            .collect();
        let text = serde_json::json!({ "files": files }).to_string();
        let tmp = self.position_path.with_extension("position.tmp");
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.position_path).map_err(io_err(&self.position_path))
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
        let tmp = self.queue_path.with_extension("queue.tmp");
        let mut text = String::new();
        for (_, line) in &self.pending {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&tmp, &text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &self.queue_path).map_err(io_err(&self.queue_path))?;
        self.queue = OpenOptions::new()
            .append(true)
            .open(&self.queue_path)
            .map_err(io_err(&self.queue_path))?;
        self.queue_len = text.len() as u64;
        Ok(())
    }
}

impl Drop for StateStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Takes the lock file, unless a live process other than this one holds it.
fn take_lock(path: &Path) -> Result<(), StateError> {
    let me = std::process::id();
    loop {
        match OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut f) => {
                return writeln!(f, "{me}").map_err(io_err(path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok());
                if let Some(pid) = holder {
                    if pid != me && Path::new(&format!("/proc/{pid}")).exists() {
                        return Err(StateError::Locked {
                            path: path.to_owned(),
                            pid,
                        });
                    }
                }
                // Stale (its process is gone) or unreadable: take it over.
                std::fs::remove_file(path).map_err(io_err(path))?;
            }
            Err(e) => return Err(io_err(path)(e)),
        }
    }
}

fn read_position(path: &Path) -> Result<Option<Vec<FilePos>>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
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
    match files {
        Some(files) => Ok(Some(files)),
        None => {
            tracing::warn!(path = %path.display(), "unreadable saved position, starting at the end of the log");
            Ok(None)
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
