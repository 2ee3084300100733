//! MySQL/MariaDB: no RETURNING, so the upsert leaves the new value in the session's
//! `LAST_INSERT_ID(expr)` and a second statement reads it with the epoch row.

use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use super::{Drawn, DrawnRow};
use crate::Result;

/// Adds `count` to the key's counter (creating it at `count`), locking its row until the
/// caller's transaction ends.
pub(crate) fn draw(
    conn: &mut MysqlConnection,
    topic: &str,
    key: &str,
    count: i64,
) -> Result<Drawn> {
    if count < 0 {
        // Giving numbers back: the row exists (and is locked) since the draw.
        diesel::sql_query(
            "UPDATE outbox_key_sequences SET last_sequence = LAST_INSERT_ID(last_sequence + ?) \
             WHERE topic = ? AND partition_key = ?",
        )
        .bind::<BigInt, _>(count)
        .bind::<Text, _>(topic)
        .bind::<Text, _>(key)
        .execute(conn)?;
        return read_drawn(conn);
    }
    diesel::sql_query(
        "INSERT INTO outbox_key_sequences (topic, partition_key, last_sequence) \
         VALUES (?, ?, LAST_INSERT_ID(?)) \
         ON DUPLICATE KEY UPDATE last_sequence = LAST_INSERT_ID(last_sequence + ?)",
    )
    .bind::<Text, _>(topic)
    .bind::<Text, _>(key)
    .bind::<BigInt, _>(count)
    .bind::<BigInt, _>(count)
    .execute(conn)?;
    read_drawn(conn)
}

/// The value the last upsert left in `LAST_INSERT_ID`, with the epoch.
fn read_drawn(conn: &mut MysqlConnection) -> Result<Drawn> {
    let row: DrawnRow = diesel::sql_query(
        "SELECT CAST(LAST_INSERT_ID() AS SIGNED) AS last_sequence, \
                (SELECT epoch FROM outbox_sequence_epoch WHERE id = 1) AS epoch",
    )
    .get_result(conn)?;
    Ok(row.into())
}

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::sql_types::{Binary, Bool, Datetime, Nullable};

use super::{big, GapEntry, Held, InOrderConnection, MarkEntry, MarkRow, SequenceMark, Stream};

#[derive(QueryableByName)]
struct Seen {
    #[diesel(sql_type = Datetime)]
    first_seen_at: NaiveDateTime,
}

#[derive(QueryableByName)]
struct MarkListRow {
    #[diesel(sql_type = Text)]
    consumer: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = Text)]
    epoch: String,
    #[diesel(sql_type = BigInt)]
    last_sequence: i64,
    #[diesel(sql_type = Datetime)]
    updated_at: NaiveDateTime,
}

#[derive(QueryableByName)]
struct GapListRow {
    #[diesel(sql_type = Text)]
    consumer: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = Text)]
    partition_key: String,
    #[diesel(sql_type = BigInt)]
    expected: i64,
    #[diesel(sql_type = BigInt)]
    got: i64,
    #[diesel(sql_type = Text)]
    message_id: String,
    #[diesel(sql_type = Datetime)]
    first_seen_at: NaiveDateTime,
    #[diesel(sql_type = Datetime)]
    last_seen_at: NaiveDateTime,
    #[diesel(sql_type = Bool)]
    parked: bool,
}

impl InOrderConnection for MysqlConnection {
    fn advance_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<bool> {
        // A locking read of the latest committed mark, even under REPEATABLE READ.
        let updated = diesel::sql_query(
            "UPDATE inbox_sequence_marks SET last_sequence = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE consumer = ? AND stream = ? AND epoch = ? AND last_sequence = ?",
        )
        .bind::<BigInt, _>(big(to))
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(stream)
        .bind::<Text, _>(epoch)
        .bind::<BigInt, _>(big(from))
        .execute(self)?;
        Ok(updated == 1)
    }

