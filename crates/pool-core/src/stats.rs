//! Pool statistics: counters an operator can alert on, and checkout wait-time percentiles.
//!
//! [`PoolStats`] is written by the adapters on every pool event (all lock-free: relaxed
//! atomic increments) and read with [`PoolStats::snapshot`], which combines the counters with
//! the [`Gauges`] only the pool itself knows (connections in use, idle, waiting).
//!
//! Counters and the wait-time histogram cover the pool's whole life; compare two snapshots to
//! get rates. A snapshot is not atomic across counters: one taken while events are recorded
//! may count an event in one counter and not yet in another.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a pooled connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// It saw a connection-class error, was returned with a transaction open, or was returned
    /// during a panic.
    Broken,
    /// The liveness probe found it closed by the server.
    ProbeDead,
    /// The validation ping failed or timed out.
    PingFailed,
    /// It reached its (jittered) maximum lifetime.
    Expired,
    /// It sat idle longer than the idle timeout.
    IdleTimeout,
    /// Retired without a ping by a pool-wide suspicion: it sat idle while a validation ping
    /// of its pool went unanswered (the path went silent), so it was closed instead of
    /// costing another validation timeout.
    Invalidated,
    /// The pool dropped it for another reason (shrinking, shutting down).
    Released,
    /// It was closed to give its budget permit back to a class that needed it.
    Reclaimed,
    /// It was returned while the pool held more than `pool_size` connections (overflow).
    Overflow,
}

impl CloseReason {
    /// Every reason, in declaration order.
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Broken,
        CloseReason::ProbeDead,
        CloseReason::PingFailed,
        CloseReason::Expired,
        CloseReason::IdleTimeout,
        CloseReason::Invalidated,
        CloseReason::Released,
        CloseReason::Reclaimed,
        CloseReason::Overflow,
    ];

    /// The reason in snake case, as serialized: `broken`, `probe_dead`, `ping_failed`,
    /// `expired`, `idle_timeout`, `invalidated`, `released`, `reclaimed`, `overflow`.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Broken => "broken",
            CloseReason::ProbeDead => "probe_dead",
            CloseReason::PingFailed => "ping_failed",
            CloseReason::Expired => "expired",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Invalidated => "invalidated",
            CloseReason::Released => "released",
            CloseReason::Reclaimed => "reclaimed",
            CloseReason::Overflow => "overflow",
        }
    }

    fn index(self) -> usize {
        match self {
            CloseReason::Broken => 0,
            CloseReason::ProbeDead => 1,
            CloseReason::PingFailed => 2,
            CloseReason::Expired => 3,
            CloseReason::IdleTimeout => 4,
            CloseReason::Invalidated => 5,
            CloseReason::Released => 6,
            CloseReason::Reclaimed => 7,
            CloseReason::Overflow => 8,
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What only the pool knows at the moment of a snapshot; passed to [`PoolStats::snapshot`].
///
/// The pool's name travels here too, so that a snapshot is self-describing.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// The pool's (or class's) name, as in [`PoolConfig::name`](crate::config::PoolConfig::name).
    pub name: String,
    /// Connections checked out right now.
    pub in_use: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// Connections kept open (`pool_size`).
    pub pool_size: u32,
    /// Extra connections allowed under load (`max_overflow`).
    pub max_overflow: u32,
    /// Connections of a shared budget held for this pool that no other pool can take.
    pub reserved: u32,
    /// Callers waiting for a connection, when the pool can tell (r2d2 cannot).
    pub waiters: Option<u32>,
}

/// Connections closed, by [`CloseReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClosedCounts {
    /// [`CloseReason::Broken`].
    pub broken: u64,
    /// [`CloseReason::ProbeDead`].
    pub probe_dead: u64,
    /// [`CloseReason::PingFailed`].
    pub ping_failed: u64,
    /// [`CloseReason::Expired`].
    pub expired: u64,
    /// [`CloseReason::IdleTimeout`].
    pub idle_timeout: u64,
    /// [`CloseReason::Invalidated`].
    pub invalidated: u64,
    /// [`CloseReason::Released`].
    pub released: u64,
    /// [`CloseReason::Reclaimed`].
    #[serde(default)]
    pub reclaimed: u64,
    /// [`CloseReason::Overflow`].
    #[serde(default)]
    pub overflow: u64,
}

