//! `process_once` makes every message take effect once per consumer, on every backend: under
//! redelivery, handler failures, concurrent duplicates, caller transactions and retention.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestDb};
use diesel::connection::InstrumentationEvent;
use diesel::migration::MigrationSource;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::BigInt;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use waybill_diesel::{
    enqueue, find_message, purge_processed_before, DedupKey, Error, Inbox, IncomingMessage,
    Processed,
};
use waybill_outbox_core::{MessageId, NewOutboxMessage, Retryable};

/// The test's own effects: a plain table with no unique constraint, so only the inbox can
/// prevent a double effect.
trait Ledger: Backend {
    fn exec(conn: &mut Self, sql: &str) -> QueryResult<usize>;
    fn count(conn: &mut Self, sql: &str) -> i64;
    /// Reverts the embedded migration whose name contains `name`, and only that one.
    fn revert_migration_named(conn: &mut Self, name: &str);
    /// This connection's session id, where the server can tell whether a session waits.
    fn session(conn: &mut Self) -> Option<i64>;
    /// Whether session `id` waits for a lock (MySQL: is inside an inbox statement).
    fn waits_for_lock(conn: &mut Self, id: i64) -> bool;

    fn create_ledger(conn: &mut Self) {
        Self::exec(conn, "CREATE TABLE ledger (k VARCHAR(100) NOT NULL)").expect("ledger");
    }
    fn record(conn: &mut Self, key: &str) -> QueryResult<usize> {
        Self::exec(conn, &format!("INSERT INTO ledger (k) VALUES ('{key}')"))
    }
    fn effects(conn: &mut Self) -> i64 {
        Self::count(conn, "SELECT COUNT(*) AS n FROM ledger")
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

macro_rules! ledger {
    ($($conn:ty => $migrations:expr, $session:expr, $waits:expr);*) => {$(
        impl Ledger for $conn {
            fn exec(conn: &mut Self, sql: &str) -> QueryResult<usize> {
                diesel::sql_query(sql).execute(conn)
            }
            fn count(conn: &mut Self, sql: &str) -> i64 {
                diesel::sql_query(sql).get_result::<Count>(conn).expect("count").n
            }
            fn session(conn: &mut Self) -> Option<i64> {
                (!$session.is_empty()).then(|| Self::count(conn, $session))
            }
            fn waits_for_lock(conn: &mut Self, id: i64) -> bool {
                Self::count(conn, &$waits.replace("{id}", &id.to_string())) > 0
            }
            fn revert_migration_named(conn: &mut Self, name: &str) {
                let source: EmbeddedMigrations = $migrations;
                let migrations = MigrationSource::<<$conn as Connection>::Backend>::migrations(&source)
                    .expect("embedded migrations");
                let migration = migrations
                    .iter()
                    .find(|m| m.name().to_string().contains(name))
                    .expect("the migration");
                conn.revert_migration(migration.as_ref()).expect("reverted");
            }
        }
    )*};
}
ledger!(
    SqliteConnection => waybill_diesel::sqlite::MIGRATIONS, "", "";
    PgConnection => waybill_diesel::pg::MIGRATIONS,
        "SELECT pg_backend_pid()::bigint AS n",
        "SELECT COUNT(*) AS n FROM pg_locks WHERE pid = {id} AND NOT granted"
);
#[cfg(feature = "mysql")]
ledger!(
    MysqlConnection => waybill_diesel::mysql::MIGRATIONS,
        "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n",
        // MariaDB leaves the waiting transaction out of INNODB_TRX; the session is seen
        // inside an inbox statement instead (its insert, or a locking read of the mark).
        "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
         WHERE ID = {id} AND INFO LIKE '%inbox\\_p%'"
);

/// A handler's own error type, which `process_once` must hand back unchanged.
#[derive(Debug)]
#[allow(dead_code)] // `Inbox` is read through `Debug` in assertion messages.
enum HandlerError {
    Refused(u32),
    Inbox(Error),
}

impl From<Error> for HandlerError {
    fn from(error: Error) -> Self {
        Self::Inbox(error)
    }
}

impl From<DieselError> for HandlerError {
    fn from(error: DieselError) -> Self {
        Self::Inbox(error.into())
    }
}

fn delivery() -> IncomingMessage {
    IncomingMessage::new(
        MessageId::new(),
        "orders",
        "OrderPlaced",
        br#"{"order_id":4231}"#.to_vec(),
    )
    .with_content_type("application/json")
    .with_partition_key("order:4231")
}

fn setup<C: Ledger>(db: &TestDb<C>) {
    C::create_ledger(&mut db.conn());
}

fn effects<C: Ledger>(db: &TestDb<C>) -> i64 {
    C::effects(&mut db.conn())
}

fn duplicate_delivered_a_hundred_times_takes_effect_once<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let mut handled = 0;
    for _ in 0..100 {
        match inbox
            .process_once(conn, &msg, |conn| {
                C::record(conn, &msg.id.to_string())?;
                Ok::<_, Error>(())
            })
            .expect("process")
        {
            Processed::Handled(()) => handled += 1,
            Processed::Duplicate => {}
            Processed::Expired => panic!("not expired"),
        }
    }
    assert_eq!(handled, 1);
    assert_eq!(C::effects(conn), 1);
    assert_eq!(inbox.processed_count(conn).unwrap(), 1);
    assert!(inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
}

fn eight_concurrent_consumers_delivering_500_messages_take_effect_once_each<C: Ledger>(
    db: TestDb<C>,
) {
    const THREADS: usize = 8;
    setup(&db);
    let inbox = Inbox::new("billing");
    let messages: Arc<Vec<IncomingMessage>> = Arc::new((0..500).map(|_| delivery()).collect());
    let barrier = Arc::new(Barrier::new(THREADS));
    let handled = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let (inbox, messages, barrier, pool) =
                    (&inbox, messages.clone(), barrier.clone(), &db.pool);
                scope.spawn(move || {
                    let mut order: Vec<usize> = (0..messages.len()).collect();
                    order.shuffle(&mut rand::rng());
                    let mut conn = pool.get().expect("one pooled connection per consumer");
                    barrier.wait();
                    let mut handled = 0;
                    for i in order {
                        let msg = &messages[i];
                        // A contended SQLite writer can still report "database is locked"
                        // (and MySQL a deadlock) despite the busy timeout; a real consumer
                        // would leave the message unacknowledged and get it redelivered, so
                        // the test redelivers it.
                        let outcome = loop {
                            match inbox.process_once(&mut conn, msg, |conn| {
                                C::record(conn, &msg.id.to_string())?;
                                Ok::<_, Error>(())
                            }) {
                                Err(error) if error.is_retryable() => continue,
                                other => break other.expect("process"),
                            }
                        };
                        if outcome.is_handled() {
                            handled += 1;
                        }
                    }
                    handled
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .sum::<usize>()
    });
    assert_eq!(handled, 500);
    assert_eq!(effects(&db), 500);
    assert_eq!(inbox.processed_count(&mut db.conn()).unwrap(), 500);
}

/// Two deliveries of one message at the same moment: the second waits for the first's
/// transaction and then sees the outcome of its commit or rollback.
fn concurrent_duplicate<C: Ledger>(db: &TestDb<C>, first_commits: bool) -> Processed<()> {
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let (inserted_tx, inserted_rx) = mpsc::channel();
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    let (pool, inbox, msg) = (&db.pool, &inbox, &msg);
    std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let mut conn = pool.get().unwrap();
            inbox.process_once(&mut conn, msg, |conn| {
                C::record(conn, "first")?;
                inserted_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                if first_commits {
                    Ok(())
                } else {
                    Err(HandlerError::Refused(1))
                }
            })
        });
        inserted_rx.recv().expect("first holds the record");
        let second = scope.spawn(move || {
            let mut conn = pool.get().unwrap();
            inbox.process_once(&mut conn, msg, |conn| {
                C::record(conn, "second")?;
                Ok::<_, HandlerError>(())
            })
        });
        finish_tx.send(()).unwrap();
        let first = first.join().unwrap();
        assert_eq!(first.is_ok(), first_commits, "{first:?}");
        second.join().unwrap().expect("second delivery")
    })
}

