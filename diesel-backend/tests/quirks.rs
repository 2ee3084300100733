//! Backend quirks, configuration and input that must be refused or handled instead of breaking
//! the relay or the inbox: error texts, exact key comparison, bounds on leases and batch sizes,
//! large batches and messages, serializable writers, sequence caches.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Backend, TestDb};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::{
    enqueue, find_message, requeue_key, topic_stats, DedupKey, DieselStore, Error, Inbox,
    IncomingMessage, Processed,
};
use waybill_outbox_core::{
    InMemoryPublisher, MessageId, NewOutboxMessage, OutboxStore, PublishError, Relay, RelayConfig,
    Status,
};

fn msg(key: &str, body: &str) -> NewOutboxMessage {
    NewOutboxMessage::bytes("orders", key, "Step", "text/plain", body.to_owned())
}

fn relay<C: Backend>(
    db: &TestDb<C>,
    publisher: InMemoryPublisher,
    config: RelayConfig,
) -> Relay<DieselStore<C>, InMemoryPublisher> {
    Relay::new(DieselStore::new(db.pool.clone()), publisher, config)
}

/// Publishes everything that is due; panics if the relay keeps finding work.
fn drain<C: Backend>(relay: &mut Relay<DieselStore<C>, InMemoryPublisher>) {
    for _ in 0..1000 {
        if relay.run_once().unwrap().claimed == 0 {
            return;
        }
    }
    panic!("the relay never ran dry");
}

fn database_errors_name_their_cause<C: Backend>(db: TestDb<C>) {
    // A statement the database refuses: the error's text carries the database's reason.
    let refused = db
        .conn()
        .batch_execute("INSERT INTO outbox_messages (topic) VALUES ('t')")
        .unwrap_err();
    let diesel::result::Error::DatabaseError(_, ref info) = refused else {
        panic!("not a database error: {refused:?}");
    };
    let reason = info.message().to_owned();
    let error = Error::from(refused);
    assert!(
        error.to_string().contains(&reason),
        "{error} does not say why ({reason})"
    );

    // A table that does not exist: the error says so and what to do.
    db.conn()
        .batch_execute("DROP TABLE outbox_messages")
        .unwrap();
    let missing = topic_stats(&mut db.conn()).unwrap_err().to_string();
    assert!(missing.contains("outbox_messages"), "{missing}");
    assert!(missing.contains("waybill migrate"), "{missing}");
}

fn keys_and_consumers_differing_by_trailing_spaces_are_distinct<C: Backend>(db: TestDb<C>) {
    let mut conn = db.conn();
    let delivery = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}");
    let billing = Inbox::new("billing");
    let mut outcomes = Vec::new();
    // Case counts too: a case-insensitive collation would merge `ORDER:42` into `order:42`.
    for key in [
        "order:42",
        "order:42 ",
        "order:42  ",
        "ORDER:42",
        "order:42",
    ] {
        outcomes.push(
            billing
                .process_once_by(&mut *conn, DedupKey::business(key), &delivery, |_| {
                    Ok::<_, Error>(key.len())
                })
                .unwrap(),
        );
    }
    assert_eq!(
        outcomes,
        [
            Processed::Handled(8),
            Processed::Handled(9),
            Processed::Handled(10),
            Processed::Handled(8),
            Processed::Duplicate
        ],
        "four distinct business keys"
    );

    let by_id = |inbox: &Inbox, conn: &mut C| {
        inbox
            .process_once(conn, &delivery, |_| Ok::<_, Error>(()))
            .unwrap()
    };
    let padded = Inbox::new("billing ");
    assert_eq!(by_id(&billing, &mut conn), Processed::Handled(()));
    assert_eq!(
        by_id(&padded, &mut conn),
        Processed::Handled(()),
        "another consumer"
    );
    assert_eq!(by_id(&padded, &mut conn), Processed::Duplicate);
    assert_eq!(billing.processed_count(&mut *conn).unwrap(), 5);
    assert_eq!(padded.processed_count(&mut *conn).unwrap(), 1);
}

