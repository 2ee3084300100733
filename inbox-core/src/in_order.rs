//! What applying a sequenced message in order came to, and how a consumer treats a key's
//! first message.

use std::time::Duration;

/// What `process_in_order` did with a sequenced message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum InOrder<T> {
    /// The next number of its key: the handler ran and the key's mark advanced with its
    /// writes. Holds the handler's value.
    Handled(T),
    /// A skip marker for the next number (an operator skipped that message at the producer):
    /// the mark advanced, no handler ran. Acknowledge.
    Skipped {
        /// The operator's reason.
        reason: String,
    },
    /// A number this consumer already applied: nothing ran. Acknowledge.
    Duplicate,
    /// A number beyond the next one: an earlier message of the key has not been applied yet.
    /// Nothing ran; retry the delivery in place (another consumer may be applying the missing
    /// one, or it is being redelivered) until the consumer's gap wait runs out.
    Held {
        /// The number the key waits for.
        expected: u64,
        /// The number received.
        got: u64,
        /// How long this message has been held back so far.
        waited: Duration,
    },
    /// As [`Held`](Self::Held), but held for the whole gap wait: park (dead-letter) it with
    /// the reason [`gap_reason`]`(expected, got)`. The gap stays listed for operators.
    GapParked {
        /// The number the key waits for.
        expected: u64,
        /// The number received.
        got: u64,
    },
}

impl<T> InOrder<T> {
    /// The handler's value, if it ran.
    pub fn handled(self) -> Option<T> {
        match self {
            Self::Handled(value) => Some(value),
            _ => None,
        }
    }

    /// Whether the delivery is done with (handled, skipped or a duplicate): acknowledge it.
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            Self::Handled(_) | Self::Skipped { .. } | Self::Duplicate
        )
    }
}

/// The dead-letter reason of a message parked behind a gap: `gap: expected N, got M`.
///
/// ```
/// assert_eq!(waybill_inbox_core::gap_reason(4, 6), "gap: expected 4, got 6");
/// ```
pub fn gap_reason(expected: u64, got: u64) -> String {
    format!("gap: expected {expected}, got {got}")
}

/// How a consumer treats the first message it sees of a key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FirstMessage {
    /// The key's first message must be number 1; any other number is a gap (the consumer
    /// missed the key's start). The default.
    #[default]
    MustBeFirst,
    /// Whatever number comes first starts the key: for a consumer that joins a running
    /// producer, or starts from "now" on a broker that only delivers new messages. Messages
    /// of the key numbered below it are then duplicates.
    StartAnywhere,
}
