//! Retention by dropping time partitions (PostgreSQL, opt-in): published history and the
//! inbox's records that cost nothing to forget.
//!
//! Forgetting rows with `DELETE` writes WAL for every row, leaves dead tuples and needs vacuum.
//! In the partitioned layout the published history (`outbox_published`) and the inbox's
//! records (`inbox_processed_log`, behind an `inbox_processed` view) are partitioned by time
//! range, and a [`roll_off`] forgets a whole partition with `DETACH PARTITION .. CONCURRENTLY`
//! and `DROP TABLE`: catalog operations, no per-row WAL, nothing to vacuum.
//!
//! - **Pending messages are never dropped**: they stay in `outbox_messages`, which is not
//!   partitioned. The relay's write-back deletes a published message from it and inserts it
//!   into the history in one statement (and a trigger moves any row another writer marks
//!   published), so only published messages are ever in a partition.
//! - **No DEFAULT partition** (it would make `DETACH .. CONCURRENTLY` impossible). An insert
//!   never fails for want of a partition: [`create_ahead`] keeps [`PartitionConfig::ahead`]
//!   partitions ready, and every insert path makes the partition it needs if create-ahead
//!   lagged, under an advisory lock: the inbox's insert trigger and the history trigger first,
//!   the relay's write-back when its insert found no partition (then it writes again).
//! - **Inbox dedup across partitions**: a record is unique per (consumer, key) across all
//!   partitions (an advisory lock per key and a lookup, in the insert trigger). Before a
//!   partition of records is dropped, each consumer's purge mark is raised to the newest
//!   `processed_at` in it, so a duplicate arriving after the drop is refused as
//!   [`Processed::Expired`](crate::Processed::Expired), the same too-old case as a purge, on
//!   the same database clock.
//! - **One roll-off at a time**: roll-offs serialize on a session advisory lock; the relay's
//!   maintenance ([`maintain`], run once per purge interval) skips when another holds it.
//!
//! ```no_run
//! use diesel::prelude::*;
//! use waybill_diesel::partitions::{self, PartitionConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut conn = PgConnection::establish("postgres://localhost/app")?;
//! waybill_diesel::run_migrations(&mut conn)?;
//! partitions::adopt(&mut conn, &PartitionConfig::default())?;
//! let created = partitions::create_ahead(&mut conn)?;
//! let rolled = partitions::roll_off(&mut conn, true)?;
//! println!("created {created:?}, dropped {:?}", rolled.dropped);
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text, Timestamptz};

use crate::{Error, OutboxConnection, Result};

/// The history table of the partitioned layout.
pub const OUTBOX_HISTORY: &str = "outbox_published";
/// The inbox's records table of the partitioned layout.
pub const INBOX_RECORDS: &str = "inbox_processed_log";

/// Session advisory lock class of roll-offs (`wayb`), paired with the layout table's oid so
/// layouts in different schemas do not wait for each other.
const ROLL_OFF_LOCK: &str =
    "(2003884386::bigint << 32) | 'waybill_partitioning'::regclass::oid::bigint";

/// How the partitioned layout is cut and kept. Stored in the database by [`adopt`]; the
/// relay's maintenance and `waybill partitions` read it from there.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionConfig {
    width: Duration,
    outbox_retention: Duration,
    inbox_retention: Duration,
    ahead: u32,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            width: Duration::from_secs(24 * 3600),
            outbox_retention: Duration::from_secs(7 * 24 * 3600),
            inbox_retention: Duration::from_secs(7 * 24 * 3600),
            ahead: 3,
        }
    }
}

impl PartitionConfig {
    /// The time range one partition covers (whole seconds, at least 1 s). Defaults to 1 day.
    pub fn width(mut self, width: Duration) -> Self {
        self.width = width;
        self
    }

    /// How long published history is kept: a partition is dropped once its upper bound is this
    /// far behind the database clock. Defaults to 7 days.
    pub fn outbox_retention(mut self, retention: Duration) -> Self {
        self.outbox_retention = retention;
        self
    }

    /// How long inbox records are kept, as [`outbox_retention`](Self::outbox_retention). Keep
    /// it at least every consumer's [`Inbox::retention`](crate::Inbox::retention): a duplicate
    /// later than this is refused as expired. Defaults to 7 days.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// How many partitions past the current one create-ahead keeps ready (at least 1).
    /// Defaults to 3.
    pub fn ahead(mut self, partitions: u32) -> Self {
        self.ahead = partitions;
        self
    }

