//! The pools' metrics through the [`metrics`](https://docs.rs/metrics) facade (cargo feature
//! `metrics`, off by default): OpenTelemetry's database-client names
//! (`db.client.connection.*`) where a convention exists, ours under `resilient_diesel.`
//! elsewhere. The table of names, types, units and HikariCP equivalents is in
//! `docs/metrics.md`; the names are the constants below.
//!
//! Every pool registers its handles once, when it is built (labelled with
//! `db.client.connection.pool.name` and, for a budget class, `class`): **install the recorder
//! before building the pools.** An event then costs one branch on a handle with no recorder
//! behind it, and the recorder's own atomic update with one. Without the feature, every type
//! here is empty and every method does nothing (no code on the hot path).

use std::time::Duration;

/// `db.client.connection.count` (gauge, `{connection}`), with `db.client.connection.state`.
pub const CONNECTION_COUNT: &str = "db.client.connection.count";
/// `db.client.connection.idle.max` (gauge): `pool_size`, the most connections kept idle.
pub const IDLE_MAX: &str = "db.client.connection.idle.max";
/// `db.client.connection.idle.min` (gauge): the reserved floor of a budget class (0 for a
/// plain pool: idle connections are closed after `idle_timeout`).
pub const IDLE_MIN: &str = "db.client.connection.idle.min";
/// `db.client.connection.max` (gauge): `pool_size + max_overflow`.
pub const MAX: &str = "db.client.connection.max";
/// `db.client.connection.pending_requests` (gauge): checkouts under way that hold no
/// connection yet.
pub const PENDING_REQUESTS: &str = "db.client.connection.pending_requests";
/// `db.client.connection.timeouts` (counter): checkouts that gave up.
pub const TIMEOUTS: &str = "db.client.connection.timeouts";
/// `db.client.connection.create_time` (histogram, seconds): how long opening a connection took.
pub const CREATE_TIME: &str = "db.client.connection.create_time";
/// `db.client.connection.wait_time` (histogram, seconds): how long a checkout waited.
pub const WAIT_TIME: &str = "db.client.connection.wait_time";
/// `db.client.connection.use_time` (histogram, seconds): how long a connection was held.
pub const USE_TIME: &str = "db.client.connection.use_time";
/// Connections the zero-round-trip liveness probe found closed by the server at a checkout
/// (counter).
pub const FOUND_DEAD: &str = "resilient_diesel.connection.found_dead";
/// Validation pings sent (counter).
pub const PINGS: &str = "resilient_diesel.connection.pings";
/// Validation pings that failed (counter), with `error.type` = `ping_error` (an error came
/// back) or `ping_timeout` (no reply within `validation_timeout`).
pub const VALIDATION_FAILURES: &str = "resilient_diesel.connection.validation_failures";
/// Connect attempts that failed (counter), with `error.type` = `hopeless` or `transient`.
pub const CONNECT_FAILURES: &str = "resilient_diesel.connection.connect_failures";
/// Times the pool was invalidated, once per cause seen (counter).
pub const INVALIDATIONS: &str = "resilient_diesel.pool.invalidations";
/// Connections held longer than the leak detection threshold (counter).
pub const LEAKS: &str = "resilient_diesel.connection.leaks";
/// Operations retried after a transient error (counter).
pub const RETRIES: &str = "resilient_diesel.retries";
/// Operations that failed after exhausting their retries (counter).
pub const RETRIES_EXHAUSTED: &str = "resilient_diesel.retries.exhausted";
/// Ambiguous commits (connection lost during `COMMIT`) whose outcome was resolved (counter).
pub const COMMITS_RESOLVED: &str = "resilient_diesel.commits.ambiguous_resolved";
/// Budget permits held per class (gauge), with `class`.
pub const BUDGET_IN_USE: &str = "resilient_diesel.budget.in_use";

/// The attribute naming the pool.
pub const POOL_NAME: &str = "db.client.connection.pool.name";
/// The attribute of [`CONNECTION_COUNT`]: `idle` or `used`.
pub const STATE: &str = "db.client.connection.state";
/// The attribute naming a budget class.
pub const CLASS: &str = "class";
/// The attribute classifying a failure.
pub const ERROR_TYPE: &str = "error.type";

