//! The chaos soak: resilient-diesel's sync and async pools, and plain r2d2 and bb8 as
//! controls, write unique keys into a ledger table on a private PostgreSQL server while
//! faults are injected one after another in a seeded random order; at the end the ledger is
//! checked against what every caller was told.
//!
//! ```sh
//! cargo run --release -p pool-soak -- --seconds 60 [--seed N] [--json]
//! ```
//!
//! [`run`] starts the server (TLS on), one [`FaultProxy`] per system for the proxy route, the
//! pools on two routes each (`tls`: direct, `sslmode=require`; `proxy`: through the proxy,
//! `sslmode=disable`, so the proxy can find `COMMIT`), the writers, the ad-hoc probes, the
//! budget watcher, the fault schedule ([`faults`]) and the blackhole phase ([`blackhole`]),
//! then stops the writers, checks the ledger ([`ledger`]) and builds the [`Report`].

pub mod async_work;
pub mod blackhole;
pub mod events;
pub mod faults;
pub mod ledger;
pub mod report;
pub mod sync_work;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pool_core::retry::RetryPolicy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use test_support::{FaultProxy, PgOptions, PgServer};

pub use report::Report;

use crate::ledger::{load_counts, setup_sql, SurfacedError, Tally};

/// How [`run`]'s error starts when no private server could be started (tests skip on it
/// outside CI).
pub const NO_SERVER: &str = "starting a private server";

/// The field reports' naive loop: tries per write.
pub const NAIVE_TRIES: u32 = 3;
/// The field reports' naive loop: pause between tries.
pub const NAIVE_PAUSE: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the writers write, and faults are injected.
    pub seconds: u64,
    /// The fault order's seed (random when `None`; the report prints it).
    pub seed: Option<u64>,
    /// Print progress to stderr.
    pub progress: bool,
    /// Faults that must run even if they take the soak past `seconds` (up to three times
    /// `seconds`): a short soak on a loaded machine still meets its first faults.
    pub min_faults: usize,
}

/// The pools' and writers' settings (one set for every system of ours).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The budget of each of our class-pool sets.
    pub budget: u32,
    /// The ad-hoc class's reserved floor.
    pub adhoc_reserved: u32,
    /// The ad-hoc class's checkout timeout: the probe must get in within it.
    pub adhoc_timeout: Duration,
    /// How often the ad-hoc probe runs.
    pub probe_every: Duration,
    /// The automation class's checkout timeout.
    pub pool_timeout: Duration,
    /// The pools' `validation_timeout`.
    pub validation_timeout: Duration,
    /// The pools' `connect_timeout`.
    pub connect_timeout: Duration,
    /// Automation writers per class-pool set (more than the budget: it is saturated).
    pub workers: usize,
    /// Writers per control pool.
    pub control_workers: usize,
    /// Pause between a writer's writes.
    pub think: Duration,
    /// Our retry policy.
    pub policy: RetryPolicy,
}

impl Settings {
    /// The soak's settings for `seed`.
    pub fn new(seed: u64) -> Settings {
        Settings {
            budget: 4,
            adhoc_reserved: 1,
            adhoc_timeout: Duration::from_secs(5),
            probe_every: Duration::from_secs(1),
            pool_timeout: Duration::from_secs(5),
            validation_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            workers: 5,
            control_workers: 3,
            think: Duration::from_millis(5),
            policy: RetryPolicy::builder()
                .max_attempts(1000)
                .max_elapsed(Some(Duration::from_secs(30)))
                .base_delay(Duration::from_millis(10))
                .max_delay(Duration::from_millis(500))
                .seed(seed)
                .build()
                .expect("a valid retry policy"),
        }
    }
}

/// State every thread of the soak shares: the stop flag, the fault label, known zombies.
pub struct Shared {
    /// When the soak started.
    pub started: Instant,
    stop: AtomicBool,
    fault: Mutex<(String, bool)>,
    /// Backends a fault left behind with no client (who, excluded until).
    zombies: Mutex<Vec<(Zombie, Option<Instant>)>>,
}

