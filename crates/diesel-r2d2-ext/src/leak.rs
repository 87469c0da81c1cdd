//! Leak detection: a connection held longer than the threshold is reported once, with the
//! place it was checked out (HikariCP's `leakDetectionThreshold`).
//!
//! The checkout's backtrace is captured only when a threshold is configured; the report is
//! made by the [watchdog](crate::watchdog) thread while the connection is still held, and the
//! timer is disarmed when the connection comes back.

use std::time::{Duration, Instant};

use pool_core::events::PoolEvent;

use crate::tracker::Tracker;
use crate::watchdog::{Action, Watchdog};

/// Starts the leak timer of a checkout.
pub(crate) fn arm(tracker: Option<&mut Tracker>, threshold: Duration) {
    let Some(tracker) = tracker else { return };
    let checked_out_at = std::backtrace::Backtrace::force_capture().to_string();
    let shared = tracker.shared.clone();
    let id = tracker.id;
    let timer = Watchdog::global().arm(
        Instant::now() + threshold,
        Action::Call(Box::new(move || {
            shared.stats.record_leak();
            shared.listener.on_event(&PoolEvent::LeakSuspected {
                pool: shared.name(),
                connection_id: id,
                held: threshold,
                checked_out_at: &checked_out_at,
            });
        })),
    );
    tracker.leak_timer = Some(timer);
}
