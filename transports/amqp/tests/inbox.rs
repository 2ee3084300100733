//! End to end with the real outbox and inbox on SQLite: the relay publishes through RabbitMQ,
//! the consumer runs each delivery through the inbox, and a batch published twice still has
//! exactly one effect per message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumeReport, ConsumerConfig, PublisherConfig};
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_outbox_core::{
    NewOutboxMessage, OutboxMessage, PublishError, Publisher, Relay, RelayConfig,
};

use common::{unique, PATIENCE};

/// Publishes every batch twice, as a relay that crashed after the broker confirmed but before
/// it marked the batch would, on its next attempt.
struct Twice(AmqpPublisher);

impl Publisher for Twice {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let first = self.0.publish(batch);
        let second = self.0.publish(batch);
        assert_eq!(first, second);
        first
    }
}

#[derive(QueryableByName)]
struct Effect {
    #[diesel(sql_type = Text)]
    message_id: String,
}

#[test]
fn a_batch_published_twice_has_exactly_one_effect_per_message() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = common::sqlite("inbox", 4);
    let mut conn = pool.get().expect("conn");
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .expect("effects table");

    let topic = unique("orders");
    let queue = unique("billing");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");

    let messages: Vec<_> = (0..40)
        .map(|i| {
            NewOutboxMessage::json(
                &topic,
                format!("order.{}", i % 4),
                "OrderPlaced",
                &serde_json::json!({ "n": i }),
            )
            .expect("json")
        })
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .expect("enqueue");

    let publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        Twice(publisher),
        RelayConfig::default().batch_size(16),
    );
    let mut published = 0;
    let deadline = Instant::now() + PATIENCE;
    while published < messages.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "relay published only {published}"
        );
        published += relay.run_once().expect("relay").published;
    }

    let mut handler = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, message: &waybill_inbox_core::IncomingMessage| {
            diesel::sql_query("INSERT INTO effects (message_id) VALUES (?)")
                .bind::<Text, _>(message.id.to_string())
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    let mut total = ConsumeReport::default();
    while total.acked < 2 * messages.len() as u64 {
        assert!(Instant::now() < deadline, "consumed only {total:?}");
        let report = consumer
            .run_once(&mut handler, 100, Duration::from_secs(5))
            .expect("consume");
        total.acked += report.acked;
        total.retried += report.retried;
        total.dead_lettered += report.dead_lettered;
    }
    assert_eq!((total.retried, total.dead_lettered), (0, 0));

    let effects: Vec<Effect> =
        diesel::sql_query("SELECT message_id FROM effects ORDER BY message_id")
            .load(&mut conn)
            .expect("effects");
    let mut expected: Vec<_> = messages.iter().map(|m| m.id().to_string()).collect();
    expected.sort();
    let got: Vec<_> = effects.into_iter().map(|e| e.message_id).collect();
    assert_eq!(got, expected);

    drop(conn);
}
