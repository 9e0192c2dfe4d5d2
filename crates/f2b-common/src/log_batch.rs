//! Log lines held back by a thread and written together.
//!
//! [`init_tracing`](crate::daemon::init_tracing) writes through a [`HoldingWriter`]:
//! each line goes to the sink (standard error or the log file) in its own write,
//! as with tracing's own writers, unless the thread that logs it holds its lines
//! ([`hold_log_lines`]). Then the line is appended to a buffer of that thread, and
//! the buffer is written in one `write_all` when the [`HeldLines`] guard drops
//! (during a panic's unwinding as well), or early when it passes [`HOLD_CAP`].
//! The publisher's serving thread holds the lines it logs while deciding one batch
//! of requests (a `broadcast` line per event): one system call per batch instead
//! of one per line, and one wake-up of whoever reads the pipe (journald). The
//! subscriber's state logs the `applied` lines of the events whose records it
//! writes together, in the same way.
//!
//! The lines stay whole and in the order the thread logged them; only their
//! place among other threads' lines moves (to when the guard drops), so a holder
//! must drop the guard before it waits for anything (the publisher does before
//! the ledger's sync): lines held when the process is killed are lost. A panic's
//! message (printed by the panic hook) comes before the lines held when it
//! happened, which are written as the guard drops during the unwinding. Lines
//! of threads that do not hold are written at once.
//!
//! One line is one write: tracing's fmt layer formats an event into a buffer and
//! hands it to one writer in one `write_all`, so a line is never split between
//! the held buffer and the sink.

use std::cell::RefCell;
use std::io::{self, Write};
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};

use tracing_subscriber::fmt::MakeWriter;

/// The most bytes a thread holds for one sink: past it, the lines held so far
/// are written at once, so that memory stays bounded however long the hold.
pub const HOLD_CAP: usize = 64 * 1024;

/// Where the lines go, shared by every writer of one [`HoldingWriter`].
type Sink = Arc<Mutex<dyn Write + Send>>;

/// What a thread holds: whether it holds, and its lines per sink (one sink in a
/// daemon; tests may have several).
#[derive(Default)]
struct Held {
    holding: bool,
    lines: Vec<(Sink, Vec<u8>)>,
}

thread_local! {
    static HELD: RefCell<Held> = RefCell::default();
}

/// Writes `bytes` to `sink` whole. A sink whose lock was poisoned (a panic while
/// writing) is still written to: losing log lines would be worse.
fn write_to(sink: &Sink, bytes: &[u8]) -> io::Result<()> {
    let mut s = sink.lock().unwrap_or_else(PoisonError::into_inner);
    s.write_all(bytes)
}

/// Starts holding this thread's log lines until the guard drops (see the
/// module's documentation). If the thread already holds, the guard does nothing:
/// the outer hold's end writes the lines.
#[must_use = "the lines are held only until the guard drops"]
pub fn hold_log_lines() -> HeldLines {
    let outer = HELD
        .try_with(|h| match h.try_borrow_mut() {
            Ok(mut h) if !h.holding => {
                h.holding = true;
                true
            }
            _ => false,
        })
        .unwrap_or(false);
    HeldLines {
        outer,
        _thread: PhantomData,
    }
}

/// A thread's hold on its log lines ([`hold_log_lines`]); dropping it writes them.
#[derive(Debug)]
pub struct HeldLines {
    /// Whether this guard started the hold (an inner one does nothing).
    outer: bool,
    /// The hold belongs to the thread that took it: not `Send`.
    _thread: PhantomData<*const ()>,
}

