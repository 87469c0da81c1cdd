//! Counts the library's own log lines by their `event` key (`abandoned_transaction_ended`,
//! `retry_exhausted`, `orphaned`, ...), so that the report can say which of its rarer paths
//! the faults took: whether a COMMIT lost in the blackhole had its session ended, for one.
//!
//! The counter is the process's `log` logger. It is installed once, by the first [`install`]
//! (nothing is counted if another logger was installed first); a run reads the counts before
//! and after and reports the difference, so that several runs in one process each see their
//! own.

use std::collections::BTreeMap;

use log::kv::Key;
use parking_lot::Mutex;
use pool_core::events::LOG_TARGET;

static COUNTS: Mutex<BTreeMap<String, u64>> = parking_lot::const_mutex(BTreeMap::new());

/// The logger: counts the library's lines that carry an `event` key, writes nothing.
struct Counter;

impl log::Log for Counter {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == LOG_TARGET
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target() != LOG_TARGET {
            return;
        }
        if let Some(event) = record.key_values().get(Key::from_str("event")) {
            let event = event.to_string();
            // Closes also by their reason (`closed.invalidated`, `closed.broken`, ...).
            let reason = (event == "closed")
                .then(|| record.key_values().get(Key::from_str("reason")))
                .flatten()
                .map(|r| format!("closed.{r}"));
            let mut counts = COUNTS.lock();
            *counts.entry(event).or_insert(0) += 1;
            if let Some(reason) = reason {
                *counts.entry(reason).or_insert(0) += 1;
            }
        }
    }

    fn flush(&self) {}
}

static COUNTER: Counter = Counter;

/// Installs the counter as the process's logger (once; later calls do nothing). Returns
/// whether the counter is the logger, that is whether [`snapshot`] counts anything.
pub fn install() -> bool {
    static INSTALLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let ours = log::set_logger(&COUNTER).is_ok();
        if ours {
            // The library's rarer lines are at debug (a failed ending) up to warn.
            log::set_max_level(log::LevelFilter::Debug);
        }
        ours
    })
}

/// The counts so far, by event.
pub fn snapshot() -> BTreeMap<String, u64> {
    COUNTS.lock().clone()
}

/// What was counted between `before` and `after` (two [`snapshot`]s), events counted 0
/// left out.
pub fn since(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(event, n)| {
            let d = n - before.get(event).copied().unwrap_or(0);
            (d > 0).then(|| (event.clone(), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_librarys_lines_are_counted_by_event_and_others_are_not() {
        assert!(install(), "no other logger in this test binary");
        let before = snapshot();
        log::warn!(target: LOG_TARGET, pool = "p", event = "abandoned_transaction_ended"; "x");
        log::debug!(target: LOG_TARGET, event = "abandoned_transaction_ended"; "y");
        log::debug!(target: LOG_TARGET, event = "abandoned_transaction_end_failed"; "z");
        log::debug!(target: LOG_TARGET, event = "closed", reason = "invalidated"; "c");
        log::warn!(target: LOG_TARGET, "no event key");
        log::warn!(target: "someone_else", event = "abandoned_transaction_ended"; "not ours");
        let counted = since(&before, &snapshot());
        assert_eq!(
            counted,
            BTreeMap::from([
                ("abandoned_transaction_end_failed".to_owned(), 1),
                ("abandoned_transaction_ended".to_owned(), 2),
                ("closed".to_owned(), 1),
                ("closed.invalidated".to_owned(), 1),
            ])
        );
    }
}
