//! What every scenario shares: settings, the A/B alternation and its medians, the figures, the
//! backlog and the no-op publisher.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::{enqueue_all, DieselStore, OutboxConnection};
use waybill_outbox_core::{
    NewOutboxMessage, OutboxMessage, PublishError, Publisher, Relay, RelayConfig,
};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// Command line and environment.
pub struct Settings {
    pub quick: bool,
    pub pg_url: String,
    pub amqp_addr: String,
    pub nats_url: String,
    /// `KAFKA_BROKERS`, comma-separated `HOST:PORT`.
    pub kafka_brokers: String,
    /// The schema this run works in (dropped at the end).
    pub schema: String,
}

impl Settings {
    /// `quick` when `--quick`, else `full`.
    pub fn pick<T>(&self, quick: T, full: T) -> T {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// The backlog the drain scenarios use.
    pub fn backlog(&self) -> usize {
        self.pick(10_000, 100_000)
    }

    /// A/B rounds per comparison.
    pub fn rounds(&self) -> usize {
        self.pick(3, 5)
    }
}

/// The figures of a run, by JSON field name.
#[derive(Default)]
pub struct Figures(pub BTreeMap<String, f64>);

impl Figures {
    pub fn set(&mut self, name: impl Into<String>, value: f64) {
        self.0.insert(name.into(), value);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }
}

/// How busy the machine's cores were between [`CpuMeter::start`] and [`CpuMeter::busy_cores`]:
/// every process counts (the database, the broker, this program), from `/proc/stat` (Linux).
/// [`CpuMeter::busy_by_process`] splits it by whose work it was, from `/proc/*/stat`.
pub struct CpuMeter {
    start: Reading,
    /// The reading [`CpuMeter::stop`] froze, taken while the measured threads still ran.
    end: Option<Reading>,
}

/// The CPU time used so far: by all cores, and by kind of process.
#[derive(Clone)]
struct Reading {
    /// (busy, total) jiffies of all cores.
    cores: Option<(u64, u64)>,
    processes: BTreeMap<String, u64>,
}

impl Reading {
    fn now() -> Self {
        Self {
            cores: cpu_ticks(),
            processes: process_ticks(),
        }
    }
}

impl CpuMeter {
    pub fn start() -> Self {
        Self {
            start: Reading::now(),
            end: None,
        }
    }

    /// Ends the measurement: before the measured threads end, so that their time counts.
    pub fn stop(&mut self) {
        self.end = Some(Reading::now());
    }

    fn end(&self) -> Reading {
        self.end.clone().unwrap_or_else(Reading::now)
    }

    /// Cores busy on average since the start (0 to the core count); `None` without `/proc`.
    pub fn busy_cores(&self) -> Option<f64> {
        let ((busy0, total0), (busy1, total1)) = (self.start.cores?, self.end().cores?);
        let cores = std::thread::available_parallelism().ok()?.get() as f64;
        let total = total1.checked_sub(total0).filter(|t| *t > 0)? as f64;
        Some(busy1.saturating_sub(busy0) as f64 / total * cores)
    }

    /// Cores each kind of process kept busy on average since the start: `postgres`, the
    /// brokers, and this program's threads by name (`waybill-nats`, `waybill-amqp`: the
    /// transports' client runtimes; `bench`: the relay's and the raw clients' own threads).
    pub fn busy_by_process(&self) -> BTreeMap<String, f64> {
        let end = self.end();
        let (Some((_, total0)), Some((_, total1))) = (self.start.cores, end.cores) else {
            return BTreeMap::new();
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // /proc/stat counts every core's ticks, /proc/<pid>/stat one thread's.
        let elapsed = total1.saturating_sub(total0).max(1) as f64 / cores;
        end.processes
            .into_iter()
            .map(|(name, ticks)| {
                let before = self.start.processes.get(&name).copied().unwrap_or(0);
                (name, ticks.saturating_sub(before) as f64 / elapsed)
            })
            .filter(|(_, busy)| *busy > 0.005)
            .collect()
    }
}

/// (busy, total) jiffies of all cores: the first line of `/proc/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// CPU jiffies (user + system) by kind of process: every other process by its name, the
/// broker's by the broker, this program's threads by their names.
fn process_ticks() -> BTreeMap<String, u64> {
    let mut ticks = BTreeMap::new();
    let own = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return ticks;
    };
    for entry in entries.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
            continue;
        }
        if let Some((name, used)) = stat_ticks(&format!("/proc/{pid}/stat")) {
            let name = match name.as_str() {
                "beam.smp" => "rabbitmq".to_owned(),
                // Kernel workers rename themselves as they switch tasks.
                kernel if kernel.starts_with("kworker") => "kworker".to_owned(),
                _ => name,
            };
            *ticks.entry(name).or_default() += used;
        }
    }
    if let Ok(threads) = std::fs::read_dir("/proc/self/task") {
        for thread in threads.flatten() {
            let path = thread.path().join("stat");
            if let Some((name, used)) = stat_ticks(&path.to_string_lossy()) {
                let name = match name.as_str() {
                    "waybill-nats" | "waybill-amqp" => name,
                    _ => "bench".to_owned(),
                };
                *ticks.entry(name).or_default() += used;
            }
        }
    }
    ticks
}

