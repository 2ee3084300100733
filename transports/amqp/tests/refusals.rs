//! One message the broker refuses costs only that message: driven through the real relay on a
//! SQLite outbox, the refused message is charged (retried or parked with its reason), the rest
//! of its key is released uncharged, and every other key's message goes out in the same round,
//! on a fresh channel when the refusal closed the one the batch was on. Unroutable messages are
//! retried until a queue is bound, or parked at once with `Unroutable::Park`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use waybill_amqp::{AmqpPublisher, PublisherConfig, Unroutable};
use waybill_outbox_core::{PublishError, Publisher};
use waybill_testkit::outbox::{
    capture_warnings, enqueue, message, relay_retrying_at_once, rows, sqlite, stored,
    warnings_about, PARKED, PENDING,
};

use common::unique;

/// The payload indexes of what `queue` holds, in queue order (consumed).
fn drain_indexes(broker: &common::Broker, queue: &str) -> Vec<u32> {
    let depth = broker.depth(queue) as usize;
    broker
        .drain(queue, depth)
        .iter()
        .map(|d| serde_json::from_slice(&d.data).unwrap())
        .collect()
}

#[test]
fn a_message_to_a_missing_exchange_is_charged_alone_and_its_batch_mates_go_out() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = sqlite("missing-exchange", 2);
    let topic = unique("orders");
    let queue = unique("q");
    let missing = unique("missing");
    broker.bind_queue(&queue, &topic, "#");
    broker.cleanup_exchange(&missing);
    enqueue(
        &pool,
        &[
            message(&topic, "a", 0),
            message(&topic, "a", 1),
            message(&missing, "b", 2),
            message(&topic, "b", 3),
            message(&topic, "c", 4),
            message(&topic, "a", 5),
        ],
    );
    // Exchanges managed elsewhere: publishing to one that does not exist closes the channel
    // (404 NOT_FOUND).
    let publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().declare_exchanges(None),
    )
    .expect("publisher");
    let mut relay = relay_retrying_at_once(&pool, publisher);

    let report = relay.run_once().unwrap();
    assert_eq!(
        (
            report.claimed,
            report.published,
            report.retried,
            report.released,
            report.parked,
            report.unavailable
        ),
        (6, 4, 1, 1, 0, 0),
        "{report:?}"
    );
    let rows = rows(&pool);
    assert_eq!(rows.len(), 2, "only key b is left: {rows:?}");
    let (refused, behind) = (&rows[0], &rows[1]);
    assert_eq!(
        (refused.payload.as_str(), refused.status, refused.attempts),
        ("2", PENDING, 1),
        "{rows:?}"
    );
    let reason = refused.last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("404") && reason.contains(&missing),
        "{reason}"
    );
    assert_eq!(
        (
            behind.partition_key.as_str(),
            behind.payload.as_str(),
            behind.attempts
        ),
        ("b", "3", 0),
        "the rest of the key is released uncharged: {rows:?}"
    );
    // Every other key went out once, in key order.
    assert_eq!(drain_indexes(&broker, &queue), [0, 1, 4, 5]);
    assert!(relay.publisher().is_connected());
}

#[test]
fn headers_larger_than_a_frame_are_parked_before_sending_and_the_batch_goes_out_uncharged() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = sqlite("big-headers", 2);
    let topic = unique("orders");
    let queue = unique("q");
    broker.bind_queue(&queue, &topic, "#");
    // Within the outbox's default limits (64 headers of 8 KiB), beyond one AMQP frame.
    let frame_max = broker.frame_max();
    let count = frame_max / 8000 + 2;
    assert!(
        count <= 64,
        "frame_max {frame_max} is too large for this test"
    );
    let big = (0..count).fold(message(&topic, "a", 0), |m, i| {
        m.with_header(format!("x-big-{i}"), "v".repeat(8000))
    });
    enqueue(
        &pool,
        &[
            big,
            message(&topic, "a", 1),
            message(&topic, "b", 2),
            message(&topic, "c", 3),
        ],
    );
    let publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let mut relay = relay_retrying_at_once(&pool, publisher);

    let report = relay.run_once().unwrap();
    assert_eq!(
        (
            report.claimed,
            report.published,
            report.retried,
            report.released,
            report.parked,
            report.unavailable
        ),
        (4, 2, 0, 1, 1, 0),
        "{report:?}"
    );
    let rows = rows(&pool);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].payload.as_str(), rows[0].status), ("0", PARKED));
    let reason = rows[0].last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("frame") && reason.contains(&frame_max.to_string()),
        "the reason names the size and the limit: {reason}"
    );
    assert_eq!(
        (rows[1].payload.as_str(), rows[1].status, rows[1].attempts),
        ("1", PENDING, 0),
        "{rows:?}"
    );
    assert_eq!(drain_indexes(&broker, &queue), [2, 3]);
    assert!(relay.publisher().is_connected());
}

