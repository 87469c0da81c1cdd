//! Pools of different kinds of work sharing one connection budget: what every adapter's
//! `ClassPools` shares.
//!
//! A [`Class`] declares one kind of work's share (its reserved floor, pool sizes and
//! checkout timeout). [`ClassSpecs`] collects the declared classes and turns them into a
//! [`Budget`] and one [`ClassPlan`] per class: the sizes its pool is built with and its
//! budget class. The adapter builds one pool per plan (sync or async) and keeps them, with the
//! budget, in a [`Classes`], which finds a class's pool by name and makes one status report.
//!
//! ```
//! use pool_core::classes::{Class, ClassSpecs};
//! use pool_core::PoolConfig;
//!
//! let mut specs = ClassSpecs::new(60);
//! specs.push("automation", Class::new().pool_size(50).max_overflow(5));
//! specs.push("adhoc", Class::new().reserved(5));
//! let (budget, plans) = specs.plan()?;
//! assert_eq!(budget.total(), 60);
//! // adhoc: pool_size defaults to its floor, max_overflow to what automation does not reserve.
//! assert_eq!((plans[1].pool_size, plans[1].max_overflow), (5, 55));
//! let config = plans[1]
//!     .configure(PoolConfig::builder("postgres://app@db/app"))
//!     .build()
//!     .unwrap();
//! assert_eq!((config.name.as_str(), config.pool_size), ("adhoc", 5));
//! # Ok::<(), pool_core::BudgetError>(())
//! ```

use std::time::Duration;

use crate::budget::{Budget, BudgetError, BudgetSnapshot, ClassId};
use crate::config::PoolConfigBuilder;
use crate::stats::StatsSnapshot;
use crate::status::StatusReport;

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

/// The classes declared so far and the budget's total: what a `ClassPools` builder collects
/// before it builds.
#[derive(Debug, Clone)]
pub struct ClassSpecs {
    total: u32,
    classes: Vec<(String, Class)>,
}

/// One class's pool, as planned from the budget: its name, budget class, sizes and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassPlan {
    /// The class's name (also the pool's name).
    pub name: String,
    /// The class in the budget.
    pub class_id: ClassId,
    /// The pool's `pool_size` (the class's, else its reserved floor).
    pub pool_size: u32,
    /// The pool's `max_overflow` (the class's, else the budget nobody else reserves).
    pub max_overflow: u32,
    /// The class's checkout timeout, if it has its own.
    pub pool_timeout: Option<Duration>,
}

impl ClassPlan {
    /// `base` (the settings every class shares) with this class's name, sizes and timeout.
    pub fn configure(&self, base: PoolConfigBuilder) -> PoolConfigBuilder {
        let config = base
            .name(self.name.clone())
            .pool_size(self.pool_size)
            .max_overflow(self.max_overflow);
        match self.pool_timeout {
            Some(timeout) => config.pool_timeout(timeout),
            None => config,
        }
    }
}

impl ClassSpecs {
    /// No classes yet, in a budget of `total` connections.
    pub fn new(total: u32) -> ClassSpecs {
        ClassSpecs {
            total,
            classes: Vec::new(),
        }
    }

    /// Declares a class of work.
    pub fn push(&mut self, name: impl Into<String>, class: Class) {
        self.classes.push((name.into(), class));
    }

    /// Checks the budget and plans every class's pool, in declaration order.
    ///
    /// # Errors
    /// [`BudgetError`] for an impossible budget (reserved above the total, a cap above the
    /// total, zero sizes).
    pub fn plan(&self) -> Result<(Budget, Vec<ClassPlan>), BudgetError> {
        // Summed without overflow: a budget that reserves more than its total is refused by
        // the budget itself.
        let reserved_total = self
            .classes
            .iter()
            .fold(0u32, |sum, (_, c)| sum.saturating_add(c.reserved));
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
        let plans = self
            .classes
            .iter()
            .zip(sizes)
            .filter_map(|((name, class), (pool_size, max_overflow))| {
                Some(ClassPlan {
                    name: name.clone(),
                    // Every class was declared to the budget above.
                    class_id: budget.class_id(name)?,
                    pool_size,
                    max_overflow,
                    pool_timeout: class.pool_timeout,
                })
            })
            .collect();
        Ok((budget, plans))
    }
}

