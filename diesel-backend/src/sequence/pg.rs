//! PostgreSQL: `INSERT .. ON CONFLICT DO UPDATE .. RETURNING`, one round trip per key, with the
//! epoch computed inline (`pg_epoch!`).

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use super::{Drawn, DrawnRow};
use crate::prepared::Prepared;
use crate::Result;

/// Adds `count` to the key's counter (creating it at `count`), locking its row until the
/// caller's transaction ends.
pub(crate) fn draw(conn: &mut PgConnection, topic: &str, key: &str, count: i64) -> Result<Drawn> {
    if count < 0 {
        // Giving numbers back: the row exists (and is locked) since the draw. The upsert's
        // CHECK would refuse the negative value before it saw the conflict.
        diesel::sql_query("UPDATE outbox_key_sequences SET last_sequence = last_sequence + $3 WHERE topic = $1 AND partition_key = $2")
            .bind::<Text, _>(topic)
            .bind::<Text, _>(key)
            .bind::<BigInt, _>(count)
            .execute(conn)?;
        return Ok(Drawn {
            last: 0,
            epoch: String::new(),
        });
    }
    let row: DrawnRow = Prepared(
        diesel::sql_query(concat!(
            "INSERT INTO outbox_key_sequences (topic, partition_key, last_sequence) \
         VALUES ($1, $2, $3) \
         ON CONFLICT (topic, partition_key) DO UPDATE \
         SET last_sequence = outbox_key_sequences.last_sequence + EXCLUDED.last_sequence \
         RETURNING last_sequence, ",
            super::pg_epoch!(),
            " AS epoch"
        ))
        .bind::<Text, _>(topic)
        .bind::<Text, _>(key)
        .bind::<BigInt, _>(count),
    )
    .get_result(conn)?;
    Ok(row.into())
}

use chrono::{DateTime, Utc};
use diesel::sql_types::{Binary, Bool, Nullable, Timestamptz};

use super::{big, GapEntry, Held, InOrderConnection, MarkEntry, MarkRow, SequenceMark, Stream};

#[derive(QueryableByName)]
struct Moved {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    #[allow(dead_code)] // Read only to make the statement a prepared query.
    one: i32,
}

#[derive(QueryableByName)]
struct Seen {
    #[diesel(sql_type = Timestamptz)]
    first_seen_at: DateTime<Utc>,
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
    #[diesel(sql_type = Timestamptz)]
    updated_at: DateTime<Utc>,
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
    #[diesel(sql_type = Timestamptz)]
    first_seen_at: DateTime<Utc>,
    #[diesel(sql_type = Timestamptz)]
    last_seen_at: DateTime<Utc>,
    #[diesel(sql_type = Bool)]
    parked: bool,
}

