//! The pipeline's parts as the audit runs them: the writer, a counting relay publisher with
//! crash points, and the consumer's handler that applies each message's effect through the
//! inbox. Worker processes and the in-process mode share them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::TransactionManager;
use diesel::r2d2::{ConnectionManager, PooledConnection};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use waybill_diesel::{enqueue, InOrder, Inbox, Processed};
use waybill_inbox_core::{gap_reason, DeliveryHandler, Disposition, IncomingMessage};
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

/// Attempts the audit's relays make before they park a message: few, so that a broker outage
/// outlasts the whole retry budget within seconds.
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// The relays' first retry delay.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(10);
/// The relays' longest retry delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(200);
/// The longest one publish attempt may take: the publishers' connect and confirm timeouts.
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// The relay configuration of the audit: short lease, small batches, and a small retry budget
/// (few attempts, short backoff), so an outage longer than the budget is cheap to inject. A
/// broker outage is no fault of a message: it must delay messages, never park them.
pub(crate) fn relay_config(owner: &str) -> RelayConfig {
    RelayConfig::default()
        .batch_size(50)
        .lease(LEASE)
        .poll_interval(Duration::from_millis(100))
        .backoff(Backoff::new(BACKOFF_BASE, BACKOFF_MAX))
        .max_attempts(MAX_ATTEMPTS)
        .owner(owner)
}

/// The longest a relay can take to spend a message's attempts on a broker that is down, when
/// each attempt fails within `attempt_timeout`: the attempts plus the backoffs between them.
/// An outage longer than this parks messages if outages are charged to them.
pub(crate) fn retry_budget(attempt_timeout: Duration) -> Duration {
    let backoffs: Duration = (1..MAX_ATTEMPTS)
        .map(|attempt| {
            BACKOFF_BASE
                .saturating_mul(1 << (attempt - 1).min(31))
                .min(BACKOFF_MAX)
        })
        .sum();
    backoffs + attempt_timeout.saturating_mul(MAX_ATTEMPTS)
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
    /// Report "broker unavailable" as a retryable failure of the message (`--break outage`).
    charge_outages: bool,
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
            charge_outages: false,
        }
    }

    /// Reports a broker that could not be used as a retryable failure of each message, which
    /// costs it an attempt: the outage bug the `--break outage` self-test brings back.
    pub(crate) fn charging_outages(mut self, charge: bool) -> Self {
        self.charge_outages = charge;
        self
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
        let mut outcomes = self.inner.publish(batch);
        if self.charge_outages {
            for outcome in &mut outcomes {
                // Every variant that is not about the message itself (a broker that could
                // not be used) becomes a failure of the message.
                if let Err(error) = outcome {
                    if !matches!(
                        error,
                        PublishError::Retryable(_)
                            | PublishError::Fatal(_)
                            | PublishError::NotAttempted
                    ) {
                        *outcome = Err(PublishError::Retryable(error.to_string()));
                    }
                }
            }
        }
        let confirmed = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        self.counter.add(Event::Published, confirmed as u64);
        self.crashes.maybe_crash("after-confirm");
        outcomes
    }
}

/// The panic message of an injected handler panic, so the panic hook can stay quiet.
pub(crate) const INJECTED_PANIC: &str = "waybill-audit: injected handler panic";

/// Probability that a delivery's handler fails transiently after applying its effect (so the
/// transaction rolls back) and asks for a retry.
const HANDLER_RETRY_PROBABILITY: f64 = 0.01;
/// Probability that a delivery's handler panics after applying its effect, inside the inbox's
/// transaction.
const HANDLER_PANIC_PROBABILITY: f64 = 0.005;
/// Probability that a delivery's handler runs a failing statement after applying its effect
/// and ignores the error (on PostgreSQL that aborts the transaction, and COMMIT rolls back).
const HANDLER_IGNORED_ERROR_PROBABILITY: f64 = 0.005;

/// A misbehaving handler, injected per delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandlerFault {
    /// Fails with a transient error; the handler returns [`Disposition::Retry`].
    Transient,
    /// Panics; the consumer side catches it and asks for a retry.
    Panic,
    /// Ignores a failed statement and returns success.
    IgnoredError,
}

/// Restores the default panic output, but keeps injected crashes and panics off stderr.
pub(crate) fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload().downcast_ref::<&str>();
        if payload != Some(&INJECTED_CRASH) && payload != Some(&INJECTED_PANIC) {
            default(info);
        }
    }));
}

