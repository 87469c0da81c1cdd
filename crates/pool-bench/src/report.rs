//! Results, the JSON document and the text tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use crate::pools::CONTENDERS;
use crate::stats::{median, min_max};

/// Every scenario, in the order of the JSON and the tables.
pub const SCENARIOS: [&str; 13] = [
    "poll_ns",
    "machinery_1t",
    "contended_8t",
    "hot_select1",
    "hot_select1_async",
    "txn",
    "recovery",
    "storm",
    "spike",
    "fairness",
    "floor",
    "silent",
    "hopeless",
];

/// The measurements of one contender (or one variant of it) in one scenario and pinning.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// `median_ns`, `p99_ns`, `max_ns`, `ops_per_s`, `errors`, `round_trips`,
    /// `connections_opened` and scenario-specific figures.
    pub metrics: BTreeMap<String, f64>,
    /// Why it was not measured.
    pub skipped: Option<String>,
    /// What the figures mean, when it is not obvious.
    pub note: Option<String>,
}

impl Entry {
    /// An entry that was not measured.
    pub fn skipped(why: impl Into<String>) -> Entry {
        Entry {
            skipped: Some(why.into()),
            ..Entry::default()
        }
    }

    /// Sets a metric (NaN and infinite values are left out).
    pub fn set(&mut self, key: &str, value: f64) -> &mut Entry {
        if value.is_finite() {
            self.metrics.insert(key.to_owned(), value);
        }
        self
    }

    /// A metric.
    pub fn get(&self, key: &str) -> Option<f64> {
        self.metrics.get(key).copied()
    }

    fn to_json(&self) -> Value {
        if let Some(why) = &self.skipped {
            return json!({ "skipped": why });
        }
        let mut map = Map::new();
        for (k, v) in &self.metrics {
            map.insert(k.clone(), number(*v));
        }
        if let Some(note) = &self.note {
            map.insert("note".into(), Value::String(note.clone()));
        }
        Value::Object(map)
    }
}

fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        json!(v as i64)
    } else {
        json!((v * 1000.0).round() / 1000.0)
    }
}

/// How a check compares with its bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// At most.
    AtMost(f64),
    /// At least.
    AtLeast(f64),
}

impl Bound {
    fn holds(self, v: f64) -> bool {
        match self {
            Bound::AtMost(b) => v <= b,
            Bound::AtLeast(b) => v >= b,
        }
    }

    fn text(self) -> String {
        match self {
            Bound::AtMost(b) => format!("<= {b}"),
            Bound::AtLeast(b) => format!(">= {b}"),
        }
    }
}

/// A ratio (or difference) computed per round, with its target if it has one.
#[derive(Debug, Clone)]
pub struct Check {
    /// E.g. `ext_sync / r2d2_notest (median_ns)`.
    pub name: String,
    /// One value per round.
    pub per_round: Vec<f64>,
    /// The target, if any.
    pub target: Option<Bound>,
}

impl Check {
    /// A check over per-round values.
    pub fn new(name: impl Into<String>, per_round: Vec<f64>, target: Option<Bound>) -> Check {
        Check {
            name: name.into(),
            per_round,
            target,
        }
    }

    /// The per-round ratio `num / den`.
    pub fn ratio(
        name: impl Into<String>,
        num: &[f64],
        den: &[f64],
        target: Option<Bound>,
    ) -> Check {
        let per_round = num.iter().zip(den).map(|(n, d)| n / d).collect();
        Check::new(name, per_round, target)
    }

    /// The median over rounds.
    pub fn median(&self) -> f64 {
        median(&self.per_round)
    }

    /// Whether the median meets the target.
    pub fn met(&self) -> Option<bool> {
        let m = self.median();
        self.target.map(|t| !m.is_nan() && t.holds(m))
    }

    fn to_json(&self, pinning: &str) -> Value {
        let (lo, hi) = min_max(&self.per_round);
        json!({
            "name": self.name,
            "pinning": pinning,
            "median": finite(self.median()),
            "min": finite(lo),
            "max": finite(hi),
            "rounds": self.per_round.len(),
            "target": self.target.map(Bound::text),
            "met": self.met(),
        })
    }
}

