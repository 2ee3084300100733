//! Relay drain: a backlog to a no-op publisher, by batch size and relay count, against a naive
//! relay and the SQL floor of the same backlog; and the drain on SQLite.

use std::time::Instant;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::BigInt;
use waybill_diesel::sqlite::SqliteOptions;
use waybill_outbox_core::{OutboxMessage, PublishError, Publisher, RelayConfig};

use crate::common::{
    alternate, drain, drain_pipelined, empty_outbox, fill_enqueue, fill_pg, median, rate, row,
    Error, Figures, NoopPublisher, PgPool, Settings,
};
use crate::floor::{self, Shape};

pub const BATCHES: [usize; 3] = [100, 500, 1000];
pub const RELAYS: [usize; 2] = [1, 2];

/// One drain of a fresh backlog of `count` by waybill's relay.
pub fn relay_round(pool: &PgPool, count: usize, batch: usize, relays: usize) -> Result<f64, Error> {
    empty_outbox(&mut *pool.get()?)?;
    fill_pg(&mut *pool.get()?, "orders", count, 0)?;
    drain(
        pool,
        count,
        relays,
        RelayConfig::default().batch_size(batch),
        || Ok(NoopPublisher),
    )
}

fn floor_round(pool: &PgPool, count: usize, shape: Shape, batch: usize) -> Result<f64, Error> {
    empty_outbox(&mut *pool.get()?)?;
    fill_pg(&mut *pool.get()?, "orders", count, 0)?;
    floor::drain(&mut *pool.get()?, shape, batch, count)
}

/// The relay most tutorials show: one row per transaction, locked while "publishing".
fn naive_round(pool: &PgPool, count: usize) -> Result<f64, Error> {
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
    empty_outbox(&mut *pool.get()?)?;
    fill_pg(&mut *pool.get()?, "orders", count, 0)?;
    let mut conn = pool.get()?;
    let mut publisher = NoopPublisher;
    let began = Instant::now();
    let mut published = 0;
    loop {
        let done = conn.transaction(|conn| -> Result<bool, Error> {
            let row: Option<Seq> = diesel::sql_query(
                "SELECT seq FROM outbox_messages WHERE status = 0 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED",
            )
            .get_result(conn)
            .optional()?;
            let Some(row) = row else { return Ok(true) };
            publisher.publish(&[]);
            diesel::sql_query("DELETE FROM outbox_messages WHERE seq = $1").bind::<BigInt, _>(row.seq).execute(conn)?;
            Ok(false)
        })?;
        if done {
            break;
        }
        published += 1;
    }
    if published != count {
        return Err(format!("the naive relay drained {published} of {count}").into());
    }
    Ok(published as f64 / began.elapsed().as_secs_f64())
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    let backlog = settings.backlog();
    let grid_rounds = settings.pick(1, 3);
    for batch in BATCHES {
        for relays in RELAYS {
            let rates = (0..grid_rounds)
                .map(|_| relay_round(pool, backlog, batch, relays))
                .collect::<Result<Vec<_>, _>>()?;
            let rate_ = median(rates);
            row(
                &format!("relay drain, {backlog} backlog, batch {batch}, {relays} relay(s)"),
                &rate(rate_, "msg/s"),
                "",
                "",
            );
            figures.set(format!("relay_msgs_per_s_b{batch}_r{relays}"), rate_);
        }
    }

    // The headline shape (batch 1000, one relay) against its baselines, alternating.
    let naive_backlog = settings.pick(500, 5_000);
    let (mut relay, mut naive, mut delete, mut update) = (vec![], vec![], vec![], vec![]);
    for _ in 0..settings.rounds() {
        relay.push(relay_round(pool, backlog, 1000, 1)?);
        delete.push(floor_round(pool, backlog, Shape::Delete, 1000)?);
        update.push(floor_round(pool, backlog, Shape::UpdateMark, 1000)?);
        naive.push(naive_round(pool, naive_backlog)?);
    }
    let (relay, naive, delete, update) =
        (median(relay), median(naive), median(delete), median(update));
    row(
        "relay, batch 1000, 1 relay (alternating with the three below)",
        &rate(relay, "msg/s"),
        "",
        "",
    );
    row(
        &format!("naive relay (claim one row, publish, delete, commit), {naive_backlog} backlog"),
        &rate(relay, "msg/s"),
        &rate(naive, "msg/s"),
        &format!("{:.1}x (`relay_vs_naive`)", relay / naive),
    );
    row(
        "SQL floor: `DELETE .. WHERE seq IN (SELECT .. LIMIT 1000 FOR UPDATE SKIP LOCKED) RETURNING ..`",
        &rate(relay, "msg/s"),
        &rate(delete, "rows/s"),
        &format!("{:.2} (`relay_vs_floor`)", relay / delete),
    );
    row(
        "SQL floor: `UPDATE .. SET status = 1 .. RETURNING ..` (mark form)",
        &rate(relay, "msg/s"),
        &rate(update, "rows/s"),
        &format!("{:.2} (`relay_vs_floor_update`)", relay / update),
    );
    figures.set("relay_msgs_per_s", relay);
    figures.set("naive_msgs_per_s", naive);
    figures.set("relay_vs_naive", relay / naive);
    figures.set("floor_delete_rows_per_s", delete);
    figures.set("floor_update_rows_per_s", update);
    figures.set("relay_vs_floor", relay / delete);
    figures.set("relay_vs_floor_update", relay / update);
    pipelined(settings, pool, figures)?;
    empty_outbox(&mut *pool.get()?)?;
    sqlite(settings, figures)
}

