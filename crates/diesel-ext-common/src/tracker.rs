//! Per-connection state, carried inside the connection itself.
//!
//! r2d2 and bb8 hand their managers a bare connection, with no room for the pool's
//! bookkeeping. Diesel gives every connection an [`Instrumentation`] slot that can be
//! downcast (diesel-async's connections and the sync wrapper's inner connection included), so
//! each pooled connection carries a [`Tracker`] there: the engine's [`ConnState`], what the
//! adapter keeps besides (the sync pool: its duplicate of the socket; the async pool: whether
//! a round trip of its own is under way), and a view of every query's outcome. That last part
//! is what makes disconnect detection pool-wide with no change at call sites: a query that
//! fails with a connection-class error invalidates the pool's older connections (the
//! connection itself is closed at checkin, where the driver reports it broken).
//!
//! The application's own default instrumentation
//! (`diesel::connection::set_default_instrumentation`) keeps working: the tracker forwards
//! every event to it.
//!
//! # Transactions Diesel's manager did not open
//! A raw `BEGIN` (`batch_execute`, `sql_query`) leaves the session inside a transaction that
//! Diesel's transaction manager knows nothing of, and no driver lets the pool read the
//! server's transaction status (libpq's `PQtransactionStatus` needs the `PGconn` Diesel keeps
//! private; tokio-postgres drops the status byte of `ReadyForQuery`). So the tracker watches
//! the statements: a statement that may open a transaction block marks the session
//! *suspect* until a plain `COMMIT`/`ROLLBACK`/`END`/`ABORT` succeeds after it, and a
//! statement that started and never finished (its future dropped) marks it too. Only a
//! suspect session pays at checkin (a `ROLLBACK`, or the connection is closed); a session of
//! Diesel-built queries and Diesel-managed transactions pays a scan of each statement's text.
//!
//! The rule is sound because a transaction block can only be opened by a statement that
//! contains, as a whole word, `BEGIN`, `START` (`START TRANSACTION`), `SAVEPOINT` (SQLite
//! opens a transaction with it) or `CHAIN` (`COMMIT AND CHAIN`), and such a keyword is never
//! directly preceded by `"` or `.` (Diesel quotes every identifier it writes, so a column
//! named `"start"` does not count). A `BEGIN` inside a string, a `DO` body or a trigger's
//! `BEGIN ... END` counts: a false alarm never hands out a transaction. It costs the sync pool
//! a `ROLLBACK` round trip (SQLite refuses that `ROLLBACK` outside a transaction, and the
//! refusal counts as done), and the async pool the connection (bb8's checkin cannot wait for
//! a `ROLLBACK`, so a suspect connection is closed).

use diesel::connection::{Instrumentation, InstrumentationEvent};
use pool_core::classify::ErrorClass;
use pool_core::engine::{CloseWait, ConnState};

/// The pool's view of one connection; lives in the connection's instrumentation slot.
///
/// Field order matters: what the adapter keeps (`extra`, a socket duplicate say) is dropped
/// before the state, whose drop releases the budget permit (and the connection's own socket
/// is closed before its instrumentation).
pub struct Tracker<X: Extra> {
    /// What the adapter keeps besides the state.
    pub extra: X,
    /// The engine's state of this connection.
    pub state: ConnState,
    classify: fn(&diesel::result::Error) -> ErrorClass,
    session: Session,
    inner: Option<Box<dyn Instrumentation>>,
}

/// Which instrumentation event shows a driver's statement text without rendering it anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlAt {
    /// The statement is looked at when it starts (sync Diesel: both events render the query).
    Start,
    /// The statement is looked at when it finishes (diesel-async passes the SQL it already
    /// built); a statement that starts and never finishes counts as suspect.
    Finish,
}

/// What a statement may do to the session's transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEffect {
    /// It may open a block (or keep one open): the session becomes suspect.
    MayOpen,
    /// A plain `COMMIT`/`ROLLBACK`/`END`/`ABORT`: once it succeeds, no block is open.
    Closes,
    /// Neither.
    Neutral,
}

