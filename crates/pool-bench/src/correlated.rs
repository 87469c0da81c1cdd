//! Correlated faults, pools of 8 at their defaults: `silent` (every pooled connection goes
//! silent at once while new connects work) and `hopeless` (a database that does not exist).
//!
//! Unlike the throughput scenarios, each contender meets the fault once per round and the
//! figures are times to an outcome. A contender that hangs is cut off at [`CAP`] and reported
//! as such (r2d2's validation has no time limit; bb8 waits its 30 s timeout per request), so
//! a run stays bounded.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::r2d2::ConnectionManager;
use diesel::PgConnection;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;
use test_support::FaultProxy;

use crate::report::{Bound, Check, Entry, ScenarioResult};
use crate::scenarios::Ctx;
use crate::stats::median;

/// The longest a contender is given to produce one outcome.
const CAP: Duration = Duration::from_secs(10);
/// Pool size for both scenarios (the "pools of 8 at defaults").
const SIZE: u32 = 8;
/// Requests after the fault in `silent`.
const REQUESTS: usize = 20;

/// A contender of these scenarios, built at its defaults but for the size.
enum Contender {
    R2d2(r2d2::Pool<ConnectionManager<PgConnection>>),
    Ext(resilient_diesel::PgPool),
    Bb8(bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>),
    ExtAsync(diesel_async_ext::PgPool),
}

const KINDS: [&str; 4] = ["r2d2", "ext_sync", "bb8_verified", "ext_async"];

impl Contender {
    fn build(kind: &str, url: &str, ctx: &Ctx<'_>) -> Result<Contender, String> {
        let e = |e: &dyn std::fmt::Display| e.to_string();
        Ok(match kind {
            "r2d2" => Contender::R2d2(
                r2d2::Pool::builder()
                    .max_size(SIZE)
                    .build(ConnectionManager::new(url))
                    .map_err(|x| e(&x))?,
            ),
            "ext_sync" => Contender::Ext(
                resilient_diesel::PgPool::builder(url)
                    .pool_size(SIZE)
                    .build()
                    .map_err(|x| e(&x))?,
            ),
            "bb8_verified" => Contender::Bb8(
                ctx.rt
                    .block_on(
                        bb8::Pool::builder()
                            .max_size(SIZE)
                            .build(AsyncDieselConnectionManager::new(url)),
                    )
                    .map_err(|x| e(&x))?,
            ),
            _ => Contender::ExtAsync(
                ctx.rt
                    .block_on(
                        diesel_async_ext::PgPool::builder(url)
                            .pool_size(SIZE)
                            .build(),
                    )
                    .map_err(|x| e(&x))?,
            ),
        })
    }

    /// One checkout + `SELECT 1`; `None` if it did not finish within [`CAP`] (the thread or
    /// task is left to finish on its own).
    fn request(&self, ctx: &Ctx<'_>) -> Option<Result<(), String>> {
        let select = diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>("1"));
        match self {
            Contender::R2d2(p) => capped(p.clone(), move |p| {
                let mut c = p.get().map_err(|e| e.to_string())?;
                diesel::RunQueryDsl::get_result::<i32>(select, &mut *c)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            Contender::Ext(p) => capped(p.clone(), move |p| {
                let mut c = p.get().map_err(|e| e.to_string())?;
                diesel::RunQueryDsl::get_result::<i32>(select, &mut *c)
                    .map(drop)
                    .map_err(|e| e.to_string())
            }),
            Contender::Bb8(p) => ctx
                .rt
                .block_on(tokio::time::timeout(CAP, async {
                    let mut c = p.get().await.map_err(|e| e.to_string())?;
                    diesel_async::RunQueryDsl::get_result::<i32>(select, &mut *c)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }))
                .ok(),
            Contender::ExtAsync(p) => ctx
                .rt
                .block_on(tokio::time::timeout(CAP, async {
                    let mut c = p.get().await.map_err(|e| e.to_string())?;
                    diesel_async::RunQueryDsl::get_result::<i32>(select, &mut *c)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }))
                .ok(),
        }
    }

    fn warm(&self, ctx: &Ctx<'_>) -> Result<(), String> {
        let mut errors = Vec::new();
        match self {
            Contender::R2d2(p) => {
                let held: Vec<_> = (0..SIZE).filter_map(|_| p.get().ok()).collect();
                drop(held);
            }
            Contender::Ext(p) => {
                let held: Vec<_> = (0..SIZE).filter_map(|_| p.get().ok()).collect();
                drop(held);
            }
            Contender::Bb8(p) => ctx.rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..SIZE {
                    match p.get().await {
                        Ok(c) => held.push(c),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }),
            Contender::ExtAsync(p) => ctx.rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..SIZE {
                    match p.get().await {
                        Ok(c) => held.push(c),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }),
        }
        match errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

fn capped<P: Send + 'static>(
    pool: P,
    f: impl FnOnce(P) -> Result<(), String> + Send + 'static,
) -> Option<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f(pool));
    });
    rx.recv_timeout(CAP).ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Every pooled connection silent at once, new connects working: time to the first success,
