//! PostgreSQL: `INSERT .. ON CONFLICT DO NOTHING` and the row count. A failed statement would
//! abort the caller's transaction, so a duplicate must not be detected by a unique violation.
//!
//! A handled message costs `BEGIN`, the insert (which also returns the purge mark), the
//! handler's statements and `SELECT 1; COMMIT` in one round trip: four plus the handler's, as
//! the hand-written floor.

use chrono::{DateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use waybill_outbox_core::MessageId;

use super::{InboxConnection, Inserted};
use crate::{Error, Result};

mod schema {
    diesel::table! {
        inbox_processed (consumer, dedup_key) {
            consumer -> Text,
            dedup_key -> Text,
            payload_digest -> Nullable<Binary>,
            message_id -> Nullable<Uuid>,
            processed_at -> Timestamptz,
        }
    }

    diesel::table! {
        inbox_purges (consumer) {
            consumer -> Text,
            purged_through -> Timestamptz,
        }
    }

    #[diesel::declare_sql_function]
    extern "SQL" {
        /// The consumer's purge mark, read on a fresh snapshot (migration
        /// `2026-12-05-000010_inbox_purge_mark_function` says why it is `VOLATILE`).
        fn inbox_purged_through(
            consumer: diesel::sql_types::Text,
        ) -> diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>;
    }
}

use schema::inbox_processed as p;
use schema::inbox_purged_through;
use schema::inbox_purges as purges;

#[derive(QueryableByName)]
struct Deleted {
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

impl InboxConnection for PgConnection {
    fn insert_inbox_record(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<bool> {
        // Waits for a concurrent uncommitted insert of the key, then inserts (it rolled back)
        // or skips (it committed).
        let inserted = diesel::insert_into(p::table)
            .values((
                p::consumer.eq(consumer),
                p::dedup_key.eq(key),
                p::message_id.eq(message_id.map(|id| *id.as_uuid())),
                p::payload_digest.eq(payload_digest),
            ))
            .on_conflict_do_nothing()
            .execute(self)?;
        Ok(inserted == 1)
    }

    fn insert_inbox_record_with_mark(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<Option<Inserted>> {
        // One round trip: a row comes back only when inserted, with the mark read by a
        // VOLATILE function after any wait on a concurrent purge of this key (a subquery here
        // would read the snapshot taken before that wait, and miss the purge's mark).
        let inserted: Option<Option<DateTime<Utc>>> = diesel::insert_into(p::table)
            .values((
                p::consumer.eq(consumer),
                p::dedup_key.eq(key),
                p::message_id.eq(message_id.map(|id| *id.as_uuid())),
                p::payload_digest.eq(payload_digest),
            ))
            .on_conflict_do_nothing()
            .returning(inbox_purged_through(p::consumer))
            .get_result(self)
            .optional()?;
        Ok(inserted.map(|purged_through| Inserted { purged_through }))
    }

    fn inbox_record_digest(&mut self, consumer: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(p::table
            .filter(p::consumer.eq(consumer))
            .filter(p::dedup_key.eq(key))
            .select(p::payload_digest)
            .first::<Option<Vec<u8>>>(self)
            .optional()?
            .flatten())
    }

    fn inbox_record_exists(&mut self, consumer: &str, key: &str) -> Result<bool> {
        Ok(diesel::select(diesel::dsl::exists(
            p::table
                .filter(p::consumer.eq(consumer))
                .filter(p::dedup_key.eq(key)),
        ))
        .get_result(self)?)
    }

    fn count_inbox_records(&mut self, consumer: &str) -> Result<u64> {
        let count: i64 = p::table
            .filter(p::consumer.eq(consumer))
            .count()
            .get_result(self)?;
        Ok(count.unsigned_abs())
    }

    fn delete_inbox_records(
        &mut self,
        consumer: Option<&str>,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<u64> {
        // One statement: the mark is raised from exactly the rows this delete removed.
        let deleted: Deleted = diesel::sql_query(
            "WITH deleted AS (\
               DELETE FROM inbox_processed WHERE (consumer, dedup_key) IN (\
                 SELECT consumer, dedup_key FROM inbox_processed \
                 WHERE processed_at < $1 AND ($2::text IS NULL OR consumer = $2) \
                 ORDER BY processed_at LIMIT $3) \
               RETURNING consumer, processed_at), \
             marked AS (\
               INSERT INTO inbox_purges (consumer, purged_through) \
               SELECT consumer, max(processed_at) FROM deleted GROUP BY consumer \
               ON CONFLICT (consumer) DO UPDATE SET purged_through = \
                 greatest(inbox_purges.purged_through, EXCLUDED.purged_through)) \
             SELECT count(*) AS deleted FROM deleted",
        )
        .bind::<Timestamptz, _>(cutoff)
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .get_result(self)?;
        Ok(deleted.deleted.unsigned_abs())
    }

    fn inbox_purged_through(&mut self, consumer: &str) -> Result<Option<DateTime<Utc>>> {
        // READ COMMITTED: each statement sees the latest committed mark.
        Ok(purges::table
            .filter(purges::consumer.eq(consumer))
            .select(purges::purged_through)
            .first(self)
            .optional()?)
    }

    fn commit_inbox_transaction(&mut self) -> Result<bool> {
        match AnsiTransactionManager::transaction_manager_status_mut(self).transaction_depth()? {
            // Our own transaction. `COMMIT` would turn an aborted one into a silent rollback;
            // `SELECT 1` fails in it instead, and the rest of the string is then not run. One
            // round trip for both; diesel sees the transaction end in the connection's status.
            Some(depth) if depth.get() == 1 => match self.batch_execute("SELECT 1; COMMIT") {
                Ok(()) => Ok(true),
                Err(error) => match AnsiTransactionManager::rollback_transaction(self) {
                    // Still open: `SELECT 1` failed on a live connection, so the transaction
                    // was aborted; rolled back now.
                    Ok(()) => Ok(false),
                    // `COMMIT` itself failed (it ended the transaction), or the connection
                    // broke: the statement's error is the one to report.
                    Err(_) => Err(error.into()),
                },
            },
            // A savepoint in the caller's transaction: releasing it fails when the transaction
            // is aborted, and diesel then rolls back to the savepoint, which leaves the
            // caller's transaction usable. Any other failure is an error of its own (a broken
            // connection, or a rollback to the savepoint that failed as well).
            Some(_) => match AnsiTransactionManager::commit_transaction(self) {
                Ok(()) => Ok(true),
                Err(error @ diesel::result::Error::DatabaseError(..)) => {
                    let error = Error::from(error);
                    if waybill_outbox_core::Retryable::is_retryable(&error) {
                        Err(error)
                    } else {
                        Ok(false)
                    }
                }
                Err(error) => Err(error.into()),
            },
            // The handler ended the transaction with SQL of its own.
            None => Err(diesel::result::Error::NotInTransaction.into()),
        }
    }
}