    fn check(&self) -> Result<()> {
        let invalid =
            |what, bound, value: String| Err(Error::InvalidPartitionConfig { what, bound, value });
        if self.width < Duration::from_secs(1) || self.width.subsec_nanos() != 0 {
            return invalid(
                "width",
                "whole seconds, at least 1 s",
                format!("{:?}", self.width),
            );
        }
        if self.width > Duration::from_secs(366 * 24 * 3600) {
            return invalid("width", "at most 366 days", format!("{:?}", self.width));
        }
        for retention in [self.outbox_retention, self.inbox_retention] {
            if retention > Duration::from_secs(100 * 366 * 24 * 3600) {
                return invalid("retention", "at most 100 years", format!("{retention:?}"));
            }
        }
        if !(1..=1000).contains(&self.ahead) {
            return invalid("ahead", "1 to 1000", self.ahead.to_string());
        }
        Ok(())
    }
}

/// An interval literal of whole microseconds.
fn interval(duration: Duration) -> String {
    format!("interval '{} microseconds'", duration.as_micros())
}

/// Switches the connection's database to the partitioned layout, moving the published history
/// (`status = 1` rows of `outbox_messages`) and the inbox's records into partitions, in one
/// transaction (a savepoint inside the caller's). Writers of the outbox and the inbox wait
/// while it copies. Then makes the partitions ahead ([`create_ahead`]).
///
/// Run the migrations first; revert the layout ([`revert`]) before reverting migrations or
/// running a future migration that alters `inbox_processed`.
///
/// # Errors
///
/// [`Error::AlreadyPartitioned`], [`Error::InvalidPartitionConfig`], or database failures
/// (nothing is changed then).
pub fn adopt(conn: &mut PgConnection, config: &PartitionConfig) -> Result<()> {
    config.check()?;
    conn.transaction::<_, Error, _>(|conn| {
        if is_partitioned(conn)? {
            return Err(Error::AlreadyPartitioned);
        }
        let script = include_str!("adopt.sql")
            .replace("@EVERY@", &interval(config.width))
            .replace("@OUTBOX_RETAIN@", &interval(config.outbox_retention))
            .replace("@INBOX_RETAIN@", &interval(config.inbox_retention))
            .replace("@AHEAD@", &config.ahead.to_string());
        conn.batch_execute(&script)?;
        create_ahead(conn)?;
        Ok(())
    })?;
    log::info!("adopted the partitioned layout ({config:?})");
    Ok(())
}

/// Switches back to the plain layout: the history returns to `outbox_messages` as published
/// rows (purged by `DELETE` again) and the records to a plain `inbox_processed`, in one
/// transaction.
///
/// # Errors
///
/// [`Error::NotPartitioned`] or database failures (nothing is changed then).
pub fn revert(conn: &mut PgConnection) -> Result<()> {
    conn.transaction::<_, Error, _>(|conn| {
        if !is_partitioned(conn)? {
            return Err(Error::NotPartitioned);
        }
        conn.batch_execute(include_str!("revert.sql"))?;
        Ok(())
    })?;
    log::info!("reverted to the plain layout");
    Ok(())
}

#[derive(QueryableByName)]
struct Flag {
    #[diesel(sql_type = Bool)]
    flag: bool,
}

/// Whether the connection's database uses the partitioned layout.
///
/// # Errors
///
/// Database failures.
pub fn is_partitioned(conn: &mut PgConnection) -> Result<bool> {
    let Flag { flag } =
        diesel::sql_query("SELECT to_regclass('waybill_partitioning') IS NOT NULL AS flag")
            .get_result(conn)?;
    Ok(flag)
}

#[derive(QueryableByName)]
struct Created {
    #[diesel(sql_type = Text)]
    name: String,
}

