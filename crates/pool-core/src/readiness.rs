//! Readiness: whether a pool can serve now, for a readiness probe or a startup gate.
//!
//! An adapter's `pool.health()` answers with a [`Health`], in this order, never waiting
//! behind the pool's callers:
//!
//! 1. **Recent evidence, no round trip.** The server answered within the validation bypass
//!    window (a connection opened, pinged, or used and returned unbroken) and nothing spoke
//!    against it since (an invalidation, a failed connect: see
//!    [`PoolState::fresh_evidence`](crate::engine::PoolState::fresh_evidence)), and the pool
//!    is not saturated: [`HealthState::Ready`] from [`HealthSource::Evidence`].
//! 2. **One bounded check on an idle connection.** If a connection can be had at once (no
//!    caller waits before us, one is idle), it goes through a checkout's checks (the
//!    liveness probe; a dead one is closed and invalidates the pool, as at any checkout)
//!    and gets one ping bounded by `validation_timeout`.
//! 3. **One connect attempt**, if the pool holds no idle connection (or every idle one was
//!    dead), has room below its sizes, its budget has a permit free at once, and the server
//!    is not known to be down with the next attempt still in its backoff.
//! 4. Otherwise it answers from what it knows: saturated (every connection in use, or
//!    callers queued) is [`HealthState::Degraded`]; known down is
//!    [`HealthState::Unreachable`] with the last connect error's class and message.
//!
//! `warm_up(timeout)` opens up to `pool_size` connections for a startup gate and says what
//! it got in a [`WarmUp`].

use std::time::{Duration, Instant};

use crate::engine::PoolState;
use crate::stats::StatsSnapshot;

/// Whether a pool can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// The server answers and a checkout made now can be served.
    Ready,
    /// The server is not known to be down, but the pool cannot show it serves now: every
    /// connection is in use or callers are queued (saturated), the budget has no permit free
    /// for a check, or a check found a dead connection and nothing could replace it.
    Degraded,
    /// The server cannot be reached: the check or the connect attempt failed, or connects
    /// have been failing and the next attempt is not due yet.
    Unreachable,
}

impl HealthState {
    /// `ready`, `degraded` or `unreachable`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Ready => "ready",
            HealthState::Degraded => "degraded",
            HealthState::Unreachable => "unreachable",
        }
    }
}

/// Where a [`Health`] answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthSource {
    /// Recent evidence (the server answered within the bypass window): no round trip.
    Evidence,
    /// A check of a connection the pool held idle (the probe, and one bounded ping).
    IdleCheck,
    /// A connect attempt (the pool held no usable idle connection).
    Connect,
    /// The pool's stats and the server's known state, without touching the server (the pool
    /// is saturated, or no check may be made without waiting).
    Stats,
}

/// A pool's health, for a readiness probe: serializable (`to_json`), and never holding a
/// password (every message is redacted).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Health {
    /// The pool's name.
    pub pool: String,
    /// Ready, degraded or unreachable.
    pub state: HealthState,
    /// What the answer rests on.
    pub source: HealthSource,
    /// Whether this call talked to the server (a ping or a connect attempt).
    pub round_trip: bool,
    /// How long this call took, in milliseconds.
    pub latency_ms: f64,
    /// How long ago the server last answered, in milliseconds, when the answer rests on it.
    pub evidence_age_ms: Option<f64>,
    /// Connections this check found dead and closed (the pool was invalidated, as by a
    /// checkout that finds one).
    pub found_dead: u32,
    /// The class of the last error, when the state is not ready: `hopeless` or `transient`
    /// (a connect error, see [`ConnectClass`](crate::engine::ConnectClass)), `ping_failed`,
    /// `saturated`, `budget`, `no_connection`.
    pub error_class: Option<String>,
    /// The last error's message, redacted.
    pub error: Option<String>,
    /// The pool's numbers at the time of the answer.
    pub stats: HealthStats,
}

