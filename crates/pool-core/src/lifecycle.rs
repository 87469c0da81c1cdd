//! The lifecycle policy: when a pooled connection is trusted, checked, or retired.
//!
//! One struct, [`LifecyclePolicy`], shared by the sync and async adapters. The adapters ask
//! [`LifecyclePolicy::on_checkout`] what to do with an idle connection before handing it out;
//! the decision is pure (no I/O), so it is unit-tested here and identical for every backend.
//!
//! Validation happens in two tiers:
//! 1. a zero-round-trip liveness probe on every checkout (the adapter looks at the socket:
//!    a server that terminated the session has already sent its FATAL message and closed);
//! 2. a full ping (a round trip) only when the connection sat idle longer than the
//!    [`ValidationPolicy::bypass_window`], when the pool was invalidated after the connection
//!    was last validated, or when the probe could not tell.

use std::time::{Duration, Instant};

/// Validation on checkout.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ValidationPolicy {
    /// Validate connections on checkout at all. Default: `true`.
    pub on_checkout: bool,
    /// A connection used less than this long ago skips the full ping (the liveness probe
    /// still runs). HikariCP uses 500 ms. Default: 500 ms.
    pub bypass_window: Duration,
    /// The longest a full ping may take; a ping that takes longer fails and the connection is
    /// discarded, even when the server hangs. Default: 5 s.
    pub timeout: Duration,
    /// Run the zero-round-trip liveness probe on every checkout. Off, every checkout pings
    /// when `on_checkout` is on (as a plain pool testing on checkout does). Default: `true`.
    pub probe: bool,
    /// Hedge a slow validation ping with a fresh connect (within the pool's sizes and
    /// budget): whichever is ready first is handed out. Default: `true`.
    pub hedge: bool,
}

impl Default for ValidationPolicy {
    fn default() -> Self {
        ValidationPolicy {
            on_checkout: true,
            bypass_window: Duration::from_millis(500),
            timeout: Duration::from_secs(5),
            probe: true,
            hedge: true,
        }
    }
}

/// How long connections live, how they are checked, and when they are reported as leaked.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LifecyclePolicy {
    /// Validation on checkout. See [`ValidationPolicy`].
    pub validation: ValidationPolicy,
    /// Retire a connection after it has lived this long (SQLAlchemy's `pool_recycle`).
    /// `None` keeps connections forever. Default: 30 minutes.
    pub max_lifetime: Option<Duration>,
    /// Spread of the lifetime: each connection's lifetime is drawn uniformly from
    /// `[max_lifetime * (1 - jitter), max_lifetime]`, so a pool of 50 does not reconnect in the
    /// same second. A fraction in `[0, 1)`. Default: `0.1`.
    pub lifetime_jitter: f64,
    /// Close a connection that sat idle this long (the pool keeps `pool_size` connections
    /// open; overflow connections go first). `None` never closes idle connections.
    /// Default: 10 minutes.
    pub idle_timeout: Option<Duration>,
    /// Ping idle connections this often so that NATs and proxies do not drop them
    /// (HikariCP's `keepaliveTime`). `None` disables it. Default: `None`.
    pub keepalive_ping: Option<Duration>,
    /// Report (once, with the place it was checked out) a connection held longer than this.
    /// `None` disables leak detection. Default: `None`.
    pub leak_detection_threshold: Option<Duration>,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        LifecyclePolicy {
            validation: ValidationPolicy::default(),
            max_lifetime: Some(Duration::from_secs(30 * 60)),
            lifetime_jitter: 0.1,
            idle_timeout: Some(Duration::from_secs(10 * 60)),
            keepalive_ping: None,
            leak_detection_threshold: None,
        }
    }
}

