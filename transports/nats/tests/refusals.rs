//! What the server refuses costs only the message at fault, driven through the real relay on a
//! SQLite outbox: a subject no stream captures is retried until a stream appears (or parked with
//! `Unroutable::Park`), and a message above the server's `max_payload` is parked before it is
//! sent while the rest of the batch goes out.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use async_nats::jetstream::stream;
use waybill_nats::{NatsPublisher, PublisherConfig, Unroutable};
use waybill_outbox_core::{Limits, NewOutboxMessage, Publisher, ValidationError};
use waybill_testkit::outbox::{
    capture_warnings, enqueue, message, relay_retrying_at_once, rows, sqlite, warnings_about,
    PARKED, PENDING,
};

use common::{nats, unique};

#[test]
fn a_subject_without_a_stream_is_retried_with_backoff_and_delivered_once_a_stream_captures_it() {
    let Some(mut nats) = nats() else { return };
    let (pool, _database) = sqlite("nostream", 2);
    let topic = unique("t");
    enqueue(
        &pool,
        &[
            message(&topic, "a", 0),
            message(&topic, "a", 1),
            message(&topic, "b", 2),
        ],
    );
    let publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    let mut relay = relay_retrying_at_once(&pool, publisher);
    capture_warnings();

    // No stream yet (its operator or consumer has not created it): each key's head is retried
    // and charged, the rest of the key waits uncharged, nothing is parked.
    for round in 1..=2 {
        let report = relay.run_once().unwrap();
        assert_eq!(
            (
                report.claimed,
                report.retried,
                report.released,
                report.parked,
                report.published
            ),
            (3, 2, 1, 0, 0),
            "round {round}: {report:?}"
        );
        let rows = rows(&pool);
        assert_eq!(
            rows.iter()
                .map(|r| (r.partition_key.as_str(), r.status, r.attempts))
                .collect::<Vec<_>>(),
            [
                ("a", PENDING, round),
                ("a", PENDING, 0),
                ("b", PENDING, round)
            ],
            "round {round}"
        );
        let reason = rows[0].last_error.clone().unwrap_or_default();
        assert!(
            reason.contains("no stream") && reason.contains(&topic),
            "the reason names the subject: {reason}"
        );
    }

    // One warning per round saying so.
    let said: Vec<_> = warnings_about(&topic)
        .into_iter()
        .filter(|w| w.contains("message(s) unroutable"))
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[0].contains("no stream captures subject"), "{said:?}");

    let name = unique("WB");
    nats.forget_later(&name);
    nats.rt
        .block_on(nats.js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![topic.clone()],
            ..Default::default()
        }))
        .unwrap();
    // One message per key in flight: the second of key a goes in the next round.
    let mut published = 0;
    while published < 3 {
        let report = relay.run_once().unwrap();
        assert!(report.published > 0, "{report:?}");
        assert_eq!(report.parked, 0, "{report:?}");
        published += report.published;
    }
    assert!(rows(&pool).is_empty());
    assert_eq!(nats.count(&name), 3);
}

#[test]
fn with_the_park_option_a_subject_without_a_stream_is_parked_with_its_reason() {
    let Some(nats) = nats() else { return };
    let (pool, _database) = sqlite("nostream-park", 2);
    let topic = unique("t");
    enqueue(&pool, &[message(&topic, "a", 0), message(&topic, "b", 1)]);
    let publisher = NatsPublisher::connect(
        &nats.url,
        PublisherConfig::default().unroutable(Unroutable::Park),
    )
    .unwrap();
    let report = relay_retrying_at_once(&pool, publisher).run_once().unwrap();
    assert_eq!((report.claimed, report.parked), (2, 2), "{report:?}");
    for row in rows(&pool) {
        assert_eq!(row.status, PARKED, "{row:?}");
        let reason = row.last_error.unwrap_or_default();
        assert!(
            reason.contains("no stream") && reason.contains(&topic),
            "{reason}"
        );
    }
}

#[test]
fn a_message_above_the_servers_max_payload_is_parked_before_sending_and_its_batch_mates_go_out() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let (pool, _database) = sqlite("max-payload", 2);
    let publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();

    // The publisher reports the server's limit, less what the transport adds to a message.
    let max_payload = nats.client.server_info().max_payload;
    assert_eq!(publisher.max_payload(), max_payload);
    let limit = publisher.limits().message_limit().expect("a message limit");
    assert!(limit < max_payload && limit + 1024 > max_payload, "{limit}");

    // Twice the server's limit, within the outbox's default limits.
    let big = NewOutboxMessage::bytes(
        &topic,
        "a",
        "Blob",
        "application/octet-stream",
        vec![b'x'; 2 * max_payload],
    );
    assert_eq!(Limits::default().check(&big), Ok(()));
    // What the publisher reports refuses it at enqueue time instead.
    assert!(matches!(
        Limits::default().capped_by(publisher.limits()).check(&big),
        Err(ValidationError::MessageTooLarge { .. })
    ));

    enqueue(
        &pool,
        &[
            big,
            message(&topic, "a", 1),
            message(&topic, "b", 2),
            message(&topic, "c", 3),
        ],
    );
    let report = relay_retrying_at_once(&pool, publisher).run_once().unwrap();
    assert_eq!(
        (
            report.claimed,
            report.published,
            report.parked,
            report.released,
            report.retried
        ),
        (4, 2, 1, 1, 0),
        "{report:?}"
    );
    let rows = rows(&pool);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].status, PARKED);
    let reason = rows[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains(&max_payload.to_string())
            && reason.contains(&(2 * max_payload).to_string()),
        "the reason names both sizes: {reason}"
    );
    assert_eq!((rows[1].status, rows[1].attempts), (PENDING, 0), "{rows:?}");
    assert_eq!(nats.count(&stream), 2);
}
