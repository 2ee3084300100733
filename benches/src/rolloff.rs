//! Roll-off: forgetting N rows of published history by dropping a partition (the partitioned
//! layout) against today's bounded-DELETE purge, in WAL bytes (`pg_current_wal_lsn()` before
//! and after, server-wide: other sessions' writes count too) and time; and the tables' size
//! over fill + drain + forget cycles with no VACUUM at all (autovacuum off on the tables).

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use waybill_diesel::partitions::{self, PartitionConfig};
use waybill_diesel::OutboxConnection;
use waybill_diesel::{Inbox, IncomingMessage};
use waybill_outbox_core::{MessageId, RelayConfig, Retention};

use crate::common::{
    alternate, create_schema, drain, drop_schema, fill_pg, rate, row, thousands, Error, Figures,
    NoopPublisher, PgPool, Settings,
};

const DAY: Duration = Duration::from_secs(86_400);

#[derive(QueryableByName)]
struct Bytes {
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

fn wal_lsn(conn: &mut PgConnection) -> Result<String, Error> {
    #[derive(QueryableByName)]
    struct Lsn {
        #[diesel(sql_type = diesel::sql_types::Text)]
        lsn: String,
    }
    let lsn: Lsn =
        diesel::sql_query("SELECT pg_current_wal_lsn()::text AS lsn").get_result(conn)?;
    Ok(lsn.lsn)
}

fn wal_since(conn: &mut PgConnection, lsn: &str) -> Result<f64, Error> {
    let bytes: Bytes = diesel::sql_query(format!(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')::bigint AS bytes"
    ))
    .get_result(conn)?;
    Ok(bytes.bytes as f64)
}

/// WAL bytes and seconds of `forget`, from a checkpoint (so both sides pay their full-page
/// images the same way).
fn measure(
    conn: &mut PgConnection,
    forget: impl FnOnce(&mut PgConnection) -> Result<(), Error>,
) -> Result<(f64, f64), Error> {
    conn.batch_execute("CHECKPOINT")?;
    let lsn = wal_lsn(conn)?;
    let began = Instant::now();
    forget(conn)?;
    let seconds = began.elapsed().as_secs_f64();
    Ok((wal_since(conn, &lsn)?, seconds))
}

fn partitioned(pool: &PgPool, width: Duration, retention: Duration) -> Result<(), Error> {
    let config = PartitionConfig::default()
        .width(width)
        .outbox_retention(retention)
        .inbox_retention(retention);
    partitions::adopt(&mut *pool.get()?, &config)?;
    Ok(())
}

fn pool_is_partitioned(pool: &PgPool) -> Result<bool, Error> {
    Ok(partitions::is_partitioned(&mut *pool.get()?)?)
}

fn purge_all(conn: &mut PgConnection) -> Result<(), Error> {
    while conn.purge_published_messages(Duration::ZERO, 1000)? == 1000 {}
    Ok(())
}

/// Bytes of the queue table (`outbox_messages`, indexes included) and of every partition of
/// the history (`outbox_published`; 0 on the plain layout, whose history is in the queue table).
fn tables_bytes(conn: &mut PgConnection) -> Result<(f64, f64), Error> {
    #[derive(QueryableByName)]
    struct Sizes {
        #[diesel(sql_type = BigInt)]
        queue: i64,
        #[diesel(sql_type = BigInt)]
        history: i64,
    }
    let sizes: Sizes = diesel::sql_query(
        "SELECT pg_total_relation_size('outbox_messages') AS queue, coalesce((
           SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits
           WHERE inhparent = to_regclass('outbox_published')), 0)::bigint AS history",
    )
    .get_result(conn)?;
    Ok((sizes.queue as f64, sizes.history as f64))
}

