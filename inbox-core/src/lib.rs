//! Backend-free types of the **waybill** inbox: [`IncomingMessage`], the [`wire`] form
//! transports publish and read, [`DedupKey`] and the [`Processed`] outcome.
//!
//! Brokers deliver at least once: a relay retries after a lost confirm, a broker redelivers an
//! unacknowledged message, a consumer crashes after its writes but before its ack. The inbox
//! makes each message take effect once per consumer: the consumer records the message's
//! sender-assigned id in its own database transaction, together with the handler's writes. A
//! redelivery finds the record and is skipped; a failed handler rolls the record back with its
//! writes, so the redelivery processes the message. The diesel implementation
//! (`waybill_diesel::Inbox`) lives in `waybill-diesel`.
//!
//! ```
//! use waybill_inbox_core::{wire, DedupKey, IncomingMessage};
//! use waybill_outbox_core::{Headers, MessageId};
//!
//! // What a transport received:
//! let id = MessageId::new();
//! let headers = Headers::from([
//!     ("ce-specversion".to_owned(), "1.0".to_owned()),
//!     ("ce-source".to_owned(), "/checkout".to_owned()),
//!     ("ce-id".to_owned(), id.to_string()),
//!     ("ce-waybilltopic".to_owned(), "orders".to_owned()),
//!     ("ce-type".to_owned(), "OrderPlaced".to_owned()),
//!     ("ce-time".to_owned(), "2026-11-27T10:00:00Z".to_owned()),
//!     ("content-type".to_owned(), "application/json".to_owned()),
//!     ("correlation-id".to_owned(), "checkout-77".to_owned()),
//! ]);
//! let incoming: IncomingMessage = wire::decode(headers, br#"{"order_id":4231}"#.to_vec())?;
//! assert_eq!(incoming.id, id);
//! assert_eq!(incoming.headers.len(), 1);
//! assert_eq!(DedupKey::from(incoming.id), DedupKey::MessageId(id));
//! # Ok::<(), waybill_inbox_core::DecodeError>(())
//! ```

mod consumer;
mod consumer_loop;
mod dedup;
mod error;
mod in_order;
mod incoming;
pub mod metrics;
mod retry;
mod subscription;
pub mod wire;

pub use consumer::{ConsumeReport, DeliveryHandler, Disposition};
pub use consumer_loop::ConsumerLoop;
pub use dedup::{DedupKey, Processed};
pub use error::{DecodeError, Result};
pub use in_order::{gap_reason, FirstMessage, InOrder};
pub use incoming::{IncomingMessage, Sequenced, OCTET_STREAM};
pub use retry::{Handled, Outcome, RetryPolicy, DEAD_LETTER_REASON};
pub use subscription::{DeadLetter, Subscription};
