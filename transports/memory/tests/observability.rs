//! What operators see of a relay and a consumer through the memory broker: the `traceparent`
//! given at enqueue reaches the handler, and the relay and consumer metrics add up to the
//! workload, duplicates skipped by the inbox included.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use diesel::r2d2::{ConnectionManager, Pool};
use diesel::SqliteConnection;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use waybill_diesel::sqlite::SqliteOptions;
use waybill_diesel::{enqueue_all, DieselStore, Inbox, InboxHandler};
use waybill_inbox_core::metrics::{CONSUMER_DUPLICATES_SKIPPED, CONSUMER_HANDLED};
use waybill_inbox_core::{ConsumeReport, Disposition, IncomingMessage};
use waybill_memory::{MemoryBroker, MemoryConfig};
use waybill_outbox_core::metrics::{RELAY_MESSAGE_AGE_SECONDS, RELAY_PUBLISHED};
use waybill_outbox_core::{NewOutboxMessage, Relay, RelayConfig};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

struct Db {
    pool: Pool<ConnectionManager<SqliteConnection>>,
    path: std::path::PathBuf,
}

impl Drop for Db {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
        }
    }
}

fn db(messages: &[NewOutboxMessage]) -> Db {
    let path = std::env::temp_dir().join(format!("waybill-obs-{}.db", uuid::Uuid::new_v4()));
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    diesel::Connection::transaction(&mut *conn, |conn| enqueue_all(conn, messages)).unwrap();
    drop(conn);
    Db { pool, path }
}

fn relay_all(db: &Db, broker: &MemoryBroker, owner: &str) {
    let config = RelayConfig::default().owner(owner);
    let mut relay = Relay::new(
        DieselStore::new(db.pool.clone()),
        broker.publisher(),
        config,
    );
    while relay.run_once().unwrap().claimed > 0 {}
}

type Snapshot = Vec<(
    metrics_util::CompositeKey,
    Option<metrics::Unit>,
    Option<metrics::SharedString>,
    DebugValue,
)>;

/// Taking a snapshot resets the counters: take one, then read it.
fn snapshot(snapshotter: &Snapshotter) -> Snapshot {
    snapshotter.snapshot().into_vec()
}

fn counter(snapshot: &Snapshot, name: &str, label: (&str, &str)) -> Option<u64> {
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            key.key().name() == name && key.key().labels().any(|l| (l.key(), l.value()) == label)
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
}

/// The samples of a histogram with `label`.
fn histogram(snapshot: &Snapshot, name: &str, label: (&str, &str)) -> Vec<f64> {
    snapshot
        .iter()
        .find(|(key, _, _, _)| {
            key.key().name() == name && key.key().labels().any(|l| (l.key(), l.value()) == label)
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Histogram(samples) => samples.iter().map(|s| s.into_inner()).collect(),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .unwrap_or_default()
}

#[test]
fn the_time_each_message_spent_in_the_outbox_is_recorded_per_topic() {
    let messages: Vec<_> = (0..30)
        .map(|i| {
            let topic = if i % 3 == 0 { "age-a" } else { "age-b" };
            NewOutboxMessage::bytes(topic, format!("k{i}"), "Tick", "text/plain", "x")
        })
        .collect();
    let db = db(&messages);
    let broker = MemoryBroker::new(MemoryConfig::default());
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Enqueued, then held back a measurable while before the relay runs.
    let held = Duration::from_millis(50);
    std::thread::sleep(held);
    metrics::with_local_recorder(&recorder, || relay_all(&db, &broker, "relay-age"));

    let snapshot = snapshot(&snapshotter);
    let a = histogram(&snapshot, RELAY_MESSAGE_AGE_SECONDS, ("topic", "age-a"));
    let b = histogram(&snapshot, RELAY_MESSAGE_AGE_SECONDS, ("topic", "age-b"));
    assert_eq!(
        (a.len(), b.len()),
        (10, 20),
        "one sample per confirmed message"
    );
    assert!(
        a.iter().chain(&b).all(|age| *age >= held.as_secs_f64()),
        "each waited at least {held:?}: {a:?} {b:?}"
    );
}

#[test]
fn the_traceparent_given_at_enqueue_reaches_the_handler() {
    let traced = NewOutboxMessage::bytes("orders", "order:1", "OrderPlaced", "text/plain", "a")
        .with_traceparent(TRACEPARENT)
        .unwrap();
    let untraced = NewOutboxMessage::bytes("orders", "order:2", "OrderPlaced", "text/plain", "b");
    let db = db(&[traced.clone(), untraced.clone()]);
    let broker = MemoryBroker::new(MemoryConfig::default());
    relay_all(&db, &broker, "relay-trace");

    let mut seen = Vec::new();
    let mut handler = |msg: &IncomingMessage| {
        seen.push((msg.id, msg.traceparent().map(str::to_owned)));
        Disposition::Ack
    };
    broker
        .consumer("orders")
        .run_once(&mut handler, 10, Duration::ZERO);
    seen.sort();
    let mut expected = vec![
        (traced.id(), Some(TRACEPARENT.to_owned())),
        (untraced.id(), None),
    ];
    expected.sort();
    assert_eq!(seen, expected);
}

#[test]
fn relay_and_consumer_metrics_add_up_to_the_workload_with_duplicates_skipped() {
    let messages: Vec<_> = (0..100)
        .map(|i| NewOutboxMessage::bytes("obs", format!("k{}", i % 7), "Tick", "text/plain", "x"))
        .collect();
    let db = db(&messages);
    let broker = MemoryBroker::new(MemoryConfig::default().redeliver_fraction(0.5).seed(11));
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();

    let (report, duplicates) = metrics::with_local_recorder(&recorder, || {
        relay_all(&db, &broker, "relay-obs");
        let mut handler = InboxHandler::new(
            db.pool.clone(),
            Inbox::new("billing"),
            |_: &mut _, _: &IncomingMessage| Ok::<_, waybill_diesel::Error>(()),
        );
        let mut consumer = broker.consumer("obs");
        let mut total = ConsumeReport::default();
        loop {
            let report = consumer.run_once(&mut handler, 50, Duration::ZERO);
            if report.delivered == 0 {
                break;
            }
            total.add(&report);
        }
        (total, handler.duplicates())
    });

    let snapshot = snapshot(&snapshotter);
    assert_eq!(
        counter(&snapshot, RELAY_PUBLISHED, ("owner", "relay-obs")),
        Some(100)
    );
    assert!(
        duplicates > 10,
        "the broker redelivered: {:?}",
        broker.stats()
    );
    assert_eq!(report.acked, 100 + duplicates);
    assert_eq!(
        counter(&snapshot, CONSUMER_HANDLED, ("consumer", "obs")),
        Some(report.acked)
    );
    assert_eq!(
        counter(
            &snapshot,
            CONSUMER_DUPLICATES_SKIPPED,
            ("consumer", "billing")
        ),
        Some(duplicates)
    );
}