pub fn run(settings: &Settings, figures: &mut Figures) -> Result<(), Error> {
    let (plain_schema, parts_schema) = (
        format!("{}_rolloff_delete", settings.schema),
        format!("{}_rolloff_parts", settings.schema),
    );
    let result = (|| -> Result<(), Error> {
        let rows = settings.pick(100_000, 1_000_000);
        // A: today's purge, bounded DELETE batches of 1,000 over published rows.
        let plain = create_schema(&settings.pg_url, &plain_schema)?;
        fill_pg(&mut *plain.get()?, "orders", rows, 1)?;
        let (delete_wal, delete_s) = measure(&mut *plain.get()?, purge_all)?;
        // B: the same rows of history in one partition two days old, rolled off.
        let parts = create_schema(&settings.pg_url, &parts_schema)?;
        partitioned(&parts, DAY, DAY)?;
        {
            let mut conn = parts.get()?;
            fill_pg(&mut conn, "orders", rows, 0)?;
            conn.batch_execute(
                "SELECT waybill_ensure_partition('outbox_published', now() - interval '2 days');
                 INSERT INTO outbox_published (seq, id, topic, partition_key, message_type,
                   content_type, payload, headers, attempts, created_at, published_at)
                 SELECT seq, id, topic, partition_key, message_type, content_type, payload,
                   headers, attempts, created_at,
                   date_bin('1 day', now() - interval '2 days', '2000-01-01 00:00:00+00')
                 FROM outbox_messages;
                 TRUNCATE outbox_messages;",
            )?;
        }
        let (rolloff_wal, rolloff_s) = measure(&mut *parts.get()?, |conn| {
            let rolled = partitions::roll_off(conn, true)?;
            if rolled.dropped.len() != 1 {
                return Err(format!("rolled off {:?}, not one partition", rolled.dropped).into());
            }
            Ok(())
        })?;
        row(
            &format!(
                "forgetting {} rows of history: WAL, bounded DELETE (A) vs roll-off (B)",
                thousands(rows as f64)
            ),
            &format!("{:.1} MB", delete_wal / 1e6),
            &format!("{:.1} kB", rolloff_wal / 1e3),
            &format!(
                "{:.5} (`rolloff_vs_delete_wal_ratio`)",
                rolloff_wal / delete_wal
            ),
        );
        row(
            &format!(
                "forgetting {} rows of history: time, bounded DELETE (A) vs roll-off (B)",
                thousands(rows as f64)
            ),
            &format!("{:.2} s", delete_s),
            &format!("{:.3} s", rolloff_s),
            &format!(
                "{:.4} (`rolloff_vs_delete_time_ratio`)",
                rolloff_s / delete_s
            ),
        );
        figures.set("rolloff_rows", rows as f64);
        figures.set("rolloff_delete_wal_bytes", delete_wal);
        figures.set("rolloff_wal_bytes", rolloff_wal);
        figures.set("rolloff_vs_delete_wal_ratio", rolloff_wal / delete_wal);
        figures.set("rolloff_delete_s", delete_s);
        figures.set("rolloff_s", rolloff_s);
        figures.set("rolloff_vs_delete_time_ratio", rolloff_s / delete_s);
        drop(plain);
        drop(parts);
        drop_schema(&settings.pg_url, &plain_schema)?;
        drop_schema(&settings.pg_url, &parts_schema)?;

        // The layouts' hot paths: a relay draining under retention, and an inbox processing
        // new messages (an empty handler, one transaction each), plain vs partitioned.
        let backlog = settings.backlog();
        let keep = RelayConfig::default()
            .batch_size(1000)
            .retention(Retention::Keep(DAY));
        let plain = create_schema(&settings.pg_url, &plain_schema)?;
        let parts = create_schema(&settings.pg_url, &parts_schema)?;
        partitioned(&parts, DAY, DAY)?;
        let relay_round = |pool: &PgPool| -> Result<f64, Error> {
            pool.get()?.batch_execute(if pool_is_partitioned(pool)? {
                "TRUNCATE outbox_messages, outbox_published"
            } else {
                "TRUNCATE outbox_messages"
            })?;
            fill_pg(&mut *pool.get()?, "orders", backlog, 0)?;
            drain(pool, backlog, 1, keep.clone(), || Ok(NoopPublisher))
        };
        let (a, b) = alternate(
            settings.rounds(),
            || relay_round(&plain),
            || relay_round(&parts),
        )?;
        row(
            &format!("relay drain of {backlog}, batch 1000, retention keep: plain (A) vs partitioned layout (B)"),
            &rate(a, "msg/s"),
            &rate(b, "msg/s"),
            &format!("{:.2} (`rolloff_relay_partitioned_vs_plain`, B/A)", b / a),
        );
        figures.set("rolloff_relay_msgs_per_s_plain", a);
        figures.set("rolloff_relay_msgs_per_s_partitioned", b);
        figures.set("rolloff_relay_partitioned_vs_plain", b / a);
        let messages = settings.pick(2_000, 5_000);
        let body = crate::common::payload(0).to_string().into_bytes();
        let inbox_round = |pool: &PgPool| -> Result<f64, Error> {
            let mut conn = pool.get()?;
            let inbox = Inbox::new(format!("bench-{}", MessageId::new()));
            let began = Instant::now();
            for _ in 0..messages {
                let message =
                    IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", body.clone());
                let done = inbox
                    .process_once(&mut *conn, &message, |_| Ok::<_, waybill_diesel::Error>(()))?;
                if done.handled().is_none() {
                    return Err("a new message was not handled".into());
                }
            }
            Ok(messages as f64 / began.elapsed().as_secs_f64())
        };
        let (a, b) = alternate(
            settings.rounds(),
            || inbox_round(&plain),
            || inbox_round(&parts),
        )?;
        row(
            &format!("inbox process_once of {messages} new messages, 1 client: plain (A) vs partitioned layout (B)"),
            &rate(a, "msg/s"),
            &rate(b, "msg/s"),
            &format!("{:.2} (`rolloff_inbox_partitioned_vs_plain`, B/A)", b / a),
        );
        figures.set("rolloff_inbox_msgs_per_s_plain", a);
        figures.set("rolloff_inbox_msgs_per_s_partitioned", b);
        figures.set("rolloff_inbox_partitioned_vs_plain", b / a);
        drop(plain);
        drop(parts);
        drop_schema(&settings.pg_url, &plain_schema)?;
        drop_schema(&settings.pg_url, &parts_schema)?;

        // Size over cycles, no VACUUM: fill, drain under retention, forget what was published.
        let cycles = 6;
        let mut sizes = [Vec::new(), Vec::new()];
        for (layout, sizes) in sizes.iter_mut().enumerate() {
            let schema = [&plain_schema, &parts_schema][layout];
            let pool = create_schema(&settings.pg_url, schema)?;
            if layout == 1 {
                // One-second partitions kept for none: each cycle's history is droppable as
                // soon as its second is over.
                partitioned(&pool, Duration::from_secs(1), Duration::ZERO)?;
            }
            pool.get()?
                .batch_execute("ALTER TABLE outbox_messages SET (autovacuum_enabled = false)")?;
            for _ in 0..cycles {
                fill_pg(&mut *pool.get()?, "orders", backlog, 0)?;
                drain(&pool, backlog, 1, keep.clone(), || Ok(NoopPublisher))?;
                let mut conn = pool.get()?;
                // At its peak: this cycle's history in, the earlier cycles' forgotten.
                sizes.push(tables_bytes(&mut conn)?);
                if layout == 0 {
                    purge_all(&mut conn)?;
                } else {
                    // The history's last partition ends within a second: wait that out.
                    std::thread::sleep(Duration::from_millis(1100));
                    partitions::roll_off(&mut conn, true)?;
                }
            }
            drop(pool);
            drop_schema(&settings.pg_url, schema)?;
        }
        let mb = |s: &[f64]| {
            s.iter()
                .map(|b| format!("{:.1}", b / 1e6))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let growth = |s: &[f64]| s[s.len() - 1] / s[0];
        let plain_queue: Vec<f64> = sizes[0].iter().map(|(q, _)| *q).collect();
        let parts_queue: Vec<f64> = sizes[1].iter().map(|(q, _)| *q).collect();
        let history: Vec<f64> = sizes[1].iter().map(|(_, h)| *h).collect();
        row(
            &format!(
                "history after the drain of each of {cycles} cycles of fill + drain of {backlog} + forget, no VACUUM: outbox_messages holding it, bounded DELETE (A: {} MB) vs outbox_published, roll-off (B: {} MB)",
                mb(&plain_queue),
                mb(&history)
            ),
            &format!("{:.2}x", growth(&plain_queue)),
            &format!("{:.2}x", growth(&history)),
            "(`rolloff_history_growth_over_cycles`, B)",
        );
        row(
            &format!(
                "the queue table outbox_messages on the partitioned layout, same cycles, no VACUUM ({} MB)",
                mb(&parts_queue)
            ),
            &format!("{:.2}x", growth(&parts_queue)),
            "",
            "(`rolloff_queue_growth_over_cycles`)",
        );
        figures.set("rolloff_delete_table_mb_first_cycle", plain_queue[0] / 1e6);
        figures.set(
            "rolloff_delete_table_mb_last_cycle",
            plain_queue[cycles - 1] / 1e6,
        );
        figures.set(
            "rolloff_delete_table_growth_over_cycles",
            growth(&plain_queue),
        );
        figures.set("rolloff_history_mb_first_cycle", history[0] / 1e6);
        figures.set("rolloff_history_mb_last_cycle", history[cycles - 1] / 1e6);
        figures.set("rolloff_history_growth_over_cycles", growth(&history));
        figures.set("rolloff_queue_mb_first_cycle", parts_queue[0] / 1e6);
        figures.set("rolloff_queue_mb_last_cycle", parts_queue[cycles - 1] / 1e6);
        figures.set("rolloff_queue_growth_over_cycles", growth(&parts_queue));
        Ok(())
    })();
    drop_schema(&settings.pg_url, &plain_schema)?;
    drop_schema(&settings.pg_url, &parts_schema)?;
    result
}
