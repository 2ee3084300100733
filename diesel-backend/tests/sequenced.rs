//! Sequenced messages (issue 25), on every backend: `enqueue` numbers a key's messages in
//! commit order, and `process_in_order` applies them in that order, once, holding back or
//! parking what comes after a gap, refusing a producer whose counter went back, and moving
//! past an operator's skip.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Backend, TestDb};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use waybill_diesel::{
    enqueue, enqueue_all, find_message, inbox_gaps, inbox_marks, rotate_sequence_epoch, skip,
    Error, FirstMessage, InOrder, InOrderConnection, Inbox, IncomingMessage, OpsConnection,
};
use waybill_outbox_core::sequence::{SKIPPED_HEADER, SKIP_MARKER_TYPE};
use waybill_outbox_core::{MessageId, NewOutboxMessage, Stamp, Status};

/// What the suites need of a backend beyond the common harness.
trait Seq: Backend + InOrderConnection + OpsConnection {
    fn exec(conn: &mut Self, sql: &str) -> QueryResult<usize>;
    fn count(conn: &mut Self, sql: &str) -> i64;
    /// This session's id, where the server can tell whether a session waits for a lock.
    fn session(conn: &mut Self) -> Option<i64>;
    /// Whether session `id` waits for the key's counter row.
    fn waits_for_counter(conn: &mut Self, id: i64) -> bool;
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

macro_rules! seq {
    ($($conn:ty => $session:expr, $waits:expr);*) => {$(
        impl Seq for $conn {
            fn exec(conn: &mut Self, sql: &str) -> QueryResult<usize> {
                diesel::sql_query(sql).execute(conn)
            }
            fn count(conn: &mut Self, sql: &str) -> i64 {
                diesel::sql_query(sql).get_result::<Count>(conn).expect("count").n
            }
            fn session(conn: &mut Self) -> Option<i64> {
                (!$session.is_empty()).then(|| Self::count(conn, $session))
            }
            fn waits_for_counter(conn: &mut Self, id: i64) -> bool {
                Self::count(conn, &$waits.replace("{id}", &id.to_string())) > 0
            }
        }
    )*};
}
seq!(
    SqliteConnection => "", "";
    PgConnection => "SELECT pg_backend_pid()::bigint AS n",
        "SELECT COUNT(*) AS n FROM pg_locks WHERE pid = {id} AND NOT granted"
);
#[cfg(feature = "mysql")]
seq!(
    MysqlConnection => "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n",
        "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST \
         WHERE ID = {id} AND INFO LIKE '%outbox\\_key\\_sequences%'"
);

fn step(key: &str, name: &str) -> NewOutboxMessage {
    NewOutboxMessage::bytes("orders", key, name, "text/plain", name.as_bytes().to_vec()).sequenced()
}

/// Enqueues `message` in a transaction of its own; returns its id.
fn send<C: Seq>(conn: &mut C, message: &NewOutboxMessage) -> MessageId {
    conn.transaction(|conn| enqueue(conn, message))
        .expect("enqueued")
}

/// The stored message as a consumer receives it.
fn received<C: Seq>(conn: &mut C, id: MessageId) -> IncomingMessage {
    IncomingMessage::from(find_message(conn, id).expect("read").expect("stored"))
}

fn number<C: Seq>(conn: &mut C, id: MessageId) -> u64 {
    let stored = find_message(conn, id).expect("read").expect("stored");
    stored
        .stamp()
        .expect("sequenced")
        .expect("a number")
        .sequence
}

fn create_effects<C: Seq>(conn: &mut C) {
    C::exec(conn, "CREATE TABLE effects (name VARCHAR(100) NOT NULL)").expect("effects table");
}

fn effects<C: Seq>(conn: &mut C) -> i64 {
    C::count(conn, "SELECT COUNT(*) AS n FROM effects")
}

/// Applies `message` for `inbox`, recording one effect when the handler runs.
fn apply<C: Seq>(
    inbox: &Inbox,
    conn: &mut C,
    message: &IncomingMessage,
) -> waybill_diesel::Result<InOrder<()>> {
    inbox.process_in_order(conn, message, |conn| {
        C::exec(
            conn,
            &format!(
                "INSERT INTO effects (name) VALUES ('{}')",
                message.message_type
            ),
        )?;
        Ok(())
    })
}

// ---------------------------------------------------------------- producer

fn sequenced_messages_are_numbered_from_one_per_topic_and_key<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    let a1 = send(&mut *conn, &step("order:1", "A1"));
    let b1 = send(&mut *conn, &step("order:2", "B1"));
    let a2 = send(&mut *conn, &step("order:1", "A2"));
    let other = NewOutboxMessage::bytes("payments", "order:1", "P1", "text/plain", "x").sequenced();
    let p1 = send(&mut *conn, &other);
    let plain = send(
        &mut *conn,
        &NewOutboxMessage::bytes("orders", "order:1", "Plain", "text/plain", "x"),
    );
    assert_eq!(
        [a1, b1, a2, p1].map(|id| number(&mut *conn, id)),
        [1, 1, 2, 1]
    );
    let stored = find_message(&mut *conn, plain).unwrap().unwrap();
    assert_eq!(
        stored.stamp(),
        None,
        "an unsequenced message carries no number"
    );
    let epoch = find_message(&mut *conn, a1)
        .unwrap()
        .unwrap()
        .stamp()
        .unwrap()
        .unwrap()
        .epoch;
    assert!(
        !epoch.is_empty(),
        "the producer epoch travels with the number"
    );
}

