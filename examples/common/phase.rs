//! Whether events keep time with a clock: shared by examples/paced.rs and
//! examples/stalls.rs (included with `#[path]`; not an example itself).

/// How closely `times` (ns, any origin) keep to one phase of a clock
/// ticking every `period` ns: the length of the mean of the unit vectors
/// at their phases (the Rayleigh statistic). 1 when every event falls at
/// the same point of the tick, near 0 when phases are spread evenly; for n
/// events at random phases it is about 0.9 / √n. 0 for no events.
pub fn phase_lock(times: impl IntoIterator<Item = u64>, period: u64) -> f64 {
    if period == 0 {
        return 0.0;
    }
    let (mut x, mut y, mut n) = (0.0f64, 0.0f64, 0usize);
    for t in times {
        let angle = (t % period) as f64 / period as f64 * std::f64::consts::TAU;
        x += angle.cos();
        y += angle.sin();
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    x.hypot(y) / n as f64
}

#[cfg(test)]
mod tests {
    use super::phase_lock;

    #[test]
    fn events_on_the_tick_lock_and_evenly_spread_ones_do_not() {
        const MS: u64 = 1_000_000;
        // Every event 300 µs into some millisecond.
        let on: Vec<u64> = (0..100).map(|k| k * 7 * MS + 300_000).collect();
        assert!((phase_lock(on.iter().copied(), MS) - 1.0).abs() < 1e-9);
        // Phases spread evenly over the millisecond.
        let spread: Vec<u64> = (0..100).map(|k| k * 10_000).collect();
        assert!(phase_lock(spread, MS) < 1e-9);
        // Two opposite phases cancel.
        let opposite = [0, MS / 2, 5 * MS, 5 * MS + MS / 2];
        assert!(phase_lock(opposite, MS) < 1e-9);
        // Locked to 1 ms is locked to every divisor of it, not to 3 ms.
        assert!((phase_lock(on.iter().copied(), MS / 4) - 1.0).abs() < 1e-9);
        assert!(phase_lock(on.iter().copied(), 3 * MS) < 0.05);
        assert_eq!(phase_lock([], MS), 0.0);
    }
}