fn concurrent_duplicate_is_skipped_once_the_first_delivery_commits<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    assert_eq!(concurrent_duplicate(&db, true), Processed::Duplicate);
    assert_eq!(effects(&db), 1);
}

fn concurrent_duplicate_is_handled_when_the_first_delivery_rolls_back<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    assert_eq!(concurrent_duplicate(&db, false), Processed::Handled(()));
    assert_eq!(effects(&db), 1);
}

fn failed_handler_records_nothing_and_redelivery_handles_it<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let first = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "attempt")?;
        Err::<(), _>(HandlerError::Refused(7))
    });
    assert!(matches!(first, Err(HandlerError::Refused(7))), "{first:?}");
    assert!(!inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
    assert_eq!(C::effects(conn), 0);
    let second = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "attempt")?;
        Ok::<_, HandlerError>(42)
    });
    assert!(matches!(second, Ok(Processed::Handled(42))), "{second:?}");
    assert_eq!(C::effects(conn), 1);
}

fn any_sequence_of_deliveries_and_failures_takes_effect_once_per_success<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let strategy = proptest::collection::vec((0..6usize, any::<bool>()), 1..40);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(16));
    runner
        .run(&strategy, |deliveries| {
            let messages: Vec<_> = (0..6).map(|_| delivery()).collect();
            let mut pooled = db.conn();
            let conn: &mut C = &mut pooled;
            let before = C::effects(conn);
            let mut succeeded = HashSet::new();
            for (i, fails) in deliveries {
                let msg = &messages[i];
                let outcome = inbox.process_once(conn, msg, |conn| {
                    C::record(conn, &msg.id.to_string())?;
                    if fails {
                        Err(HandlerError::Refused(0))
                    } else {
                        Ok(())
                    }
                });
                match outcome {
                    Ok(Processed::Duplicate) => prop_assert!(succeeded.contains(&i)),
                    Ok(Processed::Handled(())) => {
                        prop_assert!(!fails);
                        prop_assert!(succeeded.insert(i));
                    }
                    Err(HandlerError::Refused(0)) => {
                        prop_assert!(fails && !succeeded.contains(&i))
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(C::effects(conn) - before, succeeded.len() as i64);
            Ok(())
        })
        .expect("effects equal the distinct successful deliveries");
}

fn purge_deletes_old_records_in_bounded_batches<C: Ledger>(db: TestDb<C>) {
    let billing = Inbox::new("billing");
    let shipping = Inbox::new("shipping");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let ok = |_: &mut C| Ok::<_, Error>(());
    for _ in 0..7 {
        assert!(billing
            .process_once(conn, &delivery(), ok)
            .unwrap()
            .is_handled());
    }
    for _ in 0..2 {
        assert!(shipping
            .process_once(conn, &delivery(), ok)
            .unwrap()
            .is_handled());
    }
    let an_hour_ago = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(purge_processed_before(conn, an_hour_ago, 3).unwrap(), 0);
    assert_eq!(
        billing.purge_processed(conn, 3).unwrap(),
        0,
        "within the window"
    );
    let later = Utc::now() + chrono::Duration::minutes(1);
    assert_eq!(
        conn.delete_inbox_records(Some("billing"), later, 3)
            .unwrap(),
        3,
        "one statement deletes one bounded batch"
    );
    let no_window = Inbox::new("billing").retention(Duration::ZERO);
    assert_eq!(no_window.purge_processed(conn, 3).unwrap(), 4);
    assert_eq!(billing.processed_count(conn).unwrap(), 0);
    assert_eq!(shipping.processed_count(conn).unwrap(), 2);
    assert_eq!(purge_processed_before(conn, later, 1).unwrap(), 2);
    assert_eq!(shipping.processed_count(conn).unwrap(), 0);
}

fn sent(offset: chrono::Duration) -> IncomingMessage {
    delivery().with_sent_at(Utc::now() + offset)
}

/// Deletes every record of every consumer (they were all processed before `later`).
fn purge_everything<C: Ledger>(conn: &mut C) -> u64 {
    purge_processed_before(conn, Utc::now() + chrono::Duration::minutes(1), 100).unwrap()
}

fn late_first_delivery_is_processed_unless_a_purge_may_have_deleted_its_record<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let billing = Inbox::new("billing");
    let shipping = Inbox::new("shipping");
    // Delayed, parked and requeued, or backlogged for a month: never delivered, so handled.
    let month_old = sent(-chrono::Duration::days(30));
    assert_eq!(
        billing.process_once(conn, &month_old, record).unwrap(),
        Processed::Handled(())
    );
    assert_eq!(
        billing.process_once(conn, &month_old, record).unwrap(),
        Processed::Duplicate
    );
    let purged = sent(-chrono::Duration::days(2));
    assert!(billing
        .process_once(conn, &purged, record)
        .unwrap()
        .is_handled());
    assert_eq!(purge_everything(conn), 2);
    assert_eq!(C::effects(conn), 2);

    // The purge deleted records processed just now: a message without a record sent before
    // that may have been one of them.
    for offset in [chrono::Duration::days(-30), chrono::Duration::hours(-1)] {
        let late = sent(offset);
        assert_eq!(
            billing.process_once(conn, &late, record).unwrap(),
            Processed::Expired,
            "sent {offset} from now"
        );
        assert!(!billing
            .is_processed(conn, &DedupKey::from(late.id))
            .unwrap());
        assert_eq!(
            billing
                .clone()
                .accept_expired(true)
                .process_once(conn, &late, record)
                .unwrap(),
            Processed::Handled(()),
            "a replay the caller knows to be safe"
        );
    }
    // Sent after the purge's reach (beyond the clock skew bound): it cannot have been purged.
    let fresh = sent(chrono::Duration::minutes(6));
    assert_eq!(
        billing.process_once(conn, &fresh, record).unwrap(),
        Processed::Handled(())
    );
    // Another consumer lost no record to that purge: its late first delivery is handled.
    assert_eq!(
        shipping.process_once(conn, &month_old, record).unwrap(),
        Processed::Handled(())
    );
    assert_eq!(C::effects(conn), 6);
}

fn redelivery_after_a_purge_is_refused_whichever_way_the_sender_clock_is_off<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let default_skew = Inbox::new("billing");
    let wide_skew = Inbox::new("shipping").max_clock_skew(Duration::from_secs(3600));
    let cases = [
        (&default_skew, chrono::Duration::minutes(4)),
        (&default_skew, chrono::Duration::minutes(-4)),
        (&default_skew, chrono::Duration::days(-3)),
        (&wide_skew, chrono::Duration::minutes(50)),
    ];
    let messages: Vec<_> = cases.iter().map(|(_, offset)| sent(*offset)).collect();
    for ((inbox, _), msg) in cases.iter().zip(&messages) {
        assert!(inbox.process_once(conn, msg, record).unwrap().is_handled());
    }
    // The consumer-wide purge and the all-consumers purge both leave their mark.
    assert_eq!(
        default_skew
            .clone()
            .retention(Duration::ZERO)
            .purge_processed(conn, 2)
            .unwrap(),
        3
    );
    assert_eq!(purge_everything(conn), 1);
    for ((inbox, offset), msg) in cases.iter().zip(&messages) {
        assert_eq!(
            inbox.process_once(conn, msg, record).unwrap(),
            Processed::Expired,
            "{} with the sender clock {offset} off",
            inbox.consumer()
        );
    }
    assert_eq!(C::effects(conn), 4, "each message took effect once");
}

