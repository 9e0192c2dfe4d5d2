//! Following a log file across appends, rotation, truncation and absence.
//!
//! [`Tailer`] is the synchronous part: one call to [`Tailer::read`] reads what is
//! new, up to [`READ_BYTES`] and [`READ_LINES`], and returns complete lines.
//! [`Follower`] drives it: it watches the file's directory with inotify (the
//! `inotify` crate, its descriptor registered with the tokio reactor) and calls
//! `read` on every change, with no polling, and again at once while a read
//! stopped at its limit.
//!
//! What `read` handles:
//!
//! - Appends: read from the last offset to the end. A last line without its
//!   newline is kept until the newline arrives.
//! - Rename and create (Debian's logrotate): fail2ban keeps writing to the renamed
//!   file until `fail2ban-client flushlogs` makes it reopen the path. The old file
//!   stays open and is drained on every change until the writer has visibly moved
//!   (the new file has data; the old is then read to its end once more and
//!   closed), or until it has had no new data for [`DRAIN_GRACE`].
//! - copytruncate: the file is shorter than the offset: read it again from 0.
//!   Lines fail2ban writes between logrotate's copy and its truncation are in
//!   neither the copy nor the truncated file, and are lost: that is inherent to
//!   copytruncate (prefer rename and create, Debian's default).
//! - Missing file: wait for it to be created, then read it from the start.
//! - Its directory removed, renamed or unmounted (inotify ends the watch with it):
//!   the directory is looked for every [`READ_RETRY`] and watched again once it is
//!   back; a log in it is then read from the start.
//! - A read error (a rotated-away file on a failing disk, permissions changed):
//!   the lines read before it are returned with the error, every file stays open
//!   and the next read goes on where this one stopped.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{FutureExt as _, StreamExt as _};
use inotify::{EventMask, EventOwned, EventStream, Inotify, WatchDescriptor, WatchMask};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a rotated-away file is kept open and read, from its last new data,
/// when the new file stays empty (fail2ban not told to reopen its log).
pub const DRAIN_GRACE: Duration = Duration::from_secs(600);

/// How soon a read that failed is tried again when no change of the file comes
/// first.
pub const READ_RETRY: Duration = Duration::from_secs(1);

/// Lines longer than this are dropped (fail2ban's are a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;

const CHUNK: usize = 64 * 1024;

/// The most bytes one [`Tailer::read`] reads (resuming after downtime, draining a
/// rotated file: the rest is read by the next calls).
pub const READ_BYTES: usize = 256 * 1024;

/// The most lines one [`Tailer::read`] returns.
pub const READ_LINES: usize = 2048;

/// One line read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The text, without the newline (invalid UTF-8 replaced).
    pub text: String,
    /// 1-based count of lines read by this tailer, across files.
    pub number: u64,
    /// The file the line is in, and the offset just after its newline.
    pub pos: FilePos,
}

/// How far a file has been read: which file (device and inode, so a renamed file is
/// still recognised) and the offset of the first byte not yet returned in a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FilePos {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
}

/// What the tailer noticed on a read, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file appeared; it is read from the start.
    Appeared,
    /// The path now names another file (rotation); the old one is drained.
    Rotated,
    /// The path no longer exists; the old file is drained.
    Vanished,
    /// The file got shorter than the offset (copytruncate); read again from 0.
    Truncated { offset: u64 },
    /// A rotated-away file was closed.
    Closed { offset: u64, grace_expired: bool },
    /// A rotated-away file that could not be read for the whole grace was closed.
    Abandoned { offset: u64, error: String },
}

/// How much one read may still take.
#[derive(Debug)]
struct Budget {
    bytes: usize,
    lines: usize,
}

#[derive(Debug)]
struct Reader {
    file: File,
    id: (u64, u64),
    /// How far the file has been read.
    offset: u64,
    /// Read, not yet split into lines (a read stopped by its line limit), just
    /// before `offset`.
    unsplit: Vec<u8>,
    /// The start of a line whose newline has not been read yet, just before
    /// `unsplit`.
    partial: Vec<u8>,
    /// Discarding up to the next newline (started mid-line, or an overlong line).
    discarding: bool,
    last_data: Instant,
}

