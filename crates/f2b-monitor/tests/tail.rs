//! The tailer, driven by real file operations in a temporary directory. The
//! async tests go through inotify ([`Follower`]) and wait for lines with a
//! deadline; the sync tests call [`Tailer::read`] directly where the order of
//! reads must be exact.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use f2b_monitor::tail::{Batch, Change, FilePos, Follower, Tailer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

struct Running {
    rx: mpsc::Receiver<Batch>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), f2b_monitor::MonitorError>>,
    offset: u64,
}

async fn start(path: &Path) -> Running {
    let follower = Follower::start(path.to_owned(), Duration::from_secs(600), None)
        .await
        .unwrap();
    let offset = follower.offset();
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(follower.run(tx, stop.clone()));
    Running {
        rx,
        stop,
        task,
        offset,
    }
}

impl Running {
    /// The next `n` lines, waiting at most [`WAIT`] in all.
    async fn lines(&mut self, n: usize) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut got = Vec::new();
        while got.len() < n {
            let batch = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out with {got:?}, expected {n} lines"))
                .expect("follower ended");
            got.extend(batch.lines.into_iter().map(|l| l.text));
        }
        got
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("follower stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn starts_at_the_end_and_reads_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "old 1\nold 2\n");
    let mut r = start(&path).await;
    assert_eq!(r.offset, 12);
    append(&path, "new 1\n");
    assert_eq!(r.lines(1).await, ["new 1"]);
    append(&path, "new 2\nnew 3\n");
    assert_eq!(r.lines(2).await, ["new 2", "new 3"]);
    r.stop().await;
}

#[tokio::test]
async fn starting_mid_line_skips_the_rest_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "old\nhalf a li");
    let mut r = start(&path).await;
    append(&path, "ne\nwhole\n");
    assert_eq!(r.lines(1).await, ["whole"]);
    r.stop().await;
}

#[tokio::test]
async fn partial_line_is_held_until_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let mut r = start(&path).await;
    append(&path, "first\nsec");
    assert_eq!(r.lines(1).await, ["first"]);
    append(&path, "ond\n");
    assert_eq!(r.lines(1).await, ["second"]);
    r.stop().await;
}

#[tokio::test]
async fn rename_create_then_flushlogs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let rotated = dir.path().join("fail2ban.log.1");
    // fail2ban's handle on its log, opened before the rotation.
    let mut writer = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    writer.write_all(b"before\n").unwrap();
    let mut r = start(&path).await;
    writer.write_all(b"line 1\n").unwrap();
    assert_eq!(r.lines(1).await, ["line 1"]);

    // logrotate: rename, create.
    fs::rename(&path, &rotated).unwrap();
    File::create(&path).unwrap();
    // fail2ban still writes to the old file until flushlogs...
    writer.write_all(b"to old 1\n").unwrap();
    assert_eq!(r.lines(1).await, ["to old 1"]);
    writer.write_all(b"to old 2\n").unwrap();
    assert_eq!(r.lines(1).await, ["to old 2"]);
    // ...which makes it reopen the path.
    writer.write_all(b"last to old\n").unwrap();
    drop(writer);
    append(&path, "to new\n");
    assert_eq!(r.lines(2).await, ["last to old", "to new"]);
    append(&path, "to new 2\n");
    assert_eq!(r.lines(1).await, ["to new 2"]);
    r.stop().await;
}

#[tokio::test]
async fn copytruncate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "0123456789\n");
    let mut r = start(&path).await;
    append(&path, "a\n");
    assert_eq!(r.lines(1).await, ["a"]);
    // logrotate copytruncate: copy elsewhere, truncate in place; the writer
    // (O_APPEND) goes on at the new end.
    fs::copy(&path, dir.path().join("fail2ban.log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, "b\n");
    assert_eq!(r.lines(1).await, ["b"]);
    r.stop().await;
}

#[tokio::test]
async fn deleted_then_recreated_is_read_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "x\n");
    let mut r = start(&path).await;
    append(&path, "one\n");
    assert_eq!(r.lines(1).await, ["one"]);
    fs::remove_file(&path).unwrap();
    append(&path, "two\nthree\n");
    assert_eq!(r.lines(2).await, ["two", "three"]);
    r.stop().await;
}

#[tokio::test]
async fn missing_at_start_then_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let mut r = start(&path).await;
    assert_eq!(r.offset, 0);
    append(&path, "first\n");
    assert_eq!(r.lines(1).await, ["first"]);
    r.stop().await;
}

#[tokio::test]
async fn other_files_in_the_directory_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let mut r = start(&path).await;
    append(&dir.path().join("syslog"), "noise\n");
    append(&path, "mine\n");
    assert_eq!(r.lines(1).await, ["mine"]);
    r.stop().await;
}

