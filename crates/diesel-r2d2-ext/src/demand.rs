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
    /// Connects working for them now (at most one per waiting checkout: the pool re-enters
    /// r2d2's wait in short slices, and each re-entry may queue a connect).
    claims: AtomicU32,
    /// Connections those connects opened that no checkout has taken yet: each will serve a
    /// waiting checkout, so it counts as a claim until it is taken.
    fresh: AtomicU32,
    closed: AtomicBool,
    /// Connects asleep until a checkout wants a connection (the only ones a checkout must
    /// wake: with none, starting and ending a checkout touches two atomics and no lock).
    sleepers: AtomicU32,
    lock: Mutex<()>,
    changed: Condvar,
    /// Threads of connects queued for a budget permit (unparked when demand ends).
    queued: Mutex<Vec<std::thread::Thread>>,
    /// The last budget timeout a connect got, and when: what a checkout that timed out
    /// meanwhile quotes.
    budget_error: Mutex<Option<(std::time::Instant, String)>>,
    queued_count: AtomicU32,
}

/// One checkout's share of the demand; leaving ends it. Not `Send`: it is dropped on the
/// thread that took it, which is where r2d2 runs that checkout's `is_valid` (see
/// [`Demand::taken_fresh`]).
pub(crate) struct Wanting<'a>(&'a Demand, std::marker::PhantomData<*const ()>);

thread_local! {
    /// Per thread and demand (by address): the wants this thread holds, and how many of them
    /// were already counted out of `waiting` because their checkout took a fresh connection.
    static MINE: std::cell::RefCell<Vec<(usize, u32, u32)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's (held, served) counts for `demand`.
fn mine<T>(demand: &Demand, f: impl FnOnce(&mut u32, &mut u32) -> T) -> T {
    let key = demand as *const Demand as usize;
    MINE.with(|m| {
        let mut m = m.borrow_mut();
        let i = match m.iter().position(|e| e.0 == key) {
            Some(i) => i,
            None => {
                m.push((key, 0, 0));
                m.len() - 1
            }
        };
        let entry = &mut m[i];
        let out = f(&mut entry.1, &mut entry.2);
        if entry.1 == 0 {
            m.swap_remove(i);
        }
        out
    })
}

/// A connect working for a waiting checkout; dropping it (the attempt is over) lets another
/// connect work for it.
pub(crate) struct Claim<'a>(&'a Demand);

impl Claim<'_> {
    /// The connect opened its connection: it counts as fresh until a checkout takes it (see
    /// [`Demand::taken_fresh`]).
    pub(crate) fn opened(self) {
        self.0.fresh.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.claims.fetch_sub(1, Ordering::SeqCst);
        self.0.wake_sleepers();
    }
}

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        let counted_out = mine(self.0, |held, served| {
            *held -= 1;
            let was = *served > 0;
            *served = served.saturating_sub(1);
            was
        });
        if counted_out {
            return;
        }
        self.0.leave();
    }
}

impl Demand {
    /// One waiting checkout fewer.
    fn leave(&self) {
        if self.waiting.fetch_sub(1, Ordering::SeqCst) == 1
            && self.queued_count.load(Ordering::SeqCst) > 0
        {
            self.wake_queued();
        }
    }

    /// The fresh connection this thread's checkout took did not pass validation after all:
    /// the checkout waits again (counted back in, so that a connect may work for it).
    pub(crate) fn unserve(&self) {
        let undone = mine(self, |held, served| {
            let undo = *served > 0 && *held > 0;
            if undo {
                *served -= 1;
            }
            undo
        });
        if undone {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.wake_sleepers();
        }
    }

