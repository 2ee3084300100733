//! Inbox overhead: a handler transaction (one UPDATE of a balance row) against the same handler
//! inside `Inbox::process_once`, alternating, 1 and 8 clients.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bytea, Text, Uuid as SqlUuid};
use waybill_diesel::{Inbox, IncomingMessage, Processed};
use waybill_outbox_core::MessageId;

use crate::common::{alternate_all, record_pair, tps, Error, Figures, PgPool, Settings};

fn credit(conn: &mut PgConnection, client: usize) -> QueryResult<usize> {
    diesel::sql_query("UPDATE balances SET cents = cents + 1 WHERE id = $1")
        .bind::<BigInt, _>(client as i64)
        .execute(conn)
}

/// The floor: the same inbox row written by hand-written SQL, no library in between.
fn raw_inbox_insert(conn: &mut PgConnection, id: uuid::Uuid, digest: &[u8]) -> Result<bool, Error> {
    let inserted = diesel::sql_query(
        "INSERT INTO inbox_processed (consumer, dedup_key, message_id, payload_digest) \
         VALUES ('billing-raw', $1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind::<Text, _>(id.to_string())
    .bind::<SqlUuid, _>(id)
    .bind::<Bytea, _>(digest)
    .execute(conn)?;
    Ok(inserted == 1)
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS balances (id bigint PRIMARY KEY, cents bigint NOT NULL);
         INSERT INTO balances SELECT i, 0 FROM generate_series(0, 7) AS i ON CONFLICT DO NOTHING",
    )?;
    let period = Duration::from_secs(settings.pick(1, 5));
    let body = crate::common::payload(0).to_string().into_bytes();
    // A SHA-256 digest is 32 bytes; the floor stores as many.
    let digest = [7u8; 32];
    for clients in [1, 8] {
        let medians = alternate_all(
            settings.rounds(),
            &mut [
                &mut || {
                    tps(
                        pool,
                        clients,
                        period,
                        |conn: &mut PgConnection, client, _| {
                            conn.transaction(|conn| credit(conn, client).map(drop))?;
                            Ok(())
                        },
                    )
                },
                &mut || {
                    tps(
                        pool,
                        clients,
                        period,
                        move |conn: &mut PgConnection, client, _| {
                            conn.transaction(|conn| -> Result<(), Error> {
                                if raw_inbox_insert(conn, uuid::Uuid::now_v7(), &digest)? {
                                    credit(conn, client)?;
                                }
                                Ok(())
                            })
                        },
                    )
                },
                &mut || {
                    let (inbox, body) = (Inbox::new("billing"), body.clone());
                    tps(
                        pool,
                        clients,
                        period,
                        move |conn: &mut PgConnection, client, _| {
                            let message = IncomingMessage::new(
                                MessageId::new(),
                                "orders",
                                "OrderPlaced",
                                body.clone(),
                            );
                            match inbox.process_once(conn, &message, |conn| {
                                credit(conn, client).map_err(waybill_diesel::Error::from)
                            })? {
                                Processed::Handled(_) => Ok(()),
                                other => {
                                    Err(format!("a fresh message was not handled: {other:?}")
                                        .into())
                                }
                            }
                        },
                    )
                },
            ],
        )?;
        let (handler, floor, ours) = (medians[0], medians[1], medians[2]);
        record_pair(
            figures,
            &format!("handler transaction vs inside `process_once`, {clients} client(s)"),
            (handler, ours),
            [
                format!("pg_handler_tps_{clients}"),
                format!("pg_handler_inbox_tps_{clients}"),
                format!("inbox_overhead_ratio_{clients}"),
            ],
            "txn/s",
        );
        record_pair(
            figures,
            &format!("handler transaction vs + the same inbox row in hand-written SQL (the floor), {clients} client(s)"),
            (handler, floor),
            [
                format!("pg_handler_tps_{clients}"),
                format!("pg_handler_raw_inbox_tps_{clients}"),
                format!("inbox_floor_ratio_{clients}"),
            ],
            "txn/s",
        );
        record_pair(
            figures,
            &format!("+ hand-written SQL vs `process_once`, {clients} client(s)"),
            (floor, ours),
            [
                format!("pg_handler_raw_inbox_tps_{clients}"),
                format!("pg_handler_inbox_tps_{clients}"),
                format!("inbox_overhead_vs_floor_{clients}"),
            ],
            "txn/s",
        );
    }
    for name in [
        "inbox_overhead_ratio",
        "inbox_floor_ratio",
        "inbox_overhead_vs_floor",
    ] {
        if let Some(ratio) = figures.get(&format!("{name}_1")) {
            figures.set(name, ratio);
        }
    }
    pool.get()?
        .batch_execute("DROP TABLE balances; TRUNCATE inbox_processed")?;
    Ok(())
}
