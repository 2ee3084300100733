//! `enqueue` joins the caller's transaction, round-trips messages exactly and refuses bad input,
//! on every backend.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Backend, TestDb};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use proptest::prelude::*;
use waybill_diesel::{enqueue, enqueue_all, find_message, topic_stats, Error, Outbox};
use waybill_outbox_core::{Limits, MessageId, NewOutboxMessage, Status, ValidationError};

fn message(key: &str) -> NewOutboxMessage {
    NewOutboxMessage::json(
        "orders",
        key,
        "OrderPlaced",
        &serde_json::json!({"key": key}),
    )
    .expect("json payload")
}

fn pending<C: Backend>(db: &TestDb<C>) -> i64 {
    topic_stats(&mut db.conn())
        .expect("stats")
        .iter()
        .map(|s| s.pending + s.parked)
        .sum()
}

fn committed_message_round_trips_exactly<C: Backend>(db: TestDb<C>) {
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let msg = NewOutboxMessage::bytes(
        "billing.v1",
        "order:4231",
        "PaymentCaptured",
        "application/x-custom",
        vec![0, 159, 146, 150, 255],
    )
    .with_header(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .with_header("correlation-id", "réservation ☃")
    .available_at(at);
    let mut conn = db.conn();
    conn.transaction(|conn| enqueue(conn, &msg))
        .expect("enqueue");
    let stored = find_message(&mut conn, msg.id())
        .expect("find")
        .expect("stored");
    assert_eq!(stored.id, msg.id());
    assert_eq!(stored.topic, msg.topic());
    assert_eq!(stored.partition_key, msg.partition_key());
    assert_eq!(stored.message_type, msg.message_type());
    assert_eq!(stored.content_type, msg.content_type());
    assert_eq!(stored.payload, msg.payload());
    assert_eq!(&stored.headers, msg.headers());
    assert_eq!(Some(stored.available_at), msg.available_after());
    assert_eq!(stored.status, Status::Pending);
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.last_error, None);
    assert_eq!(stored.published_at, None);
}

fn rolled_back_transaction_leaves_no_trace<C: Backend>(db: TestDb<C>) {
    let msg = message("order:1");
    let result = db.conn().transaction(|conn| {
        enqueue(conn, &msg)?;
        Err::<(), Error>(Error::Database(DieselError::RollbackTransaction))
    });
    assert!(result.is_err());
    assert_eq!(find_message(&mut db.conn(), msg.id()).expect("find"), None);
    assert_eq!(pending(&db), 0);
}

fn rolled_back_savepoint_inside_committed_transaction_leaves_no_trace<C: Backend>(db: TestDb<C>) {
    let kept = message("order:1");
    let dropped = message("order:2");
    db.conn()
        .transaction(|conn| {
            enqueue(conn, &kept)?;
            let inner = conn.transaction(|conn| {
                enqueue(conn, &dropped)?;
                Err::<(), Error>(Error::Database(DieselError::RollbackTransaction))
            });
            assert!(inner.is_err());
            Ok::<_, Error>(())
        })
        .expect("outer transaction commits");
    let mut conn = db.conn();
    assert!(find_message(&mut conn, kept.id()).expect("find").is_some());
    assert_eq!(find_message(&mut conn, dropped.id()).expect("find"), None);
}

fn enqueue_all_writes_a_thousand_messages_in_order<C: Backend>(db: TestDb<C>) {
    let messages: Vec<_> = (0..1000)
        .map(|i| message(&format!("order:{}", i % 7)))
        .collect();
    db.conn()
        .transaction(|conn| enqueue_all(conn, &messages))
        .expect("enqueue_all");
    let mut conn = db.conn();
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| {
            find_message(&mut conn, m.id())
                .expect("find")
                .expect("stored")
                .seq
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq follows the order of the batch"
    );
    assert_eq!(pending(&db), 1000);
}

fn enqueue_all_beyond_one_statement_needs_a_transaction<C: Backend>(db: TestDb<C>) {
    let messages: Vec<_> = (0..1001).map(|i| message(&format!("order:{i}"))).collect();
    let result = enqueue_all(&mut db.conn(), &messages);
    assert!(
        matches!(result, Err(Error::NotInTransaction(1001))),
        "{result:?}"
    );
    assert_eq!(pending(&db), 0);
    db.conn()
        .transaction(|conn| enqueue_all(conn, &messages))
        .expect("inside a transaction");
    assert_eq!(pending(&db), 1001);
}

