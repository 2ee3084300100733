//! The consumer's queues, exchanges and bindings: checked, declared and, when a connect fails
//! part-way, removed again.
//!
//! A connect runs in phases so that a failure leaves nothing new behind:
//! 1. every queue and exchange is looked up with a passive declare; one that must exist and
//!    does not fails the connect, one that exists and is ours is declared again, which verifies
//!    its arguments (`PRECONDITION_FAILED` otherwise). Nothing is created in this phase;
//! 2. the missing ones are created;
//! 3. the bindings are made, the prefetch set and the consumer started.
//!
//! A failure in phase 2 or 3 deletes what phase 2 created (queues only while empty and unused,
//! exchanges only once unbound and unused), on a fresh connection.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};

use crate::fields::short;
use crate::link::{within, Link};
use crate::{redact, ConsumerConfig, Error, Result};

/// An open link and the lapin consumer of the queue on it.
pub(crate) struct ConsumerLink {
    pub(crate) link: Link,
    pub(crate) consumer: lapin::Consumer,
}

/// A queue or exchange the consumer needs.
#[derive(Clone, Debug)]
enum Entity {
    Queue {
        name: ShortString,
        arguments: FieldTable,
    },
    Exchange {
        name: ShortString,
        kind: ExchangeKind,
    },
}

impl Entity {
    fn name(&self) -> &ShortString {
        match self {
            Self::Queue { name, .. } | Self::Exchange { name, .. } => name,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Self::Queue { .. } => "queue",
            Self::Exchange { .. } => "exchange",
        }
    }

    /// Declares the entity, or with `passive` checks that it exists.
    async fn declare(&self, channel: &Channel, passive: bool, timeout: Duration) -> Result<()> {
        let declared = match self {
            Self::Queue { name, arguments } => {
                let options = QueueDeclareOptions {
                    passive,
                    durable: true,
                    ..QueueDeclareOptions::default()
                };
                let arguments = if passive {
                    FieldTable::default()
                } else {
                    arguments.clone()
                };
                let declare = channel.queue_declare(name.clone(), options, arguments);
                within("declaring a queue", timeout, declare)
                    .await
                    .map(drop)
            }
            Self::Exchange { name, kind } => {
                let options = ExchangeDeclareOptions {
                    passive,
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                };
                let declare = channel.exchange_declare(
                    name.clone(),
                    kind.clone(),
                    options,
                    FieldTable::default(),
                );
                within("declaring an exchange", timeout, declare).await
            }
        };
        declared.map_err(|error| match error {
            Error::Amqp(source) => Error::Topology {
                operation: match (passive, self) {
                    (true, Self::Queue { .. }) => "checking the queue",
                    (true, Self::Exchange { .. }) => "checking the exchange",
                    (false, Self::Queue { .. }) => "declaring the queue",
                    (false, Self::Exchange { .. }) => "declaring the exchange",
                },
                name: self.name().to_string(),
                source,
            },
            other => other,
        })
    }
}

/// What a connect checks, declares and binds, every name already checked for length.
struct Plan {
    /// Each queue and exchange, and whether the consumer declares it (`false`: only checks it).
    entities: Vec<(Entity, bool)>,
    /// `(queue, exchange, routing key)`.
    bindings: Vec<(ShortString, ShortString, ShortString)>,
    queue: ShortString,
}

impl Plan {
    /// In passive mode the dead-letter exchange is checked on the `first` connect only: it
    /// belongs to someone else, and while it is missing later only dead letters wait.
    fn new(config: &ConsumerConfig, first: bool) -> Result<Self> {
        let declare = !config.passive;
        let queue = short("queue name", config.queue.as_str())?;
        let dlx = short(
            "dead-letter exchange name",
            config.dead_letter_exchange_name(),
        )?;
        let mut arguments = config.queue_arguments.clone();
        if !arguments.inner().contains_key("x-dead-letter-exchange") {
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx.as_str())),
            );
        }
        let mut entities = vec![(
            Entity::Queue {
                name: queue.clone(),
                arguments,
            },
            declare,
        )];
        let mut bindings = Vec::new();
        let mut exchanges = Vec::new();
        for (exchange, routing_key) in &config.bindings {
            let exchange = short("exchange name", exchange.as_str())?;
            let routing_key = short("routing key", routing_key.as_str())?;
            if !exchanges.contains(&exchange) {
                exchanges.push(exchange.clone());
                let kind = config.declare_exchanges.clone();
                entities.push((
                    Entity::Exchange {
                        name: exchange.clone(),
                        kind: kind.clone().unwrap_or(ExchangeKind::Topic),
                    },
                    declare && kind.is_some(),
                ));
            }
            bindings.push((queue.clone(), exchange, routing_key));
        }
        if declare || first {
            entities.push((
                Entity::Exchange {
                    name: dlx.clone(),
                    kind: ExchangeKind::Fanout,
                },
                declare,
            ));
        }
        if declare {
            let dlq = short("dead-letter queue name", config.dead_letter_queue_name())?;
            entities.push((
                Entity::Queue {
                    name: dlq.clone(),
                    arguments: FieldTable::default(),
                },
                true,
            ));
            bindings.push((dlq, dlx, ShortString::default()));
        }
        Ok(Self {
            entities,
            bindings,
            queue,
        })
    }
}

