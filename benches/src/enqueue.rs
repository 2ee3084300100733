//! Enqueue overhead: a business transaction (one insert) against the same transaction plus
//! `enqueue`, alternating, 1 and 8 clients.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Text, Uuid as SqlUuid};
use waybill_diesel::enqueue;
use waybill_outbox_core::NewOutboxMessage;

use crate::common::{alternate_all, payload, record_pair, tps, Error, Figures, PgPool, Settings};

fn business_insert(conn: &mut PgConnection, i: usize) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, customer, amount, created_at) VALUES ($1, 'customer-0042', $2, now())")
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<BigInt, _>(i as i64)
        .execute(conn)
}

/// The floor: the same row written by hand-written SQL, no library in between.
fn raw_outbox_insert(conn: &mut PgConnection, i: usize) -> Result<usize, Error> {
    let body = serde_json::to_vec(&payload(i))?;
    Ok(diesel::sql_query(
        "INSERT INTO outbox_messages (id, topic, partition_key, message_type, content_type, payload, headers) \
         VALUES ($1, 'orders', $2, 'OrderPlaced', 'application/json', $3, '{}')",
    )
    .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
    .bind::<Text, _>(format!("order:{i}"))
    .bind::<Bytea, _>(body)
    .execute(conn)?)
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (id uuid PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL)",
    )?;
    let period = Duration::from_secs(settings.pick(1, 5));
    for clients in [1, 8] {
        let medians = alternate_all(
            settings.rounds(),
            &mut [
                &mut || {
                    tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                        conn.transaction(|conn| business_insert(conn, i).map(drop))?;
                        Ok(())
                    })
                },
                &mut || {
                    tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                        conn.transaction(|conn| -> Result<(), Error> {
                            business_insert(conn, i)?;
                            raw_outbox_insert(conn, i)?;
                            Ok(())
                        })
                    })
                },
                &mut || {
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
            ],
        )?;
        let (business, floor, ours) = (medians[0], medians[1], medians[2]);
        record_pair(
            figures,
            &format!("business insert vs + `enqueue`, {clients} client(s)"),
            (business, ours),
            [
                format!("pg_business_tps_{clients}"),
                format!("pg_business_enqueue_tps_{clients}"),
                format!("enqueue_overhead_ratio_{clients}"),
            ],
            "txn/s",
        );
        record_pair(
            figures,
            &format!("business insert vs + the same outbox row in hand-written SQL (the floor), {clients} client(s)"),
            (business, floor),
            [
                format!("pg_business_tps_{clients}"),
                format!("pg_business_raw_insert_tps_{clients}"),
                format!("enqueue_floor_ratio_{clients}"),
            ],
            "txn/s",
        );
        record_pair(
            figures,
            &format!("+ hand-written SQL vs + `enqueue`, {clients} client(s)"),
            (floor, ours),
            [
                format!("pg_business_raw_insert_tps_{clients}"),
                format!("pg_business_enqueue_tps_{clients}"),
                format!("enqueue_overhead_vs_floor_{clients}"),
            ],
            "txn/s",
        );
    }
    for name in [
        "enqueue_overhead_ratio",
        "enqueue_floor_ratio",
        "enqueue_overhead_vs_floor",
    ] {
        if let Some(ratio) = figures.get(&format!("{name}_1")) {
            figures.set(name, ratio);
        }
    }
    pool.get()?
        .batch_execute("TRUNCATE orders, outbox_messages")?;
    Ok(())
}
