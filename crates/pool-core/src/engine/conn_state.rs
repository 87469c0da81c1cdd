//! Per-connection state and the two decisions taken on it: at checkout and at checkin.
//!
//! The adapter keeps one [`ConnState`] next to each connection (the sync adapter in the
//! connection's Diesel instrumentation slot). The decisions are pure apart from counters and
//! events; the adapter performs the I/O they ask for (a probe before, a ping after
//! [`ConnState::begin_checkout`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{LeakTimer, PoolState};
use crate::budget::Permit;
use crate::classify::ErrorClass;
use crate::events::PoolEvent;
use crate::lifecycle::{CheckoutAction, CloseReason, ConnectionState, ProbeResult};

/// What the adapter must do before handing a connection out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutStep {
    /// Hand it out as it is.
    Reuse,
    /// Ping it, bounded by `timeout`, then report with [`ConnState::finish_ping`].
    Ping {
        /// The validation timeout.
        timeout: Duration,
    },
    /// Close it (its close reason is recorded); take another connection.
    Discard(CloseReason),
}

/// The pool's view of one connection. Dropping it records the close (stats, `Closed`
/// event, the pool's open count) and releases the budget permit the connection held: drop
/// it only once the connection itself is closed.
pub struct ConnState {
    pool: Arc<PoolState>,
    id: u64,
    lifecycle: ConnectionState,
    close_reason: Option<CloseReason>,
    /// Still in the pool's open count (false once claimed for an overflow close).
    counted: bool,
    /// The epoch a ping under way validates the connection for.
    ping_epoch: u64,
    /// When the ping under way (or the last one) was asked for.
    ping_started: Option<Instant>,
    /// A validation ping was asked for and has not been reported: if the connection comes
    /// back like this (an async checkout cancelled mid-ping), it is in an unknown state.
    ping_in_flight: bool,
    checked_out_at: Option<Instant>,
    /// Taken out of the idle list by the pool's own maintenance, not by a caller.
    swept: bool,
    /// Opened and not yet taken out of the idle list (see [`ConnState::take_fresh`]).
    fresh: bool,
    leak: Option<LeakTimer>,
    /// Saw "read-only transaction" (25006): a failover, or a deliberate write in a READ ONLY
    /// transaction. The adapter tells which at checkin.
    read_only_suspect: bool,
    /// The checkout gate permit held while the connection is out (and until it is closed,
    /// when it is closed at checkin).
    gate: Option<Permit>,
    /// The budget permit; released after the connection closed.
    _permit: Option<Permit>,
    /// When the server last answered it: opened, validated, or checked in unbroken after
    /// use (see [`ConnState::close_confirm_bound`]).
    last_answer: Instant,
    /// Counted idle in `db.client.connection.count` (see [`crate::metrics`]).
    #[cfg(feature = "metrics")]
    gauged_idle: bool,
}

impl std::fmt::Debug for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnState")
            .field("pool", &self.pool.name())
            .field("id", &self.id)
            .field("lifecycle", &self.lifecycle)
            .field("close_reason", &self.close_reason)
            .finish_non_exhaustive()
    }
}

/// A closing connection's budget permit, held while the adapter waits for the server to
/// confirm the session gone (from [`ConnState::close_wait`]). [`CloseWait::finish`] reports
/// how the wait ended and releases the permit; dropping it releases the permit without a
/// report (the adapter could not tell).
#[must_use = "finish() it once the server confirmed the session gone, or drop it"]
pub struct CloseWait {
    pool: Arc<PoolState>,
    bound: Duration,
    /// When the wait began.
    started: Instant,
    _permit: Option<Permit>,
}

impl CloseWait {
    /// The wait of a connection given up before it joined the pool (`pool`'s, holding
    /// `permit`): its session was set up on the server, then its setup failed (an
    /// after-connect hook, a session setting) or its connect was abandoned. The server just
    /// answered it, so it waits unless the pool has no budget (`permit` is `None`): the
    /// permit comes back once the server confirmed the session gone, within the bound, as
    /// for any closed connection (see [`PoolState::close_confirm_bound`]). Nothing is counted:
    /// the connect's failure is the adapter's to record.
    pub fn abandoned(pool: &Arc<PoolState>, permit: Option<Permit>) -> Option<CloseWait> {
        let permit = permit?;
        let bound = pool.close_confirm_bound(Instant::now())?;
        Some(CloseWait::holding(pool, bound, permit))
    }

