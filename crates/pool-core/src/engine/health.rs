//! Whether the pool's server can be reached, from what its connects said.
//!
//! Connect errors come in two kinds ([`ConnectClass`]):
//! * **hopeless**: no retry can fix them (authentication failed, the database does not
//!   exist, TLS verification failed, a rejected or malformed parameter). A checkout that
//!   needs a new connection fails at once with the cause, instead of waiting `pool_timeout`
//!   for attempts that cannot succeed; the pool tries again at most once per
//!   [`HOPELESS_RECHECK`] while checkouts come, so it heals when the cause is fixed (a
//!   rotated password, a created database).
//! * **transient**: the server is down, restarting, full or unreachable for now (refused,
//!   reset, timed out, starting up, too many clients). Checkouts keep waiting up to their
//!   timeout; the pool tries again after a short jittered backoff capped at
//!   [`TRANSIENT_BACKOFF_CAP`], so a waiting checkout is served within about that long of
//!   the server's return.
//!
//! While the server is down, one connect at a time tries it (the others wait for that one's
//! outcome): no connect storm against a server that is starting up, and a breaker
//! (`fail_fast_when_down`) can fail checkouts at once while it lasts. The log says "down
//! since" once, a summary at most every [`LOG_SUMMARY_EVERY`], and once when it is back.
//!
//! [`ServerHealth`] holds the evidence and takes no decision that needs I/O: the adapters ask
//! it before each attempt ([`ServerHealth::attempt`]) and, while a checkout waits, whether to
//! stop waiting ([`ServerHealth::fail_fast`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a pool whose last connect failed hopelessly tries again (while checkouts come).
pub const HOPELESS_RECHECK: Duration = Duration::from_secs(1);
/// The longest pause between two connect attempts while the server is down for a transient
/// reason (the pauses grow from 25 ms, jittered over the upper half of each step).
pub const TRANSIENT_BACKOFF_CAP: Duration = Duration::from_millis(100);
/// While the server stays down, the log gets a summary at most this often.
pub const LOG_SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// What kind of failure a connect error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectClass {
    /// No retry can fix it: authentication, unknown database or role, TLS verification, a
    /// rejected or malformed parameter.
    Hopeless,
    /// It may pass: refused, reset, timed out, starting up, too many connections, DNS.
    Transient,
}

impl ConnectClass {
    /// `hopeless` or `transient`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectClass::Hopeless => "hopeless",
            ConnectClass::Transient => "transient",
        }
    }

    /// The class of a connect refused by the server with this SQLSTATE: class 28 (invalid
    /// authorization), 3D000 (no such database), 42501 (no CONNECT privilege), 0A000 (feature
    /// not supported), 08P01 (protocol violation), 22023/42704 (a bad startup parameter) are
    /// hopeless; the rest (53300 too many connections, 57P03 starting up, class 08, ...) are
    /// transient.
    pub fn of_sqlstate(code: &str) -> ConnectClass {
        let hopeless = code.starts_with("28")
            || matches!(
                code,
                "3D000" | "42501" | "0A000" | "08P01" | "22023" | "42704"
            );
        if hopeless {
            ConnectClass::Hopeless
        } else {
            ConnectClass::Transient
        }
    }

    /// The class of a connect error from its text, as libpq reports it (the server's FATAL
    /// message or libpq's own). Only the server's and libpq's fixed English wordings are
    /// matched; anything not recognised is transient, so a server configured with another
    /// `lc_messages` is waited for as before, never failed fast by mistake.
    pub fn of_libpq_message(message: &str) -> ConnectClass {
        const HOPELESS: &[&str] = &[
            // Server FATALs, class 28 and 3D000.
            "password authentication failed for user",
            "no pg_hba.conf entry for",
            "pg_hba.conf rejects connection",
            "is not permitted to log in",
            "does not exist", // database "x" / role "x" does not exist
            "permission denied for database",
            "authentication failed for user",
            // 28000 of pg_hba's `cert` method (and `clientcert=verify-*`) when the client
            // sends no certificate.
            "connection requires a valid client certificate",
            // libpq: credentials, TLS verification, parameters.
            "fe_sendauth: no password supplied",
            // libpq refuses an `sslkey` that group or others may read, before connecting.
            "has group or world access",
            "channel binding required",
            "certificate verify failed",
            // The server refused the client's certificate during the handshake (its TLS
            // alert, as OpenSSL and libpq word it, then as rustls does).
            "alert unknown ca",
            "alert bad certificate",
            "alert certificate expired",
            "alert certificate revoked",
            "alert certificate unknown",
            "alert certificate required",
            "received fatal alert: UnknownCA",
            "received fatal alert: BadCertificate",
            "received fatal alert: CertificateExpired",
            "received fatal alert: CertificateRevoked",
            "received fatal alert: CertificateUnknown",
            "received fatal alert: CertificateRequired",
            "does not match host name",
            "root certificate file",
            "server does not support SSL, but SSL was required",
            "invalid connection option",
            "invalid sslmode value",
            "invalid integer value",
            "invalid port number",
            "invalid URI",
            "invalid percent-encoded token",
            "missing \"=\" after",
            "unterminated quoted string",
            "unrecognized configuration parameter",
            "invalid value for parameter",
        ];
        if HOPELESS.iter().any(|needle| message.contains(needle)) {
            ConnectClass::Hopeless
        } else {
            ConnectClass::Transient
        }
    }
}

