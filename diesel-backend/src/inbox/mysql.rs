//! MySQL / MariaDB: a plain insert whose unique violation means "duplicate". Diesel emulates
//! `ON CONFLICT DO NOTHING` with `INSERT IGNORE`-like SQL that reports one row either way
//! (the connection uses `CLIENT_FOUND_ROWS`), so the row count cannot tell. InnoDB rolls back
//! only the failed statement, so the caller's transaction stays usable.

use chrono::{DateTime, Utc};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Datetime, Nullable, Text};
use waybill_outbox_core::MessageId;

use super::InboxConnection;
use crate::Result;

mod schema {
    diesel::table! {
        inbox_processed (consumer, dedup_key) {
            consumer -> Varchar,
            dedup_key -> Varchar,
            payload_digest -> Nullable<Binary>,
            message_id -> Nullable<Binary>,
            processed_at -> Datetime,
        }
    }
}

use schema::inbox_processed as p;

impl InboxConnection for MysqlConnection {
    fn insert_inbox_record(
        &mut self,
        consumer: &str,
        key: &str,
        message_id: Option<MessageId>,
        payload_digest: Option<&[u8]>,
    ) -> Result<bool> {
        // Waits for a concurrent uncommitted insert of the key, then inserts (it rolled back)
        // or fails with a duplicate key (it committed). `processed_at` takes the column
        // default: the database clock.
        let inserted = diesel::insert_into(p::table)
            .values((
                p::consumer.eq(consumer),
                p::dedup_key.eq(key),
                p::message_id.eq(message_id.map(|id| id.as_bytes().to_vec())),
                p::payload_digest.eq(payload_digest),
            ))
            .execute(self);
        match inserted {
            Ok(_) => Ok(true),
            Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => Ok(false),
            Err(error) => Err(error.into()),
        }
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
            "DELETE FROM inbox_processed \
             WHERE processed_at < ? AND (? IS NULL OR consumer = ?) \
             ORDER BY processed_at LIMIT ?",
        )
        .bind::<Datetime, _>(cutoff.naive_utc())
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self)?;
        Ok(deleted as u64)
    }
}
