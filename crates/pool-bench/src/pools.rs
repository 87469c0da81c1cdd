//! The contenders: how each pool is built, and one unit of work through it.
//!
//! Every pool is built with the library's defaults except its size, its application name
//! (so that its backends can be told apart and terminated) and a bounded checkout timeout
//! (10 s instead of 30 s, so that a pathological case ends the run in bounded time).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, LazyLock};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::ConnectionManager;
use diesel::sql_types::Integer;
use diesel::IntoSql;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::AsyncPgConnection;
use parking_lot::Mutex;
use resilient_diesel::{commit_with_retry, RetryPolicy};
use tokio::runtime::Runtime;

/// Every contender, in the order of the JSON and the tables.
pub const CONTENDERS: [&str; 8] = [
    "raw",
    "r2d2",
    "r2d2_notest",
    "bb8_verified",
    "bb8_fast",
    "deadpool",
    "ext_sync",
    "ext_async",
];

/// A contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One `PgConnection`, no pool (held behind an uncontended mutex).
    Raw,
    /// r2d2 + Diesel's `ConnectionManager`, r2d2's defaults (`test_on_check_out(true)`: a
    /// `SELECT 1` on every checkout).
    R2d2,
    /// The same with `test_on_check_out(false)`.
    R2d2NoTest,
    /// bb8 + diesel-async's `AsyncDieselConnectionManager`, default recycling (`Verified`: a
    /// `SELECT 1` on every checkout).
    Bb8Verified,
    /// The same with `RecyclingMethod::Fast` (no query on checkout).
    Bb8Fast,
    /// deadpool-diesel (sync `PgConnection` behind `interact`), default recycling
    /// (`Verified`).
    Deadpool,
    /// `resilient_diesel::PgPool`.
    ExtSync,
    /// `diesel_async_ext::PgPool` (over bb8).
    ExtAsync,
}

impl Kind {
    /// The contender's JSON key.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::R2d2 => "r2d2",
            Kind::R2d2NoTest => "r2d2_notest",
            Kind::Bb8Verified => "bb8_verified",
            Kind::Bb8Fast => "bb8_fast",
            Kind::Deadpool => "deadpool",
            Kind::ExtSync => "ext_sync",
            Kind::ExtAsync => "ext_async",
        }
    }

    /// Whether its checkouts are `async` (run as tokio tasks rather than threads).
    pub fn is_async(self) -> bool {
        matches!(
            self,
            Kind::Bb8Verified | Kind::Bb8Fast | Kind::Deadpool | Kind::ExtAsync
        )
    }
}

/// Why `ext_async` is not measured, if it is not: `None` now that diesel-async-ext exposes
/// `diesel_async_ext::PgPool::builder(url)...build().await` with `get().await`. Return a
/// reason here to leave every `ext_async` entry `{"skipped": reason}` (and drop the
/// `Pool::ExtAsync` arm) if the crate's API moves away under the benchmark.
pub fn ext_async_unavailable() -> Option<&'static str> {
    None
}

/// Size and connection target of a pool.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The most connections it may hold.
    pub max: u32,
    /// Connections kept open (`min_idle`, `pool_size`); warmed at build.
    pub idle: u32,
    /// Connection URL (its `application_name` names the contender's backends).
    pub url: String,
}

/// A built contender.
pub enum Pool {
    /// See [`Kind::Raw`].
    Raw(Mutex<PgConnection>),
    /// See [`Kind::R2d2`], [`Kind::R2d2NoTest`].
    R2d2(r2d2::Pool<ConnectionManager<PgConnection>>),
    /// See [`Kind::ExtSync`].
    Ext(resilient_diesel::PgPool),
    /// See [`Kind::Bb8Verified`], [`Kind::Bb8Fast`].
    Bb8(bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>>),
    /// See [`Kind::Deadpool`].
    Deadpool(deadpool_diesel::postgres::Pool),
    /// See [`Kind::ExtAsync`].
    ExtAsync(diesel_async_ext::PgPool),
}

const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(10);