fn keys_differing_by_trailing_spaces_are_distinct_keys<C: Backend>(db: TestDb<C>) {
    let poison = msg("k", "poison");
    let poison_id = poison.id();
    enqueue(&mut db.conn(), &poison).unwrap();
    let fatal: std::sync::Arc<std::sync::Mutex<Vec<MessageId>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![poison_id]));
    let refused = fatal.clone();
    let publisher = InMemoryPublisher::new().with_fault(move |m| {
        refused
            .lock()
            .unwrap()
            .contains(&m.id)
            .then(|| PublishError::Fatal("refused".into()))
    });
    let mut relay = relay(&db, publisher.clone(), RelayConfig::default());
    drain(&mut relay);
    assert_eq!(
        find_message(&mut db.conn(), poison_id)
            .unwrap()
            .unwrap()
            .status,
        Status::Parked
    );

    // A parked `k` holds back `k` only.
    let other = msg("k ", "other key");
    enqueue(&mut db.conn(), &other).unwrap();
    drain(&mut relay);
    let published: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
    assert_eq!(published, vec![other.id()], "`k ` is not blocked by `k`");

    // Requeueing `k` requeues `k` only.
    let parked_too = msg("k ", "parked too");
    fatal.lock().unwrap().push(parked_too.id());
    enqueue(&mut db.conn(), &parked_too).unwrap();
    drain(&mut relay);
    assert_eq!(requeue_key(&mut db.conn(), "k").unwrap(), 1);
    let status = |id| find_message(&mut db.conn(), id).unwrap().unwrap().status;
    assert_eq!(status(poison_id), Status::Pending);
    assert_eq!(status(parked_too.id()), Status::Parked, "`k ` untouched");
}

fn a_lease_out_of_bounds_is_refused_by_the_store<C: Backend>(db: TestDb<C>) {
    enqueue(&mut db.conn(), &msg("k", "waits")).unwrap();
    let store = DieselStore::new(db.pool.clone());
    let day = RelayConfig::MAX_LEASE;
    for lease in [
        Duration::ZERO,
        day + Duration::from_micros(1),
        Duration::MAX,
    ] {
        let refused = store.claim(10, lease, "relay");
        assert!(
            matches!(refused, Err(Error::InvalidLease(l)) if l == lease),
            "{lease:?}: {refused:?}"
        );
    }
    for limit in [0, RelayConfig::MAX_BATCH_SIZE + 1] {
        let refused = store.claim_ahead(limit, Duration::from_secs(30), "relay");
        assert!(
            matches!(refused, Err(Error::InvalidBatchSize(n)) if n == limit),
            "{limit}: {refused:?}"
        );
    }
    let claimed = store
        .claim(RelayConfig::MAX_BATCH_SIZE, day, "relay")
        .unwrap();
    assert_eq!(
        claimed.messages.len(),
        1,
        "the bounds themselves are allowed"
    );
}

fn an_overlong_lease_is_clamped_and_the_relay_publishes<C: Backend>(db: TestDb<C>) {
    let message = msg("k", "leased for a century");
    enqueue(&mut db.conn(), &message).unwrap();
    let publisher = InMemoryPublisher::new();
    let century = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    let mut relay = relay(
        &db,
        publisher.clone(),
        RelayConfig::default().lease(century),
    );
    assert_eq!(relay.config().lease_duration(), RelayConfig::MAX_LEASE);
    let report = relay.run_once().unwrap();
    assert_eq!((report.claimed, report.published), (1, 1));
    assert_eq!(publisher.published()[0].id, message.id());
}

fn an_overlong_retry_delay_is_written_back<C: Backend>(db: TestDb<C>) {
    let message = msg("k", "backs off for ages");
    enqueue(&mut db.conn(), &message).unwrap();
    let publisher = InMemoryPublisher::new()
        .with_fault(|_| Some(PublishError::Retryable("broker unavailable".into())));
    let forever = waybill_outbox_core::Backoff::new(Duration::MAX, Duration::MAX);
    let mut relay = relay(&db, publisher, RelayConfig::default().backoff(forever));
    let report = relay.run_once().unwrap();
    assert_eq!((report.retried, report.fenced_off), (1, 0));
    let stored = find_message(&mut db.conn(), message.id()).unwrap().unwrap();
    assert_eq!(stored.attempts, 1, "the retry was written back");
    assert!(
        stored.available_at > chrono::Utc::now() + chrono::Duration::days(50 * 365),
        "waits for decades: {}",
        stored.available_at
    );
    assert_eq!(relay.run_once().unwrap().claimed, 0);
}

