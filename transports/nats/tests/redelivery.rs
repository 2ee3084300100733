//! What the shared consumer loop promises, held against JetStream's own redelivery: pulls that
//! hand out and charge only what a handler sees, nothing lost while the dead-letter stream is
//! missing, no redelivery into a pull or to a competing consumer while a message waits, panics
//! survived, and dead-letter counts that match the stream.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use waybill_inbox_core::metrics::{CONSUMER_DEAD_LETTERED, CONSUMER_LABEL};
use waybill_inbox_core::{ConsumeReport, Disposition, IncomingMessage};
use waybill_nats::{
    ConsumerConfig, NatsConsumer, NatsPublisher, PublisherConfig, StopHandle,
    DEAD_LETTER_DELIVERIES, DEAD_LETTER_REASON,
};
use waybill_outbox_core::{MessageId, OutboxMessage, Publisher};

use common::{consume_until, message, nats, unique, Nats, DEADLINE};

fn publish(nats: &Nats, messages: &[OutboxMessage]) {
    let mut publisher = NatsPublisher::connect(&nats.url, PublisherConfig::default()).unwrap();
    let outcomes = publisher.publish(messages);
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
}

fn header(message: &async_nats::jetstream::message::StreamMessage, name: &str) -> String {
    message
        .headers
        .get(name)
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

/// Deletes the consumer's dead-letter stream, so that dead letters find no responder.
fn break_dead_letters(nats: &Nats, config: &ConsumerConfig) {
    let name = config.dead_letter_stream_name().unwrap();
    nats.rt.block_on(nats.js.delete_stream(&name)).unwrap();
}

/// Creates the dead-letter stream again.
fn mend_dead_letters(nats: &Nats, config: &ConsumerConfig) {
    nats.rt
        .block_on(nats.js.create_stream(stream::Config {
            name: config.dead_letter_stream_name().unwrap(),
            subjects: vec![config.dead_letter_subject_name()],
            ..Default::default()
        }))
        .unwrap();
}

/// The ids of the messages the dead-letter stream holds.
fn dead_letter_ids(nats: &Nats, config: &ConsumerConfig) -> Vec<String> {
    nats.messages(&config.dead_letter_stream_name().unwrap())
        .iter()
        .map(|m| header(m, "ce-id"))
        .collect()
}

/// Steps `consumer` until `handler` refused `refusals` deliveries; every step fails because no
/// dead letter can be stored. Returns the summed reports of the steps that did not fail.
fn fail_until(
    consumer: &mut NatsConsumer,
    handler: &mut impl FnMut(&IncomingMessage) -> Disposition,
    refusals: &RefCell<u32>,
    wanted: u32,
) -> ConsumeReport {
    let deadline = Instant::now() + DEADLINE;
    let mut total = ConsumeReport::default();
    while *refusals.borrow() < wanted {
        assert!(
            Instant::now() < deadline,
            "the refused message came back only {} times",
            refusals.borrow()
        );
        match consumer.run_once(handler, 10, Duration::from_millis(200)) {
            Ok(report) => total.add(&report),
            Err(error) => assert!(error.is_retryable(), "{error}"),
        }
    }
    total
}

/// Issue 19, defect 2: the server's `max_deliver` used to drop a message whose dead letter
/// could not be published (nak'ed until max_deliver + 3), and the message behind it of the
/// same key went on meanwhile.
#[test]
fn while_the_dead_letter_stream_is_missing_nothing_is_lost_and_the_key_waits() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = [message(&topic, "k", 1), message(&topic, "k", 2)];
    publish(&nats, &sent);
    let config = ConsumerConfig::new(&stream, unique("c")).max_deliveries(2);
    let mut consumer = NatsConsumer::connect(&nats.url, config.clone()).unwrap();
    break_dead_letters(&nats, &config);

    let refusals = RefCell::new(0);
    let effects = RefCell::new(Vec::new());
    let mut handler = |m: &IncomingMessage| {
        if m.id == sent[0].id {
            *refusals.borrow_mut() += 1;
            return Disposition::DeadLetter("order was cancelled".into());
        }
        effects.borrow_mut().push(m.id);
        Disposition::Ack
    };
    // Well past the old server limit (2 + 3 deliveries).
    let failing = fail_until(&mut consumer, &mut handler, &refusals, 8);
    assert_eq!(
        failing.dead_lettered, 0,
        "counted a dead letter nobody stored"
    );
    assert!(
        effects.borrow().is_empty(),
        "the key's next message overtook it"
    );

    mend_dead_letters(&nats, &config);
    let report = consume_until(&mut consumer, &mut handler, |r| {
        r.dead_lettered >= 1 && r.acked >= 1
    });
    assert_eq!((report.dead_lettered, report.acked), (1, 1));
    assert_eq!(*effects.borrow(), [sent[1].id]);
    assert_eq!(dead_letter_ids(&nats, &config), [sent[0].id.to_string()]);
    let after = consumer
        .run_once(&mut handler, 10, Duration::from_millis(300))
        .unwrap();
    assert_eq!(after.delivered, 0);
}

