//! The retry policy and the retry loop shared by every adapter.
//!
//! A [`RetryPolicy`] says how often and how patiently to rerun an operation that failed with a
//! transient error ([`ErrorClass::is_transient`]); [`run_sync`] and [`run_async`] are the loop.
//! The loop knows nothing of connections or transactions: each attempt is a closure that
//! returns either a value or an [`AttemptError`] saying what went wrong, and the adapters
//! (`diesel_r2d2_ext::retry`, `diesel_async_ext::retry`) build `with_retry` and
//! `commit_with_retry` on top. What resolving an ambiguous commit takes besides the server's
//! answer is here too: the deadline and pause bookkeeping ([`Resolution`]), the reading of
//! `txid_status()` ([`TxStatus`]), the outcome ([`finish_ambiguous`]) and the SQL ([`sql`]).
//!
//! Delays follow an exponential schedule built with
//! [`backon::ExponentialBuilder`] (`base`, `2 * base`, `4 * base`, ...,
//! capped at `max_delay`) with **full jitter**: each wait is drawn uniformly from
//! `[0, scheduled delay]`, so that many clients failing together (a restart, a hot row) do not
//! come back together. A seed makes the draws repeatable in tests.
//!
//! ```
//! use std::time::Duration;
//! use pool_core::classify::ErrorClass;
//! use pool_core::retry::{run_sync, AttemptError, RetryHooks, RetryPolicy};
//!
//! let policy = RetryPolicy::builder()
//!     .max_attempts(4)
//!     .base_delay(Duration::from_millis(1))
//!     .seed(7)
//!     .build()?;
//! let mut calls = 0;
//! let result = run_sync(
//!     &policy,
//!     &RetryHooks::default(),
//!     |e: &&str| if *e == "deadlock detected" { ErrorClass::Deadlock } else { ErrorClass::Permanent },
//!     |_attempt| {
//!         calls += 1;
//!         if calls < 3 { Err(AttemptError::Op("deadlock detected")) } else { Ok(calls) }
//!     },
//! );
//! assert_eq!(result.unwrap(), 3);
//! # Ok::<(), pool_core::retry::PolicyError>(())
//! ```

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::classify::ErrorClass;
use crate::events::{EventListener, LogListener, PoolEvent};
use crate::redact::redact;
use crate::stats::PoolStats;

mod commit;

pub use commit::{
    check_idempotency_key, finish_ambiguous, log_abandoned_ended, no_txid_reason,
    other_server_reason, sql, xid_of, Asked, IdempotencyTable, Keyed, Resolution, Resolved, Step,
    TxStatus, IDEMPOTENCY_TABLE_SQL, MAX_IDEMPOTENCY_KEY_CHARS,
};

/// How to retry: attempts, time limit, backoff, and whether commits are verified.
///
/// | setting | default |
/// |---|---|
/// | `max_attempts` | 5 (the first try included) |
/// | `max_elapsed` | 30 s (no new attempt starts after it) |
/// | `base_delay` | 25 ms |
/// | `max_delay` | 2 s |
/// | `retry_pool_timeout` | true |
/// | `verify_commit` | true (PostgreSQL: one `txid_current()` per transaction) |
/// | `commit_resolution_timeout` | 10 s |
/// | `idempotency_table` | `resilient_diesel_idempotency_keys` (see [`IdempotencyTable`]) |
/// | `seed` | none (random) |
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_elapsed: Option<Duration>,
    base_delay: Duration,
    max_delay: Duration,
    retry_pool_timeout: bool,
    verify_commit: bool,
    commit_resolution_timeout: Duration,
    idempotency_table: IdempotencyTable,
    seed: Option<u64>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            max_elapsed: Some(Duration::from_secs(30)),
            base_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(2),
            retry_pool_timeout: true,
            verify_commit: true,
            commit_resolution_timeout: Duration::from_secs(10),
            idempotency_table: IdempotencyTable::default(),
            seed: None,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            table: None,
            policy: RetryPolicy::default(),
        }
    }

    /// A policy that tries once: no retries. Useful as a control in tests and benchmarks.
    pub fn no_retry() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Attempts in all, the first one included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// No attempt starts after this much time since the first one.
    pub fn max_elapsed(&self) -> Option<Duration> {
        self.max_elapsed
    }

    /// The first scheduled delay.
    pub fn base_delay(&self) -> Duration {
        self.base_delay
    }

    /// The largest scheduled delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Whether a pool checkout timeout is retried.
    pub fn retry_pool_timeout(&self) -> bool {
        self.retry_pool_timeout
    }

    /// Whether commits are verified, so that a connection lost during `COMMIT` can be resolved
    /// instead of reported as ambiguous.
    pub fn verify_commit(&self) -> bool {
        self.verify_commit
    }

    /// How long an ambiguous commit may take to resolve (reconnecting and asking the server).
    pub fn commit_resolution_timeout(&self) -> Duration {
        self.commit_resolution_timeout
    }

    /// The jitter seed, if fixed.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// The table `commit_with_key` records its keys in.
    pub fn idempotency_table(&self) -> &IdempotencyTable {
        &self.idempotency_table
    }

    /// Whether an error of `class` may be retried under this policy.
    pub fn retries(&self, class: ErrorClass) -> bool {
        match class {
            ErrorClass::PoolTimeout => self.retry_pool_timeout,
            c => c.is_transient(),
        }
    }

    /// The delays this policy would wait between attempts, jitter applied (for tests, docs
    /// and planning). Has `max_attempts - 1` items.
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        Schedule::new(self)
    }
}

