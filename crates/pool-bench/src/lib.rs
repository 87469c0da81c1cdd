//! The pool benchmark: resilient-diesel's pools against r2d2, bb8 and deadpool, every
//! contender interleaved in the same process run, against a private PostgreSQL server.
//!
//! ```sh
//! cargo run --release -p pool-bench                 # every scenario, both pinnings, table
//! cargo run --release -p pool-bench -- --json       # the same as one JSON document
//! cargo run --release -p pool-bench -- --quick      # shorter rounds, under a minute
//! cargo run --release -p pool-bench -- --only spike # one scenario (repeatable)
//! ```
//!
//! [`run`] starts a server (test-support's [`PgServer`]), then, for each [`Pinning`] of the
//! client threads and the server processes, runs the selected scenarios. Within a scenario,
//! rounds interleave the contenders (every contender once per round, the order rotated each
//! round), and every ratio is computed per round, so the spread over rounds shows how stable
//! it is. See `README.md` of this crate for the scenarios, the contenders and the figures.

mod correlated;
pub mod delay_proxy;
pub mod pools;
pub mod report;
mod scenarios;
pub mod stats;
pub mod sys;

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use test_support::PgServer;

pub use pools::{Kind, CONTENDERS};
pub use report::{Report, SCENARIOS};

/// Where the client threads and the server processes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinning {
    /// Client on CPU 0, server on CPU 1.
    Split,
    /// Client and server both on CPU 0.
    SameCore,
    /// No pinning: the scheduler decides.
    Unpinned,
}

impl Pinning {
    /// The name used in the JSON and the tables.
    pub fn name(self) -> &'static str {
        match self {
            Pinning::Split => "split",
            Pinning::SameCore => "same_core",
            Pinning::Unpinned => "unpinned",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Short rounds and fewer of them (the whole run under a minute).
    pub quick: bool,
    /// Only these scenarios (all when empty).
    pub only: Vec<String>,
    /// The pinnings to run, in order.
    pub pinnings: Vec<Pinning>,
    /// The command line, recorded in the report.
    pub command: String,
    /// Print progress to stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            quick: false,
            only: Vec::new(),
            pinnings: vec![Pinning::Split, Pinning::SameCore],
            command: "cargo run --release -p pool-bench".into(),
            progress: true,
        }
    }
}

/// Round counts and time budgets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    /// Rounds of the cheap scenarios.
    pub rounds: usize,
    /// Rounds of recovery, storm and spike (each builds or kills connections).
    pub heavy_rounds: usize,
    /// Time per contender per round for single-thread timings.
    pub per_op: Duration,
    /// Time per contender per round for multi-thread loads.
    pub load: Duration,
    /// Time per contender per round for the fairness load.
    pub fairness: Duration,
    /// Operations per contender for the round-trip counting pass.
    pub count_ops: u32,
    /// Longest a storm may take to reopen the pool.
    pub storm_timeout: Duration,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                rounds: 3,
                heavy_rounds: 1,
                per_op: Duration::from_millis(30),
                load: Duration::from_millis(80),
                fairness: Duration::from_millis(250),
                count_ops: 50,
                storm_timeout: Duration::from_secs(3),
            }
        } else {
            Settings {
                rounds: 7,
                heavy_rounds: 5,
                per_op: Duration::from_millis(200),
                load: Duration::from_millis(300),
                fairness: Duration::from_secs(1),
                count_ops: 400,
                storm_timeout: Duration::from_secs(8),
            }
        }
    }
}

/// Starts a private PostgreSQL server and runs the benchmark against it.
pub fn run(opts: Options) -> Result<Report, String> {
    let pg = PgServer::start().map_err(|e| format!("could not start PostgreSQL: {e}"))?;
    run_with_server(&pg, &opts)
}