// ---------------------------------------------------------------------------
// Synchronous: exact read order.

fn read(t: &mut Tailer, now: Instant) -> (Vec<String>, Vec<Change>) {
    let (mut lines, mut changes) = (Vec::new(), Vec::new());
    t.read(now, &mut lines, &mut changes).unwrap();
    (lines.into_iter().map(|l| l.text).collect(), changes)
}

#[test]
fn partial_line_sync() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now).unwrap();
    append(&path, "hel");
    assert_eq!(read(&mut t, now).0, Vec::<String>::new());
    append(&path, "lo\nwor");
    assert_eq!(read(&mut t, now).0, ["hello"]);
    append(&path, "ld\n");
    assert_eq!(read(&mut t, now).0, ["world"]);
}

#[test]
fn old_file_is_closed_once_the_writer_moved() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let mut writer = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now).unwrap();
    fs::rename(&path, dir.path().join("fail2ban.log.1")).unwrap();
    File::create(&path).unwrap();
    writer.write_all(b"old\n").unwrap();
    let (lines, changes) = read(&mut t, now);
    assert_eq!(lines, ["old"]);
    assert_eq!(changes, [Change::Rotated]);
    // New file still empty: keep reading the old one.
    assert_eq!(t.draining(), 1);
    writer.write_all(b"old 2\n").unwrap();
    assert_eq!(read(&mut t, now).0, ["old 2"]);
    assert_eq!(t.draining(), 1);
    // Writer moves (flushlogs), but wrote once more to the old file first.
    writer.write_all(b"old 3\n").unwrap();
    append(&path, "new\n");
    let (lines, changes) = read(&mut t, now);
    assert_eq!(lines, ["old 3", "new"]);
    assert_eq!(
        changes,
        [Change::Closed {
            offset: 16,
            grace_expired: false
        }]
    );
    assert_eq!(t.draining(), 0);
}

#[test]
fn old_file_is_closed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let grace = Duration::from_secs(30);
    let mut t = Tailer::at_end(&path, now).unwrap().with_grace(grace);
    fs::rename(&path, dir.path().join("fail2ban.log.1")).unwrap();
    File::create(&path).unwrap();
    read(&mut t, now);
    assert_eq!(t.draining(), 1);
    assert_eq!(t.next_deadline(), Some(now + grace));
    read(&mut t, now + grace - Duration::from_millis(1));
    assert_eq!(t.draining(), 1);
    let (_, changes) = read(&mut t, now + grace);
    assert_eq!(t.draining(), 0);
    assert_eq!(
        changes,
        [Change::Closed {
            offset: 0,
            grace_expired: true
        }]
    );
}

#[test]
fn overlong_lines_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now).unwrap();
    let long = "x".repeat(f2b_monitor::tail::MAX_LINE + 10);
    append(&path, &format!("{long}\nshort\n{long}"));
    let lines = read(&mut t, now).0;
    assert!(
        lines.len() == 1 && lines[0] == "short",
        "{} lines",
        lines.len()
    );
    append(&path, "\nafter\n");
    let lines = read(&mut t, now).0;
    assert!(
        lines.len() == 1 && lines[0] == "after",
        "{} lines",
        lines.len()
    );
}

// ---------------------------------------------------------------------------
// Resuming from a saved position.

fn saved_after(path: &Path, text: &str) -> Vec<FilePos> {
    append(path, text);
    let now = Instant::now();
    let t = Tailer::at_end(path, now).unwrap();
    t.position()
}

#[test]
fn resume_continues_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let saved = saved_after(&path, "seen\n");
    append(&path, "while down\npart");
    let now = Instant::now();
    let mut t = Tailer::resume(&path, &saved, now).unwrap();
    assert_eq!(t.offset(), 5);
    assert_eq!(read(&mut t, now).0, ["while down"]);
    // The partial line is not counted as read.
    assert_eq!(t.position()[0].offset, 16);
    let again = t.position();
    let mut t = Tailer::resume(&path, &again, now).unwrap();
    append(&path, "ial\n");
    assert_eq!(read(&mut t, now).0, ["partial"]);
}

#[test]
fn resume_after_rotation_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let saved = saved_after(&path, "seen\n");
    append(&path, "old, unread\n");
    fs::rename(&path, dir.path().join("fail2ban.log.1")).unwrap();
    append(&path, "new 1\n");
    let now = Instant::now();
    let mut t = Tailer::resume(&path, &saved, now).unwrap();
    assert_eq!(t.draining(), 1);
    let (lines, changes) = read(&mut t, now);
    assert_eq!(lines, ["old, unread", "new 1"]);
    assert!(
        matches!(changes[..], [Change::Closed { .. }]),
        "{changes:?}"
    );
}

