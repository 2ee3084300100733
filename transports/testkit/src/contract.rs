//! The consumer and publisher contract, one function per promise. Each takes a fresh
//! [`Harness`] and panics, naming the broker, when the promise is broken.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use waybill_inbox_core::{
    ConsumeReport, DeliveryHandler, Disposition, IncomingMessage, RetryPolicy,
};
use waybill_outbox_core::{
    Headers, MessageId, OutboxMessage, PublishError, Publisher, Status, StopHandle,
};

use crate::PATIENCE;

/// A broker under test: one topic, competing consumers of its queue and the queue's
/// dead-letter destination, all named uniquely for one test. Make the consumer before
/// publishing: on a broker that routes, its queue must exist first.
pub trait Harness {
    /// The broker's publisher.
    type Publisher: Publisher;
    /// The broker's consumer.
    type Consumer: Consume + Send + 'static;

    /// The broker's name, for failure messages.
    fn name(&self) -> &'static str;
    /// The topic messages are published to.
    fn topic(&self) -> &str;
    /// A publisher to the topic.
    fn publisher(&mut self) -> Self::Publisher;
    /// A consumer of the topic's queue that runs handlers under `retry`.
    fn consumer(&mut self, retry: RetryPolicy) -> Self::Consumer;
    /// Puts raw data on the topic's queue, bypassing the publisher (undecodable input).
    fn publish_raw(&mut self, headers: Headers, payload: Vec<u8>);
    /// The reasons of the dead letters the destination holds, oldest first.
    fn dead_letters(&mut self) -> Vec<String>;
    /// Makes the dead-letter destination refuse dead letters (deletes it); `false` when the
    /// broker cannot lose it (the in-process one), which skips that contract.
    fn break_dead_letters(&mut self) -> bool {
        false
    }
    /// Brings the dead-letter destination back.
    fn mend_dead_letters(&mut self) {}
    /// A message this broker refuses (a missing exchange, a size over its limit), or `None`.
    fn poison(&mut self) -> Option<OutboxMessage> {
        None
    }
    /// A consumer that will be killed mid-stream, and how to kill it: afterwards the broker
    /// hands what it had not acknowledged to the next consumer (cut its connection, make it
    /// leave its group). By default nothing: the broker redelivers after its ack timeout.
    fn consumer_to_kill(&mut self) -> (Self::Consumer, Kill) {
        (self.consumer(RetryPolicy::default()), Box::new(|| {}))
    }
}

/// What kills a consumer for [`Harness::consumer_to_kill`].
pub type Kill = Box<dyn FnOnce() + Send>;

/// A transport's consumer, as the contract drives it.
pub trait Consume {
    /// One step: up to `max` deliveries, waiting at most `wait` for the first.
    ///
    /// # Errors
    ///
    /// The transport's error, as text.
    fn run_once<H: DeliveryHandler>(
        &mut self,
        handler: &mut H,
        max: usize,
        wait: Duration,
    ) -> Result<ConsumeReport, String>;

    /// Consumes until `stop` is stopped.
    ///
    /// # Errors
    ///
    /// The transport's error, as text.
    fn run<H: DeliveryHandler>(
        &mut self,
        handler: &mut H,
        stop: &StopHandle,
    ) -> Result<ConsumeReport, String>;
}

/// `Consume` through the consumer's own `run_once` and `run`, whose errors become text.
macro_rules! consume_through_inherent_methods {
    ($($consumer:ty),*) => {$(
        impl Consume for $consumer {
            fn run_once<H: DeliveryHandler>(
                &mut self,
                handler: &mut H,
                max: usize,
                wait: Duration,
            ) -> Result<ConsumeReport, String> {
                <$consumer>::run_once(self, handler, max, wait).map_err(|e| e.to_string())
            }

            fn run<H: DeliveryHandler>(
                &mut self,
                handler: &mut H,
                stop: &StopHandle,
            ) -> Result<ConsumeReport, String> {
                <$consumer>::run(self, handler, stop).map_err(|e| e.to_string())
            }
        }
    )*};
}

consume_through_inherent_methods!(
    waybill_amqp::AmqpConsumer,
    waybill_nats::NatsConsumer,
    waybill_kafka::KafkaConsumer
);

