//! The engine's decisions, without a server: what a checkout and a checkin decide, the
//! overflow count under races, the gate's order, leak reports against checkins.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use super::*;
use crate::config::PoolConfig;
use crate::events::{EventListener, PoolEvent};
use crate::lifecycle::{CloseReason, ProbeResult};

fn pool_with(
    b: crate::config::PoolConfigBuilder,
    listener: Arc<dyn EventListener>,
) -> Arc<PoolState> {
    Arc::new(PoolState::new(b.build().unwrap(), listener, None).unwrap())
}

fn pool(pool_size: u32, max_overflow: u32) -> Arc<PoolState> {
    pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .pool_size(pool_size)
            .max_overflow(max_overflow),
        Arc::new(|_: &PoolEvent<'_>| {}),
    )
}

#[test]
fn overflow_connections_close_on_return_and_pool_size_ones_stay() {
    let p = pool(2, 3);
    let mut conns: Vec<ConnState> = (0..5)
        .map(|_| ConnState::opened(&p, Duration::ZERO, None))
        .collect();
    assert_eq!(p.open_connections(), 5);
    let mut closed = 0;
    for c in &mut conns {
        c.handed_out(Instant::now(), None);
        if c.checkin(false) == Some(CloseReason::Overflow) {
            closed += 1;
        }
    }
    assert_eq!(closed, 3);
    assert_eq!(
        p.open_connections(),
        2,
        "counted out when claimed for closing"
    );
    drop(conns);
    assert_eq!(p.open_connections(), 0, "no double count when dropped");
    assert_eq!(p.stats().snapshot(Default::default()).closed.overflow, 3);
}

#[test]
fn returns_racing_for_the_last_overflow_slot_close_exactly_the_overflow() {
    for _ in 0..200 {
        let p = pool(4, 4);
        let conns: Vec<ConnState> = (0..8)
            .map(|_| ConnState::opened(&p, Duration::ZERO, None))
            .collect();
        let barrier = Arc::new(Barrier::new(8));
        let closed = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = conns
            .into_iter()
            .map(|mut c| {
                let (barrier, closed) = (barrier.clone(), closed.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if c.checkin(false).is_some() {
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                    c
                })
            })
            .collect();
        let kept: Vec<ConnState> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(closed.load(Ordering::SeqCst), 4);
        assert_eq!(p.open_connections(), 4);
        drop(kept);
    }
}

#[test]
fn a_dead_probe_retires_and_invalidates_and_an_expired_one_is_not_even_probed() {
    let p = pool(2, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    assert_eq!(
        c.begin_checkout(|| ProbeResult::Dead, Instant::now()),
        CheckoutStep::Discard(CloseReason::ProbeDead)
    );
    assert_eq!(p.epoch(), 1, "the pool's older connections are suspect");
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .max_lifetime(Some(Duration::from_secs(1)))
            .lifetime_jitter(0.0),
        Arc::new(|_: &PoolEvent<'_>| {}),
    );
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    let later = Instant::now() + Duration::from_secs(2);
    assert_eq!(
        c.begin_checkout(|| panic!("an expired connection is not probed"), later),
        CheckoutStep::Discard(CloseReason::Expired)
    );
}

#[test]
fn a_ping_whose_deadline_fired_does_not_validate() {
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    p.invalidate("test");
    let step = c.begin_checkout(|| ProbeResult::Alive, Instant::now());
    assert!(matches!(step, CheckoutStep::Ping { .. }), "{step:?}");
    assert!(!c.finish_ping(false));
    assert_eq!(c.close_reason(), Some(CloseReason::PingFailed));
    assert!(c.lifecycle().validated_epoch < p.epoch());
}

#[test]
fn a_session_left_dirty_is_closed_at_checkin() {
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.handed_out(Instant::now(), None);
    assert_eq!(c.checkin(true), Some(CloseReason::Broken));
}

#[test]
fn a_read_only_error_is_no_disconnect_until_the_server_turns_out_a_standby() {
    use crate::classify::ErrorClass;
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.observe_error(ErrorClass::ReadOnlyTransaction);
    assert_eq!(
        p.epoch(),
        0,
        "no invalidation for a deliberate write in a READ ONLY transaction"
    );
    assert!(c.take_read_only_suspect());
    assert!(!c.take_read_only_suspect(), "asked once");
    c.failover_detected();
    assert!(c.is_broken());
    assert_eq!(p.epoch(), 1);
    assert_eq!(c.checkin(false), Some(CloseReason::Broken));
    let mut d = ConnState::opened(&p, Duration::ZERO, None);
    d.observe_error(ErrorClass::ConnectionLost);
    assert!(d.is_broken(), "a lost connection is never pooled again");
    assert_eq!(d.checkin(false), Some(CloseReason::Broken));
    assert_eq!(p.epoch(), 2, "a lost connection makes the others suspect");
}

#[test]
fn events_about_one_connection_carry_its_one_id() {
    let seen: Arc<parking_lot::Mutex<Vec<(&'static str, u64)>>> = Default::default();
    let s = seen.clone();
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app"),
        Arc::new(move |e: &PoolEvent<'_>| {
            let entry = match *e {
                PoolEvent::Connected { connection_id, .. } => ("connected", connection_id),
                PoolEvent::CheckedOut { connection_id, .. } => ("out", connection_id),
                PoolEvent::CheckedIn { connection_id, .. } => ("in", connection_id),
                PoolEvent::Closed { connection_id, .. } => ("closed", connection_id),
                _ => return,
            };
            s.lock().push(entry);
        }),
    );
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    let id = c.id();
    c.handed_out(Instant::now(), None);
    c.checkin(false);
    drop(c);
    let seen = seen.lock();
    assert_eq!(
        *seen,
        vec![("connected", id), ("out", id), ("in", id), ("closed", id)]
    );
}

