//! Pool-wide state: what a pool and every one of its connections share.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::health::{ConnectClass, Report, ServerHealth};
use super::Gate;
use crate::budget::{Budget, ClassId};
use crate::config::PoolConfig;
use crate::error::ConfigError;
use crate::events::{EventListener, PoolEvent, LOG_TARGET};
use crate::lifecycle::Epoch;
use crate::retry::RetryHooks;
use crate::stats::{Gauges, PoolStats, StatsSnapshot};

/// A validation ping slower than this many times the pool's observed round trip is hedged
/// with a fresh connect (see [`PoolState::hedge_delay`]).
pub const HEDGE_FACTOR: u32 = 4;
/// The shortest hedge delay, whatever the observed round trip: a managed database across a
/// region answers a ping in tens of milliseconds; a ping still unanswered after this long is
/// worth a parallel connect.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(100);

/// The longest a closing connection waits for the server's confirmation (see
/// [`PoolState::close_confirm_bound`]).
pub const CONFIRM_BOUND_MAX: Duration = Duration::from_secs(1);

/// State shared by a pool and all its connections: the configuration (validated once, here),
/// stats, the invalidation epoch, the event listener, the budget slot, the checkout gate and
/// the count of open connections that `pool_size` and `max_overflow` are enforced against.
///
/// Adapters hold it in an `Arc`; each connection's [`ConnState`](super::ConnState) holds one
/// too.
pub struct PoolState {
    config: PoolConfig,
    stats: PoolStats,
    epoch: Epoch,
    listener: Arc<dyn EventListener>,
    budget: Option<(Budget, ClassId)>,
    gate: Gate,
    next_id: AtomicU64,
    /// Connections opened and not yet closed (closing ones leave it when they are claimed
    /// for closing, see [`PoolState::claim_overflow_close`]).
    pub(super) open: AtomicU32,
    /// Idle connections to retire on their next checkout (budget reclaim).
    reclaim: AtomicU32,
    last_invalidation_event: Mutex<Option<Instant>>,
    /// When the pool was made: the origin of `silent_before`.
    born: Instant,
    /// Nanoseconds after `born`, plus one, of the start of the latest validation ping that
    /// timed out, or of the latest failover seen (0: none). Every connection last known good
    /// before it is suspect: see [`PoolState::path_went_silent`] and
    /// [`PoolState::failover_detected`].
    silent_before: AtomicU64,
    probe_available: AtomicBool,
    listener_panicked: AtomicBool,
    health: ServerHealth,
    /// Round trip of successful validation pings, smoothed (nanoseconds; 0: none yet).
    ping_rtt_ns: AtomicU64,
    /// What the states of checked-out connections held when the application replaced them
    /// (see [`PoolState::orphan`]).
    orphans: Mutex<Vec<Orphan>>,
    /// Nanoseconds after `born`, plus one, of the latest evidence that the server answers
    /// (a connect, a successful ping, a connection returned unbroken after use; 0: none).
    last_good: AtomicU64,
    /// Nanoseconds after `born`, plus one, of the latest evidence against it (an
    /// invalidation, a failed connect; 0: none).
    last_bad: AtomicU64,
    /// A connection saw a read-only-transaction error and no connection has asked the server
    /// whether it is a standby since (see [`PoolState::read_only_seen`]).
    read_only_pending: AtomicBool,
    /// Nanoseconds after `born`, plus one, of the latest slow ping that lost its race at the
    /// hedge delay (0: none); see [`PoolState::slow_ping_lost`].
    last_slow_ping: AtomicU64,
    /// Nanoseconds after `born`, plus one, of the start of the latest wait for the server's
    /// confirmation that ran out (0: none did): a closing connection that has not heard from
    /// the server since then does not wait, see [`PoolState::close_confirm_bound`].
    confirm_off_before: AtomicU64,
}

