//! Budget slices: one server's connections shared by the replicas of one service.
//!
//! Three replicas each configured for 20 connections need 60; a server with 40 left serves
//! the first two and refuses the third's connects with *too many clients*. [`slice()`] takes
//! what the server has left (or a role's `CONNECTION LIMIT`), the number of replicas and the
//! classes of one replica, and gives each replica an equal slice: its budget total, pool
//! sizes and class sizes, with every reserved class kept whole. Pure arithmetic: the server
//! is asked elsewhere (`pool-doctor size`).
//!
//! ```
//! use pool_core::capacity::slices::{slice, ClassShare, SliceRequest};
//!
//! let request = SliceRequest {
//!     total: 57,
//!     replicas: 3,
//!     pool_size: 10,
//!     max_overflow: 10,
//!     budget: Some(60),
//!     classes: vec![
//!         ClassShare::new("automation").pool_size(50).max_overflow(5),
//!         ClassShare::new("adhoc").reserved(5),
//!     ],
//! };
//! let s = slice(&request)?;
//! assert_eq!(s.per_replica, 19);
//! // adhoc keeps its floor in every replica; automation gets what is left.
//! assert_eq!((s.classes[1].reserved, s.classes[0].pool_size), (5, 14));
//! assert!(!s.fits_as_configured);
//! # Ok::<(), pool_core::capacity::slices::SliceError>(())
//! ```

use crate::budget::BudgetError;
use crate::classes::{Class, ClassSpecs};
use crate::config::MAX_CONNECTIONS;

/// One class of work as one replica declares it (the sizes of
/// [`crate::classes::Class`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassShare {
    /// The class's name.
    pub name: String,
    /// Connections only this class can take, kept whole in every replica.
    pub reserved: u32,
    /// Connections the class normally holds; `None`: its floor.
    pub pool_size: Option<u32>,
    /// Extra connections under load; `None`: whatever the other classes do not reserve.
    pub max_overflow: Option<u32>,
}

impl ClassShare {
    /// A class with no floor and the default sizes.
    pub fn new(name: impl Into<String>) -> ClassShare {
        ClassShare {
            name: name.into(),
            reserved: 0,
            pool_size: None,
            max_overflow: None,
        }
    }

    /// Sets the reserved floor.
    pub fn reserved(mut self, n: u32) -> ClassShare {
        self.reserved = n;
        self
    }

    /// Sets the pool size.
    pub fn pool_size(mut self, n: u32) -> ClassShare {
        self.pool_size = Some(n);
        self
    }

    /// Sets the overflow.
    pub fn max_overflow(mut self, n: u32) -> ClassShare {
        self.max_overflow = Some(n);
        self
    }
}

/// What to slice: the connections there are, the replicas, and one replica's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRequest {
    /// Connections all replicas together may hold: the server's `max_connections` minus its
    /// reserved slots and other clients, or a role's `CONNECTION LIMIT`.
    pub total: u32,
    /// Replicas of the service, each with the same configuration.
    pub replicas: u32,
    /// One replica's `pool_size` (used without classes).
    pub pool_size: u32,
    /// One replica's `max_overflow` (used without classes).
    pub max_overflow: u32,
    /// One replica's budget total for its classes (`ClassPools::builder(url, total)`);
    /// `None`: as much as its slice allows.
    pub budget: Option<u32>,
    /// One replica's classes; empty for a single pool.
    pub classes: Vec<ClassShare>,
}

/// One class's sizes in a replica's slice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClassSlice {
    /// The class's name.
    pub name: String,
    /// Its reserved floor (as configured: floors are never cut).
    pub reserved: u32,
    /// Its `pool_size` in the slice.
    pub pool_size: u32,
    /// Its `max_overflow` in the slice.
    pub max_overflow: u32,
}

/// Each replica's share. Every replica gets the same.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Slice {
    /// Replicas sliced for.
    pub replicas: u32,
    /// Connections all replicas together may hold.
    pub total: u32,
    /// Each replica's connections: `total / replicas`, or less when the configuration asks
    /// for less.
    pub per_replica: u32,
    /// Connections of the total no replica uses (the remainder of the division, or what a
    /// smaller configuration leaves).
    pub unused: u32,
    /// What one replica asks for as configured: `pool_size + max_overflow`, or the classes'
    /// budget total.
    pub requested_per_replica: u32,
    /// Whether every replica's configuration fits as it is (`requested × replicas <= total`).
    pub fits_as_configured: bool,
    /// Each replica's `pool_size` (single pool).
    pub pool_size: u32,
    /// Each replica's `max_overflow` (single pool).
    pub max_overflow: u32,
    /// Each replica's classes; empty for a single pool. Build `ClassPools` with
    /// `per_replica` as its total and these sizes.
    pub classes: Vec<ClassSlice>,
    /// What was cut and why, one sentence each.
    pub notes: Vec<String>,
}