fn enqueue_all_numbers_a_batch_in_its_order<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    send(&mut *conn, &step("k", "first"));
    let batch = vec![
        step("k", "b1"),
        step("j", "b2"),
        NewOutboxMessage::bytes("orders", "k", "plain", "text/plain", "x"),
        step("k", "b3"),
    ];
    conn.transaction(|conn| enqueue_all(conn, &batch)).unwrap();
    let numbers: Vec<Option<u64>> = batch
        .iter()
        .map(|m| {
            let stored = find_message(&mut *conn, m.id()).unwrap().unwrap();
            stored.stamp().map(|s| s.unwrap().sequence)
        })
        .collect();
    assert_eq!(numbers, [Some(2), Some(1), None, Some(3)]);
}

fn a_rolled_back_enqueue_leaves_no_gap<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    send(&mut *conn, &step("k", "one"));
    let rolled_back: Result<(), Error> = conn.transaction(|conn| {
        enqueue(conn, &step("k", "lost"))?;
        Err(Error::NotInTransaction(0))
    });
    assert!(rolled_back.is_err());
    let two = send(&mut *conn, &step("k", "two"));
    assert_eq!(
        number(&mut *conn, two),
        2,
        "the rolled-back number is handed out again"
    );
}

fn a_sequenced_enqueue_outside_a_transaction_is_refused<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    let msg = step("k", "one");
    let refused = enqueue(&mut *conn, &msg);
    assert!(
        matches!(refused, Err(Error::SequencedOutsideTransaction(id)) if id == msg.id()),
        "{refused:?}"
    );
    assert!(find_message(&mut *conn, msg.id()).unwrap().is_none());
    let next = send(&mut *conn, &step("k", "two"));
    assert_eq!(number(&mut *conn, next), 1, "nothing was drawn");
}

fn a_failed_insert_gives_its_number_back<C: Seq>(db: TestDb<C>) {
    if C::NAME == "postgres" {
        // There the failed insert aborts the caller's transaction: nothing can commit.
        return;
    }
    let mut conn = db.conn();
    let one = step("k", "one");
    send(&mut *conn, &one);
    // The caller ignores the duplicate-id error and commits: no number may be lost.
    conn.transaction(|conn| {
        let again = step("k", "again").with_id(one.id());
        assert!(matches!(
            enqueue(conn, &again),
            Err(Error::DuplicateMessageId(_))
        ));
        Ok::<_, Error>(())
    })
    .unwrap();
    let two = send(&mut *conn, &step("k", "two"));
    assert_eq!(number(&mut *conn, two), 2);
}

