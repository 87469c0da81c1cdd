//! The scenarios. Each builds its contenders, runs interleaved rounds and returns one
//! [`ScenarioResult`] (entries by contender, per-round checks, notes).

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pool_core::engine::{ConnState, Gate, PoolState};
use pool_core::lifecycle::ProbeResult;
use pool_core::{LogListener, PoolConfig};
use serde_json::{json, Map, Value};
use test_support::{FaultProxy, PgServer};
use tokio::runtime::Runtime;

use crate::delay_proxy::DelayProxy;
use crate::pools::{run_load, Kind, LoadResult, Observer, Plan, Pool, Sample, Spec, Work};
use crate::report::{Bound, Check, Entry, ScenarioResult};
use crate::stats::{interleaved, median, min_max, quantile, time_per_op};
use crate::sys::{self, LoopbackPair};
use crate::Settings;

/// What every scenario needs.
pub(crate) struct Ctx<'a> {
    pub pg: &'a PgServer,
    pub rt: &'a Runtime,
    pub settings: Settings,
    /// The floor of this pinning, once measured.
    pub floor_ns: Option<f64>,
}

impl Ctx<'_> {
    fn url(&self, app: &str) -> String {
        self.pg
            .url_with(&format!("sslmode=disable&application_name={app}"))
    }

    fn url_via(&self, port: u16, app: &str) -> String {
        self.pg
            .url_via(port, &format!("sslmode=disable&application_name={app}"))
    }
}

/// Runs scenario `name`.
pub(crate) fn run(name: &str, ctx: &mut Ctx<'_>) -> ScenarioResult {
    let mut result = match name {
        "poll_ns" => poll_ns(ctx),
        "machinery_1t" => machinery_1t(ctx),
        "contended_8t" => contended_8t(ctx),
        "hot_select1" => hot_select1(ctx),
        "hot_select1_async" => hot_select1_async(ctx),
        "txn" => txn(ctx),
        "recovery" => recovery(ctx),
        "storm" => storm(ctx),
        "spike" => spike(ctx),
        "fairness" => fairness(ctx),
        "floor" => floor(ctx),
        "silent" => crate::correlated::silent(ctx),
        "hopeless" => crate::correlated::hopeless(ctx),
        other => unreachable!("unknown scenario {other}"),
    };
    result.fill_skipped("not a contender in this scenario");
    result
}

/// A contender built for a scenario.
struct Built {
    kind: Kind,
    /// The entry key (`kind` or `kind/variant`).
    key: String,
    pool: Arc<Pool>,
    work: Work,
    app: String,
    proxy: Option<FaultProxy>,
}

/// Builds `kinds` (each through its own counting proxy if `proxied`); a contender that
/// cannot be built gets a skipped entry.
fn build_all(
    ctx: &Ctx<'_>,
    scenario: &str,
    kinds: &[Kind],
    (max, idle): (u32, u32),
    proxied: bool,
    work: Work,
    result: &mut ScenarioResult,
) -> Vec<Built> {
    let mut built = Vec::new();
    for &kind in kinds {
        match build_one(ctx, scenario, kind, max, idle, proxied, work) {
            Ok(b) => built.push(b),
            Err(why) => result.put(kind.name(), Entry::skipped(why)),
        }
    }
    built
}

