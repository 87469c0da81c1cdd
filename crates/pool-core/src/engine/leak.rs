//! Leak detection: a connection held longer than the threshold is reported once, with the
//! place it was checked out (HikariCP's `leakDetectionThreshold`).
//!
//! The checkout's backtrace is captured unresolved (walking the stack, no symbol lookup) and
//! symbolized only if a leak is reported. The deadline is the [watchdog](super::Watchdog)'s;
//! the report (symbolizing, the pool's listener) is made on its reporter thread, never on the
//! thread that enforces deadlines, while the connection is still held: [`LeakTimer::stop`]
//! (at checkin) and the report exclude each other, so a report never comes after the
//! connection was returned. A report dropped because the reporter's queue was full is
//! counted by [`Watchdog::reports_dropped`].

use std::backtrace::Backtrace;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Armed, PoolState, Watchdog};
use crate::events::PoolEvent;

/// The leak timer of one checkout.
#[derive(Debug)]
pub struct LeakTimer {
    armed: Armed,
    /// `true` while the connection is out; the report checks it under this lock.
    out: Arc<Mutex<bool>>,
}

impl LeakTimer {
    /// Starts the timer of connection `id`, checked out now from `pool`.
    pub fn start(pool: &Arc<PoolState>, id: u64, threshold: Duration) -> LeakTimer {
        let checked_out_at = Backtrace::force_capture();
        let out = Arc::new(Mutex::new(true));
        let report_out = out.clone();
        let pool = pool.clone();
        let armed = Watchdog::global().arm(Instant::now() + threshold, move || {
            let out = report_out.lock();
            if !*out {
                return;
            }
            pool.stats().record_leak();
            let backtrace = checked_out_at.to_string();
            pool.emit(&PoolEvent::LeakSuspected {
                pool: pool.name(),
                connection_id: id,
                held: threshold,
                checked_out_at: &backtrace,
            });
        });
        LeakTimer { armed, out }
    }

    /// Stops the timer: once this returns, no report for this checkout is made (a report
    /// already under way finishes first).
    pub fn stop(self) {
        *self.out.lock() = false;
        drop(self.armed);
    }
}