/// Why a validation failed (the `error.type` of [`VALIDATION_FAILURES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationFailure {
    /// The ping came back with an error.
    Error,
    /// No reply within `validation_timeout`.
    Timeout,
}

#[cfg(feature = "metrics")]
mod on {
    use super::*;
    use crate::engine::ConnectClass;
    use ::metrics::{Counter, Gauge, Histogram, Label, Unit};

    /// One pool's metric handles, registered when the pool is built.
    #[derive(Debug, Clone)]
    pub struct PoolMetrics {
        idle: Gauge,
        used: Gauge,
        pending: Gauge,
        timeouts: Counter,
        create_time: Histogram,
        wait_time: Histogram,
        use_time: Histogram,
        found_dead: Counter,
        pings: Counter,
        ping_errors: Counter,
        ping_timeouts: Counter,
        connect_hopeless: Counter,
        connect_transient: Counter,
        invalidations: Counter,
        leaks: Counter,
        retries: Counter,
        retries_exhausted: Counter,
        commits_resolved: Counter,
    }

    impl Default for PoolMetrics {
        fn default() -> Self {
            PoolMetrics {
                idle: Gauge::noop(),
                used: Gauge::noop(),
                pending: Gauge::noop(),
                timeouts: Counter::noop(),
                create_time: Histogram::noop(),
                wait_time: Histogram::noop(),
                use_time: Histogram::noop(),
                found_dead: Counter::noop(),
                pings: Counter::noop(),
                ping_errors: Counter::noop(),
                ping_timeouts: Counter::noop(),
                connect_hopeless: Counter::noop(),
                connect_transient: Counter::noop(),
                invalidations: Counter::noop(),
                leaks: Counter::noop(),
                retries: Counter::noop(),
                retries_exhausted: Counter::noop(),
                commits_resolved: Counter::noop(),
            }
        }
    }

    fn describe() {
        use ::metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_gauge!(
            CONNECTION_COUNT,
            "Connections open now, by state (idle, used)"
        );
        describe_gauge!(
            IDLE_MAX,
            "The most idle connections the pool keeps (pool_size)"
        );
        describe_gauge!(
            IDLE_MIN,
            "Idle connections kept whatever the idle timeout (a budget class's reserved floor)"
        );
        describe_gauge!(
            MAX,
            "The most connections the pool opens (pool_size + max_overflow)"
        );
        describe_gauge!(
            PENDING_REQUESTS,
            "Checkouts under way that hold no connection yet"
        );
        describe_counter!(TIMEOUTS, "Checkouts that gave up without a connection");
        describe_histogram!(CREATE_TIME, Unit::Seconds, "Time to open a connection");
        describe_histogram!(
            WAIT_TIME,
            Unit::Seconds,
            "Time a checkout waited for its connection"
        );
        describe_histogram!(
            USE_TIME,
            Unit::Seconds,
            "Time a connection was held before its return"
        );
        describe_counter!(
            FOUND_DEAD,
            "Connections the liveness probe found closed by the server at a checkout"
        );
        describe_counter!(PINGS, "Validation pings sent");
        describe_counter!(
            VALIDATION_FAILURES,
            "Validation pings that failed, by error.type (ping_error, ping_timeout)"
        );
        describe_counter!(
            CONNECT_FAILURES,
            "Connect attempts that failed, by error.type (hopeless, transient)"
        );
        describe_counter!(INVALIDATIONS, "Pool invalidations, once per cause seen");
        describe_counter!(
            LEAKS,
            "Connections held longer than the leak detection threshold"
        );
        describe_counter!(RETRIES, "Operations retried after a transient error");
        describe_counter!(
            RETRIES_EXHAUSTED,
            "Operations that failed after exhausting their retries"
        );
        describe_counter!(
            COMMITS_RESOLVED,
            "Ambiguous commits whose outcome was resolved"
        );
        describe_gauge!(BUDGET_IN_USE, "Budget permits held, by class");
    }