/// Connects, makes sure of the topology (see the module docs) and starts consuming; `first`
/// for [`AmqpConsumer::connect`](crate::AmqpConsumer::connect), `false` when reconnecting.
pub(crate) async fn open(addr: &str, config: &ConsumerConfig, first: bool) -> Result<ConsumerLink> {
    let plan = Plan::new(config, first)?;
    let link = Link::open(addr, &config.tls, config.connect_timeout).await?;
    let mut created = Vec::new();
    match consume(&link, config, &plan, &mut created).await {
        Ok(consumer) => {
            log::debug!(
                "consuming {} from {} (prefetch {})",
                config.queue,
                redact(addr),
                config.prefetch
            );
            Ok(ConsumerLink { link, consumer })
        }
        Err(error) => {
            link.close().await;
            if !created.is_empty() {
                undo(addr, config, &plan, &created).await;
            }
            Err(error)
        }
    }
}

/// The three phases; pushes every entity it created onto `created`.
async fn consume(
    link: &Link,
    config: &ConsumerConfig,
    plan: &Plan,
    created: &mut Vec<Entity>,
) -> Result<lapin::Consumer> {
    let timeout = config.connect_timeout;
    let channel = &link.channel;
    let missing = look_up(&link.connection, channel, plan, timeout).await?;
    for entity in missing {
        entity.declare(channel, false, timeout).await?;
        created.push(entity);
    }
    for (queue, exchange, routing_key) in &plan.bindings {
        let bind = channel.queue_bind(
            queue.clone(),
            exchange.clone(),
            routing_key.clone(),
            QueueBindOptions::default(),
            FieldTable::default(),
        );
        within("binding a queue", timeout, bind)
            .await
            .map_err(|error| match error {
                Error::Amqp(source) => Error::Topology {
                    operation: "binding the queue",
                    name: format!("{queue} to {exchange} ({routing_key})"),
                    source,
                },
                other => other,
            })?;
    }
    within(
        "setting the prefetch",
        timeout,
        channel.basic_qos(config.prefetch, BasicQosOptions::default()),
    )
    .await?;
    within(
        "starting the consumer",
        timeout,
        channel.basic_consume(
            plan.queue.clone(),
            ShortString::default(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// Phase 1: looks every entity up on a channel of its own (a passive declare of a missing one
/// closes its channel), declares again on `channel` those that exist and are ours, and returns
/// those to create. Creates nothing.
async fn look_up(
    connection: &Connection,
    channel: &Channel,
    plan: &Plan,
    timeout: Duration,
) -> Result<Vec<Entity>> {
    let mut probe: Option<Channel> = None;
    let mut missing = Vec::new();
    for (entity, ours) in &plan.entities {
        let probing = match &probe {
            Some(open) if open.status().connected() => open,
            _ => probe
                .insert(within("opening a channel", timeout, connection.create_channel()).await?),
        };
        match entity.declare(probing, true, timeout).await {
            Ok(()) if *ours => entity.declare(channel, false, timeout).await?,
            Ok(()) => {}
            Err(Error::Topology { source, .. }) if *ours && is_not_found(&source) => {
                missing.push(entity.clone());
            }
            Err(error) => return Err(error),
        }
    }
    if let Some(probe) = probe.filter(|p| p.status().connected()) {
        let _ = probe.close(200, "OK".into()).await;
    }
    Ok(missing)
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp)
        if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Deletes what a failed connect created, best effort and only what nobody uses yet: the
/// bindings to a created exchange, then the created queues (while empty and without
/// consumers), then the created exchanges (while unbound).
async fn undo(addr: &str, config: &ConsumerConfig, plan: &Plan, created: &[Entity]) {
    let names: Vec<String> = created
        .iter()
        .map(|e| format!("{} {}", e.what(), e.name()))
        .collect();
    let link = match Link::open(addr, &config.tls, config.connect_timeout).await {
        Ok(link) => link,
        Err(error) => {
            log::warn!(
                "connecting to remove what a failed connect created ({}) failed, left behind: \
                 {error}",
                names.join(", ")
            );
            return;
        }
    };
    let timeout = config.connect_timeout;
    let created_exchange = |name: &ShortString| {
        created
            .iter()
            .any(|e| matches!(e, Entity::Exchange { name: n, .. } if n == name))
    };
    let mut outcomes = Vec::new();
    // A refused operation closes its channel: each gets a channel of its own.
    for (queue, exchange, routing_key) in &plan.bindings {
        if created_exchange(exchange) {
            outcomes.push(
                on_new_channel(&link, timeout, "unbinding a queue", |channel| async move {
                    channel
                        .queue_unbind(
                            queue.clone(),
                            exchange.clone(),
                            routing_key.clone(),
                            FieldTable::default(),
                        )
                        .await
                })
                .await,
            );
        }
    }
    let (queues, exchanges): (Vec<_>, Vec<_>) = created
        .iter()
        .partition(|e| matches!(e, Entity::Queue { .. }));
    for entity in queues.into_iter().chain(exchanges) {
        let name = entity.name().clone();
        let deleted = match entity {
            Entity::Queue { .. } => {
                on_new_channel(&link, timeout, "deleting a queue", |channel| async move {
                    let options = QueueDeleteOptions {
                        if_unused: true,
                        if_empty: true,
                        ..QueueDeleteOptions::default()
                    };
                    channel.queue_delete(name, options).await.map(drop)
                })
                .await
            }
            Entity::Exchange { .. } => {
                on_new_channel(
                    &link,
                    timeout,
                    "deleting an exchange",
                    |channel| async move {
                        let options = ExchangeDeleteOptions {
                            if_unused: true,
                            ..ExchangeDeleteOptions::default()
                        };
                        channel.exchange_delete(name, options).await
                    },
                )
                .await
            }
        };
        if let Err(error) = &deleted {
            log::warn!(
                "a failed connect left {} {} behind: {error}",
                entity.what(),
                entity.name()
            );
        }
        outcomes.push(deleted);
    }
    if outcomes.iter().all(Result::is_ok) {
        log::debug!(
            "a failed connect removed what it created: {}",
            names.join(", ")
        );
    }
    link.close().await;
}

/// Runs `operation` on a channel of its own, closed afterwards if still open.
async fn on_new_channel<F, Fut>(
    link: &Link,
    timeout: Duration,
    what: &'static str,
    operation: F,
) -> Result<()>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<()>>,
{
    let channel = within(
        "opening a channel",
        timeout,
        link.connection.create_channel(),
    )
    .await?;
    within(what, timeout, operation(channel.clone())).await?;
    if channel.status().connected() {
        let _ = channel.close(200, "OK".into()).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(plan: &Plan) -> Vec<(String, bool)> {
        plan.entities
            .iter()
            .map(|(e, ours)| (format!("{} {}", e.what(), e.name()), *ours))
            .collect()
    }

    #[test]
    fn the_default_plan_declares_everything_queue_first() -> Result<()> {
        let config = ConsumerConfig::new("q")
            .bind("orders", "#")
            .bind("orders", "eu.#");
        let plan = Plan::new(&config, true)?;
        let expected = [
            ("queue q", true),
            ("exchange orders", true),
            ("exchange q.dead", true),
            ("queue q.dead", true),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, o)| ((*n).to_owned(), *o))
            .collect();
        assert_eq!(names(&plan), expected);
        assert_eq!(
            plan.bindings.len(),
            3,
            "two for the queue, one for the dead letters"
        );
        Ok(())
    }

    #[test]
    fn passive_plans_only_check_and_the_dead_letter_exchange_only_on_the_first_connect(
    ) -> Result<()> {
        let config = ConsumerConfig::new("q").bind("orders", "#").passive(true);
        let first = Plan::new(&config, true)?;
        let expected = [
            ("queue q", false),
            ("exchange orders", false),
            ("exchange q.dead", false),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(n, o)| ((*n).to_owned(), *o))
            .collect();
        assert_eq!(names(&first), expected);
        assert_eq!(first.bindings.len(), 1, "the queue's binding only");
        assert_eq!(names(&Plan::new(&config, false)?).len(), 2);
        Ok(())
    }

    #[test]
    fn undeclared_exchanges_are_checked_and_a_queue_may_share_an_exchange_name() -> Result<()> {
        let config = ConsumerConfig::new("q")
            .bind("q.dead", "#")
            .declare_exchanges(None);
        let plan = Plan::new(&config, true)?;
        assert!(names(&plan).contains(&("exchange q.dead".to_owned(), false)));
        assert!(names(&plan).contains(&("queue q.dead".to_owned(), true)));
        Ok(())
    }

    #[test]
    fn a_long_name_fails_before_connecting() {
        let config = ConsumerConfig::new("q").bind("x".repeat(256), "#");
        assert!(matches!(
            Plan::new(&config, true),
            Err(Error::TooLong {
                what: "exchange name",
                ..
            })
        ));
    }
}
