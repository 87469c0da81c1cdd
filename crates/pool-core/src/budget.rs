//! A connection budget shared by classes, each with a reserved floor and a cap.
//!
//! A managed database plan allows a fixed number of connections (say 60). Pools of different
//! kinds of work share it: background automation, web requests, people debugging at 3 a.m. A
//! [`Budget`] hands out [`Permit`]s — the right to hold one physical connection — so that
//! automation can never take the connections kept for people:
//!
//! ```
//! use std::time::Duration;
//! use pool_core::budget::Budget;
//!
//! let budget = Budget::builder(60)
//!     .class("automation", 0, 55) // reserved 0, max 55: may never take the last 5
//!     .class("adhoc", 5, 60)      // reserved 5: always available; may borrow idle headroom
//!     .build()?;
//! let automation = budget.class_id("automation").unwrap();
//! let adhoc = budget.class_id("adhoc").unwrap();
//!
//! let held: Vec<_> = (0..55).map(|_| budget.try_acquire(automation).unwrap()).collect();
//! assert!(budget.try_acquire(automation).is_none(), "automation is at its cap");
//! let admin = budget.acquire(adhoc, Duration::from_secs(1))?; // immediately: reserved
//! assert_eq!(budget.snapshot().in_use, 56);
//! drop((held, admin));
//! assert_eq!(budget.snapshot().free, 60);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The invariant
//!
//! Everything here maintains, under one lock, for the budget's `total` and each class `c`
//! with `in_use[c]` permits out, floor `reserved[c]` and cap `max[c]`:
//!
//! 1. `Σ in_use ≤ total` — connections opened through the budget never exceed the total;
//! 2. `in_use[c] ≤ max[c]`;
//! 3. `free ≥ Σ_c max(0, reserved[c] − in_use[c])`, where `free = total − Σ in_use` — the
//!    unused part of every reserved floor is always free, so **a class below its floor gets a
//!    permit at once, without waiting**.
//!
//! A permit goes to class `c` only if `in_use[c] < max[c]` and, after the grant, `free` still
//! covers the other classes' unused floors (`free − 1 ≥ Σ_{d≠c} deficit[d]`). That rule keeps
//! (3): if `c` was below its floor the grant lowers its own deficit by one along with `free`;
//! otherwise the rule is (3) itself. The builder rejects budgets where (3) could not hold at
//! the start (`Σ reserved > total`) and impossible caps.
//!
//! # Waiting, fairness, cancellation
//!
//! A request that cannot be granted joins one FIFO queue shared by every class and by the sync
//! ([`Budget::acquire`]) and async ([`Budget::acquire_async`]) paths. A released permit is
//! handed directly to the oldest waiter that may have it, under the lock, before anyone else can
//! take it; a newcomer is granted at once only when no queued waiter could be (so nobody barges).
//! A waiter that times out or whose future is dropped leaves under the same lock: if a permit had
//! been handed to it in the meantime, it is released again, so no permit is ever lost or given
//! twice. `RUSTFLAGS="--cfg loom" cargo test -p pool-core --release --lib budget` model-checks
//! these races.
//!
//! # Borrowed headroom comes back
//!
//! A class holding more than its floor is borrowing. When a waiter of another class is blocked,
//! [`Budget::reclaim_wanted`] tells each borrowing class how many permits to give back, and
//! [`Budget::wait_for_pressure`] wakes a holder's reclaim thread as soon as that happens. The
//! adapters close that many *idle* connections, which releases their permits to the waiters:
//! the first permit is back within milliseconds (the reclaim thread's wake-up plus closing a
//! connection; 2-6 ms measured by the r2d2 adapter's tests). Connections in use are
//! never taken away: a class that keeps its borrowed connections busy returns them when it
//! returns them to its pool.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use serde::Serialize;

use self::sync::{Arc, Mutex};

/// The lock the budget's state lives under: parking_lot normally, loom's when model-checking.
mod sync {
    #[cfg(loom)]
    pub(crate) use loom::sync::Arc;
    #[cfg(not(loom))]
    pub(crate) use std::sync::Arc;

    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T> {
        #[cfg(not(loom))]
        inner: parking_lot::Mutex<T>,
        #[cfg(loom)]
        inner: loom::sync::Mutex<T>,
    }

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Mutex<T> {
            Mutex {
                #[cfg(not(loom))]
                inner: parking_lot::Mutex::new(value),
                #[cfg(loom)]
                inner: loom::sync::Mutex::new(value),
            }
        }

        #[cfg(not(loom))]
        pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, T> {
            self.inner.lock()
        }

        #[cfg(loom)]
        pub(crate) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.inner.lock().unwrap()
        }
    }
}

/// A class of work sharing the budget, by position in the builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassId(usize);

impl ClassId {
    /// The class's position in the order the builder declared them.
    pub fn index(self) -> usize {
        self.0
    }
}

/// A class's floor and cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClassLimits {
    /// Permits only this class can take; always obtainable by it without waiting.
    pub reserved: u32,
    /// The most permits this class may hold at once.
    pub max: u32,
}

/// An impossible budget, rejected by [`BudgetBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// The total is zero.
    #[error("invalid budget: the total must be at least 1")]
    ZeroTotal,
    /// The total is above [`MAX_CONNECTIONS`](crate::config::MAX_CONNECTIONS).
    #[error(
        "invalid budget: a total of {total} connections is more than {max}, the most a budget \
         may allow (a server serves hundreds or a few thousand); set the total to the \
         connections the server grants this application, e.g. 60"
    )]
    TotalTooLarge {
        /// The total asked for.
        total: u32,
        /// The bound.
        max: u32,
    },
    /// No class was declared.
    #[error("invalid budget: declare at least one class")]
    NoClasses,
    /// A class has no name.
    #[error("invalid budget: class #{index} has an empty name")]
    EmptyName {
        /// The class's position.
        index: usize,
    },
    /// Two classes share a name.
    #[error("invalid budget: class {name:?} is declared twice")]
    DuplicateClass {
        /// The name.
        name: String,
    },
    /// A class's cap is zero.
    #[error("invalid budget: class {class:?} has max 0; it could never connect")]
    ZeroMax {
        /// The class.
        class: String,
    },
    /// A class reserves more than it may hold.
    #[error("invalid budget: class {class:?} reserves {reserved} but may hold at most {max}")]
    ReservedAboveMax {
        /// The class.
        class: String,
        /// Its floor.
        reserved: u32,
        /// Its cap.
        max: u32,
    },
    /// A class's cap exceeds the total.
    #[error("invalid budget: class {class:?} may hold {max}, more than the total of {total}")]
    MaxAboveTotal {
        /// The class.
        class: String,
        /// Its cap.
        max: u32,
        /// The budget's total.
        total: u32,
    },
    /// The floors add up to more than the total.
    #[error(
        "invalid budget: the classes reserve {reserved} in all, more than the total of {total}"
    )]
    ReservedAboveTotal {
        /// Sum of the floors.
        reserved: u32,
        /// The budget's total.
        total: u32,
    },
}

