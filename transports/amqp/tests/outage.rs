//! A broker outage is not a fault of any message: behind a TCP proxy the test cuts (every
//! connection closed, new ones refused), the publisher reports the broker unavailable, the relay
//! charges no attempt however long it lasts, and everything goes out once the proxy is back.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use diesel::prelude::*;
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig};
use waybill_diesel::{enqueue_all, topic_stats, DieselStore};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{Backoff, NewOutboxMessage, PublishError, Publisher, Relay, RelayConfig};

use common::proxy::{host_port, Proxy};
use common::{stored, unique, PATIENCE};

fn publisher_config() -> PublisherConfig {
    PublisherConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .confirm_timeout(Duration::from_secs(5))
}

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

fn is_unavailable_or_not_attempted(outcome: &Result<(), PublishError>) -> bool {
    matches!(
        outcome,
        Err(PublishError::Unavailable(_) | PublishError::NotAttempted)
    )
}

#[test]
fn a_cut_connection_and_a_refused_reconnect_report_the_broker_unavailable_then_all_goes_out() {
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
    let mut proxy = Proxy::start(&host_port(&broker.addr));
    let mut publisher =
        AmqpPublisher::connect(&proxy.url(&broker.addr), publisher_config()).expect("publisher");
    assert_eq!(
        publisher.publish(&[stored(1, &topic, "a", "{}")]),
        vec![Ok(())]
    );

    proxy.cut();
    let batch = [
        stored(2, &topic, "a", "{}"),
        stored(3, &topic, "a", "{}"),
        stored(4, &topic, "b", "{}"),
    ];
    // The client may not have noticed the cut yet and send several messages of a key before
    // their confirms fail: those are unavailable too, never retryable.
    let cut = publisher.publish(&batch);
    assert!(cut.iter().all(is_unavailable_or_not_attempted), "{cut:?}");
    assert!(
        matches!(cut[0], Err(PublishError::Unavailable(_))),
        "{cut:?}"
    );

    let refused = publisher.publish(&batch);
    assert!(
        matches!(&refused[0], Err(PublishError::Unavailable(reason)) if reason.contains("connecting")),
        "{refused:?}"
    );
    assert_eq!(refused[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(refused[2], Err(PublishError::Unavailable(_))),
        "{refused:?}"
    );

    proxy.restore();
    assert_eq!(publisher.publish(&batch), vec![Ok(()), Ok(()), Ok(())]);
    let received: Vec<_> = consume_all(&mut consumer, 4)
        .iter()
        .map(|m| m.headers["correlation-id"].clone())
        .collect();
    // Nothing sent after the cut reached the broker, so nothing arrives twice.
    assert_eq!(received, ["corr-1", "corr-2", "corr-3", "corr-4"]);
}

#[test]
fn a_relay_behind_a_cut_connection_parks_nothing_and_delivers_everything_after() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = common::sqlite("outage", 2);
    let mut conn = pool.get().unwrap();
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");
    let messages: Vec<_> = (0..20)
        .map(|i| NewOutboxMessage::json(&topic, format!("order.{}", i % 4), "Step", &i).unwrap())
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    drop(conn);

    let mut proxy = Proxy::start(&host_port(&broker.addr));
    let publisher =
        AmqpPublisher::connect(&proxy.url(&broker.addr), publisher_config()).expect("publisher");
    let max_attempts = 2;
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default()
            .max_attempts(max_attempts)
            .backoff(Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            )),
    );
    proxy.cut();
    for round in 0..3 * max_attempts {
        let report = relay.run_once().unwrap();
        assert_eq!(report.claimed, 20, "round {round}: {report:?}");
        // At least the head of each key; more when several were sent before the cut showed.
        assert!(report.unavailable >= 4, "round {round}: {report:?}");
        assert_eq!(
            report.unavailable + report.released,
            20,
            "round {round}: {report:?}"
        );
        assert_eq!(
            report.retried + report.parked,
            0,
            "round {round}: {report:?}"
        );
    }

    proxy.restore();
    while relay.run_once().unwrap().claimed > 0 {}
    assert_eq!(relay.totals().parked, 0);
    let stats = topic_stats(&mut pool.get().unwrap()).unwrap();
    assert!(stats.iter().all(|s| s.pending + s.parked == 0), "{stats:?}");
    let received = consume_all(&mut consumer, 20);
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for message in &received {
        let index: i64 = serde_json::from_slice(&message.payload).unwrap();
        per_key
            .entry(message.partition_key.clone())
            .or_default()
            .push(index);
    }
    for (key, indexes) in &per_key {
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "{key} in order: {indexes:?}"
        );
    }
}
