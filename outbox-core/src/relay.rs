//! The relay: claims committed messages, publishes them and writes back what happened.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::{
    Backoff, Completion, OutboxMessage, OutboxStore, PublishError, Publisher, Retention, Retryable,
};

/// How a relay behaves. Every setting has a default suited to a small service.
///
/// ```
/// use std::time::Duration;
/// use waybill_outbox_core::RelayConfig;
///
/// let config = RelayConfig::default().batch_size(1000).lease(Duration::from_secs(10));
/// assert_eq!(config.batch_limit(), 1000);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RelayConfig {
    batch_size: usize,
    lease: Duration,
    min_poll_interval: Duration,
    poll_interval: Duration,
    wakeup_check_interval: Duration,
    backoff: Backoff,
    max_attempts: u32,
    retention: Retention,
    purge_interval: Duration,
    purge_batch_size: usize,
    owner: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            lease: Duration::from_secs(30),
            min_poll_interval: Duration::from_millis(10),
            poll_interval: Duration::from_secs(1),
            wakeup_check_interval: Duration::from_millis(2),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            max_attempts: 10,
            retention: Retention::Delete,
            purge_interval: Duration::from_secs(60),
            purge_batch_size: 1000,
            owner: format!(
                "relay-{}-{}",
                std::process::id(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }
}

impl RelayConfig {
    /// The most messages claimed and published in one round. Defaults to 500.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// How long a claim holds its messages. A relay that dies has its messages taken over by
    /// another relay this long after it claimed them; it must be longer than a publish takes.
    /// Defaults to 30 s.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The longest an idle relay waits before polling again. Defaults to 1 s. On PostgreSQL a
    /// `NOTIFY` from the enqueueing transaction wakes it sooner; the poll is the fallback.
    #[must_use]
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// The first idle wait; it doubles on every empty poll up to `poll_interval`. Defaults to
    /// 10 ms.
    #[must_use]
    pub fn min_poll_interval(mut self, interval: Duration) -> Self {
        self.min_poll_interval = interval;
        self
    }

    /// How often an idle relay checks for a wake-up signal (no database round trip: a read of
    /// what the listening connection already received). It bounds the commit-to-publish latency
    /// of a `NOTIFY` wake-up. Defaults to 2 ms, about 0.3% of a core while idle.
    #[must_use]
    pub fn wakeup_check_interval(mut self, interval: Duration) -> Self {
        self.wakeup_check_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The retry backoff after a retryable publish failure. Defaults to 1 s doubling up to 5 min.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Attempts before a message is parked. Defaults to 10.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// What happens to published messages. Defaults to [`Retention::Delete`].
    #[must_use]
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// How often the relay purges published messages past the retention window. Defaults to 60 s.
    #[must_use]
    pub fn purge_interval(mut self, interval: Duration) -> Self {
        self.purge_interval = interval;
        self
    }

    /// The most rows one purge statement deletes, so it never locks the table for long.
    /// Defaults to 1000.
    #[must_use]
    pub fn purge_batch_size(mut self, size: usize) -> Self {
        self.purge_batch_size = size.max(1);
        self
    }

    /// The name recorded on leases for operators. Defaults to `relay-<pid>-<random>`.
    #[must_use]
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }

    /// The batch size in force.
    pub fn batch_limit(&self) -> usize {
        self.batch_size
    }

    /// The owner name in force.
    pub fn owner_name(&self) -> &str {
        &self.owner
    }
}

/// The counts of one [`Relay::run_once`] round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayReport {
    /// Messages claimed.
    pub claimed: u64,
    /// Messages the broker confirmed.
    pub published: u64,
    /// Messages that failed and will be retried after a backoff.
    pub retried: u64,
    /// Messages parked (fatal error or too many attempts).
    pub parked: u64,
    /// Messages handed back unsent (shutdown, or an earlier message of their key failed).
    pub released: u64,
    /// Writes refused because another relay had taken the messages over (fencing).
    pub fenced_off: u64,
    /// Expired leases of other relays this relay's claims took over.
    pub lease_takeovers: u64,
}

impl RelayReport {
    fn add(&mut self, other: &Self) {
        self.claimed += other.claimed;
        self.published += other.published;
        self.retried += other.retried;
        self.parked += other.parked;
        self.released += other.released;
        self.fenced_off += other.fenced_off;
        self.lease_takeovers += other.lease_takeovers;
    }
}

