//! The audit's own tables and the queries that count what happened.
//!
//! `audit_messages` holds one row per message the writer committed, in the same transaction as
//! its outbox row; `audit_effects` one row per effect a consumer applied. `audit_effects` has
//! deliberately no unique constraint: only the inbox may keep a message from taking effect
//! twice, and the audit counts it if it does not.

use std::collections::HashMap;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{InboxConnection, OpsConnection, OutboxConnection};

use crate::Error;

diesel::table! {
    /// Every message the writer committed.
    audit_messages (idx) {
        idx -> BigInt,
        message_id -> Text,
        msg_key -> Text,
        key_seq -> BigInt,
    }
}

diesel::table! {
    /// Every effect a consumer applied; `serial` is the order they were applied in.
    audit_effects (serial) {
        serial -> BigInt,
        message_id -> Text,
        msg_key -> Text,
        key_seq -> BigInt,
    }
}

diesel::table! {
    /// Every message the writer made unreadable behind the library's back.
    audit_unreadable (message_id) {
        original_headers -> Text,
        message_id -> Text,
    }
}

/// A pool of connections of type `C`.
pub(crate) type DbPool<C> = Pool<ConnectionManager<C>>;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A connection the audit runs on: outbox, inbox and the audit tables.
pub(crate) trait AuditConnection:
    Connection
    + R2D2Connection
    + OutboxConnection
    + InboxConnection
    + OpsConnection
    + Send
    + Sized
    + 'static
{
    /// The `CREATE TABLE` statements of the audit tables.
    const TABLES: &'static [&'static str];

    /// Opens a pool of at most `size` connections to `url`.
    ///
    /// # Errors
    ///
    /// The pool could not open its first connection.
    fn pool(url: &str, size: u32) -> Result<DbPool<Self>, Error>;

    /// Runs a statement without parameters (our own DDL only).
    fn run_statement(&mut self, sql: &str) -> QueryResult<()>;

    /// The highest committed index, if any.
    fn last_index(&mut self) -> QueryResult<Option<i64>>;

    /// Inserts an `audit_messages` row.
    fn insert_message(
        &mut self,
        idx: i64,
        message_id: &str,
        key: &str,
        seq: i64,
    ) -> QueryResult<()>;

    /// Inserts an `audit_effects` row.
    fn insert_effect(&mut self, message_id: &str, key: &str, seq: i64) -> QueryResult<()>;

    /// Runs `sql`, a `SELECT count(*) AS n ...` without parameters.
    fn count_rows(&mut self, sql: &str) -> QueryResult<i64>;

    /// Every effect's key and sequence, in the order they were applied.
    fn applied_in_order(&mut self) -> QueryResult<Vec<(String, i64)>>;

    /// Overwrites the headers of the outbox row `id` by raw SQL, behind the library's back.
    fn set_headers(&mut self, id: uuid::Uuid, headers: &str) -> QueryResult<()>;

    /// How many effects the message `message_id` has.
    fn effects_of(&mut self, message_id: &str) -> QueryResult<i64>;

    /// Records that the message `message_id` was made unreadable, with the headers it had
    /// (what the operator's repair restores: a sequenced message's number and epoch).
    fn insert_unreadable(&mut self, message_id: &str, original_headers: &str) -> QueryResult<()>;

    /// Every message made unreadable, with its original headers.
    fn unreadable_ids(&mut self) -> QueryResult<Vec<(String, String)>>;
}