fn build_one(
    ctx: &Ctx<'_>,
    scenario: &str,
    kind: Kind,
    max: u32,
    idle: u32,
    proxied: bool,
    work: Work,
) -> Result<Built, String> {
    if kind == Kind::ExtAsync {
        if let Some(why) = crate::pools::ext_async_unavailable() {
            return Err(why.into());
        }
    }
    let app = format!("pb_{scenario}_{}", kind.name());
    let proxy = if proxied {
        Some(FaultProxy::start(ctx.pg.addr()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let url = match &proxy {
        Some(p) => ctx.url_via(p.port(), &app),
        None => ctx.url(&app),
    };
    let pool = Pool::build(kind, &Spec { max, idle, url }, ctx.rt)
        .map_err(|e| format!("could not build the pool: {e}"))?;
    Ok(Built {
        kind,
        key: kind.name().into(),
        pool: Arc::new(pool),
        work,
        app,
        proxy,
    })
}

/// Nanoseconds per unit of work on one thread (or one task), over the single-thread budget.
fn time_op(ctx: &Ctx<'_>, b: &Built) -> (f64, u64) {
    let budget = ctx.settings.per_op;
    let mut errors = 0u64;
    let ns = if b.kind.is_async() {
        // In a task on a worker, as a request handler runs (not on the thread blocked in
        // `block_on`, which would add a thread hop to every wake-up).
        let (pool, work) = (b.pool.clone(), b.work);
        let task = ctx.rt.spawn(async move {
            let start = Instant::now();
            let (mut ops, mut errors) = (0u64, 0u64);
            loop {
                for _ in 0..16 {
                    if pool.op_async(work).await.is_err() {
                        errors += 1;
                    }
                }
                ops += 16;
                if ops >= 32 && start.elapsed() >= budget {
                    break;
                }
            }
            (start.elapsed().as_nanos() as f64 / ops as f64, errors)
        });
        let (ns, e) = ctx.rt.block_on(task).unwrap_or((f64::NAN, 1));
        errors = e;
        ns
    } else {
        time_per_op(budget, 32, || {
            if b.pool.op_sync(b.work).is_err() {
                errors += 1;
            }
        })
    };
    (ns, errors)
}

/// Round trips per unit of work and connections opened, counted by a proxy: a fresh pool of
/// the same kind through its own `FaultProxy`, a few units to warm statement caches, then
/// `n` counted ones.
fn count_round_trips(
    ctx: &Ctx<'_>,
    scenario: &str,
    b: &Built,
    max: u32,
    idle: u32,
) -> Result<(f64, u64), String> {
    let mut counted = build_one(
        ctx,
        &format!("{scenario}_count"),
        b.kind,
        max,
        idle,
        true,
        b.work,
    )?;
    counted.key.clone_from(&b.key);
    let proxy = counted.proxy.as_ref().expect("built with a proxy");
    let n = ctx.settings.count_ops;
    let op = |counted: &Built| -> Result<(), String> {
        if counted.kind.is_async() {
            ctx.rt
                .block_on(counted.pool.op_async(counted.work))
                .map(drop)
        } else {
            counted.pool.op_sync(counted.work).map(drop)
        }
    };
    for _ in 0..10 {
        op(&counted)?;
    }
    proxy.reset_counts();
    for _ in 0..n {
        op(&counted)?;
    }
    let rt = proxy.messages().round_trips() as f64 / f64::from(n);
    Ok((rt, proxy.connections_accepted()))
}

/// Per-round summary of loads.
#[derive(Default)]
struct LoadRounds {
    ops_per_s: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
    errors: Vec<f64>,
    first_error: Option<String>,
}

fn summarize(results: &[LoadResult], metric: fn(&Sample) -> u64) -> LoadRounds {
    let mut out = LoadRounds::default();
    for r in results {
        let mut v: Vec<u64> = r.samples.iter().map(metric).collect();
        out.ops_per_s
            .push(r.samples.len() as f64 / r.elapsed.as_secs_f64());
        out.p50
            .push(quantile(&mut v, 0.5).map_or(f64::NAN, |x| x as f64));
        out.p99
            .push(quantile(&mut v, 0.99).map_or(f64::NAN, |x| x as f64));
        out.max.push(v.last().map_or(f64::NAN, |&x| x as f64));
        out.errors.push(r.errors as f64);
        if out.first_error.is_none() {
            out.first_error.clone_from(&r.first_error);
        }
    }
    out
}

fn load_entry(l: &LoadRounds) -> Entry {
    let mut e = Entry::default();
    e.set("median_ns", median(&l.p50))
        .set("p99_ns", median(&l.p99))
        .set("max_ns", min_max(&l.max).1)
        .set("ops_per_s", median(&l.ops_per_s))
        .set("errors", l.errors.iter().sum());
    if let Some(err) = &l.first_error {
        e.note = Some(format!("first error: {err}"));
    }
    e
}

fn wait_of(s: &Sample) -> u64 {
    s.wait_ns
}

fn latency_of(s: &Sample) -> u64 {
    s.latency_ns
}

fn by_key<'a, T>(built: &[Built], per: &'a [T], key: &str) -> Option<&'a T> {
    built.iter().position(|b| b.key == key).map(|i| &per[i])
}

// ---------------------------------------------------------------------------------------
// 1. poll_ns and machinery_1t
// ---------------------------------------------------------------------------------------

fn poll_ns(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "One zero-timeout poll(POLLIN|POLLRDHUP) on a connected loopback TCP socket: the physical \
         cost of ext_sync's liveness probe, paid on every checkout. Listed under `raw` (no pool)."
            .into(),
    );
    let pair = match LoopbackPair::new() {
        Ok(p) => p,
        Err(e) => {
            result.put("raw", Entry::skipped(format!("no loopback socket: {e}")));
            return result;
        }
    };
    let n = if ctx.settings.rounds <= 3 {
        50_000
    } else {
        200_000
    };
    let per_round: Vec<f64> = (0..ctx.settings.rounds).map(|_| pair.poll_ns(n)).collect();
    let mut e = Entry::default();
    e.set("median_ns", median(&per_round))
        .set("max_ns", min_max(&per_round).1);
    result.put("raw", e);
    result
}

/// The engine's own share of an ext_sync checkout + return, without r2d2, the socket or the
/// adapter: the gate (uncontended enter + release), a full cycle (gate, checkout decision
/// with a probe that says "alive", hand-out bookkeeping, checkin decision), and one clock
/// read (`Instant::now`), the unit most of the adapter's glue is made of.
fn engine_costs(budget: Duration) -> Result<(f64, f64, f64), String> {
    let config = PoolConfig::builder("postgres://bench@127.0.0.1:1/bench")
        .pool_size(1)
        .max_overflow(0)
        .build()
        .map_err(|e| e.to_string())?;
    let state =
        Arc::new(PoolState::new(config, Arc::new(LogListener), None).map_err(|e| e.to_string())?);
    let gate = Gate::new(1);
    let gate_ns = time_per_op(budget, 64, || {
        let permit = gate.enter(Duration::from_secs(1));
        drop(black_box(permit));
    });
    let mut conn = ConnState::opened(&state, Duration::ZERO, None);
    let cycle_ns = time_per_op(budget, 64, || {
        let permit = state.gate().try_enter();
        let asked_at = Instant::now();
        black_box(conn.begin_checkout(|| ProbeResult::Alive, asked_at));
        conn.handed_out(asked_at, permit);
        black_box(conn.checkin(false));
    });
    let clock_ns = time_per_op(budget / 4, 64, || {
        black_box(Instant::now());
    });
    Ok((gate_ns, cycle_ns, clock_ns))
}

