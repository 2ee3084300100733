//! The partitioned layout on PostgreSQL: adoption and reversal with data present, an insert with
//! no partition made ahead, concurrent roll-offs, dedup across a dropped partition, and a
//! roll-off while a relay and a consumer run.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use common::TestDb;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use waybill_diesel::partitions::{self, PartitionConfig};
use waybill_diesel::{enqueue_all, DieselStore, Inbox, IncomingMessage, Processed};
use waybill_outbox_core::{
    InMemoryPublisher, MessageId, NewOutboxMessage, Relay, RelayConfig, Retention,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    count: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(conn)
        .expect(sql)
        .count
}

fn msg(key: &str, index: usize) -> NewOutboxMessage {
    NewOutboxMessage::bytes(
        "orders",
        key,
        "Step",
        "text/plain",
        format!("{key}|{index}"),
    )
}

fn enqueue(db: &TestDb<PgConnection>, n: usize) -> Vec<NewOutboxMessage> {
    let messages: Vec<_> = (0..n).map(|i| msg(&format!("key:{}", i % 7), i)).collect();
    db.conn()
        .transaction(|conn| enqueue_all(conn, &messages))
        .expect("enqueue");
    messages
}

fn keeping_relay(
    db: &TestDb<PgConnection>,
    publisher: InMemoryPublisher,
) -> Relay<DieselStore<PgConnection>, InMemoryPublisher> {
    let config = RelayConfig::default()
        .batch_size(50)
        .retention(Retention::Keep(DAY));
    Relay::new(DieselStore::new(db.pool.clone()), publisher, config)
}

fn drain(relay: &mut Relay<DieselStore<PgConnection>, InMemoryPublisher>) {
    while relay.run_once().expect("relay round").claimed > 0 {}
}

/// A handler with a visible effect: one row per run, so a second effect of a message shows.
fn effect(conn: &mut PgConnection, id: MessageId) -> Result<(), waybill_diesel::Error> {
    diesel::sql_query("INSERT INTO effects (message_id) VALUES ($1)")
        .bind::<Text, _>(id.to_string())
        .execute(conn)?;
    Ok(())
}

fn with_effects(db: &TestDb<PgConnection>) {
    db.conn()
        .batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .unwrap();
}

/// A partition `days` ago of `parent`, made and filled with `rows` rows as the relay or the
/// inbox would have written them then; returns the message ids of its rows.
fn old_rows(conn: &mut PgConnection, parent: &str, days: i64, rows: usize) -> Vec<MessageId> {
    let ids: Vec<MessageId> = (0..rows).map(|_| MessageId::new()).collect();
    let at = format!("statement_timestamp() - interval '{days} days'");
    conn.batch_execute(&format!(
        "SELECT waybill_ensure_partition('{parent}', {at})"
    ))
    .unwrap();
    for id in &ids {
        let sql = if parent == partitions::OUTBOX_HISTORY {
            format!(
                "INSERT INTO outbox_published (seq, id, topic, partition_key, message_type, \
                   content_type, payload, attempts, created_at, published_at) \
                 VALUES (0, '{id}', 'orders', 'k', 'Step', 'text/plain', '\\x00', 0, {at}, {at})"
            )
        } else {
            format!(
                "INSERT INTO inbox_processed (consumer, dedup_key, message_id, processed_at) \
                 VALUES ('billing', '{id}', '{id}', {at})"
            )
        };
        conn.batch_execute(&sql).unwrap();
    }
    ids
}