/// A redelivery that arrives while a purge of its record is still uncommitted waits for the
/// purge (its insert needs the deleted row's lock) and must then see the purge's mark, not a
/// missing record. The purge commits only once the redelivery waits, where the server shows
/// that; SQLite's single writer cannot interleave them.
fn redelivery_racing_the_purge_of_its_record_is_refused<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    assert!(inbox
        .process_once(&mut *db.conn(), &msg, record)
        .unwrap()
        .is_handled());
    let (started_tx, started_rx) = mpsc::channel();
    let (pool, inbox, msg) = (&db.pool, &inbox, &msg);
    let outcome = std::thread::scope(|scope| {
        let mut pooled = db.conn();
        let purger: &mut C = &mut pooled;
        purger
            .transaction(|conn| {
                assert_eq!(purge_everything(conn), 1);
                let redelivery = scope.spawn(move || {
                    let mut pooled = pool.get().unwrap();
                    let conn: &mut C = &mut pooled;
                    started_tx.send(C::session(conn)).unwrap();
                    loop {
                        // SQLite's busy timeout may run out while the purge holds the lock.
                        match inbox.process_once(conn, msg, record) {
                            Err(error) if error.is_retryable() => continue,
                            other => break other,
                        }
                    }
                });
                if let Some(session) = started_rx.recv().unwrap() {
                    while !redelivery.is_finished() && !C::waits_for_lock(conn, session) {
                        std::thread::yield_now();
                    }
                }
                Ok::<_, Error>(redelivery)
            })
            .unwrap()
            .join()
            .unwrap()
    });
    assert_eq!(outcome.unwrap(), Processed::Expired);
    assert_eq!(effects(&db), 1);
}