/// The name and utime + stime of a `/proc/.../stat` file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields; `rest` starts at the 3rd.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The value below which `q` (0..=1) of the sorted `xs` lie.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// Runs `a` and `b` alternately `rounds` times (the machine drifts, so neither gets the quiet
/// minutes) and returns the median of each.
pub fn alternate(
    rounds: usize,
    mut a: impl FnMut() -> Result<f64, Error>,
    mut b: impl FnMut() -> Result<f64, Error>,
) -> Result<(f64, f64), Error> {
    let medians = alternate_all(rounds, &mut [&mut a, &mut b])?;
    Ok((medians[0], medians[1]))
}

/// Runs every one of `runs` in turn, `rounds` times, and returns the median of each.
pub fn alternate_all(
    rounds: usize,
    runs: &mut [&mut dyn FnMut() -> Result<f64, Error>],
) -> Result<Vec<f64>, Error> {
    let mut samples = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (run, samples) in runs.iter_mut().zip(&mut samples) {
            samples.push(run()?);
        }
    }
    Ok(samples.into_iter().map(median).collect())
}

/// Prints one line of the table as it goes.
pub fn row(scenario: &str, a: &str, b: &str, ratio: &str) {
    println!("| {scenario} | {a} | {b} | {ratio} |");
}

/// Prints the row of an A/B comparison and records A, B and their ratio under `keys`.
pub fn record_pair(
    figures: &mut Figures,
    scenario: &str,
    (a, b): (f64, f64),
    keys: [String; 3],
    unit: &str,
) {
    let [a_key, b_key, ratio_key] = keys;
    row(
        scenario,
        &rate(a, unit),
        &rate(b, unit),
        &format!("{:.2} (`{ratio_key}`)", a / b),
    );
    figures.set(a_key, a);
    figures.set(b_key, b);
    figures.set(ratio_key, a / b);
}

pub fn rate(x: f64, unit: &str) -> String {
    format!("{} {unit}", thousands(x))
}

pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Accepts every message at once: the relay's own cost, without a broker.
pub struct NoopPublisher;

impl Publisher for NoopPublisher {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        vec![Ok(()); batch.len()]
    }
}

/// The JSON body every scenario sends, about 300 bytes.
pub fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({"order_id": i, "customer": "customer-0042", "lines": [{"sku": "SKU-1", "qty": 2, "cents": 1999}], "note": "x".repeat(180)})
}

pub fn pg_pool(url: &str, schema: &str, size: u32) -> Result<PgPool, Error> {
    let separator = if url.contains('?') { '&' } else { '?' };
    Ok(Pool::builder()
        .max_size(size)
        .build(ConnectionManager::new(format!(
            "{url}{separator}options=-csearch_path%3D{schema}"
        )))?)
}

/// Creates `schema` with waybill's tables in it.
pub fn create_schema(url: &str, schema: &str) -> Result<PgPool, Error> {
    PgConnection::establish(url)?.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
    ))?;
    let pool = pg_pool(url, schema, 10)?;
    waybill_diesel::run_migrations(&mut *pool.get()?)?;
    Ok(pool)
}

pub fn drop_schema(url: &str, schema: &str) -> Result<(), Error> {
    PgConnection::establish(url)?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))?;
    Ok(())
}

/// `count` pending messages of `topic` (1,000 keys, the payload of [`payload`]) in one
/// statement, as `enqueue` would write them (ids time-ordered like `MessageId::new`'s UUIDv7);
/// `status` 1 makes published history instead.
pub fn fill_pg(
    conn: &mut PgConnection,
    topic: &str,
    count: usize,
    status: i16,
) -> Result<(), Error> {
    diesel::sql_query(format!(
        "INSERT INTO outbox_messages (id, topic, partition_key, message_type, content_type, payload, status, published_at)
         SELECT (lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')
                 || '7' || substr(md5(i::text || random()::text), 1, 19))::uuid,
                $1, 'order:' || (i % 1000), 'OrderPlaced', 'application/json',
                convert_to(json_build_object('order_id', i, 'customer', 'customer-0042',
                    'lines', json_build_array(json_build_object('sku', 'SKU-1', 'qty', 2, 'cents', 1999)),
                    'note', repeat('x', 180))::text, 'UTF8'),
                {status}, {published}
         FROM generate_series(1, $2) AS i",
        published = if status == 1 { "now()" } else { "NULL" },
    ))
    .bind::<Text, _>(topic)
    .bind::<BigInt, _>(count as i64)
    .execute(conn)?;
    conn.batch_execute("ANALYZE outbox_messages")?;
    Ok(())
}

/// `count` pending messages through `enqueue_all`, 1,000 per transaction (SQLite).
pub fn fill_enqueue<C: OutboxConnection + Connection>(
    conn: &mut C,
    count: usize,
) -> Result<(), Error> {
    let messages: Vec<_> = (0..count)
        .map(|i| {
            NewOutboxMessage::json(
                "orders",
                format!("order:{}", i % 1000),
                "OrderPlaced",
                &payload(i),
            )
        })
        .collect::<Result<_, _>>()?;
    for chunk in messages.chunks(1000) {
        conn.transaction(|conn| enqueue_all(conn, chunk))?;
    }
    Ok(())
}