/// Builder of a [`Budget`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .build() is called"]
pub struct BudgetBuilder {
    total: u32,
    classes: Vec<(String, ClassLimits)>,
    /// Report permits in use as metrics (not for a pool's checkout gate).
    metrics: bool,
}

impl BudgetBuilder {
    /// Declares a class with its floor (`reserved`) and cap (`max`).
    pub fn class(mut self, name: impl Into<String>, reserved: u32, max: u32) -> Self {
        self.classes
            .push((name.into(), ClassLimits { reserved, max }));
        self
    }

    /// No `resilient_diesel.budget.in_use` gauges: for a queue that is no connection budget
    /// (a pool's checkout gate).
    pub(crate) fn without_metrics(mut self) -> Self {
        self.metrics = false;
        self
    }

    /// Checks the budget and builds it.
    pub fn build(self) -> Result<Budget, BudgetError> {
        let total = self.total;
        if total == 0 {
            return Err(BudgetError::ZeroTotal);
        }
        if total > crate::config::MAX_CONNECTIONS {
            return Err(BudgetError::TotalTooLarge {
                total,
                max: crate::config::MAX_CONNECTIONS,
            });
        }
        if self.classes.is_empty() {
            return Err(BudgetError::NoClasses);
        }
        let mut reserved_sum: u64 = 0;
        for (index, (name, limits)) in self.classes.iter().enumerate() {
            if name.trim().is_empty() {
                return Err(BudgetError::EmptyName { index });
            }
            if self.classes[..index].iter().any(|(n, _)| n == name) {
                return Err(BudgetError::DuplicateClass { name: name.clone() });
            }
            if limits.max == 0 {
                return Err(BudgetError::ZeroMax {
                    class: name.clone(),
                });
            }
            if limits.reserved > limits.max {
                return Err(BudgetError::ReservedAboveMax {
                    class: name.clone(),
                    reserved: limits.reserved,
                    max: limits.max,
                });
            }
            if limits.max > total {
                return Err(BudgetError::MaxAboveTotal {
                    class: name.clone(),
                    max: limits.max,
                    total,
                });
            }
            reserved_sum += u64::from(limits.reserved);
        }
        if reserved_sum > u64::from(total) {
            return Err(BudgetError::ReservedAboveTotal {
                reserved: u32::try_from(reserved_sum).unwrap_or(u32::MAX),
                total,
            });
        }
        let n = self.classes.len();
        Ok(Budget {
            inner: Arc::new(Inner {
                total,
                metrics: if self.metrics {
                    crate::metrics::BudgetMetrics::register(
                        &self
                            .classes
                            .iter()
                            .map(|(n, _)| n.clone())
                            .collect::<Vec<_>>(),
                    )
                } else {
                    crate::metrics::BudgetMetrics::default()
                },
                names: self.classes.iter().map(|(n, _)| n.clone()).collect(),
                limits: self.classes.iter().map(|(_, l)| *l).collect(),
                state: Mutex::new(State {
                    in_use: vec![0; n],
                    returning: vec![0; n],
                    queue: VecDeque::new(),
                    granted: Vec::new(),
                    next_ticket: 0,
                    acquired: vec![0; n],
                    timeouts: vec![0; n],
                }),
                #[cfg(not(loom))]
                pressure: parking_lot::Condvar::new(),
                #[cfg(not(loom))]
                pressure_lock: parking_lot::Mutex::new(Vec::new()),
            }),
        })
    }
}

/// How a queued waiter is woken when a permit is handed to it.
enum Wake {
    Nobody,
    #[cfg(not(loom))]
    Thread(std::thread::Thread),
    Task(Waker),
}

impl Wake {
    fn wake(self) {
        match self {
            Wake::Nobody => {}
            #[cfg(not(loom))]
            Wake::Thread(t) => t.unpark(),
            Wake::Task(w) => w.wake(),
        }
    }
}

struct Waiter {
    ticket: u64,
    class: usize,
    wake: Wake,
}

/// Everything that changes, under one lock.
struct State {
    in_use: Vec<u32>,
    /// Of `in_use`, the permits on their way back (see [`Permit::set_returning`]).
    returning: Vec<u32>,
    queue: VecDeque<Waiter>,
    /// Tickets a permit was handed to, not yet collected by their waiter.
    granted: Vec<u64>,
    next_ticket: u64,
    acquired: Vec<u64>,
    timeouts: Vec<u64>,
}

struct Inner {
    total: u32,
    names: Vec<String>,
    /// `resilient_diesel.budget.in_use` per class (see [`crate::metrics`]).
    metrics: crate::metrics::BudgetMetrics,
    limits: Vec<ClassLimits>,
    state: Mutex<State>,
    #[cfg(not(loom))]
    pressure: parking_lot::Condvar,
    /// Also holds the wakers of [`Pressure`] futures, woken with the condvar.
    #[cfg(not(loom))]
    pressure_lock: parking_lot::Mutex<Vec<Waker>>,
}

impl Inner {
    fn in_use_total(&self, st: &State) -> u32 {
        st.in_use.iter().sum()
    }

    fn deficit(&self, st: &State, class: usize) -> u32 {
        self.limits[class].reserved.saturating_sub(st.in_use[class])
    }

    /// The grant rule (see the module documentation).
    fn may_grant(&self, st: &State, class: usize) -> bool {
        let used = self.in_use_total(st);
        if st.in_use[class] >= self.limits[class].max || used >= self.total {
            return false;
        }
        let others: u32 = (0..self.limits.len())
            .filter(|d| *d != class)
            .map(|d| self.deficit(st, d))
            .sum();
        // After the grant, `free - 1` must still cover the others: `free - 1 >= others`.
        self.total - used > others
    }

    fn grant(&self, st: &mut State, class: usize) {
        st.in_use[class] += 1;
        st.acquired[class] += 1;
    }

    /// Hands free permits to the oldest waiters that may have them; returns whom to wake.
    fn dispatch(&self, st: &mut State) -> Vec<Wake> {
        let mut woken = Vec::new();
        let mut i = 0;
        while i < st.queue.len() {
            let class = st.queue[i].class;
            if self.may_grant(st, class) {
                self.grant(st, class);
                let waiter = st.queue.remove(i).expect("index in range");
                st.granted.push(waiter.ticket);
                woken.push(waiter.wake);
            } else {
                i += 1;
            }
        }
        woken
    }

    fn release(&self, class: usize, returning: bool) {
        let (woken, still_waiting) = {
            let mut st = self.state.lock();
            debug_assert!(st.in_use[class] > 0, "released a permit never granted");
            st.in_use[class] = st.in_use[class].saturating_sub(1);
            if returning {
                st.returning[class] = st.returning[class].saturating_sub(1);
            }
            let woken = self.dispatch(&mut st);
            (woken, returning && !st.queue.is_empty())
        };
        woken.into_iter().for_each(Wake::wake);
        if still_waiting {
            // It was counted as coming for those still waiting: the holders of borrowed
            // headroom look again.
            self.notify_pressure();
        }
    }

