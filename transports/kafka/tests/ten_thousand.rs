//! 10,000 messages from the outbox through Kafka into the inbox, with the first consumer of the
//! group killed mid-stream after a commit and before its offset commit: every message takes
//! effect exactly once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{DeliveryHandler, IncomingMessage};
use waybill_kafka::{ConsumerConfig, KafkaConsumer, KafkaPublisher, PublisherConfig};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};
use waybill_testkit::kafka::{brokers, create_topic};
use waybill_testkit::{unique, PATIENCE};

use common::{sqlite, SqlitePool};

const MESSAGES: usize = 10_000;
const KILL_AFTER: usize = 3_000;

type Conn = PooledConnection<ConnectionManager<SqliteConnection>>;

fn record_effect(conn: &mut Conn, message: &IncomingMessage) -> Result<(), waybill_diesel::Error> {
    diesel::sql_query("INSERT INTO effects (message_id) VALUES (?)")
        .bind::<Text, _>(message.id.to_string())
        .execute(conn)?;
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(pool: &SqlitePool, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut pool.get().unwrap())
        .unwrap()
        .n
}

#[test]
fn ten_thousand_messages_take_effect_once_across_a_consumer_killed_mid_stream() {
    let Some(brokers) = brokers() else { return };
    let (pool, _database) = sqlite("kafka-ten-thousand", 4);
    let mut conn = pool.get().unwrap();
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .unwrap();

    let topic = unique("orders");
    create_topic(&brokers, &topic, 4);
    let config = ConsumerConfig::new(&topic, unique("billing"));
    let first = KafkaConsumer::connect(&brokers, config.clone()).unwrap();
    let kill = first.close_handle();

    let messages: Vec<_> = (0..MESSAGES)
        .map(|i| {
            NewOutboxMessage::json(&topic, format!("order.{}", i % 100), "OrderPlaced", &i).unwrap()
        })
        .collect();
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk)).unwrap();
    }
    drop(conn);
    let publisher = KafkaPublisher::connect(&brokers, PublisherConfig::default()).unwrap();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default().batch_size(500),
    );
    let deadline = Instant::now() + PATIENCE * 5;
    let mut published = 0;
    while published < MESSAGES as u64 {
        assert!(
            Instant::now() < deadline,
            "relay published only {published}"
        );
        published += relay.run_once().unwrap().published;
    }

    // The first consumer dies right after its inbox committed its 3,000th message, before the
    // offset commit: its handler stops there for good (a panic would not do: the loop catches
    // it), and the test makes it leave the group, as a crashed process's connection would. (A
    // member stuck in its handler would be dropped after max.poll.interval.ms on Kafka; tansu
    // keeps waiting for it while its client heartbeats.)
    let (died, dead) = std::sync::mpsc::channel();
    let killed_pool = pool.clone();
    std::thread::spawn(move || {
        let mut consumer = first;
        let mut inbox = InboxHandler::new(killed_pool, Inbox::new("billing"), record_effect);
        let mut handled = 0;
        let mut handler = |message: &IncomingMessage| {
            let disposition = inbox.handle(message);
            handled += 1;
            if handled == KILL_AFTER {
                died.send(()).unwrap();
                loop {
                    std::thread::park(); // never commits the offset
                }
            }
            disposition
        };
        loop {
            consumer
                .run_once(&mut handler, 100, Duration::from_secs(1))
                .unwrap();
        }
    });
    dead.recv_timeout(PATIENCE * 5)
        .expect("the first consumer reached its kill point");
    kill.close();
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM effects"),
        KILL_AFTER as i64
    );

    // The second member gets every partition from its committed offset: the record whose
    // offset was never committed comes back, and the inbox drops it.
    let mut second = KafkaConsumer::connect(&brokers, config).unwrap();
    let mut inbox = InboxHandler::new(pool.clone(), Inbox::new("billing"), record_effect);
    let mut deliveries = 0;
    let mut handler = |message: &IncomingMessage| {
        deliveries += 1;
        inbox.handle(message)
    };
    while count(&pool, "SELECT count(*) AS n FROM effects") < MESSAGES as i64 {
        assert!(Instant::now() < deadline, "consumption stalled");
        second
            .run_once(&mut handler, 500, Duration::from_secs(1))
            .unwrap();
    }
    assert_eq!(
        second
            .run_once(&mut handler, 500, Duration::from_millis(500))
            .unwrap()
            .delivered,
        0
    );
    assert!(
        deliveries > MESSAGES - KILL_AFTER,
        "the committed but unacknowledged record came back"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM effects"),
        MESSAGES as i64
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT message_id) AS n FROM effects"),
        MESSAGES as i64
    );
}
