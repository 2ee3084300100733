//! The smallest end-to-end waybill program. An order and its `OrderPlaced` event commit
//! together; a rolled-back order publishes nothing; a relay moves events to an in-process broker
//! that delivers some of them twice; the billing consumer's inbox makes each charge happen once.
//!
//! Run with: `cargo run -p waybill-quickstart`

use std::time::Duration;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::BigInt;
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{enqueue, run_migrations, DieselStore, Inbox, InboxHandler, IncomingMessage};
use waybill_memory::{MemoryBroker, MemoryConfig};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};

type Error = Box<dyn std::error::Error>;

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Writes the order and its event in one transaction: both commit, or neither.
fn place_order(conn: &mut SqliteConnection, order_id: i64, total_cents: i64) -> Result<(), Error> {
    conn.transaction(|conn| {
        diesel::sql_query("INSERT INTO orders (id, total_cents) VALUES (?, ?)")
            .bind::<BigInt, _>(order_id)
            .bind::<BigInt, _>(total_cents)
            .execute(conn)?;
        let event = OrderPlaced {
            order_id,
            total_cents,
        };
        enqueue(
            conn,
            &NewOutboxMessage::json("orders", format!("order:{order_id}"), "OrderPlaced", &event)?,
        )?;
        if total_cents <= 0 {
            return Err("refused: the total must be positive".into());
        }
        Ok(())
    })
}

fn main() -> Result<(), Error> {
    std::fs::create_dir_all("data")?;
    let path = "data/quickstart.db";
    let _ = std::fs::remove_file(path);
    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(path))?;
    let mut conn = pool.get()?;
    run_migrations(&mut conn)?;
    diesel::sql_query("CREATE TABLE orders (id INTEGER PRIMARY KEY, total_cents INTEGER NOT NULL)")
        .execute(&mut conn)?;
    // Deliberately no unique constraint: only the inbox can prevent a double charge.
    diesel::sql_query("CREATE TABLE charges (order_id INTEGER NOT NULL, cents INTEGER NOT NULL)")
        .execute(&mut conn)?;

    for order_id in 1..=100 {
        place_order(&mut conn, order_id, 100 * order_id)?;
    }
    let refused = place_order(&mut conn, 101, 0);
    println!(
        "order 101: {}",
        refused
            .err()
            .map_or_else(|| "placed".to_owned(), |e| e.to_string())
    );

    // The relay: outbox -> broker. Half of the deliveries will be repeated, as after lost acks.
    let broker = MemoryBroker::new(MemoryConfig::default().redeliver_fraction(0.5));
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        broker.publisher(),
        RelayConfig::default(),
    );
    while relay.run_once()?.claimed > 0 {}

    // The billing consumer: each OrderPlaced charges the order, once, in one transaction with its inbox record.
    let mut billing = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, msg: &IncomingMessage| {
            let order: OrderPlaced = msg.json().map_err(|e| {
                waybill_diesel::Error::Database(diesel::result::Error::DeserializationError(
                    Box::new(e),
                ))
            })?;
            diesel::sql_query("INSERT INTO charges (order_id, cents) VALUES (?, ?)")
                .bind::<BigInt, _>(order.order_id)
                .bind::<BigInt, _>(order.total_cents)
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    let mut consumer = broker.consumer("orders");
    while consumer
        .run_once(&mut billing, 100, Duration::ZERO)
        .delivered
        > 0
    {}

    let stats = broker.stats();
    let mut count = |sql: &str| -> Result<i64, Error> {
        Ok(diesel::sql_query(sql).get_result::<Count>(&mut conn)?.n)
    };
    let orders = count("SELECT count(*) AS n FROM orders")?;
    let charges = count("SELECT count(*) AS n FROM charges")?;
    let charged_once = count("SELECT count(*) AS n FROM (SELECT order_id FROM charges GROUP BY order_id HAVING count(*) = 1)")?;
    println!("orders placed:        {orders}");
    println!("messages published:   {}", stats.published);
    println!(
        "deliveries:           {} ({} duplicates)",
        stats.delivered, stats.duplicated
    );
    println!("charges:              {charges}");
    println!("charged exactly once: {charged_once}");
    if charged_once != orders || charges != orders {
        return Err("some order was not charged exactly once".into());
    }
    Ok(())
}
