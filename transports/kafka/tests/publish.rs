//! The publisher against a real broker: per-key order through a refused record, oversized
//! records parked through the relay, and an unreachable cluster that charges nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use diesel::Connection;
use waybill_diesel::{enqueue_all, find_message, DieselStore};
use waybill_inbox_core::{wire, IncomingMessage};
use waybill_kafka::{KafkaPublisher, PublisherConfig};
use waybill_outbox_core::{NewOutboxMessage, PublishError, Publisher, Relay, RelayConfig, Status};
use waybill_testkit::kafka::{brokers, create_topic, header, read_all};
use waybill_testkit::unique;

use waybill_testkit::outbox::{sqlite, stored};

#[test]
fn a_refused_record_stops_its_key_and_its_retry_comes_before_the_rest_of_the_key() {
    let Some(brokers) = brokers() else { return };
    let topic = unique("orders");
    create_topic(&brokers, &topic, 3);
    let mut publisher = KafkaPublisher::connect(&brokers, PublisherConfig::default()).unwrap();
    let oversized = format!("{{\"pad\":\"{}\"}}", "x".repeat(1_000_000));
    let batch = [
        stored(1, &topic, "a", r#"{"n":1}"#),
        stored(2, &topic, "a", &oversized),
        stored(3, &topic, "a", r#"{"n":3}"#),
        stored(4, &topic, "b", r#"{"n":4}"#),
        stored(5, &topic, "b", r#"{"n":5}"#),
    ];
    let outcomes = publisher.publish(&batch);
    assert_eq!(outcomes[0], Ok(()));
    match &outcomes[1] {
        Err(PublishError::Fatal(reason)) => {
            assert!(
                reason.contains("message.max.bytes of 1000000 bytes"),
                "names the limit: {reason}"
            );
            assert!(
                reason.contains("record is 100"),
                "names the record's size: {reason}"
            );
        }
        other => panic!("an oversized record is fatal, got {other:?}"),
    }
    assert_eq!(outcomes[2], Err(PublishError::NotAttempted));
    assert_eq!(&outcomes[3..], [Ok(()), Ok(())]);

    // The relay retries the rest of the key later (here: without the refused record).
    assert_eq!(publisher.publish(&batch[2..3]), [Ok(())]);

    let records = read_all(&brokers, &topic);
    let mut by_key: BTreeMap<String, Vec<(i32, IncomingMessage)>> = BTreeMap::new();
    for record in &records {
        use rdkafka::Message;
        let key = String::from_utf8(record.key().unwrap().to_vec()).unwrap();
        let headers = record
            .headers()
            .map(|_| {
                [
                    wire::MESSAGE_ID,
                    wire::MESSAGE_TYPE,
                    wire::PARTITION_KEY,
                    wire::TOPIC,
                    wire::CONTENT_TYPE,
                    wire::SENT_AT,
                    "correlation-id",
                ]
                .into_iter()
                .filter_map(|name| Some((name.to_owned(), header(record, name)?)))
                .collect()
            })
            .unwrap_or_default();
        let incoming = wire::decode(headers, record.payload().unwrap_or_default().to_vec())
            .expect("a published record decodes");
        by_key
            .entry(key)
            .or_default()
            .push((record.partition(), incoming));
    }
    let expect = |key: &str, seqs: &[usize]| {
        let got = &by_key[key];
        assert!(
            got.iter().all(|(p, _)| *p == got[0].0),
            "key {key} stays on one partition"
        );
        let want: Vec<IncomingMessage> = seqs
            .iter()
            .map(|&s| IncomingMessage::from(&batch[s - 1]))
            .collect();
        let got: Vec<IncomingMessage> = got.iter().map(|(_, m)| m.clone()).collect();
        assert_eq!(got, want, "key {key}: in order, headers and payload intact");
    };
    expect("a", &[1, 3]);
    expect("b", &[4, 5]);
    assert_eq!(records.len(), 4);
}

#[test]
fn an_oversized_record_is_parked_with_both_sizes_and_other_keys_are_published() {
    let Some(brokers) = brokers() else { return };
    let topic = unique("orders");
    create_topic(&brokers, &topic, 3);
    let (pool, _db) = sqlite("kafka-oversized", 2);
    let big = NewOutboxMessage::bytes(&topic, "big", "Blob", "text/plain", vec![b'x'; 1_200_000]);
    let behind = NewOutboxMessage::json(&topic, "big", "After", &1).unwrap();
    let other = NewOutboxMessage::json(&topic, "other", "Other", &2).unwrap();
    let ids = [big.id(), behind.id(), other.id()];
    pool.get()
        .unwrap()
        .transaction(|conn| enqueue_all(conn, &[big, behind, other]))
        .unwrap();
    let publisher = KafkaPublisher::connect(&brokers, PublisherConfig::default()).unwrap();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default(),
    );
    let report = relay.run_once().unwrap();
    assert_eq!((report.published, report.parked), (1, 1), "{report:?}");

    let mut conn = pool.get().unwrap();
    let parked = find_message(&mut conn, ids[0]).unwrap().unwrap();
    assert_eq!(parked.status, Status::Parked);
    let reason = parked.last_error.unwrap_or_default();
    assert!(
        reason.contains("1200") && reason.contains("1000000"),
        "the reason names both sizes: {reason}"
    );
    let waiting = find_message(&mut conn, ids[1]).unwrap().unwrap();
    assert_eq!(
        (waiting.status, waiting.attempts),
        (Status::Pending, 0),
        "the key's next message waits behind the parked one, uncharged"
    );
    let published = find_message(&mut conn, ids[2]).unwrap();
    assert!(published.is_none_or(|m| m.status == Status::Published));
    let records = read_all(&brokers, &topic);
    assert_eq!(
        records.len(),
        1,
        "only the other key's message reached Kafka"
    );
}

#[test]
fn an_unreachable_cluster_is_unavailable_and_charges_nothing() {
    // Nothing listens on port 1: no broker is needed for this test.
    let config = PublisherConfig::default()
        .probe_timeout(Duration::from_millis(500))
        .delivery_timeout(Duration::from_secs(1));
    let mut publisher = KafkaPublisher::connect("127.0.0.1:1", config).unwrap();
    let topic = unique("orders");
    let batch = [
        stored(1, &topic, "a", "{}"),
        stored(2, &topic, "a", "{}"),
        stored(3, &topic, "b", "{}"),
    ];
    let outcomes = publisher.publish(&batch);
    assert!(
        matches!(outcomes[0], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(outcomes[2], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );

    let (pool, _db) = sqlite("kafka-unreachable", 2);
    let messages: Vec<_> = (0..5)
        .map(|i| NewOutboxMessage::json(&topic, format!("k{}", i % 2), "Step", &i).unwrap())
        .collect();
    let ids: Vec<_> = messages.iter().map(NewOutboxMessage::id).collect();
    pool.get()
        .unwrap()
        .transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default(),
    );
    for _ in 0..3 {
        let report = relay.run_once().unwrap();
        assert_eq!(
            (report.published, report.retried, report.parked),
            (0, 0, 0),
            "{report:?}"
        );
        assert_eq!(report.unavailable, 2, "one per key: {report:?}");
    }
    let mut conn = pool.get().unwrap();
    for id in ids {
        let message = find_message(&mut conn, id).unwrap().unwrap();
        assert_eq!((message.status, message.attempts), (Status::Pending, 0));
    }
}

#[test]
fn a_topic_prefix_publishes_to_the_prefixed_topic_and_the_message_keeps_its_own() {
    let Some(brokers) = brokers() else { return };
    let prefix = format!("{}.", unique("env"));
    let kafka_topic = format!("{prefix}orders");
    create_topic(&brokers, &kafka_topic, 1);
    let config = PublisherConfig::default().topic_prefix(&prefix);
    let mut publisher = KafkaPublisher::connect(&brokers, config).unwrap();
    assert_eq!(
        publisher.publish(&[stored(1, "orders", "a", r#"{"n":1}"#)]),
        [Ok(())]
    );
    let records = read_all(&brokers, &kafka_topic);
    assert_eq!(records.len(), 1);
    assert_eq!(
        header(&records[0], wire::TOPIC).as_deref(),
        Some("orders"),
        "the consumer sees the outbox topic"
    );
}
