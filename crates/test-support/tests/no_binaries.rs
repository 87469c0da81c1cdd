//! Without server binaries: a clear error, and `pg_or_skip` skips (or fails under CI=true).
//! Its own test binary, because it points PG_BIN_DIR at nothing for the whole process.

use test_support::{ci_mode, pg_or_skip, PgServer, TestSupportError};

#[test]
fn missing_binaries_give_a_clear_error_and_skip_or_fail() {
    std::env::set_var("PG_BIN_DIR", "/nonexistent/pg/bin");
    let err = PgServer::start().unwrap_err();
    assert!(
        matches!(err, TestSupportError::BinariesNotFound(_)),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("PG_BIN_DIR=/nonexistent/pg/bin"), "{text}");

    let outcome = std::panic::catch_unwind(pg_or_skip);
    if ci_mode() {
        let panic = outcome.expect_err("CI=true must turn a missing server into a failure");
        let msg = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("CI=true") && msg.contains("PG_BIN_DIR"),
            "{msg}"
        );
    } else {
        assert!(outcome.unwrap().is_none());
    }
}