fn business_key_deduplicates_messages_with_fresh_ids<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let mut outcomes = Vec::new();
    for key in ["order:4231", "order:4231", "order:4232"] {
        // The sender builds a fresh message (and id) on every retry of its own.
        outcomes.push(
            inbox
                .process_once_by(conn, DedupKey::business(key), &delivery(), |conn| {
                    C::record(conn, key)?;
                    Ok::<_, Error>(())
                })
                .unwrap(),
        );
    }
    assert_eq!(
        outcomes,
        [
            Processed::Handled(()),
            Processed::Duplicate,
            Processed::Handled(())
        ]
    );
    assert!(inbox
        .is_processed(conn, &DedupKey::business("order:4231"))
        .unwrap());
    assert_eq!(C::effects(conn), 2);
    // The longest key fits its column once prefixed, on every backend.
    let longest = DedupKey::business("é".repeat(255));
    for expected in [Processed::Handled(()), Processed::Duplicate] {
        let outcome =
            inbox.process_once_by(conn, longest.clone(), &delivery(), |_| Ok::<_, Error>(()));
        assert_eq!(outcome.unwrap(), expected);
    }
    let empty = inbox.process_once_by(conn, DedupKey::business(""), &delivery(), |_| {
        Ok::<_, Error>(())
    });
    assert!(
        matches!(empty, Err(Error::InvalidInboxKey { chars: 0, .. })),
        "{empty:?}"
    );
}

fn business_key_equal_to_another_messages_id_is_not_its_duplicate<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let by_id = delivery();
    assert!(inbox
        .process_once(conn, &by_id, record)
        .unwrap()
        .is_handled());
    let its_id = DedupKey::business(by_id.id.to_string());
    assert!(!inbox.is_processed(conn, &its_id).unwrap());
    assert_eq!(
        inbox
            .process_once_by(conn, its_id.clone(), &delivery(), record)
            .unwrap(),
        Processed::Handled(())
    );
    // And the other way round: a business key first, then the message whose id it reads as.
    let later = delivery();
    let key = DedupKey::business(later.id.to_string());
    assert!(inbox
        .process_once_by(conn, key, &delivery(), record)
        .unwrap()
        .is_handled());
    assert_eq!(
        inbox.process_once(conn, &later, record).unwrap(),
        Processed::Handled(())
    );
    assert_eq!(C::effects(conn), 4);
    assert_eq!(inbox.processed_count(conn).unwrap(), 4);
}