impl ClosedCounts {
    /// The count for one reason.
    pub fn get(&self, reason: CloseReason) -> u64 {
        match reason {
            CloseReason::Broken => self.broken,
            CloseReason::ProbeDead => self.probe_dead,
            CloseReason::PingFailed => self.ping_failed,
            CloseReason::Expired => self.expired,
            CloseReason::IdleTimeout => self.idle_timeout,
            CloseReason::Invalidated => self.invalidated,
            CloseReason::Released => self.released,
            CloseReason::Reclaimed => self.reclaimed,
            CloseReason::Overflow => self.overflow,
        }
    }

    /// Connections closed for any reason.
    pub fn total(&self) -> u64 {
        CloseReason::ALL.iter().map(|r| self.get(*r)).sum()
    }

    /// The non-zero counts by reason name (`{"expired": 3}`), for compact display.
    pub fn non_zero(&self) -> BTreeMap<&'static str, u64> {
        CloseReason::ALL
            .iter()
            .filter(|r| self.get(**r) > 0)
            .map(|r| (r.as_str(), self.get(*r)))
            .collect()
    }
}

/// A pool's statistics at one moment: counters since the pool started, gauges of now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatsSnapshot {
    /// The pool's name.
    pub name: String,
    /// Connections checked out.
    pub in_use: u32,
    /// Open connections waiting in the pool.
    pub idle: u32,
    /// Connections kept open (`pool_size`).
    pub pool_size: u32,
    /// Extra connections allowed under load (`max_overflow`).
    pub max_overflow: u32,
    /// Overflow connections open now: `max(0, in_use + idle - pool_size)`.
    pub overflow_active: u32,
    /// The most connections the pool may open: `pool_size + max_overflow`.
    pub total_possible: u32,
    /// Budget connections held for this pool alone.
    pub reserved: u32,
    /// Checkouts that can succeed now without waiting for a return:
    /// `total_possible - in_use`.
    pub available: u32,
    /// Callers waiting for a connection, when the pool can tell.
    pub waiters: Option<u32>,
    /// Successful checkouts.
    pub checkouts: u64,
    /// Checkouts that gave up after `pool_timeout`.
    pub timeouts: u64,
    /// Connections opened.
    pub connects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Connections closed, by reason.
    pub closed: ClosedCounts,
    /// Validation pings sent.
    pub pings: u64,
    /// Validation pings that failed or timed out.
    pub validations_failed: u64,
    /// Slow validation pings raced against a fresh connect (hedged validation).
    #[serde(default)]
    pub hedges: u64,
    /// Hedges the fresh connection won (the slow connection was closed).
    #[serde(default)]
    pub hedges_won: u64,
    /// Slow validation pings given up at the hedge delay because the pool had no room for a
    /// fresh connect (at its sizes, or no budget permit free): the slow connection was
    /// closed, and the checkout went on to the next connection or a connect in its place.
    #[serde(default)]
    pub hedges_gave_up: u64,
    /// Connections the zero-round-trip liveness probe found closed by the server, at a
    /// checkout (each is closed: `closed.probe_dead` also counts those the maintenance's walk
    /// found, which do not invalidate the pool).
    pub probe_detected_dead: u64,
    /// Times the pool was invalidated (every older connection made suspect: pinged before its
    /// next use): once per cause seen — each disconnect a query or the probe saw, each
    /// unanswered ping, each failover, each `invalidate()` call. A restart seen by 8
    /// connections counts 8 here and 1 in [`StatsSnapshot::invalidation_events`].
    /// Connections closed because of it are counted by reason in [`StatsSnapshot::closed`]
    /// (`probe_dead`, `ping_failed`, `invalidated`), not here.
    pub invalidations: u64,
    /// Invalidations reported as an `Invalidated` event (and log line): at most one a second,
    /// so a burst caused by one fault counts once.
    #[serde(default)]
    pub invalidation_events: u64,
    /// Connections held longer than the leak detection threshold.
    pub leaks: u64,
    /// Operations retried after a transient error.
    pub retries: u64,
    /// Operations that failed after exhausting their retries.
    pub retries_exhausted: u64,
    /// Ambiguous commits (connection lost during COMMIT) whose outcome was resolved.
    pub commits_resolved: u64,
    /// Median checkout wait, in milliseconds (over the pool's life; 0 before any checkout).
    pub wait_p50_ms: f64,
    /// 95th percentile checkout wait, in milliseconds.
    pub wait_p95_ms: f64,
    /// 99th percentile checkout wait, in milliseconds.
    pub wait_p99_ms: f64,
    /// Longest checkout wait, in milliseconds.
    pub wait_max_ms: f64,
    /// `true` when a checkout made now can get a connection without waiting for another
    /// caller to return one (`available > 0`: an idle connection or room to open one).
    /// A pool with nothing available is exhausted; its callers queue and may time out.
    pub is_healthy: bool,
    /// Whether connections get the zero-round-trip liveness probe and pings are bounded by
    /// the stall watchdog. `false` where the adapter cannot find connections' sockets (not
    /// Linux): every checkout then pings, and a hung server can block that ping.
    #[serde(default = "yes")]
    pub probe_available: bool,
    /// Set while connects fail: the server is unreachable (or refuses the pool). A pool whose
    /// server is unreachable is not healthy, whatever room it has.
    #[serde(default)]
    pub server_down: Option<ServerDown>,
}

