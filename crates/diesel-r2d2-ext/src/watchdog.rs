//! One background thread that enforces deadlines the blocking driver cannot: it shuts down
//! the socket of a validation ping that outlived its timeout (see [`crate::socket`]) and
//! reports connections held past the leak-detection threshold.
//!
//! Invariant: an armed deadline fires at most once, and never after its [`Armed`] guard was
//! dropped — firing and disarming both happen under the same lock, so once `drop(guard)`
//! returns the watchdog will not touch that socket again.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::socket::ConnSocket;

/// What to do when a deadline passes.
pub(crate) enum Action {
    /// Shut the socket down (a stalled ping).
    Shutdown(ConnSocket),
    /// Run a callback once (leak report). Runs on the watchdog thread, outside the lock.
    Call(Box<dyn FnOnce() + Send>),
}

#[derive(Default)]
struct State {
    next_id: u64,
    deadlines: BTreeMap<(Instant, u64), Action>,
}

struct Inner {
    state: Mutex<State>,
    wake: Condvar,
}

/// Handle to the process-wide watchdog thread.
#[derive(Clone)]
pub(crate) struct Watchdog(Arc<Inner>);

/// A deadline; dropping it disarms the deadline if it has not fired yet.
pub(crate) struct Armed {
    dog: Watchdog,
    key: (Instant, u64),
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.dog.0.state.lock().deadlines.remove(&self.key);
    }
}

impl Watchdog {
    /// The shared watchdog, started on first use.
    pub(crate) fn global() -> Watchdog {
        static DOG: OnceLock<Watchdog> = OnceLock::new();
        DOG.get_or_init(|| {
            let inner = Arc::new(Inner {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
            });
            let thread_inner = inner.clone();
            let spawned = std::thread::Builder::new()
                .name("resilient-diesel-watchdog".into())
                .spawn(move || run(&thread_inner));
            if let Err(e) = spawned {
                log::error!(target: "resilient_diesel", "could not start the watchdog thread: {e}; stalled validations will not be cut short");
            }
            Watchdog(inner)
        })
        .clone()
    }

    /// Arms `action` to run at `deadline` unless the returned guard is dropped first.
    pub(crate) fn arm(&self, deadline: Instant, action: Action) -> Armed {
        let mut st = self.0.state.lock();
        st.next_id += 1;
        let key = (deadline, st.next_id);
        let is_first = st.deadlines.keys().next().is_none_or(|first| key < *first);
        st.deadlines.insert(key, action);
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

fn run(inner: &Inner) {
    let mut st = inner.state.lock();
    loop {
        let now = Instant::now();
        let mut calls = Vec::new();
        while let Some(entry) = st.deadlines.first_entry() {
            if entry.key().0 > now {
                break;
            }
            match entry.remove() {
                // Shut down under the lock: a guard being dropped concurrently waits for us,
                // so the socket is still the connection's when we act on it.
                Action::Shutdown(sock) => sock.shutdown(),
                Action::Call(f) => calls.push(f),
            }
        }
        if !calls.is_empty() {
            drop(st);
            for f in calls {
                f();
            }
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
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[test]
    fn fires_once_after_the_deadline_and_never_after_disarm() {
        let dog = Watchdog::global();
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let _armed = dog.arm(
            Instant::now() + Duration::from_millis(20),
            Action::Call(Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            })),
        );
        let h2 = hits.clone();
        let disarmed = dog.arm(
            Instant::now() + Duration::from_millis(40),
            Action::Call(Box::new(move || {
                h2.fetch_add(100, Ordering::SeqCst);
            })),
        );
        drop(disarmed);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}
