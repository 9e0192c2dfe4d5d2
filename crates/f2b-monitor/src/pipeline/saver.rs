//! Saving the position in the log behind the reports, off the pipeline's path.
//!
//! A save makes every event written to the queue file durable (one sync of
//! that file), then replaces the position file (two more syncs: the file and
//! its directory). On a shared disk that takes from a fraction of a
//! millisecond to several. While the pipeline waited for it, a line fail2ban
//! wrote meanwhile waited too: in benchmark 1 that was 2 ms of a 3.4 ms median
//! from the Ban line to the other node's action. So the pipeline hands each
//! position to the [`Saver`] and goes on with the next lines at once.
//!
//! The saver makes one save at a time, on a blocking thread, [`SAVE_DELAY`]
//! after the position that starts it, and takes only the newest of the
//! positions handed over meanwhile: the sync it makes first
//! covers every event written to the queue file before that position was
//! handed over, so the saved position never passes a line whose event is not
//! on the disk, exactly as when the pipeline saved it itself. The slow steps
//! run without the store's lock ([`StateStore::prepare_sync`],
//! [`StateStore::prepare_position`]): the next event's write and the sender's
//! answers do not wait for them either.
//!
//! A failed save is logged and tried again with the next position, or, if
//! none comes, after [`RETRY_FIRST`] (doubling up to [`RETRY_MAX`] while it
//! keeps failing), and once more when the pipeline ends; until then the saved
//! position stays behind, and a crash makes the next start read those lines
//! again (events reported twice, under new ids, never lost).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::warn_state;
use crate::state::StateStore;
use crate::tail::FilePos;
use crate::MonitorError;

/// How long after a failed save it is tried again when no newer position
/// comes (a quiet log, or a position held back by the stop filter).
pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between tries of a save that keeps failing (a full disk).
pub(crate) const RETRY_MAX: Duration = Duration::from_secs(60);

/// How long a save waits after the position that starts it (taking any newer
/// one handed over meanwhile): the positions of this long go in one save, and
/// its three syncs no longer come right behind the report they follow, which is
/// on its way through the cluster then and would compete with them for the
/// CPUs.
pub(crate) const SAVE_DELAY: Duration = Duration::from_millis(10);

/// One position to save, with the stop filter's `info_seen` at that moment.
#[derive(Debug)]
struct Request {
    position: Vec<FilePos>,
    info_seen: bool,
}

/// Saves the positions handed to it, in order, one save at a time.
#[derive(Debug)]
pub(crate) struct Saver {
    /// Unbounded: each save takes every request waiting, so no more pile up
    /// than the pipeline hands over during one save.
    tx: mpsc::UnboundedSender<Request>,
    task: JoinHandle<Result<(), MonitorError>>,
    /// Saves made (written): logged at the end (debug), read by the tests.
    saves: Arc<AtomicU64>,
}

impl Saver {
    /// Starts the saver of `state`'s position. Without state, nothing is saved.
    pub(crate) fn start(state: Option<Arc<Mutex<StateStore>>>) -> Saver {
        let (tx, rx) = mpsc::unbounded_channel();
        let saves = Arc::new(AtomicU64::new(0));
        let counted = saves.clone();
        let task = tokio::spawn(async move {
            match state {
                Some(state) => run(state, rx, counted).await,
                None => Ok(()),
            }
        });
        Saver { tx, task, saves }
    }

    /// Hands `position` over: it is saved once every event written to the
    /// queue file before this call is synced. Fails only if the saver failed.
    pub(crate) fn save(&self, position: Vec<FilePos>, info_seen: bool) -> Result<(), MonitorError> {
        self.tx
            .send(Request {
                position,
                info_seen,
            })
            .map_err(|_| MonitorError::task("state", "the position saver stopped"))
    }

    /// Saves what was handed over and not saved yet (a save that failed is
    /// tried once more), then returns.
    pub(crate) async fn finish(self) -> Result<(), MonitorError> {
        let Saver { tx, task, saves } = self;
        drop(tx);
        let done = task.await.map_err(|e| MonitorError::task("state", e))?;
        tracing::debug!(
            saves = saves.load(Ordering::Relaxed),
            "position saver finished"
        );
        done
    }
}