/// One unit of work done with a checked-out connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Check out and return, nothing else.
    Nothing,
    /// Yield the thread (or task) while holding the connection.
    Yield,
    /// `SELECT $1` with 1 bound (Diesel's `select(1.into_sql())`, a cached prepared statement:
    /// one round trip).
    Select1,
    /// Hold the connection this long (a sleep), no query.
    Hold(Duration),
    /// `SELECT pg_backend_pid() FROM pg_sleep(ms / 1000)`: which backend served the request.
    PidSleep(u32),
    /// `BEGIN; INSERT INTO bench_txn (v) VALUES (1); COMMIT` with `conn.transaction()`.
    Txn,
    /// The same through `commit_with_retry` (ext_sync only), commit verification on or off.
    Retry { verify: bool },
}

/// What one unit of work observed.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// How long the checkout took.
    pub wait_ns: u64,
    /// The backend that served it (`PidSleep` only, else 0).
    pub pid: i32,
}

#[derive(QueryableByName)]
struct PidRow {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

fn pid_sleep_sql(ms: u32) -> String {
    format!(
        "SELECT pg_backend_pid() AS pid FROM pg_sleep({})",
        f64::from(ms) / 1000.0
    )
}

fn insert(conn: &mut PgConnection) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO bench_txn (v) VALUES (1)").execute(conn)
}

static VERIFY_OFF: LazyLock<RetryPolicy> = LazyLock::new(|| {
    RetryPolicy::builder()
        .verify_commit(false)
        .build()
        .expect("a valid retry policy")
});
static VERIFY_ON: LazyLock<RetryPolicy> = LazyLock::new(RetryPolicy::default);

/// The work on a sync connection; the backend pid for `PidSleep`.
fn work_sync(conn: &mut PgConnection, work: Work) -> Result<i32, String> {
    let e = |e: diesel::result::Error| e.to_string();
    match work {
        Work::Nothing => Ok(0),
        Work::Yield => {
            std::thread::yield_now();
            Ok(0)
        }
        Work::Hold(d) => {
            std::thread::sleep(d);
            Ok(0)
        }
        Work::Select1 => diesel::select(1_i32.into_sql::<Integer>())
            .get_result::<i32>(conn)
            .map(|_| 0)
            .map_err(e),
        Work::PidSleep(ms) => diesel::sql_query(pid_sleep_sql(ms))
            .get_result::<PidRow>(conn)
            .map(|r| r.pid)
            .map_err(e),
        Work::Txn | Work::Retry { .. } => conn.transaction(insert).map(|_| 0).map_err(e),
    }
}

mod async_work {
    use super::*;
    use diesel_async::RunQueryDsl;

    pub(super) async fn run(conn: &mut AsyncPgConnection, work: Work) -> Result<i32, String> {
        let e = |e: diesel::result::Error| e.to_string();
        match work {
            Work::Nothing => Ok(0),
            Work::Yield => {
                tokio::task::yield_now().await;
                Ok(0)
            }
            Work::Hold(d) => {
                tokio::time::sleep(d).await;
                Ok(0)
            }
            Work::Select1 => diesel::select(1_i32.into_sql::<Integer>())
                .get_result::<i32>(conn)
                .await
                .map(|_| 0)
                .map_err(e),
            Work::PidSleep(ms) => diesel::sql_query(pid_sleep_sql(ms))
                .get_result::<PidRow>(conn)
                .await
                .map(|r| r.pid)
                .map_err(e),
            Work::Txn | Work::Retry { .. } => Err("transactions are measured on sync pools".into()),
        }
    }
}

