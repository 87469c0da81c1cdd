//! axum integration (cargo feature `axum`): an extractor for an owned checkout, and
//! ready-made readiness and status handlers.
//!
//! * [`DbConn`]: a handler argument holding a connection checked out through
//!   [`ExtPool::get_owned`] (the pool's gate, arrival order, validation, budget and stats).
//!   When no connection can be had the request is answered `503 Service Unavailable` with
//!   `Retry-After: 1` and a short JSON body naming the cause ([`DbUnavailable`]).
//! * [`ready`]: `200` with [`Health::to_json`](pool_core::readiness::Health::to_json) when
//!   [`ExtPool::health`] says the pool is ready, `503` with the same JSON otherwise: a
//!   readiness probe.
//! * [`pool_status`]: `200` with the pool's [`StatusReport`](pool_core::status::StatusReport)
//!   as JSON.
//!
//! Every message is the pool's own, already redacted: no response carries a password.
//!
//! ```no_run
//! use axum::routing::get;
//! use axum::Router;
//! use diesel_async::{AsyncPgConnection, RunQueryDsl};
//! use diesel_async_ext::axum::{pool_status, ready, DbConn};
//! use diesel_async_ext::PgPool;
//!
//! async fn count(DbConn(mut conn): DbConn<AsyncPgConnection>) -> String {
//!     let n: i64 = diesel::select(diesel::dsl::sql::<diesel::sql_types::BigInt>("count(*) FROM orders"))
//!         .get_result(&mut *conn)
//!         .await
//!         .unwrap_or(-1);
//!     n.to_string()
//! }
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = PgPool::builder("postgres://app@localhost/app").build().await?;
//! let app: Router = Router::new()
//!     .route("/orders/count", get(count))
//!     .route("/ready", get(ready::<AsyncPgConnection>))
//!     .route("/pool/status", get(pool_status::<AsyncPgConnection>))
//!     .with_state(pool);
//! # let _ = app; Ok(())
//! # }
//! ```

use std::future::Future;

use ::axum::extract::{FromRef, FromRequestParts, State};
use ::axum::http::{header, request::Parts, HeaderValue, StatusCode};
use ::axum::response::{IntoResponse, Response};

use crate::backend::ExtConnection;
use crate::manager::{ExtError, ExtManager};
use crate::pool::ExtPool;
use crate::PooledConnection;

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A connection checked out of the [`ExtPool`] in the router's state, for one request: an
/// axum extractor.
///
/// The checkout is [`ExtPool::get_owned`]: the same gate, arrival order, validation, budget
/// and stats as [`ExtPool::get`], waiting at most the pool's `pool_timeout`. The connection
/// goes back to the pool when the handler drops it. The state must hold the pool
/// (`ExtPool<C>: FromRef<S>`: the state is the pool, or a struct with a `#[derive(FromRef)]`
/// or a hand-written `FromRef` for it).
///
/// When no connection can be had, the handler is not called: the request is answered with
/// [`DbUnavailable`] (`503`).
///
/// ```no_run
/// use diesel_async::{AsyncPgConnection, RunQueryDsl};
/// use diesel_async_ext::axum::DbConn;
///
/// async fn ping(DbConn(mut conn): DbConn<AsyncPgConnection>) -> &'static str {
///     match diesel::sql_query("SELECT 1").execute(&mut *conn).await {
///         Ok(_) => "pong",
///         Err(_) => "error",
///     }
/// }
/// ```
pub struct DbConn<C: ExtConnection>(pub PooledConnection<'static, ExtManager<C>>);

impl<C: ExtConnection> DbConn<C> {
    /// The checkout (bb8's `PooledConnection`).
    pub fn into_inner(self) -> PooledConnection<'static, ExtManager<C>> {
        self.0
    }
}

impl<C: ExtConnection> std::ops::Deref for DbConn<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0
    }
}

impl<C: ExtConnection> std::ops::DerefMut for DbConn<C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.0
    }
}