/// Makes the current partition and [`PartitionConfig::ahead`] more of each partitioned table
/// where missing; returns the names it made. Runs in one short transaction (a savepoint
/// inside the caller's).
///
/// # Errors
///
/// [`Error::NotPartitioned`] or database failures.
pub fn create_ahead(conn: &mut PgConnection) -> Result<Vec<String>> {
    if !is_partitioned(conn)? {
        return Err(Error::NotPartitioned);
    }
    let created: Vec<Created> = conn.transaction::<_, Error, _>(|conn| {
        Ok(diesel::sql_query(
            "SELECT (waybill_partition_for(p.parent, t.at)).name AS name \
             FROM waybill_partitioning p \
             CROSS JOIN LATERAL (SELECT statement_timestamp() + g * p.every AS at \
                                 FROM generate_series(0, p.ahead) g) t \
             WHERE waybill_ensure_partition(p.parent, t.at) \
             ORDER BY p.parent, t.at",
        )
        .load(conn)?)
    })?;
    let names: Vec<String> = created.into_iter().map(|c| c.name).collect();
    if !names.is_empty() {
        log::info!("created partitions {names:?}");
    }
    Ok(names)
}

/// One partitioned table, as [`status`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionedTable {
    /// `outbox_published` or `inbox_processed_log`.
    pub parent: String,
    /// The time range of one partition.
    pub width: Duration,
    /// How long rows are kept before their partition is rolled off.
    pub retention: Duration,
    /// How many partitions past the current one create-ahead keeps ready.
    pub ahead: u32,
    /// The database clock when the status was read.
    pub now: DateTime<Utc>,
    /// Its partitions, oldest first.
    pub partitions: Vec<Partition>,
}

impl PartitionedTable {
    /// Until when inserts find their partition made: the end of the run of adjacent
    /// partitions that covers [`now`](Self::now), or `None` when none covers it (the next
    /// insert makes it).
    pub fn ready_until(&self) -> Option<DateTime<Utc>> {
        let mut until = None;
        for partition in &self.partitions {
            match until {
                None if partition.from <= self.now && self.now < partition.to => {
                    until = Some(partition.to);
                }
                Some(end) if partition.from == end => until = Some(partition.to),
                _ => {}
            }
        }
        until
    }

    /// Partitions past the retention window: the next roll-off drops them.
    pub fn due_for_roll_off(&self) -> Vec<&Partition> {
        let retention =
            chrono::TimeDelta::from_std(self.retention).unwrap_or(chrono::TimeDelta::MAX);
        let horizon = self.now.checked_sub_signed(retention);
        self.partitions
            .iter()
            .filter(|p| p.detach_pending || horizon.is_some_and(|h| p.to <= h))
            .collect()
    }
}

/// One partition of a [`PartitionedTable`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Partition {
    /// The table's name, e.g. `outbox_published_p20261206t000000`.
    pub name: String,
    /// Lower bound (inclusive).
    pub from: DateTime<Utc>,
    /// Upper bound (exclusive).
    pub to: DateTime<Utc>,
    /// The planner's row estimate (`pg_class.reltuples`; -1 before the first analyze).
    pub rows_estimate: i64,
    /// Its size on disk, indexes included.
    pub bytes: i64,
    /// A `DETACH .. CONCURRENTLY` of it was interrupted; the next roll-off finishes it.
    pub detach_pending: bool,
}

#[derive(QueryableByName)]
struct ConfigRow {
    #[diesel(sql_type = Text)]
    parent: String,
    #[diesel(sql_type = BigInt)]
    every_us: i64,
    #[diesel(sql_type = BigInt)]
    retain_us: i64,
    #[diesel(sql_type = BigInt)]
    ahead: i64,
    #[diesel(sql_type = Timestamptz)]
    now: DateTime<Utc>,
}

#[derive(QueryableByName)]
struct PartitionRow {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    lower_bound: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    upper_bound: Option<DateTime<Utc>>,
    #[diesel(sql_type = BigInt)]
    rows_estimate: i64,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    #[diesel(sql_type = Bool)]
    detach_pending: bool,
}

