//! Readiness: [`ExtPool::health`] for readiness probes and [`ExtPool::warm_up`] for startup
//! gates. The rules are pool-core's ([`pool_core::readiness`]); this file performs them on
//! r2d2: a check is a checkout that never waits (a gate permit at once, r2d2's `try_get`),
//! a connect is the pool's own (r2d2 opens it for our demand, so it lands in the pool).

use std::time::{Duration, Instant};

use pool_core::readiness::{Check, Finding, Health, WarmUp};
use pool_core::stats::StatsSnapshot;

use crate::manager::{sweeping, ExtConnection, ExtManager};
use crate::pool::{quiet_timeouts, ExtPool};
use crate::tracker::tracker_of;

/// The slices in which a check or a warm-up waits for r2d2, between looks at the server's
/// health.
const SLICE: Duration = Duration::from_millis(20);
/// Connections the pool found dead so far (by the probe at a checkout, or a failed ping).
fn dead(s: &StatsSnapshot) -> u64 {
    s.probe_detected_dead + s.validations_failed
}

impl<C: ExtConnection> ExtPool<C> {
    /// Whether the pool can serve now, for a readiness probe; never waits behind the pool's
    /// callers. In this order (see [`pool_core::readiness`]):
    ///
    /// 1. the server answered within the validation bypass window and nothing spoke against
    ///    it since, the pool not saturated: ready, **no round trip**;
    /// 2. else, if a connection is idle and nobody waits before us: the checkout's checks
    ///    (a connection the probe finds dead is closed and invalidates the pool, as at any
    ///    checkout) and **one ping** bounded by `validation_timeout`;
    /// 3. else, if the pool has room, its budget a permit free at once, and the server is not
    ///    in a connect backoff: **one connect attempt** (bounded by `connect_timeout`, at most
    ///    `pool_timeout`); the connection it opens stays in the pool;
    /// 4. else an answer from the stats: saturated is degraded, a server known down is
    ///    unreachable with the last connect error's class and message.
    ///
    /// The check is not a checkout: it moves no checkout counter or wait time.
    pub fn health(&self) -> Health {
        let state = self.state();
        let check = Check::start();
        if Check::evidence_suffices(state, &self.stats()) {
            return check.answer(state, Finding::Evidence, &self.stats());
        }
        let mut check = check;
        let finding = self.check(&mut check);
        check.answer(state, finding, &self.stats())
    }

    fn check(&self, check: &mut Check) -> Finding {
        let state = self.state();
        // In line like any checkout, but only if nobody waits and a slot is free.
        let Some(_gate) = state.gate().try_enter() else {
            return Finding::Saturated;
        };
        let timeout = state.config().lifecycle.validation.timeout;
        let before = self.stats();
        // r2d2 runs our checkout on each idle connection: dead ones are closed (and
        // invalidate the pool), those idle past the bypass window are pinged.
        let got = self.inner().try_get();
        let after = self.stats();
        let found = dead(&after).saturating_sub(dead(&before));
        check.found_dead(u32::try_from(found).unwrap_or(u32::MAX), None);
        if after.validations_failed > before.validations_failed || after.pings > before.pings {
            check.made_round_trip();
        }
        if let Some(mut conn) = got {
            let pinged = tracker_of(&mut *conn)
                .is_some_and(|t| t.state.lifecycle().last_validated >= check.started());
            if pinged {
                return Finding::Answered;
            }
            // Trusted without a ping (used recently, by the pool's rules): the check is a ping.
            check.made_round_trip();
            match ExtManager::<C>::bounded_ping(&mut conn, timeout) {
                Ok(()) => return Finding::Answered,
                // Marked broken: closed when it goes back, right here.
                Err(e) => check.found_dead(1, Some(state.redact(&e.to_string()))),
            }
        }
        self.connect_once(check)
    }

