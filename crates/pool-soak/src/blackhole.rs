//! The blackholed network, on a server of its own: a private network namespace holds a second
//! server, our sync and async pools and their writers; at a seeded moment its loopback is
//! taken down (every packet dropped, no RST, no FIN) for a seeded window. It runs alongside
//! the main soak, in the same process, but its server is not the main one: a blackhole takes
//! down everything in the namespace, so the main server's faults could not be seen meanwhile.
//!
//! Only keepalives and `tcp_user_timeout` can see it: a connection held across it gets its
//! query's error within the configured bound, which is measured on a held connection of each
//! pool (`detect_ms`). The writers keep writing through it with `commit_with_retry` and
//! `commit_with_key`, and their ledger is checked like the main one.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::PgConnection;
use diesel_async::AsyncPgConnection;
use test_support::{NetNs, PgOptions, PgServer};

use crate::ledger::{load_counts, setup_sql, SystemResult, Tally};
use crate::{Settings, Shared};

/// `tcp_user_timeout` of the namespace's pools.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(2);
/// Slack over `tcp_user_timeout` allowed for detection: the kernel checks the timeout when a
/// retransmission timer fires, and the cores are busy.
pub const DETECT_SLACK: Duration = Duration::from_secs(1);

/// What the blackhole phase saw.
#[derive(Debug, Clone)]
pub struct BlackholeOutcome {
    /// When the loopback went down, ms since the soak started.
    pub at_ms: u64,
    /// How long it stayed down, ms.
    pub window_ms: u64,
    /// Time from the blackhole to the held sync connection's error, ms (`None`: no error).
    pub sync_detect_ms: Option<u64>,
    /// The same for the async pool.
    pub async_detect_ms: Option<u64>,
    /// What the held queries returned.
    pub held: Vec<String>,
    /// The bound: `tcp_user_timeout` + slack, ms.
    pub bound_ms: u64,
    /// The namespace's ledger, per pool.
    pub results: Vec<SystemResult>,
}

impl BlackholeOutcome {
    /// The slower of the two detections (`None` if either held query never failed).
    pub fn detect_ms(&self) -> Option<u64> {
        Some(self.sync_detect_ms?.max(self.async_detect_ms?))
    }
}

enum Go {
    Blackholed(Instant),
}

fn builder_settings<B>(b: B, app: &str, s: &Settings) -> B
where
    B: PoolSettings,
{
    b.apply(app, s)
}

/// The settings both pools share, over the two builders.
trait PoolSettings: Sized {
    fn apply(self, app: &str, s: &Settings) -> Self;
}

macro_rules! pool_settings {
    ($ty:ty) => {
        impl PoolSettings for $ty {
            fn apply(self, app: &str, s: &Settings) -> Self {
                self.application_name(app)
                    .pool_size(3)
                    .max_overflow(0)
                    .keepalives_idle(Duration::from_secs(1))
                    .keepalives_interval(Duration::from_secs(1))
                    .keepalives_count(2)
                    .tcp_user_timeout(Some(TCP_USER_TIMEOUT))
                    .connect_timeout(Some(s.connect_timeout))
                    .validation_timeout(s.validation_timeout)
                    .pool_timeout(s.pool_timeout)
            }
        }
    };
}
pool_settings!(resilient_diesel::Builder<PgConnection>);
pool_settings!(diesel_async_ext::Builder<AsyncPgConnection>);

/// Runs the phase: the namespace's writers start at once; the loopback goes down at
/// `start_after` (ms since the soak started) for `window`; the writers stop with the soak.
pub fn run(
    shared: Arc<Shared>,
    s: Settings,
    start_after: Duration,
    window: Duration,
) -> Result<BlackholeOutcome, String> {
    let ns = NetNs::new().map_err(|e| format!("no network namespace: {e}"))?;
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (go_tx, go_rx) = mpsc::channel::<Go>();
    let inner_shared = shared.clone();
    let worker = ns.spawn(move || inside(inner_shared, s, ready_tx, go_rx));
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = worker.join();
            return Err(e);
        }
        Err(_) => {
            let _ = worker.join();
            return Err("the namespace's worker ended before it was ready".to_owned());
        }
    }
    let start = shared.started + start_after;
    std::thread::sleep(start.saturating_duration_since(Instant::now()));
    let at_ms = shared.elapsed_ms();
    ns.blackhole()
        .map_err(|e| format!("taking the loopback down: {e}"))?;
    let t0 = Instant::now();
    let _ = go_tx.send(Go::Blackholed(t0));
    std::thread::sleep(window);
    let restored = ns.restore();
    let window_ms = t0.elapsed().as_millis() as u64;
    restored.map_err(|e| format!("bringing the loopback back: {e}"))?;
    let (sync_detect, async_detect, held, results) = worker
        .join()
        .map_err(|_| "the namespace's worker panicked".to_owned())??;
    Ok(BlackholeOutcome {
        at_ms,
        window_ms,
        sync_detect_ms: sync_detect,
        async_detect_ms: async_detect,
        held,
        bound_ms: (TCP_USER_TIMEOUT + DETECT_SLACK).as_millis() as u64,
        results,
    })
}