/// What a pool knows about reaching its server; a snapshot of [`ServerHealth`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServerState {
    /// Whether the last connect attempt succeeded (or none failed yet).
    pub reachable: bool,
    /// How long connects have been failing, if they are.
    pub down_for_ms: Option<u64>,
    /// Failed attempts since the last success.
    pub failed_attempts: u64,
    /// The last failure's kind.
    pub last_error_class: Option<ConnectClass>,
    /// The last failure's message, redacted.
    pub last_error: Option<String>,
    /// When the next attempt may start, from now, while connects are failing.
    pub next_attempt_in_ms: Option<u64>,
}

#[derive(Debug)]
struct Failure {
    at: Instant,
    class: ConnectClass,
    message: String,
}

#[derive(Debug, Default)]
struct Inner {
    /// First failure since the last success.
    down_since: Option<Instant>,
    failures: u64,
    last: Option<Failure>,
    /// When the next attempt may start while down.
    next_attempt: Option<Instant>,
    /// When the outage was last written to the log.
    last_logged: Option<Instant>,
}

/// The evidence about the pool's server: see the module docs.
#[derive(Debug, Default)]
pub struct ServerHealth {
    inner: Mutex<Inner>,
    /// A connect is trying the server while it is down.
    probing: AtomicBool,
}

/// What an adapter's connect does next: see [`ServerHealth::attempt`].
#[derive(Debug)]
pub enum Attempt<'a> {
    /// Connect now; report the outcome with [`ServerHealth::succeeded`] or
    /// [`ServerHealth::failed`] (dropping the guard ends the probe either way).
    Go(Probe<'a>),
    /// Not yet: the server is down and another connect is trying it, or the backoff has not
    /// passed. Wait at most this long, then ask again.
    Wait(Duration),
}

/// A connect attempt under way; while the server is down, the only one.
#[derive(Debug)]
pub struct Probe<'a> {
    health: &'a ServerHealth,
    probing: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if self.probing {
            self.health.probing.store(false, Ordering::Release);
        }
    }
}

/// What [`ServerHealth::failed`] says about logging the failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The first failure of an outage (or of a new kind): worth a log line.
    Down,
    /// The outage goes on: a summary line is due (`failures` so far, down for `down_for`).
    Summary {
        /// Failed attempts since the last success.
        failures: u64,
        /// Since the first of them.
        down_for: Duration,
    },
    /// The outage goes on and was reported recently: say nothing.
    Quiet,
}

