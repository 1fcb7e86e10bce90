//! How often the CPU it runs on is taken away, for bench/load.sh: spins on
//! the monotonic clock for SECONDS and records every gap between two
//! readings longer than 10 µs.
//!
//! On a virtual machine the host can deschedule a vCPU for milliseconds,
//! and the guest's scheduler never sees it: nothing else runs in the guest
//! during such a gap. Any proxy on that CPU stalls with it, so the gaps set
//! a floor under the latency the proxy can add. `floor_p99_us` is that
//! floor: the p99 of the wait a request arriving at a random instant would
//! see from the gaps alone (the rest of the gap it lands in), as if the
//! proxy cost nothing. A p99 target below it cannot be met on this machine
//! by any proxy.
//!
//! With RATE and BUSY it also replays the recorded gaps against a proxy
//! that needs BUSY / RATE seconds of this CPU for every request, requests
//! arriving evenly at RATE per second, served first come first served. With
//! no gaps such a proxy adds nothing but its own service time;
//! `queue_p99_us` is what it adds at p99 with them: the tail a proxy of
//! that cost would have on this machine from the stalls and the queue they
//! build, whatever its code does otherwise.
//!
//! Usage: stalls SECONDS [RATE BUSY]...   (BUSY a fraction, e.g. 0.7)
//! Prints: `floor_p99_us=<n> over_100us=<n> over_250us=<n> over_1ms=<n>
//! max_us=<n> lost_permille=<n> gaps=<n> tick_lock_1ms=<r>` and
//! `queue_p99_us@<RATE>=<n>` for each RATE BUSY pair, where `over_*` and
//! `gaps` count gaps per second, `lost_permille` is the share of wall time
//! spent in gaps, in ‰, and `tick_lock_1ms` says how closely the gaps'
//! starts keep to a 1 ms clock (0 to 1, see `phase_lock`). On the KVM guest
//! of BENCHMARKS.md, whose own timer ticks every 4 ms (HZ=250), ~1,000
//! gaps a second start at one phase of a 1 ms clock: the host's.

use std::time::{Duration, Instant};

#[path = "common/phase.rs"]
mod phase;

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().ok())
        .collect::<Option<_>>()
        .unwrap_or_default();
    let loads: Vec<(f64, f64)> = args
        .get(1..)
        .unwrap_or_default()
        .chunks(2)
        .map(|p| match p {
            &[rate, busy] if rate > 0.0 && busy > 0.0 && busy < 1.0 => Some((rate, busy)),
            _ => None,
        })
        .collect::<Option<_>>()
        .unwrap_or_default();
    let seconds = match args.first() {
        Some(&s) if s > 0.0 && loads.len() * 2 + 1 == args.len() => s,
        _ => {
            eprintln!("usage: stalls SECONDS [RATE BUSY]...   (BUSY a fraction, e.g. 0.7)");
            std::process::exit(2);
        }
    };
    let wall = Duration::from_secs_f64(seconds);
    let mut gaps: Vec<u64> = Vec::with_capacity(1 << 16);
    // Where each gap ended, in ns from the start.
    let mut ends: Vec<u64> = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let mut last = start;
    loop {
        let now = Instant::now();
        let gap = now.duration_since(last);
        if gap > Duration::from_micros(10) {
            gaps.push(u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX));
            ends.push(u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX));
        }
        last = now;
        if now.duration_since(start) >= wall {
            break;
        }
    }
    let total = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut line = summary(&gaps, total);
    let stalls: Vec<(u64, u64)> = ends.iter().zip(&gaps).map(|(&e, &g)| (e - g, e)).collect();
    line.push_str(&format!(
        " gaps={:.0} tick_lock_1ms={:.2}",
        gaps.len() as f64 / (total as f64 / 1e9),
        phase::phase_lock(stalls.iter().map(|&(start, _)| start), 1_000_000)
    ));
    for (rate, busy) in loads {
        let service = (busy / rate * 1e9) as u64;
        let every = (1e9 / rate) as u64;
        let p99 = queue_p99(&stalls, total, every, service) / 1000;
        line.push_str(&format!(" queue_p99_us@{rate:.0}={p99}"));
    }
    println!("{line}");
}