fn a_writer_of_a_key_waits_for_the_other_and_numbers_follow_commit_order<C: Seq>(db: TestDb<C>) {
    let mut first = db.conn();
    let mut second = db.conn();
    let mut watcher = db.conn();
    let Some(second_session) = C::session(&mut *second) else {
        return; // SQLite has one writer at a time; the threaded test below covers it.
    };
    let a = step("k", "A");
    let b = step("k", "B");
    thread::scope(|scope| {
        first
            .transaction(|first| {
                enqueue(first, &a)?;
                // The second writer starts while the first holds the key: it must wait.
                let writer = scope.spawn(|| {
                    second
                        .transaction(|second| enqueue(second, &b))
                        .expect("second enqueue")
                });
                let started = Instant::now();
                while !C::waits_for_counter(&mut *watcher, second_session) {
                    assert!(
                        !writer.is_finished(),
                        "the second writer of the key did not wait"
                    );
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "never seen waiting"
                    );
                    thread::sleep(Duration::from_millis(2));
                }
                Ok::<_, Error>(())
            })
            .expect("first commits");
    });
    assert_eq!(
        [number(&mut *watcher, a.id()), number(&mut *watcher, b.id())],
        [1, 2]
    );
    let (sa, sb) = (
        find_message(&mut *watcher, a.id()).unwrap().unwrap().seq,
        find_message(&mut *watcher, b.id()).unwrap().unwrap().seq,
    );
    assert!(sa < sb, "the relay's order (seq) is the numbers' order");
}