    impl PoolMetrics {
        /// Registers the handles of pool `pool` (of budget class `class`, if any) with the
        /// recorder installed now, and sets its size gauges: `max` connections, `idle_max`
        /// kept idle, `idle_min` kept whatever the idle timeout.
        pub fn register(
            pool: &str,
            class: Option<&str>,
            max: u32,
            idle_max: u32,
            idle_min: u32,
        ) -> PoolMetrics {
            describe();
            let mut labels = vec![Label::new(POOL_NAME, pool.to_owned())];
            if let Some(class) = class {
                labels.push(Label::new(CLASS, class.to_owned()));
            }
            let with = |k: &'static str, v: &'static str| {
                let mut l = labels.clone();
                l.push(Label::new(k, v));
                l
            };
            ::metrics::gauge!(MAX, labels.clone()).set(max);
            ::metrics::gauge!(IDLE_MAX, labels.clone()).set(idle_max);
            ::metrics::gauge!(IDLE_MIN, labels.clone()).set(idle_min);
            PoolMetrics {
                idle: ::metrics::gauge!(CONNECTION_COUNT, with(STATE, "idle")),
                used: ::metrics::gauge!(CONNECTION_COUNT, with(STATE, "used")),
                pending: ::metrics::gauge!(PENDING_REQUESTS, labels.clone()),
                timeouts: ::metrics::counter!(TIMEOUTS, labels.clone()),
                create_time: ::metrics::histogram!(CREATE_TIME, labels.clone()),
                wait_time: ::metrics::histogram!(WAIT_TIME, labels.clone()),
                use_time: ::metrics::histogram!(USE_TIME, labels.clone()),
                found_dead: ::metrics::counter!(FOUND_DEAD, labels.clone()),
                pings: ::metrics::counter!(PINGS, labels.clone()),
                ping_errors: ::metrics::counter!(
                    VALIDATION_FAILURES,
                    with(ERROR_TYPE, "ping_error")
                ),
                ping_timeouts: ::metrics::counter!(
                    VALIDATION_FAILURES,
                    with(ERROR_TYPE, "ping_timeout")
                ),
                connect_hopeless: ::metrics::counter!(
                    CONNECT_FAILURES,
                    with(ERROR_TYPE, "hopeless")
                ),
                connect_transient: ::metrics::counter!(
                    CONNECT_FAILURES,
                    with(ERROR_TYPE, "transient")
                ),
                invalidations: ::metrics::counter!(INVALIDATIONS, labels.clone()),
                leaks: ::metrics::counter!(LEAKS, labels.clone()),
                retries: ::metrics::counter!(RETRIES, labels.clone()),
                retries_exhausted: ::metrics::counter!(RETRIES_EXHAUSTED, labels.clone()),
                commits_resolved: ::metrics::counter!(COMMITS_RESOLVED, labels),
            }
        }

        #[inline]
        pub(crate) fn opened(&self, took: Duration) {
            self.create_time.record(took.as_secs_f64());
            self.idle.increment(1.0);
        }

        #[inline]
        pub(crate) fn handed_out(&self, was_idle: bool) {
            if was_idle {
                self.idle.decrement(1.0);
            }
            self.used.increment(1.0);
        }

        #[inline]
        pub(crate) fn checked_in(&self, held: Duration, kept: bool) {
            self.use_time.record(held.as_secs_f64());
            self.used.decrement(1.0);
            if kept {
                self.idle.increment(1.0);
            }
        }

        #[inline]
        pub(crate) fn idle_closed(&self) {
            self.idle.decrement(1.0);
        }

        #[inline]
        pub(crate) fn waited(&self, waited: Duration) {
            self.wait_time.record(waited.as_secs_f64());
        }

        #[inline]
        pub(crate) fn timeout(&self) {
            self.timeouts.increment(1);
        }

        #[inline]
        pub(crate) fn found_dead(&self) {
            self.found_dead.increment(1);
        }

        #[inline]
        pub(crate) fn ping(&self) {
            self.pings.increment(1);
        }

        #[inline]
        pub(crate) fn validation_failed(&self, why: ValidationFailure) {
            match why {
                ValidationFailure::Error => self.ping_errors.increment(1),
                ValidationFailure::Timeout => self.ping_timeouts.increment(1),
            }
        }

        #[inline]
        pub(crate) fn connect_failed(&self, class: ConnectClass) {
            match class {
                ConnectClass::Hopeless => self.connect_hopeless.increment(1),
                ConnectClass::Transient => self.connect_transient.increment(1),
            }
        }

        #[inline]
        pub(crate) fn invalidation(&self) {
            self.invalidations.increment(1);
        }

        #[inline]
        pub(crate) fn leak(&self) {
            self.leaks.increment(1);
        }

        #[inline]
        pub(crate) fn retry(&self) {
            self.retries.increment(1);
        }