impl InOrderConnection for PgConnection {
    fn advance_sequence_mark(
        &mut self,
        consumer: &str,
        stream: &[u8],
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<bool> {
        // Prepared (the common case of every message): a row back when the mark moved.
        let moved: Option<Moved> = Prepared(
            diesel::sql_query(
                "UPDATE inbox_sequence_marks SET last_sequence = $4, updated_at = now() \
                 WHERE consumer = $1 AND stream = $2 AND epoch = $3 AND last_sequence = $5 \
                 RETURNING 1 AS one",
            )
            .bind::<Text, _>(consumer)
            .bind::<Binary, _>(stream)
            .bind::<Text, _>(epoch)
            .bind::<BigInt, _>(big(to))
            .bind::<BigInt, _>(big(from)),
        )
        .get_result(self)
        .optional()?;
        Ok(moved.is_some())
    }

    fn lock_sequence_mark(&mut self, consumer: &str, stream: &Stream<'_>) -> Result<SequenceMark> {
        // DO UPDATE (not DO NOTHING) so the row comes back locked, created or not, in one
        // round trip; a concurrent creator is waited for.
        let row: MarkRow = diesel::sql_query(
            "INSERT INTO inbox_sequence_marks \
               (consumer, stream, source, topic, partition_key, epoch, previous_epoch, \
                epoch_start, last_sequence) \
             VALUES ($1, $2, $3, $4, $5, '', '', 0, 0) \
             ON CONFLICT (consumer, stream) DO UPDATE SET consumer = EXCLUDED.consumer \
             RETURNING epoch, previous_epoch, epoch_start, last_sequence",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(&stream.digest)
        .bind::<Text, _>(stream.source)
        .bind::<Text, _>(stream.topic)
        .bind::<Text, _>(stream.partition_key)
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
            "UPDATE inbox_sequence_marks SET epoch = $3, previous_epoch = $4, epoch_start = $5, \
               last_sequence = $6, updated_at = now() \
             WHERE consumer = $1 AND stream = $2",
        )
        .bind::<Text, _>(consumer)
        .bind::<Binary, _>(stream)
        .bind::<Text, _>(&mark.epoch)
        .bind::<Text, _>(&mark.previous_epoch)
        .bind::<BigInt, _>(big(mark.epoch_start))
        .bind::<BigInt, _>(big(mark.last))
        .execute(self)?;
        Ok(())
    }

    fn hold_sequence_gap(
        &mut self,
        consumer: &str,
        stream: &Stream<'_>,
        held: &Held<'_>,
    ) -> Result<DateTime<Utc>> {
        // The first hold of this very message keeps its time; any other message restarts it.
        let seen: Seen = diesel::sql_query(
            "INSERT INTO inbox_sequence_gaps AS g \
               (consumer, stream, source, topic, partition_key, expected, got, message_id, \
                first_seen_at, last_seen_at, parked) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, FALSE) \
             ON CONFLICT (consumer, stream) DO UPDATE SET \
               expected = EXCLUDED.expected, got = EXCLUDED.got, \
               message_id = EXCLUDED.message_id, last_seen_at = EXCLUDED.last_seen_at, \
               first_seen_at = CASE WHEN g.got = EXCLUDED.got AND g.message_id = EXCLUDED.message_id \
                 THEN g.first_seen_at ELSE EXCLUDED.first_seen_at END, \
               parked = g.parked AND g.got = EXCLUDED.got AND g.message_id = EXCLUDED.message_id \
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
        .bind::<Timestamptz, _>(held.now)
        .get_result(self)?;
        Ok(seen.first_seen_at)
    }

    fn park_sequence_gap(&mut self, consumer: &str, stream: &[u8]) -> Result<()> {
        diesel::sql_query(
            "UPDATE inbox_sequence_gaps SET parked = TRUE WHERE consumer = $1 AND stream = $2",
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
             WHERE ($1::text IS NULL OR consumer = $1) AND last_sequence > 0 \
             ORDER BY consumer, source, topic, partition_key LIMIT $2",
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
                updated_at: r.updated_at,
            })
            .collect())
    }

    fn sequence_gaps(&mut self, consumer: Option<&str>) -> Result<Vec<GapEntry>> {
        let rows: Vec<GapListRow> = diesel::sql_query(
            "SELECT g.consumer, g.source, g.topic, g.partition_key, g.expected, g.got, \
               g.message_id, g.first_seen_at, g.last_seen_at, g.parked \
             FROM inbox_sequence_gaps g \
             LEFT JOIN inbox_sequence_marks m ON m.consumer = g.consumer AND m.stream = g.stream \
             WHERE ($1::text IS NULL OR g.consumer = $1) \
               AND COALESCE(m.last_sequence, 0) < g.got \
             ORDER BY g.first_seen_at",
        )
        .bind::<Nullable<Text>, _>(consumer)
        .load(self)?;
        Ok(rows.into_iter().map(gap_entry).collect())
    }
}

fn gap_entry(r: GapListRow) -> GapEntry {
    GapEntry {
        consumer: r.consumer,
        source: r.source,
        topic: r.topic,
        partition_key: r.partition_key,
        expected: r.expected.unsigned_abs(),
        got: r.got.unsigned_abs(),
        message_id: r.message_id,
        first_seen_at: r.first_seen_at,
        last_seen_at: r.last_seen_at,
        parked: r.parked,
    }
}
