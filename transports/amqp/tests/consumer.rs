//! The consumer loop against a real RabbitMQ: bounded retries in place, dead letters with a
//! reason (and what happens while the dead-letter exchange is missing), malformed deliveries
//! that do not stop the loop, panicking handlers on competing consumers, a quorum queue's
//! delivery count, and `run` with a stop handle.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use waybill_amqp::{
    AMQPValue, AmqpConsumer, AmqpPublisher, ConsumeReport, ConsumerConfig, ExchangeKind,
    FieldTable, LongString, PublisherConfig, StopHandle, DEAD_LETTER_REASON,
    DEAD_LETTER_REASON_HEADER, ORIGINAL_QUEUE_HEADER,
};
use waybill_inbox_core::wire::{Binding, Encoder};
use waybill_inbox_core::{DeliveryHandler, Disposition, IncomingMessage};
use waybill_outbox_core::{MessageId, Publisher};

use common::{header, stored, unique, PATIENCE};

/// Runs the consumer until `done` says the summed report is complete.
fn consume_until(
    consumer: &mut AmqpConsumer,
    handler: &mut impl DeliveryHandler,
    done: impl Fn(&ConsumeReport) -> bool,
) -> ConsumeReport {
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while !done(&total) {
        assert!(Instant::now() < deadline, "gave up waiting: {total:?}");
        let report = consumer
            .run_once(handler, 50, Duration::from_secs(5))
            .expect("consume");
        total.delivered += report.delivered;
        total.acked += report.acked;
        total.retried += report.retried;
        total.dead_lettered += report.dead_lettered;
        total.malformed += report.malformed;
    }
    total
}

