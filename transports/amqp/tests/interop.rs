//! Interop with clients nobody here wrote, on the real RabbitMQ: Python's pika and the official
//! `cloudevents` SDK (its `rabbitmq` binding) parse what the publisher sends, and CloudEvents
//! that Python sends (binary, structured, and plain AMQP properties) reach the handler through
//! the inbox exactly once per id. Needs `WAYBILL_INTEROP_PYTHON` (see `.ci/run`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumeReport, ConsumerConfig, PublisherConfig};
use waybill_diesel::{Inbox, InboxHandler};
use waybill_inbox_core::IncomingMessage;
use waybill_outbox_core::{MessageId, Publisher};
use waybill_testkit::interop;

use common::{stored, unique, PATIENCE};

const SOURCE: &str = "https://shop.example/orders-service";

#[test]
fn the_python_sdk_parses_every_message_the_publisher_sends() {
    let Some(python) = interop::client() else {
        return;
    };
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("python");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    // Declares the queue, bound to the topic's exchange, then lets go of it for pika.
    drop(
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer"),
    );
    let sent: Vec<_> = (1..=3)
        .map(|seq| {
            stored(
                seq,
                &topic,
                &format!("order {seq}"),
                &format!(r#"{{"n":{seq},"text":"ü \"quoted\""}}"#),
            )
        })
        .collect();
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default().source(SOURCE))
            .expect("publisher");
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));

    let lines = python.run(&["read-amqp", &broker.addr, &queue, "3"]);
    let parsed = interop::assert_parsed(&lines, &sent, SOURCE);
    for message in &sent {
        let native = &parsed[&message.id.to_string()]["native"];
        assert_eq!(native["message_id"], message.id.to_string());
        assert_eq!(native["type"], message.message_type.as_str());
        assert_eq!(native["timestamp"], message.created_at.timestamp());
        assert_eq!(native["content_type"], "application/json");
    }
}

#[derive(QueryableByName)]
struct Effect {
    #[diesel(sql_type = Text)]
    message_id: String,
}

#[test]
fn python_cloudevents_are_processed_once_each_through_the_inbox() {
    let Some(python) = interop::client() else {
        return;
    };
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = common::sqlite("interop", 4);
    let mut conn = pool.get().expect("conn");
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL, type TEXT NOT NULL)")
        .expect("effects table");
    let queue = unique("from-python");
    broker.cleanup_queue(&queue);
    let mut consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue).native_metadata(true),
    )
    .expect("consumer");

    let ids: Vec<String> = (0..4).map(|_| MessageId::new().to_string()).collect();
    let specs = [
        format!("binary:{}", ids[0]),
        format!("binary:{}", ids[1]),
        format!("structured:{}", ids[2]),
        format!("native:{}", ids[3]),
    ];
    let mut args = vec!["send-amqp", broker.addr.as_str(), queue.as_str()];
    args.extend(specs.iter().map(String::as_str));
    python.run(&args);

    let mut handler = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, message: &IncomingMessage| {
            let data: serde_json::Value = message.json().expect("JSON data");
            assert_eq!(data["id"], message.id.to_string());
            diesel::sql_query("INSERT INTO effects (message_id, type) VALUES (?, ?)")
                .bind::<Text, _>(message.id.to_string())
                .bind::<Text, _>(&message.message_type)
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while total.delivered < 8 {
        assert!(Instant::now() < deadline, "consumed only {total:?}");
        let report = consumer
            .run_once(&mut handler, 100, Duration::from_secs(5))
            .expect("consume");
        total.delivered += report.delivered;
        total.acked += report.acked;
        total.malformed += report.malformed;
    }
    assert_eq!((total.acked, total.malformed), (8, 0), "{total:?}");

    let effects: Vec<Effect> =
        diesel::sql_query("SELECT message_id FROM effects ORDER BY message_id")
            .load(&mut conn)
            .expect("effects");
    let mut expected = ids.clone();
    expected.sort();
    let got: Vec<_> = effects.into_iter().map(|e| e.message_id).collect();
    assert_eq!(got, expected, "each id once");
}