#[test]
fn adopting_moves_history_and_records_and_reverting_brings_them_back() {
    let Some(db) = common::postgres() else { return };
    with_effects(&db);
    let mut conn = db.conn();
    let publisher = InMemoryPublisher::new();
    let mut relay = keeping_relay(&db, publisher.clone());
    enqueue(&db, 30);
    drain(&mut relay);
    let pending = enqueue(&db, 10);
    let inbox = Inbox::new("billing");
    let processed: Vec<IncomingMessage> = publisher.published().iter().map(Into::into).collect();
    for message in &processed {
        let done = inbox
            .process_once(&mut *conn, message, |c| effect(c, message.id))
            .unwrap();
        assert!(matches!(done, Processed::Handled(())));
    }
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM outbox_messages WHERE status = 1"
        ),
        30
    );

    partitions::adopt(&mut conn, &PartitionConfig::default()).unwrap();

    assert!(partitions::is_partitioned(&mut conn).unwrap());
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM outbox_published"),
        30
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM outbox_messages WHERE status = 1"
        ),
        0
    );
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM outbox_messages WHERE status = 0"
        ),
        10
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM inbox_processed_log"),
        30
    );
    // The records came along: every one is still a duplicate.
    for message in &processed {
        let again = inbox
            .process_once(&mut *conn, message, |c| effect(c, message.id))
            .unwrap();
        assert!(matches!(again, Processed::Duplicate), "{again:?}");
    }
    // The pending ones publish into the history, where they are still found by id.
    drain(&mut relay);
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM outbox_published"),
        40
    );
    let found = waybill_diesel::find_message(&mut *conn, pending[0].id())
        .unwrap()
        .unwrap();
    assert_eq!(found.status, waybill_outbox_core::Status::Published);
    assert_eq!(found.payload, pending[0].payload());
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_messages"), 0);
    let status = partitions::status(&mut conn).unwrap();
    assert_eq!(status.len(), 2);
    for table in &status {
        assert!(table.ready_until().is_some(), "{table:?}");
    }

    partitions::revert(&mut conn).unwrap();

    assert!(!partitions::is_partitioned(&mut conn).unwrap());
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM outbox_messages WHERE status = 1"
        ),
        40
    );
    assert_eq!(count(&mut conn, "SELECT count(*) FROM inbox_processed"), 30);
    for message in &processed {
        let again = inbox
            .process_once(&mut *conn, message, |c| effect(c, message.id))
            .unwrap();
        assert!(matches!(again, Processed::Duplicate), "{again:?}");
    }
    assert_eq!(
        count(&mut conn, "SELECT count(DISTINCT message_id) FROM effects"),
        30
    );
    assert_eq!(count(&mut conn, "SELECT count(*) FROM effects"), 30);
    let ids: HashSet<_> = pending.iter().map(|m| m.id()).collect();
    assert_eq!(ids.len(), 10);
    // Adopting a second time works on the reverted database.
    partitions::adopt(&mut conn, &PartitionConfig::default()).unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM outbox_published"),
        40
    );
}

#[test]
fn an_insert_finds_its_partition_even_when_none_was_made_ahead() {
    let Some(db) = common::postgres() else { return };
    with_effects(&db);
    let mut conn = db.conn();
    partitions::adopt(&mut conn, &PartitionConfig::default()).unwrap();
    // Create-ahead lagged as far as it can: no partition at all.
    for table in partitions::status(&mut conn).unwrap() {
        for partition in table.partitions {
            conn.batch_execute(&format!("DROP TABLE {}", partition.name))
                .unwrap();
        }
    }
    for table in partitions::status(&mut conn).unwrap() {
        assert!(table.partitions.is_empty());
        assert_eq!(table.ready_until(), None);
    }

    let publisher = InMemoryPublisher::new();
    let mut relay = keeping_relay(&db, publisher.clone());
    enqueue(&db, 20);
    drain(&mut relay);
    assert_eq!(publisher.len(), 20);
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM outbox_published"),
        20
    );
    let inbox = Inbox::new("billing");
    for message in publisher.published() {
        let message = IncomingMessage::from(&message);
        let done = inbox
            .process_once(&mut *conn, &message, |c| effect(c, message.id))
            .unwrap();
        assert!(matches!(done, Processed::Handled(())));
    }
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM inbox_processed_log"),
        20
    );
    for table in partitions::status(&mut conn).unwrap() {
        assert_eq!(table.partitions.len(), 1, "{table:?}");
    }
}

#[test]
fn concurrent_roll_offs_drop_each_due_partition_once() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    let config = PartitionConfig::default()
        .outbox_retention(DAY)
        .inbox_retention(DAY);
    partitions::adopt(&mut conn, &config).unwrap();
    let mut due = HashSet::new();
    for days in 2..12 {
        old_rows(&mut conn, partitions::OUTBOX_HISTORY, days, 3);
        old_rows(&mut conn, partitions::INBOX_RECORDS, days, 3);
    }
    for table in partitions::status(&mut conn).unwrap() {
        due.extend(table.due_for_roll_off().iter().map(|p| p.name.clone()));
    }
    assert_eq!(due.len(), 20);
    drop(conn);

    let start = Arc::new(Barrier::new(2));
    let rollers: Vec<_> = (0..2)
        .map(|_| {
            let start = Arc::clone(&start);
            let mut conn = PgConnection::establish(&db.url).unwrap();
            thread::spawn(move || {
                start.wait();
                partitions::roll_off(&mut conn, true).unwrap()
            })
        })
        .collect();
    let results: Vec<_> = rollers.into_iter().map(|r| r.join().unwrap()).collect();

    let mut dropped = HashSet::new();
    for result in &results {
        assert!(!result.busy);
        for name in &result.dropped {
            assert!(dropped.insert(name.clone()), "{name} dropped twice");
        }
    }
    assert_eq!(dropped, due);
    let mut conn = db.conn();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_published"), 0);
    for table in partitions::status(&mut conn).unwrap() {
        assert!(table.due_for_roll_off().is_empty());
        assert!(table.ready_until().is_some());
    }
}

