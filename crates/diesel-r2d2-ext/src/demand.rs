//! Demand: connections are opened for checkouts that want them, and for nobody else.
//!
//! r2d2 opens connections on its own threads, one started by every checkout that finds
//! nothing idle; the checkout may be served by a returned connection (or give up) long before
//! that connect is done. Under a spike, that opens up to `max_size` connections nobody needs
//! (HikariCP's spike test; measured by the benchmark suite). So a connect starts only while
//! [`ExtPool::get`] callers of the same pool are waiting, and a connect of a budget class
//! queues for its permit only as long as that lasts: otherwise it would be a phantom in the
//! budget's queue, making other classes give borrowed connections back for nobody. A connect
//! nobody wants waits (outside any queue) for the next checkout, or for the pool to close.
//!
//! Only checkouts through [`ExtPool::get`](crate::ExtPool::get) count as demand: a checkout
//! through the wrapped r2d2 pool directly is served by idle connections only.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pool_core::budget::{AcquireError, Budget, ClassId, Permit};

/// Checkouts waiting in one pool, and the connects waiting for them.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    /// Checkouts waiting for a connection now.
    waiting: AtomicU32,
    closed: AtomicBool,
    /// Connects asleep until a checkout wants a connection (the only ones a checkout must
    /// wake: with none, starting and ending a checkout touches two atomics and no lock).
    sleepers: AtomicU32,
    lock: Mutex<()>,
    changed: Condvar,
    /// Threads of connects queued for a budget permit (unparked when demand ends).
    queued: Mutex<Vec<std::thread::Thread>>,
    queued_count: AtomicU32,
}

/// One checkout's share of the demand; leaving ends it.
pub(crate) struct Wanting<'a>(&'a Demand);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::SeqCst) == 1
            && self.0.queued_count.load(Ordering::SeqCst) > 0
        {
            self.0.wake_queued();
        }
    }
}

impl Demand {
    /// A checkout starts waiting for a connection.
    pub(crate) fn want(&self) -> Wanting<'_> {
        // SeqCst pairs with `wait_for_demand`: either it sees this increment, or this sees
        // its sleeper and wakes it under the lock.
        if self.waiting.fetch_add(1, Ordering::SeqCst) == 0
            && self.sleepers.load(Ordering::SeqCst) > 0
        {
            let _guard = self.lock.lock();
            self.changed.notify_all();
        }
        Wanting(self)
    }

    fn wanted(&self) -> bool {
        self.waiting.load(Ordering::SeqCst) > 0 && !self.closed.load(Ordering::Acquire)
    }

    /// The pool is gone: every connect waiting here gives up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake_queued();
        let _guard = self.lock.lock();
        self.changed.notify_all();
    }

    fn wake_queued(&self) {
        for thread in self.queued.lock().iter() {
            thread.unpark();
        }
    }

    /// Clears a connect to go ahead: waits until a checkout wants a connection, then, for a
    /// budget class, for a permit (queued only while the demand lasts, for at most `wait` of
    /// it; then the budget's timeout error, which the checkout quotes). `Abandoned` when the
    /// pool is gone.
    pub(crate) fn ready(
        &self,
        budget: Option<(&Budget, ClassId)>,
        wait: Duration,
    ) -> Result<Option<Permit>, AcquireError> {
        loop {
            self.wait_for_demand();
            let Some((budget, class)) = budget else {
                return if self.closed.load(Ordering::SeqCst) {
                    Err(AcquireError::Abandoned {
                        class: "-".to_owned(),
                    })
                } else {
                    Ok(None)
                };
            };
            if self.closed.load(Ordering::SeqCst) {
                return Err(AcquireError::Abandoned {
                    class: budget.class_name(class).to_owned(),
                });
            }
            let me = std::thread::current();
            self.queued.lock().push(me.clone());
            self.queued_count.fetch_add(1, Ordering::SeqCst);
            let result = budget.acquire_while(class, wait, &|| self.wanted());
            self.queued_count.fetch_sub(1, Ordering::SeqCst);
            self.queued.lock().retain(|t| t.id() != me.id());
            match result {
                Err(AcquireError::Abandoned { .. }) => continue,
                other => return other.map(Some),
            }
        }
    }

    fn wait_for_demand(&self) {
        if self.wanted() || self.closed.load(Ordering::SeqCst) {
            return;
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        while self.waiting.load(Ordering::SeqCst) == 0 && !self.closed.load(Ordering::SeqCst) {
            self.changed.wait(&mut guard);
        }
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }
}