/// The transaction watch of one session (see the module docs).
#[derive(Debug)]
struct Session {
    sql_at: SqlAt,
    suspect: bool,
    in_flight: bool,
    closing: bool,
}

impl<X: Extra> Tracker<X> {
    /// The tracker of a connection in `state`, classifying its queries' errors with
    /// `classify`, forwarding every event to the application's default instrumentation.
    /// `sql_at` says where the driver shows a statement's text for free.
    pub fn new(
        state: ConnState,
        extra: X,
        classify: fn(&diesel::result::Error) -> ErrorClass,
        sql_at: SqlAt,
    ) -> Tracker<X> {
        Tracker {
            extra,
            state,
            classify,
            session: Session {
                sql_at,
                suspect: false,
                in_flight: false,
                closing: false,
            },
            inner: diesel::connection::get_default_instrumentation(),
        }
    }

    /// Whether the session may have been left inside a transaction block Diesel's manager did
    /// not open (a raw `BEGIN` not followed by a successful `COMMIT`/`ROLLBACK`, or a
    /// statement that never finished). Resets the watch for the next session.
    pub fn take_transaction_suspect(&mut self) -> bool {
        let s = &mut self.session;
        let suspect = s.suspect || s.in_flight;
        s.suspect = false;
        s.in_flight = false;
        s.closing = false;
        suspect
    }

    /// Marks the session suspect: nothing is known of what ran on it (its instrumentation was
    /// replaced while it was checked out, so its statements were not seen).
    pub fn mark_transaction_suspect(&mut self) {
        self.session.suspect = true;
    }

    fn on_statement(&mut self, effect: TxEffect) {
        match effect {
            TxEffect::MayOpen => self.session.suspect = true,
            TxEffect::Closes => self.session.closing = true,
            TxEffect::Neutral => {}
        }
    }
}

/// What `sql` may do to the session's transaction block (see the module docs).
pub fn tx_effect(sql: &str) -> TxEffect {
    const OPENERS: [&[u8]; 4] = [b"BEGIN", b"START", b"SAVEPOINT", b"CHAIN"];
    let bytes = sql.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
    let mut i = 0;
    while i < bytes.len() {
        if !is_word(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_word(bytes[i]) {
            i += 1;
        }
        let quoted = start > 0 && matches!(bytes[start - 1], b'"' | b'.');
        let word = &bytes[start..i];
        if !quoted && OPENERS.iter().any(|k| word.eq_ignore_ascii_case(k)) {
            return TxEffect::MayOpen;
        }
    }
    let trimmed = sql.trim_ascii();
    let trimmed = trimmed.strip_suffix(';').unwrap_or(trimmed).trim_ascii();
    let mut words = trimmed.split_ascii_whitespace();
    let first = words.next().unwrap_or("");
    let closes = ["COMMIT", "END", "ROLLBACK", "ABORT"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k));
    let rest_ok = match (words.next(), words.next()) {
        (None, _) => true,
        (Some(w), None) => w.eq_ignore_ascii_case("WORK") || w.eq_ignore_ascii_case("TRANSACTION"),
        _ => false,
    };
    if closes && rest_ok {
        TxEffect::Closes
    } else {
        TxEffect::Neutral
    }
}

/// What the statement `query` (an instrumentation event's) may do to the session's
/// transaction block: [`tx_effect`] of the SQL Diesel writes first when formatting it, without
/// the bind values it writes after (which would cost a `Debug` of every bind).
pub fn statement_effect(query: &dyn diesel::connection::DebugQuery) -> TxEffect {
    struct First(Option<TxEffect>);
    impl std::fmt::Write for First {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 = Some(tx_effect(s));
            // Stop: the rest is the bind values.
            Err(std::fmt::Error)
        }
    }
    let mut first = First(None);
    let _ = std::fmt::write(&mut first, format_args!("{query}"));
    // Nothing written (a query that cannot be rendered): assume the worst.
    first.0.unwrap_or(TxEffect::MayOpen)
}

