//! SQLite statements of the operator functions; times are integer microseconds by the process
//! clock, like the outbox's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};
use diesel::sqlite::SqliteConnection;

use super::{
    check_parked, InboxStats, OpsConnection, ParkedMessage, RelayLease, StatusRow, SKIPPED_COLUMNS,
};
use crate::common::{id_from_bytes, micros};
use crate::{Error, Result};

#[derive(QueryableByName)]
struct ParkedRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Binary)]
    id: Vec<u8>,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = Text)]
    message_type: String,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = BigInt)]
    created_at: i64,
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    messages: i64,
    #[diesel(sql_type = BigInt)]
    until: i64,
}

#[derive(QueryableByName)]
struct InboxRow {
    #[diesel(sql_type = BigInt)]
    processed: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    oldest: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    newest: Option<i64>,
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::UNIX_EPOCH)
}

fn now() -> i64 {
    Utc::now().timestamp_micros()
}

impl OpsConnection for SqliteConnection {
    fn parked_outbox_messages(&mut self, limit: usize) -> Result<Vec<ParkedMessage>> {
        let rows: Vec<ParkedRow> = diesel::sql_query(
            "SELECT seq, id, topic, partition_key, message_type, attempts, last_error, created_at \
             FROM outbox_messages WHERE status = 2 ORDER BY seq LIMIT ?",
        )
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load(self)?;
        rows.into_iter()
            .map(|r| {
                Ok(ParkedMessage {
                    id: id_from_bytes(&r.id)
                        .map_err(|reason| Error::MalformedRow { seq: r.seq, reason })?,
                    topic: r.topic,
                    partition_key: r.partition_key,
                    message_type: r.message_type,
                    attempts: r.attempts,
                    last_error: r.last_error,
                    created_at: time(r.created_at),
                })
            })
            .collect()
    }

    fn skip_parked_message(
        &mut self,
        id: waybill_outbox_core::MessageId,
        reason: &str,
        by: &str,
        marker: Option<&str>,
    ) -> Result<()> {
        let bytes = id.as_bytes().to_vec();
        self.immediate_transaction::<_, Error, _>(|conn| {
            let status: Option<StatusRow> =
                diesel::sql_query("SELECT status FROM outbox_messages WHERE id = ?")
                    .bind::<Binary, _>(&bytes)
                    .get_result(conn)
                    .optional()?;
            check_parked(id, status.map(|s| s.status))?;
            diesel::sql_query(format!(
                "INSERT INTO outbox_skipped ({SKIPPED_COLUMNS}, reason, skipped_by, skipped_at) \
                 SELECT {SKIPPED_COLUMNS}, ?, ?, ? FROM outbox_messages WHERE id = ?"
            ))
            .bind::<Text, _>(reason)
            .bind::<Text, _>(by)
            .bind::<BigInt, _>(now())
            .bind::<Binary, _>(&bytes)
            .execute(conn)?;
            match marker {
                Some(headers) => {
                    diesel::sql_query(
                        "UPDATE outbox_messages SET status = 0, attempts = 0, last_error = NULL, \
                           message_type = ?, content_type = 'application/octet-stream', \
                           payload = X'', headers = ?, available_at = ? \
                         WHERE id = ?",
                    )
                    .bind::<Text, _>(MARKER_TYPE)
                    .bind::<Text, _>(headers)
                    .bind::<BigInt, _>(now())
                    .bind::<Binary, _>(&bytes)
                    .execute(conn)?;
                }
                None => {
                    diesel::sql_query("DELETE FROM outbox_messages WHERE id = ?")
                        .bind::<Binary, _>(&bytes)
                        .execute(conn)?;
                }
            }
            Ok(())
        })
    }

    fn purge_skipped_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
        let deleted = diesel::sql_query(
            "DELETE FROM outbox_skipped WHERE rowid IN (\
               SELECT rowid FROM outbox_skipped WHERE skipped_at < ? \
               ORDER BY skipped_at LIMIT ?)",
        )
        .bind::<BigInt, _>(now().saturating_sub(micros(older_than)))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self)?;
        Ok(deleted as u64)
    }

    fn outbox_relay_leases(&mut self) -> Result<Vec<RelayLease>> {
        // One writer, one bucket (0): the lease covers the whole outbox.
        let rows: Vec<LeaseRow> = diesel::sql_query(
            "SELECT m.topic, l.owner, count(*) AS messages, max(l.expires_at) AS until \
             FROM outbox_messages m JOIN outbox_relay_leases l ON l.bucket = 0 \
             WHERE m.status = 0 AND l.owner IS NOT NULL AND l.expires_at > ? \
             GROUP BY m.topic, l.owner ORDER BY m.topic, l.owner",
        )
        .bind::<BigInt, _>(now())
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| RelayLease {
                topic: r.topic,
                owner: r.owner,
                messages: r.messages,
                until: time(r.until),
            })
            .collect())
    }

    fn inbox_consumer_stats(&mut self, consumer: &str) -> Result<InboxStats> {
        let row: InboxRow = diesel::sql_query(
            "SELECT count(*) AS processed, min(processed_at) AS oldest, \
               max(processed_at) AS newest FROM inbox_processed WHERE consumer = ?",
        )
        .bind::<Text, _>(consumer)
        .get_result(self)?;
        Ok(InboxStats {
            consumer: consumer.to_owned(),
            processed: row.processed,
            oldest: row.oldest.map(time),
            newest: row.newest.map(time),
        })
    }

    fn inbox_consumer_names(&mut self) -> Result<Vec<String>> {
        let mut names = std::collections::BTreeSet::new();
        for query in super::CONSUMER_NAMES {
            let rows: Vec<super::ConsumerRow> = diesel::sql_query(query).load(self)?;
            names.extend(rows.into_iter().map(String::from));
        }
        Ok(names.into_iter().collect())
    }

    fn outbox_clock(&mut self) -> Result<DateTime<Utc>> {
        Ok(time(now()))
    }
}

const MARKER_TYPE: &str = waybill_outbox_core::sequence::SKIP_MARKER_TYPE;