fn records_written_before_the_key_namespaces_keep_deduplicating<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    C::revert_migration_named(conn, "inbox_key_namespaces");
    // What the inbox wrote before: every key bare, the message id always recorded.
    let (by_business, by_id, by_own_id) = (delivery(), delivery(), delivery());
    let own_id = by_own_id.id.to_string();
    for (key, msg) in [
        ("order:1", &by_business),
        (own_id.as_str(), &by_own_id),
        (by_id.id.to_string().as_str(), &by_id),
    ] {
        assert!(conn
            .insert_inbox_record("billing", key, Some(msg.id), None)
            .unwrap());
    }
    waybill_diesel::run_migrations(conn).unwrap();

    let inbox = Inbox::new("billing");
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let business = |key: &str| DedupKey::business(key);
    assert_eq!(
        inbox
            .process_once_by(conn, business("order:1"), &delivery(), record)
            .unwrap(),
        Processed::Duplicate,
        "a business key, on a fresh message"
    );
    assert_eq!(
        inbox.process_once(conn, &by_id, record).unwrap(),
        Processed::Duplicate,
        "a message id"
    );
    assert_eq!(
        inbox
            .process_once_by(conn, business(&own_id), &by_own_id, record)
            .unwrap(),
        Processed::Duplicate,
        "a business key equal to its own message's id"
    );
    assert!(inbox.is_processed(conn, &business("order:1")).unwrap());
    // The old business-key row is not a record of its message's id.
    assert_eq!(
        inbox.process_once(conn, &by_business, record).unwrap(),
        Processed::Handled(())
    );
    assert_eq!(C::effects(conn), 1);

    // Down and up again, with a business key and an id that coincide once the prefix is gone:
    // down.sql keeps one of them, and every record still deduplicates afterwards.
    let its_id = business(&by_id.id.to_string());
    assert!(inbox
        .process_once_by(conn, its_id.clone(), &delivery(), record)
        .unwrap()
        .is_handled());
    C::revert_migration_named(conn, "inbox_key_namespaces");
    waybill_diesel::run_migrations(conn).unwrap();
    for key in [
        business("order:1"),
        DedupKey::from(by_id.id),
        DedupKey::from(by_business.id),
    ] {
        assert!(inbox.is_processed(conn, &key).unwrap(), "{key}");
    }
    assert_eq!(C::effects(conn), 2);
}

fn nul_in_a_consumer_name_or_business_key_is_refused_before_the_database<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let msg = delivery();
    // Inside a transaction: on PostgreSQL a statement the database refused would abort it.
    conn.transaction(|conn| {
        let bad_consumer = Inbox::new("bill\0ing");
        let refused = bad_consumer.process_once(conn, &msg, record);
        assert!(
            matches!(
                refused,
                Err(Error::InboxKeyWithNul {
                    what: "consumer name"
                })
            ),
            "{refused:?}"
        );
        assert!(matches!(
            bad_consumer.processed_count(conn),
            Err(Error::InboxKeyWithNul { .. })
        ));
        let inbox = Inbox::new("billing");
        let key = DedupKey::business("order:\0:1");
        let refused = inbox.process_once_by(conn, key.clone(), &msg, record);
        assert!(
            matches!(refused, Err(Error::InboxKeyWithNul { what: "dedup key" })),
            "{refused:?}"
        );
        assert!(matches!(
            inbox.is_processed(conn, &key),
            Err(Error::InboxKeyWithNul { .. })
        ));
        assert!(inbox.process_once(conn, &msg, record)?.is_handled());
        Ok::<_, Error>(())
    })
    .expect("the transaction is still usable and commits");
    assert_eq!(C::effects(conn), 1);
}

fn handler_panic_rolls_back_and_the_same_connection_commits_the_next_message<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let (panicking, next) = (delivery(), delivery());
    let unwound = catch_unwind(AssertUnwindSafe(|| {
        inbox.process_once(conn, &panicking, |conn| {
            C::record(conn, "panicked")?;
            if C::NAME.is_empty() {
                return Ok::<_, Error>(());
            }
            panic!("handler bug")
        })
    }));
    let payload = unwound.expect_err("the handler's panic reaches the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"handler bug"));
    assert!(!conn.in_transaction().unwrap(), "left no transaction open");
    let outcome = inbox.process_once(conn, &next, |conn| {
        C::record(conn, "next")?;
        Ok::<_, Error>(())
    });
    assert_eq!(outcome.unwrap(), Processed::Handled(()));
    // Seen from another connection: the next message committed, the panicked one did not.
    let mut other = db.conn();
    assert!(inbox
        .is_processed(&mut other, &DedupKey::from(next.id))
        .unwrap());
    assert!(!inbox
        .is_processed(&mut other, &DedupKey::from(panicking.id))
        .unwrap());
    assert_eq!(
        C::count(
            &mut other,
            "SELECT COUNT(*) AS n FROM ledger WHERE k = 'next'"
        ),
        1
    );
    assert_eq!(C::effects(&mut other), 1);
}