/// The server could not be reached by the last connect attempt(s) (see
/// [`ServerHealth`](crate::engine::ServerHealth)).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServerDown {
    /// How long connects have been failing, in milliseconds.
    pub since_ms: u64,
    /// Failed attempts since the last success.
    pub failed_attempts: u64,
    /// `hopeless` (no retry can fix it: fix the cause) or `transient`.
    pub class: String,
    /// The last error, redacted.
    pub last_error: String,
    /// When the next attempt may start, in milliseconds from the snapshot.
    pub next_attempt_in_ms: u64,
}

fn yes() -> bool {
    true
}

/// Sub-buckets per power of two in the wait histogram (relative error at most 1/8).
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
/// Waits from 2^40 µs (about 12.7 days) on share the last bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = SUBS + (MAX_EXP - SUB_BITS + 1) as usize * SUBS;

/// Checkout wait times in microseconds: log2 buckets, each split linearly in 8, so any
/// percentile is within 12.5% of the true value. Lock-free.
struct WaitHistogram {
    buckets: [AtomicU64; BUCKETS],
    max_us: AtomicU64,
}

impl WaitHistogram {
    fn new() -> Self {
        WaitHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max_us: AtomicU64::new(0),
        }
    }

    fn record(&self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    /// The p50, p95, p99 and max waits in milliseconds.
    fn percentiles_ms(&self) -> [f64; 4] {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let max_us = self.max_us.load(Relaxed) as f64;
        let total: u64 = counts.iter().sum();
        let at = |q: f64| {
            if total == 0 {
                return 0.0;
            }
            let rank = (q * total as f64).ceil().max(1.0);
            let mut below = 0.0;
            for (i, &c) in counts.iter().enumerate() {
                let c = c as f64;
                if c > 0.0 && below + c >= rank {
                    let (lo, hi) = bucket_bounds(i);
                    let estimate = lo + (hi - lo) * (rank - below) / c;
                    return estimate.min(max_us) / 1000.0;
                }
                below += c;
            }
            max_us / 1000.0
        };
        [at(0.50), at(0.95), at(0.99), max_us / 1000.0]
    }
}

fn bucket_of(us: u64) -> usize {
    if us < SUBS as u64 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (us >> (exp - SUB_BITS)) as usize & (SUBS - 1);
    SUBS + (exp - SUB_BITS) as usize * SUBS + sub
}

/// The microsecond range `[lo, hi)` a bucket covers.
fn bucket_bounds(i: usize) -> (f64, f64) {
    if i < SUBS {
        return (i as f64, i as f64 + 1.0);
    }
    let shift = ((i - SUBS) / SUBS) as u32;
    let sub = ((i - SUBS) % SUBS) as u64;
    let lo = (SUBS as u64 + sub) << shift;
    let hi = (SUBS as u64 + sub + 1) << shift;
    (lo as f64, hi as f64)
}

