//! The ledger: what the callers were told, kept in memory, against what the database holds.
//!
//! Every write inserts one row with a key no other call uses into `ledger`, a table with no
//! unique constraint (an index only), so a transaction committed twice shows up as two rows
//! instead of being turned into an error. A key is **acknowledged** when the retry function
//! (or, for the controls, their naive loop) returned `Ok`. At the end: **lost** = acknowledged
//! keys not in the table, **duplicates** = keys in the table more than once.
//!
//! An ambiguous outcome (`RetryError::AmbiguousCommit`: the commit was cut off and could not
//! be resolved in time) is not acknowledged, so it can never be "lost"; it is listed as a
//! surfaced error, and its key still counts towards duplicates if it is found twice.

use std::collections::HashMap;
use std::time::Duration;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use parking_lot::Mutex;

/// Creates the ledger (run as the superuser in database `app`; role `app` writes to it) and
/// the idempotency table `commit_with_key` needs.
pub fn setup_sql() -> String {
    format!(
        "CREATE TABLE ledger (key text NOT NULL, writer text NOT NULL, n int NOT NULL); \
         CREATE INDEX ledger_key ON ledger (key); GRANT ALL ON ledger TO app; {}; \
         GRANT ALL ON resilient_diesel_idempotency_keys TO app;",
        pool_core::retry::IDEMPOTENCY_TABLE_SQL
    )
}

/// The ledger row's insert, shared by every writer.
pub const INSERT_SQL: &str = "INSERT INTO ledger (key, writer, n) VALUES ($1, $2, $3)";

/// An error a caller saw: the write was given up (or its outcome is unknown).
#[derive(Debug, Clone)]
pub struct SurfacedError {
    /// Milliseconds since the soak started.
    pub at_ms: u64,
    /// The fault active (or last ended) when the call returned.
    pub fault: String,
    /// Who saw it: system, route and worker.
    pub writer: String,
    /// The key the call was writing.
    pub key: String,
    /// What the caller got.
    pub error: String,
}

#[derive(Default)]
struct Inner {
    acked: Vec<String>,
    ambiguous: Vec<String>,
    errors: Vec<SurfacedError>,
    latencies_us: Vec<u64>,
    already_committed: u64,
    probes: u64,
    probe_misses: Vec<String>,
    leaked: u64,
}

/// What one system (our sync pool, our async pool, a control) did during the soak.
pub struct Tally {
    /// The system's name, also the first part of its keys.
    pub system: &'static str,
    inner: Mutex<Inner>,
}

impl Tally {
    /// An empty tally for `system`.
    pub fn new(system: &'static str) -> Tally {
        Tally {
            system,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The call writing `key` returned `Ok` after `took`.
    pub fn ack(&self, key: String, took: Duration) {
        let mut inner = self.inner.lock();
        inner.acked.push(key);
        inner
            .latencies_us
            .push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }

    /// `commit_with_key` found its key already committed (counted as acknowledged too).
    pub fn already_committed(&self) {
        self.inner.lock().already_committed += 1;
    }

    /// The call gave up; `ambiguous` when the outcome is unknown.
    pub fn surfaced(&self, error: SurfacedError, ambiguous: bool) {
        let mut inner = self.inner.lock();
        if ambiguous {
            inner.ambiguous.push(error.key.clone());
        }
        inner.errors.push(error);
    }

    /// An ad-hoc probe ran; `miss` says why it did not get in within its timeout.
    pub fn probe(&self, miss: Option<String>) {
        let mut inner = self.inner.lock();
        inner.probes += 1;
        if let Some(miss) = miss {
            inner.probe_misses.push(miss);
        }
    }

    /// Checkouts still out after the workers stopped.
    pub fn set_leaked(&self, n: u64) {
        self.inner.lock().leaked = n;
    }

    /// Compares the acknowledgements with the rows found (`counts`: key -> rows, this
    /// system's keys only).
    pub fn check(&self, counts: &HashMap<String, i64>) -> SystemResult {
        let inner = self.inner.lock();
        let lost: Vec<String> = inner
            .acked
            .iter()
            .filter(|k| !counts.contains_key(*k))
            .cloned()
            .collect();
        let mut duplicates: Vec<(String, i64)> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        duplicates.sort();
        let mut lat = inner.latencies_us.clone();
        lat.sort_unstable();
        SystemResult {
            system: self.system,
            acknowledged: inner.acked.len() as u64,
            already_committed: inner.already_committed,
            found: counts.len() as u64,
            lost,
            duplicates,
            ambiguous: inner.ambiguous.clone(),
            surfaced: inner.errors.clone(),
            probes: inner.probes,
            probe_misses: inner.probe_misses.clone(),
            leaked: inner.leaked,
            p50_ms: percentile_ms(&lat, 0.50),
            p99_ms: percentile_ms(&lat, 0.99),
            latencies_us: lat,
        }
    }
}

/// The `q` quantile of sorted microseconds, in ms (0 when empty).
pub fn percentile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let idx = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us[idx.min(sorted_us.len() - 1)] as f64 / 1000.0
}

/// One system's line of the final table.
#[derive(Debug, Clone)]
pub struct SystemResult {
    /// The system's name.
    pub system: &'static str,
    /// Keys whose call returned `Ok`.
    pub acknowledged: u64,
    /// Of those, `commit_with_key` calls that found their key already committed.
    pub already_committed: u64,
    /// Distinct keys of this system in the table.
    pub found: u64,
    /// Acknowledged keys not in the table.
    pub lost: Vec<String>,
    /// Keys in the table more than once, with their row counts.
    pub duplicates: Vec<(String, i64)>,
    /// Keys whose outcome the caller was told is unknown.
    pub ambiguous: Vec<String>,
    /// Every error a caller saw.
    pub surfaced: Vec<SurfacedError>,
    /// Ad-hoc probes run.
    pub probes: u64,
    /// Probes that did not get in within their timeout, with why.
    pub probe_misses: Vec<String>,
    /// Checkouts still out after the workers stopped.
    pub leaked: u64,
    /// Median latency of an acknowledged write, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of an acknowledged write, ms.
    pub p99_ms: f64,
    /// Every acknowledged write's latency, µs, sorted.
    pub latencies_us: Vec<u64>,
}

#[derive(QueryableByName)]
struct KeyCount {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows per key in the ledger at `url`, grouped by the system prefix of the key (the part
/// before the first `/`).
pub fn load_counts(url: &str) -> Result<HashMap<String, HashMap<String, i64>>, String> {
    let mut conn =
        PgConnection::establish(url).map_err(|e| format!("connecting to read the ledger: {e}"))?;
    let rows: Vec<KeyCount> =
        diesel::sql_query("SELECT key, count(*)::bigint AS n FROM ledger GROUP BY key")
            .load(&mut conn)
            .map_err(|e| format!("reading the ledger: {e}"))?;
    let mut by_system: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for row in rows {
        let system = row.key.split('/').next().unwrap_or_default().to_owned();
        by_system.entry(system).or_default().insert(row.key, row.n);
    }
    Ok(by_system)
}
