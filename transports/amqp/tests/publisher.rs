//! The publisher against a real RabbitMQ: confirmed batches that decode back unchanged and in
//! key order, unroutable messages and missing exchanges reported as failures of their own
//! messages only, and reconnecting after a lost connection.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig, Routing};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{PublishError, Publisher, Unroutable};

use common::{stored, unique, PATIENCE};

/// Consumes `count` messages from the consumer's queue, acknowledging them.
fn consume_all(consumer: &mut AmqpConsumer, count: usize) -> Vec<IncomingMessage> {
    let mut received = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        received.push(message.clone());
        Disposition::Ack
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut acked = 0;
    while acked < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {acked} of {count} consumed"
        );
        let report = consumer
            .run_once(&mut handler, count - acked, Duration::from_secs(5))
            .expect("consume");
        acked += usize::try_from(report.acked).unwrap();
    }
    received
}

#[test]
fn a_confirmed_batch_decodes_back_unchanged_and_in_key_order() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue).bind(&topic, "#").prefetch(100),
    )
    .expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");

    let batch: Vec<_> = (0..500)
        .map(|i| {
            let key = format!("order.{}", i % 7);
            let mut message = stored(i, &topic, &key, &format!(r#"{{"step":{i}}}"#));
            message
                .headers
                .insert("traceparent".into(), format!("00-{i:032x}-{i:016x}-01"));
            message
        })
        .collect();
    let outcomes = publisher.publish(&batch);
    assert_eq!(outcomes.len(), 500);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");

    let received = consume_all(&mut consumer, 500);
    assert_eq!(received.len(), 500);
    let expected: HashMap<_, _> = batch
        .iter()
        .map(|m| (m.id, IncomingMessage::from(m)))
        .collect();
    for message in &received {
        assert_eq!(Some(message), expected.get(&message.id));
    }
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let seq_of: HashMap<_, _> = batch.iter().map(|m| (m.id, m.seq)).collect();
    for message in &received {
        let seq = seq_of[&message.id];
        if let Some(previous) = last_seq.insert(message.partition_key.clone(), seq) {
            assert!(previous < seq, "key {} out of order", message.partition_key);
        }
    }
}

#[test]
fn amqp_properties_carry_id_type_content_type_timestamp_and_persistence() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let exchange = unique("events");
    let queue = unique("q");
    broker.cleanup_exchange(&exchange);
    broker.cleanup_queue(&queue);
    let topic = "billing";
    // A fixed exchange routes by topic.
    let consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue).bind(&exchange, topic),
    )
    .expect("consumer");
    drop(consumer);
    let mut publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().routing(Routing::Exchange(exchange.clone())),
    )
    .expect("publisher");
    let message = stored(1, topic, "invoice.7", "{}");
    assert_eq!(
        publisher.publish(std::slice::from_ref(&message)),
        vec![Ok(())]
    );

    let delivery = broker.drain(&queue, 1).remove(0);
    let properties = &delivery.properties;
    assert_eq!(delivery.exchange.as_str(), exchange);
    assert_eq!(delivery.routing_key.as_str(), topic);
    assert_eq!(
        properties.message_id().as_ref().map(|s| s.to_string()),
        Some(message.id.to_string())
    );
    assert_eq!(
        properties.kind().as_ref().map(|s| s.to_string()),
        Some("Step".into())
    );
    assert_eq!(
        properties.content_type().as_ref().map(|s| s.to_string()),
        Some("application/json".into())
    );
    assert_eq!(*properties.delivery_mode(), Some(2));
    assert_eq!(
        *properties.timestamp(),
        Some(u64::try_from(message.created_at.timestamp()).unwrap())
    );
    assert_eq!(
        common::header(&delivery, "correlation-id"),
        Some("corr-1".into())
    );
}

#[test]
fn an_unroutable_message_is_a_failure_not_a_success() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("nobody-listens");
    broker.cleanup_exchange(&topic);
    let batch = [stored(1, &topic, "k", "{}"), stored(2, &topic, "k", "{}")];
    // By default retryable: the relay retries it until a queue is bound.
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let outcomes = publisher.publish(&batch);
    assert_eq!(outcomes.len(), 2);
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(PublishError::Retryable(reason)) if reason.contains("NO_ROUTE")),
            "{outcome:?}"
        );
    }
    // The channel is still usable afterwards.
    assert!(publisher.is_connected());

    let mut publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().unroutable(Unroutable::Park),
    )
    .expect("publisher");
    for outcome in publisher.publish(&batch) {
        assert!(
            matches!(&outcome, Err(PublishError::Fatal(reason)) if reason.contains("NO_ROUTE")),
            "{outcome:?}"
        );
    }
}

#[test]
fn a_lost_connection_reports_the_broker_unavailable_and_the_next_publish_reconnects() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    assert_eq!(
        publisher.publish(&[stored(1, &topic, "a", "{}")]),
        vec![Ok(())]
    );

    publisher.simulate_connection_loss();
    assert!(!publisher.is_connected());
    let lost = [
        stored(2, &topic, "a", "{}"),
        stored(3, &topic, "a", "{}"),
        stored(4, &topic, "b", "{}"),
    ];
    let outcomes = publisher.publish(&lost);
    assert!(
        matches!(outcomes[0], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(outcomes[2], Err(PublishError::Unavailable(_))),
        "{outcomes:?}"
    );

    let outcomes = publisher.publish(&lost);
    assert_eq!(outcomes, vec![Ok(()), Ok(()), Ok(())]);
    assert!(publisher.is_connected());
    let received = consume_all(&mut consumer, 4);
    let seqs: Vec<_> = received
        .iter()
        .map(|m| m.headers["correlation-id"].clone())
        .collect();
    assert_eq!(seqs, ["corr-1", "corr-2", "corr-3", "corr-4"]);
}

#[test]
fn a_missing_exchange_fails_only_its_messages_and_the_channel_is_reopened_at_once() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let missing = unique("missing");
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");
    // Without declaring, publishing to an exchange that does not exist closes the channel
    // (404 NOT_FOUND): the publisher checks each exchange first and reopens the channel.
    let mut publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().declare_exchanges(None),
    )
    .expect("publisher");
    let outcomes = publisher.publish(&[
        stored(1, &missing, "a", "{}"),
        stored(2, &missing, "a", "{}"),
        stored(3, &missing, "b", "{}"),
        stored(4, &topic, "c", "{}"),
    ]);
    for i in [0, 2] {
        assert!(
            matches!(&outcomes[i], Err(PublishError::Retryable(reason)) if reason.contains("404")),
            "{outcomes:?}"
        );
    }
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert_eq!(outcomes[3], Ok(()));
    assert!(publisher.is_connected());

    assert_eq!(
        publisher.publish(&[stored(5, &topic, "a", "{}")]),
        vec![Ok(())]
    );
    assert_eq!(consume_all(&mut consumer, 2).len(), 2);
}