    fn take_grant(st: &mut State, ticket: u64) -> bool {
        match st.granted.iter().position(|t| *t == ticket) {
            Some(i) => {
                st.granted.swap_remove(i);
                true
            }
            None => false,
        }
    }

    fn reclaim_wanted(&self, st: &State, class: usize) -> u32 {
        let held = st.in_use[class].saturating_sub(st.returning[class]);
        let borrowed = held.saturating_sub(self.limits[class].reserved);
        let blocked = st
            .queue
            .iter()
            .filter(|w| w.class != class && st.in_use[w.class] < self.limits[w.class].max)
            .count();
        // Permits on their way back serve blocked waiters without another close.
        let coming: u32 = st.returning.iter().sum();
        borrowed.min(
            u32::try_from(blocked)
                .unwrap_or(u32::MAX)
                .saturating_sub(coming),
        )
    }

    fn waiters(st: &State, class: usize) -> u32 {
        let n = st.queue.iter().filter(|w| w.class == class).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn notify_pressure(&self) {
        #[cfg(not(loom))]
        {
            let mut wakers = self.pressure_lock.lock();
            self.pressure.notify_all();
            let wakers = std::mem::take(&mut *wakers);
            wakers.into_iter().for_each(Waker::wake);
        }
    }
}

/// A connection budget shared by classes. Cheap to clone; clones share the budget.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// The right to hold one connection; released when dropped.
#[must_use = "dropping a permit releases it at once"]
pub struct Permit {
    budget: Budget,
    class: usize,
    returning: bool,
}

impl Permit {
    /// The class the permit was granted to.
    pub fn class(&self) -> ClassId {
        ClassId(self.class)
    }

    /// Marks the permit as on its way back: its connection is closing and waits for the
    /// server to let the session go. It is still in use (the server may still count the
    /// session), but [`Budget::reclaim_wanted`] no longer counts it as headroom its class
    /// holds, and counts it as coming for a blocked waiter: a borrowing class is not asked
    /// to close another connection for a permit already on its way.
    pub fn set_returning(&mut self) {
        if !std::mem::replace(&mut self.returning, true) {
            self.budget.inner.state.lock().returning[self.class] += 1;
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("class", &self.budget.inner.names[self.class])
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.budget.inner.metrics.released(self.class);
        self.budget.inner.release(self.class, self.returning);
    }
}

/// Why a permit could not be had.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AcquireError {
    /// The wait ran out. Carries the budget's state at that moment.
    #[error("budget: class {class:?} waited {waited:?} for a connection permit and got none; {snapshot}")]
    Timeout {
        /// The class that waited.
        class: String,
        /// How long it waited.
        waited: Duration,
        /// The budget when it gave up.
        snapshot: BudgetSnapshot,
    },
    /// The caller stopped wanting the permit while it waited
    /// ([`Budget::acquire_while`]).
    #[error("budget: class {class:?} stopped waiting for a permit: nobody wants the connection any more")]
    Abandoned {
        /// The class that waited.
        class: String,
    },
}

/// What [`Budget::collect`] found.
enum Collected {
    Permit(Permit),
    Waiting,
    Left,
}

/// Result of trying to get a permit without waiting.
enum Entry {
    Granted,
    Queued(u64),
}

impl Budget {
    /// Starts a budget of `total` connections.
    pub fn builder(total: u32) -> BudgetBuilder {
        BudgetBuilder {
            total,
            classes: Vec::new(),
            metrics: true,
        }
    }

    /// The total number of connections.
    pub fn total(&self) -> u32 {
        self.inner.total
    }

    /// The class called `name`.
    pub fn class_id(&self, name: &str) -> Option<ClassId> {
        self.inner.names.iter().position(|n| n == name).map(ClassId)
    }

    /// Every class, in declaration order.
    pub fn classes(&self) -> impl Iterator<Item = ClassId> {
        (0..self.inner.names.len()).map(ClassId)
    }

    /// A class's name.
    pub fn class_name(&self, class: ClassId) -> &str {
        &self.inner.names[class.0]
    }

    /// A class's floor and cap.
    pub fn limits(&self, class: ClassId) -> ClassLimits {
        self.inner.limits[class.0]
    }

    fn permit(&self, class: usize) -> Permit {
        self.inner.metrics.acquired(class);
        Permit {
            budget: self.clone(),
            class,
            returning: false,
        }
    }

