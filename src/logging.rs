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
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;

use crate::h1::push_decimal;

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
        self.send(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogWriter {
    /// Queue one whole line, or count it dropped.
    fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => DROPPED.inc(),
            // The thread has stopped (the process is exiting): nowhere to
            // write.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// One access log line's fields (SPEC §10), in the order they are written.
pub struct AccessLine<'a> {
    /// When the request ended.
    pub time: SystemTime,
    pub request_id: &'a str,
    pub method: &'a str,
    pub route: &'a str,
    pub tag: &'a str,
    pub tenant: &'a str,
    pub account: &'a str,
    pub token_id: &'a str,
    pub token_kind: &'a str,
    pub decision: &'a str,
    pub reason: &'a str,
    pub status: u16,
    pub duration_us: u64,
    pub upstream_us: u64,
}

/// Where JSON access lines go when they skip tracing (see [`access`]).
static ACCESS_JSON: OnceLock<LogWriter> = OnceLock::new();

/// Write access lines to `w` formatted here, in the bytes
/// tracing-subscriber's JSON layer would write: that layer cost about
/// 28,000 instructions a line, more than the rest of a request.
pub fn access_json_to(w: LogWriter) {
    let _ = ACCESS_JSON.set(w);
}

/// Log one request: as a JSON line of its own making when
/// [`access_json_to`] was called, else through tracing (the text format,
/// and tests). The caller checks first that the access log is enabled.
pub fn access(line: &AccessLine<'_>) {
    match ACCESS_JSON.get() {
        Some(w) => w.send(access_json(line, line.time)),
        None => access_via_tracing(line),
    }
}

/// The line as tracing-subscriber's JSON layer (`flatten_event`, no span)
/// writes it, with `now` as its `timestamp`.
fn access_json(l: &AccessLine<'_>, now: SystemTime) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    b.extend_from_slice(b"{\"timestamp\":\"");
    push_rfc3339(&mut b, now, Some(6));
    b.extend_from_slice(b"\",\"level\":\"INFO\",\"time\":\"");
    push_rfc3339(&mut b, l.time, None);
    b.push(b'"');
    // One call a field, each with its key as a constant: copies of a known
    // length are inlined, where a loop over the keys called memcpy for each.
    str_field(&mut b, b",\"request_id\":", l.request_id);
    str_field(&mut b, b",\"method\":", l.method);
    str_field(&mut b, b",\"route\":", l.route);
    str_field(&mut b, b",\"tag\":", l.tag);
    str_field(&mut b, b",\"tenant\":", l.tenant);
    str_field(&mut b, b",\"account\":", l.account);
    str_field(&mut b, b",\"token_id\":", l.token_id);
    str_field(&mut b, b",\"token_kind\":", l.token_kind);
    str_field(&mut b, b",\"decision\":", l.decision);
    str_field(&mut b, b",\"reason\":", l.reason);
    num_field(&mut b, b",\"status\":", u64::from(l.status));
    num_field(&mut b, b",\"duration_us\":", l.duration_us);
    num_field(&mut b, b",\"upstream_us\":", l.upstream_us);
    b.extend_from_slice(b",\"target\":\"scopegate::access\"}\n");
    b
}

#[inline(always)]
fn str_field(b: &mut Vec<u8>, key: &'static [u8], value: &str) {
    b.extend_from_slice(key);
    push_json_str(b, value);
}

#[inline(always)]
fn num_field(b: &mut Vec<u8>, key: &'static [u8], value: u64) {
    b.extend_from_slice(key);
    push_decimal(b, value, 1);
}

/// `s` as a JSON string, escaped as serde_json escapes it (and so as the
/// layer did). Nearly every value needs no escape and is copied whole:
/// serde_json's serializer cost about 140 instructions a value.
fn push_json_str(b: &mut Vec<u8>, s: &str) {
    if !needs_escape(s) {
        b.push(b'"');
        b.extend_from_slice(s.as_bytes());
        b.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *b, s);
    }
}