/// The partitions of `parent` with their bounds (read from the catalog), oldest first.
const PARTITIONS: &str = "
SELECT c.relname::text AS name,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \\(''([^'']*)''\\)'))[1]::timestamptz
           AS lower_bound,
       (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']*)''\\)'))[1]::timestamptz
           AS upper_bound,
       c.reltuples::bigint AS rows_estimate,
       pg_total_relation_size(c.oid) AS bytes,
       i.inhdetachpending AS detach_pending
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = to_regclass($1)
ORDER BY 3";

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// The partitioned tables with their settings and partitions.
///
/// # Errors
///
/// [`Error::NotPartitioned`] or database failures.
pub fn status(conn: &mut PgConnection) -> Result<Vec<PartitionedTable>> {
    if !is_partitioned(conn)? {
        return Err(Error::NotPartitioned);
    }
    let configs: Vec<ConfigRow> = diesel::sql_query(
        "SELECT parent, (extract(epoch FROM every) * 1000000)::bigint AS every_us, \
           (extract(epoch FROM retain) * 1000000)::bigint AS retain_us, ahead::bigint AS ahead, \
           statement_timestamp() AS now \
         FROM waybill_partitioning ORDER BY parent",
    )
    .load(conn)?;
    configs
        .into_iter()
        .map(|c| {
            let rows: Vec<PartitionRow> = diesel::sql_query(PARTITIONS)
                .bind::<Text, _>(&c.parent)
                .load(conn)?;
            Ok(PartitionedTable {
                partitions: rows
                    .into_iter()
                    .filter_map(|r| {
                        Some(Partition {
                            from: r.lower_bound?,
                            to: r.upper_bound?,
                            name: r.name,
                            rows_estimate: r.rows_estimate,
                            bytes: r.bytes,
                            detach_pending: r.detach_pending,
                        })
                    })
                    .collect(),
                parent: c.parent,
                width: micros(c.every_us),
                retention: micros(c.retain_us),
                ahead: u32::try_from(c.ahead).unwrap_or(0),
                now: c.now,
            })
        })
        .collect()
}

/// What a [`roll_off`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RollOff {
    /// The partitions it detached and dropped, oldest first per table.
    pub dropped: Vec<String>,
    /// Another roll-off held the lock and this one did nothing (only when not waiting).
    pub busy: bool,
}

#[derive(QueryableByName)]
struct Due {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Bool)]
    detach_pending: bool,
    #[diesel(sql_type = Bool)]
    detached: bool,
}

/// Detaches (`CONCURRENTLY`) and drops every partition whose upper bound is further behind
/// the database clock than its table's retention, finishes a detach a crash interrupted, and
/// drops a partition a failed roll-off detached but did not drop.
/// Before a partition of inbox records goes, each consumer's purge mark is raised to the
/// newest `processed_at` in it (then once more from the detached table, for a record a
/// transaction that began before the bound wrote late), so a duplicate of a dropped record is
/// refused as expired.
///
/// Roll-offs serialize on a session advisory lock: with `wait`, this one waits for another to
/// finish (and then finds its work done); without, it returns at once with
/// [`RollOff::busy`]. Each step commits on its own; a failure keeps the steps before it, and
/// the next roll-off resumes.
///
/// # Errors
///
/// [`Error::RollOffInTransaction`] inside a transaction, [`Error::NotPartitioned`], or
/// database failures.
pub fn roll_off(conn: &mut PgConnection, wait: bool) -> Result<RollOff> {
    if OutboxConnection::in_transaction(conn)? {
        return Err(Error::RollOffInTransaction);
    }
    if !is_partitioned(conn)? {
        return Err(Error::NotPartitioned);
    }
    let Flag { flag: locked } = if wait {
        diesel::sql_query(format!(
            "SELECT pg_advisory_lock({ROLL_OFF_LOCK}) IS NOT NULL AS flag"
        ))
        .get_result(conn)?
    } else {
        diesel::sql_query(format!(
            "SELECT pg_try_advisory_lock({ROLL_OFF_LOCK}) AS flag"
        ))
        .get_result(conn)?
    };
    if !locked {
        log::debug!("partition roll-off skipped: another one is running");
        return Ok(RollOff {
            dropped: Vec::new(),
            busy: true,
        });
    }
    let rolled = roll_off_locked(conn);
    let unlocked =
        diesel::sql_query(format!("SELECT pg_advisory_unlock({ROLL_OFF_LOCK})")).execute(conn);
    let dropped = rolled?;
    unlocked?;
    if !dropped.is_empty() {
        log::info!("rolled off partitions {dropped:?}");
    }
    Ok(RollOff {
        dropped,
        busy: false,
    })
}