fn several_four_mebibyte_messages_in_one_enqueue_all_all_land<C: Backend>(db: TestDb<C>) {
    let limit = waybill_outbox_core::Limits::default().payload_limit();
    let messages: Vec<NewOutboxMessage> = (0..5u8)
        .map(|n| {
            NewOutboxMessage::bytes(
                "orders",
                "k",
                "Big",
                "application/octet-stream",
                vec![n; limit],
            )
        })
        .collect();
    let mut conn = db.conn();
    conn.transaction(|conn| waybill_diesel::enqueue_all(conn, &messages))
        .unwrap();
    for (n, message) in (0..5u8).zip(&messages) {
        let stored = find_message(&mut *conn, message.id()).unwrap().unwrap();
        assert_eq!(stored.payload.len(), limit);
        assert!(stored.payload.iter().all(|&b| b == n));
    }
}

backend_tests!(
    several_four_mebibyte_messages_in_one_enqueue_all_all_land,
    database_errors_name_their_cause,
    a_lease_out_of_bounds_is_refused_by_the_store,
    an_overlong_lease_is_clamped_and_the_relay_publishes,
    an_overlong_retry_delay_is_written_back,
    keys_and_consumers_differing_by_trailing_spaces_are_distinct,
    keys_differing_by_trailing_spaces_are_distinct_keys,
);

#[test]
fn pool_errors_name_their_cause() {
    let dir = std::env::temp_dir().join(format!("waybill_missing_{}", uuid::Uuid::new_v4()));
    let url = dir.join("outbox.db").to_string_lossy().into_owned();
    let pool = Pool::builder()
        .max_size(1)
        .connection_timeout(Duration::from_millis(200))
        .build_unchecked(ConnectionManager::<SqliteConnection>::new(url));
    let error = DieselStore::new(pool)
        .claim(10, Duration::from_secs(30), "relay")
        .unwrap_err();
    assert!(matches!(error, Error::Pool(_)), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("timed out waiting for connection")
            && text.to_lowercase().contains("unable to open"),
        "{text}"
    );
}

/// Enqueues `count` small messages over 100 keys; returns their ids.
fn backlog<C: Backend>(db: &TestDb<C>, count: usize) -> Vec<MessageId> {
    let messages: Vec<NewOutboxMessage> = (0..count)
        .map(|n| msg(&format!("key:{}", n % 100), &n.to_string()))
        .collect();
    let mut conn = db.conn();
    conn.transaction(|conn| waybill_diesel::enqueue_all(conn, &messages))
        .unwrap();
    messages.iter().map(NewOutboxMessage::id).collect()
}

/// Drives a relay with `batch_size` over a backlog of `count` and checks that every message was
/// published exactly once.
fn batch_above_the_bind_limit_is_published_once<C: Backend>(
    db: &TestDb<C>,
    count: usize,
    batch_size: usize,
) {
    let ids = backlog(db, count);
    let publisher = InMemoryPublisher::new();
    let mut relay = relay(
        db,
        publisher.clone(),
        RelayConfig::default().batch_size(batch_size),
    );
    let first = relay.run_once().unwrap();
    assert_eq!(first.claimed, first.published);
    assert!(
        first.claimed > 32_766,
        "one batch above SQLite's bind limit: {first:?}"
    );
    drain(&mut relay);
    let published: Vec<MessageId> = publisher.published().iter().map(|m| m.id).collect();
    assert_eq!(published.len(), count, "each message published once");
    let distinct: std::collections::HashSet<MessageId> = published.into_iter().collect();
    assert_eq!(distinct, ids.into_iter().collect());
    let stats = topic_stats(&mut db.conn()).unwrap();
    assert!(stats.iter().all(|t| t.pending == 0), "{stats:?}");
}

#[test]
fn sqlite_batch_above_the_bind_limit_is_published_once() {
    let db = common::sqlite().unwrap();
    batch_above_the_bind_limit_is_published_once(&db, 40_000, 40_000);
}

