//! A small binary to profile one checkout + return under callgrind (perf is not available
//! here): `machinery_1t` says how long ext_sync's checkout takes, this says where it goes.
//!
//! ```sh
//! CARGO_TARGET_DIR=target/h-bench cargo build --release -p pool-bench --example checkout_profile
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.ext \
//!     --toggle-collect='*checkout_loop*' target/h-bench/release/examples/checkout_profile ext 20000
//! callgrind_annotate --inclusive=yes /tmp/cg.ext | head -60
//! ```
//!
//! `ext` profiles `resilient_diesel::PgPool`, `r2d2_notest` plain r2d2 without the test on
//! checkout; both with one open connection and no query. Without valgrind it prints the
//! time per checkout.

use std::hint::black_box;
use std::time::Instant;

use diesel::r2d2::ConnectionManager;
use diesel::PgConnection;

#[inline(never)]
fn checkout_loop<T>(n: u32, get: impl Fn() -> T) {
    for _ in 0..n {
        drop(black_box(get()));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let which = args.next().unwrap_or_else(|| "ext".into());
    let n: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let pg = test_support::PgServer::start().expect("a private PostgreSQL server");
    let url = pg.url_with("sslmode=disable&application_name=checkout_profile");
    let started;
    match which.as_str() {
        "ext" => {
            let pool = resilient_diesel::PgPool::builder(&url)
                .pool_size(1)
                .max_overflow(0)
                .build()
                .expect("pool");
            checkout_loop(1000, || pool.get().expect("checkout"));
            started = Instant::now();
            checkout_loop(n, || pool.get().expect("checkout"));
        }
        "r2d2_notest" => {
            let pool = r2d2::Pool::builder()
                .max_size(1)
                .test_on_check_out(false)
                .build(ConnectionManager::<PgConnection>::new(&url))
                .expect("pool");
            checkout_loop(1000, || pool.get().expect("checkout"));
            started = Instant::now();
            checkout_loop(n, || pool.get().expect("checkout"));
        }
        other => {
            eprintln!("usage: checkout_profile ext|r2d2_notest [iterations] (not {other:?})");
            std::process::exit(2);
        }
    }
    println!(
        "{which}: {:.0} ns per checkout + return ({n} iterations)",
        started.elapsed().as_nanos() as f64 / f64::from(n)
    );
}
