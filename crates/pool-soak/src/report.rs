//! The soak's result: the table (ours beside the controls) and the JSON document.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::blackhole::BlackholeOutcome;
use crate::faults::{counts, FaultRecord, Overshoot};
use crate::ledger::{percentile_ms, SystemResult};

/// Systems whose zeros are promised (ours, main and blackhole phase).
pub const OURS: [&str; 4] = ["ours-sync", "ours-async", "bh-ours-sync", "bh-ours-async"];

/// Everything the soak measured.
#[derive(Debug)]
pub struct Report {
    /// The fault order's seed.
    pub seed: u64,
    /// How long the writers were asked to write (`--seconds`).
    pub seconds: u64,
    /// How long the writers actually ran, ms (past `seconds` when the first faults ran
    /// over it).
    pub ran_ms: u64,
    /// One line per system.
    pub results: Vec<SystemResult>,
    /// The faults injected, in order.
    pub faults: Vec<FaultRecord>,
    /// `pg_stat_activity` samples taken by the budget watcher.
    pub budget_samples: u64,
    /// Samples above the budget.
    pub overshoots: Vec<Overshoot>,
    /// The blackhole phase, or why it did not run.
    pub blackhole: Result<BlackholeOutcome, String>,
    /// The library's own log lines during the run, by their `event` key (see
    /// [`crate::events`]); `None` when another logger was installed first.
    pub pool_events: Option<BTreeMap<String, u64>>,
}

/// The promised figures for ours, summed over our systems.
#[derive(Debug, Clone, PartialEq)]
pub struct Zeros {
    /// Acknowledged keys not found.
    pub lost: u64,
    /// Keys found more than once.
    pub duplicates: u64,
    /// Errors surfaced to a caller.
    pub surfaced_errors: u64,
    /// Ad-hoc probes that did not get in within their timeout.
    pub adhoc_misses: u64,
    /// Checkouts still out after the writers stopped.
    pub leaked: u64,
    /// `pg_stat_activity` samples above the budget.
    pub budget_overshoots: u64,
    /// Of those, samples explained by backends still exiting (see [`Overshoot::lingering`]).
    pub budget_overshoots_lingering: u64,
    /// Samples where the pools' own permits were above the budget.
    pub budget_overshoots_pool_view: u64,
    /// The blackhole was detected within its bound (`None`: the phase did not run).
    pub blackhole_within_bound: Option<bool>,
}

impl Report {
    fn ours(&self) -> impl Iterator<Item = &SystemResult> {
        self.results.iter().filter(|r| OURS.contains(&r.system))
    }

    /// What must be zero for ours.
    pub fn zeros(&self) -> Zeros {
        let sum = |f: &dyn Fn(&SystemResult) -> u64| self.ours().map(f).sum::<u64>();
        Zeros {
            lost: sum(&|r| r.lost.len() as u64),
            duplicates: sum(&|r| r.duplicates.len() as u64),
            surfaced_errors: sum(&|r| r.surfaced.len() as u64),
            adhoc_misses: sum(&|r| r.probe_misses.len() as u64),
            leaked: sum(&|r| r.leaked),
            budget_overshoots: self.overshoots.len() as u64,
            budget_overshoots_lingering: self.overshoots.iter().filter(|o| o.lingering()).count()
                as u64,
            budget_overshoots_pool_view: self
                .overshoots
                .iter()
                .filter(|o| o.pool_in_use > o.total)
                .count() as u64,
            blackhole_within_bound: self
                .blackhole
                .as_ref()
                .ok()
                .map(|b| b.detect_ms().is_some_and(|d| d <= b.bound_ms)),
        }
    }

    /// Acknowledged writes of ours.
    pub fn ours_acknowledged(&self) -> u64 {
        self.ours().map(|r| r.acknowledged).sum()
    }

    fn ours_latency(&self) -> (f64, f64) {
        let mut all: Vec<u64> = self
            .ours()
            .flat_map(|r| r.latencies_us.iter().copied())
            .collect();
        all.sort_unstable();
        (percentile_ms(&all, 0.50), percentile_ms(&all, 0.99))
    }

