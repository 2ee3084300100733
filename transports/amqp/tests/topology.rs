//! The consumer's topology against a real RabbitMQ: passive mode on queues and exchanges that
//! someone else declared with other arguments, a clear `PRECONDITION_FAILED` without it, and
//! connects that fail part-way without leaving half a topology behind.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use waybill_amqp::{
    AMQPValue, AmqpConsumer, AmqpPublisher, ConsumeReport, ConsumerConfig, Error, ExchangeKind,
    FieldTable, LongString, PublisherConfig, DEAD_LETTER_REASON,
};
use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_outbox_core::Publisher;

use common::{header, stored, unique, Kind, PATIENCE};

/// Queue arguments as an operator's policy or another team would set them.
fn foreign_queue_arguments(dead_letter_exchange: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(10_000));
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(dead_letter_exchange)),
    );
    arguments
}

fn connect_error(addr: &str, config: ConsumerConfig) -> Error {
    match AmqpConsumer::connect(addr, config) {
        Ok(_) => panic!("the connect should have failed"),
        Err(error) => error,
    }
}

/// The error and its sources, joined.
fn chain(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[test]
fn without_passive_mode_a_queue_with_other_arguments_is_refused_clearly_and_nothing_is_created() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    broker.cleanup_queue(&queue);
    broker.declare_queue(&queue, foreign_queue_arguments("policy-dlx"));

    let error = connect_error(&broker.addr, ConsumerConfig::new(&queue));
    let text = chain(&error);
    assert!(
        matches!(&error, Error::Topology { operation: "declaring the queue", name, .. } if *name == queue),
        "{text}"
    );
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    assert!(text.contains("passive"), "says what to do: {text}");
    assert!(!error.is_retryable());
    // The dead-letter exchange and queue it would have declared first were not created.
    assert!(!broker.exists(Kind::Exchange, &format!("{queue}.dead")));
    assert!(!broker.exists(Kind::Queue, &format!("{queue}.dead")));
}

#[test]
fn passive_mode_consumes_a_queue_and_an_exchange_declared_by_someone_else() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    let (team, dlx, dlq) = (unique("team"), unique("dlx"), unique("dlq"));
    broker.cleanup_queue(&queue);
    broker.declare_queue(&queue, foreign_queue_arguments(&dlx));
    // Another team's fanout exchange, with arguments of its own.
    let mut exchange_arguments = FieldTable::default();
    exchange_arguments.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(LongString::from("elsewhere")),
    );
    broker.declare_exchange(&team, ExchangeKind::Fanout, exchange_arguments);
    broker.declare_exchange(&dlx, ExchangeKind::Fanout, FieldTable::default());
    broker.declare_queue(&dlq, FieldTable::default());
    broker.bind(&dlq, &dlx, "");

    let config = ConsumerConfig::new(&queue)
        .passive(true)
        .bind(&team, "")
        .dead_letter_exchange(&dlx);
    let mut consumer = AmqpConsumer::connect(&broker.addr, config.clone()).expect("passive");
    let mut publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().declare_exchanges(None),
    )
    .expect("publisher");
    let batch = [stored(1, &team, "a", "{}"), stored(2, &team, "b", "{}")];
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let mut handler = |message: &IncomingMessage| {
        if message.headers["correlation-id"] == "corr-2" {
            Disposition::DeadLetter("not ours".into())
        } else {
            Disposition::Ack
        }
    };
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while total.acked + total.dead_lettered < 2 {
        assert!(Instant::now() < deadline, "stalled at {total:?}");
        let report = consumer
            .run_once(&mut handler, 10, Duration::from_secs(5))
            .expect("consume");
        total.add(&report);
    }
    assert_eq!((total.acked, total.dead_lettered), (1, 1));
    let dead = broker.drain(&dlq, 1);
    assert_eq!(
        header(&dead[0], DEAD_LETTER_REASON),
        Some("not ours".into())
    );
    // Nothing of its own was declared.
    assert!(!broker.exists(Kind::Queue, &config.dead_letter_queue_name()));
    drop(consumer);
    assert_eq!(broker.depth(&queue), 0);

    // The same without passive mode: another kind of exchange is refused.
    let error = connect_error(
        &broker.addr,
        ConsumerConfig::new(unique("q")).bind(&team, ""),
    );
    assert!(chain(&error).contains("PRECONDITION_FAILED"), "{error}");
}

#[test]
fn passive_mode_names_the_queue_that_is_missing() {
    let Some(broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    let error = connect_error(&broker.addr, ConsumerConfig::new(&queue).passive(true));
    let text = chain(&error);
    assert!(
        matches!(&error, Error::Topology { operation: "checking the queue", name, .. } if *name == queue),
        "{text}"
    );
    assert!(text.contains("NOT_FOUND"), "{text}");
    assert!(!error.is_retryable());
    assert!(!broker.exists(Kind::Exchange, &format!("{queue}.dead")));
}

#[test]
fn a_connect_that_finds_a_bound_exchange_missing_creates_nothing() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    let missing = unique("missing");
    broker.cleanup_queue(&queue);
    // The exchange is someone else's: only checked, and it is not there.
    let config = ConsumerConfig::new(&queue)
        .declare_exchanges(None)
        .bind(&missing, "#");
    let error = connect_error(&broker.addr, config);
    assert!(
        matches!(&error, Error::Topology { operation: "checking the exchange", name, .. } if *name == missing),
        "{}",
        chain(&error)
    );
    for (kind, name) in [
        (Kind::Queue, queue.clone()),
        (Kind::Queue, format!("{queue}.dead")),
        (Kind::Exchange, format!("{queue}.dead")),
    ] {
        assert!(
            !broker.exists(kind, &name),
            "{kind:?} {name} was left behind"
        );
    }
}

#[test]
fn a_connect_that_fails_after_creating_removes_what_it_created() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    let exchange = unique("x");
    broker.cleanup_queue(&queue);
    broker.cleanup_exchange(&exchange);
    // The broker refuses the exchange only when asked to create it, after the queue and the
    // dead-letter exchange and queue were created.
    let config = ConsumerConfig::new(&queue)
        .declare_exchanges(Some(ExchangeKind::Custom("x-waybill-no-such-type".into())))
        .bind(&exchange, "#");
    let error = connect_error(&broker.addr, config);
    assert!(
        chain(&error).contains("x-waybill-no-such-type"),
        "{error:?}"
    );
    for (kind, name) in [
        (Kind::Queue, queue.clone()),
        (Kind::Queue, format!("{queue}.dead")),
        (Kind::Exchange, format!("{queue}.dead")),
        (Kind::Exchange, exchange.clone()),
    ] {
        assert!(
            !broker.exists(kind, &name),
            "{kind:?} {name} was left behind"
        );
    }

    // What existed before a failed connect stays, messages included.
    let kept = unique("kept");
    broker.cleanup_queue(&kept);
    AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&kept)).expect("declares");
    let config = ConsumerConfig::new(&kept)
        .declare_exchanges(Some(ExchangeKind::Custom("x-waybill-no-such-type".into())))
        .bind(&exchange, "#");
    connect_error(&broker.addr, config);
    assert!(broker.exists(Kind::Queue, &kept));
    assert!(broker.exists(Kind::Exchange, &format!("{kept}.dead")));
}