/// A broker that takes 8 ms to confirm a batch of 1,000 (8 µs per message), without using the
/// CPU the database needs: what overlapping the broker with the database can gain.
struct SlowPublisher;

impl Publisher for SlowPublisher {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        std::thread::sleep(std::time::Duration::from_micros(8 * batch.len() as u64));
        vec![Ok(()); batch.len()]
    }
}

/// `run` against `run_pipelined`, alternating, each draining a fresh backlog to a publisher
/// from `publisher`; their medians.
fn sequential_vs_pipelined<P: Publisher + Send + 'static>(
    settings: &Settings,
    pool: &PgPool,
    publisher: impl Fn() -> P,
) -> Result<(f64, f64), Error> {
    let backlog = settings.backlog();
    let config = || RelayConfig::default().batch_size(1000);
    let fill = || -> Result<(), Error> {
        empty_outbox(&mut *pool.get()?)?;
        fill_pg(&mut *pool.get()?, "orders", backlog, 0)
    };
    alternate(
        settings.rounds(),
        || {
            fill()?;
            drain(pool, backlog, 1, config(), || Ok(publisher()))
        },
        || {
            fill()?;
            drain_pipelined(pool, backlog, config(), publisher(), None)
        },
    )
}

fn pipelined(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    let backlog = settings.backlog();
    let (sequential, pipelined) = sequential_vs_pipelined(settings, pool, || SlowPublisher)?;
    row(
        &format!("publisher taking 8 ms per 1,000 messages, {backlog} backlog, batch 1000: `run` vs `run_pipelined`"),
        &rate(sequential, "msg/s"),
        &rate(pipelined, "msg/s"),
        &format!("{:.2} (`pipelined_vs_sequential`)", pipelined / sequential),
    );
    figures.set("relay_slow_publisher_msgs_per_s", sequential);
    figures.set("relay_pipelined_slow_publisher_msgs_per_s", pipelined);
    figures.set("pipelined_vs_sequential", pipelined / sequential);

    // And where the overlap has nothing to hide: a publisher that takes no time.
    let (sequential, pipelined) = sequential_vs_pipelined(settings, pool, || NoopPublisher)?;
    row(
        &format!("no-op publisher, {backlog} backlog, batch 1000: `run` vs `run_pipelined`"),
        &rate(sequential, "msg/s"),
        &rate(pipelined, "msg/s"),
        &format!(
            "{:.2} (`pipelined_vs_sequential_noop`)",
            pipelined / sequential
        ),
    );
    figures.set("relay_pipelined_noop_msgs_per_s", pipelined);
    figures.set("pipelined_vs_sequential_noop", pipelined / sequential);
    Ok(())
}

fn sqlite(settings: &Settings, figures: &mut Figures) -> Result<(), Error> {
    let backlog = settings.backlog();
    let path = std::env::temp_dir().join(format!("waybill-bench-{}.db", std::process::id()));
    let result = (|| -> Result<f64, Error> {
        let pool = Pool::builder()
            .max_size(3)
            .connection_customizer(Box::new(SqliteOptions::default()))
            .build(ConnectionManager::<SqliteConnection>::new(
                path.to_string_lossy(),
            ))?;
        waybill_diesel::run_migrations(&mut *pool.get()?)?;
        fill_enqueue(&mut *pool.get()?, backlog)?;
        drain(
            &pool,
            backlog,
            1,
            RelayConfig::default().batch_size(500),
            || Ok(NoopPublisher),
        )
    })();
    for suffix in ["", "-wal", "-shm"] {
        // The file may not exist (e.g. no WAL written); nothing to report then.
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let rate_ = result?;
    row(
        &format!("relay drain on SQLite, {backlog} backlog, batch 500, 1 relay"),
        &rate(rate_, "msg/s"),
        "",
        "",
    );
    figures.set("sqlite_relay_msgs_per_s", rate_);
    Ok(())
}