/// A statement that fails on every backend; on PostgreSQL it also aborts the transaction.
const FAILING: &str = "INSERT INTO no_such_table (k) VALUES ('x')";

fn handled_means_committed_even_when_the_handler_ignores_a_failed_statement<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let msg = delivery();
    let careless = |conn: &mut C| {
        let _ignored = C::exec(conn, FAILING);
        let _ignored = C::record(conn, "careless");
        Ok::<_, Error>(())
    };
    let outcome = inbox.process_once(conn, &msg, careless);
    let mut other = db.conn();
    let committed = inbox
        .is_processed(&mut other, &DedupKey::from(msg.id))
        .unwrap();
    match outcome {
        Ok(Processed::Handled(())) => {
            assert_ne!(C::NAME, "postgres", "an aborted transaction cannot commit");
            assert!(committed, "Handled means committed");
            assert_eq!(C::effects(&mut other), 1);
        }
        Err(Error::HandlerTransactionAborted {
            consumer,
            message_id,
        }) => {
            assert_eq!((consumer.as_str(), message_id), ("billing", msg.id));
            assert!(!committed);
            assert_eq!(C::effects(&mut other), 0);
            // Nothing was acknowledged: the redelivery is handled on the same connection.
            let again = inbox.process_once(conn, &msg, |conn| {
                C::record(conn, "careful")?;
                Ok::<_, Error>(())
            });
            assert_eq!(again.unwrap(), Processed::Handled(()));
            assert_eq!(C::effects(&mut other), 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// A commit that fails on its own (here a deferred unique constraint, checked at `COMMIT`) is
/// that error, not a handler that ignored a failed statement; nothing is recorded and the
/// redelivery is handled on the same connection. PostgreSQL only: MySQL has no deferred
/// constraints, SQLite defers only foreign keys.
fn failed_commit_is_its_own_error_and_records_nothing<C: Ledger>(db: TestDb<C>) {
    if C::NAME != "postgres" {
        return;
    }
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    C::exec(
        conn,
        "CREATE TABLE deferred_unique (k INT UNIQUE DEFERRABLE INITIALLY DEFERRED)",
    )
    .unwrap();
    let msg = delivery();
    let outcome = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "effect")?;
        C::exec(conn, "INSERT INTO deferred_unique (k) VALUES (1), (1)")?;
        Ok::<_, Error>(())
    });
    assert!(
        matches!(
            outcome,
            Err(Error::Database(DieselError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
            )))
        ),
        "{outcome:?}"
    );
    assert!(!conn.in_transaction().unwrap(), "left no transaction open");
    assert!(!inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
    assert_eq!(C::effects(conn), 0);
    let redelivery = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    });
    assert_eq!(redelivery.unwrap(), Processed::Handled(()));
    assert_eq!(C::effects(conn), 1);
}

/// A handler that ends the transaction with a `ROLLBACK` of its own took the record with its
/// writes: that is an error, never `Handled`, and the redelivery is handled. Not on MySQL:
/// diesel cannot see the transaction end there, and its `COMMIT` of no transaction succeeds.
fn handler_that_rolls_back_the_transaction_itself_is_not_handled<C: Ledger>(db: TestDb<C>) {
    if C::NAME == "mysql" {
        return;
    }
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let msg = delivery();
    let outcome = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "effect")?;
        C::exec(conn, "ROLLBACK")?;
        Ok::<_, Error>(())
    });
    let committed = inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap();
    assert!(outcome.is_err(), "{outcome:?}, committed: {committed}");
    assert!(!committed);
    assert_eq!(C::effects(conn), 0);
    let redelivery = inbox.process_once(conn, &msg, |conn| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    });
    assert_eq!(redelivery.unwrap(), Processed::Handled(()));
    assert_eq!(C::effects(conn), 1);
}

fn aborted_handler_inside_a_caller_transaction_rolls_back_only_its_savepoint<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let msg = delivery();
    let handled = conn
        .transaction(|conn| {
            C::record(conn, "outer")?;
            let outcome = inbox.process_once(conn, &msg, |conn| {
                let _ignored = C::exec(conn, FAILING);
                let _ignored = C::record(conn, "inner");
                Ok::<_, Error>(())
            });
            let handled = match outcome {
                Ok(Processed::Handled(())) => true,
                Err(Error::HandlerTransactionAborted { .. }) => false,
                other => panic!("unexpected {other:?}"),
            };
            C::record(conn, "after")?;
            Ok::<_, Error>(handled)
        })
        .expect("the caller's transaction commits");
    assert_eq!(handled, C::NAME != "postgres");
    assert_eq!(
        C::count(conn, "SELECT COUNT(*) AS n FROM ledger WHERE k <> 'inner'"),
        2,
        "the caller's own writes committed"
    );
    assert_eq!(
        C::count(conn, "SELECT COUNT(*) AS n FROM ledger WHERE k = 'inner'"),
        i64::from(handled)
    );
    assert_eq!(
        inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap(),
        handled
    );
}