    /// A wait of at most `bound`, starting now, holding `permit`, marked as on its way back:
    /// the budget does not ask a borrowing class to close another connection for it.
    fn holding(pool: &Arc<PoolState>, bound: Duration, mut permit: Permit) -> CloseWait {
        permit.set_returning();
        CloseWait {
            pool: pool.clone(),
            bound,
            started: Instant::now(),
            _permit: Some(permit),
        }
    }

    /// How long the adapter may wait (the pool's validation timeout, at most
    /// [`super::CONFIRM_BOUND_MAX`]).
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Reports how the wait ended, then releases the permit: `confirmed` false when the
    /// bound ran out, which stops the closes of the pool's connections that have not heard
    /// from the server since this wait began from waiting (see
    /// [`PoolState::close_confirm_bound`]).
    pub fn finish(self, confirmed: bool) {
        self.pool.close_confirmed(confirmed, self.started);
    }
}

impl std::fmt::Debug for CloseWait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloseWait")
            .field("pool", &self.pool.name())
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl ConnState {
    /// A connection was just opened (in `took`), holding `permit` if the pool has a budget.
    /// Counts it and reports it.
    pub fn opened(pool: &Arc<PoolState>, took: Duration, permit: Option<Permit>) -> ConnState {
        let now = Instant::now();
        let epoch = pool.epoch();
        let state = ConnState {
            pool: pool.clone(),
            id: pool.next_id(),
            lifecycle: pool.config().lifecycle.new_connection(now, epoch),
            close_reason: None,
            counted: true,
            ping_epoch: epoch,
            ping_started: None,
            ping_in_flight: false,
            checked_out_at: None,
            swept: false,
            fresh: true,
            leak: None,
            read_only_suspect: false,
            gate: None,
            _permit: permit,
            last_answer: now,
            #[cfg(feature = "metrics")]
            gauged_idle: true,
        };
        pool.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        pool.stats().record_connect();
        pool.stats().metrics().opened(took);
        pool.connect_succeeded();
        pool.emit(&PoolEvent::Connected {
            pool: pool.name(),
            connection_id: state.id,
            took,
        });
        state
    }

    /// State for a pooled connection the pool lost track of (the application replaced what
    /// carried its state, e.g. Diesel's instrumentation slot, while it had the connection
    /// checked out): it takes back what that state held (its id, budget permit, gate permit
    /// and place in the open count: see `PoolState::orphan`), so the connection never
    /// escapes the budget or the sizes; it is treated as unvalidated and idle past the
    /// bypass window, so its next checkout pings it. Without an orphan to take back (a
    /// connection the pool never tracked), it is counted as a new connection.
    pub fn adopted(pool: &Arc<PoolState>) -> ConnState {
        let now = Instant::now();
        let epoch = pool.epoch();
        let mut state = match pool.take_orphan() {
            Some(orphan) => ConnState {
                pool: pool.clone(),
                id: orphan.id,
                lifecycle: pool.config().lifecycle.new_connection(now, epoch),
                close_reason: None,
                counted: orphan.counted,
                ping_epoch: epoch,
                ping_started: None,
                ping_in_flight: false,
                checked_out_at: orphan.checked_out_at,
                swept: false,
                fresh: false,
                leak: None,
                read_only_suspect: false,
                gate: orphan.gate,
                _permit: orphan.permit,
                last_answer: now,
                // Checked out: counted as used, and uncounted at its checkin.
                #[cfg(feature = "metrics")]
                gauged_idle: false,
            },
            None => ConnState::opened(pool, Duration::ZERO, None),
        };
        state.fresh = false;
        state.lifecycle.validated_epoch = epoch.saturating_sub(1);
        let bypass = pool.config().lifecycle.validation.bypass_window;
        state.lifecycle.last_used = now.checked_sub(bypass).unwrap_or(state.lifecycle.last_used);
        state.last_answer = state.lifecycle.last_used;
        state
    }

    /// Whether this is the connection's first time out of the idle list since it was opened
    /// (clears it): an adapter counting connections opened for waiting checkouts and not yet
    /// taken asks here.
    pub fn take_fresh(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    /// The connection's id, unique within its pool; every event about it carries it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The pool this connection belongs to.
    pub fn pool(&self) -> &Arc<PoolState> {
        &self.pool
    }

    /// Its lifecycle state (created, expires, last used, validated epoch, broken).
    pub fn lifecycle(&self) -> &ConnectionState {
        &self.lifecycle
    }

    /// Whether it is marked broken (never reused).
    pub fn is_broken(&self) -> bool {
        self.lifecycle.broken
    }

    /// Whether it is checked out now.
    pub fn is_checked_out(&self) -> bool {
        self.checked_out_at.is_some()
    }

    /// How long, now that its connection is closing, the adapter may wait for the server to
    /// confirm the session is gone (the socket's end-of-file) before the budget permit this
    /// state holds is released: `None` when it must not wait, because the connection holds
    /// no budget permit, is still checked out (the application replaced what carried this
    /// state: the connection is not closing), was retired because its path went silent
    /// ([`CloseReason::Invalidated`]: closed precisely so as not to wait on it), or a wait of
    /// the pool that began after the server last answered this connection ran out (see
    /// [`PoolState::close_confirm_bound`]). The wait itself is [`ConnState::close_wait`].
    pub fn close_confirm_bound(&self) -> Option<Duration> {
        if self._permit.is_none()
            || self.checked_out_at.is_some()
            || self.close_reason == Some(CloseReason::Invalidated)
        {
            return None;
        }
        self.pool.close_confirm_bound(self.last_answer)
    }

    /// Takes the budget permit out for a wait on the server's confirmation, when
    /// [`ConnState::close_confirm_bound`] allows one: the [`CloseWait`] holds the permit
    /// until it is finished or dropped, which may be after this state is gone (an async
    /// adapter waits in a task of its own).
    pub fn close_wait(&mut self) -> Option<CloseWait> {
        // The bound is only given for a state that holds a permit.
        let bound = self.close_confirm_bound()?;
        let permit = self._permit.take()?;
        Some(CloseWait::holding(&self.pool, bound, permit))
    }

    /// Why the pool decided to close it, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason
    }

    /// Records why the connection is being closed (kept for the `Closed` event).
    pub fn set_close_reason(&mut self, reason: CloseReason) {
        self.close_reason = Some(reason);
    }

    /// Step 1 of a checkout. `probe` runs the zero-round-trip liveness probe; it is not run
    /// when the connection is retired anyway.
    pub fn begin_checkout(
        &mut self,
        probe: impl FnOnce() -> ProbeResult,
        now: Instant,
    ) -> CheckoutStep {
        let pool = self.pool.clone();
        if pool.take_reclaim() {
            return self.discard(CloseReason::Reclaimed);
        }
        if self.is_suspect() {
            // Idle since before a ping of this pool went unanswered (pinging it could cost
            // another whole validation timeout) or a failover was seen (a ping would pass on
            // the old primary turned standby): closing it costs a reconnect.
            return self.discard(CloseReason::Invalidated);
        }
        let policy = &pool.config().lifecycle;
        let epoch = pool.epoch();
        let probe = || {
            if policy.validation.probe {
                probe()
            } else {
                ProbeResult::Unavailable
            }
        };
        // Dead, expired and idle-too-long connections go without a look at the socket.
        match policy.on_checkout_probing(&self.lifecycle, now, epoch, probe) {
            CheckoutAction::Reuse => CheckoutStep::Reuse,
            // A budget class keeps its reserved floor open: an idle one within it is pinged.
            CheckoutAction::Discard(CloseReason::IdleTimeout)
                if pool.open_connections() <= pool.floor() =>
            {
                self.ping(epoch, policy.validation.timeout)
            }
            CheckoutAction::Discard(reason) => {
                if reason == CloseReason::ProbeDead {
                    pool.stats().record_probe_dead();
                    pool.invalidate("liveness probe found a connection closed by the server");
                }
                self.discard(reason)
            }
            CheckoutAction::Ping => self.ping(epoch, policy.validation.timeout),
        }
    }

    /// Whether the connection was idle when a validation ping of its pool went unanswered
    /// (see [`PoolState::path_went_silent`]).
    pub fn is_suspect(&self) -> bool {
        let last_good = self.lifecycle.last_used.max(self.lifecycle.last_validated);
        self.pool.is_suspect(last_good)
    }

    fn ping(&mut self, epoch: u64, timeout: Duration) -> CheckoutStep {
        self.ping_epoch = epoch;
        self.ping_started = Some(Instant::now());
        self.ping_in_flight = true;
        CheckoutStep::Ping { timeout }
    }

    fn discard(&mut self, reason: CloseReason) -> CheckoutStep {
        self.close_reason = Some(reason);
        CheckoutStep::Discard(reason)
    }

    /// The pool's maintenance takes the connection out of the idle list to look at it: the
    /// decision without reclaim, ping or leak timer. `Some(reason)` retires it (dead by the
    /// probe, broken, expired, idle past the timeout while above the floor). Its checkin then
    /// leaves its idle time alone.
    pub fn sweep(
        &mut self,
        probe: impl FnOnce() -> ProbeResult,
        now: Instant,
    ) -> Option<CloseReason> {
        let pool = self.pool.clone();
        self.swept = true;
        if self.is_suspect() {
            self.close_reason = Some(CloseReason::Invalidated);
            return Some(CloseReason::Invalidated);
        }
        let policy = &pool.config().lifecycle;
        let probe = if policy.validation.probe {
            probe()
        } else {
            ProbeResult::Unavailable
        };
        match policy.on_checkout(&self.lifecycle, now, pool.epoch(), probe) {
            CheckoutAction::Discard(CloseReason::IdleTimeout)
                if pool.open_connections() <= pool.floor() =>
            {
                None
            }
            CheckoutAction::Discard(reason) => {
                self.close_reason = Some(reason);
                Some(reason)
            }
            CheckoutAction::Ping | CheckoutAction::Reuse => None,
        }
    }

    /// Whether a keepalive ping is due: nothing (use or ping) vouched for the connection for
    /// `every`.
    pub fn keepalive_due(&self, every: Duration, now: Instant) -> bool {
        let last = self.lifecycle.last_used.max(self.lifecycle.last_validated);
        now.saturating_duration_since(last) >= every
    }

    /// Step 2 of a checkout that pinged: `ok` is whether the ping succeeded in time (a ping
    /// whose deadline fired counts as failed, even if it returned success). Returns `ok`.
    /// A failed ping marks the connection broken: it is closed, never pooled again (by the
    /// sweep's checkin too).
    pub fn finish_ping(&mut self, ok: bool) -> bool {
        if !ok {
            self.pool
                .stats()
                .metrics()
                .validation_failed(crate::metrics::ValidationFailure::Error);
        }
        self.finish_ping_quietly(ok)
    }

    fn finish_ping_quietly(&mut self, ok: bool) -> bool {
        self.ping_in_flight = false;
        self.pool.stats().record_ping(ok);
        if ok {
            self.lifecycle.validated_epoch = self.ping_epoch;
            self.lifecycle.last_validated = Instant::now();
            self.last_answer = self.lifecycle.last_validated;
            self.pool.server_answered(self.lifecycle.last_validated);
            if let Some(started) = self.ping_started {
                self.pool.record_ping_rtt(started.elapsed());
            }
        } else {
            self.lifecycle.broken = true;
            self.close_reason = Some(CloseReason::PingFailed);
        }
        ok
    }

    /// A ping is about to be sent (by a checkout, or by the keepalive sweep): its start is
    /// what [`ConnState::finish_ping_silent`] reports.
    pub fn ping_starting(&mut self) {
        self.ping_started = Some(Instant::now());
    }

    /// Step 2 of a checkout whose ping got no reply within the validation timeout: a failed
    /// ping, and evidence that the path went silent: every connection of the pool idle since
    /// before this ping started becomes suspect ([`PoolState::path_went_silent`]).
    pub fn finish_ping_silent(&mut self) {
        let started = self.ping_started.unwrap_or_else(Instant::now);
        self.pool
            .stats()
            .metrics()
            .validation_failed(crate::metrics::ValidationFailure::Timeout);
        self.finish_ping_quietly(false);
        self.pool.path_went_silent(started);
    }

    /// Step 2 of a checkout whose ping lost its race at the hedge delay (a fresh connection
    /// was ready first, or there was no room for one and this connection was given up): a
    /// failed ping (recorded with [`ConnState::finish_ping`] if the adapter has not yet), and a
    /// strike against the path: a second within one validation timeout makes every connection
    /// idle since before this ping started suspect ([`PoolState::slow_ping_lost`]).
    pub fn slow_ping_lost(&mut self) {
        if self.ping_in_flight {
            self.finish_ping(false);
        }
        let started = self.ping_started.unwrap_or_else(Instant::now);
        self.pool.slow_ping_lost(started);
    }

    /// Step 3: the connection is handed to the caller, who started asking for it at
    /// `asked_at`, holding the gate permit `gate`. Counts it, reports it, starts the leak
    /// timer.
    pub fn handed_out(&mut self, asked_at: Instant, gate: Option<Permit>) {
        let pool = self.pool.clone();
        let now = Instant::now();
        let waited = now.saturating_duration_since(asked_at);
        self.checked_out_at = Some(now);
        self.gate = gate;
        pool.stats().record_checkout(waited);
        #[cfg(feature = "metrics")]
        pool.stats()
            .metrics()
            .handed_out(std::mem::take(&mut self.gauged_idle));
        pool.emit(&PoolEvent::CheckedOut {
            pool: pool.name(),
            connection_id: self.id,
            waited,
        });
        if let Some(threshold) = pool.config().lifecycle.leak_detection_threshold {
            self.leak = Some(LeakTimer::start(&pool, self.id, threshold));
        }
    }

    /// A query on the connection failed with an error of `class`: a lost connection is
    /// marked broken (closed at checkin, never pooled again) and makes every older connection
    /// of the pool suspect (each is pinged before its next use). The drivers usually report
    /// such a connection broken themselves (Diesel's transaction manager goes into error when
    /// libpq's status does; diesel-async's `is_broken` sees the closed client); the mark does
    /// not depend on it.
    pub fn observe_error(&mut self, class: ErrorClass) {
        match class {
            ErrorClass::ConnectionLost | ErrorClass::AdminShutdown => {
                if !self.lifecycle.broken {
                    self.lifecycle.broken = true;
                    self.close_reason = Some(CloseReason::Broken);
                }
                self.pool.invalidate(class.as_str());
            }
            ErrorClass::ReadOnlyTransaction => {
                self.read_only_suspect = true;
                self.pool.read_only_seen();
            }
            _ => {}
        }
    }

    /// Whether the server should be asked if it became a standby, on this connection: it saw
    /// a read-only-transaction error since it was last checked, or another connection of the
    /// pool did and no connection has been checked since ([`PoolState::read_only_seen`]: a
    /// pool that hands idle connections out oldest first may not meet the one that saw it
    /// again for a while). Clears both. The adapter then asks the server (one round trip).
    pub fn take_read_only_suspect(&mut self) -> bool {
        let own = std::mem::take(&mut self.read_only_suspect);
        self.pool.take_read_only_seen() || own
    }

    /// The server turned out to be a standby (a failover happened): the connection is broken,
    /// and every other connection of the pool last known good before now is closed at its
    /// next checkout without a ping ([`PoolState::failover_detected`]: a standby answers pings).
    pub fn failover_detected(&mut self) {
        self.lifecycle.broken = true;
        self.close_reason = Some(CloseReason::Broken);
        self.pool.failover_detected(Instant::now());
    }

    /// The connection comes back. `dirty` is the adapter's verdict on its session (a
    /// transaction left open, returned during a panic); a connection returned while its
    /// validation ping was under way (a cancelled checkout) is closed too. Stops the leak timer (no report after
    /// this returns), reports the checkin and decides: `None` keeps it (and releases its gate
    /// permit), `Some(reason)` closes it.
    pub fn checkin(&mut self, dirty: bool) -> Option<CloseReason> {
        if let Some(leak) = self.leak.take() {
            leak.stop();
        }
        let now = Instant::now();
        let pool = self.pool.clone();
        #[cfg(feature = "metrics")]
        let held = self
            .checked_out_at
            .map(|at| now.saturating_duration_since(at));
        if let Some(at) = self.checked_out_at.take() {
            if !dirty && !self.lifecycle.broken {
                // Used and returned unbroken: the server answered it (as the bypass window
                // trusts it).
                pool.server_answered(now);
                self.last_answer = now;
            }
            pool.emit(&PoolEvent::CheckedIn {
                pool: pool.name(),
                connection_id: self.id,
                held: now.saturating_duration_since(at),
            });
        }
        if !std::mem::take(&mut self.swept) {
            self.lifecycle.last_used = now;
        }
        let reclaim = || {
            pool.budget()
                .is_some_and(|(budget, class)| budget.reclaim_wanted(class) > 0)
        };
        let reason = if self.lifecycle.broken {
            // Marked when it broke (a lost connection, a failed ping): keep that reason.
            Some(self.close_reason.unwrap_or(CloseReason::Broken))
        } else if dirty {
            Some(CloseReason::Broken)
        } else if std::mem::take(&mut self.ping_in_flight) {
            // Returned in the middle of its validation (a cancelled checkout): the ping's
            // reply may still be on its way.
            Some(CloseReason::PingFailed)
        } else if reclaim() {
            // Borrowed budget headroom goes back at once if another class waits for it.
            Some(CloseReason::Reclaimed)
        } else if let Some(reason) = pool.config().lifecycle.on_checkin(&self.lifecycle, now) {
            Some(reason)
        } else if pool.claim_overflow_close() {
            self.counted = false;
            Some(CloseReason::Overflow)
        } else {
            None
        };
        #[cfg(feature = "metrics")]
        if let Some(held) = held {
            pool.stats().metrics().checked_in(held, reason.is_none());
            self.gauged_idle = reason.is_none();
        }
        match reason {
            Some(reason) => self.close_reason = Some(reason),
            // Kept: the next checkout in line may go. (A closed connection keeps its permit
            // until it is dropped, so that the next one finds its slot free.)
            None => self.gate = None,
        }
        reason
    }
}

impl Drop for ConnState {
    fn drop(&mut self) {
        if let Some(leak) = self.leak.take() {
            leak.stop();
        }
        if self.checked_out_at.is_some() {
            // Dropped while its connection is checked out: the connection itself is still
            // open (every close goes through a checkin first), only what carried this state
            // was replaced by the application. Keep the connection's permits and count with
            // the pool until the adapter adopts it again.
            self.pool.orphan(super::pool_state::Orphan {
                id: self.id,
                counted: self.counted,
                checked_out_at: self.checked_out_at,
                gate: self.gate.take(),
                permit: self._permit.take(),
            });
            return;
        }
        if self.counted {
            self.pool
                .open
                .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
        let reason = self.close_reason.unwrap_or(CloseReason::Released);
        self.pool.stats().record_close(reason);
        #[cfg(feature = "metrics")]
        if self.gauged_idle {
            self.pool.stats().metrics().idle_closed();
        }
        self.pool.emit(&PoolEvent::Closed {
            pool: self.pool.name(),
            connection_id: self.id,
            reason,
        });
        // The gate and budget permits are released after this body, as the fields drop.
    }
}