fn machinery_1t(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "Checkout + return, no query, one thread (async pools: one task), a pool of one open \
         connection. r2d2 and bb8_verified/deadpool ping on every checkout; ext_sync probes the \
         socket (no round trip). Target: ext_sync <= 1.10 x (r2d2_notest + poll_ns), poll_ns \
         measured in the same round."
            .into(),
    );
    let kinds = [
        Kind::R2d2,
        Kind::R2d2NoTest,
        Kind::Bb8Verified,
        Kind::Bb8Fast,
        Kind::Deadpool,
        Kind::ExtSync,
        Kind::ExtAsync,
    ];
    let built = build_all(
        ctx,
        "machinery",
        &kinds,
        (1, 1),
        false,
        Work::Nothing,
        &mut result,
    );
    let pair = LoopbackPair::new().ok();
    let k = built.len();
    let mut poll_rounds = Vec::new();
    let per = interleaved(ctx.settings.rounds, k + 1, |idx, _| {
        if idx == k {
            let ns = pair.as_ref().map_or(f64::NAN, |p| p.poll_ns(50_000));
            poll_rounds.push(ns);
            (ns, 0)
        } else {
            time_op(ctx, &built[idx])
        }
    });
    for (b, rounds) in built.iter().zip(&per) {
        let ns: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        let mut e = Entry::default();
        e.set("median_ns", median(&ns))
            .set("errors", rounds.iter().map(|r| r.1 as f64).sum());
        result.put(b.key.clone(), e);
    }
    let ns_of = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| r.iter().map(|x| x.0).collect())
    };
    if let (Some(ext), Some(notest)) = (ns_of("ext_sync"), ns_of("r2d2_notest")) {
        let base: Vec<f64> = notest
            .iter()
            .zip(&poll_rounds)
            .map(|(a, p)| a + p)
            .collect();
        result.checks.push(Check::ratio(
            "ext_sync / (r2d2_notest + poll_ns)",
            &ext,
            &base,
            Some(Bound::AtMost(1.10)),
        ));
        result
            .checks
            .push(Check::ratio("ext_sync / r2d2_notest", &ext, &notest, None));
        if let (Some(ext_async), Some(fast)) = (ns_of("ext_async"), ns_of("bb8_fast")) {
            result.checks.push(Check::ratio(
                "ext_async / bb8_fast",
                &ext_async,
                &fast,
                None,
            ));
        }
        // Where the difference goes: what the engine itself costs, measured here.
        let budget = ctx.settings.per_op;
        let costs: Vec<(f64, f64, f64)> = (0..ctx.settings.rounds.min(5))
            .filter_map(|_| engine_costs(budget).ok())
            .collect();
        let gate = median(&costs.iter().map(|c| c.0).collect::<Vec<_>>());
        let cycle = median(&costs.iter().map(|c| c.1).collect::<Vec<_>>());
        let clock = median(&costs.iter().map(|c| c.2).collect::<Vec<_>>());
        let extra = median(&ext) - median(&notest);
        let poll = median(&poll_rounds);
        if let Some((_, entry)) = result.entries.iter_mut().find(|(k, _)| k == "ext_sync") {
            entry
                .set("gate_uncontended_ns", gate)
                .set("engine_cycle_ns", cycle)
                .set("poll_ns", poll)
                .set("clock_read_ns", clock)
                .set("extra_over_r2d2_notest_ns", extra);
            entry.note = Some(format!(
                "ext_sync - r2d2_notest = {extra:.0} ns: poll {poll:.0} ns + engine cycle {cycle:.0} ns \
                 (of which gate {gate:.0} ns) + {:.0} ns of adapter glue (clock reads at \
                 {clock:.0} ns each, demand counter, tracker lookups, has_broken)",
                extra - poll - cycle
            ));
        }
    }
    result
}

// ---------------------------------------------------------------------------------------
// 2. contended_8t, 8. fairness
// ---------------------------------------------------------------------------------------

fn sync_load_scenario(
    ctx: &Ctx<'_>,
    scenario: &str,
    work: Work,
    duration: Duration,
    result: &mut ScenarioResult,
) -> Vec<(String, LoadRounds)> {
    let kinds = [Kind::R2d2, Kind::R2d2NoTest, Kind::ExtSync];
    let built = build_all(ctx, scenario, &kinds, (4, 4), false, work, result);
    let per = interleaved(ctx.settings.rounds, built.len(), |idx, _| {
        let b = &built[idx];
        run_load(
            &b.pool,
            b.kind,
            ctx.rt,
            8,
            b.work,
            Plan::For(duration),
            None,
        )
    });
    let mut out = Vec::new();
    for (b, rounds) in built.iter().zip(&per) {
        let l = summarize(rounds, wait_of);
        result.put(b.key.clone(), load_entry(&l));
        out.push((b.key.clone(), l));
    }
    result.put(
        "ext_async",
        Entry::skipped(
            crate::pools::ext_async_unavailable()
                .map_or("threads scenario (sync pools only)".into(), str::to_owned),
        ),
    );
    out
}

fn find<'a>(v: &'a [(String, LoadRounds)], key: &str) -> Option<&'a LoadRounds> {
    v.iter().find(|(k, _)| k == key).map(|(_, l)| l)
}

fn contended_8t(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(
        "8 threads, a pool of 4, checkout + thread::yield_now() + return, no query. \
         median/p99/max: checkout wait. Targets: ext_sync ops/s >= r2d2_notest's, p99 wait <= \
         r2d2_notest's."
            .into(),
    );
    let loads = sync_load_scenario(
        ctx,
        "contended",
        Work::Yield,
        ctx.settings.load,
        &mut result,
    );
    if let (Some(ext), Some(notest), Some(r2d2)) = (
        find(&loads, "ext_sync"),
        find(&loads, "r2d2_notest"),
        find(&loads, "r2d2"),
    ) {
        result.checks.push(Check::ratio(
            "ext_sync / r2d2_notest (ops/s)",
            &ext.ops_per_s,
            &notest.ops_per_s,
            Some(Bound::AtLeast(1.0)),
        ));
        result.checks.push(Check::ratio(
            "ext_sync / r2d2_notest (p99 wait)",
            &ext.p99,
            &notest.p99,
            Some(Bound::AtMost(1.0)),
        ));
        result.checks.push(Check::ratio(
            "ext_sync / r2d2 (ops/s)",
            &ext.ops_per_s,
            &r2d2.ops_per_s,
            None,
        ));
    }
    result
}