impl<X: Extra> std::fmt::Debug for Tracker<X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("connection", &self.state.id())
            .finish_non_exhaustive()
    }
}

/// What the adapter keeps in a [`Tracker`] besides the state, told when a statement succeeded
/// and when the connection closed.
pub trait Extra: Send + 'static {
    /// A statement on the connection just succeeded: the connection was alive and its
    /// socket open at that moment (the sync adapter resolves a pending socket here).
    fn after_success(&mut self) {}

    /// The connection's driver has just closed it (the tracker is dropped after the driver's
    /// own socket) and `wait` holds its budget permit: release it once the server confirmed
    /// the session gone, within [`CloseWait::bound`], with [`CloseWait::finish`] (`true`
    /// once the end-of-file came or the socket is dead, `false` when the bound ran out). An
    /// adapter that cannot tell (no socket of its own) drops `wait`, which releases the
    /// permit at once, as the default does. A sync adapter waits here; an async one hands
    /// `wait` to a task and returns.
    fn confirm_close(&mut self, wait: CloseWait) {
        drop(wait);
    }
}

impl<X: Extra> Drop for Tracker<X> {
    /// A tracker is dropped when its connection closes (after the driver's socket), or when
    /// the application replaced it while the connection is checked out: then nothing
    /// closes, and the state keeps its permits (see `ConnState`'s `Drop`). When it closes,
    /// the budget permit the state holds is released only after the server confirmed the
    /// session gone, within the pool's bound (see `ConnState::close_wait`).
    fn drop(&mut self) {
        if let Some(wait) = self.state.close_wait() {
            self.extra.confirm_close(wait);
        }
    }
}

impl Extra for () {}

/// Closes `conn`, a connection given up before it joined `pool` (its session was set up,
/// then its setup failed: a session setting, the after-connect hook): `permit`, its budget
/// permit, comes back once the server confirmed the session gone, within the bound, through
/// `extra`'s [`Extra::confirm_close`], as for any closed connection. Released at once, it
/// would let the next connect in while the server still counts this session.
pub fn close_abandoned<C, X: Extra>(
    pool: &std::sync::Arc<pool_core::engine::PoolState>,
    conn: C,
    mut extra: X,
    permit: Option<pool_core::budget::Permit>,
) {
    // The driver closes its own descriptor; ours (in `extra`) keeps the socket open.
    drop(conn);
    if let Some(wait) = CloseWait::abandoned(pool, permit) {
        extra.confirm_close(wait);
    }
}

impl<X: Extra> Instrumentation for Tracker<X> {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        match &event {
            InstrumentationEvent::StartQuery { query, .. } => {
                // The previous statement never finished (its future was dropped): whatever it
                // was, it may have run.
                if std::mem::replace(&mut self.session.in_flight, true) {
                    self.session.suspect = true;
                }
                self.session.closing = false;
                if self.session.sql_at == SqlAt::Start {
                    self.on_statement(statement_effect(*query));
                }
            }
            InstrumentationEvent::FinishQuery { query, error, .. } => {
                self.session.in_flight = false;
                if self.session.sql_at == SqlAt::Finish {
                    self.on_statement(statement_effect(*query));
                }
                if std::mem::take(&mut self.session.closing) && error.is_none() {
                    self.session.suspect = false;
                }
                if error.is_none() {
                    self.extra.after_success();
                }
                if let Some(err) = error {
                    self.state.observe_error((self.classify)(err));
                }
            }
            _ => {}
        }
        if let Some(inner) = self.inner.as_mut() {
            inner.on_connection_event(event);
        }
    }
}

