//! The pipeline's parts as the audit runs them: the writer, a counting relay publisher with
//! crash points, and the consumer's handler that applies each message's effect through the
//! inbox. Worker processes and the in-process mode share them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::Connection;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use waybill_diesel::{enqueue, Inbox, Processed};
use waybill_inbox_core::{DeliveryHandler, Disposition, IncomingMessage};
use waybill_outbox_core::{
    Backoff, MessageId, NewOutboxMessage, OutboxMessage, PublishError, Publisher, RelayConfig,
};

use crate::counter::{Counter, Event};
use crate::db::{self, AuditConnection, DbPool};
use crate::Error;

/// The topic every audit message goes to.
pub(crate) const TOPIC: &str = "audit";
/// The consumer's inbox name.
pub(crate) const CONSUMER: &str = "audit-consumer";
/// The relays' lease: short, so a paused or killed relay's messages move on soon.
pub(crate) const LEASE: Duration = Duration::from_secs(2);

/// How a worker "crashes" at a crash point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CrashMode {
    /// `std::process::abort()`: the process dies on the spot, like SIGKILL.
    Abort,
    /// A panic that ends the thread, dropping the relay mid-step (the in-process mode).
    Panic,
}

/// The panic message of an injected in-thread crash, so the panic hook can stay quiet.
pub(crate) const INJECTED_CRASH: &str = "waybill-audit: injected crash";

/// Where and how often a worker crashes on purpose.
#[derive(Debug)]
pub(crate) struct CrashPoints {
    rng: Mutex<StdRng>,
    probability: f64,
    mode: CrashMode,
}

impl CrashPoints {
    /// Crash points that fire with `probability` each time one is passed.
    pub(crate) fn new(seed: u64, probability: f64, mode: CrashMode) -> Self {
        Self {
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            probability: probability.clamp(0.0, 1.0),
            mode,
        }
    }

    /// Crashes here with the configured probability.
    pub(crate) fn maybe_crash(&self, point: &str) {
        if self.probability <= 0.0 {
            return;
        }
        let hit = self
            .rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_bool(self.probability);
        if hit {
            log::info!("injected crash {point}");
            match self.mode {
                CrashMode::Abort => std::process::abort(),
                CrashMode::Panic => std::panic::panic_any(INJECTED_CRASH),
            }
        }
    }
}

/// The relay configuration of the audit: short lease, small batches, quick retries, and no
/// parking after many attempts (a broker outage must delay messages, never drop them).
pub(crate) fn relay_config(owner: &str) -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .lease(LEASE)
        .poll_interval(Duration::from_millis(100))
        .backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .max_attempts(1_000_000)
        .owner(owner)
}

/// Wraps a broker's publisher: counts confirmed publishes and crashes between claim and
/// publish (`after-claim`) or between the broker's confirm and the relay's mark
/// (`after-confirm`).
#[derive(Debug)]
pub(crate) struct CountingPublisher<P> {
    inner: P,
    counter: Counter,
    crashes: Arc<CrashPoints>,
    /// While set, the publisher stalls past the lease before publishing (in-process mode's
    /// stand-in for SIGSTOP).
    stall: Arc<AtomicBool>,
}

impl<P: Publisher> CountingPublisher<P> {
    /// Counts into `counter` and crashes at `crashes`.
    pub(crate) fn new(
        inner: P,
        counter: Counter,
        crashes: Arc<CrashPoints>,
        stall: Arc<AtomicBool>,
    ) -> Self {
        Self {
            inner,
            counter,
            crashes,
            stall,
        }
    }
}

impl<P: Publisher> Publisher for CountingPublisher<P> {
    fn publish(&mut self, batch: &[OutboxMessage]) -> Vec<Result<(), PublishError>> {
        self.crashes.maybe_crash("after-claim");
        if self.stall.swap(false, Ordering::SeqCst) {
            log::info!(
                "stalling past the lease with {} claimed messages",
                batch.len()
            );
            std::thread::sleep(LEASE + Duration::from_secs(1));
        }
        let outcomes = self.inner.publish(batch);
        let confirmed = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        self.counter.add(Event::Published, confirmed as u64);
        self.crashes.maybe_crash("after-confirm");
        outcomes
    }
}

/// What the consumer does when its database fails mid-delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnFailure {
    /// Exit the process: the broker redelivers the unacknowledged delivery in its place, so
    /// per-key order holds (a retry would go to the back of the queue).
    Exit,
    /// Ask the broker to redeliver.
    Retry,
}

/// The exit code of a consumer that stopped for a redelivery.
pub(crate) const EXIT_REDELIVER: i32 = 75;

/// The consumer's handler: applies each message's effect (a row in `audit_effects`) inside
/// `Inbox::process_once`, counts deliveries and dropped duplicates, and crashes after the
/// commit but before the ack (`after-handler-commit`).
pub(crate) struct AuditHandler<C: AuditConnection> {
    pool: DbPool<C>,
    inbox: Inbox,
    counter: Counter,
    crashes: Arc<CrashPoints>,
    on_failure: OnFailure,
    /// Skip the inbox (the `--break` self-test): duplicates then take effect twice.
    without_inbox: bool,
}