fn eight_writers_of_one_key_get_every_number_once_in_outbox_order<C: Seq>(db: TestDb<C>) {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let ids: Vec<MessageId> = thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let pool = db.pool.clone();
                scope.spawn(move || {
                    let mut conn = pool.get().unwrap();
                    (0..EACH)
                        .map(|i| {
                            let msg = step("hot", &format!("w{w}-{i}"));
                            loop {
                                match conn.transaction(|conn| enqueue(conn, &msg)) {
                                    Ok(id) => break id,
                                    // SQLite's busy writer, a deadlock victim: try again.
                                    Err(e) if waybill_outbox_core::Retryable::is_retryable(&e) => {}
                                    Err(e) => panic!("enqueue failed: {e}"),
                                }
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut conn = db.conn();
    let mut stored: Vec<(i64, u64)> = ids
        .iter()
        .map(|id| {
            let m = find_message(&mut *conn, *id).unwrap().unwrap();
            (m.seq, m.stamp().unwrap().unwrap().sequence)
        })
        .collect();
    stored.sort_unstable();
    let numbers: Vec<u64> = stored.iter().map(|(_, n)| *n).collect();
    let expected: Vec<u64> = (1..=(WRITERS * EACH) as u64).collect();
    assert_eq!(
        numbers, expected,
        "in outbox order, the numbers are 1..=200 with no gap"
    );
}

// ---------------------------------------------------------------- consumer

fn each_number_is_applied_once_in_order_and_duplicates_are_skipped_forever<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=3)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    let msgs: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    let inbox = Inbox::new("billing");
    let outcomes: Vec<InOrder<()>> = [0, 1, 0, 2, 1, 2]
        .iter()
        .map(|&i| apply(&inbox, &mut *conn, &msgs[i]).unwrap())
        .collect();
    assert_eq!(
        outcomes,
        [
            InOrder::Handled(()),
            InOrder::Handled(()),
            InOrder::Duplicate,
            InOrder::Handled(()),
            InOrder::Duplicate,
            InOrder::Duplicate
        ]
    );
    assert_eq!(effects(&mut *conn), 3);
    let marks = inbox_marks(&mut *conn, Some("billing"), 10).unwrap();
    assert_eq!(
        marks.len(),
        1,
        "one row per key, whatever the number of messages"
    );
    assert_eq!(
        (marks[0].partition_key.as_str(), marks[0].last_sequence),
        ("k", 3)
    );
    assert_eq!(marks[0].source, "urn:waybill:orders");
    // Another consumer keeps its own mark.
    assert_eq!(
        apply(&Inbox::new("shipping"), &mut *conn, &msgs[0]).unwrap(),
        InOrder::Handled(())
    );
}

fn a_gap_is_held_then_parked_with_its_reason_and_listed_until_filled<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=3)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    let msgs: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    let patient = Inbox::new("billing").max_gap_wait(Duration::from_secs(3600));
    assert_eq!(
        apply(&patient, &mut *conn, &msgs[0]).unwrap(),
        InOrder::Handled(())
    );
    let held = apply(&patient, &mut *conn, &msgs[2]).unwrap();
    assert!(
        matches!(
            held,
            InOrder::Held {
                expected: 2,
                got: 3,
                ..
            }
        ),
        "{held:?}"
    );
    assert_eq!(effects(&mut *conn), 1, "nothing ran for the held message");
    let gaps = inbox_gaps(&mut *conn, Some("billing")).unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].expected, gaps[0].got, gaps[0].parked),
        (2, 3, false)
    );
    assert_eq!(gaps[0].message_id, ids[2].to_string());
    // The same consumer with no patience left parks it, with the reason operators see.
    let impatient = Inbox::new("billing").max_gap_wait(Duration::ZERO);
    assert_eq!(
        apply(&impatient, &mut *conn, &msgs[2]).unwrap(),
        InOrder::GapParked {
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        waybill_inbox_core::gap_reason(2, 3),
        "gap: expected 2, got 3"
    );
    let gaps = inbox_gaps(&mut *conn, None).unwrap();
    assert!(gaps[0].parked, "listed as parked");
    // The missing message arrives: both apply, and the gap is no longer listed.
    assert_eq!(
        apply(&patient, &mut *conn, &msgs[1]).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(
        apply(&patient, &mut *conn, &msgs[2]).unwrap(),
        InOrder::Handled(())
    );
    assert!(inbox_gaps(&mut *conn, None).unwrap().is_empty());
    assert_eq!(effects(&mut *conn), 3);
}

fn a_failed_handler_records_nothing_and_the_redelivery_applies<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let id = send(&mut *conn, &step("k", "s1"));
    let msg = received(&mut *conn, id);
    let inbox = Inbox::new("billing");
    let failed: Result<InOrder<()>, Error> = inbox.process_in_order(&mut *conn, &msg, |conn| {
        C::exec(conn, "INSERT INTO effects (name) VALUES ('x')")?;
        Err(Error::NotInTransaction(1))
    });
    assert!(matches!(failed, Err(Error::NotInTransaction(1))));
    assert_eq!(effects(&mut *conn), 0);
    assert!(
        inbox_marks(&mut *conn, None, 10).unwrap().is_empty(),
        "no mark moved"
    );
    assert_eq!(
        apply(&inbox, &mut *conn, &msg).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(effects(&mut *conn), 1);
}

fn a_consumer_joining_late_starts_where_it_is_told<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=4)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    let msgs: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    let strict = Inbox::new("strict").max_gap_wait(Duration::ZERO);
    assert_eq!(
        apply(&strict, &mut *conn, &msgs[2]).unwrap(),
        InOrder::GapParked {
            expected: 1,
            got: 3
        },
        "by default a key must start at 1"
    );
    let from_now = Inbox::new("from-now").first_message(FirstMessage::StartAnywhere);
    assert_eq!(
        apply(&from_now, &mut *conn, &msgs[2]).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(
        apply(&from_now, &mut *conn, &msgs[1]).unwrap(),
        InOrder::Duplicate
    );
    assert_eq!(
        apply(&from_now, &mut *conn, &msgs[3]).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(effects(&mut *conn), 2);
}

fn a_producer_whose_counter_went_back_is_refused_not_skipped<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=3)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    let old: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    let inbox = Inbox::new("billing");
    for msg in &old {
        assert_eq!(
            apply(&inbox, &mut *conn, msg).unwrap(),
            InOrder::Handled(())
        );
    }
    // A restore to a backup taken after number 1, and the operator's epoch rotation.
    C::exec(
        &mut *conn,
        "UPDATE outbox_key_sequences SET last_sequence = 1",
    )
    .unwrap();
    rotate_sequence_epoch(&mut *conn).unwrap();
    let new_two = send(&mut *conn, &step("k", "new2"));
    let new_two = received(&mut *conn, new_two);
    assert_eq!(new_two.sequence.as_ref().unwrap().stamp.sequence, 2);
    let refused = apply(&inbox, &mut *conn, &new_two);
    assert!(
        matches!(
            &refused,
            Err(Error::SequenceRegression(r)) if r.got == 2 && r.last == 3
        ),
        "{refused:?}"
    );
    assert_eq!(effects(&mut *conn), 3, "refused, not applied");
    // The operator moves the counter past what consumers applied; numbers then continue
    // under the new epoch, which the mark adopts, while late redeliveries of the old epoch
    // stay duplicates.
    C::exec(
        &mut *conn,
        "UPDATE outbox_key_sequences SET last_sequence = 3",
    )
    .unwrap();
    let four = send(&mut *conn, &step("k", "new4"));
    let four = received(&mut *conn, four);
    assert_eq!(
        apply(&inbox, &mut *conn, &four).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(
        apply(&inbox, &mut *conn, &old[1]).unwrap(),
        InOrder::Duplicate
    );
    assert!(matches!(
        apply(&inbox, &mut *conn, &new_two),
        Err(Error::SequenceRegression(_))
    ));
}