#[test]
fn an_exchange_deleted_under_the_publisher_costs_only_its_own_message() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let doomed = unique("doomed");
    let topic = unique("orders");
    let (doomed_queue, queue) = (unique("q"), unique("q"));
    broker.bind_queue(&doomed_queue, &doomed, "#");
    broker.bind_queue(&queue, &topic, "#");
    let mut publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    // The publisher has declared both exchanges on this connection; then one goes away, so the
    // broker closes the channel over a message already sent among others.
    let warm_up = [stored(1, &doomed, "b", "{}"), stored(2, &topic, "a", "{}")];
    assert_eq!(publisher.publish(&warm_up), vec![Ok(()), Ok(())]);
    broker.drain(&queue, 1);
    broker.delete_exchange(&doomed);

    let batch = [
        stored(3, &topic, "a", "3"),
        stored(4, &doomed, "b", "4"),
        stored(5, &topic, "b", "5"),
        stored(6, &topic, "c", "6"),
        stored(7, &topic, "a", "7"),
    ];
    let outcomes = publisher.publish(&batch);
    assert!(
        matches!(&outcomes[1], Err(PublishError::Retryable(reason)) if reason.contains("404")),
        "{outcomes:?}"
    );
    assert_eq!(
        [&outcomes[0], &outcomes[2], &outcomes[3], &outcomes[4]],
        [&Ok(()), &Err(PublishError::NotAttempted), &Ok(()), &Ok(())]
    );
    // A message sent before the refusal whose confirm the closing channel lost is sent again:
    // at least once, never lost.
    let mut got = drain_indexes(&broker, &queue);
    got.dedup();
    assert_eq!(got, [3, 6, 7]);
    assert!(publisher.is_connected());
}

#[test]
fn an_unroutable_message_is_retried_with_backoff_and_delivered_once_a_queue_is_bound() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = sqlite("unroutable", 2);
    let topic = unique("orders");
    let queue = unique("q");
    broker.cleanup_exchange(&topic);
    enqueue(
        &pool,
        &[
            message(&topic, "a", 0),
            message(&topic, "a", 1),
            message(&topic, "b", 2),
        ],
    );
    let publisher =
        AmqpPublisher::connect(&broker.addr, PublisherConfig::default()).expect("publisher");
    let mut relay = relay_retrying_at_once(&pool, publisher);
    capture_warnings();

    // No queue is bound yet (the consumer has not started): retried, charged, never parked.
    for round in 1..=2 {
        let report = relay.run_once().unwrap();
        assert_eq!(
            (
                report.claimed,
                report.retried,
                report.parked,
                report.published
            ),
            (3, 3, 0, 0),
            "round {round}: {report:?}"
        );
        for row in rows(&pool) {
            assert_eq!((row.status, row.attempts), (PENDING, round), "{row:?}");
            let reason = row.last_error.unwrap_or_default();
            assert!(
                reason.contains("NO_ROUTE") && reason.contains(&topic),
                "{reason}"
            );
        }
    }

    // One warning per round saying so, however many messages and routing keys.
    let said: Vec<_> = warnings_about(&topic)
        .into_iter()
        .filter(|w| w.contains("message(s) unroutable"))
        .collect();
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(
        said[0].contains("has no queue bound") && said[0].contains("1 other routing keys"),
        "{said:?}"
    );

    broker.bind_queue(&queue, &topic, "#");
    let report = relay.run_once().unwrap();
    assert_eq!(
        (report.claimed, report.published, report.parked),
        (3, 3, 0),
        "{report:?}"
    );
    assert!(rows(&pool).is_empty());
    assert_eq!(relay.totals().parked, 0);
    assert_eq!(drain_indexes(&broker, &queue), [0, 1, 2]);
}

#[test]
fn with_the_park_option_an_unroutable_message_is_parked_with_its_reason() {
    let Some(mut broker) = common::broker() else {
        return;
    };
    let (pool, _database) = sqlite("unroutable-park", 2);
    let topic = unique("orders");
    let missing = unique("missing");
    broker.cleanup_exchange(&topic);
    broker.cleanup_exchange(&missing);
    enqueue(&pool, &[message(&topic, "a", 0), message(&topic, "a", 1)]);
    let publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default().unroutable(Unroutable::Park),
    )
    .expect("publisher");
    let mut relay = relay_retrying_at_once(&pool, publisher);

    let report = relay.run_once().unwrap();
    // Both were sent pipelined and both came back.
    assert_eq!((report.claimed, report.parked), (2, 2), "{report:?}");
    for row in rows(&pool) {
        assert_eq!(row.status, PARKED, "{row:?}");
        let reason = row.last_error.unwrap_or_default();
        assert!(
            reason.contains("NO_ROUTE") && reason.contains(&topic),
            "{reason}"
        );
    }

    // A missing exchange is unroutable too.
    let (pool, _database) = sqlite("missing-exchange-park", 2);
    enqueue(&pool, &[message(&missing, "a", 0)]);
    let publisher = AmqpPublisher::connect(
        &broker.addr,
        PublisherConfig::default()
            .declare_exchanges(None)
            .unroutable(Unroutable::Park),
    )
    .expect("publisher");
    let report = relay_retrying_at_once(&pool, publisher).run_once().unwrap();
    assert_eq!(report.parked, 1, "{report:?}");
    let reason = rows(&pool)[0].last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("404") && reason.contains(&missing),
        "{reason}"
    );
}