/// The tracker in a connection's instrumentation slot (`conn.instrumentation()`), if it still
/// carries one (an application may have replaced the connection's instrumentation).
pub fn tracker_of<X: Extra>(instrumentation: &mut dyn Instrumentation) -> Option<&mut Tracker<X>> {
    instrumentation.downcast_mut::<Tracker<X>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tx_effect(sql)`, on a thread of its own given 5 s: a scan that no longer advances
    /// fails the test by this assertion instead of hanging it.
    fn effect(sql: &str) -> TxEffect {
        let (tx, rx) = std::sync::mpsc::channel();
        let owned = sql.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(tx_effect(&owned));
        });
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("tx_effect({sql:?}) did not return within 5 s: {e}"))
    }

    #[test]
    fn statements_that_may_open_a_transaction_block_are_suspect() {
        for sql in [
            "BEGIN",
            "begin;",
            "  Begin Transaction Isolation Level Serializable",
            "START TRANSACTION",
            "start transaction read only",
            "SELECT 1; BEGIN",
            "/* c */BEGIN",
            "--x\nBEGIN",
            "COMMIT AND CHAIN",
            "rollback and chain",
            "SAVEPOINT s1",
            "BEGIN IMMEDIATE",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT 'begin'",
            "SELECT 1;BEGIN;",
            "SELECT start FROM events",
        ] {
            assert_eq!(effect(sql), TxEffect::MayOpen, "{sql}");
        }
    }

    #[test]
    fn plain_commits_and_rollbacks_close_and_nothing_else_does() {
        for sql in [
            "COMMIT",
            "commit;",
            " ROLLBACK ",
            "END",
            "ABORT",
            "COMMIT WORK",
            "rollback transaction;",
        ] {
            assert_eq!(effect(sql), TxEffect::Closes, "{sql}");
        }
        for sql in [
            "COMMIT PREPARED 'x'",
            "ROLLBACK TO SAVEPOINT s",
            "RELEASE SAVEPOINT s",
            "COMMIT; SELECT 1",
            "PREPARE TRANSACTION 'x'",
            "SELECT 1",
            "",
        ] {
            assert_ne!(effect(sql), TxEffect::Closes, "{sql}");
        }
    }

    #[test]
    fn diesel_built_queries_are_neutral_even_with_columns_named_like_keywords() {
        for sql in [
            r#"SELECT "events"."start", "events"."begin" FROM "events" WHERE "events"."id" = $1"#,
            r#"INSERT INTO "chains" ("chain_id", "started_at") VALUES ($1, $2)"#,
            "SELECT 1",
            "UPDATE t SET beginning = 1, restart = 2",
        ] {
            assert_eq!(effect(sql), TxEffect::Neutral, "{sql}");
        }
    }

    #[test]
    fn a_trackers_debug_names_its_connection_and_nothing_else() {
        let config = pool_core::config::PoolConfig::builder("postgres://app:s3cr%40t@db/app")
            .build()
            .unwrap();
        let pool = std::sync::Arc::new(
            pool_core::engine::PoolState::new(
                config,
                std::sync::Arc::new(|_: &pool_core::events::PoolEvent<'_>| {}),
                None,
            )
            .unwrap(),
        );
        let state = ConnState::adopted(&pool);
        let id = state.id();
        let tracker = Tracker::new(
            state,
            (),
            |_: &diesel::result::Error| ErrorClass::Permanent,
            SqlAt::Start,
        );
        assert_eq!(
            format!("{tracker:?}"),
            format!("Tracker {{ connection: {id}, .. }}")
        );
    }

    #[test]
    fn underscores_dollars_and_non_ascii_letters_are_part_of_a_word() {
        // PostgreSQL's identifiers hold `_`, `$` and non-ASCII letters: a keyword inside one
        // is no keyword (each of these would be a false alarm, a ROLLBACK round trip at
        // every checkin, were the word split there).
        for sql in [
            "SELECT my_begin FROM t",
            "SELECT a$start FROM t",
            "SELECT xébegin FROM t",
            "SELECT 1 AS nächster_savepoint",
        ] {
            assert_eq!(effect(sql), TxEffect::Neutral, "{sql}");
        }
    }
}