fn finite(v: f64) -> Value {
    if v.is_finite() {
        number(v)
    } else {
        Value::Null
    }
}

/// One scenario in one pinning.
#[derive(Debug, Clone, Default)]
pub struct ScenarioResult {
    /// Entries by contender (and variant, `contender/variant`), in display order.
    pub entries: Vec<(String, Entry)>,
    /// Ratios and targets.
    pub checks: Vec<Check>,
    /// What was measured and how, findings.
    pub notes: Vec<String>,
    /// Whether `median_ns` is a per-operation time (shown as a multiple of `floor`).
    pub per_op: bool,
}

impl ScenarioResult {
    /// The entry of `key`, if present.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, e)| e)
    }

    /// Adds (or replaces) an entry.
    pub fn put(&mut self, key: impl Into<String>, entry: Entry) {
        let key = key.into();
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = entry,
            None => self.entries.push((key, entry)),
        }
    }

    /// Marks every contender without an entry as skipped for `why`.
    pub fn fill_skipped(&mut self, why: &str) {
        for name in CONTENDERS {
            if self.entry(name).is_none() {
                self.put(name, Entry::skipped(why));
            }
        }
    }
}

/// All scenarios in one pinning of the client and the server.
#[derive(Debug, Clone)]
pub struct PinnedRun {
    /// `split`, `same_core` or `unpinned`.
    pub pinning: String,
    /// Which CPUs, or why not pinned.
    pub detail: String,
    /// Results by scenario; a scenario not run is absent.
    pub scenarios: BTreeMap<String, ScenarioResult>,
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// One per pinning, in the order they ran.
    pub runs: Vec<PinnedRun>,
    /// Machine, command, settings, memory.
    pub meta: Map<String, Value>,
    /// Why a scenario was not run (not selected).
    pub not_run: BTreeMap<String, String>,
}

impl Report {
    /// The JSON document: one object keyed by scenario (every scenario always present),
    /// each keyed by contender; the first pinning's figures at the contender level, the
    /// others' under the pinning's name; `checks` holds the ratios of every pinning.
    pub fn to_json(&self) -> Value {
        let mut root = Map::new();
        root.insert("meta".into(), Value::Object(self.meta.clone()));
        for scenario in SCENARIOS {
            let ran: Vec<(&PinnedRun, &ScenarioResult)> = self
                .runs
                .iter()
                .filter_map(|run| run.scenarios.get(scenario).map(|s| (run, s)))
                .collect();
            if ran.is_empty() {
                let why = self
                    .not_run
                    .get(scenario)
                    .cloned()
                    .unwrap_or_else(|| "not run".into());
                root.insert(scenario.into(), json!({ "skipped": why }));
                continue;
            }
            let mut obj = Map::new();
            let (first_run, first) = ran[0];
            for (key, entry) in &first.entries {
                let mut value = entry.to_json();
                if let Value::Object(map) = &mut value {
                    if entry.skipped.is_none() {
                        map.insert("pinning".into(), json!(first_run.pinning));
                    }
                    for (run, other) in &ran[1..] {
                        if let Some(e) = other.entry(key) {
                            if e.skipped.is_none() {
                                map.insert(run.pinning.clone(), e.to_json());
                            }
                        }
                    }
                }
                obj.insert(key.clone(), value);
            }
            let checks: Vec<Value> = ran
                .iter()
                .flat_map(|(run, s)| s.checks.iter().map(|c| c.to_json(&run.pinning)))
                .collect();
            obj.insert("checks".into(), Value::Array(checks));
            let mut notes: Vec<String> = Vec::new();
            for (_, s) in &ran {
                for n in &s.notes {
                    if !notes.contains(n) {
                        notes.push(n.clone());
                    }
                }
            }
            obj.insert("notes".into(), json!(notes));
            root.insert(scenario.into(), Value::Object(obj));
        }
        Value::Object(root)
    }

