//! MySQL / MariaDB: a plain insert whose unique violation means "duplicate". Diesel emulates
//! `ON CONFLICT DO NOTHING` with `INSERT IGNORE`-like SQL that reports one row either way
//! (the connection uses `CLIENT_FOUND_ROWS`), so the row count cannot tell. InnoDB rolls back
//! only the failed statement, so the caller's transaction stays usable.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::mysql::{Mysql, MysqlConnection};
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

#[derive(QueryableByName)]
struct Oldest {
    #[diesel(sql_type = Text)]
    consumer: String,
    #[diesel(sql_type = Text)]
    dedup_key: String,
    #[diesel(sql_type = Datetime)]
    processed_at: NaiveDateTime,
}

#[derive(QueryableByName)]
struct PurgeMark {
    #[diesel(sql_type = Datetime)]
    purged_through: NaiveDateTime,
}

/// Records deleted per `DELETE` statement: two bound values each, far below the limit.
const DELETE_CHUNK: usize = 1_000;

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
        // MySQL has no `DELETE .. RETURNING`: a locking read picks and locks the oldest
        // records (the latest committed ones, whatever the transaction's snapshot), so the
        // mark is raised from exactly the rows deleted.
        self.transaction(|conn| {
            let rows: Vec<Oldest> = diesel::sql_query(
                "SELECT consumer, dedup_key, processed_at FROM inbox_processed \
                 WHERE processed_at < ? AND (? IS NULL OR consumer = ?) \
                 ORDER BY processed_at LIMIT ? FOR UPDATE",
            )
            .bind::<Datetime, _>(cutoff.naive_utc())
            .bind::<Nullable<Text>, _>(consumer)
            .bind::<Nullable<Text>, _>(consumer)
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .load(conn)?;
            let mut deleted = 0;
            for chunk in rows.chunks(DELETE_CHUNK) {
                let keys = vec!["(consumer = ? AND dedup_key = ?)"; chunk.len()].join(" OR ");
                let mut delete =
                    diesel::sql_query(format!("DELETE FROM inbox_processed WHERE {keys}"))
                        .into_boxed::<Mysql>();
                for row in chunk {
                    delete = delete
                        .bind::<Text, _>(&row.consumer)
                        .bind::<Text, _>(&row.dedup_key);
                }
                deleted += delete.execute(conn)? as u64;
            }
            let mut newest = BTreeMap::<&str, NaiveDateTime>::new();
            for row in &rows {
                let through = newest.entry(&row.consumer).or_insert(row.processed_at);
                *through = (*through).max(row.processed_at);
            }
            for (consumer, through) in newest {
                diesel::sql_query(
                    "INSERT INTO inbox_purges (consumer, purged_through) VALUES (?, ?) \
                     ON DUPLICATE KEY UPDATE \
                       purged_through = GREATEST(purged_through, VALUES(purged_through))",
                )
                .bind::<Text, _>(consumer)
                .bind::<Datetime, _>(through)
                .execute(conn)?;
            }
            Ok(deleted)
        })
    }

    fn inbox_purged_through(&mut self, consumer: &str) -> Result<Option<DateTime<Utc>>> {
        // A locking read sees the latest committed mark; a plain one would see the snapshot
        // of a `REPEATABLE READ` transaction that began before the purge committed.
        // (`LOCK IN SHARE MODE`: MariaDB has no `FOR SHARE`.)
        let through: Option<PurgeMark> = diesel::sql_query(
            "SELECT purged_through FROM inbox_purges WHERE consumer = ? LOCK IN SHARE MODE",
        )
        .bind::<Text, _>(consumer)
        .get_result(self)
        .optional()?;
        Ok(through.map(|mark| mark.purged_through.and_utc()))
    }
}
