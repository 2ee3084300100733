//! The stable names of the metrics the relay exports through the [`metrics`] facade.
//!
//! Install any `metrics` recorder (e.g. `metrics-exporter-prometheus`, as the `waybill` binary
//! does) and every [`Relay`](crate::Relay) reports through it; without one, recording costs
//! next to nothing. Counters carry an `owner` label (the relay's
//! [`owner_name`](crate::RelayConfig::owner_name)); the outbox gauges carry a `topic` label.

use std::time::Duration;

use chrono::Utc;

use crate::{Completion, OutboxMessage, RelayReport};

/// Counter: messages the broker confirmed.
pub const RELAY_PUBLISHED: &str = "waybill_relay_published_total";
/// Counter: failed publishes scheduled for another attempt.
pub const RELAY_RETRIED: &str = "waybill_relay_retried_total";
/// Counter: messages parked after a fatal error or their last attempt.
pub const RELAY_PARKED: &str = "waybill_relay_parked_total";
/// Counter: claimed messages handed back unsent (stopping, or not attempted).
pub const RELAY_RELEASED: &str = "waybill_relay_released_total";
/// Counter: claimed messages handed back unsent because the broker was unavailable (no
/// attempt counted).
pub const RELAY_BROKER_UNAVAILABLE: &str = "waybill_relay_broker_unavailable_total";
/// Counter: write-backs refused because another relay took the lease over (fencing).
pub const RELAY_FENCED_OFF: &str = "waybill_relay_fenced_off_total";
/// Counter: leases this relay took over from a relay whose lease had expired.
pub const RELAY_LEASE_TAKEOVERS: &str = "waybill_relay_lease_takeovers_total";
/// Histogram: seconds from claim to written-back outcome of a non-empty batch.
pub const RELAY_BATCH_SECONDS: &str = "waybill_relay_batch_duration_seconds";
/// Histogram: seconds from enqueue (the message's stored creation time, on the database's
/// clock) to the broker's confirm, per topic: the time a message spent in the outbox.
pub const RELAY_MESSAGE_AGE_SECONDS: &str = "waybill_relay_message_age_seconds";
/// Gauge: pending messages per topic (sampled from the outbox table, e.g. by `waybill relay`).
pub const OUTBOX_PENDING: &str = "waybill_outbox_pending";
/// Gauge: parked messages per topic.
pub const OUTBOX_PARKED: &str = "waybill_outbox_parked";
/// Gauge: age in seconds of the oldest pending message per topic (0 when none).
pub const OUTBOX_OLDEST_PENDING_AGE: &str = "waybill_outbox_oldest_pending_age_seconds";

/// Label naming the relay on the relay metrics.
pub const OWNER_LABEL: &str = "owner";
/// Label naming the topic on the outbox gauges.
pub const TOPIC_LABEL: &str = "topic";

/// Registers the relay counters at zero, so a scrape shows them before the first batch.
pub(crate) fn register(owner: &str) {
    for name in [
        RELAY_PUBLISHED,
        RELAY_RETRIED,
        RELAY_PARKED,
        RELAY_RELEASED,
        RELAY_BROKER_UNAVAILABLE,
        RELAY_FENCED_OFF,
        RELAY_LEASE_TAKEOVERS,
    ] {
        metrics::counter!(name, OWNER_LABEL => owner.to_owned()).increment(0);
    }
}

/// Records how long each confirmed message of a round waited in the outbox, one histogram
/// handle per topic and round (a round rarely spans many topics).
pub(crate) fn record_ages(messages: &[OutboxMessage], completions: &[Completion]) {
    let now = Utc::now();
    let mut by_topic: Vec<(&str, Vec<f64>)> = Vec::new();
    for (msg, completion) in messages.iter().zip(completions) {
        if !matches!(completion, Completion::Published { .. }) {
            continue;
        }
        // A clock behind the database's makes a tiny negative age: count it as none.
        let age = (now - msg.created_at)
            .to_std()
            .map_or(0.0, |age| age.as_secs_f64());
        match by_topic.iter_mut().find(|(topic, _)| *topic == msg.topic) {
            Some((_, ages)) => ages.push(age),
            None => by_topic.push((msg.topic.as_str(), vec![age])),
        }
    }
    for (topic, ages) in by_topic {
        let histogram =
            metrics::histogram!(RELAY_MESSAGE_AGE_SECONDS, TOPIC_LABEL => topic.to_owned());
        for age in ages {
            histogram.record(age);
        }
    }
}

/// Records one non-empty round.
pub(crate) fn record_round(owner: &str, report: &RelayReport, elapsed: Duration) {
    let counts = [
        (RELAY_PUBLISHED, report.published),
        (RELAY_RETRIED, report.retried),
        (RELAY_PARKED, report.parked),
        (RELAY_RELEASED, report.released),
        (RELAY_BROKER_UNAVAILABLE, report.unavailable),
        (RELAY_FENCED_OFF, report.fenced_off),
        (RELAY_LEASE_TAKEOVERS, report.lease_takeovers),
    ];
    for (name, count) in counts {
        if count > 0 {
            metrics::counter!(name, OWNER_LABEL => owner.to_owned()).increment(count);
        }
    }
    metrics::histogram!(RELAY_BATCH_SECONDS, OWNER_LABEL => owner.to_owned())
        .record(elapsed.as_secs_f64());
}