fn the_epoch_changes_when_the_counter_table_is_restored_or_rotated<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    let epoch_of = |conn: &mut C, id| {
        let stored = find_message(conn, id).unwrap().unwrap();
        stored.stamp().unwrap().unwrap().epoch
    };
    let one = send(&mut *conn, &step("k", "one"));
    let first = epoch_of(&mut conn, one);
    let two = send(&mut *conn, &step("k", "two"));
    assert_eq!(
        epoch_of(&mut conn, two),
        first,
        "stable while nothing happens"
    );
    if C::NAME == "postgres" {
        // A dump restored into the same cluster recreates the table: no operator step needed.
        for sql in [
            "CREATE TABLE saved AS SELECT * FROM outbox_key_sequences",
            "DROP TABLE outbox_key_sequences",
            "CREATE TABLE outbox_key_sequences (LIKE saved INCLUDING ALL, PRIMARY KEY (topic, partition_key))",
            "INSERT INTO outbox_key_sequences SELECT * FROM saved",
        ] {
            C::exec(&mut *conn, sql).unwrap();
        }
        let three = send(&mut *conn, &step("k", "three"));
        assert_eq!(number(&mut *conn, three), 3);
        assert_ne!(
            epoch_of(&mut conn, three),
            first,
            "a recreated counter table is a new epoch"
        );
    }
    let before = {
        let id = send(&mut *conn, &step("k", "before"));
        epoch_of(&mut conn, id)
    };
    rotate_sequence_epoch(&mut *conn).unwrap();
    let after = send(&mut *conn, &step("k", "after"));
    assert_ne!(
        epoch_of(&mut conn, after),
        before,
        "rotate-epoch draws a new one"
    );
}

