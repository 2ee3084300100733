//! Sequenced messages: a per-key number assigned at enqueue, in commit order, that a consumer
//! applies in order (issue 25).
//!
//! A message built with [`NewOutboxMessage::sequenced`](crate::NewOutboxMessage::sequenced) is
//! given the next number of its `(topic, partition key)` by `enqueue`, inside the writer's
//! transaction, together with the producer's [epoch](Stamp::epoch). Both are stored with the
//! message under the reserved headers below and travel as the CloudEvents extensions
//! `sequence` (zero-padded) and `waybillepoch`; a consumer never sees the reserved headers.

use crate::Headers;

/// Reserved header holding a sequenced message's number in the outbox row (decimal).
pub const SEQUENCE_HEADER: &str = "waybill-sequence";
/// Reserved header holding the producer epoch the number was drawn under.
pub const EPOCH_HEADER: &str = "waybill-sequence-epoch";
/// Reserved header marking a skip marker: an operator skipped the message that held this
/// number, and the marker takes its place so consumers move past it. The value is the reason.
pub const SKIPPED_HEADER: &str = "waybill-sequence-skipped";
/// The reserved headers; a writer may not set them.
pub const RESERVED_HEADERS: [&str; 3] = [SEQUENCE_HEADER, EPOCH_HEADER, SKIPPED_HEADER];

/// The message type of a skip marker.
pub const SKIP_MARKER_TYPE: &str = "waybill.sequence.skipped";

/// A sequenced message's number and the epoch it was drawn under.
///
/// ```
/// use waybill_outbox_core::{Headers, Stamp};
///
/// let stamp = Stamp::new(42, "e1");
/// let mut headers = Headers::new();
/// stamp.write(&mut headers);
/// assert_eq!(Stamp::read(&headers), Some(Ok(stamp)));
/// assert_eq!(Stamp::new(42, "e1").padded(), "0000000000000000042");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The number: 1 for a key's first message, then each next one.
    pub sequence: u64,
    /// The producer epoch: changes whenever the producer's counter may have gone back (a
    /// restore, a failover), so a consumer can tell a regression from a duplicate.
    pub epoch: String,
}

impl Stamp {
    /// A stamp of `sequence` under `epoch`.
    pub fn new(sequence: u64, epoch: impl Into<String>) -> Self {
        Self {
            sequence,
            epoch: epoch.into(),
        }
    }

    /// The number zero-padded to 19 digits, so that strings compare like numbers (the
    /// CloudEvents `sequence` extension's form).
    pub fn padded(&self) -> String {
        format!("{:019}", self.sequence)
    }

    /// Writes the stamp into `headers` under the reserved names.
    pub fn write(&self, headers: &mut Headers) {
        headers.insert(SEQUENCE_HEADER.to_owned(), self.sequence.to_string());
        headers.insert(EPOCH_HEADER.to_owned(), self.epoch.clone());
    }

    /// The stamp stored in `headers`: `None` for a message that is not sequenced, `Err` with
    /// the bad value when the number does not parse.
    pub fn read(headers: &Headers) -> Option<Result<Self, String>> {
        let sequence = headers.get(SEQUENCE_HEADER)?;
        let epoch = headers.get(EPOCH_HEADER).cloned().unwrap_or_default();
        Some(
            sequence
                .trim()
                .parse::<u64>()
                .map(|sequence| Self { sequence, epoch })
                .map_err(|_| sequence.clone()),
        )
    }
}