impl LifecyclePolicy {
    /// Checks the policy's values; the adapters call it when a pool is built.
    pub fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
        if !(0.0..1.0).contains(&self.lifetime_jitter) || self.lifetime_jitter.is_nan() {
            return Err(ConfigError::Invalid {
                setting: "lifetime_jitter",
                reason: format!(
                    "{} is not a fraction in [0, 1); use e.g. 0.1 to spread lifetimes over 10%",
                    self.lifetime_jitter
                ),
            });
        }
        if self.validation.timeout.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "validation_timeout",
                reason: "must be longer than zero (a ping needs a round trip)".into(),
            });
        }
        for (setting, value) in [
            ("max_lifetime", self.max_lifetime),
            ("idle_timeout", self.idle_timeout),
            ("keepalive_ping", self.keepalive_ping),
            ("leak_detection_threshold", self.leak_detection_threshold),
        ] {
            if value.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: "must be longer than zero; leave it unset to disable it".into(),
                });
            }
        }
        Ok(())
    }

    /// The state of a connection opened now, when the pool's invalidation epoch is `epoch`.
    /// Draws the connection's lifetime (see [`LifecyclePolicy::lifetime_jitter`]).
    pub fn new_connection(&self, now: Instant, epoch: u64) -> ConnectionState {
        let expires_at = self.max_lifetime.map(|max| {
            let jitter = if self.lifetime_jitter > 0.0 {
                rand::random::<f64>() * self.lifetime_jitter
            } else {
                0.0
            };
            now + max.mul_f64(1.0 - jitter)
        });
        ConnectionState {
            created_at: now,
            expires_at,
            last_used: now,
            last_validated: now,
            validated_epoch: epoch,
            broken: false,
        }
    }

    /// What to do with an idle connection about to be handed out.
    ///
    /// `epoch` is the pool's current invalidation epoch and `probe` what the zero-round-trip
    /// liveness probe saw. A dead or expired connection is discarded; a full ping is asked
    /// for when the connection was idle longer than the bypass window, when the pool was
    /// invalidated since it was last validated, or when the probe could not tell or was not
    /// available.
    pub fn on_checkout(
        &self,
        state: &ConnectionState,
        now: Instant,
        epoch: u64,
        probe: ProbeResult,
    ) -> CheckoutAction {
        self.on_checkout_probing(state, now, epoch, || probe)
    }

    /// [`LifecyclePolicy::on_checkout`], running `probe` only when the answer depends on it
    /// (not for a connection retired anyway as broken, expired or idle too long).
    pub fn on_checkout_probing(
        &self,
        state: &ConnectionState,
        now: Instant,
        epoch: u64,
        probe: impl FnOnce() -> ProbeResult,
    ) -> CheckoutAction {
        if state.broken {
            return CheckoutAction::Discard(CloseReason::Broken);
        }
        if state.expires_at.is_some_and(|at| at <= now) {
            return CheckoutAction::Discard(CloseReason::Expired);
        }
        if self
            .idle_timeout
            .is_some_and(|t| now.saturating_duration_since(state.last_used) >= t)
        {
            return CheckoutAction::Discard(CloseReason::IdleTimeout);
        }
        let probe = probe();
        if probe == ProbeResult::Dead {
            return CheckoutAction::Discard(CloseReason::ProbeDead);
        }
        if !self.validation.on_checkout {
            return CheckoutAction::Reuse;
        }
        let stale_epoch = state.validated_epoch < epoch;
        let last_known_good = state.last_used.max(state.last_validated);
        let idle_long =
            now.saturating_duration_since(last_known_good) >= self.validation.bypass_window;
        // Without a probe (the socket could not be identified) every checkout is pinged, as a
        // plain pool with `test_on_check_out` does: nothing else would notice a dead socket.
        let unclear = matches!(probe, ProbeResult::Unknown | ProbeResult::Unavailable);
        if stale_epoch || idle_long || unclear {
            CheckoutAction::Ping
        } else {
            CheckoutAction::Reuse
        }
    }

    /// Whether a connection coming back to the pool should be closed instead of kept.
    pub fn on_checkin(&self, state: &ConnectionState, now: Instant) -> Option<CloseReason> {
        if state.broken {
            Some(CloseReason::Broken)
        } else if state.expires_at.is_some_and(|at| at <= now) {
            Some(CloseReason::Expired)
        } else {
            None
        }
    }
}

pub use crate::stats::CloseReason;

/// Lifecycle state of one pooled connection, kept by the adapter next to the connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ConnectionState {
    /// When the connection was opened.
    pub created_at: Instant,
    /// When it must be retired (its jittered max lifetime), if ever.
    pub expires_at: Option<Instant>,
    /// When it was last handed back to the pool (or opened). The idle timeout counts from
    /// here.
    pub last_used: Instant,
    /// When a ping last succeeded on it (or it was opened). The bypass window counts from
    /// the later of this and `last_used`: a keepalive ping vouches for a connection as much
    /// as a recent use, but does not make it less idle.
    pub last_validated: Instant,
    /// The pool's invalidation epoch when the connection was last known good.
    pub validated_epoch: u64,
    /// It saw a connection-class error and must never be reused.
    pub broken: bool,
}

/// What the zero-round-trip liveness probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// The connection is open and nothing is pending.
    Alive,
    /// The server closed or reset the connection.
    Dead,
    /// Something is pending that only a round trip can interpret.
    Unknown,
    /// No probe is possible for this connection (embedded database, or socket unknown).
    Unavailable,
}

/// The decision of [`LifecyclePolicy::on_checkout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutAction {
    /// Hand the connection out as it is.
    Reuse,
    /// Ping it first (a round trip bounded by the validation timeout).
    Ping,
    /// Close it; the pool takes another one.
    Discard(CloseReason),
}