#[test]
fn a_message_that_always_fails_is_redelivered_max_times_then_dead_lettered() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .max_deliveries(4),
    )
    .expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch: Vec<_> = (0..10)
        .map(|i| stored(i, &topic, &format!("k{}", i % 3), "{}"))
        .collect();
    let poison = batch[4].id;
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let mut seen: HashMap<MessageId, usize> = HashMap::new();
    let mut handler = |message: &IncomingMessage| {
        *seen.entry(message.id).or_default() += 1;
        if message.id == poison {
            Disposition::Retry("the ledger is locked".into())
        } else {
            Disposition::Ack
        }
    };
    let report = consume_until(&mut consumer, &mut handler, |r| {
        r.acked == 9 && r.dead_lettered == 1
    });
    assert_eq!(report.retried, 3, "retried in place");
    assert_eq!(report.delivered, 10);
    assert_eq!(report.malformed, 0);
    assert_eq!(seen[&poison], 4, "first call + 3 retries");
    assert!(
        seen.iter().all(|(id, n)| *id == poison || *n == 1),
        "{seen:?}"
    );

    let dead = broker.drain(&format!("{queue}.dead"), 1);
    assert_eq!(header(&dead[0], "ce-id"), Some(poison.to_string()));
    let reason = header(&dead[0], DEAD_LETTER_REASON_HEADER).expect("reason header");
    assert!(reason.contains("failed 4 deliveries"), "{reason}");
    assert!(reason.contains("the ledger is locked"), "{reason}");
    assert_eq!(
        header(&dead[0], "x-waybill-redeliveries"),
        None,
        "no re-published copies"
    );
    assert_eq!(header(&dead[0], ORIGINAL_QUEUE_HEADER), Some(queue.clone()));
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn malformed_deliveries_are_dead_lettered_and_the_loop_goes_on() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    broker.cleanup_queue(&queue);
    let mut consumer =
        AmqpConsumer::connect(&broker.addr, ConsumerConfig::new(&queue)).expect("consumer");

    let raw = |headers: Vec<(&str, &str)>, content_type: &str, body: &[u8]| {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        broker.publish_raw(
            &queue,
            BasicProperties::default()
                .with_content_type(content_type.into())
                .with_headers(table),
            body,
        );
    };
    let good = |seq: i64| {
        let (headers, body) = Encoder::new(Binding::Amqp).encode(&stored(seq, "orders", "k", "{}"));
        (headers, body)
    };
    let send_good = |seq: i64| {
        let (headers, body) = good(seq);
        let pairs: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        raw(pairs, "application/json", &body);
    };
    let (template, _) = good(0);
    let without_id: Vec<_> = template
        .iter()
        .filter(|(k, _)| k.as_str() != "ce-id")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let bad_id: Vec<_> = template
        .iter()
        .map(|(k, v)| {
            if k == "ce-id" {
                (k.as_str(), "not-a-uuid")
            } else {
                (k.as_str(), v.as_str())
            }
        })
        .collect();
    let fresh_id = MessageId::new().to_string();
    let bad_json: Vec<_> = template
        .iter()
        .map(|(k, v)| {
            if k == "ce-id" {
                (k.as_str(), fresh_id.as_str())
            } else {
                (k.as_str(), v.as_str())
            }
        })
        .collect();

    // pika sends a Python `bytes` value as a byte array.
    let mut bytes_id = FieldTable::default();
    for (name, value) in &template {
        bytes_id.insert(
            name.as_str().into(),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    bytes_id.insert(
        "ce-id".into(),
        AMQPValue::ByteArray(fresh_id.as_bytes().to_vec().into()),
    );

    send_good(1);
    raw(without_id, "application/json", b"{}");
    send_good(2);
    raw(bad_id, "application/json", b"{}");
    raw(bad_json, "application/json", b"{\"unterminated\":");
    broker.publish_raw(
        &queue,
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(bytes_id),
        b"{}",
    );
    send_good(3);

    let mut handled = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        handled.push(message.headers["correlation-id"].clone());
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.delivered == 7);
    assert_eq!(report.acked, 3);
    assert_eq!(report.malformed, 4);
    assert_eq!(report.dead_lettered, 4);
    assert_eq!(handled, ["corr-1", "corr-2", "corr-3"]);

    let dead = broker.drain(&format!("{queue}.dead"), 4);
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| header(d, DEAD_LETTER_REASON_HEADER).expect("reason"))
        .collect();
    assert_eq!(reasons[0], "malformed: ce-id is missing");
    assert!(
        reasons[1].starts_with("malformed: ce-id is not a UUID: \"not-a-uuid\""),
        "{reasons:?}"
    );
    assert!(reasons[2].to_lowercase().contains("json"), "{reasons:?}");
    assert_eq!(reasons[3], "malformed: ce-id is bytes, expected a string");
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn a_handler_dead_letter_goes_to_the_dead_letter_queue_at_once_with_its_reason() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let dead_queue = unique("dlq");
    let dead_exchange = unique("dlx");
    broker.cleanup_queue(&dead_queue);
    broker.cleanup_exchange(&dead_exchange);
    let config = ConsumerConfig::new(&queue)
        .bind(&topic, "#")
        .dead_letter_exchange(&dead_exchange)
        .dead_letter_queue(&dead_queue);
    let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let message = stored(1, &topic, "k", "{}");
    assert_eq!(
        publisher.publish(std::slice::from_ref(&message)),
        vec![Ok(())]
    );

    let mut handler = |_: &IncomingMessage| Disposition::DeadLetter("expired offer".into());
    let report = consume_until(&mut consumer, &mut handler, |r| r.dead_lettered == 1);
    assert_eq!((report.delivered, report.acked, report.retried), (1, 0, 0));
    let dead = broker.drain(&dead_queue, 1);
    assert_eq!(
        header(&dead[0], DEAD_LETTER_REASON_HEADER),
        Some("expired offer".into())
    );
    // The dead letter is still a complete waybill message.
    assert_eq!(header(&dead[0], "ce-id"), Some(message.id.to_string()));
}