impl Drop for HeldLines {
    fn drop(&mut self) {
        if !self.outer {
            return;
        }
        let lines = HELD
            .try_with(|h| {
                h.try_borrow_mut()
                    .map(|mut h| {
                        h.holding = false;
                        std::mem::take(&mut h.lines)
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        // Written outside the borrow. Errors are ignored, as tracing ignores a
        // line it cannot write: there is nowhere to report them.
        for (sink, bytes) in lines {
            if !bytes.is_empty() {
                let _ = write_to(&sink, &bytes);
            }
        }
    }
}

/// The [`MakeWriter`] of [`init_tracing`](crate::daemon::init_tracing): every line
/// to one sink, at once or held by its thread (see the module's documentation).
#[derive(Clone)]
pub struct HoldingWriter {
    sink: Sink,
}

impl std::fmt::Debug for HoldingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldingWriter").finish_non_exhaustive()
    }
}

impl HoldingWriter {
    /// Lines to `sink`.
    pub fn new<W: Write + Send + 'static>(sink: W) -> HoldingWriter {
        HoldingWriter::shared(Arc::new(Mutex::new(sink)))
    }

    /// Lines to a sink the caller keeps a handle on (a test reads what was
    /// written through it).
    pub fn shared<W: Write + Send + 'static>(sink: Arc<Mutex<W>>) -> HoldingWriter {
        HoldingWriter { sink }
    }

    /// Standard error.
    pub fn stderr() -> HoldingWriter {
        HoldingWriter::new(io::stderr())
    }
}

impl<'a> MakeWriter<'a> for HoldingWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter { sink: &self.sink }
    }
}

/// The writer of one log line (tracing's fmt layer writes each line with one
/// `write_all`).
pub struct LineWriter<'a> {
    sink: &'a Sink,
}

impl std::fmt::Debug for LineWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineWriter").finish_non_exhaustive()
    }
}