type Inside = (Option<u64>, Option<u64>, Vec<String>, Vec<SystemResult>);

fn inside(
    shared: Arc<Shared>,
    s: Settings,
    ready: mpsc::Sender<Result<(), String>>,
    go: mpsc::Receiver<Go>,
) -> Result<Inside, String> {
    let setup = || -> Result<_, String> {
        // A COMMIT lost in the blackhole leaves the server's transaction "in progress" until
        // the server notices its client is gone, hours with default settings (no
        // `idle_in_transaction_session_timeout` here): the retry functions' resolution ends
        // that session once the network is back, reads "aborted" and runs the work again
        // (README, "never commit twice").
        let pg = PgServer::start_with(PgOptions::default())
            .map_err(|e| format!("a server in the namespace: {e}"))?;
        pg.execute(&setup_sql())
            .map_err(|e| format!("the namespace's ledger: {e}"))?;
        let url = pg.url_with("sslmode=disable");
        let sync_pool = builder_settings(resilient_diesel::PgPool::builder(&url), "bh-sync", &s)
            .build()
            .map_err(|e| format!("the namespace's sync pool: {e}"))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("a runtime in the namespace: {e}"))?;
        let async_pool = rt
            .block_on(
                builder_settings(diesel_async_ext::PgPool::builder(&url), "bh-async", &s).build(),
            )
            .map_err(|e| format!("the namespace's async pool: {e}"))?;
        Ok((pg, url, sync_pool, rt, async_pool))
    };
    let (pg, url, sync_pool, rt, async_pool) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let sync_tally = Arc::new(Tally::new("bh-ours-sync"));
    let async_tally = Arc::new(Tally::new("bh-ours-async"));
    let mut threads = Vec::new();
    for w in 0..2 {
        let (pool, tally, shared, s) = (
            sync_pool.clone(),
            sync_tally.clone(),
            shared.clone(),
            s.clone(),
        );
        threads.push(std::thread::spawn(move || {
            sync_writer(&pool, w, &tally, &shared, &s)
        }));
    }
    let mut tasks = Vec::new();
    for w in 0..2 {
        let (pool, tally, shared, s) = (
            async_pool.clone(),
            async_tally.clone(),
            shared.clone(),
            s.clone(),
        );
        tasks.push(rt.spawn(async move { async_writer(&pool, w, &tally, &shared, &s).await }));
    }
    // One held connection per pool, checked out before the blackhole, queried after it.
    let (sync_t0_tx, sync_t0_rx) = mpsc::channel::<Instant>();
    let (sync_held_tx, sync_held_rx) = mpsc::channel::<()>();
    let pool = sync_pool.clone();
    let sync_probe = std::thread::spawn(move || {
        let held = pool.get();
        let _ = sync_held_tx.send(());
        let Ok(t0) = sync_t0_rx.recv() else {
            return (Err("no blackhole".to_owned()), Duration::ZERO);
        };
        match held {
            Ok(mut conn) => {
                let r = diesel::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), &mut *conn);
                (r.map(drop).map_err(|e| e.to_string()), t0.elapsed())
            }
            Err(e) => (Err(format!("no held connection: {e}")), Duration::ZERO),
        }
    });
    let (async_t0_tx, async_t0_rx) = tokio::sync::oneshot::channel::<Instant>();
    let (async_held_tx, async_held_rx) = mpsc::channel::<()>();
    let pool = async_pool.clone();
    let async_probe = rt.spawn(async move {
        let held = pool.get().await;
        let _ = async_held_tx.send(());
        let Ok(t0) = async_t0_rx.await else {
            return (Err("no blackhole".to_owned()), Duration::ZERO);
        };
        match held {
            Ok(mut conn) => {
                let r =
                    diesel_async::RunQueryDsl::execute(diesel::sql_query("SELECT 1"), &mut *conn)
                        .await;
                (r.map(drop).map_err(|e| e.to_string()), t0.elapsed())
            }
            Err(e) => (Err(format!("no held connection: {e}")), Duration::ZERO),
        }
    });
    let _ = sync_held_rx.recv_timeout(Duration::from_secs(10));
    let _ = async_held_rx.recv_timeout(Duration::from_secs(10));
    let _ = ready.send(Ok(()));
    let mut held = Vec::new();
    let (mut sync_detect, mut async_detect) = (None, None);
    if let Ok(Go::Blackholed(t0)) = go.recv() {
        let _ = sync_t0_tx.send(t0);
        let _ = async_t0_tx.send(t0);
    } else {
        drop(sync_t0_tx);
        drop(async_t0_tx);
    }
    if let Ok((r, took)) = sync_probe.join() {
        held.push(format!("sync held query after {took:?}: {r:?}"));
        if r.is_err() && !took.is_zero() {
            sync_detect = Some(took.as_millis() as u64);
        }
    }
    if let Ok((r, took)) = rt.block_on(async_probe) {
        held.push(format!("async held query after {took:?}: {r:?}"));
        if r.is_err() && !took.is_zero() {
            async_detect = Some(took.as_millis() as u64);
        }
    }
    while !shared.stopping() {
        std::thread::sleep(Duration::from_millis(50));
    }
    for t in threads {
        let _ = t.join();
    }
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    std::thread::sleep(crate::sync_work::SETTLE);
    sync_tally.set_leaked(u64::from(sync_pool.stats().in_use));
    async_tally.set_leaked(u64::from(async_pool.stats().in_use));
    let counts = load_counts(&url)?;
    let empty = Default::default();
    let results = vec![
        sync_tally.check(counts.get(sync_tally.system).unwrap_or(&empty)),
        async_tally.check(counts.get(async_tally.system).unwrap_or(&empty)),
    ];
    drop(async_pool);
    drop(rt);
    drop(sync_pool);
    drop(pg);
    Ok((sync_detect, async_detect, held, results))
}

