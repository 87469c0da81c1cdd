//! Medians, percentiles and the interleaved round schedule.

use std::time::{Duration, Instant};

/// The median (upper median for an even count); NaN for an empty slice.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `q` quantile (0..=1, nearest rank) of `values`, sorted in place.
pub fn quantile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// Min and max of `values` (NaN ignored).
pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .filter(|x| !x.is_nan())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Runs `rounds` rounds of `k` contenders interleaved: in round `r`, every contender runs
/// once, starting with contender `r % k` (A B C, B C A, C A B, ...), so that drift over the
/// run (other load on the machine, the server's caches, thermal state) hits every contender
/// alike. Returns, per contender, its result of each round.
pub fn interleaved<T>(
    rounds: usize,
    k: usize,
    mut run: impl FnMut(usize, usize) -> T,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = (0..k).map(|_| Vec::with_capacity(rounds)).collect();
    for round in 0..rounds {
        for j in 0..k {
            let idx = (j + round) % k;
            out[idx].push(run(idx, round));
        }
    }
    out
}

/// Calls `op` in batches until `budget` has passed (at least `min_ops` times); returns
/// nanoseconds per call.
pub fn time_per_op(budget: Duration, min_ops: u64, mut op: impl FnMut()) -> f64 {
    const BATCH: u64 = 16;
    let start = Instant::now();
    let mut ops = 0u64;
    loop {
        for _ in 0..BATCH {
            op();
        }
        ops += BATCH;
        if ops >= min_ops && start.elapsed() >= budget {
            break;
        }
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_the_order() {
        let mut order = Vec::new();
        let per = interleaved(3, 3, |idx, round| {
            order.push(idx);
            round
        });
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(per[0], [0, 1, 2]);
    }

    #[test]
    fn quantiles_and_medians() {
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&mut v, 0.99), Some(99));
        assert_eq!(quantile(&mut v, 1.0), Some(100));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(min_max(&[3.0, 1.0, 2.0]), (1.0, 3.0));
    }
}
