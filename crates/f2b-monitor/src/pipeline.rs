//! From lines to queued events: parse, stop filter, event ids, the queue file, the
//! saved position and the bound on events not yet answered.
//!
//! For each batch of lines (and each time held Unbans come due):
//!
//! 1. every line is parsed and fed to the [`StopFilter`]; the position before
//!    each line that may have to be read again (a Ban, an Unban, a Flush line) is
//!    kept as a checkpoint;
//! 2. each event to report gets a random id and, in chunks that fit in the free
//!    places of the [`Room`] (`[monitor] queue_size`), is written to the queue
//!    file; then the chunk is handed to the sender, and only then does the new
//!    position (see below) go to the [`Saver`], which syncs the queue file and
//!    then saves the position while the pipeline goes on with the next lines,
//!    so no sync is on the path of a report, this one's or the next's. The
//!    position never moves past a line whose event is not on the disk in the
//!    queue file (or answered): the sync comes before the save, whichever
//!    comes first of the report and the save. A crash of
//!    the monitor keeps what was written (the kernel has it); a crash of the
//!    machine before the sync may lose the chunk from the queue file, but then
//!    the position was not saved past its lines either, and they are read again
//!    (reported under new ids: `unchanged` where the publisher had them). With
//!    no free place, reading pauses
//!    (backpressure: the log file keeps the lines). An episode of backpressure
//!    starts with a warning and ends, with an info line, once half the places
//!    are free again: one warning for a whole overload, not one per event;
//! 3. the position saved (a first start saves its own before reading: see
//!    [`crate::state`]) is the checkpoint of the first line whose outcome is
//!    not on the disk yet: an Unban still held by the stop filter (or the Flush line
//!    it follows), or an event not yet in the queue file. After a crash, even
//!    `kill -9` within a hold, the next start reads those lines again and reaches
//!    the same verdicts. The price: events of the few seconds after a held Unban
//!    that were already queued are read again after a crash and sent a second
//!    time under new ids (the publisher's state dedup answers them `unchanged`),
//!    and so is a chunk whose position was not yet renamed into place when the
//!    monitor or the machine crashed: its events are resent from the queue file
//!    under their ids (`duplicate` if the publisher had them) unless answered,
//!    and its lines are read again and reported under new ids. Queue-file
//!    entries carry no log position, so a line read again is not recognised.
//!    Saving the position after the hand-over does not widen that window (it
//!    runs from the queue file's write to the position's rename, as when the
//!    save came first); it only lets the first report leave, and perhaps be
//!    answered, within it, which the restart cannot tell from a report sent
//!    just after it. Since the [`Saver`] saves behind the pipeline, and starts
//!    a save only [`saver::SAVE_DELAY`] (10 ms) after the position that calls
//!    for it, the window is that much wider and may hold the next chunks too
//!    (written, handed over, their position not saved yet): a crash in it
//!    treats them the same way.
//!
//! A failed write of the queue file (a full disk) is logged, not fatal: the
//! chunk still goes to the sender (the cluster keeps getting the bans) and its
//! events stay pending in the [`StateStore`], which retries them with the next
//! write, rewriting the queue file whole ([`StateStore::write_all`]). The position
//! is saved only after a write that put every pending event on the disk; until
//! then it stays where it was, before the failed chunk's lines. So after a crash
//! each event is either in the queue file (resent with its id) or read again
//! from the log (sent under a new id); an event answered meanwhile needs
//! neither. A failed save of the position is tried again with the next
//! position, or after a while if none comes, and once more when the pipeline
//! ends.
//!
//! The queue file is written on the pipeline's task (a write to the page
//! cache, off the path of nothing else); its syncs and the position's run on a
//! blocking thread, in the [`Saver`], without the store's lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Local;
use f2b_common::metrics::prometheus_client::metrics::counter::Counter;
use f2b_common::metrics::{ActionLabel, MonitorMetrics};
use f2b_proto::{Action, Event, EventId, JailName, NodeName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::parse::{self, Kind, LogEntry};
use crate::send::Room;
use crate::state::{self, StateStore};
use crate::stop::{StopFilter, Verdict};
use crate::tail::{Batch, FilePos};
use crate::MonitorError;

mod saver;

use saver::Saver;

/// How many `Flush ticket(s)` checkpoints are kept when nothing is held (a flush
/// lasts a moment; one jail logs one Flush line per flushable action).
const KEPT_FLUSHES: usize = 64;

/// Turns lines into queued events.
#[derive(Debug)]
pub(crate) struct Pipeline {
    pub node: NodeName,
    pub ignore_jails: Vec<JailName>,
    pub state: Option<Arc<Mutex<StateStore>>>,
    pub room: Arc<Room>,
    pub filter: StopFilter,
    pub counters: Counters,
}

/// The pipeline's metrics, resolved once (no label lookup per line or event).
#[derive(Debug, Clone)]
pub(crate) struct Counters {
    lines_read: Counter,
    found_ban: Counter,
    found_unban: Counter,
    ignored: Counter,
}

impl Counters {
    pub fn new(m: &MonitorMetrics) -> Self {
        let found = |action| {
            m.events_found
                .get_or_create(&ActionLabel { action })
                .clone()
        };
        Counters {
            lines_read: m.lines_read.clone(),
            found_ban: found("ban"),
            found_unban: found("unban"),
            ignored: m.events_ignored.clone(),
        }
    }
}

/// Where the log would be read again from.
#[derive(Debug, Default)]
struct Progress {
    /// The position after the last line fed to the filter.
    current: Vec<FilePos>,
    /// The position before lines that may have to be read again, by line number.
    checkpoints: BTreeMap<u64, Vec<FilePos>>,
    /// The same for the last `Flush ticket(s)` lines, kept longer: an Unban held
    /// later may follow one of them.
    flushes: BTreeMap<u64, Vec<FilePos>>,
    /// What was last handed to the [`Saver`] (saved, or being saved).
    saved: Option<Vec<FilePos>>,
}

impl Progress {
    fn checkpoint(&mut self, line: u64, flush: bool) {
        let map = if flush {
            &mut self.flushes
        } else {
            &mut self.checkpoints
        };
        map.insert(line, self.current.clone());
    }

    /// Line by line within a batch: only the line's own file moved.
    fn advance(&mut self, pos: FilePos) {
        match self
            .current
            .iter_mut()
            .find(|p| (p.dev, p.ino) == (pos.dev, pos.ino))
        {
            Some(p) => p.offset = pos.offset,
            None => self.current.push(pos),
        }
    }

    /// The position to save when `first` is the first line still needed: its
    /// checkpoint, or, with none needed, the position after everything read.
    /// `None` when that line's checkpoint is missing (never: every line that can
    /// be needed has one), to keep the last saved position.
    fn resume_point(&mut self, first: Option<u64>) -> Option<Vec<FilePos>> {
        match first {
            None => {
                self.checkpoints.clear();
                while self.flushes.len() > KEPT_FLUSHES {
                    self.flushes.pop_first();
                }
                Some(self.current.clone())
            }
            Some(line) => {
                self.checkpoints = self.checkpoints.split_off(&line);
                self.flushes = self.flushes.split_off(&line);
                self.checkpoints
                    .get(&line)
                    .or_else(|| self.flushes.get(&line))
                    .cloned()
            }
        }
    }
}

/// Backpressure episodes, for the log.
#[derive(Debug, Default)]
struct Pauses {
    since: Option<Instant>,
    episodes: u64,
}

impl Pipeline {
    /// Runs until `lines` closes (the follower stopped) or, while waiting for room
    /// in the queue, `shutdown` comes. `start` is the follower's position before
    /// its first batch; `start_saved`, whether it is the saved position already
    /// (a first start saves it before reading). Events go to `events` in order.
    /// Returns once the last position handed to the [`Saver`] is saved.
    pub async fn process(
        self,
        start: Vec<FilePos>,
        start_saved: bool,
        lines: mpsc::Receiver<Batch>,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), MonitorError> {
        let saver = Saver::start(self.state.clone());
        let processed = self
            .run(&saver, start, start_saved, lines, events, shutdown)
            .await;
        let saved = saver.finish().await;
        processed.and(saved)
    }

    async fn run(
        mut self,
        saver: &Saver,
        start: Vec<FilePos>,
        start_saved: bool,
        mut lines: mpsc::Receiver<Batch>,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), MonitorError> {
        let mut progress = Progress {
            saved: start_saved.then(|| start.clone()),
            current: start,
            ..Progress::default()
        };
        let mut pauses = Pauses::default();
        let mut verdicts = Vec::new();
        loop {
            let deadline = self.filter.next_deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let under_pressure = pauses.since.is_some();
            tokio::select! {
                b = lines.recv() => match b {
                    Some(batch) => self.feed(batch, &mut progress, &mut verdicts),
                    None => return self.finish(saver, &mut progress, &events).await,
                },
                () = sleep => self.filter.release_due(Instant::now(), &mut verdicts),
                () = self.room.wait_free(self.resume_at()), if under_pressure => {
                    self.resumed(&mut pauses);
                    continue;
                }
            }
            let to_send = self.events_of(verdicts.drain(..));
            let done = self
                .deliver(
                    saver,
                    to_send,
                    &mut progress,
                    &events,
                    &shutdown,
                    &mut pauses,
                )
                .await?;
            if !done {
                // Shutdown while waiting for room: the lines of what was not
                // queued are read again at the next start (if state is kept).
                return Ok(());
            }
        }
    }

    /// Parses a batch and feeds it to the stop filter.
    fn feed(&mut self, batch: Batch, progress: &mut Progress, verdicts: &mut Vec<Verdict>) {
        let now_local = Local::now().naive_local();
        for line in &batch.lines {
            let entry = parse::parse_line_at(&line.text, now_local);
            if let Some(entry) = &entry {
                match entry.kind {
                    Kind::Event { .. } => progress.checkpoint(line.number, false),
                    Kind::Flush { .. } => progress.checkpoint(line.number, true),
                    _ => {}
                }
            }
            progress.advance(line.pos);
            let Some(entry) = entry else {
                tracing::trace!(line = line.number, text = %line.text, "not a fail2ban line");
                continue;
            };
            log_skipped(&entry, line.number);
            self.filter
                .push(&entry, line.number, Instant::now(), verdicts);
        }
        self.counters
            .lines_read
            .inc_by(u64::try_from(batch.lines.len()).unwrap_or(u64::MAX));
        // The tailer's own position also covers what no line shows (a file
        // closed, a partial line, skipped bytes).
        progress.current = batch.position;
    }

    /// The follower stopped (shutdown, or it failed). With state kept, what the
    /// stop filter still holds is left to the next start, which reads it again;
    /// without, it is released as if its hold had run out and queued if there is
    /// room.
    async fn finish(
        &mut self,
        saver: &Saver,
        progress: &mut Progress,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), MonitorError> {
        let mut verdicts = Vec::new();
        if self.state.is_none() {
            self.filter.release_all(&mut verdicts);
        }
        let mut to_send = self.events_of(verdicts.drain(..));
        let fits = to_send.len().min(self.room.available());
        let dropped = to_send.split_off(fits);
        self.room.try_take(fits);
        let position = self.resume_point(progress, dropped.first().map(|e| e.1));
        let chunk: Vec<Event> = to_send.into_iter().map(|(e, _)| e).collect();
        self.commit(saver, &chunk, position, progress).await?;
        for ev in chunk {
            if events.try_send(ev).is_err() {
                break;
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(
                events = dropped.len(),
                "shutting down with events read but not queued: they are lost"
            );
        }
        Ok(())
    }

    /// Queues `to_send` (events with their line numbers, in order) in chunks that
    /// fit in the room: each chunk is written to the queue file, handed to the
    /// sender, and then the position past its lines goes to the [`Saver`]
    /// (only if the write put every pending event in the file), which saves it
    /// once the file is synced; with nothing to queue, the position goes to the
    /// saver if it moved. Returns `false` if shutdown came while waiting for
    /// room.
    async fn deliver(
        &mut self,
        saver: &Saver,
        to_send: Vec<(Event, u64)>,
        progress: &mut Progress,
        events: &mpsc::Sender<Event>,
        shutdown: &CancellationToken,
        pauses: &mut Pauses,
    ) -> Result<bool, MonitorError> {
        // The first line of what is not yet queued, from each index on.
        let mut first_left = vec![u64::MAX; to_send.len() + 1];
        for (i, (_, line)) in to_send.iter().enumerate().rev() {
            first_left[i] = first_left[i + 1].min(*line);
        }
        let mut to_send = to_send.into_iter();
        let mut sent = 0;
        while to_send.len() > 0 {
            let mut fits = to_send.len().min(self.room.available());
            if fits == 0 {
                self.paused(pauses, to_send.len());
                tokio::select! {
                    () = self.room.take(1) => fits = 1,
                    () = events.closed() => return Err(MonitorError::task("sender", "stopped")),
                    () = shutdown.cancelled() => {
                        let left = to_send.len();
                        if self.state.is_some() {
                            tracing::warn!(
                                events = left,
                                "shutting down with events read but not queued: they are read again at the next start"
                            );
                        } else {
                            tracing::warn!(
                                events = left,
                                "shutting down with events read but not queued: they are lost"
                            );
                        }
                        return Ok(false);
                    }
                }
            } else {
                self.room.try_take(fits);
            }
            let chunk: Vec<Event> = to_send.by_ref().take(fits).map(|(e, _)| e).collect();
            sent += chunk.len();
            let next = first_left[sent];
            let position = self.resume_point(progress, (next != u64::MAX).then_some(next));
            // Written, not yet synced: the saver syncs it after the hand-over,
            // before the position moves past the chunk's lines.
            let written = self.queue(&chunk).await;
            let mut handed = Ok(());
            for ev in chunk {
                // The room bounds the queue, so this does not wait.
                if events.send(ev).await.is_err() {
                    handed = Err(MonitorError::task("sender", "stopped"));
                    break;
                }
            }
            // Off the report's path: the sender has the chunk already, and the
            // next lines do not wait for the syncs. Synced and saved also when
            // the sender has stopped: the chunk is in the queue file, the next
            // start resends it from there.
            if written {
                self.save(saver, position, progress)?;
            }
            handed?;
        }
        if sent == 0 {
            let position = self.resume_point(progress, None);
            self.commit(saver, &[], position, progress).await?;
        }
        if self.room.available() >= self.resume_at() {
            self.resumed(pauses);
        }
        Ok(true)
    }

    /// The position to save when `first_unqueued` is the first line of an event
    /// not yet in the queue file; `None` if it is what was saved last.
    fn resume_point(
        &self,
        progress: &mut Progress,
        first_unqueued: Option<u64>,
    ) -> Option<Vec<FilePos>> {
        let first = match (self.filter.oldest_line(), first_unqueued) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Always, to prune the checkpoints.
        let position = progress.resume_point(first);
        self.state.as_ref()?;
        let position = position?;
        if progress.saved.as_ref() == Some(&position) {
            return None;
        }
        Some(position)
    }

    /// Writes `events` to the queue file and hands `position` to the
    /// [`Saver`], for the paths where nothing waits for the events.
    async fn commit(
        &self,
        saver: &Saver,
        events: &[Event],
        position: Option<Vec<FilePos>>,
        progress: &mut Progress,
    ) -> Result<(), MonitorError> {
        if events.is_empty() && position.is_none() {
            return Ok(());
        }
        if self.queue(events).await {
            self.save(saver, position, progress)?;
        }
        Ok(())
    }

    /// Writes `events` to the queue file (not synced: the [`Saver`] syncs it
    /// before it saves a position past their lines). `true` when every pending
    /// event is written, also those of an earlier failed write. `false`
    /// without state, or after a failure, which is logged, not fatal.
    ///
    /// Usually written on this task, not on a blocking thread: an append goes
    /// to the page cache (a chunk's lines, a few hundred bytes per event),
    /// while a blocking thread and back cost two thread wake-ups on the
    /// report's path. When the store is busy (the sender compacting the file
    /// after an answer, or the saver rewriting it after a failed sync) or this
    /// write would rewrite the file itself (after a failed write), the write
    /// goes to a blocking thread: those hold the lock through two syncs, which
    /// must not stall the runtime's thread (the tail's too).
    async fn queue(&self, events: &[Event]) -> bool {
        let Some(state) = &self.state else {
            return false;
        };
        let inline = match state.try_lock() {
            Ok(mut st) if !st.rewrite_due() => Some(st.write_all(events)),
            _ => None,
        };
        let written = match inline {
            Some(r) => r,
            None => {
                let (state, events) = (state.clone(), events.to_vec());
                let write = move || {
                    state
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .write_all(&events)
                };
                match tokio::task::spawn_blocking(write).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot update the saved state");
                        return false;
                    }
                }
            }
        };
        match written {
            Ok(()) => true,
            Err(e) => {
                warn_state(&e);
                false
            }
        }
    }

    /// Hands `position` (if any) to the [`Saver`]; called only after a
    /// [`Pipeline::queue`] that returned `true`, so the saver's sync puts
    /// every event whose line the position passes on the disk before the
    /// position is saved (an answer meanwhile removes an event from the queue
    /// file, which is fine: its line needs nothing more). The saver tries a
    /// failed save again with the next position, or after a while.
    fn save(
        &self,
        saver: &Saver,
        position: Option<Vec<FilePos>>,
        progress: &mut Progress,
    ) -> Result<(), MonitorError> {
        let Some(position) = position else {
            return Ok(());
        };
        saver.save(position.clone(), self.filter.info_seen())?;
        progress.saved = Some(position);
        Ok(())
    }

    /// How many free places end an episode of backpressure.
    fn resume_at(&self) -> usize {
        (self.room.capacity() / 2).max(1)
    }

    fn paused(&self, pauses: &mut Pauses, waiting: usize) {
        if pauses.since.is_none() {
            pauses.since = Some(Instant::now());
            pauses.episodes += 1;
            tracing::warn!(
                capacity = self.room.capacity(),
                waiting,
                episodes = pauses.episodes,
                "event queue full, reading paused until the publisher catches up"
            );
        }
    }

    fn resumed(&self, pauses: &mut Pauses) {
        if let Some(since) = pauses.since.take() {
            tracing::info!(
                capacity = self.room.capacity(),
                paused_ms = since.elapsed().as_millis() as u64,
                "event queue has room again, reading resumed"
            );
        }
    }

    /// The events to queue for `verdicts`, each with its line number, logging the
    /// others.
    fn events_of(&self, verdicts: impl Iterator<Item = Verdict>) -> Vec<(Event, u64)> {
        verdicts.filter_map(|v| self.event_of(v)).collect()
    }

    fn event_of(&self, v: Verdict) -> Option<(Event, u64)> {
        match v.seen().action {
            Action::Ban => self.counters.found_ban.inc(),
            Action::Unban => self.counters.found_unban.inc(),
        };
        let seen = match v {
            Verdict::Report(seen) => seen,
            Verdict::Suppress(seen, reason) => {
                tracing::debug!(
                    reason = %reason,
                    action = %seen.action,
                    jail = %seen.jail,
                    ip = %seen.ip,
                    line = seen.line,
                    "ignored"
                );
                self.counters.ignored.inc();
                return None;
            }
        };
        if self.ignore_jails.contains(&seen.jail) {
            tracing::debug!(
                reason = %"ignore_jails",
                action = %seen.action,
                jail = %seen.jail,
                ip = %seen.ip,
                line = seen.line,
                "ignored"
            );
            self.counters.ignored.inc();
            return None;
        }
        let id = EventId::from_u128(uuid::Uuid::new_v4().as_u128());
        let time_ms = crate::event_time_ms(seen.time);
        match Event::new(
            id,
            self.node.clone(),
            seen.jail,
            seen.action,
            seen.ip,
            time_ms,
        ) {
            Ok(ev) => {
                tracing::debug!(
                    action = %ev.action,
                    jail = %ev.jail,
                    ip = %ev.ip,
                    id = %ev.id,
                    line = seen.line,
                    "queued"
                );
                Some((ev, seen.line))
            }
            Err(e) => {
                tracing::warn!(error = %e, line = seen.line, "cannot build the event");
                None
            }
        }
    }
}