/// Messages per second for `relays` relays (each with its own publisher from `publisher`)
/// draining what is pending, checked against `expected`.
pub fn drain<C, P>(
    pool: &Pool<ConnectionManager<C>>,
    expected: usize,
    relays: usize,
    config: RelayConfig,
    mut publisher: impl FnMut() -> Result<P, Error>,
) -> Result<f64, Error>
where
    C: OutboxConnection + diesel::r2d2::R2D2Connection + Connection + 'static,
    P: Publisher + Send + 'static,
{
    let start = Arc::new(Barrier::new(relays + 1));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut workers = Vec::new();
    for _ in 0..relays {
        let mut relay = Relay::new(DieselStore::new(pool.clone()), publisher()?, config.clone());
        let (start, done) = (start.clone(), done.clone());
        workers.push(std::thread::spawn(move || -> Result<u64, Error> {
            start.wait();
            let mut published = 0;
            // An empty claim only means the other relays hold every key with work right now:
            // stop when the backlog is gone, not at the first empty claim.
            while done.load(std::sync::atomic::Ordering::SeqCst) < expected as u64 {
                if Instant::now() > deadline {
                    return Err("drain made no progress for 10 minutes".into());
                }
                let report = relay.run_once()?;
                published += report.published;
                done.fetch_add(report.published, std::sync::atomic::Ordering::SeqCst);
                if report.claimed == 0 {
                    std::thread::yield_now();
                }
            }
            // Tell the store this relay is gone, so later runs' claims do not leave it a share.
            waybill_outbox_core::OutboxStore::retire(relay.store(), relay.config().owner_name())?;
            Ok(published)
        }));
    }
    start.wait();
    let began = Instant::now();
    let mut published = 0;
    for worker in workers {
        published += worker.join().map_err(|_| "relay thread panicked")??;
    }
    let elapsed = began.elapsed();
    if published != expected as u64 {
        return Err(format!("drained {published} of {expected}").into());
    }
    Ok(published as f64 / elapsed.as_secs_f64())
}

/// Messages per second for one relay in [`Relay::run_pipelined`] mode (it claims the next batch
/// while publishing the current one), stopped once `expected` messages are published; `cpu`, if
/// given, is stopped then too.
pub fn drain_pipelined<C, P>(
    pool: &Pool<ConnectionManager<C>>,
    expected: usize,
    config: RelayConfig,
    publisher: P,
    cpu: Option<&mut CpuMeter>,
) -> Result<f64, Error>
where
    C: OutboxConnection + diesel::r2d2::R2D2Connection + Connection + 'static,
    P: Publisher + Send + 'static,
{
    struct Count(Arc<(std::sync::Mutex<u64>, std::sync::Condvar)>);
    impl waybill_outbox_core::RelayHooks for Count {
        fn on_batch(&self, report: &waybill_outbox_core::RelayReport, _: Duration) {
            let (count, grew) = &*self.0;
            *count
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) += report.published;
            grew.notify_all();
        }
    }
    let shared = Arc::new((std::sync::Mutex::new(0), std::sync::Condvar::new()));
    let mut relay = Relay::new(DieselStore::new(pool.clone()), publisher, config)
        .with_hooks(Count(shared.clone()));
    let handle = relay.handle();
    let began = Instant::now();
    let worker = std::thread::spawn(move || relay.run_pipelined());
    {
        let (count, grew) = &*shared;
        let mut published = count.lock().map_err(|_| "poisoned")?;
        while *published < expected as u64 {
            let (guard, timeout) = grew
                .wait_timeout(published, Duration::from_secs(600))
                .map_err(|_| "poisoned")?;
            if timeout.timed_out() {
                return Err("pipelined drain made no progress for 10 minutes".into());
            }
            published = guard;
        }
    }
    let elapsed = began.elapsed();
    if let Some(cpu) = cpu {
        cpu.stop();
    }
    handle.stop();
    let totals = worker.join().map_err(|_| "relay thread panicked")?;
    if totals.published != expected as u64 {
        return Err(format!("drained {} of {expected}", totals.published).into());
    }
    Ok(expected as f64 / elapsed.as_secs_f64())
}

/// Transactions per second of `clients` threads running `txn` for `period`; `txn` gets the
/// client number and a number unique across clients.
pub fn tps<C, F>(
    pool: &Pool<ConnectionManager<C>>,
    clients: usize,
    period: Duration,
    txn: F,
) -> Result<f64, Error>
where
    C: diesel::r2d2::R2D2Connection + 'static,
    F: Fn(&mut C, usize, usize) -> Result<(), Error> + Send + Sync + 'static,
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
                    txn(&mut conn, n, n * 100_000_000 + done)?;
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

/// Empties the outbox between rounds (no relay runs then).
pub fn empty_outbox(conn: &mut PgConnection) -> Result<(), Error> {
    conn.batch_execute("TRUNCATE outbox_messages")?;
    Ok(())
}
