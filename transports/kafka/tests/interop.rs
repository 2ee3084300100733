//! Interop with clients nobody here wrote, on the Kafka-protocol broker: Python's
//! confluent-kafka and the official `cloudevents` SDK (its `kafka` binding) parse what the
//! publisher sends, and CloudEvents that Python sends (binary and structured) reach the handler
//! through the inbox exactly once per id. Needs `WAYBILL_INTEROP_PYTHON` (see `.ci/run`). Also:
//! a record whose `ce_id` is bytes is dead-lettered with a reason that says so.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use waybill_diesel::{Inbox, InboxHandler};
use waybill_inbox_core::{ConsumeReport, IncomingMessage};
use waybill_kafka::{ConsumerConfig, KafkaConsumer, KafkaPublisher, PublisherConfig};
use waybill_outbox_core::{MessageId, Publisher};
use waybill_testkit::kafka::{brokers, create_topic};
use waybill_testkit::{interop, unique, PATIENCE};

use waybill_testkit::outbox::{sqlite, stored};

const SOURCE: &str = "urn:example:orders-service";

#[test]
fn the_python_sdk_parses_every_record_the_publisher_sends() {
    let Some(python) = interop::client() else {
        return;
    };
    let Some(brokers) = brokers() else { return };
    let topic = unique("orders");
    create_topic(&brokers, &topic, 2);
    let sent: Vec<_> = (1..=4)
        .map(|seq| {
            stored(
                seq,
                &topic,
                &format!("order:{}", seq % 2),
                &format!(r#"{{"n":{seq}}}"#),
            )
        })
        .collect();
    let mut publisher =
        KafkaPublisher::connect(&brokers, PublisherConfig::default().source(SOURCE))
            .expect("publisher");
    assert!(publisher.publish(&sent).iter().all(Result::is_ok));

    let lines = python.run(&["read-kafka", &brokers, &topic, "4"]);
    let parsed = interop::assert_parsed(&lines, &sent, SOURCE);
    for message in &sent {
        assert_eq!(
            parsed[&message.id.to_string()]["key"],
            message.partition_key.as_str()
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
    let Some(brokers) = brokers() else { return };
    let (pool, _database) = sqlite("interop", 4);
    let mut conn = pool.get().expect("conn");
    conn.batch_execute("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .expect("effects table");
    let topic = unique("from-python");
    create_topic(&brokers, &topic, 1);

    let ids: Vec<String> = (0..3).map(|_| MessageId::new().to_string()).collect();
    let specs = [
        format!("binary:{}", ids[0]),
        format!("binary:{}", ids[1]),
        format!("structured:{}", ids[2]),
    ];
    let mut args = vec!["send-kafka", brokers.as_str(), topic.as_str()];
    args.extend(specs.iter().map(String::as_str));
    python.run(&args);

    let mut consumer =
        KafkaConsumer::connect(&brokers, ConsumerConfig::new(&topic, unique("billing")))
            .expect("consumer");
    let mut handler = InboxHandler::new(
        pool.clone(),
        Inbox::new("billing"),
        |conn: &mut _, message: &IncomingMessage| {
            let data: serde_json::Value = message.json().expect("JSON data");
            assert_eq!(data["id"], message.id.to_string());
            assert_eq!(message.partition_key, "python-key");
            diesel::sql_query("INSERT INTO effects (message_id) VALUES (?)")
                .bind::<Text, _>(message.id.to_string())
                .execute(conn)?;
            Ok::<_, waybill_diesel::Error>(())
        },
    );
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while total.delivered < 6 {
        assert!(Instant::now() < deadline, "consumed only {total:?}");
        let report = consumer
            .run_once(&mut handler, 100, Duration::from_secs(1))
            .expect("consume");
        total.delivered += report.delivered;
        total.acked += report.acked;
        total.malformed += report.malformed;
    }
    assert_eq!((total.acked, total.malformed), (6, 0), "{total:?}");

    let effects: Vec<Effect> =
        diesel::sql_query("SELECT message_id FROM effects ORDER BY message_id")
            .load(&mut conn)
            .expect("effects");
    let mut expected = ids.clone();
    expected.sort();
    let got: Vec<_> = effects.into_iter().map(|e| e.message_id).collect();
    assert_eq!(got, expected, "each id once");
}

#[test]
fn a_record_whose_id_is_not_utf8_is_dead_lettered_as_bytes() {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use waybill_inbox_core::Disposition;
    use waybill_kafka::DEAD_LETTER_REASON;
    use waybill_testkit::kafka::{header, read_all};

    let Some(brokers) = brokers() else { return };
    let topic = unique("bytes-id");
    create_topic(&brokers, &topic, 1);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    let headers = [
        ("ce_specversion", &b"1.0"[..]),
        ("ce_id", &[0xff, 0xfe][..]),
        ("ce_source", b"/bytes"),
        ("ce_type", b"t"),
    ]
    .into_iter()
    .fold(OwnedHeaders::new(), |h, (key, value)| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    });
    producer
        .send(
            BaseRecord::<(), [u8]>::to(&topic)
                .payload(&b"{}"[..])
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .expect("send");
    producer.flush(PATIENCE).expect("flushed");

    let config = ConsumerConfig::new(&topic, unique("billing"));
    let dead_topic = config.dead_letter_topic_name();
    let mut consumer = KafkaConsumer::connect(&brokers, config).expect("consumer");
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while total.dead_lettered < 1 {
        assert!(Instant::now() < deadline, "consumed only {total:?}");
        let report = consumer
            .run_once(
                &mut |_: &IncomingMessage| Disposition::Ack,
                10,
                Duration::from_secs(1),
            )
            .expect("consume");
        total.dead_lettered += report.dead_lettered;
        total.malformed += report.malformed;
    }
    assert_eq!(total.malformed, 1);
    let dead = read_all(&brokers, &dead_topic);
    assert_eq!(
        header(&dead[0], DEAD_LETTER_REASON).as_deref(),
        Some("malformed: ce_id is bytes, expected a string")
    );
}