    /// A checkout starts waiting for a connection.
    pub(crate) fn want(&self) -> Wanting<'_> {
        // SeqCst pairs with `wait_for_demand`: either it sees this increment, or this sees
        // its sleeper and wakes it under the lock.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        mine(self, |held, _| *held += 1);
        self.wake_sleepers();
        Wanting(self, std::marker::PhantomData)
    }

    fn wake_sleepers(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock();
            self.changed.notify_all();
        }
    }

    /// The budget timeout a connect got at or after `since`, if any.
    pub(crate) fn budget_error_since(&self, since: std::time::Instant) -> Option<String> {
        self.budget_error
            .lock()
            .as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }

    /// A connection opened for a waiting checkout was taken out of the idle list. If the
    /// thread taking it holds a want of this pool (the checkout it serves: r2d2 runs
    /// `is_valid` on the caller's thread), that want is counted out now, in the same step:
    /// otherwise, until the checkout returned and dropped it, a connect woken here would see
    /// one checkout waiting and nothing working for it, and open a connection nobody wants.
    pub(crate) fn taken_fresh(&self) {
        // The want first, then the fresh count: in between, connects working (claims + fresh)
        // never drop below checkouts waiting, so none claims for a checkout already served.
        let served = mine(self, |held, served| {
            let serve = *served < *held;
            if serve {
                *served += 1;
            }
            serve
        });
        if served {
            self.leave();
        }
        let _ = self
            .fresh
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        self.wake_sleepers();
    }

    /// Takes a claim if fewer connects (and connections they opened, not yet taken) work
    /// than checkouts wait.
    fn try_claim(&self) -> Option<Claim<'_>> {
        let mut claims = self.claims.load(Ordering::SeqCst);
        loop {
            let working = claims.saturating_add(self.fresh.load(Ordering::SeqCst));
            if working >= self.waiting.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst)
            {
                return None;
            }
            match self.claims.compare_exchange(
                claims,
                claims + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Some(Claim(self)),
                Err(now) => claims = now,
            }
        }
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

    /// Clears a connect to go ahead: waits until a checkout wants a connection that no other
    /// connect works for (the claim), then, for a budget class, for a permit (queued only
    /// while the demand lasts, for at most `wait` of it; then the budget's timeout error,
    /// which the checkout quotes). `Abandoned` when the pool is gone.
    pub(crate) fn ready(
        &self,
        budget: Option<(&Budget, ClassId)>,
        wait: Duration,
    ) -> Result<(Claim<'_>, Option<Permit>), AcquireError> {
        loop {
            let claim = self.wait_for_demand();
            let Some((budget, class)) = budget else {
                return match claim {
                    Some(claim) => Ok((claim, None)),
                    None => Err(AcquireError::Abandoned {
                        class: "-".to_owned(),
                    }),
                };
            };
            let Some(claim) = claim else {
                return Err(AcquireError::Abandoned {
                    class: budget.class_name(class).to_owned(),
                });
            };
            let me = std::thread::current();
            self.queued.lock().push(me.clone());
            self.queued_count.fetch_add(1, Ordering::SeqCst);
            let result = budget.acquire_while(class, wait, &|| self.wanted());
            self.queued_count.fetch_sub(1, Ordering::SeqCst);
            self.queued.lock().retain(|t| t.id() != me.id());
            match result {
                Err(AcquireError::Abandoned { .. }) => continue,
                Err(timed_out) => {
                    *self.budget_error.lock() =
                        Some((std::time::Instant::now(), timed_out.to_string()));
                    // The checkouts this connect worked for get the budget's error; keep the
                    // claim until they are gone, so that no other connect queues in their
                    // name (it would make other classes give headroom back for nobody).
                    let deadline = std::time::Instant::now() + wait;
                    while self.wanted() && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    drop(claim);
                    return Err(timed_out);
                }
                Ok(permit) => return Ok((claim, Some(permit))),
            }
        }
    }

    /// Waits for a claim; `None` when the pool is closed.
    fn wait_for_demand(&self) -> Option<Claim<'_>> {
        if let Some(claim) = self.try_claim() {
            return Some(claim);
        }
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        let claim = loop {
            if self.closed.load(Ordering::SeqCst) {
                break None;
            }
            if let Some(claim) = self.try_claim() {
                break Some(claim);
            }
            self.changed.wait(&mut guard);
        };
        drop(guard);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        claim
    }
}

#[cfg(test)]
mod tests {
    //! The demand's accounting, without a pool: which connects may start, and when.
    use super::*;

    fn waiting(demand: &Demand) -> u32 {
        demand.waiting.load(Ordering::SeqCst)
    }

    /// Waits (5 s at most) until a connect sleeps waiting for demand.
    fn until_a_connect_sleeps(demand: &Demand) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while demand.sleepers.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the connect never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_connect_per_waiting_checkout_and_none_without_one() {
        let demand = Demand::default();
        assert!(demand.try_claim().is_none(), "nobody waits: no connect");
        let a = demand.want();
        let b = demand.want();
        let first = demand.try_claim().expect("two checkouts wait");
        let second = demand.try_claim().expect("two checkouts wait");
        assert!(
            demand.try_claim().is_none(),
            "two connects work for two checkouts"
        );
        drop(first);
        let again = demand
            .try_claim()
            .expect("a failed connect lets another work");
        drop((again, second, a, b));
        assert_eq!(waiting(&demand), 0);
        assert!(demand.try_claim().is_none());
        assert!(!demand.wanted());
    }

