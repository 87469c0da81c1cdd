//! Pool events, named by the moment they happen, delivered to an [`EventListener`].
//!
//! The adapters emit a [`PoolEvent`] when a connection is opened, checked out, checked in or
//! closed, when the pool is invalidated, when an operation is retried and when a leak is
//! suspected. [`LogListener`] writes them through the `log` facade; any
//! `Fn(&PoolEvent<'_>) + Send + Sync + 'static` closure is a listener too.
//!
//! Strings in events (`error`, `reason`) are redacted by the emitter; [`LogListener`] redacts
//! every string once more before logging it.

use std::time::Duration;

use crate::redact::redact;
use crate::stats::CloseReason;

/// The `log` target every line of [`LogListener`] is written under.
pub const LOG_TARGET: &str = "resilient_diesel";

/// Something that happened in a pool.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum PoolEvent<'a> {
    /// A connection was opened.
    Connected {
        /// The pool's name.
        pool: &'a str,
        /// The connection's id, unique within the pool.
        connection_id: u64,
        /// How long connecting took.
        took: Duration,
    },
    /// A connection attempt failed.
    ConnectFailed {
        /// The pool's name.
        pool: &'a str,
        /// The driver's message, already redacted.
        error: &'a str,
    },
    /// A connection was handed out.
    CheckedOut {
        /// The pool's name.
        pool: &'a str,
        /// The connection's id.
        connection_id: u64,
        /// How long the caller waited for it.
        waited: Duration,
    },
    /// A connection came back to the pool.
    CheckedIn {
        /// The pool's name.
        pool: &'a str,
        /// The connection's id.
        connection_id: u64,
        /// How long it was held.
        held: Duration,
    },
    /// A connection was closed.
    Closed {
        /// The pool's name.
        pool: &'a str,
        /// The connection's id.
        connection_id: u64,
        /// Why.
        reason: CloseReason,
    },
    /// The pool was invalidated: every older connection is pinged before its next use.
    Invalidated {
        /// The pool's name.
        pool: &'a str,
        /// What triggered it, already redacted.
        reason: &'a str,
    },
    /// An operation failed with a transient error and will be tried again.
    Retry {
        /// The pool's name.
        pool: &'a str,
        /// The attempt that failed, from 1.
        attempt: u32,
        /// The error's class (e.g. `serialization_failure`).
        class: &'a str,
        /// The wait before the next attempt.
        delay: Duration,
        /// The error's message, already redacted.
        error: &'a str,
    },
    /// A connection has been held longer than the leak detection threshold (reported once
    /// per checkout).
    LeakSuspected {
        /// The pool's name.
        pool: &'a str,
        /// The connection's id.
        connection_id: u64,
        /// How long it has been held.
        held: Duration,
        /// Where it was checked out: a backtrace.
        checked_out_at: &'a str,
    },
}

impl<'a> PoolEvent<'a> {
    /// The event's name, as the `event` field of a structured log line: `connected`,
    /// `connect_failed`, `checked_out`, `checked_in`, `closed`, `invalidated`, `retry`,
    /// `leak_suspected`.
    pub fn name(&self) -> &'static str {
        match self {
            PoolEvent::Connected { .. } => "connected",
            PoolEvent::ConnectFailed { .. } => "connect_failed",
            PoolEvent::CheckedOut { .. } => "checked_out",
            PoolEvent::CheckedIn { .. } => "checked_in",
            PoolEvent::Closed { .. } => "closed",
            PoolEvent::Invalidated { .. } => "invalidated",
            PoolEvent::Retry { .. } => "retry",
            PoolEvent::LeakSuspected { .. } => "leak_suspected",
        }
    }

    /// The name of the pool the event happened in.
    pub fn pool(&self) -> &'a str {
        match *self {
            PoolEvent::Connected { pool, .. }
            | PoolEvent::ConnectFailed { pool, .. }
            | PoolEvent::CheckedOut { pool, .. }
            | PoolEvent::CheckedIn { pool, .. }
            | PoolEvent::Closed { pool, .. }
            | PoolEvent::Invalidated { pool, .. }
            | PoolEvent::Retry { pool, .. }
            | PoolEvent::LeakSuspected { pool, .. } => pool,
        }
    }
}

