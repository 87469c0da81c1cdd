//! Checkouts are served in arrival order: a connection returned while others wait goes to
//! the one that waited longest, never to a newcomer, even the thread that just returned it.
//! The control is plain r2d2 at its defaults, where a busy thread takes its connection
//! straight back past a waiting one.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Whether thread `tid` of this process is asleep in the kernel (blocked on a lock, a
/// condition variable or a park), read from `/proc`.
fn asleep(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = &stat[stat.rfind(')')? + 1..];
            after_name.split_whitespace().next().map(|s| s == "S")
        })
        .unwrap_or(false)
}

/// A pool of one connection shared by a busy thread (take it, hold it 200 µs, give it back,
/// take it again at once) and a waiter (take it now and then). Counts the times the busy
/// thread gave the connection back while the waiter was blocked in `checkout` and yet got it
/// back before the waiter did.
fn overtakes<P: Checkout>(pool: &P, rounds: u32) -> u32 {
    let stop = Arc::new(AtomicBool::new(false));
    let in_checkout = Arc::new(AtomicBool::new(false));
    let waiter_tid = Arc::new(AtomicI32::new(0));
    let waiter_grants = Arc::new(AtomicU32::new(0));
    let waiter = {
        let (pool, stop, in_checkout, tid, grants) = (
            pool.clone(),
            stop.clone(),
            in_checkout.clone(),
            waiter_tid.clone(),
            waiter_grants.clone(),
        );
        std::thread::spawn(move || {
            tid.store(gettid(), Ordering::SeqCst);
            while !stop.load(Ordering::SeqCst) {
                in_checkout.store(true, Ordering::SeqCst);
                let conn = pool.checkout().expect("the waiter is served");
                in_checkout.store(false, Ordering::SeqCst);
                grants.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(100));
                drop(conn);
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    while waiter_tid.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let tid = waiter_tid.load(Ordering::SeqCst);
    let mut overtaken = 0;
    let mut conn = pool.checkout().unwrap();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_micros(200));
        let blocked = in_checkout.load(Ordering::SeqCst) && asleep(tid);
        let before = waiter_grants.load(Ordering::SeqCst);
        drop(conn);
        conn = pool.checkout().unwrap();
        if blocked && waiter_grants.load(Ordering::SeqCst) == before {
            overtaken += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    drop(conn);
    waiter.join().unwrap();
    overtaken
}

#[test]
fn a_busy_thread_never_takes_its_connection_back_past_a_waiting_one() {
    let Some(pg) = server() else { return };
    let pool = ext_pool(&pg, "fair_ours", 1).build().unwrap();
    let n = overtakes(&pool, 300);
    assert_eq!(n, 0, "a waiter was overtaken {n} times");
}

#[test]
fn control_plain_r2d2_at_its_defaults_lets_a_busy_thread_barge_past_a_waiting_one() {
    let Some(pg) = server() else { return };
    let pool = r2d2::Pool::builder()
        .max_size(1)
        .build(
            diesel::r2d2::ConnectionManager::<diesel::PgConnection>::new(
                pg.url_with("sslmode=disable&application_name=fair_r2d2"),
            ),
        )
        .unwrap();
    let n = overtakes(&pool, 300);
    println!("plain r2d2: a blocked waiter was overtaken {n} times in 300 hand-backs");
    assert!(n > 0, "the control did not show barging");
}

#[test]
fn with_more_holders_than_connections_every_checkout_is_served_in_arrival_order() {
    let Some(pg) = server() else { return };
    // One connection: grants are strictly one after another, so their order is the order of
    // service.
    let pool = ext_pool(&pg, "fair_order", 1).build().unwrap();
    let held = hold(&pool, 1);
    let grants = Arc::new(Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for i in 0..12 {
        let (p, grants) = (pool.clone(), grants.clone());
        threads.push(std::thread::spawn(move || {
            let conn = p.get().unwrap();
            grants.lock().unwrap().push(i);
            std::thread::sleep(Duration::from_millis(2));
            drop(conn);
        }));
        // The next one arrives only once this one is queued: arrival order is known.
        while pool.stats().waiters < Some(i + 1) {
            std::thread::yield_now();
        }
    }
    drop(held);
    for t in threads {
        t.join().unwrap();
    }
    let grants = grants.lock().unwrap();
    assert_eq!(
        *grants,
        (0..12).collect::<Vec<u32>>(),
        "served out of arrival order"
    );
}