#[cfg(feature = "mysql")]
#[test]
fn mysql_batch_above_the_bind_limit_is_published_once() {
    if let Some(db) = common::mysql() {
        batch_above_the_bind_limit_is_published_once(&db, 70_000, 70_000);
    }
}

/// Connections whose transactions are SERIALIZABLE unless they say otherwise: a database run
/// with `default_transaction_isolation = serializable`.
#[cfg(feature = "postgres")]
#[derive(Debug)]
struct Serializable;

#[cfg(feature = "postgres")]
impl diesel::r2d2::CustomizeConnection<PgConnection, diesel::r2d2::Error> for Serializable {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        )
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

#[cfg(feature = "postgres")]
#[test]
fn serializable_writers_that_only_enqueue_both_commit() {
    let Some(db) = common::postgres() else { return };
    let mut writers: Vec<PgConnection> = (0..2)
        .map(|_| PgConnection::establish(&db.url).unwrap())
        .collect();
    let messages = [msg("a", "first writer"), msg("b", "second writer")];
    for (writer, message) in writers.iter_mut().zip(&messages) {
        writer
            .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .unwrap();
        enqueue(writer, message).unwrap();
    }
    // Meanwhile a relay, also at SERIALIZABLE, finds nothing committed, asks for wake-ups and
    // looks once more, as `Relay::run` does.
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(Serializable))
        .build(ConnectionManager::<PgConnection>::new(&db.url))
        .unwrap();
    let store = DieselStore::new(pool);
    let lease = Duration::from_secs(30);
    assert!(store.claim(10, lease, "relay").unwrap().messages.is_empty());
    store.announce_idle(true).unwrap();
    assert!(store.claim(10, lease, "relay").unwrap().messages.is_empty());
    for writer in &mut writers {
        writer
            .batch_execute("COMMIT")
            .expect("a writer that only enqueued commits");
    }
    let publisher = InMemoryPublisher::new();
    let mut relay = Relay::new(store, publisher.clone(), RelayConfig::default());
    drain(&mut relay);
    assert_eq!(publisher.len(), 2);
}

#[cfg(feature = "postgres")]
#[test]
fn migrations_reset_a_raised_seq_cache_to_one() {
    #[derive(QueryableByName)]
    struct Cache {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        cache: i64,
    }
    let Some(db) = common::postgres() else { return };
    let mut conn = db.conn();
    let cache = |conn: &mut PgConnection| {
        diesel::sql_query(
            "SELECT seqcache AS cache FROM pg_sequence \
             WHERE seqrelid = pg_get_serial_sequence('outbox_messages', 'seq')::regclass",
        )
        .get_result::<Cache>(conn)
        .unwrap()
        .cache
    };
    assert_eq!(cache(&mut conn), 1);
    conn.batch_execute("ALTER TABLE outbox_messages ALTER COLUMN seq SET CACHE 50")
        .unwrap();
    assert_eq!(cache(&mut conn), 50);
    waybill_diesel::run_migrations(&mut conn).unwrap();
    assert_eq!(
        cache(&mut conn),
        1,
        "repaired although no migration was pending"
    );
}

#[cfg(feature = "mysql")]
#[test]
fn a_message_larger_than_the_servers_packet_is_refused_with_a_typed_error() {
    let Some(db) = common::mysql() else { return };
    let outbox = waybill_diesel::Outbox::new(
        waybill_outbox_core::Limits::default().max_payload_bytes(64 * 1024 * 1024),
    );
    let huge = NewOutboxMessage::bytes("orders", "k", "Huge", "text/plain", vec![b'x'; 60 << 20]);
    let mut conn = db.conn();
    let refused = outbox.enqueue(&mut *conn, &huge);
    assert!(
        matches!(refused, Err(Error::TooLargeForServer { id, .. }) if id == huge.id()),
        "{refused:?}"
    );
    // The connection is still usable: nothing was sent.
    assert!(topic_stats(&mut *conn).unwrap().is_empty());

    // Messages that need several statements cannot be written outside a transaction.
    let limit = waybill_outbox_core::Limits::default().payload_limit();
    let big: Vec<NewOutboxMessage> = (0..5)
        .map(|_| NewOutboxMessage::bytes("orders", "k", "Big", "text/plain", vec![b'x'; limit]))
        .collect();
    let outside = waybill_diesel::enqueue_all(&mut *conn, &big);
    assert!(
        matches!(outside, Err(Error::NotInTransaction(5))),
        "{outside:?}"
    );
    assert!(
        topic_stats(&mut *conn).unwrap().is_empty(),
        "nothing written"
    );
}

