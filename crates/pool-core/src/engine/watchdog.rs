//! One background thread that enforces deadlines a blocking driver cannot: it cuts short a
//! validation ping that outlived its timeout (the sync adapter shuts the socket down) and
//! reports connections held past the leak-detection threshold.
//!
//! # Invariants
//! * An armed deadline fires at most once.
//! * A **critical** action ([`Watchdog::arm_critical`]) runs under the watchdog's lock, so
//!   once [`Armed::disarm`] returns, it has either run completely (`disarm` returns `true`)
//!   or will never run. The sync adapter relies on this: a ping that succeeded just as its
//!   socket was shut down is reported as fired, and that connection is not handed out.
//! * A **deferred** action ([`Watchdog::arm`]) runs outside the lock (it may take time, e.g.
//!   a listener formatting a backtrace); the caller guards against running after disarm
//!   itself (see [`LeakTimer`](super::LeakTimer)).
//! * A panicking action never stops the thread: it is caught, logged once, and the watchdog
//!   keeps enforcing every other deadline.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::events::LOG_TARGET;

type Action = Box<dyn FnOnce() + Send>;

enum Entry {
    Critical(Action),
    Deferred(Action),
}

#[derive(Default)]
struct State {
    next_id: u64,
    deadlines: BTreeMap<(Instant, u64), Entry>,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
    running: AtomicBool,
}

/// Handle to the process-wide watchdog thread.
#[derive(Clone)]
pub struct Watchdog(Arc<Inner>);

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog")
            .field("running", &self.is_running())
            .field("armed", &self.0.state.lock().deadlines.len())
            .finish()
    }
}

/// A deadline; dropping it (or [`Armed::disarm`]) disarms it if it has not fired yet.
#[must_use = "dropping the guard disarms the deadline at once"]
pub struct Armed {
    dog: Watchdog,
    key: (Instant, u64),
}

impl std::fmt::Debug for Armed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Armed")
            .field("deadline", &self.key.0)
            .finish()
    }
}

impl Armed {
    /// Disarms the deadline; returns whether it had already fired. For a critical action,
    /// `true` means the action ran to completion; `false` that it never will.
    pub fn disarm(self) -> bool {
        let fired = self
            .dog
            .0
            .state
            .lock()
            .deadlines
            .remove(&self.key)
            .is_none();
        std::mem::forget(self);
        fired
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.dog.0.state.lock().deadlines.remove(&self.key);
    }
}

impl Watchdog {
    /// The shared watchdog, started on first use.
    pub fn global() -> Watchdog {
        static DOG: OnceLock<Watchdog> = OnceLock::new();
        DOG.get_or_init(|| {
            let inner = Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                running: AtomicBool::new(false),
            });
            let thread_inner = inner.clone();
            let spawned = std::thread::Builder::new()
                .name("resilient-diesel-watchdog".into())
                .spawn(move || run(&thread_inner));
            match spawned {
                Ok(_) => inner.running.store(true, Ordering::Release),
                Err(e) => log::error!(
                    target: LOG_TARGET,
                    "could not start the watchdog thread: {e}; stalled validations will not be \
                     cut short and leaks will not be reported"
                ),
            }
            Watchdog(inner)
        })
        .clone()
    }

    /// Whether the watchdog thread is running (it could not be started only when the OS
    /// refused a thread).
    pub fn is_running(&self) -> bool {
        self.0.running.load(Ordering::Acquire)
    }

    /// Arms `action` to run at `deadline`, under the watchdog's lock, unless disarmed first.
    /// It must be quick and must not block (a `shutdown(2)` call).
    pub fn arm_critical(&self, deadline: Instant, action: impl FnOnce() + Send + 'static) -> Armed {
        self.arm_entry(deadline, Entry::Critical(Box::new(action)))
    }

    /// Arms `action` to run at `deadline`, outside the watchdog's lock, unless disarmed first.
    pub fn arm(&self, deadline: Instant, action: impl FnOnce() + Send + 'static) -> Armed {
        self.arm_entry(deadline, Entry::Deferred(Box::new(action)))
    }

    fn arm_entry(&self, deadline: Instant, entry: Entry) -> Armed {
        let mut st = self.0.state.lock();
        st.next_id += 1;
        let key = (deadline, st.next_id);
        let is_first = st.deadlines.keys().next().is_none_or(|first| key < *first);
        st.deadlines.insert(key, entry);
        drop(st);
        if is_first {
            self.0.wake.notify_one();
        }
        Armed {
            dog: self.clone(),
            key,
        }
    }
}

/// Runs `f`, catching a panic so that the watchdog thread survives it.
fn guarded(f: Action) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            log::error!(
                target: LOG_TARGET,
                "a watchdog action panicked (an event listener?); the watchdog keeps running"
            );
        }
    }
}

fn run(inner: &Inner) {
    let mut st = inner.state.lock();
    loop {
        let now = Instant::now();
        let mut deferred = Vec::new();
        while let Some(entry) = st.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                // Under the lock: a disarm racing with us waits, so when it returns the
                // action has run completely.
                Entry::Critical(f) => guarded(f),
                Entry::Deferred(f) => deferred.push(f),
            }
        }
        if !deferred.is_empty() {
            drop(st);
            deferred.into_iter().for_each(guarded);
            st = inner.state.lock();
            continue;
        }
        match st.deadlines.keys().next().map(|k| k.0) {
            Some(next) => {
                inner.wake.wait_until(&mut st, next);
            }
            None => inner.wake.wait(&mut st),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    fn counter() -> (Arc<AtomicU32>, impl Fn(u32) -> Box<dyn FnOnce() + Send>) {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        (hits, move |n| {
            let h = h.clone();
            Box::new(move || {
                h.fetch_add(n, Ordering::SeqCst);
            })
        })
    }

    fn wait_for(hits: &AtomicU32, value: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while hits.load(Ordering::SeqCst) != value && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fires_once_after_the_deadline_and_never_after_disarm() {
        let dog = Watchdog::global();
        let (hits, add) = counter();
        let _armed = dog.arm(Instant::now() + Duration::from_millis(20), add(1));
        let disarmed = dog.arm(Instant::now() + Duration::from_millis(40), add(100));
        assert!(!disarmed.disarm(), "not fired yet");
        wait_for(&hits, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn disarm_reports_a_critical_action_that_already_ran() {
        let dog = Watchdog::global();
        let (hits, add) = counter();
        let armed = dog.arm_critical(Instant::now(), add(1));
        wait_for(&hits, 1);
        assert!(armed.disarm(), "the action ran: disarm must say so");
    }

    #[test]
    fn a_panicking_action_does_not_stop_the_watchdog() {
        let dog = Watchdog::global();
        let _boom = dog.arm(Instant::now(), || panic!("listener bug"));
        let _boom2 = dog.arm_critical(Instant::now(), || panic!("listener bug"));
        let (hits, add) = counter();
        let _later = dog.arm(Instant::now() + Duration::from_millis(30), add(1));
        wait_for(&hits, 1);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "later deadlines still fire");
        assert!(dog.is_running());
    }
}