/// Observes a running relay, e.g. to export metrics. Every method has a default that does
/// nothing beyond the relay's own logging.
pub trait RelayHooks: Send {
    /// After every round that claimed something.
    fn on_batch(&self, _report: &RelayReport, _elapsed: Duration) {}
    /// When the relay found nothing to do and is about to wait.
    fn on_idle(&self) {}
    /// When a round failed on the database; the relay backs off and tries again.
    fn on_store_error(&self, _error: &(dyn std::error::Error + 'static)) {}
}

/// Hooks that do nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl RelayHooks for NoHooks {}

/// Stops or wakes a running [`Relay`] from another thread. Cheap to clone.
///
/// ```
/// use waybill_outbox_core::RelayHandle;
///
/// let handle = RelayHandle::default();
/// handle.stop();
/// assert!(handle.is_stopped());
/// ```
#[derive(Clone, Debug, Default)]
pub struct RelayHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug, Default)]
struct HandleInner {
    state: Mutex<HandleState>,
    signal: Condvar,
}

#[derive(Debug, Default)]
struct HandleState {
    stopped: bool,
    woken: bool,
}

impl RelayHandle {
    /// Asks the relay to stop: it finishes the batch in hand, hands back what it has not sent and
    /// returns from [`Relay::run`].
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.inner.signal.notify_all();
    }

    /// Wakes an idle relay at once, e.g. right after the writer in the same process committed.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.inner.signal.notify_all();
    }

    /// `true` once [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Waits up to `timeout` for a stop or wake signal; returns whether one came.
    fn wait(&self, timeout: Duration) -> bool {
        let mut state = self.lock();
        if !state.stopped && !state.woken {
            state = self
                .inner
                .signal
                .wait_timeout_while(state, timeout, |s| !s.stopped && !s.woken)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let signalled = state.stopped || state.woken;
        state.woken = false;
        signalled
    }

    fn lock(&self) -> MutexGuard<'_, HandleState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Moves committed messages from the outbox to a broker.
///
/// Each round claims a batch under a lease (no transaction stays open while the broker works),
/// publishes it, and writes back per message: published, retry later with backoff, parked, or
/// released. Writes are fenced by the claim's token, so a relay whose lease was taken over cannot
/// touch messages it no longer owns. Any number of relays may run against one outbox: messages
/// with the same partition key are published in outbox order, and a failing key never blocks
/// the others.
///
/// ```
/// # use std::time::Duration;
/// # use waybill_outbox_core::*;
/// # #[derive(Debug, thiserror::Error)] #[error("never")] struct Never;
/// # impl Retryable for Never { fn is_retryable(&self) -> bool { false } }
/// # struct Empty;
/// # impl OutboxStore for Empty {
/// #     type Error = Never;
/// #     fn claim(&self, _: usize, _: Duration, _: &str) -> Result<Claimed, Never> { Ok(Claimed::new(1, vec![])) }
/// #     fn complete(&self, _: LeaseToken, _: &[Completion], _: Retention) -> Result<CompleteReport, Never> { Ok(CompleteReport::default()) }
/// #     fn purge_published(&self, _: Duration, _: usize) -> Result<u64, Never> { Ok(0) }
/// # }
/// # let store = Empty;
/// let mut relay = Relay::new(store, InMemoryPublisher::new(), RelayConfig::default());
/// let report = relay.run_once()?;
/// assert_eq!(report.claimed, 0);
///
/// let handle = relay.handle();
/// let worker = std::thread::spawn(move || relay.run());
/// handle.stop();
/// let totals = worker.join().expect("relay thread");
/// assert_eq!(totals.published, 0);
/// # Ok::<(), Never>(())
/// ```
pub struct Relay<S, P> {
    store: S,
    publisher: P,
    config: RelayConfig,
    handle: RelayHandle,
    hooks: Box<dyn RelayHooks>,
    rng: SmallRng,
    last_purge: Option<Instant>,
    totals: RelayReport,
}

impl<S, P> fmt::Debug for Relay<S, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S: OutboxStore, P: Publisher> Relay<S, P> {
    /// A relay that moves messages from `store` to `publisher`.
    pub fn new(store: S, publisher: P, config: RelayConfig) -> Self {
        crate::metrics::register(&config.owner);
        Self {
            store,
            publisher,
            config,
            handle: RelayHandle::default(),
            hooks: Box::new(NoHooks),
            rng: SmallRng::from_rng(&mut rand::rng()),
            last_purge: None,
            totals: RelayReport::default(),
        }
    }

    /// Observes the relay with `hooks`.
    #[must_use]
    pub fn with_hooks(mut self, hooks: impl RelayHooks + 'static) -> Self {
        self.hooks = Box::new(hooks);
        self
    }

    /// A handle to stop or wake this relay from another thread.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Counters since the relay was built (claimed, published, retried, parked, released,
    /// fenced off), summed over every round: what a metrics exporter reads. Per-topic pending,
    /// parked and oldest-pending figures come from the store (`waybill_diesel::topic_stats`).
    pub fn totals(&self) -> RelayReport {
        self.totals
    }

    /// The store this relay works on.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The publisher this relay sends to.
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// One round: claim a batch, publish it, write back each message's outcome. Returns at once
    /// with an empty report when nothing is due. The deterministic step tests drive.
    ///
    /// # Errors
    ///
    /// A database failure while claiming (nothing claimed) or writing back (what was published
    /// is published again after the lease expires: at-least-once, never lost).
    pub fn run_once(&mut self) -> Result<RelayReport, S::Error> {
        let round = Instant::now();
        let claimed = self.store.claim(
            self.config.batch_size,
            self.config.lease,
            &self.config.owner,
        )?;
        let mut report = RelayReport {
            claimed: claimed.messages.len() as u64,
            lease_takeovers: claimed.lease_takeovers,
            ..RelayReport::default()
        };
        if claimed.lease_takeovers > 0 {
            log::warn!(
                "took over {} expired leases of another relay (crashed, paused or too slow)",
                claimed.lease_takeovers
            );
        }
        if claimed.messages.is_empty() {
            // Leases are only taken with messages: an empty claim has nothing to count.
            return Ok(report);
        }
        let completions = if self.handle.is_stopped() {
            // Stopping between claim and publish: hand everything back unsent.
            claimed
                .messages
                .iter()
                .map(|m| Completion::Release { seq: m.seq })
                .collect()
        } else {
            let started = Instant::now();
            let outcomes = self.publisher.publish(&claimed.messages);
            if started.elapsed() >= self.config.lease {
                log::warn!(
                    "publishing {} messages took {:?}, longer than the {:?} lease; writes are fenced",
                    claimed.messages.len(),
                    started.elapsed(),
                    self.config.lease
                );
            }
            self.completions(&claimed.messages, outcomes)
        };
        for completion in &completions {
            match completion {
                Completion::Published { .. } => report.published += 1,
                Completion::Retry { .. } => report.retried += 1,
                Completion::Park { .. } => report.parked += 1,
                Completion::Release { .. } => report.released += 1,
            }
        }
        let written = self
            .store
            .complete(claimed.token, &completions, self.config.retention)?;
        report.fenced_off = written.refused;
        if written.refused > 0 {
            log::warn!(
                "lease {} was taken over: {} of {} writes refused by fencing",
                claimed.token,
                written.refused,
                completions.len()
            );
        }
        log::debug!("relay round: {report:?}");
        crate::metrics::record_round(&self.config.owner, &report, round.elapsed());
        self.totals.add(&report);
        Ok(report)
    }

    fn completions(
        &mut self,
        messages: &[OutboxMessage],
        outcomes: Vec<Result<(), PublishError>>,
    ) -> Vec<Completion> {
        if outcomes.len() != messages.len() {
            log::error!(
                "publisher returned {} outcomes for {} messages; treating the missing ones as failed",
                outcomes.len(),
                messages.len()
            );
        }
        let mut outcomes = outcomes.into_iter();
        messages
            .iter()
            .map(|msg| {
                let outcome = outcomes.next().unwrap_or_else(|| {
                    Err(PublishError::Retryable(
                        "publisher returned no outcome".into(),
                    ))
                });
                self.completion(msg, outcome)
            })
            .collect()
    }

    fn completion(&mut self, msg: &OutboxMessage, outcome: Result<(), PublishError>) -> Completion {
        let seq = msg.seq;
        let attempt = u32::try_from(msg.attempts).unwrap_or(0).saturating_add(1);
        match outcome {
            Ok(()) => Completion::Published { seq },
            Err(PublishError::NotAttempted) => Completion::Release { seq },
            Err(PublishError::Fatal(error)) => {
                log::error!("parking message {} after a fatal error: {error}", msg.id);
                Completion::Park { seq, reason: error }
            }
            Err(PublishError::Retryable(error)) if attempt >= self.config.max_attempts => {
                log::error!(
                    "parking message {} after {attempt} attempts: {error}",
                    msg.id
                );
                Completion::Park {
                    seq,
                    reason: format!("gave up after {attempt} attempts: {error}"),
                }
            }
            Err(PublishError::Retryable(error)) => {
                let delay = self.config.backoff.delay(attempt, &mut self.rng);
                log::warn!(
                    "publishing message {} failed (attempt {attempt}/{}), retrying in {delay:?}: {error}",
                    msg.id,
                    self.config.max_attempts
                );
                Completion::Retry { seq, delay, error }
            }
        }
    }

    /// Runs rounds until [`RelayHandle::stop`] is called, then returns [`totals`](Self::totals).
    ///
    /// A full batch is followed at once by the next; an empty one by an idle wait that doubles
    /// up to the poll interval and ends early on a wake-up (`NOTIFY`, [`RelayHandle::wake`]).
    /// Database failures are logged and retried with backoff; they never end the loop.
    pub fn run(&mut self) -> RelayReport {
        let mut idle_wait = self.config.min_poll_interval;
        let mut failures = 0;
        // Start listening before the first idle wait, so no wake-up sent after start is missed.
        if let Err(error) = self.store.poll_wakeup() {
            log::warn!("listening for outbox notifications failed: {error}");
        }
        let mut announced_idle = false;
        while !self.handle.is_stopped() {
            let started = Instant::now();
            match self.run_once() {
                Ok(report) => {
                    failures = 0;
                    if report.claimed == 0 && !announced_idle {
                        // Ask writers for wake-ups, then look once more: a message committed
                        // before the announcement was visible must not wait for the poll.
                        self.announce_idle(true);
                        announced_idle = true;
                        continue;
                    } else if report.claimed == 0 {
                        self.hooks.on_idle();
                        log::trace!("outbox idle; waiting up to {idle_wait:?}");
                        self.wait_idle(idle_wait);
                        idle_wait = (idle_wait * 2).min(self.config.poll_interval);
                    } else {
                        if announced_idle {
                            self.announce_idle(false);
                            announced_idle = false;
                        }
                        self.hooks.on_batch(&report, started.elapsed());
                        idle_wait = self.config.min_poll_interval;
                    }
                }
                Err(error) => {
                    failures += 1;
                    let delay = self
                        .config
                        .backoff
                        .delay(failures, &mut self.rng)
                        .min(self.config.poll_interval.max(Duration::from_secs(1)) * 5);
                    if error.is_retryable() {
                        log::warn!("relay round failed (retrying in {delay:?}): {error}");
                    } else {
                        log::error!("relay round failed (retrying in {delay:?}): {error}");
                    }
                    self.hooks.on_store_error(&error);
                    self.handle.wait(delay);
                }
            }
            self.purge_if_due();
        }
        if announced_idle {
            // Writers need not wake a relay that is gone.
            self.announce_idle(false);
        }
        if let Err(error) = self.store.retire(&self.config.owner) {
            log::warn!("telling other relays that this one stopped failed: {error}");
        }
        log::info!("relay {} stopped: {:?}", self.config.owner, self.totals);
        self.totals
    }

    /// A failed announcement only costs wake-up latency (the poll still finds the work).
    fn announce_idle(&mut self, idle: bool) {
        if let Err(error) = self.store.announce_idle(idle) {
            log::warn!("announcing relay idle={idle} failed: {error}");
        }
    }

    fn wait_idle(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.store.poll_wakeup() {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => log::warn!("checking for outbox notifications failed: {error}"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .handle
                    .wait(left.min(self.config.wakeup_check_interval))
            {
                return;
            }
        }
    }

    fn purge_if_due(&mut self) {
        let Retention::Keep(window) = self.config.retention else {
            return;
        };
        if self
            .last_purge
            .is_some_and(|at| at.elapsed() < self.config.purge_interval)
        {
            return;
        }
        self.last_purge = Some(Instant::now());
        let mut purged = 0;
        while !self.handle.is_stopped() {
            match self
                .store
                .purge_published(window, self.config.purge_batch_size)
            {
                Ok(n) => {
                    purged += n;
                    if n < self.config.purge_batch_size as u64 {
                        break;
                    }
                }
                Err(error) => {
                    log::warn!("purging published messages failed: {error}");
                    break;
                }
            }
        }
        if purged > 0 {
            log::debug!("purged {purged} published messages older than {window:?}");
        }
    }
}