    /// The JSON document: the spec's keys for ours at the top level, then every system, the
    /// faults and the details of anything non-zero.
    pub fn to_json(&self) -> Value {
        let z = self.zeros();
        let (p50, p99) = self.ours_latency();
        let faults: Map<String, Value> = counts(&self.faults)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), json!(v)))
            .chain(std::iter::once((
                "blackhole".to_owned(),
                json!(u64::from(self.blackhole.is_ok())),
            )))
            .collect();
        let systems: Map<String, Value> = self
            .results
            .iter()
            .map(|r| (r.system.to_owned(), system_json(r)))
            .collect();
        let (bh_detect, bh_bound, bh) = match &self.blackhole {
            Ok(b) => (
                json!(b.detect_ms()),
                json!(b.bound_ms),
                json!({
                    "at_ms": b.at_ms,
                    "window_ms": b.window_ms,
                    "sync_detect_ms": b.sync_detect_ms,
                    "async_detect_ms": b.async_detect_ms,
                    "held": b.held,
                }),
            ),
            Err(why) => (Value::Null, Value::Null, json!({ "skipped": why })),
        };
        json!({
            "seed": self.seed,
            "seconds": self.seconds,
            "ran_ms": self.ran_ms,
            "acknowledged": self.ours_acknowledged(),
            "found": self.ours().map(|r| r.found).sum::<u64>(),
            "lost": z.lost,
            "duplicates": z.duplicates,
            "surfaced_errors": z.surfaced_errors,
            "adhoc_misses": z.adhoc_misses,
            "leaked": z.leaked,
            "budget_overshoots": z.budget_overshoots,
            "budget_overshoots_lingering": z.budget_overshoots_lingering,
            "budget_overshoots_pool_view": z.budget_overshoots_pool_view,
            "budget_samples": self.budget_samples,
            "blackhole_detect_ms": bh_detect,
            "blackhole_bound_ms": bh_bound,
            "blackhole": bh,
            "faults_injected": faults,
            "pool_events": self.pool_events,
            "p50_ms": p50,
            "p99_ms": p99,
            "systems": systems,
            "overshoot_list": self.overshoots.iter().map(|o| json!({
                "at_ms": o.at_ms, "app": o.app, "seen": o.seen, "fault": o.fault,
                "pool_in_use": o.pool_in_use, "pool_view": o.pool_view,
                "backends": o.backends, "gone_soon": o.gone_soon, "recount_after_ms": o.recount_after_ms, "lingering": o.lingering(),
            })).collect::<Vec<_>>(),
            "fault_log": self.faults.iter().map(|f| json!({
                "kind": f.kind.name(), "at_ms": f.at_ms, "took_ms": f.took_ms, "detail": f.detail,
            })).collect::<Vec<_>>(),
        })
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let z = self.zeros();
        out.push_str(&format!(
            "pool-soak: {} s (writers ran {:.1} s), seed {} (rerun: cargo run --release -p pool-soak -- --seconds {} --seed {})\n",
            self.seconds,
            self.ran_ms as f64 / 1000.0,
            self.seed,
            self.seconds,
            self.seed
        ));
        let per_kind: Vec<String> = counts(&self.faults)
            .into_iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out.push_str(&format!(
            "faults injected ({}): {}; blackhole {}\n\n",
            self.faults.len(),
            per_kind.join(", "),
            u8::from(self.blackhole.is_ok())
        ));
        out.push_str(
            "| system | acknowledged | found | lost | duplicates | surfaced errors | ambiguous | ad-hoc misses / probes | leaked | p50 ms | p99 ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.results {
            let name = match r.system {
                "r2d2" => "r2d2 defaults, naive retry (control)",
                "bb8" => "bb8 defaults, naive retry (control)",
                other => other,
            };
            let probes = if OURS.contains(&r.system) && !r.system.starts_with("bh-") {
                format!("{} / {}", r.probe_misses.len(), r.probes)
            } else {
                "—".to_owned()
            };
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {probes} | {} | {:.1} | {:.1} |\n",
                r.acknowledged,
                r.found,
                r.lost.len(),
                r.duplicates.len(),
                r.surfaced.len(),
                r.ambiguous.len(),
                r.leaked,
                r.p50_ms,
                r.p99_ms
            ));
        }
        let (p50, p99) = self.ours_latency();
        out.push_str(&format!(
            "\nours (promised zeros): lost {}, duplicates {}, surfaced errors {}, ad-hoc misses {}, \
             leaked {}, budget overshoots {} in {} samples of pg_stat_activity ({} of them backends still \
             exiting, {} with the pools' own permits above the budget); p50 {p50:.1} ms, p99 {p99:.1} ms\n",
            z.lost, z.duplicates, z.surfaced_errors, z.adhoc_misses, z.leaked,
            z.budget_overshoots, self.budget_samples, z.budget_overshoots_lingering,
            z.budget_overshoots_pool_view
        ));
        match &self.blackhole {
            Ok(b) => out.push_str(&format!(
                "blackhole (own server in a network namespace): loopback down at {} ms for {} ms; \
                 held query failed after sync {:?} ms, async {:?} ms (bound {} ms: tcp_user_timeout + 1 s)\n",
                b.at_ms, b.window_ms, b.sync_detect_ms, b.async_detect_ms, b.bound_ms
            )),
            Err(why) => out.push_str(&format!("blackhole: not run: {why}\n")),
        }
        match &self.pool_events {
            Some(events) if events.is_empty() => out.push_str("library log events: none\n"),
            Some(events) => out.push_str(&format!(
                "library log events: {}\n",
                events
                    .iter()
                    .map(|(event, n)| format!("{event} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => {
                out.push_str("library log events: not counted (another logger was installed)\n")
            }
        }
        for r in &self.results {
            let control = !OURS.contains(&r.system);
            let limit = if control { 5 } else { 50 };
            for e in r.surfaced.iter().take(limit) {
                out.push_str(&format!(
                    "  surfaced [{}] at {} ms ({}) {}: {}\n",
                    r.system, e.at_ms, e.fault, e.key, e.error
                ));
            }
            if r.surfaced.len() > limit {
                out.push_str(&format!(
                    "  surfaced [{}]: {} more\n",
                    r.system,
                    r.surfaced.len() - limit
                ));
            }
            for k in r.lost.iter().take(limit) {
                out.push_str(&format!("  lost [{}] {k}\n", r.system));
            }
            for (k, n) in r.duplicates.iter().take(limit) {
                out.push_str(&format!("  duplicate [{}] {k} x{n}\n", r.system));
            }
            for m in &r.probe_misses {
                out.push_str(&format!("  ad-hoc miss [{}] {m}\n", r.system));
            }
            if r.leaked > 0 {
                out.push_str(&format!("  leaked [{}] {}\n", r.system, r.leaked));
            }
        }
        for o in &self.overshoots {
            out.push_str(&format!(
                "  overshoot at {} ms ({}): {} backends of {}{}; the pool's view: {}; backends: {}\n",
                o.at_ms, o.fault, o.seen, o.app,
                if o.lingering() { " (backends still exiting)" } else { "" },
                o.pool_view, o.backends
            ));
        }
        out.push_str("\nfault log:\n");
        for f in &self.faults {
            out.push_str(&format!(
                "  {:>6} ms {:<20} {:>5} ms  {}\n",
                f.at_ms,
                f.kind.name(),
                f.took_ms,
                f.detail
            ));
        }
        out
    }
}

fn system_json(r: &SystemResult) -> Value {
    json!({
        "acknowledged": r.acknowledged,
        "already_committed": r.already_committed,
        "found": r.found,
        "lost": r.lost.len(),
        "duplicates": r.duplicates.len(),
        "surfaced_errors": r.surfaced.len(),
        "ambiguous": r.ambiguous.len(),
        "adhoc_probes": r.probes,
        "adhoc_misses": r.probe_misses.len(),
        "leaked": r.leaked,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "lost_keys": r.lost.iter().take(50).collect::<Vec<_>>(),
        "duplicate_keys": r.duplicates.iter().take(50).map(|(k, n)| json!([k, n])).collect::<Vec<_>>(),
        "surfaced_error_list": r.surfaced.iter().take(200).map(|e| json!({
            "at_ms": e.at_ms, "fault": e.fault, "writer": e.writer, "key": e.key, "error": e.error,
        })).collect::<Vec<_>>(),
        "adhoc_miss_list": r.probe_misses,
    })
}