    #[test]
    fn a_checkout_served_by_a_fresh_connection_leaves_nothing_for_another_connect() {
        let demand = Demand::default();
        let want = demand.want();
        demand
            .try_claim()
            .expect("a checkout waits: a connect may work for it")
            .opened();
        assert!(
            demand.try_claim().is_none(),
            "the connection opened counts for the checkout until it is taken"
        );
        // r2d2 validates the fresh connection on the checkout's own thread: this one.
        demand.taken_fresh();
        assert_eq!(
            waiting(&demand),
            0,
            "the checkout is served: its want counted out"
        );
        assert!(
            demand.try_claim().is_none(),
            "a connect woken now must not open a connection for a checkout already served"
        );
        // It failed validation after all: the checkout waits again.
        demand.unserve();
        assert_eq!(waiting(&demand), 1);
        drop(demand.try_claim().expect("the checkout waits again"));
        // Served again, then done: counted out once, never twice.
        demand.try_claim().expect("waits").opened();
        demand.taken_fresh();
        drop(want);
        assert_eq!(waiting(&demand), 0, "the want was counted out once");
    }

    #[test]
    fn a_fresh_connection_taken_on_another_thread_counts_no_want_of_this_one_out() {
        let demand = std::sync::Arc::new(Demand::default());
        let want = demand.want();
        demand.try_claim().expect("waits").opened();
        let other = std::sync::Arc::clone(&demand);
        std::thread::spawn(move || other.taken_fresh())
            .join()
            .unwrap();
        assert_eq!(waiting(&demand), 1, "this thread's checkout still waits");
        drop(demand.try_claim().expect("and a connect may work for it"));
        drop(want);
        assert_eq!(waiting(&demand), 0);
    }

    #[test]
    fn a_want_dropped_is_forgotten_by_its_thread() {
        // This thread wanted a connection and gave up; another checkout waits now.
        let demand = std::sync::Arc::new(Demand::default());
        drop(demand.want());
        let (started, release) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let (still_waiting, claimable) = std::thread::scope(|s| {
            s.spawn(|| {
                let _want = demand.want();
                started.wait();
                release.wait();
            });
            started.wait();
            // A fresh connection taken on this thread (a checkout straight through r2d2,
            // say) serves no want of this thread: the other checkout still waits.
            demand.try_claim().expect("waits").opened();
            demand.taken_fresh();
            let seen = (waiting(&demand), demand.try_claim().is_some());
            release.wait();
            seen
        });
        assert_eq!(still_waiting, 1, "the other thread's checkout still waits");
        assert!(claimable, "and a connect may work for it");
        assert_eq!(waiting(&demand), 0);
    }

