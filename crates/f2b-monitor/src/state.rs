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
//!   directory). A monitor that starts without one (its first start, or an
//!   unreadable file) saves where it decided to start, the end of the log (or
//!   no file, when the log does not exist yet: it will be read from its
//!   start), before it reads anything and before it logs `watching`: a crash at
//!   any later moment, even before the first event, resumes from there rather
//!   than from a later end of the log, which would skip the lines in between.
//! - `<key>.queue`: a journal, one line per change: `+<report>` when an event is
//!   queued (the protocol's own `report` request, so the event keeps its id and a
//!   resend is recognised by the publisher as a duplicate), `-<id>` when the
//!   publisher answered it. On start the events with no answer are sent first, in
//!   order. Queued events are fsynced before the position moves past their lines
//!   ([`StateStore::add_all`], or [`StateStore::write_all`] then
//!   [`StateStore::sync_queue`] when the report should not wait for the sync, or
//!   [`StateStore::prepare_sync`] when nothing else should wait for it either), so
//!   an event not yet answered survives a crash of the machine; answers are not (an answer lost is a resend the publisher
//!   recognises). The file is emptied whenever nothing is pending and rewritten
//!   with only the pending events when it grows large. The monitor keeps at most
//!   `[monitor] queue_size` events pending. After a failed write (a full disk)
//!   the events stay pending in memory, a partial line is cut off, and the next
//!   [`StateStore::add_all`] rewrites the journal whole; it returns `Ok` only
//!   when every pending event is on the disk, and the position is saved only
//!   after that.
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
    /// `None` on the first start: begin at the end of the log (and save that
    /// position at once, see the module docs).
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
    /// How many of the last `pending` events are not (known to be) on the disk:
    /// their write or its sync failed.
    unwritten: usize,
    /// Lines were written to the journal since its last sync.
    unsynced: bool,
    /// Journal writes so far: a sync made outside the lock ([`QueueSync`])
    /// clears `unsynced` only if no write came after its handle was taken.
    writes: u64,
    /// A write failed: the journal file may miss lines or end in a partial one,
    /// so it is rewritten whole (from `pending`) before anything is appended.
    rewrite: bool,
    /// Writes to fail, for the tests.
    #[cfg(test)]
    pub(crate) faults: Faults,
}

/// Failures to inject into the next writes (tests only): each count is how many
/// of the next journal writes or position saves fail with `ENOSPC`; a failing
/// journal append writes half of its bytes first, as a full disk may.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub journal: u32,
    pub position: u32,
    /// How many of the next journal syncs fail.
    pub sync: u32,
    /// The next journal sync waits for a message (or the sender's drop) first.
    pub sync_gate: Option<std::sync::mpsc::Receiver<()>>,
    /// The next position save waits for a message (or the sender's drop) before
    /// it writes anything: a test's window to see the state a crash would leave
    /// just before the save.
    pub position_gate: Option<std::sync::mpsc::Receiver<()>>,
}