    /// The text report: per scenario and pinning, a table of medians, then the checks.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.meta {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{k}: {v}");
        }
        for scenario in SCENARIOS {
            let ran: Vec<(&PinnedRun, &ScenarioResult)> = self
                .runs
                .iter()
                .filter_map(|run| run.scenarios.get(scenario).map(|s| (run, s)))
                .collect();
            if ran.is_empty() {
                continue;
            }
            let _ = writeln!(out, "\n## {scenario}");
            for note in &ran[0].1.notes {
                let _ = writeln!(out, "{note}");
            }
            for (run, result) in &ran {
                let floor = run
                    .scenarios
                    .get("floor")
                    .and_then(|f| f.entry("raw"))
                    .and_then(|e| e.get("median_ns"));
                let _ = writeln!(out, "\n{} ({}):\n", run.pinning, run.detail);
                out.push_str(&table(result, floor));
                for check in &result.checks {
                    let (lo, hi) = min_max(&check.per_round);
                    let verdict = match (check.target, check.met()) {
                        (Some(t), Some(true)) => format!("target {}: met", t.text()),
                        (Some(t), _) => format!("target {}: MISSED", t.text()),
                        (None, _) => String::new(),
                    };
                    let _ = writeln!(
                        out,
                        "- {}: {} (rounds {}..{}, n={}) {}",
                        check.name,
                        fmt_num(check.median()),
                        fmt_num(lo),
                        fmt_num(hi),
                        check.per_round.len(),
                        verdict
                    );
                }
            }
        }
        out
    }
}

const COLUMNS: [(&str, &str); 8] = [
    ("median_ns", "median"),
    ("p99_ns", "p99"),
    ("max_ns", "max"),
    ("ops_per_s", "ops/s"),
    ("errors", "errors"),
    ("round_trips", "round trips"),
    ("connections_opened", "conns opened"),
    ("needed_connections", "conns needed"),
];

fn table(result: &ScenarioResult, floor: Option<f64>) -> String {
    let measured: Vec<&(String, Entry)> = result
        .entries
        .iter()
        .filter(|(_, e)| e.skipped.is_none())
        .collect();
    let cols: Vec<(&str, &str)> = COLUMNS
        .iter()
        .copied()
        .filter(|(k, _)| measured.iter().any(|(_, e)| e.get(k).is_some()))
        .collect();
    let with_floor = result.per_op && floor.is_some();
    let mut out = String::from("| contender |");
    for (_, title) in &cols {
        let _ = write!(out, " {title} |");
    }
    if with_floor {
        out.push_str(" x floor |");
    }
    out.push_str("\n|---|");
    for _ in 0..cols.len() + usize::from(with_floor) {
        out.push_str("---|");
    }
    out.push('\n');
    for (key, entry) in &measured {
        let _ = write!(out, "| {key} |");
        for (k, _) in &cols {
            let cell = match entry.get(k) {
                Some(v) if k.ends_with("_ns") => fmt_ns(v),
                Some(v) => fmt_num(v),
                None => String::new(),
            };
            let _ = write!(out, " {cell} |");
        }
        if let (true, Some(floor), Some(m)) = (with_floor, floor, entry.get("median_ns")) {
            let _ = write!(out, " {:.2} |", m / floor);
        } else if with_floor {
            out.push_str("  |");
        }
        out.push('\n');
    }
    for (key, entry) in &measured {
        let extra: Vec<String> = entry
            .metrics
            .iter()
            .filter(|(k, _)| !COLUMNS.iter().any(|(c, _)| c == k))
            .map(|(k, v)| {
                if k.ends_with("_ns") {
                    format!("{k} {}", fmt_ns(*v))
                } else {
                    format!("{k} {}", fmt_num(*v))
                }
            })
            .collect();
        if !extra.is_empty() {
            let _ = writeln!(out, "- {key}: {}", extra.join(", "));
        }
        if let Some(note) = &entry.note {
            let _ = writeln!(out, "- {key}: {note}");
        }
    }
    let skipped: Vec<String> = result
        .entries
        .iter()
        .filter(|(k, e)| e.skipped.is_some() && !k.contains('/'))
        .map(|(k, _)| k.clone())
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "(not measured here: {})", skipped.join(", "));
    }
    out
}

/// `1234` -> `1.23 µs`.
pub fn fmt_ns(ns: f64) -> String {
    if ns.is_nan() {
        "-".into()
    } else if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if (v.fract() == 0.0 && v.abs() < 1e12) || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}