/// Builder of a [`RetryPolicy`]; [`build`](Self::build) rejects impossible values.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .build() is called"]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
    /// A table name given to [`RetryPolicyBuilder::idempotency_table`], checked by `build`.
    table: Option<String>,
}

impl RetryPolicyBuilder {
    /// Attempts in all, the first included; at least 1. Default: 5.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.policy.max_attempts = n;
        self
    }

    /// Stop starting attempts after this long; `None` for no limit. Default: 30 s.
    pub fn max_elapsed(mut self, limit: Option<Duration>) -> Self {
        self.policy.max_elapsed = limit;
        self
    }

    /// First scheduled delay; above zero. Default: 25 ms.
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.policy.base_delay = d;
        self
    }

    /// Cap on the scheduled delay; at least `base_delay`. Default: 2 s.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.policy.max_delay = d;
        self
    }

    /// Whether a pool checkout timeout is retried. Default: true.
    pub fn retry_pool_timeout(mut self, yes: bool) -> Self {
        self.policy.retry_pool_timeout = yes;
        self
    }

    /// Verify commits (PostgreSQL reads `txid_current()` in each transaction). Default: true.
    pub fn verify_commit(mut self, yes: bool) -> Self {
        self.policy.verify_commit = yes;
        self
    }

    /// How long an ambiguous commit may take to resolve; above zero. Default: 10 s.
    pub fn commit_resolution_timeout(mut self, d: Duration) -> Self {
        self.policy.commit_resolution_timeout = d;
        self
    }

    /// Fix the jitter's random seed, for repeatable tests. Default: random.
    pub fn seed(mut self, seed: u64) -> Self {
        self.policy.seed = Some(seed);
        self
    }

    /// The table `commit_with_key` records its keys in (`table` or `schema.table`; see
    /// [`IdempotencyTable`]), instead of `resilient_diesel_idempotency_keys`.
    pub fn idempotency_table(mut self, name: &str) -> Self {
        self.table = Some(name.to_owned());
        self
    }

    /// Checks the values and returns the policy.
    pub fn build(self) -> Result<RetryPolicy, PolicyError> {
        let mut p = self.policy;
        if let Some(name) = &self.table {
            p.idempotency_table = IdempotencyTable::new(name).map_err(|problem| PolicyError {
                setting: "idempotency_table",
                problem,
            })?;
        }
        if p.max_attempts == 0 {
            return Err(PolicyError {
                setting: "max_attempts",
                problem: "must be at least 1 (1 means: no retries)".into(),
            });
        }
        if p.max_attempts > 1000 {
            return Err(PolicyError {
                setting: "max_attempts",
                problem: format!("{} is more than the limit of 1000", p.max_attempts),
            });
        }
        if p.base_delay.is_zero() {
            return Err(PolicyError {
                setting: "base_delay",
                problem: "must be above zero, or every retry would hit the server at once".into(),
            });
        }
        if p.max_delay < p.base_delay {
            return Err(PolicyError {
                setting: "max_delay",
                problem: format!("{:?} is below base_delay ({:?})", p.max_delay, p.base_delay),
            });
        }
        if p.max_delay > Duration::from_secs(3600) {
            return Err(PolicyError {
                setting: "max_delay",
                problem: format!("{:?} is more than the limit of one hour", p.max_delay),
            });
        }
        if p.max_elapsed.is_some_and(|d| d.is_zero()) {
            return Err(PolicyError {
                setting: "max_elapsed",
                problem: "must be above zero (use None for no limit)".into(),
            });
        }
        if p.commit_resolution_timeout.is_zero() {
            return Err(PolicyError {
                setting: "commit_resolution_timeout",
                problem: "must be above zero".into(),
            });
        }
        let max = crate::config::MAX_DURATION;
        for (setting, value) in [
            (
                "commit_resolution_timeout",
                Some(p.commit_resolution_timeout),
            ),
            ("max_elapsed", p.max_elapsed),
        ] {
            if value.is_some_and(|d| d > max) {
                return Err(PolicyError {
                    setting,
                    problem: format!(
                        "{:?} is more than the limit of 365 days",
                        value.unwrap_or_default()
                    ),
                });
            }
        }
        Ok(p)
    }
}