macro_rules! impl_queries {
    () => {
        fn run_statement(&mut self, sql: &str) -> QueryResult<()> {
            diesel::sql_query(sql).execute(self).map(drop)
        }

        fn last_index(&mut self) -> QueryResult<Option<i64>> {
            audit_messages::table
                .select(diesel::dsl::max(audit_messages::idx))
                .first(self)
        }

        fn insert_message(
            &mut self,
            idx: i64,
            message_id: &str,
            key: &str,
            seq: i64,
        ) -> QueryResult<()> {
            diesel::insert_into(audit_messages::table)
                .values((
                    audit_messages::idx.eq(idx),
                    audit_messages::message_id.eq(message_id),
                    audit_messages::msg_key.eq(key),
                    audit_messages::key_seq.eq(seq),
                ))
                .execute(self)
                .map(drop)
        }

        fn insert_effect(&mut self, message_id: &str, key: &str, seq: i64) -> QueryResult<()> {
            diesel::insert_into(audit_effects::table)
                .values((
                    audit_effects::message_id.eq(message_id),
                    audit_effects::msg_key.eq(key),
                    audit_effects::key_seq.eq(seq),
                ))
                .execute(self)
                .map(drop)
        }

        fn count_rows(&mut self, sql: &str) -> QueryResult<i64> {
            Ok(diesel::sql_query(sql).get_result::<Count>(self)?.n)
        }

        fn applied_in_order(&mut self) -> QueryResult<Vec<(String, i64)>> {
            audit_effects::table
                .order(audit_effects::serial)
                .select((audit_effects::msg_key, audit_effects::key_seq))
                .load(self)
        }

        fn effects_of(&mut self, message_id: &str) -> QueryResult<i64> {
            audit_effects::table
                .filter(audit_effects::message_id.eq(message_id))
                .count()
                .get_result(self)
        }

        fn insert_unreadable(
            &mut self,
            message_id: &str,
            original_headers: &str,
        ) -> QueryResult<()> {
            diesel::insert_into(audit_unreadable::table)
                .values((
                    audit_unreadable::message_id.eq(message_id),
                    audit_unreadable::original_headers.eq(original_headers),
                ))
                .execute(self)
                .map(drop)
        }

        fn unreadable_ids(&mut self) -> QueryResult<Vec<(String, String)>> {
            audit_unreadable::table
                .select((
                    audit_unreadable::message_id,
                    audit_unreadable::original_headers,
                ))
                .load(self)
        }
    };
}

impl AuditConnection for PgConnection {
    const TABLES: &'static [&'static str] = &[
        "CREATE TABLE IF NOT EXISTS audit_messages (idx BIGINT PRIMARY KEY, \
         message_id TEXT NOT NULL, msg_key TEXT NOT NULL, key_seq BIGINT NOT NULL)",
        // No unique constraint on message_id: only the inbox may prevent a double effect.
        "CREATE TABLE IF NOT EXISTS audit_effects (serial BIGSERIAL PRIMARY KEY, \
         message_id TEXT NOT NULL, msg_key TEXT NOT NULL, key_seq BIGINT NOT NULL)",
        // Not unique: the counts join and group on it.
        "CREATE INDEX IF NOT EXISTS audit_effects_message_id ON audit_effects (message_id)",
        "CREATE TABLE IF NOT EXISTS audit_unreadable (message_id TEXT PRIMARY KEY, \
         original_headers TEXT NOT NULL)",
    ];

    fn pool(url: &str, size: u32) -> Result<DbPool<Self>, Error> {
        Ok(Pool::builder()
            .max_size(size)
            .build(ConnectionManager::new(url))?)
    }

    fn set_headers(&mut self, id: uuid::Uuid, headers: &str) -> QueryResult<()> {
        diesel::sql_query("UPDATE outbox_messages SET headers = CAST($1 AS jsonb) WHERE id = $2")
            .bind::<Text, _>(headers)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .execute(self)
            .map(drop)
    }

    impl_queries!();
}

#[cfg(feature = "mysql")]
impl AuditConnection for diesel::MysqlConnection {
    const TABLES: &'static [&'static str] = &[
        "CREATE TABLE IF NOT EXISTS audit_messages (idx BIGINT PRIMARY KEY, \
         message_id VARCHAR(64) NOT NULL, msg_key VARCHAR(255) NOT NULL, key_seq BIGINT NOT NULL)",
        // Not unique: the counts join and group on it.
        "CREATE TABLE IF NOT EXISTS audit_effects (serial BIGINT AUTO_INCREMENT PRIMARY KEY, \
         message_id VARCHAR(64) NOT NULL, msg_key VARCHAR(255) NOT NULL, key_seq BIGINT NOT NULL, \
         INDEX audit_effects_message_id (message_id))",
        "CREATE TABLE IF NOT EXISTS audit_unreadable (message_id VARCHAR(64) PRIMARY KEY, \
         original_headers TEXT NOT NULL)",
    ];

    fn pool(url: &str, size: u32) -> Result<DbPool<Self>, Error> {
        Ok(Pool::builder()
            .max_size(size)
            .build(ConnectionManager::new(url))?)
    }

    fn set_headers(&mut self, id: uuid::Uuid, headers: &str) -> QueryResult<()> {
        diesel::sql_query("UPDATE outbox_messages SET headers = ? WHERE id = ?")
            .bind::<Text, _>(headers)
            .bind::<diesel::sql_types::Binary, _>(id.as_bytes().to_vec())
            .execute(self)
            .map(drop)
    }

    impl_queries!();
}