#[test]
fn a_panicking_listener_is_contained() {
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app"),
        Arc::new(|_: &PoolEvent<'_>| panic!("listener bug")),
    );
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.handed_out(Instant::now(), None);
    assert_eq!(c.checkin(false), None);
    drop(c);
    assert_eq!(p.open_connections(), 0);
}

#[test]
fn a_leak_report_never_comes_after_the_checkin() {
    let checked_in = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicU32::new(0));
    let reports = Arc::new(AtomicU32::new(0));
    let (flag, l, r) = (checked_in.clone(), late.clone(), reports.clone());
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .leak_detection_threshold(Some(Duration::from_micros(200))),
        Arc::new(move |e: &PoolEvent<'_>| {
            if let PoolEvent::LeakSuspected { .. } = e {
                // Take our time: a checkin racing with us must wait for the report.
                std::thread::sleep(Duration::from_micros(300));
                r.fetch_add(1, Ordering::SeqCst);
                if flag.load(Ordering::SeqCst) {
                    l.fetch_add(1, Ordering::SeqCst);
                }
            }
        }),
    );
    for i in 0..300u64 {
        checked_in.store(false, Ordering::SeqCst);
        let mut c = ConnState::opened(&p, Duration::ZERO, None);
        c.handed_out(Instant::now(), None);
        std::thread::sleep(Duration::from_micros(i % 400));
        c.checkin(false);
        checked_in.store(true, Ordering::SeqCst);
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        reports.load(Ordering::SeqCst) > 0,
        "some checkouts outlived the threshold"
    );
    assert_eq!(
        late.load(Ordering::SeqCst),
        0,
        "a report came after its checkin"
    );
}

#[test]
fn the_gate_serves_waiters_in_arrival_order() {
    let gate = Gate::new(1);
    let held = gate.try_enter().unwrap();
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut threads = Vec::new();
    for i in 0..8 {
        let (g, order) = (gate.clone(), order.clone());
        threads.push(std::thread::spawn(move || {
            let permit = g.enter(Duration::from_secs(5)).unwrap();
            order.lock().push(i);
            drop(permit);
        }));
        // The next one arrives only once this one is queued.
        let deadline = Instant::now() + Duration::from_secs(5);
        while gate.waiters() < i + 1 {
            assert!(Instant::now() < deadline, "waiter {i} never queued");
            std::thread::yield_now();
        }
    }
    drop(held);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(*order.lock(), (0..8).collect::<Vec<_>>());
}