fn caller_transaction_rollback_forgets_the_message<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let result = conn.transaction(|conn| {
        let outcome = inbox.process_once(conn, &msg, |conn| {
            C::record(conn, "inner")?;
            Ok::<_, Error>(())
        })?;
        assert_eq!(outcome, Processed::Handled(()));
        Err::<(), _>(Error::Database(DieselError::RollbackTransaction))
    });
    assert!(result.is_err());
    assert!(!inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
    assert_eq!(C::effects(conn), 0);
    let redelivery = inbox
        .process_once(conn, &msg, |conn| {
            C::record(conn, "inner")?;
            Ok::<_, Error>(())
        })
        .unwrap();
    assert_eq!(redelivery, Processed::Handled(()));
    assert_eq!(C::effects(conn), 1);
}

fn handler_failure_inside_a_caller_transaction_rolls_back_only_its_savepoint<C: Ledger>(
    db: TestDb<C>,
) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    conn.transaction(|conn| {
        C::record(conn, "outer")?;
        let failed = inbox.process_once(conn, &msg, |conn| {
            C::record(conn, "inner")?;
            Err::<(), _>(HandlerError::Refused(3))
        });
        assert!(matches!(failed, Err(HandlerError::Refused(3))));
        let retried = inbox.process_once(conn, &msg, |conn| {
            C::record(conn, "inner")?;
            Ok::<_, HandlerError>(())
        })?;
        assert_eq!(retried, Processed::Handled(()));
        Ok::<_, HandlerError>(())
    })
    .expect("the caller's transaction commits");
    assert_eq!(C::effects(conn), 2);
    assert_eq!(inbox.processed_count(conn).unwrap(), 1);
}

/// PostgreSQL aborts a transaction after a failed statement, and MySQL reports a duplicate key
/// as an error: a duplicate must still leave the caller's transaction usable on every backend.
fn duplicate_inside_a_caller_transaction_keeps_it_usable<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let ok = |_: &mut C| Ok::<_, Error>(());
    assert!(inbox.process_once(conn, &msg, ok).unwrap().is_handled());
    conn.transaction(|conn| {
        assert_eq!(inbox.process_once(conn, &msg, ok)?, Processed::Duplicate);
        C::record(conn, "after the duplicate")?;
        Ok::<_, Error>(())
    })
    .expect("the caller's transaction commits");
    assert_eq!(C::effects(conn), 1);
}

fn handler_enqueues_outgoing_messages_with_the_record<C: Ledger>(db: TestDb<C>) {
    let inbox = Inbox::new("billing");
    let msg = delivery();
    let reply = |key: &str| {
        NewOutboxMessage::json(
            "payments",
            key,
            "PaymentCaptured",
            &serde_json::json!({"order_id": 4231}),
        )
        .unwrap()
    };
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let lost = reply("order:4231");
    let failed = inbox.process_once(conn, &msg, |conn| {
        enqueue(conn, &lost)?;
        Err::<(), _>(HandlerError::Refused(9))
    });
    assert!(matches!(failed, Err(HandlerError::Refused(9))));
    assert_eq!(find_message(conn, lost.id()).unwrap(), None);
    assert!(!inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
    let sent = reply("order:4231");
    let outcome = inbox
        .process_once(conn, &msg, |conn| {
            Ok::<_, HandlerError>(enqueue(conn, &sent)?)
        })
        .unwrap();
    assert_eq!(outcome, Processed::Handled(sent.id()));
    assert!(find_message(conn, sent.id()).unwrap().is_some());
    assert!(inbox.is_processed(conn, &DedupKey::from(msg.id)).unwrap());
}

fn consumers_process_the_same_message_once_each<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let msg = delivery();
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    for round in 0..3 {
        for consumer in ["billing", "shipping"] {
            let outcome = Inbox::new(consumer)
                .process_once(conn, &msg, |conn| {
                    C::record(conn, consumer)?;
                    Ok::<_, Error>(())
                })
                .unwrap();
            assert_eq!(outcome.is_handled(), round == 0, "{consumer} round {round}");
        }
    }
    assert_eq!(
        C::count(conn, "SELECT COUNT(*) AS n FROM ledger WHERE k = 'billing'"),
        1
    );
    assert_eq!(
        C::count(
            conn,
            "SELECT COUNT(*) AS n FROM ledger WHERE k = 'shipping'"
        ),
        1
    );
}