/// How long a zombie stays excluded after its fault ended (it exits within milliseconds).
pub(crate) const ZOMBIE_GRACE: Duration = Duration::from_millis(500);

impl Shared {
    fn new() -> Shared {
        Shared {
            started: Instant::now(),
            stop: AtomicBool::new(false),
            fault: Mutex::new(("none".to_owned(), false)),
            zombies: Mutex::new(Vec::new()),
        }
    }

    /// Whether the writers should stop.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// ms since the soak started.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn set_fault(&self, name: &str, active: bool) {
        *self.fault.lock() = (name.to_owned(), active);
    }

    /// The fault now (`terminate`), or the last one (`after terminate`), or `none`.
    pub fn fault_label(&self) -> String {
        let f = self.fault.lock();
        if f.1 || f.0 == "none" {
            f.0.clone()
        } else {
            format!("after {}", f.0)
        }
    }

    /// A surfaced error record for `writer`/`key`, stamped now.
    pub fn surfaced(&self, writer: &str, key: &str, error: String) -> SurfacedError {
        SurfacedError {
            at_ms: self.elapsed_ms(),
            fault: self.fault_label(),
            writer: writer.to_owned(),
            key: key.to_owned(),
            // Driver messages span lines: one line per error in the report.
            error: error.split_whitespace().collect::<Vec<_>>().join(" "),
        }
    }

    fn add_zombies(&self, who: impl IntoIterator<Item = Zombie>) {
        self.zombies
            .lock()
            .extend(who.into_iter().map(|z| (z, None)));
    }

    /// The fault that made `who` zombies is over: they stay excluded for `grace` more.
    fn end_zombies(&self, who: &[Zombie], grace: Duration) {
        let until = Instant::now() + grace;
        for z in self.zombies.lock().iter_mut() {
            if z.1.is_none() && who.contains(&z.0) {
                z.1 = Some(until);
            }
        }
    }

    /// Whether the backend `pid`, connected from `port`, is a known zombie now.
    fn is_zombie(&self, pid: i32, port: Option<i32>, now: Instant) -> bool {
        self.zombies.lock().iter().any(|(z, until)| {
            let same = match *z {
                Zombie::Pid(p) => p == pid,
                Zombie::Port(p) => Some(i32::from(p)) == port,
            };
            same && until.is_none_or(|u| now < u)
        })
    }
}

/// How a zombie backend is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zombie {
    /// By its pid (a backend stopped by SIGSTOP).
    Pid(i32),
    /// By its `client_port`: the proxy's side of a flow it silenced. Known from the proxy
    /// itself, so a backend that started while the fault began is not missed.
    Port(u16),
}

fn say(opts: &Options, shared: &Shared, msg: &str) {
    if opts.progress {
        eprintln!("[{:>6} ms] {msg}", shared.elapsed_ms());
    }
}