/// The p99 of what a first-come-first-served server adds beyond its own
/// `service` ns when requests arrive every `every` ns over `total` ns and
/// the CPU is gone during `stalls` (start, end), sorted by start.
fn queue_p99(stalls: &[(u64, u64)], total: u64, every: u64, service: u64) -> u64 {
    let mut added = Vec::with_capacity((total / every.max(1)) as usize + 1);
    let (mut free_at, mut next_stall) = (0u64, 0usize);
    let mut arrival = 0u64;
    while arrival < total {
        let mut t = arrival.max(free_at);
        let mut work = service;
        // Work runs between stalls; a stall that starts before the work
        // is done pushes the rest past its end.
        while next_stall < stalls.len() && stalls[next_stall].1 <= t {
            next_stall += 1;
        }
        let mut k = next_stall;
        loop {
            match stalls.get(k) {
                Some(&(s, e)) if s < t + work => {
                    if s > t {
                        work -= s - t;
                    }
                    t = t.max(e);
                    k += 1;
                }
                _ => break,
            }
        }
        free_at = t + work;
        added.push(free_at - arrival - service);
        arrival += every.max(1);
    }
    added.sort_unstable();
    added.get(added.len() * 99 / 100).copied().unwrap_or(0)
}

/// The report line for `gaps` (ns) observed over `total` ns of wall time.
fn summary(gaps: &[u64], total: u64) -> String {
    let secs = total as f64 / 1e9;
    let per_sec = |over_ns: u64| gaps.iter().filter(|&&g| g > over_ns).count() as f64 / secs;
    let lost: u64 = gaps.iter().sum();
    format!(
        "floor_p99_us={} over_100us={:.1} over_250us={:.1} over_1ms={:.1} max_us={} lost_permille={:.1}",
        floor(gaps, total, 0.01) / 1000,
        per_sec(100_000),
        per_sec(250_000),
        per_sec(1_000_000),
        gaps.iter().max().copied().unwrap_or(0) / 1000,
        lost as f64 * 1000.0 / total as f64,
    )
}

/// The smallest wait `x` (ns) such that an instant drawn uniformly from
/// `total` ns has at most probability `p` of landing in a gap with more
/// than `x` of it left: P(rest > x) = Σ max(0, g - x) / total, which falls
/// as x grows, so a binary search finds it.
fn floor(gaps: &[u64], total: u64, p: f64) -> u64 {
    let budget = (total as f64 * p) as u64;
    let over = |x: u64| -> u64 { gaps.iter().map(|&g| g.saturating_sub(x)).sum() };
    let (mut lo, mut hi) = (0u64, gaps.iter().max().copied().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if over(mid) <= budget {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::{floor, queue_p99};

    #[test]
    fn without_stalls_an_unsaturated_server_adds_nothing() {
        // 90% busy, evenly spaced arrivals: never a queue.
        assert_eq!(queue_p99(&[], 1_000_000_000, 100_000, 90_000), 0);
    }

    #[test]
    fn a_stall_builds_a_queue_that_busier_servers_drain_slower() {
        // A 2 ms stall every 100 ms, requests every 100 µs.
        let stalls: Vec<(u64, u64)> = (0..10)
            .map(|i| (i * 100_000_000 + 50_000_000, i * 100_000_000 + 52_000_000))
            .collect();
        let light = queue_p99(&stalls, 1_000_000_000, 100_000, 20_000);
        let busy = queue_p99(&stalls, 1_000_000_000, 100_000, 80_000);
        // 2% of the time stalled: p99 lands inside the stall's own wait
        // for the light server, and deep in the backlog for the busy one.
        assert!(light > 0 && light < 2_000_000, "light {light}");
        assert!(busy > light, "busy {busy} light {light}");
    }

    #[test]
    fn no_gaps_no_floor() {
        assert_eq!(floor(&[], 1_000_000_000, 0.01), 0);
    }

    #[test]
    fn the_floor_is_what_one_percent_of_arrivals_still_wait() {
        // One 20 ms gap in a second: 2% of arrivals land in it, and half
        // of those (1% of all) have more than 10 ms of it left.
        assert_eq!(floor(&[20_000_000], 1_000_000_000, 0.01), 10_000_000);
        // A 5 ms gap holds only 0.5% of arrivals: no wait at p99.
        assert_eq!(floor(&[5_000_000], 1_000_000_000, 0.01), 0);
        // Two 10 ms gaps: 2% of arrivals, the worse half has over 5 ms left.
        assert_eq!(
            floor(&[10_000_000, 10_000_000], 1_000_000_000, 0.01),
            5_000_000
        );
    }
}
