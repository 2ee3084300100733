//! Sequenced messages (issue 25): what `.sequenced()` costs at enqueue (many keys, and one hot
//! key that serializes its writers by design), what `process_in_order` costs against
//! `process_once`, and how many inbox rows each keeps after a long run.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use waybill_diesel::{enqueue, InOrder, Inbox, IncomingMessage, Processed};
use waybill_inbox_core::Sequenced;
use waybill_outbox_core::{MessageId, NewOutboxMessage, Stamp};

use crate::common::{alternate_all, payload, record_pair, tps, Error, Figures, PgPool, Settings};

/// Keys of the many-keys enqueue runs.
const KEYS: usize = 1_000;

/// The key of the `i`-th enqueue (`tps` numbers client `n`'s transactions from
/// `n * 100_000_000`): each client walks the keys from its own offset, so clients do not
/// write the same key in lockstep.
fn spread_key(i: usize) -> String {
    let (client, done) = (i / 100_000_000, i % 100_000_000);
    format!("order:{}", (done + client * 127) % KEYS)
}
/// Keys each consumer client applies in order.
const CLIENT_KEYS: usize = 100;

fn business_insert(conn: &mut PgConnection, i: usize) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, customer, amount, created_at) VALUES ($1, 'customer-0042', $2, now())")
        .bind::<diesel::sql_types::Uuid, _>(uuid::Uuid::now_v7())
        .bind::<BigInt, _>(i as i64)
        .execute(conn)
}

fn credit(conn: &mut PgConnection, client: usize) -> QueryResult<usize> {
    diesel::sql_query("UPDATE balances SET cents = cents + 1 WHERE id = $1")
        .bind::<BigInt, _>(client as i64)
        .execute(conn)
}

/// Business insert + `enqueue` of a message of `key`, sequenced or not.
fn order(conn: &mut PgConnection, i: usize, key: String, sequenced: bool) -> Result<(), Error> {
    let mut msg = NewOutboxMessage::json("orders", key, "OrderPlaced", &payload(i))?;
    if sequenced {
        msg = msg.sequenced();
    }
    conn.transaction(|conn| {
        business_insert(conn, i)?;
        enqueue(conn, &msg)
    })?;
    Ok(())
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    pool.get()?.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (id uuid PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL);
         CREATE TABLE IF NOT EXISTS balances (id bigint PRIMARY KEY, cents bigint NOT NULL);
         INSERT INTO balances SELECT i, 0 FROM generate_series(0, 7) AS i ON CONFLICT DO NOTHING",
    )?;
    let period = Duration::from_secs(settings.pick(1, 5));
    enqueue_runs(settings, pool, figures, period)?;
    consume_runs(settings, pool, figures, period)?;
    rows_after(settings, pool, figures)?;
    pool.get()?.batch_execute(
        "DROP TABLE balances; TRUNCATE orders, outbox_messages, outbox_key_sequences, \
         inbox_processed, inbox_sequence_marks, inbox_sequence_gaps",
    )?;
    Ok(())
}

fn enqueue_runs(
    settings: &Settings,
    pool: &PgPool,
    figures: &mut Figures,
    period: Duration,
) -> Result<(), Error> {
    let mut worst: f64 = 0.0;
    for clients in [1, 8] {
        let medians = alternate_all(
            settings.rounds(),
            &mut [
                &mut || {
                    tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                        order(conn, i, spread_key(i), false)
                    })
                },
                &mut || {
                    tps(pool, clients, period, |conn: &mut PgConnection, _, i| {
                        order(conn, i, spread_key(i), true)
                    })
                },
            ],
        )?;
        record_pair(
            figures,
            &format!("`enqueue` vs `enqueue` of `.sequenced()` messages, {KEYS} keys, {clients} client(s)"),
            (medians[0], medians[1]),
            [
                format!("pg_enqueue_tps_{clients}"),
                format!("pg_sequenced_enqueue_tps_{clients}"),
                format!("sequenced_enqueue_overhead_ratio_{clients}"),
            ],
            "txn/s",
        );
        worst = worst.max(medians[0] / medians[1]);
    }
    // The headline is the worse of the two client counts.
    figures.set("sequenced_enqueue_overhead_ratio", worst);
    let medians = alternate_all(
        settings.rounds(),
        &mut [
            &mut || {
                tps(pool, 8, period, |conn: &mut PgConnection, _, i| {
                    order(conn, i, "order:hot".into(), false)
                })
            },
            &mut || {
                tps(pool, 8, period, |conn: &mut PgConnection, _, i| {
                    order(conn, i, "order:hot".into(), true)
                })
            },
        ],
    )?;
    record_pair(
        figures,
        "one hot key, 8 clients: `enqueue` vs sequenced (writers of the key serialize by design)",
        (medians[0], medians[1]),
        [
            "pg_hot_key_enqueue_tps_8".into(),
            "sequenced_enqueue_hot_key_txn_per_s".into(),
            "sequenced_hot_key_ratio".into(),
        ],
        "txn/s",
    );
    pool.get()?
        .batch_execute("TRUNCATE orders, outbox_messages, outbox_key_sequences")?;
    Ok(())
}