impl AuditConnection for SqliteConnection {
    const TABLES: &'static [&'static str] = &[
        "CREATE TABLE IF NOT EXISTS audit_messages (idx INTEGER PRIMARY KEY, \
         message_id TEXT NOT NULL, msg_key TEXT NOT NULL, key_seq INTEGER NOT NULL)",
        // No unique constraint on message_id: only the inbox may prevent a double effect.
        "CREATE TABLE IF NOT EXISTS audit_effects (serial INTEGER PRIMARY KEY AUTOINCREMENT, \
         message_id TEXT NOT NULL, msg_key TEXT NOT NULL, key_seq INTEGER NOT NULL)",
        // Not unique: the counts join and group on it.
        "CREATE INDEX IF NOT EXISTS audit_effects_message_id ON audit_effects (message_id)",
        "CREATE TABLE IF NOT EXISTS audit_unreadable (message_id TEXT PRIMARY KEY, \
         original_headers TEXT NOT NULL)",
    ];

    fn pool(path: &str, size: u32) -> Result<DbPool<Self>, Error> {
        // One writer at a time: WAL plus a busy timeout make the others wait their turn.
        Ok(Pool::builder()
            .max_size(size)
            .connection_customizer(Box::new(SqliteOptions::default()))
            .build(ConnectionManager::new(path))?)
    }

    fn set_headers(&mut self, id: uuid::Uuid, headers: &str) -> QueryResult<()> {
        diesel::sql_query("UPDATE outbox_messages SET headers = ? WHERE id = ?")
            .bind::<Text, _>(headers)
            .bind::<diesel::sql_types::Binary, _>(id.as_bytes().to_vec())
            .execute(self)
            .map(drop)
    }

    impl_queries!();
}

/// Runs waybill's migrations and creates the audit tables.
///
/// # Errors
///
/// Database failures.
pub(crate) fn prepare<C: AuditConnection>(conn: &mut C) -> Result<(), Error> {
    waybill_diesel::run_migrations(conn)?;
    for sql in C::TABLES {
        conn.run_statement(sql)?;
    }
    Ok(())
}

/// The index the writer continues from: one past the last committed message.
///
/// # Errors
///
/// Database failures.
pub(crate) fn next_index<C: AuditConnection>(conn: &mut C) -> Result<u64, Error> {
    let last = conn.last_index()?;
    Ok(last.map_or(0, |idx| idx.unsigned_abs() + 1))
}

/// Records a committed message; call inside the writer's transaction, next to `enqueue`.
///
/// # Errors
///
/// Database failures.
pub(crate) fn record_message<C: AuditConnection>(
    conn: &mut C,
    idx: u64,
    message_id: &str,
    key: &str,
    seq: u64,
) -> QueryResult<()> {
    conn.insert_message(to_i64(idx), message_id, key, to_i64(seq))
}

/// Applies one message's effect: appends a row to `audit_effects`.
///
/// # Errors
///
/// Database failures.
pub(crate) fn apply_effect<C: AuditConnection>(
    conn: &mut C,
    message_id: &str,
    key: &str,
    seq: u64,
) -> QueryResult<()> {
    conn.insert_effect(message_id, key, to_i64(seq))
}

/// What the database says happened.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Outcome {
    /// Messages the writer committed.
    pub(crate) messages: u64,
    /// Effect rows.
    pub(crate) effects: u64,
    /// Committed messages without an effect.
    pub(crate) lost: u64,
    /// Message ids with more than one effect.
    pub(crate) double_effects: u64,
    /// Effects of a message that was never committed.
    pub(crate) phantom: u64,
    /// Effects applied after an effect of a later message of the same key.
    pub(crate) order_violations: u64,
    /// Sequenced mode: effects whose key number is not the one after the key's previous
    /// effect (a gap, a duplicate or a reordering); the first of each key must be 1.
    pub(crate) sequence_violations: u64,
    /// Messages the writer made unreadable.
    pub(crate) unreadable: u64,
}

const COUNT_MESSAGES: &str = "SELECT count(*) AS n FROM audit_messages";
const COUNT_EFFECTS: &str = "SELECT count(*) AS n FROM audit_effects";
const COUNT_LOST: &str = "SELECT count(*) AS n FROM audit_messages m WHERE NOT EXISTS \
     (SELECT 1 FROM audit_effects e WHERE e.message_id = m.message_id)";
const COUNT_DOUBLE: &str = "SELECT count(*) AS n FROM (SELECT message_id FROM audit_effects \
     GROUP BY message_id HAVING count(*) > 1) doubled";
const COUNT_PHANTOM: &str = "SELECT count(*) AS n FROM audit_effects e WHERE NOT EXISTS \
     (SELECT 1 FROM audit_messages m WHERE m.message_id = e.message_id)";

