//! The faults, injected one at a time in a seeded random order, and the budget watcher.
//!
//! The order comes from the seed alone: each round shuffles every kind with the run's RNG and
//! draws each fault's window and the calm after it from it too; choices that depend on the
//! server's state (which backends to terminate) use a per-fault RNG drawn from the run's, so
//! they never shift the order. How many faults fit depends on the run's length and speed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable, Text};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use test_support::{FaultProxy, PgServer};

use crate::{Shared, Zombie};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// `pg_terminate_backend` on a random half of the soak's backends.
    Terminate,
    /// `pg_ctl restart -m fast`.
    RestartFast,
    /// Every soak backend stopped with SIGSTOP for the window, then continued.
    HungBackend,
    /// `idle_session_timeout = 300ms` server-wide for the window (idle sessions are ended).
    IdleTimeout,
    /// Every backend of the TLS route (`sslmode=require`) terminated at once.
    SslKilled,
    /// Every flow through the proxies goes silent (new connects pass); at the window's end
    /// the silent flows are reset, as a middlebox finally expires them.
    Silence,
    /// The proxies reset every connection and refuse new ones for the window.
    RefuseConnects,
    /// An outside client takes every connection slot (53300) for the window.
    MaxConnections,
    /// The proxies cut a connection right after forwarding its `COMMIT` (the server commits,
    /// the client never hears), re-armed through the window.
    CommitCut,
}

impl FaultKind {
    /// Every kind, in a fixed order (shuffled per round by the seed).
    pub const ALL: [FaultKind; 9] = [
        FaultKind::Terminate,
        FaultKind::RestartFast,
        FaultKind::HungBackend,
        FaultKind::IdleTimeout,
        FaultKind::SslKilled,
        FaultKind::Silence,
        FaultKind::RefuseConnects,
        FaultKind::MaxConnections,
        FaultKind::CommitCut,
    ];

    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Terminate => "terminate",
            FaultKind::RestartFast => "restart_fast",
            FaultKind::HungBackend => "hung_backend",
            FaultKind::IdleTimeout => "idle_session_timeout",
            FaultKind::SslKilled => "ssl_killed",
            FaultKind::Silence => "silence_existing",
            FaultKind::RefuseConnects => "refuse_connects",
            FaultKind::MaxConnections => "max_connections",
            FaultKind::CommitCut => "commit_cut",
        }
    }

    /// The window drawn for it (instant faults still get a window: the label stays on it).
    fn window(self, rng: &mut StdRng) -> Duration {
        let ms = match self {
            FaultKind::Terminate | FaultKind::SslKilled | FaultKind::RestartFast => {
                rng.random_range(300..800)
            }
            FaultKind::HungBackend | FaultKind::Silence => rng.random_range(1500..2500),
            FaultKind::IdleTimeout => rng.random_range(2000..3000),
            FaultKind::RefuseConnects => rng.random_range(1000..2500),
            FaultKind::MaxConnections => rng.random_range(2000..3000),
            FaultKind::CommitCut => rng.random_range(800..1500),
        };
        Duration::from_millis(ms)
    }
}

/// One fault as injected.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    /// Its kind.
    pub kind: FaultKind,
    /// When it started, ms since the soak started.
    pub at_ms: u64,
    /// How long it lasted, ms.
    pub took_ms: u64,
    /// What it did (backends hit, connections taken, cuts made), or why it did nothing.
    pub detail: String,
}

/// What the faults act on.
pub struct Targets<'a> {
    /// The server.
    pub pg: &'a PgServer,
    /// One proxy per system on the proxy route.
    pub proxies: &'a [FaultProxy],
    /// `application_name`s of every soak pool (ours and the controls).
    pub apps: Vec<String>,
    /// Those on the TLS route.
    pub tls_apps: Vec<String>,
}

/// The seeded sequence of faults: each round shuffles every kind, then draws each fault's
/// window, the calm after it and the seed of its own choices. Endless; the schedule stops
/// taking from it at the deadline.
pub struct Schedule {
    rng: StdRng,
    bag: Vec<FaultKind>,
}

/// One planned fault.
#[derive(Debug, Clone, Copy)]
pub struct Planned {
    /// Its kind.
    pub kind: FaultKind,
    /// How long it lasts.
    pub window: Duration,
    /// The calm after it.
    pub calm: Duration,
    /// The seed of its own random choices.
    pub sub_seed: u64,
}