    /// Grants at once if allowed and nobody queued could be served first; else queues with
    /// `wake` and returns the ticket.
    fn enter(&self, class: usize, wake: impl FnOnce() -> Wake, queue: bool) -> Option<Entry> {
        let inner = &*self.inner;
        let mut st = inner.state.lock();
        // No queued waiter is ever grantable once the lock is released (every change runs
        // `dispatch`), so granting here never passes someone who could have been served.
        if inner.may_grant(&st, class) {
            inner.grant(&mut st, class);
            return Some(Entry::Granted);
        }
        if !queue {
            return None;
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(Waiter {
            ticket,
            class,
            wake: wake(),
        });
        drop(st);
        inner.notify_pressure();
        Some(Entry::Queued(ticket))
    }

    /// A permit for `class` if one can be had right now, without waiting.
    pub fn try_acquire(&self, class: ClassId) -> Option<Permit> {
        match self.enter(class.0, || Wake::Nobody, false) {
            Some(Entry::Granted) => Some(self.permit(class.0)),
            _ => None,
        }
    }

    /// Waits up to `timeout` for a permit for `class`, blocking the thread.
    #[cfg(not(loom))]
    pub fn acquire(&self, class: ClassId, timeout: Duration) -> Result<Permit, AcquireError> {
        self.acquire_while(class, timeout, &|| true)
    }

    /// Like [`Budget::acquire`], but gives up as soon as `still_wanted()` is false (checked
    /// whenever the thread wakes: unpark it after making it false) with
    /// [`AcquireError::Abandoned`]. A connect started for a checkout that has since given up
    /// leaves the queue this way instead of waiting, and looking like demand, for a permit
    /// nobody wants.
    #[cfg(not(loom))]
    pub fn acquire_while(
        &self,
        class: ClassId,
        timeout: Duration,
        still_wanted: &dyn Fn() -> bool,
    ) -> Result<Permit, AcquireError> {
        let started = std::time::Instant::now();
        // At most 365 days: a longer wait never overflows the clock.
        let deadline = started + timeout.min(crate::config::MAX_DURATION);
        let ticket = match self.enter(class.0, || Wake::Thread(std::thread::current()), true) {
            Some(Entry::Granted) => return Ok(self.permit(class.0)),
            Some(Entry::Queued(ticket)) => ticket,
            None => unreachable!("queueing was asked for"),
        };
        loop {
            let timed_out = std::time::Instant::now() >= deadline;
            let abandoned = !timed_out && !still_wanted();
            match self.collect(class.0, ticket, timed_out || abandoned) {
                Collected::Permit(permit) => return Ok(permit),
                Collected::Left if abandoned => {
                    return Err(AcquireError::Abandoned {
                        class: self.inner.names[class.0].clone(),
                    })
                }
                Collected::Left => {
                    return Err(AcquireError::Timeout {
                        class: self.inner.names[class.0].clone(),
                        waited: started.elapsed(),
                        snapshot: self.snapshot(),
                    })
                }
                Collected::Waiting => std::thread::park_timeout(
                    deadline.saturating_duration_since(std::time::Instant::now()),
                ),
            }
        }
    }

    /// One look at a queued request, under the lock: its permit if one was handed to it;
    /// otherwise, if `give_up`, it leaves the queue (counted as a timeout). The core of the
    /// blocking path, model-checked with loom.
    fn collect(&self, class: usize, ticket: u64, give_up: bool) -> Collected {
        let mut st = self.inner.state.lock();
        if Inner::take_grant(&mut st, ticket) {
            drop(st);
            return Collected::Permit(self.permit(class));
        }
        if !give_up {
            return Collected::Waiting;
        }
        // Still queued (the grant check above ran under this same lock).
        if let Some(i) = st.queue.iter().position(|w| w.ticket == ticket) {
            st.queue.remove(i);
        }
        st.timeouts[class] += 1;
        Collected::Left
    }

    /// A future resolving to a permit for `class`; runtime-agnostic. Wrap it in the runtime's
    /// timeout (`tokio::time::timeout`) — dropping it at any point, even right after a permit
    /// was handed to it, never loses or duplicates a permit. Call
    /// [`Budget::record_timeout`] when giving up so the class's timeout count stays right.
    pub fn acquire_async(&self, class: ClassId) -> Acquire {
        Acquire {
            budget: self.clone(),
            class: class.0,
            ticket: None,
            done: false,
        }
    }

    /// Counts a timed-out wait of `class` (for the async path, where the caller owns the
    /// timeout).
    pub fn record_timeout(&self, class: ClassId) {
        self.inner.state.lock().timeouts[class.0] += 1;
    }

    /// Counts a timed-out wait of `class` that lasted `waited` and returns its error (for the
    /// async path, where the caller owns the timeout).
    pub fn timed_out(&self, class: ClassId, waited: Duration) -> AcquireError {
        self.record_timeout(class);
        AcquireError::Timeout {
            class: self.class_name(class).to_owned(),
            waited,
            snapshot: self.snapshot(),
        }
    }

    /// How many permits `class` should give back now: as many as waiters of other classes
    /// are blocked on the budget, up to what `class` holds above its floor.
    pub fn reclaim_wanted(&self, class: ClassId) -> u32 {
        let st = self.inner.state.lock();
        self.inner.reclaim_wanted(&st, class.0)
    }

    /// Blocks until [`reclaim_wanted`](Self::reclaim_wanted) for `class` is above zero, or
    /// `timeout` passes; returns it. Woken by every waiter that queues — no polling.
    #[cfg(not(loom))]
    pub fn wait_for_pressure(&self, class: ClassId, timeout: Duration) -> u32 {
        let deadline = std::time::Instant::now() + timeout.min(crate::config::MAX_DURATION);
        let mut guard = self.inner.pressure_lock.lock();
        loop {
            let wanted = self.reclaim_wanted(class);
            if wanted > 0 {
                return wanted;
            }
            if self
                .inner
                .pressure
                .wait_until(&mut guard, deadline)
                .timed_out()
            {
                return self.reclaim_wanted(class);
            }
        }
    }

    /// The async form of [`Budget::wait_for_pressure`], runtime-agnostic: resolves to
    /// [`reclaim_wanted`](Self::reclaim_wanted) for `class` once it is above zero. Woken by
    /// every waiter that queues — no polling. Wrap it in the runtime's timeout.
    #[cfg(not(loom))]
    pub fn pressure_async(&self, class: ClassId) -> Pressure {
        Pressure {
            budget: self.clone(),
            class,
        }
    }

    /// Requests of `class` waiting for a permit now.
    pub fn waiters(&self, class: ClassId) -> u32 {
        let st = self.inner.state.lock();
        Inner::waiters(&st, class.0)
    }

    /// The budget's state now.
    pub fn snapshot(&self) -> BudgetSnapshot {
        let inner = &*self.inner;
        let st = inner.state.lock();
        let in_use = inner.in_use_total(&st);
        let deficits: u32 = (0..inner.limits.len()).map(|c| inner.deficit(&st, c)).sum();
        let free = inner.total - in_use;
        BudgetSnapshot {
            total: inner.total,
            in_use,
            free,
            healthy: free >= deficits,
            classes: (0..inner.limits.len())
                .map(|c| ClassSnapshot {
                    name: inner.names[c].clone(),
                    reserved: inner.limits[c].reserved,
                    max: inner.limits[c].max,
                    in_use: st.in_use[c],
                    waiters: Inner::waiters(&st, c),
                    acquired: st.acquired[c],
                    timeouts: st.timeouts[c],
                    reclaim_wanted: inner.reclaim_wanted(&st, c),
                })
                .collect(),
        }
    }

    /// Whether every class's unused floor is free right now (the invariant; false would be
    /// a bug).
    pub fn is_healthy(&self) -> bool {
        self.snapshot().healthy
    }
}

/// The future of [`Budget::acquire_async`].
#[must_use = "futures do nothing unless polled"]
pub struct Acquire {
    budget: Budget,
    class: usize,
    ticket: Option<u64>,
    done: bool,
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acquire")
            .field("class", &self.budget.inner.names[self.class])
            .field("queued", &self.ticket.is_some())
            .finish()
    }
}

impl Future for Acquire {
    type Output = Permit;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Permit> {
        let this = self.get_mut();
        assert!(!this.done, "Acquire polled after completion");
        let Some(ticket) = this.ticket else {
            let waker = cx.waker().clone();
            return match this.budget.enter(this.class, || Wake::Task(waker), true) {
                Some(Entry::Granted) => {
                    this.done = true;
                    Poll::Ready(this.budget.permit(this.class))
                }
                Some(Entry::Queued(ticket)) => {
                    this.ticket = Some(ticket);
                    Poll::Pending
                }
                None => unreachable!("queueing was asked for"),
            };
        };
        let mut st = this.budget.inner.state.lock();
        if Inner::take_grant(&mut st, ticket) {
            drop(st);
            this.done = true;
            return Poll::Ready(this.budget.permit(this.class));
        }
        if let Some(w) = st.queue.iter_mut().find(|w| w.ticket == ticket) {
            match &w.wake {
                Wake::Task(old) if old.will_wake(cx.waker()) => {}
                _ => w.wake = Wake::Task(cx.waker().clone()),
            }
        }
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(ticket) = self.ticket {
            let mut st = self.budget.inner.state.lock();
            if let Some(i) = st.queue.iter().position(|w| w.ticket == ticket) {
                st.queue.remove(i);
            } else if Inner::take_grant(&mut st, ticket) {
                // Handed a permit but dropped before collecting it: give it back.
                drop(st);
                self.budget.inner.release(self.class, false);
            }
        }
    }
}

/// The future of [`Budget::pressure_async`].
#[cfg(not(loom))]
#[must_use = "futures do nothing unless polled"]
pub struct Pressure {
    budget: Budget,
    class: ClassId,
}

#[cfg(not(loom))]
impl fmt::Debug for Pressure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pressure")
            .field("class", &self.budget.inner.names[self.class.0])
            .finish()
    }
}