/// The statistics of one pool, recorded by its adapter. Share it (it is `Sync`); every
/// `record_*` method is a relaxed atomic increment.
pub struct PoolStats {
    checkouts: AtomicU64,
    timeouts: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    pings: AtomicU64,
    pings_failed: AtomicU64,
    hedges: AtomicU64,
    hedges_won: AtomicU64,
    hedges_gave_up: AtomicU64,
    probe_dead: AtomicU64,
    invalidations: AtomicU64,
    invalidation_events: AtomicU64,
    leaks: AtomicU64,
    retries: AtomicU64,
    retries_exhausted: AtomicU64,
    commits_resolved: AtomicU64,
    waits: WaitHistogram,
    metrics: crate::metrics::PoolMetrics,
}

impl Default for PoolStats {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PoolStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolStats")
            .field("checkouts", &self.checkouts.load(Relaxed))
            .field("timeouts", &self.timeouts.load(Relaxed))
            .field("connects", &self.connects.load(Relaxed))
            .field("connect_failures", &self.connect_failures.load(Relaxed))
            .finish_non_exhaustive()
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

impl PoolStats {
    /// All counters at zero.
    pub fn new() -> Self {
        let zero = || AtomicU64::new(0);
        PoolStats {
            checkouts: zero(),
            timeouts: zero(),
            connects: zero(),
            connect_failures: zero(),
            closed: std::array::from_fn(|_| zero()),
            pings: zero(),
            pings_failed: zero(),
            hedges: zero(),
            hedges_won: zero(),
            hedges_gave_up: zero(),
            probe_dead: zero(),
            invalidations: zero(),
            invalidation_events: zero(),
            leaks: zero(),
            retries: zero(),
            retries_exhausted: zero(),
            commits_resolved: zero(),
            waits: WaitHistogram::new(),
            metrics: crate::metrics::PoolMetrics::default(),
        }
    }

    /// All counters at zero, each event also reported to `metrics` (see
    /// [`crate::metrics`]).
    pub fn with_metrics(metrics: crate::metrics::PoolMetrics) -> Self {
        PoolStats {
            metrics,
            ..Self::new()
        }
    }

    /// The metric handles events are reported to (empty without the `metrics` feature).
    pub fn metrics(&self) -> &crate::metrics::PoolMetrics {
        &self.metrics
    }

    /// A checkout succeeded after waiting `waited` (zero when a connection was at hand).
    pub fn record_checkout(&self, waited: Duration) {
        bump(&self.checkouts);
        self.waits.record(waited);
        self.metrics.waited(waited);
    }

    /// A checkout gave up after `pool_timeout`.
    pub fn record_checkout_timeout(&self) {
        bump(&self.timeouts);
        self.metrics.timeout();
    }

    /// A connection was opened.
    pub fn record_connect(&self) {
        bump(&self.connects);
    }

    /// A connection attempt failed.
    pub fn record_connect_failure(&self) {
        bump(&self.connect_failures);
    }

    /// A connection was closed.
    pub fn record_close(&self, reason: CloseReason) {
        bump(&self.closed[reason.index()]);
    }

    /// A validation ping was sent; `ok` is whether it succeeded in time.
    pub fn record_ping(&self, ok: bool) {
        bump(&self.pings);
        self.metrics.ping();
        if !ok {
            bump(&self.pings_failed);
        }
    }

    /// The liveness probe found a connection closed by the server.
    pub fn record_probe_dead(&self) {
        bump(&self.probe_dead);
        self.metrics.found_dead();
    }

    /// The pool was invalidated (every older connection is pinged before reuse): once per
    /// cause seen (each connection that saw the same restart counts).
    pub fn record_invalidation(&self) {
        bump(&self.invalidations);
        self.metrics.invalidation();
    }

    /// An invalidation was reported (the `Invalidated` event, at most one a second: a burst
    /// of invalidations by one fault counts once here).
    pub fn record_invalidation_event(&self) {
        bump(&self.invalidation_events);
    }

