//! Measures what the outbox costs and how fast the relay drains, as ratios against a baseline
//! run in the same process (the machine is noisy: read the ratios, not the absolute figures).
//!
//! Run with: `cargo run --release --manifest-path benches/Cargo.toml -- [--quick] [--json PATH]`
//! PostgreSQL from `PG_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{enqueue, enqueue_all, DieselStore, OutboxConnection};
use waybill_outbox_core::{NewOutboxMessage, OutboxMessage, PublishError, Publisher, Relay, RelayConfig};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Settings {
    quick: bool,
    json: Option<String>,
    pg_url: String,
}

/// Accepts every message at once: the relay's own cost, without a broker.
struct NoopPublisher;

impl Publisher for NoopPublisher {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        vec![Ok(()); batch.len()]
    }
}

fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({"order_id": i, "customer": "customer-0042", "lines": [{"sku": "SKU-1", "qty": 2, "cents": 1999}], "note": "x".repeat(180)})
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn pg_pool(url: &str, schema: &str, size: u32) -> Result<Pool<ConnectionManager<PgConnection>>, Error> {
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok(Pool::builder()
        .max_size(size)
        .build(ConnectionManager::new(format!("{url}{separator}options=-csearch_path%3D{schema}")))?)
}

/// Transactions per second of `clients` threads running `txn` for `period`.
fn tps<C, F>(pool: &Pool<ConnectionManager<C>>, clients: usize, period: Duration, txn: F) -> Result<f64, Error>
where
    C: diesel::r2d2::R2D2Connection + 'static,
    F: Fn(&mut C, usize) -> Result<(), Error> + Send + Sync + 'static,
{
    let txn = Arc::new(txn);
    let start = Arc::new(Barrier::new(clients));
    let workers: Vec<_> = (0..clients)
        .map(|n| {
            let (pool, txn, start) = (pool.clone(), txn.clone(), start.clone());
            std::thread::spawn(move || -> Result<usize, Error> {
                let mut conn = pool.get()?;
                start.wait();
                let deadline = Instant::now() + period;
                let mut done = 0;
                while Instant::now() < deadline {
                    txn(&mut conn, n * 10_000_000 + done)?;
                    done += 1;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker.join().map_err(|_| "bench thread panicked")??;
    }
    Ok(total as f64 / period.as_secs_f64())
}

fn business_insert(conn: &mut PgConnection, i: usize) -> QueryResult<usize> {
    diesel::sql_query("INSERT INTO orders (id, customer, amount, created_at) VALUES ($1, 'customer-0042', $2, now())")
        .bind::<SqlUuid, _>(uuid::Uuid::now_v7())
        .bind::<BigInt, _>(i as i64)
        .execute(conn)
}

fn enqueue_overhead(settings: &Settings, schema: &str, results: &mut BTreeMap<String, f64>) -> Result<(), Error> {
    let pool = pg_pool(&settings.pg_url, schema, 9)?;
    let (rounds, period) = if settings.quick { (3, Duration::from_secs(2)) } else { (5, Duration::from_secs(5)) };
    for clients in [1, 8] {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            a.push(tps(&pool, clients, period, |conn: &mut PgConnection, i| {
                conn.transaction(|conn| business_insert(conn, i).map(drop))?;
                Ok(())
            })?);
            b.push(tps(&pool, clients, period, |conn: &mut PgConnection, i| {
                conn.transaction(|conn| {
                    business_insert(conn, i)?;
                    let msg = NewOutboxMessage::json("orders", format!("order:{i}"), "OrderPlaced", &payload(i))?;
                    enqueue(conn, &msg)?;
                    Ok::<_, Error>(())
                })
            })?);
        }
        let (ma, mb) = (median(a), median(b));
        println!("enqueue, {clients} client(s): business only {ma:.0} txn/s, business + enqueue {mb:.0} txn/s, ratio {:.2}", ma / mb);
        results.insert(format!("pg_business_tps_{clients}"), ma);
        results.insert(format!("pg_business_enqueue_tps_{clients}"), mb);
        results.insert(format!("enqueue_overhead_ratio_{clients}"), ma / mb);
    }
    results.insert("enqueue_overhead_ratio".into(), results["enqueue_overhead_ratio_1"]);
    pool.get()?.batch_execute("TRUNCATE orders; DELETE FROM outbox_messages")?;
    Ok(())
}

fn fill<C: OutboxConnection + Connection>(conn: &mut C, count: usize) -> Result<(), Error> {
    let messages: Vec<_> = (0..count)
        .map(|i| NewOutboxMessage::json("orders", format!("order:{}", i % 1000), "OrderPlaced", &payload(i)))
        .collect::<Result<_, _>>()?;
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk))?;
    }
    Ok(())
}

