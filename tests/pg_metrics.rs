//! The sync pool's metrics (feature `metrics`) on a private server, seen through metrics-util's
//! debugging recorder: each metric moves when its event happens. The recorder is installed on
//! the test's thread while the pool is built (the pool registers its handles then); events on
//! r2d2's and the maintenance's threads go through those handles.
//!
//! `cargo test --features metrics --test pg_metrics`
#![cfg(feature = "metrics")]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use resilient_diesel::pool_core::metrics as m;

/// A metric: its kind, name, and labels other than the pool's name.
type Key = (MetricKind, String, Vec<(String, String)>);

/// What the recorder saw, accumulated over snapshots (each snapshot drains counters and
/// histograms and zeroes gauges): counters' totals, gauges' net change, histograms' samples.
struct Seen {
    snapshotter: Snapshotter,
    totals: HashMap<Key, f64>,
}

impl Seen {
    fn new(recorder: &DebuggingRecorder) -> Seen {
        Seen {
            snapshotter: recorder.snapshotter(),
            totals: HashMap::new(),
        }
    }

    fn update(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let labels = key
                .labels()
                .filter(|l| l.key() != m::POOL_NAME)
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let add = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
            *self
                .totals
                .entry((kind, key.name().to_owned(), labels))
                .or_default() += add;
        }
    }

    fn get(&mut self, kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.update();
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.totals
            .get(&(kind, name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn counter(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(MetricKind::Counter, name, labels)
    }

    fn gauge(&mut self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(MetricKind::Gauge, name, labels)
    }

    fn samples(&mut self, name: &str) -> f64 {
        self.get(MetricKind::Histogram, name, &[])
    }
}

/// A pool built with `recorder` installed for this thread.
fn recorded(
    recorder: &DebuggingRecorder,
    builder: resilient_diesel::Builder<diesel::PgConnection>,
) -> resilient_diesel::PgPool {
    let _local = metrics::set_default_local_recorder(recorder);
    builder.build().expect("pool")
}

const IDLE: [(&str, &str); 1] = [(m::STATE, "idle")];
const USED: [(&str, &str); 1] = [(m::STATE, "used")];

#[test]
fn a_checkout_moves_wait_use_and_create_time_and_the_connection_counts() {
    let Some(pg) = server() else { return };
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    let pool = recorded(&recorder, ext_pool(&pg, "metrics_checkout", 2));
    assert_eq!(seen.gauge(m::MAX, &[]), 2.0);
    assert_eq!(seen.gauge(m::IDLE_MAX, &[]), 2.0);
    assert_eq!(
        seen.samples(m::CREATE_TIME),
        2.0,
        "two connections opened at build"
    );
    assert_eq!(seen.gauge(m::CONNECTION_COUNT, &IDLE), 2.0);
    let conn = pool.get().expect("checkout");
    assert_eq!(seen.samples(m::WAIT_TIME), 1.0);
    assert_eq!(seen.gauge(m::CONNECTION_COUNT, &IDLE), 1.0);
    assert_eq!(seen.gauge(m::CONNECTION_COUNT, &USED), 1.0);
    drop(conn);
    assert_eq!(seen.samples(m::USE_TIME), 1.0);
    assert_eq!(seen.gauge(m::CONNECTION_COUNT, &IDLE), 2.0);
    assert_eq!(seen.gauge(m::CONNECTION_COUNT, &USED), 0.0);
    assert_eq!(seen.gauge(m::PENDING_REQUESTS, &[]), 0.0);
}

#[test]
fn a_timed_out_checkout_moves_timeouts_and_a_waiting_one_is_pending() {
    let Some(pg) = server() else { return };
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    let pool = recorded(&recorder, ext_pool(&pg, "metrics_timeout", 1));
    let held = pool.get().expect("the only connection");
    let waiter = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.get_timeout(Duration::from_secs(30)).map(drop))
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.gauge(m::PENDING_REQUESTS, &[]) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the waiting checkout never showed as pending"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(held);
    waiter
        .join()
        .expect("waiter")
        .expect("served once returned");
    assert_eq!(seen.gauge(m::PENDING_REQUESTS, &[]), 0.0);
    let held = pool.get().expect("again");
    assert!(pool.get_timeout(Duration::from_millis(100)).is_err());
    assert_eq!(seen.counter(m::TIMEOUTS, &[]), 1.0);
    drop(held);
}

#[test]
fn a_terminated_backend_moves_the_probes_counter_and_invalidations_and_pings_count() {
    let Some(pg) = server() else { return };
    let app = "metrics_terminated";
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    let pool = recorded(
        &recorder,
        ext_pool(&pg, app, 1).validation_bypass_window(Duration::from_secs(60)),
    );
    warm(&pool, 1);
    pg.terminate_backends(app).expect("terminate");
    pg.wait_backends_gone(app, Duration::from_secs(10))
        .expect("backends gone");
    // A backend leaves pg_stat_activity a moment before its process closes the socket: give
    // the FIN time to arrive, so that the probe (not the query) is what finds it dead.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(select_one(&pool), Ok(1));
    assert_eq!(seen.counter(m::FOUND_DEAD, &[]), 1.0);
    assert!(seen.counter(m::INVALIDATIONS, &[]) >= 1.0);
    assert_eq!(seen.samples(m::CREATE_TIME), 2.0, "the reconnect");
    // After the invalidation, the next checkout of an older connection pings it: none is
    // older here; invalidate by hand and check out again.
    let pings = seen.counter(m::PINGS, &[]);
    pool.invalidate();
    assert_eq!(select_one(&pool), Ok(1));
    assert_eq!(seen.counter(m::PINGS, &[]), pings + 1.0);
}

#[test]
fn refused_connects_move_the_transient_connect_failures() {
    test_support::capture_logs();
    let recorder = DebuggingRecorder::new();
    let mut seen = Seen::new(&recorder);
    let url = format!(
        "postgres://app@127.0.0.1:{}/app?sslmode=disable",
        test_support::free_port()
    );
    let pool = {
        let _local = metrics::set_default_local_recorder(&recorder);
        resilient_diesel::PgPool::builder(&url)
            .pool_size(1)
            .build_lazy()
            .expect("lazy pool")
    };
    assert!(pool.get_timeout(Duration::from_millis(300)).is_err());
    let transient = [(m::ERROR_TYPE, "transient")];
    assert!(seen.counter(m::CONNECT_FAILURES, &transient) >= 1.0);
    assert_eq!(
        seen.counter(m::CONNECT_FAILURES, &[(m::ERROR_TYPE, "hopeless")]),
        0.0
    );
    assert_eq!(seen.counter(m::TIMEOUTS, &[]), 1.0);
}