/// Inputs no slice can satisfy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SliceError {
    /// Zero replicas.
    #[error("--replicas must be at least 1")]
    NoReplicas,
    /// Nothing left on the server.
    #[error(
        "the server has no connections left for this service (0 after reserved slots and other \
         clients); free connections or raise max_connections"
    )]
    NothingLeft,
    /// Fewer connections than replicas.
    #[error(
        "{total} connection(s) cannot be shared by {replicas} replicas: each needs at least one; \
         run fewer replicas or raise the limit"
    )]
    FewerThanReplicas {
        /// Connections there are.
        total: u32,
        /// Replicas asked for.
        replicas: u32,
    },
    /// The reserved floors do not fit one replica's slice.
    #[error(
        "the classes reserve {reserved} connection(s) per replica, but each of {replicas} \
         replicas gets only {per_replica} of the {total}: lower the reserved floors to \
         {per_replica} in all, run fewer replicas, or raise the limit"
    )]
    ReservedDoesNotFit {
        /// Sum of the floors.
        reserved: u32,
        /// One replica's slice.
        per_replica: u32,
        /// Replicas.
        replicas: u32,
        /// Connections there are.
        total: u32,
    },
    /// The configuration is not a valid budget on its own.
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// Slices `request.total` connections between `request.replicas` equal replicas. See the
/// [module documentation](self).
///
/// Without classes, a replica keeps `pool_size + max_overflow` when it fits its slice;
/// else `pool_size` is cut to the slice and `max_overflow` gets the rest. With classes, the
/// budget total is the slice (or the configured budget, if smaller); every reserved floor is
/// kept; the unreserved part of the `pool_size`s is scaled down in proportion when they do
/// not fit; each `max_overflow` is capped so `pool_size + max_overflow` stays within what
/// the other classes do not reserve.
///
/// # Errors
/// [`SliceError`] for zero replicas, no connections, fewer connections than replicas,
/// floors above one replica's slice, or classes that are not a valid budget.
pub fn slice(request: &SliceRequest) -> Result<Slice, SliceError> {
    let SliceRequest {
        total,
        replicas,
        pool_size,
        max_overflow,
        budget,
        ref classes,
    } = *request;
    if replicas == 0 {
        return Err(SliceError::NoReplicas);
    }
    if total == 0 {
        return Err(SliceError::NothingLeft);
    }
    if total < replicas {
        return Err(SliceError::FewerThanReplicas { total, replicas });
    }
    let share = (total / replicas).min(MAX_CONNECTIONS);
    let mut notes = Vec::new();
    if classes.is_empty() {
        let requested = pool_size.saturating_add(max_overflow);
        let (ps, mo) = if requested <= share {
            (pool_size, max_overflow)
        } else {
            let ps = pool_size.min(share);
            let mo = share - ps;
            notes.push(format!(
                "pool_size + max_overflow {pool_size} + {max_overflow} = {requested} per \
                 replica does not fit a slice of {share}: set DB_POOL_SIZE={ps} \
                 DB_MAX_OVERFLOW={mo} in each replica"
            ));
            (ps, mo)
        };
        let per_replica = ps + mo;
        return Ok(Slice {
            replicas,
            total,
            per_replica,
            unused: total - per_replica * replicas,
            requested_per_replica: requested,
            fits_as_configured: u64::from(requested) * u64::from(replicas) <= u64::from(total),
            pool_size: ps,
            max_overflow: mo,
            classes: Vec::new(),
            notes,
        });
    }

    let requested = budget.unwrap_or(share);
    let per_replica = requested.min(share);
    let reserved: u32 = classes
        .iter()
        .fold(0u32, |sum, c| sum.saturating_add(c.reserved));
    if reserved > per_replica {
        return Err(SliceError::ReservedDoesNotFit {
            reserved,
            per_replica,
            replicas,
            total,
        });
    }
    if per_replica < requested {
        notes.push(format!(
            "the budget of {requested} per replica does not fit a slice of {share}: build \
             ClassPools with a total of {per_replica} in each replica"
        ));
    }
    // The unreserved part of every pool_size, scaled to what the floors leave.
    let unreserved = per_replica - reserved;
    let wanted: Vec<u32> = classes
        .iter()
        .map(|c| c.pool_size.unwrap_or(c.reserved).saturating_sub(c.reserved))
        .collect();
    let wanted_sum: u64 = wanted.iter().map(|&w| u64::from(w)).sum();
    let scale = wanted_sum > u64::from(unreserved);
    let mut out = Vec::with_capacity(classes.len());
    for (class, want) in classes.iter().zip(wanted) {
        let extra = if scale {
            // Rounded down, so the sum never exceeds `unreserved`.
            u32::try_from(u64::from(want) * u64::from(unreserved) / wanted_sum).unwrap_or(0)
        } else {
            want
        };
        let others = reserved - class.reserved;
        let cap = per_replica - others;
        let ps = class.reserved.saturating_add(extra).min(cap);
        let room = cap - ps;
        let mo = class.max_overflow.map_or(room, |m| m.min(room));
        if class.pool_size.is_some_and(|p| p > ps) {
            notes.push(format!(
                "class {:?}: pool_size {} cut to {ps}",
                class.name,
                class.pool_size.unwrap_or(0)
            ));
        }
        if class.max_overflow.is_some_and(|m| m > mo) {
            notes.push(format!(
                "class {:?}: max_overflow {} cut to {mo}",
                class.name,
                class.max_overflow.unwrap_or(0)
            ));
        }
        out.push(ClassSlice {
            name: class.name.clone(),
            reserved: class.reserved,
            pool_size: ps,
            max_overflow: mo,
        });
    }
    // The slice must be a budget the pools accept: the same checks as `ClassPools::build`.
    let mut specs = ClassSpecs::new(per_replica);
    for c in &out {
        specs.push(
            c.name.clone(),
            Class::new()
                .reserved(c.reserved)
                .pool_size(c.pool_size)
                .max_overflow(c.max_overflow),
        );
    }
    specs.plan()?;
    Ok(Slice {
        replicas,
        total,
        per_replica,
        unused: total - per_replica * replicas,
        requested_per_replica: requested,
        fits_as_configured: u64::from(requested) * u64::from(replicas) <= u64::from(total),
        pool_size: 0,
        max_overflow: 0,
        classes: out,
        notes,
    })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn single(total: u32, replicas: u32, pool_size: u32, max_overflow: u32) -> Slice {
        slice(&SliceRequest {
            total,
            replicas,
            pool_size,
            max_overflow,
            budget: None,
            classes: Vec::new(),
        })
        .unwrap()
    }

    fn classes(total: u32, replicas: u32, budget: Option<u32>, c: Vec<ClassShare>) -> Slice {
        slice(&SliceRequest {
            total,
            replicas,
            pool_size: 10,
            max_overflow: 10,
            budget,
            classes: c,
        })
        .unwrap()
    }

    #[test]
    fn a_single_pool_that_fits_is_kept_as_configured() {
        let s = single(97, 3, 10, 10);
        assert!(s.fits_as_configured);
        assert_eq!((s.pool_size, s.max_overflow, s.per_replica), (10, 10, 20));
        assert_eq!(s.unused, 37);
        assert!(s.notes.is_empty());
    }

    #[test]
    fn a_single_pool_too_large_is_cut_to_its_slice() {
        let s = single(40, 3, 10, 10);
        assert!(!s.fits_as_configured);
        assert_eq!((s.pool_size, s.max_overflow, s.per_replica), (10, 3, 13));
        assert_eq!(s.unused, 1);
        let s = single(40, 4, 20, 5);
        assert_eq!((s.pool_size, s.max_overflow), (10, 0));
        assert!(
            s.notes[0].contains("DB_POOL_SIZE=10 DB_MAX_OVERFLOW=0"),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn reserved_floors_are_kept_and_the_rest_is_scaled() {
        let s = classes(
            57,
            3,
            Some(60),
            vec![
                ClassShare::new("automation").pool_size(50).max_overflow(5),
                ClassShare::new("adhoc").reserved(5),
            ],
        );
        assert_eq!(s.per_replica, 19);
        assert_eq!(s.requested_per_replica, 60);
        assert!(!s.fits_as_configured);
        let shape: Vec<_> = s
            .classes
            .iter()
            .map(|c| (c.name.as_str(), c.reserved, c.pool_size, c.max_overflow))
            .collect();
        assert_eq!(shape, [("automation", 0, 14, 0), ("adhoc", 5, 5, 14)]);
    }

    #[test]
    fn floors_that_take_the_whole_slice_are_kept_and_a_budget_too_large_is_noted() {
        // 20 per replica, all of it reserved: valid, nothing left to scale.
        let s = classes(
            40,
            2,
            None,
            vec![
                ClassShare::new("web").reserved(15),
                ClassShare::new("adhoc").reserved(5),
            ],
        );
        assert_eq!(s.per_replica, 20);
        let sizes: Vec<_> = s
            .classes
            .iter()
            .map(|c| (c.reserved, c.pool_size))
            .collect();
        assert_eq!(sizes, [(15, 15), (5, 5)]);
        assert!(s.notes.is_empty(), "{:?}", s.notes);
        // A budget of 30 per replica does not fit the slice of 20: said once.
        let s = classes(40, 2, Some(30), vec![ClassShare::new("web").pool_size(10)]);
        assert_eq!(s.per_replica, 20);
        assert!(
            s.notes
                .iter()
                .any(|n| n.contains("budget of 30 per replica does not fit")),
            "{:?}",
            s.notes
        );
        // A budget smaller than the slice is kept, and nothing is said of it.
        let s = classes(40, 2, Some(12), vec![ClassShare::new("web").pool_size(10)]);
        assert_eq!(s.per_replica, 12);
        assert!(
            !s.notes
                .iter()
                .any(|n| n.contains("does not fit") || n.contains("cut to")),
            "a pool_size that fits is not cut: {:?}",
            s.notes
        );
        // An overflow beyond what the slice leaves is cut, and said so.
        let s = classes(
            40,
            2,
            Some(12),
            vec![ClassShare::new("web").pool_size(10).max_overflow(5)],
        );
        assert_eq!((s.classes[0].pool_size, s.classes[0].max_overflow), (10, 2));
        assert!(
            s.notes
                .iter()
                .any(|n| n == "class \"web\": max_overflow 5 cut to 2"),
            "{:?}",
            s.notes
        );
    }

    #[test]
    fn two_unreserved_classes_share_in_proportion() {
        let s = classes(
            40,
            2,
            None,
            vec![
                ClassShare::new("web").pool_size(30),
                ClassShare::new("jobs").pool_size(10).max_overflow(2),
                ClassShare::new("adhoc").reserved(4),
            ],
        );
        assert_eq!(s.per_replica, 20);
        let sizes: Vec<_> = s
            .classes
            .iter()
            .map(|c| (c.pool_size, c.max_overflow))
            .collect();
        // 16 unreserved: 30/40 and 10/40 of it; overflow up to what the others leave.
        assert_eq!(sizes, [(12, 4), (4, 2), (4, 16)]);
        let pool_sizes: u32 = s.classes.iter().map(|c| c.pool_size).sum();
        assert!(pool_sizes <= s.per_replica);
    }

    #[test]
    fn a_budget_smaller_than_the_slice_is_kept() {
        let s = classes(100, 2, Some(20), vec![ClassShare::new("a").reserved(2)]);
        assert_eq!((s.per_replica, s.unused), (20, 60));
        assert!(s.fits_as_configured);
        assert_eq!(s.classes[0].max_overflow, 18);
    }

    #[test]
    fn impossible_inputs_say_why() {
        let req = |total, replicas, classes| SliceRequest {
            total,
            replicas,
            pool_size: 10,
            max_overflow: 10,
            budget: None,
            classes,
        };
        assert_eq!(slice(&req(10, 0, vec![])), Err(SliceError::NoReplicas));
        assert_eq!(slice(&req(0, 2, vec![])), Err(SliceError::NothingLeft));
        let e = slice(&req(3, 4, vec![])).unwrap_err();
        assert!(e
            .to_string()
            .contains("3 connection(s) cannot be shared by 4"));
        let e = slice(&req(20, 2, vec![ClassShare::new("a").reserved(11)])).unwrap_err();
        assert!(matches!(
            e,
            SliceError::ReservedDoesNotFit {
                reserved: 11,
                per_replica: 10,
                ..
            }
        ));
        let e = slice(&req(
            20,
            2,
            vec![ClassShare::new("a"), ClassShare::new("a")],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("declared twice"), "{e}");
        let e = slice(&req(
            u32::MAX,
            1,
            vec![ClassShare::new("a").reserved(u32::MAX)],
        ));
        assert!(e.is_err());
    }

    #[test]
    fn no_slice_ever_exceeds_the_total() {
        for total in 1..60 {
            for replicas in 1..=total.min(7) {
                for reserved in 0..4 {
                    let request = SliceRequest {
                        total,
                        replicas,
                        pool_size: 7,
                        max_overflow: 9,
                        budget: None,
                        classes: vec![
                            ClassShare::new("a").pool_size(25),
                            ClassShare::new("b").reserved(reserved).max_overflow(3),
                        ],
                    };
                    if let Ok(s) = slice(&request) {
                        assert!(s.per_replica * replicas + s.unused == total);
                        for c in &s.classes {
                            assert!(c.pool_size + c.max_overflow <= s.per_replica);
                        }
                    }
                    let single = slice(&SliceRequest {
                        classes: Vec::new(),
                        ..request
                    })
                    .unwrap();
                    assert!((single.pool_size + single.max_overflow) * replicas <= total);
                }
            }
        }
    }
}