/// Issue 19, defect 1: every failing step pulls the message behind the failing one again and
/// `nak`s it; the server counts each of those deliveries, no handler saw any.
#[test]
fn a_message_pulled_behind_a_failing_one_is_not_charged_for_deliveries_its_handler_never_saw() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = [message(&topic, "k", 1), message(&topic, "other", 2)];
    publish(&nats, &sent);
    let config = ConsumerConfig::new(&stream, unique("c")).max_deliveries(2);
    let mut consumer = NatsConsumer::connect(&nats.url, config.clone()).unwrap();
    break_dead_letters(&nats, &config);

    let refusals = RefCell::new(0);
    let mut other_calls = 0;
    let mut effects = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        if m.id == sent[0].id {
            *refusals.borrow_mut() += 1;
            return Disposition::DeadLetter("order was cancelled".into());
        }
        // A deadlock on its first call, fine on its second: within max_deliveries(2).
        other_calls += 1;
        if other_calls == 1 {
            return Disposition::Retry("deadlock detected".into());
        }
        effects.push(m.id);
        Disposition::Ack
    };
    let mut report = fail_until(&mut consumer, &mut handler, &refusals, 4);
    mend_dead_letters(&nats, &config);
    let settled = report.dead_lettered + report.acked;
    let rest = consume_until(&mut consumer, &mut handler, |r| {
        settled + r.dead_lettered + r.acked >= 2
    });
    report.add(&rest);
    assert_eq!(
        (report.acked, report.dead_lettered, report.retried),
        (1, 1, 1),
        "{report:?}"
    );
    assert_eq!(effects, [sent[1].id], "handled exactly once");
    assert_eq!(dead_letter_ids(&nats, &config), [sent[0].id.to_string()]);
}

/// Issue 19, defect 3: a step's pull stayed open for the whole `wait`, and the server
/// redelivered into it what it had already delivered once the ack wait ran out.
#[test]
fn a_pull_waiting_longer_than_the_ack_wait_hands_each_message_out_once() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent: Vec<_> = (0..3)
        .map(|n| message(&topic, &format!("k{n}"), n))
        .collect();
    publish(&nats, &sent);
    let config = ConsumerConfig::new(&stream, unique("c")).ack_wait(Duration::from_secs(1));
    let mut consumer = NatsConsumer::connect(&nats.url, config).unwrap();

    let mut handled: HashMap<MessageId, u32> = HashMap::new();
    let mut handler = |m: &IncomingMessage| {
        let calls = handled.entry(m.id).or_default();
        *calls += 1;
        if m.id == sent[0].id && *calls == 1 {
            // A handler slower than the ack wait (simulated work, not synchronisation).
            std::thread::sleep(Duration::from_millis(1500));
        }
        Disposition::Ack
    };
    let report = consumer
        .run_once(&mut handler, 10, Duration::from_secs(3))
        .unwrap();
    let after = consumer
        .run_once(&mut handler, 10, Duration::from_millis(300))
        .unwrap();
    assert_eq!((report.delivered, report.acked), (3, 3), "{report:?}");
    assert_eq!(after.delivered, 0, "{after:?}");
    assert_eq!(handled.len(), 3);
    assert!(handled.values().all(|n| *n == 1), "{handled:?}");
}

/// Issue 19, defects 1 and 3: messages pulled in one batch wait behind each other; the server
/// must not hand them to a competing consumer of the same durable meanwhile.
#[test]
fn messages_pulled_ahead_stay_with_their_consumer_while_slow_handlers_run() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent: Vec<_> = (0..6)
        .map(|n| message(&topic, &format!("k{n}"), n))
        .collect();
    publish(&nats, &sent);
    let config = ConsumerConfig::new(&stream, unique("c")).ack_wait(Duration::from_secs(2));
    let mut slow = NatsConsumer::connect(&nats.url, config.clone()).unwrap();
    let mut competitor = NatsConsumer::connect(&nats.url, config).unwrap();

    let handled: Arc<Mutex<Vec<MessageId>>> = Arc::default();
    let (started, slow_started) = mpsc::channel();
    let (finished, slow_finished) = mpsc::channel();
    let slow_handled = Arc::clone(&handled);
    let worker = std::thread::spawn(move || {
        let mut handler = |m: &IncomingMessage| {
            let _ = started.send(());
            slow_handled.lock().unwrap().push(m.id);
            // Each run well within the ack wait, all six well beyond it (simulated work).
            std::thread::sleep(Duration::from_millis(600));
            Disposition::Ack
        };
        let report = slow.run_once(&mut handler, 10, Duration::from_secs(1));
        let _ = finished.send(report.map_err(|e| e.to_string()));
    });
    slow_started.recv_timeout(DEADLINE).unwrap();
    let mut handler = |m: &IncomingMessage| {
        handled.lock().unwrap().push(m.id);
        Disposition::Ack
    };
    let mut competed = ConsumeReport::default();
    let report = loop {
        if let Ok(report) = slow_finished.try_recv() {
            break report.unwrap();
        }
        competed.add(
            &competitor
                .run_once(&mut handler, 10, Duration::from_millis(200))
                .unwrap(),
        );
    };
    worker.join().unwrap();
    let after = competitor
        .run_once(&mut handler, 10, Duration::from_millis(300))
        .unwrap();
    assert_eq!(report.acked, 6, "{report:?}");
    assert_eq!(competed.delivered + after.delivered, 0, "{competed:?}");
    let mut handled = handled.lock().unwrap().clone();
    handled.sort();
    let mut expected: Vec<_> = sent.iter().map(|m| m.id).collect();
    expected.sort();
    assert_eq!(handled, expected, "each message handled exactly once");
}

