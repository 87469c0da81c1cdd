//! A webhook receiver on diesel-async-ext's pool: each delivered event is stored exactly once,
//! whatever the database does meanwhile (a killed backend, a restart, a failover), and a
//! redelivery of an event already stored is acknowledged without storing it again.
//!
//! | route | answers |
//! |---|---|
//! | `GET /health` | liveness: `200 ok`, never touches the database |
//! | `GET /ready` | readiness: `200` with the pool's health as JSON when it can serve, else `503` ([`diesel_async_ext::axum::ready`]) |
//! | `GET /pool/status` | the pool's status report as JSON ([`diesel_async_ext::axum::pool_status`]) |
//! | `GET /metrics` | Prometheus text: the pool's metrics (docs/metrics.md) and the service's |
//! | `GET /webhooks/{id}` | the stored event as JSON (`404` if none; `503` when no connection: [`diesel_async_ext::axum::DbConn`]'s rejection) |
//! | `POST /webhooks` | `{"id": "...", "payload": "..."}`: `201` stored, `200` already stored, `400` bad input, `503` the database stayed unavailable past the retry policy (redeliver) |
//!
//! An event is stored with [`commit_with_key`] under the key `webhook:<id>`: the event's row
//! and the key are written in one transaction, retried on transient failures; a commit cut
//! off in flight is resolved by looking the key up, never by writing the row again.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use diesel_async_ext::axum::DbConn;
use diesel_async_ext::retry::{
    commit_with_key, Keyed, RetryError, RetryPolicy, IDEMPOTENCY_TABLE_SQL,
    MAX_IDEMPOTENCY_KEY_CHARS,
};
use diesel_async_ext::PgPool;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

/// The table the events go to. No unique constraint on `event_id`: storing an event once is
/// the idempotency key's job (the key's table has one), and the tests count the rows per
/// event to prove it. An application may add `UNIQUE (event_id)` as a second line of defense.
pub const EVENTS_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS webhook_events (\
     seq bigserial PRIMARY KEY, \
     event_id text NOT NULL, \
     payload text NOT NULL, \
     received_at timestamptz NOT NULL DEFAULT now())";

/// The prefix of the idempotency keys this service writes (`webhook:<id>`).
pub const KEY_PREFIX: &str = "webhook:";

/// The longest event id accepted (the idempotency key's limit, less [`KEY_PREFIX`]).
pub const MAX_ID_CHARS: usize = MAX_IDEMPOTENCY_KEY_CHARS - KEY_PREFIX.len();

/// The router's state: the pool, the Prometheus handle and the retry policy.
#[derive(Clone)]
pub struct AppState {
    /// The pool every route that touches the database uses.
    pub pool: PgPool,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// How `POST /webhooks` retries.
    pub policy: Arc<RetryPolicy>,
}

impl FromRef<AppState> for PgPool {
    fn from_ref(state: &AppState) -> PgPool {
        state.pool.clone()
    }
}

/// The service's routes on `pool`, with the default retry policy.
pub fn app(pool: PgPool, prometheus: PrometheusHandle) -> Router {
    app_with_policy(pool, prometheus, RetryPolicy::default())
}

/// The service's routes on `pool`, storing events with `policy`.
pub fn app_with_policy(pool: PgPool, prometheus: PrometheusHandle, policy: RetryPolicy) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/ready",
            get(diesel_async_ext::axum::ready::<AsyncPgConnection>),
        )
        .route(
            "/pool/status",
            get(diesel_async_ext::axum::pool_status::<AsyncPgConnection>),
        )
        .route("/metrics", get(render_metrics))
        .route("/webhooks", post(receive))
        .route("/webhooks/{id}", get(lookup))
        .with_state(AppState {
            pool,
            prometheus,
            policy: Arc::new(policy),
        })
}

/// The process's Prometheus recorder, installed on the first call (later calls return the
/// same handle). Call it **before building the pool**: a pool registers its metrics once,
/// when it is built, with the recorder installed then.
///
/// # Errors
/// When another `metrics` recorder was installed already.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| e.to_string())
        })
        .clone()
}

/// Creates the service's tables if they do not exist: the idempotency keys' and
/// [`EVENTS_TABLE_SQL`].
///
/// # Errors
/// No connection, or the statements failed (the role may not create tables).
pub async fn migrate(pool: &PgPool) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    conn.batch_execute(&format!("{IDEMPOTENCY_TABLE_SQL}; {EVENTS_TABLE_SQL}"))
        .await
        .map_err(|e| e.to_string())
}