        #[inline]
        pub(crate) fn retry_exhausted(&self) {
            self.retries_exhausted.increment(1);
        }

        #[inline]
        pub(crate) fn commit_resolved(&self) {
            self.commits_resolved.increment(1);
        }

        /// A checkout under way without a connection, until the guard is dropped.
        #[inline]
        pub fn pending(&self) -> Pending {
            self.pending.increment(1.0);
            Pending(self.pending.clone())
        }
    }

    /// A checkout counted in `db.client.connection.pending_requests` until dropped.
    #[derive(Debug)]
    #[must_use = "the checkout is pending until this is dropped"]
    pub struct Pending(Gauge);

    impl Drop for Pending {
        fn drop(&mut self) {
            self.0.decrement(1.0);
        }
    }

    /// A budget's `resilient_diesel.budget.in_use` gauges, one per class.
    #[derive(Debug, Default)]
    pub(crate) struct BudgetMetrics(Vec<Gauge>);

    impl BudgetMetrics {
        pub(crate) fn register(classes: &[String]) -> BudgetMetrics {
            describe();
            BudgetMetrics(
                classes
                    .iter()
                    .map(|c| ::metrics::gauge!(BUDGET_IN_USE, CLASS => c.clone()))
                    .collect(),
            )
        }

        #[inline]
        pub(crate) fn acquired(&self, class: usize) {
            if let Some(g) = self.0.get(class) {
                g.increment(1.0);
            }
        }

        #[inline]
        pub(crate) fn released(&self, class: usize) {
            if let Some(g) = self.0.get(class) {
                g.decrement(1.0);
            }
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod off {
    use super::*;
    use crate::engine::ConnectClass;

    /// One pool's metric handles: empty without the `metrics` feature.
    #[derive(Debug, Clone, Default)]
    pub struct PoolMetrics(());

    impl PoolMetrics {
        /// Does nothing without the `metrics` feature.
        pub fn register(
            _pool: &str,
            _class: Option<&str>,
            _max: u32,
            _idle_max: u32,
            _idle_min: u32,
        ) -> PoolMetrics {
            PoolMetrics(())
        }
        #[inline(always)]
        pub(crate) fn opened(&self, _took: Duration) {}
        #[inline(always)]
        pub(crate) fn waited(&self, _waited: Duration) {}
        #[inline(always)]
        pub(crate) fn timeout(&self) {}
        #[inline(always)]
        pub(crate) fn found_dead(&self) {}
        #[inline(always)]
        pub(crate) fn ping(&self) {}
        #[inline(always)]
        pub(crate) fn validation_failed(&self, _why: ValidationFailure) {}
        #[inline(always)]
        pub(crate) fn connect_failed(&self, _class: ConnectClass) {}
        #[inline(always)]
        pub(crate) fn invalidation(&self) {}
        #[inline(always)]
        pub(crate) fn leak(&self) {}
        #[inline(always)]
        pub(crate) fn retry(&self) {}
        #[inline(always)]
        pub(crate) fn retry_exhausted(&self) {}
        #[inline(always)]
        pub(crate) fn commit_resolved(&self) {}
        /// Does nothing without the `metrics` feature.
        #[inline(always)]
        pub fn pending(&self) -> Pending {
            Pending
        }
    }

    /// Empty without the `metrics` feature.
    #[derive(Debug)]
    pub struct Pending;

    #[derive(Debug, Default)]
    pub(crate) struct BudgetMetrics(());

    impl BudgetMetrics {
        pub(crate) fn register(_classes: &[String]) -> BudgetMetrics {
            BudgetMetrics(())
        }
        #[inline(always)]
        pub(crate) fn acquired(&self, _class: usize) {}
        #[inline(always)]
        pub(crate) fn released(&self, _class: usize) {}
    }
}

#[cfg(not(feature = "metrics"))]
pub(crate) use off::BudgetMetrics;
#[cfg(not(feature = "metrics"))]
pub use off::{Pending, PoolMetrics};
#[cfg(feature = "metrics")]
pub(crate) use on::BudgetMetrics;
#[cfg(feature = "metrics")]
pub use on::{Pending, PoolMetrics};

#[cfg(all(test, feature = "metrics", not(loom)))]
mod tests {
    //! Each metric moves when its event happens, seen through metrics-util's debugging
    //! recorder, installed for this thread while the pool (and budget) register their handles.

    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use metrics_util::MetricKind;

    use super::*;
    use crate::budget::Budget;
    use crate::config::PoolConfig;
    use crate::engine::{ConnState, ConnectClass, PoolState};
    use crate::events::PoolEvent;

    /// Values by (kind, name, labels without the pool's name), as a snapshot gives them: a
    /// counter's increments and a gauge's net change since the previous snapshot, a
    /// histogram's samples.
    type Values = HashMap<Key, DebugValue>;

    /// A metric: its kind, name, and labels other than the pool's name.
    type Key = (MetricKind, String, Vec<(String, String)>);

    fn values(s: &Snapshotter) -> Values {
        s.snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let (kind, key) = key.into_parts();
                let labels = key
                    .labels()
                    .filter(|l| l.key() != POOL_NAME)
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                ((kind, key.name().to_owned(), labels), value)
            })
            .collect()
    }