/// Receives pool events. Called on the thread where the event happened (a leak report: on
/// the pools' shared reporter thread), sometimes with pool locks held: return quickly and never
/// call back into the pool.
///
/// A slow listener slows down its own pool's callers and delays other pools' leak reports,
/// but never a deadline: no listener runs on the thread that cuts stalled pings short. A
/// panicking listener is caught (and reported once); the pool goes on.
pub trait EventListener: Send + Sync + 'static {
    /// Called for every event.
    fn on_event(&self, event: &PoolEvent<'_>);
}

impl<F> EventListener for F
where
    F: Fn(&PoolEvent<'_>) + Send + Sync + 'static,
{
    fn on_event(&self, event: &PoolEvent<'_>) {
        self(event)
    }
}

/// Logs every event through the `log` facade under the target [`LOG_TARGET`]
/// (`resilient_diesel`):
///
/// | event | level |
/// |---|---|
/// | `Connected`, `Closed` | debug |
/// | `CheckedOut`, `CheckedIn` | trace |
/// | `ConnectFailed`, `Invalidated`, `Retry`, `LeakSuspected` | warn |
///
/// Every line carries key-values for loggers that read them: `pool`, `event`
/// ([`PoolEvent::name`]) and the event's own fields (`connection_id`, `took_ms`,
/// `waited_ms`, `held_ms`, `reason`, `attempt`, `class`, `delay_ms`, `error`).
///
/// Every string, in the message and in the fields, is passed through [`redact`] before it is
/// logged.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogListener;

impl LogListener {
    fn level(event: &PoolEvent<'_>) -> log::Level {
        match event {
            PoolEvent::Connected { .. } | PoolEvent::Closed { .. } => log::Level::Debug,
            PoolEvent::CheckedOut { .. } | PoolEvent::CheckedIn { .. } => log::Level::Trace,
            PoolEvent::ConnectFailed { .. }
            | PoolEvent::Invalidated { .. }
            | PoolEvent::Retry { .. }
            | PoolEvent::LeakSuspected { .. } => log::Level::Warn,
        }
    }

    fn message(event: &PoolEvent<'_>) -> String {
        let pool = redact(event.pool());
        match *event {
            PoolEvent::Connected {
                connection_id,
                took,
                ..
            } => format!("pool {pool}: connection {connection_id} opened in {took:?}"),
            PoolEvent::ConnectFailed { error, .. } => {
                format!(
                    "pool {pool}: could not open a connection: {}",
                    redact(error)
                )
            }
            PoolEvent::CheckedOut {
                connection_id,
                waited,
                ..
            } => format!(
                "pool {pool}: connection {connection_id} checked out after waiting {waited:?}"
            ),
            PoolEvent::CheckedIn {
                connection_id,
                held,
                ..
            } => format!("pool {pool}: connection {connection_id} checked in after {held:?}"),
            PoolEvent::Closed {
                connection_id,
                reason,
                ..
            } => format!("pool {pool}: connection {connection_id} closed ({reason})"),
            PoolEvent::Invalidated { reason, .. } => format!(
                "pool {pool}: invalidated, older connections will be checked before reuse: {}",
                redact(reason)
            ),
            PoolEvent::Retry {
                attempt,
                class,
                delay,
                error,
                ..
            } => format!(
                "pool {pool}: attempt {attempt} failed ({}), retrying in {delay:?}: {}",
                redact(class),
                redact(error)
            ),
            PoolEvent::LeakSuspected {
                connection_id,
                held,
                checked_out_at,
                ..
            } => format!(
                "pool {pool}: connection {connection_id} held for {held:?}, possibly leaked; \
                 checked out at:\n{}",
                redact(checked_out_at)
            ),
        }
    }
}

/// A structured field's value: text is redacted before it gets here.
enum Field {
    Text(String),
    Count(u64),
    Millis(f64),
}

impl Field {
    fn millis(d: Duration) -> Field {
        Field::Millis(d.as_secs_f64() * 1000.0)
    }

    fn to_value(&self) -> log::kv::Value<'_> {
        match self {
            Field::Text(s) => log::kv::Value::from(s.as_str()),
            Field::Count(n) => log::kv::Value::from(*n),
            Field::Millis(ms) => log::kv::Value::from(*ms),
        }
    }
}

