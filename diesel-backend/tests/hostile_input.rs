//! Hostile data on every backend: SQL metacharacters in every string field round-trip exactly
//! (everything goes through bound parameters), header injection is refused before the database,
//! and a processed message id that comes back with another payload is refused and
//! dead-lettered, not silently skipped.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Backend, TestDb};
use diesel::r2d2::{ConnectionManager, PooledConnection};
use waybill_diesel::{
    enqueue, find_message, DedupKey, Error, Inbox, InboxHandler, IncomingMessage, Processed,
};
use waybill_inbox_core::{DeliveryHandler, Disposition};
use waybill_outbox_core::{MessageId, NewOutboxMessage};

/// Quotes, comment markers, placeholders, escapes, wildcards and non-ASCII: each would break a
/// string-built statement.
const NASTY: &str = "o'brien\"; DROP TABLE outbox_messages; -- /* $1 ? %s %_ \\' `x` \u{1F980} é";

fn sql_metacharacters_in_every_string_field_round_trip_exactly<C: Backend>(db: TestDb<C>) {
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let message = NewOutboxMessage::bytes(NASTY, NASTY, NASTY, NASTY, NASTY.as_bytes().to_vec())
        .with_header("x-'%_$", NASTY);
    enqueue(conn, &message).unwrap();
    let stored = find_message(conn, message.id()).unwrap().expect("stored");
    assert_eq!(stored.topic, NASTY);
    assert_eq!(stored.partition_key, NASTY);
    assert_eq!(stored.message_type, NASTY);
    assert_eq!(stored.content_type, NASTY);
    assert_eq!(stored.payload, NASTY.as_bytes());
    assert_eq!(stored.headers["x-'%_$"], NASTY);

    let inbox = Inbox::new(NASTY);
    let delivery = IncomingMessage::new(message.id(), NASTY, NASTY, NASTY);
    for expected in [Processed::Handled(()), Processed::Duplicate] {
        let outcome = inbox
            .process_once_by(conn, DedupKey::business(NASTY), &delivery, |_| {
                Ok::<_, Error>(())
            })
            .unwrap();
        assert_eq!(outcome, expected);
    }
    assert!(inbox
        .is_processed(conn, &DedupKey::business(NASTY))
        .unwrap());
    assert_eq!(inbox.processed_count(conn).unwrap(), 1);
}

fn header_injection_is_refused_before_the_database<C: Backend>(db: TestDb<C>) {
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    for (name, value) in [
        ("x-trace", "a\r\nwaybill-topic: spoofed"),
        ("x-trace\r\nwaybill-topic", "spoofed"),
        ("bad name", "v"),
    ] {
        let message = NewOutboxMessage::bytes("orders", "k", "T", "text/plain", b"x".to_vec())
            .with_header(name, value);
        let refused = enqueue(conn, &message);
        assert!(
            matches!(refused, Err(Error::Invalid { .. })),
            "{name:?}: {refused:?}"
        );
        assert!(find_message(conn, message.id()).unwrap().is_none());
    }
}

fn oversized_payloads_are_refused_with_a_typed_error<C: Backend>(db: TestDb<C>) {
    let mut pooled = db.conn();
    let conn: &mut C = &mut pooled;
    let limit = waybill_outbox_core::Limits::default().payload_limit();
    let message = NewOutboxMessage::bytes(
        "orders",
        "k",
        "T",
        "application/octet-stream",
        vec![0; limit + 1],
    );
    let refused = enqueue(conn, &message);
    assert!(
        matches!(
            &refused,
            Err(Error::Invalid {
                source: waybill_outbox_core::ValidationError::PayloadTooLarge { .. },
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(find_message(conn, message.id()).unwrap().is_none());
}

fn messages_of_topics_not_subscribed_to_are_dead_lettered<C: Backend + Send>(db: TestDb<C>) {
    let inbox = Inbox::new("billing");
    let mut handled = Vec::new();
    let mut handler = InboxHandler::new(
        db.pool.clone(),
        inbox.clone(),
        |_: &mut Pooled<C>, msg: &IncomingMessage| {
            handled.push(msg.topic.clone());
            Ok::<_, Error>(())
        },
    )
    .only_topics(["orders"]);
    let foreign = IncomingMessage::new(MessageId::new(), "payments", "PaymentCaptured", "{}");
    let disposition = handler.handle(&foreign);
    assert!(
        matches!(&disposition, Disposition::DeadLetter(reason) if reason.contains("\"payments\"")),
        "{disposition:?}"
    );
    let own = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", "{}");
    assert_eq!(handler.handle(&own), Disposition::Ack);
    drop(handler);
    assert_eq!(handled, ["orders"]);
    assert!(!inbox
        .is_processed(&mut *db.conn(), &DedupKey::from(foreign.id))
        .unwrap());
}

type Pooled<C> = PooledConnection<ConnectionManager<C>>;

fn a_processed_id_with_another_payload_is_refused_and_dead_lettered<C: Backend + Send>(
    db: TestDb<C>,
) {
    let inbox = Inbox::new("billing");
    let first = IncomingMessage::new(MessageId::new(), "orders", "OrderPlaced", r#"{"total":1}"#);
    let forged = IncomingMessage::new(first.id, "orders", "OrderPlaced", r#"{"total":999}"#);
    {
        let mut pooled = db.conn();
        let conn: &mut C = &mut pooled;
        let handled = inbox.process_once(conn, &first, |_| Ok::<_, Error>(()));
        assert_eq!(handled.unwrap(), Processed::Handled(()));
        let refused = inbox.process_once(conn, &forged, |_| -> Result<(), Error> {
            panic!("the handler must not run for a conflicting duplicate")
        });
        assert!(
            matches!(&refused, Err(Error::ConflictingDuplicate { consumer, message_id })
                if consumer == "billing" && *message_id == first.id),
            "{refused:?}"
        );
        assert!(inbox.is_conflicting_duplicate(conn, &forged).unwrap());
        assert!(!inbox.is_conflicting_duplicate(conn, &first).unwrap());
        let again = inbox.process_once(conn, &first, |_| Ok::<_, Error>(()));
        assert_eq!(again.unwrap(), Processed::Duplicate, "the true redelivery");
        // A business key may be shared by messages that differ: no digest check there.
        let key = DedupKey::business("order:1");
        for (msg, expected) in [
            (&first, Processed::Handled(())),
            (&forged, Processed::Duplicate),
        ] {
            let outcome = inbox.process_once_by(conn, key.clone(), msg, |_| Ok::<_, Error>(()));
            assert_eq!(outcome.unwrap(), expected);
        }
    }
    let mut handler = InboxHandler::new(
        db.pool.clone(),
        inbox.clone(),
        |_: &mut Pooled<C>, _: &IncomingMessage| Ok::<_, Error>(()),
    );
    let disposition = handler.handle(&forged);
    assert!(
        matches!(&disposition, Disposition::DeadLetter(reason) if reason.contains("different payload")),
        "{disposition:?}"
    );
    assert_eq!(handler.handle(&first), Disposition::Ack);
    assert_eq!(inbox.processed_count(&mut *db.conn()).unwrap(), 2);
}

backend_tests!(
    sql_metacharacters_in_every_string_field_round_trip_exactly,
    header_injection_is_refused_before_the_database,
    a_processed_id_with_another_payload_is_refused_and_dead_lettered,
    oversized_payloads_are_refused_with_a_typed_error,
    messages_of_topics_not_subscribed_to_are_dead_lettered,
);
