//! Demand: a connect opens a connection only for a checkout that wants one.
//!
//! bb8 opens connections on spawned tasks, one for each `get` that finds nothing idle; the
//! `get` may give up (its future dropped, its timeout) or get a returned connection long
//! before the connect has its budget permit. A connect still queued for a permit then would be
//! a phantom: it holds a place in the budget's queue and makes other classes give borrowed
//! connections back for nobody. And a `get` of the pool's own maintenance (which only walks
//! idle connections) must never make bb8 open one.
//!
//! So every connect first **claims** a unit of demand: a checkout through
//! [`ExtPool::get`](crate::ExtPool::get) (or the maintenance warming the pool) that waits and
//! has no connect working for it yet, and at most [`MAX_CONNECTS_IN_FLIGHT`] connects open
//! connections at once. A connect queues at the budget only while some checkout
//! still waits; when the last one leaves, it leaves the budget's queue and waits (outside it)
//! for the next checkout, or for the pool to close. Connections the maintenance holds for a
//! moment (a keepalive ping) count against the demand: a checkout that would get one of them
//! back in a moment does not make a connect open another.
//!
//! Only checkouts through [`ExtPool::get`](crate::ExtPool::get) count as demand: a checkout
//! through the wrapped bb8 pool directly is served idle connections only.

use std::pin::pin;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The most connections one pool opens at once: as many as r2d2's connect threads give the
/// sync pool (HikariCP opens one at a time). Under a spike, waiters are mostly served by
/// returned connections long before a new one is open; without a cap, bb8 would open one for
/// each of them (45 of 45 unused in the benchmark's spike test). A reconnect storm of `n`
/// takes about `n / 3` connect times.
pub(crate) const MAX_CONNECTS_IN_FLIGHT: u32 = 3;

/// Checkouts waiting in one pool, and the connects working for them.
#[derive(Debug, Default)]
pub(crate) struct Demand {
    st: Mutex<St>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct St {
    /// Checkouts waiting for a connection.
    waiting: u32,
    /// Connects opening a connection for them (claimed, not yet done).
    claims: u32,
    /// Idle connections the maintenance holds for a moment.
    held: u32,
    closed: bool,
}

/// The pool is gone.
#[derive(Debug)]
pub(crate) struct Closed;

/// One checkout's share of the demand; dropping it ends it.
pub(crate) struct Wanting<'a>(&'a Demand);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        // A connect opening for a checkout that left now opens for the next one, or for the
        // idle list: it cannot be taken back.
        self.0.st.lock().waiting -= 1;
        self.0.changed.notify_waiters();
    }
}

/// A connect's claim on a waiting checkout, while it opens the connection.
pub(crate) struct Claim<'a> {
    demand: &'a Demand,
    opened: bool,
}

impl Claim<'_> {
    /// The connection is open and goes to the idle list, where a waiting checkout takes it:
    /// the claim ends without waking anyone (the checkout it serves leaves by itself; one that
    /// arrives meanwhile wakes the connects).
    pub(crate) fn opened(mut self) {
        self.opened = true;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let capped = {
            let mut st = self.demand.st.lock();
            let capped = st.claims >= MAX_CONNECTS_IN_FLIGHT;
            st.claims = st.claims.saturating_sub(1);
            capped
        };
        // Failed: the checkout still needs a connect. Or the cap held other connects back:
        // the next may go.
        if !self.opened || capped {
            self.demand.changed.notify_waiters();
        }
    }
}

/// An idle connection held by the maintenance. Released (silently) right before the
/// connection goes back: if it is kept, the checkout waiting for it gets it and nothing needs
/// waking; if it is closed, the manager's `has_broken` wakes the connects (see
/// [`Demand::notify`]). Dropped without release (a cancelled maintenance step), it wakes them
/// itself.
pub(crate) struct Held<'a> {
    demand: &'a Demand,
    released: bool,
}

impl Held<'_> {
    /// The connection goes back now.
    pub(crate) fn release(mut self) {
        self.released = true;
        let mut st = self.demand.st.lock();
        st.held = st.held.saturating_sub(1);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.released {
            {
                let mut st = self.demand.st.lock();
                st.held = st.held.saturating_sub(1);
            }
            self.demand.changed.notify_waiters();
        }
    }
}