fn fairness(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(
        "Issue 11: 8 threads, a pool of 4, each holds its connection 500 µs (thread::sleep) and \
         asks again at once. median/p99/max: checkout wait. Targets: ext_sync p99 <= 0.5 x \
         r2d2's, ops/s >= 0.95 x r2d2's; the gate's uncontended enter + release (what FIFO \
         costs a single-thread checkout) is under ext_sync."
            .into(),
    );
    let loads = sync_load_scenario(
        ctx,
        "fairness",
        Work::Hold(Duration::from_micros(500)),
        ctx.settings.fairness,
        &mut result,
    );
    for base in ["r2d2", "r2d2_notest"] {
        if let (Some(ext), Some(other)) = (find(&loads, "ext_sync"), find(&loads, base)) {
            let targeted = base == "r2d2";
            result.checks.push(Check::ratio(
                format!("ext_sync / {base} (p99 wait)"),
                &ext.p99,
                &other.p99,
                targeted.then_some(Bound::AtMost(0.5)),
            ));
            result.checks.push(Check::ratio(
                format!("ext_sync / {base} (max wait)"),
                &ext.max,
                &other.max,
                None,
            ));
            result.checks.push(Check::ratio(
                format!("ext_sync / {base} (ops/s)"),
                &ext.ops_per_s,
                &other.ops_per_s,
                targeted.then_some(Bound::AtLeast(0.95)),
            ));
        }
    }
    let gate: Vec<f64> = (0..ctx.settings.rounds)
        .filter_map(|_| engine_costs(ctx.settings.per_op / 2).ok().map(|c| c.0))
        .collect();
    if let Some((_, entry)) = result.entries.iter_mut().find(|(k, _)| k == "ext_sync") {
        entry.set("gate_uncontended_ns", median(&gate));
    }
    result
}

// ---------------------------------------------------------------------------------------
// 3. hot_select1, hot_select1_async
// ---------------------------------------------------------------------------------------

fn hot_select1(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "Checkout + SELECT 1 (Diesel's select(1.into_sql()), a cached prepared statement) + \
         return, one thread, a pool of 4. raw: the same query on one held connection. Round \
         trips per checkout counted by a FaultProxy in front of a separate pool of each kind \
         (timings are taken without the proxy). Targets: ext_sync <= 1.05 x r2d2_notest, <= 0.55 \
         x r2d2, 1.0 round trip per checkout."
            .into(),
    );
    let kinds = [Kind::Raw, Kind::R2d2, Kind::R2d2NoTest, Kind::ExtSync];
    let built = build_all(
        ctx,
        "hot",
        &kinds,
        (4, 4),
        false,
        Work::Select1,
        &mut result,
    );
    let per = interleaved(ctx.settings.rounds, built.len(), |idx, _| {
        time_op(ctx, &built[idx])
    });
    for (b, rounds) in built.iter().zip(&per) {
        let ns: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        let mut e = Entry::default();
        e.set("median_ns", median(&ns))
            .set("ops_per_s", 1e9 / median(&ns))
            .set("errors", rounds.iter().map(|r| r.1 as f64).sum());
        match count_round_trips(ctx, "hot", b, 1, 1) {
            Ok((rt, opened)) => {
                e.set("round_trips", rt)
                    .set("connections_opened", opened as f64);
            }
            Err(err) => e.note = Some(format!("round trips not counted: {err}")),
        }
        result.put(b.key.clone(), e);
    }
    result.put(
        "ext_async",
        Entry::skipped("sync scenario: see hot_select1_async"),
    );
    let ns_of = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| r.iter().map(|x| x.0).collect())
    };
    if let Some(ext) = ns_of("ext_sync") {
        if let Some(notest) = ns_of("r2d2_notest") {
            result.checks.push(Check::ratio(
                "ext_sync / r2d2_notest",
                &ext,
                &notest,
                Some(Bound::AtMost(1.05)),
            ));
        }
        if let Some(r2d2) = ns_of("r2d2") {
            result.checks.push(Check::ratio(
                "ext_sync / r2d2",
                &ext,
                &r2d2,
                Some(Bound::AtMost(0.55)),
            ));
        }
        if let Some(raw) = ns_of("raw") {
            result
                .checks
                .push(Check::ratio("ext_sync / raw", &ext, &raw, None));
        }
        if let Some(rt) = result.entry("ext_sync").and_then(|e| e.get("round_trips")) {
            result.checks.push(Check::new(
                "ext_sync round trips per checkout",
                vec![rt],
                Some(Bound::AtMost(1.0)),
            ));
        }
    }
    result
}