impl Schedule {
    /// The sequence for `seed`.
    pub fn new(seed: u64) -> Schedule {
        Schedule {
            rng: StdRng::seed_from_u64(seed),
            bag: Vec::new(),
        }
    }
}

impl Iterator for Schedule {
    type Item = Planned;

    fn next(&mut self) -> Option<Planned> {
        if self.bag.is_empty() {
            let mut round = FaultKind::ALL;
            round.shuffle(&mut self.rng);
            self.bag = round.into_iter().rev().collect();
        }
        let kind = self.bag.pop()?;
        let window = kind.window(&mut self.rng);
        let calm = Duration::from_millis(self.rng.random_range(500..1500));
        let sub_seed = self.rng.random();
        Some(Planned {
            kind,
            window,
            calm,
            sub_seed,
        })
    }
}

/// Injects faults in the seeded order ([`Schedule`]) until `deadline` (no fault starts that
/// would end after it), or, while fewer than `min_faults` have run, until `hard_deadline`;
/// returns what was injected.
pub fn run_schedule(
    t: &Targets<'_>,
    shared: &Arc<Shared>,
    seed: u64,
    warmup: Duration,
    deadline: Instant,
    min_faults: usize,
    hard_deadline: Instant,
) -> Vec<FaultRecord> {
    let mut records = Vec::new();
    std::thread::sleep(warmup);
    for planned in Schedule::new(seed) {
        // Until `min_faults` have run the schedule may go on past `deadline`, never past
        // `hard_deadline`: on a loaded machine a fault takes longer than its window (a cut
        // COMMIT waits for a commit to cut), and a short soak must still see its first faults.
        let end = if records.len() < min_faults {
            hard_deadline
        } else {
            deadline
        };
        if Instant::now() + planned.window > end {
            break;
        }
        let kind = planned.kind;
        let at_ms = shared.elapsed_ms();
        let started = Instant::now();
        shared.set_fault(kind.name(), true);
        let mut rng = StdRng::seed_from_u64(planned.sub_seed);
        let detail = inject(t, shared, kind, planned.window, &mut rng);
        shared.set_fault(kind.name(), false);
        records.push(FaultRecord {
            kind,
            at_ms,
            took_ms: started.elapsed().as_millis() as u64,
            detail,
        });
        // The calm ends at the deadline; past it (the schedule ran over to reach
        // `min_faults`) the writers still get the whole calm to recover in.
        let now = Instant::now();
        let calm_end = if now < deadline {
            (now + planned.calm).min(deadline)
        } else {
            now + planned.calm
        };
        std::thread::sleep(calm_end.saturating_duration_since(Instant::now()));
        if Instant::now() >= deadline && records.len() >= min_faults {
            break;
        }
    }
    records
}

/// Sleeps until `window` has passed since `started`.
fn rest_of(started: Instant, window: Duration) {
    std::thread::sleep((started + window).saturating_duration_since(Instant::now()));
}

