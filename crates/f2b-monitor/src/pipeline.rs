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
//!    file, which is synced, together with the new position (see below); only
//!    then is the chunk handed to the sender. With no free place, reading pauses
//!    (backpressure: the log file keeps the lines). An episode of backpressure
//!    starts with a warning and ends, with an info line, once half the places
//!    are free again: one warning for a whole overload, not one per event;
//! 3. the position saved is the checkpoint of the first line whose outcome is not
//!    on the disk yet: an Unban still held by the stop filter (or the Flush line
//!    it follows), or an event not yet in the queue file. After a crash, even
//!    `kill -9` within a hold, the next start reads those lines again and reaches
//!    the same verdicts. The price: events of the few seconds after a held Unban
//!    that were already queued are read again after a crash and sent a second
//!    time under new ids (the publisher's state dedup answers them `unchanged`),
//!    and so is a chunk whose position was not yet renamed into place when the
//!    machine crashed.
//!
//! A failed write of the queue file (a full disk) is logged, not fatal: the
//! chunk still goes to the sender (the cluster keeps getting the bans) and its
//! events stay pending in the [`StateStore`], which retries them with the next
//! write, rewriting the queue file whole ([`StateStore::add_all`]). The position
//! is saved only after a write that put every pending event on the disk; until
//! then it stays where it was, before the failed chunk's lines. So after a crash
//! each event is either in the queue file (resent with its id) or read again
//! from the log (sent under a new id); an event answered meanwhile needs
//! neither. A failed save of the position is retried at the next commit.
//!
//! The file writes run on tokio's blocking threads, never on the async workers.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Local;
use f2b_proto::{Event, EventId, JailName, NodeName};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::parse::{self, Kind, LogEntry};
use crate::send::Room;
use crate::state::{self, StateStore};
use crate::stop::{StopFilter, Verdict};
use crate::tail::{Batch, FilePos};
use crate::MonitorError;

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
    /// What was last saved.
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

/// What the blocking side of a commit needs.
struct Commit {
    events: Vec<Event>,
    position: Option<Vec<FilePos>>,
    info_seen: bool,
}

impl Pipeline {
    /// Runs until `lines` closes (the follower stopped) or, while waiting for room
    /// in the queue, `shutdown` comes. `start` is the follower's position before
    /// its first batch. Events go to `events` in order.
    pub async fn process(
        mut self,
        start: Vec<FilePos>,
        mut lines: mpsc::Receiver<Batch>,
        events: mpsc::Sender<Event>,
        shutdown: CancellationToken,
    ) -> Result<(), MonitorError> {
        let mut progress = Progress {
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
                    None => return self.finish(&mut progress, &events).await,
                },
                () = sleep => self.filter.release_due(Instant::now(), &mut verdicts),
                () = self.room.wait_free(self.resume_at()), if under_pressure => {
                    self.resumed(&mut pauses);
                    continue;
                }
            }
            let to_send = self.events_of(verdicts.drain(..));
            let done = self
                .deliver(to_send, &mut progress, &events, &shutdown, &mut pauses)
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
        self.commit(chunk.clone(), position, progress).await?;
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
    /// fit in the room, each chunk in the queue file and the position saved
    /// before it is handed to the sender; then saves the position if it moved.
    /// Returns `false` if shutdown came while waiting for room.
    async fn deliver(
        &mut self,
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
            self.commit(chunk.clone(), position, progress).await?;
            for ev in chunk {
                // The room bounds the queue, so this does not wait.
                if events.send(ev).await.is_err() {
                    return Err(MonitorError::task("sender", "stopped"));
                }
            }
        }
        if sent == 0 {
            let position = self.resume_point(progress, None);
            self.commit(Vec::new(), position, progress).await?;
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

    /// Writes `events` to the queue file (synced) and then `position`, on a
    /// blocking thread. A failure is logged, not fatal, and never moves the
    /// position: it is saved only once every pending event is in the queue file
    /// (see the module documentation), and recorded in `progress` only once
    /// saved.
    async fn commit(
        &self,
        events: Vec<Event>,
        position: Option<Vec<FilePos>>,
        progress: &mut Progress,
    ) -> Result<(), MonitorError> {
        let Some(state) = self.state.clone() else {
            return Ok(());
        };
        if events.is_empty() && position.is_none() {
            return Ok(());
        }
        let commit = Commit {
            events,
            position,
            info_seen: self.filter.info_seen(),
        };
        let saved = tokio::task::spawn_blocking(move || {
            let mut st = match state.lock() {
                Ok(st) => st,
                Err(poisoned) => poisoned.into_inner(),
            };
            // `add_all` is `Ok` only once every pending event is on the disk,
            // also those of an earlier failed write.
            let r = st
                .add_all(&commit.events)
                .and_then(|()| match &commit.position {
                    Some(p) => st.save_position(p, commit.info_seen).map(|()| Some(p)),
                    None => Ok(None),
                });
            match r {
                Ok(saved) => saved.cloned(),
                Err(e) => {
                    warn_state(&e);
                    None
                }
            }
        })
        .await
        .map_err(|e| MonitorError::task("state", e))?;
        if saved.is_some() {
            progress.saved = saved;
        }
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
                };
                let (lines, line_rx) = mpsc::channel(8);
                let (event_tx, events) = mpsc::channel(16);
                let task = tokio::spawn(pipeline.process(
                    tailer.position(),
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
                let (_store, saved) = StateStore::open(&state_dir, &node(), &log).unwrap();
                let position = saved.position.clone().expect("a saved position");
                let mut tailer = Tailer::resume(&log, &position, Instant::now()).unwrap();
                let (mut lines, mut changes) = (Vec::new(), Vec::new());
                tailer
                    .read(Instant::now(), &mut lines, &mut changes)
                    .unwrap();
                (saved, lines.into_iter().map(|l| l.text + "\n").collect())
            }
        }

        #[tokio::test]
        async fn a_failed_journal_write_is_retried_with_the_next_chunk() {
            let mut rig = Rig::start();
            // The disk is full for one write, half of which lands.
            rig.faults(|f| f.journal = 1);
            rig.append(&ban("192.0.2.1")).await;
            let first = rig.event().await;
            rig.append(&ban("192.0.2.2")).await;
            let second = rig.event().await;
            let (saved, again) = rig.restart().await;
            // Chunk 2's write put chunk 1 on the disk too (same id, same
            // order): the position may be past both lines.
            assert_eq!(saved.pending, [first, second]);
            assert!(again.is_empty(), "read again: {again:?}");
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
