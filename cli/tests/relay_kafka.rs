//! `waybill relay` as a process with `BROKER_URL=kafka://...`: it creates the topic, publishes
//! a SQLite outbox to Kafka with each message's `traceparent`, and exits 0 on SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "../../diesel-backend/tests/common/mod.rs"]
mod common;
mod support;

use std::cell::RefCell;
use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_kafka::{ConsumerConfig, KafkaConsumer};
use waybill_outbox_core::NewOutboxMessage;
use waybill_testkit::{kafka, unique, PATIENCE};

const MESSAGES: usize = 60;
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn relay_publishes_to_kafka_creates_the_topic_carries_traceparent_and_stops_on_sigterm() {
    let Some(brokers) = kafka::brokers() else {
        return;
    };
    let db = common::sqlite().unwrap();
    let topic = unique("ops");
    let messages: Vec<NewOutboxMessage> = (0..MESSAGES)
        .map(|n| {
            NewOutboxMessage::json(&topic, format!("key:{}", n % 6), "Tick", &n)
                .unwrap()
                .with_traceparent(TRACEPARENT)
                .unwrap()
        })
        .collect();
    waybill_diesel::enqueue_all(&mut db.conn(), &messages).unwrap();
    let ids: HashSet<_> = messages.iter().map(NewOutboxMessage::id).collect();

    let relay = Command::new(env!("CARGO_BIN_EXE_waybill"))
        .args(["--database-url", &db.url, "relay"])
        .args(["--topics", &topic, "--kafka-partitions", "3"])
        .args([
            "--batch-size",
            "7",
            "--relays",
            "2",
            "--poll-interval",
            "100ms",
        ])
        .env_remove("DATABASE_URL")
        .env("BROKER_URL", format!("kafka://{brokers}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("waybill relay starts");

    // The consumer subscribes to the topic the relay creates; a new group reads from the start.
    let mut consumer = KafkaConsumer::connect(&brokers, ConsumerConfig::new(&topic, unique("ops")))
        .expect("a Kafka consumer");
    let (seen, traces) = (RefCell::new(HashSet::new()), RefCell::new(HashSet::new()));
    let mut handler = |msg: &IncomingMessage| {
        seen.borrow_mut().insert(msg.id);
        traces
            .borrow_mut()
            .insert(msg.traceparent().map(str::to_owned));
        Disposition::Ack
    };
    let started = Instant::now();
    while seen.borrow().len() < ids.len() {
        assert!(
            started.elapsed() < PATIENCE,
            "only {} consumed",
            seen.borrow().len()
        );
        // A step fails while the topic is not there yet; the next one goes on.
        let _ = consumer.run_once(&mut handler, 100, Duration::from_millis(500));
    }
    let (seen, traces) = (seen.into_inner(), traces.into_inner());
    assert_eq!(seen, ids, "Kafka holds exactly the enqueued messages");
    assert_eq!(traces, HashSet::from([Some(TRACEPARENT.to_owned())]));

    let (code, stderr) = support::stop_relay(relay, "-TERM", PATIENCE);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
}
