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

/// The row of [`IdempotencyTable::insert_returning_xmin_sql_pg`] and
/// [`IdempotencyTable::xmin_sql_pg`] (PostgreSQL): the id of the transaction that inserted
/// the key, as text.
///
/// [`IdempotencyTable::insert_returning_xmin_sql_pg`]: pool_core::retry::IdempotencyTable::insert_returning_xmin_sql_pg
/// [`IdempotencyTable::xmin_sql_pg`]: pool_core::retry::IdempotencyTable::xmin_sql_pg
#[derive(Debug, diesel::QueryableByName)]
pub struct XminRow {
    /// `xmin::text`.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub xmin: String,
}

impl XminRow {
    /// The transaction id, if the text is one.
    pub fn id(&self) -> Option<u32> {
        self.xmin.trim().parse().ok()
    }
}

/// The row of [`sql::END_ABANDONED`](pool_core::retry::sql::END_ABANDONED) (PostgreSQL):
/// how many sessions were told to end.
#[derive(Debug, diesel::QueryableByName)]
pub struct EndedRow {
    /// `count(*)`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub ended: i64,
}

/// Whose commit the key found by a resolution's probe is: `ours` is the id of the
/// transaction whose `COMMIT` was cut off (from the key's `RETURNING xmin`), `found` the
/// `xmin` of the key's row now. The same id: ours committed. Another: ours did not, a
/// concurrent transaction with the same key did ([`Resolved::CommittedElsewhere`]). Not
/// known (a backend without transaction ids, or the row gone): committed, the answer that
/// never runs the body twice.
pub fn key_owner(ours: Option<u32>, found: Option<u32>) -> Resolved {
    match (ours, found) {
        (Some(ours), Some(found)) if ours != found => Resolved::CommittedElsewhere,
        _ => Resolved::Committed,
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
        assert_eq!(key_owner(Some(7), Some(7)), Resolved::Committed);
        assert_eq!(key_owner(Some(7), Some(8)), Resolved::CommittedElsewhere);
        assert_eq!(key_owner(None, Some(8)), Resolved::Committed);
        assert_eq!(key_owner(Some(7), None), Resolved::Committed);
        let row = XminRow {
            xmin: "4294967295".to_owned(),
        };
        assert_eq!(row.id(), Some(u32::MAX));
        assert_eq!(XminRow { xmin: "x".into() }.id(), None);
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