    fn counter(v: &Values, name: &str, labels: &[(&str, &str)]) -> u64 {
        match v.get(&key(MetricKind::Counter, name, labels)) {
            Some(DebugValue::Counter(n)) => *n,
            _ => 0,
        }
    }

    fn gauge(v: &Values, name: &str, labels: &[(&str, &str)]) -> f64 {
        match v.get(&key(MetricKind::Gauge, name, labels)) {
            Some(DebugValue::Gauge(g)) => g.into_inner(),
            _ => 0.0,
        }
    }

    fn samples(v: &Values, name: &str) -> usize {
        match v.get(&key(MetricKind::Histogram, name, &[])) {
            Some(DebugValue::Histogram(h)) => h.len(),
            _ => 0,
        }
    }

    fn key(kind: MetricKind, name: &str, labels: &[(&str, &str)]) -> Key {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        (kind, name.to_owned(), labels)
    }

    fn pool(recorder: &DebuggingRecorder) -> Arc<PoolState> {
        let _local = ::metrics::set_default_local_recorder(recorder);
        let config = PoolConfig::builder("postgres://app@db/app")
            .pool_size(2)
            .max_overflow(1)
            .name("orders")
            .build()
            .unwrap();
        Arc::new(PoolState::new(config, Arc::new(|_: &PoolEvent<'_>| {}), None).unwrap())
    }

    #[test]
    fn sizes_are_set_when_the_pool_is_built() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let _p = pool(&recorder);
        let v = values(&snap);
        assert_eq!(gauge(&v, MAX, &[]), 3.0);
        assert_eq!(gauge(&v, IDLE_MAX, &[]), 2.0);
        assert_eq!(gauge(&v, IDLE_MIN, &[]), 0.0);
        for (key, ..) in snap.snapshot().into_vec() {
            let name = key.key().labels().find(|l| l.key() == POOL_NAME);
            assert_eq!(name.map(|l| l.value()), Some("orders"), "{key:?}");
        }
    }

    #[test]
    fn every_metric_a_pool_registers_carries_its_description() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let p = pool(&recorder);
        let mut c = ConnState::opened(&p, Duration::from_millis(1), None);
        c.handed_out(Instant::now(), None);
        assert_eq!(c.checkin(false), None);
        let entries = snap.snapshot().into_vec();
        assert!(entries.len() >= 5, "{entries:?}");
        for (key, _unit, description, _) in entries {
            let name = key.key().name().to_owned();
            assert!(
                description.is_some_and(|d| !d.is_empty()),
                "{name} has no description"
            );
        }
        drop(c);
    }

    #[test]
    fn a_connection_moves_count_create_wait_and_use_time_through_its_life() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let p = pool(&recorder);
        values(&snap); // the sizes
        let idle = [(STATE, "idle")];
        let used = [(STATE, "used")];
        let mut c = ConnState::opened(&p, Duration::from_millis(3), None);
        let v = values(&snap);
        assert_eq!(samples(&v, CREATE_TIME), 1);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &idle), 1.0);
        c.handed_out(Instant::now(), None);
        let v = values(&snap);
        assert_eq!(samples(&v, WAIT_TIME), 1);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &idle), -1.0, "net change");
        assert_eq!(gauge(&v, CONNECTION_COUNT, &used), 1.0);
        assert_eq!(c.checkin(false), None);
        let v = values(&snap);
        assert_eq!(samples(&v, USE_TIME), 1);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &idle), 1.0);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &used), -1.0);
        drop(c);
        let v = values(&snap);
        assert_eq!(
            gauge(&v, CONNECTION_COUNT, &idle),
            -1.0,
            "closed while idle"
        );
        // Closed at its checkin: counted out of `used`, never back in `idle`.
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        c.handed_out(Instant::now(), None);
        assert!(c.checkin(true).is_some());
        drop(c);
        let v = values(&snap);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &idle), 0.0);
        assert_eq!(gauge(&v, CONNECTION_COUNT, &used), 0.0);
    }

    #[test]
    fn counters_move_with_their_events() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let p = pool(&recorder);
        values(&snap);
        let s = p.stats();
        s.record_checkout_timeout();
        s.record_probe_dead();
        s.record_ping(true);
        s.record_leak();
        s.record_retry();
        s.record_retry_exhausted();
        s.record_commit_resolved();
        p.invalidate("test");
        p.connect_failed(ConnectClass::Hopeless, "password authentication failed");
        p.connect_failed(ConnectClass::Transient, "refused");
        p.connect_failed(ConnectClass::Transient, "refused");
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        c.finish_ping(false);
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        c.ping_starting();
        c.finish_ping_silent();
        let v = values(&snap);
        for (name, want) in [
            (TIMEOUTS, 1),
            (FOUND_DEAD, 1),
            (PINGS, 3),
            (LEAKS, 1),
            (RETRIES, 1),
            (RETRIES_EXHAUSTED, 1),
            (COMMITS_RESOLVED, 1),
            // One by the test, one by the unanswered ping.
            (INVALIDATIONS, 2),
        ] {
            assert_eq!(counter(&v, name, &[]), want, "{name}");
        }
        assert_eq!(
            counter(&v, CONNECT_FAILURES, &[(ERROR_TYPE, "hopeless")]),
            1
        );
        assert_eq!(
            counter(&v, CONNECT_FAILURES, &[(ERROR_TYPE, "transient")]),
            2
        );
        assert_eq!(
            counter(&v, VALIDATION_FAILURES, &[(ERROR_TYPE, "ping_error")]),
            1
        );
        assert_eq!(
            counter(&v, VALIDATION_FAILURES, &[(ERROR_TYPE, "ping_timeout")]),
            1
        );
        drop(c);
    }

    #[test]
    fn a_pending_checkout_counts_until_its_guard_drops() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let p = pool(&recorder);
        values(&snap);
        let pending = p.pending();
        assert_eq!(gauge(&values(&snap), PENDING_REQUESTS, &[]), 1.0);
        drop(pending);
        assert_eq!(
            gauge(&values(&snap), PENDING_REQUESTS, &[]),
            -1.0,
            "net change"
        );
    }

    #[test]
    fn budget_permits_in_use_are_a_gauge_per_class_and_class_pools_carry_their_class() {
        let recorder = DebuggingRecorder::new();
        let snap = recorder.snapshotter();
        let _local = ::metrics::set_default_local_recorder(&recorder);
        let budget = Budget::builder(3)
            .class("automation", 0, 3)
            .class("adhoc", 1, 3)
            .build()
            .unwrap();
        let adhoc = budget.classes().nth(1).unwrap();
        let config = PoolConfig::builder("postgres://app@db/app")
            .name("adhoc")
            .build()
            .unwrap();
        let _p = PoolState::new(
            config,
            Arc::new(|_: &PoolEvent<'_>| {}),
            Some((budget.clone(), adhoc)),
        )
        .unwrap();
        let v = values(&snap);
        assert_eq!(gauge(&v, IDLE_MIN, &[(CLASS, "adhoc")]), 1.0, "its floor");
        let a = budget.try_acquire(adhoc).unwrap();
        let b = budget.try_acquire(adhoc).unwrap();
        let v = values(&snap);
        assert_eq!(gauge(&v, BUDGET_IN_USE, &[(CLASS, "adhoc")]), 2.0);
        assert_eq!(gauge(&v, BUDGET_IN_USE, &[(CLASS, "automation")]), 0.0);
        drop((a, b));
        assert_eq!(
            gauge(&values(&snap), BUDGET_IN_USE, &[(CLASS, "adhoc")]),
            -2.0
        );
    }
}
