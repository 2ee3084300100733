//! The per-backend primitives behind `enqueue`, the relay store and the operator functions.

use std::time::Duration;

use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention,
};

use crate::Result;

/// A diesel connection the outbox can work on: implemented for `PgConnection`,
/// `SqliteConnection`, `MysqlConnection` (each behind its cargo feature) and for r2d2 pooled
/// connections of those.
///
/// These are the building blocks; most code calls [`enqueue`](crate::enqueue), the relay's
/// [`DieselStore`](crate::DieselStore) and the operator functions instead. Every method runs
/// on the connection it is given and never checks out another one.
pub trait OutboxConnection {
    /// Whether the connection is inside a transaction (or savepoint) right now.
    ///
    /// # Errors
    ///
    /// The transaction manager is broken after a failed rollback.
    fn in_transaction(&mut self) -> Result<bool>;

    /// Inserts already validated messages with as few statements as the backend allows. Joins
    /// the caller's transaction if there is one.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateMessageId`](crate::Error::DuplicateMessageId) or database failures.
    fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()>;

    /// Adds `count` (negative to give numbers back) to the sequence counter of `topic` and
    /// `partition_key`, creating it at `count`, and returns its new value with the producer
    /// epoch. The counter row stays locked until the caller's transaction ends, so writers of
    /// one key serialize. See [`crate::sequence`].
    ///
    /// # Errors
    ///
    /// Database failures.
    fn draw_key_sequences(
        &mut self,
        topic: &str,
        partition_key: &str,
        count: i64,
    ) -> Result<crate::sequence::Drawn>;

    /// Draws the next number of a single sequenced `message`'s key and inserts the message
    /// stamped with it, in one statement where the backend can (PostgreSQL: the counter upsert
    /// in a CTE feeding the insert, one round trip). Returns `false`, having done nothing,
    /// where it cannot; the caller then draws and inserts in two steps. Must run inside a
    /// transaction.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateMessageId`](crate::Error::DuplicateMessageId) or database failures.
    fn insert_sequenced_outbox_message(&mut self, _message: &NewOutboxMessage) -> Result<bool> {
        Ok(false)
    }

    /// Replaces the random part of the producer epoch with `epoch`.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn set_sequence_epoch(&mut self, epoch: &str) -> Result<()>;

    /// Runs the embedded outbox and inbox migrations that have not run yet; returns the names
    /// of those it applied (`<version>_<name>`), in order.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`](crate::Error::Migration) when a migration fails.
    fn run_outbox_migrations(&mut self) -> Result<Vec<String>>;

    /// Reverts every embedded migration (runs each `down.sql`), dropping the tables.
    ///
    /// # Errors
    ///
    /// [`Error::Migration`](crate::Error::Migration) when a migration fails.
    fn revert_outbox_migrations(&mut self) -> Result<()>;

    /// Claims up to `limit` due messages for `lease` in its own short transaction (see
    /// [`OutboxStore::claim`](waybill_outbox_core::OutboxStore::claim)). `in_flight` is how many
    /// claimed batches the relay still holds (1 while it publishes one and claims the next): the
    /// claim leaves free buckets for as many more of its own claims.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is claimed then.
    fn claim_outbox_messages(
        &mut self,
        limit: usize,
        lease: Duration,
        owner: &str,
        in_flight: usize,
    ) -> Result<Claimed>;

    /// Writes back completions fenced by `token` in one transaction.
    ///
    /// # Errors
    ///
    /// Database failures; nothing is written then.
    fn complete_outbox_messages(
        &mut self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport>;

    /// Deletes up to `limit` messages published more than `older_than` ago, unless another
    /// purge is running; returns how many were deleted.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn purge_published_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64>;

    /// The relay's storage upkeep, once per purge interval: on PostgreSQL's partitioned layout
    /// (`waybill_diesel::partitions::maintain`) the partitions made ahead and
    /// the old ones rolled off by one relay at a time; elsewhere nothing (the default).
    ///
    /// # Errors
    ///
    /// Database failures.
    fn maintain_outbox(&mut self) -> Result<()> {
        Ok(())
    }

    /// Puts parked messages back to pending with a fresh attempt count: the one with `id`, or
    /// all of `partition_key`, or all parked messages when both are `None`. Returns how many.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn requeue_parked_messages(
        &mut self,
        id: Option<MessageId>,
        partition_key: Option<&str>,
    ) -> Result<u64>;