/// Messages per second for `relays` relays draining a backlog of `count`.
fn drain<C>(pool: &Pool<ConnectionManager<C>>, count: usize, batch: usize, relays: usize) -> Result<f64, Error>
where
    C: OutboxConnection + diesel::r2d2::R2D2Connection + Connection + 'static,
{
    fill(&mut *pool.get()?, count)?;
    let start = Arc::new(Barrier::new(relays + 1));
    let workers: Vec<_> = (0..relays)
        .map(|_| {
            let mut relay = Relay::new(DieselStore::new(pool.clone()), NoopPublisher, RelayConfig::default().batch_size(batch));
            let start = start.clone();
            std::thread::spawn(move || -> Result<u64, Error> {
                start.wait();
                let mut published = 0;
                loop {
                    let report = relay.run_once()?;
                    published += report.published;
                    if report.claimed == 0 {
                        return Ok(published);
                    }
                }
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut published = 0;
    for worker in workers {
        published += worker.join().map_err(|_| "relay thread panicked")??;
    }
    let rate = published as f64 / began.elapsed().as_secs_f64();
    if published != count as u64 {
        return Err(format!("drained {published} of {count}").into());
    }
    Ok(rate)
}

/// The relay most tutorials show: one row per transaction, locked while "publishing".
fn naive_drain(pool: &Pool<ConnectionManager<PgConnection>>, count: usize) -> Result<f64, Error> {
    fill(&mut *pool.get()?, count)?;
    let mut conn = pool.get()?;
    let mut publisher = NoopPublisher;
    let began = Instant::now();
    #[derive(QueryableByName)]
    struct Seq {
        #[diesel(sql_type = BigInt)]
        seq: i64,
    }
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
    Ok(published as f64 / began.elapsed().as_secs_f64())
}

fn relay_drain(settings: &Settings, schema: &str, results: &mut BTreeMap<String, f64>) -> Result<(), Error> {
    let pool = pg_pool(&settings.pg_url, schema, 6)?;
    let backlog = if settings.quick { 20_000 } else { 100_000 };
    let naive_backlog = backlog / 10;
    let mut best: f64 = 0.0;
    for batch in [100, 500, 1000] {
        for relays in [1, 2] {
            let rate = drain(&pool, backlog, batch, relays)?;
            println!("relay drain (PostgreSQL), batch {batch}, {relays} relay(s): {rate:.0} msg/s");
            results.insert(format!("relay_msgs_per_s_b{batch}_r{relays}"), rate);
            best = best.max(rate);
        }
    }
    let naive = naive_drain(&pool, naive_backlog)?;
    println!("naive relay (PostgreSQL, one row per transaction): {naive:.0} msg/s");
    results.insert("relay_msgs_per_s".into(), best);
    results.insert("naive_msgs_per_s".into(), naive);
    results.insert("relay_vs_naive".into(), best / naive);

    let dir = std::env::temp_dir().join(format!("waybill-bench-{}.db", std::process::id()));
    let sqlite = Pool::builder()
        .max_size(3)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(dir.to_string_lossy()))?;
    waybill_diesel::run_migrations(&mut *sqlite.get()?)?;
    let rate = drain(&sqlite, backlog, 500, 1)?;
    println!("relay drain (SQLite), batch 500, 1 relay: {rate:.0} msg/s");
    results.insert("sqlite_relay_msgs_per_s".into(), rate);
    drop(sqlite);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", dir.display()));
    }
    Ok(())
}

fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let mut settings = Settings {
        quick: false,
        json: None,
        pg_url: std::env::var("PG_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => settings.quick = true,
            "--json" => settings.json = Some(args.next().ok_or("--json needs a path")?),
            other => return Err(format!("unknown argument {other}; use --quick and --json PATH").into()),
        }
    }
    let schema = format!("waybill_bench_{}", std::process::id());
    let mut admin = PgConnection::establish(&settings.pg_url)?;
    admin.batch_execute(&format!("CREATE SCHEMA {schema}"))?;
    let result = (|| -> Result<BTreeMap<String, f64>, Error> {
        let pool = pg_pool(&settings.pg_url, &schema, 1)?;
        let mut conn = pool.get()?;
        waybill_diesel::run_migrations(&mut *conn)?;
        conn.batch_execute("CREATE TABLE orders (id uuid PRIMARY KEY, customer text NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL)")?;
        if std::env::var("WAYBILL_BENCH_NO_NOTIFY").is_ok() {
            conn.batch_execute("ALTER TABLE outbox_messages DISABLE TRIGGER outbox_messages_notify")?;
        }
        let mut results = BTreeMap::new();
        enqueue_overhead(&settings, &schema, &mut results)?;
        if std::env::var("WAYBILL_BENCH_ONLY_ENQUEUE").is_err() {
            relay_drain(&settings, &schema, &mut results)?;
        }
        Ok(results)
    })();
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;
    let results = result?;
    let json = serde_json::to_string_pretty(&results)?;
    println!("{json}");
    if let Some(path) = settings.json {
        std::fs::write(path, json)?;
    }
    Ok(())
}
