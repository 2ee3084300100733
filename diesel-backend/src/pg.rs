//! PostgreSQL: native `uuid`, `jsonb` headers, `timestamptz`, the database clock, and
//! `LISTEN`/`NOTIFY` wake-ups.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::dsl::sql;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, SmallInt, Text, Timestamptz};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use uuid::Uuid;
use waybill_outbox_core::{
    Claimed, CompleteReport, Completion, LeaseToken, MessageId, NewOutboxMessage, OutboxMessage,
    Retention, Status,
};

use crate::common::{
    choose, into_messages, micros, migration_names, truncate_error, Choice, Grouped, RawRow,
};
use crate::error::duplicate_or;
use crate::prepared::Prepared;
use crate::{Error, OutboxConnection, Result, TopicStats};

/// The PostgreSQL migrations, embedded.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The session advisory lock that serializes migration runs (`waybill` in ASCII).
const MIGRATION_LOCK: i64 = 0x0077_6179_6269_6c6c;

/// The channel the insert trigger notifies.
const CHANNEL: &str = "waybill_outbox";

mod schema {
    diesel::table! {
        outbox_messages (seq) {
            seq -> Int8,
            id -> Uuid,
            topic -> Text,
            partition_key -> Text,
            message_type -> Text,
            content_type -> Text,
            payload -> Bytea,
            headers -> Jsonb,
            status -> Int2,
            attempts -> Int4,
            last_error -> Nullable<Text>,
            available_at -> Timestamptz,
            created_at -> Timestamptz,
            published_at -> Nullable<Timestamptz>,
            bucket -> Int2,
        }
    }
}

use schema::outbox_messages as m;

/// What the prepared sequenced insert returns: one row per message inserted.
#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    #[allow(dead_code)] // Read only to make the statement a prepared query.
    one: i32,
}

#[derive(Insertable)]
#[diesel(table_name = m)]
struct NewRow<'a> {
    id: Uuid,
    topic: &'a str,
    partition_key: &'a str,
    message_type: &'a str,
    content_type: &'a str,
    payload: &'a [u8],
    headers: serde_json::Value,
    // `None` takes the column default: the database clock.
    available_at: Option<DateTime<Utc>>,
}

#[derive(Queryable, QueryableByName, Selectable)]
#[diesel(table_name = m, check_for_backend(diesel::pg::Pg))]
struct Row {
    seq: i64,
    id: Uuid,
    topic: String,
    partition_key: String,
    message_type: String,
    content_type: String,
    payload: Vec<u8>,
    headers: serde_json::Value,
    status: i16,
    attempts: i32,
    last_error: Option<String>,
    available_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
}

impl From<Row> for RawRow {
    fn from(row: Row) -> Self {
        RawRow {
            seq: row.seq,
            id: Ok(MessageId::from(row.id)),
            topic: row.topic,
            partition_key: row.partition_key,
            message_type: row.message_type,
            content_type: row.content_type,
            payload: row.payload,
            headers: serde_json::from_value(row.headers)
                .map_err(|e| format!("headers are not a JSON string map: {e}")),
            status: row.status,
            attempts: row.attempts,
            last_error: row.last_error,
            available_at: row.available_at,
            created_at: row.created_at,
            published_at: row.published_at,
        }
    }
}