/// A fresh message in order for `client`: its `done`-th, over its own keys.
fn in_order_message(source: &str, client: usize, i: usize, body: &[u8]) -> IncomingMessage {
    let done = i % 100_000_000;
    let key = format!("c{client}-k{}", done % CLIENT_KEYS);
    let number = (done / CLIENT_KEYS + 1) as u64;
    IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", body.to_vec())
        .with_partition_key(key)
        .with_sequence(Sequenced::new(source, Stamp::new(number, "bench")))
}

fn consume_runs(
    settings: &Settings,
    pool: &PgPool,
    figures: &mut Figures,
    period: Duration,
) -> Result<(), Error> {
    let body = payload(0).to_string().into_bytes();
    // Each in-order round is a new producer (source), so its numbers start at 1 again.
    let rounds = Arc::new(AtomicUsize::new(0));
    let mut worst: f64 = f64::INFINITY;
    for clients in [1, 8] {
        let medians = alternate_all(
            settings.rounds(),
            &mut [
                &mut || {
                    let (inbox, body) = (Inbox::new("billing"), body.clone());
                    tps(pool, clients, period, move |conn: &mut PgConnection, client, _| {
                        let message = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", body.clone());
                        match inbox.process_once(conn, &message, |conn| {
                            credit(conn, client).map_err(waybill_diesel::Error::from)
                        })? {
                            Processed::Handled(_) => Ok(()),
                            other => Err(format!("a fresh message was not handled: {other:?}").into()),
                        }
                    })
                },
                &mut || {
                    let (inbox, body) = (Inbox::new("billing-in-order"), body.clone());
                    let source = format!("bench-{}", rounds.fetch_add(1, Ordering::Relaxed));
                    tps(pool, clients, period, move |conn: &mut PgConnection, client, i| {
                        let message = in_order_message(&source, client, i, &body);
                        match inbox.process_in_order(conn, &message, |conn| {
                            credit(conn, client).map_err(waybill_diesel::Error::from)
                        })? {
                            InOrder::Handled(_) => Ok(()),
                            other => Err(format!("the next number was not handled: {other:?}").into()),
                        }
                    })
                },
            ],
        )?;
        record_pair(
            figures,
            &format!("`process_once` vs `process_in_order`, {clients} client(s)"),
            (medians[0], medians[1]),
            [
                format!("pg_process_once_tps_{clients}"),
                format!("pg_process_in_order_tps_{clients}"),
                format!("inbox_process_once_vs_in_order_{clients}"),
            ],
            "txn/s",
        );
        let ratio = medians[1] / medians[0];
        figures.set(format!("inbox_in_order_vs_process_once_{clients}"), ratio);
        worst = worst.min(ratio);
    }
    // Throughput of in-order over process_once: the worse of the two client counts.
    figures.set("inbox_in_order_vs_process_once", worst);
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Applies the same run of messages over 1,000 keys through both inboxes with 8 clients and
/// counts the rows each keeps.
fn rows_after(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    const CLIENTS: usize = 8;
    const KEYS_EACH: usize = 125; // 8 x 125 = 1,000 keys
    let total: usize = settings.pick(20_000, 1_000_000);
    let each = total / CLIENTS;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let pool = pool.clone();
            std::thread::spawn(move || -> Result<(), Error> {
                let mut conn = pool.get()?;
                let (in_order, once) = (Inbox::new("rows-in-order"), Inbox::new("rows-once"));
                for m in 0..each {
                    let key = format!("order:{}", client + CLIENTS * (m % KEYS_EACH));
                    let number = (m / KEYS_EACH + 1) as u64;
                    let message = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}")
                        .with_partition_key(key)
                        .with_sequence(Sequenced::new("bench-rows", Stamp::new(number, "bench")));
                    let applied = in_order.process_in_order(&mut *conn, &message, |_| Ok::<_, waybill_diesel::Error>(()))?;
                    if applied != InOrder::Handled(()) {
                        return Err(format!("message {m} of client {client}: {applied:?}").into());
                    }
                    let handled = once.process_once(&mut *conn, &message, |_| Ok::<_, waybill_diesel::Error>(()))?;
                    if !handled.is_handled() {
                        return Err(format!("message {m} of client {client}: {handled:?}").into());
                    }
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "bench thread panicked")??;
    }
    let mut conn = pool.get()?;
    let marks: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM inbox_sequence_marks WHERE consumer = 'rows-in-order'",
    )
    .get_result(&mut conn)?;
    let records: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM inbox_processed WHERE consumer = 'rows-once'",
    )
    .get_result(&mut conn)?;
    let applied = (each * CLIENTS) as f64;
    crate::common::row(
        &format!("inbox rows after {} messages over 1,000 keys: `process_once` vs `process_in_order`", crate::common::thousands(applied)),
        &crate::common::thousands(records.n as f64),
        &crate::common::thousands(marks.n as f64),
        "`inbox_in_order_rows_after_1m`",
    );
    figures.set("inbox_in_order_rows_after_1m", marks.n as f64);
    figures.set("inbox_process_once_rows_after_1m", records.n as f64);
    figures.set("inbox_rows_after_messages", applied);
    Ok(())
}
