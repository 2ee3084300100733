//! `process_once` makes every message take effect once per consumer, on every backend: under
//! redelivery, handler failures, concurrent duplicates, caller transactions and retention.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestDb};
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::BigInt;
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
    ($($conn:ty),*) => {$(
        impl Ledger for $conn {
            fn exec(conn: &mut Self, sql: &str) -> QueryResult<usize> {
                diesel::sql_query(sql).execute(conn)
            }
            fn count(conn: &mut Self, sql: &str) -> i64 {
                diesel::sql_query(sql).get_result::<Count>(conn).expect("count").n
            }
        }
    )*};
}
ledger!(SqliteConnection, PgConnection);
#[cfg(feature = "mysql")]
ledger!(MysqlConnection);

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

fn messages_older_than_the_window_are_expired_unless_accepted<C: Ledger>(db: TestDb<C>) {
    setup(&db);
    let old = delivery().with_sent_at(Utc::now() - chrono::Duration::days(8));
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let handler = |conn: &mut C| {
        C::record(conn, "old")?;
        Ok::<_, Error>(())
    };
    let inbox = Inbox::new("billing");
    assert_eq!(
        inbox.process_once(conn, &old, handler).unwrap(),
        Processed::Expired
    );
    assert_eq!(C::effects(conn), 0);
    assert_eq!(inbox.processed_count(conn).unwrap(), 0);
    let longer = Inbox::new("billing").retention(Duration::from_secs(30 * 24 * 3600));
    assert_eq!(
        longer.process_once(conn, &old, handler).unwrap(),
        Processed::Handled(())
    );
    let replay = Inbox::new("billing").accept_expired(true);
    assert_eq!(
        replay.process_once(conn, &old, handler).unwrap(),
        Processed::Duplicate
    );
    let other = delivery().with_sent_at(Utc::now() - chrono::Duration::days(8));
    assert_eq!(
        replay.process_once(conn, &other, handler).unwrap(),
        Processed::Handled(())
    );
    assert_eq!(C::effects(conn), 2);
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
    let empty = inbox.process_once_by(conn, DedupKey::business(""), &delivery(), |_| {
        Ok::<_, Error>(())
    });
    assert!(
        matches!(empty, Err(Error::InvalidInboxKey { chars: 0, .. })),
        "{empty:?}"
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

backend_tests!(
    duplicate_delivered_a_hundred_times_takes_effect_once,
    eight_concurrent_consumers_delivering_500_messages_take_effect_once_each,
    concurrent_duplicate_is_skipped_once_the_first_delivery_commits,
    concurrent_duplicate_is_handled_when_the_first_delivery_rolls_back,
    failed_handler_records_nothing_and_redelivery_handles_it,
    any_sequence_of_deliveries_and_failures_takes_effect_once_per_success,
    purge_deletes_old_records_in_bounded_batches,
    messages_older_than_the_window_are_expired_unless_accepted,
    business_key_deduplicates_messages_with_fresh_ids,
    caller_transaction_rollback_forgets_the_message,
    handler_failure_inside_a_caller_transaction_rolls_back_only_its_savepoint,
    duplicate_inside_a_caller_transaction_keeps_it_usable,
    handler_enqueues_outgoing_messages_with_the_record,
    consumers_process_the_same_message_once_each,
    enqueued_message_read_from_the_wire_is_processed_once,
);
