//! PostgreSQL statements of the operator functions.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};

use super::{
    check_parked, InboxStats, OpsConnection, ParkedMessage, RelayLease, StatusRow, SKIPPED_COLUMNS,
};
use crate::common::micros;
use crate::{Error, Result};

#[derive(QueryableByName)]
struct ParkedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: uuid::Uuid,
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
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct LeaseRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    messages: i64,
    #[diesel(sql_type = Timestamptz)]
    until: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct InboxRow {
    #[diesel(sql_type = BigInt)]
    processed: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    newest: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct NowRow {
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

impl OpsConnection for PgConnection {
    fn parked_outbox_messages(&mut self, limit: usize) -> Result<Vec<ParkedMessage>> {
        let rows: Vec<ParkedRow> = diesel::sql_query(
            "SELECT id, topic, partition_key, message_type, attempts, last_error, created_at \
             FROM outbox_messages WHERE status = 2 ORDER BY seq LIMIT $1",
        )
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| ParkedMessage {
                id: r.id.into(),
                topic: r.topic,
                partition_key: r.partition_key,
                message_type: r.message_type,
                attempts: r.attempts,
                last_error: r.last_error,
                created_at: r.created_at,
            })
            .collect())
    }

    fn skip_parked_message(
        &mut self,
        id: waybill_outbox_core::MessageId,
        reason: &str,
        by: &str,
        marker: Option<&str>,
    ) -> Result<()> {
        let uuid = *id.as_uuid();
        self.transaction::<_, Error, _>(|conn| {
            let status: Option<StatusRow> =
                diesel::sql_query("SELECT status FROM outbox_messages WHERE id = $1 FOR UPDATE")
                    .bind::<diesel::sql_types::Uuid, _>(uuid)
                    .get_result(conn)
                    .optional()?;
            check_parked(id, status.map(|s| s.status))?;
            diesel::sql_query(format!(
                "INSERT INTO outbox_skipped ({SKIPPED_COLUMNS}, reason, skipped_by) \
                 SELECT {SKIPPED_COLUMNS}, $2, $3 FROM outbox_messages WHERE id = $1"
            ))
            .bind::<diesel::sql_types::Uuid, _>(uuid)
            .bind::<Text, _>(reason)
            .bind::<Text, _>(by)
            .execute(conn)?;
            match marker {
                Some(headers) => {
                    diesel::sql_query(
                        "UPDATE outbox_messages SET status = 0, attempts = 0, last_error = NULL, \
                           message_type = $2, content_type = 'application/octet-stream', \
                           payload = ''::bytea, headers = $3::jsonb, available_at = now() \
                         WHERE id = $1",
                    )
                    .bind::<diesel::sql_types::Uuid, _>(uuid)
                    .bind::<Text, _>(MARKER_TYPE)
                    .bind::<Text, _>(headers)
                    .execute(conn)?;
                }
                None => {
                    diesel::sql_query("DELETE FROM outbox_messages WHERE id = $1")
                        .bind::<diesel::sql_types::Uuid, _>(uuid)
                        .execute(conn)?;
                }
            }
            Ok(())
        })
    }

    fn purge_skipped_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
        let deleted = diesel::sql_query(
            "DELETE FROM outbox_skipped WHERE id IN (\
               SELECT id FROM outbox_skipped \
               WHERE skipped_at < statement_timestamp() - $1 * interval '1 microsecond' \
               ORDER BY skipped_at LIMIT $2)",
        )
        .bind::<BigInt, _>(micros(older_than))
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(self)?;
        Ok(deleted as u64)
    }

    fn outbox_relay_leases(&mut self) -> Result<Vec<RelayLease>> {
        let rows: Vec<LeaseRow> = diesel::sql_query(
            "SELECT m.topic, l.owner, count(*) AS messages, max(l.expires_at) AS until \
             FROM outbox_messages m JOIN outbox_relay_leases l ON l.bucket = m.bucket \
             WHERE m.status = 0 AND l.owner IS NOT NULL AND l.expires_at > statement_timestamp() \
             GROUP BY m.topic, l.owner ORDER BY m.topic, l.owner",
        )
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| RelayLease {
                topic: r.topic,
                owner: r.owner,
                messages: r.messages,
                until: r.until,
            })
            .collect())
    }

    fn inbox_consumer_stats(&mut self, consumer: &str) -> Result<InboxStats> {
        let row: InboxRow = diesel::sql_query(
            "SELECT count(*) AS processed, min(processed_at) AS oldest, \
               max(processed_at) AS newest FROM inbox_processed WHERE consumer = $1",
        )
        .bind::<Text, _>(consumer)
        .get_result(self)?;
        Ok(InboxStats {
            consumer: consumer.to_owned(),
            processed: row.processed,
            oldest: row.oldest,
            newest: row.newest,
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
        let row: NowRow =
            diesel::sql_query("SELECT statement_timestamp() AS now").get_result(self)?;
        Ok(row.now)
    }
}

const MARKER_TYPE: &str = waybill_outbox_core::sequence::SKIP_MARKER_TYPE;
