//! Backend-free core of **waybill**, a transactional outbox and inbox for Rust on diesel.
//!
//! A service that changes its database and must tell other services about it faces the dual
//! write problem: the database and the broker are two systems, so one can fail after the other
//! and events are lost or invented. The outbox writes the event into the same database
//! transaction as the state change; a separate relay publishes committed events afterwards.
//!
//! This crate holds what does not depend on a database: the message model ([`NewOutboxMessage`],
//! [`OutboxMessage`], [`MessageId`]), input [`Limits`], the [`Publisher`] trait brokers
//! implement, and the [`Relay`] loop over an [`OutboxStore`]. The diesel implementation of the
//! store, `enqueue` and the migrations live in `waybill-diesel`.
//!
//! ```
//! use waybill_outbox_core::{Limits, MessageId, NewOutboxMessage};
//!
//! let msg = NewOutboxMessage::json("orders", "order:4231", "OrderPlaced", &serde_json::json!({"total": 1999}))?
//!     .with_id(MessageId::new())
//!     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! Limits::default().check(&msg)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backoff;
mod error;
mod id;
mod message;
pub mod metrics;
mod pace;
mod publisher;
mod redact;
mod relay;
mod secret;
pub mod sequence;
mod stop;
mod store;
mod trace;
mod validate;

pub use backoff::Backoff;
pub use error::{error_chain, Error, Retryable};
pub use id::MessageId;
pub use message::{Headers, NewOutboxMessage, OutboxMessage, Status, JSON_CONTENT_TYPE};
pub use publisher::{InMemoryPublisher, PublishError, Publisher, Unroutable};
pub use redact::{redact_url, url_userinfo};
pub use relay::{NoHooks, Relay, RelayConfig, RelayHooks, RelayReport};
pub use secret::{read_secret_file, warn_if_shared};
pub use sequence::Stamp;
pub use stop::{RelayHandle, StopHandle};
pub use store::{Claimed, CompleteReport, Completion, LeaseToken, OutboxStore, Retention};
pub use trace::{is_valid_traceparent, TRACEPARENT};
pub use validate::{BrokerLimits, Limits, ValidationError};