/// What a connection's state held (permits, place in the open count) while the connection
/// is open but its state is gone: kept by the pool until the adapter adopts the connection.
#[derive(Debug)]
pub(super) struct Orphan {
    pub(super) id: u64,
    pub(super) counted: bool,
    pub(super) checked_out_at: Option<Instant>,
    pub(super) gate: Option<crate::budget::Permit>,
    pub(super) permit: Option<crate::budget::Permit>,
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState")
            .field("name", &self.name())
            .field("url", &self.config.url)
            .field("open", &self.open_connections())
            .field("epoch", &self.epoch.current())
            .finish_non_exhaustive()
    }
}

impl PoolState {
    /// State for a pool with `config`, reporting to `listener`, taking connection permits
    /// from `budget` as `class` if given. Validates `config` (its fields are public, so it may
    /// have been edited after it was built).
    ///
    /// # Errors
    /// The first invalid setting, as [`PoolConfig::validate`] reports it.
    pub fn new(
        config: PoolConfig,
        listener: Arc<dyn EventListener>,
        budget: Option<(Budget, ClassId)>,
    ) -> Result<PoolState, ConfigError> {
        config.validate()?;
        let gate = Gate::new(config.max_size());
        let metrics = match &budget {
            Some((b, class)) => crate::metrics::PoolMetrics::register(
                &config.name,
                Some(b.class_name(*class)),
                config.max_size(),
                config.pool_size,
                b.limits(*class).reserved,
            ),
            None => crate::metrics::PoolMetrics::register(
                &config.name,
                None,
                config.max_size(),
                config.pool_size,
                0,
            ),
        };
        Ok(PoolState {
            config,
            stats: PoolStats::with_metrics(metrics),
            epoch: Epoch::default(),
            listener,
            budget,
            gate,
            next_id: AtomicU64::new(1),
            open: AtomicU32::new(0),
            reclaim: AtomicU32::new(0),
            last_invalidation_event: Mutex::new(None),
            born: Instant::now(),
            silent_before: AtomicU64::new(0),
            probe_available: AtomicBool::new(true),
            listener_panicked: AtomicBool::new(false),
            health: ServerHealth::default(),
            orphans: Mutex::new(Vec::new()),
            ping_rtt_ns: AtomicU64::new(0),
            last_good: AtomicU64::new(0),
            last_bad: AtomicU64::new(0),
            last_slow_ping: AtomicU64::new(0),
            confirm_off_before: AtomicU64::new(0),
            read_only_pending: AtomicBool::new(false),
        })
    }

    /// The validated configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The pool's name (in stats, events and errors).
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The pool's counters.
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// A checkout under way without a connection: counted in
    /// `db.client.connection.pending_requests` until the guard is dropped (nothing without
    /// the `metrics` feature).
    #[inline]
    pub fn pending(&self) -> crate::metrics::Pending {
        self.stats.metrics().pending()
    }

    /// The budget this pool's connections take permits from, and its class.
    pub fn budget(&self) -> Option<(&Budget, ClassId)> {
        self.budget.as_ref().map(|(b, c)| (b, *c))
    }

