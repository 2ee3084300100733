//! RabbitMQ keeps the transport contract (waybill-testkit), on the real server: a unique
//! topic exchange and queue per test, competing consumers of that queue in passive mode (the
//! harness declares the topology once, as an operator would), and a dead-letter exchange that
//! is deleted and declared again; and 10,000 messages through a consumer cut off mid-stream.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use waybill_amqp::{
    AMQPValue, AmqpConsumer, AmqpPublisher, ConsumerConfig, ExchangeKind, FieldTable, LongString,
    PublisherConfig, DEAD_LETTER_REASON,
};
use waybill_inbox_core::RetryPolicy;
use waybill_outbox_core::{Headers, OutboxMessage};
use waybill_testkit::{contract, Harness};

use common::proxy::{host_port, Proxy};

/// One topic exchange bound to one queue, and the dead letters read off its dead-letter queue.
struct AmqpHarness {
    broker: common::Broker,
    topic: String,
    queue: String,
    /// Dead-letter reasons drained so far: draining acknowledges them.
    dead: Vec<String>,
}

impl AmqpHarness {
    fn new() -> Option<Self> {
        let mut broker = common::broker()?;
        let topic = common::unique("orders");
        let queue = common::unique("q");
        broker.cleanup_exchange(&topic);
        broker.cleanup_queue(&queue);
        // Declares the queue, its binding and the dead-letter exchange and queue once; every
        // consumer the contracts start only checks them.
        let declare = ConsumerConfig::new(&queue).bind(&topic, "#");
        drop(AmqpConsumer::connect(&broker.addr, declare).unwrap());
        Some(Self {
            broker,
            topic,
            queue,
            dead: Vec::new(),
        })
    }

    fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.queue)
    }
}

impl Harness for AmqpHarness {
    type Publisher = AmqpPublisher;
    type Consumer = AmqpConsumer;

    fn name(&self) -> &'static str {
        "rabbitmq"
    }

    fn topic(&self) -> &str {
        &self.topic
    }

    fn publisher(&mut self) -> AmqpPublisher {
        AmqpPublisher::connect(&self.broker.addr, PublisherConfig::default()).unwrap()
    }

    fn consumer(&mut self, retry: RetryPolicy) -> AmqpConsumer {
        let config = ConsumerConfig::new(&self.queue)
            .passive(true)
            .bind(&self.topic, "#")
            .retry(retry)
            .poll_timeout(Duration::from_millis(100))
            .max_reconnect_delay(Duration::from_millis(200));
        AmqpConsumer::connect(&self.broker.addr, config).unwrap()
    }

    fn publish_raw(&mut self, headers: Headers, payload: Vec<u8>) {
        let mut table = FieldTable::default();
        for (name, value) in &headers {
            table.insert(
                name.as_str().into(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        self.broker.publish_raw(
            &self.queue,
            lapin::BasicProperties::default().with_headers(table),
            &payload,
        );
    }

    fn dead_letters(&mut self) -> Vec<String> {
        let queue = self.dead_letter_exchange();
        let waiting = self.broker.depth(&queue) as usize;
        for delivery in self.broker.drain(&queue, waiting) {
            self.dead
                .push(common::header(&delivery, DEAD_LETTER_REASON).unwrap_or_default());
        }
        self.dead.clone()
    }

    fn break_dead_letters(&mut self) -> bool {
        self.broker.delete_exchange(&self.dead_letter_exchange());
        true
    }

    fn mend_dead_letters(&mut self) {
        let exchange = self.dead_letter_exchange();
        self.broker
            .declare_exchange(&exchange, ExchangeKind::Fanout, FieldTable::default());
        self.broker.bind(&exchange, &exchange, "");
    }

    /// Connected through a TCP proxy: cutting it is the broker's view of a crashed process.
    fn consumer_to_kill(&mut self) -> (AmqpConsumer, contract::Kill) {
        let mut proxy = Proxy::start(&host_port(&self.broker.addr));
        let config = ConsumerConfig::new(&self.queue).passive(true);
        let consumer = AmqpConsumer::connect(&proxy.url(&self.broker.addr), config).unwrap();
        (consumer, Box::new(move || proxy.cut()))
    }

    /// Headers larger than the negotiated frame size: the publisher refuses it before sending.
    fn poison(&mut self) -> Option<OutboxMessage> {
        let mut poison = contract::message(&self.topic, "p", 2);
        poison
            .headers
            .insert("padding".into(), "x".repeat(self.broker.frame_max() + 1));
        Some(poison)
    }
}

waybill_testkit::contract_tests!(AmqpHarness::new(), end_to_end);