#[test]
fn run_consumes_until_stopped() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .poll_timeout(Duration::from_millis(100)),
    )
    .expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch: Vec<_> = (0..20).map(|i| stored(i, &topic, "k", "{}")).collect();
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let stop = StopHandle::new();
    let mut count = 0;
    let mut handler = |_: &IncomingMessage| {
        count += 1;
        if count == batch.len() {
            stop.stop();
        }
        Disposition::Ack
    };
    let report = consumer.run(&mut handler, &stop).expect("run");
    assert_eq!(report.acked, 20);
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn after_a_lost_connection_the_consumer_reconnects_and_gets_the_unacknowledged_back() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let mut consumer = AmqpConsumer::connect(
        &broker.addr,
        ConsumerConfig::new(&queue).bind(&topic, "#").prefetch(10),
    )
    .expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch: Vec<_> = (0..10).map(|i| stored(i, &topic, "k", "{}")).collect();
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let mut handled = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        handled.push(message.headers["correlation-id"].clone());
        Disposition::Ack
    };
    let mut acked = 0;
    while acked < 3 {
        acked += usize::try_from(
            consumer
                .run_once(&mut handler, 3 - acked, PATIENCE)
                .expect("consume")
                .acked,
        )
        .unwrap();
    }

    // The broker had already sent up to the prefetch; those unacknowledged go back.
    consumer.simulate_connection_loss();
    assert!(!consumer.is_connected());
    let rest = consume_until(&mut consumer, &mut handler, |r| r.acked == 7);
    assert_eq!(rest.dead_lettered, 0);
    assert!(consumer.is_connected());
    let expected: Vec<_> = (0..10).map(|i| format!("corr-{i}")).collect();
    assert_eq!(handled, expected);
}

#[test]
fn a_retried_message_takes_effect_before_the_next_message_of_its_key() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue).bind(&topic, "#");
    let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch = [stored(1, &topic, "k", "{}"), stored(2, &topic, "k", "{}")];
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let mut failures = 0;
    let mut effects = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        let seq = message.headers["correlation-id"].clone();
        if seq == "corr-1" && failures < 2 {
            failures += 1;
            return Disposition::Retry("deadlock detected".into());
        }
        effects.push(seq);
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.acked == 2);
    assert_eq!(effects, ["corr-1", "corr-2"]);
    assert_eq!((report.retried, report.dead_lettered), (2, 0));
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn a_panicking_handler_is_dead_lettered_after_max_deliveries_and_the_consumer_goes_on() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue)
        .bind(&topic, "#")
        .max_deliveries(3);
    let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch = [
        stored(1, &topic, "a", "{}"),
        stored(2, &topic, "b", "{}"),
        stored(3, &topic, "a", "{}"),
    ];
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let mut calls = 0;
    let mut handled = Vec::new();
    let mut handler = |message: &IncomingMessage| {
        let seq = message.headers["correlation-id"].clone();
        if seq == "corr-1" {
            calls += 1;
            panic!("the handler has a bug");
        }
        handled.push(seq);
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| {
        r.acked == 2 && r.dead_lettered == 1
    });
    assert_eq!(calls, 3, "one call per allowed delivery");
    assert_eq!(handled, ["corr-2", "corr-3"]);
    assert_eq!(report.delivered, 3);
    let dead = broker.drain(&format!("{queue}.dead"), 1);
    assert_eq!(header(&dead[0], "ce-id"), Some(batch[0].id.to_string()));
    let reason = header(&dead[0], DEAD_LETTER_REASON_HEADER).expect("reason header");
    assert!(
        reason.contains("handler panicked: the handler has a bug"),
        "{reason}"
    );
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn a_dead_letter_carries_its_reason_under_the_header_name_every_transport_uses() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue).bind(&topic, "#");
    let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let message = stored(1, &topic, "k", "{}");
    assert_eq!(
        publisher.publish(std::slice::from_ref(&message)),
        vec![Ok(())]
    );

    let mut handler = |_: &IncomingMessage| Disposition::DeadLetter("expired offer".into());
    consume_until(&mut consumer, &mut handler, |r| r.dead_lettered == 1);
    let dead = broker.drain(&format!("{queue}.dead"), 1);
    assert_eq!(DEAD_LETTER_REASON, "waybill-dead-letter-reason");
    assert_eq!(
        header(&dead[0], DEAD_LETTER_REASON),
        Some("expired offer".into())
    );
    assert_eq!(
        header(&dead[0], DEAD_LETTER_REASON_HEADER),
        Some("expired offer".into()),
        "the older name stays readable"
    );
}

