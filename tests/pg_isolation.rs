//! Pools do not reach into each other: one pool's slow event listener never stretches another
//! pool's deadlines (issue 17, promise 2).

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use resilient_diesel::pool_core::events::PoolEvent;

#[test]
fn a_slow_listener_of_one_pool_never_stretches_another_pools_ping_bound() {
    let Some(pg) = server() else { return };
    // Pool A: its listener blocks 4 s on the leak report, which fires while A's connection is
    // held; the report used to run on the thread that enforces every pool's deadlines.
    let (entered_tx, entered) = mpsc::sync_channel::<()>(1);
    let a = ext_pool(&pg, "iso_slow_listener", 1)
        .leak_detection_threshold(Some(Duration::from_millis(20)))
        .event_listener(move |e: &PoolEvent<'_>| {
            if matches!(e, PoolEvent::LeakSuspected { .. }) {
                let _ = entered_tx.try_send(());
                std::thread::sleep(Duration::from_secs(4));
            }
        })
        .build()
        .unwrap();
    // Pool B: every checkout pings, bounded by 500 ms.
    let validation_timeout = Duration::from_millis(500);
    let b_app = "iso_bounded_ping";
    let b = ext_pool(&pg, b_app, 1)
        .validation_bypass_window(Duration::from_millis(1))
        .validation_timeout(validation_timeout)
        .build()
        .unwrap();
    warm(&b, 1);
    let held = a.get().unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("pool A's leak report never reached its listener");
    // B's backend hangs: its ping can only end by the watchdog's deadline.
    let pause = pg.pause_backends(b_app).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    let (outcome, handle) = within(Duration::from_secs(15), move || {
        let t = Instant::now();
        let r = select_one(&b);
        (t.elapsed(), r, b.stats())
    });
    let (took, result, stats) = outcome.expect("pool B's checkout hung behind the hung backend");
    pause.resume();
    handle.join().unwrap();
    drop(held);
    assert!(result.is_ok(), "B serves on a new connection: {result:?}");
    assert!(stats.validations_failed >= 1, "the ping was cut: {stats:?}");
    // The bound itself: the ping's timeout, then one connect on loopback.
    assert!(
        took < validation_timeout + Duration::from_millis(300),
        "pool B's 500 ms ping bound took {took:?} (started {:?} ago) behind pool A's listener",
        started.elapsed()
    );
}