impl ServerHealth {
    /// May a connect try the server now? While it is reachable: yes, any number at once.
    /// While it is down: one at a time, after the backoff since the last failure.
    pub fn attempt(&self) -> Attempt<'_> {
        let now = Instant::now();
        let inner = self.inner.lock();
        if inner.down_since.is_none() {
            return Attempt::Go(Probe {
                health: self,
                probing: false,
            });
        }
        if let Some(at) = inner.next_attempt.filter(|at| *at > now) {
            return Attempt::Wait(at - now);
        }
        drop(inner);
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Attempt::Go(Probe {
                health: self,
                probing: true,
            })
        } else {
            Attempt::Wait(Duration::from_millis(10))
        }
    }

    /// A connect succeeded. Returns how long the server had been unreachable (and after how
    /// many failed attempts), if it had been.
    pub fn succeeded(&self) -> Option<(Duration, u64)> {
        let mut inner = self.inner.lock();
        let was = inner
            .down_since
            .take()
            .map(|since| (since.elapsed(), inner.failures));
        inner.failures = 0;
        inner.next_attempt = None;
        inner.last_logged = None;
        was
    }

    /// A connect failed with `message` (already redacted) of `class`. Schedules the next
    /// attempt and says whether the failure is worth a log line.
    pub fn failed(&self, class: ConnectClass, message: String) -> Report {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let new_kind = inner
            .last
            .as_ref()
            .is_none_or(|last| last.class != class || inner.down_since.is_none());
        inner.down_since.get_or_insert(now);
        inner.failures += 1;
        let pause = match class {
            ConnectClass::Hopeless => HOPELESS_RECHECK,
            ConnectClass::Transient => {
                // 25 ms doubling, capped, jittered over the upper half (never zero: no busy loop).
                let exp = 25u64.saturating_mul(1 << inner.failures.min(8));
                let cap = exp.min(TRANSIENT_BACKOFF_CAP.as_millis() as u64);
                Duration::from_millis(rand::random_range(cap / 2..=cap).max(5))
            }
        };
        inner.next_attempt = Some(now + pause);
        inner.last = Some(Failure {
            at: now,
            class,
            message,
        });
        let report = if new_kind || inner.last_logged.is_none() {
            Report::Down
        } else if inner
            .last_logged
            .is_some_and(|at| now.duration_since(at) >= LOG_SUMMARY_EVERY)
        {
            Report::Summary {
                failures: inner.failures,
                down_for: inner.down_since.map_or(Duration::ZERO, |s| now - s),
            }
        } else {
            Report::Quiet
        };
        if report != Report::Quiet {
            inner.last_logged = Some(now);
        }
        report
    }

    /// Whether a checkout that started at `started` and still has no connection should stop
    /// waiting, and with what message:
    /// * the last connect failed hopelessly, after the checkout started or less than
    ///   [`HOPELESS_RECHECK`] ago (older evidence is rechecked by the next attempt first);
    /// * or `breaker` is set and connects have been failing for longer than it.
    pub fn fail_fast(&self, started: Instant, breaker: Option<Duration>) -> Option<String> {
        let inner = self.inner.lock();
        let since = inner.down_since?;
        let last = inner.last.as_ref()?;
        if last.class == ConnectClass::Hopeless
            && (last.at >= started || last.at.elapsed() < HOPELESS_RECHECK)
        {
            return Some(format!(
                "connecting fails for a reason no retry can fix ({} failed \
                 attempt(s)); fix the cause, the pool heals on its own: {}",
                inner.failures, last.message
            ));
        }
        if let Some(threshold) = breaker {
            let down_for = since.elapsed();
            if down_for >= threshold {
                return Some(format!(
                    "the server has been unreachable for {down_for:.1?} (fail_fast_when_down = \
                     {threshold:?}; {} failed attempt(s)); last error: {}",
                    inner.failures, last.message
                ));
            }
        }
        None
    }

    /// The last connect failure at or after `since`, if connects are failing.
    pub fn last_error_since(&self, since: Instant) -> Option<String> {
        let inner = self.inner.lock();
        inner.down_since?;
        inner
            .last
            .as_ref()
            .filter(|f| f.at >= since)
            .map(|f| f.message.clone())
    }

    /// Whether the last connect attempt failed (and none succeeded since).
    pub fn is_down(&self) -> bool {
        self.inner.lock().down_since.is_some()
    }

    /// A snapshot for stats and status reports.
    pub fn state(&self) -> ServerState {
        let now = Instant::now();
        let inner = self.inner.lock();
        ServerState {
            reachable: inner.down_since.is_none(),
            down_for_ms: inner.down_since.map(|s| millis(now - s)),
            failed_attempts: inner.failures,
            last_error_class: inner.down_since.and(inner.last.as_ref().map(|f| f.class)),
            last_error: inner
                .down_since
                .and(inner.last.as_ref().map(|f| f.message.clone())),
            next_attempt_in_ms: inner
                .down_since
                .and(inner.next_attempt)
                .map(|at| millis(at.saturating_duration_since(now))),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopeless_errors_are_told_from_transient_ones() {
        for msg in [
            "FATAL:  database \"nope\" does not exist",
            "FATAL:  password authentication failed for user \"app\"",
            "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  no pg_hba.conf entry for host",
            "invalid sslmode value: \"bogus\"",
            "SSL error: certificate verify failed",
            "connection to server at \"localhost\" (127.0.0.1), port 5432 failed: FATAL:  connection requires a valid client certificate",
            "FATAL:  certificate authentication failed for user \"app\"",
            "private key file \"/k/client.key\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            "connection to server at \"localhost\" (127.0.0.1), port 5432 failed: SSL error: tlsv1 alert unknown ca",
            "error communicating with the server: error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:ssl/record/rec_layer_s3.c:918:SSL alert number 48",
            "error communicating with the server: received fatal alert: UnknownCA",
        ] {
            assert_eq!(ConnectClass::of_libpq_message(msg), ConnectClass::Hopeless, "{msg}");
        }
        for msg in [
            "connection to server at \"127.0.0.1\", port 1 failed: Connection refused",
            "FATAL:  the database system is starting up",
            "FATAL:  sorry, too many clients already",
            "server closed the connection unexpectedly",
            "timeout expired",
            "could not translate host name \"db\" to address",
        ] {
            assert_eq!(
                ConnectClass::of_libpq_message(msg),
                ConnectClass::Transient,
                "{msg}"
            );
        }
        assert_eq!(ConnectClass::of_sqlstate("3D000"), ConnectClass::Hopeless);
        assert_eq!(ConnectClass::of_sqlstate("28P01"), ConnectClass::Hopeless);
        assert_eq!(ConnectClass::of_sqlstate("53300"), ConnectClass::Transient);
        assert_eq!(ConnectClass::of_sqlstate("57P03"), ConnectClass::Transient);
    }

    #[test]
    fn a_hopeless_failure_fails_waiting_checkouts_fast_and_is_rechecked_later() {
        let h = ServerHealth::default();
        let before = Instant::now();
        assert!(h.fail_fast(before, None).is_none());
        assert_eq!(
            h.failed(
                ConnectClass::Hopeless,
                "database \"x\" does not exist".into()
            ),
            Report::Down
        );
        let msg = h.fail_fast(before, None).expect("fails fast");
        assert!(msg.contains("does not exist"), "{msg}");
        // Until the recheck is due, no attempt: the next one comes after HOPELESS_RECHECK.
        assert!(matches!(h.attempt(), Attempt::Wait(w) if w > Duration::from_millis(500)));
        assert_eq!(h.succeeded().map(|(_, n)| n), Some(1));
        assert!(h.fail_fast(before, None).is_none());
        assert!(h.state().reachable);
    }

    #[test]
    fn transient_failures_wait_a_short_capped_backoff_and_one_probe_runs_at_a_time() {
        let h = ServerHealth::default();
        let started = Instant::now();
        for _ in 0..20 {
            h.failed(ConnectClass::Transient, "refused".into());
        }
        assert!(
            h.fail_fast(started, None).is_none(),
            "transient: keep waiting"
        );
        match h.attempt() {
            Attempt::Wait(w) => assert!(w <= TRANSIENT_BACKOFF_CAP, "{w:?}"),
            Attempt::Go(_) => panic!("must wait for the backoff"),
        }
        std::thread::sleep(TRANSIENT_BACKOFF_CAP + Duration::from_millis(5));
        let first = h.attempt();
        assert!(matches!(first, Attempt::Go(_)));
        assert!(
            matches!(h.attempt(), Attempt::Wait(_)),
            "a second connect waits for the probe's outcome"
        );
        drop(first);
        assert!(matches!(h.attempt(), Attempt::Go(_)));
        // The breaker, when asked for, fails checkouts once the outage is old enough.
        assert!(h.fail_fast(started, Some(Duration::ZERO)).is_some());
        assert!(h
            .fail_fast(started, Some(Duration::from_secs(60)))
            .is_none());
    }

    #[test]
    fn an_outage_is_logged_once_then_summarised() {
        let h = ServerHealth::default();
        assert_eq!(h.failed(ConnectClass::Transient, "a".into()), Report::Down);
        for _ in 0..50 {
            assert_eq!(h.failed(ConnectClass::Transient, "a".into()), Report::Quiet);
        }
        assert_eq!(
            h.failed(ConnectClass::Hopeless, "b".into()),
            Report::Down,
            "a new kind of failure is reported"
        );
        h.succeeded();
        assert_eq!(h.failed(ConnectClass::Transient, "a".into()), Report::Down);
    }

    // Tests added from the mutation run (docs/mutants.md).

    #[test]
    fn classes_have_their_names() {
        assert_eq!(ConnectClass::Hopeless.as_str(), "hopeless");
        assert_eq!(ConnectClass::Transient.as_str(), "transient");
    }

    /// The pause before the next attempt, as the state shows it right after a failure.
    fn pause_after(failures: u32) -> Duration {
        let h = ServerHealth::default();
        for _ in 0..failures {
            h.failed(ConnectClass::Transient, "refused".into());
        }
        Duration::from_millis(h.state().next_attempt_in_ms.expect("down"))
    }

    #[test]
    fn the_transient_backoff_doubles_from_25ms_to_its_cap_with_half_jitter() {
        // 1 failure: 50 ms with jitter over its upper half, 25..=50 ms.
        for _ in 0..50 {
            let pause = pause_after(1);
            assert!(pause <= Duration::from_millis(50), "{pause:?}");
        }
        // From 2 failures on: the cap with jitter over its upper half, 50..=100 ms. A little
        // slack below for the time the state takes to be read on a busy machine.
        for _ in 0..50 {
            let pause = pause_after(4);
            assert!(
                pause >= TRANSIENT_BACKOFF_CAP / 2 - Duration::from_millis(10)
                    && pause <= TRANSIENT_BACKOFF_CAP,
                "{pause:?}"
            );
        }
    }

    #[test]
    fn a_recent_hopeless_failure_fails_a_checkout_that_started_after_it() {
        let h = ServerHealth::default();
        h.failed(
            ConnectClass::Hopeless,
            "password authentication failed".into(),
        );
        std::thread::sleep(Duration::from_millis(2));
        let started = Instant::now();
        assert!(
            h.fail_fast(started, None).is_some(),
            "less than HOPELESS_RECHECK old: no point waiting"
        );
    }

    #[test]
    fn an_old_hopeless_failure_fails_only_checkouts_that_saw_it_happen() {
        let h = ServerHealth::default();
        let before = Instant::now();
        h.failed(
            ConnectClass::Hopeless,
            "password authentication failed".into(),
        );
        std::thread::sleep(HOPELESS_RECHECK + Duration::from_millis(50));
        assert!(
            h.fail_fast(before, None).is_some(),
            "it failed while this checkout waited"
        );
        assert!(
            h.fail_fast(Instant::now(), None).is_none(),
            "older than HOPELESS_RECHECK and before this checkout: recheck first"
        );
    }

    #[test]
    fn the_last_error_is_quoted_only_to_checkouts_that_saw_it_happen() {
        let h = ServerHealth::default();
        let before = Instant::now();
        assert_eq!(h.last_error_since(before), None, "no failure yet");
        h.failed(ConnectClass::Transient, "connection refused".into());
        std::thread::sleep(Duration::from_millis(2));
        let after = Instant::now();
        assert_eq!(
            h.last_error_since(before).as_deref(),
            Some("connection refused")
        );
        assert_eq!(
            h.last_error_since(after),
            None,
            "it failed before that checkout"
        );
        h.succeeded();
        assert_eq!(h.last_error_since(before), None, "the server is back");
    }
}
