//! Pools of different kinds of work sharing one connection budget, for diesel-async.
//!
//! [`ClassPools`] builds one [`ExtPool`] per class of work; each pool's connections take
//! permits from one [`Budget`], so:
//!
//! * physical connections opened through the pools never exceed the budget's total;
//! * a class with a **reserved** floor always gets those connections, at once, however busy
//!   the others are (the floor is kept open by the class's maintenance task);
//! * a class may **borrow** headroom nobody reserved, up to its cap, and gives it back when
//!   another class needs it: idle borrowed connections are closed by the borrowing pool's
//!   maintenance task, woken by the budget the moment a waiter blocks
//!   ([`Budget::pressure_async`]); busy ones are closed when they are returned;
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

use std::time::Duration;

use pool_core::budget::{Budget, BudgetSnapshot};
use pool_core::status::StatusReport;

use crate::backend::ExtConnection;
use crate::pool::{BuildError, Builder, ExtPool};

/// One class's share: its reserved floor and its pool sizes.
///
/// The class may hold `pool_size + max_overflow` connections at once. Defaults: `reserved`
/// 0; `pool_size` = `reserved`; `max_overflow` = whatever the other classes do not reserve,
/// so a class declared with only a floor may borrow everything unreserved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Class {
    reserved: u32,
    pool_size: Option<u32>,
    max_overflow: Option<u32>,
    pool_timeout: Option<Duration>,
}

impl Class {
    /// A class with no floor and the default sizes.
    pub fn new() -> Class {
        Class::default()
    }

    /// Connections only this class can take, always available to it. Default: 0.
    pub fn reserved(mut self, n: u32) -> Class {
        self.reserved = n;
        self
    }

    /// Connections the class normally holds. Default: `reserved`.
    pub fn pool_size(mut self, n: u32) -> Class {
        self.pool_size = Some(n);
        self
    }

    /// Extra connections under load. Default: all the budget the other classes do not
    /// reserve, minus `pool_size`.
    pub fn max_overflow(mut self, n: u32) -> Class {
        self.max_overflow = Some(n);
        self
    }

    /// How long a checkout of this class waits (for a connection and for the budget).
    /// Default: the shared builder's `pool_timeout`.
    pub fn pool_timeout(mut self, d: Duration) -> Class {
        self.pool_timeout = Some(d);
        self
    }
}

/// A class name that is not in the budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no pool class named {name:?} (classes: {known})")]
pub struct UnknownClass {
    /// The name asked for.
    pub name: String,
    /// The classes there are, comma separated.
    pub known: String,
}

/// Builder of [`ClassPools`].
#[must_use = "a builder does nothing until .build() is called"]
pub struct ClassPoolsBuilder<C> {
    base: Builder<C>,
    total: u32,
    classes: Vec<(String, Class)>,
}

/// One pool per class of work, sharing a connection budget. See the [module documentation](self).
pub struct ClassPools<C: ExtConnection> {
    budget: Budget,
    pools: Vec<(String, ExtPool<C>)>,
}

impl<C: ExtConnection> Clone for ClassPools<C> {
    fn clone(&self) -> Self {
        ClassPools {
            budget: self.budget.clone(),
            pools: self.pools.clone(),
        }
    }
}

impl<C: ExtConnection> std::fmt::Debug for ClassPools<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassPools")
            .field("budget", &self.budget)
            .field(
                "classes",
                &self.pools.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<C: ExtConnection> ClassPools<C> {
    /// Starts pools for `url` sharing a budget of `total` connections.
    pub fn builder(url: &str, total: u32) -> ClassPoolsBuilder<C> {
        ClassPoolsBuilder {
            base: ExtPool::builder(url),
            total,
            classes: Vec::new(),
        }
    }

    /// The pool of class `name`.
    ///
    /// # Errors
    /// [`UnknownClass`] listing the classes there are.
    pub fn class(&self, name: &str) -> Result<&ExtPool<C>, UnknownClass> {
        self.pools
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .ok_or_else(|| UnknownClass {
                name: name.to_owned(),
                known: self
                    .pools
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Every class and its pool, in declaration order.
    pub fn classes(&self) -> impl Iterator<Item = (&str, &ExtPool<C>)> {
        self.pools.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The shared budget.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The budget's state now.
    pub fn budget_snapshot(&self) -> BudgetSnapshot {
        self.budget.snapshot()
    }

    /// Every class's stats and the budget, as one report (text through `Display`, JSON
    /// through `to_json`).
    pub fn status(&self) -> StatusReport {
        StatusReport::new(self.pools.iter().map(|(_, p)| p.stats()).collect())
            .with_budget_snapshot(self.budget.snapshot())
    }
}

#[cfg(feature = "postgres")]
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
        let (_, pool) = &self.pools[0];
        let ours: Vec<String> = self
            .pools
            .iter()
            .filter_map(|(_, p)| p.config().connect.application_name.clone())
            .collect();
        let mut conn = pool
            .get()
            .await
            .map_err(|e| crate::capacity::CapacityError::Pool(e.to_string()))?;
        Ok(crate::capacity::check_server_capacity(&mut conn, self.budget.total(), &ours).await?)
    }
}

impl<C: ExtConnection> ClassPoolsBuilder<C> {
    /// Declares a class of work.
    pub fn class(mut self, name: impl Into<String>, class: Class) -> Self {
        self.classes.push((name.into(), class));
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
        let reserved_total: u32 = self.classes.iter().map(|(_, c)| c.reserved).sum();
        let mut sizes = Vec::with_capacity(self.classes.len());
        let mut budget = Budget::builder(self.total);
        for (name, class) in &self.classes {
            let others = reserved_total.saturating_sub(class.reserved);
            let pool_size = class.pool_size.unwrap_or(class.reserved);
            let max_overflow = class
                .max_overflow
                .unwrap_or_else(|| self.total.saturating_sub(others).saturating_sub(pool_size));
            let max = pool_size.saturating_add(max_overflow);
            budget = budget.class(name.clone(), class.reserved, max);
            sizes.push((pool_size, max_overflow));
        }
        let budget = budget.build()?;
        let (base_config, listener) = self.base.into_parts();
        let mut pools = Vec::with_capacity(self.classes.len());
        for ((name, class), (pool_size, max_overflow)) in self.classes.iter().zip(sizes) {
            let mut config = base_config
                .clone()
                .name(name.clone())
                .pool_size(pool_size)
                .max_overflow(max_overflow);
            if let Some(timeout) = class.pool_timeout {
                config = config.pool_timeout(timeout);
            }
            let class_id = budget.class_id(name).expect("declared above");
            let pool = crate::pool::build(
                config.build()?,
                listener.clone(),
                Some((budget.clone(), class_id)),
            )
            .await?;
            pools.push((name.clone(), pool));
        }
        Ok(ClassPools { budget, pools })
    }
}
