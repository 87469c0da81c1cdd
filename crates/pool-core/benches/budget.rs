//! Budget acquire + release against a plain `parking_lot::Mutex` counter and
//! `tokio::sync::Semaphore`, uncontended and with 2/8/32 threads, in one run.
//!
//! ```sh
//! cargo bench -p pool-core --bench budget
//! ```
//!
//! Every variant does the same work per operation: take one unit of a capacity large enough
//! never to run out (64), then give it back. The budget has two classes (automation 0..=59,
//! adhoc reserved 5), so its grant rule is evaluated in full; the mutex counter only checks a
//! cap; the semaphore is `try_acquire_owned` + drop of the permit (an owned permit, like the
//! budget's, which keeps the budget alive). Threads split a fixed number of
//! operations; the figure is wall time divided by all operations (ns/op, lower is better),
//! the median of 7 runs.

use std::hint::black_box;
use std::time::Instant;

use parking_lot::Mutex;
use pool_core::budget::Budget;
use tokio::sync::Semaphore;

const OPS: u64 = 400_000;
const RUNS: usize = 7;

fn run(threads: u64, op: &(dyn Fn() + Sync)) -> f64 {
    let per_thread = OPS / threads;
    let mut samples: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..per_thread {
                            op();
                        }
                    });
                }
            });
            start.elapsed().as_nanos() as f64 / (per_thread * threads) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[RUNS / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let budget = Budget::builder(64)
        .class("automation", 0, 59)
        .class("adhoc", 5, 64)
        .build()
        .unwrap();
    let automation = budget.class_id("automation").unwrap();
    let counter = Mutex::new(0u32);
    let semaphore = std::sync::Arc::new(Semaphore::new(64));

    let budget_op = || {
        let permit = budget
            .try_acquire(automation)
            .expect("capacity never runs out");
        black_box(&permit);
    };
    let mutex_op = || {
        {
            let mut n = counter.lock();
            assert!(*n < 64);
            *n += 1;
        }
        black_box(&counter);
        *counter.lock() -= 1;
    };
    let semaphore_op = || {
        let permit = semaphore
            .clone()
            .try_acquire_owned()
            .expect("capacity never runs out");
        black_box(&permit);
    };

    // Warm-up: caches, page faults, CPU frequency.
    run(2, &budget_op);
    run(2, &mutex_op);
    run(2, &semaphore_op);
    println!("| threads | budget ns/op | parking_lot::Mutex counter ns/op | tokio Semaphore ns/op | budget / mutex | budget / semaphore |");
    println!("|---|---|---|---|---|---|");
    for threads in [1u64, 2, 8, 32] {
        let b = run(threads, &budget_op);
        let m = run(threads, &mutex_op);
        let s = run(threads, &semaphore_op);
        println!(
            "| {threads} | {b:.1} | {m:.1} | {s:.1} | {:.2} | {:.2} |",
            b / m,
            b / s
        );
    }
    assert_eq!(budget.snapshot().free, 64);
}
