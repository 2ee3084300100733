//! A broker outage is not a fault of any message: behind a TCP proxy the test cuts (every
//! connection closed, new ones refused), the publisher reports the broker unavailable, the relay
//! charges no attempt however long it lasts, and everything goes out once the proxy is back.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use waybill_amqp::{AmqpConsumer, AmqpPublisher, ConsumerConfig, PublisherConfig};
use waybill_diesel::{enqueue_all, topic_stats, DieselStore};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::{Backoff, NewOutboxMessage, PublishError, Publisher, Relay, RelayConfig};

use common::{stored, unique, PATIENCE};

/// A TCP proxy to the broker on a local port. [`cut`](Self::cut) closes every connection
/// through it and stops listening (connecting is refused); [`restore`](Self::restore) listens on
/// the same port again.
struct Proxy {
    port: u16,
    target: String,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<(JoinHandle<()>, Arc<Mutex<bool>>)>,
}

impl Proxy {
    fn start(target: &str) -> Self {
        let mut proxy = Self {
            port: 0,
            target: target.to_owned(),
            streams: Arc::default(),
            acceptor: None,
        };
        proxy.listen(TcpListener::bind("127.0.0.1:0").unwrap());
        proxy
    }

    fn listen(&mut self, listener: TcpListener) {
        self.port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(Mutex::new(false));
        let (streams, target, stop) = (self.streams.clone(), self.target.clone(), stopped.clone());
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if *stop.lock().unwrap() {
                    return; // dropping the listener refuses new connections
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let mut streams = streams.lock().unwrap();
                streams.push(client.try_clone().unwrap());
                streams.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        self.acceptor = Some((acceptor, stopped));
    }

    /// The broker URL through the proxy: `addr` with its host and port replaced.
    fn url(&self, addr: &str) -> String {
        let (scheme, rest) = addr.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| format!("{c}@"))
            .unwrap_or_default();
        format!("{scheme}://{credentials}127.0.0.1:{}/{path}", self.port)
    }

    fn cut(&mut self) {
        if let Some((acceptor, stopped)) = self.acceptor.take() {
            *stopped.lock().unwrap() = true;
            // Wake the acceptor so it sees the flag and drops the listener.
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            acceptor.join().unwrap();
        }
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn restore(&mut self) {
        self.listen(TcpListener::bind(("127.0.0.1", self.port)).unwrap());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Copies bytes from `from` to `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buffer = [0; 16 * 1024];
        while let Ok(n) = from.read(&mut buffer) {
            if n == 0 || to.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// The `host:port` of the broker at `addr`.
fn host_port(addr: &str) -> String {
    let rest = addr.split_once("://").unwrap().1;
    let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5672")
    }
}

fn publisher_config() -> PublisherConfig {
    PublisherConfig::default()
        .connect_timeout(Duration::from_secs(5))
        .confirm_timeout(Duration::from_secs(5))
}

/// Consumes `count` messages from the consumer's queue, acknowledging them.
fn consume_all(consumer: &mut AmqpConsumer, count: usize) -> Vec<IncomingMessage> {
    let mut received = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        received.push(message.clone());
        Disposition::Ack
    };
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut acked = 0;
    while acked < count {
        assert!(
            std::time::Instant::now() < deadline,
            "only {acked} of {count} consumed"
        );
        let report = consumer
            .run_once(&mut handler, count - acked, Duration::from_secs(5))
            .expect("consume");
        acked += usize::try_from(report.acked).unwrap();
    }
    received
}

fn is_unavailable_or_not_attempted(outcome: &Result<(), PublishError>) -> bool {
    matches!(
        outcome,
        Err(PublishError::Unavailable(_) | PublishError::NotAttempted)
    )
}

#[test]
fn a_cut_connection_and_a_refused_reconnect_report_the_broker_unavailable_then_all_goes_out() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");
    let mut proxy = Proxy::start(&host_port(&broker.addr));
    let mut publisher =
        AmqpPublisher::connect(&proxy.url(&broker.addr), publisher_config()).expect("publisher");
    assert_eq!(
        publisher.publish(&[stored(1, &topic, "a", "{}")]),
        vec![Ok(())]
    );

    proxy.cut();
    let batch = [
        stored(2, &topic, "a", "{}"),
        stored(3, &topic, "a", "{}"),
        stored(4, &topic, "b", "{}"),
    ];
    // The client may not have noticed the cut yet and send several messages of a key before
    // their confirms fail: those are unavailable too, never retryable.
    let cut = publisher.publish(&batch);
    assert!(cut.iter().all(is_unavailable_or_not_attempted), "{cut:?}");
    assert!(
        matches!(cut[0], Err(PublishError::Unavailable(_))),
        "{cut:?}"
    );

    let refused = publisher.publish(&batch);
    assert!(
        matches!(&refused[0], Err(PublishError::Unavailable(reason)) if reason.contains("connecting")),
        "{refused:?}"
    );
    assert_eq!(refused[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(refused[2], Err(PublishError::Unavailable(_))),
        "{refused:?}"
    );

    proxy.restore();
    assert_eq!(publisher.publish(&batch), vec![Ok(()), Ok(()), Ok(())]);
    let received: Vec<_> = consume_all(&mut consumer, 4)
        .iter()
        .map(|m| m.headers["correlation-id"].clone())
        .collect();
    // Nothing sent after the cut reached the broker, so nothing arrives twice.
    assert_eq!(received, ["corr-1", "corr-2", "corr-3", "corr-4"]);
}

#[test]
fn a_relay_behind_a_cut_connection_parks_nothing_and_delivers_everything_after() {
    let Some(mut broker) = common::broker() else {
        return;
    };
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
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue).bind(&topic, "#"))
            .expect("consumer");
    let messages: Vec<_> = (0..20)
        .map(|i| NewOutboxMessage::json(&topic, format!("order.{}", i % 4), "Step", &i).unwrap())
        .collect();
    conn.transaction(|conn| enqueue_all(conn, &messages))
        .unwrap();
    drop(conn);

    let mut proxy = Proxy::start(&host_port(&broker.addr));
    let publisher =
        AmqpPublisher::connect(&proxy.url(&broker.addr), publisher_config()).expect("publisher");
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
    proxy.cut();
    for round in 0..3 * max_attempts {
        let report = relay.run_once().unwrap();
        assert_eq!(report.claimed, 20, "round {round}: {report:?}");
        // At least the head of each key; more when several were sent before the cut showed.
        assert!(report.unavailable >= 4, "round {round}: {report:?}");
        assert_eq!(
            report.unavailable + report.released,
            20,
            "round {round}: {report:?}"
        );
        assert_eq!(
            report.retried + report.parked,
            0,
            "round {round}: {report:?}"
        );
    }

    proxy.restore();
    while relay.run_once().unwrap().claimed > 0 {}
    assert_eq!(relay.totals().parked, 0);
    let stats = topic_stats(&mut pool.get().unwrap()).unwrap();
    assert!(stats.iter().all(|s| s.pending + s.parked == 0), "{stats:?}");
    let received = consume_all(&mut consumer, 20);
    let mut per_key: std::collections::HashMap<String, Vec<i64>> = Default::default();
    for message in &received {
        let index: i64 = serde_json::from_slice(&message.payload).unwrap();
        per_key
            .entry(message.partition_key.clone())
            .or_default()
            .push(index);
    }
    for (key, indexes) in &per_key {
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "{key} in order: {indexes:?}"
        );
    }
    drop(pool);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
