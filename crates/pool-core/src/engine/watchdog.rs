//! One background thread that enforces deadlines a blocking driver cannot (it cuts short a
//! validation ping that outlived its timeout: the sync adapter shuts the socket down), and
//! one reporter thread beside it for the deferred work a deadline triggers (a leak report:
//! formatting a backtrace, calling the pool's event listener).
//!
//! # Invariants
//! * An armed deadline fires at most once.
//! * **Deadlines never wait on user code.** The watchdog thread runs only critical actions
//!   (quick, non-blocking, the adapters' own code); a deferred action is handed to the
//!   reporter thread through a bounded queue and never runs on the watchdog thread. So one
//!   pool's slow listener or slow backtrace formatting delays at most other *reports*, never
//!   another pool's deadline.
//! * The queue holds at most [`REPORT_QUEUE`] actions: when it is full (a listener blocked for
//!   long while many reports fell due) the action is dropped, counted
//!   ([`Watchdog::reports_dropped`]) and logged once; the watchdog thread never blocks on it.
//! * A **critical** action ([`Watchdog::arm_critical`]) runs under the watchdog's lock, so
//!   once [`Armed::disarm`] returns, it has either run completely (`disarm` returns `true`)
//!   or will never run. The sync adapter relies on this: a ping that succeeded just as its
//!   socket was shut down is reported as fired, and that connection is not handed out.
//! * A **deferred** action ([`Watchdog::arm`]) runs on the reporter thread, possibly after
//!   its guard was disarmed (it was already queued): the caller guards against running after
//!   disarm itself (see [`LeakTimer`](super::LeakTimer)).
//! * A panicking action never stops either thread: it is caught, logged once, and the
//!   threads keep going.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::events::LOG_TARGET;

type Action = Box<dyn FnOnce() + Send>;

/// How many deferred actions may wait for the reporter thread; more are dropped and counted.
pub const REPORT_QUEUE: usize = 256;

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
    /// The reporter thread's queue; `None` if that thread could not be started.
    reports: Option<SyncSender<Action>>,
    reports_dropped: AtomicU64,
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
    /// The shared watchdog, started on first use (with its reporter thread).
    pub fn global() -> Watchdog {
        static DOG: OnceLock<Watchdog> = OnceLock::new();
        DOG.get_or_init(|| Watchdog::start(REPORT_QUEUE)).clone()
    }

    /// A new watchdog and reporter thread, the reporter's queue holding `queue` actions.
    fn start(queue: usize) -> Watchdog {
        {
            let (tx, rx) = sync_channel::<Action>(queue);
            let reporter = std::thread::Builder::new()
                .name("resilient-diesel-reporter".into())
                .spawn(move || rx.into_iter().for_each(guarded));
            let reports = match reporter {
                Ok(_) => Some(tx),
                Err(e) => {
                    log::error!(
                        target: LOG_TARGET,
                        "could not start the reporter thread: {e}; leaks will not be reported"
                    );
                    None
                }
            };
            let inner = Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                running: AtomicBool::new(false),
                reports,
                reports_dropped: AtomicU64::new(0),
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
        }
    }

    /// Deferred actions (leak reports) dropped because the reporter's queue was full, since
    /// the process started.
    pub fn reports_dropped(&self) -> u64 {
        self.0.reports_dropped.load(Ordering::Relaxed)
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

    /// Arms `action` to run on the reporter thread once `deadline` has passed, unless disarmed
    /// first. It may be slow (a listener, a backtrace): it never delays a deadline.
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

/// Runs `f`, catching a panic so that the thread running it survives.
fn guarded(f: Action) {
    if catch_unwind(AssertUnwindSafe(f)).is_err() {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            log::error!(
                target: LOG_TARGET,
                "a watchdog or reporter action panicked; both threads keep running"
            );
        }
    }
}

