//! The consumer loop against a real NATS server with JetStream: redelivery, dead letters,
//! malformed data and stopping.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use waybill_inbox_core::{wire, Disposition, IncomingMessage};
use waybill_nats::{
    ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig, StopHandle,
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON,
};
use waybill_outbox_core::{MessageId, Publisher};

use common::{batch, consume_until, message, nats, unique};

fn header(message: &async_nats::jetstream::message::StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

#[test]
fn a_message_that_always_fails_is_delivered_max_deliver_times_then_dead_lettered() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 3, 12);
    let poison = sent[5].id;
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));

    let config = ConsumerConfig::new(&stream, unique("c")).max_deliveries(3);
    let dead_stream = config.dead_letter_stream_name().unwrap();
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();
    let mut deliveries: HashMap<MessageId, u32> = HashMap::new();
    let mut handler = |m: &IncomingMessage| {
        *deliveries.entry(m.id).or_default() += 1;
        if m.id == poison {
            Disposition::Retry("payment service says no".into())
        } else {
            Disposition::Ack
        }
    };
    let report = consume_until(&mut consumer, &mut handler, |r| {
        r.dead_lettered >= 1 && r.acked >= 11
    });
    assert_eq!(report.acked, 11);
    assert_eq!(report.retried, 2, "retried in place");
    assert_eq!(report.dead_lettered, 1);
    assert_eq!(report.delivered, 12);
    assert_eq!(deliveries[&poison], 3);
    assert!(deliveries.iter().all(|(id, n)| *id == poison || *n == 1));

    let dead = nats.messages(&dead_stream);
    assert_eq!(dead.len(), 1);
    assert!(header(&dead[0], DEAD_LETTER_REASON).contains("payment service says no"));
    assert_eq!(header(&dead[0], DEAD_LETTER_DELIVERIES), "3");
    assert_eq!(header(&dead[0], "ce-id"), poison.to_string());
    assert_eq!(dead[0].payload.as_ref(), sent[5].payload.as_slice());

    // Nothing comes back: the poison message was termed, the rest acked.
    let after = consumer
        .run_once(
            &mut |_: &IncomingMessage| Disposition::Ack,
            100,
            Duration::from_millis(300),
        )
        .unwrap();
    assert_eq!(after.delivered, 0);
}

#[test]
fn a_handler_dead_letter_is_published_at_once_with_its_reason() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 2, 4);
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));
    let config = ConsumerConfig::new(&stream, unique("c"));
    let dead_stream = config.dead_letter_stream_name().unwrap();
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();
    let refused = sent[1].id;
    let mut handler = |m: &IncomingMessage| {
        if m.id == refused {
            Disposition::DeadLetter("order was cancelled".into())
        } else {
            Disposition::Ack
        }
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.delivered >= 4);
    assert_eq!(
        (report.acked, report.dead_lettered, report.retried),
        (3, 1, 0)
    );
    let dead = nats.messages(&dead_stream);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], DEAD_LETTER_REASON), "order was cancelled");
    assert_eq!(header(&dead[0], DEAD_LETTER_DELIVERIES), "1");
}

#[test]
fn malformed_messages_are_dead_lettered_and_the_good_ones_around_them_handled() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let good = [message(&topic, "k", 0), message(&topic, "k", 1)];
    let (good_headers, good_body) = wire::encode(&good[0]);
    let headers: Vec<(&str, &str)> = good_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let without_id: Vec<_> = headers
        .iter()
        .copied()
        .filter(|(k, _)| *k != "ce-id")
        .collect();
    let bad_id: Vec<_> = headers
        .iter()
        .map(|&(k, v)| {
            if k == "ce-id" {
                (k, "not-a-uuid")
            } else {
                (k, v)
            }
        })
        .collect();
    let other_id = MessageId::new().to_string();
    let bad_json: Vec<_> = headers
        .iter()
        .map(|&(k, v)| {
            if k == "ce-id" {
                (k, other_id.as_str())
            } else {
                (k, v)
            }
        })
        .collect();

    nats.publish_raw(&topic, &headers, &good_body);
    nats.publish_raw(&topic, &without_id, &good_body);
    nats.publish_raw(&topic, &bad_id, &good_body);
    nats.publish_raw(&topic, &bad_json, b"{\"n\":");
    nats.publish_raw(&topic, &[], b"no headers at all");
    let (headers2, body2) = wire::encode(&good[1]);
    let headers2: Vec<(&str, &str)> = headers2
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    nats.publish_raw(&topic, &headers2, &body2);

    let config = ConsumerConfig::new(&stream, unique("c"));
    let dead_stream = config.dead_letter_stream_name().unwrap();
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();
    let mut handled = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        handled.push(m.clone());
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.delivered >= 6);
    assert_eq!(
        (report.acked, report.malformed, report.dead_lettered),
        (2, 4, 4)
    );
    assert_eq!(
        handled,
        vec![
            IncomingMessage::from(&good[0]),
            IncomingMessage::from(&good[1])
        ]
    );
    let reasons: Vec<String> = nats
        .messages(&dead_stream)
        .iter()
        .map(|m| header(m, DEAD_LETTER_REASON))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.starts_with("malformed: ")),
        "{reasons:?}"
    );
    assert_eq!(reasons[0], "malformed: ce-id is missing");
    assert!(
        reasons[1].starts_with("malformed: ce-id is not a UUID: \"not-a-uuid\""),
        "{reasons:?}"
    );
}