fn ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Pool {
    /// Builds the contender `kind` (async pools on `rt`) and warms `spec.idle` connections.
    pub fn build(kind: Kind, spec: &Spec, rt: &Runtime) -> Result<Pool, String> {
        let pool = match kind {
            Kind::Raw => Pool::Raw(Mutex::new(
                PgConnection::establish(&spec.url).map_err(|e| e.to_string())?,
            )),
            Kind::R2d2 | Kind::R2d2NoTest => Pool::R2d2(
                r2d2::Pool::builder()
                    .max_size(spec.max)
                    .min_idle(Some(spec.idle))
                    .test_on_check_out(kind == Kind::R2d2)
                    .connection_timeout(CHECKOUT_TIMEOUT)
                    .build(ConnectionManager::<PgConnection>::new(&spec.url))
                    .map_err(|e| e.to_string())?,
            ),
            Kind::ExtSync => Pool::Ext(
                resilient_diesel::PgPool::builder(&spec.url)
                    .pool_size(spec.idle)
                    .max_overflow(spec.max - spec.idle)
                    .pool_timeout(CHECKOUT_TIMEOUT)
                    .name("bench")
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            Kind::Bb8Verified | Kind::Bb8Fast => {
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                if kind == Kind::Bb8Fast {
                    config.recycling_method = RecyclingMethod::Fast;
                }
                let manager = AsyncDieselConnectionManager::new_with_config(&spec.url, config);
                Pool::Bb8(
                    rt.block_on(
                        bb8::Pool::builder()
                            .max_size(spec.max)
                            .min_idle(Some(spec.idle))
                            .connection_timeout(CHECKOUT_TIMEOUT)
                            .build(manager),
                    )
                    .map_err(|e| e.to_string())?,
                )
            }
            Kind::Deadpool => {
                let manager = deadpool_diesel::postgres::Manager::new(
                    spec.url.as_str(),
                    deadpool_diesel::Runtime::Tokio1,
                );
                Pool::Deadpool(
                    deadpool_diesel::postgres::Pool::builder(manager)
                        .max_size(spec.max as usize)
                        .wait_timeout(Some(CHECKOUT_TIMEOUT))
                        .runtime(deadpool_diesel::Runtime::Tokio1)
                        .build()
                        .map_err(|e| e.to_string())?,
                )
            }
            Kind::ExtAsync => {
                if let Some(why) = ext_async_unavailable() {
                    return Err(why.to_owned());
                }
                Pool::ExtAsync(
                    rt.block_on(
                        diesel_async_ext::PgPool::builder(&spec.url)
                            .pool_size(spec.idle)
                            .max_overflow(spec.max - spec.idle)
                            .pool_timeout(CHECKOUT_TIMEOUT)
                            .name("bench")
                            .build(),
                    )
                    .map_err(|e| e.to_string())?,
                )
            }
        };
        // r2d2 (`build` waits for `min_idle`), ext_sync and ext_async (`pool_size`) and bb8
        // (`min_idle`) open their idle connections at build; deadpool opens connections on
        // demand only.
        if let Pool::Deadpool(_) = pool {
            pool.warm(spec.idle, rt)?;
        }
        Ok(pool)
    }

    /// Holds `n` connections at once (opening what is missing), then returns them all.
    pub fn warm(&self, n: u32, rt: &Runtime) -> Result<(), String> {
        let n = n as usize;
        match self {
            Pool::Raw(_) => Ok(()),
            Pool::R2d2(p) => (0..n)
                .map(|_| p.get().map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(drop),
            Pool::Ext(p) => (0..n)
                .map(|_| p.get().map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(drop),
            Pool::Bb8(p) => rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await.map_err(|e| e.to_string())?);
                }
                Ok(())
            }),
            Pool::Deadpool(p) => rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await.map_err(|e| e.to_string())?);
                }
                Ok(())
            }),
            Pool::ExtAsync(p) => rt.block_on(async {
                let mut held = Vec::new();
                for _ in 0..n {
                    held.push(p.get().await.map_err(|e| e.to_string())?);
                }
                Ok(())
            }),
        }
    }

    /// One unit of work on a sync contender.
    pub fn op_sync(&self, work: Work) -> Result<Done, String> {
        let t0 = Instant::now();
        let (wait_ns, pid) = match self {
            Pool::Raw(conn) => {
                let mut conn = conn.lock();
                let wait = ns(t0);
                (wait, work_sync(&mut conn, work)?)
            }
            Pool::R2d2(p) => {
                let mut conn = p.get().map_err(|e| e.to_string())?;
                let wait = ns(t0);
                (wait, work_sync(&mut conn, work)?)
            }
            Pool::Ext(p) => {
                if let Work::Retry { verify } = work {
                    let policy = if verify { &*VERIFY_ON } else { &*VERIFY_OFF };
                    commit_with_retry(p, policy, insert).map_err(|e| e.to_string())?;
                    (0, 0)
                } else {
                    let mut conn = p.get().map_err(|e| e.to_string())?;
                    let wait = ns(t0);
                    (wait, work_sync(&mut conn, work)?)
                }
            }
            Pool::Bb8(_) | Pool::Deadpool(_) | Pool::ExtAsync(_) => {
                return Err("an async pool".into())
            }
        };
        Ok(Done { wait_ns, pid })
    }

    /// One unit of work on an async contender.
    pub async fn op_async(&self, work: Work) -> Result<Done, String> {
        let t0 = Instant::now();
        let (wait_ns, pid) = match self {
            Pool::Bb8(p) => {
                let mut conn = p.get().await.map_err(|e| e.to_string())?;
                let wait = ns(t0);
                (wait, async_work::run(&mut conn, work).await?)
            }
            Pool::Deadpool(p) => {
                let obj = p.get().await.map_err(|e| e.to_string())?;
                let wait = ns(t0);
                let pid = match work {
                    Work::Nothing => 0,
                    Work::Yield => {
                        tokio::task::yield_now().await;
                        0
                    }
                    Work::Hold(d) => {
                        tokio::time::sleep(d).await;
                        0
                    }
                    _ => obj
                        .interact(move |conn| work_sync(conn, work))
                        .await
                        .map_err(|e| e.to_string())??,
                };
                (wait, pid)
            }
            Pool::ExtAsync(p) => {
                let mut conn = p.get().await.map_err(|e| e.to_string())?;
                let wait = ns(t0);
                (wait, async_work::run(&mut conn, work).await?)
            }
            _ => return Err("a sync pool".into()),
        };
        Ok(Done { wait_ns, pid })
    }

    /// Connections the pool holds now, as it counts them (`None` for the raw connection).
    pub fn open_connections(&self) -> Option<u32> {
        match self {
            Pool::Raw(_) => None,
            Pool::R2d2(p) => Some(p.state().connections),
            Pool::Ext(p) => Some(p.state().connections),
            Pool::Bb8(p) => Some(p.state().connections),
            Pool::Deadpool(p) => Some(p.status().size as u32),
            Pool::ExtAsync(p) => Some(p.state().connections),
        }
    }
}