fn inject(
    t: &Targets<'_>,
    shared: &Shared,
    kind: FaultKind,
    window: Duration,
    rng: &mut StdRng,
) -> String {
    let started = Instant::now();
    let detail = match kind {
        FaultKind::Terminate => {
            let mut pids = Vec::new();
            for app in &t.apps {
                pids.extend(t.pg.backend_pids(app).unwrap_or_default());
            }
            pids.sort_unstable();
            let total = pids.len();
            let chosen: Vec<i32> = pids.into_iter().filter(|_| rng.random_bool(0.5)).collect();
            let r = terminate(t.pg, &chosen);
            rest_of(started, window);
            format!("{} of {total} backends: {r}", chosen.len())
        }
        FaultKind::SslKilled => {
            let mut pids = Vec::new();
            for app in &t.tls_apps {
                pids.extend(t.pg.backend_pids(app).unwrap_or_default());
            }
            let r = terminate(t.pg, &pids);
            rest_of(started, window);
            format!("{} TLS backends: {r}", pids.len())
        }
        FaultKind::RestartFast => {
            let r = t.pg.restart_fast();
            let took = started.elapsed();
            rest_of(started, window);
            match r {
                Ok(()) => format!("back after {} ms", took.as_millis()),
                Err(e) => format!("restart failed: {e}"),
            }
        }
        FaultKind::HungBackend => {
            // Every application's backends found by one query and stopped together: a
            // backend stopped while it holds a server lock could hold up a query for the
            // next application until the pause expired (30 s).
            let apps: Vec<&str> = t.apps.iter().map(String::as_str).collect();
            let pause = t.pg.pause_backends_of(&apps).ok();
            let pids: Vec<Zombie> = pause
                .iter()
                .flat_map(|p| p.pids().iter().map(|pid| Zombie::Pid(*pid)))
                .collect();
            shared.add_zombies(pids.iter().copied());
            let n = pids.len();
            rest_of(started, window);
            if let Some(p) = pause {
                p.resume();
            }
            shared.end_zombies(&pids, crate::ZOMBIE_GRACE);
            format!("{n} backends stopped")
        }
        FaultKind::IdleTimeout => {
            let set =
                t.pg.execute_in(
                    "postgres",
                    "ALTER SYSTEM SET idle_session_timeout = '300ms'",
                )
                .and_then(|()| t.pg.execute_in("postgres", "SELECT pg_reload_conf()"));
            rest_of(started, window);
            let reset =
                t.pg.execute_in("postgres", "ALTER SYSTEM RESET idle_session_timeout")
                    .and_then(|()| t.pg.execute_in("postgres", "SELECT pg_reload_conf()"));
            match (set, reset) {
                (Ok(()), Ok(())) => "300ms server-wide".to_owned(),
                (s, r) => format!("set: {s:?}, reset: {r:?}"),
            }
        }
        FaultKind::Silence => {
            let n: usize = t.proxies.iter().map(|p| p.silence_existing()).sum();
            // The silenced flows' backends, by the port the server sees them from. A flow
            // silenced while it was still connecting upstream gets its port a moment later,
            // so the set is read again until the window ends.
            let mut ports: Vec<u16> = Vec::new();
            while Instant::now() < started + window {
                let now: Vec<u16> = t
                    .proxies
                    .iter()
                    .flat_map(|p| p.silenced_upstream_ports())
                    .filter(|port| !ports.contains(port))
                    .collect();
                shared.add_zombies(now.iter().map(|port| Zombie::Port(*port)));
                ports.extend(now);
                std::thread::sleep(
                    Duration::from_millis(20)
                        .min((started + window).saturating_duration_since(Instant::now())),
                );
            }
            // Once the flows are reset their ports are free for new connections: from then
            // on the zombies are known by pid, for the grace their exit may take.
            let pids: Vec<Zombie> = pids_behind(t.pg, &ports)
                .into_iter()
                .map(Zombie::Pid)
                .collect();
            shared.add_zombies(pids.iter().copied());
            let cut: usize = t.proxies.iter().map(|p| p.sever_silenced()).sum();
            let ports: Vec<Zombie> = ports.into_iter().map(Zombie::Port).collect();
            shared.end_zombies(&ports, Duration::ZERO);
            shared.end_zombies(&pids, crate::ZOMBIE_GRACE);
            format!(
                "{n} flows silenced ({} connected upstream), {cut} reset at the end",
                ports.len()
            )
        }
        FaultKind::RefuseConnects => {
            for p in t.proxies {
                p.refuse_connections(true);
            }
            rest_of(started, window);
            for p in t.proxies {
                p.refuse_connections(false);
            }
            "proxies refused connects".to_owned()
        }
        FaultKind::MaxConnections => {
            let url = format!(
                "{}?sslmode=disable&application_name=outside-exhaust",
                t.pg.superuser_url()
            );
            // Four openers until the server refuses; the hold starts once it is full.
            let openers: Vec<_> = (0..4)
                .map(|_| {
                    let url = url.clone();
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        loop {
                            if held.len() >= 250 {
                                break (held, "stopped at 250".to_owned());
                            }
                            match PgConnection::establish(&url) {
                                Ok(c) => held.push(c),
                                Err(e) => break (held, e.to_string()),
                            }
                        }
                    })
                })
                .collect();
            let mut held = Vec::new();
            let mut refused = String::new();
            for o in openers {
                if let Ok((conns, why)) = o.join() {
                    held.extend(conns);
                    refused = why;
                }
            }
            let n = held.len();
            let filled = started.elapsed();
            rest_of(Instant::now(), window);
            drop(held);
            format!(
                "{n} slots taken in {} ms, held {} ms, then: {}",
                filled.as_millis(),
                window.as_millis(),
                refused.trim()
            )
        }
        FaultKind::CommitCut => {
            let mut cuts = 0;
            for p in t.proxies {
                p.sever_after_forwarding(b"COMMIT", Duration::from_millis(50));
            }
            while started.elapsed() < window {
                for p in t.proxies {
                    if !p.trigger_armed() {
                        cuts += 1;
                        p.sever_after_forwarding(b"COMMIT", Duration::from_millis(50));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // No trigger is left armed into the next fault's window.
            let drain = Instant::now() + Duration::from_secs(5);
            let mut left = t.proxies.iter().filter(|p| p.trigger_armed()).count();
            while left > 0 && Instant::now() < drain {
                std::thread::sleep(Duration::from_millis(20));
                left = t.proxies.iter().filter(|p| p.trigger_armed()).count();
            }
            cuts += t.proxies.len() - left;
            format!("{cuts} commits cut, {left} trigger(s) never fired")
        }
    };
    detail
}

/// The pids of the backends whose `client_port` is one of `ports` (empty if the server
/// cannot be asked).
fn pids_behind(pg: &PgServer, ports: &[u16]) -> Vec<i32> {
    if ports.is_empty() {
        return Vec::new();
    }
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let sql = format!(
        "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(ARRAY[{}]::int[])",
        ports.join(",")
    );
    let Ok(mut conn) = PgConnection::establish(&sampler_url(pg)) else {
        return Vec::new();
    };
    diesel::sql_query(sql)
        .load::<Pid>(&mut conn)
        .map(|rows| rows.into_iter().map(|r| r.pid).collect())
        .unwrap_or_default()
}

/// The soak's own superuser connection to look at the server (not counted in any budget).
fn sampler_url(pg: &PgServer) -> String {
    format!(
        "{}?sslmode=disable&application_name=outside-sampler",
        pg.superuser_url()
    )
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

fn terminate(pg: &PgServer, pids: &[i32]) -> String {
    if pids.is_empty() {
        return "none to terminate".to_owned();
    }
    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    match pg.execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM unnest(ARRAY[{}]::int[]) AS pid",
        list.join(",")
    )) {
        Ok(()) => "terminated".to_owned(),
        Err(e) => format!("failed: {e}"),
    }
}