    /// The stored message with `id`, whatever its status.
    ///
    /// # Errors
    ///
    /// Database failures or a malformed row.
    fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>>;

    /// Pending, parked and published counts and the oldest pending message's enqueue time,
    /// per topic.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn outbox_topic_stats(&mut self) -> Result<Vec<crate::TopicStats>>;

    /// Whether a relay's store keeps one connection of its pool listening for enqueue
    /// notifications on this backend (PostgreSQL's `LISTEN`), so the pool must hold one more.
    fn keeps_a_listening_connection() -> bool
    where
        Self: Sized,
    {
        false
    }

    /// Starts listening for enqueue notifications; `false` where the backend has none.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn listen_for_outbox(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Tells writers whether a relay waits idle, so they send wake-ups only then; a no-op where
    /// the backend has no notifications.
    ///
    /// # Errors
    ///
    /// Database failures.
    fn announce_outbox_idle(&mut self, _idle: bool) -> Result<()> {
        Ok(())
    }

    /// Forgets the relay named `owner`, which stopped, so the others' claims take its share of
    /// the buckets at once; a no-op where all relays share one bucket (SQLite).
    ///
    /// # Errors
    ///
    /// Database failures.
    fn retire_outbox_relay(&mut self, _owner: &str) -> Result<()> {
        Ok(())
    }

    /// Whether a notification arrived since the last call; never blocks.
    ///
    /// # Errors
    ///
    /// Database failures (a lost connection).
    fn outbox_notified(&mut self) -> Result<bool> {
        Ok(false)
    }
}

mod pooled {
    use diesel::r2d2::{ConnectionManager, PooledConnection, R2D2Connection};

    use super::*;

    impl<C> OutboxConnection for PooledConnection<ConnectionManager<C>>
    where
        C: OutboxConnection + R2D2Connection + 'static,
    {
        fn in_transaction(&mut self) -> Result<bool> {
            (**self).in_transaction()
        }
        fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()> {
            (**self).insert_outbox_messages(messages)
        }
        fn draw_key_sequences(
            &mut self,
            topic: &str,
            partition_key: &str,
            count: i64,
        ) -> Result<crate::sequence::Drawn> {
            (**self).draw_key_sequences(topic, partition_key, count)
        }
        fn set_sequence_epoch(&mut self, epoch: &str) -> Result<()> {
            (**self).set_sequence_epoch(epoch)
        }
        fn insert_sequenced_outbox_message(&mut self, message: &NewOutboxMessage) -> Result<bool> {
            (**self).insert_sequenced_outbox_message(message)
        }
        fn run_outbox_migrations(&mut self) -> Result<Vec<String>> {
            (**self).run_outbox_migrations()
        }
        fn revert_outbox_migrations(&mut self) -> Result<()> {
            (**self).revert_outbox_migrations()
        }
        fn claim_outbox_messages(
            &mut self,
            limit: usize,
            lease: Duration,
            owner: &str,
            in_flight: usize,
        ) -> Result<Claimed> {
            (**self).claim_outbox_messages(limit, lease, owner, in_flight)
        }
        fn complete_outbox_messages(
            &mut self,
            token: LeaseToken,
            completions: &[Completion],
            retention: Retention,
        ) -> Result<CompleteReport> {
            (**self).complete_outbox_messages(token, completions, retention)
        }
        fn purge_published_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
            (**self).purge_published_messages(older_than, limit)
        }
        fn maintain_outbox(&mut self) -> Result<()> {
            (**self).maintain_outbox()
        }
        fn requeue_parked_messages(
            &mut self,
            id: Option<MessageId>,
            partition_key: Option<&str>,
        ) -> Result<u64> {
            (**self).requeue_parked_messages(id, partition_key)
        }
        fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>> {
            (**self).find_outbox_message(id)
        }
        fn outbox_topic_stats(&mut self) -> Result<Vec<crate::TopicStats>> {
            (**self).outbox_topic_stats()
        }
        fn keeps_a_listening_connection() -> bool {
            C::keeps_a_listening_connection()
        }
        fn listen_for_outbox(&mut self) -> Result<bool> {
            (**self).listen_for_outbox()
        }
        fn outbox_notified(&mut self) -> Result<bool> {
            (**self).outbox_notified()
        }
        fn announce_outbox_idle(&mut self, idle: bool) -> Result<()> {
            (**self).announce_outbox_idle(idle)
        }
        fn retire_outbox_relay(&mut self, owner: &str) -> Result<()> {
            (**self).retire_outbox_relay(owner)
        }
    }
}