/// Whether serde_json would escape a byte of `s`: it escapes exactly the
/// control characters, `"` and `\`. A fold without an early exit, so
/// that it is vectorised.
#[inline(always)]
fn needs_escape(s: &str) -> bool {
    s.bytes()
        .fold(false, |e, c| e | (c < 0x20) | (c == b'"') | (c == b'\\'))
}

/// The same line through tracing.
fn access_via_tracing(l: &AccessLine<'_>) {
    let mut time = Vec::with_capacity(32);
    push_rfc3339(&mut time, l.time, None);
    tracing::info!(
        target: "scopegate::access",
        time = std::str::from_utf8(&time).unwrap_or(""),
        request_id = l.request_id,
        method = l.method,
        route = l.route,
        tag = l.tag,
        tenant = l.tenant,
        account = l.account,
        token_id = l.token_id,
        token_kind = l.token_kind,
        decision = l.decision,
        reason = l.reason,
        status = l.status,
        duration_us = l.duration_us,
        upstream_us = l.upstream_us,
    );
}

/// `t` in UTC as RFC 3339, `2026-11-30T17:28:49.923913743Z`: with
/// `digits` fractional digits, or (`None`) the nanoseconds with trailing
/// zeros dropped and no fraction when they are zero, as the `time` crate
/// writes it. RFC 3339 has four-digit years: a clock past 9999 is written
/// as the last instant of 9999.
fn push_rfc3339(b: &mut Vec<u8>, t: SystemTime, digits: Option<usize>) {
    // 10000-01-01T00:00:00Z.
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    let d = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .min(YEAR_10000 - Duration::from_nanos(1));
    b.extend_from_slice(&date_time(d.as_secs()));
    let nanos = u64::from(d.subsec_nanos());
    // By hand, into one array: core::fmt cost about 4,400 instructions for
    // the two timestamps of a line, more than the rest of it.
    let mut frac = *b".000000000";
    put_digits(&mut frac[1..], nanos);
    let len = match digits {
        Some(n) => 1 + n.clamp(1, 9),
        None if nanos > 0 => 1 + 9 - frac.iter().rev().take_while(|&&c| c == b'0').count(),
        None => 0,
    };
    b.extend_from_slice(&frac[..len]);
    b.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of a second since the epoch (before year 10000).
/// The last second's is kept per thread, as every line within a second
/// has the same: a line's two timestamps cost about 1,800 instructions
/// when the date was worked out for each, and about 500 now (callgrind).
fn date_time(secs: u64) -> [u8; 19] {
    thread_local! {
        static LAST: std::cell::Cell<(u64, [u8; 19])> =
            const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let (cached, text) = LAST.get();
    if cached == secs {
        return text;
    }
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let mut text = *b"0000-00-00T00:00:00";
    put_digits(&mut text[0..4], y.max(0) as u64);
    put_digits(&mut text[5..7], u64::from(m));
    put_digits(&mut text[8..10], u64::from(day));
    put_digits(&mut text[11..13], s / 3600);
    put_digits(&mut text[14..16], s / 60 % 60);
    put_digits(&mut text[17..19], s % 60);
    LAST.set((secs, text));
    text
}

/// The low `out.len()` decimal digits of `v` into `out`, zero-padded.
fn put_digits(out: &mut [u8], mut v: u64) {
    for c in out.iter_mut().rev() {
        *c = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

/// The civil date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
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
        /// The length of each write, in order.
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(g) = &self.gate {
                self.waiting
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                drop(g.lock());
            }
            self.writes.lock().expect("sink").push(buf.len());
            self.bytes.lock().expect("sink").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer with a queue of `lines` whose thread has taken `first`
    /// and is stuck writing it until `gate` (held by the caller) is
    /// released.
    fn stuck_writing(
        gate: &Arc<Mutex<()>>,
        lines: usize,
        first: &[u8],
    ) -> (Sink, LogWriter, Guard) {
        let sink = Sink {
            gate: Some(gate.clone()),
            ..Sink::default()
        };
        let out = sink.clone();
        let (mut w, guard) = stdout_to(lines, move || out.clone()).expect("thread");
        w.write_all(first).expect("write");
        while !sink.waiting.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        (sink, w, guard)
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
        let before = DROPPED.get();
        let (_, mut w, guard) = stuck_writing(&gate, 8, b"line 0\n");
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

    /// Lines that queued while stdout was busy go out together, in writes
    /// of 256 KiB and whatever line crosses that, and the stop marker ends
    /// the batch it is in.
    #[test]
    fn queued_lines_are_written_in_batches_of_256_kib() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().expect("gate");
        let (sink, mut w, guard) = stuck_writing(&gate, 10_000, b"first\n");
        // 600 lines of exactly 1 KiB queue behind the stuck write.
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..600 {
            w.write_all(&line).expect("write");
        }
        drop(held);
        drop(guard);
        // 256 lines fill a batch to exactly 256 KiB, which closes it.
        assert_eq!(
            *sink.writes.lock().expect("sink"),
            [6, 256 * 1024, 256 * 1024, 88 * 1024]
        );
        assert_eq!(sink.bytes.lock().expect("sink").len(), 6 + 600 * 1024);
    }

    /// What tracing-subscriber's JSON layer, configured as `main` does,
    /// writes for `line`.
    fn through_tracing(line: &AccessLine<'_>) -> String {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || access_via_tracing(line));
        String::from_utf8(sink.bytes.lock().expect("sink").clone()).expect("utf8")
    }

    /// `"timestamp":"…"`'s value and the line without it.
    fn split_timestamp(line: &str) -> (String, String) {
        let start = line.find("\"timestamp\":\"").expect("a timestamp") + 13;
        let end = start + line[start..].find('"').expect("closed");
        let mut rest = line.to_string();
        rest.replace_range(start..end, "");
        (line[start..end].to_string(), rest)
    }

    /// The line written here is the layer's, byte for byte, but for the
    /// layer's own clock reading; hostile values are escaped alike.
    #[test]
    fn an_access_line_is_the_json_layers_line() {
        let hostile = "q\"uote \\back\nline\ttab\u{1}\u{1f}del\u{7f} é ✓ </script>";
        let cases = [
            (
                "allow",
                "",
                200,
                421,
                376,
                "ad6799f3444bcf3aa99f8e3e01de316a",
                "/v1/tenants/{tenant}/markers",
            ),
            ("deny", "missing_token", 401, 37, 0, "rid-1", ""),
            ("deny", "bad_path", 400, 0, 0, "", hostile),
            // Each escaped character alone too: a value needs escaping
            // for any one of them.
            ("deny", "bad_path", 400, 0, 0, "", "back\\slash"),
            ("deny", "bad_path", 400, 0, 0, "", "q\"uote"),
            ("deny", "bad_path", 400, 0, 0, "", "tab\there"),
            ("deny", "bad_path", 400, 0, 0, "", "\u{1f}"),
            ("deny", "bad_path", 400, 0, 0, "", "del\u{7f} é ✓ </script>"),
        ];
        for (decision, reason, status, duration_us, upstream_us, request_id, route) in cases {
            let line = AccessLine {
                time: UNIX_EPOCH + Duration::new(1_796_059_729, 923_913_700),
                request_id,
                method: "GET",
                route,
                tag: "markers",
                tenant: if decision == "deny" && reason == "bad_path" {
                    route
                } else {
                    "acme-prod"
                },
                account: "acme",
                token_id: "bench",
                token_kind: "pat",
                decision,
                reason,
                status,
                duration_us,
                upstream_us,
            };
            let theirs = through_tracing(&line);
            let ours = String::from_utf8(access_json(&line, SystemTime::now())).expect("utf8");
            let (their_ts, their_rest) = split_timestamp(&theirs);
            let (our_ts, our_rest) = split_timestamp(&ours);
            assert_eq!(our_rest, their_rest);
            // The layer's timestamp: microseconds, always six digits.
            assert_eq!(our_ts.len(), their_ts.len(), "{our_ts} {their_ts}");
            assert_eq!(our_ts.as_bytes()[19], b'.');
            assert_eq!(our_ts[..11], their_ts[..11], "the same day");
            let v: serde_json::Value = serde_json::from_str(&ours).expect("valid JSON");
            assert_eq!(v["route"], route);
        }
    }

    /// The shortcut copies a value whole exactly when serde_json would
    /// write it unchanged: every ASCII character and a few others, alone
    /// and in every pair (two characters that each need escaping must not
    /// cancel out).
    #[test]
    fn a_value_is_escaped_exactly_when_serde_json_would_escape_it() {
        let chars: Vec<char> = (0u8..0x80)
            .map(char::from)
            .chain(['\u{80}', 'é', '✓', '\u{2028}', '\u{feff}'])
            .collect();
        let serde_escapes = |s: &str| serde_json::to_string(s).expect("json") != format!("\"{s}\"");
        let mut escaped = 0;
        for a in &chars {
            let one = a.to_string();
            assert_eq!(needs_escape(&one), serde_escapes(&one), "{a:?}");
            escaped += usize::from(needs_escape(&one));
            for b in &chars {
                let two = format!("{a}{b}");
                assert_eq!(needs_escape(&two), serde_escapes(&two), "{two:?}");
            }
        }
        // 32 control characters, `"` and `\`.
        assert_eq!(escaped, 34);
    }

    /// RFC 3339 as the `time` crate writes it, across leap days, century
    /// years and fractions with trailing zeros.
    #[test]
    fn timestamps_are_written_as_the_time_crate_writes_them() {
        use time::format_description::well_known::Rfc3339;
        let mut instants: Vec<(i64, u32)> = vec![
            (0, 0),
            (951_782_400, 1),             // 2000-02-29
            (951_868_799, 999_999_999),   // 2000-02-29T23:59:59
            (4_107_542_400, 500_000_000), // 2100-03-01
            (1_796_059_729, 923_913_700),
            (1_709_164_800, 120), // 2024-02-29
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            instants.push(((x % 8_000_000_000) as i64, (x >> 33) as u32 % 1_000_000_000));
        }
        // Within one second, and back and forth across seconds: the
        // thread's cached second must never be written for another.
        for nanos in [0, 5, 999_999_999, 100_000_000] {
            instants.push((1_796_059_729, nanos));
            instants.push((1_796_059_730, nanos));
        }
        for (secs, nanos) in instants {
            let t = UNIX_EPOCH + Duration::new(secs as u64, nanos);
            let theirs = time::OffsetDateTime::from(t)
                .format(&Rfc3339)
                .expect("format");
            // Twice: once to work the second out, once from the cache.
            for _ in 0..2 {
                let mut ours = Vec::new();
                push_rfc3339(&mut ours, t, None);
                assert_eq!(
                    String::from_utf8(ours).expect("utf8"),
                    theirs,
                    "{secs}.{nanos}"
                );
            }
            let mut micros = Vec::new();
            push_rfc3339(&mut micros, t, Some(6));
            let micros = String::from_utf8(micros).expect("utf8");
            assert_eq!(micros.len(), 27, "{micros}");
            assert_eq!(&micros[20..26], &format!("{:06}", nanos / 1000), "{micros}");
        }
        // RFC 3339 stops at 9999, and so does a clock read there; before
        // the epoch is the epoch.
        for (t, want) in [
            (
                UNIX_EPOCH + Duration::from_secs(300_000_000_000),
                "9999-12-31T23:59:59.999999999Z",
            ),
            (UNIX_EPOCH - Duration::from_secs(1), "1970-01-01T00:00:00Z"),
        ] {
            let mut ours = Vec::new();
            push_rfc3339(&mut ours, t, None);
            assert_eq!(String::from_utf8(ours).expect("utf8"), want);
        }
    }
}