/// The event's fields as key-values, every string redacted: `pool` and `event` always, then
/// the event's own (`connection_id`, `took_ms`, `waited_ms`, `held_ms`, `error`, `reason`,
/// `attempt`, `class`, `delay_ms`).
fn fields(event: &PoolEvent<'_>) -> Vec<(&'static str, Field)> {
    let mut f = vec![
        ("pool", Field::Text(redact(event.pool()))),
        ("event", Field::Text(event.name().to_owned())),
    ];
    match *event {
        PoolEvent::Connected {
            connection_id,
            took,
            ..
        } => {
            f.push(("connection_id", Field::Count(connection_id)));
            f.push(("took_ms", Field::millis(took)));
        }
        PoolEvent::ConnectFailed { error, .. } => f.push(("error", Field::Text(redact(error)))),
        PoolEvent::CheckedOut {
            connection_id,
            waited,
            ..
        } => {
            f.push(("connection_id", Field::Count(connection_id)));
            f.push(("waited_ms", Field::millis(waited)));
        }
        PoolEvent::CheckedIn {
            connection_id,
            held,
            ..
        }
        | PoolEvent::LeakSuspected {
            connection_id,
            held,
            ..
        } => {
            f.push(("connection_id", Field::Count(connection_id)));
            f.push(("held_ms", Field::millis(held)));
        }
        PoolEvent::Closed {
            connection_id,
            reason,
            ..
        } => {
            f.push(("connection_id", Field::Count(connection_id)));
            f.push(("reason", Field::Text(reason.to_string())));
        }
        PoolEvent::Invalidated { reason, .. } => f.push(("reason", Field::Text(redact(reason)))),
        PoolEvent::Retry {
            attempt,
            class,
            delay,
            error,
            ..
        } => {
            f.push(("attempt", Field::Count(u64::from(attempt))));
            f.push(("class", Field::Text(redact(class))));
            f.push(("delay_ms", Field::millis(delay)));
            f.push(("error", Field::Text(redact(error))));
        }
    }
    f
}

/// The fields as a `log` key-value source.
struct Fields(Vec<(&'static str, Field)>);

impl log::kv::Source for Fields {
    fn visit<'kvs>(
        &'kvs self,
        visitor: &mut dyn log::kv::VisitSource<'kvs>,
    ) -> Result<(), log::kv::Error> {
        for (key, value) in &self.0 {
            visitor.visit_pair(log::kv::Key::from_str(key), value.to_value())?;
        }
        Ok(())
    }
}

impl EventListener for LogListener {
    fn on_event(&self, event: &PoolEvent<'_>) {
        let level = Self::level(event);
        // Redacting costs a scan of every string: only for lines that will be written.
        if log::log_enabled!(target: LOG_TARGET, level) {
            let fields = Fields(fields(event));
            let message = Self::message(event);
            log::logger().log(
                &log::Record::builder()
                    .target(LOG_TARGET)
                    .level(level)
                    .module_path_static(Some(module_path!()))
                    .file_static(Some(file!()))
                    .line(Some(line!()))
                    .key_values(&fields)
                    .args(format_args!("{message}"))
                    .build(),
            );
        }
    }
}

/// Emits a `tracing` event at a level chosen at run time (`tracing`'s macros take a constant).
#[cfg(feature = "tracing")]
macro_rules! trace_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            log::Level::Trace => tracing::event!(target: LOG_TARGET, tracing::Level::TRACE, $($rest)+),
            log::Level::Debug => tracing::event!(target: LOG_TARGET, tracing::Level::DEBUG, $($rest)+),
            log::Level::Info => tracing::event!(target: LOG_TARGET, tracing::Level::INFO, $($rest)+),
            log::Level::Warn => tracing::event!(target: LOG_TARGET, tracing::Level::WARN, $($rest)+),
            log::Level::Error => tracing::event!(target: LOG_TARGET, tracing::Level::ERROR, $($rest)+),
        }
    };
}

/// Emits every event as a `tracing` event (cargo feature `tracing`) under the target
/// [`LOG_TARGET`], at [`LogListener`]'s levels, with structured fields: `pool`, `event`
/// ([`PoolEvent::name`]) and the event's own (`connection_id`, `took_ms`, `waited_ms`,
/// `held_ms`, `reason`, `attempt`, `class`, `delay_ms`, `error`), every string redacted,
/// and the same message as [`LogListener`]'s. Install it with the builder's
/// `event_listener(TracingListener)`; the pools' few other lines (a thread that could not
/// start, a server reachable again) stay on the `log` facade, which `tracing-log` bridges.
#[cfg(feature = "tracing")]
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingListener;