#[test]
fn a_roll_off_that_finds_the_lock_taken_does_nothing() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    partitions::adopt(&mut conn, &PartitionConfig::default().inbox_retention(DAY)).unwrap();
    old_rows(&mut conn, partitions::INBOX_RECORDS, 3, 1);
    let mut holder = PgConnection::establish(&db.url).unwrap();
    holder
        .batch_execute(
            "SELECT pg_advisory_lock((2003884386::bigint << 32) | \
             'waybill_partitioning'::regclass::oid::bigint)",
        )
        .unwrap();
    let skipped = partitions::roll_off(&mut conn, false).unwrap();
    assert!(skipped.busy);
    assert!(skipped.dropped.is_empty());
    // (Unlocked explicitly: a closed connection's locks go when its backend exits, later.)
    holder
        .batch_execute(
            "SELECT pg_advisory_unlock((2003884386::bigint << 32) | \
             'waybill_partitioning'::regclass::oid::bigint)",
        )
        .unwrap();
    let rolled = partitions::roll_off(&mut conn, false).unwrap();
    assert_eq!(rolled.dropped.len(), 1);
}

#[test]
fn a_duplicate_whose_record_was_rolled_off_is_refused_as_expired() {
    let Some(db) = common::postgres() else { return };
    with_effects(&db);
    let mut conn = db.conn();
    partitions::adopt(&mut conn, &PartitionConfig::default().inbox_retention(DAY)).unwrap();
    let old = old_rows(&mut conn, partitions::INBOX_RECORDS, 3, 1)[0];
    let sent = chrono::Utc::now() - chrono::TimeDelta::days(3) - chrono::TimeDelta::hours(1);
    let redelivery =
        IncomingMessage::new(old, "orders", "Step", b"\x00".to_vec()).with_sent_at(sent);
    let inbox = Inbox::new("billing");
    // While its partition is there, it is a plain duplicate.
    let before = inbox
        .process_once(&mut *conn, &redelivery, |c| effect(c, old))
        .unwrap();
    assert!(matches!(before, Processed::Duplicate), "{before:?}");

    let rolled = partitions::roll_off(&mut conn, true).unwrap();
    assert_eq!(rolled.dropped.len(), 1);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM inbox_processed"), 0);

    let after = inbox
        .process_once(&mut *conn, &redelivery, |c| effect(c, old))
        .unwrap();
    assert!(matches!(after, Processed::Expired), "{after:?}");
    // A message sent now is new, not refused.
    let fresh = IncomingMessage::new(MessageId::new(), "orders", "Step", b"\x01".to_vec());
    let done = inbox
        .process_once(&mut *conn, &fresh, |c| effect(c, fresh.id))
        .unwrap();
    assert!(matches!(done, Processed::Handled(())), "{done:?}");
    assert_eq!(count(&mut conn, "SELECT count(*) FROM effects"), 1);
}

#[test]
fn concurrent_duplicates_take_effect_once_across_partitions() {
    let Some(db) = common::postgres() else { return };
    with_effects(&db);
    partitions::adopt(&mut db.conn(), &PartitionConfig::default()).unwrap();
    let messages: Vec<IncomingMessage> = (0..50)
        .map(|i| IncomingMessage::new(MessageId::new(), "orders", "Step", vec![i]))
        .collect();
    let messages = Arc::new(messages);
    let start = Arc::new(Barrier::new(4));
    let consumers: Vec<_> = (0..4)
        .map(|_| {
            let (messages, start, pool) =
                (Arc::clone(&messages), Arc::clone(&start), db.pool.clone());
            thread::spawn(move || {
                let mut conn = pool.get().unwrap();
                let inbox = Inbox::new("billing");
                start.wait();
                for message in messages.iter() {
                    let _ = inbox
                        .process_once(&mut *conn, message, |c| effect(c, message.id))
                        .unwrap();
                }
            })
        })
        .collect();
    for consumer in consumers {
        consumer.join().unwrap();
    }
    let mut conn = db.conn();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM effects"), 50);
    assert_eq!(count(&mut conn, "SELECT count(*) FROM inbox_processed"), 50);
}

