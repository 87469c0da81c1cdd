//! `pool-doctor check` through a private PgBouncer in transaction mode (test-support's,
//! installed when missing; under `CI=true` a PgBouncer that cannot start fails the test):
//! the pooler is detected and the fix named.

mod common;

use common::{doctor, run, server};
use test_support::{pgbouncer_or_skip, PgBouncerOptions, PgOptions, PoolMode};

#[test]
fn a_transaction_mode_pooler_is_detected_and_the_setting_named() {
    let Some(pg) = server(PgOptions::new().ssl(false)) else {
        return;
    };
    let Some(bouncer) = pgbouncer_or_skip(
        &pg,
        PgBouncerOptions::new(PoolMode::Transaction).pool_size(4),
    ) else {
        return;
    };
    let url = bouncer.url_with("sslmode=disable");
    let out = run(doctor(&["check", "--json", "--url", &url], &[]));
    let pooler = out.check("pooler");
    println!("{pooler:#}");
    assert_eq!(pooler["outcome"], "warn", "{}", out.stdout);
    assert_eq!(
        pooler["fix"],
        "transaction-mode pooler detected: set DB_POOLER=transaction"
    );
    assert_eq!(pooler["data"]["transaction_mode"], true);
    // Directly to the server: nothing in front.
    let out = run(doctor(
        &["check", "--json", "--url", &pg.url_with("sslmode=disable")],
        &[],
    ));
    assert_eq!(out.outcome("pooler"), "pass", "{}", out.stdout);
    assert_eq!(out.check("pooler")["data"]["transaction_mode"], false);
}