/// The part of a pool's stats a readiness probe shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthStats {
    /// Connections checked out.
    pub in_use: u32,
    /// Open connections idle in the pool.
    pub idle: u32,
    /// The most connections the pool may open (`pool_size + max_overflow`).
    pub total_possible: u32,
    /// Checkouts that can succeed now without waiting for a return.
    pub available: u32,
    /// Callers waiting for a connection, when the pool can tell.
    pub waiters: Option<u32>,
    /// Checkouts that gave up, over the pool's life.
    pub timeouts: u64,
    /// Failed connect attempts, over the pool's life.
    pub connect_failures: u64,
    /// Validation pings sent, over the pool's life.
    pub pings: u64,
}

impl From<&StatsSnapshot> for HealthStats {
    fn from(s: &StatsSnapshot) -> Self {
        HealthStats {
            in_use: s.in_use,
            idle: s.idle,
            total_possible: s.total_possible,
            available: s.available,
            waiters: s.waiters,
            timeouts: s.timeouts,
            connect_failures: s.connect_failures,
            pings: s.pings,
        }
    }
}

impl Health {
    /// Whether the pool is ready.
    pub fn is_ready(&self) -> bool {
        self.state == HealthState::Ready
    }

    /// The answer as pretty-printed JSON (the fields of [`Health`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pool {}: {} ({:?}, {}round trip, {:.1} ms)",
            self.pool,
            self.state.as_str(),
            self.source,
            if self.round_trip { "" } else { "no " },
            self.latency_ms
        )?;
        if let (Some(class), Some(error)) = (&self.error_class, &self.error) {
            write!(f, ": {class}: {error}")?;
        }
        Ok(())
    }
}

/// What an adapter's health check found, to be turned into a [`Health`] by
/// [`Check::answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Fresh evidence; nothing was checked.
    Evidence,
    /// An idle connection answered its ping.
    Answered,
    /// A connection was opened.
    Connected,
    /// The connect attempt failed with an error of this class (`hopeless`, `transient`),
    /// already redacted.
    ConnectFailed {
        /// `hopeless` or `transient`.
        class: &'static str,
        /// The driver's message, redacted.
        message: String,
    },
    /// Nothing could be checked without waiting: every connection in use or callers queued.
    Saturated,
    /// No idle connection, and no connect could be made at once: `why` (`budget`, or
    /// `no_connection` when the pool is at its sizes or the attempt timed out).
    NoCheck {
        /// The error class to report.
        class: &'static str,
        /// What kept the check from being made.
        message: String,
    },
}

/// A health check under way: its start, and what it has seen so far.
#[derive(Debug)]
pub struct Check {
    started: Instant,
    round_trip: bool,
    found_dead: u32,
    ping_error: Option<String>,
}

impl Check {
    /// A check starting now.
    pub fn start() -> Check {
        Check {
            started: Instant::now(),
            round_trip: false,
            found_dead: 0,
            ping_error: None,
        }
    }

    /// When the check started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The check talked to the server (a ping or a connect attempt).
    pub fn made_round_trip(&mut self) {
        self.round_trip = true;
    }

    /// The check found `n` connections dead (by the probe or a failed ping) and closed
    /// them; `error` is the last failed ping's message, if there was one (redacted).
    pub fn found_dead(&mut self, n: u32, error: Option<String>) {
        self.found_dead = self.found_dead.saturating_add(n);
        if error.is_some() {
            self.ping_error = error;
        }
    }

    /// Whether the pool's evidence answers without a round trip: fresh (see
    /// [`PoolState::fresh_evidence`]) within the bypass window, and the pool not saturated.
    pub fn evidence_suffices(pool: &PoolState, snapshot: &StatsSnapshot) -> bool {
        let window = pool.config().lifecycle.validation.bypass_window;
        let fresh = pool
            .fresh_evidence(Instant::now())
            .is_some_and(|age| age < window);
        fresh && !saturated(snapshot)
    }