/// How the consumer's handler misbehaves: what the `--break` self-tests and the seeded
/// schedule ask of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HandlerMode {
    /// Skip the inbox (`--break inbox`): duplicates then take effect twice.
    pub(crate) without_inbox: bool,
    /// After a caught panic, leave the connection inside a transaction (`--break panic`), as
    /// an inbox that does not roll back on unwind would.
    pub(crate) leak_on_panic: bool,
    /// Sequenced mode: apply with `Inbox::process_in_order`, recording each effect with its
    /// message's key number.
    pub(crate) sequenced: bool,
}

/// What processing a delivery came to, in either mode.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    Handled,
    Duplicate,
    /// `process_once` only: its record may have been purged.
    Expired,
    /// `process_in_order` only: held behind a gap (retry in place) ...
    Held(String),
    /// ... or parked after the gap wait.
    GapParked(String),
}

/// The consumer's handler: applies each message's effect (a row in `audit_effects`) inside
/// `Inbox::process_once`, counts deliveries and dropped duplicates, and crashes after the
/// commit but before the ack (`after-handler-commit`).
///
/// It keeps one connection for every delivery, as a consumer with a direct connection does, so
/// a connection left inside a transaction shows: a delivery reported handled while its
/// connection is still in a transaction never committed (`handled_uncommitted`). Seeded
/// faults make the handler fail transiently (it returns a retry) or panic (caught here, as a
/// consumer loop would, and retried) after applying the effect.
pub(crate) struct AuditHandler<C: AuditConnection> {
    pool: DbPool<C>,
    conn: Option<PooledConnection<ConnectionManager<C>>>,
    inbox: Inbox,
    counter: Counter,
    crashes: Arc<CrashPoints>,
    mode: HandlerMode,
    rng: StdRng,
}

