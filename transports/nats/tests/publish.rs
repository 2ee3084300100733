//! The publisher against a real NATS server with JetStream.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Instant;

use waybill_inbox_core::{Disposition, IncomingMessage};
use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig, SubjectMapping};
use waybill_outbox_core::{PublishError, Publisher};

use common::{batch, consume_until, message, nats, unique, DEADLINE};

fn publisher(url: &str) -> NatsPublisher {
    NatsPublisher::connect(url, PublisherConfig::default()).expect("publisher connects")
}

#[test]
fn batch_round_trips_every_field_in_key_order() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 7, 500);
    let mut publisher = NatsPublisher::connect(
        &nats.url,
        PublisherConfig::default()
            .subject_mapping(SubjectMapping::TopicAndKey)
            .max_in_flight(64), // several windows per batch
    )
    .unwrap();
    let outcomes = publisher.publish(&sent);
    assert_eq!(outcomes.len(), sent.len());
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(nats.count(&stream), 500);
    assert!(nats
        .messages(&stream)
        .iter()
        .all(|m| m.subject.starts_with(&format!("{topic}.order:"))));

    let mut consumer =
        NatsConsumer::connect(&nats.url, ConsumerConfig::new(&stream, unique("c"))).unwrap();
    let mut seen: Vec<IncomingMessage> = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        seen.push(m.clone());
        Disposition::Ack
    };
    let report = consume_until(&mut consumer, &mut handler, |r| r.acked >= 500);
    assert_eq!(report.delivered, 500);
    assert_eq!(report.acked, 500);

    let expected: HashMap<_, _> = sent
        .iter()
        .map(|m| (m.id, IncomingMessage::from(m)))
        .collect();
    assert_eq!(seen.len(), 500);
    for got in &seen {
        assert_eq!(Some(got), expected.get(&got.id));
    }
    let mut order: HashMap<&str, Vec<i64>> = HashMap::new();
    let seq: HashMap<_, _> = sent.iter().map(|m| (m.id, m.seq)).collect();
    for got in &seen {
        order
            .entry(got.partition_key.as_str())
            .or_default()
            .push(seq[&got.id]);
    }
    assert_eq!(order.len(), 7);
    for (key, seqs) in order {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{key}: {seqs:?}");
    }
}

#[test]
fn a_batch_of_more_keys_than_max_in_flight_waits_for_acks_instead_of_failing() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    // 400 keys, 2 messages each, at most 16 awaiting their ack: most sends wait for a free
    // slot, none may fail for want of one, and each key's second message waits for its first.
    let sent = batch(&topic, 400, 800);
    let mut publisher =
        NatsPublisher::connect(&nats.url, PublisherConfig::default().max_in_flight(16)).unwrap();
    let outcomes = publisher.publish(&sent);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(nats.count(&stream), 800);
    let stored: Vec<String> = nats
        .messages(&stream)
        .iter()
        .map(|m| {
            m.headers
                .get("ce-id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect();
    let position: HashMap<&str, usize> = stored
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    // Each key's first message is stored before its second.
    for (first, second) in sent.iter().zip(&sent[400..]) {
        let (a, b) = (first.id.to_string(), second.id.to_string());
        assert!(position[a.as_str()] < position[b.as_str()], "{a} after {b}");
    }
}

#[test]
fn publishing_a_batch_twice_stores_each_message_once() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = batch(&topic, 3, 200);
    let mut publisher = publisher(&nats.url);
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));
    let again = publisher.publish(&sent);
    assert!(again.iter().all(Result::is_ok), "{again:?}");
    assert_eq!(nats.count(&stream), 200);
}

