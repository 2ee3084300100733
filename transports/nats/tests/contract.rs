//! NATS JetStream keeps the transport contract (waybill-testkit), on the real server: a unique
//! stream per test, competing consumers sharing one durable consumer, the dead-letter stream
//! deleted and created again.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream::stream;
use waybill_inbox_core::RetryPolicy;
use waybill_nats::{
    ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig, DEAD_LETTER_REASON,
};
use waybill_outbox_core::{Headers, OutboxMessage};
use waybill_testkit::{contract, Harness};

/// One stream capturing one topic, and the durable consumer every [`Harness::consumer`] shares.
struct NatsHarness {
    nats: common::Nats,
    topic: String,
    config: ConsumerConfig,
}

impl NatsHarness {
    fn new() -> Option<Self> {
        let mut nats = common::nats()?;
        let (stream, topic) = nats.stream();
        // Unacknowledged deliveries come back after `ack_wait`, also those of a killed consumer.
        let config =
            ConsumerConfig::new(stream, common::unique("c")).ack_wait(Duration::from_secs(2));
        Some(Self {
            nats,
            topic,
            config,
        })
    }

    fn dead_letter_stream(&self) -> String {
        self.config.dead_letter_stream_name().unwrap()
    }
}

impl Harness for NatsHarness {
    type Publisher = NatsPublisher;
    type Consumer = NatsConsumer;

    fn name(&self) -> &'static str {
        "nats"
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn publisher(&mut self) -> NatsPublisher {
        NatsPublisher::connect(&self.nats.url, PublisherConfig::default()).unwrap()
    }

    fn consumer(&mut self, retry: RetryPolicy) -> NatsConsumer {
        let config = self
            .config
            .clone()
            .retry(retry)
            .poll_wait(Duration::from_millis(200));
        NatsConsumer::connect(&self.nats.url, config).unwrap()
    }

    fn publish_raw(&mut self, headers: Headers, payload: Vec<u8>) {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.nats.publish_raw(&self.topic, &headers, &payload);
    }

    fn dead_letters(&mut self) -> Vec<String> {
        self.nats
            .messages(&self.dead_letter_stream())
            .iter()
            .map(|m| {
                m.headers
                    .get(DEAD_LETTER_REASON)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            })
            .collect()
    }

    fn break_dead_letters(&mut self) -> bool {
        let name = self.dead_letter_stream();
        self.nats
            .rt
            .block_on(self.nats.js.delete_stream(&name))
            .unwrap();
        true
    }

    fn mend_dead_letters(&mut self) {
        let config = stream::Config {
            name: self.dead_letter_stream(),
            subjects: vec![self.config.dead_letter_subject_name()],
            ..Default::default()
        };
        self.nats
            .rt
            .block_on(self.nats.js.create_stream(config))
            .unwrap();
    }

    /// Larger than the server's `max_payload` (1 MiB by default): the client refuses it.
    fn poison(&mut self) -> Option<OutboxMessage> {
        let mut poison = contract::message(&self.topic, "p", 2);
        poison.payload = vec![b' '; 2 << 20];
        Some(poison)
    }
}

waybill_testkit::contract_tests!(NatsHarness::new(), end_to_end);