impl<C: AuditConnection> std::fmt::Debug for AuditHandler<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHandler")
            .field("inbox", &self.inbox)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<C: AuditConnection> AuditHandler<C> {
    /// A handler on `pool`'s database whose injected faults follow `seed`.
    pub(crate) fn new(
        pool: DbPool<C>,
        counter: Counter,
        crashes: Arc<CrashPoints>,
        mode: HandlerMode,
        seed: u64,
    ) -> Self {
        Self {
            pool,
            conn: None,
            inbox: Inbox::new(CONSUMER),
            counter,
            crashes,
            mode,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn draw_fault(&mut self) -> Option<HandlerFault> {
        let draw: f64 = self.rng.random();
        if draw < HANDLER_RETRY_PROBABILITY {
            Some(HandlerFault::Transient)
        } else if draw < HANDLER_RETRY_PROBABILITY + HANDLER_PANIC_PROBABILITY {
            Some(HandlerFault::Panic)
        } else if draw
            < HANDLER_RETRY_PROBABILITY
                + HANDLER_PANIC_PROBABILITY
                + HANDLER_IGNORED_ERROR_PROBABILITY
        {
            Some(HandlerFault::IgnoredError)
        } else {
            None
        }
    }

    /// Whether the kept connection is inside a transaction (or its state is unknown).
    fn in_transaction(&mut self) -> bool {
        self.conn.as_mut().is_some_and(|conn| {
            let conn: &mut C = conn;
            !matches!(
                <C::TransactionManager as TransactionManager<C>>::transaction_manager_status_mut(
                    conn
                )
                .transaction_depth(),
                Ok(None)
            )
        })
    }

    fn process(
        &mut self,
        message: &IncomingMessage,
        body: &Body,
        fault: Option<HandlerFault>,
    ) -> Result<Applied, Error> {
        let without_inbox = self.mode.without_inbox;
        let id = message.id.to_string();
        // Sequenced: the effect records the key number the producer assigned, which the
        // checker requires to be 1, 2, 3, ... per key.
        let effect_seq = match (&message.sequence, self.mode.sequenced) {
            (Some(position), true) => position.stamp.sequence,
            (None, true) => {
                return Err("a sequenced run delivered a message without a number".into())
            }
            (_, false) => body.seq,
        };
        let apply = |conn: &mut C| -> Result<(), waybill_diesel::Error> {
            db::apply_effect(conn, &id, &body.key, effect_seq)?;
            match fault {
                Some(HandlerFault::Transient) => Err(diesel::result::Error::QueryBuilderError(
                    "waybill-audit: injected transient failure".into(),
                )
                .into()),
                Some(HandlerFault::Panic) => std::panic::panic_any(INJECTED_PANIC),
                Some(HandlerFault::IgnoredError) => {
                    // A sloppy handler: the statement fails and nobody looks.
                    let _ = conn.run_statement("SELECT no_such_column FROM audit_effects");
                    Ok(())
                }
                None => Ok(()),
            }
        };
        let conn = kept_connection(&mut self.conn, &self.pool)?;
        if without_inbox {
            conn.transaction(apply)?;
            return Ok(Applied::Handled);
        }
        if self.mode.sequenced {
            return Ok(match self.inbox.process_in_order(conn, message, apply)? {
                InOrder::Handled(()) => Applied::Handled,
                InOrder::Duplicate | InOrder::Skipped { .. } => Applied::Duplicate,
                InOrder::Held { expected, got, .. } => Applied::Held(gap_reason(expected, got)),
                InOrder::GapParked { expected, got } => {
                    Applied::GapParked(gap_reason(expected, got))
                }
            });
        }
        Ok(match self.inbox.process_once(conn, message, apply)? {
            Processed::Handled(()) => Applied::Handled,
            Processed::Duplicate => Applied::Duplicate,
            Processed::Expired => Applied::Expired,
        })
    }

    /// Whether the effect of `message` is in the database, as a delivery reported handled
    /// promises. A database failure here counts as committed: it proves nothing.
    fn committed(&mut self, message: &IncomingMessage) -> bool {
        let id = message.id.to_string();
        match kept_connection(&mut self.conn, &self.pool).and_then(|conn| Ok(conn.effects_of(&id)?))
        {
            Ok(effects) => {
                if effects == 0 {
                    log::warn!("message {id} reported handled, but its effect did not commit");
                }
                effects > 0
            }
            Err(error) => {
                log::warn!("checking the effect of message {id} failed: {error}");
                true
            }
        }
    }

    /// Leaves the kept connection inside a transaction, as an inbox that does not roll back
    /// when its handler panics would (`--break panic`).
    fn leak_transaction(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let conn: &mut C = conn;
            if let Err(error) =
                <C::TransactionManager as TransactionManager<C>>::begin_transaction(conn)
            {
                log::warn!("leaving a transaction open failed: {error}");
            }
        }
    }
}

/// The connection in `slot`, taken from `pool` when there is none.
fn kept_connection<'a, C: AuditConnection>(
    slot: &'a mut Option<PooledConnection<ConnectionManager<C>>>,
    pool: &DbPool<C>,
) -> Result<&'a mut C, Error> {
    let conn = match slot.take() {
        Some(conn) => conn,
        None => pool.get()?,
    };
    Ok(&mut **slot.insert(conn))
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
        let fault = self.draw_fault();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.process(message, &body, fault)
        }));
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(panic) => {
                if panic.downcast_ref::<&str>() != Some(&INJECTED_PANIC) {
                    std::panic::resume_unwind(panic);
                }
                // The consumer side survives the panic and keeps its connection.
                self.counter.add(Event::HandlerPanic, 1);
                if self.mode.leak_on_panic {
                    self.leak_transaction();
                }
                return Disposition::Retry("the handler panicked".to_owned());
            }
        };
        if self.in_transaction() {
            // Whatever it returned, nothing done on this connection since the transaction was
            // left open has committed; dropping it (r2d2 discards a connection in a
            // transaction) rolls it all back, and the retry does it again.
            self.conn = None;
            if matches!(outcome, Ok(Applied::Handled)) {
                log::warn!(
                    "message {} reported handled on a connection still inside a transaction",
                    message.id
                );
                self.counter.add(Event::HandledUncommitted, 1);
            }
            return Disposition::Retry("the connection was left inside a transaction".to_owned());
        }
        if fault == Some(HandlerFault::IgnoredError) {
            self.counter.add(Event::HandlerIgnoredError, 1);
        }
        match outcome {
            Ok(Applied::Handled) => {
                if !self.committed(message) {
                    self.counter.add(Event::HandledUncommitted, 1);
                    return Disposition::Retry("handled, but the effect did not commit".to_owned());
                }
                self.crashes.maybe_crash("after-handler-commit");
                Disposition::Ack
            }
            Ok(Applied::Duplicate) => {
                self.counter.add(Event::DuplicateDropped, 1);
                Disposition::Ack
            }
            Ok(Applied::Expired) => Disposition::DeadLetter(
                "sent before the inbox's last purge, so its record may be gone".to_owned(),
            ),
            // Held back behind a gap: retried in place; parked after the wait (then the message
            // is lost to the audit, which counts it).
            Ok(Applied::Held(reason)) => Disposition::Retry(reason),
            Ok(Applied::GapParked(reason)) => Disposition::DeadLetter(reason),
            Err(error) if fault == Some(HandlerFault::Transient) => {
                self.counter.add(Event::HandlerRetry, 1);
                Disposition::Retry(error.to_string())
            }
            Err(error) => {
                log::warn!("message {} failed: {error}", message.id);
                // The connection may be the reason.
                self.conn = None;
                // The consumer loop retries in place, ahead of later messages of the key.
                Disposition::Retry(error.to_string())
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
    /// Enqueue `.sequenced()` messages.
    pub(crate) sequenced: bool,
}

/// Every this many messages, one is written unreadable.
const UNREADABLE_EVERY: u64 = 250;
/// The headers an unreadable row gets: valid JSON, but not the string map the library wrote.
pub(crate) const UNREADABLE_HEADERS: &str = r#"{"waybill-audit": ["not", "a", "string", "map"]}"#;

/// `original` (a JSON object of string headers) with [`UNREADABLE_HEADERS`]'s member added.
fn unreadable_headers(original: &str) -> String {
    match original.trim().strip_suffix('}') {
        Some(open) if open.trim() != "{" => {
            format!("{open},{}", UNREADABLE_HEADERS.trim_start_matches('{'))
        }
        _ => UNREADABLE_HEADERS.to_owned(),
    }
}

/// Whether the message `idx` is written unreadable.
fn unreadable(idx: u64) -> bool {
    idx % UNREADABLE_EVERY == UNREADABLE_EVERY / 2
}

/// Commits messages until the plan is done: each one's outbox row and `audit_messages` row
/// in one transaction. A failed transaction is retried on a fresh connection; returns how
/// many messages this call committed.
///
/// Now and then a message's headers are overwritten by raw SQL in its transaction with JSON
/// that is not a string map (a row written by another program, or a newer version), and it
/// is recorded in `audit_unreadable`; the next message of each key, its own successor
/// included, commits with it, so a relay claims them together.
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
    let keys = plan.keys.max(1);
    while idx < plan.messages && !stop.load(Ordering::SeqCst) {
        if plan.rate > 0 {
            let due = Duration::from_secs_f64((idx - first) as f64 / plan.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let burst = if unreadable(idx) && idx + keys < plan.messages {
            keys + 1
        } else {
            1
        };
        match write_burst(pool, idx, burst, keys, plan.sequenced) {
            Ok(()) => {
                idx += burst;
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

/// Commits the messages `idx..idx + count` in one transaction; with more than one, the first
/// is made unreadable.
fn write_burst<C: AuditConnection>(
    pool: &DbPool<C>,
    idx: u64,
    count: u64,
    keys: u64,
    sequenced: bool,
) -> Result<(), Error> {
    let mut messages = Vec::new();
    for idx in idx..idx + count {
        let body = Body {
            idx,
            key: format!("k{}", idx % keys),
            seq: idx / keys,
        };
        let mut message = NewOutboxMessage::json(TOPIC, body.key.as_str(), "AuditEvent", &body)?
            .with_id(MessageId::new());
        if sequenced {
            message = message.sequenced();
        }
        messages.push((body, message));
    }
    let mut conn = pool.get()?;
    (*conn).transaction::<_, waybill_diesel::Error, _>(|conn| {
        for (n, (body, message)) in messages.iter().enumerate() {
            let id = message.id().to_string();
            db::record_message(conn, body.idx, &id, &body.key, body.seq)?;
            enqueue(conn, message)?;
            if n == 0 && count > 1 {
                // The headers as enqueued (a sequenced message's number and epoch), which the
                // operator's repair restores, plus a value that is not a string.
                let original = waybill_diesel::find_message(conn, message.id())?
                    .map(|stored| stored.headers)
                    .unwrap_or_default();
                let original = serde_json::to_string(&original).map_err(|e| {
                    waybill_diesel::Error::Database(diesel::result::Error::SerializationError(
                        Box::new(e),
                    ))
                })?;
                conn.set_headers(*message.id().as_uuid(), &unreadable_headers(&original))?;
                conn.insert_unreadable(&id, &original)?;
            }
        }
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_budget_is_every_attempt_plus_the_backoffs_between_them() {
        // 3 attempts: backoffs of at most 10 ms and 20 ms between them.
        assert_eq!(retry_budget(Duration::ZERO), Duration::from_millis(30));
        assert_eq!(
            retry_budget(Duration::from_secs(2)),
            Duration::from_millis(6030)
        );
    }

    #[test]
    fn unreadable_headers_keep_the_original_ones() {
        assert_eq!(unreadable_headers("{}"), UNREADABLE_HEADERS);
        let kept = unreadable_headers(r#"{"waybill-sequence":"3"}"#);
        let value: serde_json::Value = serde_json::from_str(&kept).unwrap_or_default();
        assert_eq!(value["waybill-sequence"], "3");
        assert!(value["waybill-audit"].is_array(), "{kept}");
    }

    #[test]
    fn an_unreadable_row_is_written_every_250_messages() {
        let unreadable_rows: Vec<u64> = (0..1000).filter(|idx| unreadable(*idx)).collect();
        assert_eq!(unreadable_rows, [125, 375, 625, 875]);
    }
}