    /// No usable idle connection: one connect attempt, if it needs no waiting.
    fn connect_once(&self, check: &mut Check) -> Finding {
        let state = self.state();
        let cfg = state.config();
        if state.open_connections() >= cfg.max_size() {
            return Finding::NoCheck {
                class: "no_connection",
                message: format!(
                    "no idle connection and the pool holds its maximum of {}",
                    cfg.max_size()
                ),
            };
        }
        if let Some((budget, class)) = state.budget() {
            if budget.try_acquire(class).is_none() {
                return Finding::NoCheck {
                    class: "budget",
                    message: format!(
                        "no idle connection and no budget permit free for class {:?}",
                        budget.class_name(class)
                    ),
                };
            }
        }
        let health = state.health();
        if health.is_down() {
            // One attempt at a time while the server is down, after the backoff: not ours to
            // jump (the answer is the last failure's).
            match health.attempt() {
                pool_core::engine::Attempt::Go(probe) => drop(probe),
                pool_core::engine::Attempt::Wait(_) => {
                    return Finding::NoCheck {
                        class: "no_connection",
                        message: "connects are failing; the next attempt is not due yet".into(),
                    }
                }
            }
            if let Some(why) = health.fail_fast(check.started(), None) {
                return connect_failed(state, why);
            }
        }
        check.made_round_trip();
        let bound = cfg
            .connect
            .connect_timeout
            .unwrap_or(cfg.pool_timeout)
            .min(cfg.pool_timeout);
        let deadline = check.started() + bound;
        // Our demand makes the pool's connect open a connection (it then stays in the pool).
        let _wanting = self.demand().want();
        loop {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(SLICE);
            // A checkout's checks: a connection returned meanwhile is validated like any.
            if let Ok(conn) = quiet_timeouts(|| self.inner().get_timeout(slice)) {
                drop(conn);
                return Finding::Connected;
            }
            if let Some(message) = health.last_error_since(check.started()) {
                return connect_failed(state, message);
            }
            if Instant::now() >= deadline {
                return Finding::NoCheck {
                    class: "no_connection",
                    message: format!("no connection could be opened within {bound:?}"),
                };
            }
        }
    }

    /// Opens connections until the pool holds `pool_size` (those in use count), at most
    /// until `timeout`, for a startup gate: [`WarmUp::complete`] says whether it got there.
    /// Connects go as the pool's own do (at most three at once, within the budget, paced by
    /// the server's health); idle connections are reused, not pinged. Stops early when the
    /// server refuses connections for a reason no retry can fix.
    pub fn warm_up(&self, timeout: Duration) -> WarmUp {
        // At most 365 days (a longer one waits that long, never overflows the clock).
        let timeout = timeout.min(pool_core::config::MAX_DURATION);
        let started = Instant::now();
        let state = self.state();
        let counts = self.inner().state();
        let in_use = counts.connections.saturating_sub(counts.idle_connections);
        let wanted = state.config().pool_size.saturating_sub(in_use);
        let connects_before = self.stats().connects;
        let deadline = started + timeout;
        let mut errors: Vec<String> = Vec::new();
        let mut held = Vec::new();
        // All our demand at once, so that the pool's connects open in parallel.
        let mut wanting: Vec<_> = (0..wanted).map(|_| self.demand().want()).collect();
        while held.len() < wanted as usize {
            let slice = deadline
                .saturating_duration_since(Instant::now())
                .min(SLICE);
            match quiet_timeouts(|| sweeping(|| self.inner().get_timeout(slice))) {
                Ok(conn) => {
                    held.push(conn);
                    wanting.pop();
                }
                Err(_) => {
                    if let Some(e) = state.health().last_error_since(started) {
                        WarmUp::record_error(&mut errors, e);
                    }
                    if state.health().fail_fast(started, None).is_some()
                        || Instant::now() >= deadline
                    {
                        break;
                    }
                }
            }
        }
        drop(wanting);
        let got = u32::try_from(held.len()).unwrap_or(u32::MAX);
        drop(held);
        let connects = self.stats().connects.saturating_sub(connects_before);
        WarmUp::finish(state.name(), wanted, got, connects, errors, started)
    }
}

fn connect_failed(state: &pool_core::engine::PoolState, message: String) -> Finding {
    let class = state
        .health()
        .state()
        .last_error_class
        .map_or("transient", |c| c.as_str());
    Finding::ConnectFailed { class, message }
}
