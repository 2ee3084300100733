//! One test harness for every backend: each test gets its own SQLite file, PostgreSQL schema or
//! MySQL database, migrated, so the suites run in parallel and twice in a row.
//!
//! Server URLs: `PG_DATABASE_URL` / `MYSQL_DATABASE_URL`, falling back to the local defaults.
//! An unreachable server skips its suite with a message, unless `WAYBILL_REQUIRE_SERVERS=1`
//! (set by CI), which turns the skip into a failure.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use waybill_diesel::{InboxConnection, OutboxConnection};

pub type TestPool<C> = Pool<ConnectionManager<C>>;

/// A migrated, isolated database that is dropped with the value.
pub struct TestDb<C: R2D2Connection + 'static> {
    pub pool: TestPool<C>,
    /// The database URL the pool connects to (the binary's tests hand it to `waybill`).
    pub url: String,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl<C: R2D2Connection + 'static> TestDb<C> {
    pub fn conn(&self) -> diesel::r2d2::PooledConnection<ConnectionManager<C>> {
        self.pool.get().expect("a pooled test connection")
    }
}

impl<C: R2D2Connection + 'static> Drop for TestDb<C> {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

/// The connection types the suites run on.
pub trait Backend:
    OutboxConnection + InboxConnection + R2D2Connection + Connection + 'static
{
    const NAME: &'static str;
}

impl Backend for SqliteConnection {
    const NAME: &'static str = "sqlite";
}
impl Backend for PgConnection {
    const NAME: &'static str = "postgres";
}
#[cfg(feature = "mysql")]
impl Backend for MysqlConnection {
    const NAME: &'static str = "mysql";
}

fn unique_name() -> String {
    format!("waybill_t_{}", uuid::Uuid::new_v4().simple())
}

/// The one skip line of every suite (shared with the transports' and the audit's tests).
#[path = "../../../transports/testkit/src/skip.rs"]
mod skip_line;

fn skip(backend: &str, url: &str, error: &dyn std::fmt::Display) {
    let url = waybill_outbox_core::redact_url(url);
    skip_line::skip(
        backend,
        skip_line::variable_for(backend),
        &format!("not reachable at {url}: {error}"),
    );
}

const POOL_SIZE: u32 = 8;

pub fn sqlite() -> Option<TestDb<SqliteConnection>> {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name()));
    let url = path.to_string_lossy().into_owned();
    let pool = Pool::builder()
        .max_size(POOL_SIZE)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(&url))
        .expect("a SQLite pool");
    waybill_diesel::run_migrations(&mut pool.get().expect("conn")).expect("migrations");
    Some(TestDb {
        pool,
        url,
        cleanup: Some(Box::new(move || {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        })),
    })
}

pub fn pg_url() -> String {
    std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn postgres() -> Option<TestDb<PgConnection>> {
    let url = pg_url();
    let mut admin = match PgConnection::establish(&url) {
        Ok(conn) => conn,
        Err(error) => {
            skip("PostgreSQL", &url, &error);
            return None;
        }
    };
    let schema = unique_name();
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .expect("create schema");
    let separator = if url.contains('?') { '&' } else { '?' };
    let schema_url = format!("{url}{separator}options=-csearch_path%3D{schema}");
    let pool = Pool::builder()
        .max_size(POOL_SIZE)
        .build(ConnectionManager::<PgConnection>::new(&schema_url))
        .expect("a PostgreSQL pool");
    waybill_diesel::run_migrations(&mut pool.get().expect("conn")).expect("migrations");
    Some(TestDb {
        pool,
        url: schema_url,
        cleanup: Some(Box::new(move || {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
        })),
    })
}

#[cfg(feature = "mysql")]
pub fn mysql_url() -> String {
    std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

#[cfg(feature = "mysql")]
pub fn mysql() -> Option<TestDb<MysqlConnection>> {
    let url = mysql_url();
    let mut admin = match MysqlConnection::establish(&url) {
        Ok(conn) => conn,
        Err(error) => {
            skip("MySQL/MariaDB", &url, &error);
            return None;
        }
    };
    let database = unique_name();
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .expect("create database");
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    let database_url = format!("{base}/{database}");
    let pool = Pool::builder()
        .max_size(POOL_SIZE)
        .build(ConnectionManager::<MysqlConnection>::new(&database_url))
        .expect("a MySQL pool");
    waybill_diesel::run_migrations(&mut pool.get().expect("conn")).expect("migrations");
    Some(TestDb {
        pool,
        url: database_url,
        cleanup: Some(Box::new(move || {
            let _ = admin.batch_execute(&format!("DROP DATABASE {database}"));
        })),
    })
}

/// Instantiates generic test functions `fn name<C: Backend>(db: TestDb<C>)` for every backend.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { if let Some(db) = $crate::common::sqlite() { super::$name(db) } } )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $( #[test] fn $name() { if let Some(db) = $crate::common::postgres() { super::$name(db) } } )*
        }
        #[cfg(feature = "mysql")]
        mod mysql {
            $( #[test] fn $name() { if let Some(db) = $crate::common::mysql() { super::$name(db) } } )*
        }
    };
}