/// How many messages the writer made unreadable.
///
/// # Errors
///
/// Database failures.
pub(crate) fn count_unreadable<C: AuditConnection>(conn: &mut C) -> Result<u64, Error> {
    count(conn, "SELECT count(*) AS n FROM audit_unreadable")
}

/// How many effects were applied (the drain's progress).
///
/// # Errors
///
/// Database failures.
pub(crate) fn count_effects<C: AuditConnection>(conn: &mut C) -> Result<u64, Error> {
    count(conn, COUNT_EFFECTS)
}

/// How many committed messages have no effect yet.
///
/// # Errors
///
/// Database failures.
pub(crate) fn count_lost<C: AuditConnection>(conn: &mut C) -> Result<u64, Error> {
    count(conn, COUNT_LOST)
}

/// Counts messages, effects, losses, doubles and order violations.
///
/// # Errors
///
/// Database failures.
pub(crate) fn outcome<C: AuditConnection>(conn: &mut C) -> Result<Outcome, Error> {
    let applied = conn.applied_in_order()?;
    Ok(Outcome {
        messages: count(conn, COUNT_MESSAGES)?,
        effects: count(conn, COUNT_EFFECTS)?,
        lost: count(conn, COUNT_LOST)?,
        double_effects: count(conn, COUNT_DOUBLE)?,
        phantom: count(conn, COUNT_PHANTOM)?,
        order_violations: order_violations(applied.iter().map(|(key, seq)| (key.as_str(), *seq))),
        sequence_violations: sequence_violations(
            applied.iter().map(|(key, seq)| (key.as_str(), *seq)),
        ),
        unreadable: count_unreadable(conn)?,
    })
}

/// Effects whose per-key sequence is lower than that of an effect applied before them.
fn order_violations<'a>(applied: impl Iterator<Item = (&'a str, i64)>) -> u64 {
    let mut highest: HashMap<&str, i64> = HashMap::new();
    let mut violations = 0;
    for (key, seq) in applied {
        let top = highest.entry(key).or_insert(seq);
        if seq < *top {
            violations += 1;
        }
        *top = (*top).max(seq);
    }
    violations
}

/// Sequenced mode, where an effect's `key_seq` is its message's key number (1, 2, 3, ...):
/// effects that are not the next number of their key in the order applied. Each gap, each
/// duplicate and each step back counts once.
fn sequence_violations<'a>(applied: impl Iterator<Item = (&'a str, i64)>) -> u64 {
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut violations = 0;
    for (key, number) in applied {
        let previous = last.entry(key).or_insert(0);
        if number != *previous + 1 {
            violations += 1;
        }
        *previous = (*previous).max(number);
    }
    violations
}

/// Terminates the PostgreSQL backends whose `application_name` is `name`, wherever they are
/// (often mid-transaction); returns how many.
///
/// # Errors
///
/// Database failures.
pub(crate) fn terminate_backends(admin: &mut PgConnection, name: &str) -> Result<u64, Error> {
    Ok(diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind::<Text, _>(name)
    .get_result::<Count>(admin)?
    .n
    .unsigned_abs())
}

/// Messages still waiting in the outbox (pending or parked).
///
/// # Errors
///
/// Database failures.
pub(crate) fn outbox_backlog<C: AuditConnection>(conn: &mut C) -> Result<u64, Error> {
    Ok(waybill_diesel::topic_stats(conn)?
        .iter()
        .map(|topic| (topic.pending + topic.parked).unsigned_abs())
        .sum())
}

fn count<C: AuditConnection>(conn: &mut C, sql: &str) -> Result<u64, Error> {
    Ok(conn.count_rows(sql)?.unsigned_abs())
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequenced_effects_must_be_each_keys_next_number() {
        let clean = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)];
        assert_eq!(sequence_violations(clean.into_iter()), 0);
        // A gap (a: 1 -> 3), a duplicate (b: 1 twice), a late one (a: 2 after 3), a key
        // that does not start at 1 (c).
        let broken = [("a", 1), ("a", 3), ("b", 1), ("b", 1), ("a", 2), ("c", 2)];
        assert_eq!(sequence_violations(broken.into_iter()), 4);
    }

    #[test]
    fn an_effect_behind_a_later_one_of_its_key_is_a_violation() {
        let applied = [("a", 0), ("b", 0), ("a", 2), ("a", 1), ("b", 1), ("a", 3)];
        assert_eq!(order_violations(applied.into_iter()), 1);
        let in_order = [("a", 0), ("a", 0), ("a", 1)];
        assert_eq!(order_violations(in_order.into_iter()), 0);
    }
}