/// Serves `app` on `listener` until `shutdown` completes (then lets requests under way
/// finish). Runs the Prometheus handle's upkeep (histogram maintenance) every 5 s meanwhile,
/// if one is given.
///
/// Tests bind `127.0.0.1:0`, read the port from the listener, and spawn this.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let upkeep = prometheus.map(|handle| {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        })
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Some(upkeep) = upkeep {
        upkeep.abort();
    }
    served
}

/// `GET /health`: the process answers. Never touches the database.
async fn health() -> &'static str {
    "ok"
}

/// `GET /metrics`: the Prometheus text format.
async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// A webhook delivery.
#[derive(Debug, serde::Deserialize)]
struct Webhook {
    id: String,
    payload: String,
}

/// `POST /webhooks`.
async fn receive(State(state): State<AppState>, body: Bytes) -> Response {
    let event: Webhook = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(e) => return answer(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
    };
    if event.id.is_empty() || event.id.chars().count() > MAX_ID_CHARS {
        return answer(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("id must be 1 to {MAX_ID_CHARS} characters"),
        );
    }
    let key = format!("{KEY_PREFIX}{}", event.id);
    let (id, payload) = (&event.id, &event.payload);
    let stored = commit_with_key(
        &state.pool,
        &state.policy,
        &key,
        async |conn: &mut AsyncPgConnection| {
            diesel::sql_query("INSERT INTO webhook_events (event_id, payload) VALUES ($1, $2)")
                .bind::<Text, _>(id)
                .bind::<Text, _>(payload)
                .execute(conn)
                .await
        },
    )
    .await;
    match stored {
        Ok(Keyed::Committed(_)) => stored_answer(StatusCode::CREATED, id, "stored"),
        Ok(Keyed::AlreadyCommitted) => stored_answer(StatusCode::OK, id, "already_stored"),
        Err(e) => {
            // The full error goes to the log (the pool's messages are redacted); the client
            // learns only what to do.
            log::warn!("webhook {id:?} not stored: {e}");
            match e {
                RetryError::Permanent(_) => answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "not_stored",
                    "the event could not be stored",
                ),
                RetryError::AmbiguousCommit { .. } => unavailable(
                    "outcome_unknown",
                    "the outcome could not be established; deliver again (it is stored once)",
                ),
                // Exhausted (transient failures past the policy) and Pool (no connection).
                _ => unavailable(
                    "database_unavailable",
                    "the database stayed unavailable; deliver again",
                ),
            }
        }
    }
}

#[derive(diesel::QueryableByName)]
struct StoredEvent {
    #[diesel(sql_type = Text)]
    payload: String,
}

/// `GET /webhooks/{id}`: the stored event. The connection comes from the [`DbConn`]
/// extractor: when the pool has none to give, the handler is not called and the answer is
/// `503` with `Retry-After: 1`.
async fn lookup(Path(id): Path<String>, DbConn(mut conn): DbConn<AsyncPgConnection>) -> Response {
    let found = diesel::sql_query("SELECT payload FROM webhook_events WHERE event_id = $1 LIMIT 1")
        .bind::<Text, _>(&id)
        .get_results::<StoredEvent>(&mut *conn)
        .await;
    match found {
        Ok(rows) => match rows.into_iter().next() {
            Some(event) => json(
                StatusCode::OK,
                serde_json::json!({ "id": id, "payload": event.payload }).to_string(),
            ),
            None => answer(StatusCode::NOT_FOUND, "not_found", "no such event"),
        },
        Err(e) => {
            log::warn!("webhook {id:?} lookup failed: {e}");
            unavailable("database_unavailable", "the lookup failed; try again")
        }
    }
}

fn stored_answer(status: StatusCode, id: &str, outcome: &str) -> Response {
    let body = serde_json::json!({ "id": id, "outcome": outcome });
    json(status, body.to_string())
}

fn answer(status: StatusCode, error: &str, message: &str) -> Response {
    let body = serde_json::json!({ "error": error, "message": message });
    json(status, body.to_string())
}

fn unavailable(error: &str, message: &str) -> Response {
    let mut response = answer(StatusCode::SERVICE_UNAVAILABLE, error, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn json(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
