//! An in-memory `log` backend so tests can assert what was (never) logged.

use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;

struct Capture {
    lines: Mutex<Vec<String>>,
}

impl Log for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &Record<'_>) {
        let line = format!("{} {}: {}", record.level(), record.target(), record.args());
        self.lines.lock().push(line);
    }

    fn flush(&self) {}
}

static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();

/// Installs a logger that keeps every `log` record (all levels, all targets) in memory, as
/// `"LEVEL target: message"`. Idempotent: call it at the start of every test that wants the
/// logs. Panics if a different logger was installed first, since the capture would then
/// silently see nothing and "the password never appears" assertions would pass vacuously.
pub fn capture_logs() {
    let mut installed_here = false;
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
        }));
        installed_here = log::set_logger(capture).is_ok();
        capture
    });
    if installed_here {
        log::set_max_level(LevelFilter::Trace);
        return;
    }
    // Either installed by an earlier call, or someone else's logger won the race.
    if let Some(capture) = CAPTURE.get() {
        let ours = std::ptr::eq(
            log::logger() as *const dyn Log as *const (),
            *capture as *const Capture as *const (),
        );
        if !ours {
            panic!(
                "test_support::capture_logs: another `log` logger was installed first in this \
                 test binary, so log records cannot be captured"
            );
        }
        log::set_max_level(LevelFilter::Trace);
    }
}

/// Every line captured so far (since [`capture_logs`] was first called in this process), in
/// order, formatted as `"LEVEL target: message"`. Empty if capture was never installed.
pub fn captured_logs() -> Vec<String> {
    CAPTURE
        .get()
        .map(|c| c.lines.lock().clone())
        .unwrap_or_default()
}
