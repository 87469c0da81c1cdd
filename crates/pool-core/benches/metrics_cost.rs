//! What the metrics cost the engine's hot path: one checkout + checkin of an idle connection
//! (`ConnState::handed_out`, `checkin`, and the pending-request guard), plus a checkout gate
//! permit, as every `pool.get()` pays them.
//!
//! ```sh
//! cargo bench -p pool-core --bench metrics_cost                      # feature off
//! cargo bench -p pool-core --bench metrics_cost --features metrics   # on: no recorder, then
//!                                                                    # metrics-util's debugging one
//! ```
//!
//! The figure is ns per cycle, the median of 7 runs of 200 000 cycles on one thread.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_core::config::PoolConfig;
use pool_core::engine::{ConnState, PoolState};
use pool_core::events::PoolEvent;

const OPS: u32 = 200_000;
const RUNS: usize = 7;

fn pool() -> Arc<PoolState> {
    let config = PoolConfig::builder("postgres://app@db/app")
        .pool_size(2)
        .max_overflow(0)
        .build()
        .expect("config");
    Arc::new(PoolState::new(config, Arc::new(|_: &PoolEvent<'_>| {}), None).expect("pool"))
}

fn cycle_ns(pool: &Arc<PoolState>) -> f64 {
    let mut conn = ConnState::opened(pool, Duration::ZERO, None);
    let mut samples: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..OPS {
                let (asked, gate) = {
                    let _pending = pool.pending();
                    (Instant::now(), pool.gate().try_enter())
                };
                conn.handed_out(asked, gate);
                black_box(conn.checkin(false));
            }
            start.elapsed().as_nanos() as f64 / f64::from(OPS)
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[RUNS / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let feature = if cfg!(feature = "metrics") {
        "on"
    } else {
        "off"
    };
    println!(
        "feature {feature}, no recorder: {:.1} ns per checkout + checkin",
        cycle_ns(&pool())
    );
    #[cfg(feature = "metrics")]
    {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let pool = {
            let _local = metrics::set_default_local_recorder(&recorder);
            pool()
        };
        println!(
            "feature on, debugging recorder: {:.1} ns per checkout + checkin",
            cycle_ns(&pool)
        );
    }
}