    #[test]
    fn closing_ends_the_connects_waiting_for_demand() {
        let demand = std::sync::Arc::new(Demand::default());
        let waiter = {
            let demand = std::sync::Arc::clone(&demand);
            std::thread::spawn(move || demand.ready(None, Duration::from_secs(1)).is_err())
        };
        until_a_connect_sleeps(&demand);
        demand.close();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(waiter.join().unwrap());
        });
        let abandoned = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the connect waiting for demand did not end within 5 s of the close");
        assert!(abandoned, "a connect of a closed pool is abandoned");
        let _want = demand.want();
        assert!(
            demand.try_claim().is_none(),
            "a closed pool starts no connect"
        );
    }

    #[test]
    fn a_checkout_wakes_a_connect_waiting_for_demand() {
        let demand = std::sync::Arc::new(Demand::default());
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let demand = std::sync::Arc::clone(&demand);
            std::thread::spawn(move || {
                let cleared = demand
                    .ready(None, Duration::from_secs(1))
                    .map(|(c, _)| c.opened());
                let _ = tx.send(cleared.is_ok());
            });
        }
        until_a_connect_sleeps(&demand);
        let _want = demand.want();
        let cleared = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a checkout started, yet the connect waiting for demand slept on");
        assert!(cleared);
        demand.close();
    }

    /// A budget of one connection whose permit this returns, held: connects queue behind it.
    fn a_budget_in_use() -> (Budget, ClassId, Permit) {
        let budget = Budget::builder(1)
            .class("jobs", 0, 1)
            .build()
            .expect("budget");
        let class = budget.class_id("jobs").expect("class");
        let held = budget.try_acquire(class).expect("the one permit");
        (budget, class, held)
    }

    /// Waits (`within` at most) until `n` connects are queued for a permit of `class`.
    fn until_queued(budget: &Budget, class: ClassId, n: u32, within: Duration, what: &str) {
        let deadline = std::time::Instant::now() + within;
        while budget.waiters(class) != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {} connects queued for a permit after {within:?}, not {n}",
                budget.waiters(class)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn when_the_demand_ends_every_connect_still_queued_for_a_permit_leaves_the_queue() {
        let (budget, class, held) = a_budget_in_use();
        let demand = std::sync::Arc::new(Demand::default());
        let wants = (demand.want(), demand.want());
        // Two connects work for the two checkouts; both queue for the one permit, for up to
        // 60 s (far longer than this test looks).
        let (cleared_tx, cleared) = std::sync::mpsc::channel();
        let (release_tx, release) = std::sync::mpsc::channel::<()>();
        let release = std::sync::Arc::new(Mutex::new(release));
        for _ in 0..2 {
            let (demand, budget) = (std::sync::Arc::clone(&demand), budget.clone());
            let (cleared_tx, release) = (cleared_tx.clone(), std::sync::Arc::clone(&release));
            std::thread::spawn(move || {
                let outcome = demand.ready(Some((&budget, class)), Duration::from_secs(60));
                let _ = cleared_tx.send(outcome.is_ok());
                // The cleared connect holds its permit and claim until the test is done.
                let _ = release.lock().recv_timeout(Duration::from_secs(60));
                drop(outcome);
            });
        }
        until_queued(&budget, class, 2, Duration::from_secs(10), "two connects");
        // One connect gets the permit and leaves the queue; the other stays queued.
        drop(held);
        let first = cleared.recv_timeout(Duration::from_secs(10));
        assert_eq!(first, Ok(true), "the connect given the permit is cleared");
        assert_eq!(budget.waiters(class), 1, "the other connect still queues");
        // Both checkouts are gone: nobody wants the permit the other connect queues for.
        drop(wants);
        until_queued(
            &budget,
            class,
            0,
            Duration::from_secs(5),
            "the demand ended, yet a connect stayed queued for a permit nobody wants",
        );
        demand.close();
        drop(release_tx);
    }

    #[test]
    fn after_a_budget_timeout_the_connect_keeps_its_claim_while_its_checkout_waits_and_no_longer() {
        let (budget, class, _held) = a_budget_in_use();
        let demand = std::sync::Arc::new(Demand::default());
        let want = demand.want();
        let wait = Duration::from_secs(3);
        let started = std::time::Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let (demand, budget) = (std::sync::Arc::clone(&demand), budget.clone());
            std::thread::spawn(move || {
                let outcome = demand.ready(Some((&budget, class)), wait);
                let _ = tx.send((
                    matches!(outcome, Err(AcquireError::Timeout { .. })),
                    std::time::Instant::now(),
                ));
            });
        }
        // The connect queues for the permit in use and times out after `wait`.
        let deadline = started + wait + Duration::from_secs(10);
        while demand.budget_error_since(started).is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the connect got no budget timeout"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The checkout it worked for still waits (and will get that timeout): the connect
        // keeps its claim, so no other connect queues in the checkout's name.
        std::thread::sleep(Duration::from_millis(100));
        let other = demand.try_claim();
        assert!(
            other.is_none(),
            "another connect could claim the checkout whose connect just timed out"
        );
        assert!(
            rx.try_recv().is_err(),
            "the connect returned while its checkout still waited"
        );
        // The checkout is gone: the connect lets its claim go at once, not after `wait`.
        let gone = std::time::Instant::now();
        drop(want);
        let (timed_out, returned) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the connect never returned");
        assert!(timed_out, "the connect reports the budget's timeout");
        let kept = returned.saturating_duration_since(gone);
        assert!(
            kept < wait / 2,
            "the connect kept its claim {kept:?} after its checkout was gone"
        );
        demand.close();
    }
}