impl Reader {
    fn open(path: &Path, now: Instant) -> io::Result<Reader> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Reader {
            file,
            id: (meta.dev(), meta.ino()),
            offset: 0,
            unsplit: Vec::new(),
            partial: Vec::new(),
            discarding: false,
            last_data: now,
        })
    }

    /// Reads to the end of the file, or until `budget` is spent; complete lines go
    /// to `out`. Returns whether the end was reached. On an error, what was read
    /// before it is in `out` and counted in the offset.
    fn drain(
        &mut self,
        now: Instant,
        counter: &mut u64,
        out: &mut Vec<Line>,
        budget: &mut Budget,
    ) -> io::Result<bool> {
        if !self.unsplit.is_empty() {
            let data = std::mem::take(&mut self.unsplit);
            let start = self.offset - data.len() as u64;
            let used = self.split(&data, start, counter, out, budget);
            if used < data.len() {
                self.unsplit = data[used..].to_vec();
                return Ok(false);
            }
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            if budget.bytes == 0 || budget.lines == 0 {
                return Ok(false);
            }
            let want = CHUNK.min(budget.bytes);
            let n = match self.file.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(true);
            }
            let start = self.offset;
            self.offset += n as u64;
            budget.bytes = budget.bytes.saturating_sub(n);
            self.last_data = now;
            let used = self.split(&buf[..n], start, counter, out, budget);
            if used < n {
                self.unsplit = buf[used..n].to_vec();
                return Ok(false);
            }
        }
    }

    /// Splits `data`, the file's bytes from offset `start`, into lines for `out`
    /// until the budget's lines are spent; returns how many bytes it used (all of
    /// them, or up to the end of the last line it could take).
    fn split(
        &mut self,
        data: &[u8],
        start: u64,
        counter: &mut u64,
        out: &mut Vec<Line>,
        budget: &mut Budget,
    ) -> usize {
        let mut used = 0;
        while let Some(len) = data[used..].iter().position(|&b| b == b'\n') {
            if budget.lines == 0 {
                return used;
            }
            let head = &data[used..used + len];
            used += len + 1;
            if self.discarding || self.partial.len() + head.len() > MAX_LINE {
                self.discarding = false;
                self.partial.clear();
                continue;
            }
            self.partial.extend_from_slice(head);
            *counter += 1;
            out.push(Line {
                text: String::from_utf8_lossy(&self.partial).into_owned(),
                number: *counter,
                pos: FilePos {
                    dev: self.id.0,
                    ino: self.id.1,
                    offset: start + used as u64,
                },
            });
            self.partial.clear();
            budget.lines -= 1;
        }
        if !self.discarding {
            self.partial.extend_from_slice(&data[used..]);
            if self.partial.len() > MAX_LINE {
                self.partial.clear();
                self.discarding = true;
            }
        }
        data.len()
    }

    fn pos(&self) -> FilePos {
        FilePos {
            dev: self.id.0,
            ino: self.id.1,
            // A partial line is read again after a restart.
            offset: self.offset - (self.partial.len() + self.unsplit.len()) as u64,
        }
    }

    /// Opens `path` and positions it at `offset` if it is still that file and is
    /// not shorter; `None` when it is not.
    fn reopen(path: &Path, pos: &FilePos, now: Instant) -> io::Result<Option<Reader>> {
        let mut r = Reader::open(path, now)?;
        if r.id != (pos.dev, pos.ino) {
            return Ok(None);
        }
        if r.file.metadata()?.len() >= pos.offset {
            r.file.seek(SeekFrom::Start(pos.offset))?;
            r.offset = pos.offset;
        }
        Ok(Some(r))
    }

    fn rewind(&mut self) -> io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.offset = 0;
        self.unsplit.clear();
        self.partial.clear();
        self.discarding = false;
        Ok(())
    }
}

/// Follows one path; see the module documentation.
#[derive(Debug)]
pub struct Tailer {
    path: PathBuf,
    current: Option<Reader>,
    /// Rotated-away files still being read, oldest first.
    draining: Vec<Reader>,
    grace: Duration,
    lines: u64,
    max_bytes: usize,
    max_lines: usize,
}