#[cfg(feature = "tracing")]
impl EventListener for TracingListener {
    fn on_event(&self, event: &PoolEvent<'_>) {
        let level = LogListener::level(event);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // Field values and the message are computed only for an enabled event.
        let name = event.name();
        match *event {
            PoolEvent::Connected {
                pool,
                connection_id,
                took,
            } => trace_at!(level, pool = %redact(pool), event = name, connection_id,
                took_ms = ms(took), "{}", LogListener::message(event)),
            PoolEvent::ConnectFailed { pool, error } => trace_at!(level, pool = %redact(pool),
                event = name, error = %redact(error), "{}", LogListener::message(event)),
            PoolEvent::CheckedOut {
                pool,
                connection_id,
                waited,
            } => trace_at!(level, pool = %redact(pool), event = name, connection_id,
                waited_ms = ms(waited), "{}", LogListener::message(event)),
            PoolEvent::CheckedIn {
                pool,
                connection_id,
                held,
            }
            | PoolEvent::LeakSuspected {
                pool,
                connection_id,
                held,
                ..
            } => trace_at!(level, pool = %redact(pool), event = name, connection_id,
                held_ms = ms(held), "{}", LogListener::message(event)),
            PoolEvent::Closed {
                pool,
                connection_id,
                reason,
            } => trace_at!(level, pool = %redact(pool), event = name, connection_id,
                reason = %reason, "{}", LogListener::message(event)),
            PoolEvent::Invalidated { pool, reason } => trace_at!(level, pool = %redact(pool),
                event = name, reason = %redact(reason), "{}", LogListener::message(event)),
            PoolEvent::Retry {
                pool,
                attempt,
                class,
                delay,
                error,
            } => trace_at!(level, pool = %redact(pool), event = name, attempt,
                class = %redact(class), delay_ms = ms(delay), error = %redact(error),
                "{}", LogListener::message(event)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex, Once};

    thread_local! {
        static LINES: RefCell<Vec<(log::Level, String, String)>> = const { RefCell::new(Vec::new()) };
        /// The key-values of the last line logged on this thread.
        static KVS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    }

    struct Collect(Vec<(String, String)>);

    impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            self.0.push((key.to_string(), value.to_string()));
            Ok(())
        }
    }