fn hot_select1_async(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "Checkout + SELECT 1 + return on a tokio runtime (2 workers), a pool of 10: one task \
         (`<contender>`), and 64 concurrent tasks (`<contender>/64_tasks`: median/p99 = latency \
         of one request including its wait, ops/s = throughput). deadpool runs the query in \
         `interact` (a blocking-pool thread). Round trips counted on one task through a \
         FaultProxy. Targets: ext_async <= 1.05 x bb8_fast, <= 0.55 x bb8_verified (one task), \
         1.0 round trip per checkout."
            .into(),
    );
    let kinds = [
        Kind::Bb8Verified,
        Kind::Bb8Fast,
        Kind::Deadpool,
        Kind::ExtAsync,
    ];
    let built = build_all(
        ctx,
        "hot_async",
        &kinds,
        (10, 10),
        false,
        Work::Select1,
        &mut result,
    );
    let load = ctx.settings.load;
    let per = interleaved(ctx.settings.rounds, built.len(), |idx, _| {
        let b = &built[idx];
        let one = time_op(ctx, b);
        let many = run_load(&b.pool, b.kind, ctx.rt, 64, b.work, Plan::For(load), None);
        (one, many)
    });
    for (b, rounds) in built.iter().zip(&per) {
        let ns: Vec<f64> = rounds.iter().map(|r| r.0 .0).collect();
        let mut e = Entry::default();
        e.set("median_ns", median(&ns))
            .set("ops_per_s", 1e9 / median(&ns))
            .set("errors", rounds.iter().map(|r| r.0 .1 as f64).sum());
        match count_round_trips(ctx, "hot_async", b, 1, 1) {
            Ok((rt, opened)) => {
                e.set("round_trips", rt)
                    .set("connections_opened", opened as f64);
            }
            Err(err) => e.note = Some(format!("round trips not counted: {err}")),
        }
        result.put(b.key.clone(), e);
        let many: Vec<LoadResult> = rounds.iter().map(|r| r.1.clone()).collect();
        result.put(
            format!("{}/64_tasks", b.key),
            load_entry(&summarize(&many, latency_of)),
        );
    }
    let ns_of = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| r.iter().map(|x| x.0 .0).collect())
    };
    let ops64 = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| {
            r.iter()
                .map(|x| x.1.samples.len() as f64 / x.1.elapsed.as_secs_f64())
                .collect()
        })
    };
    if let Some(ext) = ns_of("ext_async") {
        if let Some(fast) = ns_of("bb8_fast") {
            result.checks.push(Check::ratio(
                "ext_async / bb8_fast (1 task)",
                &ext,
                &fast,
                Some(Bound::AtMost(1.05)),
            ));
        }
        if let Some(verified) = ns_of("bb8_verified") {
            result.checks.push(Check::ratio(
                "ext_async / bb8_verified (1 task)",
                &ext,
                &verified,
                Some(Bound::AtMost(0.55)),
            ));
        }
    }
    if let Some(ext) = ops64("ext_async") {
        for base in ["bb8_fast", "bb8_verified"] {
            if let Some(other) = ops64(base) {
                result.checks.push(Check::ratio(
                    format!("ext_async / {base} (64 tasks, ops/s)"),
                    &ext,
                    &other,
                    None,
                ));
            }
        }
    }
    if let Some(rt) = result.entry("ext_async").and_then(|e| e.get("round_trips")) {
        result.checks.push(Check::new(
            "ext_async round trips per checkout",
            vec![rt],
            Some(Bound::AtMost(1.0)),
        ));
    }
    if let (Some(fast), Some(verified)) = (ns_of("bb8_fast"), ns_of("bb8_verified")) {
        result.checks.push(Check::ratio(
            "bb8_fast / bb8_verified (1 task)",
            &fast,
            &verified,
            None,
        ));
    }
    if let (Some(fast), Some(verified)) = (ops64("bb8_fast"), ops64("bb8_verified")) {
        result.checks.push(Check::ratio(
            "bb8_fast / bb8_verified (64 tasks, ops/s)",
            &fast,
            &verified,
            None,
        ));
    }
    if let (Some(dp), Some(verified)) = (ns_of("deadpool"), ns_of("bb8_verified")) {
        result.checks.push(Check::ratio(
            "deadpool / bb8_verified (1 task)",
            &dp,
            &verified,
            None,
        ));
    }
    result
}

// ---------------------------------------------------------------------------------------
// 4. txn
// ---------------------------------------------------------------------------------------

fn txn(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "BEGIN; INSERT INTO bench_txn (v) VALUES (1); COMMIT, one thread, a pool of 4, one \
         checkout per transaction. `r2d2_notest` and `ext_sync/transaction`: conn.transaction(); \
         `ext_sync`: commit_with_retry with verify_commit(false); `ext_sync/verify_commit`: \
         commit_with_retry with the default policy (reads txid_current() before COMMIT). \
         Targets: ext_sync <= 1.05 x ext_sync/transaction; verification <= +1 round trip."
            .into(),
    );
    let mut built = Vec::new();
    let variants: [(&str, Kind, Work); 4] = [
        ("r2d2_notest", Kind::R2d2NoTest, Work::Txn),
        ("ext_sync/transaction", Kind::ExtSync, Work::Txn),
        ("ext_sync", Kind::ExtSync, Work::Retry { verify: false }),
        (
            "ext_sync/verify_commit",
            Kind::ExtSync,
            Work::Retry { verify: true },
        ),
    ];
    for (key, kind, work) in variants {
        match build_one(ctx, "txn", kind, 4, 4, false, work) {
            Ok(mut b) => {
                b.key = key.into();
                built.push(b);
            }
            Err(why) => result.put(key, Entry::skipped(why)),
        }
    }
    let per = interleaved(ctx.settings.rounds, built.len(), |idx, _| {
        time_op(ctx, &built[idx])
    });
    for (b, rounds) in built.iter().zip(&per) {
        let ns: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        let mut e = Entry::default();
        e.set("median_ns", median(&ns))
            .set("ops_per_s", 1e9 / median(&ns))
            .set("errors", rounds.iter().map(|r| r.1 as f64).sum());
        match count_round_trips(ctx, "txn", b, 1, 1) {
            Ok((rt, opened)) => {
                e.set("round_trips", rt)
                    .set("connections_opened", opened as f64);
            }
            Err(err) => e.note = Some(format!("round trips not counted: {err}")),
        }
        result.put(b.key.clone(), e);
    }
    let ns_of = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| r.iter().map(|x| x.0).collect())
    };
    if let (Some(off), Some(on), Some(plain)) = (
        ns_of("ext_sync"),
        ns_of("ext_sync/verify_commit"),
        ns_of("ext_sync/transaction"),
    ) {
        result.checks.push(Check::ratio(
            "ext_sync (commit_with_retry, verify off) / ext_sync/transaction",
            &off,
            &plain,
            Some(Bound::AtMost(1.05)),
        ));
        result.checks.push(Check::ratio(
            "ext_sync/verify_commit / ext_sync/transaction",
            &on,
            &plain,
            None,
        ));
    }
    if let (Some(plain), Some(notest)) = (ns_of("ext_sync/transaction"), ns_of("r2d2_notest")) {
        result.checks.push(Check::ratio(
            "ext_sync/transaction / r2d2_notest",
            &plain,
            &notest,
            None,
        ));
    }
    let rt = |key: &str| result.entry(key).and_then(|e| e.get("round_trips"));
    let (on, off, plain) = (
        rt("ext_sync/verify_commit"),
        rt("ext_sync"),
        rt("ext_sync/transaction"),
    );
    if let (Some(on), Some(plain)) = (on, plain) {
        result.checks.push(Check::new(
            "round trips: ext_sync/verify_commit - ext_sync/transaction",
            vec![on - plain],
            Some(Bound::AtMost(1.0)),
        ));
    }
    if let (Some(off), Some(plain)) = (off, plain) {
        result.checks.push(Check::new(
            "round trips: ext_sync (verify off) - ext_sync/transaction",
            vec![off - plain],
            Some(Bound::AtMost(0.0)),
        ));
    }
    result
}