#[cfg(not(loom))]
impl Future for Pressure {
    type Output = u32;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<u32> {
        let this = self.get_mut();
        // Checked under the wakers' lock, as `wait_for_pressure` does: a waiter that queues
        // after the check notifies after the waker is registered.
        let mut wakers = this.budget.inner.pressure_lock.lock();
        let wanted = this.budget.reclaim_wanted(this.class);
        if wanted > 0 {
            return Poll::Ready(wanted);
        }
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// One class in a [`BudgetSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ClassSnapshot {
    /// The class's name.
    pub name: String,
    /// Its floor.
    pub reserved: u32,
    /// Its cap.
    pub max: u32,
    /// Permits it holds.
    pub in_use: u32,
    /// Requests of this class waiting now.
    pub waiters: u32,
    /// Permits granted since the start.
    pub acquired: u64,
    /// Waits that ran out.
    pub timeouts: u64,
    /// Permits it should give back now (see [`Budget::reclaim_wanted`]).
    pub reclaim_wanted: u32,
}

/// A budget's state at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BudgetSnapshot {
    /// The total.
    pub total: u32,
    /// Permits out, all classes.
    pub in_use: u32,
    /// `total - in_use`.
    pub free: u32,
    /// Every class's unused floor is free (the invariant holds).
    pub healthy: bool,
    /// Per class.
    pub classes: Vec<ClassSnapshot>,
}

