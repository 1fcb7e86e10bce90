//! A paced HTTP/1.1 load generator for bench/load.sh: sends requests at a
//! fixed total rate over keep-alive connections and reports latency
//! percentiles.
//!
//! One thread drives every connection with non-blocking sockets and epoll,
//! and waits for the next request's due time in `epoll_pwait2` with a
//! nanosecond timeout (timer slack 1 ns). Two earlier designs measured
//! themselves more than the servers:
//! - on tokio, whose timer ticks every millisecond, every tick released a
//!   burst of rate/1000 requests, and the queues behind those bursts were
//!   most of the p99 (direct's own p99 was 2.8 ms at 19k req/s);
//! - a blocking thread per connection paced evenly, but its two context
//!   switches per request on a nested-virtualisation VM cost as much CPU
//!   as the upstream it shares a core with, and that core's queue became
//!   the tail.
//!
//! When the server made a request late (the previous response on its
//! connection finished after it was due), its latency counts from when it was
//! due, so a stall shows up as latency instead of as fewer requests (the
//! correction wrk2 makes; Debian has no wrk2). Otherwise it counts from the
//! actual send, so the generator's own wake-up delay is not charged to the
//! server.
//!
//! Usage: paced HOST:PORT PATH RATE SECONDS CONNECTIONS [BEARER_TOKEN]
//! Prints: `rate=<achieved req/s> p50_us=<n> p99_us=<n> p999_us=<n> errors=<n> late=<n>
//! slow=<n> bursts=<n> in_bursts_pct=<n> longest_burst_us=<n> burst_lock_1ms=<r>`
//! where `late` counts requests whose previous answer on their connection
//! came after they were due. `slow` to `longest_burst_us` say whether the
//! tail is spread out or comes in bursts (see [`Bursts`]); `burst_lock_1ms`
//! says how closely the bursts' starts keep to a 1 ms clock, from 0 to 1
//! (`phase_lock` in examples/common/phase.rs; examples/stalls.rs finds the
//! host's stalls on such a clock). `PACED_TRACE=FILE` also writes every
//! answered request's start and latency in µs to FILE, one pair a line.

#[path = "common/phase.rs"]
mod phase;