#[derive(QueryableByName)]
struct StatsRow {
    #[diesel(sql_type = Text)]
    topic: String,
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = BigInt)]
    parked: i64,
    #[diesel(sql_type = BigInt)]
    published: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest_pending: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct CandidateRow {
    #[diesel(embed)]
    message: Row,
    #[diesel(sql_type = SmallInt)]
    bucket: i16,
    #[diesel(sql_type = Bool)]
    stale: bool,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

#[derive(QueryableByName)]
struct Lease {
    #[diesel(sql_type = SmallInt)]
    bucket: i16,
}

/// Claimable messages in outbox order: pending, due, in a bucket no live lease holds, and not
/// behind a message of their key that is not due yet (delayed, backing off) or parked.
///
/// While some bucket is leased, the walk in `seq` order starts at the first pending message of a
/// free bucket, found with one index probe per free bucket: it never passes the leased buckets'
/// messages ahead of that, and a claim that finds every bucket with work leased reads no message
/// at all. (With nothing leased there is nothing to skip, and no probe is made.)
///
/// Each candidate says whether its bucket's lease had expired without being released (`stale`):
/// its holder may still write back, after this read and before the claim leases the bucket, and
/// the claim must then read the bucket's messages again (see [`RELOAD`]).
macro_rules! candidates {
    ($columns:literal) => {
        concat!(
            "
WITH start AS (
    SELECT CASE WHEN NOT EXISTS (
        SELECT 1 FROM outbox_relay_leases WHERE expires_at > statement_timestamp())
    THEN 0 ELSE (
        SELECT min(first.seq) FROM outbox_relay_leases l
        CROSS JOIN LATERAL (
            SELECT seq FROM outbox_messages
            WHERE bucket = l.bucket AND status = 0 ORDER BY seq LIMIT 1) first
        WHERE l.expires_at <= statement_timestamp())
    END AS seq
),
blocked AS (
    SELECT partition_key, min(seq) AS first_seq FROM outbox_messages
    WHERE (status = 0 AND available_at > statement_timestamp()) OR status = 2
    GROUP BY partition_key
),
stale AS (
    SELECT bucket FROM outbox_relay_leases
    WHERE expires_at <= statement_timestamp() AND expires_at > '-infinity'
)
SELECT ",
            $columns,
            ", m.bucket IN (SELECT bucket FROM stale) AS stale
FROM outbox_messages m
LEFT JOIN blocked b ON b.partition_key = m.partition_key
WHERE m.status = 0 AND m.seq >= (SELECT seq FROM start)
  AND m.available_at <= statement_timestamp()
  AND (b.first_seq IS NULL OR m.seq < b.first_seq)
  AND m.bucket NOT IN (
      SELECT bucket FROM outbox_relay_leases WHERE expires_at > statement_timestamp())
ORDER BY m.seq
LIMIT $1"
        )
    };
}
const CANDIDATES: &str = candidates!(
    "m.seq, m.id, m.topic, m.partition_key, m.message_type, m.content_type, m.payload,
       m.headers, m.status, m.attempts, m.last_error, m.available_at, m.created_at,
       m.published_at, m.bucket"
);
/// The candidates' positions only: for a claim that leaves a share of them to other claims.
const CANDIDATE_POSITIONS: &str = candidates!("m.seq, m.bucket");

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = SmallInt)]
    bucket: i16,
    #[diesel(sql_type = Bool)]
    stale: bool,
}

/// For a claim that found work, in one statement: leases the chosen buckets (`$3`) under the
/// claim's fencing token (`$2`, random: see [`fencing_token`]). Reports how many buckets it
/// leased, and how many of them had been left unreleased by a relay whose lease expired
/// (takeovers).
const LEASE: &str = "
WITH old AS (
    SELECT bucket, expires_at FROM outbox_relay_leases WHERE bucket = ANY($3) FOR UPDATE
),
leased AS (
    UPDATE outbox_relay_leases l
    SET token = $2, owner = $1, expires_at = statement_timestamp() + $4 * interval '1 microsecond'
    FROM old WHERE l.bucket = old.bucket
    RETURNING old.expires_at > '-infinity' AS taken_over
)
SELECT count(*) AS leased, count(*) FILTER (WHERE taken_over) AS takeovers FROM leased";

/// A claim's fencing token: 63 random bits, never 0 (an empty claim's).
///
/// A counter in the database would hand a token out again if a crash lost the claim that took
/// it, so the claim would have to wait for the disk before publishing. A random token is never
/// handed out twice (two claims collide with odds of 2^-63), so the claim commits without
/// waiting: a crash that loses it only makes its relay's write-back fail the fencing check, and
/// the batch is published again (a duplicate, never a loss).
fn fencing_token() -> LeaseToken {
    // A v4 UUID's 122 random bits, folded so that each of the 64 has a random bit in it (the
    // version and variant bits are fixed).
    let (high, low) = Uuid::new_v4().as_u64_pair();
    i64::try_from((high ^ low) >> 1).unwrap_or(i64::MAX).max(1)
}

#[derive(QueryableByName)]
struct Leased {
    #[diesel(sql_type = BigInt)]
    leased: i64,
    #[diesel(sql_type = BigInt)]
    takeovers: i64,
}

/// The chosen messages, read once their buckets are leased: by a claim that read only positions,
/// and again when a chosen bucket's lease had expired unreleased at the candidates' read (stale),
/// as a late write by the relay that held it may have published, parked or delayed some of them
/// since: whether the claim then took the lease over, or found the bucket released by that very
/// write. The blocking rules are checked again on the state after that write. (A bucket that was
/// released before the candidates' read has no such writer: its last holder has completed.)
const RELOAD: &str = "
WITH blocked AS (
    SELECT partition_key, min(seq) AS first_seq FROM outbox_messages
    WHERE ((status = 0 AND available_at > statement_timestamp()) OR status = 2)
      AND bucket = ANY($1)
    GROUP BY partition_key
)
SELECT m.seq, m.id, m.topic, m.partition_key, m.message_type, m.content_type, m.payload,
       m.headers, m.status, m.attempts, m.last_error, m.available_at, m.created_at,
       m.published_at
FROM outbox_messages m
LEFT JOIN blocked b ON b.partition_key = m.partition_key
WHERE m.seq = ANY($2) AND m.status = 0 AND m.available_at <= statement_timestamp()
  AND (b.first_seq IS NULL OR m.seq < b.first_seq)