fn warn_state(e: &state::StateError) {
    tracing::warn!(
        error = %f2b_common::daemon::error_chain(e),
        "cannot update the saved state"
    );
}

fn log_skipped(entry: &LogEntry, line: u64) {
    if let Kind::Skipped { jail, reason } = &entry.kind {
        tracing::debug!(reason = %reason, jail = %jail, line, "ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> FilePos {
        FilePos {
            dev: 1,
            ino: 2,
            offset,
        }
    }

    #[test]
    fn resume_point_is_before_the_first_line_needed() {
        let mut p = Progress {
            current: vec![at(0)],
            ..Progress::default()
        };
        // Batch 1: a Flush line (line 1) and a Ban (line 2), nothing held at its end.
        p.checkpoint(1, true);
        p.advance(at(50));
        p.checkpoint(2, false);
        p.advance(at(90));
        assert_eq!(p.resume_point(None), Some(vec![at(90)]));
        // Batch 2: an Unban held after that Flush line (line 3): read again from
        // the Flush line, though its batch is long done.
        p.checkpoint(3, false);
        p.advance(at(130));
        assert_eq!(p.resume_point(Some(1)), Some(vec![at(0)]));
        assert_eq!(p.resume_point(Some(3)), Some(vec![at(90)]));
        // A line with no checkpoint (never needed): keep the last saved position.
        assert_eq!(p.resume_point(Some(1)), None);
    }

    #[test]
    fn a_new_file_joins_the_position() {
        let mut p = Progress {
            current: vec![at(500)],
            ..Progress::default()
        };
        let new = FilePos {
            dev: 1,
            ino: 3,
            offset: 20,
        };
        p.advance(new);
        p.checkpoint(7, false);
        assert_eq!(p.resume_point(Some(7)), Some(vec![at(500), new]));
    }

    /// Failed writes of the state files, injected: no event read may be lost
    /// to a crash after them, and nothing panics.
    mod failed_writes {
        use std::fs::OpenOptions;
        use std::io::Write;
        use std::path::PathBuf;
        use std::time::Duration;

        use super::*;
        use crate::state::Saved;
        use crate::tail::Tailer;

        fn node() -> NodeName {
            NodeName::new("web1").unwrap()
        }

        fn ban(ip: &str) -> String {
            format!(
                "2026-11-21 04:52:53,446 fail2ban.actions        [4994]: NOTICE  [sshd] Ban {ip}\n"
            )
        }

        /// A log file, its tailer, the state store and a pipeline between them.
        struct Rig {
            _dir: tempfile::TempDir,
            log: PathBuf,
            state_dir: PathBuf,
            tailer: Tailer,
            state: Arc<Mutex<StateStore>>,
            lines: mpsc::Sender<Batch>,
            events: mpsc::Receiver<Event>,
            task: tokio::task::JoinHandle<Result<(), MonitorError>>,
        }

        impl Rig {
            /// As after a first run that saved its position at the end of an
            /// empty log.
            fn start() -> Rig {
                let dir = tempfile::tempdir().unwrap();
                let log = dir.path().join("fail2ban.log");
                std::fs::write(&log, "").unwrap();
                let state_dir = dir.path().join("state");
                let tailer = Tailer::at_end(&log, Instant::now()).unwrap();
                let (mut store, _) = StateStore::open(&state_dir, &node(), &log).unwrap();
                store.save_position(&tailer.position(), false).unwrap();
                let state = Arc::new(Mutex::new(store));
                let pipeline = Pipeline {
                    node: node(),
                    ignore_jails: Vec::new(),
                    state: Some(state.clone()),
                    room: Arc::new(Room::new(16, 0)),
                    filter: StopFilter::default(),
                    counters: Counters::new(&crate::detached_metrics()),
                };
                let (lines, line_rx) = mpsc::channel(8);
                let (event_tx, events) = mpsc::channel(16);
                let task = tokio::spawn(pipeline.process(
                    tailer.position(),
                    true,
                    line_rx,
                    event_tx,
                    CancellationToken::new(),
                ));
                Rig {
                    _dir: dir,
                    log,
                    state_dir,
                    tailer,
                    state,
                    lines,
                    events,
                    task,
                }
            }

            fn faults(&self, f: impl FnOnce(&mut crate::state::Faults)) {
                f(&mut self.state.lock().unwrap().faults);
            }

            /// Waits until the faults say `done` (the saver takes a gate or a
            /// fault as it prepares the step it holds up or fails).
            async fn until_faults(&self, done: fn(&crate::state::Faults) -> bool) {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !done(&self.state.lock().unwrap().faults) {
                    assert!(std::time::Instant::now() < deadline, "no save within 20 s");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }

            /// Appends `text` to the log and hands what the tailer reads to the
            /// pipeline.
            async fn append(&mut self, text: &str) {
                OpenOptions::new()
                    .append(true)
                    .open(&self.log)
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
                let (mut lines, mut changes) = (Vec::new(), Vec::new());
                self.tailer
                    .read(Instant::now(), &mut lines, &mut changes)
                    .unwrap();
                let position = self.tailer.position();
                self.lines.send(Batch { lines, position }).await.unwrap();
            }

            /// The next event handed to the sender.
            async fn event(&mut self) -> Event {
                tokio::time::timeout(Duration::from_secs(10), self.events.recv())
                    .await
                    .expect("an event within 10 s")
                    .expect("the pipeline is running")
            }

            /// Stops the pipeline (as a crash would, with no answer from the
            /// publisher), then opens the state as the next start does and
            /// reads the log from the saved position: what was left, and the
            /// lines read again.
            async fn restart(self) -> (Saved, Vec<String>) {
                let Rig {
                    _dir,
                    log,
                    state_dir,
                    lines,
                    state,
                    task,
                    ..
                } = self;
                drop(lines);
                task.await.unwrap().unwrap();
                drop(state);
                reopen(&state_dir, &log)
            }
        }

        /// Opens the state in `state_dir` as a start does and reads `log` from
        /// its saved position: what was left, and the lines read again.
        fn reopen(state_dir: &std::path::Path, log: &std::path::Path) -> (Saved, Vec<String>) {
            let (_store, saved) = StateStore::open(state_dir, &node(), log).unwrap();
            let position = saved.position.clone().expect("a saved position");
            let mut tailer = Tailer::resume(log, &position, Instant::now()).unwrap();
            let (mut lines, mut changes) = (Vec::new(), Vec::new());
            tailer
                .read(Instant::now(), &mut lines, &mut changes)
                .unwrap();
            (saved, lines.into_iter().map(|l| l.text + "\n").collect())
        }

        /// The state files as they are now in `from`, copied to `to`: what a
        /// `kill -9` at this moment would leave (the page cache outlives the
        /// process; the files were synced before anything was sent anyway).
        fn snapshot(from: &std::path::Path, to: &std::path::Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let path = entry.unwrap().path();
                let ext = path.extension().and_then(|e| e.to_str());
                if matches!(ext, Some("position" | "queue")) {
                    std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
                }
            }
        }

        /// A crash while `hold` keeps a step after the hand-over waiting at a
        /// gate: starts a rig, appends a Ban, waits for it to be handed over
        /// and copies the state files to `crashed` (a kill -9 now), from which
        /// a start resends the event under its id and reads its line again.
        /// Returns the rig, the gate's key, the event and `crashed`.
        async fn crash_while_held(
            hold: fn(&mut crate::state::Faults, std::sync::mpsc::Receiver<()>),
        ) -> (Rig, std::sync::mpsc::Sender<()>, Event, PathBuf) {
            let mut rig = Rig::start();
            let (release, gate) = std::sync::mpsc::channel::<()>();
            rig.faults(|f| hold(f, gate));
            rig.append(&ban("192.0.2.1")).await;
            // Handed over while the held step waits at the gate.
            let sent = rig.event().await;
            let crashed = rig._dir.path().join("crashed");
            snapshot(&rig.state_dir, &crashed);
            let (saved, again) = reopen(&crashed, &rig.log);
            assert_eq!(saved.pending, std::slice::from_ref(&sent));
            assert_eq!(again, [ban("192.0.2.1")]);
            (rig, release, sent, crashed)
        }

        /// A start from `crashed` has nothing to resend and reads the Ban's
        /// line again: not lost.
        fn nothing_pending_and_the_line_read_again(
            crashed: &std::path::Path,
            log: &std::path::Path,
        ) {
            let (saved, again) = reopen(crashed, log);
            assert!(saved.pending.is_empty());
            assert_eq!(again, [ban("192.0.2.1")]);
        }

        /// Not killed: the held step goes through once released, and the
        /// position is saved past the line.
        async fn release_and_restart(rig: Rig, release: std::sync::mpsc::Sender<()>, sent: Event) {
            release.send(()).unwrap();
            let (saved, again) = rig.restart().await;
            assert_eq!(saved.pending, [sent]);
            assert!(again.is_empty(), "read again: {again:?}");
        }

        /// The window this ordering opens: the event goes to the sender once
        /// it is in the queue file, before the position is saved. A crash in
        /// it loses nothing: the event is resent with its id, or, if its
        /// answer was recorded, its line is read again (a new id, answered
        /// `unchanged`, as after a crash between the queue file's sync and
        /// the position's rename when the save came first).
        #[tokio::test]
        async fn a_crash_between_the_hand_over_and_the_position_save_loses_nothing() {
            // Handed over while the position save waits at the gate (with the
            // save first, this would wait for ever and time out); killed then,
            // before any answer: resent from the queue file under its id, and
            // its line read again.
            let (rig, release, sent, crashed) =
                crash_while_held(|f, gate| f.position_gate = Some(gate)).await;
            // Killed after the sender recorded the publisher's answer: nothing
            // to resend, and the line is read again: not lost.
            {
                let (mut store, _) = StateStore::open(&crashed, &node(), &rig.log).unwrap();
                store.done(sent.id).unwrap();
            }
            nothing_pending_and_the_line_read_again(&crashed, &rig.log);
            release_and_restart(rig, release, sent).await;
        }

        /// The report does not wait for the queue file's sync: the event goes
        /// to the sender once written. A crash of the monitor then keeps the
        /// written lines; a crash of the machine may lose them, but the position
        /// was not saved past the line, which is read again: nothing lost.
        #[tokio::test]
        async fn the_hand_over_does_not_wait_for_the_queue_files_sync() {
            // Handed over while the sync waits at the gate; a kill -9 then:
            // resent from the queue file, and the line read again (the
            // position is still before it).
            let (rig, release, sent, crashed) =
                crash_while_held(|f, gate| f.sync_gate = Some(gate)).await;
            // A power loss now: the unsynced line may be gone from the queue
            // file, but the line is read again.
            std::fs::write(
                std::fs::read_dir(&crashed)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .find(|p| p.extension().is_some_and(|e| e == "queue"))
                    .unwrap(),
                "",
            )
            .unwrap();
            nothing_pending_and_the_line_read_again(&crashed, &rig.log);
            release_and_restart(rig, release, sent).await;
        }

        /// A write that finds the store busy (here held by another thread, as
        /// the sender holds it through a compaction's two syncs) waits on a
        /// blocking thread, not on the runtime: on this test's one-thread
        /// runtime, the task that releases the store still runs meanwhile.
        /// Waiting on the runtime instead, nothing would release it, and the
        /// holder would give up after 10 s.
        #[tokio::test]
        async fn a_write_waits_for_a_busy_store_off_the_runtime() {
            let mut rig = Rig::start();
            let (held_tx, held) = std::sync::mpsc::channel::<()>();
            let (release, released) = std::sync::mpsc::channel::<()>();
            let state = rig.state.clone();
            let holder = std::thread::spawn(move || {
                let _store = state.lock().unwrap();
                held_tx.send(()).unwrap();
                released.recv_timeout(Duration::from_secs(10)).is_ok()
            });
            held.recv().unwrap();
            rig.append(&ban("192.0.2.7")).await;
            // The pipeline runs now: it reads the line and tries the write.
            for _ in 0..16 {
                tokio::task::yield_now().await;
            }
            release.send(()).unwrap();
            let event = rig.event().await;
            assert_eq!(event.ip.to_string(), "192.0.2.7");
            assert!(
                holder.join().unwrap(),
                "released by this task, not by the holder's timeout"
            );
            let (saved, again) = rig.restart().await;
            assert_eq!(saved.pending, [event]);
            assert!(again.is_empty(), "read again: {again:?}");
        }

        /// The next lines do not wait for a save in progress: while the
        /// first chunk's sync (`hold` = the sync gate) or its position's
        /// write (the position gate) is held, a second Ban is read, written
        /// to the queue file and handed over. Released, the saver saves the
        /// newest position, past both lines, after syncing both events.
        async fn the_next_lines_do_not_wait_for_the_save(
            hold: fn(&mut crate::state::Faults, std::sync::mpsc::Receiver<()>),
        ) {
            let mut rig = Rig::start();
            let (release, gate) = std::sync::mpsc::channel::<()>();
            rig.faults(|f| hold(f, gate));
            rig.append(&ban("192.0.2.1")).await;
            let first = rig.event().await;
            // Only once the first save is under way (held at its gate), so that
            // the second line meets it (the saver waits SAVE_DELAY first).
            rig.until_faults(|f| f.sync_gate.is_none() && f.position_gate.is_none())
                .await;
            rig.append(&ban("192.0.2.2")).await;
            let second = rig.event().await;
            assert_eq!(second.ip.to_string(), "192.0.2.2");
            // Both are in the queue file already (a kill -9 now resends them).
            let crashed = rig._dir.path().join("crashed");
            snapshot(&rig.state_dir, &crashed);
            let (saved, _) = reopen(&crashed, &rig.log);
            assert_eq!(saved.pending, [first.clone(), second.clone()]);
            release.send(()).unwrap();
            let (saved, again) = rig.restart().await;
            assert_eq!(saved.pending, [first, second]);
            assert!(again.is_empty(), "read again: {again:?}");
        }

        #[tokio::test]
        async fn the_next_lines_do_not_wait_for_the_queue_files_sync() {
            the_next_lines_do_not_wait_for_the_save(|f, gate| f.sync_gate = Some(gate)).await;
        }

        #[tokio::test]
        async fn the_next_lines_do_not_wait_for_the_position_save() {
            the_next_lines_do_not_wait_for_the_save(|f, gate| f.position_gate = Some(gate)).await;
        }

        /// One failure (`fault`) of the queue file for the first of two
        /// chunks: the next chunk's write rewrites the journal whole, durably,
        /// so both events are on the disk and the position may be past both
        /// lines (same ids, same order).
        async fn one_failure_is_repaired_by_the_next_chunk(fault: fn(&mut crate::state::Faults)) {
            let mut rig = Rig::start();
            rig.faults(fault);
            rig.append(&ban("192.0.2.1")).await;
            let first = rig.event().await;
            // The failure happened (the saver waits SAVE_DELAY before its sync).
            rig.until_faults(|f| f.sync == 0 && f.journal == 0).await;
            rig.append(&ban("192.0.2.2")).await;
            let second = rig.event().await;
            let (saved, again) = rig.restart().await;
            assert_eq!(saved.pending, [first, second]);
            assert!(again.is_empty(), "read again: {again:?}");
        }

        #[tokio::test]
        async fn a_failed_queue_sync_is_retried_with_the_next_chunk() {
            one_failure_is_repaired_by_the_next_chunk(|f| f.sync = 1).await;
        }

        #[tokio::test]
        async fn a_failed_journal_write_is_retried_with_the_next_chunk() {
            // The disk is full for one write, half of which lands.
            one_failure_is_repaired_by_the_next_chunk(|f| f.journal = 1).await;
        }

        #[tokio::test]
        async fn while_the_journal_fails_the_position_stays_before_the_lines() {
            let mut rig = Rig::start();
            // The disk stays full for the journal; the position still saves.
            rig.faults(|f| f.journal = u32::MAX);
            rig.append(&ban("192.0.2.1")).await;
            // Delivered from memory all the same.
            assert_eq!(rig.event().await.ip.to_string(), "192.0.2.1");
            rig.append(&ban("192.0.2.2")).await;
            assert_eq!(rig.event().await.ip.to_string(), "192.0.2.2");
            // A line with no event: only the position would move.
            let found = "2026-11-21 04:52:54,000 fail2ban.filter         [4994]: INFO    [sshd] Found 192.0.2.3\n";
            rig.append(found).await;
            let (saved, again) = rig.restart().await;
            assert!(saved.pending.is_empty());
            // Not past the failed chunks' lines: the next start reads them again.
            assert_eq!(
                again,
                [ban("192.0.2.1"), ban("192.0.2.2"), found.to_owned()]
            );
        }

        /// A failed save is tried again after a while, though no line comes
        /// to move the position: a quiet log does not leave it behind until
        /// the next Ban or the monitor's stop.
        #[tokio::test]
        async fn a_failed_position_save_is_retried_without_a_new_line() {
            let mut rig = Rig::start();
            rig.faults(|f| f.position = 1);
            rig.append(&ban("192.0.2.1")).await;
            rig.event().await;
            // The position file as a crash would leave it, until it is past
            // the line (the retry comes after saver::RETRY_FIRST).
            let deadline = Instant::now() + saver::RETRY_FIRST + Duration::from_secs(10);
            for n in 0.. {
                let crashed = rig._dir.path().join(format!("crashed-{n}"));
                snapshot(&rig.state_dir, &crashed);
                let (_, again) = reopen(&crashed, &rig.log);
                if again.is_empty() {
                    break;
                }
                assert_eq!(again, [ban("192.0.2.1")]);
                assert!(Instant::now() < deadline, "the failed save was not retried");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        #[tokio::test]
        async fn a_failed_position_save_is_retried() {
            let mut rig = Rig::start();
            rig.faults(|f| f.position = 1);
            rig.append(&ban("192.0.2.1")).await;
            let first = rig.event().await;
            let (saved, again) = rig.restart().await;
            assert_eq!(saved.pending, [first]);
            // Saved at shutdown, though it had been computed before.
            assert!(again.is_empty(), "read again: {again:?}");
        }
    }
}