fn an_operator_skip_publishes_a_marker_that_moves_consumers_past_it<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=3)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    C::exec(
        &mut *conn,
        "UPDATE outbox_messages SET status = 2 WHERE message_type = 's2'",
    )
    .unwrap();
    skip(&mut *conn, ids[1], "poison payload", "ops").unwrap();
    let marker = find_message(&mut *conn, ids[1])
        .unwrap()
        .expect("the marker takes its place");
    assert_eq!(
        marker.status,
        Status::Pending,
        "the relay publishes the marker"
    );
    assert_eq!(marker.message_type, SKIP_MARKER_TYPE);
    assert!(marker.payload.is_empty());
    assert_eq!(
        marker.headers.get(SKIPPED_HEADER).map(String::as_str),
        Some("poison payload")
    );
    assert_eq!(marker.stamp().unwrap().unwrap().sequence, 2);
    let msgs: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    let inbox = Inbox::new("billing");
    assert_eq!(
        apply(&inbox, &mut *conn, &msgs[0]).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(
        apply(&inbox, &mut *conn, &msgs[1]).unwrap(),
        InOrder::Skipped {
            reason: "poison payload".into()
        }
    );
    assert_eq!(
        apply(&inbox, &mut *conn, &msgs[2]).unwrap(),
        InOrder::Handled(())
    );
    assert_eq!(effects(&mut *conn), 2, "the skipped message never ran");
    // An unsequenced message is still deleted by a skip.
    let plain = NewOutboxMessage::bytes("orders", "p", "plain", "text/plain", "x");
    let plain_id = send(&mut *conn, &plain);
    C::exec(
        &mut *conn,
        "UPDATE outbox_messages SET status = 2 WHERE message_type = 'plain'",
    )
    .unwrap();
    skip(&mut *conn, plain_id, "r", "ops").unwrap();
    assert!(find_message(&mut *conn, plain_id).unwrap().is_none());
}

fn a_message_without_a_number_is_refused_in_order<C: Seq>(db: TestDb<C>) {
    let mut conn = db.conn();
    let plain = IncomingMessage::new(MessageId::new(), "orders", "T", "x");
    let refused =
        Inbox::new("billing").process_in_order(&mut *conn, &plain, |_| Ok::<_, Error>(()));
    assert!(
        matches!(refused, Err(Error::NotSequenced { .. })),
        "{refused:?}"
    );
}

fn concurrent_consumers_apply_a_key_in_order_each_once<C: Seq>(db: TestDb<C>) {
    const MESSAGES: u64 = 40;
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let msgs: Vec<IncomingMessage> = (1..=MESSAGES)
        .map(|i| {
            let id = send(&mut *conn, &step("k", &format!("s{i}")));
            received(&mut *conn, id)
        })
        .collect();
    drop(conn);
    // Two consumers each take every message in order and retry a held one, as a consumer
    // loop does; each number must take effect once, in order.
    let inbox = Inbox::new("billing").max_gap_wait(Duration::from_secs(3600));
    thread::scope(|scope| {
        for _ in 0..2 {
            let pool = db.pool.clone();
            let (inbox, msgs) = (&inbox, &msgs);
            scope.spawn(move || {
                let mut conn = pool.get().unwrap();
                for msg in msgs {
                    loop {
                        let outcome = inbox.process_in_order(&mut *conn, msg, |conn| {
                            C::exec(
                                conn,
                                &format!(
                                    "INSERT INTO effects (name) VALUES ('{}')",
                                    msg.message_type
                                ),
                            )?;
                            Ok::<_, Error>(())
                        });
                        match outcome {
                            Ok(o) if o.is_done() => break,
                            Ok(other) => panic!("unexpected {other:?}"),
                            Err(e) if waybill_outbox_core::Retryable::is_retryable(&e) => {}
                            Err(e) => panic!("failed: {e}"),
                        }
                    }
                }
            });
        }
    });
    let mut conn = db.conn();
    assert_eq!(effects(&mut *conn), MESSAGES as i64);
    let marks = inbox_marks(&mut *conn, None, 10).unwrap();
    assert_eq!(marks[0].last_sequence, MESSAGES);
}