ORDER BY m.seq";

/// Serializes claims with a transaction-scoped advisory lock, keyed by this outbox's lock table
/// (outboxes in other schemas do not wait for each other), records this relay as alive
/// (forgetting relays not seen for a day) and counts the relays seen within the last lease
/// period, this one included. The claim commits without waiting for the WAL flush: a crash
/// that loses it loses a liveness record and leases whose token is never handed out again (see
/// [`fencing_token`]), so the claim holds up no other relay's claim while the disk flushes.
const OPEN_CLAIM: &str = "
WITH seen AS (
    INSERT INTO outbox_relays (owner, seen_at) VALUES ($1, statement_timestamp())
    ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at
),
gone AS (
    DELETE FROM outbox_relays
    WHERE owner <> $1 AND seen_at < statement_timestamp() - interval '1 day'
)
SELECT (SELECT 1 + count(*) FROM outbox_relays
        WHERE owner <> $1 AND seen_at > statement_timestamp() - $2 * interval '1 microsecond'
       ) AS relays,
       (SELECT count(*) FROM outbox_relay_leases) AS buckets,
       set_config('synchronous_commit', 'off', true) AS relaxed
FROM (SELECT pg_advisory_xact_lock(
          (2003884386::bigint << 32) | 'outbox_relay_locks'::regclass::oid::bigint)) AS locked";

#[derive(QueryableByName)]
struct OpenClaim {
    // (The CTE's write is invisible to the count, which sees the statement's snapshot: it
    // counts the others and adds this relay.)
    #[diesel(sql_type = BigInt)]
    relays: i64,
    /// Lease rows present: fewer than [`BUCKETS`] means some must be restored.
    #[diesel(sql_type = BigInt)]
    buckets: i64,
}

/// The number of key buckets, each with its row in `outbox_relay_leases`.
const BUCKETS: i64 = 64;

/// Restores missing lease rows (deleted by hand, or lost in a partial restore), released. A
/// bucket without its row could never be leased: claims would hand its messages out unleased,
/// to several relays at once, and their write-backs would be refused for ever.
const RESTORE_LEASES: &str = "INSERT INTO outbox_relay_leases (bucket) \
     SELECT generate_series(0, 63) ON CONFLICT (bucket) DO NOTHING";

/// The published messages the claim still holds: deleted, or marked under retention.
/// (Counted in a CTE, so that the statement runs through `get_result` and stays prepared.)
const DELETE_PUBLISHED: &str = "WITH done AS (DELETE FROM outbox_messages \
     WHERE seq = ANY($1) AND bucket = ANY($2) AND status = 0 RETURNING 1) \
     SELECT count(*) AS count FROM done";
const MARK_PUBLISHED: &str = "WITH done AS (UPDATE outbox_messages \
     SET status = 1, published_at = statement_timestamp() \
     WHERE seq = ANY($1) AND bucket = ANY($2) AND status = 0 RETURNING 1) \
     SELECT count(*) AS count FROM done";
/// The write-back of a batch that was published whole, in one autocommitted statement: the
/// claim's buckets locked (refused if taken over), its messages deleted or marked, the buckets
/// released. The commit does not wait for the WAL flush (see `complete_outbox_messages`).
macro_rules! write_back_published {
    ($write:literal) => {
        concat!(
            "WITH held AS (SELECT bucket FROM outbox_relay_leases WHERE token = $1 FOR UPDATE), \
             done AS (",
            $write,
            " WHERE seq = ANY($2) AND bucket = ANY(ARRAY(SELECT bucket FROM held)) AND status = 0 \
              RETURNING 1), \
             released AS (UPDATE outbox_relay_leases SET owner = NULL, expires_at = '-infinity' \
              WHERE bucket IN (SELECT bucket FROM held) RETURNING 1) \
             SELECT (SELECT count(*) FROM done) AS count, \
                    (SELECT count(*) FROM released) AS released, \
                    set_config('synchronous_commit', 'off', true) AS relaxed"
        )
    };
}
const WRITE_BACK_DELETE: &str = write_back_published!("DELETE FROM outbox_messages");
const WRITE_BACK_MARK: &str = write_back_published!(
    "UPDATE outbox_messages SET status = 1, published_at = statement_timestamp()"
);