/// Per-kind counts of the faults injected.
pub fn counts(records: &[FaultRecord]) -> BTreeMap<&'static str, u64> {
    let mut out: BTreeMap<&'static str, u64> =
        FaultKind::ALL.iter().map(|k| (k.name(), 0)).collect();
    for r in records {
        *out.entry(r.kind.name()).or_default() += 1;
    }
    out
}

#[derive(QueryableByName)]
struct Backend {
    #[diesel(sql_type = Integer)]
    pid: i32,
    #[diesel(sql_type = Text)]
    app: String,
    #[diesel(sql_type = Nullable<Text>)]
    state: Option<String>,
    #[diesel(sql_type = Integer)]
    age_ms: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    port: Option<i32>,
}

const BACKENDS_SQL: &str = "SELECT pid, application_name AS app, state, \
     (extract(epoch FROM now() - backend_start) * 1000)::int AS age_ms, client_port AS port \
     FROM pg_stat_activity WHERE application_name LIKE 'soak-ours-%'";

/// A pool set the watcher checks: its budget and a view of its own permits.
pub struct Budgeted {
    /// The budget's total.
    pub total: u32,
    /// The pool set's budget snapshot: permits out, and rendered (what the pool holds).
    pub snapshot: Box<dyn Fn() -> (u32, String) + Send + Sync>,
}

/// One sample above the budget.
#[derive(Debug, Clone)]
pub struct Overshoot {
    /// ms since the soak started.
    pub at_ms: u64,
    /// The pool set's `application_name`.
    pub app: String,
    /// Backends the server showed for it (known zombies excluded).
    pub seen: usize,
    /// The fault label then.
    pub fault: String,
    /// The budget's total.
    pub total: u32,
    /// Permits the pool set had out at that moment (its own count of open connections).
    pub pool_in_use: u32,
    /// The pool set's own budget snapshot at that moment.
    pub pool_view: String,
    /// The backends counted (pid, state, age), and which of them were gone soon after.
    pub backends: String,
    /// How many of the backends counted were gone soon after (within [`EXIT_GRACE`]: a
    /// backend whose client closed exits within milliseconds, longer on a loaded machine).
    pub gone_soon: usize,
    /// How long after the sample the recount was made, ms.
    pub recount_after_ms: u64,
}

/// How long an overshoot's backends may take to exit before the overshoot counts against
/// the pools: the recount polls every 25 ms up to this. A pool above its budget holds its
/// connections open, so a real overshoot is still there at the end of it.
pub const EXIT_GRACE: Duration = Duration::from_millis(300);