impl LineWriter<'_> {
    /// Appends `buf` to this thread's held lines if it holds, writing them out
    /// when they pass [`HOLD_CAP`]; `None` if it does not hold.
    fn hold(&self, buf: &[u8]) -> Option<io::Result<()>> {
        let full = HELD
            .try_with(|h| {
                let mut h = h.try_borrow_mut().ok()?;
                if !h.holding {
                    return None;
                }
                let i = match h.lines.iter().position(|(s, _)| Arc::ptr_eq(s, self.sink)) {
                    Some(i) => i,
                    None => {
                        h.lines.push((Arc::clone(self.sink), Vec::new()));
                        h.lines.len() - 1
                    }
                };
                let held = &mut h.lines[i].1;
                held.extend_from_slice(buf);
                Some((held.len() >= HOLD_CAP).then(|| std::mem::take(held)))
            })
            .ok()
            .flatten()?;
        Some(match full {
            Some(bytes) => write_to(self.sink, &bytes),
            None => Ok(()),
        })
    }
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.hold(buf) {
            Some(r) => r,
            None => write_to(self.sink, buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that keeps each write apart.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink() -> (Arc<Mutex<Writes>>, HoldingWriter) {
        let writes = Arc::new(Mutex::new(Writes::default()));
        let writer = HoldingWriter::shared(Arc::clone(&writes));
        (writes, writer)
    }

    /// The writes so far, as text.
    fn written(w: &Mutex<Writes>) -> Vec<String> {
        let w = w.lock().unwrap();
        w.0.iter()
            .map(|b| String::from_utf8(b.clone()).unwrap())
            .collect()
    }

    fn line(writer: &HoldingWriter, text: &str) {
        writer
            .make_writer()
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    #[test]
    fn lines_not_held_are_written_one_by_one() {
        let (writes, writer) = sink();
        line(&writer, "a");
        assert_eq!(written(&writes), ["a\n"]);
        line(&writer, "b");
        assert_eq!(written(&writes), ["a\n", "b\n"]);
    }

    #[test]
    fn held_lines_are_written_in_order_in_one_write_when_the_guard_drops() {
        let (writes, writer) = sink();
        let held = hold_log_lines();
        for text in ["a", "b", "c"] {
            line(&writer, text);
        }
        assert!(written(&writes).is_empty());
        drop(held);
        assert_eq!(written(&writes), ["a\nb\nc\n"]);
        // The hold is over: the next line goes out at once.
        line(&writer, "d");
        assert_eq!(written(&writes), ["a\nb\nc\n", "d\n"]);
    }

    /// Through tracing's fmt layer, as `init_tracing` installs it.
    #[test]
    fn tracing_lines_are_held() {
        let (writes, writer) = sink();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(seq = 1, "broadcast");
            let _held = hold_log_lines();
            tracing::info!(seq = 2, "broadcast");
            tracing::info!(seq = 3, "broadcast");
            assert_eq!(written(&writes).len(), 1);
        });
        let w = written(&writes);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].ends_with("broadcast seq=1\n"), "{w:?}");
        let held: Vec<&str> = w[1].lines().collect();
        assert_eq!(held.len(), 2, "{w:?}");
        assert!(held[0].ends_with("broadcast seq=2"), "{w:?}");
        assert!(held[1].ends_with("broadcast seq=3"), "{w:?}");
    }

    #[test]
    fn another_threads_lines_go_straight_out_while_one_holds() {
        let (writes, writer) = sink();
        let held = hold_log_lines();
        line(&writer, "held 1");
        let other = writer.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            line(&other, "other");
            tx.send(()).unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(written(&writes), ["other\n"]);
        line(&writer, "held 2");
        drop(held);
        assert_eq!(written(&writes), ["other\n", "held 1\nheld 2\n"]);
    }

    #[test]
    fn a_nested_hold_does_nothing() {
        let (writes, writer) = sink();
        let outer = hold_log_lines();
        line(&writer, "a");
        {
            let _inner = hold_log_lines();
            line(&writer, "b");
        }
        assert!(written(&writes).is_empty());
        line(&writer, "c");
        drop(outer);
        assert_eq!(written(&writes), ["a\nb\nc\n"]);
    }

    #[test]
    fn held_lines_past_the_cap_are_written_early() {
        let (writes, writer) = sink();
        let text = "x".repeat(99);
        let per = HOLD_CAP / 100;
        let held = hold_log_lines();
        for _ in 0..per {
            line(&writer, &text);
        }
        assert!(written(&writes).is_empty());
        // This one passes the cap: everything so far goes out, itself included.
        line(&writer, &text);
        let w = written(&writes);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len(), (per + 1) * 100);
        assert!(w[0].len() >= HOLD_CAP);
        line(&writer, "last");
        assert_eq!(written(&writes).len(), 1);
        drop(held);
        let w = written(&writes);
        assert_eq!(w.len(), 2);
        assert_eq!(w[1], "last\n");
    }

    #[test]
    fn held_lines_are_written_when_the_holder_panics() {
        let (writes, writer) = sink();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = hold_log_lines();
            line(&writer, "a");
            line(&writer, "b");
            panic!("while holding");
        }));
        assert!(result.is_err());
        assert_eq!(written(&writes), ["a\nb\n"]);
        // And the thread holds no more.
        line(&writer, "c");
        assert_eq!(written(&writes), ["a\nb\n", "c\n"]);
    }

    /// Each writer's lines go to its own sink, still one write each.
    #[test]
    fn lines_held_for_two_sinks_go_each_to_its_own() {
        let (writes1, writer1) = sink();
        let (writes2, writer2) = sink();
        let held = hold_log_lines();
        line(&writer1, "1a");
        line(&writer2, "2a");
        line(&writer1, "1b");
        drop(held);
        assert_eq!(written(&writes1), ["1a\n1b\n"]);
        assert_eq!(written(&writes2), ["2a\n"]);
    }

    /// A write error while holding is not a panic, and the lines after it are
    /// still written.
    #[test]
    fn a_failing_sink_is_ignored() {
        struct Failing(Arc<Mutex<u32>>);
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                *self.0.lock().unwrap() += 1;
                Err(io::Error::other("full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let tries = Arc::new(Mutex::new(0));
        let writer = HoldingWriter::new(Failing(Arc::clone(&tries)));
        assert!(writer.make_writer().write_all(b"direct\n").is_err());
        {
            let _held = hold_log_lines();
            writer.make_writer().write_all(b"held\n").unwrap();
        }
        assert_eq!(*tries.lock().unwrap(), 2);
    }
}
