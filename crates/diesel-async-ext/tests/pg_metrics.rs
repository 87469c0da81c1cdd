//! The async pool's metrics (feature `metrics`) on a private server, seen through metrics-util's
//! debugging recorder, installed on the test's thread while the pool is built (the pool
//! registers its handles then; the runtime is the test's current thread).
//!
//! `cargo test -p diesel-async-ext --features metrics --test pg_metrics`
#![cfg(all(feature = "postgres", feature = "metrics"))]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use diesel_async_ext::PgPool;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use pool_core::metrics as m;

/// Totals over snapshots (each drains counters and histograms and zeroes gauges): counters'
/// totals, gauges' net change, histograms' samples; keyed by kind, name and labels other than
/// the pool's name.
#[derive(Default)]
struct Totals(HashMap<Key, f64>);

/// A metric: its kind, name, and labels other than the pool's name.
type Key = (MetricKind, String, Vec<(String, String)>);

impl Totals {
    fn get(
        &mut self,
        s: &Snapshotter,
        kind: MetricKind,
        name: &str,
        labels: &[(&str, &str)],
    ) -> f64 {
        for (key, _, _, value) in s.snapshot().into_vec() {
            let (k, key) = key.into_parts();
            let l = key
                .labels()
                .filter(|l| l.key() != m::POOL_NAME)
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            *self.0.entry((k, key.name().to_owned(), l)).or_default() += match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
        }
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.0
            .get(&(kind, name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }
}

async fn recorded(recorder: &DebuggingRecorder, pg: &PgServer, app: &str, size: u32) -> PgPool {
    let _local = metrics::set_default_local_recorder(recorder);
    ext_pool(pg, app, size)
        .validation_bypass_window(Duration::from_secs(60))
        .build()
        .await
        .expect("pool")
}

#[tokio::test]
async fn checkouts_timeouts_and_a_terminated_backend_move_their_metrics() {
    let Some(pg) = server() else { return };
    let app = "ametrics";
    let recorder = DebuggingRecorder::new();
    let s = recorder.snapshotter();
    let mut t = Totals::default();
    let pool = recorded(&recorder, &pg, app, 1).await;
    let idle = [(m::STATE, "idle")];
    let used = [(m::STATE, "used")];
    assert_eq!(t.get(&s, MetricKind::Gauge, m::MAX, &[]), 1.0);
    assert_eq!(t.get(&s, MetricKind::Histogram, m::CREATE_TIME, &[]), 1.0);
    assert_eq!(
        t.get(&s, MetricKind::Gauge, m::CONNECTION_COUNT, &idle),
        1.0
    );

    let mut conn = pool.get().await.expect("checkout");
    one(&mut conn).await.expect("query");
    assert_eq!(t.get(&s, MetricKind::Histogram, m::WAIT_TIME, &[]), 1.0);
    assert_eq!(
        t.get(&s, MetricKind::Gauge, m::CONNECTION_COUNT, &used),
        1.0
    );
    assert_eq!(
        t.get(&s, MetricKind::Gauge, m::CONNECTION_COUNT, &idle),
        0.0
    );
    // The only connection is out: a checkout times out.
    assert!(pool.get_timeout(Duration::from_millis(100)).await.is_err());
    assert_eq!(t.get(&s, MetricKind::Counter, m::TIMEOUTS, &[]), 1.0);
    drop(conn);
    assert_eq!(t.get(&s, MetricKind::Histogram, m::USE_TIME, &[]), 1.0);
    assert_eq!(
        t.get(&s, MetricKind::Gauge, m::CONNECTION_COUNT, &used),
        0.0
    );
    assert_eq!(
        t.get(&s, MetricKind::Gauge, m::CONNECTION_COUNT, &idle),
        1.0
    );
    assert_eq!(t.get(&s, MetricKind::Gauge, m::PENDING_REQUESTS, &[]), 0.0);

    // Terminated, gone, and the FATAL read by diesel-async's connection task.
    terminate_all(&pg, app).await;
    assert_eq!(pool.select_one().await, Ok(1));
    assert_eq!(t.get(&s, MetricKind::Counter, m::FOUND_DEAD, &[]), 1.0);
    assert!(t.get(&s, MetricKind::Counter, m::INVALIDATIONS, &[]) >= 1.0);
    assert_eq!(t.get(&s, MetricKind::Histogram, m::CREATE_TIME, &[]), 2.0);
}
