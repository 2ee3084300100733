//! 10,000 messages from the outbox through RabbitMQ into the inbox, with the first consumer
//! killed mid-stream after a commit and before its ack: every message takes effect exactly once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig};
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{DeliveryHandler, IncomingMessage};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};

use common::proxy::{host_port, Proxy};
use common::{unique, SqlitePool, PATIENCE};

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
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = common::sqlite("ten-thousand", 4);
    let mut conn = pool.get().unwrap();
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .unwrap();

    let topic = unique("orders");
    let queue = unique("billing");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue).bind(&topic, "#");
    // Connecting declares and binds the queue, so nothing published is unroutable.
    let mut proxy = Proxy::start(&host_port(&broker.addr));
    let first = AmqpConsumer::connect(&proxy.url(&broker.addr), config.clone()).unwrap();

    let messages: Vec<_> = (0..MESSAGES)
        .map(|i| {
            NewOutboxMessage::json(&topic, format!("order.{}", i % 100), "OrderPlaced", &i).unwrap()
        })
        .collect();
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk)).unwrap();
    }
    drop(conn);
    let publisher = AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).unwrap();
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

    // The first consumer dies right after committing its 3,000th message, before acking it: its
    // handler stops there for good and the test cuts its connection, so the broker takes back
    // every delivery it had not acknowledged. (A panic would not do: the consumer catches it.)
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
                    std::thread::park(); // never acks
                }
            }
            disposition
        };
        loop {
            consumer
                .run_once(&mut handler, 100, Duration::from_secs(5))
                .unwrap();
        }
    });
    dead.recv_timeout(PATIENCE * 5)
        .expect("the first consumer reached its kill point");
    proxy.cut();
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM effects"),
        KILL_AFTER as i64
    );

    // A restarted consumer gets the unacknowledged deliveries back; the inbox drops the duplicate.
    let mut second = AmqpConsumer::connect(&broker.addr, config).unwrap();
    let mut inbox = InboxHandler::new(pool.clone(), Inbox::new("billing"), record_effect);
    let mut deliveries = 0;
    let mut handler = |message: &IncomingMessage| {
        deliveries += 1;
        inbox.handle(message)
    };
    while count(&pool, "SELECT count(*) AS n FROM effects") < MESSAGES as i64 {
        assert!(Instant::now() < deadline, "consumption stalled");
        second
            .run_once(&mut handler, 500, Duration::from_secs(5))
            .unwrap();
    }
    assert!(
        second
            .run_once(&mut handler, 500, Duration::from_millis(200))
            .unwrap()
            .delivered
            == 0
    );
    assert!(
        deliveries > MESSAGES - KILL_AFTER,
        "the committed but unacknowledged delivery came back"
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