/// Runs the soak on a server of its own.
///
/// # Errors
/// A description of what could not be set up (server, proxies, pools, ledger).
pub fn run(opts: &Options) -> Result<Report, String> {
    let seed = opts.seed.unwrap_or_else(|| rand::rng().random());
    let events_counted = events::install();
    let events_before = events::snapshot();
    let pg = PgServer::start_with(PgOptions::new().ssl(true).conf("max_connections = 100"))
        .map_err(|e| format!("{NO_SERVER}: {e}"))?;
    pg.execute(&setup_sql())
        .map_err(|e| format!("creating the ledger: {e}"))?;
    let s = Settings::new(seed);
    let shared = Arc::new(Shared::new());
    say(opts, &shared, &format!("server up, seed {seed}"));

    // Routes: systems x {tls, proxy}; one proxy per system.
    const SYSTEMS: [&str; 4] = ["ours-sync", "ours-async", "r2d2", "bb8"];
    let mut proxies = Vec::new();
    for _ in SYSTEMS {
        proxies.push(FaultProxy::start(pg.addr()).map_err(|e| format!("a fault proxy: {e}"))?);
    }
    let app = |system: &str, route: &str| format!("soak-{system}-{route}");
    let url = |i: usize, route: &str, app: &str| match route {
        "tls" => pg.url_with(&format!("sslmode=require&application_name={app}")),
        _ => pg.url_via(
            proxies[i].port(),
            &format!("sslmode=disable&application_name={app}"),
        ),
    };
    let routes = ["tls", "proxy"];
    let tallies: Vec<Arc<Tally>> = SYSTEMS.iter().map(|s| Arc::new(Tally::new(s))).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("a tokio runtime: {e}"))?;

    let mut ours_sync = Vec::new();
    let mut ours_async = Vec::new();
    let mut r2d2s = Vec::new();
    let mut bb8s = Vec::new();
    let mut budgets = BTreeMap::new();
    for route in routes {
        let a = app("ours-sync", route);
        let pools = sync_work::build_ours(&url(0, route, &a), &a, &s)?;
        let view = pools.clone();
        budgets.insert(
            a,
            faults::Budgeted {
                total: s.budget,
                snapshot: Box::new(move || {
                    let snap = view.budget_snapshot();
                    (snap.in_use, snap.to_string())
                }),
            },
        );
        ours_sync.push((route, pools));
        let a = app("ours-async", route);
        let pools = rt.block_on(async_work::build_ours(&url(1, route, &a), &a, &s))?;
        let view = pools.clone();
        budgets.insert(
            a,
            faults::Budgeted {
                total: s.budget,
                snapshot: Box::new(move || {
                    let snap = view.budget_snapshot();
                    (snap.in_use, snap.to_string())
                }),
            },
        );
        ours_async.push((route, pools));
        let a = app("r2d2", route);
        r2d2s.push((route, sync_work::build_r2d2(&url(2, route, &a))?));
        let a = app("bb8", route);
        bb8s.push((
            route,
            rt.block_on(async_work::build_bb8(&url(3, route, &a), route == "tls"))?,
        ));
    }
    let apps: Vec<String> = routes
        .iter()
        .flat_map(|r| SYSTEMS.iter().map(move |sys| app(sys, r)))
        .collect();
    let targets = faults::Targets {
        pg: &pg,
        proxies: &proxies,
        tls_apps: SYSTEMS.iter().map(|sys| app(sys, "tls")).collect(),
        apps,
    };
    say(opts, &shared, "pools built, writers starting");

    let mut threads = Vec::new();
    let mut tasks = Vec::new();
    for (route, pools) in &ours_sync {
        threads.extend(sync_work::spawn_ours(
            pools,
            route,
            &tallies[0],
            &shared,
            &s,
        ));
    }
    for (route, pools) in &ours_async {
        tasks.extend(async_work::spawn_ours(
            &rt,
            pools,
            route,
            &tallies[1],
            &shared,
            &s,
        ));
    }
    for (route, pool) in &r2d2s {
        threads.extend(sync_work::spawn_r2d2(pool, route, &tallies[2], &shared, &s));
    }
    for (route, pool) in &bb8s {
        tasks.extend(async_work::spawn_bb8(
            &rt,
            pool,
            route,
            &tallies[3],
            &shared,
            &s,
        ));
    }

    let deadline = shared.started + Duration::from_secs(opts.seconds);
    let hard_deadline = shared.started + Duration::from_secs(opts.seconds * 3);
    // The blackhole's moment and window come from the seed too (its own stream).
    let mut bh_rng = StdRng::seed_from_u64(seed ^ 0xB1AC_C401E);
    let run_ms = opts.seconds * 1000;
    let bh_window = Duration::from_millis(bh_rng.random_range(3000..4500).min(run_ms / 2));
    let bh_start =
        Duration::from_millis(bh_rng.random_range(run_ms / 5..=run_ms * 2 / 5).max(2000));
    let blackhole = {
        let (shared, s) = (shared.clone(), s.clone());
        std::thread::spawn(move || blackhole::run(shared, s, bh_start, bh_window))
    };
    let watcher = {
        let shared = shared.clone();
        let pg_ref: &PgServer = &pg;
        // The watcher borrows the server: scoped below.
        let budgets = &budgets;
        std::thread::scope(|scope| {
            let w = scope.spawn(|| {
                faults::watch_budget(pg_ref, &shared, budgets, Duration::from_millis(50))
            });
            let records = faults::run_schedule(
                &targets,
                &shared,
                seed,
                Duration::from_secs(1),
                deadline,
                opts.min_faults,
                hard_deadline,
            );
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            say(opts, &shared, "deadline: stopping the writers");
            shared.stop.store(true, Ordering::SeqCst);
            let watched = w.join().unwrap_or((0, Vec::new()));
            (records, watched)
        })
    };
    let (records, (samples, overshoots)) = watcher;
    for t in threads {
        let _ = t.join();
    }
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let ran_ms = shared.elapsed_ms();
    say(opts, &shared, "writers stopped");
    std::thread::sleep(sync_work::SETTLE);
    tallies[0].set_leaked(
        ours_sync
            .iter()
            .map(|(_, p)| sync_work::leaked_ours(p))
            .sum(),
    );
    tallies[1].set_leaked(
        ours_async
            .iter()
            .map(|(_, p)| async_work::leaked_ours(p))
            .sum(),
    );
    tallies[2].set_leaked(r2d2s.iter().map(|(_, p)| sync_work::leaked_r2d2(p)).sum());
    tallies[3].set_leaked(bb8s.iter().map(|(_, p)| async_work::leaked_bb8(p)).sum());

    let counts = load_counts(&pg.url_with("sslmode=disable"))?;
    let empty = Default::default();
    let mut results: Vec<_> = tallies
        .iter()
        .map(|t| t.check(counts.get(t.system).unwrap_or(&empty)))
        .collect();
    let blackhole = blackhole
        .join()
        .map_err(|_| "the blackhole phase panicked".to_owned())?;
    if let Ok(bh) = &blackhole {
        results.extend(bh.results.iter().cloned());
    }
    say(opts, &shared, "ledger checked");
    // Hedged validations, beside the library's events: how often a slow ping raced a fresh
    // connect (`hedges`), the connect won (`hedges_won`), or the slow connection was given
    // up at the cap (`hedges_gave_up`), per adapter.
    let mut pool_events =
        events_counted.then(|| events::since(&events_before, &events::snapshot()));
    if let Some(counted) = pool_events.as_mut() {
        let sync = ours_sync
            .iter()
            .flat_map(|(_, p)| p.classes().map(|(_, c)| c.stats()));
        let asynchronous = ours_async
            .iter()
            .flat_map(|(_, p)| p.classes().map(|(_, c)| c.stats()));
        for (adapter, stats) in [
            ("sync", sync.collect::<Vec<_>>()),
            ("async", asynchronous.collect()),
        ] {
            for (what, n) in [
                ("hedges", stats.iter().map(|s| s.hedges).sum::<u64>()),
                ("hedges_won", stats.iter().map(|s| s.hedges_won).sum()),
                (
                    "hedges_gave_up",
                    stats.iter().map(|s| s.hedges_gave_up).sum(),
                ),
            ] {
                if n > 0 {
                    counted.insert(format!("{what}.{adapter}"), n);
                }
            }
        }
    }
    drop(ours_sync);
    drop(ours_async);
    drop(r2d2s);
    rt.block_on(async { drop(bb8s) });
    drop(rt);
    Ok(Report {
        seed,
        pool_events,
        seconds: opts.seconds,
        ran_ms,
        results,
        faults: records,
        budget_samples: samples,
        overshoots,
        blackhole,
    })
}