#[test]
fn run_returns_after_the_delivery_in_hand_once_stopped_and_hands_back_what_was_sent_ahead() {
    // Stopped mid-step (a step may take all ten the broker sent ahead), then at the end of a
    // step of three (with more sent ahead after its acknowledgements).
    for prefetch in [32, 3] {
        let Some(mut broker) = common::broker() else {
            return;
        };
        let topic = unique("orders");
        let queue = unique("q");
        broker.cleanup_exchange(&topic);
        broker.cleanup_queue(&queue);
        let config = ConsumerConfig::new(&queue)
            .bind(&topic, "#")
            .prefetch(prefetch);
        let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
        let mut publisher =
            AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
        let batch: Vec<_> = (0..10).map(|i| stored(i, &topic, "k", "{}")).collect();
        assert!(publisher.publish(&batch).iter().all(Result::is_ok));

        let stop = StopHandle::new();
        let mut handled = Vec::new();
        let mut handler = |message: &IncomingMessage| {
            handled.push(message.headers["correlation-id"].clone());
            if handled.len() == 3 {
                stop.stop();
            }
            Disposition::Ack
        };
        let report = consumer.run(&mut handler, &stop).expect("run");
        assert_eq!((report.delivered, report.acked), (3, 3), "{report:?}");
        assert_eq!(handled, ["corr-0", "corr-1", "corr-2"]);

        // The consumer is still alive, yet holds none of the rest: they went back, in order.
        let rest: Vec<_> = broker
            .drain(&queue, 7)
            .iter()
            .map(|d| header(d, "correlation-id").expect("correlation id"))
            .collect();
        let expected: Vec<_> = (3..10).map(|i| format!("corr-{i}")).collect();
        assert_eq!(rest, expected, "prefetch {prefetch}");
        drop(consumer);
        assert_eq!(broker.depth(&queue), 0);
    }
}

#[test]
fn a_panicking_handler_on_competing_consumers_is_dead_lettered_once_and_every_consumer_survives() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue)
        .bind(&topic, "#")
        .prefetch(2)
        .poll_timeout(Duration::from_millis(100))
        .retry(
            waybill_inbox_core::RetryPolicy::default()
                .max_deliveries(3)
                .backoff(Duration::ZERO, Duration::ZERO),
        );
    let consumers: Vec<_> = (0..2)
        .map(|_| AmqpConsumer::connect(&broker.addr, config.clone()).expect("consumer"))
        .collect();
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch: Vec<_> = (0..10)
        .map(|i| stored(i, &topic, &format!("k{}", i % 3), "{}"))
        .collect();
    let poison = batch[4].id;
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let stop = StopHandle::new();
    let poisoned = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (handled, seen) = mpsc::channel();
    let workers: Vec<_> = consumers
        .into_iter()
        .map(|mut consumer| {
            let (stop, poisoned, handled) = (stop.clone(), poisoned.clone(), handled.clone());
            std::thread::spawn(move || {
                let mut handler = |message: &IncomingMessage| {
                    if message.id == poison {
                        poisoned.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        panic!("the handler has a bug");
                    }
                    let _ = handled.send(message.id);
                    Disposition::Ack
                };
                consumer.run(&mut handler, &stop)
            })
        })
        .collect();
    let mut ids: Vec<_> = (0..9)
        .map(|_| seen.recv_timeout(PATIENCE).expect("a handled message"))
        .collect();
    // Blocks until the dead letter is there.
    let dead = broker.drain(&format!("{queue}.dead"), 1);
    stop.stop();
    let mut total = ConsumeReport::default();
    for worker in workers {
        let report = worker
            .join()
            .expect("the consumer thread survived")
            .expect("run returned normally");
        total.add(&report);
    }
    ids.sort_unstable();
    let mut expected: Vec<_> = batch
        .iter()
        .map(|m| m.id)
        .filter(|id| *id != poison)
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "the messages behind it were handled");
    assert_eq!(
        poisoned.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "max_deliveries handler calls"
    );
    assert_eq!((total.acked, total.dead_lettered), (9, 1), "{total:?}");
    assert_eq!(header(&dead[0], "ce-id"), Some(poison.to_string()));
    assert_eq!(
        broker.depth(&format!("{queue}.dead")),
        0,
        "the dead-letter queue held exactly what the reports counted"
    );
    assert!(header(&dead[0], DEAD_LETTER_REASON)
        .expect("reason")
        .contains("handler panicked: the handler has a bug"));
}