impl<C: AuditConnection> std::fmt::Debug for AuditHandler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandler")
            .field("inbox", &self.inbox)
            .field("on_failure", &self.on_failure)
            .field("without_inbox", &self.without_inbox)
            .finish_non_exhaustive()
    }
}

impl<C: AuditConnection> AuditHandler<C> {
    /// A handler on `pool`'s database.
    pub(crate) fn new(
        pool: DbPool<C>,
        counter: Counter,
        crashes: Arc<CrashPoints>,
        on_failure: OnFailure,
        without_inbox: bool,
    ) -> Self {
        Self {
            pool,
            inbox: Inbox::new(CONSUMER),
            counter,
            crashes,
            on_failure,
            without_inbox,
        }
    }

    fn process(&self, message: &IncomingMessage, body: &Body) -> Result<Processed<()>, Error> {
        let mut conn = self.pool.get()?;
        let id = message.id.to_string();
        let apply = |conn: &mut C| db::apply_effect(conn, &id, &body.key, body.seq);
        if self.without_inbox {
            conn.transaction(|conn| apply(conn))?;
            return Ok(Processed::Handled(()));
        }
        Ok(self.inbox.process_once(&mut *conn, message, |conn| {
            apply(conn).map_err(waybill_diesel::Error::from)
        })?)
    }
}

/// The payload of an audit message.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Body {
    /// The writer's index of the message.
    pub(crate) idx: u64,
    /// The partition key.
    pub(crate) key: String,
    /// The message's number within its key, from 0.
    pub(crate) seq: u64,
}

impl<C: AuditConnection> DeliveryHandler for AuditHandler<C> {
    fn handle(&mut self, message: &IncomingMessage) -> Disposition {
        self.counter.add(Event::Delivery, 1);
        let body: Body = match message.json() {
            Ok(body) => body,
            Err(error) => return Disposition::DeadLetter(format!("not an audit message: {error}")),
        };
        match self.process(message, &body) {
            Ok(Processed::Handled(())) => {
                self.crashes.maybe_crash("after-handler-commit");
                Disposition::Ack
            }
            Ok(Processed::Duplicate) => {
                self.counter.add(Event::DuplicateDropped, 1);
                Disposition::Ack
            }
            Ok(_) => Disposition::DeadLetter("older than the inbox retention window".to_owned()),
            Err(error) => {
                log::warn!("message {} failed: {error}", message.id);
                match self.on_failure {
                    OnFailure::Exit => std::process::exit(EXIT_REDELIVER),
                    OnFailure::Retry => Disposition::Retry(error.to_string()),
                }
            }
        }
    }
}

/// The writer's plan: how many messages over how many keys, at what pace.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WritePlan {
    /// Messages in total (the writer resumes after the last committed one).
    pub(crate) messages: u64,
    /// Partition keys the messages are spread over.
    pub(crate) keys: u64,
    /// Messages per second; 0 for as fast as possible.
    pub(crate) rate: u64,
}

/// Commits messages until the plan is done: each one's outbox row and `audit_messages` row
/// in one transaction. A failed transaction is retried on a fresh connection; returns how
/// many messages this call committed.
///
/// # Errors
///
/// Only when `stop` is never set and no connection can be had for a minute.
pub(crate) fn write<C: AuditConnection>(
    pool: &DbPool<C>,
    plan: WritePlan,
    stop: &AtomicBool,
) -> Result<u64, Error> {
    let mut idx = db::next_index(&mut *pool.get()?)?;
    let started = Instant::now();
    let first = idx;
    let mut failing_since: Option<Instant> = None;
    while idx < plan.messages && !stop.load(Ordering::SeqCst) {
        if plan.rate > 0 {
            let due = Duration::from_secs_f64((idx - first) as f64 / plan.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        match write_one(pool, idx, plan.keys) {
            Ok(()) => {
                idx += 1;
                failing_since = None;
            }
            Err(error) => {
                log::warn!("writing message {idx} failed, retrying: {error}");
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    return Err(error);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(idx - first)
}

fn write_one<C: AuditConnection>(pool: &DbPool<C>, idx: u64, keys: u64) -> Result<(), Error> {
    let body = Body {
        idx,
        key: format!("k{}", idx % keys.max(1)),
        seq: idx / keys.max(1),
    };
    let message = NewOutboxMessage::json(TOPIC, body.key.as_str(), "AuditEvent", &body)?
        .with_id(MessageId::new());
    let mut conn = pool.get()?;
    (*conn).transaction::<_, waybill_diesel::Error, _>(|conn| {
        db::record_message(conn, idx, &message.id().to_string(), &body.key, body.seq)?;
        enqueue(conn, &message)
    })?;
    Ok(())
}
