//! Shared test harness: the NATS URL, skipping when the server is unreachable, unique streams
//! that delete themselves, message builders and raw async-nats helpers.
//!
//! `NATS_URL` (default `nats://127.0.0.1:4222`). An unreachable server skips the test with a
//! message, unless `WAYBILL_REQUIRE_SERVERS=1`, which turns the skip into a failure.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

pub mod private;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use chrono::Utc;
use waybill_inbox_core::{DeliveryHandler, IncomingMessage};
use waybill_nats::{ConsumeReport, NatsConsumer};
use waybill_outbox_core::{MessageId, OutboxMessage, Status};

/// A generous liveness deadline: tests never depend on speed, only on progress.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A runtime for the raw async-nats helpers of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A raw client for setup and inspection, or `None` (after printing why) when NATS is not
/// reachable.
pub struct Nats {
    pub rt: tokio::runtime::Runtime,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub url: String,
    streams: Vec<String>,
}

pub fn nats() -> Option<Nats> {
    let url = nats_url();
    let rt = runtime();
    match rt.block_on(async_nats::connect(&url)) {
        Ok(client) => {
            let js = {
                let _runtime = rt.enter();
                jetstream::new(client.clone())
            };
            Some(Nats {
                rt,
                client,
                js,
                url,
                streams: Vec::new(),
            })
        }
        Err(error) => {
            let why = format!("not reachable at {url}: {error}");
            waybill_testkit::skip("NATS", "NATS_URL", &why);
            None
        }
    }
}

/// A unique name fit for streams, subjects and consumers.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl Nats {
    /// Creates a stream with a unique name capturing `<topic>` and `<topic>.>` for a unique
    /// topic; both are deleted (with the consumer's dead-letter stream) when `self` drops.
    pub fn stream(&mut self) -> (String, String) {
        let name = unique("WB");
        let topic = unique("t");
        self.rt
            .block_on(self.js.create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![topic.clone(), format!("{topic}.>")],
                ..Default::default()
            }))
            .expect("create stream");
        self.forget_later(&name);
        (name, topic)
    }

    /// Deletes the stream `name` (and `<name>_dead`) at the end of the test.
    pub fn forget_later(&mut self, name: &str) {
        self.streams.push(name.to_owned());
        self.streams.push(format!("{name}_dead"));
    }

    /// How many messages the stream holds.
    pub fn count(&self, stream: &str) -> u64 {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.expect("stream");
            stream.get_info().await.expect("stream info").state.messages
        })
    }

    /// Every message of the stream, in stream order: (subject, headers, payload).
    pub fn messages(&self, stream: &str) -> Vec<async_nats::jetstream::message::StreamMessage> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.expect("stream");
            let info = stream.get_info().await.expect("stream info");
            let mut out = Vec::new();
            for seq in info.state.first_sequence..=info.state.last_sequence {
                if let Ok(message) = stream.get_raw_message(seq).await {
                    out.push(message);
                }
            }
            out
        })
    }

    /// Publishes a raw message to JetStream and awaits its ack.
    pub fn publish_raw(&self, subject: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        self.rt.block_on(async {
            self.js
                .publish_with_headers(subject.to_owned(), map, body.to_vec().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        });
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.streams) {
            let _ = self.rt.block_on(self.js.delete_stream(&name));
        }
    }
}

/// A stored outbox message as the relay would claim it.
pub fn message(topic: &str, key: &str, n: usize) -> OutboxMessage {
    let mut m = OutboxMessage::new(n as i64 + 1, MessageId::new(), Status::Pending);
    m.topic = topic.to_owned();
    m.partition_key = key.to_owned();
    m.message_type = "OrderPlaced".into();
    m.content_type = "application/json".into();
    m.payload = format!(r#"{{"n":{n},"key":"{key}"}}"#).into_bytes();
    m.headers.insert(
        "traceparent".into(),
        format!("00-{:032x}-{:016x}-01", n + 1, n + 1),
    );
    m.headers.insert("correlation-id".into(), format!("c-{n}"));
    m.created_at = Utc::now();
    m
}

/// `count` messages spread round-robin over `keys` keys.
pub fn batch(topic: &str, keys: usize, count: usize) -> Vec<OutboxMessage> {
    (0..count)
        .map(|n| message(topic, &format!("order:{}", n % keys), n))
        .collect()
}

/// Runs `consumer.run_once` until `done(total)` holds or the deadline passes; returns the total.
pub fn consume_until(
    consumer: &mut NatsConsumer,
    handler: &mut impl DeliveryHandler,
    done: impl Fn(&ConsumeReport) -> bool,
) -> ConsumeReport {
    let deadline = Instant::now() + DEADLINE;
    let mut total = ConsumeReport::default();
    while !done(&total) {
        assert!(Instant::now() < deadline, "no progress in time: {total:?}");
        let report = consumer
            .run_once(handler, 200, Duration::from_millis(300))
            .expect("run_once");
        total.delivered += report.delivered;
        total.acked += report.acked;
        total.retried += report.retried;
        total.dead_lettered += report.dead_lettered;
        total.malformed += report.malformed;
    }
    total
}

/// What a handler saw, in delivery order.
pub type Seen = Vec<IncomingMessage>;
