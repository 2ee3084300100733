//! The fastest Rust peer, oxide-outbox (`outbox-core` 0.6 + `outbox-postgres` 0.3: async, sqlx),
//! draining the same backlog (size, payload, batch size) to a no-op transport, alternating with
//! waybill's relay. Built only with `--features oxide`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use outbox_postgres::PostgresOutbox;
use oxide_outbox_core::prelude::{Event, OutboxConfig, OutboxError, OutboxProcessor, Transport};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{alternate, pg_pool, rate, row, Error, Figures, PgPool, Settings};
use crate::drain::relay_round;

const BATCH: u32 = 1000;

/// The table, index and trigger oxide-outbox's README has its users create.
const SCHEMA: &str = "
CREATE TYPE status AS ENUM ('Pending', 'Processing', 'Sent');
CREATE TABLE outbox_events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    idempotency_token text DEFAULT NULL,
    event_type text NOT NULL,
    payload jsonb NOT NULL,
    status status NOT NULL DEFAULT 'Pending',
    created_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE INDEX idx_outbox_processing_queue ON outbox_events (locked_until, status) WHERE status IN ('Pending', 'Processing');
CREATE UNIQUE INDEX idx_outbox_idempotency ON outbox_events (idempotency_token);
CREATE FUNCTION notify_outbox_event() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox_event', 'ping');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER outbox_events_notify_trigger AFTER INSERT OR UPDATE ON outbox_events
    FOR EACH ROW EXECUTE FUNCTION notify_outbox_event();
";

struct NoopTransport;

#[async_trait::async_trait]
impl Transport<Value> for NoopTransport {
    async fn publish(&self, _event: Event<Value>) -> Result<(), OutboxError> {
        Ok(())
    }
}

fn fill(conn: &mut PgConnection, count: usize) -> Result<(), Error> {
    conn.batch_execute("TRUNCATE outbox_events")?;
    diesel::sql_query(
        "INSERT INTO outbox_events (event_type, payload)
         SELECT 'OrderPlaced', json_build_object('order_id', i, 'customer', 'customer-0042',
             'lines', json_build_array(json_build_object('sku', 'SKU-1', 'qty', 2, 'cents', 1999)),
             'note', repeat('x', 180))::jsonb
         FROM generate_series(1, $1) AS i",
    )
    .bind::<BigInt, _>(count as i64)
    .execute(conn)?;
    conn.batch_execute("ANALYZE outbox_events")?;
    Ok(())
}

/// One drain of a fresh backlog, the way `OutboxManager::run` drains after a wake-up: process
/// batches until one comes back empty.
fn oxide_round(
    runtime: &tokio::runtime::Runtime,
    diesel_pool: &PgPool,
    sqlx_pool: &sqlx::PgPool,
    count: usize,
) -> Result<f64, Error> {
    fill(&mut *diesel_pool.get()?, count)?;
    let mut config = OutboxConfig::<Value>::default();
    config.batch_size = BATCH;
    let config = Arc::new(config);
    let storage = Arc::new(PostgresOutbox::new(sqlx_pool.clone(), config.clone()));
    let processor = OutboxProcessor::new(storage, Arc::new(NoopTransport), config);
    runtime.block_on(async {
        let began = Instant::now();
        let mut drained = 0;
        loop {
            let fetched = processor
                .process_pending_events()
                .await
                .map_err(|e| format!("oxide-outbox: {e:?}"))?;
            if fetched == 0 {
                break;
            }
            drained += fetched;
        }
        let elapsed = began.elapsed();
        if drained != count {
            return Err(format!("oxide-outbox drained {drained} of {count}").into());
        }
        Ok(drained as f64 / elapsed.as_secs_f64())
    })
}

pub fn run(settings: &Settings, pool: &PgPool, figures: &mut Figures) -> Result<(), Error> {
    let schema = format!("{}_oxide", settings.schema);
    let mut admin = PgConnection::establish(&settings.pg_url)?;
    admin.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    ))?;
    let result = (|| -> Result<(f64, f64), Error> {
        let diesel_pool = pg_pool(&settings.pg_url, &schema, 2)?;
        diesel_pool.get()?.batch_execute(SCHEMA)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let options = PgConnectOptions::from_str(&settings.pg_url)?
            .options([("search_path", schema.as_str())]);
        let sqlx_pool = runtime.block_on(
            PgPoolOptions::new()
                .max_connections(4)
                .connect_with(options),
        )?;
        let backlog = settings.backlog();
        let result = alternate(
            settings.rounds(),
            || relay_round(pool, backlog, BATCH as usize, 1),
            || oxide_round(&runtime, &diesel_pool, &sqlx_pool, backlog),
        );
        runtime.block_on(sqlx_pool.close());
        result
    })();
    admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    let (relay, oxide) = result?;
    row(
        &format!(
            "relay vs oxide-outbox 0.6, {} backlog, batch {BATCH}, no-op transport",
            settings.backlog()
        ),
        &rate(relay, "msg/s"),
        &rate(oxide, "msg/s"),
        &format!("{:.2}x (`relay_vs_oxide_outbox`)", relay / oxide),
    );
    figures.set("oxide_outbox_msgs_per_s", oxide);
    figures.set("relay_vs_oxide_outbox", relay / oxide);
    Ok(())
}