#[test]
fn a_pool_config_edited_into_nonsense_is_refused_when_the_state_is_made() {
    let mut config = PoolConfig::builder("postgres://app@db/app")
        .build()
        .unwrap();
    config.pool_size = 0;
    config.max_overflow = 0;
    let err = PoolState::new(config, Arc::new(|_: &PoolEvent<'_>| {}), None).unwrap_err();
    assert!(err.to_string().contains("pool_size"), "{err}");
    let mut config = PoolConfig::builder("postgres://app@db/app")
        .build()
        .unwrap();
    config.pool_timeout = Duration::ZERO;
    assert!(PoolState::new(config, Arc::new(|_: &PoolEvent<'_>| {}), None).is_err());
}

#[test]
fn a_connection_returned_in_the_middle_of_its_ping_is_closed() {
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    p.invalidate("test");
    assert!(matches!(
        c.begin_checkout(|| ProbeResult::Alive, Instant::now()),
        CheckoutStep::Ping { .. }
    ));
    // The checkout future was dropped here, before the ping's reply.
    assert_eq!(c.checkin(false), Some(CloseReason::PingFailed));
}

#[test]
fn a_pool_without_the_probe_says_so_in_its_stats_and_status_report() {
    let p = pool(1, 0);
    assert!(p.snapshot(0, 0).probe_available);
    p.set_probe_available(false, "sockets cannot be identified on this platform");
    let snapshot = p.snapshot(0, 1);
    assert!(!snapshot.probe_available);
    let report = crate::status::StatusReport::new(vec![snapshot]);
    assert!(
        report.to_string().contains("Liveness probe: UNAVAILABLE"),
        "{report}"
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["pools"][0]["probe_available"], false);
}

// Tests added from the mutation run (docs/mutants.md): each pins a decision a mutant of
// conn_state.rs changed without any test failing.

/// A pool taking its permits from a budget class `app` with floor `reserved` and cap `max`,
/// beside a class `other` (floor 0, cap `total`).
fn pool_in_budget(
    b: crate::config::PoolConfigBuilder,
    total: u32,
    reserved: u32,
    max: u32,
) -> (Arc<PoolState>, crate::budget::Budget) {
    let budget = crate::budget::Budget::builder(total)
        .class("app", reserved, max)
        .class("other", 0, total)
        .build()
        .unwrap();
    let class = budget.class_id("app").unwrap();
    let state = PoolState::new(
        b.build().unwrap(),
        Arc::new(|_: &PoolEvent<'_>| {}),
        Some((budget.clone(), class)),
    )
    .unwrap();
    (Arc::new(state), budget)
}

#[test]
fn a_connection_shows_its_pool_and_id_and_says_whether_it_is_fresh_out_or_broken() {
    let p = pool(2, 0);
    let mut a = ConnState::opened(&p, Duration::ZERO, None);
    let b = ConnState::opened(&p, Duration::ZERO, None);
    assert_ne!(a.id(), b.id(), "ids are unique within the pool");
    let shown = format!("{a:?}");
    assert!(
        shown.contains("ConnState") && shown.contains(&format!("id: {}", a.id())),
        "{shown}"
    );
    assert!(a.take_fresh(), "a new connection is fresh");
    assert!(!a.take_fresh(), "only once");
    assert!(!a.is_broken());
    assert!(!a.is_checked_out());
    a.handed_out(Instant::now(), None);
    assert!(a.is_checked_out());
    assert_eq!(a.checkin(false), None);
    assert!(!a.is_checked_out());
}

#[test]
fn a_close_reason_set_by_the_adapter_is_the_one_recorded() {
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.set_close_reason(CloseReason::Expired);
    assert_eq!(c.close_reason(), Some(CloseReason::Expired));
    drop(c);
    let closed = p.stats().snapshot(Default::default()).closed;
    assert_eq!((closed.expired, closed.released), (1, 0));
}

#[test]
fn an_idle_connection_within_the_budget_floor_is_pinged_not_closed() {
    let b = PoolConfig::builder("postgres://app@db/app").idle_timeout(Some(Duration::from_secs(1)));
    let (p, _budget) = pool_in_budget(b, 4, 1, 4);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    let idle = Instant::now() + Duration::from_secs(2);
    // One open, floor 1: kept, by a ping at checkout and by the sweep.
    assert!(matches!(
        c.begin_checkout(|| ProbeResult::Alive, idle),
        CheckoutStep::Ping { .. }
    ));
    assert!(c.finish_ping(true));
    assert_eq!(
        c.sweep(|| ProbeResult::Alive, idle + Duration::from_secs(2)),
        None
    );
    // Two open, floor 1: the idle one goes.
    let mut d = ConnState::opened(&p, Duration::ZERO, None);
    let later = Instant::now() + Duration::from_secs(2);
    assert_eq!(
        d.sweep(|| ProbeResult::Alive, later),
        Some(CloseReason::IdleTimeout)
    );
    assert_eq!(
        d.begin_checkout(|| ProbeResult::Alive, later),
        CheckoutStep::Discard(CloseReason::IdleTimeout)
    );
}

#[test]
fn the_sweep_retires_dead_and_broken_connections_and_keeps_live_ones() {
    let p = pool(2, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    assert_eq!(c.sweep(|| ProbeResult::Alive, Instant::now()), None);
    assert_eq!(
        c.sweep(|| ProbeResult::Dead, Instant::now()),
        Some(CloseReason::ProbeDead)
    );
    assert_eq!(c.close_reason(), Some(CloseReason::ProbeDead));
    let mut d = ConnState::opened(&p, Duration::ZERO, None);
    d.observe_error(crate::classify::ErrorClass::ConnectionLost);
    assert_eq!(
        d.sweep(|| ProbeResult::Alive, Instant::now()),
        Some(CloseReason::Broken)
    );
}

#[test]
fn a_keepalive_is_due_once_nothing_vouched_for_the_connection_for_its_interval() {
    let p = pool(1, 0);
    let c = ConnState::opened(&p, Duration::ZERO, None);
    let last = c.lifecycle().last_used.max(c.lifecycle().last_validated);
    let every = Duration::from_secs(10);
    assert!(!c.keepalive_due(every, last));
    assert!(!c.keepalive_due(every, last + Duration::from_secs(9)));
    assert!(c.keepalive_due(every, last + every), "due at the interval");
    assert!(c.keepalive_due(every, last + Duration::from_secs(11)));
}

#[test]
fn an_unanswered_ping_makes_connections_idle_since_before_it_suspect_and_no_others() {
    let p = pool(3, 0);
    let mut idle = ConnState::opened(&p, Duration::ZERO, None);
    let mut pinged = ConnState::opened(&p, Duration::ZERO, None);
    std::thread::sleep(Duration::from_millis(2));
    pinged.ping_starting();
    std::thread::sleep(Duration::from_millis(2));
    // Used after the ping started: vouched for since.
    let mut used = ConnState::opened(&p, Duration::ZERO, None);
    used.handed_out(Instant::now(), None);
    assert_eq!(used.checkin(false), None);
    std::thread::sleep(Duration::from_millis(2));
    let epoch = p.epoch();
    pinged.finish_ping_silent();
    assert_eq!(pinged.close_reason(), Some(CloseReason::PingFailed));
    assert!(p.epoch() > epoch, "the pool is invalidated");
    assert!(idle.is_suspect());
    assert!(!used.is_suspect(), "used after the silent ping started");
    assert_eq!(
        idle.begin_checkout(
            || panic!("a suspect connection is not probed"),
            Instant::now()
        ),
        CheckoutStep::Discard(CloseReason::Invalidated)
    );
    assert!(matches!(
        used.begin_checkout(|| ProbeResult::Alive, Instant::now()),
        CheckoutStep::Ping { .. }
    ));
}

#[test]
fn a_checkin_after_use_restarts_the_idle_time_but_one_after_a_sweep_does_not() {
    let p = pool(1, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    let opened = c.lifecycle().last_used;
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(c.sweep(|| ProbeResult::Alive, Instant::now()), None);
    assert_eq!(c.checkin(false), None);
    assert_eq!(c.lifecycle().last_used, opened, "a sweep is no use");
    c.handed_out(Instant::now(), None);
    assert_eq!(c.checkin(false), None);
    assert!(c.lifecycle().last_used > opened, "a checkout is");
}

#[test]
fn borrowed_budget_headroom_is_given_back_at_checkin_only_when_another_class_waits() {
    let (p, budget) = pool_in_budget(PoolConfig::builder("postgres://app@db/app"), 2, 0, 2);
    let app = budget.class_id("app").unwrap();
    let other = budget.class_id("other").unwrap();
    let mut conns: Vec<ConnState> = (0..2)
        .map(|_| {
            let permit = budget.try_acquire(app).expect("a free permit");
            ConnState::opened(&p, Duration::ZERO, Some(permit))
        })
        .collect();
    conns[0].handed_out(Instant::now(), None);
    assert_eq!(conns[0].checkin(false), None, "nobody waits: kept");
    let waiter = {
        let budget = budget.clone();
        std::thread::spawn(move || budget.acquire(other, Duration::from_secs(10)).is_ok())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.waiters(other) == 0 {
        assert!(Instant::now() < deadline, "the other class never queued");
        std::thread::yield_now();
    }
    conns[1].handed_out(Instant::now(), None);
    assert_eq!(conns[1].checkin(false), Some(CloseReason::Reclaimed));
    drop(conns.pop());
    assert!(
        waiter.join().unwrap(),
        "the waiter got the permit given back"
    );
}

#[test]
fn the_gate_counts_the_permits_held() {
    let gate = Gate::new(3);
    assert_eq!(gate.in_use(), 0);
    let a = gate.try_enter().unwrap();
    let b = gate.try_enter().unwrap();
    assert_eq!(gate.in_use(), 2);
    drop(a);
    assert_eq!(gate.in_use(), 1);
    drop(b);
    assert_eq!(gate.in_use(), 0);
}

#[test]
fn no_leak_is_reported_before_the_threshold() {
    let reports = Arc::new(AtomicU32::new(0));
    let r = reports.clone();
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .leak_detection_threshold(Some(Duration::from_secs(60))),
        Arc::new(move |e: &PoolEvent<'_>| {
            if let PoolEvent::LeakSuspected { .. } = e {
                r.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.handed_out(Instant::now(), None);
    // A report due now would be made within milliseconds by the reporter thread.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reports.load(Ordering::SeqCst),
        0,
        "a leak was reported 60 s early"
    );
    assert_eq!(c.checkin(false), None);
}

#[test]
fn the_pool_state_shows_its_name_budget_floor_and_initial_size() {
    let p = pool_with(
        PoolConfig::builder("postgres://app:S3NT1NEL@db/app")
            .name("automation")
            .pool_size(3)
            .pool_timeout(Duration::from_secs(10)),
        Arc::new(|_: &PoolEvent<'_>| {}),
    );
    assert_eq!(p.name(), "automation");
    let shown = format!("{p:?}");
    assert!(
        shown.contains("PoolState") && shown.contains("automation"),
        "{shown}"
    );
    assert!(!shown.contains("S3NT1NEL"), "{shown}");
    assert!(p.budget().is_none());
    assert_eq!((p.floor(), p.initial_size()), (0, 3), "a plain pool");
    assert_eq!(p.below_floor(), None);
    assert_eq!(
        p.connect_permit_wait(),
        Duration::from_secs(8),
        "80% of pool_timeout"
    );
    let (p, budget) = pool_in_budget(PoolConfig::builder("postgres://app@db/app"), 4, 2, 4);
    let (b, class) = p.budget().expect("the pool's budget");
    assert_eq!(class, budget.class_id("app").unwrap());
    assert_eq!(b.total(), 4);
    assert_eq!(
        (p.floor(), p.initial_size()),
        (2, 2),
        "a budget class's floor"
    );
    assert_eq!(p.below_floor(), Some(2));
    let one = ConnState::opened(&p, Duration::ZERO, None);
    assert_eq!(p.below_floor(), Some(2));
    let two = ConnState::opened(&p, Duration::ZERO, None);
    assert_eq!(p.below_floor(), None, "the floor is open");
    drop((one, two));
}

/// A pool whose listener counts `Invalidated` events.
fn pool_counting_invalidations() -> (Arc<PoolState>, Arc<AtomicU32>) {
    let events = Arc::new(AtomicU32::new(0));
    let e = events.clone();
    let p = pool_with(
        PoolConfig::builder("postgres://app:S3NT1NEL@db/app"),
        Arc::new(move |event: &PoolEvent<'_>| {
            if let PoolEvent::Invalidated { .. } = event {
                e.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    (p, events)
}

#[test]
fn a_burst_of_invalidations_is_reported_once() {
    let (p, events) = pool_counting_invalidations();
    p.invalidate("first");
    p.invalidate("second, at once");
    assert_eq!(p.epoch(), 2, "each one invalidates");
    assert_eq!(
        events.load(Ordering::SeqCst),
        1,
        "one event per second at most"
    );
}

#[test]
fn suspects_are_the_connections_last_good_strictly_before_the_silent_ping() {
    let (p, events) = pool_counting_invalidations();
    let us = Duration::from_micros(1);
    let t = Instant::now() + Duration::from_millis(5);
    assert!(!p.is_suspect(t - us), "no silent ping yet");
    p.path_went_silent(t);
    assert_eq!((p.epoch(), events.load(Ordering::SeqCst)), (1, 1));
    assert!(p.is_suspect(t - us));
    assert!(
        !p.is_suspect(t),
        "good at the very instant the ping started"
    );
    assert!(!p.is_suspect(t + us));
    // The same silence again, or an older one, changes nothing.
    p.path_went_silent(t);
    p.path_went_silent(t - us);
    assert_eq!(p.epoch(), 1);
    assert!(!p.is_suspect(t));
}

#[test]
fn a_silent_ping_started_before_the_pool_was_made_still_invalidates_it() {
    let (p, _) = pool_counting_invalidations();
    let Some(earlier) = Instant::now().checked_sub(Duration::from_secs(1)) else {
        return; // a clock that starts at its origin: nothing before it
    };
    p.path_went_silent(earlier);
    assert_eq!(p.epoch(), 1);
}

#[test]
fn connect_failures_are_redacted_counted_and_cleared_by_a_success() {
    let (p, _) = pool_counting_invalidations();
    assert_eq!(p.redact("auth failed for S3NT1NEL"), "auth failed for ***");
    let snapshot = p.snapshot(0, 0);
    assert!(snapshot.server_down.is_none(), "{snapshot:?}");
    let shown = p.connect_failed(
        super::health::ConnectClass::Transient,
        "password S3NT1NEL refused",
    );
    assert_eq!(shown, "password *** refused");
    assert!(p.health().is_down());
    let down = p.snapshot(0, 0).server_down.expect("down");
    assert_eq!(down.failed_attempts, 1);
    assert_eq!(down.last_error, "password *** refused");
    p.connect_succeeded();
    assert!(!p.health().is_down(), "a success ends the outage");
    assert!(p.snapshot(0, 0).server_down.is_none());
}

#[test]
fn a_reclaim_request_retires_that_many_idle_connections_at_checkout() {
    let p = pool(3, 0);
    assert_eq!(p.request_reclaim(3), 0, "none pending");
    assert_eq!(p.request_reclaim(1), 3, "replaced");
    let mut a = ConnState::opened(&p, Duration::ZERO, None);
    let mut b = ConnState::opened(&p, Duration::ZERO, None);
    assert_eq!(
        a.begin_checkout(|| ProbeResult::Alive, Instant::now()),
        CheckoutStep::Discard(CloseReason::Reclaimed)
    );
    assert_eq!(
        b.begin_checkout(|| ProbeResult::Alive, Instant::now()),
        CheckoutStep::Reuse,
        "one was asked for"
    );
}

#[test]
fn the_snapshot_counts_budget_waiters_as_waiters() {
    let (p, budget) = pool_in_budget(PoolConfig::builder("postgres://app@db/app"), 1, 0, 1);
    let app = budget.class_id("app").unwrap();
    let held = budget.try_acquire(app).unwrap();
    let waiter = {
        let budget = budget.clone();
        std::thread::spawn(move || budget.acquire(app, Duration::from_secs(10)).is_ok())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.waiters(app) == 0 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        std::thread::yield_now();
    }
    assert_eq!(p.snapshot(0, 0).waiters, Some(1));
    drop(held);
    assert!(waiter.join().unwrap());
}

#[test]
fn the_pool_state_passes_events_on_to_its_listener() {
    let (p, events) = pool_counting_invalidations();
    let listener: &dyn EventListener = &*p;
    listener.on_event(&PoolEvent::Invalidated {
        pool: "default",
        reason: "test",
    });
    assert_eq!(events.load(Ordering::SeqCst), 1);
}

#[test]
fn the_watchdog_shows_whether_it_runs() {
    let shown = format!("{:?}", Watchdog::global());
    assert!(
        shown.contains("Watchdog") && shown.contains("running: true"),
        "{shown}"
    );
}

// ---- From the mutation run: decisions the adapters' server tests exercise, pinned here
// ---- where a wrong constant or comparison fails in milliseconds.

fn hedging_pool(validation_timeout: Duration) -> Arc<PoolState> {
    pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .pool_size(2)
            .max_overflow(1)
            .validation_timeout(validation_timeout),
        Arc::new(|_: &PoolEvent<'_>| {}),
    )
}

#[test]
fn the_hedge_delay_is_four_round_trips_with_a_floor_and_a_ceiling() {
    let p = hedging_pool(Duration::from_secs(5));
    // No round trip seen yet: the floor.
    assert_eq!(p.hedge_delay(), Some(HEDGE_FLOOR));
    // A steady 80 ms round trip: 4 x 80 ms.
    for _ in 0..64 {
        p.record_ping_rtt(Duration::from_millis(80));
    }
    assert_eq!(p.hedge_delay(), Some(Duration::from_millis(320)));
    // Round trips below the floor's quarter: the floor.
    let fast = hedging_pool(Duration::from_secs(5));
    fast.record_ping_rtt(Duration::from_millis(1));
    assert_eq!(fast.hedge_delay(), Some(HEDGE_FLOOR));
    // Never more than half the validation timeout.
    let slow = hedging_pool(Duration::from_millis(500));
    slow.record_ping_rtt(Duration::from_secs(2));
    assert_eq!(slow.hedge_delay(), Some(Duration::from_millis(250)));
    // Off: none.
    let off = pool_with(
        PoolConfig::builder("postgres://app@db/app").hedged_validation(false),
        Arc::new(|_: &PoolEvent<'_>| {}),
    );
    assert_eq!(off.hedge_delay(), None);
}

#[test]
fn the_round_trip_estimate_moves_an_eighth_of_the_way_per_ping() {
    let p = hedging_pool(Duration::from_secs(10));
    p.record_ping_rtt(Duration::from_millis(80)); // first: taken as is
    assert_eq!(p.hedge_delay(), Some(Duration::from_millis(320)));
    p.record_ping_rtt(Duration::from_millis(160)); // 80 - 10 + 20 = 90 ms
    assert_eq!(p.hedge_delay(), Some(Duration::from_millis(360)));
    p.record_ping_rtt(Duration::from_millis(90)); // 90 - 11.25 + 11.25 = 90 ms
    assert_eq!(p.hedge_delay(), Some(Duration::from_millis(360)));
}

#[test]
fn a_hedge_fits_only_below_the_pool_sizes() {
    let p = hedging_pool(Duration::from_secs(5)); // 2 + 1
    let mut conns = Vec::new();
    for n in 0..3 {
        assert!(p.hedge_room(), "{n} open of 3: room for a hedge");
        conns.push(ConnState::opened(&p, Duration::ZERO, None));
    }
    assert!(!p.hedge_room(), "3 open of 3: no hedge");
    conns.pop();
    assert!(p.hedge_room());
}

#[test]
fn an_orphan_is_taken_back_not_counted_twice() {
    let p = pool(2, 0);
    let mut c = ConnState::opened(&p, Duration::ZERO, None);
    c.handed_out(Instant::now(), None);
    assert_eq!(p.open_connections(), 1);
    // The application replaced the connection's state while it was checked out.
    drop(c);
    assert_eq!(p.open_connections(), 1, "still open: its place is kept");
    let mut back = ConnState::adopted(&p);
    assert_eq!(p.open_connections(), 1, "the orphan's place, not a new one");
    back.checkin(false);
    drop(back);
    assert_eq!(p.open_connections(), 0);
    // Without an orphan, an adopted connection is counted as a new one.
    let stranger = ConnState::adopted(&p);
    assert_eq!(p.open_connections(), 1);
    drop(stranger);
}

#[test]
fn retries_on_a_pool_report_to_its_stats() {
    let p = pool(1, 0);
    let hooks = p.retry_hooks();
    assert_eq!(hooks.pool, p.name());
    let stats = hooks.stats.expect("the pool's stats");
    stats.record_retry();
    assert_eq!(p.stats().snapshot(Default::default()).retries, 1);
}

#[test]
fn maintenance_waits_on_the_budget_only_for_classes_that_borrow() {
    use crate::budget::Budget;
    let budget = Budget::builder(4)
        .class("floor_only", 2, 2)
        .class("borrower", 0, 4)
        .build()
        .unwrap();
    let make = |class: &str| {
        let id = budget.class_id(class).unwrap();
        PoolState::new(
            PoolConfig::builder("postgres://app@db/app")
                .pool_size(2)
                .build()
                .unwrap(),
            Arc::new(|_: &PoolEvent<'_>| {}),
            Some((budget.clone(), id)),
        )
        .unwrap()
    };
    assert!(!Maintenance::new(&make("floor_only")).borrows());
    assert!(Maintenance::new(&make("borrower")).borrows());
    assert!(!Maintenance::new(&pool(2, 0)).borrows(), "no budget");
}

#[test]
fn a_sweep_is_due_one_interval_after_the_last() {
    let p = pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .keepalive_ping(Some(Duration::from_millis(100))),
        Arc::new(|_: &PoolEvent<'_>| {}),
    );
    let mut m = Maintenance::new(&p);
    assert!(!m.sweep_due(), "not right after the pool is made");
    std::thread::sleep(Duration::from_millis(70));
    assert!(m.sweep_due(), "the interval is half the keepalive: 50 ms");
    m.swept();
    assert!(!m.sweep_due(), "one interval from now again");
    assert!(m.tick(Duration::from_secs(1)) <= Duration::from_millis(50));
    let none = pool_with(
        PoolConfig::builder("postgres://app@db/app")
            .max_lifetime(None)
            .idle_timeout(None),
        Arc::new(|_: &PoolEvent<'_>| {}),
    );
    let m = Maintenance::new(&none);
    assert!(!m.sweep_due());
    assert_eq!(m.tick(Duration::from_secs(5)), Duration::from_secs(1));
}

#[test]
fn idle_timeouts_and_lifetimes_set_the_sweep_interval_too() {
    let interval = |b: crate::config::PoolConfigBuilder| {
        super::maintenance::sweep_interval(&b.build().unwrap())
    };
    let url = "postgres://app@db/app";
    // A quarter of the idle timeout.
    assert_eq!(
        interval(
            PoolConfig::builder(url)
                .max_lifetime(None)
                .idle_timeout(Some(Duration::from_secs(40)))
        ),
        Some(Duration::from_secs(10))
    );
    // An eighth of the lifetime.
    assert_eq!(
        interval(
            PoolConfig::builder(url)
                .idle_timeout(None)
                .max_lifetime(Some(Duration::from_secs(80)))
        ),
        Some(Duration::from_secs(10))
    );
}

#[test]
fn fresh_evidence_is_exactly_as_old_as_the_last_answer() {
    let before = Instant::now();
    let p = pool(1, 0);
    assert_eq!(p.fresh_evidence(Instant::now()), None, "no answer yet");
    // An answer stamped before the pool was made still counts (mark 1, not "never").
    p.server_answered(before);
    assert!(p.fresh_evidence(Instant::now()).is_some());
    let at = Instant::now();
    p.server_answered(at);
    assert_eq!(
        p.fresh_evidence(at + Duration::from_millis(100)),
        Some(Duration::from_millis(100)),
        "to the nanosecond"
    );
    p.invalidate("test");
    assert_eq!(p.fresh_evidence(at + Duration::from_millis(100)), None);
}

#[test]
fn a_second_slow_ping_lost_within_one_validation_timeout_declares_the_path_silent() {
    let p = hedging_pool(Duration::from_millis(200));
    let old = Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    let first = Instant::now();
    assert!(!p.slow_ping_lost(first), "one slow ping says nothing");
    assert_eq!(p.epoch(), 0);
    assert!(!p.is_suspect(old));
    let second = Instant::now();
    assert!(p.slow_ping_lost(second), "two within the window do");
    assert_eq!(p.epoch(), 1);
    assert!(p.is_suspect(old), "idle since before the silent ping");
    assert!(!p.is_suspect(second), "good when the ping started");
    // Past the window, a give-up is a first strike again.
    std::thread::sleep(Duration::from_millis(250));
    assert!(!p.slow_ping_lost(Instant::now()));
    assert_eq!(p.epoch(), 1);
    assert!(p.slow_ping_lost(Instant::now()));
    assert_eq!(p.epoch(), 2);
}

#[test]
fn a_failover_makes_every_older_connection_suspect_and_a_read_only_error_asks_once() {
    let (p, _) = pool_counting_invalidations();
    let before = Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    let at = Instant::now();
    p.failover_detected(at);
    assert_eq!(p.epoch(), 1);
    assert!(p.is_suspect(before), "opened before the failover was seen");
    assert!(!p.is_suspect(at + Duration::from_micros(1)));
    // A read-only error is one pending check, whichever connection takes it.
    assert!(!p.take_read_only_seen());
    p.read_only_seen();
    p.read_only_seen();
    assert!(p.take_read_only_seen());
    assert!(!p.take_read_only_seen(), "taken once");
}

/// A closing connection waits for the server's confirmation only while it holds a budget
/// permit and is not checked out; the bound is the validation timeout, at most 1 s; a wait
/// that ran out stops the closes of connections that have not heard from the server since
/// it began from waiting (one wait per outage), not those that have (the count stays exact
/// while the pool recovers), and a wait that ended in time stops none.
#[test]
fn a_close_waits_for_the_server_only_with_a_permit_and_not_on_a_path_whose_wait_ran_out() {
    let b =
        PoolConfig::builder("postgres://app@db/app").validation_timeout(Duration::from_millis(300));
    let (p, budget) = pool_in_budget(b, 8, 0, 8);
    let class = budget.class_id("app").unwrap();
    let with_permit =
        || ConnState::opened(&p, Duration::ZERO, Some(budget.try_acquire(class).unwrap()));
    assert_eq!(
        ConnState::opened(&p, Duration::ZERO, None).close_confirm_bound(),
        None,
        "no permit: nothing to hold back"
    );
    let mut c = with_permit();
    assert_eq!(c.close_confirm_bound(), Some(Duration::from_millis(300)));
    c.handed_out(Instant::now(), None);
    assert_eq!(c.close_confirm_bound(), None, "checked out: not closing");
    c.checkin(false);
    assert_eq!(c.close_confirm_bound(), Some(Duration::from_millis(300)));
    let mut silent = with_permit();
    silent.set_close_reason(CloseReason::PingFailed);
    assert_eq!(
        silent.close_confirm_bound(),
        Some(Duration::from_millis(300))
    );
    silent.set_close_reason(CloseReason::Invalidated);
    assert_eq!(
        silent.close_confirm_bound(),
        None,
        "retired for a silent path: no wait"
    );

    // The bound is capped.
    let slow =
        PoolConfig::builder("postgres://app@db/app").validation_timeout(Duration::from_secs(30));
    let (q, _b) = pool_in_budget(slow, 4, 0, 4);
    let heard = Instant::now();
    let started = heard + Duration::from_millis(5);
    assert_eq!(q.close_confirm_bound(heard), Some(CONFIRM_BOUND_MAX));
    q.close_confirmed(true, started);
    assert_eq!(
        q.close_confirm_bound(heard),
        Some(CONFIRM_BOUND_MAX),
        "confirmed: keep waiting"
    );
    q.close_confirmed(false, started);
    assert_eq!(
        q.close_confirm_bound(heard),
        None,
        "a wait that began after the server last answered ran out: stop waiting"
    );
    assert_eq!(
        q.close_confirm_bound(started - Duration::from_nanos(1)),
        None
    );
    assert_eq!(
        q.close_confirm_bound(started),
        Some(CONFIRM_BOUND_MAX),
        "heard from the server once the failed wait had begun: wait"
    );
    assert_eq!(
        q.close_confirm_bound(started + Duration::from_secs(3600)),
        Some(CONFIRM_BOUND_MAX)
    );
    // An older wait that runs out later does not move the line back.
    q.close_confirmed(false, heard);
    assert_eq!(
        q.close_confirm_bound(started - Duration::from_nanos(1)),
        None
    );

    // Through a connection's state: the wait holds the budget permit until it is finished,
    // after the state itself is gone; a wait dropped without a report releases it too.
    let in_use = || budget.snapshot().in_use;
    // Opened, so last heard from, before the wait below begins.
    let mut old = with_permit();
    let mut pinged = with_permit();
    let mut used = with_permit();
    let mut broke = with_permit();
    let held = in_use();
    let mut e = with_permit();
    assert_eq!(in_use(), held + 1);
    drop(
        e.close_wait()
            .expect("a permit and no wait ran out: it waits"),
    );
    assert_eq!(in_use(), held, "a dropped wait released the permit");
    drop(e);
    let wait = c
        .close_wait()
        .expect("a permit and no wait ran out: it waits");
    assert_eq!(wait.bound(), Duration::from_millis(300));
    let shown = format!("{wait:?}");
    assert!(
        shown.starts_with("CloseWait") && shown.contains("300ms"),
        "{shown}"
    );
    assert_eq!(
        c.close_confirm_bound(),
        None,
        "the permit went with the wait"
    );
    drop(c);
    assert_eq!(in_use(), held, "the wait still holds the permit");
    wait.finish(false);
    assert_eq!(in_use(), held - 1, "finished: the permit is back");
    assert!(
        old.close_wait().is_none(),
        "not heard from since the wait that ran out began: no wait"
    );
    // Heard from since: a ping answered, a use returned unbroken.
    p.invalidate("test");
    let step = pinged.begin_checkout(|| ProbeResult::Alive, Instant::now());
    assert!(matches!(step, CheckoutStep::Ping { .. }), "{step:?}");
    assert!(pinged.finish_ping(true));
    used.handed_out(Instant::now(), None);
    assert_eq!(used.checkin(false), None);
    for (name, c) in [("pinged", &mut pinged), ("used", &mut used)] {
        let wait = c
            .close_wait()
            .unwrap_or_else(|| panic!("{name} since the wait ran out: it waits"));
        wait.finish(true);
    }
    // A use that broke is no answer.
    broke.handed_out(Instant::now(), None);
    assert_eq!(broke.checkin(true), Some(CloseReason::Broken));
    assert!(broke.close_wait().is_none(), "broken: no answer, no wait");
    old.set_close_reason(CloseReason::PingFailed);
    drop(old);
    let mut d = with_permit();
    let wait = d
        .close_wait()
        .expect("opened after the wait that ran out began: it waits");
    wait.finish(true);
    drop(d);
}

/// A closing connection's wait marks its permit as on its way back: the class waiting for the
/// budget is not served twice by the lending pool closing another connection for it.
#[test]
fn a_close_wait_marks_its_permit_as_coming_back() {
    let b =
        PoolConfig::builder("postgres://app@db/app").validation_timeout(Duration::from_millis(300));
    let (p, budget) = pool_in_budget(b, 2, 0, 2);
    let app = budget.class_id("app").unwrap();
    let other = budget.class_id("other").unwrap();
    let mut closing = ConnState::opened(&p, Duration::ZERO, Some(budget.try_acquire(app).unwrap()));
    let _kept = ConnState::opened(&p, Duration::ZERO, Some(budget.try_acquire(app).unwrap()));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| budget.acquire(other, Duration::from_secs(5)));
        wait_queued(&budget, other);
        assert_eq!(budget.reclaim_wanted(app), 1, "one waiter, two borrowed");
        let wait = closing
            .close_wait()
            .expect("a permit and no wait ran out: it waits");
        assert_eq!(
            budget.reclaim_wanted(app),
            0,
            "the closing connection's permit is coming: nothing more to give back"
        );
        drop(closing);
        wait.finish(true);
        let _permit = waiter
            .join()
            .unwrap()
            .expect("the permit came back to the waiter");
    });
}

#[test]
fn a_connection_given_up_before_it_joined_the_pool_holds_its_permit_through_its_wait() {
    let b =
        PoolConfig::builder("postgres://app@db/app").validation_timeout(Duration::from_millis(300));
    let (p, budget) = pool_in_budget(b, 2, 0, 2);
    let app = budget.class_id("app").unwrap();
    assert!(
        CloseWait::abandoned(&p, None).is_none(),
        "no permit: nothing to wait for"
    );
    // Even after a wait of the pool ran out: this session was set up just now.
    let mut ran_out = ConnState::opened(&p, Duration::ZERO, Some(budget.try_acquire(app).unwrap()));
    let wait = ran_out.close_wait().expect("it waits");
    wait.finish(false);
    drop(ran_out);
    let other = budget.class_id("other").unwrap();
    let _kept = budget.try_acquire(app).unwrap();
    let given_up = budget.try_acquire(app).unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| budget.acquire(other, Duration::from_secs(5)));
        wait_queued(&budget, other);
        assert_eq!(budget.reclaim_wanted(app), 1, "one waiter, two borrowed");
        let wait = CloseWait::abandoned(&p, Some(given_up))
            .expect("a session just set up waits for the server");
        assert_eq!(wait.bound(), Duration::from_millis(300));
        assert_eq!(budget.snapshot().in_use, 2, "held while it waits");
        assert_eq!(
            budget.reclaim_wanted(app),
            0,
            "the given-up connection's permit is coming: nothing more to give back"
        );
        let stats = p.stats().snapshot(Default::default());
        assert_eq!(
            (stats.connects, stats.closed.total()),
            (1, 1),
            "nothing counted for it: {stats:?}"
        );
        wait.finish(true);
        let _permit = waiter
            .join()
            .unwrap()
            .expect("the permit came back to the waiter");
    });
}

/// Waits up to 5 s for a waiter of `class` to queue on `budget`.
fn wait_queued(budget: &crate::budget::Budget, class: crate::budget::ClassId) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while budget.waiters(class) == 0 {
        assert!(Instant::now() < deadline, "the waiter never queued");
        std::thread::yield_now();
    }
}