/// How long a load runs.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// Every worker loops for this long.
    For(Duration),
    /// Every worker does one unit of work; all start together.
    Once,
    /// Workers loop until the observer says stop, at most this long.
    UntilObserved(Duration),
}

/// One completed unit of work.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Checkout wait.
    pub wait_ns: u64,
    /// Checkout + work.
    pub latency_ns: u64,
    /// Completion, since the load started.
    pub at_ns: u64,
    /// The serving backend (`PidSleep` only).
    pub pid: i32,
}

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadResult {
    /// From the start signal until the last worker finished.
    pub elapsed: Duration,
    /// Successful units of work.
    pub samples: Vec<Sample>,
    /// Failed units of work (checkout or query errors surfaced to the caller).
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
    /// When the observer asked to stop, since the start.
    pub observed_at: Option<Duration>,
}

/// Called on every success with the sample; returns `true` to stop the load.
pub type Observer = Arc<dyn Fn(&Sample) -> bool + Send + Sync>;

struct Collect {
    samples: Mutex<Vec<Sample>>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    stop: AtomicBool,
    observed_at_ns: AtomicU64,
}

impl Collect {
    fn new() -> Collect {
        Collect {
            samples: Mutex::new(Vec::new()),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            observed_at_ns: AtomicU64::new(u64::MAX),
        }
    }