/// Runs the benchmark against `pg` (a test-support server: its admin helpers terminate
/// backends and find the postmaster to pin).
pub fn run_with_server(pg: &PgServer, opts: &Options) -> Result<Report, String> {
    for name in &opts.only {
        if !SCENARIOS.contains(&name.as_str()) {
            return Err(format!(
                "unknown scenario {name:?}; the scenarios are {}",
                SCENARIOS.join(", ")
            ));
        }
    }
    let selected = |s: &str| opts.only.is_empty() || opts.only.iter().any(|o| o == s);
    let settings = Settings::new(opts.quick);
    let started = Instant::now();
    pg.execute(
        "CREATE TABLE IF NOT EXISTS bench_txn (id bigserial PRIMARY KEY, v int NOT NULL); \
         GRANT ALL ON bench_txn TO app; GRANT ALL ON SEQUENCE bench_txn_id_seq TO app",
    )
    .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // deadpool-diesel's connections spawn a blocking task when dropped: keep the runtime's
    // context entered wherever pools are dropped.
    let _context = rt.enter();

    let mut meta = machine_meta(pg, opts, settings);
    if opts.only.is_empty() && !opts.quick {
        meta.insert("pool_rss_kib".into(), scenarios::rss_per_contender(pg, &rt));
    }

    let mut runs = Vec::new();
    for &pinning in &opts.pinnings {
        let (label, detail) = apply_pinning(pinning, pg);
        let mut run = report::PinnedRun {
            pinning: label.clone(),
            detail,
            scenarios: Default::default(),
        };
        let mut ctx = scenarios::Ctx {
            pg,
            rt: &rt,
            settings,
            floor_ns: None,
        };
        for scenario in SCENARIOS {
            if !selected(scenario) {
                continue;
            }
            if opts.progress {
                eprintln!(
                    "[{:>5.1}s] {label}: {scenario}",
                    started.elapsed().as_secs_f64()
                );
            }
            let result = scenarios::run(scenario, &mut ctx);
            run.scenarios.insert(scenario.to_owned(), result);
        }
        runs.push(run);
    }
    // Give the process its CPUs back (a library caller may go on).
    let all: Vec<usize> = (0..sys::cpu_count()).collect();
    let _ = sys::pin_process(&all);
    if let Some(pm) = pg.postmaster_pid() {
        let _ = sys::pin_server(pm, &all);
    }

    meta.insert("peak_rss_kib".into(), json!(sys::peak_rss_kib()));
    meta.insert(
        "wall_s".into(),
        json!((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
    );
    let not_run = SCENARIOS
        .iter()
        .filter(|s| !selected(s))
        .map(|s| ((*s).to_owned(), "not selected (--only)".to_owned()))
        .collect();
    Ok(Report {
        runs,
        meta,
        not_run,
    })
}

fn apply_pinning(pinning: Pinning, pg: &PgServer) -> (String, String) {
    let n = sys::cpu_count();
    let all: Vec<usize> = (0..n).collect();
    let (client, server) = match pinning {
        Pinning::Split if n >= 2 => (vec![0], vec![1]),
        Pinning::Split => {
            return (
                "unpinned".into(),
                format!("split pinning needs 2 CPUs, this machine has {n}"),
            )
        }
        Pinning::SameCore => (vec![0], vec![0]),
        Pinning::Unpinned => (all.clone(), all.clone()),
    };
    let Some(postmaster) = pg.postmaster_pid() else {
        return (
            "unpinned".into(),
            "the server's postmaster pid is unknown".into(),
        );
    };
    if let Err(e) = sys::pin_process(&client) {
        return ("unpinned".into(), format!("could not pin the client: {e}"));
    }
    match sys::pin_server(postmaster, &server) {
        Ok(n_server) => (
            pinning.name().into(),
            format!(
                "client threads on CPU {client:?}, postmaster + {} server processes on CPU {server:?}",
                n_server - 1
            ),
        ),
        Err(e) => {
            let _ = sys::pin_process(&all);
            (
                "unpinned".into(),
                format!("could not pin the server (needs CAP_SYS_NICE for another user's processes): {e}"),
            )
        }
    }
}

fn machine_meta(pg: &PgServer, opts: &Options, s: Settings) -> Map<String, Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut meta = Map::new();
    meta.insert("command".into(), json!(opts.command));
    meta.insert("cpus".into(), json!(sys::cpu_count()));
    meta.insert("cpu_model".into(), json!(model));
    meta.insert("kernel".into(), json!(kernel));
    meta.insert("load_average_at_start".into(), json!(load));
    meta.insert(
        "postgres".into(),
        json!(pg.server_setting("server_version").unwrap_or_default()),
    );
    meta.insert("quick".into(), json!(opts.quick));
    meta.insert("rounds".into(), json!(s.rounds));
    meta.insert("heavy_rounds".into(), json!(s.heavy_rounds));
    meta.insert(
        "per_round_ms".into(),
        json!({
            "single_thread": s.per_op.as_millis() as u64,
            "load": s.load.as_millis() as u64,
            "fairness": s.fairness.as_millis() as u64,
        }),
    );
    meta
}
