//! The stable names of the consumer metrics, exported through the [`metrics`] facade.
//!
//! The transports' consumer loops (waybill-memory, waybill-amqp, waybill-nats) count their
//! deliveries with a `consumer` label naming what they consume (the memory topic, the AMQP
//! queue, the NATS durable consumer); waybill-diesel's `InboxHandler` counts the duplicates it
//! skipped, labelled with the inbox's consumer name. Without a recorder installed, recording
//! costs next to nothing.

use crate::ConsumeReport;

/// Counter: deliveries acknowledged (handled now, or duplicates of handled ones).
pub const CONSUMER_HANDLED: &str = "waybill_consumer_handled_total";
/// Counter: deliveries the inbox skipped as duplicates of messages it already processed.
pub const CONSUMER_DUPLICATES_SKIPPED: &str = "waybill_consumer_duplicates_skipped_total";
/// Counter: in-place retries (handler calls repeated after a retry or a panic).
pub const CONSUMER_RETRIED: &str = "waybill_consumer_retried_total";
/// Counter: deliveries dead-lettered (refused, malformed or out of redeliveries).
pub const CONSUMER_DEAD_LETTERED: &str = "waybill_consumer_dead_lettered_total";
/// Label naming the consumer.
pub const CONSUMER_LABEL: &str = "consumer";

pub(crate) fn record_consume(consumer: &str, report: &ConsumeReport) {
    let counts = [
        (CONSUMER_HANDLED, report.acked),
        (CONSUMER_RETRIED, report.retried),
        (CONSUMER_DEAD_LETTERED, report.dead_lettered),
    ];
    for (name, count) in counts {
        if count > 0 {
            metrics::counter!(name, CONSUMER_LABEL => consumer.to_owned()).increment(count);
        }
    }
}

/// Counts one duplicate skipped by the inbox of `consumer`.
pub fn record_duplicate(consumer: &str) {
    metrics::counter!(CONSUMER_DUPLICATES_SKIPPED, CONSUMER_LABEL => consumer.to_owned())
        .increment(1);
}

/// Counter: sequence gaps a consumer met (`process_in_order` held a message back because an
/// earlier number of its key was not applied yet), counted once per held message.
pub const CONSUMER_SEQUENCE_GAPS: &str = "waybill_consumer_sequence_gaps_total";
/// Counter: messages parked (dead-lettered) after waiting the whole gap wait.
pub const CONSUMER_SEQUENCE_GAPS_PARKED: &str = "waybill_consumer_sequence_gaps_parked_total";

/// Counts one new sequence gap met by `consumer`.
pub fn record_gap(consumer: &str) {
    metrics::counter!(CONSUMER_SEQUENCE_GAPS, CONSUMER_LABEL => consumer.to_owned()).increment(1);
}

/// Counts one message `consumer` parked behind a gap.
pub fn record_gap_parked(consumer: &str) {
    metrics::counter!(CONSUMER_SEQUENCE_GAPS_PARKED, CONSUMER_LABEL => consumer.to_owned())
        .increment(1);
}
