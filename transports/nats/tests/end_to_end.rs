//! Outbox to inbox through NATS JetStream: the diesel SQLite outbox, the relay with
//! `NatsPublisher`, and `NatsConsumer` feeding `waybill_diesel::InboxHandler`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::{DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::{DeliveryHandler, Disposition, IncomingMessage};
use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig};
use waybill_outbox_core::{MessageId, NewOutboxMessage, Relay, RelayConfig};

use common::{consume_until, nats, unique, DEADLINE};

mod schema {
    #![allow(missing_docs)]
    diesel::table! {
        /// What the test's consumer did: one row per handled message.
        effects (rowid) {
            rowid -> BigInt,
            message_id -> Text,
        }
    }
}

use schema::effects;

/// Hands each delivery to the inbox, then asks for a retry of each message the first time it is
/// seen, after its commit: the retry must find the record and take no second effect.
struct NakOnce<H> {
    inner: H,
    seen: HashSet<MessageId>,
}

impl<H: DeliveryHandler> DeliveryHandler for NakOnce<H> {
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        let disposition = self.inner.handle(message);
        if disposition == Disposition::Ack && self.seen.insert(message.id) {
            return Disposition::Retry("crashed after commit, before ack".into());
        }
        disposition
    }
}

#[test]
fn relay_to_inbox_has_one_effect_per_message_despite_redelivery() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();

    let path = std::env::temp_dir().join(format!("{}.db", unique("waybill_nats")));
    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .unwrap();
    {
        let mut conn = pool.get().unwrap();
        waybill_diesel::run_migrations(&mut conn).unwrap();
        conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
            .unwrap();
        let messages: Vec<_> = (0..40)
            .map(|n| {
                NewOutboxMessage::json(&topic, format!("order:{}", n % 4), "OrderPlaced", &n)
                    .unwrap()
            })
            .collect();
        conn.transaction(|conn| waybill_diesel::enqueue_all(conn, &messages))
            .unwrap();
    }

    let publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default().batch_size(16),
    );
    let deadline = Instant::now() + DEADLINE;
    let mut published = 0;
    while published < 40 {
        assert!(
            Instant::now() < deadline,
            "relay published only {published}"
        );
        published += relay.run_once().unwrap().published;
    }
    assert_eq!(nats.count(&stream), 40);

    let mut consumer =
        NatsConsumer::connect(&nats.url, ConsumerConfig::new(&stream, unique("billing"))).unwrap();
    let inbox = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut diesel::r2d2::PooledConnection<ConnectionManager<SqliteConnection>>,
         msg: &IncomingMessage| {
            diesel::insert_into(effects::table)
                .values(effects::message_id.eq(msg.id.to_string()))
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    let mut handler = NakOnce {
        inner: inbox,
        seen: HashSet::new(),
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.acked >= 40);
    // Each message comes once from the server; its retry runs in place and finds the record.
    assert_eq!(
        (report.delivered, report.retried, report.acked),
        (40, 40, 40)
    );
    assert_eq!(report.dead_lettered + report.malformed, 0);

    let mut conn = pool.get().unwrap();
    let ids: Vec<String> = effects::table
        .select(effects::message_id)
        .load(&mut conn)
        .unwrap();
    assert_eq!(ids.len(), 40);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 40);
    drop(conn);
    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