    fn record(
        &self,
        result: Result<Done, String>,
        started: Instant,
        t0: Instant,
        observer: Option<&Observer>,
        local: &mut Vec<Sample>,
    ) {
        match result {
            Ok(done) => {
                let sample = Sample {
                    wait_ns: done.wait_ns,
                    latency_ns: ns(started),
                    at_ns: ns(t0),
                    pid: done.pid,
                };
                if observer.is_some_and(|o| o(&sample)) {
                    self.observed_at_ns
                        .fetch_min(sample.at_ns, Ordering::SeqCst);
                    self.stop.store(true, Ordering::SeqCst);
                }
                local.push(sample);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().get_or_insert(e);
            }
        }
    }

    fn finish(self, elapsed: Duration) -> LoadResult {
        let at = self.observed_at_ns.load(Ordering::SeqCst);
        LoadResult {
            elapsed,
            samples: self.samples.into_inner(),
            errors: self.errors.into_inner(),
            first_error: self.first_error.into_inner(),
            observed_at: (at != u64::MAX).then(|| Duration::from_nanos(at)),
        }
    }
}

/// Runs `workers` threads (sync contenders) or tasks (async contenders) doing `work` under
/// `plan`; all start together.
pub fn run_load(
    pool: &Arc<Pool>,
    kind: Kind,
    rt: &Runtime,
    workers: usize,
    work: Work,
    plan: Plan,
    observer: Option<Observer>,
) -> LoadResult {
    let collect = Arc::new(Collect::new());
    let once = matches!(plan, Plan::Once);
    let limit = match plan {
        Plan::For(d) | Plan::UntilObserved(d) => Some(d),
        Plan::Once => None,
    };
    let t0_cell = Arc::new(std::sync::OnceLock::<Instant>::new());
    let elapsed = if kind.is_async() {
        rt.block_on(async {
            let gate = Arc::new(tokio::sync::Barrier::new(workers + 1));
            let mut handles = Vec::with_capacity(workers);
            for _ in 0..workers {
                let (pool, collect, gate, observer, t0_cell) = (
                    pool.clone(),
                    collect.clone(),
                    gate.clone(),
                    observer.clone(),
                    t0_cell.clone(),
                );
                handles.push(tokio::spawn(async move {
                    let mut local = Vec::new();
                    gate.wait().await;
                    let t0 = *t0_cell.get().expect("set before the start");
                    loop {
                        let started = Instant::now();
                        let result = pool.op_async(work).await;
                        collect.record(result, started, t0, observer.as_ref(), &mut local);
                        if once || collect.stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    collect.samples.lock().extend(local);
                }));
            }
            let t0 = *t0_cell.get_or_init(Instant::now);
            gate.wait().await;
            if let Some(limit) = limit {
                let deadline = t0 + limit;
                while !collect.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(1).min(limit)).await;
                }
                collect.stop.store(true, Ordering::SeqCst);
            }
            for handle in handles {
                let _ = handle.await;
            }
            t0.elapsed()
        })
    } else {
        let gate = Barrier::new(workers + 1);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (collect, gate, observer, t0_cell) = (&collect, &gate, &observer, &t0_cell);
                scope.spawn(move || {
                    let mut local = Vec::new();
                    gate.wait();
                    let t0 = *t0_cell.get().expect("set before the start");
                    loop {
                        let started = Instant::now();
                        let result = pool.op_sync(work);
                        collect.record(result, started, t0, observer.as_ref(), &mut local);
                        if once || collect.stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    collect.samples.lock().extend(local);
                });
            }
            let t0 = *t0_cell.get_or_init(Instant::now);
            gate.wait();
            if let Some(limit) = limit {
                let deadline = t0 + limit;
                while !collect.stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    std::thread::sleep((deadline - now).min(Duration::from_millis(1)));
                }
                collect.stop.store(true, Ordering::SeqCst);
            }
            // Leaving the scope joins every worker.
            t0
        })
        .elapsed()
    };
    match Arc::try_unwrap(collect) {
        Ok(collect) => collect.finish(elapsed),
        Err(_) => unreachable!("every worker has finished"),
    }
}