/// What [`Classes`] needs of each class's pool: its stats, for the status report.
pub trait ClassPool {
    /// Counters and gauges of the pool.
    fn stats(&self) -> StatsSnapshot;
}

/// One pool per class of work, sharing a connection budget; the adapters' `ClassPools`
/// dereference to it.
#[derive(Clone)]
pub struct Classes<P> {
    budget: Budget,
    pools: Vec<(String, P)>,
}

impl<P> std::fmt::Debug for Classes<P> {
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

impl<P> Classes<P> {
    /// The pools, by class name in declaration order, sharing `budget`.
    pub fn new(budget: Budget, pools: Vec<(String, P)>) -> Classes<P> {
        Classes { budget, pools }
    }

    /// The pool of class `name`.
    ///
    /// # Errors
    /// [`UnknownClass`] listing the classes there are.
    pub fn class(&self, name: &str) -> Result<&P, UnknownClass> {
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
    pub fn classes(&self) -> impl Iterator<Item = (&str, &P)> {
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
}

impl<P: ClassPool> Classes<P> {
    /// Every class's stats and the budget, as one report (text through `Display`, JSON
    /// through `to_json`), like the field reports' `print_connection_status`.
    pub fn status(&self) -> StatusReport {
        StatusReport::new(self.pools.iter().map(|(_, p)| p.stats()).collect())
            .with_budget_snapshot(self.budget.snapshot())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_floor_and_what_the_others_do_not_reserve() {
        let mut specs = ClassSpecs::new(60);
        specs.push("automation", Class::new().pool_size(50).max_overflow(5));
        specs.push(
            "adhoc",
            Class::new()
                .reserved(5)
                .pool_timeout(Duration::from_secs(2)),
        );
        let (budget, plans) = specs.plan().unwrap();
        let shape: Vec<_> = plans
            .iter()
            .map(|p| (p.name.as_str(), p.pool_size, p.max_overflow, p.pool_timeout))
            .collect();
        assert_eq!(
            shape,
            [
                ("automation", 50, 5, None),
                ("adhoc", 5, 55, Some(Duration::from_secs(2)))
            ]
        );
        assert_eq!(budget.limits(plans[1].class_id).reserved, 5);
        assert_eq!(budget.limits(plans[1].class_id).max, 60);
    }

    #[test]
    fn an_unknown_class_names_the_classes_there_are() {
        let mut specs = ClassSpecs::new(10);
        specs.push("a", Class::new());
        specs.push("b", Class::new());
        let (budget, plans) = specs.plan().unwrap();
        let classes = Classes::new(budget, plans.into_iter().map(|p| (p.name, ())).collect());
        let err = classes.class("c").unwrap_err();
        assert_eq!(err.to_string(), "no pool class named \"c\" (classes: a, b)");
        assert!(classes.class("b").is_ok());
    }
}

/// From the mutation run: the `Debug` of a set of class pools names its classes.
#[cfg(all(test, not(loom)))]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_names_the_classes_and_the_budget() {
        let budget = Budget::builder(3).class("jobs", 0, 3).build().unwrap();
        let classes = Classes::new(budget, vec![("jobs".to_owned(), ())]);
        let shown = format!("{classes:?}");
        assert!(shown.starts_with("ClassPools {"), "{shown}");
        assert!(shown.contains("classes: [\"jobs\"]"), "{shown}");
    }

    #[test]
    fn classes_come_back_in_declaration_order() {
        let budget = Budget::builder(3)
            .class("jobs", 0, 3)
            .class("adhoc", 1, 3)
            .build()
            .unwrap();
        let classes = Classes::new(
            budget,
            vec![("jobs".to_owned(), 1), ("adhoc".to_owned(), 2)],
        );
        let seen: Vec<(&str, i32)> = classes.classes().map(|(n, p)| (n, *p)).collect();
        assert_eq!(seen, [("jobs", 1), ("adhoc", 2)]);
    }
}