/// An impossible [`RetryPolicy`] value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry policy: {setting} {problem}")]
pub struct PolicyError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// The delay schedule: backon's exponential schedule, capped, with full jitter applied.
struct Schedule {
    exp: backon::ExponentialBackoff,
    rng: StdRng,
}

impl Schedule {
    fn new(policy: &RetryPolicy) -> Schedule {
        let exp = ExponentialBuilder::default()
            .with_min_delay(policy.base_delay)
            .with_max_delay(policy.max_delay)
            .with_factor(2.0)
            .with_max_times(policy.max_attempts.saturating_sub(1) as usize)
            .build();
        let rng = match policy.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Schedule { exp, rng }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let scheduled = self.exp.next()?;
        let nanos = u64::try_from(scheduled.as_nanos()).unwrap_or(u64::MAX);
        Some(Duration::from_nanos(self.rng.random_range(0..=nanos)))
    }
}

/// What one attempt reports when it fails.
#[derive(Debug)]
pub enum AttemptError<E> {
    /// The operation failed with `E`; the loop classifies it.
    Op(E),
    /// No connection could be checked out.
    Pool(PoolError),
    /// The connection was lost while `COMMIT` was in flight, and the attempt could not find
    /// out whether it committed. Never retried.
    AmbiguousCommit {
        /// The error that cut the commit off.
        error: E,
        /// The transaction id, when it was read.
        txid: Option<i64>,
        /// Why resolution failed.
        reason: String,
    },
}

/// A pool checkout failure, kept apart from database errors. Its message is redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PoolError {
    /// The pool's error, with any password masked.
    pub message: String,
}

impl PoolError {
    /// Wraps a pool error's text, redacting it.
    pub fn new(message: impl fmt::Display) -> PoolError {
        PoolError {
            message: redact(&message.to_string()),
        }
    }
}

/// Why a retried operation finally failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// Every attempt failed with a transient error; the last one is kept.
    #[error("gave up after {attempts} attempt(s) in {elapsed:?}; last error ({class}): {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt started.
        elapsed: Duration,
        /// The class of the last error.
        class: ErrorClass,
        /// The last error.
        last: E,
    },
    /// The operation failed with an error that rerunning cannot fix; it was not retried.
    #[error("{0}")]
    Permanent(E),
    /// The connection was lost while `COMMIT` was in flight and the outcome could not be
    /// established: the transaction may or may not have committed. Not retried, because a
    /// retry could commit it twice.
    #[error("commit outcome unknown after {attempts} attempt(s) (txid {}): {reason}; last error: {error}",
        txid.map_or_else(|| "not read".to_owned(), |t| t.to_string()))]
    AmbiguousCommit {
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt started.
        elapsed: Duration,
        /// The transaction id, when it was read.
        txid: Option<i64>,
        /// Why it could not be resolved.
        reason: String,
        /// The error that cut the commit off.
        error: E,
    },
    /// No connection could be checked out (and the policy does not retry that, or the
    /// attempts ran out).
    #[error("no connection after {attempts} attempt(s) in {elapsed:?}: {error}")]
    Pool {
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt started.
        elapsed: Duration,
        /// The pool's error.
        error: PoolError,
    },
}