fn the_in_order_handler_acks_retries_a_gap_and_dead_letters_what_cannot_apply<C: Seq>(
    db: TestDb<C>,
) {
    use waybill_diesel::InboxHandler;
    use waybill_inbox_core::{DeliveryHandler, Disposition};
    let mut conn = db.conn();
    create_effects(&mut *conn);
    let ids: Vec<MessageId> = (1..=2)
        .map(|i| send(&mut *conn, &step("k", &format!("s{i}"))))
        .collect();
    let msgs: Vec<IncomingMessage> = ids.iter().map(|id| received(&mut *conn, *id)).collect();
    drop(conn);
    type Pooled<C> = diesel::r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>;
    let handler_fn = |conn: &mut Pooled<C>, msg: &IncomingMessage| {
        let sql = format!("INSERT INTO effects (name) VALUES ('{}')", msg.message_type);
        C::exec(&mut **conn, &sql)?;
        Ok::<_, Error>(())
    };
    let patient = Inbox::new("billing").max_gap_wait(Duration::from_secs(3600));
    let mut handler = InboxHandler::new(db.pool.clone(), patient, handler_fn).in_order();
    assert_eq!(
        handler.handle(&msgs[1]),
        Disposition::Retry("gap: expected 1, got 2".into())
    );
    let impatient = Inbox::new("billing").max_gap_wait(Duration::ZERO);
    let mut parking = InboxHandler::new(db.pool.clone(), impatient, handler_fn).in_order();
    assert_eq!(
        parking.handle(&msgs[1]),
        Disposition::DeadLetter("gap: expected 1, got 2".into())
    );
    assert_eq!(handler.handle(&msgs[0]), Disposition::Ack);
    assert_eq!(handler.handle(&msgs[1]), Disposition::Ack);
    assert_eq!(handler.handle(&msgs[0]), Disposition::Ack);
    assert_eq!(handler.duplicates(), 1);
    assert_eq!(effects(&mut *db.conn()), 2);
    let plain = IncomingMessage::new(MessageId::new(), "orders", "T", "x");
    assert!(
        matches!(handler.handle(&plain), Disposition::DeadLetter(reason) if reason.starts_with("refused: ")),
        "a message without a number is dead-lettered, not retried"
    );
}

fn stamps_round_trip_through_the_wire<C: Seq>(db: TestDb<C>) {
    use waybill_inbox_core::wire::{Binding, Decoder, Encoder, Received};
    let mut conn = db.conn();
    let id = send(
        &mut *conn,
        &step("k", "s1").with_header("correlation-id", "c-1"),
    );
    let stored = find_message(&mut *conn, id).unwrap().unwrap();
    let stamp: Stamp = stored.stamp().unwrap().unwrap();
    for binding in [
        Binding::Kafka,
        Binding::Nats,
        Binding::Amqp,
        Binding::Memory,
    ] {
        let encoder = Encoder::new(binding).with_source("https://shop.example/orders");
        let (headers, body) = encoder.encode(&stored);
        assert_eq!(headers[&binding.header("sequence")], "0000000000000000001");
        assert!(
            !headers.contains_key("waybill-sequence"),
            "reserved headers stay home"
        );
        let decoded = Decoder::new(binding)
            .decode(Received::from_text(headers, body))
            .unwrap();
        let position = decoded.sequence.expect("sequenced on the wire");
        assert_eq!(position.source, "https://shop.example/orders");
        assert_eq!(position.stamp, stamp);
        assert_eq!(
            decoded.headers.get("correlation-id").map(String::as_str),
            Some("c-1")
        );
    }
}

backend_tests!(
    sequenced_messages_are_numbered_from_one_per_topic_and_key,
    enqueue_all_numbers_a_batch_in_its_order,
    a_rolled_back_enqueue_leaves_no_gap,
    a_sequenced_enqueue_outside_a_transaction_is_refused,
    a_failed_insert_gives_its_number_back,
    a_writer_of_a_key_waits_for_the_other_and_numbers_follow_commit_order,
    eight_writers_of_one_key_get_every_number_once_in_outbox_order,
    each_number_is_applied_once_in_order_and_duplicates_are_skipped_forever,
    a_gap_is_held_then_parked_with_its_reason_and_listed_until_filled,
    a_failed_handler_records_nothing_and_the_redelivery_applies,
    a_consumer_joining_late_starts_where_it_is_told,
    a_producer_whose_counter_went_back_is_refused_not_skipped,
    an_operator_skip_publishes_a_marker_that_moves_consumers_past_it,
    the_epoch_changes_when_the_counter_table_is_restored_or_rotated,
    a_message_without_a_number_is_refused_in_order,
    concurrent_consumers_apply_a_key_in_order_each_once,
    stamps_round_trip_through_the_wire,
    the_in_order_handler_acks_retries_a_gap_and_dead_letters_what_cannot_apply,
);