#[cfg(test)]
impl Faults {
    fn take(n: &mut u32) -> io::Result<()> {
        if *n == 0 {
            return Ok(());
        }
        *n -= 1;
        Err(io::Error::from(nix::errno::Errno::ENOSPC))
    }
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
            unwritten: 0,
            unsynced: false,
            writes: 0,
            rewrite: false,
            #[cfg(test)]
            faults: Faults::default(),
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
        self.push(event);
        self.flush(false)
    }

    /// Records queued events and syncs the journal to the disk, so they survive a
    /// crash of the machine.
    ///
    /// `Ok` means every pending event is on the disk, also those of an earlier
    /// call that failed (a full disk): each call first retries them (rewriting
    /// the journal whole after a failed write), so a position saved after an `Ok`
    /// is never past the line of an event that is neither on the disk nor
    /// answered. On an error the events stay pending in memory, and
    /// [`StateStore::done`] for them is fine.
    pub fn add_all(&mut self, events: &[Event]) -> Result<(), StateError> {
        self.write_all(events)?;
        self.sync_queue()
    }

    /// Records queued events in the journal without syncing it: a crash of the
    /// monitor keeps them (they are in the kernel's cache), a crash of the machine
    /// may not. [`StateStore::sync_queue`] then makes them durable, and only then
    /// may the position move past their lines. On an error, as
    /// [`StateStore::add_all`].
    pub fn write_all(&mut self, events: &[Event]) -> Result<(), StateError> {
        for e in events {
            self.push(e);
        }
        self.flush(false)
    }

    /// Syncs the journal: `Ok` means every pending event is on the disk (written
    /// now if an earlier write failed), as after [`StateStore::add_all`].
    pub fn sync_queue(&mut self) -> Result<(), StateError> {
        self.flush(true)
    }

    /// [`StateStore::sync_queue`] in two steps, so that the slow one runs
    /// without the store: this writes what is pending and not on the disk yet
    /// (rewriting the journal after a failed write) and returns the sync still
    /// to make, `None` if none is needed. [`QueueSync::sync`] makes it (a
    /// sync takes from a fraction of a millisecond to several on a busy disk,
    /// and the next event's write and the publisher's answers need the store
    /// meanwhile); then [`StateStore::synced`] or [`StateStore::sync_failed`]
    /// records its outcome. Once it is `Ok`, every event pending when this was
    /// called is on the disk.
    pub fn prepare_sync(&mut self) -> Result<Option<QueueSync>, StateError> {
        self.flush(false)?;
        if !self.unsynced {
            return Ok(None);
        }
        let file = self.queue.try_clone().map_err(io_err(&self.queue_path))?;
        Ok(Some(QueueSync {
            file,
            path: self.queue_path.clone(),
            writes: self.writes,
            #[cfg(test)]
            hold: Hold {
                gate: self.faults.sync_gate.take(),
                fault: Faults::take(&mut self.faults.sync).err(),
            },
        }))
    }

    /// Records a [`QueueSync`] made: the journal is clean unless it was
    /// written since the sync was prepared.
    pub fn synced(&mut self, synced: Synced) {
        if self.writes == synced.0 {
            self.unsynced = false;
        }
    }

    /// Records a [`QueueSync`] failed: whether the lines reached the disk is
    /// unknown, so the journal is rewritten whole before anything else is
    /// appended (as after a failed [`StateStore::sync_queue`]).
    pub fn sync_failed(&mut self) {
        self.rewrite = true;
    }

    fn push(&mut self, event: &Event) {
        let line = format!(
            "+{}",
            String::from_utf8_lossy(&Request::Report(event.clone()).encode())
        );
        self.pending.push_back((event.id, line));
        self.unwritten += 1;
    }

    /// Puts the pending events not on the disk yet there: appended, or after a
    /// failed write by rewriting the journal; synced if `sync`.
    fn flush(&mut self, sync: bool) -> Result<(), StateError> {
        if self.rewrite {
            return self.compact();
        }
        if self.unwritten > 0 {
            let first = self.pending.len().saturating_sub(self.unwritten);
            let mut buf = Vec::new();
            for (_, line) in self.pending.iter().skip(first) {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
            }
            self.append(&buf)?;
            self.unwritten = 0;
            self.unsynced = true;
            self.writes += 1;
        }
        if sync && self.unsynced {
            #[cfg(test)]
            if let Some(gate) = self.faults.sync_gate.take() {
                let _ = gate.recv();
            }
            #[cfg(test)]
            Faults::take(&mut self.faults.sync).map_err(|e| {
                self.rewrite = true;
                io_err(&self.queue_path)(e)
            })?;
            if let Err(e) = self.queue.sync_data() {
                // Whether the lines reached the disk is unknown: rewrite.
                self.rewrite = true;
                return Err(io_err(&self.queue_path)(e));
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// Whether the next write rewrites the journal whole (after a failed write
    /// or sync), with two syncs, instead of appending to it.
    pub fn rewrite_due(&self) -> bool {
        self.rewrite
    }

    /// Records that the publisher answered `id` (ACK, or a NAK that dropped it).
    pub fn done(&mut self, id: EventId) -> Result<(), StateError> {
        let Some(i) = self.pending.iter().position(|(p, _)| *p == id) else {
            return Ok(());
        };
        if i >= self.pending.len().saturating_sub(self.unwritten) {
            self.unwritten -= 1;
        }
        self.pending.remove(i);
        if self.pending.is_empty() {
            if let Err(e) = self.queue.set_len(0) {
                self.rewrite = true;
                return Err(io_err(&self.queue_path)(e));
            }
            self.queue_len = 0;
            return Ok(());
        }
        self.append(format!("-{id}\n").as_bytes())?;
        if self.queue_len > COMPACT_AT {
            self.compact()?;
        }
        Ok(())
    }

    /// Saves where to read the log again from, and whether it had shown INFO
    /// lines; on the disk when this returns.
    pub fn save_position(&mut self, files: &[FilePos], info_seen: bool) -> Result<(), StateError> {
        self.prepare_position(files, info_seen).write()
    }

    /// [`StateStore::save_position`] without the writing, which
    /// [`PositionSave::write`] does without the store (it syncs twice).
    pub fn prepare_position(&mut self, files: &[FilePos], info_seen: bool) -> PositionSave {
        let files: Vec<serde_json::Value> = files
            .iter()
            .map(|f| serde_json::json!({"dev": f.dev, "ino": f.ino, "offset": f.offset}))
            .collect();
        let text = serde_json::json!({ "files": files, "info_seen": info_seen }).to_string();
        PositionSave {
            dir: self.dir.clone(),
            path: self.position_path.clone(),
            text,
            #[cfg(test)]
            hold: Hold {
                gate: self.faults.position_gate.take(),
                fault: Faults::take(&mut self.faults.position).err(),
            },
        }
    }

    /// Appends whole lines to the journal. On a failure the file is cut back to
    /// its last whole line (best effort: a full disk may have taken part of the
    /// bytes) and marked for a rewrite.
    fn append(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        match self.write_journal(bytes) {
            Ok(()) => {
                self.queue_len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.queue.set_len(self.queue_len);
                self.rewrite = true;
                Err(io_err(&self.queue_path)(e))
            }
        }
    }

    fn write_journal(&mut self, bytes: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.journal > 0 {
            let _ = self.queue.write_all(&bytes[..bytes.len() / 2]);
            return Faults::take(&mut self.faults.journal);
        }
        self.queue.write_all(bytes)
    }

    /// Rewrites the journal with only the pending events (durably); clears a
    /// failed write's marks once the new file is in place and open.
    fn compact(&mut self) -> Result<(), StateError> {
        self.rewrite = true;
        #[cfg(test)]
        Faults::take(&mut self.faults.journal).map_err(io_err(&self.queue_path))?;
        let text = journal_text(&self.pending);
        replace(&self.dir, &self.queue_path, text.as_bytes())?;
        self.queue = OpenOptions::new()
            .append(true)
            .open(&self.queue_path)
            .map_err(io_err(&self.queue_path))?;
        self.queue_len = text.len() as u64;
        self.rewrite = false;
        self.unwritten = 0;
        self.unsynced = false;
        Ok(())
    }
}

/// The sync of the queue file that [`StateStore::prepare_sync`] leaves to make
/// without the store: it holds its own handle of the file.
#[derive(Debug)]
pub struct QueueSync {
    file: File,
    path: PathBuf,
    /// The store's journal writes when this was prepared.
    writes: u64,
    #[cfg(test)]
    hold: Hold,
}

/// What a test makes a write prepared by the store wait for (a gate it
/// opens), or fail with.
#[cfg(test)]
#[derive(Debug)]
struct Hold {
    gate: Option<std::sync::mpsc::Receiver<()>>,
    fault: Option<io::Error>,
}

#[cfg(test)]
impl Hold {
    /// Waits for the gate, if any, then fails with the fault, if any.
    fn pass(self, path: &Path) -> Result<(), StateError> {
        if let Some(gate) = self.gate {
            let _ = gate.recv();
        }
        match self.fault {
            Some(e) => Err(io_err(path)(e)),
            None => Ok(()),
        }
    }
}

/// A [`QueueSync`] made, for [`StateStore::synced`].
#[derive(Debug)]
pub struct Synced(u64);

impl QueueSync {
    /// Syncs the journal's data to the disk: every line written before
    /// [`StateStore::prepare_sync`] (the sync covers the file, whichever handle
    /// wrote it). Give the outcome to [`StateStore::synced`] or
    /// [`StateStore::sync_failed`].
    pub fn sync(self) -> Result<Synced, StateError> {
        #[cfg(test)]
        self.hold.pass(&self.path)?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        Ok(Synced(self.writes))
    }
}

/// A position to write without the store ([`StateStore::prepare_position`]).
#[derive(Debug)]
pub struct PositionSave {
    dir: PathBuf,
    path: PathBuf,
    text: String,
    #[cfg(test)]
    hold: Hold,
}

impl PositionSave {
    /// Replaces the position file, durably: on the disk when this returns `Ok`.
    pub fn write(self) -> Result<(), StateError> {
        #[cfg(test)]
        self.hold.pass(&self.path)?;
        replace(&self.dir, &self.path, self.text.as_bytes())
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
    let written = File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Do not leave a partial file taking room on a full disk.
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
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

#[cfg(test)]
mod tests {
    use f2b_proto::{Action, JailName};

    use super::*;

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
            1_763_702_000_000,
        )
        .unwrap()
    }

    fn ids(pending: &VecDeque<(EventId, String)>) -> Vec<EventId> {
        pending.iter().map(|(id, _)| *id).collect()
    }

    #[test]
    fn a_failed_journal_write_is_retried_and_leaves_no_partial_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = Path::new("/var/log/fail2ban.log");
        let (mut s, _) = StateStore::open(dir.path(), &node(), log).unwrap();
        s.add_all(&[event(1)]).unwrap();
        // A full disk takes half of the write.
        s.faults.journal = 1;
        assert!(s.add_all(&[event(2), event(3)]).is_err());
        assert_eq!(s.pending(), 3, "still pending in memory");
        // A crash now: the journal holds event 1, whole, and nothing cut.
        assert_eq!(
            ids(&read_queue(&s.queue_path).unwrap()),
            [EventId::from_u128(1)]
        );
        // Event 2 is answered before it reached the disk; event 1 too.
        s.done(EventId::from_u128(2)).unwrap();
        s.done(EventId::from_u128(1)).unwrap();
        s.add_all(&[event(4)]).unwrap();
        let queue_path = s.queue_path.clone();
        drop(s);
        let (_, saved) = StateStore::open(dir.path(), &node(), log).unwrap();
        assert_eq!(saved.pending, [event(3), event(4)]);
        let tmp = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("tmp".as_ref()))
            .count();
        assert_eq!(tmp, 0, "no temporary file left");
        assert!(queue_path.exists());
    }

    #[test]
    fn a_failed_position_save_keeps_the_last_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = Path::new("/var/log/fail2ban.log");
        let at = |offset| FilePos {
            dev: 1,
            ino: 2,
            offset,
        };
        let (mut s, _) = StateStore::open(dir.path(), &node(), log).unwrap();
        s.save_position(&[at(10)], false).unwrap();
        s.faults.position = 1;
        assert!(s.save_position(&[at(20)], false).is_err());
        drop(s);
        let (_, saved) = StateStore::open(dir.path(), &node(), log).unwrap();
        assert_eq!(saved.position, Some(vec![at(10)]));
    }

    /// The sync made without the store covers what was written before it was
    /// prepared, not what came after; a failed one has the journal rewritten.
    #[test]
    fn a_sync_outside_the_store_covers_the_writes_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = Path::new("/var/log/fail2ban.log");
        let (mut s, _) = StateStore::open(dir.path(), &node(), log).unwrap();
        assert!(s.prepare_sync().unwrap().is_none(), "nothing written");
        s.write_all(&[event(1)]).unwrap();
        let sync = s.prepare_sync().unwrap().expect("a sync to make");
        // Written while the sync runs: still to sync after it.
        s.write_all(&[event(2)]).unwrap();
        let synced = sync.sync().unwrap();
        s.synced(synced);
        let sync = s.prepare_sync().unwrap().expect("event 2 to sync");
        let synced = sync.sync().unwrap();
        s.synced(synced);
        assert!(s.prepare_sync().unwrap().is_none(), "all synced");
        // A failed sync: the next one rewrites the journal whole, durably.
        s.write_all(&[event(3)]).unwrap();
        s.faults.sync = 1;
        assert!(s.prepare_sync().unwrap().unwrap().sync().is_err());
        s.sync_failed();
        assert!(s.prepare_sync().unwrap().is_none(), "rewritten and synced");
        assert_eq!(
            ids(&read_queue(&s.queue_path).unwrap()),
            [1, 2, 3].map(EventId::from_u128)
        );
    }
}