impl<E> RetryError<E> {
    /// The number of attempts made, where known (`Permanent` errors stop at the attempt
    /// that saw them; use [`RetryError::Permanent`] matching if that matters).
    pub fn attempts(&self) -> Option<u32> {
        match self {
            RetryError::Exhausted { attempts, .. }
            | RetryError::AmbiguousCommit { attempts, .. }
            | RetryError::Pool { attempts, .. } => Some(*attempts),
            RetryError::Permanent(_) => None,
        }
    }

    /// The database error, if the failure was one.
    pub fn database_error(&self) -> Option<&E> {
        match self {
            RetryError::Exhausted { last, .. } => Some(last),
            RetryError::Permanent(e) => Some(e),
            RetryError::AmbiguousCommit { error, .. } => Some(error),
            RetryError::Pool { .. } => None,
        }
    }
}

/// Where the loop reports attempts: a pool name for events, the pool's stats, a listener.
/// The default logs through [`LogListener`] under the name `default` and counts nothing.
pub struct RetryHooks<'a> {
    /// Pool name used in events.
    pub pool: &'a str,
    /// Stats to count retries in.
    pub stats: Option<&'a PoolStats>,
    /// Receives a [`PoolEvent::Retry`] per retried attempt.
    pub listener: &'a dyn EventListener,
}

impl Default for RetryHooks<'_> {
    fn default() -> Self {
        RetryHooks {
            pool: "default",
            stats: None,
            listener: &LogListener,
        }
    }
}

impl fmt::Debug for RetryHooks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryHooks")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// One attempt's context, handed to the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// The attempt's number, from 1.
    pub number: u32,
    /// The error class that made the previous attempt fail, if there was one.
    pub previous: Option<ErrorClass>,
}

/// The loop's bookkeeping, shared by the sync and async loops.
struct Loop<'p> {
    policy: &'p RetryPolicy,
    schedule: Schedule,
    started: Instant,
    attempt: Attempt,
}

/// What to do after a failed attempt.
enum Next<E> {
    Wait(Duration),
    Stop(RetryError<E>),
}

impl<'p> Loop<'p> {
    fn new(policy: &'p RetryPolicy) -> Loop<'p> {
        Loop {
            policy,
            schedule: Schedule::new(policy),
            started: Instant::now(),
            attempt: Attempt {
                number: 1,
                previous: None,
            },
        }
    }

    fn failed<E: fmt::Display>(
        &mut self,
        hooks: &RetryHooks<'_>,
        error: AttemptError<E>,
        classify: &mut impl FnMut(&E) -> ErrorClass,
    ) -> Next<E> {
        let attempts = self.attempt.number;
        let elapsed = self.started.elapsed();
        let class = match &error {
            AttemptError::Op(e) => classify(e),
            AttemptError::Pool(_) => ErrorClass::PoolTimeout,
            // Never retried, whatever cut the commit off.
            AttemptError::AmbiguousCommit { .. } => {
                return Next::Stop(error.into_retry_error(ErrorClass::Permanent, attempts, elapsed))
            }
        };
        if !self.policy.retries(class) {
            return Next::Stop(error.into_retry_error(class, attempts, elapsed));
        }
        let delay = self.schedule.next().filter(|delay| {
            self.policy
                .max_elapsed
                .is_none_or(|limit| elapsed + *delay < limit)
        });
        let Some(delay) = delay else {
            if let Some(stats) = hooks.stats {
                stats.record_retry_exhausted();
            }
            log::warn!(
                target: crate::events::LOG_TARGET,
                pool = hooks.pool,
                event = "retry_exhausted";
                "pool {}: giving up after attempt {attempts} ({class}): {}",
                hooks.pool,
                error.redacted_message()
            );
            return Next::Stop(error.into_retry_error(class, attempts, elapsed));
        };
        if let Some(stats) = hooks.stats {
            stats.record_retry();
        }
        hooks.listener.on_event(&PoolEvent::Retry {
            pool: hooks.pool,
            attempt: attempts,
            class: class.as_str(),
            delay,
            error: &error.redacted_message(),
        });
        self.attempt = Attempt {
            number: attempts + 1,
            previous: Some(class),
        };
        Next::Wait(delay)
    }
}

impl<E: fmt::Display> AttemptError<E> {
    /// The error's text with any password masked, for logs and events.
    fn redacted_message(&self) -> String {
        match self {
            AttemptError::Op(e) | AttemptError::AmbiguousCommit { error: e, .. } => {
                redact(&e.to_string())
            }
            // Already redacted when it was made.
            AttemptError::Pool(p) => p.message.clone(),
        }
    }