impl Demand {
    /// A checkout starts waiting for a connection.
    pub(crate) fn want(&self) -> Wanting<'_> {
        self.st.lock().waiting += 1;
        self.changed.notify_waiters();
        Wanting(self)
    }

    /// Whether a checkout still waits (and the pool is open): a connect retrying a failed
    /// attempt stops when nobody does.
    pub(crate) fn is_wanted(&self) -> bool {
        let st = self.st.lock();
        st.waiting > 0 && !st.closed
    }

    /// The maintenance takes an idle connection out for a moment.
    pub(crate) fn hold(&self) -> Held<'_> {
        self.st.lock().held += 1;
        Held {
            demand: self,
            released: false,
        }
    }

    /// A connection was closed: connects waiting for unserved demand look again.
    pub(crate) fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// The pool is gone: every connect waiting here gives up.
    pub(crate) fn close(&self) {
        self.st.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Waits until `ready` holds under the lock (it may change the state), or the pool closed.
    async fn wait_until(&self, mut ready: impl FnMut(&mut St) -> bool) -> Result<(), Closed> {
        loop {
            let mut notified = pin!(self.changed.notified());
            // Registered before the check: a change after it wakes us.
            notified.as_mut().enable();
            {
                let mut st = self.st.lock();
                if st.closed {
                    return Err(Closed);
                }
                if ready(&mut st) {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// Waits for a checkout that has no connect working for it, and claims it; at most
    /// [`MAX_CONNECTS_IN_FLIGHT`] claims at once.
    pub(crate) async fn claim(&self) -> Result<Claim<'_>, Closed> {
        self.wait_until(|st| {
            let free = st.claims + st.held < st.waiting && st.claims < MAX_CONNECTS_IN_FLIGHT;
            if free {
                st.claims += 1;
            }
            free
        })
        .await?;
        Ok(Claim {
            demand: self,
            opened: false,
        })
    }

    /// Waits until some checkout waits (or the pool closed).
    pub(crate) async fn wanted(&self) -> Result<(), Closed> {
        self.wait_until(|st| st.waiting > 0).await
    }

    /// Resolves when no checkout waits any more, or the pool closed.
    pub(crate) async fn unwanted(&self) {
        let _ = self.wait_until(|st| st.waiting == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::{Context, Poll, Waker};

    fn poll<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A waker that records whether it was woken.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Flag {
        fn woken(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Polls `f` once with a fresh [`Flag`]'s waker; the flag says later whether `f` was woken.
    fn poll_flagged<F: std::future::Future>(
        f: std::pin::Pin<&mut F>,
    ) -> (Poll<F::Output>, std::sync::Arc<Flag>) {
        let flag = std::sync::Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        (f.poll(&mut Context::from_waker(&waker)), flag)
    }

    #[test]
    fn a_connect_claims_only_unserved_demand_and_gives_it_back_when_it_fails() {
        let d = Demand::default();
        let mut first = pin!(d.claim());
        assert!(poll(first.as_mut()).is_pending(), "no demand, no connect");
        let w = d.want();
        let Poll::Ready(Ok(claim)) = poll(first.as_mut()) else {
            panic!("a waiting checkout is demand")
        };
        let mut second = pin!(d.claim());
        assert!(
            poll(second.as_mut()).is_pending(),
            "one checkout, one connect"
        );
        drop(claim); // the connect failed: another may try
        assert!(matches!(poll(second.as_mut()), Poll::Ready(Ok(_))));
        drop(w);
    }

    #[test]
    fn at_most_three_connects_open_at_once_however_many_checkouts_wait() {
        let d = Demand::default();
        let _waiting: Vec<_> = (0..50).map(|_| d.want()).collect();
        let mut claims = Vec::new();
        for _ in 0..MAX_CONNECTS_IN_FLIGHT {
            let mut claim = Box::pin(d.claim());
            let Poll::Ready(Ok(claim)) = poll(claim.as_mut()) else {
                panic!("a waiting checkout is demand")
            };
            claims.push(claim);
        }
        let mut fourth = pin!(d.claim());
        assert!(
            poll(fourth.as_mut()).is_pending(),
            "a spike opens 3 at a time"
        );
        claims.pop().unwrap().opened();
        assert!(matches!(poll(fourth.as_mut()), Poll::Ready(Ok(_))));
    }

    #[test]
    fn connections_held_by_the_maintenance_count_against_the_demand() {
        let d = Demand::default();
        let held = d.hold();
        let _w = d.want();
        let mut claim = pin!(d.claim());
        assert!(
            poll(claim.as_mut()).is_pending(),
            "the held connection comes back"
        );
        // Kept: the checkout gets it, no connect is woken...
        held.release();
        // ...closed: the manager wakes the connects.
        d.notify();
        assert!(matches!(poll(claim.as_mut()), Poll::Ready(Ok(_))));
    }

    #[test]
    fn a_claim_lasts_while_its_connection_opens_and_closing_ends_every_wait() {
        let d = Demand::default();
        let _first = d.want();
        let _second = d.want();
        let mut c = pin!(d.claim());
        let Poll::Ready(Ok(claim)) = poll(c.as_mut()) else {
            panic!()
        };
        let mut next = pin!(d.claim());
        let Poll::Ready(Ok(other)) = poll(next.as_mut()) else {
            panic!("two checkouts, two connects")
        };
        let mut third = pin!(d.claim());
        let (pending, flag) = poll_flagged(third.as_mut());
        assert!(pending.is_pending(), "both are being served");
        claim.opened();
        other.opened();
        // Both connections went to the idle list, where the two checkouts take them: no
        // third connect is woken meanwhile.
        assert!(!flag.woken());
        d.close();
        assert!(flag.woken());
        assert!(matches!(poll(third.as_mut()), Poll::Ready(Err(Closed))));
    }

    #[test]
    fn a_checkout_that_leaves_is_no_longer_demand() {
        let d = Demand::default();
        assert!(!d.is_wanted(), "nobody waits");
        let first = d.want();
        let second = d.want();
        assert!(d.is_wanted());
        drop(first);
        assert!(d.is_wanted(), "one checkout still waits");
        drop(second);
        assert!(!d.is_wanted(), "both left");
        let mut claim = pin!(d.claim());
        assert!(
            poll(claim.as_mut()).is_pending(),
            "no connect for checkouts that left"
        );
        let _again = d.want();
        assert!(d.is_wanted());
        d.close();
        assert!(!d.is_wanted(), "a closed pool wants nothing");
    }

    #[test]
    fn wanted_waits_for_a_checkout_and_unwanted_for_the_last_to_leave() {
        let d = Demand::default();
        let mut wanted = pin!(d.wanted());
        assert!(poll(wanted.as_mut()).is_pending(), "nobody waits yet");
        let first = d.want();
        let second = d.want();
        assert!(matches!(poll(wanted.as_mut()), Poll::Ready(Ok(()))));
        let mut unwanted = pin!(d.unwanted());
        assert!(poll(unwanted.as_mut()).is_pending(), "two checkouts wait");
        drop(first);
        assert!(poll(unwanted.as_mut()).is_pending(), "one checkout waits");
        drop(second);
        assert!(poll(unwanted.as_mut()).is_ready(), "the last one left");
        d.close();
        assert!(matches!(poll(pin!(d.wanted())), Poll::Ready(Err(Closed))));
    }

    #[test]
    fn a_held_connection_dropped_without_release_counts_no_more() {
        let d = Demand::default();
        let held = d.hold();
        let _w = d.want();
        let mut claim = pin!(d.claim());
        assert!(
            poll(claim.as_mut()).is_pending(),
            "the held connection comes back"
        );
        // A cancelled maintenance step: the connection never went back, so the checkout
        // needs a connect after all.
        drop(held);
        assert!(matches!(poll(claim.as_mut()), Poll::Ready(Ok(_))));
        // And a second hold, released, counts no more either.
        let w2 = d.want();
        d.hold().release();
        let mut next = pin!(d.claim());
        assert!(matches!(poll(next.as_mut()), Poll::Ready(Ok(_))));
        drop(w2);
    }

    #[test]
    fn a_held_connection_released_back_wakes_no_connect() {
        let d = Demand::default();
        let held = d.hold();
        let _w = d.want();
        let mut claim = pin!(d.claim());
        let (pending, flag) = poll_flagged(claim.as_mut());
        assert!(pending.is_pending(), "the held connection comes back");
        // It goes back to the idle list, where the waiting checkout takes it: a connect woken
        // now would find that checkout still counted and open a connection nobody needs.
        held.release();
        assert!(
            !flag.woken(),
            "releasing a held connection woke the connects"
        );
    }
}
