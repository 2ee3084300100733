//! The in-process broker behaves like a real one: wire round trip, backpressure, lost
//! connections, bounded redeliveries, dead letters, and duplicates the inbox absorbs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{wire, Disposition, IncomingMessage};
use waybill_memory::{MemoryBroker, MemoryConfig};
use waybill_outbox_core::{
    Headers, MessageId, NewOutboxMessage, OutboxMessage, PublishError, Publisher, Relay,
    RelayConfig, Status,
};

fn stored(seq: i64, key: &str) -> OutboxMessage {
    let mut msg = OutboxMessage::new(seq, MessageId::new(), Status::Pending);
    msg.topic = "orders".into();
    msg.partition_key = key.into();
    msg.message_type = "OrderPlaced".into();
    msg.content_type = "application/json".into();
    msg.payload = format!("{{\"seq\":{seq}}}").into_bytes();
    msg.headers = Headers::from([("traceparent".to_owned(), "00-abc-def-01".to_owned())]);
    msg
}

#[test]
fn messages_arrive_decoded_and_in_order() {
    let broker = MemoryBroker::new(MemoryConfig::default());
    let sent: Vec<_> = (1..=20).map(|i| stored(i, "order:1")).collect();
    assert!(broker.publisher().publish(&sent).iter().all(Result::is_ok));
    let mut received = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        received.push(m.clone());
        Disposition::Ack
    };
    let report = broker
        .consumer("orders")
        .run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!((report.delivered, report.acked), (20, 20));
    let expected: Vec<IncomingMessage> = sent.iter().map(IncomingMessage::from).collect();
    assert_eq!(received, expected);
}

#[test]
fn a_full_queue_pushes_back_and_stops_the_key() {
    let broker = MemoryBroker::new(MemoryConfig::default().capacity(2));
    let batch = [
        stored(1, "a"),
        stored(2, "a"),
        stored(3, "a"),
        stored(4, "a"),
    ];
    let outcomes = broker.publisher().publish(&batch);
    assert_eq!(outcomes[..2], [Ok(()), Ok(())]);
    assert!(matches!(outcomes[2], Err(PublishError::Retryable(_))));
    assert_eq!(outcomes[3], Err(PublishError::NotAttempted));
    assert_eq!(broker.queued("orders"), 2, "memory stays bounded");
}

#[test]
fn a_dropped_connection_reports_the_broker_unavailable_until_it_is_back() {
    let broker = MemoryBroker::new(MemoryConfig::default());
    broker.disconnect();
    let outcomes = broker
        .publisher()
        .publish(&[stored(1, "a"), stored(2, "a"), stored(3, "b")]);
    assert!(
        matches!(outcomes[0], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(outcomes[2], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );
    broker.reconnect();
    assert_eq!(broker.publisher().publish(&[stored(1, "a")])[0], Ok(()));
}

#[test]
fn a_relay_parks_nothing_while_the_broker_is_disconnected_however_long() {
    let dir = std::env::temp_dir().join(format!("waybill-memory-{}.db", uuid_like()));
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            dir.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    let messages: Vec<_> = (0..20)
        .map(|i| {
            NewOutboxMessage::bytes(
                "orders",
                format!("order:{}", i % 4),
                "Step",
                "text/plain",
                "x",
            )
        })
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    drop(conn);

    let broker = MemoryBroker::new(MemoryConfig::default());
    broker.disconnect();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        broker.publisher(),
        RelayConfig::default().max_attempts(2),
    );
    for _ in 0..10 {
        let report = relay.run_once().unwrap();
        assert_eq!(report.unavailable, 4, "the head of each key: {report:?}");
        assert_eq!(report.retried + report.parked, 0, "{report:?}");
    }
    broker.reconnect();
    while relay.run_once().unwrap().claimed > 0 {}
    assert_eq!(relay.totals().parked, 0);
    assert_eq!(
        broker.queued("orders"),
        20,
        "everything went out after the outage"
    );
    let stats = waybill_diesel::topic_stats(&mut pool.get().unwrap()).unwrap();
    assert!(stats.iter().all(|s| s.pending + s.parked == 0), "{stats:?}");
    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.display()));
    }
}