#[test]
fn rolling_off_while_a_relay_and_a_consumer_run_loses_nothing_and_applies_nothing_twice() {
    let Some(db) = common::postgres() else { return };
    with_effects(&db);
    let config = PartitionConfig::default()
        .outbox_retention(DAY)
        .inbox_retention(DAY);
    partitions::adopt(&mut db.conn(), &config).unwrap();
    let messages = enqueue(&db, 600);
    let done = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(3));

    // The roll-off keeps finding work: each round makes an old partition of history and one of
    // records, and rolls them off, until the relay and the consumer are done.
    let roller = {
        let (done, start) = (Arc::clone(&done), Arc::clone(&start));
        let mut conn = PgConnection::establish(&db.url).unwrap();
        thread::spawn(move || {
            start.wait();
            let mut dropped = 0;
            let mut days = 2;
            while !done.load(Ordering::SeqCst) {
                old_rows(&mut conn, partitions::OUTBOX_HISTORY, days, 5);
                old_rows(&mut conn, partitions::INBOX_RECORDS, days, 5);
                dropped += partitions::roll_off(&mut conn, true).unwrap().dropped.len();
                days = 2 + (days - 1) % 30;
            }
            dropped
        })
    };
    // The relay publishes; each published message is handed to the consumer twice (a
    // redelivery), while more messages are enqueued.
    let (sender, receiver) = std::sync::mpsc::channel::<IncomingMessage>();
    let relay = {
        let (db_pool, start) = (db.pool.clone(), Arc::clone(&start));
        let publisher = InMemoryPublisher::new();
        let mut relay = Relay::new(
            DieselStore::new(db_pool.clone()),
            publisher.clone(),
            RelayConfig::default()
                .batch_size(20)
                .retention(Retention::Keep(DAY)),
        );
        thread::spawn(move || {
            start.wait();
            let mut handed = 0;
            let mut more = 3;
            loop {
                let claimed = relay.run_once().unwrap().claimed;
                for message in &publisher.published()[handed..] {
                    let incoming = IncomingMessage::from(message);
                    sender.send(incoming.clone()).unwrap();
                    sender.send(incoming).unwrap();
                }
                handed = publisher.len();
                if claimed == 0 {
                    if more == 0 {
                        break;
                    }
                    more -= 1;
                    let batch: Vec<_> = (0..100).map(|i| msg("late", i)).collect();
                    db_pool
                        .get()
                        .unwrap()
                        .transaction(|c| enqueue_all(c, &batch))
                        .unwrap();
                }
            }
            publisher.published()
        })
    };
    let consumer = {
        let (pool, start) = (db.pool.clone(), Arc::clone(&start));
        thread::spawn(move || {
            start.wait();
            let mut conn = pool.get().unwrap();
            let inbox = Inbox::new("billing");
            let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
            for message in receiver {
                let outcome = inbox
                    .process_once(&mut *conn, &message, |c| effect(c, message.id))
                    .unwrap();
                let name = match outcome {
                    Processed::Handled(()) => "handled",
                    Processed::Duplicate => "duplicate",
                    Processed::Expired => "expired",
                };
                *outcomes.entry(name).or_default() += 1;
            }
            outcomes
        })
    };
    let published = relay.join().unwrap();
    let outcomes = consumer.join().unwrap();
    done.store(true, Ordering::SeqCst);
    let dropped = roller.join().unwrap();

    let enqueued = messages.len() + 300;
    let ids: HashSet<MessageId> = published.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), enqueued, "every message published");
    assert!(messages.iter().all(|m| ids.contains(&m.id())));
    assert!(dropped > 0, "the roll-off ran alongside");
    assert_eq!(outcomes.get("expired"), None, "{outcomes:?}");
    assert_eq!(outcomes.get("handled"), Some(&enqueued), "{outcomes:?}");
    let mut conn = db.conn();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_messages"), 0);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(DISTINCT id) FROM outbox_published WHERE seq > 0"
        ),
        i64::try_from(enqueued).unwrap()
    );
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM effects"),
        i64::try_from(enqueued).unwrap()
    );
    assert_eq!(
        count(&mut conn, "SELECT count(DISTINCT message_id) FROM effects"),
        i64::try_from(enqueued).unwrap()
    );
}

