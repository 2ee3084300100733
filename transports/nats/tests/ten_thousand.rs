//! 10,000 messages from the outbox through NATS JetStream into the inbox, with the first consumer
//! killed mid-stream after a commit and before its ack: every message takes effect exactly once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{DeliveryHandler, IncomingMessage};
use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};

use common::{nats, unique, DEADLINE as PATIENCE};

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

fn count(pool: &Pool<ConnectionManager<SqliteConnection>>, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut pool.get().unwrap())
        .unwrap()
        .n
}

#[test]
fn ten_thousand_messages_take_effect_once_across_a_consumer_killed_mid_stream() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let path = std::env::temp_dir().join(format!("{}.db", unique("ten-thousand")));
    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .unwrap();
    // Unacknowledged deliveries come back after `ack_wait`.
    let config = ConsumerConfig::new(&stream, unique("billing")).ack_wait(Duration::from_secs(2));
    let first = NatsConsumer::connect(&nats.url, config.clone()).unwrap();

    let messages: Vec<_> = (0..MESSAGES)
        .map(|i| {
            NewOutboxMessage::json(&topic, format!("order:{}", i % 100), "OrderPlaced", &i).unwrap()
        })
        .collect();
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk)).unwrap();
    }
    drop(conn);
    let publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
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
    // handler stops there for good, so nothing it holds is ever acknowledged. (A panic would not
    // do: the consumer catches it.)
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
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM effects"),
        KILL_AFTER as i64
    );

    // A restarted consumer (same durable) gets the unacknowledged deliveries back after
    // `ack_wait`; the inbox drops the duplicates.
    let mut second = NatsConsumer::connect(&nats.url, config).unwrap();
    let mut inbox = InboxHandler::new(pool.clone(), Inbox::new("billing"), record_effect);
    let deliveries = std::cell::Cell::new(0);
    let mut handler = |message: &IncomingMessage| {
        deliveries.set(deliveries.get() + 1);
        inbox.handle(message)
    };
    // The redelivery comes only after `ack_wait`, possibly after every other message is in.
    while count(&pool, "SELECT count(*) AS n FROM effects") < MESSAGES as i64
        || deliveries.get() <= MESSAGES - KILL_AFTER
    {
        assert!(
            Instant::now() < deadline,
            "consumption stalled, or the committed but unacknowledged delivery never came back"
        );
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
    assert_eq!(
        count(&pool, "SELECT count(*) AS n FROM effects"),
        MESSAGES as i64
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT message_id) AS n FROM effects"),
        MESSAGES as i64
    );

    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