impl Inner {
    /// Hands `f` to the reporter thread without ever blocking: dropped (and counted) when the
    /// queue is full or the reporter is gone.
    fn report(&self, f: Action) {
        let sent = match &self.reports {
            Some(tx) => match tx.try_send(f) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => "its queue is full (a slow event listener?)",
                Err(TrySendError::Disconnected(_)) => "it has stopped",
            },
            None => "it could not be started",
        };
        if self.reports_dropped.fetch_add(1, Ordering::Relaxed) == 0 {
            log::warn!(
                target: LOG_TARGET,
                "a leak report was dropped: the reporter thread cannot take it ({sent}); \
                 further drops are only counted"
            );
        }
    }
}

fn run(inner: &Inner) {
    let mut st = inner.state.lock();
    loop {
        let now = Instant::now();
        while let Some(entry) = st.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                // Under the lock: a disarm racing with us waits, so when it returns the
                // action has run completely.
                Entry::Critical(f) => guarded(f),
                // Never here: user code must not delay the next deadline.
                Entry::Deferred(f) => inner.report(f),
            }
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
    fn a_slow_deferred_action_never_delays_a_critical_deadline() {
        // Its own instance: blocking the global reporter would delay other tests' reports.
        let dog = Watchdog::start(4);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let _slow = dog.arm(Instant::now(), move || {
            let _ = entered_tx.send(());
            std::thread::sleep(Duration::from_secs(3));
        });
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the slow deferred action never started");
        let due = Instant::now() + Duration::from_millis(50);
        let (fired_tx, fired) = std::sync::mpsc::channel();
        let _deadline = dog.arm_critical(due, move || {
            let _ = fired_tx.send(Instant::now());
        });
        let at = fired
            .recv_timeout(Duration::from_secs(10))
            .expect("the critical deadline never fired");
        let late = at.saturating_duration_since(due);
        assert!(
            late < Duration::from_millis(300),
            "a deadline fired {late:?} late behind a slow report"
        );
    }

    #[test]
    fn a_full_report_queue_drops_and_counts_instead_of_blocking_the_watchdog() {
        let dog = Watchdog::start(1);
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let _blocker = dog.arm(Instant::now(), move || {
            let _ = entered_tx.send(());
            let _ = release.recv_timeout(Duration::from_secs(20));
        });
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the blocking report never started");
        let (hits, add) = counter();
        // One fits in the queue, two are dropped.
        let _queued: Vec<Armed> = (0..3).map(|_| dog.arm(Instant::now(), add(1))).collect();
        let (fired_tx, fired) = std::sync::mpsc::channel();
        let _deadline = dog.arm_critical(Instant::now() + Duration::from_millis(20), move || {
            let _ = fired_tx.send(());
        });
        fired
            .recv_timeout(Duration::from_secs(2))
            .expect("a full report queue blocked the watchdog");
        assert_eq!(dog.reports_dropped(), 2);
        let _ = release_tx.send(());
        wait_for(&hits, 1);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the queued report still runs"
        );
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

    // Tests added from the mutation run (docs/mutants.md).

    #[test]
    fn dropping_the_guard_disarms_and_deadlines_at_one_instant_all_fire() {
        let dog = Watchdog::start(8);
        let (hits, add) = counter();
        let at = Instant::now() + Duration::from_millis(20);
        let armed = dog.arm(at, add(100));
        let shown = format!("{armed:?}");
        assert!(
            shown.contains("Armed") && shown.contains("deadline"),
            "{shown}"
        );
        drop(armed);
        let _one = dog.arm(at, add(1));
        let _two = dog.arm(at, add(10));
        wait_for(&hits, 11);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            hits.load(Ordering::SeqCst),
            11,
            "both deadlines of that instant fire, the dropped one never"
        );
    }

    #[test]
    fn an_earlier_deadline_wakes_a_watchdog_sleeping_until_a_later_one() {
        let dog = Watchdog::start(8);
        let (hits, add) = counter();
        let _later = dog.arm(Instant::now() + Duration::from_secs(30), add(100));
        // Let the watchdog go to sleep until that one.
        std::thread::sleep(Duration::from_millis(50));
        let due = Instant::now() + Duration::from_millis(20);
        let _earlier = dog.arm(due, add(1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the earlier deadline did not fire: the watchdog was not woken for it"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
