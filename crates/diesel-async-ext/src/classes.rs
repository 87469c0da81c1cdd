//! Pools of different kinds of work sharing one connection budget, for diesel-async.
//!
//! [`ClassPools`] builds one [`ExtPool`] per class of work; each pool's connections take
//! permits from one [`Budget`](pool_core::budget::Budget), so:
//!
//! * physical connections opened through the pools never exceed the budget's total;
//! * a class with a **reserved** floor always gets those connections, at once, however busy
//!   the others are (the floor is kept open by the class's maintenance task);
//! * a class may **borrow** headroom nobody reserved, up to its cap, and gives it back when
//!   another class needs it: idle borrowed connections are closed by the borrowing pool's
//!   maintenance task, woken by the budget the moment a waiter blocks
//!   ([`Budget::pressure_async`](pool_core::budget::Budget::pressure_async)); busy ones are closed when they are returned;
//! * each class is an ordinary `ExtPool` (`pools.class("automation")?.get().await` yields
//!   bb8's own `PooledConnection`), with its own stats, in one status report with the budget.
//!
//! ```no_run
//! use diesel_async::AsyncPgConnection;
//! use diesel_async_ext::classes::{Class, ClassPools};
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let pools = ClassPools::<AsyncPgConnection>::builder("postgres://app@db/app", 60)
//!     .class("automation", Class::new().pool_size(50).max_overflow(5)) // never the last 5
//!     .class("adhoc", Class::new().reserved(5)) // always 5; may borrow idle headroom
//!     .configure(|b| b.application_name("orders"))
//!     .build()
//!     .await?;
//! let mut conn = pools.class("adhoc")?.get().await?;
//! # let _ = &mut conn;
//! println!("{}", pools.status());
//! # Ok(())
//! # }
//! ```
//!
//! A connect of a class waits for its budget permit only while a checkout of that class waits
//! (see the pool's demand rules), so a checkout that gave up never leaves a phantom in the
//! budget's queue. Replacing a pooled connection's instrumentation (`set_instrumentation`) is
//! not supported with a budget: the permit lives there; use
//! `diesel::connection::set_default_instrumentation`, which the pool forwards to.

use std::ops::Deref;

pub use pool_core::classes::{Class, UnknownClass};
use pool_core::classes::{ClassPool, ClassSpecs, Classes};
use pool_core::readiness::ClassesHealth;
use pool_core::stats::StatsSnapshot;

use crate::backend::ExtConnection;
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

impl<C: ExtConnection> Clone for ClassPools<C> {
    fn clone(&self) -> Self {
        ClassPools(self.0.clone())
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
    /// (`pools.health().await.class("web")`), or asks only it
    /// (`pools.class("web")?.health().await`).
    pub async fn health(&self) -> ClassesHealth {
        let mut classes = Vec::new();
        for (name, pool) in self.classes() {
            classes.push((name.to_owned(), pool.health().await));
        }
        ClassesHealth::new(classes)
    }
}

#[cfg(feature = "postgres-core")]
impl ClassPools<diesel_async::AsyncPgConnection> {
    /// Compares the budget with what the server has left (see
    /// [`check_server_capacity`](crate::capacity::check_server_capacity)); logs a warning when
    /// it does not fit. Uses a connection of the first class.
    ///
    /// # Errors
    /// [`CapacityError`](crate::capacity::CapacityError) when no connection can be had or the
    /// query fails.
    pub async fn check_server_capacity(
        &self,
    ) -> Result<crate::capacity::ServerCapacity, crate::capacity::CapacityError> {
        let ours: Vec<String> = self
            .classes()
            .filter_map(|(_, p)| p.config().connect.application_name.clone())
            .collect();
        let mut pools = self.classes().map(|(_, p)| p);
        let pool = pools.next().ok_or_else(|| {
            crate::capacity::CapacityError::Pool("the budget has no class".to_owned())
        })?;
        let mut conn = pool
            .get()
            .await
            .map_err(|e| crate::capacity::CapacityError::Pool(e.to_string()))?;
        Ok(crate::capacity::check_server_capacity(&mut conn, self.budget().total(), &ours).await?)
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
    pub async fn build(self) -> Result<ClassPools<C>, BuildError> {
        let (budget, plans) = self.specs.plan()?;
        let hooks = self.base.hooks.clone();
        let (base, listener) = self.base.into_parts();
        let mut pools = Vec::with_capacity(plans.len());
        for plan in plans {
            let config = plan.configure(base.clone()).build()?;
            let class = Some((budget.clone(), plan.class_id));
            pools.push((
                plan.name,
                crate::pool::build_pool(config, listener.clone(), class, false, hooks.clone())
                    .await?,
            ));
        }
        Ok(ClassPools(Classes::new(budget, pools)))
    }
}