/// The pool-wide invalidation epoch: once a disconnect is seen, every connection validated
/// before it is pinged again before its next use (a server restart kills them all at once).
#[derive(Debug, Default)]
pub struct Epoch(std::sync::atomic::AtomicU64);

impl Epoch {
    /// The current epoch.
    pub fn current(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Invalidates every connection validated so far; returns the new epoch.
    pub fn bump(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LifecyclePolicy {
        LifecyclePolicy::default()
    }

    #[test]
    fn a_hot_connection_inside_the_bypass_window_is_reused_without_a_ping() {
        let p = policy();
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        let at = now + Duration::from_millis(100);
        assert_eq!(
            p.on_checkout(&st, at, 0, ProbeResult::Alive),
            CheckoutAction::Reuse
        );
    }

    #[test]
    fn a_connection_idle_past_the_bypass_window_is_pinged() {
        let p = policy();
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        let at = now + Duration::from_millis(600);
        assert_eq!(
            p.on_checkout(&st, at, 0, ProbeResult::Alive),
            CheckoutAction::Ping
        );
        assert_eq!(
            p.on_checkout(&st, at, 0, ProbeResult::Unavailable),
            CheckoutAction::Ping
        );
    }

    #[test]
    fn a_dead_probe_discards_even_a_hot_connection() {
        let p = policy();
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        assert_eq!(
            p.on_checkout(&st, now, 0, ProbeResult::Dead),
            CheckoutAction::Discard(CloseReason::ProbeDead)
        );
    }

    #[test]
    fn an_unclear_probe_or_an_invalidated_pool_forces_a_ping() {
        let p = policy();
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        assert_eq!(
            p.on_checkout(&st, now, 0, ProbeResult::Unknown),
            CheckoutAction::Ping
        );
        assert_eq!(
            p.on_checkout(&st, now, 1, ProbeResult::Alive),
            CheckoutAction::Ping
        );
        assert_eq!(
            p.on_checkout(&st, now, 0, ProbeResult::Unavailable),
            CheckoutAction::Ping,
            "no probe: a hot connection is pinged too"
        );
    }

    #[test]
    fn lifetimes_are_jittered_within_bounds() {
        let mut p = policy();
        p.max_lifetime = Some(Duration::from_secs(100));
        p.lifetime_jitter = 0.2;
        let now = Instant::now();
        let lifetimes: Vec<Duration> = (0..200)
            .map(|_| p.new_connection(now, 0).expires_at.unwrap() - now)
            .collect();
        assert!(lifetimes
            .iter()
            .all(|l| *l >= Duration::from_secs(80) && *l <= Duration::from_secs(100)));
        let distinct: std::collections::HashSet<_> = lifetimes.iter().collect();
        assert!(distinct.len() > 100, "lifetimes must differ");
    }

    #[test]
    fn expired_and_idle_connections_are_discarded() {
        let mut p = policy();
        p.max_lifetime = Some(Duration::from_secs(10));
        p.lifetime_jitter = 0.0;
        p.idle_timeout = Some(Duration::from_secs(5));
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        assert_eq!(
            p.on_checkout(&st, now + Duration::from_secs(6), 0, ProbeResult::Alive),
            CheckoutAction::Discard(CloseReason::IdleTimeout)
        );
        let mut used = st.clone();
        used.last_used = now + Duration::from_secs(9);
        assert_eq!(
            p.on_checkout(&used, now + Duration::from_secs(10), 0, ProbeResult::Alive),
            CheckoutAction::Discard(CloseReason::Expired)
        );
        assert_eq!(
            p.on_checkin(&used, now + Duration::from_secs(11)),
            Some(CloseReason::Expired)
        );
    }

    #[test]
    fn validation_off_still_honours_the_probe() {
        let mut p = policy();
        p.validation.on_checkout = false;
        let now = Instant::now();
        let st = p.new_connection(now, 0);
        let later = now + Duration::from_secs(1);
        assert_eq!(
            p.on_checkout(&st, later, 3, ProbeResult::Alive),
            CheckoutAction::Reuse
        );
        assert_eq!(
            p.on_checkout(&st, later, 3, ProbeResult::Dead),
            CheckoutAction::Discard(CloseReason::ProbeDead)
        );
    }

    #[test]
    fn epochs_only_grow() {
        let e = Epoch::default();
        assert_eq!(e.current(), 0);
        assert_eq!(e.bump(), 1);
        assert_eq!(e.current(), 1);
    }

    #[test]
    fn bad_jitter_and_zero_durations_are_rejected() {
        let mut p = policy();
        p.lifetime_jitter = 1.5;
        assert!(p.validate().is_err());
        let mut p = policy();
        p.idle_timeout = Some(Duration::ZERO);
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout"));
        assert!(policy().validate().is_ok());
    }
}