#[test]
fn ensure_stream_creates_a_stream_once_with_the_duplicate_window() {
    let Some(mut nats) = nats() else { return };
    let name = unique("WB");
    let topic = unique("t");
    nats.forget_later(&name);
    let window = std::time::Duration::from_secs(600);
    let publisher = NatsPublisher::connect(
        &nats.url,
        PublisherConfig::default().duplicate_window(window),
    )
    .unwrap();
    publisher.ensure_stream(&name, &[&topic]).unwrap();
    publisher.ensure_stream(&name, &[&topic]).unwrap();
    let info = nats.rt.block_on(async {
        nats.js
            .get_stream(&name)
            .await
            .unwrap()
            .get_info()
            .await
            .unwrap()
    });
    assert_eq!(info.config.duplicate_window, window);
    assert_eq!(info.config.subjects, vec![topic]);
}

#[test]
fn unpublishable_messages_are_fatal_and_stop_only_their_key() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let mut too_large = message(&topic, "a", 0);
    too_large.content_type = "application/octet-stream".into();
    too_large.payload = vec![b'x'; 8 * 1024 * 1024];
    let bad_subject = message("bad topic", "b", 1);
    let batch = vec![
        too_large,
        message(&topic, "a", 2),
        bad_subject,
        message(&topic, "b", 3),
        message(&topic, "c", 4),
    ];
    let outcomes = publisher(&nats.url).publish(&batch);
    assert!(
        matches!(outcomes[0], Err(PublishError::Fatal(_))),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert!(
        matches!(outcomes[2], Err(PublishError::Fatal(_))),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[3], Err(PublishError::NotAttempted));
    assert_eq!(outcomes[4], Ok(()));
    assert_eq!(nats.count(&stream), 1);
}

#[test]
fn a_message_the_stream_refuses_is_fatal_and_holds_back_the_rest_of_its_key() {
    let Some(mut nats) = nats() else { return };
    let name = unique("WB");
    let topic = unique("t");
    nats.forget_later(&name);
    nats.rt
        .block_on(
            nats.js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![topic.clone()],
                    max_message_size: 2048,
                    ..Default::default()
                }),
        )
        .unwrap();
    let mut big = message(&topic, "a", 0);
    big.content_type = "application/octet-stream".into();
    big.payload = vec![b'x'; 4096];
    let batch = vec![big, message(&topic, "a", 1), message(&topic, "b", 2)];
    let outcomes = publisher(&nats.url).publish(&batch);
    assert!(
        matches!(outcomes[0], Err(PublishError::Fatal(_))),
        "{outcomes:?}"
    );
    // One message per key in flight: B of the same key waits for A's ack, so the refusal keeps
    // it back (the relay releases it) instead of letting it overtake A; key b goes on.
    assert_eq!(outcomes[1], Err(PublishError::NotAttempted));
    assert_eq!(outcomes[2], Ok(()));
    assert_eq!(nats.count(&name), 1);
}

#[test]
fn a_subject_without_a_stream_is_retryable() {
    let Some(nats) = nats() else { return };
    let topic = unique("nostream");
    let outcomes =
        publisher(&nats.url).publish(&[message(&topic, "a", 0), message(&topic, "a", 1)]);
    assert!(
        matches!(outcomes[0], Err(PublishError::Retryable(_))),
        "{outcomes:?}"
    );
    // Sent before the first ack failed; its own ack fails the same way.
    assert!(outcomes[1].is_err(), "{outcomes:?}");
}

#[test]
fn publishing_keeps_working_after_the_connection_is_cut() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let mut publisher = publisher(&nats.url);
    let first = batch(&topic, 4, 100);
    assert!(publisher.publish(&first).iter().all(Result::is_ok));

    publisher.force_reconnect().unwrap();
    let mut pending = batch(&topic, 4, 100);
    let deadline = Instant::now() + DEADLINE;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} messages never published",
            pending.len()
        );
        let outcomes = publisher.publish(&pending);
        for outcome in &outcomes {
            assert!(
                !matches!(outcome, Err(PublishError::Fatal(_))),
                "only retryable errors: {outcome:?}"
            );
        }
        pending = pending
            .into_iter()
            .zip(outcomes)
            .filter(|(_, outcome)| outcome.is_err())
            .map(|(m, _)| m)
            .collect();
    }
    assert!(publisher.is_connected());
    assert_eq!(nats.count(&stream), 200);
}