#[test]
fn run_loops_until_the_stop_handle_is_stopped() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 2, 30);
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));
    let mut consumer = NatsConsumer::connect(
        &nats.url,
        ConsumerConfig::new(&stream, unique("c"))
            .batch_size(7)
            .poll_wait(Duration::from_millis(200)),
    )
    .unwrap();
    let stop = StopHandle::new();
    let mut seen = 0;
    let mut handler = |_: &IncomingMessage| {
        seen += 1;
        if seen == sent.len() {
            stop.stop();
        }
        Disposition::Ack
    };
    let report = consumer.run(&mut handler, &stop).unwrap();
    assert_eq!(report.acked, 30);
    assert_eq!(report.delivered, 30);
}

#[test]
fn consuming_resumes_after_the_connection_is_cut() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 2, 40);
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent[..20]).iter().all(Result::is_ok));
    let mut consumer =
        NatsConsumer::connect(&nats.url, ConsumerConfig::new(&stream, unique("c"))).unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut handler = |m: &IncomingMessage| {
        seen.insert(m.id);
        Disposition::Ack
    };
    consume_until(&mut consumer, &mut handler, |r| r.acked >= 20);

    consumer.force_reconnect().unwrap();
    publisher.force_reconnect().unwrap();
    let mut pending = sent[20..].to_vec();
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while !pending.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "publishing never resumed"
        );
        let outcomes = publisher.publish(&pending);
        pending = pending
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| outcome.is_err())
            .map(|(m, _)| m)
            .collect();
    }
    let mut acked = 20;
    while acked < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "consuming never resumed"
        );
        // A pull may fail while the client reconnects; `run` backs off and goes on the same way.
        if let Ok(report) = consumer.run_once(&mut handler, 50, Duration::from_millis(300)) {
            acked += report.acked;
        }
    }
    assert_eq!(seen.len(), 40);
}

#[test]
fn a_retried_message_takes_effect_before_the_next_message_of_its_key() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = [message(&topic, "k", 1), message(&topic, "k", 2)];
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));
    let config = ConsumerConfig::new(&stream, unique("c"));
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();

    let mut failures = 0;
    let mut effects = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        let seq = m.headers["correlation-id"].clone();
        if seq == "c-1" && failures < 2 {
            failures += 1;
            return Disposition::Retry("deadlock detected".into());
        }
        effects.push(seq);
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.acked >= 2);
    assert_eq!(effects, ["c-1", "c-2"]);
    assert_eq!((report.retried, report.dead_lettered), (2, 0));
}

#[test]
fn a_panicking_handler_is_dead_lettered_after_max_deliveries_and_the_consumer_goes_on() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = [
        message(&topic, "a", 1),
        message(&topic, "b", 2),
        message(&topic, "a", 3),
    ];
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));
    let config = ConsumerConfig::new(&stream, unique("c")).max_deliveries(3);
    let dead_stream = config.dead_letter_stream_name().unwrap();
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();

    let mut calls = 0;
    let mut handled = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        let seq = m.headers["correlation-id"].clone();
        if seq == "c-1" {
            calls += 1;
            panic!("the handler has a bug");
        }
        handled.push(seq);
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| {
        r.acked >= 2 && r.dead_lettered >= 1
    });
    assert_eq!(calls, 3, "one call per allowed delivery");
    assert_eq!(handled, ["c-2", "c-3"]);
    assert_eq!((report.acked, report.dead_lettered), (2, 1));
    let dead = nats.messages(&dead_stream);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], "ce-id"), sent[0].id.to_string());
    assert!(
        header(&dead[0], DEAD_LETTER_REASON).contains("handler panicked: the handler has a bug"),
        "{}",
        header(&dead[0], DEAD_LETTER_REASON)
    );
    assert_eq!(header(&dead[0], DEAD_LETTER_DELIVERIES), "3");
}
