//! Enqueue overhead: a business transaction (one insert) against the same transaction plus
//! `enqueue`, alternating, 1 and 8 clients.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use waybill_diesel::enqueue;
use waybill_outbox_core::NewOutboxMessage;

use crate::common::{alternate, payload, record_pair, tps, Error, Figures, PgPool, Settings};

fn business_insert(conn: &mut PgConnection, i: usize) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, customer, amount, created_at) VALUES ($1, 'customer-0042', $2, now())")
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<BigInt, _>(i as i64)
        .execute(conn)
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (id uuid PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL)",
    )?;
    let period = Duration::from_secs(settings.pick(1, 5));
    for clients in [1, 8] {
        let (a, b) = alternate(
            settings.rounds(),
            || {
                tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                    conn.transaction(|conn| business_insert(conn, i).map(drop))?;
                    Ok(())
                })
            },
            || {
                tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                    let msg = NewOutboxMessage::json(
                        "orders",
                        format!("order:{i}"),
                        "OrderPlaced",
                        &payload(i),
                    )?;
                    conn.transaction(|conn| {
                        business_insert(conn, i)?;
                        enqueue(conn, &msg)
                    })?;
                    Ok(())
                })
            },
        )?;
        record_pair(
            figures,
            &format!("business insert vs + `enqueue`, {clients} client(s)"),
            (a, b),
            [
                format!("pg_business_tps_{clients}"),
                format!("pg_business_enqueue_tps_{clients}"),
                format!("enqueue_overhead_ratio_{clients}"),
            ],
            "txn/s",
        );
    }
    if let Some(ratio) = figures.get("enqueue_overhead_ratio_1") {
        figures.set("enqueue_overhead_ratio", ratio);
    }
    pool.get()?
        .batch_execute("TRUNCATE orders, outbox_messages")?;
    Ok(())
}