    /// The answer, from what was found and the pool's `snapshot` taken after the check.
    pub fn answer(self, pool: &PoolState, finding: Finding, snapshot: &StatsSnapshot) -> Health {
        let evidence_age = pool.fresh_evidence(Instant::now());
        let (state, source, class, error) = match finding {
            Finding::Evidence => (HealthState::Ready, HealthSource::Evidence, None, None),
            Finding::Answered => (HealthState::Ready, HealthSource::IdleCheck, None, None),
            Finding::Connected => (HealthState::Ready, HealthSource::Connect, None, None),
            Finding::ConnectFailed { class, message } => (
                HealthState::Unreachable,
                HealthSource::Connect,
                Some(class.to_owned()),
                Some(message),
            ),
            Finding::Saturated | Finding::NoCheck { .. } if snapshot.server_down.is_some() => {
                let down = snapshot.server_down.as_ref();
                (
                    HealthState::Unreachable,
                    HealthSource::Stats,
                    down.map(|d| d.class.clone()),
                    down.map(|d| d.last_error.clone()),
                )
            }
            Finding::Saturated => (
                HealthState::Degraded,
                HealthSource::Stats,
                Some("saturated".to_owned()),
                Some(format!(
                    "every connection is in use or callers are queued ({}/{} in use, {} \
                     waiting); not checked, to wait behind nobody",
                    snapshot.in_use,
                    snapshot.total_possible,
                    snapshot.waiters.unwrap_or(0)
                )),
            ),
            Finding::NoCheck { class, message } => {
                let message = match &self.ping_error {
                    Some(ping) => format!("{message}; last failed ping: {ping}"),
                    None => message,
                };
                (
                    HealthState::Degraded,
                    HealthSource::Stats,
                    Some(class.to_owned()),
                    Some(message),
                )
            }
        };
        Health {
            pool: pool.name().to_owned(),
            state,
            source,
            round_trip: self.round_trip,
            latency_ms: millis(self.started.elapsed()),
            evidence_age_ms: match source {
                HealthSource::Evidence | HealthSource::Stats => evidence_age.map(millis),
                _ => None,
            },
            found_dead: self.found_dead,
            error_class: class,
            error: error.map(|e| pool.redact(&e)),
            stats: HealthStats::from(snapshot),
        }
    }
}

/// The health of a class-pool set (`ClassPools::health()`): one [`Health`] per class, in
/// declaration order. The classes share one server and one budget but not their sizes: a
/// class saturated by its own work is degraded while another, with a reserved floor, is
/// ready. A readiness probe that guards one kind of work asks for that class
/// ([`ClassesHealth::class`]); [`ClassesHealth::state`] is the whole set's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClassesHealth {
    /// The set's state: unreachable if any class found the server unreachable, ready if every
    /// class is ready, degraded otherwise.
    pub state: HealthState,
    /// Each class's answer (its `pool` field is the class's pool name).
    pub classes: Vec<(String, Health)>,
}

impl ClassesHealth {
    /// The set's health from each class's (name, answer), in declaration order.
    pub fn new(classes: Vec<(String, Health)>) -> ClassesHealth {
        let states = || classes.iter().map(|(_, h)| h.state);
        let state = if states().any(|s| s == HealthState::Unreachable) {
            HealthState::Unreachable
        } else if states().all(|s| s == HealthState::Ready) {
            HealthState::Ready
        } else {
            HealthState::Degraded
        };
        ClassesHealth { state, classes }
    }

    /// Whether every class is ready.
    pub fn is_ready(&self) -> bool {
        self.state == HealthState::Ready
    }

    /// The answer of class `name`, if there is such a class.
    pub fn class(&self, name: &str) -> Option<&Health> {
        self.classes.iter().find(|(n, _)| n == name).map(|(_, h)| h)
    }

    /// The answer as pretty-printed JSON (the fields of [`ClassesHealth`]).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()))
    }
}

impl std::fmt::Display for ClassesHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "classes: {}", self.state.as_str())?;
        for (name, h) in &self.classes {
            write!(f, "\n  {name}: {h}")?;
        }
        Ok(())
    }
}