#[test]
fn the_relays_maintenance_makes_partitions_ahead_and_rolls_off_old_ones() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    let store = DieselStore::new(db.pool.clone());
    // On the plain layout it does nothing.
    waybill_outbox_core::OutboxStore::maintain(&store).unwrap();
    let config = PartitionConfig::default().ahead(2).outbox_retention(DAY);
    partitions::adopt(&mut conn, &config).unwrap();
    for table in partitions::status(&mut conn).unwrap() {
        for partition in table.partitions {
            conn.batch_execute(&format!("DROP TABLE {}", partition.name))
                .unwrap();
        }
    }
    old_rows(&mut conn, partitions::OUTBOX_HISTORY, 3, 2);

    waybill_outbox_core::OutboxStore::maintain(&store).unwrap();

    for table in partitions::status(&mut conn).unwrap() {
        assert!(table.due_for_roll_off().is_empty(), "{table:?}");
        // The current partition and two ahead.
        assert_eq!(table.partitions.len(), 3, "{table:?}");
        let ready = table.ready_until().unwrap();
        assert!(ready >= table.now + chrono::TimeDelta::days(2), "{table:?}");
    }
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_published"), 0);
}

#[test]
fn a_roll_off_drops_what_an_interrupted_one_detached_and_marks_its_records() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    partitions::adopt(&mut conn, &PartitionConfig::default().inbox_retention(DAY)).unwrap();
    let old = old_rows(&mut conn, partitions::INBOX_RECORDS, 4, 2);
    let name = partitions::status(&mut conn)
        .unwrap()
        .into_iter()
        .find(|t| t.parent == partitions::INBOX_RECORDS)
        .unwrap()
        .due_for_roll_off()[0]
        .name
        .clone();
    // A roll-off that stopped between its DETACH and its DROP (and before any mark).
    conn.batch_execute(&format!(
        "ALTER TABLE inbox_processed_log DETACH PARTITION {name}"
    ))
    .unwrap();

    let rolled = partitions::roll_off(&mut conn, true).unwrap();

    assert_eq!(rolled.dropped, [name]);
    let redelivery = IncomingMessage::new(old[0], "orders", "Step", b"\x00".to_vec())
        .with_sent_at(chrono::Utc::now() - chrono::TimeDelta::days(5));
    let again = Inbox::new("billing")
        .process_once(&mut *conn, &redelivery, |_| {
            Ok::<_, waybill_diesel::Error>(())
        })
        .unwrap();
    assert!(matches!(again, Processed::Expired), "{again:?}");
}

#[test]
fn a_mixed_write_back_and_an_update_from_elsewhere_both_move_published_rows_into_the_history() {
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    partitions::adopt(&mut conn, &PartitionConfig::default()).unwrap();
    for table in partitions::status(&mut conn).unwrap() {
        for partition in table.partitions {
            conn.batch_execute(&format!("DROP TABLE {}", partition.name))
                .unwrap();
        }
    }
    let messages = enqueue(&db, 10);
    let refused = messages[3].id();
    // One message fails (retried later), so the write-back takes its transactional path.
    let publisher = InMemoryPublisher::new().with_fault(move |m| {
        (m.id == refused).then(|| waybill_outbox_core::PublishError::Retryable("nack".into()))
    });
    let mut relay = keeping_relay(&db, publisher.clone());
    relay.run_once().unwrap();
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_published"), 9);
    assert_eq!(
        count(
            &mut conn,
            "SELECT count(*) FROM outbox_messages WHERE status = 0"
        ),
        1
    );
    // A relay of an older version (or hand-written SQL) marks in place: the trigger moves it.
    conn.batch_execute(
        "UPDATE outbox_messages SET status = 1, published_at = statement_timestamp()",
    )
    .unwrap();
    assert_eq!(
        count(&mut conn, "SELECT count(*) FROM outbox_published"),
        10
    );
    assert_eq!(count(&mut conn, "SELECT count(*) FROM outbox_messages"), 0);
}