// ---------------------------------------------------------------------------------------
// 5. recovery, 6. storm
// ---------------------------------------------------------------------------------------

const RESILIENCE_KINDS: [Kind; 7] = [
    Kind::R2d2,
    Kind::R2d2NoTest,
    Kind::Bb8Verified,
    Kind::Bb8Fast,
    Kind::Deadpool,
    Kind::ExtSync,
    Kind::ExtAsync,
];

/// Terminates every backend of `b` and waits until the server and the proxy saw them go.
fn kill_backends(ctx: &Ctx<'_>, b: &Built) -> Result<usize, String> {
    let n = ctx
        .pg
        .terminate_backends(&b.app)
        .map_err(|e| e.to_string())?;
    ctx.pg
        .wait_backends_gone(&b.app, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    // The FIN travels server -> proxy -> client: give it a moment.
    std::thread::sleep(Duration::from_millis(30));
    Ok(n)
}

struct Burst {
    load: LoadResult,
    round_trips: f64,
    opened: f64,
    killed: usize,
}

fn recovery(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(
        "A pool of 10 open, idle connections; every backend terminated (pg_terminate_backend, \
         the server's FIN reaches the client); then a burst of 64 concurrent requests \
         (checkout + SELECT 1, threads or tasks). median: time until all 64 completed; p99: one \
         request's latency; errors: errors surfaced to callers per burst; round trips and \
         connections opened per burst, counted by each contender's own FaultProxy. Target: \
         ext_sync and ext_async errors 0."
            .into(),
    );
    let built = build_all(
        ctx,
        "recovery",
        &RESILIENCE_KINDS,
        (10, 10),
        true,
        Work::Select1,
        &mut result,
    );
    let per = interleaved(ctx.settings.heavy_rounds, built.len(), |idx, _| {
        let b = &built[idx];
        let proxy = b.proxy.as_ref().expect("proxied");
        let _ = b.pool.warm(10, ctx.rt);
        let killed = kill_backends(ctx, b).unwrap_or(0);
        proxy.reset_counts();
        let load = run_load(&b.pool, b.kind, ctx.rt, 64, Work::Select1, Plan::Once, None);
        Burst {
            round_trips: proxy.messages().round_trips() as f64,
            opened: proxy.connections_accepted() as f64,
            load,
            killed,
        }
    });
    for (b, rounds) in built.iter().zip(&per) {
        let elapsed: Vec<f64> = rounds
            .iter()
            .map(|r| r.load.elapsed.as_nanos() as f64)
            .collect();
        let loads: Vec<LoadResult> = rounds.iter().map(|r| r.load.clone()).collect();
        let l = summarize(&loads, latency_of);
        let mut e = Entry::default();
        e.set("median_ns", median(&elapsed))
            .set("p99_ns", median(&l.p99))
            .set("max_ns", min_max(&l.max).1)
            .set("errors", median(&l.errors))
            .set("errors_max", min_max(&l.errors).1)
            .set(
                "round_trips",
                median(&rounds.iter().map(|r| r.round_trips).collect::<Vec<_>>()),
            )
            .set(
                "connections_opened",
                median(&rounds.iter().map(|r| r.opened).collect::<Vec<_>>()),
            )
            .set(
                "backends_terminated",
                median(&rounds.iter().map(|r| r.killed as f64).collect::<Vec<_>>()),
            );
        if let Some(err) = &l.first_error {
            e.note = Some(format!("first error: {err}"));
        }
        result.put(b.key.clone(), e);
    }
    let t = |r: &Vec<Burst>| -> Vec<f64> {
        r.iter().map(|x| x.load.elapsed.as_nanos() as f64).collect()
    };
    for (ours, bases) in [
        ("ext_sync", ["r2d2", "r2d2_notest"]),
        ("ext_async", ["bb8_verified", "bb8_fast"]),
    ] {
        let Some(ext) = by_key(&built, &per, ours) else {
            continue;
        };
        result.checks.push(Check::new(
            format!("{ours} errors per burst"),
            ext.iter().map(|r| r.load.errors as f64).collect(),
            Some(Bound::AtMost(0.0)),
        ));
        for base in bases {
            if let Some(other) = by_key(&built, &per, base) {
                result.checks.push(Check::ratio(
                    format!("{ours} / {base} (time to complete the burst)"),
                    &t(ext),
                    &t(other),
                    None,
                ));
            }
        }
    }
    result
}

fn storm(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    let timeout = ctx.settings.storm_timeout;
    result.notes.push(format!(
        "A pool of 20 open connections, all terminated by the server; then 32 threads (tasks) \
         loop on checkout + `SELECT pg_backend_pid() FROM pg_sleep(0.002)`. median: time from \
         the load's start until 20 distinct new backends have answered (20 healthy connections \
         serving queries), at most {} s; errors: per round; connections opened, round trips and \
         requests (checkouts attempted) per round, counted by the proxy. Target: ext_sync <= \
         1.2 x r2d2.",
        timeout.as_secs()
    ));
    let built = build_all(
        ctx,
        "storm",
        &RESILIENCE_KINDS,
        (20, 20),
        true,
        Work::PidSleep(2),
        &mut result,
    );
    let per = interleaved(ctx.settings.heavy_rounds, built.len(), |idx, _| {
        let b = &built[idx];
        let proxy = b.proxy.as_ref().expect("proxied");
        let _ = b.pool.warm(20, ctx.rt);
        let old: HashSet<i32> = ctx
            .pg
            .backend_pids(&b.app)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let _ = kill_backends(ctx, b);
        proxy.reset_counts();
        let fresh = Arc::new(Mutex::new(HashSet::new()));
        let seen = fresh.clone();
        let observer: Observer = Arc::new(move |s: &Sample| {
            if old.contains(&s.pid) {
                return false;
            }
            let mut fresh = seen.lock();
            fresh.insert(s.pid);
            fresh.len() >= 20
        });
        let load = run_load(
            &b.pool,
            b.kind,
            ctx.rt,
            32,
            Work::PidSleep(2),
            Plan::UntilObserved(timeout),
            Some(observer),
        );
        let reached = fresh.lock().len();
        (
            load,
            proxy.connections_accepted() as f64,
            reached,
            proxy.messages().round_trips() as f64,
        )
    });
    for (b, rounds) in built.iter().zip(&per) {
        let times: Vec<f64> = rounds
            .iter()
            .map(|r| r.0.observed_at.map_or(f64::NAN, |d| d.as_nanos() as f64))
            .collect();
        let ok = times.iter().filter(|t| !t.is_nan()).count();
        let mut e = Entry::default();
        e.set("median_ns", median(&times))
            .set("max_ns", min_max(&times).1)
            .set(
                "errors",
                median(&rounds.iter().map(|r| r.0.errors as f64).collect::<Vec<_>>()),
            )
            .set(
                "connections_opened",
                median(&rounds.iter().map(|r| r.1).collect::<Vec<_>>()),
            )
            .set("rounds_reaching_20", ok as f64)
            .set(
                "round_trips",
                median(&rounds.iter().map(|r| r.3).collect::<Vec<_>>()),
            )
            .set(
                "requests",
                median(
                    &rounds
                        .iter()
                        .map(|r| (r.0.samples.len() as u64 + r.0.errors) as f64)
                        .collect::<Vec<_>>(),
                ),
            );
        let mut note = Vec::new();
        if ok < rounds.len() {
            let least = rounds.iter().map(|r| r.2).min().unwrap_or(0);
            note.push(format!(
                "did not reach 20 healthy connections within {} s in {} of {} rounds (as few as \
                 {least} new backends answered)",
                timeout.as_secs(),
                rounds.len() - ok,
                rounds.len()
            ));
        }
        if let Some(err) = rounds.iter().find_map(|r| r.0.first_error.clone()) {
            note.push(format!("first error: {err}"));
        }
        if !note.is_empty() {
            e.note = Some(note.join("; "));
        }
        result.put(b.key.clone(), e);
    }
    let t = |key: &str| -> Option<Vec<f64>> {
        by_key(&built, &per, key).map(|r| {
            r.iter()
                .map(|x| x.0.observed_at.map_or(f64::NAN, |d| d.as_nanos() as f64))
                .collect()
        })
    };
    if let (Some(ext), Some(r2d2)) = (t("ext_sync"), t("r2d2")) {
        result.checks.push(Check::ratio(
            "ext_sync / r2d2 (time to 20 healthy connections)",
            &ext,
            &r2d2,
            Some(Bound::AtMost(1.2)),
        ));
    }
    if let (Some(ext), Some(bb8)) = (t("ext_async"), t("bb8_verified")) {
        result.checks.push(Check::ratio(
            "ext_async / bb8_verified (time to 20 healthy connections)",
            &ext,
            &bb8,
            None,
        ));
    }
    result
}

// ---------------------------------------------------------------------------------------
// 7. spike
// ---------------------------------------------------------------------------------------

struct SpikeRound {
    load: LoadResult,
    opened: f64,
    needed: f64,
}

fn spike_round(ctx: &Ctx<'_>, kind: Kind, round: usize) -> Result<SpikeRound, String> {
    const CONNECT_DELAY: Duration = Duration::from_millis(150);
    let counting = FaultProxy::start(ctx.pg.addr()).map_err(|e| e.to_string())?;
    let slow = DelayProxy::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        counting.port(),
    )))
    .map_err(|e| e.to_string())?;
    let app = format!("pb_spike_{}_{round}", kind.name());
    let spec = Spec {
        max: 50,
        idle: 5,
        url: ctx.url_via(slow.port(), &app),
    };
    let pool = Arc::new(Pool::build(kind, &spec, ctx.rt)?);
    // Let the pool finish whatever it opens by itself (r2d2 and bb8 keep `min_idle` idle
    // connections in the background): settled once nothing was accepted for 200 ms.
    settle(
        &counting,
        Duration::from_millis(200),
        Duration::from_secs(3),
    );
    let warm: HashSet<i32> = ctx
        .pg
        .backend_pids(&app)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    slow.set_delay(CONNECT_DELAY);
    counting.reset_counts();
    let load = run_load(&pool, kind, ctx.rt, 50, Work::PidSleep(2), Plan::Once, None);
    // Connects started during the spike finish later: count until none was accepted for
    // 500 ms (at most 6 s; quick runs: 300 ms, at most 1.5 s, which may cut r2d2's queue of
    // connects short).
    let (quiet, cap) = if ctx.settings.heavy_rounds <= 1 {
        (Duration::from_millis(300), Duration::from_millis(1500))
    } else {
        (Duration::from_millis(500), Duration::from_secs(6))
    };
    settle(&counting, quiet, cap);
    let needed: HashSet<i32> = load
        .samples
        .iter()
        .map(|s| s.pid)
        .filter(|pid| !warm.contains(pid))
        .collect();
    let opened = counting.connections_accepted() as f64;
    drop(pool);
    Ok(SpikeRound {
        load,
        opened,
        needed: needed.len() as f64,
    })
}

