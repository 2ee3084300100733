//! SQLite: `INSERT .. ON CONFLICT DO NOTHING` and the row count. One writer at a time: a
//! concurrent delivery waits for the write lock (the busy timeout), then sees the record.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use waybill_outbox_core::MessageId;

use super::InboxConnection;
use crate::Result;

mod schema {
    diesel::table! {
        inbox_processed (consumer, dedup_key) {
            consumer -> Text,
            dedup_key -> Text,
            payload_digest -> Nullable<Binary>,
            message_id -> Nullable<Binary>,
            processed_at -> BigInt,
        }
    }

    diesel::table! {
        inbox_purges (consumer) {
            consumer -> Text,
            purged_through -> BigInt,
        }
    }
}

use schema::inbox_processed as p;
use schema::inbox_purges as purges;

#[derive(QueryableByName)]
struct Deleted {
    #[diesel(sql_type = Text)]
    consumer: String,
    #[diesel(sql_type = BigInt)]
    processed_at: i64,
}

impl InboxConnection for SqliteConnection {
    fn insert_inbox_record(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<bool> {
        let inserted = diesel::insert_into(p::table)
            .values((
                p::consumer.eq(consumer),
                p::dedup_key.eq(key),
                p::message_id.eq(message_id.map(|id| id.as_bytes().to_vec())),
                p::payload_digest.eq(payload_digest),
                p::processed_at.eq(Utc::now().timestamp_micros()),
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
        self.transaction(|conn| {
            let deleted: Vec<Deleted> = diesel::sql_query(
                "DELETE FROM inbox_processed WHERE rowid IN (\
                   SELECT rowid FROM inbox_processed \
                   WHERE processed_at < ? AND (? IS NULL OR consumer = ?) \
                   ORDER BY processed_at LIMIT ?) \
                 RETURNING consumer, processed_at",
            )
            .bind::<BigInt, _>(cutoff.timestamp_micros())
            .bind::<Nullable<Text>, _>(consumer)
            .bind::<Nullable<Text>, _>(consumer)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)?;
            let mut newest = BTreeMap::<&str, i64>::new();
            for row in &deleted {
                let through = newest.entry(&row.consumer).or_insert(row.processed_at);
                *through = (*through).max(row.processed_at);
            }
            for (consumer, through) in newest {
                diesel::sql_query(
                    "INSERT INTO inbox_purges (consumer, purged_through) VALUES (?, ?) \
                     ON CONFLICT (consumer) DO UPDATE SET \
                       purged_through = max(purged_through, excluded.purged_through)",
                )
                .bind::<Text, _>(consumer)
                .bind::<BigInt, _>(through)
                .execute(conn)?;
            }
            Ok(deleted.len() as u64)
        })
    }

    fn inbox_purged_through(&mut self, consumer: &str) -> Result<Option<DateTime<Utc>>> {
        let through: Option<i64> = purges::table
            .filter(purges::consumer.eq(consumer))
            .select(purges::purged_through)
            .first(self)
            .optional()?;
        // A mark beyond chrono's range is as far as it goes: later than any message.
        Ok(through.map(|micros| {
            DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
        }))
    }
}
