//! Readiness: [`ExtPool::health`] for readiness probes and [`ExtPool::warm_up`] for startup
//! gates. The rules are pool-core's ([`pool_core::readiness`]); this file performs them on
//! bb8: a check takes an idle connection in one poll (never waiting in bb8's queue), and a
//! connect is one attempt whose connection is added to the pool.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bb8::PooledConnection;
use pool_core::engine::Attempt;
use pool_core::readiness::{Check, Finding, Health, WarmUp};
use pool_core::stats::StatsSnapshot;

use crate::backend::ExtConnection;
use crate::manager::{ExtError, ExtManager, Mode, MODE};
use crate::pool::ExtPool;

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
    ///    `pool_timeout`); the connection it opens is added to the pool;
    /// 4. else an answer from the stats: saturated is degraded, a server known down is
    ///    unreachable with the last connect error's class and message.
    ///
    /// The check is not a checkout: it moves no checkout counter or wait time. Dropping the
    /// future mid-ping closes the connection being pinged (as for any cancelled checkout).
    pub async fn health(&self) -> Health {
        let state = self.state();
        let check = Check::start();
        if Check::evidence_suffices(state, &self.stats()) {
            return check.answer(state, Finding::Evidence, &self.stats());
        }
        let mut check = check;
        let finding = self.check(&mut check).await;
        check.answer(state, finding, &self.stats())
    }

    async fn check(&self, check: &mut Check) -> Finding {
        let state = self.state();
        // In line like any checkout, but only if nobody waits and a slot is free.
        let Some(_gate) = state.gate().try_enter() else {
            return Finding::Saturated;
        };
        let timeout = state.config().lifecycle.validation.timeout;
        let before = self.stats();
        let got = self.take_idle_checked();
        let found = dead(&self.stats()).saturating_sub(dead(&before));
        check.found_dead(u32::try_from(found).unwrap_or(u32::MAX), None);
        if let Some((mut conn, held)) = got {
            check.made_round_trip();
            let pinged = self.manager().bounded_ping(&mut conn, timeout).await;
            held.release();
            drop(conn);
            match pinged {
                Ok(()) => return Finding::Answered,
                // Marked broken: closed as it went back.
                Err(e) => check.found_dead(1, Some(state.redact(&e.to_string()))),
            }
        }
        self.connect_once(check).await
    }

    /// An idle connection after a checkout's checks without its ping (dead ones are closed
    /// and invalidate the pool), taken in one poll: `None` if none is idle (or none was
    /// alive). The [`Held`](crate::demand::Held) guard must be released after the
    /// connection is returned.
    #[allow(clippy::type_complexity)]
    fn take_idle_checked(
        &self,
    ) -> Option<(PooledConnection<'_, ExtManager<C>>, crate::demand::Held<'_>)> {
        if self.inner().state().idle_connections == 0 {
            return None;
        }
        let held = self.demand().hold();
        let mut get = pin!(MODE.scope(Mode::Health, self.inner().get()));
        // One poll: the checkout's decision does no I/O, so an idle connection is handed
        // over at once; if none is left, the future is dropped.
        match get.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(conn)) => Some((conn, held)),
            _ => None,
        }
    }

    /// No usable idle connection: one connect attempt, if it needs no waiting.
    async fn connect_once(&self, check: &mut Check) -> Finding {
        let state = self.state();
        let cfg = state.config();
        if !state.hedge_room() {
            return Finding::NoCheck {
                class: "no_connection",
                message: format!(
                    "no idle connection and the pool holds its maximum of {}",
                    cfg.max_size()
                ),
            };
        }
        let health = state.health();
        // While the server is down, one attempt at a time after the backoff: ours only if
        // it is due and nobody else is trying.
        let _probe = match health.attempt() {
            Attempt::Go(probe) => probe,
            Attempt::Wait(_) => {
                return Finding::NoCheck {
                    class: "no_connection",
                    message: "connects are failing; the next attempt is not due yet".into(),
                }
            }
        };
        let bound = cfg
            .connect
            .connect_timeout
            .unwrap_or(cfg.pool_timeout)
            .min(cfg.pool_timeout);
        // On a task of its own: a connect still under way at `bound` finishes there (see
        // `spawn_hedge`).
        let (connect, connecting) = self.manager().spawn_hedge();
        let outcome = tokio::time::timeout(bound, connect).await;
        // A round trip only if a connect began (no room or no permit: none was made).
        if connecting.load(std::sync::atomic::Ordering::Acquire) {
            check.made_round_trip();
        }
        match outcome {
            Ok(Err(_panicked)) => Finding::ConnectFailed {
                class: "transient",
                message: "the connect attempt panicked (in the after_connect hook?)".into(),
            },
            Ok(Ok(Some(Ok(conn)))) => {
                // Into the pool: the next checkout finds it idle (bb8 refuses it only when
                // full, and then it is closed).
                let _ = self.inner().add(conn);
                Finding::Connected
            }
            Ok(Ok(Some(Err(ExtError::Connect { message, .. })))) => {
                let class = health
                    .state()
                    .last_error_class
                    .map_or("transient", |c| c.as_str());
                Finding::ConnectFailed { class, message }
            }
            Ok(Ok(Some(Err(other)))) => Finding::ConnectFailed {
                class: "transient",
                message: other.to_string(),
            },
            Ok(Ok(None)) => match state.budget() {
                Some((budget, class)) => Finding::NoCheck {
                    class: "budget",
                    message: format!(
                        "no idle connection and no budget permit free for class {:?}",
                        budget.class_name(class)
                    ),
                },
                None => Finding::NoCheck {
                    class: "no_connection",
                    message: "no idle connection and no room to open one".into(),
                },
            },
            Err(_) => Finding::ConnectFailed {
                class: "transient",
                message: format!("the connect attempt did not complete within {bound:?}"),
            },
        }
    }

    /// Opens connections until the pool holds `pool_size` (those in use count), at most
    /// until `timeout`, for a startup gate: [`WarmUp::complete`] says whether it got there.
    /// Connects go as the pool's own do (at most three at once, within the budget, paced by
    /// the server's health); idle connections are reused, not pinged. Stops early when the
    /// server refuses connections for a reason no retry can fix.
    pub async fn warm_up(&self, timeout: Duration) -> WarmUp {
        // At most 365 days (a longer one waits that long, never overflows the clock).
        let timeout = timeout.min(pool_core::config::MAX_DURATION);
        let started = Instant::now();
        let state = self.state();
        let counts = self.inner().state();
        let in_use = counts.connections.saturating_sub(counts.idle_connections);
        let wanted = state.config().pool_size.saturating_sub(in_use);
        let connects_before = self.stats().connects;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut errors: Vec<String> = Vec::new();
        let mut held = Vec::new();
        // All our demand at once, so that the pool's connects open in parallel.
        let mut wanting: Vec<_> = (0..wanted).map(|_| self.demand().want()).collect();
        while held.len() < wanted as usize {
            let slice = (tokio::time::Instant::now() + Duration::from_millis(20)).min(deadline);
            let get = MODE.scope(Mode::Sweep, self.inner().get());
            match tokio::time::timeout_at(slice, get).await {
                Ok(Ok(conn)) => {
                    held.push(conn);
                    wanting.pop();
                }
                _ => {
                    if let Some(e) = state.health().last_error_since(started) {
                        WarmUp::record_error(&mut errors, e);
                    }
                    if state.health().fail_fast(started, None).is_some()
                        || tokio::time::Instant::now() >= deadline
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