    /// Captures log lines per thread, so parallel tests do not see each other's lines.
    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = (
                record.level(),
                record.target().to_owned(),
                record.args().to_string(),
            );
            let mut kvs = Collect(Vec::new());
            let _ = record.key_values().visit(&mut kvs);
            KVS.with(|k| *k.borrow_mut() = kvs.0);
            LINES.with(|l| l.borrow_mut().push(line));
        }
        fn flush(&self) {}
    }

    fn captured(event: &PoolEvent<'_>) -> (log::Level, String, String) {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            // Another logger may already be installed in this test binary; then we cannot
            // capture, and the tests below would fail loudly rather than pass silently.
            let _ = log::set_logger(&Capture);
            log::set_max_level(log::LevelFilter::Trace);
        });
        LINES.with(|l| l.borrow_mut().clear());
        LogListener.on_event(event);
        LINES
            .with(|l| l.borrow_mut().pop())
            .expect("LogListener logged nothing")
    }

    const SECRET_URL: &str = "postgres://app:S3NT1NEL@db/app";

    #[test]
    fn log_listener_uses_the_documented_levels_and_target() {
        let ms = Duration::from_millis(3);
        for (event, level) in [
            (
                PoolEvent::Connected {
                    pool: "p",
                    connection_id: 1,
                    took: ms,
                },
                log::Level::Debug,
            ),
            (
                PoolEvent::CheckedOut {
                    pool: "p",
                    connection_id: 1,
                    waited: ms,
                },
                log::Level::Trace,
            ),
            (
                PoolEvent::CheckedIn {
                    pool: "p",
                    connection_id: 1,
                    held: ms,
                },
                log::Level::Trace,
            ),
            (
                PoolEvent::Closed {
                    pool: "p",
                    connection_id: 1,
                    reason: CloseReason::Expired,
                },
                log::Level::Debug,
            ),
            (
                PoolEvent::ConnectFailed {
                    pool: "p",
                    error: "refused",
                },
                log::Level::Warn,
            ),
            (
                PoolEvent::Invalidated {
                    pool: "p",
                    reason: "restart",
                },
                log::Level::Warn,
            ),
            (
                PoolEvent::Retry {
                    pool: "p",
                    attempt: 1,
                    class: "deadlock",
                    delay: ms,
                    error: "40P01",
                },
                log::Level::Warn,
            ),
            (
                PoolEvent::LeakSuspected {
                    pool: "p",
                    connection_id: 1,
                    held: ms,
                    checked_out_at: "main.rs:3",
                },
                log::Level::Warn,
            ),
        ] {
            let (got, target, line) = captured(&event);
            assert_eq!(got, level, "{event:?}");
            assert_eq!(target, LOG_TARGET);
            assert!(line.starts_with("pool p: "), "{line}");
        }
    }

    #[test]
    fn log_listener_redacts_every_string_again() {
        let conninfo = "host=db password=S3NT1NEL";
        for event in [
            PoolEvent::ConnectFailed {
                pool: "p",
                error: SECRET_URL,
            },
            PoolEvent::Invalidated {
                pool: "p",
                reason: conninfo,
            },
            PoolEvent::Retry {
                pool: SECRET_URL,
                attempt: 2,
                class: conninfo,
                delay: Duration::ZERO,
                error: SECRET_URL,
            },
            PoolEvent::LeakSuspected {
                pool: "p",
                connection_id: 7,
                held: Duration::from_secs(60),
                checked_out_at: "at connect(postgres://app:S3NT1NEL@db/app)",
            },
        ] {
            let (_, _, line) = captured(&event);
            assert!(!line.contains("S3NT1NEL"), "{line}");
        }
    }

    /// The key-values LogListener gives `event`.
    fn kvs_of(event: &PoolEvent<'_>) -> Vec<(String, String)> {
        captured(event);
        KVS.with(|k| k.borrow().clone())
    }

    #[test]
    fn log_lines_carry_the_pool_the_event_and_its_fields_as_key_values_redacted() {
        let kv = kvs_of(&PoolEvent::Retry {
            pool: "orders",
            attempt: 2,
            class: "serialization_failure",
            delay: Duration::from_millis(40),
            error: SECRET_URL,
        });
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("pool").as_deref(), Some("orders"), "{kv:?}");
        assert_eq!(get("event").as_deref(), Some("retry"), "{kv:?}");
        assert_eq!(get("attempt").as_deref(), Some("2"), "{kv:?}");
        assert_eq!(get("class").as_deref(), Some("serialization_failure"));
        assert_eq!(get("delay_ms").as_deref(), Some("40"), "{kv:?}");
        let error = get("error").expect("the error field");
        assert!(
            !error.contains("S3NT1NEL") && error.contains("db"),
            "{error}"
        );
        let kv = kvs_of(&PoolEvent::Closed {
            pool: SECRET_URL,
            connection_id: 9,
            reason: CloseReason::Broken,
        });
        let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("event").as_deref(), Some("closed"));
        assert_eq!(get("connection_id").as_deref(), Some("9"));
        assert!(get("reason").is_some(), "{kv:?}");
        assert!(
            !get("pool").unwrap_or_default().contains("S3NT1NEL"),
            "{kv:?}"
        );
        let names: Vec<&str> = [
            PoolEvent::Connected {
                pool: "p",
                connection_id: 1,
                took: Duration::ZERO,
            },
            PoolEvent::CheckedOut {
                pool: "p",
                connection_id: 1,
                waited: Duration::ZERO,
            },
            PoolEvent::CheckedIn {
                pool: "p",
                connection_id: 1,
                held: Duration::ZERO,
            },
            PoolEvent::ConnectFailed {
                pool: "p",
                error: "e",
            },
            PoolEvent::Invalidated {
                pool: "p",
                reason: "r",
            },
            PoolEvent::LeakSuspected {
                pool: "p",
                connection_id: 1,
                held: Duration::ZERO,
                checked_out_at: "",
            },
        ]
        .iter()
        .map(|e| {
            let kv = kvs_of(e);
            assert_eq!(kv[0].0, "pool");
            assert_eq!(kv[1].1, e.name());
            e.name()
        })
        .collect();
        assert_eq!(
            names,
            [
                "connected",
                "checked_out",
                "checked_in",
                "connect_failed",
                "invalidated",
                "leak_suspected"
            ]
        );
    }

    #[cfg(feature = "tracing")]
    mod tracing_listener {
        use super::*;
        use std::sync::Mutex;

        /// One event: its level and its fields (as text).
        type Seen = (tracing::Level, Vec<(String, String)>);

        /// Records every event.
        #[derive(Default)]
        struct Recorder(Mutex<Vec<Seen>>);

        struct Fields(Vec<(String, String)>);

        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.push((field.name().to_owned(), value.to_owned()));
            }
        }

        impl tracing::Subscriber for &'static Recorder {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                let mut fields = Fields(Vec::new());
                event.record(&mut fields);
                assert_eq!(event.metadata().target(), LOG_TARGET);
                self.0
                    .lock()
                    .unwrap()
                    .push((*event.metadata().level(), fields.0));
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }

        #[test]
        fn tracing_events_carry_structured_fields_redacted_at_the_log_levels() {
            let recorder: &'static Recorder = Box::leak(Box::default());
            tracing::subscriber::with_default(recorder, || {
                TracingListener.on_event(&PoolEvent::Retry {
                    pool: "orders",
                    attempt: 3,
                    class: "serialization_failure",
                    delay: Duration::from_millis(25),
                    error: SECRET_URL,
                });
                TracingListener.on_event(&PoolEvent::CheckedOut {
                    pool: SECRET_URL,
                    connection_id: 4,
                    waited: Duration::ZERO,
                });
            });
            let seen = recorder.0.lock().unwrap();
            assert_eq!(seen.len(), 2, "{seen:?}");
            let (level, fields) = &seen[0];
            assert_eq!(*level, tracing::Level::WARN);
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            assert_eq!(get("pool"), Some("orders"), "{fields:?}");
            assert_eq!(get("event"), Some("retry"), "{fields:?}");
            assert_eq!(get("attempt"), Some("3"), "{fields:?}");
            assert_eq!(get("delay_ms"), Some("25.0"), "{fields:?}");
            let error = get("error").expect("the error field");
            assert!(!error.contains("S3NT1NEL"), "{error}");
            let message = get("message").expect("the message");
            assert!(message.contains("attempt 3"), "{message}");
            assert!(!message.contains("S3NT1NEL"), "{message}");
            let (level, fields) = &seen[1];
            assert_eq!(*level, tracing::Level::TRACE);
            assert!(
                fields.iter().all(|(_, v)| !v.contains("S3NT1NEL")),
                "{fields:?}"
            );
            assert!(fields.iter().any(|(n, v)| n == "connection_id" && v == "4"));
        }
    }

    #[test]
    fn closures_are_listeners() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let listener: Arc<dyn EventListener> = Arc::new(move |e: &PoolEvent<'_>| {
            sink.lock().unwrap().push(e.pool().to_owned());
        });
        listener.on_event(&PoolEvent::Invalidated {
            pool: "jobs",
            reason: "x",
        });
        assert_eq!(*seen.lock().unwrap(), ["jobs"]);
    }

    /// The log lines `f` writes on this thread.
    fn lines_of(f: impl FnOnce()) -> Vec<(log::Level, String, String)> {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Trace);
        LINES.with(|l| l.borrow_mut().clear());
        f();
        LINES.with(|l| std::mem::take(&mut *l.borrow_mut()))
    }

    fn pool_state(listener: Arc<dyn EventListener>) -> crate::engine::PoolState {
        let config = crate::config::PoolConfig::builder("postgres://app@db/app")
            .build()
            .unwrap();
        crate::engine::PoolState::new(config, listener, None).unwrap()
    }

    fn saying<'a>(lines: &'a [(log::Level, String, String)], what: &str) -> Vec<&'a str> {
        lines
            .iter()
            .map(|(_, _, message)| message.as_str())
            .filter(|m| m.contains(what))
            .collect()
    }

    #[test]
    fn a_panicking_listener_is_logged_once_and_a_calm_one_never() {
        let event = PoolEvent::Invalidated {
            pool: "p",
            reason: "x",
        };
        let panicky = pool_state(Arc::new(|_: &PoolEvent<'_>| panic!("listener bug")));
        let first = lines_of(|| panicky.emit(&event));
        assert_eq!(saying(&first, "listener panicked").len(), 1, "{first:?}");
        let again = lines_of(|| panicky.emit(&event));
        assert!(saying(&again, "listener panicked").is_empty(), "{again:?}");
        let calm = pool_state(Arc::new(|_: &PoolEvent<'_>| {}));
        let lines = lines_of(|| calm.emit(&event));
        assert!(saying(&lines, "listener panicked").is_empty(), "{lines:?}");
    }

    #[test]
    fn a_missing_probe_is_warned_about_once() {
        let p = pool_state(Arc::new(|_: &PoolEvent<'_>| {}));
        let warned = lines_of(|| {
            p.set_probe_available(true, "still there");
            p.set_probe_available(false, "no socket");
            p.set_probe_available(false, "no socket");
        });
        let warned = saying(&warned, "no zero-round-trip liveness probe");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("no socket"), "{warned:?}");
        assert!(!p.probe_available());
    }
}
