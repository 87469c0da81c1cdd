//! `webhook-service`: `DATABASE_URL=postgres://... cargo run -p webhook-service`.
//!
//! Environment: `DATABASE_URL` (required, PostgreSQL), `LISTEN_ADDR` (default
//! `127.0.0.1:3000`), and the pool's `DB_*` settings (`DB_POOL_SIZE`, `DB_SSLMODE`, ...; see
//! `PoolConfig::from_lookup`).

use std::process::ExitCode;

use diesel_async_ext::PgPool;

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("DATABASE_URL").is_none_or(|v| v.is_empty()) {
        eprintln!(
            "webhook-service: set DATABASE_URL to a PostgreSQL URL, e.g.\n  \
             DATABASE_URL='postgres://app@localhost/app?sslmode=disable' cargo run -p webhook-service\n\
             (LISTEN_ADDR sets the address to listen on, default 127.0.0.1:3000)"
        );
        return ExitCode::from(2);
    }
    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    // The recorder first: the pool registers its metrics when it is built.
    let prometheus = match webhook_service::prometheus() {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("webhook-service: cannot install the Prometheus recorder: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The pool's errors are redacted: they never show the URL's password.
    let pool = match PgPool::from_env().await {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("webhook-service: cannot build the pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = webhook_service::migrate(&pool).await {
        eprintln!("webhook-service: cannot create the tables: {e}");
        return ExitCode::FAILURE;
    }
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("webhook-service: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("webhook-service: listening on http://{addr}");
    let app = webhook_service::app(pool, prometheus.clone());
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match webhook_service::serve(listener, app, Some(prometheus), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("webhook-service: {e}");
            ExitCode::FAILURE
        }
    }
}