impl<C: ExtConnection> std::fmt::Debug for DbConn<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DbConn(..)")
    }
}

impl<S, C> FromRequestParts<S> for DbConn<C>
where
    C: ExtConnection,
    ExtPool<C>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = DbUnavailable;

    fn from_request_parts(
        _parts: &mut Parts,
        state: &S,
    ) -> impl Future<Output = Result<Self, Self::Rejection>> + Send {
        let pool = ExtPool::<C>::from_ref(state);
        async move {
            pool.get_owned()
                .await
                .map(DbConn)
                .map_err(|e| DbUnavailable::from(&e))
        }
    }
}

/// The rejection of [`DbConn`]: no connection could be had. Answers
/// `503 Service Unavailable`, `Retry-After: 1`, and a JSON body
/// `{"error": "database unavailable", "cause": "...", "message": "..."}`, where `cause` is
/// [`DbUnavailable::cause`] and `message` is the pool's error, already redacted.
#[derive(Debug, Clone)]
pub struct DbUnavailable {
    cause: &'static str,
    message: String,
}

impl DbUnavailable {
    /// A short stable name for what kept the pool from serving: the connect failure's cause
    /// (`refused`, `auth`, `tls`, `connect_timeout`, ..., see
    /// [`ConnectCause::as_str`](crate::ConnectCause::as_str)), or `budget`, `validation`,
    /// `retired`, `unavailable`, `closed`, or `timeout` (every connection was in use).
    pub fn cause(&self) -> &'static str {
        self.cause
    }

    /// The pool's error message (redacted: never a password).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<&ExtError> for DbUnavailable {
    fn from(e: &ExtError) -> Self {
        let cause = match e.root() {
            ExtError::Connect { cause, .. } => cause.as_str(),
            ExtError::Budget { .. } => "budget",
            ExtError::PingFailed { .. } => "validation",
            ExtError::Retired(_) => "retired",
            ExtError::Unavailable { .. } => "unavailable",
            ExtError::Closed { .. } => "closed",
            _ => "timeout",
        };
        DbUnavailable {
            cause,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for DbUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database unavailable ({}): {}", self.cause, self.message)
    }
}

impl std::error::Error for DbUnavailable {}

impl IntoResponse for DbUnavailable {
    fn into_response(self) -> Response {
        let body = format!(
            "{{\"error\":\"database unavailable\",\"cause\":{},\"message\":{}}}",
            json_string(self.cause),
            json_string(&self.message)
        );
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [
                (header::CONTENT_TYPE, JSON),
                (header::RETRY_AFTER, HeaderValue::from_static("1")),
            ],
            body,
        )
            .into_response()
    }
}

/// A readiness probe: `200 OK` with [`Health::to_json`](pool_core::readiness::Health::to_json)
/// when [`ExtPool::health`] answers ready, `503 Service Unavailable` with the same JSON
/// (degraded or unreachable, the error class and its redacted message) otherwise.
///
/// `health` never waits behind the pool's callers and makes at most one bounded round trip;
/// mount it with the pool as the router's state (or any state the pool is
/// [`FromRef`] of):
///
/// ```no_run
/// # async fn f(pool: diesel_async_ext::PgPool) {
/// use axum::{routing::get, Router};
/// use diesel_async::AsyncPgConnection;
///
/// let app: Router = Router::new()
///     .route("/ready", get(diesel_async_ext::axum::ready::<AsyncPgConnection>))
///     .with_state(pool);
/// # let _ = app; }
/// ```
pub async fn ready<C: ExtConnection>(State(pool): State<ExtPool<C>>) -> Response {
    let health = pool.health().await;
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, JSON)], health.to_json()).into_response()
}