/// Whether a checkout made now would queue: nothing available, or callers already waiting.
pub fn saturated(snapshot: &StatsSnapshot) -> bool {
    snapshot.available == 0 || (snapshot.idle == 0 && snapshot.waiters.unwrap_or(0) > 0)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `pool.warm_up(timeout)` got: for a startup gate (`opened + already_idle` against
/// `wanted`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WarmUp {
    /// The pool's name.
    pub pool: String,
    /// How many idle connections it aimed for: `pool_size` (at most the connections free
    /// to open within the sizes).
    pub wanted: u32,
    /// Connections opened by this call.
    pub opened: u32,
    /// Connections that were already open and idle.
    pub already_idle: u32,
    /// Connect errors seen during the call (redacted, the last few).
    pub errors: Vec<String>,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

impl WarmUp {
    /// The most connect errors a warm-up keeps (the last ones, each once in a row).
    pub const MAX_ERRORS: usize = 5;

    /// Keeps `error` (already redacted) unless it repeats the last one, dropping the oldest
    /// past [`WarmUp::MAX_ERRORS`]: what both adapters' `warm_up` record per failed wait.
    pub fn record_error(errors: &mut Vec<String>, error: String) {
        if errors.last() == Some(&error) {
            return;
        }
        if errors.len() == Self::MAX_ERRORS {
            errors.remove(0);
        }
        errors.push(error);
    }

    /// The report of a warm-up of `pool` that held `got` connections, `connects` of them
    /// opened by it (the pool's connect count moved that much; capped at `got`).
    pub fn finish(
        pool: &str,
        wanted: u32,
        got: u32,
        connects: u64,
        errors: Vec<String>,
        started: std::time::Instant,
    ) -> WarmUp {
        let opened = u32::try_from(connects).unwrap_or(u32::MAX).min(got);
        WarmUp {
            pool: pool.to_owned(),
            wanted,
            opened,
            already_idle: got - opened,
            errors,
            took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Whether the pool holds what it aimed for.
    pub fn complete(&self) -> bool {
        self.opened.saturating_add(self.already_idle) >= self.wanted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::PoolConfig;
    use crate::engine::{ConnState, ConnectClass};
    use crate::events::PoolEvent;
    use std::sync::Arc;

    #[test]
    fn a_warm_up_keeps_the_last_distinct_errors_and_counts_what_it_opened() {
        let mut errors = Vec::new();
        for e in ["a", "a", "b", "c", "d", "e", "f", "f"] {
            WarmUp::record_error(&mut errors, e.to_owned());
        }
        assert_eq!(errors, ["b", "c", "d", "e", "f"]);
        let w = WarmUp::finish("p", 3, 3, 2, errors, std::time::Instant::now());
        assert_eq!((w.opened, w.already_idle), (2, 1));
        assert!(w.complete());
        let w = WarmUp::finish("p", 3, 1, 9, Vec::new(), std::time::Instant::now());
        assert_eq!(
            (w.opened, w.already_idle),
            (1, 0),
            "capped at what it holds"
        );
        assert!(!w.complete());
    }

    fn health(state: HealthState) -> Health {
        Health {
            pool: "p".into(),
            state,
            source: HealthSource::Stats,
            round_trip: false,
            latency_ms: 0.0,
            evidence_age_ms: None,
            found_dead: 0,
            error_class: None,
            error: None,
            stats: HealthStats::default(),
        }
    }

    #[test]
    fn a_set_is_ready_when_every_class_is_and_unreachable_when_any_is() {
        use HealthState::*;
        let set = |states: &[HealthState]| {
            ClassesHealth::new(
                states
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("c{i}"), health(*s)))
                    .collect(),
            )
        };
        assert_eq!(set(&[Ready, Ready]).state, Ready);
        assert!(set(&[Ready, Ready]).is_ready());
        assert_eq!(set(&[Ready, Degraded]).state, Degraded);
        assert!(!set(&[Ready, Degraded]).is_ready());
        assert_eq!(set(&[Degraded, Unreachable, Ready]).state, Unreachable);
        let s = set(&[Degraded, Ready]);
        assert_eq!(s.class("c1").map(|h| h.state), Some(Ready));
        assert!(s.class("nope").is_none());
        let json: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(json["state"], "degraded");
        assert!(s.to_string().contains("c1: pool p: ready"), "{s}");
    }

    fn pool() -> Arc<PoolState> {
        let config = PoolConfig::builder("postgres://app:S3NT1NEL@db/app")
            .pool_size(2)
            .max_overflow(0)
            .build()
            .unwrap();
        Arc::new(PoolState::new(config, Arc::new(|_: &PoolEvent<'_>| {}), None).unwrap())
    }

    #[test]
    fn evidence_is_fresh_after_a_connect_and_stale_after_an_invalidation_or_a_failed_connect() {
        let p = pool();
        assert_eq!(p.fresh_evidence(Instant::now()), None, "nothing seen yet");
        let c = ConnState::opened(&p, Duration::ZERO, None);
        assert!(p.fresh_evidence(Instant::now()).is_some());
        assert!(Check::evidence_suffices(&p, &p.snapshot(0, 1)));
        p.invalidate("a disconnect");
        assert_eq!(p.fresh_evidence(Instant::now()), None);
        assert!(!Check::evidence_suffices(&p, &p.snapshot(0, 1)));
        p.server_answered(Instant::now());
        assert!(p.fresh_evidence(Instant::now()).is_some());
        p.connect_failed(ConnectClass::Transient, "refused");
        assert_eq!(p.fresh_evidence(Instant::now()), None);
        drop(c);
    }

    #[test]
    fn a_checkin_after_use_is_evidence_and_a_broken_one_is_not() {
        let p = pool();
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        p.invalidate("make the connect stale");
        c.handed_out(Instant::now(), None);
        assert!(c.checkin(true).is_some(), "dirty: closed");
        assert_eq!(p.fresh_evidence(Instant::now()), None);
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        p.invalidate("make the connect stale");
        c.handed_out(Instant::now(), None);
        assert_eq!(c.checkin(false), None);
        assert!(p.fresh_evidence(Instant::now()).is_some());
    }

    #[test]
    fn evidence_does_not_suffice_for_a_saturated_pool() {
        let p = pool();
        let _c = ConnState::opened(&p, Duration::ZERO, None);
        let snap = p.snapshot(2, 0);
        assert!(saturated(&snap));
        assert!(!Check::evidence_suffices(&p, &snap));
        let h = Check::start().answer(&p, Finding::Saturated, &snap);
        assert_eq!(h.state, HealthState::Degraded);
        assert_eq!(h.error_class.as_deref(), Some("saturated"));
        assert!(!h.round_trip);
    }

    #[test]
    fn answers_map_to_states_and_never_show_the_password() {
        let p = pool();
        let snap = p.snapshot(0, 0);
        let mut check = Check::start();
        check.made_round_trip();
        let h = check.answer(
            &p,
            Finding::ConnectFailed {
                class: "transient",
                message: "could not connect to postgres://app:S3NT1NEL@db/app: refused".into(),
            },
            &snap,
        );
        assert_eq!(h.state, HealthState::Unreachable);
        assert_eq!(h.source, HealthSource::Connect);
        assert!(h.round_trip);
        let json = h.to_json();
        assert!(!json.contains("S3NT1NEL"), "{json}");
        assert!(json.contains("\"state\": \"unreachable\""), "{json}");
        let back: Health = serde_json::from_str(&json).unwrap();
        // Floats may come back a last digit off (serde_json without float_roundtrip).
        assert!((back.latency_ms - h.latency_ms).abs() < 1e-6);
        assert_eq!(
            Health {
                latency_ms: h.latency_ms,
                ..back
            },
            h
        );
        assert!(!h.to_string().contains("S3NT1NEL"));

        let h = Check::start().answer(&p, Finding::Answered, &snap);
        assert!(h.is_ready());
        // Known down: a saturated pool answers unreachable, with the connect error's class.
        p.connect_failed(ConnectClass::Hopeless, "password authentication failed");
        let h = Check::start().answer(&p, Finding::Saturated, &p.snapshot(2, 0));
        assert_eq!(h.state, HealthState::Unreachable);
        assert_eq!(h.error_class.as_deref(), Some("hopeless"));
    }

    #[test]
    fn a_pool_is_saturated_when_nothing_is_available_or_callers_queue_with_nothing_idle() {
        let p = pool();
        let snap = |available: u32, idle: u32, waiters: Option<u32>| StatsSnapshot {
            available,
            idle,
            waiters,
            ..p.snapshot(0, 0)
        };
        assert!(saturated(&snap(0, 0, Some(0))), "nothing available");
        assert!(saturated(&snap(0, 2, None)), "nothing available");
        assert!(
            saturated(&snap(1, 0, Some(1))),
            "a caller queues, nothing idle"
        );
        assert!(
            !saturated(&snap(1, 1, Some(1))),
            "an idle connection serves at once"
        );
        assert!(
            !saturated(&snap(1, 0, Some(0))),
            "room to open one, nobody queued"
        );
        assert!(
            !saturated(&snap(1, 0, None)),
            "waiters unknown: room to open one"
        );
    }

    #[test]
    fn an_answer_carries_the_pools_numbers_the_checks_findings_and_the_evidences_age() {
        let p = pool();
        let c = ConnState::opened(&p, Duration::ZERO, None);
        std::thread::sleep(Duration::from_millis(30));
        let mut snap = p.snapshot(1, 1);
        snap.available = 3;
        snap.waiters = Some(4);
        snap.timeouts = 5;
        snap.connect_failures = 6;
        snap.pings = 7;
        let mut check = Check::start();
        check.found_dead(2, Some("ping: timed out".into()));
        check.found_dead(1, None);
        let h = check.answer(
            &p,
            Finding::NoCheck {
                class: "budget",
                message: "no permit free".into(),
            },
            &snap,
        );
        assert_eq!(
            (h.state, h.source),
            (HealthState::Degraded, HealthSource::Stats)
        );
        assert!(!h.is_ready());
        assert_eq!(h.found_dead, 3);
        assert_eq!(
            h.error.as_deref(),
            Some("no permit free; last failed ping: ping: timed out")
        );
        assert_eq!(
            h.stats,
            HealthStats {
                in_use: 1,
                idle: 1,
                total_possible: 2,
                available: 3,
                waiters: Some(4),
                timeouts: 5,
                connect_failures: 6,
                pings: 7,
            }
        );
        // In milliseconds: the connect was at least 30 ms ago, and not minutes.
        let age = h
            .evidence_age_ms
            .expect("a stats answer shows the evidence's age");
        assert!((30.0..60_000.0).contains(&age), "{age}");
        assert!((0.0..60_000.0).contains(&h.latency_ms), "{}", h.latency_ms);
        let h = Check::start().answer(&p, Finding::Evidence, &snap);
        assert!(h.evidence_age_ms.is_some_and(|a| a >= 30.0), "{h:?}");
        // An answer that rests on a round trip shows no evidence age.
        let h = Check::start().answer(&p, Finding::Answered, &snap);
        assert_eq!(h.evidence_age_ms, None);
        drop(c);
    }

    #[test]
    fn durations_are_shown_in_milliseconds() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500.0);
        assert_eq!(millis(Duration::from_micros(250)), 0.25);
        assert_eq!(millis(Duration::ZERO), 0.0);
    }

    #[test]
    fn a_checks_latency_is_in_milliseconds() {
        let p = pool();
        let check = Check::start();
        std::thread::sleep(Duration::from_millis(20));
        let h = check.answer(&p, Finding::Connected, &p.snapshot(0, 0));
        assert!((20.0..60_000.0).contains(&h.latency_ms), "{}", h.latency_ms);
    }

    #[test]
    fn a_warm_up_is_complete_when_opened_and_idle_reach_what_it_wanted() {
        let w = WarmUp {
            pool: "p".into(),
            wanted: 3,
            opened: 1,
            already_idle: 2,
            errors: vec![],
            took_ms: 1,
        };
        assert!(w.complete());
        assert!(!WarmUp { opened: 0, ..w }.complete());
    }
}