impl fmt::Display for BudgetSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "budget {}/{} in use, {} free",
            self.in_use, self.total, self.free
        )?;
        for c in &self.classes {
            write!(
                f,
                "; {}: {}/{} in use (reserved {}), {} waiting",
                c.name, c.in_use, c.max, c.reserved, c.waiters
            )?;
        }
        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::Waker;

    fn field_report() -> Budget {
        Budget::builder(60)
            .class("automation", 0, 55)
            .class("adhoc", 5, 60)
            .build()
            .unwrap()
    }

    fn ids(b: &Budget) -> (ClassId, ClassId) {
        (
            b.class_id("automation").unwrap(),
            b.class_id("adhoc").unwrap(),
        )
    }

    /// Checks the three invariants of the module documentation on a snapshot.
    fn check(s: &BudgetSnapshot) {
        let sum: u32 = s.classes.iter().map(|c| c.in_use).sum();
        assert_eq!(sum, s.in_use);
        assert!(s.in_use <= s.total, "{s}");
        for c in &s.classes {
            assert!(c.in_use <= c.max, "{s}");
        }
        let deficits: u32 = s
            .classes
            .iter()
            .map(|c| c.reserved.saturating_sub(c.in_use))
            .sum();
        assert!(s.free >= deficits, "reserved floors not free: {s}");
        assert!(s.healthy);
    }

    #[test]
    fn impossible_budgets_are_rejected_with_the_numbers() {
        let cases: Vec<(BudgetBuilder, &str)> = vec![
            (Budget::builder(0).class("a", 0, 1), "total"),
            (
                Budget::builder(u32::MAX).class("a", 0, 1),
                "more than 10000",
            ),
            (Budget::builder(10), "at least one class"),
            (Budget::builder(10).class(" ", 0, 1), "empty name"),
            (
                Budget::builder(10).class("a", 0, 5).class("a", 0, 5),
                "declared twice",
            ),
            (Budget::builder(10).class("a", 0, 0), "max 0"),
            (Budget::builder(10).class("a", 6, 5), "reserves 6"),
            (
                Budget::builder(10).class("a", 0, 11),
                "more than the total of 10",
            ),
            (
                Budget::builder(10).class("a", 6, 10).class("b", 5, 10),
                "reserve 11 in all",
            ),
        ];
        for (builder, needle) in cases {
            let err = builder.build().unwrap_err();
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
        }
    }

    #[test]
    fn a_saturated_class_never_takes_the_reserved_floor() {
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        // Bounded: a budget that grants past its cap must fail here, not fill the memory.
        let held: Vec<_> = std::iter::from_fn(|| b.try_acquire(auto))
            .take(1000)
            .collect();
        assert_eq!(held.len(), 55, "automation stops at its cap");
        // Automation waiters pile up...
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || b.acquire(auto, Duration::from_millis(300)))
            })
            .collect();
        // ...and adhoc still gets all five of its floor at once.
        let admin: Vec<_> = (0..5).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        check(&b.snapshot());
        assert!(b.try_acquire(adhoc).is_none(), "nothing left to borrow");
        for w in waiters {
            let err = w.join().unwrap().unwrap_err();
            let text = err.to_string();
            assert!(text.contains("\"automation\""), "{text}");
            assert!(text.contains("automation: 55/55 in use"), "{text}");
            assert!(text.contains("adhoc: 5/60 in use (reserved 5)"), "{text}");
        }
        assert_eq!(b.snapshot().classes[0].timeouts, 4);
        drop((held, admin));
        assert_eq!(b.snapshot().free, 60);
    }

    #[test]
    fn a_released_permit_goes_to_the_oldest_waiter_not_to_a_newcomer() {
        let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
        let a = b.class_id("a").unwrap();
        let held = b.try_acquire(a).unwrap();
        let waiting = AtomicBool::new(false);
        std::thread::scope(|s| {
            let w = s.spawn(|| {
                waiting.store(true, Ordering::SeqCst);
                b.acquire(a, Duration::from_secs(5))
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while b.snapshot().classes[0].waiters == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the waiter never showed up in the snapshot"
                );
                std::thread::yield_now();
            }
            drop(held);
            // The permit was handed over under the lock: a newcomer cannot take it.
            assert!(b.try_acquire(a).is_none());
            let permit = w.join().unwrap().unwrap();
            assert_eq!(permit.class(), a);
        });
        assert_eq!(b.snapshot().free, 1);
    }

    /// A budget of 3: `auto` (no floor, up to 3) and `adhoc` (a floor of 1, up to 3).
    fn auto_and_adhoc_of_3() -> (Budget, ClassId, ClassId) {
        let b = Budget::builder(3)
            .class("auto", 0, 3)
            .class("adhoc", 1, 3)
            .build()
            .unwrap();
        let (auto, adhoc) = (b.class_id("auto").unwrap(), b.class_id("adhoc").unwrap());
        (b, auto, adhoc)
    }

    /// A permit on its way back (its connection closing, waiting for the server) counts as
    /// coming for a blocked waiter: the borrowing class is not asked to close another
    /// connection for it.
    #[test]
    fn a_permit_on_its_way_back_is_not_asked_for_twice() {
        let (b, auto, adhoc) = auto_and_adhoc_of_3();
        let mut borrowed: Vec<_> = (0..3).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        std::thread::scope(|s| {
            let first = s.spawn(|| b.acquire(auto, Duration::from_secs(5)));
            assert_eq!(b.wait_for_pressure(adhoc, Duration::from_secs(5)), 1);
            borrowed[0].set_returning();
            borrowed[0].set_returning();
            assert_eq!(
                b.reclaim_wanted(adhoc),
                0,
                "the permit coming back serves the waiter: nothing more to give back"
            );
            assert_eq!(b.snapshot().in_use, 3, "still in use until it is back");
            let second = s.spawn(|| b.acquire(auto, Duration::from_secs(5)));
            while b.waiters(auto) < 2 {
                std::thread::yield_now();
            }
            assert_eq!(
                b.reclaim_wanted(adhoc),
                1,
                "one more waiter: one more to give back"
            );
            drop(borrowed.remove(0));
            let _one = first.join().unwrap().unwrap();
            assert_eq!(b.reclaim_wanted(adhoc), 1, "the second still waits");
            borrowed.pop();
            let _two = second.join().unwrap().unwrap();
        });
        assert_eq!(b.reclaim_wanted(adhoc), 0);
        drop(borrowed);
        check(&b.snapshot());

        // A returning permit is no headroom its class could give back: with it gone, the
        // class is at its floor.
        let (b, auto, adhoc) = auto_and_adhoc_of_3();
        let auto_held = b.try_acquire(auto).unwrap();
        let mut two: Vec<_> = (0..2).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..2)
                .map(|_| s.spawn(|| b.acquire(auto, Duration::from_secs(5))))
                .collect();
            while b.waiters(auto) < 2 {
                std::thread::yield_now();
            }
            assert_eq!(b.reclaim_wanted(adhoc), 1);
            two[1].set_returning();
            assert_eq!(
                b.reclaim_wanted(adhoc),
                0,
                "the other permit is the class's floor: nothing more to give back"
            );
            two.clear();
            // Adhoc's floor stays free: the waiters fit once automation's own permit is back.
            drop(auto_held);
            for w in waiters {
                let _permit = w.join().unwrap().unwrap();
            }
        });
    }

    /// A permit that was counted as coming for a blocked waiter but went to another waiter
    /// (of its own class, queued first) wakes the holders of borrowed headroom at once: the
    /// blocked waiter needs another permit given back, and nobody queues anew to say so.
    #[test]
    fn a_returning_permit_that_went_elsewhere_wakes_the_lenders() {
        let (b, auto, adhoc) = auto_and_adhoc_of_3();
        let mut borrowed: Vec<_> = (0..3).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        borrowed[0].set_returning();
        std::thread::scope(|s| {
            let own = s.spawn(|| b.acquire(adhoc, Duration::from_secs(5)));
            while b.waiters(adhoc) < 1 {
                std::thread::yield_now();
            }
            let blocked = s.spawn(|| b.acquire(auto, Duration::from_secs(5)));
            while b.waiters(auto) < 1 {
                std::thread::yield_now();
            }
            assert_eq!(
                b.reclaim_wanted(adhoc),
                0,
                "the returning permit is counted as coming"
            );
            let lender = s.spawn(|| {
                let started = std::time::Instant::now();
                (
                    b.wait_for_pressure(adhoc, Duration::from_secs(5)),
                    started.elapsed(),
                )
            });
            std::thread::sleep(Duration::from_millis(50));
            drop(borrowed.remove(0));
            let _own = own.join().unwrap().unwrap();
            let (wanted, took) = lender.join().unwrap();
            assert_eq!(
                wanted, 1,
                "the blocked waiter still needs a permit given back"
            );
            assert!(
                took < Duration::from_secs(4),
                "the lender was not woken when the permit went elsewhere ({took:?})"
            );
            borrowed.pop();
            let _blocked = blocked.join().unwrap().unwrap();
        });
        drop(borrowed);
        check(&b.snapshot());
    }

    #[test]
    fn borrowing_classes_are_asked_to_give_headroom_back() {
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        let auto_held: Vec<_> = (0..35).map(|_| b.try_acquire(auto).unwrap()).collect();
        let mut borrowed: Vec<_> = (0..25).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        assert_eq!(b.reclaim_wanted(adhoc), 0, "nobody is waiting");
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.acquire(auto, Duration::from_secs(5)));
            let wanted = b.wait_for_pressure(adhoc, Duration::from_secs(5));
            assert_eq!(wanted, 1);
            assert_eq!(b.reclaim_wanted(auto), 0, "automation borrows nothing");
            borrowed.pop();
            let _permit = waiter.join().unwrap().unwrap();
        });
        assert_eq!(b.reclaim_wanted(adhoc), 0);
        drop((auto_held, borrowed));
        check(&b.snapshot());
    }

    #[test]
    fn the_async_pressure_future_is_woken_by_a_waiter_of_another_class() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        let _auto_held: Vec<_> = (0..35).map(|_| b.try_acquire(auto).unwrap()).collect();
        let mut borrowed: Vec<_> = (0..25).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        let flag = std::sync::Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut pressure = std::pin::pin!(b.pressure_async(adhoc));
        assert_eq!(
            pressure.as_mut().poll(&mut cx),
            Poll::Pending,
            "nobody waits"
        );
        assert_eq!(
            pressure.as_mut().poll(&mut cx),
            Poll::Pending,
            "registered once"
        );
        let mut waiter = std::pin::pin!(b.acquire_async(auto));
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_pending());
        assert!(
            flag.0.load(Ordering::SeqCst),
            "queueing woke the pressure future"
        );
        assert_eq!(pressure.as_mut().poll(&mut cx), Poll::Ready(1));
        borrowed.pop();
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready());
    }

    #[test]
    fn a_dropped_future_gives_back_a_permit_handed_to_it() {
        let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
        let a = b.class_id("a").unwrap();
        let held = b.try_acquire(a).unwrap();
        let mut fut = Box::pin(b.acquire_async(a));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        drop(held); // handed to the future...
        assert_eq!(b.snapshot().free, 0);
        drop(fut); // ...which is dropped before collecting it
        assert_eq!(b.snapshot().free, 1);
        assert!(b.try_acquire(a).is_some());
    }

    #[test]
    fn stress_sync_waiters_with_timeouts_keep_the_invariant() {
        let b = Budget::builder(6)
            .class("a", 0, 5)
            .class("b", 2, 6)
            .class("c", 1, 3)
            .build()
            .unwrap();
        // Plain threads and a deadline, not a scope: a budget broken into never answering
        // must fail this test, not hang it.
        let b = std::sync::Arc::new(b);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let checker = {
            let (b, stop) = (b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    check(&b.snapshot());
                    n += 1;
                }
                n
            })
        };
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..3000u32 {
                        let class = ClassId(((i + t) % 3) as usize);
                        if rand::random_bool(0.5) {
                            let wait = Duration::from_micros(rand::random_range(0..200));
                            if let Ok(p) = b.acquire(class, wait) {
                                held.push(p);
                            }
                        } else if let Some(p) = b.try_acquire(class) {
                            held.push(p);
                        }
                        if held.len() > 2 || rand::random_bool(0.3) {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !workers.iter().all(|w| w.is_finished()) {
            if std::time::Instant::now() >= deadline {
                stop.store(true, Ordering::Relaxed);
                panic!(
                    "a worker is stuck in the budget (3000 short acquires each take well under \
                     a second)"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for worker in joined {
            worker.expect("a worker panicked (see above)");
        }
        assert!(checker.join().unwrap() > 0);
        let s = b.snapshot();
        assert_eq!(s.free, 6, "{s}");
        assert!(s.classes.iter().all(|c| c.waiters == 0));
    }

    #[test]
    fn stress_async_waiters_cancelled_by_timeouts_never_leak() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let b = Budget::builder(4)
            .class("a", 0, 4)
            .class("b", 1, 4)
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..200u32)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(async move {
                        let class = ClassId((i % 2) as usize);
                        for _ in 0..20 {
                            let wait = Duration::from_micros(rand::random_range(0..500));
                            match tokio::time::timeout(wait, b.acquire_async(class)).await {
                                Ok(permit) => {
                                    tokio::task::yield_now().await;
                                    drop(permit);
                                }
                                Err(_) => b.record_timeout(class),
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let s = b.snapshot();
        assert_eq!(s.free, 4, "{s}");
        assert!(s.classes.iter().all(|c| c.waiters == 0));
        check(&s);
    }

    #[test]
    fn the_snapshot_serializes_and_reads_like_the_error() {
        let b = field_report();
        let (auto, _) = ids(&b);
        let _p = b.try_acquire(auto).unwrap();
        let s = b.snapshot();
        assert_eq!(s.to_string(), "budget 1/60 in use, 59 free; automation: 1/55 in use (reserved 0), 0 waiting; adhoc: 0/60 in use (reserved 5), 0 waiting");
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["classes"][1]["reserved"], 5);
        assert_eq!(json["healthy"], true);
    }

    // Tests added from the mutation run (docs/mutants.md).

    #[test]
    fn every_limit_is_accepted_at_its_bound() {
        let max = crate::config::MAX_CONNECTIONS;
        // total = MAX_CONNECTIONS, reserved = max = total, floors summing to the total.
        let b = Budget::builder(max).class("all", max, max).build().unwrap();
        assert_eq!(b.total(), max);
        let b = Budget::builder(4)
            .class("a", 2, 4)
            .class("b", 2, 2)
            .build()
            .unwrap();
        assert_eq!(b.snapshot().classes.len(), 2);
    }

    #[test]
    fn the_snapshot_counts_permits_acquired_by_each_class() {
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        let held = [
            b.try_acquire(auto),
            b.try_acquire(auto),
            b.try_acquire(adhoc),
        ];
        assert!(held.iter().all(Option::is_some));
        drop(held);
        let s = b.snapshot();
        assert_eq!(
            (s.classes[0].acquired, s.classes[1].acquired),
            (2, 1),
            "{s}"
        );
    }

    #[test]
    fn a_waiter_held_back_by_its_own_cap_asks_nobody_to_give_back() {
        let b = Budget::builder(3)
            .class("borrower", 0, 2)
            .class("capped", 0, 1)
            .build()
            .unwrap();
        let borrower = b.class_id("borrower").unwrap();
        let capped = b.class_id("capped").unwrap();
        let held = [
            b.try_acquire(borrower),
            b.try_acquire(borrower),
            b.try_acquire(capped),
        ];
        assert!(held.iter().all(Option::is_some));
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(capped, Duration::from_secs(10)).is_ok())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while b.waiters(capped) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the capped class never queued"
            );
            std::thread::yield_now();
        }
        assert_eq!(
            b.reclaim_wanted(borrower),
            0,
            "a permit given back would not go to a class at its cap"
        );
        drop(held);
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn a_budget_and_a_permit_show_what_they_hold() {
        let b = field_report();
        let (auto, _) = ids(&b);
        let permit = b.try_acquire(auto).unwrap();
        let shown = format!("{b:?} {permit:?}");
        assert!(
            shown.contains("Budget") && shown.contains("in_use: 1"),
            "{shown}"
        );
        assert!(
            shown.contains("Permit") && shown.contains("automation"),
            "{shown}"
        );
    }

    #[test]
    fn a_wait_nobody_wants_any_more_is_abandoned_not_timed_out() {
        let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
        let a = b.class_id("a").unwrap();
        let _held = b.try_acquire(a).unwrap();
        let started = std::time::Instant::now();
        // On a thread of its own: a budget broken into never giving up fails this test (by
        // the receive's deadline) instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = b.clone();
        std::thread::spawn(move || {
            let _ = tx.send(waiting.acquire_while(a, Duration::from_secs(5), &|| false));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("acquire_while never returned (its own timeout is 5 s)");
        match got {
            Err(AcquireError::Abandoned { class }) => assert_eq!(class, "a"),
            other => panic!("expected Abandoned, got {other:?}"),
        }
        // The bound this test exists for: at once, not at the 5 s deadline.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(2500), "gave up after {took:?}");
        assert_eq!(b.waiters(a), 0, "it left the queue");
    }

    #[test]
    fn timeouts_the_caller_owns_are_counted() {
        let b = field_report();
        let (auto, _) = ids(&b);
        b.record_timeout(auto);
        let err = b.timed_out(auto, Duration::from_millis(5));
        assert!(matches!(err, AcquireError::Timeout { ref class, .. } if class == "automation"));
        let s = b.snapshot();
        assert_eq!(
            (s.classes[0].timeouts, s.classes[1].timeouts),
            (2, 0),
            "{s}"
        );
    }

    #[test]
    fn without_pressure_the_wait_for_it_ends_at_its_timeout_with_zero() {
        let b = field_report();
        let (auto, _) = ids(&b);
        let started = std::time::Instant::now();
        assert_eq!(b.wait_for_pressure(auto, Duration::from_millis(20)), 0);
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "returned before its timeout: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn pressure_already_there_is_answered_at_once() {
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        let _auto_held: Vec<_> = (0..35).map(|_| b.try_acquire(auto).unwrap()).collect();
        let _borrowed: Vec<_> = (0..25).map(|_| b.try_acquire(adhoc).unwrap()).collect();
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(auto, Duration::from_secs(5)).is_ok())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while b.reclaim_wanted(adhoc) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never queued"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let started = std::time::Instant::now();
        assert_eq!(b.wait_for_pressure(adhoc, Duration::from_secs(5)), 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "waited {:?} for pressure that was already there",
            started.elapsed()
        );
        drop(_borrowed);
        assert!(waiter.join().unwrap(), "served once adhoc gave back");
    }

    #[test]
    fn a_waiting_future_polled_with_a_new_waker_is_woken_through_it() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
        let a = b.class_id("a").unwrap();
        assert!(b.is_healthy());
        let held = b.try_acquire(a).unwrap();
        let (old, new) = (
            std::sync::Arc::new(Flag(AtomicBool::new(false))),
            std::sync::Arc::new(Flag(AtomicBool::new(false))),
        );
        let (old_waker, new_waker) = (Waker::from(old.clone()), Waker::from(new.clone()));
        let mut acquire = std::pin::pin!(b.acquire_async(a));
        assert!(acquire
            .as_mut()
            .poll(&mut Context::from_waker(&old_waker))
            .is_pending());
        let shown = format!("{:?} {:?}", acquire, b.pressure_async(a));
        assert!(
            shown.contains("Acquire") && shown.contains("queued: true"),
            "{shown}"
        );
        assert!(
            shown.contains("Pressure") && shown.contains("\"a\""),
            "{shown}"
        );
        // The task moved (another executor thread): the next poll brings a new waker.
        assert!(acquire
            .as_mut()
            .poll(&mut Context::from_waker(&new_waker))
            .is_pending());
        drop(held);
        assert!(new.0.load(Ordering::SeqCst), "the new waker was not woken");
        assert!(!old.0.load(Ordering::SeqCst), "the old waker was woken");
        assert!(acquire
            .as_mut()
            .poll(&mut Context::from_waker(&new_waker))
            .is_ready());
    }

    #[test]
    fn class_ids_are_positions_in_the_builder() {
        let b = field_report();
        let (auto, adhoc) = ids(&b);
        assert_eq!((auto.index(), adhoc.index()), (0, 1));
        assert_eq!(b.classes().collect::<Vec<_>>(), [auto, adhoc]);
        assert_eq!(
            (b.class_name(auto), b.class_name(adhoc)),
            ("automation", "adhoc")
        );
    }
}

/// Model checks: every interleaving of the budget's operations, on the same code (the lock
/// is loom's). `RUSTFLAGS="--cfg loom" cargo test -p pool-core --release --lib budget`.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use std::task::Waker;

    fn invariant(b: &Budget) {
        let s = b.snapshot();
        assert!(s.in_use <= s.total);
        for c in &s.classes {
            assert!(c.in_use <= c.max);
        }
        let deficits: u32 = s
            .classes
            .iter()
            .map(|c| c.reserved.saturating_sub(c.in_use))
            .sum();
        assert!(s.free >= deficits, "{s}");
    }

    #[test]
    fn the_reserved_floor_is_always_obtainable() {
        loom::model(|| {
            let b = Budget::builder(2)
                .class("auto", 0, 2)
                .class("adhoc", 1, 2)
                .build()
                .unwrap();
            let auto = b.class_id("auto").unwrap();
            let adhoc = b.class_id("adhoc").unwrap();
            let b1 = b.clone();
            let t = loom::thread::spawn(move || {
                let p = b1.try_acquire(auto);
                invariant(&b1);
                let q = b1.try_acquire(auto);
                assert!(q.is_none(), "automation took the reserved connection");
                drop(p);
            });
            let p = b
                .try_acquire(adhoc)
                .expect("below its floor: granted at once");
            invariant(&b);
            drop(p);
            t.join().unwrap();
            assert_eq!(b.snapshot().free, 2);
        });
    }

    #[test]
    fn a_waiter_leaving_while_a_permit_is_released_neither_leaks_nor_doubles() {
        loom::model(|| {
            let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
            let a = b.class_id("a").unwrap();
            let held = b.try_acquire(a).unwrap();
            let b1 = b.clone();
            let waiter = loom::thread::spawn(move || {
                let mut fut = Box::pin(b1.acquire_async(a));
                let mut cx = Context::from_waker(Waker::noop());
                // Queued or granted; either way it leaves (times out) right after.
                let got = match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(p) => Some(p),
                    Poll::Pending => match fut.as_mut().poll(&mut cx) {
                        Poll::Ready(p) => Some(p),
                        Poll::Pending => None,
                    },
                };
                drop(fut);
                invariant(&b1);
                got.is_some()
            });
            drop(held);
            invariant(&b);
            let _ = waiter.join().unwrap();
            let s = b.snapshot();
            assert_eq!(s.free, 1, "{s}");
            assert_eq!(s.classes[0].waiters, 0);
            assert!(b.try_acquire(a).is_some());
        });
    }

    /// The blocking path (`acquire_while`, which the sync adapter's connects and the
    /// checkout gate use) is `enter` then `collect` between parks; its parks and timeouts
    /// are the only part loom cannot run, so the model drives the same two steps: a waiter
    /// that queues, looks once, then gives up, against a release at any point.
    #[test]
    fn the_blocking_path_giving_up_while_a_permit_is_released_neither_leaks_nor_doubles() {
        loom::model(|| {
            let b = Budget::builder(1).class("a", 0, 1).build().unwrap();
            let a = b.class_id("a").unwrap();
            let held = b.try_acquire(a).unwrap();
            let b1 = b.clone();
            let waiter = loom::thread::spawn(move || {
                let got = match b1.enter(a.0, || Wake::Nobody, true) {
                    Some(Entry::Granted) => Some(b1.permit(a.0)),
                    Some(Entry::Queued(ticket)) => match b1.collect(a.0, ticket, false) {
                        Collected::Permit(p) => Some(p),
                        Collected::Waiting => match b1.collect(a.0, ticket, true) {
                            Collected::Permit(p) => Some(p),
                            Collected::Left => None,
                            Collected::Waiting => unreachable!("give_up leaves"),
                        },
                        Collected::Left => unreachable!("not giving up"),
                    },
                    None => unreachable!("queueing was asked for"),
                };
                invariant(&b1);
                got.is_some()
            });
            drop(held);
            invariant(&b);
            let _ = waiter.join().unwrap();
            let s = b.snapshot();
            assert_eq!(s.free, 1, "{s}");
            assert_eq!(s.classes[0].waiters, 0);
            assert!(b.try_acquire(a).is_some());
        });
    }

    #[test]
    fn two_waiters_of_two_classes_and_a_release() {
        loom::model(|| {
            let b = Budget::builder(2)
                .class("x", 0, 2)
                .class("y", 1, 2)
                .build()
                .unwrap();
            let x = b.class_id("x").unwrap();
            let y = b.class_id("y").unwrap();
            let held = b.try_acquire(x).unwrap();
            let spawn = |class| {
                let b = b.clone();
                loom::thread::spawn(move || {
                    let mut fut = Box::pin(b.acquire_async(class));
                    let mut cx = Context::from_waker(Waker::noop());
                    let got = fut.as_mut().poll(&mut cx).is_ready();
                    drop(fut);
                    invariant(&b);
                    got
                })
            };
            let tx = spawn(x);
            let ty = spawn(y);
            drop(held);
            let _ = tx.join().unwrap();
            assert!(ty.join().unwrap(), "y below its floor is never refused");
            let s = b.snapshot();
            assert_eq!(s.free, 2, "{s}");
        });
    }
}