#[test]
fn resume_after_truncation_or_loss() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let saved = saved_after(&path, "a long line that was seen\n");
    // copytruncate while down.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, "short\n");
    let now = Instant::now();
    let mut t = Tailer::resume(&path, &saved, now).unwrap();
    assert_eq!(read(&mut t, now).0, ["short"]);
    // The saved file is gone entirely: the new one is read from the start.
    fs::remove_file(&path).unwrap();
    append(&path, "fresh\n");
    let mut t = Tailer::resume(&path, &saved, now).unwrap();
    assert_eq!(read(&mut t, now).0, ["fresh"]);
}

// ---------------------------------------------------------------------------
// Bounded reads.

#[test]
fn reads_stop_at_the_line_limit_and_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now).unwrap();
    let text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
    append(&path, &text);
    let mut got = Vec::new();
    let mut reads = 0;
    loop {
        let (mut lines, mut changes) = (Vec::new(), Vec::new());
        let more = t.read(now, &mut lines, &mut changes).unwrap();
        assert!(
            lines.len() <= f2b_monitor::tail::READ_LINES,
            "{}",
            lines.len()
        );
        // Every line says where it ends; the position is after the last one.
        if let Some(last) = lines.last() {
            assert_eq!(t.position(), [last.pos]);
        }
        got.extend(lines.into_iter().map(|l| l.text));
        reads += 1;
        if !more {
            break;
        }
    }
    assert_eq!(reads, 3);
    let want: Vec<String> = (0..5000).map(|i| format!("line {i}")).collect();
    assert_eq!(got, want);
}

#[test]
fn reads_stop_at_the_byte_limit_and_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now).unwrap().with_limits(100, 1000);
    let line = "x".repeat(29);
    append(&path, &format!("{line}\n").repeat(10));
    let (mut lines, mut changes) = (Vec::new(), Vec::new());
    assert!(
        t.read(now, &mut lines, &mut changes).unwrap(),
        "more to read"
    );
    assert_eq!(lines.len(), 3, "100 bytes hold 3 lines of 30");
    // The partial fourth line is not counted as read.
    assert_eq!(t.position()[0].offset, 90);
    let mut total = lines.len();
    loop {
        lines.clear();
        let more = t.read(now, &mut lines, &mut changes).unwrap();
        total += lines.len();
        if !more {
            break;
        }
    }
    assert_eq!(total, 10);
}

#[test]
fn a_rotated_file_is_drained_in_bounded_reads_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let now = Instant::now();
    let mut t = Tailer::at_end(&path, now)
        .unwrap()
        .with_limits(1 << 20, 100);
    let old: String = (0..250).map(|i| format!("old {i}\n")).collect();
    append(&path, &old);
    fs::rename(&path, dir.path().join("fail2ban.log.1")).unwrap();
    append(&path, "new 0\nnew 1\n");
    let mut got = Vec::new();
    let mut all_changes = Vec::new();
    loop {
        let (mut lines, mut changes) = (Vec::new(), Vec::new());
        let more = t.read(now, &mut lines, &mut changes).unwrap();
        assert!(lines.len() <= 100);
        got.extend(lines.into_iter().map(|l| l.text));
        all_changes.extend(changes);
        if !more {
            break;
        }
    }
    let mut want: Vec<String> = (0..250).map(|i| format!("old {i}")).collect();
    want.extend(["new 0".to_owned(), "new 1".to_owned()]);
    assert_eq!(got, want);
    assert!(
        matches!(
            all_changes[..],
            [Change::Rotated, Change::Closed { offset, .. }] if offset == old.len() as u64
        ),
        "{all_changes:?}"
    );
}

