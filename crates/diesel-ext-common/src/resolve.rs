//! Diesel's side of resolving a `COMMIT` cut off by a lost connection (the bookkeeping is
//! [`pool_core::retry::Resolution`]'s): what the idempotency key's insert answers, and a
//! question that failed.

use diesel::result::{DatabaseErrorKind, Error};
use diesel::QueryResult;
use pool_core::classify::ErrorClass;
use pool_core::retry::{Asked, Resolved};

/// Whether `e` is a unique violation: the idempotency key is there already.
pub fn is_unique_violation(e: &Error) -> bool {
    matches!(
        e,
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
    )
}

/// The answer of the idempotency key inserted again in a throwaway transaction: it went in,
/// so the cut-off transaction did not commit; it was there already, so it did. Any other
/// error is the question's failure.
///
/// # Errors
/// The insert's error, when it is not a unique violation.
pub fn key_probe_answer(probe: QueryResult<()>) -> QueryResult<Asked> {
    match probe {
        Ok(()) => Ok(Asked::Answer(Resolved::Aborted)),
        Err(e) if is_unique_violation(&e) => Ok(Asked::Answer(Resolved::Committed)),
        Err(e) => Err(e),
    }
}

/// What a question asked on a connection came to: its answer, or its error with the error's
/// class (by `classify`) and message (masked by `redact`).
pub fn asked(
    result: QueryResult<Asked>,
    classify: fn(&Error) -> ErrorClass,
    redact: impl FnOnce(&str) -> String,
) -> Asked {
    match result {
        Ok(asked) => asked,
        Err(e) => Asked::Failed {
            class: classify(&e),
            message: redact(&e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_insert_answers_whether_the_cut_off_transaction_committed() {
        let unique = || {
            Error::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                Box::new("duplicate key".to_owned()),
            )
        };
        assert_eq!(
            key_probe_answer(Ok(())).unwrap(),
            Asked::Answer(Resolved::Aborted)
        );
        assert_eq!(
            key_probe_answer(Err(unique())).unwrap(),
            Asked::Answer(Resolved::Committed)
        );
        assert!(key_probe_answer(Err(Error::NotFound)).is_err());
        let failed = asked(
            Err(Error::NotFound),
            crate::classify::classify_diesel_sync,
            str::to_uppercase,
        );
        assert_eq!(
            failed,
            Asked::Failed {
                class: ErrorClass::Permanent,
                message: "RECORD NOT FOUND".to_owned()
            }
        );
    }
}