/// The write-back of a batch published whole under retention on the partitioned layout: as
/// [`WRITE_BACK_DELETE`], moving the rows into the history in the same statement (one write per
/// message in `outbox_messages`, instead of the status update the history trigger follows with
/// a delete).
const WRITE_BACK_MOVE: &str = "WITH held AS (SELECT bucket FROM outbox_relay_leases \
       WHERE token = $1 FOR UPDATE), \
     done AS (DELETE FROM outbox_messages \
       WHERE seq = ANY($2) AND bucket = ANY(ARRAY(SELECT bucket FROM held)) AND status = 0 \
       RETURNING seq, id, topic, partition_key, message_type, content_type, payload, headers, \
         attempts, created_at), \
     moved AS (INSERT INTO outbox_published (seq, id, topic, partition_key, message_type, \
         content_type, payload, headers, attempts, created_at, published_at) \
       SELECT seq, id, topic, partition_key, message_type, content_type, payload, headers, \
         attempts, created_at, statement_timestamp() FROM done), \
     released AS (UPDATE outbox_relay_leases SET owner = NULL, expires_at = '-infinity' \
       WHERE bucket IN (SELECT bucket FROM held) RETURNING 1) \
     SELECT (SELECT count(*) FROM done) AS count, \
            (SELECT count(*) FROM released) AS released, \
            set_config('synchronous_commit', 'off', true) AS relaxed";
/// [`WRITE_BACK_MOVE`]'s move, inside the write-back's transaction.
const MOVE_PUBLISHED: &str = "WITH done AS (DELETE FROM outbox_messages \
       WHERE seq = ANY($1) AND bucket = ANY($2) AND status = 0 \
       RETURNING seq, id, topic, partition_key, message_type, content_type, payload, headers, \
         attempts, created_at), \
     moved AS (INSERT INTO outbox_published (seq, id, topic, partition_key, message_type, \
         content_type, payload, headers, attempts, created_at, published_at) \
       SELECT seq, id, topic, partition_key, message_type, content_type, payload, headers, \
         attempts, created_at, statement_timestamp() FROM done) \
     SELECT count(*) AS count FROM done";
/// Makes the history's partition for now if create-ahead lagged (a statement of its own: a
/// statement that inserts into the history cannot create its partitions).
const ENSURE_HISTORY_PARTITION: &str =
    "SELECT waybill_ensure_partition('outbox_published', statement_timestamp()) AS flag";

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

/// Whether the history moves into `outbox_published` (the partitioned layout).
fn keeps_partitioned_history(conn: &mut PgConnection) -> Result<bool> {
    let Flag { flag } = Prepared(diesel::sql_query(
        "SELECT to_regclass('outbox_published') IS NOT NULL AS flag",
    ))
    .get_result(conn)?;
    Ok(flag)
}

/// A history insert that found no partition for its time.
fn no_partition(error: &diesel::result::Error) -> bool {
    matches!(
        error,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::CheckViolation, info)
            if info.message().starts_with("no partition of relation")
    )
}

const COUNT_HELD: &str = "SELECT count(*) AS count FROM outbox_messages \
     WHERE seq = ANY($1) AND bucket = ANY($2) AND status = 0";