    /// A connection was held longer than the leak detection threshold.
    pub fn record_leak(&self) {
        bump(&self.leaks);
        self.metrics.leak();
    }

    /// An operation is being retried after a transient error.
    pub fn record_retry(&self) {
        bump(&self.retries);
        self.metrics.retry();
    }

    /// An operation failed after exhausting its retries.
    pub fn record_retry_exhausted(&self) {
        bump(&self.retries_exhausted);
        self.metrics.retry_exhausted();
    }

    /// A slow validation ping was raced against a fresh connect; `won`: the fresh
    /// connection was ready first.
    pub fn record_hedge(&self, won: bool) {
        bump(&self.hedges);
        if won {
            bump(&self.hedges_won);
        }
    }

    /// A slow validation ping was given up at the hedge delay: no room for a fresh connect,
    /// so the slow connection was closed to make room (see `hedges_gave_up`).
    pub fn record_hedge_gave_up(&self) {
        bump(&self.hedges_gave_up);
    }

    /// An ambiguous commit (connection lost during COMMIT) was resolved by verification.
    pub fn record_commit_resolved(&self) {
        bump(&self.commits_resolved);
        self.metrics.commit_resolved();
    }

    /// The counters combined with the pool's `gauges` (which also carry its name).
    pub fn snapshot(&self, gauges: Gauges) -> StatsSnapshot {
        let closed_at = |r: CloseReason| self.closed[r.index()].load(Relaxed);
        let total_possible = gauges.pool_size.saturating_add(gauges.max_overflow);
        let available = total_possible.saturating_sub(gauges.in_use);
        let [p50, p95, p99, max] = self.waits.percentiles_ms();
        StatsSnapshot {
            name: gauges.name,
            in_use: gauges.in_use,
            idle: gauges.idle,
            pool_size: gauges.pool_size,
            max_overflow: gauges.max_overflow,
            overflow_active: gauges
                .in_use
                .saturating_add(gauges.idle)
                .saturating_sub(gauges.pool_size),
            total_possible,
            reserved: gauges.reserved,
            available,
            waiters: gauges.waiters,
            checkouts: self.checkouts.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            connects: self.connects.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            closed: ClosedCounts {
                broken: closed_at(CloseReason::Broken),
                probe_dead: closed_at(CloseReason::ProbeDead),
                ping_failed: closed_at(CloseReason::PingFailed),
                expired: closed_at(CloseReason::Expired),
                idle_timeout: closed_at(CloseReason::IdleTimeout),
                invalidated: closed_at(CloseReason::Invalidated),
                released: closed_at(CloseReason::Released),
                reclaimed: closed_at(CloseReason::Reclaimed),
                overflow: closed_at(CloseReason::Overflow),
            },
            pings: self.pings.load(Relaxed),
            validations_failed: self.pings_failed.load(Relaxed),
            hedges: self.hedges.load(Relaxed),
            hedges_won: self.hedges_won.load(Relaxed),
            hedges_gave_up: self.hedges_gave_up.load(Relaxed),
            probe_detected_dead: self.probe_dead.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            invalidation_events: self.invalidation_events.load(Relaxed),
            leaks: self.leaks.load(Relaxed),
            retries: self.retries.load(Relaxed),
            retries_exhausted: self.retries_exhausted.load(Relaxed),
            commits_resolved: self.commits_resolved.load(Relaxed),
            wait_p50_ms: p50,
            wait_p95_ms: p95,
            wait_p99_ms: p99,
            wait_max_ms: max,
            is_healthy: available > 0,
            probe_available: true,
            server_down: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(in_use: u32, idle: u32) -> Gauges {
        Gauges {
            name: "automation".into(),
            in_use,
            idle,
            pool_size: 50,
            max_overflow: 5,
            ..Gauges::default()
        }
    }

    #[test]
    fn every_record_method_counts_in_its_own_field() {
        let s = PoolStats::new();
        s.record_checkout(Duration::ZERO);
        s.record_checkout_timeout();
        for _ in 0..2 {
            s.record_connect();
        }
        s.record_connect_failure();
        s.record_close(CloseReason::Expired);
        s.record_close(CloseReason::Expired);
        s.record_close(CloseReason::ProbeDead);
        s.record_ping(true);
        s.record_ping(true);
        s.record_ping(false);
        s.record_probe_dead();
        s.record_invalidation();
        s.record_invalidation_event();
        s.record_invalidation_event();
        s.record_hedge(true);
        s.record_hedge(false);
        s.record_hedge(false);
        s.record_hedge_gave_up();
        s.record_leak();
        s.record_retry();
        s.record_retry();
        s.record_retry_exhausted();
        s.record_commit_resolved();
        let snap = s.snapshot(gauges(0, 0));
        assert_eq!((snap.checkouts, snap.timeouts), (1, 1));
        assert_eq!((snap.connects, snap.connect_failures), (2, 1));
        assert_eq!(snap.closed.expired, 2);
        assert_eq!(snap.closed.probe_dead, 1);
        assert_eq!(snap.closed.total(), 3);
        assert_eq!(
            snap.closed.non_zero().into_iter().collect::<Vec<_>>(),
            [("expired", 2), ("probe_dead", 1)]
        );
        assert_eq!((snap.pings, snap.validations_failed), (3, 1));
        assert_eq!(snap.invalidation_events, 2);
        assert_eq!(
            (snap.hedges, snap.hedges_won, snap.hedges_gave_up),
            (3, 1, 1)
        );
        let shown = format!("{s:?}");
        assert!(
            shown.starts_with("PoolStats {") && shown.contains("checkouts: 1"),
            "{shown}"
        );
        assert_eq!(
            (snap.probe_detected_dead, snap.invalidations, snap.leaks),
            (1, 1, 1)
        );
        assert_eq!(
            (snap.retries, snap.retries_exhausted, snap.commits_resolved),
            (2, 1, 1)
        );
    }

    #[test]
    fn gauges_give_overflow_availability_and_health() {
        let s = PoolStats::new();
        let snap = s.snapshot(gauges(0, 3));
        assert_eq!(snap.name, "automation");
        assert_eq!(
            (snap.total_possible, snap.available, snap.overflow_active),
            (55, 55, 0)
        );
        assert!(snap.is_healthy);
        let snap = s.snapshot(gauges(52, 1));
        assert_eq!((snap.available, snap.overflow_active), (3, 3));
        assert!(snap.is_healthy);
        let snap = s.snapshot(gauges(55, 0));
        assert_eq!(snap.available, 0);
        assert!(!snap.is_healthy, "an exhausted pool is not healthy");
    }

    #[test]
    fn wait_percentiles_are_within_an_eighth_of_the_truth() {
        let s = PoolStats::new();
        for ms in 1..=100u64 {
            s.record_checkout(Duration::from_millis(ms));
        }
        let snap = s.snapshot(gauges(0, 0));
        for (got, want) in [
            (snap.wait_p50_ms, 50.0),
            (snap.wait_p95_ms, 95.0),
            (snap.wait_p99_ms, 99.0),
        ] {
            assert!(
                (got - want).abs() <= want / 8.0,
                "got {got}, want about {want}"
            );
        }
        assert_eq!(snap.wait_max_ms, 100.0);
        assert!(snap.wait_p50_ms <= snap.wait_p95_ms && snap.wait_p95_ms <= snap.wait_p99_ms);
    }

    /// The percentiles `waits` (in µs) give: each is interpolated within its bucket by rank
    /// and capped at the longest wait.
    fn percentiles(waits: &[u64]) -> [f64; 3] {
        let s = PoolStats::new();
        for &us in waits {
            s.record_checkout(Duration::from_micros(us));
        }
        let snap = s.snapshot(gauges(0, 0));
        [snap.wait_p50_ms, snap.wait_p95_ms, snap.wait_p99_ms]
    }

    #[test]
    fn a_percentile_is_interpolated_by_rank_within_its_bucket() {
        let close = |got: [f64; 3], want: [f64; 3]| {
            assert!(
                got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-9),
                "got {got:?}, want {want:?}"
            );
        };
        // 2 waits in [3, 4) µs, 4 in [1920, 2048), 13 in [98304, 106496), 1 of 5 s.
        // p50 is rank 10: the 4th of the 13, 98304 + 8192 * 4 / 13 µs; p95 is rank 19, the
        // 13th of them, the bucket's end; p99 is rank 20, the end of the 5 s bucket, capped
        // at the longest wait.
        let mut waits = vec![3, 3, 2000, 2000, 2000, 2000];
        waits.extend([100_000; 13]);
        waits.push(5_000_000);
        close(
            percentiles(&waits),
            [(98304.0 + 8192.0 * 4.0 / 13.0) / 1000.0, 106.496, 5000.0],
        );
        // Within the first buckets (one microsecond wide): rank 2 of 3 in [3, 4) µs.
        close(
            percentiles(&[3, 3, 3, 7]),
            [(3.0 + 2.0 / 3.0) / 1000.0, 0.007, 0.007],
        );
        // 2^40 µs has a bucket of its own, below the last one, [15 * 2^37, 2^41) µs, where
        // every longer wait goes.
        close(
            percentiles(&[1 << 40, u64::MAX]),
            [
                (9u64 << 37) as f64 / 1000.0,
                (1u64 << 41) as f64 / 1000.0,
                (1u64 << 41) as f64 / 1000.0,
            ],
        );
    }

    #[test]
    fn identical_waits_report_that_wait_and_no_checkouts_report_zero() {
        let s = PoolStats::new();
        assert_eq!(s.snapshot(gauges(0, 0)).wait_p99_ms, 0.0);
        for _ in 0..10 {
            s.record_checkout(Duration::from_millis(3));
        }
        let snap = s.snapshot(gauges(0, 0));
        assert!((snap.wait_p50_ms - 3.0).abs() < 0.4, "{}", snap.wait_p50_ms);
        assert!(snap.wait_p99_ms <= 3.0);
    }

    #[test]
    fn extreme_waits_do_not_overflow_the_histogram() {
        let s = PoolStats::new();
        s.record_checkout(Duration::MAX);
        s.record_checkout(Duration::from_nanos(1));
        // The longest waits with their own buckets: 2^40 µs up to 2^41 µs (12.7 to 25 days).
        s.record_checkout(Duration::from_micros(1 << 40));
        s.record_checkout(Duration::from_micros((1 << 41) - 1));
        let snap = s.snapshot(gauges(0, 0));
        assert!(snap.wait_p99_ms.is_finite() && snap.wait_p99_ms > 0.0);
        for us in [0, 1, 7, 8, 15, 16, 1000, 1 << 40, u64::MAX] {
            let (lo, hi) = bucket_bounds(bucket_of(us));
            assert!(
                lo <= us as f64 && (us as f64) < hi || bucket_of(us) == BUCKETS - 1,
                "{us}"
            );
        }
    }

    #[test]
    fn stats_are_shared_across_threads() {
        let s = std::sync::Arc::new(PoolStats::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.record_checkout(Duration::from_micros(10));
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(s.snapshot(Gauges::default()).checkouts, 4000);
    }

    #[test]
    fn snapshots_round_trip_through_json() {
        let s = PoolStats::new();
        s.record_close(CloseReason::IdleTimeout);
        let snap = s.snapshot(gauges(1, 2));
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"idle_timeout\":1"));
        let back: StatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        assert_eq!(
            serde_json::to_string(&CloseReason::ProbeDead).unwrap(),
            "\"probe_dead\""
        );
        // A snapshot written before `probe_available` existed reads as "available" (the
        // field's serde default), and before `server_down`, as "not down".
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let fields = value.as_object_mut().unwrap();
        fields.remove("probe_available");
        fields.remove("server_down");
        let old: StatsSnapshot = serde_json::from_value(value).unwrap();
        assert!(old.probe_available);
        assert_eq!(old.server_down, None);
    }

    #[test]
    fn close_reasons_display_as_their_json_names() {
        for reason in CloseReason::ALL {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(format!("\"{reason}\""), json);
            assert_eq!(reason.to_string(), reason.as_str());
        }
    }
}