fn sync_writer(
    pool: &resilient_diesel::PgPool,
    w: usize,
    tally: &Tally,
    shared: &Shared,
    s: &Settings,
) {
    let writer = format!("{}/ns/w{w}", tally.system);
    let mut seq = 0i32;
    while !shared.stopping() {
        seq += 1;
        let key = format!("{writer}/{seq}");
        let t = Instant::now();
        let insert = |conn: &mut PgConnection| crate::sync_work::insert(conn, &key, &writer, seq);
        let r = if w % 2 == 1 {
            resilient_diesel::commit_with_key(pool, &s.policy, &key, insert).map(drop)
        } else {
            resilient_diesel::commit_with_retry(pool, &s.policy, insert)
        };
        match r {
            Ok(()) => tally.ack(key, t.elapsed()),
            Err(e) => {
                let ambiguous = matches!(e, resilient_diesel::RetryError::AmbiguousCommit { .. });
                tally.surfaced(shared.surfaced(&writer, &key, e.to_string()), ambiguous);
            }
        }
        std::thread::sleep(s.think);
    }
}

async fn async_writer(
    pool: &diesel_async_ext::PgPool,
    w: usize,
    tally: &Tally,
    shared: &Shared,
    s: &Settings,
) {
    let writer = format!("{}/ns/w{w}", tally.system);
    let mut seq = 0i32;
    while !shared.stopping() {
        seq += 1;
        let key = format!("{writer}/{seq}");
        let t = Instant::now();
        let (k, wr) = (&key, &writer);
        let insert =
            async |conn: &mut AsyncPgConnection| crate::async_work::insert(conn, k, wr, seq).await;
        let r = if w % 2 == 1 {
            diesel_async_ext::commit_with_key(pool, &s.policy, &key, insert)
                .await
                .map(drop)
        } else {
            diesel_async_ext::commit_with_retry(pool, &s.policy, insert).await
        };
        match r {
            Ok(()) => tally.ack(key, t.elapsed()),
            Err(e) => {
                let ambiguous = matches!(e, diesel_async_ext::RetryError::AmbiguousCommit { .. });
                tally.surfaced(shared.surfaced(&writer, &key, e.to_string()), ambiguous);
            }
        }
        tokio::time::sleep(s.think).await;
    }
}
