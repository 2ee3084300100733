//! A SQLite outbox of a test's own, and what the transports' relay tests read back from it: the
//! rows the relay left, and the warnings it logged.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{Integer, Nullable, SmallInt, Text};
use waybill_diesel::{enqueue_all, DieselStore};
use waybill_outbox_core::{
    Backoff, MessageId, NewOutboxMessage, OutboxMessage, Publisher, Relay, RelayConfig, Status,
};

use crate::unique;

/// A pool on a migrated SQLite database of its own.
pub type SqlitePool = Pool<ConnectionManager<SqliteConnection>>;

/// Removes a test's SQLite database file, and its WAL files, when dropped.
#[derive(Debug)]
pub struct TempDatabase(PathBuf);

impl Drop for TempDatabase {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

/// A pool of `max_size` connections on a new, migrated SQLite database in a temporary file
/// named after `prefix`; keep the guard alive as long as the database is used.
pub fn sqlite(prefix: &str, max_size: u32) -> (SqlitePool, TempDatabase) {
    let path = std::env::temp_dir().join(format!("{}.db", unique(prefix)));
    let pool = Pool::builder()
        .max_size(max_size)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .expect("sqlite pool");
    waybill_diesel::run_migrations(&mut pool.get().expect("sqlite connection"))
        .expect("migrations");
    (pool, TempDatabase(path))
}

/// Enqueues `messages` in one transaction.
pub fn enqueue(pool: &SqlitePool, messages: &[NewOutboxMessage]) {
    let mut conn = pool.get().expect("sqlite connection");
    conn.transaction(|conn| enqueue_all(conn, messages))
        .expect("enqueue");
}

/// A new message of `key` on `topic` whose JSON payload is `index`.
pub fn message(topic: &str, key: &str, index: u32) -> NewOutboxMessage {
    NewOutboxMessage::json(topic, key, "Step", &index).expect("a JSON payload")
}

/// A stored outbox message as the relay would hand it over, with a `correlation-id` header
/// `corr-<seq>`.
pub fn stored(seq: i64, topic: &str, key: &str, payload: &str) -> OutboxMessage {
    let mut message = OutboxMessage::new(seq, MessageId::new(), Status::Pending);
    message.topic = topic.into();
    message.partition_key = key.into();
    message.message_type = "Step".into();
    message.content_type = "application/json".into();
    message.payload = payload.as_bytes().to_vec();
    message
        .headers
        .insert("correlation-id".into(), format!("corr-{seq}"));
    message.created_at = chrono::Utc::now();
    message
}

/// A relay on `pool` whose retries are due at once, so a test drives it round by round.
pub fn relay_retrying_at_once<P: Publisher>(
    pool: &SqlitePool,
    publisher: P,
) -> Relay<DieselStore<SqliteConnection>, P> {
    Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default().backoff(Backoff::new(Duration::ZERO, Duration::ZERO)),
    )
}

/// A row of the outbox, as the relay left it.
#[derive(Debug, QueryableByName)]
pub struct Row {
    /// [`PENDING`] or [`PARKED`].
    #[diesel(sql_type = SmallInt)]
    pub status: i16,
    /// Attempts charged to the message.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Why the last attempt failed.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// The message's partition key.
    #[diesel(sql_type = Text)]
    pub partition_key: String,
    /// The payload, as text.
    #[diesel(sql_type = Text)]
    pub payload: String,
}

/// [`Row::status`] of a message waiting to be published.
pub const PENDING: i16 = 0;
/// [`Row::status`] of a parked message.
pub const PARKED: i16 = 2;

/// The rows left in the outbox (published ones are deleted), in outbox order.
pub fn rows(pool: &SqlitePool) -> Vec<Row> {
    diesel::sql_query(
        "SELECT status, attempts, last_error, partition_key, CAST(payload AS TEXT) AS payload \
         FROM outbox_messages ORDER BY seq",
    )
    .load(&mut pool.get().expect("sqlite connection"))
    .expect("outbox rows")
}

/// Installs the logger that keeps this test binary's warnings for [`warnings_about`]; call it
/// before the code under test logs.
pub fn capture_warnings() {
    warnings();
}

/// The warnings logged so far in this test binary that mention `name` (each test picks out
/// its own by a unique name). The first call installs the capturing logger.
pub fn warnings_about(name: &str) -> Vec<String> {
    let all = warnings().lock().expect("warnings");
    all.iter().filter(|w| w.contains(name)).cloned().collect()
}

fn warnings() -> &'static Mutex<Vec<String>> {
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                warnings()
                    .lock()
                    .expect("warnings")
                    .push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static WARNINGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    static LOGGER: Capture = Capture;
    WARNINGS.get_or_init(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Warn);
        Mutex::default()
    })
}
