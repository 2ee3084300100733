//! SQLite: `INSERT .. ON CONFLICT DO UPDATE .. RETURNING` (3.35+); one writer at a time anyway.

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;

use super::{Drawn, DrawnRow};
use crate::Result;

/// Adds `count` to the key's counter (creating it at `count`).
pub(crate) fn draw(
    conn: &mut SqliteConnection,
    topic: &str,
    key: &str,
    count: i64,
) -> Result<Drawn> {
    if count < 0 {
        // Giving numbers back: the row exists (and is locked) since the draw. The upsert's
        // CHECK would refuse the negative value before it saw the conflict.
        diesel::sql_query("UPDATE outbox_key_sequences SET last_sequence = last_sequence + ?3 WHERE topic = ?1 AND partition_key = ?2")
            .bind::<Text, _>(topic)
            .bind::<Text, _>(key)
            .bind::<BigInt, _>(count)
            .execute(conn)?;
        return Ok(Drawn {
            last: 0,
            epoch: String::new(),
        });
    }
    let row: DrawnRow = diesel::sql_query(
        "INSERT INTO outbox_key_sequences (topic, partition_key, last_sequence) \
         VALUES (?, ?, ?) \
         ON CONFLICT (topic, partition_key) DO UPDATE \
         SET last_sequence = last_sequence + excluded.last_sequence \
         RETURNING last_sequence, (SELECT epoch FROM outbox_sequence_epoch WHERE id = 1) AS epoch",
    )
    .bind::<Text, _>(topic)
    .bind::<Text, _>(key)
    .bind::<BigInt, _>(count)
    .get_result(conn)?;
    Ok(row.into())
}

use chrono::{DateTime, Utc};
use diesel::sql_types::{Binary, Bool, Nullable};

use super::{big, GapEntry, Held, InOrderConnection, MarkEntry, MarkRow, SequenceMark, Stream};

#[derive(QueryableByName)]
struct Seen {
    #[diesel(sql_type = BigInt)]
    first_seen_at: i64,
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
    #[diesel(sql_type = BigInt)]
    updated_at: i64,
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
    #[diesel(sql_type = BigInt)]
    first_seen_at: i64,
    #[diesel(sql_type = BigInt)]
    last_seen_at: i64,
    #[diesel(sql_type = Bool)]
    parked: bool,
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::UNIX_EPOCH)
}

impl InOrderConnection for SqliteConnection {
    fn advance_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<bool> {
        let updated = diesel::sql_query(
            "UPDATE inbox_sequence_marks SET last_sequence = ?, updated_at = ? \
             WHERE consumer = ? AND stream = ? AND epoch = ? AND last_sequence = ?",
        )
        .bind::<BigInt, _>(big(to))
        .bind::<BigInt, _>(micros(Utc::now()))
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(stream)
        .bind::<Text, _>(epoch)
        .bind::<BigInt, _>(big(from))
        .execute(self)?;
        Ok(updated == 1)
    }

    fn lock_sequence_mark(&mut self, consumer: &str, stream: &Stream<'_>) -> Result<SequenceMark> {
        // One writer at a time: the upsert's write lock is the row lock.
        let row: MarkRow = diesel::sql_query(
            "INSERT INTO inbox_sequence_marks \
               (consumer, stream, source, topic, partition_key, epoch, previous_epoch, \
                epoch_start, last_sequence, updated_at) \
             VALUES (?, ?, ?, ?, ?, '', '', 0, 0, ?) \
             ON CONFLICT (consumer, stream) DO UPDATE SET consumer = excluded.consumer \
             RETURNING epoch, previous_epoch, epoch_start, last_sequence",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .bind::<Text, _>(stream.source)
        .bind::<Text, _>(stream.topic)
        .bind::<Text, _>(stream.partition_key)
        .bind::<BigInt, _>(micros(Utc::now()))
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
               last_sequence = ?, updated_at = ? \
             WHERE consumer = ? AND stream = ?",
        )
        .bind::<Text, _>(&mark.epoch)
        .bind::<Text, _>(&mark.previous_epoch)
        .bind::<BigInt, _>(big(mark.epoch_start))
        .bind::<BigInt, _>(big(mark.last))
        .bind::<BigInt, _>(micros(Utc::now()))
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
        let seen: Seen = diesel::sql_query(
            "INSERT INTO inbox_sequence_gaps \
               (consumer, stream, source, topic, partition_key, expected, got, message_id, \
                first_seen_at, last_seen_at, parked) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) \
             ON CONFLICT (consumer, stream) DO UPDATE SET \
               first_seen_at = CASE WHEN got = excluded.got AND message_id = excluded.message_id \
                 THEN first_seen_at ELSE excluded.first_seen_at END, \
               parked = parked AND got = excluded.got AND message_id = excluded.message_id, \
               expected = excluded.expected, got = excluded.got, \
               message_id = excluded.message_id, last_seen_at = excluded.last_seen_at \
             RETURNING first_seen_at",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .bind::<Text, _>(stream.source)
        .bind::<Text, _>(stream.topic)
        .bind::<Text, _>(stream.partition_key)
        .bind::<BigInt, _>(big(held.expected))
        .bind::<BigInt, _>(big(held.got))
        .bind::<Text, _>(held.message_id)
        .bind::<BigInt, _>(micros(held.now))
        .bind::<BigInt, _>(micros(held.now))
        .get_result(self)?;
        Ok(from_micros(seen.first_seen_at))
    }

    fn park_sequence_gap(&mut self, consumer: &str, stream: &[u8]) -> Result<()> {
        diesel::sql_query(
            "UPDATE inbox_sequence_gaps SET parked = 1 WHERE consumer = ? AND stream = ?",
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
             WHERE (?1 IS NULL OR consumer = ?1) AND last_sequence > 0 \
             ORDER BY consumer, source, topic, partition_key LIMIT ?2",
        )
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
                updated_at: from_micros(r.updated_at),
            })
            .collect())
    }

    fn sequence_gaps(&mut self, consumer: Option<&str>) -> Result<Vec<GapEntry>> {
        let rows: Vec<GapListRow> = diesel::sql_query(
            "SELECT g.consumer, g.source, g.topic, g.partition_key, g.expected, g.got, \
               g.message_id, g.first_seen_at, g.last_seen_at, g.parked \
             FROM inbox_sequence_gaps g \
             LEFT JOIN inbox_sequence_marks m ON m.consumer = g.consumer AND m.stream = g.stream \
             WHERE (?1 IS NULL OR g.consumer = ?1) AND COALESCE(m.last_sequence, 0) < g.got \
             ORDER BY g.first_seen_at",
        )
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
                first_seen_at: from_micros(r.first_seen_at),
                last_seen_at: from_micros(r.last_seen_at),
                parked: r.parked,
            })
            .collect())
    }
}
