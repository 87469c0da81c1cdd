//! Pools of different kinds of work sharing one connection budget.
//!
//! The field report: a 60-connection database plan, automation that grew to take all 60, and
//! people locked out while trying to debug it. [`ClassPools`] builds one [`ExtPool`] per class
//! of work; each pool's connections take permits from one [`Budget`](pool_core::budget::Budget),
//! so:
//!
//! * physical connections opened through the pools never exceed the budget's total;
//! * a class with a **reserved** floor always gets those connections, at once, however busy
//!   the others are;
//! * a class may **borrow** headroom nobody reserved, up to its cap, and gives it back when
//!   another class needs it: idle borrowed connections are closed by a reclaim thread woken the
//!   moment a waiter blocks, busy ones are closed when they are returned;
//! * each class is an ordinary `ExtPool` (`pools.class("automation")?.get()` yields r2d2's own
//!   `PooledConnection`), with its own stats, in one status report with the budget.
//!
//! ```no_run
//! use diesel_r2d2_ext::classes::{Class, ClassPools};
//! use diesel::PgConnection;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pools = ClassPools::<PgConnection>::builder("postgres://app@db/app", 60)
//!     .class("automation", Class::new().pool_size(50).max_overflow(5)) // never the last 5
//!     .class("adhoc", Class::new().reserved(5)) // always 5; may borrow idle headroom
//!     .configure(|b| b.application_name("orders"))
//!     .build()?;
//! let mut conn = pools.class("adhoc")?.get()?;
//! # let _ = &mut conn;
//! println!("{}", pools.status());
//! # Ok(())
//! # }
//! ```
//!
//! How fast borrowed headroom comes back: a class waiting for the budget wakes the borrowing
//! classes' reclaim threads at once (no polling), each closes as many idle borrowed
//! connections as there are blocked requests, and each closed connection's permit is handed
//! straight to the oldest waiter. In `tests/pg_budget.rs` (loopback, 2 cores), when automation
//! demands 20 connections that ad-hoc work borrowed, the first permit comes back 2-6 ms after
//! the demand and all 20 within 0.25-0.33 s: r2d2 opens at most three connections of a pool at
//! a time, so the waiters, and the permits given back to them, come three at a time, paced by
//! connection set-up. Borrowed connections that are in use come back when they are returned
//! to their pool.
//!
//! A class keeps only its reserved floor open when idle and opens others on demand (r2d2's
//! background `min_idle` top-up is off for budget classes: it would queue for permits nobody
//! asked for). Replacing a pooled connection's instrumentation (`set_instrumentation`) is not
//! supported with a budget: the permit lives there; use
//! `diesel::connection::set_default_instrumentation`, which the pool forwards to.

use std::ops::Deref;

pub use pool_core::classes::{Class, UnknownClass};
use pool_core::classes::{ClassPool, ClassSpecs, Classes};
use pool_core::readiness::ClassesHealth;
use pool_core::stats::StatsSnapshot;

use crate::manager::ExtConnection;
use crate::pool::{BuildError, Builder, ExtPool};

/// Builder of [`ClassPools`].
#[must_use = "a builder does nothing until .build() is called"]
pub struct ClassPoolsBuilder<C> {
    base: Builder<C>,
    specs: ClassSpecs,
}

/// One pool per class of work, sharing a connection budget. See the [module documentation](self).
///
/// Dereferences to [`Classes`]: `class(name)`, `classes()`, `budget()`, `budget_snapshot()`
/// and `status()` are its.
pub struct ClassPools<C: ExtConnection>(Classes<ExtPool<C>>);

impl<C: ExtConnection> std::fmt::Debug for ClassPools<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<C: ExtConnection> Deref for ClassPools<C> {
    type Target = Classes<ExtPool<C>>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<C: ExtConnection> ClassPool for ExtPool<C> {
    fn stats(&self) -> StatsSnapshot {
        ExtPool::stats(self)
    }
}

impl<C: ExtConnection> ClassPools<C> {
    /// Starts pools for `url` sharing a budget of `total` connections.
    pub fn builder(url: &str, total: u32) -> ClassPoolsBuilder<C> {
        ClassPoolsBuilder {
            base: ExtPool::builder(url),
            specs: ClassSpecs::new(total),
        }
    }

    /// Each class's [`ExtPool::health`], one class after another, as one answer for a
    /// readiness probe (see [`ClassesHealth`] for how the set's state is derived). A probe
    /// that guards one kind of work reads that class's answer
    /// (`pools.health().class("web")`), or asks only it (`pools.class("web")?.health()`).
    pub fn health(&self) -> ClassesHealth {
        ClassesHealth::new(
            self.classes()
                .map(|(name, pool)| (name.to_owned(), pool.health()))
                .collect(),
        )
    }
}

#[cfg(feature = "postgres")]
impl ClassPools<diesel::PgConnection> {
    /// Compares the budget with what the server has left (see
    /// [`check_server_capacity`](crate::capacity::check_server_capacity)); logs a warning when
    /// it does not fit. Uses a connection of the first class.
    ///
    /// # Errors
    /// [`CapacityError`](crate::capacity::CapacityError) when no connection can be had or the
    /// query fails.
    pub fn check_server_capacity(
        &self,
    ) -> Result<crate::capacity::ServerCapacity, crate::capacity::CapacityError> {
        let mut pools = self.classes().map(|(_, p)| p);
        let pool = pools.next().ok_or_else(|| {
            crate::capacity::CapacityError::Pool("the budget has no class".to_owned())
        })?;
        let mut conn = pool.get().map_err(|e| {
            crate::capacity::CapacityError::Pool(pool.state().redact(&e.to_string()))
        })?;
        let ours = self
            .classes()
            .map(|(_, p)| p.state().open_connections())
            .sum();
        Ok(crate::capacity::check_server_capacity(
            &mut conn,
            self.budget().total(),
            ours,
        )?)
    }
}

impl<C: ExtConnection> ClassPoolsBuilder<C> {
    /// Declares a class of work.
    pub fn class(mut self, name: impl Into<String>, class: Class) -> Self {
        self.specs.push(name, class);
        self
    }

    /// Settings every class shares (timeouts, keepalives, TLS, `application_name`, ...).
    /// Class sizes set here are overridden by each [`Class`].
    pub fn configure(mut self, f: impl FnOnce(Builder<C>) -> Builder<C>) -> Self {
        self.base = f(self.base);
        self
    }

    /// Checks the budget, then builds every class's pool (opening its reserved connections).
    ///
    /// # Errors
    /// [`BuildError::Budget`] for an impossible budget (reserved above the total, a cap above
    /// the total, zero sizes), else as [`Builder::build`].
    pub fn build(self) -> Result<ClassPools<C>, BuildError> {
        let (budget, plans) = self.specs.plan()?;
        let hooks = self.base.hooks.clone();
        let (base, listener) = self.base.into_parts();
        let mut pools = Vec::with_capacity(plans.len());
        for plan in plans {
            let config = plan.configure(base.clone()).build()?;
            let class = Some((budget.clone(), plan.class_id));
            pools.push((
                plan.name,
                crate::pool::build_pool(config, listener.clone(), class, false, hooks.clone())?,
            ));
        }
        Ok(ClassPools(Classes::new(budget, pools)))
    }
}
