//! Shared harness for the RabbitMQ tests: the broker address, skipping when it is down, unique
//! names, and a raw lapin client for setup, raw publishes, reading queues and cleanup.
//!
//! `AMQP_ADDR` (default `amqp://guest:guest@127.0.0.1:5672/%2f`). An unreachable broker skips
//! the test with a message, unless `WAYBILL_REQUIRE_SERVERS=1`, which makes it a failure.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::expect_used,
    clippy::unwrap_used
)]

pub mod proxy;

#[allow(unused_imports)] // each test binary uses some
pub use waybill_testkit::outbox::{sqlite, stored, SqlitePool, TempDatabase};
pub use waybill_testkit::{unique, PATIENCE};

use std::collections::HashSet;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::runtime::Runtime;

pub fn addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A raw lapin client; deletes the queues and exchanges it was told about when dropped.
pub struct Broker {
    pub addr: String,
    runtime: Runtime,
    connection: Connection,
    pub channel: Channel,
    queues: HashSet<String>,
    exchanges: HashSet<String>,
}

/// Connects, or skips (returns `None`) when the broker is not reachable.
pub fn broker() -> Option<Broker> {
    let addr = addr();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let connected = runtime.block_on(async {
        let connection = Connection::connect(&addr, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok::<_, lapin::Error>((connection, channel))
    });
    match connected {
        Ok((connection, channel)) => Some(Broker {
            addr,
            runtime,
            connection,
            channel,
            queues: HashSet::new(),
            exchanges: HashSet::new(),
        }),
        Err(error) => {
            let why = format!("not reachable at {}: {error}", waybill_amqp::redact(&addr));
            waybill_testkit::skip("RabbitMQ", "AMQP_ADDR", &why);
            None
        }
    }
}

impl Broker {
    /// Deletes `queue` (and `<queue>.dead`, the default dead-letter queue and exchange) at the
    /// end of the test.
    pub fn cleanup_queue(&mut self, queue: &str) {
        self.queues.insert(queue.to_owned());
        self.queues.insert(format!("{queue}.dead"));
        self.exchanges.insert(format!("{queue}.dead"));
    }

    pub fn cleanup_exchange(&mut self, exchange: &str) {
        self.exchanges.insert(exchange.to_owned());
    }

    /// Publishes raw bytes to the queue through the default exchange and waits for the confirm.
    pub fn publish_raw(&self, queue: &str, properties: BasicProperties, body: &[u8]) {
        self.runtime.block_on(async {
            let confirm = self
                .channel
                .basic_publish(
                    ShortString::default(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await
                .expect("publish");
            let confirmation = confirm.await.expect("confirm");
            assert!(confirmation.is_ack());
            assert!(
                confirmation.take_message().is_none(),
                "raw publish returned"
            );
        });
    }

    /// Consumes `count` messages from `queue` (acknowledging them), waiting for them with the
    /// liveness bound only.
    pub fn drain(&self, queue: &str, count: usize) -> Vec<Delivery> {
        self.runtime.block_on(async {
            let mut consumer = self
                .channel
                .basic_consume(
                    queue.into(),
                    ShortString::default(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("basic.consume");
            let mut got = Vec::new();
            while got.len() < count {
                let delivery = tokio::time::timeout(PATIENCE, consumer.next())
                    .await
                    .unwrap_or_else(|_| panic!("only {} of {count} messages in {queue}", got.len()))
                    .expect("consumer open")
                    .expect("delivery");
                self.channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await
                    .expect("ack");
                got.push(delivery);
            }
            self.channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await
                .expect("basic.cancel");
            got
        })
    }

    /// Declares a durable topic exchange and a durable queue bound to it with `routing_key`
    /// (both deleted at the end of the test).
    pub fn bind_queue(&mut self, queue: &str, exchange: &str, routing_key: &str) {
        self.cleanup_exchange(exchange);
        self.cleanup_queue(queue);
        self.runtime.block_on(async {
            self.channel
                .exchange_declare(
                    exchange.into(),
                    lapin::ExchangeKind::Topic,
                    lapin::options::ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("exchange.declare");
            self.channel
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("queue.declare");
            self.channel
                .queue_bind(
                    queue.into(),
                    exchange.into(),
                    routing_key.into(),
                    lapin::options::QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("queue.bind");
        });
    }

    /// Deletes `exchange` now.
    pub fn delete_exchange(&self, exchange: &str) {
        self.runtime.block_on(async {
            self.channel
                .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                .await
                .expect("exchange.delete");
        });
    }

    /// The frame size this connection negotiated with the broker.
    pub fn frame_max(&self) -> usize {
        self.connection.configuration().frame_max() as usize
    }

    /// How many messages `queue` holds, without consuming them.
    pub fn depth(&self, queue: &str) -> u32 {
        self.runtime.block_on(async {
            self.channel
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("passive declare")
                .message_count()
        })
    }
}

/// A queue or an exchange, for [`Broker::exists`].
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Queue,
    Exchange,
}

impl Broker {
    /// Whether the queue or exchange exists (a passive declare on a channel of its own, since
    /// a missing one closes the channel).
    pub fn exists(&self, kind: Kind, name: &str) -> bool {
        self.runtime.block_on(async {
            let channel = self.connection.create_channel().await.expect("channel");
            let found = match kind {
                Kind::Queue => channel
                    .queue_declare(
                        name.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .map(drop),
                Kind::Exchange => {
                    channel
                        .exchange_declare(
                            name.into(),
                            ExchangeKind::Fanout,
                            ExchangeDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                }
            };
            if channel.status().connected() {
                let _ = channel.close(200, "OK".into()).await;
            }
            match found {
                Ok(()) => true,
                Err(error) if error.to_string().contains("NOT_FOUND") => false,
                Err(error) => panic!("looking up {name}: {error}"),
            }
        })
    }

    /// Declares a durable queue with `arguments`; deleted at the end of the test.
    pub fn declare_queue(&mut self, name: &str, arguments: FieldTable) {
        self.queues.insert(name.to_owned());
        self.runtime
            .block_on(self.channel.queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            ))
            .expect("queue.declare");
    }

    /// Declares a durable exchange; deleted at the end of the test.
    pub fn declare_exchange(&mut self, name: &str, kind: ExchangeKind, arguments: FieldTable) {
        self.exchanges.insert(name.to_owned());
        self.runtime
            .block_on(self.channel.exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            ))
            .expect("exchange.declare");
    }

    pub fn bind(&self, queue: &str, exchange: &str, routing_key: &str) {
        self.runtime
            .block_on(self.channel.queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ))
            .expect("queue.bind");
    }

    /// Takes the head of `queue` and hands it back unsettled (`basic.get`, then `basic.nack`
    /// with requeue), as a consumer that lost its connection would.
    pub fn return_once(&self, queue: &str) {
        self.runtime.block_on(async {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
                .expect("a message in the queue");
            self.channel
                .basic_nack(
                    got.delivery.delivery_tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
                .expect("basic.nack");
        });
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.runtime.block_on(async {
            for queue in &self.queues {
                let _ = self
                    .channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in &self.exchanges {
                let _ = self
                    .channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = self.connection.close(200, "OK".into()).await;
        });
    }
}

/// A header of a raw message as text.
pub fn header(message: &Delivery, name: &str) -> Option<String> {
    let value = message
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
        .clone();
    match value {
        lapin::types::AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        lapin::types::AMQPValue::LongLongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}
