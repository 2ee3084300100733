//! What the relay needs from a database: the seam between relay logic and SQL.

use std::time::Duration;

use crate::{OutboxMessage, Retryable};

/// A fencing token: every claim gets one that was never handed out before, not even to a claim
/// that a database crash lost. Writes about a claimed message carry the token and are refused
/// once another claim has taken the message over.
pub type LeaseToken = i64;

/// Messages claimed by one relay for one lease.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claimed {
    /// The fencing token of this claim (unused by an empty claim, which leases nothing).
    pub token: LeaseToken,
    /// The claimed messages, in outbox order.
    pub messages: Vec<OutboxMessage>,
    /// Leases this claim took over from a relay that let them expire without completing
    /// (crashed, paused or too slow): that relay's late writes will be refused.
    pub lease_takeovers: u64,
}

impl Claimed {
    /// A claim of `messages` under `token`.
    pub fn new(token: LeaseToken, messages: Vec<OutboxMessage>) -> Self {
        Self {
            token,
            messages,
            lease_takeovers: 0,
        }
    }

    /// Records that the claim took over `count` expired leases.
    #[must_use]
    pub fn with_lease_takeovers(mut self, count: u64) -> Self {
        self.lease_takeovers = count;
        self
    }
}

/// What became of one claimed message, to be written back under the claim's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The broker confirmed it.
    Published {
        /// The message's `seq`.
        seq: i64,
    },
    /// It failed and will be tried again after `delay`; the attempt is counted.
    Retry {
        /// The message's `seq`.
        seq: i64,
        /// The backoff before the next attempt.
        delay: Duration,
        /// The error, stored in `last_error`.
        error: String,
    },
    /// Given up on: it waits for an operator, and its key waits behind it.
    Park {
        /// The message's `seq`.
        seq: i64,
        /// Why, stored in `last_error`.
        reason: String,
    },
    /// Not sent (shutdown, the broker unavailable, or an earlier message of its key failed):
    /// available again at once, no attempt counted.
    Release {
        /// The message's `seq`.
        seq: i64,
    },
}

/// What to do with published messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Delete each message as soon as it is published: the fastest, and the table stays small.
    Delete,
    /// Keep published messages for this long for audit, then purge them in bounded batches.
    Keep(Duration),
}

/// How many completions were written and how many were refused by fencing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompleteReport {
    /// Completions written.
    pub applied: u64,
    /// Completions refused because another claim took the message over (or it is gone).
    pub refused: u64,
}

impl CompleteReport {
    /// A report of `applied` written and `refused` fenced-off completions.
    pub fn new(applied: u64, refused: u64) -> Self {
        Self { applied, refused }
    }
}

/// The database side of the relay. `waybill-diesel` implements it for PostgreSQL, MySQL /
/// MariaDB and SQLite over an r2d2 pool.
///
/// Implementations must keep these promises, which the relay's guarantees rest on:
/// - `claim` hands out only pending messages whose `available_at` has passed and that no
///   earlier pending-but-unavailable or parked message of the same partition key precedes,
///   in outbox order, possibly several of one key. It leases their keys until `lease` from now
///   under a fresh token (see [`LeaseToken`]), and claims never interleave, so two relays never
///   hold one key at once. An expired lease may be taken over by the next claim.
/// - `complete` writes each completion only while `token` still holds the message's key, then
///   releases the claim's leases.
/// - Neither holds a transaction open across calls.
pub trait OutboxStore {
    /// The store's error.
    type Error: std::error::Error + Retryable + Send + Sync + 'static;

    /// Claims up to `limit` messages for `lease`, recording `owner` for operators.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is claimed then.
    fn claim(&self, limit: usize, lease: Duration, owner: &str) -> Result<Claimed, Self::Error>;

    /// Claims like [`claim`](Self::claim) for a relay that still holds one batch (it publishes
    /// that batch while it claims this one, see [`Relay::run_pipelined`](crate::Relay::run_pipelined)):
    /// the claim takes half of its usual share of the free buckets, so that the claim after it
    /// finds work while this batch's buckets are leased. The default claims as `claim` does.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is claimed then.
    fn claim_ahead(
        &self,
        limit: usize,
        lease: Duration,
        owner: &str,
    ) -> Result<Claimed, Self::Error> {
        self.claim(limit, lease, owner)
    }

    /// Writes back what became of claimed messages, fenced by `token`, in one transaction.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is written then, and the leases expire on their own.
    fn complete(
        &self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport, Self::Error>;

    /// Deletes up to `limit` messages published more than `older_than` ago; returns how many.
    /// Only one caller at a time does work; the others get `Ok(0)`.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn purge_published(&self, older_than: Duration, limit: usize) -> Result<u64, Self::Error>;

    /// Storage upkeep besides the purge, which the relay runs once per purge interval whatever
    /// its retention: on PostgreSQL's partitioned layout, the partitions made ahead and the old
    /// ones rolled off. Only one caller at a time does work. The default does nothing.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn maintain(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Tells writers that a relay is about to wait idle (`true`) or is busy again (`false`), so
    /// they send wake-ups only when someone waits for them. The default does nothing.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn announce_idle(&self, _idle: bool) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Tells the other relays that the relay named `owner` stopped, so their claims take its share
    /// of the outbox at once instead of after a lease period. The default does nothing.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn retire(&self, _owner: &str) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Returns `true` when a writer has signalled new messages since the last call (PostgreSQL
    /// `NOTIFY`). Must not block. The default never signals, leaving the poll to find work.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn poll_wakeup(&self) -> Result<bool, Self::Error> {
        Ok(false)
    }
}

impl<S: OutboxStore + ?Sized> OutboxStore for std::sync::Arc<S> {
    type Error = S::Error;

    fn claim(&self, limit: usize, lease: Duration, owner: &str) -> Result<Claimed, Self::Error> {
        (**self).claim(limit, lease, owner)
    }

    fn claim_ahead(
        &self,
        limit: usize,
        lease: Duration,
        owner: &str,
    ) -> Result<Claimed, Self::Error> {
        (**self).claim_ahead(limit, lease, owner)
    }

    fn complete(
        &self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport, Self::Error> {
        (**self).complete(token, completions, retention)
    }

    fn purge_published(&self, older_than: Duration, limit: usize) -> Result<u64, Self::Error> {
        (**self).purge_published(older_than, limit)
    }

    fn maintain(&self) -> Result<(), Self::Error> {
        (**self).maintain()
    }

    fn announce_idle(&self, idle: bool) -> Result<(), Self::Error> {
        (**self).announce_idle(idle)
    }

    fn retire(&self, owner: &str) -> Result<(), Self::Error> {
        (**self).retire(owner)
    }

    fn poll_wakeup(&self) -> Result<bool, Self::Error> {
        (**self).poll_wakeup()
    }
}
