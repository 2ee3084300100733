//! Backend quirks, configuration and input that must be refused or handled instead of breaking
//! the relay or the inbox: error texts, exact key comparison, bounds on leases and batch sizes,
//! large batches and messages, serializable writers, sequence caches.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Backend, TestDb};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::{topic_stats, DieselStore, Error};
use waybill_outbox_core::OutboxStore;

fn database_errors_name_their_cause<C: Backend>(db: TestDb<C>) {
    // A statement the database refuses: the error's text carries the database's reason.
    let refused = db
        .conn()
        .batch_execute("INSERT INTO outbox_messages (topic) VALUES ('t')")
        .unwrap_err();
    let diesel::result::Error::DatabaseError(_, ref info) = refused else {
        panic!("not a database error: {refused:?}");
    };
    let reason = info.message().to_owned();
    let error = Error::from(refused);
    assert!(
        error.to_string().contains(&reason),
        "{error} does not say why ({reason})"
    );

    // A table that does not exist: the error says so and what to do.
    db.conn()
        .batch_execute("DROP TABLE outbox_messages")
        .unwrap();
    let missing = topic_stats(&mut db.conn()).unwrap_err().to_string();
    assert!(missing.contains("outbox_messages"), "{missing}");
    assert!(missing.contains("waybill migrate"), "{missing}");
}

backend_tests!(database_errors_name_their_cause);

#[test]
fn pool_errors_name_their_cause() {
    let dir = std::env::temp_dir().join(format!("waybill_missing_{}", uuid::Uuid::new_v4()));
    let url = dir.join("outbox.db").to_string_lossy().into_owned();
    let pool = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(200))
        .build_unchecked(ConnectionManager::<SqliteConnection>::new(url));
    let error = DieselStore::new(pool)
        .claim(10, Duration::from_secs(30), "relay")
        .unwrap_err();
    assert!(matches!(error, Error::Pool(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("timed out waiting for connection")
            && text.to_lowercase().contains("unable to open"),
        "{text}"
    );
}
