//! The whole way through: an outbox, the real relay, a broker and `process_once`, with the first
//! consumer killed between its inbox commit and its acknowledgement.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, PooledConnection};
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::{DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{DeliveryHandler, IncomingMessage, RetryPolicy};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};

use crate::outbox::{enqueue, sqlite, SqlitePool};
use crate::{Consume, Harness, PATIENCE};

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
        .get_result::<Count>(&mut pool.get().expect("sqlite connection"))
        .expect("a count")
        .n
}

fn effects(pool: &SqlitePool) -> i64 {
    count(pool, "SELECT count(*) AS n FROM effects")
}

/// 10,000 messages over 100 keys go from a SQLite outbox through the relay and the broker into
/// an inbox. The first consumer dies right after its inbox committed its 3,000th message, before
/// acknowledging it ([`Harness::consumer_to_kill`]); a second consumer gets the unacknowledged
/// deliveries back and the inbox drops the duplicate: every message takes effect exactly once.
pub fn ten_thousand_messages_take_effect_once_across_a_consumer_killed_mid_stream<H: Harness>(
    h: &mut H,
) {
    let name = h.name();
    let (pool, _database) = sqlite("ten-thousand", 4);
    pool.get()
        .expect("sqlite connection")
        .batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .expect("effects table");
    let (first, kill) = h.consumer_to_kill();
    let topic = h.topic().to_owned();
    let messages: Vec<_> = (0..MESSAGES)
        .map(|i| {
            NewOutboxMessage::json(&topic, format!("order-{}", i % 100), "OrderPlaced", &i)
                .expect("a JSON payload")
        })
        .collect();
    for chunk in messages.chunks(1000) {
        enqueue(&pool, chunk);
    }
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        h.publisher(),
        RelayConfig::default().batch_size(500),
    );
    let deadline = Instant::now() + PATIENCE * 5;
    let mut published = 0;
    while published < MESSAGES as u64 {
        assert!(
            Instant::now() < deadline,
            "{name}: the relay published only {published}"
        );
        published += relay.run_once().expect("a relay round").published;
    }

    // Its handler stops for good after the commit (a panic would not do: the loop catches it),
    // and `kill` makes the broker take back what it had not acknowledged.
    let (died, dead) = mpsc::channel();
    let killed_pool = pool.clone();
    std::thread::spawn(move || {
        let mut consumer = first;
        let mut inbox = InboxHandler::new(killed_pool, Inbox::new("billing"), record_effect);
        let mut handled = 0;
        let mut handler = |message: &IncomingMessage| {
            let disposition = inbox.handle(message);
            handled += 1;
            if handled == KILL_AFTER {
                let _ = died.send(());
                loop {
                    std::thread::park(); // never acknowledges
                }
            }
            disposition
        };
        loop {
            let _ = consumer.run_once(&mut handler, 100, Duration::from_secs(1));
        }
    });
    dead.recv_timeout(PATIENCE * 5)
        .unwrap_or_else(|_| panic!("{name}: the first consumer never reached its kill point"));
    kill();
    assert_eq!(effects(&pool), KILL_AFTER as i64, "{name}");

    let mut second = h.consumer(RetryPolicy::default());
    let mut inbox = InboxHandler::new(pool.clone(), Inbox::new("billing"), record_effect);
    let deliveries = std::cell::Cell::new(0);
    let mut handler = |message: &IncomingMessage| {
        deliveries.set(deliveries.get() + 1);
        inbox.handle(message)
    };
    while effects(&pool) < MESSAGES as i64 {
        assert!(Instant::now() < deadline, "{name}: consumption stalled");
        second
            .run_once(&mut handler, 500, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // The killed consumer's committed but unacknowledged delivery comes back when the broker
    // notices (at once on RabbitMQ, after `ack_wait` on NATS, after a rebalance on Kafka),
    // which may be after every other message took effect.
    while deliveries.get() <= MESSAGES - KILL_AFTER {
        assert!(
            Instant::now() < deadline,
            "{name}: the committed but unacknowledged delivery never came back"
        );
        second
            .run_once(&mut handler, 500, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let after = second
        .run_once(&mut handler, 500, Duration::from_millis(500))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(after.delivered, 0, "{name}: nothing left over");
    assert_eq!(effects(&pool), MESSAGES as i64, "{name}");
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT message_id) AS n FROM effects"),
        MESSAGES as i64,
        "{name}: every message took effect once"
    );
}