/// Waits until `proxy` accepted no new connection for `quiet` (at most `limit`).
fn settle(proxy: &FaultProxy, quiet: Duration, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = proxy.connections_accepted();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline && stable_since.elapsed() < quiet {
        std::thread::sleep(Duration::from_millis(20));
        let now = proxy.connections_accepted();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
}

fn spike(ctx: &Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult::default();
    result.notes.push(
        "HikariCP's spike test: a pool of at most 50 with 5 open, idle connections; 50 \
         simultaneous requests, each checkout + `SELECT pg_backend_pid() FROM pg_sleep(0.002)`; \
         every connect takes 150 ms more (a proxy that waits 150 ms before forwarding a new \
         connection, in front of a counting FaultProxy: FaultProxy::set_latency would slow the \
         queries too). median/p99/max: one request's latency. connections opened: new \
         connections accepted from the spike until none came for 500 ms. connections needed: \
         new backends that served at least one request (the warm ones excluded): a connection \
         opened but never used was not needed by the load. A fresh pool per round. Target: \
         ext_sync and ext_async open no more connections than needed."
            .into(),
    );
    let kinds = RESILIENCE_KINDS;
    let rounds = ctx.settings.heavy_rounds.min(3);
    let mut usable: Vec<Kind> = Vec::new();
    for kind in kinds {
        if kind == Kind::ExtAsync {
            if let Some(why) = crate::pools::ext_async_unavailable() {
                result.put(kind.name(), Entry::skipped(why));
                continue;
            }
        }
        usable.push(kind);
    }
    let per = interleaved(rounds, usable.len(), |idx, round| {
        spike_round(ctx, usable[idx], round)
    });
    let mut opened_minus_needed: Vec<(&str, Vec<f64>)> = Vec::new();
    for (kind, rounds) in usable.iter().zip(&per) {
        let ok: Vec<&SpikeRound> = rounds.iter().filter_map(|r| r.as_ref().ok()).collect();
        if ok.is_empty() {
            let why = rounds
                .iter()
                .find_map(|r| r.as_ref().err().cloned())
                .unwrap_or_default();
            result.put(kind.name(), Entry::skipped(format!("failed: {why}")));
            continue;
        }
        let loads: Vec<LoadResult> = ok.iter().map(|r| r.load.clone()).collect();
        let l = summarize(&loads, latency_of);
        let mut e = load_entry(&l);
        e.metrics.remove("ops_per_s");
        e.set(
            "connections_opened",
            median(&ok.iter().map(|r| r.opened).collect::<Vec<_>>()),
        )
        .set(
            "needed_connections",
            median(&ok.iter().map(|r| r.needed).collect::<Vec<_>>()),
        )
        .set(
            "burst_ns",
            median(
                &ok.iter()
                    .map(|r| r.load.elapsed.as_nanos() as f64)
                    .collect::<Vec<_>>(),
            ),
        );
        if matches!(kind, Kind::ExtSync | Kind::ExtAsync) {
            opened_minus_needed.push((
                kind.name(),
                ok.iter().map(|r| r.opened - r.needed).collect(),
            ));
        }
        result.put(kind.name(), e);
    }
    for (name, per_round) in opened_minus_needed {
        result.checks.push(Check::new(
            format!("{name} connections opened - needed"),
            per_round,
            Some(Bound::AtMost(0.0)),
        ));
    }
    result
}

// ---------------------------------------------------------------------------------------
// 9. floor
// ---------------------------------------------------------------------------------------

fn floor(ctx: &mut Ctx<'_>) -> ScenarioResult {
    let mut result = ScenarioResult {
        per_op: true,
        ..Default::default()
    };
    result.notes.push(
        "The wire: SELECT 1 (the same prepared statement) on one held PgConnection, no pool, \
         one thread. Per-operation figures elsewhere are also shown as multiples of it."
            .into(),
    );
    let built = build_all(
        ctx,
        "floor",
        &[Kind::Raw],
        (1, 1),
        false,
        Work::Select1,
        &mut result,
    );
    let Some(raw) = built.first() else {
        return result;
    };
    let per: Vec<(f64, u64)> = (0..ctx.settings.rounds)
        .map(|_| time_op(ctx, raw))
        .collect();
    let ns: Vec<f64> = per.iter().map(|r| r.0).collect();
    let mut e = Entry::default();
    e.set("median_ns", median(&ns))
        .set("max_ns", min_max(&ns).1)
        .set("ops_per_s", 1e9 / median(&ns))
        .set("errors", per.iter().map(|r| r.1 as f64).sum());
    ctx.floor_ns = Some(median(&ns));
    result.put("raw", e);
    result
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

/// Resident memory each contender's pool of 10 open connections adds to the process,
/// measured by building them one after another and keeping all of them alive (so that a
/// later pool does not reuse memory an earlier one gave back). Peak RSS (`ru_maxrss`) is one
/// high-water mark for the whole process: it cannot be split by contender in one run.
pub(crate) fn rss_per_contender(pg: &PgServer, rt: &Runtime) -> Value {
    let mut map = Map::new();
    let mut keep = Vec::new();
    for kind in [
        Kind::Raw,
        Kind::R2d2,
        Kind::R2d2NoTest,
        Kind::Bb8Verified,
        Kind::Bb8Fast,
        Kind::Deadpool,
        Kind::ExtSync,
        Kind::ExtAsync,
    ] {
        let app = format!("pb_rss_{}", kind.name());
        let url = pg.url_with(&format!("sslmode=disable&application_name={app}"));
        let before = sys::rss_kib();
        match Pool::build(
            kind,
            &Spec {
                max: 10,
                idle: 10,
                url,
            },
            rt,
        ) {
            Ok(pool) => {
                let _ = pool.warm(10, rt);
                let after = sys::rss_kib();
                if let (Some(a), Some(b)) = (after, before) {
                    map.insert(kind.name().into(), json!(a.saturating_sub(b)));
                }
                keep.push(pool);
            }
            Err(e) => {
                map.insert(kind.name().into(), json!({ "skipped": e }));
            }
        }
    }
    map.insert(
        "note".into(),
        json!(
            "KiB of resident memory added by building the pool and opening its 10 connections \
               (raw: 1 connection), pools built in this order and kept alive, so the first \
               pool of a driver also pays its one-time allocations (tokio-postgres: \
               bb8_verified); peak RSS is process-wide (see peak_rss_kib)"
        ),
    );
    drop(keep);
    Value::Object(map)
}
