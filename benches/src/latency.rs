//! Commit -> publish latency at a fixed offered rate: writer threads enqueue one message per
//! transaction on a schedule and note the instant after each commit, while `Relay::run`
//! publishes to a publisher that notes the instant it receives each message. Once with NOTIFY
//! wake-ups, once with the trigger disabled and the relay polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use waybill_diesel::{enqueue, DieselStore};
use waybill_outbox_core::{
    MessageId, NewOutboxMessage, OutboxMessage, PublishError, Publisher, Relay, RelayConfig,
};

use crate::common::{
    empty_outbox, payload, percentile, pg_pool, row, Error, Figures, PgPool, Settings,
};

/// Offered load, messages per second, spread over [`WRITERS`] threads.
pub const OFFERED: f64 = 1_000.0;
const WRITERS: usize = 10;

type Log = Arc<Mutex<Vec<(MessageId, Instant)>>>;

/// Notes when each message reached the publisher.
struct Recording(Log);

impl Publisher for Recording {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        let now = Instant::now();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(batch.iter().map(|m| (m.id, now)));
        vec![Ok(()); batch.len()]
    }
}

/// Latencies in ms, sorted, and the offered rate achieved.
pub struct Measured {
    pub sorted_ms: Vec<f64>,
    pub achieved: f64,
}

fn measure(
    pool: &PgPool,
    writers_pool: &PgPool,
    period: Duration,
    config: RelayConfig,
) -> Result<Measured, Error> {
    let published: Log = Arc::default();
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        Recording(published.clone()),
        config,
    );
    let handle = relay.handle();
    let relay = std::thread::spawn(move || relay.run());
    // Let the relay reach its idle wait, as a relay in production spends most of its time.
    std::thread::sleep(Duration::from_millis(300));

    let began = Instant::now();
    let per_writer = (OFFERED * period.as_secs_f64()) as usize / WRITERS;
    let interval = Duration::from_secs_f64(WRITERS as f64 / OFFERED);
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = writers_pool.clone();
            std::thread::spawn(move || -> Result<Vec<(MessageId, Instant)>, Error> {
                let mut conn = pool.get()?;
                let mut committed = Vec::with_capacity(per_writer);
                // Writers start staggered so the offered load is even.
                let start = began + interval.mul_f64(w as f64 / WRITERS as f64);
                for k in 0..per_writer {
                    let due = start + interval * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let msg = NewOutboxMessage::json(
                        "orders",
                        format!("order:{w}"),
                        "OrderPlaced",
                        &payload(k),
                    )?;
                    conn.transaction(|conn| enqueue(conn, &msg))?;
                    committed.push((msg.id(), Instant::now()));
                }
                Ok(committed)
            })
        })
        .collect();
    let mut committed = HashMap::new();
    for writer in writers {
        committed.extend(writer.join().map_err(|_| "writer panicked")??);
    }
    let achieved = committed.len() as f64 / began.elapsed().as_secs_f64();
    // Wait, with a deadline, until the relay published everything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while published
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len()
        < committed.len()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.stop();
    relay.join().map_err(|_| "relay panicked")?;
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(PoisonError::into_inner));
    if published.len() != committed.len() {
        return Err(format!(
            "published {} of {} messages",
            published.len(),
            committed.len()
        )
        .into());
    }
    let mut sorted_ms: Vec<f64> = published
        .iter()
        .filter_map(|(id, at)| {
            committed
                .get(id)
                .map(|c| at.saturating_duration_since(*c).as_secs_f64() * 1e3)
        })
        .collect();
    sorted_ms.sort_by(f64::total_cmp);
    Ok(Measured {
        sorted_ms,
        achieved,
    })
}

/// Runs both configurations; returns (with NOTIFY, without) for the plot.
pub fn run(
    settings: &Settings,
    pool: &PgPool,
    figures: &mut Figures,
) -> Result<(Measured, Measured), Error> {
    let period = Duration::from_secs(settings.pick(5, 30));
    empty_outbox(&mut *pool.get()?)?;
    // The writers get their own connections: the relay must never wait for one.
    let writers = pg_pool(&settings.pg_url, &settings.schema, WRITERS as u32)?;
    let notify = measure(pool, &writers, period, RelayConfig::default())?;
    pool.get()?
        .batch_execute("ALTER TABLE outbox_messages DISABLE TRIGGER outbox_messages_notify")?;
    let poll = Duration::from_millis(100);
    let polling = measure(
        pool,
        &writers,
        period,
        RelayConfig::default().poll_interval(poll),
    );
    pool.get()?
        .batch_execute("ALTER TABLE outbox_messages ENABLE TRIGGER outbox_messages_notify")?;
    let polling = polling?;
    for (label, m, suffix) in [
        ("NOTIFY on", &notify, ""),
        ("NOTIFY off, poll 100 ms", &polling, "_no_notify"),
    ] {
        let (p50, p99, max) = (
            percentile(&m.sorted_ms, 0.5),
            percentile(&m.sorted_ms, 0.99),
            percentile(&m.sorted_ms, 1.0),
        );
        row(
            &format!(
                "commit -> publish at {:.0} msg/s offered ({label})",
                m.achieved
            ),
            &format!("p50 {p50:.1} ms, p99 {p99:.1} ms"),
            &format!("max {max:.1} ms"),
            "",
        );
        figures.set(format!("latency_p50_ms{suffix}"), p50);
        figures.set(format!("latency_p99_ms{suffix}"), p99);
        figures.set(format!("latency_max_ms{suffix}"), max);
        figures.set(format!("latency_offered_msgs_per_s{suffix}"), m.achieved);
    }
    empty_outbox(&mut *pool.get()?)?;
    Ok((notify, polling))
}