#[test]
fn retries_are_bounded_then_dead_lettered_with_the_reason() {
    let broker = MemoryBroker::new(MemoryConfig::default().max_redeliveries(3));
    broker
        .publisher()
        .publish(&[stored(1, "a"), stored(2, "b")]);
    let mut attempts = 0;
    let mut handler = |m: &IncomingMessage| {
        if m.partition_key == "a" {
            attempts += 1;
            Disposition::Retry("database down".into())
        } else {
            Disposition::Ack
        }
    };
    let report = broker
        .consumer("orders")
        .run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!(attempts, 4, "first delivery plus three redeliveries");
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (1, 3, 1)
    );
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("database down"),
        "{}",
        dead[0].reason
    );
}

#[test]
fn malformed_deliveries_are_dead_lettered_and_the_rest_flow() {
    let broker = MemoryBroker::new(MemoryConfig::default());
    let (good_headers, good_payload) = wire::encode(&stored(1, "a"));
    let mut no_id = good_headers.clone();
    no_id.remove("ce-id");
    let mut bad_id = good_headers.clone();
    bad_id.insert("ce-id".into(), "not-a-uuid".into());
    broker.publish_raw("orders", no_id, good_payload.clone());
    broker.publish_raw("orders", bad_id, good_payload.clone());
    broker.publish_raw(
        "orders",
        wire::encode(&stored(2, "a")).0,
        b"{not json".to_vec(),
    );
    broker.publisher().publish(&[stored(3, "a")]);
    let mut handled = 0;
    let mut handler = |_: &IncomingMessage| {
        handled += 1;
        Disposition::Ack
    };
    let report = broker
        .consumer("orders")
        .run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!(
        (report.malformed, report.dead_lettered, report.acked),
        (3, 3, 1)
    );
    assert_eq!(handled, 1);
    let reasons: Vec<_> = broker
        .dead_letters()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert!(
        reasons.iter().all(|r| r.starts_with("malformed: ")),
        "{reasons:?}"
    );
    assert_eq!(reasons[0], "malformed: ce-id is missing");
    assert!(
        reasons[1].starts_with("malformed: ce-id is not a UUID: \"not-a-uuid\""),
        "{reasons:?}"
    );
}

#[test]
fn redelivered_duplicates_take_effect_once_through_the_inbox() {
    let dir = std::env::temp_dir().join(format!("waybill-memory-{}.db", uuid_like()));
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            dir.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    diesel::sql_query("CREATE TABLE ledger (message_id TEXT NOT NULL)")
        .execute(&mut conn)
        .unwrap();
    let messages: Vec<_> = (0..200)
        .map(|i| {
            NewOutboxMessage::bytes(
                "orders",
                format!("order:{}", i % 10),
                "OrderPlaced",
                "text/plain",
                "x",
            )
        })
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    drop(conn);

    let broker = MemoryBroker::new(MemoryConfig::default().redeliver_fraction(0.5).seed(7));
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        broker.publisher(),
        RelayConfig::default(),
    );
    while relay.run_once().unwrap().claimed > 0 {}
    let mut handler = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, msg: &IncomingMessage| {
            diesel::sql_query("INSERT INTO ledger (message_id) VALUES (?)")
                .bind::<diesel::sql_types::Text, _>(msg.id.to_string())
                .execute(conn)
                .map(drop)
                .map_err(waybill_diesel::Error::from)
        },
    );
    let mut consumer = broker.consumer("orders");
    while consumer
        .run_once(&mut handler, 100, Duration::ZERO)
        .delivered
        > 0
    {}

    let stats = broker.stats();
    assert!(
        stats.duplicated > 50,
        "duplicates were delivered: {stats:?}"
    );
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let rows: Count = diesel::sql_query("SELECT count(*) AS n FROM ledger")
        .get_result(&mut pool.get().unwrap())
        .unwrap();
    let distinct: Count = diesel::sql_query("SELECT count(DISTINCT message_id) AS n FROM ledger")
        .get_result(&mut pool.get().unwrap())
        .unwrap();
    assert_eq!(
        (rows.n, distinct.n),
        (200, 200),
        "every message took effect exactly once"
    );
    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.display()));
    }
}