    /// The final error once the loop stops on this attempt's failure of `class`.
    fn into_retry_error(
        self,
        class: ErrorClass,
        attempts: u32,
        elapsed: Duration,
    ) -> RetryError<E> {
        match self {
            AttemptError::Op(e) if !class.is_transient() => RetryError::Permanent(e),
            AttemptError::Op(last) => RetryError::Exhausted {
                attempts,
                elapsed,
                class,
                last,
            },
            AttemptError::Pool(error) => RetryError::Pool {
                attempts,
                elapsed,
                error,
            },
            AttemptError::AmbiguousCommit {
                error,
                txid,
                reason,
            } => RetryError::AmbiguousCommit {
                attempts,
                elapsed,
                txid,
                reason,
                error,
            },
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the policy gives up; sleeps the thread
/// between attempts.
///
/// `classify` maps the operation's error to its [`ErrorClass`]. Pool errors are retried when
/// the policy says so; an [`AttemptError::AmbiguousCommit`] is never retried.
pub fn run_sync<T, E: fmt::Display>(
    policy: &RetryPolicy,
    hooks: &RetryHooks<'_>,
    mut classify: impl FnMut(&E) -> ErrorClass,
    mut op: impl FnMut(Attempt) -> Result<T, AttemptError<E>>,
) -> Result<T, RetryError<E>> {
    let mut state = Loop::new(policy);
    loop {
        match op(state.attempt) {
            Ok(value) => return Ok(value),
            Err(e) => match state.failed(hooks, e, &mut classify) {
                Next::Wait(delay) => std::thread::sleep(delay),
                Next::Stop(e) => return Err(e),
            },
        }
    }
}

/// The async twin of [`run_sync`]: `sleep` is the runtime's timer (`tokio::time::sleep`).
pub async fn run_async<T, E, Op, OpFut, Sleep, SleepFut>(
    policy: &RetryPolicy,
    hooks: &RetryHooks<'_>,
    mut classify: impl FnMut(&E) -> ErrorClass,
    mut op: Op,
    sleep: Sleep,
) -> Result<T, RetryError<E>>
where
    E: fmt::Display,
    Op: FnMut(Attempt) -> OpFut,
    OpFut: Future<Output = Result<T, AttemptError<E>>>,
    Sleep: Fn(Duration) -> SleepFut,
    SleepFut: Future<Output = ()>,
{
    let mut state = Loop::new(policy);
    loop {
        match op(state.attempt).await {
            Ok(value) => return Ok(value),
            Err(e) => match state.failed(hooks, e, &mut classify) {
                Next::Wait(delay) => sleep(delay).await,
                Next::Stop(e) => return Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast(attempts: u32) -> RetryPolicy {
        RetryPolicy::builder()
            .max_attempts(attempts)
            .base_delay(Duration::from_micros(10))
            .max_delay(Duration::from_micros(100))
            .seed(1)
            .build()
            .unwrap()
    }

    #[allow(clippy::ptr_arg)] // the loop hands the error type by reference
    fn class_of(e: &String) -> ErrorClass {
        crate::classify::classify_message(e)
    }

    #[test]
    fn bad_values_are_rejected_with_the_setting_named() {
        let cases = [
            (RetryPolicy::builder().max_attempts(0), "max_attempts"),
            (RetryPolicy::builder().max_attempts(5000), "max_attempts"),
            (
                RetryPolicy::builder().base_delay(Duration::ZERO),
                "base_delay",
            ),
            (
                RetryPolicy::builder()
                    .base_delay(Duration::from_secs(2))
                    .max_delay(Duration::from_secs(1)),
                "max_delay",
            ),
            (
                RetryPolicy::builder().max_elapsed(Some(Duration::ZERO)),
                "max_elapsed",
            ),
            (
                RetryPolicy::builder().commit_resolution_timeout(Duration::ZERO),
                "commit_resolution_timeout",
            ),
        ];
        for (builder, setting) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.setting, setting);
            assert!(err.to_string().contains(setting), "{err}");
        }
        assert!(RetryPolicy::builder().build().is_ok());
    }

    #[test]
    fn the_schedule_is_exponential_capped_fully_jittered_and_seedable() {
        let policy = RetryPolicy::builder()
            .max_attempts(10)
            .base_delay(Duration::from_millis(10))
            .max_delay(Duration::from_millis(80))
            .seed(42)
            .build()
            .unwrap();
        let a: Vec<_> = policy.delays().collect();
        let b: Vec<_> = policy.delays().collect();
        assert_eq!(a, b, "a seed makes the jitter repeatable");
        assert_eq!(a.len(), 9, "max_attempts - 1 waits");
        let caps = [10, 20, 40, 80, 80, 80, 80, 80, 80];
        for (d, cap) in a.iter().zip(caps) {
            assert!(*d <= Duration::from_millis(cap), "{d:?} above {cap} ms");
        }
        // Full jitter: over many draws, some waits are far below the schedule.
        let many = RetryPolicy::builder()
            .max_attempts(1000)
            .base_delay(Duration::from_millis(100))
            .max_delay(Duration::from_millis(100))
            .seed(3)
            .build()
            .unwrap();
        let low = many
            .delays()
            .filter(|d| *d < Duration::from_millis(50))
            .count();
        assert!((300..700).contains(&low), "{low} of 999 below half");
    }

    #[test]
    fn transient_errors_are_retried_until_success() {
        let stats = PoolStats::new();
        let hooks = RetryHooks {
            stats: Some(&stats),
            ..RetryHooks::default()
        };
        let mut seen = Vec::new();
        let out = run_sync(&fast(5), &hooks, class_of, |attempt| {
            seen.push(attempt);
            if attempt.number < 3 {
                Err(AttemptError::Op(
                    "could not serialize access due to concurrent update".to_owned(),
                ))
            } else {
                Ok("done")
            }
        });
        assert_eq!(out.unwrap(), "done");
        assert_eq!(seen.len(), 3);
        assert_eq!(
            seen[2].previous,
            Some(ErrorClass::SerializationFailure),
            "the attempt knows why the previous one failed"
        );
        let snap = stats.snapshot(Default::default());
        assert_eq!(snap.retries, 2);
    }

    #[test]
    fn permanent_errors_are_returned_after_one_attempt() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = run_sync(&fast(5), &RetryHooks::default(), class_of, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(AttemptError::Op("duplicate key value".to_owned()))
        });
        assert!(matches!(out, Err(RetryError::Permanent(_))));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn attempts_run_out_with_the_last_error_kept() {
        let out: Result<(), _> = run_sync(&fast(3), &RetryHooks::default(), class_of, |a| {
            Err(AttemptError::Op(format!(
                "deadlock detected\n(attempt {})",
                a.number
            )))
        });
        match out {
            Err(RetryError::Exhausted {
                attempts,
                class,
                last,
                ..
            }) => {
                assert_eq!(attempts, 3);
                assert_eq!(class, ErrorClass::Deadlock);
                assert_eq!(last, "deadlock detected\n(attempt 3)");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn ambiguous_commits_are_never_retried() {
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = run_sync(&fast(5), &RetryHooks::default(), class_of, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(AttemptError::AmbiguousCommit {
                error: "server closed the connection unexpectedly".to_owned(),
                txid: Some(42),
                reason: "server unreachable".into(),
            })
        });
        assert!(matches!(
            out,
            Err(RetryError::AmbiguousCommit { txid: Some(42), .. })
        ));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn pool_timeouts_follow_the_policy_and_stay_distinct() {
        let no = RetryPolicy::builder()
            .retry_pool_timeout(false)
            .build()
            .unwrap();
        let out: Result<(), RetryError<String>> =
            run_sync(&no, &RetryHooks::default(), class_of, |_| {
                Err(AttemptError::Pool(PoolError::new(
                    "timed out for postgres://u:S3NT1NEL@h/db",
                )))
            });
        match out {
            Err(RetryError::Pool {
                attempts, error, ..
            }) => {
                assert_eq!(attempts, 1);
                assert!(!error.message.contains("S3NT1NEL"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let calls = AtomicU32::new(0);
        let out: Result<(), RetryError<String>> =
            run_sync(&fast(4), &RetryHooks::default(), class_of, |_| {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(AttemptError::Pool(PoolError::new("timed out")))
            });
        assert!(matches!(out, Err(RetryError::Pool { attempts: 4, .. })));
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn max_elapsed_stops_new_attempts() {
        let policy = RetryPolicy::builder()
            .max_attempts(1000)
            .base_delay(Duration::from_millis(1))
            .max_delay(Duration::from_millis(2))
            .max_elapsed(Some(Duration::from_millis(30)))
            .build()
            .unwrap();
        let calls = AtomicU32::new(0);
        let out: Result<(), _> = run_sync(&policy, &RetryHooks::default(), class_of, |_| {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(AttemptError::Op("deadlock detected".to_owned()))
        });
        assert!(matches!(out, Err(RetryError::Exhausted { .. })));
        assert!(calls.load(Ordering::Relaxed) < 1000);
    }

    #[test]
    fn the_async_loop_shares_the_sync_loops_rules() {
        let calls = AtomicU32::new(0);
        let policy = fast(5);
        let hooks = RetryHooks::default();
        let fut = run_async(
            &policy,
            &hooks,
            class_of,
            |a| {
                calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    if a.number < 4 {
                        Err(AttemptError::Op("deadlock detected".to_owned()))
                    } else {
                        Ok(a.number)
                    }
                }
            },
            |_d| std::future::ready(()),
        );
        let out = block_on(fut);
        assert_eq!(out.unwrap(), 4);
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    /// A minimal executor for futures that never pend.
    fn block_on<F: Future>(fut: F) -> F::Output {
        use std::task::{Context, Poll, Waker};
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }
}

/// From the mutation run: the policy's accessors and bounds, the retry event's text.
#[cfg(all(test, not(loom)))]
mod policy_tests {
    use super::*;
    use crate::classify::classify_sqlstate;

    #[test]
    fn every_setting_reads_back_as_set() {
        let p = RetryPolicy::builder()
            .max_attempts(7)
            .max_elapsed(Some(Duration::from_secs(3)))
            .base_delay(Duration::from_millis(40))
            .max_delay(Duration::from_millis(900))
            .retry_pool_timeout(false)
            .verify_commit(false)
            .commit_resolution_timeout(Duration::from_secs(4))
            .seed(99)
            .idempotency_table("jobs.keys")
            .build()
            .unwrap();
        assert_eq!(p.max_attempts(), 7);
        assert_eq!(p.max_elapsed(), Some(Duration::from_secs(3)));
        assert_eq!(p.base_delay(), Duration::from_millis(40));
        assert_eq!(p.max_delay(), Duration::from_millis(900));
        assert!(!p.retry_pool_timeout());
        assert!(!p.verify_commit());
        assert_eq!(p.commit_resolution_timeout(), Duration::from_secs(4));
        assert_eq!(p.seed(), Some(99));
        assert_eq!(p.idempotency_table().name(), "jobs.keys");
        // The defaults the README states.
        let d = RetryPolicy::default();
        assert!(d.retry_pool_timeout() && d.verify_commit());
        assert_eq!(d.seed(), None);
        assert_eq!(d.max_attempts(), 5);
        assert_eq!(d.base_delay(), Duration::from_millis(25));
        assert_eq!(d.max_delay(), Duration::from_secs(2));
        assert_eq!(d.max_elapsed(), Some(Duration::from_secs(30)));
        assert_eq!(d.commit_resolution_timeout(), Duration::from_secs(10));
        let b = RetryPolicy::builder().build().unwrap();
        assert_eq!(
            (
                b.max_attempts(),
                b.base_delay(),
                b.max_delay(),
                b.max_elapsed()
            ),
            (
                d.max_attempts(),
                d.base_delay(),
                d.max_delay(),
                d.max_elapsed()
            ),
            "the builder starts from the defaults"
        );
        assert_eq!(RetryPolicy::no_retry().max_attempts(), 1);
    }

    #[test]
    fn a_thousand_attempts_is_the_most_a_policy_takes() {
        let build = |n| RetryPolicy::builder().max_attempts(n).build();
        assert!(build(1000).is_ok());
        assert!(build(999).is_ok());
        assert_eq!(build(1001).unwrap_err().setting, "max_attempts");
        let delay = |d| RetryPolicy::builder().max_delay(d).build();
        assert!(
            delay(Duration::from_secs(3600)).is_ok(),
            "an hour is allowed"
        );
        assert!(delay(Duration::from_secs(1800)).is_ok());
        assert_eq!(
            delay(Duration::from_secs(3601)).unwrap_err().setting,
            "max_delay"
        );
    }

    #[test]
    fn durations_past_365_days_are_refused_not_overflowed_later() {
        let year = crate::config::MAX_DURATION;
        let resolution = |d| RetryPolicy::builder().commit_resolution_timeout(d).build();
        assert!(resolution(year).is_ok());
        for d in [year + Duration::from_secs(1), Duration::MAX] {
            let err = resolution(d).unwrap_err();
            assert_eq!(err.setting, "commit_resolution_timeout", "{err}");
            assert!(err.to_string().contains("365 days"), "{err}");
        }
        let elapsed = |d| RetryPolicy::builder().max_elapsed(Some(d)).build();
        assert!(elapsed(year).is_ok());
        assert_eq!(elapsed(Duration::MAX).unwrap_err().setting, "max_elapsed");
        // The longest accepted resolution starts without overflowing the clock.
        let p = resolution(year).unwrap();
        let _ = commit::Resolution::start(&p);
    }

    #[test]
    fn attempts_are_known_for_every_error_but_a_permanent_one() {
        let exhausted: RetryError<String> = RetryError::Exhausted {
            attempts: 3,
            elapsed: Duration::ZERO,
            class: ErrorClass::Deadlock,
            last: "x".into(),
        };
        assert_eq!(exhausted.attempts(), Some(3));
        let pool: RetryError<String> = RetryError::Pool {
            attempts: 4,
            elapsed: Duration::ZERO,
            error: PoolError::new("timed out"),
        };
        assert_eq!(pool.attempts(), Some(4));
        assert_eq!(RetryError::Permanent("x".to_owned()).attempts(), None);
        assert_eq!(exhausted.database_error().map(String::as_str), Some("x"));
        assert_eq!(
            RetryError::Permanent("p".to_owned())
                .database_error()
                .map(String::as_str),
            Some("p")
        );
        assert!(
            pool.database_error().is_none(),
            "a pool timeout is no database error"
        );
    }

    #[test]
    fn hooks_show_their_pool_in_debug() {
        let shown = format!("{:?}", RetryHooks::default());
        assert!(
            shown.contains("RetryHooks") && shown.contains("\"default\""),
            "{shown}"
        );
    }

    #[test]
    fn the_retry_event_carries_the_error_redacted() {
        let seen: &'static parking_lot::Mutex<Vec<String>> =
            Box::leak(Box::new(parking_lot::Mutex::new(Vec::new())));
        let listener = move |e: &PoolEvent<'_>| {
            if let PoolEvent::Retry { error, class, .. } = e {
                seen.lock().push(format!("{class}: {error}"));
            }
        };
        let hooks = RetryHooks {
            pool: "p",
            stats: None,
            listener: &listener,
        };
        let policy = RetryPolicy::builder()
            .max_attempts(2)
            .base_delay(Duration::from_micros(10))
            .max_delay(Duration::from_micros(100))
            .build()
            .unwrap();
        let out: Result<(), _> = run_sync(
            &policy,
            &hooks,
            |_: &String| ErrorClass::Deadlock,
            |_| {
                Err(AttemptError::Op(
                    "deadlock detected; postgres://app:S3NT1NEL@db/app".to_owned(),
                ))
            },
        );
        assert!(out.is_err());
        let seen = seen.lock();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            seen[0].starts_with("deadlock: deadlock detected"),
            "{seen:?}"
        );
        assert!(!seen[0].contains("S3NT1NEL"), "{seen:?}");
    }

    #[test]
    fn disconnects_and_session_timeouts_are_what_they_are() {
        assert!(ErrorClass::ConnectionLost.is_disconnect());
        assert!(ErrorClass::AdminShutdown.is_disconnect());
        assert!(!ErrorClass::Deadlock.is_disconnect());
        assert!(ErrorClass::ConnectionLost.invalidates_pool());
        assert!(!ErrorClass::ReadOnlyTransaction.invalidates_pool());
        assert_eq!(ErrorClass::LockTimeout.as_str(), "lock_timeout");
        assert_eq!(ErrorClass::PoolTimeout.to_string(), "pool_timeout");
        // idle_session_timeout and idle_in_transaction_session_timeout end the session.
        assert_eq!(classify_sqlstate("57P05"), ErrorClass::ConnectionLost);
        assert_eq!(classify_sqlstate("25P03"), ErrorClass::ConnectionLost);
        assert_eq!(classify_sqlstate("55P03"), ErrorClass::LockTimeout);
    }
}
