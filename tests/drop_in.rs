//! The drop-in promise: an existing Diesel + r2d2 application keeps every call site when it
//! switches to the extended pool; only the type alias and the builder call change.

mod common;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

/// Code as it exists in applications today; none of it names the extended pool.
mod existing_app {
    use super::*;

    diesel::table! {
        notes (id) {
            id -> BigInt,
            body -> Text,
        }
    }

    pub fn add_note(conn: &mut PgConnection, id: i64, body: &str) -> QueryResult<usize> {
        diesel::insert_into(notes::table)
            .values((notes::id.eq(id), notes::body.eq(body)))
            .execute(conn)
    }

    pub fn all_notes(conn: &mut PgConnection) -> QueryResult<Vec<(i64, String)>> {
        notes::table.order(notes::id).load(conn)
    }

    /// A helper taking the pool through the application's alias.
    pub fn count_notes(pool: &super::DbPool) -> Result<i64, Box<dyn std::error::Error>> {
        let mut conn = pool.get()?;
        Ok(notes::table.count().get_result(&mut conn)?)
    }

    /// A helper that names r2d2's own types, as many applications do.
    pub fn first_note(
        conn: &mut r2d2::PooledConnection<impl r2d2::ManageConnection<Connection = PgConnection>>,
    ) -> QueryResult<String> {
        notes::table.select(notes::body).first(&mut **conn)
    }

    #[derive(QueryableByName)]
    pub struct Echo {
        #[diesel(sql_type = Text)]
        pub text: String,
    }

    pub fn echo(conn: &mut PgConnection) -> QueryResult<String> {
        Ok(diesel::sql_query("SELECT 'hi'::text AS text")
            .get_result::<Echo>(conn)?
            .text)
    }
}

// Before: `pub type DbPool = r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>>;`
pub type DbPool = resilient_diesel::PgPool;

#[test]
fn existing_call_sites_compile_and_run_unchanged_on_the_extended_pool() {
    let Some(pg) = common::server() else { return };
    // Before: `r2d2::Pool::builder().max_size(5).build(ConnectionManager::new(url))?`
    let pool: DbPool = resilient_diesel::PgPool::builder(&pg.url_with("sslmode=disable"))
        .pool_size(2)
        .max_overflow(3)
        .build()
        .unwrap();

    let mut conn = pool.get().unwrap();
    diesel::sql_query("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    existing_app::add_note(&mut conn, 1, "first").unwrap();
    conn.transaction(|c| existing_app::add_note(c, 2, "second"))
        .unwrap();
    assert_eq!(existing_app::all_notes(&mut conn).unwrap().len(), 2);
    assert_eq!(existing_app::first_note(&mut conn).unwrap(), "first");
    assert_eq!(existing_app::echo(&mut conn).unwrap(), "hi");
    drop(conn);
    assert_eq!(existing_app::count_notes(&pool).unwrap(), 2);

    // `&r2d2::Pool<_>` parameters accept the extended pool through Deref.
    fn takes_r2d2<M: r2d2::ManageConnection>(pool: &r2d2::Pool<M>) -> u32 {
        pool.max_size()
    }
    assert_eq!(takes_r2d2(&pool), 5);
    let n: i64 = diesel::select(diesel::dsl::sql::<BigInt>("count(*) FROM notes"))
        .get_result(&mut pool.get().unwrap())
        .unwrap();
    assert_eq!(n, 2);
}

#[test]
fn the_sqlite_pool_applies_busy_timeout_wal_and_foreign_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let pool = resilient_diesel::SqlitePool::builder(&format!("sqlite://{}", path.display()))
        .pool_size(2)
        .max_overflow(0)
        .build()
        .unwrap();
    let mut conn = pool.get().unwrap();
    #[derive(QueryableByName)]
    struct Timeout {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        timeout: i32,
    }
    #[derive(QueryableByName)]
    struct Journal {
        #[diesel(sql_type = Text)]
        journal_mode: String,
    }
    #[derive(QueryableByName)]
    struct Fk {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        foreign_keys: i32,
    }
    let t: Timeout = diesel::sql_query("PRAGMA busy_timeout")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(t.timeout, 5000);
    let j: Journal = diesel::sql_query("PRAGMA journal_mode")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(j.journal_mode, "wal");
    let f: Fk = diesel::sql_query("PRAGMA foreign_keys")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(f.foreign_keys, 1);
}