/// Instantiates every contract as a `#[test]` for the harness `$make` returns
/// (`Option<Harness>`: `None` skips, as when the server is unreachable); with `, end_to_end`
/// also [`crate::end_to_end`]'s 10,000 messages through a consumer killed mid-stream.
#[macro_export]
macro_rules! contract_tests {
    ($make:expr, end_to_end) => {
        $crate::contract_tests!($make);

        #[test]
        fn ten_thousand_messages_take_effect_once_across_a_consumer_killed_mid_stream() {
            if let Some(mut harness) = $make {
                $crate::end_to_end::ten_thousand_messages_take_effect_once_across_a_consumer_killed_mid_stream(&mut harness);
            }
        }
    };
    ($make:expr) => {
        $crate::contract_tests!(@each $make;
            every_published_message_is_confirmed_and_delivered_in_key_order,
            retries_keep_key_order,
            a_panicking_handler_is_dead_lettered_and_the_rest_flow,
            dead_letter_counts_match_the_destination,
            nothing_is_lost_while_the_dead_letter_destination_is_missing,
            run_stops_when_asked,
            a_poison_message_costs_other_keys_nothing);
    };
    (@each $make:expr; $($contract:ident),*) => {
        $(
            #[test]
            fn $contract() {
                if let Some(mut harness) = $make {
                    $crate::contract::$contract(&mut harness);
                }
            }
        )*
    };
}

/// Retries without pauses, so that a contract never waits on a backoff.
pub fn quick(max_deliveries: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_deliveries(max_deliveries)
        .backoff(Duration::ZERO, Duration::ZERO)
}

/// A stored outbox message of `topic` and `key` whose JSON payload is `{"seq": seq}`.
pub fn message(topic: &str, key: &str, seq: i64) -> OutboxMessage {
    let mut msg = OutboxMessage::new(seq, MessageId::new(), Status::Pending);
    msg.topic = topic.to_owned();
    msg.partition_key = key.to_owned();
    msg.message_type = "OrderPlaced".to_owned();
    msg.content_type = "application/json".to_owned();
    msg.payload = format!("{{\"seq\":{seq}}}").into_bytes();
    msg
}

/// The `seq` of a message made by [`message`].
pub fn seq(message: &IncomingMessage) -> i64 {
    message
        .json::<BTreeMap<String, i64>>()
        .ok()
        .and_then(|m| m.get("seq").copied())
        .unwrap_or(-1)
}

fn publish_all<H: Harness>(harness: &mut H, batch: &[OutboxMessage]) {
    let outcomes = harness.publisher().publish(batch);
    assert!(
        outcomes.iter().all(Result::is_ok),
        "{}: publishing failed: {outcomes:?}",
        harness.name()
    );
}

/// Steps `consumer` until `done` holds for the summed report (or the patience runs out).
fn consume_until<C: Consume, H: DeliveryHandler>(
    broker: &str,
    consumer: &mut C,
    handler: &mut H,
    mut done: impl FnMut(&ConsumeReport) -> bool,
) -> ConsumeReport {
    let deadline = Instant::now() + PATIENCE;
    let mut total = ConsumeReport::default();
    while !done(&total) {
        assert!(
            Instant::now() < deadline,
            "{broker}: the consumer stalled at {total:?}"
        );
        match consumer.run_once(handler, 100, Duration::from_millis(200)) {
            Ok(report) => total.add(&report),
            Err(error) => log::info!("{broker}: a step failed (retried): {error}"),
        }
    }
    total
}

/// Nothing more is delivered within a short wait.
fn assert_drained<C: Consume, H: DeliveryHandler>(broker: &str, consumer: &mut C, handler: &mut H) {
    let extra = consumer
        .run_once(handler, 100, Duration::from_millis(300))
        .unwrap_or_else(|e| panic!("{broker}: {e}"));
    assert_eq!(extra.delivered, 0, "{broker}: delivered more than was sent");
}

