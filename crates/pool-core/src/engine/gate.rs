//! The checkout gate: first come, first served.
//!
//! r2d2 lets a thread that arrives just as a connection is returned take it, even though
//! others have waited longer; under load, waits become long and random. The gate stands in
//! front of the pool: a checkout first takes a gate permit, in arrival order, and keeps it
//! until the connection comes back. It is the budget's queue with a single class (one lock,
//! the oldest waiter served first, a released permit handed straight to it, a waiter that
//! gives up leaving nothing behind), so fairness costs one uncontended lock when the pool is
//! not saturated.

use crate::budget::{Budget, ClassId, Permit};

/// A FIFO gate of `size` permits, one per connection a checkout may hold.
#[derive(Debug, Clone)]
pub struct Gate {
    queue: Budget,
    class: ClassId,
}

impl Gate {
    /// A gate letting at most `size` checkouts through at once (`size` ≥ 1, at most
    /// [`MAX_CONNECTIONS`](crate::config::MAX_CONNECTIONS), which every validated
    /// configuration respects).
    pub fn new(size: u32) -> Gate {
        let size = size.clamp(1, crate::config::MAX_CONNECTIONS);
        let queue = Budget::builder(size)
            .class("checkout", 0, size)
            .without_metrics()
            .build()
            .expect("a one-class budget with max = total is valid");
        let class = queue.class_id("checkout").expect("declared above");
        Gate { queue, class }
    }

    /// A permit if one is free and nobody waits for it.
    pub fn try_enter(&self) -> Option<Permit> {
        self.queue.try_acquire(self.class)
    }

    /// Waits, in arrival order, at most `timeout` for a permit.
    #[cfg(not(loom))]
    pub fn enter(
        &self,
        timeout: std::time::Duration,
    ) -> Result<Permit, crate::budget::AcquireError> {
        self.queue.acquire(self.class, timeout)
    }

    /// The async form of [`Gate::enter`]; wrap it in the runtime's timeout.
    pub fn enter_async(&self) -> crate::budget::Acquire {
        self.queue.acquire_async(self.class)
    }

    /// Checkouts waiting at the gate now.
    pub fn waiters(&self) -> u32 {
        self.queue.waiters(self.class)
    }

    /// Permits held now (checkouts in progress or connections out).
    pub fn in_use(&self) -> u32 {
        self.queue.snapshot().in_use
    }
}