fn uuid_like() -> String {
    MessageId::new().to_string()
}

#[test]
fn hostile_deliveries_are_dead_lettered_with_their_reason_and_good_ones_flow_on() {
    let broker = MemoryBroker::new(MemoryConfig::default());
    let (headers, _) = wire::encode(&stored(1, "a"));
    let with = |name: &str, value: &str| {
        let mut h = headers.clone();
        h.insert(name.into(), value.into());
        h
    };
    broker.publisher().publish(&[stored(1, "a")]);
    let hostile: Vec<(Headers, Vec<u8>)> = vec![
        (headers.clone(), b"{\"seq\":".to_vec()), // truncated JSON
        (headers.clone(), vec![b'"', 0xff, 0xfe, b'"']), // invalid UTF-8 in JSON
        (
            with("content-type", "application/vnd+json"),
            b"plain".to_vec(),
        ), // wrong type
        (with("ce-id", ""), b"{}".to_vec()),      // empty id
        (with("ce-id", "1; DROP TABLE x"), b"{}".to_vec()), // not a UUID
        (with("ce-time", "\r\nwaybill-topic: x"), b"{}".to_vec()), // header injection
        (with("ce-waybilltopic", "payments"), b"{}".to_vec()), // not the subscribed topic
    ];
    for (h, body) in hostile {
        broker.publish_raw("orders", h, body);
    }
    broker.publisher().publish(&[stored(2, "a")]);
    let mut handled = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        handled.push(m.payload.clone());
        Disposition::Ack
    };
    let report = broker
        .consumer("orders")
        .run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!(
        (report.delivered, report.acked, report.dead_lettered),
        (9, 2, 7)
    );
    assert_eq!(handled, [b"{\"seq\":1}".to_vec(), b"{\"seq\":2}".to_vec()]);
    let reasons: Vec<_> = broker
        .dead_letters()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    assert_eq!(reasons.len(), 7);
    assert!(reasons.iter().all(|r| !r.is_empty()), "{reasons:?}");
    assert!(reasons[6].contains("\"payments\""), "{reasons:?}");
}

#[test]
fn a_retried_message_takes_effect_before_the_next_message_of_its_key() {
    let broker = MemoryBroker::new(MemoryConfig::default());
    broker
        .publisher()
        .publish(&[stored(1, "order:1"), stored(2, "order:1")]);
    let mut failures = 0;
    let mut effects = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        if m.payload == br#"{"seq":1}"# && failures < 2 {
            failures += 1;
            return Disposition::Retry("deadlock detected".into());
        }
        effects.push(m.payload.clone());
        Disposition::Ack
    };
    let report = broker
        .consumer("orders")
        .run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!(
        effects,
        [br#"{"seq":1}"#.to_vec(), br#"{"seq":2}"#.to_vec()]
    );
    assert_eq!((report.acked, report.retried), (2, 2));
    assert!(broker.dead_letters().is_empty());
}

#[test]
fn a_panicking_handler_is_dead_lettered_after_max_deliveries_and_the_consumer_goes_on() {
    let broker = MemoryBroker::new(MemoryConfig::default().max_deliveries(3));
    broker
        .publisher()
        .publish(&[stored(1, "a"), stored(2, "b"), stored(3, "a")]);
    let mut calls = 0;
    let mut handled = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        if m.payload == br#"{"seq":1}"# {
            calls += 1;
            panic!("the handler has a bug");
        }
        handled.push(m.payload.clone());
        Disposition::Ack
    };
    let mut consumer = broker.consumer("orders");
    let report = consumer.run_once(&mut handler, 100, Duration::ZERO);
    assert_eq!(calls, 3, "one call per allowed delivery");
    assert_eq!(
        handled,
        [br#"{"seq":2}"#.to_vec(), br#"{"seq":3}"#.to_vec()]
    );
    assert_eq!((report.acked, report.dead_lettered), (2, 1));
    let dead = broker.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, br#"{"seq":1}"#);
    assert!(
        dead[0]
            .reason
            .contains("handler panicked: the handler has a bug"),
        "{}",
        dead[0].reason
    );
}