/// Issue 19, defect 4: a panicking handler is caught under `run` as well: the message is
/// dead-lettered after `max_deliveries` calls and the messages behind it are handled.
#[test]
fn run_survives_a_panicking_handler_and_dead_letters_after_max_deliveries() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    let sent = [
        message(&topic, "a", 1),
        message(&topic, "a", 2),
        message(&topic, "b", 3),
    ];
    publish(&nats, &sent);
    let config = ConsumerConfig::new(&stream, unique("c"))
        .max_deliveries(3)
        .poll_wait(Duration::from_millis(200));
    let mut consumer = NatsConsumer::connect(&nats.url, config.clone()).unwrap();

    let stop = StopHandle::new();
    let mut panics = 0;
    let mut handled = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        if m.id == sent[0].id {
            panics += 1;
            panic!("the handler has a bug");
        }
        handled.push(m.id);
        if handled.len() == 2 {
            stop.stop();
        }
        Disposition::Ack
    };
    let report = consumer.run(&mut handler, &stop).unwrap();
    assert_eq!(panics, 3, "one call per allowed delivery");
    // The publisher keeps each key's order; keys interleave as their acks come.
    handled.sort();
    let mut expected = [sent[1].id, sent[2].id];
    expected.sort();
    assert_eq!(handled, expected);
    assert_eq!(
        (report.acked, report.dead_lettered, report.retried),
        (2, 1, 2)
    );
    let dead = nats.messages(&config.dead_letter_stream_name().unwrap());
    assert_eq!(dead.len(), 1);
    assert!(
        header(&dead[0], DEAD_LETTER_REASON).contains("handler panicked: the handler has a bug")
    );
    assert_eq!(header(&dead[0], DEAD_LETTER_DELIVERIES), "3");
}

/// Issue 19, defect 5: the report (and `waybill_consumer_dead_lettered_total`) counted
/// refused messages but not malformed ones, which the stream held all the same.
#[test]
fn dead_lettered_counts_malformed_and_refused_messages_as_the_stream_holds_them() {
    let Some(mut nats) = nats() else { return };
    let (stream, topic) = nats.stream();
    for garbage in ["{", "not json", ""] {
        nats.publish_raw(&topic, &[], garbage.as_bytes());
    }
    let sent: Vec<_> = (0..4)
        .map(|n| message(&topic, &format!("k{n}"), n))
        .collect();
    publish(&nats, &sent);
    let durable = unique("c");
    let config = ConsumerConfig::new(&stream, &durable);
    let mut consumer = NatsConsumer::connect(&nats.url, config.clone()).unwrap();
    let mut handler = |m: &IncomingMessage| {
        if m.id == sent[1].id || m.id == sent[3].id {
            Disposition::DeadLetter("refused by the handler".into())
        } else {
            Disposition::Ack
        }
    };

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let report = metrics::with_local_recorder(&recorder, || {
        consume_until(&mut consumer, &mut handler, |r| r.delivered >= 7)
    });
    let dead = nats.messages(&config.dead_letter_stream_name().unwrap());
    assert_eq!(
        (report.malformed, report.dead_lettered, report.acked),
        (3, 5, 2)
    );
    assert_eq!(dead.len(), 5);
    assert!(dead
        .iter()
        .all(|m| !header(m, DEAD_LETTER_REASON).is_empty()));
    let recorded = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, _, _, _)| {
            key.key().name() == CONSUMER_DEAD_LETTERED
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == CONSUMER_LABEL && l.value() == durable)
        })
        .map(|(_, _, _, value)| value);
    assert_eq!(recorded, Some(DebugValue::Counter(5)));
}