/// Runs `consumer` on a thread with a handler that refuses message `corr-1` and acknowledges
/// the rest, reporting every call on the returned channel.
fn refusing_first(
    mut consumer: AmqpConsumer,
    stop: &StopHandle,
) -> (
    mpsc::Receiver<String>,
    std::thread::JoinHandle<waybill_amqp::Result<ConsumeReport>>,
) {
    let (calls, seen) = mpsc::channel();
    let stop = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut handler = |message: &IncomingMessage| {
            let seq = message.headers["correlation-id"].clone();
            let refused = seq == "corr-1";
            let _ = calls.send(seq);
            if refused {
                Disposition::DeadLetter("refused by the handler".into())
            } else {
                Disposition::Ack
            }
        };
        consumer.run(&mut handler, &stop)
    });
    (seen, worker)
}

#[test]
fn run_survives_a_deleted_dead_letter_exchange_and_dead_letters_exactly_once() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    broker.cleanup_queue(&queue);
    let config = ConsumerConfig::new(&queue)
        .bind(&topic, "#")
        .poll_timeout(Duration::from_millis(100))
        .max_reconnect_delay(Duration::from_millis(200));
    let consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    broker.delete_exchange(&format!("{queue}.dead"));
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let batch = [stored(1, &topic, "k", "{}"), stored(2, &topic, "k", "{}")];
    assert!(publisher.publish(&batch).iter().all(Result::is_ok));

    let stop = StopHandle::new();
    let (seen, worker) = refusing_first(consumer, &stop);
    // The first dead letter fails; the message is handed back ahead of corr-2, the consumer
    // reconnects and declares the dead-letter exchange again.
    let mut calls = Vec::new();
    while calls.last().map(String::as_str) != Some("corr-2") {
        calls.push(seen.recv_timeout(PATIENCE).expect("a handler call"));
    }
    stop.stop();
    let report = worker
        .join()
        .expect("no panic")
        .expect("run went on after the failed dead letter");
    assert_eq!(calls, ["corr-1", "corr-1", "corr-2"]);
    assert_eq!((report.dead_lettered, report.acked), (1, 1), "{report:?}");
    let dead = broker.drain(&format!("{queue}.dead"), 1);
    assert_eq!(header(&dead[0], "correlation-id"), Some("corr-1".into()));
    assert_eq!(
        broker.depth(&format!("{queue}.dead")),
        0,
        "dead-lettered once"
    );
}