/// Confirm-or-fail: every message a publisher reported `Ok` is delivered, each key's messages
/// in publishing order.
pub fn every_published_message_is_confirmed_and_delivered_in_key_order<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(3));
    let topic = h.topic().to_owned();
    let batch: Vec<_> = (0..60)
        .map(|i| message(&topic, &format!("k{}", i % 6), i))
        .collect();
    publish_all(h, &batch);
    let mut seen: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut handler = |m: &IncomingMessage| {
        seen.entry(seq(m) % 6).or_default().push(seq(m));
        Disposition::Ack
    };
    let name = h.name();
    consume_until(name, &mut consumer, &mut handler, |r| r.acked >= 60);
    assert_drained(name, &mut consumer, &mut handler);
    for (key, seqs) in &seen {
        let expected: Vec<i64> = (0..60).filter(|i| i % 6 == *key).collect();
        assert_eq!(
            seqs, &expected,
            "{name}: key k{key} out of order or incomplete"
        );
    }
}

/// A handler's transient failure is retried before any later message of its key.
pub fn retries_keep_key_order<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(5));
    let topic = h.topic().to_owned();
    publish_all(h, &[message(&topic, "k", 1), message(&topic, "k", 2)]);
    let (mut failures, mut effects) = (0, Vec::new());
    let mut handler = |m: &IncomingMessage| {
        if seq(m) == 1 && failures < 2 {
            failures += 1;
            return Disposition::Retry("deadlock detected".into());
        }
        effects.push(seq(m));
        Disposition::Ack
    };
    let name = h.name();
    let report = consume_until(name, &mut consumer, &mut handler, |r| r.acked >= 2);
    assert_eq!(
        effects,
        [1, 2],
        "{name}: a retry let the key's next message overtake it"
    );
    assert_eq!(report.retried, 2, "{name}: {report:?}");
    assert!(h.dead_letters().is_empty(), "{name}: nothing was refused");
}

/// A panicking handler is a failed attempt: retried up to the limit, then dead-lettered,
/// while the consumer lives on and the messages behind it flow.
pub fn a_panicking_handler_is_dead_lettered_and_the_rest_flow<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(3));
    let topic = h.topic().to_owned();
    publish_all(
        h,
        &[
            message(&topic, "p", 1),
            message(&topic, "p", 2),
            message(&topic, "q", 3),
        ],
    );
    let (mut poisoned, mut effects) = (0, Vec::new());
    let mut handler = |m: &IncomingMessage| {
        if seq(m) == 1 {
            poisoned += 1;
            panic!("poisoned message");
        }
        effects.push(seq(m));
        Disposition::Ack
    };
    let name = h.name();
    let report = consume_until(name, &mut consumer, &mut handler, |r| {
        r.acked >= 2 && r.dead_lettered >= 1
    });
    assert_eq!(
        poisoned, 3,
        "{name}: max deliveries counts every handler call"
    );
    effects.sort_unstable();
    assert_eq!(effects, [2, 3], "{name}");
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1, "{name}: {dead:?}");
    assert!(
        dead[0].contains("handler panicked: poisoned message"),
        "{name}: {dead:?}"
    );
    assert_eq!(report.dead_lettered, 1, "{name}: {report:?}");
}

/// `dead_lettered` counts what the dead-letter destination holds, malformed messages included.
pub fn dead_letter_counts_match_the_destination<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(2));
    let topic = h.topic().to_owned();
    for garbage in ["{", "not json", ""] {
        h.publish_raw(Headers::new(), garbage.as_bytes().to_vec());
    }
    let batch: Vec<_> = (1..=4)
        .map(|i| message(&topic, &format!("k{i}"), i))
        .collect();
    publish_all(h, &batch);
    let mut handler = |m: &IncomingMessage| {
        if seq(m) % 2 == 0 {
            Disposition::DeadLetter("refused by the handler".into())
        } else {
            Disposition::Ack
        }
    };
    let name = h.name();
    let report = consume_until(name, &mut consumer, &mut handler, |r| {
        r.acked + r.dead_lettered >= 7
    });
    assert_drained(name, &mut consumer, &mut handler);
    let dead = h.dead_letters();
    assert_eq!(
        (report.malformed, report.dead_lettered, report.acked),
        (3, 5, 2),
        "{name}"
    );
    assert_eq!(dead.len(), 5, "{name}: the destination holds {dead:?}");
    assert_eq!(
        dead.iter()
            .filter(|r| r.starts_with("malformed: not a CloudEvent: no "))
            .count(),
        3,
        "{name}: {dead:?}"
    );
}