    fn lock_sequence_mark(&mut self, consumer: &str, stream: &Stream<'_>) -> Result<SequenceMark> {
        // Not INSERT IGNORE, which would downgrade unrelated errors to warnings.
        diesel::sql_query(
            "INSERT INTO inbox_sequence_marks \
               (consumer, stream, source, topic, partition_key, epoch, previous_epoch, \
                epoch_start, last_sequence) \
             VALUES (?, ?, ?, ?, ?, '', '', 0, 0) \
             ON DUPLICATE KEY UPDATE consumer = consumer",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .bind::<Text, _>(stream.source)
        .bind::<Text, _>(stream.topic)
        .bind::<Text, _>(stream.partition_key)
        .execute(self)?;
        let row: MarkRow = diesel::sql_query(
            "SELECT epoch, previous_epoch, epoch_start, last_sequence FROM inbox_sequence_marks \
             WHERE consumer = ? AND stream = ? FOR UPDATE",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .get_result(self)?;
        Ok(row.into())
    }

    fn save_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        mark: &SequenceMark,
    ) -> Result<()> {
        diesel::sql_query(
            "UPDATE inbox_sequence_marks SET epoch = ?, previous_epoch = ?, epoch_start = ?, \
               last_sequence = ?, updated_at = UTC_TIMESTAMP(6) \
             WHERE consumer = ? AND stream = ?",
        )
        .bind::<Text, _>(&mark.epoch)
        .bind::<Text, _>(&mark.previous_epoch)
        .bind::<BigInt, _>(big(mark.epoch_start))
        .bind::<BigInt, _>(big(mark.last))
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(stream)
        .execute(self)?;
        Ok(())
    }

    fn hold_sequence_gap(
        &mut self,
        consumer: &str,
        stream: &Stream<'_>,
        held: &Held<'_>,
    ) -> Result<DateTime<Utc>> {
        let now = held.now.naive_utc();
        // Assignments run left to right and see the columns already assigned: the ones that
        // compare with the old got and message_id come first.
        diesel::sql_query(
            "INSERT INTO inbox_sequence_gaps \
               (consumer, stream, source, topic, partition_key, expected, got, message_id, \
                first_seen_at, last_seen_at, parked) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, FALSE) \
             ON DUPLICATE KEY UPDATE \
               first_seen_at = IF(got = VALUES(got) AND message_id = VALUES(message_id), \
                 first_seen_at, VALUES(first_seen_at)), \
               parked = parked AND got = VALUES(got) AND message_id = VALUES(message_id), \
               expected = VALUES(expected), got = VALUES(got), \
               message_id = VALUES(message_id), last_seen_at = VALUES(last_seen_at)",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .bind::<Text, _>(stream.source)
        .bind::<Text, _>(stream.topic)
        .bind::<Text, _>(stream.partition_key)
        .bind::<BigInt, _>(big(held.expected))
        .bind::<BigInt, _>(big(held.got))
        .bind::<Text, _>(held.message_id)
        .bind::<Datetime, _>(now)
        .bind::<Datetime, _>(now)
        .execute(self)?;
        let seen: Seen = diesel::sql_query(
            "SELECT first_seen_at FROM inbox_sequence_gaps WHERE consumer = ? AND stream = ?",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .get_result(self)?;
        Ok(seen.first_seen_at.and_utc())
    }

    fn park_sequence_gap(&mut self, consumer: &str, stream: &[u8]) -> Result<()> {
        diesel::sql_query(
            "UPDATE inbox_sequence_gaps SET parked = TRUE WHERE consumer = ? AND stream = ?",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(stream)
        .execute(self)?;
        Ok(())
    }

    fn sequence_marks(&mut self, consumer: Option<&str>, limit: usize) -> Result<Vec<MarkEntry>> {
        let rows: Vec<MarkListRow> = diesel::sql_query(
            "SELECT consumer, source, topic, partition_key, epoch, last_sequence, updated_at \
             FROM inbox_sequence_marks \
             WHERE (? IS NULL OR consumer = ?) AND last_sequence > 0 \
             ORDER BY consumer, source, topic, partition_key LIMIT ?",
        )
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| MarkEntry {
                consumer: r.consumer,
                source: r.source,
                topic: r.topic,
                partition_key: r.partition_key,
                epoch: r.epoch,
                last_sequence: r.last_sequence.unsigned_abs(),
                updated_at: r.updated_at.and_utc(),
            })
            .collect())
    }

    fn sequence_gaps(&mut self, consumer: Option<&str>) -> Result<Vec<GapEntry>> {
        let rows: Vec<GapListRow> = diesel::sql_query(
            "SELECT g.consumer, g.source, g.topic, g.partition_key, g.expected, g.got, \
               g.message_id, g.first_seen_at, g.last_seen_at, g.parked \
             FROM inbox_sequence_gaps g \
             LEFT JOIN inbox_sequence_marks m ON m.consumer = g.consumer AND m.stream = g.stream \
             WHERE (? IS NULL OR g.consumer = ?) AND COALESCE(m.last_sequence, 0) < g.got \
             ORDER BY g.first_seen_at",
        )
        .bind::<Nullable<Text>, _>(consumer)
        .bind::<Nullable<Text>, _>(consumer)
        .load(self)?;
        Ok(rows
            .into_iter()
            .map(|r| GapEntry {
                consumer: r.consumer,
                source: r.source,
                topic: r.topic,
                partition_key: r.partition_key,
                expected: r.expected.unsigned_abs(),
                got: r.got.unsigned_abs(),
                message_id: r.message_id,
                first_seen_at: r.first_seen_at.and_utc(),
                last_seen_at: r.last_seen_at.and_utc(),
                parked: r.parked,
            })
            .collect())
    }
}