#[tokio::test]
async fn a_backlog_arrives_in_bounded_batches() {
    // Resuming after downtime: 10,000 lines written while stopped.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    let saved = saved_after(&path, "seen\n");
    let text: String = (0..10_000).map(|i| format!("while down {i}\n")).collect();
    append(&path, &text);
    let follower = Follower::start(path.clone(), Duration::from_secs(600), Some(saved))
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let task = tokio::spawn(follower.run(tx, stop.clone()));
    let mut n = 0;
    while n < 10_000 {
        let batch = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("the backlog keeps coming with no change of the file")
            .unwrap();
        assert!(
            batch.lines.len() <= f2b_monitor::tail::READ_LINES,
            "{}",
            batch.lines.len()
        );
        assert_eq!(batch.lines[0].text, format!("while down {n}"));
        n += batch.lines.len();
    }
    assert_eq!(n, 10_000);
    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------
// Read errors.

/// A log whose rotated-away files are `fail2ban.log.1` (readable, being drained)
/// and `fail2ban.log.d`, a directory standing for a file that fails to read.
fn failing_rotation(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<FilePos>) {
    use std::os::unix::fs::MetadataExt;
    let path = dir.join("fail2ban.log");
    let rotated = dir.join("fail2ban.log.1");
    append(&rotated, "");
    let broken = dir.join("fail2ban.log.d");
    fs::create_dir(&broken).unwrap();
    append(&path, "");
    let pos = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        FilePos {
            dev: m.dev(),
            ino: m.ino(),
            offset: 0,
        }
    };
    let saved = vec![pos(&path), pos(&rotated), pos(&broken)];
    (path, rotated, saved)
}

#[test]
fn a_read_error_keeps_the_files_and_the_lines_read() {
    let dir = tempfile::tempdir().unwrap();
    let (path, rotated, saved) = failing_rotation(dir.path());
    let now = Instant::now();
    let grace = Duration::from_secs(30);
    let mut t = Tailer::resume(&path, &saved, now)
        .unwrap()
        .with_grace(grace);
    assert_eq!(t.draining(), 2);
    append(&rotated, "old 1\n");
    let (mut lines, mut changes) = (Vec::new(), Vec::new());
    t.read(now, &mut lines, &mut changes).unwrap_err();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].text, "old 1");
    assert_eq!(t.draining(), 2, "no file dropped by the error");
    assert!(t.position().contains(&lines[0].pos), "{:?}", t.position());
    // fail2ban still writes to the rotated file: nothing of it is lost.
    append(&rotated, "old 2\n");
    append(&path, "new\n");
    lines.clear();
    t.read(now, &mut lines, &mut changes).unwrap_err();
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["old 2"], "the newer file waits for the older ones");
    // The broken file is given up after the grace; then the rest is read.
    lines.clear();
    changes.clear();
    assert!(!t.read(now + grace, &mut lines, &mut changes).unwrap());
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["new"]);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c, Change::Abandoned { .. })),
        "{changes:?}"
    );
    assert_eq!(t.draining(), 0);
}

#[tokio::test]
async fn lines_read_before_an_error_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let (path, rotated, saved) = failing_rotation(dir.path());
    append(&rotated, "old 1\nold 2\n");
    let follower = Follower::start(path, Duration::from_secs(600), Some(saved))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(follower.run(tx, stop.clone()));
    let mut r = Running {
        rx,
        stop,
        task,
        offset: 0,
    };
    assert_eq!(r.lines(2).await, ["old 1", "old 2"]);
    r.stop().await;
}

#[test]
fn resume_with_no_file_open_reads_a_new_file_from_the_start() {
    // The monitor stopped while the log did not exist (position: no file); the
    // file created since is all new.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "written while down\n");
    let now = Instant::now();
    let mut t = Tailer::resume(&path, &[], now).unwrap();
    assert_eq!(read(&mut t, now).0, ["written while down"]);
}

/// When the side that takes the lines is gone (the monitor's pipeline failed), the
/// follower ends at once instead of waiting for the next change to the log, which
/// may be hours away: the monitor then stops and its supervisor restarts it.
#[tokio::test]
async fn the_follower_ends_when_nothing_takes_its_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fail2ban.log");
    append(&path, "");
    let follower = Follower::start(path.clone(), Duration::from_secs(600), None)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel::<Batch>(4);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(follower.run(tx, shutdown.clone()));
    drop(rx);
    let ended = tokio::time::timeout(Duration::from_secs(10), run).await;
    shutdown.cancel();
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the follower went on with no one to take its lines: {ended:?}"
    );
}

/// A log in a directory of its own, the directory removed and made again (a
/// package reinstalled, a volume remounted): the new log is followed. inotify
/// ends a watch with its directory, so the follower watches the path again.
#[tokio::test]
async fn a_log_directory_removed_and_made_again_is_followed() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("fail2ban");
    fs::create_dir(&dir).unwrap();
    let path = dir.join("fail2ban.log");
    append(&path, "");
    let mut r = start(&path).await;
    append(&path, "before\n");
    assert_eq!(r.lines(1).await, ["before"]);
    fs::remove_dir_all(&dir).unwrap();
    fs::create_dir(&dir).unwrap();
    // Line by line: the first ones may be read on the old watch's last events.
    for i in 1..=5 {
        let line = format!("after {i}");
        append(&path, &format!("{line}\n"));
        assert_eq!(r.lines(1).await, [line]);
    }
    r.stop().await;
}