/// While the dead-letter destination is missing, a message to dead-letter stays with the
/// broker; once the destination is back it is dead-lettered exactly once.
pub fn nothing_is_lost_while_the_dead_letter_destination_is_missing<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(2));
    if !h.break_dead_letters() {
        log::info!(
            "{}: its dead-letter destination cannot go missing",
            h.name()
        );
        return;
    }
    let topic = h.topic().to_owned();
    publish_all(h, &[message(&topic, "k", 1)]);
    let refused = std::cell::Cell::new(0);
    let mut handler = |_: &IncomingMessage| {
        refused.set(refused.get() + 1);
        Disposition::DeadLetter("refused by the handler".into())
    };
    let name = h.name();
    // Until the handler has refused it a few times, every attempt to dead-letter it failed.
    let mut total = ConsumeReport::default();
    let deadline = Instant::now() + PATIENCE;
    while refused.get() < 3 {
        assert!(
            Instant::now() < deadline,
            "{name}: the message was not redelivered"
        );
        if let Ok(report) = consumer.run_once(&mut handler, 10, Duration::from_millis(200)) {
            total.add(&report);
        }
    }
    assert_eq!(
        total.dead_lettered, 0,
        "{name}: counted a dead letter nobody stored"
    );
    h.mend_dead_letters();
    let report = consume_until(name, &mut consumer, &mut handler, |r| r.dead_lettered >= 1);
    assert_drained(name, &mut consumer, &mut handler);
    assert_eq!(report.dead_lettered, 1, "{name}");
    assert_eq!(
        h.dead_letters().len(),
        1,
        "{name}: dead-lettered exactly once"
    );
}

/// `run` returns soon after the stop handle is stopped, with what it handled.
pub fn run_stops_when_asked<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(3));
    let topic = h.topic().to_owned();
    publish_all(h, &[message(&topic, "k", 1), message(&topic, "k", 2)]);
    let (handled, seen) = mpsc::channel();
    let (finished, done) = mpsc::channel();
    let stop = StopHandle::new();
    let worker_stop = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut handler = |m: &IncomingMessage| {
            let _ = handled.send(seq(m));
            Disposition::Ack
        };
        let _ = finished.send(consumer.run(&mut handler, &worker_stop));
    });
    let name = h.name();
    for expected in [1, 2] {
        assert_eq!(seen.recv_timeout(PATIENCE).ok(), Some(expected), "{name}");
    }
    stop.stop();
    let report = done
        .recv_timeout(PATIENCE)
        .unwrap_or_else(|_| panic!("{name}: run did not return after stop"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(report.acked, 2, "{name}");
    assert!(worker.join().is_ok());
}

/// A message the broker refuses fails alone: batch-mates of other keys are published and
/// charged nothing, and its own key's later messages are not attempted.
pub fn a_poison_message_costs_other_keys_nothing<H: Harness>(h: &mut H) {
    let mut consumer = h.consumer(quick(3));
    let Some(mut poison) = h.poison() else {
        log::info!("{}: no message this broker refuses", h.name());
        return;
    };
    let topic = h.topic().to_owned();
    poison.partition_key = "p".to_owned();
    let batch = [
        message(&topic, "a", 1),
        poison,
        message(&topic, "b", 3),
        message(&topic, "p", 4),
        message(&topic, "a", 5),
    ];
    let name = h.name();
    let outcomes = h.publisher().publish(&batch);
    assert!(
        outcomes[1].is_err(),
        "{name}: the poison was taken: {outcomes:?}"
    );
    assert_eq!(outcomes[3], Err(PublishError::NotAttempted), "{name}");
    for i in [0, 2, 4] {
        assert_eq!(
            outcomes[i],
            Ok(()),
            "{name}: an innocent message was charged: {outcomes:?}"
        );
    }
    let mut seen = Vec::new();
    let mut handler = |m: &IncomingMessage| {
        seen.push(seq(m));
        Disposition::Ack
    };
    consume_until(name, &mut consumer, &mut handler, |r| r.acked >= 3);
    seen.sort_unstable();
    assert_eq!(seen, [1, 3, 5], "{name}");
}
