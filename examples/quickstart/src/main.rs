//! The smallest end-to-end waybill program: an order and its event commit together, a relay
//! publishes the event, and a rolled-back order publishes nothing.
//!
//! Run with: `cargo run -p waybill-quickstart`

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{enqueue, run_migrations, DieselStore};
use waybill_outbox_core::{InMemoryPublisher, NewOutboxMessage, Relay, RelayConfig};

#[derive(serde::Serialize)]
struct OrderPlaced {
    order_id: i64,
    total_cents: i64,
}

fn place_order(
    conn: &mut SqliteConnection,
    order_id: i64,
    total_cents: i64,
) -> Result<(), Box<dyn std::error::Error>> {
    conn.transaction(|conn| {
        diesel::sql_query("INSERT INTO orders (id, total_cents) VALUES (?, ?)")
            .bind::<diesel::sql_types::BigInt, _>(order_id)
            .bind::<diesel::sql_types::BigInt, _>(total_cents)
            .execute(conn)?;
        let event = NewOutboxMessage::json(
            "orders",
            format!("order:{order_id}"),
            "OrderPlaced",
            &OrderPlaced {
                order_id,
                total_cents,
            },
        )?;
        enqueue(conn, &event)?;
        if total_cents < 0 {
            return Err("refused: negative total".into());
        }
        Ok(())
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new("data");
    std::fs::create_dir_all(dir)?;
    let url = dir.join("quickstart.db").to_string_lossy().into_owned();
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(url))?;
    let mut conn = pool.get()?;
    run_migrations(&mut conn)?;
    diesel::sql_query(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, total_cents INTEGER NOT NULL)",
    )
    .execute(&mut conn)?;
    diesel::sql_query("DELETE FROM orders").execute(&mut conn)?;

    place_order(&mut conn, 4231, 1999)?;
    place_order(&mut conn, 4232, 500)?;
    let refused = place_order(&mut conn, 4233, -1);
    println!(
        "order 4233: {}",
        refused.err().map_or("placed".into(), |e| e.to_string())
    );
    drop(conn);

    let publisher = InMemoryPublisher::new();
    let mut relay = Relay::new(
        DieselStore::new(pool),
        publisher.clone(),
        RelayConfig::default(),
    );
    let report = relay.run_once()?;
    println!(
        "relay round: claimed {}, published {}",
        report.claimed, report.published
    );
    for msg in publisher.published() {
        println!(
            "  {} {} {} {}",
            msg.topic,
            msg.partition_key,
            msg.message_type,
            String::from_utf8_lossy(&msg.payload)
        );
    }
    if publisher.len() != 2 {
        return Err(format!("expected 2 published events, got {}", publisher.len()).into());
    }
    Ok(())
}