#[cfg(target_os = "linux")]
fn main() {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("paced needs Linux (epoll and timerfd)");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.len() < 5 {
            eprintln!("usage: paced HOST:PORT PATH RATE SECONDS CONNECTIONS [BEARER_TOKEN]");
            std::process::exit(2);
        }
        let addr = args[0].clone();
        let rate: f64 = args[2].parse().expect("rate");
        let seconds: f64 = args[3].parse().expect("seconds");
        let n: usize = args[4].parse().expect("connections");
        let mut request = format!("GET {} HTTP/1.1\r\nHost: bench\r\n", args[1]);
        if let Some(t) = args.get(5) {
            request.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        request.push_str("\r\n");
        precise_timers();

        let interval = Duration::from_secs_f64(n as f64 / rate);
        let clock = Clock::new();
        let start = clock.now() + Duration::from_millis(200);
        let end = start + Duration::from_secs_f64(seconds);
        let mut conns: Vec<Conn> = (0..n)
            .map(|c| {
                // Stagger the connections across one interval.
                let first = start + interval.mul_f64(c as f64 / n as f64);
                Conn::open(&addr, first).expect("connect")
            })
            .collect();
        let mut poller = Poller::new(&conns);
        // (start, latency) of every answer, in µs from `start`.
        let mut answers: Vec<(u32, u32)> = Vec::with_capacity((rate * seconds) as usize + n);
        let (mut errors, mut late) = (0usize, 0usize);
        let request = request.as_bytes();
        loop {
            // Send what is due on every idle connection.
            let now = clock.now();
            let mut next: Option<Duration> = None;
            let mut busy = false;
            for (idx, c) in conns.iter_mut().enumerate() {
                if c.sent_at.is_some() {
                    busy = true;
                    continue;
                }
                let due = c.first + interval * c.i;
                if due >= end {
                    continue;
                }
                if due > now {
                    next = Some(next.map_or(due, |d| d.min(due)));
                    continue;
                }
                let from = if c.last_done > due {
                    late += 1;
                    due
                } else {
                    now
                };
                if c.send(request).is_err() {
                    // A server may close a keep-alive connection between
                    // requests (nginx after keepalive_requests): reconnect and
                    // send again, as wrk does.
                    *c = c.reopen(&addr, &mut poller, idx);
                    if c.send(request).is_err() {
                        errors += 1;
                        c.i += 1;
                        continue;
                    }
                }
                c.sent_at = Some(from);
                busy = true;
            }
            if !busy && next.is_none() {
                break;
            }
            let ready = poller.wait(next, &clock);
            for k in 0..ready {
                let idx = poller.ready[k];
                let Some(c) = conns.get_mut(idx) else {
                    continue;
                };
                match c.receive() {
                    Received::Pending => continue,
                    // A server closing an idle keep-alive connection: reopen
                    // it before its next request is due.
                    Received::Closed if c.sent_at.is_none() => {
                        *c = c.reopen(&addr, &mut poller, idx);
                    }
                    // Bytes nobody asked for: not HTTP/1.1 as this client
                    // speaks it.
                    _ if c.sent_at.is_none() => {
                        errors += 1;
                        *c = c.reopen(&addr, &mut poller, idx);
                    }
                    Received::Done { keep_alive } => {
                        let done = clock.now();
                        if let Some(from) = c.sent_at.take() {
                            answers.push((
                                micros(from.saturating_sub(start)),
                                micros(done.saturating_sub(from)),
                            ));
                        }
                        c.last_done = done;
                        c.i += 1;
                        c.answered = true;
                        if !keep_alive {
                            *c = c.reopen(&addr, &mut poller, idx);
                        }
                    }
                    // Closed before any answer byte, on a connection that has
                    // answered before: send again on a new one, keeping the
                    // request's start. (A new connection that closes at
                    // once is a failure, not a reason to retry for ever.)
                    Received::Closed if c.answered => {
                        let from = c.sent_at;
                        *c = c.reopen(&addr, &mut poller, idx);
                        if c.send(request).is_ok() {
                            c.sent_at = from;
                        } else {
                            errors += 1;
                            c.i += 1;
                        }
                    }
                    Received::Closed | Received::Failed => {
                        errors += 1;
                        c.last_done = clock.now();
                        c.i += 1;
                        *c = c.reopen(&addr, &mut poller, idx);
                    }
                }
            }
        }
        answers.sort_unstable();
        if let Some(path) = std::env::var_os("PACED_TRACE") {
            use std::fmt::Write as _;
            let mut out = String::with_capacity(answers.len() * 16);
            for (at, took) in &answers {
                // Writing to a String cannot fail.
                let _ = writeln!(out, "{at} {took}");
            }
            std::fs::write(&path, out).expect("writing PACED_TRACE");
        }
        let b = super::Bursts::of(&answers);
        let mut lat: Vec<u32> = answers.iter().map(|&(_, took)| took).collect();
        lat.sort_unstable();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        println!(
            "rate={:.0} p50_us={} p99_us={} p999_us={} errors={} late={} slow={} bursts={} in_bursts_pct={} longest_burst_us={} burst_lock_1ms={:.2}",
            lat.len() as f64 / seconds,
            pct(0.50),
            pct(0.99),
            pct(0.999),
            errors,
            late,
            b.slow,
            b.bursts,
            (b.in_bursts * 100).checked_div(b.slow).unwrap_or(0),
            b.longest_us,
            b.lock_1ms(),
        );
    }

    fn micros(d: Duration) -> u32 {
        u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
    }

    struct Conn {
        stream: TcpStream,
        buf: Vec<u8>,
        /// When this connection's first request is due.
        first: Duration,
        /// The number of this connection's next request.
        i: u32,
        /// Where the in-flight request's latency counts from.
        sent_at: Option<Duration>,
        last_done: Duration,
        /// Whether this connection has carried a whole answer.
        answered: bool,
    }

    enum Received {
        /// The answer is not complete yet.
        Pending,
        /// A whole 200 answer.
        Done { keep_alive: bool },
        /// End of stream before any byte of an answer.
        Closed,
        /// A non-200 answer, a malformed or cut one, or a read error.
        Failed,
    }

    impl Conn {
        fn open(addr: &str, first: Duration) -> std::io::Result<Conn> {
            let stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            Ok(Conn {
                stream,
                buf: Vec::with_capacity(4096),
                first,
                i: 0,
                sent_at: None,
                last_done: Duration::ZERO,
                answered: false,
            })
        }

        /// A new connection in this one's place, with its schedule.
        fn reopen(&self, addr: &str, poller: &mut Poller, idx: usize) -> Conn {
            let mut c = Conn::open(addr, self.first).expect("reconnect");
            c.i = self.i;
            c.last_done = self.last_done;
            poller.replace(&self.stream, &c.stream, idx);
            c
        }

        /// The whole request into an idle socket (a few hundred bytes: the
        /// send buffer takes it at once; a short write is retried in place).
        fn send(&mut self, request: &[u8]) -> std::io::Result<()> {
            self.buf.clear();
            let mut rest = request;
            while !rest.is_empty() {
                match self.stream.write(rest) {
                    Ok(0) => return Err(ErrorKind::WriteZero.into()),
                    Ok(n) => rest = &rest[n..],
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }

        fn receive(&mut self) -> Received {
            let mut chunk = [0u8; 4096];
            let eof = loop {
                match self.stream.read(&mut chunk) {
                    Ok(0) => break true,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    // A request written into a connection the server had
                    // already closed draws a reset instead of an end of
                    // stream.
                    Err(e) if e.kind() == ErrorKind::ConnectionReset && self.buf.is_empty() => {
                        return Received::Closed;
                    }
                    Err(_) => return Received::Failed,
                }
            };
            if eof && self.buf.is_empty() {
                return Received::Closed;
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let head_len = match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if !eof => return Received::Pending,
                Ok(httparse::Status::Partial) | Err(_) => return Received::Failed,
            };
            let mut length = None;
            let mut chunked = false;
            // HTTP/1.0 closes unless it says otherwise.
            let mut close = resp.version == Some(0);
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok());
                    if length.is_none() {
                        return Received::Failed;
                    }
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = true;
                } else if h.name.eq_ignore_ascii_case("connection") {
                    if h.value.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if h.value.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
            if resp.code != Some(200) {
                return Received::Failed;
            }
            // The body: small here (the bench upstream answers "ok"); the next
            // answer only starts after this request's, so nothing follows it.
            let complete = match (chunked, length) {
                (true, _) => self.buf[head_len..].ends_with(b"0\r\n\r\n"),
                (false, Some(n)) => self.buf.len() >= head_len + n,
                // Delimited by the server's close.
                (false, None) => eof,
            };
            match (complete, eof) {
                (true, _) => Received::Done {
                    keep_alive: !close && !eof,
                },
                (false, false) => Received::Pending,
                // Cut short.
                (false, true) => Received::Failed,
            }
        }
    }

    /// epoll over the connections' sockets, keyed by their index, and a
    /// timerfd armed at the next due time (an absolute CLOCK_MONOTONIC instant,
    /// to the nanosecond; epoll's own timeout rounds up to whole milliseconds
    /// before Linux 5.11's `epoll_pwait2`).
    struct Poller {
        epoll: std::os::fd::OwnedFd,
        timer: std::os::fd::OwnedFd,
        armed: Option<Duration>,
        events: Vec<rustix::event::epoll::Event>,
        ready: Vec<usize>,
    }

    const TIMER: u64 = u64::MAX;

    impl Poller {
        fn new(conns: &[Conn]) -> Poller {
            use rustix::event::epoll;
            use rustix::time::{TimerfdClockId, TimerfdFlags, timerfd_create};
            let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).expect("epoll");
            for (idx, c) in conns.iter().enumerate() {
                epoll::add(
                    &epoll,
                    &c.stream,
                    epoll::EventData::new_u64(idx as u64),
                    epoll::EventFlags::IN,
                )
                .expect("epoll add");
            }
            let timer = timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
            )
            .expect("timerfd");
            epoll::add(
                &epoll,
                &timer,
                epoll::EventData::new_u64(TIMER),
                epoll::EventFlags::IN,
            )
            .expect("epoll add");
            Poller {
                epoll,
                timer,
                armed: None,
                events: Vec::with_capacity(conns.len() + 1),
                ready: Vec::with_capacity(conns.len()),
            }
        }

        fn replace(&mut self, old: &TcpStream, new: &TcpStream, idx: usize) {
            use rustix::event::epoll;
            let _ = epoll::delete(&self.epoll, old);
            epoll::add(
                &self.epoll,
                new,
                epoll::EventData::new_u64(idx as u64),
                epoll::EventFlags::IN,
            )
            .expect("epoll add");
        }

        /// Waits until a connection is readable or until `deadline` (on
        /// `clock`), or at most 100 ms without one. Fills `self.ready` with
        /// the readable connections' indexes and returns how many there are
        /// (a count, not the slice, so the caller can reopen connections
        /// through `self` while it walks them).
        fn wait(&mut self, deadline: Option<Duration>, clock: &Clock) -> usize {
            use rustix::event::epoll;
            use rustix::time::{Itimerspec, TimerfdTimerFlags, Timespec, timerfd_settime};
            if deadline != self.armed {
                let zero = Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                let spec = Itimerspec {
                    it_interval: zero,
                    // All zero disarms.
                    it_value: deadline.map_or(zero, |d| clock.monotonic(d)),
                };
                timerfd_settime(&self.timer, TimerfdTimerFlags::ABSTIME, &spec)
                    .expect("timerfd_settime");
                self.armed = deadline;
            }
            let idle = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            self.events.clear();
            self.ready.clear();
            let timeout = if deadline.is_some() {
                None
            } else {
                Some(&idle)
            };
            if epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut self.events),
                timeout,
            )
            .is_err()
            {
                return 0;
            }
            for e in &self.events {
                match e.data.u64() {
                    TIMER => {
                        // Fired: clear its count (level-triggered) and re-arm on
                        // the next wait.
                        let _ = rustix::io::read(&self.timer, &mut [0u8; 8]);
                        self.armed = None;
                    }
                    idx => self.ready.push(idx as usize),
                }
            }
            self.ready.len()
        }
    }

    /// Monotonic time as a `Duration` since one fixed origin.
    #[derive(Clone, Copy)]
    struct Clock {
        origin: Instant,
        /// The origin as a CLOCK_MONOTONIC reading (which `Instant` is on Linux).
        mono: rustix::time::Timespec,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                mono: rustix::time::clock_gettime(rustix::time::ClockId::Monotonic),
                origin: Instant::now(),
            }
        }

        fn now(&self) -> Duration {
            self.origin.elapsed()
        }

        /// `at` (since the origin) as a CLOCK_MONOTONIC instant.
        fn monotonic(&self, at: Duration) -> rustix::time::Timespec {
            let ns = self.mono.tv_nsec as u64 + u64::from(at.subsec_nanos());
            rustix::time::Timespec {
                tv_sec: self.mono.tv_sec + at.as_secs() as i64 + (ns / 1_000_000_000) as i64,
                tv_nsec: (ns % 1_000_000_000) as _,
            }
        }
    }

    /// Linux delays a sleeping thread's wake-up by up to its timer slack (50 µs
    /// by default) to batch wake-ups, epoll timeouts included; a pacer wants
    /// them on time.
    fn precise_timers() {
        #[cfg(target_os = "linux")]
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
    }
}