#[test]
fn a_message_waits_in_the_queue_while_a_foreign_dead_letter_exchange_is_missing() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    let (dlx, dlq) = (unique("dlx"), unique("dlq"));
    broker.cleanup_queue(&queue);
    // Someone else's topology: the consumer only checks it.
    broker.declare_queue(&queue, FieldTable::default());
    broker.declare_exchange(&dlx, ExchangeKind::Fanout, FieldTable::default());
    broker.declare_queue(&dlq, FieldTable::default());
    broker.bind(&dlq, &dlx, "");
    let config = ConsumerConfig::new(&queue)
        .passive(true)
        .dead_letter_exchange(&dlx)
        .poll_timeout(Duration::from_millis(100))
        .max_reconnect_delay(Duration::from_millis(200));
    let consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");
    broker.delete_exchange(&dlx);
    for seq in [1, 2] {
        let (headers, body) = Encoder::new(Binding::Amqp).encode(&stored(seq, "orders", "k", "{}"));
        let mut table = FieldTable::default();
        for (name, value) in &headers {
            table.insert(
                name.as_str().into(),
                AMQPValue::LongString(LongString::from(value.as_str())),
            );
        }
        broker.publish_raw(
            &queue,
            BasicProperties::default().with_headers(table),
            &body,
        );
    }

    let stop = StopHandle::new();
    let (seen, worker) = refusing_first(consumer, &stop);
    // Each time the dead letter fails, the message goes back ahead of corr-2.
    for _ in 0..3 {
        assert_eq!(seen.recv_timeout(PATIENCE).ok().as_deref(), Some("corr-1"));
    }
    broker.declare_exchange(&dlx, ExchangeKind::Fanout, FieldTable::default());
    broker.bind(&dlq, &dlx, "");
    let mut calls = Vec::new();
    while calls.last().map(String::as_str) != Some("corr-2") {
        calls.push(seen.recv_timeout(PATIENCE).expect("a handler call"));
    }
    stop.stop();
    let report = worker.join().expect("no panic").expect("run went on");
    assert!(
        calls[..calls.len() - 1].iter().all(|c| c == "corr-1"),
        "nothing overtook it: {calls:?}"
    );
    assert_eq!(
        (report.dead_lettered, report.acked),
        (1, 1),
        "only the stored dead letter counts: {report:?}"
    );
    let dead = broker.drain(&dlq, 1);
    assert_eq!(header(&dead[0], "correlation-id"), Some("corr-1".into()));
    assert_eq!(broker.depth(&dlq), 0, "dead-lettered exactly once");
    assert_eq!(broker.depth(&queue), 0);
}

#[test]
fn a_quorum_queue_delivery_count_counts_against_max_deliveries() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let queue = unique("q");
    broker.cleanup_queue(&queue);
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let config = ConsumerConfig::new(&queue)
        .queue_arguments(arguments)
        .retry(
            waybill_inbox_core::RetryPolicy::default()
                .max_deliveries(3)
                .backoff(Duration::ZERO, Duration::ZERO),
        );
    // Declares the queue, then lets go of it, so that the test's own client can take the
    // message first.
    drop(AmqpConsumer::connect(&broker.addr, config.clone()).expect("consumer"));
    let (headers, body) = Encoder::new(Binding::Amqp).encode(&stored(1, "orders", "k", "{}"));
    let mut table = FieldTable::default();
    for (name, value) in &headers {
        table.insert(
            name.as_str().into(),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    broker.publish_raw(
        &queue,
        BasicProperties::default().with_headers(table),
        &body,
    );
    // An earlier consumer got it and gave it back unsettled.
    broker.return_once(&queue);
    let mut consumer = AmqpConsumer::connect(&broker.addr, config).expect("consumer");

    let mut calls = 0;
    let mut handler = |_: &IncomingMessage| {
        calls += 1;
        Disposition::Retry("still failing".into())
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.dead_lettered == 1);
    assert_eq!(calls, 2, "3 deliveries allowed, 1 already made");
    let dead = broker.drain(&format!("{queue}.dead"), 1);
    let reason = header(&dead[0], DEAD_LETTER_REASON).expect("reason");
    assert!(reason.contains("failed 3 deliveries"), "{reason}");
    assert_eq!(report.retried, 1);
}