fn one_mebibyte_payload_round_trips<C: Backend>(db: TestDb<C>) {
    let payload: Vec<u8> = (0..1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let msg = NewOutboxMessage::bytes(
        "blobs",
        "blob:1",
        "BlobStored",
        "application/octet-stream",
        payload.clone(),
    );
    db.conn()
        .transaction(|conn| enqueue(conn, &msg))
        .expect("enqueue");
    let stored = find_message(&mut db.conn(), msg.id())
        .expect("find")
        .expect("stored");
    assert_eq!(stored.payload, payload);
}

fn invalid_messages_are_refused_before_the_database<C: Backend>(db: TestDb<C>) {
    let outbox = Outbox::new(Limits::default().max_payload_bytes(8));
    let cases = [
        (
            NewOutboxMessage::bytes("", "k", "T", "text/plain", ""),
            "empty topic",
        ),
        (
            NewOutboxMessage::bytes("t", "k", "", "text/plain", ""),
            "empty type",
        ),
        (
            NewOutboxMessage::bytes("t", "k".repeat(300), "T", "text/plain", ""),
            "long key",
        ),
        (
            NewOutboxMessage::bytes("t", "k", "T", "text/plain", "123456789"),
            "big payload",
        ),
        (message("k").with_header("bad header", "v"), "header name"),
        (message("k").with_header("x-h", "a\r\nb"), "header value"),
    ];
    let mut conn = db.conn();
    for (msg, what) in &cases {
        let result = outbox.enqueue(&mut conn, msg);
        assert!(
            matches!(result, Err(Error::Invalid { id, .. }) if id == msg.id()),
            "{what}: {result:?}"
        );
    }
    assert!(matches!(
        outbox.enqueue(&mut conn, &cases[3].0),
        Err(Error::Invalid {
            source: ValidationError::PayloadTooLarge { size: 9, limit: 8 },
            ..
        })
    ));
    assert_eq!(pending(&db), 0);
}

fn duplicate_message_id_is_a_typed_error<C: Backend>(db: TestDb<C>) {
    let id = MessageId::new();
    let first = message("order:1").with_id(id);
    let second = message("order:2").with_id(id);
    db.conn()
        .transaction(|conn| enqueue(conn, &first))
        .expect("first");
    let result = db.conn().transaction(|conn| enqueue(conn, &second));
    assert!(
        matches!(result, Err(Error::DuplicateMessageId(Some(dup))) if dup == id),
        "{result:?}"
    );
    let batch = [message("order:3"), message("order:4").with_id(id)];
    let result = db.conn().transaction(|conn| enqueue_all(conn, &batch));
    assert!(
        matches!(result, Err(Error::DuplicateMessageId(_))),
        "{result:?}"
    );
    let repeated = [
        message("order:5").with_id(MessageId::new()),
        message("order:6"),
    ];
    let repeated = [
        repeated[0].clone(),
        repeated[0].clone(),
        repeated[1].clone(),
    ];
    let result = db.conn().transaction(|conn| enqueue_all(conn, &repeated));
    assert!(
        matches!(result, Err(Error::DuplicateMessageId(Some(_)))),
        "{result:?}"
    );
    assert_eq!(pending(&db), 1);
}

fn migrations_run_twice_and_revert_cleanly<C: Backend>(db: TestDb<C>) {
    let mut conn = db.conn();
    waybill_diesel::run_migrations(&mut conn).expect("second run is a no-op");
    enqueue(&mut conn, &message("order:1")).expect("enqueue");
    waybill_diesel::revert_migrations(&mut conn).expect("down.sql works");
    waybill_diesel::run_migrations(&mut conn).expect("and up again");
    assert_eq!(pending(&db), 0);
}

/// Processes that start together (several relays, service instances) migrate one at a time.
fn concurrent_migration_runs_all_succeed<C: Backend>(db: TestDb<C>) {
    waybill_diesel::revert_migrations(&mut db.conn()).expect("start from nothing");
    let start = std::sync::Arc::new(std::sync::Barrier::new(4));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let mut conn = db.conn();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                waybill_diesel::run_migrations(&mut conn)
            })
        })
        .collect();
    for run in runs {
        run.join().unwrap().expect("every concurrent run succeeds");
    }
    enqueue(&mut db.conn(), &message("order:1")).expect("the schema is complete");
    assert_eq!(pending(&db), 1);
}

fn arbitrary_messages_round_trip<C: Backend>(db: TestDb<C>) {
    let name = "[\\PC&&[^\\x00]]{1,40}";
    let strategy = (
        name,
        name,
        name,
        proptest::collection::vec(any::<u8>(), 0..2048),
        proptest::collection::btree_map("[A-Za-z0-9_-]{1,20}", "[^\\p{Cc}]{0,60}", 0..6),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(24));
    runner
        .run(&strategy, |(topic, key, kind, payload, headers)| {
            let msg =
                NewOutboxMessage::bytes(topic, key, kind, "application/octet-stream", payload)
                    .with_headers(headers);
            let mut conn = db.conn();
            conn.transaction(|conn| enqueue(conn, &msg))
                .expect("enqueue");
            let stored = find_message(&mut conn, msg.id())
                .expect("find")
                .expect("stored");
            prop_assert_eq!(&stored.topic, msg.topic());
            prop_assert_eq!(&stored.partition_key, msg.partition_key());
            prop_assert_eq!(&stored.message_type, msg.message_type());
            prop_assert_eq!(&stored.payload, msg.payload());
            prop_assert_eq!(&stored.headers, msg.headers());
            Ok(())
        })
        .expect("every generated message round-trips");
}

backend_tests!(
    committed_message_round_trips_exactly,
    rolled_back_transaction_leaves_no_trace,
    rolled_back_savepoint_inside_committed_transaction_leaves_no_trace,
    enqueue_all_writes_a_thousand_messages_in_order,
    enqueue_all_beyond_one_statement_needs_a_transaction,
    one_mebibyte_payload_round_trips,
    invalid_messages_are_refused_before_the_database,
    duplicate_message_id_is_a_typed_error,
    migrations_run_twice_and_revert_cleanly,
    concurrent_migration_runs_all_succeed,
    arbitrary_messages_round_trip,
);
