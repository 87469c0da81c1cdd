//! Demand: connects of a budget class wait for a permit only while a checkout wants one.
//!
//! r2d2 opens connections on its own threads, started by a checkout that found nothing
//! idle; the checkout may give up (or get a returned connection) long before the connect
//! has its budget permit. A connect still queued for a permit then would be a phantom: it
//! holds a place in the budget's queue and makes other classes give borrowed connections
//! back for nobody. So a connect queues for its permit only while [`ExtPool::get`] callers
//! of the same pool are waiting; when the last one leaves, queued connects leave the budget's
//! queue and wait (outside it) for the next checkout, or for the pool to close.
//!
//! Only checkouts through [`ExtPool::get`](crate::ExtPool::get) count as demand; a checkout
//! through the wrapped r2d2 pool directly gets a budget permit only if one is free at once.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use pool_core::budget::{AcquireError, Budget, ClassId, Permit};

/// Checkouts waiting in one pool, and the connects waiting for them.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    waiting: AtomicU32,
    closed: AtomicBool,
    /// Threads of connects queued for a budget permit (unparked when demand ends).
    queued: Mutex<Vec<std::thread::Thread>>,
    lock: Mutex<()>,
    changed: Condvar,
}

/// One checkout's share of the demand; leaving ends it.
pub(crate) struct Wanting<'a>(&'a Demand);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        if self.0.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake_queued();
        }
    }
}

impl Demand {
    /// A checkout starts waiting for a connection.
    pub(crate) fn want(&self) -> Wanting<'_> {
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            let _guard = self.lock.lock();
            self.changed.notify_all();
        }
        Wanting(self)
    }

    fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0 && !self.closed.load(Ordering::Acquire)
    }

    /// The pool is gone: every connect waiting here gives up.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_queued();
        let _guard = self.lock.lock();
        self.changed.notify_all();
    }

    fn wake_queued(&self) {
        for thread in self.queued.lock().iter() {
            thread.unpark();
        }
    }

    /// A budget permit for a connect of `class`. Queues for it while a checkout wants a
    /// connection, for at most `wait` of continuous demand (then the budget's timeout error,
    /// which the checkout quotes); with no demand, waits outside the queue.
    pub(crate) fn permit(
        &self,
        budget: &Budget,
        class: ClassId,
        wait: Duration,
    ) -> Result<Permit, AcquireError> {
        // A permit free at once is taken whoever asked (r2d2's own connects included).
        if let Some(permit) = budget.try_acquire(class) {
            return Ok(permit);
        }
        loop {
            self.wait_for_demand();
            if self.closed.load(Ordering::Acquire) {
                return Err(AcquireError::Abandoned {
                    class: budget.class_name(class).to_owned(),
                });
            }
            let me = std::thread::current();
            self.queued.lock().push(me.clone());
            let result = budget.acquire_while(class, wait, &|| self.wanted());
            self.queued.lock().retain(|t| t.id() != me.id());
            match result {
                Err(AcquireError::Abandoned { .. }) => continue,
                other => return other,
            }
        }
    }

    fn wait_for_demand(&self) {
        let mut guard = self.lock.lock();
        while self.waiting.load(Ordering::Acquire) == 0 && !self.closed.load(Ordering::Acquire) {
            self.changed.wait(&mut guard);
        }
    }
}
