//! The sender-assigned message id.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The identity of a message, assigned by the sender when the message is built.
///
/// It is never assigned by the database, so it stays the same across relay retries and broker
/// redeliveries and a consumer can use it as its deduplication key. New ids are UUIDv7: they sort
/// by creation time, which keeps B-tree indexes compact.
///
/// ```
/// use waybill_outbox_core::MessageId;
///
/// let id = MessageId::new();
/// let parsed: MessageId = id.to_string().parse()?;
/// assert_eq!(id, parsed);
/// # Ok::<(), uuid::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh time-ordered id (UUIDv7).
    #[must_use]
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID.
    #[must_use]
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 bytes of the UUID, big-endian: the form stored on SQLite and MySQL.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Rebuilds an id from its 16 stored bytes.
    ///
    /// # Errors
    ///
    /// Fails when `bytes` is not exactly 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, uuid::Error> {
        Uuid::from_slice(bytes).map(Self)
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for MessageId {
    fn from(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl From<MessageId> for Uuid {
    fn from(id: MessageId) -> Self {
        id.0
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_version_7_and_increase() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert_eq!(a.as_uuid().get_version_num(), 7);
        assert!(a < b);
    }

    #[test]
    fn bytes_round_trip_and_wrong_length_is_an_error() {
        let id = MessageId::new();
        assert_eq!(MessageId::from_slice(id.as_bytes()).ok(), Some(id));
        assert!(MessageId::from_slice(&[1, 2, 3]).is_err());
    }

    #[test]
    fn garbage_does_not_parse() {
        assert!("order:4231".parse::<MessageId>().is_err());
    }
}
