//! Inbox overhead: a handler transaction (one UPDATE of a balance row) against the same handler
//! inside `Inbox::process_once`, alternating, 1 and 8 clients.

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use waybill_diesel::{Inbox, IncomingMessage, Processed};
use waybill_outbox_core::MessageId;

use crate::common::{alternate, record_pair, tps, Error, Figures, PgPool, Settings};

fn credit(conn: &mut PgConnection, client: usize) -> QueryResult<usize> {
    diesel::sql_query("UPDATE balances SET cents = cents + 1 WHERE id = $1")
        .bind::<BigInt, _>(client as i64)
        .execute(conn)
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS balances (id bigint PRIMARY KEY, cents bigint NOT NULL);
         INSERT INTO balances SELECT i, 0 FROM generate_series(0, 7) AS i ON CONFLICT DO NOTHING",
    )?;
    let period = Duration::from_secs(settings.pick(1, 5));
    let body = crate::common::payload(0).to_string().into_bytes();
    for clients in [1, 8] {
        let (a, b) = alternate(
            settings.rounds(),
            || {
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
            || {
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
                                Err(format!("a fresh message was not handled: {other:?}").into())
                            }
                        }
                    },
                )
            },
        )?;
        record_pair(
            figures,
            &format!("handler transaction vs inside `process_once`, {clients} client(s)"),
            (a, b),
            [
                format!("pg_handler_tps_{clients}"),
                format!("pg_handler_inbox_tps_{clients}"),
                format!("inbox_overhead_ratio_{clients}"),
            ],
            "txn/s",
        );
    }
    if let Some(ratio) = figures.get("inbox_overhead_ratio_1") {
        figures.set("inbox_overhead_ratio", ratio);
    }
    pool.get()?
        .batch_execute("DROP TABLE balances; TRUNCATE inbox_processed")?;
    Ok(())
}