    /// The checkout gate (first come, first served), sized `pool_size + max_overflow`.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The current invalidation epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.current()
    }

    /// Connections open now (opened and not yet closed).
    pub fn open_connections(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// Connections the pool keeps open whatever its idle timeout: a budget class's reserved
    /// floor; 0 for a plain pool.
    pub fn floor(&self) -> u32 {
        self.budget
            .as_ref()
            .map_or(0, |(budget, class)| budget.limits(*class).reserved)
    }

    /// Connections opened when the pool is built: a budget class's floor, a plain pool's
    /// `pool_size`.
    pub fn initial_size(&self) -> u32 {
        match self.budget {
            Some(_) => self.floor(),
            None => self.config.pool_size,
        }
    }

    /// How long a connect waits for a budget permit while a checkout wants it: 80% of the pool
    /// timeout, so that a checkout timing out on the budget finds the budget's error to quote.
    pub fn connect_permit_wait(&self) -> Duration {
        self.config.pool_timeout.mul_f64(0.8)
    }

    /// Where the retry functions report attempts on this pool: its name, stats and listener.
    pub fn retry_hooks(&self) -> RetryHooks<'_> {
        RetryHooks {
            pool: self.name(),
            stats: Some(self.stats()),
            listener: self,
        }
    }

    /// The floor, when fewer connections than it are open: the maintenance opens the rest.
    pub fn below_floor(&self) -> Option<u32> {
        let floor = self.floor();
        (self.open_connections() < floor).then_some(floor)
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Masks every secret of the pool's URL in `text` (as written, percent-encoded, or
    /// quoted in part by a driver), then every password-like pattern.
    pub fn redact(&self, text: &str) -> String {
        self.config.redact(text)
    }

    /// Delivers `event` to the listener. A panicking listener is caught (and reported once):
    /// it must never take a checkout, a connect or the watchdog down with it.
    pub fn emit(&self, event: &PoolEvent<'_>) {
        let delivered = catch_unwind(AssertUnwindSafe(|| self.listener.on_event(event)));
        if delivered.is_err() && !self.listener_panicked.swap(true, Ordering::Relaxed) {
            log::error!(
                target: LOG_TARGET,
                pool = self.name(),
                event = "listener_panicked";
                "pool {}: the event listener panicked; events keep being delivered, the pool \
                 is unaffected",
                self.name()
            );
        }
    }

    /// Every connection validated before now is pinged before its next use.
    pub fn invalidate(&self, reason: &str) {
        self.epoch.bump();
        self.stats.record_invalidation();
        let now = Instant::now();
        self.last_bad.store(self.mark(now), Ordering::Release);
        // A restart kills every connection at once: report the first, not each of them.
        let mut last = self.last_invalidation_event.lock();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            *last = Some(now);
            drop(last);
            self.stats.record_invalidation_event();
            self.emit(&PoolEvent::Invalidated {
                pool: self.name(),
                reason,
            });
        }
    }

    /// A validation ping that started at `ping_started` got no reply within its timeout:
    /// silence, not an error. Silence is evidence about the path (a NAT or load balancer that
    /// forgot its flows, a failover that left the old sockets hanging), not about one
    /// connection, so every connection last known good before that ping started is suspect
    /// from now on: [`ConnState::begin_checkout`](super::ConnState::begin_checkout) and the
    /// sweep close it without pinging it (`CloseReason::Invalidated`). A checkout then pays one
    /// validation timeout, never one per pooled connection; connections opened, used or
    /// validated since are not affected.
    pub fn path_went_silent(&self, ping_started: Instant) {
        self.retire_idle_before(
            ping_started,
            "a validation ping got no reply within its timeout: connections idle since \
             before it are closed without a ping",
        );
    }

    /// A connection saw a read-only-transaction error (25006): a write reached a standby (a
    /// failover) or a deliberate `READ ONLY` transaction. The next connection the adapter
    /// checks asks the server which ([`ConnState::take_read_only_suspect`](super::ConnState::take_read_only_suspect)).
    pub fn read_only_seen(&self) {
        self.read_only_pending.store(true, Ordering::Release);
    }

    /// Whether a read-only-transaction error is waiting for a standby check; clears it.
    pub fn take_read_only_seen(&self) -> bool {
        // A load first: this runs on every checkout (async) and checkin (sync), and a plain
        // read keeps the shared cache line clean when nothing is pending.
        self.read_only_pending.load(Ordering::Acquire)
            && self.read_only_pending.swap(false, Ordering::AcqRel)
    }

    /// A connection found its server turned into a read-only standby at `at` (a failover,
    /// see [`ConnState::failover_detected`](super::ConnState::failover_detected)). The other
    /// connections opened before it reach the same server (a ping would pass: a standby
    /// answers), so every connection last known good before `at` is closed at its next
    /// checkout or by the sweep, without a ping; the pool reconnects (to the new primary, if
    /// the address moved). Without this, each would be found by a failed write of its own,
    /// one retry attempt each.
    pub fn failover_detected(&self, at: Instant) {
        self.retire_idle_before(
            at,
            "the server is a read-only standby (failover): connections opened before it are \
             closed without a ping",
        );
    }

    /// Every connection last known good before `at` becomes suspect (closed without a ping,
    /// see [`PoolState::is_suspect`]), and the pool is invalidated with `reason`, once per
    /// new mark.
    fn retire_idle_before(&self, at: Instant, reason: &str) {
        let mark = self.mark(at);
        let before = self.silent_before.fetch_max(mark, Ordering::AcqRel);
        if before < mark {
            self.invalidate(reason);
        }
    }

    /// A validation ping that started at `ping_started` lost its race at the hedge delay: no
    /// reply by then, and either a fresh connection was ready first or there was no room for
    /// one and the slow connection was given up (see [`PoolState::hedge_delay`]). One slow
    /// ping says nothing about the other connections; a second within one validation timeout
    /// of the first does: the path went silent ([`PoolState::path_went_silent`], from this
    /// ping's start). A checkout on a pool whose every flow went silent then meets at most two
    /// silent connections before the others are closed without a ping, whatever the pool's
    /// size. Returns whether the path was declared silent.
    pub fn slow_ping_lost(&self, ping_started: Instant) -> bool {
        let now = Instant::now();
        let window = self.config.lifecycle.validation.timeout;
        let before = self.last_slow_ping.swap(self.mark(now), Ordering::AcqRel);
        let recent = before != 0 && {
            let at = self.born + Duration::from_nanos(before - 1);
            now.saturating_duration_since(at) <= window
        };
        if recent {
            self.path_went_silent(ping_started);
        }
        recent
    }

    /// How long a closing connection that holds a budget permit, and last heard from the
    /// server at `last_answer`, may wait for the server to confirm its session is gone before
    /// the permit is released: `None` when it must not wait, because a wait of this pool
    /// that started after `last_answer` ran out. That connection is on the path or the
    /// server that stopped answering, so its wait would run out too: an outage costs one
    /// wait, not one per connection. A connection that heard from the server since (opened,
    /// validated or used without error after that wait began) waits as usual, so the pool's
    /// count stays exact while it recovers. The bound is the validation timeout, at most
    /// [`CONFIRM_BOUND_MAX`].
    ///
    /// Why wait at all: a PostgreSQL backend keeps its socket open until its process has
    /// exited, after its `pg_stat_activity` entry and its connection slot are freed, so
    /// that a client can close synchronously. A permit released before that lets the
    /// replacement connect while the server still counts the old session: above the
    /// budget, and refused with "too many clients" when the budget is the server's limit.
    pub fn close_confirm_bound(&self, last_answer: Instant) -> Option<Duration> {
        // A mark is never 0, so before any wait ran out (0) every connection waits.
        if self.mark(last_answer) < self.confirm_off_before.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.config
                .lifecycle
                .validation
                .timeout
                .min(CONFIRM_BOUND_MAX),
        )
    }

    /// Reports how a wait allowed by [`PoolState::close_confirm_bound`], started at
    /// `started`, ended: `confirmed` false (it ran out) stops the closes of connections that
    /// have not heard from the server since `started` from waiting.
    pub fn close_confirmed(&self, confirmed: bool, started: Instant) {
        if !confirmed {
            self.confirm_off_before
                .fetch_max(self.mark(started), Ordering::AcqRel);
        }
    }

    /// `at` as a mark on the pool's own clock: nanoseconds after it was made, plus one (so
    /// that 0 means "never").
    fn mark(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.born).as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1) + 1
    }

    /// Evidence that the server answers at `at`: a connection was opened, passed a ping, or
    /// came back unbroken after use. [`PoolState::fresh_evidence`] reads it.
    pub fn server_answered(&self, at: Instant) {
        self.last_good.store(self.mark(at), Ordering::Release);
    }

    /// How long ago the server last answered (see [`PoolState::server_answered`]), if nothing
    /// has spoken against it since: no invalidation (a disconnect seen, a ping unanswered,
    /// the application's `invalidate`) and no failed connect after it, and the last connect
    /// attempt did not fail. `None`: no such evidence, the caller must look for itself.
    pub fn fresh_evidence(&self, now: Instant) -> Option<Duration> {
        let good = self.last_good.load(Ordering::Acquire);
        if good == 0 || good <= self.last_bad.load(Ordering::Acquire) || self.health.is_down() {
            return None;
        }
        let at = self.born + Duration::from_nanos(good - 1);
        Some(now.saturating_duration_since(at))
    }

    /// Whether a connection last known good (used or validated) at `last_good` is suspect:
    /// it was idle when a validation ping of this pool went unanswered (see
    /// [`PoolState::path_went_silent`]) or a failover was seen
    /// ([`PoolState::failover_detected`]).
    pub fn is_suspect(&self, last_good: Instant) -> bool {
        let mark = self.silent_before.load(Ordering::Acquire);
        if mark == 0 {
            return false;
        }
        self.mark(last_good) < mark
    }

    /// A validation ping succeeded after `took`: feeds the pool's round-trip estimate
    /// (exponentially smoothed, 1/8 weight), from which [`PoolState::hedge_delay`] is drawn.
    pub fn record_ping_rtt(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .ping_rtt_ns
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(if old == 0 {
                    took
                } else {
                    old - old / 8 + took / 8
                })
            });
    }

    /// How long a validation ping may take before the pool hedges it with a fresh connect:
    /// [`HEDGE_FACTOR`] times the round trip this pool observes, at least [`HEDGE_FLOOR`],
    /// at most half of `validation_timeout`. `None` when hedging is off.
    pub fn hedge_delay(&self) -> Option<Duration> {
        let validation = &self.config.lifecycle.validation;
        if !validation.hedge {
            return None;
        }
        let rtt = Duration::from_nanos(self.ping_rtt_ns.load(Ordering::Acquire));
        let delay = (rtt * HEDGE_FACTOR).max(HEDGE_FLOOR);
        Some(delay.min(validation.timeout / 2))
    }

    /// Whether a hedge connect fits within the pool's sizes now (a budget permit is taken
    /// separately, without waiting).
    pub fn hedge_room(&self) -> bool {
        self.open_connections() < self.config.max_size()
    }

    /// Keeps what a checked-out connection's state held after the application replaced
    /// that state (Diesel's `set_instrumentation` drops our tracker): the connection is still
    /// open, so its budget permit, gate permit and place in the open count must not be given
    /// back. [`ConnState::adopted`](super::ConnState::adopted) takes them back when the
    /// adapter next sees the connection (its checkin).
    pub(super) fn orphan(&self, orphan: Orphan) {
        log::debug!(
            target: LOG_TARGET,
            pool = self.name(),
            event = "orphaned";
            "pool {}: connection {} lost its state while checked out (its instrumentation was \
             replaced); its permits stay held until it comes back",
            self.name(),
            orphan.id
        );
        self.orphans.lock().push(orphan);
    }

    pub(super) fn take_orphan(&self) -> Option<Orphan> {
        self.orphans.lock().pop()
    }

    /// What the pool knows about reaching its server (see [`ServerHealth`]).
    pub fn health(&self) -> &ServerHealth {
        &self.health
    }

    /// A connection attempt failed with `message` (the driver's text) of `class`: counts it,
    /// records it in [`PoolState::health`], and returns the message redacted. The event (and
    /// so the log line) goes out for the first failure of an outage, then as a summary at
    /// most every [`LOG_SUMMARY_EVERY`](super::health::LOG_SUMMARY_EVERY), not once per
    /// attempt.
    pub fn connect_failed(&self, class: ConnectClass, message: &str) -> String {
        self.stats.record_connect_failure();
        self.stats.metrics().connect_failed(class);
        self.last_bad
            .store(self.mark(Instant::now()), Ordering::Release);
        let message = self.redact(message);
        match self.health.failed(class, message.clone()) {
            Report::Down => self.emit(&PoolEvent::ConnectFailed {
                pool: self.name(),
                error: &format!("server unreachable ({}): {message}", class.as_str()),
            }),
            Report::Summary { failures, down_for } => self.emit(&PoolEvent::ConnectFailed {
                pool: self.name(),
                error: &format!(
                    "server still unreachable after {down_for:.1?} ({failures} failed \
                     attempts); last error ({}): {message}",
                    class.as_str()
                ),
            }),
            Report::Quiet => {}
        }
        message
    }

    /// A connection attempt succeeded: if connects had been failing, says once that the
    /// server is back.
    pub fn connect_succeeded(&self) {
        self.server_answered(Instant::now());
        if let Some((down_for, failures)) = self.health.succeeded() {
            log::info!(
                target: LOG_TARGET,
                pool = self.name(),
                event = "server_reachable";
                "pool {}: server reachable again after {down_for:.1?} ({failures} failed \
                 connect attempt(s))",
                self.name()
            );
        }
    }

    /// Asks that `n` idle connections be retired on their next checkout (to give budget
    /// permits back); replaces any earlier request. Returns the request that was pending.
    pub fn request_reclaim(&self, n: u32) -> u32 {
        self.reclaim.swap(n, Ordering::AcqRel)
    }

    /// Takes one unit of a pending reclaim request, if any.
    pub(super) fn take_reclaim(&self) -> bool {
        self.reclaim
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// If the pool holds more than `pool_size` connections, takes one out of the count (the
    /// caller closes it) and returns `true`. One atomic step, so that two connections
    /// returned at once never both close when only one is overflow.
    pub(super) fn claim_overflow_close(&self) -> bool {
        let keep = self.config.pool_size;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > keep).then(|| n - 1)
            })
            .is_ok()
    }

    /// Records whether the adapter can probe connections without a round trip (it cannot
    /// where sockets cannot be identified). Warns once when it cannot; the status report
    /// shows it.
    pub fn set_probe_available(&self, available: bool, why: &str) {
        let was = self.probe_available.swap(available, Ordering::AcqRel);
        if was && !available {
            log::warn!(
                target: LOG_TARGET,
                pool = self.name(),
                event = "probe_unavailable";
                "pool {}: no zero-round-trip liveness probe and no stall watchdog here ({why}); \
                 every checkout is validated by a ping, which a hung server can block",
                self.name()
            );
        }
    }

    /// Whether the liveness probe works for this pool.
    pub fn probe_available(&self) -> bool {
        self.probe_available.load(Ordering::Acquire)
    }

    /// The pool's stats with its gauges, from the wrapped pool's counts now: its connections
    /// (in use or idle) and its idle ones.
    pub fn snapshot_counts(&self, connections: u32, idle: u32) -> StatsSnapshot {
        self.snapshot(connections.saturating_sub(idle), idle)
    }

    /// The pool's stats with its gauges: `in_use` and `idle` as the pool sees them now.
    pub fn snapshot(&self, in_use: u32, idle: u32) -> StatsSnapshot {
        let (reserved, budget_waiters) = match &self.budget {
            Some((budget, class)) => (budget.limits(*class).reserved, budget.waiters(*class)),
            None => (0, 0),
        };
        let mut snapshot = self.stats.snapshot(Gauges {
            name: self.config.name.clone(),
            in_use,
            idle,
            pool_size: self.config.pool_size,
            max_overflow: self.config.max_overflow,
            reserved,
            waiters: Some(self.gate.waiters() + budget_waiters),
        });
        snapshot.probe_available = self.probe_available();
        let server = self.health.state();
        if !server.reachable {
            snapshot.is_healthy = false;
            snapshot.server_down = Some(crate::stats::ServerDown {
                since_ms: server.down_for_ms.unwrap_or(0),
                failed_attempts: server.failed_attempts,
                class: server
                    .last_error_class
                    .map_or("transient", |c| c.as_str())
                    .to_owned(),
                last_error: server.last_error.unwrap_or_default(),
                next_attempt_in_ms: server.next_attempt_in_ms.unwrap_or(0),
            });
        }
        snapshot
    }
}

/// The pool state is the listener its users see: events go to the configured listener, with
/// a panic in it caught (see [`PoolState::emit`]).
impl EventListener for PoolState {
    fn on_event(&self, event: &PoolEvent<'_>) {
        self.emit(event);
    }
}
