//! A private `nats-server` (JetStream, its own port and store) is killed under the publisher and
//! started again: the publisher reports the server unavailable while it is down (the relay
//! charges no attempt, so nothing is parked however long it lasts) and resumes afterwards,
//! nothing lost.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_diesel::{enqueue_all, topic_stats, DieselStore};
use waybill_nats::{NatsPublisher, PublisherConfig};
use waybill_outbox_core::{Backoff, NewOutboxMessage, PublishError, Publisher, Relay, RelayConfig};

use common::{batch, runtime, unique, DEADLINE};

fn server_binary() -> Option<PathBuf> {
    let candidates = [
        std::env::var("NATS_SERVER_BIN").ok(),
        Some("/usr/sbin/nats-server".into()),
        Some("/usr/bin/nats-server".into()),
    ];
    candidates
        .into_iter()
        .flatten()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn start(binary: &Path, port: u16, store: &Path) -> Child {
    let child = Command::new(binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nats-server");
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not listen on {port}"
        );
        std::thread::yield_now();
    }
    child
}

/// The `nats-server` binary, or `None` (after saying why) when there is none.
fn binary_or_skip() -> Option<PathBuf> {
    let binary = server_binary();
    if binary.is_none() {
        waybill_testkit::skip(
            "a nats-server binary",
            "NATS_SERVER_BIN",
            &"none at /usr/sbin or /usr/bin",
        );
    }
    binary
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn publishing_reports_the_server_unavailable_while_it_is_down_and_resumes_after_a_restart() {
    let Some(binary) = binary_or_skip() else {
        return;
    };
    let port = free_port();
    let store = std::env::temp_dir().join(unique("nats-store"));
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = start(&binary, port, &store);

    let (stream, topic) = (unique("WB"), unique("t"));
    let mut publisher = NatsPublisher::connect(
        &url,
        PublisherConfig::default().ack_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    publisher.ensure_stream(&stream, &[&topic]).unwrap();
    let before = batch(&topic, 4, 100);
    assert!(publisher.publish(&before).iter().all(Result::is_ok));

    server.kill().unwrap();
    server.wait().unwrap();
    let during = batch(&topic, 4, 100);
    let outcomes = publisher.publish(&during);
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Err(PublishError::Unavailable(_) | PublishError::NotAttempted)
        )),
        "a dead server is unavailable, no message is at fault: {outcomes:?}"
    );

    let mut server = start(&binary, port, &store);
    let deadline = Instant::now() + DEADLINE;
    loop {
        // The relay would retry after its backoff; here the test retries until the client is back.
        let outcomes = publisher.publish(&during);
        if outcomes.iter().all(Result::is_ok) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing did not resume: {outcomes:?}"
        );
        std::thread::sleep(Duration::from_millis(100)); // reconnect backoff, not synchronisation
    }

    let rt = runtime();
    let stored = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        js.get_stream(&stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    });
    assert_eq!(
        stored, 200,
        "every message of both batches is in the stream, once"
    );
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn a_relay_parks_nothing_while_the_server_is_down_and_delivers_everything_after_a_restart() {
    let Some(binary) = binary_or_skip() else {
        return;
    };
    let port = free_port();
    let store = std::env::temp_dir().join(unique("nats-store"));
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = start(&binary, port, &store);
    let (stream, topic) = (unique("WB"), unique("t"));
    let publisher = NatsPublisher::connect(
        &url,
        PublisherConfig::default().ack_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    publisher.ensure_stream(&stream, &[&topic]).unwrap();

    let path = std::env::temp_dir().join(format!("{}.db", unique("outage")));
    let pool = Pool::builder()
        .max_size(2)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    let messages: Vec<_> = (0..40)
        .map(|i| NewOutboxMessage::json(&topic, format!("order.{}", i % 4), "Step", &i).unwrap())
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    drop(conn);
    let max_attempts = 2;
    let mut relay = Relay::new(
        DieselStore::new(pool.clone()),
        publisher,
        RelayConfig::default()
            .max_attempts(max_attempts)
            .backoff(Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(5),
            )),
    );

    server.kill().unwrap();
    server.wait().unwrap();
    for round in 0..3 * max_attempts {
        let report = relay.run_once().unwrap();
        assert_eq!(report.unavailable, 4, "round {round}: {report:?}");
        assert_eq!(
            report.retried + report.parked,
            0,
            "round {round}: {report:?}"
        );
    }

    let mut server = start(&binary, port, &store);
    let deadline = Instant::now() + DEADLINE;
    let pending = || {
        topic_stats(&mut pool.get().unwrap())
            .unwrap()
            .iter()
            .map(|s| s.pending + s.parked)
            .sum::<i64>()
    };
    while pending() > 0 {
        // Until the client has reconnected each round hands the messages back uncharged.
        assert!(Instant::now() < deadline, "the relay did not resume");
        relay.run_once().unwrap();
        std::thread::yield_now();
    }
    assert_eq!(relay.totals().parked + relay.totals().retried, 0);

    let rt = runtime();
    // Message `i` belongs to key `i % 4`.
    let delivered: Vec<i64> = rt.block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(&stream).await.unwrap();
        let mut delivered = Vec::new();
        for seq in 1..=40 {
            let message = stream.get_raw_message(seq).await.unwrap();
            let index: i64 = serde_json::from_slice(&message.payload).unwrap();
            delivered.push(index);
        }
        delivered
    });
    for key in 0..4 {
        let indexes: Vec<i64> = delivered
            .iter()
            .copied()
            .filter(|index| index % 4 == key)
            .collect();
        let expected: Vec<i64> = (0..40).filter(|i| i % 4 == key).collect();
        assert_eq!(
            indexes, expected,
            "order.{key} delivered once each, in order"
        );
    }
    server.kill().unwrap();
    server.wait().unwrap();
    drop(pool);
    let _ = std::fs::remove_dir_all(&store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