/// total for 20 sequential requests, errors, and whether a request hung past [`CAP`].
pub(crate) fn silent(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(format!(
        "Pools of {SIZE} at their defaults (ours: validation_timeout 5 s), warmed, idle 600 ms; \
         then a proxy stops forwarding every flow it carries (sockets open, nothing answered) \
         while it passes new connects. Then {REQUESTS} sequential requests (checkout + SELECT \
         1). first_success_ms: until the first succeeded; total_ms: all of them; hung: a \
         request still running after {} s (the contender is cut off there). Targets: ours \
         first success within one validation timeout plus one connect, total within two \
         validation timeouts, 0 errors.",
        CAP.as_secs()
    ));
    let rounds = ctx.settings.heavy_rounds.clamp(1, 2);
    let mut firsts: Vec<(String, Vec<f64>)> = Vec::new();
    for kind in KINDS {
        let mut e = Entry::default();
        let (mut first, mut total, mut errors, mut hung) = (vec![], vec![], 0.0, 0.0);
        for _ in 0..rounds {
            let proxy = match FaultProxy::start(ctx.pg.addr()) {
                Ok(p) => p,
                Err(err) => {
                    e.note = Some(format!("no proxy: {err}"));
                    break;
                }
            };
            let url = ctx.pg.url_via(
                proxy.port(),
                &format!("sslmode=disable&application_name=pb_silent_{kind}"),
            );
            let pool = match Contender::build(kind, &url, ctx) {
                Ok(p) => p,
                Err(err) => {
                    e.note = Some(format!("could not build: {err}"));
                    break;
                }
            };
            if let Err(err) = pool.warm(ctx) {
                e.note = Some(format!("warm-up: {err}"));
            }
            std::thread::sleep(Duration::from_millis(600));
            proxy.silence_existing();
            let started = Instant::now();
            let mut first_at = None;
            for _ in 0..REQUESTS {
                match pool.request(ctx) {
                    Some(Ok(())) => {
                        first_at.get_or_insert(started.elapsed());
                    }
                    Some(Err(err)) => {
                        errors += 1.0;
                        e.note.get_or_insert(format!("first error: {err}"));
                    }
                    None => {
                        hung += 1.0;
                        e.note.get_or_insert(format!("a request hung past {CAP:?}"));
                        break;
                    }
                }
            }
            if let Some(at) = first_at {
                first.push(ms(at));
            }
            if hung == 0.0 {
                total.push(ms(started.elapsed()));
            }
            // Dropping the proxy resets what is left hanging.
            drop(proxy);
            drop(pool);
        }
        e.set("first_success_ms", median(&first))
            .set("total_ms", median(&total))
            .set("errors", errors)
            .set("hung", hung);
        firsts.push((kind.to_owned(), first));
        result.put(kind, e);
    }
    for (kind, first) in firsts {
        if kind.starts_with("ext") {
            result.checks.push(Check::new(
                format!("{kind} first success after every flow went silent (ms)"),
                first,
                Some(Bound::AtMost(6000.0)),
            ));
        }
    }
    result
}

/// A database that does not exist: time until the pool reports it, and whether the error
/// names the cause.
pub(crate) fn hopeless(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(format!(
        "Pools of {SIZE} at their defaults (pool_timeout 30 s) for a database that does not \
         exist (FATAL 3D000 on every attempt): time_to_error_ms: from build until the first \
         error a caller sees (build, or the first checkout where build opens nothing); \
         cause_named: 1 if that error says the database does not exist; hung: no error within \
         {} s (cut off). Target: ours at once (<= 1000 ms), cause named.",
        CAP.as_secs()
    ));
    let url = ctx
        .pg
        .url_with("sslmode=disable&application_name=pb_hopeless")
        .replace("/app?", "/no_such_database?");
    let mut times: Vec<(String, Vec<f64>)> = Vec::new();
    for kind in KINDS {
        let mut e = Entry::default();
        let mut time = Vec::new();
        let (mut named, mut hung) = (0.0, 0.0);
        for _ in 0..ctx.settings.heavy_rounds.clamp(1, 2) {
            let started = Instant::now();
            let outcome = match kind {
                "r2d2" | "ext_sync" => {
                    let (url, kind) = (url.clone(), kind.to_owned());
                    let (tx, rx) = mpsc::channel();
                    std::thread::spawn(move || {
                        let r = match kind.as_str() {
                            "r2d2" => r2d2::Pool::builder()
                                .max_size(SIZE)
                                .build(ConnectionManager::<PgConnection>::new(&url))
                                .map(drop)
                                .map_err(|e| e.to_string()),
                            _ => resilient_diesel::PgPool::builder(&url)
                                .pool_size(SIZE)
                                .build()
                                .map(drop)
                                .map_err(|e| e.to_string()),
                        };
                        let _ = tx.send(r);
                    });
                    rx.recv_timeout(CAP).ok()
                }
                "bb8_verified" => ctx
                    .rt
                    .block_on(tokio::time::timeout(CAP, async {
                        let pool = bb8::Pool::builder()
                            .max_size(SIZE)
                            .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(&url))
                            .await
                            .map_err(|e| e.to_string())?;
                        pool.get().await.map(drop).map_err(|e| e.to_string())
                    }))
                    .ok(),
                _ => ctx
                    .rt
                    .block_on(tokio::time::timeout(CAP, async {
                        diesel_async_ext::PgPool::builder(&url)
                            .pool_size(SIZE)
                            .build()
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }))
                    .ok(),
            };
            match outcome {
                Some(Err(err)) => {
                    time.push(ms(started.elapsed()));
                    if err.contains("does not exist") {
                        named += 1.0;
                    }
                    e.note.get_or_insert(format!("error: {err}"));
                }
                Some(Ok(())) => {
                    e.note = Some("no error: the pool was built and served?".into());
                }
                None => hung += 1.0,
            }
        }
        e.set("time_to_error_ms", median(&time))
            .set("cause_named", named)
            .set("hung", hung);
        times.push((kind.to_owned(), time));
        result.put(kind, e);
    }
    for (kind, time) in times {
        if kind.starts_with("ext") {
            result.checks.push(Check::new(
                format!("{kind} time to the error for a database that does not exist (ms)"),
                time,
                Some(Bound::AtMost(1000.0)),
            ));
        }
    }
    result
}
