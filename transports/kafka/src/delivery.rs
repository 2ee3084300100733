//! The producer machinery the publisher and the consumer's dead letters share: a librdkafka
//! producer context that collects delivery reports and notices a cluster that went away, and
//! the record encoding.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::Message;
use waybill_inbox_core::wire::WireValue;

/// Which send a delivery report answers: the batch's generation and the record's index in it.
#[derive(Debug)]
pub(crate) struct Tag {
    pub(crate) generation: u64,
    pub(crate) index: usize,
}

/// One delivery report.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) generation: u64,
    pub(crate) index: usize,
    pub(crate) result: Result<(), KafkaError>,
}

/// Collects the delivery reports that `poll` serves, and remembers that librdkafka said every
/// broker is down (until a probe or a delivery shows one is back).
#[derive(Debug, Default)]
pub(crate) struct DeliveryContext {
    reports: Mutex<Vec<Report>>,
    all_brokers_down: AtomicBool,
}

impl DeliveryContext {
    /// A context that starts out not knowing whether a broker is up: the first batch probes.
    pub(crate) fn unprobed() -> Self {
        Self {
            reports: Mutex::new(Vec::new()),
            all_brokers_down: AtomicBool::new(true),
        }
    }

    /// The reports served so far, oldest first; they are removed.
    pub(crate) fn take_reports(&self) -> Vec<Report> {
        std::mem::take(&mut *self.reports.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// `true` since librdkafka reported that no broker is reachable.
    pub(crate) fn all_brokers_down(&self) -> bool {
        self.all_brokers_down.load(Ordering::SeqCst)
    }

    /// A broker answered.
    pub(crate) fn broker_up(&self) {
        self.all_brokers_down.store(false, Ordering::SeqCst);
    }
}

impl ClientContext for DeliveryContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.all_brokers_down.store(true, Ordering::SeqCst);
        }
        log::warn!("librdkafka: {error}: {reason}");
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Tag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Box<Tag>) {
        let result = match result {
            Ok(_) => {
                self.broker_up();
                Ok(())
            }
            Err((error, message)) => {
                log::debug!(
                    "delivery to {}/{} failed: {error}",
                    message.topic(),
                    message.partition()
                );
                Err(error.clone())
            }
        };
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Report {
                generation: tag.generation,
                index: tag.index,
                result,
            });
    }
}

/// `headers` as Kafka record headers (values as UTF-8 bytes).
pub(crate) fn record_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> OwnedHeaders {
    headers
        .into_iter()
        .fold(OwnedHeaders::new(), |owned, (key, value)| {
            owned.insert(Header {
                key,
                value: Some(value),
            })
        })
}

/// The headers of a received record: text when UTF-8, else bytes (so a decoder can say
/// "ce_id is bytes"); a header without a value is left out, and a header sent several times
/// keeps its first value.
pub(crate) fn read_headers<H: rdkafka::message::Headers>(
    headers: Option<&H>,
) -> BTreeMap<String, WireValue> {
    let mut map = BTreeMap::new();
    for header in headers.into_iter().flat_map(|h| h.iter()) {
        if let Some(value) = header.value {
            map.entry(header.key.to_owned())
                .or_insert_with(|| WireValue::from_bytes(value));
        }
    }
    map
}

/// The size librdkafka gives a record when it checks `message.max.bytes` (its
/// `rd_kafka_msg_max_wire_size`): the record format v2's largest per-record overhead, the key,
/// the value and the serialized headers.
pub(crate) fn wire_size<'a>(
    key: usize,
    value: usize,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> usize {
    // Length, attributes, timestamp delta, offset delta, key length, value length, header count.
    const RECORD_V2_MAX_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    let headers: usize = headers
        .into_iter()
        .map(|(name, value)| {
            varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len()
        })
        .sum();
    RECORD_V2_MAX_OVERHEAD + key + value + headers
}

/// The length of `n` as a zig-zag varint, as Kafka encodes lengths in record headers.
fn varint_len(n: usize) -> usize {
    let mut zigzag = (n as u64) << 1;
    let mut len = 1;
    while zigzag >= 0x80 {
        zigzag >>= 7;
        len += 1;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_grow_every_seven_bits_of_the_zigzag_value() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }

    #[test]
    fn the_wire_size_counts_key_value_and_headers() {
        assert_eq!(wire_size(0, 0, []), 36);
        assert_eq!(wire_size(3, 10, [("ab", "xyz")]), 36 + 13 + 1 + 2 + 1 + 3);
    }
}