/// Tells the test what the relay did: `batch` after a round that claimed something, the error's
/// text after a failed round.
struct Events(std::sync::Mutex<std::sync::mpsc::Sender<String>>);

impl waybill_outbox_core::RelayHooks for Events {
    fn on_batch(&self, _: &waybill_outbox_core::RelayReport, _: Duration) {
        let _ = self.0.lock().unwrap().send("batch".to_owned());
    }
    fn on_store_error(&self, error: &(dyn std::error::Error + 'static)) {
        let _ = self.0.lock().unwrap().send(error.to_string());
    }
}

#[cfg(feature = "postgres")]
#[test]
fn a_postgres_pool_too_small_for_listen_is_refused_saying_how_large_it_must_be() {
    let Some(db) = common::postgres() else { return };
    let single = |db: &TestDb<PgConnection>| {
        Pool::builder()
            .max_size(1)
            .build(ConnectionManager::<PgConnection>::new(&db.url))
            .unwrap()
    };
    assert_eq!(DieselStore::<PgConnection>::min_pool_size(), 2);
    let error = DieselStore::try_new(single(&db)).unwrap_err();
    assert!(
        matches!(error, Error::PoolTooSmall { size: 1, needed: 2 }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("needs at least 2 connections"),
        "{error}"
    );
    // `new` takes it and polls instead of listening: it still publishes, and `run` stops.
    enqueue(&mut db.conn(), &msg("k", "one")).unwrap();
    let publisher = InMemoryPublisher::new();
    let config = RelayConfig::default().poll_interval(Duration::from_millis(20));
    let (batches, batch) = std::sync::mpsc::channel();
    let mut relay = Relay::new(DieselStore::new(single(&db)), publisher.clone(), config)
        .with_hooks(Events(std::sync::Mutex::new(batches)));
    let handle = relay.handle();
    let running = std::thread::spawn(move || relay.run());
    let event = batch
        .recv_timeout(Duration::from_secs(30))
        .expect("a relay over a pool of one publishes");
    assert_eq!(event, "batch");
    handle.stop();
    assert_eq!(running.join().unwrap().published, 1);
}

#[test]
fn sqlite_needs_no_spare_connection() {
    assert_eq!(DieselStore::<SqliteConnection>::min_pool_size(), 1);
    let pool = Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<SqliteConnection>::new(":memory:"))
        .unwrap();
    assert!(DieselStore::try_new(pool).is_ok());
}

#[cfg(feature = "postgres")]
#[test]
fn a_relay_that_cannot_get_a_connection_stops_promptly_when_asked() {
    // Nothing listens on port 1; the pool keeps r2d2's default 30 s connection timeout.
    let pool = Pool::builder()
        .max_size(4)
        .build_unchecked(ConnectionManager::<PgConnection>::new(
            "postgres://nobody@127.0.0.1:1/none",
        ));
    for pipelined in [false, true] {
        let (errors, failed) = std::sync::mpsc::channel();
        let mut relay = Relay::new(
            DieselStore::new(pool.clone()),
            InMemoryPublisher::new(),
            RelayConfig::default(),
        )
        .with_hooks(Events(std::sync::Mutex::new(errors)));
        let handle = relay.handle();
        let running = std::thread::spawn(move || {
            if pipelined {
                relay.run_pipelined()
            } else {
                relay.run()
            }
        });
        let error = failed
            .recv_timeout(Duration::from_secs(10))
            .expect("the relay reports the unreachable database");
        assert!(error.contains("connection pool error"), "{error}");
        let asked = std::time::Instant::now();
        handle.stop();
        running.join().unwrap();
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "stopped {:?} after being asked (pipelined: {pipelined})",
            asked.elapsed()
        );
    }
}