impl Tailer {
    /// Starts at the end of `path` (nothing already in it is read), or, if it does
    /// not exist yet, at the start of the file that will be created.
    pub fn at_end(path: &Path, now: Instant) -> io::Result<Tailer> {
        let current = match Reader::open(path, now) {
            Ok(mut r) => {
                let len = r.file.seek(SeekFrom::End(0))?;
                r.offset = len;
                if len > 0 {
                    // Started in the middle of a line: skip its rest.
                    let mut last = [0u8; 1];
                    r.file.seek(SeekFrom::Start(len - 1))?;
                    r.file.read_exact(&mut last)?;
                    r.discarding = last[0] != b'\n';
                }
                Some(r)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Tailer {
            path: path.to_owned(),
            current,
            draining: Vec::new(),
            grace: DRAIN_GRACE,
            lines: 0,
            max_bytes: READ_BYTES,
            max_lines: READ_LINES,
        })
    }

    /// Resumes where a previous run stopped: `saved` is what [`Tailer::position`]
    /// returned. The file still at `path` continues at its offset (from 0 if it was
    /// truncated); a saved file renamed since (rotated while the monitor was down)
    /// is found among the files of the directory whose names start with the log's
    /// (`fail2ban.log.1`) and read to its end first; a new file at `path` is read
    /// from the start (also when `saved` is empty: no file was open then).
    pub fn resume(path: &Path, saved: &[FilePos], now: Instant) -> io::Result<Tailer> {
        let mut current = None;
        let mut draining = Vec::new();
        let current_id = match std::fs::metadata(path) {
            Ok(m) => Some((m.dev(), m.ino())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let siblings = rotated_siblings(path);
        for pos in saved {
            if current_id == Some((pos.dev, pos.ino)) {
                if current.is_none() {
                    current = Reader::reopen(path, pos, now)?;
                }
                continue;
            }
            for sib in &siblings {
                if let Ok(Some(r)) = Reader::reopen(sib, pos, now) {
                    draining.push(r);
                    break;
                }
            }
        }
        if current.is_none() {
            // A file created since: everything in it is new.
            current = match Reader::open(path, now) {
                Ok(r) => Some(r),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
        }
        Ok(Tailer {
            path: path.to_owned(),
            current,
            draining,
            grace: DRAIN_GRACE,
            lines: 0,
            max_bytes: READ_BYTES,
            max_lines: READ_LINES,
        })
    }

    /// How far every open file has been read (complete lines only): the current
    /// file first, then rotated-away files still being read. [`Tailer::resume`]
    /// takes it.
    pub fn position(&self) -> Vec<FilePos> {
        self.current
            .iter()
            .chain(&self.draining)
            .map(Reader::pos)
            .collect()
    }

    /// Sets how long a rotated-away file is read after its last data.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Sets how much one [`Tailer::read`] reads at most (at least one byte and one
    /// line).
    pub fn with_limits(mut self, bytes: usize, lines: usize) -> Self {
        self.max_bytes = bytes.max(1);
        self.max_lines = lines.max(1);
        self
    }

    /// The path followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The offset in the current file, 0 when it does not exist.
    pub fn offset(&self) -> u64 {
        self.current.as_ref().map_or(0, |r| r.offset)
    }

    /// Whether the path currently names a file being read.
    pub fn is_open(&self) -> bool {
        self.current.is_some()
    }

    /// How many rotated-away files are still being read.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }

    /// When a rotated-away file's grace ends, if one is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining.iter().map(|r| r.last_data + self.grace).min()
    }

    /// Reads what is new, up to the limits ([`READ_BYTES`], [`READ_LINES`]):
    /// complete lines to `lines`, what happened to `changes`. Returns whether it
    /// stopped at a limit (call again at once for the rest).
    ///
    /// On an error the lines read before it are in `lines` and count as read
    /// ([`Tailer::position`] includes them); every file stays open, and the next
    /// call goes on from there. A rotated-away file that keeps failing is closed
    /// once its grace has passed ([`Change::Abandoned`]).
    pub fn read(
        &mut self,
        now: Instant,
        lines: &mut Vec<Line>,
        changes: &mut Vec<Change>,
    ) -> io::Result<bool> {
        let mut budget = Budget {
            bytes: self.max_bytes,
            lines: self.max_lines,
        };
        // 1. Where does the path point now?
        let mut new_has_data = false;
        match std::fs::metadata(&self.path) {
            Ok(meta) => {
                let id = (meta.dev(), meta.ino());
                match &mut self.current {
                    Some(cur) if cur.id == id => {
                        if meta.len() < cur.offset {
                            changes.push(Change::Truncated { offset: cur.offset });
                            cur.rewind()?;
                        }
                    }
                    _ => {
                        let was_open = self.current.is_some();
                        match Reader::open(&self.path, now) {
                            Ok(r) => {
                                if let Some(old) = self.current.replace(r) {
                                    self.draining.push(old);
                                }
                                changes.push(if was_open {
                                    Change::Rotated
                                } else {
                                    Change::Appeared
                                });
                            }
                            // Renamed away again between the stat and the open.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                                if let Some(old) = self.current.take() {
                                    self.draining.push(old);
                                    changes.push(Change::Vanished);
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                // Compare with the file we really opened (the path may have moved on).
                if let Some(cur) = &self.current {
                    new_has_data = cur.file.metadata()?.len() > 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(old) = self.current.take() {
                    self.draining.push(old);
                    changes.push(Change::Vanished);
                }
            }
            Err(e) => return Err(e),
        }

        // 2. Drain the rotated-away files, oldest first. If the new file already
        // had data before this drain, the writer had moved to it, so a drain to
        // the end is the last one.
        let mut i = 0;
        while i < self.draining.len() {
            let old = &mut self.draining[i];
            let at_end = match old.drain(now, &mut self.lines, lines, &mut budget) {
                Ok(at_end) => at_end,
                Err(e) if now >= old.last_data + self.grace => {
                    let old = self.draining.remove(i);
                    changes.push(Change::Abandoned {
                        offset: old.offset,
                        error: e.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !at_end {
                // Limit reached: the rest of this file (and the newer files) next
                // time, in order.
                return Ok(true);
            }
            let grace_expired = now >= old.last_data + self.grace;
            if new_has_data || grace_expired {
                let old = self.draining.remove(i);
                changes.push(Change::Closed {
                    offset: old.offset,
                    grace_expired: !new_has_data,
                });
            } else {
                i += 1;
            }
        }

        // 3. Then the current file.
        if let Some(cur) = &mut self.current {
            if !cur.drain(now, &mut self.lines, lines, &mut budget)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// The files in `path`'s directory whose names start with its name, `path` itself
/// excepted (`fail2ban.log.1`, `fail2ban.log-20261121`).
fn rotated_siblings(path: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            n != name && n.as_encoded_bytes().starts_with(name.as_encoded_bytes())
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// A batch of new lines and how far the files have been read after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub lines: Vec<Line>,
    /// [`Tailer::position`] after these lines.
    pub position: Vec<FilePos>,
}

/// Follows `path` until `shutdown` (see [`Follower`]), with the default
/// [`DRAIN_GRACE`].
pub async fn follow(
    path: PathBuf,
    tx: mpsc::Sender<Batch>,
    shutdown: CancellationToken,
) -> Result<(), crate::MonitorError> {
    Follower::start(path, DRAIN_GRACE, None)
        .await?
        .run(tx, shutdown)
        .await
}

/// A [`Tailer`] woken by inotify. [`Follower::start`] installs the watch on the
/// file's directory (so creation and renames of the file are seen), sets the
/// position (the end of the file on the first start; later starts resume from
/// the saved position) and logs `watching path=.. offset=..`; [`Follower::run`]
/// then sends each batch of new lines as soon as the file changes.
pub struct Follower {
    path: PathBuf,
    tailer: Tailer,
    watch: DirWatch,
}

/// The inotify watch on the log's directory, read on the runtime's reactor: a
/// change wakes the follower's task itself, with no watcher thread in between.
struct DirWatch {
    events: EventStream<Vec<u8>>,
    /// The log's directory, watched again by its path when its watch is gone.
    dir: PathBuf,
    /// The watch on it; `None` while the directory is gone (removed, renamed,
    /// its file system unmounted).
    wd: Option<WatchDescriptor>,
    /// The log's file name: changes to it or to its rotated names
    /// (`fail2ban.log.1`) matter; other logs in the directory change all the
    /// time.
    name: OsString,
}

/// What inotify reports about the directory: every change that can concern the
/// log (appends, truncation, creation, renames and removal of it and of its
/// rotated names, the directory itself going away).
const WATCH_MASK: WatchMask = WatchMask::MODIFY
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// Whether an inotify event on the log's directory may concern the log `log`:
/// a change to its name or a rotated name (`fail2ban.log.1`, `fail2ban.log-2026`),
/// an event naming no file, a lost event queue (`Q_OVERFLOW`: anything may have
/// changed), or the directory or its watch gone.
fn concerns_log(log: &OsStr, mask: EventMask, file: Option<&OsStr>) -> bool {
    mask.intersects(
        EventMask::Q_OVERFLOW | EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF,
    ) || file.is_none_or(|n| n.as_encoded_bytes().starts_with(log.as_encoded_bytes()))
}

impl DirWatch {
    fn start(dir: &Path, name: OsString) -> io::Result<DirWatch> {
        let inotify = Inotify::init()?;
        let wd = inotify.watches().add(dir, WATCH_MASK)?;
        Ok(DirWatch {
            events: inotify.into_event_stream(vec![0; 4096])?,
            dir: dir.to_owned(),
            wd: Some(wd),
            name,
        })
    }

    /// Takes one event: whether it may concern the log. The directory's own
    /// removal, renaming or unmounting ends its watch (a renamed directory's watch
    /// is dropped: the log's path now names another one, or none).
    fn take(&mut self, ev: &EventOwned) -> bool {
        let gone = EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF;
        if ev.mask.intersects(gone) && self.wd.as_ref() == Some(&ev.wd) {
            if ev.mask.contains(EventMask::MOVE_SELF) {
                let _ = self.events.watches().remove(ev.wd.clone());
            }
            self.wd = None;
            tracing::info!(
                dir = %self.dir.display(),
                "the log's directory is gone; watching for it again every {READ_RETRY:?}"
            );
        }
        concerns_log(&self.name, ev.mask, ev.name.as_deref())
    }

    /// Waits until something that may concern the log happened; every event
    /// already waiting is taken with it, and changes to other files are passed
    /// over. An error of the watch is logged and counts as a change (reading
    /// again is the safe answer), after [`READ_RETRY`] so that a lasting one is
    /// not a busy loop. While the directory is gone, it looks for it every
    /// [`READ_RETRY`] (nothing else can say when it is back), and returns once it
    /// watches it again, for the log may be there already.
    async fn changed(&mut self) {
        loop {
            if self.wd.is_none() {
                match self.events.watches().add(&self.dir, WATCH_MASK) {
                    Ok(wd) => {
                        self.wd = Some(wd);
                        tracing::info!(dir = %self.dir.display(), "watching the log's directory again");
                        return;
                    }
                    Err(_) => {
                        // Any events of the old watch (its IGNORED) are taken
                        // meanwhile.
                        tokio::select! {
                            () = tokio::time::sleep(READ_RETRY) => {}
                            Some(Ok(ev)) = self.events.next() => { self.take(&ev); }
                        }
                        continue;
                    }
                }
            }
            let mut relevant = false;
            let mut next = self.events.next().await;
            loop {
                match next {
                    Some(Ok(ev)) => relevant |= self.take(&ev),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "file watch error");
                        tokio::time::sleep(READ_RETRY).await;
                        return;
                    }
                    // The descriptor never ends while it is open.
                    None => return std::future::pending().await,
                }
                match self.events.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
            if relevant {
                return;
            }
        }
    }
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("path", &self.path)
            .field("tailer", &self.tailer)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Installs the watch, then sets the position: at the end of the file when
    /// nothing is saved (the first start), else where `saved` says (see
    /// [`Tailer::resume`]; later starts resume from the saved position). A
    /// rotated-away file is read for `grace` after its last data (see
    /// [`DRAIN_GRACE`]).
    pub async fn start(
        path: PathBuf,
        grace: Duration,
        saved: Option<Vec<FilePos>>,
    ) -> Result<Follower, crate::MonitorError> {
        let follower = Follower::open(path, grace, saved).await?;
        follower.announce();
        Ok(follower)
    }

    /// [`Follower::start`] without its log lines: the monitor saves a first
    /// start's position before it says `watching` ([`Follower::announce`]).
    pub(crate) async fn open(
        path: PathBuf,
        grace: Duration,
        saved: Option<Vec<FilePos>>,
    ) -> Result<Follower, crate::MonitorError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
        let watch = DirWatch::start(&dir, name).map_err(|source| crate::MonitorError::Watch {
            path: dir.clone(),
            source,
        })?;

        // The watch is in place before the position is taken: a line written in
        // between is after the position and wakes us.
        let p = path.clone();
        let tailer = tokio::task::spawn_blocking(move || match saved {
            Some(saved) => Tailer::resume(&p, &saved, Instant::now()),
            None => Tailer::at_end(&p, Instant::now()),
        })
        .await
        .map_err(|e| crate::MonitorError::task("tailer", e))?
        .map_err(|source| crate::MonitorError::Read {
            path: path.clone(),
            source,
        })?
        .with_grace(grace);
        Ok(Follower {
            path,
            tailer,
            watch,
        })
    }

    /// Logs `watching path=.. offset=..`, and what the position found (a log
    /// rotated away while stopped, a log not there yet).
    pub(crate) fn announce(&self) {
        let (path, tailer) = (&self.path, &self.tailer);
        tracing::info!(path = %path.display(), offset = tailer.offset(), "watching");
        if tailer.draining() > 0 {
            tracing::info!(
                path = %path.display(),
                files = tailer.draining(),
                "reading the rest of the log rotated away while stopped"
            );
        }
        if !tailer.is_open() {
            tracing::warn!(path = %path.display(), "log file does not exist yet, waiting for it");
        }
    }

    /// The position in the file (0 if it does not exist yet).
    pub fn offset(&self) -> u64 {
        self.tailer.offset()
    }

    /// Where reading starts ([`Tailer::position`]).
    pub fn position(&self) -> Vec<FilePos> {
        self.tailer.position()
    }

    /// Sends new lines to `tx` until `shutdown` is cancelled or `tx` is closed.
    /// Sending waits while `tx` is full (the file keeps the lines meanwhile).
    ///
    /// The file is read on this task, straight after the wake-up, not on a
    /// blocking thread: a read is bounded ([`READ_BYTES`]) and takes tens of
    /// microseconds from the page cache, where fail2ban's lines just written
    /// are, while handing it to a blocking thread and back cost two thread
    /// wake-ups on the path of every Ban (about 0.1 ms on a busy two-CPU
    /// machine, measured with benchmark 1).
    pub async fn run(
        self,
        tx: mpsc::Sender<Batch>,
        shutdown: CancellationToken,
    ) -> Result<(), crate::MonitorError> {
        let Follower {
            path,
            mut tailer,
            mut watch,
        } = self;
        loop {
            let (mut lines, mut changes) = (Vec::new(), Vec::new());
            let result = tailer.read(Instant::now(), &mut lines, &mut changes);
            let batch = Batch {
                lines,
                position: tailer.position(),
            };
            let mut deadline = tailer.next_deadline();
            for c in changes {
                log_change(&path, &c);
            }
            // Lines read before an error are sent too: they count as read.
            if !batch.lines.is_empty() {
                tokio::select! {
                    r = tx.send(batch) => if r.is_err() { return Ok(()) },
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
            match result {
                Ok(true) => {
                    // Stopped at the read limit: go on at once.
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    // Transient (permissions being fixed, NFS hiccup): report and
                    // try again at the next change, or after a while.
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the log file");
                    let retry = Instant::now() + READ_RETRY;
                    deadline = Some(deadline.map_or(retry, |d| d.min(retry)));
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = watch.changed() => {}
                () = sleep => {}
                () = shutdown.cancelled() => return Ok(()),
                // The pipeline is gone (it failed): nothing would take the lines.
                () = tx.closed() => return Ok(()),
            }
        }
    }
}

fn log_change(path: &Path, change: &Change) {
    let path = path.display();
    match change {
        Change::Appeared => tracing::info!(%path, "log file appeared, reading it from the start"),
        Change::Rotated => {
            tracing::info!(%path, "log file rotated, reading the new file from the start")
        }
        Change::Vanished => tracing::info!(%path, "log file gone, waiting for it"),
        Change::Truncated { offset } => {
            tracing::info!(%path, offset, "log file truncated, reading it from the start")
        }
        Change::Closed {
            offset,
            grace_expired,
        } => tracing::info!(
            %path,
            offset,
            grace_expired,
            "finished reading the rotated log file"
        ),
        Change::Abandoned { offset, error } => tracing::warn!(
            %path,
            offset,
            %error,
            "gave up reading the rotated log file: it could not be read for the whole grace"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_that_may_concern_the_log_wake_the_follower() {
        let log = OsStr::new("fail2ban.log");
        let m = EventMask::MODIFY;
        assert!(concerns_log(log, m, Some(OsStr::new("fail2ban.log"))));
        assert!(concerns_log(
            log,
            EventMask::MOVED_FROM,
            Some(OsStr::new("fail2ban.log"))
        ));
        assert!(concerns_log(
            log,
            EventMask::CREATE,
            Some(OsStr::new("fail2ban.log.1"))
        ));
        assert!(!concerns_log(log, m, Some(OsStr::new("syslog"))));
        assert!(!concerns_log(log, m, Some(OsStr::new("auth.log"))));
        // No file named: the directory itself, or anything.
        assert!(concerns_log(log, EventMask::ATTRIB, None));
        assert!(concerns_log(
            log,
            EventMask::Q_OVERFLOW,
            Some(OsStr::new("syslog"))
        ));
        assert!(concerns_log(
            log,
            EventMask::IGNORED,
            Some(OsStr::new("syslog"))
        ));
    }
}