fn headers_json(msg: &NewOutboxMessage) -> serde_json::Value {
    serde_json::Value::Object(
        msg.headers()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

impl OutboxConnection for PgConnection {
    fn in_transaction(&mut self) -> Result<bool> {
        let status = AnsiTransactionManager::transaction_manager_status_mut(self);
        Ok(status.transaction_depth()?.is_some())
    }

    fn insert_outbox_messages(&mut self, messages: &[NewOutboxMessage]) -> Result<()> {
        let single = (messages.len() == 1).then(|| messages[0].id());
        for chunk in messages.chunks(crate::INSERT_CHUNK) {
            let rows: Vec<NewRow<'_>> = chunk
                .iter()
                .map(|msg| NewRow {
                    id: *msg.id().as_uuid(),
                    topic: msg.topic(),
                    partition_key: msg.partition_key(),
                    message_type: msg.message_type(),
                    content_type: msg.content_type(),
                    payload: msg.payload(),
                    headers: headers_json(msg),
                    available_at: msg.available_after(),
                })
                .collect();
            diesel::insert_into(m::table)
                .values(&rows)
                .execute(self)
                .map_err(|e| duplicate_or(e, single))?;
        }
        Ok(())
    }

    fn draw_key_sequences(
        &mut self,
        topic: &str,
        partition_key: &str,
        count: i64,
    ) -> Result<crate::sequence::Drawn> {
        crate::sequence::draw_pg(self, topic, partition_key, count)
    }

    fn insert_sequenced_outbox_message(&mut self, message: &NewOutboxMessage) -> Result<bool> {
        // One round trip: the counter upsert locks the key's row and hands its number to the
        // insert, which only then forms the outbox row (and draws its `seq`), so a second
        // writer of the key waits in the CTE and gets both the next number and a later `seq`.
        let _: Inserted = Prepared(
            diesel::sql_query(concat!(
            "WITH drawn AS (\
               INSERT INTO outbox_key_sequences (topic, partition_key, last_sequence) \
               VALUES ($2, $3, 1) \
               ON CONFLICT (topic, partition_key) DO UPDATE \
               SET last_sequence = outbox_key_sequences.last_sequence + 1 \
               RETURNING last_sequence, ",
            crate::sequence::pg_epoch!(),
            " AS epoch) \
             INSERT INTO outbox_messages \
               (id, topic, partition_key, message_type, content_type, payload, headers, available_at) \
             SELECT $1, $2, $3, $4, $5, $6, \
               $7 || jsonb_build_object($9::text, drawn.last_sequence::text, $10::text, drawn.epoch), \
               COALESCE($8, now()) \
             FROM drawn RETURNING 1 AS one"
        ))
        .bind::<diesel::sql_types::Uuid, _>(*message.id().as_uuid())
        .bind::<Text, _>(message.topic())
        .bind::<Text, _>(message.partition_key())
        .bind::<Text, _>(message.message_type())
        .bind::<Text, _>(message.content_type())
        .bind::<diesel::sql_types::Bytea, _>(message.payload())
        .bind::<diesel::sql_types::Jsonb, _>(headers_json(message))
        .bind::<Nullable<Timestamptz>, _>(message.available_after())
        .bind::<Text, _>(waybill_outbox_core::sequence::SEQUENCE_HEADER)
        .bind::<Text, _>(waybill_outbox_core::sequence::EPOCH_HEADER),
        )
        // Prepared: planning this statement costs more than running it.
        .get_result(self)
        .map_err(|e| duplicate_or(e, Some(message.id())))?;
        Ok(true)
    }

    fn set_sequence_epoch(&mut self, epoch: &str) -> Result<()> {
        diesel::sql_query("UPDATE outbox_sequence_epoch SET epoch = $1 WHERE id = 1")
            .bind::<diesel::sql_types::Text, _>(epoch)
            .execute(self)?;
        Ok(())
    }

    fn run_outbox_migrations(&mut self) -> Result<Vec<String>> {
        // Several processes starting at once would race on diesel's migrations table: the
        // first runs them, the others wait and find nothing left to do.
        diesel::sql_query("SELECT pg_advisory_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK)
            .execute(self)?;
        let migrated = self
            .run_pending_migrations(MIGRATIONS)
            .map_err(Error::Migration)
            .and_then(|applied| migration_names::<diesel::pg::Pg>(&MIGRATIONS, &applied))
            .and_then(|names| uncache_seq(self).map(|()| names));
        diesel::sql_query("SELECT pg_advisory_unlock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK)
            .execute(self)?;
        migrated
    }

    fn revert_outbox_migrations(&mut self) -> Result<()> {
        self.revert_all_migrations(MIGRATIONS)
            .map_err(Error::Migration)?;
        Ok(())
    }

    fn claim_outbox_messages(
        &mut self,
        limit: usize,
        lease: Duration,
        owner: &str,
        in_flight: usize,
    ) -> Result<Claimed> {
        self.transaction(|conn| {
            let open: OpenClaim = Prepared(
                diesel::sql_query(OPEN_CLAIM)
                    .bind::<Text, _>(owner)
                    .bind::<BigInt, _>(micros(lease)),
            )
            .get_result(conn)?;
            if open.buckets < BUCKETS {
                // Under the claim lock: no other claim can lease meanwhile.
                let restored = diesel::sql_query(RESTORE_LEASES).execute(conn)?;
                log::warn!("restored {restored} missing outbox lease rows");
            }
            // Each relay's share, split again among its own claims in flight.
            let relays = usize::try_from(open.relays)
                .unwrap_or(1)
                .max(1)
                .saturating_mul(1 + in_flight);
            let wanted = i64::try_from(limit.saturating_mul(relays)).unwrap_or(i64::MAX);
            // Alone, a claim keeps every candidate it reads: it reads them whole. With a share
            // to leave to other claims, it reads positions, and only its own messages once they
            // are leased: the others' share is never transferred and decoded.
            let (positions, whole): (Vec<Position>, Option<Vec<Row>>) = if relays == 1 {
                let rows: Vec<CandidateRow> =
                    Prepared(diesel::sql_query(CANDIDATES).bind::<BigInt, _>(wanted)).load(conn)?;
                (
                    rows.iter()
                        .map(|c| Position {
                            seq: c.message.seq,
                            bucket: c.bucket,
                            stale: c.stale,
                        })
                        .collect(),
                    Some(rows.into_iter().map(|c| c.message).collect()),
                )
            } else {
                let rows: Vec<Position> =
                    Prepared(diesel::sql_query(CANDIDATE_POSITIONS).bind::<BigInt, _>(wanted))
                        .load(conn)?;
                (rows, None)
            };
            let order: Vec<i16> = positions.iter().map(|p| p.bucket).collect();
            let Choice { keep, buckets } = choose(&order, relays, limit);
            if buckets.is_empty() {
                // Nothing leased, so no token: only the liveness record was written.
                return Ok(Claimed::new(0, Vec::new()));
            }
            // A stale bucket's holder may have written back since the candidates were read.
            let stale = positions
                .iter()
                .zip(&keep)
                .any(|(p, &take)| take && p.stale);
            let token = fencing_token();
            let Leased { leased, takeovers } = Prepared(
                diesel::sql_query(LEASE)
                    .bind::<Text, _>(owner)
                    .bind::<BigInt, _>(token)
                    .bind::<Array<SmallInt>, _>(&buckets)
                    .bind::<BigInt, _>(micros(lease)),
            )
            .get_result(conn)?;
            if usize::try_from(leased).ok() != Some(buckets.len()) {
                // Fail closed: a message of a bucket without its lease row would go out unleased.
                // (Restored above, so the rows were deleted while this claim ran.)
                let present: Vec<i16> = Prepared(
                    diesel::sql_query(
                        "SELECT bucket FROM outbox_relay_leases WHERE bucket = ANY($1)",
                    )
                    .bind::<Array<SmallInt>, _>(&buckets),
                )
                .load::<Lease>(conn)?
                .into_iter()
                .map(|l| l.bucket)
                .collect();
                let missing = buckets.iter().copied().filter(|b| !present.contains(b));
                return Err(Error::MissingLeaseRows(missing.collect()));
            }
            let rows: Vec<Row> = match whole {
                Some(rows) if takeovers == 0 && !stale => rows
                    .into_iter()
                    .zip(keep)
                    .filter_map(|(row, take)| take.then_some(row))
                    .collect(),
                _ => {
                    let seqs: Vec<i64> = positions
                        .iter()
                        .zip(keep)
                        .filter_map(|(p, take)| take.then_some(p.seq))
                        .collect();
                    Prepared(
                        diesel::sql_query(RELOAD)
                            .bind::<Array<SmallInt>, _>(&buckets)
                            .bind::<Array<BigInt>, _>(&seqs),
                    )
                    .load(conn)?
                }
            };
            let (messages, malformed) = into_messages(rows.into_iter().map(RawRow::from).collect());
            for (seq, reason) in &malformed {
                park(conn, &buckets, *seq, reason)?;
            }
            if messages.is_empty() {
                // Nothing to publish, so no write-back will release the buckets: release them
                // now rather than hold the other keys in them until the lease expires.
                diesel::sql_query(
                    "UPDATE outbox_relay_leases SET owner = NULL, expires_at = '-infinity' \
                     WHERE token = $1",
                )
                .bind::<BigInt, _>(token)
                .execute(conn)?;
            }
            Ok(Claimed::new(token, messages)
                .with_lease_takeovers(u64::try_from(takeovers).unwrap_or(0)))
        })
    }

    fn complete_outbox_messages(
        &mut self,
        token: LeaseToken,
        completions: &[Completion],
        retention: Retention,
    ) -> Result<CompleteReport> {
        let grouped = Grouped::new(completions);
        let partitioned = match retention {
            Retention::Keep(_) => keeps_partitioned_history(self)?,
            Retention::Delete => false,
        };
        if grouped.published.len() == completions.len() && !completions.is_empty() {
            // The common case in one round trip instead of six (two with a partitioned history).
            let statement = match retention {
                Retention::Delete => WRITE_BACK_DELETE,
                Retention::Keep(_) if partitioned => WRITE_BACK_MOVE,
                Retention::Keep(_) => WRITE_BACK_MARK,
            };
            let write_back = |conn: &mut PgConnection| {
                Prepared(
                    diesel::sql_query(statement)
                        .bind::<BigInt, _>(token)
                        .bind::<Array<BigInt>, _>(&grouped.published),
                )
                .get_result::<Count>(conn)
            };
            let Count { count } = match write_back(self) {
                // Create-ahead lagged: make the partition and write again (the failed
                // statement changed nothing).
                Err(error) if partitioned && no_partition(&error) => {
                    diesel::sql_query(ENSURE_HISTORY_PARTITION).execute(self)?;
                    write_back(self)?
                }
                written => written?,
            };
            let applied = u64::try_from(count).unwrap_or(0);
            return Ok(CompleteReport::new(
                applied,
                completions.len() as u64 - applied.min(completions.len() as u64),
            ));
        }
        let applied = self.transaction::<_, Error, _>(|conn| {
            // Losing this commit in a database crash only republishes the batch (the lease
            // expires and another claim takes it): at-least-once already allows that, so the
            // relay does not wait for the WAL flush (nor does the claim: see `fencing_token`).
            conn.batch_execute("SET LOCAL synchronous_commit = off")?;
            // The buckets this claim still holds, locked until the writes below commit: a claim
            // taking one over waits for them, and a taken-over bucket's writes are refused.
            let held: Vec<i16> = Prepared(
                diesel::sql_query(
                    "SELECT bucket FROM outbox_relay_leases WHERE token = $1 FOR UPDATE",
                )
                .bind::<BigInt, _>(token),
            )
            .load::<Lease>(conn)?
            .into_iter()
            .map(|l| l.bucket)
            .collect();
            if held.is_empty() {
                return Ok(0);
            }
            let mut applied = 0;
            if !grouped.published.is_empty() {
                if partitioned {
                    diesel::sql_query(ENSURE_HISTORY_PARTITION).execute(conn)?;
                }
                let statement = match retention {
                    Retention::Delete => DELETE_PUBLISHED,
                    Retention::Keep(_) if partitioned => MOVE_PUBLISHED,
                    Retention::Keep(_) => MARK_PUBLISHED,
                };
                let Count { count } = Prepared(
                    diesel::sql_query(statement)
                        .bind::<Array<BigInt>, _>(&grouped.published)
                        .bind::<Array<SmallInt>, _>(&held),
                )
                .get_result(conn)?;
                applied += usize::try_from(count).unwrap_or(0);
            }
            if !grouped.released.is_empty() {
                // Nothing to write: releasing the bucket hands them back.
                let Count { count } = Prepared(
                    diesel::sql_query(COUNT_HELD)
                        .bind::<Array<BigInt>, _>(&grouped.released)
                        .bind::<Array<SmallInt>, _>(&held),
                )
                .get_result(conn)?;
                applied += usize::try_from(count).unwrap_or(0);
            }
            for (seq, delay, error) in &grouped.retried {
                applied += diesel::sql_query(
                    "UPDATE outbox_messages SET attempts = attempts + 1, last_error = $1, \
                       available_at = statement_timestamp() + $2 * interval '1 microsecond' \
                     WHERE seq = $3 AND status = 0 AND bucket = ANY($4)",
                )
                .bind::<Text, _>(truncate_error(error))
                .bind::<BigInt, _>(micros(*delay))
                .bind::<BigInt, _>(seq)
                .bind::<Array<SmallInt>, _>(&held)
                .execute(conn)?;
            }
            for (seq, reason) in &grouped.parked {
                applied += park(conn, &held, *seq, reason)?;
            }
            diesel::sql_query(
                "UPDATE outbox_relay_leases SET owner = NULL, expires_at = '-infinity' \
                 WHERE token = $1",
            )
            .bind::<BigInt, _>(token)
            .execute(conn)?;
            Ok(applied)
        })?;
        let applied = applied as u64;
        Ok(CompleteReport::new(
            applied,
            completions.len() as u64 - applied.min(completions.len() as u64),
        ))
    }

    fn purge_published_messages(&mut self, older_than: Duration, limit: usize) -> Result<u64> {
        self.transaction(|conn| {
            let locked = diesel::sql_query(
                "SELECT token FROM outbox_relay_locks WHERE name = 'purge' FOR UPDATE SKIP LOCKED",
            )
            .execute(conn)?;
            if locked == 0 {
                return Ok(0);
            }
            let deleted = diesel::sql_query(
                "DELETE FROM outbox_messages WHERE seq IN (\
                   SELECT seq FROM outbox_messages WHERE status = 1 \
                   AND published_at < statement_timestamp() - $1 * interval '1 microsecond' \
                   ORDER BY published_at LIMIT $2)",
            )
            .bind::<BigInt, _>(micros(older_than))
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .execute(conn)?;
            Ok(deleted as u64)
        })
    }

    fn maintain_outbox(&mut self) -> Result<()> {
        let done = crate::partitions::maintain(self)?;
        if !done.created.is_empty()
            || done
                .rolled_off
                .as_ref()
                .is_some_and(|r| !r.dropped.is_empty())
        {
            log::debug!("partition maintenance: {done:?}");
        }
        Ok(())
    }

    fn requeue_parked_messages(
        &mut self,
        id: Option<MessageId>,
        partition_key: Option<&str>,
    ) -> Result<u64> {
        let mut update = diesel::update(m::table)
            .filter(m::status.eq(Status::Parked.code()))
            .into_boxed();
        if let Some(id) = id {
            update = update.filter(m::id.eq(*id.as_uuid()));
        }
        if let Some(key) = partition_key {
            update = update.filter(m::partition_key.eq(key.to_owned()));
        }
        let requeued = update
            .set((
                m::status.eq(Status::Pending.code()),
                m::attempts.eq(0),
                m::available_at.eq(sql::<Timestamptz>("statement_timestamp()")),
            ))
            .execute(self)?;
        Ok(requeued as u64)
    }

    fn find_outbox_message(&mut self, id: MessageId) -> Result<Option<OutboxMessage>> {
        let row: Option<Row> = m::table
            .filter(m::id.eq(*id.as_uuid()))
            .select(Row::as_select())
            .first(self)
            .optional()?;
        let row = match row {
            Some(row) => Some(row),
            // The partitioned layout moved it into the history once it was published.
            None if crate::partitions::is_partitioned(self)? => diesel::sql_query(
                "SELECT seq, id, topic, partition_key, message_type, content_type, payload, \
                   headers, 1::smallint AS status, attempts, NULL::text AS last_error, \
                   published_at AS available_at, created_at, published_at \
                 FROM outbox_published WHERE id = $1 LIMIT 1",
            )
            .bind::<diesel::sql_types::Uuid, _>(*id.as_uuid())
            .get_result(self)
            .optional()?,
            None => None,
        };
        row.map(|row| RawRow::from(row).into_message()).transpose()
    }

    fn outbox_topic_stats(&mut self) -> Result<Vec<TopicStats>> {
        const QUEUE: &str = "SELECT topic, \
               count(*) FILTER (WHERE status = 0) AS pending, \
               count(*) FILTER (WHERE status = 2) AS parked, \
               count(*) FILTER (WHERE status = 1) AS published, \
               min(created_at) FILTER (WHERE status = 0) AS oldest_pending \
             FROM outbox_messages GROUP BY topic";
        // On the partitioned layout the relay moves published rows to `outbox_published`;
        // without it, status would show a drained topic as gone and count no history.
        let rows: Vec<StatsRow> = if crate::partitions::is_partitioned(self)? {
            diesel::sql_query(format!(
                "SELECT topic, sum(pending)::bigint AS pending, sum(parked)::bigint AS parked, \
                   sum(published)::bigint AS published, min(oldest_pending) AS oldest_pending \
                 FROM ({QUEUE} UNION ALL \
                       SELECT topic, 0, 0, count(*), NULL FROM outbox_published GROUP BY topic) s \
                 GROUP BY topic ORDER BY topic"
            ))
            .load(self)?
        } else {
            diesel::sql_query(format!("{QUEUE} ORDER BY topic")).load(self)?
        };
        Ok(rows
            .into_iter()
            .map(|r| TopicStats::new(r.topic, r.pending, r.parked, r.published, r.oldest_pending))
            .collect())
    }

    fn keeps_a_listening_connection() -> bool {
        true
    }

    fn listen_for_outbox(&mut self) -> Result<bool> {
        diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(self)?;
        Ok(true)
    }

    fn announce_outbox_idle(&mut self, idle: bool) -> Result<()> {
        // A sequence, set outside any transaction: see the `wakeup_sequence` migration.
        diesel::sql_query("SELECT setval('outbox_relay_wakeup', $1)")
            .bind::<BigInt, _>(i64::from(idle))
            .execute(self)?;
        Ok(())
    }

    fn retire_outbox_relay(&mut self, owner: &str) -> Result<()> {
        diesel::sql_query("DELETE FROM outbox_relays WHERE owner = $1")
            .bind::<Text, _>(owner)
            .execute(self)?;
        Ok(())
    }

    fn outbox_notified(&mut self) -> Result<bool> {
        let mut notified = false;
        for notification in self.notifications_iter() {
            notification?;
            notified = true;
        }
        Ok(notified)
    }
}

#[derive(QueryableByName)]
struct SeqCache {
    #[diesel(sql_type = BigInt)]
    cache: i64,
}

/// Sets the cache of the `seq` sequence back to 1 if someone raised it. With a cache, each
/// session takes `seq` values from its own preallocated range, so a transaction that enqueues
/// after another one committed can get the lower `seq`: its message would be published first,
/// and the commit-order recipe (lock the aggregate, then enqueue) would no longer hold.
fn uncache_seq(conn: &mut PgConnection) -> Result<()> {
    let SeqCache { cache } = diesel::sql_query(
        "SELECT s.seqcache AS cache FROM pg_sequence s \
         WHERE s.seqrelid = pg_get_serial_sequence('outbox_messages', 'seq')::regclass",
    )
    .get_result(conn)?;
    if cache > 1 {
        log::warn!(
            "the outbox_messages seq sequence had CACHE {cache}, which breaks per-key commit \
             order across sessions; setting it to 1"
        );
        conn.batch_execute("ALTER TABLE outbox_messages ALTER COLUMN seq SET CACHE 1")?;
    }
    Ok(())
}

/// Parks one message in a bucket the caller holds.
fn park(conn: &mut PgConnection, held: &[i16], seq: i64, reason: &str) -> Result<usize> {
    Ok(diesel::update(
        m::table
            .filter(m::seq.eq(seq))
            .filter(m::bucket.eq_any(held))
            .filter(m::status.eq(Status::Pending.code())),
    )
    .set((
        m::status.eq(Status::Parked.code()),
        m::attempts.eq(m::attempts + 1),
        m::last_error.eq(truncate_error(reason)),
    ))
    .execute(conn)?)
}