impl Overshoot {
    /// Explained by backends still exiting: the pool's own permits were within the budget
    /// and, without the backends that were gone soon after, the server was within it too.
    pub fn lingering(&self) -> bool {
        self.pool_in_use <= self.total
            && self.seen.saturating_sub(self.gone_soon) <= self.total as usize
    }
}

/// Samples `pg_stat_activity` every `every` until the soak stops: for each of `budgets`
/// (`application_name` -> budget), a sample with more live backends than the budget is
/// an overshoot. Backends known to be zombies of a fault (stopped by SIGSTOP, or behind a
/// silenced flow the client already closed) are left out while the fault lasts and shortly
/// after. Returns (samples taken, overshoots).
pub fn watch_budget(
    pg: &PgServer,
    shared: &Shared,
    budgets: &BTreeMap<String, Budgeted>,
    every: Duration,
) -> (u64, Vec<Overshoot>) {
    let url = sampler_url(pg);
    let mut conn: Option<PgConnection> = None;
    let mut samples = 0;
    let mut over = Vec::new();
    while !shared.stopping() {
        if conn.is_none() {
            conn = PgConnection::establish(&url).ok();
        }
        if let Some(c) = conn.as_mut() {
            let rows: QueryResult<Vec<Backend>> = diesel::sql_query(BACKENDS_SQL).load(c);
            match rows {
                Ok(rows) => {
                    samples += 1;
                    let now = Instant::now();
                    let mut per_app: BTreeMap<&str, usize> = BTreeMap::new();
                    for row in &rows {
                        if !shared.is_zombie(row.pid, row.port, now) {
                            *per_app.entry(row.app.as_str()).or_default() += 1;
                        }
                    }
                    for (app, b) in budgets {
                        let seen = per_app.get(app.as_str()).copied().unwrap_or(0);
                        if seen > b.total as usize {
                            let (pool_in_use, pool_view) = (b.snapshot)();
                            let fault = shared.fault_label();
                            let at_ms = shared.elapsed_ms();
                            let counted: Vec<&Backend> = rows
                                .iter()
                                .filter(|r| &r.app == app && !shared.is_zombie(r.pid, r.port, now))
                                .collect();
                            // Recount until the excess is gone or the grace is over.
                            let mut later: Vec<i32> = Vec::new();
                            loop {
                                std::thread::sleep(Duration::from_millis(25));
                                later = diesel::sql_query(BACKENDS_SQL)
                                    .load::<Backend>(c)
                                    .map(|r| r.into_iter().map(|b| b.pid).collect())
                                    .unwrap_or(later);
                                let left =
                                    counted.iter().filter(|r| later.contains(&r.pid)).count();
                                if left <= b.total as usize || now.elapsed() >= EXIT_GRACE {
                                    break;
                                }
                            }
                            let recount_after_ms = now.elapsed().as_millis() as u64;
                            let gone_soon =
                                counted.iter().filter(|r| !later.contains(&r.pid)).count();
                            let backends: Vec<String> = counted
                                .iter()
                                .map(|r| {
                                    format!(
                                        "pid {} port {} {} age {} ms{}",
                                        r.pid,
                                        r.port.map_or("-".to_owned(), |p| p.to_string()),
                                        r.state.as_deref().unwrap_or("-"),
                                        r.age_ms,
                                        if later.contains(&r.pid) {
                                            ""
                                        } else {
                                            " (gone soon after)"
                                        }
                                    )
                                })
                                .collect();
                            over.push(Overshoot {
                                at_ms,
                                app: app.clone(),
                                seen,
                                fault,
                                total: b.total,
                                pool_in_use,
                                pool_view,
                                backends: backends.join("; "),
                                gone_soon,
                                recount_after_ms,
                            });
                        }
                    }
                }
                Err(_) => conn = None,
            }
        }
        std::thread::sleep(every);
    }
    (samples, over)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_depends_on_the_seed_alone_and_every_round_has_every_kind() {
        let a: Vec<FaultKind> = Schedule::new(7).take(27).map(|p| p.kind).collect();
        let b: Vec<FaultKind> = Schedule::new(7).take(27).map(|p| p.kind).collect();
        let c: Vec<FaultKind> = Schedule::new(8).take(27).map(|p| p.kind).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for round in a.chunks(FaultKind::ALL.len()) {
            let mut kinds = round.to_vec();
            kinds.sort();
            assert_eq!(kinds, FaultKind::ALL.to_vec());
        }
    }
}
