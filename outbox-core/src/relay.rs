//! The relay: claims committed messages, publishes them and writes back what happened.

use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use crate::pace::Pace;
use crate::{
    Backoff, Claimed, CompleteReport, Completion, LeaseToken, OutboxMessage, OutboxStore,
    PublishError, Publisher, Retention, Retryable, StopHandle,
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
    /// The longest lease a relay takes: 1 day. A relay that dies holds its messages this long
    /// at most, and no database's date arithmetic overflows.
    pub const MAX_LEASE: Duration = Duration::from_secs(24 * 60 * 60);

    /// The shortest lease: 1 ms (a lease of zero would have expired before publishing).
    pub const MIN_LEASE: Duration = Duration::from_millis(1);

    /// The largest batch: 50,000 messages, well within what one claim can read and one
    /// write-back can write on every backend.
    pub const MAX_BATCH_SIZE: usize = 50_000;

    /// The most messages claimed and published in one round, from 1 to
    /// [`MAX_BATCH_SIZE`](Self::MAX_BATCH_SIZE); a value outside is clamped (with a warning).
    /// Defaults to 500.
    #[must_use]
    pub fn batch_size(mut self, size: usize) -> Self {
        let clamped = size.clamp(1, Self::MAX_BATCH_SIZE);
        if clamped != size {
            log::warn!("relay batch size {size} is out of bounds; using {clamped}");
        }
        self.batch_size = clamped;
        self
    }

    /// How long a claim holds its messages. A relay that dies has its messages taken over by
    /// another relay this long after it claimed them; it must be longer than a publish takes.
    /// From [`MIN_LEASE`](Self::MIN_LEASE) to [`MAX_LEASE`](Self::MAX_LEASE); a value outside
    /// is clamped (with a warning). Defaults to 30 s.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        let clamped = lease.clamp(Self::MIN_LEASE, Self::MAX_LEASE);
        if clamped != lease {
            log::warn!("relay lease {lease:?} is out of bounds; using {clamped:?}");
        }
        self.lease = clamped;
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
    ///
    /// A running relay also pauses by it while the broker is unavailable or the database fails,
    /// then capped at five poll intervals (at least 5 s), so it notices a recovery soon.
    #[must_use]
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Attempts before a message is parked. Defaults to 10. Only failures about the message
    /// count: a broker outage ([`PublishError::Unavailable`]) charges none, however long.
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

    /// The lease in force.
    pub fn lease_duration(&self) -> Duration {
        self.lease
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
    /// Messages handed back unsent because the broker was unavailable: no attempt counted.
    pub unavailable: u64,
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
        self.unavailable += other.unavailable;
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
    handle: StopHandle,
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
            handle: StopHandle::default(),
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
    pub fn handle(&self) -> StopHandle {
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
    ///
    /// Messages the publisher could not send because the broker was unavailable are handed back
    /// without counting an attempt ([`RelayReport::unavailable`]); `run_once` returns at once all
    /// the same, while [`run`](Self::run) pauses before its next round.
    pub fn run_once(&mut self) -> Result<RelayReport, S::Error> {
        self.round().map(|(report, _)| report)
    }

    /// [`run_once`](Self::run_once), also returning why the broker was unavailable, if it was.
    fn round(&mut self) -> Result<(RelayReport, Option<String>), S::Error> {
        let round = Instant::now();
        let claimed = self.store.claim(
            self.config.batch_size,
            self.config.lease,
            &self.config.owner,
        )?;
        let mut report = claim_report(&claimed);
        if claimed.messages.is_empty() {
            // Leases are only taken with messages: an empty claim has nothing to count.
            return Ok((report, None));
        }
        let (completions, unavailable) = publish_claimed(
            &mut self.publisher,
            &self.config,
            &mut self.rng,
            &self.handle,
            &claimed,
            &mut report,
        );
        let written = self
            .store
            .complete(claimed.token, &completions, self.config.retention)?;
        record_round(
            &self.config,
            &mut self.totals,
            &mut report,
            (claimed.token, &completions),
            written,
            round.elapsed(),
        );
        Ok((report, unavailable))
    }

    /// Runs rounds until [`StopHandle::stop`] is called, then returns [`totals`](Self::totals).
    ///
    /// A full batch is followed at once by the next; an empty one by an idle wait that doubles
    /// up to the poll interval and ends early on a wake-up (`NOTIFY`, [`StopHandle::wake`]).
    /// Database failures are logged and retried with backoff; they never end the loop. While the
    /// broker is unavailable the relay hands its messages back uncharged and pauses between
    /// rounds, longer each time (see [`RelayConfig::backoff`]), until a round reaches the broker.
    pub fn run(&mut self) -> RelayReport {
        let mut idle_wait = self.config.min_poll_interval;
        let mut failures = 0;
        let mut outage = Outage::default();
        // Start listening before the first idle wait, so no wake-up sent after start is missed.
        if let Err(error) = self.store.poll_wakeup() {
            log::warn!("listening for outbox notifications failed: {error}");
        }
        let mut announced_idle = false;
        while !self.handle.is_stopped() {
            let started = Instant::now();
            match self.round() {
                Ok((report, unavailable)) => {
                    failures = 0;
                    let outage_pause =
                        outage.after(&report, unavailable, &self.config, &mut self.rng);
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
                        if let Some(pause) = outage_pause {
                            // Only a round that claimed something can find the broker down.
                            self.handle.wait(pause);
                        }
                    }
                }
                Err(error) => {
                    failures += 1;
                    let delay = pause(&self.config, failures, &mut self.rng);
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

    fn announce_idle(&mut self, idle: bool) {
        announce_idle(&self.store, idle);
    }

    fn wait_idle(&mut self, timeout: Duration) {
        wait_idle(&self.store, &self.handle, &self.config, timeout);
    }

    fn purge_if_due(&mut self) {
        purge_if_due(
            &self.store,
            &self.handle,
            &self.config,
            &mut self.last_purge,
        );
    }
}

/// Work for the pipelined relay's database thread: write back the batch published last, then
/// claim the one to publish next.
struct Job {
    write: Option<Published>,
    claim: bool,
    /// Claim a share that leaves work for a claim made while this one is in flight (see
    /// [`OutboxStore::claim_ahead`]).
    ahead: bool,
}

/// A published batch whose outcomes are not written back yet.
struct Published {
    token: LeaseToken,
    completions: Vec<Completion>,
    report: RelayReport,
    started: Instant,
}

/// What the database thread did with a [`Job`].
struct JobDone<E> {
    written: Option<(Published, Result<CompleteReport, E>)>,
    claimed: Option<Result<Claimed, E>>,
}

impl<S: OutboxStore + Sync, P: Publisher> Relay<S, P> {
    /// Runs like [`run`](Self::run), but claims the next batch and writes back the previous one
    /// on a second thread while the current batch is being published: the broker and the
    /// database work at the same time. Worth it when publishing takes about as long as the
    /// database work (a broker with confirms over the network). A claim made while a batch is
    /// in flight takes half of the relay's usual share of the free key buckets
    /// ([`OutboxStore::claim_ahead`]), so the next claim finds work while this batch's buckets
    /// are leased; a batch's buckets are released only after its write-back, so per-key order
    /// and fencing are exactly those of [`run`](Self::run).
    ///
    /// Such a claim costs the database more per message than one made with nothing in flight,
    /// and where the database, the broker and the relay share a few cores, overlapping them
    /// may only move work around. So the relay measures both modes as it goes, in messages
    /// published per second over windows of batches with no idle round between them: it
    /// starts claiming ahead, tries claiming in turn (as [`run`](Self::run) does) for a few
    /// windows, keeps the faster, and tries the other again every 60 windows, as conditions
    /// change. A claim ahead that finds nothing (on SQLite's one bucket, or with every key that
    /// has work in flight) switches to claiming in turn at once.
    pub fn run_pipelined(&mut self) -> RelayReport {
        if let Err(error) = self.store.poll_wakeup() {
            log::warn!("listening for outbox notifications failed: {error}");
        }
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let (done_tx, done) = std::sync::mpsc::sync_channel::<JobDone<S::Error>>(1);
        let store = &self.store;
        let config = &self.config;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for job in job_rx {
                    let written = job.write.map(|published| {
                        let result = store.complete(
                            published.token,
                            &published.completions,
                            config.retention,
                        );
                        (published, result)
                    });
                    let (limit, lease, owner) = (config.batch_size, config.lease, &config.owner);
                    let claimed = job.claim.then(|| {
                        if job.ahead {
                            store.claim_ahead(limit, lease, owner)
                        } else {
                            store.claim(limit, lease, owner)
                        }
                    });
                    if done_tx.send(JobDone { written, claimed }).is_err() {
                        return;
                    }
                }
            });
            let mut current: Option<Claimed> = None;
            let mut published: Option<Published> = None;
            let mut idle_wait = config.min_poll_interval;
            let mut announced_idle = false;
            let mut failures = 0;
            let mut pace = Pace::default();
            let mut outage = Outage::default();
            // Set when the broker was unavailable: claim nothing more, and once every batch in
            // hand is written back (handed back), pause this long.
            let mut outage_pause: Option<Duration> = None;
            loop {
                let stopping = self.handle.is_stopped();
                if stopping && current.is_none() && published.is_none() {
                    break;
                }
                if current.is_none() && published.is_none() {
                    if let Some(pause) = outage_pause.take() {
                        self.handle.wait(pause);
                        continue;
                    }
                }
                let publishing = current.is_some();
                // Claiming ahead, every claim leaves a share of the free buckets for the next
                // one; claiming in turn, a claim waits until this batch is written back.
                let ahead = pace.ahead();
                let job = Job {
                    write: published.take(),
                    claim: !stopping && outage_pause.is_none() && (ahead || !publishing),
                    ahead,
                };
                let writes = job.write.is_some();
                let has_work = job.claim || writes;
                if has_work && jobs.send(job).is_err() {
                    log::error!("the relay's database thread is gone; stopping");
                    break;
                }
                // Publish the batch in hand while the database thread works.
                if let Some(claimed) = current.take() {
                    let started = Instant::now();
                    let mut report = claim_report(&claimed);
                    let (completions, unavailable) = publish_claimed(
                        &mut self.publisher,
                        config,
                        &mut self.rng,
                        &self.handle,
                        &claimed,
                        &mut report,
                    );
                    if let Some(pause) = outage.after(&report, unavailable, config, &mut self.rng) {
                        outage_pause = Some(pause);
                        pace.interrupted();
                    }
                    pace.published(claimed.messages.len(), Instant::now());
                    published = Some(Published {
                        token: claimed.token,
                        completions,
                        report,
                        started,
                    });
                }
                if !has_work {
                    // Claiming in turn: the batch just published is written back next round.
                    continue;
                }
                let Ok(JobDone { written, claimed }) = done.recv() else {
                    log::error!("the relay's database thread is gone; stopping");
                    break;
                };
                if let Some(Ok(claimed)) = &claimed {
                    if ahead && publishing && claimed.messages.is_empty() {
                        pace.found_nothing_ahead();
                    }
                }
                let mut failed = None;
                if let Some((mut batch, result)) = written {
                    match result {
                        Ok(written) => {
                            record_round(
                                config,
                                &mut self.totals,
                                &mut batch.report,
                                (batch.token, &batch.completions),
                                written,
                                batch.started.elapsed(),
                            );
                            self.hooks.on_batch(&batch.report, batch.started.elapsed());
                        }
                        // The leases expire and the batch is published again: never lost.
                        Err(error) => failed = Some(error),
                    }
                }
                match claimed {
                    Some(Ok(claimed)) if !claimed.messages.is_empty() => {
                        if announced_idle {
                            announce_idle(store, false);
                            announced_idle = false;
                        }
                        idle_wait = config.min_poll_interval;
                        current = Some(claimed);
                    }
                    Some(Ok(_)) if published.is_some() => {
                        // Maybe all the work is in the batch just published: claim again once
                        // it is written back.
                    }
                    Some(Ok(_)) if !announced_idle => {
                        pace.interrupted();
                        // Ask writers for wake-ups, then look once more (see `run`).
                        announce_idle(store, true);
                        announced_idle = true;
                    }
                    Some(Ok(_)) => {
                        self.hooks.on_idle();
                        wait_idle(store, &self.handle, config, idle_wait);
                        idle_wait = (idle_wait * 2).min(config.poll_interval);
                    }
                    Some(Err(error)) => failed = failed.or(Some(error)),
                    None => {}
                }
                if let Some(error) = failed {
                    pace.interrupted();
                    failures += 1;
                    let delay = pause(config, failures, &mut self.rng);
                    log::warn!("relay round failed (retrying in {delay:?}): {error}");
                    self.hooks.on_store_error(&error);
                    self.handle.wait(delay);
                } else {
                    failures = 0;
                }
                purge_if_due(store, &self.handle, config, &mut self.last_purge);
            }
            // Dropping the job sender ends the database thread.
            drop(jobs);
            if announced_idle {
                announce_idle(store, false);
            }
        });
        if let Err(error) = self.store.retire(&self.config.owner) {
            log::warn!("telling other relays that this one stopped failed: {error}");
        }
        log::info!("relay {} stopped: {:?}", self.config.owner, self.totals);
        self.totals
    }
}

/// How long a running relay pauses after its `failures`-th failed round in a row (database
/// failure or broker outage): the retry backoff, capped so that a recovery is noticed soon.
fn pause(config: &RelayConfig, failures: u32, rng: &mut SmallRng) -> Duration {
    config
        .backoff
        .delay(failures, rng)
        .min(config.poll_interval.max(Duration::from_secs(1)) * 5)
}

/// A broker outage as a running relay sees it: the rounds in a row that found the broker
/// unavailable. It says how long to pause after each, logs its start once and its end.
#[derive(Debug, Default)]
struct Outage {
    /// Rounds in a row that found the broker unavailable; 0 while it is reachable.
    rounds: u32,
    /// When the current outage was first seen.
    since: Option<Instant>,
}

impl Outage {
    /// Takes in a round's report (and why the broker was unavailable, if it was); returns how
    /// long to pause before the next round. A round that claimed messages and found the broker
    /// reachable ends the outage; an empty round says nothing about the broker.
    fn after(
        &mut self,
        report: &RelayReport,
        unavailable: Option<String>,
        config: &RelayConfig,
        rng: &mut SmallRng,
    ) -> Option<Duration> {
        if report.unavailable == 0 {
            if report.claimed > 0 && self.rounds > 0 {
                log::info!(
                    "broker available again after {:?} ({} rounds found it unavailable)",
                    self.since.map(|at| at.elapsed()).unwrap_or_default(),
                    self.rounds
                );
                *self = Self::default();
            }
            return None;
        }
        self.rounds = self.rounds.saturating_add(1);
        let delay = pause(config, self.rounds, rng);
        if self.since.is_none() {
            self.since = Some(Instant::now());
            log::warn!(
                "broker unavailable ({}): messages wait, no attempt counted; retrying in {delay:?}, \
                 then less often until it is back",
                unavailable.as_deref().unwrap_or("no reason given")
            );
        }
        Some(delay)
    }
}

/// A failed announcement only costs wake-up latency (the poll still finds the work).
fn announce_idle<S: OutboxStore>(store: &S, idle: bool) {
    if let Err(error) = store.announce_idle(idle) {
        log::warn!("announcing relay idle={idle} failed: {error}");
    }
}

/// Waits up to `timeout`, ending early on a wake-up from the store or the handle.
fn wait_idle<S: OutboxStore>(
    store: &S,
    handle: &StopHandle,
    config: &RelayConfig,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match store.poll_wakeup() {
            Ok(true) => return,
            Ok(false) => {}
            Err(error) => log::warn!("checking for outbox notifications failed: {error}"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || handle.wait(left.min(config.wakeup_check_interval)) {
            return;
        }
    }
}

/// Once per purge interval: the store's maintenance, then, under retention, deletes what is past
/// the window in bounded batches.
fn purge_if_due<S: OutboxStore>(
    store: &S,
    handle: &StopHandle,
    config: &RelayConfig,
    last_purge: &mut Option<Instant>,
) {
    if last_purge.is_some_and(|at| at.elapsed() < config.purge_interval) {
        return;
    }
    *last_purge = Some(Instant::now());
    if let Err(error) = store.maintain() {
        log::warn!("storage maintenance (partitions) failed: {error}");
    }
    let Retention::Keep(window) = config.retention else {
        return;
    };
    let mut purged = 0;
    while !handle.is_stopped() {
        match store.purge_published(window, config.purge_batch_size) {
            Ok(n) => {
                purged += n;
                if n < config.purge_batch_size as u64 {
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

/// The counts a claim starts a round's report with.
fn claim_report(claimed: &Claimed) -> RelayReport {
    if claimed.lease_takeovers > 0 {
        log::warn!(
            "took over {} expired leases of another relay (crashed, paused or too slow)",
            claimed.lease_takeovers
        );
    }
    RelayReport {
        claimed: claimed.messages.len() as u64,
        lease_takeovers: claimed.lease_takeovers,
        ..RelayReport::default()
    }
}

/// Publishes a claimed batch and turns each outcome into the completion to write back, counting
/// the messages the broker was unavailable for into `report`; also returns the first reason it
/// was. A relay told to stop hands the batch back unsent instead.
fn publish_claimed<P: Publisher>(
    publisher: &mut P,
    config: &RelayConfig,
    rng: &mut SmallRng,
    handle: &StopHandle,
    claimed: &Claimed,
    report: &mut RelayReport,
) -> (Vec<Completion>, Option<String>) {
    if handle.is_stopped() {
        let released = claimed
            .messages
            .iter()
            .map(|m| Completion::Release { seq: m.seq })
            .collect();
        return (released, None);
    }
    let started = Instant::now();
    let outcomes = publisher.publish(&claimed.messages);
    if started.elapsed() >= config.lease {
        log::warn!(
            "publishing {} messages took {:?}, longer than the {:?} lease; writes are fenced",
            claimed.messages.len(),
            started.elapsed(),
            config.lease
        );
    }
    if outcomes.len() != claimed.messages.len() {
        log::error!(
            "publisher returned {} outcomes for {} messages; treating the missing ones as failed",
            outcomes.len(),
            claimed.messages.len()
        );
    }
    let mut outcomes = outcomes.into_iter();
    let mut unavailable = None;
    let completions: Vec<Completion> = claimed
        .messages
        .iter()
        .map(|msg| {
            let outcome = outcomes.next().unwrap_or_else(|| {
                Err(PublishError::Retryable(
                    "publisher returned no outcome".into(),
                ))
            });
            if let Err(PublishError::Unavailable(reason)) = &outcome {
                // Not the message's fault: `completion` hands it back as it is, still first in
                // its key; only counted here.
                log::debug!("message {} not sent, broker unavailable: {reason}", msg.id);
                report.unavailable += 1;
                unavailable.get_or_insert_with(|| reason.clone());
            }
            completion(config, rng, msg, outcome)
        })
        .collect();
    crate::metrics::record_ages(&claimed.messages, &completions);
    (completions, unavailable)
}

fn completion(
    config: &RelayConfig,
    rng: &mut SmallRng,
    msg: &OutboxMessage,
    outcome: Result<(), PublishError>,
) -> Completion {
    let seq = msg.seq;
    let attempt = u32::try_from(msg.attempts).unwrap_or(0).saturating_add(1);
    match outcome {
        Ok(()) => Completion::Published { seq },
        Err(PublishError::NotAttempted | PublishError::Unavailable(_)) => {
            Completion::Release { seq }
        }
        Err(PublishError::Fatal(error)) => {
            log::error!("parking message {} after a fatal error: {error}", msg.id);
            Completion::Park { seq, reason: error }
        }
        Err(PublishError::Retryable(error)) if attempt >= config.max_attempts => {
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
            let delay = config.backoff.delay(attempt, rng);
            log::warn!(
                "publishing message {} failed (attempt {attempt}/{}), retrying in {delay:?}: {error}",
                msg.id,
                config.max_attempts
            );
            Completion::Retry { seq, delay, error }
        }
    }
}

/// Counts a written-back round into `report` and the relay's totals, and exports it.
fn record_round(
    config: &RelayConfig,
    totals: &mut RelayReport,
    report: &mut RelayReport,
    (token, completions): (LeaseToken, &[Completion]),
    written: CompleteReport,
    elapsed: Duration,
) {
    for completion in completions {
        match completion {
            Completion::Published { .. } => report.published += 1,
            Completion::Retry { .. } => report.retried += 1,
            Completion::Park { .. } => report.parked += 1,
            Completion::Release { .. } => report.released += 1,
        }
    }
    // Counted apart: releases because the broker was unavailable.
    report.released = report.released.saturating_sub(report.unavailable);
    report.fenced_off = written.refused;
    if written.refused > 0 {
        log::warn!(
            "lease {token} was taken over: {} of {} writes refused by fencing",
            written.refused,
            completions.len()
        );
    }
    log::debug!("relay round: {report:?}");
    crate::metrics::record_round(&config.owner, report, elapsed);
    totals.add(report);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts maintenance and purge calls; has nothing to claim.
    #[derive(Default)]
    struct Upkeep {
        maintained: std::cell::Cell<u32>,
        purged: std::cell::Cell<u32>,
    }

    impl OutboxStore for Upkeep {
        type Error = std::convert::Infallible;
        fn claim(&self, _: usize, _: Duration, _: &str) -> Result<Claimed, Self::Error> {
            Ok(Claimed::new(0, Vec::new()))
        }
        fn complete(
            &self,
            _: LeaseToken,
            _: &[Completion],
            _: Retention,
        ) -> Result<CompleteReport, Self::Error> {
            Ok(CompleteReport::default())
        }
        fn purge_published(&self, _: Duration, _: usize) -> Result<u64, Self::Error> {
            self.purged.set(self.purged.get() + 1);
            Ok(0)
        }
        fn maintain(&self) -> Result<(), Self::Error> {
            self.maintained.set(self.maintained.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn maintenance_runs_once_per_purge_interval_whatever_the_retention() {
        let store = Upkeep::default();
        let handle = StopHandle::default();
        let mut last = None;
        let config = RelayConfig::default().purge_interval(Duration::from_secs(3600));
        purge_if_due(&store, &handle, &config, &mut last);
        purge_if_due(&store, &handle, &config, &mut last);
        assert_eq!((store.maintained.get(), store.purged.get()), (1, 0));
        let keep = config.retention(Retention::Keep(Duration::from_secs(60)));
        purge_if_due(&store, &handle, &keep, &mut None);
        assert_eq!((store.maintained.get(), store.purged.get()), (2, 1));
    }

    fn round(claimed: u64, unavailable: u64) -> RelayReport {
        RelayReport {
            claimed,
            unavailable,
            ..RelayReport::default()
        }
    }

    #[test]
    fn an_outage_pauses_longer_each_round_up_to_the_cap_and_ends_on_a_round_that_reached_the_broker(
    ) {
        let config = RelayConfig::default()
            .backoff(Backoff::new(
                Duration::from_millis(100),
                Duration::from_secs(3600),
            ))
            .poll_interval(Duration::from_secs(1));
        let cap = Duration::from_secs(5);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut outage = Outage::default();
        let down = |outage: &mut Outage, rng: &mut SmallRng| {
            outage.after(&round(5, 5), Some("refused".into()), &config, rng)
        };
        assert_eq!(outage.after(&round(0, 0), None, &config, &mut rng), None);

        for rounds in 1..=12_u32 {
            let full = Duration::from_millis(100).saturating_mul(1 << (rounds - 1));
            let pause = down(&mut outage, &mut rng).expect("a pause");
            assert!(
                pause >= (full / 2).min(cap) && pause <= full.min(cap),
                "round {rounds}: {pause:?}"
            );
        }
        assert_eq!(outage.after(&round(0, 0), None, &config, &mut rng), None);
        assert_eq!(
            outage.rounds, 12,
            "an empty round says nothing about the broker"
        );

        assert_eq!(outage.after(&round(3, 0), None, &config, &mut rng), None);
        assert_eq!(
            outage.rounds, 0,
            "a round that reached the broker ends the outage"
        );
        let pause = down(&mut outage, &mut rng).expect("a pause");
        assert!(
            pause <= Duration::from_millis(100),
            "the next outage starts over"
        );
    }
}