fn roll_off_locked(conn: &mut PgConnection) -> Result<Vec<String>> {
    let mut dropped = Vec::new();
    for parent in [OUTBOX_HISTORY, INBOX_RECORDS] {
        let due: Vec<Due> = diesel::sql_query(format!(
            "WITH parts AS ({PARTITIONS}) \
             SELECT name, detach_pending, false AS detached FROM parts \
             WHERE detach_pending OR upper_bound <= statement_timestamp() - \
               (SELECT retain FROM waybill_partitioning WHERE parent = $1) \
             ORDER BY upper_bound"
        ))
        .bind::<Text, _>(parent)
        .load(conn)?;
        // Detached by a roll-off that failed before its DROP: standalone tables of our names.
        let left: Vec<Due> = diesel::sql_query(
            "SELECT c.relname::text AS name, false AS detach_pending, true AS detached \
             FROM pg_class c \
             WHERE c.relnamespace = (SELECT relnamespace FROM pg_class \
                                     WHERE oid = to_regclass($1)) \
               AND c.relkind = 'r' AND NOT c.relispartition \
               AND c.relname LIKE $1 || '\\_p%' \
             ORDER BY c.relname",
        )
        .bind::<Text, _>(parent)
        .load(conn)?;
        for Due {
            name,
            detach_pending,
            detached,
        } in left.into_iter().chain(due)
        {
            // Our own names only: they go into statements as identifiers.
            if !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                log::warn!("partition {name:?} of {parent} is not one of ours; left alone");
                continue;
            }
            if parent == INBOX_RECORDS {
                raise_purge_marks(conn, &name)?;
            }
            if !detached {
                let how = if detach_pending {
                    "FINALIZE"
                } else {
                    "CONCURRENTLY"
                };
                conn.batch_execute(&format!(
                    "ALTER TABLE {parent} DETACH PARTITION \"{name}\" {how}"
                ))?;
            }
            if parent == INBOX_RECORDS {
                raise_purge_marks(conn, &name)?;
            }
            conn.batch_execute(&format!("DROP TABLE \"{name}\""))?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Raises the purge mark of every consumer with records in `partition` to its newest
/// `processed_at` there, as a purge that deleted them would.
fn raise_purge_marks(conn: &mut PgConnection, partition: &str) -> Result<()> {
    conn.batch_execute(&format!(
        "INSERT INTO inbox_purges (consumer, purged_through) \
         SELECT consumer, max(processed_at) FROM \"{partition}\" GROUP BY consumer \
         ON CONFLICT (consumer) DO UPDATE SET purged_through = \
           greatest(inbox_purges.purged_through, EXCLUDED.purged_through)"
    ))?;
    Ok(())
}

/// What [`maintain`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Maintenance {
    /// Partitions made ahead.
    pub created: Vec<String>,
    /// The roll-off, or `None` when the layout is not partitioned.
    pub rolled_off: Option<RollOff>,
}

/// The relay's maintenance, once per purge interval: on the partitioned layout, makes the
/// partitions ahead and rolls off (skipping when another roll-off runs); on the plain layout,
/// nothing.
///
/// # Errors
///
/// As [`create_ahead`] and [`roll_off`].
pub fn maintain(conn: &mut PgConnection) -> Result<Maintenance> {
    if !is_partitioned(conn)? {
        return Ok(Maintenance::default());
    }
    let created = create_ahead(conn)?;
    let rolled_off = Some(roll_off(conn, false)?);
    Ok(Maintenance {
        created,
        rolled_off,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_width_must_be_whole_seconds() {
        assert!(PartitionConfig::default().check().is_ok());
        assert!(PartitionConfig::default()
            .width(Duration::from_millis(1500))
            .check()
            .is_err());
        assert!(PartitionConfig::default().ahead(0).check().is_err());
    }

    #[test]
    fn ready_until_follows_adjacent_partitions_from_now() {
        let at = |h: i64| DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::hours(h);
        let part = |from: i64, to: i64| Partition {
            name: format!("p{from}"),
            from: at(from),
            to: at(to),
            rows_estimate: 0,
            bytes: 0,
            detach_pending: false,
        };
        let mut table = PartitionedTable {
            parent: OUTBOX_HISTORY.into(),
            width: Duration::from_secs(3600),
            retention: Duration::from_secs(3600),
            ahead: 2,
            now: at(10) + chrono::TimeDelta::minutes(30),
            partitions: vec![part(8, 9), part(10, 11), part(11, 12), part(13, 14)],
        };
        assert_eq!(table.ready_until(), Some(at(12)));
        assert_eq!(
            table
                .due_for_roll_off()
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>(),
            ["p8"]
        );
        table.partitions.remove(1);
        assert_eq!(table.ready_until(), None);
    }
}