/// Whether a tail is spread out or comes in bursts. A request is slow when
/// it took over [`Bursts::SLOW_US`] (the figure the p99 target is about).
/// Slow requests that started at most [`Bursts::GAP_US`] after the previous
/// slow one belong to one group; a group of at least [`Bursts::MIN`] is a
/// burst: something held many connections up at once (a stalled CPU, a
/// queue draining), not one unlucky request.
#[derive(Debug, PartialEq)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Bursts {
    /// Requests over `SLOW_US`.
    slow: usize,
    /// Groups of at least `MIN` slow requests.
    bursts: usize,
    /// Slow requests inside those groups.
    in_bursts: usize,
    /// The longest burst, from its first request's start to the last end
    /// of any of its requests, in µs.
    longest_us: u32,
    /// Each burst's first start, in µs.
    starts: Vec<u32>,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Bursts {
    const SLOW_US: u32 = 250;
    const GAP_US: u32 = 1_000;
    const MIN: usize = 5;

    /// `answers`: (start, latency) pairs in µs, sorted by start.
    fn of(answers: &[(u32, u32)]) -> Bursts {
        let mut b = Bursts {
            slow: 0,
            bursts: 0,
            in_bursts: 0,
            longest_us: 0,
            starts: Vec::new(),
        };
        // The open group: first start, last start, latest end, size.
        let mut group: Option<(u32, u32, u32, usize)> = None;
        fn close((first, _, latest, n): (u32, u32, u32, usize), b: &mut Bursts) {
            if n >= Bursts::MIN {
                b.bursts += 1;
                b.in_bursts += n;
                b.longest_us = b.longest_us.max(latest - first);
                b.starts.push(first);
            }
        }
        for &(at, took) in answers.iter().filter(|&&(_, took)| took > Self::SLOW_US) {
            b.slow += 1;
            let end = at.saturating_add(took);
            group = match group {
                Some((first, last, latest, n)) if at - last <= Self::GAP_US => {
                    Some((first, at, latest.max(end), n + 1))
                }
                Some(g) => {
                    close(g, &mut b);
                    Some((at, at, end, 1))
                }
                None => Some((at, at, end, 1)),
            };
        }
        if let Some(g) = group {
            close(g, &mut b);
        }
        b
    }

    /// How closely the bursts' starts keep to a 1 ms clock.
    fn lock_1ms(&self) -> f64 {
        phase::phase_lock(
            self.starts.iter().map(|&us| u64::from(us) * 1000),
            1_000_000,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Bursts;

    #[test]
    fn fast_requests_make_no_bursts() {
        let answers: Vec<(u32, u32)> = (0..1000).map(|i| (i * 10, 100)).collect();
        let b = Bursts::of(&answers);
        assert_eq!(
            b,
            Bursts {
                slow: 0,
                bursts: 0,
                in_bursts: 0,
                longest_us: 0,
                starts: vec![],
            }
        );
    }

    #[test]
    fn slow_requests_close_together_are_one_burst_and_lone_ones_are_not() {
        let mut answers: Vec<(u32, u32)> = (0..1000).map(|i| (i * 100, 50)).collect();
        // A stall: six requests from 10 ms on, 200 µs apart, each 2 ms.
        for k in 0..6 {
            answers[100 + 2 * k].1 = 2_000;
        }
        // Two lone slow requests, far apart.
        answers[500].1 = 400;
        answers[900].1 = 400;
        let b = Bursts::of(&answers);
        assert_eq!(b.slow, 8);
        assert_eq!(b.bursts, 1);
        assert_eq!(b.in_bursts, 6);
        // From 10,000 µs to the last one's end: 11,000 + 2,000.
        assert_eq!(b.longest_us, 3_000);
        assert_eq!(b.starts, [10_000]);
    }

    #[test]
    fn bursts_that_start_on_a_millisecond_tick_lock_to_it() {
        // Three bursts, each six slow requests 100 µs apart, starting 200 µs
        // into milliseconds 10, 57 and 93.
        let mut answers = Vec::new();
        for ms in [10u32, 57, 93] {
            for k in 0..6 {
                answers.push((ms * 1000 + 200 + k * 100, 600));
            }
        }
        let b = Bursts::of(&answers);
        assert_eq!(b.starts, [10_200, 57_200, 93_200]);
        assert!((b.lock_1ms() - 1.0).abs() < 1e-9);
        // Half a millisecond later for one of them: no longer one phase.
        answers.iter_mut().take(6).for_each(|a| a.0 += 500);
        assert!(Bursts::of(&answers).lock_1ms() < 0.5);
    }

    #[test]
    fn a_gap_over_a_millisecond_splits_a_group() {
        // Four slow, a gap of 1,001 µs, four slow: two groups under MIN.
        let starts = [0, 100, 200, 300, 1_301, 1_400, 1_500, 1_600];
        let answers: Vec<(u32, u32)> = starts.iter().map(|&at| (at, 300)).collect();
        let b = Bursts::of(&answers);
        assert_eq!((b.slow, b.bursts, b.in_bursts), (8, 0, 0));
        // One microsecond less and they are one burst of eight.
        let starts = [0, 100, 200, 300, 1_300, 1_400, 1_500, 1_600];
        let answers: Vec<(u32, u32)> = starts.iter().map(|&at| (at, 300)).collect();
        let b = Bursts::of(&answers);
        assert_eq!(
            (b.slow, b.bursts, b.in_bursts, b.longest_us),
            (8, 1, 8, 1_900)
        );
    }
}
