//! What the inbox remembers a message by, and what processing it came to.

use std::fmt;

use waybill_outbox_core::MessageId;

/// The key a consumer deduplicates on.
///
/// By default the sender-assigned [`MessageId`], which survives relay retries and broker
/// redeliveries. Where the sender gives no stable id (it builds a fresh id on each retry of its
/// own), use a business key that names the effect instead, e.g. `order:4231`.
///
/// The [`Display`](fmt::Display) form is the id's hyphenated lowercase string or the business
/// key as given. The inbox keeps the two kinds apart (it stores a business key behind a
/// prefix), so a business key that reads like another message's id is not that message.
///
/// ```
/// use waybill_inbox_core::DedupKey;
/// use waybill_outbox_core::MessageId;
///
/// let id: MessageId = "0193b3c4-7d7a-7000-8000-000000000001".parse()?;
/// assert_eq!(DedupKey::from(id).to_string(), "0193b3c4-7d7a-7000-8000-000000000001");
/// assert_eq!(DedupKey::business("order:4231").to_string(), "order:4231");
/// # Ok::<(), uuid::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DedupKey {
    /// The sender-assigned message id.
    MessageId(MessageId),
    /// A key chosen by the consumer, e.g. `order:4231`.
    Business(String),
}

impl DedupKey {
    /// A business key, for senders without a stable message id.
    pub fn business(key: impl Into<String>) -> Self {
        Self::Business(key.into())
    }

    /// The message id, when the key is one.
    pub fn message_id(&self) -> Option<MessageId> {
        match self {
            Self::MessageId(id) => Some(*id),
            Self::Business(_) => None,
        }
    }
}

impl From<MessageId> for DedupKey {
    fn from(id: MessageId) -> Self {
        Self::MessageId(id)
    }
}

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageId(id) => id.fmt(f),
            Self::Business(key) => f.write_str(key),
        }
    }
}

/// What `process_once` did with a delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use]
pub enum Processed<T> {
    /// First delivery: the handler ran and its writes committed with the inbox record. Holds
    /// the handler's value.
    Handled(T),
    /// Already processed by this consumer: the handler did not run. Acknowledge the delivery.
    Duplicate,
    /// Not found, but sent before the newest record a purge of this consumer deleted (give or
    /// take the clock skew bound): it may have been processed and its record purged, so it is
    /// neither treated as new nor recorded, and the handler did not run. Dead-letter it or
    /// opt in to accepting such messages.
    Expired,
}

impl<T> Processed<T> {
    /// The handler's value, if it ran.
    pub fn handled(self) -> Option<T> {
        match self {
            Self::Handled(value) => Some(value),
            Self::Duplicate | Self::Expired => None,
        }
    }

    /// Whether the handler ran.
    pub fn is_handled(&self) -> bool {
        matches!(self, Self::Handled(_))
    }

    /// Whether the delivery was a duplicate.
    pub fn is_duplicate(&self) -> bool {
        matches!(self, Self::Duplicate)
    }

    /// Whether the message was refused because a purge may have deleted its record.
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Expired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_keys_have_no_message_id() {
        assert_eq!(DedupKey::business("order:1").message_id(), None);
        let id = MessageId::new();
        assert_eq!(DedupKey::from(id).message_id(), Some(id));
    }

    #[test]
    fn outcomes_classify() {
        assert_eq!(Processed::Handled(3).handled(), Some(3));
        assert!(Processed::<()>::Duplicate.is_duplicate());
        assert!(Processed::<()>::Expired.is_expired());
        assert!(!Processed::<()>::Expired.is_handled());
    }
}
