//! Transactional mode: a producer that takes over a `transactional.id` fences the older one at
//! the broker, and the fenced relay's failure is charged to no message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use diesel::Connection;
use rdkafka::Message;
use waybill_diesel::{enqueue_all, find_message, DieselStore};
use waybill_kafka::{KafkaPublisher, PublisherConfig};
use waybill_outbox_core::{NewOutboxMessage, PublishError, Publisher, Relay, RelayConfig, Status};
use waybill_testkit::kafka::{brokers, create_topic, header, read_all};
use waybill_testkit::unique;

use waybill_testkit::outbox::{sqlite, stored};

#[test]
fn a_newer_producer_with_the_same_transactional_id_fences_the_stalled_relay() {
    let Some(brokers) = brokers() else { return };
    let topic = unique("orders");
    create_topic(&brokers, &topic, 3);
    let id = unique("relay-slot");
    let config = PublisherConfig::default().transactional(&id);

    // The first relay publishes a batch in a transaction.
    let (pool, _db) = sqlite("kafka-fencing", 2);
    let enqueue = |n: i64| {
        let messages: Vec<_> = (0..4)
            .map(|i| NewOutboxMessage::json(&topic, format!("k{i}"), "Step", &(n + i)).unwrap())
            .collect();
        let ids: Vec<_> = messages.iter().map(NewOutboxMessage::id).collect();
        pool.get()
            .unwrap()
            .transaction(|conn| enqueue_all(conn, &messages))
            .unwrap();
        ids
    };
    enqueue(0);
    let stalled = KafkaPublisher::connect(&brokers, config.clone()).unwrap();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        stalled,
        RelayConfig::default(),
    );
    let report = relay.run_once().unwrap();
    assert_eq!(report.published, 4, "{report:?}");

    // A newer relay takes the slot over: initialising its transactions fences the first.
    let mut newer = KafkaPublisher::connect(&brokers, config).unwrap();
    let newer_batch = [stored(100, &topic, "k0", r#"{"newer":true}"#)];
    assert_eq!(newer.publish(&newer_batch), [Ok(())]);
    assert!(!newer.is_fenced());

    // The first relay wakes up: the broker refuses it, and no message is charged for that.
    let late = enqueue(10);
    let report = relay.run_once().unwrap();
    assert_eq!(
        (report.published, report.retried, report.parked),
        (0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.unavailable, 4, "{report:?}");
    let mut conn = pool.get().unwrap();
    for id in late {
        let message = find_message(&mut conn, id).unwrap().unwrap();
        assert_eq!((message.status, message.attempts), (Status::Pending, 0));
    }
    drop(conn);
    // It stays fenced: it never re-initialises by itself (that would fence its successor).
    let report = relay.run_once().unwrap();
    assert_eq!((report.published, report.unavailable), (0, 4), "{report:?}");

    // The fenced producer stored nothing; the newer one's record is there.
    let records = read_all(&brokers, &topic);
    let ids: Vec<_> = records
        .iter()
        .filter_map(|r| header(r, waybill_inbox_core::wire::MESSAGE_ID))
        .collect();
    assert_eq!(
        records.len(),
        5,
        "4 from the first batch and the newer relay's one: {ids:?}"
    );
    assert!(records
        .iter()
        .any(|r| r.payload() == Some(br#"{"newer":true}"#.as_slice())));
}

#[test]
fn a_fenced_publisher_reports_every_key_unavailable() {
    let Some(brokers) = brokers() else { return };
    let topic = unique("orders");
    create_topic(&brokers, &topic, 1);
    let config = PublisherConfig::default().transactional(unique("relay-slot"));
    let mut first = KafkaPublisher::connect(&brokers, config.clone()).unwrap();
    assert_eq!(first.publish(&[stored(1, &topic, "a", "{}")]), [Ok(())]);
    let mut second = KafkaPublisher::connect(&brokers, config).unwrap();
    assert_eq!(second.publish(&[stored(2, &topic, "a", "{}")]), [Ok(())]);

    let outcomes = first.publish(&[
        stored(3, &topic, "a", "{}"),
        stored(4, &topic, "a", "{}"),
        stored(5, &topic, "b", "{}"),
    ]);
    assert!(first.is_fenced());
    match &outcomes[0] {
        Err(PublishError::Unavailable(why)) => assert!(why.contains("fenced"), "{why}"),
        other => panic!("fenced is Unavailable, got {other:?}"),
    }
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert!(matches!(outcomes[2], Err(PublishError::Unavailable(_))));
    assert_eq!(second.publish(&[stored(6, &topic, "b", "{}")]), [Ok(())]);
}
