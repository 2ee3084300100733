//! Interop with clients nobody here wrote, on the real NATS server: Python's nats-py and the
//! official `cloudevents` SDK parse what the publisher sends (the `ce-` headers percent-decoded
//! by the SDK's HTTP rules, and checked field by field), and CloudEvents that Python sends
//! (binary, structured, and a plain message with only `Nats-Msg-Id`) reach the handler through
//! the inbox exactly once per id. Needs `WAYBILL_INTEROP_PYTHON` (see `.ci/run`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::Text;
use waybill_diesel::{Inbox, InboxHandler};
use waybill_inbox_core::IncomingMessage;
use waybill_nats::{ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig};
use waybill_outbox_core::{MessageId, Publisher};
use waybill_testkit::interop;

use common::{consume_until, message, nats, unique};

const SOURCE: &str = "https://shop.example/orders%20service";

#[test]
fn the_python_sdk_parses_every_message_the_publisher_sends() {
    let Some(python) = interop::client() else {
        return;
    };
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    // A key with a space, a quote and non-ASCII and a source with a `%`: percent-encoded on
    // the wire.
    let sent: Vec<_> = (0..3)
        .map(|n| {
            let mut m = message(&topic, &format!("order \"{n}\" ü"), n);
            m.payload = format!(r#"{{"n":{n}}}"#).into_bytes();
            m
        })
        .collect();
    let mut publisher =
        NatsPublisher::connect(&nats.url, PublisherConfig::default().source(SOURCE))
            .expect("publisher");
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));

    let lines = python.run(&["read-nats", &nats.url, &stream, "3"]);
    let parsed = interop::assert_parsed(&lines, &sent, SOURCE);
    for message in &sent {
        let event = &parsed[&message.id.to_string()];
        assert_eq!(event["nats_msg_id"], message.id.to_string());
        assert_eq!(event["subject"], topic.as_str());
        assert_eq!(
            event["attributes"]["traceparent"],
            message.headers["traceparent"].as_str()
        );
    }
}

#[derive(QueryableByName)]
struct Effect {
    #[diesel(sql_type = Text)]
    message_id: String,
}

#[test]
fn python_cloudevents_are_processed_once_each_through_the_inbox() {
    let Some(python) = interop::client() else {
        return;
    };
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let path = std::env::temp_dir().join(format!("{}.db", unique("waybill_nats_interop")));
    let pool = Pool::builder()
        .max_size(4)
        .connection_customizer(Box::new(waybill_diesel::sqlite::SqliteOptions::default()))
        .build(ConnectionManager::<SqliteConnection>::new(
            path.to_string_lossy(),
        ))
        .unwrap();
    let mut conn = pool.get().unwrap();
    waybill_diesel::run_migrations(&mut conn).unwrap();
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .unwrap();

    let ids: Vec<String> = (0..4).map(|_| MessageId::new().to_string()).collect();
    let specs = [
        format!("binary:{}", ids[0]),
        format!("binary:{}", ids[1]),
        format!("structured:{}", ids[2]),
        format!("native:{}", ids[3]),
    ];
    let mut args = vec!["send-nats", nats.url.as_str(), topic.as_str()];
    args.extend(specs.iter().map(String::as_str));
    python.run(&args);

    let config = ConsumerConfig::new(&stream, unique("c")).native_metadata(true);
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();
    let mut handler = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, message: &IncomingMessage| {
            let data: serde_json::Value = message.json().expect("JSON data");
            assert_eq!(data["id"], message.id.to_string());
            diesel::sql_query("INSERT INTO effects (message_id) VALUES (?)")
                .bind::<Text, _>(message.id.to_string())
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    // Each event twice, but JetStream drops the second plain message (same Nats-Msg-Id).
    let report = consume_until(&mut consumer, &mut handler, |r| r.delivered >= 7);
    assert_eq!((report.acked, report.malformed), (7, 0), "{report:?}");

    let effects: Vec<Effect> =
        diesel::sql_query("SELECT message_id FROM effects ORDER BY message_id")
            .load(&mut conn)
            .expect("effects");
    let mut expected = ids.clone();
    expected.sort();
    let got: Vec<_> = effects.into_iter().map(|e| e.message_id).collect();
    assert_eq!(got, expected, "each id once");
    drop(conn);
    drop(pool);
    let _ = std::fs::remove_file(path);
}
