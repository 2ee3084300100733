//! The `waybill` binary against real databases: each test gets its own SQLite file or
//! PostgreSQL schema, migrated, and the URL the binary is given.
//!
//! `PG_DATABASE_URL` falls back to the local default. An unreachable server skips the test with
//! a `SKIPPED:` line, unless `WAYBILL_REQUIRE_SERVERS=1` (set by CI) makes it a failure.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

use std::io::Write;
use std::process::{Command, Output, Stdio};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection, R2D2Connection};
use waybill_diesel::{InboxConnection, OpsConnection};

/// The connection types the suites run on.
pub trait Backend: OpsConnection + InboxConnection + R2D2Connection + Connection + 'static {
    /// `(reason, skipped_by, attempts)` of every row in `outbox_skipped`.
    fn skipped(conn: &mut Self) -> Vec<(String, String, i64)>;
}

#[derive(QueryableByName)]
struct Skipped {
    #[diesel(sql_type = diesel::sql_types::Text)]
    reason: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    skipped_by: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    attempts: i64,
}

const SKIPPED: &str =
    "SELECT reason, skipped_by, CAST(attempts AS BIGINT) AS attempts FROM outbox_skipped";

macro_rules! backend {
    ($conn:ty) => {
        impl Backend for $conn {
            fn skipped(conn: &mut Self) -> Vec<(String, String, i64)> {
                let rows: Vec<Skipped> =
                    diesel::sql_query(SKIPPED).load(conn).expect("skipped rows");
                rows.into_iter()
                    .map(|r| (r.reason, r.skipped_by, r.attempts))
                    .collect()
            }
        }
    };
}
backend!(SqliteConnection);
backend!(PgConnection);

/// A migrated, isolated database, dropped with the value.
pub struct TestDb<C: R2D2Connection + 'static> {
    pub pool: Pool<ConnectionManager<C>>,
    /// What `--database-url` gets.
    pub url: String,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl<C: R2D2Connection + 'static> TestDb<C> {
    pub fn conn(&self) -> PooledConnection<ConnectionManager<C>> {
        self.pool.get().expect("a pooled test connection")
    }

    /// Runs `waybill --database-url <url> args...` with `stdin` fed to it.
    pub fn waybill(&self, args: &[&str], stdin: &str) -> Run {
        waybill(&self.url, args, stdin)
    }
}

impl<C: R2D2Connection + 'static> Drop for TestDb<C> {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

/// A finished run of the binary.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{self:?}");
        self
    }
}

pub fn waybill(url: &str, args: &[&str], stdin: &str) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the waybill binary starts");
    let mut input = child.stdin.take().expect("stdin");
    // The binary may exit before reading (usage errors); a closed pipe is fine then.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("waybill finishes");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub fn unique_name() -> String {
    format!("waybill_t_{}", uuid::Uuid::new_v4().simple())
}

pub fn skip(what: &str, url: &str, error: &dyn std::fmt::Display) {
    let message =
        format!("{what} not reachable at {url} ({error}); set the URL or start the server");
    if std::env::var("WAYBILL_REQUIRE_SERVERS").is_ok_and(|v| v == "1") {
        panic!("WAYBILL_REQUIRE_SERVERS=1 but {message}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
}

/// A fresh SQLite file; migrated unless `migrated` is false.
pub fn sqlite_db(migrated: bool) -> TestDb<SqliteConnection> {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name()));
    let file = path.to_string_lossy().into_owned();
    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(&file))
        .expect("a SQLite pool");
    if migrated {
        waybill_diesel::run_migrations(&mut pool.get().expect("conn")).expect("migrations");
    }
    TestDb {
        pool,
        url: format!("sqlite://{file}"),
        cleanup: Some(Box::new(move || {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        })),
    }
}

pub fn sqlite() -> Option<TestDb<SqliteConnection>> {
    Some(sqlite_db(true))
}

pub fn pg_url() -> String {
    std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh PostgreSQL schema; migrated unless `migrated` is false.
pub fn postgres_db(migrated: bool) -> Option<TestDb<PgConnection>> {
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
        .max_size(4)
        .build(ConnectionManager::<PgConnection>::new(&schema_url))
        .expect("a PostgreSQL pool");
    if migrated {
        waybill_diesel::run_migrations(&mut pool.get().expect("conn")).expect("migrations");
    }
    Some(TestDb {
        pool,
        url: schema_url,
        cleanup: Some(Box::new(move || {
            let _ = admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
        })),
    })
}

pub fn postgres() -> Option<TestDb<PgConnection>> {
    postgres_db(true)
}

/// Instantiates generic test functions `fn name<C: Backend>(db: TestDb<C>)` for SQLite and
/// PostgreSQL.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { if let Some(db) = $crate::common::sqlite() { super::$name(db) } } )*
        }
        mod postgres {
            $( #[test] fn $name() { if let Some(db) = $crate::common::postgres() { super::$name(db) } } )*
        }
    };
}