/// The pool's status: `200 OK` with [`ExtPool::status`]'s report as JSON
/// ([`StatusReport::to_json`](pool_core::status::StatusReport::to_json): the pool's numbers,
/// no round trip, no password).
///
/// ```no_run
/// # async fn f(pool: diesel_async_ext::PgPool) {
/// use axum::{routing::get, Router};
/// use diesel_async::AsyncPgConnection;
///
/// let app: Router = Router::new()
///     .route("/pool/status", get(diesel_async_ext::axum::pool_status::<AsyncPgConnection>))
///     .with_state(pool);
/// # let _ = app; }
/// ```
pub async fn pool_status<C: ExtConnection>(State(pool): State<ExtPool<C>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, JSON)],
        pool.status().to_json(),
    )
        .into_response()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rejection_is_a_503_with_retry_after_and_a_json_cause() {
        let e = ExtError::Timeout {
            pool: "orders".into(),
            waited: std::time::Duration::from_millis(30),
            state: "2 in use".into(),
            cause: Some(Box::new(ExtError::Connect {
                pool: "orders".into(),
                cause: crate::ConnectCause::Refused,
                message: "connection refused \"quoted\"\n".into(),
            })),
        };
        let rejection = DbUnavailable::from(&e);
        assert_eq!(rejection.cause(), "refused");
        let response = rejection.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
        // The last control character is escaped; a space, the first printable one, is not.
        assert_eq!(json_string("\u{1f} \u{7f}é"), "\"\\u001f \u{7f}é\"");
    }

    /// Every kind of checkout failure names its cause (the root of a timeout's chain), and
    /// the message is the error's own text.
    #[test]
    fn each_checkout_failure_names_its_cause() {
        let pool = || "orders".to_owned();
        let cases = [
            (
                ExtError::Budget {
                    pool: pool(),
                    message: "no permit".into(),
                },
                "budget",
            ),
            (
                ExtError::PingFailed {
                    elapsed_ms: 5,
                    timeout_ms: 5,
                    message: "no reply".into(),
                },
                "validation",
            ),
            (
                ExtError::Retired(pool_core::lifecycle::CloseReason::Expired),
                "retired",
            ),
            (
                ExtError::Unavailable {
                    pool: pool(),
                    message: "database \"x\" does not exist".into(),
                },
                "unavailable",
            ),
            (ExtError::Closed { pool: pool() }, "closed"),
            (
                ExtError::Timeout {
                    pool: pool(),
                    waited: std::time::Duration::from_millis(30),
                    state: "2 in use".into(),
                    cause: None,
                },
                "timeout",
            ),
        ];
        for (error, cause) in cases {
            let rejection = DbUnavailable::from(&error);
            assert_eq!(rejection.cause(), cause, "{error}");
            assert_eq!(rejection.message(), error.to_string());
            assert_eq!(
                rejection.to_string(),
                format!("database unavailable ({cause}): {error}")
            );
        }
    }

    async fn body_of(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("the body");
        String::from_utf8(bytes.to_vec()).expect("UTF-8")
    }

    /// The readiness and status handlers answer with the pool's JSON (an embedded database:
    /// ready, one idle connection).
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn the_ready_and_status_handlers_answer_with_the_pools_json() {
        use diesel::SqliteConnection;
        use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
        type Conn = SyncConnectionWrapper<SqliteConnection>;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("app.db").display());
        let pool = ExtPool::<Conn>::builder(&url)
            .name("handlers")
            .pool_size(1)
            .max_overflow(0)
            .build()
            .await
            .unwrap();
        let response = ready::<Conn>(State(pool.clone())).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = body_of(response).await;
        assert!(
            body.contains("\"pool\": \"handlers\"") && body.contains("\"state\": \"ready\""),
            "{body}"
        );
        let response = pool_status::<Conn>(State(pool.clone())).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = body_of(response).await;
        assert!(body.starts_with('{') && body.contains("handlers"), "{body}");
        // The extractor's checkout shows nothing of the connection (nor of its URL).
        let conn = DbConn(pool.get_owned().await.unwrap());
        assert_eq!(format!("{conn:?}"), "DbConn(..)");
    }
}