async fn run(
    state: Arc<Mutex<StateStore>>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    saves: Arc<AtomicU64>,
) -> Result<(), MonitorError> {
    let mut failed: Option<Request> = None;
    // The wait before the next try of `failed`.
    let mut retry = RETRY_FIRST;
    loop {
        let was_failing = failed.is_some();
        let next = match failed.take() {
            None => rx.recv().await,
            Some(request) => tokio::select! {
                r = rx.recv() => match r {
                    Some(newer) => Some(newer),
                    None => {
                        failed = Some(request);
                        None
                    }
                },
                () = tokio::time::sleep(retry) => Some(request),
            },
        };
        let Some(mut request) = next else {
            break;
        };
        // Only the newest matters: its save covers the others. (A retry of a
        // failed save does not wait again.)
        if !was_failing {
            let until = tokio::time::Instant::now() + SAVE_DELAY;
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(newer) => request = newer,
                        // The pipeline ended: save now.
                        None => break,
                    },
                    () = tokio::time::sleep_until(until) => break,
                }
            }
        }
        while let Ok(newer) = rx.try_recv() {
            request = newer;
        }
        failed = save_off_thread(&state, request).await?;
        if failed.is_none() {
            saves.fetch_add(1, Ordering::Relaxed);
        }
        retry = match (&failed, was_failing) {
            (Some(_), true) => (retry * 2).min(RETRY_MAX),
            _ => RETRY_FIRST,
        };
    }
    // The pipeline ended: a failed save gets one more try.
    if let Some(request) = failed {
        if save_off_thread(&state, request).await?.is_none() {
            saves.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// [`save`] on a blocking thread; the request back if it failed.
async fn save_off_thread(
    state: &Arc<Mutex<StateStore>>,
    request: Request,
) -> Result<Option<Request>, MonitorError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || (!save(&state, &request)).then_some(request))
        .await
        .map_err(|e| MonitorError::task("state", e))
}

/// Syncs the queue file, then writes `request`'s position, each without the
/// store's lock; `false` (logged) if either fails, and then the position is
/// not written.
fn save(state: &Mutex<StateStore>, request: &Request) -> bool {
    let lock = || {
        state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    let sync = lock().prepare_sync();
    let synced = match sync {
        Ok(None) => Ok(None),
        Ok(Some(sync)) => sync.sync().map(Some),
        Err(e) => Err(e),
    };
    let position = {
        let mut st = lock();
        match synced {
            Ok(synced) => {
                if let Some(synced) = synced {
                    st.synced(synced);
                }
                st.prepare_position(&request.position, request.info_seen)
            }
            Err(e) => {
                st.sync_failed();
                drop(st);
                warn_state(&e);
                return false;
            }
        }
    };
    match position.write() {
        Ok(()) => true,
        Err(e) => {
            warn_state(&e);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use f2b_proto::NodeName;

    fn pos(offset: u64) -> Vec<FilePos> {
        vec![FilePos {
            dev: 1,
            ino: 2,
            offset,
        }]
    }

    /// Waits until the saver has made `n` saves (a millisecond of test time at a
    /// look; the save itself runs on a blocking thread, in real time).
    async fn saved(saver: &Saver, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while saver.saves.load(Ordering::Relaxed) < n {
            assert!(std::time::Instant::now() < deadline, "no save within 20 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Positions handed over within SAVE_DELAY of the first go in one save, of the
    /// newest; the end of the pipeline saves at once.
    #[tokio::test(start_paused = true)]
    async fn positions_within_the_delay_go_in_one_save_of_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fail2ban.log");
        let state_dir = dir.path().join("state");
        let node = NodeName::new("web1").unwrap();
        let (store, _) = StateStore::open(&state_dir, &node, &log).unwrap();
        let saver = Saver::start(Some(Arc::new(Mutex::new(store))));
        saver.save(pos(10), false).unwrap();
        tokio::time::sleep(SAVE_DELAY / 2).await;
        assert_eq!(
            saver.saves.load(Ordering::Relaxed),
            0,
            "saved before the delay"
        );
        saver.save(pos(20), false).unwrap();
        tokio::time::sleep(SAVE_DELAY / 4).await;
        saver.save(pos(30), true).unwrap();
        saved(&saver, 1).await;
        // One save, of the newest.
        let file = std::fs::read_dir(&state_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "position"))
            .unwrap();
        let read = std::fs::read_to_string(file).unwrap();
        assert!(read.contains("30"), "{read}");
        assert_eq!(saver.saves.load(Ordering::Relaxed), 1);
        // The pipeline ends: a position handed over is saved without the delay.
        saver.save(pos(40), true).unwrap();
        let saves = saver.saves.clone();
        let start = tokio::time::Instant::now();
        saver.finish().await.unwrap();
        assert_eq!(saves.load(Ordering::Relaxed), 2);
        assert!(start.elapsed() < SAVE_DELAY, "{:?}", start.elapsed());
    }
}
