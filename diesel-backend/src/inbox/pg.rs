//! PostgreSQL: `INSERT .. ON CONFLICT DO NOTHING` and the row count. A failed statement would
//! abort the caller's transaction, so a duplicate must not be detected by a unique violation.

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use waybill_outbox_core::MessageId;

use super::InboxConnection;
use crate::Result;

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
}

use schema::inbox_processed as p;

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
        let deleted = diesel::sql_query(
            "DELETE FROM inbox_processed WHERE (consumer, dedup_key) IN (\
               SELECT consumer, dedup_key FROM inbox_processed \
               WHERE processed_at < $1 AND ($2::text IS NULL OR consumer = $2) \
               ORDER BY processed_at LIMIT $3)",
        )
        .bind::<Timestamptz, _>(cutoff)
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self)?;
        Ok(deleted as u64)
    }
}
