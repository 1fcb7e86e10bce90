//! Where the logs go: stdout, written by a thread of its own.
//!
//! A log line used to be written to stdout by the thread that served the
//! request. When nothing read stdout (a log collector that stalled, a pipe
//! left full), that write blocked, and with it every request on the worker:
//! the gateway stopped answering after about 160 requests. Lines now go into
//! a bounded queue; one thread writes them out in batches. When the queue is
//! full, the line is dropped and counted in
//! `scopegate_log_lines_dropped_total`: a stalled collector costs log lines,
//! never requests.
//!
//! The queue holds `SCOPEGATE_LOG_BUFFER_LINES` lines (default 16,384, about
//! 7 MB of access log lines). At exit the queue is drained for up to a
//! second, then abandoned, so a stuck stdout cannot keep the process from
//! exiting.

use std::io::Write;
use std::sync::LazyLock;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

/// Lines dropped because the queue to stdout was full. One counter for the
/// process; every metrics registry carries it.
pub static DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    IntCounter::new(
        "scopegate_log_lines_dropped_total",
        "Log lines dropped because stdout was not keeping up (the log queue was full).",
    )
    .expect("a static, valid metric definition")
});

pub const DEFAULT_BUFFER_LINES: usize = 16_384;

/// How long the writer lets lines gather after the first one: the delay a
/// line can see, and about one write (and one wake-up) per interval under
/// load. 16,384 lines last 160 ms at 100k lines/s.
const GATHER: Duration = Duration::from_millis(10);

/// Hands formatted lines to the writer thread (`tracing_subscriber`'s
/// `MakeWriter`).
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<Vec<u8>>,
}

/// Keep it for as long as the process logs; dropping it writes out what is
/// queued (for up to a second) and stops the thread.
pub struct Guard {
    tx: SyncSender<Vec<u8>>,
    done: Receiver<()>,
}

/// Start the writer thread. `lines` is the queue's length (at least 1).
pub fn stdout(lines: usize) -> std::io::Result<(LogWriter, Guard)> {
    stdout_to(lines, std::io::stdout)
}

/// The same, writing to what `out` makes (the unit tests' sink).
fn stdout_to<W: Write>(
    lines: usize,
    out: impl Fn() -> W + Send + 'static,
) -> std::io::Result<(LogWriter, Guard)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(lines.max(1));
    let (done_tx, done) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("scopegate-log".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(64 * 1024);
            // Block for the first line, let more queue for a moment, take
            // them all and write them at once. While this thread sleeps
            // instead of waiting in `recv`, queueing a line wakes nobody:
            // waking it for every line cost the worker a context switch per
            // request and halved throughput on one core (BENCHMARKS.md).
            // An empty message is the guard's "write out and stop".
            let mut stop = false;
            while !stop {
                let Ok(line) = rx.recv() else { break };
                stop = line.is_empty();
                batch.extend_from_slice(&line);
                if !stop {
                    std::thread::sleep(GATHER);
                }
                while !stop && batch.len() < 256 * 1024 {
                    match rx.try_recv() {
                        Ok(line) => {
                            stop = line.is_empty();
                            batch.extend_from_slice(&line);
                        }
                        Err(_) => break,
                    }
                }
                // Whole lines only, so they never interleave with another
                // writer's. A write that fails (stdout closed) loses this
                // batch; there is nowhere else to report it.
                if !batch.is_empty() {
                    let mut w = out();
                    let _ = w.write_all(&batch).and_then(|()| w.flush());
                    batch.clear();
                }
            }
            let _ = done_tx.send(());
        })?;
    Ok((LogWriter { tx: tx.clone() }, Guard { tx, done }))
}

impl Drop for Guard {
    fn drop(&mut self) {
        // The subscriber's `LogWriter` lives in the global dispatcher for good,
        // so the queue never closes by itself: queue the stop marker behind
        // the last lines (retrying while the queue is full), then wait for
        // the thread to write them.
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.tx.try_send(Vec::new()) {
                Ok(()) => break,
                Err(TrySendError::Full(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self.tx.try_send(buf.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => DROPPED.inc(),
            // The thread has stopped (the process is exiting): nowhere to
            // write.
            Err(TrySendError::Disconnected(_)) => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into shared memory, or one that blocks until released (a
    /// stdout nobody reads).
    #[derive(Clone, Default)]
    struct Sink {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Option<Arc<Mutex<()>>>,
        /// Set once a write is waiting at the gate.
        waiting: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(g) = &self.gate {
                self.waiting
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                drop(g.lock());
            }
            self.bytes.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_whole_and_in_order_before_the_guard_returns() {
        let sink = Sink::default();
        let out = sink.clone();
        let (mut w, guard) = stdout_to(100_000, move || out.clone()).expect("thread");
        for i in 0..5_000 {
            w.write_all(format!("{{\"line\":{i}}}\n").as_bytes())
                .expect("write");
        }
        drop(guard);
        let text = String::from_utf8(sink.bytes.lock().expect("sink").clone()).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5_000);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, format!("{{\"line\":{i}}}"));
        }
    }

    #[test]
    fn a_stalled_stdout_drops_and_counts_lines_and_never_blocks_the_writer() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("gate");
        let sink = Sink {
            gate: Some(gate.clone()),
            ..Sink::default()
        };
        let out = sink.clone();
        let (mut w, guard) = stdout_to(8, move || out.clone()).expect("thread");
        let before = DROPPED.get();
        // The thread takes the first line and is stuck writing it.
        w.write_all(b"line 0\n").expect("write");
        while !sink.waiting.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let started = Instant::now();
        for i in 1..1_000 {
            w.write_all(format!("line {i}\n").as_bytes())
                .expect("write");
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "writing log lines waited for stdout"
        );
        // The queue took 8 lines; the other 991 were counted as dropped.
        assert_eq!(DROPPED.get() - before, 991);
        // A guard dropped while stdout is still stalled gives up after its
        // second instead of holding the process.
        let started = Instant::now();
        drop(guard);
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(held);
    }
}
