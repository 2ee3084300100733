//! Shared setup for the Kafka tests: stored outbox messages and SQLite outbox databases. The
//! broker helpers (address, skipping, topics, raw reads) are in `waybill_testkit::kafka`.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

use std::path::PathBuf;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::SqliteConnection;
use waybill_outbox_core::{MessageId, OutboxMessage, Status};
use waybill_testkit::unique;

/// A stored outbox message as the relay would hand it over.
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

/// A pool on a migrated SQLite database of its own.
pub type SqlitePool = Pool<ConnectionManager<SqliteConnection>>;

/// Removes a test's SQLite database file, and its WAL files, when dropped.
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
