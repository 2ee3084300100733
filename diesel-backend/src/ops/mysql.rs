//! MySQL/MariaDB statements of the operator functions; times are `DATETIME(6)` in UTC.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Datetime, Integer, Nullable, Text};

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
    #[diesel(sql_type = Datetime)]
    created_at: NaiveDateTime,
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    messages: i64,
    #[diesel(sql_type = Datetime)]
    until: NaiveDateTime,
}

#[derive(QueryableByName)]
struct InboxRow {
    #[diesel(sql_type = BigInt)]
    processed: i64,
    #[diesel(sql_type = Nullable<Datetime>)]
    oldest: Option<NaiveDateTime>,
    #[diesel(sql_type = Nullable<Datetime>)]
    newest: Option<NaiveDateTime>,
}

#[derive(QueryableByName)]
struct NowRow {
    #[diesel(sql_type = Datetime)]
    now: NaiveDateTime,
}

impl OpsConnection for MysqlConnection {
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
                    created_at: r.created_at.and_utc(),
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
        self.transaction::<_, Error, _>(|conn| {
            let status: Option<StatusRow> =
                diesel::sql_query("SELECT status FROM outbox_messages WHERE id = ? FOR UPDATE")
                    .bind::<Binary, _>(&bytes)
                    .get_result(conn)
                    .optional()?;
            check_parked(id, status.map(|s| s.status))?;
            diesel::sql_query(format!(
                "INSERT INTO outbox_skipped ({SKIPPED_COLUMNS}, reason, skipped_by) \
                 SELECT {SKIPPED_COLUMNS}, ?, ? FROM outbox_messages WHERE id = ?"
            ))
            .bind::<Text, _>(reason)
            .bind::<Text, _>(by)
            .bind::<Binary, _>(&bytes)
            .execute(conn)?;
            match marker {
                Some(headers) => {
                    diesel::sql_query(
                        "UPDATE outbox_messages SET status = 0, attempts = 0, last_error = NULL, \
                           message_type = ?, content_type = 'application/octet-stream', \
                           payload = X'', headers = ?, available_at = UTC_TIMESTAMP(6) \
                         WHERE id = ?",
                    )
                    .bind::<Text, _>(MARKER_TYPE)
                    .bind::<Text, _>(headers)
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
            "DELETE FROM outbox_skipped \
             WHERE skipped_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND \
             ORDER BY skipped_at LIMIT ?",
        )
        .bind::<BigInt, _>(micros(older_than))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self)?;
        Ok(deleted as u64)
    }

    fn outbox_relay_leases(&mut self) -> Result<Vec<RelayLease>> {
        let rows: Vec<LeaseRow> = diesel::sql_query(
            "SELECT m.topic, l.owner, CAST(COUNT(*) AS SIGNED) AS messages, \
               MAX(l.expires_at) AS until \
             FROM outbox_messages m JOIN outbox_relay_leases l ON l.bucket = m.bucket \
             WHERE m.status = 0 AND l.owner IS NOT NULL AND l.expires_at > UTC_TIMESTAMP(6) \
             GROUP BY m.topic, l.owner ORDER BY m.topic, l.owner",
        )
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| RelayLease {
                topic: r.topic,
                owner: r.owner,
                messages: r.messages,
                until: r.until.and_utc(),
            })
            .collect())
    }

    fn inbox_consumer_stats(&mut self, consumer: &str) -> Result<InboxStats> {
        let row: InboxRow = diesel::sql_query(
            "SELECT CAST(COUNT(*) AS SIGNED) AS processed, MIN(processed_at) AS oldest, \
               MAX(processed_at) AS newest FROM inbox_processed WHERE consumer = ?",
        )
        .bind::<Text, _>(consumer)
        .get_result(self)?;
        Ok(InboxStats {
            consumer: consumer.to_owned(),
            processed: row.processed,
            oldest: row.oldest.map(|t| t.and_utc()),
            newest: row.newest.map(|t| t.and_utc()),
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
        let row: NowRow = diesel::sql_query("SELECT UTC_TIMESTAMP(6) AS now").get_result(self)?;
        Ok(row.now.and_utc())
    }
}

const MARKER_TYPE: &str = waybill_outbox_core::sequence::SKIP_MARKER_TYPE;