fn enqueued_message_read_from_the_wire_is_processed_once<C: Ledger>(db: TestDb<C>) {
    let outgoing = NewOutboxMessage::json("orders", "order:1", "OrderPlaced", &[1, 2, 3])
        .unwrap()
        .with_header("correlation-id", "c-1");
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    enqueue(conn, &outgoing).unwrap();
    let stored = find_message(conn, outgoing.id()).unwrap().unwrap();
    let (headers, body) = waybill_inbox_core::wire::encode(&stored);
    let incoming = waybill_inbox_core::wire::decode(headers, body).unwrap();
    assert_eq!(incoming, IncomingMessage::from(&stored));
    let inbox = Inbox::new("billing");
    let read = |_: &mut C| Ok::<_, Error>(incoming.json::<Vec<i32>>().unwrap());
    assert_eq!(
        inbox.process_once(conn, &incoming, read).unwrap(),
        Processed::Handled(vec![1, 2, 3])
    );
    assert_eq!(
        inbox.process_once(conn, &incoming, read).unwrap(),
        Processed::Duplicate
    );
}

/// The statements one `process_once` sends, counted by diesel's instrumentation (one
/// `StartQuery` per round trip; a statement's first use is left out, when it may be prepared).
/// Pinned exactly, so an extra round trip fails here instead of only in a benchmark. A handled
/// message with one handler statement: on PostgreSQL `BEGIN`, the insert returning the purge
/// mark, the handler's, `SELECT 1; COMMIT` (a savepoint: `SAVEPOINT`, insert, handler's,
/// `RELEASE`), as the hand-written floor; on SQLite and MySQL the mark is a statement of its
/// own. With `accept_expired` no mark is read.
fn a_handled_message_costs_a_fixed_number_of_statements<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let sent = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&sent);
    conn.set_instrumentation(move |event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            log.lock().unwrap().push(query.to_string());
        }
    });
    let record = |conn: &mut C| {
        C::record(conn, "effect")?;
        Ok::<_, Error>(())
    };
    let count = |conn: &mut C, inbox: &Inbox, nested: bool| {
        let handle = |conn: &mut C| {
            if nested {
                conn.transaction(|conn| inbox.process_once(conn, &delivery(), record))
            } else {
                inbox.process_once(conn, &delivery(), record)
            }
        };
        assert!(handle(conn).unwrap().is_handled(), "warming up");
        sent.lock().unwrap().clear();
        assert!(handle(conn).unwrap().is_handled());
        let statements = std::mem::take(&mut *sent.lock().unwrap());
        // The caller's own BEGIN and COMMIT are not `process_once`'s.
        let ours = statements.len() - if nested { 2 } else { 0 };
        (ours, statements)
    };
    // BEGIN, the insert, the handler's statement, COMMIT; plus the mark's read where it is
    // not part of the insert.
    let floor = 4;
    let mark_read_apart = usize::from(C::NAME != "postgres");
    for (what, inbox, nested, expected) in [
        (
            "own transaction",
            Inbox::new("billing"),
            false,
            floor + mark_read_apart,
        ),
        (
            "savepoint",
            Inbox::new("billing"),
            true,
            floor + mark_read_apart,
        ),
        (
            "accept_expired",
            Inbox::new("billing").accept_expired(true),
            false,
            floor,
        ),
    ] {
        let (ours, statements) = count(conn, &inbox, nested);
        assert_eq!(ours, expected, "{} ({what}) sent {statements:#?}", C::NAME);
    }
    assert_eq!(C::effects(conn), 6);
}

backend_tests!(
    duplicate_delivered_a_hundred_times_takes_effect_once,
    eight_concurrent_consumers_delivering_500_messages_take_effect_once_each,
    concurrent_duplicate_is_skipped_once_the_first_delivery_commits,
    concurrent_duplicate_is_handled_when_the_first_delivery_rolls_back,
    failed_handler_records_nothing_and_redelivery_handles_it,
    any_sequence_of_deliveries_and_failures_takes_effect_once_per_success,
    purge_deletes_old_records_in_bounded_batches,
    late_first_delivery_is_processed_unless_a_purge_may_have_deleted_its_record,
    redelivery_after_a_purge_is_refused_whichever_way_the_sender_clock_is_off,
    redelivery_racing_the_purge_of_its_record_is_refused,
    business_key_deduplicates_messages_with_fresh_ids,
    business_key_equal_to_another_messages_id_is_not_its_duplicate,
    records_written_before_the_key_namespaces_keep_deduplicating,
    nul_in_a_consumer_name_or_business_key_is_refused_before_the_database,
    handler_panic_rolls_back_and_the_same_connection_commits_the_next_message,
    handled_means_committed_even_when_the_handler_ignores_a_failed_statement,
    failed_commit_is_its_own_error_and_records_nothing,
    handler_that_rolls_back_the_transaction_itself_is_not_handled,
    aborted_handler_inside_a_caller_transaction_rolls_back_only_its_savepoint,
    caller_transaction_rollback_forgets_the_message,
    handler_failure_inside_a_caller_transaction_rolls_back_only_its_savepoint,
    duplicate_inside_a_caller_transaction_keeps_it_usable,
    handler_enqueues_outgoing_messages_with_the_record,
    consumers_process_the_same_message_once_each,
    enqueued_message_read_from_the_wire_is_processed_once,
    a_handled_message_costs_a_fixed_number_of_statements,
);
